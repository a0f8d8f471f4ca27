"""Task records, SFT targets, prompts, demos, the train_1/train_2 split and `w2s data` (w2s/tasks/).

Data-dependent tests read ../shared/data and are skipped without it; nothing here touches the network.

Run: python -m pytest -q tests/test_tasks.py
"""

import io
import json
import random
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from w2s.tasks import (
    STOP_STRINGS,
    fetch_data,
    few_shot_prompt,
    load_records,
    load_split,
    save_split,
    select_demos,
    split_train,
    stored_response,
    training_text,
    zero_shot_prompt,
)
from w2s.tasks import data as data_module
from w2s.tasks.data import DATA_FILES

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "gsm8k" / "train.jsonl").is_file(), reason="../shared/data not present")


# ---------------------------------------------------------------------------------------------------------------
# Records and targets
# ---------------------------------------------------------------------------------------------------------------


@needs_data
def test_gsm8k_records_and_targets():
    records = load_records("gsm8k", DATA / "gsm8k" / "train.jsonl")
    assert len(records) == 7473
    first = records[0]
    assert first["id"] == "gsm8k-train-00000"
    assert first["question"].startswith("Natalia sold clips to 48 of her friends")
    # docs/PAPER.md: the gold solution with calculator annotations removed, final line "#### N".
    assert first["solution"] == (
        "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.\n#### 72"
    )
    assert first["answer"] == "72"
    assert all("<<" not in r["solution"] and ">>" not in r["solution"] for r in records)
    assert all(r["solution"].rsplit("\n", 1)[-1] == f"#### {r['answer']}" for r in records)
    assert records[42]["id"] == "gsm8k-train-00042"
    assert load_records("gsm8k", DATA / "gsm8k" / "test.jsonl")[-1]["id"] == "gsm8k-test-01318"


@needs_data
def test_math500_records_and_targets():
    rows = [json.loads(line) for line in open(DATA / "math" / "test.jsonl", encoding="utf-8")]
    records = load_records("math", DATA / "math" / "test.jsonl")
    assert len(records) == 500
    for row, record in zip(rows, records):
        assert record["id"] == row["unique_id"]
        assert record["question"] == row["problem"]
        assert record["answer"] == row["answer"]
        # docs/PAPER.md: the gold solution + " The answer is: {answer}".
        assert record["solution"] == row["solution"] + " The answer is: " + row["answer"]
        assert record["level"] == row["level"] and record["subject"] == row["subject"]


@needs_data
def test_original_math_records_take_the_boxed_answer_and_parse_the_level():
    records = load_records("math", DATA / "math_hendrycks_test" / "test.jsonl")
    assert len(records) == 5000
    first = records[0]
    assert first["id"] == "math-test-00000"
    assert first["answer"] == "2"  # "... the graph has $\boxed{2}$ vertical asymptotes."
    assert first["level"] == 3 and first["subject"] == "Algebra"
    assert first["solution"].endswith("vertical asymptotes. The answer is: 2")
    assert {r["level"] for r in records} == {1, 2, 3, 4, 5}
    assert records[2]["answer"] == "\\dfrac{9}{7}"


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = _write(tmp_path / "train.jsonl", ['{"question": "q", "answer": "#### 1"}', "", '{"question": "q2", '])
    with pytest.raises(ValueError, match=r"train\.jsonl:3: not valid JSON"):
        load_records("gsm8k", path)


@pytest.mark.parametrize(
    "task,line,key",
    [
        ("gsm8k", '{"answer": "#### 1"}', "question"),
        ("gsm8k", '{"question": "q"}', "answer"),
        ("gsm8k", '{"question": "q", "answer": ""}', "answer"),
        ("math", '{"solution": "\\\\boxed{1}"}', "problem"),
        ("math", '{"problem": "p", "answer": "1"}', "solution"),
    ],
)
def test_missing_field_names_file_line_and_key(tmp_path, task, line, key):
    path = _write(tmp_path / "data.jsonl", ['{"question": "ok", "answer": "#### 1", "problem": "p", "solution": "x"}',
                                            line])  # fmt: skip
    with pytest.raises(ValueError, match=rf"data\.jsonl:2: expected key '{key}'"):
        load_records(task, path)


