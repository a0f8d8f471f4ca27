"""GSM8K (grade-school math word problems): loading the jsonl files and building SFT targets.

Each line of openai/grade-school-math's train.jsonl / test.jsonl is {"question": ..., "answer": ...}, where "answer"
is a worked solution with calculator annotations like "48/2 = <<48/2=24>>24" and a final line "#### 72".
docs/PAPER.md: the SFT target is that solution with the annotations removed, keeping the final "#### N" line.

    records = load("data/gsm8k/train.jsonl")   # [{"id", "question", "solution", "answer"}, ...]

Test: python -m pytest -q tests/test_tasks.py
"""

from __future__ import annotations

import re
from pathlib import Path

from w2s.files import read_jsonl, require, row_id

NAME = "gsm8k"
_CALCULATOR = re.compile(r"<<[^<>]*>>")
# A gold final answer is a number: an integer or decimal, optionally negative, thousands optionally comma-grouped.
_GOLD_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def strip_calculator(solution: str) -> str:
    """'48/2 = <<48/2=24>>24 clips' -> '48/2 = 24 clips' (the annotations are a tool-use artifact, not reasoning)."""
    return _CALCULATOR.sub("", solution)


def make_record(row: dict, record_id: str, where: str) -> dict:
    """One raw GSM8K row -> {"id", "question", "solution" (SFT target), "answer" (gold final answer)}."""
    question = require(row, "question", where)
    raw_solution = require(row, "answer", where)
    if "####" not in raw_solution:
        raise ValueError(f"{where}: key 'answer' should end with a line '#### N' (the final answer)")
    answer = raw_solution.rsplit("####", 1)[1].strip()
    if not answer:
        raise ValueError(f"{where}: key 'answer' has an empty final answer after '####'")
    if not _GOLD_NUMBER.fullmatch(answer):  # every comparison (filters, accuracy) grades against a number
        raise ValueError(f"{where}: key 'answer' should end with '#### N', N a number; got {answer!r}"[:200])
    return {"id": record_id, "question": question, "solution": strip_calculator(raw_solution), "answer": answer}


def load(path: str | Path, split: str | None = None) -> list[dict]:
    """Records of a GSM8K jsonl file. Ids: the row's "id" when it has one (the authors' released split files use
    "gsm8k_<n>" / "aug_<n>"; the demo world's rows carry theirs), else "gsm8k-{split}-{line index:05d}", split
    defaulting to the file stem."""
    path = Path(path)
    split = split or path.stem
    return [
        make_record(row, row_id(row, "id", f"{NAME}-{split}-{index:05d}", row["_where"]), row["_where"])
        for index, row in enumerate(read_jsonl(path, tag_lines=True))
    ]
