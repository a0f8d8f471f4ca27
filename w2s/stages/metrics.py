"""Evaluation metrics: accuracy, pass@k, MATH accuracy by level, PGR, and the precision of filtered data and pairs.

How answers are compared lives here too, since every stage and metric must agree on it:

    exact_match(a, b)          equal normalized strings; "" (no answer) never matches anything (GSM8K)
    answer_matcher(task)       exact_match for gsm8k; is_equiv(a, b, "math") (exact or sympy-equal) for math

    accuracy(records, gold)                     fraction of {"id", "answer"} records equal to gold[id]
    pass_at_k(n, c, k)                          unbiased pass@k from n samples of which c are correct
    mean_pass_at_k(samples_by_id, gold, k)      pass@k averaged over questions
    accuracy_by_level(records, gold, levels)    MATH: {level: {"accuracy", "n"}}
    pgr(acc, weak_floor, ceiling)               (acc - floor) / (ceiling - floor); None when ceiling == floor
    pair_precision(pairs, gold)                 analysis only: fraction of pairs whose chosen answer is correct
    evaluation_result(rows, test, task)         what an evaluation reports: accuracy (+ by level) or pass@k

`gold` is {id: gold answer} or a list of gold records {"id", "answer"}. Every function takes an optional
`same_answer(pred, gold) -> bool`. Empty inputs where a metric is undefined give None (JSON null in meta.json).

Test: python -m pytest -q tests/test_stages.py
"""

from __future__ import annotations

import math
from typing import Callable

SameAnswer = Callable[[str, str], bool]


def exact_match(a: str, b: str) -> bool:
    """Default answer comparison: equal normalized strings. An empty answer ("no answer found") never matches."""
    return a != "" and a == b


def answer_matcher(task: str) -> SameAnswer:
    """The comparison a task grades with (w2s.tasks.grading.is_equiv): both sides Minerva-normalized (PAPER.md:
    "normalize both prediction and gold", so a gold "2,125" equals a prediction "2125"), then equal strings, or for
    MATH sympy-equal expressions."""
    from w2s.tasks.grading import is_equiv

    is_equiv("", "", task)  # an unknown task raises its clear ValueError now, not at the first comparison

    def same_answer(a: str, b: str) -> bool:
        return is_equiv(a, b, task)

    return same_answer


def answers_agree(a: str, b: str, same_answer: SameAnswer = exact_match) -> bool:
    """Both answers present and equal. The emptiness check is ours, so a lax `same_answer` cannot match "" with ""."""
    return a != "" and b != "" and bool(same_answer(a, b))


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


def _correct(record: dict, gold: dict, same_answer: SameAnswer, where: str) -> bool:
    for key in ("id", "answer"):
        if key not in record:
            raise ValueError(f"{where}: missing key {key!r}")
    if record["id"] not in gold:
        raise ValueError(f"{where}: id {record['id']!r} has no gold answer")
    return answers_agree(record["answer"], gold[record["id"]], same_answer)


def accuracy(records: list[dict], gold, same_answer: SameAnswer = exact_match) -> float:
    """Fraction of records {"id", "answer"} whose answer equals the gold answer of their id. Empty answers are wrong."""
    if not records:
        raise ValueError("accuracy of an empty list of records is undefined")
    gold = gold_answers(gold)
    return sum(_correct(r, gold, same_answer, f"records[{i}]") for i, r in enumerate(records)) / len(records)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), the chance that k of the n samples drawn without
    replacement include a correct one. Computed as a product, so it never forms huge binomials."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i)
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(samples_by_id: dict, gold, k: int, same_answer: SameAnswer = exact_match) -> float:
    """pass@k averaged over questions; samples_by_id = {id: [sample records {"answer", ...}]} (n per question)."""
    if not samples_by_id:
        raise ValueError("pass@k of no questions is undefined")
    gold = gold_answers(gold)
    total = 0.0
    for qid, samples in samples_by_id.items():
        if qid not in gold:
            raise ValueError(f"samples id {qid!r} has no gold answer")
        c = sum(answers_agree(s["answer"], gold[qid], same_answer) for s in samples)
        total += pass_at_k(len(samples), c, k)
    return total / len(samples_by_id)


def accuracy_by_level(records: list[dict], gold, levels: dict, same_answer: SameAnswer = exact_match) -> dict:
    """MATH: {level: {"accuracy", "n"}} with levels = {id: level} (1-5, None for unknown); sorted, None last."""
    gold = gold_answers(gold)
    groups: dict = {}
    for i, record in enumerate(records):
        if record.get("id") not in levels:
            raise ValueError(f"records[{i}]: id {record.get('id')!r} has no level")
        groups.setdefault(levels[record["id"]], []).append(record)
    order = sorted(groups, key=lambda level: (level is None, level if level is not None else 0))
    return {level: {"accuracy": accuracy(groups[level], gold, same_answer), "n": len(groups[level])} for level in order}


def pgr(acc: float, weak_floor: float, ceiling: float) -> float | None:
    """Performance gap recovered = (acc - weak_floor) / (ceiling - weak_floor).

    0 = no better than the weak supervisor, 1 = as good as the strong model trained on gold. None when the ceiling
    equals the floor: the gap is zero, PGR is undefined there (report it as n/a), not 0 or infinite.
    """
    gap = ceiling - weak_floor
    if abs(gap) < 1e-12:
        return None
    return (acc - weak_floor) / gap


def pair_precision(pairs: list[dict], gold, same_answer: SameAnswer = exact_match, kind: str | None = None):
    """Analysis only: fraction of preference pairs whose chosen answer ("chosen_answer") is gold-correct.

    kind: restrict to "weak_chosen" or "weak_rejected" pairs. None when there is no such pair.
    """
    if kind is not None:
        pairs = [p for p in pairs if p.get("kind") == kind]
    if not pairs:
        return None
    rows = [{"id": p["id"], "answer": p["chosen_answer"]} for p in pairs]
    return accuracy(rows, gold, same_answer)


def evaluation_result(rows: list[dict], test: list[dict], task: str) -> dict:
    """The result of one evaluation on the test records {"id", "answer", "level"?}.

    rows: labelled records {"id", "answer"} (one greedy answer each) -> {"accuracy", "n_correct"} and, for MATH,
    "accuracy_by_level" {level: accuracy}; or {"id", "samples": [{"answer"}, ...]} (n samples each) ->
    {"pass@1", "pass@n"}. Used by the pipeline's eval stages and by scripts/evaluate.py.
    """
    gold = gold_answers(test)
    same = answer_matcher(task)
    if rows and "samples" in rows[0]:
        samples = {row["id"]: row["samples"] for row in rows}
        n = min(len(s) for s in samples.values())
        return {f"pass@{k}": mean_pass_at_k(samples, gold, k, same) for k in sorted({1, n})}
    result = {"accuracy": accuracy(rows, gold, same)}
    result["n_correct"] = round(result["accuracy"] * len(rows))
    if task == "math":
        levels = {record["id"]: record.get("level") for record in test}
        result["accuracy_by_level"] = {str(level): v["accuracy"] for level, v in
                                       accuracy_by_level(rows, gold, levels, same).items()}
    return result
