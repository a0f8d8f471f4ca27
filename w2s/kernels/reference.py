"""The executable specification of every kernel, in plain PyTorch.

Each function here defines *what* a kernel computes; the Triton files beside it define *how fast*. The model runs
on these whenever `W2S_KERNELS=reference`, and on CPU for every op but two, which compute the same values with less
memory traffic: attention (torch's SDPA where it applies, w2s/kernels/sdpa_attention.py) and the output layer's
losses and log-probs (w2s/kernels/chunked_linear.py). The kernel tests compare forward outputs and every
gradient of the Triton versions against them. Autograd through these functions is the reference backward.

Shapes follow the model: B batch, T (query) length, S key length, H query heads, K key/value heads, D head dim,
N flattened tokens, V vocabulary.

    python -m pytest tests/test_kernels.py   # (runs the Triton kernels under TRITON_INTERPRET=1 against this file)
"""

import math

import torch
import torch.nn.functional as F


def attention_mask(q_positions, S, kv_lengths=None, sliding_window=None):
    """Boolean mask (B, T, S): True where query t may attend key s.

    Keys sit at absolute positions 0..S-1 (a KV cache row is indexed by position). A query at position p sees key
    s iff s <= p (causal), s < kv_lengths[b] (ragged batches without a dense user mask), and p - s < sliding_window
    (Mistral / Gemma-2 local layers; the same convention as transformers).
    """
    s = torch.arange(S, device=q_positions.device)
    p = q_positions[:, :, None]  # (B, T, 1)
    mask = s[None, None, :] <= p
    if kv_lengths is not None:
        mask = mask & (s[None, None, :] < kv_lengths[:, None, None])
    if sliding_window is not None:
        mask = mask & (p - s[None, None, :] < sliding_window)
    return mask


def attention(q, k, v, q_positions=None, kv_lengths=None, sliding_window=None, softcap=None, scale=None):
    """Causal multi-head attention with GQA, explicit positions, ragged lengths, sliding window and soft-cap.

    q: (B, T, H, D); k, v: (B, S, K, D) with H % K == 0 (GQA: each group of H//K query heads shares one kv head).
    q_positions: (B, T) absolute positions of the queries; None means T == S and positions 0..T-1 (training,
    prefill from empty). kv_lengths: (B,) number of valid keys per row, or None. softcap: Gemma-2 attention logit
    soft-capping, scores = softcap * tanh(scores / softcap). scale defaults to 1/sqrt(D).
    Returns (B, T, H, D) in q's dtype; softmax in fp32. A query with no visible key returns zeros.
    """
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    if q_positions is None:
        q_positions = torch.arange(T, device=q.device).expand(B, T)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    group = H // K
    qf = q.float().transpose(1, 2)  # (B, H, T, D)
    kf = k.float().transpose(1, 2).repeat_interleave(group, dim=1)  # (B, H, S, D)
    vf = v.float().transpose(1, 2).repeat_interleave(group, dim=1)
    scores = (qf @ kf.transpose(-1, -2)) * scale  # (B, H, T, S)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    mask = attention_mask(q_positions, S, kv_lengths, sliding_window)[:, None]  # (B, 1, T, S)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no visible key -> 0
    out = probs @ vf  # (B, H, T, D)
    return out.transpose(1, 2).to(q.dtype)


def rms_norm(x, weight, eps, unit_offset=False):
    """RMSNorm over the last dim. Two numerics, both from the reference implementations:

    unit_offset=False (Llama, Mistral): normalize in fp32, cast back to x.dtype, then multiply by weight.
    unit_offset=True (Gemma, Gemma-2): everything in fp32 with scale (1 + weight), cast back at the end.
    """
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return (normed * (1.0 + weight.float())).to(x.dtype)
    return weight * normed.to(x.dtype)


def rope(x, positions, inv_freq):
    """Rotary embedding, half-split convention (transformers' rotate_half), at explicit positions.

    x: (B, T, H, D); positions: (B, T) integer; inv_freq: (D/2,) fp32 (already scaled for Llama-3.1).
    cos/sin are computed in fp32 and cast to x.dtype before the multiply, as transformers does.
    """
    freqs = positions[..., None].float() * inv_freq.float()  # (B, T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]  # (B, T, 1, D)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin


