"""Kernel benchmarks: each Triton kernel against PyTorch eager, torch.compile and (attention) SDPA's flash backend
and FlashAttention itself where the environment has it (FA3's flash_attn_interface, else FA2's flash_attn).

    python -m w2s.kernels.bench                # everything, bf16, the shapes of BENCHMARKS.md's targets (needs CUDA)
    python -m w2s.kernels.bench --only attention --repeats 50
    python -m w2s.kernels.bench --help

For every kernel, shape and implementation it prints the median device time of --repeats runs (after --warmup runs
that are not counted; CUDA events around each run, the L2 cache flushed and the launches queued before each), the
achieved rate and the peak memory the call adds on top of its inputs. The rate is TFLOP/s for attention (matmul
FLOPs of the visible (query, key) pairs: 4*B*H*T*S*D forward, halved when causal; backward 2.5x the forward,
FlashAttention's convention) and effective GB/s for RMSNorm / RoPE / SwiGLU (the minimum bytes the op must move:
read inputs, write outputs, the same count for every implementation). The fused linear cross-entropy is compared
with the unfused path (logits materialized, then F.cross_entropy) by time and peak memory of forward + backward,
and the sampler's draw (`sample`: one token per row of a 512 x 128256 logits matrix) with the reference's torch chain.
The matrix-vector kernel (`matvec`: one activation row times each Llama-3-8B projection's weight, the batch-1 decode
step's matmuls) is compared with F.linear (cuBLAS) in GB/s of weight read, timed over calls on distinct weights back
to back (MATVEC_CHAIN) as in a decode step.
Each Triton row carries its BENCHMARKS.md target (the "current" column: compute targets as on an H100, bandwidth
targets 80 % of the device's copy bandwidth, which the script measures first) and whether it was met. The
matrix-vector rows carry none: their target is the batch-1 decode step's, in scripts/bench_sampling.py.

Beside `triton` (the launch tables as they are), the attention forward prints `triton-pointers` (the table tiles
with plain pointer loads), `triton-tma` (the table tiles through TMA descriptors), `triton-persist` (the same,
walked by one program per SM) and `triton-deferred` (each key block's P V product issued one block late): the
attention forward's Hopper options, on in a table only where these rows measured them faster. Their compiles run
first in --compile-workers processes at once (compile_workers.py), so that the timed run loads them from Triton's
cache.

The attention kernel's contract is causal by position (reference.py); the non-causal rows place every
query at the last key position (q_positions = S - 1), which makes every key visible (tests/test_kernel_attention.py
checks this against SDPA). In the backward that takes the explicit-positions path, which masks every tile.

Without CUDA there is nothing to time: the script says so and, unless --no-smoke, runs a small correctness smoke
check of every kernel under Triton's CPU interpreter (TRITON_INTERPRET=1) against reference.py, printing
the max error of each output and gradient (the numbers recorded in BENCHMARKS.md).
"""

import argparse
import functools
import math
import os
import statistics
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the smoke check runs the kernels on CPU; set before triton loads

import torch.nn.functional as F  # noqa: E402

from w2s.kernels import (  # noqa: E402
    attention,
    compile_workers,
    fused_linear,
    glu,
    matvec,
    reference,
    rms_norm,
    rope,
    sample,
)
from w2s.kernels.attention_common import launch_changes  # noqa: E402

KERNELS = ("attention", "rms_norm", "rope", "swiglu", "fused_ce", "sample", "matvec")

# The current targets of BENCHMARKS.md ("Targets"), bf16: compute as on an H100 80GB SXM (an H200 has the same);
# the memory-bound kernels' target is a share of the copy bandwidth measured on the device at hand.
TARGET_ATTN_FWD_TFLOPS = {False: 600.0, True: 550.0}  # keyed by causal
TARGET_ATTN_BWD_TFLOPS = {False: 480.0, True: 440.0}
TARGET_ELEMENTWISE_SHARE_OF_COPY = 0.80
TARGET_CE_MEMORY_RATIO = 1 / 8
TARGET_CE_TIME_RATIO = 1.0

