"""The runners of the paper's stages: each a small function `run_x(ctx, out, **args) -> counts for meta.json`.

A runner reads what earlier stages wrote (under ctx.run_dir), calls the pure stage logic (w2s/stages), the sampler
(w2s/sampling.py) or the trainer (w2s/train.py), and writes its artifacts into `out`. Which runner runs when, with
which arguments, is the table in w2s/pipeline.py; keys, skipping and meta.json are w2s/engine.py's.

A model argument names a checkpoint: "weak" or "strong" (the recipe's base checkpoints) or a stage whose model it
is (e.g. "01_weak_sft" -> runs/<name>/01_weak_sft/model).

Gold answers of train_2 live in 00_data/train_2_gold.jsonl. `read_train_2_gold` is the ONE function that opens it,
and only two kinds of caller use it: the selection-precision analysis of filtered sets and pairs (reported, never
trained on) and the strong-ceiling baseline (19_ceiling). tests/test_pipeline.py checks both facts. In the setting
without gold ([data] train_2, OlympicArena) the file does not exist: 00_data keeps the questions alone (gold fields
are dropped before a row is read), the filters and pairs skip the analysis, and there is no ceiling
(tests/test_nogold.py).

Prompts are the task's: "Question: ...\nAnswer:" for GSM8K and MATH, the dataset's own instruction prompt for
OlympicArena (w2s/tasks/olympicarena.py), each with its few-shot layout; a weak instruct model used as is may be
prompted in its chat template instead ("chat", [models] weak_chat_template).

Answers are read where they are compared (filter, pairs, evaluation) by the recipe's grader ([data] grader,
w2s/tasks/graders.py), never stored by a generation stage: sampling is grader-independent, and labels.jsonl keeps
the responses with a "truncated" flag (the response stopped at the token limit).

Weights stay resident between stages where that is free: a model just trained (or loaded for generation) is kept in
memory, so the next stage that generates with it does not reload it. Training always starts from a fresh load,
because the trainer consumes the model it is given.

A LoRA training stage's model/ is an adapter (PEFT layout, w2s/lora.py) pointing at its base checkpoint. A stage
that samples from it uses the base (resident, or loaded once and then resident) with the adapter merged into a
copy of the adapted matrices for the duration of the stage (w2s.lora.adapter_applied), so the base stays exact and
the next adapter on the same base (the round-2 labellers, the evaluations) is applied without rereading the base.
After a LoRA training stage sampled at tp 1 the resident model is the base itself, never merged weights, so a
stage sees the same weights whether the run went straight through or was resumed. A stage that trains from an
adapter (round2_init = "continue", Stage II from M_plus) continues training it (w2s/checkpoint.py
load_for_training): every model of a run is one adapter on the recipe's base.

    python -m pytest -q tests/test_pipeline.py
"""

import gc
import json
from dataclasses import replace
from pathlib import Path

import torch

from w2s.checkpoint import load_for_training, tokenizer_dir
from w2s.files import read_jsonl, require, write_json_atomic, write_jsonl_atomic
from w2s.grpo import train_grpo
from w2s.interchange import export_pairs, export_sft
from w2s.lora import adapter_applied, adapter_base_dir, read_adapter
from w2s.parallel import is_main
from w2s.profile import StageProfiler
from w2s.recipe import grpo_config, split_sizes, train_config
from w2s.sampling_jsonl import already_sampled, generate_to_jsonl
from w2s.stages.consistency import consistent, precision, self_consistent, sft_sets
from w2s.stages.metrics import evaluation_result, pair_precision
from w2s.stages.preference_pairs import build_pairs
from w2s.tasks import (
    STOP_STRINGS,
    few_shot_prompt,
    get_grader,
    load_records,
    load_split,
    olympicarena,
    save_split,
    select_demos,
    split_train,
    stored_response,
    zero_shot_prompt,
)
from w2s.tasks.graders import per_question
from w2s.tensor_parallel import adapter_for_rank, load_model_tp
from w2s.tokenizer import load_tokenizer
from w2s.train import train_preference, train_sft

GOLD_FILE = "train_2_gold.jsonl"  # analysis + ceiling only; see read_train_2_gold


