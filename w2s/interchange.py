"""LLaMA-Factory json in and out, the format of the paper's released training sets, so runs can be compared with them.

The released files are one json list per set (alpaca style in LLaMA-Factory's terms):

    SFT    [{"id", "instruction" | "content": prompt, "input": "", "output": response}, ...]

The paper's SFT files name the prompt "content"; we write the standard "instruction" and read either. A non-empty
"input" is appended to the instruction after a newline, as LLaMA-Factory does (an empty part adds no newline).

Preference pairs come in three layouts; import_pairs tells them apart per file (one file, one layout, as one
dataset_info.json entry describes one file), export_pairs(..., layout=) writes any of them:

    "authors"   [{"id", "instruction", "input": "", "output": [chosen, rejected]}, ...]
                the paper's *_paired.json files (GAIR-NLP/weak-to-strong-reasoning data/llama_factory/), read as pairs
                by LLaMA-Factory's old llmtuner converter (src/llmtuner/data/aligner.py); the current converter
                (src/llamafactory/data/converter.py) takes pairs only from "chosen"/"rejected", so not from these
    "alpaca"    [{"id", "instruction", "input": "", "chosen": chosen, "rejected": rejected}, ...]
                current LLaMA-Factory, data/README.md "Alpaca Format / Preference Dataset"
    "sharegpt"  [{"id", "conversations": [{"from": "human", "value": prompt}],
                  "chosen": {"from": "gpt", "value": chosen}, "rejected": {"from": "gpt", "value": rejected}}, ...]
                current LLaMA-Factory, data/README.md "Sharegpt Format / Preference Dataset"

dataset_info_entry(file_name, layout) gives the dataset_info.json entry (ranking, formatting, columns) for each.

A row's or pair's prompt is one string, so what LLaMA-Factory would put elsewhere in the chat is refused, one line,
never dropped: a multi-turn sharegpt prompt (more than one message in "conversations"), an alpaca "history", a
system prompt ("system", or a leading "system" message), tools and media. Our side of the exchange:

    export_sft(rows, path)     rows {"id", "prompt", "response"}          (w2s.stages.consistency.sft_sets)
    import_sft(path)           -> the same rows
    export_pairs(pairs, path, layout="authors")  pairs {"id", "prompt", "chosen", "rejected", ...}  (build_pairs)
    import_pairs(path)         -> the same pairs (every other key, "kind", "weight", ..., survives), any layout
    import_sft(path, records=train_2)   the authors' files: their ids are positions in train_2, mapped to its ids

A file without ids gets its list index as id. An id may repeat: the rows of one question share it, in an SFT
file (a hybrid set holds a question's weak and ICL rows, as the authors' *_hybrid.json files do) and in a pairs
file (up to 3 pairs per question in MATH). Malformed files stop with one line naming
the file, the entry index and the missing or bad key.

Test: python -m pytest -q tests/test_interchange.py
"""

from __future__ import annotations

import json
from pathlib import Path

from w2s.data import pair_weight_problem
from w2s.files import read_json, write_atomic

PROMPT_KEYS = ("instruction", "content")  # preferred name first; "content" is what the paper's SFT files use
PAIR_KEYS = ("id", "prompt", "chosen", "rejected")
# Column names LLaMA-Factory reads itself (data/README.md). A pair's other keys (kind, confidence, weight, votes, ...)
# are written as they are and read back, so a round trip keeps the analysis data and the training weight; one of these
# names as such a key would be taken for the column, so export refuses it and import does not copy it.
LLAMA_FACTORY_KEYS = ("id", "instruction", "content", "input", "output", "chosen", "rejected", "conversations",
                      "system", "history", "tools", "images", "videos", "audios")
# What LLaMA-Factory hands to the chat template or a media plugin, besides the one prompt string a row or pair holds
# here: a set value is refused, since dropping it would train on a different example than the file describes.
UNREAD_KEYS = {"system": "a system prompt", "history": "earlier turns (a multi-turn prompt)", "tools": "tools",
               "images": "images", "videos": "videos", "audios": "audio"}
