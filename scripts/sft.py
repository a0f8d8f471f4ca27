"""Supervised fine-tuning of a Hugging Face checkpoint on a jsonl file (the loop is w2s/train.py).

    python scripts/sft.py --model CKPT --data sft.jsonl --out runs/sft --lr 1e-5 --epochs 2
    torchrun --nproc_per_node=8 scripts/sft.py --model CKPT --data sft.jsonl --out runs/sft --lora-rank 8
    python scripts/sft.py --help        # the data formats, every option with its default, the bad-row rule

Each jsonl line is a chat {"messages": [{"role", "content"}, ...]} (the model's chat template; loss on every
assistant turn), TRL's {"prompt", "completion"} (text or lists of messages), w2s's {"prompt", "response"}, or token
ids {"prompt_ids", "response_ids"} (w2s/data.py has the exact rules). OUT receives the trained model in HF format
(with --lora-rank: the adapter in PEFT's layout, and the merged model in OUT/merged only with --export-merged), the
tokenizer, train_config.json, metrics.jsonl, OUT/tb with --report-to tensorboard and, with
--ckpt-every, resumable checkpoints: rerunning the same command continues a killed run. The command line lives in
w2s/train_cli.py.
Test: python -m pytest -q tests/test_train.py tests/test_tracking.py -k script
"""

from w2s.train_cli import sft_main

if __name__ == "__main__":
    sft_main()
