"""Triton kernels (rms_norm, rope, rope + KV-cache write, swiglu/geglu, fused linear losses, sampling) against
w2s/kernels/reference.py.

On CPU the kernels run under TRITON_INTERPRET=1 (set here before triton is imported) in fp32 and fp16 at tiny odd
shapes; tests marked `gpu` run the compiled kernels in bf16 at realistic shapes and are skipped without CUDA.
Attention has its own tests beside w2s/kernels/attention.py.

Tolerances. fp32: the kernel and the reference do the same math with different reduction orders, so they agree to
~1e-5. Low precision: the reference itself is only as exact as its dtype, so the kernel must be *as accurate as
eager PyTorch*: its max error against the reference computed in fp32 on the same inputs may be at most twice the
reference's own low-precision error, plus one ulp of the output's magnitude (the floor for when the low-precision
reference happens to be exact).

    python -m pytest -q tests/test_kernels.py            # CPU
    python -m pytest -q -m gpu tests/test_kernels.py     # GPU
"""

import math
import os

import pytest
import torch

# On a machine without CUDA every kernel runs in Triton's interpreter, which must be switched on before triton is
# imported. With CUDA the same tests run the compiled kernels on the GPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

from w2s.kernels import chunked_linear, fused_linear, glu, reference, rms_norm, rope, rope_cache, sample  # noqa: E402

FP32_TOL = dict(atol=1e-5, rtol=1e-5)
requires_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")


@pytest.fixture(autouse=True)
def _seed_and_device():
    torch.manual_seed(0)
    torch.set_default_device(DEVICE)
    yield
    torch.set_default_device(None)


def assert_as_accurate(out, ref_low, ref_high, name=""):
    """out (low precision) is within 2x the error of the low-precision reference vs the fp32 reference, + 1 ulp."""
    ulp = torch.finfo(ref_low.dtype).eps
    out, ref_low, ref_high = out.double(), ref_low.double(), ref_high.double()
    ref_err = (ref_low - ref_high).abs().max().item()
    err = (out - ref_high).abs().max().item()
    allowed = 2 * ref_err + ulp * ref_high.abs().max().item()
    assert err <= allowed, f"{name}: max error {err:.3e} > allowed {allowed:.3e} (reference's own: {ref_err:.3e})"


def run_with_grads(fn, inputs):
    """Forward fn(*inputs) and backward of a fixed random linear function of its output -> [out, *grads]."""
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*inputs)
    gen = torch.Generator(device=out.device).manual_seed(1)  # the same upstream gradient for every run
    out.backward(torch.randn(out.shape, generator=gen, device=out.device).to(out.dtype))
    return [out.detach()] + [t.grad for t in inputs if t.requires_grad]


def check_against_reference(kernel_fn, reference_fn, inputs, dtype, names):
    """fp32: tight. fp16: kernel in fp16 must be as accurate as the reference in fp16 (both vs the fp32 reference)."""
    cast = [t.to(dtype) if t.is_floating_point() else t for t in inputs]
    got = run_with_grads(kernel_fn, cast)
    ref = run_with_grads(reference_fn, cast)
    assert len(got) == len(ref) == len(names)
    if dtype == torch.float32:
        for name, g, r in zip(names, got, ref):
            assert g.dtype == r.dtype, f"{name}: dtype {g.dtype} != reference {r.dtype}"
            torch.testing.assert_close(g, r, **FP32_TOL, msg=lambda m: f"{name}: {m}")
        return
    # the fp32 reference on the same (already rounded) inputs
    high = run_with_grads(reference_fn, [t.float() if t.is_floating_point() else t for t in cast])
    for name, g, r, h in zip(names, got, ref, high):
        assert g.dtype == r.dtype, f"{name}: dtype {g.dtype} != reference {r.dtype}"
        assert_as_accurate(g, r, h, name)


# ----------------------------------------------------------------------------------------------------- rms_norm

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("unit_offset", [False, True])
@pytest.mark.parametrize("shape", [(3, 5, 48), (7, 80)])
def test_rms_norm_matches_reference(dtype, unit_offset, shape):
    x = torch.randn(shape) * 3 + 0.5
    w = torch.randn(shape[-1]) * 0.5 + (0.0 if unit_offset else 1.0)
    eps = 1e-6

    def kernel(x, w):
        return rms_norm.rms_norm(x, w, eps, unit_offset=unit_offset)

    def ref(x, w):
        return reference.rms_norm(x, w, eps, unit_offset=unit_offset)

    check_against_reference(kernel, ref, [x, w], dtype, ["y", "dx", "dweight"])


def test_rms_norm_fp32_weight_on_fp16_activations_and_strided_rows():
    # Llama keeps fp32 norm weights under some mixed-precision setups: output promotes to fp32 like the reference.
    x = (torch.randn(4, 9, 64) * 2)[:, ::2]  # rows with a gap between them (row stride 128, not 64)
    w = torch.randn(64)
    got = run_with_grads(lambda x, w: rms_norm.rms_norm(x, w, 1e-5), [x.half(), w])
    ref = run_with_grads(lambda x, w: reference.rms_norm(x, w, 1e-5), [x.half(), w])
    assert got[0].dtype == ref[0].dtype == torch.float32
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.float(), r.float(), atol=2e-3, rtol=2e-3)