# The dataset_info.json entry for each pair layout: "authors" as in the authors' data/llama_factory/dataset_info.json,
# the other two as data/README.md of LLaMA-Factory documents them.
DATASET_INFO = {
    "authors": {"ranking": True, "columns": {"prompt": "instruction", "query": "input", "response": "output"}},
    "alpaca": {"ranking": True,
               "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}},
    "sharegpt": {"formatting": "sharegpt", "ranking": True,
                 "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
}
PAIR_LAYOUTS = tuple(DATASET_INFO)  # "authors" (the default), "alpaca", "sharegpt"


def _write_json(path: str | Path, obj) -> None:
    """Write to a temp file, fsync and rename, so a killed export never leaves a half-written file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def _read_entries(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected a LLaMA-Factory json list)")
    data = read_json(path, expected=list)
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}[{i}]: expected an object, got {type(entry).__name__}")
    return data


def _check_unread(entry: dict, where: str) -> None:
    for key, what in UNREAD_KEYS.items():
        if entry.get(key) not in (None, "", [], {}):
            raise ValueError(f"{where}: key {key!r} holds {what}, which a one-string prompt cannot carry; not read")


def _prompt(entry: dict, where: str) -> str:
    """The prompt of an alpaca-style entry (SFT, or pairs in the authors' or the alpaca layout)."""
    _check_unread(entry, where)
    key = next((k for k in PROMPT_KEYS if k in entry), None)
    if key is None:
        raise ValueError(f"{where}: missing key 'instruction' (or 'content'), the prompt")
    prompt, extra = entry[key], entry.get("input") or ""
    if not isinstance(prompt, str) or not isinstance(extra, str):
        raise ValueError(f"{where}: keys {key!r} and 'input' must be strings")
    return "\n".join(part for part in (prompt, extra) if part)  # LLaMA-Factory joins the non-empty ones


def _check_keys(row: dict, keys: tuple, where: str) -> None:
    """A row to export: an object with every key, an id that is a string or an integer, the other keys strings, so
    that this module's import reads back every file its export writes."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with the keys {', '.join(keys)}, got {type(row).__name__}")
    for key in keys:
        if key not in row:
            raise ValueError(f"{where}: missing key {key!r}")
        if key == "id":
            _check_id(row["id"], where)
        elif not isinstance(row[key], str):
            raise ValueError(f"{where}: key {key!r} must be a string, got {type(row[key]).__name__}")


def _check_id(key, where):
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise ValueError(f"{where}: id {key!r}: expected a string or an integer")


# ---------------------------------------------------------------------------------------------------------------
# SFT
# ---------------------------------------------------------------------------------------------------------------


def _check_weight(pair: dict, where: str) -> None:
    """A pair's optional "weight" is its loss weight in training (w2s/data.py): said here, not steps later."""
    if problem := pair_weight_problem(pair):
        raise ValueError(f"{where}: {problem}")


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
    integer id i is records[i]["id"]. The rows of one question share its id (hybrid SFT sets, several pairs)."""
    ids = []
    for i, entry in enumerate(entries):
        key = entry.get("id", i)
        _check_id(key, f"{path}[{i}]")
        if records is not None:
            if not isinstance(key, int) or not 0 <= key < len(records):
                raise ValueError(f"{path}[{i}]: id {key!r} is not a position in the {len(records)} records given")
            record = records[key]
            if not isinstance(record, dict) or "id" not in record:
                got = "an object without one" if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"records[{key}] (for {path}[{i}]): expected a train_2 row with an 'id', got {got}")
            key = record["id"]
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


def _is_message(message) -> bool:
    return isinstance(message, dict) and isinstance(message.get("from"), str) and isinstance(message.get("value"), str)


def _sharegpt_prompt(entry: dict, where: str) -> str:
    """LLaMA-Factory takes every message of "conversations" as the prompt turns (human first, an odd count; a leading
    "system" message is the system prompt). A pair's prompt is one string, so one human message is read; more turns
    are refused rather than flattened into a chat format that no model here was trained on."""
    _check_unread(entry, where)
    messages = entry["conversations"]
    if not isinstance(messages, list) or not all(_is_message(m) for m in messages):
        raise ValueError(f"{where}: key 'conversations' must be a list of messages {{\"from\", \"value\": text}}")
    if messages and messages[0]["from"] == "system":
        raise ValueError(f"{where}: key 'conversations' opens with a system message, which a one-string prompt "
                         "cannot carry; not read")
    if len(messages) != 1:
        raise ValueError(f"{where}: key 'conversations' holds {len(messages)} messages; only a single-turn prompt "
                         "(one 'human' message) is read, as a pair's prompt is one string")
    if messages[0]["from"] != "human":
        raise ValueError(f"{where}: key 'conversations' must hold a 'human' message, got {messages[0]['from']!r}")
    return messages[0]["value"]


def _sharegpt_answer(entry: dict, key: str, where: str) -> str:
    # LLaMA-Factory also takes a "function_call" message here; that is a tool call, not an answer to compare
    if not (_is_message(entry[key]) and entry[key]["from"] == "gpt"):
        raise ValueError(f"{where}: key {key!r} must be a message {{\"from\": \"gpt\", \"value\": text}}")
    return entry[key]["value"]


def _read_authors(entry: dict, where: str) -> tuple[str, str, str]:
    output = entry["output"]
    if not (isinstance(output, list) and len(output) == 2 and all(isinstance(s, str) for s in output)):
        raise ValueError(f"{where}: key 'output' must be a list of two strings [chosen, rejected]")
    return _prompt(entry, where), output[0], output[1]


def _read_alpaca(entry: dict, where: str) -> tuple[str, str, str]:
    for key in ("chosen", "rejected"):
        if not isinstance(entry[key], str):
            raise ValueError(f"{where}: key {key!r} must be a string (alpaca layout)")
    return _prompt(entry, where), entry["chosen"], entry["rejected"]


def _read_sharegpt(entry: dict, where: str) -> tuple[str, str, str]:
    prompt = _sharegpt_prompt(entry, where)
    return prompt, _sharegpt_answer(entry, "chosen", where), _sharegpt_answer(entry, "rejected", where)


def _write_authors(pair: dict) -> dict:
    return {"instruction": pair["prompt"], "input": "", "output": [pair["chosen"], pair["rejected"]]}


def _write_alpaca(pair: dict) -> dict:
    return {"instruction": pair["prompt"], "input": "", "chosen": pair["chosen"], "rejected": pair["rejected"]}


def _write_sharegpt(pair: dict) -> dict:
    return {"conversations": [{"from": "human", "value": pair["prompt"]}],
            "chosen": {"from": "gpt", "value": pair["chosen"]}, "rejected": {"from": "gpt", "value": pair["rejected"]}}


# layout -> (the keys that mark an entry as in it, the keys it needs, reader, writer). Checked in this order, since a
# sharegpt entry has "chosen" too; an entry with "chosen" and "output" is alpaca, as current LLaMA-Factory reads it.
LAYOUTS = {
    "sharegpt": (("conversations",), ("conversations", "chosen", "rejected"), _read_sharegpt, _write_sharegpt),
    "alpaca": (("chosen", "rejected"), ("chosen", "rejected"), _read_alpaca, _write_alpaca),
    "authors": (("output",), ("output",), _read_authors, _write_authors),
}


def _check_layout(layout: str) -> None:
    if layout not in PAIR_LAYOUTS:
        raise ValueError(f"layout {layout!r}: expected one of {', '.join(PAIR_LAYOUTS)}")


def _layout_of(entry: dict, where: str) -> tuple[str, str]:
    """The layout an entry is in and the key that says so; the layout's other keys must be there too."""
    for layout, (marks, needs, _, _) in LAYOUTS.items():
        mark = next((k for k in marks if k in entry), None)
        if mark is not None:
            missing = next((k for k in needs if k not in entry), None)
            if missing is not None:
                raise ValueError(f"{where}: missing key {missing!r} (key {mark!r} makes it the {layout} layout)")
            return layout, mark
    raise ValueError(f"{where}: missing key 'output', 'chosen' or 'conversations': not a preference pair in any "
                     "LLaMA-Factory layout")


def dataset_info_entry(file_name: str, layout: str = "authors") -> dict:
    """The dataset_info.json entry that tells LLaMA-Factory how to read a pairs file written in this layout."""
    _check_layout(layout)
    info = DATASET_INFO[layout]
    return {"file_name": file_name, **info, "columns": dict(info["columns"])}


def export_pairs(pairs: list[dict], path: str | Path, layout: str = "authors") -> None:
    """Pairs {"id", "prompt", "chosen", "rejected", ...} -> a LLaMA-Factory ranking file in `layout` (see the module
    docstring); the default is the authors' [chosen, rejected] "output", so their files and ours compare as they are."""
    _check_layout(layout)
    write = LAYOUTS[layout][3]
    entries = []
    for i, pair in enumerate(pairs):
        _check_keys(pair, PAIR_KEYS, f"pairs[{i}]")
        extras = {k: v for k, v in pair.items() if k not in PAIR_KEYS}
        clash = next((k for k in extras if k in LLAMA_FACTORY_KEYS), None)
        if clash is not None:
            raise ValueError(f"pairs[{i}]: key {clash!r} is a LLaMA-Factory column name; it would be read as one")
        _check_weight(pair, f"pairs[{i}]")
        entries.append({"id": pair["id"], **write(pair), **extras})
    _write_json(path, entries)


def import_pairs(path: str | Path, records: list[dict] | None = None) -> list[dict]:
    """A LLaMA-Factory ranking file in any of the three layouts -> pairs {"id", "prompt", "chosen", "rejected", and
    every other key the entry has}; records: see _entry_ids. The first entry fixes the file's layout: LLaMA-Factory
    reads a file with one dataset_info.json entry, so an entry in another layout is an error, not a second reading."""
    pairs = []
    entries = _read_entries(path)
    # a pair's id is its question's: build_pairs (max_pairs > 1) and the authors' MATH / OlympicArena *_paired.json
    # files hold up to 3 pairs per question under one id
    ids = _entry_ids(path, entries, records)
    layout = _layout_of(entries[0], f"{path}[0]")[0] if entries else "authors"
    read = LAYOUTS[layout][2]
    for i, entry in enumerate(entries):
        where = f"{path}[{i}]"
        found, mark = _layout_of(entry, where)
        if found != layout:
            raise ValueError(f"{where}: key {mark!r} makes it the {found} layout, but the file is in the {layout} "
                             "layout (entry 0)")
        prompt, chosen, rejected = read(entry, where)
        pair = {"id": ids[i], "prompt": prompt, "chosen": chosen, "rejected": rejected}
        pair.update({k: v for k, v in entry.items() if k not in LLAMA_FACTORY_KEYS})
        _check_weight(pair, where)
        pairs.append(pair)
    return pairs
