"""Training losses as pure functions of log-probabilities: SFT, DPO, IPO and ORPO.

Every function takes per-sequence (or per-token) quantities that the training loop gets from the fused linear
log-prob / cross-entropy ops (w2s/ops.py), and returns PER-EXAMPLE losses. The loop, not these functions, divides
by the global normalizer (valid tokens or pairs across all micro-batches and ranks), which is what makes the
result independent of micro-batch size and world size.

Notation: pi = policy, ref = frozen reference (the weights at the start of training), y_w / y_l = chosen /
rejected response, log pi(y|x) = sum of the response's token log-probs.

    SFT   (token level)  L = -sum_t log pi(y_t | x, y_<t) / N_tokens
    DPO   Rafailov et al. 2023, eq. 7:
          L = -log sigmoid( beta * [ (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)) ] )
    IPO   Azar et al. 2023, eq. 17 (with summed log-probs, as in the DPO authors' reference trainer):
          L = ( [ (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)) ] - 1 / (2 beta) )^2
    ORPO  Hong et al. 2024, eqs. 4-7 (no reference model):
          P(y|x) = exp( mean_t log pi(y_t | x, y_<t) )          (length-normalized likelihood)
          odds(y|x) = P / (1 - P)
          L_OR = -log sigmoid( log odds(y_w|x) - log odds(y_l|x) )
          L = L_SFT(y_w) + lambda * L_OR                        (lambda is `beta` here, as in TRL)

    python -m pytest -q tests/test_losses.py
"""

import math

import torch
import torch.nn.functional as F


def sft_token_losses(logps):
    """Per-token negative log-likelihoods from per-token target log-probs (0 at ignored positions)."""
    return -logps


def dpo_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """Sigmoid DPO. Inputs (P,) summed log-probs; returns (losses, chosen_rewards, rejected_rewards), each (P,).

    The implicit rewards beta * (log pi - log ref) are the quantities logged as rewards/chosen and rewards/rejected.
    """
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def ipo_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """IPO: squared distance of the log-ratio margin from 1 / (2 beta). Same inputs and outputs as dpo_losses."""
    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    losses = (chosen_logratio - rejected_logratio - 1.0 / (2.0 * beta)) ** 2
    return losses, (beta * chosen_logratio).detach(), (beta * rejected_logratio).detach()


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012): expm1 near 0, log1p far from it."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


# A mean log-prob of exactly 0 (probability rounded to 1 in fp32) would make the odds infinite; the clamp only
# bites in that degenerate case and keeps the gradient finite.
MAX_MEAN_LOGP = -1e-6


def orpo_odds_ratio_losses(chosen_mean_logps, rejected_mean_logps):
    """ORPO's odds-ratio term. Inputs (P,) MEAN token log-probs of the responses; returns (L_OR (P,), log_odds (P,)).

    log odds(y) = log P - log(1 - P) with log P the length-normalized log-likelihood.
    """
    lc = chosen_mean_logps.clamp(max=MAX_MEAN_LOGP)
    lr = rejected_mean_logps.clamp(max=MAX_MEAN_LOGP)
    log_odds = (lc - log1mexp(lc)) - (lr - log1mexp(lr))
    return -F.logsigmoid(log_odds), log_odds.detach()