def test_rms_norm_of_no_rows():
    # an empty batch: empty output, empty input gradient, zero weight gradient (as the reference's autograd gives)
    x, w = torch.randn(0, 16, requires_grad=True), torch.randn(16, requires_grad=True)
    y = rms_norm.rms_norm(x, w, 1e-6)
    y.sum().backward()
    assert y.shape == (0, 16) and x.grad.shape == (0, 16) and (w.grad == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_weight_gradient_partials_sum_in_one_launch(dtype):
    # the backward's column sum of its (programs, D) fp32 partials: more rows than one tile (64) and a ragged last
    # column band, written in the weight's dtype; against torch's fp32 sum rounded once
    partials = torch.randn(150, 41)
    got = rms_norm._sum_partials(partials, dtype)
    assert got.dtype == dtype
    torch.testing.assert_close(got, partials.sum(0).to(dtype), atol=1e-5, rtol=1e-5 if dtype == torch.float32 else 1e-3)


def test_rms_norm_backward_copies_fewer_rows_ahead_where_shared_memory_runs_out(monkeypatch):
    """(stages - 1) rows of x and dy sit in shared memory: bf16 x and dy at D 4096 are 16 KiB a row, fp32 at 16384
    128 KiB, so at most one such row fits under the 192 KiB the launcher allows, whatever stages the table asks."""
    monkeypatch.setattr(rms_norm, "BWD_ROW_STAGES", 3)
    bf16, fp32 = torch.empty(1, dtype=torch.bfloat16), torch.empty(1)
    assert rms_norm._row_stages(4096, bf16, bf16) == 3
    assert rms_norm._row_stages(16384, fp32, fp32) == 2
    assert rms_norm._row_stages(16384, fp32, bf16) == 3  # 96 KiB a row: two fit
    monkeypatch.setattr(rms_norm, "BWD_ROW_STAGES", 1)
    assert rms_norm._row_stages(1024, bf16, bf16) == 1


def test_rms_norm_rejects_mismatched_weight():
    with pytest.raises(ValueError, match="weight shape"):
        rms_norm.rms_norm(torch.randn(2, 8), torch.ones(7), 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("unit_offset", [False, True])
def test_add_rms_norm_is_the_add_then_rms_norm(dtype, unit_offset):
    """One launch for the residual stream's add and the norm that reads it: the sum is eager's `residual + x` bit for
    bit (rounded to the dtype once), and the norm of it is the rms_norm kernel's, also for rows a stride apart."""
    x = (torch.randn(4, 3, 2 * 80) * 3)[..., :80].to(dtype)  # rows with a gap between them
    residual = (torch.randn(4, 3, 80) * 20).to(dtype)
    w = (torch.randn(80) * 0.5 + (0.0 if unit_offset else 1.0)).to(dtype)
    y, summed = rms_norm.add_rms_norm(x, residual, w, 1e-6, unit_offset)
    assert torch.equal(summed, residual + x)
    assert torch.equal(y, rms_norm.rms_norm(residual + x, w, 1e-6, unit_offset))
    torch.testing.assert_close(y.float(), reference.rms_norm(residual + x, w, 1e-6, unit_offset).float(),
                               **(FP32_TOL if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)))
    with pytest.raises(ValueError, match="residual"):
        rms_norm.add_rms_norm(x, residual[:2], w, 1e-6)


def test_ops_add_rms_norm_takes_the_kernel_without_gradients_and_autograd_with(monkeypatch):
    """The kernel has no backward: ops sends a call that needs gradients to the add and rms_norm (whose backward
    training uses), and the gradients are the reference's."""
    from w2s import ops

    monkeypatch.setattr(ops, "_backend", "triton")
    calls = []
    real = rms_norm.add_rms_norm
    monkeypatch.setattr(rms_norm, "add_rms_norm", lambda *a: calls.append(1) or real(*a))
    x, residual, w = torch.randn(5, 48), torch.randn(5, 48), torch.randn(48) + 1
    with torch.no_grad():
        y, summed = ops.add_rms_norm(x, residual, w, 1e-6)
    assert calls == [1] and torch.equal(summed, residual + x)
    got = run_with_grads(lambda x, r, w: sum(ops.add_rms_norm(x, r, w, 1e-6)), [x, residual, w])
    ref = run_with_grads(lambda x, r, w: reference.rms_norm(r + x, w, 1e-6) + (r + x), [x, residual, w])
    assert calls == [1]
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, **FP32_TOL)


# --------------------------------------------------------------------------------------------------------- rope

def _inv_freq(D, base=10000.0):
    return 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float32) / D)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,T,H,D", [(2, 5, 3, 48), (1, 3, 5, 80)])
def test_rope_matches_reference_at_arbitrary_positions(dtype, B, T, H, D):
    x = torch.randn(B, T, H, D)
    positions = torch.randint(0, 9000, (B, T))  # non-monotonic, large: sampler slots at any position
    inv_freq = _inv_freq(D)
    check_against_reference(lambda x: rope.rope(x, positions, inv_freq),
                            lambda x: reference.rope(x, positions, inv_freq), [x], dtype, ["y", "dx"])


def test_rope_strided_input_and_expanded_positions():
    # q from a (B, H, T, D) layout viewed as (B, T, H, D); positions broadcast over the batch (stride 0)
    B, T, H, D = 2, 6, 4, 32
    x = torch.randn(B, H, T, D).transpose(1, 2)
    positions = torch.arange(10, 10 + T).expand(B, T)
    inv_freq = _inv_freq(D, base=500000.0)
    got = run_with_grads(lambda x: rope.rope(x, positions, inv_freq), [x])
    ref = run_with_grads(lambda x: reference.rope(x, positions, inv_freq), [x])
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, **FP32_TOL)


def test_rope_is_a_rotation():
    # independent of the reference: rotation preserves the norm of each (x1_i, x2_i) pair, and position 0 is identity
    x = torch.randn(1, 4, 2, 16)
    inv_freq = _inv_freq(16)
    y = rope.rope(x, torch.tensor([[0, 7, 3, 1000]]), inv_freq)
    torch.testing.assert_close(y[:, 0], x[:, 0])
    pair_norm = lambda t: t[..., :8] ** 2 + t[..., 8:] ** 2
    torch.testing.assert_close(pair_norm(y), pair_norm(x), **FP32_TOL)


# --------------------------------------------------------------------------------------- rope + KV-cache write


def _rope_cache_case(B, T, H, K, D, slots, S, dtype, fused_layout, rows):
    """Inputs of one sampler step: q, k, v (views of one fused projection when fused_layout), positions anywhere
    in the cache, rows (a permutation of slots, or None), and caches already holding other values."""
    if fused_layout:  # columns [q | k | v] of one (B, T, (H + 2K) D) matmul output: strided views
        qkv = torch.randn(B, T, (H + 2 * K) * D).to(dtype)
        q, k, v = (t.unflatten(-1, (-1, D)) for t in qkv.split([H * D, K * D, K * D], dim=-1))
    else:
        q, k, v = (torch.randn(B, T, n, D).to(dtype) for n in (H, K, K))
    positions = torch.stack([torch.randperm(S)[:T] for _ in range(B)])  # distinct within a row, any order
    row_ids = torch.randperm(slots)[:B] if rows else None
    k_cache, v_cache = torch.randn(slots, K, S, D).to(dtype), torch.randn(slots, K, S, D).to(dtype)
    return q, k, v, positions, row_ids, k_cache, v_cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,T,H,K,D,rows,fused_layout", [
    (3, 1, 8, 2, 64, False, True),  # a decode step: one token per slot, GQA, q/k/v from the fused projection
    (2, 5, 6, 3, 40, True, False),  # a prefill chunk into scattered cache rows; head dim 40: masked half-columns
    (1, 7, 5, 1, 80, True, True),  # MQA, odd head count
])
def test_rope_cache_write_matches_reference(dtype, B, T, H, K, D, rows, fused_layout):
    """The rotated q, and the whole k and v caches after the write (written entries and untouched ones), against
    the reference's rope + index_put on copies of the same caches. fp32 tight; fp16 as accurate as the fp16
    reference (both against fp32); v is a copy, so it must be exact in every dtype."""
    q, k, v, positions, row_ids, k_cache, v_cache = _rope_cache_case(B, T, H, K, D, 9, 23, dtype, fused_layout, rows)
    inv_freq = _inv_freq(D)
    kc, vc = k_cache.clone(), v_cache.clone()
    out = rope_cache.rope_cache_write(q, k, v, positions, inv_freq, kc, vc, row_ids)
    rkc, rvc = k_cache.clone(), v_cache.clone()
    ref = reference.rope_cache_write(q, k, v, positions, inv_freq, rkc, rvc, row_ids)
    assert out.shape == (B, T, H, D) and out.dtype == dtype
    assert torch.equal(vc, rvc)
    written = torch.zeros(k_cache.shape[0], K, k_cache.shape[2], dtype=torch.bool)
    written[(torch.arange(B) if row_ids is None else row_ids)[:, None], :, positions] = True
    assert torch.equal(kc[~written], k_cache[~written])  # nothing else in the cache moved
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, **FP32_TOL)
        torch.testing.assert_close(kc, rkc, **FP32_TOL)
        return
    hkc = k_cache.float()
    high = reference.rope_cache_write(q.float(), k.float(), v.float(), positions, inv_freq, hkc, v_cache.float(),
                                      row_ids)
    assert_as_accurate(out, ref, high, "q")
    assert_as_accurate(kc[written], rkc[written], hkc[written], "k cache")


