"""OlympicArena: loading and filtering rows in the dataset's layout, the authors' prompt, `w2s data olympicarena`, and
the judge (w2s/tasks/olympicarena.py, olympic_judge.py, olympic_latex.py). No network: fetches are served locally.

Run: python -m pytest -q tests/test_olympicarena.py
"""

import io
import json
import logging
import time
import urllib.parse
import urllib.request

import pytest
import sympy
from click.testing import CliRunner

from w2s.cli import main
from w2s.tasks import TASKS, fetch_data, load_records
from w2s.tasks import data as data_module
from w2s.tasks import olympic_judge as judge
from w2s.tasks.olympic_latex import LatexError, parse_latex
from w2s.tasks.olympicarena import STOP_STRINGS, few_shot_prompt, make_prompt

PROMPT = (
    "You are participating in an international Physics competition and need to solve the following question.\n"
    "The answer to this question is a numerical value.\n\nproblem:\nA ball falls from $h=5 \\mathrm{~m}$. "
    "How long does it fall?\n\nAll mathematical formulas and symbols you output should be represented with LaTeX!\n"
    "You can solve it step by step.\nPlease end your response with: \"The final answer is $\\boxed{ANSWER}$\", "
    "where ANSWER is the numerical value without any units."
)


def _row(i, subject="Physics", language="EN", answer_type="NV", answer=("1.01",), **extra):
    """A row with every field of the published layout (GAIR/OlympicArena's dataset card)."""
    row = {
        "id": f"{subject}_{i}", "problem": f"Problem {i} of {subject}.", "prompt": PROMPT.replace("Physics", subject),
        "figure_urls": None, "answer": list(answer) if answer is not None else None, "solution": None,
        "answer_type": answer_type, "unit": ["s"], "answer_sequence": None, "type_sequence": None,
        "test_cases": None, "subject": subject, "language": language, "modality": "text-only",
    }  # fmt: skip
    row.update(extra)
    return row


ROWS = [
    _row(1),
    _row(2, subject="Math", modality="multi-modal", figure_urls=["https://x/1.png"]),  # kept: no modality filter
    _row(3, language="ZH"),  # Chinese: dropped
    _row(4, answer_type="OT"),  # open text: dropped
    _row(5, subject="CS", answer_type="CODE"),  # Computer Science (code): dropped
    _row(6, subject="CS", answer_type="NV"),  # not one of the six subjects: dropped
    _row(7, subject="Chemistry", answer_type="MPV", answer=("2", "x+1"), type_sequence=["NV", "EX"], unit=[None, "m"]),
    _row(8, subject="Biology", answer_type="MC", answer=("A", "C")),
]


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------------------------
# Records, filter, prompt
# ---------------------------------------------------------------------------------------------------------------


def test_load_filters_as_the_authors_and_builds_their_prompt(tmp_path):
    records = load_records("olympicarena", _write(tmp_path / "val.jsonl", ROWS))
    assert [r["id"] for r in records] == ["Physics_1", "Math_2", "Chemistry_7", "Biology_8"]
    first = records[0]
    assert first == {
        "id": "Physics_1", "question": "Problem 1 of Physics.", "prompt": make_prompt(PROMPT), "answer": ["1.01"],
        "answer_type": "NV", "type_sequence": [], "unit": ["s"], "subject": "Physics", "language": "EN",
        "modality": "text-only",
    }  # fmt: skip
    # src/inference_olympic.py: "\n\nproblem:\n" -> "\n\nQuestion: ", then "\n\nAnswer:".
    assert first["prompt"].startswith("You are participating in an international Physics competition")
    assert "\n\nQuestion: A ball falls from" in first["prompt"] and "problem:" not in first["prompt"]
    assert first["prompt"].endswith("where ANSWER is the numerical value without any units.\n\nAnswer:")
    assert records[1]["modality"] == "multi-modal"
    assert records[2]["type_sequence"] == ["NV", "EX"] and records[2]["unit"] == [None, "m"]
    assert STOP_STRINGS == ["Question", "Answer"] and "olympicarena" in TASKS


def test_test_split_has_no_answers(tmp_path):
    rows = [_row(1, answer=None), _row(2, answer=()), _row(3, subject="Math", answer=None)]
    records = load_records("olympicarena", _write(tmp_path / "test.jsonl", rows))
    assert [r["answer"] for r in records] == [None, None, None]
    # The same rows are an error in the val split (the test set must have its gold answers).
    with pytest.raises(ValueError, match=r"val\.jsonl:1: expected key 'answer' with a non-empty list"):
        load_records("olympicarena", _write(tmp_path / "val.jsonl", rows))


def test_few_shot_prompt_layout():
    demos = [{"prompt": "P1\n\nAnswer:", "response": " R1\n"}, {"prompt": "P2\n\nAnswer:", "response": "R2"}]
    expected = "P1\n\nAnswer: R1\n\n\nP2\n\nAnswer: R2\n\n\nP3\n\nAnswer:"
    assert few_shot_prompt(demos, {"prompt": "P3\n\nAnswer:"}) == expected


