"""Training losses as pure functions of log-probabilities: SFT, DPO, IPO, ORPO and GRPO, and the two additions the
recipes can turn on (an NLL term on the chosen response, per-pair weights). The one owner of the formulas, of the list
of preference losses (PREFERENCE_LOSSES) that the trainer and the scripts accept, and of the Stage II losses a recipe
may name (STAGE2_LOSSES: those, and GRPO, whose rollouts and rewards live in w2s/grpo.py).

Every function takes per-sequence quantities that the training loop gets from the fused linear log-prob /
cross-entropy ops (w2s/ops.py). DPO and IPO return PER-PAIR losses, and the loop divides their (weighted) sum by the
global number of pairs (`weighted_pair_mean`); ORPO's token-mean NLL option mixes two normalizers (chosen tokens for
its NLL, pairs for its odds-ratio term), so the loop passes both to orpo_loss. Either way every normalizer counts all
micro-batches and ranks of the optimizer step, which is what makes the result independent of micro-batch size and
world size. (SFT's token-mean NLL is the fused cross-entropy's sum divided by the global target-token count, in
w2s/loss_steps.py's sft_step.)

Notation: pi = policy, ref = frozen reference (the weights at the start of training), y_w / y_l = chosen /
rejected response, log pi(y|x) = sum of the response's token log-probs, |y| = its token count, P = pairs in the
optimizer step, w_i = pair i's weight (1 unless the pairs carry one).

    SFT   (token level)  L = -sum_t log pi(y_t | x, y_<t) / N_tokens
    DPO   Rafailov et al. 2023, eq. 7:
          l_i = -log sigmoid( beta * [ (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)) ] )
    IPO   Azar et al. 2023, eq. 17:
          l_i = ( [ (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)) ] - 1 / (2 beta) )^2
    DPO + NLL (Pang et al. 2024, Iterative RPO; the "alpha" of RPO; IPO takes the same term):
          l_i = l_i(DPO) + alpha * ( -log pi(y_w|x) / |y_w| )
    weighted (Prasad et al. 2025, ScPO: w_i = the vote margin of the pair, w2s/stages/preference_pairs.py):
          L = sum_i w_i * l_i / P                               (unweighted: w_i = 1, the plain mean)
    ORPO  Hong et al. 2024, eqs. 4-7 (no reference model):
          P(y|x) = exp( mean_t log pi(y_t | x, y_<t) )          (length-normalized likelihood)
          odds(y|x) = P / (1 - P)
          L_OR = -log sigmoid( log odds(y_w|x) - log odds(y_l|x) )
          L = L_SFT(y_w) + lambda * L_OR                        (lambda is `beta` here, as in TRL)
    GRPO  Shao et al. 2024 (DeepSeekMath), eq. 3 as a loss, outcome rewards (section 4.1.2), KL of eq. 4:
          G samples o_1..o_G of one question q from pi_old, rewards r_1..r_G;
          A_i     = (r_i - mean(r)) / (std(r) + 1e-4)          (group-normalized; std with Bessel's correction)
          rho_it  = pi(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t)
          D_it    = ref/pi - log(ref/pi) - 1                   (the k3 estimator of KL(pi || ref), per token)
          l_it    = -min(rho_it A_i, clip(rho_it, 1 - eps, 1 + eps) A_i) + beta D_it
          L       = 1/N_seq sum_i 1/|o_i| sum_t l_it           (aggregation "sequence": the paper's)
          L       = 1/N_tok sum_i sum_t l_it                   (aggregation "token": DAPO, Yu et al. 2025)

Conventions (they decide which beta carries over from another codebase):
    DPO, IPO  log pi(y|x) is the SUM of the response's token log-probs, as in LLaMA-Factory v0.5.0 (the paper's DPO
              framework: its DPO trainer calls get_batch_logps with average_log_prob=False for every loss type) and
              the DPO authors' reference trainer. TRL's IPO averages them over the response tokens instead (so does
              LLaMA-Factory v0.6.2's DPO trainer, for IPO only), so a beta tuned with TRL's IPO does not carry over.
    NLL term  per-token MEAN NLL of each chosen response, averaged over pairs: LLaMA-Factory's SFT term of its DPO
              trainer (dpo_ftx, average_log_prob=True) and Iterative RPO's length-normalized NLL.
    ORPO      as LLaMA-Factory v0.6.2 computes it (the paper's ORPO framework): the odds from the per-token MEAN
              log-probs, and L_SFT(y_w) = the mean token NLL of each chosen response, averaged over the pairs
              (nll="sequence_mean", the default). nll="token_mean" is the other reading: the summed NLL of every
              chosen response of the step divided by their total number of tokens (long responses weigh more).

    GRPO      N_seq / N_tok count the sequences / response tokens of the whole optimizer step (all micro-batches and
              ranks). Where TRL's GRPOTrainer (1.x) differs:
              - aggregation: our default is the paper's per-sequence mean; TRL's default loss_type is "dapo", our
                "token" (both over the global token count). TRL's "grpo" averages per-sequence means over each
                micro-batch and divides by the accumulation steps: ours only when every micro-batch holds as many
                sequences. TRL's "bnpo" (token mean of each micro-batch) and "dr_grpo" (Liu et al. 2025: the token
                sum over N_seq * max_completion_length, with scale_rewards off) are not offered.
              - beta (the KL weight) defaults to 0.0 in both (no reference pass); DeepSeekMath trained with 0.04.
                The KL term is DeepSeekMath's plain k3, TRL's use_bias_correction_kl=False; TRL's default (True)
                multiplies it by rho (DeepSeek-V3.2's unbiased reverse-KL gradient): the same value at rho = 1, but
                a gradient larger by D_it * grad log pi.
              - scale_rewards: True divides by the group's std as TRL's "group" (the default) does; False is
                TRL's "none" (Dr. GRPO). TRL's "batch" (the std over the whole batch) is not offered.
              - one policy update per rollout batch (TRL's num_iterations = 1, both defaults): pi_old is pi itself,
                detached, so rho = 1 at the update: the loss value is the mean of -A (plus beta D) and the gradient
                the plain policy gradient A grad log pi; the clip gates gradients only from a second update on.
              - epsilon_high (DAPO's asymmetric clip), delta, importance sampling at the sequence level (GSPO) and
                vLLM importance-sampling corrections are TRL options with no counterpart here.


    python -m pytest -q tests/test_losses.py tests/test_beyond.py tests/test_grpo.py
"""

