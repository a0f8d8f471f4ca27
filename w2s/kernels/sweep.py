"""Launch-config sweep on a GPU: which tile sizes, warps, pipeline depths, tile loads (through TMA or pointers),
(forward) persistent programs or the P V product deferred and (backward) dq summed by the dk/dv kernel's atomic adds
to put in the fixed tables of attention.py (_GPU_FWD), attention_backward.py (_GPU_BWD_DKDV, _GPU_BWD_DQ),
rms_norm.py (BWD_PROGRAMS_PER_SM, BWD_NUM_WARPS) and matvec.py (GPU_LAUNCH). Run it on new hardware, copy the fastest
rows into the tables, and record the table it printed.

    python -m w2s.kernels.sweep                      # needs CUDA; most of its time is Triton compiles
    python -m w2s.kernels.sweep --only attention256,forward256
    python -m w2s.kernels.sweep --only tiles256      # D = 256's tiles alone (pointer loads), forward and backward
    python -m w2s.kernels.sweep --only attention64,forward64     # the Llama-3.2-1B training shape's attention
    python -m w2s.kernels.sweep --only rms_norm
    python -m w2s.kernels.sweep --only dkdv128       # dk/dv at D = 128: the table's tile with 8 warps
    python -m w2s.kernels.sweep --only deferred128   # the forward at D = 128, the table's launch against the
                                                     # deferred P V product at three tiles, causal and not
    python -m w2s.kernels.sweep --only decode128     # the decode kernel at the batch-sampling shape, and a
                                                     # per-prompt cascade beside it
    python -m w2s.kernels.sweep --only matvec        # the batch-1 projections at the Llama-3-8B shapes, best per shape

Before each part is timed, its candidates are compiled by several processes at once (--compile-workers, default up
to 8; compile_workers.py): each runs its share of the candidates once, and the timing pass loads them from Triton's
cache.

For each backward candidate it times the whole backward (bench.py's median_ms: device time, L2 flushed) with the
other kernel at its table config (a dk/dv candidate with atomic dq runs alone), and checks the gradients against the
table config's on the same inputs (max |diff| / max |ref|; tiles only change the summation order, so bf16 stays near
1e-3); forward candidates the same with the output. After each list it names the fastest candidate whose outputs
agree (under AGREES) and how much faster than the table's it is. A candidate that does not compile (shared memory,
registers) prints its error and the sweep goes on. No tables are changed by running it. Every candidate compiles for
sm_90a within the shared-memory limit (`make check-sm90`, whose `sweep` part compiles them all without a GPU).
"""

import argparse
import functools
import math
import sys

import torch

from w2s.kernels import attention, attention_backward, compile_workers, decode_attention, matvec, rms_norm
from w2s.kernels.attention_common import Launch, launch_changes

