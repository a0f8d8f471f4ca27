"""w2s/engine.py on toy stages (no models): keys, skip, rerun, a killed stage, and the one-run-per-directory lock.

    python -m pytest -q tests/test_engine.py
"""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from w2s.engine import Context, RunLocked, Stage, run_lock, run_stages


def _write(ctx, out, text, fail=False):
    (out / "out.txt").write_text(text)
    if fail:
        raise RuntimeError("killed")
    return {"n": len(text)}


def _read(ctx, out):
    return {"upstream": (ctx.dir("a") / "out.txt").read_text()}


def _table(text="x", fail=False):
    return [Stage("a", _write, [], {"text": text}, {"text": text, "fail": fail}),
            Stage("b", _read, ["a"], {})]


def test_stages_run_skip_and_rerun_downstream(tmp_path):
    logs = []
    ctx = Context(recipe=None, run_dir=tmp_path, log=logs.append)
    assert run_stages(_table(), ctx) == {"a": "ran", "b": "ran"}
    meta = json.loads((tmp_path / "b" / "meta.json").read_text())
    assert meta["upstream"] == "x" and meta["inputs"] == {"a": ctx.keys["a"]} and meta["key"] == ctx.keys["b"]
    assert run_stages(_table(), Context(None, tmp_path, log=logs.append)) == {"a": "skipped", "b": "skipped"}
    # A changed option reruns its stage and every stage that reads it.
    assert run_stages(_table("y"), Context(None, tmp_path, log=logs.append)) == {"a": "ran", "b": "ran"}
    assert json.loads((tmp_path / "b" / "meta.json").read_text())["upstream"] == "y"


def _count_into(ctx, out, fail=False):
    """A reader that, like sampling, resumes from what its directory already holds: one line per call."""
    with open(out / "calls.txt", "a") as f:
        f.write((ctx.dir("a") / "out.txt").read_text() + "\n")
    if fail:
        raise RuntimeError("killed")
    return {"calls": (out / "calls.txt").read_text().splitlines()}


def test_a_stage_run_again_by_hand_reruns_its_readers_from_scratch(tmp_path):
    """Keys hash options, not outputs: a stage deleted and run again (after a code change: here what a writes)
    keeps its key, and its readers must not be skipped as done on the old output, nor resume from what they made of
    it. The dry run says so; a kill of the reader after the rerun resumes it; records without run ids count as
    current."""
    from w2s.engine import plan

    def table(written="x", fail=False):  # what a writes is not in its key (options): as a change in the code
        return [Stage("a", _write, [], {"text": "x"}, {"text": written}),
                Stage("b", _count_into, ["a"], {}, {"fail": fail})]

    quiet = Context(None, tmp_path, log=lambda *a: None)
    assert run_stages(table(), quiet) == {"a": "ran", "b": "ran"}
    assert [status for _, status, _ in plan(table(), tmp_path)] == ["done", "done"]
    (tmp_path / "a" / "meta.json").unlink()  # deleted by hand, to run it again after a change in the code
    assert [(status, reasons) for _, status, reasons in plan(table("y"), tmp_path)][1] == \
        ("will rerun", ["input a runs again (or ran again since)"])
    logs = []
    with pytest.raises(RuntimeError, match="killed"):
        run_stages(table("y", fail=True), Context(None, tmp_path, log=logs.append))  # a reruns; b is killed
    assert "[2/2] b: running again: a ran again since it ran" in logs
    assert (tmp_path / "b" / "calls.txt").read_text() == "y\n"  # b's old output was wiped, not appended to
    assert [(status, reasons) for _, status, reasons in plan(table("y"), tmp_path)] == \
        [("done", []), ("will run", ["killed before it finished: resumes from what it kept"])]
    assert run_stages(table("y"), Context(None, tmp_path, log=lambda *a: None)) == {"a": "skipped", "b": "ran"}
    assert json.loads((tmp_path / "b" / "meta.json").read_text())["calls"] == ["y", "y"]  # resumed its own attempt
    assert run_stages(table(), Context(None, tmp_path, log=lambda *a: None)) == {"a": "skipped", "b": "skipped"}
    for name in ("a", "b"):  # a run recorded before run ids: nothing reruns
        meta = json.loads((tmp_path / name / "meta.json").read_text())
        (tmp_path / name / "meta.json").write_text(json.dumps({k: v for k, v in meta.items()
                                                               if k not in ("run", "input_runs")}))
    assert run_stages(table(), Context(None, tmp_path, log=lambda *a: None)) == {"a": "skipped", "b": "skipped"}
    # In such a run, a reads again after a change: its new record has a run id, b's predates it, so b reruns.
    (tmp_path / "a" / "meta.json").unlink()
    assert run_stages(table("z"), Context(None, tmp_path, log=lambda *a: None)) == {"a": "ran", "b": "ran"}
    assert json.loads((tmp_path / "b" / "meta.json").read_text())["calls"] == ["z"]


