"""The one switch between the Triton kernels (kernels/*.py) and their pure-PyTorch spec (kernels/reference.py).

Every hot op of the model and the losses goes through a function here. The backend is chosen per call:

    W2S_KERNELS=auto       (default) Triton for CUDA tensors, the reference for anything else (CPU), except two
                           CPU paths with the reference's math and less memory traffic: torch SDPA / flash
                           attention (with cascade decoding over a shared prefix) and the chunked fused linear
                           losses (kernels/chunked_linear.py)
    W2S_KERNELS=triton     Triton always (on CPU only under TRITON_INTERPRET=1, which is how the tests run it)
    W2S_KERNELS=reference  the reference always (debugging, parity checks on GPU)

`set_backend(name)` does the same from Python. There is no silent fallback: asking for Triton where it cannot run
raises an error instead of quietly running the slow path.
"""

import importlib
import os

import torch
import torch.nn.functional as F

from kernels import chunked_linear, reference

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


def _triton(module_name, tensor):
    """The Triton module to use for this call, or None for the reference."""
    if _backend == "reference" or (_backend == "auto" and not tensor.is_cuda):
        return None
    if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("W2S_KERNELS=triton on a CPU tensor needs TRITON_INTERPRET=1 (set before importing triton)")
    try:
        return importlib.import_module(f"kernels.{module_name}")
    except ImportError as e:
        raise RuntimeError(f"Triton kernel kernels/{module_name}.py is unavailable ({e}); "
                           "set W2S_KERNELS=reference to run the PyTorch reference instead") from e


def attention(q, k, v, q_positions=None, kv_lengths=None, sliding_window=None, softcap=None, scale=None,
              shared_prefix=None):
    """Causal GQA attention; see kernels.reference.attention for the exact contract. (B, T, H, D) -> (B, T, H, D).

    On CPU under `auto`, attention without a soft-cap runs through torch's fused scaled_dot_product_attention: the
    plain causal case (training, scoring) with is_causal, and no-grad calls with positions over a KV cache
    (sampling) with the reference's boolean mask, each kv head's query heads folded into one query block. Same
    math as the reference (tests/test_model.py checks values and grads), without materializing fp32 (B, H, T, S)
    scores and repeated kv heads. W2S_KERNELS=reference always runs the reference itself.

    shared_prefix: optional (k_p, v_p), each (P, K, D), a promise that k[b, :P] == k_p and v[b, :P] == v_p for every
    row b (the sampler's prompts all start with the same few-shot demonstrations). It changes no value; decode
    uses it to read those keys once per step instead of once per row (cascade attention): on CUDA through the
    Triton kernels (kernels.decode_attention.attention_after_shared_prefix, any window or soft-cap), on CPU through
    torch's flash kernel (_attention_after_shared_prefix, no window or soft-cap).
    """
    impl = _triton("attention", q)
    P = shared_prefix[0].shape[0] if shared_prefix is not None else 0
    if impl is not None:
        if (P >= CASCADE_MIN_PREFIX and q_positions is not None and kv_lengths is None
                and impl._use_decode_path(q, k, v)):
            return _triton("decode_attention", q).attention_after_shared_prefix(
                q, k, v, *shared_prefix, q_positions, sliding_window=sliding_window, softcap=softcap, scale=scale)
        return impl.attention(q, k, v, q_positions=q_positions, kv_lengths=kv_lengths,
                              sliding_window=sliding_window, softcap=softcap, scale=scale)
    if _backend == "auto" and softcap is None:  # SDPA has no soft-cap: Gemma-2 stays on the reference
        kt, vt = k.transpose(1, 2), v.transpose(1, 2)  # (B, K, S, D)
        plain = q_positions is None and kv_lengths is None and sliding_window is None
        if plain and q.shape[1] == k.shape[1]:
            return F.scaled_dot_product_attention(q.transpose(1, 2), kt, vt, is_causal=True, scale=scale,
                                                  enable_gqa=q.shape[2] != k.shape[2]).transpose(1, 2)
        if not (q.requires_grad or k.requires_grad or v.requires_grad):  # sampling: positions over a KV cache
            if q_positions is None:
                q_positions = torch.arange(q.shape[1], device=q.device).expand(q.shape[0], -1)
            if (P >= CASCADE_MIN_PREFIX and q.device.type == "cpu" and kv_lengths is None
                    and sliding_window is None and bool((q_positions >= P).all())):
                return _attention_after_shared_prefix(q, k, v, q_positions, shared_prefix, scale)
            visible = reference.attention_mask(q_positions, k.shape[1], kv_lengths, sliding_window)  # (B, T, S)
            K = k.shape[2]
            out = F.scaled_dot_product_attention(_by_kv_head(q, K), kt, vt, attn_mask=_by_kv_head_mask(visible, q, K),
                                                 scale=scale)  # (B, K, T*G, D)
            return _from_kv_head(out, q.shape).nan_to_num(0.0)  # a query with no visible key -> zeros, as the reference
    return reference.attention(q, k, v, q_positions=q_positions, kv_lengths=kv_lengths,
                               sliding_window=sliding_window, softcap=softcap, scale=scale)


# Below this many shared tokens the cascade's second kernel call and merge cost more than reading the prefix from
# every row (2 CPU cores, fp32, batch 32-128: a 16-token prefix is 1.4-2x slower, 64+ tokens break even or win,
# a 384-token prefix before 66 own tokens is 3.3x faster). Zero-shot prompts share only a few template tokens.
# The same threshold serves CUDA, where it is not yet measured.
CASCADE_MIN_PREFIX = 64


