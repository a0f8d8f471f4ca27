"""Training wrappers applied from outside the model: process-group setup, FSDP2 sharding, activation checkpointing.

    torchrun --nproc_per_node=8 scripts/sft.py ...   # each rank holds 1/8 of params, grads and optimizer state

FSDP2 (`torch.distributed.fsdp.fully_shard`) is applied per transformer block, then to the root, which owns the
embeddings, the final norm and the output matrix (one group, so Gemma's tied embedding is gathered once and used
at both ends). Parameters are stored sharded in fp32 (the optimizer's master weights) and all-gathered in bf16 for
compute; gradients are reduce-scattered in fp32. Before each block's forward/backward its full parameters are
gathered, and freed again right after (the root and the last block, which the backward needs first, keep theirs
from the forward to the backward), so only ~one block is ever unsharded.

The training loop normalizes the loss by the GLOBAL number of tokens (or pairs) itself, so the gradient reduction
must SUM over ranks, not average: `set_gradient_divide_factor(1.0)` when there is more than one rank.

Activation checkpointing (`enable_activation_checkpointing`) wraps each block's forward the same way: the model code
knows nothing about it. Tensor parallelism for sampling lives in w2s/tensor_parallel.py. No torch.distributed call is
made inside the model. The process-level helpers of the command-line tools live here too: say_error (one error line
per torchrun launch) and command_line_process (Ctrl-C and SIGTERM as one stop, one-line warnings).

    python -m pytest -q tests/test_fsdp.py   # 2 CPU processes over gloo == 1 process
"""

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int
    world_size: int
    device: torch.device
    sharded: bool  # FSDP2 applied (every CUDA run, and any multi-process run)

    @property
    def is_main(self):
        return self.rank == 0


def init_distributed():
    """Join the torchrun process group if launched by torchrun; on a single CUDA device create a 1-rank group so the
    same FSDP2 mixed-precision path runs there too. A single CPU process stays plain (fp32, no FSDP)."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        if "WORLD_SIZE" in os.environ:  # torchrun: rank, world size and rendezvous come from the environment
            dist.init_process_group("nccl" if cuda else "gloo")
        elif cuda:
            dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
        else:
            return Dist(0, 1, torch.device("cpu"), sharded=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return Dist(rank, world, device, sharded=True)


def check_joined(what):
    """Refuse `what` in a process that torchrun launched among several but that has not joined the process group:
    every rank would do all the work alone, and write the same files."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{what}: launched by torchrun with {world} processes, but this one has not joined the "
                           f"process group: call w2s.parallel.init_distributed() first")


def rank():
    """This process's rank: the process group's once joined, else torchrun's RANK, else 0 (a plain run).
    Rank 0 alone writes shared files (run artifacts, exported models, the report)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main():
    return rank() == 0


_STOPPING = []  # non-empty once command_line_process's handler saw a Ctrl-C or SIGTERM


def stop_requested():
    """Whether this command was told to stop (Ctrl-C or SIGTERM under command_line_process). An error that follows
    the interrupt is part of the stop: a checkpoint save that swallowed it, a collective whose peer already left."""
    return bool(_STOPPING)


@contextlib.contextmanager
def command_line_process():
    """What the command-line tools set for the span of one command, put back after it (tests run them in-process).

    A SIGTERM stops the command as a Ctrl-C does (KeyboardInterrupt), so that its interrupt path says what is kept:
    a scheduler sends SIGTERM before it kills a job (preemption, a time limit), and torchrun sends it to the other
    ranks when one fails; Python's default is to die without a word. Either signal also marks the command as
    stopping (stop_requested), and a second one gets the signal's previous handling (SIGTERM kills at once).
    A warning prints as one `warning: ...` line: Python's default adds the category and the source line that
    raised it, which tell a user nothing.
    A process group the command joined (torchrun) is left on the way out, whatever the outcome: a process that exits
    still in a gloo group can abort natively at interpreter shutdown ("terminate called without an active exception")
    while gloo's threads still hold tensors, and NCCL warns of the same."""
    import signal
    import threading
    import warnings

    previous = {}

    def interrupt(signum, frame):
        _STOPPING.append(signum)
        signal.signal(signum, signal.SIG_DFL if previous[signum] is None else previous[signum])
        raise KeyboardInterrupt

    previous_format = warnings.formatwarning
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    in_main = threading.current_thread() is threading.main_thread()  # signal handlers can only be set there
    for signum in (signal.SIGINT, signal.SIGTERM) if in_main else ():
        previous[signum] = signal.signal(signum, interrupt)
    joined_before = dist.is_available() and dist.is_initialized()  # a test's own group is the test's to leave
    try:
        yield
    finally:
        if not joined_before and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        warnings.formatwarning = previous_format
        _STOPPING.clear()
        for signum, handler in previous.items():
            if handler is not None:  # None: a handler not set from Python, which Python cannot put back
                signal.signal(signum, handler)


