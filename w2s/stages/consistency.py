"""Stage I filter: final-answer consistency between two labelers, and the weak / icl / hybrid SFT sets (docs/PAPER.md).

Round 1 compares D_weak (weak model, zero-shot) with D_icl (strong base, 4-shot with weak demos); round 2 compares
the zero-shot labels of M_weak-ft and M_icl-ft. Both rounds are the same two calls:

    kept = consistent(weak_records, icl_records)            # ids whose two answers are non-empty and equal
    sets = sft_sets(weak_records, icl_records, kept)        # {"weak": rows, "icl": rows, "hybrid": rows}
    precision(kept_records, gold_answers)                   # analysis only: gold never enters a training set

Beyond the paper ([stage1] weak_self_consistency, docs/PAPER.md): the weak model's own k samples per question vote
first, and the questions where its majority is not confident leave the weak set before the filter:

    confident = self_consistent(weak_samples_by_id, min_confidence)   # ids whose weak majority is confident enough

A labelled record is {"id", "question", "response", "answer"} (+ "truncated" when the response stopped at the token
limit); "answer" is the final answer the recipe's grader read from the response ("" when none), added by the runner
where it filters (w2s/tasks/graders.py). An SFT row is {"id", "prompt", "response"} (+ "truncated"), prompt = the
zero-shot "Question: ...\\nAnswer:". Answers are compared by a `same_answer(a, b) -> bool` callable (`exact_match`
by default, the `paper` grader's comparison), or per question by `same_for(id) -> same_answer`.

Test: python -m pytest -q tests/test_stages.py
"""

from __future__ import annotations

from w2s.stages.metrics import SameAnswer, SameFor, accuracy, answers_agree, comparator, exact_match, majority_vote
from w2s.tasks import zero_shot_prompt

LABELLED_KEYS = ("id", "question", "response", "answer")


def index_by_id(records: list[dict], name: str, keys: tuple = LABELLED_KEYS) -> dict:
    """{id: record}, checking that each record has `keys`; a missing key or a repeated id is an error naming the
    list and the index."""
    by_id = {}
    for i, record in enumerate(records):
        for key in keys:
            if key not in record:
                raise ValueError(f"{name}[{i}]: missing key {key!r} (expected keys {', '.join(keys)})")
        if record["id"] in by_id:
            raise ValueError(f"{name}[{i}]: duplicate id {record['id']!r}")
        by_id[record["id"]] = record
    return by_id


def check_same_ids(a: dict, b: dict, name_a: str, name_b: str) -> None:
    """Two id-indexed collections must cover the same questions; otherwise say which ids differ."""
    if a.keys() != b.keys():
        only_a, only_b = sorted(map(str, a.keys() - b.keys())), sorted(map(str, b.keys() - a.keys()))
        raise ValueError(
            f"{name_a} and {name_b} must cover the same questions: {len(only_a)} ids only in {name_a} "
            f"(e.g. {only_a[:3]}), {len(only_b)} only in {name_b} (e.g. {only_b[:3]})"
        )


def consistent(weak_records: list[dict], other_records: list[dict], same_answer: SameAnswer = exact_match,
               same_for: SameFor | None = None) -> list:
    """Ids (in weak_records order) whose weak and other answers are both non-empty and equal.

    The two lists must label exactly the same set of ids (order may differ): a missing question would silently
    shrink the training set, so it is an error instead.
    """
    weak, other = index_by_id(weak_records, "weak_records"), index_by_id(other_records, "other_records")
    check_same_ids(weak, other, "weak_records", "other_records")
    return [i for i in weak
            if answers_agree(weak[i]["answer"], other[i]["answer"], comparator(same_answer, same_for, i))]


def sft_row(record: dict) -> dict:
    """A labelled record -> the SFT row the trainer reads: zero-shot prompt, the record's response as target (and
    whether that response stopped at the token limit, when the record says)."""
    row = {"id": record["id"], "prompt": zero_shot_prompt(record["question"]), "response": record["response"]}
    return row | ({"truncated": record["truncated"]} if "truncated" in record else {})


SFT_SETS = ("weak", "icl", "hybrid")  # sft_sets' keys; a Stage I model is named by the set it trained on


def sft_sets(weak_records: list[dict], icl_records: list[dict], kept: list) -> dict[str, list[dict]]:
    """The three Stage I training sets over the kept ids, in `kept` order.

    weak: the weak responses; icl: the ICL (or round-2 icl-ft) responses; hybrid: both, two rows per question
    (weak first). Prompts are always zero-shot: the strong model learns to answer without demonstrations.
    """
    weak, icl = index_by_id(weak_records, "weak_records"), index_by_id(icl_records, "icl_records")
    missing = [i for i in kept if i not in weak or i not in icl]
    if missing:
        raise ValueError(f"{len(missing)} kept ids are not in both weak_records and icl_records (e.g. {missing[:3]})")
    if len(set(kept)) != len(kept):
        raise ValueError("kept ids must be unique")
    weak_rows = [sft_row(weak[i]) for i in kept]
    icl_rows = [sft_row(icl[i]) for i in kept]
    hybrid_rows = [row for pair in zip(weak_rows, icl_rows) for row in pair]
    return {"weak": weak_rows, "icl": icl_rows, "hybrid": hybrid_rows}


def precision(records: list[dict], gold_answers: dict, same_answer: SameAnswer = exact_match,
              same_for: SameFor | None = None) -> float | None:
    """Analysis only: the fraction of selected labelled records whose answer is gold-correct; None if none selected.

    gold_answers: {id: gold answer}. Pass the kept records of one labeler (their answers agree with the other's).
    """
    if not records:
        return None
    return accuracy(records, gold_answers, same_answer, same_for)


def self_consistent(samples_by_id: dict, min_confidence: float, same_answer: SameAnswer = exact_match,
                    same_for: SameFor | None = None) -> dict:
    """{id: confidence of the weak model's majority answer over its samples} for the ids whose confidence reaches
    min_confidence (Shi et al. 2025's weak self-consistency filter); samples_by_id = {id: [{"answer", ...}, ...]}.
    A question with no non-empty answer has confidence 0."""
    kept = {}
    for qid, samples in samples_by_id.items():
        _, confidence = majority_vote([s["answer"] for s in samples], comparator(same_answer, same_for, qid))
        if confidence + 1e-9 >= min_confidence:  # 6/10 reaches a 0.6 bar whatever the float rounding
            kept[qid] = confidence
    return kept
