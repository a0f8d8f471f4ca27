"""Gated MLP activations in Triton: swiglu (Llama, Mistral) and geglu (Gemma), forward and backward.

    swiglu(gate, up) = silu(gate) * up        silu(g) = g * sigmoid(g)
    geglu(gate, up)  = gelu_tanh(gate) * up   gelu_tanh(g) = g/2 * (1 + tanh(c * (g + 0.044715 g^3))), c = sqrt(2/pi)

Elementwise over (..., F) in fp32 registers; like eager PyTorch, the activation is rounded to the input dtype before
the multiply by `up`. gate and up may be the two column halves of one fused gate/up projection (the sampler's): the
forward then reads them in place, row by row, instead of copying them. The backward recomputes the activation from
the saved inputs (cheaper than storing it):

    d gate = d out * up * act'(gate)        d up = d out * act(gate)

    python -m pytest -q tests/test_kernels.py -k glu    # CPU, TRITON_INTERPRET=1, against the reference
"""

import torch
import triton
import triton.language as tl

BLOCK = 1024
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
GELU_COEF = tl.constexpr(0.044715)


@triton.jit
def _tanh(z):
    # tl has no tanh: tanh|z| = (1 - e) / (1 + e) with e = exp(-2|z|) in (0, 1], which cannot overflow
    e = tl.exp(-2.0 * tl.abs(z))
    magnitude = (1.0 - e) / (1.0 + e)
    return tl.where(z >= 0, magnitude, -magnitude)


@triton.jit
def _act_and_grad(g, GELU: tl.constexpr):
    """(act(g), act'(g)) in fp32."""
    if GELU:
        inner = SQRT_2_OVER_PI * (g + GELU_COEF * g * g * g)
        th = _tanh(inner)
        act = 0.5 * g * (1.0 + th)
        grad = 0.5 * (1.0 + th) + 0.5 * g * (1.0 - th * th) * SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_COEF * g * g)
    else:
        sig = tl.sigmoid(g)
        act = g * sig
        grad = sig * (1.0 + g * (1.0 - sig))
    return act, grad


@triton.jit
def _glu_fwd_kernel(gate_ptr, up_ptr, out_ptr, n, GELU: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    gate = tl.load(gate_ptr + offs, mask=mask, other=0.0)
    up = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    act, _ = _act_and_grad(gate.to(tl.float32), GELU)
    out = act.to(gate.dtype).to(tl.float32) * up
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(dout_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n, GELU: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + offs, mask=mask, other=0.0)
    up = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    act, dact = _act_and_grad(gate.to(tl.float32), GELU)
    tl.store(dgate_ptr + offs, (dout * up * dact).to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + offs, (dout * act.to(gate.dtype).to(tl.float32)).to(dup_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _glu_fwd_rows_kernel(gate_ptr, up_ptr, out_ptr, F, gate_rs, up_rs, GELU: tl.constexpr, BLOCK: tl.constexpr):
    """The forward over (N, F) rows with row strides: gate and up as the two column halves of one fused gate/up
    projection output (N, 2F), read in place."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    gate = tl.load(gate_ptr + row * gate_rs + cols, mask=mask, other=0.0)
    up = tl.load(up_ptr + row * up_rs + cols, mask=mask, other=0.0).to(tl.float32)
    act, _ = _act_and_grad(gate.to(tl.float32), GELU)
    out = act.to(gate.dtype).to(tl.float32) * up
    tl.store(out_ptr + row * F + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _flat(t):
    return t.contiguous().view(-1)


def _rows(t):
    """t (..., F) as (N, F) rows without a copy when its last dim is contiguous and its rows evenly spaced (the
    halves of a fused projection), else None."""
    if t.dim() == 0 or t.stride(-1) != 1:
        return None
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:  # rows not evenly spaced
        return None


def glu_forward(gate, up, gelu):
    out = torch.empty(gate.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    n = gate.numel()
    if n and not (gate.is_contiguous() and up.is_contiguous()):
        g_rows, u_rows = _rows(gate), _rows(up)
        if g_rows is not None and u_rows is not None:
            F = gate.shape[-1]
            grid = (g_rows.shape[0], triton.cdiv(F, BLOCK))
            _glu_fwd_rows_kernel[grid](g_rows, u_rows, out.view(-1), F, g_rows.stride(0), u_rows.stride(0),
                                       GELU=gelu, BLOCK=BLOCK, num_warps=4)
            return out
    _glu_fwd_kernel[(triton.cdiv(n, BLOCK),)](_flat(gate), _flat(up), out.view(-1), n, GELU=gelu, BLOCK=BLOCK,
                                              num_warps=4)
    return out


def glu_backward(dout, gate, up, gelu):
    gate, up = gate.contiguous(), up.contiguous()
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    _glu_bwd_kernel[(triton.cdiv(n, BLOCK),)](_flat(dout), gate.view(-1), up.view(-1), dgate.view(-1), dup.view(-1),
                                              n, GELU=gelu, BLOCK=BLOCK, num_warps=4)
    return dgate, dup


class GLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, gelu):
        ctx.save_for_backward(gate, up)
        ctx.gelu = gelu
        return glu_forward(gate, up, gelu)

    @staticmethod
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        dgate, dup = glu_backward(dout, gate, up, ctx.gelu)
        return dgate, dup, None


def _check(gate, up, name):
    if gate.shape != up.shape:
        raise ValueError(f"{name}: gate shape {tuple(gate.shape)} != up shape {tuple(up.shape)}")


def swiglu(gate, up):
    """silu(gate) * up over (..., F) tensors; same contract as w2s.kernels.reference.swiglu."""
    _check(gate, up, "swiglu")
    return GLUFunction.apply(gate, up, False)


def geglu(gate, up):
    """gelu_tanh(gate) * up over (..., F) tensors; same contract as w2s.kernels.reference.geglu."""
    _check(gate, up, "geglu")
    return GLUFunction.apply(gate, up, True)
