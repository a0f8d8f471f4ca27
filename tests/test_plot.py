"""The report's figure (w2s/plot.py) for one run and for several seeds, drawn from hand-written meta.json files:
every text inside the figure and clear of every other text, bar labels on their own bar or clear of every bar,
legends outside the plotting area; `w2s report` names the files it wrote; the cost roll-up by kind of work;
scripts/demo_seeds.py's table and figure over seeds; scripts/evaluate.py's per-question lines.

    python -m pytest -q tests/test_plot.py
"""

import json
import statistics
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from w2s.plot import accuracy_rows
from w2s.report import load_metas, method_accuracies, write_report

ROOT = Path(__file__).resolve().parents[1]
ACCURACY = {"weak_floor": 0.132, "full_weak_ft": 0.154, "strong_icl": 0.872, "stage1_r1_weak": 0.196,
            "stage1_r1_icl": 0.87, "stage1_r1_hybrid": 0.472, "stage1_r2_weak": 0.322, "stage1_r2_icl": 0.926,
            "stage1_r2_hybrid": 0.648, "stage2_dpo": 0.846, "stage2_orpo": 0.628, "ceiling": 1.0}
NUMBERS = {"weak_floor": 20, "full_weak_ft": 21, "stage1_r1_weak": 22, "stage1_r1_icl": 23, "stage1_r1_hybrid": 24,
           "stage1_r2_weak": 25, "stage1_r2_icl": 26, "stage1_r2_hybrid": 27, "stage2_dpo": 28, "stage2_orpo": 29,
           "ceiling": 30, "strong_icl": 31}


def write_run(run_dir, shift=0.0):
    """A finished run's meta.json files (accuracies moved by `shift`, as another seed would), one per kind."""
    def stage(name, kind, **meta):
        (run_dir / name).mkdir(parents=True)
        (run_dir / name / "meta.json").write_text(json.dumps({"stage": name, "kind": kind, **meta}))

    stage("00_data", "data", wall_s=0.1)
    stage("02_weak_labels", "generate", wall_s=3.0, tokens=1000)
    stage("05_r1_sft_weak", "train", wall_s=6.0, tokens=4000)
    stage("04_r1_filter", "filter", wall_s=0.1, n_questions=400, n_kept=34 + int(100 * shift), precision=0.853,
          precision_weak_all=0.082 + shift)
    stage("10_r2_filter", "filter", wall_s=0.1, n_questions=400, n_kept=60, precision=0.983 - abs(shift),
          precision_weak_all=0.162)
    stage("15_pairs", "filter", wall_s=0.1, n_pairs=171, pair_precision=0.69 + shift, pair_precision_weak_chosen=0.571,
          pair_precision_weak_rejected=0.70, counts={"questions": 400, "weak_chosen": 14, "weak_rejected": 157})
    for method, acc in ACCURACY.items():
        value = acc if method == "ceiling" else min(1.0, max(0.0, acc + shift))
        stage(f"{NUMBERS[method]}_eval_{method}", "eval", accuracy=value, wall_s=2.0, tokens=500, n_prompts=500)
    return run_dir


def check_layout(fig):
    """Texts inside the figure and apart; a bar label on its own bar or off every bar; legends off the axes."""
    from matplotlib.patches import Rectangle
    from matplotlib.text import Text

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = fig.bbox
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    boxes = [(t, t.get_window_extent(renderer)) for t in texts]
    for t, box in boxes:
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, t.get_text()
    for i, (a, box_a) in enumerate(boxes):
        for b, box_b in boxes[i + 1:]:
            assert not box_a.overlaps(box_b), (a.get_text(), b.get_text())
    for ax in fig.axes:
        bars = [p.get_window_extent(renderer) for p in ax.patches if isinstance(p, Rectangle)]
        for t in ax.texts:
            box = t.get_window_extent(renderer)
            on = [bar for bar in bars if bar.overlaps(box)]
            if t.get_gid() == "inside":
                assert len(on) == 1 and on[0].x0 <= box.x0 and box.x1 <= on[0].x1, t.get_text()
            else:
                assert not on, t.get_text()
        if ax.get_legend() is not None:
            assert not ax.get_legend().get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))


