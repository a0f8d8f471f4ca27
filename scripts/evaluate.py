"""Greedy test accuracy (and pass@k from n samples at T=1) of one checkpoint on a GSM8K / MATH test file.

The same prompts, stop strings and grading as the pipeline's evaluation stages (docs/PAPER.md): zero-shot
"Question: ...\\nAnswer:", generation stops at EOS or a new "Question" / "Answer", and the responses are scored under
every available grader (w2s/tasks/graders.py: paper, equivalence, math-verify), --grader naming the headline.
Generations stream to --out (resumable: rerun the same command after a kill; a rerun with another checkpoint or other
options is refused, as by `w2s sample`: <out>.meta.json records them); the result is printed as one JSON line
and written next to --out as <out>.result.json, and every question's prediction, gold answer and correctness under
the headline grader, with the test file's ids, as <out>.per_question.jsonl.

example:
    python scripts/evaluate.py CKPT_DIR data/gsm8k/test.jsonl --task gsm8k
    python scripts/evaluate.py CKPT_DIR data/math/test.jsonl --task math --samples 10 --limit 100
    torchrun --nproc_per_node=8 scripts/evaluate.py CKPT_DIR data/gsm8k/test.jsonl    # prompts split over ranks

data (TEST_FILE, one JSON object per line): GSM8K {"question", "answer": "... #### N"}; MATH {"problem", "solution",
"answer" (or the solution's last \\boxed{}), "level", "unique_id" (the id, else the line index)} (w2s/tasks).

Test: python -m pytest -q tests/test_pipeline.py -k evaluate
"""

import argparse
import json
import os
import sys
from pathlib import Path


class HelpFormatter(argparse.RawTextHelpFormatter):
    """The docstring's layout kept as written, and every option's default shown (unless its help says it)."""

    def _get_help_string(self, action):
        if "(default:" in action.help or any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            return action.help
        return action.help + " (default: %(default)s)"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2].rsplit("\n\nTest:", 1)[0])
    p.add_argument("checkpoint", help="HF-format checkpoint directory (config.json, safetensors, tokenizer), or a LoRA "
                   "adapter directory in PEFT's layout (evaluated merged into its base)")
    p.add_argument("test_file", help="test jsonl in the task's format (GSM8K: question/answer; MATH: problem/...)")
    p.add_argument("--task", choices=("gsm8k", "math"), default="gsm8k",
                   help="the answer marker: GSM8K '#### N', MATH 'The answer is: ...'")
    p.add_argument("--grader", choices=("paper", "equivalence", "math-verify"), default="paper",
                   help="the headline grader (every available one is reported): paper = the authors' protocol")
    p.add_argument("--samples", type=int, default=1,
                   help="1: greedy accuracy; n > 1: n samples per question at --temperature, pass@1 and pass@n")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature when --samples > 1")
    p.add_argument("--max-new-tokens", type=int, default=400, help="per completion (PAPER: 1024 GSM8K samples)")
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N questions only (0: all)")
    p.add_argument("--max-batch", type=int, default=64, help="sequences decoded at once")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                   help="auto: bfloat16 on CUDA, float32 on CPU (as `w2s sample`)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (the RNG is keyed by question index)")
    p.add_argument("--out", default=None,
                   help="generations jsonl (default: <checkpoint>/eval_<test stem>_<greedy|nN_tT>.jsonl); the\n"
                        "summary goes to <out>.result.json, each question to <out>.per_question.jsonl")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar (default: shown)")
    return p.parse_args(argv)


def generation_meta(args, dtype):
    """What the generations in --out depend on: a rerun resumes only an output made by the same model and options
    (<out>.meta.json, as `w2s sample`)."""
    from w2s.checkpoint import fingerprint
    from w2s.tasks import STOP_STRINGS

    return {"checkpoint": str(Path(args.checkpoint).resolve()), "checkpoint_files": fingerprint(args.checkpoint),
            "task": args.task, "n": args.samples, "temperature": 0.0 if args.samples == 1 else args.temperature,
            "max_new_tokens": args.max_new_tokens, "stop": list(STOP_STRINGS), "seed": args.seed, "dtype": dtype}


