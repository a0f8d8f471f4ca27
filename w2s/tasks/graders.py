"""Graders: how a final answer is read from a response and compared, by name (the recipe's `[data] grader`).

GSM8K and MATH have three (`paper` the default); OlympicArena has one, its own judge (w2s/tasks/olympic_judge.py,
named `olympicarena` here), whose comparison depends on the question's answer type.

    paper         the authors' protocol exactly (w2s/tasks/paper_protocol.py): last-line marker, the "The answer is"
                  first-number fall-back, no last-number fall-back, Minerva normalization, exact string equality
    equivalence   w2s's lenient grader (w2s/tasks/grading.py): last marker anywhere, last-number fall-back, a broader
                  normalizer, and for MATH sympy equivalence (bounded in time and size)
    math-verify   Hugging Face's Math-Verify (`pip install math-verify`, the `math-verify` extra): its own extraction,
                  normalization and verification; "available" only when the package is installed

The interface, the same for every grader and task judge:

    grader.name
    grader.answer(response, stored=False) -> str
                                       the normalized final answer of a model response, "" when it has none;
                                       stored=True: the response as tasks.stored_response keeps it (labels.jsonl),
                                       so the paper grader does not strip its "." a second time
    grader.gold(answer_text) -> str    the normalized gold answer of a dataset answer field, or of a full gold
                                       solution / SFT target (then the text after its last marker; gold texts are
                                       never cut at "Question", which some of them use as a word)
    grader.same(a, b, record=None)     two normalized answers are equal; "" never equals anything (not even "")

Question context. A judge may compare answers by the question's answer type (OlympicArena: numeric tolerance,
units, sets, intervals ...), so `same` takes the question's record as an optional third argument; the three graders
here ignore it. The stage functions (consistency filter, vote, pairs, accuracy, pass@k) take a plain
`same_answer(a, b)` and, for comparisons that depend on the question, `same_for(question_id) -> same_answer`;
`per_question(grader, records)` below builds the latter from a grader and the records the stage can see (train_2
questions for the filter and the pairs, the test records for evaluation).

Answers are computed where they are consumed (filter, pairs, evaluation), never stored by the generation stages, so
the sampling is grader-independent and a changed grader reruns only what compares answers.

    python -m pytest -q tests/test_graders.py
"""

from __future__ import annotations

import importlib.util
import threading
from functools import lru_cache

from w2s.tasks import grading
from w2s.tasks.paper_protocol import minerva_normalize, paper_extract

MARKERS = grading.ANSWER_MARKERS  # {"gsm8k": "####", "math": "The answer is:"}
GRADER_NAMES = ("paper", "equivalence", "math-verify")  # GSM8K's and MATH's
TASK_GRADERS = {"gsm8k": GRADER_NAMES, "math": GRADER_NAMES, "olympicarena": ("olympicarena",)}


def has_marker(response: str, task: str) -> bool:
    """Whether a response contains the task's answer marker anywhere (the demonstration rule of docs/PAPER.md)."""
    grading.check_task(task)
    return MARKERS[task] in response


def gold_text(text: str, task: str) -> str:
    """The gold answer part of a gold text: after the last marker of a full solution, else the whole text."""
    marker = MARKERS[task]
    return (text.rsplit(marker, 1)[1] if marker in text else text).strip()


class PaperGrader:
    name = "paper"

    def __init__(self, task: str):
        self.task, self.marker = task, MARKERS[task]

    def answer(self, response: str, stored: bool = False) -> str:
        return minerva_normalize(paper_extract(response, self.marker, stored))

    def gold(self, answer_text: str) -> str:
        return minerva_normalize(gold_text(answer_text, self.task))

    def same(self, a: str, b: str, record=None) -> bool:
        return a != "" and a == b


class EquivalenceGrader:
    name = "equivalence"

    def __init__(self, task: str):
        self.task = task

    def answer(self, response: str, stored: bool = False) -> str:  # its reading ignores "." at the ends either way
        return grading.final_answer(response, self.task)

    def gold(self, answer_text: str) -> str:
        return grading.normalize_answer(gold_text(answer_text, self.task))

    def same(self, a: str, b: str, record=None) -> bool:
        return grading.is_equiv(a, b, self.task)


