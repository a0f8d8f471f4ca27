"""Tests of the demo (make demo): the shipped base models and data under demo/, the pretraining script that
reproduces them (scripts/pretrain_demo.py), and a shortened run of the real pipeline on recipes/demo.toml that must
produce the paper-style table and the plot.

Run: python -m pytest -q tests/test_demo.py
"""

import json
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import w2s
from w2s import world

ROOT = Path(__file__).resolve().parent.parent
DEMO, RECIPE = ROOT / "demo", ROOT / "recipes" / "demo.toml"
sys.path.insert(0, str(ROOT / "scripts"))
import pretrain_demo  # noqa: E402  (a script, not a package module)


def test_shipped_base_models_load_and_match_the_script(tmp_path):
    """demo/weak and demo/strong are the shapes pretrain_demo.py builds, load through w2s, and run."""
    tok = w2s.load_tokenizer(DEMO / "tokenizer")
    sizes = {}
    for name in ("weak", "strong"):
        model = w2s.load_model(DEMO / name, dtype=torch.float32)
        expected = pretrain_demo.model_config(name, tok)
        for field in ("family", "vocab_size", "dim", "n_layers", "n_heads", "hidden_dim", "bos_token_id",
                      "eos_token_id", "pad_token_id"):
            assert getattr(model.cfg, field) == getattr(expected, field), (name, field)
        # The checkpoint carries the world tokenizer itself (the pipeline loads the tokenizer from the model dir).
        assert w2s.load_tokenizer(DEMO / name).encode("Question: 47+5=52") == tok.encode("Question: 47+5=52")
        ids = torch.tensor([tok.encode("Question: Ann has 3 pens. How many pens now?\nAnswer:")])
        logits = model(ids)
        assert logits.shape == (1, ids.shape[1], tok.vocab_size) and torch.isfinite(logits).all()
        sizes[name] = sum(p.numel() for p in model.parameters())
    assert sizes["strong"] > 2 * sizes["weak"]
    total = sum(f.stat().st_size for f in DEMO.rglob("*") if f.is_file())
    assert total < 20 * 2**20, f"demo/ holds {total / 2**20:.1f} MiB; keep it under 20 MiB"


def test_shipped_data_is_the_seeded_world_with_a_clean_test_split():
    """demo/data is exactly what world.make_splits gives for the recorded seed; no test question is in train."""
    record = json.loads((DEMO / "PRETRAIN.json").read_text())
    splits = world.make_splits(record["seed"], **pretrain_demo.SPLIT_SIZES)
    read = lambda f: [json.loads(line) for line in (DEMO / "data" / f).read_text().splitlines()]  # noqa: E731
    train, test = read("train.jsonl"), read("test.jsonl")
    assert train == splits["train_1"] + splits["train_2"] and test == splits["test"]
    assert not {r["question"] for r in test} & {r["question"] for r in train}


def test_pretraining_is_seeded_and_excludes_the_splits(tmp_path, monkeypatch):
    """Two tiny runs of the script with one seed write identical weights; the corpus holds no split question."""
    monkeypatch.setattr(pretrain_demo, "SPLIT_SIZES", dict(n_train_1=30, n_train_2=30, n_test=30))
    seen_docs = []
    real_corpus = world.pretrain_corpus
    monkeypatch.setattr(world, "pretrain_corpus", lambda *a, **k: seen_docs.append(real_corpus(*a, **k)) or
                        seen_docs[-1])
    outs = []
    for run in ("a", "b"):
        out = tmp_path / run
        assert pretrain_demo.main(["--out", str(out), "--n-docs", "24", "--only", "weak"]) == 0
        outs.append(out)
    from safetensors.torch import load_file

    first, second = (load_file(o / "weak" / "model.safetensors") for o in outs)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    questions = {json.loads(line)["question"] for o in outs[:1] for f in ("train.jsonl", "test.jsonl")
                 for line in (o / "data" / f).read_text().splitlines()}
    assert len(questions) == 90
    for docs in seen_docs:
        assert len(docs) == 24 and not any(q in doc for doc in docs for q in questions)


# ------------------------------------------------------------------------------------------------ end to end


def _pipeline_blocker():
    """Why the demo recipe cannot run yet (None when it can): the recipe must validate and its stage plan build."""
    try:
        from w2s.pipeline import build_stages
        from w2s.recipe import load_recipe

        build_stages(load_recipe(RECIPE))
    except Exception as e:  # noqa: BLE001 - any failure here means "not integrated yet", and we say which
        return f"recipes/demo.toml cannot run yet: {type(e).__name__}: {e}"
    return None


