"""`w2s report runs/<name>`: the paper-style table of a pipeline run, from its stages' meta.json files
(and the run's recipe.json for its grader and whether it has gold).

Tables: methods (greedy test accuracy and PGR, as in the paper, under the recipe's grader; pass@k and MATH levels
when run), the same accuracies under every grader side by side with the number of test questions on which two
graders disagree (so the choice of grader has a visible price), the training data selected from train_2
(filtered-set sizes and pairs, with their selection precision against train_2 gold, for analysis only), the
responses that stopped at the token limit (truncated) per stage, the cost of every stage (time, tokens, tokens/s,
MFU, peak memory) and its roll-up by kind of work (sampling, training, evaluation, data and filtering). The figure
(w2s/plot.py) goes to report.png (needs matplotlib, the `plot` extra; the tables do not).

A run of the setting without gold ([data] train_2, OlympicArena) has no strong ceiling and no train_2 gold: its
table compares every method with the weak model used as is (the difference in points) instead of PGR, says why, and
its selected data has no precision column.

    w2s report runs/demo
    python -m pytest -q tests/test_pipeline.py -k report
"""

from pathlib import Path

from w2s.engine import STAGES_FILE, current_metas
from w2s.files import read_json, write_atomic
from w2s.plot import m_plus_method, plot_report, stage2_rounds

# Display order and labels of the methods (the eval stages are named NN_eval_<method>).
METHODS = [
    ("weak_floor", "weak floor (weak model)"),
    ("full_weak_ft", "full weak fine-tuning"),
    ("strong_icl", "strong ICL (4-shot weak demos)"),
    ("stage1_r1_weak", "Stage I r1: weak-ft"),
    ("stage1_r1_icl", "Stage I r1: icl-ft"),
    ("stage1_r1_hybrid", "Stage I r1: hybrid-ft"),
    ("stage1_r2_weak", "Stage I r2: weak-ft"),
    ("stage1_r2_icl", "Stage I r2: icl-ft"),
    ("stage1_r2_hybrid", "Stage I r2: hybrid-ft"),
    ("stage2_dpo", "Stage II: DPO (M_pro)"),
    ("stage2_orpo", "Stage II: ORPO"),
    ("stage2_ipo", "Stage II: IPO"),
    ("stage2_grpo", "Stage II: GRPO (vote reward)"),
    ("ceiling", "strong ceiling (gold train_2)"),
]


def method_labels(acc, m_plus=None):
    """[(method, label)] of the evaluated methods in display order, M_plus (the model Stage II starts from: the method
    m_plus, from run_m_plus; else plot.m_plus_method's) marked."""
    m_plus = m_plus or m_plus_method(acc)
    labels = [(m, label + (" (M_plus)" if m == m_plus else "")) for m, label in METHODS if m in acc]
    # Stage II rounds >= 2 after the paper's rows, before the ceiling
    at = next((i for i, (m, _) in enumerate(labels) if m == "ceiling"), len(labels))
    extra = [(m, f"Stage II round {r}: {loss.upper()}") for m, loss, r in stage2_rounds(acc)]
    return labels[:at] + extra + labels[at:]


