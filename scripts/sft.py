"""Supervised fine-tuning of a Hugging Face checkpoint on prompt/response jsonl (the loop is w2s/train.py).

    python scripts/sft.py --model CKPT --data sft.jsonl --out runs/sft --lr 1e-5 --epochs 2
    torchrun --nproc_per_node=8 scripts/sft.py --model CKPT --data sft.jsonl --out runs/sft --lora-rank 8

Each jsonl line is {"prompt": str, "response": str} (or {"prompt_ids": [...], "response_ids": [...]}); the loss
covers the response tokens only. OUT receives the trained model in HF format (LoRA merged), the tokenizer,
metrics.jsonl and, with --ckpt-every, resumable checkpoints: rerunning the same command continues a killed run.
`--help` lists every option (the command line lives in w2s/train_cli.py).
Test: python -m pytest -q tests/test_train.py -k script
"""

from w2s.train_cli import sft_main

if __name__ == "__main__":
    sft_main()
