"""The one switch between the Triton kernels (w2s/kernels/*.py) and their pure-PyTorch spec (w2s/kernels/reference.py).

Every hot op of the model and the losses goes through a function here. The backend is chosen per call:

    W2S_KERNELS=auto       (default) Triton for CUDA tensors, the reference for anything else (CPU), except two
                           CPU implementations with the reference's math and less memory traffic: attention
                           through torch SDPA (w2s/kernels/sdpa_attention.py, with cascade decoding over a shared
                           prefix) and the chunked fused linear losses (w2s/kernels/chunked_linear.py)
    W2S_KERNELS=triton     Triton always (on CPU only under TRITON_INTERPRET=1, which is how the tests run it)
    W2S_KERNELS=reference  the reference always (debugging, parity checks on GPU)

`set_backend(name)` does the same from Python. There is no silent fallback: asking for Triton where it cannot run
raises an error instead of quietly running the slow path.

Only the choice lives here; every implementation is a module of w2s/kernels/. Attention has a second choice on each
side: on Triton `use_decode_kernel` picks the decode kernel or the flash kernel (and CASCADE_MIN_PREFIX the
cascade over a shared prefix), on CPU `w2s.kernels.sdpa_attention.supports` says where SDPA stands in for the reference.
The projections (`linear`, `add_linear_`) are torch's matmuls but for one row without gradients on Triton (a batch-1
decode step), where the matrix-vector kernel w2s/kernels/matvec.py serves them while TRITON_MATVEC is on.

Test: python -m pytest -q tests/test_kernels.py tests/test_kernel_attention.py   (without CUDA the Triton
side runs under TRITON_INTERPRET=1, which those test files set)
"""

import importlib
import os

import torch
import torch.nn.functional as F

from w2s.kernels import chunked_linear, reference, sdpa_attention

BACKENDS = ("auto", "triton", "reference")
_backend = os.environ.get("W2S_KERNELS", "auto")
if _backend not in BACKENDS:
    raise ValueError(f"W2S_KERNELS={_backend!r}: expected one of {', '.join(BACKENDS)}")


def set_backend(name):
    """Select 'auto', 'triton' or 'reference' for every later call."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"kernel backend {name!r}: expected one of {', '.join(BACKENDS)}")
    _backend = name


def get_backend():
    return _backend


def _use_triton(tensor):
    """Whether this call runs the Triton kernels (else the PyTorch side: the reference or a CPU path)."""
    if _backend == "reference" or (_backend == "auto" and not tensor.is_cuda):
        return False
    if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("W2S_KERNELS=triton on a CPU tensor needs TRITON_INTERPRET=1 (set before importing triton)")
    return True


def wants_grad(*tensors):
    """Whether autograd will record a call on these tensors (forward-only kernels cannot serve it)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _kernel(module_name):
    """w2s/kernels/<module_name>.py, a Triton module, imported on first use (importing it imports triton)."""
    try:
        return importlib.import_module(f"w2s.kernels.{module_name}")
    except ImportError as e:
        raise RuntimeError(f"Triton kernel w2s/kernels/{module_name}.py is unavailable ({e}); "
                           "set W2S_KERNELS=reference to run the PyTorch reference instead") from e


def _triton(module_name, tensor):
    """The Triton module to use for this call, or None for the PyTorch side."""
    return _kernel(module_name) if _use_triton(tensor) else None


