"""Tests of what goes beyond the paper, and of ORPO as the paper's framework computes it (docs/PAPER.md).

* losses against hand computations on tiny tensors (plain `math`, never the code under test): ORPO as LLaMA-Factory
  v0.6.2 computes it (loss, gradients, and the same numbers when the pairs are cut into micro-batches on two ranks,
  the loop's global normalizers), vote-margin-weighted DPO, DPO + NLL; and the trainer's step against the same
  formulas over full-logit log-probs of a tiny model;
* the stage functions on synthetic records with known answers: maj@k, the weak self-consistency filter, vote-margin
  weights, ScPO's most- vs least-voted pairs;
* the recipe options: validation, the rows they add, and that off they change no key;
* a pipeline run on tests/test_pipeline.py's tiny world with every option on: round 2's reference log-probs are
  round 1's model's, and no round's pairs depend on train_2 gold (a spy on the gold reader hands out wrong gold).

    python -m pytest -q tests/test_beyond.py
"""

import json
import math
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_pipeline import world  # noqa: E402, F401  (the tiny world: data and two habit models)
from test_recipe import BASE, _load  # noqa: E402

from w2s import losses  # noqa: E402
from w2s.stages.consistency import self_consistent  # noqa: E402
from w2s.stages.metrics import majority_accuracy, majority_vote, vote_counts  # noqa: E402
from w2s.stages.preference_pairs import build_pairs, self_consistency_pair, vote_margin  # noqa: E402


def _t(values):
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def _softplus_neg(x):  # -log sigmoid(x)
    return math.log1p(math.exp(-x))


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# ---------------------------------------------------------------------------------------------------- ORPO v0.6.2

CHOSEN, REJECTED, N_CHOSEN, N_REJECTED = [-3.0, -1.2, -6.4, -0.5], [-4.0, -0.9, -5.0, -2.4], [3, 2, 8, 1], [2, 1, 4, 3]


def _orpo_by_hand(beta, weights=(1, 1, 1, 1)):
    """LLaMA-Factory v0.6.2's CustomORPOTrainer: m = summed log-prob / tokens (get_batch_logps average_log_prob=True);
    log_odds = (m_c - m_r) - (log1p(-e^m_c) - log1p(-e^m_r)); loss = mean_i(-m_c + beta * -log sigmoid(log_odds)).
    -> (loss, d loss / d chosen_logps, d loss / d rejected_logps) in closed form."""
    P = len(CHOSEN)
    loss, g_c, g_r = 0.0, [], []
    for i in range(P):
        mc, mr = CHOSEN[i] / N_CHOSEN[i], REJECTED[i] / N_REJECTED[i]
        log_odds = (mc - mr) - (math.log1p(-math.exp(mc)) - math.log1p(-math.exp(mr)))
        loss += weights[i] * (-mc + beta * _softplus_neg(log_odds)) / P
        # d log odds / dm = 1 + e^m / (1 - e^m) = 1 / (1 - e^m); d(-log sigmoid(z))/dz = -sigmoid(-z)
        d_or = -_sigmoid(-log_odds)
        g_c.append(weights[i] * (-1.0 + beta * d_or / (1 - math.exp(mc))) / N_CHOSEN[i] / P)
        g_r.append(weights[i] * (beta * d_or * -1.0 / (1 - math.exp(mr))) / N_REJECTED[i] / P)
    return loss, g_c, g_r


@pytest.mark.parametrize("weighted", [False, True])
def test_orpo_is_llama_factory_v062_and_splitting_changes_nothing(weighted):
    beta, w = 0.25, ([0.5, 1.0, 0.2, 0.9] if weighted else [1, 1, 1, 1])
    expected, g_c, g_r = _orpo_by_hand(beta, w)
    pc, pr = _t(CHOSEN), _t(REJECTED)
    weights = torch.tensor(w, dtype=torch.float64) if weighted else None
    loss, _, _, stats = losses.orpo_loss(pc, pr, torch.tensor(N_CHOSEN), torch.tensor(N_REJECTED), beta, n_pairs=4,
                                         n_chosen_tokens=sum(N_CHOSEN), weights=weights)  # default: sequence_mean
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert stats["nll"].item() == pytest.approx(sum(-w[i] * CHOSEN[i] / N_CHOSEN[i] for i in range(4)) / 4, rel=1e-12)
    loss.backward()
    assert pc.grad.tolist() == pytest.approx(g_c, rel=1e-10) and pr.grad.tolist() == pytest.approx(g_r, rel=1e-10)
    # Two ranks x two micro-batches of one pair each: every part divides by the GLOBAL pair count (4), so the parts'
    # losses and gradients add up to the whole batch's, as the loop's sum over micro-batches and ranks does.
    pc2, pr2, total = _t(CHOSEN), _t(REJECTED), 0.0
    for rank in range(2):
        for micro in range(2):
            i = 2 * rank + micro
            part, *_ = losses.orpo_loss(pc2[i:i + 1], pr2[i:i + 1], torch.tensor(N_CHOSEN[i:i + 1]),
                                        torch.tensor(N_REJECTED[i:i + 1]), beta, n_pairs=4,
                                        n_chosen_tokens=sum(N_CHOSEN),
                                        weights=weights[i:i + 1] if weighted else None)
            part.backward()
            total += part.item()
    assert total == pytest.approx(expected, rel=1e-12)
    assert pc2.grad.tolist() == pytest.approx(g_c, rel=1e-10) and pr2.grad.tolist() == pytest.approx(g_r, rel=1e-10)