def main(argv=None):
    args = parse_args(argv)
    if args.samples < 1 or args.max_new_tokens < 1 or args.max_batch < 1:
        raise ValueError("--samples, --max-new-tokens and --max-batch must be >= 1")
    if args.limit < 0:
        raise ValueError(f"--limit {args.limit}: expected >= 0 (0: every question)")
    if args.out is not None and Path(args.out).is_dir():
        raise ValueError(f"--out {args.out}: is a directory, expected the path of a jsonl file")
    if args.out is not None and any(p.exists() and not p.is_dir() for p in Path(args.out).parents):
        raise ValueError(f"--out {args.out}: a parent of it is a file, expected a directory")
    import torch

    import w2s
    from w2s.checkpoint import tokenizer_dir, validate_checkpoint
    from w2s.parallel import barrier, is_main
    from w2s.sampling import check_distribution
    from w2s.sampling_jsonl import check_run_meta, generate_to_jsonl, write_run_meta
    from w2s.stages.metrics import evaluation_result
    from w2s.tasks import STOP_STRINGS, get_grader, load_records, stored_response, zero_shot_prompt

    # Read the data (and fail on a bad line, an uninstalled grader or a NaN temperature) before the model is loaded.
    if args.samples > 1:
        check_distribution(args.temperature, top_p=1.0, top_k=0)
    get_grader(args.task, args.grader)
    test = load_records(args.task, args.test_file)
    test = test[: args.limit] if args.limit else test
    if not test:
        raise ValueError(f"{args.test_file}: no questions to evaluate")
    validate_checkpoint(args.checkpoint)  # a model or a LoRA adapter (checked with its base), from headers alone
    try:
        device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    except RuntimeError:
        raise ValueError(f"--device {args.device}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available here (use --device cpu)")
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    suffix = "greedy" if args.samples == 1 else f"n{args.samples}_t{args.temperature:g}"
    out = Path(args.out or Path(args.checkpoint) / f"eval_{Path(args.test_file).stem}_{suffix}.jsonl")
    meta = generation_meta(args, dtype)
    fresh = check_run_meta(out, meta)  # before the model is loaded
    if "WORLD_SIZE" in os.environ:
        from w2s.parallel import init_distributed

        init_distributed()
    model = w2s.load_model(args.checkpoint, dtype=getattr(torch, dtype), device=device)
    tokenizer = w2s.load_tokenizer(tokenizer_dir(args.checkpoint))  # an adapter without its own: its base's
    barrier()  # every rank has checked the record before rank 0 writes it
    if fresh and is_main():
        write_run_meta(out, meta)
    prompts = [{"id": r["id"], "prompt": zero_shot_prompt(r["question"])} for r in test]
    generate_to_jsonl(model, tokenizer, prompts, out, n=args.samples, temperature=meta["temperature"],
                      max_new_tokens=args.max_new_tokens, stop=tuple(STOP_STRINGS), seed=args.seed,
                      max_batch=args.max_batch, progress=not args.no_progress)
    if not is_main():
        return None
    results = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    # each response kept as the pipeline keeps it (its eval stages grade the same text)
    if args.samples == 1:
        rows = [{"id": r["id"], "response": stored_response(r["completions"][0]["text"], args.task)} for r in results]
    else:
        rows = [{"id": r["id"], "samples": [{"response": stored_response(c["text"], args.task)}
                                            for c in r["completions"]]} for r in results]
    truncated = sum(c["finish_reason"] == "length" for r in results for c in r["completions"])
    result = {"checkpoint": str(args.checkpoint), "test_file": str(args.test_file), "n_questions": len(rows),
              "n_truncated": truncated,
              **evaluation_result(rows, test, args.task, grader=args.grader, per_question=True)}
    lines = result.pop("per_question")
    Path(f"{out}.result.json").write_text(json.dumps(result, indent=2) + "\n")
    Path(f"{out}.per_question.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    from w2s.parallel import command_line_process, exit_if_stopped, say_error

    with command_line_process():
        try:
            main()
        except (ValueError, OSError) as e:  # bad input, a full disk: one line (once under torchrun), exit 2
            say_error(f"error: {e}")
            sys.exit(2)
        except (KeyboardInterrupt, RuntimeError) as e:
            exit_if_stopped(e, "the completions written so far are kept; the same command resumes")
            raise
