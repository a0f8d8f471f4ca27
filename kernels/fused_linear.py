"""Fused lm_head + cross-entropy and lm_head + per-token log-probs, never materializing the (N, V) logits.

At N = 4096 tokens and a 256k vocabulary the logits alone are 4 GB in fp32, and the unfused backward keeps several
copies of them. Here the tokens are processed in chunks of rows: for each chunk, cuBLAS computes the (rows, V)
logits in the input dtype, a Triton kernel runs over each row (soft-cap, online logsumexp, the target's logit, and
optionally d loss / d logits written back into the same buffer), and cuBLAS turns that chunk's logit gradient into
gradients of the hidden states and of the lm_head weight. Peak extra memory is one chunk plus the weight gradient.

- linear_cross_entropy (SFT): the loss is a plain sum, so its gradient is known during the forward (Liger's trick):
  the forward computes d loss_sum / d hidden and d loss_sum / d weight chunk by chunk and the backward only scales
  them by the incoming scalar gradient. Three matmuls in total, like the unfused path.
- linear_logprobs (DPO/ORPO, RL): the output is a vector, so its gradient depends on the upstream (N,) gradient that
  only arrives in the backward. The forward keeps nothing but the inputs; the backward recomputes each chunk's logits
  (one extra matmul) and scales row i by its upstream gradient. Any function of the log-probs can be differentiated.

The weight gradient is accumulated in the weight's dtype across chunks (cuBLAS adds in fp32 inside each matmul;
one rounding per chunk), as Liger does: an fp32 accumulator would double the memory this file exists to save.
Chunks are large (CHUNK_BYTES of logits) so the per-chunk read-modify-write of the (V, D) gradient stays small
next to the matmuls.

    python -m pytest -q tests/test_kernels.py -k fused    # CPU, TRITON_INTERPRET=1, against the reference
"""

import torch
import triton
import triton.language as tl

CHUNK_BYTES = 512 << 20  # one (rows, V) logits chunk in the input dtype: 1024 rows at V=256k in bf16
MAX_BLOCK_V = 4096  # vocabulary columns per step of the row kernel


@triton.jit
def _tanh(z):
    # tl has no tanh: tanh|z| = (1 - e) / (1 + e) with e = exp(-2|z|) in (0, 1], which cannot overflow
    e = tl.exp(-2.0 * tl.abs(z))
    magnitude = (1.0 - e) / (1.0 + e)
    return tl.where(z >= 0, magnitude, -magnitude)


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


