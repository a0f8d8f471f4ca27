"""Experiment recipes: one TOML file says everything about a weak-to-strong run.

A recipe names the task and data, the weak and strong checkpoints, and the options of every stage. Everything PAPER.md
marks unknown is an option here with a stated default. A recipe is validated completely (unknown keys, missing
files, impossible values) before any model is loaded, and every error names the recipe file and the key.

    [data]      task, train/test files, split sizes or a split file, seed, the grader; or, in the setting without
                gold (OlympicArena), train_2: the questions alone, no train file
    [models]    weak / strong checkpoint dirs, dtype, device, whether the weak model is prompted in its chat template
    [sampling]  max_new_tokens, batch size, cache length for every generation stage
    [weak_sft] [strong_sft] [preference]   training options (w2s.train_config.TrainConfig fields)
    [stage1]    rounds, round-2 init ("base" or "continue"), which SFT sets to train
    [stage2]    samples, temperature, top_p, confidence thresholds, pairs per question, losses
    [eval]      pass@k samples, which baselines to run

    python -c "from w2s.recipe import load_recipe; print(load_recipe('recipes/gsm8k.toml'))"
"""

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from w2s.losses import PREFERENCE_LOSSES
from w2s.tasks.graders import default_grader, is_available, task_graders
from w2s.train_config import TrainConfig

GOLD_TASKS = ("gsm8k", "math")  # tasks with gold training data: a train file split into train_1 and train_2
TASKS = GOLD_TASKS + ("olympicarena",)  # OlympicArena has questions only: [data] train_2


@dataclass
class DataOptions:
    task: str = "gsm8k"
    train: str = ""  # jsonl with gold solutions; split into train_1 (weak SFT) and train_2 (strong, questions only)
    test: str = ""
    n_train_1: int = 0  # 0: half of the train file
    n_train_2: int = 0  # 0: the other half
    n_test: int = 0  # 0: the whole test file (smaller for quick runs)
    split_file: str = ""  # optional json {"train_1": [ids], "train_2": [ids]} instead of a seeded split
    # The setting without gold (PAPER.md, OlympicArena): a file of questions, used whole as train_2, instead of
    # `train`. No train_1 (the weak model is used as is), no gold of train_2 (no ceiling, no precision, no PGR).
    train_2: str = ""
    seed: int = 0
    grader: str = ""  # reads and compares answers for the filter, vote, pairs, headline; "": the task's ("paper")


@dataclass
class ModelOptions:
    weak: str = ""  # the weak base checkpoint (fine-tuned on train_1 gold by the first stage; as is with train_2)
    strong: str = ""  # the strong base checkpoint
    dtype: str = "bfloat16"
    device: str = "auto"  # auto: cuda if available, else cpu
    # A weak instruct model used as is may be prompted in its checkpoint's chat template (tokenizer_config.json);
    # false: the task's plain-text prompt, as the authors prompted Llama-3-8B-Instruct (PAPER.md).
    weak_chat_template: bool = False


@dataclass
class SamplingOptions:
    max_new_tokens: int = 400  # PAPER: 1024 (GSM8K) / 2048 (MATH) for the 10-sample stage; greedy answers are short
    sample_max_new_tokens: int = 1024
    max_batch: int = 64
    cache_len: int = 0  # 0: prompt + max_new_tokens
    tp: int = 1  # tensor-parallel degree of the strong models' sampling stages under torchrun (8: 70B on 8x80 GB)
    weak_tp: int = 1  # the same for the weak model (a 2B model fits one GPU: data parallel beats an 8-way split)


@dataclass
class Stage1Options:
    rounds: int = 2  # PAPER: 2 for GSM8K and OlympicArena, 1 for MATH
    round2_init: str = "base"  # "base": retrain from the strong base; "continue": continue the round-1 models
    n_demos: int = 4
    demo_seed: int = 0  # which weak responses become the ICL demos (seeded draw, PAPER.md)


@dataclass
class Stage2Options:
    n_samples: int = 10
    temperature: float = 1.0
    top_p: float = 1.0
    min_confidence: float = 0.6
    flip_confidence: float = 0.8
    max_pairs: int = 1  # PAPER: 1 for GSM8K, up to 3 for MATH
    losses: list = field(default_factory=lambda: ["dpo", "orpo"])
    pair_seed: int = 0  # the RNG that picks the other side of each pair (per question, see preference_pairs.py)


@dataclass
class EvalOptions:
    pass_k_samples: int = 0  # >0: sample this many test answers of M_plus and M_pro for pass@k (PAPER: 10)
    pass_k_temperature: float = 1.0  # PAPER: T = 1.0
    baselines: list = field(default_factory=lambda: ["full_weak_ft", "strong_icl", "ceiling"])


