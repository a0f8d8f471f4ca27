"""Sampler benchmark: output tokens/s, time per decode step and memory-bandwidth utilization (MBU) on a fixed
workload, random weights.

    python scripts/bench_sampling.py                      # CPU: small Llama-shaped model, 32 prompts x 8 x 256 tokens
                                                          #      after 128-token prompts, and transformers' generate on
                                                          #      the same weights (minutes on 2 cores)
    python scripts/bench_sampling.py --samples 4 --new-tokens 64 --prompt-len 32   # CPU: a quick small run
    python scripts/bench_sampling.py --shared-prefix 384 --samples 1 --prompt-len 32 --new-tokens 64
                                                          # ICL-shaped: 4-shot demos common to all prompts
    python scripts/bench_sampling.py --device cuda        # GPU: Llama-3-8B-shaped bf16, 256 prompts x 8 x 256 tokens,
                                                          #      then batch-1 greedy decode (--batch1 on CPU too)
    python scripts/bench_sampling.py --gsm8k              # GSM8K-like: 256 prompts (CPU 32) x 8 samples, prompts of
                                                          #      60-200 tokens, EOS-terminated completions (mean ~150,
                                                          #      at most 400): continuous batching refills slots
    python scripts/bench_sampling.py --gsm8k --prefill-chunk 256   # the same, refilled slots' prompts prefilled
                                                          #      inside the decode steps (chunked prefill)
    python scripts/bench_sampling.py --prompts 64 --top-p 0.95    # nucleus sampling: the whole vocabulary sorted
                                                          #      every decode step (the paper samples at top_p 1)
    python scripts/bench_sampling.py --prompts 64 --share-prompt-reads   # a prompt's keys read from one of its 8
                                                          #      samples' rows for all of them (meeting in L2)
    python scripts/bench_sampling.py --prompts 64 --prompt-cascade   # each prompt's keys read once for its 8
                                                          #      samples, merged with their own (Triton path)
    python scripts/bench_sampling.py --gsm8k --no-compact # the drain with every slot kept where it is (each step
                                                          #      runs up to the highest busy slot)
    make bench-sampling

Without --gsm8k there is no EOS: every sequence runs the full budget, so the work is exactly prompts x samples x new
tokens. With --gsm8k the model's EOS ids are a random set of V / 150 vocabulary ids: a random model at temperature 1
draws nearly uniformly, so completions end after a geometric number of tokens with mean ~150 (a shape like GSM8K
chain-of-thought answers, not their text); the script prints the mean length and the slot occupancy (generated
tokens / (decode steps x slots): how full continuous batching keeps the batch), and the same over the rows the steps
ran (a draining batch moves its samples down and runs fewer rows: generate's compact).

MBU: the bytes a decode step must read (every weight once, the input embedding table excepted unless it is also the
output matrix, plus the keys and values each live sequence attends over, counted per sequence) / the time / the
device's copy bandwidth, which the script measures first (a device-to-device copy: read + write bytes / time). For
the batch runs it is over the whole run (prefill time included). For batch-1 greedy decode the roofline is copy
bandwidth / bytes per token, and the target is >= 80 % of it.

On CPU the number that matters is the ratio to transformers' `generate` run in the same process on the same weights
and the same workload (target >= 3x). On the GPU (bf16, 8B shape): >= 26k output tokens/s on an H100, >= 30k on an
H200, for 512 sequences x (128 -> 256 tokens) (`--prompts 64`); batch-1 MBU >= 80 % (BENCHMARKS.md, Targets).
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
from w2s.sampling import generate, make_engine

# Llama-architecture shapes: "small" is what 2 CPU cores can run in seconds; "8b" is Llama-3-8B.
SHAPES = {
    "small": dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64, hidden_dim=688, vocab_size=2048),
    "8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=14336, vocab_size=128256),
}
# CPU: the GPU default's per-prompt shape (256 prompts x 8 samples x 256 new tokens; the batch target itself is
# measured at --prompts 64) on 32 prompts, so that both sides finish in minutes on 2 cores.
WORKLOADS = {"cpu": dict(prompts=32, samples=8, new_tokens=256, prompt_len=128),
             "cuda": dict(prompts=256, samples=8, new_tokens=256, prompt_len=128)}
# --gsm8k: prompt lengths drawn uniformly from this range; EOS after a geometric number of tokens of this mean;
# new_tokens is the budget (a few sequences reach it).
GSM8K = dict(prompt_lens=(60, 200), mean_new=150, new_tokens=400)
BATCH_TARGETS = {"H200": 30000, "H100": 26000}  # output tok/s, 8B shape, 512 x (128 -> 256)
MBU_TARGET = 0.80  # batch-1 decode


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


def copy_bandwidth(device, nbytes=None, repeats=10):
    """Bytes/s of a device-to-device copy of nbytes (read + write both counted), median of `repeats`."""
    nbytes = nbytes or (2**30 if device.type == "cuda" else 2**28)
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(times)


def weight_bytes(model):
    """Bytes of the weights a decode step reads: all of them, except the input embedding table (a step gathers a
    few rows) when it is not also the output matrix."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.lm_head is not None:
        total -= model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    return total


