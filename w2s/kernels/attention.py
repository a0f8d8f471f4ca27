"""Flash attention in Triton, forward and backward: causal GQA with explicit positions, ragged lengths, sliding
window and soft-cap.

Same contract as w2s.kernels.reference.attention (read it first): q (B, T, H, D), k/v (B, S, K, D), a query at absolute
position p sees key s iff s <= p, s < kv_lengths[b] and p - s < sliding_window; Gemma-2 soft-caps the scores with
softcap * tanh(scores / softcap). Rows that see no key return zeros.

Anatomy, top to bottom:
  1. the forward: the key loop (online softmax over key blocks), one tile (saves the base-2 log-sum-exp per row),
     and the kernel that runs one tile or walks many,
  2. its launch tables and launcher, the autograd Function and the functional `attention`.
The helpers every attention kernel shares (positions, which key blocks a query block can see, the mask, soft-cap,
TMA descriptors, the launch checks) are attention_common.py; the backward kernels (dk/dv per key block,
dq per query block) and their launcher are attention_backward.py. The sampler's decode kernel (a few new
tokens against a long KV cache, split over keys) and cascade decoding over a shared prefix are
decode_attention.py, built on the shared helpers and the key loop here (it imports this module; this module
imports nothing of it). Which of the two runs a call is decided in w2s/ops.py.

Why the key loop runs in three segments: for a block of queries, the key blocks in the middle are visible to every
row (no mask needed), the ones at the edges (causal diagonal, window start, kv_lengths end) need the per-element
mask, and everything outside is skipped. The same ranges drive the dq kernel; the dk/dv kernel does the transposed
reasoning over query blocks.

All scores are kept in base-2 units (multiplied by log2(e)) so the softmax uses exp2, the cheap instruction.

The tiles a loop streams (keys and values in the forward and dq loops, queries and output gradients in the dk/dv
loop) are loaded through pointers, or, where the launch table's TMA entry says so, through tensor descriptors that
Hopper's copy engine (TMA) reads from: same tiles, same zeros past the end, no address arithmetic in the threads.
The forward runs one program per (query block, batch x head) tile, or, where the table's programs_per_sm says so, a
few programs per SM that each walk many tiles (persistent): the same per-tile body, `_fwd_tile`, either way. Where
the table's deferred_pv says so, the key blocks every row of a tile sees run through `_fwd_key_loop_deferred`, which
adds each block's P V product one block late so that the block's softmax runs while the tensor cores work.

    python -m pytest -q tests/test_kernel_attention.py     # CPU, TRITON_INTERPRET=1, vs the reference
"""

import math

import torch
import triton
import triton.language as tl

from w2s.kernels.attention_backward import _backward
from w2s.kernels.attention_common import (
    Launch,
    _check_inputs,
    _config,
    _flags,
    _grid,
    _key_segments,
    _kv_descriptors,
    _kv_length,
    _last_dim_contiguous,
    _log2_scores,
    _optional_int32,
    _pos_strides,
    _precision,
    _query_positions,
    _sm_count,
    _tma_ready,
    _visible,
)

# ----------------------------------------------------------------------------------------------------------------
# 1. forward
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _key_tile(K_head, stride_ks, offs_d, start_n, kv_len, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
              TMA: tl.constexpr):
    """Keys [start_n, start_n + BLOCK_N) of one kv head, transposed: (D, N); zeros past kv_len where MASKED (TMA
    descriptors end at kv_len, and the copy engine fills the rows past it with zeros)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if TMA:
        kt = tl.trans(K_head.load([start_n, 0]))
    elif MASKED:
        kt = tl.load(K_head + offs_n[None, :] * stride_ks + offs_d[:, None], mask=offs_n[None, :] < kv_len, other=0.0)
    else:
        kt = tl.load(K_head + offs_n[None, :] * stride_ks + offs_d[:, None])
    return kt


@triton.jit
def _value_tile(V_head, stride_vs, offs_d, start_n, kv_len, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                TMA: tl.constexpr):
    """Values [start_n, start_n + BLOCK_N) of one kv head: (N, D), zeros past kv_len as _key_tile's."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if TMA:
        v = V_head.load([start_n, 0])
    elif MASKED:
        v = tl.load(V_head + offs_n[:, None] * stride_vs + offs_d[None, :], mask=offs_n[:, None] < kv_len, other=0.0)
    else:
        v = tl.load(V_head + offs_n[:, None] * stride_vs + offs_d[None, :])
    return v


