"""The weak-to-strong pipeline: the paper's stages as one table, and `run_pipeline`, which runs a recipe through it.

Each row of `build_stages` is one stage of docs/PAPER.md: its directory name (numbers are fixed, so names never
shift when a recipe turns stages off), its runner in w2s/runners.py with the arguments it gets, the stages whose
outputs it reads, and the options hashed into its key. w2s/engine.py runs the table: a stage whose key is
unchanged is skipped, a killed one resumes, a changed option reruns exactly what depends on it.

    00_data           split train into train_1 (gold, weak SFT) and train_2 (questions only)
    00_test           the test set (an input of the evaluations only)
    01_weak_sft       SFT the weak model on train_1 gold                                     -> weak model
    02_weak_labels    weak model, zero-shot greedy on train_2                                 -> D_weak
    03_icl_labels     strong base, 4-shot with weak demos, greedy on train_2                  -> D_icl
    04_r1_filter      final-answer consistency -> weak / icl / hybrid SFT sets
    05-07_r1_sft_*    SFT the strong base on each set                   -> M_weak-ft, M_icl-ft, M_hybrid-ft
    08-09_r2_labels_* round-1 weak-ft / icl-ft models relabel train_2 zero-shot
    10_r2_filter      consistency again
    11-13_r2_sft_*    SFT again (from base or continued)                     -> r2 hybrid = M_plus
                      ([stage2] start_from: the last round's icl-ft or weak-ft model instead)
    14_samples        M_plus: n samples per train_2 question at T=1 (14 and 15: when a pair loss is on)
    15_pairs          majority vote, confidence, preference pairs (weak response always one side)
    16_dpo, 17_orpo   preference optimization of M_plus (16_ipo on request)                   -> M_pro
    16_grpo           on request, instead of or beside the pairs: GRPO of M_plus on train_2 questions with the vote
                      reward (w2s/grpo.py); reads the weak labels, never train_2 gold
    18_full_weak_ft   baseline: SFT the strong base on all of D_weak
    19_ceiling        baseline: SFT the strong base on gold train_2
    20-30_eval_*      greedy test accuracy of every trained model (EVAL_NUMBERS; 35_eval_stage2_ipo on request)
    31_eval_strong_icl  baseline: the strong base, 4-shot with the same weak demos, on test
    32-34_passk_*     pass@k and maj@k of M_plus and M_pro from n samples at T=1 ([eval] pass_k_samples; 36: IPO's)

Beyond the paper (recipe options, off by default; docs/PAPER.md "Beyond the paper"). Each adds rows under fixed
numbers, so a run directory's names never shift; GRPO's evaluations are 41 and 42:

    02_weak_samples   [stage1] weak_self_consistency = k: the weak model's k samples per train_2 question; the
                      round-1 filter drops the questions whose weak majority is below weak_min_confidence, and the
                      pairs treat their weak label as absent (08_r2_labels_weak stands in under weak_relabel)
    37_round{r}_samples_{loss}, 38_round{r}_pairs_{loss}, 39_round{r}_{loss}, 40_eval_stage2_{loss}_round{r}
                      [stage2] rounds = R: Stage II again for r = 2..R, each round sampling from, voting with and
                      training (its reference = its starting weights) the previous round's model of that loss
    41_eval_stage2_grpo, 42_passk_stage2_grpo   the evaluations of 16_grpo's model

The setting without gold ([data] train_2, OlympicArena; docs/PAPER.md) runs the same table less the rows that need
gold: 00_data takes the questions file whole, there is no 01_weak_sft (02_weak_labels and 20_eval_weak_floor use the
recipe's weak checkpoint as is, in its chat template under [models] weak_chat_template), no 19_ceiling, and the
filters and pairs measure no precision.

Under torchrun every rank runs every stage (training is FSDP2-sharded, sampling splits prompts over ranks); only
rank 0 writes shared files.

    python scripts/pipeline.py recipes/gsm8k.toml          # or: torchrun --nproc_per_node=8 scripts/pipeline.py ...
    python -m pytest -q tests/test_pipeline.py tests/test_recipe.py
"""