def _toml(tables):
    """Write a {table: {key: value}} dict (strings, numbers, lists) as TOML; top-level scalars first."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    lines = [f"{k} = {value(v)}" for k, v in tables.items() if not isinstance(v, dict)]
    for name, table in tables.items():
        if isinstance(table, dict):
            lines += [f"\n[{name}]"] + [f"{k} = {value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def test_shortened_demo_runs_end_to_end_and_reports(tmp_path):
    """The real pipeline on recipes/demo.toml with fewer questions and steps: every stage finishes, the report
    has the paper's rows, each accuracy equals a regrading of that stage's own generations under the run's grader,
    the other graders stand beside it, and the plot exists."""
    if (reason := _pipeline_blocker()) is not None:
        pytest.skip(reason)
    from w2s.files import read_jsonl
    from w2s.pipeline import run_pipeline
    from w2s.report import METHODS
    from w2s.tasks import get_grader

    raw = tomllib.loads(RECIPE.read_text())
    raw["name"] = "demo-short"
    for key in ("train", "test"):
        raw["data"][key] = str((RECIPE.parent / raw["data"][key]).resolve())
    for key in ("weak", "strong"):
        raw["models"][key] = str((RECIPE.parent / raw["models"][key]).resolve())
    raw["data"].update(n_train_1=100, n_train_2=120, n_test=20)
    raw["sampling"].update(max_new_tokens=64, sample_max_new_tokens=64)
    raw["stage2"]["n_samples"] = 4  # training options stay the recipe's: they are what makes the sets non-empty
    # The lenient grader: from 120 questions the models of this short run answer too few times with the marker on
    # their last line for the paper's protocol to fill the round-2 set and the pairs (the full demo, 400 questions,
    # fills them under `paper`, the recipe's grader). Every grader is still reported beside it.
    raw["data"]["grader"] = "equivalence"
    recipe = tmp_path / "demo-short.toml"
    recipe.write_text(_toml(raw))

    run_dir, _, text = run_pipeline(recipe, runs_dir=tmp_path / "runs", progress=False, log=lambda *a: None)
    labels = dict(METHODS)
    for method in ("weak_floor", "full_weak_ft", "strong_icl", "stage1_r2_hybrid", "stage2_dpo", "stage2_orpo",
                   "ceiling"):
        assert labels[method] in text, f"report lacks {method}:\n{text}"
    grader = get_grader("gsm8k", "equivalence")  # the short run's grader, set above
    tests = {r["id"]: grader.gold(r["answer"]) for r in read_jsonl(run_dir / "00_test" / "test.jsonl")}
    evals = sorted(run_dir.glob("*_eval_*"))
    assert len(evals) >= 10
    for stage in evals:
        meta = json.loads((stage / "meta.json").read_text())
        rows = read_jsonl(stage / "labels.jsonl")
        assert len(rows) == len(tests) == 20
        regraded = sum(grader.same(grader.answer(r["response"]), tests[r["id"]]) for r in rows) / len(rows)
        accuracy = meta.get("accuracy", meta.get("result", {}).get("accuracy"))
        assert accuracy == pytest.approx(regraded), stage.name
    assert "## The same accuracies under every grader" in text
    assert (run_dir / "report.png").is_file()


def test_demo_seeds_rewrites_every_seed_and_the_name_and_tabulates_mean_and_spread():
    import demo_seeds  # scripts/demo_seeds.py (make demo-seeds)

    from w2s.recipe import seeded_recipe

    text = RECIPE.read_text()
    seeded = tomllib.loads(seeded_recipe(text, 7))
    original = tomllib.loads(text)
    assert seeded["name"] == original["name"] + "-seed7"
    changed = []
    for section, values in original.items():
        if isinstance(values, dict):
            for key, value in values.items():
                if key.endswith("seed"):
                    assert seeded[section][key] == 7
                    changed.append(f"{section}.{key}")
                else:
                    assert seeded[section][key] == value  # nothing else moves
    assert {"data.seed", "stage1.demo_seed", "stage2.pair_seed"} <= set(changed)
    table = demo_seeds.seeds_table({0: {"weak_floor": 0.1, "ceiling": 0.9}, 1: {"weak_floor": 0.3, "ceiling": 0.8}})
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()[2:]}
    assert rows["weak floor (weak model)"].endswith("| 10.0 | 30.0 | 20.0 | 14.1 |")  # stdev(10, 30) = 14.14
    assert rows["strong ceiling (gold train_2)"].endswith("| 90.0 | 80.0 | 85.0 | 7.1 |")


def test_demo_compare_variants_are_valid_recipes_that_change_only_their_options(tmp_path):
    import demo_compare  # scripts/demo_compare.py (make demo-compare)

    from w2s.recipe import load_recipe

    text = RECIPE.read_text()
    base = tomllib.loads(text)
    for variant, (options, _, _) in demo_compare.VARIANTS.items():
        recipe_text = demo_compare.variant_recipe(text, 3, variant)
        path = tmp_path / f"{variant}.toml"
        path.write_text(recipe_text)
        recipe = load_recipe(path, check_files=False)  # validated like any recipe: unknown keys, impossible values
        assert recipe.name == f"{base['name']}-seed3-{variant}" and recipe.data.seed == 3
        parsed = tomllib.loads(recipe_text)
        wanted = {(section, key): value for overrides in (demo_compare.COMMON, options)
                  for section, values in overrides.items() for key, value in values.items()}
        for (section, key), value in wanted.items():
            assert parsed[section][key] == value, (variant, section, key)
        for section, values in base.items():  # every other option is the demo's (seeds aside)
            if isinstance(values, dict):
                for key, value in values.items():
                    if (section, key) not in wanted and not key.endswith("seed"):
                        assert parsed[section][key] == value, (variant, section, key)


def test_set_option_replaces_a_line_adds_a_key_and_adds_a_section():
    import demo_compare

    text = 'name = "x"\n\n[stage2]\nn_samples = 10  # ten\nlosses = ["dpo"]\n\n[eval]\npass_k_samples = 0\n'
    out = demo_compare.set_option(text, "stage2", "n_samples", 4)
    out = demo_compare.set_option(out, "stage2", "rounds", 2)
    out = demo_compare.set_option(out, "grpo", "lr", 1e-4)
    out = demo_compare.set_option(out, "stage1", "weak_relabel", True)
    assert tomllib.loads(out) == {"name": "x", "stage2": {"n_samples": 4, "losses": ["dpo"], "rounds": 2},
                                  "eval": {"pass_k_samples": 0}, "grpo": {"lr": 1e-4},
                                  "stage1": {"weak_relabel": True}}
