"""LLaMA-Factory json in and out, the format of the paper's released training sets, so runs can be compared with them.

The released files are one json list per set (alpaca style in LLaMA-Factory's terms):

    SFT    [{"id", "instruction" | "content": prompt, "input": "", "output": response}, ...]
    pairs  [{"id", "instruction": prompt, "input": "", "output": [chosen, rejected]}, ...]   ("ranking": true)

The paper's SFT files name the prompt "content"; we write the standard "instruction" and read either. A non-empty
"input" is appended to the instruction after a newline, as LLaMA-Factory does. Our side of the exchange:

    export_sft(rows, path)     rows {"id", "prompt", "response"}          (w2s.stages.consistency.sft_sets)
    import_sft(path)           -> the same rows
    export_pairs(pairs, path)  pairs {"id", "prompt", "chosen", "rejected", ...}  (preference_pairs.build_pairs)
    import_pairs(path)         -> the same pairs (every other key, "kind", "weight", ..., survives)
    import_sft(path, records=train_2)   the authors' files: their ids are positions in train_2, mapped to its ids

A file without ids gets its list index as id; a repeated id is an error. Malformed files stop with one line naming
the file, the entry index and the missing or bad key.

Test: python -m pytest -q tests/test_interchange.py
"""

from __future__ import annotations

import json
from pathlib import Path

from w2s.files import write_atomic

PROMPT_KEYS = ("instruction", "content")  # preferred name first; "content" is what the paper's SFT files use
# A pair's keys beyond id/prompt/chosen/rejected (kind, confidence, weight, votes, ...) are written as they are and
# read back, so a round trip keeps the analysis data and the training weight; these are LLaMA-Factory's own.
LLAMA_FACTORY_KEYS = ("id", "instruction", "content", "input", "output", "system", "history")


def _write_json(path: str | Path, obj) -> None:
    """Write to a temp file, fsync and rename, so a killed export never leaves a half-written file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def _read_entries(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected a LLaMA-Factory json list)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid json at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a json list of entries, got {type(data).__name__}")
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}[{i}]: expected an object, got {type(entry).__name__}")
    return data


def _prompt(entry: dict, where: str) -> str:
    key = next((k for k in PROMPT_KEYS if k in entry), None)
    if key is None:
        raise ValueError(f"{where}: missing key 'instruction' (or 'content'), the prompt")
    prompt, extra = entry[key], entry.get("input") or ""
    if not isinstance(prompt, str) or not isinstance(extra, str):
        raise ValueError(f"{where}: keys {key!r} and 'input' must be strings")
    return "\n".join(part for part in (prompt, extra) if part)  # LLaMA-Factory joins the non-empty ones


def _check_keys(row: dict, keys: tuple, where: str) -> None:
    for key in keys:
        if key not in row:
            raise ValueError(f"{where}: missing key {key!r}")


# ---------------------------------------------------------------------------------------------------------------
# SFT
# ---------------------------------------------------------------------------------------------------------------


def export_sft(rows: list[dict], path: str | Path) -> None:
    """SFT rows {"id", "prompt", "response"} -> [{"id", "instruction", "input": "", "output"}]."""
    entries = []
    for i, row in enumerate(rows):
        _check_keys(row, ("id", "prompt", "response"), f"rows[{i}]")
        entries.append({"id": row["id"], "instruction": row["prompt"], "input": "", "output": row["response"]})
    _write_json(path, entries)


def _entry_ids(path, entries, records):
    """Each entry's id: its "id" (its index when it has none). The authors' released files number their entries by
    position in the train_2 file they were made from (data/process.py): with those records given, in file order, an
    integer id i is records[i]["id"]. A repeated id is an error."""
    ids, seen = [], {}
    for i, entry in enumerate(entries):
        key = entry.get("id", i)
        if records is not None:
            if not isinstance(key, int) or not 0 <= key < len(records):
                raise ValueError(f"{path}[{i}]: id {key!r} is not a position in the {len(records)} records given")
            key = records[key]["id"]
        if key in seen:
            raise ValueError(f"{path}[{i}]: id {key!r} repeats entry {seen[key]}")
        seen[key] = i
        ids.append(key)
    return ids


def import_sft(path: str | Path, records: list[dict] | None = None) -> list[dict]:
    """A LLaMA-Factory SFT file -> rows {"id", "prompt", "response"}; records: see _entry_ids."""
    rows = []
    entries = _read_entries(path)
    ids = _entry_ids(path, entries, records)
    for i, entry in enumerate(entries):
        where = f"{path}[{i}]"
        if "output" not in entry:
            raise ValueError(f"{where}: missing key 'output', the response")
        if not isinstance(entry["output"], str):
            raise ValueError(f"{where}: key 'output' must be a string (a list means a pairs file: use import_pairs)")
        rows.append({"id": ids[i], "prompt": _prompt(entry, where), "response": entry["output"]})
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Preference pairs
# ---------------------------------------------------------------------------------------------------------------


def export_pairs(pairs: list[dict], path: str | Path) -> None:
    """Pairs {"id", "prompt", "chosen", "rejected", ...} -> [{"id", "instruction", "input": "", "output": [c, r]}]."""
    entries = []
    for i, pair in enumerate(pairs):
        _check_keys(pair, ("id", "prompt", "chosen", "rejected"), f"pairs[{i}]")
        output = [pair["chosen"], pair["rejected"]]
        entry = {"id": pair["id"], "instruction": pair["prompt"], "input": "", "output": output}
        entry.update({k: v for k, v in pair.items() if k not in ("id", "prompt", "chosen", "rejected")})
        entries.append(entry)
    _write_json(path, entries)


def import_pairs(path: str | Path, records: list[dict] | None = None) -> list[dict]:
    """A LLaMA-Factory ranking file (output = [chosen, rejected]) -> pairs {"id", "prompt", "chosen", "rejected",
    and every other key the entry has}; records: see _entry_ids."""
    pairs = []
    entries = _read_entries(path)
    ids = _entry_ids(path, entries, records)
    for i, entry in enumerate(entries):
        where = f"{path}[{i}]"
        if "output" not in entry:
            raise ValueError(f"{where}: missing key 'output', the [chosen, rejected] list")
        output = entry["output"]
        if not (isinstance(output, list) and len(output) == 2 and all(isinstance(s, str) for s in output)):
            raise ValueError(f"{where}: key 'output' must be a list of two strings [chosen, rejected]")
        pair = {"id": ids[i], "prompt": _prompt(entry, where), "chosen": output[0], "rejected": output[1]}
        pair.update({k: v for k, v in entry.items() if k not in LLAMA_FACTORY_KEYS})
        pairs.append(pair)
    return pairs
