"""The command line of scripts/sft.py and scripts/dpo.py: one parser (--model, --data, --out, --dtype and one flag
per TrainConfig field) and one run (load, train, export) whose bad input ends in one line on stderr, exit code 2.

    python scripts/sft.py --model CKPT --data sft.jsonl --out runs/sft --lr 1e-5      # sft_main
    python scripts/dpo.py --model CKPT --data pairs.jsonl --out runs/dpo --loss orpo  # preference_main

    python -m pytest -q tests/test_train.py -k script
"""

import argparse
import sys

import torch

SFT_BAD_ROWS = """bad rows: a row without a prompt or response, or longer than --max-seq-len, is reported on stderr
as FILE:LINE and the reason, counted, and skipped (--bad-rows skip, the default) or stops the run
(--bad-rows error). A line that is not a JSON object always stops the run with FILE:LINE."""

PREFERENCE_BAD_ROWS = """bad rows: a pair without a prompt, chosen or rejected response, a pair whose chosen equals its
rejected response, or one longer than --max-seq-len is reported on stderr as FILE:LINE and the reason, counted, and
skipped (--bad-rows skip, the default) or stops the run (--bad-rows error). A line that is not a JSON object always
stops the run with FILE:LINE."""


def parser(description, epilog):
    """The options every training script shares: model, data, output, dtype, and every TrainConfig field."""
    from w2s.train_config import add_config_args

    p = argparse.ArgumentParser(description=description, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF checkpoint directory (config.json, safetensors, tokenizer), or a "
                   "LoRA adapter directory: with the adapter's --lora-rank/--lora-alpha training continues it, "
                   "without --lora-rank it is merged into its base first")
    p.add_argument("--data", required=True, help="training data, one JSON object per line")
    p.add_argument("--out", required=True, help="output directory: trained model (with --lora-rank: the adapter in "
                   "PEFT's layout; --export-merged adds OUT/merged), metrics.jsonl, checkpoints")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                   help="dtype to load the model in and to export (training keeps fp32 master weights)")
    return add_config_args(p)


def run(train, args, **kwargs):
    """Load model, tokenizer and rows, train (exports to --out); bad input ends in one line on stderr, exit 2."""
    import torch.distributed as dist

    import w2s
    from w2s.checkpoint import load_for_training, tokenizer_dir
    from w2s.files import read_jsonl
    from w2s.train_config import config_from_args

    try:
        cfg = config_from_args(args)
        rows = read_jsonl(args.data, tag_lines=True)
        # under torchrun only rank 0 reads the weights; the others get their FSDP shards from it
        model = load_for_training(args.model, dtype=getattr(torch, args.dtype))
        tokenizer = w2s.load_tokenizer(tokenizer_dir(args.model))
        train(model, tokenizer, rows, cfg, out_dir=args.out, **kwargs)
    except (ValueError, OSError) as e:  # bad input, a nan loss, a full disk or a permission error: one line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():  # under torchrun: leave the process group cleanly
            dist.destroy_process_group()


def sft_main(argv=None):
    from w2s.train import train_sft

    args = parser("Supervised fine-tuning (loss on response tokens).", SFT_BAD_ROWS).parse_args(argv)
    run(train_sft, args)


def preference_main(argv=None):
    from w2s.losses import PREFERENCE_LOSSES
    from w2s.train import train_preference

    p = parser("Preference training: DPO (Rafailov et al.), IPO (Azar et al.) or ORPO (Hong et al.).",
               PREFERENCE_BAD_ROWS)
    p.add_argument("--loss", choices=PREFERENCE_LOSSES, default="dpo", help="preference loss (default: dpo)")
    args = p.parse_args(argv)
    run(train_preference, args, loss=args.loss)
