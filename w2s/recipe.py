"""Experiment recipes: one TOML file says everything about a weak-to-strong run.

A recipe names the task and data, the weak and strong checkpoints, and the options of every stage. Everything
docs/PAPER.md marks unknown is an option here with a stated default. A recipe is validated completely (unknown keys,
missing files, impossible values) before any model is loaded, and every error names the recipe file and the key.

    [data]      task, train/test files, split sizes or a split file, seed, the grader; or, in the setting without
                gold (OlympicArena), train_2: the questions alone, no train file
    [models]    weak / strong checkpoint dirs, dtype, device, whether the weak model is prompted in its chat template
    [sampling]  max_new_tokens, batch size, cache length, chunked prefill for every generation stage
    [weak_sft] [strong_sft] [preference]   training options (w2s.train_config.TrainConfig fields)
    [grpo]      GRPO's training: TrainConfig fields and GRPOConfig's (group size, rollout tokens, reward, ...)
    [stage1]    rounds, round-2 init ("base" or "continue"), demos; the weak self-consistency filter (beyond the paper)
    [stage2]    samples, temperature, top_p, confidence thresholds, pairs per question, losses (pairs and/or GRPO),
                merged M_pro exports; iterative rounds, pair weighting and self-consistency pairs (beyond the paper)
    [eval]      pass@k samples, which baselines to run
    [logging]   report_to: experiment trackers of the training stages ("tensorboard" -> runs/<name>/tb/<stage>,
                "wandb"); not part of any stage's key, so turning them on reruns nothing

`validate_inputs(recipe)` then reads what the run will read, the way it will read it (every data record, both
checkpoints' configs, tokenizers and safetensors headers: w2s.checkpoint.validate_checkpoint), so a truncated shard
or a bad gold answer stops the run before its first stage with one line naming the file.

    python -c "from w2s.recipe import load_recipe; print(load_recipe('recipes/demo.toml'))"
"""

import dataclasses
import difflib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from w2s.losses import PREFERENCE_LOSSES, STAGE2_LOSSES, check_beta
from w2s.sampling import check_distribution
from w2s.stages.consistency import SFT_SETS
from w2s.stages.preference_pairs import PAIR_WEIGHTING
from w2s.tasks.graders import default_grader, is_available, task_graders
from w2s.tracking import check_trackers
from w2s.train_config import GRPOConfig, TrainConfig

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
    # The setting without gold (docs/PAPER.md, OlympicArena): a file of questions, used whole as train_2, instead of
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
    # false: the task's plain-text prompt, as the authors prompted Llama-3-8B-Instruct (docs/PAPER.md).
    weak_chat_template: bool = False


@dataclass
class SamplingOptions:
    max_new_tokens: int = 400  # PAPER: 1024 (GSM8K) / 2048 (MATH) for the 10-sample stage; greedy answers are short
    sample_max_new_tokens: int = 1024
    max_batch: int = 64
    cache_len: int = 0  # 0: prompt + max_new_tokens
    tp: int = 1  # tensor-parallel degree of the strong models' sampling stages under torchrun (8: 70B on 8x80 GB)
    weak_tp: int = 1  # the same for the weak model (a 2B model fits one GPU: data parallel beats an 8-way split)
    # > 0: chunked prefill, prompt tokens per decode step for the prompts entering freed slots (w2s/sampling_engine.py);
    # changes no sample, so no stage's key; 0 (off) until measured on a GPU (BENCHMARKS.md)
    prefill_chunk: int = 0


@dataclass
class Stage1Options:
    rounds: int = 2  # PAPER: 2 for GSM8K and OlympicArena, 1 for MATH
    round2_init: str = "base"  # "base": retrain from the strong base; "continue": continue the round-1 models
    n_demos: int = 4
    demo_seed: int = 42  # which weak responses become the ICL demos (the authors' seeded draw, docs/PAPER.md)
    # Beyond the paper (off by default; docs/PAPER.md): Shi et al. 2025's weak self-consistency filter.
    weak_self_consistency: int = 0  # k > 0: the weak model samples k answers per train_2 question (02_weak_samples)
    weak_min_confidence: float = 0.6  # ... and questions whose weak majority is below this leave the weak set
    weak_relabel: bool = False  # the round-1 weak-ft model's label (08_r2_labels_weak) replaces a dropped weak label


