"""Resumable training checkpoints: w2s/train.py writes one every ckpt_every steps into OUT/ckpt/step<N> (sharded
model + optimizer through torch.distributed.checkpoint, each rank's RNG, and train_state.json) and resumes from the
newest complete one. A checkpoint is written into a hidden directory and renamed into place only when every rank has
finished, so a crash at any moment leaves the previous one intact. (The Hugging Face model files a run exports are
w2s/checkpoint.py's.)

    python -m pytest -q tests/test_train.py -k "resume or checkpoint"
"""

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch

from w2s.files import read_json, write_atomic
from w2s.parallel import Dist, barrier, stop_requested


def _state_dict_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=False)  # LoRA: only the adapters change


def save_training_state(ckpt_root, step, module, optimizer, d: Dist, meta):
    """Write <ckpt_root>/step<N>: sharded model + optimizer (DCP), per-rank RNG, train_state.json; atomically.

    Everything goes into a hidden temp directory first; rank 0 renames it into place only after every rank has
    finished writing, then deletes older checkpoints. A crash at any moment leaves the previous checkpoint intact.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    ckpt_root = Path(ckpt_root)
    tmp, final = ckpt_root / f".tmp-step{step:08d}", ckpt_root / f"step{step:08d}"
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(d)
    model_sd, optim_sd = get_state_dict(module, optimizer, options=_state_dict_options())
    try:
        with _one_process_is_meant():
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    except BaseException as e:  # DCP wraps each rank's failure, a Ctrl-C too, in a CheckpointException (BaseException)
        if isinstance(e, KeyboardInterrupt) or _first_failure(e, KeyboardInterrupt) is not None or stop_requested():
            # what an interrupted run says and does (the half-written tmp is ignored); a stopped rank's save may
            # also fail at a collective its peer has left, after DCP swallowed the interrupt
            raise KeyboardInterrupt from None
        cause = _first_failure(e, OSError)  # a disk-full or permission error: one line naming the path
        if cause is None:
            raise
        raise OSError(cause.errno, f"{cause.strerror or cause} (writing the training checkpoint {tmp})",
                      str(tmp)) from e
    rng = {"cpu": torch.get_rng_state()}
    if d.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(d.device)
    torch.save(rng, tmp / f"rng_rank{d.rank}.pt")
    barrier(d)
    if d.is_main:
        write_atomic(tmp / "train_state.json", json.dumps({"step": step, **meta}, indent=2))
        os.replace(tmp, final)
        for old in ckpt_root.glob("step*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    barrier(d)


@contextlib.contextmanager
def _one_process_is_meant():
    """DCP warns at every save and load without a process group that it assumes one process: here that is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _first_failure(e, kind, depth=0):
    """The exception of type `kind` at the root of an exception (DCP's CheckpointException keeps each rank's failure
    in .failures), or None."""
    if isinstance(e, kind) or depth > 5:
        return e if isinstance(e, kind) else None
    inner = [*getattr(e, "failures", {}).values(), e.__cause__, e.__context__]
    for x in inner:
        if isinstance(x, tuple):  # (exception, traceback) pairs
            x = x[0]
        if isinstance(x, BaseException) and (found := _first_failure(x, kind, depth + 1)) is not None:
            return found
    return None


def remove_checkpoints(ckpt_root):
    """Delete every training checkpoint under ckpt_root, each unmarked first (its train_state.json is what makes it
    complete to latest_checkpoint): a kill midway leaves no half-deleted one that a resume would load."""
    for state in Path(ckpt_root).glob("step*/train_state.json"):
        state.unlink()
    shutil.rmtree(ckpt_root, ignore_errors=True)


def latest_checkpoint(ckpt_root):
    """The newest complete checkpoint directory (renamed into place, so complete by construction), or None."""
    found = sorted(p for p in Path(ckpt_root).glob("step*") if (p / "train_state.json").is_file())
    return found[-1] if found else None


def load_training_state(path, module, optimizer, d: Dist):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(module, optimizer, options=_state_dict_options())
    state = {"model": model_sd, "optim": optim_sd}
    with _one_process_is_meant():
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_state_dict_options())
    rng_file = Path(path) / f"rng_rank{d.rank}.pt"
    if rng_file.is_file():  # absent when resuming on more ranks than were saved: those keep the seeded state
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and d.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], d.device)
    return read_train_state(path)


def read_train_state(path):
    """The train_state.json of the training-state checkpoint in `path` (a dict), or one line naming the file."""
    try:
        return read_json(Path(path) / "train_state.json")
    except ValueError as e:
        raise ValueError(f"{e}; delete {Path(path).name} to resume from the checkpoint before it (or resume=False, "
                         f"--no-resume, to start over)") from None