def test_answer_that_cannot_be_found_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"g\.jsonl:1: key 'answer' should end with a line '#### N'"):
        load_records("gsm8k", _write(tmp_path / "g.jsonl", ['{"question": "q", "answer": "it is 5"}']))
    with pytest.raises(ValueError, match=r"m\.jsonl:1: expected key 'answer' or a \\boxed"):
        load_records("math", _write(tmp_path / "m.jsonl", ['{"problem": "p", "solution": "it is 5"}']))


def test_other_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl: no such file"):
        load_records("gsm8k", tmp_path / "nowhere.jsonl")
    with pytest.raises(ValueError, match="expected a JSON object"):
        load_records("gsm8k", _write(tmp_path / "a.jsonl", ["[1, 2]"]))
    with pytest.raises(ValueError, match="duplicate id 'x'"):
        load_records("math", _write(tmp_path / "d.jsonl", ['{"problem": "p", "solution": "s", "answer": "1", '
                                                           '"unique_id": "x"}'] * 2))  # fmt: skip
    with pytest.raises(ValueError, match="unknown task"):
        load_records("olympiad", tmp_path / "a.jsonl")
    gsm8k_row = {"question": "q", "answer": "1 + 1 = 2\n#### 2"}
    with pytest.raises(ValueError, match=r"n\.jsonl:1: key 'id' must be a non-empty string or an integer, got None"):
        load_records("gsm8k", _write(tmp_path / "n.jsonl", [json.dumps({**gsm8k_row, "id": None})]))  # not "None"
    math_row = {"problem": "p", "solution": "s", "answer": "1"}
    with pytest.raises(ValueError, match=r"l\.jsonl:1: key 'level' should be 1 to 5 or 'Level N', got 9"):
        load_records("math", _write(tmp_path / "l.jsonl", [json.dumps({**math_row, "level": 9})]))
    bom = tmp_path / "bom.jsonl"  # an editor's byte-order mark is not part of the first line
    bom.write_bytes(b"\xef\xbb\xbf" + (json.dumps(gsm8k_row) + "\n").encode())
    assert load_records("gsm8k", bom)[0]["answer"] == "2"


# ---------------------------------------------------------------------------------------------------------------
# Prompts and demos (docs/PAPER.md "Prompt and targets")
# ---------------------------------------------------------------------------------------------------------------


def test_zero_shot_prompt_and_training_text():
    prompt = zero_shot_prompt("What is 2+3?")
    assert prompt == "Question: What is 2+3?\nAnswer:"
    assert training_text(prompt, "2+3 = 5\n#### 5") == "Question: What is 2+3?\nAnswer: 2+3 = 5\n#### 5"


def test_few_shot_prompt_format():
    demos = [{"question": f"q{i}", "response": f" r{i}\n#### {i}\n"} for i in range(4)]
    expected = (
        "Question: q0\nAnswer: r0\n#### 0\n\n"
        "Question: q1\nAnswer: r1\n#### 1\n\n"
        "Question: q2\nAnswer: r2\n#### 2\n\n"
        "Question: q3\nAnswer: r3\n#### 3\n\n"
        "Question: new\nAnswer:"
    )
    assert few_shot_prompt(demos, "new") == expected


def test_stop_strings():
    assert STOP_STRINGS == ["Question", "Answer"]


def test_select_demos_is_seeded_and_not_filtered_for_correctness():
    # Weak responses: ten with the marker (some answers wrong), ten without it, half of those with a number that the
    # lenient grader's last-number fall-back would read as an answer: never eligible (docs/PAPER.md).
    weak = [{"id": i, "question": f"q{i}", "response": f"so #### {i % 3}", "answer": "0"} for i in range(10)]
    weak += [{"id": 10 + i, "question": "q", "response": "I do not know" if i % 2 else f"it is {i}"} for i in range(10)]
    demos = select_demos(weak, "gsm8k", k=4, seed=1)
    assert len(demos) == 4 and len({d["id"] for d in demos}) == 4
    assert all("####" in d["response"] for d in demos)
    assert demos == select_demos(weak, "gsm8k", k=4, seed=1)
    picks = {tuple(d["id"] for d in select_demos(weak, "gsm8k", k=4, seed=s)) for s in range(20)}
    assert len(picks) > 1  # the seed matters
    everything = select_demos(weak, "gsm8k", k=10, seed=0)  # all eligible: wrong answers are kept
    assert {d["id"] for d in everything} == set(range(10))
    with pytest.raises(ValueError, match="need 11 weak responses containing the answer marker '####'"):
        select_demos(weak, "gsm8k", k=11, seed=0)


