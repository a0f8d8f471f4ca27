"""The command line of scripts/sft.py and scripts/dpo.py: one parser (--model, --data, --out, --dtype, the trackers
and one flag per TrainConfig field the script uses) and one run (load, train, export) whose bad input ends in one
line on stderr, exit code 2.

    python scripts/sft.py --model CKPT --data sft.jsonl --out runs/sft --lr 1e-5      # sft_main
    python scripts/dpo.py --model CKPT --data pairs.jsonl --out runs/dpo --loss orpo  # preference_main

    python -m pytest -q tests/test_train.py -k script
"""

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch

from w2s.parallel import command_line_process

SFT_HELP = """Supervised fine-tuning of a Hugging Face checkpoint: the loss covers the response (assistant) tokens only.

example:
  python scripts/sft.py --model CKPT --data sft.jsonl --out runs/sft --lr 1e-5 --epochs 2
  torchrun --nproc_per_node=8 scripts/sft.py --model CKPT --data sft.jsonl --out runs/sft --lora-rank 8
  python scripts/sft.py ... --report-to tensorboard && tensorboard --logdir runs/sft/tb

data (--data: one JSON object per line; the first format whose keys a line has):
  {"prompt_ids": [int], "response_ids": [int]}        tokenized already, used as given
  {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
                                                      a chat in the model's chat template: loss on every
                                                      assistant turn (its reply and end-of-turn marker)
  {"prompt": [messages], "completion": [messages]}    TRL's conversational prompt-completion
  {"prompt": "...", "completion": "..."}              TRL's: prompt + completion joined as they are, then EOS
  {"prompt": "...", "response": "..."}                w2s's: prompt + " " + response, then EOS"""

PREFERENCE_HELP = """Preference training of a Hugging Face checkpoint: DPO (Rafailov et al.), IPO (Azar et al.) or ORPO
(Hong et al.). DPO and IPO score the pairs once under the initial weights (the reference model) and cache them in
OUT/ref_logps.pt; ORPO needs no reference.

example:
  python scripts/dpo.py --model CKPT --data pairs.jsonl --out runs/dpo --loss dpo --beta 0.1 --lr 5e-7
  torchrun --nproc_per_node=8 scripts/dpo.py --model CKPT --data pairs.jsonl --out runs/dpo --loss orpo

data (--data: one JSON object per line):
  {"prompt": "...", "chosen": "...", "rejected": "..."}   text: prompt + " " + chosen / rejected, then EOS
  {"prompt": [messages], "chosen": [{"role": "assistant", "content": "..."}], "rejected": [...]}
                                    TRL's conversational format, in the model's chat template; loss (log-probs)
                                    on chosen's / rejected's assistant turns. Without "prompt", the messages
                                    chosen and rejected share at the start are the prompt (TRL's implicit prompt)
  {"prompt_ids": [int], "chosen_ids": [int], "rejected_ids": [int]}   tokenized already"""

OUTPUT_HELP = """
output (--out): the trained model in HF format with its tokenizer (with --lora-rank: the adapter in PEFT's
layout, and the merged model in OUT/merged only with --export-merged), train_config.json (the resolved
options), metrics.jsonl (one record per log step), checkpoints in OUT/ckpt while it runs (with --ckpt-every: rerun
the same command to resume; the log says "resumed from step N"), OUT/tb with --report-to tensorboard. An OUT
that holds a trained model already (a finished run) is refused unless --overwrite, which removes the old weights
before training so that OUT never pairs a new train_config.json with an old model. A run killed in OUT resumes
with or without --overwrite; to start it over with other options, pass --no-resume.

"""

SFT_BAD_ROWS = """bad rows: a row without the keys of a format above (the message lists them), with an empty response
or no assistant turn, or longer than --max-seq-len is reported on stderr as FILE:LINE and the reason, counted, and
skipped (--bad-rows skip, the default) or stops the run (--bad-rows error). A line that is not a JSON object always
stops the run with FILE:LINE."""

PREFERENCE_BAD_ROWS = """bad rows: a pair without a prompt, chosen or rejected response, a pair whose chosen equals its
rejected response, or one longer than --max-seq-len is reported on stderr as FILE:LINE and the reason, counted, and
skipped (--bad-rows skip, the default) or stops the run (--bad-rows error). A line that is not a JSON object always
stops the run with FILE:LINE."""

DTYPES = ("auto", "bfloat16", "float16", "float32")


