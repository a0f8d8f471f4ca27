"""LaTeX answers -> unevaluated sympy trees, read as sympy 1.12's LaTeX parser reads them (OlympicArena judge).

OlympicArena's judge reads answers with `sympy.parsing.latex.parse_latex` (its requirements pin sympy 1.12, whose
parser needs the ANTLR runtime pinned to 4.11). w2s does not depend on ANTLR, so this is a small recursive-descent
parser for the same grammar (sympy's LaTeX.g4) that builds the same trees. The *shape* matters, not only the value:
the judge first compares two answers by structural equality, and sympy's parser builds every sum, product, quotient
and power with `evaluate=False`, so `x+1` and `1+x` are different trees (as they are in OlympicArena).

    parse_latex("\\frac{v_0^2}{2g}")        # Mul(Pow(v_0, 2), Pow(Mul(2, g), -1)), all unevaluated
    parse_latex("3.0\\times 10^{8}")         # Mul(3.0, Pow(10, 8)): what the judge calls scientific notation

The grammar's own quirks are kept, since they decide verdicts:
  * what follows a complete answer is ignored when it cannot continue it: "2, 3" reads as 2 and "A, B" as A, so a
    box listing several values can pass as one (`auto_judge` never counts the commas); "10^-19" reads as 10;
  * a number is digits, commas before groups of three and a decimal part, with spaces and thin spaces allowed
    between its digits: "1,000", "10\\,000", "1 000" are 1000; ".5" and "2." are errors;
  * \\pi is the symbol named pi, not the number; \\log and \\ln are natural logarithms, \\lg is base 10;
  * a superscript or subscript takes a whole number (x^23 is x**23, x_12 is x_{12}); \\frac's arguments without
    braces are single digits (\\frac123 is 3/2);
  * any other command is a symbol of its name (\\hbar, \\ell, \\text, \\mathrm); a letter followed by (...) is a
    function call (f(x), and x(x+1) too); juxtaposed factors nest to the right; a lone x between two numbers is
    a multiplication sign ("3 x 10^8");
  * "d" followed by a letter is one symbol (dx), \\sin^{-1} is asin, \\lfloor/\\lceil are floor/ceiling.
  * \\frac{d}{dx} differentiates the factors after it, and \\frac{dy}{dx}, \\frac{\\partial f}{\\partial x} are
    derivatives of the numerator after its d, read again from the text (so \\frac{d^2y}{dx} is an error).
Integrals, sums, products, limits and evaluation bars are read by the rules of w2s/tasks/olympic_calculus.py, mixed
into the parser; the tokens, the errors and the size limits are w2s/tasks/olympic_latex_lexer.py's.
Not read (LatexError, which the judge counts as "cannot compare"): bras and kets. Known to differ, rarely: where sympy's
parser looks further ahead to pick a reading (it reads \\sin(x)|_{x=0}^{1} as sin(0)^1, where this parser reads sin(x)
at x=0 and leaves ^{1}; it fails on an unreadable subscript, as in 2 - x_{i=1}, where this parser stops at 2).
Bounded: inputs over MAX_CHARS characters, finite exponents over MAX_EXPONENT (also where an evaluation bar would
compute one) and factorials over MAX_FACTORIAL are refused (LatexError), since an exact sympy power of that size can
hang past any time limit.

Test: python -m pytest -q tests/test_olympicarena.py
"""

from __future__ import annotations

import sympy

from w2s.tasks.olympic_calculus import CalculusRules, _evaluated
from w2s.tasks.olympic_latex_lexer import (
    _CLOSERS,
    _FUNCTIONS,
    _RELATIONS,
    MAX_CHARS,
    MAX_EXPONENT,
    MAX_FACTORIAL,
    LatexError,
    _tokenize,
    _Unreadable,
)

# ---------------------------------------------------------------------------------------------------- the parser


def _mul(a, b):
    return sympy.Mul(a, b, evaluate=False)


def _pow(base, exponent):
    if exponent.is_Number and exponent.is_finite and abs(exponent) > MAX_EXPONENT:  # x^\\infty stays
        raise LatexError("exponent too large to evaluate")
    return sympy.Pow(base, exponent, evaluate=False)


