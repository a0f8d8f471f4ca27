"""The demo over several seeds: mean and spread of every method's accuracy (the README's demo table).

    python scripts/demo_seeds.py                      # = make demo-seeds: seeds 0, 1, 2 of recipes/demo.toml
    python scripts/demo_seeds.py --seeds 0 1 2 3 --recipe recipes/demo.toml
    python scripts/demo_seeds.py --recipe recipes/demo_olympic.toml   # = make demo-olympic-seeds (no gold)

For each seed N it writes recipes/.demo-seedN.toml (git-ignored): the recipe with every `*seed = ...` line set to N
(the train_1/train_2 split, the ICL demos, the pair draws, the batch order and LoRA init) and the run name
"<name>-seedN", runs the pipeline on it (finished stages are skipped, so a rerun only completes what is missing),
and finally prints one markdown table: accuracy per method and seed, mean and sample standard deviation.
"""

import argparse
import re
import statistics
from pathlib import Path

from w2s.pipeline import run_pipeline
from w2s.recipe import load_recipe
from w2s.report import METHODS, NO_GOLD_WEAK_LABEL, load_metas, method_accuracies

SEED_LINE = re.compile(r"^(\s*\w*seed\s*=\s*)\d+", re.MULTILINE)  # seed, demo_seed, pair_seed (any section)
NAME_LINE = re.compile(r'^name\s*=\s*"([^"]+)"', re.MULTILINE)


def seeded_recipe(text, seed):
    """The recipe text with every seed set to `seed` and the run name suffixed with -seed<seed>."""
    name = NAME_LINE.search(text)
    if name is None:
        raise ValueError('recipe has no top-level `name = "..."` line')
    text = SEED_LINE.sub(lambda m: f"{m.group(1)}{seed}", text)
    return NAME_LINE.sub(f'name = "{name.group(1)}-seed{seed}"', text, count=1)


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


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="recipes/demo.toml", help="the recipe to vary (default: recipes/demo.toml)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds to run (default: 0 1 2)")
    p.add_argument("--runs", default="runs", help="directory holding the runs (default: runs)")
    args = p.parse_args()
    recipe = Path(args.recipe)
    if not recipe.is_file():
        raise SystemExit(f"{recipe}: no such recipe file")
    text = recipe.read_text()
    accuracies = {}
    for seed in args.seeds:
        path = recipe.with_name(f".{recipe.stem}-seed{seed}.toml")  # beside the original: relative paths still hold
        path.write_text(seeded_recipe(text, seed))
        print(f"== seed {seed}: {path}")
        run_dir, _, _ = run_pipeline(path, runs_dir=args.runs)
        accuracies[seed] = method_accuracies(load_metas(run_dir))
    print(seeds_table(accuracies, gold=not load_recipe(recipe, check_files=False).data.train_2))


if __name__ == "__main__":
    main()
