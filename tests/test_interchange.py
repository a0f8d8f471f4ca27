"""LLaMA-Factory json import/export (w2s/interchange.py): round trips of SFT rows and preference pairs (in the authors'
[chosen, rejected] layout and LLaMA-Factory's current alpaca and sharegpt chosen/rejected layouts), hand-written files
in each published layout, the paper's "content" spelling and the "input" field as LLaMA-Factory reads them, and one
clear error per malformed file.

    python -m pytest -q tests/test_interchange.py
"""

import json

import pytest

from w2s.interchange import PAIR_LAYOUTS, dataset_info_entry, export_pairs, export_sft, import_pairs, import_sft

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
    train_2, and their hybrid SFT files hold two rows per question under its id (weak and ICL: 0, 0, 1, 1, 3, 3 at
    the start of train_gsm8k_gemma_2b_iter1_hybrid.json), as w2s's own hybrid set does."""
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
    path.write_text(json.dumps([{"id": i, "content": f"Question: q{i}?", "output": f"{kind} #### {i}"}
                                for i in (0, 3) for kind in ("weak", "icl")]))
    hybrid = import_sft(path, records=records)  # it refused the released hybrid files ("id 0 repeats entry 0")
    assert [(r["id"], r["response"]) for r in hybrid] == [("gsm8k_0", "weak #### 0"), ("gsm8k_0", "icl #### 0"),
                                                          ("gsm8k_6", "weak #### 3"), ("gsm8k_6", "icl #### 3")]
    export_sft(hybrid, tmp_path / "hybrid.json")
    assert import_sft(tmp_path / "hybrid.json") == hybrid