def test_stored_response_cleans_as_the_authors_inference_script():
    # src/inference.py: output.outputs[0].text.strip().strip(".") for GSM8K and MATH; src/inference_olympic.py keeps
    # the text (w2s strips its surrounding whitespace, for the prompt + " " + response join).
    assert stored_response(" She earned 10 dollars.\n#### 10.\n", "gsm8k") == "She earned 10 dollars.\n#### 10"
    assert stored_response("..5 is half of 10. The answer is: 5..", "math") == "5 is half of 10. The answer is: 5"
    assert stored_response(" 3.5. ", "gsm8k") == "3.5"  # only the ends: the decimal point stays
    assert stored_response(" So $\\boxed{3}$. \n", "olympicarena") == "So $\\boxed{3}$."


def test_select_demos_is_the_authors_draw():
    # get_few_shot_prompts (src/prompt/demonstrations.py): random.seed(42), random.shuffle over every weak response of
    # train_2 (marked or not), then the first 4 whose output contains the marker, in shuffled order.
    weak = [{"id": i, "question": f"q{i}", "response": f"#### {i}" if i % 3 else "no marker"} for i in range(50)]
    authors = list(weak)
    random.seed(42)
    random.shuffle(authors)
    expected = [d for d in authors if "####" in d["response"]][:4]
    assert select_demos(weak, "gsm8k") == expected  # seed 42 by default, as the recipes
    # The released Gemma-2B GSM8K demonstrations ("randomly selected") come from the 7,000 entries of
    # data/llama_factory/gsm8k/train_gsm8k_gemma_2b_full_weak.json: the shuffle puts entries 434 and 2772 first, whose
    # outputs are cut off before a "####", then 3401, 173, 354, 6272; the second and third released demonstrations
    # are entries 173 and 354, word for word.
    released = [{"id": i, "question": "q", "response": "cut off" if i in (434, 2772) else "#### 1"}
                for i in range(7000)]
    assert [d["id"] for d in select_demos(released, "gsm8k", k=4, seed=42)] == [3401, 173, 354, 6272]


@pytest.mark.parametrize("task,marker", [("gsm8k", "####"), ("math", "The answer is:")])
def test_select_demos_never_picks_a_response_without_the_marker(task, marker):
    # Unmarked responses that every grader but `paper` could read an answer from ("The answer is 5", a boxed value,
    # a bare number), and marked ones whose marker is not on the last line (no answer under `paper`): only the
    # marker decides.
    unmarked = ["The answer is 5.", "so $\\boxed{7}$", "3 + 4 = 7", "#### 9" if task == "math" else "The answer: 9"]
    marked = [f"{marker} 4", f"work\n{marker} 12", f"{marker} 3\nbut I kept talking", f"a {marker} b"]
    weak = [{"question": f"q{i}", "response": r} for i, r in enumerate(unmarked * 5 + marked * 2)]
    for seed in range(200):
        assert all(marker in d["response"] for d in select_demos(weak, task, k=4, seed=seed))
    assert {d["response"] for seed in range(200) for d in select_demos(weak, task, k=4, seed=seed)} == set(marked)


# ---------------------------------------------------------------------------------------------------------------
# train_1 / train_2
# ---------------------------------------------------------------------------------------------------------------


def _fake_records(n):
    return [{"id": f"r{i}", "question": f"q{i}", "solution": "s", "answer": "1"} for i in range(n)]