# ------------------------------------------------------------------------------------------------ checkpoints


def checkpoint(ctx, model):
    """The checkpoint directory a model argument names: the recipe's "weak" / "strong" base, or a stage's model."""
    if model in ("weak", "strong"):
        return Path(getattr(ctx.recipe.models, model))
    return ctx.dir(model) / "model"


def _device_and_dtype(recipe):
    device = recipe.models.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return device, getattr(torch, recipe.models.dtype)


def sampling_tp(ctx, model_dir):
    """Tensor-parallel degree for sampling a checkpoint: [sampling] weak_tp for the weak model (stage 01's output,
    or the recipe's weak checkpoint used as is), tp for every strong one."""
    weak = {checkpoint(ctx, name).resolve() for name in ("01_weak_sft", "weak")}
    return ctx.recipe.sampling.weak_tp if Path(model_dir).resolve() in weak else ctx.recipe.sampling.tp


def drop_resident(ctx):
    """Free the resident model before loading another (a 70B checkpoint does not fit twice)."""
    ctx.resident = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_fresh(recipe, model_dir, tp):
    """(model, tokenizer) of a checkpoint dir for sampling, in the recipe's dtype on its device; with tp > 1 each
    rank reads only its tensor-parallel slice (groups of tp consecutive ranks; data parallel across groups)."""
    device, dtype = _device_and_dtype(recipe)
    return load_model_tp(model_dir, tp, dtype=dtype, device=device), load_tokenizer(model_dir)


def load_for_inference(ctx, model_dir):
    """(model, tokenizer, adapter or None) to sample the checkpoint in model_dir. The model is that checkpoint, or for
    an adapter directory its base (the caller applies the adapter, this rank's slice of it, around its sampling):
    the resident model when it is that checkpoint, else a fresh load that becomes the resident one."""
    model_dir = Path(model_dir).resolve()
    adapter = read_adapter(model_dir)
    weights_dir = str(adapter_base_dir(model_dir, adapter).resolve() if adapter is not None else model_dir)
    if ctx.resident is None or ctx.resident[0] != weights_dir:
        drop_resident(ctx)
        model, tok = load_fresh(ctx.recipe, weights_dir, sampling_tp(ctx, model_dir))
        ctx.resident = (weights_dir, model, tok)
    _, model, tok = ctx.resident
    return model, tok, adapter_for_rank(adapter, model)


def load_for_training_stage(recipe, model_dir):
    """(model, tokenizer) to hand to the trainer: rank 0 reads the weights into host memory in the recipe's dtype,
    other torchrun ranks build the model on the meta device and get their FSDP shards from rank 0."""
    return load_for_training(model_dir, dtype=_device_and_dtype(recipe)[1]), load_tokenizer(tokenizer_dir(model_dir))


def keep_resident(ctx, model_dir, model, tok):
    """A just-trained model (or, after LoRA, its base) stays resident as the checkpoint in model_dir, for the sampling
    stage that usually follows. Not when it is sampled tensor-parallel (model is None then): the trainer returns
    whole models, and the next stage reads its slices from disk."""
    if model is not None:
        ctx.resident = (str(Path(model_dir).resolve()), model.to(_device_and_dtype(ctx.recipe)[0]), tok)


# ------------------------------------------------------------------------------------------------ reading stages


def data_rows(ctx, name):
    """00_data's records: "train_1" (with gold) or "train_2" (questions only); "test": 00_test's."""
    return read_jsonl(ctx.dir("00_test" if name == "test" else "00_data") / f"{name}.jsonl")


def has_train_2_gold(ctx):
    """False in the setting without gold ([data] train_2): there is no train_2 gold to analyse against."""
    return not ctx.recipe.data.train_2


def load_questions(task, path):
    """The records of a train_2 file of the setting without gold, with no gold field: OlympicArena rows through the
    task's loader (which drops any answer before reading a row), GSM8K / MATH rows {"question"} (+ "id", else
    "<task>-train_2-<line index>")."""
    if task == olympicarena.NAME:
        records = olympicarena.load_questions(path)
    else:
        records = [{"id": str(row["id"]) if "id" in row else f"{task}-train_2-{i:05d}",
                    "question": require(row, "question", row["_where"])}
                   for i, row in enumerate(read_jsonl(path, tag_lines=True))]
    if len({r["id"] for r in records}) != len(records):
        raise ValueError(f"{path}: duplicate ids; ids must be unique")
    return records