def figure_of(run_dirs, title="demo"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from w2s.plot import figure

    metas = [load_metas(d) for d in run_dirs]
    return figure(plt, [method_accuracies(m) for m in metas], metas, title)


def test_one_run_figure_groups_methods_with_floor_ceiling_and_pgr(tmp_path):
    pytest.importorskip("matplotlib")
    run = write_run(tmp_path / "demo")
    fig = figure_of([run])
    check_layout(fig)
    left, right = fig.axes
    [pgr_axis] = left.child_axes
    ticks = [t.get_text() for t in left.get_yticklabels()]
    assert ticks == ["Baselines", "full weak fine-tuning", "strong ICL (4-shot)", "Stage I, round 1", "weak-ft",
                     "icl-ft", "hybrid-ft", "Stage I, round 2", "weak-ft", "icl-ft", "hybrid-ft (M_plus)", "Stage II",
                     "DPO (M_pro)", "ORPO"]
    labels = [t.get_text() for t in left.texts]
    assert "87.2  ·  PGR 0.85" in labels and "15.4  ·  PGR 0.03" in labels  # (15.4 - 13.2) / (100 - 13.2)
    assert [t.get_text() for t in left.get_legend().get_texts()] == ["weak floor (13.2 %)", "strong ceiling (100.0 %)"]
    assert "PGR" in pgr_axis.get_xlabel()
    assert [t.get_text() for t in right.get_yticklabels()] == [
        "Round 1 filter", "all weak labels", "kept (answers agree)", "Round 2 filter", "all weak-ft labels",
        "kept (answers agree)", "Stage II pairs (chosen)", "all pairs", "weak chosen", "weak rejected"]
    assert [t.get_text() for t in right.texts] == ["8.2 %  ·  n=400", "85.3 %  ·  n=34/400", "16.2 %  ·  n=400",
                                                   "98.3 %  ·  n=60/400", "69.0 %  ·  n=171", "57.1 %  ·  n=14",
                                                   "70.0 %  ·  n=157"]
    assert fig.get_suptitle() == "Weak-to-strong: demo (500 test questions)"


def test_seeds_figure_has_mean_spread_and_every_seed(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    runs = [write_run(tmp_path / f"demo-seed{s}", shift) for s, shift in enumerate((0.0, 0.02, -0.03))]
    fig = figure_of(runs)
    check_layout(fig)
    left = fig.axes[0]
    assert "86.9 ± 2.5  ·  PGR 0.85" in [t.get_text() for t in left.texts]  # strong ICL: 87.2, 89.2, 84.2
    assert left.get_legend().get_texts()[-1].get_text() == "mean ± sd over 3 seeds, dots: each seed"
    assert "weak floor (12.9 ± 2.5 %)" in [t.get_text() for t in left.get_legend().get_texts()]
    assert "mean of 3 seeds" in fig.get_suptitle()

    sys.path.insert(0, str(ROOT / "scripts"))
    import demo_seeds

    table, written = demo_seeds.write_seeds_report(dict(enumerate(runs)), tmp_path / "demo-seeds", "demo")
    assert written == [tmp_path / "demo-seeds" / "report.md", tmp_path / "demo-seeds" / "report.png"]
    assert "| strong ICL (4-shot weak demos) | 87.2 | 89.2 | 84.2 | 86.9 | 2.5 |" in table
    assert (tmp_path / "demo-seeds" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Seeds of a recipe whose Stage II starts from the icl-ft model: the figure marks that one M_plus.
    drawn = {}
    monkeypatch.setattr(demo_seeds, "plot_report", lambda *args: drawn.setdefault("args", args))
    for run in runs:
        (run / "recipe.json").write_text(json.dumps({"data": {}, "stage2": {"start_from": "icl"}}))
    demo_seeds.write_seeds_report(dict(enumerate(runs)), tmp_path / "demo-seeds", "demo")
    assert "icl-ft (M_plus)" in [row[2] for row in accuracy_rows(drawn["args"][1], *drawn["args"][4:])]


def test_report_says_what_it_wrote_and_rolls_cost_up_by_kind(tmp_path):
    from w2s.cli import main

    run = write_run(tmp_path / "demo")
    result = CliRunner().invoke(main, ["report", str(run)])
    assert result.exit_code == 0, result.output
    expected = [run / "report.md"] + ([run / "report.png"] if _has_matplotlib() else [])
    assert result.output.strip().splitlines()[-1] == "wrote " + ", ".join(map(str, expected))
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in result.output.split("## Cost by kind of work")[1].splitlines() if line.startswith("| ")}
    # 12 evaluations x 2 s, one labelling stage 3 s, one training stage 6 s, data and three filters 0.1 s each
    assert rows["sampling"] == ["1", "3.0", "9.0", "1,000"] and rows["training"] == ["1", "6.0", "18.0", "4,000"]
    assert rows["evaluation"] == ["12", "24.0", "71.9", "6,000"] and rows["data and filtering"][:2] == ["4", "0.4"]
    text, written = write_report(run, plot=False)
    assert written == [run / "report.md"] and (run / "report.md").read_text() == text


def test_stage2_rounds_are_in_the_table_and_the_figure_in_the_same_order(tmp_path):
    """[stage2] rounds: round r of each loss after the paper's Stage II rows, by loss then round (round 10 after 2),
    in report.md and in the figure's Stage II group alike."""
    run = write_run(tmp_path / "demo")
    for method, acc in (("stage2_orpo_round2", 0.7), ("stage2_dpo_round10", 0.9), ("stage2_dpo_round2", 0.86)):
        (run / f"40_eval_{method}").mkdir()
        (run / f"40_eval_{method}" / "meta.json").write_text(json.dumps({"accuracy": acc, "kind": "eval"}))
    text, _ = write_report(run, plot=False)
    table = [line.split("|")[1].strip() for line in text.split("\n## ")[1].splitlines() if line.startswith("| ")]
    assert table[table.index("Stage II: ORPO"):] == ["Stage II: ORPO", "Stage II round 2: DPO",
                                                      "Stage II round 10: DPO", "Stage II round 2: ORPO",
                                                      "strong ceiling (gold train_2)"]
    pytest.importorskip("matplotlib")
    fig = figure_of([run])
    check_layout(fig)
    ticks = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert ticks[ticks.index("Stage II"):] == ["Stage II", "DPO (M_pro)", "ORPO", "DPO round 2", "DPO round 10",
                                               "ORPO round 2"]



def test_a_method_at_zero_accuracy_keeps_its_bar_and_a_round_of_several_seeds_is_one_row():
    """0 % is a result, not a missing one; a Stage II round evaluated in every seed is one row of their spread."""
    rows = accuracy_rows([{"stage1_r1_weak": 0.0, "stage2_dpo_round2": 0.5},
                          {"stage1_r1_weak": 0.0, "stage2_dpo_round2": 0.7}])
    assert [(group, label) for group, _, label, _ in rows] == [("Stage I, round 1", "weak-ft"),
                                                               ("Stage II", "DPO round 2")]
    assert rows[0][3] == (0.0, 0.0, [0.0, 0.0])
    mean, sd, values = rows[1][3]
    assert (mean, sd) == (pytest.approx(60.0), pytest.approx(200 ** 0.5)) and values == pytest.approx([50.0, 70.0])


def _contrast(a, b):
    """WCAG 2 contrast ratio of two opaque sRGB colours."""
    def luminance(rgb):
        lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]

    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_group_headers_take_their_groups_colour_and_labels_inside_bars_are_the_legible_of_black_and_white(tmp_path):
    """A selection group's header is bold in the colour of its kept bar (not the grey of the bar before selection);
    a label drawn on a bar is black or white, whichever contrasts more with the bar as seen over the white figure
    (the Stage II pairs' bars are translucent)."""
    pytest.importorskip("matplotlib")
    from matplotlib.colors import to_hex, to_rgba

    fig = figure_of([write_run(tmp_path / "demo")])
    fig.canvas.draw()
    right = fig.axes[1]
    ticks = {t.get_text(): t for t in right.get_yticklabels()}
    # bars top to bottom: all weak labels, kept, all weak-ft labels, kept, all pairs, weak chosen, weak rejected
    assert len(right.patches) == 7
    for header, kept in (("Round 1 filter", 1), ("Round 2 filter", 3), ("Stage II pairs (chosen)", 4)):
        assert to_hex(ticks[header].get_color()) == to_hex(right.patches[kept].get_facecolor(), keep_alpha=False)
        assert ticks[header].get_fontweight() == "bold"
    inside = {t.get_text(): t for ax in fig.axes for t in ax.texts if t.get_gid() == "inside"}
    for label, bar in (("57.1 %  ·  n=14", right.patches[5]), ("85.3 %  ·  n=34/400", right.patches[1])):
        r, g, b, a = bar.get_facecolor()
        seen = [a * c + 1 - a for c in (r, g, b)]  # alpha-composited over the white background
        legible = max(("black", "white"), key=lambda name: _contrast(seen, to_rgba(name)[:3]))
        assert to_hex(inside[label].get_color()) == to_hex(legible), label


def test_seed_dots_and_whiskers_stay_clear_of_the_bar_labels_and_bands_span_one_sd(tmp_path):
    """Over seeds a label inside a bar ends left of the bar's leftmost dot and whisker, one past a short bar starts
    right of them; with two seeds already the floor and ceiling lines get a band of mean +- one sample sd. Bars read
    top to bottom in display order and the frame ends past 100 %. Seeds: kept 34 and 38 of 400 questions in round 1,
    the second seed's filter seeing 380; round 2 keeps 60 of 400 in both."""
    pytest.importorskip("matplotlib")
    from matplotlib.collections import LineCollection, PathCollection

    runs = [write_run(tmp_path / f"demo-seed{s}", shift) for s, shift in enumerate((0.0, 0.04))]
    meta = json.loads((runs[1] / "04_r1_filter" / "meta.json").read_text())
    (runs[1] / "04_r1_filter" / "meta.json").write_text(json.dumps({**meta, "n_questions": 380}))
    fig = figure_of(runs)
    fig.canvas.draw()
    # set sizes over seeds: a spread where there is one, "of how many" only where every seed selected from as many
    assert [t.get_text() for t in fig.axes[1].texts][:4] == ["10.2 ± 2.8 %  ·  n=390±14", "85.3 ± 0.0 %  ·  n=36±3",
                                                             "16.2 ± 0.0 %  ·  n=400", "96.3 ± 2.8 %  ·  n=60/400"]
    for ax in fig.axes:
        assert ax.yaxis_inverted() and ax.get_xlim()[1] > 100
        dots = [(x, y) for c in ax.collections if isinstance(c, PathCollection) for x, y in c.get_offsets()]
        ends = [(x, y) for c in ax.collections if isinstance(c, LineCollection) for seg in c.get_segments()
                for x, y in seg]  # the whiskers' ends
        for t in ax.texts:
            x, y = t.get_position()
            seeds, whisker = ([mx for mx, my in marks if abs(my - y) < 1e-9] for marks in (dots, ends))
            assert len(seeds) == 2, t.get_text()
            mean, sd = statistics.mean(seeds), statistics.stdev(seeds)
            assert sorted(whisker) == pytest.approx([mean - sd, mean + sd]), t.get_text()
            assert x < min(seeds + whisker) if t.get_ha() == "right" else x > max(seeds + whisker), t.get_text()
    left = fig.axes[0]
    dots = sorted(float(x) for c in left.collections if isinstance(c, PathCollection) for x, _ in c.get_offsets())
    seeds = [100 * a for m, a in ACCURACY.items() if m not in ("weak_floor", "ceiling") for a in (a, a + 0.04)]
    assert dots == pytest.approx(sorted(seeds))  # a dot at each seed's own accuracy
    spans = [(p.get_x(), p.get_x() + p.get_width()) for p in left.patches if p.get_alpha() == 0.15]
    floor_sd = 8 ** 0.5  # 13.2 and 17.2: sample sd 4 / sqrt(2)
    assert spans == [(pytest.approx(15.2 - floor_sd), pytest.approx(15.2 + floor_sd)),
                     (pytest.approx(100.0), pytest.approx(100.0))]


def test_pgr_axis_puts_0_on_the_floor_and_1_on_the_ceiling_and_none_when_they_coincide(tmp_path):
    pytest.importorskip("matplotlib")
    fig = figure_of([write_run(tmp_path / "demo")])
    fig.canvas.draw()
    left = fig.axes[0]
    [pgr_axis] = left.child_axes
    on_pgr = pgr_axis.transData.transform([(0.0, 0.0), (1.0, 0.0), (0.5, 0.0)])[:, 0]
    on_accuracy = left.transData.transform([(13.2, 0.0), (100.0, 0.0), (56.6, 0.0)])[:, 0]
    assert on_pgr.tolist() == pytest.approx(on_accuracy.tolist())

    import matplotlib.pyplot as plt

    from w2s.plot import figure

    same = figure(plt, [{"weak_floor": 0.5, "ceiling": 0.5, "stage1_r1_weak": 0.6}], [{}], "flat")
    assert not same.axes[0].child_axes and [t.get_text() for t in same.axes[0].texts] == ["60.0"]
    assert "PGR" not in same.axes[0].get_title()


def test_the_figure_is_written_in_the_format_its_name_asks_for(tmp_path):
    pytest.importorskip("matplotlib")
    from w2s.plot import plot_report

    metas = load_metas(write_run(tmp_path / "demo"))
    path = tmp_path / "report.svg"
    assert plot_report(path, [method_accuracies(metas)], [metas], "demo") == path
    assert path.read_bytes().startswith(b"<?xml") and b"<svg" in path.read_bytes()[:1000]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "report.svg"]  # no temp file left beside it


