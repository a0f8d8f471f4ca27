"""What the setting without gold cannot see, on the miniature: the precision of its selected data against the world.

    python scripts/demo_olympic_audit.py             # runs/demo-olympic-seed{0,1,2} (make demo-olympic-seeds)
    python scripts/demo_olympic_audit.py runs/demo-olympic

A run of recipes/demo_olympic.toml never reads a train_2 answer: demo/olympic/train_2.jsonl has none, so its report
has no precision column. The miniature's questions come from a seeded world, though, and the world can draw them
again with their answers (w2s.world.make_olympic_splits, with the questions the bases read excluded as the build did:
scripts/pretrain_demo.py). This script does that outside the pipeline, checks that the draw is exactly the shipped
train_2 file, and grades with OlympicArena's judge, per run: every weak label, every 4-shot ICL label, the round-1 and
round-2 kept sets, and the preference pairs (how often the chosen response is right, and the rejected one).

Test: python -m pytest -q tests/test_nogold.py -k audit
"""

import argparse
import functools
import sys
from pathlib import Path

from w2s import world
from w2s.files import read_jsonl
from w2s.tasks import olympic_judge

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pretrain_demo  # noqa: E402  (a script beside this one: the build's sizes, difficulty and excluded questions)

ROOT = Path(__file__).resolve().parents[1]


def world_train_2(shipped=ROOT / "demo" / "olympic" / "train_2.jsonl", seed=pretrain_demo.SHIPPED_SEED):
    """{id: row with its answer} of the shipped train_2, drawn again from the world; refuses a file that is not the
    world's draw for `seed` (a rebuilt demo with another seed: pass it)."""
    rows = world_draw(seed)
    if world.without_gold(rows) != read_jsonl(shipped):
        raise SystemExit(f"{shipped}: not the world's train_2 draw for seed {seed}")
    return {row["id"]: row for row in rows}


@functools.cache
def world_draw(seed):
    """The world's train_2 rows for `seed`, answers included (regenerating the corpora takes seconds: once)."""
    seen = pretrain_demo.seen_questions(seed)
    return world.make_olympic_splits(seed, pretrain_demo.OLYMPIC_SIZES, {"instruct": pretrain_demo.INSTRUCT_DIFFICULTY},
                                     seen)["train_2"]


def right(rows, gold, field="response"):
    """(right, total) of rows {"id", field} judged against the world's answers."""
    return sum(olympic_judge.grade(row[field], gold[row["id"]]) for row in rows), len(rows)


def audit(run_dir, gold):
    """{what: (right, total)} of one run's selected data."""
    run_dir = Path(run_dir)
    out = {"weak labels (all)": right(read_jsonl(run_dir / "02_weak_labels" / "labels.jsonl"), gold),
           "ICL labels (all)": right(read_jsonl(run_dir / "03_icl_labels" / "labels.jsonl"), gold)}
    for name in ("04_r1_filter", "10_r2_filter"):
        if (run_dir / name / "weak.jsonl").is_file():
            out[f"{name}: kept"] = right(read_jsonl(run_dir / name / "weak.jsonl"), gold)
    pairs = read_jsonl(run_dir / "15_pairs" / "pairs.jsonl")
    out["15_pairs: chosen right"] = right(pairs, gold, "chosen")
    out["15_pairs: rejected right"] = right(pairs, gold, "rejected")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", default=[f"runs/demo-olympic-seed{s}" for s in (0, 1, 2)],
                   help="run directories of recipes/demo_olympic.toml (default: the three of make demo-olympic-seeds)")
    args = p.parse_args()
    for run in args.runs:  # what the audit reads first: say which run is missing before regenerating the world
        if not (Path(run) / "15_pairs" / "pairs.jsonl").is_file():
            raise SystemExit(f"{run}: no finished run of recipes/demo_olympic.toml (15_pairs/pairs.jsonl is missing); "
                             f"make demo-olympic-seeds runs the three the default expects")
    gold = world_train_2()
    results = {run: audit(run, gold) for run in args.runs}
    rows = list(next(iter(results.values())))
    print("| selected data | " + " | ".join(Path(r).name for r in args.runs) + " |")
    print("|---|" + "---|" * len(args.runs))
    for what in rows:
        cells = [results[r].get(what) for r in args.runs]
        print(f"| {what} | " + " | ".join("-" if c is None else f"{100 * c[0] / max(c[1], 1):.0f} % of {c[1]}"
                                          for c in cells) + " |")


if __name__ == "__main__":
    main()