def attention(q, k, v, q_positions=None, kv_lengths=None, sliding_window=None, softcap=None, scale=None,
              shared_prefix=None, kv_rows=None, row_prefix=None, prompt_groups=None):
    """Causal GQA attention; see w2s.kernels.reference.attention for the exact contract. (B, T, H, D) -> (B, T, H, D).

    Triton: the split-key decode kernel (w2s/kernels/decode_attention.py) where `use_decode_kernel` says so, else
    the flash kernel (w2s/kernels/attention.py). CPU under `auto`: torch SDPA (w2s/kernels/sdpa_attention.py) where it
    applies (no soft-cap; plain causal, or no gradient), else the reference.

    shared_prefix: optional (k_p, v_p), each (P, K, D), a promise that k[b, :P] == k_p and v[b, :P] == v_p for every
    row b (the sampler's prompts all start with the same few-shot demonstrations). It changes no value; from
    CASCADE_MIN_PREFIX shared tokens on, decode uses it to read those keys once per step instead of once per row
    (cascade attention): w2s.kernels.decode_attention.attention_after_shared_prefix on Triton (any window or soft-cap),
    w2s.kernels.sdpa_attention.attention_after_shared_prefix on CPU (no window or soft-cap).

    kv_rows: optional (B,) integer tensor: batch row b attends k[kv_rows[b]], v[kv_rows[b]], so k and v hold cache
    rows rather than batch rows (the sampler's mixed decode steps, where the tokens of a prompt being prefilled are
    query rows of their own that read one cache row). The decode kernel reads through the index; on CPU one-token
    rows are grouped by cache row (w2s.kernels.sdpa_attention.attention_by_cache_row); every other path gathers the rows
    first.

    row_prefix: optional (rows, lengths), integer tensors with an entry per row of k (the cache's rows), a promise
    that row r's keys and values [0, lengths[r]) equal row rows[r]'s (the sampler's samples of one prompt, each
    holding a copy of its keys). It changes no value; the Triton decode kernel reads those keys from rows[r], so that
    the rows naming one row read it together and meet in L2. Every other path ignores it.

    prompt_groups: optional (members, lengths, starts, M) over the cache's rows, a promise that the rows of each
    group hold its leading row's first keys (w2s.kernels.decode_attention.attention_after_prompt_groups). It changes
    no value; a Triton decode call of one token a row (no kv_rows) then reads each group's keys once for all its
    rows (the per-prompt cascade), in place of shared_prefix's and row_prefix's ways. Every other path ignores it.
    """
    if kv_rows is not None and not (_use_triton(q) and use_decode_kernel(q, k, v)):
        if q.device.type == "cpu" and q.shape[1] == 1 and q_positions is not None and kv_lengths is None:
            return sdpa_attention.attention_by_cache_row(attention, q, k, v, kv_rows, q_positions, shared_prefix,
                                                         sliding_window=sliding_window, softcap=softcap, scale=scale)
        k, v, kv_rows = k[kv_rows], v[kv_rows], None  # (B, S, K, D): batch rows from here on
    if _use_triton(q):
        return _triton_attention(q, k, v, q_positions, kv_lengths, sliding_window, softcap, scale,
                                 _cascade_prefix(shared_prefix), kv_rows, row_prefix, prompt_groups)
    if _backend == "auto" and sdpa_attention.supports(q, k, v, q_positions, kv_lengths, sliding_window, softcap):
        return sdpa_attention.attention(q, k, v, q_positions=q_positions, kv_lengths=kv_lengths,
                                        sliding_window=sliding_window, scale=scale,
                                        shared_prefix=_cascade_prefix(shared_prefix))
    return reference.attention(q, k, v, q_positions=q_positions, kv_lengths=kv_lengths,
                               sliding_window=sliding_window, softcap=softcap, scale=scale)


# Below this many shared tokens the cascade's second kernel call and merge cost more than reading the prefix from
# every row (the CPU crossover is in BENCHMARKS.md; CUDA uses the same value); zero-shot prompts share only a few
# template tokens.
CASCADE_MIN_PREFIX = 64


def _cascade_prefix(shared_prefix):
    """shared_prefix when it is long enough for cascade attention to pay, else None."""
    if shared_prefix is not None and shared_prefix[0].shape[0] >= CASCADE_MIN_PREFIX:
        return shared_prefix
    return None