# (BLOCK_M queries, BLOCK_N keys, num_warps, num_stages) per head dim; the first of each list is the current table
# entry's tiles (attention.py), the rest what the sweep tries against it.
_DKDV_TILES = {
    128: [(64, 64, 4, 2), (32, 128, 8, 2), (64, 128, 8, 2), (32, 128, 8, 3), (32, 128, 4, 3), (32, 64, 4, 3),
          (64, 64, 8, 2), (64, 64, 8, 3), (128, 64, 8, 2)],
    64: [(32, 128, 4, 3), (64, 128, 4, 3), (32, 128, 8, 3), (64, 128, 8, 2), (64, 64, 4, 3), (32, 64, 4, 3)],
}
# dk/dv at D = 128: the table's (64, 64) tile and the last three above, with 8 warps. The table's 4 warps hold two
# (64, 128) fp32 accumulators in 255 registers a thread and spill (Nsight Compute, BENCHMARKS.md); 8 warps halve that.
_DKDV_8_WARPS_128 = _DKDV_TILES[128][:1] + _DKDV_TILES[128][-3:]
_DQ_TILES = {
    128: [(64, 64, 4, 2), (128, 32, 8, 2), (128, 64, 8, 2), (128, 32, 8, 3), (128, 32, 4, 3), (64, 32, 4, 3)],
    64: [(64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 4, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 32, 4, 3)],
}
# D = 256 (Gemma, Gemma-2): (M, 256) and (N, 256) tiles fill shared memory twice as fast as at D = 128, so smaller
# tiles and shallower pipelines than there; the first entry is the (unswept) table config.
_DKDV_TILES[256] = [(32, 64, 8, 1), (32, 64, 4, 2), (64, 64, 8, 1), (32, 32, 4, 2), (16, 64, 4, 2), (64, 32, 8, 1)]
_DQ_TILES[256] = [(64, 32, 8, 1), (64, 32, 4, 2), (64, 64, 8, 1), (32, 32, 4, 2), (32, 64, 4, 2), (128, 32, 8, 1)]
# Forward: at D = 128 wider key tiles and deeper pipelines (the FA3-class target); at D = 64 (the Llama-3.2-1B
# training shape) the same with half the bytes per row, so wider tiles fit; at D = 256 the same trade as the backward.
_FWD_TILES = {
    64: [(128, 64, 4, 3), (128, 128, 8, 3), (128, 128, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 4)],
    128: [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (64, 128, 4, 3), (128, 32, 8, 4), (128, 64, 8, 4)],
    256: [(64, 64, 8, 2), (64, 32, 4, 3), (64, 64, 4, 2), (128, 32, 8, 2), (128, 64, 8, 1), (32, 64, 4, 3)],
}


# The decode kernel at D = 128: (keys per tile, warps, pipeline stages); the first is the table's (decode_attention.py's
# GPU_DECODE). Wider tiles and deeper pipelines keep more of the cache's bytes in flight per program.
DECODE_CANDIDATES = {128: [(64, 4, 2), (32, 4, 2), (32, 4, 3), (64, 4, 3), (64, 4, 4), (64, 8, 2), (64, 8, 3),
                           (128, 4, 2), (128, 8, 2), (128, 8, 3)]}
# bench_sampling.py's batch workload as one layer's decode call: 64 prompts x 8 samples = 512 rows, Llama-3-8B's 32
# query / 8 kv heads, a 384-position cache (128-token prompts + 256 new), one query a row at positions 128-383
DECODE_SHAPE = dict(rows=512, samples=8, prompt=128, cache=384, heads=32, kv_heads=8)


def _with_tma(tiles, n_tma):
    """Launch configs: every tile with pointer loads, then the first n_tma tiles through TMA."""
    return {D: [Launch(*t) for t in ts] + [Launch(*t, tma=True) for t in ts[:n_tma]] for D, ts in tiles.items()}


def _persistent(tiles, n):
    """The first n tiles run by one program per SM that walks the tiles, with pointer loads and through TMA."""
    return {D: [Launch(*t, tma=tma, programs_per_sm=1) for t in ts[:n] for tma in (False, True)]
            for D, ts in tiles.items()}


def _deferred_pv(tiles, n):
    """The first n forward tiles with each key block's P V product issued one block late, with pointer loads and
    through TMA."""
    return {D: [Launch(*t, tma=tma, deferred_pv=True) for t in ts[:n] for tma in (False, True)]
            for D, ts in tiles.items()}


def _atomic_dq(tiles, n):
    """The first n dk/dv tiles summing dq themselves by atomic adds (no dq kernel), with pointer loads and through
    TMA."""
    return {D: [Launch(*t, tma=tma, atomic_dq=True) for t in ts[:n] for tma in (False, True)]
            for D, ts in tiles.items()}


# Every forward tile both ways (the forward is one kernel, quick to compile), the first two persistent and the first
# three with the P V product deferred; the backward's table tiles and the next two through TMA, and the same three
# dk/dv tiles summing dq by atomic adds.
FWD_CANDIDATES = {D: ts + _persistent(_FWD_TILES, 2)[D] + _deferred_pv(_FWD_TILES, 3)[D]
                  for D, ts in _with_tma(_FWD_TILES, 6).items()}