@dataclass
class Stage2Options:
    n_samples: int = 10
    temperature: float = 1.0
    top_p: float = 1.0
    min_confidence: float = 0.6
    flip_confidence: float = 0.8
    max_pairs: int = 1  # PAPER: 1 for GSM8K, up to 3 for MATH
    losses: list = field(default_factory=lambda: ["dpo", "orpo"])  # of losses.STAGE2_LOSSES ("grpo": no pairs)
    pair_seed: int = 0  # the RNG that picks the other side of each pair (per question, see preference_pairs.py)
    # losses whose M_pro is also written as a merged HF model (16_dpo/model/merged): the run's final models. A LoRA
    # stage's model/ is otherwise the adapter alone; merged, a 70B model is 138 GB on disk per loss. Not in any key:
    # changing it reruns nothing (merge a finished adapter with w2s.save_model(w2s.load_model(ADAPTER_DIR), OUT)).
    export_merged: list = field(default_factory=list)
    # Beyond the paper (off by default; docs/PAPER.md):
    start_from: str = "hybrid"  # M_plus, the model Stage II trains: the last Stage I round's hybrid-ft (the paper's),
    #                             or its "icl" or "weak" one
    rounds: int = 1  # > 1: Iterative RPO (Pang et al. 2024): Stage II again from each round's model, R rounds in all
    pair_weighting: str = "none"  # "margin": weight each pair's loss by its vote margin (ScPO, Prasad et al. 2025)
    self_consistency_pairs: bool = False  # most- vs least-voted pair for the questions the paper's rules skip (ScPO)


@dataclass
class EvalOptions:
    pass_k_samples: int = 0  # >0: sample this many test answers of M_plus and M_pro for pass@k (PAPER: 10)
    pass_k_temperature: float = 1.0  # PAPER: T = 1.0
    baselines: list = field(default_factory=lambda: ["full_weak_ft", "strong_icl", "ceiling"])


@dataclass
class LoggingOptions:
    report_to: list = field(default_factory=list)  # "tensorboard" and/or "wandb" (w2s/tracking.py)


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
    grpo: dict  # TrainConfig and GRPOConfig overrides (train_config(recipe, "grpo"), grpo_config(recipe))
    logging: LoggingOptions = field(default_factory=LoggingOptions)


SECTIONS = {"data": DataOptions, "models": ModelOptions, "sampling": SamplingOptions, "stage1": Stage1Options,
            "stage2": Stage2Options, "eval": EvalOptions, "logging": LoggingOptions}
TRAIN_SECTIONS = ("weak_sft", "strong_sft", "preference", "grpo")
BASELINES = ("full_weak_ft", "strong_icl", "ceiling")
GOLD_BASELINES = ("ceiling",)  # SFT on train_2 gold: none in the setting without gold


def _unknown_key(where, key, known):
    """The one line for a key a table does not have: a close spelling of one it has, or the sections that do have
    it (`beta` under [stage2] belongs in [preference]), then what the table takes."""
    hint = ""
    if close := difflib.get_close_matches(key, known, n=1):
        hint = f" (did you mean {close[0]!r}?)"
    elif homes := [f"[{name}]" for name, fields in _section_fields().items() if key in fields]:
        hint = f" (a key of {', '.join(homes)})"
    return ValueError(f"{where}: unknown key {key!r}{hint}; expected one of {', '.join(known)}")


def _section_fields():
    """{section: its keys} of every recipe table."""
    train = set(train_config_defaults()) - {"progress"}
    return {**{name: {f.name for f in dataclasses.fields(cls)} for name, cls in SECTIONS.items()},
            **{name: train | (set(GRPO_FIELDS) if name == "grpo" else set()) for name in TRAIN_SECTIONS}}


def _build(cls, values, where):
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a table of options, got {values!r}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in known:
            raise _unknown_key(where, key, list(known))
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
    """The resolved TrainConfig of a recipe section ([weak_sft], [strong_sft], [preference] or [grpo])."""
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in getattr(recipe, section).items()
              if k not in GRPO_FIELDS}
    return TrainConfig(**{**values, "progress": progress})


GRPO_FIELDS = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}