def labels(ctx, stage):
    return read_jsonl(ctx.dir(stage) / "labels.jsonl")


def read_train_2_gold(ctx):
    """{id: {"answer", "solution"}} of train_2. The ONE reader of train_2 gold: its callers are the precision
    analysis (`gold_precision`, `run_pairs`) and the strong-ceiling rows (`run_ceiling`), nothing else."""
    return {row["id"]: row for row in read_jsonl(ctx.dir("00_data") / GOLD_FILE)}


def grader(ctx):
    """The recipe's grader ([data] grader): it reads and compares every answer the selection stages use."""
    return get_grader(ctx.recipe.data.task, ctx.recipe.data.grader)


def train_2_comparisons(ctx):
    """same_for(id) of the recipe's grader over train_2, with each question's record (questions only) bound."""
    return per_question(grader(ctx), {r["id"]: r for r in data_rows(ctx, "train_2")})


def with_answers(rows, grade):
    """Label rows with the answer `grade` (a grader) reads from each stored response (samples too); the rows are
    copied."""
    if rows and "samples" in rows[0]:
        return [row | {"samples": [s | {"answer": grade.answer(s["response"], stored=True)} for s in row["samples"]]}
                for row in rows]
    return [row | {"answer": grade.answer(row["response"], stored=True)} for row in rows]


def gold_precision(ctx, records):
    """Analysis only: the fraction of labelled records {"id", "answer"} whose answer is gold-correct."""
    gold = {i: grader(ctx).gold(g["answer"]) for i, g in read_train_2_gold(ctx).items()}
    return precision(records, gold, same_for=train_2_comparisons(ctx))


def task_prompt(task, rec):
    """A record's zero-shot prompt: OlympicArena's own (its instruction, "Question: ...", "Answer:"), else
    "Question: ...\nAnswer:" (docs/PAPER.md)."""
    return rec["prompt"] if task == olympicarena.NAME else zero_shot_prompt(rec["question"])


def zero_shot(ctx, rec):
    return task_prompt(ctx.recipe.data.task, rec)


def train_2_prompts(ctx):
    """{id: zero-shot prompt} of train_2: the prompt of every SFT row and pair built from a labelled response."""
    return {rec["id"]: zero_shot(ctx, rec) for rec in data_rows(ctx, "train_2")}


def with_prompts(rows, prompts):
    """SFT rows or pairs with their prompt replaced by the task's zero-shot prompt of their id (the stage functions
    write GSM8K's "Question: ...\nAnswer:", which is that prompt for GSM8K and MATH)."""
    return [row | {"prompt": prompts[row["id"]]} for row in rows]


def demos(ctx):
    """The ICL demonstrations: k weak responses on train_2 that contain the answer marker, seeded, never filtered
    for correctness nor by any grader (docs/PAPER.md). The same demos serve 03_icl_labels and the strong-ICL
    evaluation. OlympicArena's are {"prompt", "response"} (its own rule and layout, w2s/tasks/olympicarena.py)."""
    r = ctx.recipe
    weak = labels(ctx, "02_weak_labels")
    if r.data.task == olympicarena.NAME:
        return olympicarena.select_demos(weak, train_2_prompts(ctx), k=r.stage1.n_demos, seed=r.stage1.demo_seed)
    return select_demos(weak, r.data.task, k=r.stage1.n_demos, seed=r.stage1.demo_seed)


def chat_prompt(tok, text):
    """A zero-shot prompt in the checkpoint's chat template: the prompt without its closing "Answer:" cue is the
    user's message and the assistant's turn is opened. Token ids, BOS once whether or not the template writes it."""
    content = text.rsplit("Answer:", 1)[0].rstrip()
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": content}]), bos=False)
    return ids if not tok.add_bos or ids[:1] == [tok.bos_id] else [tok.bos_id] + ids