DKDV_CANDIDATES = {D: ts + _atomic_dq(_DKDV_TILES, 3)[D] for D, ts in _with_tma(_DKDV_TILES, 3).items()}
DQ_CANDIDATES = _with_tma(_DQ_TILES, 3)
# Each launch option alone on the tables' own tiles: {name: [(table, fields it changes), ...]}. The GPU-marked
# tests/test_kernel_attention.py::test_gpu_bf16_launch_options runs each at every head dim against the reference, and
# `make check-sm90` compiles what that test launches.
LAUNCH_OPTIONS = {
    "tma": [(attention._GPU_FWD, dict(tma=True)), (attention_backward._GPU_BWD_DKDV, dict(tma=True)),
            (attention_backward._GPU_BWD_DQ, dict(tma=True))],
    "persistent-forward": [(attention._GPU_FWD, dict(programs_per_sm=1))],
    "persistent-forward-tma": [(attention._GPU_FWD, dict(tma=True, programs_per_sm=1))],
    "deferred-pv": [(attention._GPU_FWD, dict(deferred_pv=True))],
    "atomic-dq": [(attention_backward._GPU_BWD_DKDV, dict(atomic_dq=True))],
    "atomic-dq-tma": [(attention_backward._GPU_BWD_DKDV, dict(tma=True, atomic_dq=True))],
}
# (B, T, H, KH) per head dim: bench.py's attention shape at D = 128, Llama-3.2-1B's training shape at 64,
# Gemma-2-9B's heads at 256.
SHAPES = {128: (4, 4096, 16, 16), 64: (8, 2048, 32, 8), 256: (2, 4096, 16, 8)}
# The matrix-vector product (BLOCK_N, BLOCK_K, warps, stages): rows per program by chunk width, each with the K loop
# unpipelined (1: a chunk's loads issued when its turn comes, into registers) and pipelined (3: two chunks ahead
# through shared memory); then 8 warps on the wider tiles, and a deeper pipeline.
MATVEC_CANDIDATES = [matvec.Launch(n, k, 4, stages) for n in (4, 8, 16) for k in (256, 512, 1024) for stages in (1, 3)]
MATVEC_CANDIDATES += [matvec.Launch(8, 1024, 8, 3), matvec.Launch(16, 1024, 8, 3), matvec.Launch(16, 512, 8, 3),
                      matvec.Launch(8, 512, 4, 4), matvec.Launch(8, 1024, 4, 4)]
# Llama-3-8B's one-row projections (N, K): fused q/k/v, o, fused gate/up, down, lm_head
MATVEC_SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
                 "lm_head": (128256, 4096)}
PARTS = ("attention128", "attention64", "attention256", "forward128", "forward64", "forward256", "dkdv128",
         "deferred128", "tiles256", "decode128", "rms_norm", "matvec")
DEVICE = "cuda"
# a Launch's fields; per SM 0: a program per tile; atomic dq: the dk/dv kernel sums dq and the dq kernel does not run;
# deferred P V: the forward adds each key block's values one block late
CONFIG_HEADER = "(BLOCK_M, BLOCK_N, warps, stages, TMA, per SM, atomic dq, deferred P V)"


def _median_ms(fn, warmup, repeats):
    # w2s.kernels.bench imported here, not at the top: on a machine without CUDA importing it turns on the interpreter,
    # and compile_check.py imports this module for its candidate lists
    from w2s.kernels import bench

    return bench.median_ms(fn, warmup, repeats)


def rel_err(out, ref):
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def _outputs(result):
    return result if isinstance(result, (tuple, list)) else (result,)


def _compile_share(table, key, candidates, runs):
    """A compile worker's candidates, each put in table[key] and run once (which compiles it into Triton's cache)."""
    def run_candidate(config):
        with launch_changes([(table, config._asdict())], key):
            for run in runs.values():
                run()
    compile_workers.run_share([functools.partial(run_candidate, config) for config in candidates])


# A candidate can be the fastest only if its outputs agree with the reference's this closely (max relative
# difference): other tiles change the summation order, which moves bf16 results by about 1e-3.
AGREES = 1e-2


