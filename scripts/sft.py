"""Supervised fine-tuning of a Hugging Face checkpoint on prompt/response jsonl (the loop is w2s/train.py).

    python scripts/sft.py --model CKPT --data sft.jsonl --out runs/sft --lr 1e-5 --epochs 2
    torchrun --nproc_per_node=8 scripts/sft.py --model CKPT --data sft.jsonl --out runs/sft --lora-rank 8

Each jsonl line is {"prompt": str, "response": str} (or {"prompt_ids": [...], "response_ids": [...]}); the loss
covers the response tokens only. OUT receives the trained model in HF format (LoRA merged), the tokenizer,
metrics.jsonl and, with --ckpt-every, resumable checkpoints: rerunning the same command continues a killed run.
`--help` lists every option. Test: python -m pytest -q tests/test_train.py -k script
"""

import argparse
import sys

import torch

BAD_ROWS_RULE = """bad rows: a row without a prompt or response, or longer than --max-seq-len, is reported on stderr
as FILE:LINE and the reason, counted, and skipped (--bad-rows skip, the default) or stops the run
(--bad-rows error). A line that is not a JSON object always stops the run with FILE:LINE."""


def parser(description, epilog):
    from w2s.train_config import add_config_args

    p = argparse.ArgumentParser(description=description, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF checkpoint directory (config.json, safetensors, tokenizer)")
    p.add_argument("--data", required=True, help="training data, one JSON object per line")
    p.add_argument("--out", required=True, help="output directory: trained model, metrics.jsonl, checkpoints")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                   help="dtype to load the model in and to export (training keeps fp32 master weights)")
    return add_config_args(p)


def run(train, args, **kwargs):
    """Load model, tokenizer and rows, train (exports to --out); bad input ends in one line on stderr, exit 2."""
    import w2s
    from w2s.checkpoint import load_for_training
    from w2s.data import read_jsonl
    from w2s.train_config import config_from_args

    try:
        cfg = config_from_args(args)
        rows = read_jsonl(args.data)
        # under torchrun only rank 0 reads the weights; the others get their FSDP shards from it
        model = load_for_training(args.model, dtype=getattr(torch, args.dtype))
        tokenizer = w2s.load_tokenizer(args.model)
        train(model, tokenizer, rows, cfg, out_dir=args.out, **kwargs)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():  # under torchrun: leave the process group cleanly
            dist.destroy_process_group()


def main():
    from w2s.train import train_sft

    args = parser("Supervised fine-tuning (loss on response tokens).", BAD_ROWS_RULE).parse_args()
    run(train_sft, args)


if __name__ == "__main__":
    main()