def kv_bytes_per_position(model):
    cfg = model.cfg
    return cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * model.embed_tokens.weight.element_size()


def decode_kv_bytes(model, prompt_len, n_tokens):
    """Keys and values one sequence reads over its decode steps: the step that feeds generated token i (1-based)
    attends prompt_len + i positions, for i = 1 .. n_tokens - 1 (token 0 comes from the prefill)."""
    steps = max(n_tokens - 1, 0)
    return kv_bytes_per_position(model) * (steps * prompt_len + steps * (steps + 1) // 2)


def random_model(shape, dtype, device, seed=0, eos_ids=None):
    """A w2s Llama-shaped model with random weights; no EOS token (so nothing stops early) unless eos_ids."""
    cfg = ModelConfig(family="llama", max_seq_len=8192, eos_token_id=eos_ids, **SHAPES[shape])
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
    hf.generation_config.eos_token_id = model.cfg.eos_token_id  # None: every sequence generates the full budget
    return hf.eval()


def commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def steady_decode_step_ms(model, prompt, new_tokens, device, replays=100):
    """Batch-1 greedy decode step time once its CUDA graph exists: the step alone, without the prefill and the
    host's looks between steps that the end-to-end number includes."""
    engine = make_engine(model, None, prompt, max_new_tokens=new_tokens, cuda_graphs=True)
    for _ in engine.run():  # one full generation: captures the graphs (or finds them kept from earlier calls)
        pass
    limit = max(limit for limit, _, mixed in engine.graphs if not mixed)  # the longest attention span the run reached
    engine.step(limit)
    sync(device)
    start = time.perf_counter()
    for _ in range(replays):
        engine.step(limit)
    sync(device)
    return (time.perf_counter() - start) * 1e3 / replays


def profile_decode(model, prompts, device, what, new_tokens=64, **options):
    """Eager (no CUDA graph) decode of `prompts` (generate's options) under torch.profiler: the time and launches
    per decode step by group of kernels and the top kernels (w2s.profile.profile_summary), then the ops by input
    shape. The device time per step is what a graph replay of the step cannot go below; the prefill is included."""
    from torch.profiler import ProfilerActivity, profile

    from w2s.profile import profile_summary

    options = {**options, "max_new_tokens": new_tokens, "cuda_graphs": False}
    run = lambda: generate(model, None, prompts, progress=False, **options)  # noqa: E731
    run()  # warm-up: Triton compiles, allocator
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        start = time.perf_counter()
        run()
        sync(device)
        wall_s = time.perf_counter() - start
    print(f"\nprofile: eager {what}, {new_tokens} new tokens (prefill included)")
    print(profile_summary(prof, device, per=new_tokens, per_name="step", wall_s=wall_s))
    key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    by_shape = prof.key_averages(group_by_input_shape=True)  # the same ops per input shape (which matmul is slow)
    print(by_shape.table(sort_by=key, row_limit=12, max_name_column_width=30, max_shapes_column_width=60))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="model shape [default: small on CPU, 8b on CUDA]")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="[default: float32 on CPU, bf16 on CUDA]")
    parser.add_argument("--prompts", type=int, help="number of prompts [CPU 32, CUDA 256]")
    parser.add_argument("--samples", type=int, help="completions per prompt [8]")
    parser.add_argument("--new-tokens", type=int, help="tokens generated per completion [256; --gsm8k: at most 400]")
    parser.add_argument("--prompt-len", type=int, help="tokens per prompt [128; --gsm8k: 60-200]")
    parser.add_argument("--gsm8k", action="store_true",
                        help="GSM8K-like lengths: prompts of 60-200 tokens, EOS-terminated completions (mean ~150)")
    parser.add_argument("--shared-prefix", type=int, default=0,
                        help="tokens of a prefix common to every prompt, before its own --prompt-len tokens (the\n"
                             "ICL stage's 4 demonstrations; w2s prefills it once, transformers once per sequence)")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="nucleus sampling's top_p [1.0, the paper's: no sort]; below 1 every decode step sorts "
                             "each row's logits over the whole vocabulary")
    parser.add_argument("--max-batch", type=int, default=512, help="sequences decoded together (cache slots)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (the median is reported)")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers' generate (default on CUDA)")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly on CUDA")
    parser.add_argument("--prefill-chunk", type=int, default=0,
                        help="chunked prefill: prompt tokens per decode step for the prompts entering freed slots\n"
                             "(w2s/sampling.py; 0, the default, prefills them in a forward of their own)")
    parser.add_argument("--share-prompt-reads", action="store_true",
                        help="decode reads each prompt's keys from one of its samples' cache rows for all of them\n"
                             "(generate's share_prompt_reads)")
    parser.add_argument("--prompt-cascade", action="store_true",
                        help="decode reads each prompt's keys once for all its samples, then each sample's own\n"
                             "(generate's prompt_cascade: the per-prompt cascade, on the Triton path)")
    parser.add_argument("--no-compact", action="store_true",
                        help="keep a draining batch's samples in their slots (generate's compact=False)")
    parser.add_argument("--threads", type=int, help="torch CPU threads [default: torch's choice]")
    parser.add_argument("--batch1", action=argparse.BooleanOptionalAction, default=None,
                        help="also time batch-1 greedy decode [default: on CUDA only]")
    parser.add_argument("--profile", action="store_true",
                        help="also profile eager decode (torch.profiler), the batch workload's and batch-1's: the\n"
                             "kernels a decode step spends its device time in, and that time per step")
    return parser.parse_args()


