"""Tests of the demo's miniature world (w2s/world.py): answers correct by construction, checked by an independent
reader of the question text and of the worked solution; seeded reproducibility; disjoint splits; the two
pretraining corpora having the properties docs/DEMO_WORLD.md relies on; the digit-level tokenizer.

Run: python -m pytest -q tests/test_world.py
"""

import re
from fractions import Fraction

import pytest

from w2s import world
from w2s.tasks import gsm8k
from w2s.tasks.grading import extract_answer

# An independent reading of the question text: sentence patterns -> exact rational arithmetic (no world code used).
_SENTENCE_RULES = (
    (re.compile(r"^(?:She|He) (?:buys|finds|gets) (\d+) more\.$"), lambda x, n: x + n),
    (re.compile(r"^(?:She|He) (?:sells|gives away|loses) (\d+)\.$"), lambda x, n: x - n),
    (re.compile(r"^(?:She|He) now has (\d+) times as many\.$"), lambda x, n: x * n),
    (re.compile(r"^(?:She|He) keeps one of (\d+) equal piles\.$"), lambda x, n: x / n),
)
_LINE = re.compile(r"^([A-Z][^.]*\.) (\d+)([-+*/])(\d+)=<<(\d+)([-+*/])(\d+)=(\d+)>>(\d+)$")


def read_question(question):
    """(amounts after each sentence, the operands, the step sentences) computed from the text alone, as Fractions."""
    sentences = re.findall(r"[^.?]+[.?]", question)
    start = re.fullmatch(r"(\w+) has (\d+) (\w+)\.", sentences[0].strip())
    assert start, f"unreadable opening: {sentences[0]!r}"
    assert sentences[-1].strip() == f"How many {start.group(3)} now?"
    amounts, operands, steps = [Fraction(int(start.group(2)))], [], [s.strip() for s in sentences[1:-1]]
    for sentence in steps:
        for pattern, rule in _SENTENCE_RULES:
            if match := pattern.match(sentence.strip()):
                operands.append(int(match.group(1)))
                amounts.append(rule(amounts[-1], Fraction(operands[-1])))
                break
        else:
            raise AssertionError(f"unreadable step: {sentence!r}")
    return amounts, operands, steps


def check_record(record, difficulty):
    amounts, operands, steps = read_question(record["question"])
    # Every amount is a whole number in range: the problem never asks for a fraction or a negative count.
    assert all(a.denominator == 1 and 0 <= a <= difficulty.max_value for a in amounts), record
    assert difficulty.min_steps <= len(operands) <= difficulty.max_steps
    *lines, final = record["answer"].split("\n")
    assert final == f"#### {int(amounts[-1])}"
    assert len(lines) == len(operands)
    for i, line in enumerate(lines):
        m = _LINE.match(line)
        assert m, f"line {line!r} is not 'Sentence. a op b=<<a op b=c>>c'"
        sentence, a, op, b, a2, op2, b2, c_note, c = m.groups()
        assert sentence == steps[i], f"line {i} restates {sentence!r}, the question's step is {steps[i]!r}"
        assert (a, op, b, c) == (a2, op2, b2, c_note), f"annotation disagrees with its line: {line!r}"
        # The chain: starts from the previous amount, uses the question's operand, lands on the next amount.
        assert int(a) == amounts[i] and int(b) == operands[i] and int(c) == amounts[i + 1], line
        assert Fraction(int(c)) == {"+": lambda: amounts[i] + int(b), "-": lambda: amounts[i] - int(b),
                                    "*": lambda: amounts[i] * int(b), "/": lambda: amounts[i] / int(b)}[op]()


@pytest.mark.parametrize("difficulty", [world.Difficulty(), world.Difficulty(min_steps=1, max_steps=6, max_value=50),
                                        world.Difficulty(min_steps=3, max_steps=3, max_factor=6, max_value=200)])
def test_answers_correct_by_construction(difficulty):
    problems = world.sample_problems(seed=3, n=400, difficulty=difficulty)
    for i, problem in enumerate(problems):
        record = world.to_record(problem, f"r{i}")
        check_record(record, difficulty)
        assert record["answer"].endswith(f"#### {problem.answer}")
    ops_seen = {step.op for p in problems for step in p.steps}
    assert ops_seen == set("+-*/"), f"every operation should occur, saw {ops_seen}"


@pytest.mark.parametrize("sizes", [dict(min_steps=0), dict(min_steps=4, max_steps=3), dict(max_start=0),
                                   dict(max_addend=0), dict(max_factor=1), dict(max_start=20, max_value=19)])
def test_a_difficulty_out_of_range_is_refused(sizes):
    """Difficulty's rules: 1 <= min_steps <= max_steps, amounts of at least 1, factors of at least 2, and a cap no
    smaller than the starting amount (else a problem could start out of range)."""
    with pytest.raises(ValueError, match="Difficulty"):
        world.Difficulty(**sizes)
    world.Difficulty(min_steps=1, max_steps=1, max_start=20, max_addend=1, max_factor=2, max_value=20)  # the limits


