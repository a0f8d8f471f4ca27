"""Stage II data: majority vote over M_plus's samples, then preference pairs against the weak response (PAPER.md).

For each train_2 question M_plus draws n samples (paper: 10, T=1.0). Their extracted answers vote:

    a_plus, confidence = majority_vote(answers)      # most frequent non-empty answer, count(a_plus) / n

and the rules of PAPER.md Stage II step 3 turn the weak response into one side of up to `max_pairs_per_question`
pairs (1 for GSM8K, 3 for MATH):

    confidence < min_confidence (0.6) or no a_plus     -> skip the question
    weak answer == a_plus                              -> chosen = weak, rejected = samples whose answer differs
                                                          (an empty answer differs too); none differ -> skip
    weak answer != a_plus, confidence >= flip (0.8)    -> chosen = samples with answer a_plus, rejected = weak
    weak answer != a_plus, confidence < flip           -> skip (the vote is not sure enough to overrule the weak label)

The other side of each pair is drawn at random among the distinct candidate responses (distinct texts), without
replacement, from an RNG seeded by (seed, question id): the pairs of a question do not depend on which other
questions are present or in which order they come.

    pairs, counts = build_pairs(weak_records, group_samples(sample_records), seed=0, max_pairs_per_question=1)

A pair is {"id", "prompt", "chosen", "rejected", "kind": "weak_chosen" | "weak_rejected", "confidence",
"chosen_answer", "rejected_answer", "chosen_truncated", "rejected_truncated"}; the answers (read by the recipe's
grader) and the truncation flags (a side that stopped at the token limit) are kept for analysis, never for training.
Comparisons use `same_answer(a, b)`, or `same_for(id)` for a comparison that depends on the question.

Test: python -m pytest -q tests/test_stages.py
"""

from __future__ import annotations

import hashlib
import random

from w2s.stages.consistency import check_same_ids, index_by_id
from w2s.stages.metrics import SameAnswer, SameFor, answers_agree, comparator, exact_match, majority_vote
from w2s.tasks import zero_shot_prompt

# confidence is count / n; compare with a little slack so 0.6 given as 6/10 or 3/5 or 0.6 all pass the 0.6 bar.
_EPS = 1e-9


