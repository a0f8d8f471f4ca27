"""OlympicArena (GAIR/OlympicArena): loading the benchmark's records, the paper's filter, prompt and stop strings.

docs/PAPER.md, "The forward-looking setting": no gold answer exists for any training question. The benchmark's `test`
split (answers hidden) is train_2; its `val` split (with answers) is the test set. The authors' loader
(src/inference_olympic.py in GAIR-NLP/weak-to-strong-reasoning) keeps, from the six subject configs Math, Physics,
Chemistry, Biology, Geography and Astronomy (never CS), the rows with language "EN" and an answer type other than
CODE and OT. It does not filter on modality: problems that show a figure stay, their text mentions "[figure1]".

A data file is jsonl with the dataset's own rows (what `w2s data olympicarena` writes; one file per split, the six
subjects concatenated). The fields read: id, problem, prompt, answer (list of strings; null or [] when hidden),
answer_type, unit, type_sequence, subject, language, modality. One record per kept row:

    {"id": "Physics_12", "question": problem, "prompt": the authors' zero-shot prompt, "answer": [..] or None,
     "answer_type": "NV", "type_sequence": [..], "unit": [..], "subject": "Physics", "language": "EN",
     "modality": "text-only"}

    records = load("data/olympicarena/val.jsonl")      # split from the file name: "val" must have answers
    prompt = records[0]["prompt"]                       # "...\\n\\nQuestion: <problem>...\\n\\nAnswer:"
    questions = load_questions("data/olympicarena/test.jsonl")   # train_2: any answer field dropped unread
    demos = select_demos(weak_labels, prompts, k=4, seed=0)     # [{"prompt", "response"}] for few_shot_prompt

The grader is w2s/tasks/olympic_judge.py (answer, gold, same).

Test: python -m pytest -q tests/test_olympicarena.py
"""

from __future__ import annotations

from pathlib import Path

from w2s.files import read_jsonl, require
from w2s.tasks.paper_protocol import draw_demos

NAME = "olympicarena"
HF_DATASET = "GAIR/OlympicArena"
SUBJECTS = ("Math", "Physics", "Chemistry", "Biology", "Geography", "Astronomy")  # the authors' order; no CS
ANSWER_TYPES = ("SC", "MC", "TF", "NV", "SET", "IN", "EX", "EQ", "TUP", "MPV", "MA", "OT", "CODE")
EXCLUDED_TYPES = ("CODE", "OT")  # code is run against tests, open text needs a human or model judge
LANGUAGE = "EN"
SPLITS = ("test", "val")  # test: train_2, answers hidden; val: the test set, with answers
# The model starting a new "Question" / "Answer" block has finished; EOS and <|eot_id|> are stop ids of the
# tokenizer (w2s.tokenizer stop_ids), not strings.
STOP_STRINGS = ["Question", "Answer"]
# What a demonstration must contain: the box the judge reads the answer from (the prompt asks for a last line "The
# final answer is $\\boxed{ANSWER}$"), as "####" / "The answer is:" for GSM8K / MATH (docs/PAPER.md).
ANSWER_MARKER = "\\boxed{"
GOLD_FIELDS = ("answer", "solution")  # what load_questions drops from a row before reading it

_PROBLEM_HEADER = "\n\nproblem:\n"


def make_prompt(dataset_prompt: str) -> str:
    """The authors' prompt: the dataset's own prompt with "problem:" renamed "Question: ", then "Answer:"."""
    return dataset_prompt.replace(_PROBLEM_HEADER, "\n\nQuestion: ") + "\n\nAnswer:"


def few_shot_prompt(demos: list[dict], record: dict) -> str:
    """Demonstrations {"prompt", "response"} before a record's prompt, laid out as the authors' released OlympicArena
    demonstrations (olympic_llama3_8b_instruct_icl in src/prompt/demonstrations.py): each block is prompt + " " +
    response, and two blank lines follow every block."""
    blocks = [f"{d['prompt']} {d['response'].strip()}" for d in demos]
    return "\n\n\n".join(blocks + [record["prompt"]])