def load_metas(run_dir):
    """{stage: meta.json} of the run's finished stages as it stands (engine.current_metas): not the leftovers of an
    earlier recipe (a loss no longer in it, a stage trained under other options) nor a stage whose input ran again
    since it ran or is running again. left_out(run_dir, metas) names the directories left out."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise ValueError(f"{run_dir}: is a file, expected a run directory (runs/<recipe name>)")
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    metas = {meta_file.parent.name: _check_fields(meta_file, read_json(meta_file))
             for meta_file in sorted(run_dir.glob("*/meta.json"))}
    if not metas:
        raise FileNotFoundError(f"{run_dir}: no finished stage (no */meta.json)")
    table = run_dir / STAGES_FILE
    unfinished = {f.parent.name for f in run_dir.glob("*/key.txt")} - set(metas)  # started (again), not finished
    return current_metas(metas, read_json(table) if table.is_file() else None, unfinished)


def left_out(run_dir, metas):
    """The finished stage directories of run_dir that load_metas left out."""
    return sorted(f.parent.name for f in Path(run_dir).glob("*/meta.json") if f.parent.name not in metas)


# The meta.json fields the tables compute with, checked as the report loads them so that a hand-edited "0.5" is
# named with its file instead of failing in a format string: numbers (null where a stage has none, as mfu on a CPU;
# never a method's accuracy; n_truncated may be an object of them per kind of label; pass@k / maj@k keys too),
# objects of numbers (per grader or level), and the keys of a pairs stage's "counts" that the tables read (it also
# holds flags); and the device, a name.
NUMBERS = ("accuracy", "n_prompts", "n_completions", "n_truncated", "n_questions", "n_kept", "kept_fraction",
           "precision", "n_pairs", "pair_precision", "n_train_1", "wall_s", "tokens", "tok_s", "mfu", "peak_mem_gib")
NUMBER_OBJECTS = ("accuracy_by_grader", "accuracy_by_level", "accuracy_by_level_by_grader", "pass_by_grader",
                  "no_answer_by_grader", "grader_disagreements")
COUNTS_READ = ("questions", "weak_chosen", "weak_rejected")


def _check_fields(meta_file, meta):
    """meta, once the fields above hold what the tables compute with; else a ValueError naming the file, the key
    and the value."""
    def refuse(key, value, expected):
        raise ValueError(f"{meta_file}: {key} is {value!r}; expected {expected}")

    def check_number(key, value, null=True):  # a number (or null), or an object whose every leaf is one
        if isinstance(value, dict):
            for k, v in value.items():
                check_number(f"{key}.{k}", v, null)
        elif not (value is None and null or isinstance(value, (int, float)) and not isinstance(value, bool)):
            refuse(key, value, "a number")

    for key in [k for k in meta if k in NUMBERS or k.startswith(("pass@", "maj@"))]:
        if isinstance(meta[key], dict) and key != "n_truncated":
            refuse(key, meta[key], "a number")
        check_number(key, meta[key], null=key != "accuracy")
    counts = meta.get("counts", {})
    for key, value in [(k, meta[k]) for k in NUMBER_OBJECTS if k in meta] + [("counts", counts)]:
        if not isinstance(value, dict):
            refuse(key, value, "an object")
        if key == "counts":  # only the counts the tables read; a null count means none
            check_number(key, {k: value[k] for k in COUNTS_READ if k in value})
        else:
            check_number(key, value, null=False)
    if not isinstance(meta.get("device") or "", str):  # the cost table's heading lists the devices
        refuse("device", meta["device"], "a string")
    return meta


def pgr(acc, floor, ceiling):
    """Performance gap recovered (w2s.stages.metrics.pgr); None when a number is missing or the gap is empty."""
    from w2s.stages.metrics import pgr as gap_recovered

    if acc is None or floor is None or ceiling is None:
        return None
    return gap_recovered(acc, floor, ceiling)


def run_recipe_section(run_dir, section="data"):
    """A section of the run's recipe (recipe.json), or {} (no recipe.json: hand-made metas)."""
    recipe = Path(run_dir) / "recipe.json"
    return read_json(recipe).get(section, {}) if recipe.is_file() else {}


def run_m_plus(run_dir):
    """The method whose model the run's recipe makes M_plus: its last Stage I round's model of [stage2] start_from
    (the paper's: hybrid-ft); None without recipe.json (hand-made metas)."""
    if not (Path(run_dir) / "recipe.json").is_file():
        return None
    rounds = run_recipe_section(run_dir, "stage1").get("rounds", 2)
    return f"stage1_r{rounds}_{run_recipe_section(run_dir, 'stage2').get('start_from', 'hybrid')}"


def run_grader(run_dir):
    """The grader the run's recipe names (recipe.json, [data] grader), or None (no recipe.json: hand-made metas)."""
    return run_recipe_section(run_dir).get("grader")


def without_gold(run_dir, metas):
    """Whether the run is the setting without gold: its recipe gives [data] train_2, or (hand-made metas) its data
    stage recorded no train_1."""
    return bool(run_recipe_section(run_dir).get("train_2")) or metas.get("00_data", {}).get("n_train_1") == 0


GRADER_NOTES = {"paper": "the authors' protocol", "equivalence": "w2s's lenient grader",
                "math-verify": "Hugging Face's", "olympicarena": "OlympicArena's judge"}
NO_GOLD_WEAK_LABEL = "weak model (as is)"
NO_PGR = ("No PGR: this run has no gold for train_2 (the setting without gold, docs/PAPER.md), so there is no strong "
          "ceiling to measure the gap against. Every method is compared with the weak model used as is; 'vs weak' "
          "is the difference in accuracy points.")


def method_accuracies(metas, grader=None):
    """{method: accuracy} from the NN_eval_<method> stages: under `grader` when the stage scored it (an evaluation
    scores every available grader, so a changed grader needs no new sampling), else the stage's own "accuracy"."""
    acc = {}
    for name, meta in metas.items():
        by_grader = meta.get("accuracy_by_grader", {})
        if "_eval_" in name and (grader in by_grader or "accuracy" in meta):
            acc[name.split("_eval_", 1)[1]] = by_grader[grader] if grader in by_grader else meta["accuracy"]
    return acc