@pytest.mark.parametrize(
    "change, message",
    [
        ({"prompt": None}, r"val\.jsonl:2: expected key 'prompt' with a non-empty string \(missing\)"),
        ({"language": ""}, r"val\.jsonl:2: expected key 'language'"),
        ({"answer_type": "XYZ"}, r"val\.jsonl:2: key 'answer_type' has unknown answer type 'XYZ'"),
        ({"type_sequence": ["NV", "??"]}, r"val\.jsonl:2: key 'type_sequence' has an unknown answer type"),
        ({"answer": "not a list", "unit": 5}, r"val\.jsonl:2: key 'unit' should be a list of strings"),
    ],
)
def test_bad_rows_are_one_line_errors_naming_file_line_and_key(tmp_path, change, message):
    row = _row(2)
    for key, value in change.items():
        if value is None:
            del row[key]
        else:
            row[key] = value
    path = _write(tmp_path / "val.jsonl", [_row(1), row])
    with pytest.raises(ValueError, match=message) as err:
        load_records("olympicarena", path)
    assert len(str(err.value).splitlines()) == 1


# ---------------------------------------------------------------------------------------------------------------
# `w2s data olympicarena`
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to use the network")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_w2s_data_olympicarena_offline_says_which_files_to_put_where(tmp_path, no_network):
    out = CliRunner().invoke(main, ["data", "olympicarena", "--offline", "--dest", str(tmp_path)])
    assert out.exit_code == 1
    lines = out.output.splitlines()
    assert len(lines) == 2
    for split, line in zip(("test", "val"), lines):
        dest = tmp_path / "olympicarena" / f"{split}.jsonl"
        assert line.startswith(f"missing  {dest}")
        assert f"load_dataset('GAIR/OlympicArena', s, split='{split}')" in line
        assert f"copy {split}.jsonl to {dest}" in line
        assert data_module.OLYMPIC_ROWS_URL in line
    assert not any(tmp_path.iterdir())
    # The default is still GSM8K and MATH only.
    out = CliRunner().invoke(main, ["data", "--offline", "--dest", str(tmp_path)])
    assert "olympicarena/" not in out.output and "gsm8k/train.jsonl" in out.output


def test_fetch_builds_each_split_from_the_rows_pages(tmp_path, monkeypatch):
    """The rows endpoint's JSON pages, six subject configs concatenated; a page with cut cells is fetched again in
    smaller pages."""
    monkeypatch.setattr(data_module, "OLYMPIC_PAGE", 2)
    subjects = ("Math", "Physics", "Chemistry", "Biology", "Geography", "Astronomy")
    served = {(s, split): [_row(i, subject=s, answer=None if split == "test" else ("1",)) for i in range(3)]
              for s in subjects for split in ("test", "val")}  # fmt: skip
    served[("Math", "val")][2]["language"] = "ZH"  # stored as published, dropped only when loaded

    def serve(url, timeout):
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlparse(url).query))
        rows = served[(query["config"], query["split"])]
        offset, length = int(query["offset"]), int(query["length"])
        page = [{"row_idx": offset + k, "row": r, "truncated_cells": []} for k, r in enumerate(rows[offset:][:length])]
        if query["config"] == "Physics" and length > 1:
            page[0]["truncated_cells"] = ["prompt"]
        return io.BytesIO(json.dumps({"rows": page, "num_rows_total": len(rows), "partial": False}).encode())

    monkeypatch.setattr(data_module.urllib.request, "urlopen", serve)
    lines = []
    assert fetch_data(tmp_path, tasks=("olympicarena",), log=lines.append) == []
    val = [json.loads(line) for line in (tmp_path / "olympicarena" / "val.jsonl").read_text().splitlines()]
    assert [r["id"] for r in val] == [f"{s}_{i}" for s in subjects for i in range(3)]
    assert val == [r for s in subjects for r in served[(s, "val")]]  # the dataset's rows, unchanged
    assert len(load_records("olympicarena", tmp_path / "olympicarena" / "val.jsonl")) == 17
    assert load_records("olympicarena", tmp_path / "olympicarena" / "test.jsonl")[0]["answer"] is None
    assert not list(tmp_path.rglob("*.part"))


# ---------------------------------------------------------------------------------------------------------------
# The judge
# ---------------------------------------------------------------------------------------------------------------


def test_answer_reads_the_first_box_and_normalizes():
    text = "so $\\boxed{\\frac12}$ and later \\boxed{7}. The final answer is $\\boxed{3}$"
    assert judge.answer(text) == "\\frac{1}{2}"
    assert judge.answer("The final answer is $\\boxed{\\text{True}}$.") == "True"
    assert judge.answer("The final answer is $\\boxed{5 \\mathrm{~m}}$") == "5 m"  # units are kept (and then fail)
    assert judge.answer("The final answer is $\\boxed{90^\\circ}$") == "90"
    assert judge.answer("The final answer is $\\boxed{x \\approx 2}$") == "x = 2"
    assert judge.answer("The final answers are $\\boxed{2, \\left(1, 3\\right]}$") == "2, (1, 3]"
    # OlympicArena judges the whole text when there is no usable box; w2s says "no answer".
    for text in ("The answer is 5", "\\boxed{}", "\\boxed{5", ""):
        assert judge.answer(text) == ""
    assert judge.gold(["A", "C"]) == "A, C" and judge.gold(["$\\frac{1}{2}$"]) == "\\frac{1}{2}"
    assert judge.gold(None) == "" and judge.gold([]) == ""