def test_a_step_that_is_no_exact_integer_division_or_no_operation_is_refused():
    assert [world.apply_op(12, op, 3) for op in "+-*/"] == [15, 9, 36, 4]
    for a, op, b in ((7, "/", 2), (6, "/", 0), (6, "%", 4)):
        with pytest.raises(ValueError, match="apply_op"):
            world.apply_op(a, op, b)


def test_an_expression_chain_is_written_as_a_model_writes_it():
    """linear's documented forms, and a chain from x worked by hand: x+3, then 2(x+3)=2x+6, then 2x+6-4=2x+2."""
    assert [world.linear(1, 0), world.linear(3, 0), world.linear(1, 4), world.linear(3, 12)] == \
        ["x", "3x", "x+4", "3x+12"]
    steps = (world.Step("+", 3, 0), world.Step("*", 2, 0), world.Step("-", 4, 0))
    problem = world.ExpressionProblem("Ann", "she", "apples", "x", steps)
    assert problem.amounts() == [(1, 0), (1, 3), (2, 6), (2, 2)] and problem.answer == "2x+2"
    assert problem.lines() == ["She buys 3 more. x+3=x+3", "She now has 2 times as many. 2(x+3)=2x+6",
                               "She sells 4. 2x+6-4=2x+2"]
    doubled = world.ExpressionProblem("Ben", "he", "pens", "x", (world.Step("*", 3, 0),))
    assert doubled.lines() == ["He now has 3 times as many. 3*x=3x"]  # no parentheses around a bare x


def test_records_load_as_gsm8k(tmp_path):
    splits = world.make_splits(seed=0, n_train_1=20, n_train_2=20, n_test=20)
    world._write_jsonl(tmp_path / "test.jsonl", splits["test"])
    loaded = gsm8k.load(tmp_path / "test.jsonl")
    for record, row in zip(splits["test"], loaded, strict=True):
        gold = record["answer"].rsplit("#### ", 1)[1]
        assert row["answer"] == gold and extract_answer(row["solution"], "gsm8k") == gold
        assert "<<" not in row["solution"] and row["solution"].endswith(f"#### {gold}")


def test_seeded_reproducibility():
    args = dict(n_train_1=50, n_train_2=50, n_test=50)
    assert world.make_splits(seed=7, **args) == world.make_splits(seed=7, **args)
    assert world.make_splits(seed=7, **args)["test"] != world.make_splits(seed=8, **args)["test"]
    for model in ("weak", "strong"):
        assert world.pretrain_corpus(5, 50, model) == world.pretrain_corpus(5, 50, model)
        assert world.pretrain_corpus(5, 50, model) != world.pretrain_corpus(6, 50, model)


def test_splits_disjoint_and_corpus_excludes_them():
    splits = world.make_splits(seed=1, n_train_1=300, n_train_2=300, n_test=300)
    assert [len(splits[s]) for s in world.SPLITS] == [300, 300, 300]
    test_questions = {r["question"] for r in splits["test"]}
    for split in ("train_1", "train_2"):
        assert not test_questions & {r["question"] for r in splits[split]}
    all_questions = world.questions_of(splits)
    assert len(all_questions) == 900  # no question repeated within a split either
    ids = [r["id"] for s in world.SPLITS for r in splits[s]]
    assert len(set(ids)) == len(ids)
    for model in ("weak", "strong"):
        docs = world.pretrain_corpus(1, 500, model, exclude=all_questions)
        in_docs = {q for doc in docs for q in re.findall(r": ([A-Z][a-z]+ has [^\n]*now\?)", doc)}
        assert in_docs and not in_docs & all_questions


def _facts(docs):
    """Every "a op b=c" of the documents: drill lines and the end of worked lines."""
    return re.findall(r"(?:^|\. )(\d+)([-+*/])(\d+)=(\d+)$", "\n".join(docs), flags=re.M)


def test_strong_corpus_arithmetic_is_right_and_weak_is_consistently_wrong():
    exact = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__}
    strong = _facts(world.pretrain_corpus(0, 2000, "strong"))
    assert len(strong) > 5000 and all(exact[op](int(a), int(b)) == int(c) for a, op, b, c in strong)
    assert all(int(a) % int(b) == 0 for a, op, b, c in strong if op == "/")
    weak = _facts(world.pretrain_corpus(0, 2000, "weak"))
    wrong = [f for f in weak if exact[f[1]](int(f[0]), int(f[2])) != int(f[3])]
    rate = world.CORPUS_SPECS["weak"].fact_error_rate
    assert abs(len(wrong) / len(weak) - rate) < 0.05
    # Misconceptions, not noise: a fact the weak corpus states twice has the same result both times.
    said = {}
    for a, op, b, c in weak:
        assert said.setdefault((a, op, b), c) == c