DEVICE = "cuda"  # one name for where the benchmark tensors live
SPIN_CYCLES = 2_000_000  # ~1 ms of GPU clock (H100 SMs run at up to 1.98 GHz): longer than any op's host-side launch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ----------------------------------------------------------------------------------------------------------------
# measuring
# ----------------------------------------------------------------------------------------------------------------


def median_ms(fn, warmup, repeats):
    """Median device time of fn() in milliseconds: warm-up runs discarded, CUDA events around each run.

    Before each run the GPU spins for ~1 ms (torch.cuda._sleep) while the host queues the L2 flush, the events and
    fn's launches behind it, so the time between the events is the device's, not the host's: without it a short
    kernel reached through autograd (the RoPE / RMSNorm backward) measures the host's launch time (BENCHMARKS.md).
    A training step, where the host runs ahead of the GPU, sees the device time.
    """
    for _ in range(warmup):
        fn()
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")  # larger than any L2: every run reads HBM
    events = []
    for _ in range(repeats):
        torch.cuda._sleep(SPIN_CYCLES)
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def peak_extra_mib(fn):
    """Peak memory fn() allocates on top of what already exists (its inputs), including what it returns."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del result
    return peak / 2**20


def measure(fn, args):
    """{'ms', 'mib'} for one implementation, or {'error'} when it cannot run here (missing backend, OOM)."""
    try:
        ms = median_ms(fn, args.warmup, args.repeats)
        return dict(ms=ms, mib=peak_extra_mib(fn))
    except Exception as e:  # report and go on: one unavailable baseline must not hide the others
        torch.cuda.empty_cache()
        return dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}")


# ----------------------------------------------------------------------------------------------------------------
# printing
# ----------------------------------------------------------------------------------------------------------------

HEADER = f"{'kernel':<24} {'shape':<34} {'implementation':<16} {'median ms':>10} {'rate':>14} {'peak MiB':>10}  target"


def print_row(kernel, shape, impl, result, rate_fn, unit, target=None):
    """One table line; rate_fn(ms) -> rate in `unit`; target = (value, '>=' or '<=') checked on the rate."""
    if "error" in result:
        print(f"{kernel:<24} {shape:<34} {impl:<16} {'n/a':>10} {'':>14} {'':>10}  {result['error']}")
        return
    rate = rate_fn(result["ms"])
    note = ""
    if target is not None:
        value, op = target
        met = rate >= value if op == ">=" else rate <= value
        note = f"{op} {value:g} {unit} ({'met' if met else 'MISSED'})"
    print(f"{kernel:<24} {shape:<34} {impl:<16} {result['ms']:>10.3f} {rate:>9.1f} {unit:<4} "
          f"{result['mib']:>10.0f}  {note}")


# ----------------------------------------------------------------------------------------------------------------
# the benchmarks
# ----------------------------------------------------------------------------------------------------------------


def bench_attention(args, dtype):
    B, T, H, D = args.attn_batch, args.seq_len, args.attn_heads, args.head_dim
    shape = f"B{B} T{T} H{H} D{D}"
    q, k, v = (torch.randn(B, T, H, D, device=DEVICE, dtype=dtype) for _ in range(3))
    q_bhtd, k_bhtd, v_bhtd = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # SDPA's layout, not timed
    last = torch.full((B, T), T - 1, device=DEVICE, dtype=torch.int32)  # every query sees every key: non-causal

    def ours(causal):
        positions = None if causal else last
        return lambda q, k, v: attention.attention(q, k, v, q_positions=positions)

    def with_launch_changes(changes, fn):  # fn with [(launch table, Launch fields to change)] in the tables
        def run(*inputs):
            with launch_changes(changes, D):
                return fn(*inputs)
        return run

    def ours_with(causal, **options):  # the forward with Launch options (attention.py), table tiles
        return with_launch_changes([(attention._GPU_FWD, options)], ours(causal))

    def eager(causal):
        positions = None if causal else last
        return lambda q, k, v: reference.attention(q, k, v, q_positions=positions)

    def sdpa(causal):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def run(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return run

    flash_attn = flash_attention_impl()
    for causal in (True, False):
        fwd_flops = 4 * B * H * T * T * D / (2 if causal else 1)
        impls = [("triton", ours(causal), (q, k, v)), ("sdpa-flash", sdpa(causal), (q_bhtd, k_bhtd, v_bhtd))]
        if flash_attn is not None:  # (B, T, H, D), our layout
            name, fn = flash_attn
            impls.append((name, lambda q, k, v, causal=causal: fn(q, k, v, causal), (q, k, v)))
        if not args.no_eager:
            impls.append(("eager", eager(causal), (q, k, v)))
        if not args.no_compile:
            impls.append(("torch.compile", torch.compile(eager(causal)), (q, k, v)))
        label = "causal" if causal else "non-causal"
        # the forward's Hopper options, forward only: tiles through TMA, those walked by one program per SM, and each
        # key block's P V product issued one block late (the softmax beside the tensor cores' work)
        variants = [("triton-pointers", ours_with(causal, tma=False), (q, k, v)),
                    ("triton-tma", ours_with(causal, tma=True), (q, k, v)),
                    ("triton-persist", ours_with(causal, tma=True, programs_per_sm=1), (q, k, v)),
                    ("triton-deferred", ours_with(causal, deferred_pv=True), (q, k, v))]
        if compile_workers.SHARD is not None:  # a compile worker: its share of the Triton rows, each run once
            _compile_attention_share(impls[:1] + variants)
            continue
        for impl, fn, inputs in impls[:1] + variants + impls[1:]:
            with torch.no_grad():
                result = measure(lambda: fn(*inputs), args)
            target = (TARGET_ATTN_FWD_TFLOPS[causal], ">=") if impl.startswith("triton") else None
            print_row(f"attention fwd {label}", shape, impl, result, lambda ms: fwd_flops / ms / 1e9, "TF/s", target)
        for impl, fn, inputs in impls:
            leaves = [x.detach().requires_grad_(True) for x in inputs]
            try:
                out = fn(*leaves)
                grad_out = torch.randn_like(out)
                result = measure(lambda: torch.autograd.grad(out, leaves, grad_out, retain_graph=True), args)
            except Exception as e:
                result = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}")
            target = (TARGET_ATTN_BWD_TFLOPS[causal], ">=") if impl.startswith("triton") else None
            print_row(f"attention bwd {label}", shape, impl, result, lambda ms: 2.5 * fwd_flops / ms / 1e9, "TF/s",
                      target)
            out = None
            torch.cuda.empty_cache()


def _compile_attention_share(rows):
    """A compile worker's share of bench_attention's Triton rows [(impl, fn, inputs)]: each forward run once as it is
    timed (no autograd), then the first row's forward and backward as its backward row runs them."""
    def forward(fn, inputs):
        with torch.no_grad():
            fn(*inputs)

    def forward_and_backward(fn, inputs):
        leaves = [x.detach().requires_grad_(True) for x in inputs]
        out = fn(*leaves)
        torch.autograd.grad(out, leaves, torch.randn_like(out))

    compile_workers.run_share([functools.partial(forward, fn, inputs) for _, fn, inputs in rows]
                              + [functools.partial(forward_and_backward, rows[0][1], rows[0][2])])


