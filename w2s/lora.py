"""LoRA (Hu et al. 2021): train a low-rank update W + (alpha / r) * B @ A of frozen linear weights; adapters on disk.

    inject_lora(model, rank=16, alpha=32, dropout=0.05)        # q,k,v,o,gate,up,down by default; freezes the rest
    merged = merge_lora_state_dict(model.state_dict(), scale)  # plain HF names, LoRA folded into the weights
    save_adapter("out/model", adapter, tokenizer)              # PEFT layout: transformers + peft and vLLM load it
    adapter = read_adapter("out/model")                        # None when the directory holds no adapter
    with adapter_applied(model, adapter): ...                  # base + adapter for a while; the base is exact after

`LoRALinear` keeps the wrapped layer's parameter names (`weight`, `bias`) and adds `lora_A` (r, in) and `lora_B`
(out, r), so `layers.0.self_attn.q_proj.weight` is still the base weight and merging is a pure function over a
state dict (it works equally on a gathered FSDP state dict). B starts at zero, so the injected model computes
exactly what the base model did; A starts like nn.Linear's default (Kaiming-uniform), as in the paper's code.

An adapter directory is what PEFT's `save_pretrained` writes: adapter_config.json (peft_type "LORA", r, lora_alpha,
lora_dropout, target_modules, bias "none", task_type "CAUSAL_LM", base_model_name_or_path = the base checkpoint's
directory: the pointer every loader follows) and adapter_model.safetensors with PEFT's tensor names
`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` (r, in) / `...lora_B.weight` (out, r). The tensors
are the trained fp32 values (not rounded to bf16), so merging them on load gives the same weights as merging them
in memory right after training. Features PEFT has and w2s does not (DoRA, rsLoRA, per-layer ranks, bias training,
modules_to_save) are refused with one line when reading a foreign adapter.

    python -m pytest -q tests/test_adapters.py && python -m pytest -q tests/test_train.py -k lora
"""

import contextlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from w2s.files import read_json, unique_temp_path, with_usual_permissions, write_atomic

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model.model."  # PeftModel -> LlamaForCausalLM -> LlamaModel: "layers.N...." follows


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


def lora_layers(model):
    """{module name: LoRALinear} of a model with LoRA injected (empty without)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merged_weight(weight, a, b, scale):
    """W + scale * B @ A computed in >= fp32 (fp64 weights stay fp64) on W's device, cast back to W's dtype."""
    work = torch.promote_types(weight.dtype, torch.float32)
    a, b = a.to(weight.device, work), b.to(weight.device, work)
    return (weight.to(work) + scale * (b @ a)).to(weight.dtype)


@torch.no_grad()
def merge_lora_state_dict(state, scale):
    """{name: tensor} with every `X.lora_A` / `X.lora_B` folded into `X.weight` (in >= fp32, cast back) and removed."""
    out = {}
    for name, t in state.items():
        if name.endswith((".lora_A", ".lora_B")):
            continue
        prefix = name[: -len(".weight")] if name.endswith(".weight") else None
        if prefix is not None and prefix + ".lora_A" in state:
            t = merged_weight(t, state[prefix + ".lora_A"], state[prefix + ".lora_B"], scale)
        out[name] = t
    return out


@torch.no_grad()
def unwrap_lora(model, merge=True):
    """Replace every LoRALinear by a plain nn.Linear (its weight merged with the adapter, or the untouched base);
    every parameter becomes trainable again. In place; returns the model."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                with torch.device("meta"):
                    plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                w = merged_weight(child.weight, child.lora_A, child.lora_B, child.scale) if merge else child.weight
                plain.weight = nn.Parameter(w)
                plain.bias = child.bias
                setattr(module, name, plain)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def prepare_lora(model, rank, alpha, dropout, targets, seed, where="train"):
    """Get a model ready for training. rank None (full fine-tuning): LoRA layers the model arrived with (loaded from
    an adapter directory) are merged in. Otherwise fresh LoRA layers are injected, or the arrived ones continue
    training when they have this run's rank, alpha and targets: the result is then still one adapter on the same
    base (w2s/checkpoint.py load_for_training)."""
    attached = lora_layers(model)
    if rank is None:
        if attached:
            unwrap_lora(model, merge=True)
        return model
    if not attached:
        inject_lora(model, rank, alpha, dropout, targets, seed=seed)
        return model
    have_rank, have_scale = next(iter(attached.values())).lora_A.shape[0], lora_scale(model)
    have_targets = {name.rsplit(".", 1)[-1] for name in attached}
    if have_rank != rank or not math.isclose(have_scale, alpha / rank) or have_targets != set(targets):
        raise ValueError(f"{where}: the model's adapter (rank {have_rank}, alpha {have_scale * have_rank:g}, targets "
                         f"{sorted(have_targets)}) cannot continue as lora_rank {rank}, lora_alpha {alpha:g}, "
                         f"lora_targets {sorted(targets)}; use its values (or full fine-tuning, which merges it)")
    for layer in attached.values():
        layer.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    return model


