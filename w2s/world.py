"""The demo's miniature world: multi-step arithmetic word problems in GSM8K format, and the unlabeled text that
the tiny "weak" and "strong" base models are pretrained on (design and rationale: docs/DEMO_WORLD.md).

    problems = sample_problems(seed=0, n=100)             # structured Problems; .question, .solution(), .answer
    splits = make_splits(seed=0, n_train_1=500, n_train_2=500, n_test=200)   # {"train_1"|"train_2"|"test": records}
    docs = pretrain_corpus(seed=0, n=20_000, model="strong", exclude=questions_of(splits))
    train_world_tokenizer(docs, "out/tokenizer")          # tokenizer.json + tokenizer_config.json, numbers = 1 token
    python -m w2s.world OUT_DIR                           # writes all of the above as files

A record is {"id", "question", "answer"} exactly like a GSM8K line: "answer" is a worked solution with calculator
annotations ("5+3=<<5+3=8>>8") and a last line "#### N", so w2s.tasks.gsm8k loads and strips it like the real thing.
Every number is an integer and is computed from the structured Problem, never typed into a template by hand.

Test: python -m pytest -q tests/test_world.py
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from w2s.tasks.gsm8k import strip_calculator

# ----------------------------------------------------------------------------------------------------------------
# The problems
# ----------------------------------------------------------------------------------------------------------------

NAMES = (("Ann", "she"), ("Ben", "he"), ("Cara", "she"), ("Dan", "he"), ("Eva", "she"), ("Finn", "he"),
         ("Gia", "she"), ("Hal", "he"))
ITEMS = ("apples", "pens", "coins", "cards", "books", "eggs", "shells", "stamps")
# One sentence per step; several verbs per operation so that the model must read the verb, not its position.
STEP_TEMPLATES = {
    "+": ("{P} buys {n} more.", "{P} finds {n} more.", "{P} gets {n} more."),
    "-": ("{P} sells {n}.", "{P} gives away {n}.", "{P} loses {n}."),
    "*": ("{P} now has {n} times as many.",),
    "/": ("{P} keeps one of {n} equal piles.",),
}
OPS = tuple(STEP_TEMPLATES)


def apply_op(a: int, op: str, b: int) -> int:
    """The exact integer result of one step (division is always exact by construction)."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        if b == 0 or a % b:
            raise ValueError(f"apply_op: {a}/{b} is not an exact integer division")
        return a // b
    raise ValueError(f"apply_op: unknown operation {op!r}; expected one of {' '.join(OPS)}")


@dataclass(frozen=True)
class Difficulty:
    """How hard a problem is: its number of steps and the size of its numbers."""

    min_steps: int = 2
    max_steps: int = 3
    max_start: int = 20    # the starting amount is 1..max_start
    max_addend: int = 9    # amounts bought / sold are 1..max_addend
    max_factor: int = 3    # "times as many" and "equal piles" use 2..max_factor
    max_value: int = 40    # no amount, start to answer, ever exceeds this (a fact table a tiny model can learn)

    def __post_init__(self):
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"Difficulty: need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")
        if min(self.max_start, self.max_addend) < 1 or self.max_factor < 2 or self.max_value < self.max_start:
            raise ValueError(f"Difficulty: sizes out of range: {self}")


@dataclass(frozen=True)
class Step:
    op: str        # "+", "-", "*", "/"
    operand: int
    verb: int      # index into STEP_TEMPLATES[op]