import contextlib
import os
from dataclasses import asdict
from pathlib import Path

from w2s.checkpoint import identity_files
from w2s.engine import (
    STAGES_FILE,
    Context,
    Stage,
    reading_lock,
    run_lock,
    run_stages,
    table_keys,
    take_finished,
)
from w2s.files import sha256_file, stable_hash, write_json_atomic
from w2s.parallel import barrier, init_distributed, is_main
from w2s.recipe import check_device, grpo_config, load_recipe, train_config, validate_inputs
from w2s.report import report
from w2s.runners import (
    run_ceiling,
    run_data,
    run_eval,
    run_filter,
    run_full_weak_ft,
    run_grpo,
    run_labels,
    run_pairs,
    run_preference,
    run_samples,
    run_stage1_sft,
    run_test_set,
    run_weak_sft,
)
from w2s.stages.consistency import SFT_SETS
from w2s.tasks import strips_periods
from w2s.train_config import PREFERENCE_ONLY

KINDS = {run_data: "data", run_test_set: "data", run_weak_sft: "train", run_labels: "generate", run_filter: "filter",
         run_stage1_sft: "train", run_samples: "generate", run_pairs: "filter", run_preference: "train",
         run_full_weak_ft: "train", run_ceiling: "train", run_eval: "eval", run_grpo: "train"}
PREFERENCE_STAGES = {"dpo": "16_dpo", "orpo": "17_orpo", "ipo": "16_ipo"}  # one per losses.PREFERENCE_LOSSES
STAGE2_STAGES = {**PREFERENCE_STAGES, "grpo": "16_grpo"}  # one per losses.STAGE2_LOSSES
# Fixed numbers of the evaluations: 20-31 greedy test accuracy, 32-34 pass@k, 35-36 IPO's, 41-42 GRPO's.
EVAL_NUMBERS = {"weak_floor": 20, "full_weak_ft": 21, "stage1_r1_weak": 22, "stage1_r1_icl": 23,
                "stage1_r1_hybrid": 24, "stage1_r2_weak": 25, "stage1_r2_icl": 26, "stage1_r2_hybrid": 27,
                "stage2_dpo": 28, "stage2_orpo": 29, "ceiling": 30, "strong_icl": 31, "stage2_ipo": 35,
                "stage2_grpo": 41}
PASSK_NUMBERS = {"stage1_plus": 32, "stage2_dpo": 33, "stage2_orpo": 34, "stage2_ipo": 36, "stage2_grpo": 42}
# Stage II rounds 2..R ([stage2] rounds): one number per kind of row, the round and the loss in the name.
ROUND_NUMBERS = {"samples": 37, "pairs": 38, "train": 39, "eval": 40}


def stage(name, run, reads, options, when=True, **args):
    """One row of the table: None when `when` is false (the recipe turned the stage off)."""
    return Stage(name, run, reads, options, args, KINDS[run]) if when else None


