"""Convergence: a tiny Llama-shaped w2s Transformer trains the same on the Triton kernels as on the reference.

Per-kernel tests (tests/test_kernels.py, tests/test_kernel_attention.py) check one forward and one backward at a
time. This test checks that they compose: the same model, data and AdamW run twice, once with every hot op on the
Triton kernels (W2S_KERNELS=triton; on CPU under TRITON_INTERPRET=1, set below before triton is imported) and once
on w2s/kernels/reference.py. RMSNorm, RoPE, GQA flash attention, SwiGLU and the fused linear cross-entropy all sit in
the loop, so an error in any gradient shows up as a drift of the loss curve that grows with every step.

Checks: the first step's gradient of every parameter and the per-step losses agree to 1e-4 relative (fp32 on both
sides; the kernels differ from the reference only in summation order), and the loss goes down (the task is learnable
and learned).

Every launch of a Triton kernel under the interpreter runs its programs one by one in Python, so the model and
batch are as small as still meaningful (1 block, 16 tokens).

    python -m pytest -q tests/test_convergence.py     # 2 runs x 20 steps on CPU
"""

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import w2s.kernels.attention  # noqa: E402
import w2s.kernels.fused_linear  # noqa: E402
import w2s.kernels.glu  # noqa: E402
import w2s.kernels.rms_norm  # noqa: E402
import w2s.kernels.rope  # noqa: E402
from w2s import ops  # noqa: E402
from w2s.config import ModelConfig  # noqa: E402
from w2s.model import Transformer  # noqa: E402

IGNORE_INDEX = -100
STEPS = 20
REL_TOL = 1e-4
# Which Triton entry points the model reaches through w2s/ops.py: each must run in the Triton pass, none in the other.
KERNEL_ENTRY_POINTS = [(w2s.kernels.attention, "attention"), (w2s.kernels.rms_norm, "rms_norm"),
                       (w2s.kernels.rope, "rope"), (w2s.kernels.glu, "swiglu"),
                       (w2s.kernels.fused_linear, "linear_cross_entropy")]


def tiny_llama_config():
    # Llama-shaped: GQA (2 query heads share 1 kv head), SwiGLU, RMSNorm, RoPE, untied lm_head. One block already
    # puts every kernel's forward and every gradient in the loop (the embeddings learn through all of them).
    return ModelConfig(family="llama", vocab_size=48, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                       hidden_dim=64, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=64)


def counting_batch(vocab, B=2, T=8):
    """A fixed learnable task: each row counts up by a per-row stride mod (vocab - 1) from a per-row start.

    Rows are right-padded to T with token 0 (lengths 8 and 5), and pad targets are ignored, as in w2s's SFT batches.
    T = 8 is not a multiple of the interpreter's kernel blocks (16, 32), so the ragged block edges are in the loop.
    Returns tokens (B, T) and targets (B, T) (next token, IGNORE_INDEX past each row's end).
    """
    gen = torch.Generator().manual_seed(1234)
    lengths = [8, 5]
    tokens = torch.zeros(B, T, dtype=torch.long)
    targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for b, n in enumerate(lengths):
        start = int(torch.randint(1, vocab, (1,), generator=gen))
        stride = 1 + 2 * b
        row = 1 + (start + stride * torch.arange(n + 1)) % (vocab - 1)  # ids 1..vocab-1; 0 is the pad
        tokens[b, :n] = row[:n]
        targets[b, : n - 1] = row[1:n]
    return tokens, targets


def train_losses(backend, steps=STEPS):
    """Per-step mean token losses of a fresh seeded model trained on the fixed batch with `backend` kernels, and
    the first step's gradient of every parameter (name -> tensor)."""
    previous = ops.get_backend()
    ops.set_backend(backend)
    try:
        cfg = tiny_llama_config()
        torch.manual_seed(0)
        model = Transformer(cfg).init_weights(std=0.1, generator=torch.Generator().manual_seed(0)).to(DEVICE)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
        tokens, targets = (t.to(DEVICE) for t in counting_batch(cfg.vocab_size))
        losses, first_grads = [], None
        for _ in range(steps):
            hidden = model(tokens, return_hidden=True)  # (B, T, D)
            loss_sum, n_valid = ops.linear_cross_entropy(hidden.flatten(0, 1), model.lm_head_weight(),
                                                         targets.flatten(), ignore_index=IGNORE_INDEX)
            loss = loss_sum / n_valid
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if first_grads is None:
                first_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
            optimizer.step()
            losses.append(loss.item())
        return losses, first_grads
    finally:
        ops.set_backend(previous)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls into each Triton entry point (ops.py looks them up on the module at every call)."""
    calls = {name: 0 for _, name in KERNEL_ENTRY_POINTS}
    for module, name in KERNEL_ENTRY_POINTS:
        def counted(*args, _f=getattr(module, name), _name=name, **kwargs):
            calls[_name] += 1
            return _f(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)
    return calls


def test_triton_and_reference_training_curves_match(kernel_calls):
    reference, reference_grads = train_losses("reference")
    assert not any(kernel_calls.values()), f"the reference pass reached Triton: {kernel_calls}"
    triton, triton_grads = train_losses("triton")
    assert all(kernel_calls.values()), f"a hot op did not run on its Triton kernel: {kernel_calls}"
    # AdamW is blind to a gradient's overall scale, so the curves alone could hide a uniformly scaled gradient:
    # compare the first step's gradients of every parameter directly (relative to each one's largest entry).
    for name, expected in reference_grads.items():
        err = (triton_grads[name] - expected).abs().max().item() / expected.abs().max().item()
        assert err <= REL_TOL, f"step 0 gradient of {name}: max error {err:.2e} of its largest entry"
    worst = max(abs(t - r) / abs(r) for t, r in zip(triton, reference))
    steps = "\n".join(f"  step {i:2d}: triton {t:.7f} reference {r:.7f}" for i, (t, r) in
                      enumerate(zip(triton, reference)))
    assert worst <= REL_TOL, f"loss curves differ by {worst:.2e} relative (> {REL_TOL:.0e}):\n{steps}"
    # the task is learned: far below the ~ln(48) = 3.9 of the random start
    assert reference[-1] < 0.25 * reference[0], f"loss did not go down enough:\n{steps}"