def _chunk_rows(N, V, element_size):
    rows = max(1, CHUNK_BYTES // (V * element_size))
    if rows >= 128:
        rows = rows // 128 * 128  # whole matmul tiles
    return max(1, min(N, rows))  # at least 1: N = 0 (an empty micro-batch) is a loop over nothing, not a zero step


def _chunk_nll(hidden_chunk, weight, targets_chunk, softcap, ignore_index, row_scale=None, write_grad=False):
    """-> (nll (rows,) fp32, logits buffer (rows, V): raw logits, or d/d logits when write_grad)."""
    logits = hidden_chunk @ weight.t()  # (rows, V) in the input dtype, fp32 accumulation inside cuBLAS
    rows, V = logits.shape
    nll = torch.empty(rows, dtype=torch.float32, device=logits.device)
    block_v = min(MAX_BLOCK_V, triton.next_power_of_2(V))
    _rows_nll_kernel[(rows,)](logits, logits.stride(0), targets_chunk,
                              row_scale if row_scale is not None else nll, nll, V, ignore_index,
                              float(softcap) if softcap is not None else 1.0,
                              HAS_SOFTCAP=softcap is not None, HAS_ROW_SCALE=row_scale is not None,
                              WRITE_GRAD=write_grad, BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4)
    return nll, logits


def _nll_and_grads(hidden, weight, targets, softcap, ignore_index, need_hidden_grad, need_weight_grad,
                   row_scale=None):
    """Chunked over tokens: nll (N,) fp32, and (optionally) row_scale-weighted grads of sum(nll) wrt hidden, weight."""
    N, V = hidden.shape[0], weight.shape[0]
    write_grad = need_hidden_grad or need_weight_grad
    nll = torch.empty(N, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_hidden_grad else None
    grad_weight = torch.zeros_like(weight, memory_format=torch.contiguous_format) if need_weight_grad else None
    rows = _chunk_rows(N, V, hidden.element_size())
    for start in range(0, N, rows):
        end = min(N, start + rows)
        h = hidden[start:end]
        scale = row_scale[start:end] if row_scale is not None else None
        nll[start:end], grad_logits = _chunk_nll(h, weight, targets[start:end], softcap, ignore_index, scale,
                                                 write_grad)
        if need_hidden_grad:
            torch.mm(grad_logits, weight, out=grad_hidden[start:end])  # (rows, V) @ (V, D)
        if need_weight_grad:
            grad_weight.addmm_(grad_logits.t(), h)  # (V, rows) @ (rows, D), accumulated over chunks
    return nll, grad_hidden, grad_weight


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, ignore_index):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        nll, grad_hidden, grad_weight = _nll_and_grads(hidden, weight, targets, softcap, ignore_index, need_h, need_w)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.used = False
        n_valid = (targets != ignore_index).sum()
        ctx.mark_non_differentiable(n_valid)
        return nll.sum(), n_valid

    @staticmethod
    def backward(ctx, grad_loss, _grad_n_valid):
        if ctx.used:  # the saved gradients are scaled in place below, so a second backward would be wrong
            raise RuntimeError("linear_cross_entropy: a second backward through the same loss is unsupported")
        ctx.used = True
        grad_hidden, grad_weight = ctx.saved_tensors
        # the gradients were computed for d(loss_sum) = 1; scale in place (no host sync to test for 1.0)
        if grad_hidden is not None:
            grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight.mul_(grad_loss.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None, None


class LinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, ignore_index):
        nll, _, _ = _nll_and_grads(hidden, weight, targets, softcap, ignore_index, False, False)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.softcap, ctx.ignore_index = softcap, ignore_index
        return 0.0 - nll  # (not -nll: ignored rows are +0.0, as in the reference)

    @staticmethod
    def backward(ctx, grad_logprobs):
        hidden, weight, targets = ctx.saved_tensors
        # logprob = -nll, so row i of d loss / d nll is -grad_logprobs[i]
        row_scale = (-grad_logprobs).float().contiguous()
        _, grad_hidden, grad_weight = _nll_and_grads(hidden, weight, targets, ctx.softcap, ctx.ignore_index,
                                                     ctx.needs_input_grad[0], ctx.needs_input_grad[1], row_scale)
        return grad_hidden, grad_weight, None, None, None


def _check(hidden, weight, targets, name):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{name}: expected hidden (N, D) and weight (V, D), got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"{name}: targets shape {tuple(targets.shape)} != (N,) = ({hidden.shape[0]},)")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"{name}: hidden dtype {hidden.dtype} != weight dtype {weight.dtype}")


def _needs_grad(hidden, weight):
    return torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)


def linear_cross_entropy(hidden, weight, targets, softcap=None, ignore_index=-100):
    """(loss_sum fp32, n_valid int64) of hidden (N, D) @ weight (V, D).T vs targets (N,); see kernels.reference."""
    _check(hidden, weight, targets, "linear_cross_entropy")
    targets = targets.contiguous()
    if not _needs_grad(hidden, weight):  # evaluation: no gradient work at all
        nll, _, _ = _nll_and_grads(hidden, weight, targets, softcap, ignore_index, False, False)
        return nll.sum(), (targets != ignore_index).sum()
    return LinearCrossEntropyFunction.apply(hidden, weight, targets, softcap, ignore_index)


def linear_logprobs(hidden, weight, targets, softcap=None, ignore_index=-100):
    """Per-token log p(target) (N,) fp32, 0 where target == ignore_index; see kernels.reference.linear_logprobs."""
    _check(hidden, weight, targets, "linear_logprobs")
    targets = targets.contiguous()
    if not _needs_grad(hidden, weight):
        nll, _, _ = _nll_and_grads(hidden, weight, targets, softcap, ignore_index, False, False)
        return 0.0 - nll
    return LinearLogprobsFunction.apply(hidden, weight, targets, softcap, ignore_index)
