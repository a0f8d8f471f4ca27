"""The `w2s` command line. Every subcommand is a thin wrapper; the work lives in the package.

    w2s --help
    w2s inspect CKPT_DIR          family, shapes, parameters, dtype and memory of an HF checkpoint (no weights read)
    w2s run RECIPE                the whole weak-to-strong pipeline (skips finished stages, resumes killed ones)
    w2s report RUN_DIR            the paper-style table and plot of a run
    w2s data                      download GSM8K / MATH, or say which file to put where when offline
"""

from collections import Counter
from pathlib import Path

import click

BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class _Group(click.Group):
    """Bad input (missing file, malformed config, unknown key) becomes one `Error: ...` line, not a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (FileNotFoundError, ValueError) as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """w2s: weak-to-strong reasoning from scratch in PyTorch (Yang, Ma, Liu 2024).

    A weak model fine-tuned on gold supervises a stronger base model on math word problems: Stage I fine-tunes the
    strong model where the weak answer and the strong model's few-shot answer agree; Stage II runs DPO/ORPO on the
    strong model's confident disagreements with the weak model. See README.md.
    """


def _human(n, unit="B"):
    for prefix in ("", "Ki", "Mi", "Gi", "Ti"):
        if abs(n) < 1024 or prefix == "Ti":
            return f"{n:.1f} {prefix}{unit}" if prefix else f"{n} {unit}"
        n /= 1024


@main.command()
@click.argument("ckpt_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def inspect(ckpt_dir):
    """Print family, layers, heads, vocab, parameter count, dtype and memory of the checkpoint in CKPT_DIR.

    Reads config.json and the safetensors headers only, so it is instant even for a 70B checkpoint.
    """
    from w2s.checkpoint import checkpoint_files, read_safetensors_header
    from w2s.config import ModelConfig

    cfg = ModelConfig.from_pretrained(ckpt_dir)
    files = sorted(set(checkpoint_files(ckpt_dir).values()))
    dtypes, stored_bytes, stored_params = Counter(), 0, 0
    for f in files:
        for info in read_safetensors_header(f)[0].values():
            numel = 1
            for s in info["shape"]:
                numel *= s
            dtypes[info["dtype"]] += numel
            stored_bytes += numel * BYTES.get(info["dtype"], 4)
            stored_params += numel
    n = cfg.n_params()
    windows = sorted({str(cfg.layer_window(i)) for i in range(cfg.n_layers)})
    rows = [
        ("family", cfg.family),
        ("layers", cfg.n_layers),
        ("dim / mlp hidden", f"{cfg.dim} / {cfg.hidden_dim}"),
        ("heads / kv heads / head dim", f"{cfg.n_heads} / {cfg.n_kv_heads} / {cfg.head_dim}"),
        ("vocab", cfg.vocab_size),
        ("tied embeddings", cfg.tie_embeddings),
        ("sliding windows", ", ".join(windows)),
        ("rope", f"theta {cfg.rope_theta:g}" + (f", {cfg.rope_scaling.get('rope_type')} scaling"
                                                 if cfg.rope_scaling else "")),
        ("parameters", f"{n:,} ({n / 1e9:.2f} B)"),
        ("stored dtype", ", ".join(f"{d} ({c / stored_params:.0%})" for d, c in dtypes.most_common())),
        ("shards", len(files)),
        ("memory (as stored)", _human(stored_bytes)),
        ("memory in bf16 / fp32", f"{_human(2 * n)} / {_human(4 * n)}"),
        ("full fine-tune, AdamW fp32 states", _human(16 * n) + " (bf16 weights+grads, fp32 master+m+v)"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--runs", default="runs", show_default=True, help="Directory holding runs/<recipe name>/.")
@click.option("--no-progress", is_flag=True, help="No progress bars (logs only).")
def run(recipe, runs, no_progress):
    """Run every stage of RECIPE (a TOML file, see recipes/) that is not already done.

    Each stage writes runs/<name>/<NN_stage>/ with its data and a meta.json written last; a finished stage is
    skipped, a killed one resumes, and changing an option reruns exactly the stages that depend on it.
    """
    from w2s.pipeline import run_pipeline

    _, _, text = run_pipeline(recipe, runs_dir=runs, progress=not no_progress)
    click.echo(text)


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--no-plot", is_flag=True, help="Skip report.png.")
def report(run_dir, no_plot):
    """Print the paper-style table of RUN_DIR (accuracy, PGR, filtered sets, stage costs) and write report.png."""
    from w2s.report import report as make_report

    click.echo(make_report(run_dir, plot=not no_plot))


@main.command()
@click.option("--dest", default="data", show_default=True, type=click.Path(path_type=Path),
              help="Where to put gsm8k/ and math/ jsonl files.")
@click.option("--offline", is_flag=True, help="Do not try the network; only list what is missing and where from.")
def data(dest, offline):
    """Download the public GSM8K and MATH files into DEST; offline, print exactly which file to put where."""
    from w2s.tasks import fetch_data

    missing = fetch_data(dest, offline=offline, log=click.echo)
    if missing:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