def make_prompts(args, work, vocab):
    """[prompt ids (L,)]: work["prompt_len"] tokens each, or (--gsm8k) 60-200 tokens; after --shared-prefix ones."""
    g = torch.Generator().manual_seed(1)
    low, high = GSM8K["prompt_lens"] if args.gsm8k and not args.prompt_len else (work["prompt_len"],) * 2
    lengths = torch.randint(low, high + 1, (work["prompts"],), generator=g).tolist()
    prompts = [torch.randint(3, vocab, (n,), generator=g) for n in lengths]
    if args.shared_prefix:
        prefix = torch.randint(3, vocab, (args.shared_prefix,), generator=g)
        prompts = [torch.cat([prefix, p]) for p in prompts]
    return prompts


def eos_ids(vocab, mean_new):
    """A random set of about vocab / mean_new ids (never 0..2): with near-uniform draws, EOS after ~mean_new tokens."""
    g = torch.Generator().manual_seed(2)
    return sorted((3 + torch.randperm(vocab - 3, generator=g)[: max(1, round(vocab / mean_new))]).tolist())


def hf_runner(model, prompts, work, eos):
    """transformers' generate on the same workload (padded on the left when prompt lengths differ) -> a function
    returning the output tokens it generated (up to and including each row's first EOS)."""
    tmp = tempfile.TemporaryDirectory()
    hf = hf_twin(model, tmp.name)
    tmp.cleanup()
    rows = [p.tolist() for p in prompts]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    fixed = {} if eos else {"min_new_tokens": work["new_tokens"]}

    def run():
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=work["top_p"], top_k=0,
                              num_return_sequences=work["samples"], max_new_tokens=work["new_tokens"],
                              pad_token_id=0, **fixed)
        new = out[:, width:]
        if not eos:
            return new.numel()
        ends = torch.isin(new, torch.tensor(eos))
        first = torch.where(ends.any(1), ends.float().argmax(1) + 1, torch.full((new.shape[0],), new.shape[1]))
        return int(first.sum())

    return run


