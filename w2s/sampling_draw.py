"""How the sampler draws a token from a step's logits: greedy, or temperature -> top-k -> top-p and then inverse-CDF
sampling with one uniform a row. The uniforms are counter-based (ops.stream_uniforms: a hash of seed, prompt, sample
and step), so a draw does not depend on the batch it ran in; w2s/sampling_engine.py gives each row its own.

    python -m pytest -q tests/test_sampling.py -k "frequencies or top_p or greedy"   # against transformers' warpers
"""

import torch

from w2s import ops


def sample_from_logits(logits, uniforms, temperature=1.0, top_k=0, top_p=1.0):
    """Next tokens (B,) from logits (B, V): greedy at temperature 0 (uniforms unused, may be None), else temperature
    -> top-k -> top-p (nucleus).

    Sampling is by inverse CDF with one uniform per row (B,): the token whose cumulative probability interval
    contains u * total (ops.sample_inverse_cdf: one kernel on GPU). Top-k keeps the logits not below the k-th
    largest (ties with it stay, as in transformers and vLLM); top-p keeps the smallest set of most probable tokens
    whose probability reaches top_p (the token that crosses the threshold is kept). Everything stays on device.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    order = None  # (B, V) vocabulary ids of the columns, when they were reordered
    if 0 < top_k < logits.shape[-1] or top_p < 1.0:
        # temper once, first: top-k and top-p cut the tempered distribution (as transformers' warpers do)
        logits, temperature = logits.float() / temperature, 1.0
        if 0 < top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p < 1.0:
            logits, order = logits.sort(dim=-1, descending=True)
            probs = torch.softmax(logits, dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly more likely tokens
            logits = logits.masked_fill(mass_before >= top_p, float("-inf"))
    col = ops.sample_inverse_cdf(logits, uniforms, temperature)  # (B,)
    return col if order is None else order.gather(-1, col[:, None]).squeeze(-1)


def logits_from_hidden(model, hidden):
    """(N, D) final-normed hidden -> (N, V) fp32 logits, as the model's own forward computes them."""
    logits = ops.linear(hidden, model.lm_head_weight()).float()
    cap = model.cfg.final_logit_softcap
    return cap * torch.tanh(logits / cap) if cap is not None else logits
