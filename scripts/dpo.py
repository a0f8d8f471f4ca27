"""Preference training (DPO, IPO or ORPO) of a Hugging Face checkpoint on a jsonl file of pairs.

    python scripts/dpo.py --model CKPT --data pairs.jsonl --out runs/dpo --loss dpo --beta 0.1 --lr 5e-7
    torchrun --nproc_per_node=8 scripts/dpo.py --model CKPT --data pairs.jsonl --out runs/dpo --loss orpo
    python scripts/dpo.py --help        # the data formats, every option with its default, the bad-row rule

Each jsonl line is {"prompt": str, "chosen": str, "rejected": str}, TRL's conversational pair (prompt, chosen and
rejected as lists of messages, rendered with the model's chat template), or token ids (prompt_ids / chosen_ids /
rejected_ids). DPO and IPO score the pairs once under the initial weights (the reference model) and cache that table
in OUT/ref_logps.pt, so a rerun or resume does not recompute it; ORPO needs no reference. OUT receives the trained
model in HF format (with --lora-rank: the adapter in PEFT's layout, and the merged model in OUT/merged only with
--export-merged), train_config.json, metrics.jsonl (with the rewards and margins), OUT/tb with
--report-to tensorboard and, with --ckpt-every, resumable checkpoints. The command line lives in w2s/train_cli.py.
Test: python -m pytest -q tests/test_train.py tests/test_tracking.py -k script
"""

from w2s.train_cli import preference_main

if __name__ == "__main__":
    preference_main()