def build_stages(recipe):
    """The paper as a table, in run order."""
    r, s1, losses, baselines = recipe, recipe.stage1, recipe.stage2.losses, recipe.eval.baselines
    two_rounds, weak_sc = s1.rounds == 2, s1.weak_self_consistency > 0
    weak_votes = ["02_weak_samples"] if weak_sc else []  # what the round-1 filter and the pairs also read
    m_plus = stage1_model(s1.rounds, r.stage2.start_from)  # the paper's: the last round's hybrid-ft
    zero_shot, few_shot, strong_sft = greedy_key(r, "zero_shot"), greedy_key(r, "few_shot"), strong_sft_key(r)
    pair_losses = [loss for loss in losses if loss in PREFERENCE_STAGES]  # GRPO alone needs no samples nor pairs
    # The setting without gold ([data] train_2, OlympicArena): no train_1, so the weak model is the recipe's
    # checkpoint as is (no 01_weak_sft), and nothing trains on or measures against train_2 gold (no 19_ceiling).
    gold = not r.data.train_2
    weak = "01_weak_sft" if gold else "weak"

    def sft_on_set(name, filter, sft_set, init="strong", when=True):  # init: the strong base or a round-1 model
        reads = [filter] + ([init] if init != "strong" else [])
        return stage(name, run_stage1_sft, reads, strong_sft(sft_set, init), when, filter=filter, sft_set=sft_set,
                     init=init)

    def r2_init(r1_stage):  # [stage1] round2_init: retrain from the base, or continue round 1's model of the set
        return r1_stage if s1.round2_init == "continue" else "strong"

    table = [
        # Stage 0: the weak supervisor
        stage("00_data", run_data, [], data_key(r)),
        stage("00_test", run_test_set, [], test_key(r)),
        stage("01_weak_sft", run_weak_sft, ["00_data"], sft_key(r, "weak_sft", r.models.weak), gold),
        stage("02_weak_labels", run_labels, ["00_data", *model_reads(weak)], zero_shot_key(r, weak), model=weak,
              prompt=prompt_kind(r, weak)),
        stage("02_weak_samples", run_samples, ["00_data", *model_reads(weak)],
              samples_key(r, s1.weak_self_consistency) | weak_id(r, weak), weak_sc, model=weak,
              n=s1.weak_self_consistency, prompt=prompt_kind(r, weak)),
        # Stage I, round 1: the strong base's 4-shot labels, final-answer consistency, SFT on three sets
        stage("03_icl_labels", run_labels, ["00_data", "02_weak_labels"], few_shot, model="strong",
              prompt="few_shot"),
        stage("04_r1_filter", run_filter, ["00_data", "02_weak_labels", "03_icl_labels"] + weak_votes,
              task_key(r) | weak_self_consistency_key(r), weak="02_weak_labels", other="03_icl_labels",
              **({"weak_samples": "02_weak_samples"} if weak_sc else {})),
        sft_on_set("05_r1_sft_weak", "04_r1_filter", "weak"),
        sft_on_set("06_r1_sft_icl", "04_r1_filter", "icl"),
        sft_on_set("07_r1_sft_hybrid", "04_r1_filter", "hybrid"),
        # Stage I, round 2: the round-1 weak-ft and icl-ft models relabel train_2; filter and SFT again -> M_plus
        stage("08_r2_labels_weak", run_labels, ["00_data", "05_r1_sft_weak"], zero_shot, two_rounds or s1.weak_relabel,
              model="05_r1_sft_weak", prompt="zero_shot"),
        stage("09_r2_labels_icl", run_labels, ["00_data", "06_r1_sft_icl"], zero_shot, two_rounds,
              model="06_r1_sft_icl", prompt="zero_shot"),
        stage("10_r2_filter", run_filter, ["00_data", "08_r2_labels_weak", "09_r2_labels_icl"], task_key(r),
              two_rounds, weak="08_r2_labels_weak", other="09_r2_labels_icl"),
        sft_on_set("11_r2_sft_weak", "10_r2_filter", "weak", r2_init("05_r1_sft_weak"), two_rounds),
        sft_on_set("12_r2_sft_icl", "10_r2_filter", "icl", r2_init("06_r1_sft_icl"), two_rounds),
        sft_on_set("13_r2_sft_hybrid", "10_r2_filter", "hybrid", r2_init("07_r1_sft_hybrid"), two_rounds),
        # Stage II: M_plus samples and votes; pairs against the weak labels; preference training -> M_pro
        stage("14_samples", run_samples, ["00_data", m_plus], samples_key(r), bool(pair_losses), model=m_plus),
        pairs_stage("15_pairs", r, "14_samples", when=bool(pair_losses)),
        *[stage(PREFERENCE_STAGES[loss], run_preference, ["15_pairs", m_plus], preference_key(r, loss),
                pairs="15_pairs", init=m_plus, loss=loss) for loss in pair_losses],
        *[row for loss in pair_losses for rnd in range(2, r.stage2.rounds + 1) for row in stage2_round(r, loss, rnd)],
        # GRPO: M_plus samples on-policy and learns from its own vote (the weak labels only for "vote_or_weak")
        stage("16_grpo", run_grpo, ["00_data", "02_weak_labels", m_plus], grpo_key(r), "grpo" in losses,
              init=m_plus),
        # Baselines: the strong base fine-tuned on every weak label, and on train_2 gold (the ceiling)
        stage("18_full_weak_ft", run_full_weak_ft, ["02_weak_labels"], strong_sft("all_weak_labels", None),
              "full_weak_ft" in baselines),
        stage("19_ceiling", run_ceiling, ["00_data"], strong_sft("train_2_gold", None),
              gold and "ceiling" in baselines),
    ]
    table = [row for row in table if row is not None]
    return table + evaluations(r, {row.name for row in table} | ({"weak"} if not gold else set()), m_plus)