def prompt_fn(ctx, prompt, tok):
    """record -> prompt: "zero_shot"; "chat", the zero-shot prompt in the model's chat template (token ids); or
    "few_shot" with the weak demonstrations."""
    if prompt == "zero_shot":
        return lambda rec: zero_shot(ctx, rec)
    if prompt == "chat":
        return lambda rec: chat_prompt(tok, zero_shot(ctx, rec))
    shots = demos(ctx)
    if ctx.recipe.data.task == olympicarena.NAME:
        return lambda rec: olympicarena.few_shot_prompt(shots, rec)
    return lambda rec: few_shot_prompt(shots, rec["question"])


# ------------------------------------------------------------------------------------------------ the two model runs


def generate_stage(ctx, out, model_dir, records, prompt, n=1, temperature=0.0, top_p=1.0, max_new_tokens=None,
                   seed=0):
    """Generate for every record, stream to generations.jsonl (resumable), then write labels.jsonl.

    labels.jsonl rows: {"id", "question", "response", "truncated"} for n == 1, or {"id", "question", "samples":
    [{"response", "truncated"}, ...]} for n > 1; "truncated": the completion stopped at the token limit
    (finish_reason "length"). No answers: the stages that compare them read them with the recipe's grader.
    A response is the completion as tasks.stored_response keeps it: stripped of surrounding whitespace (the model
    continues "Answer:" with a space, and the trainer joins prompt + " " + response, so a kept space would teach a
    double one) and, for GSM8K and MATH, of "." at both ends, as the authors store it; the raw text stays in
    generations.jsonl. Returns (rows, counts for meta.json).
    """
    r = ctx.recipe
    model, tok, adapter = load_for_inference(ctx, model_dir)
    make_prompt = prompt_fn(ctx, prompt, tok)
    prompts = [{"id": rec["id"], "prompt": make_prompt(rec)} for rec in records]
    resumed = already_sampled(out / "generations.jsonl")  # a killed run's finished prompts: not this run's tokens
    if resumed:
        rest = "sampling the rest" if len(resumed) < len(prompts) else "nothing left to sample"
        ctx.log(f"{out.name}: {len(resumed)} of {len(prompts)} prompts sampled before the kill; {rest}")
    with StageProfiler(model.cfg, mode="inference", name=out.name) as prof, adapter_applied(model, adapter):
        path = generate_to_jsonl(model, tok, prompts, out / "generations.jsonl", n=n, temperature=temperature,
                                 top_p=top_p, max_new_tokens=max_new_tokens or r.sampling.max_new_tokens,
                                 stop=tuple(STOP_STRINGS), seed=seed, max_batch=r.sampling.max_batch,
                                 cache_len=r.sampling.cache_len or None, prefill_chunk=r.sampling.prefill_chunk,
                                 progress=ctx.progress)
        results = read_jsonl(path)
        prof.add_tokens(sum(c["num_tokens"] for res in results if json.dumps(res["id"]) not in resumed
                            for c in res["completions"]))
    rows = []
    for rec, res in zip(records, results, strict=True):
        if res["id"] != rec["id"]:
            raise RuntimeError(f"{path}: id {res['id']!r} where {rec['id']!r} was expected (sampler order)")
        samples = [{"response": stored_response(c["text"], r.data.task), "truncated": c["finish_reason"] == "length"}
                   for c in res["completions"]]
        rows.append({"id": rec["id"], "question": rec["question"], **samples[0]} if n == 1 else
                    {"id": rec["id"], "question": rec["question"], "samples": samples})
    if is_main():
        write_jsonl_atomic(out / "labels.jsonl", rows)
    reasons, cost = _finish_reasons(results), _cost(prof.cost())
    # as a training stage records it: tokens of the whole stage, run_tokens this call's (a resumed one's share)
    tokens = sum(c["num_tokens"] for res in results for c in res["completions"])
    counts = {"n_prompts": len(rows), "n_completions": len(rows) * n, "n_truncated": reasons.get("length", 0),
              "finish_reasons": reasons, "tp": getattr(model, "tp_size", 1), **cost, "tokens": tokens,
              "run_tokens": cost["tokens"], "resumed_prompts": len(resumed)}
    return rows, counts


