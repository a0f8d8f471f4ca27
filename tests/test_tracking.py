"""Experiment tracking (w2s/tracking.py) and what a training run reports: TensorBoard event files read back with
tensorboard's own reader hold every metrics.jsonl value at its step (SFT, DPO's rewards, a resumed run without the
killed run's tail); train_config.json; "resumed from step N" and "exported to DIR"; the scripts' --report-to and
--dtype; a pipeline training stage under runs/<name>/tb/<stage>; wandb in offline mode when it is installed.

    python -m pytest -q tests/test_tracking.py
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from w2s.config import ModelConfig
from w2s.model import Transformer
from w2s.train import TrainConfig, train_preference, train_sft

ROOT = Path(__file__).resolve().parents[1]
CPU_FIELDS = ["epoch", "grad_norm", "loss", "lr", "peak_mem_gib", "tok_per_s", "tokens"]  # no MFU without a peak
DPO_FIELDS = ["logps/chosen", "logps/rejected", "rewards/accuracies", "rewards/chosen", "rewards/margins",
              "rewards/rejected"]


def tiny_model(vocab_size=128):
    cfg = ModelConfig(family="llama", vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                      hidden_dim=64, max_seq_len=64, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return Transformer(cfg).init_weights(generator=torch.Generator().manual_seed(0))


def id_rows(n):
    g = torch.Generator().manual_seed(1)
    return [{"prompt_ids": torch.randint(3, 128, (3,), generator=g).tolist(),
             "response_ids": torch.randint(3, 128, (2 + i % 3,), generator=g).tolist()} for i in range(n)]


def cfg(**kw):
    return TrainConfig(**{"lr": 1e-3, "batch_size": 2, "micro_batch_size": 1, "progress": False, **kw})


def events(log_dir):
    """{tag: [(step, value)]} of every scalar in a TensorBoard log directory, through tensorboard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def assert_events_equal_metrics(log_dir, recs, fields):
    found = events(log_dir)
    assert sorted(found) == sorted(f"train/{f}" for f in fields)
    for f in fields:
        expected = [(r["step"], pytest.approx(r[f], rel=1e-6, abs=1e-7)) for r in recs]
        assert found[f"train/{f}"] == expected, f


# ---------------------------------------------------------------------------------------------- the Python API