import math

import torch
import torch.nn.functional as F

# The preference losses by name: what train_preference, scripts/dpo.py and recipes accept.
PREFERENCE_LOSSES = ("dpo", "ipo", "orpo")
# What a recipe's [stage2] losses accepts: the pair losses (trained on 15_pairs) and GRPO (on-policy, w2s/grpo.py).
STAGE2_LOSSES = (*PREFERENCE_LOSSES, "grpo")
GRPO_AGGREGATIONS = ("sequence", "token")


BETA_LOSSES = ("dpo", "ipo")  # the losses that divide or scale by beta: 0 is no loss (DPO) or a division by 0 (IPO)


def check_beta(kind, beta):
    """DPO's beta scales the margin (0: a constant loss, no gradient) and IPO's target is 1 / (2 beta): both need
    beta > 0. ORPO's lambda (also `beta`) may be 0 (the NLL term alone)."""
    if kind in BETA_LOSSES and not 0 < beta < math.inf:
        raise ValueError(f"beta={beta!r}: {kind.upper()} needs a finite beta > 0")


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


ORPO_NLL = ("sequence_mean", "token_mean")  # the NLL conventions orpo_loss offers (module docstring)


def orpo_loss(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, beta, n_pairs, n_chosen_tokens,
              nll="sequence_mean", weights=None):
    """ORPO's loss of a micro-batch as its share of the optimizer step's loss.

    chosen_logps, rejected_logps (P,): summed response log-probs; chosen_tokens, rejected_tokens (P,): the responses'
    token counts; n_pairs, n_chosen_tokens: the step's GLOBAL pair and chosen-token counts (all micro-batches and
    ranks), so summing the returned loss over micro-batches and ranks gives the loss of the whole batch; weights (P,)
    or None: per-pair weights on both terms.

    nll: "sequence_mean" (LLaMA-Factory v0.6.2): sum_i w_i * (-chosen_logps_i / chosen_tokens_i) / n_pairs;
    "token_mean": -sum_i w_i * chosen_logps_i / n_chosen_tokens.
    -> (loss (), chosen_rewards (P,), rejected_rewards (P,), {"nll", "or_loss", "log_odds"} each already divided by
    its normalizer). The rewards are beta * mean log-prob, as TRL and LLaMA-Factory log them for ORPO.
    """
    if nll not in ORPO_NLL:
        raise ValueError(f"orpo_loss: nll={nll!r}; expected one of {', '.join(ORPO_NLL)}")
    w = torch.ones_like(chosen_logps) if weights is None else weights.to(chosen_logps.dtype)
    mean_chosen, mean_rejected = chosen_logps / chosen_tokens, rejected_logps / rejected_tokens  # (P,)
    or_losses, log_odds = orpo_odds_ratio_losses(mean_chosen, mean_rejected)
    if nll == "sequence_mean":
        nll_value = (w * -mean_chosen).sum() / n_pairs
    else:
        nll_value = (w * -chosen_logps).sum() / n_chosen_tokens
    or_loss = (w * or_losses).sum() / n_pairs
    loss = nll_value + beta * or_loss
    stats = {"nll": nll_value.detach(), "or_loss": or_loss.detach(), "log_odds": log_odds.sum() / n_pairs}
    return loss, beta * mean_chosen.detach(), beta * mean_rejected.detach(), stats