def _time_launches(table, key, candidates, runs, reference, rate, warmup, repeats, label="", width=64):
    """Each candidate launch put in table[key] (the table's own put back after): every run ({name: fn() -> an output
    or a tuple of them}) checked against `reference` (max relative difference over its outputs) and timed, one line
    each with ms and rate(ms); then, per run, the fastest candidate that agrees with the reference, against the
    table's. A candidate that does not compile or run prints its error and the sweep goes on. In a compile worker:
    only its share of the candidates, run once each."""
    if compile_workers.SHARD is not None:
        return _compile_share(table, key, candidates, runs)
    current, agreeing = table[key], {name: [] for name in runs}  # run -> [(ms, candidate)]
    for config in candidates:
        try:
            with launch_changes([(table, config._asdict())], key):
                for name, run in runs.items():
                    err = max(rel_err(o, r) for o, r in zip(_outputs(run()), _outputs(reference)))
                    ms = _median_ms(run, warmup, repeats)
                    print(f"{label}{str(tuple(config)):<{width}} {f'{name:<14} ' if name else ''}{ms:>8.3f} "
                          f"{rate(ms):>8.1f} {err:>13.1e}" + ("   (table)" if config == current else ""))
                    if err < AGREES:
                        agreeing[name].append((ms, config))
        except Exception as e:  # noqa: BLE001 (report and go on: out of resources is expected for some)
            print(f"{label}{str(tuple(config)):<{width}} n/a: {type(e).__name__}: {str(e).splitlines()[0][:70]}")
        torch.cuda.empty_cache()
    for name, timed in agreeing.items():
        if timed:
            ms, config = min(timed, key=lambda pair: pair[0])
            table_ms = [m for m, c in timed if c == current]
            versus = (" (the table's)" if config == current else
                      f", {100 * (table_ms[0] / ms - 1):.1f} % faster than the table's {table_ms[0]:.3f} ms"
                      if table_ms else "")
            print(f"{label}fastest{' ' + name if name else ''}: {tuple(config)} {ms:.3f} ms{versus}")