def test_a_failing_stage_is_not_done(tmp_path):
    with pytest.raises(RuntimeError, match="killed"):
        run_stages(_table("z", fail=True), Context(None, tmp_path, log=lambda *a: None))
    assert (tmp_path / "a" / "out.txt").read_text() == "z"  # partial output kept for a resume under the same key
    assert not (tmp_path / "a" / "meta.json").exists() and not (tmp_path / "b").exists()


def test_a_kill_while_a_changed_stage_is_deleted_leaves_no_finished_looking_half(tmp_path, monkeypatch):
    """A stage run with other options is deleted first. A kill mid-delete (here: after its output went, before its
    meta.json did) must not leave a stage that a run with the old options skips as done without its output."""
    import w2s.engine

    run_stages(_table("x"), Context(None, tmp_path, log=lambda *a: None))
    real_rmtree = shutil.rmtree

    def killed_mid_delete(path, *args, **kwargs):
        if Path(path).exists():
            (Path(path) / "out.txt").unlink()
            raise KeyboardInterrupt

    monkeypatch.setattr(w2s.engine.shutil, "rmtree", killed_mid_delete)
    with pytest.raises(KeyboardInterrupt):
        run_stages(_table("y"), Context(None, tmp_path, log=lambda *a: None))
    monkeypatch.setattr(w2s.engine.shutil, "rmtree", real_rmtree)
    assert [f.name for f in (tmp_path / "a").iterdir()] == ["key.txt"]  # started, not finished: b reads no done a
    assert (tmp_path / ".aside" / "a.old" / "meta.json").exists()
    from w2s.report import load_metas

    assert load_metas(tmp_path) == {}  # b, whose input is being made again, is out of the report too
    assert run_stages(_table("x"), Context(None, tmp_path, log=lambda *a: None)) == {"a": "ran", "b": "ran"}
    assert (tmp_path / "a" / "out.txt").read_text() == "x"
    from w2s.engine import take_finished

    assert not (tmp_path / ".aside").exists()  # emptied by the delete that rerun made
    (tmp_path / ".aside" / "a.old").mkdir(parents=True)
    (tmp_path / ".taking" / "b.old").mkdir(parents=True)  # the aside directory's older name
    take_finished(_table("x"), None, tmp_path)  # every pipeline run starts here: it clears what a kill left aside
    assert not (tmp_path / ".aside").exists() and not (tmp_path / ".taking").exists()


