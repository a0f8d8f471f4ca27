"""The whole weak-to-strong pipeline end to end on tiny models, on CPU: every stage of docs/PAPER.md (two Stage I
rounds, DPO and ORPO, every baseline, every evaluation, pass@k, the report and its plot), then the runner's contract: a
finished run is skipped, a run killed inside a sampling stage and inside a training stage resumes and gives the same
artifacts as the uninterrupted run, changing one option reruns exactly the stages that depend on it, bad input stops
with one clear line before any model is loaded, and train_2 gold has one reader.

The tiny world: GSM8K-format problems from w2s/world.py (32 train questions split 16 / 16, 8 test), a digit-level
tokenizer, and two random Llama-shaped models (dim 48, 2 layers) first taught a "habit": answer "#### 3" (70 %) or
"#### 5" (30 %) whatever the question. That makes every stage non-trivial without learning arithmetic: the weak and
ICL labels agree (Stage I keeps questions), M_plus's samples at T=1 disagree now and then (Stage II finds pairs).

    python -m pytest -q tests/test_pipeline.py
"""

import ast
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from w2s.tasks import get_grader, zero_shot_prompt

N_SAMPLES, PASS_K = 5, 3
ALL_STAGES = [
    "00_data", "00_test", "01_weak_sft", "02_weak_labels", "03_icl_labels",
    "04_r1_filter", "05_r1_sft_weak", "06_r1_sft_icl", "07_r1_sft_hybrid",
    "08_r2_labels_weak", "09_r2_labels_icl", "10_r2_filter", "11_r2_sft_weak", "12_r2_sft_icl", "13_r2_sft_hybrid",
    "14_samples", "15_pairs", "16_dpo", "17_orpo", "18_full_weak_ft", "19_ceiling",
    "20_eval_weak_floor", "21_eval_full_weak_ft", "22_eval_stage1_r1_weak", "23_eval_stage1_r1_icl",
    "24_eval_stage1_r1_hybrid", "25_eval_stage1_r2_weak", "26_eval_stage1_r2_icl", "27_eval_stage1_r2_hybrid",
    "28_eval_stage2_dpo", "29_eval_stage2_orpo", "30_eval_ceiling", "31_eval_strong_icl",
    "32_passk_stage1_plus", "33_passk_stage2_dpo", "34_passk_stage2_orpo",
]  # fmt: skip
GENERATE_STAGES = ["02_weak_labels", "03_icl_labels", "08_r2_labels_weak", "09_r2_labels_icl", "14_samples"]
PAPER = get_grader("gsm8k", "paper")  # the recipes' default grader: the authors' answer protocol


def answer(response):
    return PAPER.answer(response)


def correct(response, gold):
    return PAPER.same(PAPER.answer(response), PAPER.gold(gold))


RECIPE = """
name = "{name}"

[data]
task = "gsm8k"
train = "train.jsonl"
test = "test.jsonl"
seed = 0

[models]
weak = "weak"
strong = "strong"
dtype = "float32"
device = "cpu"

[sampling]
max_new_tokens = 8
sample_max_new_tokens = 8

[weak_sft]
lr = 1e-3
max_steps = 2
batch_size = 8
micro_batch_size = 8

[strong_sft]
lr = 1e-3
max_steps = 2
batch_size = 8
micro_batch_size = 8
ckpt_every = 1

[stage1]
rounds = 2

[stage2]
n_samples = {n_samples}
min_confidence = {min_confidence}
losses = ["dpo", "orpo"]

[preference]
lr = 1e-3
max_steps = 2
batch_size = 4
micro_batch_size = 4
ckpt_every = 1

[eval]
pass_k_samples = {pass_k}
"""


def write_recipe(world_dir, name, min_confidence=0.6):
    path = Path(world_dir) / f"{name}.toml"
    path.write_text(RECIPE.format(name=name, n_samples=N_SAMPLES, min_confidence=min_confidence, pass_k=PASS_K))
    return path