# (pred, gold, expected): judge.verdict, i.e. OlympicArena's auto_judge for a question without a type_sequence.
# A gold tuple is the dataset's list of several gold answers.
SINGLE = [
    # single choice: equal, or "B: text" whose letter is the gold
    ("B", "B", True), ("B: 5 m/s", "B", True), ("[B]", "B", True), ("C", "B", False), ("b", "B", False),
    # multiple choice: comma-separated letters, any order; "AC" is one item, so not two answers
    ("C, A", ("A", "C"), True), ("[A, C]", ("A", "C"), True), ("A: x, C: y", ("A", "C"), True),
    ("AC", ("A", "C"), False), ("A", ("A", "C"), False), ("A, B", ("A", "C"), False),
    # true / false
    ("True", "True", True), ("False", "True", False), ("true", "True", False),
    # numerical value: ABSOLUTE tolerance 1e-5 * 1.01, not relative (judge.py judge_single_numerical_value)
    ("1.00001", "1", True), ("1.00002", "1", False), ("100000.00001", "100000", True), ("1e-7", "1.2e-7", True),
    ("0.5", "\\frac{1}{2}", True), ("\\sqrt{2}", "1.414214", True), ("\\sqrt{2}", "1.4142", False),
    ("2^{5}", "32", True), ("\\log_2 8", "3", True), ("1,000", "1000", True),
    # scientific notation: equal exponents and mantissas within 0.1 * 1.01; a plain number is rewritten d.dd x 10^k
    ("2.998\\times 10^{8}", "3.0\\times 10^{8}", True), ("3.1\\times 10^{8}", "3\\times 10^{8}", True),
    ("3.2\\times 10^{8}", "3.0\\times 10^{8}", False), ("299800000", "3.0\\times 10^{8}", True),
    ("3.0\\times 10^{8}", "3.0\\times 10^{9}", False), ("6.63\\cdot 10^{-34}", "6.626\\times 10^{-34}", True),
    ("5 m", "5", False), ("5 \\mathrm{~m/s}", "5", False),  # a unit left in the answer is not a number
    # set: as many elements, each gold element equal to a distinct one as a number; the gold must be a list
    ("3, 1, 2", ("1", "2", "3"), True), ("1, 2", ("1", "2", "3"), False), ("1, 1, 2", ("1", "2", "2"), False),
    # interval: same kinds of ends, bounds equal as expressions; unions in any order
    ("(1, 3]", "(1,3]", True), ("[1, 3)", "(1,3]", False), ("(-\\infty, 2]", "(-\\infty,2]", True),
    ("[2,3]\\cup(-\\infty,0)", "(-\\infty,0)\\cup[2,3]", True), ("(1, \\frac{6}{2}]", "(1,3]", True),
    # expression: after "=", equal trees; numbers within 1e-5. Symbolic ones are never simplified into agreement
    # (OlympicArena's simplify branch returns a sympy boolean, which fails its `type(flag) == bool` check) ...
    ("v = \\sqrt{2gh}", "\\sqrt{2gh}", True), ("2 m g", "2mg", True), ("(x+1)^2", "x^2+2x+1", False),
    # ... but the numerical judge, tried before it, subtracts the two, and sympy cancels reordered terms itself.
    ("1+x", "x+1", True), ("\\frac{mg}{2}", "\\frac{gm}{2}", True),
    # equation: lhs - rhs equal after simplify, or a nonzero integer multiple of each other
    ("y=2x+1", "2x-y+1=0", True), ("x+y=1", "2x+2y=2", True), ("x^2+y^2=1", "x^2+y^2=2", False),
    # tuple: elementwise numbers, in order. (1, 2, 3) passes as the INTERVAL (1, 2): the interval judge reads only
    # the first two bounds of each part.
    ("(1, 2)", "(1,2)", True), ("(2, 1)", "(1,2)", False), ("(1, 2, 3)", "(1,2)", True), ("(1, 3)", "(1,2)", False),
    # sympy 1.12's LaTeX grammar (the version OlympicArena pins), verdicts as its auto_judge gives them there:
    # what cannot continue an answer is ignored, so a box listing several values passes on its first ...
    ("A, B, C, D", "A", True), ("True, False", "True", True), ("5, 6, 7", "5", True), ("x+1, x+2", "x+1", True),
    ("2", "2, 3", True), ("True.", "True", True), ("1.6\\times10^-19", "16", True),
    # ... \\pi is a symbol, so it never equals a decimal; \\log is natural, \\lg base 10
    ("\\frac{\\pi}{2}", "1.5707963", False), ("\\pi", "3.14159", False), ("\\frac{\\pi}{2}", "\\frac{\\pi}{2}", True),
    ("\\log 100", "2", False), ("\\log 2", "0.693147", True), ("\\lg 100", "2", True),
    # numbers: whole superscripts and subscripts, digits across spaces, commas before groups of three, no ".5"
    ("6.02\\times10^23", "6.02\\times 10^{23}", True), ("2^10", "1024", True), ("x_12", "x_{12}", True),
    ("10\\,000", "10000", True), ("1 000", "1000", True), ("2,300", "2300", True), ("\\frac{1}{2}", ".5", False),
    ("3 x 10^8", "300000000", True),  # a lone x between numbers multiplies
    # any other command is a symbol; inverse trigonometric powers, floor and ceiling
    ("\\frac{\\hbar}{2}", "\\frac{1}{2}\\hbar", True), ("2\\ell", "\\ell\\cdot 2", True),
    ("\\sin^{-1}(0.5)", "0.5235988", True), ("\\lceil 2.5\\rceil", "3", True),
    # several gold answers without a type_sequence go to the judges as listed, not normalized ("$" kept)
    ("\\sqrt{2}, -\\sqrt{2}", ("$\\sqrt{2}$", "$-\\sqrt{2}$"), False),
    ("\\sqrt{2}, -\\sqrt{2}", ("\\sqrt{2}", "-\\sqrt{2}"), True),
]  # fmt: skip


