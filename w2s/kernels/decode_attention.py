"""Split-key decode attention in Triton: a few new query tokens against a long KV cache (the sampler's hot loop),
and cascade decoding over a prefix every row shares.

Same contract as w2s.kernels.reference.attention, forward only. Training-shaped attention (many queries, gradients) is
attention.py, whose key loop this file reuses with the helpers of attention_common.py: a decode
program is the flash forward's inner loop run over one slice ("split") of the keys, for all query heads of one GQA
group at once.

Anatomy, top to bottom:
  1. the decode kernel: one program per (batch row, kv head, key split), its rows every (token, query head of the
     group) pair, so each key/value tile is read once for the whole group; it writes a partial output and its
     base-2 log-sum-exp per split (with one split, the output itself); and the per-prompt cascade's first pass: one
     program per (prompt group, kv head) over the prompt's keys, for the group's rows together,
  2. the merge kernel: the splits (and the cascade's prefix result) combined by their log-sum-exps
     (flash-decoding), one launch per call,
  3. launchers: how many splits fill the GPU, `attention_decode`, `attention_after_shared_prefix`, which runs
     the shared prefix once for all rows through the flash forward kernel and merges it as one more split, and
     `attention_after_prompt_groups`, which reads each prompt's keys once for all its samples' rows.

A decode step runs this once per layer, and at batch 1 each launch is a few microseconds of mostly fixed cost, so
the launchers keep the count down: one launch when one split covers the keys, two otherwise, and no casts (positions
are read as the caller's integers, the output is stored in its final dtype).

w2s/ops.py decides which calls come here (`ops.use_decode_kernel`: few query rows, no gradient) and calls
`attention_decode` or, over a long shared prefix, `attention_after_shared_prefix`; every other call goes to the flash
kernel. The dependency runs one way: this file imports attention.py and attention_common.py, never the
reverse.

    python -m pytest -q tests/test_kernel_attention.py -k "decode or cascade"   # CPU, TRITON_INTERPRET=1
"""

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from w2s.kernels.attention import _forward, _fwd_key_loop
from w2s.kernels.attention_common import (
    _check_inputs,
    _flags,
    _grid,
    _interpreting,
    _key_segments,
    _kv_length,
    _last_dim_contiguous,
    _optional_int32,
    _pos_strides,
    _precision,
    _query_positions,
    _sm_count,
)

