"""What the attention kernels share (attention.py, attention_backward.py,
decode_attention.py): the @triton.jit helpers that place query rows and key blocks (positions, lengths,
which key blocks a query block sees, the mask, soft-capped base-2 scores, TMA descriptors of one kv head and of a
head's query rows), and the host side of every launch (launch-table lookup, grid limits, dtype precision, the TMA
readiness check, the input checks).

The contract they implement is w2s.kernels.reference.attention's (read it first); the key-segment reasoning is explained
in attention.py.

    python -m pytest -q tests/test_kernel_attention.py     # CPU, TRITON_INTERPRET=1, vs the reference
"""

import contextlib
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    # 1 - 2 / (e^{2x} + 1): exact limits at both ends (e^{2x} -> inf gives 1, -> 0 gives -1), no NaN. Cheaper inside
    # the key loop than glu.py's (one exp2, no select); its error near 0 is absolute (~1e-7, not relative),
    # which a soft-capped logit (softcap x tanh) takes as ~1e-7 x softcap.
    return 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)  # 2 * log2(e)


@triton.jit
def _query_positions(POS, b, rows_t, row_ok, stride_pb, stride_pt, HAS_POS: tl.constexpr):
    """Absolute position of each query row; -1 for rows past T (they then see nothing)."""
    if HAS_POS:
        pos = tl.load(POS + b * stride_pb + rows_t * stride_pt, mask=row_ok, other=-1).to(tl.int32)
    else:
        pos = rows_t.to(tl.int32)
    return tl.where(row_ok, pos, -1)


