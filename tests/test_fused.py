"""Fused q/k/v and gate/up projections (w2s/fused.py) on CPU, fp32: the fused model computes the unfused model's
logits (tight) and greedy tokens for every family and with biases; fusing keeps parameters, names, state dict and
HF export; in-place weight updates reach the fused matmul; LoRA, FSDP2, a dtype change and gradients all take the
separate layers, as before fusion. Tensor parallel with fused projections: tests/test_sampling_dist.py.

    python -m pytest -q tests/test_fused.py
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # the Triton-path test below runs the kernels in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hf_tiny import FAMILIES, VOCAB, right_padded_batch, save_hf, save_llama_with_biases  # noqa: E402

import w2s  # noqa: E402
from w2s.fused import fuse_projections, is_fused, project, unfuse_projections  # noqa: E402
from w2s.sampling import generate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TIGHT = dict(atol=1e-5, rtol=1e-5)  # fp32: the same dot products, blocked differently by the BLAS


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """name -> checkpoint dir: every family, and a Llama with q/k/v/o and MLP biases."""
    base = tmp_path_factory.mktemp("fused")
    out = {}
    for family in FAMILIES:
        save_hf(family, base / family)
        out[family] = base / family
    save_llama_with_biases(base / "llama_bias")
    out["llama_bias"] = base / "llama_bias"
    return out


def load(path):
    return w2s.load_model(path, dtype=torch.float32).eval()


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens)


@pytest.mark.parametrize("name", list(FAMILIES) + ["llama_bias"])
def test_fused_logits_and_greedy_tokens_equal_unfused(name, ckpts):
    """Logits of a right-padded batch (no cache) and of the sampler's prefill + decode (greedy, ragged prompts, a
    shared prefix, continuous batching): fused == unfused. Parameters and state dict are untouched by fusing."""
    model = load(ckpts[name])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tokens, _ = right_padded_batch([12, 7, 1])
    g = torch.Generator().manual_seed(3)
    prompts = [[1, 40, 41] + torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (4, 9, 1)]
    options = dict(max_new_tokens=10, max_batch=2, progress=False)
    ref_logits, ref_tokens = logits(model, tokens), generate(model, None, prompts, fused_projections=False, **options)
    n_params = len(list(model.parameters()))

    assert fuse_projections(model) == 2 * model.cfg.n_layers
    assert fuse_projections(model) == 0  # idempotent
    for block in model.layers:
        assert is_fused(block.self_attn) and is_fused(block.mlp)
        fused = block.self_attn.__dict__["_fused"]  # q, k, v weights are rows of the one fused weight
        assert block.self_attn.q_proj.weight.data_ptr() == fused.weight.data_ptr()
        assert block.self_attn.v_proj.weight.data_ptr() == fused.weight[-fused.sizes[-1]:].data_ptr()
    assert len(list(model.parameters())) == n_params
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    torch.testing.assert_close(logits(model, tokens), ref_logits, **TIGHT)
    assert generate(model, None, prompts, fused_projections=True, **options) == ref_tokens


def test_down_projection_takes_the_residual_add_into_its_matmul_while_fused(ckpts, monkeypatch):
    """While the MLP is fused and nothing wants a gradient, its down projection and the residual add are one in-place
    addmm_: residual + h W^T to fp32 rounding, written over the residual stream it was handed. The layer and an add
    (the unfused block's ops, the stream left as it was) serve otherwise: an MLP not fused, a layer with a bias, a
    layer with a hook (tensor parallel's all-reduce must see the projection alone), gradients wanted."""
    calls = []
    addmm_ = torch.Tensor.addmm_
    monkeypatch.setattr(torch.Tensor, "addmm_", lambda *a, **kw: calls.append(1) or addmm_(*a, **kw))
    g = torch.Generator().manual_seed(0)

    def mlp_with_residual(mlp, h, residual):
        """(output, whether it was written over the residual, whether the residual was left as it was)"""
        stream = residual.clone()
        out = mlp(h, residual=stream)
        return out, out.data_ptr() == stream.data_ptr(), torch.equal(stream, residual)

    for name, fused_calls in (("llama2", 1), ("llama_bias", 0)):
        model = load(ckpts[name])
        mlp = model.layers[0].mlp
        h, residual = (torch.randn(2, 3, model.cfg.dim, generator=g) for _ in range(2))
        with torch.no_grad():
            expected = residual + mlp(h)
            out, in_place, untouched = mlp_with_residual(mlp, h, residual)
            assert torch.equal(out, expected) and not in_place and untouched and not calls
            fuse_projections(model)
            out, in_place, untouched = mlp_with_residual(mlp, h, residual)
            torch.testing.assert_close(out, expected, **TIGHT)
            assert (len(calls), in_place, untouched) == (fused_calls, fused_calls == 1, fused_calls == 0), name
            calls.clear()
    model = load(ckpts["llama2"])
    fuse_projections(model)
    mlp = model.layers[0].mlp
    with torch.no_grad():
        plain = mlp(h)
        handle = mlp.down_proj.register_forward_hook(lambda module, args, out: 2 * out)
        out, in_place, untouched = mlp_with_residual(mlp, h, residual)
        assert torch.equal(out, residual + 2 * plain) and untouched and not calls
        handle.remove()
        strided = residual.transpose(0, 1).contiguous().transpose(0, 1)  # the same values, not contiguous
        out, in_place, untouched = mlp_with_residual(mlp, h, strided)
        assert torch.equal(out, strided + plain) and untouched and not calls
    out, in_place, untouched = mlp_with_residual(mlp, h, residual)  # gradients wanted
    assert torch.equal(out, residual + mlp(h)) and untouched and not calls


def test_fused_project_is_one_matmul_over_the_concatenated_weights(ckpts):
    """Independent of the model: the fused call is F.linear over [Wq; Wk; Wv] (one call), split by output size."""
    model = load(ckpts["llama_bias"])
    fuse_projections(model)
    attn = model.layers[0].self_attn
    x = torch.randn(2, 3, model.cfg.dim)
    calls = []
    real = torch.nn.functional.linear
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "linear", lambda *a: calls.append(a[1].shape) or real(*a))
        q, k, v = project(attn, x, ("q_proj", "k_proj", "v_proj"))
    assert len(calls) == 1
    for out, layer in zip((q, k, v), (attn.q_proj, attn.k_proj, attn.v_proj)):
        torch.testing.assert_close(out, x @ layer.weight.T + layer.bias, **TIGHT)


def test_in_place_weight_updates_reach_the_fused_matmul(ckpts):
    """An optimizer step or load_state_dict writes the parameters in place: the fused weight is the same memory."""
    model, ref = load(ckpts["llama2"]), load(ckpts["llama2"])
    fuse_projections(model)
    with torch.no_grad():
        for m in (model, ref):
            m.layers[0].self_attn.k_proj.weight.mul_(1.5)
            m.layers[1].mlp.up_proj.weight.add_(0.01)
    tokens, _ = right_padded_batch([6, 3])
    assert is_fused(model.layers[0].self_attn)
    torch.testing.assert_close(logits(model, tokens), logits(ref, tokens), **TIGHT)
    model.load_state_dict(load(ckpts["llama2"]).state_dict())  # back to the checkpoint's weights, in place
    assert is_fused(model.layers[1].mlp)
    torch.testing.assert_close(logits(model, tokens), logits(load(ckpts["llama2"]), tokens), **TIGHT)


def test_gradients_lora_and_dtype_changes_take_the_separate_layers(ckpts):
    """A weight gradient needs the separate layers (the fused tensor is no parameter): grads equal the unfused
    model's. LoRA injection replaces the layers and model.to(dtype) the weights: the fused view is dropped and the
    outputs are those of a never-fused model treated the same way."""
    from w2s.lora import inject_lora

    tokens, _ = right_padded_batch([6, 3])
    model, ref = load(ckpts["llama2"]), load(ckpts["llama2"])
    fuse_projections(model)
    for m in (model, ref):
        m(tokens).logsumexp(-1).sum().backward()
    for (name, p), r in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, r.grad, **TIGHT, msg=name)
    assert is_fused(model.layers[0].self_attn)  # still there for inference

    for m in (model, ref):
        inject_lora(m, rank=2, alpha=4, seed=0)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith("lora_B"):
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    torch.testing.assert_close(logits(model, tokens), logits(ref, tokens), **TIGHT)
    assert not any("_fused" in m.__dict__ for m in model.modules())  # stale views were dropped

    model, ref = load(ckpts["gemma"]), load(ckpts["gemma"])
    fuse_projections(model)
    model, ref = model.double(), ref.double()
    torch.testing.assert_close(logits(model, tokens), logits(ref, tokens), atol=1e-10, rtol=1e-10)
    assert not is_fused(model.layers[0].mlp)


