"""The stage plan of a recipe: which stages run, in which order, what each reads, and the thin runner of each.

Each runner loads what it needs, calls the pure stage logic (w2s/stages), the sampler (w2s/sampling.py) or the
trainer (w2s/train.py), and writes its artifacts. The order, numbering and contract are described in w2s/pipeline.py.

Gold answers of train_2 live in 00_data/train_2_gold.jsonl. `read_train_2_gold` is the ONE function that opens it,
and only two kinds of caller use it: the selection-precision analysis of filtered sets and pairs (reported, never
trained on) and the strong-ceiling baseline (19_ceiling). tests/test_pipeline.py checks both facts.

Weights stay resident between stages where that is free: a model just trained (or loaded for generation) is kept in
memory, so the next stage that generates with it does not reload it. Training always starts from a fresh load,
because the trainer consumes the model it is given.

    python -m pytest -q tests/test_pipeline.py
"""

import gc
from dataclasses import asdict
from pathlib import Path

from w2s.pipeline import Stage, is_main, read_jsonl, sha256_file, stable_hash, write_json_atomic, write_jsonl_atomic

ROUND_STAGES = {1: ("04_r1_filter", "05_r1_sft_weak", "06_r1_sft_icl", "07_r1_sft_hybrid"),
                2: ("10_r2_filter", "11_r2_sft_weak", "12_r2_sft_icl", "13_r2_sft_hybrid")}
R2_LABEL_STAGES = ("08_r2_labels_weak", "09_r2_labels_icl")
PREFERENCE_STAGES = {"dpo": "16_dpo", "orpo": "17_orpo", "ipo": "16_ipo"}
GOLD_FILE = "train_2_gold.jsonl"  # analysis + ceiling only; see read_train_2_gold


# ------------------------------------------------------------------------------------------------ model handling


def _torch_setup(recipe):
    import torch

    device = recipe.models.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return device, getattr(torch, recipe.models.dtype)


def load_fresh(recipe, model_dir, tp):
    """(model, tokenizer) of a checkpoint dir for sampling, in the recipe's dtype on its device; with tp > 1 each
    rank reads only its tensor-parallel slice (groups of tp consecutive ranks; data parallel across groups)."""
    from w2s.tensor_parallel import load_model_tp
    from w2s.tokenizer import load_tokenizer

    device, dtype = _torch_setup(recipe)
    return load_model_tp(model_dir, tp, dtype=dtype, device=device), load_tokenizer(model_dir)


def sampling_tp(ctx, model_dir):
    """Tensor-parallel degree for sampling a checkpoint: [sampling] weak_tp for the weak model (stage 01's output),
    tp for every strong one."""
    weak = model_of(ctx, "01_weak_sft").resolve()
    return ctx.recipe.sampling.weak_tp if Path(model_dir).resolve() == weak else ctx.recipe.sampling.tp


def drop_resident(ctx):
    """Free the resident model before loading another (a 70B checkpoint does not fit twice)."""
    import torch

    ctx.resident = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_for_training_stage(recipe, model_dir):
    """(model, tokenizer) to hand to the trainer: rank 0 reads the weights into host memory in the recipe's dtype,
    other torchrun ranks build the model on the meta device and get their FSDP shards from rank 0 (w2s.parallel)."""
    from w2s.parallel import load_for_training
    from w2s.tokenizer import load_tokenizer

    _, dtype = _torch_setup(recipe)
    return load_for_training(model_dir, dtype=dtype), load_tokenizer(model_dir)


def keep_resident(ctx, out, model, tok):
    """A just-trained model stays resident for the sampling stage that usually follows. Not when it is sampled
    tensor-parallel (model is None then): the trainer returns whole models, and the next stage reads its slices from
    disk."""
    if model is not None:
        ctx.resident = (str((out / "model").resolve()), model.to(_torch_setup(ctx.recipe)[0]), tok)


def load_for_inference(ctx, model_dir):
    """The resident model when it is this checkpoint, else a fresh load that becomes the resident one."""
    model_dir = str(Path(model_dir).resolve())
    if ctx.resident is not None and ctx.resident[0] == model_dir:
        return ctx.resident[1], ctx.resident[2]
    drop_resident(ctx)
    model, tok = load_fresh(ctx.recipe, model_dir, sampling_tp(ctx, model_dir))
    ctx.resident = (model_dir, model, tok)
    return model, tok


