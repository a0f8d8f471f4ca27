"""make demo-compare: the paper's Stage II (DPO) beside the options beyond the paper, on the miniature, over seeds.

    python scripts/demo_compare.py                     # = make demo-compare: seeds 0 1 2, every variant below
    python scripts/demo_compare.py --seeds 0 --variants paper iterative

A variant is a set of recipe options on top of recipes/demo.toml (VARIANTS below; adding one is one line). For each
seed N the first variant runs in full as runs/demo-seedN-<variant> (taking the finished stages of `make demo-seeds`'
runs/demo-seedN when that run is there); every other variant of that seed gets its own run directory, which takes
each finished stage of the first one whose key it shares (the engine's key: options and inputs), hard-linked before
it runs (`w2s run --reuse`), so the engine skips it. The Stage I stages, the baselines and the weak model
run once per seed; a variant pays only for the stages its options change. The recipes are written beside the demo
recipe as recipes/.demo-seedN-<variant>.toml (git-ignored), with every seed set to N as scripts/demo_seeds.py does.

The table: per variant the test accuracy (greedy, the recipe's grader) of its final model on every seed, mean and
sample standard deviation, mean PGR, the preference pairs it trained on (mean over seeds; "a + b" per Stage II
round), and its cost in minutes: the stages it ran itself, and its whole pipeline (shared stages included).
Also written to runs/demo-compare.md.
"""

import argparse
import json
import re
import statistics
import time
from pathlib import Path

from w2s.engine import read_meta
from w2s.pipeline import run_pipeline
from w2s.recipe import NAME_LINE, load_recipe, seeded_recipe
from w2s.report import load_metas, method_accuracies, pgr

# Every variant runs Stage II with DPO alone (the paper's best loss; ORPO would double the Stage II cost).
COMMON = {"stage2": {"losses": ["dpo"]}}
# name: (recipe options on top of COMMON, label, the method whose accuracy is the variant's result)
VARIANTS = {
    "paper": ({}, "Stage II, DPO (the paper)", "stage2_dpo"),
    "iterative": ({"stage2": {"rounds": 2}, "preference": {"nll_weight": 1.0}},
                  "Iterative RPO: 2 rounds of DPO + NLL (alpha 1)", "stage2_dpo_round2"),
    "margin": ({"stage2": {"pair_weighting": "margin", "self_consistency_pairs": True}},
               "ScPO: vote-margin weights + most/least-voted pairs", "stage2_dpo"),
    # The demo's weak model (its accuracy: docs/DEMO_WORLD.md) never reaches a 0.6 majority over 10 samples at T = 1:
    # at 0.6 the filter keeps no question and Stage I has nothing to train on, so the miniature uses 0.3.
    "weak_sc": ({"stage1": {"weak_self_consistency": 10, "weak_min_confidence": 0.3}},
                "weak self-consistency filter (k 10, conf 0.3)", "stage2_dpo"),
    # The paper's Stage II from the icl-ft model instead of the hybrid-ft one (the miniature's icl-ft models are the
    # stronger: README, "What it does not show").
    "from_icl": ({"stage2": {"start_from": "icl"}}, "Stage II (DPO) from the icl-ft model", "stage2_dpo"),
    # On-policy from M_plus: 12 steps of 16 questions x 4 samples (a world solution is <= ~45 tokens).
    "grpo": ({"stage2": {"losses": ["grpo"]}, "grpo": {"lr": 1e-4, "batch_size": 16, "micro_batch_size": 16,
                                                       "max_steps": 12, "group_size": 4, "max_new_tokens": 64}},
             "GRPO, vote reward (TTRL-style)", "stage2_grpo"),
}
# Rows shown for reference, read from the first variant's runs.
REFERENCE = [("weak_floor", "weak floor"), ("stage1_r2_hybrid", "Stage I, hybrid-ft (the paper's M_plus)"),
             ("stage1_r2_icl", "Stage I, icl-ft"), ("ceiling", "strong ceiling")]


def toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, (str, list)) else repr(value)


def set_option(text, section, key, value):
    """The recipe text with `key = value` in [section]: the key's line replaced, or added under the header (a new
    section at the end when there is none)."""
    header = re.search(rf"^\[{re.escape(section)}\][^\n]*\n", text, re.MULTILINE)
    line = f"{key} = {toml_value(value)}"
    if header is None:
        return text.rstrip("\n") + f"\n\n[{section}]\n{line}\n"
    end = re.search(r"^\[", text[header.end():], re.MULTILINE)
    stop = header.end() + (end.start() if end else len(text) - header.end())
    body, n = re.subn(rf"^{re.escape(key)}\s*=[^\n]*", line, text[header.end():stop], count=1, flags=re.MULTILINE)
    if not n:
        body = line + "\n" + body
    return text[:header.end()] + body + text[stop:]


def variant_recipe(text, seed, variant):
    """The demo recipe for one seed and variant: every seed set, COMMON and the variant's options, its own name."""
    text = seeded_recipe(text, seed)
    for overrides in (COMMON, VARIANTS[variant][0]):
        for section, values in overrides.items():
            for key, value in values.items():
                text = set_option(text, section, key, value)
    return re.sub(r'^name\s*=\s*"([^"]+)"', rf'name = "\1-{variant}"', text, count=1, flags=re.MULTILINE)


