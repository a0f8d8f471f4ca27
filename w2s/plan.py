"""The stage plan of a recipe: which stages run, in which order, what each reads, and the thin runner of each.

Each runner loads what it needs, calls the pure stage logic (w2s/stages), the sampler (w2s/sampling.py) or the
trainer (w2s/train.py), and writes its artifacts. The order, numbering and contract are described in w2s/pipeline.py.

Gold answers of train_2 live in 00_data/train_2_gold.jsonl and are read ONLY by `_precision` (selection precision of
filtered sets and pairs, reported for analysis) and by the strong-ceiling baseline; no other stage opens that file.
"""

import functools
import random
from pathlib import Path

from w2s.pipeline import Stage, read_jsonl, sha256_file, stable_hash, write_json_atomic, write_jsonl_atomic

ROUND_STAGES = {1: ("04_r1_filter", "05_r1_sft_weak", "06_r1_sft_icl", "07_r1_sft_hybrid"),
                2: ("10_r2_filter", "11_r2_sft_weak", "12_r2_sft_icl", "13_r2_sft_hybrid")}


# ------------------------------------------------------------------------------------------------ model handling


def _torch_setup(recipe):
    import torch

    device = recipe.models.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return device, getattr(torch, recipe.models.dtype)


def load(recipe, model_dir):
    """(model, tokenizer) of a checkpoint dir, in the recipe's dtype on its device."""
    from w2s.checkpoint import load_model
    from w2s.tokenizer import load_tokenizer

    device, dtype = _torch_setup(recipe)
    return load_model(model_dir, dtype=dtype, device=device), load_tokenizer(model_dir)