def _preference_batch(weights=None):
    """The pairs above as a loss step's batch, and a stand-in for TrainModule giving each response token the
    per-token mean log-prob of its sequence (so sums and means are CHOSEN / N_CHOSEN's)."""
    from w2s.data import IGNORE_INDEX

    sums, counts = CHOSEN + REJECTED, N_CHOSEN + N_REJECTED
    width = max(counts) + 1
    targets = torch.full((8, width), IGNORE_INDEX)
    logps = torch.zeros(8, width, dtype=torch.float64)
    for row, (total, n) in enumerate(zip(sums, counts)):
        targets[row, :n], logps[row, :n] = 1, total / n
    batch = {"tokens": torch.zeros_like(targets), "targets": targets, "n_pairs": 4, "ref": torch.zeros(8)}
    if weights is not None:
        batch["weights"] = torch.tensor(weights, dtype=torch.float64)
    return (lambda tokens, targets, per_token, **_: logps.flatten()), batch


def test_preference_step_logs_what_trl_logs():
    """TRL's DPO logs summed response log-probs, its ORPO per-token means; the DPO NLL term is weighted as its loss."""
    from w2s.loss_steps import PreferenceStep

    w = [0.5, 1.0, 0.2, 0.9]
    module, batch = _preference_batch(weights=w)
    norm = torch.tensor([float(sum(N_CHOSEN + N_REJECTED)), 4.0, float(sum(N_CHOSEN))])
    _, dpo = PreferenceStep("dpo", 0.1, nll_weight=1.0)(module, batch, norm)
    assert dpo["logps/chosen"].item() == pytest.approx(sum(CHOSEN) / 4, rel=1e-12)
    assert dpo["nll"].item() == pytest.approx(sum(-w[i] * CHOSEN[i] / N_CHOSEN[i] for i in range(4)) / 4, rel=1e-12)
    _, orpo = PreferenceStep("orpo", 0.1)(module, batch, norm)
    assert orpo["logps/chosen"].item() == pytest.approx(sum(c / n for c, n in zip(CHOSEN, N_CHOSEN)) / 4, rel=1e-12)
    assert orpo["logps/rejected"].item() == pytest.approx(sum(r / n for r, n in zip(REJECTED, N_REJECTED)) / 4,
                                                          rel=1e-12)



def test_dpo_step_metrics_summed_over_micro_batches_are_trls_means_over_the_step():
    """TRL's DPO metrics with rewards beta * (policy - reference): rewards/chosen, /rejected, /margins, /accuracies
    and logps/* are means over the step's pairs; two micro-batches of 2 pairs each, normalised by the step's 4 pairs,
    sum to them."""
    from w2s.loss_steps import PreferenceStep

    beta, ref_c, ref_r = 0.1, [-2.5, -1.0, -7.0, -1.5], [-3.0, -1.5, -4.0, -2.0]
    module, batch = _preference_batch()
    logps = module(None, None, True).view(8, -1)
    batch["ref"] = torch.tensor(ref_c + ref_r, dtype=torch.float64)
    norm = torch.tensor([float(sum(N_CHOSEN + N_REJECTED)), 4.0, float(sum(N_CHOSEN))])
    summed = {}
    for pairs in ([0, 1], [2, 3]):
        rows = pairs + [4 + i for i in pairs]
        part = {"tokens": batch["tokens"][rows], "targets": batch["targets"][rows], "n_pairs": 2,
                "ref": batch["ref"][rows]}
        module = lambda t, y, per_token, rows=rows, **_: logps[rows].flatten()  # noqa: E731
        _, metrics = PreferenceStep("dpo", beta)(module, part, norm)
        for k, v in metrics.items():
            summed[k] = summed.get(k, 0.0) + v.item()
    chosen_rewards = [beta * (c - r) for c, r in zip(CHOSEN, ref_c)]
    rejected_rewards = [beta * (c - r) for c, r in zip(REJECTED, ref_r)]
    expected = {"rewards/chosen": sum(chosen_rewards) / 4, "rewards/rejected": sum(rejected_rewards) / 4,
                "rewards/margins": sum(a - b for a, b in zip(chosen_rewards, rejected_rewards)) / 4,
                "rewards/accuracies": sum(a > b for a, b in zip(chosen_rewards, rejected_rewards)) / 4,
                "logps/chosen": sum(CHOSEN) / 4, "logps/rejected": sum(REJECTED) / 4}
    assert expected["rewards/accuracies"] == 0.75  # the pairs disagree: a wrong normaliser shows
    for k, v in expected.items():
        assert summed[k] == pytest.approx(v, rel=1e-12), k