def _habit_model(path, tokenizer, questions, seed):
    """A random dim-48 Llama taught to answer "#### 3" or "#### 5" (7:3) to any question, zero-shot or after four
    demonstrations of the same habit, saved in HF format."""
    from w2s.checkpoint import save_model
    from w2s.config import ModelConfig
    from w2s.model import Transformer
    from w2s.train import TrainConfig, train_sft

    cfg = ModelConfig(family="llama", vocab_size=300, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=12,
                      hidden_dim=96, max_seq_len=512, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    model = Transformer(cfg).init_weights(generator=torch.Generator().manual_seed(seed))
    from w2s.tasks import few_shot_prompt

    rng = random.Random(seed)
    habit = lambda: f"#### {3 if rng.random() < 0.7 else 5}"  # noqa: E731
    rows = [{"prompt": zero_shot_prompt(q), "response": habit()} for q in questions for _ in range(2)]
    # The habit under 4-shot prompts too: the ICL labels keep the marker, where an untaught model drifts to a bare
    # number or a run of "#", which the paper grader reads as no answer (no last-number fall-back).
    rows += [{"prompt": few_shot_prompt([{"question": rng.choice(questions), "response": habit()} for _ in range(4)],
                                        q), "response": habit()} for q in questions]
    cfg = TrainConfig(lr=1e-2, max_steps=80, batch_size=32, micro_batch_size=32, progress=False, log_every=1000)
    save_model(train_sft(model, tokenizer, rows, cfg), path, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """train.jsonl / test.jsonl in GSM8K format, and the weak and strong checkpoints, in one directory."""
    from w2s.tasks.gsm8k import strip_calculator
    from w2s.tokenizer import load_tokenizer
    from w2s.world import make_splits, train_world_tokenizer

    root = tmp_path_factory.mktemp("world")
    splits = make_splits(seed=0, n_train_1=16, n_train_2=16, n_test=8)
    for name, records in (("train", splits["train_1"] + splits["train_2"]), ("test", splits["test"])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    texts = [f"Question: {r['question']}\nAnswer: {strip_calculator(r['answer'])}"
             for records in splits.values() for r in records]
    train_world_tokenizer(texts, root / "tokenizer", vocab_size=300)
    tokenizer = load_tokenizer(root / "tokenizer")
    questions = [r["question"] for records in splits.values() for r in records]
    _habit_model(root / "weak", tokenizer, questions, seed=0)
    _habit_model(root / "strong", tokenizer, questions, seed=1)
    return root


@pytest.fixture(scope="session")
def full_run(world, tmp_path_factory):
    """One uninterrupted run of every stage, recording which stage read train_2 gold."""
    import w2s.runners as runners
    from w2s.pipeline import run_pipeline

    runs = tmp_path_factory.mktemp("runs")
    gold_readers = []
    real_reader = runners.read_train_2_gold

    def spy(ctx):
        gold_readers.append(ctx.stage)
        return real_reader(ctx)

    loads = []  # every checkpoint read from disk (for sampling or for training)

    def load_spy(real):
        def spy(recipe, model_dir, *args):
            loads.append(str(model_dir))
            return real(recipe, model_dir, *args)
        return spy

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runners, "read_train_2_gold", spy)
        mp.setattr(runners, "load_fresh", load_spy(runners.load_fresh))
        mp.setattr(runners, "load_for_training_stage", load_spy(runners.load_for_training_stage))
        run_dir, status, text = run_pipeline(write_recipe(world, "tiny"), runs_dir=runs, progress=False,
                                             log=lambda *a: None)
    return {"run_dir": run_dir, "status": status, "report": text, "gold_readers": gold_readers, "world": world,
            "loads": loads}


def jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def meta(run_dir, stage):
    return json.loads((Path(run_dir) / stage / "meta.json").read_text())


# ---------------------------------------------------------------------------------------------------- end to end


def test_every_stage_runs_and_writes_meta(full_run):
    run_dir = full_run["run_dir"]
    assert full_run["status"] == {name: "ran" for name in ALL_STAGES}
    for name in ALL_STAGES:
        m = meta(run_dir, name)
        # wall_s is kept to the millisecond: a data stage can take less and record 0.0, a model stage cannot
        assert m["stage"] == name and len(m["key"]) == 16 and isinstance(m["wall_s"], float) and m["wall_s"] >= 0
        assert m["wall_s"] > 0 or m["kind"] not in ("train", "generate", "eval"), name
        assert set(m["inputs"]) <= set(ALL_STAGES[: ALL_STAGES.index(name)])  # reads only earlier stages
        if m["kind"] in ("train", "generate", "eval"):
            assert m["tokens"] > 0 and m["tok_s"] > 0 and m["peak_mem_gib"] > 0, name
    for name in ALL_STAGES:
        if meta(run_dir, name)["kind"] == "train":
            model = run_dir / name / "model"
            assert (model / "config.json").is_file() and (model / "metrics.jsonl").is_file()
            assert not (model / "ckpt").exists()  # the trainer removes its training state once the export is done
    # The resolved training options are recorded: the recipe's overrides on top of TrainConfig's defaults.
    opts = meta(run_dir, "05_r1_sft_weak")["options"]["train"]
    assert opts["lr"] == 1e-3 and opts["max_steps"] == 2 and opts["weight_decay"] == 0.0


def test_weights_stay_resident_between_stages(full_run):
    """A model just trained generates next without a reload: the weak SFT model is read from disk only by its
    evaluation (20), not by 02_weak_labels; M_plus by the two preference trainings (which consume their model), its
    evaluation (27) and its pass@k (32), but not by 14_samples, which follows its training."""
    loads = full_run["loads"]
    assert sum(p.endswith("01_weak_sft/model") for p in loads) == 1
    assert sum(p.endswith("13_r2_sft_hybrid/model") for p in loads) == 4
    assert len(loads) < len([s for s in ALL_STAGES if meta(full_run["run_dir"], s)["kind"] in
                             ("train", "generate", "eval")])


def test_empty_training_set_is_one_clear_error(tmp_path):
    from w2s.engine import Context
    from w2s.runners import train_stage

    ctx = Context(recipe=None, run_dir=tmp_path)
    with pytest.raises(ValueError, match=r"05_r1_sft_weak: the SFT set is empty, nothing to train on"):
        train_stage(ctx, tmp_path / "05_r1_sft_weak", "unused", [], "strong_sft")
    with pytest.raises(ValueError, match=r"16_dpo: the preference pair set is empty, nothing to train on"):
        train_stage(ctx, tmp_path / "16_dpo", "unused", [], "preference", loss="dpo")


def test_data_split_hides_train_2_gold(full_run):
    d = full_run["run_dir"] / "00_data"
    train_1, train_2, gold = jsonl(d / "train_1.jsonl"), jsonl(d / "train_2.jsonl"), jsonl(d / "train_2_gold.jsonl")
    assert len(train_1) == len(train_2) == 16 and len(jsonl(d.parent / "00_test" / "test.jsonl")) == 8
    assert all(set(r) == {"id", "question"} for r in train_2)  # the strong side sees questions only
    assert [g["id"] for g in gold] == [r["id"] for r in train_2]
    assert not {r["id"] for r in train_1} & {r["id"] for r in train_2}


def test_train_2_gold_has_one_reader(full_run):
    # At run time: only the precision analysis (filters, pairs) and the strong ceiling read train_2 gold.
    assert set(full_run["gold_readers"]) == {"04_r1_filter", "10_r2_filter", "15_pairs", "19_ceiling"}
    # In the source: only runners.py names the file, and read_train_2_gold is called from those three places only.
    root = Path(__file__).resolve().parents[1] / "w2s"
    naming = sorted({p.name for p in root.rglob("*.py") if "train_2_gold.jsonl" in p.read_text()})
    assert naming == ["runners.py"]
    tree = ast.parse((root / "runners.py").read_text())
    callers = set()
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef):
            for node in ast.walk(fn):
                if isinstance(node, ast.Name) and node.id in ("read_train_2_gold", "GOLD_FILE"):
                    callers.add((fn.name, node.id))
    assert callers == {("gold_precision", "read_train_2_gold"), ("run_pairs", "read_train_2_gold"),
                       ("run_ceiling", "read_train_2_gold"), ("read_train_2_gold", "GOLD_FILE"),
                       ("run_data", "GOLD_FILE")}
    # No training set of a non-ceiling stage contains a gold solution.
    gold_solutions = {g["solution"] for g in jsonl(full_run["run_dir"] / "00_data" / "train_2_gold.jsonl")}
    for name in ALL_STAGES:
        train = full_run["run_dir"] / name / "train.jsonl"
        if train.is_file() and name != "19_ceiling":
            rows = jsonl(train)
            assert not {r.get("response") for r in rows} & gold_solutions
            assert not {r.get("chosen") for r in rows} & gold_solutions


def test_labels_follow_the_generations_and_the_paper_prompts(full_run):
    run_dir = full_run["run_dir"]
    questions = {r["id"]: r["question"] for r in jsonl(run_dir / "00_data" / "train_2.jsonl")}
    for name in GENERATE_STAGES:
        gens, labels = jsonl(run_dir / name / "generations.jsonl"), jsonl(run_dir / name / "labels.jsonl")
        assert [g["id"] for g in gens] == [lab["id"] for lab in labels] == list(questions)  # train_2 order
        n = N_SAMPLES if name == "14_samples" else 1
        assert all(len(g["completions"]) == n for g in gens)
        for g in gens:
            for c in g["completions"]:  # generation stops before a new "Question" / "Answer"
                assert "Question" not in c["text"] and "Answer" not in c["text"]
        # The labels keep the completion without its leading space (the trainer adds prompt + " " + response), and
        # without "." at its ends, as the authors' src/inference.py stores a response: text.strip().strip(".").
        texts = [c["text"] for g in gens for c in g["completions"]]
        responses = [lab["response"] for lab in labels] if n == 1 else \
            [s["response"] for lab in labels for s in lab["samples"]]
        assert responses == [t.strip().strip(".") for t in texts] and any(t.startswith(" ") for t in texts)
        # Labels hold responses, never answers (a grader reads them where they are compared), and say which ones
        # stopped at the token limit.
        rows = labels if n == 1 else [s for lab in labels for s in lab["samples"]]
        assert not any("answer" in row for row in rows)
        assert [row["truncated"] for row in rows] == [c["finish_reason"] == "length" for g in gens
                                                      for c in g["completions"]]
        assert meta(run_dir, name)["n_truncated"] == sum(row["truncated"] for row in rows)
    # Zero-shot prompts everywhere but the ICL labels, whose prompt is 4 weak demos then the zero-shot prompt.
    weak = jsonl(run_dir / "02_weak_labels" / "generations.jsonl")
    assert all(g["prompt"] == zero_shot_prompt(questions[g["id"]]) for g in weak)
    icl = jsonl(run_dir / "03_icl_labels" / "generations.jsonl")
    weak_labels = {lab["id"]: lab for lab in jsonl(run_dir / "02_weak_labels" / "labels.jsonl")}
    for g in icl:
        blocks = g["prompt"].split("\n\n")
        assert len(blocks) == 5 and blocks[-1] == zero_shot_prompt(questions[g["id"]])
        for block in blocks[:4]:  # each demo is a weak response to a train_2 question, verbatim
            q, a = block.removeprefix("Question: ").split("\nAnswer: ")
            assert any(w["question"] == q and w["response"].strip() == a for w in weak_labels.values())
    assert len({g["prompt"].rsplit("\n\n", 1)[0] for g in icl}) == 1  # the same demos for every question


def test_consistency_filter_matches_an_independent_recount(full_run):
    run_dir = full_run["run_dir"]
    for filt, (a, b) in (("04_r1_filter", ("02_weak_labels", "03_icl_labels")),
                         ("10_r2_filter", ("08_r2_labels_weak", "09_r2_labels_icl"))):
        first, second = jsonl(run_dir / a / "labels.jsonl"), jsonl(run_dir / b / "labels.jsonl")
        kept = [x["id"] for x, y in zip(first, second)
                if answer(x["response"]) and answer(x["response"]) == answer(y["response"])]
        assert kept, f"{filt}: the habit models should agree on some questions"
        assert [r["id"] for r in jsonl(run_dir / filt / "weak.jsonl")] == kept
        assert [r["response"] for r in jsonl(run_dir / filt / "icl.jsonl")] == \
            [y["response"] for y in second if y["id"] in set(kept)]
        assert len(jsonl(run_dir / filt / "hybrid.jsonl")) == 2 * len(kept)
        assert meta(run_dir, filt)["n_kept"] == len(kept) and meta(run_dir, filt)["grader"] == "paper"
    # Round 2 trains from the round-2 sets; each SFT stage's train.jsonl is exactly its set.
    assert jsonl(run_dir / "13_r2_sft_hybrid" / "train.jsonl") == jsonl(run_dir / "10_r2_filter" / "hybrid.jsonl")
    assert jsonl(run_dir / "05_r1_sft_weak" / "train.jsonl") == jsonl(run_dir / "04_r1_filter" / "weak.jsonl")


def test_pairs_follow_the_paper_rules(full_run):
    run_dir = full_run["run_dir"]
    weak = {w["id"]: w for w in jsonl(run_dir / "02_weak_labels" / "labels.jsonl")}
    samples = {s["id"]: s["samples"] for s in jsonl(run_dir / "14_samples" / "labels.jsonl")}
    pairs = jsonl(run_dir / "15_pairs" / "pairs.jsonl")
    assert pairs, "the habit models' samples should disagree sometimes"
    assert len({p["id"] for p in pairs}) == len(pairs)  # GSM8K: at most one pair per question
    for p in pairs:
        answers = [answer(s["response"]) for s in samples[p["id"]]]
        top = max(set(a for a in answers if a), key=lambda a: (answers.count(a), -answers.index(a)))
        confidence = answers.count(top) / N_SAMPLES
        assert confidence >= 0.6 and p["confidence"] == pytest.approx(confidence)
        w = weak[p["id"]]
        if answer(w["response"]) == top:  # weak chosen, a differing sample rejected
            assert p["chosen"] == w["response"] and p["rejected_answer"] != top
        else:  # weak rejected, a majority sample chosen, only when confidence >= 0.8
            assert confidence >= 0.8 and p["rejected"] == w["response"] and p["chosen_answer"] == top
        assert p["prompt"] == zero_shot_prompt(w["question"])
    m = meta(run_dir, "15_pairs")
    assert m["n_pairs"] == len(pairs) == m["counts"]["pairs"]
    assert [p["id"] for p in jsonl(run_dir / "16_dpo" / "train.jsonl")] == [p["id"] for p in pairs]
    # LLaMA-Factory copies of the sets, for comparison with the paper's released data.
    lf = json.loads((run_dir / "15_pairs" / "pairs.llamafactory.json").read_text())
    assert [e["output"] for e in lf] == [[p["chosen"], p["rejected"]] for p in pairs]


def test_accuracies_match_an_independent_grading(full_run):
    run_dir = full_run["run_dir"]
    gold = {r["id"]: r["answer"] for r in jsonl(run_dir / "00_test" / "test.jsonl")}
    for name in ALL_STAGES:
        if "_eval_" in name:
            gens = jsonl(run_dir / name / "generations.jsonl")
            assert [g["id"] for g in gens] == list(gold)
            expected = sum(correct(g["completions"][0]["text"], gold[g["id"]]) for g in gens) / len(gold)
            assert meta(run_dir, name)["accuracy"] == pytest.approx(expected)
            assert meta(run_dir, name)["accuracy_by_grader"]["paper"] == pytest.approx(expected)
            result = json.loads((run_dir / name / "result.json").read_text())
            assert result["accuracy_by_grader"] == meta(run_dir, name)["accuracy_by_grader"]
        if "_passk_" in name:
            gens = jsonl(run_dir / name / "generations.jsonl")
            hits = [sum(correct(c["text"], gold[g["id"]]) for c in g["completions"]) for g in gens]
            # pass@1 is the mean fraction correct; pass@n is the fraction of questions with any correct sample.
            assert meta(run_dir, name)["pass@1"] == pytest.approx(sum(hits) / (PASS_K * len(gens)))
            assert meta(run_dir, name)[f"pass@{PASS_K}"] == pytest.approx(sum(c > 0 for c in hits) / len(gens))


def test_report_table_and_plot(full_run):
    run_dir, text = full_run["run_dir"], full_run["report"]
    for label in ("weak floor", "full weak fine-tuning", "strong ICL", "Stage I r2: hybrid-ft (M_plus)",
                  "Stage II: DPO", "Stage II: ORPO", "strong ceiling"):
        assert label in text
    floor = meta(run_dir, "20_eval_weak_floor")["accuracy"]
    assert f"{100 * floor:.2f}" in text
    for name in ALL_STAGES:
        assert name in text  # the cost table lists every stage
    assert "04_r1_filter" in text and "15_pairs" in text
    assert (run_dir / "report.md").read_text() == text
    assert "## The same accuracies under every grader" in text and "Grader: paper" in text
    assert "## Truncated responses (stopped at the token limit)" in text
    png = (run_dir / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_report_shows_the_run_as_it_stands(full_run, tmp_path):
    """stages.json holds the latest run's table; the report leaves out (and names) a finished stage that an earlier
    recipe left (a loss dropped since) or whose input ran again since it ran or is running again, with whatever reads
    it; an input whose directory is gone (deleted to free disk) leaves its readers in."""
    from w2s.report import report

    src, run = full_run["run_dir"], tmp_path / "run"
    table = json.loads((src / "stages.json").read_text())
    assert table == {name: meta(src, name)["key"] for name in ALL_STAGES}
    for name in ALL_STAGES:
        (run / name).mkdir(parents=True)
        shutil.copy(src / name / "meta.json", run / name / "meta.json")
    shutil.copy(src / "recipe.json", run / "recipe.json")

    def report_of(stages, runs=None):
        (run / "stages.json").write_text(json.dumps(stages))
        return report(run, plot=False)

    text = report_of(table)
    assert "Left out" not in text and "Stage II: ORPO" in text
    orpo = ["17_orpo", "29_eval_stage2_orpo", "34_passk_stage2_orpo"]
    text = report_of({name: key for name, key in table.items() if name not in orpo})  # losses = ["dpo"] since
    assert f"Left out: {', '.join(orpo)} (finished under an earlier recipe" in text
    assert "Stage II: ORPO" not in text and "Stage II: DPO" in text
    pairs = meta(run, "15_pairs")
    (run / "15_pairs" / "meta.json").write_text(json.dumps(pairs | {"run": "f" * 32}))  # 15_pairs ran again
    text = report_of(table)
    readers = ("Left out: 16_dpo, 17_orpo, 28_eval_stage2_dpo, 29_eval_stage2_orpo, 33_passk_stage2_dpo, "
               "34_passk_stage2_orpo (")
    assert readers in text and "Stage II: DPO" not in text
    (run / "15_pairs" / "meta.json").unlink()  # running again: started (key.txt), not finished
    (run / "15_pairs" / "key.txt").write_text(pairs["key"] + "\n")
    assert readers in report_of(table)
    shutil.rmtree(run / "15_pairs")
    assert "Left out" not in report_of(table)


def test_a_new_idea_takes_the_finished_stages_of_another_run(full_run, tmp_path, capsys):
    """w2s run --reuse: a recipe that changes only Stage II, in a run directory of its own, takes (hard-links) every
    finished stage of the paper's run it shares a key with and runs the rest; the donor is left as it was, and a
    stage the new run finished itself stays its own."""
    from click.testing import CliRunner

    from w2s.cli import main

    donor, idea = full_run["run_dir"], write_recipe(full_run["world"], "tiny-idea", min_confidence=0.8)
    changed = ["15_pairs", "16_dpo", "17_orpo", "28_eval_stage2_dpo", "29_eval_stage2_orpo", "33_passk_stage2_dpo",
               "34_passk_stage2_orpo"]
    before = {name: (donor / name / "meta.json").read_text() for name in ALL_STAGES}
    plan = CliRunner().invoke(main, ["run", str(idea), "--runs", str(tmp_path), "--reuse", str(donor), "--dry-run"])
    rows = {}
    for cells in (line.split("|") for line in plan.output.splitlines() if line.startswith("| ")):
        if cells[1].strip() in ALL_STAGES:
            rows.setdefault(cells[1].strip(), cells[2].strip())  # the first table: stage | status | ...
    assert rows == {name: "will run" if name in changed else "taken" for name in ALL_STAGES}
    (tmp_path / "tiny-idea").mkdir()
    shutil.copytree(donor / "00_test", tmp_path / "tiny-idea" / "00_test")  # a copy: the same run, not a link
    out = CliRunner().invoke(main, ["run", str(idea), "--runs", str(tmp_path), "--reuse", str(donor), "--no-progress"])
    assert out.exit_code == 0, out.output
    run_dir = tmp_path / "tiny-idea"
    ran = {name for name in ALL_STAGES if meta(run_dir, name)["run"] != meta(donor, name)["run"]}
    assert ran == set(changed)
    assert (run_dir / "01_weak_sft" / "meta.json").stat().st_ino == (donor / "01_weak_sft" / "meta.json").stat().st_ino
    assert (run_dir / "00_test" / "meta.json").stat().st_ino != (donor / "00_test" / "meta.json").stat().st_ino
    assert {name: (donor / name / "meta.json").read_text() for name in ALL_STAGES} == before
    assert meta(run_dir, "15_pairs")["n_pairs"] != meta(donor, "15_pairs")["n_pairs"]
    from w2s.engine import RunLocked, run_lock
    from w2s.pipeline import run_pipeline

    with pytest.raises(ValueError, match=r"--reuse .*nowhere: not a run directory with finished stages"):
        run_pipeline(idea, runs_dir=tmp_path, reuse=tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"--reuse .*: that is this recipe's own run directory"):
        run_pipeline(idea, runs_dir=tmp_path, reuse=run_dir)
    with run_lock(donor), pytest.raises(RunLocked, match=r"--reuse .*: a pipeline is running there \(pid "):
        run_pipeline(idea, runs_dir=tmp_path, reuse=donor, log=lambda *a: None)  # not from a run that is running


def test_finished_run_is_skipped(full_run):
    from w2s.pipeline import run_pipeline

    _, status, _ = run_pipeline(write_recipe(full_run["world"], "tiny"), runs_dir=full_run["run_dir"].parent,
                                progress=False, log=lambda *a: None, plot=False)
    assert status == {name: "skipped" for name in ALL_STAGES}


# ---------------------------------------------------------------------------------------------------- kill / resume


class Injected(RuntimeError):
    pass


def test_killed_run_resumes_to_the_same_artifacts(full_run, tmp_path, monkeypatch):
    import w2s.runners as runners
    import w2s.sampling as sampling
    import w2s.sampling_jsonl as sampling_jsonl
    import w2s.train as train
    from w2s.pipeline import run_pipeline

    recipe = write_recipe(full_run["world"], "tiny")
    logs = []
    run = lambda: run_pipeline(recipe, runs_dir=tmp_path, progress=False, log=logs.append, plot=False)  # noqa

    # 1. Killed inside the sampling of 14_samples after 3 of 16 prompts.
    real_iter = sampling.iter_generate
    real_to_jsonl = sampling_jsonl.generate_to_jsonl

    def dying_iter(*args, **kwargs):
        for i, item in enumerate(real_iter(*args, **kwargs)):
            if i == 3:
                raise Injected("killed while sampling")
            yield item

    def to_jsonl(model, tokenizer, records, out_path, **kwargs):
        if "14_samples" in str(out_path):
            monkeypatch.setattr(sampling, "iter_generate", dying_iter)
        try:
            return real_to_jsonl(model, tokenizer, records, out_path, **kwargs)
        finally:
            monkeypatch.setattr(sampling, "iter_generate", real_iter)

    monkeypatch.setattr(runners, "generate_to_jsonl", to_jsonl)
    with pytest.raises(Injected):
        run()
    stage = tmp_path / "tiny" / "14_samples"
    assert not (stage / "meta.json").exists() and (meta(tmp_path / "tiny", "13_r2_sft_hybrid"))
    sampled_before = [json.loads(line)["id"] for line in (stage / "generations.jsonl.part0").read_text().splitlines()]
    assert len(sampled_before) == 3
    monkeypatch.setattr(runners, "generate_to_jsonl", real_to_jsonl)

    # 2. Killed inside the training of 16_dpo, right after its first checkpoint.
    real_save = train.save_training_state

    def dying_save(ckpt_root, *args, **kwargs):
        real_save(ckpt_root, *args, **kwargs)
        if "16_dpo" in str(ckpt_root):
            raise Injected("killed while training")

    monkeypatch.setattr(train, "save_training_state", dying_save)
    resumed_from = []
    real_load = train.load_training_state
    monkeypatch.setattr(train, "load_training_state", lambda path, *a, **k: resumed_from.append(str(path)) or
                        real_load(path, *a, **k))
    with pytest.raises(Injected):
        run()
    assert (tmp_path / "tiny" / "16_dpo" / "model" / "ckpt").is_dir()
    assert not (tmp_path / "tiny" / "16_dpo" / "meta.json").exists()
    monkeypatch.setattr(train, "save_training_state", real_save)

    # 3. Rerun: only the unfinished stages run, training resumes from its checkpoint, the artifacts are the same.
    run_dir, status, _ = run()
    assert [s for s in ALL_STAGES if status[s] == "ran"] == ALL_STAGES[ALL_STAGES.index("16_dpo"):]
    assert any("16_dpo" in p for p in resumed_from)
    ref = full_run["run_dir"]
    for name in ALL_STAGES:
        assert meta(run_dir, name)["key"] == meta(ref, name)["key"], name
    for name in GENERATE_STAGES + [s for s in ALL_STAGES if "_eval_" in s or "_passk_" in s]:
        assert (run_dir / name / "labels.jsonl").read_text() == (ref / name / "labels.jsonl").read_text(), name
    assert (run_dir / "15_pairs" / "pairs.jsonl").read_text() == (ref / "15_pairs" / "pairs.jsonl").read_text()
    for name in ALL_STAGES:
        for key in ("accuracy", "pass@1", "n_kept", "n_pairs"):
            assert meta(run_dir, name).get(key) == meta(ref, name).get(key), (name, key)
    # The resumed sampling stage said so; it records the stage's tokens, as a training stage does, and its own
    # share (what its tokens/s counts) as run_tokens.
    assert "14_samples: 3 of 16 prompts sampled before the kill; sampling the rest" in logs
    own = sum(c["num_tokens"] for line in jsonl(stage / "generations.jsonl") if line["id"] not in sampled_before
              for c in line["completions"])
    resumed, straight = meta(run_dir, "14_samples"), meta(ref, "14_samples")
    assert resumed["run_tokens"] == own < resumed["tokens"] == straight["tokens"] == straight["run_tokens"]
    assert (resumed["resumed_prompts"], straight["resumed_prompts"]) == (3, 0)


def test_changing_one_option_reruns_exactly_its_dependents(full_run, tmp_path):
    from w2s.pipeline import run_pipeline

    shutil.copytree(full_run["run_dir"], tmp_path / "tiny")
    recipe = write_recipe(full_run["world"], "tiny", min_confidence=0.8)
    _, status, _ = run_pipeline(recipe, runs_dir=tmp_path, progress=False, log=lambda *a: None, plot=False)
    # min_confidence changes the pairs, hence both preference models and everything that evaluates them.
    expected = {"15_pairs", "16_dpo", "17_orpo", "28_eval_stage2_dpo", "29_eval_stage2_orpo", "33_passk_stage2_dpo",
                "34_passk_stage2_orpo"}
    assert {s for s, v in status.items() if v == "ran"} == expected
    assert meta(tmp_path / "tiny", "15_pairs")["options"]["min_confidence"] == 0.8


def _dry_run_rows(text):
    """{stage: (status, why)} of a dry run's table."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 8 and cells[0] not in ("stage", "to do"):
            rows[cells[0]] = (cells[1], cells[2])
    return rows


def test_dry_run_says_what_a_rerun_will_do_and_why(full_run, tmp_path):
    from w2s.estimate import dry_run
    from w2s.pipeline import run_pipeline

    fresh = _dry_run_rows(dry_run(write_recipe(full_run["world"], "tiny"), runs_dir=tmp_path))
    assert fresh == {name: ("will run", "not run yet") for name in ALL_STAGES}
    shutil.copytree(full_run["run_dir"], tmp_path / "tiny")
    before = sorted((p, p.stat().st_mtime_ns) for p in (tmp_path / "tiny").rglob("*"))
    assert set(_dry_run_rows(dry_run(write_recipe(full_run["world"], "tiny"), runs_dir=tmp_path)).values()) == {
        ("done", "-")}
    recipe = write_recipe(full_run["world"], "tiny", min_confidence=0.8)
    rows = _dry_run_rows(dry_run(recipe, runs_dir=tmp_path))
    assert sorted((p, p.stat().st_mtime_ns) for p in (tmp_path / "tiny").rglob("*")) == before  # wrote nothing
    assert rows["15_pairs"] == ("will rerun", "min_confidence: 0.6 -> 0.8")
    assert rows["16_dpo"] == ("will rerun", "input 15_pairs changed")
    assert rows["14_samples"] == ("done", "-")
    # The real rerun runs exactly the stages the dry run listed.
    _, status, _ = run_pipeline(recipe, runs_dir=tmp_path, progress=False, log=lambda *a: None, plot=False)
    assert {s for s, v in status.items() if v == "ran"} == {s for s, (v, _) in rows.items() if v != "done"}


def test_dry_run_warns_when_it_plans_for_fewer_processes_than_the_tensor_parallelism(full_run, tmp_path, monkeypatch):
    import w2s.estimate as estimate

    real = estimate.load_recipe

    def with_tp_2(path):
        recipe = real(path)
        recipe.sampling.tp = 2
        return recipe

    monkeypatch.setattr(estimate, "load_recipe", with_tp_2)
    recipe = write_recipe(full_run["world"], "tiny")
    assert "tp = 2) needs a multiple of 2 processes; this plans for 1" in estimate.dry_run(recipe, runs_dir=tmp_path)
    assert "needs a multiple" not in estimate.dry_run(recipe, runs_dir=tmp_path, world=2)


# ---------------------------------------------------------------------------------------------------- bad input


def _write_bare_world(tmp_path, n_test):
    """train.jsonl (8 records of the world), test.jsonl (n_test) and weak/ and strong/ holding only a config.json."""
    from w2s.world import make_splits

    splits = make_splits(seed=0, n_train_1=4, n_train_2=4, n_test=n_test)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in splits["train_1"] + splits["train_2"]))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in splits["test"]))
    for name in ("weak", "strong"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")


@pytest.fixture
def fake_world(tmp_path, monkeypatch):
    """Data files and checkpoint dirs that hold only a config.json: enough for validation, and any attempt to load a
    model fails the test, which proves every error below comes before a model is loaded."""
    import w2s.checkpoint as checkpoint
    import w2s.runners as runners

    _write_bare_world(tmp_path, n_test=2)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(checkpoint, "load_model", no_model)
    monkeypatch.setattr(runners, "load_fresh", no_model)
    return tmp_path


def _run(world, text=None):
    from w2s.pipeline import run_pipeline

    recipe = world / "r.toml"
    if text is not None:
        recipe.write_text(text)
    elif not recipe.exists():
        recipe.write_text(RECIPE.format(name="bad", n_samples=N_SAMPLES, min_confidence=0.6, pass_k=PASS_K))
    return run_pipeline(recipe, runs_dir=world / "runs", progress=False, log=lambda *a: None, plot=False)


def test_malformed_jsonl_line_is_one_clear_error(fake_world):
    lines = (fake_world / "train.jsonl").read_text().splitlines()
    lines[2] = lines[2][:-1]  # a truncated line
    (fake_world / "train.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"train\.jsonl:3: not valid JSON"):
        _run(fake_world)
    assert not (fake_world / "runs").exists()  # validate_inputs read it before the run started, not stage 00_data


def test_missing_field_is_one_clear_error(fake_world):
    rows = [json.loads(line) for line in (fake_world / "test.jsonl").read_text().splitlines()]
    del rows[1]["question"]
    (fake_world / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"test\.jsonl:2: expected key 'question'"):
        _run(fake_world)


def test_unknown_recipe_key_is_one_clear_error(fake_world):
    text = RECIPE.format(name="bad", n_samples=N_SAMPLES, min_confidence=0.6, pass_k=PASS_K)
    with pytest.raises(ValueError, match=r"r\.toml: \[stage2\]: unknown key 'n_sample'"):
        _run(fake_world, text.replace("n_samples =", "n_sample ="))
    with pytest.raises(ValueError, match=r"r\.toml: \[strong_sft\]: unknown key 'learning_rate'"):
        _run(fake_world, text.replace("[strong_sft]\nlr =", "[strong_sft]\nlearning_rate ="))


def test_tensor_parallel_that_does_not_divide_the_processes_is_one_clear_error(fake_world):
    text = RECIPE.format(name="bad", n_samples=N_SAMPLES, min_confidence=0.6, pass_k=PASS_K)
    for key in ("tp", "weak_tp"):
        with pytest.raises(ValueError, match=rf"r\.toml: \[sampling\] {key} = 2 must divide the number of processes "
                                             rf"\(1\); .* or set {key} = 1"):
            _run(fake_world, text.replace("sample_max_new_tokens = 8\n", f"sample_max_new_tokens = 8\n{key} = 2\n"))
        assert not (fake_world / "runs").exists()  # nothing was started


def test_missing_checkpoint_is_one_clear_error(fake_world):
    shutil.rmtree(fake_world / "strong")
    with pytest.raises(ValueError, match=r"\[models\] strong: no checkpoint \(config\.json\) at .*strong"):
        _run(fake_world)
    assert not (fake_world / "runs").exists()  # nothing was started


def test_a_device_this_machine_lacks_stops_the_run_before_its_directory(fake_world, monkeypatch):
    """run_pipeline calls check_device after reading the inputs: [models] device = "cuda" on a machine without CUDA is
    one line before anything is started (else the first stage would fail only when it moves its model)."""
    import torch

    import w2s.pipeline as pipeline

    monkeypatch.setattr(pipeline, "validate_inputs", lambda recipe: None)  # the bare checkpoints pass as they are
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    text = RECIPE.format(name="bad", n_samples=N_SAMPLES, min_confidence=0.6, pass_k=PASS_K)
    with pytest.raises(ValueError, match=r"r\.toml: \[models\] device = 'cuda', but CUDA is not available here"):
        _run(fake_world, text.replace('device = "cpu"', 'device = "cuda"'))
    assert not (fake_world / "runs").exists()  # nothing was started


def test_the_run_directory_records_the_recipe_and_the_table_it_started_with(fake_world, monkeypatch):
    """run_pipeline writes recipe.json and stages.json ({stage: key} of its table, in run order) before its first
    stage: the report counts the stages of that table as the run (a stage a later recipe dropped is not)."""
    import w2s.pipeline as pipeline

    monkeypatch.setattr(pipeline, "validate_inputs", lambda recipe: None)  # the bare checkpoints pass as they are
    seen = {}
    monkeypatch.setattr(pipeline, "run_stages", lambda stages, ctx: seen.update(names=[s.name for s in stages]) or {})
    monkeypatch.setattr(pipeline, "report", lambda run_dir, plot: "")
    run_dir, status, _ = _run(fake_world)
    keys = json.loads((run_dir / "stages.json").read_text())
    assert list(keys) == seen["names"] and all(isinstance(k, str) and k for k in keys.values())
    assert json.loads((run_dir / "recipe.json").read_text())["name"] == "bad" and status == {}


def test_a_run_refuses_to_reuse_its_own_run_directory(fake_world):
    """w2s run --reuse runs/<this recipe's name>: taking its own stages would wipe them; refused before anything."""
    from w2s.pipeline import run_pipeline

    (fake_world / "r.toml").write_text(RECIPE.format(name="bad", n_samples=N_SAMPLES, min_confidence=0.6,
                                                     pass_k=PASS_K))
    with pytest.raises(ValueError, match=r"--reuse .*bad: that is this recipe's own run directory"):
        run_pipeline(fake_world / "r.toml", runs_dir=fake_world / "runs", progress=False, log=lambda *a: None,
                     plot=False, reuse=fake_world / "runs" / "bad")


def test_reuse_refuses_its_own_run_directory_and_one_without_finished_stages(tmp_path):
    """--reuse DONOR: the donor must be another run directory (taking its own stages would wipe them) that holds
    finished stages (*/meta.json)."""
    from w2s.pipeline import check_reuse

    run_dir = tmp_path / "runs" / "tiny"
    (run_dir / "00_data").mkdir(parents=True)
    (run_dir / "00_data" / "meta.json").write_text("{}")
    check_reuse(None, run_dir)  # no --reuse: nothing to check
    with pytest.raises(ValueError, match=r"--reuse .*tiny: that is this recipe's own run directory"):
        check_reuse(tmp_path / "runs" / ".." / "runs" / "tiny", run_dir)
    (tmp_path / "other" / "00_data").mkdir(parents=True)  # started, never finished
    with pytest.raises(ValueError, match=r"--reuse .*other: not a run directory with finished stages"):
        check_reuse(tmp_path / "other", run_dir)
    check_reuse(run_dir, tmp_path / "runs" / "new")


def test_cli_prints_one_error_line(fake_world):
    from click.testing import CliRunner

    from w2s.cli import main

    shutil.rmtree(fake_world / "weak")
    (fake_world / "r.toml").write_text(RECIPE.format(name="bad", n_samples=N_SAMPLES, min_confidence=0.6,
                                                     pass_k=PASS_K))
    result = CliRunner().invoke(main, ["run", str(fake_world / "r.toml"), "--runs", str(fake_world / "runs")])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "[models] weak" in lines[0]


def test_report_from_hand_written_metas(tmp_path):
    """PGR and every table cell from meta.json files written by hand (no pipeline run)."""
    from w2s.report import report

    def stage(name, **meta):
        (tmp_path / name).mkdir()
        (tmp_path / name / "meta.json").write_text(json.dumps({"stage": name, "wall_s": 6.0, **meta}))

    stage("20_eval_weak_floor", accuracy=0.25, tokens=1000, tok_s=500.0, mfu=0.123, peak_mem_gib=1.5, device="H100")
    stage("27_eval_stage1_r2_hybrid", accuracy=0.5)
    stage("28_eval_stage2_dpo", accuracy=0.6)
    stage("30_eval_ceiling", accuracy=0.75)
    stage("04_r1_filter", n_questions=100, n_kept=40, kept_fraction=0.4, precision=0.9)
    stage("15_pairs", n_pairs=30, pair_precision=0.8, counts={"questions": 100, "weak_chosen": 20, "weak_rejected": 10})
    text = report(tmp_path, plot=False)
    rows = {}  # first cell -> the other cells of its FIRST row (a stage also has a row in the cost table, later)
    for line in text.splitlines():
        if line.startswith("| "):
            rows.setdefault(line.split("|")[1].strip(), [c.strip() for c in line.split("|")[2:-1]])
    assert rows["weak floor (weak model)"] == ["25.00", "0.000"]
    assert rows["Stage I r2: hybrid-ft (M_plus)"] == ["50.00", "0.500"]  # (0.5 - 0.25) / (0.75 - 0.25)
    assert rows["Stage II: DPO (M_pro)"] == ["60.00", "0.700"]
    assert rows["strong ceiling (gold train_2)"] == ["75.00", "1.000"]
    assert rows["04_r1_filter"] == ["100", "40", "40.0", "90.0", "-"]
    assert rows["15_pairs"] == ["100", "30", "-", "80.0", "20 weak chosen / 10 weak rejected"]
    assert rows["20_eval_weak_floor"] == ["6.0", "1,000", "500", "12.3", "1.50"]
    assert "total 0.6 min on H100" in text
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        report(tmp_path / "missing")
    (tmp_path / "a.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match=r"a\.jsonl: is a file, expected a run directory \(runs/<recipe name>\)$"):
        report(tmp_path / "a.jsonl")
    # a hand-edited number that is a string is named with its file before any table is computed
    for key, value, where in (("wall_s", "6", "wall_s is '6'; expected a number"),
                              ("accuracy_by_grader", {"paper": True},
                               "accuracy_by_grader.paper is True; expected a number"),
                              ("accuracy_by_grader", 0.6, "accuracy_by_grader is 0.6; expected an object"),
                              ("counts", {"questions": "9"}, "counts.questions is '9'; expected a number"),
                              ("accuracy", None, "accuracy is None; expected a number"),
                              ("wall_s", {"a": 1}, r"wall_s is \{'a': 1\}; expected a number"),
                              ("accuracy_by_grader", None, "accuracy_by_grader is None; expected an object"),
                              ("device", ["H100"], r"device is \['H100'\]; expected a string")):
        meta = json.loads((tmp_path / "28_eval_stage2_dpo" / "meta.json").read_text())
        (tmp_path / "28_eval_stage2_dpo" / "meta.json").write_text(json.dumps({**meta, key: value}))
        with pytest.raises(ValueError, match=rf"^{tmp_path}/28_eval_stage2_dpo/meta.json: {where}$"):
            report(tmp_path, plot=False)
        (tmp_path / "28_eval_stage2_dpo" / "meta.json").write_text(json.dumps(meta))
    # a pairs stage's counts also hold flags (the confidence weighting's weak_relabelled): they are not numbers
    meta = json.loads((tmp_path / "15_pairs" / "meta.json").read_text())
    meta["counts"]["weak_relabelled"] = True
    (tmp_path / "15_pairs" / "meta.json").write_text(json.dumps(meta))
    meta["wall_s"] = None  # a stage without a wall time counts as none in the totals
    (tmp_path / "15_pairs" / "meta.json").write_text(json.dumps(meta))
    assert "20 weak chosen / 10 weak rejected" in report(tmp_path, plot=False)


def test_report_shows_every_grader_their_disagreements_and_truncation(tmp_path):
    """From hand-written meta.json files: the headline follows the recipe's grader, every grader gets a column, and
    the pairs of graders that judge test questions differently are counted; truncated responses per stage."""
    from w2s.report import method_accuracies, report

    def stage(name, **meta):
        (tmp_path / name).mkdir()
        (tmp_path / name / "meta.json").write_text(json.dumps({"stage": name, "wall_s": 1.0, **meta}))

    graded = dict(grader="paper", accuracy=0.2, no_answer_by_grader={"paper": 30, "equivalence": 2},
                  grader_disagreements={"paper/equivalence": 15})
    stage("20_eval_weak_floor", accuracy_by_grader={"paper": 0.2, "equivalence": 0.35}, n_completions=100,
          n_truncated=7, **graded)
    stage("30_eval_ceiling", accuracy_by_grader={"paper": 0.8, "equivalence": 0.8}, n_completions=100,
          n_truncated=0, **{**graded, "accuracy": 0.8, "grader_disagreements": {"paper/equivalence": 0}})
    stage("04_r1_filter", n_questions=100, n_kept=40, kept_fraction=0.4, precision=0.9,
          n_truncated={"weak": 3, "other": 5, "kept": 1})
    stage("32_passk_stage1_plus", **{"pass@1": 0.5, "pass@10": 0.9},
          pass_by_grader={"paper": {"pass@1": 0.5, "pass@10": 0.9}, "equivalence": {"pass@1": 0.6, "pass@10": 0.95}})
    (tmp_path / "recipe.json").write_text(json.dumps({"data": {"grader": "equivalence"}}))

    def table_rows(text):  # first cell -> the other cells of each of its rows, in order
        rows = {}
        for line in text.splitlines():
            if line.startswith("| "):
                rows.setdefault(line.split("|")[1].strip(), []).append([c.strip() for c in line.split("|")[2:-1]])
        return rows

    text = report(tmp_path, plot=False)
    rows = table_rows(text)
    assert "Grader: equivalence" in text
    assert rows["weak floor (weak model)"][0] == ["35.00", "0.000"]  # the headline: the recipe's grader
    assert rows["weak floor (weak model)"][1] == ["20.00", "35.00", "30 / 2", "paper/equivalence 15"]
    assert rows["strong ceiling (gold train_2)"][1] == ["80.00", "80.00", "30 / 2", "paper/equivalence 0"]
    assert rows["20_eval_weak_floor"][0] == ["100", "7", "7.0"]
    assert rows["04_r1_filter"][1] == ["-", "weak 3, other 5, kept 1", "-"]
    assert rows["stage1_plus"][0] == ["pass@1 60.0, pass@10 95.0",
                                      "paper: pass@1 50.0, pass@10 90.0; equivalence: pass@1 60.0, pass@10 95.0"]
    assert method_accuracies({}) == {}
    (tmp_path / "recipe.json").unlink()  # no recipe: each stage's own headline
    assert table_rows(report(tmp_path, plot=False))["weak floor (weak model)"][0][0] == "20.00"


def test_report_marks_the_last_rounds_hybrid_as_m_plus(tmp_path):
    """M_plus is the last Stage I round's hybrid model: round 2 when two rounds ran, round 1 under a one-round recipe
    (MATH), and only that row carries the label."""
    from w2s.report import report

    def row_labels(methods):
        run = tmp_path / "_".join(methods)
        for i, method in enumerate(methods):
            (run / f"{20 + i}_eval_{method}").mkdir(parents=True)
            (run / f"{20 + i}_eval_{method}" / "meta.json").write_text(json.dumps({"accuracy": 0.5}))
        return [line.split("|")[1].strip() for line in report(run, plot=False).splitlines() if "hybrid-ft" in line]

    assert row_labels(["stage1_r1_hybrid", "stage2_dpo"]) == ["Stage I r1: hybrid-ft (M_plus)"]
    assert row_labels(["stage1_r1_hybrid", "stage1_r2_hybrid"]) == ["Stage I r1: hybrid-ft",
                                                                    "Stage I r2: hybrid-ft (M_plus)"]
    broken = tmp_path / "broken" / "01_x" / "meta.json"
    broken.parent.mkdir(parents=True)
    broken.write_text('{"a":\n')
    with pytest.raises(ValueError, match=rf"^{broken}:2: not valid JSON \(Expecting value\)$"):
        report(broken.parent.parent, plot=False)
    broken.write_text("[1]")  # valid JSON, not a stage's record: an AttributeError traceback before
    with pytest.raises(ValueError, match=rf"^{broken}: expected a JSON object, got list$"):
        report(broken.parent.parent, plot=False)
    broken.write_text("{}")
    (broken.parent.parent / "recipe.json").write_text("{bad")
    with pytest.raises(ValueError, match=r"broken/recipe\.json:1: not valid JSON"):
        report(broken.parent.parent, plot=False)
    assert row_labels(["weak_floor"]) == []  # a run still in Stage I: no hybrid evaluated yet, no label, no error


def _write_metas(run, metas, recipe=None):
    """Hand-written meta.json files {stage: meta} (and recipe.json) of a run directory."""
    for name, meta in metas.items():
        (run / name).mkdir(parents=True)
        (run / name / "meta.json").write_text(json.dumps({"stage": name, "wall_s": 1.0, **meta}))
    if recipe is not None:
        (run / "recipe.json").write_text(json.dumps(recipe))


def _first_rows(text):
    """first cell -> the other cells of its FIRST row, for every table row of a report."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| "):
            rows.setdefault(line.split("|")[1].strip(), [c.strip() for c in line.split("|")[2:-1]])
    return rows


@pytest.mark.parametrize("how", ["recipe", "data stage"])
def test_report_without_gold_compares_each_method_with_the_weak_model_as_is(tmp_path, how):
    """The setting without gold (docs/PAPER.md), told by the recipe's [data] train_2 or, for hand-made metas, by a
    data stage with no train_1: no PGR but the difference in points to the weak model (signed), the weak row named
    as the model used as is, and no precision column for the selected data (no gold to measure it by)."""
    from w2s.report import report

    metas = {"20_eval_weak_floor": {"accuracy": 0.3}, "27_eval_stage1_r2_hybrid": {"accuracy": 0.25},
             "28_eval_stage2_dpo": {"accuracy": 0.45},
             "04_r1_filter": {"n_questions": 12, "n_kept": 6, "kept_fraction": 0.5}}
    if how == "recipe":
        _write_metas(tmp_path, metas, {"data": {"train_2": "questions.jsonl"}})
    else:
        _write_metas(tmp_path, {"00_data": {"n_train_1": 0, "n_train_2": 12}, **metas})
    text = report(tmp_path, plot=False)
    rows = _first_rows(text)
    assert rows["method"] == ["accuracy %", "vs weak"] and "No PGR" in text
    assert rows["weak model (as is)"] == ["30.00", "+0.00"]
    assert rows["Stage I r2: hybrid-ft (M_plus)"] == ["25.00", "-5.00"]  # 25 - 30 points
    assert rows["Stage II: DPO (M_pro)"] == ["45.00", "+15.00"]
    assert rows["stage"] == ["questions", "kept / pairs", "kept %", "pairs"]  # the selected data: no precision
    assert rows["04_r1_filter"] == ["12", "6", "50.0", "-"]


def test_report_reads_each_row_from_its_own_stage(tmp_path):
    """A Stage II round's pairs are selected data too; the grader table reads a method from its NN_eval_ stage (not
    the training stage 19_ceiling whose name it shares); MATH levels follow the recipe's grader; a stage with no
    truncated response still gets its row; numbers of a thousand or more are grouped."""
    from w2s.report import report

    _write_metas(tmp_path, {
        "19_ceiling": {"kind": "train", "wall_s": 1234.5},
        "20_eval_weak_floor": {"accuracy": 0.2, "accuracy_by_grader": {"paper": 0.2}, "n_completions": 10,
                               "n_truncated": 0, "accuracy_by_level": {"1": 0.9},
                               "accuracy_by_level_by_grader": {"paper": {"1": 0.5}}},
        "30_eval_ceiling": {"accuracy": 0.8, "accuracy_by_grader": {"paper": 0.8}},
        "38_round2_pairs_dpo": {"n_pairs": 7, "pair_precision": 0.5, "counts": {"questions": 9, "weak_chosen": 4,
                                                                                 "weak_rejected": 3}},
    }, {"data": {"grader": "paper"}})
    text = report(tmp_path, plot=False)
    rows = {}
    for line in text.splitlines():
        if line.startswith("| "):
            rows.setdefault(line.split("|")[1].strip(), []).append([c.strip() for c in line.split("|")[2:-1]])
    assert rows["38_round2_pairs_dpo"][0] == ["9", "7", "-", "50.0", "4 weak chosen / 3 weak rejected"]
    assert rows["strong ceiling (gold train_2)"][1] == ["80.00", "-", "-"]  # the grader table: 30_eval_ceiling's
    assert rows["weak_floor"] == [["L1 50"]]  # the paper grader's level accuracy, not the stage's own
    assert rows["20_eval_weak_floor"][0] == ["10", "0", "0.0"]  # 0 of 10 responses truncated
    assert rows["19_ceiling"][-1] == ["1,234.5", "-", "-", "-", "-"]  # the cost table


def test_report_m_plus_defaults_and_accuracies_under_the_recipe_grader(tmp_path):
    """A recipe without [stage2] start_from makes the last round's hybrid-ft model M_plus (the paper's); a stage
    scored under the recipe's grader counts even without its own "accuracy"; a run with no evaluated method yet
    gets no figure."""
    from w2s.report import method_accuracies, report, write_report

    _write_metas(tmp_path / "a", {"26_eval_stage1_r2_icl": {"accuracy": 0.5},
                                  "27_eval_stage1_r2_hybrid": {"accuracy": 0.4}}, {"stage1": {"rounds": 2}})
    rows = _first_rows(report(tmp_path / "a", plot=False))
    assert "Stage I r2: hybrid-ft (M_plus)" in rows and "Stage I r2: icl-ft" in rows
    assert method_accuracies({"28_eval_stage2_dpo": {"accuracy_by_grader": {"paper": 0.6}}}, "paper") == {
        "stage2_dpo": 0.6}
    _write_metas(tmp_path / "b", {"00_data": {"n_train_1": 8, "n_train_2": 8}})
    assert write_report(tmp_path / "b", plot=True)[1] == [tmp_path / "b" / "report.md"]


# ---------------------------------------------------------------------------------------------------- torchrun


@pytest.mark.parametrize("tp", [1, 2])
def test_torchrun_two_processes_match_one(full_run, tmp_path, tp):
    """scripts/pipeline.py under torchrun (2 gloo processes: FSDP2 training with the checkpoint read by rank 0 only;
    sampling data-parallel (tp 1) or tensor-parallel (tp 2: each rank reads half of every block, and a trained model
    is reloaded sharded instead of kept resident; the weak model stays data-parallel, weak_tp 1) gives the same stage
    keys and artifacts as the single-process run, for every stage the two recipes share."""
    import os
    import subprocess
    import sys

    recipe = write_recipe(full_run["world"], f"tiny_torchrun_tp{tp}")
    text = recipe.read_text().replace("rounds = 2", "rounds = 1").replace('["dpo", "orpo"]', '["dpo"]')
    text = text.replace("sample_max_new_tokens = 8\n", f"sample_max_new_tokens = 8\ntp = {tp}\n")
    recipe.write_text(text.replace(f"pass_k_samples = {PASS_K}", "pass_k_samples = 0\nbaselines = []"))
    script = Path(__file__).resolve().parents[1] / "scripts" / "pipeline.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={29517 + tp}",
           str(script), str(recipe), "--runs", str(tmp_path), "--no-progress"]
    # PYTHONFAULTHANDLER: should a rank abort natively (gloo's "terminate called without an active exception", seen
    # on a loaded CI machine), every thread's Python stack lands in the stderr the assertion shows
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-8000:]
    run_dir, ref = tmp_path / f"tiny_torchrun_tp{tp}", full_run["run_dir"]
    shared = ["00_data", "01_weak_sft", "02_weak_labels", "03_icl_labels", "04_r1_filter", "05_r1_sft_weak",
              "06_r1_sft_icl", "07_r1_sft_hybrid", "20_eval_weak_floor", "22_eval_stage1_r1_weak",
              "23_eval_stage1_r1_icl", "24_eval_stage1_r1_hybrid"]
    for name in shared:
        assert meta(run_dir, name)["key"] == meta(ref, name)["key"], name
        for f in ("labels.jsonl", "hybrid.jsonl", "train_2.jsonl"):
            if (ref / name / f).is_file():
                assert (run_dir / name / f).read_text() == (ref / name / f).read_text(), (name, f)
        if meta(ref, name)["kind"] == "train":  # FSDP2 sums gradients over ranks: the same loss as one process
            assert meta(run_dir, name)["final_loss"] == pytest.approx(meta(ref, name)["final_loss"], rel=1e-4)
    assert (run_dir / "16_dpo" / "model" / "config.json").is_file() and "Stage II: DPO" in proc.stdout
    assert meta(run_dir, "02_weak_labels")["tp"] == meta(run_dir, "20_eval_weak_floor")["tp"] == 1  # weak_tp
    assert meta(run_dir, "03_icl_labels")["tp"] == meta(run_dir, "28_eval_stage2_dpo")["tp"] == tp


# ---------------------------------------------------------------------------------------------------- evaluate.py


def _evaluate_script():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "evaluate.py"
    spec = importlib.util.spec_from_file_location("evaluate_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evaluate_script_matches_the_pipeline(full_run, tmp_path, capsys):
    evaluate = _evaluate_script()
    run_dir, test_file = full_run["run_dir"], str(full_run["world"] / "test.jsonl")
    common = [test_file, "--dtype", "float32", "--device", "cpu", "--max-new-tokens", "8", "--no-progress"]
    greedy = evaluate.main([str(run_dir / "01_weak_sft" / "model"), *common, "--out", str(tmp_path / "g.jsonl")])
    assert greedy["accuracy"] == meta(run_dir, "20_eval_weak_floor")["accuracy"] and greedy["n_questions"] == 8
    texts = [g["completions"][0]["text"] for g in jsonl(tmp_path / "g.jsonl")]
    assert texts == [g["completions"][0]["text"] for g in jsonl(run_dir / "20_eval_weak_floor" / "generations.jsonl")]
    sampled = evaluate.main([str(run_dir / "13_r2_sft_hybrid" / "model"), *common, "--samples", str(PASS_K),
                             "--out", str(tmp_path / "s.jsonl")])
    ref = meta(run_dir, "32_passk_stage1_plus")
    assert sampled["pass@1"] == ref["pass@1"] and sampled[f"pass@{PASS_K}"] == ref[f"pass@{PASS_K}"]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == sampled
    assert json.loads((tmp_path / "s.jsonl.result.json").read_text()) == sampled
    # The same command resumes (nothing left to sample); another checkpoint or other options on the same output are
    # refused before any model loads: their generations would have been scored as the new model's.
    weak = str(run_dir / "01_weak_sft" / "model")
    assert evaluate.main([weak, *common, "--out", str(tmp_path / "g.jsonl")]) == greedy
    for other in ([str(run_dir / "13_r2_sft_hybrid" / "model"), *common],
                  [weak, *common, "--max-new-tokens", "9"]):
        with pytest.raises(ValueError, match=r"g\.jsonl: was sampled with other options \((checkpoint|max_new_tok)"):
            evaluate.main([*other, "--out", str(tmp_path / "g.jsonl")])


def test_evaluate_script_scores_a_lora_adapter_as_its_merged_model(full_run, tmp_path):
    """An adapter directory (what sft.py / dpo.py write with --lora-rank) evaluates as the merged copy of it, its
    tokenizer read from its base when it has none of its own; an evaluation written into a checkpoint directory
    (the default output) resumes there."""
    import w2s
    from w2s.pipeline import ckpt_fingerprint
    from w2s.train import TrainConfig, train_sft

    evaluate = _evaluate_script()
    base = full_run["run_dir"] / "01_weak_sft" / "model"
    rows = [{"prompt": f"Question: {i} + 1?\nAnswer:", "response": f" {i + 1}"} for i in range(8)]
    cfg = TrainConfig(lr=1e-2, batch_size=4, micro_batch_size=4, max_steps=2, lora_rank=4, lora_alpha=8.0,
                      export_merged=True, progress=False)
    train_sft(w2s.load_model(base, dtype=torch.float32), w2s.load_tokenizer(base), rows, cfg, out_dir=tmp_path / "a")
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / "a" / name).unlink(missing_ok=True)
    assert (tmp_path / "a" / "adapter_config.json").is_file() and not (tmp_path / "a" / "config.json").exists()
    common = [str(full_run["world"] / "test.jsonl"), "--dtype", "float32", "--device", "cpu", "--max-new-tokens", "8",
              "--no-progress"]
    adapter = evaluate.main([str(tmp_path / "a"), *common, "--out", str(tmp_path / "a.jsonl")])
    merged_dir = tmp_path / "a" / "merged"
    identity = ckpt_fingerprint(merged_dir)
    merged = evaluate.main([str(merged_dir), *common])  # the default output: inside the checkpoint directory
    assert adapter["accuracy"] == merged["accuracy"] and adapter["n_questions"] == merged["n_questions"] == 8
    out = merged_dir / "eval_test_greedy.jsonl"
    assert [g["completions"] for g in jsonl(tmp_path / "a.jsonl")] == [g["completions"] for g in jsonl(out)]
    # Its records (OUT.meta.json, OUT.result.json) are not part of the checkpoint's identity: the same command
    # resumes (it was refused as sampled from another checkpoint), and no stage key that reads the model changes.
    assert ckpt_fingerprint(merged_dir) == identity and evaluate.main([str(merged_dir), *common]) == merged


def test_evaluate_script_help_and_bad_input(full_run, tmp_path, monkeypatch, capsys):
    import w2s.checkpoint as checkpoint

    evaluate = _evaluate_script()
    with pytest.raises(SystemExit) as info:
        evaluate.parse_args(["--help"])
    assert info.value.code == 0 and "pass@k" in capsys.readouterr().out
    bad = tmp_path / "test.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q2"}\n')
    (tmp_path / "good.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n')
    monkeypatch.setattr(checkpoint, "load_model", lambda *a, **k: pytest.fail("model loaded before the data check"))
    with pytest.raises(ValueError, match=r"test\.jsonl:2: expected key 'answer'"):
        evaluate.main([str(tmp_path), str(bad)])
    (tmp_path / "a_file").write_text("")
    for args, message in ((["--limit", "-2"], "--limit -2: expected >= 0"),  # test[:-2] scored 2 of 4 silently
                          (["--out", str(tmp_path)], "is a directory, expected the path of a jsonl file"),
                          (["--out", str(tmp_path / "a_file" / "x.jsonl")], "a parent of it is a file")):
        with pytest.raises(ValueError, match=message):  # at once: before the model loads and everything is sampled
            evaluate.main([str(tmp_path), str(bad), *args])
    with pytest.raises(ValueError, match=r"^temperature=nan: expected a finite number >= 0$"):  # before the load too
        evaluate.main([str(tmp_path), str(bad), "--samples", "2", "--temperature", "nan"])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"empty\.jsonl: (no questions|.*empty)"):
        evaluate.main([str(tmp_path), str(tmp_path / "empty.jsonl")])
    with pytest.raises(ValueError, match=r"config\.json: no config\.json"):  # before the model loads
        evaluate.main([str(tmp_path), str(tmp_path / "good.jsonl")])
    with pytest.raises(ValueError, match=r"--device foo: expected auto, cpu, cuda or cuda:N"):
        evaluate.main([str(full_run["run_dir"] / "01_weak_sft" / "model"), str(tmp_path / "good.jsonl"), "--device",
                       "foo"])


# ---------------------------------------------------------------------------------------------------- runners alone


def _runner_ctx(tmp_path):
    """A Context over a run directory of the 8-record world (checkpoints are bare config.json files: no runner here
    loads a model), [data] n_test = 2 and n_train_1 = 3 (train_2: half the file, 4)."""
    from w2s.engine import Context
    from w2s.recipe import load_recipe

    _write_bare_world(tmp_path, n_test=3)
    text = RECIPE.format(name="r", n_samples=N_SAMPLES, min_confidence=0.6, pass_k=PASS_K)
    (tmp_path / "r.toml").write_text(text.replace("seed = 0\n", "seed = 0\nn_test = 2\nn_train_1 = 3\n", 1))
    return Context(load_recipe(tmp_path / "r.toml"), tmp_path / "run", progress=False, log=lambda *a: None)


def _stage_dir(ctx, name):
    (ctx.dir(name)).mkdir(parents=True, exist_ok=True)
    return ctx.dir(name)


def test_data_stage_keeps_train_2_gold_apart_and_the_test_stage_takes_the_first_n_test(tmp_path):
    from w2s.runners import GOLD_FILE, run_data, run_test_set
    from w2s.tasks import load_records

    ctx = _runner_ctx(tmp_path)
    train = {r["id"]: r for r in load_records("gsm8k", tmp_path / "train.jsonl")}
    assert run_data(ctx, _stage_dir(ctx, "00_data")) == {"n_train_1": 3, "n_train_2": 4}
    train_2 = jsonl(ctx.dir("00_data") / "train_2.jsonl")
    assert [sorted(r) for r in train_2] == [["id", "question"]] * 4  # questions only
    assert jsonl(ctx.dir("00_data") / GOLD_FILE) == [
        {"id": r["id"], "answer": train[r["id"]]["answer"], "solution": train[r["id"]]["solution"]} for r in train_2]
    assert [r["solution"] for r in jsonl(ctx.dir("00_data") / "train_1.jsonl")] == [
        train[r["id"]]["solution"] for r in jsonl(ctx.dir("00_data") / "train_1.jsonl")]  # train_1 keeps its gold
    assert run_test_set(ctx, _stage_dir(ctx, "00_test")) == {"n_test": 2}
    assert jsonl(ctx.dir("00_test") / "test.jsonl") == load_records("gsm8k", tmp_path / "test.jsonl")[:2]


def test_filter_counts_and_precision_by_hand(tmp_path):
    """Weak and ICL labels of 4 train_2 questions: q0 both right, q1 both the same wrong answer, q2 both right with
    the weak response truncated, q3 no weak answer. Kept: q0-q2 (3 of 4); precision of the kept weak answers 2 / 3,
    of every weak answer 2 / 4; sets of 3, 3 and 6 rows (hybrid: both responses)."""
    from w2s.runners import GOLD_FILE, run_data, run_filter

    ctx = _runner_ctx(tmp_path)
    run_data(ctx, _stage_dir(ctx, "00_data"))
    questions = jsonl(ctx.dir("00_data") / "train_2.jsonl")
    gold = [PAPER.gold(g["answer"]) for g in jsonl(ctx.dir("00_data") / GOLD_FILE)]
    assert "99999" not in gold
    weak = [f"#### {gold[0]}", "#### 99999", f"#### {gold[2]}", "I do not know"]
    icl = [f"#### {gold[0]}", "#### 99999", f"#### {gold[2]}", f"#### {gold[3]}"]
    for stage, responses, truncated in (("02_weak_labels", weak, [False, False, True, False]),
                                        ("03_icl_labels", icl, [False] * 4)):
        (_stage_dir(ctx, stage) / "labels.jsonl").write_text("".join(
            json.dumps(q | {"response": r, "truncated": t}) + "\n" for q, r, t in zip(questions, responses, truncated)))
    counts = run_filter(ctx, _stage_dir(ctx, "04_r1_filter"), "02_weak_labels", "03_icl_labels")
    assert (counts["n_questions"], counts["n_kept"], counts["kept_fraction"]) == (4, 3, 0.75)
    assert counts["precision"] == pytest.approx(2 / 3) and counts["precision_weak_all"] == 0.5
    assert counts["n_with_answer"] == {"weak": 3, "other": 4}
    assert counts["n_truncated"] == {"weak": 1, "other": 0, "kept": 1}
    assert counts["n_rows"] == {"weak": 3, "icl": 3, "hybrid": 6}
    assert [r["response"] for r in jsonl(ctx.dir("04_r1_filter") / "icl.jsonl")] == icl[:3]
    # the weak self-consistency filter (weak_min_confidence 0.6): q0 and q2 get 3 of 5 weak samples, q1 2 of 5
    votes = {0: [gold[0]] * 3 + ["1", "2"], 1: ["99999"] * 2 + ["1", "2", "4"], 2: [gold[2]] * 3 + ["1", "2"],
             3: ["1"] * 5}
    (_stage_dir(ctx, "02_weak_samples") / "labels.jsonl").write_text("".join(json.dumps(q | {"samples": [
        {"response": f"#### {a}", "truncated": False} for a in votes[i]]}) + "\n" for i, q in enumerate(questions)))
    counts = run_filter(ctx, _stage_dir(ctx, "10_filter"), "02_weak_labels", "03_icl_labels", "02_weak_samples")
    assert (counts["n_consistent_before_weak_filter"], counts["n_kept"], counts["n_weak_confident"]) == (3, 2, 3)


def test_training_stages_train_on_the_rows_the_paper_gives_them(tmp_path, monkeypatch):
    """weak SFT: train_1's gold solutions; full weak fine-tuning: every weak label; the ceiling: train_2's gold
    solutions (its one gold reader besides the analysis); preference: the pairs with their weights, the model merged
    for the losses in [stage2] export_merged. Every prompt is the zero-shot prompt of the question."""
    import w2s.runners as runners

    ctx = _runner_ctx(tmp_path)
    runners.run_data(ctx, _stage_dir(ctx, "00_data"))
    trained = {}

    def train_stage(ctx, out, base_dir, rows, section, loss=None, export_merged=False):
        trained[out.name] = (Path(base_dir).name, rows, section, export_merged)
        return {}

    monkeypatch.setattr(runners, "train_stage", train_stage)
    train_1, train_2 = (jsonl(ctx.dir("00_data") / f"{s}.jsonl") for s in ("train_1", "train_2"))
    gold = {g["id"]: g for g in jsonl(ctx.dir("00_data") / runners.GOLD_FILE)}
    (_stage_dir(ctx, "02_weak_labels") / "labels.jsonl").write_text("".join(
        json.dumps(q | {"response": f"#### {i}"}) + "\n" for i, q in enumerate(train_2)))
    pairs = [{"id": train_2[0]["id"], "prompt": "p", "chosen": "#### 1", "rejected": "#### 2", "weight": 0.5},
             {"id": train_2[1]["id"], "prompt": "p", "chosen": "#### 3", "rejected": "#### 4"}]
    (_stage_dir(ctx, "15_pairs") / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    ctx.recipe.stage2.export_merged = ["dpo"]
    for name, run, args in (("01_weak_sft", runners.run_weak_sft, {}),
                            ("18_full_weak_ft", runners.run_full_weak_ft, {}), ("19_ceiling", runners.run_ceiling, {}),
                            ("16_dpo", runners.run_preference, dict(pairs="15_pairs", init="strong", loss="dpo")),
                            ("17_orpo", runners.run_preference, dict(pairs="15_pairs", init="strong", loss="orpo"))):
        run(ctx, _stage_dir(ctx, name), **args)
    assert trained["01_weak_sft"] == ("weak", [{"id": r["id"], "prompt": zero_shot_prompt(r["question"]),
                                                "response": r["solution"]} for r in train_1], "weak_sft", False)
    assert trained["18_full_weak_ft"] == ("strong", [{"id": q["id"], "prompt": zero_shot_prompt(q["question"]),
                                                      "response": f"#### {i}"} for i, q in enumerate(train_2)],
                                          "strong_sft", False)
    assert trained["19_ceiling"] == ("strong", [{"id": q["id"], "prompt": zero_shot_prompt(q["question"]),
                                                 "response": gold[q["id"]]["solution"]} for q in train_2],
                                     "strong_sft", False)
    rows = [{k: p[k] for k in ("id", "prompt", "chosen", "rejected", "weight") if k in p} for p in pairs]
    assert trained["16_dpo"] == ("strong", rows, "preference", True)
    assert trained["17_orpo"] == ("strong", rows, "preference", False)


def test_sampling_stages_ask_for_their_token_limits_temperatures_and_tensor_parallelism(tmp_path, monkeypatch):
    """Greedy evaluation at [sampling] max_new_tokens, pass@k and Stage II's samples at sample_max_new_tokens and
    Stage II's temperature, n_samples by default; the weak model (as is, or 01's) at weak_tp, the others at tp; only a
    run with [data] train_2 has no train_2 gold; a chat-template prompt carries BOS once."""
    import w2s.runners as runners

    ctx = _runner_ctx(tmp_path)
    runners.run_data(ctx, _stage_dir(ctx, "00_data"))
    runners.run_test_set(ctx, _stage_dir(ctx, "00_test"))
    asked = []

    def generate_stage(ctx, out, model_dir, records, prompt, n=1, temperature=0.0, top_p=1.0, max_new_tokens=None,
                       seed=0):
        asked.append((out.name, n, temperature, max_new_tokens))
        rows = [{"id": r["id"], "question": r["question"], "response": "#### 1", "truncated": False} for r in records]
        return (rows if n == 1 else [r | {"samples": [{"response": "#### 1", "truncated": False}] * n}
                                     for r in rows]), {}

    monkeypatch.setattr(runners, "generate_stage", generate_stage)
    r = ctx.recipe
    r.sampling.max_new_tokens, r.sampling.sample_max_new_tokens, r.stage2.temperature = 7, 9, 0.8
    runners.run_eval(ctx, _stage_dir(ctx, "20_eval_weak_floor"), "01_weak_sft", "zero_shot")
    runners.run_eval(ctx, _stage_dir(ctx, "32_passk"), "13_r2_sft_hybrid", "zero_shot", n=3, temperature=1.0)
    runners.run_samples(ctx, _stage_dir(ctx, "14_samples"), "13_r2_sft_hybrid")
    runners.run_samples(ctx, _stage_dir(ctx, "02_weak_samples"), "01_weak_sft", n=2)
    assert asked == [("20_eval_weak_floor", 1, 0.0, 7), ("32_passk", 3, 1.0, 9), ("14_samples", N_SAMPLES, 0.8, 9),
                     ("02_weak_samples", 2, 0.8, 9)]
    r.sampling.tp, r.sampling.weak_tp = 2, 1
    assert [runners.sampling_tp(ctx, runners.checkpoint(ctx, m)) for m in ("weak", "01_weak_sft", "strong",
                                                                          "13_r2_sft_hybrid")] == [1, 1, 2, 2]
    assert runners.has_train_2_gold(ctx)
    r.data.train_2 = "questions.jsonl"
    assert not runners.has_train_2_gold(ctx)

    class Tok:  # a template that writes BOS (id 0) itself, and one that does not
        add_bos, bos_id = True, 0

        def __init__(self, writes_bos):
            self.writes_bos = writes_bos

        def apply_chat_template(self, messages):
            return messages[0]["content"]

        def encode(self, text, bos=True):
            return ([0] if self.writes_bos else []) + [5, 6]

    assert [runners.chat_prompt(Tok(w), "Question: 1 + 1?\nAnswer:") for w in (True, False)] == [[0, 5, 6]] * 2


def test_a_questions_file_with_a_repeated_id_is_refused(tmp_path):
    from w2s.runners import load_questions

    (tmp_path / "q.jsonl").write_text('{"id": "a", "question": "Q1?"}\n{"id": "a", "question": "Q2?"}\n')
    with pytest.raises(ValueError, match="duplicate ids"):
        load_questions("gsm8k", tmp_path / "q.jsonl")


def test_pairs_stage_counts_precision_by_kind_truncation_and_the_weak_filter_by_hand(tmp_path):
    """5 samples per question, docs/PAPER.md Stage II step 3 (min_confidence 0.6, flip 0.8): q0 weak = a+ (4 of 5)
    -> weak chosen over the other sample (truncated); q1 and q2 weak != a+ at 5 of 5 -> an a+ sample chosen over the
    weak response (q2's a+ is wrong, its weak response truncated); q3 a+ at 1 of 5 -> none. Precision against gold:
    all 2 / 3, weak-chosen 1 / 1, weak-rejected 1 / 2. With the weak self-consistency filter q1's weak label (2 of 5)
    is absent: no pair. With margin weights: (4 - 1) / 5, 5 / 5, 5 / 5."""
    import w2s.runners as runners

    ctx = _runner_ctx(tmp_path)
    runners.run_data(ctx, _stage_dir(ctx, "00_data"))
    questions = jsonl(ctx.dir("00_data") / "train_2.jsonl")
    gold = [PAPER.gold(g["answer"]) for g in jsonl(ctx.dir("00_data") / runners.GOLD_FILE)]
    assert not {"99999", "99998"} & set(gold)
    weak = [(gold[0], False), ("99999", False), ("99999", True), ("1", False)]
    samples = [[(gold[0], False)] * 4 + [("99999", True)], [(gold[1], False)] * 5, [("99998", False)] * 5,
               [(str(a), a == 5) for a in (1, 2, 3, 4, 5)]]

    def write(stage, rows):
        (_stage_dir(ctx, stage) / "labels.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    write("02_weak_labels", [q | {"response": f"#### {a}", "truncated": t} for q, (a, t) in zip(questions, weak)])
    write("14_samples", [q | {"samples": [{"response": f"#### {a}", "truncated": t} for a, t in s]}
                         for q, s in zip(questions, samples)])
    meta = runners.run_pairs(ctx, _stage_dir(ctx, "15_pairs"), "14_samples")
    assert (meta["n_pairs"], meta["counts"]["weak_chosen"], meta["counts"]["weak_rejected"]) == (3, 1, 2)
    assert meta["pair_precision"] == pytest.approx(2 / 3)
    assert (meta["pair_precision_weak_chosen"], meta["pair_precision_weak_rejected"]) == (1.0, 0.5)
    assert meta["n_truncated"] == {"weak": 1, "samples": 2, "pairs": 2}
    write("02_weak_samples", [q | {"samples": [{"response": f"#### {a}", "truncated": False} for a in votes]}
                              for q, votes in zip(questions, [[gold[0]] * 5, [1, 1, 2, 3, 4], [7] * 5, [1] * 5])])
    meta = runners.run_pairs(ctx, _stage_dir(ctx, "15_pairs_filtered"), "14_samples", weak_samples="02_weak_samples")
    assert (meta["n_pairs"], meta["counts"]["n_weak_dropped"]) == (2, 1)
    ctx.recipe.stage2.pair_weighting = "margin"
    meta = runners.run_pairs(ctx, _stage_dir(ctx, "15_pairs_margin"), "14_samples")
    assert meta["counts"]["mean_margin"] == pytest.approx((3 / 5 + 1 + 1) / 3)


def test_generation_stage_counts_every_completion_and_flags_the_truncated(tmp_path, monkeypatch):
    """A sampler (faked) that gives 2 test questions 3 completions each, one stopped at the token limit: the stage
    writes 2 rows of 3 samples, and meta.json counts 6 completions, 1 truncated, and their 9 tokens (the report's
    truncated % divides by the completions)."""
    import contextlib

    import w2s.runners as runners

    ctx = _runner_ctx(tmp_path)
    runners.run_data(ctx, _stage_dir(ctx, "00_data"))
    runners.run_test_set(ctx, _stage_dir(ctx, "00_test"))
    test = jsonl(ctx.dir("00_test") / "test.jsonl")

    def to_jsonl(model, tok, prompts, path, n, **kwargs):
        completions = [{"text": " #### 1", "num_tokens": 1, "finish_reason": "stop"},
                       {"text": " #### 2", "num_tokens": 2, "finish_reason": "stop"}]
        rows = [{"id": p["id"], "completions": completions + [{"text": " #### 3", "num_tokens": i + 1,
                                                               "finish_reason": "length" if i else "stop"}]}
                for i, p in enumerate(prompts)]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return path

    class Profiler:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def add_tokens(self, n):
            pass

        def cost(self):
            return {"tokens": 0}

    model = type("Model", (), {"cfg": None})()
    monkeypatch.setattr(runners, "load_for_inference", lambda ctx, model_dir: (model, None, None))
    monkeypatch.setattr(runners, "generate_to_jsonl", to_jsonl)
    monkeypatch.setattr(runners, "StageProfiler", Profiler)
    monkeypatch.setattr(runners, "adapter_applied", lambda model, adapter: contextlib.nullcontext(model))
    rows, counts = runners.generate_stage(ctx, _stage_dir(ctx, "32_passk"), tmp_path / "strong", test, "zero_shot",
                                          n=3, temperature=1.0)
    assert [[s["truncated"] for s in row["samples"]] for row in rows] == [[False] * 3, [False, False, True]]
    assert [row["samples"][0]["response"] for row in rows] == ["#### 1"] * 2  # stored without the leading space
    assert (counts["n_prompts"], counts["n_completions"], counts["n_truncated"], counts["tokens"]) == (2, 6, 1, 9)
