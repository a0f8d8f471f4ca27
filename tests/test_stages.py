"""Stage logic on synthetic records: consistency filter, SFT sets, majority vote, the pair rules of docs/PAPER.md Stage
II step 3 (every branch, both thresholds, the at-most-k rule, seeding), and the metrics (pass@k against brute-force
combinatorics, PGR by hand).

    python -m pytest -q tests/test_stages.py
"""

import itertools
import math

import pytest

from w2s.stages.consistency import consistent, precision, sft_sets
from w2s.stages.metrics import (
    accuracy,
    accuracy_by_level,
    answer_matcher,
    exact_match,
    majority_vote,
    mean_pass_at_k,
    pair_precision,
    pass_at_k,
    pgr,
)
from w2s.stages.preference_pairs import build_pairs, group_samples


def labelled(qid, answer, response=None):
    return {
        "id": qid,
        "question": f"question {qid}?",
        "response": response or f"weak on {qid}: {answer}",
        "answer": answer,
    }


def sampled(qid, answers):
    """n samples for one question; response texts are distinct unless answers repeat at the same index."""
    return [{"id": qid, "response": f"sample {j} on {qid}: {a}", "answer": a} for j, a in enumerate(answers)]


def numeric_equal(a, b):
    """A stand-in for the MATH matcher: answers are equal as numbers (so "2", "2.0", "2.00" form one class)."""
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


# ----------------------------------------------------------------------------------------------------------------
# Stage I: consistency and SFT sets
# ----------------------------------------------------------------------------------------------------------------


def test_consistent_keeps_only_equal_non_empty_answers_in_weak_order():
    weak = [labelled("a", "5"), labelled("b", ""), labelled("c", "7"), labelled("d", "8"), labelled("e", "")]
    icl = [labelled("e", "3"), labelled("d", "9"), labelled("c", "7"), labelled("b", ""), labelled("a", "5")]
    assert consistent(weak, icl) == ["a", "c"]


def test_empty_answers_never_match_even_with_a_lax_comparison():
    weak = [labelled("a", ""), labelled("b", "1"), labelled("c", "")]
    other = [labelled("a", ""), labelled("b", "2"), labelled("c", "4")]
    assert consistent(weak, other, same_answer=lambda a, b: True) == ["b"]
    assert not exact_match("", "")


def test_consistent_uses_math_equivalence_when_given():
    weak = [labelled("a", "\\frac{1}{2}"), labelled("b", "3")]
    icl = [labelled("a", "0.5"), labelled("b", "4")]
    assert consistent(weak, icl) == []
    assert consistent(weak, icl, same_answer=answer_matcher("math")) == []  # the default grader: the paper's
    assert consistent(weak, icl, same_answer=answer_matcher("math", "equivalence")) == ["a"]


def test_a_comparison_per_question_reaches_every_stage_function():
    """same_for(id) binds a comparison per question (a judge that reads the question's answer type): the filter,
    the vote and pairs, accuracy, pass@k and pair precision all use the one for the question at hand."""
    loose = {"a"}  # question "a" compares numbers; every other question compares strings
    same_for = lambda qid: numeric_equal if qid in loose else exact_match  # noqa: E731
    weak = [labelled("a", "2"), labelled("b", "2")]
    other = [labelled("a", "2.0"), labelled("b", "2.0")]
    assert consistent(weak, other, same_for=same_for) == ["a"]
    assert precision(weak, {"a": "2.00", "b": "2.00"}, same_for=same_for) == 0.5
    assert accuracy(other, {"a": "2", "b": "2"}, same_for=same_for) == 0.5
    samples = {"a": [{"answer": "2.0"}, {"answer": "3"}], "b": [{"answer": "2.0"}, {"answer": "3"}]}
    assert mean_pass_at_k(samples, {"a": "2", "b": "2"}, k=1, same_for=same_for) == pytest.approx(0.25)
    votes = {q: sampled(q, ["2.0", "2", "2.00", "2", "9"]) for q in ("a", "b")}
    pairs, counts = build_pairs(weak, votes, seed=0, same_for=same_for)
    assert [p["confidence"] for p in pairs] == [0.8]  # "a": one class of 4 numbers; "b": "2" has 2 of 5
    assert counts["skipped_low_confidence"] == 1
    assert pair_precision(pairs, {"a": "2.0"}, same_for=same_for) == 1.0


