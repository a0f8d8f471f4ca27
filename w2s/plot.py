"""The report's figure (report.png): one run, or several seeds of it with their mean and spread.

Left panel, accuracy: greedy test accuracy per method, grouped as the paper presents them (baselines, Stage I round
1, Stage I round 2, Stage II) with one colour per group; the weak floor and the strong ceiling as vertical lines; each
bar labelled with its accuracy and PGR, and a PGR axis on top (0 at the floor, 1 at the ceiling). Right panel,
selection: the precision against train_2 gold of the weak labels before and after each round's consistency filter and
of the Stage II pairs (their chosen answers: all, weak chosen, weak rejected), each bar labelled with its set size.
With several runs (seeds) every bar is the mean, the whisker one sample standard deviation, the dots the seeds.

    plot_report("runs/demo/report.png", [accuracies], [metas], "demo")      # w2s report (w2s/report.py)
    scripts/demo_seeds.py: runs/demo-seeds/report.png over runs/demo-seed{0,1,2}

Needs matplotlib (the `plot` extra); without it plot_report says so and returns None.

    python -m pytest -q tests/test_plot.py
"""

import os
import statistics
from pathlib import Path

from w2s.files import unique_temp_path

# (group title, colour, [(method, bar label)]): the paper's grouping of its results tables
GROUPS = [
    ("Baselines", "#7a7a7a", [("full_weak_ft", "full weak fine-tuning"), ("strong_icl", "strong ICL (4-shot)")]),
    ("Stage I, round 1", "#4c72b0", [("stage1_r1_weak", "weak-ft"), ("stage1_r1_icl", "icl-ft"),
                                     ("stage1_r1_hybrid", "hybrid-ft")]),
    ("Stage I, round 2", "#55a868", [("stage1_r2_weak", "weak-ft"), ("stage1_r2_icl", "icl-ft"),
                                     ("stage1_r2_hybrid", "hybrid-ft")]),
    ("Stage II", "#c44e52", [("stage2_dpo", "DPO (M_pro)"), ("stage2_orpo", "ORPO"), ("stage2_ipo", "IPO"),
                             ("stage2_grpo", "GRPO")]),
]
FLOOR_COLOUR, CEILING_COLOUR, BEFORE_COLOUR = "#dd8452", "#8172b3", "#d0d0d0"


def stage2_rounds(methods):
    """[(method, loss, round)] of the Stage II rounds >= 2 among these method names ([stage2] rounds evaluates them as
    stage2_<loss>_round<r>), by loss then round: the table (w2s/report.py) and the figure show them in this order."""
    rounds = [(m, m.split("_")[1], int(m.rsplit("round", 1)[1])) for m in set(methods)
              if m.startswith("stage2_") and "_round" in m]
    return sorted(rounds, key=lambda r: (r[1], r[2]))


def spread(values):
    """(mean, sample standard deviation or 0, the values) of the values present (None where none is)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, values


def m_plus_method(methods):
    """M_plus's method when the recipe is not at hand (hand-made metas): the paper's, the hybrid-ft model of the last
    Stage I round evaluated (round 2 on GSM8K, round 1 under MATH's one-round recipe). report.run_m_plus reads a
    run's recipe instead."""
    return next((m for m in ("stage1_r2_hybrid", "stage1_r1_hybrid") if m in methods), None)


def accuracy_rows(accuracies, m_plus=None):
    """[(group, colour, label, spread of accuracy %)] of the methods evaluated in any run, in display order, M_plus
    (the method m_plus, or m_plus_method's) marked."""
    m_plus = m_plus or m_plus_method({m for acc in accuracies for m in acc})
    rounds = [(m, f"{loss.upper()} round {r}") for m, loss, r in stage2_rounds(m for acc in accuracies for m in acc)]
    rows = []
    for group, colour, methods in GROUPS[:-1] + [(*GROUPS[-1][:2], GROUPS[-1][2] + rounds)]:
        for method, label in methods:
            s = spread([100 * acc[method] if method in acc else None for acc in accuracies])
            if s is not None:
                rows.append((group, colour, label + (" (M_plus)" if method == m_plus else ""), s))
    return rows


def selection_bars(metas):
    """[(group, bar label, colour, spread of precision %, spread of set size, spread of how many it was selected
    from)] from the filter stages' and the pairs stage's meta.json, for the selection panel."""
    def field(stage, *keys):
        values = []
        for m in metas:
            v = m.get(stage)
            for k in keys:
                v = v.get(k) if isinstance(v, dict) else None
            values.append(v)
        return spread([100 * v if v is not None and keys[-1].startswith(("precision", "pair_precision")) else v
                       for v in values])

    bars = []
    # round 2's "weak" labels are those of the round-1 weak-ft model
    for group, stage, colour, before in (("Round 1 filter", "04_r1_filter", GROUPS[1][1], "all weak labels"),
                                         ("Round 2 filter", "10_r2_filter", GROUPS[2][1], "all weak-ft labels")):
        bars.append((group, before, BEFORE_COLOUR, field(stage, "precision_weak_all"), field(stage, "n_questions"),
                     None))
        bars.append((group, "kept (answers agree)", colour, field(stage, "precision"), field(stage, "n_kept"),
                     field(stage, "n_questions")))
    colour = GROUPS[3][1]
    bars.append(("Stage II pairs (chosen)", "all pairs", colour, field("15_pairs", "pair_precision"),
                 field("15_pairs", "n_pairs"), None))
    for kind in ("weak_chosen", "weak_rejected"):
        bars.append(("Stage II pairs (chosen)", kind.replace("_", " "), colour + "99",
                     field("15_pairs", f"pair_precision_{kind}"), field("15_pairs", "counts", kind), None))
    return [b for b in bars if b[3] is not None]


def _fmt(s, digits=1):
    mean, sd, values = s
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if len(values) > 1 else "")


