"""Evaluation metrics: accuracy, pass@k, MATH accuracy by level, PGR, and the precision of filtered data and pairs.

How two answers are compared is a grader's business (w2s/tasks/graders.py: `paper`, the authors' protocol and the
default; `equivalence`; `math-verify`). The functions here take the comparison as arguments:

    same_answer(a, b) -> bool     one comparison for every question (default: exact_match)
    same_for(qid) -> same_answer  a comparison per question, when it depends on the question (a judge that reads the
                                  question's answer type); given, it wins over same_answer
    answer_matcher(task, grader)  a grader's `same`, as a same_answer

    accuracy(records, gold)                     fraction of {"id", "answer"} records equal to gold[id]
    pass_at_k(n, c, k)                          unbiased pass@k from n samples of which c are correct
    mean_pass_at_k(samples_by_id, gold, k)      pass@k averaged over questions (mean_pass_at_k_of_verdicts: graded)
    vote_counts(answers), majority_vote(answers)  answer classes and their votes; the most voted non-empty answer
    majority_of(classes)                        majority_vote from classes already counted
    majority_accuracy(samples_by_id, gold)      maj@k: the fraction of questions whose majority answer is correct
    accuracy_by_level(records, gold, levels)    MATH: {level: {"accuracy", "n"}}
    pgr(acc, weak_floor, ceiling)               (acc - floor) / (ceiling - floor); None when ceiling == floor
    pair_precision(pairs, gold)                 analysis only: fraction of pairs whose chosen answer is correct
    evaluation_result(rows, test, task)         what an evaluation reports, under every available grader

`gold` is {id: gold answer} or a list of gold records {"id", "answer"}, answers already normalized by the grader
that compares them. Empty inputs where a metric is undefined give None (JSON null in meta.json).

Test: python -m pytest -q tests/test_stages.py
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Callable, Hashable

from w2s.tasks.graders import available_graders, default_grader, get_grader, per_question
from w2s.tasks.grading import BOUNDED

SameAnswer = Callable[[str, str], bool]
SameFor = Callable[[Hashable], SameAnswer]


def exact_match(a: str, b: str) -> bool:
    """Equal normalized strings (the `paper` grader's comparison). An empty answer ("no answer found") never
    matches."""
    return a != "" and a == b


def answer_matcher(task: str, grader: str | None = None) -> SameAnswer:
    """The comparison of a task's grader (w2s/tasks/graders.py; None: the task's default, `paper` for GSM8K and
    MATH) as a same_answer(a, b) on normalized answers. A question-dependent judge needs same_for instead."""
    return get_grader(task, grader).same


def answers_agree(a: str, b: str, same_answer: SameAnswer = exact_match) -> bool:
    """Both answers present and equal. The emptiness check is ours, so a lax `same_answer` cannot match "" with ""."""
    return a != "" and b != "" and bool(same_answer(a, b))


def comparator(same_answer: SameAnswer, same_for: SameFor | None, qid) -> SameAnswer:
    """The comparison for one question: same_for(qid) when given, else the one same_answer."""
    return same_for(qid) if same_for is not None else same_answer


def gold_answers(gold) -> dict:
    """{id: gold answer} from such a dict or from a list of gold records {"id", "answer"}."""
    if isinstance(gold, dict):
        return gold
    answers = {}
    for i, record in enumerate(gold):
        if "id" not in record or "answer" not in record:
            raise ValueError(f"gold[{i}]: expected keys 'id' and 'answer', got {sorted(record)}")
        answers[record["id"]] = record["answer"]
    return answers


def _correct(record: dict, gold: dict, same: SameAnswer, where: str) -> bool:
    for key in ("id", "answer"):
        if key not in record:
            raise ValueError(f"{where}: missing key {key!r}")
    if record["id"] not in gold:
        raise ValueError(f"{where}: id {record['id']!r} has no gold answer")
    return answers_agree(record["answer"], gold[record["id"]], same)


def verdicts(records: list[dict], gold, same_answer: SameAnswer = exact_match, same_for: SameFor | None = None) -> list:
    """Per record {"id", "answer"}: whether its answer equals the gold answer of its id (empty answers are wrong)."""
    gold = gold_answers(gold)
    return [_correct(r, gold, comparator(same_answer, same_for, r.get("id")), f"records[{i}]")
            for i, r in enumerate(records)]


def accuracy(records: list[dict], gold, same_answer: SameAnswer = exact_match,
             same_for: SameFor | None = None) -> float:
    """Fraction of records {"id", "answer"} whose answer equals the gold answer of their id. Empty answers are wrong."""
    if not records:
        raise ValueError("accuracy of an empty list of records is undefined")
    return sum(verdicts(records, gold, same_answer, same_for)) / len(records)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), the chance that k of the n samples drawn without
    replacement include a correct one. Computed as a product, so it never forms huge binomials."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i)
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def sample_verdicts(samples_by_id: dict, gold, same_answer: SameAnswer = exact_match,
                    same_for: SameFor | None = None) -> dict:
    """{id: [whether each sample {"answer", ...} equals the gold answer of the id]}."""
    gold = gold_answers(gold)
    out = {}
    for qid, samples in samples_by_id.items():
        if qid not in gold:
            raise ValueError(f"samples id {qid!r} has no gold answer")
        same = comparator(same_answer, same_for, qid)
        out[qid] = [answers_agree(s["answer"], gold[qid], same) for s in samples]
    return out


def mean_pass_at_k(samples_by_id: dict, gold, k: int, same_answer: SameAnswer = exact_match,
                   same_for: SameFor | None = None) -> float:
    """pass@k averaged over questions; samples_by_id = {id: [sample records {"answer", ...}]} (n per question)."""
    if not samples_by_id:
        raise ValueError("pass@k of no questions is undefined")
    return mean_pass_at_k_of_verdicts(sample_verdicts(samples_by_id, gold, same_answer, same_for), k)


def mean_pass_at_k_of_verdicts(verdicts: dict, k: int) -> float:
    """pass@k averaged over questions already graded: verdicts = {id: [whether each sample is correct]}."""
    return sum(pass_at_k(len(v), sum(v), k) for v in verdicts.values()) / len(verdicts)


def vote_counts(answers: list[str], same_answer: SameAnswer = exact_match) -> list[tuple[str, int]]:
    """[(representative, votes)] of the answer classes of `answers`, in order of first appearance; the empty answer
    ("no answer found") is a class of its own, counted like the others but never equal to a non-empty answer.

    Each non-empty answer joins the first class whose representative (its first member) it equals under
    `same_answer` (so "0.5" and "\\frac{1}{2}" vote together under the equivalence grader for MATH; under `paper`
    only equal strings do)."""
    representatives: list[str] = []
    counts: list[int] = []
    for answer in answers:
        for c, representative in enumerate(representatives):
            if answer == representative == "" or answers_agree(representative, answer, same_answer):
                counts[c] += 1
                break
        else:
            representatives.append(answer)
            counts.append(1)
    return list(zip(representatives, counts))


def majority_vote(answers: list[str], same_answer: SameAnswer = exact_match) -> tuple[str, float]:
    """(a_plus, confidence): the most frequent non-empty answer and its count over ALL len(answers) samples.

    Classes as vote_counts. Ties go to the class that appeared first in sample order, which is deterministic since
    the samples are stored in order. Empty answers count in the denominator but never win; with no non-empty answer
    the result is ("", 0.0).
    """
    if not answers:
        raise ValueError("majority_vote needs at least one answer")
    return majority_of(vote_counts(answers, same_answer))


def majority_of(classes: list[tuple[str, int]]) -> tuple[str, float]:
    """majority_vote from the answer classes vote_counts already counted (their votes sum to the number of answers)."""
    named = [(c, rep, n) for c, (rep, n) in enumerate(classes) if rep != ""]
    if not named:
        return "", 0.0
    _, best, count = max(named, key=lambda x: (x[2], -x[0]))  # highest count, then earliest class
    return best, count / sum(n for _, n in classes)


def majority_accuracy(samples_by_id: dict, gold, same_answer: SameAnswer = exact_match,
                      same_for: SameFor | None = None) -> float:
    """maj@k: the fraction of questions whose majority answer over their samples {"answer", ...} (majority_vote,
    under the question's comparison) equals the gold answer; a question with no non-empty answer is wrong."""
    if not samples_by_id:
        raise ValueError("maj@k of no questions is undefined")
    gold = gold_answers(gold)
    right = 0
    for qid, samples in samples_by_id.items():
        if qid not in gold:
            raise ValueError(f"samples id {qid!r} has no gold answer")
        same = comparator(same_answer, same_for, qid)
        right += answers_agree(majority_vote([s["answer"] for s in samples], same)[0], gold[qid], same)
    return right / len(samples_by_id)


def accuracy_by_level(records: list[dict], gold, levels: dict, same_answer: SameAnswer = exact_match,
                      same_for: SameFor | None = None) -> dict:
    """MATH: {level: {"accuracy", "n"}} with levels = {id: level} (1-5, None for unknown); sorted, None last."""
    gold = gold_answers(gold)
    groups: dict = {}
    for i, record in enumerate(records):
        if record.get("id") not in levels:
            raise ValueError(f"records[{i}]: id {record.get('id')!r} has no level")
        groups.setdefault(levels[record["id"]], []).append(record)
    order = sorted(groups, key=lambda level: (level is None, level if level is not None else 0))
    return {level: {"accuracy": accuracy(groups[level], gold, same_answer, same_for), "n": len(groups[level])}
            for level in order}


def pgr(acc: float, weak_floor: float, ceiling: float) -> float | None:
    """Performance gap recovered = (acc - weak_floor) / (ceiling - weak_floor).

    0 = no better than the weak supervisor, 1 = as good as the strong model trained on gold. None when the ceiling
    equals the floor: the gap is zero, PGR is undefined there (report it as n/a), not 0 or infinite.
    """
    gap = ceiling - weak_floor
    if abs(gap) < 1e-12:
        return None
    return (acc - weak_floor) / gap


def pair_precision(pairs: list[dict], gold, same_answer: SameAnswer = exact_match, kind: str | None = None,
                   same_for: SameFor | None = None):
    """Analysis only: fraction of preference pairs whose chosen answer ("chosen_answer") is gold-correct.

    kind: restrict to "weak_chosen" or "weak_rejected" pairs. None when there is no such pair.
    """
    if kind is not None:
        pairs = [p for p in pairs if p.get("kind") == kind]
    if not pairs:
        return None
    rows = [{"id": p["id"], "answer": p["chosen_answer"]} for p in pairs]
    return accuracy(rows, gold, same_answer, same_for)


def evaluation_result(rows: list[dict], test: list[dict], task: str, grader: str | None = None,
                      per_question: bool = False) -> dict:
    """The result of one evaluation on the test records {"id", "answer", "level"?}, under every available grader.

    rows: {"id", "response"} (one greedy response each) or {"id", "samples": [{"response"}, ...]} (n samples each),
    each response as tasks.stored_response keeps a completion (the pipeline's labels.jsonl).
    Each grader reads the answers and gold itself. The result holds, per grader, "accuracy_by_grader" (greedy; MATH
    also "accuracy_by_level_by_grader") or "pass_by_grader" {"pass@1", "pass@n", "maj@n"} (samples; maj@n: the
    majority answer of a question's n samples, voted under that grader, is correct), "no_answer_by_grader"
    (responses it reads no answer from), "grader_disagreements" {"a/b": responses whose verdicts differ} and
    "equivalence_gave_up" (comparisons past the equivalence grader's sympy bounds, by bound); and,
    as the headline, the same numbers under `grader` ("accuracy", "n_correct", "accuracy_by_level" or "pass@k",
    "maj@k")
    with "grader" naming it. per_question adds "per_question": one line per test record, in test order, under the
    headline grader (_question_lines), from the same grading pass. Used by the pipeline's eval stages and by
    scripts/evaluate.py.
    """
    grader = grader or default_grader(task)
    names = tuple(dict.fromkeys((grader, *available_graders(task))))  # the headline grader first
    gave_up_before = dict(BOUNDED)  # BOUNDED counts since the process started: this call's are the difference
    graded = {name: _graded(rows, test, get_grader(task, name)) for name in names}
    flat = {name: [v for vs in g["verdicts"].values() for v in vs] for name, g in graded.items()}
    result = {"grader": grader,
              "no_answer_by_grader": {name: g["no_answer"] for name, g in graded.items()},
              "equivalence_gave_up": {bound: BOUNDED[bound] - n for bound, n in gave_up_before.items()},
              "grader_disagreements": {f"{a}/{b}": sum(x != y for x, y in zip(flat[a], flat[b]))
                                       for a, b in combinations(names, 2)}}
    if per_question:
        result["per_question"] = _question_lines(test, graded[grader], grader, sampled="samples" in rows[0])
    if rows and "samples" in rows[0]:
        n = min(len(v) for v in graded[grader]["verdicts"].values())
        passes = {name: {f"pass@{k}": mean_pass_at_k_of_verdicts(g["verdicts"], k) for k in sorted({1, n})}
                  | {f"maj@{n}": g["maj"]} for name, g in graded.items()}
        return {**passes[grader], **result, "pass_by_grader": passes}
    acc = {name: sum(v) / len(v) for name, v in flat.items()}
    result |= {"accuracy": acc[grader], "n_correct": sum(flat[grader]), "accuracy_by_grader": acc,
               "n_correct_by_grader": {name: sum(v) for name, v in flat.items()}}
    if task == "math":
        levels = {record["id"]: record.get("level") for record in test}
        by_level = {name: {str(level): v["accuracy"] for level, v in
                           accuracy_by_level(g["records"], g["gold"], levels, same_for=g["same_for"]).items()}
                    for name, g in graded.items()}
        result |= {"accuracy_by_level": by_level[grader], "accuracy_by_level_by_grader": by_level}
    return result


def _graded(rows: list[dict], test: list[dict], grader) -> dict:
    """One grader's reading of an evaluation: answer records, normalized gold, per-question verdicts [bool, ...]."""
    if not rows:
        raise ValueError("an evaluation of no responses is undefined")
    gold = {record["id"]: grader.gold(record["answer"]) for record in test}
    same = per_question(grader, {record["id"]: record for record in test})
    if "samples" in rows[0]:
        samples = {row["id"]: [{"answer": grader.answer(s["response"], stored=True)} for s in row["samples"]]
                   for row in rows}
        records = [s for ss in samples.values() for s in ss]
        correct = sample_verdicts(samples, gold, same_for=same)
        maj = majority_accuracy(samples, gold, same_for=same)
    else:
        records, maj = [{"id": row["id"], "answer": grader.answer(row["response"], stored=True)} for row in rows], None
        correct = {r["id"]: [v] for r, v in zip(records, verdicts(records, gold, same_for=same))}
    answers = ({qid: [s["answer"] for s in ss] for qid, ss in samples.items()} if "samples" in rows[0]
               else {r["id"]: [r["answer"]] for r in records})
    return {"records": records, "answers": answers, "gold": gold, "same_for": same, "verdicts": correct, "maj": maj,
            "no_answer": sum(r["answer"] == "" for r in records)}


def _question_lines(test: list[dict], graded: dict, grader: str, sampled: bool) -> list[dict]:
    """Per test record, in test order: its id and index, the gold answer as the file has it and as the grader reads
    it, and the prediction (the grader's reading of the response) with its verdict, or every sample's predictions,
    verdicts and their count."""
    lines = []
    for index, record in enumerate(test):
        qid = record["id"]
        answers, correct = graded["answers"][qid], graded["verdicts"][qid]
        line = {"id": qid, "index": index, "gold": record["answer"], "gold_normalized": graded["gold"][qid],
                "grader": grader}
        lines.append(line | ({"predictions": answers, "correct": correct, "n_correct": sum(correct)} if sampled
                             else {"prediction": answers[0], "correct": correct[0]}))
    return lines