def rope_cache_write(q, k, v, positions, inv_freq, k_cache, v_cache, rows=None):
    """RoPE of q and k at their positions, with k and v written into a head-major KV cache (one sampler step).

    q: (B, T, H, D); k, v: (B, T, K, D); positions: (B, T); k_cache, v_cache: (slots, K, S, D) of k's dtype, written
    in place at [rows[b], :, positions[b, t]]; rows: (B,) cache rows of the batch rows (None: row b is b).
    Returns rope(q) (B, T, H, D). Where two tokens of a row share a position (the sampler's right padding, clamped to
    the cache's last position), which one the cache keeps is unspecified.
    """
    rows = torch.arange(k.shape[0], device=k.device) if rows is None else rows
    # cache[rows, :, positions] is (B, T, K, D): the two index tensors broadcast to (B, T) and go first
    k_cache[rows[:, None], :, positions] = rope(k, positions, inv_freq)
    v_cache[rows[:, None], :, positions] = v
    return rope(q, positions, inv_freq)


def swiglu(gate, up):
    """Llama/Mistral MLP activation: silu(gate) * up."""
    return F.silu(gate) * up


def geglu(gate, up):
    """Gemma MLP activation: gelu_tanh(gate) * up (transformers' gelu_pytorch_tanh)."""
    return F.gelu(gate, approximate="tanh") * up


# Counter-based randomness: uniforms are a pure function of (seed, prompt, sample, step), made on device without a
# host sync. The mixer is "lowbias32"; in int64 all arithmetic stays below 2**49, so it is exact on every backend
# (no reliance on signed overflow). The Triton version (sample.py) computes the same bits in uint32.
_M32 = 0xFFFFFFFF


def _mul32(x, c):
    """(x * c) mod 2**32 for an int64 tensor x in [0, 2**32) and a 32-bit constant c, without overflow."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def hash32(x):
    """The lowbias32 mixer of int64 values in [0, 2**32), elementwise."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def stream_keys(seed, prompt_idx, sample_idx):
    """Per-sequence RNG keys (B,) int64 in [0, 2**32) from a seed and (B,) prompt / sample indices."""
    h = hash32(torch.full_like(prompt_idx, (seed * 0x9E3779B1 + 0x632BE5AB) & _M32))
    h = hash32(h ^ (prompt_idx & _M32))
    return hash32(h ^ hash32((sample_idx + 0x5BD1E995) & _M32))


def stream_uniforms(keys, steps):
    """Uniforms in [0, 1) (B,) fp32, 24 random bits each, for (B,) keys at (B,) step counters (integers, or floats
    holding integers: counters kept in float tensors)."""
    steps = steps.long()
    h = hash32(keys ^ hash32((steps * 0x27D4EB2F + 0x165667B1) & _M32))
    return (h >> 8).float() * (1.0 / (1 << 24))


def sample_inverse_cdf(logits, uniforms, temperature=1.0):
    """Tokens (B,) drawn from softmax(logits / temperature) (B, V) by inverse CDF, one uniform u in [0, 1) per row
    (B,): the first index whose cumulative probability exceeds u times the total. A token of probability 0 is never
    drawn: should rounding leave the total at or below the target, the row's last token of positive probability."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    cdf = probs.cumsum(dim=-1)  # (B, V)
    first = torch.searchsorted(cdf, uniforms[:, None].float() * cdf[:, -1:], right=True).squeeze(-1)  # (B,)
    last = torch.where(probs > 0, torch.arange(logits.shape[-1], device=logits.device), 0).amax(dim=-1)
    return torch.where(first < logits.shape[-1], first, last)


def linear_logits(hidden, weight, softcap=None):
    """(N, D) x (V, D) -> (N, V) fp32 logits, with Gemma-2's final soft-cap."""
    logits = (hidden @ weight.t()).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def linear_cross_entropy(hidden, weight, targets, softcap=None, ignore_index=-100):
    """Sum of token cross-entropies and the number of valid targets (SFT loss = sum / global count).

    hidden: (N, D); weight: (V, D) the lm_head; targets: (N,) with ignore_index for prompt/padding.
    Returns (loss_sum fp32 scalar, n_valid int64 scalar). The Triton version never builds the (N, V) logits.
    """
    logits = linear_logits(hidden, weight, softcap)
    loss_sum = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    return loss_sum, (targets != ignore_index).sum()


def linear_logprobs(hidden, weight, targets, softcap=None, ignore_index=-100):
    """Per-token log p(target) (N,) fp32, 0 where target == ignore_index (DPO/ORPO sum these per sequence)."""
    logits = linear_logits(hidden, weight, softcap)
    valid = targets != ignore_index
    safe = targets.clamp(min=0)  # gather cannot index ignore_index (-100); those entries are zeroed below
    logp = torch.log_softmax(logits, dim=-1).gather(-1, safe[:, None]).squeeze(-1)
    return torch.where(valid, logp, torch.zeros_like(logp))