def _finish_reasons(results):
    reasons = {}
    for res in results:
        for c in res["completions"]:
            reasons[c["finish_reason"]] = reasons.get(c["finish_reason"], 0) + 1
    return reasons


def _cost(cost):
    """A run's cost for meta.json, its own time as "run_s": the stage's "wall_s" is the engine's, load and export
    included."""
    return {("run_s" if k == "wall_s" else k): v for k, v in cost.items()}


def train_stage(ctx, out, base_dir, rows, section, loss=None, export_merged=False):
    """SFT (loss None) on rows {"prompt", "response"}, or preference training with `loss` on pairs {"prompt",
    "chosen", "rejected"}, of the checkpoint in base_dir -> out/model (HF format, or with LoRA the adapter pointing
    at its base, plus out/model/merged with export_merged; the trainer's metrics.jsonl and train_config.json; its
    resumable checkpoints in out/model/ckpt, deleted by the engine once the stage's meta.json is written). With
    [logging] report_to the records also go to the trackers, under runs/<name>/tb/<stage>."""
    if not rows:
        raise ValueError(f"{out.name}: the {'preference pair' if loss else 'SFT'} set is empty, nothing to train on "
                         f"(see the meta.json of the stage that built it, e.g. its kept/pairs counts)")
    if is_main():
        write_jsonl_atomic(out / "train.jsonl", rows)

    def train(model, tok, cfg, **options):
        if loss is None:
            return train_sft(model, tok, rows, cfg, **options)
        return train_preference(model, tok, rows, cfg, loss=loss, **options)

    return _cost(_train(ctx, out, base_dir, section, train, export_merged))


def _train(ctx, out, base_dir, section, train, export_merged=False):
    """Load base_dir for training, run train(model, tok, cfg, **options) -> (model, stats) with the stage's options,
    keep what the next stage samples resident; -> stats."""
    drop_resident(ctx)
    model, tok = load_for_training_stage(ctx.recipe, base_dir)
    cfg = train_config(ctx.recipe, section, progress=ctx.progress)
    cfg = replace(cfg, export_merged=cfg.export_merged or export_merged)
    lora = cfg.lora_rank is not None
    # at tp 1 the next stage samples what this one returns: the trained model, or under LoRA the untouched base
    # (the adapter is applied from disk like on a resumed run); tensor-parallel stages reread their slices
    resident = (getattr(model, "name_or_path", None) if lora else out / "model")
    return_model = ("base" if lora else True) if sampling_tp(ctx, out / "model") == 1 else False
    options = dict(out_dir=out / "model", return_stats=True, return_model=return_model, keep_ckpt=True,
                   report_to=ctx.recipe.logging.report_to, log_dir=ctx.run_dir / "tb" / out.name,
                   run_name=f"{ctx.recipe.name}/{out.name}")  # one tracker run per stage, named after it
    ctx.cleanup.append(out / "model" / "ckpt")
    model, stats = train(model, tok, cfg, **options)
    if resident is not None:
        keep_resident(ctx, resident, model, tok)
    return stats


# ------------------------------------------------------------------------------------------------ the runners


def run_data(ctx, out):
    """Split train into train_1 (gold, for the weak model) and train_2 (questions only); in the setting without gold,
    take the train_2 file whole."""
    d = ctx.recipe.data
    if d.train_2:
        return _questions_only(ctx, out)
    train = load_records(d.task, d.train)
    if d.split_file:
        train_1, train_2 = load_split(d.split_file, train)
    else:
        train_1, train_2 = split_train(train, seed=d.seed, sizes=split_sizes(d, len(train)))
    if len(train_1) == 0 or len(train_2) == 0:
        raise ValueError(f"{ctx.recipe.path}: [data] gives {len(train_1)} train_1 and {len(train_2)} train_2 "
                         f"records; both must be non-empty")
    if is_main():
        save_split(out / "split.json", train_1, train_2)
        write_jsonl_atomic(out / "train_1.jsonl", train_1)
        # train_2 is seen by the strong model as questions only; its gold goes to a separate analysis-only file.
        write_jsonl_atomic(out / "train_2.jsonl", [{"id": r["id"], "question": r["question"]} for r in train_2])
        write_jsonl_atomic(out / GOLD_FILE, [{"id": r["id"], "answer": r["answer"], "solution": r["solution"]}
                                             for r in train_2])
    return {"n_train_1": len(train_1), "n_train_2": len(train_2)}


