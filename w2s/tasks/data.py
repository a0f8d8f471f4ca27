"""Task data on disk: jsonl reading with clear errors, the train_1/train_2 split, and `w2s data` (download / explain).

Layout of a data directory (what `w2s data` writes):

    <data_dir>/gsm8k/train.jsonl, gsm8k/test.jsonl     openai/grade-school-math
    <data_dir>/math/test.jsonl                         MATH-500 (PRM800K test split)
    <data_dir>/math/train.jsonl                        PRM800K 12k MATH train split (for the MATH pipeline)
    <data_dir>/olympicarena/test.jsonl, val.jsonl      GAIR/OlympicArena rows of the six subjects (test = train_2,
                                                       answers hidden; val = the test set)

docs/PAPER.md: the gold train set is split in two halves; train_1 (questions + gold) trains the weak model, train_2 is
seen by the strong model as questions only. `split_train` makes a seeded split; `load_split` reads a user's own
split file {"train_1": [ids], "train_2": [ids]} and `save_split` writes one. `import_split` turns a split released
as two files (the authors' GSM8K `data/raw/gsm8k/train_1.jsonl` / `train_2.jsonl`, 7,000 questions each, ids
"gsm8k_<n>" / "aug_<n>") into the one train file and split file a recipe names ([data] train, split_file).

    records = load_records("gsm8k", "data/gsm8k/train.jsonl")
    train_1, train_2 = split_train(records, seed=0)            # default half / half
    import_split("gsm8k", "raw/train_1.jsonl", "raw/train_2.jsonl", "data/gsm8k-authors")  # -> train.jsonl, split.json
    fetch_data("data")                                         # what `w2s data` runs; offline=True only explains
    fetch_data("data", tasks=("olympicarena",))                # `w2s data olympicarena`

Test: python -m pytest -q tests/test_tasks.py   (never touches the network)
"""

from __future__ import annotations

import json
import os
import random
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from w2s.files import read_json, write_atomic
from w2s.tasks import gsm8k, math, olympicarena


def load_records(task: str, path: str | Path) -> list[dict]:
    """Records of a task file: {"id", "question", "solution", "answer"} (+ "level", "subject" for math; olympicarena:
    see w2s/tasks/olympicarena.py, no "solution", "answer" a list or None)."""
    loaders = {"gsm8k": gsm8k.load, "math": math.load, "olympicarena": olympicarena.load}
    if task not in loaders:
        raise ValueError(f"unknown task {task!r}: expected one of {', '.join(loaders)}")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file (run `w2s data` to download it, or see its message)")
    records = loaders[task](path)
    seen = set()
    for record in records:
        if record["id"] in seen:
            raise ValueError(f"{path}: duplicate id {record['id']!r}; ids must be unique")
        seen.add(record["id"])
    return records


# ----------------------------------------------------------------------------------------------------------------
# train_1 / train_2
# ----------------------------------------------------------------------------------------------------------------


