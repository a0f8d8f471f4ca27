"""The setting without gold (docs/PAPER.md, "The forward-looking setting: OlympicArena"): the pipeline end to end on
tiny models with a train_2 file that has no answer field at all, no reader of train_2 gold, no ceiling, no
precision, a report without PGR; the weak model used as is, in its chat template on request; the recipe form and its
one-line errors; the shipped recipes; the miniature's OlympicArena-layout data (w2s/world.py, demo/olympic/).

The tiny world: OlympicArena-layout rows of the demo world (three answer types, w2s/world.py), a tokenizer trained on
them, and two random Llama-shaped models (dim 48, 2 layers) taught a habit: end with "The final answer is
$\\boxed{3}$" (70 %) or "$\\boxed{5}$" (30 %) whatever the question, zero-shot and after demonstrations in the
OlympicArena few-shot layout. So the weak and ICL labels agree (Stage I keeps questions) and M_plus's samples
sometimes disagree (Stage II finds pairs), without learning anything.

    python -m pytest -q tests/test_nogold.py
"""

import json
import random
import re
import sys
from pathlib import Path

import pytest
import torch

from w2s import world
from w2s.tasks import olympic_judge, olympicarena

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["00_data", "00_test", "02_weak_labels", "03_icl_labels", "04_r1_filter", "05_r1_sft_weak", "06_r1_sft_icl",
          "07_r1_sft_hybrid", "08_r2_labels_weak", "09_r2_labels_icl", "10_r2_filter", "11_r2_sft_weak",
          "12_r2_sft_icl", "13_r2_sft_hybrid", "14_samples", "15_pairs", "16_dpo", "18_full_weak_ft",
          "20_eval_weak_floor", "21_eval_full_weak_ft", "22_eval_stage1_r1_weak", "23_eval_stage1_r1_icl",
          "24_eval_stage1_r1_hybrid", "25_eval_stage1_r2_weak", "26_eval_stage1_r2_icl", "27_eval_stage1_r2_hybrid",
          "28_eval_stage2_dpo", "31_eval_strong_icl"]

RECIPE = """
name = "{name}"

[data]
task = "olympicarena"
train_2 = "train_2.jsonl"
test = "val.jsonl"

[models]
weak = "weak"
strong = "strong"
dtype = "float32"
device = "cpu"
{models}

[sampling]
max_new_tokens = 16
sample_max_new_tokens = 16

[strong_sft]
lr = 1e-3
max_steps = 2
batch_size = 8
micro_batch_size = 8

[stage2]
n_samples = 4
max_pairs = 3
losses = ["dpo"]

[preference]
lr = 1e-3
max_steps = 2
batch_size = 4
micro_batch_size = 4
"""


def write_jsonl(path, rows):
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def habit(rng):
    return f"The final answer is $\\boxed{{{3 if rng.random() < 0.7 else 5}}}$"


