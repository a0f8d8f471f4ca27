"""The calculus of sympy 1.12's LaTeX grammar, as rules of w2s/tasks/olympic_latex.py's parser: \\int, \\sum, \\prod,
\\lim and evaluation bars, built into sympy's Integral, Sum, Product and Limit (which the OlympicArena judge's sympy.N
may evaluate: an answer "\\int_0^{1} 2x\\,dx" equals 1) and substituted values.

The grammar's reading, kept:
  * \\int [_a^b] reads an expression then a differential, the longest such (\\int x dx dy integrates x*dx over y), else
    a lone \\frac, else an expression, over the symbol named d<v> in it (set to 1: \\int \\frac{dx}{x}) or else over x;
  * the second bound's number takes the digits after it while the rest still reads: \\int_0^1 2x\\,dx is from 0 to 12;
  * \\sum_{i=a}^{b}, \\prod and \\lim_{x \\to a} (^+ or ^- for one side) take one product term: \\sum_{i=1}^{n} i + 1 is
    Sum(i) + 1;
  * an evaluation bar x|^{x=b}_{x=a} is substituted and evaluated (x^2|_{x=3} is 9); a bar without "x=" puts the value
    for one of its own symbols, so |_{0}^{1} changes nothing (and only |_{0} is the bar, ^{1} is left over).

Test: python -m pytest -q tests/test_olympicarena.py
"""

from __future__ import annotations

import itertools

import sympy

from w2s.tasks.olympic_latex_lexer import _APPROACH, _CLOSERS, _RELATIONS, MAX_EXPONENT, LatexError, _Unreadable


