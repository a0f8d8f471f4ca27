"""The engine that runs a table of stages: keys, skip and resume, meta.json. It knows nothing of the paper.

A Stage is one row of a table (w2s/pipeline.py holds the paper's): a directory name, a runner function
`run(ctx, out_dir, **args) -> counts`, the names of the stages whose outputs it reads, and the options that change
its result. `run_stages` gives every stage the same contract:

  * its key hashes its options and the keys of the stages it reads, so changing an input or an option reruns
    exactly the stages downstream of it;
  * it is done iff its meta.json exists with the current key and none of its inputs ran again since it ran; meta.json
    (options, input keys, the runner's counts, wall time) is written last and atomically, so a killed stage never
    looks finished;
  * every finished run of a stage gets a run id of its own, and the stages that read it record it: a stage deleted
    by hand and run again (after a code change, say) reruns every stage downstream of it, whose inputs may differ
    even though no key changed;
  * a killed stage restarts in the same directory (sampling resumes from its streamed jsonl, training from its last
    checkpoint); a directory left by a different key, or by the same key on inputs since run again, is wiped first;
  * what a runner lists in ctx.cleanup (a training stage's resume state) is deleted only after meta.json is written,
    so a kill between the end of the run and the record of it still finds its last checkpoint to resume from;
    meta.json names those paths, and a kill between the record and the deletion leaves them to the next run, which
    deletes them;
  * a resumed stage first loses the temp files of writes a kill cut short before their rename;
  * `w2s run --reuse DONOR` (take_finished) hard-links in DONOR's finished stages that the run would make with the
    same key from the same input runs, so the engine skips them; the run's own finished stages stay.

Under torchrun every rank runs every stage; rank 0 alone writes shared files, and a barrier closes every stage.

One run per directory: `run_lock` holds an exclusive lock on <run dir>/lock (an flock, so the kernel releases it
when the owner dies, even by kill -9) and writes the owner's pid and host into it. A second pipeline on the same
directory refuses with one line naming the owner; a lock file left by a process that is gone is taken over with a
warning.

    python -m pytest -q tests/test_pipeline.py tests/test_recipe.py
"""

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from w2s.files import remove_temp_files, stable_hash, unshare_links, write_atomic, write_json_atomic
from w2s.parallel import barrier, broadcast_object, is_main


@dataclass
class Stage:
    name: str  # "NN_what": its directory under the run directory
    run: Callable  # run(ctx, out_dir, **args) -> {count: value} for meta.json
    reads: list  # names of the stages whose outputs it reads (their keys enter its key)
    options: dict  # everything else that changes its result (hashed into the key, recorded in meta.json)
    args: dict = field(default_factory=dict)  # keyword arguments of `run`
    kind: str = "other"  # data | train | generate | filter | eval (for the report)


@dataclass
class Context:
    """What a runner gets besides its output directory: the recipe, where the run lives, and room to keep state
    between stages (the model resident in memory, so the next stage that samples from it need not reload it)."""

    recipe: object
    run_dir: Path
    keys: dict = field(default_factory=dict)
    runs: dict = field(default_factory=dict)  # stage -> its finished output's run id (None: meta.json has none)
    log: Callable = print
    progress: bool = True  # progress bars inside stages (sampling, training)
    resident: tuple | None = None  # (checkpoint dir, model, tokenizer) kept in memory between stages
    stage: str | None = None  # the stage now running (for logs and for tests that watch who reads what)
    cleanup: list = field(default_factory=list)  # paths the running stage no longer needs once it is recorded done

    def dir(self, stage_name):
        return self.run_dir / stage_name


class RunLocked(RuntimeError):
    """Another live process runs a pipeline in this run directory."""


@contextlib.contextmanager
def run_lock(run_dir, log=print):
    """Hold <run_dir>/lock for the duration of a run (rank 0 takes it; every rank learns whether it got it)."""
    handle, refusal = _take_lock(Path(run_dir) / "lock", log) if is_main() else (None, None)
    with _holding(handle, refusal, empty_first=True):  # a name left in the file: its owner was killed
        yield


@contextlib.contextmanager
def reading_lock(run_dir):
    """Hold a shared lock on another run's <run_dir>/lock while taking its stages (`w2s run --reuse`): takers share
    it, and the pipeline that runs there (which holds it exclusively) neither starts nor is met half-way. Opened
    read-only, and no lock file means no run there: a donor on a read-only file system needs nothing written."""
    handle, refusal, path = None, None, Path(run_dir) / "lock"
    if is_main() and path.is_file():
        handle = open(path)
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            refusal = f"--reuse {run_dir}: a pipeline is running there ({handle.read().strip()}); wait for it to finish"
            handle.close()
            handle = None
    with _holding(handle, refusal):
        yield