def _size(size, of):
    """A set size: "n=34/400", or over seeds "n=33±5/400" (a spread only where there is one)."""
    mean, sd, _ = size
    text = f"n={mean:.0f}" + (f"±{sd:.0f}" if round(sd) else "")
    return text + (f"/{of[0]:.0f}" if of and not round(of[1]) else "")


def _light(colour):
    """Whether a bar colour (over the white background, alpha included) is light enough for black text."""
    from matplotlib.colors import to_rgba

    r, g, b, a = to_rgba(colour)
    return sum(w * (a * c + 1 - a) for w, c in zip((0.299, 0.587, 0.114), (r, g, b))) > 0.6


def _hbars(ax, rows):
    """Horizontal bars in display order under bold group headers in the group's colour: rows are (group, colour,
    label, spread, bar text). Over seeds: the mean, a whisker of one sd, a dot per seed. The bar text sits inside a
    long bar (ending before the whisker and the dots), past the whisker of a short one."""
    y, ticks, labels, last_group = 0, [], [], None
    header_colour = {}  # a group's first colour that is not the "before selection" grey
    for group, colour, *_ in rows:
        if colour != BEFORE_COLOUR:
            header_colour.setdefault(group, colour)
    for group, colour, label, (mean, sd, values), text in rows:
        if group != last_group:  # a header row: the group's name, no bar
            ticks.append(y), labels.append(group)
            y, last_group = y + 1, group
        ax.barh(y, mean, color=colour, height=0.72, zorder=2)
        if len(values) > 1:
            ax.errorbar(mean, y, xerr=sd, color="black", capsize=3, lw=1, zorder=4)
            ax.scatter(values, [y] * len(values), s=9, color="black", zorder=5, linewidths=0)
        if mean >= 45:
            t = ax.text(min([mean - sd] + values) - 1.5, y, text, va="center", ha="right", fontsize=8, zorder=6,
                        color="black" if _light(colour) else "white", fontweight="bold")
            t.set_gid("inside")  # tests/test_plot.py: such a label must lie on its own bar
        else:  # on white where it crosses a reference line
            ax.text(max([mean + sd] + values) + 1.5, y, text, va="center", ha="left", fontsize=8, zorder=6,
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.6, "alpha": 0.85})
        ticks.append(y), labels.append(label)
        y += 1
    ax.set_yticks(ticks, labels, fontsize=9)
    for tick in ax.get_yticklabels():
        if tick.get_text() in header_colour:
            tick.set_fontweight("bold"), tick.set_color(header_colour[tick.get_text()])
    ax.set_ylim(y - 0.4, -0.6)  # top to bottom in display order
    ax.set_xlim(0, 105)  # room past 100 %: a line or bar at 100 stays off the frame
    ax.set_xticks(range(0, 101, 20))
    ax.grid(axis="x", color="#e6e6e6", zorder=0)
    ax.set_axisbelow(True)