def _habit_model(path, tokenizer, prompts, seed):
    """A random dim-48 Llama taught to end any OlympicArena prompt with a boxed 3 or 5 (7:3), saved in HF format."""
    from w2s.checkpoint import save_model
    from w2s.config import ModelConfig
    from w2s.model import Transformer
    from w2s.train import TrainConfig, train_sft

    cfg = ModelConfig(family="llama", vocab_size=512, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=12,
                      hidden_dim=96, max_seq_len=512, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    model = Transformer(cfg).init_weights(generator=torch.Generator().manual_seed(seed))
    rng = random.Random(seed)
    rows = [{"prompt": p, "response": habit(rng)} for p in prompts for _ in range(2)]
    rows += [{"prompt": olympicarena.few_shot_prompt([{"prompt": rng.choice(prompts), "response": habit(rng)}
                                                      for _ in range(4)], {"prompt": p}), "response": habit(rng)}
             for p in prompts]
    train_cfg = TrainConfig(lr=1e-2, max_steps=80, batch_size=32, micro_batch_size=32, progress=False, log_every=1000)
    save_model(train_sft(model, tokenizer, rows, train_cfg), path, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def olympic_world(tmp_path_factory):
    """train_2.jsonl (OlympicArena layout, NO answer or solution field), val.jsonl (with answers), the two habit
    models, in one directory."""
    from w2s.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("olympic")
    splits = world.make_olympic_splits(0, {"train_2": 12, "val": 6})
    write_jsonl(root / "train_2.jsonl", world.without_gold(splits["train_2"]))
    write_jsonl(root / "val.jsonl", splits["val"])
    prompts = [olympicarena.make_prompt(r["prompt"]) for rows in splits.values() for r in rows]
    world.train_world_tokenizer(prompts + [habit(random.Random(i)) for i in range(20)], root / "tokenizer",
                                vocab_size=512)
    tokenizer = load_tokenizer(root / "tokenizer")
    _habit_model(root / "weak", tokenizer, prompts, seed=0)
    _habit_model(root / "strong", tokenizer, prompts, seed=1)
    return root


def write_recipe(root, name, models=""):
    path = root / f"{name}.toml"
    path.write_text(RECIPE.format(name=name, models=models))
    return path


def meta(run_dir, stage):
    return json.loads((Path(run_dir) / stage / "meta.json").read_text())


def jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def run(olympic_world, tmp_path_factory):
    """One run of the whole pipeline without gold, recording every call that could read train_2 gold."""
    import w2s.runners as runners
    from w2s.pipeline import run_pipeline

    calls = []

    def spy(name):
        def reader(ctx, *args):
            calls.append((name, ctx.stage))
            raise AssertionError(f"{name} called by {ctx.stage} in the setting without gold")
        return reader

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runners, "read_train_2_gold", spy("read_train_2_gold"))
        mp.setattr(runners, "gold_precision", spy("gold_precision"))
        run_dir, status, text = run_pipeline(write_recipe(olympic_world, "nogold"), runs_dir=tmp_path_factory.mktemp(
            "runs"), progress=False, log=lambda *a: None, plot=False)
    return {"run_dir": run_dir, "status": status, "report": text, "calls": calls}


# ---------------------------------------------------------------------------------------------------- end to end


def test_pipeline_without_gold_runs_end_to_end_and_reads_no_gold(run, olympic_world):
    run_dir = run["run_dir"]
    assert run["status"] == {name: "ran" for name in STAGES}  # no 01_weak_sft, no 19_ceiling, no 30_eval_ceiling
    assert run["calls"] == []
    assert not any("answer" in row or "solution" in row for row in jsonl(olympic_world / "train_2.jsonl"))
    assert not (run_dir / "00_data" / "train_2_gold.jsonl").exists()
    assert sorted(p.name for p in (run_dir / "00_data").iterdir()) == ["key.txt", "meta.json", "train_2.jsonl"]
    questions = jsonl(run_dir / "00_data" / "train_2.jsonl")
    assert len(questions) == 12 and not any("answer" in q for q in questions)
    assert meta(run_dir, "00_data")["n_train_1"] == 0
    assert "precision" not in meta(run_dir, "04_r1_filter") and "precision" not in meta(run_dir, "10_r2_filter")
    assert meta(run_dir, "04_r1_filter")["n_kept"] > 0 and meta(run_dir, "15_pairs")["n_pairs"] > 0
    assert not [k for k in meta(run_dir, "15_pairs") if "precision" in k]


def test_the_weak_model_is_used_as_is_with_the_tasks_prompts(run, olympic_world):
    """The weak checkpoint itself labels train_2 and is the weak model evaluated, with the authors' plain prompt;
    the ICL prompts follow OlympicArena's few-shot layout; every SFT row and pair has the question's own prompt."""
    run_dir = run["run_dir"]
    prompts = {q["id"]: q["prompt"] for q in jsonl(run_dir / "00_data" / "train_2.jsonl")}
    assert all(g["prompt"] == prompts[g["id"]] for g in jsonl(run_dir / "02_weak_labels" / "generations.jsonl"))
    for stage in ("02_weak_labels", "20_eval_weak_floor"):
        m = meta(run_dir, stage)
        assert "01_weak_sft" not in m["inputs"] and m["options"]["prompt"] == "zero_shot" and "weak" in m["options"]
    icl = jsonl(run_dir / "03_icl_labels" / "generations.jsonl")
    weak = {w["id"]: w["response"] for w in jsonl(run_dir / "02_weak_labels" / "labels.jsonl")}
    for g in icl:
        *blocks, last = g["prompt"].split("\n\n\n")
        assert len(blocks) == 4 and last == prompts[g["id"]]
        assert all(any(b == f"{p} {weak[i]}" for i, p in prompts.items()) for b in blocks)
    for stage, field in (("05_r1_sft_weak", "prompt"), ("18_full_weak_ft", "prompt"), ("16_dpo", "prompt")):
        rows = jsonl(run_dir / stage / "train.jsonl")
        assert rows and all(row[field] == prompts[row["id"]] for row in rows), stage


def test_report_without_gold_compares_with_the_weak_model(run):
    text = run["report"]
    assert "No PGR" in text and "no strong ceiling" in text and "| vs weak" in text
    assert "weak model (as is)" in text and "ceiling (gold" not in text
    assert "| PGR" not in text and "precision %" not in text and "(no gold: no precision)" in text
    rows = {}  # first cell -> the other cells of its first row (the headline table comes first)
    for line in text.splitlines():
        if line.startswith("| "):
            rows.setdefault(line.split("|")[1].strip(), [c.strip() for c in line.split("|")[2:-1]])
    assert rows["weak model (as is)"][1] == "+0.00"
    for label in ("full weak fine-tuning", "strong ICL (4-shot weak demos)", "Stage I r1: hybrid-ft",
                  "Stage I r2: hybrid-ft (M_plus)", "Stage II: DPO (M_pro)"):
        accuracy, versus = rows[label]
        assert versus == f"{float(accuracy) - float(rows['weak model (as is)'][0]):+.2f}", label


def test_weak_chat_template_prompts_the_weak_model_in_its_template(olympic_world, tmp_path):
    """[models] weak_chat_template = true: the weak labels' prompts are the chat template's rendering of the task's
    prompt (without its "Answer:" cue), as token ids with one BOS; the strong model's prompts stay plain."""
    import shutil

    from w2s.engine import Context, run_stages
    from w2s.pipeline import build_stages
    from w2s.recipe import load_recipe
    from w2s.runners import chat_prompt
    from w2s.tokenizer import load_tokenizer

    shutil.copytree(olympic_world / "weak", tmp_path / "weak")
    config = json.loads((tmp_path / "weak" / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>"
                               "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (tmp_path / "weak" / "tokenizer_config.json").write_text(json.dumps(config))
    for name in ("train_2.jsonl", "val.jsonl", "strong"):
        (tmp_path / name).symlink_to(olympic_world / name)
    recipe = load_recipe(write_recipe(tmp_path, "chat", models="weak_chat_template = true"))
    stages = {s.name: s for s in build_stages(recipe)}
    assert stages["02_weak_labels"].args["prompt"] == stages["20_eval_weak_floor"].args["prompt"] == "chat"
    assert stages["03_icl_labels"].args["prompt"] == "few_shot" and stages["21_eval_full_weak_ft"].args["prompt"] == \
        "zero_shot"
    ctx = Context(recipe, tmp_path / "runs", log=lambda *a: None, progress=False)
    run_stages([stages[n] for n in ("00_data", "02_weak_labels")], ctx)
    tok = load_tokenizer(tmp_path / "weak")
    records = {r["id"]: r for r in jsonl(tmp_path / "runs" / "00_data" / "train_2.jsonl")}
    for g in jsonl(tmp_path / "runs" / "02_weak_labels" / "generations.jsonl"):
        text = records[g["id"]]["prompt"]
        assert g["prompt"] == chat_prompt(tok, text)
        rendered = tok.decode(g["prompt"], skip_special=False)
        assert rendered == f"<s><|user|>{text.removesuffix(chr(10) * 2 + 'Answer:')}</s><|assistant|>"
        assert g["prompt"].count(tok.bos_id) == 1


# ---------------------------------------------------------------------------------------------------- recipes


def _recipe_world(tmp_path):
    for name in ("train_2.jsonl", "train.jsonl", "val.jsonl"):
        (tmp_path / name).write_text("{}\n")
    for name in ("weak", "strong"):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "config.json").write_text("{}")
    return tmp_path


BASE = """
[data]
task = "olympicarena"
train_2 = "train_2.jsonl"
test = "val.jsonl"
[models]
weak = "weak"
strong = "strong"
"""


def test_recipe_form_without_gold(tmp_path):
    from w2s.recipe import load_recipe

    path = _recipe_world(tmp_path) / "r.toml"
    path.write_text(BASE)
    r = load_recipe(path)
    assert r.data.train_2 == str(tmp_path / "train_2.jsonl") and not r.data.train
    assert r.eval.baselines == ["full_weak_ft", "strong_icl"]  # the ceiling needs gold: not a default here
    assert r.models.weak_chat_template is False and r.data.grader == "olympicarena"


def test_plan_without_gold_with_the_options_beyond_the_paper(tmp_path):
    """The weak model used as is also draws the weak self-consistency samples: from the recipe's checkpoint, in its
    prompt kind, with its fingerprint in the key (no 01_weak_sft whose key would say which weights)."""
    from w2s.pipeline import build_stages
    from w2s.recipe import load_recipe

    path = _recipe_world(tmp_path) / "r.toml"
    path.write_text(BASE.replace("[models]", "[stage1]\nweak_self_consistency = 4\n[stage2]\nrounds = 2\n[models]"))
    stages = {s.name: s for s in build_stages(load_recipe(path))}
    assert "01_weak_sft" not in stages and "19_ceiling" not in stages
    for name in ("02_weak_labels", "02_weak_samples"):
        weak = stages[name]
        assert weak.reads == ["00_data"] and weak.args["model"] == "weak", name
        assert weak.options["weak"] and weak.options["prompt"] == "zero_shot", name
    assert stages["02_weak_samples"].args["n"] == 4 and stages["02_weak_samples"].options["n"] == 4
    assert "02_weak_samples" in stages["04_r1_filter"].reads and "02_weak_samples" in stages["15_pairs"].reads
    assert {"37_round2_samples_dpo", "38_round2_pairs_dpo", "39_round2_dpo"} <= set(stages)
    assert stages["20_eval_weak_floor"].args["model"] == "weak" and stages["20_eval_weak_floor"].reads == ["00_test"]


@pytest.mark.parametrize("edit, message", [
    (("train_2 = ", 'train = "train.jsonl"\ntrain_2 = '), r"\[data\] train_2: give either train .* or train_2"),
    (("train_2 = ", "n_train_1 = 5\ntrain_2 = "), r"\[data\] train_2: is used whole, without a split"),
    (("train_2 = ", "n_train_2 = 5\ntrain_2 = "), r"\[data\] train_2: is used whole, without a split"),
    (("[models]", '[eval]\nbaselines = ["ceiling"]\n[models]'), r"\[eval\] baselines: 'ceiling' trains on"),
    (("[models]", "[weak_sft]\nlr = 1e-5\n[models]"), r"\[weak_sft\]: no weak SFT without train_1"),
    (('train_2 = "train_2.jsonl"', 'train = "train.jsonl"'), r"\[data\] train_2: the olympicarena task has no gold"),
    (('task = "olympicarena"\ntrain_2 = "train_2.jsonl"', 'task = "gsm8k"\ntrain = "train.jsonl"'), None),
    (('task = "olympicarena"\ntrain_2 = "train_2.jsonl"', 'task = "gsm8k"\ntrain = "train.jsonl"\n'
      '[models]\nweak_chat_template = true'), r"\[models\] weak_chat_template: only for a weak model used as is"),
    (('train_2 = "train_2.jsonl"', 'train_2 = "missing.jsonl"'), r"\[data\] train_2: file not found: .*missing"),
])  # fmt: skip
def test_recipe_without_gold_errors_are_one_line(tmp_path, edit, message):
    from w2s.recipe import load_recipe

    text = BASE.replace(*edit)
    if "weak_chat_template" in text:  # a second [models] table: merge it into the first
        text = text.replace("\n[models]\nweak_chat_template = true", "").replace("[models]", "[models]\n"
                                                                                "weak_chat_template = true")
    path = _recipe_world(tmp_path) / "r.toml"
    path.write_text(text)
    if message is None:  # the GSM8K form still loads
        assert load_recipe(path).data.train.endswith("train.jsonl")
        return
    with pytest.raises(ValueError, match=message) as info:
        load_recipe(path)
    assert "\n" not in str(info.value) and "r.toml" in str(info.value)


def test_the_inputs_check_reads_the_questions_file_and_names_it_train_2(tmp_path):
    """validate_inputs reads [data] train_2 (there is no train file) and names that key: an empty questions file
    stops the run before its first stage."""
    from w2s.recipe import load_recipe, validate_inputs

    path = _recipe_world(tmp_path) / "r.toml"
    path.write_text(BASE)
    write_jsonl(tmp_path / "val.jsonl", world.make_olympic_splits(0, {"val": 2})["val"])
    (tmp_path / "train_2.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"r\.toml: \[data\] train_2: .*train_2\.jsonl holds no records$"):
        validate_inputs(load_recipe(path))


def test_the_weak_prompt_kind_is_in_the_keys_of_what_the_weak_model_generates(tmp_path):
    """[models] weak_chat_template changes the weak model's prompts, hence its labels (and samples, and its test
    accuracy) and every stage after them; only the data stages keep their keys."""
    from w2s.engine import table_keys
    from w2s.pipeline import build_stages
    from w2s.recipe import load_recipe

    def keys(models=""):
        path = _recipe_world(tmp_path) / "r.toml"
        path.write_text(BASE.replace("[models]", "[stage1]\nweak_self_consistency = 4\n[models]" + models))
        return table_keys(build_stages(load_recipe(path)))

    plain, chat = keys(), keys("\nweak_chat_template = true")
    assert {n for n in plain if chat[n] != plain[n]} == set(plain) - {"00_data", "00_test"}


def test_shipped_olympicarena_recipe_follows_the_paper():
    from w2s.recipe import load_recipe

    r = load_recipe(ROOT / "recipes" / "olympicarena.toml", check_files=False)
    assert (r.data.task, r.data.grader, r.data.train) == ("olympicarena", "olympicarena", "")
    assert r.data.train_2.endswith("olympicarena/test.jsonl") and r.data.test.endswith("olympicarena/val.jsonl")
    assert r.models.weak.endswith("Meta-Llama-3-8B-Instruct") and r.models.strong.endswith("Meta-Llama-3-70B")
    assert r.models.weak_chat_template is False  # the authors' plain-text prompt (src/inference_olympic.py)
    assert (r.stage1.rounds, r.stage2.max_pairs, r.stage2.n_samples, r.stage2.temperature) == (2, 3, 10, 1.0)
    assert r.sampling.max_new_tokens == r.sampling.sample_max_new_tokens == 2048
    assert r.strong_sft["lora_rank"] == r.preference["lora_rank"] == 8 and r.sampling.tp == 8
    assert r.eval.baselines == ["full_weak_ft", "strong_icl"] and not r.weak_sft


def test_shipped_demo_olympic_recipe_validates_with_its_files():
    from w2s.recipe import load_recipe

    r = load_recipe(ROOT / "recipes" / "demo_olympic.toml")
    assert r.data.task == "olympicarena" and r.data.train_2 and r.models.weak.endswith("weak-instruct")
    assert (r.stage1.rounds, r.stage2.max_pairs) == (2, 3) and "ceiling" not in r.eval.baselines


def test_dry_run_without_gold(olympic_world, tmp_path):
    from w2s.estimate import dry_run

    text = dry_run(write_recipe(olympic_world, "dry"), runs_dir=tmp_path, world=8, device="H100 SXM")
    assert "train_1 / train_2 / test: 0 / 12 / 6 questions" in text and "no gold to measure" in text
    assert "| 02_weak_labels" in text and "01_weak_sft" not in text and "19_ceiling" not in text


def test_questions_only_train_2_of_a_gold_task(tmp_path):
    """[data] train_2 works for GSM8K-format questions too: rows {"question"} (+ "id"), any answer dropped."""
    from w2s.runners import load_questions

    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "Ann has 3 pens. How many pens now?"},
                                              {"id": "b", "question": "Q2?", "answer": "#### 4"}])
    assert load_questions("gsm8k", path) == [{"id": "gsm8k-train_2-00000", "question": "Ann has 3 pens. How many "
                                                                                         "pens now?"},
                                             {"id": "b", "question": "Q2?"}]