class CalculusRules:
    """The calculus rules of olympic_latex._Parser, which mixes them in: they read with its tokens and its other
    rules (take, peek, kind, attempt, once, expr, mp, script, frac, _shortening)."""

    # eval_at := "|" ("^" at | "_" at | "^" at "_" at), at := "{" (expr | expr "=" expr) "}"
    def _bar(self):
        """An evaluation bar -> (upper, lower) "at"s, None where absent; an "at" is (expr, expr after "=" or None)."""
        self.take("|")
        upper = self._at("^") if self.kind() == "^" else None
        return upper, self._at("_") if self.kind() == "_" or upper is None else None

    def _at(self, mark):
        self.take(mark)
        self.take("{")
        left, right = self.expr(), None
        if self.kind() == "=":
            self.take()
            right = self.expr()
        self.take("}")
        return left, right

    # \int (subexpr supexpr | supexpr subexpr)? (expr? differential | frac | expr)
    def integral(self):
        self.take()
        if self.kind() not in ("_", "^"):
            return sympy.Integral(*self._integrand())
        lower, upper, (body, variable) = self._bounded(False, self._integrand)
        return sympy.Integral(body, (variable, lower, upper))

    def _integrand(self):
        """-> (integrand, variable), the grammar's alternatives in order: an expression (or none) then a differential,
        the LONGEST such expression (\\int x dx dy integrates x dx over y); a fraction alone (\\int \\frac{1}{x} y is
        y times an integral); an expression. Without a differential sympy integrates over the symbol named d<v> in
        it, set to 1 there (\\int \\frac{dx}{x}: 1/x over x; \\int \\delta: 1 over "elta"), else over x."""
        for end in reversed(self._ahead("diff")):
            body = 1 if end == self.i else self.attempt(self.within, end, self.expr)
            if body is not None:
                self.i = end + 1
                return body, sympy.Symbol(self.tokens[end][1])
        body = self.frac() if self.peek() in (("cmd", "frac"), ("cmd", "dfrac"), ("cmd", "tfrac")) else self.expr()
        variable, marked = sympy.Symbol("x"), None
        for symbol in body.atoms(sympy.Symbol):  # with several, the last one met (sympy's set order) counts
            if len(symbol.name) > 1 and symbol.name.startswith("d"):
                variable, marked = sympy.Symbol(symbol.name[1:]), symbol
        return (body if marked is None else _substituted(body, marked, 1)), variable

    # (\sum | \prod) ("_" "{" expr "=" expr "}" supexpr | supexpr "_" "{" expr "=" expr "}") mp
    def big_operator(self):
        """\\sum and \\prod over a product term (mp): \\sum_{i=1}^{n} i + 1 is Sum(i) + 1."""
        operator = sympy.Sum if self.take()[1] == "sum" else sympy.Product
        (variable, start), end, term = self._bounded(True, self.mp)
        return operator(term, (variable, start, end))

    def _bounded(self, equation, body):
        """_lower and ^upper in either order, then body() -> (lower, upper, body); lower is "{" expr "=" expr "}" for
        an equation. Written first, ^upper's atom leaves a _ after it to the lower bound (\\sum^n_{i=1} i). As the
        grammar's number takes digits only while the rest can be read, the second bound's number gives back digits,
        from its last, until body() reads (\\sum_{k=1}^10 2^k is to 10 of 2^k; \\int_0^1 2x dx is to 12 of x)."""
        def bounds(limit):
            bound = {}
            for mark in ("^", "_") if self.kind() == "^" else ("_", "^"):
                second, later = self.i, bool(bound)
                bound[mark] = self._at("_") if equation and mark == "_" else self.script(
                    mark, mark == "_" or later, limit if later else None)
            if equation and bound["_"][1] is None:
                raise LatexError("expected _{i=a}")
            digits = len(list(itertools.takewhile(lambda t: t[0] == "digit", self.tokens[second + 1 : self.i])))
            return bound, digits

        return self._shortening(bounds, lambda bound: (bound["_"], bound["^"], body()))

    # \lim "_" "{" (letter | symbol) \to expr ("^" ("+" | "-" | "{+}" | "{-}"))? "}" mp
    def limit(self):
        """sympy's Limit(term, x, a, side): side "+-" (both) unless a ^+ or ^- follows a."""
        self.take()
        self.take("_")
        self.take("{")
        kind, name = self.take()
        if kind not in ("letter", "symbol") or self.take("cmd")[1] not in _APPROACH:
            raise LatexError("expected x \\to a")
        point, side = self.expr(), "+-"
        if self.kind() == "^":
            self.take()
            braced = self.kind() == "{" and self.take()
            side = self.take()[0]
            if side not in ("+", "-"):
                raise LatexError("expected ^+ or ^-")
            if braced:
                self.take("}")
        self.take("}")
        return sympy.Limit(self.mp(), sympy.Symbol(name), point, side)

    def within(self, end, rule):
        """rule() on the tokens before `end`, all of them: the parser sees the end there."""
        outer, self.stop = self.stop, end
        try:
            value = self.once(rule)
        finally:
            self.stop = outer
        if self.i != end:
            raise LatexError("stops short")
        return value

    def _ahead(self, kind):
        """Where the tokens of this kind lie ahead outside brackets, up to the end of the expression here (a comma
        outside a number, a relation or a closing bracket)."""
        found, depth, ahead = [], 0, 0
        while (token := self.peek(ahead))[0] != "end":
            depth += (token[0] in _CLOSERS) - (token[0] in _CLOSERS.values())
            comma = token[0] == "," and {self.kind(ahead + k) for k in (-1, 1, 2, 3)} != {"digit"}
            if depth < 0 or depth == 0 and (comma or token[0] in "=<>" or "\\" + token[1] in _RELATIONS):
                break
            if depth == 0 and token[0] == kind:
                found.append(self.i + ahead)
            ahead += 1
        return found


def _evaluated(value, upper, lower):
    """value|^{upper}_{lower} as sympy's parser reads it: value at each side given (at x=a: a put for x; at a lone a: a
    put for one of a's own symbols, the first in set order, so |_{2} changes nothing), upper - lower when both are."""
    at = []
    for left, right in filter(None, (upper, lower)):
        old = next(iter(left.atoms(sympy.Symbol)), None) if right is None else left
        at.append(value if old is None else _substituted(value, old, left if right is None else right))
    return sympy.Add(at[0], -1 * at[1], evaluate=False) if len(at) == 2 else at[0]


def _substituted(expr, old, new):
    """expr.subs(old, new), which evaluates the tree as sympy's parser does; refused where that would compute a
    power past MAX_EXPONENT, which no time limit interrupts ((x^{999})^{999} at x=9 is 9^998001)."""
    with sympy.evaluate(False):
        unevaluated = expr.subs(old, new)
    _check_powers(unevaluated)
    return expr.subs(old, new)


def _check_powers(expr, scale=1):
    """Refuses a power, within powers (whose exponents multiply), that evaluates past MAX_EXPONENT."""
    if isinstance(expr, sympy.Pow) and not expr.exp.free_symbols:
        scale *= max(1.0, abs(complex(sympy.N(expr.exp))))
        if scale > MAX_EXPONENT:
            raise _Unreadable("exponent too large to evaluate")
    for arg in expr.args:
        _check_powers(arg, scale)