def _questions_only(ctx, out):
    """The setting without gold: every question of [data] train_2 is train_2, read without its gold fields (the
    records keep what the prompt and the judge need: for OlympicArena the prompt, answer types and units). No
    train_1, no gold file."""
    d = ctx.recipe.data
    train_2 = load_questions(d.task, d.train_2)
    if not train_2:
        raise ValueError(f"{ctx.recipe.path}: [data] train_2 = {d.train_2} gives no questions")
    if is_main():
        write_jsonl_atomic(out / "train_2.jsonl", train_2)
    return {"n_train_1": 0, "n_train_2": len(train_2)}


def run_test_set(ctx, out):
    """The test set: the first n_test records of the test file (all of them when n_test is 0)."""
    d = ctx.recipe.data
    test = load_records(d.task, d.test)
    test = test[: d.n_test] if d.n_test else test
    if not test:
        raise ValueError(f"{ctx.recipe.path}: [data] test = {d.test} gives no test records")
    if is_main():
        write_jsonl_atomic(out / "test.jsonl", test)
    return {"n_test": len(test)}


def run_weak_sft(ctx, out):
    """SFT the weak base on train_1 gold solutions."""
    rows = [{"id": x["id"], "prompt": zero_shot(ctx, x), "response": x["solution"]} for x in data_rows(ctx, "train_1")]
    return {"n_rows": len(rows), **train_stage(ctx, out, checkpoint(ctx, "weak"), rows, "weak_sft")}


def run_labels(ctx, out, model, prompt):
    """Greedy labels of every train_2 question by `model`, zero-shot or few-shot."""
    r = ctx.recipe
    _, counts = generate_stage(ctx, out, checkpoint(ctx, model), data_rows(ctx, "train_2"), prompt, seed=r.data.seed)
    return counts


def weak_confident(ctx, weak_samples):
    """{id: confidence} of the train_2 questions whose weak majority over the weak model's samples reaches [stage1]
    weak_min_confidence (the weak self-consistency filter, beyond the paper)."""
    samples = {row["id"]: row["samples"] for row in with_answers(labels(ctx, weak_samples), grader(ctx))}
    return self_consistent(samples, ctx.recipe.stage1.weak_min_confidence, same_for=train_2_comparisons(ctx))


def run_filter(ctx, out, weak, other, weak_samples=None):
    """Final-answer consistency between two labellings of train_2 (answers read by the recipe's grader) -> weak /
    icl / hybrid SFT sets; with weak_samples, only among the questions whose weak majority is confident."""
    grade = grader(ctx)
    weak_rows, other_rows = with_answers(labels(ctx, weak), grade), with_answers(labels(ctx, other), grade)
    kept = consistent(weak_rows, other_rows, same_for=train_2_comparisons(ctx))
    extra = {}
    if weak_samples is not None:
        confident = weak_confident(ctx, weak_samples)
        extra = {"n_weak_confident": len(confident), "n_consistent_before_weak_filter": len(kept)}
        kept = [i for i in kept if i in confident]
    prompts = train_2_prompts(ctx)
    sets = {name: with_prompts(rows, prompts) for name, rows in sft_sets(weak_rows, other_rows, kept).items()}
    if is_main():
        for name, rows in sets.items():
            write_jsonl_atomic(out / f"{name}.jsonl", rows)
            export_sft(rows, out / f"{name}.llamafactory.json")  # the paper's released-data format, to compare
    kept_set = set(kept)
    analysis = {"precision": gold_precision(ctx, [w for w in weak_rows if w["id"] in kept_set]),
                "precision_weak_all": gold_precision(ctx, weak_rows)} if has_train_2_gold(ctx) else {}
    return {"grader": grade.name, "n_questions": len(weak_rows), "n_kept": len(kept),
            "kept_fraction": len(kept) / max(len(weak_rows), 1),
            "n_with_answer": {"weak": sum(bool(w["answer"]) for w in weak_rows),
                              "other": sum(bool(o["answer"]) for o in other_rows)},
            "n_truncated": {"weak": _truncated(weak_rows), "other": _truncated(other_rows),
                            "kept": sum(any(row.get("truncated", False) for row in pair)
                                        for pair in zip(sets["weak"], sets["icl"]))},
            "n_rows": {name: len(rows) for name, rows in sets.items()}, **analysis, **extra}


