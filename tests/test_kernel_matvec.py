"""The one-row matrix-vector kernel (w2s/kernels/matvec.py) against torch's matmuls, and the ops switch that sends a
batch-1 decode step's projections to it (ops.linear, ops.add_linear_).

On CPU the kernel runs under TRITON_INTERPRET=1 (set here before triton is imported) in fp32 and fp16 at tiny odd
shapes, with the interpreter's tiny blocks: several programs, several K chunks, a last program past N and a last chunk
past K. Tolerances: fp32 within 1e-5 of F.linear (another summation order); fp16 as accurate as torch's fp16 matmul,
both measured against float64 on the same rounded inputs (twice torch's error plus one ulp). The `gpu` test runs the
compiled kernel at the Llama-3-8B shapes in bf16 the same way.

    python -m pytest -q tests/test_kernel_matvec.py            # CPU
    python -m pytest -q -m gpu tests/test_kernel_matvec.py     # GPU
"""

import pytest
import torch
import torch.nn.functional as F

# The kernel tests' device (Triton's interpreter on CPU, switched on there before triton is imported), tolerances,
# per-test seed and default device (an autouse fixture), and accuracy rule for low precision
from test_kernels import DEVICE, FP32_TOL, _seed_and_device, assert_as_accurate  # noqa: F401

from w2s import ops
from w2s.kernels import matvec


def check(out, torch_out, exact):
    assert out.dtype == torch_out.dtype and out.shape == torch_out.shape
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, torch_out, **FP32_TOL)
    else:
        assert_as_accurate(out, torch_out, exact)