def exit_if_stopped(e, kept):
    """End the command as stopped when `e` is its Ctrl-C or SIGTERM, or an error that followed one (a collective the
    stop broke): one line saying what is `kept`, exit 130 as a shell reports an interrupt. Return otherwise."""
    if not (isinstance(e, KeyboardInterrupt) or stop_requested()):
        return
    if rank() == 0:
        print(file=sys.stderr)  # past the line a progress bar was drawing
    say_error(f"stopped (Ctrl-C or SIGTERM): {kept}")
    raise SystemExit(130) from None


def say_error(line):
    """Print `line`, the one line of an error that ends this process, once per torchrun launch: rank 0 says it, and each
    failing rank writes it to its torchrun error file, so that torchrun's failure summary names the error of the first
    rank that failed (without the file it says only "To enable traceback see ..."). Bad input and the files rank 0 alone
    reads and writes fail on rank 0 too; an error only another rank meets (its own output part, a node-local file)
    reaches the user through that summary. Without torchrun's error file (another launcher) every rank prints, prefixed
    with its rank beyond rank 0."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")  # set by torchrun for each worker
    if rank() == 0 or not error_file:
        print(line if rank() == 0 else f"[rank {rank()}] {line}", file=sys.stderr)
    if error_file:
        with open(error_file, "w") as f:
            # the layout of torchrun's own record_exception; its summary shows py_callstack, here the one line
            json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line,
                                                                  "timestamp": str(int(time.time()))}}}, f)


def lost_peer_line(e):
    """The one line to say when `e` is this rank's collective failing because another rank has gone (gloo says its
    peer closed the connection; that rank's own error is the one to read), or None."""
    lost = isinstance(e, RuntimeError) and rank() != 0 and dist.is_available() and dist.is_initialized() and \
        ("Connection closed by peer" in str(e) or "Connection reset by peer" in str(e))
    return f"rank {rank()} stopped: another rank left the process group (its error says why)" if lost else None


def all_reduce_sum(tensor, d: Dist):
    """Sum a tensor over ranks (in place; returns it). A no-op in a single plain process."""
    if d.sharded and d.world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(d: Dist | None = None):
    """Wait for every rank; a no-op in a single process. Readers must not run ahead of rank 0's writes."""
    if d is not None and not d.sharded:
        return
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def needs_fill_from_rank0(model, d: Dist):
    """True on every rank when any rank holds the model on the meta device (a collective when sharded)."""
    on_meta = model.embed_tokens.weight.is_meta
    if on_meta and not d.sharded:
        raise ValueError("train: the model is on the meta device (no weights); only a sharded run (torchrun or CUDA) "
                         "fills it from rank 0; load it with w2s.load_model instead")
    return d.sharded and bool(all_reduce_sum(torch.tensor([float(on_meta)], device=d.device), d).item())