def test_a_resumed_stage_starts_without_the_temp_files_of_writes_a_kill_cut_short(tmp_path):
    """A write killed between its temp file and the rename (write_atomic's, or safetensors' own) leaves a full-size
    temp file that nothing reads; the resume deletes those and keeps the stage's real partial outputs."""
    from w2s.files import unique_temp_path

    with pytest.raises(RuntimeError, match="killed"):
        run_stages(_table("z", fail=True), Context(None, tmp_path, log=lambda *a: None))
    stage = tmp_path / "a"
    (stage / "model").mkdir()
    temps = [unique_temp_path(stage / "labels.jsonl"), stage / "model" / ".tmpE5c7Ou"]
    kept = [stage / "notes.tmp", stage / "model" / ".tmp-step00000040" / "x", stage / "labels.jsonl.part0"]
    for path in temps + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("partial")
    seen = []

    def look(ctx, out, **args):
        seen.extend(sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()))
        return _write(ctx, out, **args)

    table = _table("z")
    table[0].run = look
    run_stages(table, Context(None, tmp_path, log=lambda *a: None))
    assert seen == sorted(["key.txt", "out.txt"] + [str(p.relative_to(stage)) for p in kept])


def _chain(text="x"):  # a -> b -> c, each writing what it read plus its own letter
    def step(name, reads):
        def run(ctx, out):
            got = "".join((ctx.dir(d) / "out.txt").read_text() for d in reads)
            (out / "out.txt").write_text(got + name)
            (out / "big.bin").write_text("weights")
            return {}
        return Stage(name, run, reads, {"text": text} if name == "a" else {})

    return [step("a", []), step("b", ["a"]), step("c", ["b"])]


def test_reuse_takes_what_it_shares_from_the_inputs_it_will_have(tmp_path):
    """w2s run --reuse's rule (engine.take_finished / plan): the new run takes the donor's finished stages whose key
    it shares and whose inputs it will have; it keeps its own finished stages, so the donor's stages below one of them
    are not taken (they would be wiped at once); it takes again a stage it took once when the donor has run it again;
    a kill in the middle of a take leaves nothing that looks finished. The donor's files are never written."""
    import w2s.engine as engine
    from w2s.engine import plan, take_finished

    quiet = lambda: Context(None, run, log=lambda *a: None)  # noqa: E731
    donor, run = tmp_path / "donor", tmp_path / "run"
    run_stages(_chain(), Context(None, donor, log=lambda *a: None))
    donor_files = {p: p.read_text() for p in donor.rglob("*") if p.is_file()}
    assert [status for _, status, _ in plan(_chain(), run, donor)] == ["taken", "taken", "taken"]
    assert take_finished(_chain(), donor, run) == ["a", "b", "c"]
    assert (run / "c" / "big.bin").stat().st_ino == (donor / "c" / "big.bin").stat().st_ino
    assert run_stages(_chain(), quiet()) == {"a": "skipped", "b": "skipped", "c": "skipped"}
    # The run's own a (another run of it): b and c of the donor were made from the donor's a, not this one.
    shutil.rmtree(run)
    run_stages(_chain()[:1], quiet())
    assert [row[1] for row in plan(_chain(), run, donor)] == ["done", "will run", "will run"]
    assert take_finished(_chain(), donor, run) == []
    assert run_stages(_chain(), quiet()) == {"a": "skipped", "b": "ran", "c": "ran"}
    # Taken once, then the donor ran b again (after a code change): the next take follows it.
    shutil.rmtree(run)
    take_finished(_chain(), donor, run)
    (donor / "b" / "meta.json").unlink()
    run_stages(_chain(), Context(None, donor, log=lambda *a: None))
    real_rmtree = shutil.rmtree

    def killed_deleting_the_replaced_copy(path, *args, **kwargs):
        if str(path).endswith(".old"):
            raise KeyboardInterrupt
        real_rmtree(path, *args, **kwargs)

    engine.shutil.rmtree = killed_deleting_the_replaced_copy
    try:
        with pytest.raises(KeyboardInterrupt):
            take_finished(_chain(), donor, run)
    finally:
        engine.shutil.rmtree = real_rmtree
    assert sorted(p.name for p in (run / "b").iterdir()) == ["big.bin", "key.txt", "meta.json", "out.txt",
                                                              "taken_from.txt"]  # whole: the old copy was set aside
    assert take_finished(_chain(), donor, run) == ["c"]
    assert json.loads((run / "c" / "meta.json").read_text())["run"] == \
        json.loads((donor / "c" / "meta.json").read_text())["run"]
    # Killed after copying meta.json but before the rest: the stage is not there, and the next take finishes it.
    shutil.rmtree(run)
    real_link = engine._link_or_copy

    def dies_after_meta(src, dst):
        real_link(src, dst)
        if dst.endswith("meta.json") and "/c/" not in dst:
            raise KeyboardInterrupt

    engine._link_or_copy = dies_after_meta
    try:
        with pytest.raises(KeyboardInterrupt):
            take_finished(_chain(), donor, run)
    finally:
        engine._link_or_copy = real_link
    assert not any(run.glob("*/meta.json"))
    assert take_finished(_chain(), donor, run) == ["a", "b", "c"] and not (run / ".aside").exists()
    assert run_stages(_chain(), quiet()) == {"a": "skipped", "b": "skipped", "c": "skipped"}
    assert {p: p.read_text() for p in (donor / "a").rglob("*") if p.is_file()} == \
        {p: text for p, text in donor_files.items() if p.parent == donor / "a"}
    assert not any(donor.rglob("taken_from.txt"))
    # A taken stage run again (its meta.json deleted by hand) starts over: its files are the donor's, never resumed
    # into; and a later take from the same donor leaves that run of it alone.
    before = (donor / "c" / "out.txt").read_text()
    (run / "c" / "meta.json").unlink()
    assert [row[1:] for row in plan(_chain(), run)][2] == ("will run", ["started under other options or inputs: "
                                                                         "starts over"])
    assert run_stages(_chain("x"), quiet()) == {"a": "skipped", "b": "skipped", "c": "ran"}
    assert (donor / "c" / "out.txt").read_text() == before and not (run / "c" / "taken_from.txt").exists()
    assert take_finished(_chain(), donor, run) == []
    # A second donor that ran b and c itself: the run's own c stays, though its b and a were taken from the first.
    other = tmp_path / "other"
    run_stages(_chain(), Context(None, other, log=lambda *a: None))
    own_c = json.loads((run / "c" / "meta.json").read_text())["run"]
    assert take_finished(_chain(), other, run) == []
    assert json.loads((run / "c" / "meta.json").read_text())["run"] == own_c


