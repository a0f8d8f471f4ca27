"""Attention on CPU through torch's fused scaled_dot_product_attention (SDPA): the reference's math
(reference.py) without materializing fp32 (B, H, T, S) scores or repeated kv heads. No Triton: this is
what w2s/ops.py runs under W2S_KERNELS=auto for tensors that are not on CUDA.

Three paths, none with a soft-cap (SDPA has none; Gemma-2 stays on the reference, see `supports`), and a grouping
of query rows by the cache row they read (`attention_by_cache_row`, the sampler's mixed steps) that feeds them:
  1. plain causal self-attention (training, scoring: no positions, lengths or window, T == S): SDPA with
     is_causal, differentiable;
  2. no-grad calls with positions over a KV cache (sampling): SDPA with the reference's boolean mask, each kv head's
     G query heads folded into one query block (`_by_kv_head`), so each kv head's keys are attended by its whole
     group at once without repeating them G times (enable_gqa would);
  3. cascade attention over a prefix every row shares (`attention_after_shared_prefix`): the prefix keys are read
     once per step instead of once per row, through torch's CPU flash kernel, which returns the log-sum-exp the
     merge needs.

    python -m pytest -q tests/test_model.py -k "sdpa or shared_prefix"   # each path against the reference
"""

import torch
import torch.nn.functional as F

from w2s.kernels import reference


def supports(q, k, v, q_positions=None, kv_lengths=None, sliding_window=None, softcap=None):
    """Whether `attention` computes this call: no soft-cap, and plain causal self-attention or no gradient."""
    if softcap is not None:
        return False
    return _plain_causal(q, k, q_positions, kv_lengths, sliding_window) or not _needs_grad(q, k, v)


def _plain_causal(q, k, q_positions, kv_lengths, sliding_window):
    return q_positions is None and kv_lengths is None and sliding_window is None and q.shape[1] == k.shape[1]


def _needs_grad(q, k, v):
    return q.requires_grad or k.requires_grad or v.requires_grad


def attention(q, k, v, q_positions=None, kv_lengths=None, sliding_window=None, scale=None, shared_prefix=None):
    """Causal GQA attention as w2s.kernels.reference.attention, for the calls `supports` accepts. (B, T, H, D) ->
    (B, T, H, D).

    shared_prefix: optional (k_p, v_p), each (P, K, D), a promise that k[b, :P] == k_p and v[b, :P] == v_p for every
    row b. With no window and no kv_lengths, on CPU, and every query at a position >= P, it is used for cascade
    attention; otherwise it is ignored. It changes no value.
    """
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)  # (B, K, S, D)
    if _plain_causal(q, k, q_positions, kv_lengths, sliding_window):
        return F.scaled_dot_product_attention(q.transpose(1, 2), kt, vt, is_causal=True, scale=scale,
                                              enable_gqa=q.shape[2] != k.shape[2]).transpose(1, 2)
    if q_positions is None:
        q_positions = torch.arange(q.shape[1], device=q.device).expand(q.shape[0], -1)
    if shared_prefix is not None and _cascade_applies(q, q_positions, kv_lengths, sliding_window, shared_prefix):
        return attention_after_shared_prefix(q, k, v, q_positions, shared_prefix, scale)
    visible = reference.attention_mask(q_positions, k.shape[1], kv_lengths, sliding_window)  # (B, T, S)
    K = k.shape[2]
    out = F.scaled_dot_product_attention(_by_kv_head(q, K), kt, vt, attn_mask=_by_kv_head_mask(visible, q, K),
                                         scale=scale)  # (B, K, T*G, D)
    return _from_kv_head(out, q.shape).nan_to_num(0.0)  # a query with no visible key -> zeros, as the reference


def _cascade_applies(q, q_positions, kv_lengths, sliding_window, shared_prefix):
    """The CPU flash kernel's cascade covers no window and no ragged lengths, and only queries past the prefix."""
    P = shared_prefix[0].shape[0]
    return (q.device.type == "cpu" and kv_lengths is None and sliding_window is None
            and bool((q_positions >= P).all()))


def _by_kv_head(q, K):
    """(B, T, H, D) -> (B, K, T*G, D): the G query heads sharing kv head j become rows t*G + g of one query block.

    SDPA then attends each kv head's keys with its whole group of queries at once, the same math as enable_gqa
    without repeating the keys G times.
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


def attention_after_shared_prefix(q, k, v, q_positions, shared_prefix, scale):
    """Cascade attention for queries at positions >= P whose keys [0, P) are the same in every row.

    Softmax over keys [0, S) splits into two softmaxes, over the prefix [0, P) and over each row's own keys [P, S),
    merged by their log-sum-exps: out = (e^lse_p out_p + e^lse_o out_o) / (e^lse_p + e^lse_o). The prefix part runs
    once for all B*T*G queries of a kv head (one long query block against P keys, which are read once instead of B
    times); the own part is per row. torch's CPU flash kernel returns the log-sum-exp the merge needs.
    q (B, T, H, D), k/v (B, S, K, D), q_positions (B, T), shared_prefix ((P, K, D), (P, K, D)) -> (B, T, H, D).
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


def attention_by_cache_row(attend, q, k, v, kv_rows, q_positions, shared_prefix=None, **options):
    """attend(q, k, v, q_positions, ...) (w2s.ops.attention) for one-token query rows q (B, 1, H, D) that read the
    cache rows kv_rows (B,) of k, v (rows, S, K, D), without a copy of a cache row per query: the leading rows that
    read their own cache row (kv_rows[i] == i, a mixed step's decode rows) attend views of k and v as a decode step
    does, with the shared-prefix hint; each following run of rows on one cache row (a prompt's tokens, in order)
    attends that row as one sequence of several queries. The grouping reads kv_rows on the host: CPU tensors only."""
    rows = kv_rows.tolist()
    lead = next((i for i, r in enumerate(rows) if r != i), len(rows))
    out = torch.empty_like(q)
    if lead:
        out[:lead] = attend(q[:lead], k[:lead], v[:lead], q_positions[:lead], shared_prefix=shared_prefix, **options)
    start = lead
    while start < len(rows):
        end, r = start + 1, rows[start]
        while end < len(rows) and rows[end] == r:
            end += 1
        run = attend(q[start:end].transpose(0, 1), k[r : r + 1], v[r : r + 1],
                     q_positions[start:end].transpose(0, 1), **options)  # (1, end - start, H, D)
        out[start:end] = run.transpose(0, 1)
        start = end
    return out