def test_split_train_default_is_seeded_half_and_half():
    records = _fake_records(11)
    train_1, train_2 = split_train(records, seed=0)
    assert (len(train_1), len(train_2)) == (5, 6)
    ids_1, ids_2 = [r["id"] for r in train_1], [r["id"] for r in train_2]
    assert set(ids_1).isdisjoint(ids_2) and set(ids_1) | set(ids_2) == {r["id"] for r in records}
    assert ids_1 == sorted(ids_1, key=lambda i: int(i[1:]))  # file order kept inside each half
    assert split_train(records, seed=0) == (train_1, train_2)
    assert split_train(records, seed=1) != (train_1, train_2)


def test_split_train_sizes():
    train_1, train_2 = split_train(_fake_records(20), seed=3, sizes=(7, 4))
    assert (len(train_1), len(train_2)) == (7, 4)
    assert {r["id"] for r in train_1}.isdisjoint(r["id"] for r in train_2)
    with pytest.raises(ValueError, match="do not fit in 20 records"):
        split_train(_fake_records(20), sizes=(15, 6))


def test_split_file_round_trip_and_errors(tmp_path):
    records = _fake_records(8)
    train_1, train_2 = split_train(records, seed=5)
    path = tmp_path / "split.json"
    save_split(path, train_1, train_2)
    assert load_split(path, records) == (train_1, train_2)

    path.write_text(json.dumps({"train_1": ["r0", "nope"], "train_2": ["r1"]}))
    with pytest.raises(ValueError, match=r"split\.json: 1 unknown ids in 'train_1', e\.g\. \['nope'\]"):
        load_split(path, records)
    path.write_text(json.dumps({"train_1": ["r0", "r1"], "train_2": ["r1"]}))
    with pytest.raises(ValueError, match="in both train_1 and train_2"):
        load_split(path, records)
    path.write_text(json.dumps({"train_1": ["r0"]}))
    with pytest.raises(ValueError, match="expected key 'train_2'"):
        load_split(path, records)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_split(path, records)


# ---------------------------------------------------------------------------------------------------------------
# `w2s data`
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to use the network")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_fetch_data_offline_says_which_file_to_put_where(tmp_path, no_network):
    lines = []
    missing = fetch_data(tmp_path, offline=True, log=lines.append)
    assert missing == [tmp_path / f.relpath for f in DATA_FILES]
    for file in DATA_FILES:
        dest = tmp_path / file.relpath
        assert any(f"download {file.url} and save it as {dest}" in line for line in lines)
    assert not any(tmp_path.iterdir())  # nothing half-written


@needs_data
def test_fetch_data_keeps_existing_files(tmp_path, no_network):
    (tmp_path / "gsm8k").mkdir()
    for name in ("train.jsonl", "test.jsonl"):
        (tmp_path / "gsm8k" / name).write_bytes((DATA / "gsm8k" / name).read_bytes())
    lines = []
    assert fetch_data(tmp_path, tasks=("gsm8k",), offline=True, log=lines.append) == []
    assert lines == [f"ok       {tmp_path / 'gsm8k' / n}" for n in ("train.jsonl", "test.jsonl")]


def test_fetch_data_failure_falls_back_to_the_instructions(tmp_path, monkeypatch):
    def unreachable(url, timeout):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(data_module.urllib.request, "urlopen", unreachable)
    lines = []
    missing = fetch_data(tmp_path, tasks=("math",), log=lines.append)
    assert missing == [tmp_path / "math" / "test.jsonl", tmp_path / "math" / "train.jsonl"]
    assert any("failed" in line and "no route to host" in line for line in lines)
    assert any(f"download {data_module.MATH500_TEST_URL} and save it as" in line for line in lines)
    assert not list(tmp_path.rglob("*.jsonl*"))


def test_fetch_data_writes_only_valid_downloads(tmp_path, monkeypatch):
    good = b'{"question": "q", "answer": "1 + 1 = 2\\n#### 2"}\n'
    served = {data_module.GSM8K_TRAIN_URL: good, data_module.GSM8K_TEST_URL: b"<html>rate limited</html>\n"}
    monkeypatch.setattr(data_module.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(served[url]))
    lines = []
    missing = fetch_data(tmp_path, tasks=("gsm8k",), log=lines.append)
    assert (tmp_path / "gsm8k" / "train.jsonl").read_bytes() == good
    assert missing == [tmp_path / "gsm8k" / "test.jsonl"]
    assert not (tmp_path / "gsm8k" / "test.jsonl").exists()
    assert not list(tmp_path.rglob("*.part"))


