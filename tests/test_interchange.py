"""LLaMA-Factory json import/export (w2s/interchange.py): round trips of SFT rows and preference pairs, the paper's
"content" spelling and the "input" field as LLaMA-Factory reads them, and one clear error per malformed file.

    python -m pytest -q tests/test_interchange.py
"""

import json

import pytest

from w2s.interchange import export_pairs, export_sft, import_pairs, import_sft

SFT_ROWS = [
    {"id": "gsm8k-train-00001", "prompt": "Question: Ann has 3 pens.\nAnswer:", "response": "3 + 2 = 5\n#### 5"},
    {"id": "gsm8k-train-00007", "prompt": "Question: ünïcode — 1/2?\nAnswer:", "response": "\\frac{1}{2} #### 0.5"},
]
PAIRS = [
    {"id": "q1", "prompt": "Question: a?\nAnswer:", "chosen": "good #### 4", "rejected": "bad #### 5",
     "kind": "weak_chosen", "confidence": 0.7, "chosen_answer": "4", "rejected_answer": "5"},
    {"id": "q2", "prompt": "Question: b?\nAnswer:", "chosen": "x #### 1", "rejected": "y #### 2"},
]


def test_sft_round_trip_and_file_layout(tmp_path):
    path = tmp_path / "sets" / "weak.json"
    export_sft(SFT_ROWS, path)
    on_disk = json.loads(path.read_text(encoding="utf-8"))
    # The alpaca layout LLaMA-Factory reads: instruction + empty input -> output.
    assert on_disk[0] == {"id": "gsm8k-train-00001", "instruction": SFT_ROWS[0]["prompt"], "input": "",
                          "output": SFT_ROWS[0]["response"]}
    assert "ünïcode" in path.read_text(encoding="utf-8")  # written as UTF-8, not \u escapes
    assert import_sft(path) == SFT_ROWS
    assert not list(path.parent.glob("*.tmp"))


def test_pairs_round_trip_keeps_analysis_keys(tmp_path):
    path = tmp_path / "pairs.json"
    export_pairs(PAIRS, path)
    on_disk = json.loads(path.read_text())
    assert on_disk[0]["output"] == ["good #### 4", "bad #### 5"]  # [chosen, rejected]
    assert on_disk[1].keys() == {"id", "instruction", "input", "output"}
    assert import_pairs(path) == PAIRS


def test_reads_the_papers_spelling(tmp_path):
    """The released SFT files call the prompt "content"; a non-empty "input" joins the prompt after a newline;
    a file without ids numbers its entries."""
    path = tmp_path / "released.json"
    path.write_text(json.dumps([{"content": "Question: q?\nAnswer:", "output": "r"},
                                {"instruction": "Solve:", "input": "2+2", "output": "4"}]))
    assert import_sft(path) == [{"id": 0, "prompt": "Question: q?\nAnswer:", "response": "r"},
                                {"id": 1, "prompt": "Solve:\n2+2", "response": "4"}]


def test_llama_factory_prompt_joining_extra_keys_and_the_authors_ids(tmp_path):
    """An empty or null instruction / input adds no newline (LLaMA-Factory joins only the non-empty parts); every
    pair key beyond the four survives a round trip (the training weight too); the authors' ids are positions in
    train_2; a repeated id is an error."""
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"instruction": "", "input": "Q", "output": "4"},
                                {"instruction": "P", "input": None, "output": "5"}]))
    assert [r["prompt"] for r in import_sft(path)] == ["Q", "P"]
    pairs = [{**PAIRS[1], "weight": 0.5, "chosen_votes": 7, "margin": 0.4}]
    export_pairs(pairs, tmp_path / "p.json")
    assert import_pairs(tmp_path / "p.json") == pairs
    records = [{"id": "gsm8k_0"}, {"id": "gsm8k_1"}, {"id": "gsm8k_5"}, {"id": "gsm8k_6"}]
    path.write_text(json.dumps([{"id": 3, "content": "Question: Albert?", "output": "r"}]))
    assert import_sft(path, records=records)[0]["id"] == "gsm8k_6"  # data/process.py numbers train_2's rows
    path.write_text(json.dumps([{"id": 1, "content": "a", "output": "r"}, {"content": "b", "output": "s"}]))
    with pytest.raises(ValueError, match=r"a\.json\[1\]: id 1 repeats entry 0"):
        import_sft(path)


@pytest.mark.parametrize("content, reader, message", [
    ("[{\"instruction\": \"a\", ", import_sft, r"bad\.json: invalid json at line 1"),
    ("{\"instruction\": \"a\"}", import_sft, r"bad\.json: expected a json list of entries, got dict"),
    ("[\"just a string\"]", import_sft, r"bad\.json\[0\]: expected an object, got str"),
    ("[{\"instruction\": \"a\", \"output\": \"b\"}, {\"output\": \"c\"}]", import_sft,
     r"bad\.json\[1\]: missing key 'instruction' \(or 'content'\)"),
    ("[{\"instruction\": \"a\"}]", import_sft, r"bad\.json\[0\]: missing key 'output'"),
    ("[{\"instruction\": \"a\", \"output\": [\"c\", \"r\"]}]", import_sft, r"a list means a pairs file"),
    ("[{\"instruction\": \"a\", \"output\": [\"only one\"]}]", import_pairs,
     r"bad\.json\[0\]: key 'output' must be a list of two strings"),
    ("[{\"instruction\": \"a\", \"output\": \"c\"}]", import_pairs, r"must be a list of two strings"),
    ("[{\"instruction\": 3, \"output\": [\"c\", \"r\"]}]", import_pairs, r"must be strings"),
])  # fmt: skip
def test_malformed_files_are_one_clear_error(tmp_path, content, reader, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        reader(path)
    assert "\n" not in str(info.value)


def test_missing_file_and_missing_row_keys(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.json: no such file"):
        import_pairs(tmp_path / "nope.json")
    with pytest.raises(ValueError, match=r"rows\[1\]: missing key 'response'"):
        export_sft([SFT_ROWS[0], {"id": 1, "prompt": "p"}], tmp_path / "x.json")
    with pytest.raises(ValueError, match=r"pairs\[0\]: missing key 'rejected'"):
        export_pairs([{"id": 1, "prompt": "p", "chosen": "c"}], tmp_path / "y.json")
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "y.json").exists()  # nothing half-written