@triton.jit
def _softmax_block(m_i, l_i, s, to_log2):
    """One key block's scores s (M, N) into the running row max m_i and sum l_i -> (m, l, p (M, N), alpha (M,)):
    the block's probabilities and the factor that rescales what was summed before it."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * to_log2)  # to_log2 > 0: the row max of s, in base-2 units
    # A row that has seen no visible key yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s * to_log2 - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    return m_new, l_i * alpha + tl.sum(p, 1), p, alpha


@triton.jit
def _fwd_key_loop(acc, m_i, l_i, q, pos, K_head, V_head, stride_ks, stride_vs, offs_d, start, end, kv_len,
                  scale, softcap, window, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr = False):
    """Online softmax over key blocks [start, end): acc (M, D) unnormalized output, m_i row max, l_i row sum.
    K_head / V_head: one kv head's (S, D) rows, as pointers, or as tensor descriptors when TMA."""
    for start_n in range(start, end, BLOCK_N):
        kt = _key_tile(K_head, stride_ks, offs_d, start_n, kv_len, BLOCK_N, MASKED, TMA)
        v = _value_tile(V_head, stride_vs, offs_d, start_n, kv_len, BLOCK_N, MASKED, TMA)
        s, to_log2 = _log2_scores(tl.dot(q, kt, input_precision=PRECISION), scale, softcap, HAS_SOFTCAP)
        if MASKED:
            offs_n = start_n + tl.arange(0, BLOCK_N)
            s = tl.where(_visible(pos[:, None], offs_n[None, :], kv_len, window, HAS_WINDOW), s, float("-inf"))
        m_i, l_i, p, alpha = _softmax_block(m_i, l_i, s, to_log2)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_i, l_i


@triton.jit
def _fwd_key_loop_deferred(acc, m_i, l_i, q, K_head, V_head, stride_ks, stride_vs, offs_d, start, end, kv_len,
                           scale, softcap, BLOCK_N: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                           PRECISION: tl.constexpr, TMA: tl.constexpr):
    """_fwd_key_loop over whole blocks that every row sees, [start, end), with each block's P V product issued one
    block late: a block's softmax then runs while the tensor cores sum the previous block's values. Hopper's
    warp-group products run asynchronously, but Triton waits for one at once where anything but another product
    reads its result, so a q.k product issued ahead of a softmax would still be waited for before it; the P V
    product's result is next read by the following block's P V product (after the next q.k product's wait), so
    nothing waits for it while the softmax runs. acc is rescaled by a block's alpha just before that block's P V
    product is added."""
    if start < end:
        s, to_log2 = _log2_scores(tl.dot(q, _key_tile(K_head, stride_ks, offs_d, start, kv_len, BLOCK_N, False, TMA),
                                         input_precision=PRECISION), scale, softcap, HAS_SOFTCAP)
        m_i, l_i, p, alpha = _softmax_block(m_i, l_i, s, to_log2)
        for start_n in range(start + BLOCK_N, end, BLOCK_N):
            qk = tl.dot(q, _key_tile(K_head, stride_ks, offs_d, start_n, kv_len, BLOCK_N, False, TMA),
                        input_precision=PRECISION)  # (M, N)
            v = _value_tile(V_head, stride_vs, offs_d, start_n - BLOCK_N, kv_len, BLOCK_N, False, TMA)
            acc = tl.dot(p.to(v.dtype), v, acc=acc * alpha[:, None], input_precision=PRECISION)
            s, to_log2 = _log2_scores(qk, scale, softcap, HAS_SOFTCAP)
            m_i, l_i, p, alpha = _softmax_block(m_i, l_i, s, to_log2)
        v = _value_tile(V_head, stride_vs, offs_d, end - BLOCK_N, kv_len, BLOCK_N, False, TMA)
        acc = tl.dot(p.to(v.dtype), v, acc=acc * alpha[:, None], input_precision=PRECISION)
    return acc, m_i, l_i


