"""Rotary position embedding in Triton (half-split convention), forward and backward.

With x = [x1, x2] split on the head dim and angle = position * inv_freq (fp32), the reference computes

    y1 = x1 * cos - x2 * sin        y2 = x2 * cos + x1 * sin

with cos/sin cast to x.dtype and every product and sum rounded to x.dtype, as transformers does; the kernel rounds
at the same places, so bf16/fp16 results match the reference bit for bit up to the last ulp of cos/sin.
The backward is the inverse rotation (the transpose of a rotation matrix), i.e. the same kernel with -sin.
One program handles one token (b, t) and a block of heads, so cos/sin are computed once per token, not per head.
positions and inv_freq get no gradient.

    python -m pytest -q tests/test_kernels.py -k rope    # CPU, TRITON_INTERPRET=1, against the reference
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(x_ptr, y_ptr, pos_ptr, inv_freq_ptr, T, H, HALF,
                 x_sb, x_st, x_sh, y_sb, y_st, y_sh, pos_sb, pos_st,
                 SIGN: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    token = tl.program_id(0)
    b = (token // T).to(tl.int64)
    t = (token % T).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < HALF
    pos = tl.load(pos_ptr + b * pos_sb + t * pos_st).to(tl.float32)
    angle = pos * tl.load(inv_freq_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)  # (BLOCK_HALF,)
    dtype = y_ptr.dtype.element_ty
    cos = tl.cos(angle).to(dtype).to(tl.float32)[None, :]
    sin = (SIGN * tl.sin(angle)).to(dtype).to(tl.float32)[None, :]
    mask = (heads[:, None] < H) & col_mask[None, :]
    x_offs = b * x_sb + t * x_st + heads[:, None].to(tl.int64) * x_sh + cols[None, :]
    x1 = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_offs + HALF, mask=mask, other=0.0).to(tl.float32)
    # round each product, then the sum, to the tensor dtype (what eager PyTorch does in x * cos + rotated * sin)
    y1 = (x1 * cos).to(dtype).to(tl.float32) + (-x2 * sin).to(dtype).to(tl.float32)
    y2 = (x2 * cos).to(dtype).to(tl.float32) + (x1 * sin).to(dtype).to(tl.float32)
    y_offs = b * y_sb + t * y_st + heads[:, None].to(tl.int64) * y_sh + cols[None, :]
    tl.store(y_ptr + y_offs, y1.to(dtype), mask=mask)
    tl.store(y_ptr + y_offs + HALF, y2.to(dtype), mask=mask)


def rope_apply(x, positions, inv_freq, inverse=False):
    """Rotate x (B, T, H, D) by positions (B, T); inverse=True rotates by -angle (the backward)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    inv_freq = inv_freq.contiguous()  # read by index
    B, T, H, D = x.shape
    half = D // 2
    y = torch.empty((B, T, H, D), dtype=x.dtype, device=x.device)
    block_half = triton.next_power_of_2(half)
    block_h = max(1, min(triton.next_power_of_2(H), 4096 // block_half))  # ~4k elements of each half per program
    grid = (B * T, triton.cdiv(H, block_h))
    _rope_kernel[grid](x, y, positions, inv_freq, T, H, half,
                       x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2),
                       positions.stride(0), positions.stride(1),
                       SIGN=-1.0 if inverse else 1.0, BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=4)
    return y


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, positions, inv_freq):
        ctx.save_for_backward(positions, inv_freq)
        return rope_apply(x, positions, inv_freq)

    @staticmethod
    def backward(ctx, dy):
        positions, inv_freq = ctx.saved_tensors
        return rope_apply(dy, positions, inv_freq, inverse=True), None, None


def rope(x, positions, inv_freq):
    """Rotary embedding of x (B, T, H, D) at positions (B, T); same contract as w2s.kernels.reference.rope."""
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"rope: expected x of shape (B, T, H, D) with even D, got {tuple(x.shape)}")
    if positions.shape != x.shape[:2]:
        raise ValueError(f"rope: positions shape {tuple(positions.shape)} != (B, T) = {tuple(x.shape[:2])}")
    if inv_freq.numel() != x.shape[-1] // 2:
        raise ValueError(f"rope: inv_freq has {inv_freq.numel()} entries, expected D/2 = {x.shape[-1] // 2}")
    return RoPEFunction.apply(x, positions, inv_freq)