def question_rng(seed: int, qid) -> random.Random:
    """An RNG for one question, from sha256(seed, id): independent of the other questions and of Python's hash seed."""
    digest = hashlib.sha256(f"{seed}\x00{qid}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def group_samples(sample_records: list[dict]) -> dict:
    """Flat sample records (several per id, in sample order) -> {id: [records]} keeping that order."""
    grouped: dict = {}
    for i, record in enumerate(sample_records):
        for key in ("id", "response", "answer"):
            if key not in record:
                raise ValueError(f"samples[{i}]: missing key {key!r} (expected 'id', 'response', 'answer')")
        grouped.setdefault(record["id"], []).append(record)
    return grouped


def _distinct(samples: list[dict], exclude: str) -> list[dict]:
    """Samples with distinct response texts, first occurrence kept, never the text `exclude` (the weak response)."""
    seen = {exclude}
    out = []
    for sample in samples:
        if sample["response"] not in seen:
            seen.add(sample["response"])
            out.append(sample)
    return out


COUNT_KEYS = (
    "questions",  # weak records considered
    "pairs",
    "questions_with_pairs",
    "weak_chosen",  # pairs where the weak response is chosen
    "weak_rejected",  # pairs where the weak response is rejected
    "skipped_no_answer",  # no sample has a non-empty answer: no a_plus
    "skipped_low_confidence",  # confidence < min_confidence
    "skipped_no_differing_sample",  # weak == a_plus but every sample agrees with it
    "skipped_below_flip",  # weak != a_plus and min_confidence <= confidence < flip_confidence
    "skipped_no_other_side",  # weak != a_plus but every a_plus sample repeats the weak text (degenerate)
)


def build_pairs(
    weak_records: list[dict],
    samples_by_id: dict,
    seed: int,
    max_pairs_per_question: int = 1,
    min_confidence: float = 0.6,
    flip_confidence: float = 0.8,
    same_answer: SameAnswer = exact_match,
    same_for: SameFor | None = None,
) -> tuple[list[dict], dict]:
    """Preference pairs by PAPER.md Stage II step 3 and the counts for the stage's meta.json.

    weak_records: labelled weak records {"id", "question", "response", "answer"} (D_weak).
    samples_by_id: {id: [{"response", "answer"}, ...]} from M_plus, the same ids as weak_records.
    Pairs come in weak_records order; per question, in the order drawn.
    """
    if max_pairs_per_question < 1:
        raise ValueError(f"max_pairs_per_question must be >= 1, got {max_pairs_per_question}")
    if not 0.0 <= min_confidence <= flip_confidence <= 1.0:
        raise ValueError(f"need 0 <= min_confidence <= flip_confidence <= 1, got {min_confidence}, {flip_confidence}")
    weak = index_by_id(weak_records, "weak_records")
    check_same_ids(weak, samples_by_id, "weak_records", "samples_by_id")

    counts = dict.fromkeys(COUNT_KEYS, 0)
    pairs = []
    for qid, record in weak.items():
        counts["questions"] += 1
        samples = samples_by_id[qid]
        if not samples:
            raise ValueError(f"samples_by_id[{qid!r}]: no samples")
        for j, sample in enumerate(samples):
            if "response" not in sample or "answer" not in sample:
                raise ValueError(f"samples_by_id[{qid!r}][{j}]: expected keys 'response' and 'answer'")
        same = comparator(same_answer, same_for, qid)
        a_plus, confidence = majority_vote([s["answer"] for s in samples], same)
        if a_plus == "":
            counts["skipped_no_answer"] += 1
            continue
        if confidence + _EPS < min_confidence:
            counts["skipped_low_confidence"] += 1
            continue

        weak_is_majority = answers_agree(record["answer"], a_plus, same)
        if weak_is_majority:
            kind = "weak_chosen"
            # Samples whose answer differs from the weak one (= a_plus), including those with no answer at all.
            # Checked against both, so a non-transitive `same_answer` can never reject an equal answer.
            candidates = [s for s in samples if not answers_agree(s["answer"], a_plus, same)
                          and not answers_agree(s["answer"], record["answer"], same)]
        elif confidence + _EPS >= flip_confidence:
            kind = "weak_rejected"
            # The chosen side answers a+ and, checked separately (equivalence may not be transitive), not the weak
            # answer: a pair never prefers one response over another with the same answer.
            candidates = [s for s in samples if answers_agree(s["answer"], a_plus, same)
                          and not answers_agree(s["answer"], record["answer"], same)]
        else:
            counts["skipped_below_flip"] += 1
            continue

        candidates = _distinct(candidates, exclude=record["response"])
        if not candidates:
            counts["skipped_no_differing_sample" if weak_is_majority else "skipped_no_other_side"] += 1
            continue
        rng = question_rng(seed, qid)
        others = rng.sample(candidates, min(max_pairs_per_question, len(candidates)))

        prompt = zero_shot_prompt(record["question"])
        for other in others:
            chosen, rejected = (record, other) if weak_is_majority else (other, record)
            pairs.append({
                "id": qid, "prompt": prompt, "chosen": chosen["response"], "rejected": rejected["response"],
                "kind": kind, "confidence": confidence, "chosen_answer": chosen["answer"],
                "rejected_answer": rejected["answer"], "chosen_truncated": bool(chosen.get("truncated", False)),
                "rejected_truncated": bool(rejected.get("truncated", False)),
            })  # fmt: skip
        counts[kind] += len(others)
        counts["pairs"] += len(others)
        counts["questions_with_pairs"] += 1
    return pairs, counts