# ---------------------------------------------------------------------------------------------------- the miniature


def test_world_expression_problems_are_right_by_an_independent_reading():
    """An ExpressionProblem's answer a*x+b agrees, for several x, with test_world's reader of the question text
    with x replaced by a number; its worked lines end in the answer."""
    from test_world import read_question

    for problem in [world.sample_expression_problem(random.Random(i)) for i in range(200)]:
        a, b = problem.amounts()[-1]
        assert problem.answer == world.linear(a, b) and problem.question.split(" has ")[1].startswith("x ")
        for x in (3, 7, 12):
            amounts = read_question(problem.question.replace(" has x ", f" has {x} "))[0]
            assert amounts[-1] == a * x + b
        assert problem.lines()[-1].endswith("=" + problem.answer)


def test_olympic_rows_gold_is_the_chains_answer_and_a_single_choice_names_its_option():
    """make_olympic_splits: an NV row's gold is the number test_world's reader computes from the problem text; an SC
    row's gold is the letter of the one option holding that number, which its worked solution names last."""
    from test_world import read_question

    rows = world.make_olympic_splits(5, {"val": 30})["val"]
    for row in rows:
        gold = row["answer"][0]
        if row["answer_type"] == "NV":
            assert int(gold) == read_question(row["problem"])[0][-1], row
        elif row["answer_type"] == "SC":
            question, options = row["problem"].split("\nOptions: ")
            answer = int(read_question(question)[0][-1])
            values = {letter: int(value) for value, letter in re.findall(r"(\d+) \(([A-D])\)", options)}
            assert sorted(values) == list("ABCD") and list(values.values()).count(answer) == 1, row
            assert values[gold] == answer, row
            assert row["solution"].endswith(f"Option: {answer} ({gold})\nThe final answer is $\\boxed{{{gold}}}$")


