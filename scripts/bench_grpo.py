"""GRPO step benchmark: tokens/s of the rollout (sampling from the live weights) and of the update, separately.

    python scripts/bench_grpo.py                         # CPU miniature: demo/strong on the demo's questions, fp32
    python scripts/bench_grpo.py --lora 8 --kl-beta 0.04 # with LoRA and the adapters-off reference pass
    python scripts/bench_grpo.py --model CKPT --data train.jsonl --dtype bfloat16 --questions 32 --group 8 \\
        --max-new 512                                    # GPU (one process: FSDP2 through a 1-rank group)

It runs the real thing, w2s.grpo.train_grpo (one training loop, w2s/train.py), for --warmup + --steps optimizer
steps on --questions train questions per step (zero-shot prompts, the pipeline's stop strings, the paper grader) and
reads each step's metrics.jsonl record:
  * rollout: sampled tokens / the sampler's seconds (rollout/tok_s; under FSDP the gather of the sampling copy is in
    those seconds);
  * update: trained tokens (model inputs, prompt + response - 1 per sequence, what the loop's tok/s counts) over the
    rest of the step (the step's window minus the rollout: grading, collation, the reference / pi_old passes when
    on, forward, backward, optimizer step);
  * step: trained tokens over the whole step (the loop's own tok/s).
Printed: the median of each over the steps after --warmup, and the shapes.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "demo" / "strong"), help="HF checkpoint dir (default: demo/strong)")
    p.add_argument("--data", default=str(ROOT / "demo" / "data" / "train.jsonl"), help="jsonl with 'question'")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--questions", type=int, default=8, help="questions per optimizer step")
    p.add_argument("--micro", type=int, default=2, help="questions per forward/backward")
    p.add_argument("--group", type=int, default=8, help="samples per question (G)")
    p.add_argument("--max-new", type=int, default=80, help="max new tokens per sample (the demo's)")
    p.add_argument("--lora", type=int, default=None, help="LoRA rank (default: full fine-tuning)")
    p.add_argument("--kl-beta", type=float, default=0.0)
    p.add_argument("--steps", type=int, default=5, help="measured steps")
    p.add_argument("--warmup", type=int, default=1, help="steps run first and not measured")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (the demo's default: 1)")
    return p.parse_args()


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    from w2s.checkpoint import load_for_training
    from w2s.grpo import train_grpo
    from w2s.profile import device_name
    from w2s.tasks import STOP_STRINGS, get_grader, zero_shot_prompt
    from w2s.tokenizer import load_tokenizer
    from w2s.train_config import GRPOConfig, TrainConfig

    total = args.warmup + args.steps
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    questions = [{"id": str(i), "prompt": zero_shot_prompt(r["question"])}
                 for i, r in enumerate(rows[: args.questions * total])]
    model, tok = load_for_training(args.model, dtype=getattr(torch, args.dtype)), load_tokenizer(args.model)
    n_params = sum(p.numel() for p in model.parameters())
    cfg = TrainConfig(lr=1e-5, batch_size=args.questions, micro_batch_size=args.micro, max_steps=total,
                      lora_rank=args.lora, progress=False, seed=0)
    gcfg = GRPOConfig(group_size=args.group, max_new_tokens=args.max_new, kl_beta=args.kl_beta)
    recs = []
    start = time.perf_counter()
    train_grpo(model, tok, questions, cfg, gcfg, get_grader("gsm8k", "paper"), stop=tuple(STOP_STRINGS),
               on_step=recs.append, return_model=False)
    wall = time.perf_counter() - start
    measured = recs[args.warmup:]
    rollout, update, step, sampled = [], [], [], []
    for r in measured:
        window = r["tokens"] / r["tok_per_s"]  # the step's seconds
        sampled.append(r["rollout/tok_s"] * r["rollout/s"])
        rollout.append(r["rollout/tok_s"])
        update.append(r["tokens"] / (window - r["rollout/s"]))
        step.append(r["tok_per_s"])
    med = statistics.median
    device = device_name(torch.device("cuda")) if torch.cuda.is_available() else "cpu"
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, dtype {args.dtype}")
    print(f"model {args.model} ({n_params / 1e6:.2f} M params), {'LoRA r=%d' % args.lora if args.lora else 'full'}"
          f", kl_beta {args.kl_beta}")
    print(f"step: {args.questions} questions x G={args.group}, max_new_tokens {args.max_new}, micro-batch "
          f"{args.micro} questions; {args.steps} measured steps after {args.warmup} warm-up ({wall:.1f} s in all)")
    print(f"per step (median): sampled tokens {med(sampled):.0f}, trained tokens "
          f"{med(r['tokens'] for r in measured):.0f}, mean response {med(r['completion_len'] for r in measured):.1f}")
    print(f"rollout  {med(rollout):8.0f} sampled tok/s   (per step: {', '.join(f'{x:.0f}' for x in rollout)})")
    print(f"update   {med(update):8.0f} trained tok/s   (per step: {', '.join(f'{x:.0f}' for x in update)})")
    print(f"step     {med(step):8.0f} trained tok/s   (rollout share of the step: "
          f"{med(r['rollout/s'] * r['tok_per_s'] / r['tokens'] for r in measured):.0%})")
    return 0


if __name__ == "__main__":
    from w2s.parallel import command_line_process

    with command_line_process():  # leaves the 1-rank process group training joins on CUDA
        status = main()
    sys.exit(status)