def run_w2s(model, prompts, options):
    """One w2s run of the workload -> (output tokens, decode steps, mixed steps, slots, rows run, KV bytes read,
    seconds of admission, (prefill forwards, their token rows, the prompt tokens in them)).

    Admission (the prefill forward of the sequences that enter free slots, between decode steps) is timed on the
    device (CUDA events, no extra sync) or the host clock on CPU: the share of the run that chunked prefill
    (--prefill-chunk) moves into the decode steps, where it shares their weight reads. With chunked prefill only the
    first admission is a forward of its own; mixed steps are the decode steps that carried prompt tokens."""
    engine = make_engine(model, None, prompts, **options)
    cuda = model.embed_tokens.weight.is_cuda
    spans, admit = [], engine.admit

    def timed_admit(items, free):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            admit(items, free)
            end.record()
            spans.append((start, end))
        else:
            t0 = time.perf_counter()
            admit(items, free)
            spans.append(time.perf_counter() - t0)

    engine.admit = timed_admit
    kv = 0
    for p, completions in engine.run():
        kv += sum(decode_kv_bytes(model, len(prompts[p]), c["num_tokens"]) for c in completions)
    if cuda:
        torch.cuda.synchronize()
        spans = [start.elapsed_time(end) / 1e3 for start, end in spans]
    prefill = (engine.prefill_forwards, engine.prefill_token_rows, engine.prefill_real_tokens)
    return engine.tokens_generated, engine.decode_steps, engine.mixed_steps, engine.slots, engine.decode_rows, kv, \
        sum(spans), prefill


def report_batch(model, prompts, work, options, bandwidth, device, repeats, hf_run):
    """Time the batch workload (alternating with transformers' run when given); print tok/s, ms/step, occupancy and
    MBU. -> w2s seconds."""
    stats = {}
    ours = lambda: stats.update(w2s=run_w2s(model, prompts, options))  # noqa: E731
    theirs = (lambda: stats.update(hf=hf_run())) if hf_run else None  # noqa: E731
    t_ours, *t_theirs = timed([ours] + ([theirs] if theirs else []), device, repeats)
    tokens, steps, mixed, slots, rows, kv, admit_s, (forwards, token_rows, real_tokens) = stats["w2s"]
    n_seq = len(prompts) * work["samples"]
    mbu = (steps * weight_bytes(model) + kv) / t_ours / bandwidth
    print(f"w2s generate          {tokens / t_ours:10.0f} output tok/s   {t_ours * 1e3 / steps:8.2f} ms/step   "
          f"({t_ours:.2f} s, median of {repeats}; MBU {100 * mbu:.1f}%)")
    print(f"  {tokens} tokens in {n_seq} sequences (mean {tokens / n_seq:.1f}), {steps} decode steps of {slots} "
          f"slots ({mixed} mixed): occupancy {100 * (tokens - n_seq) / (steps * slots):.1f}% of the slots, "
          f"{100 * (tokens - n_seq) / rows:.1f}% of the rows run ({rows / steps:.0f} a step); admission (prefill "
          f"forwards) {100 * admit_s / t_ours:.1f}% of the last run")
    print(f"  prefill: {forwards} forwards of {token_rows} token rows for {real_tokens} prompt tokens "
          f"({100 * (1 - real_tokens / max(token_rows, 1)):.1f}% padding)")
    if hf_run:
        t_hf = t_theirs[0]
        print(f"transformers generate {stats['hf'] / t_hf:10.0f} output tok/s   ({t_hf:.2f} s, median of {repeats}, "
              f"runs alternating with w2s's)")
        ratio = (tokens / t_ours) / (stats["hf"] / t_hf)
        print(f"speed-up over transformers: {ratio:.2f}x (target >= 3x: {'met' if ratio >= 3 else 'NOT met'})")
    return t_ours


