"""Tensor parallelism for sampling, applied from OUTSIDE the model (Megatron-style), for models that do not fit one GPU.

Every rank of a tensor-parallel group holds a slice of each block and all ranks run the same tokens in lockstep:

    attention  q/k/v_proj   column-split by heads: rank r keeps heads [r*H/tp, (r+1)*H/tp) and the kv heads they use
               o_proj       row-split (its input columns are those heads); partial outputs are summed (all-reduce)
    MLP        gate/up_proj column-split: rank r keeps hidden units [r*F/tp, (r+1)*F/tp)
               down_proj    row-split; all-reduce
    embeddings, norms and lm_head stay REPLICATED (simple, and small next to the blocks: ~1 GB of Llama-2-70B's 138 GB
               in bf16), so every rank computes the same full logits and samples the same token with no extra
               communication.

Nothing in w2s/model.py changes: the projections' weights are replaced by their slices, each attention layer gets
its own config copy with n_heads/tp and n_kv_heads/tp heads (what the KV cache and the head reshapes read), and a
forward hook on o_proj / down_proj all-reduces their outputs. A row-split bias is kept on tp-rank 0 only (zeros
elsewhere) so the all-reduce adds it once. When there are fewer kv heads than ranks (Gemma-2B has 1), each kv head
is replicated on the tp/K ranks whose query heads use it.

    init_distributed()   # under torchrun (w2s.parallel): join the process group first
    model = load_model_tp("ckpt_dir", tp=8, dtype=torch.bfloat16, device="cuda")   # reads only this rank's slices
    outs = w2s.generate(model, tok, prompts)   # world = dp * tp; tp groups are consecutive ranks

    torchrun --nproc_per_node=8 scripts/sample.py CKPT --input q.jsonl --output out.jsonl --tp 8
A LoRA adapter directory loads as its base, sliced as above, with each rank merging its slice of the adapter
(`adapter_for_rank`: B's rows for column-split projections, A's columns for row-split ones).

    python -m pytest -q tests/test_sampling_dist.py     # tp=2 and dp=2 over gloo on CPU == one process
"""

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from w2s.checkpoint import check_tokenizer_fits, checkpoint_config, checkpoint_files, hf_name, validate_checkpoint
from w2s.config import ModelConfig
from w2s.lora import adapter_base_dir, merge_adapter, read_adapter
from w2s.model import Transformer
from w2s.parallel import check_joined

COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # output features split (dim 0 of weight and bias)
ROW = ("o_proj", "down_proj")  # input features split (dim 1 of weight); outputs all-reduced


def check_divisible(cfg: ModelConfig, tp):
    """Raise one clear error when the model's heads / MLP width cannot be split over tp ranks."""
    H, K, F = cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim
    if H % tp or F % tp or (K % tp and tp % K):
        raise ValueError(f"tensor parallel size {tp} must divide num_attention_heads={H} and intermediate_size={F}, "
                         f"and divide or be a multiple of num_key_value_heads={K}")


def kv_heads_of_rank(cfg: ModelConfig, rank, tp):
    """(first kv head, number of kv heads) rank `rank` needs: its own share, or the one shared kv head its q heads
    use when there are fewer kv heads than ranks (then tp/K consecutive ranks replicate it)."""
    K = cfg.n_kv_heads
    if K >= tp:
        return rank * (K // tp), K // tp
    return rank // (tp // K), 1


def shard_slice(name, cfg: ModelConfig, rank, tp):
    """(dim, start, length) of this rank's slice of parameter `name` (our naming), or None if it is replicated."""
    parts = name.split(".")
    if len(parts) < 2 or parts[-2] not in COLUMN + ROW:
        return None
    proj, kind = parts[-2], parts[-1]  # e.g. ("q_proj", "weight")
    hd = cfg.head_dim
    if proj in ROW:
        if kind == "bias":
            return None  # full bias, zeroed on ranks != 0 by the callers (_is_row_bias)
        width = cfg.n_heads * hd if proj == "o_proj" else cfg.hidden_dim
        return 1, rank * width // tp, width // tp
    if proj == "q_proj":
        return 0, rank * cfg.n_heads // tp * hd, cfg.n_heads // tp * hd
    if proj in ("k_proj", "v_proj"):
        first, count = kv_heads_of_rank(cfg, rank, tp)
        return 0, first * hd, count * hd
    return 0, rank * cfg.hidden_dim // tp, cfg.hidden_dim // tp  # gate_proj / up_proj


def _is_row_bias(name):
    parts = name.split(".")
    return len(parts) >= 2 and parts[-2] in ROW and parts[-1] == "bias"


def _all_reduce_hook(group):
    def hook(module, inputs, output):  # output (B, T, D): this rank's partial sum
        dist.all_reduce(output, group=group)
        return output

    return hook


def tp_group_for(tp):
    """This rank's tensor-parallel group: consecutive ranks [d*tp, (d+1)*tp) (the layout sampling.dp_layout assumes).

    Every rank must call this (new_group is collective); returns (group, rank within the group)."""
    check_joined(f"tensor parallel size {tp}")
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"tensor parallel size {tp} needs torch.distributed (launch with torchrun)")
    world, rank = dist.get_world_size(), dist.get_rank()
    if tp < 1 or world % tp:
        raise ValueError(f"tensor parallel size {tp} must divide the world size {world}")
    mine = None
    for start in range(0, world, tp):
        group = dist.new_group(list(range(start, start + tp)))
        if start <= rank < start + tp:
            mine = group
    return mine, rank % tp