def broadcast_object(obj, d: Dist | None = None):
    """Rank 0's picklable obj on every rank (obj itself in a single process)."""
    if (d is not None and not d.sharded) or not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def fill_from_rank0(module, full_state, d: Dist, cpu_offload=False):
    """After shard_model: give every rank its shards of rank 0's weights (ranks > 0 may hold meta parameters).

    full_state: on rank 0 the module's state_dict() taken before sharding (plain full tensors); ignored elsewhere.
    A collective: call it on every rank. Each rank allocates only its own shards (to_empty), then rank 0 broadcasts
    one tensor at a time and every rank keeps its slice (torch.distributed.checkpoint's broadcast_from_rank0).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if any(p.is_meta for p in module.parameters()):
        if d.rank == 0:
            raise ValueError("fill_from_rank0: rank 0 holds meta parameters; it must load the real checkpoint")
        module.to_empty(device="cpu" if cpu_offload else d.device)  # where shard_model keeps the shards
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(module, full_state if d.rank == 0 else {}, options=options)


def shard_model(root, blocks, d: Dist, bf16=True, cpu_offload=False):
    """fully_shard each block, then the root. bf16=True: bf16 compute / fp32 reduce (GPU); False: fp32 (CPU tests).

    cpu_offload keeps the sharded parameters, gradients and optimizer state in host memory (FSDP2 OffloadPolicy);
    the optimizer step then runs on the CPU. Use it when the fp32 optimizer state does not fit on the GPUs.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(d.device.type, (d.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    # Pinned host memory makes the host<->GPU copies asynchronous; without a GPU there is nothing to pin for (and
    # pinning raises), so the CPU tests run the same offload code unpinned.
    offload = CPUOffloadPolicy(pin_memory=d.device.type == "cuda") if cpu_offload else OffloadPolicy()
    kwargs = dict(mesh=mesh, mp_policy=mp, offload_policy=offload)
    # Backward starts where the forward ends: with the root (the loss head), then the last block. Keep those two
    # gathered after a forward rather than free their weights and gather them again at once (torchtitan's default).
    for i, block in enumerate(blocks):
        fully_shard(block, reshard_after_forward=i < len(blocks) - 1, **kwargs)
    fully_shard(root, reshard_after_forward=False, **kwargs)
    # Sum the gradients over ranks. One rank's average is its sum, and there an explicit factor would cost a pass:
    # FSDP2 copies one rank's gradients to the reduce output as `input / factor` (a temporary, and one more read and
    # write of every fp32 gradient).
    if d.world_size > 1:
        for module in [*blocks, root]:
            # Plain SUM: a divide factor of 1 would otherwise become NCCL's PREMUL_SUM(1.0), which gloo lacks and
            # which buys nothing when the factor is 1 (FSDP skips the division by 1 after a SUM).
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return root


def reshard_all(root):
    """Free what forwards with no backward after them left gathered (the root and the last block keep their weights
    after a forward; a backward frees them) and register the sharded parameters again, so that root.parameters()
    yields the sharded fp32 parameters the optimizer and the checkpoint need. Not a collective; plain modules pass."""
    from torch.distributed.fsdp import FSDPModule

    for module in root.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def enable_activation_checkpointing(blocks):
    """Recompute each block's forward in backward instead of keeping its activations (non-reentrant checkpointing;
    the RNG state is replayed, so dropout draws the same mask on recompute). The training loop applies it before
    shard_model. It replaces each block's forward rather than wrapping the module (torch's checkpoint_wrapper), so
    parameter names, and with them checkpoints and exports, stay the same."""
    from torch.utils.checkpoint import checkpoint

    for block in blocks:
        inner = block.forward  # bound now: the default argument keeps each block's own forward
        block.forward = lambda *args, _f=inner, **kw: checkpoint(_f, *args, use_reentrant=False, **kw)


def full_tensor(t):
    """The whole tensor of a possibly sharded (DTensor) parameter; a collective when sharded: call on every rank."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t