# ---------------------------------------------------------------------------------------------------------------
# The authors' split (their released data/raw/gsm8k/train_{1,2}.jsonl layout)
# ---------------------------------------------------------------------------------------------------------------


def _authors_row(qid, n):
    """A row as the authors released them: GSM8K's question / answer plus their id (gsm8k_<n> for GSM8K's own
    training questions, aug_<n> for the questions added from their Abel project)."""
    return {"id": qid, "question": f"Ann has {n} pens and buys {n} more. How many pens?",
            "answer": f"She has {n} + {n} = <<{n}+{n}={2 * n}>>{2 * n} pens.\n#### {2 * n}"}


def test_the_authors_split_runs_as_released(tmp_path):
    """import_split turns the two released files into a train file and a split file; a recipe naming them gets
    exactly those halves, with the authors' ids, from the pipeline's data stage."""
    from w2s.engine import Context
    from w2s.recipe import load_recipe
    from w2s.runners import run_data
    from w2s.tasks.data import import_split

    raw = tmp_path / "raw"
    raw.mkdir()
    halves = {"train_1": ["gsm8k_2", "gsm8k_3", "aug_62152"], "train_2": ["gsm8k_9", "aug_62153", "aug_62172", "aug_7"]}
    for name, ids in halves.items():
        rows = [_authors_row(q, i + 1) for i, q in enumerate(ids)]
        (raw / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "test.jsonl").write_text(json.dumps({"question": "q", "answer": "1 + 1 = 2\n#### 2"}) + "\n")
    train, split = import_split("gsm8k", raw / "train_1.jsonl", raw / "train_2.jsonl", tmp_path / "authors")
    assert json.loads(split.read_text()) == halves
    for name in ("weak", "strong"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    (tmp_path / "r.toml").write_text('[data]\ntask = "gsm8k"\ntrain = "authors/train.jsonl"\ntest = "test.jsonl"\n'
                                     'split_file = "authors/split.json"\n[models]\nweak = "weak"\nstrong = "strong"\n')
    out = tmp_path / "runs" / "00_data"
    out.mkdir(parents=True)
    counts = run_data(Context(load_recipe(tmp_path / "r.toml"), tmp_path / "runs"), out)
    assert counts == {"n_train_1": 3, "n_train_2": 4}  # the test set is 00_test's
    read = lambda f: [json.loads(line) for line in (out / f).read_text().splitlines()]  # noqa: E731
    assert [r["id"] for r in read("train_1.jsonl")] == halves["train_1"]
    assert [r["id"] for r in read("train_2.jsonl")] == halves["train_2"]
    assert read("train_1.jsonl")[0]["solution"] == "She has 1 + 1 = 2 pens.\n#### 2"  # annotations stripped
    assert [g["answer"] for g in read("train_2_gold.jsonl")] == ["2", "4", "6", "8"]
    with pytest.raises(ValueError, match="share 1 ids, e.g. \\['gsm8k_9'\\]"):
        (raw / "dup.jsonl").write_text(json.dumps(_authors_row("gsm8k_9", 5)) + "\n")
        import_split("gsm8k", raw / "train_2.jsonl", raw / "dup.jsonl", tmp_path / "bad")
    # Files without ids (openai's layout) keep the ids their rows were loaded with, and a U+2028 inside a string is
    # no line break: the merged file loads with the same records.
    for name, questions in (("a", ["Ann\u2028has 2?", "Bo?"]), ("b", ["Cy?"])):
        (raw / f"{name}.jsonl").write_text("".join(json.dumps({"question": q, "answer": "1 + 1 = 2\n#### 2"},
                                                              ensure_ascii=False) + "\n" for q in questions))
    train, split = import_split("gsm8k", raw / "a.jsonl", raw / "b.jsonl", tmp_path / "plain")
    merged = load_records("gsm8k", train)
    assert [r["question"] for r in merged] == ["Ann\u2028has 2?", "Bo?", "Cy?"]
    assert [r["id"] for r in merged] == [r["id"] for f in ("a", "b") for r in load_records("gsm8k", raw / f"{f}.jsonl")]


def test_split_refuses_repeated_ids_and_negative_sizes(tmp_path):
    # every id of a split file must exist, once; a size below zero fits no split
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train_1": ["r0", "r0"], "train_2": ["r1"]}))
    with pytest.raises(ValueError, match="'train_1' lists some ids more than once"):
        load_split(path, _fake_records(4))
    with pytest.raises(ValueError, match="do not fit in 4 records"):
        split_train(_fake_records(4), sizes=(-1, 3))


def test_import_split_copies_rows_verbatim(tmp_path):
    # The merged train file keeps each released row byte for byte (spacing, key order, escapes).
    from w2s.tasks.data import import_split

    rows = ['{"id":"gsm8k_1","question":"caf\\u00e9?","answer":"1 + 1 = 2\\n#### 2"}',
            '{"answer": "#### 3", "id": "aug_2", "question": "q?"}']  # fmt: skip
    (tmp_path / "a.jsonl").write_text(rows[0] + "\n")
    (tmp_path / "b.jsonl").write_text(rows[1] + "\n")
    train, _ = import_split("gsm8k", tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "out")
    assert train.read_text().splitlines() == rows


def test_gsm8k_rows_edge_cases(tmp_path):
    # docs/PAPER.md: every calculator annotation <<...>> is deleted, two on one line included; the gold answer is the
    # number after the LAST "####", which may be negative, comma-grouped or a decimal; anything else is refused.
    rows = [{"question": "q", "answer": "a <<1+1=2>>2 and <<2+2=4>>4 more\n#### 4"},
            {"question": "q", "answer": "so #### 1 was wrong\n#### -1,250.5"}]
    records = load_records("gsm8k", _write(tmp_path / "g.jsonl", [json.dumps(r) for r in rows]))
    assert records[0]["solution"] == "a 2 and 4 more\n#### 4"
    assert records[1]["answer"] == "-1,250.5"
    with pytest.raises(ValueError, match=r"b\.jsonl:1: key 'answer' should end with '#### N', N a number; got 'five'"):
        load_records("gsm8k", _write(tmp_path / "b.jsonl", [json.dumps({"question": "q", "answer": "#### five"})]))
    with pytest.raises(ValueError, match=r"e\.jsonl:1: key 'answer' has an empty final answer after '####'"):
        load_records("gsm8k", _write(tmp_path / "e.jsonl", [json.dumps({"question": "q", "answer": "2\n#### "})]))


@pytest.mark.parametrize("level, expected", [(1, 1), (5, 5), ("Level 2", 2), ("Level ?", None), (0, ValueError),
                                             (6, ValueError), ("Level 6", ValueError), (True, ValueError)])
def test_math_levels_are_one_to_five_or_unknown(tmp_path, level, expected):
    # MATH's levels are 1-5; the original dataset writes a few as "Level ?" (no level); a JSON true is no level.
    row = {"problem": "p", "solution": "s \\boxed{1}", "level": level, "type": "Algebra", "idx": 7}
    path = _write(tmp_path / "test.jsonl", [json.dumps(row)])
    if expected is ValueError:
        with pytest.raises(ValueError, match=r"test\.jsonl:1: key 'level' should be 1 to 5 or 'Level N'"):
            load_records("math", path)
    else:
        record = load_records("math", path)[0]
        # The original MATH's "idx" names the record, whatever its line.
        assert (record["level"], record["id"], record["answer"]) == (expected, "math-test-00007", "1")


def test_paper_is_the_default_grader_of_gsm8k_and_math():
    from w2s.tasks import get_grader

    # docs/PAPER.md "Graders": `paper` is the default for GSM8K and MATH.
    assert get_grader("gsm8k").name == "paper" and get_grader("math").name == "paper"