def stage1_model(rnd, sft_set):
    """The stage of Stage I round rnd's model trained on sft_set ("weak", "icl", "hybrid"): 05-07 and 11-13."""
    return f"{(5, 11)[rnd - 1] + SFT_SETS.index(sft_set):02d}_r{rnd}_sft_{sft_set}"


def model_reads(model):
    """The stages a generation with `model` reads: its training stage; none for a recipe checkpoint."""
    return [] if model in ("weak", "strong") else [model]


def prompt_kind(recipe, model):
    """How a model is prompted zero-shot: the weak model used as is in its chat template when the recipe says so
    ([models] weak_chat_template), every other one with the task's plain-text prompt."""
    return "chat" if model == "weak" and recipe.models.weak_chat_template else "zero_shot"


def pairs_stage(name, recipe, samples, when=True):
    """A pairs row: the vote over `samples` against the weak labels (and, with the weak self-consistency filter on,
    its samples, and the stand-in labels of 08_r2_labels_weak under weak_relabel)."""
    s1, extra = recipe.stage1, {}
    reads = ["00_data", "02_weak_labels", samples]
    if s1.weak_self_consistency:
        reads.append("02_weak_samples")
        extra["weak_samples"] = "02_weak_samples"
        if s1.weak_relabel:
            reads.append("08_r2_labels_weak")
            extra["relabel"] = "08_r2_labels_weak"
    return stage(name, run_pairs, reads, pairs_key(recipe), when, samples=samples, **extra)


def round_model(loss, rnd):
    """The stage whose model is Stage II round `rnd`'s model of `loss` (round 1: the paper's 16_dpo / 17_orpo)."""
    return PREFERENCE_STAGES[loss] if rnd == 1 else f"{ROUND_NUMBERS['train']}_round{rnd}_{loss}"


def stage2_round(recipe, loss, rnd):
    """[stage2] rounds: Stage II round rnd >= 2 of `loss` (Pang et al. 2024's iteration): the previous round's model
    samples train_2, votes, pairs against the weak labels by the paper's rules, and is trained on them; the trainer
    computes the reference log-probs from the weights it starts from, i.e. the previous round's model."""
    previous, n = round_model(loss, rnd - 1), ROUND_NUMBERS
    samples, pairs = f"{n['samples']}_round{rnd}_samples_{loss}", f"{n['pairs']}_round{rnd}_pairs_{loss}"
    return [stage(samples, run_samples, ["00_data", previous], samples_key(recipe), model=previous),
            pairs_stage(pairs, recipe, samples),
            stage(round_model(loss, rnd), run_preference, [pairs, previous], preference_key(recipe, loss), pairs=pairs,
                  init=previous, loss=loss)]


def eval_methods(recipe):
    """(method name in the report, stage whose model it evaluates) for every greedy zero-shot evaluation; the weak
    model is the recipe's checkpoint itself ("weak") in the setting without gold."""
    methods = [("weak_floor", "weak" if recipe.data.train_2 else "01_weak_sft"), ("full_weak_ft", "18_full_weak_ft")]
    methods += [(f"stage1_r{rnd}_{s}", stage1_model(rnd, s)) for rnd in range(1, recipe.stage1.rounds + 1)
                for s in SFT_SETS]
    methods += [(f"stage2_{loss}", STAGE2_STAGES[loss]) for loss in recipe.stage2.losses]
    methods += [(f"stage2_{loss}_round{rnd}", round_model(loss, rnd)) for loss in recipe.stage2.losses
                if loss in PREFERENCE_STAGES for rnd in range(2, recipe.stage2.rounds + 1)]
    return methods + [("ceiling", "19_ceiling")]


