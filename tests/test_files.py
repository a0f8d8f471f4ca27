"""w2s/files.py: the one jsonl reader, the one atomic writer, the hashes.

    python -m pytest -q tests/test_files.py
"""

import hashlib
import json
import os
import stat

import pytest

from w2s import files
from w2s.files import (
    read_json,
    read_jsonl,
    remove_temp_files,
    require,
    row_id,
    sha256_file,
    stable_hash,
    unique_temp_path,
    unshare_links,
    write_atomic,
    write_json_atomic,
    write_jsonl_atomic,
)


def test_read_jsonl_rows_blank_lines_and_tags(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\r\n')
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    assert read_jsonl(path, tag_lines=True) == [{"a": 1, "_where": f"{path}:1"}, {"a": 2, "_where": f"{path}:3"}]


@pytest.mark.parametrize("content, message", [
    ('{"a": 1}\n{"a": \n', r"rows\.jsonl:2: not valid JSON \(Expecting value at column 7\)"),
    ('{"a": 1}\n[1, 2]\n', r"rows\.jsonl:2: expected a JSON object per line, got list"),
])
def test_read_jsonl_broken_line_is_one_error_naming_file_and_line(tmp_path, content, message):
    path = tmp_path / "rows.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_jsonl(path)


def test_read_jsonl_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl: no such file"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match=r": is a directory, expected a jsonl file"):
        read_jsonl(tmp_path)


def test_read_jsonl_names_the_line_of_a_byte_that_is_not_utf8_and_drops_a_byte_order_mark(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": "\xc3\xa9"}\n{"a": 2}\n{"a": "caf\xe9"}\n')  # latin-1 on line 3
    with pytest.raises(ValueError, match=r"rows\.jsonl:3: not UTF-8 \(byte 0xe9 at byte 11 of the line\)"):
        read_jsonl(path)
    path.write_bytes(b'\xef\xbb\xbf{"a": "\xc3\xa9"}\r\n{"a": 2}\n')
    assert read_jsonl(path) == [{"a": "\u00e9"}, {"a": 2}]
    path.write_bytes(b'\xef\xbb\xbf{"a": "caf\xe9"}\n')  # counted after the byte-order mark
    with pytest.raises(ValueError, match=r"rows\.jsonl:1: not UTF-8 \(byte 0xe9 at byte 11 of the line\)"):
        read_jsonl(path)


def test_exported_weights_get_the_permissions_of_a_plainly_created_file(tmp_path):
    # safetensors writes through an owner-only temp file; an exported model is for whoever may read its directory
    import torch

    from w2s.checkpoint import save_model
    from w2s.config import ModelConfig
    from w2s.lora import Adapter, save_adapter
    from w2s.model import Transformer

    (tmp_path / "plain").write_text("x")
    usual = stat.S_IMODE(os.stat(tmp_path / "plain").st_mode)
    model = Transformer(ModelConfig(family="llama", vocab_size=48, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                    head_dim=16, hidden_dim=64, max_seq_len=64))
    save_model(model, tmp_path / "one")
    save_model(model, tmp_path / "sharded", max_shard_bytes=2048)
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    adapter = Adapter(rank=2, alpha=4, base=None, targets=("q_proj",),
                      tensors={"layers.0.self_attn.q_proj": (torch.zeros(2, 32), torch.zeros(32, 2))})
    save_adapter(tmp_path / "adapter", adapter)
    files = [tmp_path / "one" / "model.safetensors", *shards, tmp_path / "adapter" / "adapter_model.safetensors"]
    assert len(shards) > 1 and {stat.S_IMODE(os.stat(f).st_mode) for f in files} == {usual}


def test_a_record_is_a_json_object_or_one_line_naming_it(tmp_path):
    """Run records (a stage's meta.json, recipe.json, a sampling run's meta.json, a checkpoint's train_state.json)
    read as objects; a torn or foreign file (a list, say) is one ValueError naming it, to which the caller adds what
    to do."""
    from w2s.sampling_jsonl import check_run_meta

    record = tmp_path / "r.json"
    record.write_text('{"a": 1}')
    assert read_json(record) == {"a": 1}
    for text, message in (("[1]", "expected a JSON object, got list"), ("3", "expected a JSON object, got int"),
                          ('{\n"a":', r":2: not valid JSON \(Expecting value\)")):
        record.write_text(text)
        with pytest.raises(ValueError, match=rf"^{record}:? ?{message}$"):
            read_json(record)
    record.write_bytes(b'{"a": "caf\xe9"}')  # Latin-1, not UTF-8: a file from elsewhere
    with pytest.raises(ValueError, match=rf"^{record}: not UTF-8 \(byte 0xe9 at byte 11\)$"):
        read_json(record)
    record.write_bytes(b'\xef\xbb\xbf[1]')  # a byte-order mark, as some Windows editors write: read past
    assert read_json(record, expected=list) == [1]
    record.write_text('{"a": 1}')
    with pytest.raises(ValueError, match=rf"^{record}: expected a JSON list, got dict$"):
        read_json(record, expected=list)
    (tmp_path / "o.jsonl").write_text("x\n")
    (tmp_path / "o.jsonl.meta.json").write_text("[1]")
    with pytest.raises(ValueError, match=r"o\.jsonl\.meta\.json: expected a JSON object, got list; delete it and "
                                         r"o\.jsonl\* to start over$"):
        check_run_meta(tmp_path / "o.jsonl", {"n": 1})


def test_write_atomic_text_bytes_and_chunks(tmp_path):
    path = tmp_path / "out.txt"
    write_atomic(path, "héllo")
    assert path.read_bytes() == "héllo".encode()
    write_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    write_jsonl_atomic(path, ({"i": i} for i in range(3)))
    assert path.read_text() == '{"i": 0}\n{"i": 1}\n{"i": 2}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]  # no temp file left behind
    # The usual permissions (the umask's), not mkstemp's owner-only 0600.
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_write_atomic_syncs_the_data_before_the_rename(tmp_path, monkeypatch):
    """A crash right after the rename must not leave an empty file under the final name: the temp file's data
    reaches the disk (fsync) before os.replace publishes it."""
    calls = []
    monkeypatch.setattr(files.os, "fsync", lambda fd: calls.append("fsync"))
    real_replace = os.replace
    monkeypatch.setattr(files.os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b)))
    write_atomic(tmp_path / "meta.json", "{}")
    assert calls == ["fsync", "replace"]