def grpo_config(recipe):
    """The resolved GRPOConfig of the recipe's [grpo] section (its GRPOConfig keys; the rest are TrainConfig's)."""
    return GRPOConfig(**{k: v for k, v in recipe.grpo.items() if k in GRPO_FIELDS})


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
            raise _unknown_key(path, key, sorted(allowed))
    sections = {name: _build(cls, raw.get(name, {}), f"{path}: [{name}]") for name, cls in SECTIONS.items()}
    train_defaults = train_config_defaults()
    train = {}
    for name in TRAIN_SECTIONS:
        values = raw.get(name, {})
        if not isinstance(values, dict):
            raise ValueError(f"{path}: [{name}]: expected a table of TrainConfig options, got {values!r}")
        own = GRPO_FIELDS if name == "grpo" else {}
        for key, value in values.items():
            if key in own:
                _check_train_value(key, value, own[key], f"{path}: [{name}]")
                continue
            if key not in train_defaults or key == "progress":
                raise _unknown_key(f"{path}: [{name}]", key, sorted((set(train_defaults) | set(own)) - {"progress"}))
            _check_train_value(key, value, train_defaults[key], f"{path}: [{name}]")
        train[name] = values
    if sections["data"].train_2 and "baselines" not in raw.get("eval", {}):
        sections["eval"].baselines = [b for b in BASELINES if b not in GOLD_BASELINES]  # none to compare against
    name = raw.get("name") or path.stem
    if not isinstance(name, str) or name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"{path}: name: expected the run's directory name under the runs directory (no '/'), got "
                         f"{name!r}")
    recipe = Recipe(name=name, path=str(path), **sections, **train)
    _resolve_paths(recipe, path.parent)
    _validate(recipe, path, check_files)
    return recipe


def _check_lora_continues(r, bad):
    """Stage II ([preference], and [grpo] when the run has it) trains M_plus's adapter further (w2s/lora.py
    prepare_lora): under LoRA in both sections the adapter's shape must be the same."""
    defaults = train_config_defaults()

    def value(section, key):
        v = getattr(r, section).get(key, defaults[key])
        return tuple(v) if isinstance(v, list) else v

    for section in ("preference", "grpo") if "grpo" in r.stage2.losses else ("preference",):
        if value("strong_sft", "lora_rank") is None or value(section, "lora_rank") is None:
            continue
        for key in ("lora_rank", "lora_alpha", "lora_targets"):
            if value("strong_sft", key) != value(section, key):
                bad(f"[{section}] {key}", f"{value(section, key)!r} differs from [strong_sft] {key} = "
                    f"{value('strong_sft', key)!r}; Stage II continues M_plus's LoRA adapter: its shape must be the "
                    f"same")


def check_data_sizes(recipe, train, test):
    """Refuse an empty train (or train_2) or test file, and an n_test or n_train_1 + n_train_2 past its file (the run
    would take fewer questions than the recipe says): one line naming the recipe key and the file. The dry run's
    estimate and the run's input check both call it."""
    d = recipe.data
    for key, path, records in (("train_2" if d.train_2 else "train", d.train_2 or d.train, train),
                               ("test", d.test, test)):
        if not records:
            raise ValueError(f"{recipe.path}: [data] {key}: {path} holds no records")
    if d.n_test > len(test):
        raise ValueError(f"{recipe.path}: [data] n_test = {d.n_test} but {d.test} has {len(test)} records")
    if not d.train_2 and not d.split_file:
        n1, n2 = split_sizes(d, len(train))
        if n1 + n2 > len(train):
            raise ValueError(f"{recipe.path}: [data] n_train_1 + n_train_2 = {n1} + {n2} but {d.train} has "
                             f"{len(train)} records")


def split_sizes(data, n_records):
    """(n_train_1, n_train_2) the data stage takes from a train file of n_records records without a split_file:
    [data] n_train_1 and n_train_2, each half of the file when 0 (train_2 gets the odd one)."""
    return data.n_train_1 or n_records // 2, data.n_train_2 or n_records - n_records // 2


def check_device(recipe):
    """Refuse a [models] device this machine lacks (cuda without CUDA, cuda:N past its GPUs) before a stage runs: the
    first stage would train on the CPU and fail only when it moves its model to the device."""
    import torch

    device = recipe.models.device
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise ValueError(f"{recipe.path}: [models] device = {device!r}, but CUDA is not available here (use \"cpu\" "
                         f"or \"auto\")")
    index = device.partition(":")[2] or "0"
    if not index.isdigit() or int(index) >= torch.cuda.device_count():
        raise ValueError(f"{recipe.path}: [models] device = {device!r}, but this machine has "
                         f"{torch.cuda.device_count()} CUDA device(s)")