def eval_number(method):
    """The fixed number of a greedy evaluation (Stage II rounds >= 2 share theirs)."""
    return ROUND_NUMBERS["eval"] if "_round" in method else EVAL_NUMBERS[method]


def evaluations(recipe, present, m_plus):
    """Greedy test accuracy of every trained model present, strong ICL, then pass@k of M_plus and M_pro, in the
    order of their fixed numbers."""
    evals = [stage(f"{eval_number(method)}_eval_{method}", run_eval, ["00_test", *model_reads(model)],
                   zero_shot_key(recipe, model) | {"method": method}, model=model, prompt=prompt_kind(recipe, model))
             for method, model in eval_methods(recipe) if model in present]
    evals.append(stage(f"{EVAL_NUMBERS['strong_icl']}_eval_strong_icl", run_eval, ["00_test", "02_weak_labels"],
                       greedy_key(recipe, "few_shot") | {"method": "strong_icl"}, "strong_icl" in recipe.eval.baselines,
                       model="strong", prompt="few_shot"))
    if k := recipe.eval.pass_k_samples:
        for method, model in [("stage1_plus", m_plus)] + [(f"stage2_{x}", STAGE2_STAGES[x])
                                                           for x in recipe.stage2.losses]:
            evals.append(stage(f"{PASSK_NUMBERS[method]}_passk_{method}", run_eval, ["00_test", model],
                               passk_key(recipe), model=model, prompt="zero_shot", n=k,
                               temperature=recipe.eval.pass_k_temperature))
    return sorted((row for row in evals if row is not None), key=lambda row: int(row.name.split("_")[0]))


# ------------------------------------------------------------------------------------------------ the keys


def ckpt_fingerprint(path):
    """Identity of a checkpoint dir for stage keys: the names, sizes and mtimes of its weight, config and tokenizer
    files (cheap: no 140 GB hash); copying or rewriting a checkpoint reruns the stages that read it."""
    return stable_hash(identity_files(path))


# TrainConfig fields that change how a run goes, not what it produces: a run that finishes gives the same model
# whatever they are (bad_rows = "error" either stops the run or trains on exactly the rows "skip" keeps;
# export_merged adds a merged copy beside the adapter).
RUNTIME_ONLY = ("progress", "log_every", "activation_checkpointing", "cpu_offload", "ckpt_every", "resume", "bad_rows",
                "export_merged")
# The preference-only TrainConfig fields that preference_key adds to the stages they act on (the NLL weight to DPO /
# IPO when set, ORPO's NLL convention to ORPO), so SFT keys never see them. beta stays in every stage's key, SFT's
# included: removing it would change the keys of finished runs and rerun them.
KEYED_PER_LOSS = tuple(f for f in PREFERENCE_ONLY if f != "beta")


def train_options(recipe, section):
    """The options of a training stage as hashed into its key: the resolved TrainConfig minus the runtime-only
    fields, so turning on activation checkpointing after an out-of-memory error reruns nothing."""
    cfg = asdict(train_config(recipe, section, progress=False))
    return {k: v for k, v in cfg.items() if k not in RUNTIME_ONLY + KEYED_PER_LOSS}


def data_key(recipe):
    d = recipe.data
    if d.train_2:  # the setting without gold: the questions file, used whole
        return {"task": d.task, "train_2": sha256_file(d.train_2),
                "record_ids": "the row's id field, else its position"}
    return {"task": d.task, "train": sha256_file(d.train), "split": sha256_file(d.split_file) if d.split_file else None,
            "sizes": [d.n_train_1, d.n_train_2], "seed": d.seed,
            "record_ids": "the row's id field, else its position"}  # the GSM8K loader keeps ids of files that have them


def test_key(recipe):
    return {"task": recipe.data.task, "test": sha256_file(recipe.data.test), "n_test": recipe.data.n_test,
            "record_ids": "the row's id field, else its position"}


