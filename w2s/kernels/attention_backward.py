"""Flash attention backward in Triton: dq, dk and dv of attention.py's forward, from its saved base-2
log-sum-exp, for the same contract (causal GQA, explicit positions, ragged lengths, sliding window, soft-cap).

Three kernels: delta = rowsum(dO * O) per query row; one program per key block for dk/dv, looping over the query
heads of its GQA group so no atomics are needed (the query blocks it visits follow the forward's key segments,
transposed); one program per query block for dq, over the forward's key segments. Where the dk/dv table entry says
atomic_dq, the dk/dv program also adds its key block's share of dq into an fp32 buffer with atomic adds and the dq
kernel does not run (no recomputed scores; dq's sums then land in any order). The launch tables here are the
backward's, chosen by sweep.py; attention.py's autograd Function calls `_backward`.

    python -m pytest -q tests/test_kernel_attention.py     # CPU, TRITON_INTERPRET=1, vs the reference
"""

import torch
import triton
import triton.language as tl

from w2s.kernels.attention_common import (
    Launch,
    _config,
    _flags,
    _grid,
    _interpreting,
    _key_segments,
    _kv_descriptors,
    _kv_length,
    _last_dim_contiguous,
    _log2_scores,
    _pos_strides,
    _precision,
    _query_positions,
    _rows_descriptor,
    _tma_ready,
    _visible,
)

# ----------------------------------------------------------------------------------------------------------------
# kernels
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
def _bwd_dkdv_query_loop(dk, dv, k, v, offs_n, Q_head, DO_head, LSE_head, DELTA_head, DQ_ACC_head, POS, b,
                         stride_pb, stride_pt, stride_qt, stride_dot, stride_dqt, offs_d, start, end, T, kv_len,
                         scale, softcap, window, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
                         HAS_POS: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                         PRECISION: tl.constexpr, TMA: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    """Accumulate dk, dv (N, D) of one key block over query blocks [start, end), all in transposed (N, M) tiles.
    Q_head / DO_head: one query head's (T, D) rows, as pointers, or as tensor descriptors when TMA. ATOMIC_DQ: also
    add this key block's share of dq, scale * dS K (M, D), into the head's fp32 rows DQ_ACC_head with atomic adds
    (FlashAttention-2's backward: the dq kernel and its three recomputed products are not needed)."""
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
        s_t, to_log2 = _log2_scores(qk_t, scale, softcap, HAS_SOFTCAP)
        if HAS_SOFTCAP:
            # d/dx [c tanh(x / c)] = 1 - tanh^2, and tanh = capped score / c (undo the log2 units); a masked score's
            # gradient is 0 through p.
            th = s_t * (0.6931471805599453 / softcap)
            cap_grad_t = 1.0 - th * th
        p_t = tl.exp2(s_t * to_log2 - lse[None, :])  # probabilities, (N, M)
        if MASKED:  # after the exp2, so that its multiply and subtraction stay one fused multiply-add
            pos = _query_positions(POS, b, offs_m, row_ok, stride_pb, stride_pt, HAS_POS)
            p_t = tl.where(_visible(pos[None, :], offs_n[:, None], kv_len, window, HAS_WINDOW), p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])  # d loss / d capped score
        if HAS_SOFTCAP:
            ds_t = ds_t * cap_grad_t
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=PRECISION) * scale  # (M, D)
            tl.atomic_add(DQ_ACC_head + offs_m[:, None] * stride_dqt + offs_d[None, :], dq, mask=row_ok[:, None],
                          sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, POS, KV_LEN,
                          stride_qb, stride_qt, stride_qh, stride_kb, stride_ks, stride_kh,
                          stride_vb, stride_vs, stride_vh, stride_dob, stride_dot, stride_doh,
                          stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
                          stride_dqb, stride_dqt, stride_dqh,
                          stride_pb, stride_pt, T, S, H, KH, GROUP, scale, softcap, window,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          HAS_POS: tl.constexpr, HAS_KV_LEN: tl.constexpr, HAS_WINDOW: tl.constexpr,
                          HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
                          ATOMIC_DQ: tl.constexpr):
    """dk, dv of one key block of one (batch, kv head)."""
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = (pid_bk // KH).to(tl.int64)
    kv_h = pid_bk % KH
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n < S
    kv_len = _kv_length(KV_LEN, b, S, HAS_KV_LEN)
    if ATOMIC_DQ:  # dS K sums over every key of the block: keys past kv_len (a cache may hold NaN there) load as 0
        key_read = offs_n < kv_len
    else:
        key_read = key_ok
    k = tl.load(K + b * stride_kb + kv_h * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :],
                mask=key_read[:, None], other=0.0)  # (N, D)
    v = tl.load(V + b * stride_vb + kv_h * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :],
                mask=key_read[:, None], other=0.0)

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
            Q_head = _rows_descriptor(Q_head, stride_qt, T, BLOCK_M, HEAD_DIM)
            DO_head = _rows_descriptor(DO_head, stride_dot, T, BLOCK_M, HEAD_DIM)
        LSE_head = LSE + (b * H + h) * T
        DELTA_head = DELTA + (b * H + h) * T
        DQ_ACC_head = DQ_ACC + b * stride_dqb + h * stride_dqh
        dk, dv = _bwd_dkdv_query_loop(dk, dv, k, v, offs_n, Q_head, DO_head, LSE_head, DELTA_head,
                                      DQ_ACC_head, POS, b, stride_pb, stride_pt, stride_qt, stride_dot,
                                      stride_dqt, offs_d, lo, full_lo, T, kv_len, scale, softcap, window,
                                      BLOCK_M, True, HAS_POS, HAS_WINDOW, HAS_SOFTCAP, PRECISION, TMA,
                                      ATOMIC_DQ)
        dk, dv = _bwd_dkdv_query_loop(dk, dv, k, v, offs_n, Q_head, DO_head, LSE_head, DELTA_head,
                                      DQ_ACC_head, POS, b, stride_pb, stride_pt, stride_qt, stride_dot,
                                      stride_dqt, offs_d, full_lo, full_hi, T, kv_len, scale, softcap, window,
                                      BLOCK_M, False, HAS_POS, HAS_WINDOW, HAS_SOFTCAP, PRECISION, TMA,
                                      ATOMIC_DQ)
        dk, dv = _bwd_dkdv_query_loop(dk, dv, k, v, offs_n, Q_head, DO_head, LSE_head, DELTA_head,
                                      DQ_ACC_head, POS, b, stride_pb, stride_pt, stride_qt, stride_dot,
                                      stride_dqt, offs_d, full_hi, hi, T, kv_len, scale, softcap, window,
                                      BLOCK_M, True, HAS_POS, HAS_WINDOW, HAS_SOFTCAP, PRECISION, TMA,
                                      ATOMIC_DQ)
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
        s, to_log2 = _log2_scores(tl.dot(q, tl.trans(k), input_precision=PRECISION), scale, softcap, HAS_SOFTCAP)
        if HAS_SOFTCAP:
            th = s * (0.6931471805599453 / softcap)  # tanh (see the dk/dv loop)
            cap_grad = 1.0 - th * th
        p = tl.exp2(s * to_log2 - lse[:, None])  # (M, N)
        if MASKED:  # after the exp2, as in the dk/dv loop
            p = tl.where(_visible(pos[:, None], offs_n[None, :], kv_len, window, HAS_WINDOW), p, 0.0)
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
    """dq of one query block of one (batch, head)."""
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
# launch tables and launcher
# ----------------------------------------------------------------------------------------------------------------

