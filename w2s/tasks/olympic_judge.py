"""OlympicArena's answer checking, as its evaluation script runs it (GAIR-NLP/OlympicArena code/judge.py, called
from code/evaluation.py through `auto_judge`), written anew for w2s. docs/PAPER.md states the rules it follows.

The grader interface (the names the gsm8k / math graders use):

    answer(response)          -> the normalized content of the first \\boxed{...} of a response ("" if none)
    gold(record["answer"])    -> the record's gold answer as one string (several parts joined by ", ")
    same(a, b, record)        -> whether answer a matches b for this question; "" never matches anything.
                                 b plays OlympicArena's gold: split into parts when the question has several.

How OlympicArena decides (auto_judge): a question whose record lists a `type_sequence` (several answers) is right
when the parts match in order (MPV, one judge per part type) or in any order (MA). Every other question is right
when ANY of nine judges accepts: single choice, multiple choice, true/false, numerical value, set, interval,
expression, equation, tuple, tried in that order. The record's answer_type and unit are not consulted: the prompts
ask for answers without units. Each judge attempt has a time limit (TIME_LIMIT_S, as OlympicArena's 5 s alarm);
past it the attempt counts as "no", logged. Numbers agree within an ABSOLUTE 1e-5 (times 1.01, as written there),
or, when either side is written as mantissa x 10^k, when the exponents are equal and the mantissas (the other
side rewritten with two decimals) are within 0.1 (times 1.01).

Test: python -m pytest -q tests/test_olympicarena.py
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache

import sympy

from w2s.tasks.olympic_latex import parse_latex
from w2s.tasks.time_bound import TimeBoundReached, time_bound

log = logging.getLogger(__name__)

NAME = "olympicarena"
SINGLE_TYPES = ("SC", "MC", "TF", "NV", "SET", "IN", "EX", "EQ", "TUP")  # auto_judge's order
ABS_TOL = 1e-5 * 1.01
MANTISSA_TOL = 0.1 * 1.01
TIME_LIMIT_S = 5.0
LETTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")

# ----------------------------------------------------------------------------------------------------------------
# Extraction and normalization
# ----------------------------------------------------------------------------------------------------------------

# Replaced in this order (\simeq before \sim); "^{\circ}" is not in OlympicArena's list, only "^\circ".
_REPLACE = (
    ("\\left", ""), ("\\right", ""), ("\u2236", ":"), ("\uff0c", ","), ("$", ""), ("\\approx", "="),
    ("\\simeq", "="), ("\\sim", "="), ("^\\prime", "'"), ("^{\\prime}", "'"), ("^\\circ", ""), ("%", ""),
)  # fmt: skip


def normalize(text: str) -> str:
    """OlympicArena's normalize_answer: the replacements above, \\mathrm{}/\\mathbf{}/\\text{}/\\textbf{} unwrapped
    (up to the first "}"), \\fracab -> \\frac{a}{b}, \\sqrta -> \\sqrt{a}, outer whitespace and "$" stripped."""
    for old, new in _REPLACE:
        text = text.replace(old, new)
    text = re.sub(r"\\(?:mathrm|mathbf)\{~?([^}]*)\}", r"\1", text)
    text = re.sub(r"\\text\{(.*?)\}", r"\1", text)
    text = re.sub(r"\\textbf\{(.*?)\}", r"\1", text)
    text = re.sub(r"frac([^{])(.)", r"frac{\1}{\2}", text)
    text = re.sub(r"sqrt([^{])", r"sqrt{\1}", text)
    return text.strip().strip("$").strip()


def first_boxed(text: str) -> str | None:
    """The content of the FIRST \\boxed{...} (brace-matched), or None when there is none, it never closes, or it is
    empty. OlympicArena then judges the whole response text instead; w2s calls that "no answer" (see answer())."""
    start = text.find("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    while i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + len("\\boxed{") : i] or None
        i += 1
    return None


def answer(response: str) -> str:
    """The normalized final answer of a response; "" if it has no (closed, non-empty) \\boxed{...}.

    Normalized twice, as OlympicArena does (once on extraction, once before judging). A response without a box is
    judged on its whole text by OlympicArena; that only matters when the entire response is a bare answer."""
    content = first_boxed(response)
    return normalize(normalize(content)) if content is not None else ""


def gold(answers) -> str:
    """A record's gold answer (the dataset's list of strings, or one string) as one normalized string."""
    if answers is None:
        return ""
    if isinstance(answers, str):
        return normalize(answers)
    return ", ".join(normalize(a) for a in answers)


def split_by_comma(expr: str) -> list[str]:
    """Parts of expr at commas outside () and [] (braces do not protect a comma, as in OlympicArena)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(expr):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(expr[start:i].strip())
            start = i + 1
    if start < len(expr):
        parts.append(expr[start:].strip())
    return [p.strip("$").strip() for p in parts]


# ----------------------------------------------------------------------------------------------------------------
# One judge per answer type: judge(pred, gold) -> bool, gold a string or (SET, MC, MPV, MA) a list.
# A judge may raise; the caller counts any exception as "not equal", as auto_judge does.
# ----------------------------------------------------------------------------------------------------------------