def report_batch1(model, prompt, new_tokens, bandwidth, device, repeats, cuda_graphs):
    """Batch-1 greedy decode: end to end (generate) and, with CUDA graphs, the replayed step alone; tok/s and MBU
    against the bandwidth roofline."""
    per_token = weight_bytes(model) + decode_kv_bytes(model, len(prompt), new_tokens) / max(new_tokens - 1, 1)
    roofline = bandwidth / per_token
    t_one, = timed([lambda: generate(model, None, [prompt], max_new_tokens=new_tokens, progress=False,
                                     cuda_graphs=cuda_graphs)], device, repeats)
    print(f"batch-1 roofline      {roofline:10.0f} tok/s          ({per_token / 1e9:.2f} GB per token at "
          f"{bandwidth / 1e9:.0f} GB/s)")
    rows = [("w2s batch-1 decode", new_tokens / t_one, "end to end: generate, prefill included")]
    if device.type == "cuda" and cuda_graphs is not False:
        step_ms = steady_decode_step_ms(model, [prompt], new_tokens, device)
        rows.append(("  steady state", 1e3 / step_ms, "the replayed decode step alone"))
    for name, rate, what in rows:
        mbu = rate / roofline
        target = (f", target >= {100 * MBU_TARGET:.0f}%: {'met' if mbu >= MBU_TARGET else 'NOT met'}"
                  if device.type == "cuda" else "")
        print(f"{name:<22}{rate:10.0f} tok/s          {1e3 / rate:8.2f} ms/step   MBU {100 * mbu:.1f}%{target} "
              f"({what})")


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    kind = "cuda" if device.type == "cuda" else "cpu"
    work = {k: getattr(args, k) or v for k, v in WORKLOADS[kind].items()}
    if args.gsm8k:
        work["new_tokens"] = args.new_tokens or GSM8K["new_tokens"]
    shape = args.shape or ("8b" if kind == "cuda" else "small")
    dtype = getattr(torch, args.dtype or ("bfloat16" if kind == "cuda" else "float32"))
    vocab = SHAPES[shape]["vocab_size"]
    eos = eos_ids(vocab, GSM8K["mean_new"]) if args.gsm8k else None
    model = random_model(shape, dtype, device, eos_ids=eos)
    prompts = make_prompts(args, work, vocab)
    ids = [p.tolist() for p in prompts]
    work["top_p"] = args.top_p
    options = dict(n=work["samples"], temperature=1.0, top_p=args.top_p, max_new_tokens=work["new_tokens"],
                   max_batch=args.max_batch, cuda_graphs=False if args.no_cuda_graphs else None,
                   prefill_chunk=args.prefill_chunk, share_prompt_reads=args.share_prompt_reads,
                   compact=not args.no_compact, prompt_cascade=args.prompt_cascade)

    name = torch.cuda.get_device_name(device) if kind == "cuda" else "cpu"
    print(f"device {name} ({torch.get_num_threads()} threads), dtype {dtype}, torch {torch.__version__}, commit "
          f"{commit()}")
    print(f"model: Llama-shaped '{shape}' {SHAPES[shape]} ({model.cfg.n_params() / 1e6:.1f} M params, random)")
    lengths = f"prompt length {work['prompt_len']}" if not args.gsm8k or args.prompt_len else \
        f"prompt lengths {min(map(len, ids))}-{max(map(len, ids))}"
    ending = (f"EOS-terminated (mean ~{GSM8K['mean_new']}, {len(eos)} EOS ids) within {work['new_tokens']}"
              if args.gsm8k else f"x {work['new_tokens']}")
    print(f"workload: {work['prompts']} prompts x {work['samples']} samples {ending} new tokens, {lengths}"
          + (f" after a shared prefix of {args.shared_prefix}" if args.shared_prefix else "") +
          f", temperature 1.0, top_p {args.top_p}, max_batch {args.max_batch}, prefill_chunk {args.prefill_chunk}"
          + (", prompt keys read from one sample's row" if args.share_prompt_reads else "")
          + (", per-prompt cascade" if args.prompt_cascade else "")
          + (", no compaction" if args.no_compact else ""))
    bandwidth = copy_bandwidth(device)
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (device-to-device, read + write); weights read per decode step "
          f"{weight_bytes(model) / 1e9:.2f} GB, KV {kv_bytes_per_position(model) / 1e3:.1f} kB per position")
    hf_run = hf_runner(model, prompts, work, eos) if not args.no_hf and kind == "cpu" else None
    t_ours = report_batch(model, ids, work, options, bandwidth, device, args.repeats, hf_run)
    if kind == "cuda" and not args.gsm8k and args.top_p == 1.0:  # the target's workload
        n_tokens = len(ids) * work["samples"] * work["new_tokens"]
        target = next((t for key, t in BATCH_TARGETS.items() if key in name), BATCH_TARGETS["H100"])
        print(f"target ({name}, 8B shape, 512 x (128 -> 256)): >= {target} output tok/s: "
              f"{'met' if n_tokens / t_ours >= target else 'NOT met'}")
    if args.batch1 or (args.batch1 is None and kind == "cuda"):
        report_batch1(model, ids[0], work["new_tokens"], bandwidth, device, args.repeats, options["cuda_graphs"])
    if args.profile:  # the batch workload's decode step (32 steps of it), then batch-1 greedy decode's
        batch = {k: v for k, v in options.items() if k not in ("max_new_tokens", "cuda_graphs")}
        profile_decode(model, ids, device, f"batch decode ({len(ids)} x {work['samples']})", new_tokens=32, **batch)
        profile_decode(model, ids[:1], device, "batch-1 greedy decode")


if __name__ == "__main__":
    main()
