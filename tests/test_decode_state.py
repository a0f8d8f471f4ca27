"""The sampler's decode state kept across `generate` calls (w2s/decode_state.py): reused when shapes and weight
addresses match, with the outputs of a fresh state; kept exact when weights change in place; dropped when they
move or shapes change; never shared by two live engines; released on request or with the model. On CPU there are
no graphs, so this checks the cache logic; the GPU-marked test checks that graphs are captured once and replayed
with in-place weight changes.

    python -m pytest -q tests/test_decode_state.py
"""

import gc

import pytest
import torch
from hf_tiny import VOCAB, save_hf

import w2s
from w2s import decode_state
from w2s.sampling import CACHE_LEN_QUANTUM, generate, iter_generate

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    save_hf("llama2", path)
    return path


def load(ckpt, device="cpu"):
    return w2s.load_model(ckpt, dtype=torch.float32, device=device)


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[1, 9, 10] + torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


SAMPLED = dict(n=2, temperature=1.0, top_p=0.9, seed=4, max_new_tokens=9, max_batch=4, progress=False)


def test_kept_state_is_reused_and_gives_a_fresh_states_outputs(ckpt):
    """Two calls of the same shapes share one state (same KV cache tensors); both give exactly what a fresh state
    gives, greedy and sampled. Default cache lengths round up to CACHE_LEN_QUANTUM (not past the trained 256)."""
    model = load(ckpt)
    ps = prompts([4, 7, 2])
    fresh = generate(model, None, ps, **SAMPLED)
    assert decode_state.kept_state(model) is None  # CPU default: nothing kept
    first = generate(model, None, ps, keep_state=True, **SAMPLED)
    state = decode_state.kept_state(model)
    assert state is not None and state.cache.max_len == min(CACHE_LEN_QUANTUM, model.cfg.max_seq_len)
    cache_address = state.cache.k.data_ptr()
    second = generate(model, None, prompts([5, 1, 3], seed=1), keep_state=True, **SAMPLED)  # other prompts, same shapes
    third = generate(model, None, ps, keep_state=True, **SAMPLED)
    assert decode_state.kept_state(model) is state and state.cache.k.data_ptr() == cache_address
    assert first == third == fresh
    assert second == generate(model, None, prompts([5, 1, 3], seed=1), **SAMPLED)
    greedy = dict(n=2, max_new_tokens=9, max_batch=4, progress=False)  # 3 prompts x 2: the same 4 slots
    assert generate(model, None, ps, keep_state=True, **greedy) == generate(model, None, ps, **greedy)
    assert decode_state.kept_state(model) is state  # another signature (greedy): same buffers
    assert not state.in_use()


def test_whether_a_step_keeps_its_logits_is_part_of_the_graph_signature():
    """Whether the step copies its logits out is baked into a captured graph, so it is part of the signature that
    decides whether a kept state's graphs may be replayed."""
    args = ({"temperature": 1.0, "top_k": 0, "top_p": 1.0}, [2], 3)
    assert decode_state.graph_signature(*args, keep_logits=True) != decode_state.graph_signature(*args)
    assert decode_state.graph_signature(*args) == decode_state.graph_signature(*args, keep_logits=False)


def test_in_place_weight_change_keeps_the_state_and_is_seen(ckpt):
    """An in-place update (optimizer step, load_state_dict) leaves every address as it was: the state is reused and
    the completions are those of the updated model."""
    model = load(ckpt)
    ps = prompts([4, 7])
    before = generate(model, None, ps, keep_state=True, **SAMPLED)
    state = decode_state.kept_state(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.3)
    after = generate(model, None, ps, keep_state=True, **SAMPLED)
    assert decode_state.kept_state(model) is state
    assert after == generate(model, None, ps, **SAMPLED) != before


def test_moved_weights_or_other_shapes_replace_the_state(ckpt):
    """A parameter replaced by another tensor (LoRA, tensor-parallel slicing, model.to) or a call with more slots
    or a longer cache gets a new state, which replaces the old one (one per model)."""
    model = load(ckpt)
    ps = prompts([4, 7])
    generate(model, None, ps, keep_state=True, **SAMPLED)
    state = decode_state.kept_state(model)
    layer = model.layers[1].mlp.down_proj
    layer.weight = torch.nn.Parameter(layer.weight.detach() * 0.5)
    moved = generate(model, None, ps, keep_state=True, **SAMPLED)
    assert decode_state.kept_state(model) is not state
    assert moved == generate(model, None, ps, **SAMPLED)
    state = decode_state.kept_state(model)
    generate(model, None, ps, keep_state=True, **{**SAMPLED, "max_batch": 3})  # 3 slots instead of 4
    assert decode_state.kept_state(model) is not state
    state = decode_state.kept_state(model)
    generate(model, None, ps, keep_state=True, cache_len=40, **SAMPLED)
    assert decode_state.kept_state(model) is not state and decode_state.kept_state(model).cache.max_len == 40


def test_two_live_engines_never_share_a_state(ckpt):
    """Interleaved generators on one model (nested iter_generate): the second gets a state of its own; both give a
    fresh run's completions."""
    model = load(ckpt)
    a, b = prompts([4, 7], seed=2), prompts([3, 5], seed=3)
    opts = {k: v for k, v in SAMPLED.items() if k != "progress"}
    first = iter_generate(model, None, a, keep_state=True, cache_len=30, **opts)
    got_a = [next(first)]
    got_b = dict(iter_generate(model, None, b, keep_state=True, cache_len=30, **opts))
    got_a += list(first)
    assert dict(got_a) == dict(enumerate(generate(model, None, a, cache_len=30, **SAMPLED)))
    assert [got_b[i] for i in range(2)] == generate(model, None, b, cache_len=30, **SAMPLED)


def test_release_and_model_deletion_free_the_state(ckpt):
    model = load(ckpt)
    generate(model, None, prompts([3]), keep_state=True, **SAMPLED)
    assert decode_state.kept_state(model) is not None
    decode_state.release(model)
    assert decode_state.kept_state(model) is None
    generate(model, None, prompts([3]), keep_state=True, **SAMPLED)
    n_kept = len(decode_state._KEPT)
    del model
    gc.collect()
    assert len(decode_state._KEPT) == n_kept - 1


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")
def test_gpu_graphs_are_captured_once_and_replay_in_place_weight_changes(ckpt, monkeypatch):
    """On CUDA (graphs and a kept state by default): a second call captures no graph; outputs equal eager decoding
    before and after an in-place weight change; a moved weight makes the next call capture again."""
    model = load(ckpt, "cuda")
    ps = prompts([5, 30, 2])
    opts = dict(n=2, temperature=1.0, top_p=0.9, seed=3, max_new_tokens=80, max_batch=4, progress=False)
    captures = []
    real = torch.cuda.CUDAGraph
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda *a, **k: captures.append(1) or real(*a, **k))
    first = generate(model, None, ps, **opts)
    n_first = len(captures)
    assert n_first >= 2  # sequences grow past one 64-position attention limit
    assert generate(model, None, ps, **opts) == first and len(captures) == n_first
    assert first == generate(model, None, ps, cuda_graphs=False, keep_state=False, **opts)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.2)
    changed = generate(model, None, ps, **opts)
    assert len(captures) == n_first and changed != first
    assert changed == generate(model, None, ps, cuda_graphs=False, keep_state=False, **opts)
    model.layers[0].mlp.down_proj.weight = torch.nn.Parameter(model.layers[0].mlp.down_proj.weight.detach().clone())
    assert generate(model, None, ps, **opts) == changed and len(captures) > n_first
