"""Fused lm_head + cross-entropy and lm_head + per-token log-probs, never materializing the (N, V) logits.

At N = 4096 tokens and a 256k vocabulary the logits alone are 4 GB in fp32, and the unfused backward keeps several
copies of them. The chunk loop, the autograd functions and the SFT / DPO gradient strategies are in
chunked_linear.py (plain PyTorch, shared with the CPU path); this file is the GPU row step it calls per chunk:
cuBLAS computes the (rows, V) logits in the input dtype, then one Triton program per row runs the soft-cap, an
online logsumexp and the target's logit, and optionally writes d loss / d logits back into the same buffer, which
cuBLAS turns into gradients of the hidden states and of the lm_head weight. Peak extra memory is one chunk plus the
weight gradient. Chunks are large (CHUNK_BYTES of logits) so the per-chunk read-modify-write of the (V, D) gradient
stays small next to the matmuls.

    python -m pytest -q tests/test_kernels.py -k fused    # CPU, TRITON_INTERPRET=1, against the reference
"""

import torch
import triton
import triton.language as tl

from w2s.kernels import chunked_linear
from w2s.kernels.glu import _tanh  # the soft-cap's tanh: the GeGLU's, which cannot overflow

CHUNK_BYTES = 512 << 20  # one (rows, V) logits chunk in the input dtype: 1024 rows at V=256k in bf16
MAX_BLOCK_V = 4096  # vocabulary columns per step of the row kernel


@triton.jit
def _rows_nll_kernel(logits_ptr, logits_stride, targets_ptr, row_scale_ptr, nll_ptr, V, ignore_index, softcap,
                     HAS_SOFTCAP: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, WRITE_GRAD: tl.constexpr,
                     BLOCK_V: tl.constexpr):
    """One row of raw logits (V,): nll = logsumexp(z) - z[target] with z = softcap * tanh(raw / softcap) (or raw).

    nll is 0 where target == ignore_index. With WRITE_GRAD the raw logits are overwritten in place by
    row_scale * d nll / d raw = row_scale * (softmax(z) - onehot(target)) * (1 - (z / softcap)^2); 0 when ignored.
    """
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_stride
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    # pass 1: online max / sum of exp (rescaled whenever the max grows), and the target's logit
    m = float("-inf")
    s = 0.0
    z_target = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
        z_target += tl.sum(tl.where(cols == target, z, 0.0), axis=0)
    lse = m + tl.log(s)
    tl.store(nll_ptr + row, tl.where(valid, lse - z_target, 0.0))
    if WRITE_GRAD:
        scale = 1.0
        if HAS_ROW_SCALE:
            scale = tl.load(row_scale_ptr + row).to(tl.float32)
        scale = tl.where(valid, scale, 0.0)
        # pass 2: the gradient, written over the logits it came from
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                z = softcap * _tanh(z / softcap)
            grad = tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0)
            if HAS_SOFTCAP:
                tanh_z = z / softcap
                grad = grad * (1.0 - tanh_z * tanh_z)
            tl.store(row_ptr + cols, (grad * scale).to(logits_ptr.dtype.element_ty), mask=mask)


def rows_nll_triton(logits, targets, softcap, ignore_index, row_scale=None, write_grad=False):
    """The row step of chunked_linear.py on GPU: one program per row of logits (rows, V) -> nll (rows,)."""
    rows, V = logits.shape
    nll = torch.empty(rows, dtype=torch.float32, device=logits.device)
    block_v = min(MAX_BLOCK_V, triton.next_power_of_2(V))
    _rows_nll_kernel[(rows,)](logits, logits.stride(0), targets,
                              row_scale if row_scale is not None else nll, nll, V, ignore_index,
                              float(softcap) if softcap is not None else 1.0,
                              HAS_SOFTCAP=softcap is not None, HAS_ROW_SCALE=row_scale is not None,
                              WRITE_GRAD=write_grad, BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4)
    return nll


def linear_cross_entropy(hidden, weight, targets, softcap=None, ignore_index=-100):
    """(loss_sum fp32, n_valid int64) of hidden (N, D) @ weight (V, D).T vs targets (N,); see w2s.kernels.reference."""
    return chunked_linear.linear_cross_entropy(hidden, weight, targets, softcap, ignore_index,
                                               rows_nll=rows_nll_triton, chunk_bytes=CHUNK_BYTES)


def linear_logprobs(hidden, weight, targets, softcap=None, ignore_index=-100):
    """Per-token log p(target) (N,) fp32, 0 where target == ignore_index; see w2s.kernels.reference.linear_logprobs."""
    return chunked_linear.linear_logprobs(hidden, weight, targets, softcap, ignore_index,
                                          rows_nll=rows_nll_triton, chunk_bytes=CHUNK_BYTES)