@pytest.mark.parametrize("pred, gold, expected", SINGLE)
def test_judge_table(pred, gold, expected):
    assert judge.verdict(judge.normalize(pred), gold) is expected


def test_several_answers_in_order_or_any_order():
    """type_sequence given: MPV (parts in order, each with its own type's judge), then MA (any order)."""
    golds, types = ("2", "x+1"), ("NV", "EX")
    assert judge.verdict("2.000001, x+1", golds, types)
    assert judge.verdict("x+1, 2", golds, types)  # MA: any order
    assert not judge.verdict("2, x+2", golds, types)
    assert not judge.verdict("2", golds, types)
    assert not judge.verdict("2, x+1, 3", golds, types)
    assert not judge.verdict("2, x+1", "2, x+1", types)  # the gold of several answers is a list
    # OlympicArena looks up a type for every gold part (too few types: wrong), and reads a gold string (a record
    # with one gold answer but a type_sequence) character by character
    assert not judge.verdict("1, 3", ("1", "2"), ("NV",)) and not judge.verdict("1, 2", ("1", "2"), ("NV",))
    assert judge.verdict("5", "5", ("NV",)) and judge.verdict("1,2", "12", ("NV", "NV"))


def _tree(expr) -> str:
    """An expression as nested type names with its arguments in their order (srepr sorts them)."""
    if expr.is_Atom or not expr.args:
        return sympy.srepr(expr)
    return f"{type(expr).__name__}({','.join(_tree(a) for a in expr.args)})"


# LaTeX -> the tree sympy 1.12's parse_latex builds (read off sympy 1.12 with antlr4-python3-runtime 4.11).
TREES = [
    ("1,000", "Integer(1000)"), ("1 000", "Integer(1000)"), ("10\\,000", "Integer(10000)"),
    ("2 3.5", "Float('23.5', precision=53)"), ("1,0005", "Mul(Integer(1000),Integer(5))"), ("2,5", "Integer(2)"),
    ("\\pi", "Symbol('pi')"), ("\\frac{\\pi}{2}", "Mul(Symbol('pi'),Pow(Integer(2),Integer(-1)))"),
    ("\\log 100", "log(Integer(100),E)"), ("\\lg 100", "log(Integer(100),Integer(10))"),
    ("\\log_2 8", "log(Integer(8),Integer(2))"), ("\\ln 2", "log(Integer(2),E)"),
    ("x^23", "Pow(Symbol('x'),Integer(23))"), ("x_12", "Symbol('x_{12}')"),
    ("\\frac123", "Mul(Pow(Integer(2),Integer(-1)),Integer(3))"), ("x^-1", "Symbol('x')"),
    ("2 x 3", "Mul(Integer(2),Integer(3))"), ("x y z", "Mul(Symbol('x'),Mul(Symbol('y'),Symbol('z')))"),
    ("-2x", "Mul(Integer(-2),Symbol('x'))"), ("1-x", "Add(Integer(1),Mul(Integer(-1),Symbol('x')))"),
    ("1-2x", "Add(Integer(1),Mul(Integer(-1),Mul(Integer(2),Symbol('x'))))"), ("n!", "factorial(Symbol('n'))"),
    ("\\frac{1}{2}\\hbar", "Mul(Pow(Integer(2),Integer(-1)),Symbol('hbar'))"), ("\\mathit{abc}", "Symbol('abc')"),
    ("dx", "Symbol('dx')"), ("x(x+1)", "x(Add(Symbol('x'),Integer(1)))"), ("f_1(x)", "f_{1}(Symbol('x'))"),
    ("\\sin x \\cos x", "Mul(sin(Symbol('x')),cos(Symbol('x')))"),
    ("\\sin x/2", "sin(Mul(Symbol('x'),Pow(Integer(2),Integer(-1))))"), ("\\sin^{-1} x", "asin(Symbol('x'))"),
    ("\\sin^2 x", "Pow(sin(Symbol('x')),Integer(2))"), ("\\lceil 2.5\\rceil", "ceiling(Float('2.5', precision=53))"),
    ("\\sqrt[3]{8}", "Pow(Integer(8),Rational(1, 3))"), ("\\overline{x}", "conjugate(Symbol('x'))"),
    ("x^{2}_{1}", "Pow(Symbol('x'),Integer(2))"), ("x''_1", "Symbol(\"x_{1}''\")"), ("\\alpha'", "Symbol('alpha')"),
    ("True.", "Mul(Symbol('T'),Mul(Symbol('r'),Mul(Symbol('u'),Symbol('e'))))"),
    ("x &= 2", "Equality(Symbol('x'),Integer(2))"), ("x < 3", "StrictLessThan(Symbol('x'),Integer(3))"),
    ("\\frac{a}{b}c", "Mul(Mul(Symbol('a'),Pow(Symbol('b'),Integer(-1))),Symbol('c'))"), ("A, B % C", "Symbol('A')"),
    ("\\operatorname{lcm}(2,3)", "Mul(Symbol('operatorname'),Mul(Symbol('l'),Mul(Symbol('c'),Symbol('m'))))"),
]  # fmt: skip


@pytest.mark.parametrize("latex, tree", TREES)
def test_parse_latex_builds_the_trees_of_sympy_1_12(latex, tree):
    assert _tree(parse_latex(latex)) == tree