def flash_attention_impl():
    """("fa3" | "fa2", fn(q, k, v, causal) -> out) from the FlashAttention package the environment has, or None.
    FA3 (the Hopper build, module flash_attn_interface) returns (out, lse) in some versions: the output is kept."""
    import importlib

    for name, module in (("fa3", "flash_attn_interface"), ("fa2", "flash_attn")):
        try:
            func = importlib.import_module(module).flash_attn_func
        except (ImportError, AttributeError):
            continue

        def run(q, k, v, causal, func=func):
            out = func(q, k, v, causal=causal)
            return out[0] if isinstance(out, tuple) else out
        return name, run
    return None


def copy_gbps(args):
    """The device's copy bandwidth in GB/s: read + write bytes of a 1 GiB device-to-device copy / its median time."""
    src = torch.ones(2**30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), args.warmup, args.repeats)
    return 2 * src.numel() / ms / 1e6


def bench_elementwise(args, name, shape, make_inputs, kernel_fn, reference_fn, fwd_bytes, bwd_bytes):
    """Forward and backward of a memory-bound op: Triton vs eager vs torch.compile, in effective GB/s."""
    inputs = make_inputs()
    impls = [("triton", kernel_fn), ("eager", reference_fn)]
    if not args.no_compile:
        impls.append(("torch.compile", torch.compile(reference_fn)))
    target = (round(TARGET_ELEMENTWISE_SHARE_OF_COPY * args.copy_gbps), ">=")
    for impl, fn in impls:
        with torch.no_grad():
            result = measure(lambda: fn(*inputs), args)
        print_row(f"{name} fwd", shape, impl, result, lambda ms: fwd_bytes / ms / 1e6, "GB/s",
                  target if impl == "triton" else None)
    for impl, fn in impls:
        leaves = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]
        out = fn(*leaves)
        grad_out = torch.randn_like(out)
        wrt = [x for x in leaves if x.requires_grad]
        result = measure(lambda: torch.autograd.grad(out, wrt, grad_out, retain_graph=True), args)
        print_row(f"{name} bwd", shape, impl, result, lambda ms: bwd_bytes / ms / 1e6, "GB/s",
                  target if impl == "triton" else None)
        out = None
    torch.cuda.empty_cache()