def _has_matplotlib():
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def test_a_run_still_in_progress_gets_a_figure_of_what_is_there(tmp_path):
    """Only the weak floor and one Stage I model evaluated, no filter finished: no PGR axis, no selection panel."""
    pytest.importorskip("matplotlib")
    run = tmp_path / "partial"
    for name, acc in (("20_eval_weak_floor", 0.2), ("22_eval_stage1_r1_weak", 0.3)):
        (run / name).mkdir(parents=True)
        (run / name / "meta.json").write_text(json.dumps({"accuracy": acc, "kind": "eval"}))
    fig = figure_of([run], "partial")
    check_layout(fig)
    assert len(fig.axes) == 1 and not fig.axes[0].child_axes
    assert [t.get_text() for t in fig.axes[0].texts] == ["30.0"]
    # without a ceiling the weak model floors nothing: it is named as what it is
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["weak model (20.0 %)"]
    text, written = write_report(run)
    assert written[-1] == run / "report.png" and "| sampling" not in text and "| evaluation | 2" in text


# ---------------------------------------------------------------------------------------------- evaluate.py


def test_evaluate_writes_each_question_with_its_id_gold_and_correctness(tmp_path, monkeypatch):
    """Completions already in --out (a finished run) are graded, not regenerated: the per-question lines follow, from
    the one grading pass that gives the accuracy (the headline grader reads each response once)."""
    import importlib.util

    import torch

    from w2s import world
    from w2s.checkpoint import save_model
    from w2s.config import ModelConfig
    from w2s.model import Transformer
    from w2s.sampling_jsonl import write_run_meta
    from w2s.tasks import stored_response
    from w2s.tasks.graders import PaperGrader
    from w2s.tokenizer import load_tokenizer

    ckpt = tmp_path / "ckpt"
    world.train_world_tokenizer(["Question: 3 apples and 4 pears? Answer: 7"] * 20, ckpt, vocab_size=300)
    cfg = ModelConfig(family="llama", vocab_size=300, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8,
                      hidden_dim=32, max_seq_len=64, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    save_model(Transformer(cfg).init_weights(generator=torch.Generator().manual_seed(0)), ckpt,
               tokenizer=load_tokenizer(ckpt))
    test = tmp_path / "test.jsonl"
    golds = ["7", "12", "1,000"]
    test.write_text("".join(json.dumps({"question": f"q{i}?", "answer": f"work\n#### {g}"}) + "\n"
                            for i, g in enumerate(golds)))
    ids = [f"gsm8k-test-{i:05d}" for i in range(3)]
    texts = [["3+4=7\n#### 7", "#### 8"], ["no answer here", "#### 12"], ["#### 1000", "#### 1000"]]
    spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "scripts" / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    for n, name in ((1, "greedy.jsonl"), (2, "samples.jsonl")):
        # a finished run's output, with the prompts evaluate.py builds
        (tmp_path / name).write_text("".join(json.dumps({"id": i, "prompt": f"Question: q{k}?\nAnswer:",
                                                          "completions": [
            {"text": t, "token_ids": [], "num_tokens": 1, "finish_reason": "eos"} for t in ts[:n]]}) + "\n"
            for k, (i, ts) in enumerate(zip(ids, texts))))
        args = [str(ckpt), str(test), "--device", "cpu", "--no-progress", "--out", str(tmp_path / name)]
        args += ["--samples", "2"] if n == 2 else []
        write_run_meta(tmp_path / name, evaluate.generation_meta(evaluate.parse_args(args), "float32"))  # its record
        read = []
        monkeypatch.setattr(PaperGrader, "answer", lambda self, text, stored=False, real=PaperGrader.answer:
                            read.append((text, stored)) or real(self, text, stored))
        result = evaluate.main(args)
        monkeypatch.undo()
        assert sorted(read) == sorted((stored_response(t, "gsm8k"), True) for ts in texts for t in ts[:n])  # as kept
        lines = [json.loads(x) for x in (tmp_path / f"{name}.per_question.jsonl").read_text().splitlines()]
        assert [(x["id"], x["index"], x["gold"]) for x in lines] == list(zip(ids, range(3), golds))
        assert [x["gold_normalized"] for x in lines] == ["7", "12", "1000"] and lines[0]["grader"] == "paper"
        if n == 1:
            assert [(x["prediction"], x["correct"]) for x in lines] == [("7", True), ("", False), ("1000", True)]
            assert result["accuracy"] == pytest.approx(2 / 3)
        else:
            assert [x["predictions"] for x in lines] == [["7", "8"], ["", "12"], ["1000", "1000"]]
            assert [x["correct"] for x in lines] == [[True, False], [False, True], [True, True]]
            assert [x["n_correct"] for x in lines] == [1, 1, 2] and result["pass@1"] == pytest.approx(4 / 6)