@triton.jit
def _rows_descriptor(X_head, stride_t, T, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """A TMA descriptor of one head's (T, D) rows of a query-side operand (q, dO), read (BLOCK_M, D) at a time; the
    copy engine fills the rows past T with zeros."""
    return tl.make_tensor_descriptor(X_head, shape=[T, HEAD_DIM], strides=[stride_t, 1],
                                     block_shape=[BLOCK_M, HEAD_DIM])


@triton.jit
def _kv_length(KV_LEN, b, S, HAS_KV_LEN: tl.constexpr):
    if HAS_KV_LEN:
        n = tl.load(KV_LEN + b).to(tl.int32)
        return tl.maximum(tl.minimum(n, S), 0)
    return S


@triton.jit
def _key_segments(pos, row_ok, kv_len, window, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Key ranges for a block of query rows: [lo, full_lo) masked, [full_lo, full_hi) all visible, [full_hi, hi)
    masked. lo, full_lo and full_hi are multiples of BLOCK_N (or equal to hi), so every loop walks whole blocks."""
    min_pos = tl.min(tl.where(row_ok, pos, 2147483647), 0)
    max_pos = tl.max(tl.where(row_ok, pos, -1), 0)
    hi = tl.minimum(kv_len, max_pos + 1)  # causal: nothing past the last row's position
    all_see_to = tl.minimum(kv_len, min_pos + 1)  # every row sees keys below this (before the window)
    if HAS_WINDOW:
        lo = tl.maximum(min_pos - window + 1, 0)
        all_see_from = tl.maximum(max_pos - window + 1, 0)
    else:
        lo = min_pos * 0
        all_see_from = min_pos * 0
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(tl.cdiv(all_see_from, BLOCK_N) * BLOCK_N, lo), hi)
    full_hi = tl.minimum(tl.maximum((all_see_to // BLOCK_N) * BLOCK_N, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _visible(pos_rows, keys, kv_len, window, HAS_WINDOW: tl.constexpr):
    """The reference mask (key <= pos, key < kv_len, and pos - key < window) for a (rows, keys) tile; pos_rows and
    keys are already broadcast against each other. The first two meet in one bound per query, so a score costs one
    compare (two with a window), not two or three."""
    ok = keys <= tl.minimum(pos_rows, kv_len - 1)
    if HAS_WINDOW:
        ok = ok & (keys > pos_rows - window)
    return ok


@triton.jit
def _kv_descriptors(K_head, V_head, stride_ks, stride_vs, kv_len, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    """TMA descriptors of one kv head's (kv_len, D) keys and values, read in (BLOCK_N, D) tiles: Hopper's tensor
    memory accelerator copies each tile to shared memory asynchronously, with no address arithmetic or load masks in
    the threads, and fills rows past kv_len with zeros. At least one row: a descriptor has no empty dimension, and a
    row with kv_len 0 loads nothing."""
    rows = tl.maximum(kv_len, 1)
    k_desc = tl.make_tensor_descriptor(K_head, shape=[rows, HEAD_DIM], strides=[stride_ks, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(V_head, shape=[rows, HEAD_DIM], strides=[stride_vs, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    return k_desc, v_desc


@triton.jit
def _log2_scores(qk, scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """Raw q.k (fp32) -> (scores, to_log2): the softmax logits in base-2 units are scores * to_log2. Without a soft
    cap the scores are q.k itself and the multiply by scale * log2(e) is left to the caller, which folds it into the
    exp2's subtraction (exp2(s * to_log2 - m): one fused multiply-add per score, not a multiply and an add). With
    Gemma-2's soft cap the scores are the capped logits and to_log2 is 1."""
    if HAS_SOFTCAP:
        return softcap * _tanh(qk * (scale / softcap)) * 1.4426950408889634, 1.0
    return qk, scale * 1.4426950408889634


# ----------------------------------------------------------------------------------------------------------------
# host side of a launch
# ----------------------------------------------------------------------------------------------------------------


class Launch(NamedTuple):
    """One entry of an attention launch table: the tiles (BLOCK_M query rows, BLOCK_N keys), num_warps, the key
    loop's software-pipeline depth (num_stages), and the options sweep.py times: stream the loop's tiles
    through TMA descriptors; (the forward only) run a fixed number of programs per SM that walk the tiles instead of
    one program per tile (0); (the forward only) issue each key block's P V product one block late, so that the
    block's softmax runs while the tensor cores add the previous block's (attention.py's _fwd_key_loop_deferred);
    (the dk/dv kernel only) also sum dq there with fp32 atomic adds, so that the dq kernel does not run (dq then is
    not bit-reproducible from run to run: the adds land in any order). An option set where the kernel does not read
    it is refused at launch (`_config`)."""
    block_m: int
    block_n: int
    warps: int
    stages: int
    tma: bool = False
    programs_per_sm: int = 0
    atomic_dq: bool = False
    deferred_pv: bool = False


_OPTION_TABLES = {"programs_per_sm": "w2s/kernels/attention.py's _GPU_FWD",
                  "deferred_pv": "w2s/kernels/attention.py's _GPU_FWD",
                  "atomic_dq": "w2s/kernels/attention_backward.py's _GPU_BWD_DKDV"}  # the one kernel that reads each


@contextlib.contextmanager
def launch_changes(changes, head_dim):
    """Within the block, the head_dim entry of each launch table in `changes` ([(table, {Launch field: value})], as
    sweep.py's LAUNCH_OPTIONS) has those fields changed; the entries are put back after, even on an error."""
    saved = [(table, table[head_dim]) for table, _ in changes]
    try:
        for table, fields in changes:
            table[head_dim] = table[head_dim]._replace(**fields)
        yield
    finally:
        for table, entry in reversed(saved):
            table[head_dim] = entry


def _config(table, interpret_config, head_dim, kernel, options=("tma",)):
    """The Launch for this head dim (the interpreter's own under TRITON_INTERPRET=1). An option the kernel does not
    read (a persistent backward, a forward with atomic dq: a table edited by hand) is an error, not a silent no-op."""
    launch = interpret_config if _interpreting() else table[max(64, head_dim)]
    unread = [name for name in _OPTION_TABLES if name not in options and getattr(launch, name)]
    if unread:
        raise ValueError(f"attention: the {kernel} launch config {launch} (head dim {head_dim}) sets "
                         f"{' and '.join(unread)}, which the {kernel} kernel does not read (it belongs in "
                         f"{' and '.join(_OPTION_TABLES[name] for name in unread)})")
    return launch


_MAX_GRID_ROWS = 65535  # CUDA's limit on grid axis 1 (axis 0 may reach 2**31 - 1); the interpreter checks neither


def _grid(blocks, rows):
    """Launch grid (blocks, rows): blocks along the sequence on axis 0, so that neighbouring programs share one
    (batch, head) and its keys stay in L2; rows = batch x heads on axis 1."""
    if rows > _MAX_GRID_ROWS:
        raise ValueError(f"attention: batch x heads = {rows} exceeds CUDA's {_MAX_GRID_ROWS} grid rows; "
                         "call it on smaller batches")
    return (blocks, rows)


def _sm_count(device):
    """Streaming multiprocessors of the GPU (3 in the interpreter: a handful of programs that each walk several
    tiles); compile_check.py stands in an H100's 132."""
    if _interpreting():
        return 3
    return torch.cuda.get_device_properties(device).multi_processor_count


def _precision(dtype):
    # fp32 inputs: true fp32 products (the tests compare at 1e-4); fp16/bf16 use tensor cores with fp32 accumulation.
    return "ieee" if dtype == torch.float32 else "tf32"


def _last_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _optional_int32(x, device):
    """Positions or lengths as int32 on device, contiguous: the kernels read (B,) lengths by row index (positions
    by their strides, but a copy of those costs nothing beside attention); None stays None."""
    return None if x is None else x.to(device=device, dtype=torch.int32).contiguous()


def _pos_strides(q_positions):
    return (0, 0) if q_positions is None else (q_positions.stride(0), q_positions.stride(1))


def _flags(q_positions, kv_lengths, sliding_window, softcap):
    return dict(HAS_POS=q_positions is not None, HAS_KV_LEN=kv_lengths is not None,
                HAS_WINDOW=sliding_window is not None, HAS_SOFTCAP=softcap is not None)


def _tma_ready(*tensors):
    """Whether TMA descriptors can address these (B, S or T, heads, D) tensors: unit stride along D, 16-byte aligned
    base and strides; and, on a GPU, the scratch memory in which the kernel writes its descriptors."""
    if not all(x.stride(-1) == 1 and x.data_ptr() % 16 == 0 and all(st * x.element_size() % 16 == 0
                                                                    for st in x.stride()[:-1]) for x in tensors):
        return False
    if not _interpreting():
        _keep_or_set_descriptor_allocator()
    return True


def _keep_or_set_descriptor_allocator():
    """Kernels that build descriptors on the device need scratch memory from Triton's allocator, which is unset (and
    refuses) by default: point it at torch's caching allocator, unless this thread already has one (a user's own is
    kept). The allocator is a context variable, so it is checked at every launch, from whichever thread launches."""
    try:
        from triton.runtime._allocation import NullAllocator, _allocator
        if not isinstance(_allocator.get(), NullAllocator):
            return
    except ImportError:  # a Triton that moved its internals: set ours, as any launch needs one
        pass
    triton.set_allocator(_descriptor_scratch)


def _descriptor_scratch(size, alignment, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")  # the current device; the caching allocator's 512-B
    # blocks satisfy the 128-B alignment descriptors need


def _check_inputs(q, k, v, q_positions, kv_lengths, sliding_window, softcap, kv_rows=None):
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"attention: expected q (B, T, H, D) and k, v (B, S, K, D) of equal shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, T, H, D = q.shape
    if kv_rows is not None and (tuple(kv_rows.shape) != (B,) or kv_rows.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"attention: kv_rows {tuple(kv_rows.shape)} {kv_rows.dtype}, expected ({B},) integers")
    if (kv_rows is None and k.shape[0] != B) or k.shape[3] != D or H % k.shape[2] != 0:
        raise ValueError(f"attention: k/v {tuple(k.shape)} do not match q {tuple(q.shape)} "
                         "(same B, or kv_rows; same D; H a multiple of K)")
    if D not in (16, 32, 64, 128, 256):
        raise ValueError(f"attention: head dim {D} unsupported by the Triton kernel (16, 32, 64, 128 or 256)")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"attention: q/k/v dtypes {q.dtype}, {k.dtype}, {v.dtype}: expected one of fp16/bf16/fp32")
    if q_positions is not None and tuple(q_positions.shape) != (B, T):
        raise ValueError(f"attention: q_positions {tuple(q_positions.shape)}, expected (B, T) = {(B, T)}")
    if kv_lengths is not None and tuple(kv_lengths.shape) != (B,):
        raise ValueError(f"attention: kv_lengths {tuple(kv_lengths.shape)}, expected (B,) = {(B,)}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"attention: softcap {softcap} must be positive (or None)")