@pytest.mark.parametrize("content, reader, message", [
    ("[{\"instruction\": \"a\", ", import_sft, r"bad\.json:1: not valid JSON"),
    ("{\"instruction\": \"a\"}", import_sft, r"bad\.json: expected a JSON list, got dict"),
    ("[\"just a string\"]", import_sft, r"bad\.json\[0\]: expected an object, got str"),
    ("[{\"instruction\": \"a\", \"output\": \"b\"}, {\"output\": \"c\"}]", import_sft,
     r"bad\.json\[1\]: missing key 'instruction' \(or 'content'\)"),
    ("[{\"instruction\": \"a\"}]", import_sft, r"bad\.json\[0\]: missing key 'output'"),
    ("[{\"instruction\": \"a\", \"output\": [\"c\", \"r\"]}]", import_sft, r"a list means a pairs file"),
    ("[{\"instruction\": \"a\", \"output\": \"b\", \"history\": [[\"q\", \"r\"]]}]", import_sft,
     r"bad\.json\[0\]: key 'history' holds earlier turns \(a multi-turn prompt\)"),
    ("[{\"instruction\": \"a\", \"output\": [\"only one\"]}]", import_pairs,
     r"bad\.json\[0\]: key 'output' must be a list of two strings"),
    ("[{\"instruction\": \"a\", \"output\": \"c\"}]", import_pairs, r"must be a list of two strings"),
    ("[{\"instruction\": 3, \"output\": [\"c\", \"r\"]}]", import_pairs, r"must be strings"),
    ("[{\"id\": [1], \"instruction\": \"a\", \"output\": \"b\"}]", import_sft,
     r"bad\.json\[0\]: id \[1\]: expected a string or an integer"),
    ("[{\"instruction\": \"a\", \"output\": [\"c\", \"r\"], \"weight\": \"0.5\"}]", import_pairs,
     r"bad\.json\[0\]: 'weight' must be a finite number >= 0, got '0\.5'"),
    ("[{\"instruction\": \"a\", \"output\": [\"c\", \"r\"], \"weight\": NaN}]", import_pairs,
     r"bad\.json\[0\]: 'weight' must be a finite number >= 0, got nan"),
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
    # values this module's own import refuses (None, a number) are refused on export too
    for rows, message in (([{"id": 1, "prompt": None, "response": "r"}], r"rows\[0\]: key 'prompt' must be a string"),
                          ([{"id": None, "prompt": "p", "response": "r"}], r"rows\[0\]: id None: expected a string"),
                          (["id prompt response"], r"rows\[0\]: expected an object with the keys")):
        with pytest.raises(ValueError, match=message):
            export_sft(rows, tmp_path / "x.json")
    with pytest.raises(ValueError, match=r"pairs\[0\]: key 'chosen' must be a string, got NoneType"):
        export_pairs([{"id": 1, "prompt": "p", "chosen": None, "rejected": "r"}], tmp_path / "y.json")
    with pytest.raises(ValueError, match=r"pairs\[0\]: 'weight' must be a finite number >= 0, got -1"):
        export_pairs([{"id": 1, "prompt": "p", "chosen": "c", "rejected": "r", "weight": -1}], tmp_path / "y.json")
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "y.json").exists()  # nothing half-written
    (tmp_path / "a.json").write_text(json.dumps([{"id": 1, "instruction": "p", "output": "r"}]))
    with pytest.raises(ValueError, match=r"^records\[1\] \(for .*a\.json\[0\]\): expected a train_2 row with an 'id', "
                                         r"got str$"):
        import_sft(tmp_path / "a.json", records=["gsm8k_0", "gsm8k_1"])


# ---------------------------------------------------------------------------------------------------------------
# The three preference layouts
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", PAIR_LAYOUTS)
def test_pairs_round_trip_in_every_layout(tmp_path, layout):
    path = tmp_path / f"{layout}.json"
    export_pairs(PAIRS, path, layout=layout)
    assert import_pairs(path) == PAIRS  # the layout is found from the file itself
    assert not list(tmp_path.glob("*.tmp"))


def test_the_current_layouts_on_disk(tmp_path):
    """What LLaMA-Factory's data/README.md documents for a preference set, alpaca and sharegpt; the default stays the
    authors' layout."""
    export_pairs(PAIRS, tmp_path / "alpaca.json", layout="alpaca")
    export_pairs(PAIRS, tmp_path / "sharegpt.json", layout="sharegpt")
    export_pairs(PAIRS, tmp_path / "default.json")
    alpaca = json.loads((tmp_path / "alpaca.json").read_text())
    sharegpt = json.loads((tmp_path / "sharegpt.json").read_text())
    assert alpaca[1] == {"id": "q2", "instruction": "Question: b?\nAnswer:", "input": "", "chosen": "x #### 1",
                         "rejected": "y #### 2"}
    assert sharegpt[1] == {"id": "q2", "conversations": [{"from": "human", "value": "Question: b?\nAnswer:"}],
                           "chosen": {"from": "gpt", "value": "x #### 1"},
                           "rejected": {"from": "gpt", "value": "y #### 2"}}
    assert sharegpt[0]["kind"] == "weak_chosen" and alpaca[0]["confidence"] == 0.7  # analysis keys ride along
    assert json.loads((tmp_path / "default.json").read_text())[1]["output"] == ["x #### 1", "y #### 2"]


def test_dataset_info_entries_name_the_columns_each_layout_uses():
    assert dataset_info_entry("pairs.json", "alpaca") == {
        "file_name": "pairs.json", "ranking": True,
        "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}}
    assert dataset_info_entry("pairs.json", "sharegpt") == {
        "file_name": "pairs.json", "formatting": "sharegpt", "ranking": True,
        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}}
    # as the authors' data/llama_factory/dataset_info.json registers their *_paired.json files
    assert dataset_info_entry("pairs.json") == {
        "file_name": "pairs.json", "ranking": True,
        "columns": {"prompt": "instruction", "query": "input", "response": "output"}}
    with pytest.raises(ValueError, match=r"layout 'openai': expected one of authors, alpaca, sharegpt"):
        dataset_info_entry("pairs.json", "openai")


# Written by hand from each published layout: the authors' *_paired.json files, and LLaMA-Factory's data/README.md
# preference examples (alpaca with a non-empty "input", which joins the instruction after a newline; sharegpt with one
# human turn). No ids: an entry's id is its index.
PUBLISHED = {
    "authors": [{"id": 13, "instruction": "Question: 8 sprinters, 3 medals: how many ways?\nAnswer:", "input": "",
                 "output": ["8*7*6 = 336. The answer is: 336", "3*2*1 = 6. The answer is: 6"]}],
    "alpaca": [{"instruction": "Solve for x.", "input": "2x + 3 = 7",
                "chosen": "2x = 4, so x = 2.", "rejected": "x = 5."}],
    "sharegpt": [{"conversations": [{"from": "human", "value": "What is 12 / 4?"}],
                  "chosen": {"from": "gpt", "value": "12 / 4 = 3."}, "rejected": {"from": "gpt", "value": "4."}}],
}
EXPECTED = {
    "authors": {"id": 13, "prompt": "Question: 8 sprinters, 3 medals: how many ways?\nAnswer:",
                "chosen": "8*7*6 = 336. The answer is: 336", "rejected": "3*2*1 = 6. The answer is: 6"},
    "alpaca": {"id": 0, "prompt": "Solve for x.\n2x + 3 = 7", "chosen": "2x = 4, so x = 2.", "rejected": "x = 5."},
    "sharegpt": {"id": 0, "prompt": "What is 12 / 4?", "chosen": "12 / 4 = 3.", "rejected": "4."},
}


@pytest.mark.parametrize("layout", PAIR_LAYOUTS)
def test_reads_a_hand_written_file_in_each_published_layout(tmp_path, layout):
    path = tmp_path / "published.json"
    path.write_text(json.dumps(PUBLISHED[layout], indent=2))
    assert import_pairs(path) == [EXPECTED[layout]]


# The multi-turn sharegpt example of LLaMA-Factory's data/README.md (human, gpt, human; then chosen / rejected)
MULTI_TURN = {"conversations": [{"from": "human", "value": "What is 2 + 2?"}, {"from": "gpt", "value": "4."},
                                {"from": "human", "value": "And times 3?"}],
              "chosen": {"from": "gpt", "value": "12."}, "rejected": {"from": "gpt", "value": "10."}}
ONE_TURN = PUBLISHED["sharegpt"][0]
ALPACA = PUBLISHED["alpaca"][0]


@pytest.mark.parametrize("entries, message", [
    # what a one-string prompt cannot carry is refused, never dropped
    ([ONE_TURN, MULTI_TURN], r"pairs\.json\[1\]: key 'conversations' holds 3 messages; only a single-turn prompt"),
    ([{**ALPACA, "history": [["What is 2 + 2?", "4."]]}], r"pairs\.json\[0\]: key 'history' holds earlier turns"),
    ([{**ALPACA, "system": "You are a tutor."}], r"\[0\]: key 'system' holds a system prompt"),
    ([{**ONE_TURN, "conversations": [{"from": "system", "value": "Be brief."}, *ONE_TURN["conversations"]]}],
     r"\[0\]: key 'conversations' opens with a system message"),
    ([{**ONE_TURN, "conversations": [{"from": "gpt", "value": "hi"}]}], r"must hold a 'human' message, got 'gpt'"),
    ([{**ONE_TURN, "conversations": [{"from": "human"}]}], r"\[0\]: key 'conversations' must be a list of messages"),
    # malformed entries of the current layouts
    ([{**ALPACA, "chosen": ["a", "b"]}], r"pairs\.json\[0\]: key 'chosen' must be a string \(alpaca layout\)"),
    ([{"instruction": "p", "chosen": "c"}], r"\[0\]: missing key 'rejected' \(key 'chosen' makes it the alpaca"),
    ([{**ONE_TURN, "rejected": "4."}], r"\[0\]: key 'rejected' must be a message \{\"from\": \"gpt\""),
    ([{**ONE_TURN, "chosen": {"from": "human", "value": "3"}}], r"\[0\]: key 'chosen' must be a message"),
    ([{"conversations": ONE_TURN["conversations"]}], r"\[0\]: missing key 'chosen' \(key 'conversations' makes"),
    ([{"instruction": "p", "input": ""}], r"\[0\]: missing key 'output', 'chosen' or 'conversations'"),
    # one file, one layout: the first entry decides
    ([ALPACA, ONE_TURN], r"\[1\]: key 'conversations' makes it the sharegpt layout, but the file is in the alpaca"),
    ([PUBLISHED["authors"][0], ALPACA], r"\[1\]: key 'chosen' makes it the alpaca layout, but the file is in the auth"),
])  # fmt: skip
def test_current_layouts_refuse_what_they_cannot_read_in_one_line(tmp_path, entries, message):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=message) as info:
        import_pairs(path)
    assert "\n" not in str(info.value)


