"""Training losses as pure functions of log-probabilities: SFT, DPO, IPO and ORPO. The one owner of the formulas
and of the list of preference losses (PREFERENCE_LOSSES) that the trainer, the scripts and recipes accept.

Every function takes per-sequence quantities that the training loop gets from the fused linear log-prob /
cross-entropy ops (w2s/ops.py). DPO and IPO return PER-PAIR losses, and the loop divides their sum by the global
number of pairs; ORPO mixes two normalizers (chosen tokens for its NLL, pairs for its odds-ratio term), so the loop
passes both to orpo_loss. Either way every normalizer counts all micro-batches and ranks of the optimizer step, which
is what makes the result independent of micro-batch size and world size. (SFT's token-mean NLL is the fused
cross-entropy's sum divided by the global target-token count, in w2s/train.py's sft_step.)

Notation: pi = policy, ref = frozen reference (the weights at the start of training), y_w / y_l = chosen /
rejected response, log pi(y|x) = sum of the response's token log-probs.

    SFT   (token level)  L = -sum_t log pi(y_t | x, y_<t) / N_tokens
    DPO   Rafailov et al. 2023, eq. 7:
          L = -log sigmoid( beta * [ (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)) ] )
    IPO   Azar et al. 2023, eq. 17:
          L = ( [ (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)) ] - 1 / (2 beta) )^2
    ORPO  Hong et al. 2024, eqs. 4-7 (no reference model):
          P(y|x) = exp( mean_t log pi(y_t | x, y_<t) )          (length-normalized likelihood)
          odds(y|x) = P / (1 - P)
          L_OR = -log sigmoid( log odds(y_w|x) - log odds(y_l|x) )
          L = L_SFT(y_w) + lambda * L_OR                        (lambda is `beta` here, as in TRL)

Conventions (they decide which beta carries over from another codebase):
    DPO, IPO  log pi(y|x) is the SUM of the response's token log-probs, as in LLaMA-Factory v0.5.0 and the DPO
              authors' reference trainer. TRL's IPO averages them over the response tokens instead, so a beta tuned
              with TRL's IPO does not carry over.
    ORPO      L_SFT(y_w) is the token-mean NLL of the chosen responses over the global batch: the summed NLL of every
              chosen response of the optimizer step divided by their total number of tokens.

    python -m pytest -q tests/test_losses.py
"""

import math

import torch
import torch.nn.functional as F

# The preference losses by name: what train_preference, scripts/dpo.py and recipes accept.
PREFERENCE_LOSSES = ("dpo", "ipo", "orpo")


def dpo_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """Sigmoid DPO over (P,) summed response log-probs. -> (losses, chosen_rewards, rejected_rewards), each (P,).

    The implicit rewards beta * (log pi - log ref) are the quantities logged as rewards/chosen and rewards/rejected.
    """
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def ipo_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """IPO: squared distance of the log-ratio margin from 1 / (2 beta). Same inputs and outputs as dpo_losses.

    Summed log-probs (the DPO authors' trainer); TRL's IPO uses token means, which changes the scale beta acts on.
    """
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


def orpo_loss(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, beta, n_pairs, n_chosen_tokens):
    """ORPO's loss of a micro-batch as its share of the optimizer step's loss.

    chosen_logps, rejected_logps (P,): summed response log-probs; chosen_tokens, rejected_tokens (P,): the responses'
    token counts; n_pairs, n_chosen_tokens: the step's GLOBAL pair and chosen-token counts (all micro-batches and
    ranks), so summing the returned loss over micro-batches and ranks gives the loss of the whole batch.

    NLL convention: token mean over the global batch, -sum(chosen_logps) / n_chosen_tokens.
    -> (loss (), chosen_rewards (P,), rejected_rewards (P,), {"nll", "or_loss", "log_odds"} each already divided by
    its normalizer). The rewards are beta * mean log-prob, as TRL logs them for ORPO.
    """
    mean_chosen, mean_rejected = chosen_logps / chosen_tokens, rejected_logps / rejected_tokens  # (P,)
    or_losses, log_odds = orpo_odds_ratio_losses(mean_chosen, mean_rejected)
    nll = -chosen_logps.sum() / n_chosen_tokens
    loss = nll + beta * or_losses.sum() / n_pairs
    stats = {"nll": nll.detach(), "or_loss": or_losses.detach().sum() / n_pairs, "log_odds": log_odds.sum() / n_pairs}
    return loss, beta * mean_chosen.detach(), beta * mean_rejected.detach(), stats
