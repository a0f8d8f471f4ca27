"""LaTeX answers -> unevaluated sympy trees, shaped as sympy's own LaTeX parser builds them (OlympicArena judge).

OlympicArena's judge reads answers with `sympy.parsing.latex.parse_latex`, which needs the ANTLR runtime pinned to
4.11. w2s does not depend on it, so this is a small recursive-descent parser for the same grammar. What matters for
the judge's verdicts is the *shape* of the result, not only its value: sympy's parser builds every sum, product,
quotient and power with `evaluate=False`, and the judge first compares two answers by structural equality, so
`x+1` and `1+x` are different trees (as they are in OlympicArena), while `2x` and `2\\cdot x` are the same one.

    parse_latex("\\frac{v_0^2}{2g}")        # Mul(Pow(v_0, 2), Pow(Mul(2, g), -1)), all unevaluated
    parse_latex("3.0\\times 10^{8}")         # Mul(3.0, Pow(10, 8)): what the judge calls scientific notation

Grammar (sympy's LaTeX.g4, reduced to what final answers use):
    expr    := mp (('+' | '-') mp)*
    mp      := unary (('*' | '\\times' | '\\cdot' | '/' | '\\div') unary)*
    unary   := ('+' | '-') unary | postfix postfix*          (juxtaposition is a product: 2x, mgh, 3\\sqrt{2})
    postfix := comp ('^' (atom | '{' expr '}'))* '!'?
    comp    := number | letter or \\greek (with _subscript and primes) | (expr) | [expr] | {expr} | \\{expr\\}
             | |expr| | \\frac{}{} | \\binom{}{} | \\sqrt[n]{} | \\pi | \\infty | \\sin x, \\log_b x, ...
Anything else (relations, commas outside numbers, unknown commands) is a LatexError. Bounded: inputs over
MAX_CHARS characters, exponents over MAX_EXPONENT and factorials over MAX_FACTORIAL are refused (LatexError), since
an exact sympy power of that size can hang past any time limit.

Test: python -m pytest -q tests/test_olympicarena.py
"""

from __future__ import annotations

import re

import sympy

MAX_CHARS = 1000
MAX_EXPONENT = 1000
MAX_FACTORIAL = 1000


class LatexError(ValueError):
    """The text is not an expression this parser reads (the judge treats it as "cannot compare")."""


# Numbers may group thousands with commas, as sympy's grammar allows ("1,000" is 1000).
_TOKEN = re.compile(
    r"\s*(\d+(?:,\d{3})*(?:\.\d+)?|\d*(?:,\d{3})*\.\d+|\\[A-Za-z]+|\\[{}|,;!: ]|[A-Za-z]|[-+*/^_(){}\[\]|!'=<>,])"
)
_SPACING = {"\\,", "\\;", "\\!", "\\:", "\\ ", "\\quad", "\\qquad"}
_TIMES = {"*", "\\times", "\\cdot"}
_DIVIDE = {"/", "\\div"}
_FRACS = {"\\frac", "\\dfrac", "\\tfrac"}
_CLOSERS = {"(": ")", "[": "]", "{": "}", "\\{": "\\}"}
_FUNCTIONS = {
    "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "cot": sympy.cot, "sec": sympy.sec, "csc": sympy.csc,
    "arcsin": sympy.asin, "arccos": sympy.acos, "arctan": sympy.atan, "sinh": sympy.sinh, "cosh": sympy.cosh,
    "tanh": sympy.tanh, "exp": sympy.exp, "ln": sympy.log,
}  # fmt: skip
_GREEK = {
    "alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta", "vartheta", "iota", "kappa",
    "lambda", "mu", "nu", "xi", "rho", "sigma", "tau", "upsilon", "phi", "varphi", "chi", "psi", "omega",
    "Gamma", "Delta", "Theta", "Lambda", "Xi", "Sigma", "Phi", "Psi", "Omega",
}  # fmt: skip


def _tokenize(text: str) -> list[str]:
    tokens, i = [], 0
    while i < len(text):
        m = _TOKEN.match(text, i)
        if not m:
            if not text[i:].strip():
                break
            raise LatexError(f"cannot read {text[i : i + 20]!r}")
        if m.group(1) not in _SPACING:
            tokens.append(m.group(1))
        i = m.end()
    return tokens


def _mul(a, b):
    return sympy.Mul(a, b, evaluate=False)


def _pow(base, exponent):
    if exponent.is_Number and abs(exponent) > MAX_EXPONENT:
        raise LatexError("exponent too large to evaluate")
    return sympy.Pow(base, exponent, evaluate=False)