def test_a_take_leaves_the_donors_leftover_resume_state_behind(tmp_path, monkeypatch):
    """A donor stage killed between its meta.json and the deletion of its resume state (large at 70B) still holds
    it; a take copies the stage without it."""
    import w2s.engine as engine
    from w2s.engine import take_finished

    with monkeypatch.context() as mp:
        mp.setattr(engine.shutil, "rmtree", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt("killed")))
        with pytest.raises(KeyboardInterrupt):
            run_stages([Stage("train", _train, [], {})], Context(None, tmp_path / "donor", log=lambda *a: None))
    assert (tmp_path / "donor" / "train" / "ckpt" / "step00000002").is_dir()
    assert take_finished([Stage("train", _train, [], {})], tmp_path / "donor", tmp_path / "run") == ["train"]
    assert (tmp_path / "run" / "train" / "model").is_dir() and not (tmp_path / "run" / "train" / "ckpt").exists()


def test_a_donor_resuming_a_stage_another_run_took_writes_only_its_own_files(tmp_path):
    """The donor's side of the hard links: its stage run again by hand (meta.json deleted, same key) resumes in place,
    appending to what it holds; the run that took the stage keeps the files it took."""
    from w2s.engine import take_finished

    table = lambda: [Stage("a", _count_into_own, [], {})]  # noqa: E731
    run_stages(table(), Context(None, tmp_path / "donor", log=lambda *a: None))
    take_finished(table(), tmp_path / "donor", tmp_path / "run")
    (tmp_path / "donor" / "a" / "meta.json").unlink()
    run_stages(table(), Context(None, tmp_path / "donor", log=lambda *a: None))
    assert (tmp_path / "donor" / "a" / "calls.txt").read_text() == "call\ncall\n"  # resumed: appended
    assert (tmp_path / "run" / "a" / "calls.txt").read_text() == "call\n"


