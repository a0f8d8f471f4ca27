"""Preference training (DPO, IPO or ORPO) of a Hugging Face checkpoint on prompt/chosen/rejected jsonl.

    python scripts/dpo.py --model CKPT --data pairs.jsonl --out runs/dpo --loss dpo --beta 0.1 --lr 5e-7
    torchrun --nproc_per_node=8 scripts/dpo.py --model CKPT --data pairs.jsonl --out runs/dpo --loss orpo

Each jsonl line is {"prompt": str, "chosen": str, "rejected": str} (or prompt_ids / chosen_ids / rejected_ids).
DPO and IPO score the pairs once under the initial weights (the reference model) and cache that table in
OUT/ref_logps.pt, so a rerun or resume does not recompute it; ORPO needs no reference. OUT receives the trained
model in HF format (LoRA merged), metrics.jsonl and, with --ckpt-every, resumable checkpoints.
Test: python -m pytest -q tests/test_train.py -k script
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sft import parser, run  # noqa: E402  (the shared options, loading and one-line errors)

BAD_ROWS_RULE = """bad rows: a pair without a prompt, chosen or rejected response, a pair whose chosen equals its
rejected response, or one longer than --max-seq-len is reported on stderr as FILE:LINE and the reason, counted, and
skipped (--bad-rows skip, the default) or stops the run (--bad-rows error). A line that is not a JSON object always
stops the run with FILE:LINE."""


def main():
    from w2s.train import train_preference

    p = parser("Preference training: DPO (Rafailov et al.), IPO (Azar et al.) or ORPO (Hong et al.).", BAD_ROWS_RULE)
    p.add_argument("--loss", choices=("dpo", "ipo", "orpo"), default="dpo", help="preference loss (default: dpo)")
    args = p.parse_args()
    run(train_preference, args, loss=args.loss)


if __name__ == "__main__":
    main()