def group_advantages(rewards, scale=True, eps=1e-4):
    """GRPO's advantages (Q, G) from rewards (Q, G): each reward minus its group's mean, divided by the group's std
    (Bessel-corrected, + eps, as TRL's scale_rewards="group") when `scale`. A group whose rewards are all equal gets
    advantages 0: it carries no learning signal."""
    if rewards.shape[-1] < 2:
        raise ValueError(f"group_advantages: a group needs >= 2 samples for its std, got {rewards.shape[-1]}")
    centered = rewards - rewards.mean(-1, keepdim=True)
    return centered / (rewards.std(-1, keepdim=True) + eps) if scale else centered


def grpo_loss(logps, old_logps, advantages, mask, clip_eps=0.2, beta=0.0, ref_logps=None, aggregation="sequence",
              n_sequences=None, n_tokens=None):
    """GRPO's clipped surrogate (+ beta * k3 KL) of a micro-batch, as its share of the optimizer step's loss.

    logps, old_logps, ref_logps (S, T): per-token log-probs of the S sampled responses under the policy (with grad),
    the sampling policy pi_old and the reference (ref_logps only needed when beta > 0); advantages (S,); mask (S, T)
    True on response tokens. n_sequences / n_tokens: the GLOBAL counts of the optimizer step (default: this
    micro-batch's), so that summing the returned loss over micro-batches and ranks gives the whole batch's loss.
    -> (loss (), {"kl": mean k3 per token, "clip_ratio": share of tokens whose gradient the clip stops}, each
    already divided by the global token count).
    """
    if aggregation not in GRPO_AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r}: expected one of {GRPO_AGGREGATIONS}")
    maskf = mask.to(logps.dtype)
    n_sequences = logps.shape[0] if n_sequences is None else n_sequences
    n_tokens = maskf.sum() if n_tokens is None else n_tokens
    ratio = torch.exp(logps - old_logps)  # (S, T)
    adv = advantages[:, None].to(logps.dtype)  # (S, 1)
    per_token = -torch.min(ratio * adv, ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv)
    kl = torch.zeros_like(logps)
    if beta != 0.0:
        log_ref_ratio = ref_logps - logps  # log(ref / pi)
        kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1.0
        per_token = per_token + beta * kl
    if aggregation == "sequence":
        loss = ((per_token * maskf).sum(-1) / maskf.sum(-1).clamp(min=1.0)).sum() / n_sequences
    else:
        loss = (per_token * maskf).sum() / n_tokens
    # The clip stops a token's gradient where the ratio has left [1 - eps, 1 + eps] on the side the advantage pushes.
    clipped = ((ratio < 1.0 - clip_eps) & (adv < 0)) | ((ratio > 1.0 + clip_eps) & (adv > 0))
    stats = {"kl": (kl.detach() * maskf).sum() / n_tokens, "clip_ratio": (clipped & mask).sum() / n_tokens}
    return loss, stats


def chosen_nll(chosen_logps, chosen_tokens):
    """(P,) per-token mean NLL of each chosen response: -log pi(y_w|x) / |y_w| (the NLL term's convention)."""
    return -chosen_logps / chosen_tokens


def reference_pair_losses(kind, policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_tokens, beta,
                          alpha=0.0):
    """DPO or IPO (kind "dpo" / "ipo") per pair, + alpha * the chosen response's per-token mean NLL when alpha > 0
    (DPO + NLL is Iterative RPO; IPO takes the same term).

    Inputs as dpo_losses, plus chosen_tokens (P,) and alpha >= 0. -> (losses (P,), chosen_rewards, rejected_rewards,
    the chosen NLL (P,) detached, or None when alpha == 0).
    """
    pair_loss = {"dpo": dpo_losses, "ipo": ipo_losses}[kind]
    losses, chosen_rewards, rejected_rewards = pair_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    if not alpha:
        return losses, chosen_rewards, rejected_rewards, None
    nll = chosen_nll(policy_chosen, chosen_tokens)
    return losses + alpha * nll, chosen_rewards, rejected_rewards, nll.detach()


def weighted_pair_mean(per_pair, n_pairs, weights=None):
    """sum_i w_i * l_i / n_pairs: a micro-batch's share of the step's (weighted) mean over its GLOBAL pair count.

    The weights scale each pair's loss and are not renormalized (ScPO's weighted loss), so unit weights give the plain
    mean; a batch whose weights average 0.5 moves the model half as far."""
    if weights is not None:
        per_pair = per_pair * weights.to(per_pair.dtype)
    return per_pair.sum() / n_pairs