# Where the grader enters the keys. Generation never depends on it (labels.jsonl holds responses, not answers), and
# neither does the demo choice (the demos are the weak responses that contain the marker). The stages that compare
# answers do: the filters and the pairs, whose keys include it. An evaluation scores its responses under EVERY
# available grader and the report picks the recipe's, so its key leaves the grader out: changing the grader never
# resamples the test set.
def task_key(recipe):
    return {"task": recipe.data.task, "grader": recipe.data.grader}


def sft_key(recipe, section, base):
    return {"train": train_options(recipe, section), "base": ckpt_fingerprint(base), "dtype": recipe.models.dtype}


def strong_sft_key(recipe):
    """key(set, init) of a strong SFT stage: which set it trains on, and from which model ("strong" = the base)."""
    base = sft_key(recipe, "strong_sft", recipe.models.strong)

    def key(sft_set, init="strong"):
        return base | {"set": sft_set} | ({"init": "strong_base" if init == "strong" else init} if init else {})

    return key


def zero_shot_key(recipe, model):
    """Greedy zero-shot generation by `model` (weak_id: which weights and prompt when it is the weak checkpoint)."""
    return greedy_key(recipe, "zero_shot") | weak_id(recipe, model)


def weak_id(recipe, model):
    """The recipe's weak checkpoint used as is has no stage of its own whose key would say which weights: its
    fingerprint joins the key, and its prompt kind (plain or chat) replaces "zero_shot". {} for any other model."""
    if model != "weak":
        return {}
    return {"weak": ckpt_fingerprint(recipe.models.weak), "prompt": prompt_kind(recipe, model)}


def greedy_key(recipe, prompt):
    """Greedy generation on a task; few-shot prompts add the strong base and the demonstrations they are built of."""
    key = {"task": recipe.data.task, "n": 1, "temperature": 0.0, "max_new_tokens": recipe.sampling.max_new_tokens,
           "seed": recipe.data.seed, "cache_len": recipe.sampling.cache_len, "prompt": prompt,
           "dtype": recipe.models.dtype}
    if prompt == "few_shot":
        key |= {"strong": ckpt_fingerprint(recipe.models.strong), "n_demos": recipe.stage1.n_demos,
                "demo_seed": recipe.stage1.demo_seed,
                "demos": "all weak responses shuffled with demo_seed, the first n_demos that contain the marker"}
    return key | stored_key(recipe)


def stored_key(recipe):
    """How labels.jsonl keeps a completion (tasks.stored_response): GSM8K and MATH also lose '.' at both ends."""
    return {"stored": "strip, then '.' at both ends"} if strips_periods(recipe.data.task) else {}


def samples_key(recipe, n=None):
    """n samples per train_2 question (default [stage2] n_samples) at Stage II's temperature and top_p."""
    s2 = recipe.stage2
    return {"task": recipe.data.task, "n": n or s2.n_samples, "temperature": s2.temperature, "top_p": s2.top_p,
            "max_new_tokens": recipe.sampling.sample_max_new_tokens, "seed": recipe.data.seed,
            "cache_len": recipe.sampling.cache_len, "prompt": "zero_shot",
            "dtype": recipe.models.dtype} | stored_key(recipe)


def weak_self_consistency_key(recipe):
    """The weak self-consistency filter's options, only when it is on (off: the paper's keys, unchanged)."""
    s1 = recipe.stage1
    if not s1.weak_self_consistency:
        return {}
    return {"weak_self_consistency": s1.weak_self_consistency, "weak_min_confidence": s1.weak_min_confidence}


def pairs_key(recipe):
    s2 = recipe.stage2
    key = {"task": recipe.data.task, "grader": recipe.data.grader, "min_confidence": s2.min_confidence,
           "flip_confidence": s2.flip_confidence, "max_pairs": s2.max_pairs, "pair_seed": s2.pair_seed}
    key |= {"pair_weighting": s2.pair_weighting} if s2.pair_weighting != "none" else {}
    key |= {"self_consistency_pairs": True} if s2.self_consistency_pairs else {}
    return key | weak_self_consistency_key(recipe) | ({"weak_relabel": True} if recipe.stage1.weak_relabel else {})


