"""Tests for w2s/losses.py: DPO, IPO and ORPO against the papers' formulas evaluated by hand with `math`.

Each expected value is computed from the given log-probs in plain Python floats (math.exp / math.log), never by
calling the function under test; gradients are checked against their closed forms.

    python -m pytest -q tests/test_losses.py
"""

import math

import pytest
import torch

from w2s import losses

# (policy chosen, policy rejected, ref chosen, ref rejected) summed log-probs of three pairs
PC, PR, RC, RR = [-12.0, -30.5, -7.25], [-15.0, -28.0, -9.0], [-13.5, -29.0, -8.0], [-14.0, -27.5, -8.5]


def _t(values):
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def _log_sigmoid(x):
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_matches_rafailov_eq7_and_its_gradient(beta):
    pc, pr = _t(PC), _t(PR)
    out, rewards_c, rewards_r = losses.dpo_losses(pc, pr, torch.tensor(RC, dtype=torch.float64),
                                                  torch.tensor(RR, dtype=torch.float64), beta)
    for i in range(3):
        margin = beta * ((PC[i] - RC[i]) - (PR[i] - RR[i]))
        assert out[i].item() == pytest.approx(-_log_sigmoid(margin), rel=1e-12)
        assert rewards_c[i].item() == pytest.approx(beta * (PC[i] - RC[i]), rel=1e-12)
        assert rewards_r[i].item() == pytest.approx(beta * (PR[i] - RR[i]), rel=1e-12)
    out.sum().backward()
    for i in range(3):
        # d/d pc of -log sigmoid(m) = -beta * sigmoid(-m); d/d pr = +beta * sigmoid(-m)
        margin = beta * ((PC[i] - RC[i]) - (PR[i] - RR[i]))
        sig = 1.0 / (1.0 + math.exp(margin))
        assert pc.grad[i].item() == pytest.approx(-beta * sig, rel=1e-10)
        assert pr.grad[i].item() == pytest.approx(beta * sig, rel=1e-10)


def test_dpo_with_policy_equal_to_reference_is_log2():
    x = torch.tensor([-3.0, -40.0])
    out, _, _ = losses.dpo_losses(x, x - 1.0, x, x - 1.0, beta=0.3)
    assert torch.allclose(out, torch.full((2,), math.log(2.0)))


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_matches_azar_eq17(beta):
    pc, pr = _t(PC), _t(PR)
    out, rewards_c, rewards_r = losses.ipo_losses(pc, pr, torch.tensor(RC, dtype=torch.float64),
                                                  torch.tensor(RR, dtype=torch.float64), beta)
    out.sum().backward()
    for i in range(3):
        h = (PC[i] - RC[i]) - (PR[i] - RR[i])
        assert out[i].item() == pytest.approx((h - 1.0 / (2.0 * beta)) ** 2, rel=1e-12)
        assert pc.grad[i].item() == pytest.approx(2.0 * (h - 1.0 / (2.0 * beta)), rel=1e-10)
        assert rewards_c[i].item() == pytest.approx(beta * (PC[i] - RC[i]), rel=1e-12)
        assert rewards_r[i].item() == pytest.approx(beta * (PR[i] - RR[i]), rel=1e-12)


def test_orpo_odds_ratio_matches_hong_eqs_4_to_7():
    chosen_mean, rejected_mean = [-0.3, -2.5, -1e-3, -7.0], [-0.9, -1.0, -0.5, -6.0]
    out, log_odds = losses.orpo_odds_ratio_losses(_t(chosen_mean), _t(rejected_mean))
    for i in range(4):
        p_c, p_r = math.exp(chosen_mean[i]), math.exp(rejected_mean[i])
        odds_ratio = (p_c / (1.0 - p_c)) / (p_r / (1.0 - p_r))
        assert log_odds[i].item() == pytest.approx(math.log(odds_ratio), rel=1e-9)
        assert out[i].item() == pytest.approx(-math.log(odds_ratio / (1.0 + odds_ratio)), rel=1e-9)


def test_orpo_gradient_is_finite_when_a_probability_rounds_to_one():
    chosen = torch.tensor([0.0, -1e-9], requires_grad=True)  # P = 1: infinite odds without the clamp
    out, _ = losses.orpo_odds_ratio_losses(chosen, torch.tensor([-1.0, -1.0]))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(chosen.grad).all()


@pytest.mark.parametrize("x", [-1e-12, -1e-6, -0.1, -0.69, -0.7, -5.0, -40.0])
def test_log1mexp_is_accurate_at_both_ends(x):
    expected = math.log(-math.expm1(x))  # exact in double; the naive log(1 - exp(x)) loses it near 0 and far out
    got = losses.log1mexp(torch.tensor(x, dtype=torch.float64)).item()
    assert got == pytest.approx(expected, rel=1e-12)
    assert losses.log1mexp(torch.tensor(x, dtype=torch.float32)).item() == pytest.approx(expected, rel=1e-5)