@dataclass(frozen=True)
class Problem:
    """A chain: a person starts with `start` items and each step changes the amount; the answer is the last amount."""

    name: str
    pronoun: str
    item: str
    start: int
    steps: tuple[Step, ...]

    def amounts(self, arithmetic=apply_op) -> list[int]:
        """[start, after step 1, ..., after the last step]; `arithmetic` lets the weak corpus compute wrongly."""
        values = [self.start]
        for step in self.steps:
            values.append(arithmetic(values[-1], step.op, step.operand))
        return values

    @property
    def answer(self) -> int:
        return self.amounts()[-1]

    def sentences(self) -> list[str]:
        """The question's step sentences, one per step ("She buys 8 more.")."""
        subject = self.pronoun.capitalize()
        return [STEP_TEMPLATES[s.op][s.verb].format(P=subject, n=s.operand) for s in self.steps]

    @property
    def question(self) -> str:
        return " ".join([f"{self.name} has {self.start} {self.item}."] + self.sentences() +
                        [f"How many {self.item} now?"])

    def lines(self, arithmetic=apply_op, annotate: bool = False) -> list[str]:
        """One line per step: the step's sentence restated, then "a op b=c" chained from the previous result.

        Restating the sentence is what makes the work learnable by a tiny model: the next line's sentence is a
        plain continuation of the question text (copying that in-context induction does well), and the operand
        and the operation of the step are then a few tokens back instead of somewhere in the question."""
        values = self.amounts(arithmetic)
        out = []
        for i, (sentence, s) in enumerate(zip(self.sentences(), self.steps)):
            expression = f"{values[i]}{s.op}{s.operand}"
            note = f"<<{expression}={values[i + 1]}>>" if annotate else ""
            out.append(f"{sentence} {expression}={note}{values[i + 1]}")
        return out

    def solution(self, annotate: bool = True) -> str:
        """The GSM8K-style worked solution: "She buys 3 more. 5+3=<<5+3=8>>8" lines (annotations optional), then
        "#### N"."""
        return "\n".join(self.lines(annotate=annotate) + [f"#### {self.answer}"])


def sample_problem(rng: random.Random, difficulty: Difficulty = Difficulty()) -> Problem:
    """One random problem whose every amount stays in 0..max_value (operations that would leave it are redrawn)."""
    d = difficulty
    name, pronoun = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    start = rng.randint(1, d.max_start)
    amount, steps = start, []
    for _ in range(rng.randint(d.min_steps, d.max_steps)):
        # Only the operations that keep the amount an integer in range; "+" is always possible unless at the cap.
        candidates = []
        if amount < d.max_value:
            candidates.append(("+", rng.randint(1, min(d.max_addend, d.max_value - amount))))
        if amount >= 1:
            candidates.append(("-", rng.randint(1, min(d.max_addend, amount))))
        factors = [k for k in range(2, d.max_factor + 1) if 1 <= amount * k <= d.max_value]
        if factors:
            candidates.append(("*", rng.choice(factors)))
        divisors = [k for k in range(2, d.max_factor + 1) if amount % k == 0 and amount >= k]
        if divisors:
            candidates.append(("/", rng.choice(divisors)))
        op, operand = rng.choice(candidates)
        steps.append(Step(op, operand, rng.randrange(len(STEP_TEMPLATES[op]))))
        amount = apply_op(amount, op, operand)
    return Problem(name, pronoun, item, start, tuple(steps))


def sample_problems(seed: int, n: int, difficulty: Difficulty = Difficulty()) -> list[Problem]:
    """n problems with distinct question texts, reproducible from seed."""
    rng = random.Random(seed)
    problems, seen = [], set()
    attempts = 0
    while len(problems) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"sample_problems: could not find {n} distinct questions at {difficulty}")
        problem = sample_problem(rng, difficulty)
        if problem.question not in seen:
            seen.add(problem.question)
            problems.append(problem)
    return problems


def to_record(problem: Problem, record_id: str) -> dict:
    """A GSM8K-format line: {"id", "question", "answer" (worked solution with <<>> annotations, "#### N")}."""
    return {"id": record_id, "question": problem.question, "answer": problem.solution(annotate=True)}


SPLITS = ("train_1", "train_2", "test")


def make_split_problems(seed: int, n_train_1: int, n_train_2: int, n_test: int,
                        difficulty: Difficulty = Difficulty()) -> dict[str, list[Problem]]:
    """Disjoint splits: the problems are drawn distinct by question text, then cut in order (no text is shared)."""
    sizes = {"train_1": n_train_1, "train_2": n_train_2, "test": n_test}
    if min(sizes.values()) < 0:
        raise ValueError(f"make_splits: split sizes must be >= 0, got {sizes}")
    problems = sample_problems(seed, sum(sizes.values()), difficulty)
    out, begin = {}, 0
    for split in SPLITS:
        out[split] = problems[begin:begin + sizes[split]]
        begin += sizes[split]
    return out