def test_fusing_under_inference_mode_leaves_trainable_parameters(ckpts):
    """A caller that samples under torch.inference_mode: the fused views are ordinary tensors, so the model still
    trains afterwards (inference tensors cannot be saved for backward)."""
    model = load(ckpts["llama2"])
    with torch.inference_mode():
        fuse_projections(model)
    assert not any(p.is_inference() for p in model.parameters())
    tokens, _ = right_padded_batch([5, 2])
    model(tokens).sum().backward()
    assert model.layers[0].self_attn.k_proj.weight.grad is not None


def test_fused_model_exports_and_unfuses(ckpts, tmp_path):
    """save_model of a fused model writes the checkpoint format unchanged (transformers-loadable, same tensors);
    unfuse_projections gives every parameter its own storage back."""
    model = load(ckpts["gemma2"])
    fuse_projections(model)
    w2s.save_model(model, tmp_path / "out", max_shard_bytes=30_000)
    again = load(tmp_path / "out")
    state = model.state_dict()
    assert all(torch.equal(t, state[k]) for k, t in again.state_dict().items())
    unfuse_projections(model)
    attn = model.layers[0].self_attn
    assert not is_fused(attn) and attn.q_proj.weight.data_ptr() != attn.k_proj.weight.untyped_storage().data_ptr()
    assert attn.q_proj.weight.untyped_storage().nbytes() == attn.q_proj.weight.numel() * 4


