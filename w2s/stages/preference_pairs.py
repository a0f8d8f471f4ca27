"""Stage II data: majority vote over M_plus's samples, then preference pairs against the weak response (docs/PAPER.md).

For each train_2 question M_plus draws n samples (paper: 10, T=1.0). Their extracted answers vote:

    a_plus, confidence = majority_vote(answers)      # most frequent non-empty answer, count(a_plus) / n

and the rules of docs/PAPER.md Stage II step 3 turn the weak response into one side of up to `max_pairs_per_question`
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

Beyond the paper (recipe options, off by default; docs/PAPER.md "Beyond the paper"):

    pair_weighting = "margin"        each pair carries "weight" = (votes(chosen answer) - votes(rejected answer)) / n,
                                     the vote margin by which ScPO (Prasad et al. 2025) weights a pair's loss; the
                                     trainer multiplies the pair's loss terms by it
    self_consistency_pairs = true    a question the paper's rules skip (vote below the flip bar, weak label absent)
                                     gets ScPO's pair instead: a sample of the most-voted answer chosen over one of
                                     the least-voted answer, when the vote reaches min_confidence (kind
                                     "self_consistency"); it never reads the weak label

Test: python -m pytest -q tests/test_stages.py
"""

from __future__ import annotations

import hashlib
import random

from w2s.stages.consistency import check_same_ids, index_by_id
from w2s.stages.metrics import (
    SameAnswer,
    SameFor,
    answers_agree,
    comparator,
    exact_match,
    majority_of,
    vote_counts,
)
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
    seen = {exclude} if exclude is not None else set()
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
# Only with the options that need them: weak labels marked absent (the weak self-consistency filter dropped them) and
# the most- vs least-voted pairs of the questions the paper's rules skip.
OPTION_COUNT_KEYS = ("skipped_weak_absent", "self_consistency")
PAIR_WEIGHTING = ("none", "margin")


def vote_margin(chosen_answer: str, rejected_answer: str, classes: list[tuple[str, int]], same: SameAnswer) -> tuple:
    """(votes of the chosen answer, votes of the rejected answer, margin = their difference / the number of samples):
    ScPO's weight of a pair (Prasad et al. 2025). classes: the question's vote (metrics.vote_counts); an answer's
    votes are those of the first class it belongs to; the empty answer's are the samples without an answer; an answer
    no sample gave has 0."""
    def votes(answer):
        return next((n for rep, n in classes if answer == rep == "" or answers_agree(rep, answer, same)), 0)

    v_chosen, v_rejected = votes(chosen_answer), votes(rejected_answer)
    return v_chosen, v_rejected, (v_chosen - v_rejected) / sum(n for _, n in classes)


def _paper_side(record, samples, a_plus, confidence, same, min_confidence, flip_confidence):
    """The paper's rules for one question with a vote: (kind, candidates for the other side, None) or (None, None,
    the skip reason)."""
    if record.get("absent"):
        return None, None, "skipped_weak_absent"
    if a_plus == "":
        return None, None, "skipped_no_answer"
    if confidence + _EPS < min_confidence:
        return None, None, "skipped_low_confidence"
    if answers_agree(record["answer"], a_plus, same):
        # Samples whose answer differs from the weak one (= a_plus), including those with no answer at all.
        # Checked against both, so a non-transitive `same_answer` can never reject an equal answer.
        return "weak_chosen", [s for s in samples if not answers_agree(s["answer"], a_plus, same)
                               and not answers_agree(s["answer"], record["answer"], same)], None
    if confidence + _EPS >= flip_confidence:
        # The chosen side answers a+ and, checked separately (equivalence may not be transitive), not the weak
        # answer: a pair never prefers one response over another with the same answer.
        return "weak_rejected", [s for s in samples if answers_agree(s["answer"], a_plus, same)
                                 and not answers_agree(s["answer"], record["answer"], same)], None
    return None, None, "skipped_below_flip"


def self_consistency_pair(samples, classes, same, min_confidence, rng):
    """ScPO's pair for one question: a sample of the most-voted answer (a_plus, chosen) against a sample of the
    least-voted answer (rejected; a response without an answer is a class of its own; ties go to the class seen
    first), each drawn among distinct texts; None when the vote is below min_confidence or has a single class.
    classes: the vote of the samples' answers (metrics.vote_counts)."""
    a_plus, confidence = majority_of(classes)
    if a_plus == "" or confidence + _EPS < min_confidence:
        return None
    others = [(n, c, rep) for c, (rep, n) in enumerate(classes) if not answers_agree(rep, a_plus, same)]
    if not others:
        return None
    _, _, least = min(others)

    def members(rep):
        return [s for s in samples if s["answer"] == rep == "" or answers_agree(s["answer"], rep, same)]

    chosen = _distinct(members(a_plus), exclude=None)
    rejected = [s for s in _distinct(members(least), exclude=None) if not answers_agree(s["answer"], a_plus, same)]
    return (rng.choice(chosen), rng.choice(rejected)) if chosen and rejected else None