def select_demos(weak_labels: list[dict], prompts: dict, k: int, seed: int) -> list[dict]:
    """k demonstrations {"prompt", "response"} drawn (seeded) from the weak model's own responses {"id", "response",
    "truncated"?} to train_2 questions, prompts = {id: the question's prompt}. Eligible: a response that contains
    ANSWER_MARKER and did not stop at the token limit (with 2,048-token responses, four cut-off ones would not fit
    Llama-3's 8,192 positions beside the question). Not checked for correctness, as for GSM8K and MATH."""
    def eligible(r):
        return ANSWER_MARKER in r["response"] and not r.get("truncated", False)

    demos = draw_demos(weak_labels, eligible, k, seed)  # the authors' draw, as for GSM8K and MATH
    if len(demos) < k:
        raise ValueError(f"need {k} weak responses containing {ANSWER_MARKER!r} (and not truncated) for ICL demos, "
                         f"found {sum(map(eligible, weak_labels))} of {len(weak_labels)}")
    return [{"prompt": prompts[r["id"]], "response": r["response"]} for r in demos]


def _answer_type(row: dict, where: str) -> str:
    value = require(row, "answer_type", where)
    parts = [p.strip() for p in value.split(",")]
    if not all(p in ANSWER_TYPES for p in parts):
        raise ValueError(f"{where}: key 'answer_type' has unknown answer type {value!r}; expected one of "
                         f"{', '.join(ANSWER_TYPES)}")  # fmt: skip
    return value


def _strings(row: dict, key: str, where: str, required: bool = False) -> list | None:
    """A list-of-strings field (null entries allowed, as the dataset writes a missing unit); None when null/empty."""
    value = row.get(key)
    if value is None or value == []:
        if required:
            raise ValueError(f"{where}: expected key {key!r} with a non-empty list of strings (missing or empty)")
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(v is None or isinstance(v, str) for v in value):
        raise ValueError(f"{where}: key {key!r} should be a list of strings, got {str(value)[:60]!r}")
    return value


def keep(row: dict, where: str) -> bool:
    """The authors' filter: one of the six subjects, English, not a CODE / OT question."""
    subject = require(row, "subject", where)
    language = require(row, "language", where)
    answer_type = _answer_type(row, where)
    return subject in SUBJECTS and language == LANGUAGE and answer_type not in EXCLUDED_TYPES


def make_record(row: dict, where: str, needs_answer: bool) -> dict:
    """One kept dataset row -> a record (see the module docstring)."""
    answers = _strings(row, "answer", where, required=needs_answer)
    if answers is not None and not all(isinstance(a, str) and a.strip() for a in answers):
        raise ValueError(f"{where}: key 'answer' has an empty entry: {answers!r}")
    type_sequence = _strings(row, "type_sequence", where) or []
    if not all(t in ANSWER_TYPES for t in type_sequence):
        raise ValueError(f"{where}: key 'type_sequence' has an unknown answer type: {type_sequence!r}")
    return {
        "id": require(row, "id", where),
        "question": require(row, "problem", where),
        "prompt": make_prompt(require(row, "prompt", where)),
        "answer": answers,
        "answer_type": _answer_type(row, where),
        "type_sequence": type_sequence,
        "unit": _strings(row, "unit", where) or [],
        "subject": row["subject"],
        "language": row["language"],
        "modality": require(row, "modality", where),
    }


def load_questions(path: str | Path) -> list[dict]:
    """Records of a train_2 file of the setting without gold ([data] train_2 of a recipe), without an "answer" key:
    the rows' gold fields (GOLD_FIELDS) are dropped before a row is read, so answers a file may hold never enter."""
    records = []
    for row in read_jsonl(path, tag_lines=True):
        row = {key: value for key, value in row.items() if key not in GOLD_FIELDS}
        if keep(row, row["_where"]):
            record = make_record(row, row["_where"], needs_answer=False)
            records.append({key: value for key, value in record.items() if key not in GOLD_FIELDS})
    return records


def load(path: str | Path, split: str | None = None) -> list[dict]:
    """Kept records of an OlympicArena jsonl file, in file order. split ("test" / "val") defaults to the file stem;
    in "val" every kept row must have its answer, in "test" answers are hidden (None)."""
    path = Path(path)
    split = split or path.stem
    records = []
    for row in read_jsonl(path, tag_lines=True):
        if keep(row, row["_where"]):
            records.append(make_record(row, row["_where"], needs_answer=split == "val"))
    return records
