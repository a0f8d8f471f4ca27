"""The fused linear losses' chunk loop: lm_head + cross-entropy and lm_head + per-token log-probs over chunks of
tokens, never materializing the (N, V) logits. Plain PyTorch, no Triton: it drives the Triton row kernel on GPU
(fused_linear.py) and, with a row step written in torch ops, it is the CPU path that w2s/ops.py picks.

For each chunk of rows: logits = hidden_chunk @ weight.T (one matmul), a row step computes nll = logsumexp(z) -
z[target] (z = the soft-capped logits) and, when a gradient is wanted, overwrites the logits buffer with
row_scale * d nll / d logits; two more matmuls turn that into the chunk's hidden gradient and its share of the
weight gradient.

- linear_cross_entropy (SFT): the loss is a plain sum, so its gradient is known in the forward (Liger's trick): the
  forward computes d loss_sum / d hidden and d loss_sum / d weight and the backward only scales them by the incoming
  scalar. Three matmuls in all, like the unfused path, but no (N, V) fp32 logits, no log-softmax backward.
- linear_logprobs (DPO/ORPO): the output is a vector whose upstream (N,) gradient arrives only in the backward, so
  the forward keeps just its inputs and the backward recomputes each chunk's logits (one extra matmul).

A row step has the signature rows_nll(logits, targets, softcap, ignore_index, row_scale, write_grad) -> nll (rows,)
fp32, writing the gradient into `logits` in place when write_grad.

    python -m pytest -q tests/test_kernels.py -k "cross_entropy or logprobs or fused"   # both row steps vs reference
"""

import torch

# CPU chunk size: 32 MiB of logits (1024 fp32 rows at V = 8192), the fastest of the chunk sizes tried on CPU.
CPU_CHUNK_BYTES = 32 << 20
# Every chunk read-modify-writes the whole (V, D) weight gradient, a cost a chunk's matmuls amortize only over enough
# rows: never fewer than this (at V = 256k in fp32: 128 rows = 128 MiB of logits). Tests lower it to reach many chunks.
MIN_CHUNK_ROWS = 128


def rows_nll_torch(logits, targets, softcap, ignore_index, row_scale=None, write_grad=False):
    """The row step in torch ops (fp32 math, any device). logits (rows, V) -> nll (rows,) fp32; see module doc."""
    valid = targets != ignore_index
    safe = targets.clamp(min=0)[:, None]  # (rows, 1); ignored rows read column 0 and are zeroed below
    z = logits.float()
    if softcap is not None:
        tanh_z = torch.tanh(z / softcap)
        z = softcap * tanh_z
    logp = torch.log_softmax(z, dim=-1)  # (rows, V) fp32; one fused pass, unlike logsumexp + subtract
    nll = torch.where(valid, -logp.gather(1, safe).squeeze(1), 0.0)
    if write_grad:
        # d nll / d z = softmax(z) - onehot(target); through the cap: * (1 - tanh^2). Written straight into the
        # logits buffer when it is fp32 (the raw logits are not needed any more), else computed in fp32 and cast.
        grad = torch.exp(logp, out=logits) if logits.dtype == torch.float32 else logp.exp_()
        grad.scatter_add_(1, safe, torch.full_like(nll[:, None], -1.0))
        if softcap is not None:
            grad.mul_(1.0 - tanh_z * tanh_z)
        scale = valid.to(grad.dtype) if row_scale is None else torch.where(valid, row_scale.float(), 0.0)
        grad.mul_(scale[:, None])
        if grad is not logits:
            logits.copy_(grad)
    return nll