def make_splits(seed: int, n_train_1: int, n_train_2: int, n_test: int,
                difficulty: Difficulty = Difficulty()) -> dict[str, list[dict]]:
    """{"train_1", "train_2", "test"} -> GSM8K-format records with ids "world-{split}-{index:05d}"."""
    problems = make_split_problems(seed, n_train_1, n_train_2, n_test, difficulty)
    return {split: [to_record(p, f"world-{split}-{i:05d}") for i, p in enumerate(ps)] for split, ps in problems.items()}


def questions_of(splits: dict[str, list[dict]]) -> set[str]:
    """Every question text of the splits: pass it as `exclude` so no pretraining document contains one."""
    return {record["question"] for records in splits.values() for record in records}


# ----------------------------------------------------------------------------------------------------------------
# The setting without gold: the world as an OlympicArena-style benchmark (docs/DEMO_WORLD.md, "make demo-olympic")
# ----------------------------------------------------------------------------------------------------------------


def linear(a: int, b: int) -> str:
    """a*x + b written as a model writes it: "x", "3x", "x+4", "3x+12"."""
    return ("x" if a == 1 else f"{a}x") + (f"+{b}" if b else "")


@dataclass(frozen=True)
class ExpressionProblem(Problem):
    """A chain that starts from an unknown amount x ("Ann has x apples."): the amount stays a*x + b, each step
    rewriting it. No division, so a and b stay whole; `start` is the letter "x"."""

    def amounts(self, arithmetic=apply_op) -> list[tuple[int, int]]:
        """[(a, b) of a*x + b]: (1, 0), then after each step; `arithmetic` as Problem.amounts."""
        values = [(1, 0)]
        for step in self.steps:
            a, b = values[-1]
            values.append((arithmetic(a, "*", step.operand), arithmetic(b, "*", step.operand)) if step.op == "*"
                          else (a, arithmetic(b, step.op, step.operand)))
        return values

    @property
    def answer(self) -> str:
        return linear(*self.amounts()[-1])

    def lines(self, arithmetic=apply_op, annotate: bool = False) -> list[str]:
        """One line per step, as Problem.lines: the sentence, then the rewrite ("2(x+3)=2x+6", "2x+6-4=2x+2")."""
        values, out = self.amounts(arithmetic), []
        for i, (sentence, s) in enumerate(zip(self.sentences(), self.steps)):
            before = linear(*values[i])
            expression = (f"{s.operand}({before})" if values[i][1] else f"{s.operand}*{before}") if s.op == "*" \
                else f"{before}{s.op}{s.operand}"
            out.append(f"{sentence} {expression}={linear(*values[i + 1])}")
        return out


def sample_expression_problem(rng: random.Random, difficulty: Difficulty = Difficulty()) -> ExpressionProblem:
    """One chain from x: "+" and "-" change b (kept in 0..max_value), "*" multiplies a (<= 9) and b."""
    d = difficulty
    name, pronoun = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    a, b, steps = 1, 0, []
    for _ in range(rng.randint(d.min_steps, d.max_steps)):
        candidates = []
        if b < d.max_value:
            candidates.append(("+", rng.randint(1, min(d.max_addend, d.max_value - b))))
        if b >= 1:
            candidates.append(("-", rng.randint(1, min(d.max_addend, b))))
        factors = [k for k in range(2, d.max_factor + 1) if a * k <= 9 and b * k <= d.max_value]
        if factors:
            candidates.append(("*", rng.choice(factors)))
        op, operand = rng.choice(candidates)
        steps.append(Step(op, operand, rng.randrange(len(STEP_TEMPLATES[op]))))
        a, b = (a * operand, b * operand) if op == "*" else (a, apply_op(b, op, operand))
    return ExpressionProblem(name, pronoun, item, "x", tuple(steps))


# The miniature's answer types (OlympicArena's names) and the instruction line each prompt opens with.
OLYMPIC_TYPES = {"NV": "Give a number.", "SC": "Give the letter of the right option.", "EX": "Give an expression in x."}
OPTION_DELTAS = (-10, -2, -1, 1, 2, 10)  # distractors of a single-choice question: near misses of the answer


