"""The `w2s` command line. Every subcommand is a thin wrapper; the work lives in the package.

    w2s --help
    w2s inspect CKPT_DIR          family, shapes, parameters, dtype and memory of an HF checkpoint (no weights read)
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


if __name__ == "__main__":
    main()