@pytest.mark.parametrize("latex", [".5", "2.", "x =", "2, 3 ~", "(1, 3]", "3\\ m", "\\sin", "x_", "\\frac{1}"])
def test_parse_latex_refuses_what_sympy_1_12_refuses(latex):
    with pytest.raises(LatexError):
        parse_latex(latex)


# Calculus, read as sympy 1.12 reads it (trees read off sympy 1.12 with antlr4-python3-runtime 4.11): the longest
# expression before a differential, an upper bound's number taking the digits after it (0 to 12 below), a product term
# after \\sum and \\lim, d/dx applied to the factors after it, evaluation bars substituted (|_{0}^{1} reads |_{0}).
CALCULUS = [
    ("\\int x dx", "Integral(Symbol('x'),Tuple(Symbol('x')))"),
    ("\\int_{0}^{1} x^2 \\, dx", "Integral(Pow(Symbol('x'),Integer(2)),Tuple(Symbol('x'),Integer(0),Integer(1)))"),
    ("\\int_0^1 2x\\,dx", "Integral(Symbol('x'),Tuple(Symbol('x'),Integer(0),Integer(12)))"),
    ("\\int\\limits_a^b \\frac{1}{x} dx",
     "Integral(Pow(Symbol('x'),Integer(-1)),Tuple(Symbol('x'),Symbol('a'),Symbol('b')))"),
    ("\\int^b_a x dx", "Integral(Symbol('x'),Tuple(Symbol('x'),Symbol('a'),Symbol('b')))"),
    ("\\int \\frac{dx}{x}", "Integral(Pow(Symbol('x'),Integer(-1)),Tuple(Symbol('x')))"),
    ("\\int x + 1", "Integral(Add(Symbol('x'),Integer(1)),Tuple(Symbol('x')))"),
    ("\\int \\delta", "Integral(Integer(1),Tuple(Symbol('elta')))"),
    ("\\int x dx dy", "Integral(Mul(Symbol('x'),Symbol('dx')),Tuple(Symbol('y')))"),
    ("\\int \\frac{1}{x} y", "Mul(Integral(Pow(Symbol('x'),Integer(-1)),Tuple(Symbol('x'))),Symbol('y'))"),
    ("\\int_0^1 x dx + 1", "Add(Integral(Symbol('x'),Tuple(Symbol('x'),Integer(0),Integer(1))),Integer(1))"),
    ("\\sum_{k=0}^{\\infty} \\frac{1}{2^k}",
     "Sum(Pow(Pow(Integer(2),Symbol('k')),Integer(-1)),Tuple(Symbol('k'),Integer(0),oo))"),
    ("\\sum_{n=1}^{10} n + 1", "Add(Sum(Symbol('n'),Tuple(Symbol('n'),Integer(1),Integer(10))),Integer(1))"),
    ("\\sum_{k=1}^10 2^k", "Sum(Pow(Integer(2),Symbol('k')),Tuple(Symbol('k'),Integer(1),Integer(10)))"),
    ("\\sum^n_{i=1} i", "Sum(Symbol('i'),Tuple(Symbol('i'),Integer(1),Symbol('n')))"),
    ("\\prod_{i=1}^{n} i", "Product(Symbol('i'),Tuple(Symbol('i'),Integer(1),Symbol('n')))"),
    ("\\lim_{x \\to 0} \\frac{\\sin x}{x}",
     "Limit(Mul(sin(Symbol('x')),Pow(Symbol('x'),Integer(-1))),Symbol('x'),Integer(0),Symbol('+-'))"),
    ("\\lim_{x \\to 0^+} \\frac{1}{x}", "Limit(Pow(Symbol('x'),Integer(-1)),Symbol('x'),Integer(0),Symbol('+'))"),
    ("\\lim_{x\\to\\infty} \\frac{1}{x}", "Limit(Pow(Symbol('x'),Integer(-1)),Symbol('x'),oo,Symbol('-'))"),
    ("\\lim_{\\theta \\rightarrow 1^{-}} \\theta", "Limit(Symbol('theta'),Symbol('theta'),Integer(1),Symbol('-'))"),
    ("\\frac{d}{dx} x^2", "Derivative(Pow(Symbol('x'),Integer(2)),Tuple(Symbol('x'),Integer(1)))"),
    ("2 \\frac{d}{dx} x y", "Mul(Integer(2),Derivative(Mul(Symbol('x'),Symbol('y')),Tuple(Symbol('x'),Integer(1))))"),
    ("\\frac{dy}{dx}", "Derivative(Symbol('y'),Tuple(Symbol('x'),Integer(1)))"),
    ("\\frac{d x^2}{dx}", "Derivative(Pow(Symbol('x'),Integer(2)),Tuple(Symbol('x'),Integer(1)))"),
    ("\\frac{\\partial f}{\\partial \\theta}", "Derivative(Symbol('f'),Tuple(Symbol('theta'),Integer(1)))"),
    ("\\frac{d0}{dx}", "Mul(Mul(Symbol('d'),Integer(0)),Pow(Symbol('dx'),Integer(-1)))"),
    ("x^2|_{x=3}", "Integer(9)"),
    ("x^2|^{x=2}_{x=1}", "Add(Integer(4),Integer(-1))"),
    ("x^2|_{x=1}^{x=2}", "Integer(1)"),
    ("x^2|_{0}^{1}", "Pow(Symbol('x'),Integer(2))"),
    ("|x|^{2}", "Pow(Abs(Symbol('x')),Integer(2))"),
    ("|x|_{x=1}|", "Abs(Integer(1))"),
    ("2^{\\infty}", "Pow(Integer(2),oo)"),
]  # fmt: skip