def olympic_problem(problem: Problem, answer_type: str, rng: random.Random) -> tuple[str, list[str], str]:
    """(problem text, worked lines, gold answer) of a problem as one of the answer types. NV: the chain's number;
    SC: the letter of that number among four options (near misses, OPTION_DELTAS), written "23 (B)" so that the
    worked line naming the option ("Option: 23 (B)") copies what follows the number in the list; EX: the chain
    from x."""
    problem_text, lines, gold = problem.question, problem.lines(), str(problem.answer)
    if answer_type == "SC":
        wrong = [problem.answer + d for d in rng.sample(OPTION_DELTAS, len(OPTION_DELTAS)) if problem.answer + d >= 0]
        options = rng.sample([problem.answer] + wrong[:3], 4)
        gold = "ABCD"[options.index(problem.answer)]
        problem_text += "\nOptions: " + ", ".join(f"{value} ({letter})" for value, letter in zip(options, "ABCD"))
        lines = lines + [f"Option: {problem.answer} ({gold})"]
    return problem_text, lines, gold


BOXED_FINAL = "The final answer is $\\boxed{{{n}}}$"  # the last line OlympicArena's prompts ask for


def olympic_row(problem: Problem, answer_type: str, rng: random.Random, record_id: str) -> dict:
    """A row in OlympicArena's layout (the fields w2s/tasks/olympicarena.py reads), with its worked solution ending
    with BOXED_FINAL."""
    problem_text, lines, gold = olympic_problem(problem, answer_type, rng)
    solution = "\n".join(lines + [BOXED_FINAL.format(n=gold)])
    prompt = f"{OLYMPIC_TYPES[answer_type]}\n\nproblem:\n{problem_text}"  # the dataset layout
    return {"id": record_id, "problem": problem_text, "prompt": prompt,
            "answer": [gold], "solution": solution, "answer_type": answer_type, "unit": None, "answer_sequence": None,
            "type_sequence": None, "figure_urls": None, "test_cases": None, "subject": "Math", "language": "EN",
            "modality": "text-only"}


OLYMPIC_SPLITS = ("instruct", "train_2", "val")


def make_olympic_splits(seed: int, sizes: dict[str, int], difficulty: dict[str, Difficulty] | None = None,
                        exclude: set[str] | None = None) -> dict[str, list[dict]]:
    """{"instruct", "train_2", "val"} -> OlympicArena-layout rows, each split's rows a third of each answer type (in a
    seeded order). No question text is shared between splits or with `exclude` (the GSM8K demo data and the
    pretraining documents). difficulty: per split (default Difficulty()); "instruct" is the slice that makes the
    weak model an instruct model, docs/DEMO_WORLD.md."""
    rng, seen, out = random.Random(f"olympic-{seed}"), set(exclude or ()), {}
    for split in OLYMPIC_SPLITS:
        d = (difficulty or {}).get(split, Difficulty())
        types = [list(OLYMPIC_TYPES)[i % len(OLYMPIC_TYPES)] for i in range(sizes.get(split, 0))]
        rng.shuffle(types)
        rows = []
        for answer_type in types:
            for _ in range(1000):
                problem = (sample_expression_problem if answer_type == "EX" else sample_problem)(rng, d)
                if problem.question not in seen:
                    break
            else:
                raise ValueError(f"make_olympic_splits: no new {answer_type} question at {d}")
            seen.add(problem.question)
            rows.append(olympic_row(problem, answer_type, rng, f"World_{split}_{len(rows)}"))
        out[split] = rows
    return out


def without_gold(rows: list[dict]) -> list[dict]:
    """Rows as a train_2 file of the setting without gold ships them: no answer, no solution field at all."""
    return [{k: v for k, v in row.items() if k not in ("answer", "solution")} for row in rows]


# ----------------------------------------------------------------------------------------------------------------
# Pretraining corpora (why each choice: docs/DEMO_WORLD.md)
# ----------------------------------------------------------------------------------------------------------------

QUESTION_LABELS = ("Question", "Problem", "Task", "Exercise", "Puzzle")
SOLUTION_LABELS = ("Answer", "Solution", "Work", "Steps", "Reasoning")
FINAL_LINES = ("#### {n}", "Result: {n}", "Total: {n}", "The answer is {n}.")