def parser(description, epilog, skip=()):
    """The options every training script shares: model, data, output, dtype, trackers, and the TrainConfig fields
    (less `skip`, the ones the script ignores)."""
    from w2s.tracking import TRACKERS
    from w2s.train_config import add_config_args

    p = argparse.ArgumentParser(description=description, epilog=OUTPUT_HELP + epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF checkpoint directory (config.json, safetensors, tokenizer), or a "
                   "LoRA adapter directory: with the adapter's --lora-rank/--lora-alpha training continues it, "
                   "without --lora-rank it is merged into its base first (required)")
    p.add_argument("--data", required=True, help="training data, one JSON object per line (formats above; required)")
    p.add_argument("--out", required=True, help="output directory (see below; with --lora-rank the adapter in PEFT's "
                   "layout, --export-merged adds OUT/merged; required)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="dtype to load the model in and to export it in; training keeps fp32 master weights either "
                        "way (default: auto, the checkpoint's own dtype, so an fp32 model comes back fp32)")
    p.add_argument("--report-to", nargs="+", choices=TRACKERS, default=[], metavar="TRACKER",
                   help="send the metrics.jsonl records to tensorboard and/or wandb as well (optional extras: pip "
                        "install 'w2s[tensorboard]' / 'w2s[wandb]'; WANDB_MODE=offline for no network) "
                        "(default: none)")
    p.add_argument("--overwrite", action="store_true",
                   help="train into an --out that holds a trained model already, replacing it (default: refuse)")
    p.add_argument("--log-dir", default=None, help="the trackers' directory (default: OUT/tb)")
    p.add_argument("--run-name", default=None, help="the run's name in wandb (default: OUT's name)")
    return add_config_args(p, skip=skip)


def checkpoint_dtype(path):
    """The floating dtype most of a checkpoint's weights are stored in (from the safetensors headers; an adapter's
    are its base's)."""
    from collections import Counter

    from w2s.checkpoint import SAFETENSORS_DTYPES, checkpoint_files, read_safetensors_header
    from w2s.lora import adapter_base_dir, read_adapter

    adapter = read_adapter(path, tensors=False)
    path = adapter_base_dir(path, adapter) if adapter is not None else path
    counts = Counter()
    for file in sorted(set(checkpoint_files(path).values())):
        for info in read_safetensors_header(file)[0].values():
            dtype = SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is not None and dtype.is_floating_point:
                counts[dtype] += 1
    return counts.most_common(1)[0][0] if counts else torch.float32


def resolve_dtype(args, log=print):
    """--dtype as a torch dtype; auto is the checkpoint's own. A dtype other than the stored one is said out loud."""
    stored = checkpoint_dtype(args.model)
    dtype = stored if args.dtype == "auto" else getattr(torch, args.dtype)
    if dtype != stored:
        log(f"note: {args.model} is stored in {str(stored).removeprefix('torch.')}; --dtype {args.dtype} loads it "
            f"and exports the trained model in {str(dtype).removeprefix('torch.')}")
    return dtype


def finished_model_files(out, model_dir, overwrite):
    """The files of a trained model already in `out` (a finished run's export): refused unless `overwrite`, then
    returned for removal. Weights beside a training state in out/ckpt are a run killed while it exported: it
    resumes (or, with --no-resume, starts over) and its export replaces them, so nothing is removed for it. `out`
    may never hold the weights the run trains from: the --model directory, or an adapter's base (nor may
    OUT/merged)."""
    from w2s.checkpoint import INDEX_FILE
    from w2s.export import MERGED_DIR
    from w2s.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_base_dir, read_adapter
    from w2s.train_state import latest_checkpoint

    sources = [model_dir]
    while (adapter := read_adapter(sources[-1], tensors=False)) is not None:
        sources.append(adapter_base_dir(sources[-1], adapter))  # an adapter trains from its base's (a cycle raises)
    for source in sources:  # the export writes OUT's files and OUT/merged, and --overwrite removes them first
        if out.exists() and (source.resolve() == out.resolve() or source.resolve().is_relative_to(
                (out / MERGED_DIR).resolve())):
            raise ValueError(f"--out {out}: holds {source}, which this run trains from; the export would replace "
                             f"it (choose another --out)")
    if not out.is_dir():
        return []
    names = [INDEX_FILE, ADAPTER_WEIGHTS, ADAPTER_CONFIG, "config.json", MERGED_DIR]
    files = [out / n for n in names if (out / n).exists() or (out / n).is_symlink()]
    files += sorted(out.glob("model*.safetensors"))
    weights = [f for f in [*files, *sorted((out / MERGED_DIR).glob("*.safetensors"))] if f.suffix == ".safetensors"]
    if not weights or latest_checkpoint(out / "ckpt") is not None:
        return []
    if not overwrite:
        raise ValueError(f"--out {out}: holds a trained model already ({weights[0].relative_to(out)}); pass "
                         f"--overwrite to replace it, or choose another --out")
    return files


def remove_model_files(files):
    for f in files:  # a symlinked folder is unlinked, not followed (rmtree refuses it)
        shutil.rmtree(f) if f.is_dir() and not f.is_symlink() else f.unlink(missing_ok=True)


def check_rows_before_loading(encode_rows, tokenizer, rows, cfg, args):
    """The rows read as the trainer will read them, before the weights load (minutes for a 70B model): bad_rows
    'error' stops at the first bad row, and a file without a usable row is refused. The trainer encodes them again
    and reports every skipped row."""
    from w2s.checkpoint import model_config

    vocab_size = model_config(args.model).vocab_size
    items, _, skipped = encode_rows(tokenizer, rows, cfg.max_seq_len, cfg.bad_rows, verbose=False,
                                    vocab_size=vocab_size)
    if not items:
        where, reason = skipped[0]
        raise ValueError(f"{args.data}: none of the {len(rows)} rows is usable (the first: {where}: {reason})")


