"""Sampling to a jsonl file: streamed as prompts finish, resumable after a kill, merged in input order at the end.

    records = read_prompts_jsonl("prompts.jsonl")                       # [{"id", "prompt", ...}], checked per line
    generate_to_jsonl(model, tok, records, "out.jsonl", n=10, temperature=1.0)
    w2s sample CKPT --input prompts.jsonl --output out.jsonl -n 10 --temperature 1   # the same from the shell

Each rank that writes (one per data-parallel group) appends finished prompts to out.jsonl.part<rank>; a rerun reads
out.jsonl and every part file, skips the ids it finds and drops a line torn by the kill; when every record has its
line, rank 0 writes out.jsonl in input order (temp file, fsync, rename) and removes the parts. A line found for an
id whose prompt is not the input's is refused (another input file), and what the lines were sampled with is
checked by `w2s sample` (OUTPUT.meta.json). The sampling itself is w2s/sampling.py's `generate_shard`.

    python -m pytest -q tests/test_sampling.py -k jsonl
"""

import glob
import json
import os
from pathlib import Path

from w2s import parallel
from w2s.checkpoint import naming_path
from w2s.data import is_token_id
from w2s.files import read_json, read_jsonl, write_atomic
from w2s.sampling import dp_layout, generate_shard


def read_prompts_jsonl(path, prompt_key="prompt", id_key="id", with_lines=False):
    """The records of a prompts file, one JSON object per line, each with a prompt (a string or a list of token ids)
    under `prompt_key` and a unique id under `id_key` (id_key "" or None: the record's 0-based index). Blank lines
    are skipped; a bad line is a one-line ValueError naming path:line, and so is a file of no record. with_lines:
    (records, ["path:line" of each record]), for the errors of later checks."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such prompts file (expected jsonl, one {{{prompt_key!r}: ...}} per line)")
    records, seen, lines = [], {}, []
    for record in read_jsonl(path, tag_lines=True):
        where = record.pop("_where")
        lines.append(where)
        prompt = record.get(prompt_key)
        is_ids = isinstance(prompt, list) and prompt and all(map(is_token_id, prompt))
        if not (isinstance(prompt, str) and prompt) and not is_ids:
            got = "missing" if prompt_key not in record else f"got {prompt!r}"[:80]
            raise ValueError(f"{where}: expected key {prompt_key!r} with a non-empty string or list of token ids "
                             f"({got})")
        if id_key:
            if id_key not in record:
                raise ValueError(f"{where}: missing id key {id_key!r} (choose another with --id-key, or pass "
                                 f"--id-key '' to number the records)")
        else:
            record = {**record, "id": len(records)}
        key = json.dumps(record[id_key or "id"])
        if key in seen:
            raise ValueError(f"{where}: id {key} repeats line {seen[key]} (ids must be unique)")
        seen[key] = where.rsplit(":", 1)[1]
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no prompts (an empty file)")
    return (records, lines) if with_lines else records


def _complete_lines(path):
    """({json id: record} of the complete lines, byte length of those lines) of an output jsonl. A last line without
    its newline was torn by a killed writer and is ignored; any other bad line is a one-line error."""
    done, size = {}, 0
    if not Path(path).is_file():
        return done, size
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n"):
                break  # the writer died mid-line: everything before it is intact
            try:
                record = json.loads(raw)
                key = json.dumps(record["id"])
            except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError) as e:
                raise ValueError(f"{path}:{line_number}: not a completion line with an 'id' ({type(e).__name__}); "
                                 f"was it written by another program? Move it away to start over") from None
            done[key] = record
            size += len(raw)
    return done, size


def run_meta_path(out_path):
    return Path(f"{out_path}.meta.json")


def check_run_meta(out_path, meta):
    """Refuse to resume out_path when it was sampled with other options than `meta` (a JSON-able dict: the model and
    every option that changes the samples), one line naming what differs; or when partial output exists without a
    record of its options. Returns True when meta still has to be written (a fresh output)."""
    out_path, meta_path = Path(out_path), run_meta_path(out_path)
    started = out_path.exists() or any(part.stat().st_size for part in _part_paths(out_path))
    if not meta_path.is_file() or not started:  # a record of a run that wrote nothing (it failed or was killed
        if started:  # before its first prompt finished) binds nothing: a fresh run replaces it
            raise ValueError(f"{out_path}: exists without {meta_path.name}, so what it was sampled with is unknown; "
                             f"use another output path, or delete {out_path.name} and its .part files to start over")
        return True
    try:
        old = read_json(meta_path)
    except ValueError as e:
        raise ValueError(f"{e}; delete it and {out_path.name}* to start over") from None
    meta = json.loads(json.dumps(meta))  # as stored: tuples become lists
    diffs = [k for k in sorted(set(old) | set(meta)) if old.get(k) != meta.get(k)]
    if diffs:
        said = "; ".join(f"{k} {old.get(k)!r}, now {meta.get(k)!r}" for k in diffs)
        raise ValueError(f"{out_path}: was sampled with other options ({said})"[:400] + f"; use another output path, "
                         f"or delete {out_path.name}* to start over")
    return False


def write_run_meta(out_path, meta):
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with naming_path(run_meta_path(out_path)):
        write_atomic(run_meta_path(out_path), json.dumps(meta, indent=2) + "\n")


def _check_prompts(out_path, records, keys, done, prompt_key):
    """A finished line must have been sampled from the same prompt as the input record of its id."""
    for record, key in zip(records, keys):
        line = done.get(key)
        if line is not None and "prompt" in line and line["prompt"] != record[prompt_key]:
            raise ValueError(f"{out_path}: id {key} was sampled from another prompt than the input's (another input "
                             f"file?); use another output path, or delete {out_path.name} and its .part files")


def _part_paths(out_path):
    return sorted(out_path.parent.glob(glob.escape(out_path.name) + ".part*"))


def already_sampled(out_path):
    """{json.dumps(id): finished line} of the records out_path and its part files hold (what a resume skips)."""
    done = _complete_lines(out_path)[0]
    for part in _part_paths(out_path):
        done.update(_complete_lines(part)[0])
    return done


def generate_to_jsonl(model, tokenizer, records, out_path, prompt_key="prompt", id_key="id", progress=True,
                      **generate_kwargs):
    """Sample every record's prompt and write {"id", "prompt", "completions": [n dicts]} lines to out_path.

    Lines are appended (and flushed) to `out_path.part<rank>` as prompts finish; a rerun skips the ids found in
    out_path and the part files, so an interrupted run resumes without redoing finished prompts (a line torn by the
    kill is dropped and redone). At the end the lines are merged in input order into out_path atomically (temp file,
    fsync, rename) and the parts removed, so the final file equals an uninterrupted run's (same seed: the RNG is
    keyed by the record's input index), up to float rounding: the rest is batched otherwise than it would have been,
    which can flip a draw that lands within ~1e-7 of a boundary (w2s/sampling_engine.py). Returns out_path. Records
    need a unique `id_key` (default "id") and a `prompt_key` (string or token ids). The other keyword arguments are
    those of `generate`.
    """
    import torch.distributed as dist

    out_path = Path(out_path)
    keys = []
    for i, r in enumerate(records):
        if prompt_key not in r or id_key not in r:
            raise ValueError(f"record {i}: missing key {prompt_key!r} or {id_key!r} (keys: {sorted(r)})")
        keys.append(json.dumps(r[id_key]))
    if len(set(keys)) != len(keys):
        raise ValueError(f"records: {id_key!r} values are not unique")
    opts = {k: v for k, v in generate_kwargs.items() if k != "prompt_indices"}
    distributed = dist.is_available() and dist.is_initialized()
    rank = parallel.rank()
    writer = dp_layout(model)[2]

    done = already_sampled(out_path)
    _check_prompts(out_path, records, keys, done, prompt_key)
    todo = [i for i, k in enumerate(keys) if k not in done]
    # every record is checked, encoded and sized on every rank before any file is touched (identical shapes in a
    # resumed run and on every rank)
    shard = generate_shard(model, tokenizer, [r[prompt_key] for r in records], todo=todo,
                           names=[f"record {k}" for k in keys], progress=progress, **opts)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if distributed:
        dist.barrier()  # every rank has read the files before a writer touches its part
    part = Path(f"{out_path}.part{rank}")
    if writer and part.exists():  # cut a torn last line (in place: never a moment without the finished lines)
        size = _complete_lines(part)[1]
        if part.stat().st_size != size:
            os.truncate(part, size)
    f = open(part, "a", encoding="utf-8") if writer else None
    try:
        for i, completions in shard:
            if f is not None:
                with naming_path(part):  # a full disk names the file it could not append to
                    f.write(json.dumps({"id": records[i][id_key], "prompt": records[i][prompt_key],
                                        "completions": completions}) + "\n")
                    f.flush()
    finally:
        if f is not None:
            f.close()
    if distributed:
        dist.barrier()
    if rank == 0:
        done = already_sampled(out_path)
        missing = [r[id_key] for r, k in zip(records, keys) if k not in done]
        if missing:
            raise RuntimeError(f"{out_path}: {len(missing)} record(s) have no output after sampling, e.g. id "
                               f"{missing[0]!r}")
        with naming_path(out_path):
            write_atomic(out_path, (json.dumps(done[k]) + "\n" for k in keys))
        for p in _part_paths(out_path):
            p.unlink()
    if distributed:
        dist.barrier()
    return out_path