@dataclass
class Recipe:
    name: str
    path: str
    data: DataOptions
    models: ModelOptions
    sampling: SamplingOptions
    stage1: Stage1Options
    stage2: Stage2Options
    eval: EvalOptions
    weak_sft: dict  # TrainConfig overrides, validated against w2s.train_config.TrainConfig
    strong_sft: dict
    preference: dict


SECTIONS = {"data": DataOptions, "models": ModelOptions, "sampling": SamplingOptions, "stage1": Stage1Options,
            "stage2": Stage2Options, "eval": EvalOptions}
TRAIN_SECTIONS = ("weak_sft", "strong_sft", "preference")
BASELINES = ("full_weak_ft", "strong_icl", "ceiling")
GOLD_BASELINES = ("ceiling",)  # SFT on train_2 gold: none in the setting without gold


def _build(cls, values, where):
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a table of options, got {values!r}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in known:
            raise ValueError(f"{where}: unknown key {key!r}; expected one of {', '.join(known)}")
        default = getattr(cls(), key)
        if isinstance(default, bool) != isinstance(value, bool) or (
                not isinstance(value, type(default)) and not (isinstance(default, float) and isinstance(value, int))):
            raise ValueError(f"{where}.{key}: expected {type(default).__name__}, got {value!r}")
    return cls(**values)


def train_config_defaults():
    """{field: default} of w2s.train_config.TrainConfig: the schema of the [weak_sft] [strong_sft] [preference]
    sections."""
    return {f.name: getattr(TrainConfig(), f.name) for f in dataclasses.fields(TrainConfig)}


def train_config(recipe, section, progress=True):
    """The resolved TrainConfig of a recipe section ([weak_sft], [strong_sft] or [preference])."""
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in getattr(recipe, section).items()}
    return TrainConfig(**{**values, "progress": progress})


def _check_train_value(key, value, default, where):
    """A TOML value must fit the TrainConfig field: numbers for numbers, lists for tuples, a string for a string."""
    number = (int, float)
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(default, bool) and isinstance(value, bool)
    elif isinstance(default, tuple):
        ok = isinstance(value, list)
    elif isinstance(default, int):
        ok = isinstance(value, int)
    elif default is None or isinstance(default, float):
        ok = isinstance(value, number)  # None defaults: max_steps, clip, lora_rank all take a number
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ValueError(f"{where}.{key}: expected {type(default).__name__ if default is not None else 'a number'}, "
                         f"got {value!r}")
    if isinstance(value, number) and not isinstance(value, bool) and value < 0:
        raise ValueError(f"{where}.{key}: expected a value >= 0, got {value!r}")


