"""Preference training (DPO, IPO or ORPO) of a Hugging Face checkpoint on prompt/chosen/rejected jsonl.

    python scripts/dpo.py --model CKPT --data pairs.jsonl --out runs/dpo --loss dpo --beta 0.1 --lr 5e-7
    torchrun --nproc_per_node=8 scripts/dpo.py --model CKPT --data pairs.jsonl --out runs/dpo --loss orpo

Each jsonl line is {"prompt": str, "chosen": str, "rejected": str} (or prompt_ids / chosen_ids / rejected_ids).
DPO and IPO score the pairs once under the initial weights (the reference model) and cache that table in
OUT/ref_logps.pt, so a rerun or resume does not recompute it; ORPO needs no reference. OUT receives the trained
model in HF format (LoRA merged), metrics.jsonl and, with --ckpt-every, resumable checkpoints.
`--help` lists every option (the command line lives in w2s/train_cli.py).
Test: python -m pytest -q tests/test_train.py -k script
"""

from w2s.train_cli import preference_main

if __name__ == "__main__":
    preference_main()