# ----------------------------------------------------------------------------------------------------------------
# 1-2. the decode kernel and the merge of its key splits
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _attn_decode_kernel(Q, K, V, O_PART, LSE_PART, POS, KV_LEN, KV_ROWS, PREFIX_ROWS, PREFIX_LENS,
                        stride_qb, stride_qt, stride_qh, stride_kb, stride_ks, stride_kh,
                        stride_vb, stride_vs, stride_vh, stride_pb, stride_pt,
                        T, S, H, KH, GROUP, keys_per_split, prefix_offset, scale, softcap, window,
                        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_POS: tl.constexpr,
                        HAS_KV_LEN: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                        HAS_KV_ROWS: tl.constexpr, HAS_ROW_PREFIX: tl.constexpr, SKIP_ROW_PREFIX: tl.constexpr,
                        PRECISION: tl.constexpr):
    """One program = one (batch row, kv head, key split). Its rows are every (token t, query head of the group)
    pair, so each key/value tile is read once for the whole GQA group. Writes a normalized partial output and its
    base-2 log-sum-exp per split, which `_merge_splits_kernel` combines; with a single split O_PART is the
    (B, T, H, D) output itself, in its dtype (the store rounds). POS and KV_LEN may be int32 or int64. With KV_ROWS,
    batch row b reads the keys/values of cache row KV_ROWS[b] (several batch rows may read one cache row) instead of
    row b. With HAS_ROW_PREFIX, cache row r's keys [0, PREFIX_LENS[r] - prefix_offset) equal those of cache row
    PREFIX_ROWS[r] (another sample of the same prompt), and the whole key blocks among them are read there: the
    samples of a prompt then read one row, whose blocks the others may find in L2. With SKIP_ROW_PREFIX too (one
    split), those keys are not read at all: the per-prompt cascade attended them in _attn_prompt_group_kernel."""
    split = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = (pid_bk // KH).to(tl.int64)
    if HAS_KV_ROWS:
        b_kv = tl.load(KV_ROWS + b).to(tl.int64)
    else:
        b_kv = b
    kv_h = pid_bk % KH
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < T * GROUP
    t = rows // GROUP
    h = kv_h * GROUP + rows % GROUP
    offs_d = tl.arange(0, HEAD_DIM)
    pos = _query_positions(POS, b, t, row_ok, stride_pb, stride_pt, HAS_POS)
    kv_len = _kv_length(KV_LEN, b, S, HAS_KV_LEN)
    lo, full_lo, full_hi, hi = _key_segments(pos, row_ok, kv_len, window, BLOCK_N, HAS_WINDOW)
    lo = tl.maximum(lo, split * keys_per_split)  # keys_per_split is a multiple of BLOCK_N: lo stays aligned
    hi = tl.maximum(tl.minimum(hi, (split + 1) * keys_per_split), lo)

    q = tl.load(Q + b * stride_qb + t[:, None] * stride_qt + h[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)  # (M, D)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    # Memory-bound: the per-element mask costs nothing here, so one masked loop covers the split.
    if SKIP_ROW_PREFIX:  # one split: its loop may start mid-block, at the row's first key after its prompt
        lo = tl.maximum(lo, tl.load(PREFIX_LENS + b_kv).to(tl.int32) - prefix_offset)
        hi = tl.maximum(hi, lo)
    elif HAS_ROW_PREFIX:  # the whole blocks of the prompt, from the row named for it (block-aligned: lo stays so)
        src = tl.load(PREFIX_ROWS + b_kv).to(tl.int64)
        shared_end = tl.maximum(tl.load(PREFIX_LENS + b_kv).to(tl.int32) - prefix_offset, 0) // BLOCK_N * BLOCK_N
        mid = tl.maximum(tl.minimum(hi, shared_end), lo)
        acc, m_i, l_i = _fwd_key_loop(acc, m_i, l_i, q, pos, K + src * stride_kb + kv_h * stride_kh,
                                      V + src * stride_vb + kv_h * stride_vh, stride_ks, stride_vs, offs_d, lo, mid,
                                      kv_len, scale, softcap, window, BLOCK_N, True, HAS_WINDOW, HAS_SOFTCAP,
                                      PRECISION)
        lo = mid
    acc, m_i, l_i = _fwd_key_loop(acc, m_i, l_i, q, pos, K + b_kv * stride_kb + kv_h * stride_kh,
                                  V + b_kv * stride_vb + kv_h * stride_vh, stride_ks, stride_vs, offs_d, lo, hi, kv_len,
                                  scale, softcap, window, BLOCK_N, True, HAS_WINDOW, HAS_SOFTCAP, PRECISION)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))  # -inf: weight 0 in the merge
    # O_PART (B, splits, T, H, D) and LSE_PART (B, splits, T, H), both contiguous; with one split O_PART's flat row
    # index (b, t, h) is the (B, T, H, D) output's.
    part = (b * tl.num_programs(0) + split) * T * H + t * H + h
    tl.store(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], out.to(O_PART.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(LSE_PART + part, lse, mask=row_ok)


@triton.jit
def _attn_prompt_group_kernel(Q, K, V, PREFIX_O, PREFIX_LSE, POS, MEMBERS, GROUP_LENS,
                              stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                              stride_pb, stride_mg, stride_por, stride_poh, stride_plh,
                              B, KH, GROUP, M, scale, softcap, window,
                              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """The per-prompt cascade's first pass. One program = one (cache row g, kv head): its rows are every (member t of
    g's group, query head of the GQA group) pair, the members being the rows MEMBERS[g, :M] (-1: none) that hold
    g's first GROUP_LENS[g] keys, and it attends those keys once, from row g, for all of them. Writes each member
    row's normalized output over them (PREFIX_O (rows, H, D)) and its base-2 log-sum-exp (PREFIX_LSE (H, rows),
    -inf when it saw no key), which the decode kernel's pass over the rows' own keys takes as its prefix split.
    One token a row, batch row = cache row (a plain decode step)."""
    pid = tl.program_id(1)
    g = (pid // KH).to(tl.int64)
    kv_h = pid % KH
    rows = tl.arange(0, BLOCK_M)
    member = tl.load(MEMBERS + g * stride_mg + rows // GROUP, mask=rows < M * GROUP, other=-1).to(tl.int64)
    row_ok = (member >= 0) & (member < B)  # a member past the rows run is no row of this call
    h = kv_h * GROUP + rows % GROUP
    offs_d = tl.arange(0, HEAD_DIM)
    pos = tl.where(row_ok, tl.load(POS + member * stride_pb, mask=row_ok, other=-1).to(tl.int32), -1)
    n_keys = tl.load(GROUP_LENS + g).to(tl.int32)
    lo, _, _, hi = _key_segments(pos, row_ok, n_keys, window, BLOCK_N, HAS_WINDOW)
    q = tl.load(Q + member[:, None] * stride_qb + h[:, None] * stride_qh + offs_d[None, :], mask=row_ok[:, None],
                other=0.0)  # (M, D)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _fwd_key_loop(acc, m_i, l_i, q, pos, K + g * stride_kb + kv_h * stride_kh,
                                  V + g * stride_vb + kv_h * stride_vh, stride_ks, stride_vs, offs_d, lo, hi, n_keys,
                                  scale, softcap, window, BLOCK_N, True, HAS_WINDOW, HAS_SOFTCAP, PRECISION)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    tl.store(PREFIX_O + member[:, None] * stride_por + h[:, None] * stride_poh + offs_d[None, :],
             out.to(PREFIX_O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(PREFIX_LSE + h * stride_plh + member, lse, mask=row_ok)


@triton.jit
def _merge_splits_kernel(O_PART, LSE_PART, OUT, PREFIX_O, PREFIX_LSE, rows, TH, H, splits,
                         stride_po_r, stride_po_h, stride_pl_h, stride_pl_r,
                         HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, HAS_PREFIX: tl.constexpr):
    """One program = BLOCK_R output rows r = (b, t, h), flattened. Each row's splits s, normalized outputs o_s with
    base-2 log-sum-exps lse_s, merge into

        out = sum_s 2^(lse_s - m) o_s / sum_s 2^(lse_s - m),    m = max_s lse_s

    An empty split (lse -inf) adds nothing, whatever its o holds; a row whose splits are all empty gets 0.
    O_PART (B, splits, T, H, D) and LSE_PART (B, splits, T, H) fp32, contiguous; OUT (B, T, H, D) contiguous.
    HAS_PREFIX: the cascade's prefix result joins as one more split: PREFIX_O (B*T, H, D) in the output dtype and
    PREFIX_LSE (H, B*T), whose +inf (the flash forward's mark of a query that sees no key) counts as empty."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # (R,)
    ok = r < rows
    b, th = r // TH, r % TH
    cols = tl.arange(0, HEAD_DIM)
    part = b * splits * TH + th  # split 0's row in O_PART / LSE_PART; split s is s * TH further
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for s in range(splits):
        m = tl.maximum(m, tl.load(LSE_PART + part + s * TH, mask=ok, other=float("-inf")))
    if HAS_PREFIX:
        prefix_lse = tl.load(PREFIX_LSE + (r % H) * stride_pl_h + (r // H) * stride_pl_r, mask=ok, other=float("inf"))
        prefix_lse = tl.where(prefix_lse == float("inf"), float("-inf"), prefix_lse)
        m = tl.maximum(m, prefix_lse)
    m = tl.where(m == float("-inf"), 0.0, m)  # every split empty: all weights 0, so any finite m
    acc = tl.zeros([BLOCK_R, HEAD_DIM], dtype=tl.float32)
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    for s in range(splits):
        weight = tl.exp2(tl.load(LSE_PART + part + s * TH, mask=ok, other=float("-inf")) - m)  # (R,)
        o = tl.load(O_PART + (part + s * TH)[:, None] * HEAD_DIM + cols[None, :], mask=ok[:, None], other=0.0)
        acc += tl.where(weight[:, None] > 0, weight[:, None] * o, 0.0)
        total += weight
    if HAS_PREFIX:
        weight = tl.exp2(prefix_lse - m)
        o = tl.load(PREFIX_O + (r // H)[:, None] * stride_po_r + (r % H)[:, None] * stride_po_h + cols[None, :],
                    mask=ok[:, None], other=0.0).to(tl.float32)
        acc += tl.where(weight[:, None] > 0, weight[:, None] * o, 0.0)
        total += weight
    out = acc / tl.where(total > 0, total, 1.0)[:, None]
    tl.store(OUT + r[:, None] * HEAD_DIM + cols[None, :], out.to(OUT.dtype.element_ty), mask=ok[:, None])


# ----------------------------------------------------------------------------------------------------------------
# 3. launchers and the functional API
# ----------------------------------------------------------------------------------------------------------------


class DecodeLaunch(NamedTuple):
    """Keys per tile, warps per program, key-loop pipeline depth (tiles of keys and values in flight)."""

    block_n: int
    num_warps: int
    num_stages: int


# The decode kernel's GPU launch by head dim (D <= 128; 256): a (BLOCK_N, D) tile of keys and one of values per loop
# step, so D = 256 halves the keys a tile holds. `python -m w2s.kernels.sweep --only decode128` times the alternatives
# at the batch-sampling shape; the interpreter takes 16 keys a tile.
GPU_DECODE = {128: DecodeLaunch(64, 4, 2), 256: DecodeLaunch(32, 4, 2)}


def _num_splits(batch_heads, S, block_n, device):
    """Enough key splits to give every SM ~2 programs, but at least 4 key blocks per split."""
    if _interpreting():
        return max(1, min(3, triton.cdiv(S, block_n)))  # several splits so the tests exercise the merge
    return max(1, min(triton.cdiv(2 * _sm_count(device), batch_heads), triton.cdiv(S, 4 * block_n)))


def _integer_rows(x, device):
    """Positions, lengths or cache rows as the kernels read them: contiguous int32 and int64 as they are (the kernels
    convert as they load: no cast launch per call), anything else as contiguous int32 (the kernels read a (B,)
    table by row index); None stays None."""
    if x is None or (x.dtype in (torch.int32, torch.int64) and x.device == device and x.is_contiguous()):
        return x
    dtype = x.dtype if x.dtype in (torch.int32, torch.int64) else torch.int32
    return x.to(device=device, dtype=dtype).contiguous()


def _decode(q, k, v, q_positions, kv_lengths, sliding_window, softcap, scale, kv_rows=None, prefix=None,
            row_prefix=None, prefix_offset=0, skip_row_prefix=False):
    """Launch the split-key decode kernel, then the merge kernel unless one split wrote the output itself ->
    (B, T, H, D) in q's dtype. q_positions / kv_lengths integer tensors (or None), scale a float; kv_rows (B,) or
    None: the cache row of k/v each batch row reads. prefix: (out (B*T, H, D), lse (H, B*T)) of the cascade's flash
    forward over the shared prefix, merged as one more split. row_prefix: (rows, lengths), integer tensors over k's
    rows (attention_decode), counted in positions of k's key 0 = prefix_offset. skip_row_prefix (with row_prefix;
    one split): a row reads none of the keys its lengths entry covers (the per-prompt cascade's second pass)."""
    B, T, H, D = q.shape
    S, KH = k.shape[1], k.shape[2]
    group = H // KH
    if T * group > 128:  # the T*G query rows of a kv head form one tile; beyond 128 it spills (use the flash path)
        raise ValueError(f"attention decode: {T} queries x {group} heads per kv head = {T * group} rows, at most 128; "
                         "use attention(), which sends longer queries to the flash kernel")
    block_m = max(16, triton.next_power_of_2(T * group))
    launch = GPU_DECODE[128 if D <= 128 else 256]
    block_n = 16 if _interpreting() else launch.block_n
    splits = 1 if skip_row_prefix else _num_splits(B * KH, S, block_n, q.device)
    keys_per_split = triton.cdiv(triton.cdiv(S, splits), block_n) * block_n
    splits = triton.cdiv(S, keys_per_split) if S > 0 else 1
    out = torch.empty((B, T, H, D), dtype=q.dtype, device=q.device)
    lse_part = torch.empty((B, splits, T, H), dtype=torch.float32, device=q.device)
    merge = splits > 1 or prefix is not None
    o_part = torch.empty((B, splits, T, H, D), dtype=torch.float32, device=q.device) if merge else out
    prefix_rows, prefix_lens = row_prefix if row_prefix is not None else (None, None)
    _attn_decode_kernel[_grid(splits, B * KH)](
        q, k, v, o_part, lse_part, q_positions, kv_lengths, kv_rows, prefix_rows, prefix_lens, *q.stride()[:3],
        *k.stride()[:3], *v.stride()[:3], *_pos_strides(q_positions), T, S, H, KH, group, keys_per_split,
        prefix_offset, scale, softcap or 1.0, sliding_window or 0, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_KV_ROWS=kv_rows is not None, HAS_ROW_PREFIX=row_prefix is not None, SKIP_ROW_PREFIX=skip_row_prefix,
        PRECISION=_precision(q.dtype),
        **_flags(q_positions, kv_lengths, sliding_window, softcap), num_warps=launch.num_warps,
        num_stages=launch.num_stages)
    if merge:
        _merge_splits(o_part, lse_part, out, prefix)
    return out


def _merge_splits(o_part, lse_part, out, prefix=None):
    """Write into out (B, T, H, D) the merge of the key splits o_part (B, splits, T, H, D) / lse_part (B, splits,
    T, H), fp32 and contiguous, and of the prefix result (out (B*T, H, D), lse (H, B*T)) if given. One launch."""
    B, splits, T, H, D = o_part.shape
    prefix_out, prefix_lse = prefix if prefix is not None else (out[0, 0], lse_part[0, 0])  # unread without one
    rows, block_r = B * T * H, max(1, 2048 // D)  # ~16 fp32 values of a row block per thread (4 warps)
    _merge_splits_kernel[(triton.cdiv(rows, block_r),)](
        o_part, lse_part, out, prefix_out, prefix_lse, rows, T * H, H, splits,
        prefix_out.stride(0), prefix_out.stride(1), prefix_lse.stride(0), prefix_lse.stride(-1),
        HEAD_DIM=D, BLOCK_R=block_r, HAS_PREFIX=prefix is not None, num_warps=4)


def attention_decode(q, k, v, q_positions=None, kv_lengths=None, sliding_window=None, softcap=None, scale=None,
                     kv_rows=None, row_prefix=None):
    """Forward-only attention for a few query tokens against a KV cache (the sampler's hot loop).

    Same contract as w2s.kernels.attention.attention, forward only; at most 128 query rows (T x the GQA group) per kv
    head. For the best speed pass k/v sliced to the longest live cache row, since the key splits cover all S slots.
    kv_rows: optional (B,) integer cache rows: batch row b then attends k[kv_rows[b]], v[kv_rows[b]] (k and v hold
    the cache's rows, any number), read through the index rather than gathered.
    row_prefix: optional (rows, lengths), integer tensors with an entry for each row of k: a promise that
    k[r, :lengths[r]] == k[rows[r], :lengths[r]] (and v alike), as for the samples of one prompt; it changes no value,
    and the kernel reads those keys from row rows[r].
    """
    _check_inputs(q, k, v, q_positions, kv_lengths, sliding_window, softcap, kv_rows)
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _decode(q, k, v, _integer_rows(q_positions, q.device), _integer_rows(kv_lengths, q.device),
                   sliding_window, softcap, scale, _integer_rows(kv_rows, q.device),
                   row_prefix=_row_prefix(row_prefix, k))


def attention_after_shared_prefix(q, k, v, prefix_k, prefix_v, q_positions, sliding_window=None, softcap=None,
                                  scale=None, kv_rows=None, row_prefix=None):
    """Decode attention when keys [0, P) of every row are the same, prefix_k / prefix_v (P, K, D): cascade attention.

    Same result as attention_decode(q, k, v, q_positions, ...). The row's own keys [P, S) go through the decode
    kernel (positions shifted by P, so windows and causality are unchanged); the prefix goes through the flash
    forward kernel once, with all B*T queries as one long row against the P shared keys, so those keys are read
    once per step instead of once per row. The prefix result joins the decode kernel's key splits as one more
    split in the merge kernel. No host sync: CUDA-graph safe. kv_rows and row_prefix as in attention_decode.
    """
    _check_inputs(q, k, v, q_positions, None, sliding_window, softcap, kv_rows)
    B, T, H, D = q.shape
    P = prefix_k.shape[0]
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    positions = _optional_int32(q_positions, q.device)  # (B, T), as the flash forward takes them
    out_p, lse_p = _forward(q.reshape(1, B * T, H, D), _last_dim_contiguous(prefix_k)[None],
                            _last_dim_contiguous(prefix_v)[None], positions.reshape(1, B * T), None, sliding_window,
                            softcap, scale)  # (1, B*T, H, D), (1, H, B*T)
    return _decode(q, k[:, P:], v[:, P:], positions - P, None, sliding_window, softcap, scale,
                   _integer_rows(kv_rows, q.device), prefix=(out_p[0], lse_p[0]), row_prefix=_row_prefix(row_prefix, k),
                   prefix_offset=P)


def attention_after_prompt_groups(q, k, v, q_positions, prompt_groups, sliding_window=None, softcap=None,
                                  scale=None):
    """Decode attention where the rows of one prompt's samples share their prompt's keys: the per-prompt cascade.

    Same result as attention_decode(q, k, v, q_positions, ...) when the promise below holds. q (B, 1, H, D), one
    token a row, batch row b = cache row b of k / v (B, S, K, D). prompt_groups = (members, lengths, starts, M),
    (rows >= B, C >= M), (rows,), (rows,) integer tables over the cache rows and M a Python int: the rows of
    members[g, :M] that are not -1 hold row g's keys [0, lengths[g]) (lengths[g] = 0 for a row that leads no
    group), every row b < B is the member of exactly one group, and starts[b] is the length of that group's keys.
    The first kernel attends each group's keys once for all its members (one tile of M x the GQA group rows a kv
    head, the log-sum-exp kept); the decode kernel attends each row's keys from starts[b] on, merged with the
    first as the cascade's prefix split. No host sync: CUDA-graph safe (the sampler rewrites the tables in place).
    """
    _check_inputs(q, k, v, q_positions, None, sliding_window, softcap)
    members, lengths, starts, M = prompt_groups
    B, T, H, D = q.shape
    KH = k.shape[2]
    group = H // KH
    if (T != 1 or q_positions is None or M * group > 128 or members.shape[0] < B or members.shape[1] < M
            or k.shape[0] != B):
        raise ValueError(f"attention decode: prompt groups need one token a row at explicit positions, k's rows = "
                         f"q's, and tables over at least {B} rows with M x GQA group <= 128; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, members {tuple(members.shape)}, M {M}")
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    positions = _integer_rows(q_positions, q.device)
    members, lengths, starts = (_integer_rows(t, q.device) for t in (members, lengths, starts))
    prefix_o = torch.empty((B, H, D), dtype=q.dtype, device=q.device)
    prefix_lse = torch.empty((H, B), dtype=torch.float32, device=q.device)
    launch = GPU_DECODE[128 if D <= 128 else 256]
    _attn_prompt_group_kernel[_grid(1, B * KH)](
        q, k, v, prefix_o, prefix_lse, positions, members, lengths, q.stride(0), q.stride(2), k.stride(0),
        k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), positions.stride(0), members.stride(0),
        prefix_o.stride(0), prefix_o.stride(1), prefix_lse.stride(0), B, KH, group, M, scale, softcap or 1.0,
        sliding_window or 0, HEAD_DIM=D, BLOCK_M=max(16, triton.next_power_of_2(M * group)),
        BLOCK_N=16 if _interpreting() else launch.block_n, HAS_WINDOW=sliding_window is not None,
        HAS_SOFTCAP=softcap is not None, PRECISION=_precision(q.dtype), num_warps=launch.num_warps,
        num_stages=launch.num_stages)
    return _decode(q, k, v, positions, None, sliding_window, softcap, scale, prefix=(prefix_o, prefix_lse),
                   row_prefix=(starts, starts), skip_row_prefix=True)


def _row_prefix(row_prefix, k):
    """row_prefix checked against k's rows: (rows, lengths), 1-d on k's device with an entry for every row of k
    (more may follow: the sampler's tables cover every cache row); None stays None."""
    if row_prefix is None:
        return None
    rows, lengths = row_prefix
    if any(t.dim() != 1 or t.shape[0] < k.shape[0] or t.device != k.device for t in (rows, lengths)):
        raise ValueError(f"attention decode: row_prefix needs (rows, lengths), 1-d with at least {k.shape[0]} entries "
                         f"(one per row of k) on {k.device}, got {tuple(rows.shape)} on {rows.device} and "
                         f"{tuple(lengths.shape)} on {lengths.device}")
    return rows.contiguous(), lengths.contiguous()  # read by row index; the sampler's own tables are contiguous