@pytest.mark.parametrize("latex, tree", CALCULUS)
def test_parse_latex_reads_calculus_as_sympy_1_12(latex, tree):
    assert _tree(parse_latex(latex)) == tree


@pytest.mark.parametrize("latex", [
    "\\int", "\\int_0 x dx", "\\sum_{i=1} i", "\\sum_{2=1}^{3} 2", "\\lim_{x \\to x} x", "\\lim_{x_1 \\to 0} x",
    "\\lim_{x \\to 0^*} x", "\\frac{d}{dx}", "\\frac{d}{dx} + x", "(\\frac{d}{dx}) x", "\\frac{d^2 y}{dx}", "|x|_{x=1}",
])  # fmt: skip
def test_parse_latex_refuses_the_calculus_sympy_1_12_refuses(latex):
    with pytest.raises(LatexError):  # sympy raises LaTeXParsingError, ValueError or NotImplementedError there
        parse_latex(latex)


def test_judge_evaluates_calculus_as_olympicarena():
    """sympy.N evaluates an integral, sum or product, not a limit or a derivative (verdicts as OlympicArena's judge
    gives them under sympy 1.12)."""
    assert judge.verdict("\\int_0^{1} 2x\\,dx", "1") and judge.verdict("\\sum_{k=0}^{\\infty} \\frac{1}{2^k}", "2")
    assert not judge.verdict("\\int_0^1 2x\\,dx", "1") and judge.verdict("\\int_0^1 2x\\,dx", "72")  # from 0 to 12
    assert judge.verdict("\\prod_{i=1}^{5} i", "120") and judge.verdict("x^2|^{x=2}_{x=1}", "3")
    assert not judge.verdict("\\lim_{x \\to 0} \\frac{\\sin x}{x}", "1")
    assert not judge.verdict("\\frac{d}{dx} x^2", "2x")
    assert not judge.verdict("x^2|_{0}^{1}", "1")  # only |_{0} is a bar, and 0 names no variable


def test_same_for_a_question(tmp_path):
    nv = {"answer_type": "NV", "type_sequence": [], "answer": ["1.01"]}
    response = "... so $t = 1.0100001$ s.\n\nThe final answer is $\\boxed{1.0100001}$"
    assert judge.same(judge.answer(response), judge.gold(nv["answer"]), nv)
    assert judge.grade(response, nv) and not judge.grade("The final answer is $\\boxed{1.1}$", nv)
    assert not judge.same("", "", nv) and not judge.same("1.01", "", nv) and not judge.same("", "1.01", nv)
    # Two responses to a question with hidden answers (train_2): the second plays the gold, split as the
    # question's type wants.
    hidden_set = {"answer_type": "SET", "type_sequence": [], "answer": None}
    assert judge.same("1, 2, 3", "3, 2, 1", hidden_set) and not judge.same("1, 2", "1, 2, 3", hidden_set)
    hidden_mc = {"answer_type": "MC", "type_sequence": [], "answer": None}
    assert judge.same("A, C", "C, A", hidden_mc)
    hidden_mpv = {"answer_type": "MPV", "type_sequence": ["NV", "EX"], "answer": None}
    assert judge.same("2, x+1", "2.0, x+1", hidden_mpv) and not judge.same("2, x", "2, x+1", hidden_mpv)
    mc = {"answer_type": "MC", "type_sequence": [], "answer": ["A", "C"]}
    assert judge.grade("The final answer is $\\boxed{C, A}$", mc)
    assert not judge.grade("The final answer is $\\boxed{AC}$", mc)
    # A listed gold keeps its parts, as OlympicArena judges the record's list: "1,000" is one part, not two.
    two = {"answer_type": "MPV", "type_sequence": ["NV", "NV"], "answer": ["1,000", "5"]}
    assert judge.grade("The final answer is $\\boxed{1000, 5}$", two)
    assert not judge.grade("The final answer is $\\boxed{1, 000, 5}$", two)
    # A gold answer is normalized once and a prediction twice, as OlympicArena does: a doubled \text{} keeps one.
    nested = {"answer_type": "SV", "type_sequence": [], "answer": ["\\text{\\text{a}}"]}
    assert judge.gold(nested["answer"]) == "\\text{a}" and judge.answer("$\\boxed{\\text{\\text{a}}}$") == "a"
    assert not judge.grade("The final answer is $\\boxed{a}$", nested)


def test_judge_is_bounded_in_time_and_size(monkeypatch, caplog):
    with pytest.raises(LatexError, match="exponent too large"):
        parse_latex("10^{100000}")
    with pytest.raises(LatexError, match="longer than"):
        parse_latex("1+" * 600 + "1")
    with pytest.raises(LatexError, match="exponent too large"):  # an evaluation bar would compute 999^998001
        parse_latex("x^{999}|_{x=999^{999}}")
    assert not judge.verdict("10^{10^{10}}", "1") and not judge.verdict("9^{100000}", "1")

    def slow(pred, gold):
        time.sleep(5)
        return True

    monkeypatch.setattr(judge, "TIME_LIMIT_S", 0.2)
    monkeypatch.setitem(judge.JUDGES, "SC", slow)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="w2s.tasks.olympic_judge"):
        assert not judge.verdict("slow-answer", "other")
    assert time.monotonic() - start < 3
    assert "over 0 s, counted as not equal" in caplog.text


