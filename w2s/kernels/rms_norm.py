"""RMSNorm in Triton: forward and backward, with both numerics of reference.py.

    unit_offset=False (Llama, Mistral): y = w * cast(x * rstd)        the normalized row is rounded to x.dtype first
    unit_offset=True  (Gemma, Gemma-2): y = cast(x * rstd * (1 + w))  all in fp32, one rounding at the end

One program normalizes one row (the whole row fits in registers: D <= 16k). The forward keeps rstd (M,) fp32 for
the backward, which recomputes the normalized row instead of storing it. The weight gradient is a sum over rows:
each backward program walks a strided set of rows, accumulates its partial dw in fp32, and a second kernel sums
the (programs, D) partials — no atomics, deterministic. `add_rms_norm` (forward only) first adds a residual row, the
residual stream's add before a block's second norm, and writes that sum too: one launch instead of two.

    python -m pytest -q tests/test_kernels.py -k rms_norm    # CPU, TRITON_INTERPRET=1, against the reference
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, r_ptr, sum_ptr, D, eps, x_stride, y_stride, r_stride,
                         sum_stride, UNIT_OFFSET: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:  # the residual stream's add, rounded to the input dtype as eager's `residual + x` is
        x = (tl.load(r_ptr + row * r_stride + cols, mask=mask, other=0.0).to(tl.float32) + x.to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + row * sum_stride + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)
    tl.store(rstd_ptr + row, rstd)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    normed = xf * rstd
    if UNIT_OFFSET:
        y = normed * (1.0 + w)
    else:
        # Llama rounds the normalized row to the input dtype before the weight multiply; so do we.
        y = normed.to(x.dtype).to(tl.float32) * w
    tl.store(y_ptr + row * y_stride + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, M, D, dy_stride, x_stride,
                         dx_stride, rows_per_program, UNIT_OFFSET: tl.constexpr, BLOCK_D: tl.constexpr,
                         ROW_STAGES: tl.constexpr):
    # y = n * s with n = x * rstd and s = w (or 1 + w). Then dn = dy * s and
    # dx = rstd * (dn - n * mean(dn * n)),   dw = sum_rows dy * n   (n rounded as in the forward for Llama).
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    scale = 1.0 + w if UNIT_OFFSET else w
    dw_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    # walk the rows by advancing pointers (int64 arithmetic: M * D may exceed 2^31)
    first = row_start.to(tl.int64)
    x_ptr += first * x_stride
    dy_ptr += first * dy_stride
    dx_ptr += first * dx_stride
    rstd_ptr += first
    for _ in tl.range(row_start, row_end, num_stages=ROW_STAGES):
        x = tl.load(x_ptr + cols, mask=mask, other=0.0)
        xf = x.to(tl.float32)
        dy = tl.load(dy_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr)
        n = xf * rstd
        dn = dy * scale
        dx = rstd * (dn - n * (tl.sum(dn * n, axis=0) / D))
        tl.store(dx_ptr + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if UNIT_OFFSET:
            dw_acc += dy * n
        else:
            dw_acc += dy * n.to(x.dtype).to(tl.float32)
        x_ptr += x_stride
        dy_ptr += dy_stride
        dx_ptr += dx_stride
        rstd_ptr += 1
    tl.store(dw_partial_ptr + pid * D + cols, dw_acc, mask=mask)


@triton.jit
def _sum_partials_kernel(partial_ptr, out_ptr, P, D, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    # out[cols] = sum over the P rows of partial (P, D) fp32, written in out's dtype. A column-sum has only D outputs,
    # so each program takes a narrow band of columns (many programs, one per SM or so) and walks all the rows in
    # (BLOCK_P, BLOCK_D) tiles: every row's band is one contiguous segment.
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    rows = tl.arange(0, BLOCK_P)
    acc = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
    for start in tl.range(0, P, BLOCK_P, num_stages=3):
        mask = ((start + rows) < P)[:, None] & (cols < D)[None, :]
        acc += tl.load(partial_ptr + (start + rows)[:, None] * D + cols[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + cols, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=cols < D)


def _sum_partials(dw_partial, dtype):
    """(P, D) fp32 partial weight gradients -> their column sums (D,) in dtype, one launch (torch's sum(0) over a few
    hundred rows, then a cast, are two launches and the sum spreads its few thousand columns over few programs)."""
    P, D = dw_partial.shape
    out = torch.empty(D, dtype=dtype, device=dw_partial.device)
    block_d = 32 if dw_partial.is_cuda else 16
    _sum_partials_kernel[(triton.cdiv(D, block_d),)](dw_partial, out, P, D, BLOCK_P=64, BLOCK_D=block_d)
    return out


def _launch_config(D):
    block = triton.next_power_of_2(D)
    if block > 16384:
        raise ValueError(f"rms_norm: hidden size {D} too large for one row per program (max 16384)")
    num_warps = min(max(block // 256, 1), 16)  # ~8 elements per thread
    return block, num_warps


# Backward launch: programs per SM (each walks its rows one at a time, so more programs keep more rows in flight,
# at the price of more (programs, D) partial weight-gradient rows to sum), warps per program (None: by D, as the
# forward) and row stages (Triton's pipeliner copies the next stages - 1 rows' x and dy into shared memory while
# this row computes, so a program's loads do not wait on its own arithmetic; 1: no copies ahead). sweep.py times
# the alternatives on a GPU.
BWD_PROGRAMS_PER_SM = 2
BWD_NUM_WARPS = None
BWD_ROW_STAGES = 3
_ROW_STAGE_SHARED_BYTES = 192 * 1024  # the rows copied ahead stay under a Hopper block's 227 KB of shared memory


def _row_stages(block, x, dy):
    """BWD_ROW_STAGES, fewer where (stages - 1) rows of x and dy would not fit in shared memory."""
    row_bytes = block * (x.element_size() + dy.element_size())
    return max(1, min(BWD_ROW_STAGES, 1 + _ROW_STAGE_SHARED_BYTES // row_bytes))


def _num_programs(device, M):
    if device.type == "cuda":
        return min(M, BWD_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(M, 4)  # the CPU interpreter: a few programs still exercise the strided row split


def rms_norm_forward(x2d, weight, eps, unit_offset, residual2d=None):
    """x2d (M, D) with unit stride on D -> (y (M, D), rstd (M,) fp32). With residual2d (M, D), unit stride on D:
    the norm of residual2d + x2d, and that sum (M, D) as a third result."""
    M, D = x2d.shape
    out_dtype = x2d.dtype if unit_offset else torch.promote_types(x2d.dtype, weight.dtype)
    y = torch.empty((M, D), dtype=out_dtype, device=x2d.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x2d.device)
    summed = torch.empty_like(x2d) if residual2d is not None else None
    block, num_warps = _launch_config(D)
    if M > 0:  # no rows (an empty batch): nothing to launch
        r, s = (residual2d, summed) if residual2d is not None else (x2d, y)  # unread without a residual
        _rms_norm_fwd_kernel[(M,)](x2d, weight, y, rstd, r, s, D, eps, x2d.stride(0), y.stride(0), r.stride(0),
                                   s.stride(0), UNIT_OFFSET=unit_offset, HAS_RESIDUAL=residual2d is not None,
                                   BLOCK_D=block, num_warps=num_warps)
    return (y, rstd) if residual2d is None else (y, rstd, summed)


def rms_norm_backward(dy2d, x2d, weight, rstd, unit_offset):
    """-> (dx (M, D) in x.dtype, dweight (D,) in weight.dtype)."""
    M, D = x2d.shape
    dx = torch.empty_like(x2d)
    if M == 0:  # no rows: no input gradient to write, and the weight gradient is a sum over nothing
        return dx, torch.zeros_like(weight)
    programs = _num_programs(x2d.device, M)
    rows_per_program = triton.cdiv(M, programs)
    programs = triton.cdiv(M, rows_per_program)
    dw_partial = torch.empty((programs, D), dtype=torch.float32, device=x2d.device)
    block, num_warps = _launch_config(D)
    num_warps = BWD_NUM_WARPS or num_warps
    _rms_norm_bwd_kernel[(programs,)](dy2d, x2d, weight, rstd, dx, dw_partial, M, D, dy2d.stride(0),
                                      x2d.stride(0), dx.stride(0), rows_per_program,
                                      UNIT_OFFSET=unit_offset, BLOCK_D=block, ROW_STAGES=_row_stages(block, x2d, dy2d),
                                      num_warps=num_warps)
    return dx, _sum_partials(dw_partial, weight.dtype)


def _rows(t):
    """t (..., D) as (M, D) rows with unit stride along D (the kernels' layout): a view, or a copy where D is
    strided."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, unit_offset):
        x2d = _rows(x)
        y, rstd = rms_norm_forward(x2d, weight, eps, unit_offset)
        ctx.save_for_backward(x2d, weight, rstd)
        ctx.unit_offset = unit_offset
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(_rows(dy), x2d, weight, rstd, ctx.unit_offset)
        return dx.view(dy.shape), (dw if ctx.needs_input_grad[1] else None), None, None


def rms_norm(x, weight, eps, unit_offset=False):
    """RMSNorm over the last dim of x (..., D) with weight (D,); same contract as w2s.kernels.reference.rms_norm."""
    _check_weight(x, weight)
    return RMSNormFunction.apply(x, weight.contiguous(), eps, unit_offset)  # the kernels read weight by index


def add_rms_norm(x, residual, weight, eps, unit_offset=False):
    """(rms_norm(residual + x), residual + x) for x, residual (..., D), in one launch; forward only (no autograd:
    w2s/ops.py sends calls that need gradients to the add and rms_norm)."""
    _check_weight(x, weight)
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"add_rms_norm: residual {tuple(residual.shape)} {residual.dtype} does not match x "
                         f"{tuple(x.shape)} {x.dtype}")
    y, _, summed = rms_norm_forward(_rows(x), weight.contiguous(), eps, unit_offset, _rows(residual))
    return y.view(x.shape), summed.view(x.shape)


def _check_weight(x, weight):
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match x's last dim {x.shape[-1]}")
