"""What a training run reports besides its log line and metrics.jsonl: the resolved config (train_config.json),
"resumed from step N" / "exported to DIR", and the experiment trackers (TensorBoard, Weights & Biases).

    train_sft(model, tok, rows, cfg, out_dir="out/sft", report_to=["tensorboard"])   # events in out/sft/tb
    python scripts/sft.py ... --report-to tensorboard wandb                           # the same from the shell
    [logging] report_to = ["tensorboard"]                                             # a recipe: runs/<name>/tb/<stage>
    tensorboard --logdir out/sft/tb

Trackers are optional extras (pip install 'w2s[tensorboard]' or 'w2s[wandb]'), imported only when asked for; a
missing one is one error line before any model is touched. They get exactly the records that go to metrics.jsonl:
every numeric field under train/<field> at the record's step (loss, lr, grad_norm, tok_per_s, mfu where known,
peak_mem_gib, tokens, epoch, and the preference losses' rewards/chosen, rewards/margins, logps/..., ...). Only the
main rank writes. A resumed run purges the TensorBoard events past its checkpoint, as metrics.jsonl is trimmed there.
wandb runs in whatever mode its environment says (WANDB_MODE=offline writes under the log dir, no network).

    python -m pytest -q tests/test_tracking.py
"""

import importlib.util
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

TRACKERS = ("tensorboard", "wandb")


def check_trackers(report_to, where="report_to"):
    """Fail in one line, now, when a tracker is unknown or its package is not installed."""
    for name in report_to:
        if name not in TRACKERS:
            raise ValueError(f"{where}: unknown tracker {name!r}; expected {' or '.join(TRACKERS)}")
        if importlib.util.find_spec(name) is None:
            raise ValueError(f"{where}: {name!r} needs the {name} package: pip install 'w2s[{name}]' "
                             f"(or pip install {name})")


def scalars(rec):
    """{train/<field>: value} of a metrics record's numeric fields (None, e.g. MFU on CPU, is left out)."""
    return {f"train/{k}": float(v) for k, v in rec.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class _TensorBoard:
    def __init__(self, log_dir, config, start_step):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events at steps past the checkpoint (a killed run's tail) are dropped by the readers
        self.writer = SummaryWriter(str(log_dir), purge_step=start_step + 1 if start_step else None)
        self.writer.add_text("train_config", "```\n" + json.dumps(config, indent=2) + "\n```", start_step)

    def log(self, step, values):
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def close(self):
        self.writer.close()


class _Wandb:
    def __init__(self, log_dir, config, name):
        import wandb

        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "w2s"), name=name, dir=str(log_dir),
                              config=config)

    def log(self, step, values):
        self.run.log(values, step=step)

    def close(self):
        self.run.finish()


@dataclass
class Report:
    """Where a run reports: trackers by name, their directory (default OUT/tb) and the run's name (wandb)."""

    report_to: tuple = ()
    log_dir: str | None = None
    run_name: str | None = None

    def check(self, out_dir):
        check_trackers(self.report_to)
        if self.report_to and self.log_dir is None and out_dir is None:
            raise ValueError("report_to needs a directory for the trackers: pass out_dir or log_dir")

    def start(self, cfg, out_dir, is_main, start_step, info):
        """On the main rank: write OUT/train_config.json, say where a resumed run picks up, open the trackers.
        -> the Trackers the step records go to (none on other ranks)."""
        config = {**asdict(cfg), **info, "report_to": list(self.report_to)}
        if not is_main:
            return Trackers([])
        if out_dir is not None:
            from w2s.files import write_json_atomic

            Path(out_dir).mkdir(parents=True, exist_ok=True)
            write_json_atomic(Path(out_dir) / "train_config.json", config)
        if start_step:
            print(f"resumed from step {start_step} of {info['steps']} ({Path(out_dir) / 'ckpt'})", flush=True)
        log_dir = Path(self.log_dir) if self.log_dir is not None else Path(out_dir or ".") / "tb"
        name = self.run_name or (Path(out_dir).name if out_dir is not None else None)
        return Trackers([_TensorBoard(log_dir, config, start_step) if t == "tensorboard" else
                         _Wandb(log_dir, config, name) for t in self.report_to])


class Trackers:
    """The open trackers: call with a metrics record (an on_step callback); close when the run ends."""

    def __init__(self, trackers):
        self.trackers = trackers

    def __call__(self, rec):
        values = scalars(rec)
        for t in self.trackers:
            t.log(rec["step"], values)

    def close(self):
        for t in self.trackers:
            t.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
