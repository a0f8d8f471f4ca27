"""Flash attention in Triton, forward and backward: causal GQA with explicit positions, ragged lengths, sliding
window and soft-cap.

Same contract as kernels.reference.attention (read it first): q (B, T, H, D), k/v (B, S, K, D), a query at absolute
position p sees key s iff s <= p, s < kv_lengths[b] and p - s < sliding_window; Gemma-2 soft-caps the scores with
softcap * tanh(scores / softcap). Rows that see no key return zeros.

Anatomy, top to bottom:
  1. small @triton.jit helpers (positions, which key blocks a query block can see, soft-cap),
  2. the forward kernel (online softmax over key blocks; saves the base-2 log-sum-exp per row),
  3. the backward kernels (one program per key block for dk/dv, looping over the query heads of its GQA group so no
     atomics are needed; one program per query block for dq),
  4. launchers that pick block sizes by head dim, the autograd Function and the functional `attention`.
The sampler's decode kernel (a few new tokens against a long KV cache, split over keys) and cascade decoding over a
shared prefix are kernels/decode_attention.py, built on the helpers and the key loop here (it imports this module;
this module imports nothing of it). Which of the two runs a call is decided in w2s/ops.py.

Why the key loop runs in three segments: for a block of queries, the key blocks in the middle are visible to every
row (no mask needed), the ones at the edges (causal diagonal, window start, kv_lengths end) need the per-element
mask, and everything outside is skipped. The same ranges drive the dq kernel; the dk/dv kernel does the transposed
reasoning over query blocks.

All scores are kept in base-2 units (multiplied by log2(e)) so the softmax uses exp2, the cheap instruction.

The tiles a loop streams (keys and values in the forward and dq loops, queries and output gradients in the dk/dv
loop) are loaded through pointers, or, where the launch table's TMA entry says so, through tensor descriptors that
Hopper's copy engine (TMA) reads from: same tiles, same zeros past the end, no address arithmetic in the threads.

    python -m pytest -q tests/test_kernel_attention.py     # CPU, TRITON_INTERPRET=1, vs the reference
"""

import math
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
NO_POSITION = -1  # position given to padding rows of a block: sees no key


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------------------------
# 1. helpers
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    # 1 - 2 / (e^{2x} + 1): exact limits at both ends (e^{2x} -> inf gives 1, -> 0 gives -1), no NaN.
    return 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)  # 2 * log2(e)


@triton.jit
def _query_positions(POS, b, rows_t, row_ok, stride_pb, stride_pt, HAS_POS: tl.constexpr):
    """Absolute position of each query row; NO_POSITION for rows past T (they then see nothing)."""
    if HAS_POS:
        pos = tl.load(POS + b * stride_pb + rows_t * stride_pt, mask=row_ok, other=-1).to(tl.int32)
    else:
        pos = rows_t.to(tl.int32)
    return tl.where(row_ok, pos, -1)


@triton.jit
def _kv_length(KV_LEN, b, S, HAS_KV_LEN: tl.constexpr):
    if HAS_KV_LEN:
        n = tl.load(KV_LEN + b).to(tl.int32)
        return tl.maximum(tl.minimum(n, S), 0)
    return S