def _count_into_own(ctx, out):
    with open(out / "calls.txt", "a") as f:
        f.write("call\n")
    return {}


def test_takers_share_a_donor_that_no_pipeline_runs_in(tmp_path):
    """--reuse reads a donor under a shared lock: takers do not exclude each other, a pipeline running in the donor
    excludes them (and they it), and a donor without a lock file (never run here, or read-only) needs none."""
    from w2s.engine import reading_lock

    with reading_lock(tmp_path):  # no lock file: nothing is created
        assert not (tmp_path / "lock").exists()
    with run_lock(tmp_path, log=lambda *a: None):
        with pytest.raises(RunLocked, match=r"a pipeline is running there \(pid \d+ on host"):
            with reading_lock(tmp_path):
                pass
    with reading_lock(tmp_path), reading_lock(tmp_path):
        with pytest.raises(RunLocked, match="another pipeline is running in this run directory"):
            with run_lock(tmp_path, log=lambda *a: None):
                pass


def _train(ctx, out):
    (out / "model").mkdir(exist_ok=True)
    (out / "ckpt" / "step00000002").mkdir(parents=True, exist_ok=True)  # the resume state, large at 70B
    ctx.cleanup.append(out / "ckpt")
    return {}


def test_a_resume_state_left_by_a_kill_after_meta_json_is_removed_on_the_next_run(tmp_path, monkeypatch):
    import w2s.engine as engine

    table = [Stage("train", _train, [], {})]
    with monkeypatch.context() as mp:  # killed between meta.json and the cleanup
        mp.setattr(engine.shutil, "rmtree", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt("killed")))
        with pytest.raises(KeyboardInterrupt):
            run_stages(table, Context(None, tmp_path, log=lambda *a: None))
    assert (tmp_path / "train" / "meta.json").is_file() and (tmp_path / "train" / "ckpt").is_dir()
    assert run_stages(table, Context(None, tmp_path, log=lambda *a: None)) == {"train": "skipped"}
    assert not (tmp_path / "train" / "ckpt").exists() and (tmp_path / "train" / "model").is_dir()


HOLDER = textwrap.dedent("""
    import sys, time
    from w2s.engine import run_lock
    with run_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(60)
""")


def test_a_second_run_on_a_locked_directory_refuses(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLocked, match=rf"another pipeline is running in this run directory \(pid {holder.pid} on "
                                            r"host .*\); wait for it, or use another run name"):
            with run_lock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    # The holder was killed (-9): its name stays in the file, and the next run takes the lock over with a warning.
    logs = []
    with run_lock(tmp_path, log=logs.append):
        assert f"pid {holder.pid} on host" not in (tmp_path / "lock").read_text()
    assert len(logs) == 1 and logs[0].startswith(f"warning: {tmp_path / 'lock'}: taking over a stale lock (pid "
                                                 f"{holder.pid} on host")
    assert (tmp_path / "lock").read_text() == ""  # a clean exit leaves an empty lock file: no warning next time
    logs.clear()
    with run_lock(tmp_path, log=logs.append):
        pass
    assert logs == []


def test_the_dry_run_names_an_input_a_stage_now_reads_in_place_of_another(tmp_path):
    """[stage2] start_from swaps the model Stage II reads: the plan says so, rather than that an input changed."""
    from w2s.engine import plan

    def table(reads):
        return [Stage("a", _write, [], {"text": "x"}, {"text": "x"}),
                Stage("c", _write, [], {"text": "y"}, {"text": "y"}),
                Stage("b", lambda ctx, out: {}, [reads], {})]

    run_stages(table("a"), Context(None, tmp_path, log=lambda *a: None))
    assert [(status, reasons) for _, status, reasons in plan(table("c"), tmp_path)][2] == \
        ("will rerun", ["now reads c", "no longer reads a"])


