"""The end of a training run: gather the (FSDP-sharded) weights and write them out, in HF format or as an adapter.

    trained = export_trained(module, model_cfg, dtype, device, d, out_dir, tokenizer, return_model=True)

Full fine-tuning: every tensor is gathered, a plain Transformer is rebuilt in the input dtype and saved with
save_model (config.json, shards, tokenizer) to out_dir.

LoRA: only the adapters are gathered (the frozen base is already on disk) and saved to out_dir in PEFT's layout
(w2s/lora.py), pointing at the checkpoint the model was loaded from, with the tokenizer files beside them. A merged
HF copy is written to out_dir/merged only with export_merged=True (it is as large as the base model). The base is
gathered only when that copy or a returned model needs it.

    python -m pytest -q tests/test_train.py tests/test_adapters.py
"""

import torch

from w2s.lora import adapter_from_state, lora_scale, merge_lora_state_dict, merged_weight, save_adapter
from w2s.parallel import Dist, barrier, full_tensor

MERGED_DIR = "merged"  # out_dir/merged: the merged HF export of a LoRA run, on request


def _is_lora(name):
    return name.endswith((".lora_A", ".lora_B"))


@torch.no_grad()
def export_trained(module, model_cfg, dtype, device, d: Dist, out_dir, tokenizer, return_model=True,
                   export_merged=False, lora_base=None, lora_dropout=0.0):
    """Export the trained weights to out_dir (rank 0 writes) and return them as a plain Transformer in `dtype`.

    return_model: True -> the trained model (LoRA merged into it); False -> None (then only rank 0 keeps gathered
    tensors, to save them); "base" (LoRA only) -> the untouched base weights, for a caller that keeps the base in
    memory and applies the saved adapter itself. Every rank must call this (the gathers are collectives).
    """
    if lora_scale(module.model) is None:
        return _export_full(module, model_cfg, dtype, device, d, out_dir, tokenizer, return_model)
    return _export_lora(module, model_cfg, dtype, device, d, out_dir, tokenizer, return_model, export_merged,
                        lora_base, lora_dropout)


def _export_full(module, model_cfg, dtype, device, d: Dist, out_dir, tokenizer, return_model):
    """Gather the full weights, rebuild a plain Transformer in the input dtype, export HF to out_dir."""
    from w2s.checkpoint import save_model

    keep = return_model or (out_dir is not None and d.is_main)
    state = {}
    for name, t in module.model.state_dict().items():
        full = _gather(t, d)  # a collective: every rank gathers every tensor, in the same order
        if keep:  # straight to the output device: a 70B model gathered on one GPU would not fit
            state[name] = full.to(device, dtype)
    if not keep:
        barrier(d)
        return None
    trained = _build(model_cfg, state, device)
    if out_dir is not None and d.is_main:
        save_model(trained, out_dir, tokenizer=tokenizer)
    barrier(d)
    return trained if return_model else None


def _export_lora(module, model_cfg, dtype, device, d: Dist, out_dir, tokenizer, return_model, export_merged,
                 lora_base, lora_dropout):
    """Save the adapter (and on request the merged model); gather the base only when something needs it."""
    from w2s.checkpoint import naming_path, save_model

    scale = lora_scale(module.model)
    merged_out = out_dir is not None and export_merged
    need_base = bool(return_model) or merged_out  # the same on every rank: the gathers below are collectives
    keep_base = bool(return_model) or (merged_out and d.is_main)
    keep_lora = bool(return_model) or (out_dir is not None and d.is_main)
    state = {}
    for name, t in module.model.state_dict().items():
        lora = _is_lora(name)
        if not (lora or need_base):
            continue
        full = _gather(t, d)
        if lora and keep_lora:
            state[name] = full.to(device)  # fp32, as trained
        elif not lora and keep_base:
            state[name] = full.to(device, dtype)
    if out_dir is not None and d.is_main:
        rank = next(t.shape[0] for n, t in state.items() if n.endswith(".lora_A"))
        with naming_path(out_dir):  # a full disk names the directory
            save_adapter(out_dir, adapter_from_state(state, rank, scale * rank, lora_base, lora_dropout), tokenizer)
    merged = None
    if return_model is True or (merged_out and d.is_main):
        # in place unless the base is returned too: one merged matrix at a time, so host memory stays one model
        weights = merge_lora_state_dict(state, scale) if return_model == "base" else _merge_in_place(state, scale)
        merged = _build(model_cfg, weights, device)
        if merged_out and d.is_main:
            save_model(merged, out_dir / MERGED_DIR, tokenizer=tokenizer)
    barrier(d)
    if return_model == "base":
        return _build(model_cfg, {n: t for n, t in state.items() if not _is_lora(n)}, device)
    return merged if return_model else None


def _merge_in_place(state, scale):
    """merge_lora_state_dict without a second copy: each weight is replaced by its merged self, A and B dropped."""
    for name in [n for n in state if n.endswith(".lora_A")]:
        prefix = name[: -len(".lora_A")]
        state[prefix + ".weight"] = merged_weight(state[prefix + ".weight"], state.pop(name),
                                                  state.pop(prefix + ".lora_B"), scale)
    return state


def _build(model_cfg, state, device):
    from w2s.model import Transformer

    with torch.device("meta"):
        trained = Transformer(model_cfg)
    trained.load_state_dict(state, assign=True)
    trained.reset_buffers(torch.device(device))
    return trained.eval()


def _gather(t, d: Dist):
    """Full tensor of a parameter; an offloaded (CPU) shard is moved to the device first for the collective."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor) and t.device.type != d.device.type:
        local = t.to_local().to(d.device)
        t = DTensor.from_local(local, t.device_mesh, t.placements, shape=t.shape, stride=t.stride())
    return full_tensor(t).detach()