@triton.jit
def _fwd_tile(pid_m, pid_bh, Q, K, V, O, LSE, POS, KV_LEN,
              stride_qb, stride_qt, stride_qh, stride_kb, stride_ks, stride_kh,
              stride_vb, stride_vs, stride_vh, stride_ob, stride_ot, stride_oh, stride_pb, stride_pt,
              T, S, H, GROUP, scale, softcap, window,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_POS: tl.constexpr,
              HAS_KV_LEN: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
              PRECISION: tl.constexpr, TMA: tl.constexpr, DEFERRED_PV: tl.constexpr):
    """One tile: query block pid_m of (batch x head) row pid_bh -> its BLOCK_M rows of O and LSE."""
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    kv_h = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    pos = _query_positions(POS, b, offs_m, row_ok, stride_pb, stride_pt, HAS_POS)
    kv_len = _kv_length(KV_LEN, b, S, HAS_KV_LEN)
    lo, full_lo, full_hi, hi = _key_segments(pos, row_ok, kv_len, window, BLOCK_N, HAS_WINDOW)

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)  # (M, D)
    K_head = K + b * stride_kb + kv_h * stride_kh
    V_head = V + b * stride_vb + kv_h * stride_vh
    if TMA:
        K_head, V_head = _kv_descriptors(K_head, V_head, stride_ks, stride_vs, kv_len, HEAD_DIM, BLOCK_N)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _fwd_key_loop(acc, m_i, l_i, q, pos, K_head, V_head, stride_ks, stride_vs, offs_d, lo, full_lo,
                                  kv_len, scale, softcap, window, BLOCK_N, True, HAS_WINDOW, HAS_SOFTCAP, PRECISION,
                                  TMA)
    if DEFERRED_PV:  # the key blocks every row sees: no mask in the loop, the one that runs longest
        acc, m_i, l_i = _fwd_key_loop_deferred(acc, m_i, l_i, q, K_head, V_head, stride_ks, stride_vs, offs_d,
                                               full_lo, full_hi, kv_len, scale, softcap, BLOCK_N, HAS_SOFTCAP,
                                               PRECISION, TMA)
    else:
        acc, m_i, l_i = _fwd_key_loop(acc, m_i, l_i, q, pos, K_head, V_head, stride_ks, stride_vs, offs_d, full_lo,
                                      full_hi, kv_len, scale, softcap, window, BLOCK_N, False, HAS_WINDOW,
                                      HAS_SOFTCAP, PRECISION, TMA)
    acc, m_i, l_i = _fwd_key_loop(acc, m_i, l_i, q, pos, K_head, V_head, stride_ks, stride_vs, offs_d, full_hi, hi,
                                  kv_len, scale, softcap, window, BLOCK_N, True, HAS_WINDOW, HAS_SOFTCAP, PRECISION,
                                  TMA)

    empty = l_i == 0.0  # no visible key: output 0, and lse = +inf makes every backward probability exp2(-inf) = 0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + pid_bh.to(tl.int64) * T + offs_m, lse, mask=row_ok)  # LSE is (B, H, T) contiguous


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, POS, KV_LEN,
                     stride_qb, stride_qt, stride_qh, stride_kb, stride_ks, stride_kh,
                     stride_vb, stride_vs, stride_vh, stride_ob, stride_ot, stride_oh, stride_pb, stride_pt,
                     T, S, H, GROUP, BATCH_HEADS, scale, softcap, window,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_POS: tl.constexpr,
                     HAS_KV_LEN: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                     PRECISION: tl.constexpr, TMA: tl.constexpr, PERSISTENT: tl.constexpr, DEFERRED_PV: tl.constexpr):
    if PERSISTENT:
        # Grid (programs,): a few programs per SM walk every tile in the order the one-program-per-tile grid
        # launches them: (batch, head) after (batch, head), each one's heaviest causal query blocks first. The
        # programs in flight then cover a few heads (a few kv heads' keys, read from L2 by many programs), and the
        # grid stride deals each program a mix of heavy and light blocks.
        n_m = tl.cdiv(T, BLOCK_M)
        for tile in range(tl.program_id(0), n_m * BATCH_HEADS, tl.num_programs(0)):
            _fwd_tile(n_m - 1 - tile % n_m, tile // n_m, Q, K, V, O, LSE, POS, KV_LEN,
                      stride_qb, stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                      stride_vh, stride_ob, stride_ot, stride_oh, stride_pb, stride_pt, T, S, H, GROUP, scale,
                      softcap, window, HEAD_DIM, BLOCK_M, BLOCK_N, HAS_POS, HAS_KV_LEN, HAS_WINDOW, HAS_SOFTCAP,
                      PRECISION, TMA, DEFERRED_PV)
    else:
        # Grid (query blocks, batch x heads), one program per tile. Causal rows at the end of the sequence have the
        # most keys: launch them first for a better tail.
        _fwd_tile(tl.num_programs(0) - 1 - tl.program_id(0), tl.program_id(1), Q, K, V, O, LSE, POS, KV_LEN,
                  stride_qb, stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                  stride_ob, stride_ot, stride_oh, stride_pb, stride_pt, T, S, H, GROUP, scale, softcap, window,
                  HEAD_DIM, BLOCK_M, BLOCK_N, HAS_POS, HAS_KV_LEN, HAS_WINDOW, HAS_SOFTCAP, PRECISION, TMA, DEFERRED_PV)