def _chunk_rows(N, V, element_size, chunk_bytes):
    rows = max(MIN_CHUNK_ROWS, chunk_bytes // (V * element_size))
    if rows >= 128:
        rows = rows // 128 * 128  # whole matmul tiles
    return max(1, min(N, rows))  # at least 1: N = 0 (an empty micro-batch) is a loop over nothing, not a zero step


def nll_and_grads(hidden, weight, targets, softcap, ignore_index, need_hidden_grad, need_weight_grad, rows_nll,
                  chunk_bytes, row_scale=None):
    """Chunked over tokens: nll (N,) fp32, and (optionally) row_scale-weighted grads of sum(nll) wrt hidden, weight.

    The weight gradient accumulates in the weight's dtype across chunks (the matmul adds in fp32 inside each chunk;
    one rounding per chunk), as Liger does: an fp32 accumulator would double the memory this exists to save.
    """
    N, V = hidden.shape[0], weight.shape[0]
    write_grad = need_hidden_grad or need_weight_grad
    nll = torch.empty(N, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_hidden_grad else None
    grad_weight = torch.zeros_like(weight, memory_format=torch.contiguous_format) if need_weight_grad else None
    rows = _chunk_rows(N, V, hidden.element_size(), chunk_bytes)
    # One (rows, V) buffer serves every chunk: `logits = h @ weight.t()` would hold the previous chunk's logits
    # until the next one is computed, two chunks at the peak.
    buffer = torch.empty(rows, V, dtype=hidden.dtype, device=hidden.device)
    for start in range(0, N, rows):
        end = min(N, start + rows)
        h = hidden[start:end]
        logits = torch.mm(h, weight.t(), out=buffer[: end - start])  # (rows, V) in the input dtype
        scale = row_scale[start:end] if row_scale is not None else None
        nll[start:end] = rows_nll(logits, targets[start:end], softcap, ignore_index, scale, write_grad)
        if need_hidden_grad:
            torch.mm(logits, weight, out=grad_hidden[start:end])  # (rows, V) @ (V, D)
        if need_weight_grad:
            grad_weight.addmm_(logits.t(), h)  # (V, rows) @ (rows, D), accumulated over chunks
    return nll, grad_hidden, grad_weight


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, ignore_index, rows_nll, chunk_bytes):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        nll, grad_hidden, grad_weight = nll_and_grads(hidden, weight, targets, softcap, ignore_index, need_h, need_w,
                                                      rows_nll, chunk_bytes)
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
        return grad_hidden, grad_weight, None, None, None, None, None


class LinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, ignore_index, rows_nll, chunk_bytes):
        nll, _, _ = nll_and_grads(hidden, weight, targets, softcap, ignore_index, False, False, rows_nll, chunk_bytes)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.args = softcap, ignore_index, rows_nll, chunk_bytes
        return 0.0 - nll  # (not -nll: ignored rows are +0.0, as in the reference)

    @staticmethod
    def backward(ctx, grad_logprobs):
        hidden, weight, targets = ctx.saved_tensors
        softcap, ignore_index, rows_nll, chunk_bytes = ctx.args
        # logprob = -nll, so row i of d loss / d nll is -grad_logprobs[i]
        row_scale = (-grad_logprobs).float().contiguous()
        _, grad_hidden, grad_weight = nll_and_grads(hidden, weight, targets, softcap, ignore_index,
                                                    ctx.needs_input_grad[0], ctx.needs_input_grad[1], rows_nll,
                                                    chunk_bytes, row_scale)
        return grad_hidden, grad_weight, None, None, None, None, None


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


def linear_cross_entropy(hidden, weight, targets, softcap=None, ignore_index=-100, rows_nll=rows_nll_torch,
                         chunk_bytes=None):
    """(loss_sum fp32, n_valid int64) of hidden (N, D) @ weight (V, D).T vs targets (N,); see w2s.kernels.reference."""
    _check(hidden, weight, targets, "linear_cross_entropy")
    targets, chunk_bytes = targets.contiguous(), chunk_bytes or CPU_CHUNK_BYTES
    if not _needs_grad(hidden, weight):  # evaluation: no gradient work at all
        nll, _, _ = nll_and_grads(hidden, weight, targets, softcap, ignore_index, False, False, rows_nll, chunk_bytes)
        return nll.sum(), (targets != ignore_index).sum()
    return LinearCrossEntropyFunction.apply(hidden, weight, targets, softcap, ignore_index, rows_nll, chunk_bytes)


def linear_logprobs(hidden, weight, targets, softcap=None, ignore_index=-100, rows_nll=rows_nll_torch,
                    chunk_bytes=None):
    """Per-token log p(target) (N,) fp32, 0 where target == ignore_index; see w2s.kernels.reference.linear_logprobs."""
    _check(hidden, weight, targets, "linear_logprobs")
    targets, chunk_bytes = targets.contiguous(), chunk_bytes or CPU_CHUNK_BYTES
    if not _needs_grad(hidden, weight):
        nll, _, _ = nll_and_grads(hidden, weight, targets, softcap, ignore_index, False, False, rows_nll, chunk_bytes)
        return 0.0 - nll
    return LinearLogprobsFunction.apply(hidden, weight, targets, softcap, ignore_index, rows_nll, chunk_bytes)