def _truncated(rows):
    """How many label rows (or samples) stopped at the token limit."""
    if rows and "samples" in rows[0]:
        return sum(s.get("truncated", False) for row in rows for s in row["samples"])
    return sum(row.get("truncated", False) for row in rows)


def run_stage1_sft(ctx, out, filter, sft_set, init):
    """SFT `init` (the strong base, or a round-1 model under round2_init = "continue") on one filtered set."""
    rows = read_jsonl(ctx.dir(filter) / f"{sft_set}.jsonl")
    return {"n_rows": len(rows), **train_stage(ctx, out, checkpoint(ctx, init), rows, "strong_sft")}


def run_full_weak_ft(ctx, out):
    """Baseline: SFT the strong base on every weak label, unfiltered."""
    prompts = train_2_prompts(ctx)
    rows = [{"id": x["id"], "prompt": prompts[x["id"]], "response": x["response"]}
            for x in labels(ctx, "02_weak_labels")]
    return {"n_rows": len(rows), **train_stage(ctx, out, checkpoint(ctx, "strong"), rows, "strong_sft")}


def run_ceiling(ctx, out):
    """Baseline: SFT the strong base on train_2 with its gold solutions (the upper bound)."""
    gold = read_train_2_gold(ctx)
    rows = [{"id": q["id"], "prompt": zero_shot(ctx, q), "response": gold[q["id"]]["solution"]}
            for q in data_rows(ctx, "train_2")]
    return {"n_rows": len(rows), **train_stage(ctx, out, checkpoint(ctx, "strong"), rows, "strong_sft")}


def run_samples(ctx, out, model, n=None, prompt="zero_shot"):
    """n (default [stage2] n_samples) samples per train_2 question from `model` (M_plus, a Stage II round's model, or
    the weak model for its self-consistency filter) at Stage II's temperature."""
    r, s2 = ctx.recipe, ctx.recipe.stage2
    _, counts = generate_stage(ctx, out, checkpoint(ctx, model), data_rows(ctx, "train_2"), prompt,
                               n=n or s2.n_samples, temperature=s2.temperature, top_p=s2.top_p,
                               max_new_tokens=r.sampling.sample_max_new_tokens, seed=r.data.seed)
    return counts


def stage2_weak_labels(ctx, weak_samples=None, relabel=None):
    """D_weak as Stage II sees it: the weak labels; with the weak self-consistency filter, those of unconfident
    questions marked absent, or replaced by the `relabel` stage's labels (weak_relabel). -> (rows, counts)."""
    grade = grader(ctx)
    rows = with_answers(labels(ctx, "02_weak_labels"), grade)
    if weak_samples is None:
        return rows, {}
    confident = weak_confident(ctx, weak_samples)
    stand_in = {row["id"]: row for row in with_answers(labels(ctx, relabel), grade)} if relabel else {}
    rows = [w if w["id"] in confident else stand_in[w["id"]] | {"relabelled": True} if relabel else w | {"absent": True}
            for w in rows]
    return rows, {"n_weak_dropped": len(rows) - len(confident), "weak_relabelled": relabel is not None}