def test_a_reader_killed_before_its_input_ran_again_starts_over_on_the_new_input(tmp_path):
    """b was killed part-way (no meta.json), then its input a is run again by hand (same key, new run): b's partial
    output was made from the old a, so b starts over instead of resuming from it (key.txt names the input runs)."""
    from w2s.engine import plan

    def table(written="x", fail=False):
        return [Stage("a", _write, [], {"text": "x"}, {"text": written}),
                Stage("b", _count_into, ["a"], {}, {"fail": fail})]

    with pytest.raises(RuntimeError, match="killed"):
        run_stages(table(fail=True), Context(None, tmp_path, log=lambda *a: None))
    assert (tmp_path / "b" / "calls.txt").read_text() == "x\n"
    (tmp_path / "a" / "meta.json").unlink()  # a runs again (after a change in the code: it now writes "y")
    assert [(status, reasons) for _, status, reasons in plan(table("y"), tmp_path)][1] == \
        ("will run", ["started under other options or inputs: starts over"])
    assert run_stages(table("y"), Context(None, tmp_path, log=lambda *a: None)) == {"a": "ran", "b": "ran"}
    assert json.loads((tmp_path / "b" / "meta.json").read_text())["calls"] == ["y"]  # not ["x", "y"]


def test_an_unreadable_meta_json_is_a_stage_not_done(tmp_path):
    """read_meta: a meta.json that is not JSON (cut short, edited by hand) means not done: the stage runs again."""
    run_stages(_table(), Context(None, tmp_path, log=lambda *a: None))
    (tmp_path / "a" / "meta.json").write_text('{"stage": "a", "key": ')
    with pytest.raises(RuntimeError, match="killed"):  # the rerun is killed: the stage is left without a meta.json
        run_stages(_table(fail=True), Context(None, tmp_path, log=lambda *a: None))
    assert not (tmp_path / "a" / "meta.json").exists()  # not the unreadable one either (the report reads them all)
    assert run_stages(_table(), Context(None, tmp_path, log=lambda *a: None)) == {"a": "ran", "b": "ran"}
    assert json.loads((tmp_path / "a" / "meta.json").read_text())["stage"] == "a"


def test_only_the_stage_that_listed_a_cleanup_path_records_it(tmp_path):
    """ctx.cleanup is the running stage's own list: a stage after a training stage names no cleanup in its meta.json
    (else a skip of it would delete paths of another stage)."""
    table = [Stage("train", _train, [], {}), Stage("after", lambda ctx, out: {}, ["train"], {})]
    run_stages(table, Context(None, tmp_path, log=lambda *a: None))
    assert json.loads((tmp_path / "train" / "meta.json").read_text())["cleanup"] == ["ckpt"]  # relative: movable
    assert "cleanup" not in json.loads((tmp_path / "after" / "meta.json").read_text())


