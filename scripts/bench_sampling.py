"""Sampler benchmark: output tokens/s and time per decode step on a fixed workload, random weights, no EOS (every
sequence runs the full budget, so the work is exactly prompts x samples x new tokens).

    python scripts/bench_sampling.py                      # CPU: small Llama-shaped model, 32 prompts x 8 x 256 tokens
                                                          #      after 128-token prompts, and transformers' generate on
                                                          #      the same weights (~5 min on 2 cores)
    python scripts/bench_sampling.py --samples 4 --new-tokens 64 --prompt-len 32   # CPU: the quick earlier default
    python scripts/bench_sampling.py --shared-prefix 384 --samples 1 --prompt-len 32 --new-tokens 64
                                                          # ICL-shaped: 4-shot demos common to all prompts
    python scripts/bench_sampling.py --device cuda        # GPU: Llama-3-8B-shaped bf16, 256 prompts x 8 x 256 tokens,
                                                          #      then batch-1 greedy decode (--batch1 on CPU too)
    make bench-sampling

On CPU the number that matters is the ratio to transformers' `generate` run in the same process on the same weights
and the same workload (target >= 3x); on an H100 the target is >= 13k output tokens/s for the 8B shape (DESIGN.md).
Timings are medians over --repeats runs after one warm-up run, with the device synchronized before every clock read.
"""

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from w2s.config import ModelConfig
from w2s.model import Transformer
from w2s.sampling import generate

# Llama-architecture shapes: "small" is what 2 CPU cores can run in seconds; "8b" is Llama-3-8B.
SHAPES = {
    "small": dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64, hidden_dim=688, vocab_size=2048),
    "8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=14336, vocab_size=128256),
}
# CPU: the GPU workload's per-prompt shape (the 256 prompts x 8 samples x 256 new tokens) on 32 prompts, so
# that both sides finish in minutes on 2 cores.
WORKLOADS = {"cpu": dict(prompts=32, samples=8, new_tokens=256, prompt_len=128),
             "cuda": dict(prompts=256, samples=8, new_tokens=256, prompt_len=128)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fns, device, repeats):
    """Median wall time of each fn() over `repeats` runs after one warm-up run each -> [seconds] per fn.

    The functions take turns within every repeat (a, b, a, b, ...), so a change in the load of a shared machine
    reaches all of them alike instead of whichever happened to run during it.
    """
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            ts.append(time.perf_counter() - start)
    return [statistics.median(ts) for ts in times]


def random_model(shape, dtype, device, seed=0):
    """A w2s Llama-shaped model with random weights and no EOS token (so nothing stops early)."""
    cfg = ModelConfig(family="llama", max_seq_len=8192, **SHAPES[shape])
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    model.init_weights(generator=torch.Generator(device).manual_seed(seed))
    return model.to(dtype).eval()