def bench_rms_norm(args, dtype):
    M, D = args.tokens, args.dim
    elem = torch.finfo(dtype).bits // 8
    bench_elementwise(
        args, "rms_norm", f"({M}, {D})",
        lambda: (torch.randn(M, D, device=DEVICE, dtype=dtype), torch.rand(D, device=DEVICE, dtype=dtype) + 0.5),
        lambda x, w: rms_norm.rms_norm(x, w, 1e-5), lambda x, w: reference.rms_norm(x, w, 1e-5),
        fwd_bytes=2 * M * D * elem,  # read x, write y (the weight is one row)
        bwd_bytes=3 * M * D * elem)  # read dy, x; write dx


def bench_rope(args, dtype):
    B, T, H, D = args.tokens // args.seq_len, args.seq_len, args.heads, args.head_dim
    elem = torch.finfo(dtype).bits // 8
    positions = torch.arange(T, device=DEVICE).expand(B, T)
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, D, 2, device=DEVICE, dtype=torch.float32) / D)
    bench_elementwise(
        args, "rope", f"({B}, {T}, {H}, {D})", lambda: (torch.randn(B, T, H, D, device=DEVICE, dtype=dtype),),
        lambda x: rope.rope(x, positions, inv_freq), lambda x: reference.rope(x, positions, inv_freq),
        fwd_bytes=2 * B * T * H * D * elem,  # read x, write y
        bwd_bytes=2 * B * T * H * D * elem)  # read dy, write dx


def bench_swiglu(args, dtype):
    M, Fdim = args.tokens, args.ffn_dim
    elem = torch.finfo(dtype).bits // 8
    bench_elementwise(
        args, "swiglu", f"({M}, {Fdim})",
        lambda: (torch.randn(M, Fdim, device=DEVICE, dtype=dtype), torch.randn(M, Fdim, device=DEVICE, dtype=dtype)),
        glu.swiglu, reference.swiglu,
        fwd_bytes=3 * M * Fdim * elem,  # read gate, up; write out
        bwd_bytes=5 * M * Fdim * elem)  # read dout, gate, up; write dgate, dup