def use_decode_kernel(q, k, v):
    """Whether a Triton attention call runs the split-key decode kernel rather than the flash kernel: few query
    tokens (T <= 16) and no gradient. The decode kernel packs a kv head's T x G query rows into one tile (G query
    heads per kv head), at most 128 of them; with many queries the flash grid has enough parallel work."""
    T, H, KH = q.shape[1], q.shape[2], k.shape[2]
    return not wants_grad(q, k, v) and T <= 16 and T * (H // KH) <= 128


def _triton_attention(q, k, v, q_positions, kv_lengths, sliding_window, softcap, scale, cascade_prefix, kv_rows,
                      row_prefix=None, prompt_groups=None):
    """The Triton path of `attention`: the flash kernel, the decode kernel, or the decode kernel's cascade over
    cascade_prefix or prompt_groups (which need explicit positions and no ragged kv_lengths; prompt_groups one token
    a row and no kv_rows). kv_rows and row_prefix only reach the decode kernel."""
    if not use_decode_kernel(q, k, v):
        return _kernel("attention").attention(q, k, v, q_positions=q_positions, kv_lengths=kv_lengths,
                                              sliding_window=sliding_window, softcap=softcap, scale=scale)
    decode = _kernel("decode_attention")
    if (prompt_groups is not None and q.shape[1] == 1 and kv_rows is None and q_positions is not None
            and kv_lengths is None):
        return decode.attention_after_prompt_groups(q, k, v, q_positions, prompt_groups,
                                                    sliding_window=sliding_window, softcap=softcap, scale=scale)
    if cascade_prefix is not None and q_positions is not None and kv_lengths is None:
        return decode.attention_after_shared_prefix(q, k, v, *cascade_prefix, q_positions,
                                                    sliding_window=sliding_window, softcap=softcap, scale=scale,
                                                    kv_rows=kv_rows, row_prefix=row_prefix)
    return decode.attention_decode(q, k, v, q_positions=q_positions, kv_lengths=kv_lengths,
                                   sliding_window=sliding_window, softcap=softcap, scale=scale, kv_rows=kv_rows,
                                   row_prefix=row_prefix)


# Off: every projection runs torch's matmul (cuBLAS on CUDA), so a benchmark can time the batch-1 decode step without
# the matrix-vector kernel.
TRITON_MATVEC = True


def _matvec(x, weight, *others):
    """The Triton matrix-vector module when a projection of x by weight (with others: the bias, the residual) takes
    it: Triton for x, TRITON_MATVEC on, one row (x.numel() == K), no gradient wanted, one dtype, and a plain
    (not sharded) 2-D contiguous weight of K columns; else None (torch's matmul)."""
    if not (TRITON_MATVEC and _use_triton(x)) or x.shape[-1] == 0 or x.numel() != x.shape[-1]:
        return None
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1] or not weight.is_contiguous():
        return None
    if type(weight.data) is not torch.Tensor or wants_grad(x, weight, *others):  # a DTensor shard: FSDP2 / TP
        return None
    return _kernel("matvec") if all(t.dtype == x.dtype for t in (weight, *others)) else None


def linear(x, weight, bias=None):
    """F.linear(x, weight, bias): x (..., K), weight (N, K), bias (N,) or None -> (..., N). One row without
    gradients on Triton: the matrix-vector kernel (w2s/kernels/matvec.py)."""
    impl = _matvec(x, weight, *([] if bias is None else [bias]))
    return F.linear(x, weight, bias) if impl is None else impl.matvec(x, weight, bias)


def add_linear_(residual, x, weight):
    """residual += x @ weight.T in place and return residual: residual (..., N) contiguous, x (..., K), weight
    (N, K). One row without gradients on Triton: the matrix-vector kernel adding into the row; else one addmm_ (the
    GEMM reads residual as its C and writes the sum over it)."""
    impl = _matvec(x, weight, residual)
    if impl is not None:
        return impl.matvec(x, weight, accumulate_into=residual)
    residual.view(-1, residual.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]), weight.t())
    return residual


def rms_norm(x, weight, eps, unit_offset=False):
    """RMSNorm over the last dim; unit_offset=True is Gemma's fp32 (1 + w) variant."""
    impl = _triton("rms_norm", x) or reference
    return impl.rms_norm(x, weight, eps, unit_offset=unit_offset)


