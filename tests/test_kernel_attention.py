"""Triton flash attention (w2s/kernels/attention.py) and decode attention (w2s/kernels/decode_attention.py) against the
PyTorch spec (w2s/kernels/reference.py): forward and every gradient, GQA/MQA, ragged lengths, sliding window, soft-cap,
explicit positions, the split-key decode path and cascade decoding over a shared prefix.

Without CUDA the kernels run under TRITON_INTERPRET=1 on CPU (set below, before triton is imported); the shapes are
tiny and odd so that every block edge and loop segment is hit. GPU-marked tests use bf16 at realistic shapes.

    python -m pytest -q tests/test_kernel_attention.py
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from launches import LaunchCounter  # noqa: E402

from w2s import ops  # noqa: E402
from w2s.kernels import attention as flash  # noqa: E402
from w2s.kernels import attention_backward as flash_backward  # noqa: E402
from w2s.kernels import (
    attention_common,  # noqa: E402
    reference,  # noqa: E402
    sweep,  # noqa: E402
)
from w2s.kernels import decode_attention as decode  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOL = 1e-5  # max abs error relative to the tensor's largest entry; observed ~2e-7 in fp32
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def naive_low_precision(q, k, v, q_positions=None, kv_lengths=None, sliding_window=None, softcap=None, scale=None):
    """Textbook attention computed entirely in the inputs' dtype (no fp32 upcast): the error yardstick for fp16/bf16.

    As in FlashAttention's own tests, a half-precision kernel passes if its error against the fp32 reference is at
    most twice the error of this plain half-precision implementation.
    """
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    if q_positions is None:
        q_positions = torch.arange(T, device=q.device).expand(B, T)
    qh = q.transpose(1, 2)
    kh, vh = (x.transpose(1, 2).repeat_interleave(H // K, dim=1) for x in (k, v))
    scores = (qh @ kh.transpose(-1, -2)) * (D ** -0.5 if scale is None else scale)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    mask = reference.attention_mask(q_positions, S, kv_lengths, sliding_window)[:, None]
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
    return (probs @ vh).transpose(1, 2)


def random_qkv(B, T, S, H, K, D, dtype):
    seed = torch.seed()  # fresh inputs every run; the seed goes into failure messages
    q, k, v = (torch.randn(shape, device=DEVICE).to(dtype) for shape in ((B, T, H, D), (B, S, K, D), (B, S, K, D)))
    return seed, q, k, v


def output_and_grads(fn, inputs, dtype, grad_out):
    """fn's output and (dq, dk, dv) for fresh leaf copies of inputs cast to dtype."""
    leaves = [x.to(dtype).clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    out.backward(grad_out.to(dtype))
    return [out.detach()] + [x.grad for x in leaves]


def max_err(actual, expected):
    return (actual.float() - expected.float()).abs().max().item()


def check_fp32(actual, expected, seed):
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
        bound = FP32_TOL * max(1.0, e.abs().max().item())
        assert max_err(a, e) <= bound, f"{name}: max err {max_err(a, e):.2e} > {bound:.2e} (seed {seed})"


def check_low_precision(actual, low_precision, expected, seed):
    for name, a, lp, e in zip(("out", "dq", "dk", "dv"), actual, low_precision, expected):
        bound = 2 * max_err(lp, e) + 1e-5
        assert max_err(a, e) <= bound, f"{name}: max err {max_err(a, e):.2e} > 2 x naive {bound:.2e} (seed {seed})"


def lengths(*values):
    return torch.tensor(values, device=DEVICE)


def compare(B, T, S, H, K, D, dtype=torch.float32, q_positions=None, **options):
    """Forward + dq, dk, dv of the kernel vs the reference (fp32 maths on the same rounded inputs)."""
    seed, q, k, v = random_qkv(B, T, S, H, K, D, dtype)
    grad_out = torch.randn(B, T, H, D, device=DEVICE)
    expected = output_and_grads(lambda *x: reference.attention(*x, q_positions=q_positions, **options),
                                (q, k, v), torch.float32, grad_out)
    actual = output_and_grads(lambda *x: flash.attention(*x, q_positions=q_positions, **options), (q, k, v), dtype,
                              grad_out)
    assert actual[0].dtype == dtype
    if dtype == torch.float32:
        check_fp32(actual, expected, seed)
    else:
        low = output_and_grads(lambda *x: naive_low_precision(*x, q_positions=q_positions, **options), (q, k, v),
                               dtype, grad_out)
        check_low_precision(actual, low, expected, seed)


def check_output(out, q, k, v, seed, **args):
    """A forward-only result (decode) against the fp32 reference: FP32_TOL in fp32, the "twice naive" rule below."""
    expected = reference.attention(q.float(), k.float(), v.float(), **args)
    assert out.dtype == q.dtype
    if q.dtype == torch.float32:
        check_fp32([out], [expected], seed)
    else:
        check_low_precision([out], [naive_low_precision(q, k, v, **args)], [expected], seed)


# --- training path (forward + backward), fp32 ---------------------------------------------------------------------


@pytest.mark.parametrize("B, T, H, K, D, options", [
    (2, 33, 4, 2, 32, {}),  # GQA, T not a block multiple
    (1, 1, 2, 1, 16, {}),  # a single token
    (2, 7, 2, 2, 16, {"kv_lengths": (7, 4)}),  # right padding
    (2, 5, 2, 2, 16, {"kv_lengths": (5, 0)}),  # a row with no visible key: zeros, zero gradients
    (2, 33, 4, 1, 32, {"sliding_window": 5, "softcap": 5.0}),  # MQA, window much smaller than T, Gemma-2 cap
    (2, 40, 2, 1, 64, {"sliding_window": 9, "softcap": 3.0, "kv_lengths": (30, 40), "scale": 0.2}),
], ids=["gqa", "one-token", "padding", "empty-row", "mqa-window-softcap", "d64-everything"])
def test_forward_and_grads_fp32(B, T, H, K, D, options):
    if "kv_lengths" in options:
        options = {**options, "kv_lengths": lengths(*options["kv_lengths"])}
    compare(B, T, T, H, K, D, **options)


def test_explicit_positions_with_grads_fp32():
    # Queries continuing a cached prefix (S != T): the backward must handle arbitrary positions too.
    positions = torch.stack([torch.arange(13, 20), torch.arange(5, 12)]).to(DEVICE)
    compare(2, 7, 20, 4, 2, 16, q_positions=positions, kv_lengths=lengths(20, 12), sliding_window=6)


def test_explicit_positions_over_several_blocks_with_softcap_fp32():
    # Every query block and key block takes the HAS_POS paths (the backward visits all query blocks masked); rows at
    # different cache depths, T and S not block multiples, GQA, and the soft-cap derivative through positions.
    positions = torch.stack([torch.arange(13, 50), torch.arange(0, 37)]).to(DEVICE)
    compare(2, 37, 50, 4, 2, 16, q_positions=positions, kv_lengths=lengths(50, 37), softcap=4.0)


def test_full_attention_through_positions_matches_sdpa():
    # The contract is causal, but queries placed at the last key position see every key: non-causal attention (how
    # w2s/kernels/bench.py measures the non-causal case). Checked against torch's own SDPA with is_causal=False, an
    # implementation independent of w2s/kernels/reference.py, forward and all gradients.
    B, T, S, H, K, D = 2, 20, 37, 4, 2, 32
    seed, q, k, v = random_qkv(B, T, S, H, K, D, torch.float32)
    grad_out = torch.randn(B, T, H, D, device=DEVICE)
    last = torch.full((B, T), S - 1, device=DEVICE)

    def sdpa(q, k, v):
        k, v = (x.repeat_interleave(H // K, dim=2) for x in (k, v))  # GQA -> one kv head per query head
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                               v.transpose(1, 2), is_causal=False)
        return out.transpose(1, 2)

    expected = output_and_grads(sdpa, (q, k, v), torch.float32, grad_out)
    actual = output_and_grads(lambda *x: flash.attention(*x, q_positions=last), (q, k, v), torch.float32, grad_out)
    check_fp32(actual, expected, seed)


@pytest.mark.parametrize("D", [128, 256])
def test_large_head_dims_fp32(D):
    # The head dims of Llama/Mistral (128) and Gemma (256) through the interpreter, with padding and a window.
    compare(1, 19, 19, 2, 1, D, kv_lengths=lengths(15), sliding_window=8)


@pytest.mark.parametrize("D, options", [
    (64, {"sliding_window": 70, "kv_lengths": (97,)}),
    (128, {"sliding_window": 90, "softcap": 20.0, "kv_lengths": (131,)}),
    (256, {"softcap": 5.0, "kv_lengths": (150,)}),
], ids=["d64-window-padding", "d128-window-softcap-padding", "d256-softcap"])
def test_gpu_block_sizes_fp32(monkeypatch, D, options):
    # The GPU launch tables use other tiles than the interpreter's (e.g. 128-query forward blocks, 64 x 64 dk/dv
    # and dq blocks at D = 128, chosen by w2s/kernels/sweep.py): run them here too, so the block-range arithmetic is
    # checked for the sizes the GPU actually uses.
    monkeypatch.setattr(attention_common, "_interpreting", lambda: False)
    assert attention_common._config(flash._GPU_FWD, flash._INTERPRET_FWD, D, "forward") == flash._GPU_FWD[D]
    compare(1, 150, 150, 2, 1, D, **{**options, "kv_lengths": lengths(*options["kv_lengths"])})


def nan_past_kv_lengths_case(B, T, S, H, K, D, options):
    """(seed, q, k, v, k and v with NaN in every row past kv_lengths[b], the attention kwargs) of an fp32 case whose
    options give kv_lengths and q_positions as tuples (positions as (start, stop) ranges per batch row)."""
    seed, q, k, v = random_qkv(B, T, S, H, K, D, torch.float32)
    args = dict(options)
    k_read, v_read = k.clone(), v.clone()
    if "kv_lengths" in args:
        args["kv_lengths"] = lengths(*args["kv_lengths"])
        for b, n in enumerate(options["kv_lengths"]):
            k_read[b, n:], v_read[b, n:] = float("nan"), float("nan")
    if "q_positions" in args:
        args["q_positions"] = torch.stack([torch.arange(*r) for r in args["q_positions"]]).to(DEVICE)
    return seed, q, k, v, k_read, v_read, args


def check_grads_with_nan_past_kv_lengths(B, T, S, H, K, D, options):
    """Output and every gradient of flash.attention against the reference, the kernel reading keys and values that
    are NaN past kv_len (nan_past_kv_lengths_case); the gradients of those keys are not compared (no query sees
    them)."""
    seed, q, k, v, k_read, v_read, args = nan_past_kv_lengths_case(B, T, S, H, K, D, options)
    grad_out = torch.randn(B, T, H, D, device=DEVICE)
    expected = output_and_grads(lambda *x: reference.attention(*x, **args), (q, k, v), torch.float32, grad_out)
    actual = output_and_grads(lambda *x: flash.attention(*x, **args), (q, k_read, v_read), torch.float32, grad_out)
    for b, n in enumerate(options.get("kv_lengths", ())):
        for grads in (actual, expected):
            grads[2][b, n:], grads[3][b, n:] = 0.0, 0.0
    check_fp32(actual, expected, seed)


@pytest.mark.parametrize("B, T, S, H, K, D, options", [
    (2, 33, 33, 4, 2, 32, {}),
    (2, 7, 7, 2, 2, 16, {"kv_lengths": (7, 4)}),
    (2, 5, 5, 2, 2, 16, {"kv_lengths": (5, 0)}),
    (2, 33, 33, 4, 1, 32, {"sliding_window": 5, "softcap": 5.0}),
    (2, 7, 20, 4, 2, 16, {"q_positions": ((13, 20), (5, 12)), "kv_lengths": (20, 12), "sliding_window": 6}),
], ids=["gqa", "padding", "empty-row", "mqa-window-softcap", "positions-ragged"])
def test_forward_with_key_value_tiles_through_tma(monkeypatch, B, T, S, H, K, D, options):
    """The forward's TMA variant (tensor descriptors that stop at kv_len) gives the reference's output: ragged
    lengths, a row that sees nothing, windows, soft-caps, explicit positions. Keys and values past kv_len are NaN (a
    cache's unwritten rows may hold anything): a tile that read them would turn the output into NaN."""
    monkeypatch.setattr(flash, "_INTERPRET_FWD", flash._INTERPRET_FWD._replace(tma=True))
    seed, q, k, v, k_read, v_read, args = nan_past_kv_lengths_case(B, T, S, H, K, D, options)
    with torch.no_grad():
        out = flash.attention(q, k_read, v_read, **args)
    check_output(out, q, k, v, seed, **args)


@pytest.mark.parametrize("B, T, S, H, K, D, options", [
    (2, 33, 33, 4, 2, 32, {}),
    (2, 7, 7, 2, 2, 16, {"kv_lengths": (7, 4)}),
    (2, 33, 33, 4, 1, 32, {"sliding_window": 5, "softcap": 5.0, "kv_lengths": (33, 20)}),
    (2, 7, 20, 4, 2, 16, {"q_positions": ((13, 20), (5, 12)), "kv_lengths": (20, 12), "sliding_window": 6}),
], ids=["gqa", "padding", "mqa-window-softcap-padding", "positions-ragged"])
def test_backward_with_tiles_through_tma(monkeypatch, B, T, S, H, K, D, options):
    """Forward, dk/dv (query and output-gradient tiles through descriptors that end at T) and dq (key and value
    tiles through descriptors that end at kv_len) all through TMA, against the reference's output and gradients. The
    keys and values past kv_len are NaN: dq and the output stay finite; the gradients of those keys are not compared
    (no query sees them)."""
    for module, name in ((flash, "_INTERPRET_FWD"), (flash_backward, "_INTERPRET_BWD_DKDV"),
                         (flash_backward, "_INTERPRET_BWD_DQ")):
        monkeypatch.setattr(module, name, getattr(module, name)._replace(tma=True))
    check_grads_with_nan_past_kv_lengths(B, T, S, H, K, D, options)


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("B, T, S, H, K, D, options", [
    (2, 33, 33, 4, 2, 32, {}),
    (3, 70, 70, 4, 2, 16, {"kv_lengths": (70, 41, 0)}),
    (1, 7, 7, 2, 2, 16, {}),
    (2, 33, 33, 4, 1, 32, {"sliding_window": 5, "softcap": 5.0}),
    (2, 7, 20, 4, 2, 16, {"q_positions": ((13, 20), (5, 12)), "kv_lengths": (20, 12), "sliding_window": 6}),
], ids=["gqa", "padding-empty-row", "fewer-tiles-than-programs", "mqa-window-softcap", "positions-ragged"])
def test_persistent_forward_walks_every_tile_once(monkeypatch, tma, B, T, S, H, K, D, options):
    """The persistent forward (a few programs, here the interpreter's 3, each walking many (query block, batch x
    head) tiles heaviest first) gives the reference's output and, through the LSE it saves, the reference's
    gradients. The output buffer starts as NaN, so a tile no program writes fails the comparison; keys and values
    past kv_len are NaN too, as in the TMA tests."""
    monkeypatch.setattr(flash, "_INTERPRET_FWD", flash._INTERPRET_FWD._replace(tma=tma, programs_per_sm=1))
    real_empty = torch.empty
    monkeypatch.setattr(flash.torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(float("nan")))
    check_grads_with_nan_past_kv_lengths(B, T, S, H, K, D, options)


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("B, T, S, H, K, D, options", [
    (3, 70, 70, 4, 2, 16, {"kv_lengths": (70, 41, 0)}),
    (2, 70, 70, 4, 1, 16, {"sliding_window": 40, "softcap": 5.0}),
    (2, 10, 70, 4, 2, 32, {"q_positions": ((60, 70), (30, 40)), "kv_lengths": (70, 50)}),
], ids=["causal-padding-empty-row", "window-softcap", "positions-one-and-three-blocks"])
def test_forward_with_the_pv_product_deferred(monkeypatch, tma, B, T, S, H, K, D, options):
    """deferred_pv: over the key blocks every row of a query block sees, each block's P V product is added one block
    late (after the next block's q.k product), with the accumulator rescaled by that block's factor just before. Output
    and, through the LSE it saves, every gradient against the reference; the middle segments hold 0 to 4 blocks of
    the interpreter's 16 keys (one block: no turn of the loop, the first block's softmax and the last P V alone), start
    past 0 under the window, and the keys and values past kv_len are NaN. The deferred loop must have run."""
    monkeypatch.setattr(flash, "_INTERPRET_FWD", flash._INTERPRET_FWD._replace(tma=tma, deferred_pv=True))
    calls = []
    real = flash._fwd_key_loop_deferred
    monkeypatch.setattr(flash, "_fwd_key_loop_deferred", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    check_grads_with_nan_past_kv_lengths(B, T, S, H, K, D, options)
    assert calls


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("B, T, S, H, K, D, options", [
    (2, 33, 33, 4, 2, 32, {}),
    (3, 70, 70, 4, 2, 16, {"kv_lengths": (70, 41, 0)}),
    (2, 33, 33, 4, 1, 32, {"sliding_window": 5, "softcap": 5.0, "kv_lengths": (33, 20)}),
    (2, 7, 20, 4, 2, 16, {"q_positions": ((13, 20), (5, 12)), "kv_lengths": (20, 12), "sliding_window": 6}),
], ids=["gqa", "padding-empty-row", "mqa-window-softcap-padding", "positions-ragged"])
def test_backward_with_dq_summed_by_atomic_adds(monkeypatch, tma, B, T, S, H, K, D, options):
    """atomic_dq: the dk/dv kernel adds each key block's share of dq into fp32 rows with atomic adds (several key
    blocks and, with GQA, one kv head's program for every query head of its group) and the dq kernel does not run.
    Output and every gradient against the reference, with NaN keys and values past kv_len (they load as zeros)."""
    monkeypatch.setattr(flash_backward, "_INTERPRET_BWD_DKDV",
                        flash_backward._INTERPRET_BWD_DKDV._replace(tma=tma, atomic_dq=True))

    class NotLaunched:  # `kernel[grid]` is where a launch starts
        def __getitem__(self, grid):
            raise AssertionError("the dq kernel ran although the dk/dv kernel sums dq")

    monkeypatch.setattr(flash_backward, "_attn_bwd_dq_kernel", NotLaunched())
    check_grads_with_nan_past_kv_lengths(B, T, S, H, K, D, options)


@pytest.mark.parametrize("module, name, option, message", [
    (flash_backward, "_INTERPRET_BWD_DKDV", {"programs_per_sm": 1}, "dk/dv launch config .* sets programs_per_sm"),
    (flash_backward, "_INTERPRET_BWD_DQ", {"atomic_dq": True}, "dq launch config .* sets atomic_dq"),
    (flash, "_INTERPRET_FWD", {"atomic_dq": True}, "forward launch config .* sets atomic_dq"),
], ids=["persistent-dkdv", "atomic-dq-in-dq", "atomic-dq-in-forward"])
def test_a_launch_option_the_kernel_does_not_read_is_refused(monkeypatch, module, name, option, message):
    """A table entry edited by hand with an option its kernel ignores fails at launch, naming the kernel and the
    option, instead of running as if it were not set."""
    monkeypatch.setattr(module, name, getattr(module, name)._replace(**option))
    seed, q, k, v = random_qkv(1, 9, 9, 2, 1, 16, torch.float32)
    q.requires_grad_(True)
    with pytest.raises(ValueError, match=message):
        flash.attention(q, k, v).sum().backward()


def test_tma_is_used_only_where_descriptors_can_address_the_tensors():
    """TMA needs unit stride along D, a 16-byte aligned base and 16-byte multiples as strides; otherwise the forward
    loads through pointers."""
    k = torch.zeros(2, 9, 2, 16)
    assert attention_common._tma_ready(k, k)
    assert attention_common._tma_ready(k[:, 3:], k)  # a slice of a longer cache: strides and base stay aligned
    assert not attention_common._tma_ready(k.transpose(1, 3), k)  # D not the unit-stride axis
    assert not attention_common._tma_ready(torch.zeros(k.numel() + 1)[1:].view(k.shape), k)  # base 4 bytes off
    assert not attention_common._tma_ready(torch.zeros(2, 9, 1, 3), torch.zeros(2, 9, 1, 3))  # 12-byte rows


def test_tma_launch_sets_an_allocator_for_descriptors_but_keeps_a_users_own(monkeypatch):
    """Device-side descriptors need Triton's allocator, unset by default: a TMA launch points it at torch, but one a
    user set stays."""
    import triton
    from triton.runtime import _allocation

    k = torch.zeros(2, 9, 2, 16)
    monkeypatch.setattr(attention_common, "_interpreting", lambda: False)
    token = _allocation._allocator.set(_allocation.NullAllocator())
    try:
        assert attention_common._tma_ready(k, k)
        assert _allocation._allocator.get() is attention_common._descriptor_scratch

        def users_own(size, alignment, stream):
            return torch.empty(size, dtype=torch.int8)

        triton.set_allocator(users_own)
        assert attention_common._tma_ready(k, k)
        assert _allocation._allocator.get() is users_own
    finally:
        _allocation._allocator.reset(token)


def test_non_contiguous_inputs():
    seed, q, k, v = random_qkv(2, 19, 19, 4, 2, 32, torch.float32)
    q_view = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, T, H, D) view of a (B, H, T, D) buffer
    cache = torch.randn(2, 30, 2, 32, device=DEVICE)
    cache[:, :19] = k
    k_view = cache[:, :19]  # a slice of a longer KV cache
    assert not q_view.is_contiguous() and not k_view.is_contiguous()
    out = flash.attention(q_view, k_view, v.transpose(1, 2).contiguous().transpose(1, 2), sliding_window=4)
    check_fp32([out], [reference.attention(q, k, v, sliding_window=4)], seed)


# --- training path, fp16 -------------------------------------------------------------------------------------------


def test_forward_and_grads_fp16_gqa():
    compare(2, 33, 33, 4, 2, 32, dtype=torch.float16)


def test_forward_and_grads_fp16_window_softcap_padding():
    compare(2, 40, 40, 4, 2, 64, dtype=torch.float16, sliding_window=7, softcap=5.0, kv_lengths=lengths(40, 22))


# --- decode path (no grad, few tokens, long cache) -----------------------------------------------------------------


@pytest.mark.parametrize("dtype, T, H, options", [
    (torch.float32, 3, 4, {}),
    (torch.float32, 1, 8, {"sliding_window": 6, "softcap": 2.0}),  # one token, GQA group of 4 packed into rows
    (torch.float16, 2, 4, {"sliding_window": 20, "softcap": 30.0}),
], ids=["fp32", "fp32-window-softcap", "fp16"])
def test_decode_matches_reference(dtype, T, H, options):
    B, S, K, D = 2, 45, 2, 32
    seed, q, k, v = random_qkv(B, T, S, H, K, D, dtype)
    start = torch.tensor([[40], [10]], device=DEVICE)  # rows at different depths of the cache
    positions = start + torch.arange(T, device=DEVICE)
    kv_lengths = start[:, 0] + T
    args = dict(q_positions=positions, kv_lengths=kv_lengths, **options)
    with torch.no_grad():
        assert ops.use_decode_kernel(q, k, v)
        out = decode.attention_decode(q, k, v, **args)
    check_output(out, q, k, v, seed, **args)


def test_decode_with_gpu_block_sizes(monkeypatch):
    # The GPU's 64-key tiles on a 200-slot cache, the split count formula replaced by 3 (rounded to whole tiles: 2
    # splits of 128 keys).
    monkeypatch.setattr(attention_common, "_interpreting", lambda: False)
    monkeypatch.setattr(decode, "_interpreting", lambda: False)  # decode imported its own reference to it
    monkeypatch.setattr(decode, "_num_splits", lambda batch_heads, S, block_n, device: 3)
    B, T, S, H, K, D = 2, 2, 200, 8, 2, 64
    seed, q, k, v = random_qkv(B, T, S, H, K, D, torch.float32)
    positions = torch.tensor([[150], [7]], device=DEVICE) + torch.arange(T, device=DEVICE)
    args = dict(q_positions=positions, kv_lengths=positions[:, -1] + 1, sliding_window=100, softcap=20.0)
    with torch.no_grad():
        out = decode.attention_decode(q, k, v, **args)
    check_fp32([out], [reference.attention(q, k, v, **args)], seed)


@pytest.mark.parametrize("with_prefix", [False, True], ids=["splits", "splits-and-prefix"])
def test_merge_of_key_splits_is_the_log_sum_exp_weighted_mean(with_prefix):
    """The merge kernel against its formula in float64: out = sum_s 2^lse_s o_s / sum_s 2^lse_s over the key splits
    (and the cascade's prefix result, whose lse +inf means empty). An empty split adds nothing even when its o holds
    NaN, and a row whose splits are all empty gets 0."""
    g = torch.Generator().manual_seed(0)
    B, splits, T, H, D = 2, 3, 2, 4, 16
    o_part = torch.randn(B, splits, T, H, D, generator=g)
    lse_part = torch.randn(B, splits, T, H, generator=g) * 8
    lse_part[0, 1], o_part[0, 1] = float("-inf"), float("nan")  # split 1 of batch row 0 saw no key
    lse_part[1, :, 0, 2] = float("-inf")  # output row (b 1, t 0, h 2): no split saw a key
    weights, values = 2.0 ** lse_part.double(), o_part.double().nan_to_num(0.0)  # (B, splits, T, H), (..., D)
    prefix = None
    if with_prefix:
        prefix_out, prefix_lse = torch.randn(B * T, H, D, generator=g), torch.randn(H, B * T, generator=g) * 8
        prefix_lse[2, 1 * T + 0], prefix_out[1 * T + 0, 2] = float("inf"), float("nan")  # that row sees no prefix key
        prefix_lse[0, 0] = float("inf")  # nor does (b 0, t 0, h 0)
        prefix_weights = torch.where(prefix_lse.isinf(), 0.0, 2.0 ** prefix_lse.double()).T.reshape(B, 1, T, H)
        weights = torch.cat([weights, prefix_weights], dim=1)
        values = torch.cat([values, prefix_out.double().nan_to_num(0.0).reshape(B, 1, T, H, D)], dim=1)
        prefix = (prefix_out.to(DEVICE), prefix_lse.to(DEVICE))
    total = weights.sum(dim=1)
    expected = (weights[..., None] * values).sum(dim=1) / torch.where(total > 0, total, 1.0)[..., None]
    out = torch.full((B, T, H, D), float("nan"), device=DEVICE)
    decode._merge_splits(o_part.to(DEVICE), lse_part.to(DEVICE), out, prefix)
    torch.testing.assert_close(out.cpu().double(), expected, rtol=1e-6, atol=1e-6)
    assert (out[1, 0, 2] == 0).all()


@pytest.mark.parametrize("splits", [1, 3])
def test_decode_launches_one_kernel_per_call_and_the_merge_only_with_splits(monkeypatch, splits):
    """A batch-1 decode step calls the decode attention once per layer, where every launch is mostly fixed cost: the
    sampler's int64 positions are read as they are (no cast), one split stores the output itself, and several are
    merged in one more launch (no chain of torch ops)."""
    monkeypatch.setattr(decode, "_num_splits", lambda batch_heads, S, block_n, device: splits)
    seed, q, k, v = random_qkv(1, 1, 64, 8, 2, 32, torch.float16)
    positions = torch.tensor([[60]], device=DEVICE)  # int64, as the sampler keeps them
    with torch.no_grad(), LaunchCounter(monkeypatch) as counter:
        out = decode.attention_decode(q, k, v, q_positions=positions)
    assert counter.launches == ["triton:_attn_decode_kernel"] + ["triton:_merge_splits_kernel"] * (splits > 1)
    check_output(out, q, k, v, seed, q_positions=positions)


def shared_prefix_case(B, T, S, P, H, K, D, dtype, start):
    """q, k, v with keys [0, P) equal in every row, the prefix itself, and queries from the given start positions."""
    seed, q, k, v = random_qkv(B, T, S, H, K, D, dtype)
    prefix_k, prefix_v = k[0, :P].clone(), v[0, :P].clone()
    k[:, :P], v[:, :P] = prefix_k, prefix_v
    positions = torch.tensor(start, device=DEVICE)[:, None] + torch.arange(T, device=DEVICE)
    return seed, q, k, v, prefix_k, prefix_v, positions


@pytest.mark.parametrize("dtype, T, H, options", [
    (torch.float32, 1, 4, {}),
    (torch.float32, 2, 8, {"sliding_window": 12, "softcap": 2.0}),  # the window also cuts into the prefix
    (torch.float16, 1, 4, {"softcap": 30.0}),
], ids=["fp32", "fp32-window-softcap", "fp16"])
def test_cascade_decode_over_a_shared_prefix_matches_reference(dtype, T, H, options):
    """The prefix attended once for all rows (flash forward) + each row's own keys (decode kernel), merged: the
    reference over whole rows. One row's queries sit inside the prefix: causality holds there too."""
    B, S, P, K, D = 3, 45, 21, 2, 32
    seed, q, k, v, prefix_k, prefix_v, positions = shared_prefix_case(B, T, S, P, H, K, D, dtype, [40, 21, 9])
    with torch.no_grad():
        out = decode.attention_after_shared_prefix(q, k, v, prefix_k, prefix_v, positions, **options)
    check_output(out, q, k, v, seed, q_positions=positions, **options)


def test_cascade_decode_with_gpu_block_sizes(monkeypatch):
    # The GPU's tiles (128-query forward blocks, 64-key decode tiles, 2 splits of the 70 own keys) on a 130-token
    # prefix of 200 slots.
    monkeypatch.setattr(attention_common, "_interpreting", lambda: False)
    monkeypatch.setattr(decode, "_interpreting", lambda: False)
    monkeypatch.setattr(decode, "_num_splits", lambda batch_heads, S, block_n, device: 3)
    seed, q, k, v, prefix_k, prefix_v, positions = shared_prefix_case(3, 1, 200, 130, 8, 2, 64, torch.float32,
                                                                      [199, 130, 160])
    with torch.no_grad():
        out = decode.attention_after_shared_prefix(q, k, v, prefix_k, prefix_v, positions, sliding_window=150)
    check_fp32([out], [reference.attention(q, k, v, q_positions=positions, sliding_window=150)], seed)


@pytest.mark.parametrize("cascade, options", [
    (False, {}),
    (False, {"sliding_window": 6, "softcap": 2.0}),
    (True, {}),
    (True, {"sliding_window": 12, "softcap": 2.0}),
], ids=["decode", "decode-window-softcap", "cascade", "cascade-window-softcap"])
def test_decode_reads_cache_rows_through_kv_rows(cascade, options):
    """kv_rows (the sampler's mixed steps): 6 one-token query rows over a 3-row cache, several reading one row at
    consecutive positions (a prompt's tokens prefilled in one step) and one reading the row a query before it also
    reads; each equals the reference over the gathered rows k[kv_rows], plain and as a cascade over a shared prefix."""
    R, S, P, H, K, D = 3, 45, 21, 4, 2, 32
    seed, _, k, v, prefix_k, prefix_v, _ = shared_prefix_case(R, 1, S, P, H, K, D, torch.float32, [0] * R)
    q = torch.randn(6, 1, H, D, device=DEVICE)
    kv_rows = torch.tensor([2, 0, 2, 2, 1, 0], device=DEVICE)
    positions = torch.tensor([[30], [44], [31], [32], [22], [21]], device=DEVICE)
    with torch.no_grad():
        if cascade:
            out = decode.attention_after_shared_prefix(q, k, v, prefix_k, prefix_v, positions, kv_rows=kv_rows,
                                                       **options)
        else:
            out = decode.attention_decode(q, k, v, q_positions=positions, kv_rows=kv_rows, **options)
    check_fp32([out], [reference.attention(q, k[kv_rows], v[kv_rows], q_positions=positions, **options)], seed)
    with pytest.raises(ValueError, match=r"kv_rows \(5,\) torch.int64, expected \(6,\) integers"):
        decode.attention_decode(q, k, v, q_positions=positions, kv_rows=kv_rows[:5])


@pytest.mark.parametrize("cascade, options", [
    (False, {}),
    (False, {"sliding_window": 20, "softcap": 2.0}),
    (True, {}),
    (True, {"sliding_window": 40}),
], ids=["decode", "decode-window-softcap", "cascade", "cascade-window"])
def test_decode_reads_a_prompts_keys_from_the_row_named_for_it(cascade, options):
    """row_prefix (a prompt's samples): rows 1 and 3 hold NaN where their first 64 keys should be and name row 0,
    which holds those keys (64: a whole number of key blocks at every block size), so any read of their own first
    64 keys would show; row 2 names itself. Each output equals the reference over the true keys, with and without
    kv_rows and as a cascade over 16 keys every row shares."""
    R, S, P, H, K, D = 4, 100, 64, 4, 2, 32
    seed, _, k, v, prefix_k, prefix_v, _ = shared_prefix_case(R, 1, S, 16, H, K, D, torch.float32, [0] * R)
    k[[1, 3], :P], v[[1, 3], :P] = k[0, :P], v[0, :P]
    true_k, true_v = k.clone(), v.clone()
    k[[1, 3], :P], v[[1, 3], :P] = float("nan"), float("nan")
    row_prefix = (torch.tensor([0, 0, 2, 0, 4], device=DEVICE), torch.tensor([P, P, 0, P, 0], device=DEVICE))
    q = torch.randn(R, 1, H, D, device=DEVICE)
    positions = torch.tensor([[99], [70], [80], [63]], device=DEVICE)
    for kv_rows in (None, torch.tensor([0, 1, 2, 3], device=DEVICE)):
        with torch.no_grad():
            if cascade:
                out = decode.attention_after_shared_prefix(q, k, v, prefix_k, prefix_v, positions, kv_rows=kv_rows,
                                                           row_prefix=row_prefix, **options)
            else:
                out = decode.attention_decode(q, k, v, q_positions=positions, kv_rows=kv_rows, row_prefix=row_prefix,
                                              **options)
        check_fp32([out], [reference.attention(q, true_k, true_v, q_positions=positions, **options)], seed)
    with pytest.raises(ValueError, match=r"row_prefix needs \(rows, lengths\), 1-d with at least 4 entries"):
        decode.attention_decode(q, k, v, q_positions=positions, row_prefix=(row_prefix[0][:3], row_prefix[1]))


def test_per_row_tables_may_be_strided_views():
    """kv_lengths, kv_rows and row_prefix's tables are read by row index in the kernels: a strided view (every other
    entry of a longer tensor) gives the same output as its contiguous copy, in the decode kernel (plain, with
    kv_rows and a named prompt row, and as a cascade) and in the flash kernel."""
    B, S, H, K, D = 3, 40, 4, 2, 16
    seed, q, k, v = random_qkv(B, 1, S, H, K, D, torch.float32)
    positions = torch.tensor([[39], [20], [33]], device=DEVICE)
    lengths = torch.tensor([25, 99, 9, 99, 31, 99], device=DEVICE, dtype=torch.int32)[::2]
    rows = torch.tensor([2, 9, 0, 9, 1, 9], device=DEVICE)[::2]
    k[1, :16], v[1, :16] = k[2, :16], v[2, :16]  # row 1 holds row 2's first 16 keys, as a sibling would
    named = (torch.tensor([0, 7, 2, 7, 2, 7, 3, 7], device=DEVICE)[::2],
             torch.tensor([0, 7, 16, 7, 0, 7, 0, 7], device=DEVICE)[::2])
    assert not (lengths.is_contiguous() or rows.is_contiguous() or named[0].is_contiguous())
    dense = lambda t: t.contiguous()  # noqa: E731
    with torch.no_grad():
        for run in (
            lambda lens, r, n: decode.attention_decode(q, k, v, q_positions=positions, kv_lengths=lens),
            lambda lens, r, n: decode.attention_decode(q, k, v, q_positions=positions, kv_rows=r, row_prefix=n),
            lambda lens, r, n: decode.attention_after_shared_prefix(q, k, v, k[0, :8], v[0, :8], positions,
                                                                    kv_rows=r, row_prefix=n),
            lambda lens, r, n: flash.attention(q.expand(B, 17, H, D), k, v, kv_lengths=lens),
        ):
            expected = run(dense(lengths), dense(rows), tuple(map(dense, named)))
            assert torch.equal(run(lengths, rows, named), expected), seed


def prompt_group_case(options_window=None):
    """7 cache rows as the sampler's tables describe them: prompt A (19 keys) in rows 1, 3 and 6 (led by 1), prompt B
    (33 keys) in rows 0 and 4 (led by 0), prompt C (5 keys) in row 5 alone, row 2 idle (its own group, no keys).
    Every row but a leader holds NaN where its prompt's keys are, so a read of them would show; the true keys are
    returned apart. -> (seed, q, k, v, true_k, true_v, positions, (members, lengths, starts, M))"""
    B, S, H, K, D = 7, 48, 4, 2, 16
    seed, q, k, v = random_qkv(B, 1, S, H, K, D, torch.float32)
    groups = {1: ([1, 3, 6], 19), 0: ([0, 4], 33), 5: ([5], 5), 2: ([2], 0)}  # leader: (members, prompt keys)
    M = 4
    members = torch.full((B + 1, M + 2), -1, dtype=torch.int32)  # wider than M and a row more, as the sampler's
    lengths, starts = torch.zeros(B + 1, dtype=torch.int32), torch.zeros(B + 1, dtype=torch.int32)
    for leader, (rows, n) in groups.items():
        members[leader, : len(rows)] = torch.tensor(rows, dtype=torch.int32)
        lengths[leader] = n
        for r in rows:
            starts[r] = n
            k[r, :n], v[r, :n] = k[leader, :n], v[leader, :n]
    members[1, 3] = B  # a member past the rows this call runs (a slot a smaller step leaves out): not written
    true_k, true_v = k.clone(), v.clone()
    for leader, (rows, n) in groups.items():
        for r in rows[1:]:
            k[r, :n], v[r, :n] = float("nan"), float("nan")
    positions = torch.tensor([[40], [25], [3], [19], [47], [5], [30]], device=DEVICE)
    tables = tuple(t.to(DEVICE) for t in (members, lengths, starts)) + (M,)
    return seed, q, k, v, true_k, true_v, positions, tables


@pytest.mark.parametrize("options", [{}, {"sliding_window": 10}, {"softcap": 2.0}],
                         ids=["plain", "window", "softcap"])
def test_the_prompt_cascade_reads_each_prompt_once_from_its_leader(options):
    """attention_after_prompt_groups: groups of 3, 2 and 1 rows and an idle row, prompts of 19, 33 and 5 keys (no
    whole number of 16-key blocks), queries before the prompt's end for the idle row; each output equals the
    reference over the true keys (so no member read its own prompt keys, which are NaN), with a window and a
    soft-cap too, and a member past the rows run is left alone; bad tables are a clear error."""
    seed, q, k, v, true_k, true_v, positions, tables = prompt_group_case()
    with torch.no_grad():
        out = decode.attention_after_prompt_groups(q, k, v, positions, tables, **options)
    check_fp32([out], [reference.attention(q, true_k, true_v, q_positions=positions, **options)], seed)
    members, lengths, starts, M = tables
    with pytest.raises(ValueError, match=r"M x GQA group <= 128"):
        decode.attention_after_prompt_groups(q, k, v, positions, (members, lengths, starts, 65))
    with pytest.raises(ValueError, match="explicit positions"):
        decode.attention_after_prompt_groups(q, k, v, None, tables)


def test_the_sweeps_prompt_groups_describe_runs_of_samples_led_by_their_first_row():
    """sweep.prompt_groups (the decode sweep's cascade at its batch shape): 2 prompts x 3 samples of 21 shared keys,
    whose copies but the first hold NaN; the cascade over those tables equals the reference over the true keys."""
    B, n, S, P, H, K, D = 6, 3, 40, 21, 4, 2, 16
    seed, q, k, v = random_qkv(B, 1, S, H, K, D, torch.float32)
    k[:, :P], v[:, :P] = k[[0, 0, 0, 3, 3, 3], :P], v[[0, 0, 0, 3, 3, 3], :P]
    true_k, true_v = k.clone(), v.clone()
    k[[1, 2, 4, 5], :P], v[[1, 2, 4, 5], :P] = float("nan"), float("nan")
    positions = torch.tensor([[21], [39], [30], [25], [22], [38]], device=DEVICE, dtype=torch.int32)
    with torch.no_grad():
        out = decode.attention_after_prompt_groups(q, k, v, positions, sweep.prompt_groups(B, n, P, DEVICE))
    check_fp32([out], [reference.attention(q, true_k, true_v, q_positions=positions)], seed)


@pytest.mark.skipif(DEVICE == "cuda", reason="the CPU paths of ops.attention")
@pytest.mark.parametrize("options", [{}, {"sliding_window": 6}, {"softcap": 2.0}], ids=["sdpa", "window", "softcap"])
def test_ops_attention_with_kv_rows_on_cpu(monkeypatch, options):
    """ops.attention's kv_rows off the Triton path: one-token rows grouped by cache row (leading rows on their own
    cache rows, then runs of rows on one row, a row met twice in separate runs) and several-token rows gathered,
    each equal to the reference over the gathered rows; the leading rows keep the cascade hint."""
    from w2s.kernels import sdpa_attention

    monkeypatch.setattr(ops, "_backend", "auto")
    monkeypatch.setattr(ops, "CASCADE_MIN_PREFIX", 4)
    calls = []
    cascade = sdpa_attention.attention_after_shared_prefix
    monkeypatch.setattr(sdpa_attention, "attention_after_shared_prefix",
                        lambda *a: calls.append(a[0].shape) or cascade(*a))
    R, S, P, H, K, D = 4, 30, 6, 4, 2, 16
    seed, _, k, v, prefix_k, prefix_v, _ = shared_prefix_case(R, 1, S, P, H, K, D, torch.float32, [0] * R)
    kv_rows = torch.tensor([0, 1, 2, 3, 2, 2, 2, 0, 0, 2, 3])
    positions = torch.tensor([20, 29, 15, 9, 10, 11, 12, 25, 26, 13, 8])[:, None]
    q = torch.randn(len(kv_rows), 1, H, D)
    expected = reference.attention(q, k[kv_rows], v[kv_rows], q_positions=positions, **options)
    with torch.no_grad():
        out = ops.attention(q, k, v, q_positions=positions, kv_rows=kv_rows, shared_prefix=(prefix_k, prefix_v),
                            **options)
    check_fp32([out], [expected], seed)
    assert calls == ([(4, 1, H, D)] if not options else [])  # the 4 leading rows, once; SDPA has no window/softcap
    q2, positions2 = torch.randn(3, 2, H, D), torch.tensor([[7, 8], [20, 21], [9, 10]])
    with torch.no_grad():
        out = ops.attention(q2, k, v, q_positions=positions2, kv_rows=torch.tensor([3, 1, 3]), **options)
    rows = torch.tensor([3, 1, 3])
    check_fp32([out], [reference.attention(q2, k[rows], v[rows], q_positions=positions2, **options)], seed)


def test_grad_mode_with_few_tokens_uses_flash_path():
    q, k, v = (torch.randn(1, 2, 2, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    assert not ops.use_decode_kernel(q, k, v)
    with torch.no_grad():
        assert ops.use_decode_kernel(q, k, v)


def decode_kernel_domain(T, G, grad):
    """The decode kernel's domain, written independently of w2s/ops.py: no gradient, and few query rows per KV head
    (T query tokens, G query heads sharing each KV head)."""
    return not grad and T <= 16 and T * G <= 128


@pytest.mark.parametrize("grad", ["requires_grad", "requires_grad-under-no_grad", "no-requires_grad"])
def test_ops_picks_decode_for_few_rows_without_grad_and_flash_elsewhere(monkeypatch, grad):
    """ops.attention on Triton, over a grid of query lengths and GQA groups: the decode kernel exactly in its domain
    (few rows, no gradient), the flash kernel everywhere else. Kernels stubbed: only the choice runs."""
    monkeypatch.setattr(ops, "_backend", "triton")
    monkeypatch.setattr(flash, "attention", lambda *a, **k: "flash")
    monkeypatch.setattr(decode, "attention_decode", lambda *a, **k: "decode")
    monkeypatch.setattr(decode, "attention_after_shared_prefix", lambda *a, **k: "cascade")
    for T in (1, 2, 8, 16, 17, 33):
        for H, K in ((4, 4), (8, 2), (16, 2), (16, 1), (32, 1)):
            q = torch.zeros(2, T, H, 16, device=DEVICE, requires_grad=grad != "no-requires_grad")
            k = torch.zeros(2, 40, K, 16, device=DEVICE)
            positions = torch.arange(T, device=DEVICE).expand(2, T) + 20
            with torch.set_grad_enabled(grad != "requires_grad-under-no_grad"):
                got = ops.attention(q, k, k, q_positions=positions)
            expected = "decode" if decode_kernel_domain(T, H // K, grad == "requires_grad") else "flash"
            assert got == expected, (T, H, K, grad)


@pytest.mark.parametrize("T, prefix, options, expected", [
    (1, 64, {}, "cascade"),  # positions given, no kv_lengths, CASCADE_MIN_PREFIX shared tokens
    (4, 100, {"sliding_window": 8, "softcap": 5.0}, "cascade"),  # any window and soft-cap
    (1, 63, {}, "decode"),  # prefix below the threshold
    (1, 64, {"kv_lengths": True}, "decode"),  # ragged lengths: no cascade
    (1, 64, {"q_positions": None}, "decode"),  # no positions: no cascade
    (17, 64, {}, "flash"),  # too many queries for the decode kernel
], ids=["cascade", "cascade-window-softcap", "short-prefix", "kv-lengths", "no-positions", "long-query"])
def test_ops_picks_the_cascade_for_a_long_shared_prefix_only(monkeypatch, T, prefix, options, expected):
    monkeypatch.setattr(ops, "_backend", "triton")
    monkeypatch.setattr(flash, "attention", lambda *a, **k: "flash")
    monkeypatch.setattr(decode, "attention_decode", lambda *a, **k: "decode")
    monkeypatch.setattr(decode, "attention_after_shared_prefix", lambda *a, **k: "cascade")
    assert ops.CASCADE_MIN_PREFIX == 64
    q, k = torch.zeros(2, T, 4, 16, device=DEVICE), torch.zeros(2, 120, 2, 16, device=DEVICE)
    args = {"q_positions": torch.arange(T, device=DEVICE).expand(2, T) + 100, **options}
    if args.pop("kv_lengths", None):
        args["kv_lengths"] = torch.tensor([120, 110], device=DEVICE)
    with torch.no_grad():
        got = ops.attention(q, k, k, shared_prefix=(k[0, :prefix], k[0, :prefix]), **args)
    assert got == expected


# --- bad input -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("q_shape, kv_shape, kwargs, message", [
    ((1, 4, 3, 16), (1, 4, 2, 16), {}, "multiple of K"),
    ((1, 4, 2, 24), (1, 4, 2, 24), {}, "head dim 24"),
    ((1, 4, 2, 16), (1, 4, 2, 16), {"q_positions": torch.zeros(1, 3, dtype=torch.long)}, "q_positions"),
    ((1, 4, 2, 16), (1, 4, 2, 16), {"softcap": 0.0}, "softcap"),
    ((1, 4, 2, 16), (1, 4, 2, 16), {"scale": -0.25}, "scale -0.25 must be positive"),
])
def test_bad_input_is_a_clear_error(q_shape, kv_shape, kwargs, message):
    q, k = torch.zeros(q_shape, device=DEVICE), torch.zeros(kv_shape, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        flash.attention(q, k, k, **kwargs)


def test_launches_beyond_cuda_limits_are_clear_errors():
    """What a GPU would refuse and the interpreter would run: more than 65535 (batch x head) rows on CUDA grid axis 1
    (flash and decode kernels), and a decode tile of more than 128 query rows per kv head (the decode entry points,
    which w2s/ops.py never sends such a call). Each is a one-line ValueError before any launch."""
    q = torch.zeros(65536, 1, 1, 16, device=DEVICE)
    with torch.no_grad(), pytest.raises(ValueError, match="65536 exceeds CUDA's 65535 grid rows"):
        flash.attention(q, q, q)
    with torch.no_grad(), pytest.raises(ValueError, match="65536 exceeds CUDA's 65535 grid rows"):
        decode.attention_decode(q, q, q)
    q, k = torch.zeros(1, 16, 16, 16, device=DEVICE), torch.zeros(1, 20, 1, 16, device=DEVICE)  # 16 x 16 rows
    with pytest.raises(ValueError, match="256 rows, at most 128"):
        decode.attention_decode(q, k, k)
    positions = torch.arange(4, 20, device=DEVICE)[None]
    with pytest.raises(ValueError, match="256 rows, at most 128"):
        decode.attention_after_shared_prefix(q, k, k, k[0, :4], k[0, :4], positions)


# --- GPU, bf16, realistic shapes -----------------------------------------------------------------------------------


@gpu
@pytest.mark.gpu
def test_gpu_bf16_gqa_training_shape():
    compare(2, 1024, 1024, 16, 4, 128, dtype=torch.bfloat16)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("option", list(sweep.LAUNCH_OPTIONS))
@pytest.mark.parametrize("D", [64, 128, 256])
def test_gpu_bf16_launch_options(monkeypatch, D, option):
    """Each launch option w2s/kernels/sweep.py times (TMA loads in all three kernels; the persistent forward; the
    forward's P V products deferred; dq summed by the dk/dv kernel's atomic adds, the dq kernel not run) on the table
    tiles, forward and every gradient, at every head dim, with GQA, a window and ragged lengths."""
    for table, fields in sweep.LAUNCH_OPTIONS[option]:
        monkeypatch.setitem(table, D, table[D]._replace(**fields))
    compare(2, 1000, 1000, 16, 4, D, dtype=torch.bfloat16, sliding_window=300, kv_lengths=lengths(1000, 613))


@gpu
@pytest.mark.gpu
def test_gpu_bf16_head_dim_256_window_softcap_padding():
    compare(2, 1024, 1024, 8, 4, 256, dtype=torch.bfloat16, sliding_window=256, softcap=50.0,
            kv_lengths=lengths(1024, 700))


@gpu
@pytest.mark.gpu
def test_gpu_bf16_head_dim_64_ragged_length_window_padding():
    # Head dim 64 with a length that is no block multiple (1000 = 7 x 128 + 104) and Mistral's sliding window.
    compare(2, 1000, 1000, 16, 4, 64, dtype=torch.bfloat16, sliding_window=300, kv_lengths=lengths(1000, 613))


@gpu
@pytest.mark.gpu
def test_gpu_bf16_head_dim_128_explicit_positions_ragged():
    # Prefill continuing a cache (S != T, explicit positions) at a realistic size: the HAS_POS backward on GPU.
    positions = torch.stack([torch.arange(300, 1077), torch.arange(0, 777)]).to(DEVICE)
    compare(2, 777, 1077, 32, 8, 128, dtype=torch.bfloat16, q_positions=positions, kv_lengths=lengths(1077, 777))


@gpu
@pytest.mark.gpu
def test_gpu_bf16_decode_long_cache():
    B, S, H, K, D = 4, 4096, 32, 8, 128
    seed, q, k, v = random_qkv(B, 1, S, H, K, D, torch.bfloat16)
    positions = torch.tensor([[4095], [100], [2048], [0]], device=DEVICE)
    args = dict(q_positions=positions, kv_lengths=positions[:, 0] + 1)
    with torch.no_grad():
        assert ops.use_decode_kernel(q, k, v)
        out = decode.attention_decode(q, k, v, **args)
    check_output(out, q, k, v, seed, **args)


@gpu
@pytest.mark.gpu
def test_gpu_bf16_cascade_decode_long_shared_prefix():
    B, S, P, H, K, D = 64, 1400, 1024, 32, 8, 128  # ICL-shaped: 1024 shared tokens, rows at different depths
    start = torch.randint(P, S, (B,)).tolist()
    seed, q, k, v, prefix_k, prefix_v, positions = shared_prefix_case(B, 1, S, P, H, K, D, torch.bfloat16, start)
    with torch.no_grad():
        out = decode.attention_after_shared_prefix(q, k, v, prefix_k, prefix_v, positions)
    check_output(out, q, k, v, seed, q_positions=positions)


@gpu
@pytest.mark.gpu
def test_gpu_bf16_prompt_cascade_at_the_batch_sampling_heads():
    """The per-prompt cascade at Llama-3-8B's heads (32 / 8, D 128): 16 prompts x 8 samples of 128 shared keys,
    rows at positions 128-383, against the reference."""
    B, n, S, P, H, K, D = 128, 8, 384, 128, 32, 8, 128
    seed, q, k, v = random_qkv(B, 1, S, H, K, D, torch.bfloat16)
    first = torch.arange(B, device=DEVICE) // n * n
    k[:, :P], v[:, :P] = k[first, :P], v[first, :P]
    positions = torch.randint(P, S, (B, 1), device=DEVICE)
    with torch.no_grad():
        out = decode.attention_after_prompt_groups(q, k, v, positions, sweep.prompt_groups(B, n, P, DEVICE))
    check_output(out, q, k, v, seed, q_positions=positions)


# --- the switch and the sampler on the Triton path -------------------------------------------------------------


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU: the interpreter and a lowered cascade threshold")
@pytest.mark.parametrize("options", [{}, {"sliding_window": 12, "attn_logit_softcap": 5.0}], ids=["llama", "window"])
def test_sampler_decodes_through_the_triton_cascade(monkeypatch, options):
    """w2s.generate with W2S_KERNELS=triton and a 16-token shared prefix: decode takes the cascade path (ops ->
    decode_attention.attention_after_shared_prefix) and gives the reference backend's greedy tokens; with the prefix
    not shared it takes the plain decode kernel over the strided (head-major) cache and gives them too."""
    from w2s.config import ModelConfig
    from w2s.model import Transformer
    from w2s.sampling import generate

    cfg = ModelConfig(family="llama", vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                      hidden_dim=48, **options)
    model = Transformer(cfg).init_weights(std=0.2, generator=torch.Generator().manual_seed(0)).eval()
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(3, 61, (16,), generator=g).tolist()
    prompts = [prefix + torch.randint(3, 61, (n,), generator=g).tolist() for n in (2, 5, 1)]
    calls = []
    cascade = decode.attention_after_shared_prefix
    monkeypatch.setattr(decode, "attention_after_shared_prefix", lambda *a, **k: calls.append(1) or cascade(*a, **k))
    monkeypatch.setattr(ops, "CASCADE_MIN_PREFIX", 16)
    outs = {}
    for backend in ("triton", "reference"):
        monkeypatch.setattr(ops, "_backend", backend)
        outs[backend] = generate(model, None, prompts, max_new_tokens=6, max_batch=3, progress=False)
    assert outs["triton"] == outs["reference"]
    # 6 tokens: the first from the prefill, then at least 5 decode steps (the engine steps in blocks), every layer
    assert len(calls) >= 5 * cfg.n_layers and len(calls) % cfg.n_layers == 0
    n_cascade, decode_calls = len(calls), []
    plain = decode.attention_decode
    monkeypatch.setattr(decode, "attention_decode", lambda *a, **k: decode_calls.append(1) or plain(*a, **k))
    monkeypatch.setattr(ops, "_backend", "triton")
    unshared = generate(model, None, prompts, max_new_tokens=6, max_batch=3, progress=False, shared_prefix=False)
    assert unshared == outs["reference"]
    assert len(calls) == n_cascade and len(decode_calls) >= 5 * cfg.n_layers  # plain decode kernel, no cascade


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU: the interpreter and a lowered cascade threshold")
def test_sampler_chunked_prefill_through_the_triton_decode_kernel(monkeypatch):
    """Chunked prefill on the Triton path: 5 prompts through 2 slots, prompt tokens riding in the decode steps (3
    per step) read their cache rows through the decode kernel's kv_rows, inside the cascade over the 16-token shared
    prefix; the samples equal the reference backend's with a prefill forward of their own."""
    from w2s.config import ModelConfig
    from w2s.model import Transformer
    from w2s.sampling import generate

    cfg = ModelConfig(family="llama", vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                      hidden_dim=48, eos_token_id=[5, 9, 17, 30])
    model = Transformer(cfg).init_weights(std=0.2, generator=torch.Generator().manual_seed(0)).eval()
    g = torch.Generator().manual_seed(2)
    prefix = torch.randint(3, 61, (16,), generator=g).tolist()
    prompts = [prefix + torch.randint(3, 61, (n,), generator=g).tolist() for n in (2, 7, 1, 4, 5)]
    rows_seen = []
    cascade = decode.attention_after_shared_prefix
    monkeypatch.setattr(decode, "attention_after_shared_prefix",
                        lambda *a, **k: rows_seen.append(k.get("kv_rows") is not None) or cascade(*a, **k))
    monkeypatch.setattr(ops, "CASCADE_MIN_PREFIX", 16)
    kw = dict(n=2, temperature=1.0, seed=4, max_new_tokens=6, max_batch=2, sync_every=2, progress=False)
    monkeypatch.setattr(ops, "_backend", "reference")
    expected = generate(model, None, prompts, **kw)
    monkeypatch.setattr(ops, "_backend", "triton")
    assert generate(model, None, prompts, prefill_chunk=3, **kw) == expected
    assert any(rows_seen) and not all(rows_seen)  # mixed steps read through kv_rows, plain steps do not


def samples_of_prompts_case():
    """A tiny random Llama (4 query / 2 kv heads, 4 EOS ids) and 4 prompts of 20-40 tokens that share their first
    16: the sampler's workload for the ways of reading a prompt's keys once."""
    from w2s.config import ModelConfig
    from w2s.model import Transformer

    cfg = ModelConfig(family="llama", vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                      hidden_dim=48, eos_token_id=[5, 9, 17, 30])
    model = Transformer(cfg).init_weights(std=0.2, generator=torch.Generator().manual_seed(0)).eval()
    g = torch.Generator().manual_seed(2)
    prefix = torch.randint(3, 61, (16,), generator=g).tolist()
    return model, [prefix + torch.randint(3, 61, (n,), generator=g).tolist() for n in (4, 24, 10, 18)]


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU: the interpreter's block of 16 keys")
@pytest.mark.parametrize("shared_prefix", [False, True], ids=["decode", "cascade"])
def test_sampler_reads_a_prompts_keys_from_one_sample_through_the_triton_decode_kernel(monkeypatch, shared_prefix):
    """share_prompt_reads on the Triton path: 4 prompts of 20-40 tokens x 3 samples through 5 slots, EOS ending
    some early so that slots are refilled; the decode steps give the decode kernel the table of named rows, some
    rows name a sibling over at least one whole 16-key block, and the samples equal those of the run without it
    (the keys read from a sibling are bitwise the row's own), plain and inside the cascade over a 16-token shared
    prefix."""
    from w2s.sampling import generate

    model, prompts = samples_of_prompts_case()
    tables = []
    real = decode._decode
    monkeypatch.setattr(decode, "_decode", lambda *a, **k: tables.append(k.get("row_prefix")) or real(*a, **k))
    monkeypatch.setattr(ops, "CASCADE_MIN_PREFIX", 16 if shared_prefix else 10**9)
    monkeypatch.setattr(ops, "_backend", "triton")
    kw = dict(n=3, temperature=1.0, seed=5, max_new_tokens=8, max_batch=5, sync_every=2, progress=False)
    shared = generate(model, None, prompts, share_prompt_reads=True, **kw)
    named = [(rows != torch.arange(len(rows))) & (lens >= 16) for rows, lens in (t for t in tables if t is not None)]
    assert any(bool(n.any()) for n in named)  # (prefill forwards that reach the decode kernel get no table)
    tables.clear()
    assert shared == generate(model, None, prompts, **kw)
    assert tables and all(t is None for t in tables)


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU: the interpreter's block of 16 keys")
@pytest.mark.parametrize("shared_prefix, chunk", [(False, 0), (True, 0), (False, 6)],
                         ids=["decode", "over-a-shared-prefix", "chunked-prefill"])
def test_sampler_reads_a_prompts_keys_once_through_the_prompt_cascade(monkeypatch, shared_prefix, chunk):
    """prompt_cascade on the Triton path: 4 prompts of 20-40 tokens x 3 samples through 5 slots, EOS ending some
    early so that slots are refilled; every plain decode step goes through attention_after_prompt_groups, and the
    samples equal those of the run without it, also when the prompts share a 16-token prefix (which the groups then
    read with the rest of each prompt, in place of the shared-prefix cascade) and with chunked prefill (refilled
    slots' prompts run 6 tokens a step inside mixed steps, which read each row's keys through kv_rows; a late sample
    runs its prompt's last token again, so its group covers the prompt less that position)."""
    from w2s.sampling import generate

    model, prompts = samples_of_prompts_case()
    calls = []
    real = decode.attention_after_prompt_groups
    monkeypatch.setattr(decode, "attention_after_prompt_groups", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(ops, "CASCADE_MIN_PREFIX", 16 if shared_prefix else 10**9)
    monkeypatch.setattr(ops, "_backend", "triton")
    kw = dict(n=3, temperature=1.0, seed=5, max_new_tokens=8, max_batch=5, sync_every=2, prefill_chunk=chunk,
              progress=False)
    cascaded = generate(model, None, prompts, prompt_cascade=True, **kw)
    assert len(calls) >= 2 * 4  # 2 layers a step, several steps
    calls.clear()
    assert cascaded == generate(model, None, prompts, **kw)
    assert not calls


def test_ops_gathers_the_cache_rows_for_the_flash_kernel(monkeypatch):
    """kv_rows on Triton where the decode kernel does not serve (17 query tokens): the flash kernel, which has no
    kv_rows, gets each batch row's cache row k[kv_rows], v[kv_rows]. Kernel stubbed: only the routing runs."""
    monkeypatch.setattr(ops, "_backend", "triton")
    seen = {}
    monkeypatch.setattr(flash, "attention", lambda q, k, v, **kw: seen.update(k=k, v=v, **kw) or "flash")
    q = torch.zeros(2, 17, 4, 16, device=DEVICE)
    k, v = torch.randn(3, 40, 2, 16, device=DEVICE), torch.randn(3, 40, 2, 16, device=DEVICE)
    kv_rows = torch.tensor([2, 0], device=DEVICE)
    positions = torch.arange(17, device=DEVICE).expand(2, 17) + 20
    with torch.no_grad():
        assert ops.attention(q, k, v, q_positions=positions, kv_rows=kv_rows) == "flash"
    assert torch.equal(seen["k"], torch.stack([k[2], k[0]])) and torch.equal(seen["v"], torch.stack([v[2], v[0]]))
