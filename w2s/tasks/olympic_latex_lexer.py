"""The tokens of sympy 1.12's LaTeX grammar (its LaTeX.g4), as w2s/tasks/olympic_latex.py's parser reads them, and
that parser's errors and size limits.

A token is (kind, text): "digit", "letter", "symbol" (a command that names a symbol: \\hbar), "cmd" (a command the
grammar knows: \\frac, \\int), "diff" (d followed by a letter: the differential dx), "quotes" (primes) or a
punctuation character. Spacing commands and spaces are dropped; tokens are made one at a time, so a character no token
reads is an error only once the parser looks that far, as in sympy's parser.

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
    """An error however the parse could have gone: a character no token reads, reached by the parser, or a tree
    sympy's parser refuses to build (it builds trees only once it has parsed, so no other reading is tried)."""


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
_APPROACH = {"to", "rightarrow", "Rightarrow", "longrightarrow", "Longrightarrow"}  # \lim_{x \to a}
_COMMAND = re.compile(r"\\([A-Za-z]+)")
_DIFFERENTIAL = re.compile(r"d\s*([A-Za-z]|\\[A-Za-z]+)")


def _tokenize(text: str):
    """The grammar's tokens, spacing dropped, one at a time, each with where it starts: as in sympy's parser, a
    character no token reads is an error only once the parser looks that far ("A, B % C" reads as A; "2 %" is an
    error)."""
    i = 0
    while i < len(text):
        start, ch = i, text[i]
        if ch.isspace():
            i += 1
        elif ch == "\\":
            token, i = _command_token(text, i)
            if token is not None:
                yield token, start
        elif ch == "d" and (m := _DIFFERENTIAL.match(text, i)):
            yield ("diff", m.group(1).lstrip("\\")), start
            i = m.end()
        elif ch.isascii() and ch.isdigit():
            yield ("digit", ch), start
            i += 1
        elif ch.isascii() and ch.isalpha():
            yield ("letter", ch), start
            i += 1
        elif ch == "'":
            j = i
            while j < len(text) and text[j] == "'":
                j += 1
            yield ("quotes", text[i:j]), start
            i = j
        elif ch == "&" and text[i + 1 : i + 2] == "=":  # "&=" (aligned equations) is "="
            i += 1
        elif ch == "=" and text[i + 1 : i + 2] == "&":
            yield ("=", "="), start
            i += 2
        elif ch in _PUNCTUATION:
            yield (ch, ch), start
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
    if name == "int" and text.startswith("\\limits", end):  # one token, as in the grammar
        end += len("\\limits")
    if name in ("left", "right") and text[end : end + 1] == "|":  # \left| and \right| open a bra / ket
        return ("cmd", name + "|"), end + 1
    if name in _SKIPPED_COMMANDS:
        return None, end
    return ("cmd" if name in _GRAMMAR_COMMANDS else "symbol", name), end
