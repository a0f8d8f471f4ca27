"""Files: jsonl in, atomic writes out, content hashes: the helpers the stages, the trainer and the sampler share.

    rows = read_jsonl("data/train.jsonl")                    # [dict]; a broken line is one error naming file:line
    rows = read_jsonl(path, tag_lines=True)                  # each row also gets "_where": "path:line"
    require(row, "question", row["_where"])                  # a non-empty string, or one error naming file:line
    write_atomic(path, text_or_bytes)                        # temp file, fsync, rename: never half a file
    write_json_atomic(path, obj); write_jsonl_atomic(path, rows)
    read_json(path)                                          # a JSON object (or list), or one error naming the file
    sha256_file(path); stable_hash(obj)                      # content hash of a file; short hash of JSON data

A reader of a file written here sees the old file or the whole new one. The temp file has a name of its own
(pid and a random part), so two writers of one path never share a temp file.

    python -m pytest -q tests/test_files.py
"""

import codecs
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path


def read_jsonl(path, tag_lines=False):
    """Rows of a jsonl file, blank lines skipped. Every line must be a JSON object: anything else is a ValueError
    naming file:line (and column). tag_lines=True adds "_where": "file:line" to each row, for later row errors."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, expected a jsonl file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    rows = []
    with path.open("rb") as f:  # bytes, decoded line by line, so that a byte that is not UTF-8 is named by its line
        for line_number, raw in enumerate(f, 1):
            if line_number == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)  # an editor's byte-order mark is not part of line 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{line_number}: not UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} "
                                 f"of the line)") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))  # so the column counts from this line's start
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_number}: expected a JSON object per line, got {type(row).__name__}")
            if tag_lines:
                row["_where"] = f"{path}:{line_number}"
            rows.append(row)
    return rows


def row_id(row, key, default, where):
    """row[key] as a string when the row has the key (a non-empty string or an integer), else `default`; a null,
    empty or other value is a ValueError naming the place and the key."""
    if key not in row:
        return default
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise ValueError(f"{where}: key {key!r} must be a non-empty string or an integer, got {value!r}")
    return str(value)


def require(row, key, where):
    """row[key] as a non-empty string, else a ValueError naming the place ("file:line") and the key."""
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        got = "missing" if key not in row else f"got {value!r}"[:80]
        raise ValueError(f"{where}: expected key {key!r} with a non-empty string ({got})")
    return value


def read_json(path, expected=dict):
    """The JSON value in the file at `path`, of type `expected` (dict: an object, list: a list): a record this
    project wrote (a stage's meta.json, a checkpoint's train_state.json) or one it reads (config.json,
    adapter_config.json, tokenizer files). A torn, hand-edited or foreign file is one ValueError naming it: a byte
    that is not UTF-8, broken JSON (with its line) or another type (callers add what to do about it)."""
    try:
        value = json.loads(Path(path).read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        # as read_jsonl says it: 1-based, counted after a byte-order mark
        raise ValueError(f"{path}: not UTF-8 (byte 0x{e.object[e.start]:02x} at byte {e.start + 1})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(value, expected):
        want = {dict: "a JSON object", list: "a JSON list"}[expected]
        raise ValueError(f"{path}: expected {want}, got {type(value).__name__}")
    return value


def write_atomic(path, data):
    """Write `data` to `path` through a unique temp file in the same directory, fsync, rename. data: str (utf-8),
    bytes, or an iterable of str chunks (streamed: a large jsonl never sits in memory as one string)."""
    path = Path(path)
    tmp = unique_temp_path(path)
    try:
        with open(tmp, "xb") as f:
            for chunk in [data] if isinstance(data, (str, bytes)) else data:
                f.write(chunk.encode("utf-8") if isinstance(chunk, str) else chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def unique_temp_path(path):
    """A sibling of `path` no other process or thread picks: "<name>.<pid>.<random>.tmp" (created with the usual
    permissions, unlike mkstemp's owner-only ones, so a run directory stays readable by a group)."""
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _process_umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# What a plainly created file gets (rw for everyone the umask allows), read once: the umask is process-wide.
USUAL_FILE_MODE = 0o666 & ~_process_umask()


def with_usual_permissions(path):
    """Give a file written through a private temp file (safetensors' save_file makes it with mkstemp: owner-only)
    the permissions a plainly created file gets, so an exported model is readable by whoever may read its
    directory. A file system that keeps its own permissions (some network and FUSE mounts) is left to them."""
    try:
        os.chmod(path, USUAL_FILE_MODE)
    except OSError:
        pass


# The temp files of a write killed before its rename: unique_temp_path's, and the hidden ".tmpXXXXXX" that
# safetensors' save_file writes beside its target.
TEMP_NAME = re.compile(r".+\.\d+\.[0-9a-f]{8}\.tmp|\.tmp[A-Za-z0-9_]{6}")


def remove_temp_files(directory):
    """Delete what killed atomic writes left under `directory` (never read: a file is only used once renamed).
    Only while no other process writes there (the pipeline's run lock)."""
    for path in Path(directory).rglob("*"):
        if TEMP_NAME.fullmatch(path.name) and path.is_file():
            path.unlink(missing_ok=True)


def unshare_links(directory):
    """Give every file under `directory` that is hard-linked elsewhere (`w2s run --reuse` links finished stages
    between runs) a copy of its own, so that appending to it or rewriting it in place stays in this directory."""
    for path in Path(directory).rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_nlink > 1:
            tmp = unique_temp_path(path)
            shutil.copy2(path, tmp)
            os.replace(tmp, path)


def write_json_atomic(path, obj):
    write_atomic(path, json.dumps(obj, indent=2, default=str))


def write_jsonl_atomic(path, rows):
    write_atomic(path, (json.dumps(row) + "\n" for row in rows))


def sha256_file(path, chunk=1 << 20):
    """Hex sha256 of a file's bytes, read in chunks (a checkpoint shard never sits in memory whole)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def stable_hash(obj, length=16):
    """Short hex sha256 of obj as canonical JSON (sorted keys): the same data gives the same hash in every run."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]