def bench_sample(args, dtype):
    """One token drawn per row from a 512-slot decode step's logits (Llama-3 vocabulary) at temperature 1: the one
    kernel against the reference's torch chain (fp32 copy, softmax, cumulative sum, search), which the sampler ran
    before. GB/s: the logits read once, the least any draw must move."""
    B, V = 512, 128256
    logits, uniforms = torch.randn(B, V, device=DEVICE, dtype=dtype) * 4, torch.rand(B, device=DEVICE)
    elem = torch.finfo(dtype).bits // 8
    for impl, fn in (("triton", sample.sample_inverse_cdf), ("eager", reference.sample_inverse_cdf)):
        result = measure(lambda: fn(logits, uniforms, 1.0), args)
        print_row("sample", f"({B}, {V})", impl, result, lambda ms: B * V * elem / ms / 1e6, "GB/s")


# Llama-3-8B's one-row projections (N, K): a batch-1 decode step's matmuls
MATVEC_SHAPES = {"q/k/v fused": (6144, 4096), "o": (4096, 4096), "gate/up fused": (28672, 4096),
                 "down": (4096, 14336), "lm_head": (128256, 4096)}
# Each timed run calls the product on this many distinct weights back to back, as a decode step's layers follow each
# other, and the time per call is the run's over this count: a lone launch of a few microseconds would also carry the
# whole cost of starting up after the L2 flush (writing its dirty lines back), which no decode step pays.
MATVEC_CHAIN = 8


def bench_matvec(args, dtype):
    """One activation row times each 8B weight: the Triton matrix-vector kernel against F.linear (cuBLAS), each over
    MATVEC_CHAIN weights in a row. GB/s: the weight's bytes over the time per call (what a one-row product must
    read), beside the copy bandwidth the bench prints first."""
    elem = torch.finfo(dtype).bits // 8
    for name, (N, K) in MATVEC_SHAPES.items():
        x = torch.randn(1, K, device=DEVICE, dtype=dtype)
        weights = [(torch.randn(N, K, device=DEVICE) / math.sqrt(K)).to(dtype) for _ in range(MATVEC_CHAIN)]
        for impl, fn in (("triton", matvec.matvec), ("F.linear", F.linear)):
            with torch.no_grad():
                result = measure(lambda: [fn(x, w) for w in weights], args)
            if "ms" in result:
                result["ms"] /= MATVEC_CHAIN
            print_row(f"matvec {name}", f"(1, {K}) @ ({N}, {K})^T", impl, result, lambda ms: N * K * elem / ms / 1e6,
                      "GB/s")
        torch.cuda.empty_cache()


def bench_fused_ce(args, dtype):
    N, D, V = args.ce_tokens, args.ce_dim, args.vocab
    shape = f"N{N} D{D} V{V}"
    hidden = torch.randn(N, D, device=DEVICE, dtype=dtype)
    weight = (torch.randn(V, D, device=DEVICE) / math.sqrt(D)).to(dtype)
    targets = torch.randint(0, V, (N,), device=DEVICE)
    targets[::10] = -100  # prompt tokens

    def step(loss_fn):
        def run():
            h, w = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
            loss_sum, _ = loss_fn(h, w, targets)
            return torch.autograd.grad(loss_sum, (h, w))
        return run

    impls = [("triton fused", step(fused_linear.linear_cross_entropy)),
             ("eager unfused", step(reference.linear_cross_entropy))]
    if not args.no_compile:
        impls.append(("compile unfused", step(torch.compile(reference.linear_cross_entropy))))
    results = {impl: measure(fn, args) for impl, fn in impls}
    flops = 3 * 2 * N * D * V  # logits, d hidden, d weight: three (N, D, V) matmuls
    for impl, _ in impls:
        print_row("fused_ce fwd+bwd", shape, impl, results[impl], lambda ms: flops / ms / 1e9, "TF/s")
    fused, unfused = results["triton fused"], results["eager unfused"]
    if "error" in fused or "error" in unfused:
        print("fused_ce: ratios unavailable (a run failed above)")
        return
    memory_ratio, time_ratio = fused["mib"] / unfused["mib"], fused["ms"] / unfused["ms"]
    print(f"fused_ce vs eager unfused: peak memory {memory_ratio:.3f}x (target <= {TARGET_CE_MEMORY_RATIO:.3f}: "
          f"{'met' if memory_ratio <= TARGET_CE_MEMORY_RATIO else 'MISSED'}), time {time_ratio:.2f}x (target <= "
          f"{TARGET_CE_TIME_RATIO}: {'met' if time_ratio <= TARGET_CE_TIME_RATIO else 'MISSED'})")