def test_the_second_reading_holds_its_share_of_olympic_worksheets():
    """olympic_corpus: round(share * n) documents of the answer types, the rest strong-corpus documents, which never
    hold a boxed answer, an unknown x, options or an answer-type instruction."""
    markers = ("$\\boxed{", "has x ", "Options: ", *world.OLYMPIC_TYPES.values())
    for share in (0.0, 0.5):
        docs = world.olympic_corpus(1, 40, share=share)
        marked = sum(any(m in doc for m in markers) for doc in docs)
        assert len(docs) == 40
        assert 0 < marked <= 20 if share else marked == 0


def test_miniature_data_loads_through_the_task_loader_and_judges_right():
    """demo/olympic: train_2 without any answer field, val with answers, in OlympicArena's layout; loaded by the
    olympicarena task; each val solution is judged right by OlympicArena's judge, and a wrong answer wrong."""
    train_2_rows = jsonl(ROOT / "demo" / "olympic" / "train_2.jsonl")
    assert not any("answer" in row or "solution" in row for row in train_2_rows)
    train_2 = olympicarena.load_questions(ROOT / "demo" / "olympic" / "train_2.jsonl")
    val = olympicarena.load(ROOT / "demo" / "olympic" / "val.jsonl")
    assert len(train_2) == len(train_2_rows) and len(val) > 0
    assert {r["answer_type"] for r in val} == {r["answer_type"] for r in train_2} == {"NV", "SC", "EX"}
    assert not {r["question"] for r in val} & {r["question"] for r in train_2}
    solutions = {row["id"]: row["solution"] for row in jsonl(ROOT / "demo" / "olympic" / "val.jsonl")}
    wrong = {"NV": "1000", "SC": "E", "EX": "x+100"}
    for record in val:
        assert record["prompt"].endswith("\n\nAnswer:") and "\n\nQuestion: " in record["prompt"]
        assert olympic_judge.grade(solutions[record["id"]], record), record["id"]
        assert not olympic_judge.grade(f"The final answer is $\\boxed{{{wrong[record['answer_type']]}}}$", record)
    # equivalent forms the judge accepts: 3x+6 = 3(x+2), 14 = 14.0
    ex = next(r for r in val if r["answer_type"] == "EX" and "+" in r["answer"][0] and r["answer"][0][0] != "x")
    a, b = ex["answer"][0].split("x+")
    assert olympic_judge.grade(f"$\\boxed{{{b}+{a}x}}$", ex)
    nv = next(r for r in val if r["answer_type"] == "NV")
    assert olympic_judge.grade(f"$\\boxed{{{nv['answer'][0]}.0}}$", nv)