def sweep_attention(head_dim, warmup, repeats, parts=None):
    """parts: {"dkdv" | "dq": candidate Launches} to time, by default every candidate of both kernels."""
    B, T, H, KH = SHAPES[head_dim]
    q = torch.randn(B, T, H, head_dim, device=DEVICE, dtype=torch.bfloat16)
    k, v = (torch.randn(B, T, KH, head_dim, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    do = torch.randn_like(q)
    scale = 1.0 / math.sqrt(head_dim)
    with torch.no_grad():
        out, lse = attention._forward(q, k, v, None, None, None, None, scale)
    backward = lambda: attention_backward._backward(do, q, k, v, out, lse, None, None, None, None, scale)  # noqa: E731
    flops = 2.5 * 4 * B * H * T * T * head_dim / 2  # causal, FlashAttention's convention (bench.py)
    print(f"\nattention bwd, causal, B{B} T{T} H{H} KH{KH} D{head_dim}, bf16")
    print(f"{'kernel':<6} {CONFIG_HEADER:<64} {'ms':>8} {'TF/s':>8} {'max rel diff':>13}")
    reference = backward()
    parts = parts or {"dkdv": DKDV_CANDIDATES[head_dim], "dq": DQ_CANDIDATES[head_dim]}
    tables = {"dkdv": attention_backward._GPU_BWD_DKDV, "dq": attention_backward._GPU_BWD_DQ}
    for name, candidates in parts.items():
        _time_launches(tables[name], head_dim, candidates, {"": backward}, reference, lambda ms: flops / ms / 1e9,
                       warmup, repeats, label=f"{name:<6} ")


def sweep_forward(head_dim, warmup, repeats, candidates=None, causal=True):
    """candidates: the forward Launches to time, by default every candidate at head_dim. Not causal: every query at
    the last position, so that it sees every key (bench.py's non-causal)."""
    B, T, H, KH = SHAPES[head_dim]
    q = torch.randn(B, T, H, head_dim, device=DEVICE, dtype=torch.bfloat16)
    k, v = (torch.randn(B, T, KH, head_dim, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    positions = None if causal else torch.full((B, T), T - 1, device=DEVICE, dtype=torch.int32)
    scale = 1.0 / math.sqrt(head_dim)
    forward = lambda: attention._forward(q, k, v, positions, None, None, None, scale)[0]  # noqa: E731
    flops = 4 * B * H * T * T * head_dim / (2 if causal else 1)  # bench.py's count
    print(f"\nattention fwd, {'causal' if causal else 'non-causal'}, B{B} T{T} H{H} KH{KH} D{head_dim}, bf16")
    print(f"{CONFIG_HEADER:<64} {'ms':>8} {'TF/s':>8} {'max rel diff':>13}")
    _time_launches(attention._GPU_FWD, head_dim, candidates or FWD_CANDIDATES[head_dim], {"": forward}, forward(),
                   lambda ms: flops / ms / 1e9, warmup, repeats)


def decode_inputs(head_dim):
    """One layer's decode call at DECODE_SHAPE, bf16 on the GPU: (q, k, v, q_positions, row_prefix, bytes of keys and
    values the rows attend, their own copies counted). The P prompt positions of a prompt's rows are equal, as
    row_prefix promises (it names each row's prompt's first sample, as the sampler does without chunked prefill)."""
    shape = DECODE_SHAPE
    B, S, P, n = shape["rows"], shape["cache"], shape["prompt"], shape["samples"]
    q = torch.randn(B, 1, shape["heads"], head_dim, device=DEVICE, dtype=torch.bfloat16)
    k, v = (torch.randn(B, S, shape["kv_heads"], head_dim, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    positions = torch.randint(P, S, (B, 1), device=DEVICE, dtype=torch.int32)
    first = torch.arange(B, device=DEVICE) // n * n
    k[:, :P], v[:, :P] = k[first, :P], v[first, :P]
    row_prefix = (first.int(), torch.full((B,), P, device=DEVICE, dtype=torch.int32))
    kv_bytes = (positions.long() + 1).sum().item() * shape["kv_heads"] * head_dim * 2 * 2
    return q, k, v, positions, row_prefix, kv_bytes


def prompt_groups(rows, samples, prompt_len, device=DEVICE):
    """The per-prompt cascade's tables (decode_attention.attention_after_prompt_groups) for runs of `samples`
    consecutive rows that share their first prompt_len keys, each run led by its first row."""
    leaders = torch.arange(0, rows, samples, device=device)
    members = torch.full((rows, samples), -1, dtype=torch.int32, device=device)
    members[leaders] = (leaders[:, None] + torch.arange(samples, device=device)).int()
    lengths = torch.zeros(rows, dtype=torch.int32, device=device)
    lengths[leaders] = prompt_len
    return members, lengths, torch.full((rows,), prompt_len, dtype=torch.int32, device=device), samples


def sweep_decode(head_dim, warmup, repeats):
    """The decode kernel's launches at DECODE_SHAPE, each three ways: every row reading its own keys, a prompt's
    positions read from its first sample's row (row_prefix, generate's share_prompt_reads), and the per-prompt
    cascade (attention_after_prompt_groups: each prompt's keys read once for its samples, then the rows' own).
    GB/s: the keys and values the rows attend (their own copies counted), over the time."""
    shape = DECODE_SHAPE
    B, S, P, n = shape["rows"], shape["cache"], shape["prompt"], shape["samples"]
    q, k, v, positions, row_prefix, kv_bytes = decode_inputs(head_dim)
    groups = prompt_groups(B, n, P)
    runs = {"own rows": lambda: decode_attention.attention_decode(q, k, v, q_positions=positions),
            "prompt shared": lambda: decode_attention.attention_decode(q, k, v, q_positions=positions,
                                                                       row_prefix=row_prefix),
            "prompt cascade": lambda: decode_attention.attention_after_prompt_groups(q, k, v, positions, groups)}
    print(f"\ndecode attention, {B} rows ({B // n} prompts x {n}) x 1 query, cache {S}, positions {P}-{S - 1}, "
          f"H{shape['heads']} KH{shape['kv_heads']} D{head_dim}, bf16")
    print(f"{'(BLOCK_N, warps, stages)':<26} {'keys read':<14} {'ms':>8} {'GB/s':>8} {'max rel diff':>13}")
    candidates = [decode_attention.DecodeLaunch(*config) for config in DECODE_CANDIDATES[head_dim]]
    # both ways against each row's own keys at the table's launch: reading a prompt's keys elsewhere changes no value
    _time_launches(decode_attention.GPU_DECODE, head_dim, candidates, runs, runs["own rows"](),
                   lambda ms: kv_bytes / ms / 1e6, warmup, repeats, width=26)


def sweep_rms_norm(warmup, repeats, M=16384, D=4096):
    x = torch.randn(M, D, device=DEVICE, dtype=torch.bfloat16)
    w = torch.rand(D, device=DEVICE, dtype=torch.bfloat16) + 0.5
    dy = torch.randn_like(x)
    _, rstd = rms_norm.rms_norm_forward(x, w, 1e-5, False)
    backward = lambda: rms_norm.rms_norm_backward(dy, x, w, rstd, False)  # noqa: E731
    table = (rms_norm.BWD_PROGRAMS_PER_SM, rms_norm.BWD_NUM_WARPS, rms_norm.BWD_ROW_STAGES)
    rms_norm.BWD_ROW_STAGES = 1  # the reference: each row's loads issued when its turn comes
    reference = backward()
    print(f"\nrms_norm bwd ({M}, {D}), bf16 (GB/s: read dy, x; write dx)")
    print(f"{'programs/SM':>12} {'warps':>6} {'stages':>7} {'ms':>8} {'GB/s':>8} {'max rel diff':>13}")
    try:
        for per_sm in (1, 2, 4):
            for warps in (None, 8):
                for stages in (1, 2, 3, 4):
                    rms_norm.BWD_PROGRAMS_PER_SM, rms_norm.BWD_NUM_WARPS, rms_norm.BWD_ROW_STAGES = \
                        per_sm, warps, stages
                    grads = backward()
                    err = max(rel_err(g, r) for g, r in zip(grads, reference))
                    ms = _median_ms(backward, warmup, repeats)
                    label = str(warps or rms_norm._launch_config(D)[1])
                    print(f"{per_sm:>12} {label:>6} {stages:>7} {ms:>8.3f} {3 * M * D * 2 / ms / 1e6:>8.0f} "
                          f"{err:>13.1e}" + ("   (table)" if (per_sm, warps, stages) == table else ""))
    finally:
        rms_norm.BWD_PROGRAMS_PER_SM, rms_norm.BWD_NUM_WARPS, rms_norm.BWD_ROW_STAGES = table
    # what the backward spends after its kernel: the table's (programs, D) fp32 partial weight gradients summed into
    # the weight's dtype, by the backward's kernel and by PyTorch (a sum and a cast)
    partials = torch.randn(rms_norm._num_programs(x.device, M), D, device=DEVICE)
    for name, reduce in (("kernel", lambda: rms_norm._sum_partials(partials, w.dtype)),
                         ("torch sum(0) + cast", lambda: partials.sum(0).to(w.dtype))):
        ms = _median_ms(reduce, warmup, repeats)
        print(f"weight-gradient reduction of the {partials.shape[0]} partial rows alone, {name}: {ms * 1000:.1f} us")


def sweep_matvec(warmup, repeats):
    """Every MATVEC_CANDIDATES launch at every MATVEC_SHAPES shape (bf16, one row), against F.linear's output; then
    the fastest per shape. Timed as bench.py's matvec rows are: calls on bench.MATVEC_CHAIN distinct weights back to
    back, the time per call. GB/s: the weight's bytes over that time (all a one-row product must read)."""
    import torch.nn.functional as F

    from w2s.kernels.bench import MATVEC_CHAIN

    best = {}
    for name, (N, K) in MATVEC_SHAPES.items():
        x = torch.randn(1, K, device=DEVICE, dtype=torch.bfloat16)
        weights = [(torch.randn(N, K, device=DEVICE) / math.sqrt(K)).to(torch.bfloat16) for _ in range(MATVEC_CHAIN)]
        reference, table = F.linear(x, weights[0]), matvec.launch_for(weights[0])
        cublas_ms = _median_ms(lambda: [F.linear(x, w) for w in weights], warmup, repeats) / MATVEC_CHAIN
        print(f"\nmatvec {name} (1, {K}) @ ({N}, {K})^T, bf16; F.linear {cublas_ms:.4f} ms, "
              f"{N * K * 2 / cublas_ms / 1e6:.0f} GB/s")
        print(f"{'(BLOCK_N, BLOCK_K, warps, stages)':<36} {'ms':>8} {'GB/s':>8} {'max rel diff':>13}")
        for launch in MATVEC_CANDIDATES:
            try:
                err = rel_err(matvec.matvec(x, weights[0], launch=launch), reference)
                ms = _median_ms(lambda: [matvec.matvec(x, w, launch=launch) for w in weights], warmup,
                                repeats) / MATVEC_CHAIN
                print(f"{str(tuple(launch)):<36} {ms:>8.4f} {N * K * 2 / ms / 1e6:>8.0f} {err:>13.1e}"
                      + ("   (table)" if launch == table else ""))
                best[name] = min(best.get(name, (ms, launch)), (ms, launch))
            except Exception as e:  # noqa: BLE001 (report and go on: out of resources is expected for some)
                print(f"{str(tuple(launch)):<36} n/a: {type(e).__name__}: {str(e).splitlines()[0][:70]}")
        torch.cuda.empty_cache()
    print("\nmatvec, fastest per shape (BLOCK_N, BLOCK_K, warps, stages):")
    for name, (ms, launch) in best.items():
        N, K = MATVEC_SHAPES[name]
        print(f"{name:<8} ({N}, {K}): {tuple(launch)} {ms:.4f} ms, {N * K * 2 / ms / 1e6:.0f} GB/s")


# the parts whose candidates go through _time_launches, which compile workers can share out
_SHARED_OUT_PARTS = tuple(part for part in PARTS if part not in ("rms_norm", "matvec"))


def _run_part(part, warmup, repeats):
    if part == "decode128":
        sweep_decode(128, warmup, repeats)
    elif part == "dkdv128":
        sweep_attention(128, warmup, repeats, {"dkdv": [Launch(*t) for t in _DKDV_8_WARPS_128]})
    elif part == "deferred128":  # the table's launch first: the reference the others are checked against
        candidates = [attention._GPU_FWD[128]] + _deferred_pv(_FWD_TILES, 3)[128]
        for causal in (True, False):
            sweep_forward(128, warmup, repeats, candidates, causal)
    elif part == "tiles256":  # the tiles alone, with pointer loads: 18 compiles where both 256 parts take 40
        sweep_forward(256, warmup, repeats, [Launch(*t) for t in _FWD_TILES[256]])
        sweep_attention(256, warmup, repeats, {name: [Launch(*t) for t in tiles[256]]
                                               for name, tiles in (("dkdv", _DKDV_TILES), ("dq", _DQ_TILES))})
    elif part.startswith("attention"):
        sweep_attention(int(part.removeprefix("attention")), warmup, repeats)
    elif part.startswith("forward"):
        sweep_forward(int(part.removeprefix("forward")), warmup, repeats)
    elif part == "matvec":
        sweep_matvec(warmup, repeats)
    else:
        sweep_rms_norm(warmup, repeats)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    compile_workers.add_arguments(p)
    args = p.parse_args(argv)
    parts = args.only.split(",")
    unknown = [part for part in parts if part not in PARTS]
    if unknown:  # before the GPU check: a misspelt part fails here too, not only on the GPU machine
        p.error(f"--only: unknown part(s) {', '.join(unknown)}; expected some of {', '.join(PARTS)}")
    if not torch.cuda.is_available():
        print("w2s.kernels.sweep times GPU launch configs and needs a CUDA GPU: nothing to do here")
        return 0
    compile_workers.start(args)
    if compile_workers.SHARD is None:
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, median of {args.repeats}")
    for part in parts:
        if compile_workers.SHARD is None and args.compile_workers > 1 and part in _SHARED_OUT_PARTS:
            compile_workers.compile_in_workers("w2s.kernels.sweep", ["--only", part], args.compile_workers,
                                               f"{part}: its candidates")
        _run_part(part, args.warmup, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
