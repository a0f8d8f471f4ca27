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


def test_kept_default_cache_rounds_up_but_not_past_the_trained_context(ckpt):
    """With a kept state the default cache length (longest prompt + max_new_tokens) rounds up to CACHE_LEN_QUANTUM,
    but not past the model's trained context; a run that needs more than that context still gets all it needs."""
    model = load(ckpt)
    model.cfg.max_seq_len = 100  # < CACHE_LEN_QUANTUM
    ps = prompts([2])  # 5 tokens
    generate(model, None, ps, keep_state=True, max_new_tokens=9, progress=False)
    assert decode_state.kept_state(model).cache.max_len == 100  # 5 + 9 = 14, rounded up to 256, capped at 100
    with pytest.warns(UserWarning, match="holds 125 positions but the model was trained on 100"):
        generate(model, None, ps, keep_state=True, max_new_tokens=120, progress=False)
    assert decode_state.kept_state(model).cache.max_len == 125


def test_graph_signature_tells_apart_what_a_step_bakes_in():
    """Sampling options, EOS ids and the shared-prefix length are Python values a captured step bakes in: changing
    any one of them gives another signature (the graphs are captured anew)."""
    sampling = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
    signature = decode_state.graph_signature(sampling, [2], 3)
    assert decode_state.graph_signature({**sampling, "top_p": 0.9}, [2], 3) != signature
    assert decode_state.graph_signature(sampling, [2, 5], 3) != signature
    assert decode_state.graph_signature(sampling, [2], 4) != signature
    assert decode_state.graph_signature(sampling, [2], 3, prompt_cascade=8) != signature  # the cascade's group width


def test_a_kept_state_does_not_carry_the_last_runs_shared_prefix(ckpt, monkeypatch):
    """A run whose prompts share a prefix long enough for cascade attention declares it on the kept cache; the next
    run, with prompts that share nothing, must not read that prefix: it gives a fresh state's completions."""
    from w2s import ops

    monkeypatch.setattr(ops, "CASCADE_MIN_PREFIX", 3)  # the 3-token prefix of `prompts` takes the cascade path
    model = load(ckpt)
    generate(model, None, prompts([4, 7]), keep_state=True, **SAMPLED)
    unrelated = [[5, 6, 7, 8], [9, 10, 11]]
    assert generate(model, None, unrelated, keep_state=True, **SAMPLED) == generate(model, None, unrelated, **SAMPLED)


def test_an_engine_dropped_without_running_frees_its_state(ckpt):
    """A state counts as in use only while its engine lives: an engine that is built and dropped unrun (a caller
    that only wanted make_engine's checks) leaves the kept state free for the next call."""
    from w2s.sampling import make_engine

    model = load(ckpt)
    opts = {k: v for k, v in SAMPLED.items() if k != "progress"}
    engine = make_engine(model, None, prompts([4, 7]), keep_state=True, **opts)
    state = decode_state.kept_state(model)
    assert state.in_use()
    del engine
    gc.collect()
    assert not state.in_use()


def test_release_without_a_model_frees_every_kept_state(ckpt):
    models = [load(ckpt), load(ckpt)]
    for model in models:
        generate(model, None, prompts([3]), keep_state=True, **SAMPLED)
    assert all(decode_state.kept_state(m) is not None for m in models)
    decode_state.release()
    assert all(decode_state.kept_state(m) is None for m in models)


def test_a_second_engine_never_takes_the_state_of_one_still_decoding(ckpt):
    """Engine a yields a finished prompt while a sequence of its other prompt is still decoding; engine b, same
    shapes and model, runs in between. b must get a state of its own: both give what fresh states give."""
    from w2s.sampling_engine import Engine

    model = load(ckpt)
    kw = dict(temperature=1.0, top_k=0, top_p=0.9, max_new_tokens=9, seed=4, eos_ids=list(range(3, VOCAB, 5)),
              slots=4, cache_len=30, sync_every=2)  # a fifth of the ids end a sequence: lengths differ
    a, b = prompts([4, 7], seed=2), prompts([3, 5], seed=3)
    fresh_a, fresh_b = dict(Engine(model, a, 2, **kw).run()), dict(Engine(model, b, 2, **kw).run())
    engine_a = Engine(model, a, 2, keep_state=True, **kw)
    run_a = engine_a.run()
    got_a = dict([next(run_a)])
    assert not engine_a.done.all()  # a sequence is still decoding
    assert dict(Engine(model, b, 2, keep_state=True, **kw).run()) == fresh_b
    got_a.update(run_a)
    assert got_a == fresh_a


def test_a_kept_state_stops_at_the_eos_ids_of_the_current_run(ckpt):
    """The EOS ids live on device in the kept state; a run with other EOS ids (another signature) must stop at its
    own, as a fresh state does, not at the previous run's."""
    model = load(ckpt)
    ps = prompts([4, 7])
    generate(model, None, ps, keep_state=True, **SAMPLED)
    model.cfg.eos_token_id = list(range(3, VOCAB, 5))  # a fifth of the ids end a sequence
    model.cfg.generation_config = {}  # these ids alone stop (the saved generation_config.json would add 2)
    kept = generate(model, None, ps, keep_state=True, **SAMPLED)
    assert kept == generate(model, None, ps, **SAMPLED)
    assert any(c["finish_reason"] == "eos" for cs in kept for c in cs)