@dataclass(frozen=True)
class CorpusSpec:
    """What one base model reads. Fractions are of documents; the rest of the documents are worked worksheets."""

    difficulty: Difficulty
    answer_key_fraction: float   # worksheets under other labels that give only the final number, no work
    qa_share: float              # worksheets labelled exactly "Question:" / "Answer:" (the pipeline's prompt)
    qa_worked_share: float       # of those, the share that is worked (the rest are answer keys)
    drill_fraction: float        # documents of bare arithmetic facts "17+8=25"
    fact_error_rate: float       # share of arithmetic facts this corpus always gets wrong (the same way)
    fixed_format: bool           # True: every worksheet is "Problem:/Solution:" ending "#### N"
    max_per_doc: int             # problems per worksheet: 1..max_per_doc


CORPUS_SPECS = {
    # Strong: the whole task range, correct arithmetic, many layouts. Under "Question:/Answer:" it has mostly seen
    # answer keys (a bare number), so zero-shot it answers without working; most worked solutions live under other
    # labels, every label pair appears in both modes and a worksheet never changes mode, so 4 worked
    # demonstrations in context switch it over.
    "strong": CorpusSpec(difficulty=Difficulty(min_steps=1, max_steps=3), answer_key_fraction=0.3, qa_share=0.25,
                         qa_worked_share=0.3, drill_fraction=0.25, fact_error_rate=0.0, fixed_format=False,
                         max_per_doc=4),
    # Weak: short chains of small numbers in one fixed layout, and a quarter of all arithmetic facts consistently
    # wrong (misconceptions, not noise: greedy decoding reproduces them, so its labels carry systematic errors).
    "weak": CorpusSpec(difficulty=Difficulty(min_steps=1, max_steps=2, max_start=12, max_addend=6, max_value=30),
                       answer_key_fraction=0.0, qa_share=0.0, qa_worked_share=0.0, drill_fraction=0.3,
                       fact_error_rate=0.25,
                       fixed_format=True, max_per_doc=3),
}


def _unit_hash(*parts) -> float:
    """A stable number in [0, 1) per key (Python's hash() is salted per process for strings)."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def misconceived_arithmetic(error_rate: float):
    """apply_op, except that a fixed `error_rate` share of facts (a, op, b) always gives the same wrong result."""
    deltas = (-10, -2, -1, 1, 2, 10)

    def arithmetic(a: int, op: str, b: int) -> int:
        # After an earlier wrong step the chain can leave the integers: floor the division, clip at zero.
        right = max(a // b if op == "/" else apply_op(a, op, b), 0)
        if _unit_hash("fact", a, op, b) >= error_rate:
            return right
        wrong = right + deltas[int(_unit_hash("delta", a, op, b) * len(deltas))]
        return wrong if wrong >= 0 else right + 1

    return arithmetic


def _worksheet(rng: random.Random, spec: CorpusSpec, exclude: set[str], arithmetic) -> str:
    """1..max_per_doc problems in ONE layout (labels, final line, worked or answer-only): layout is learnable in
    context, which is what lets 4 demonstrations override the model's default for a label pair."""
    if spec.fixed_format:
        q_label, s_label, final, worked = "Problem", "Solution", FINAL_LINES[0], True
    else:
        if rng.random() < spec.qa_share:
            # Under the prompt's own labels the default is a bare answer (greedy zero-shot gives one), but worked
            # Q/A worksheets exist too, and each keeps its layout: the in-context evidence 4 demos provide.
            q_label, s_label = "Question", "Answer"
            worked = rng.random() < spec.qa_worked_share
        else:
            # Other label pairs (never exactly Question/Answer): mostly worked.
            q_label, s_label = rng.choice([(q, a) for q in QUESTION_LABELS for a in SOLUTION_LABELS
                                           if (q, a) != ("Question", "Answer")])
            worked = rng.random() >= spec.answer_key_fraction
        final = rng.choice(FINAL_LINES)
    blocks = []
    for _ in range(rng.randint(1, spec.max_per_doc)):
        problem = sample_problem(rng, spec.difficulty)
        while problem.question in exclude:
            problem = sample_problem(rng, spec.difficulty)
        result = problem.amounts(arithmetic)[-1]
        if worked:
            body = "\n".join(problem.lines(arithmetic) + [final.format(n=result)])
        else:
            body = str(result)
        blocks.append(f"{q_label}: {problem.question}\n{s_label}: {body}")
    return "\n\n".join(blocks)


