"""The authors' answer protocol (docs/PAPER.md, "Answer extraction and comparison"), rule for rule: the `paper` grader;
and their draw of the few-shot demonstrations (docs/PAPER.md, "The few-shot demonstration rule").

Read off `src/inference.py`, `src/eval/evaluation.py`, `src/eval/math_normalization.py` and
`src/prompt/demonstrations.py` of GAIR-NLP/weak-to-strong-reasoning; written here from those rules, not copied.
Nothing in this file is lenient on purpose: its accuracies, kept fractions and pair counts are on the paper's scale.

    paper_extract(response, marker, stored=False)   the raw final answer of a model response ("" when none)
    minerva_normalize(answer)         the authors' Minerva-style normalizer, for prediction and gold alike
    draw_demos(records, eligible, k, seed)   the authors' draw of the few-shot demonstrations (all three tasks)

Comparison is exact equality of the normalized strings, and "" (no answer) equals nothing (w2s/tasks/graders.py).

Test: python -m pytest -q tests/test_graders.py
"""

from __future__ import annotations

import random
import re

# ----------------------------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------------------------

# "(.*)$" without re.MULTILINE: "." stops at a newline and "$" is the end of the text, so only a marker on the LAST
# line matches, a space must follow it, and with two markers there the capture starts after the first one.
_FALLBACK = re.compile(r"The answer is (.*)$")
_FIRST_NUMBER = re.compile(r"-?\d+\.?\d*")
_EOS_TEXT = "</s>"


def _last_line_capture(marker: str, text: str) -> str:
    return m.group(1) if (m := re.search(re.escape(marker) + r" (.*)$", text)) else ""


def paper_extract(response: str, marker: str, stored: bool = False) -> str:
    """The final answer of a model response under the authors' rules, before normalization ("" if none).

    1. strip whitespace, then "." at both ends: the inference script's cleaning when it saves a response, done once.
       A stored response (tasks.stored_response, which is that cleaning) is only stripped of whitespace, as the
       evaluation script reads a saved one: "#### 72. ." is saved as "#### 72. " and reads "72.", not "72";
    2. keep what precedes the first "Question" (a new example the model started), stripped again;
    3. "{marker} (.*)$" on the last line; failing that, "The answer is (.*)$" on the last line with commas deleted
       and only its first number kept (a trailing "." dropped); failing that, "" (no last-number fall-back);
    4. an answer containing "</s>" loses its last four characters (EOS printed as text).
    """
    text = response.strip() if stored else response.strip().strip(".")
    if "Question" in text:
        text = text.split("Question", 1)[0]
    text = text.strip()
    answer = _last_line_capture(marker, text)
    if answer == "":
        answer = _fallback(text)
    if _EOS_TEXT in answer:
        answer = answer[:-4]
    return answer


def _fallback(text: str) -> str:
    """'The answer is 42 apples because 3 + 4 = 7' -> '42': the first number after the phrase, on the last line."""
    m = _FALLBACK.search(text)
    numbers = _FIRST_NUMBER.findall(m.group(1).replace(",", "")) if m else []
    if not numbers:
        return ""
    return numbers[0][:-1] if numbers[0].endswith(".") else numbers[0]


# ----------------------------------------------------------------------------------------------------------------
# Normalization (the authors' adaptation of Lewkowycz et al.'s Minerva normalizer)
# ----------------------------------------------------------------------------------------------------------------

# Plain substring replacements, in this order (so "an " goes before "a ", and spaces go before "\text{m}").
_SUBSTITUTIONS = (
    ("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), ("\\%", "%"), (" ", ""), ("mbox", "text"),
    (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"),
)  # fmt: skip
# Deleted as plain substrings, in this order (so "feet" goes anywhere it occurs, even inside a word).
_REMOVED = (
    "square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units", "\\ldots", "sue",
    "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals", "edges",
    "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2", "\\text{}^3",
    "\\text{\n}", "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;", ",\\!", "{,}", '"', "\\dots",
)  # fmt: skip
# (pattern, replacement) applied with re.sub, in this order. `$...$`: the first pair on a line; \text, \textbf and
# \overline up to their FIRST "}"; \boxed up to its LAST "}"; then \fracab -> \frac{a}{b} and \sqrta -> \sqrt{a}.
_UNWRAP = (
    (r"(.*?)(\$)(.*?)(\$)(.*)", r"$\3$"),
    (r"(\\text\{)(.*?)(\})", r"\2"),
    (r"(\\textbf\{)(.*?)(\})", r"\2"),
    (r"(\\overline\{)(.*?)(\})", r"\2"),
    (r"(\\boxed\{)(.*)(\})", r"\2"),
    (r"(frac)([^{])(.)", r"frac{\2}{\3}"),
    (r"(sqrt)([^{])", r"sqrt{\2}"),
)
_CHOICES = ("a", "b", "c", "d", "e", "f", "g")


def minerva_normalize(answer: str) -> str:
    """The authors' normalizer: '\\$1,000' -> '1000', '\\boxed{\\frac12}' -> '\\frac{1}{2}', '3.00' -> '3',
    '50\\%' -> '50', 'B' -> 'b'; but '4.20' stays '4.20' and '-3.0' stays '-3.0' (str.isdigit rules, kept as is), and
    so does '1,000.' (the extraction strips a final '.' before it normalizes)."""
    s = str(answer).split("=")[-1]
    for old, new in _SUBSTITUTIONS:
        s = s.replace(old, new)
    for removed in _REMOVED:
        s = s.replace(removed, "")
    for pattern, replacement in _UNWRAP:
        s = re.sub(pattern, replacement, s)
    s = s.replace("$", "")
    if s.replace(",", "").isdigit():
        s = s.replace(",", "")
    for zeros in (".0", ".00"):
        if s.endswith(zeros) and s[: -len(zeros)].isdigit():
            s = s[: -len(zeros)]
    if s.endswith("%") and s[:-1].isdigit():
        s = s[:-1]
    if s.lower() in _CHOICES:
        s = s.lower()
    return s


def draw_demos(records: list, eligible, k: int, seed: int) -> list:
    """The authors' demonstration draw (`get_few_shot_prompts` in src/prompt/demonstrations.py of
    GAIR-NLP/weak-to-strong-reasoning): shuffle ALL the weak model's responses, in train_2 order, with Python's
    random.shuffle seeded `seed` (theirs: 42), then keep the first k for which `eligible(record)` holds, in shuffled
    order. On the authors' split and weak outputs it gives their released demonstrations (docs/PAPER.md). Fewer than k
    eligible: the caller's error."""
    order = list(records)
    random.Random(seed).shuffle(order)  # = random.seed(seed); random.shuffle(order)
    return [r for r in order if eligible(r)][:k]