def _pair_row(qid, record, chosen, rejected, kind, confidence, classes, same, pair_weighting):
    row = {"id": qid, "prompt": zero_shot_prompt(record["question"]), "chosen": chosen["response"],
           "rejected": rejected["response"], "kind": kind, "confidence": confidence,
           "chosen_answer": chosen["answer"], "rejected_answer": rejected["answer"],
           "chosen_truncated": bool(chosen.get("truncated", False)),
           "rejected_truncated": bool(rejected.get("truncated", False))}
    if pair_weighting == "margin" or kind == "self_consistency":
        v_chosen, v_rejected, margin = vote_margin(chosen["answer"], rejected["answer"], classes, same)
        row |= {"chosen_votes": v_chosen, "rejected_votes": v_rejected, "margin": margin}
        if pair_weighting == "margin":
            row["weight"] = margin  # the trainer weights this pair's loss terms by it (w2s/train.py)
    return row


def _check_samples(qid, samples):
    if not samples:
        raise ValueError(f"samples_by_id[{qid!r}]: no samples")
    for j, sample in enumerate(samples):
        if "response" not in sample or "answer" not in sample:
            raise ValueError(f"samples_by_id[{qid!r}][{j}]: expected keys 'response' and 'answer'")


def build_pairs(
    weak_records: list[dict],
    samples_by_id: dict,
    seed: int,
    max_pairs_per_question: int = 1,
    min_confidence: float = 0.6,
    flip_confidence: float = 0.8,
    same_answer: SameAnswer = exact_match,
    same_for: SameFor | None = None,
    pair_weighting: str = "none",
    self_consistency_pairs: bool = False,
) -> tuple[list[dict], dict]:
    """Preference pairs by docs/PAPER.md Stage II step 3 and the counts for the stage's meta.json.

    weak_records: labelled weak records {"id", "question", "response", "answer"} (D_weak); a record with "absent":
    true has no weak label (the weak self-consistency filter dropped it): the paper's rules skip it.
    samples_by_id: {id: [{"response", "answer"}, ...]} from M_plus, the same ids as weak_records.
    pair_weighting "margin": every pair carries "weight" = its vote margin (ScPO). self_consistency_pairs: a question
    the paper's rules skip gets ScPO's most- vs least-voted pair instead (kind "self_consistency") when its vote
    reaches min_confidence.
    Pairs come in weak_records order; per question, in the order drawn.
    """
    if max_pairs_per_question < 1:
        raise ValueError(f"max_pairs_per_question must be >= 1, got {max_pairs_per_question}")
    if not 0.0 <= min_confidence <= flip_confidence <= 1.0:
        raise ValueError(f"need 0 <= min_confidence <= flip_confidence <= 1, got {min_confidence}, {flip_confidence}")
    if pair_weighting not in PAIR_WEIGHTING:
        raise ValueError(f"pair_weighting={pair_weighting!r}: expected one of {', '.join(PAIR_WEIGHTING)}")
    weak = index_by_id(weak_records, "weak_records")
    check_same_ids(weak, samples_by_id, "weak_records", "samples_by_id")

    options_on = self_consistency_pairs or any(r.get("absent") for r in weak_records)
    counts = dict.fromkeys(COUNT_KEYS + (OPTION_COUNT_KEYS if options_on else ()), 0)
    pairs = []
    for qid, record in weak.items():
        counts["questions"] += 1
        samples = samples_by_id[qid]
        _check_samples(qid, samples)
        same = comparator(same_answer, same_for, qid)
        classes = vote_counts([s["answer"] for s in samples], same)  # the one count of this question's vote
        a_plus, confidence = majority_of(classes)
        kind, candidates, skipped = _paper_side(record, samples, a_plus, confidence, same, min_confidence,
                                                flip_confidence)
        if kind is not None:
            candidates = _distinct(candidates, exclude=record["response"])
            if not candidates:
                skipped = "skipped_no_differing_sample" if kind == "weak_chosen" else "skipped_no_other_side"
        rng = question_rng(seed, qid)
        if skipped is not None:
            counts[skipped] += 1
            sc = self_consistency_pair(samples, classes, same, min_confidence, rng) if self_consistency_pairs else None
            if sc is None:
                continue
            kind, drawn = "self_consistency", [sc]
        else:
            others = rng.sample(candidates, min(max_pairs_per_question, len(candidates)))
            drawn = [(record, o) if kind == "weak_chosen" else (o, record) for o in others]
        pairs += [_pair_row(qid, record, chosen, rejected, kind, confidence, classes, same, pair_weighting)
                  for chosen, rejected in drawn]
        counts[kind] += len(drawn)
        counts["pairs"] += len(drawn)
        counts["questions_with_pairs"] += 1
    return pairs, counts