class _Parser(CalculusRules):
    """One method per rule of the grammar. A repeated part (another term, factor, superscript or "!") is taken only
    when it parses whole; otherwise the parser stops before it and what is left is ignored."""

    def __init__(self, text: str):
        self.text, self.source, self.i = text, _tokenize(text), 0
        self.tokens, self.starts = [], []  # the tokens read so far from the source, and where each starts
        self.stop = MAX_CHARS  # the parser sees the end here (see within)
        self.memo = {}  # (rule, position, stop) -> (value or LatexError, position after): each is parsed once

    def peek(self, ahead: int = 0) -> tuple[str, str]:
        j = self.i + ahead
        while len(self.tokens) <= j < self.stop and (token := next(self.source, None)) is not None:
            self.tokens.append(token[0])
            self.starts.append(token[1])
        return self.tokens[j] if j < min(len(self.tokens), self.stop) else ("end", "")

    def kind(self, ahead: int = 0) -> str:
        return self.peek(ahead)[0]

    def take(self, kind: str | None = None, text: str | None = None) -> tuple[str, str]:
        tok = self.peek()
        if tok[0] == "end" or (kind is not None and tok[0] != kind) or (text is not None and tok[1] != text):
            raise LatexError(f"expected {text or kind or 'more'}, got {tok[1] or 'the end'!r}")
        self.i += 1
        return tok

    def attempt(self, rule, *args):
        """rule(*args) if it parses, else None with the position unchanged."""
        start = self.i
        try:
            return self.once(rule, *args)
        except _Unreadable:
            raise
        except LatexError:
            self.i = start
            return None

    def once(self, rule, *args):
        """rule(*args) at this position, parsed once: a failed alternative retried from the same place (the
        parser backtracks) reuses the outcome instead of parsing again, which could take exponential time."""
        key = (rule.__name__, args, self.i, self.stop)
        if key not in self.memo:
            try:
                outcome = rule(*args)
            except _Unreadable:
                raise
            except LatexError as e:
                outcome = e
            self.memo[key] = (outcome, self.i)
        outcome, self.i = self.memo[key]
        if isinstance(outcome, LatexError):
            raise outcome
        return outcome

    # relation := expr (relop expr)*; a relation symbol must be followed by an expression
    def relation(self):
        value = self.expr()
        while (op := self._relation_op()) is not None:
            value = op(value, self.expr())
        return value

    def _relation_op(self):
        kind, text = self.peek()
        name = kind if kind in ("=", "<", ">") else "\\" + text if kind == "cmd" else None
        if name not in _RELATIONS:
            return None
        self.i += 1
        return _RELATIONS[name]

    # expr := mp (("+" | "-") mp)*
    def expr(self):
        value = self.mp()
        while self.kind() in ("+", "-") and (term := self.attempt(self._signed_mp)) is not None:
            sign, right = term
            if sign == "+":
                value = sympy.Add(value, right, evaluate=False)
            elif right.is_Atom:
                value = sympy.Add(value, -1 * right, evaluate=False)
            else:
                value = sympy.Add(value, _mul(-1, right), evaluate=False)
        return value

    def _signed_mp(self):
        return self.take()[0], self.mp()

    # mp := unary (("*" | \times | \cdot | "/" | \div | ":") unary)*; mp_nofunc the same over unary_nofunc
    def mp(self, nofunc=False):
        value = self.unary(nofunc)
        while (factor := self.attempt(self._operated_unary, nofunc)) is not None:
            divide, right = factor
            value = _mul(value, _pow(right, sympy.Integer(-1))) if divide else _mul(value, right)
        return value

    def _operated_unary(self, nofunc):
        kind, text = self.take()
        if kind in ("/", ":") or (kind == "cmd" and text == "div"):
            return True, self.unary(nofunc)
        if kind == "*" or (kind == "cmd" and text in ("times", "cdot")):
            return False, self.unary(nofunc)
        raise LatexError("not an operator")

    # unary := ("+" | "-") unary | postfix+   (unary_nofunc: functions only as the first postfix)
    def unary(self, nofunc=False):
        if self.kind() == "+":
            self.take()
            return self.unary(nofunc)
        if self.kind() == "-":
            self.take()
            return -self.unary(nofunc)  # sympy's parser negates the parsed operand: -3 is the number -3
        factors = [self.once(self.postfix, True)]
        while (factor := self.attempt(self.postfix, not nofunc)) is not None:
            factors.append(factor)
        return _juxtaposed(factors)

    # postfix := exp ("!" | eval_at)*
    def postfix(self, functions=True):
        value = self.exp(functions)
        while True:
            if self.kind() == "|" and (bar := self.attempt(self._bar)) is not None:
                value = _evaluated(value, *bar)
            elif self.kind() == "!":
                self.take()
                if value.is_Integer and value > MAX_FACTORIAL:  # (-1)! stays, unevaluated, as in sympy 1.12
                    raise LatexError("factorial of a large integer")
                value = sympy.factorial(value, evaluate=False)
            else:
                return value


    # exp := comp ("^" (atom | "{" expr "}") subexpr?)*
    def exp(self, functions=True):
        value = self.comp(functions)
        while self.kind() == "^" and (exponent := self.attempt(self._superscript)) is not None:
            value = _pow(value, exponent)
        return value

    def _superscript(self):
        exponent = self.script("^")
        if self.kind() == "_":  # a subscript after a superscript is read and dropped
            self.script("_")
        return exponent

    # subexpr := "_" (atom | "{" expr "}"); supexpr the same after "^"
    def script(self, mark, subscripted=True, digit_limit=None):
        self.take(mark)
        return self.braced() if self.kind() == "{" else self.atom(digit_limit, subscripted)

    def braced(self):
        self.take("{")
        value = self.expr()
        self.take("}")
        return value

    # comp := group | abs_group | func | atom | floor | ceil   (comp_nofunc: no func)
    def comp(self, functions=True):
        kind, text = self.peek()
        if kind in _CLOSERS:
            self.take()
            value = self.expr()
            self.take(_CLOSERS[kind])
            return value
        if kind == "|":  # its content, read greedily (|x|_{x=1}| is |1|), or when an evaluation bar inside took
            self.take()  # the closing "|" (|x|^{2} is |x| squared), the longest content that a later "|" closes
            bars = {j: self.kind(j + 1 - self.i) for j in self._ahead("|")}  # each "|" ahead -> the token after it
            closings = [j for j in reversed(bars) if bars[j] != "_"] if {"^", "_"} & set(bars.values()) else []
            for end in (None, *closings):
                if (value := self.attempt(self._closed, end)) is not None:
                    return sympy.Abs(value, evaluate=False)
            raise LatexError("| not closed")
        if kind == "cmd" and text in ("lfloor", "lceil"):
            self.take()
            value = self.expr()
            self.take("cmd", "rfloor" if text == "lfloor" else "rceil")
            return (sympy.floor if text == "lfloor" else sympy.ceiling)(value, evaluate=False)
        if functions and (called := self.attempt(self.func)) is not None:
            return called
        return self.atom()

    def _closed(self, end):
        value = self.expr() if end is None else self.within(end, self.expr)
        self.take("|")
        if self.kind() == "_":  # sympy's parser fails on |x|_2 and |x|_{x=1}
            raise LatexError("| then _")
        return value

    # atom := (letter | symbol) subexpr? quotes? | number | diff | mathit | frac | binom
    def atom(self, digit_limit=None, subscripted=True):
        kind, text = self.peek()
        if kind == "digit":
            return self.number(digit_limit)
        if kind in ("letter", "symbol"):
            name = self.name(subscripted)
            return sympy.oo if (kind, text) == ("symbol", "infty") else sympy.Symbol(name)
        if kind == "diff":
            self.take()
            return sympy.Symbol("d" + text)
        if kind == "cmd" and text == "mathit":
            self.take()
            self.take("{")
            letters = []
            while self.kind() == "letter":
                letters.append(self.take()[1])
            self.take("}")
            return sympy.Symbol("".join(letters))
        if kind == "cmd" and text in ("frac", "dfrac", "tfrac"):
            return self.frac()
        if kind == "cmd" and text in ("binom", "dbinom", "tbinom"):
            self.take()
            return sympy.binomial(self.braced(), self.braced(), evaluate=False)
        raise LatexError(f"unexpected {text or 'end'!r}")

    def name(self, subscripted=True):
        """A letter or command's symbol name: its subscript as "_{...}" and (letters only) its primes."""
        kind, name = self.take()
        quotes = self.take()[1] if self.kind() == "quotes" else ""
        if subscripted and self.kind() == "_":
            name += "_{" + sympy.sstr(self.script("_")) + "}"
        if not quotes and self.kind() == "quotes":
            quotes = self.take()[1]
        return name + quotes if kind == "letter" else name

    def number(self, digit_limit=None):
        """digit+ ("," digit digit digit)* ("." digit+)?; at most digit_limit digits before any "," or "."."""
        digits = self.take("digit")[1]
        while self.kind() == "digit" and (digit_limit is None or len(digits) < digit_limit):
            digits += self.take()[1]
        while self.kind() == "," and all(self.kind(k) == "digit" for k in (1, 2, 3)):
            digits += "".join(self.peek(k)[1] for k in (1, 2, 3))
            self.i += 4
        if self.kind() == ".":
            self.take()
            digits += "." + self.take("digit")[1]  # "2." is an error, as in sympy's parser
            while self.kind() == "digit":
                digits += self.take()[1]
        return sympy.Number(digits)

    def frac(self):
        self.take()
        first, braced = self.i + 1, self.kind() == "{"  # the numerator's first token, when braced
        top = self._frac_argument()
        if braced and (derivative := self._derivative(first)) is not None:
            return derivative
        bottom = self._frac_argument()
        inverse = _pow(bottom, sympy.Integer(-1))
        return inverse if top == 1 else _mul(top, inverse)

    def _derivative(self, first):
        """sympy's reading of \\frac{...}{dx} and \\frac{...}{\\partial x} (the denominator, next): \\frac{d}{dx} is the
        operator [x], which differentiates the factors after it (see _juxtaposed); d f or \\partial f on top is the
        Derivative of f, which sympy reads again from the text after its d, so "\\frac{d^2 y}{dx}" is an error.
        None when it is a fraction: another denominator, or a numerator without d (\\frac{d0}{dx}: 0 is falsy)."""
        below, top = [self.peek(k) for k in range(4)], self.tokens[first : self.i - 1]
        kinds = [kind for kind, _ in below]
        if kinds[:3] == ["{", "diff", "}"]:
            head, mark, wrt, width = ("letter", "d"), "d", below[1][1], 3
        elif below[1] == ("symbol", "partial") and kinds[::3] == ["{", "}"] and kinds[2] in ("letter", "symbol"):
            head, mark, wrt, width = ("symbol", "partial"), "\\partial", below[2][1], 4
        else:
            return None
        if top == [head]:
            value = [sympy.Symbol(wrt)]
        elif top[0] == head or mark == "d" and top[0][0] == "diff":
            try:
                value = parse_latex(self.text[self.starts[first] : self.starts[self.i - 1]][len(mark) :])
            except LatexError as e:
                raise _Unreadable(f"after the {mark} on top: {e}") from None
            if not value:
                return None
            value = sympy.Derivative(value, sympy.Symbol(wrt))
        else:
            return None
        self.i += width
        return value

    def _frac_argument(self):
        return self.braced() if self.kind() == "{" else sympy.Number(self.take("digit")[1])

    # func := function (sub/superscript) ("(" expr ")" | mp_nofunc) | (letter | symbol) ... "(" args ")"
    #       | \sqrt ("[" expr "]")? "{" expr "}" | \overline "{" expr "}" | \int ... | \sum ... | \prod ... | \lim ...
    def func(self):
        kind, text = self.peek()
        if kind == "cmd" and text in _FUNCTIONS:
            return self.function()
        if kind == "cmd" and text in ("int", "sum", "prod", "lim"):
            return {"int": self.integral, "lim": self.limit}.get(text, self.big_operator)()
        if kind == "cmd" and text == "sqrt":
            self.take()
            index = None
            if self.kind() == "[":
                self.take()
                index = self.expr()
                self.take("]")
            radicand = self.braced()
            return sympy.root(radicand, index, evaluate=False) if index is not None else sympy.sqrt(
                radicand, evaluate=False)
        if kind == "cmd" and text == "overline":
            self.take()
            return sympy.conjugate(self.braced(), evaluate=False)
        if kind in ("letter", "symbol"):
            name = self.name()
            self.take("(")
            args = [self.expr()]
            while self.kind() == ",":
                self.take()
                args.append(self.expr())
            self.take(")")
            return sympy.Function(name)(*args)
        raise LatexError("not a function")


    def function(self):
        """A named function: \\log_2 8 is log(8, 2) although "2 8" could be one number (28): a bare number as a
        subscript or superscript gives back digits, from its last, until the argument after it parses."""
        name = self.take()[1]

        def scripts(limit):
            base, power, digits = self._scripts(limit)
            return (base, power), digits

        return self._shortening(scripts, lambda scripts: _apply_function(name, self._function_argument(), *scripts))

    def _shortening(self, read, rest):
        """read(limit) -> (parts, digits), then rest(parts). The grammar's number takes digits only while what
        follows can be read: when rest() cannot read (an error that another reading could avoid), the bare number
        read last, of `digits` digits, is read again one digit shorter (limit), from here, until rest() reads."""
        start, limit = self.i, None
        while True:
            self.i = start
            parts, digits = read(limit)
            try:
                return rest(parts)
            except _Unreadable:
                raise
            except LatexError:
                if digits <= 1:
                    raise
                limit = digits - 1

    def _scripts(self, limit):
        """A subscript (a logarithm's base) and a superscript (a power), in either order, each optional. -> (base,
        power, how many digits the last of them took when it was a bare number, else 0)."""
        base = power = None
        digits = 0
        for _ in range(2):
            if self.kind() not in ("_", "^") or (base if self.kind() == "_" else power) is not None:
                break
            is_base, start = self.take()[0] == "_", self.i
            value = self.braced() if self.kind() == "{" else self.atom(limit)
            bare = all(kind == "digit" for kind, _ in self.tokens[start : self.i])
            digits = self.i - start if bare else 0
            base, power = (value, power) if is_base else (base, value)
        return base, power, digits

    def _function_argument(self):
        if self.kind() == "(":
            self.take()
            arg = self.expr()
            while self.kind() == ",":  # \sin(1, 2): only the first argument counts
                self.take()
                self.expr()
            self.take(")")
            return arg
        return self.mp(nofunc=True)