class MathVerifyGrader:
    """Math-Verify on the response cut at the first "Question" (the model starting a new example, as every grader
    reads it). Our prompt format ends a solution with the marker and an undelimited answer ("The answer is:
    \\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"), which Math-Verify's extractor, made for $...$ and \\boxed{}, reads
    only in part; so the text after the last marker (to the end of its line) is handed to it as LaTeX first, and
    the whole response when that gives nothing. An answer is the string Math-Verify matched; two answers are
    compared by parsing both as LaTeX and calling its verify."""

    name = "math-verify"

    def __init__(self, task: str):
        self.task = task

    def answer(self, response: str, stored: bool = False) -> str:  # its reading ignores "." at the ends either way
        text, marker = response.split("Question", 1)[0], MARKERS[self.task]
        if marker in text:
            line = text.rsplit(marker, 1)[1].strip().split("\n", 1)[0].strip().rstrip(".").strip()
            if line and (found := _matched_string(_mv_parse(f"${line}$"))):
                return found
        return _matched_string(_mv_parse(text))

    def gold(self, answer_text: str) -> str:
        text = gold_text(answer_text, self.task)
        return _matched_string(_mv_parse(f"${text}$")) or text

    def same(self, a: str, b: str, record=None) -> bool:
        if a == "" or b == "":
            return False
        if a == b:
            return True
        from math_verify import verify

        gold, pred = _mv_parse(f"${b}$"), _mv_parse(f"${a}$")
        return bool(gold and pred and verify(list(gold), list(pred), timeout_seconds=_mv_timeout()))


def _mv_timeout():
    """Math-Verify bounds its work with signal.alarm, which only the main thread may set (every torchrun rank runs
    the pipeline in its main thread); elsewhere it would raise, so it runs unbounded there."""
    return 5 if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=1 << 16)
def _mv_parse(text: str) -> tuple:
    from math_verify import parse

    return tuple(parse(text, parsing_timeout=_mv_timeout()))


def _matched_string(parsed: tuple) -> str:
    """Math-Verify's parse gives [sympy object, matched string]; the string is the answer we store and compare."""
    return next((x for x in reversed(parsed) if isinstance(x, str)), "").strip()


class OlympicJudgeGrader:
    """OlympicArena's judge (w2s/tasks/olympic_judge.py) under this interface: its comparison needs the question's
    record (answer type, type sequence), which `per_question` binds; without one it judges as a single answer."""

    name = "olympicarena"

    def __init__(self, task: str):
        from w2s.tasks import olympic_judge

        self.task, self.judge = task, olympic_judge

    def answer(self, response: str, stored: bool = False) -> str:  # OlympicArena's stored text keeps its "."
        return self.judge.answer(response)

    def gold(self, answer_text) -> str:
        return self.judge.gold(answer_text)

    def same(self, a: str, b: str, record=None) -> bool:
        return self.judge.same(a, b, record or {})


_CLASSES = {"paper": PaperGrader, "equivalence": EquivalenceGrader, "math-verify": MathVerifyGrader,
            "olympicarena": OlympicJudgeGrader}


def task_graders(task: str) -> tuple[str, ...]:
    """Every grader a task has, its default first."""
    if task not in TASK_GRADERS:
        raise ValueError(f"unknown task {task!r}: expected one of {', '.join(TASK_GRADERS)}")
    return TASK_GRADERS[task]


def default_grader(task: str) -> str:
    return task_graders(task)[0]


def is_available(name: str) -> bool:
    return name != "math-verify" or importlib.util.find_spec("math_verify") is not None


def available_graders(task: str) -> tuple[str, ...]:
    """The graders of a task that can run here (math-verify only when installed), in task_graders order."""
    return tuple(name for name in task_graders(task) if is_available(name))


@lru_cache(maxsize=None)
def get_grader(task: str, name: str | None = None):
    """The grader `name` of a task (None: its default); a clear error for an unknown or uninstalled one."""
    name = name or default_grader(task)
    if name not in task_graders(task):
        raise ValueError(f"unknown grader {name!r} for {task}: expected one of {', '.join(task_graders(task))}")
    if not is_available(name):
        raise ValueError(f"grader {name!r} needs the math-verify package: pip install math-verify "
                         f"(or pip install -e '.[math-verify]')")
    return _CLASSES[name](task)


def per_question(grader, records: dict | None = None):
    """question id -> same_answer(a, b) with the question's record bound (None for an id not in records)."""
    records = records or {}
    return lambda qid: (lambda a, b: grader.same(a, b, records.get(qid)))
