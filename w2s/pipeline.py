"""The weak-to-strong pipeline: every stage of PAPER.md, in order, with artifacts, skip and resume.

Each stage is a small function `(ctx, out_dir) -> counts` that reads its inputs from earlier stage directories and
writes its outputs into `runs/<name>/<NN_stage>/`. The runner around it gives every stage the same contract:

  * a stage's key hashes its own options and the keys of the stages it reads, so changing an input or option
    reruns exactly the stages downstream of it;
  * a stage is done iff its meta.json exists with the current key; meta.json (resolved options, input keys, counts,
    wall time, tokens, tokens/s, MFU, peak memory) is written last and atomically, so a killed stage never looks
    finished;
  * a killed stage restarts in the same directory: sampling resumes from its streamed jsonl, training from its
    last checkpoint (TrainConfig.ckpt_every); a directory left by a different key is wiped first.

Stages (numbers are fixed so that directory names never shift when a recipe turns stages off):

    00_data           split train into train_1 (gold, weak SFT) and train_2 (questions only); test
    01_weak_sft       SFT the weak model on train_1 gold                                     -> weak model
    02_weak_labels    weak model, zero-shot greedy on train_2                                 -> D_weak
    03_icl_labels     strong base, 4-shot with weak demos, greedy on train_2                  -> D_icl
    04_r1_filter      final-answer consistency -> weak / icl / hybrid SFT sets
    05-07_r1_sft_*    SFT the strong base on each set                   -> M_weak-ft, M_icl-ft, M_hybrid-ft
    08-09_r2_labels_* round-1 weak-ft / icl-ft models relabel train_2 zero-shot
    10_r2_filter      consistency again
    11-13_r2_sft_*    SFT again (from base or continued)                     -> r2 hybrid = M_plus
    14_samples        M_plus: n samples per train_2 question at T=1
    15_pairs          majority vote, confidence, preference pairs (weak response always one side)
    16_dpo, 17_orpo   preference optimization of M_plus (16_ipo on request)                   -> M_pro
    18_full_weak_ft   baseline: SFT the strong base on all of D_weak
    19_ceiling        baseline: SFT the strong base on gold train_2
    20-30_eval_*      greedy test accuracy of every trained model (w2s/plan.py EVAL_NUMBERS)
    31_eval_strong_icl  baseline: the strong base, 4-shot with the same weak demos, on test
    32-34_passk_*     pass@k of M_plus and M_pro from n samples at T=1 ([eval] pass_k_samples)

Under torchrun every rank runs every stage (training is FSDP2-sharded, sampling splits prompts over ranks); only
rank 0 writes shared files, and a barrier closes every stage.

    python scripts/pipeline.py recipes/gsm8k.toml          # or: torchrun --nproc_per_node=8 scripts/pipeline.py ...
    python -m pytest -q tests/test_pipeline.py
"""

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable


def sha256_file(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def stable_hash(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rank():
    """This process's rank under torchrun (0 in a plain python run). Only rank 0 writes shared artifacts."""
    return int(os.environ.get("RANK", "0"))


def is_main():
    return rank() == 0


def barrier():
    """Wait for every rank (no-op without a process group): readers must not run ahead of rank 0's writes."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def write_json_atomic(path, obj):
    """Write to a temp file, fsync, rename: readers see the old file or the whole new one, never half of it.
    Rank 0 only (other ranks return at once; a barrier() must come before anyone reads the file)."""
    if not is_main():
        return
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_jsonl_atomic(path, rows):
    """write_json_atomic for a list of rows, one JSON object per line."""
    if not is_main():
        return
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_jsonl(path):
    """Rows of a jsonl file; a malformed line is an error naming the file and line."""
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: malformed JSON line ({e.msg})") from None
    return rows


@dataclass
class Stage:
    name: str  # "NN_what": the directory name
    deps: list  # names of the stages whose outputs it reads
    options: dict  # everything else that changes its output (hashed into the key, recorded in meta.json)
    run: Callable  # (ctx, out_dir) -> dict of counts/metrics for meta.json
    kind: str = "other"  # data | train | generate | filter | eval (for the report)


@dataclass
class Context:
    recipe: object
    run_dir: Path
    keys: dict = field(default_factory=dict)
    log: Callable = print
    progress: bool = True  # progress bars inside stages (sampling, training)
    resident: tuple | None = None  # (checkpoint dir, model, tokenizer) kept in memory between stages
    stage: str | None = None  # the stage now running (for logs and for tests that watch who reads what)

    def dir(self, stage_name):
        return self.run_dir / stage_name


def stage_key(stage, keys):
    return stable_hash({"stage": stage.name, "options": stage.options, "deps": {d: keys[d] for d in stage.deps}})


def read_meta(stage_dir):
    meta_file = Path(stage_dir) / "meta.json"
    if not meta_file.is_file():
        return None
    try:
        return json.loads(meta_file.read_text())
    except json.JSONDecodeError:
        return None  # a torn write cannot happen (atomic rename); treat anything unreadable as not done


def run_stages(stages, ctx):
    """Run every stage not already done with the current key; return {stage name: 'ran' | 'skipped'}.

    A stage that raises leaves no meta.json (its partial outputs stay for the resume) and stops the run; every
    stage finished before it keeps its meta.json and is skipped next time.
    """
    status = {}
    for i, stage in enumerate(stages):
        key = stage_key(stage, ctx.keys)
        ctx.keys[stage.name] = key
        out = ctx.dir(stage.name)
        meta = read_meta(out)
        tag = f"[{i + 1}/{len(stages)}] {stage.name}"
        if meta is not None and meta.get("key") == key:
            status[stage.name] = "skipped"
            ctx.log(f"{tag}: done (key {key}), skipped")
            continue
        _prepare_dir(out, key)
        ctx.stage = stage.name
        ctx.log(f"{tag}: running")
        t0 = time.perf_counter()
        counts = stage.run(ctx, out) or {}
        barrier()  # every rank has finished the stage's writes before anyone records it done or reads it
        wall = time.perf_counter() - t0
        meta = {"stage": stage.name, "kind": stage.kind, "key": key, "options": stage.options,
                "inputs": {d: ctx.keys[d] for d in stage.deps}, **counts, "wall_s": round(wall, 3)}
        write_json_atomic(out / "meta.json", meta)
        barrier()
        status[stage.name] = "ran"
        ctx.log(f"{tag}: finished in {wall:.1f}s")
    return status


def _prepare_dir(out, key):
    """Keep a killed run's partial outputs only if they were made under the same key; wipe anything else."""
    if is_main():
        key_file = out / "key.txt"
        if out.exists() and (not key_file.is_file() or key_file.read_text().strip() != key):
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "meta.json").unlink(missing_ok=True)
        key_file.write_text(key + "\n")
    barrier()


def run_pipeline(recipe_path, runs_dir="runs", progress=True, log=print, plot=True):
    """Validate the recipe (before any model is loaded), run every stage not yet done, write the report.

    Returns (run dir, {stage: 'ran' | 'skipped'}, report text).
    """
    from w2s.plan import build_stages
    from w2s.recipe import load_recipe
    from w2s.report import report

    recipe = load_recipe(recipe_path)
    world = int(os.environ.get("WORLD_SIZE", 1))
    for key in ("tp", "weak_tp"):  # say so now, not after the first training stage
        tp = getattr(recipe.sampling, key)
        if world % tp:
            raise ValueError(f"{recipe_path}: [sampling] {key} = {tp} must divide the number of processes ({world}); "
                             f"launch with torchrun --nproc_per_node a multiple of it (make ... NPROC=N), or set "
                             f"{key} = 1")
    if "WORLD_SIZE" in os.environ:  # torchrun: join the process group before the first collective (barrier)
        from w2s.parallel import init_distributed

        init_distributed()
    run_dir = Path(runs_dir) / recipe.name
    if is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "recipe.json", asdict(recipe))
    barrier()
    stages = build_stages(recipe)
    ctx = Context(recipe, run_dir, log=log if is_main() else (lambda *a: None), progress=progress and is_main())
    status = run_stages(stages, ctx)
    text = report(run_dir, plot=plot) if is_main() else ""
    return run_dir, status, text