# ----------------------------------------------------------------------------------------------------------------
# CPU: interpreter smoke check
# ----------------------------------------------------------------------------------------------------------------


def _outputs_and_grads(fn, inputs, dtype):
    """fn's output and the gradient of every floating input, for a fixed random upstream gradient; a forward-only fn
    (its output needs no gradient): the output alone."""
    leaves = [x.to(dtype).detach().requires_grad_(True) if x.is_floating_point() else x for x in inputs]
    out = fn(*leaves)
    if not out.requires_grad:
        return [out.detach()]
    gen = torch.Generator().manual_seed(1)
    out.backward(torch.randn(out.shape, generator=gen).to(out.dtype))
    return [out.detach()] + [x.grad for x in leaves if x.is_floating_point()]


def smoke_cases():
    """(name, kernel fn, reference fn, inputs, output names): tiny odd shapes through every kernel and gradient."""
    g = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    B, T, H, K, D = 2, 33, 4, 2, 32
    kv_lengths = torch.tensor([33, 20])
    attn_opts = dict(kv_lengths=kv_lengths, sliding_window=9, softcap=5.0)
    positions = torch.randint(0, 9000, (2, 5), generator=g)
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, 48, 2, dtype=torch.float32) / 48)
    targets = torch.randint(0, 131, (37,), generator=g)
    targets[::4] = -100
    last = torch.full((1, 19), 18)  # every query at the last key position: non-causal, as the GPU rows measure
    wide = dict(kv_lengths=torch.tensor([15]), sliding_window=8)
    return [
        ("attention B1 T19 H2 K1 D128 non-causal", lambda q, k, v: attention.attention(q, k, v, q_positions=last),
         lambda q, k, v: reference.attention(q, k, v, q_positions=last),
         [randn(1, 19, 2, 128), randn(1, 19, 1, 128), randn(1, 19, 1, 128)], ["out", "dq", "dk", "dv"]),
        ("attention B1 T19 H2 K1 D256 pad+window8", lambda q, k, v: attention.attention(q, k, v, **wide),
         lambda q, k, v: reference.attention(q, k, v, **wide),
         [randn(1, 19, 2, 256), randn(1, 19, 1, 256), randn(1, 19, 1, 256)], ["out", "dq", "dk", "dv"]),
        (f"attention B{B} T{T} H{H} K{K} D{D} causal", attention.attention, reference.attention,
         [randn(B, T, H, D), randn(B, T, K, D), randn(B, T, K, D)], ["out", "dq", "dk", "dv"]),
        (f"attention B{B} T{T} H{H} K{K} D{D} pad+window9+softcap5",
         lambda q, k, v: attention.attention(q, k, v, **attn_opts),
         lambda q, k, v: reference.attention(q, k, v, **attn_opts),
         [randn(B, T, H, D), randn(B, T, K, D), randn(B, T, K, D)], ["out", "dq", "dk", "dv"]),
        ("rms_norm (7, 80)", lambda x, w: rms_norm.rms_norm(x, w, 1e-6),
         lambda x, w: reference.rms_norm(x, w, 1e-6), [randn(7, 80) * 3, randn(80) * 0.5 + 1], ["y", "dx", "dw"]),
        ("rms_norm (7, 80) gemma (1+w)", lambda x, w: rms_norm.rms_norm(x, w, 1e-6, unit_offset=True),
         lambda x, w: reference.rms_norm(x, w, 1e-6, unit_offset=True), [randn(7, 80) * 3, randn(80) * 0.5],
         ["y", "dx", "dw"]),
        ("rope (2, 5, 3, 48)", lambda x: rope.rope(x, positions, inv_freq),
         lambda x: reference.rope(x, positions, inv_freq), [randn(2, 5, 3, 48)], ["y", "dx"]),
        ("swiglu (3, 7, 80)", glu.swiglu, reference.swiglu, [randn(3, 7, 80) * 4, randn(3, 7, 80)],
         ["out", "dgate", "dup"]),
        ("geglu (3, 7, 80)", glu.geglu, reference.geglu, [randn(3, 7, 80) * 4, randn(3, 7, 80)],
         ["out", "dgate", "dup"]),
        ("linear_cross_entropy N37 D48 V131 softcap3",
         lambda h, w: fused_linear.linear_cross_entropy(h, w, targets, softcap=3.0)[0],
         lambda h, w: reference.linear_cross_entropy(h, w, targets, softcap=3.0)[0],
         [randn(37, 48), randn(131, 48) * (8 / math.sqrt(48))], ["loss", "dhidden", "dweight"]),
        ("linear_logprobs N37 D48 V131", lambda h, w: fused_linear.linear_logprobs(h, w, targets),
         lambda h, w: reference.linear_logprobs(h, w, targets),
         [randn(37, 48), randn(131, 48) * (8 / math.sqrt(48))], ["logprobs", "dhidden", "dweight"]),
        # forward only: the batch-1 projections, against torch's matmuls (detached: no gradients to compare)
        ("matvec (1, 53) @ (37, 53)^T + bias", matvec.matvec, lambda x, w, b: F.linear(x, w, b).detach(),
         [randn(1, 53), randn(37, 53), randn(37)], ["y"]),
        ("matvec (1, 64) @ (40, 64)^T into a residual",  # into a copy: the inputs are shared between runs
         lambda x, w, r: matvec.matvec(x, w, accumulate_into=r.detach().clone()),
         lambda x, w, r: torch.addmm(r, x, w.t()).detach(), [randn(1, 64), randn(40, 64), randn(1, 40)], ["y"]),
    ]