def judge_single_choice(pred: str, gold) -> bool:
    if pred == gold:
        return True
    if pred.startswith("[") and pred.endswith("]"):
        pred = pred.strip("[]")
    return len(pred) > 1 and pred[0] in LETTERS and pred[1] == ":" and pred[0] == gold  # "B: text" counts as "B"


def judge_multi_choice(pred: str, gold) -> bool:
    if pred.startswith("[") and pred.endswith("]"):
        pred = pred.strip("[]")
    items = split_by_comma(pred)
    if len(items) != len(gold):  # "AC" is one item: OlympicArena wants the letters comma-separated
        return False
    if all(item in LETTERS for item in items):
        return set(items) == set(gold)
    firsts = [next((c for c in item if c in LETTERS), None) for item in items]  # "A: text" -> "A"
    return {c for c in firsts if c} == set(gold)


def judge_true_false(pred: str, gold) -> bool:
    return gold in ("True", "False") and pred == gold


def _is_scientific(expr) -> bool:
    """mantissa x 10^k as parsed: a product whose second factor is a power of 10 (OlympicArena's test)."""
    return isinstance(expr, sympy.Mul) and isinstance(expr.args[1], sympy.Pow) and expr.args[1].args[0] == 10


def _scientific_latex(value: float) -> str:
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa}\\times 10^{{{int(exponent)}}}"


def judge_numerical_value(pred, gold) -> bool:
    if pred == gold:
        return True
    try:
        if abs(float(pred) - float(gold)) <= ABS_TOL:
            return True
    except (TypeError, ValueError):
        pass
    try:
        return _numerical_latex(pred, gold)
    except Exception:  # unparsable, or a symbolic difference whose size has no truth value
        return False


def _numerical_latex(pred, gold) -> bool:
    p, g = parse_latex(pred), parse_latex(gold)
    if bool(abs(sympy.N(p) - sympy.N(g)) <= ABS_TOL):
        return True
    if _is_scientific(p) != _is_scientific(g):  # rewrite the plain number as d.dd x 10^k
        if _is_scientific(p):
            g = parse_latex(_scientific_latex(float(gold)))
        else:
            p = parse_latex(_scientific_latex(float(pred)))
    if _is_scientific(p) and _is_scientific(g):
        same_exponent = sympy.N(p.args[1].args[1]) == sympy.N(g.args[1].args[1])
        return bool(same_exponent and abs(sympy.N(p.args[0]) - sympy.N(g.args[0])) <= MANTISSA_TOL)
    return bool(sympy.N(p) == sympy.N(g))


def judge_set(pred: str, gold) -> bool:
    if not isinstance(gold, list):  # OlympicArena asserts a list of elements
        return False
    items = split_by_comma(pred)
    if len(items) != len(gold):
        return False
    for g in gold:  # each gold element takes the first unused predicted element equal to it as a number
        match = next((p for p in items if judge_numerical_value(p, g)), None)
        if match is None:
            return False
        items.remove(match)
    return True


def _intervals(text: str) -> list[tuple[list[str], str]]:
    parsed = []
    for part in text.split("\\cup"):
        bounds = part.strip()
        kind = ("open" if bounds.startswith("(") else "closed") + ("_open" if bounds.endswith(")") else "_closed")
        parsed.append((bounds.strip("()[]").split(","), kind))
    return parsed


def judge_interval(pred: str, gold) -> bool:
    mine, theirs = _intervals(pred), _intervals(gold)
    if len(mine) != len(theirs):
        return False
    for bounds, kind in mine:  # each interval must match an unused one of the same kind, bound by bound
        for j, (other, other_kind) in enumerate(theirs):
            if kind == other_kind and judge_expression(bounds[0], other[0]) and judge_expression(bounds[1], other[1]):
                del theirs[j]
                break
        else:
            return False
    return True


def _right_of_equals(text: str) -> str:
    """ "v = 5" -> "5"; with several "=", the text between the first and the second one (as OlympicArena splits)."""
    return text.split("=")[1].strip() if "=" in text else text.strip()


def judge_expression(pred, gold) -> bool:
    """Equal trees, or (no symbols on either side) numbers within ABS_TOL. Raises when a side does not parse.

    OlympicArena also simplifies the difference of two symbolic expressions, but it then requires the comparison
    `abs(value) < 1e-5` to be a Python bool, and sympy answers with its own BooleanTrue: that branch never says
    "equal". So symbolic expressions are equal only as identical (unevaluated) trees: x+1 is not 1+x."""
    e1, e2 = parse_latex(_right_of_equals(pred)), parse_latex(_right_of_equals(gold))
    if e1 == e2:
        return True
    has1, has2 = e1.has(sympy.Symbol), e2.has(sympy.Symbol)
    if has1 or has2:
        return False
    try:
        return abs(float(e1) - float(e2)) <= ABS_TOL
    except (TypeError, ValueError):
        return False


def _equation_side(equation: str):
    lhs, rhs = equation.split("=")  # exactly one "=", else ValueError: not an equation
    return sympy.simplify(parse_latex(lhs) - parse_latex(rhs))


