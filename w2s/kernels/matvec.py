"""Matrix-vector product in Triton for one activation row: the projections of a batch-1 decode step.

    matvec(x, weight, bias)                     y (1, N) = x (1, K) @ weight (N, K)^T (+ bias (N,))
    matvec(x, weight, accumulate_into=residual) residual (1, N) += x @ weight^T, in place (the down projection's
                                                residual add, as fused.add_projection's addmm_)

With one row a projection reads its weight once and does two FLOPs per weight element: its time is the weight's
bytes over the memory bandwidth, and all that matters is keeping enough loads in flight over the whole chip. A GEMM
library's one-row path reaches that on some shapes only, and splits long rows over several blocks whose partial sums
a second kernel adds. Here each program owns BLOCK_N output rows and walks all of K in BLOCK_K chunks: a
(BLOCK_N, BLOCK_K) tile of the row-major weight, contiguous along K (coalesced, 16-byte loads per thread), times the
matching chunk of x, summed into an fp32 tile that is reduced over K once at the end. K is never split, so there is
one launch and no partial sums in memory; the grid is N / BLOCK_N programs, enough to fill the GPU at every
projection of a 7B-class model. The K loop runs as a software pipeline (tl.range's num_stages): the next chunks'
loads are issued while the current one is summed.

Numerics: fp32 products and sums, the bias or the residual added in fp32, one rounding to the output dtype at the end
(as a GEMM's epilogue with bias, and addmm's beta = 1, round once). The summation order differs from cuBLAS's, so the
last bits may differ.

Launches: GPU_LAUNCH below, by weight element size (sweep.py times alternatives); the CPU interpreter takes tiny
blocks so that tiny test shapes still span several programs and chunks.

    python -m pytest -q tests/test_kernel_matvec.py          # CPU, TRITON_INTERPRET=1, against F.linear / addmm
    python -m pytest -q -m gpu tests/test_kernel_matvec.py   # bf16 at the Llama-3-8B shapes
"""

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl


class Launch(NamedTuple):
    """Rows of the output per program, columns of K per loaded chunk, warps per program, K-loop pipeline depth."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# GPU launches by bytes per weight element. A program streams BLOCK_N x BLOCK_K weights per chunk: 512 16-bit columns
# are one 16-byte load for each of 64 threads, so 4 warps read 2 rows per load instruction and 8 rows in 4; fp32 takes
# half the columns for the same bytes. BLOCK_N stays small so that even N = 4096 gives several programs per SM (their
# loads in flight hide each other's latency), and the K loop runs two chunks ahead. One launch serves every K:
# sweep.py times the alternatives at the Llama-3-8B shapes (4 or 16 rows, wider chunks for the down projection's
# long rows, 8 warps, no pipeline or a deeper one).
GPU_LAUNCH = {2: Launch(8, 512, 4, 3), 4: Launch(8, 256, 4, 3)}
INTERPRETER_LAUNCH = Launch(4, 16, 1, 1)


@triton.jit
def _matvec_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, N, K, x_stride, w_stride, y_stride, HAS_BIAS: tl.constexpr,
                   ACCUMULATE: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   K_STAGES: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    in_n = rows < N
    # Rows past N (the last program's) read row N - 1 again rather than masking the loads, so the weight loads stay
    # unmasked along N; their sums are never stored. int64: N * K may pass 2^31.
    w_rows = w_ptr + tl.minimum(rows, N - 1).to(tl.int64)[:, None] * w_stride  # (BLOCK_N, 1)
    cols = tl.arange(0, BLOCK_K)  # (BLOCK_K,)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k in tl.range(0, K, BLOCK_K, num_stages=K_STAGES):
        if EVEN_K:  # K a multiple of BLOCK_K: no mask, nothing to stand in the way of 16-byte loads
            x = tl.load(x_ptr + (k + cols) * x_stride)
            w = tl.load(w_rows + (k + cols)[None, :])
        else:
            in_k = k + cols < K
            x = tl.load(x_ptr + (k + cols) * x_stride, mask=in_k, other=0.0)
            w = tl.load(w_rows + (k + cols)[None, :], mask=in_k[None, :], other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]  # (BLOCK_N, BLOCK_K): one reduction after the loop
    y = tl.sum(acc, axis=1)  # (BLOCK_N,)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=in_n, other=0.0).to(tl.float32)
    if ACCUMULATE:  # y_ptr is the residual row: the sum is written over it
        y += tl.load(y_ptr + rows * y_stride, mask=in_n, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows * y_stride, y.to(y_ptr.dtype.element_ty), mask=in_n)


def launch_for(weight):
    """The launch for this weight: tiny blocks under the interpreter, else GPU_LAUNCH's entry."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return INTERPRETER_LAUNCH
    return GPU_LAUNCH[min(weight.element_size(), 4)]


def matvec(x, weight, bias=None, accumulate_into=None, launch=None):
    """x (..., K) holding one row (x.numel() == K, any stride) @ weight (N, K)^T (unit stride along K), + bias (N,):
    a new (..., N) tensor in x's dtype. With accumulate_into (..., N), one row of x's dtype: the product is added into
    it in place (no bias) and it is returned. launch: a Launch instead of launch_for's (sweep.py)."""
    K = x.shape[-1]
    N = weight.shape[0]
    if x.numel() != K or K == 0 or weight.dim() != 2 or weight.shape[1] != K or weight.stride(1) != 1:
        raise ValueError(f"matvec: x {tuple(x.shape)} must be one row of K = weight's columns; weight "
                         f"{tuple(weight.shape)} (N, K) with unit stride along K")
    if weight.dtype != x.dtype or (bias is not None and (bias.shape != (N,) or bias.dtype != x.dtype)):
        raise ValueError(f"matvec: x {x.dtype}, weight {weight.dtype} and bias (N,) must share one dtype")
    if accumulate_into is None:
        out = torch.empty((*x.shape[:-1], N), dtype=x.dtype, device=x.device)
    else:
        out = accumulate_into
        if out.numel() != N or out.shape[-1] != N or out.dtype != x.dtype or bias is not None:
            raise ValueError(f"matvec: accumulate_into {tuple(out.shape)} {out.dtype} must be one row of N = {N} in "
                             f"x's dtype {x.dtype}, without a bias")
    # one row: reshape to (K,) / (N,) only drops size-1 dims, so these are views (x read, out written in place)
    x_row, out_row = x.reshape(K), out.reshape(N)
    bias = bias.contiguous() if bias is not None else None
    launch = launch or launch_for(weight)
    if N == 0:  # nothing to compute or launch
        return out
    grid = (triton.cdiv(N, launch.block_n),)
    _matvec_kernel[grid](x_row, weight, bias if bias is not None else weight, out_row, N, K, x_row.stride(0),
                         weight.stride(0), out_row.stride(0), HAS_BIAS=bias is not None,
                         ACCUMULATE=accumulate_into is not None, EVEN_K=K % launch.block_k == 0,
                         BLOCK_N=launch.block_n, BLOCK_K=launch.block_k, K_STAGES=launch.num_stages,
                         num_warps=launch.num_warps)
    return out