def smoke_check():
    """Every kernel in fp32 and fp16 under the interpreter vs the reference. Returns True when all pass.

    fp32 passes at max |error| <= 1e-4 * max(1, max |reference|). fp16 compares both the kernel and the reference
    run in fp16 against the reference in fp32 on the same rounded inputs: the kernel passes when its error is at
    most twice the fp16 reference's own error plus one fp16 ulp of the largest value (as tests/test_kernels.py).
    """
    ok = True
    print(f"{'case':<48} {'dtype':<8} max |error| per output (rel. to max |ref|)")
    for name, kernel_fn, reference_fn, inputs, names in smoke_cases():
        for dtype in (torch.float32, torch.float16):
            got = _outputs_and_grads(kernel_fn, inputs, dtype)
            exact = _outputs_and_grads(reference_fn, [x.to(dtype).float() if x.is_floating_point() else x
                                                      for x in inputs], torch.float32)
            low = _outputs_and_grads(reference_fn, inputs, dtype) if dtype == torch.float16 else None
            parts = []
            for i, label in enumerate(names):
                scale = exact[i].abs().max().item()
                err = (got[i].float() - exact[i]).abs().max().item()
                if low is None:
                    allowed = 1e-4 * max(1.0, scale)
                else:
                    allowed = 2 * (low[i].float() - exact[i]).abs().max().item() + 2**-10 * scale
                passed = err <= allowed
                ok &= passed
                parts.append(f"{label} {err:.1e} ({err / max(scale, 1e-30):.0e}){'' if passed else ' FAIL'}")
            print(f"{name:<48} {str(dtype).removeprefix('torch.'):<8} " + ", ".join(parts))
    return ok


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m w2s.kernels.bench",
        description="Time the Triton kernels against PyTorch eager, torch.compile and SDPA (flash) on a CUDA GPU: "
                    "median ms, TFLOP/s or effective GB/s, peak extra memory, next to the BENCHMARKS.md targets. "
                    "Without CUDA: a CPU-interpreter correctness smoke check instead.")
    p.add_argument("--only", default=",".join(KERNELS),
                   help=f"comma-separated subset of {','.join(KERNELS)} (default: all)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="activation dtype (default bf16)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs before measuring (compilation, caches)")
    p.add_argument("--repeats", type=int, default=20, help="timed runs; the median is reported")
    p.add_argument("--seq-len", type=int, default=4096, help="attention / RoPE sequence length T")
    p.add_argument("--attn-batch", type=int, default=4, help="attention batch size B")
    p.add_argument("--attn-heads", type=int, default=16, help="attention heads (16 x 128 = model dim 2048)")
    p.add_argument("--head-dim", type=int, default=128, help="attention / RoPE head dim")
    p.add_argument("--tokens", type=int, default=16384, help="tokens (rows) for RMSNorm / RoPE / SwiGLU")
    p.add_argument("--dim", type=int, default=4096, help="RMSNorm hidden size (Llama-3-8B: 4096)")
    p.add_argument("--heads", type=int, default=32, help="RoPE heads (Llama-3-8B queries: 32)")
    p.add_argument("--ffn-dim", type=int, default=14336, help="SwiGLU intermediate size (Llama-3-8B: 14336)")
    p.add_argument("--ce-tokens", type=int, default=8192, help="fused CE tokens N")
    p.add_argument("--ce-dim", type=int, default=4096, help="fused CE hidden size D")
    p.add_argument("--vocab", type=int, default=256000, help="fused CE vocabulary V (Gemma: 256000)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument("--no-eager", action="store_true", help="skip eager attention (it materializes (B, H, T, T))")
    p.add_argument("--no-smoke", action="store_true", help="without CUDA: skip the interpreter smoke check")
    compile_workers.add_arguments(p)
    args = p.parse_args(argv)
    args.only = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = [k for k in args.only if k not in KERNELS]
    if unknown:
        p.error(f"--only: unknown kernel(s) {', '.join(unknown)}; expected some of {', '.join(KERNELS)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("w2s.kernels.bench: the Triton benchmark needs a CUDA GPU and none is visible; no timings measured. "
              "Run `python -m w2s.kernels.bench` (or `make bench-kernels`) on a GPU node.")
        if args.no_smoke:
            return 0
        print("Running the CPU-interpreter correctness smoke check instead (TRITON_INTERPRET=1, vs "
              "w2s/kernels/reference.py):\n")
        ok = smoke_check()
        print("\nsmoke check: " + ("all passed" if ok else "FAILED"))
        return 0 if ok else 1
    dtype = DTYPES[args.dtype]
    compile_workers.start(args)
    if compile_workers.SHARD is not None:  # a compile worker: only the attention rows have kernels worth sharing out
        torch.manual_seed(0)
        bench_attention(args, dtype)
        return 0
    if args.compile_workers > 1 and "attention" in args.only:  # before anything is timed: the GPU to itself after
        argv = sys.argv[1:] if argv is None else list(argv)
        compile_workers.compile_in_workers("w2s.kernels.bench", argv + ["--only", "attention"], args.compile_workers,
                                           "attention's Triton launches")
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, torch {torch.__version__}, dtype {args.dtype}, warmup {args.warmup}, "
          f"median of {args.repeats}")
    args.copy_gbps = copy_gbps(args)
    print(f"copy bandwidth {args.copy_gbps:.0f} GB/s (device-to-device, read + write): the memory-bound kernels' "
          f"target is {100 * TARGET_ELEMENTWISE_SHARE_OF_COPY:.0f} % of it")
    print(HEADER)
    benches = dict(attention=bench_attention, rms_norm=bench_rms_norm, rope=bench_rope, swiglu=bench_swiglu,
                   fused_ce=bench_fused_ce, sample=bench_sample, matvec=bench_matvec)
    for name in args.only:
        torch.manual_seed(0)
        benches[name](args, dtype)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