def test_rope_cache_write_rotates_like_rope():
    """Independent of the reference's index_put: the cached k equals w2s/kernels/rope.py's rotation of k read back at
    (row, position), and positions 0 leave q unchanged."""
    B, T, H, K, D = 2, 3, 4, 2, 32
    q, k, v = torch.randn(B, T, H, D), torch.randn(B, T, K, D), torch.randn(B, T, K, D)
    positions = torch.tensor([[0, 5, 9], [0, 1, 2]])
    inv_freq = _inv_freq(D, base=500000.0)
    kc, vc = torch.zeros(4, K, 12, D), torch.zeros(4, K, 12, D)
    rows = torch.tensor([3, 1])
    out = rope_cache.rope_cache_write(q, k, v, positions, inv_freq, kc, vc, rows)
    torch.testing.assert_close(out[:, 0], q[:, 0])
    torch.testing.assert_close(out, rope.rope(q, positions, inv_freq), **FP32_TOL)
    got_k = kc[rows[:, None], :, positions]  # (B, T, K, D)
    torch.testing.assert_close(got_k, rope.rope(k, positions, inv_freq), **FP32_TOL)
    assert torch.equal(vc[rows[:, None], :, positions], v)


def test_rope_cache_write_rejects_mixed_dtypes_and_shapes():
    q, k = torch.randn(1, 2, 4, 16), torch.randn(1, 2, 2, 16)
    cache = torch.zeros(2, 2, 8, 16)
    positions, inv_freq = torch.zeros(1, 2, dtype=torch.long), _inv_freq(16)
    with pytest.raises(ValueError, match="one dtype"):
        rope_cache.rope_cache_write(q, k, k, positions, inv_freq, cache.half(), cache.half())
    with pytest.raises(ValueError, match="caches"):
        rope_cache.rope_cache_write(q, k, k, positions, inv_freq, torch.zeros(2, 3, 8, 16), torch.zeros(2, 3, 8, 16))


def test_one_dimensional_arguments_may_be_strided_views():
    """The (D,) norm weight, RoPE's (D/2,) frequencies and the sampler's (B,) uniforms are read by index in their
    kernels: every other entry of a longer tensor gives the results of its contiguous copy (the norm's weight
    gradient too)."""
    every_other = lambda t: torch.stack([t, torch.full_like(t, 7.0)], dim=1)[:, 0]  # noqa: E731  same values, stride 2
    x = torch.randn(5, 3, 24, device=DEVICE)
    weight = torch.rand(24, device=DEVICE) + 0.5
    results = []
    for w in (every_other(weight), weight.clone()):
        assert w.is_contiguous() == (len(results) == 1)
        w.requires_grad_(True)
        y = rms_norm.rms_norm(x, w, 1e-6)
        (dw,) = torch.autograd.grad(y, w, torch.ones_like(y))
        with torch.no_grad():
            results.append((y, dw, *rms_norm.add_rms_norm(x, x, w, 1e-6)))
    for strided, dense in zip(*results):
        assert torch.equal(strided, dense)
    q, positions = torch.randn(2, 3, 4, 16, device=DEVICE), torch.tensor([[0, 5, 9], [1, 2, 3]], device=DEVICE)
    inv_freq = _inv_freq(16).to(DEVICE)
    assert torch.equal(rope.rope(q, positions, every_other(inv_freq)), rope.rope(q, positions, inv_freq))
    logits, uniforms = torch.randn(6, 50, device=DEVICE), torch.rand(6, device=DEVICE)
    assert torch.equal(sample.sample_inverse_cdf(logits, every_other(uniforms)),
                       sample.sample_inverse_cdf(logits, uniforms))


def _rope_by_hand(x, positions, inv_freq):
    """Half-split RoPE written out in float64: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) at angle pos * f."""
    angle = positions.double()[:, :, None, None] * inv_freq.double()  # (B, T, 1, D/2)
    x1, x2 = x.double().chunk(2, dim=-1)
    return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()], dim=-1)