def test_consistent_rejects_mismatched_or_duplicated_ids_and_missing_answers():
    with pytest.raises(ValueError, match=r"same questions: 1 ids only in weak_records.*'b'.*1 only in other_records"):
        consistent([labelled("a", "1"), labelled("b", "2")], [labelled("a", "1"), labelled("z", "2")])
    with pytest.raises(ValueError, match=r"weak_records\[1\]: duplicate id 'a'"):
        consistent([labelled("a", "1"), labelled("a", "2")], [labelled("a", "1")])
    bad = {"id": "a", "question": "q", "response": "r"}
    with pytest.raises(ValueError, match=r"other_records\[0\]: missing key 'answer'"):
        consistent([labelled("a", "1")], [bad])


def test_sft_sets_weak_icl_and_hybrid_with_two_rows_per_kept_question():
    weak = [labelled(q, "1", f"weak says {q}") for q in "abc"]
    icl = [labelled(q, "1", f"icl says {q}") for q in "cba"]
    sets = sft_sets(weak, icl, kept=["c", "a"])
    prompt = {q: f"Question: question {q}?\nAnswer:" for q in "abc"}
    assert sets["weak"] == [
        {"id": "c", "prompt": prompt["c"], "response": "weak says c"},
        {"id": "a", "prompt": prompt["a"], "response": "weak says a"},
    ]
    assert [r["response"] for r in sets["icl"]] == ["icl says c", "icl says a"]
    assert sets["hybrid"] == [sets["weak"][0], sets["icl"][0], sets["weak"][1], sets["icl"][1]]
    with pytest.raises(ValueError, match="not in both"):
        sft_sets(weak, icl, kept=["a", "zzz"])
    with pytest.raises(ValueError, match="unique"):
        sft_sets(weak, icl, kept=["a", "a"])


def test_selection_precision_against_gold():
    kept = [labelled("a", "5"), labelled("b", "6"), labelled("c", "7")]
    gold = {"a": "5", "b": "60", "c": "7", "d": "1"}
    assert precision(kept, gold) == pytest.approx(2 / 3)
    assert precision([], gold) is None


# ----------------------------------------------------------------------------------------------------------------
# Stage II: majority vote
# ----------------------------------------------------------------------------------------------------------------


def test_majority_vote_counts_over_all_samples_including_empty_ones():
    assert majority_vote(["4"] * 6 + [""] * 4) == ("4", 0.6)
    assert majority_vote(["3", "4", "4", "", "4"]) == ("4", 0.6)
    # Empty answers count in the denominator but never win, even when they are the most frequent.
    assert majority_vote([""] * 6 + ["4"] * 4) == ("4", 0.4)


def test_majority_vote_all_empty_and_no_answers():
    assert majority_vote(["", "", ""]) == ("", 0.0)
    with pytest.raises(ValueError):
        majority_vote([])


def test_majority_vote_ties_go_to_the_answer_seen_first():
    assert majority_vote(["3", "5", "5", "3"]) == ("3", 0.5)
    assert majority_vote(["5", "3", "3", "5"]) == ("5", 0.5)
    assert majority_vote(["", "9", "1", "1", "9"]) == ("9", 0.4)


def test_majority_vote_groups_equivalent_answers():
    answers = ["2.0", "3", "2", "3", "2.00", "3", "2"]
    assert majority_vote(answers) == ("3", 3 / 7)  # exact strings: "3" wins 3 to 2
    assert majority_vote(answers, same_answer=numeric_equal) == ("2.0", 4 / 7)  # one class of 4, first member wins