def test_a_misconception_is_a_fixed_wrong_count_and_every_other_fact_is_exact():
    """misconceived_arithmetic at error rate 0 is exact arithmetic (division floored, a count clipped at 0) and at
    rate 1 wrong on every fact: always the same wrong result, and never a negative count."""
    exact = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__}
    right_only, wrong_only = world.misconceived_arithmetic(0.0), world.misconceived_arithmetic(1.0)
    for a in range(41):
        for op in "+-*/":
            for b in range(2 if op in "*/" else 1, 10):
                right = max(exact[op](a, b), 0)
                assert right_only(a, op, b) == right, (a, op, b)
                wrong = wrong_only(a, op, b)
                assert wrong != right and wrong >= 0 and wrong_only(a, op, b) == wrong, (a, op, b, wrong)


def test_strong_corpus_hides_worked_answers_behind_other_labels():
    """Zero-shot "Question:/Answer:" mostly continues with a bare number; worked solutions use other labels."""
    spec = world.CORPUS_SPECS["strong"]
    docs = world.pretrain_corpus(0, 3000, "strong")
    qa = re.findall(r"^Question: [^\n]*\nAnswer: ([^\n]*)", "\n".join(docs), flags=re.M)
    bare = sum(bool(re.fullmatch(r"\d+", answer)) for answer in qa)
    assert len(qa) > 100 and 0.5 < bare / len(qa) and abs(bare / len(qa) - (1 - spec.qa_worked_share)) < 0.07
    worked_markers = re.findall(r"^(\w+): [A-Z][^.\n]*\. \d+[-+*/]\d+=\d+$", "\n".join(docs), flags=re.M)
    # Under the other label pairs a worksheet is an answer key (bare numbers) with answer_key_fraction's odds.
    questions, answers = "|".join(world.QUESTION_LABELS), "|".join(world.SOLUTION_LABELS)
    other = [a for q, s, a in re.findall(rf"^({questions}): [^\n]*\n({answers}): ([^\n]*)", "\n".join(docs), re.M)
             if (q, s) != ("Question", "Answer")]
    keys = sum(bool(re.fullmatch(r"\d+", answer)) for answer in other)
    assert len(other) > 1000 and abs(keys / len(other) - spec.answer_key_fraction) < 0.07
    assert set(worked_markers) == set(world.SOLUTION_LABELS)
    assert "####" in "\n".join(docs) and "Problem:" in "\n".join(docs)
    # A worksheet never switches between worked and answer-only: the in-context regularity that 4 worked
    # demonstrations exploit.
    for doc in docs:
        modes = {bool(re.fullmatch(r"\d+", a)) for a in re.findall(r"^\w+: [A-Z][^\n]*\n\w+: ([^\n]*)", doc, re.M)}
        assert len(modes) <= 1, doc


def test_tokenizer_round_trip_and_whole_number_tokens(tmp_path):
    splits = world.make_splits(seed=2, n_train_1=100, n_train_2=0, n_test=100)
    texts = world.pretrain_corpus(2, 400, "strong") + world.pretrain_corpus(2, 200, "weak")
    texts += [f"Question: {r['question']}\nAnswer: {gsm8k.strip_calculator(r['answer'])}" for r in splits["train_1"]]
    tokenizer = world.train_world_tokenizer(texts, tmp_path / "tok", vocab_size=400)
    assert tokenizer.get_vocab_size() <= 400
    assert [tokenizer.token_to_id(t) for t in world.SPECIAL_TOKENS] == [0, 1, 2]
    held_out = [r["question"] + "\n" + r["answer"] for r in splits["test"]] + ["  odd   spacing\t9007 ü?"]
    for text in held_out:
        encoding = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(encoding.ids) == text
        for token in encoding.tokens:  # a token is all digits or has none: no merge glues a number to a word
            assert not re.search(r"\d", token) or re.fullmatch(r"\d+", token), f"token {token!r} mixes digits"
    # Every amount the task can produce is one token, so one arithmetic step is a lookup, not a carry.
    for n in range(61):  # whole_numbers=60 by default: each of 0..60 is one token, not only the task's 0..40
        assert tokenizer.encode(str(n), add_special_tokens=False).tokens == [str(n)], n
    assert len(tokenizer.encode("9007", add_special_tokens=False).tokens) > 1  # rare numbers still round-trip

    # 256 byte tokens and 3 special tokens need a vocabulary of at least 259
    with pytest.raises(ValueError, match="vocab_size 258 < 259"):
        world.train_world_tokenizer(["1+2=3"], tmp_path / "small", vocab_size=258)

    import w2s

    tok = w2s.load_tokenizer(tmp_path / "tok")
    ids = tok.encode(held_out[0])
    assert ids[0] == tok.bos_id == 0 and (tok.eos_id, tok.pad_id) == (1, 2)
    assert tok.decode(ids) == held_out[0]