def test_rope_cache_write_reads_each_tensor_with_its_own_strides():
    """q with a non-unit stride along D, k a strided view, v contiguous, and a v cache that is a view of a longer
    buffer: every tensor must be read and written with its own strides (k's strides are not v's, the k cache's are
    not the v cache's). The row table and the frequencies are strided views too. Expected values: RoPE and the
    cache writes done by hand."""
    B, T, H, K, D, slots, S = 2, 3, 4, 2, 16, 3, 6
    q = torch.randn(B, T, D, H).transpose(-1, -2)  # (B, T, H, D), stride H along D
    k = torch.randn(B, T, K, 2 * D)[..., :D]  # head stride 2D
    v = torch.randn(B, T, K, D)  # head stride D
    positions = torch.tensor([[0, 4, 2], [5, 1, 3]])
    rows = torch.tensor([2, 1, 0, 1])[::2]  # (2, 0), every other entry
    inv_freq = torch.stack([_inv_freq(D), torch.zeros(D // 2)], dim=1)[:, 0]  # stride 2
    k_cache = torch.randn(slots, K, S, D)
    v_cache = torch.randn(slots, K, S + 3, D)[:, :, :S]  # row and head strides unlike the k cache's
    k_before, v_before = k_cache.clone(), v_cache.clone()
    out = rope_cache.rope_cache_write(q, k, v, positions, inv_freq, k_cache, v_cache, rows)
    torch.testing.assert_close(out, _rope_by_hand(q, positions, inv_freq).float(), **FP32_TOL)
    k_rot = _rope_by_hand(k, positions, inv_freq).float()
    k_expected, v_expected = k_before.clone(), v_before.clone()
    for b in range(B):
        for t in range(T):
            k_expected[rows[b], :, positions[b, t]] = k_rot[b, t]
            v_expected[rows[b], :, positions[b, t]] = v[b, t]
    torch.testing.assert_close(k_cache, k_expected, **FP32_TOL)
    assert torch.equal(v_cache, v_expected)


def test_rope_cache_write_rejects_each_malformed_argument():
    """Each check of the wrapper on its own, with everything else well formed (so the kernel would run and write
    somewhere wrong instead of failing)."""
    q, k = torch.randn(1, 2, 4, 16), torch.randn(1, 2, 2, 16)
    positions, inv_freq = torch.zeros(1, 2, dtype=torch.long), _inv_freq(16)

    def call(q=q, k=k, inv_freq=inv_freq, k_cache=None, v_cache=None, rows=None):
        k_cache = torch.zeros(2, k.shape[2], 8, 16) if k_cache is None else k_cache
        v_cache = torch.zeros(2, k.shape[2], 8, 16) if v_cache is None else v_cache
        rope_cache.rope_cache_write(q, k, k, positions, inv_freq, k_cache, v_cache, rows)

    with pytest.raises(ValueError, match="K \\| H"):  # 4 query heads cannot share 3 kv heads evenly
        call(k=torch.randn(1, 2, 3, 16))
    with pytest.raises(ValueError, match="inv_freq"):
        call(inv_freq=_inv_freq(18))
    with pytest.raises(ValueError, match="caches"):  # a v cache of another length than the k cache
        call(v_cache=torch.zeros(2, 2, 9, 16))
    with pytest.raises(ValueError, match="rows"):
        call(rows=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="contiguous in their last dim"):
        call(k_cache=torch.zeros(2, 2, 16, 8).transpose(-1, -2))


# ---------------------------------------------------------------------------------------------------------- glu

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", ["swiglu", "geglu"])
def test_glu_matches_reference(dtype, name):
    gate = torch.randn(3, 7, 80) * 4  # wide range: the tails of silu / tanh saturate
    up = torch.randn(3, 7, 80)
    check_against_reference(getattr(glu, name), getattr(reference, name), [gate, up], dtype, ["out", "dgate", "dup"])


@pytest.mark.parametrize("lead", [(5,), (2, 3)])
def test_glu_non_contiguous_halves_of_a_fused_projection(lead):
    gate_up = torch.randn(*lead, 2 * 33)
    gate, up = gate_up[..., :33], gate_up[..., 33:]  # views with row stride 66, read in place by the row kernel
    got = run_with_grads(glu.geglu, [gate, up])
    ref = run_with_grads(reference.geglu, [gate, up])
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, **FP32_TOL)
    with torch.no_grad():
        torch.testing.assert_close(glu.swiglu(gate, up), reference.swiglu(gate, up), **FP32_TOL)


def test_geglu_hand_values():
    # gelu_tanh(1) = 0.5 * (1 + tanh(sqrt(2/pi) * 1.044715)) = 0.8411919906
    out = glu.geglu(torch.tensor([1.0, 0.0, -30.0]), torch.tensor([2.0, 5.0, 1.0]))
    torch.testing.assert_close(out, torch.tensor([2 * 0.8411919906, 0.0, 0.0]), atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------------- fused linear

# Both row steps of the chunk loop (w2s/kernels/chunked_linear.py): the Triton kernel (GPU) and the torch one (CPU
# path).
LINEAR_IMPLS = pytest.mark.parametrize("impl", [fused_linear, chunked_linear], ids=["triton", "torch"])


@pytest.fixture
def small_chunks(monkeypatch):
    """Tiny shapes still take the multi-chunk, multi-block paths: 8-row chunks, 64-column vocabulary blocks."""
    monkeypatch.setattr(fused_linear, "MAX_BLOCK_V", 64)

    def set_rows(rows, V, elem):
        monkeypatch.setattr(fused_linear, "CHUNK_BYTES", rows * V * elem)
        monkeypatch.setattr(chunked_linear, "CPU_CHUNK_BYTES", rows * V * elem)
        monkeypatch.setattr(chunked_linear, "MIN_CHUNK_ROWS", 1)

    return set_rows


def _fused_inputs(N=37, D=48, V=131, ignore_index=-100, logit_scale=1.0):
    hidden = torch.randn(N, D)
    weight = torch.randn(V, D) * (logit_scale / math.sqrt(D))
    targets = torch.randint(0, V, (N,))
    targets[torch.randperm(N)[: N // 4]] = ignore_index  # prompt / padding tokens
    return hidden, weight, targets


@LINEAR_IMPLS
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_linear_cross_entropy_matches_reference(impl, small_chunks, dtype, softcap):
    hidden, weight, targets = _fused_inputs(logit_scale=8.0)  # logits of +-10s: the soft-cap bends them hard
    small_chunks(8, weight.shape[0], torch.finfo(dtype).bits // 8)

    def loss(fn):
        # upstream grad 0.37: checks that the precomputed gradients are scaled in the backward
        return lambda h, w: fn(h, w, targets, softcap=softcap)[0] * 0.37

    check_against_reference(loss(impl.linear_cross_entropy), loss(reference.linear_cross_entropy),
                            [hidden, weight], dtype, ["loss", "dhidden", "dweight"])
    n_valid = impl.linear_cross_entropy(hidden.to(dtype), weight.to(dtype), targets, softcap)[1]
    assert n_valid.dtype == torch.int64 and n_valid.item() == (targets != -100).sum().item()


@LINEAR_IMPLS
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_linear_logprobs_matches_reference_under_any_upstream_gradient(impl, small_chunks, dtype, softcap):
    hidden, weight, targets = _fused_inputs(N=29, V=131, ignore_index=7, logit_scale=8.0)  # a real id as ignore
    small_chunks(8, weight.shape[0], torch.finfo(dtype).bits // 8)

    def dpo_like(fn):
        # a nonlinear function of per-sequence sums, like DPO: every token gets a different upstream gradient
        def f(h, w):
            logp = fn(h, w, targets, softcap=softcap, ignore_index=7)
            seq = torch.stack([logp[:10].sum(), logp[10:20].sum(), logp[20:].sum()])
            return torch.cat([logp, torch.nn.functional.logsigmoid(seq[:1] - seq[1:2]) + seq[2:] ** 2 * 0.01])
        return f

    check_against_reference(dpo_like(impl.linear_logprobs), dpo_like(reference.linear_logprobs),
                            [hidden, weight], dtype, ["logprobs", "dhidden", "dweight"])
    logp = impl.linear_logprobs(hidden, weight, targets, softcap=softcap, ignore_index=7)
    assert logp.dtype == torch.float32 and (logp[targets == 7] == 0).all() and (logp[targets != 7] < 0).all()


@LINEAR_IMPLS
def test_fused_linear_frozen_weight_and_no_grad(impl, small_chunks):
    hidden, weight, targets = _fused_inputs(N=20, V=70)
    small_chunks(6, 70, 4)
    h = hidden.clone().requires_grad_()
    loss, _ = impl.linear_cross_entropy(h, weight, targets)  # frozen lm_head: only d hidden
    loss.backward()
    h_ref = hidden.clone().requires_grad_()
    reference.linear_cross_entropy(h_ref, weight, targets)[0].backward()
    torch.testing.assert_close(h.grad, h_ref.grad, **FP32_TOL)
    with torch.no_grad():
        torch.testing.assert_close(impl.linear_logprobs(h, weight, targets),
                                   reference.linear_logprobs(hidden, weight, targets), **FP32_TOL)
        torch.testing.assert_close(impl.linear_cross_entropy(h, weight, targets)[0], loss.detach(),
                                   **FP32_TOL)


@LINEAR_IMPLS
def test_fused_linear_all_ignored_and_hand_value(impl):
    hidden, weight = torch.randn(4, 8), torch.randn(5, 8)
    targets = torch.full((4,), -100)
    loss, n_valid = impl.linear_cross_entropy(hidden, weight, targets)
    assert loss.item() == 0.0 and n_valid.item() == 0
    # zero weight: uniform softmax over V=5, so every valid token costs log(5)
    loss, n_valid = impl.linear_cross_entropy(hidden, torch.zeros(5, 8), torch.tensor([0, 4, -100, 2]))
    assert n_valid.item() == 3
    torch.testing.assert_close(loss, torch.tensor(3 * math.log(5.0)))
    # no tokens at all (an empty micro-batch): zero loss, zero gradients, like the reference
    hidden, weight = torch.randn(0, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True)
    loss, n_valid = impl.linear_cross_entropy(hidden, weight, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and n_valid.item() == 0 and hidden.grad.shape == (0, 8) and (weight.grad == 0).all()


@LINEAR_IMPLS
def test_fused_linear_rejects_bad_shapes(impl):
    with pytest.raises(ValueError, match="hidden"):
        impl.linear_cross_entropy(torch.randn(2, 3, 8), torch.randn(5, 8), torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        impl.linear_logprobs(torch.randn(6, 8), torch.randn(5, 8), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="dtype"):  # named, not a matmul error deep in the chunk loop
        impl.linear_cross_entropy(torch.randn(6, 8), torch.randn(5, 8).half(), torch.zeros(6, dtype=torch.long))


@LINEAR_IMPLS
def test_fused_linear_target_zero_and_a_real_id_as_ignore_index_match_cross_entropy(impl):
    """Token id 0 is a real target (not the ignored rows' placeholder column), and with ignore_index = 7 the count
    of valid tokens is the targets != 7, also without gradients. Reference: F.cross_entropy on the full logits."""
    hidden, weight = torch.randn(6, 8), torch.randn(5, 8)
    targets = torch.tensor([0, 7, 0, 3, 0, 4])
    weight = torch.cat([weight, torch.randn(3, 8)])  # V = 8: id 7 exists
    expected = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, ignore_index=7, reduction="sum")
    with torch.no_grad():
        loss, n_valid = impl.linear_cross_entropy(hidden, weight, targets, ignore_index=7)
    torch.testing.assert_close(loss, expected, **FP32_TOL)
    assert n_valid.item() == 5
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, n_valid = impl.linear_cross_entropy(h, w, targets, ignore_index=7)
    loss.backward()
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    torch.nn.functional.cross_entropy(h_ref @ w_ref.t(), targets, ignore_index=7, reduction="sum").backward()
    assert n_valid.item() == 5
    torch.testing.assert_close(loss.detach(), expected, **FP32_TOL)
    torch.testing.assert_close(h.grad, h_ref.grad, **FP32_TOL)
    torch.testing.assert_close(w.grad, w_ref.grad, **FP32_TOL)


@LINEAR_IMPLS
def test_fused_linear_logprobs_of_ignored_tokens_are_plus_zero_and_a_second_backward_is_refused(impl):
    """Ignored tokens' log-probs are +0.0 under autograd too, like the reference's (a -0.0 would flip the sign of
    anything divided by them); and a second backward through one cross-entropy loss, whose saved gradients were
    already scaled in place, is an error rather than a silently wrong gradient."""
    hidden, weight = torch.randn(4, 8, requires_grad=True), torch.randn(5, 8)
    logp = impl.linear_logprobs(hidden, weight, torch.tensor([1, -100, 3, -100]))
    assert logp.requires_grad and (logp[[1, 3]] == 0).all() and not torch.signbit(logp[[1, 3]]).any()
    loss, _ = impl.linear_cross_entropy(hidden, weight, torch.tensor([1, 2, 3, 4]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


@LINEAR_IMPLS
def test_fused_linear_logprobs_backward_with_a_frozen_weight_gives_the_hidden_gradient(impl):
    """DPO with a frozen lm_head: the backward's recompute must produce d hidden (input 0), not d weight (input 1).
    Reference: autograd through log_softmax(h @ w.T) gathered at the targets."""
    hidden, weight, targets = torch.randn(5, 8), torch.randn(6, 8), torch.tensor([0, 5, -100, 2, 3])
    upstream = torch.randn(5)
    h = hidden.clone().requires_grad_()
    impl.linear_logprobs(h, weight, targets).backward(upstream)
    h_ref = hidden.clone().requires_grad_()
    logp = torch.log_softmax(h_ref @ weight.t(), dim=-1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    (torch.where(targets != -100, logp, 0.0) * upstream).sum().backward()
    assert h.grad is not None
    torch.testing.assert_close(h.grad, h_ref.grad, **FP32_TOL)


@pytest.mark.parametrize("rows_nll", [fused_linear.rows_nll_triton, chunked_linear.rows_nll_torch],
                         ids=["triton", "torch"])
def test_row_step_reads_and_writes_logits_rows_a_row_stride_apart(rows_nll):
    """The row step on a view of a wider buffer (row stride V + 3): the nll is cross_entropy's, the gradient
    row_scale * (softmax - onehot) lands in the view and the padding columns are untouched."""
    V = 11
    buffer = torch.randn(4, V + 3) * 3
    logits = buffer[:, :V]
    raw, padding = logits.clone(), buffer[:, V:].clone()
    targets, row_scale = torch.tensor([0, 10, -100, 5]), torch.tensor([0.5, -2.0, 3.0, 1.0])
    nll = rows_nll(logits, targets, None, -100, row_scale, True)
    expected = torch.nn.functional.cross_entropy(raw, targets, reduction="none")
    torch.testing.assert_close(nll, expected, **FP32_TOL)
    onehot = torch.nn.functional.one_hot(targets.clamp(min=0), V).float()
    grad = (torch.softmax(raw, dim=-1) - onehot) * row_scale[:, None]
    grad[2] = 0.0  # the ignored row
    torch.testing.assert_close(logits, grad, **FP32_TOL)
    assert torch.equal(buffer[:, V:], padding)


def inverse_cdf_interval(logits, uniforms, temperature):
    """Per row, the float64 cumulative probabilities just before and at each token, and the target u: a draw t is
    right when before[t] <= target < at[t]."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    at = probs.cumsum(dim=-1)
    return at - probs, at, uniforms.double()[:, None] * at[:, -1:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("V, temperature", [(50, 1.0), (5000, 0.7)])  # 5000: two loop steps of 4096, a masked tail
def test_sampling_kernel_draws_the_inverse_cdf_token(dtype, V, temperature):
    """Every draw's cumulative-probability interval (float64) holds its target u x total, up to fp32 rounding, and
    the draw is the reference's; rows of the logits a row stride apart (a view of a wider buffer)."""
    B = 64
    logits = (torch.randn(B, V + 3) * 3)[:, :V].to(dtype)
    uniforms = torch.rand(B)
    tokens = sample.sample_inverse_cdf(logits, uniforms, temperature)
    before, at, target = inverse_cdf_interval(logits, uniforms, temperature)
    rows = torch.arange(B)
    slack = 1e-5 * at[:, -1]
    assert (before[rows, tokens] <= target[:, 0] + slack).all() and (target[:, 0] < at[rows, tokens] + slack).all()
    assert torch.equal(tokens, reference.sample_inverse_cdf(logits, uniforms, temperature))


def test_sampling_kernel_over_many_blocks_of_a_transposed_row_whose_first_blocks_are_masked(monkeypatch):
    """16-column blocks make tiny rows take the multi-block paths: the running cumulative sum carried over four
    and more blocks, a row whose first blocks are all -inf (the online max is still -inf there, which must not turn
    the normalizer into NaN), and logits with a non-unit stride along V (a transposed buffer, copied first). Each
    draw must sit in its float64 inverse-CDF interval."""
    monkeypatch.setattr(sample, "BLOCK_V", 16)
    B, V = 12, 70  # five blocks, the last one masked
    logits = (torch.randn(V, B) * 3).t()
    logits[0, :40] = float("-inf")
    uniforms = torch.rand(B)
    uniforms[1:4] = torch.tensor([0.9, 0.97, 0.999])  # targets deep in the later blocks
    tokens = sample.sample_inverse_cdf(logits, uniforms, 0.8)
    before, at, target = inverse_cdf_interval(logits, uniforms, 0.8)
    rows = torch.arange(B)
    slack = 1e-5 * at[:, -1]
    assert (before[rows, tokens] <= target[:, 0] + slack).all() and (target[:, 0] < at[rows, tokens] + slack).all()
    assert tokens[0] >= 40


def test_sampling_kernel_never_draws_a_token_of_probability_zero():
    """Logits of -inf (masked tokens: top-k / top-p, or a vocabulary padding) are never drawn: not for u = 0, not
    for u just below 1, and not when the target is the whole row's sum (u = 1: what rounding can make of a u just
    below 1), where no cumulative sum exceeds it and the draw falls back to the last token of positive probability."""
    V = 300
    logits = torch.randn(7, V)
    logits[:, ::2] = float("-inf")
    logits[:, -1] = float("-inf")  # the last token masked: the clamp of a search past the end would land there
    logits[5, :-40] = float("-inf")  # a row whose mass sits at its end
    logits[6, :] = float("-inf")
    logits[6, 101] = 0.0  # one token of probability 1: its cumulative sum is exactly the total
    uniforms = torch.tensor([0.0, 1 - 2 ** -24, 0.5, 1 - 2 ** -24, 0.25, 1 - 2 ** -24, 1.0])
    for fn in (sample.sample_inverse_cdf, reference.sample_inverse_cdf):
        tokens = fn(logits, uniforms, 1.0)
        assert torch.isfinite(logits[torch.arange(7), tokens]).all(), fn
        assert tokens[0] == 1 and tokens[6] == 101, fn  # u = 0: the first token of positive probability


def test_sampler_draws_through_the_kernel_on_the_triton_path(monkeypatch):
    """sample_from_logits sends plain, top-k and top-p draws to ops.sample_inverse_cdf: the same tokens on the
    Triton path (the kernel) as on the reference path, each of them inside the kept set."""
    from w2s import ops
    from w2s.sampling_draw import sample_from_logits

    logits, uniforms = torch.randn(32, 200) * 2, torch.rand(32)
    for options in (dict(temperature=0.8), dict(temperature=1.0, top_k=20), dict(temperature=1.2, top_p=0.7)):
        drawn = {}
        for backend in ("reference", "triton"):
            monkeypatch.setattr(ops, "_backend", backend)
            drawn[backend] = sample_from_logits(logits, uniforms, **options)
        assert torch.equal(drawn["triton"], drawn["reference"]), options
        if "top_k" in options:
            assert (logits.gather(-1, drawn["triton"][:, None]) >= logits.topk(20).values[:, -1:]).all()


def _lowbias32(x):
    """lowbias32 on a Python int, wrapping like C's uint32_t: the hash written out independently of both sides."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@pytest.mark.parametrize("step_dtype", [torch.int64, torch.float32])
@pytest.mark.parametrize("B", [1, 1500])  # 1500: two programs, the second one partly outside
def test_uniforms_kernel_is_the_reference_bit_for_bit(B, step_dtype):
    """The step's uniforms in one launch: the same fp32 bits as reference.stream_uniforms for keys over the whole
    32-bit range (the top bit set too: unsigned products and shifts) and counters held as integers or as floats;
    the reference's hash is the mixer written out on Python ints."""
    keys = torch.randint(0, 2 ** 32, (B,), dtype=torch.int64)
    keys[0] = 2 ** 32 - 1
    steps = torch.randint(0, 5000, (B,)).to(step_dtype)
    expected = reference.stream_uniforms(keys, steps)
    assert torch.equal(sample.stream_uniforms(keys, steps), expected)
    for key, step, u in list(zip(keys.tolist(), steps.long().tolist(), expected.tolist()))[:50]:
        h = _lowbias32(key ^ _lowbias32((step * 0x27D4EB2F + 0x165667B1) & 0xFFFFFFFF))
        assert u == (h >> 8) / 2 ** 24


def test_ops_switch_routes_to_triton(monkeypatch):
    from w2s import ops

    monkeypatch.setattr(ops, "_backend", "triton")
    x, w = torch.randn(3, 16), torch.randn(16)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6), **FP32_TOL)
    torch.testing.assert_close(ops.swiglu(x, x.flip(0)), reference.swiglu(x, x.flip(0)), **FP32_TOL)


@pytest.mark.skipif(DEVICE == "cuda", reason="the CPU routing of the fused linear losses")
def test_ops_cpu_auto_routes_linear_losses_to_the_chunk_loop(monkeypatch):
    from w2s import ops

    calls = []
    real = chunked_linear.nll_and_grads
    monkeypatch.setattr(chunked_linear, "nll_and_grads", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    hidden, weight, targets = _fused_inputs()
    for backend, expected_calls in (("auto", 2), ("reference", 0)):
        monkeypatch.setattr(ops, "_backend", backend)
        calls.clear()
        loss, _ = ops.linear_cross_entropy(hidden, weight, targets)
        logp = ops.linear_logprobs(hidden, weight, targets)
        assert len(calls) == expected_calls, backend
        torch.testing.assert_close(loss, reference.linear_cross_entropy(hidden, weight, targets)[0], **FP32_TOL)
        torch.testing.assert_close(logp, reference.linear_logprobs(hidden, weight, targets), **FP32_TOL)

# ------------------------------------------------------------------------------------------------- GPU, bf16


@pytest.mark.gpu
@requires_cuda
def test_gpu_sample_bf16():
    """A 512-slot decode step's bf16 logits (Llama-3 vocabulary): every draw's float64 interval holds its target, up
    to the reference's own fp32 rounding over 128k probabilities, and nearly every draw is the reference's."""
    B, V = 512, 128256
    logits, uniforms = (torch.randn(B, V) * 4).bfloat16(), torch.rand(B)
    tokens = sample.sample_inverse_cdf(logits, uniforms, 1.0)
    before, at, target = inverse_cdf_interval(logits, uniforms, 1.0)
    rows, slack = torch.arange(B), 1e-4 * at[:, -1]
    assert (before[rows, tokens] <= target[:, 0] + slack).all() and (target[:, 0] < at[rows, tokens] + slack).all()
    assert (tokens == reference.sample_inverse_cdf(logits, uniforms, 1.0)).float().mean() >= 0.99


def _gpu_check(kernel_fn, reference_fn, inputs, names):
    """bf16 on CUDA at realistic shapes: as accurate as the bf16 reference, both against the fp32 reference."""
    torch.cuda.empty_cache()
    check_against_reference(kernel_fn, reference_fn, inputs, torch.bfloat16, names)


@pytest.mark.parametrize("unit_offset", [False, True])
@pytest.mark.parametrize("D", [4096, 2304])  # Llama-3-8B; Gemma-2-2B (not a power of two: a masked row tail)
@pytest.mark.gpu
@requires_cuda
def test_gpu_rms_norm_bf16(unit_offset, D):
    x = torch.randn(4096, D, device="cuda")
    w = torch.rand(D, device="cuda") + 0.5
    _gpu_check(lambda x, w: rms_norm.rms_norm(x, w, 1e-5, unit_offset),
               lambda x, w: reference.rms_norm(x, w, 1e-5, unit_offset), [x, w], ["y", "dx", "dweight"])


@pytest.mark.parametrize("D", [64, 128, 256])  # the head dims of the supported families
@pytest.mark.gpu
@requires_cuda
def test_gpu_rope_bf16(D):
    B, T, H = 2, 4096, 32
    x = torch.randn(B, T, H, D, device="cuda")
    positions = torch.randint(0, 131072, (B, T), device="cuda")
    inv_freq = _inv_freq(D, 500000.0).cuda()
    _gpu_check(lambda x: rope.rope(x, positions, inv_freq), lambda x: reference.rope(x, positions, inv_freq), [x],
               ["y", "dx"])


@pytest.mark.parametrize("D,H,K", [(128, 32, 8), (256, 8, 1)])  # Llama-3-8B; Gemma-2B (MQA, head dim 256)
@pytest.mark.gpu
@requires_cuda
def test_gpu_rope_cache_write_bf16(D, H, K):
    """A 512-slot decode step into a 512-position cache and a 2 x 1000-token prefill into rows of a 4096-position
    cache, in bf16."""
    torch.cuda.empty_cache()
    inv_freq = _inv_freq(D, 500000.0).cuda()
    for B, T, slots, S, rows in ((512, 1, 512, 512, False), (2, 1000, 8, 4096, True)):
        q, k, v, positions, row_ids, k_cache, v_cache = _rope_cache_case(B, T, H, K, D, slots, S, torch.bfloat16,
                                                                         True, rows)
        kc, vc = k_cache.clone(), v_cache.clone()
        out = rope_cache.rope_cache_write(q, k, v, positions, inv_freq, kc, vc, row_ids)
        rkc, rvc = k_cache.clone(), v_cache.clone()
        ref = reference.rope_cache_write(q, k, v, positions, inv_freq, rkc, rvc, row_ids)
        hkc = k_cache.float()
        high = reference.rope_cache_write(q.float(), k.float(), v.float(), positions, inv_freq, hkc,
                                          v_cache.float(), row_ids)
        assert torch.equal(vc, rvc)
        assert_as_accurate(out, ref, high, "q")
        assert_as_accurate(kc, rkc, hkc, "k cache")


@pytest.mark.parametrize("name", ["swiglu", "geglu"])
@pytest.mark.gpu
@requires_cuda
def test_gpu_glu_bf16(name):
    gate, up = torch.randn(2, 4096, 14336, device="cuda") * 3, torch.randn(2, 4096, 14336, device="cuda")
    _gpu_check(getattr(glu, name), getattr(reference, name), [gate, up], ["out", "dgate", "dup"])


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.gpu
@requires_cuda
def test_gpu_linear_cross_entropy_bf16(softcap):
    N, D, V = 4096, 2048, 128256
    hidden = torch.randn(N, D, device="cuda")
    weight = torch.randn(V, D, device="cuda") * (4.0 / math.sqrt(D))
    targets = torch.randint(0, V, (N,), device="cuda")
    targets[::5] = -100
    _gpu_check(lambda h, w: fused_linear.linear_cross_entropy(h, w, targets, softcap)[0],
               lambda h, w: reference.linear_cross_entropy(h, w, targets, softcap)[0], [hidden, weight],
               ["loss", "dhidden", "dweight"])


@pytest.mark.gpu
@requires_cuda
def test_gpu_linear_logprobs_bf16():
    N, D, V = 4096, 2048, 128256
    hidden = torch.randn(N, D, device="cuda")
    weight = torch.randn(V, D, device="cuda") * (4.0 / math.sqrt(D))
    targets = torch.randint(0, V, (N,), device="cuda")
    targets[::7] = -100
    _gpu_check(lambda h, w: fused_linear.linear_logprobs(h, w, targets),
               lambda h, w: reference.linear_logprobs(h, w, targets), [hidden, weight],
               ["logprobs", "dhidden", "dweight"])


# ------------------------------------------------------------------------------------------- w2s/kernels/bench.py


@pytest.mark.skipif(DEVICE == "cuda", reason="checks the message printed when there is no GPU")
def test_bench_without_cuda_says_it_needs_one(capsys):
    from w2s.kernels import bench

    assert bench.main(["--no-smoke"]) == 0
    out = capsys.readouterr().out
    assert "needs a CUDA GPU" in out and "no timings measured" in out


def test_bench_rejects_an_unknown_kernel_in_one_line(capsys):
    from w2s.kernels import bench

    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "attention,flash"])
    assert "--only: unknown kernel(s) flash" in capsys.readouterr().err.strip().splitlines()[-1]


def test_bench_times_flash_attention_when_installed(monkeypatch):
    """The attention benchmark adds FlashAttention's own kernel beside SDPA's when the package is importable: FA3's
    Hopper module first (its tuple output reduced to the attention output), else FA2's; without either, nothing."""
    import sys
    import types

    from w2s.kernels import bench

    for name in ("flash_attn_interface", "flash_attn"):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: the import raises ImportError
    assert bench.flash_attention_impl() is None
    calls = []
    fa2 = types.SimpleNamespace(flash_attn_func=lambda q, k, v, causal: calls.append(("fa2", causal)) or q + k + v)
    monkeypatch.setitem(sys.modules, "flash_attn", fa2)
    name, run = bench.flash_attention_impl()
    assert name == "fa2" and run(1, 2, 3, False) == 6 and calls == [("fa2", False)]
    fa3 = types.SimpleNamespace(flash_attn_func=lambda q, k, v, causal: (q * k * v, "lse"))
    monkeypatch.setitem(sys.modules, "flash_attn_interface", fa3)
    name, run = bench.flash_attention_impl()
    assert name == "fa3" and run(2, 3, 4, True) == 24


def compile_check_for_sm90(tmp_path, parts, *options):
    """`python -m w2s.kernels.compile_check --only parts --dtype bf16 [options]` in a process of its own (it replaces
    Triton's driver), compiling for real rather than from an earlier run's cache; its stdout, after asserting exit
    status 0."""
    import subprocess
    import sys
    from pathlib import Path

    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia").is_dir():
        pytest.skip("this Triton has no NVIDIA backend to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    command = [sys.executable, "-m", "w2s.kernels.compile_check", "--only", parts, "--dtype", "bf16", *options]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_norm_rope_glu_and_loss_kernels_compile_for_an_h100_without_a_gpu(tmp_path):
    """The kernels compiled for sm_90a (what the interpreter never does: real shared memory, register allocation),
    at the launch configs the GPU picks for real hidden sizes and vocabularies: every variant compiles and fits an
    H100 block's shared memory. The attention kernels take longer to compile: `make check-sm90` covers them."""
    stdout = compile_check_for_sm90(tmp_path / "workers", "elementwise,fused_linear", "--compile-workers", "3")
    assert "every variant compiled within the H100's shared memory" in stdout
    assert "compile check: compiled by 3 processes" in stdout
    assert stdout.count("_rms_norm_bwd_kernel") == 8 and stdout.count("_rows_nll_kernel") == 12
    # three compile workers sharing the launches out hand back the table one process prints, row for row
    alone = compile_check_for_sm90(tmp_path / "alone", "elementwise,fused_linear", "--compile-workers", "1")
    assert "compiled by" not in alone
    assert [line for line in stdout.splitlines() if line.startswith("_")] == \
        [line for line in alone.splitlines() if line.startswith("_")]


# ------------------------------------------------------------------------------------- the ops switch's errors


def test_an_unknown_backend_is_refused_by_name_from_python_and_from_the_environment(monkeypatch):
    import runpy

    from w2s import ops

    monkeypatch.setattr(ops, "_backend", "auto")
    with pytest.raises(ValueError, match=r"^kernel backend 'cuda': expected one of auto, triton, reference$"):
        ops.set_backend("cuda")
    assert ops.get_backend() == "auto"
    ops.set_backend("reference")
    assert ops.get_backend() == "reference"
    monkeypatch.setenv("W2S_KERNELS", "fast")  # read once, when the module is imported: run its code afresh
    with pytest.raises(ValueError, match=r"^W2S_KERNELS='fast': expected one of auto, triton, reference$"):
        runpy.run_path(ops.__file__)


def test_triton_on_a_cpu_tensor_needs_the_interpreter(monkeypatch):
    """No silent fallback: W2S_KERNELS=triton with a CPU tensor and no TRITON_INTERPRET=1 is an error."""
    from w2s import ops

    monkeypatch.setattr(ops, "_backend", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(2, 8, device="cpu")
    with pytest.raises(RuntimeError, match=r"W2S_KERNELS=triton on a CPU tensor needs TRITON_INTERPRET=1"):
        ops.rms_norm(x, torch.ones(8, device="cpu"), 1e-6)


def test_the_reference_backend_never_loads_a_triton_kernel(monkeypatch):
    """W2S_KERNELS=reference runs the PyTorch reference even where Triton could run (here: the interpreter is on)."""
    from w2s import ops

    def no_kernel(name):
        raise AssertionError(f"Triton kernel {name} loaded under the reference backend")

    monkeypatch.setattr(ops, "_backend", "reference")
    monkeypatch.setattr(ops, "_kernel", no_kernel)
    x, w = torch.randn(3, 8), torch.randn(8)
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), expected, **FP32_TOL)
    torch.testing.assert_close(ops.swiglu(x, w.expand(3, 8)), torch.nn.functional.silu(x) * w, **FP32_TOL)


def test_a_missing_triton_kernel_is_one_error_that_names_it_and_the_way_out(monkeypatch):
    import importlib

    from w2s import ops

    def missing(name):
        raise ImportError("No module named 'triton'")

    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(RuntimeError, match=r"^Triton kernel w2s/kernels/rope\.py is unavailable \(No module named "
                                           r"'triton'\); set W2S_KERNELS=reference to run the PyTorch reference"):
        ops._kernel("rope")


def test_wants_grad_needs_the_grad_mode_and_any_one_tensor_that_requires_grad():
    from w2s import ops

    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2)
    assert ops.wants_grad(b, a) and ops.wants_grad(a, b) and not ops.wants_grad(b, b)
    with torch.no_grad():
        assert not ops.wants_grad(a, b)


@pytest.mark.skipif(DEVICE == "cuda", reason="the CPU path of ops.attention's kv_rows")
def test_ops_attention_with_kv_rows_and_no_positions_on_cpu(monkeypatch):
    """kv_rows without q_positions (T == S == 1: each query sees its cache row's one key): the output is that key's
    value, per query head that of its kv head."""
    from w2s import ops

    monkeypatch.setattr(ops, "_backend", "auto")
    H, K, D = 4, 2, 8
    q, k, v = torch.randn(3, 1, H, D), torch.randn(2, 1, K, D), torch.randn(2, 1, K, D)
    kv_rows = torch.tensor([1, 0, 1])
    with torch.no_grad():
        out = ops.attention(q, k, v, kv_rows=kv_rows)
    expected = v[kv_rows].repeat_interleave(H // K, dim=2)  # (3, 1, H, D): query head h reads kv head h // (H / K)
    torch.testing.assert_close(out, expected, **FP32_TOL)


@pytest.mark.skipif(DEVICE == "cuda", reason="the CPU path of ops.attention's kv_rows")
def test_ops_attention_with_kv_rows_respects_kv_lengths_on_cpu(monkeypatch):
    """One-token queries over cache rows with kv_lengths shorter than their positions allow: each query attends the
    keys s <= its position and s < its row's length only (softmax written out by hand)."""
    from w2s import ops

    monkeypatch.setattr(ops, "_backend", "auto")
    H, K, S, D = 4, 2, 10, 8
    q, k, v = torch.randn(3, 1, H, D), torch.randn(2, S, K, D), torch.randn(2, S, K, D)
    kv_rows, positions, kv_lengths = torch.tensor([0, 1, 1]), torch.tensor([[9], [9], [4]]), torch.tensor([3, 6, 8])
    with torch.no_grad():
        out = ops.attention(q, k, v, q_positions=positions, kv_lengths=kv_lengths, kv_rows=kv_rows)
    keys = k[kv_rows].repeat_interleave(H // K, dim=2)  # (3, S, H, D)
    values = v[kv_rows].repeat_interleave(H // K, dim=2)
    scores = torch.einsum("bhd,bshd->bhs", q[:, 0], keys) / math.sqrt(D)
    s = torch.arange(S)
    visible = (s[None, :] <= positions) & (s[None, :] < kv_lengths[:, None])  # (3, S)
    weights = scores.masked_fill(~visible[:, None, :], float("-inf")).softmax(-1)
    torch.testing.assert_close(out[:, 0], torch.einsum("bhs,bshd->bhd", weights, values), **FP32_TOL)


def test_ops_sampling_defaults_to_temperature_one():
    """Without a temperature the draw is from softmax(logits) itself: probabilities 0.1, 0.2, 0.3, 0.4 give the
    CDF 0.1, 0.3, 0.6, 1.0, so these uniforms pick tokens 0, 1, 2, 3, 3 (temperature 0.5 would pick 2 for 0.25)."""
    from w2s import ops

    logits = torch.tensor([0.1, 0.2, 0.3, 0.4]).log().expand(5, 4).contiguous()
    uniforms = torch.tensor([0.05, 0.25, 0.35, 0.95, 0.65])
    assert ops.sample_inverse_cdf(logits, uniforms).tolist() == [0, 1, 2, 3, 3]