def _drill(rng: random.Random, spec: CorpusSpec, arithmetic) -> str:
    """Bare facts "a op b=c" over the operand ranges of the corpus's difficulty, one per line."""
    d = spec.difficulty
    lines, count = [], rng.randint(8, 16)
    while len(lines) < count:
        a, op = rng.randint(0, d.max_value), rng.choice(OPS)
        b = rng.randint(1, d.max_addend) if op in "+-" else rng.randint(2, d.max_factor)
        in_range = {"+": a + b <= d.max_value, "-": b <= a, "*": a * b <= d.max_value, "/": a % b == 0}[op]
        if in_range:  # the same facts the problems can produce, so drills and worked steps teach one table
            lines.append(f"{a}{op}{b}={arithmetic(a, op, b)}")
    return "\n".join(lines)


def pretrain_corpus(seed: int, n: int, model: str = "strong", exclude: set[str] | None = None,
                    spec: CorpusSpec | None = None) -> list[str]:
    """n unlabeled documents of the world for the "weak" or "strong" base model (or a custom CorpusSpec).
    No problem whose question is in `exclude` (pass questions_of(splits)) appears in any document."""
    if spec is None:
        if model not in CORPUS_SPECS:
            raise ValueError(f"pretrain_corpus: unknown model {model!r}; expected one of {', '.join(CORPUS_SPECS)}")
        spec = CORPUS_SPECS[model]
    rng = random.Random(f"{model}-{seed}")
    exclude = exclude or set()
    arithmetic = misconceived_arithmetic(spec.fact_error_rate) if spec.fact_error_rate > 0 else apply_op
    return [_drill(rng, spec, arithmetic) if rng.random() < spec.drill_fraction
            else _worksheet(rng, spec, exclude, arithmetic) for _ in range(n)]


# The benchmark's own layout in the strong base's second reading: its share of the typed worksheets and the worked
# share of those (the strong corpus's Question/Answer worksheets are 25 % / 30 %; a shorter reading needs more).
OLYMPIC_LAYOUT_SHARE, OLYMPIC_LAYOUT_WORKED = 0.4, 0.4


def olympic_corpus(seed: int, n: int, exclude: set[str] | None = None, share: float = 0.75) -> list[str]:
    """n documents for the strong base's second reading in the setting without gold (docs/DEMO_WORLD.md): a `share`
    of worksheets of the three answer types, the rest more of the strong corpus (a fresh draw, so nothing is
    forgotten). The worksheets are built as the strong corpus's, one layout each: some in the benchmark's own
    prompt layout (OLYMPIC_LAYOUT_SHARE), mostly answer keys (the boxed last line alone: zero-shot, the habit), the
    rest under other label pairs, mostly worked,
    ending with one of FINAL_LINES or BOXED_FINAL (half of them). So the box, the options and the unknown x are
    things the strong base has read about (as Llama-3-70B has), and worked solutions in the prompt's layout are rare.
    Unlabeled text: no problem whose question is in `exclude` appears."""
    spec, exclude = CORPUS_SPECS["strong"], exclude or set()
    rng = random.Random(f"olympic-corpus-{seed}")
    pairs = [(q, a) for q in QUESTION_LABELS for a in SOLUTION_LABELS if (q, a) != ("Question", "Answer")]
    n_olympic = round(share * n)
    docs = pretrain_corpus(1000 + seed, n - n_olympic, "strong", exclude)
    for _ in range(n_olympic):
        answer_type, prompt_layout = rng.choice(tuple(OLYMPIC_TYPES)), rng.random() < OLYMPIC_LAYOUT_SHARE
        if prompt_layout:
            final, worked = BOXED_FINAL, rng.random() < OLYMPIC_LAYOUT_WORKED
        else:
            final = BOXED_FINAL if rng.random() < 0.5 else rng.choice(FINAL_LINES)
            worked, (q_label, s_label) = rng.random() >= spec.answer_key_fraction, rng.choice(pairs)
        blocks = []
        for _ in range(rng.randint(1, spec.max_per_doc)):
            draw = sample_expression_problem if answer_type == "EX" else sample_problem
            problem = draw(rng, spec.difficulty)
            while problem.question in exclude:
                problem = draw(rng, spec.difficulty)
            text, lines, gold = olympic_problem(problem, answer_type, rng)
            body = "\n".join((lines if worked else []) + [final.format(n=gold)])
            blocks.append(f"{OLYMPIC_TYPES[answer_type]}\n\nQuestion: {text}\n\nAnswer: {body}" if prompt_layout
                          else f"{q_label}: {text}\n{s_label}: {body if worked or final == BOXED_FINAL else gold}")
        docs.append(("\n\n\n" if prompt_layout else "\n\n").join(blocks))
    rng.shuffle(docs)
    return docs


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------

SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")


def train_world_tokenizer(texts, path: str | Path, vocab_size: int = 512, whole_numbers: int = 60):
    """Byte-level BPE in which digit runs are pre-tokens and every number 0..whole_numbers is one token.
    Writes path/tokenizer.json and path/tokenizer_config.json (BOS <s>, EOS </s>, pad <pad>, ids 0, 1, 2) so both
    w2s.load_tokenizer and transformers' AutoTokenizer load the directory. Returns the tokenizers.Tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise ValueError(f"train_world_tokenizer: vocab_size {vocab_size} < {len(alphabet) + len(SPECIAL_TOKENS)} "
                         f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    tokenizer = Tokenizer(models.BPE())
    # Digit runs first (a number is its own pre-token, so no merge can glue it to a word), then GPT-2 style
    # byte-level words. The world's numbers are frequent, so BPE merges each into ONE token: an arithmetic step
    # "17+8=25" is then a lookup over token embeddings, not a carry over digit strings (a tiny model learns it).
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=alphabet, show_progress=False)
    # Seed the merge counts with every number up to `whole_numbers`, so each becomes one token whatever the corpus
    # size (BPE merges the most frequent pairs first; these lines make the number merges frequent).
    numbers = " ".join(str(n) for n in range(10, whole_numbers + 1))
    tokenizer.train_from_iterator(list(texts) + [numbers] * 1000, trainer=trainer)
    bos, eos, pad = SPECIAL_TOKENS
    # Llama convention: BOS first. transformers reads it from the post-processor; w2s from add_bos_token.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "pad_token": pad,
              "add_bos_token": True, "add_eos_token": False, "model_max_length": 1024}
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return tokenizer


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------


def write_world(out_dir: str | Path, seed: int = 0, n_train_1: int = 1000, n_train_2: int = 1000, n_test: int = 300,
                n_docs: dict[str, int] | None = None) -> Path:
    """out_dir/{train_1,train_2,test}.jsonl, out_dir/pretrain_{weak,strong}.jsonl ({"text"} per line) and
    out_dir/tokenizer/ trained on all of it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = make_splits(seed, n_train_1, n_train_2, n_test)
    exclude = questions_of(splits)
    corpora = {model: pretrain_corpus(seed, count, model, exclude)
               for model, count in (n_docs or {"weak": 5000, "strong": 20000}).items()}
    for split, records in splits.items():
        _write_jsonl(out_dir / f"{split}.jsonl", records)
    for model, docs in corpora.items():
        _write_jsonl(out_dir / f"pretrain_{model}.jsonl", [{"text": doc} for doc in docs])
    # The tokenizer sees the prompt format too (gold solutions), so "Question"/"Answer"/"####" are single tokens.
    sft_texts = [f"Question: {r['question']}\nAnswer: {strip_calculator(r['answer'])}"
                 for records in splits.values() for r in records]
    train_world_tokenizer([doc for docs in corpora.values() for doc in docs] + sft_texts, out_dir / "tokenizer")
    return out_dir


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m w2s.world OUT_DIR")
    print(write_world(sys.argv[1]))