def ckpt_fingerprint(path):
    """Identity of a checkpoint dir for stage keys: its config and the names/sizes/mtimes of its weight files."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.json")) + sorted(path.glob("tokenizer.model"))
    return stable_hash([(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in files])


# ------------------------------------------------------------------------------------------------ shared runners


def _same_answer(task):
    from w2s.tasks import is_equiv

    return functools.partial(lambda a, b, t: is_equiv(a, b, t), t=task)


def generate_stage(ctx, out, model_dir, records, prompt_fn, n=1, temperature=0.0, top_p=1.0, max_new_tokens=None,
                   seed=0):
    """Generate for every record, stream to generations.jsonl (resumable), then write labels.jsonl with answers.

    labels.jsonl rows: {"id", "question", "response", "answer"} for n == 1, or {"id", "question", "samples":
    [{"response", "answer"}, ...]} for n > 1; "answer" is the extracted, normalized final answer ("" if none).
    """
    from w2s.profile import StageProfiler
    from w2s.sampling import generate_to_jsonl
    from w2s.tasks import STOP_STRINGS, extract_answer, normalize_answer

    r, task = ctx.recipe, ctx.recipe.data.task
    model, tok = load(r, model_dir)
    prompts = [{"id": rec["id"], "prompt": prompt_fn(rec)} for rec in records]
    with StageProfiler(model.cfg, mode="inference") as prof:
        results = generate_to_jsonl(
            model, tok, prompts, out / "generations.jsonl", n=n, temperature=temperature, top_p=top_p,
            max_new_tokens=max_new_tokens or r.sampling.max_new_tokens, stop=STOP_STRINGS, seed=seed,
            max_batch=r.sampling.max_batch, cache_len=r.sampling.cache_len or None, progress=ctx.progress)
        prof.add_tokens(sum(c["num_tokens"] for res in results for c in res["completions"]))
    answer = lambda text: normalize_answer(extract_answer(text, task))  # noqa: E731
    rows = []
    for rec, res in zip(records, results):
        assert res["id"] == rec["id"], "sampler must return results in input order"
        comps = res["completions"]
        if n == 1:
            rows.append({"id": rec["id"], "question": rec["question"], "response": comps[0]["text"],
                         "answer": answer(comps[0]["text"])})
        else:
            rows.append({"id": rec["id"], "question": rec["question"],
                         "samples": [{"response": c["text"], "answer": answer(c["text"])} for c in comps]})
    write_jsonl_atomic(out / "labels.jsonl", rows)
    with_answer = sum(bool(row.get("answer")) for row in rows) if n == 1 else None
    return {"n_prompts": len(rows), "n_with_answer": with_answer, **prof.summary()}


def sft_stage(ctx, out, base_dir, rows, section):
    """SFT `base_dir` on rows {"prompt", "response"}; the trained model is exported to out/model (HF format)."""
    from w2s.checkpoint import save_model
    from w2s.train import TrainConfig, train_sft

    model, tok = load(ctx.recipe, base_dir)
    cfg = TrainConfig(**getattr(ctx.recipe, section))
    write_jsonl_atomic(out / "train.jsonl", rows)
    model, stats = train_sft(model, tok, rows, cfg, out_dir=out / "train", progress=ctx.progress)
    save_model(model, out / "model", tokenizer=tok, state_dict=stats.pop("state_dict", None))
    return {"n_rows": len(rows), **stats}


def preference_stage(ctx, out, base_dir, pairs, loss):
    from w2s.checkpoint import save_model
    from w2s.train import TrainConfig, train_preference

    model, tok = load(ctx.recipe, base_dir)
    cfg = TrainConfig(**ctx.recipe.preference)
    model, stats = train_preference(model, tok, pairs, cfg, out_dir=out / "train", loss=loss, progress=ctx.progress)
    save_model(model, out / "model", tokenizer=tok, state_dict=stats.pop("state_dict", None))
    return {"n_pairs": len(pairs), "loss": loss, **stats}


def zero_shot(rec):
    from w2s.tasks import zero_shot_prompt

    return zero_shot_prompt(rec["question"])


def _precision(ctx, answers_by_id):
    """Fraction of given answers that are gold-correct. ANALYSIS ONLY: the one reader of train_2 gold."""
    if not answers_by_id:
        return None
    same = _same_answer(ctx.recipe.data.task)
    gold = {row["id"]: row["answer"] for row in read_jsonl(ctx.dir("00_data") / "train_2_gold.jsonl")}
    return sum(same(a, gold[i]) for i, a in answers_by_id.items()) / len(answers_by_id)


# ------------------------------------------------------------------------------------------------ stage runners


def run_data(ctx, out):
    from w2s.tasks import load_records, load_split, save_split, split_train

    d = ctx.recipe.data
    train = load_records(d.task, d.train)
    if d.split_file:
        train_1, train_2 = load_split(d.split_file, train)
    else:
        sizes = (d.n_train_1, d.n_train_2) if d.n_train_1 or d.n_train_2 else None
        train_1, train_2 = split_train(train, seed=d.seed, sizes=sizes)
    test = load_records(d.task, d.test)
    test = test[: d.n_test] if d.n_test else test
    save_split(out / "split.json", train_1, train_2)
    write_jsonl_atomic(out / "train_1.jsonl", train_1)
    # train_2 is seen by the strong model as questions only; its gold goes to a separate analysis-only file.
    write_jsonl_atomic(out / "train_2.jsonl", [{"id": r["id"], "question": r["question"]} for r in train_2])
    write_jsonl_atomic(out / "train_2_gold.jsonl", [{"id": r["id"], "answer": r["answer"],
                                                     "solution": r["solution"]} for r in train_2])
    write_jsonl_atomic(out / "test.jsonl", test)
    return {"n_train_1": len(train_1), "n_train_2": len(train_2), "n_test": len(test)}


def data_rows(ctx, name):
    return read_jsonl(ctx.dir("00_data") / f"{name}.jsonl")


def labels(ctx, stage):
    return read_jsonl(ctx.dir(stage) / "labels.jsonl")


def demos(ctx):
    from w2s.tasks import select_demos

    r = ctx.recipe
    return select_demos(labels(ctx, "02_weak_labels"), r.data.task, k=r.stage1.n_demos, seed=r.data.seed)


def icl_prompt_fn(ctx):
    from w2s.tasks import few_shot_prompt

    shots = demos(ctx)
    return lambda rec: few_shot_prompt(shots, rec["question"])


def run_filter(ctx, out, weak_stage, icl_stage):
    """Final-answer consistency between two labellings of train_2 -> weak / icl / hybrid SFT sets."""
    from w2s.stages.consistency import consistent, sft_sets

    weak, other = labels(ctx, weak_stage), labels(ctx, icl_stage)
    kept = consistent(weak, other, same_answer=_same_answer(ctx.recipe.data.task))
    sets = sft_sets(weak, other, kept)
    for name, rows in sets.items():
        write_jsonl_atomic(out / f"{name}.jsonl", rows)
    kept_ids = {r["id"] for r in sets["weak"]}
    answers = {r["id"]: r["answer"] for r in weak if r["id"] in kept_ids}
    return {"n_questions": len(weak), "n_kept": len(kept_ids),
            "kept_fraction": len(kept_ids) / max(len(weak), 1), "precision": _precision(ctx, answers)}


def run_pairs(ctx, out):
    from w2s.stages.preference_pairs import build_pairs

    r = ctx.recipe
    samples = {row["id"]: row["samples"] for row in labels(ctx, "14_samples")}
    pairs, counts = build_pairs(labels(ctx, "02_weak_labels"), samples, seed=r.data.seed,
                                max_pairs_per_question=r.stage2.max_pairs, min_confidence=r.stage2.min_confidence,
                                flip_confidence=r.stage2.flip_confidence,
                                same_answer=_same_answer(r.data.task))
    write_jsonl_atomic(out / "pairs.jsonl", pairs)
    chosen = {f"{p['id']}#{i}": p["chosen_answer"] for i, p in enumerate(pairs)} if pairs and \
        "chosen_answer" in pairs[0] else {}
    gold_ids = {k: v for k, v in chosen.items()}
    precision = None
    if gold_ids:
        same = _same_answer(r.data.task)
        gold = {row["id"]: row["answer"] for row in read_jsonl(ctx.dir("00_data") / "train_2_gold.jsonl")}
        precision = sum(same(p["chosen_answer"], gold[p["id"]]) for p in pairs) / len(pairs)
    return {"n_pairs": len(pairs), "pair_precision": precision, **counts}


def run_eval(ctx, out, model_dir, prompt_fn, n=1, temperature=0.0):
    """Greedy test accuracy (n == 1) or pass@k from n samples; MATH also by level."""
    from w2s.stages.metrics import accuracy_by_level, pass_at_k
    from w2s.tasks import is_equiv

    r, task = ctx.recipe, ctx.recipe.data.task
    test = data_rows(ctx, "test")
    counts = generate_stage(ctx, out, model_dir, test, prompt_fn, n=n, temperature=temperature,
                            max_new_tokens=r.sampling.max_new_tokens, seed=r.data.seed)
    rows = labels_at(out)
    gold = {rec["id"]: rec for rec in test}
    if n == 1:
        correct = [is_equiv(row["answer"], gold[row["id"]]["answer"], task) for row in rows]
        result = {"accuracy": sum(correct) / max(len(rows), 1), "n_correct": sum(correct)}
        if task == "math":
            result["accuracy_by_level"] = accuracy_by_level(
                [{"level": gold[row["id"]].get("level"), "correct": c} for row, c in zip(rows, correct)])
    else:
        per_q = [sum(is_equiv(s["answer"], gold[row["id"]]["answer"], task) for s in row["samples"]) for row in rows]
        result = {f"pass@{k}": sum(pass_at_k(n, c, k) for c in per_q) / max(len(per_q), 1)
                  for k in sorted({1, min(5, n), n})}
    write_json_atomic(out / "result.json", result)
    return {**counts, **result}


def labels_at(out):
    return read_jsonl(Path(out) / "labels.jsonl")


# ------------------------------------------------------------------------------------------------ the plan


def build_stages(recipe):
    """The ordered stage list of a recipe (fixed numbers; disabled stages are simply absent)."""
    r = recipe
    strong, weak = r.models.strong, r.models.weak
    s1, s2, samp = r.stage1, r.stage2, r.sampling
    stages = []

    def add(name, deps, options, run, kind):
        stages.append(Stage(name, deps, options, run, kind))

    d = r.data
    add("00_data", [], {"task": d.task, "train": sha256_file(d.train), "test": sha256_file(d.test),
                        "split": sha256_file(d.split_file) if d.split_file else None,
                        "sizes": [d.n_train_1, d.n_train_2, d.n_test], "seed": d.seed},
        run_data, "data")
    sft_opts = lambda section, base: {"train": getattr(r, section), "base": ckpt_fingerprint(base)}  # noqa: E731
    add("01_weak_sft", ["00_data"], sft_opts("weak_sft", weak),
        lambda ctx, out: sft_stage(ctx, out, weak, [{"prompt": zero_shot(x), "response": x["solution"]}
                                                    for x in data_rows(ctx, "train_1")], "weak_sft"), "train")
    gen_opts = {"max_new_tokens": samp.max_new_tokens, "seed": d.seed}
    add("02_weak_labels", ["00_data", "01_weak_sft"], gen_opts,
        lambda ctx, out: generate_stage(ctx, out, ctx.dir("01_weak_sft") / "model", data_rows(ctx, "train_2"),
                                        zero_shot, seed=d.seed), "generate")
    add("03_icl_labels", ["00_data", "02_weak_labels"], {**gen_opts, "strong": ckpt_fingerprint(strong),
                                                         "n_demos": s1.n_demos},
        lambda ctx, out: generate_stage(ctx, out, strong, data_rows(ctx, "train_2"), icl_prompt_fn(ctx),
                                        seed=d.seed), "generate")
    for rnd in range(1, s1.rounds + 1):
        filt, sft_weak, sft_icl, sft_hybrid = ROUND_STAGES[rnd]
        if rnd == 1:
            label_stages = ("02_weak_labels", "03_icl_labels")
        else:
            label_stages = ("08_r2_labels_weak", "09_r2_labels_icl")
            for lab, src in zip(label_stages, ROUND_STAGES[1][1:3]):
                add(lab, ["00_data", src], gen_opts,
                    lambda ctx, out, src=src: generate_stage(ctx, out, ctx.dir(src) / "model",
                                                             data_rows(ctx, "train_2"), zero_shot, seed=d.seed),
                    "generate")
        add(filt, list(label_stages), {"task": d.task},
            lambda ctx, out, ls=label_stages: run_filter(ctx, out, *ls), "filter")
        for sft_name, set_name, prev in zip((sft_weak, sft_icl, sft_hybrid), ("weak", "icl", "hybrid"),
                                            ROUND_STAGES[1][1:]):
            base_stage = prev if (rnd == 2 and s1.round2_init == "continue") else None
            deps = [filt] + ([base_stage] if base_stage else [])
            add(sft_name, deps, sft_opts("strong_sft", strong) | {"round2_init": s1.round2_init if rnd == 2 else None},
                lambda ctx, out, f=filt, s=set_name, b=base_stage: sft_stage(
                    ctx, out, ctx.dir(b) / "model" if b else strong, read_jsonl(ctx.dir(f) / f"{s}.jsonl"),
                    "strong_sft"), "train")
    m_plus = ROUND_STAGES[s1.rounds][3]
    add("14_samples", ["00_data", m_plus], {"n": s2.n_samples, "temperature": s2.temperature, "top_p": s2.top_p,
                                            "max_new_tokens": samp.sample_max_new_tokens, "seed": d.seed},
        lambda ctx, out: generate_stage(ctx, out, ctx.dir(m_plus) / "model", data_rows(ctx, "train_2"), zero_shot,
                                        n=s2.n_samples, temperature=s2.temperature, top_p=s2.top_p,
                                        max_new_tokens=samp.sample_max_new_tokens, seed=d.seed), "generate")
    add("15_pairs", ["00_data", "02_weak_labels", "14_samples"],
        {"min_confidence": s2.min_confidence, "flip_confidence": s2.flip_confidence, "max_pairs": s2.max_pairs,
         "seed": d.seed}, run_pairs, "filter")
    pref_stage_names = {"dpo": "16_dpo", "orpo": "17_orpo", "ipo": "16_ipo"}
    for loss in s2.losses:
        add(pref_stage_names[loss], ["15_pairs", m_plus], {"train": r.preference, "loss": loss},
            lambda ctx, out, loss=loss: preference_stage(ctx, out, ctx.dir(m_plus) / "model",
                                                         _pref_rows(ctx), loss), "train")
    if "full_weak_ft" in r.eval.baselines:
        add("18_full_weak_ft", ["02_weak_labels"], sft_opts("strong_sft", strong),
            lambda ctx, out: sft_stage(ctx, out, strong, [{"prompt": zero_shot(x), "response": x["response"]}
                                                          for x in labels(ctx, "02_weak_labels")], "strong_sft"),
            "train")
    if "ceiling" in r.eval.baselines:
        # The strong ceiling is the one training set built from train_2 gold (PAPER.md: analysis / upper bound).
        add("19_ceiling", ["00_data"], sft_opts("strong_sft", strong),
            lambda ctx, out: sft_stage(ctx, out, strong, _gold_rows(ctx), "strong_sft"), "train")
    _add_evals(recipe, stages, add, m_plus, pref_stage_names)
    return stages


def _pref_rows(ctx):
    from w2s.tasks import zero_shot_prompt

    rows = read_jsonl(ctx.dir("15_pairs") / "pairs.jsonl")
    return [{"prompt": zero_shot_prompt(p["question"]) if "question" in p else p["prompt"],
             "chosen": p["chosen"], "rejected": p["rejected"]} for p in rows]


def _gold_rows(ctx):
    questions = {row["id"]: row["question"] for row in data_rows(ctx, "train_2")}
    return [{"prompt": zero_shot(dict(question=questions[g["id"]])), "response": g["solution"]}
            for g in data_rows(ctx, "train_2_gold")]


# method name in the report -> the stage whose model it evaluates
def _add_evals(recipe, stages, add, m_plus, pref_stage_names):
    r = recipe
    have = {s.name for s in stages}
    methods = [("weak_floor", "01_weak_sft"), ("full_weak_ft", "18_full_weak_ft")]
    for rnd in range(1, r.stage1.rounds + 1):
        for kind, stage in zip(("weak", "icl", "hybrid"), ROUND_STAGES[rnd][1:]):
            methods.append((f"stage1_r{rnd}_{kind}", stage))
    methods += [(f"stage2_{loss}", pref_stage_names[loss]) for loss in r.stage2.losses]
    methods.append(("ceiling", "19_ceiling"))
    number = 20
    for method, stage in methods:
        if stage in have:
            add(f"{number}_eval_{method}", ["00_data", stage], {"method": method, "max_new_tokens":
                                                                  r.sampling.max_new_tokens},
                lambda ctx, out, s=stage: run_eval(ctx, out, ctx.dir(s) / "model", zero_shot), "eval")
        number += 1
    if "strong_icl" in r.eval.baselines:
        add(f"{number}_eval_strong_icl", ["00_data", "02_weak_labels"],
            {"method": "strong_icl", "strong": ckpt_fingerprint(r.models.strong),
             "max_new_tokens": r.sampling.max_new_tokens},
            lambda ctx, out: run_eval(ctx, out, r.models.strong, icl_prompt_fn(ctx)), "eval")
    number += 1
    if r.eval.pass_k_samples:
        for method, stage in [("stage1_plus", m_plus)] + [(f"stage2_{x}", pref_stage_names[x])
                                                           for x in r.stage2.losses]:
            add(f"{number}_passk_{method}", ["00_data", stage], {"n": r.eval.pass_k_samples},
                lambda ctx, out, s=stage: run_eval(ctx, out, ctx.dir(s) / "model", zero_shot,
                                                   n=r.eval.pass_k_samples, temperature=1.0), "eval")
            number += 1


def shuffle_seeded(items, seed):
    items = list(items)
    random.Random(seed).shuffle(items)
    return items