def preference_key(recipe, loss):
    """The preference section's options, the loss and the dtype; ORPO's key names its NLL convention, DPO's and
    IPO's the NLL weight when one is set."""
    cfg = train_config(recipe, "preference", progress=False)
    extra = {"orpo_nll": cfg.orpo_nll} if loss == "orpo" else {"nll_weight": cfg.nll_weight} if cfg.nll_weight else {}
    return {"train": train_options(recipe, "preference"), "loss": loss, "dtype": recipe.models.dtype} | extra


def grpo_key(recipe):
    """GRPO's options: its training section, its own options, and the grader (it reads the rewards)."""
    return {"train": train_options(recipe, "grpo"), "grpo": asdict(grpo_config(recipe)), "task": recipe.data.task,
            "grader": recipe.data.grader, "dtype": recipe.models.dtype, "prompt": "zero_shot"}


def passk_key(recipe):
    return {"task": recipe.data.task, "n": recipe.eval.pass_k_samples, "temperature": recipe.eval.pass_k_temperature,
            "seed": recipe.data.seed, "max_new_tokens": recipe.sampling.sample_max_new_tokens,
            "cache_len": recipe.sampling.cache_len, "dtype": recipe.models.dtype}


# ------------------------------------------------------------------------------------------------ running a recipe


def check_reuse(reuse, run_dir):
    """--reuse names another run directory with finished stages."""
    if reuse is None:
        return
    if Path(reuse).resolve() == Path(run_dir).resolve():
        raise ValueError(f"--reuse {reuse}: that is this recipe's own run directory (give the recipe another name)")
    if not any(Path(reuse).glob("*/meta.json")):
        raise ValueError(f"--reuse {reuse}: not a run directory with finished stages (no */meta.json)")


def run_pipeline(recipe_path, runs_dir="runs", progress=True, log=print, plot=True, reuse=None):
    """Validate the recipe (before any model is loaded), run every stage not yet done, write the report.

    reuse: another run directory whose finished stages this run takes, hard-linked, where it would run them with the
    same key (engine.take_finished): a Stage II idea on the paper's Stage I without redoing it, in a run of its own.
    Returns (run dir, {stage: 'ran' | 'skipped'}, report text).
    """
    recipe = load_recipe(recipe_path)
    check_reuse(reuse, Path(runs_dir) / recipe.name)
    world = int(os.environ.get("WORLD_SIZE", 1))
    for key in ("tp", "weak_tp"):  # say so now, not after the first training stage
        tp = getattr(recipe.sampling, key)
        if world % tp:
            raise ValueError(f"{recipe_path}: [sampling] {key} = {tp} must divide the number of processes ({world}); "
                             f"launch with torchrun --nproc_per_node a multiple of it (make ... NPROC=N), or set "
                             f"{key} = 1")
    validate_inputs(recipe)  # data records and checkpoints (headers, tokenizer), read as the stages will read them
    check_device(recipe)
    if "WORLD_SIZE" in os.environ:  # torchrun: join the process group before the first collective (barrier)
        init_distributed()
    run_dir = Path(runs_dir) / recipe.name
    if is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    stages = build_stages(recipe)
    ctx = Context(recipe, run_dir, log=log if is_main() else (lambda *a: None), progress=progress and is_main())
    with run_lock(run_dir, log=ctx.log):
        if is_main():
            write_json_atomic(run_dir / "recipe.json", asdict(recipe))
            write_json_atomic(run_dir / STAGES_FILE, table_keys(stages))  # what the report counts as this run
        with reading_lock(reuse) if reuse is not None else contextlib.nullcontext():  # not while a run is there
            taken = take_finished(stages, reuse, run_dir)
        if taken:
            ctx.log(f"took {len(taken)} finished stage(s) from {reuse}: {', '.join(taken)}")
        status = run_stages(stages, ctx)
        text = report(run_dir, plot=plot) if is_main() else ""
    return run_dir, status, text