def hf_twin(model, path):
    """transformers' LlamaForCausalLM with exactly the weights of `model` (through an HF checkpoint on disk)."""
    import transformers

    from w2s.checkpoint import save_model

    save_model(model, path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    hf.generation_config.eos_token_id = None  # as in the w2s run: every sequence generates the full budget
    return hf.eval()


def commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def steady_decode_step_ms(model, prompt, new_tokens, device, replays=100):
    """Batch-1 greedy decode step time once its CUDA graph exists: what a long-running server that captured its
    graphs at start-up pays per token. generate() captures anew on every call (a graph per attention limit, each
    after an eager warm-up step) and prefills, which the end-to-end batch-1 number above includes."""
    from w2s.sampling import Engine

    engine = Engine(model, prompt, 1, temperature=0.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens, seed=0,
                    eos_ids=(), slots=1, cache_len=len(prompt[0]) + new_tokens, cuda_graphs=True)
    for _ in engine.run():  # one full generation: captures the graphs
        pass
    limit = max(engine.graphs)  # the longest attention span the run reached
    engine.step(limit)
    sync(device)
    start = time.perf_counter()
    for _ in range(replays):
        engine.step(limit)
    sync(device)
    return (time.perf_counter() - start) * 1e3 / replays


def profile_batch1(model, prompt, device, new_tokens=64):
    """Eager (no CUDA graph) greedy decode of one sequence under torch.profiler: the top kernels by device time, the
    ops by input shape, and the device time per generated token, i.e. what a graph replay of the step cannot go
    below."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    run = lambda: generate(model, None, prompt, max_new_tokens=new_tokens, progress=False, cuda_graphs=False)  # noqa
    run()  # warm-up: Triton compiles, allocator
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        run()
        sync(device)
    events = prof.key_averages()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"  # kernels, or ops on CPU
    # On CUDA count the kernels' rows only: an op's row (aten::mm) also carries the time of the kernels it launched.
    counted = [e for e in events if device.type != "cuda" or (e.device_type == DeviceType.CUDA
                                                                 and not e.is_user_annotation)]
    total_us = sum(getattr(e, key) for e in counted)
    print(f"\nprofile: eager batch-1 greedy decode, {new_tokens} new tokens (prefill included): "
          f"{'device' if device.type == 'cuda' else 'CPU'} time {total_us / 1e3:.1f} ms, "
          f"{total_us / 1e3 / new_tokens:.2f} ms per token")
    print(events.table(sort_by=key, row_limit=15, max_name_column_width=60))
    by_shape = prof.key_averages(group_by_input_shape=True)  # the same ops per input shape (which matmul is slow)
    print(by_shape.table(sort_by=key.removeprefix("self_"), row_limit=12, max_name_column_width=30,
                         max_shapes_column_width=60))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="model shape [default: small on CPU, 8b on CUDA]")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="[default: float32 on CPU, bf16 on CUDA]")
    parser.add_argument("--prompts", type=int, help="number of prompts [CPU 32, CUDA 256]")
    parser.add_argument("--samples", type=int, help="completions per prompt [8]")
    parser.add_argument("--new-tokens", type=int, help="tokens generated per completion [256]")
    parser.add_argument("--prompt-len", type=int, help="tokens per prompt [128]")
    parser.add_argument("--shared-prefix", type=int, default=0,
                        help="tokens of a prefix common to every prompt, before its own --prompt-len tokens (the\n"
                             "ICL stage's 4 demonstrations; w2s prefills it once, transformers once per sequence)")
    parser.add_argument("--max-batch", type=int, default=512, help="sequences decoded together (cache slots)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (the median is reported)")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers' generate (default on CUDA)")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly on CUDA")
    parser.add_argument("--threads", type=int, help="torch CPU threads [default: torch's choice]")
    parser.add_argument("--batch1", action=argparse.BooleanOptionalAction, default=None,
                        help="also time batch-1 greedy decode [default: on CUDA only]")
    parser.add_argument("--profile", action="store_true",
                        help="also profile eager batch-1 decode (torch.profiler): the kernels a decode step spends\n"
                             "its device time in, and that time per step")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    kind = "cuda" if device.type == "cuda" else "cpu"
    work = {k: getattr(args, k) or v for k, v in WORKLOADS[kind].items()}
    shape = args.shape or ("8b" if kind == "cuda" else "small")
    dtype = getattr(torch, args.dtype or ("bfloat16" if kind == "cuda" else "float32"))
    run_hf = not args.no_hf and kind == "cpu"

    model = random_model(shape, dtype, device)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, SHAPES[shape]["vocab_size"], (work["prompts"], work["prompt_len"]), generator=g)
    if args.shared_prefix:
        prefix = torch.randint(3, SHAPES[shape]["vocab_size"], (1, args.shared_prefix), generator=g)
        prompts = torch.cat([prefix.expand(work["prompts"], -1), prompts], dim=1)  # (P, prefix + prompt_len)
    n_tokens = work["prompts"] * work["samples"] * work["new_tokens"]
    options = dict(n=work["samples"], temperature=1.0, max_new_tokens=work["new_tokens"], max_batch=args.max_batch,
                   cuda_graphs=False if args.no_cuda_graphs else None, progress=False)

    def ours():
        outs = generate(model, None, prompts.tolist(), **options)
        assert sum(c["num_tokens"] for cs in outs for c in cs) == n_tokens  # no early stop: the work is fixed

    name = torch.cuda.get_device_name(device) if kind == "cuda" else "cpu"
    print(f"device {name} ({torch.get_num_threads()} threads), dtype {dtype}, torch {torch.__version__}, commit "
          f"{commit()}")
    print(f"model: Llama-shaped '{shape}' {SHAPES[shape]} ({model.cfg.n_params() / 1e6:.1f} M params, random)")
    print(f"workload: {work['prompts']} prompts x {work['samples']} samples x {work['new_tokens']} new tokens, "
          f"prompt length {work['prompt_len']}" + (f" after a shared prefix of {args.shared_prefix}"
                                                   if args.shared_prefix else "") +
          f", temperature 1.0, max_batch {args.max_batch}")
    theirs = None
    if run_hf:
        with tempfile.TemporaryDirectory() as tmp:
            hf = hf_twin(model, tmp)

        def theirs():
            with torch.no_grad():
                out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=1.0,
                                  top_p=1.0, top_k=0, num_return_sequences=work["samples"],
                                  max_new_tokens=work["new_tokens"], min_new_tokens=work["new_tokens"],
                                  pad_token_id=0)
            assert out.shape == (work["prompts"] * work["samples"], prompts.shape[1] + work["new_tokens"])

    t_ours, *t_theirs = timed([ours] + ([theirs] if run_hf else []), device, args.repeats)
    print(f"w2s generate          {n_tokens / t_ours:10.0f} output tok/s   {t_ours * 1e3 / work['new_tokens']:8.2f} ms"
          f"/step   ({t_ours:.2f} s, median of {args.repeats})")
    if kind == "cuda":
        print(f"target (H100, 8B shape): >= 13000 output tok/s: {'met' if n_tokens / t_ours >= 13000 else 'NOT met'}")
    if args.batch1 or (args.batch1 is None and kind == "cuda"):
        # Latency: one sequence, greedy, the same number of new tokens; bandwidth-bound (every step reads all weights).
        one = prompts[:1].tolist()
        t_one, = timed([lambda: generate(model, None, one, max_new_tokens=work["new_tokens"], progress=False,
                                         cuda_graphs=options["cuda_graphs"])], device, args.repeats)
        rate = work["new_tokens"] / t_one
        target = f" (target H100 8B: >= 150: {'met' if rate >= 150 else 'NOT met'})" if kind == "cuda" else ""
        print(f"w2s batch-1 decode    {rate:10.0f} tok/s          {t_one * 1e3 / work['new_tokens']:8.2f} ms/step"
              f"{target}")
        if kind == "cuda" and not args.no_cuda_graphs:
            step_ms = steady_decode_step_ms(model, one, work["new_tokens"], device)
            print(f"  steady state (graph replay) {1e3 / step_ms:6.0f} tok/s          {step_ms:8.2f} ms/step   (the "
                  f"decode step alone: no prefill, no per-call graph capture)")
    if args.profile:
        profile_batch1(model, prompts[:1].tolist(), device)
    if not run_hf:
        return
    t_hf = t_theirs[0]
    print(f"transformers generate {n_tokens / t_hf:10.0f} output tok/s   {t_hf * 1e3 / work['new_tokens']:8.2f} ms/step"
          f"   ({t_hf:.2f} s, median of {args.repeats}, runs alternating with w2s's)")
    ratio = t_hf / t_ours
    print(f"speed-up over transformers: {ratio:.2f}x (target >= 3x: {'met' if ratio >= 3 else 'NOT met'})")


if __name__ == "__main__":
    main()