def test_export_refuses_an_unknown_layout_and_a_key_llama_factory_would_read(tmp_path):
    with pytest.raises(ValueError, match=r"layout 'openai': expected one of"):
        export_pairs(PAIRS, tmp_path / "a.json", layout="openai")
    with pytest.raises(ValueError, match=r"pairs\[0\]: key 'system' is a LLaMA-Factory column name"):
        export_pairs([{**PAIRS[1], "system": "Be brief."}], tmp_path / "b.json", layout="alpaca")
    assert not (tmp_path / "a.json").exists() and not (tmp_path / "b.json").exists()


def test_pairs_of_one_question_share_its_id(tmp_path):
    """Up to 3 pairs per question (MATH, OlympicArena) carry the question's id, in build_pairs and in the authors'
    *_paired.json files alike (their ids repeat: 0, 0, 0, 13, ...): a pairs file may repeat an id, as an SFT file
    may (test_llama_factory_prompt_joining_extra_keys_and_the_authors_ids)."""
    three = [{**PAIRS[1], "chosen": f"x{k} #### 1"} for k in range(3)]
    for layout in PAIR_LAYOUTS:
        export_pairs(three, tmp_path / f"{layout}.json", layout=layout)
        assert import_pairs(tmp_path / f"{layout}.json") == three
    path = tmp_path / "paired.json"
    path.write_text(json.dumps([{**PUBLISHED["authors"][0], "id": 1}, {**PUBLISHED["authors"][0], "id": 1},
                                {**PUBLISHED["authors"][0], "id": 0}]))
    records = [{"id": "math_4"}, {"id": "math_9"}]
    assert [p["id"] for p in import_pairs(path, records=records)] == ["math_9", "math_9", "math_4"]


def test_prompt_key_preference_empty_chat_keys_and_ids(tmp_path):
    """The prompt is "instruction" when "content" is there too (the preferred name first); an empty history or
    system prompt carries nothing, so it is read; an id is a string or an integer, never a boolean, and a position
    in the records given is never negative."""
    path = tmp_path / "sft.json"
    path.write_text(json.dumps([{"instruction": "a", "content": "b", "output": "r", "history": [], "system": ""}]))
    assert import_sft(path) == [{"id": 0, "prompt": "a", "response": "r"}]
    path.write_text(json.dumps([{"id": True, "instruction": "a", "output": "r"}]))
    with pytest.raises(ValueError, match=r"sft\.json\[0\]: id True: expected a string or an integer"):
        import_sft(path)
    with pytest.raises(ValueError, match=r"rows\[0\]: id True: expected a string or an integer"):
        export_sft([{**SFT_ROWS[0], "id": True}], tmp_path / "out.json")
    path.write_text(json.dumps([{"id": -1, "instruction": "a", "output": "r"}]))
    with pytest.raises(ValueError, match=r"id -1 is not a position in the 2 records given"):
        import_sft(path, records=[{"id": "q0"}, {"id": "q1"}])
