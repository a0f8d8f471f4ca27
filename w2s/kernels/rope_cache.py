"""RoPE fused with the KV-cache write, in Triton: one launch per layer and sampler step instead of four.

Same contract as w2s.kernels.reference.rope_cache_write: q (B, T, H, D) and k (B, T, K, D) are rotated to their (B, T)
positions (half-split convention, rounded at the same places as rope.py and the reference); the rotated k
and the unchanged v are stored into the head-major cache buffers (slots, K, S, D) at [rows[b], :, positions[b, t]],
and the rotated q is returned. q, k and v may be strided views (the sampler passes the column blocks of one fused
q/k/v projection); the cache must be contiguous in its last dim and of k's dtype.

One program handles one token (b, t) and a block of heads: it computes cos/sin once, rotates its q heads, and, when
its block reaches into the K kv heads, rotates and stores k and copies v. Inference only (no autograd).

    python -m pytest -q tests/test_kernels.py -k rope_cache     # CPU, TRITON_INTERPRET=1, against the reference
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate(src_ptr, offs, mask, cos, sin, HALF, dtype):
    """(y1, y2) of the rotation of the halves at src_ptr + offs (and + HALF), rounded like eager PyTorch."""
    x1 = tl.load(src_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src_ptr + offs + HALF, mask=mask, other=0.0).to(tl.float32)
    y1 = (x1 * cos).to(dtype).to(tl.float32) + (-x2 * sin).to(dtype).to(tl.float32)
    y2 = (x2 * cos).to(dtype).to(tl.float32) + (x1 * sin).to(dtype).to(tl.float32)
    return y1.to(dtype), y2.to(dtype)


@triton.jit
def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, rows_ptr, inv_freq_ptr,
                       T, H, K, HALF,
                       q_sb, q_st, q_sh, k_sb, k_st, k_sh, v_sb, v_st, v_sh, o_sb, o_st, o_sh,
                       kc_sr, kc_sh, kc_ss, vc_sr, vc_sh, vc_ss, pos_sb, pos_st,
                       HAS_ROWS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    token = tl.program_id(0)
    b = (token // T).to(tl.int64)
    t = (token % T).to(tl.int64)
    first_head = tl.program_id(1) * BLOCK_H
    heads = (first_head + tl.arange(0, BLOCK_H)).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < HALF
    pos = tl.load(pos_ptr + b * pos_sb + t * pos_st).to(tl.int64)
    angle = pos.to(tl.float32) * tl.load(inv_freq_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dtype = q_out_ptr.dtype.element_ty
    cos = tl.cos(angle).to(dtype).to(tl.float32)[None, :]  # (1, BLOCK_HALF)
    sin = tl.sin(angle).to(dtype).to(tl.float32)[None, :]

    q_mask = (heads[:, None] < H) & col_mask[None, :]  # (BLOCK_H, BLOCK_HALF)
    y1, y2 = _rotate(q_ptr, b * q_sb + t * q_st + heads[:, None] * q_sh + cols[None, :], q_mask, cos, sin, HALF,
                     dtype)
    o_offs = b * o_sb + t * o_st + heads[:, None] * o_sh + cols[None, :]
    tl.store(q_out_ptr + o_offs, y1, mask=q_mask)
    tl.store(q_out_ptr + o_offs + HALF, y2, mask=q_mask)

    if first_head < K:  # this block also holds kv heads: rotate k, store k and v at (row, head, pos)
        if HAS_ROWS:
            row = tl.load(rows_ptr + b).to(tl.int64)
        else:
            row = b
        kv_mask = (heads[:, None] < K) & col_mask[None, :]
        y1, y2 = _rotate(k_ptr, b * k_sb + t * k_st + heads[:, None] * k_sh + cols[None, :], kv_mask, cos, sin,
                         HALF, dtype)
        kc_offs = row * kc_sr + heads[:, None] * kc_sh + pos * kc_ss + cols[None, :]
        tl.store(k_cache_ptr + kc_offs, y1, mask=kv_mask)
        tl.store(k_cache_ptr + kc_offs + HALF, y2, mask=kv_mask)
        v_offs = b * v_sb + t * v_st + heads[:, None] * v_sh + cols[None, :]
        vc_offs = row * vc_sr + heads[:, None] * vc_sh + pos * vc_ss + cols[None, :]
        v1 = tl.load(v_ptr + v_offs, mask=kv_mask, other=0.0)
        v2 = tl.load(v_ptr + v_offs + HALF, mask=kv_mask, other=0.0)
        tl.store(v_cache_ptr + vc_offs, v1, mask=kv_mask)
        tl.store(v_cache_ptr + vc_offs + HALF, v2, mask=kv_mask)


def _check(q, k, v, positions, inv_freq, k_cache, v_cache, rows):
    B, T, H, D = q.shape
    K = k.shape[2]
    if q.dim() != 4 or D % 2 or k.shape != (B, T, K, D) or v.shape != k.shape or H % K:
        raise ValueError(f"rope_cache_write: expected q (B, T, H, D) with even D and k, v (B, T, K, D), K | H; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if positions.shape != (B, T) or inv_freq.numel() != D // 2:
        raise ValueError(f"rope_cache_write: positions {tuple(positions.shape)} (expected {(B, T)}), inv_freq "
                         f"{inv_freq.numel()} entries (expected {D // 2})")
    if k_cache.dim() != 4 or k_cache.shape[1] != K or k_cache.shape[3] != D or v_cache.shape != k_cache.shape:
        raise ValueError(f"rope_cache_write: caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)} are not "
                         f"(slots, {K}, S, {D})")
    if not (k_cache.dtype == v_cache.dtype == k.dtype == v.dtype == q.dtype):
        raise ValueError(f"rope_cache_write: q, k, v and the caches must share one dtype, got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if rows is not None and rows.shape != (B,):
        raise ValueError(f"rope_cache_write: rows {tuple(rows.shape)}, expected ({B},)")


def rope_cache_write(q, k, v, positions, inv_freq, k_cache, v_cache, rows=None):
    """Rotated q (B, T, H, D); rotated k and v written into k_cache / v_cache (slots, K, S, D) at [rows, :, positions].
    Same contract as w2s.kernels.reference.rope_cache_write."""
    _check(q, k, v, positions, inv_freq, k_cache, v_cache, rows)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    inv_freq, rows = (None if x is None else x.contiguous() for x in (inv_freq, rows))  # read by index
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("rope_cache_write: the caches must be contiguous in their last dim (written in place)")
    B, T, H, D = q.shape
    K = k.shape[2]
    half = D // 2
    out = torch.empty((B, T, H, D), dtype=q.dtype, device=q.device)
    if B * T == 0:
        return out
    block_half = triton.next_power_of_2(half)
    block_h = max(1, min(triton.next_power_of_2(H), 4096 // block_half))  # ~4k elements of each half per program
    grid = (B * T, triton.cdiv(H, block_h))  # H >= K: the first blocks cover the kv heads too
    _rope_cache_kernel[grid](
        q, k, v, out, k_cache, v_cache, positions, positions if rows is None else rows, inv_freq, T, H, K, half,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), positions.stride(0), positions.stride(1),
        HAS_ROWS=rows is not None, BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=4)
    return out
