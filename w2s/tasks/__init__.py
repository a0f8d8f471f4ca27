"""Tasks: GSM8K, MATH and OlympicArena records, the prompts of docs/PAPER.md, the few-shot demonstrations, and answer
grading.

A record is a plain dict: {"id", "question", "solution" (the gold SFT target), "answer" (gold final answer)},
plus "level" and "subject" for MATH. Prompts use no chat template (docs/PAPER.md "Prompt and targets"):

    zero_shot_prompt(q)            "Question: {q}\\nAnswer:"
    training_text(prompt, resp)    prompt + " " + resp            (the trainer appends EOS; loss on resp only)
    few_shot_prompt(demos, q)      4 x "Question: ...\\nAnswer: ..." joined by a blank line, then the zero-shot prompt
    STOP_STRINGS                   generation also stops when the model starts a new "Question" / "Answer"
    select_demos(weak, task)       the weak responses shown as demonstrations (those containing the answer marker)
    stored_response(text, task)    a completion as it is kept: whitespace and, for GSM8K / MATH, "." stripped

Graders (how answers are read and compared: `paper`, `equivalence`, `math-verify`) are w2s/tasks/graders.py;
`extract_answer`, `normalize_answer`, `is_equiv`, `grade` and `final_answer` (from w2s/tasks/grading.py) are the
`equivalence` grader's.

OlympicArena (no gold for training; its own prompt, stop strings and judge) lives in w2s/tasks/olympicarena.py and
w2s/tasks/olympic_judge.py; TASKS lists it with the two above.

Test: python -m pytest -q tests/test_tasks.py tests/test_grading.py tests/test_olympicarena.py
"""

from __future__ import annotations

from w2s.tasks import olympic_judge, olympicarena
from w2s.tasks.data import fetch_data, load_records, load_split, save_split, split_train
from w2s.tasks.graders import GRADER_NAMES, MARKERS, available_graders, get_grader, has_marker
from w2s.tasks.grading import TASKS as GRADED_TASKS
from w2s.tasks.grading import answer_key, extract_answer, final_answer, grade, is_equiv, normalize_answer
from w2s.tasks.paper_protocol import draw_demos

__all__ = [
    "TASKS", "STOP_STRINGS", "zero_shot_prompt", "few_shot_prompt", "training_text", "select_demos", "stored_response",
    "strips_periods",
    "load_records", "split_train", "load_split", "save_split", "fetch_data",
    "extract_answer", "normalize_answer", "final_answer", "is_equiv", "grade", "answer_key",
    "GRADED_TASKS", "olympicarena", "olympic_judge",
    "GRADER_NAMES", "available_graders", "get_grader", "has_marker",
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


def stored_response(text: str, task: str) -> str:
    """A completion as it is kept to train on, show as a demonstration or pair: stripped of surrounding whitespace
    and, for GSM8K and MATH, of "." at both ends, as the authors' src/inference.py stores every response (a trailing
    "#### 72." trains as "#### 72"). OlympicArena's script stores its text as generated; its responses end in a box."""
    text = text.strip()
    return text.strip(".") if strips_periods(task) else text


def strips_periods(task: str) -> bool:
    """Whether stored_response strips "." for this task (the generation stages' keys say so: w2s/pipeline.py)."""
    return task != olympicarena.NAME


def few_shot_prompt(demos: list[dict], question: str) -> str:
    """ICL prompt: each demo {"question", "response"} as "Question: q\\nAnswer: r", a blank line between examples.

    Responses are stripped so a stored leading space or trailing newline cannot break the blank-line separators.
    """
    blocks = [f"{zero_shot_prompt(d['question'])} {d['response'].strip()}" for d in demos]
    return "\n\n".join(blocks + [zero_shot_prompt(question)])


def select_demos(weak_records: list[dict], task: str, k: int = N_DEMOS, seed: int = 42) -> list[dict]:
    """k demonstrations drawn (seeded) from the weak model's own responses {"question", "response", ...} to train_2,
    given in train_2 order.

    docs/PAPER.md: the only requirement is that the response CONTAINS the task's answer marker ("####" / "The answer
    is:"); demonstrations are not checked for correctness, nor for an answer any grader can read, so no grader
    changes the choice. The draw is the authors' (paper_protocol.draw_demos: shuffle every response with the seed,
    keep the first k marked); fewer than k marked ones is an error, never a silent fall-back to unmarked ones.
    """
    demos = draw_demos(weak_records, lambda r: has_marker(r["response"], task), k, seed)
    if len(demos) < k:
        found = sum(has_marker(r["response"], task) for r in weak_records)
        raise ValueError(f"need {k} weak responses containing the answer marker {MARKERS[task]!r} for ICL demos, "
                         f"found {found} of {len(weak_records)}")
    return demos