def load_recipe(path, check_files=True):
    """Parse and validate a recipe; relative paths are resolved against the recipe's own directory."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: recipe file not found")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML ({e})") from None
    allowed = {"name", *SECTIONS, *TRAIN_SECTIONS}
    for key in raw:
        if key not in allowed:
            raise ValueError(f"{path}: unknown key {key!r}; expected one of {', '.join(sorted(allowed))}")
    sections = {name: _build(cls, raw.get(name, {}), f"{path}: [{name}]") for name, cls in SECTIONS.items()}
    train_defaults = train_config_defaults()
    train = {}
    for name in TRAIN_SECTIONS:
        values = raw.get(name, {})
        if not isinstance(values, dict):
            raise ValueError(f"{path}: [{name}]: expected a table of TrainConfig options, got {values!r}")
        for key, value in values.items():
            if key not in train_defaults or key == "progress":
                raise ValueError(f"{path}: [{name}] unknown key {key!r}; expected TrainConfig fields: "
                                 f"{', '.join(sorted(set(train_defaults) - {'progress'}))}")
            _check_train_value(key, value, train_defaults[key], f"{path}: [{name}]")
        train[name] = values
    if sections["data"].train_2 and "baselines" not in raw.get("eval", {}):
        sections["eval"].baselines = [b for b in BASELINES if b not in GOLD_BASELINES]  # none to compare against
    recipe = Recipe(name=raw.get("name") or path.stem, path=str(path), **sections, **train)
    _resolve_paths(recipe, path.parent)
    _validate(recipe, path, check_files)
    return recipe


def _resolve_paths(recipe, base):
    def resolve(p):
        return str((base / p).resolve()) if p and not Path(p).is_absolute() else p

    d, m = recipe.data, recipe.models
    d.train, d.test, d.split_file, d.train_2 = resolve(d.train), resolve(d.test), resolve(d.split_file), \
        resolve(d.train_2)
    m.weak, m.strong = resolve(m.weak), resolve(m.strong)


def _validate_gold(r, bad):
    """Where gold comes from: a train file split into train_1 and train_2 (GSM8K, MATH), or, in the setting without
    gold, [data] train_2 alone (OlympicArena: the weak model is used as is; nothing measures against gold)."""
    d = r.data
    if not d.train_2:
        if d.task not in GOLD_TASKS:
            bad("[data] train_2", f"the {d.task} task has no gold training data: give its questions as train_2 "
                                  f"(used whole, no train_1), not as train")
        if r.models.weak_chat_template:
            bad("[models] weak_chat_template", "only for a weak model used as is ([data] train_2): a weak model "
                                               "fine-tuned on train_1 learned the plain prompt")
        return
    if d.train:
        bad("[data] train_2", "give either train (split into train_1 and train_2) or train_2 (questions only, no "
                              "gold), not both")
    if d.split_file or d.n_train_1 or d.n_train_2:
        bad("[data] train_2", "is used whole, without a split: remove split_file, n_train_1 and n_train_2")
    if r.weak_sft:
        bad("[weak_sft]", "no weak SFT without train_1 ([data] train_2): the weak model is used as is; remove the "
                          "section")
    for b in r.eval.baselines:
        if b in GOLD_BASELINES:
            bad("[eval] baselines", f"{b!r} trains on train_2 gold, which a recipe with [data] train_2 does not have")


def _validate(r, path, check_files):
    def bad(key, msg):
        raise ValueError(f"{path}: {key}: {msg}")

    if r.data.task not in TASKS:
        bad("[data] task", f"expected one of {', '.join(GOLD_TASKS)}, got {r.data.task!r} (or olympicarena, whose "
                           f"questions come without gold: [data] train_2)")
    _validate_gold(r, bad)
    r.data.grader = r.data.grader or default_grader(r.data.task)
    if r.data.grader not in task_graders(r.data.task):
        bad("[data] grader", f"expected one of {', '.join(task_graders(r.data.task))}, got {r.data.grader!r}")
    if not is_available(r.data.grader):
        bad("[data] grader", f"{r.data.grader!r} needs the math-verify package: pip install math-verify")
    if r.stage1.rounds not in (1, 2):
        bad("[stage1] rounds", f"expected 1 or 2, got {r.stage1.rounds}")
    if r.stage1.round2_init not in ("base", "continue"):
        bad("[stage1] round2_init", f"expected 'base' or 'continue', got {r.stage1.round2_init!r}")
    if not 0 <= r.stage2.min_confidence <= r.stage2.flip_confidence <= 1:
        bad("[stage2]", "expected 0 <= min_confidence <= flip_confidence <= 1")
    if r.stage2.n_samples < 1 or r.stage2.max_pairs < 1:
        bad("[stage2]", "n_samples and max_pairs must be >= 1")
    for loss in r.stage2.losses:
        if loss not in PREFERENCE_LOSSES:
            bad("[stage2] losses", f"unknown loss {loss!r}; expected one of {', '.join(PREFERENCE_LOSSES)}")
    for b in r.eval.baselines:
        if b not in BASELINES:
            bad("[eval] baselines", f"unknown baseline {b!r}; expected {', '.join(BASELINES)}")
    for key in ("max_new_tokens", "sample_max_new_tokens", "max_batch", "tp", "weak_tp"):
        if getattr(r.sampling, key) < 1:
            bad(f"[sampling] {key}", f"expected >= 1, got {getattr(r.sampling, key)}")
    if r.stage1.n_demos < 1:
        bad("[stage1] n_demos", f"expected >= 1, got {r.stage1.n_demos}")
    if r.eval.pass_k_samples < 0:
        bad("[eval] pass_k_samples", f"expected >= 0 (0: no pass@k), got {r.eval.pass_k_samples}")
    if min(r.data.n_train_1, r.data.n_train_2, r.data.n_test) < 0:
        bad("[data]", "n_train_1, n_train_2 and n_test must be >= 0 (0: the default size)")
    if r.models.device not in ("auto", "cpu", "cuda") and not r.models.device.startswith("cuda:"):
        bad("[models] device", f"expected auto, cpu, cuda or cuda:N, got {r.models.device!r}")
    if r.models.dtype not in ("bfloat16", "float16", "float32"):
        bad("[models] dtype", f"expected bfloat16, float16 or float32, got {r.models.dtype!r}")
    if not check_files:
        return
    train = ("[data] train_2", r.data.train_2) if r.data.train_2 else ("[data] train", r.data.train)
    for key, p in (train, ("[data] test", r.data.test)):
        if not p or not Path(p).is_file():
            bad(key, f"file not found: {p or '(empty)'}")
    if r.data.split_file and not Path(r.data.split_file).is_file():
        bad("[data] split_file", f"file not found: {r.data.split_file}")
    for key, p in (("[models] weak", r.models.weak), ("[models] strong", r.models.strong)):
        if not p or not (Path(p) / "config.json").is_file():
            bad(key, f"no checkpoint (config.json) at {p or '(empty)'}")
