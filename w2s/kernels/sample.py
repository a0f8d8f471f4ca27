"""One token per row drawn from logits in Triton: inverse-CDF sampling in one kernel that reads the (B, V) logits in
their own dtype twice, where torch needs a chain of passes over them (an fp32 copy, the division by the temperature,
a softmax, a cumulative sum, a search), each a read and most a write of B x V fp32 values, every decode step.

    token = the first index i with  sum_{j <= i} p_j  >  u * sum_j p_j,    p_j = 2^(l_j * log2(e) / T - m)

with one uniform u in [0, 1) per row and m the row's largest scaled logit. One program per row: the first pass
finds m and the normalizer online, the second walks the row's cumulative sum block by block. A token of probability
0 (logit -inf) is never drawn. Same rule as w2s.kernels.reference.sample_inverse_cdf; the sums run in another order, so
a draw that lands within rounding (~1e-7 relative) of the boundary between two tokens may pick the other one.

The uniforms come from a counter-based hash of each sequence's RNG key and step (`stream_uniforms`): one launch
here for what takes the reference a chain of some forty elementwise ops, bit for bit the same values.

    python -m pytest -q tests/test_kernels.py -k "sampl or uniforms"    # CPU, TRITON_INTERPRET=1, vs the reference
"""

import math

import torch
import triton
import triton.language as tl

BLOCK_V = 4096  # a row's logits per loop step: 8 KB of bf16 in flight per program


@triton.jit
def _sample_kernel(logits_ptr, uniforms_ptr, tokens_ptr, V, row_stride, scale, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * row_stride
    cols = tl.arange(0, BLOCK_V)
    # 1. the row's max m and normalizer sum 2^(x - m), online (base 2: x = logit * log2(e) / T)
    m = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), axis=0)
    total = tl.sum(tl.zeros([BLOCK_V], tl.float32), axis=0)
    for start in range(0, V, BLOCK_V):
        x = tl.load(logits_ptr + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32) * scale
        m_new = tl.maximum(m, tl.max(x, axis=0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # -inf while every logit so far is -inf: total stays 0
        total = total * tl.exp2(m - shift) + tl.sum(tl.exp2(x - shift), axis=0)
        m = m_new
    m = tl.where(m == float("-inf"), 0.0, m)
    target = tl.load(uniforms_ptr + row).to(tl.float32) * total
    # 2. the first index whose cumulative sum exceeds the target; the last index of positive probability in case
    # rounding leaves the whole row's sum at or below it (u close to 1)
    running = tl.sum(tl.zeros([BLOCK_V], tl.float32), axis=0)
    first = tl.max(tl.full([BLOCK_V], V, tl.int32), axis=0)
    last = tl.max(tl.zeros([BLOCK_V], tl.int32), axis=0)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        x = tl.load(logits_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * scale
        p = tl.exp2(x - m)  # (BLOCK_V,)
        cumulative = running + tl.cumsum(p, axis=0)
        first = tl.minimum(first, tl.min(tl.where(cumulative > target, offs, V), axis=0))
        last = tl.maximum(last, tl.max(tl.where(p > 0, offs, 0), axis=0))
        running += tl.sum(p, axis=0)
    tl.store(tokens_ptr + row, tl.where(first < V, first, last).to(tl.int64))


def sample_inverse_cdf(logits, uniforms, temperature=1.0):
    """Tokens (B,) int64 from logits (B, V) (any float dtype, unit stride along V) at temperature > 0, one uniform
    per row (B,)."""
    B, V = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    tokens = torch.empty(B, dtype=torch.int64, device=logits.device)
    block = min(BLOCK_V, triton.next_power_of_2(V))
    if B:
        _sample_kernel[(B,)](logits, uniforms.contiguous(), tokens, V, logits.stride(0),  # uniforms read by index
                             math.log2(math.e) / temperature, BLOCK_V=block, num_warps=min(8, max(1, block // 256)))
    return tokens


@triton.jit
def _lowbias32(x):
    """The lowbias32 mixer on uint32 values (products wrap mod 2**32, shifts are logical: reference.hash32)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _uniforms_kernel(keys_ptr, steps_ptr, uniforms_ptr, B, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = rows < B
    keys = tl.load(keys_ptr + rows, mask=inside, other=0).to(tl.uint32)  # keys < 2**32: the cast drops zero bits
    steps = tl.load(steps_ptr + rows, mask=inside, other=0).to(tl.uint32)  # integer or float counters
    h = _lowbias32(keys ^ _lowbias32(steps * 0x27D4EB2F + 0x165667B1))
    tl.store(uniforms_ptr + rows, (h >> 8).to(tl.float32) * (1.0 / (1 << 24)), mask=inside)


def stream_uniforms(keys, steps):
    """Uniforms in [0, 1) (B,) fp32 for (B,) int64 RNG keys in [0, 2**32) at (B,) step counters (integer or float
    holding integers): reference.stream_uniforms in one launch."""
    B = keys.shape[0]
    uniforms = torch.empty(B, dtype=torch.float32, device=keys.device)
    if B:
        block = min(1024, triton.next_power_of_2(B))
        _uniforms_kernel[(triton.cdiv(B, block),)](keys.contiguous(), steps.contiguous(), uniforms, B, BLOCK=block)
    return uniforms