# ----------------------------------------------------------------------------------------------------------------
# Stage II: preference pairs
# ----------------------------------------------------------------------------------------------------------------


def pairs_for(weak, samples, **kwargs):
    kwargs.setdefault("seed", 0)
    return build_pairs([weak], {weak["id"]: samples}, **kwargs)


def test_weak_majority_is_chosen_at_confidence_exactly_0_6():
    weak = labelled("q", "7")
    samples = sampled("q", ["7"] * 6 + ["1", "2", "3", ""])
    pairs, counts = pairs_for(weak, samples)
    assert len(pairs) == 1 and counts["weak_chosen"] == 1 and counts["pairs"] == 1
    (pair,) = pairs
    assert pair["kind"] == "weak_chosen" and pair["confidence"] == pytest.approx(0.6)
    assert pair["chosen"] == weak["response"] and pair["chosen_answer"] == "7"
    wrong = {s["response"]: s["answer"] for s in samples if s["answer"] != "7"}
    assert pair["rejected"] in wrong and pair["rejected_answer"] == wrong[pair["rejected"]]
    assert pair["prompt"] == "Question: question q?\nAnswer:" and pair["id"] == "q"


def test_empty_sample_answer_counts_as_differing():
    weak = labelled("q", "7")
    pairs, _ = pairs_for(weak, sampled("q", ["7"] * 9 + [""]))
    assert [(p["rejected_answer"], p["kind"]) for p in pairs] == [("", "weak_chosen")]


def test_confidence_below_0_6_is_skipped():
    weak = labelled("q", "7")
    just_below = ["7"] * 59 + [str(100 + j) for j in range(41)]  # 0.59 with 100 samples
    pairs, counts = pairs_for(weak, sampled("q", just_below))
    assert pairs == [] and counts["skipped_low_confidence"] == 1
    pairs, counts = pairs_for(weak, sampled("q", ["7"] * 5 + ["1"] * 5))
    assert pairs == [] and counts["skipped_low_confidence"] == 1
    # The same rule holds when the weak answer is not the majority.
    pairs, counts = pairs_for(labelled("q", "1"), sampled("q", just_below))
    assert pairs == [] and counts["skipped_low_confidence"] == 1


def test_no_majority_answer_is_skipped():
    pairs, counts = pairs_for(labelled("q", "7"), sampled("q", [""] * 10))
    assert pairs == [] and counts["skipped_no_answer"] == 1


def test_weak_minority_is_rejected_at_confidence_exactly_0_8():
    weak = labelled("q", "9")
    samples = sampled("q", ["7"] * 8 + ["9", "9"])
    pairs, counts = pairs_for(weak, samples)
    assert counts["weak_rejected"] == 1 and len(pairs) == 1
    (pair,) = pairs
    assert pair["kind"] == "weak_rejected" and pair["rejected"] == weak["response"]
    assert pair["chosen"] in {s["response"] for s in samples if s["answer"] == "7"} and pair["chosen_answer"] == "7"
    assert pair["confidence"] == pytest.approx(0.8)


def test_weak_minority_below_0_8_does_not_flip():
    weak = labelled("q", "9")
    pairs, counts = pairs_for(weak, sampled("q", ["7"] * 7 + ["9"] * 3))
    assert pairs == [] and counts["skipped_below_flip"] == 1
    pairs, counts = pairs_for(weak, sampled("q", ["7"] * 79 + ["9"] * 21))  # 0.79
    assert pairs == [] and counts["skipped_below_flip"] == 1


def test_weak_without_answer_is_rejected_when_the_vote_is_sure():
    weak = labelled("q", "", "I do not know")
    pairs, _ = pairs_for(weak, sampled("q", ["7"] * 9 + ["3"]))
    assert [(p["kind"], p["rejected"], p["chosen_answer"]) for p in pairs] == [("weak_rejected", "I do not know", "7")]


