"""The demo over several seeds: mean and spread of every method's accuracy (the README's demo table).

    python scripts/demo_seeds.py                      # = make demo-seeds: seeds 0, 1, 2 of recipes/demo.toml
    python scripts/demo_seeds.py --seeds 0 1 2 3 --recipe recipes/demo.toml
    python scripts/demo_seeds.py --recipe recipes/demo_olympic.toml   # = make demo-olympic-seeds (no gold)

For each seed N it writes recipes/.demo-seedN.toml (git-ignored): the recipe with every `*seed = ...` line set to N
(the train_1/train_2 split, the ICL demos, the pair draws, the batch order and LoRA init) and the run name
"<name>-seedN", runs the pipeline on it (finished stages are skipped, so a rerun only completes what is missing),
and finally prints one markdown table: accuracy per method and seed, mean and sample standard deviation. The table
and the figure over the seeds (w2s/plot.py: bars at the mean, whiskers one standard deviation, a dot per seed) go to
runs/<name>-seeds/report.md and report.png; each seed's own report stays in its run directory.

Test: python -m pytest -q tests/test_demo.py tests/test_plot.py -k seeds
"""

import argparse
import statistics
from pathlib import Path

from w2s.pipeline import run_pipeline
from w2s.plot import plot_report
from w2s.recipe import NAME_LINE, load_recipe, seeded_recipe
from w2s.report import METHODS, NO_GOLD_WEAK_LABEL, load_metas, method_accuracies, run_grader, run_m_plus


def seeds_table(accuracies, gold=True):
    """Markdown table from {seed: {method: accuracy}}: one row per method, accuracy in %, mean and spread. Without
    gold ([data] train_2) the weak model's row is the weak model used as is."""
    seeds = sorted(accuracies)
    header = "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | std |"
    lines = [header, "|" + "---|" * (len(seeds) + 3)]
    for method, label in METHODS:
        label = NO_GOLD_WEAK_LABEL if method == "weak_floor" and not gold else label
        values = [accuracies[s].get(method) for s in seeds]
        if any(v is None for v in values):
            continue
        pct = [100 * v for v in values]
        spread = statistics.stdev(pct) if len(pct) > 1 else 0.0
        cells = " | ".join(f"{v:.1f}" for v in pct)
        lines.append(f"| {label} | {cells} | {statistics.mean(pct):.1f} | {spread:.1f} |")
    return "\n".join(lines)


def write_seeds_report(run_dirs, out_dir, title, gold=True):
    """{seed: run dir} -> out_dir/report.md (the seeds table) and out_dir/report.png (the figure over the seeds).
    -> (table text, [paths written])."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metas = {seed: load_metas(run_dir) for seed, run_dir in run_dirs.items()}
    accuracies = {seed: method_accuracies(metas[seed], run_grader(run_dir)) for seed, run_dir in run_dirs.items()}
    table = seeds_table(accuracies, gold)
    (out_dir / "report.md").write_text(f"# w2s report: {title}\n\nGreedy test accuracy (%) per seed.\n\n{table}\n")
    seeds = sorted(metas)
    any_run = next(iter(run_dirs.values()))  # the seeds of one recipe: the same model is M_plus in each
    png = plot_report(out_dir / "report.png", [accuracies[s] for s in seeds], [metas[s] for s in seeds], title,
                      run_m_plus(any_run))
    return table, [out_dir / "report.md"] + ([png] if png else [])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="example:\n  " + __doc__.split(
        "\n\n")[1].strip().replace("\n    ", "\n  "), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="recipes/demo.toml", help="the recipe to vary (default: recipes/demo.toml)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds to run (default: 0 1 2)")
    p.add_argument("--runs", default="runs", help="directory holding the runs (default: runs)")
    args = p.parse_args()
    recipe = Path(args.recipe)
    if not recipe.is_file():
        raise SystemExit(f"{recipe}: no such recipe file")
    text = recipe.read_text()
    run_dirs = {}
    for seed in args.seeds:
        path = recipe.with_name(f".{recipe.stem}-seed{seed}.toml")  # beside the original: relative paths still hold
        path.write_text(seeded_recipe(text, seed))
        print(f"== seed {seed}: {path}")
        run_dirs[seed], _, _ = run_pipeline(path, runs_dir=args.runs)
    name = NAME_LINE.search(text).group(1)
    table, written = write_seeds_report(run_dirs, Path(args.runs) / f"{name}-seeds", f"{name}, seeds "
                                        f"{', '.join(map(str, args.seeds))}",
                                        gold=not load_recipe(recipe, check_files=False).data.train_2)
    print(table)
    print("wrote " + ", ".join(map(str, written)))


if __name__ == "__main__":
    main()