def test_fsdp2_training_of_a_fused_model_equals_unfused(ckpts, tmp_path):
    """FSDP2 (one gloo rank) shards the parameters of a model fused earlier: its forward and backward run on the
    separate layers and give the unfused model's loss and gradients; under no_grad too (the fused view is stale).
    Fusing the sharded model again leaves it as it is."""
    script = textwrap.dedent(f"""
        import torch, torch.distributed as dist
        import w2s
        from w2s.fused import fuse_projections
        from w2s.parallel import Dist, full_tensor, shard_model
        from hf_tiny import right_padded_batch
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        model, ref = (w2s.load_model({str(ckpts['llama2'])!r}, dtype=torch.float32) for _ in range(2))
        fuse_projections(model)
        shard_model(model, model.layers, Dist(0, 1, torch.device("cpu"), True), bf16=False)
        assert fuse_projections(model) == 0  # DTensor shards are never concatenated into a fused view
        tokens, _ = right_padded_batch([6, 3])
        losses = [m(tokens).logsumexp(-1).sum() for m in (model, ref)]
        for loss in losses:
            loss.backward()
        torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
        for (name, p), r in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(full_tensor(p.grad), r.grad, atol=1e-5, rtol=1e-5, msg=name)
        with torch.no_grad():
            torch.testing.assert_close(model(tokens), ref(tokens), atol=1e-5, rtol=1e-5)
        dist.destroy_process_group()
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_sampler_on_the_triton_path_with_fused_projections(family, monkeypatch):
    """The CUDA decode path on CPU (W2S_KERNELS=triton, interpreter): fused q/k/v and gate/up, RoPE + cache write as
    one kernel (prefill into scattered rows, decode into every slot), the GLU reading the fused halves in place.
    Greedy tokens equal the reference backend's on the unfused model."""
    from w2s import ops
    from w2s.config import ModelConfig
    from w2s.kernels import glu, rope_cache
    from w2s.model import Transformer

    shape = dict(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=48)
    if family == "gemma":  # MQA, head dim 32, GeGLU
        shape.update(n_kv_heads=1, head_dim=32, activation="gelu_pytorch_tanh")
    cfg = ModelConfig(family=family, **shape)
    model = Transformer(cfg).init_weights(std=0.2, generator=torch.Generator().manual_seed(0)).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 61, (n,), generator=g).tolist() for n in (3, 7, 1, 5)]
    options = dict(max_new_tokens=6, max_batch=3, n=1, progress=False)
    monkeypatch.setattr(ops, "_backend", "reference")
    expected = generate(model, None, prompts, fused_projections=False, **options)
    calls = {"rope_cache": 0, "glu_rows": 0}
    real_write, real_glu = rope_cache.rope_cache_write, glu._glu_fwd_rows_kernel
    monkeypatch.setattr(rope_cache, "rope_cache_write",
                        lambda *a: calls.__setitem__("rope_cache", calls["rope_cache"] + 1) or real_write(*a))

    class CountingRows:  # the row kernel's launches (kernel[grid](...))
        def __getitem__(self, grid):
            calls["glu_rows"] += 1
            return real_glu[grid]

    monkeypatch.setattr(glu, "_glu_fwd_rows_kernel", CountingRows())
    monkeypatch.setattr(ops, "_backend", "triton")
    assert generate(model, None, prompts, fused_projections=True, **options) == expected
    assert all(is_fused(b.self_attn) and is_fused(b.mlp) for b in model.layers)
    assert calls["rope_cache"] >= 5 * cfg.n_layers and calls["glu_rows"] >= 5 * cfg.n_layers