# More verdicts of OlympicArena's auto_judge, as its code/judge.py gives them under sympy 1.12 (antlr4 4.11).
MORE_SINGLE = [
    ("A, C,", ("A", "C"), True),  # a trailing comma adds no empty part
    ("310400000", "3.0\\times 10^{8}", True),  # rewritten with two decimals, 3.10, the mantissa is within 0.101
    ("(1,2)\\cup(1,2)", "(1,2)\\cup(3,4)", False),  # each gold interval matches one predicted interval only
    ("v = \\sqrt{2gh} = 5", "\\sqrt{2gh}", True),  # an expression is read between the first and the second "="
    ("3y=3x", "2y=2x", False),  # equations agree up to an integer multiple, not a rational one (3/2)
]  # fmt: skip


@pytest.mark.parametrize("pred, gold, expected", MORE_SINGLE)
def test_judge_table_more(pred, gold, expected):
    assert judge.verdict(judge.normalize(pred), gold) is expected


def test_each_judge_alone_as_olympicarena_writes_it():
    """Verdicts the nine-judge sweep can hide (another judge accepts), checked judge by judge against judge.py."""
    assert judge.split_by_comma("[1, 2], 3") == ["[1, 2]", "3"]  # brackets protect a comma, as parentheses do
    assert not judge.judge_single_choice("BC", "B")  # a letter counts alone or before ":"
    assert judge.judge_multi_choice("C, A", ["A", "C"])  # letters in any order
    assert not judge.judge_expression("x-x", "0")  # one side symbolic, the other not: never equal
    assert judge.normalize("x \\simeq 2") == "x = 2"  # \simeq is replaced before \sim
    assert judge.first_boxed("\\boxed{}") is None and judge.first_boxed("\\boxed{5") is None
    # several answers: each predicted part is used once; a TF part needs a True/False gold (judge.py asserts it)
    assert not judge.verdict("2, 3", ("2", "2"), ("NV", "NV"))
    assert not judge.verdict("5", ("5",), ("TF",))


def test_a_one_entry_gold_list_is_judged_as_its_string():
    """docs/PAPER.md: the gold is answer[0] when the list has one entry, so the interval judge can read it."""
    record = {"answer_type": "IN", "type_sequence": [], "answer": ["(1,3]"]}
    assert judge.grade("The final answer is $\\boxed{(1, 3]}$", record)


# Trees of sympy 1.12's parse_latex (antlr4-python3-runtime 4.11) for grammar rules TREES does not reach.
MORE_TREES = [
    ("5-3", "Add(Integer(5),Integer(-3))"),  # a subtracted atom is negated itself, not wrapped in Mul(-1, .)
    ("1:2", "Mul(Integer(1),Pow(Integer(2),Integer(-1)))"),  # ":" divides
    ("x^{2}_{1}+1", "Add(Pow(Symbol('x'),Integer(2)),Integer(1))"),  # the dropped subscript does not end the sum
    ("1,23", "Integer(1)"),  # a comma joins digits only before a group of three
    ("x 3", "Mul(Symbol('x'),Integer(3))"),  # a leading x is a factor, not a multiplication sign
    ("\\artanh x", "atanh(Symbol('x'))"),
]  # fmt: skip


@pytest.mark.parametrize("latex, tree", MORE_TREES)
def test_parse_latex_builds_more_trees_of_sympy_1_12(latex, tree):
    assert _tree(parse_latex(latex)) == tree


def test_parse_latex_refuses_an_absolute_value_with_a_subscript():
    with pytest.raises(LatexError):  # sympy 1.12: LaTeXParsingError
        parse_latex("|x|_2")


def test_parse_latex_keeps_a_negative_factorial():
    # sympy 1.12 builds factorial(-1) unevaluated; only factorials over MAX_FACTORIAL are refused
    assert _tree(parse_latex("(-1)!")) == "factorial(Integer(-1))"
    assert judge.verdict("x=(-1)!", "(-1)!")  # equal trees after "=", as OlympicArena's judge finds them


def test_fetch_continues_after_the_rows_a_short_page_served(tmp_path, monkeypatch):
    """A page may hold fewer rows than asked for: the next page starts after the rows received, so none is skipped."""
    served = [_row(i, subject="Math") for i in range(5)]

    def serve(url, timeout):
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlparse(url).query))
        offset, ours = int(query["offset"]), (query["config"], query["split"]) == ("Math", "val")
        rows = served[offset:][:1] if ours else []  # one row per page, whatever the length asked
        total = len(served) if ours else 0
        page = [{"row_idx": offset, "row": r, "truncated_cells": []} for r in rows]
        return io.BytesIO(json.dumps({"rows": page, "num_rows_total": total, "partial": False}).encode())

    monkeypatch.setattr(data_module.urllib.request, "urlopen", serve)
    fetch_data(tmp_path, tasks=("olympicarena",), log=lambda line: None)
    val = [json.loads(line) for line in (tmp_path / "olympicarena" / "val.jsonl").read_text().splitlines()]
    assert [r["id"] for r in val] == [f"Math_{i}" for i in range(5)]


