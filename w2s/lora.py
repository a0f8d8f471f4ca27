"""LoRA (Hu et al. 2021): train a low-rank update W + (alpha / r) * B @ A of frozen linear weights, merge on export.

    inject_lora(model, rank=16, alpha=32, dropout=0.05)        # q,k,v,o,gate,up,down by default; freezes the rest
    merged = merge_lora_state_dict(model.state_dict(), scale)  # plain HF names, LoRA folded into the weights

`LoRALinear` keeps the wrapped layer's parameter names (`weight`, `bias`) and adds `lora_A` (r, in) and `lora_B`
(out, r), so `layers.0.self_attn.q_proj.weight` is still the base weight and merging is a pure function over a
state dict (it works equally on a gathered FSDP state dict). B starts at zero, so the injected model computes
exactly what the base model did; A starts like nn.Linear's default (Kaiming-uniform), as in the paper's code.

    python -m pytest -q tests/test_train.py -k lora
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank, alpha, dropout, generator=None):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # shared, frozen
        self.bias = base.bias
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=torch.float32, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=torch.float32,
                                               device=base.weight.device))
        bound = 1.0 / math.sqrt(base.in_features)  # kaiming_uniform_(a=sqrt(5)) == U(-1/sqrt(in), 1/sqrt(in))
        with torch.no_grad():
            self.lora_A.uniform_(-bound, bound, generator=generator)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):  # x (..., in)
        out = F.linear(x, self.weight, self.bias)
        update = F.linear(F.linear(self.dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))  # (..., out)
        return out + update * self.scale


def inject_lora(model, rank=16, alpha=32, dropout=0.0, targets=TARGETS, seed=0):
    """Replace every nn.Linear whose attribute name is in `targets` by a LoRALinear; freeze all other parameters.

    Returns the number of layers wrapped. `seed` fixes A's init, identical on every rank.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    wrapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                lora = LoRALinear(child, rank, alpha, dropout, generator=_generator_for(child, generator))
                setattr(module, name, lora)
                wrapped += 1
    if wrapped == 0:
        raise ValueError(f"LoRA targets {list(targets)} matched no nn.Linear in the model")
    return wrapped


def _generator_for(layer, cpu_generator):
    """Generators are device-bound: draw on CPU for CPU layers, else seed a device generator from the CPU one."""
    if layer.weight.device.type in ("cpu", "meta"):  # meta (an FSDP rank > 0): filled from rank 0 later
        return cpu_generator
    seed = int(torch.randint(0, 2**62, (1,), generator=cpu_generator))
    return torch.Generator(device=layer.weight.device).manual_seed(seed)


def lora_scale(model):
    scales = {m.scale for m in model.modules() if isinstance(m, LoRALinear)}
    if len(scales) > 1:
        raise ValueError(f"LoRA layers disagree on alpha / rank: {sorted(scales)}")
    return scales.pop() if scales else None


@torch.no_grad()
def merge_lora_state_dict(state, scale):
    """{name: tensor} with every `X.lora_A` / `X.lora_B` folded into `X.weight` (in >= fp32, cast back) and removed."""
    out = {}
    for name, t in state.items():
        if name.endswith((".lora_A", ".lora_B")):
            continue
        prefix = name[: -len(".weight")] if name.endswith(".weight") else None
        if prefix is not None and prefix + ".lora_A" in state:
            work = torch.promote_types(t.dtype, torch.float32)  # at least fp32; fp64 weights stay fp64
            a, b = state[prefix + ".lora_A"].to(work), state[prefix + ".lora_B"].to(work)
            t = (t.to(work) + scale * (b @ a)).to(t.dtype)
        out[name] = t
    return out