def test_no_differing_sample_is_skipped():
    pairs, counts = pairs_for(labelled("q", "7"), sampled("q", ["7"] * 10))
    assert pairs == [] and counts["skipped_no_differing_sample"] == 1


def test_at_most_k_pairs_with_distinct_other_sides():
    weak = labelled("q", "7")
    # Four wrong samples but only three distinct texts: "dup" twice.
    samples = sampled("q", ["7"] * 6) + [
        {"id": "q", "response": "dup", "answer": "1"},
        {"id": "q", "response": "dup", "answer": "1"},
        {"id": "q", "response": "other a", "answer": "2"},
        {"id": "q", "response": "other b", "answer": "3"},
    ]
    pairs, counts = pairs_for(weak, samples, max_pairs_per_question=3)
    assert sorted(p["rejected"] for p in pairs) == ["dup", "other a", "other b"]
    assert all(p["chosen"] == weak["response"] for p in pairs) and counts["weak_chosen"] == 3
    pairs, _ = pairs_for(weak, samples, max_pairs_per_question=10)
    assert len(pairs) == 3  # never more than the distinct candidates
    pairs, _ = pairs_for(weak, samples, max_pairs_per_question=1)
    assert len(pairs) == 1
    # Flipped questions: up to 3 distinct chosen responses, all with the majority answer.
    flip_samples = sampled("q", ["5"] * 9 + ["7"])
    pairs, counts = pairs_for(weak, flip_samples, max_pairs_per_question=3)
    assert len(pairs) == 3 == counts["weak_rejected"] and len({p["chosen"] for p in pairs}) == 3
    assert all(p["rejected"] == weak["response"] and p["chosen_answer"] == "5" for p in pairs)


def test_other_side_never_repeats_the_weak_text():
    weak = labelled("q", "9", "same text")
    samples = [{"id": "q", "response": "same text", "answer": "7"} for _ in range(10)]
    pairs, counts = pairs_for(weak, samples)
    assert pairs == [] and counts["skipped_no_other_side"] == 1


def synthetic_batch(n_questions=40, n_samples=10, seed=123):
    """A mixed batch that reaches every branch: random majority sizes, weak right or wrong, empty answers."""
    import random

    rng = random.Random(seed)
    weak_records, samples = [], {}
    for q in range(n_questions):
        qid = f"q{q:03d}"
        majority = rng.randint(4, n_samples)
        answers = ["42"] * majority + [rng.choice(["", "1", "2", "3"]) for _ in range(n_samples - majority)]
        rng.shuffle(answers)
        weak_records.append(labelled(qid, rng.choice(["42", "42", "1", ""])))
        samples[qid] = sampled(qid, answers)
    return weak_records, samples


def test_weak_response_is_always_exactly_one_side_and_counts_add_up():
    weak_records, samples = synthetic_batch()
    pairs, counts = build_pairs(weak_records, samples, seed=1, max_pairs_per_question=3)
    weak = {r["id"]: r for r in weak_records}
    assert pairs
    for p in pairs:
        w = weak[p["id"]]["response"]
        assert (p["chosen"] == w) != (p["rejected"] == w)
        assert p["kind"] == ("weak_chosen" if p["chosen"] == w else "weak_rejected")
        assert p["chosen_answer"] != p["rejected_answer"]
    skipped = sum(v for k, v in counts.items() if k.startswith("skipped_"))
    assert counts["questions"] == len(weak_records) == skipped + counts["questions_with_pairs"]
    assert counts["pairs"] == len(pairs) == counts["weak_chosen"] + counts["weak_rejected"]