def validate_inputs(recipe):
    """Read every input of a run as the run will (data records, the split file, both checkpoints' configs,
    tokenizers and safetensors headers): the first problem is one ValueError naming the recipe key and the file."""
    from w2s.checkpoint import validate_checkpoint
    from w2s.tasks import load_records, load_split

    d = recipe.data
    train = load_records(d.task, d.train_2 or d.train)  # the setting without gold: its questions file
    check_data_sizes(recipe, train, load_records(d.task, d.test))
    if d.split_file:
        load_split(d.split_file, train)
    for key in ("weak", "strong"):
        try:
            validate_checkpoint(getattr(recipe.models, key))
        except (ValueError, OSError) as e:
            raise ValueError(f"{recipe.path}: [models] {key}: {e}") from None


def _resolve_paths(recipe, base):
    def resolve(p):
        return str((base / p).resolve()) if p and not Path(p).is_absolute() else p

    d, m = recipe.data, recipe.models
    d.train, d.test, d.split_file, d.train_2 = resolve(d.train), resolve(d.test), resolve(d.split_file), \
        resolve(d.train_2)
    m.weak, m.strong = resolve(m.weak), resolve(m.strong)


def _validate_beyond(r, bad):
    """The options beyond the paper (docs/PAPER.md)."""
    s1, s2 = r.stage1, r.stage2
    if s1.weak_self_consistency < 0 or s1.weak_self_consistency == 1:
        bad("[stage1] weak_self_consistency", f"expected 0 (off) or k >= 2 samples, got {s1.weak_self_consistency}")
    if not 0 <= s1.weak_min_confidence <= 1:
        bad("[stage1] weak_min_confidence", f"expected 0 <= value <= 1, got {s1.weak_min_confidence}")
    if s1.weak_relabel and not s1.weak_self_consistency:
        bad("[stage1] weak_relabel", "relabels the questions the weak self-consistency filter drops: set "
                                     "weak_self_consistency = k too")
    if s2.rounds < 1:
        bad("[stage2] rounds", f"expected >= 1 (1: the paper's single round), got {s2.rounds}")
    if s2.rounds > 1 and not set(s2.losses) & set(PREFERENCE_LOSSES):
        bad("[stage2] rounds", f"iterates the pair losses ({', '.join(PREFERENCE_LOSSES)}); losses = {s2.losses} has "
                               f"none (GRPO samples on-policy at every step already)")
    if s2.start_from not in SFT_SETS:
        bad("[stage2] start_from", f"expected one of {', '.join(SFT_SETS)} (the last Stage I round's model trained "
                                   f"on that set), got {s2.start_from!r}")
    if s2.pair_weighting not in PAIR_WEIGHTING:
        bad("[stage2] pair_weighting", f"expected one of {', '.join(PAIR_WEIGHTING)}, got {s2.pair_weighting!r}")


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