@contextlib.contextmanager
def _holding(handle, refusal, empty_first=False):
    """On every rank: raise rank 0's refusal, or run the block holding rank 0's lock file, closed (emptied first)
    however the block ends."""
    if refusal := broadcast_object(refusal):
        raise RunLocked(refusal)
    try:
        yield
    finally:
        if handle is not None:
            if empty_first:
                handle.truncate(0)
            handle.close()


def _take_lock(path, log):
    """(open lock file, None) when this process now owns `path`, else (None, the one-line refusal)."""
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        return None, (f"{path.parent}: another pipeline is running in this run directory ({owner}); wait for it, "
                      f"or use another run name")
    handle.seek(0)
    previous = handle.read().strip()
    if previous:  # the flock was free, so the process named here is gone without releasing the lock cleanly
        log(f"warning: {path}: taking over a stale lock ({previous}; that process is gone)")
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on host {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    return handle, None


def stage_key(stage, keys):
    return stable_hash({"stage": stage.name, "options": stage.options, "deps": {d: keys[d] for d in stage.reads}})


STAGES_FILE = "stages.json"  # in a run directory: the {stage: key} of the table its latest run started with


def table_keys(stages):
    """{stage: key} of a whole table, in its order (a key hashes the keys of the stages it reads)."""
    keys = {}
    for stage in stages:
        keys[stage.name] = stage_key(stage, keys)
    return keys


def current_metas(metas, keys=None, unfinished=()):
    """The finished stages (name -> meta.json) that belong to the run as it stands: when `keys` (the current table's
    {stage: key}, a run's stages.json) is given, those the table has with its key; and of those, the ones none of
    whose inputs ran again since, is running again (a directory in `unfinished`: no meta.json) or was itself left
    out, transitively. An input whose directory is gone (deleted to free disk) leaves its readers in."""
    kept = {n: m for n, m in metas.items() if keys is None or keys.get(n) == m.get("key")}

    def current(meta):
        recorded = meta.get("input_runs")
        # a meta.json without input_runs read inputs that had no run id: None
        inputs = recorded if recorded is not None else dict.fromkeys(meta.get("inputs", {}))
        return not any(d in unfinished or (d in metas and (d not in kept or kept[d].get("run") != run))
                       for d, run in inputs.items())

    while stale := [n for n, m in kept.items() if not current(m)]:
        for name in stale:
            del kept[name]
    return kept


def stale_inputs(meta, reads, runs):
    """The inputs of a finished stage that ran again since it ran: the run id its meta.json recorded for them is not
    theirs now. A meta.json without input_runs read inputs that had no run id: an input that has one now ran
    after it."""
    recorded = meta.get("input_runs") or {}
    return [d for d in reads if recorded.get(d) != runs.get(d)]


def dir_id(key, input_runs):
    """What a stage directory's key.txt holds: the key, and the run ids of the inputs its partial outputs were made
    from (the key alone when no input has a run id)."""
    return key if not any(input_runs.values()) else f"{key} {stable_hash(input_runs)}"


def read_meta(stage_dir):
    """A stage's meta.json, or None when it is absent or unreadable (not done)."""
    meta_file = Path(stage_dir) / "meta.json"
    if not meta_file.is_file():
        return None
    try:
        return json.loads(meta_file.read_text())
    except json.JSONDecodeError:
        return None


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
        stale = stale_inputs(meta, stage.reads, ctx.runs) if meta is not None and meta.get("key") == key else None
        if stale == []:
            status[stage.name] = "skipped"
            ctx.runs[stage.name] = meta.get("run")
            ctx.log(f"{tag}: done (key {key}), skipped")
            _remove_leftovers(out, meta.get("cleanup", []))
            continue
        input_runs = {d: ctx.runs[d] for d in stage.reads}
        # a taken directory's files are the donor's (hard links): never resumed into, always wiped
        _prepare_dir(out, dir_id(key, input_runs), wipe=bool(stale) or taken_from(out) is not None)
        ctx.stage, ctx.cleanup = stage.name, []
        ctx.log(f"{tag}: running" + (f" again: {', '.join(stale)} ran again since it ran" if stale else ""))
        t0 = time.perf_counter()
        counts = stage.run(ctx, out, **stage.args) or {}
        barrier()  # every rank has finished the stage's writes before anyone records it done or reads it
        wall = time.perf_counter() - t0
        run_id = broadcast_object(uuid.uuid4().hex if is_main() else None)  # the same on every rank
        ctx.runs[stage.name] = run_id
        meta = {"stage": stage.name, "kind": stage.kind, "key": key, "options": stage.options,
                "inputs": {d: ctx.keys[d] for d in stage.reads}, "run": run_id, "input_runs": input_runs, **counts,
                "wall_s": round(wall, 3)}
        if ctx.cleanup:  # relative to the stage directory, so that a moved run still finds them
            meta["cleanup"] = [os.path.relpath(path, out) for path in ctx.cleanup]
        if is_main():
            write_json_atomic(out / "meta.json", meta)
            for path in ctx.cleanup:
                shutil.rmtree(path, ignore_errors=True)
        barrier()
        status[stage.name] = "ran"
        ctx.log(f"{tag}: finished in {wall:.1f}s")
    return status


def _remove_leftovers(out, cleanup):
    """A finished stage's cleanup paths that a kill between its meta.json and their deletion left (a training
    stage's resume state: at 70B, the optimizer state). Every rank reads the same meta.json: all or none return here."""
    if not cleanup:
        return
    if is_main():
        for path in cleanup:
            shutil.rmtree(Path(out) / path, ignore_errors=True)
    barrier()


TAKEN_FILE = "taken_from.txt"  # in a stage directory that `w2s run --reuse` took: where from
ASIDE_DIR = ".aside"  # in a run directory: stages being copied in or deleted, out of the report's */meta.json


def judged_by(stage, key, run_dir, donor_dir, runs):
    """(the meta.json a run in run_dir judges `stage` by, whether it takes the stage from donor_dir: `w2s run
    --reuse`). It takes donor_dir's when that has the key and was made from the inputs this run will have (runs:
    {stage: run id} so far), unless run_dir's own stands: the key, current inputs, and not an earlier take of a
    stage donor_dir has since run again."""
    own = read_meta(Path(run_dir) / stage.name)
    donor = read_meta(Path(donor_dir) / stage.name) if donor_dir is not None else None
    retake = (usable(donor, stage, key, runs) and (own or {}).get("run") != donor.get("run")
              and taken_from(Path(run_dir) / stage.name) == str((Path(donor_dir) / stage.name).resolve()))
    if usable(own, stage, key, runs) and not retake:
        return own, False
    return (donor, True) if usable(donor, stage, key, runs) else (own, False)


def taken_from(stage_dir):
    """Where a stage directory was taken from (its taken_from.txt), or None: its own run's."""
    path = Path(stage_dir) / TAKEN_FILE
    return path.read_text().strip() if path.is_file() else None


def usable(meta, stage, key, runs):
    """A finished record of `stage` that a run with these inputs (runs: {stage: run id}) skips: its key, its inputs."""
    return meta is not None and meta.get("key") == key and not stale_inputs(meta, stage.reads, runs)


def take_finished(stages, donor_dir, run_dir):
    """Hard-link (copy, across file systems) into run_dir each stage it takes from donor_dir (judged_by), meta.json
    and run id included, so the engine skips it. Each goes through a temp directory renamed into place: a kill leaves
    no stage that looks finished without its files. -> the names taken. Rank 0 decides and links; call it on every
    rank."""
    taken, keys, runs = [], table_keys(stages), {}
    if is_main():
        # what a kill left half-copied or half-deleted (.taking: the same leftover under its other name)
        for leftover in (ASIDE_DIR, ".taking"):
            shutil.rmtree(Path(run_dir) / leftover, ignore_errors=True)
        for stage in stages if donor_dir is not None else []:
            meta, take = judged_by(stage, keys[stage.name], run_dir, donor_dir, runs)
            # object(): a stage that will run gets a run id no record holds yet
            runs[stage.name] = meta.get("run") if usable(meta, stage, keys[stage.name], runs) else object()
            if take:
                taken.append(stage.name)
                _take(Path(donor_dir) / stage.name, Path(run_dir) / stage.name, meta.get("cleanup", []))
        shutil.rmtree(Path(run_dir) / ASIDE_DIR, ignore_errors=True)  # emptied by the renames
    barrier()
    return broadcast_object(taken)


def _take(donor, target, cleanup):
    """Copy donor's stage directory in as target (links), without the resume state its meta.json lists as cleanup,
    through a temp directory renamed into place; the stage it replaces is set aside before it is deleted."""
    tmp = target.parent / ASIDE_DIR / target.name
    leftovers = {os.path.normpath(path) for path in cleanup}
    shutil.copytree(donor, tmp, copy_function=_link_or_copy,
                    ignore=lambda folder, names: [n for n in names
                                                  if os.path.relpath(os.path.join(folder, n), donor) in leftovers])
    write_atomic(tmp / TAKEN_FILE, f"{donor.resolve()}\n")  # a new file, not written through a link
    old = _set_aside(target) if target.exists() else None
    os.rename(tmp, target)
    if old is not None:
        _delete_aside(old)


def _set_aside(stage_dir):
    """Rename a stage directory aside, to be deleted there: a kill mid-delete leaves no half of it that looks
    finished (its meta.json beside some of its outputs). take_finished clears what such a kill left aside."""
    aside = stage_dir.parent / ASIDE_DIR / f"{stage_dir.name}.old"
    if aside.exists():
        shutil.rmtree(aside)
    aside.parent.mkdir(exist_ok=True)
    os.rename(stage_dir, aside)
    return aside


def _delete_aside(aside):
    """Delete what _set_aside put aside, and the aside directory once it holds nothing else."""
    shutil.rmtree(aside)
    with contextlib.suppress(OSError):  # not empty: a take in progress, or another leftover
        aside.parent.rmdir()


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(src, dst)


def plan(stages, run_dir, donor_dir=None):
    """What run_stages would do, running nothing: [(stage, "done" | "taken" | "will run" | "will rerun", [reasons])],
    the reasons naming each option whose value changed (old -> new), each input whose key changed, and each input
    that runs again (or ran again since). donor_dir: the run `w2s run --reuse` takes finished stages from ("taken")."""
    keys, runs, rows = {}, {}, []
    for stage in stages:
        key = keys[stage.name] = stage_key(stage, keys)
        out = Path(run_dir) / stage.name
        meta, taken = judged_by(stage, key, run_dir, donor_dir, runs)
        if meta is not None and meta.get("key") == key:
            stale = stale_inputs(meta, stage.reads, runs)
            again = [f"input {d} runs again (or ran again since)" for d in stale]
            rows.append((stage, "will rerun", again) if stale else
                        (stage, "taken", [f"from {donor_dir}"]) if taken else (stage, "done", []))
        elif meta is None:
            inputs = {d: runs[d] for d in stage.reads}
            started = (out / "key.txt").is_file()
            resumes = (started and all(isinstance(r, (str, type(None))) for r in inputs.values())  # none runs again
                       and (out / "key.txt").read_text().strip() == dir_id(key, inputs) and taken_from(out) is None)
            rows.append((stage, "will run", ["killed before it finished: resumes from what it kept" if resumes else
                                             "started under other options or inputs: starts over" if started else
                                             "not run yet"]))
        else:
            current = json.loads(json.dumps(stage.options, default=str))  # as meta.json holds it (tuples -> lists)
            reasons = [_change(path, old, new) for path, old, new in _diff(meta.get("options", {}), current)]
            before = meta.get("inputs", {})
            reasons += [f"input {d} changed" if d in before else f"now reads {d}" for d in stage.reads
                        if before.get(d) != keys[d]]
            reasons += [f"no longer reads {d}" for d in before if d not in stage.reads]
            rows.append((stage, "will rerun", reasons or ["its key changed"]))
        # object(): a stage that will run gets a run id no record holds yet
        runs[stage.name] = meta.get("run") if rows[-1][1] in ("done", "taken") else object()
    return rows


def _change(path, old, new):
    if new is _ABSENT:
        return f"{path} left the key"
    return f"{path} is new in the key ({new!r})" if old is _ABSENT else f"{path}: {old!r} -> {new!r}"


_ABSENT = object()


def _diff(old, new, prefix=""):
    """[(dotted path, old value, new value)] of the leaves that differ between two option dicts."""
    changed = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name, _ABSENT), new.get(name, _ABSENT)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _diff(a, b, f"{prefix}{name}.")
        elif a != b:
            changed.append((prefix + name, a, b))
    return changed


def _prepare_dir(out, key, wipe=False):
    """Keep a killed run's partial outputs only if they were made under the same key (key.txt: dir_id); wipe anything
    else, and a finished stage's outputs when it runs again (wipe)."""
    if is_main():
        key_file, old = out / "key.txt", None
        if out.exists() and (wipe or not key_file.is_file() or key_file.read_text().strip() != key):
            old = _set_aside(out)
        elif out.exists():  # a resume: what a kill left half-written before its rename is no output
            remove_temp_files(out)
            unshare_links(out)  # a stage another run took (--reuse): what this run appends stays its own
        out.mkdir(parents=True, exist_ok=True)
        (out / "meta.json").unlink(missing_ok=True)
        key_file.write_text(key + "\n")  # before the old copy goes: a kill while it is deleted leaves a started stage
        if old is not None:
            _delete_aside(old)
    barrier()