def apply_tensor_parallel(model: Transformer, group, rank, tp):
    """Split `model` in place for tensor-parallel rank `rank` of `tp` (real or meta weights); returns it.

    Real weights are sliced and copied (a full model per rank must fit first: for tests and small models). For big
    checkpoints use load_model_tp, which does this on the meta device and reads only this rank's slices from disk.
    """
    cfg = model.cfg
    check_divisible(cfg, tp)
    if tp == 1:
        model.tp_size = 1
        return model
    with torch.no_grad():
        for name, param in list(model.named_parameters()):
            spec = shard_slice(name, cfg, rank, tp)
            module = model.get_submodule(name.rsplit(".", 1)[0])
            attr = name.rsplit(".", 1)[1]
            if spec is not None:
                dim, start, length = spec
                new = param.narrow(dim, start, length).clone()  # own storage, so the full tensor can be freed
                setattr(module, attr, nn.Parameter(new, requires_grad=False))
            elif _is_row_bias(name) and rank != 0:
                param.zero_()  # the all-reduce sums the ranks' outputs: add the bias on one rank only
    _, kv_count = kv_heads_of_rank(cfg, rank, tp)
    local_cfg = cfg.replace(n_heads=cfg.n_heads // tp, n_kv_heads=kv_count, hidden_dim=cfg.hidden_dim // tp)
    for layer in model.layers:
        layer.self_attn.cfg = local_cfg  # head reshapes and KV cache (sampling_engine.kv_config) read the local counts
        layer.self_attn.o_proj.register_forward_hook(_all_reduce_hook(group))
        layer.mlp.down_proj.register_forward_hook(_all_reduce_hook(group))
    model.tp_size, model.tp_rank = tp, rank
    return model


def adapter_for_rank(adapter, model):
    """The part of `adapter` that this rank's tensor-parallel slice of `model` needs (the adapter itself at tp 1).
    The update is B @ A, so a column-split projection (rows of W) needs B's rows and all of A, a row-split one (W's
    columns) all of B and A's columns."""
    tp = getattr(model, "tp_size", 1)
    if adapter is None or tp == 1:
        return adapter
    tensors = {}
    for name, (a, b) in adapter.tensors.items():
        spec = shard_slice(name + ".weight", model.cfg, model.tp_rank, tp)
        if spec is not None and spec[0] == 0:
            b = b.narrow(0, spec[1], spec[2])
        elif spec is not None:
            a = a.narrow(1, spec[1], spec[2])
        tensors[name] = (a, b)
    return dataclasses.replace(adapter, tensors=tensors)


def load_model_tp(path, tp, dtype=torch.bfloat16, device="cpu"):
    """Load an HF checkpoint directly sharded for tensor parallelism under torchrun: build on the meta device, split,
    then read only this rank's slice of each tensor from the safetensors files (memory: 1/tp of the blocks plus the
    replicated embeddings and head; never the full model)."""
    from safetensors import safe_open

    if tp == 1:  # nothing to split (and no process group needed)
        from w2s.checkpoint import load_model

        model = load_model(path, dtype=dtype, device=device)
        model.tp_size = 1
        return model
    if (adapter := read_adapter(path)) is not None:
        model = load_model_tp(adapter_base_dir(path, adapter), tp, dtype=dtype, device=device)
        merge_adapter(model, adapter_for_rank(adapter, model))
        model.name_or_path = str(Path(path).resolve())
        return model
    validate_checkpoint(path, tokenizer=False)  # from the headers: missing or misshapen tensors, truncated shards
    cfg = checkpoint_config(path)
    check_divisible(cfg, tp)
    group, rank = tp_group_for(tp)
    with torch.device("meta"):
        model = Transformer(cfg)
    apply_tensor_parallel(model, group, rank, tp)
    files = checkpoint_files(path)
    handles = {}
    state = {}
    try:
        for name in model.state_dict():
            key = hf_name(name)
            file = files[key]
            if file not in handles:
                handles[file] = safe_open(str(file), framework="pt", device="cpu")
            lazy = handles[file].get_slice(key)  # the full tensor's shape was checked against config.json above
            spec = shard_slice(name, cfg, rank, tp)
            if spec is None:
                t = lazy[:]
            elif spec[0] == 0:
                t = lazy[spec[1] : spec[1] + spec[2]]
            else:
                t = lazy[:, spec[1] : spec[1] + spec[2]]
            if _is_row_bias(name) and rank != 0:
                t = torch.zeros_like(t)
            t = t.to(dtype) if dtype is not None and t.is_floating_point() else t
            state[name] = t.to(device)
    finally:
        handles.clear()
    model.load_state_dict(state, assign=True)
    for p in model.parameters():
        p.requires_grad_(False)
    model.reset_buffers(torch.device(device))
    check_tokenizer_fits(path, cfg)
    model.name_or_path = str(Path(path).resolve())
    return model.eval()