def _grader_rows(metas, labels):
    """(header, rows): each evaluated method's accuracy under every grader, its answer-less responses per grader,
    and how many test questions each pair of graders judges differently."""
    graders = list(dict.fromkeys(g for m in metas.values() for g in m.get("accuracy_by_grader", {})))
    if not graders:
        return None, []
    rows = []
    for method, label in labels:
        meta = next((m for n, m in metas.items() if n.endswith(f"_eval_{method}")), {})
        by_grader, no_answer = meta.get("accuracy_by_grader", {}), meta.get("no_answer_by_grader", {})
        disagree = ", ".join(f"{pair} {n}" for pair, n in meta.get("grader_disagreements", {}).items()) or "-"
        rows.append((label, *(_fmt(by_grader.get(g), pct=True) for g in graders),
                     " / ".join(_fmt(no_answer.get(g)) for g in graders), disagree))
    header = ["method", *(f"{g} %" for g in graders), "no answer (" + " / ".join(graders) + ")", "disagreements"]
    return header, rows


def _fmt(x, pct=False, digits=2):
    if x is None:
        return "-"
    if pct:
        return f"{100 * x:.{digits}f}"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def _table(header, rows):
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def _data_rows(metas, gold=True):
    """Filtered sets (kept questions, precision of the kept weak answers) and the preference pairs; without gold,
    no precision cell."""
    rows = []
    for name, meta in metas.items():
        if name.endswith("_filter"):
            precision = [_fmt(meta.get("precision"), pct=True, digits=1)] if gold else []
            rows.append((name, _fmt(meta.get("n_questions")), _fmt(meta.get("n_kept")),
                         _fmt(meta.get("kept_fraction"), pct=True, digits=1), *precision, "-"))
        elif name.endswith("_pairs") or "_pairs_" in name:  # 15_pairs, and 38_round<r>_pairs_<loss>
            counts = meta.get("counts", {})
            split = f"{counts.get('weak_chosen', '-')} weak chosen / {counts.get('weak_rejected', '-')} weak rejected"
            precision = [_fmt(meta.get("pair_precision"), pct=True, digits=1)] if gold else []
            rows.append((name, _fmt(counts.get("questions")), _fmt(meta.get("n_pairs")), "-", *precision, split))
    return rows


def _under(meta, field, grader):
    """A per-grader field of a meta.json ({grader: value}) for `grader`, or None."""
    return meta.get(field, {}).get(grader)


def _passes(values):
    return ", ".join(f"{k} {100 * v:.1f}" for k, v in values.items() if k.startswith(("pass@", "maj@")))


def _truncation_rows(metas):
    """Responses that stopped at the token limit, per stage: generations (labels, samples, test answers), and
    what the filters kept and the pairs used of them."""
    rows = []
    for name, meta in metas.items():
        truncated = meta.get("n_truncated")
        if isinstance(truncated, int):
            rows.append((name, _fmt(meta.get("n_completions")), _fmt(truncated),
                         _fmt(truncated / meta["n_completions"] if meta.get("n_completions") else None, pct=True,
                              digits=1)))
        elif isinstance(truncated, dict):
            rows.append((name, "-", ", ".join(f"{k} {v}" for k, v in truncated.items()), "-"))
    return rows


def _cost_rows(metas):
    return [(name, _fmt(meta.get("wall_s"), digits=1), _fmt(meta.get("tokens")), _fmt(meta.get("tok_s"), digits=0),
             _fmt(meta.get("mfu"), pct=True, digits=1), _fmt(meta.get("peak_mem_gib"), digits=2))
            for name, meta in metas.items()]


def _cost_by_kind(metas):
    """Rows of the roll-up: stages, wall time, its share and tokens per kind of work (meta.json "kind")."""
    names = {"generate": "sampling", "train": "training", "eval": "evaluation", "data": "data and filtering",
             "filter": "data and filtering"}
    kinds = {}
    for meta in metas.values():
        k = kinds.setdefault(names.get(meta.get("kind"), "other"), [0, 0.0, 0])
        k[0], k[1], k[2] = k[0] + 1, k[1] + (meta.get("wall_s") or 0), k[2] + (meta.get("tokens") or 0)
    total = sum(k[1] for k in kinds.values()) or 1.0
    order = ["sampling", "training", "evaluation", "data and filtering", "other"]
    return [(kind, kinds[kind][0], _fmt(kinds[kind][1], digits=1), _fmt(kinds[kind][1] / total, pct=True, digits=1),
             _fmt(kinds[kind][2]) if kinds[kind][2] else "-") for kind in order if kind in kinds]