# Backward launch configs (w2s/kernels/attention_common.Launch; programs per SM is the forward's option, an error here;
# atomic_dq the dk/dv kernel's):
# D = 64 and 128 chosen by sweep.py on an H100 (BENCHMARKS.md); D = 256 not swept.
_GPU_BWD_DKDV = {64: Launch(32, 128, 4, 3), 128: Launch(64, 64, 4, 2), 256: Launch(32, 64, 8, 1)}
_GPU_BWD_DQ = {64: Launch(64, 64, 4, 3), 128: Launch(64, 64, 4, 2), 256: Launch(64, 32, 8, 1)}
_INTERPRET_BWD_DKDV, _INTERPRET_BWD_DQ = Launch(16, 32, 4, 1), Launch(32, 16, 4, 1)


def _backward(do, q, k, v, out, lse, q_positions, kv_lengths, sliding_window, softcap, scale):
    """Launch dk/dv then dq (or dk/dv summing dq by atomic adds, where the table says atomic_dq). delta =
    rowsum(dO * O) is the softmax-backward correction, (B, H, T) fp32."""
    B, T, H, D = q.shape
    S, KH = k.shape[1], k.shape[2]
    do = _last_dim_contiguous(do)
    delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    block_delta = 16 if _interpreting() else 64
    _attn_bwd_delta_kernel[_grid(triton.cdiv(T, block_delta), B * H)](
        out, do, delta, *out.stride()[:3], *do.stride()[:3], T, H, HEAD_DIM=D, BLOCK_M=block_delta)
    dkdv = _config(_GPU_BWD_DKDV, _INTERPRET_BWD_DKDV, D, "dk/dv", ("tma", "atomic_dq"))
    tma = dkdv.tma and _tma_ready(q, do)
    # atomic_dq: fp32 sums the dk/dv kernel adds into (rows no key reaches stay 0); else what the dq kernel writes
    dq = (torch.zeros((B, T, H, D), dtype=torch.float32, device=q.device) if dkdv.atomic_dq
          else torch.empty_like(q, memory_format=torch.contiguous_format))
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    flags = _flags(q_positions, kv_lengths, sliding_window, softcap)
    common = dict(HEAD_DIM=D, PRECISION=_precision(q.dtype), **flags)
    cap, window = softcap or 1.0, sliding_window or 0

    _attn_bwd_dkdv_kernel[_grid(triton.cdiv(S, dkdv.block_n), B * KH)](
        q, k, v, do, lse, delta, dk, dv, dq, q_positions, kv_lengths, *q.stride()[:3], *k.stride()[:3],
        *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3], *dq.stride()[:3],
        *_pos_strides(q_positions), T, S, H, KH, H // KH, scale, cap, window, BLOCK_M=dkdv.block_m,
        BLOCK_N=dkdv.block_n, num_warps=dkdv.warps, num_stages=dkdv.stages, TMA=tma, ATOMIC_DQ=dkdv.atomic_dq,
        **common)
    if dkdv.atomic_dq:
        return dq.to(q.dtype), dk, dv

    dq_launch = _config(_GPU_BWD_DQ, _INTERPRET_BWD_DQ, D, "dq")
    tma = dq_launch.tma and _tma_ready(k, v)
    _attn_bwd_dq_kernel[_grid(triton.cdiv(T, dq_launch.block_m), B * H)](
        q, k, v, do, lse, delta, dq, q_positions, kv_lengths, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *do.stride()[:3], *dq.stride()[:3], *_pos_strides(q_positions), T, S, H, H // KH, scale, cap, window,
        BLOCK_M=dq_launch.block_m, BLOCK_N=dq_launch.block_n, num_warps=dq_launch.warps,
        num_stages=dq_launch.stages, TMA=tma, **common)
    return dq, dk, dv
