"""Ready for the real run, on the tiny world of tests/test_pipeline.py (CPU): LoRA stages write adapters, not merged
models, and later stages apply them to the resident base; bad checkpoints and data stop a run before stage 00 with
one line; a diverging training stops with one line and leaves nothing marked done; a resumed training stage counts
all its steps and keeps its training state until its meta.json exists; `w2s sample` refuses to resume onto other
options; scripts/pipeline.py prints one line for a bad recipe.

    python -m pytest -q tests/test_realrun.py
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
import test_pipeline  # noqa: E402
from test_pipeline import RECIPE  # noqa: E402

from w2s.recipe import Stage2Options  # noqa: E402


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """tests/test_pipeline.py's tiny world: the one its session fixture built when that file ran first in this
    session (it takes a minute to build), else built here the same way."""
    built = sorted(tmp_path_factory.getbasetemp().glob("world*/strong/config.json"))
    return built[0].parent.parent if built else test_pipeline.world.__wrapped__(tmp_path_factory)


ROOT = Path(__file__).resolve().parents[1]
SHORT = {"rounds = 2": "rounds = 1", '["dpo", "orpo"]': '["dpo"]', "pass_k_samples = 0": "pass_k_samples = 0\n"
         "baselines = []"}  # stages 00-07, 14-16 and five evaluations


def recipe_text(name, **replace):
    text = RECIPE.format(name=name, n_samples=5, min_confidence=0.6, pass_k=0)
    for old, new in {**SHORT, **replace}.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


def local_world(world, tmp_path, text, copy=()):
    """A recipe in tmp_path over the session world: data and checkpoints linked, those in `copy` copied (to be
    damaged by the test)."""
    for name in ("train.jsonl", "test.jsonl", "weak", "strong"):
        if name in copy:
            (shutil.copytree if (world / name).is_dir() else shutil.copy)(world / name, tmp_path / name)
        else:
            (tmp_path / name).symlink_to(world / name)
    recipe = tmp_path / "r.toml"
    recipe.write_text(text)
    return recipe


def run(recipe, runs, **kwargs):
    from w2s.pipeline import run_pipeline

    return run_pipeline(recipe, runs_dir=runs, progress=False, log=lambda *a: None, plot=False, **kwargs)


def meta(stage_dir):
    return json.loads((Path(stage_dir) / "meta.json").read_text())


class Stop(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------------- LoRA stages


LORA = {"[strong_sft]\n": "[strong_sft]\nlora_rank = 4\nlora_alpha = 8\n",
        "[preference]\n": "[preference]\nlora_rank = 4\nlora_alpha = 8\n",
        "losses = [\"dpo\"]": "losses = [\"dpo\"]\nexport_merged = [\"dpo\"]"}


def test_lora_stages_write_adapters_and_later_stages_apply_them(world, tmp_path):
    """Every strong training stage writes an adapter on the strong base (Stage II continues M_plus's adapter: no
    chain), only the M_pro the recipe names gets a merged copy, the strong base is read from disk only twice (the
    ICL labels, then the first evaluation after the weak one; every other adapter is applied to the resident base),
    and evaluations rerun from a cold start (base read from disk, adapter merged on load) give the same bytes."""
    import w2s.runners as runners
    from w2s.lora import read_adapter

    recipe = local_world(world, tmp_path, recipe_text("lora", **LORA))
    loads = []
    real = runners.load_fresh
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runners, "load_fresh", lambda recipe, model_dir, tp: loads.append(str(model_dir)) or
                   real(recipe, model_dir, tp))
        run_dir, status, _ = run(recipe, tmp_path / "runs")
    assert set(status.values()) == {"ran"}
    strong = str((world / "strong").resolve())
    for stage in ("05_r1_sft_weak", "06_r1_sft_icl", "07_r1_sft_hybrid", "16_dpo"):
        model = run_dir / stage / "model"
        assert read_adapter(model, tensors=False).base == strong, stage
        assert not list(model.glob("model*.safetensors")) and not (model / "ckpt").exists()
        assert (model / "merged").is_dir() == (stage == "16_dpo")
    assert (run_dir / "01_weak_sft" / "model" / "model.safetensors").is_file()  # full fine-tuning: a full model
    assert loads.count(strong) == 2, loads
    evals = ["22_eval_stage1_r1_weak", "23_eval_stage1_r1_icl", "24_eval_stage1_r1_hybrid", "28_eval_stage2_dpo"]
    before = {s: (run_dir / s / "generations.jsonl").read_bytes() for s in evals}
    for s in evals:
        (run_dir / s / "meta.json").unlink()
    _, status, _ = run(recipe, tmp_path / "runs")
    assert sorted(s for s, v in status.items() if v == "ran") == evals
    assert all((run_dir / s / "generations.jsonl").read_bytes() == before[s] for s in evals)


def test_stage2_lora_must_have_the_adapter_shape_of_stage1(world, tmp_path):
    text = recipe_text("bad", **LORA).replace("[preference]\nlora_rank = 4", "[preference]\nlora_rank = 8")
    with pytest.raises(ValueError, match=r"\[preference\] lora_rank: 8 differs from \[strong_sft\] lora_rank = 4"):
        run(local_world(world, tmp_path, text), tmp_path / "runs")


# ---------------------------------------------------------------------------------------------------- fail fast


def test_truncated_strong_checkpoint_fails_before_stage_00(world, tmp_path):
    from w2s.cli import main

    recipe = local_world(world, tmp_path, recipe_text("trunc"), copy=("strong",))
    shard = tmp_path / "strong" / "model.safetensors"
    os.truncate(shard, shard.stat().st_size - 100)
    with pytest.raises(ValueError) as info:
        run(recipe, tmp_path / "runs")
    message = str(info.value)
    assert "\n" not in message and "[models] strong" in message and str(shard) in message
    assert "but the file has" in message and "truncated" in message
    assert not (tmp_path / "runs").exists()  # nothing started
    out = CliRunner().invoke(main, ["inspect", str(tmp_path / "strong")])
    assert out.exit_code == 1 and "1 problem(s)" in out.output and "truncated" in out.output


def test_missing_shard_and_wrong_shape_are_named(world, tmp_path):
    from safetensors.torch import load_file, save_file

    from w2s.checkpoint import checkpoint_problems

    ckpt = tmp_path / "ckpt"
    shutil.copytree(world / "strong", ckpt)
    state = load_file(str(ckpt / "model.safetensors"))
    state["model.norm.weight"] = state["model.norm.weight"][:-1]
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(ckpt / "model.safetensors"))
    problems = checkpoint_problems(ckpt)
    assert any("'model.norm.weight' has shape [47], expected [48]" in p for p in problems)
    assert any("no tensor 'model.layers.1.mlp.up_proj.weight'" in p for p in problems)
    (ckpt / "tokenizer.json").unlink()
    assert any("no tokenizer.json or tokenizer.model" in p for p in checkpoint_problems(ckpt))


def test_a_gold_answer_that_is_not_a_number_fails_before_stage_00(world, tmp_path):
    recipe = local_world(world, tmp_path, recipe_text("gold"), copy=("test.jsonl",))
    lines = (tmp_path / "test.jsonl").read_text().splitlines()
    row = json.loads(lines[3])
    row["answer"] = row["answer"].rsplit("####", 1)[0] + "#### twelve"
    lines[3] = json.dumps(row)
    (tmp_path / "test.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"test\.jsonl:4: key 'answer' should end with '#### N', N a number; got "
                                         r"'twelve'"):
        run(recipe, tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------------- fail loud


def test_a_diverging_weak_sft_stops_with_one_line(world, tmp_path):
    from w2s.cli import main

    text = recipe_text("nan", **{"[weak_sft]\nlr = 1e-3\nmax_steps = 2": "[weak_sft]\nlr = 1e6\nmax_steps = 4\n"
                                                                          "ckpt_every = 1"})
    recipe = local_world(world, tmp_path, text)
    out = CliRunner().invoke(main, ["run", str(recipe), "--runs", str(tmp_path / "runs"), "--no-progress"])
    assert out.exit_code == 1, out.output
    error = [line for line in out.output.splitlines() if line.startswith("Error: ")]
    assert len(error) == 1 and "01_weak_sft/model: step 2: gradient norm is nan; training stopped" in error[0]
    run_dir = tmp_path / "runs" / "nan"
    assert (run_dir / "00_data" / "meta.json").is_file() and not (run_dir / "01_weak_sft" / "meta.json").exists()
    kept = run_dir / "01_weak_sft" / "model" / "ckpt" / "step00000001"
    assert kept.is_dir() and str(kept) in error[0]  # the last good checkpoint stays, and the line says where


# ---------------------------------------------------------------------------------------------------- accounting


def test_a_resumed_training_stage_counts_all_its_steps(world, tmp_path):
    """Killed after its checkpoint at step 2 of 4, then killed again after training but before its meta.json, the
    weak SFT stage resumes both times; its meta.json counts all 4 steps and the tokens of an uninterrupted run, says
    from which step it resumed, and the training state survives until the meta.json is written."""
    import w2s.runners as runners
    import w2s.train as train

    text = recipe_text("acct", **{"[weak_sft]\nlr = 1e-3\nmax_steps = 2": "[weak_sft]\nlr = 1e-3\nmax_steps = 4\n"
                                                                           "ckpt_every = 2"})
    recipe = local_world(world, tmp_path, text)

    def until_weak_sft(runs, monkeypatch):  # the stages after 01 are not this test's business
        monkeypatch.setattr(runners, "generate_stage", lambda *a, **k: (_ for _ in ()).throw(Stop("after 01")))
        with pytest.raises(Stop):
            run(recipe, runs)

    with pytest.MonkeyPatch.context() as mp:
        until_weak_sft(tmp_path / "straight", mp)
        reference = meta(tmp_path / "straight" / "acct" / "01_weak_sft")
    stage = tmp_path / "runs" / "acct" / "01_weak_sft"
    real_save = train.save_training_state
    with pytest.MonkeyPatch.context() as mp:  # 1. killed right after the step-2 checkpoint
        mp.setattr(train, "save_training_state", lambda *a, **k: real_save(*a, **k) or (_ for _ in ()).throw(
            Stop("killed after a checkpoint")))
        with pytest.raises(Stop, match="killed after a checkpoint"):
            run(recipe, tmp_path / "runs")
    real_cost = runners._cost
    with pytest.MonkeyPatch.context() as mp:  # 2. resumed, then killed between the export and the meta.json
        mp.setattr(runners, "_cost", lambda stats: (_ for _ in ()).throw(Stop("killed before meta.json")))
        with pytest.raises(Stop, match="before meta.json"):
            run(recipe, tmp_path / "runs")
    assert (stage / "model" / "ckpt" / "step00000002").is_dir() and not (stage / "meta.json").exists()
    assert (stage / "model" / "model.safetensors").is_file()  # exported, not recorded: the state must survive
    with pytest.MonkeyPatch.context() as mp:  # 3. resumed again, to the end
        mp.setattr(runners, "_cost", real_cost)
        until_weak_sft(tmp_path / "runs", mp)
    m = meta(stage)
    assert (m["steps"], m["resumed_from_step"], m["run_steps"]) == (4, 2, 2)
    assert m["tokens"] == reference["tokens"] and m["run_tokens"] < m["tokens"]
    assert m["final_loss"] == pytest.approx(reference["final_loss"], rel=1e-6)
    assert not (stage / "model" / "ckpt").exists()  # deleted once the stage was recorded
    assert (reference["steps"], reference["resumed_from_step"]) == (4, 0)


# ---------------------------------------------------------------------------------------------------- w2s sample


def test_sample_refuses_to_resume_onto_other_options(world, tmp_path):
    from w2s.cli import main

    prompts = tmp_path / "q.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": f"Question: {i} + 1?\nAnswer:"}) + "\n"
                               for i in range(3)))
    out = tmp_path / "out.jsonl"
    common = ["--input", str(prompts), "--output", str(out), "--max-new-tokens", "4", "--no-progress"]
    first = CliRunner().invoke(main, ["sample", str(world / "strong"), *common, "-n", "2", "--temperature", "1"])
    assert first.exit_code == 0, first.output
    recorded = json.loads((tmp_path / "out.jsonl.meta.json").read_text())
    assert recorded["n"] == 2 and recorded["checkpoint"] == str((world / "strong").resolve())
    again = CliRunner().invoke(main, ["sample", str(world / "strong"), *common, "-n", "2", "--temperature", "1"])
    assert again.exit_code == 0, again.output  # the same options: resumes (here: nothing left to do)
    for args, says in ((["-n", "3", "--temperature", "1"], "n 2, now 3"),
                       (["-n", "2", "--temperature", "0.5"], "temperature 1.0, now 0.5"),
                       (["-n", "2", "--temperature", "1", "--seed", "1"], "seed 0, now 1")):
        refused = CliRunner().invoke(main, ["sample", str(world / "strong"), *common, *args])
        assert refused.exit_code == 1 and refused.output.count("\n") == 1 and says in refused.output, refused.output
    other = CliRunner().invoke(main, ["sample", str(world / "weak"), *common, "-n", "2", "--temperature", "1"])
    assert other.exit_code == 1 and "checkpoint" in other.output
    (tmp_path / "out.jsonl.meta.json").unlink()  # output without a record of its options: refused too
    unknown = CliRunner().invoke(main, ["sample", str(world / "strong"), *common])
    assert unknown.exit_code == 1 and "exists without out.jsonl.meta.json" in unknown.output


def test_sample_names_a_bad_prompt_by_its_line_before_the_weights_load(world, tmp_path):
    import shutil

    from w2s.cli import main

    no_weights = tmp_path / "no_weights"  # config and tokenizer only: loading the weights would fail
    shutil.copytree(world / "strong", no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    vocab = json.loads((no_weights / "config.json").read_text())["vocab_size"]
    prompts = tmp_path / "q.jsonl"
    lines = [json.dumps({"id": "a", "prompt": [1, 2]}), "", json.dumps({"id": "b", "prompt": [3, vocab]})]
    prompts.write_text("\n".join(lines) + "\n")
    common = ["--output", str(tmp_path / "out.jsonl"), "--no-progress"]
    out = CliRunner().invoke(main, ["sample", str(no_weights), "--input", str(prompts), *common])
    assert (out.exit_code, out.output) == (1, f"Error: {prompts}:3: token id {vocab} is outside the model's "
                                              f"vocabulary (ids 0 to {vocab - 1})\n")
    prompts.write_text(json.dumps({"id": "a", "prompt": list(range(1, 12))}) + "\n")
    out = CliRunner().invoke(main, ["sample", str(no_weights), "--input", str(prompts), "--cache-len", "10", *common])
    assert (out.exit_code, out.output) == (1, f"Error: {prompts}:1 has 11 tokens but the KV cache holds 10 positions "
                                              f"(raise cache_len or shorten the prompt)\n")
    prompts.write_text("\n")
    out = CliRunner().invoke(main, ["sample", str(no_weights), "--input", str(prompts), *common])
    assert (out.exit_code, out.output) == (1, f"Error: {prompts}: no prompts (an empty file)\n")
    out = CliRunner().invoke(main, ["sample", str(no_weights), "--input", str(tmp_path), *common])
    assert (out.exit_code, out.output) == (1, f"Error: {tmp_path}: is a directory, expected a jsonl file\n")


def test_sample_stopped_says_what_it_keeps(world, tmp_path, monkeypatch):
    from w2s import sampling_jsonl
    from w2s.cli import main

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sampling_jsonl, "generate_to_jsonl", stopped)
    prompts = tmp_path / "q.jsonl"
    prompts.write_text(json.dumps({"id": 0, "prompt": "Question: 1 + 1?\nAnswer:"}) + "\n")
    out = CliRunner().invoke(main, ["sample", str(world / "strong"), "--input", str(prompts), "--output",
                                    str(tmp_path / "out.jsonl"), "--no-progress"])
    assert (out.exit_code, out.output.strip()) == (130, "stopped (Ctrl-C or SIGTERM): the prompts finished so far "
                                                        "are kept; the same command resumes")


def test_write_errors_name_their_path(tmp_path):
    """A write() or fsync() error carries no file name (a full disk): naming_path adds the file being written."""
    import errno

    from safetensors import SafetensorError

    from w2s.checkpoint import naming_path

    with pytest.raises(OSError, match=r"No space left on device \(writing .*x\.jsonl\)") as info:
        with naming_path(tmp_path / "x.jsonl"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "x.jsonl")
    with pytest.raises(OSError, match=r"model\.safetensors: writing failed"):
        with naming_path(tmp_path / "model.safetensors"):
            raise SafetensorError("Error while serializing: IoError(StorageFull)")
    with pytest.raises(PermissionError, match="denied: '/somewhere'"):  # a name it already has is kept
        with naming_path(tmp_path / "y"):
            raise PermissionError(errno.EACCES, "Permission denied", "/somewhere")


# ---------------------------------------------------------------------------------------------------- the script


def test_pipeline_script_prints_one_line_for_a_bad_recipe(world, tmp_path):
    recipe = local_world(world, tmp_path, recipe_text("bad").replace("n_samples =", "n_sample ="))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "pipeline.py"), str(recipe), "--runs",
                           str(tmp_path / "runs")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1
    choices = ", ".join(f.name for f in dataclasses.fields(Stage2Options))  # the section's keys, as declared
    assert choices.startswith("n_samples, temperature, top_p, min_confidence, flip_confidence, max_pairs, losses")
    assert proc.stderr.strip().splitlines() == [f"Error: {recipe}: [stage2]: unknown key 'n_sample' (did you mean "
                                                f"'n_samples'?); expected one of {choices}"]