def _method_section(acc, labels, grader, gold):
    """The headline: each method's accuracy with its PGR, or, without gold, with its difference to the weak model."""
    where = f"Grader: {grader or 'as each stage recorded'} (the recipe's [data] grader)."
    floor, ceiling = acc.get("weak_floor"), acc.get("ceiling")
    if gold:
        rows = [(label, _fmt(acc[m], pct=True), _fmt(pgr(acc[m], floor, ceiling), digits=3)) for m, label in labels]
        return ["## Test accuracy (greedy) and PGR", "", f"{where} PGR = (accuracy - weak floor) / (strong ceiling - "
                "weak floor); '-' where the gap is empty or missing.", "",
                _table(["method", "accuracy %", "PGR"], rows or [("(no evaluated model yet)", "-", "-")])]
    rows = [(label, _fmt(acc[m], pct=True), "-" if floor is None else f"{100 * (acc[m] - floor):+.2f}")
            for m, label in labels]
    return ["## Test accuracy (greedy), compared with the weak model", "", f"{where} {NO_PGR}", "",
            _table(["method", "accuracy %", "vs weak"], rows or [("(no evaluated model yet)", "-", "-")])]


def report(run_dir, plot=True):
    """The report as markdown text; writes report.md (and report.png when plotting is possible) in run_dir."""
    return write_report(run_dir, plot)[0]


def write_report(run_dir, plot=True):
    """report() and the paths it wrote: (text, [report.md, report.png when drawn])."""
    run_dir = Path(run_dir)
    metas = load_metas(run_dir)
    grader = run_grader(run_dir)
    acc = method_accuracies(metas, grader)
    gold = not without_gold(run_dir, metas)
    m_plus = run_m_plus(run_dir)
    labels = [(m, NO_GOLD_WEAK_LABEL if m == "weak_floor" and not gold else label)
              for m, label in method_labels(acc, m_plus)]
    passk = [(name.split("_passk_", 1)[1], _passes(_under(meta, "pass_by_grader", grader) or meta),
              "; ".join(f"{g}: {_passes(p)}" for g, p in meta.get("pass_by_grader", {}).items()) or "-")
             for name, meta in metas.items() if "_passk_" in name]
    devices = sorted({m["device"] for m in metas.values() if m.get("device")})
    total = sum(m.get("wall_s") or 0 for m in metas.values())
    out = [f"# w2s report: {run_dir.name}", ""]
    if old := left_out(run_dir, metas):
        out += [f"Left out: {', '.join(old)} (finished under an earlier recipe, or before an input of theirs ran "
                f"or started again: not part of this run as it stands).", ""]
    out += _method_section(acc, labels, grader, gold)
    header, grader_rows = _grader_rows(metas, labels)
    if grader_rows:
        legend = "; ".join(f"{g} = {GRADER_NOTES[g]}" for g in GRADER_NOTES if f"{g} %" in header)
        out += ["", "## The same accuracies under every grader", "",
                f"{legend}. Disagreements: test questions that two graders judge differently.", "",
                _table(header, grader_rows)]
    if passk:
        out += ["", "## pass@k and maj@k (samples at T=1; maj@k: the majority answer is correct)", "",
                _table(["model", "pass@k, maj@k %", "by grader %"], passk)]
    level_rows = [(n.split("_eval_", 1)[1], ", ".join(f"L{lv} {100 * a:.0f}" for lv, a in levels.items()))
                  for n, meta in metas.items() if "_eval_" in n and
                  (levels := _under(meta, "accuracy_by_level_by_grader", grader) or meta.get("accuracy_by_level"))]
    if level_rows:
        out += ["", "## MATH accuracy by level", "", _table(["method", "by level %"], level_rows)]
    if data_rows := _data_rows(metas, gold):
        title = "(precision vs train_2 gold: analysis only)" if gold else "(no gold: no precision)"
        header = ["stage", "questions", "kept / pairs", "kept %", *(["precision %"] if gold else []), "pairs"]
        out += ["", f"## Training data selected from train_2 {title}", "", _table(header, data_rows)]
    if truncation := _truncation_rows(metas):
        out += ["", "## Truncated responses (stopped at the token limit)", "",
                _table(["stage", "responses", "truncated", "truncated %"], truncation)]
    out += ["", f"## Cost per stage (total {total / 60:.1f} min on {', '.join(devices) or 'unknown device'})", "",
            _table(["stage", "wall s", "tokens", "tok/s", "MFU %", "peak mem GiB"], _cost_rows(metas)),
            "", "## Cost by kind of work (sampling: labels, samples; evaluation: test accuracy)", "",
            _table(["kind", "stages", "wall s", "share %", "tokens"], _cost_by_kind(metas))]
    text = "\n".join(out) + "\n"
    write_atomic(run_dir / "report.md", text)
    written = [run_dir / "report.md"]
    if plot and labels:
        written += [p for p in [plot_report(run_dir / "report.png", [acc], [metas], run_dir.name, m_plus)] if p]
    return text, written