@pytest.mark.parametrize("temperature, draw, triton_matvec", [
    (0.0, ["argmax"], True), (1.0, ["triton:_uniforms_kernel", "triton:_sample_kernel"], True),
    (0.0, ["argmax"], False)])
def test_a_batch1_decode_step_launches_these_kernels(monkeypatch, temperature, draw, triton_matvec):
    """The CUDA path's batch-1 decode step, launch by launch (fp16, Triton under the interpreter, fused projections,
    one key split): per layer the norm, the q/k/v matmul, RoPE + cache write, attention, the o matmul, the residual
    add with the MLP's norm, the gate/up matmul, the GLU, the down matmul with the residual add in it; then the
    final norm, the logits, the draw (greedy: an argmax and no uniforms; sampling: the step's uniforms in one
    kernel, the draw in another) and the step's bookkeeping on device. At batch 1 each launch costs a few
    microseconds that hardly depend on its work, so one more here should be deliberate.

    Every matmul of the step has one activation row, so each is one launch of the matrix-vector kernel: the same
    count as the torch matmuls it replaces, mm and (the down projection into the residual) addmm_, which run with
    ops.TRITON_MATVEC off. On CUDA those torch matmuls may also launch cuBLAS's split-K reduction kernels, which this
    counter does not see (the matvec never splits K)."""
    from launches import LaunchCounter

    from w2s import ops
    from w2s.config import ModelConfig
    from w2s.kernels import decode_attention
    from w2s.model import Transformer
    from w2s.sampling import make_engine

    cfg = ModelConfig(family="llama", vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                      hidden_dim=48)
    model = Transformer(cfg).init_weights(std=0.2, generator=torch.Generator().manual_seed(0)).eval().half()
    monkeypatch.setattr(ops, "_backend", "triton")
    monkeypatch.setattr(ops, "TRITON_MATVEC", triton_matvec)
    monkeypatch.setattr(decode_attention, "_num_splits", lambda batch_heads, S, block_n, device: 1)
    engine = make_engine(model, None, [[5, 6, 7]], max_new_tokens=3, fused_projections=True, temperature=temperature)
    steps, real_step = [], engine._step_eager

    def counted_step(rows, mixed=False):
        with LaunchCounter(monkeypatch) as counter:
            real_step(rows, mixed)
        steps.append(counter.launches)

    engine._step_eager = counted_step
    list(engine.run())
    matmul, add_matmul = ("triton:_matvec_kernel",) * 2 if triton_matvec else ("mm", "addmm_")
    layer = ["triton:_rms_norm_fwd_kernel", matmul, "triton:_rope_cache_kernel", "triton:_attn_decode_kernel", matmul,
             "triton:_rms_norm_fwd_kernel", matmul, "triton:_glu_fwd_kernel", add_matmul]
    logits = ["triton:_rms_norm_fwd_kernel", matmul]
    bookkeeping = ["bitwise_not", *draw, "where", "scatter_", "add_", "where", "add_",  # token, counters
                   "eq", "any", "ge", "bitwise_or", "logical_or_"]  # done: EOS or budget
    assert steps[1] == ["embedding"] + layer * cfg.n_layers + logits + bookkeeping


def separate(layer, x):
    """The projection by hand: x W^T (+ b)."""
    return x @ layer.weight.T + (0 if layer.bias is None else layer.bias)