# ---------------------------------------------------------------------------------------------- adapters on disk


@dataclass
class Adapter:
    """A LoRA adapter: its shape, the base checkpoint it applies to, and {module name: (A (r, in), B (out, r))}."""

    rank: int
    alpha: float
    base: str | None  # directory of the base checkpoint (PEFT's base_model_name_or_path)
    tensors: dict = field(default_factory=dict)  # "layers.0.self_attn.q_proj" -> (A, B), fp32
    dropout: float = 0.0
    targets: tuple = ()

    @property
    def scale(self):
        return self.alpha / self.rank


def adapter_from_state(state, rank, alpha, base, dropout=0.0):
    """An Adapter from a (gathered) state dict holding `X.lora_A` / `X.lora_B` entries."""
    tensors = {name[: -len(".lora_A")]: (t, state[name[: -len(".lora_A")] + ".lora_B"])
               for name, t in state.items() if name.endswith(".lora_A")}
    targets = tuple(t for t in TARGETS if any(n.endswith("." + t) for n in tensors))
    return Adapter(rank=rank, alpha=alpha, base=base, tensors=tensors, dropout=dropout, targets=targets)


def save_adapter(path, adapter: Adapter, tokenizer=None):
    """Write `adapter` in PEFT's layout to `path` (weights first, adapter_config.json last, each atomically: a
    directory with an adapter_config.json is complete). A full model left there by an earlier export is removed, so
    no loader sees both."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # An earlier adapter_config.json goes first: beside the new weights it would describe another adapter.
    for stale in [path / ADAPTER_CONFIG, *path.glob("model*.safetensors"), path / "model.safetensors.index.json",
                  path / "config.json", path / "generation_config.json"]:
        stale.unlink(missing_ok=True)
    tensors = {}
    for name, (a, b) in sorted(adapter.tensors.items()):
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.detach().to("cpu", torch.float32).contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.detach().to("cpu", torch.float32).contiguous()
    tmp = unique_temp_path(path / ADAPTER_WEIGHTS)
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        with_usual_permissions(tmp)
        os.replace(tmp, path / ADAPTER_WEIGHTS)
    finally:
        tmp.unlink(missing_ok=True)
    if tokenizer is not None:
        tokenizer.save(path)
    alpha = int(adapter.alpha) if float(adapter.alpha).is_integer() else adapter.alpha
    config = {  # PEFT's LoraConfig fields (the ones every PEFT release since 0.9 knows), in its defaults
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": adapter.base, "revision": None,
        "r": adapter.rank, "lora_alpha": alpha, "lora_dropout": adapter.dropout,
        "target_modules": list(adapter.targets), "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
        "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {}, "use_rslora": False, "use_dora": False, "inference_mode": True, "auto_mapping": None,
    }
    write_atomic(path / ADAPTER_CONFIG, json.dumps(config, indent=2))
    return path


def read_adapter_config(path):
    """adapter_config.json of `path` checked for what w2s can apply, or None when there is none."""
    cfg_file = Path(path) / ADAPTER_CONFIG
    if not cfg_file.is_file():
        return None
    cfg = read_json(cfg_file)
    rank = cfg.get("r")
    if cfg.get("peft_type") != "LORA" or not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"{cfg_file}: expected a PEFT LoRA adapter (peft_type 'LORA' and an integer r >= 1), got "
                         f"peft_type {cfg.get('peft_type')!r}, r {rank!r}")
    for key in ("lora_alpha", "lora_dropout"):
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{cfg_file}: {key} = {value!r}: expected a number")
    unsupported = {"use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "bias": "none",
                   "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None}
    for key, plain in unsupported.items():
        if cfg.get(key, plain) not in (plain, None, {}, []):
            raise ValueError(f"{cfg_file}: {key} = {cfg[key]!r} is not supported (expected {plain!r}: plain LoRA on "
                             f"whole linear layers)")
    return cfg


def read_adapter(path, tensors=True):
    """The Adapter saved in `path` (tensors in fp32 on CPU; tensors=False reads the config only), or None."""
    cfg = read_adapter_config(path)
    if cfg is None:
        return None
    path = Path(path)
    targets = cfg.get("target_modules")  # PEFT also allows a pattern string: the tensors' names say which layers
    adapter = Adapter(rank=cfg["r"], alpha=float(cfg.get("lora_alpha", 8)), base=cfg.get("base_model_name_or_path"),
                      dropout=float(cfg.get("lora_dropout") or 0.0),
                      targets=tuple(targets) if isinstance(targets, list) else ())
    if tensors:
        adapter.tensors = _read_adapter_tensors(path, adapter.rank)
        found = {name.rsplit(".", 1)[-1] for name in adapter.tensors}
        adapter.targets = tuple(t for t in TARGETS if t in found)
    return adapter


def _read_adapter_tensors(path, rank):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing (an adapter directory needs {ADAPTER_WEIGHTS}; .bin adapters "
                                f"are not read)")
    try:
        raw = load_file(str(weights))
    except SafetensorError as e:
        raise ValueError(f"{weights}: not a readable safetensors file ({e})") from None
    pairs = {}
    for key, t in raw.items():
        name = key.removeprefix(PEFT_PREFIX).replace(".default.", ".")
        for part, index in ((".lora_A.weight", 0), (".lora_B.weight", 1)):
            if name.endswith(part) and key.startswith(PEFT_PREFIX) and name.rsplit(".", 3)[-3] in TARGETS:
                pairs.setdefault(name[: -len(part)], [None, None])[index] = t.float()
                break
        else:
            raise ValueError(f"{weights}: unexpected tensor {key!r} (expected {PEFT_PREFIX}layers.N.<proj>.lora_A"
                             f".weight / lora_B.weight with <proj> one of {', '.join(TARGETS)})")
    for name, (a, b) in pairs.items():
        if a is None or b is None or a.shape[0] != rank or b.shape[1] != rank:
            raise ValueError(f"{weights}: {name} needs lora_A (r, in) and lora_B (out, r) with r = {rank}, got "
                             f"{None if a is None else list(a.shape)} and {None if b is None else list(b.shape)}")
    return {name: (a, b) for name, (a, b) in pairs.items()}


def adapter_base_dir(path, adapter: Adapter):
    """The base checkpoint directory an adapter points at (relative pointers are relative to the adapter)."""
    if not adapter.base:
        raise ValueError(f"{Path(path) / ADAPTER_CONFIG}: base_model_name_or_path is empty; set it to the directory "
                         f"of the base checkpoint the adapter was trained on")
    base = Path(path) / adapter.base  # an absolute pointer replaces the adapter's path
    if not base.is_dir():
        raise FileNotFoundError(f"{Path(path) / ADAPTER_CONFIG}: base_model_name_or_path {adapter.base!r} is not a "
                                f"directory here; point it at the base checkpoint (a local HF directory)")
    # Every reader follows the pointers down to a checkpoint: one that comes back (to the adapter itself, or
    # A -> B -> A) would never end.
    chain = [Path(path).resolve(), base.resolve()]
    while chain[-1] not in chain[:-1]:
        next_adapter = read_adapter_config(chain[-1])
        if next_adapter is None or not next_adapter.get("base_model_name_or_path"):
            return base
        chain.append((chain[-1] / next_adapter["base_model_name_or_path"]).resolve())
    raise ValueError(f"{Path(path) / ADAPTER_CONFIG}: base_model_name_or_path {adapter.base!r} leads back to "
                     f"{chain[-1]} ({' -> '.join(map(str, chain))}); point it at the base checkpoint")


def check_fits(name, linear, a, b):
    out_features, in_features = linear.weight.shape  # the weight's own shape: a tensor-parallel slice's too
    if a.shape[1] != in_features or b.shape[0] != out_features:
        raise ValueError(f"adapter tensor {name}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit the "
                         f"model's layer ({out_features} x {in_features}): another base model?")


@torch.no_grad()
def _merge_layer(model, name, a, b, scale):
    """Swap one adapted layer's weight for its merged copy. -> (the layer, its original weight)."""
    linear = model.get_submodule(name)
    check_fits(name, linear, a, b)
    original = linear.weight
    linear.weight = nn.Parameter(merged_weight(original, a, b, scale), requires_grad=False)
    return linear, original