def test_orpo_step_with_the_token_mean_nll_sums_over_micro_batches_to_trls_orpo_loss():
    """orpo_nll="token_mean" is TRL's ORPOTrainer: loss = NLL of the chosen tokens averaged over ALL the step's chosen
    tokens + beta * mean over pairs of -log sigmoid(log odds ratio), log odds(m) = m - log(1 - e^m) of each response's
    mean token log-prob. Split into two micro-batches of 2 pairs (3 + 2 and 8 + 1 chosen tokens), each divides its NLL
    by the step's 14 chosen tokens (norm[2]), not its own, so the parts sum to the step's loss."""
    from w2s.loss_steps import PreferenceStep

    beta = 0.1
    module, batch = _preference_batch()
    logps = module(None, None, True).view(8, -1)
    norm = torch.tensor([float(sum(N_CHOSEN + N_REJECTED)), 4.0, float(sum(N_CHOSEN))])
    step, total = PreferenceStep("orpo", beta, orpo_nll="token_mean"), 0.0
    for pairs in ([0, 1], [2, 3]):
        rows = pairs + [4 + i for i in pairs]
        part = {"tokens": batch["tokens"][rows], "targets": batch["targets"][rows], "n_pairs": 2}
        loss, _ = step(lambda t, y, per_token, rows=rows, **_: logps[rows].flatten(), part, norm)
        total += loss.item()
    log_odds = lambda m: m - math.log1p(-math.exp(m))  # noqa: E731
    ratios = [log_odds(c / nc) - log_odds(r / nr) for c, r, nc, nr in zip(CHOSEN, REJECTED, N_CHOSEN, N_REJECTED)]
    expected = -sum(CHOSEN) / sum(N_CHOSEN) + beta * sum(_softplus_neg(x) for x in ratios) / 4
    assert total == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("kind, nll_weight", [("dpo", 0.0), ("dpo", 1.0), ("ipo", 0.5), ("orpo", 0.0)])
def test_an_empty_preference_slot_adds_zero_with_a_gradient_and_logs_every_metric_of_a_full_one(kind, nll_weight):
    """A rank whose slot of a short last batch is empty still runs backward (FSDP's gathers are collective) and logs
    the same metrics as the ranks with pairs, all zero, since the loop sums every metric over the ranks."""
    from w2s.data import IGNORE_INDEX
    from w2s.loss_steps import PreferenceStep

    scale = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
    module, batch = _preference_batch()
    full_logps = module(None, None, True)
    norm = torch.tensor([float(sum(N_CHOSEN + N_REJECTED)), 4.0, float(sum(N_CHOSEN))])
    step = PreferenceStep(kind, 0.1, nll_weight=nll_weight)
    _, full = step(lambda t, y, per_token, **_: scale * full_logps, batch, norm)
    dummy = torch.full((1, 3), IGNORE_INDEX)  # data.collate_pairs of no pairs: one all-ignored row
    empty = {"tokens": torch.zeros_like(dummy), "targets": dummy, "n_pairs": 0, "ref": torch.zeros(0)}
    loss, metrics = step(lambda t, y, per_token, **_: scale * torch.zeros(3, dtype=torch.float64), empty, norm)
    assert metrics.keys() == full.keys() and all(v.item() == 0.0 for v in metrics.values())
    loss.backward()
    assert loss.item() == 0.0 and scale.grad.item() == 0.0


def test_orpo_token_mean_is_the_other_convention():
    """The two conventions differ exactly when chosen lengths differ: sequence mean weighs every pair alike."""
    args = (_t(CHOSEN), _t(REJECTED), torch.tensor(N_CHOSEN), torch.tensor(N_REJECTED), 0.0)
    seq = losses.orpo_loss(*args, n_pairs=4, n_chosen_tokens=sum(N_CHOSEN))[0].item()
    tok = losses.orpo_loss(*args, n_pairs=4, n_chosen_tokens=sum(N_CHOSEN), nll="token_mean")[0].item()
    assert seq == pytest.approx(sum(-c / n for c, n in zip(CHOSEN, N_CHOSEN)) / 4, rel=1e-12)
    assert tok == pytest.approx(-sum(CHOSEN) / sum(N_CHOSEN), rel=1e-12) and abs(seq - tok) > 0.01
    with pytest.raises(ValueError, match="nll='mean'"):
        losses.orpo_loss(*args, n_pairs=4, n_chosen_tokens=14, nll="mean")


# -------------------------------------------------------------------------------------------- weighted DPO, DPO + NLL

PC, PR, RC, RR = [-12.0, -30.5, -7.25], [-15.0, -28.0, -9.0], [-13.5, -29.0, -8.0], [-14.0, -27.5, -8.5]
TOKENS = [4, 10, 3]


@pytest.mark.parametrize("kind", ["dpo", "ipo"])
@pytest.mark.parametrize("beta, alpha, w", [(0.1, 0.0, [0.3, 1.0, 0.6]), (0.5, 1.0, [1, 1, 1]),
                                            (0.2, 0.7, [0.9, 0.1, 0.5])])
def test_weighted_dpo_ipo_and_their_nll_term_by_hand(kind, beta, alpha, w):
    """L = sum_i w_i * [ l_i + alpha * (-pc_i / |y_w,i|) ] / P with its gradient, split over micro-batches too;
    l_i = -log sigmoid(beta * h_i) (DPO) or (h_i - 1 / (2 beta))^2 (IPO)."""
    pc, pr = _t(PC), _t(PR)
    per_pair, _, _, nll = losses.reference_pair_losses(kind, pc, pr, torch.tensor(RC, dtype=torch.float64),
                                                       torch.tensor(RR, dtype=torch.float64), torch.tensor(TOKENS),
                                                       beta, alpha)
    loss = losses.weighted_pair_mean(per_pair, 3, torch.tensor(w, dtype=torch.float64))
    expected, g_c, g_r = 0.0, [], []
    for i in range(3):
        h = (PC[i] - RC[i]) - (PR[i] - RR[i])
        # the pair term and its derivative in h (d h / d pc = 1, d h / d pr = -1)
        pair, d_h = ((_softplus_neg(beta * h), -beta * _sigmoid(-beta * h)) if kind == "dpo" else
                     ((h - 1 / (2 * beta)) ** 2, 2 * (h - 1 / (2 * beta))))
        expected += w[i] * (pair + alpha * -PC[i] / TOKENS[i]) / 3
        g_c.append(w[i] * (d_h - alpha / TOKENS[i]) / 3)
        g_r.append(w[i] * -d_h / 3)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert nll is None if alpha == 0 else nll.tolist() == pytest.approx([-c / n for c, n in zip(PC, TOKENS)])
    loss.backward()
    assert pc.grad.tolist() == pytest.approx(g_c, rel=1e-10) and pr.grad.tolist() == pytest.approx(g_r, rel=1e-10)
    parts = [losses.weighted_pair_mean(losses.reference_pair_losses(
        kind, _t(PC[i:i + 1]), _t(PR[i:i + 1]), torch.tensor(RC[i:i + 1], dtype=torch.float64),
        torch.tensor(RR[i:i + 1], dtype=torch.float64), torch.tensor(TOKENS[i:i + 1]), beta, alpha)[0], 3,
        torch.tensor(w[i:i + 1], dtype=torch.float64)) for i in range(3)]
    assert sum(p.item() for p in parts) == pytest.approx(expected, rel=1e-12)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from hf_tiny import hf_model

    path = tmp_path_factory.mktemp("llama")
    hf_model("llama2").save_pretrained(path)
    return path


