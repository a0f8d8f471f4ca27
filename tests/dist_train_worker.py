"""torchrun worker for tests/test_fsdp.py: the same training runs under FSDP2 as the test runs in one process.

    OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc_per_node=2 tests/dist_train_worker.py CKPT OUT

Each run of RUNS (SFT and DPO, full and LoRA; ORPO full) trains the tiny checkpoint CKPT and exports to
OUT/<name> (rank 0 writes metrics.jsonl and the HF weights; a LoRA run the adapter, and the merged weights in
OUT/<name>/merged). The data (7 rows, batch 4) ends on a short batch, so
with 2 ranks one micro-batch slot is empty and a rank runs the all-ignored dummy row; clipping is on so the DTensor
clip path runs. "sft_full" is killed after step 3 and resumed from its step-2 checkpoint, so sharded (DCP)
checkpoints are saved and loaded too. In the RANK0_LOAD runs only rank 0 reads the checkpoint (rank 1 starts on the
meta device), so filling the shards from rank 0 is checked against the same one-process run. The LoRA runs
use FSDP2's CPU offload (unpinned on CPU), "sft_lora" through a kill and resume as well, "dpo_lora" with the
shards filled from rank 0; in one process cpu_offload does nothing, so they compare against plain training.
"sft_lora_continue" trains further the adapter "sft_lora" wrote (rank 0 reads it, rank 1 gets it from rank 0).
"sft_full" is also run into OUT/sft_full_moved and left dead after step 3, for the test to resume in one process.
"""

import faulthandler
import os
import sys
from pathlib import Path

import torch

import w2s
from w2s.checkpoint import load_for_training
from w2s.train import TrainConfig, train_preference, train_sft

# A native abort (gloo's "terminate called without an active exception", seen once in a while on a loaded machine)
# then prints where every Python thread of the rank was, into the stderr the test's assertion message shows.
faulthandler.enable(all_threads=True)

STEPS = 4
# lr 1e-3: Adam divides each gradient element by its running RMS, so an element whose gradient is ~0 turns the fp32
# summation-order noise of 2 ranks vs 1 into a step of up to lr; a larger lr lets that noise alone approach the test's
# 1e-5 tolerance on the weights.
COMMON = dict(lr=1e-3, batch_size=4, micro_batch_size=1, max_steps=STEPS, clip=0.5, weight_decay=0.1, seed=1,
              progress=False, ckpt_every=2)
# dropout streams differ per rank: keep it off here. export_merged: besides the adapter, the merged model under FSDP
LORA = dict(lora_rank=4, lora_alpha=8.0, lora_dropout=0.0, export_merged=True)
RUNS = {  # name: (loss, config)
    "sft_full": ("sft", TrainConfig(**COMMON)),
    "sft_lora": ("sft", TrainConfig(**COMMON, **LORA, cpu_offload=True)),
    "dpo_full": ("dpo", TrainConfig(**COMMON, beta=0.5)),
    "dpo_lora": ("dpo", TrainConfig(**COMMON, **LORA, beta=0.5, cpu_offload=True)),
    "orpo_full": ("orpo", TrainConfig(**COMMON, beta=0.5)),
    "sft_lora_continue": ("sft", TrainConfig(**COMMON, **LORA)),
}
# Runs that start from another run's output, an adapter directory: LoRA training continues that adapter (rank 1 gets
# the adapter's values from rank 0 with the base).
CONTINUE = {"sft_lora_continue": "sft_lora"}
KILL_AT = {"sft_full": 3, "sft_lora": 3}  # run dies after this step, then resumes
# Runs whose checkpoint only rank 0 reads (w2s.checkpoint.load_for_training: rank 1 starts on the meta device and gets
# its shards from rank 0); the others load it on every rank. In one process both are the plain load.
RANK0_LOAD = {"sft_full", "dpo_full", "dpo_lora", "sft_lora_continue"}


def rows_for(loss):
    """7 SFT rows or 7 preference pairs of token ids (prompts 2..4, responses 1..5 tokens), the same on every rank."""
    g = torch.Generator().manual_seed(11)
    seqs = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (2, 3, 4, 1, 5, 2, 3) * 3]
    if loss == "sft":
        return [{"prompt_ids": seqs[i], "response_ids": seqs[7 + i]} for i in range(7)]
    return [{"prompt_ids": seqs[i], "chosen_ids": seqs[7 + i], "rejected_ids": seqs[14 + i] + [9]} for i in range(7)]


class Killed(Exception):
    pass


def run(name, ckpt, out_dir, kill=True, resume=True):
    """Train run `name` from the checkpoint into out_dir (dying, if kill and KILL_AT says so, then resuming unless
    not resume). -> model, or None when left dead."""
    loss, cfg = RUNS[name]
    ckpt = Path(out_dir).parent / CONTINUE[name] if name in CONTINUE else ckpt

    def once(on_step=None):
        model = load_for_training(ckpt, torch.float32) if name in RANK0_LOAD else w2s.load_model(ckpt, torch.float32)
        if name in RANK0_LOAD and os.environ.get("RANK", "0") != "0":
            assert model.embed_tokens.weight.is_meta  # this rank really read nothing
        if loss == "sft":
            return train_sft(model, None, rows_for(loss), cfg, out_dir=out_dir, on_step=on_step)
        return train_preference(model, None, rows_for(loss), cfg, out_dir=out_dir, loss=loss, on_step=on_step)

    if kill and name in KILL_AT:
        def die(rec):
            if rec["step"] == KILL_AT[name]:
                raise Killed

        try:
            once(die)
            raise RuntimeError(f"{name}: the run was meant to die at step {KILL_AT[name]}")
        except Killed:
            if not resume:
                return None
    return once()


def main(ckpt, out_root):
    torch.set_num_threads(1)
    for name in RUNS:
        run(name, ckpt, Path(out_root) / name)
    run("sft_full", ckpt, Path(out_root) / "sft_full_moved", resume=False)
    import gc

    import torch.distributed as dist

    if dist.is_initialized():
        # The run above died by an exception: free what it held (FSDP modules, their gloo work) while the process
        # group is still up, and leave together, so no rank tears down under the other.
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