def merge_adapter(model, adapter: Adapter):
    """Fold the adapter into the model's weights for good (in place; each merged matrix replaces its original, which
    is freed before the next is merged)."""
    for name, (a, b) in adapter.tensors.items():
        _merge_layer(model, name, a, b, adapter.scale)
    return model


@contextlib.contextmanager
def adapter_applied(model, adapter: Adapter | None):
    """Inside the block the model computes base + adapter: each adapted layer's weight is swapped for a merged copy
    (so sampling runs at the speed of a plain model); on exit the original tensors are put back, so a resident base
    is bit-exact afterwards and never reread from disk. Extra memory: one copy of the adapted matrices."""
    originals = []
    try:
        for name, (a, b) in adapter.tensors.items() if adapter is not None else ():
            originals.append(_merge_layer(model, name, a, b, adapter.scale))
        yield model
    finally:
        for linear, weight in originals:
            linear.weight = weight


@torch.no_grad()
def attach_adapter(model, adapter: Adapter, load_tensors=True):
    """Inject LoRA layers shaped like `adapter` and load its A / B (training continues it). load_tensors=False on a
    meta-device model (FSDP ranks > 0: they receive rank 0's values when the trainer shards the model)."""
    inject_lora(model, adapter.rank, adapter.alpha, adapter.dropout, adapter.targets)
    if not load_tensors:
        return model
    layers = lora_layers(model)
    missing = sorted(set(layers) - set(adapter.tensors))
    if missing:
        raise ValueError(f"adapter lacks {len(missing)} of the layers its target_modules name, e.g. {missing[0]}")
    for name, layer in layers.items():
        a, b = adapter.tensors[name]
        check_fits(name, layer, a, b)
        layer.lora_A.copy_(a)
        layer.lora_B.copy_(b)
    return model