def add_rms_norm(x, residual, weight, eps, unit_offset=False):
    """(rms_norm(residual + x), residual + x): the residual stream's add and the norm that reads it. Triton without
    gradients (decoding, prefill): one kernel; else the add, then rms_norm (whose backward training uses)."""
    impl = _triton("rms_norm", x)
    if impl is None or wants_grad(x, residual, weight):
        summed = residual + x
        return rms_norm(summed, weight, eps, unit_offset), summed
    return impl.add_rms_norm(x, residual, weight, eps, unit_offset)


def rope(x, positions, inv_freq):
    """Rotary embedding of (B, T, H, D) at (B, T) positions."""
    impl = _triton("rope", x) or reference
    return impl.rope(x, positions, inv_freq)


def rope_cache_write(q, k, v, positions, inv_freq, k_cache, v_cache, rows=None):
    """Rotate q and k (B, T, H|K, D) to their (B, T) positions and write k, v into the head-major cache buffers
    (slots, K, S, D) at [rows[b], :, positions[b, t]]; returns the rotated q. Triton: one kernel for all of it
    (w2s/kernels/rope_cache.py); else the reference's two rotations and two index writes."""
    impl = _triton("rope_cache", q) or reference
    return impl.rope_cache_write(q, k, v, positions, inv_freq, k_cache, v_cache, rows)


def swiglu(gate, up):
    """silu(gate) * up."""
    impl = _triton("glu", gate) or reference
    return impl.swiglu(gate, up)


def geglu(gate, up):
    """gelu_tanh(gate) * up."""
    impl = _triton("glu", gate) or reference
    return impl.geglu(gate, up)


def stream_keys(seed, prompt_idx, sample_idx):
    """Per-sequence RNG keys (B,) from a seed and (B,) prompt / sample indices: the reference everywhere (a few
    elementwise ops once per admitted sequence, not per step)."""
    return reference.stream_keys(seed, prompt_idx, sample_idx)


def stream_uniforms(keys, steps):
    """Uniforms in [0, 1) (B,) fp32 for (B,) RNG keys at (B,) step counters, the same bits on both sides: one kernel
    on Triton (w2s/kernels/sample.py) where the reference's integer hash is some forty elementwise ops."""
    impl = _triton("sample", keys) or reference
    return impl.stream_uniforms(keys, steps)


def sample_inverse_cdf(logits, uniforms, temperature=1.0):
    """Tokens (B,) from softmax(logits / temperature) (B, V), one uniform (B,) per row: one kernel on Triton
    (w2s/kernels/sample.py), reading the logits in their dtype; else the reference's softmax, cumsum and search."""
    impl = _triton("sample", logits) or reference
    return impl.sample_inverse_cdf(logits, uniforms, temperature)


def linear_cross_entropy(hidden, weight, targets, softcap=None, ignore_index=-100):
    """(loss_sum, n_valid) of hidden (N, D) @ weight (V, D).T against targets (N,); no (N, V) logits but in the
    reference."""
    return _linear_losses(hidden).linear_cross_entropy(hidden, weight, targets, softcap=softcap,
                                                       ignore_index=ignore_index)


def linear_logprobs(hidden, weight, targets, softcap=None, ignore_index=-100):
    """Per-token target log-probs (N,), 0 at ignore_index; no (N, V) logits but in the reference."""
    return _linear_losses(hidden).linear_logprobs(hidden, weight, targets, softcap=softcap, ignore_index=ignore_index)


def _linear_losses(hidden):
    """Triton on CUDA; on CPU under `auto` the same chunk loop with a torch row step (w2s/kernels/chunked_linear.py:
    no (N, V) logits, loss and gradients in one pass); the reference under W2S_KERNELS=reference."""
    impl = _triton("fused_linear", hidden)
    if impl is not None:
        return impl
    return chunked_linear if _backend == "auto" else reference