def split_train(records: list[dict], seed: int = 0, sizes: tuple[int, int] | None = None) -> tuple[list, list]:
    """Seeded split into (train_1, train_2), each kept in file order. Default: half / half (train_2 gets the odd one).

    sizes=(n1, n2) takes n1 and n2 disjoint records (paper GSM8K: 7000 / 7000 from a train set extended with extra
    questions); n1 + n2 may be less than len(records), never more.
    """
    n = len(records)
    n1, n2 = sizes if sizes is not None else (n // 2, n - n // 2)
    if n1 < 0 or n2 < 0 or n1 + n2 > n:
        raise ValueError(f"split sizes {n1} + {n2} do not fit in {n} records")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    first, second = sorted(order[:n1]), sorted(order[n1 : n1 + n2])
    return [records[i] for i in first], [records[i] for i in second]


def load_split(path: str | Path, records: list[dict]) -> tuple[list, list]:
    """A user's split file {"train_1": [ids], "train_2": [ids]} applied to records; every id must exist, once."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: split file not found (expected JSON {{'train_1': [ids], 'train_2': [ids]}})")
    split = read_json(path)
    by_id = {record["id"]: record for record in records}
    halves = []
    for key in ("train_1", "train_2"):
        ids = split.get(key) if isinstance(split, dict) else None
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ValueError(f"{path}: expected key {key!r} with a list of record ids (strings)")
        unknown = [i for i in ids if i not in by_id]
        if unknown:
            raise ValueError(f"{path}: {len(unknown)} unknown ids in {key!r}, e.g. {unknown[:3]} (ids look like "
                             f"{next(iter(by_id), '?')!r})")  # fmt: skip
        if len(set(ids)) != len(ids):
            raise ValueError(f"{path}: {key!r} lists some ids more than once")
        halves.append(ids)
    overlap = set(halves[0]) & set(halves[1])
    if overlap:
        raise ValueError(f"{path}: {len(overlap)} ids are in both train_1 and train_2, e.g. {sorted(overlap)[:3]}")
    return [by_id[i] for i in halves[0]], [by_id[i] for i in halves[1]]


def save_split(path: str | Path, train_1: list[dict], train_2: list[dict]) -> None:
    """Write the split as ids, so a run can be reproduced or compared (load_split reads it back)."""
    split = {"train_1": [r["id"] for r in train_1], "train_2": [r["id"] for r in train_2]}
    write_atomic(path, json.dumps(split, indent=1) + "\n")


def import_split(task: str, train_1_path: str | Path, train_2_path: str | Path, out_dir: str | Path) -> tuple:
    """A split released as two files -> (out_dir/train.jsonl, out_dir/split.json) for a recipe's [data] train and
    split_file. The rows are copied verbatim (train_1's, then train_2's), so record ids are the files' own; both
    files must load as the task's records and share no id. Returns the two paths."""
    halves = [load_records(task, p) for p in (train_1_path, train_2_path)]
    overlap = {r["id"] for r in halves[0]} & {r["id"] for r in halves[1]}
    if overlap:
        raise ValueError(f"{train_1_path} and {train_2_path} share {len(overlap)} ids, e.g. {sorted(overlap)[:3]}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for path, records in zip((train_1_path, train_2_path), halves):
        # "\n" only: a U+2028 inside a JSON string is not a line break (str.splitlines would split the row there)
        rows = [line for line in Path(path).read_text(encoding="utf-8").split("\n") if line.strip()]
        for line, record in zip(rows, records, strict=True):
            row = json.loads(line)
            # a row without an id got one from its file's name; write it, so the merged file keeps it
            lines.append(line.rstrip("\r") if "id" in row else json.dumps({"id": record["id"], **row},
                                                                         ensure_ascii=False))
    files = (out_dir / "train.jsonl", out_dir / "split.json")
    try:
        write_atomic(files[0], "\n".join(lines) + "\n")
        save_split(files[1], *halves)
        load_split(files[1], load_records(task, files[0]))  # the recipe's path, checked now
    except Exception:
        for f in files:  # no half-made pair of files for a recipe to pick up
            f.unlink(missing_ok=True)
        raise
    return files


# ----------------------------------------------------------------------------------------------------------------
# `w2s data`: download the public files, or say exactly which file to put where
# ----------------------------------------------------------------------------------------------------------------

GSM8K_TRAIN_URL = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/train.jsonl"
GSM8K_TEST_URL = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/test.jsonl"
MATH500_TEST_URL = "https://huggingface.co/datasets/HuggingFaceH4/MATH-500/resolve/main/test.jsonl"
# PRM800K keeps its 12k MATH train split in Git LFS; GitHub serves LFS content from media.githubusercontent.com.
MATH_TRAIN_URL = "https://media.githubusercontent.com/media/openai/prm800k/main/prm800k/math_splits/train.jsonl"


@dataclass(frozen=True)
class DataFile:
    task: str
    relpath: str  # under the data directory
    url: str
    what: str


DATA_FILES = (
    DataFile("gsm8k", "gsm8k/train.jsonl", GSM8K_TRAIN_URL, "GSM8K train (7,473 problems)"),
    DataFile("gsm8k", "gsm8k/test.jsonl", GSM8K_TEST_URL, "GSM8K test (1,319 problems)"),
    DataFile("math", "math/test.jsonl", MATH500_TEST_URL, "MATH-500 test (500 problems)"),
    DataFile("math", "math/train.jsonl", MATH_TRAIN_URL, "PRM800K MATH train split (12,000 problems)"),
)


# OlympicArena is published as parquet files (one folder per subject config, splits test and val). The Hugging Face
# dataset viewer serves the same rows as JSON pages, which urllib reads without a parquet library; w2s writes them as
# jsonl, the dataset's own fields unchanged, the six subjects concatenated in the authors' order.
OLYMPIC_ROWS_URL = "https://datasets-server.huggingface.co/rows"
OLYMPIC_PAGE = 100  # the largest page the rows endpoint serves
OLYMPIC_FILES = (
    DataFile("olympicarena", "olympicarena/test.jsonl", OLYMPIC_ROWS_URL,
             "OlympicArena test split, answers hidden: train_2"),
    DataFile("olympicarena", "olympicarena/val.jsonl", OLYMPIC_ROWS_URL, "OlympicArena val split: the test set"),
)  # fmt: skip


def _olympic_page(subject: str, split: str, offset: int, length: int, timeout: float) -> dict:
    query = urllib.parse.urlencode({"dataset": olympicarena.HF_DATASET, "config": subject, "split": split,
                                    "offset": offset, "length": length})  # fmt: skip
    with urllib.request.urlopen(f"{OLYMPIC_ROWS_URL}?{query}", timeout=timeout) as response:
        page = json.loads(response.read())
    if not isinstance(page, dict) or not isinstance(page.get("rows"), list) or page.get("partial"):
        raise ValueError(f"{subject}/{split} offset {offset}: not a complete page of rows ({str(page)[:100]})")
    return page


def _olympic_rows(subject: str, split: str, timeout: float) -> list[dict]:
    """Every row of one subject config and split, page by page. The server cuts long cells in a large page
    (truncated_cells): such a page is fetched again in smaller pages, down to one row."""
    rows, offset, length, total = [], 0, OLYMPIC_PAGE, None
    while total is None or offset < total:
        page = _olympic_page(subject, split, offset, length, timeout)
        total = int(page["num_rows_total"])
        if any(item.get("truncated_cells") for item in page["rows"]):
            if length == 1:
                raise ValueError(f"{subject}/{split} row {offset}: the server cuts its long cells")
            length = max(1, length // 10)
            continue
        if not page["rows"] and offset < total:
            raise ValueError(f"{subject}/{split}: empty page at row {offset} of {total}")
        rows.extend(item["row"] for item in page["rows"])
        offset, length = offset + len(page["rows"]), OLYMPIC_PAGE
    return rows


def _download_olympic(file: DataFile, dest: Path, timeout: float) -> None:
    split = Path(file.relpath).stem
    rows = [row for subject in olympicarena.SUBJECTS for row in _olympic_rows(subject, split, timeout)]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    try:
        olympicarena.load(tmp, split=split)
    except ValueError as e:
        tmp.unlink()
        raise ValueError(f"fetched rows are not valid olympicarena records: {e}") from None
    os.replace(tmp, dest)


def _olympic_instructions(file: DataFile, dest: Path) -> str:
    split = Path(file.relpath).stem
    subjects = ", ".join(repr(s) for s in olympicarena.SUBJECTS)
    return (
        f"`w2s data olympicarena` builds it from {OLYMPIC_ROWS_URL}?dataset={olympicarena.HF_DATASET} "
        f'(JSON pages); or, where the `datasets` library reaches the hub, run python -c "from datasets import '
        f"load_dataset, concatenate_datasets as cat; cat([load_dataset('{olympicarena.HF_DATASET}', s, "
        f"split='{split}') for s in ({subjects})]).to_json('{split}.jsonl')\" and copy {split}.jsonl to {dest}"
    )


def _download(file: DataFile, dest: Path, timeout: float) -> None:
    """Fetch to a temporary file, check it loads as the task's records, then rename into place (never half-written)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    with urllib.request.urlopen(file.url, timeout=timeout) as response, tmp.open("wb") as out:
        while chunk := response.read(1 << 20):
            out.write(chunk)
    try:
        load_records(file.task, tmp)
    except ValueError as e:
        tmp.unlink()
        raise ValueError(f"downloaded file is not valid {file.task} jsonl: {e}") from None
    os.replace(tmp, dest)


def fetch_data(
    data_dir: str | Path,
    tasks: tuple[str, ...] = ("gsm8k", "math"),
    offline: bool = False,
    timeout: float = 60.0,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """What `w2s data` does: download every missing file of `tasks` into data_dir (unless offline) and, for each
    file still missing, log exactly which URL to save where. Returns the paths that are still missing."""
    data_dir = Path(data_dir)
    missing = []
    for file in DATA_FILES + OLYMPIC_FILES:
        if file.task not in tasks:
            continue
        dest = data_dir / file.relpath
        if dest.is_file():
            log(f"ok       {dest}")
            continue
        if not offline:
            try:
                (_download_olympic if file.task == "olympicarena" else _download)(file, dest, timeout)
                log(f"fetched  {dest}  ({file.what})")
                continue
            except Exception as e:  # no network, HTTP error, bad content: fall through to the instructions
                log(f"failed   {dest}: {type(e).__name__}: {e}")
        if file.task == "olympicarena":
            log(f"missing  {dest}  ({file.what}): {_olympic_instructions(file, dest)}")
        else:
            log(f"missing  {dest}  ({file.what}): download {file.url} and save it as {dest}")
        missing.append(dest)
    return missing