def shared_runs(run_dir, donor):
    """The stages of run_dir that are the donor's own runs of them (taken, not run again)."""
    if donor is None:
        return set()
    runs = {f.parent.name: (read_meta(f.parent) or {}).get("run") for f in Path(donor).glob("*/meta.json")}
    return {f.parent.name for f in Path(run_dir).glob("*/meta.json")
            if runs.get(f.parent.name) is not None and (read_meta(f.parent) or {}).get("run") == runs[f.parent.name]}


def summary(run_dir, method, shared):
    """{"acc", "pgr", "pairs", "own_s", "total_s"} of one variant's run."""
    metas = load_metas(run_dir)
    grader = json.loads((Path(run_dir) / "recipe.json").read_text())["data"]["grader"]
    acc = method_accuracies(metas, grader)
    pairs = [m["n_pairs"] for n, m in sorted(metas.items()) if n.endswith("_pairs") or "_pairs_" in n]
    return {"acc": acc.get(method), "pgr": pgr(acc.get(method), acc.get("weak_floor"), acc.get("ceiling")),
            "pairs": pairs, "all": acc, "total_s": sum(m.get("wall_s", 0) for m in metas.values()),
            "own_s": sum(m.get("wall_s", 0) for n, m in metas.items() if n not in shared)}


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return "-", "-"
    return f"{statistics.mean(values):.1f}", f"{statistics.stdev(values):.1f}" if len(values) > 1 else "0.0"


def compare_table(results, seeds, variants):
    """Markdown: one row per variant (and the reference rows), from {(seed, variant): summary}."""
    head = ["method"] + [f"seed {s}" for s in seeds] + ["mean", "std", "PGR", "pairs", "min own / total"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, label in REFERENCE:
        pct = [100 * results[s, variants[0]]["all"][method] if method in results[s, variants[0]]["all"] else None
               for s in seeds]
        lines.append(f"| {label} | " + " | ".join("-" if v is None else f"{v:.1f}" for v in pct) +
                     f" | {' | '.join(_mean_std(pct))} | | | |")
    for v in variants:
        rows = [results[s, v] for s in seeds]
        pct = [None if r["acc"] is None else 100 * r["acc"] for r in rows]
        pgrs = [r["pgr"] for r in rows if r["pgr"] is not None]
        pgr_cell = f"{statistics.mean(pgrs):.3f}" if pgrs else "-"
        rounds = max(len(r["pairs"]) for r in rows)
        pairs = " + ".join(f"{statistics.mean(r['pairs'][i] for r in rows if len(r['pairs']) > i):.0f}"
                           for i in range(rounds)) or "-"
        own, total = (statistics.mean(r[k] for r in rows) / 60 for k in ("own_s", "total_s"))
        lines.append(f"| {VARIANTS[v][1]} | " + " | ".join("-" if x is None else f"{x:.1f}" for x in pct) +
                     f" | {' | '.join(_mean_std(pct))} | {pgr_cell} | {pairs} | {own:.1f} / {total:.1f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="recipes/demo.toml", help="the recipe to vary (default: recipes/demo.toml)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds to run (default: 0 1 2)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="variants, the first one the donor of the shared stages (default: all, paper first)")
    p.add_argument("--runs", default="runs", help="directory holding the runs (default: runs)")
    args = p.parse_args()
    recipe = Path(args.recipe)
    if not recipe.is_file():
        raise SystemExit(f"{recipe}: no such recipe file")
    text, results, failed, t0 = recipe.read_text(), {}, {}, time.perf_counter()
    for seed in args.seeds:
        donor = Path(args.runs) / f"{NAME_LINE.search(text).group(1)}-seed{seed}"  # make demo-seeds' run, if any
        donor = donor if any(donor.glob("*/meta.json")) else None  # a killed demo-seeds run may have finished none
        for i, variant in enumerate(args.variants):
            path = recipe.with_name(f".{recipe.stem}-seed{seed}-{variant}.toml")  # beside it: relative paths hold
            path.write_text(variant_recipe(text, seed, variant))
            run_dir = Path(args.runs) / load_recipe(path).name
            print(f"== seed {seed}, {variant}: {path} (taking what it shares with {donor or 'none'}); "
                  f"{(time.perf_counter() - t0) / 60:.1f} min so far", flush=True)
            try:
                run_pipeline(path, runs_dir=args.runs, progress=False, plot=False, reuse=donor)
            except ValueError as e:  # e.g. a filter that keeps nothing: the variant has no result on this seed
                print(f"== seed {seed}, {variant} stopped: {e}", flush=True)
                failed[seed, variant] = str(e)
            results[seed, variant] = summary(run_dir, VARIANTS[variant][2], shared_runs(run_dir, donor))
            donor = run_dir if i == 0 else donor
    table = compare_table(results, args.seeds, args.variants)
    if failed:
        table += "\n\n" + "\n".join(f"Stopped (no result): seed {seed}, {variant}: {error}"
                                     for (seed, variant), error in sorted(failed.items()))
    out = Path(args.runs) / "demo-compare.md"
    out.write_text(table + "\n")
    print(f"\n{table}\n\n({(time.perf_counter() - t0) / 60:.1f} min in all; written to {out})")


if __name__ == "__main__":
    main()
