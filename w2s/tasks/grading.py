"""The `equivalence` grader: w2s's lenient answer extraction, normalization and equivalence for GSM8K and MATH.

These rules are w2s's own, NOT the paper's: the authors' protocol (docs/PAPER.md, "Answer extraction and
comparison") is the `paper` grader in w2s/tasks/paper_protocol.py, and w2s/tasks/graders.py names both (and
Math-Verify). This grader is more lenient than the paper's, so its accuracies are on a different scale:

    extract_answer(response, task)  ->  text after the LAST marker anywhere (to the end of that line), else
                                        "The answer is (.*)", else the last number of the text ("" if none)
    normalize_answer(answer)        ->  a canonical string (Minerva-style but broader: unit words, $, \\text{},
                                        \\boxed{}, \\dfrac, 3.50 -> 3.5, Unicode symbols, choice letters ...)
    is_equiv(pred, gold, task)      ->  normalized strings equal, or (MATH) sympy shows the difference is 0
    answer_key(answer, task)        ->  a hashable canonical form for grouping votes (0.5 and \\frac{1}{2} agree)

sympy's own LaTeX parser needs antlr4, which we do not depend on, so `latex_to_sympy` below is a small
recursive-descent parser for the LaTeX that final answers actually use (numbers, \\frac, \\sqrt, ^, \\cdot, \\pi,
implicit products). Anything it does not understand falls back to exact string match, never to an error. It builds
exact values (0.5 is 1/2, 2\\frac{1}{2} is 5/2) for a lenient comparison; w2s/tasks/olympic_latex.py is the other
LaTeX parser on purpose: it rebuilds the unevaluated float trees of sympy's own parser, which OlympicArena's judge
compares by structure.

sympy is bounded: a power whose exact value would exceed MAX_DIGITS digits is not built (size), and a comparison
that runs past SYMPY_SECONDS is interrupted by an alarm (w2s/tasks/time_bound.py; main thread only, which is where
the pipeline grades, under torchrun too: each rank is its own process). A comparison given up counts as "not
equal", logs one warning line and is counted in BOUNDED, so grading a whole test set cannot hang.

Test: python -m pytest -q tests/test_grading.py   (grades every gold answer of the data directory against itself)
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache

import sympy

from w2s.tasks.time_bound import TimeBoundReached, time_bound

log = logging.getLogger(__name__)

TASKS = ("gsm8k", "math")

# ----------------------------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------------------------

ANSWER_MARKERS = {"gsm8k": "####", "math": "The answer is:"}
# A response that starts a new "Question" has finished its answer; everything after it is a hallucinated example.
CUT_AT = "Question"
_FALLBACK_ANSWER_IS = re.compile(r"The answer is (.*)")
# Comma-grouped thousands first so "1,000" stays one number; then plain integers/decimals. A "-" is a sign only
# where it cannot be a subtraction: "we get -2" -> -2, but "10-5" -> 5 (not -5).
_SIGN = r"(?:(?<![\w).])-)?"
_NUMBER = re.compile(_SIGN + r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|" + _SIGN + r"\.\d+")


def check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")


def extract_answer(text: str, task: str) -> str:
    """The final answer of a model response or gold target, "" if none can be found.

    The equivalence grader's rules (lenient, not the paper's), in order: cut at the first "Question"; text after the
    LAST "####" (gsm8k) or "The answer is:" (math), up to the end of that line (of the next non-empty line when the
    marker ends its line); else the last "The answer is (.*)"; else the last number in the text. A trailing "." (end of
    sentence) is stripped.
    """
    check_task(task)
    text = text.split(CUT_AT, 1)[0]
    marker = ANSWER_MARKERS[task]
    if marker in text:
        answer = text.rsplit(marker, 1)[1].strip().split("\n", 1)[0]
    elif matches := _FALLBACK_ANSWER_IS.findall(text):
        answer = matches[-1]
    elif numbers := _NUMBER.findall(text):
        answer = numbers[-1]
    else:
        answer = ""
    answer = answer.strip()
    while answer.endswith("."):
        answer = answer[:-1].rstrip()
    return answer


def _read_braced(s: str, open_at: int) -> int:
    """Index just past the "}" matching the "{" at s[open_at]; -1 if unbalanced."""
    depth = 0
    for i in range(open_at, len(s)):
        if s[i] == "{":
            depth += 1
        elif s[i] == "}":
            depth -= 1
            if depth == 0:
                return i + 1
    return -1


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}, or "\\boxed 5") in text; None if there is none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] == "{":
        end = _read_braced(text, i)
        return text[i + 1 :] if end < 0 else text[i + 1 : end - 1]  # unclosed (answer cut at a line end): the rest
    # "\boxed 5$": the argument runs to the next "$" or whitespace.
    return re.split(r"[\s$]", text[i:], maxsplit=1)[0] or None


# ----------------------------------------------------------------------------------------------------------------
# Normalization (Minerva-style)
# ----------------------------------------------------------------------------------------------------------------

# Units and filler words dropped from answers; matched as whole words (not inside other words or \commands),
# optionally squared/cubed ("cm^2"). Both sides of a comparison are normalized alike, so the list only has to be
# broad, not exact.
_UNIT_WORDS = (
    "dollars dollar cents cent units unit square sq inches inch feet foot ft yards yard miles mile mph km cm mm "
    "meters meter metres metre kilometers kilograms kg grams gram pounds pound lbs ounces ounce oz gallons gallon "
    "liters liter litres ml hours hour hrs minutes minute mins seconds second days day weeks week months month "
    "years year degrees degree students people persons ways points integers digits edges meals multiples "
    "times percent"
).split()
_UNIT_RE = re.compile(r"(?<![A-Za-z\\])(?:" + "|".join(_UNIT_WORDS) + r")(?:\^\{?[23]\}?)?(?![A-Za-z])")
_TEXT_COMMANDS = ("text", "textbf", "textit", "mathrm", "mathbf", "mbox", "operatorname")
_NOISE = (
    ("\\displaystyle", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"),
    ("^{\\circ}", ""), ("^\\circ", ""), ("\\circ", ""), ("\\degree", ""), ("°", ""),
    ("\\%", ""), ("%", ""), ("\\$", ""), ("$", ""), ("{,}", ","), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\:", ""),
    ("\\ ", " "), ("~", " "), ("\\dots", ""), ("\\ldots", ""), ("\\cdots", ""),
)  # fmt: skip
# Unicode symbols models and datasets write for TeX ones; a trailing space ends the command before a letter ("2πr").
_UNICODE = (
    ("\u03c0", "\\pi "), ("\u221e", "\\infty "), ("\u221a", "\\sqrt"), ("\u00d7", "\\times "),
    ("\u22c5", "\\cdot "), ("\u00b7", "\\cdot "), ("\u00f7", "\\div "), ("\u2264", "\\le "),
    ("\u2265", "\\ge "), ("\u03b8", "\\theta "), ("\u03b1", "\\alpha "), ("\u03b2", "\\beta "),
    ("\u2212", "-"),
)  # fmt: skip
# A one-letter metric unit written as text after the value ("5\text{ m}^3", "2\,\mathrm{g}"): letters that are
# variables when bare, so they are dropped only in this text form and never at the start of the answer.
_TEXT_UNIT = re.compile(r"(?<=.)\s*\\(?:text|textrm|mathrm|mbox)\s*\{\s*(?:m|g|s|l|L)\s*\}(?:\^\{?[23]\}?)?")
_ROW_BREAK = "\x01"  # holds the matrix row separator (two backslashes) while spaces and TeX spaces are cleaned
_GROUPED_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL = re.compile(r"-?\d*\.\d+")


def _unwrap_commands(s: str, names: tuple[str, ...]) -> str:
    r"""\text{abc} -> abc for each command in names, brace-matched (handles nesting like \text{\textbf{x}})."""
    pattern = re.compile(r"\\(?:" + "|".join(names) + r")(?![A-Za-z])\s*\{")
    while m := pattern.search(s):
        end = _read_braced(s, m.end() - 1)
        if end < 0:  # unbalanced (e.g. cut at a line end): drop "\\text{", keep the rest
            s = s[: m.start()] + s[m.end() :]
            continue
        s = s[: m.start()] + s[m.end() : end - 1] + s[end:]
    return s


def _brace_frac_sqrt(s: str) -> str:
    r"""Give \frac and \sqrt braced arguments: \frac12 -> \frac{1}{2}, \frac1{x} -> \frac{1}{x}, \sqrt3 -> \sqrt{3}."""
    out, i = [], 0
    while i < len(s):
        m = re.compile(r"\\(frac|sqrt)(?![A-Za-z])").match(s, i)
        if not m:
            out.append(s[i])
            i += 1
            continue
        out.append("\\" + m.group(1))
        i = m.end()
        if m.group(1) == "sqrt" and i < len(s) and s[i] == "[":  # \sqrt[3]{x}: keep the index as is
            close = s.find("]", i)
            if close < 0:
                break
            out.append(s[i : close + 1])
            i = close + 1
        for _ in range(2 if m.group(1) == "frac" else 1):
            while i < len(s) and s[i] == " ":
                i += 1
            if i >= len(s):
                break
            if s[i] == "{":
                end = _read_braced(s, i)
                if end < 0:
                    out.append(s[i:])
                    i = len(s)
                    break
                out.append("{" + _brace_frac_sqrt(s[i + 1 : end - 1]) + "}")
                i = end
            elif s[i] == "\\":  # a command argument: \frac\pi2 -> \frac{\pi}{2}
                cmd = re.compile(r"\\[A-Za-z]+|\\.").match(s, i)
                out.append("{" + cmd.group(0) + "}")
                i = cmd.end()
            else:
                out.append("{" + s[i] + "}")
                i += 1
    return "".join(out)


@lru_cache(maxsize=1 << 16)
def normalize_answer(answer: str) -> str:
    r"""Canonical form of a final answer, so that trivially different spellings compare equal.

    "x = \boxed{\dfrac{1}{2}}\text{ cm}." -> "\frac{1}{2}";  "\$1,000" -> "1000";  "50\%" -> "50";  "3.0" -> "3".
    """
    s = answer.strip().replace("\\\\", _ROW_BREAK)
    for symbol, tex in _UNICODE:
        s = s.replace(symbol, tex)
    if (boxed := last_boxed(s)) is not None:
        s = boxed
    s = _TEXT_UNIT.sub("", s)
    s = _unwrap_commands(s, _TEXT_COMMANDS)
    s = s.split("=")[-1]  # "x = 5" -> "5"; gold and prediction both keep only the right-hand side
    s = re.sub(r"\\(?:left|right)(?![A-Za-z])", "", s)  # \left( -> (, but \rightarrow stays
    for old, new in _NOISE:
        s = s.replace(old, new)
    s = re.sub(r"^\s*[A-Za-z]\s*\\in(?![A-Za-z])", "", s)  # "x \in [2, 5)" -> "[2, 5)"
    s = re.sub(r"(?<![A-Za-z\\])and(?![A-Za-z])", ",", s)  # "1 and 2" -> "1,2"
    s = _UNIT_RE.sub("", s)
    # Drop whitespace, except the one space that ends a command before a letter ("\sin x" must not become "\sinx").
    s = re.sub(r"(\\[A-Za-z]+)\s+(?=[A-Za-z])", "\\1\0", s)
    s = re.sub(r"\s+", "", s).replace("\0", " ")
    s = re.sub(r",+", ",", s).strip(",")
    s = _brace_frac_sqrt(s)
    s = s.rstrip(".")
    if re.fullmatch(r"\{[^{}]*\}", s):  # a lone braced group "{5}" -> "5"
        s = s[1:-1]
    if _GROUPED_NUMBER.fullmatch(s):  # 100,000 -> 100000 (only when the whole answer is one grouped number)
        s = s.replace(",", "")
    if _DECIMAL.fullmatch(s):  # 3.50 -> 3.5, 3.0 -> 3, .5 -> 0.5
        s = s.rstrip("0").rstrip(".")
        s = re.sub(r"^(-?)\.", r"\g<1>0.", s) or "0"
        if s in ("-", "-0"):
            s = "0"
    if m := re.fullmatch(r"\(([A-Za-z])\)", s):  # multiple choice "(C)" -> "C"
        s = m.group(1)
    if re.fullmatch(r"[a-g]", s):  # a choice letter, case-insensitive: "b" == "B"
        s = s.upper()
    return s.replace(_ROW_BREAK, "\\\\")


# ----------------------------------------------------------------------------------------------------------------
# LaTeX -> sympy (for MATH equivalence)
# ----------------------------------------------------------------------------------------------------------------


class LatexParseError(ValueError):
    pass


class TooLarge(LatexParseError):
    """An exact number past the size bound: never built, since one big power can take minutes and gigabytes."""


SYMPY_SECONDS = 1.0  # per comparison (parse, numeric probe, simplify); real answers take milliseconds
MAX_DIGITS = 2000  # an exact power may have at most this many digits (|exponent| x digits of its base)
BOUNDED = {"time": 0, "size": 0}  # comparisons given up since start, by bound (an eval stage records its share)


def _give_up(bound: str, a: str, b: str) -> bool:
    """Count a comparison past a bound and log it in one line; it counts as not equal."""
    BOUNDED[bound] += 1
    log.warning("equivalence: %s bound reached comparing %.60r with %.60r; counted as not equal", bound, a, b)
    return False


_TOKEN = re.compile(r"\s*(\d+\.\d*|\.\d+|\d+|\\[A-Za-z]+|[A-Za-z]|[-+*/^(){}\[\]!|])")
_GREEK = {
    "alpha", "beta", "gamma", "delta", "epsilon", "theta", "lambda", "mu", "phi", "psi", "omega", "rho", "sigma", "tau",
}  # fmt: skip
_FUNCTIONS = {
    "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "cot": sympy.cot, "sec": sympy.sec, "csc": sympy.csc,
    "ln": sympy.log, "log": sympy.log, "exp": sympy.exp,
}  # fmt: skip
_MULTIPLY = {"*", "\\cdot", "\\times"}
_DIVIDE = {"/", "\\div"}
_MAX_EXPONENT = 512  # refuse 10^{10^{10}}: exact integer powers that large would hang sympy


def _tokenize(s: str) -> list[str]:
    tokens, i = [], 0
    while i < len(s):
        m = _TOKEN.match(s, i)
        if not m:
            if s[i:].strip() == "":
                break
            raise LatexParseError(f"cannot tokenize {s[i:]!r}")
        tokens.append(m.group(1))
        i = m.end()
    return tokens


class _Parser:
    """expr := term (+|- term)*;  term := unary ((*|/|implicit) unary)*;  unary := -unary | power;
    power := atom (^ exponent)?;  atom := number | letter | \\pi | \\frac{}{} | \\sqrt[n]{} | (expr) | {expr} | f(x)."""

    def __init__(self, tokens: list[str]):
        self.tokens, self.i = tokens, 0

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (expected is not None and tok != expected):
            raise LatexParseError(f"expected {expected!r}, got {tok!r}")
        self.i += 1
        return tok

    def parse(self) -> sympy.Expr:
        value = self.expr()
        if self.peek() is not None:
            raise LatexParseError(f"unexpected {self.peek()!r}")
        return value

    def expr(self) -> sympy.Expr:
        value = self.term()
        while self.peek() in ("+", "-"):
            value = value + self.term() if self.take() == "+" else value - self.term()
        return value

    def starts_atom(self, tok: str | None) -> bool:
        if tok is None:
            return False
        if tok in ("(", "{") or tok[0].isdigit() or tok[0] == "." or tok.isalpha():
            return True
        return tok.startswith("\\") and tok not in _MULTIPLY | _DIVIDE

    def term(self) -> sympy.Expr:
        value = self.unary()
        if value.is_Integer and self.tokens[self.i - 1].isdigit() and self.peek() == "\\frac":
            # A mixed number, as MATH writes them: 2\frac{1}{2} is 2 + 1/2 (and -2\frac{1}{2} is -2.5), not 2 * 1/2.
            fraction = self.power()
            if fraction.is_Rational and 0 < fraction < 1:
                value = value + fraction if value >= 0 else value - fraction
            else:
                value = value * fraction
        while True:
            tok = self.peek()
            if tok in _MULTIPLY:
                self.take()
                value = value * self.unary()
            elif tok in _DIVIDE:
                self.take()
                value = value / self.unary()
            elif self.starts_atom(tok):  # implicit product: 2x, 3\sqrt{2}, (a)(b)
                value = value * self.power()
            else:
                return value

    def unary(self) -> sympy.Expr:
        if self.peek() == "-":
            self.take()
            return -self.unary()
        if self.peek() == "+":
            self.take()
            return self.unary()
        return self.power()

    def power(self) -> sympy.Expr:
        base = self.atom()
        if self.peek() == "!":
            self.take()
            if not (base.is_Integer and 0 <= base <= 100):
                raise LatexParseError("factorial of a non-small integer")
            base = sympy.factorial(base)
        if self.peek() != "^":
            return base
        self.take()
        tok = self.peek()
        if tok is not None and tok[0].isdigit() and len(tok) > 1 and "." not in tok:  # x^23 means x^2 * 3
            self.tokens[self.i : self.i + 1] = [tok[0], tok[1:]]
        exponent = self.unary() if tok == "-" else self.atom()
        if exponent.is_Number and abs(exponent) > _MAX_EXPONENT:
            raise TooLarge("exponent too large")
        if exponent.is_Number and not base.free_symbols and abs(exponent) * len(str(base)) > MAX_DIGITS:
            raise TooLarge("power too large")  # (2^{512})^{512} would be built digit by digit
        return base**exponent

    def group(self) -> sympy.Expr:
        """A braced argument {expr}, or a single token (\\frac12 style was normalized away, but be lenient)."""
        if self.peek() == "{":
            self.take()
            value = self.expr()
            self.take("}")
            return value
        return self.atom()

    def atom(self) -> sympy.Expr:
        tok = self.take()
        if tok[0].isdigit() or tok[0] == ".":
            return sympy.Rational(tok)  # exact: 0.5 == 1/2
        if tok in ("(", "{", "["):
            value = self.expr()
            self.take({"(": ")", "{": "}", "[": "]"}[tok])
            return value
        if tok == "|":
            value = self.expr()
            self.take("|")
            return sympy.Abs(value)
        if tok.isalpha():
            return sympy.Symbol(tok)
        name = tok[1:]
        if name == "frac":
            numerator = self.group()
            return numerator / self.group()
        if name == "sqrt":
            index = sympy.Integer(2)
            if self.peek() == "[":
                self.take()
                index = self.expr()
                self.take("]")
            return sympy.root(self.group(), index)
        if name == "pi":
            return sympy.pi
        if name == "infty":
            return sympy.oo
        if name in _GREEK:
            return sympy.Symbol(name)
        if name in _FUNCTIONS:
            return _FUNCTIONS[name](self.power())
        raise LatexParseError(f"unsupported command {tok}")


@lru_cache(maxsize=1 << 14)
def latex_to_sympy(s: str) -> sympy.Expr:
    """Parse a normalized LaTeX answer into a sympy expression; raises LatexParseError when it cannot."""
    if not s or len(s) > 200:
        raise LatexParseError("empty or too long")
    if re.search(r"[A-Za-z]{3}", re.sub(r"\\[A-Za-z]+", " ", s)):  # words, not products: "Devon" != D*e*v*o*n
        raise LatexParseError("looks like text")
    return _Parser(_tokenize(s)).parse()


def _split_top_level(s: str) -> tuple[str, list[str], str]:
    """ "(1,\\frac{1}{2})" -> ("(", ["1", "\\frac{1}{2}"], ")"); "1,2" -> ("", ["1", "2"], "")."""
    opener, closer = "", ""
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]":
        opener, closer, s = s[0], s[-1], s[1:-1]
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth < 0:  # "(1)+(2)": the outer brackets were not a pair
                return "", [opener + s + closer], ""
        elif ch == "," and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    parts.append(s[start:])
    return opener, parts, closer


# Generic values for variables (one per symbol, cycled): irrational-looking, so unequal expressions differ there.
_PROBE_POINTS = (
    (sympy.Rational(3719, 2000), sympy.Rational(-1287, 1000)),
    (sympy.Rational(5, 7), sympy.Rational(11, 3)),
)


@lru_cache(maxsize=1 << 16)
def _sympy_equal(a: str, b: str) -> bool:
    """sympy shows a - b == 0, within the time and size bounds (a give-up is logged once per pair: cached)."""
    try:
        with time_bound(SYMPY_SECONDS):
            return _sympy_difference_is_zero(a, b)
    except TimeBoundReached:
        return _give_up("time", a, b)
    except TooLarge:
        return _give_up("size", a, b)


def _sympy_difference_is_zero(a: str, b: str) -> bool:
    try:
        x, y = latex_to_sympy(a), latex_to_sympy(b)
        difference = x - y
        if difference == 0:
            return True
        # Cheap numeric rejection first (at two fixed generic points when there are variables); the slow
        # simplify only confirms a difference that is numerically 0 everywhere we looked.
        symbols = sorted(difference.free_symbols, key=str)
        for point in _PROBE_POINTS if symbols else [()]:
            values = dict(zip(symbols, point * len(symbols)))
            value = complex(difference.subs(values).evalf(30))
            scale = max(1.0, abs(complex(x.subs(values).evalf(30))))
            if abs(value) > 1e-9 * scale:
                return False
        return sympy.simplify(difference) == 0
    except TooLarge:
        raise
    except Exception:  # parse failure, or sympy could not decide (zoo, nan, TypeError ...): not shown equal
        return False


def _math_equal(a: str, b: str) -> bool:
    """Normalized MATH answers equal as strings, elementwise for tuples/intervals/lists, or by sympy."""
    if a == b:
        return True
    open_a, parts_a, close_a = _split_top_level(a)
    open_b, parts_b, close_b = _split_top_level(b)
    if len(parts_a) > 1 or len(parts_b) > 1:
        if (open_a, close_a, len(parts_a)) != (open_b, close_b, len(parts_b)):
            return False
        return all(p != "" and _math_equal(p, q) for p, q in zip(parts_a, parts_b))
    return _sympy_equal(a, b)


def is_equiv(pred: str, gold: str, task: str) -> bool:
    """Whether an extracted answer equals the gold answer. Empty answers (after normalization) never match."""
    check_task(task)
    a, b = normalize_answer(pred), normalize_answer(gold)
    if not a or not b:
        return False
    if a == b:
        return True
    return task == "math" and _math_equal(a, b)


def answer_key(answer: str, task: str) -> str:
    """A hashable canonical form for grouping answers (majority vote): normalized, and for MATH each part rewritten
    by sympy when it parses (0.5 and \\frac{1}{2} both give "1/2"). Equal keys imply is_equiv (keys are never ""
    unless the answer is empty); is_equiv can still hold across keys, e.g. (x+1)^2 vs x^2+2x+1."""
    check_task(task)
    s = normalize_answer(answer)
    if task != "math" or not s:
        return s
    opener, parts, closer = _split_top_level(s)
    return opener + ",".join(_expression_key(part) for part in parts) + closer


@lru_cache(maxsize=1 << 16)
def _expression_key(s: str) -> str:
    try:
        with time_bound(SYMPY_SECONDS):
            return str(latex_to_sympy(s))
    except (Exception, TimeBoundReached):  # not parseable, too large or too slow: the normalized string is the key
        return s


def final_answer(response: str, task: str) -> str:
    """The extracted, normalized final answer of a response ("" if none): what filtering and voting compare."""
    return normalize_answer(extract_answer(response, task))


def grade(response: str, gold_answer: str, task: str) -> bool:
    """Extract the answer of a full response and compare it with the gold answer."""
    return is_equiv(extract_answer(response, task), gold_answer, task)
