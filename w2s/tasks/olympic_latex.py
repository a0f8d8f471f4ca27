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
Not read (LatexError, which the judge counts as "cannot compare"): integrals, sums, products, limits, derivatives,
bras and kets, and |_{...} evaluation bars. Bounded: inputs over MAX_CHARS characters, exponents over MAX_EXPONENT and
factorials over MAX_FACTORIAL are refused (LatexError), since an exact sympy power of that size can hang past any
time limit.

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


class _Unreadable(LatexError):
    """A character no token reads, reached by the parser: an error however the parse could have gone."""


# ---------------------------------------------------------------------------------------------------- the lexer
# A token is (kind, text). Kinds: "digit", "letter", "diff" (d + a letter or command: one symbol), "cmd" (a command
# the grammar names), "symbol" (any other command), "quotes", and the punctuation itself for the rest.
_SKIPPED_COMMANDS = {
    "thinspace", "medspace", "thickspace", "quad", "qquad", "negthinspace", "negmedspace", "negthickspace", "left",
    "right", "vrule", "vcenter", "vbox", "vskip", "vspace", "hfil",
}  # fmt: skip
_SKIPPED_ESCAPES = set(",:;!*-./\"(=")  # \, \: \; \! spacing and the grammar's ignored \* \- \. \/ \" \( \=
_FUNCTIONS = {
    "exp", "log", "lg", "ln", "sin", "cos", "tan", "csc", "sec", "cot", "arcsin", "arccos", "arctan", "arccsc",
    "arcsec", "arccot", "sinh", "cosh", "tanh", "arsinh", "arcosh", "artanh",
}  # fmt: skip
_RELATIONS = {"=": sympy.Eq, "<": sympy.StrictLessThan, ">": sympy.StrictGreaterThan, "\\neq": sympy.Ne}
_RELATIONS.update(dict.fromkeys(("\\leq", "\\le", "\\leqq", "\\leqslant"), sympy.LessThan))
_RELATIONS.update(dict.fromkeys(("\\geq", "\\ge", "\\geqq", "\\geqslant"), sympy.GreaterThan))
_GRAMMAR_COMMANDS = _FUNCTIONS | {
    "lim", "to", "rightarrow", "Rightarrow", "longrightarrow", "Longrightarrow", "int", "sum", "prod", "lfloor",
    "rfloor", "lceil", "rceil", "sqrt", "overline", "times", "cdot", "div", "frac", "dfrac", "tfrac", "binom",
    "dbinom", "tbinom", "mathit", "neq", "leq", "le", "leqq", "leqslant", "geq", "ge", "geqq", "geqslant", "langle",
    "rangle",
}  # fmt: skip
_PUNCTUATION = set("+-*/(){}[]|_^:!<>=,.")
_CLOSERS = {"(": ")", "[": "]", "{": "}", "\\{": "\\}"}  # a group's opening token -> its closing one
_COMMAND = re.compile(r"\\([A-Za-z]+)")
_DIFFERENTIAL = re.compile(r"d\s*([A-Za-z]|\\[A-Za-z]+)")


def _tokenize(text: str):
    """The grammar's tokens, spacing dropped, one at a time: as in sympy's parser, a character no token reads is an
    error only once the parser looks that far ("A, B % C" reads as A; "2 %" is an error)."""
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch == "\\":
            token, i = _command_token(text, i)
            if token is not None:
                yield token
        elif ch == "d" and (m := _DIFFERENTIAL.match(text, i)):
            yield "diff", m.group(1).lstrip("\\")
            i = m.end()
        elif ch.isascii() and ch.isdigit():
            yield "digit", ch
            i += 1
        elif ch.isascii() and ch.isalpha():
            yield "letter", ch
            i += 1
        elif ch == "'":
            j = i
            while j < len(text) and text[j] == "'":
                j += 1
            yield "quotes", text[i:j]
            i = j
        elif ch == "&" and text[i + 1 : i + 2] == "=":  # "&=" (aligned equations) is "="
            i += 1
        elif ch == "=" and text[i + 1 : i + 2] == "&":
            yield "=", "="
            i += 2
        elif ch in _PUNCTUATION:
            yield ch, ch
            i += 1
        else:
            raise _Unreadable(f"cannot read {text[i : i + 20]!r}")


def _command_token(text: str, i: int):
    """The command at text[i] == "\\": -> (its token, or None when it is spacing, and the index after it)."""
    m = _COMMAND.match(text, i)
    if m is None:
        escaped = text[i + 1 : i + 2]
        if escaped in ("{", "}"):
            return ("\\" + escaped, "\\" + escaped), i + 2
        if escaped not in _SKIPPED_ESCAPES or not escaped:
            raise _Unreadable(f"cannot read {text[i : i + 20]!r}")
        return None, i + 2
    name, end = m.group(1), m.end()
    if name in ("left", "right") and text[end : end + 1] == "|":  # \left| and \right| open a bra / ket
        return ("cmd", name + "|"), end + 1
    if name in _SKIPPED_COMMANDS:
        return None, end
    return ("cmd" if name in _GRAMMAR_COMMANDS else "symbol", name), end


# ---------------------------------------------------------------------------------------------------- the parser


def _mul(a, b):
    return sympy.Mul(a, b, evaluate=False)


def _pow(base, exponent):
    if exponent.is_Number and abs(exponent) > MAX_EXPONENT:
        raise LatexError("exponent too large to evaluate")
    return sympy.Pow(base, exponent, evaluate=False)


