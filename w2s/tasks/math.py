"""MATH (competition mathematics): loading the jsonl files and building SFT targets.

Two local formats are accepted, one record schema comes out:
- PRM800K / MATH-500 (math/test.jsonl): {"problem", "solution", "answer", "subject", "level": 1-5, "unique_id"}
- original Hendrycks MATH (math_hendrycks_test/test.jsonl): {"problem", "solution", "level": "Level 3", "type",
  "idx"}; no "answer" field, so the gold answer is the last \\boxed{...} of the solution.
docs/PAPER.md: the SFT target is the gold solution + " The answer is: {answer}".

    records = load("data/math/test.jsonl")   # [{"id", "question", "solution", "answer", "level", ...}]

Test: python -m pytest -q tests/test_tasks.py
"""

from __future__ import annotations

import re
from pathlib import Path

from w2s.files import read_jsonl, require, row_id
from w2s.tasks.grading import last_boxed

NAME = "math"
ANSWER_PREFIX = " The answer is: "


def make_target(solution: str, answer: str) -> str:
    return solution + ANSWER_PREFIX + answer


def _level(value, where: str) -> int | None:
    """1..5 from 5 or "Level 5"; None for the few "Level ?" rows of the original MATH."""
    level = None
    if isinstance(value, int) and not isinstance(value, bool):
        level = value
    elif isinstance(value, str) and (m := re.fullmatch(r"(?:Level\s*)?(\d+)", value.strip())):
        level = int(m.group(1))
    elif isinstance(value, str) and value.strip() in ("Level ?", "?"):
        return None
    if level is None or not 1 <= level <= 5:
        raise ValueError(f"{where}: key 'level' should be 1 to 5 or 'Level N', got {value!r}")
    return level


def make_record(row: dict, default_id: str, where: str) -> dict:
    """One raw MATH row -> {"id", "question", "solution" (SFT target), "answer", "level", "subject"}."""
    question = require(row, "problem", where)
    solution = require(row, "solution", where)
    if "answer" in row:
        answer = require(row, "answer", where)
    else:
        answer = last_boxed(solution)
        if not answer:
            raise ValueError(f"{where}: expected key 'answer' or a \\boxed{{...}} answer in key 'solution'")
    return {
        "id": row_id(row, "unique_id", default_id, where),
        "question": question,
        "solution": make_target(solution, answer),
        "answer": answer,
        "level": _level(row["level"], where) if "level" in row else None,
        "subject": row.get("subject", row.get("type")),
    }


def load(path: str | Path, split: str | None = None) -> list[dict]:
    """Records of a MATH jsonl file. Ids: the file's "unique_id" if present, else "math-{split}-{idx:05d}"."""
    path = Path(path)
    split = split or path.stem
    records = []
    for index, row in enumerate(read_jsonl(path, tag_lines=True)):
        idx = row.get("idx")
        idx = idx if isinstance(idx, int) else index
        records.append(make_record(row, f"{NAME}-{split}-{idx:05d}", row["_where"]))
    return records