def _log_odds(mean_logp):
    p = math.exp(mean_logp)
    return math.log(p / (1.0 - p))


def test_orpo_loss_by_hand_with_global_normalizers():
    """Two pairs: summed log-probs and token counts in, the loss L = NLL / chosen tokens + beta * mean L_OR out (the
    token-mean NLL option; the default, LLaMA-Factory v0.6.2's sequence mean, is tests/test_beyond.py's), with the
    gradient of its closed form; split into two micro-batches with the same global normalizers, it sums back."""
    beta, chosen, rejected, n_chosen, n_rejected = 0.25, [-3.0, -1.2], [-4.0, -0.9], [3, 2], [2, 1]
    mean_c, mean_r = [-1.0, -0.6], [-2.0, -0.9]  # summed log-probs / token counts
    margins = [_log_odds(mean_c[i]) - _log_odds(mean_r[i]) for i in range(2)]
    or_losses = [math.log1p(math.exp(-m)) for m in margins]  # -log sigmoid(margin)
    nll = 4.2 / 5  # -(-3.0 - 1.2) over the 3 + 2 chosen tokens
    expected = nll + beta * sum(or_losses) / 2

    pc = _t(chosen)
    loss, rewards_c, rewards_r, stats = losses.orpo_loss(
        pc, _t(rejected), torch.tensor(n_chosen), torch.tensor(n_rejected), beta, n_pairs=2, n_chosen_tokens=5,
        nll="token_mean")
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert stats["nll"].item() == pytest.approx(nll, rel=1e-12)
    assert stats["or_loss"].item() == pytest.approx(sum(or_losses) / 2, rel=1e-12)
    assert stats["log_odds"].item() == pytest.approx(sum(margins) / 2, rel=1e-12)
    assert rewards_c.tolist() == pytest.approx([beta * m for m in mean_c], rel=1e-12)
    assert rewards_r.tolist() == pytest.approx([beta * m for m in mean_r], rel=1e-12)
    loss.backward()
    for i in range(2):
        # d/d chosen_i: -1/5 from the NLL; through the mean m = chosen_i / n_i, d log odds / dm = 1 / (1 - e^m),
        # and d(-log sigmoid(margin)) / d margin = -sigmoid(-margin)
        d_or = -1.0 / (1.0 + math.exp(margins[i])) / (1.0 - math.exp(mean_c[i])) / n_chosen[i]
        assert pc.grad[i].item() == pytest.approx(-1.0 / 5 + beta * d_or / 2, rel=1e-10)

    parts = [losses.orpo_loss(_t(chosen[i:i + 1]), _t(rejected[i:i + 1]), torch.tensor(n_chosen[i:i + 1]),
                              torch.tensor(n_rejected[i:i + 1]), beta, n_pairs=2, n_chosen_tokens=5,
                              nll="token_mean")[0]
             for i in range(2)]
    assert sum(p.item() for p in parts) == pytest.approx(expected, rel=1e-12)


def test_orpo_log_odds_statistic_is_a_share_of_the_steps_pairs():
    """The logged mean log odds ratio, like the loss, divides by the STEP's pair count (here 4, of which this
    micro-batch holds 2), so micro-batches sum to the step's mean. By hand: each pair's chosen mean log-prob is -1,
    its rejected -2."""
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    _, _, _, stats = losses.orpo_loss(torch.tensor([-2.0, -3.0]), torch.tensor([-4.0, -6.0]), torch.tensor([2.0, 3.0]),
                                      torch.tensor([2.0, 3.0]), 0.1, n_pairs=4, n_chosen_tokens=5)
    assert float(stats["log_odds"]) == pytest.approx(2 * (logit(math.exp(-1)) - logit(math.exp(-2))) / 4, rel=1e-5)


def test_pair_counts_and_reward_accuracy_of_a_preference_micro_batch():
    from w2s import loss_steps
    from w2s.data import IGNORE_INDEX

    targets = torch.full((2, 6), IGNORE_INDEX)  # row 0 the chosen response (3 tokens), row 1 the rejected (5)
    targets[0, 3:], targets[1, 1:] = 1, 1
    assert loss_steps.pair_counts({"n_pairs": 1, "targets": targets}) == [8, 1, 3]  # [tokens, pairs, chosen tokens]

    class PolicyAtReference(torch.nn.Module):  # every response token at log-prob -1
        def forward(self, tokens, targets, per_token, target_rows=None):
            return (targets != IGNORE_INDEX).float().flatten() * -1.0

    equal = torch.full((2, 4), IGNORE_INDEX)  # 3 response tokens a side: policy and reference both at -3
    equal[:, 1:] = 1
    batch = {"tokens": equal, "targets": equal, "n_pairs": 1, "ref": torch.tensor([-3.0, -3.0])}
    _, metrics = loss_steps.PreferenceStep("dpo", 0.1)(PolicyAtReference(), batch, [6, 1, 3])
    assert float(metrics["rewards/accuracies"]) == 0.0  # equal rewards are no win (TRL: chosen > rejected, strict)