def run_pairs(ctx, out, samples, weak_samples=None, relabel=None):
    """Majority vote over the samples (M_plus's, or a Stage II round's model's), then preference pairs with the weak
    response on one side (and the options beyond the paper: pair weights, self-consistency pairs)."""
    s2, grade, same_for = ctx.recipe.stage2, grader(ctx), train_2_comparisons(ctx)
    by_id = {row["id"]: row["samples"] for row in with_answers(labels(ctx, samples), grade)}
    weak_rows, weak_counts = stage2_weak_labels(ctx, weak_samples, relabel)
    pairs, counts = build_pairs(weak_rows, by_id, seed=s2.pair_seed, max_pairs_per_question=s2.max_pairs,
                                min_confidence=s2.min_confidence, flip_confidence=s2.flip_confidence,
                                same_for=same_for, pair_weighting=s2.pair_weighting,
                                self_consistency_pairs=s2.self_consistency_pairs)
    pairs = with_prompts(pairs, train_2_prompts(ctx))
    counts |= weak_counts
    if pairs and "margin" in pairs[0]:
        counts["mean_margin"] = sum(p["margin"] for p in pairs) / len(pairs)
    if is_main():
        write_jsonl_atomic(out / "pairs.jsonl", pairs)
        export_pairs(pairs, out / "pairs.llamafactory.json")
    analysis = {}
    if has_train_2_gold(ctx):  # analysis only
        gold = {i: grade.gold(g["answer"]) for i, g in read_train_2_gold(ctx).items()}
        precision = {kind: pair_precision(pairs, gold, kind=kind, same_for=same_for)
                     for kind in (None, "weak_chosen", "weak_rejected")}
        analysis = {"pair_precision": precision[None], "pair_precision_weak_chosen": precision["weak_chosen"],
                    "pair_precision_weak_rejected": precision["weak_rejected"]}
    truncated = {"weak": _truncated(labels(ctx, "02_weak_labels")), "samples": _truncated(labels(ctx, samples)),
                 "pairs": sum(p["chosen_truncated"] or p["rejected_truncated"] for p in pairs)}
    return {"grader": grade.name, "n_pairs": len(pairs), "n_truncated": truncated, **analysis, "counts": counts}


def run_preference(ctx, out, pairs, init, loss):
    """DPO / ORPO / IPO of `init` (M_plus, or the previous Stage II round's model) on the pairs, weighted when they
    carry weights -> out/model (M_pro). The trainer's reference is `init` itself."""
    rows = [{"id": p["id"], "prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} |
            ({"weight": p["weight"]} if "weight" in p else {}) for p in read_jsonl(ctx.dir(pairs) / "pairs.jsonl")]
    merged = loss in ctx.recipe.stage2.export_merged  # M_pro as a plain HF model too (the run's final models)
    return {"n_pairs": len(rows), "loss": loss,
            **train_stage(ctx, out, checkpoint(ctx, init), rows, "preference", loss=loss, export_merged=merged)}


def run_grpo(ctx, out, init):
    """GRPO of `init` (M_plus) on the train_2 questions, rewarded by its own vote (and the weak labels under
    "vote_or_weak"; w2s/grpo.py) -> out/model. Reads questions and weak responses, never train_2 gold."""
    r, grade = ctx.recipe, grader(ctx)
    questions = [{"id": i, "prompt": prompt} for i, prompt in train_2_prompts(ctx).items()]
    weak = {w["id"]: grade.answer(w["response"], stored=True) for w in labels(ctx, "02_weak_labels")}
    last = {}  # the last logged record: the final reward and its spread

    def train(model, tok, cfg, **options):
        return train_grpo(model, tok, questions, cfg, grpo_config(r), grade, weak_answers=weak,
                          same_for=train_2_comparisons(ctx), stop=tuple(STOP_STRINGS), max_batch=r.sampling.max_batch,
                          on_step=last.update, **options)

    stats = _train(ctx, out, checkpoint(ctx, init), "grpo", train)
    return {"n_questions": len(questions), "loss": "grpo", "grader": grade.name,
            "final": {k: last.get(k) for k in ("reward", "reward_std", "vote_confidence", "kl", "completion_len")},
            **_cost(stats)}


def run_eval(ctx, out, model, prompt, n=1, temperature=0.0):
    """Greedy test accuracy (n == 1) or pass@k from n samples at `temperature`; MATH also by level."""
    r = ctx.recipe
    test = data_rows(ctx, "test")
    max_new_tokens = r.sampling.max_new_tokens if n == 1 else r.sampling.sample_max_new_tokens
    rows, counts = generate_stage(ctx, out, checkpoint(ctx, model), test, prompt, n=n, temperature=temperature,
                                  max_new_tokens=max_new_tokens, seed=r.data.seed)
    result = evaluation_result(rows, test, r.data.task, grader=r.data.grader)
    if is_main():
        write_json_atomic(out / "result.json", result)
    return {**counts, **result}