def test_current_metas_keeps_what_belongs_to_the_run_as_it_stands():
    """engine.current_metas (what the report shows), by its docstring: a stage whose key is not the table's is left
    out, and so is every stage downstream of it, transitively; so is a reader whose recorded input run is not the
    input's run now; an input whose directory is gone leaves its readers in; no table: every key counts."""
    from w2s.engine import current_metas

    metas = {"a": {"key": "ka", "run": "ra"},
             "b": {"key": "kb", "run": "rb", "input_runs": {"a": "ra"}},
             "c": {"key": "kc", "run": "rc", "input_runs": {"b": "rb"}},
             "d": {"key": "kd", "run": "rd", "input_runs": {"gone": "rg"}}}  # gone: deleted to free disk
    keys = {"a": "ka", "b": "kb", "c": "kc", "d": "kd"}
    assert set(current_metas(metas, keys)) == set(current_metas(metas)) == {"a", "b", "c", "d"}
    assert set(current_metas(metas, {**keys, "a": "other"})) == {"d"}  # a's key changed: b and c were made from it
    running = {n: m for n, m in metas.items() if n != "a"}  # a is running again: its key.txt, no meta.json
    assert set(current_metas(running, keys, unfinished={"a"})) == {"d"}
    ran_again = {**metas, "a": {"key": "ka", "run": "ra2"}}  # a run again by hand, same key
    assert set(current_metas(ran_again, keys)) == {"a", "d"}
    # b recorded before run ids (inputs, no input_runs): made from an a without one; an a that has one ran after it
    old_b = {"key": "kb", "inputs": {"a": "ka"}}
    assert set(current_metas({**metas, "b": old_b}, keys)) == {"a", "d"}
    no_run_ids = {**metas, "a": {"key": "ka"}, "b": old_b}  # a without a run id either: b stands (c read another b)
    assert set(current_metas(no_run_ids, keys)) == {"a", "b", "d"}


def test_a_stage_directory_without_key_txt_is_wiped_not_resumed(tmp_path):
    """_prepare_dir keeps partial outputs only when key.txt says they were made under this key: a directory without
    one (made by hand, or by something else) is cleared before the stage runs in it."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "stray.txt").write_text("not this stage's")
    assert run_stages(_table(), Context(None, tmp_path, log=lambda *a: None)) == {"a": "ran", "b": "ran"}
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["key.txt", "meta.json", "out.txt"]


def test_the_dry_run_names_each_changed_option_and_input(tmp_path):
    """plan's reasons, by its docstring: each option whose value changed (old -> new, nested options by their dotted
    path; an option new in the key or gone from it), each input whose key changed; a killed stage resumes only under
    its own key."""
    from w2s.engine import plan

    def table(options, text="x"):
        return [Stage("a", _write, [], options, {"text": text}), Stage("b", _read, ["a"], {})]

    first = {"train": {"lr": 1, "epochs": 1}, "old": True}
    run_stages(table(first), Context(None, tmp_path, log=lambda *a: None))
    rows = plan(table({"train": {"lr": 2, "epochs": 1}, "new": 5}), tmp_path)
    assert [(status, reasons) for _, status, reasons in rows] == [
        ("will rerun", ["new is new in the key (5)", "old left the key", "train.lr: 1 -> 2"]),
        ("will rerun", ["input a changed"])]
    with pytest.raises(RuntimeError, match="killed"):  # killed under other options: their partial output is not ours
        run_stages([Stage("a", _write, [], {"v": 1}, {"text": "z", "fail": True})],
                   Context(None, tmp_path / "k", log=lambda *a: None))
    assert [row[1:] for row in plan([Stage("a", _write, [], {"v": 2}, {"text": "z"})], tmp_path / "k")] == \
        [("will run", ["started under other options or inputs: starts over"])]


def test_the_dry_run_reruns_everything_below_a_stage_that_reruns_for_a_rerun_input(tmp_path):
    """a deleted by hand runs again; b reruns because a does; c, whose key is unchanged too, reruns because b does,
    as run_stages would (transitively, not only the direct readers)."""
    from w2s.engine import plan

    run_stages(_chain(), Context(None, tmp_path, log=lambda *a: None))
    (tmp_path / "a" / "meta.json").unlink()
    assert [row[1:] for row in plan(_chain(), tmp_path)] == [
        ("will run", ["killed before it finished: resumes from what it kept"]),
        ("will rerun", ["input a runs again (or ran again since)"]),
        ("will rerun", ["input b runs again (or ran again since)"])]
    assert run_stages(_chain(), Context(None, tmp_path, log=lambda *a: None)) == {"a": "ran", "b": "ran", "c": "ran"}