class _Parser:
    """One method per rule of the grammar. A repeated part (another term, factor, superscript or "!") is taken only
    when it parses whole; otherwise the parser stops before it and what is left is ignored."""

    def __init__(self, tokens):
        self.source, self.tokens, self.i = tokens, [], 0  # tokens: those read so far from the source
        self.memo = {}  # (rule, position) -> (value or LatexError, position after): each is parsed once

    def peek(self, ahead: int = 0) -> tuple[str, str]:
        j = self.i + ahead
        while len(self.tokens) <= j and (token := next(self.source, None)) is not None:
            self.tokens.append(token)
        return self.tokens[j] if j < len(self.tokens) else ("end", "")

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
        key = (rule.__name__, args, self.i)
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

    # postfix := exp "!"*
    def postfix(self, functions=True):
        value = self.exp(functions)
        while self.kind() == "!":
            self.take()
            if value.is_Integer and not 0 <= value <= MAX_FACTORIAL:
                raise LatexError("factorial of a large integer")
            value = sympy.factorial(value, evaluate=False)
        return value

    # exp := comp ("^" (atom | "{" expr "}") subexpr?)*
    def exp(self, functions=True):
        value = self.comp(functions)
        while self.kind() == "^" and (exponent := self.attempt(self._superscript)) is not None:
            value = _pow(value, exponent)
        return value

    def _superscript(self):
        self.take("^")
        exponent = self.braced() if self.kind() == "{" else self.atom()
        if self.kind() == "_":  # a subscript after a superscript is read and dropped
            self.subscript()
        return exponent

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
        if kind == "|":
            self.take()
            value = self.expr()
            self.take("|")
            return sympy.Abs(value, evaluate=False)
        if kind == "cmd" and text in ("lfloor", "lceil"):
            self.take()
            value = self.expr()
            self.take("cmd", "rfloor" if text == "lfloor" else "rceil")
            return (sympy.floor if text == "lfloor" else sympy.ceiling)(value, evaluate=False)
        if functions and (called := self.attempt(self.func)) is not None:
            return called
        return self.atom()

    # atom := (letter | symbol) subexpr? quotes? | number | diff | mathit | frac | binom
    def atom(self, digit_limit=None):
        kind, text = self.peek()
        if kind == "digit":
            return self.number(digit_limit)
        if kind in ("letter", "symbol"):
            return sympy.Symbol(self.name()) if kind == "letter" or text != "infty" else self._infinity()
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

    def _infinity(self):
        self.take()
        if self.kind() == "_":
            self.subscript()
        return sympy.oo

    def name(self):
        """A letter or command's symbol name: its subscript as "_{...}" and (letters only) its primes."""
        kind, name = self.take()
        quotes = self.take()[1] if self.kind() == "quotes" else ""
        if self.kind() == "_":
            name += "_{" + sympy.sstr(self.subscript()) + "}"
        if not quotes and self.kind() == "quotes":
            quotes = self.take()[1]
        return name + quotes if kind == "letter" else name

    def subscript(self):
        self.take("_")
        return self.braced() if self.kind() == "{" else self.atom()

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
        top_first = self.peek(1) if self.kind() == "{" else self.peek()
        top = self._frac_argument()
        if self._derivative_below(top_first):  # sympy's parser builds a derivative; w2s does not read them
            raise LatexError("derivatives are not read")
        bottom = self._frac_argument()
        inverse = _pow(bottom, sympy.Integer(-1))
        return inverse if top == 1 else _mul(top, inverse)

    def _derivative_below(self, top_first) -> bool:
        """Whether this \\frac is d.../d<x> or \\partial.../\\partial x (its denominator comes next)."""
        below = [self.peek(k) for k in range(4)]
        kinds = [kind for kind, _ in below]
        over_d = top_first == ("letter", "d") or top_first[0] == "diff"
        if kinds[:3] == ["{", "diff", "}"]:
            return over_d
        partial_below = kinds[:2] == ["{", "symbol"] and below[1][1] == "partial" and kinds[2:] in (
            ["letter", "}"], ["symbol", "}"])
        return partial_below and top_first == ("symbol", "partial")

    def _frac_argument(self):
        return self.braced() if self.kind() == "{" else sympy.Number(self.take("digit")[1])

    # func := function (sub/superscript) ("(" expr ")" | mp_nofunc) | (letter | symbol) ... "(" args ")"
    #       | \sqrt ("[" expr "]")? "{" expr "}" | \overline "{" expr "}"
    def func(self):
        kind, text = self.peek()
        if kind == "cmd" and text in _FUNCTIONS:
            return self.function()
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
        name, after_name, limit = self.take()[1], self.i, None
        while True:
            self.i = after_name
            base, power, digits = self._scripts(limit)
            try:
                return _apply_function(name, self._function_argument(), base, power)
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
    without symbols is a multiplication sign, not a factor: 3 x 10^8 is 3 * 10^8."""
    value = factors[-1]
    for i in range(len(factors) - 2, -1, -1):
        f = factors[i]
        if 0 < i and str(f) == "x" and not factors[i - 1].atoms(sympy.Symbol) and not factors[i + 1].atoms(
                sympy.Symbol):
            continue
        value = _mul(f, value)
    return value


def parse_latex(text: str):
    """An unevaluated sympy expression for a LaTeX answer; LatexError when it cannot be read (or is too big)."""
    if not isinstance(text, str) or not text.strip():
        raise LatexError("empty")
    if len(text) > MAX_CHARS:
        raise LatexError(f"longer than {MAX_CHARS} characters")
    try:
        return _Parser(_tokenize(text)).relation()
    except (TypeError, RecursionError) as e:  # a chained relation (1 < x < 2), or nesting past Python's stack
        raise LatexError(str(e)) from None
