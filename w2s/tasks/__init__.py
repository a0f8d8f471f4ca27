"""Tasks: GSM8K, MATH and OlympicArena records, the prompts of PAPER.md, and answer grading.

A record is a plain dict: {"id", "question", "solution" (the gold SFT target), "answer" (gold final answer)},
plus "level" and "subject" for MATH. Prompts use no chat template (PAPER.md "Prompt and targets"):

    zero_shot_prompt(q)            "Question: {q}\\nAnswer:"
    training_text(prompt, resp)    prompt + " " + resp            (the trainer appends EOS; loss on resp only)
    few_shot_prompt(demos, q)      4 x "Question: ...\\nAnswer: ..." joined by a blank line, then the zero-shot prompt
    STOP_STRINGS                   generation also stops when the model starts a new "Question" / "Answer"

OlympicArena (no gold for training; its own prompt, stop strings and judge) lives in w2s/tasks/olympicarena.py and
w2s/tasks/olympic_judge.py; TASKS lists it with the two above.

Test: python -m pytest -q tests/test_tasks.py tests/test_grading.py tests/test_olympicarena.py
"""

from __future__ import annotations

import random

from w2s.tasks import olympic_judge, olympicarena
from w2s.tasks.data import fetch_data, load_records, load_split, save_split, split_train
from w2s.tasks.grading import TASKS as GRADED_TASKS
from w2s.tasks.grading import answer_key, extract_answer, final_answer, grade, is_equiv, normalize_answer

__all__ = [
    "TASKS", "STOP_STRINGS", "zero_shot_prompt", "few_shot_prompt", "training_text", "select_demos",
    "load_records", "split_train", "load_split", "save_split", "fetch_data",
    "extract_answer", "normalize_answer", "final_answer", "is_equiv", "grade", "answer_key",
    "GRADED_TASKS", "olympicarena", "olympic_judge",
]  # fmt: skip

# Every task with records and a grader: gsm8k / math grade through w2s/tasks/grading.py, olympicarena through
# w2s/tasks/olympic_judge.py.
TASKS = GRADED_TASKS + (olympicarena.NAME,)

STOP_STRINGS = ["Question", "Answer"]
N_DEMOS = 4


def zero_shot_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def training_text(prompt: str, response: str) -> str:
    """The SFT sequence without EOS: the model learns to continue "Answer:" with " " + response."""
    return prompt + " " + response


def few_shot_prompt(demos: list[dict], question: str) -> str:
    """ICL prompt: each demo {"question", "response"} as "Question: q\\nAnswer: r", a blank line between examples.

    Responses are stripped so a stored leading space or trailing newline cannot break the blank-line separators.
    """
    blocks = [f"{zero_shot_prompt(d['question'])} {d['response'].strip()}" for d in demos]
    return "\n\n".join(blocks + [zero_shot_prompt(question)])


def select_demos(weak_records: list[dict], task: str, k: int = N_DEMOS, seed: int = 0) -> list[dict]:
    """k demonstrations drawn (seeded) from the weak model's own responses {"question", "response", ...}.

    PAPER.md: chosen at random among responses with an extractable answer, NOT filtered for correctness.
    """
    # "Extractable" = a non-empty normalized answer: the same test the consistency filter and the vote apply.
    candidates = [r for r in weak_records if normalize_answer(extract_answer(r["response"], task))]
    if len(candidates) < k:
        raise ValueError(f"need {k} weak responses with an extractable answer for ICL demos, found {len(candidates)}")
    return random.Random(seed).sample(candidates, k)