def kept_after_stop(cfg, out):
    """What a Ctrl-C or SIGTERM leaves behind (the last complete checkpoint in OUT/ckpt, if any) and how to go on."""
    from w2s.train_state import latest_checkpoint

    # an earlier run's checkpoint counts under --ckpt-every 0 too: the trainer resumes from whatever OUT/ckpt holds
    last = latest_checkpoint(Path(out) / "ckpt") if cfg is not None else None
    if last is None:
        why = "--ckpt-every 0" if cfg is not None and not cfg.ckpt_every else "no checkpoint written yet"
        return f"nothing to resume from ({why}); the same command starts over"
    again = "the same command" if cfg.resume else "the same command without --no-resume"
    step = int(last.name.removeprefix("step"))
    return f"the training state after step {step} is kept in {last}; {again} resumes from it"


@command_line_process()
def run(train, encode_rows, args, **kwargs):
    """Load model, tokenizer and rows, train (exports to --out); bad input ends in one line on stderr, exit 2, and a
    Ctrl-C in one line, exit 130."""
    import w2s
    from w2s.checkpoint import load_for_training, tokenizer_dir, validate_checkpoint
    from w2s.files import read_jsonl
    from w2s.losses import check_beta
    from w2s.parallel import exit_if_stopped, lost_peer_line, rank, say_error
    from w2s.tracking import check_trackers
    from w2s.train_config import config_from_args

    cfg = None
    try:
        cfg = config_from_args(args)
        if cfg.export_merged and cfg.lora_rank is None:
            print("note: --export-merged does nothing without --lora-rank: a full fine-tune exports the whole model "
                  "to --out", file=sys.stderr)
        if "loss" in kwargs:  # DPO and IPO need beta > 0: say so before the model loads
            check_beta(kwargs["loss"], cfg.beta)
        check_trackers(args.report_to)
        rows = read_jsonl(args.data, tag_lines=True)
        if not rows:
            raise ValueError(f"{args.data}: no rows (an empty file)")
        out = Path(args.out)
        if out.exists() and not out.is_dir() or any(p.exists() and not p.is_dir() for p in out.parents):
            raise ValueError(f"--out {args.out}: it, or a directory above it, is a file; expected a directory")
        if not Path(args.model).is_dir():
            raise ValueError(f"--model {args.model}: no such directory (expected a Hugging Face checkpoint)")
        old_model = finished_model_files(out, Path(args.model), args.overwrite)
        try:  # a read-only or missing mount is known now, not at the first checkpoint after the weights load
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"--out {args.out}: cannot create it ({e.strerror})") from None
        if not os.access(out, os.W_OK):
            raise ValueError(f"--out {args.out}: not writable")
        tokenizer = w2s.load_tokenizer(tokenizer_dir(args.model))  # a missing one is known before the weights load
        check_rows_before_loading(encode_rows, tokenizer, rows, cfg, args)
        validate_checkpoint(args.model, tokenizer=False)  # from the headers: an adapter for another base, a cut shard
        dtype = resolve_dtype(args, log=print if rank() == 0 else lambda *a: None)
        # under torchrun only rank 0 reads the weights; the others get their FSDP shards from it
        model = load_for_training(args.model, dtype=dtype)
        if rank() == 0:  # --overwrite: from here on OUT holds no finished model until this run exports its own
            remove_model_files(old_model)
        train(model, tokenizer, rows, cfg, out_dir=args.out, report_to=args.report_to, log_dir=args.log_dir,
              run_name=args.run_name, **kwargs)
    except (ValueError, OSError) as e:  # bad input, a nan loss, a full disk or a permission error: one line
        say_error(f"error: {e}")
        sys.exit(2)
    except (KeyboardInterrupt, RuntimeError) as e:
        exit_if_stopped(e, kept_after_stop(cfg, args.out))
        # a rank left behind when another failed: one line, not a traceback from each
        if not (line := lost_peer_line(e)):
            raise
        say_error(f"error: {line}")
        sys.exit(1)


def sft_main(argv=None):
    from w2s.data import encode_sft_rows
    from w2s.train import train_sft
    from w2s.train_config import PREFERENCE_ONLY

    # beta, the NLL term's weight and ORPO's NLL convention are the preference losses': SFT ignores them
    args = parser(SFT_HELP, SFT_BAD_ROWS, skip=PREFERENCE_ONLY).parse_args(argv)
    run(train_sft, encode_sft_rows, args)


def preference_main(argv=None):
    from w2s.data import encode_pair_rows
    from w2s.losses import PREFERENCE_LOSSES
    from w2s.train import train_preference

    p = parser(PREFERENCE_HELP, PREFERENCE_BAD_ROWS)
    p.add_argument("--loss", choices=PREFERENCE_LOSSES, default="dpo", help="preference loss (default: dpo)")
    args = p.parse_args(argv)
    run(train_preference, encode_pair_rows, args, loss=args.loss)