def test_sft_writes_every_metric_at_its_step_and_its_config(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    out = tmp_path / "sft"
    seen = []
    train_sft(tiny_model(), None, id_rows(6), cfg(max_steps=5, log_every=2), out_dir=out, on_step=seen.append,
              report_to=["tensorboard"])
    recs = metrics(out)
    assert [r["step"] for r in recs] == [2, 4, 5] and seen == recs  # every log step, and the last
    assert_events_equal_metrics(out / "tb", recs, CPU_FIELDS)
    config = json.loads((out / "train_config.json").read_text())
    assert config["max_steps"] == 5 and config["loss"] == "sft" and config["steps"] == 5
    assert config["report_to"] == ["tensorboard"] and config["grad_accum"] == 2
    assert f"exported to {out}" in capsys.readouterr().out


def test_dpo_rewards_and_margins_reach_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    rows = id_rows(8)
    pairs = [{"prompt_ids": a["prompt_ids"], "chosen_ids": a["response_ids"], "rejected_ids": b["response_ids"] + [7]}
             for a, b in zip(rows[:4], rows[4:])]
    out = tmp_path / "dpo"
    train_preference(tiny_model(), None, pairs, cfg(max_steps=2), out_dir=out, loss="dpo",
                     report_to=["tensorboard"], log_dir=tmp_path / "tb" / "16_dpo")
    assert not (out / "tb").exists()  # log_dir puts the events elsewhere
    assert_events_equal_metrics(tmp_path / "tb" / "16_dpo", metrics(out), CPU_FIELDS + DPO_FIELDS)


class Killed(Exception):
    pass


def test_a_resumed_run_says_so_and_its_events_drop_the_killed_tail(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    rows, c = id_rows(8), cfg(max_steps=6, ckpt_every=2)

    def kill_at_5(rec):
        if rec["step"] == 5:
            raise Killed

    with pytest.raises(Killed):
        train_sft(tiny_model(), None, rows, c, out_dir=tmp_path, on_step=kill_at_5, report_to=["tensorboard"])
    assert [s for s, _ in events(tmp_path / "tb")["train/loss"]] == [1, 2, 3, 4, 5]
    capsys.readouterr()
    train_sft(tiny_model(), None, rows, c, out_dir=tmp_path, report_to=["tensorboard"])
    assert f"resumed from step 4 of 6 ({tmp_path / 'ckpt'})" in capsys.readouterr().out
    recs = metrics(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert_events_equal_metrics(tmp_path / "tb", recs, CPU_FIELDS)  # step 5 once, the resumed run's value


def test_a_missing_tracker_is_one_error_before_any_training(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match=r"^report_to: 'wandb' needs the wandb package: pip install 'w2s\[wandb\]'"):
        train_sft(tiny_model(), None, id_rows(2), cfg(max_steps=1), out_dir=tmp_path, report_to=["wandb"])
    assert not (tmp_path / "metrics.jsonl").exists()
    with pytest.raises(ValueError, match="unknown tracker 'mlflow'"):
        train_sft(tiny_model(), None, id_rows(2), cfg(max_steps=1), out_dir=tmp_path, report_to=["mlflow"])


def test_wandb_offline_gets_every_record(tmp_path, monkeypatch):
    """A real offline wandb run under the log dir; the values it is given are spied on (its run file is a binary
    log with no stable public reader)."""
    pytest.importorskip("wandb")
    import w2s.tracking as tracking

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    sent, real_log = [], tracking._Wandb.log
    monkeypatch.setattr(tracking._Wandb, "log", lambda self, step, values: (sent.append((step, values)),
                                                                             real_log(self, step, values)))
    out = tmp_path / "sft"
    train_sft(tiny_model(), None, id_rows(4), cfg(max_steps=2), out_dir=out, report_to=["wandb"], run_name="tiny")
    assert sent == [(r["step"], tracking.scalars(r)) for r in metrics(out)]
    assert sorted(sent[0][1]) == sorted(f"train/{f}" for f in CPU_FIELDS)
    [run_file] = (out / "tb" / "wandb").glob("offline-run-*/run-*.wandb")
    assert run_file.stat().st_size > 0


class FakeWandbRun:  # what w2s calls of a wandb run, as wandb's API documents it: log(dict, step=), finish()
    def __init__(self, **init):
        self.init, self.logged, self.finished = init, [], False

    def log(self, values, step=None):
        self.logged.append((step, values))

    def finish(self):
        self.finished = True


def test_wandb_gets_its_project_name_directory_and_steps(tmp_path, monkeypatch):
    """Without the package installed: a stand-in `wandb` module records wandb.init's arguments and run.log's calls.
    The project comes from WANDB_PROJECT, the run's name defaults to OUT's, the files go under the log dir, and
    every record is logged at its own step."""
    import types

    import w2s.tracking as tracking

    runs = []
    fake = types.SimpleNamespace(init=lambda **kw: runs.append(FakeWandbRun(**kw)) or runs[-1])
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(tracking, "check_trackers", lambda report_to, where="report_to": None)
    monkeypatch.setenv("WANDB_PROJECT", "my-project")
    out = tmp_path / "16_dpo"
    with tracking.Report(("wandb",)).start(cfg(max_steps=2), out, True, 0, {"steps": 2}) as trackers:
        trackers({"step": 1, "loss": 0.5, "mfu": None})
        trackers({"step": 2, "loss": 0.25, "mfu": None})
    [run] = runs
    assert (run.init["project"], run.init["name"], run.init["dir"]) == ("my-project", "16_dpo", str(out / "tb"))
    assert run.init["config"]["max_steps"] == 2 and run.init["config"]["report_to"] == ["wandb"]
    assert run.logged == [(1, {"train/loss": 0.5}), (2, {"train/loss": 0.25})] and run.finished


def test_only_the_main_rank_reports_and_trackers_need_a_directory(tmp_path):
    from w2s.tracking import Report, scalars

    report = Report(("tensorboard",))
    trackers = report.start(cfg(max_steps=2), tmp_path / "out", False, 0, {"steps": 2})
    assert trackers.trackers == [] and not (tmp_path / "out").exists()  # no train_config.json, no events
    with pytest.raises(ValueError, match="report_to needs a directory for the trackers"):
        report.check(None)
    Report(("tensorboard",), log_dir=str(tmp_path / "tb")).check(None)  # a log dir alone is enough
    # numbers only: a flag, a string and an unknown MFU stay out, and the step is the step, not a value
    assert scalars({"step": 3, "loss": 1.5, "tokens": 7, "resumed": True, "note": "x", "mfu": None}) == \
        {"train/loss": 1.5, "train/tokens": 7.0}


def test_tensorboard_holds_the_resolved_config_as_text(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_sft(tiny_model(), None, id_rows(2), cfg(max_steps=1), out_dir=tmp_path, report_to=["tensorboard"])
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    [text] = acc.Tensors("train_config/text_summary")
    shown = text.tensor_proto.string_val[0].decode()
    assert json.loads(shown.strip("`\n")) == json.loads((tmp_path / "train_config.json").read_text())


# ---------------------------------------------------------------------------------------------- scripts, pipeline


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory):
    """A tiny fp32 Llama with a byte-level BPE tokenizer, saved by w2s in HF format."""
    from w2s import world
    from w2s.checkpoint import save_model
    from w2s.tokenizer import load_tokenizer

    path = tmp_path_factory.mktemp("text_llama")
    texts = ["Question: 3 apples and 4 pears? Answer: 7", "Tom has 12 marbles and gives 5 away: 7 are left"] * 20
    world.train_world_tokenizer(texts, path, vocab_size=300)  # <s>, </s>, <pad> = 0, 1, 2
    save_model(tiny_model(vocab_size=300), path, tokenizer=load_tokenizer(path))
    return path


def _script(name, *args):
    cmd = [sys.executable, str(ROOT / "scripts" / name), *map(str, args)]
    env = {"OMP_NUM_THREADS": "1", "PATH": os.environ["PATH"], "HOME": str(Path.home()), "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def test_sft_script_reports_to_tensorboard_and_keeps_the_checkpoint_dtype(text_ckpt, tmp_path):
    pytest.importorskip("tensorboard")
    data = tmp_path / "trl.jsonl"  # TRL's prompt/completion rows
    data.write_text("".join(json.dumps({"prompt": f"Question: {a} apples and {b} pears? Answer:",
                                        "completion": f" {a + b}"}) + "\n" for a, b in [(1, 2), (3, 4), (5, 1)]))
    out = tmp_path / "out"
    common = ["--model", text_ckpt, "--data", data, "--batch-size", 3, "--max-steps", 2, "--no-progress"]
    proc = _script("sft.py", *common, "--out", out, "--report-to", "tensorboard")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "note:" not in proc.stdout and f"exported to {out}" in proc.stdout
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"  # --dtype auto: as stored
    assert_events_equal_metrics(out / "tb", metrics(out), CPU_FIELDS)
    assert json.loads((out / "train_config.json").read_text())["batch_size"] == 3

    proc = _script("sft.py", *common, "--out", tmp_path / "bf16", "--dtype", "bfloat16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f"note: {text_ckpt} is stored in float32; --dtype bfloat16 loads it and exports the trained model in "
            f"bfloat16") in proc.stdout
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_scripts_help_shows_examples_data_keys_and_defaults_but_not_ignored_options():
    sft, dpo = _script("sft.py", "--help").stdout, _script("dpo.py", "--help").stdout
    for text in (sft, dpo):
        assert "example:" in text and "--report-to TRACKER" in text and "(default: auto, the checkpoint's own" in text
        assert "train_config.json" in text
    assert '{"messages": [{"role": "user"' in sft and '{"prompt": "...", "completion": "..."}' in sft
    assert "--beta" not in sft and "--beta BETA" in dpo and '"chosen": [{"role": "assistant"' in dpo
    assert "(default: unset)" in sft and "(default: 0.9 0.95)" in sft


def test_every_command_help_has_an_example_its_data_and_defaults():
    """scripts/sample.py, pipeline.py, evaluate.py and `w2s COMMAND --help`: an example, the data read, defaults."""
    from click.testing import CliRunner

    from w2s.cli import main

    procs = {name: _script(name, "--help") for name in ("sample.py", "pipeline.py", "evaluate.py")}
    for name, proc in procs.items():
        assert proc.returncode == 0, (name, proc.stderr)
    texts = {name: " ".join(proc.stdout.split()) for name, proc in procs.items()}  # as read, not as wrapped
    assert 'INPUT lines: {"id": ...' in texts["sample.py"] and "[default: 256; x>=1]" in texts["sample.py"]
    assert "[logging] report_to" in texts["pipeline.py"] and "[default: runs]" in texts["pipeline.py"]
    assert "per_question.jsonl" in texts["evaluate.py"] and "(default: auto)" in texts["evaluate.py"]
    for command in ("inspect", "run", "report", "data", "sample"):
        out = CliRunner().invoke(main, [command, "--help"]).output
        assert "Example" in out and f"w2s {command}" in out, command
    assert "Examples:" in CliRunner().invoke(main, ["--help"]).output


def test_a_pipeline_training_stage_logs_under_its_own_name(text_ckpt, tmp_path):
    pytest.importorskip("tensorboard")
    from w2s.engine import Context
    from w2s.recipe import load_recipe
    from w2s.runners import train_stage

    recipe = tmp_path / "r.toml"
    recipe.write_text(f'name = "tiny"\n[models]\nstrong = "{text_ckpt}"\nweak = "{text_ckpt}"\ndtype = "float32"\n'
                      f'[strong_sft]\nmax_steps = 2\nbatch_size = 2\nmicro_batch_size = 2\n'
                      f'[logging]\nreport_to = ["tensorboard"]\n')
    ctx = Context(load_recipe(recipe, check_files=False), tmp_path / "runs" / "tiny", progress=False)
    rows = [{"prompt": "Question: 1 and 2?", "response": "Answer: 3"}, {"prompt": "Question: 2?", "response": "2"}]
    out = ctx.run_dir / "05_r1_sft_weak"
    out.mkdir(parents=True)
    train_stage(ctx, out, text_ckpt, rows, "strong_sft")
    assert_events_equal_metrics(ctx.run_dir / "tb" / "05_r1_sft_weak", metrics(out / "model"), CPU_FIELDS)
    assert (out / "model" / "train_config.json").is_file()

    recipe.write_text(recipe.read_text().replace('["tensorboard"]', '["mlflow"]'))
    with pytest.raises(ValueError, match=r"r\.toml: \[logging\] report_to: unknown tracker 'mlflow'"):
        load_recipe(recipe, check_files=False)