def test_olympic_splits_are_seeded_disjoint_and_kept_out_of_the_second_reading():
    sizes = {"instruct": 30, "train_2": 30, "val": 30}
    splits = world.make_olympic_splits(3, sizes)
    assert splits == world.make_olympic_splits(3, sizes) and splits != world.make_olympic_splits(4, sizes)
    questions = {name: {row["problem"].split("\n")[0] for row in rows} for name, rows in splits.items()}
    assert all(len(q) == 30 for q in questions.values())
    assert not (questions["instruct"] & questions["train_2"] or questions["val"] & (questions["instruct"] |
                                                                                     questions["train_2"]))
    for rows in splits.values():
        assert sorted(r["answer_type"] for r in rows) == ["EX"] * 10 + ["NV"] * 10 + ["SC"] * 10
    every = set().union(*questions.values())
    docs = world.olympic_corpus(0, 60, exclude=every)
    assert not any(q in doc for doc in docs for q in every)
    assert any("$\\boxed{" in doc for doc in docs) and any("has x " in doc for doc in docs)


def test_audit_draws_the_shipped_train_2_again_with_answers_and_judges_by_them(tmp_path, monkeypatch):
    """scripts/demo_olympic_audit.py: the world's draw is the shipped questions file exactly, its answers are the
    judge's gold (a response boxing the answer is right, one boxing another is wrong), and a file that is not the
    draw is refused, and so is a run that does not exist (one line, not a traceback)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import demo_olympic_audit as audit_script

    gold = audit_script.world_train_2()
    shipped = [json.loads(line) for line in (ROOT / "demo" / "olympic" / "train_2.jsonl").read_text().splitlines()]
    assert [row["id"] for row in shipped] == list(gold) and all("answer" not in row for row in shipped)
    rows = [{"id": i, "response": f"The final answer is $\\boxed{{{g['answer'][0]}}}$"} for i, g in gold.items()]
    assert audit_script.right(rows, gold) == (450, 450)
    wrong = [{"id": i, "response": "The final answer is $\\boxed{E}$"} for i in gold]  # never an answer here
    assert audit_script.right(wrong, gold) == (0, 450)
    other = tmp_path / "train_2.jsonl"
    other.write_text("".join(json.dumps(row) + "\n" for row in shipped[:-1]))
    with pytest.raises(SystemExit, match="not the world's train_2 draw"):
        audit_script.world_train_2(other)
    monkeypatch.setattr(sys, "argv", ["demo_olympic_audit.py", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match=r"nowhere: no finished run of recipes/demo_olympic\.toml"):
        audit_script.main()