def test_bias_updates_in_place_or_out_of_place_reach_the_projections(ckpts):
    """An in-place bias update (optimizer step) is one of the fused bias; a bias given new storage (a .data
    assignment) makes the fused view stale, and the next fuse_projections fuses that module again. Either way the
    projections are x W^T + b with the bias as it now is; unfusing gives each bias its own storage."""
    from w2s.fused import QKV

    model = load(ckpts["llama_bias"])
    fuse_projections(model)
    attn = model.layers[0].self_attn
    x = torch.randn(2, 3, model.cfg.dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        attn.q_proj.bias.add_(1.0)
        assert is_fused(attn)
        for out, name in zip(project(attn, x, QKV), QKV):
            torch.testing.assert_close(out, separate(getattr(attn, name), x), **TIGHT)
        attn.k_proj.bias.data = attn.k_proj.bias.data + 2.0
        assert not is_fused(attn)
        assert fuse_projections(model) == 1 and is_fused(attn)  # fused again over the new bias
        for out, name in zip(project(attn, x, QKV), QKV):
            torch.testing.assert_close(out, separate(getattr(attn, name), x), **TIGHT)
    unfuse_projections(model)
    bias = model.layers[1].self_attn.v_proj.bias
    assert bias.untyped_storage().nbytes() == bias.numel() * bias.element_size()


def test_a_bias_added_or_removed_after_fusing_reaches_the_projections(ckpts):
    """A bias set on a layer fused without one, or a fused bias set to None: the fused rows no longer match the layers,
    so the separate layers serve: x W^T + b with the bias as it now is (no AttributeError on the removed one)."""
    from w2s.fused import QKV

    for ckpt, name in (("llama2", "q_proj"), ("llama_bias", "v_proj")):
        model = load(ckpts[ckpt])
        x = torch.randn(2, 3, model.cfg.dim, generator=torch.Generator().manual_seed(0))
        fuse_projections(model)
        attn = model.layers[0].self_attn
        layer = getattr(attn, name)
        added = torch.randn(layer.out_features, generator=torch.Generator().manual_seed(1))
        layer.bias = None if layer.bias is not None else torch.nn.Parameter(added)
        assert not is_fused(attn)
        with torch.no_grad():
            for out, n in zip(project(attn, x, QKV), QKV):
                torch.testing.assert_close(out, separate(getattr(attn, n), x), **TIGHT)


def test_trainable_biases_of_frozen_weights_get_their_gradients_while_fused(ckpts):
    """Only the biases train (weights frozen): the fused matmul would hand them no gradient, so the separate layers
    serve, and each bias gets the upstream gradient summed over the tokens."""
    from w2s.fused import QKV

    model = load(ckpts["llama_bias"])
    fuse_projections(model)
    attn = model.layers[0].self_attn
    for name in QKV:
        getattr(attn, name).weight.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, model.cfg.dim, generator=g)
    outs = project(attn, x, QKV)
    upstream = [torch.randn(out.shape, generator=g) for out in outs]
    sum((out * u).sum() for out, u in zip(outs, upstream)).backward()
    for name, u in zip(QKV, upstream):
        torch.testing.assert_close(getattr(attn, name).bias.grad, u.sum((0, 1)), **TIGHT, msg=name)