def ckpt_fingerprint(path):
    """Identity of a checkpoint dir for stage keys: the names, sizes and mtimes of its weight, config and tokenizer
    files (cheap: no 140 GB hash); copying or rewriting a checkpoint reruns the stages that read it."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.json")) + sorted(path.glob("tokenizer.model"))
    return stable_hash([(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in files])


def model_of(ctx, stage_name):
    return ctx.dir(stage_name) / "model"


# ------------------------------------------------------------------------------------------------ cost summaries


def _cost_of(prof):
    """The cost fields of meta.json from a StageProfiler: tokens, tokens/s, MFU, peak memory, device."""
    s = prof.summary()
    mem = s["cuda_peak_gib"] if s["cuda_peak_gib"] is not None else s["host_peak_rss_gib"]
    return {"tokens": s["tokens"], "tok_s": s["tok_s"], "mfu": s["mfu"], "peak_mem_gib": mem, "device": s["device"],
            "stage_s": s["wall_s"]}


def _train_cost(prof, steps):
    """Training cost from the trainer's own step records (exact sequence lengths and LoRA in its FLOPs count):
    tok/s over the training steps only, MFU as the time-weighted mean of the logged windows."""
    cost = _cost_of(prof)
    tokens = sum(r["tokens"] for r in steps)
    seconds = sum(r["tokens"] / r["tok_per_s"] for r in steps if r["tok_per_s"])
    mfus = [(r["mfu"], r["tokens"] / r["tok_per_s"]) for r in steps if r.get("mfu") is not None and r["tok_per_s"]]
    cost.update(tokens=tokens, tok_s=tokens / seconds if seconds else None, steps=len(steps),
                mfu=sum(m * t for m, t in mfus) / sum(t for _, t in mfus) if mfus else None,
                final_loss=steps[-1]["loss"] if steps else None)
    return cost


# ------------------------------------------------------------------------------------------------ shared runners


def same_answer_fn(task):
    from w2s.stages.metrics import answer_matcher

    return answer_matcher(task)


def extract(text, task):
    """The extracted, normalized final answer of a response ("" if none): what filtering and voting compare."""
    from w2s.tasks import extract_answer, normalize_answer

    return normalize_answer(extract_answer(text, task))


def generate_stage(ctx, out, model_dir, records, prompt_fn, n=1, temperature=0.0, top_p=1.0, max_new_tokens=None,
                   seed=0):
    """Generate for every record, stream to generations.jsonl (resumable), then write labels.jsonl with answers.

    labels.jsonl rows: {"id", "question", "response", "answer"} for n == 1, or {"id", "question", "samples":
    [{"response", "answer"}, ...]} for n > 1; "answer" is the extracted, normalized final answer ("" if none).
    A response is the completion stripped of surrounding whitespace: the model continues "Answer:" with a space, and
    the trainer joins prompt + " " + response, so a kept space would teach a double one (the raw text stays in
    generations.jsonl). Returns (rows, counts for meta.json).
    """
    from w2s.profile import StageProfiler
    from w2s.sampling_jsonl import generate_to_jsonl
    from w2s.tasks import STOP_STRINGS

    r, task = ctx.recipe, ctx.recipe.data.task
    model, tok = load_for_inference(ctx, model_dir)
    prompts = [{"id": rec["id"], "prompt": prompt_fn(rec)} for rec in records]
    max_new_tokens = max_new_tokens or r.sampling.max_new_tokens
    with StageProfiler(model.cfg, mode="inference", name=out.name) as prof:
        path = generate_to_jsonl(model, tok, prompts, out / "generations.jsonl", n=n, temperature=temperature,
                                 top_p=top_p, max_new_tokens=max_new_tokens, stop=tuple(STOP_STRINGS), seed=seed,
                                 max_batch=r.sampling.max_batch, cache_len=r.sampling.cache_len or None,
                                 progress=ctx.progress)
        results = read_jsonl(path)
        prof.add_tokens(sum(c["num_tokens"] for res in results for c in res["completions"]))
    rows = []
    for rec, res in zip(records, results, strict=True):
        if res["id"] != rec["id"]:
            raise RuntimeError(f"{path}: id {res['id']!r} where {rec['id']!r} was expected (sampler order)")
        comps = res["completions"]
        if n == 1:
            rows.append({"id": rec["id"], "question": rec["question"], "response": comps[0]["text"].strip(),
                         "answer": extract(comps[0]["text"], task)})
        else:
            rows.append({"id": rec["id"], "question": rec["question"],
                         "samples": [{"response": c["text"].strip(), "answer": extract(c["text"], task)}
                                     for c in comps]})
    write_jsonl_atomic(out / "labels.jsonl", rows)
    with_answer = sum(bool(row["answer"]) for row in rows) if n == 1 else sum(
        bool(s["answer"]) for row in rows for s in row["samples"])
    counts = {"n_prompts": len(rows), "n_completions": len(rows) * n, "n_with_answer": with_answer,
              "finish_reasons": _finish_reasons(results), "tp": getattr(model, "tp_size", 1), **_cost_of(prof)}
    return rows, counts


def _finish_reasons(results):
    reasons = {}
    for res in results:
        for c in res["completions"]:
            reasons[c["finish_reason"]] = reasons.get(c["finish_reason"], 0) + 1
    return reasons


def train_config(recipe, section, progress):
    """The resolved TrainConfig of a recipe section ([weak_sft], [strong_sft] or [preference])."""
    from w2s.train_config import TrainConfig

    values = {k: tuple(v) if isinstance(v, list) else v for k, v in getattr(recipe, section).items()}
    return TrainConfig(**{**values, "progress": progress})


def train_options(recipe, section):
    """The options of a training stage as hashed into its key: the resolved TrainConfig minus display fields."""
    cfg = asdict(train_config(recipe, section, progress=False))
    return {k: v for k, v in cfg.items() if k not in ("progress", "log_every")}


def _check_rows(out, rows, what):
    if not rows:
        raise ValueError(f"{out.name}: the {what} is empty, nothing to train on (see the meta.json of the stage "
                         f"that built it, e.g. its kept/pairs counts)")


def sft_stage(ctx, out, base_dir, rows, section):
    """SFT `base_dir` on rows {"prompt", "response"}; the trained model goes to out/model (HF format, with the
    trainer's metrics.jsonl and, while it runs, its resumable checkpoints in out/model/ckpt)."""
    from w2s.profile import StageProfiler
    from w2s.train import train_sft

    _check_rows(out, rows, "SFT set")
    write_jsonl_atomic(out / "train.jsonl", rows)
    drop_resident(ctx)
    model, tok = load_for_training_stage(ctx.recipe, base_dir)
    steps = []
    with StageProfiler(model.cfg, mode="training", name=out.name) as prof:
        model = train_sft(model, tok, rows, train_config(ctx.recipe, section, ctx.progress), out_dir=out / "model",
                          on_step=steps.append, return_model=sampling_tp(ctx, out / "model") == 1)
    keep_resident(ctx, out, model, tok)
    return {"n_rows": len(rows), **_train_cost(prof, steps)}


def preference_stage(ctx, out, base_dir, pairs, loss):
    """DPO / ORPO / IPO of `base_dir` (M_plus) on pairs {"prompt", "chosen", "rejected"} -> out/model (M_pro)."""
    from w2s.profile import StageProfiler
    from w2s.train import train_preference

    _check_rows(out, pairs, "preference pair set")
    write_jsonl_atomic(out / "train.jsonl", pairs)
    drop_resident(ctx)
    model, tok = load_for_training_stage(ctx.recipe, base_dir)
    steps = []
    with StageProfiler(model.cfg, mode="training", name=out.name) as prof:
        model = train_preference(model, tok, pairs, train_config(ctx.recipe, "preference", ctx.progress),
                                 out_dir=out / "model", loss=loss, on_step=steps.append,
                                 return_model=sampling_tp(ctx, out / "model") == 1)
    keep_resident(ctx, out, model, tok)
    return {"n_pairs": len(pairs), "loss": loss, **_train_cost(prof, steps)}


def zero_shot(rec):
    from w2s.tasks import zero_shot_prompt

    return zero_shot_prompt(rec["question"])


def read_train_2_gold(ctx):
    """{id: {"answer", "solution"}} of train_2. The ONE reader of train_2 gold: its callers are the precision
    analysis (`gold_precision`, `run_pairs`) and the strong-ceiling rows (`ceiling_rows`), nothing else."""
    return {row["id"]: row for row in read_jsonl(ctx.dir("00_data") / GOLD_FILE)}


def gold_precision(ctx, records):
    """Analysis only: the fraction of labelled records {"id", "answer"} whose answer is gold-correct."""
    from w2s.stages.consistency import precision

    gold = {i: g["answer"] for i, g in read_train_2_gold(ctx).items()}
    return precision(records, gold, same_answer_fn(ctx.recipe.data.task))


def ceiling_rows(ctx):
    """The strong ceiling's SFT set: train_2 questions with their gold solutions (PAPER.md: the upper bound)."""
    gold = read_train_2_gold(ctx)
    return [{"id": q["id"], "prompt": zero_shot(q), "response": gold[q["id"]]["solution"]}
            for q in data_rows(ctx, "train_2")]


# ------------------------------------------------------------------------------------------------ stage runners


def run_data(ctx, out):
    from w2s.tasks import load_records, load_split, save_split, split_train

    d = ctx.recipe.data
    train = load_records(d.task, d.train)
    if d.split_file:
        train_1, train_2 = load_split(d.split_file, train)
    else:
        sizes = (d.n_train_1 or len(train) // 2, d.n_train_2 or len(train) - len(train) // 2) \
            if d.n_train_1 or d.n_train_2 else None
        train_1, train_2 = split_train(train, seed=d.seed, sizes=sizes)
    test = load_records(d.task, d.test)
    test = test[: d.n_test] if d.n_test else test
    if len(train_1) == 0 or len(train_2) == 0 or len(test) == 0:
        raise ValueError(f"{ctx.recipe.path}: [data] gives {len(train_1)} train_1, {len(train_2)} train_2 and "
                         f"{len(test)} test records; every part must be non-empty")
    if is_main():
        save_split(out / "split.json", train_1, train_2)
    write_jsonl_atomic(out / "train_1.jsonl", train_1)
    # train_2 is seen by the strong model as questions only; its gold goes to a separate analysis-only file.
    write_jsonl_atomic(out / "train_2.jsonl", [{"id": r["id"], "question": r["question"]} for r in train_2])
    write_jsonl_atomic(out / GOLD_FILE, [{"id": r["id"], "answer": r["answer"], "solution": r["solution"]}
                                         for r in train_2])
    write_jsonl_atomic(out / "test.jsonl", test)
    return {"n_train_1": len(train_1), "n_train_2": len(train_2), "n_test": len(test)}


def data_rows(ctx, name):
    return read_jsonl(ctx.dir("00_data") / f"{name}.jsonl")


def labels(ctx, stage):
    return read_jsonl(ctx.dir(stage) / "labels.jsonl")


def demos(ctx):
    """The ICL demonstrations: k weak responses on train_2 with an extractable answer, seeded, never filtered for
    correctness (PAPER.md). The same demos serve 03_icl_labels and the strong-ICL evaluation."""
    from w2s.tasks import select_demos

    r = ctx.recipe
    return select_demos(labels(ctx, "02_weak_labels"), r.data.task, k=r.stage1.n_demos, seed=r.stage1.demo_seed)


def icl_prompt_fn(ctx):
    from w2s.tasks import few_shot_prompt

    shots = demos(ctx)
    return lambda rec: few_shot_prompt(shots, rec["question"])


def run_labels(ctx, out, model_dir, prompt_fn):
    """Greedy zero-shot (or few-shot) labels of every train_2 question."""
    rows, counts = generate_stage(ctx, out, model_dir, data_rows(ctx, "train_2"), prompt_fn,
                                  seed=ctx.recipe.data.seed)
    return counts


def run_filter(ctx, out, weak_stage, icl_stage):
    """Final-answer consistency between two labellings of train_2 -> weak / icl / hybrid SFT sets."""
    from w2s.interchange import export_sft
    from w2s.stages.consistency import consistent, sft_sets

    weak, other = labels(ctx, weak_stage), labels(ctx, icl_stage)
    kept = consistent(weak, other, same_answer=same_answer_fn(ctx.recipe.data.task))
    sets = sft_sets(weak, other, kept)
    for name, rows in sets.items():
        write_jsonl_atomic(out / f"{name}.jsonl", rows)
        if is_main():
            export_sft(rows, out / f"{name}.llamafactory.json")  # the paper's released-data format, for comparison
    kept_set = set(kept)
    return {"n_questions": len(weak), "n_kept": len(kept), "kept_fraction": len(kept) / max(len(weak), 1),
            "n_rows": {name: len(rows) for name, rows in sets.items()},
            "precision": gold_precision(ctx, [w for w in weak if w["id"] in kept_set]),
            "precision_weak_all": gold_precision(ctx, weak)}


def run_pairs(ctx, out):
    """Majority vote over M_plus's samples, then preference pairs with the weak response on one side."""
    from w2s.interchange import export_pairs
    from w2s.stages.metrics import pair_precision
    from w2s.stages.preference_pairs import build_pairs

    r = ctx.recipe
    samples = {row["id"]: row["samples"] for row in labels(ctx, "14_samples")}
    same = same_answer_fn(r.data.task)
    pairs, counts = build_pairs(labels(ctx, "02_weak_labels"), samples, seed=r.stage2.pair_seed,
                                max_pairs_per_question=r.stage2.max_pairs, min_confidence=r.stage2.min_confidence,
                                flip_confidence=r.stage2.flip_confidence, same_answer=same)
    write_jsonl_atomic(out / "pairs.jsonl", pairs)
    if is_main():
        export_pairs(pairs, out / "pairs.llamafactory.json")
    gold = {i: g["answer"] for i, g in read_train_2_gold(ctx).items()}  # analysis only
    precision = {kind: pair_precision(pairs, gold, same, kind=kind) for kind in (None, "weak_chosen", "weak_rejected")}
    return {"n_pairs": len(pairs), "pair_precision": precision[None],
            "pair_precision_weak_chosen": precision["weak_chosen"],
            "pair_precision_weak_rejected": precision["weak_rejected"], "counts": counts}


def preference_rows(ctx):
    return [{"id": p["id"], "prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]}
            for p in read_jsonl(ctx.dir("15_pairs") / "pairs.jsonl")]


def run_eval(ctx, out, model_dir, prompt_fn, n=1, temperature=0.0, max_new_tokens=None):
    """Greedy test accuracy (n == 1) or pass@k from n samples at `temperature`; MATH also by level."""
    from w2s.stages.metrics import evaluation_result

    r = ctx.recipe
    test = data_rows(ctx, "test")
    rows, counts = generate_stage(ctx, out, model_dir, test, prompt_fn, n=n, temperature=temperature,
                                  max_new_tokens=max_new_tokens, seed=r.data.seed)
    result = evaluation_result(rows, test, r.data.task)
    write_json_atomic(out / "result.json", result)
    return {**counts, **result}


# ------------------------------------------------------------------------------------------------ the plan


def build_stages(recipe):
    """The ordered stage list of a recipe (fixed numbers; disabled stages are simply absent)."""
    r = recipe
    strong, weak, task = r.models.strong, r.models.weak, r.data.task
    s1, s2, samp, d = r.stage1, r.stage2, r.sampling, r.data
    stages = []

    def add(name, deps, options, run, kind):
        stages.append(Stage(name, deps, options, run, kind))

    def greedy(max_new_tokens=samp.max_new_tokens):
        return {"task": task, "n": 1, "temperature": 0.0, "max_new_tokens": max_new_tokens, "seed": d.seed,
                "cache_len": samp.cache_len}

    add("00_data", [], {"task": task, "train": sha256_file(d.train), "test": sha256_file(d.test),
                        "split": sha256_file(d.split_file) if d.split_file else None,
                        "sizes": [d.n_train_1, d.n_train_2, d.n_test], "seed": d.seed},
        run_data, "data")
    sft_opts = lambda section, base: {"train": train_options(r, section), "base": ckpt_fingerprint(base)}  # noqa: E731
    add("01_weak_sft", ["00_data"], sft_opts("weak_sft", weak),
        lambda ctx, out: sft_stage(ctx, out, weak, [{"id": x["id"], "prompt": zero_shot(x), "response": x["solution"]}
                                                    for x in data_rows(ctx, "train_1")], "weak_sft"), "train")
    add("02_weak_labels", ["00_data", "01_weak_sft"], {**greedy(), "prompt": "zero_shot"},
        lambda ctx, out: run_labels(ctx, out, model_of(ctx, "01_weak_sft"), zero_shot), "generate")
    icl_opts = {"prompt": "few_shot", "strong": ckpt_fingerprint(strong), "n_demos": s1.n_demos,
                "demo_seed": s1.demo_seed}
    add("03_icl_labels", ["00_data", "02_weak_labels"], {**greedy(), **icl_opts},
        lambda ctx, out: run_labels(ctx, out, strong, icl_prompt_fn(ctx)), "generate")
    for rnd in range(1, s1.rounds + 1):
        filt, *sft_names = ROUND_STAGES[rnd]
        if rnd == 1:
            label_stages = ("02_weak_labels", "03_icl_labels")
        else:
            label_stages = R2_LABEL_STAGES
            for lab, src in zip(R2_LABEL_STAGES, ROUND_STAGES[1][1:3]):
                add(lab, ["00_data", src], {**greedy(), "prompt": "zero_shot"},
                    lambda ctx, out, src=src: run_labels(ctx, out, model_of(ctx, src), zero_shot), "generate")
        add(filt, ["00_data", *label_stages], {"task": task},
            lambda ctx, out, ls=label_stages: run_filter(ctx, out, *ls), "filter")
        for sft_name, set_name, prev in zip(sft_names, ("weak", "icl", "hybrid"), ROUND_STAGES[1][1:]):
            base_stage = prev if (rnd == 2 and s1.round2_init == "continue") else None
            deps = [filt] + ([base_stage] if base_stage else [])
            opts = sft_opts("strong_sft", strong) | {"set": set_name, "init": base_stage or "strong_base"}
            add(sft_name, deps, opts,
                lambda ctx, out, f=filt, s=set_name, b=base_stage: sft_stage(
                    ctx, out, model_of(ctx, b) if b else strong, read_jsonl(ctx.dir(f) / f"{s}.jsonl"),
                    "strong_sft"), "train")
    m_plus = ROUND_STAGES[s1.rounds][3]
    sample_opts = {"task": task, "n": s2.n_samples, "temperature": s2.temperature, "top_p": s2.top_p,
                   "max_new_tokens": samp.sample_max_new_tokens, "seed": d.seed, "cache_len": samp.cache_len,
                   "prompt": "zero_shot"}
    add("14_samples", ["00_data", m_plus], sample_opts,
        lambda ctx, out: generate_stage(ctx, out, model_of(ctx, m_plus), data_rows(ctx, "train_2"), zero_shot,
                                        n=s2.n_samples, temperature=s2.temperature, top_p=s2.top_p,
                                        max_new_tokens=samp.sample_max_new_tokens, seed=d.seed)[1], "generate")
    add("15_pairs", ["00_data", "02_weak_labels", "14_samples"],
        {"task": task, "min_confidence": s2.min_confidence, "flip_confidence": s2.flip_confidence,
         "max_pairs": s2.max_pairs, "pair_seed": s2.pair_seed}, run_pairs, "filter")
    for loss in s2.losses:
        add(PREFERENCE_STAGES[loss], ["15_pairs", m_plus], {"train": train_options(r, "preference"), "loss": loss},
            lambda ctx, out, loss=loss: preference_stage(ctx, out, model_of(ctx, m_plus), preference_rows(ctx), loss),
            "train")
    if "full_weak_ft" in r.eval.baselines:
        add("18_full_weak_ft", ["02_weak_labels"], sft_opts("strong_sft", strong) | {"set": "all_weak_labels"},
            lambda ctx, out: sft_stage(ctx, out, strong, [{"id": x["id"], "prompt": zero_shot(x),
                                                           "response": x["response"]}
                                                          for x in labels(ctx, "02_weak_labels")], "strong_sft"),
            "train")
    if "ceiling" in r.eval.baselines:
        add("19_ceiling", ["00_data"], sft_opts("strong_sft", strong) | {"set": "train_2_gold"},
            lambda ctx, out: sft_stage(ctx, out, strong, ceiling_rows(ctx), "strong_sft"), "train")
    _add_evals(recipe, stages, add, m_plus, greedy)
    return stages


# Fixed stage numbers of the evaluations, so that a run directory's names never shift when a recipe turns a stage off
# (one Stage I round, no DPO, no baselines): 20-31 greedy test accuracy, 32-36 pass@k and the IPO extra.
EVAL_NUMBERS = {"weak_floor": 20, "full_weak_ft": 21, "stage1_r1_weak": 22, "stage1_r1_icl": 23,
                "stage1_r1_hybrid": 24, "stage1_r2_weak": 25, "stage1_r2_icl": 26, "stage1_r2_hybrid": 27,
                "stage2_dpo": 28, "stage2_orpo": 29, "ceiling": 30, "strong_icl": 31, "stage2_ipo": 35}
PASSK_NUMBERS = {"stage1_plus": 32, "stage2_dpo": 33, "stage2_orpo": 34, "stage2_ipo": 36}


def eval_methods(recipe):
    """(method name in the report, stage whose model it evaluates) for every greedy zero-shot evaluation."""
    methods = [("weak_floor", "01_weak_sft"), ("full_weak_ft", "18_full_weak_ft")]
    for rnd in range(1, recipe.stage1.rounds + 1):
        for kind, stage in zip(("weak", "icl", "hybrid"), ROUND_STAGES[rnd][1:]):
            methods.append((f"stage1_r{rnd}_{kind}", stage))
    methods += [(f"stage2_{loss}", PREFERENCE_STAGES[loss]) for loss in recipe.stage2.losses]
    methods.append(("ceiling", "19_ceiling"))
    return methods


def _add_evals(recipe, stages, add, m_plus, greedy):
    """Greedy test accuracy of every trained model, strong ICL, then pass@k of M_plus and M_pro (EVAL_NUMBERS)."""
    r = recipe
    have = {s.name for s in stages}
    evals = []
    for method, stage in eval_methods(r):
        if stage in have:
            evals.append((EVAL_NUMBERS[method], f"eval_{method}", ["00_data", stage],
                          {**greedy(), "method": method, "prompt": "zero_shot"},
                          lambda ctx, out, s=stage: run_eval(ctx, out, model_of(ctx, s), zero_shot)))
    if "strong_icl" in r.eval.baselines:
        evals.append((EVAL_NUMBERS["strong_icl"], "eval_strong_icl", ["00_data", "02_weak_labels"],
                      {**greedy(), "method": "strong_icl", "prompt": "few_shot",
                       "strong": ckpt_fingerprint(r.models.strong), "n_demos": r.stage1.n_demos,
                       "demo_seed": r.stage1.demo_seed},
                      lambda ctx, out: run_eval(ctx, out, r.models.strong, icl_prompt_fn(ctx))))
    if k := r.eval.pass_k_samples:
        for method, stage in [("stage1_plus", m_plus)] + [(f"stage2_{x}", PREFERENCE_STAGES[x])
                                                           for x in r.stage2.losses]:
            evals.append((PASSK_NUMBERS[method], f"passk_{method}", ["00_data", stage],
                          {"task": r.data.task, "n": k, "temperature": r.eval.pass_k_temperature, "seed": r.data.seed,
                           "max_new_tokens": r.sampling.sample_max_new_tokens, "cache_len": r.sampling.cache_len},
                          lambda ctx, out, s=stage: run_eval(ctx, out, model_of(ctx, s), zero_shot, n=k,
                                                             temperature=r.eval.pass_k_temperature,
                                                             max_new_tokens=r.sampling.sample_max_new_tokens)))
    for number, what, deps, options, run in sorted(evals, key=lambda e: e[0]):
        add(f"{number}_{what}", deps, options, run, "eval")