def _pairs(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = lambda k: torch.randint(3, 128, (k,), generator=g).tolist()  # noqa: E731
    return [{"prompt_ids": ids(2 + i % 3), "chosen_ids": ids(1 + (3 * i) % 5), "rejected_ids": ids(2 + i % 4),
             "weight": 0.2 + 0.15 * i} for i in range(n)]


def _response_logps(model, prompt, response):
    ids = torch.tensor([prompt + response])
    logp = torch.log_softmax(model(ids)[0].double(), dim=-1)
    return torch.stack([logp[t - 1, ids[0, t]] for t in range(len(prompt), ids.shape[1])])


@pytest.mark.parametrize("kind, nll_weight", [("dpo", 0.5), ("orpo", 0.0)])
def test_the_trainer_step_equals_the_formulas_on_a_tiny_model(tiny_ckpt, kind, nll_weight):
    """Weighted pairs, DPO + NLL and ORPO (sequence mean) through the real loop, micro-batches of 2 on a batch of 5,
    against the formulas over full-logit log-probs of the initial weights (the first step's loss); micro-batches of 1
    give the same first two steps."""
    import w2s
    from w2s.train import TrainConfig, train_preference

    pairs, beta = _pairs(5, seed=3), 0.5
    recs = {}
    for micro in (2, 1):
        cfg = TrainConfig(lr=1e-2, batch_size=5, micro_batch_size=micro, max_steps=2, clip=None, progress=False,
                          beta=beta, nll_weight=nll_weight)
        recs[micro] = []
        train_preference(w2s.load_model(tiny_ckpt, dtype=torch.float32), None, pairs, cfg, loss=kind,
                         on_step=recs[micro].append)
    model, expected = w2s.load_model(tiny_ckpt, dtype=torch.float32), 0.0
    with torch.no_grad():
        for p in pairs:
            c = _response_logps(model, p["prompt_ids"], p["chosen_ids"])
            r = _response_logps(model, p["prompt_ids"], p["rejected_ids"])
            if kind == "orpo":
                mc, mr = c.mean().item(), r.mean().item()
                log_odds = (mc - mr) - (math.log1p(-math.exp(mc)) - math.log1p(-math.exp(mr)))
                term = -mc + beta * _softplus_neg(log_odds)
            else:  # the policy starts at the reference: DPO's margin is 0
                term = math.log(2.0) + nll_weight * -c.mean().item()
            expected += p["weight"] * term / len(pairs)
    assert recs[2][0]["loss"] == pytest.approx(expected, rel=1e-5)
    for a, b in zip(recs[1], recs[2], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


# ---------------------------------------------------------------------------------------------------- votes

def test_vote_counts_majority_and_maj_at_k():
    answers = ["3", "", "5", "3", "", "7", "5", "3"]
    assert vote_counts(answers) == [("3", 3), ("", 2), ("5", 2), ("7", 1)]
    assert majority_vote(answers) == ("3", 3 / 8) and majority_vote(["", ""]) == ("", 0.0)
    samples = {"a": [{"answer": x} for x in answers],  # majority 3 = gold: right
               "b": [{"answer": x} for x in ["4", "4", "9", "9", "9"]],  # majority 9, gold 4: wrong (pass@5 right)
               "c": [{"answer": x} for x in ["", "", "", "2"]],  # majority 2 (empties never win) = gold: right
               "d": [{"answer": ""}] * 3}  # no answer: wrong
    gold = {"a": "3", "b": "4", "c": "2", "d": "1"}
    assert majority_accuracy(samples, gold) == pytest.approx(2 / 4)
    # A lax comparison votes equivalent answers together: 0.5 and 1/2 beat 9.
    lax = lambda a, b: {a, b} <= {"0.5", "1/2"} or a == b  # noqa: E731
    assert majority_accuracy({"x": [{"answer": v} for v in ["0.5", "9", "1/2", "9"]]}, {"x": "1/2"}, lax) == 1.0


def test_weak_self_consistency_filter_keeps_confident_weak_majorities():
    samples = {"a": [{"answer": x} for x in ["3", "3", "3", "5", ""]],  # 3/5 = 0.6: kept at 0.6
               "b": [{"answer": x} for x in ["3", "5", "7", "", ""]],  # 1/5: dropped
               "c": [{"answer": x} for x in ["", "", "", "", ""]],  # no answer: dropped
               "d": [{"answer": x} for x in ["8", "8", "8", "8", "1"]]}  # 0.8
    assert self_consistent(samples, 0.6) == {"a": pytest.approx(0.6), "d": pytest.approx(0.8)}
    assert set(self_consistent(samples, 0.7)) == {"d"} and set(self_consistent(samples, 0.0)) == {"a", "b", "c", "d"}


def _samples(answers):
    return [{"response": f"resp {i} #### {a}" if a else f"resp {i} no answer", "answer": a}
            for i, a in enumerate(answers)]


def _weak(qid, answer, **extra):
    return {"id": qid, "question": f"q {qid}", "response": f"weak #### {answer}", "answer": answer, **extra}


def test_vote_margin_weights_follow_scpo():
    votes = ["3"] * 6 + ["5"] * 3 + [""]
    classes = [("3", 6), ("5", 3), ("", 1)]  # vote_counts(votes)
    assert vote_margin("3", "5", classes, lambda a, b: a == b) == (6, 3, pytest.approx(0.3))
    assert vote_margin("3", "", classes, lambda a, b: a == b) == (6, 1, pytest.approx(0.5))
    assert vote_margin("3", "9", classes, lambda a, b: a == b) == (6, 0, pytest.approx(0.6))  # an answer nobody gave
    weak = [_weak("chosen", "3"), _weak("rejected", "4")]
    by_id = {"chosen": _samples(votes), "rejected": _samples(["4"] + ["7"] * 9)}
    pairs, counts = build_pairs(weak, by_id, seed=0, pair_weighting="margin")
    got = {p["id"]: p for p in pairs}
    # weak = a+ (6 votes) chosen over a 5 or a no-answer sample; weak 4 (1 vote) rejected for a+ = 7 (9 votes).
    assert got["chosen"]["kind"] == "weak_chosen"
    assert got["chosen"]["weight"] == pytest.approx((6 - got["chosen"]["rejected_votes"]) / 10)
    assert got["chosen"]["rejected_votes"] in (3, 1)
    assert got["rejected"]["kind"] == "weak_rejected" and got["rejected"]["weight"] == pytest.approx(0.8)
    assert "weight" not in build_pairs(weak, by_id, seed=0)[0][0]  # off: the paper's pairs, unweighted
    assert counts["pairs"] == 2


def test_most_vs_least_voted_pairs_for_the_questions_the_paper_skips():
    weak = [_weak("below_flip", "5"), _weak("absent", "3", absent=True), _weak("low", "3"), _weak("paper", "3")]
    by_id = {"below_flip": _samples(["3"] * 7 + ["5"] * 2 + ["9"]),  # weak 5 != a+ 3 at 0.7 < 0.8: paper skips
             "absent": _samples(["3"] * 6 + ["2"] * 3 + [""]),  # no weak label: paper skips
             "low": _samples(["3"] * 5 + ["4"] * 5),  # 0.5 < 0.6: skipped by both
             "paper": _samples(["3"] * 8 + ["6"] * 2)}  # the paper's rule: weak chosen
    off, off_counts = build_pairs(weak, by_id, seed=1)
    assert [p["id"] for p in off] == ["paper"] and off_counts["skipped_weak_absent"] == 1
    pairs, counts = build_pairs(weak, by_id, seed=1, self_consistency_pairs=True, pair_weighting="margin")
    got = {p["id"]: p for p in pairs}
    assert set(got) == {"below_flip", "absent", "paper"} and counts["self_consistency"] == 2
    assert (got["below_flip"]["chosen_answer"], got["below_flip"]["rejected_answer"]) == ("3", "9")  # 7 vs 1 vote
    assert got["below_flip"]["weight"] == pytest.approx(0.6) and got["below_flip"]["kind"] == "self_consistency"
    assert (got["absent"]["chosen_answer"], got["absent"]["rejected_answer"]) == ("3", "")  # 6 vs the 1 no-answer
    assert "weak" not in got["absent"]["chosen"] + got["absent"]["rejected"]  # never the weak label
    assert got["paper"]["kind"] == "weak_chosen"
    # One answer class only: no least-voted answer to reject.
    assert self_consistency_pair(_samples(["3"] * 10), [("3", 10)], lambda a, b: a == b, 0.6, random.Random(0)) is None


def test_each_question_s_vote_is_counted_once(monkeypatch):
    """The vote, the margins of a question's pairs and its most- vs least-voted pair share one count of the vote (a
    count compares answers, which under the equivalence grader is sympy's work): with margins, three pairs per question
    and ScPO pairs on, one count per question, and the pairs are those of counting again for each."""
    import w2s.stages.preference_pairs as preference_pairs
    from w2s.stages.metrics import vote_counts

    weak = [_weak("paper", "3"), _weak("below_flip", "5")]
    by_id = {"paper": _samples(["3"] * 6 + ["6", "7", "8", ""]), "below_flip": _samples(["3"] * 7 + ["5"] * 2 + ["9"])}
    options = dict(seed=0, max_pairs_per_question=3, pair_weighting="margin", self_consistency_pairs=True)
    counted = []
    monkeypatch.setattr(preference_pairs, "vote_counts", lambda answers, same: counted.append(answers) or
                        vote_counts(answers, same))
    pairs, _ = build_pairs(weak, by_id, **options)
    assert [p["kind"] for p in pairs] == ["weak_chosen"] * 3 + ["self_consistency"] and len(counted) == 2
    for p in pairs:  # the margins by hand: "paper" 6 votes for 3, 1 for each other answer; "below_flip" 7 vs 1
        assert (p["chosen_votes"], p["rejected_votes"]) == ((6, 1) if p["id"] == "paper" else (7, 1))


# ---------------------------------------------------------------------------------------------------- recipe options

def _recipe(tmp_path, extra=""):
    return _load(tmp_path, BASE + extra)  # test_recipe's minimal recipe and its stub files, plus `extra`


def _keys(tmp_path, extra=""):
    from w2s.engine import stage_key
    from w2s.pipeline import build_stages

    keys, stages = {}, {}
    for stage in build_stages(_recipe(tmp_path, extra)):
        keys[stage.name], stages[stage.name] = stage_key(stage, keys), stage
    return keys, stages


@pytest.mark.parametrize("extra, message", [
    ("[stage2]\nrounds = 0\n", r"\[stage2\] rounds: expected >= 1"),
    ("[stage2]\npair_weighting = \"votes\"\n", r"\[stage2\] pair_weighting: expected one of none, margin"),
    ("[stage2]\nstart_from = \"base\"\n", r"\[stage2\] start_from: expected one of weak, icl, hybrid .*'base'"),
    ("[stage1]\nweak_self_consistency = 1\n", r"\[stage1\] weak_self_consistency: expected 0 \(off\) or k >= 2"),
    ("[stage1]\nweak_min_confidence = 1.5\n", r"\[stage1\] weak_min_confidence"),
    ("[stage1]\nweak_min_confidence = -0.1\n", r"\[stage1\] weak_min_confidence: expected 0 <= value <= 1"),
    ("[stage1]\nweak_self_consistency = -2\n", r"\[stage1\] weak_self_consistency: expected 0 \(off\) or k >= 2"),
    # Iterative RPO iterates the pair losses: GRPO alone has nothing to iterate
    ("[stage2]\nrounds = 2\nlosses = [\"grpo\"]\n", r"\[stage2\] rounds: iterates the pair losses"),
    ("[stage1]\nweak_relabel = true\n", r"\[stage1\] weak_relabel: relabels the questions"),
    ("[preference]\norpo_nll = \"mean\"\n", r"TrainConfig.orpo_nll='mean'"),
    ("[preference]\nnll_weight = -1.0\n", r"\[preference\]\.nll_weight: expected a value >= 0"),
])  # fmt: skip
def test_bad_options_are_one_clear_error(tmp_path, extra, message):
    from w2s.pipeline import build_stages

    with pytest.raises(ValueError, match=message):
        build_stages(_recipe(tmp_path, extra))


def test_options_off_change_no_key_and_on_change_only_theirs(tmp_path):
    base, _ = _keys(tmp_path)
    off = ("[stage1]\nweak_self_consistency = 0\nweak_min_confidence = 0.6\nweak_relabel = false\n"
           "[stage2]\nrounds = 1\npair_weighting = \"none\"\nself_consistency_pairs = false\nstart_from = \"hybrid\"\n"
           "[preference]\nnll_weight = 0.0\norpo_nll = \"sequence_mean\"\n")
    assert _keys(tmp_path, off)[0] == base
    stage2 = {"16_dpo", "17_orpo", "28_eval_stage2_dpo", "29_eval_stage2_orpo"}

    def changed(extra):
        keys, _ = _keys(tmp_path, extra)
        assert set(base) <= set(keys)
        return {n for n in base if keys[n] != base[n]}

    assert changed("[preference]\norpo_nll = \"token_mean\"\n") == {"17_orpo", "29_eval_stage2_orpo"}
    assert changed("[preference]\nnll_weight = 1.0\n") == {"16_dpo", "28_eval_stage2_dpo"}
    # docs/PAPER.md: an option beyond the paper enters a key only when it is on (the paper's keys stay as they were)
    _, stages = _keys(tmp_path)
    assert not {"nll_weight", "pair_weighting", "self_consistency_pairs", "weak_self_consistency", "weak_relabel"} & (
        set(stages["16_dpo"].options) | set(stages["15_pairs"].options) | set(stages["04_r1_filter"].options))
    assert _keys(tmp_path, "[preference]\nnll_weight = 1.0\n")[1]["16_dpo"].options["nll_weight"] == 1.0
    assert changed("[stage2]\npair_weighting = \"margin\"\n") == {"15_pairs"} | stage2
    assert changed("[stage2]\nself_consistency_pairs = true\n") == {"15_pairs"} | stage2
    keys, stages = _keys(tmp_path, "[stage1]\nweak_self_consistency = 5\n")
    assert stages["02_weak_samples"].options["n"] == 5 and stages["02_weak_samples"].reads[-1] == "01_weak_sft"
    assert "02_weak_samples" in stages["04_r1_filter"].reads and "02_weak_samples" in stages["15_pairs"].reads
    # ... and both are handed the samples to filter by (reading them is not enough)
    assert stages["04_r1_filter"].args["weak_samples"] == stages["15_pairs"].args["weak_samples"] == "02_weak_samples"
    assert not {n for n in base if keys[n] != base[n]} & {"00_data", "01_weak_sft", "02_weak_labels", "03_icl_labels",
                                                           "18_full_weak_ft", "19_ceiling", "31_eval_strong_icl"}
    # The weak model's bar drops questions from the round-1 filter's weak set and from the pairs: all of Stage I from
    # the filter on, and Stage II; not the weak model's samples, labels, the ICL labels, nor the baselines.
    bar, _ = _keys(tmp_path, "[stage1]\nweak_self_consistency = 5\nweak_min_confidence = 0.8\n")
    assert {n for n in keys if bar[n] != keys[n]} == set(keys) - {
        "00_data", "00_test", "01_weak_sft", "02_weak_labels", "02_weak_samples", "03_icl_labels", "18_full_weak_ft",
        "19_ceiling", "20_eval_weak_floor", "21_eval_full_weak_ft", "30_eval_ceiling", "31_eval_strong_icl"}


def test_weak_relabel_under_one_stage1_round_runs_the_round_1_weak_ft_labels_for_the_pairs(tmp_path):
    """docs/PAPER.md: weak_relabel takes the round-1 weak-ft model's labels (08_r2_labels_weak), "run also under one
    Stage I round"; the pairs read them. Round 2's other rows stay off."""
    _, stages = _keys(tmp_path, "[stage1]\nrounds = 1\nweak_self_consistency = 3\nweak_relabel = true\n")
    assert stages["08_r2_labels_weak"].reads == ["00_data", "05_r1_sft_weak"]
    assert not {"09_r2_labels_icl", "10_r2_filter", "11_r2_sft_weak"} & set(stages)
    assert stages["15_pairs"].reads == ["00_data", "02_weak_labels", "14_samples", "02_weak_samples",
                                        "08_r2_labels_weak"]
    assert stages["15_pairs"].args["relabel"] == "08_r2_labels_weak"


def test_stage2_start_from_trains_another_stage1_model_and_reruns_only_stage2(tmp_path):
    """[stage2] start_from = "icl": Stage II samples from, pairs with and trains the last Stage I round's icl-ft model
    instead of the hybrid-ft one; under one Stage I round, round 1's. Stage I and the baselines keep their keys."""
    base, _ = _keys(tmp_path)
    keys, stages = _keys(tmp_path, "[stage2]\nstart_from = \"icl\"\n")
    stage2 = {"14_samples", "15_pairs", "16_dpo", "17_orpo", "28_eval_stage2_dpo", "29_eval_stage2_orpo"}
    assert {n for n in base if keys[n] != base[n]} == stage2
    assert stages["14_samples"].reads == ["00_data", "12_r2_sft_icl"] and stages["14_samples"].args["model"] == \
        "12_r2_sft_icl"
    assert stages["16_dpo"].reads == ["15_pairs", "12_r2_sft_icl"] and stages["17_orpo"].args["init"] == "12_r2_sft_icl"
    _, stages = _keys(tmp_path, "[stage1]\nrounds = 1\n[stage2]\nstart_from = \"weak\"\n")
    assert stages["16_dpo"].args["init"] == "05_r1_sft_weak" and "11_r2_sft_weak" not in stages


def test_the_report_marks_the_model_stage2_starts_from(tmp_path):
    from w2s.report import method_labels

    acc = {m: 0.5 for m in ("stage1_r1_hybrid", "stage1_r2_icl", "stage1_r2_hybrid", "stage2_dpo")}
    assert [label for _, label in method_labels(acc) if "M_plus" in label] == ["Stage I r2: hybrid-ft (M_plus)"]
    assert [label for _, label in method_labels(acc, "stage1_r2_icl") if "M_plus" in label] == \
        ["Stage I r2: icl-ft (M_plus)"]
    del acc["stage1_r2_hybrid"]  # one Stage I round (MATH's recipe): round 1's model
    assert [label for _, label in method_labels(acc) if "M_plus" in label] == ["Stage I r1: hybrid-ft (M_plus)"]
    from w2s.report import report  # a run's report reads the option from the run's recipe.json

    for name, accuracy in (("26_eval_stage1_r2_icl", 0.5), ("27_eval_stage1_r2_hybrid", 0.4)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "meta.json").write_text(json.dumps({"stage": name, "accuracy": accuracy}))
    (tmp_path / "recipe.json").write_text(json.dumps({"stage2": {"start_from": "icl"}}))
    assert "| Stage I r2: icl-ft (M_plus) | 50.00      |" in report(tmp_path, plot=False)
    shutil.rmtree(tmp_path / "26_eval_stage1_r2_icl")  # round 2's model not evaluated yet: round 1's is not M_plus
    (tmp_path / "23_eval_stage1_r1_icl").mkdir()
    (tmp_path / "23_eval_stage1_r1_icl" / "meta.json").write_text(json.dumps({"stage": "x", "accuracy": 0.3}))
    text = report(tmp_path, plot=False)
    assert "| Stage I r1: icl-ft " in text and "M_plus" not in text


def test_rounds_add_fixed_rows_that_start_from_the_previous_round(tmp_path):
    base, _ = _keys(tmp_path)
    keys, stages = _keys(tmp_path, "[stage2]\nrounds = 3\n")
    assert {n: keys[n] for n in base} == base  # the paper's rows are untouched
    new = [n for n in keys if n not in base]
    assert new == ["37_round2_samples_dpo", "38_round2_pairs_dpo", "39_round2_dpo", "37_round3_samples_dpo",
                   "38_round3_pairs_dpo", "39_round3_dpo", "37_round2_samples_orpo", "38_round2_pairs_orpo",
                   "39_round2_orpo", "37_round3_samples_orpo", "38_round3_pairs_orpo", "39_round3_orpo",
                   "40_eval_stage2_dpo_round2", "40_eval_stage2_dpo_round3", "40_eval_stage2_orpo_round2",
                   "40_eval_stage2_orpo_round3"]
    assert stages["37_round2_samples_dpo"].reads == ["00_data", "16_dpo"]
    assert stages["38_round2_pairs_dpo"].reads == ["00_data", "02_weak_labels", "37_round2_samples_dpo"]
    assert stages["39_round2_dpo"].reads == ["38_round2_pairs_dpo", "16_dpo"]
    assert stages["39_round2_dpo"].args["init"] == "16_dpo"
    assert stages["37_round3_samples_dpo"].reads == ["00_data", "39_round2_dpo"]
    assert stages["39_round3_orpo"].args["init"] == "39_round2_orpo"


# ---------------------------------------------------------------------------------------------------- a pipeline run

RECIPE = """
name = "beyond"

[data]
task = "gsm8k"
train = "train.jsonl"
test = "test.jsonl"
grader = "equivalence"  # the habit models' samples keep a readable last number after preference training

[models]
weak = "weak"
strong = "strong"
dtype = "float32"
device = "cpu"

[sampling]
max_new_tokens = 8
sample_max_new_tokens = 8

[weak_sft]
lr = 1e-3
max_steps = 2
batch_size = 8
micro_batch_size = 8

[strong_sft]
lr = 1e-3
max_steps = 2
batch_size = 8
micro_batch_size = 8

[stage1]
rounds = 1
weak_self_consistency = 5
weak_relabel = true

[stage2]
n_samples = 5
losses = ["dpo"]
rounds = 2
pair_weighting = "margin"
self_consistency_pairs = true

[preference]
lr = 1e-3
max_steps = 2
batch_size = 4
micro_batch_size = 2
nll_weight = 1.0

[eval]
baselines = []
"""


@pytest.fixture(scope="module")
def beyond_run(world, tmp_path_factory):  # noqa: F811
    """One run with every option on; the gold reader hands out WRONG gold, so anything that used it would differ."""
    import w2s.runners as runners
    from w2s.pipeline import run_pipeline

    runs, readers, real = tmp_path_factory.mktemp("runs"), [], runners.read_train_2_gold

    def wrong_gold(ctx):
        readers.append(ctx.stage)
        return {i: {"answer": "123456", "solution": "#### 123456"} for i in real(ctx)}

    (world / "beyond.toml").write_text(RECIPE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runners, "read_train_2_gold", wrong_gold)
        run_dir, status, text = run_pipeline(world / "beyond.toml", runs_dir=runs, progress=False,
                                             log=lambda *a: None, plot=False)
    return {"run_dir": run_dir, "status": status, "report": text, "readers": readers}


def _jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def test_round_two_starts_from_round_one_and_its_reference_is_round_one(beyond_run):
    import w2s
    from w2s.data import encode_response
    from w2s.tokenizer import load_tokenizer

    run_dir = beyond_run["run_dir"]
    assert beyond_run["status"] and all(v == "ran" for v in beyond_run["status"].values())
    for name in ("02_weak_samples", "08_r2_labels_weak", "37_round2_samples_dpo", "38_round2_pairs_dpo",
                 "39_round2_dpo", "40_eval_stage2_dpo_round2"):
        assert name in beyond_run["status"]
    pairs = _jsonl(run_dir / "39_round2_dpo" / "train.jsonl")
    assert pairs and all("weight" in p for p in pairs)
    ref = torch.load(run_dir / "39_round2_dpo" / "model" / "ref_logps.pt", weights_only=True)["logps"]
    tok = load_tokenizer(run_dir / "16_dpo" / "model")

    def summed(model_dir):
        model = w2s.load_model(model_dir, dtype=torch.float32)
        out = []
        with torch.no_grad():
            for p in pairs:
                row = []
                for side in ("chosen", "rejected"):
                    ex = encode_response(tok, p["prompt"], p[side])
                    row.append(_response_logps(model, ex.tokens[:ex.n_prompt], ex.tokens[ex.n_prompt:]).sum().item())
                out.append(row)
        return torch.tensor(out, dtype=torch.float32)

    torch.testing.assert_close(ref, summed(run_dir / "16_dpo" / "model"), atol=1e-3, rtol=1e-4)
    assert (ref - summed(run_dir / "07_r1_sft_hybrid" / "model")).abs().max() > 1e-3  # not M_plus's
    assert "Stage II round 2: DPO" in beyond_run["report"]


def test_no_rounds_pairs_read_train_2_gold(beyond_run):
    """The run's gold reader handed out wrong gold; recomputing every pairs stage with the true gold gives the same
    pairs, so gold reached the precision analysis only. And only the filter and the pairs stages read it."""
    import w2s.runners as runners
    from w2s.engine import Context
    from w2s.recipe import load_recipe

    run_dir = beyond_run["run_dir"]
    assert set(beyond_run["readers"]) == {"04_r1_filter", "15_pairs", "38_round2_pairs_dpo"}
    ctx = Context(load_recipe(json.loads((run_dir / "recipe.json").read_text())["path"]), run_dir)
    for stage, samples in (("15_pairs", "14_samples"), ("38_round2_pairs_dpo", "37_round2_samples_dpo")):
        out = run_dir.parent / f"again_{stage}"
        out.mkdir()
        meta = runners.run_pairs(ctx, out, samples, weak_samples="02_weak_samples", relabel="08_r2_labels_weak")
        assert (out / "pairs.jsonl").read_text() == (run_dir / stage / "pairs.jsonl").read_text()
        assert "n_weak_dropped" in meta["counts"]  # the weak filter's count reached the pairs' meta
        assert meta["pair_precision"] is not None or not meta["n_pairs"]
    filt = json.loads((run_dir / "04_r1_filter" / "meta.json").read_text())
    assert filt["n_kept"] <= filt["n_consistent_before_weak_filter"] and "n_weak_confident" in filt