def _by_kv_head(q, K):
    """(B, T, H, D) -> (B, K, T*G, D): the G query heads sharing kv head j become rows t*G + g of one query block.

    SDPA then attends each kv head's keys with its whole group of queries at once, the same math as enable_gqa
    (on 2 cores, fp32, 128 decode rows at T = 1, the folded call took ~0.75x the time of the enable_gqa call).
    """
    B, T, H, D = q.shape
    return q.view(B, T, K, H // K, D).permute(0, 2, 1, 3, 4).reshape(B, K, T * (H // K), D)


def _by_kv_head_mask(visible, q, K):
    """The (B, T, S) mask for _by_kv_head's query rows: (B, 1, T*G, S), row t*G + g sees what query t sees."""
    G = q.shape[2] // K
    return (visible if G == 1 else visible.repeat_interleave(G, dim=1))[:, None]


def _from_kv_head(out, q_shape):
    """(B, K, T*G, D) back to q's (B, T, H, D), head h = j*G + g (kv head h // G, as GQA pairs them)."""
    B, T, H, D = q_shape
    return out.view(B, out.shape[1], T, -1, D).transpose(1, 2).reshape(B, T, H, D)


def _attention_after_shared_prefix(q, k, v, q_positions, shared_prefix, scale):
    """Cascade attention for queries at positions >= P whose keys [0, P) are the same in every row.

    Softmax over keys [0, S) splits into two softmaxes, over the prefix [0, P) and over each row's own keys [P, S),
    merged by their log-sum-exps: out = (e^lse_p out_p + e^lse_o out_o) / (e^lse_p + e^lse_o). The prefix part runs
    once for all B*T*G queries of a kv head (one long query block against P keys, which are read once instead of B
    times); the own part is per row. torch's CPU flash kernel returns the log-sum-exp the merge needs.
    """
    B, T, H, D = q.shape
    k_p, v_p = shared_prefix  # (P, K, D)
    P, K = k_p.shape[0], k_p.shape[1]
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # (B, H, T, D) in -> (out, lse (B, H, T))
    # own keys: per row, the T*G queries of each kv head as its query block; key i sits at position P + i
    q_rows = _by_kv_head(q, K)  # (B, K, T*G, D)
    visible = _by_kv_head_mask(reference.attention_mask(q_positions - P, k.shape[1] - P), q, K)  # (B, 1, T*G, S-P)
    bias = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill_(~visible, float("-inf"))
    out_o, lse_o = flash(q_rows, k[:, P:].transpose(1, 2), v[:, P:].transpose(1, 2), attn_mask=bias, scale=scale)
    # prefix: every query of kv head j against the P shared keys, as one batch row (no mask: all positions >= P)
    q_by_head = q_rows.transpose(0, 1).reshape(1, K, B * q_rows.shape[2], D)  # (1, K, B*T*G, D)
    out_p, lse_p = flash(q_by_head, k_p.transpose(0, 1)[None], v_p.transpose(0, 1)[None], scale=scale)
    out_p, lse_p = out_p.view(K, B, -1, D).transpose(0, 1), lse_p.view(K, B, -1).transpose(0, 1)  # (B, K, T*G, .)
    top = torch.maximum(lse_p, lse_o)
    w_p, w_o = (lse_p - top).exp()[..., None], (lse_o - top).exp()[..., None]  # (B, K, T*G, 1) fp32
    out = (out_p.float() * w_p + out_o.float() * w_o) / (w_p + w_o)
    return _from_kv_head(out, q.shape).to(q.dtype)


def rms_norm(x, weight, eps, unit_offset=False):
    """RMSNorm over the last dim; unit_offset=True is Gemma's fp32 (1 + w) variant."""
    impl = _triton("rms_norm", x) or reference
    return impl.rms_norm(x, weight, eps, unit_offset=unit_offset)


def rope(x, positions, inv_freq):
    """Rotary embedding of (B, T, H, D) at (B, T) positions."""
    impl = _triton("rope", x) or reference
    return impl.rope(x, positions, inv_freq)


def swiglu(gate, up):
    """silu(gate) * up."""
    impl = _triton("glu", gate) or reference
    return impl.swiglu(gate, up)


def geglu(gate, up):
    """gelu_tanh(gate) * up."""
    impl = _triton("glu", gate) or reference
    return impl.geglu(gate, up)


def linear_cross_entropy(hidden, weight, targets, softcap=None, ignore_index=-100):
    """(loss_sum, n_valid) of hidden (N, D) @ weight (V, D).T against targets (N,); no (N, V) logits but in the
    reference."""
    return _linear_losses(hidden).linear_cross_entropy(hidden, weight, targets, softcap=softcap,
                                                       ignore_index=ignore_index)


def linear_logprobs(hidden, weight, targets, softcap=None, ignore_index=-100):
    """Per-token target log-probs (N,), 0 at ignore_index; no (N, V) logits but in the reference."""
    return _linear_losses(hidden).linear_logprobs(hidden, weight, targets, softcap=softcap, ignore_index=ignore_index)


def _linear_losses(hidden):
    """Triton on CUDA; on CPU under `auto` the same chunk loop with a torch row step (kernels/chunked_linear.py:
    no (N, V) logits, loss and gradients in one pass); the reference under W2S_KERNELS=reference."""
    impl = _triton("fused_linear", hidden)
    if impl is not None:
        return impl
    return chunked_linear if _backend == "auto" else reference