def _validate_sampling(r, bad):
    """The values the sampling and preference stages need (each failed stages into the run): finite temperatures,
    top_p in (0, 1], a cache that holds the new tokens, DPO's / IPO's beta > 0."""
    for key, temperature, top_p in (("[stage2]", r.stage2.temperature, r.stage2.top_p),
                                    ("[eval] pass_k_temperature", r.eval.pass_k_temperature, 1.0)):
        try:
            check_distribution(temperature, top_p, top_k=0)
        except ValueError as e:
            bad(key, str(e))
    longest = max(r.sampling.max_new_tokens, r.sampling.sample_max_new_tokens)
    if r.sampling.cache_len < 0 or 0 < r.sampling.cache_len <= longest:
        bad("[sampling] cache_len", f"{r.sampling.cache_len} cannot hold a prompt and {longest} new tokens "
                                    f"(max_new_tokens, sample_max_new_tokens); 0 sizes the cache to fit")
    for loss in r.stage2.losses:
        try:
            check_beta(loss, r.preference.get("beta", train_config_defaults()["beta"]))
        except ValueError as e:
            bad("[preference] beta", str(e))


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
    _validate_beyond(r, bad)
    if not 0 <= r.stage2.min_confidence <= r.stage2.flip_confidence <= 1:
        bad("[stage2]", f"expected 0 <= min_confidence <= flip_confidence <= 1, got min_confidence = "
                        f"{r.stage2.min_confidence}, flip_confidence = {r.stage2.flip_confidence}")
    if r.stage2.n_samples < 1 or r.stage2.max_pairs < 1:
        bad("[stage2]", "n_samples and max_pairs must be >= 1")
    _validate_sampling(r, bad)
    for key, values in (("[stage2] losses", r.stage2.losses), ("[stage2] export_merged", r.stage2.export_merged),
                        ("[eval] baselines", r.eval.baselines)):  # a repeat would run (or list) the same stage twice
        if len(set(values)) < len(values):
            bad(key, f"lists {sorted({v for v in values if values.count(v) > 1})} more than once: {values}")
    for loss in r.stage2.losses:
        if loss not in STAGE2_LOSSES:
            bad("[stage2] losses", f"unknown loss {loss!r}; expected one of {', '.join(STAGE2_LOSSES)}")
    for loss in r.stage2.export_merged:
        if loss not in r.stage2.losses:
            bad("[stage2] export_merged", f"{loss!r} is not one of the run's losses ({', '.join(r.stage2.losses)})")
    _check_lora_continues(r, bad)
    for section in TRAIN_SECTIONS:  # TrainConfig's own checks (batch_size 0, adam_betas, ...), naming the section
        try:
            train_config(r, section, progress=False)
        except ValueError as e:
            bad(f"[{section}]", str(e))
    try:
        grpo_config(r)
    except ValueError as e:
        bad("[grpo]", str(e))
    for b in r.eval.baselines:
        if b not in BASELINES:
            bad("[eval] baselines", f"unknown baseline {b!r}; expected {', '.join(BASELINES)}")
    for key in ("max_new_tokens", "sample_max_new_tokens", "max_batch", "tp", "weak_tp"):
        if getattr(r.sampling, key) < 1:
            bad(f"[sampling] {key}", f"expected >= 1, got {getattr(r.sampling, key)}")
    if r.sampling.prefill_chunk < 0:
        bad("[sampling] prefill_chunk", f"expected >= 0 (0: off), got {r.sampling.prefill_chunk}")
    if r.stage1.n_demos < 1:
        bad("[stage1] n_demos", f"expected >= 1, got {r.stage1.n_demos}")
    if r.eval.pass_k_samples < 0:
        bad("[eval] pass_k_samples", f"expected >= 0 (0: no pass@k), got {r.eval.pass_k_samples}")
    if min(r.data.n_train_1, r.data.n_train_2, r.data.n_test) < 0:
        bad("[data]", "n_train_1, n_train_2 and n_test must be >= 0 (0: the default size)")
    if r.models.device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:(0|[1-9][0-9]*)", r.models.device):
        bad("[models] device", f"expected auto, cpu, cuda or cuda:N, got {r.models.device!r}")
    if r.models.dtype not in ("bfloat16", "float16", "float32"):
        bad("[models] dtype", f"expected bfloat16, float16 or float32, got {r.models.dtype!r}")
    check_trackers(r.logging.report_to, where=f"{path}: [logging] report_to")
    if not check_files:
        return
    train = ("[data] train_2", r.data.train_2) if r.data.train_2 else ("[data] train", r.data.train)
    for key, p in (train, ("[data] test", r.data.test)):
        if not p or not Path(p).is_file():
            bad(key, f"{f'file not found: {p}' if p else 'missing: the path of a jsonl file'} (`w2s data "
                     f"{r.data.task}` downloads the task's files, or says where to put them offline)")
    if r.data.split_file and not Path(r.data.split_file).is_file():
        bad("[data] split_file", f"file not found: {r.data.split_file}")
    for key, p in (("[models] weak", r.models.weak), ("[models] strong", r.models.strong)):
        if not p or not (Path(p) / "config.json").is_file():
            bad(key, f"{f'no checkpoint (config.json) at {p}' if p else 'missing: a checkpoint directory'} (the "
                     f"model's Hugging Face directory; a --dry-run needs only its config.json)")


SEED_LINE = re.compile(r"^(\s*\w*seed\s*=\s*)\d+", re.MULTILINE)  # seed, demo_seed, pair_seed (any section)
NAME_LINE = re.compile(r'^name\s*=\s*"([^"]+)"', re.MULTILINE)


def seeded_recipe(text, seed):
    """The recipe text (TOML) with every seed set to `seed` and the run name suffixed with -seed<seed>."""
    name = NAME_LINE.search(text)
    if name is None:
        raise ValueError('recipe has no top-level `name = "..."` line')
    text = SEED_LINE.sub(lambda m: f"{m.group(1)}{seed}", text)
    return NAME_LINE.sub(f'name = "{name.group(1)}-seed{seed}"', text, count=1)