def test_pairs_are_seeded_and_independent_of_order_and_of_other_questions():
    weak_records, samples = synthetic_batch()
    first, _ = build_pairs(weak_records, samples, seed=7, max_pairs_per_question=2)
    again, _ = build_pairs(weak_records, samples, seed=7, max_pairs_per_question=2)
    assert first == again
    # Reversed question order (and reversed dict order) gives the same pairs for every question.
    reversed_pairs, _ = build_pairs(
        weak_records[::-1], dict(reversed(samples.items())), seed=7, max_pairs_per_question=2
    )

    def by_id(pairs):
        return {qid: [p for p in pairs if p["id"] == qid] for qid in samples}

    assert by_id(reversed_pairs) == by_id(first)
    # One question alone gives the pairs it gets in the batch.
    qid = first[0]["id"]
    alone, _ = build_pairs(
        [r for r in weak_records if r["id"] == qid], {qid: samples[qid]}, seed=7, max_pairs_per_question=2
    )
    assert alone == by_id(first)[qid]
    # A different seed draws different other sides somewhere in the batch (the rules themselves do not change).
    other_seed, _ = build_pairs(weak_records, samples, seed=8, max_pairs_per_question=2)
    assert other_seed != first
    assert [(p["id"], p["kind"]) for p in other_seed] == [(p["id"], p["kind"]) for p in first]


def test_pairs_use_equivalence_classes_of_the_matcher():
    weak = labelled("q", "2")
    samples = sampled("q", ["2.0", "2", "2.00", "2", "2.0", "2", "5", "5", "5", "5"])
    pairs, _ = pairs_for(weak, samples)
    assert pairs == []  # exact strings: "2" has 0.3 < 0.6, skipped
    pairs, _ = pairs_for(weak, samples, same_answer=numeric_equal)
    assert [(p["kind"], p["rejected_answer"]) for p in pairs] == [("weak_chosen", "5")]


def test_group_samples_and_bad_inputs():
    flat = sampled("a", ["1", "2"]) + sampled("b", ["3"]) + sampled("a", ["4"])
    grouped = group_samples(flat)
    assert [s["answer"] for s in grouped["a"]] == ["1", "2", "4"] and len(grouped["b"]) == 1
    with pytest.raises(ValueError, match=r"samples\[0\]: missing key 'answer'"):
        group_samples([{"id": "a", "response": "r"}])
    with pytest.raises(ValueError, match="same questions"):
        build_pairs([labelled("a", "1")], {"b": sampled("b", ["1"])}, seed=0)
    with pytest.raises(ValueError, match="max_pairs_per_question"):
        build_pairs([labelled("a", "1")], {"a": sampled("a", ["1"])}, seed=0, max_pairs_per_question=0)


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------


