"""DPO's and IPO's reference: the summed response log-probs of every pair under the weights training starts from.

One no-grad pass over the pairs before the first step (the trainer's Task.prepare) fills a table (n_pairs, 2)
[chosen, rejected], cached in out_dir/ref_logps.pt under a key of the tokenized pairs and the weights
(model_fingerprint), so the reference model is never resident during training and a rerun or resume reuses it. An
iterated Stage II round starts from the previous round's model, so its reference is that model.

    python -m pytest -q tests/test_train.py -k reference
"""

import hashlib
import io
from pathlib import Path

import torch

from w2s import data
from w2s.files import write_atomic
from w2s.loss_steps import batch_on_device
from w2s.parallel import Dist, all_reduce_sum, barrier


@torch.no_grad()
def model_fingerprint(model):
    """sha256 of every parameter's name, shape, sum and sum of squares (one cheap pass over the weights)."""
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        t = p.detach().double()
        h.update(f"{name}{tuple(p.shape)}{p.dtype}{t.sum().item():.10e}{t.square().sum().item():.10e}".encode())
    return h.hexdigest()


@torch.no_grad()
def compute_reference_logps(module, pairs, pad_id, micro_batch_size, d: Dist):
    """Summed response log-probs (n, 2) [chosen, rejected] of every pair under the current (initial) weights.

    Pairs are sorted by length and cut into micro-batches dealt round-robin to the ranks; every rank runs the same
    number of forwards (FSDP gathers are collective), then one all-reduce assembles the table.
    """
    was_training = module.training
    module.eval()  # no LoRA dropout in the reference
    order = sorted(range(len(pairs)), key=lambda i: -max(len(pairs[i].chosen.tokens), len(pairs[i].rejected.tokens)))
    chunks = [order[i:i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    table = torch.zeros(len(pairs), 2, dtype=torch.float32, device=d.device)
    for start in range(0, len(chunks), d.world_size):
        mine = chunks[start + d.rank] if start + d.rank < len(chunks) else []
        tokens, targets = data.collate_pairs([pairs[i] for i in mine], pad_id)
        batch = batch_on_device({"tokens": tokens, "targets": targets}, d.device)
        logps = module(batch["tokens"], batch["targets"], per_token=True, target_rows=batch["target_rows"])  # (2P * T,)
        logps = logps.view_as(targets).sum(-1).float()  # (2P,)
        if mine:
            P = len(mine)
            idx = torch.tensor(mine, device=d.device)
            table[idx, 0], table[idx, 1] = logps[:P], logps[P:]
    module.train(was_training)
    return all_reduce_sum(table, d).cpu()


def reference_logps(module, pairs, pad_id, cfg, d: Dist, out_dir, key):
    """The reference table, from out_dir/ref_logps.pt when its key matches, else computed once and cached there."""
    cache = Path(out_dir) / "ref_logps.pt" if out_dir is not None else None
    if cache is not None and cache.is_file():
        saved = torch.load(cache, weights_only=True)
        if saved.get("key") == key and saved["logps"].shape == (len(pairs), 2):
            return saved["logps"]
    table = compute_reference_logps(module, pairs, pad_id, cfg.micro_batch_size, d)
    if cache is not None and d.is_main:
        buffer = io.BytesIO()  # (n, 2) floats: small enough to write in one piece
        torch.save({"key": key, "logps": table}, buffer)
        write_atomic(cache, buffer.getvalue())
    barrier(d)
    return table