@pytest.mark.parametrize("kind", ["forward", "forward_pre"])
def test_a_hook_on_one_fused_layer_is_called_and_changes_its_projection(kind, ckpts):
    """A forward hook or pre-hook on k_proj (tensor parallel's, a probe's) must run: the fused matmul would skip it."""
    from w2s.fused import QKV

    model = load(ckpts["llama2"])
    fuse_projections(model)
    attn = model.layers[0].self_attn
    if kind == "forward":
        attn.k_proj.register_forward_hook(lambda module, args, out: 2 * out)
    else:
        attn.k_proj.register_forward_pre_hook(lambda module, args: (3 * args[0],))
    x = torch.randn(2, 3, model.cfg.dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        q, k, v = project(attn, x, QKV)
    assert not is_fused(attn)
    expected_k = 2 * separate(attn.k_proj, x) if kind == "forward" else separate(attn.k_proj, 3 * x)
    torch.testing.assert_close(k, expected_k, **TIGHT)
    torch.testing.assert_close(q, separate(attn.q_proj, x), **TIGHT)


def test_o_projection_runs_outside_its_layer_only_when_plain_unhooked_and_without_gradients(ckpts, monkeypatch):
    """fused.linear, the attention's o projection: ops.linear on the layer's weight and bias (the matrix-vector kernel
    for one row on Triton: batch-1 decode) while the layer is a plain, unhooked nn.Linear and nothing wants a
    gradient; else the layer itself: a forward hook (tensor parallelism's all-reduce) must see the projection, LoRA's
    layer adds its update, and a training step's autograd runs through the module as before."""
    from w2s import ops
    from w2s.fused import linear
    from w2s.lora import inject_lora

    calls = []
    real = ops.linear
    monkeypatch.setattr(ops, "linear", lambda *a: calls.append(a[1].shape) or real(*a))
    model = load(ckpts["llama_bias"])  # o_proj with a bias
    attn = model.layers[0].self_attn
    x = torch.randn(1, 1, attn.o_proj.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(linear(attn, "o_proj", x), attn.o_proj(x)) and len(calls) == 1
        handle = attn.o_proj.register_forward_hook(lambda module, args, out: 2 * out)
        assert torch.equal(linear(attn, "o_proj", x), 2 * separate(attn.o_proj, x)) and len(calls) == 1
        handle.remove()
    out = linear(attn, "o_proj", x)  # gradients wanted: the layer
    assert out.grad_fn is not None and len(calls) == 1
    inject_lora(model, rank=2, alpha=4, seed=0)
    with torch.no_grad():
        attn.o_proj.lora_B.fill_(0.5)
        assert torch.equal(linear(attn, "o_proj", x), attn.o_proj(x)) and len(calls) == 1
        assert not torch.equal(attn.o_proj(x), separate(attn.o_proj, x))  # the update is in


def test_layers_of_mixed_dtypes_or_with_only_some_biases_stay_separate(ckpts):
    """q/k/v are fused only with one dtype and biases on all or none: one k_proj in fp64 keeps its dtype, a bias on
    k_proj alone is still added (to k only)."""
    from w2s.fused import QKV

    model = load(ckpts["llama2"])
    mixed, partial = model.layers[0].self_attn, model.layers[1].self_attn
    mixed.k_proj.double()
    bias = torch.randn(partial.k_proj.out_features, generator=torch.Generator().manual_seed(1))
    partial.k_proj.bias = torch.nn.Parameter(bias)
    assert fuse_projections(model) == 2  # the two MLPs only
    assert not is_fused(mixed) and not is_fused(partial)
    assert (mixed.q_proj.weight.dtype, mixed.k_proj.weight.dtype) == (torch.float32, torch.float64)
    x = torch.randn(2, 3, model.cfg.dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for out, name in zip(project(partial, x, QKV), QKV):
            torch.testing.assert_close(out, separate(getattr(partial, name), x), **TIGHT)


def test_fusing_a_model_with_lora_layers_leaves_them_separate(ckpts):
    """LoRA layers (no nn.Linear) are never fused: the fused matmul over their base weights would drop the adapters
    (frozen base weights want no gradient, so it would serve even while the adapters train)."""
    from w2s.lora import inject_lora

    model = load(ckpts["llama2"])
    inject_lora(model, rank=2, alpha=4, seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    tokens, _ = right_padded_batch([6, 3])
    expected = logits(model, tokens)
    assert fuse_projections(model) == 0
    torch.testing.assert_close(logits(model, tokens), expected, atol=0, rtol=0)


def test_down_projection_over_a_residual_of_another_dtype_adds_out_of_place(ckpts):
    """A fp64 residual stream with the fp32 MLP fused: not the in-place addmm_ (one dtype only) but the add, promoted
    to fp64, of the SwiGLU MLP computed by hand; the stream is left as it was."""
    import torch.nn.functional as F

    model = load(ckpts["llama2"])
    fuse_projections(model)
    mlp = model.layers[0].mlp
    g = torch.Generator().manual_seed(0)
    h, residual = torch.randn(2, 3, model.cfg.dim, generator=g), torch.randn(2, 3, model.cfg.dim, generator=g).double()
    stream = residual.clone()
    with torch.no_grad():
        out = mlp(h, residual=stream)
        hidden = F.silu(h @ mlp.gate_proj.weight.T) * (h @ mlp.up_proj.weight.T)
        expected = residual + hidden @ mlp.down_proj.weight.T
    assert out.dtype == torch.float64 and torch.equal(stream, residual)
    torch.testing.assert_close(out, expected, **TIGHT)