def brute_force_pass_at_k(n, c, k):
    """Fraction of the k-subsets of n samples (the first c correct) that contain a correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_brute_force_combinatorics():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 2) == pytest.approx(1 - math.comb(7, 2) / math.comb(10, 2))
    with pytest.raises(ValueError):
        pass_at_k(10, 11, 1)
    with pytest.raises(ValueError):
        pass_at_k(10, 1, 11)


def test_mean_pass_at_k_over_questions():
    samples = {"a": sampled("a", ["1", "2", "", "1"]), "b": sampled("b", ["5", "6", "7", "8"])}
    gold = [{"id": "a", "answer": "1"}, {"id": "b", "answer": "9"}]
    # a: n=4, c=2 -> pass@2 = 1 - C(2,2)/C(4,2) = 5/6; b: c=0 -> 0.
    assert mean_pass_at_k(samples, gold, k=2) == pytest.approx((5 / 6 + 0) / 2)
    assert mean_pass_at_k(samples, gold, k=1) == pytest.approx((2 / 4 + 0) / 2)


def test_accuracy_empty_answers_are_wrong_and_missing_gold_is_an_error():
    records = [
        {"id": "a", "answer": "1"},
        {"id": "b", "answer": ""},
        {"id": "c", "answer": "3"},
        {"id": "d", "answer": "4"},
    ]
    gold = {"a": "1", "b": "", "c": "3", "d": "5"}
    assert accuracy(records, gold) == 0.5
    with pytest.raises(ValueError, match="'zz' has no gold answer"):
        accuracy([{"id": "zz", "answer": "1"}], gold)
    with pytest.raises(ValueError):
        accuracy([], gold)


def test_accuracy_by_level():
    records = [{"id": i, "answer": a} for i, a in [("a", "1"), ("b", "2"), ("c", "3"), ("d", "x"), ("e", "5")]]
    gold = {"a": "1", "b": "2", "c": "0", "d": "4", "e": "5"}
    levels = {"a": 5, "b": 1, "c": 5, "d": None, "e": 5}
    assert accuracy_by_level(records, gold, levels) == {
        1: {"accuracy": 1.0, "n": 1},
        5: {"accuracy": pytest.approx(2 / 3), "n": 3},
        None: {"accuracy": 0.0, "n": 1},
    }
    assert list(accuracy_by_level(records, gold, levels)) == [1, 5, None]


def test_pgr_by_hand():
    # Paper-scale numbers: weak floor 25.17, a method at 56.03, a ceiling at 70.00 -> 30.86 / 44.83.
    assert pgr(56.03, 25.17, 70.00) == pytest.approx(30.86 / 44.83)
    assert pgr(0.5, 0.25, 0.75) == pytest.approx(0.5)
    assert pgr(0.75, 0.25, 0.75) == pytest.approx(1.0)
    assert pgr(0.20, 0.25, 0.75) == pytest.approx(-0.1)
    assert pgr(0.9, 0.8, 0.9) == pytest.approx(1.0)
    assert pgr(0.5, 0.3, 0.3) is None  # zero gap: undefined, not 0 or inf


def test_pair_precision_counts_chosen_answers_against_gold():
    pairs = [
        {"id": "a", "kind": "weak_chosen", "chosen_answer": "1"},
        {"id": "a", "kind": "weak_chosen", "chosen_answer": "1"},
        {"id": "b", "kind": "weak_rejected", "chosen_answer": "2"},
        {"id": "c", "kind": "weak_rejected", "chosen_answer": "9"},
    ]
    gold = {"a": "1", "b": "2", "c": "3"}
    assert pair_precision(pairs, gold) == pytest.approx(3 / 4)
    assert pair_precision(pairs, gold, kind="weak_rejected") == pytest.approx(1 / 2)
    assert pair_precision([], gold) is None


def test_evaluation_result_greedy_levels_and_pass_at_k():
    from w2s.stages.metrics import evaluation_result

    test = [{"id": "a", "answer": "\\frac{1}{2}", "level": 1}, {"id": "b", "answer": "3", "level": 5},
            {"id": "c", "answer": "7", "level": 5}]
    greedy = [{"id": "a", "response": "so The answer is: 0.5"}, {"id": "b", "response": "The answer is: 3"},
              {"id": "c", "response": "no idea"}]
    result = evaluation_result(greedy, test, "math", grader="equivalence")  # 0.5 == 1/2 by sympy; no answer: wrong
    assert (result["grader"], result["accuracy"], result["n_correct"]) == ("equivalence", pytest.approx(2 / 3), 2)
    assert result["accuracy_by_level"] == {"1": 1.0, "5": 0.5}
    assert result["accuracy_by_grader"]["paper"] == pytest.approx(1 / 3)  # the paper compares strings: 0.5 != 1/2
    assert result["accuracy_by_level_by_grader"]["paper"] == {"1": 0.0, "5": 0.5}
    assert result["grader_disagreements"]["equivalence/paper"] == 1
    assert result["no_answer_by_grader"]["paper"] == result["no_answer_by_grader"]["equivalence"] == 1
    assert evaluation_result(greedy, test, "math")["grader"] == "paper"  # the default
    assert "accuracy_by_level" not in evaluation_result(greedy[1:], test, "gsm8k")
    sampled = [{"id": "a", "samples": [{"response": "The answer is: 1/2"}, {"response": "The answer is: 2"},
                                       {"response": "hm"}]},
               {"id": "b", "samples": [{"response": "The answer is: 4"}] * 3}]
    # a: 1 of 3 correct under equivalence (1/2 == \frac{1}{2} by sympy) -> pass@1 = 1/3, pass@3 = 1; b: none correct.
    result = evaluation_result(sampled, test, "math", grader="equivalence")
    assert (result["pass@1"], result["pass@3"]) == (pytest.approx(1 / 6), pytest.approx(0.5))
    assert result["pass_by_grader"]["paper"] == {"pass@1": 0.0, "pass@3": 0.0, "maj@3": 0.0}
    assert result["maj@3"] == pytest.approx(0.5)  # a: 1/2 and 2 tie, the first wins; b: 4 is wrong
    assert result["grader_disagreements"]["equivalence/paper"] == 1


def test_gsm8k_grading_normalizes_the_gold_too():
    """Both prediction and gold are normalized (the authors' rule). 14 GSM8K test golds carry thousands separators
    ("2,125"); under the paper's normalizer "5.0" is "5" but "4.20" is not "4.2"."""
    from w2s.stages.metrics import evaluation_result
    from w2s.tasks import get_grader

    paper = get_grader("gsm8k", "paper")
    assert paper.same(paper.answer("#### 2125"), paper.gold("2,125")) and paper.gold("2,125") == "2125"
    assert paper.same(paper.answer("#### 5.0"), paper.gold("5"))
    assert not paper.same(paper.answer("#### 2125"), paper.gold("2,126")) and not paper.same("", "")
    result = evaluation_result([{"id": "a", "response": "#### 2125"}, {"id": "b", "response": "#### 7"}],
                               [{"id": "a", "answer": "2,125"}, {"id": "b", "answer": "8"}], "gsm8k")
    assert (result["accuracy"], result["n_correct"]) == (0.5, 1)
    assert set(result["accuracy_by_grader"].values()) == {0.5}


def test_other_side_never_shares_the_weak_answer_under_a_non_transitive_matcher():
    """"x" equals the weak answer "w" but not a+ "p" (w ~ p): it must not be rejected against the weak response."""
    links = ({"w", "p"}, {"w", "x"})
    lax = lambda a, b: a == b or {a, b} in links  # noqa: E731
    pairs, counts = pairs_for(labelled("q", "w"), sampled("q", ["p"] * 7 + ["x"] * 3), same_answer=lax)
    assert pairs == [] and counts["skipped_no_differing_sample"] == 1
    pairs, counts = pairs_for(labelled("q", "w"), sampled("q", ["p"] * 7 + ["y"] * 3), same_answer=lax)
    assert [(p["kind"], p["rejected_answer"]) for p in pairs] == [("weak_chosen", "y")]
    # Flip side: "v" is in a+'s class ("w") but also equals the weak "x" (x !~ w): it is never the chosen side.
    flip = lambda a, b: a == b or {a, b} in ({"w", "v"}, {"x", "v"})  # noqa: E731
    pairs, counts = pairs_for(labelled("q", "x"), sampled("q", ["w"] * 8 + ["v"] * 2), same_answer=flip,
                              max_pairs_per_question=10)
    assert counts["weak_rejected"] == 8 and {p["chosen_answer"] for p in pairs} == {"w"}


# ------------------------------------------------- rules a mutation audit found no test for (each fails if changed)


def _weak(answer, truncated=False):
    return {"id": "q", "question": "Q?", "response": "weak text", "answer": answer, "truncated": truncated}


def _samples(answers, truncated=False):
    return [{"response": f"r{i} {a}", "answer": a, "truncated": truncated} for i, a in enumerate(answers)]


def test_sft_rows_keep_the_truncated_flag_and_self_consistency_uses_the_questions_own_matcher():
    from w2s.stages.consistency import self_consistent

    assert sft_sets([_weak("5", True)], [{**_weak("5"), "response": "icl"}], ["q"])["weak"][0]["truncated"] is True
    halves = lambda qid: lambda a, b: {a, b} <= {"0.5", "1/2"}  # noqa: E731 (per-question matcher: 0.5 == 1/2)
    assert self_consistent({"q": [{"answer": "0.5"}, {"answer": "1/2"}]}, 1.0, same_for=halves) == {"q": 1.0}


def test_pair_sides_follow_docs_paper_md_under_a_matcher_that_is_not_transitive():
    # w ~ a and s ~ a but s !~ w: the rejected side must not be a+ (PAPER.md), so s (which matches a+) is no rejected
    loose = lambda a, b: a == b or {a, b} in ({"w", "a"}, {"s", "a"})  # noqa: E731
    pairs, counts = build_pairs([_weak("w")], {"q": _samples(["a"] * 7 + ["s"] * 3)}, seed=0, same_answer=loose)
    assert pairs == [] and counts["skipped_no_differing_sample"] == 1


def test_self_consistency_pairs_break_ties_to_the_first_class_and_weigh_only_under_margin():
    pairs, _ = build_pairs([_weak("b")], {"q": _samples(["a"] * 7 + ["b", "c", "d"])}, seed=0,
                           self_consistency_pairs=True)
    assert [(p["chosen_answer"], p["rejected_answer"]) for p in pairs] == [("a", "b")]  # b, c, d tie: b came first
    assert not any("weight" in p for p in pairs)  # pair_weighting "none": the trainer must not weigh them


def test_a_pair_records_each_sides_own_truncation():
    pairs, _ = build_pairs([_weak("a")], {"q": _samples(["a"] * 6 + ["b"] * 4, truncated=True)}, seed=0)
    assert [(p["chosen_truncated"], p["rejected_truncated"]) for p in pairs] == [(False, True)]


def test_an_empty_answer_never_agrees_and_maj_at_k_votes():
    from w2s.stages.metrics import answers_agree, majority_accuracy

    anything = lambda a, b: True  # noqa: E731 (a matcher that agrees with everything still never matches "")
    assert answers_agree("5", "", anything) is False and majority_vote(["5", ""], anything) == ("5", 0.5)
    assert majority_accuracy({"q": [{"answer": "1"}, {"answer": "2"}, {"answer": "2"}]}, {"q": "2"}) == 1.0
    assert pgr(0.5, 0.6, 0.4) == pytest.approx(0.5)  # (0.5 - 0.6) / (0.4 - 0.6): a negative gap is still a ratio


def test_evaluation_grades_the_kept_text_with_the_headline_grader_over_uneven_samples():
    from w2s.stages.metrics import evaluation_result

    gold = [{"id": "a", "answer": "72"}]
    # a kept response was stripped of "." once already (PAPER.md): "#### 72. " reads "72." and is wrong
    assert evaluation_result([{"id": "a", "response": "#### 72. "}], gold, "gsm8k")["accuracy_by_grader"]["paper"] == 0
    sampled = evaluation_result([{"id": "a", "samples": [{"response": "#### 72. "}, {"response": "#### 72"}]}], gold,
                                "gsm8k")
    assert (sampled["pass@1"], sampled["maj@2"]) == (0.5, 0.0)  # one right of two; the tie goes to the first
    paper = evaluation_result([{"id": "a", "response": "#### 4.20"}], [{"id": "a", "answer": "4.2"}], "gsm8k",
                              grader="paper", per_question=True)
    assert paper["accuracy"] == 0.0 and paper["accuracy_by_grader"]["equivalence"] == 1.0  # paper keeps the 0
    assert paper["per_question"][0]["correct"] is False
    uneven = evaluation_result([{"id": "a", "samples": [{"response": "#### 1"}] * 3},
                                {"id": "b", "samples": [{"response": "#### 2"}] * 2}],
                               [{"id": "a", "answer": "1"}, {"id": "b", "answer": "2"}], "gsm8k")
    assert sorted(k for k in uneven if k.startswith(("pass@", "maj@"))) == ["maj@2", "pass@1", "pass@2"]