def test_json_records_are_written_indented_for_people(tmp_path):
    record = {"key": "abc", "counts": {"kept": 3}}
    write_json_atomic(tmp_path / "meta.json", record)
    assert (tmp_path / "meta.json").read_text() == json.dumps(record, indent=2)


def test_write_atomic_failure_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")

    def chunks():
        yield "new, half"
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        write_atomic(path, chunks())
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_remove_temp_files_takes_only_whole_temp_names(tmp_path):
    """What killed writes leave (ours and safetensors' hidden .tmpXXXXXX) goes, in subdirectories too; a file whose
    name merely contains such a part is somebody's data and stays."""
    (tmp_path / "sub").mkdir()
    left = [tmp_path / "meta.json.123.0123abcd.tmp", tmp_path / "sub" / ".tmpa1B2_c"]
    kept = [tmp_path / "meta.json", tmp_path / "notes.tmpa1B2_c.txt", tmp_path / "x.json.123.0123abcd.tmp.bak"]
    for path in left + kept:
        path.write_text("x")
    remove_temp_files(tmp_path)
    assert [p.exists() for p in left] == [False, False] and all(p.exists() for p in kept)


def test_unshare_links_copies_hard_links_and_leaves_symlinks(tmp_path):
    """A file hard-linked from another run gets a copy of its own (same bytes); a symlink stays a symlink."""
    other, mine = tmp_path / "other", tmp_path / "mine"
    other.mkdir(), mine.mkdir()
    (other / "rows.jsonl").write_text("a\n")
    os.link(other / "rows.jsonl", mine / "rows.jsonl")
    (mine / "link.jsonl").symlink_to(other / "rows.jsonl")
    unshare_links(mine)
    assert (mine / "rows.jsonl").read_text() == "a\n" and (mine / "rows.jsonl").stat().st_nlink == 1
    assert (mine / "link.jsonl").is_symlink() and (other / "rows.jsonl").stat().st_nlink == 1


def test_row_ids_and_required_keys_name_the_place(tmp_path):
    where = "train.jsonl:4"
    assert row_id({"id": 7}, "id", "d", where) == "7" and row_id({"id": "q7"}, "id", "d", where) == "q7"
    assert row_id({}, "id", "d", where) == "d"
    for bad in (True, "", None, 1.5):  # a bool is an int to Python, but never an id
        with pytest.raises(ValueError, match=r"^train\.jsonl:4: key 'id' must be a non-empty string or an integer"):
            row_id({"id": bad}, "id", "d", where)
    assert require({"question": "2+2?"}, "question", where) == "2+2?"
    missing = r"^train\.jsonl:4: expected key 'question' with a non-empty string \(missing\)$"
    with pytest.raises(ValueError, match=missing):
        require({}, "question", where)
    with pytest.raises(ValueError, match=r"\(got '  '\)$"):
        require({"question": "  "}, "question", where)
    with pytest.raises(ValueError, match=r"\(got 5\)$"):
        require({"question": 5}, "question", where)


def test_temp_names_are_unique_per_writer(tmp_path):
    names = {unique_temp_path(tmp_path / "meta.json").name for _ in range(100)}
    assert len(names) == 100 and all(n.startswith(f"meta.json.{os.getpid()}.") for n in names)


def test_hashes(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"x" * (3 << 20))
    assert sha256_file(path, chunk=1 << 20) == hashlib.sha256(b"x" * (3 << 20)).hexdigest()
    assert stable_hash({"b": 1, "a": [1, 2]}) == stable_hash({"a": [1, 2], "b": 1})
    assert stable_hash({"a": 1}) == hashlib.sha256(json.dumps({"a": 1}).encode()).hexdigest()[:16]