def _apply_function(name, arg, base, power):
    """sympy's function of the parsed name: arc-names are a-names, logarithms take their base (ln and log: e,
    lg: 10), and a trigonometric or hyperbolic function to the power -1 is its inverse."""
    if name.startswith("arc"):
        value = getattr(sympy, "a" + name[3:])(arg, evaluate=False)
    elif name in ("arsinh", "arcosh", "artanh"):
        value = getattr(sympy, "a" + name[2:])(arg, evaluate=False)
    elif name in ("log", "lg", "ln"):
        value = sympy.log(arg, base if base is not None else 10 if name == "lg" else sympy.E, evaluate=False)
    elif name == "exp":
        value = sympy.exp(arg, evaluate=False)
    elif power == -1:
        return getattr(sympy, "a" + name)(arg, evaluate=False)
    else:
        value = getattr(sympy, name)(arg, evaluate=False)
    return _pow(value, power) if power else value


def _juxtaposed(factors):
    """Adjacent factors as one product, nested to the right: a b c is a * (b * c). A lone x between two factors
    without symbols is a multiplication sign, not a factor: 3 x 10^8 is 3 * 10^8. The operator [x] (\\frac{d}{dx})
    differentiates the product of the factors after it: 2 \\frac{d}{dx} x y is 2 * Derivative(x * y, x)."""
    if isinstance(factors[-1], list):
        raise _Unreadable("nothing to differentiate")
    value = factors[-1]
    for i in range(len(factors) - 2, -1, -1):
        f = factors[i]
        if isinstance(f, list):
            value = sympy.Derivative(value, *f)
        elif not (0 < i and str(f) == "x" and all(
                isinstance(g, sympy.Expr) and not g.atoms(sympy.Symbol) for g in (factors[i - 1], factors[i + 1]))):
            value = _mul(f, value)
    return value


def parse_latex(text: str):
    """An unevaluated sympy expression for a LaTeX answer; LatexError when it cannot be read (or is too big)."""
    if not isinstance(text, str) or not text.strip():
        raise LatexError("empty")
    if len(text) > MAX_CHARS:
        raise LatexError(f"longer than {MAX_CHARS} characters")
    try:
        return _Parser(text).relation()
    except LatexError:
        raise
    except Exception as e:  # a chained relation (1 < x < 2), nesting past Python's stack, or a tree sympy refuses
        raise LatexError(f"{type(e).__name__}: {e}") from None