def test_filter_compares_the_whole_answer_type_as_the_authors_do(tmp_path):
    # src/inference_olympic.py drops a row when answer_type == "CODE" or == "OT", the whole string: a multi-part type
    # that merely contains OT is kept; each part of a comma-separated type must still be a known one.
    rows = [_row(1, answer_type="NV,OT", answer=("1", "x")), _row(2, answer_type="NV,EX", answer=("1", "x")),
            _row(3, answer_type="OT")]
    records = load_records("olympicarena", _write(tmp_path / "val.jsonl", rows))
    assert [(r["id"], r["answer_type"]) for r in records] == [("Physics_1", "NV,OT"), ("Physics_2", "NV,EX")]


def test_answers_are_required_in_val_only(tmp_path):
    # Only the val split (the test set) must carry answers; a questions file under any other name may hide them.
    rows = [_row(1, answer=None)]
    assert load_records("olympicarena", _write(tmp_path / "train_2.jsonl", rows))[0]["answer"] is None
    with pytest.raises(ValueError, match=r"val\.jsonl:1: key 'answer' has an empty entry"):
        load_records("olympicarena", _write(tmp_path / "val.jsonl", [_row(1, answer=("1", " "))]))


def test_load_questions_never_reads_the_gold_fields(tmp_path):
    from w2s.tasks.olympicarena import load_questions

    # A malformed answer would be an error if it were read: dropped first, it is not; the records have no answer key.
    rows = [{**_row(1), "answer": 5, "solution": "the worked solution"}, _row(2, subject="Math", answer=("2",))]
    records = load_questions(_write(tmp_path / "test.jsonl", rows))
    assert [r["id"] for r in records] == ["Physics_1", "Math_2"]
    assert all("answer" not in r and "solution" not in r for r in records)


def test_select_demos_is_the_authors_draw_over_boxed_untruncated_responses():
    import random

    from w2s.tasks.olympicarena import select_demos

    # docs/PAPER.md: shuffle every weak response with the seed, keep the first k that contain "\boxed{" and did not
    # stop at the token limit; each demonstration is shown with its own question's prompt.
    weak = [{"id": f"q{i}", "response": f"so $\\boxed{{{i}}}$" if i % 3 else f"it is {i}", "truncated": i % 4 == 1}
            for i in range(40)]
    prompts = {r["id"]: f"P{r['id']}\n\nAnswer:" for r in weak}
    order = list(weak)
    random.seed(7)
    random.shuffle(order)
    chosen = [r for r in order if "\\boxed{" in r["response"] and not r["truncated"]][:4]
    expected = [{"prompt": prompts[r["id"]], "response": r["response"]} for r in chosen]
    assert select_demos(weak, prompts, k=4, seed=7) == expected
    with pytest.raises(ValueError, match="need 30 weak responses containing"):
        select_demos(weak, prompts, k=30, seed=7)


def test_only_the_dataset_problem_header_is_renamed():
    # src/inference_olympic.py replaces the exact "\n\nproblem:\n"; the word "problem:" elsewhere stays.
    prompt = "Solve the problem:\nbelow.\n\nproblem:\nWhat is 2+2?"
    assert make_prompt(prompt) == "Solve the problem:\nbelow.\n\nQuestion: What is 2+2?\n\nAnswer:"


def test_a_lone_d_is_no_differential_in_an_integral():
    # sympy 1.12's handle_integral takes a symbol as the differential only when its name is longer than one
    # character and starts with "d"; otherwise it integrates over x.
    assert _tree(parse_latex("\\int d")) == "Integral(Symbol('d'),Tuple(Symbol('x')))"


def test_parse_latex_follows_more_rules_of_sympy_1_12():
    x, y = sympy.Symbol("x"), sympy.Symbol("y")
    # handle_integral: a differential alone integrates 1.
    assert parse_latex("\\int dx") == sympy.Integral(1, x)
    # do_subs: a bar at a lone expression puts it for that expression's own symbol (x becomes the tree of x+1).
    assert _tree(parse_latex("x|_{x+1}")) == _tree(parse_latex("x+1"))
    # LaTeX.g4's WS rule skips \quad like a space (digits then join); its EQUAL token includes "=&".
    assert parse_latex("1\\quad 2") == 12
    assert _tree(parse_latex("y =& 2")) == _tree(parse_latex("y = 2")) == _tree(sympy.Eq(y, 2))
    assert _tree(parse_latex("x \\neq 2")) == _tree(sympy.Ne(x, 2))  # NEQ is a relation
    # DIFFERENTIAL allows spaces between d and its variable; \{ ... \} is a group like ( ... ).
    assert _tree(parse_latex("\\int x d x")) == _tree(parse_latex("\\int x dx"))
    theta = sympy.Symbol("theta")  # get_differential_var drops the command's backslash: d\theta is over theta
    assert _tree(parse_latex("\\int \\theta d\\theta")) == _tree(sympy.Integral(theta, theta))
    assert _tree(parse_latex("2\\{x+1\\}")) == _tree(parse_latex("2(x+1)"))


@pytest.mark.parametrize("latex", [
    "\\left| x \\right|",  # L_BAR / R_BAR: tokens of a ket or bra, never an absolute value
    "\\sum_{i}^{3} i",  # the lower bound of \sum must be an equation i=a
    "(x^{40})^{30}|_{x=2}",  # 2^1200: an exponent past MAX_EXPONENT, refused before it is computed
    "2000!",  # past MAX_FACTORIAL
    "2\u0663",  # DIGIT is [0-9]: an Arabic-Indic three is no digit
])  # fmt: skip
def test_parse_latex_refuses_more_of_what_cannot_be_read(latex):
    with pytest.raises(LatexError):
        parse_latex(latex)