# (N, K): K not a multiple of the chunk and N not of the rows per program; both multiples; one output row; K under one
# chunk
SHAPES = [(37, 53), (40, 64), (1, 48), (9, 5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N, K", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_matvec_is_f_linear(dtype, N, K, with_bias):
    x, w = torch.randn(1, 1, K).to(dtype), (torch.randn(N, K) / K**0.5).to(dtype)
    bias = torch.randn(N).to(dtype) if with_bias else None
    exact = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    out = matvec.matvec(x, w, bias)
    assert out.shape == (1, 1, N)
    check(out, F.linear(x, w, bias), exact)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N, K", SHAPES)
def test_matvec_adds_into_the_residual_row_in_place(dtype, N, K):
    """residual += x W^T, the sum rounded once (as addmm_), written over the residual and returned."""
    x, w = torch.randn(1, 1, K).to(dtype), (torch.randn(N, K) / K**0.5).to(dtype)
    residual = torch.randn(1, 1, N).to(dtype)
    exact = residual.double() + F.linear(x.double(), w.double())
    expected = residual.view(1, N).clone().addmm_(x.view(1, K), w.t()).view(1, 1, N)
    out = matvec.matvec(x, w, accumulate_into=residual)
    assert out is residual
    check(residual, expected, exact)


def test_matvec_reads_a_strided_row_and_writes_a_strided_residual():
    """One row with a stride along K (a column of a wider tensor) is read in place, and a residual row with a stride
    along N is written in place, its neighbours untouched: the same values as from contiguous rows."""
    N, K = 37, 53
    w = torch.randn(N, K)
    wide_x, wide_residual = torch.randn(K, 3), torch.randn(N, 2)
    x, residual = wide_x[:, 1].view(1, K), wide_residual[:, 0].view(1, N)  # strides (.., 3) and (.., 2)
    assert x.stride(-1) == 3 and residual.stride(-1) == 2
    assert torch.equal(matvec.matvec(x, w), matvec.matvec(x.contiguous(), w))
    expected = matvec.matvec(x.contiguous(), w, accumulate_into=residual.clone())
    neighbours = wide_residual[:, 1].clone()
    matvec.matvec(x, w, accumulate_into=residual)
    assert torch.equal(wide_residual[:, 0], expected[0]) and torch.equal(wide_residual[:, 1], neighbours)


def test_matvec_of_no_output_rows():
    assert matvec.matvec(torch.randn(1, 8), torch.randn(0, 8)).shape == (1, 0)


def test_matvec_refuses_what_it_cannot_compute():
    x, w = torch.randn(1, 16), torch.randn(8, 16)
    refusals = [
        (torch.randn(2, 16), w, {}),  # two rows
        (x, torch.randn(16, 8).t(), {}),  # weight strided along K
        (x, torch.randn(8, 15), {}),  # K mismatch
        (x.half(), w, {}),  # dtypes differ
        (x, w, dict(bias=torch.randn(7))),  # bias of another length
        (x, w, dict(accumulate_into=torch.randn(2, 8))),  # a residual of two rows
        (x, w, dict(bias=torch.randn(8), accumulate_into=torch.randn(1, 8))),  # a bias with the residual add
    ]
    for x_, w_, kwargs in refusals:
        with pytest.raises(ValueError, match="^matvec: "):
            matvec.matvec(x_, w_, **kwargs)


def test_matvec_compiles_for_an_h100_without_a_gpu(tmp_path):
    """The table's launches compiled for sm_90a (registers, shared memory: what the interpreter never checks), plain,
    with a bias and into a residual, unmasked and masked along K."""
    from test_kernels import compile_check_for_sm90

    stdout = compile_check_for_sm90(tmp_path, "matvec")
    assert "every variant compiled within the H100's shared memory" in stdout
    assert stdout.count("_matvec_kernel") == 6


# ------------------------------------------------------------------------------------------------ the ops switch


@pytest.fixture
def matvec_calls(monkeypatch):
    """The Triton backend on, and the kernel's calls recorded: [(x shape, accumulating)]."""
    calls = []
    real = matvec.matvec
    monkeypatch.setattr(ops, "_backend", "triton")
    monkeypatch.setattr(matvec, "matvec", lambda x, w, bias=None, accumulate_into=None: calls.append(
        (tuple(x.shape), accumulate_into is not None)) or real(x, w, bias, accumulate_into))
    return calls


def test_ops_linear_takes_the_kernel_for_one_row_without_gradients_only(matvec_calls, monkeypatch):
    K, N = 24, 10
    w, bias = torch.randn(N, K), torch.randn(N)
    one = torch.randn(1, 1, K)
    torch.testing.assert_close(ops.linear(one, w, bias), F.linear(one, w, bias), **FP32_TOL)
    assert matvec_calls == [((1, 1, K), False)]
    for x in (torch.randn(2, 1, K), torch.randn(1, 3, K)):  # batch 2; one sequence of 3 tokens (prefill)
        torch.testing.assert_close(ops.linear(x, w, bias), F.linear(x, w, bias), **FP32_TOL)
    trained = w.clone().requires_grad_(True)
    out = ops.linear(one, trained)  # a gradient wanted: autograd's F.linear
    assert out.grad_fn is not None
    ops.linear(one, torch.randn(K, N).t())  # a weight not contiguous
    assert len(matvec_calls) == 1
    with torch.no_grad():
        ops.linear(one, trained)  # no gradient wanted after all: the kernel
    assert len(matvec_calls) == 2
    monkeypatch.setattr(ops, "TRITON_MATVEC", False)  # the benchmark's switch
    ops.linear(one, w)
    monkeypatch.setattr(ops, "TRITON_MATVEC", True)
    monkeypatch.setattr(ops, "_backend", "reference")
    ops.linear(one, w)
    assert len(matvec_calls) == 2


def test_ops_add_linear_adds_in_place_through_the_kernel_for_one_row_else_addmm(matvec_calls):
    K, N = 24, 10
    w = torch.randn(N, K)
    for rows, expected_calls in ((1, [((1, 1, K), True)]), (3, [])):
        x, residual = torch.randn(rows, 1, K), torch.randn(rows, 1, N)
        expected = residual + F.linear(x, w)
        matvec_calls.clear()
        assert ops.add_linear_(residual, x, w) is residual
        torch.testing.assert_close(residual, expected, **FP32_TOL)
        assert matvec_calls == expected_calls


# ------------------------------------------------------------------------------------------------------ GPU, bf16

# Llama-3-8B's one-row projections (N, K): fused q/k/v, o, fused gate/up, down, lm_head
LLAMA3_8B_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)]


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")
@pytest.mark.parametrize("N, K", LLAMA3_8B_SHAPES)
def test_gpu_matvec_bf16_at_the_llama3_8b_shapes(N, K):
    """bf16 at the GPU table's launches, plain, with a bias and into a residual row: as accurate as cuBLAS's bf16
    F.linear / addmm_, both against float64."""
    torch.cuda.empty_cache()
    x, w = torch.randn(1, K).bfloat16(), (torch.randn(N, K) / K**0.5).bfloat16()
    bias, residual = torch.randn(N).bfloat16(), torch.randn(1, N).bfloat16()
    product = F.linear(x.double(), w.double())
    check(matvec.matvec(x, w), F.linear(x, w), product)
    check(matvec.matvec(x, w, bias), F.linear(x, w, bias), product + bias.double())
    expected = residual.clone().addmm_(x, w.t())
    check(matvec.matvec(x, w, accumulate_into=residual.clone()), expected, product + residual.double())