def judge_equation(pred: str, gold) -> bool:
    """lhs - rhs of both sides equal after simplify, or one a nonzero integer multiple of the other (y=x, x=y)."""
    try:
        d1, d2 = _equation_side(pred), _equation_side(gold)
        if sympy.simplify(d1 - d2) == 0:
            return True
        ratios = (sympy.simplify(d1 / d2), sympy.simplify(d2 / d1))
        return any(r.is_Integer and r != 0 for r in ratios)
    except Exception:
        return False


def judge_tuple(pred: str, gold) -> bool:
    mine, theirs = split_by_comma(pred.strip("()")), split_by_comma(gold.strip("()"))
    return len(mine) == len(theirs) and all(judge_numerical_value(p, g) for p, g in zip(mine, theirs))


JUDGES = {
    "SC": judge_single_choice, "MC": judge_multi_choice, "TF": judge_true_false, "NV": judge_numerical_value,
    "SET": judge_set, "IN": judge_interval, "EX": judge_expression, "EQ": judge_equation, "TUP": judge_tuple,
}  # fmt: skip


def judge_in_order(pred: str, golds: list, types: list) -> bool:
    """MPV (several quantities): part i of the prediction against gold part i, with the judge of types[i]."""
    parts = [normalize(p) for p in split_by_comma(pred)]
    golds = [normalize(g) for g in golds]
    if len(parts) != len(golds) or len(types) < len(golds):  # too few types: OlympicArena's lookup fails
        return False
    return all(JUDGES[t](p, g) for p, g, t in zip(parts, golds, types))


def judge_any_order(pred: str, golds: list, types: list) -> bool:
    """MA (several answers): each gold part, in order, takes the first unused predicted part its judge accepts."""
    parts = [normalize(p) for p in split_by_comma(pred)]
    golds = [normalize(g) for g in golds]
    if len(parts) != len(golds) or len(types) < len(golds):
        return False
    used = [False] * len(parts)
    for g, t in zip(golds, types):
        j = next((j for j, p in enumerate(parts) if not used[j] and _quietly(JUDGES[t], p, g)), None)
        if j is None:
            return False
        used[j] = True
    return True


def _quietly(judge, pred, gold) -> bool:
    try:
        return judge(pred, gold)
    except Exception:
        return False


# ----------------------------------------------------------------------------------------------------------------
# The verdict, bounded in time
# ----------------------------------------------------------------------------------------------------------------


def _attempt(judge, *args) -> bool:
    """One judge under the time limit; an exception or the limit is "no" (the limit is logged)."""
    try:
        with time_bound(TIME_LIMIT_S):
            return bool(judge(*args))
    except TimeBoundReached:
        log.warning("olympicarena judge %s: over %.0f s, counted as not equal: %r vs %r",
                    judge.__name__, TIME_LIMIT_S, *args[:2])  # fmt: skip
        return False
    except Exception:
        return False


@lru_cache(maxsize=1 << 16)
def verdict(pred: str, gold_value, types: tuple = ()) -> bool:
    """auto_judge on an extracted, normalized prediction. gold_value: a string, or a tuple of parts (a list in
    OlympicArena). types: the record's type_sequence; non-empty means several answers (MPV, then MA), whose gold
    parts are, for a string, its characters (OlympicArena iterates over whatever gold it is given)."""
    if not pred or not gold_value:
        return False
    golds = list(gold_value) if isinstance(gold_value, tuple) else gold_value
    if types:
        golds = list(golds)
        return _attempt(judge_in_order, pred, golds, list(types)) or _attempt(judge_any_order, pred, golds, list(types))
    return any(_attempt(JUDGES[t], pred, golds) for t in SINGLE_TYPES)


def _as_gold(b: str, record: dict):
    """b in the form OlympicArena's gold takes for this question: a string, or its parts when the question's gold is
    a list (several gold answers; with hidden answers: a type_sequence, or a set / multiple-choice question)."""
    answers = record.get("answer")
    if answers:
        several = not isinstance(answers, str) and len(answers) > 1
    else:
        several = bool(record.get("type_sequence")) or record.get("answer_type") in ("SET", "MC", "MPV", "MA")
    if not several:
        return b  # normalized once already, as OlympicArena normalizes a gold answer (a prediction: twice)
    if answers and b == gold(answers):  # the record's own gold: its parts as listed (a part may hold a comma),
        return tuple(answers)  # not normalized (the judges of several parts normalize them; the others do not)
    return tuple(normalize(part) for part in split_by_comma(b))


def same(a: str, b: str, record: dict) -> bool:
    """Whether answer a (from answer()) matches b for this question, b in the role of the gold answer (a gold() or
    another response's answer()). The empty answer matches nothing."""
    if not a or not b:
        return False
    return verdict(a, _as_gold(b, record), tuple(record.get("type_sequence") or ()))


def grade(response: str, record: dict) -> bool:
    """Whether a full response is right for a record with a known gold answer (OlympicArena's evaluation)."""
    return same(answer(response), gold(record.get("answer")), record)