class _Parser:
    def __init__(self, tokens: list[str]):
        self.tokens, self.i = tokens, 0

    def peek(self, ahead: int = 0) -> str | None:
        j = self.i + ahead
        return self.tokens[j] if j < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (expected is not None and tok != expected):
            raise LatexError(f"expected {expected or 'more'}, got {tok!r}")
        self.i += 1
        return tok

    def parse(self):
        value = self.expr()
        if self.peek() is not None:
            raise LatexError(f"unexpected {self.peek()!r}")
        return value

    def expr(self):
        value = self.mp()
        while self.peek() in ("+", "-"):
            sign = self.take()
            right = self.mp()
            value = sympy.Add(value, right if sign == "+" else _mul(-1, right), evaluate=False)
        return value

    def mp(self):
        value = self.unary()
        while self.peek() in _TIMES | _DIVIDE:
            op = self.take()
            right = self.unary()
            value = _mul(value, right) if op in _TIMES else _mul(value, _pow(right, sympy.Integer(-1)))
        return value

    def unary(self):
        if self.peek() == "+":
            self.take()
            return self.unary()
        if self.peek() == "-":
            self.take()
            return -self.unary()  # sympy's parser negates the parsed operand: -3 is the number -3
        value = self.postfix()
        while self.starts_comp(self.peek()):
            value = _mul(value, self.postfix())
        return value

    def starts_comp(self, tok: str | None) -> bool:
        if tok is None:
            return False
        if tok in ("(", "[", "{", "\\{", "|") or tok[0].isdigit() or tok[0] == "." or tok.isalpha():
            return tok != "|" or self.abs_open is False
        return tok.startswith("\\") and tok not in _TIMES | _DIVIDE | {"\\}", "\\cup"}

    abs_open = False  # inside |...|, a "|" closes the group instead of opening a new one

    def postfix(self):
        value = self.comp()
        while self.peek() == "^":
            self.take()
            exponent = self.expr_in_braces() if self.peek() == "{" else self.single()
            value = _pow(value, exponent)
        if self.peek() == "!":
            self.take()
            if not (value.is_Integer and 0 <= value <= MAX_FACTORIAL):
                raise LatexError("factorial of a non-small integer")
            value = sympy.factorial(value, evaluate=False)
        return value

    def expr_in_braces(self):
        self.take("{")
        value = self.expr()
        self.take("}")
        return value

    def single(self):
        """A superscript or command argument without braces is one token: x^23 is x^2 * 3, \\frac12 is 1/2."""
        tok = self.peek()
        if tok is not None and tok[0].isdigit() and len(tok) > 1:
            self.tokens[self.i : self.i + 1] = [tok[0], tok[1:]]
        return self.comp()

    def argument(self):
        return self.expr_in_braces() if self.peek() == "{" else self.single()

    def comp(self):
        tok = self.take()
        if tok[0].isdigit() or tok[0] == ".":
            return sympy.Number(tok.replace(",", ""))
        if tok in _CLOSERS:
            value = self.expr()
            self.take(_CLOSERS[tok])
            return value
        if tok == "|":
            outer, self.abs_open = self.abs_open, True
            value = self.expr()
            self.take("|")
            self.abs_open = outer
            return sympy.Abs(value, evaluate=False)
        if tok.isalpha():
            return self.symbol(tok)
        return self.command(tok)

    def symbol(self, name: str):
        if self.peek() == "_":
            self.take()
            sub = self.argument()
            name = f"{name}_{{{sympy.sstr(sub)}}}"
        while self.peek() == "'":
            name += self.take()
        return sympy.Symbol(name)

    def command(self, tok: str):
        name = tok[1:]
        if tok in _FRACS:
            top, bottom = self.argument(), self.argument()
            inverse = _pow(bottom, sympy.Integer(-1))
            return inverse if top == 1 else _mul(top, inverse)
        if name == "binom":
            return sympy.binomial(self.argument(), self.argument(), evaluate=False)
        if name == "sqrt":
            index = None
            if self.peek() == "[":
                self.take()
                index = self.expr()
                self.take("]")
            radicand = self.argument()
            return _pow(radicand, _pow(index if index is not None else sympy.Integer(2), sympy.Integer(-1)))
        if name == "pi":
            return sympy.pi
        if name == "infty":
            return sympy.oo
        if name in _GREEK:
            return self.symbol(name)
        if name in _FUNCTIONS or name == "log":
            return self.function(name)
        raise LatexError(f"unsupported command {tok}")

    def function(self, name: str):
        base = None
        if name == "log" and self.peek() == "_":
            self.take()
            base = self.argument()
        power = None
        if self.peek() == "^":  # \sin^2 x is (sin x)^2
            self.take()
            power = self.argument()
        if self.peek() in ("(", "{"):
            arg = self.comp()
        else:  # \sin 2x: the argument runs over the juxtaposed product
            arg = self.postfix()
            while self.starts_comp(self.peek()) and not self.peek().startswith("\\"):
                arg = _mul(arg, self.postfix())
        if name == "log":
            value = sympy.log(arg, base if base is not None else 10, evaluate=False)
        else:
            value = _FUNCTIONS[name](arg, evaluate=False)
        return _pow(value, power) if power is not None else value


def parse_latex(text: str):
    """An unevaluated sympy expression for a LaTeX answer; LatexError when it cannot be read (or is too big)."""
    if not isinstance(text, str) or not text.strip():
        raise LatexError("empty")
    if len(text) > MAX_CHARS:
        raise LatexError(f"longer than {MAX_CHARS} characters")
    return _Parser(_tokenize(text)).parse()