@triton.jit
def _key_segments(pos, row_ok, kv_len, window, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Key ranges for a block of query rows: [lo, full_lo) masked, [full_lo, full_hi) all visible, [full_hi, hi)
    masked. lo, full_lo and full_hi are multiples of BLOCK_N (or equal to hi), so every loop walks whole blocks."""
    min_pos = tl.min(tl.where(row_ok, pos, 2147483647), 0)
    max_pos = tl.max(tl.where(row_ok, pos, -1), 0)
    hi = tl.minimum(kv_len, max_pos + 1)  # causal: nothing past the last row's position
    all_see_to = tl.minimum(kv_len, min_pos + 1)  # every row sees keys below this (before the window)
    if HAS_WINDOW:
        lo = tl.maximum(min_pos - window + 1, 0)
        all_see_from = tl.maximum(max_pos - window + 1, 0)
    else:
        lo = min_pos * 0
        all_see_from = min_pos * 0
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(tl.cdiv(all_see_from, BLOCK_N) * BLOCK_N, lo), hi)
    full_hi = tl.minimum(tl.maximum((all_see_to // BLOCK_N) * BLOCK_N, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _visible(pos_rows, keys, kv_len, window, HAS_WINDOW: tl.constexpr):
    """The reference mask for a (rows, keys) tile; pos_rows and keys are already broadcast against each other."""
    ok = (keys <= pos_rows) & (keys < kv_len)
    if HAS_WINDOW:
        ok = ok & (pos_rows - keys < window)
    return ok


@triton.jit
def _kv_descriptors(K_head, V_head, stride_ks, stride_vs, kv_len, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    """TMA descriptors of one kv head's (kv_len, D) keys and values, read in (BLOCK_N, D) tiles: Hopper's tensor
    memory accelerator copies each tile to shared memory asynchronously, with no address arithmetic or load masks in
    the threads, and fills rows past kv_len with zeros. At least one row: a descriptor has no empty dimension, and a
    row with kv_len 0 loads nothing."""
    rows = tl.maximum(kv_len, 1)
    k_desc = tl.make_tensor_descriptor(K_head, shape=[rows, HEAD_DIM], strides=[stride_ks, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(V_head, shape=[rows, HEAD_DIM], strides=[stride_vs, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    return k_desc, v_desc


@triton.jit
def _log2_scores(qk, scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """Raw q.k (fp32) -> softmax logits in base-2 units, soft-capped like Gemma-2."""
    if HAS_SOFTCAP:
        return softcap * _tanh(qk * (scale / softcap)) * 1.4426950408889634
    return qk * (scale * 1.4426950408889634)


# ----------------------------------------------------------------------------------------------------------------
# 2. forward
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_key_loop(acc, m_i, l_i, q, pos, K_head, V_head, stride_ks, stride_vs, offs_d, start, end, kv_len,
                  scale, softcap, window, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr = False):
    """Online softmax over key blocks [start, end): acc (M, D) unnormalized output, m_i row max, l_i row sum.
    K_head / V_head: one kv head's (S, D) rows, as pointers, or as tensor descriptors when TMA."""
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if TMA:  # the descriptors end at kv_len: the copy engine fills rows past it with zeros, no mask needed
            kt = tl.trans(K_head.load([start_n, 0]))  # (D, N)
            v = V_head.load([start_n, 0])  # (N, D)
        elif MASKED:
            kt = tl.load(K_head + offs_n[None, :] * stride_ks + offs_d[:, None], mask=offs_n[None, :] < kv_len,
                         other=0.0)  # (D, N)
            v = tl.load(V_head + offs_n[:, None] * stride_vs + offs_d[None, :], mask=offs_n[:, None] < kv_len,
                        other=0.0)  # (N, D)
        else:
            kt = tl.load(K_head + offs_n[None, :] * stride_ks + offs_d[:, None])
            v = tl.load(V_head + offs_n[:, None] * stride_vs + offs_d[None, :])
        s = _log2_scores(tl.dot(q, kt, input_precision=PRECISION), scale, softcap, HAS_SOFTCAP)  # (M, N)
        if MASKED:
            s = tl.where(_visible(pos[:, None], offs_n[None, :], kv_len, window, HAS_WINDOW), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no visible key yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, POS, KV_LEN,
                     stride_qb, stride_qt, stride_qh, stride_kb, stride_ks, stride_kh,
                     stride_vb, stride_vs, stride_vh, stride_ob, stride_ot, stride_oh, stride_pb, stride_pt,
                     T, S, H, GROUP, scale, softcap, window,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_POS: tl.constexpr,
                     HAS_KV_LEN: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                     PRECISION: tl.constexpr, TMA: tl.constexpr):
    # Causal rows at the end of the sequence have the most keys: launch them first for a better tail.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
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
    acc, m_i, l_i = _fwd_key_loop(acc, m_i, l_i, q, pos, K_head, V_head, stride_ks, stride_vs, offs_d, full_lo,
                                  full_hi, kv_len, scale, softcap, window, BLOCK_N, False, HAS_WINDOW, HAS_SOFTCAP,
                                  PRECISION, TMA)
    acc, m_i, l_i = _fwd_key_loop(acc, m_i, l_i, q, pos, K_head, V_head, stride_ks, stride_vs, offs_d, full_hi, hi,
                                  kv_len, scale, softcap, window, BLOCK_N, True, HAS_WINDOW, HAS_SOFTCAP, PRECISION,
                                  TMA)

    empty = l_i == 0.0  # no visible key: output 0, and lse = +inf makes every backward probability exp2(-inf) = 0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + pid_bh.to(tl.int64) * T + offs_m, lse, mask=row_ok)  # LSE is (B, H, T) contiguous


# ----------------------------------------------------------------------------------------------------------------
# 3. backward
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_delta_kernel(O, DO, DELTA, stride_ob, stride_ot, stride_oh, stride_dob, stride_dot, stride_doh, T, H,
                           HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O) in fp32, (B, H, T), reading each of dO and O once, without fp32 copies of them."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + pid_bh.to(tl.int64) * T + offs_m, delta, mask=row_ok)


@triton.jit
def _bwd_dkdv_query_loop(dk, dv, k, v, offs_n, Q_head, DO_head, LSE_head, DELTA_head, POS, b, stride_pb, stride_pt,
                         stride_qt, stride_dot, offs_d, start, end, T, kv_len, scale, softcap, window,
                         BLOCK_M: tl.constexpr, MASKED: tl.constexpr, HAS_POS: tl.constexpr,
                         HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
                         TMA: tl.constexpr):
    """Accumulate dk, dv (N, D) of one key block over query blocks [start, end), all in transposed (N, M) tiles.
    Q_head / DO_head: one query head's (T, D) rows, as pointers, or as tensor descriptors when TMA."""
    for start_m in range(start, end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < T
        if TMA:  # rows past T arrive as zeros, as the masked loads below give them
            q = Q_head.load([start_m, 0])
            do = DO_head.load([start_m, 0])
        else:
            q = tl.load(Q_head + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
            do = tl.load(DO_head + offs_m[:, None] * stride_dot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(LSE_head + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA_head + offs_m, mask=row_ok, other=0.0)
        qk_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # (N, M)
        s_t = _log2_scores(qk_t, scale, softcap, HAS_SOFTCAP)
        if HAS_SOFTCAP:
            # d/dx [c tanh(x / c)] = 1 - tanh^2, and tanh = capped score / c (undo the log2 units). Taken before
            # masking: masked scores are -inf and their gradient is 0 through p anyway.
            th = s_t * (0.6931471805599453 / softcap)
            cap_grad_t = 1.0 - th * th
        if MASKED:
            pos = _query_positions(POS, b, offs_m, row_ok, stride_pb, stride_pt, HAS_POS)
            s_t = tl.where(_visible(pos[None, :], offs_n[:, None], kv_len, window, HAS_WINDOW), s_t, float("-inf"))
        p_t = tl.exp2(s_t - lse[None, :])  # probabilities, (N, M)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])  # d loss / d capped score
        if HAS_SOFTCAP:
            ds_t = ds_t * cap_grad_t
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, POS, KV_LEN,
                          stride_qb, stride_qt, stride_qh, stride_kb, stride_ks, stride_kh,
                          stride_vb, stride_vs, stride_vh, stride_dob, stride_dot, stride_doh,
                          stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
                          stride_pb, stride_pt, T, S, H, KH, GROUP, scale, softcap, window,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          HAS_POS: tl.constexpr, HAS_KV_LEN: tl.constexpr, HAS_WINDOW: tl.constexpr,
                          HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = (pid_bk // KH).to(tl.int64)
    kv_h = pid_bk % KH
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n < S
    kv_len = _kv_length(KV_LEN, b, S, HAS_KV_LEN)
    k = tl.load(K + b * stride_kb + kv_h * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :],
                mask=key_ok[:, None], other=0.0)  # (N, D)
    v = tl.load(V + b * stride_vb + kv_h * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :],
                mask=key_ok[:, None], other=0.0)

    # Which query blocks see this key block. With explicit positions nothing is known: visit all, masked.
    # Otherwise query t sits at position t: masked diagonal blocks, then blocks that see every key here,
    # then (with a window) masked blocks where the window starts to cut, and nothing past start_n + BN - 1 + window.
    if HAS_POS:
        lo = start_n * 0
        full_lo = lo
        full_hi = lo
        hi = lo + T
    else:
        lo = (start_n // BLOCK_M) * BLOCK_M
        hi = lo * 0 + T
        full_lo = tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M
        full_hi = (T // BLOCK_M) * BLOCK_M
        if HAS_WINDOW:
            hi = tl.minimum(hi, start_n + BLOCK_N - 1 + window)
            full_hi = tl.minimum(full_hi, ((start_n + window) // BLOCK_M) * BLOCK_M)
        # A block that straddles (or is past) the end of the valid keys needs the mask everywhere.
        full_hi = tl.where(start_n + BLOCK_N > kv_len, full_lo, full_hi)
    hi = tl.where(start_n >= kv_len, lo, hi)  # no query sees these keys: zero gradient
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for g in range(0, GROUP):  # GQA: the key head's gradient sums over its group of query heads
        h = kv_h * GROUP + g
        Q_head = Q + b * stride_qb + h * stride_qh
        DO_head = DO + b * stride_dob + h * stride_doh
        if TMA:  # descriptors as _kv_descriptors', over this head's T query and output-gradient rows
            Q_head = tl.make_tensor_descriptor(Q_head, shape=[T, HEAD_DIM], strides=[stride_qt, 1],
                                               block_shape=[BLOCK_M, HEAD_DIM])
            DO_head = tl.make_tensor_descriptor(DO_head, shape=[T, HEAD_DIM], strides=[stride_dot, 1],
                                                block_shape=[BLOCK_M, HEAD_DIM])
        LSE_head = LSE + (b * H + h) * T
        DELTA_head = DELTA + (b * H + h) * T
        dk, dv = _bwd_dkdv_query_loop(dk, dv, k, v, offs_n, Q_head, DO_head, LSE_head, DELTA_head, POS, b,
                                      stride_pb, stride_pt, stride_qt, stride_dot, offs_d, lo, full_lo, T, kv_len,
                                      scale, softcap, window, BLOCK_M, True, HAS_POS, HAS_WINDOW, HAS_SOFTCAP,
                                      PRECISION, TMA)
        dk, dv = _bwd_dkdv_query_loop(dk, dv, k, v, offs_n, Q_head, DO_head, LSE_head, DELTA_head, POS, b,
                                      stride_pb, stride_pt, stride_qt, stride_dot, offs_d, full_lo, full_hi, T,
                                      kv_len, scale, softcap, window, BLOCK_M, False, HAS_POS, HAS_WINDOW,
                                      HAS_SOFTCAP, PRECISION, TMA)
        dk, dv = _bwd_dkdv_query_loop(dk, dv, k, v, offs_n, Q_head, DO_head, LSE_head, DELTA_head, POS, b,
                                      stride_pb, stride_pt, stride_qt, stride_dot, offs_d, full_hi, hi, T, kv_len,
                                      scale, softcap, window, BLOCK_M, True, HAS_POS, HAS_WINDOW, HAS_SOFTCAP,
                                      PRECISION, TMA)
    tl.store(DK + b * stride_dkb + kv_h * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=key_ok[:, None])
    tl.store(DV + b * stride_dvb + kv_h * stride_dvh + offs_n[:, None] * stride_dvs + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=key_ok[:, None])


@triton.jit
def _bwd_dq_key_loop(dq, q, do, lse, delta, pos, K_head, V_head, stride_ks, stride_vs, offs_d, start, end, kv_len,
                     scale, softcap, window, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr,
                     HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr):
    """Accumulate dq (M, D) of one query block over key blocks [start, end) (the forward's segments). K_head /
    V_head as in the forward's key loop."""
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if TMA:  # the descriptors end at kv_len: rows past it arrive as zeros
            k = K_head.load([start_n, 0])  # (N, D)
            vt = tl.trans(V_head.load([start_n, 0]))  # (D, N)
        elif MASKED:
            k = tl.load(K_head + offs_n[:, None] * stride_ks + offs_d[None, :], mask=offs_n[:, None] < kv_len,
                        other=0.0)  # (N, D)
            vt = tl.load(V_head + offs_n[None, :] * stride_vs + offs_d[:, None], mask=offs_n[None, :] < kv_len,
                         other=0.0)  # (D, N)
        else:
            k = tl.load(K_head + offs_n[:, None] * stride_ks + offs_d[None, :])
            vt = tl.load(V_head + offs_n[None, :] * stride_vs + offs_d[:, None])
        s = _log2_scores(tl.dot(q, tl.trans(k), input_precision=PRECISION), scale, softcap, HAS_SOFTCAP)
        if HAS_SOFTCAP:
            th = s * (0.6931471805599453 / softcap)  # tanh, before masking (see the dk/dv loop)
            cap_grad = 1.0 - th * th
        if MASKED:
            s = tl.where(_visible(pos[:, None], offs_n[None, :], kv_len, window, HAS_WINDOW), s, float("-inf"))
        p = tl.exp2(s - lse[:, None])  # (M, N)
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * cap_grad
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, POS, KV_LEN,
                        stride_qb, stride_qt, stride_qh, stride_kb, stride_ks, stride_kh,
                        stride_vb, stride_vs, stride_vh, stride_dob, stride_dot, stride_doh,
                        stride_dqb, stride_dqt, stride_dqh, stride_pb, stride_pt,
                        T, S, H, GROUP, scale, softcap, window,
                        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_POS: tl.constexpr,
                        HAS_KV_LEN: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                        PRECISION: tl.constexpr, TMA: tl.constexpr):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
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
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * T + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)
    K_head = K + b * stride_kb + kv_h * stride_kh
    V_head = V + b * stride_vb + kv_h * stride_vh
    if TMA:
        K_head, V_head = _kv_descriptors(K_head, V_head, stride_ks, stride_vs, kv_len, HEAD_DIM, BLOCK_N)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dq = _bwd_dq_key_loop(dq, q, do, lse, delta, pos, K_head, V_head, stride_ks, stride_vs, offs_d, lo, full_lo,
                          kv_len, scale, softcap, window, BLOCK_N, True, HAS_WINDOW, HAS_SOFTCAP, PRECISION, TMA)
    dq = _bwd_dq_key_loop(dq, q, do, lse, delta, pos, K_head, V_head, stride_ks, stride_vs, offs_d, full_lo, full_hi,
                          kv_len, scale, softcap, window, BLOCK_N, False, HAS_WINDOW, HAS_SOFTCAP, PRECISION, TMA)
    dq = _bwd_dq_key_loop(dq, q, do, lse, delta, pos, K_head, V_head, stride_ks, stride_vs, offs_d, full_hi, hi,
                          kv_len, scale, softcap, window, BLOCK_N, True, HAS_WINDOW, HAS_SOFTCAP, PRECISION, TMA)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------------------------------------------
# 4. launchers, autograd, functional API
# ----------------------------------------------------------------------------------------------------------------

# Fixed launch configs by head dim (BLOCK_M, BLOCK_N, num_warps, num_stages): large tiles for H100 tensor cores,
# smaller ones where the (M, D) and (N, D) tiles of D=256 would overflow shared memory. Under TRITON_INTERPRET=1
# small tiles keep CPU tests fast and still exercise several blocks, ragged edges and every loop segment.
# The fifth entry, here and in the backward's tables: stream the loop's tiles through TMA descriptors (sm_90+;
# kernels/sweep.py tries it; off until a GPU measures it faster).
_GPU_FWD = {64: (128, 64, 4, 3, False), 128: (128, 64, 8, 3, False), 256: (64, 64, 8, 2, False)}
# fp32 tiles take twice the bytes: the bf16 config at D=128 would all but fill the H100's shared memory
# (kernels/compile_check.py), so fp32 (parity checks, tiny test models) halves the query tile and the pipeline depth.
_GPU_FWD_FP32 = {64: (64, 64, 4, 2, False), 128: (64, 64, 8, 2, False), 256: (32, 64, 8, 1, False)}
# Backward (BLOCK_M queries, BLOCK_N keys, warps, stages, TMA): D = 64 and 128 chosen by kernels/sweep.py on an H100
# (BENCHMARKS.md); D = 256 not swept.
_GPU_BWD_DKDV = {64: (32, 128, 4, 3, False), 128: (64, 64, 4, 2, False), 256: (32, 64, 8, 1, False)}
_GPU_BWD_DQ = {64: (64, 64, 4, 3, False), 128: (64, 64, 4, 2, False), 256: (64, 32, 8, 1, False)}
_INTERPRET_FWD, _INTERPRET_BWD_DKDV, _INTERPRET_BWD_DQ = (32, 16, 4, 1, False), (16, 32, 4, 1, False), \
    (32, 16, 4, 1, False)


def _config(table, interpret_config, head_dim):
    if _interpreting():
        return interpret_config
    return table[max(64, head_dim)]


_MAX_GRID_ROWS = 65535  # CUDA's limit on grid axis 1 (axis 0 may reach 2**31 - 1); the interpreter checks neither


def _grid(blocks, rows):
    """Launch grid (blocks, rows): blocks along the sequence on axis 0, so that neighbouring programs share one
    (batch, head) and its keys stay in L2; rows = batch x heads on axis 1."""
    if rows > _MAX_GRID_ROWS:
        raise ValueError(f"attention: batch x heads = {rows} exceeds CUDA's {_MAX_GRID_ROWS} grid rows; "
                         "call it on smaller batches")
    return (blocks, rows)


def _precision(dtype):
    # fp32 inputs: true fp32 products (the tests compare at 1e-4); fp16/bf16 use tensor cores with fp32 accumulation.
    return "ieee" if dtype == torch.float32 else "tf32"


def _last_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _optional_int32(x, device):
    return None if x is None else x.to(device=device, dtype=torch.int32)


def _pos_strides(q_positions):
    return (0, 0) if q_positions is None else (q_positions.stride(0), q_positions.stride(1))


def _flags(q_positions, kv_lengths, sliding_window, softcap):
    return dict(HAS_POS=q_positions is not None, HAS_KV_LEN=kv_lengths is not None,
                HAS_WINDOW=sliding_window is not None, HAS_SOFTCAP=softcap is not None)


def _tma_ready(*tensors):
    """Whether TMA descriptors can address these (B, S or T, heads, D) tensors: unit stride along D, 16-byte aligned
    base and strides; and, on a GPU, the scratch memory in which the kernel writes its descriptors."""
    if not all(x.stride(-1) == 1 and x.data_ptr() % 16 == 0 and all(st * x.element_size() % 16 == 0
                                                                    for st in x.stride()[:-1]) for x in tensors):
        return False
    if not _interpreting():
        triton.set_allocator(_descriptor_scratch)
    return True


def _descriptor_scratch(size, alignment, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")  # the current device; the caching allocator's 512-B
    # blocks satisfy the 128-B alignment descriptors need


def _forward(q, k, v, q_positions, kv_lengths, sliding_window, softcap, scale):
    """Launch the flash forward. Returns out (B, T, H, D) in q.dtype and lse (B, H, T) fp32 in base 2."""
    B, T, H, D = q.shape
    S, KH = k.shape[1], k.shape[2]
    out = torch.empty((B, T, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    block_m, block_n, warps, stages, kv_tma = _config(_GPU_FWD_FP32 if q.dtype == torch.float32 else _GPU_FWD,
                                                      _INTERPRET_FWD, D)
    _attn_fwd_kernel[_grid(triton.cdiv(T, block_m), B * H)](
        q, k, v, out, lse, q_positions, kv_lengths, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *out.stride()[:3], *_pos_strides(q_positions), T, S, H, H // KH, scale, softcap or 1.0, sliding_window or 0,
        HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=_precision(q.dtype),
        TMA=kv_tma and _tma_ready(k, v), **_flags(q_positions, kv_lengths, sliding_window, softcap),
        num_warps=warps, num_stages=stages)
    return out, lse


def _backward(do, q, k, v, out, lse, q_positions, kv_lengths, sliding_window, softcap, scale):
    """Launch dk/dv then dq. delta = rowsum(dO * O) is the softmax-backward correction, (B, H, T) fp32."""
    B, T, H, D = q.shape
    S, KH = k.shape[1], k.shape[2]
    do = _last_dim_contiguous(do)
    delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    block_delta = 16 if _interpreting() else 64
    _attn_bwd_delta_kernel[_grid(triton.cdiv(T, block_delta), B * H)](
        out, do, delta, *out.stride()[:3], *do.stride()[:3], T, H, HEAD_DIM=D, BLOCK_M=block_delta)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    flags = _flags(q_positions, kv_lengths, sliding_window, softcap)
    common = dict(HEAD_DIM=D, PRECISION=_precision(q.dtype), **flags)
    cap, window = softcap or 1.0, sliding_window or 0

    block_m, block_n, warps, stages, tma = _config(_GPU_BWD_DKDV, _INTERPRET_BWD_DKDV, D)
    _attn_bwd_dkdv_kernel[_grid(triton.cdiv(S, block_n), B * KH)](
        q, k, v, do, lse, delta, dk, dv, q_positions, kv_lengths, *q.stride()[:3], *k.stride()[:3],
        *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3], *_pos_strides(q_positions),
        T, S, H, KH, H // KH, scale, cap, window, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
        num_stages=stages, TMA=tma and _tma_ready(q, do), **common)

    block_m, block_n, warps, stages, tma = _config(_GPU_BWD_DQ, _INTERPRET_BWD_DQ, D)
    _attn_bwd_dq_kernel[_grid(triton.cdiv(T, block_m), B * H)](
        q, k, v, do, lse, delta, dq, q_positions, kv_lengths, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *do.stride()[:3], *dq.stride()[:3], *_pos_strides(q_positions), T, S, H, H // KH, scale, cap, window,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, TMA=tma and _tma_ready(k, v), **common)
    return dq, dk, dv


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


def _check_inputs(q, k, v, q_positions, kv_lengths, sliding_window, softcap, kv_rows=None):
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"attention: expected q (B, T, H, D) and k, v (B, S, K, D) of equal shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, T, H, D = q.shape
    if kv_rows is not None and (tuple(kv_rows.shape) != (B,) or kv_rows.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"attention: kv_rows {tuple(kv_rows.shape)} {kv_rows.dtype}, expected ({B},) integers")
    if (kv_rows is None and k.shape[0] != B) or k.shape[3] != D or H % k.shape[2] != 0:
        raise ValueError(f"attention: k/v {tuple(k.shape)} do not match q {tuple(q.shape)} "
                         "(same B, or kv_rows; same D; H a multiple of K)")
    if D not in (16, 32, 64, 128, 256):
        raise ValueError(f"attention: head dim {D} unsupported by the Triton kernel (16, 32, 64, 128 or 256)")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"attention: q/k/v dtypes {q.dtype}, {k.dtype}, {v.dtype}: expected one of fp16/bf16/fp32")
    if q_positions is not None and tuple(q_positions.shape) != (B, T):
        raise ValueError(f"attention: q_positions {tuple(q_positions.shape)}, expected (B, T) = {(B, T)}")
    if kv_lengths is not None and tuple(kv_lengths.shape) != (B,):
        raise ValueError(f"attention: kv_lengths {tuple(kv_lengths.shape)}, expected (B,) = {(B,)}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"attention: softcap {softcap} must be positive (or None)")


def attention(q, k, v, q_positions=None, kv_lengths=None, sliding_window=None, softcap=None, scale=None):
    """Causal GQA attention with explicit positions, ragged lengths, sliding window and soft-cap, differentiable.

    q (B, T, H, D), k/v (B, S, K, D) -> (B, T, H, D) in q.dtype. Exactly kernels.reference.attention, through the
    flash kernels at any shape. w2s/ops.py sends the few-token no-grad calls of sampling to
    kernels/decode_attention.py instead.
    """
    _check_inputs(q, k, v, q_positions, kv_lengths, sliding_window, softcap)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    q_positions = _optional_int32(q_positions, q.device)
    kv_lengths = _optional_int32(kv_lengths, q.device)
    sliding_window = None if sliding_window is None else int(sliding_window)
    softcap = None if softcap is None else float(softcap)
    return _FlashAttention.apply(q, k, v, q_positions, kv_lengths, sliding_window, softcap, scale)