def _draw_accuracy(ax, rows, floor, ceiling):
    """The accuracy bars labelled with accuracy and PGR, the floor and ceiling lines (a band of one sd over seeds)
    and a PGR axis on top. -> whether PGR is defined (a floor and a ceiling apart)."""
    pgr = None
    if floor and ceiling and abs(ceiling[0] - floor[0]) > 1e-9:
        pgr = (lambda a: (a - floor[0]) / (ceiling[0] - floor[0]), lambda p: floor[0] + p * (ceiling[0] - floor[0]))
    _hbars(ax, [(*row, _fmt(row[3]) + (f"  ·  PGR {pgr[0](row[3][0]):.2f}" if pgr else "")) for row in rows])
    weak = "weak floor" if ceiling else "weak model"  # no ceiling (the setting without gold): nothing it floors
    for line, colour, name in ((floor, FLOOR_COLOUR, weak), (ceiling, CEILING_COLOUR, "strong ceiling")):
        if line is not None:  # behind the bars: a label on a bar is never crossed
            ax.axvline(line[0], color=colour, ls="--", lw=1.5, zorder=1, label=f"{name} ({_fmt(line)} %)")
            if len(line[2]) > 1:
                ax.axvspan(line[0] - line[1], line[0] + line[1], color=colour, alpha=0.15, zorder=0, lw=0)
    ax.set_xlabel("greedy test accuracy (%)")
    if pgr:
        top = ax.secondary_xaxis("top", functions=pgr)
        top.set_xlabel("PGR = (accuracy − weak floor) / (ceiling − weak floor)", fontsize=9)
    return pgr is not None


def _draw_selection(ax, bars):
    """Bars of selection precision under each selection step, labelled with precision and set size."""
    _hbars(ax, [(group, colour, label, precision, f"{_fmt(precision)} %" + (f"  ·  {_size(size, of)}" if size else ""))
                for group, label, colour, precision, size, of in bars])
    ax.set_xlabel("precision vs train_2 gold (%)\nof the labels; of the pairs' chosen answers", fontsize=9)


def plot_report(path, accuracies, metas, title, m_plus=None):
    """Draw the figure for one run or several (one accuracy dict and one {stage: meta} dict per run) into path;
    m_plus: the method their recipes make M_plus (report.run_m_plus). -> path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(no plot: pip install matplotlib to get {path})")
        return None
    fig = figure(plt, accuracies, metas, title, m_plus)
    tmp = unique_temp_path(path)
    try:  # through a temp file, so that a report being redrawn never leaves half a figure
        fig.savefig(tmp, dpi=150, format=Path(path).suffix.lstrip(".") or "png")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
        plt.close(fig)
    return path


def figure(plt, accuracies, metas, title, m_plus=None):
    """The matplotlib Figure of plot_report (tests inspect where its texts landed)."""
    rows = accuracy_rows(accuracies, m_plus)
    floor = spread([100 * a["weak_floor"] if "weak_floor" in a else None for a in accuracies])
    ceiling = spread([100 * a["ceiling"] if "ceiling" in a else None for a in accuracies])
    bars = selection_bars(metas)
    n_rows = len(rows) + len({r[0] for r in rows})
    fig = plt.figure(figsize=(13.5, max(4.8, 0.3 * n_rows + 2.6)), layout="constrained")
    grid = fig.add_gridspec(1, 2, width_ratios=[1.6, 1] if bars else [1, 0.001])
    ax = fig.add_subplot(grid[0])
    has_pgr = _draw_accuracy(ax, rows, floor, ceiling)
    handles, labels = ax.get_legend_handles_labels()
    if len(accuracies) > 1:
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], color="black", marker="o", ms=3, lw=1))
        labels.append(f"mean ± sd over {len(accuracies)} seeds, dots: each seed")
    if handles:
        ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncols=min(len(handles), 3),
                  fontsize=8, frameon=False)
    ax.set_title("Test accuracy by method" + (" (bar labels: accuracy · PGR)" if has_pgr else ""), fontsize=10)
    if bars:
        side = fig.add_subplot(grid[1])
        _draw_selection(side, bars)
        side.set_title("Selected training data: precision and size", fontsize=10)
    n_test = {m.get("20_eval_weak_floor", {}).get("n_prompts") for m in metas} - {None}
    about = [f"{n_test.pop()} test questions"] if len(n_test) == 1 else []
    about += [f"mean of {len(accuracies)} seeds"] if len(accuracies) > 1 else []
    fig.suptitle(f"Weak-to-strong: {title}" + (f" ({', '.join(about)})" if about else ""), fontsize=12)
    return fig