# ----------------------------------------------------------------------------------------------------------------
# 2. launch tables, launcher, autograd, functional API
# ----------------------------------------------------------------------------------------------------------------


# Fixed launch configs by head dim (w2s/kernels/attention_common.Launch: BLOCK_M, BLOCK_N, num_warps, num_stages, then
# TMA and persistent programs per SM, each on only where a GPU measured it faster; sweep.py tries them): large
# tiles for Hopper tensor cores, smaller ones where the (M, D) and (N, D) tiles of D=256 would overflow shared memory.
# At D=128 the keys and values arrive through TMA (BENCHMARKS.md). Under TRITON_INTERPRET=1 small tiles keep CPU
# tests fast and still exercise several blocks, ragged edges and every loop segment.
_GPU_FWD = {64: Launch(128, 64, 4, 3), 128: Launch(128, 64, 8, 3, tma=True), 256: Launch(64, 64, 8, 2)}
# fp32 tiles take twice the bytes: the bf16 config at D=128 would all but fill the H100's shared memory
# (compile_check.py), so fp32 (parity checks, tiny test models) halves the query tile and the pipeline depth.
_GPU_FWD_FP32 = {64: Launch(64, 64, 4, 2), 128: Launch(64, 64, 8, 2), 256: Launch(32, 64, 8, 1)}
_INTERPRET_FWD = Launch(32, 16, 4, 1)


def _forward(q, k, v, q_positions, kv_lengths, sliding_window, softcap, scale):
    """Launch the flash forward. Returns out (B, T, H, D) in q.dtype and lse (B, H, T) fp32 in base 2."""
    B, T, H, D = q.shape
    S, KH = k.shape[1], k.shape[2]
    out = torch.empty((B, T, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    launch = _config(_GPU_FWD_FP32 if q.dtype == torch.float32 else _GPU_FWD, _INTERPRET_FWD, D, "forward",
                     ("tma", "programs_per_sm", "deferred_pv"))
    tma = launch.tma and _tma_ready(k, v)
    blocks = triton.cdiv(T, launch.block_m)
    if launch.programs_per_sm:
        grid = (min(blocks * B * H, launch.programs_per_sm * _sm_count(q.device)), 1)
    else:
        grid = _grid(blocks, B * H)
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, q_positions, kv_lengths, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *out.stride()[:3], *_pos_strides(q_positions), T, S, H, H // KH, B * H, scale, softcap or 1.0,
        sliding_window or 0, HEAD_DIM=D, BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, PRECISION=_precision(q.dtype),
        TMA=tma, PERSISTENT=launch.programs_per_sm > 0, DEFERRED_PV=launch.deferred_pv,
        **_flags(q_positions, kv_lengths, sliding_window, softcap), num_warps=launch.warps, num_stages=launch.stages)
    return out, lse


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_positions, kv_lengths, sliding_window, softcap, scale):
        out, lse = _forward(q, k, v, q_positions, kv_lengths, sliding_window, softcap, scale)
        ctx.save_for_backward(q, k, v, out, lse, q_positions, kv_lengths)
        ctx.options = (sliding_window, softcap, scale)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, q_positions, kv_lengths = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, out, lse, q_positions, kv_lengths, *ctx.options)
        return dq, dk, dv, None, None, None, None, None


def attention(q, k, v, q_positions=None, kv_lengths=None, sliding_window=None, softcap=None, scale=None):
    """Causal GQA attention with explicit positions, ragged lengths, sliding window and soft-cap, differentiable.

    q (B, T, H, D), k/v (B, S, K, D) -> (B, T, H, D) in q.dtype. Exactly w2s.kernels.reference.attention, through the
    flash kernels at any shape. w2s/ops.py sends the few-token no-grad calls of sampling to
    decode_attention.py instead.
    """
    _check_inputs(q, k, v, q_positions, kv_lengths, sliding_window, softcap)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if not scale > 0:  # the kernels take each row's max before scaling (_log2_scores)
        raise ValueError(f"attention: scale {scale} must be positive")
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    q_positions = _optional_int32(q_positions, q.device)
    kv_lengths = _optional_int32(kv_lengths, q.device)
    sliding_window = None if sliding_window is None else int(sliding_window)
    softcap = None if softcap is None else float(softcap)
    return _FlashAttention.apply(q, k, v, q_positions, kv_lengths, sliding_window, softcap, scale)
