"""Sampler tests: greedy parity with transformers, KV-cache logits vs full recompute, continuous batching, n samples
and shared prefixes, chunked prefill, sampling distributions (chi-square), stop strings / EOS / length, errors,
tensor and data parallel under torchrun (gloo), and jsonl resume.

    python -m pytest -q tests/test_sampling.py
"""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_tiny import FAMILIES, VOCAB, save_hf

import w2s
from w2s import sampling, sampling_jsonl
from w2s.decode_state import DecodeState
from w2s.kernels.reference import stream_keys, stream_uniforms
from w2s.sampling import generate
from w2s.sampling_draw import sample_from_logits
from w2s.sampling_engine import Engine

CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?+-*/=()[]{}<>#@$%&_'\"\n"


class CharTokenizer:
    """One character per token (ids 3..), with pad 0, BOS 1, EOS 2: the interface of w2s.tokenizer in 15 lines."""

    def __init__(self, stop_ids=(2,)):
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.stop_ids = frozenset(stop_ids)
        self.vocab_size = VOCAB

    def encode(self, text, bos=True):
        return ([self.bos_id] if bos else []) + [3 + CHARS.index(c) for c in text]

    def decode(self, ids):
        return "".join(CHARS[i - 3] for i in ids if 3 <= i < 3 + len(CHARS))


def random_prompts(lengths, seed=0, prefix=()):
    g = torch.Generator().manual_seed(seed)
    return [list(prefix) + torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """family -> (checkpoint dir, transformers model) for the tiny checkpoints, written once per module."""
    cache = {}

    def get(family):
        if family not in cache:
            path = tmp_path_factory.mktemp(family)
            cache[family] = (path, save_hf(family, path))
        return cache[family]

    return get


def load(ckpt, family):
    path, hf = ckpt(family)
    return w2s.load_model(path, dtype=torch.float32), hf


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_matches_transformers(family, ckpt):
    """Ragged prompts with a shared 6-token prefix, 2 slots for 3 prompts (continuous batching): every completion
    equals transformers' greedy generate of that prompt alone (which stops after the EOS it emits)."""
    model, hf = load(ckpt, family)
    prompts = random_prompts([3, 7, 1], seed=1, prefix=[1, 40, 41, 42, 43, 44])
    outs = generate(model, None, prompts, max_new_tokens=12, max_batch=2, progress=False)
    for prompt, (out,) in zip(prompts, outs):
        ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=2)
        expected = ref[0, len(prompt):].tolist()
        assert out["token_ids"] == expected
        assert out["finish_reason"] == ("eos" if expected[-1] == 2 else "length")
        assert out["num_tokens"] == len(expected) and out["text"] is None


@pytest.mark.parametrize("family", ["llama2", "mistral", "gemma2"])
def test_kv_cache_decode_logits_equal_full_recompute(family, ckpt, monkeypatch):
    """Drive the engine by hand (shared prefix copied into slots, a sibling copying a prompt's rows, ragged rows);
    the logits of every decode step equal a full forward over prompt + generated tokens. Sequences run past the
    sliding window (5) of mistral and gemma2; llama2 (no window, no soft-cap) decodes through the CPU cascade
    attention that reads the shared prefix from its own cache row."""
    from w2s import ops
    from w2s.kernels import sdpa_attention

    calls = []
    cascade = sdpa_attention.attention_after_shared_prefix
    monkeypatch.setattr(sdpa_attention, "attention_after_shared_prefix", lambda *a: calls.append(1) or cascade(*a))
    monkeypatch.setattr(ops, "CASCADE_MIN_PREFIX", 3)  # the 3-token prefix below takes the cascade path
    model, _ = load(ckpt, family)
    prompts = random_prompts([4, 9], seed=2, prefix=[1, 7, 8])
    engine = Engine(model, prompts, 2, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=8, seed=0, eos_ids=[],
                    slots=3, cache_len=24, keep_logits=True)
    assert engine.prefix_len == 3
    engine.prefill_shared_prefix()
    engine.admit([(0, 0), (0, 1), (1, 0)], [0, 1, 2])  # (0, 1) copies prompt 0's rows after its prefill
    for _ in range(6):
        engine.step(limit=24)
        n_gen = engine.n_gen.tolist()
        for s, (p, _) in enumerate(engine.work):
            seq = prompts[p] + engine.out[s, : n_gen[s] - 1].tolist()
            with torch.no_grad():
                full = model(torch.tensor([seq]))[0, -1]
            torch.testing.assert_close(engine.logits[s], full, atol=1e-4, rtol=1e-4)
    assert (len(calls) == 6 * model.cfg.n_layers) == (family == "llama2")  # every decode step of every layer


def test_decode_keeps_no_logits_unless_asked(ckpt):
    """By default a decode step copies its logits nowhere (engine.logits is None, the state holds no buffer); with
    keep_logits the copy is there and the samples are the same."""
    model, _ = load(ckpt, "llama2")
    prompts = random_prompts([4, 6], seed=5)
    kw = dict(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=6, seed=3, eos_ids=[], slots=4, cache_len=16)
    plain, kept = Engine(model, prompts, 2, **kw), Engine(model, prompts, 2, keep_logits=True, **kw)
    plain_results, kept_results = list(plain.run()), list(kept.run())
    assert plain.logits is None and plain.state.logits is None
    assert kept.logits is not None and kept.logits.shape == (4, model.cfg.vocab_size)
    assert kept.logits.dtype == torch.float32
    assert plain_results == kept_results


def test_samples_do_not_depend_on_batching_or_prefix_sharing(ckpt):
    """Temperature-1 samples (n=3) are identical whether sequences run together (one prefill per prompt, siblings
    copy it), through 2 slots (later siblings copy a live sibling's rows) or one at a time without prefix sharing
    (every sequence prefilled on its own): the RNG is keyed by (seed, prompt, sample, step)."""
    model, _ = load(ckpt, "llama2")
    prompts = random_prompts([5, 2, 8, 3], seed=3, prefix=[1, 9, 10, 11])
    kw = dict(n=3, temperature=1.0, top_p=0.9, max_new_tokens=10, seed=7, progress=False)
    together = generate(model, None, prompts, max_batch=12, **kw)
    two_slots = generate(model, None, prompts, max_batch=2, sync_every=3, **kw)
    alone = generate(model, None, prompts, max_batch=1, shared_prefix=False, **kw)
    assert together == two_slots == alone
    flat = [tuple(c["token_ids"]) for cs in together for c in cs]
    assert len(set(flat)) == len(flat)  # samples of a prompt differ from each other
    other_seed = generate(model, None, prompts, max_batch=12, **{**kw, "seed": 8})
    assert other_seed != together


def test_greedy_batching_equals_one_prompt_at_a_time(ckpt):
    model, _ = load(ckpt, "gemma")
    prompts = random_prompts([6, 1, 11, 3, 9], seed=4)
    batched = generate(model, None, prompts, max_new_tokens=9, max_batch=3, sync_every=4, progress=False)
    single = [generate(model, None, [p], max_new_tokens=9, progress=False)[0] for p in prompts]
    assert batched == single



def test_a_sample_admitted_beside_a_running_sibling_runs_no_forward(ckpt, monkeypatch):
    """A prompt with samples still waiting keeps its last-position logits from its prefill: a sample admitted later,
    while a sibling runs, copies the sibling's rows and draws token 0 from them, with no forward (it used to re-run
    the prompt's last token, padded to the longest prompt of the prefill it joined). Here prompt B's first sample
    starts beside prompt A's three; when A's end (a budget of 5 tokens against B's 11), B's other two start beside it.
    Only the first admission runs a prefill, and the samples are those of one admission of all six."""
    model, _ = load(ckpt, "llama2")
    model.cfg.eos_token_id, model.cfg.generation_config = None, {}  # no EOS id: the budgets decide when slots free
    a, b = random_prompts([9, 3], seed=6)
    prefills = []
    forward_rows = Engine._forward_rows

    def counting_forward_rows(self, rows):
        prefills.append([len(ids) for _, ids, _ in rows])
        return forward_rows(self, rows)

    monkeypatch.setattr(Engine, "_forward_rows", counting_forward_rows)
    kw = dict(n=3, temperature=1.0, seed=2, max_new_tokens=20, cache_len=14, shared_prefix=False, sync_every=1,
              progress=False)
    four_slots = generate(model, None, [a, b], max_batch=4, **kw)
    assert prefills == [[9, 3]]
    assert [c["num_tokens"] for cs in four_slots for c in cs] == [5] * 3 + [11] * 3
    assert four_slots == generate(model, None, [a, b], max_batch=6, **kw)


def test_prefill_rows_run_longest_first_so_a_forward_pads_little(ckpt, monkeypatch):
    """Prefill rows are sorted by length before they are cut into forwards under the prefill token budget (rows x
    longest): rows of 2, 9, 3 and 8 tokens under a budget of 18 run as (9, 8) and (3, 2), 24 token rows, not (2, 9)
    and (3, 8), 34. The logits come back in the callers' order: the completions are those of one prompt at a time."""
    from w2s.sampling import make_engine

    model, _ = load(ckpt, "llama2")
    prompts = random_prompts([2, 9, 3, 8], seed=8)
    shapes = []
    model.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    engine = make_engine(model, None, prompts, max_new_tokens=6, max_batch=4, shared_prefix=False)
    engine.prefill_tokens = 18
    got = dict(engine.run())
    assert [shape for shape in shapes if shape[1] > 1] == [(2, 9), (2, 3)]
    for i, prompt in enumerate(prompts):
        assert got[i] == generate(model, None, [prompt], max_new_tokens=6, progress=False)[0]

# ------------------------------------------------------------------------------------------------ chunked prefill


def count_steps(monkeypatch):
    """{"admit": prefill forwards of their own, "mixed"/"plain": decode steps of each kind}, counted while running."""
    counts = {"admit": 0, "mixed": 0, "plain": 0}
    real_admit, real_step = Engine.admit, Engine.step

    def admit(self, items, free):
        counts["admit"] += 1
        return real_admit(self, items, free)

    def step(self, limit, mixed=False):
        counts["mixed" if mixed else "plain"] += 1
        return real_step(self, limit, mixed)

    monkeypatch.setattr(Engine, "admit", admit)
    monkeypatch.setattr(Engine, "step", step)
    return counts


@pytest.mark.parametrize("family", ["llama2", "mistral", "gemma2"])
def test_chunked_prefill_samples_equal_a_prefill_of_their_own(family, ckpt, monkeypatch):
    """EOS-terminated temperature-1 samples (n=3) of 8 prompts through 4 slots: with chunked prefill (1, 3 or 16
    prompt tokens per decode step) the prompts entering freed slots run inside the decode steps, and the samples
    are those of the engine that prefills them in a forward of their own. Prompts longer than a chunk span steps;
    siblings wait for their prompt and then copy it; llama2 decodes through the CPU cascade over the shared prefix,
    mistral and gemma2 past their 5-token sliding windows, gemma2 with soft-caps."""
    from w2s import ops

    monkeypatch.setattr(ops, "CASCADE_MIN_PREFIX", 3)
    model, _ = load(ckpt, family)
    model.cfg.eos_token_id = list(range(3, VOCAB, 5))
    model.cfg.generation_config = {}  # these ids alone stop (the saved generation_config.json would add 2)
    prompts = random_prompts([5, 2, 8, 3, 6, 1, 13, 4], seed=6, prefix=[1, 9, 10, 11])
    kw = dict(n=3, temperature=1.0, seed=2, max_new_tokens=12, sync_every=2, max_batch=4, progress=False)
    expected = generate(model, None, prompts, **kw)
    lengths = [c["num_tokens"] for cs in expected for c in cs]
    assert len(set(lengths)) > 3  # slots free at different host looks
    for chunk in (1, 3, 16):
        counts = count_steps(monkeypatch)
        assert generate(model, None, prompts, prefill_chunk=chunk, **kw) == expected, chunk
        assert counts["admit"] == 1 and counts["mixed"] > 0, (chunk, counts)  # one prefill forward: the first


@pytest.mark.parametrize("family", ["llama2", "mistral"])
def test_chunked_prefill_logits_equal_full_recompute(family, ckpt, monkeypatch):
    """After every decode step, plain or mixed, each slot that sampled a token in it holds the logits of a full
    forward over its prompt and the tokens it generated before: the first token of a slot whose prompt ended
    inside the step included (its prompt written to the cache by chunks over several steps, or copied from a
    sibling with only the last prompt token run again)."""
    model, _ = load(ckpt, family)
    model.cfg.eos_token_id = list(range(3, VOCAB, 5))  # completions of different lengths: slots free one by one
    model.cfg.generation_config = {}  # these ids alone stop (the saved generation_config.json would add 2)
    prompts = random_prompts([6, 2, 9, 4], seed=8, prefix=[1, 7, 8])
    monkeypatch.setattr(sampling, "Engine", functools.partial(Engine, keep_logits=True))  # generate's engine
    checked = {"first": 0, "later": 0}
    real = Engine._step_eager

    def step_and_check(self, rows, mixed=False):
        before = self.n_gen.clone()
        real(self, rows, mixed)
        for s in torch.nonzero(self.n_gen > before).flatten().tolist():
            p, _ = self.work[s]
            seq = self.prompts[p] + self.out[s, : before[s]].tolist()
            with torch.no_grad():
                full = model(torch.tensor([seq]))[0, -1]
            torch.testing.assert_close(self.logits[s], full, atol=1e-4, rtol=1e-4)
            checked["first" if before[s] == 0 else "later"] += 1

    monkeypatch.setattr(Engine, "_step_eager", step_and_check)
    generate(model, None, prompts, n=2, temperature=1.0, max_new_tokens=8, max_batch=3, sync_every=2,
             prefill_chunk=4, progress=False)
    assert checked["first"] == 8 - 3 and checked["later"] >= 20  # all but the 3 first admitted start in a step


def test_chunked_prefill_bad_option(ckpt):
    model, _ = load(ckpt, "llama2")
    with pytest.raises(ValueError, match=r"prefill_chunk=-1 must be >= 0 \(prompt tokens per decode step; 0 is off\)"):
        generate(model, None, [[1, 2, 3]], prefill_chunk=-1, progress=False)


def test_prompt_ids_outside_the_vocabulary_are_refused_before_sampling(ckpt, tmp_path):
    """An id past the embedding table, true or -1 as an id: refused before the first forward, not an IndexError."""
    model, _ = load(ckpt, "llama2")
    with pytest.raises(ValueError, match=rf"^prompt 1: token id {VOCAB} is outside the model's vocabulary \(ids 0 "
                                         rf"to {VOCAB - 1}\)$"):
        generate(model, None, [[1, 2], [3, VOCAB]], max_new_tokens=2, progress=False)
    with pytest.raises(ValueError, match=r'^record "a": expected a non-empty string or list of token ids \(whole'):
        sampling_jsonl.generate_to_jsonl(model, None, [{"id": "a", "prompt": [1, True]}], tmp_path / "o.jsonl",
                                         max_new_tokens=2, progress=False)
    (tmp_path / "p.jsonl").write_text('{"id": 1, "prompt": [3, -1]}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:1: expected key 'prompt' with a non-empty string or list of "):
        sampling_jsonl.read_prompts_jsonl(tmp_path / "p.jsonl")


def test_a_torchrun_process_that_has_not_joined_the_group_is_refused(ckpt, tmp_path, monkeypatch):
    """Under torchrun (WORLD_SIZE > 1) without w2s.parallel.init_distributed(), every rank would sample every prompt
    and write the same output file: sampling and the tensor-parallel loader say what to call instead."""
    from w2s.tensor_parallel import load_model_tp

    model, _ = load(ckpt, "llama2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    joined = r"launched by torchrun with 2 processes, but this one has not joined the process group: call " \
             r"w2s\.parallel\.init_distributed\(\) first"
    with pytest.raises(RuntimeError, match="^sampling: " + joined):
        generate(model, None, [[1, 2, 3]], max_new_tokens=2, progress=False)
    with pytest.raises(RuntimeError, match="^sampling: " + joined):
        sampling_jsonl.generate_to_jsonl(model, None, [{"id": "a", "prompt": [1, 2]}], tmp_path / "out.jsonl",
                                         max_new_tokens=2, progress=False)
    assert not (tmp_path / "out.jsonl").exists()
    with pytest.raises(RuntimeError, match="^tensor parallel size 2: " + joined):
        load_model_tp(ckpt("llama2")[0], tp=2)
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun with one process: nothing to join
    assert len(generate(model, None, [[1, 2, 3]], max_new_tokens=2, progress=False)) == 1


def test_the_loaders_name_a_truncated_shard_before_reading_it(ckpt, tmp_path, monkeypatch):
    """Both loaders check the headers against the file sizes before reading a tensor: a truncated copy is one line
    naming the shard, not a raw SafetensorError from every tensor-parallel rank, nor found only on reaching the
    tensor after reading the ones before it."""
    import shutil

    from w2s.tensor_parallel import load_model_tp

    copy = tmp_path / "llama2"
    shutil.copytree(ckpt("llama2")[0], copy)
    shard = copy / "model.safetensors"
    os.truncate(shard, shard.stat().st_size - 100)
    with pytest.raises(ValueError, match=rf"^{shard}: tensor '.*' ends at byte \d+ but the file has \d+ bytes"):
        load_model_tp(copy, tp=2)  # raised before the process group is needed
    import w2s.checkpoint

    monkeypatch.setattr(w2s.checkpoint, "read_tensor", lambda *a, **k: pytest.fail("a tensor was read"))
    with pytest.raises(ValueError, match=rf"^{shard}: tensor '.*' ends at byte \d+ but the file has \d+ bytes"):
        w2s.load_model(copy)


# ------------------------------------------------------------------------------------------------ distributions


def expected_probs(logits, temperature, top_k, top_p):
    """Target distribution from transformers' own warpers, chained as its sampling chains them: temperature, top-k
    (which keeps the logits tied with the k-th largest), then top-p on what top-k left."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores, ids = torch.tensor([logits], dtype=torch.float64), torch.zeros(1, 1, dtype=torch.long)
    scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    return torch.softmax(scores, dim=-1)[0].numpy()


DISTINCT, TIED = [2.0, 1.5, 1.0, 0.5, 0.0, -1.0], [2.0, 1.0, 1.0, 1.0, 0.0, -1.0]
SHUFFLED = [0.0, 2.0, -1.0, 1.0, 1.5, 0.5]  # DISTINCT out of order: top-p's sort must map back to vocabulary ids


@pytest.mark.parametrize("logits,temperature,top_k,top_p", [
    (DISTINCT, 1.0, 0, 1.0), (DISTINCT, 0.7, 0, 1.0), (DISTINCT, 1.3, 3, 1.0), (DISTINCT, 1.0, 0, 0.8),
    (DISTINCT, 2.0, 4, 0.9), (DISTINCT, 1.0, 3, 0.7), (TIED, 1.0, 2, 1.0), (TIED, 1.0, 2, 0.9),
    # top-p cuts the tempered distribution: at T=0.5 two tokens reach 0.8, untempered it would take three
    (DISTINCT, 0.5, 0, 0.8), (SHUFFLED, 1.0, 0, 0.8), (SHUFFLED, 1.3, 4, 0.9)])
def test_sampling_frequencies_match_target(logits, temperature, top_k, top_p):
    draws = 20000
    keys = stream_keys(123, torch.arange(draws), torch.zeros(draws, dtype=torch.long))
    u = stream_uniforms(keys, torch.full((draws,), 5))
    tokens = sample_from_logits(torch.tensor(logits).expand(draws, -1), u, temperature=temperature, top_k=top_k,
                                top_p=top_p)
    counts = np.bincount(tokens.numpy(), minlength=6)
    p = expected_probs(logits, temperature, top_k, top_p)
    assert counts[p == 0].sum() == 0, "a token outside top-k / top-p was drawn"
    exp = p[p > 0] * draws
    chi2 = float(((counts[p > 0] - exp) ** 2 / exp).sum())
    critical = {0: 0.0, 1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}[int((p > 0).sum()) - 1]  # p = 0.001
    assert chi2 <= critical, f"chi2 {chi2:.1f} > {critical} for counts {counts} vs expected {exp.round()}"


def test_uniforms_are_uniform_and_step_dependent():
    keys = stream_keys(0, torch.arange(4000), torch.arange(4000) % 7)
    u = torch.cat([stream_uniforms(keys, torch.full((4000,), t)) for t in range(5)])
    assert 0 <= u.min() and u.max() < 1
    counts = torch.histc(u, bins=20, min=0, max=1)
    exp = len(u) / 20
    assert float(((counts - exp) ** 2 / exp).sum()) < 43.82  # chi-square, 19 dof, p = 0.001
    assert not torch.equal(stream_uniforms(keys, torch.zeros(4000)), stream_uniforms(keys, torch.ones(4000)))


def test_token_id_prompts_stop_at_the_generation_configs_eos_as_transformers(ckpt):
    """Without a tokenizer the stop ids are config.json's and generation_config.json's (Llama-3-Instruct lists
    <|eot_id|> only there); transformers' generate stops at the generation config's."""
    from transformers import GenerationConfig

    model, hf = load(ckpt, "llama2")
    prompt = [1, 5, 9, 13]
    free = generate(model, None, [prompt], max_new_tokens=12, progress=False)[0][0]["token_ids"]
    j = next(i for i in range(1, len(free)) if free[i] not in free[:i] and free[i] != model.cfg.eos_token_id)
    eos = free[j]  # a token greedy emits first at step j + 1, j >= 1
    model.cfg.generation_config = {"eos_token_id": [model.cfg.eos_token_id, eos]}
    ours = generate(model, None, [prompt], max_new_tokens=12, progress=False)[0][0]
    hf_out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                         generation_config=GenerationConfig(eos_token_id=[model.cfg.eos_token_id, eos], pad_token_id=0))
    assert ours["finish_reason"] == "eos" and ours["token_ids"] == hf_out[0, len(prompt):].tolist() == free[:j + 1]


def test_greedy_is_argmax_and_top_k_1_is_greedy():
    logits = torch.randn(50, 30, generator=torch.Generator().manual_seed(0))
    u = torch.rand(50)
    assert torch.equal(sample_from_logits(logits, u, temperature=0.0), logits.argmax(-1))
    assert torch.equal(sample_from_logits(logits, u, temperature=1.0, top_k=1), logits.argmax(-1))


# ------------------------------------------------------------------------------------------------ finishing


def test_eos_stop_strings_and_length(ckpt):
    model, _ = load(ckpt, "llama2")
    never = CharTokenizer(stop_ids=())
    prompts = ["abc", "hello world"]
    free = generate(model, never, prompts, max_new_tokens=16, progress=False)
    for out in free:
        out = out[0]
        assert out["finish_reason"] == "length" and out["num_tokens"] == 16
        assert out["text"] == never.decode(out["token_ids"])

    # EOS: declare the token greedy emits 4th to be the EOS; generation ends there, the text excludes it.
    ids = free[1][0]["token_ids"]
    eos = ids[3]
    first = ids.index(eos)
    out = generate(model, CharTokenizer(stop_ids=(eos,)), prompts[1:], max_new_tokens=16, progress=False)[0][0]
    assert out["finish_reason"] == "eos"
    assert out["token_ids"] == ids[: first + 1]
    assert out["text"] == never.decode(ids[:first])

    # Stop string: a 2-character piece of the free-running text; the text is cut just before it.
    text = free[0][0]["text"]
    stop = next(text[i : i + 2] for i in range(4, len(text) - 1) if len(never.encode(text[i : i + 2], bos=False)) == 2)
    cut = text.index(stop)
    out = generate(model, never, prompts[:1], max_new_tokens=16, stop=["@@never", stop], sync_every=5,
                   progress=False)[0][0]
    assert out["finish_reason"] == "stop"
    assert out["text"] == text[:cut]
    ids = free[0][0]["token_ids"]
    assert out["token_ids"] == ids[: out["num_tokens"]]
    assert stop in never.decode(out["token_ids"]) and stop not in never.decode(out["token_ids"][:-1])

    # Length from the cache end: 3 positions past the prompt leave room for 3 tokens.
    n_prompt = len(never.encode(prompts[0]))
    out = generate(model, never, prompts[:1], max_new_tokens=16, cache_len=n_prompt + 3, progress=False)[0][0]
    assert out["finish_reason"] == "length" and out["token_ids"] == free[0][0]["token_ids"][:3]


def test_continuous_batching_refills_freed_slots_at_every_host_look(ckpt, monkeypatch):
    """EOS-terminated completions of different lengths (a third of the vocabulary ends a sequence), 18 sequences
    through 4 slots: until the last sequence is admitted, every decode step runs with all 4 slots assigned (a slot
    freed at a host look is refilled before the next step), and the completions are those of one slot at a time."""
    model, _ = load(ckpt, "llama2")
    tok = CharTokenizer(stop_ids=range(3, VOCAB, 3))
    prompts = random_prompts([5, 2, 8, 3, 6, 1], seed=6)
    kw = dict(n=3, temperature=1.0, seed=2, max_new_tokens=12, sync_every=2, progress=False)
    admitted, busy = [0], []
    real_admit, real_step = Engine.admit, Engine.step

    def admit(self, items, free):
        admitted[0] += len(items)
        return real_admit(self, items, free)

    def step(self, limit, mixed=False):
        busy.append((admitted[0], sum(w is not None for w in self.work)))
        return real_step(self, limit, mixed)

    monkeypatch.setattr(Engine, "admit", admit)
    monkeypatch.setattr(Engine, "step", step)
    outs = generate(model, tok, prompts, max_batch=4, **kw)
    waiting = [n_busy for n_admitted, n_busy in busy if n_admitted < 18]
    assert len(waiting) >= 4 and all(n == 4 for n in waiting)
    lengths = [c["num_tokens"] for cs in outs for c in cs]
    assert len(set(lengths)) > 2 and sum(c["finish_reason"] == "eos" for cs in outs for c in cs) >= 12
    monkeypatch.setattr(Engine, "step", real_step)
    assert outs == generate(model, tok, prompts, max_batch=1, **kw)


@pytest.mark.parametrize("prefill_chunk", [0, 3])
def test_share_prompt_reads_names_only_rows_that_hold_the_same_prompt(ckpt, monkeypatch, prefill_chunk):
    """share_prompt_reads: before every decode step, each cache row's named row holds the same keys and values over
    the positions named (EOS ends a third of the draws, so 18 sequences of 6 prompts cycle through 4 slots and named
    rows get refilled), some rows name a sibling, and the samples equal a run without it. The positions named are
    the whole prompt; with chunked prefill, which runs a late sibling's last prompt token again, all but the last."""
    model, _ = load(ckpt, "llama2")
    tok = CharTokenizer(stop_ids=range(3, VOCAB, 3))
    prompts = random_prompts([9, 4, 12, 6, 10, 7], seed=3, prefix=[5, 6, 7])
    kw = dict(n=3, temperature=1.0, seed=4, max_new_tokens=10, sync_every=2, max_batch=4, prefill_chunk=prefill_chunk,
              progress=False)
    named, real_step = [], Engine.step

    def step(self, limit, mixed=False):
        rows, lens = self.cache.row_prefix
        for r, (src, n) in enumerate(zip(rows.tolist(), lens.tolist())):
            for buf in (self.cache.k, self.cache.v):  # (layers, rows, K, positions, D)
                assert torch.equal(buf[:, src, :, :n], buf[:, r, :, :n]), (r, src, n)
            if r < self.slots and self.work[r] is not None:
                assert n == len(self.prompts[self.work[r][0]]) - (1 if prefill_chunk else 0), (r, n)
            named.append(src != r and n > 0)
        return real_step(self, limit, mixed)

    monkeypatch.setattr(Engine, "step", step)
    shared = generate(model, tok, prompts, share_prompt_reads=True, **kw)
    assert sum(named) >= 5
    monkeypatch.setattr(Engine, "step", real_step)
    assert shared == generate(model, tok, prompts, **kw)


@pytest.mark.parametrize("width, compact, chunk", [(None, True, 0), (2, False, 0), (None, True, 3)],
                         ids=["one-run-a-prompt", "runs-of-2", "chunked-prefill"])
def test_prompt_cascade_groups_every_row_once_with_rows_that_hold_its_prompt(ckpt, monkeypatch, width, compact, chunk):
    """prompt_cascade: before every plain decode step each slot the step runs is the member of exactly one group; a
    group's rows are slots at work on one prompt (at most the group width of them, led by the lowest) and hold its
    leader's keys and values over the prompt, whose length the group and each member's start give; an empty slot is
    a group of its own with no positions. 18 sequences of 6 prompts x 3 cycle through 5 slots (EOS ends a third of
    the draws) and the batch drains, compacted; with runs of 2 a prompt's 3 samples split into two groups, and every
    step runs all 5 slots (as a CUDA step may run empty ones), empty or not. With chunked prefill the prompts of
    refilled slots run in mixed steps (which read every row's own keys) and a group covers the prompt less its last
    position, which a sample admitted beside a running sibling runs again. The samples equal a run without it (on
    CPU the tables change no value)."""
    model, _ = load(ckpt, "llama2")
    tok = CharTokenizer(stop_ids=range(3, VOCAB, 3))
    prompts = random_prompts([9, 4, 12, 6, 10, 7], seed=3, prefix=[5, 6, 7])
    kw = dict(n=3, temperature=1.0, seed=4, max_new_tokens=10, sync_every=2, max_batch=5, compact=compact,
              prefill_chunk=chunk, progress=False)
    seen, mixed_steps, real_step, real_write = [], [], Engine.step, DecodeState.write_prompt_tables

    def write(self, slot_prompts, group_width=0):  # runs of `width` where the engine asks for its own
        if width:
            group_width = width
            self.cache.prompt_groups = (*self.cache.prompt_groups[:3], width)
        real_write(self, slot_prompts, group_width)

    def step(self, limit, mixed=False):
        members, lengths, starts, M = self.cache.prompt_groups
        assert M == (width or 4)
        if mixed:  # a mixed step reads no group (its rows go through kv_rows), and its prompts are still being run
            mixed_steps.append(1)
            return real_step(self, limit, mixed)
        membership = {}
        for g in range(self.rows):
            rows = [r for r in members[g, :M].tolist() if r >= 0]
            assert members[g, M:].eq(-1).all() and (not rows or rows[0] == g and rows == sorted(rows)), (g, rows)
            for r in rows:
                assert r not in membership, r
                membership[r] = g
            if self.work[g] is None:  # an empty slot: a group of its own, of no positions
                assert rows == [g] and lengths[g] == 0 and starts[g] == 0, (g, rows)
                seen.append(0)
                continue
            if lengths[g] == 0:  # a slot at work that leads no group: another group's member
                assert not rows, (g, rows)
                continue
            prompts_of = {self.work[r][0] for r in rows}
            prompt_len = len(self.prompts[prompts_of.pop()]) if len(prompts_of) == 1 else None
            assert prompt_len is not None and lengths[g] == prompt_len - (1 if chunk else 0), (g, rows)
            for r in rows:
                assert starts[r] == lengths[g]
                for buf in (self.cache.k, self.cache.v):  # (layers, rows, K, positions, D)
                    assert torch.equal(buf[:, r, :, : lengths[g]], buf[:, g, :, : lengths[g]]), (g, r)
            seen.append(len(rows))
        assert sorted(membership) == list(range(self.rows))
        return real_step(self, limit, mixed)

    monkeypatch.setattr(DecodeState, "write_prompt_tables", write)
    monkeypatch.setattr(Engine, "step", step)
    if not compact:
        monkeypatch.setattr(Engine, "_rows_covering", lambda self, n: self.slots)
    cascaded = generate(model, tok, prompts, prompt_cascade=True, **kw)
    assert max(seen) == (width or 3) and 1 in seen and (0 in seen or compact)  # groups of 3 (or 2), 1; empty slots
    assert (len(mixed_steps) >= 3) == (chunk > 0)
    monkeypatch.undo()
    assert cascaded == generate(model, tok, prompts, **kw)
    with pytest.raises(ValueError, match="prompt_cascade=True runs without share_prompt_reads=True"):
        generate(model, tok, prompts, prompt_cascade=True, share_prompt_reads=True, **kw)


@pytest.mark.parametrize("share_prompt_reads", [False, True])
def test_a_draining_batch_moves_its_samples_down_and_runs_fewer_rows(ckpt, monkeypatch, share_prompt_reads):
    """Once no work waits, the samples still running move into the lowest free slots (cache rows and state), and a
    step runs only the rows [0, R) that hold them: the samples are those of a run that never moves them, every slot
    at work is always inside the rows a step runs, and the drain runs fewer rows than the slots."""
    model, _ = load(ckpt, "llama2")
    tok = CharTokenizer(stop_ids=range(3, VOCAB, 4))  # EOS ends a quarter of the draws: lengths spread
    prompts = random_prompts([9, 4, 12, 6, 10, 7, 5], seed=5, prefix=[5, 6, 7])
    kw = dict(n=3, temperature=1.0, seed=6, max_new_tokens=16, sync_every=2, max_batch=8,
              share_prompt_reads=share_prompt_reads, progress=False)
    runs, moved, real_step, real_compact = [], [], Engine.step, Engine._compact

    def step(self, limit, mixed=False):
        at_work = [s for s, w in enumerate(self.work) if w is not None]
        runs.append((self.compact, self.slots if mixed else self.rows, max(at_work) + 1))
        return real_step(self, limit, mixed)

    def compact(self):
        before = list(self.work)
        real_compact(self)
        moved.extend(d for d, (old, new) in enumerate(zip(before, self.work)) if new is not None and old != new)

    monkeypatch.setattr(Engine, "step", step)
    monkeypatch.setattr(Engine, "_compact", compact)
    compacted = generate(model, tok, prompts, **kw)
    kept_in_place = generate(model, tok, prompts, compact=False, **kw)
    assert compacted == kept_in_place
    assert all(rows >= top for _, rows, top in runs)  # no slot at work is left out of a step
    assert moved and all(d < 8 for d in moved)
    rows_run = {on: sum(rows for c, rows, _ in runs if c == on) for on in (True, False)}
    steps = {on: sum(c == on for c, _, _ in runs) for on in (True, False)}
    assert steps[True] == steps[False]  # the same steps, over fewer rows
    assert rows_run[True] < rows_run[False] <= 8 * steps[False]


def test_rows_a_step_runs_are_a_power_of_two_with_cuda_graphs(ckpt):
    """With CUDA graphs a step runs the power of two of rows (at most the slots) that covers the highest slot at
    work, so that a run captures few shapes; eagerly on CPU, exactly up to that slot. Compaction aims at the same
    rows."""
    from w2s.sampling import make_engine

    model, _ = load(ckpt, "llama2")
    engine = make_engine(model, None, [[5, 6, 7]] * 12, max_new_tokens=4, max_batch=12)
    for work, eager, graphed in (([0], 1, 1), ([0, 2], 3, 4), ([4], 5, 8), ([0, 8], 9, 12), ([11], 12, 12)):
        engine.work = [(0, 0) if s in work else None for s in range(12)]
        engine.cuda_graphs = False
        assert engine._rows_to_run() == eager
        engine.cuda_graphs = True
        assert engine._rows_to_run() == graphed



def test_the_host_looks_as_soon_as_every_running_budget_is_spent(ckpt):
    """No decode step runs after the last token a running slot may draw: when every slot at work has fewer tokens
    left in its budget (max_new_tokens, or the cache's end) than sync_every, the steps before the next look stop
    there. Token 0 comes from the prefill, so a budget of b tokens takes b - 1 steps (8 looks of sync_every = 8 used
    to run 8 steps each, 16 for a budget of 10 and 8 for a budget of 1). The samples are those of sync_every = 1."""
    from w2s.sampling import make_engine

    model, _ = load(ckpt, "llama2")
    model.cfg.eos_token_id, model.cfg.generation_config = None, {}  # no EOS id: every completion spends its budget
    prompts = random_prompts([5, 2, 8], seed=5, prefix=[1])  # 6, 3 and 9 tokens
    kw = dict(n=2, temperature=1.0, seed=3, max_batch=6)
    for max_new, cache_len, steps in ((1, None, 0), (10, None, 9), (50, 9 + 4, 13 - 3 - 1)):
        options = dict(kw, max_new_tokens=max_new, cache_len=cache_len)
        engine = make_engine(model, None, prompts, sync_every=8, **options)
        got = dict(engine.run())
        shortest_prompts_budget = max_new if cache_len is None else min(max_new, cache_len - 3)
        assert [c["num_tokens"] for c in got[1]] == [shortest_prompts_budget] * 2
        assert engine.decode_steps == steps
        assert [got[i] for i in range(len(prompts))] == generate(model, None, prompts, sync_every=1, progress=False,
                                                                  **options)

def test_bad_input_errors(ckpt):
    model, _ = load(ckpt, "llama2")
    with pytest.raises(ValueError, match="prompt 1 has 9 tokens but the KV cache holds 8 positions"):
        generate(model, None, [[1, 2, 3], list(range(3, 12))], cache_len=8, progress=False)
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        generate(model, None, [[1, 5]], stop=["\n"], progress=False)
    with pytest.raises(ValueError, match="prompt 0 is a string but no tokenizer"):
        generate(model, None, ["hi"], progress=False)
    with pytest.raises(ValueError, match="top_p=0"):
        generate(model, None, [[1, 5]], temperature=1.0, top_p=0.0, progress=False)
    with pytest.raises(ValueError, match="sync_every=0 and max_batch=256 must all be >= 1"):
        generate(model, None, [[1, 5]], max_new_tokens=4, sync_every=0, progress=False)  # no decode step: a hang
    for temperature in (float("nan"), float("inf")):  # inf drew uniformly random tokens
        with pytest.raises(ValueError, match=f"^temperature={temperature}: expected a finite number >= 0$"):
            generate(model, None, [[1, 5]], temperature=temperature, progress=False)
    with pytest.raises(ValueError, match=r"n=2.0, top_k=1.5: expected whole numbers"):
        generate(model, None, [[1, 5]], n=2.0, top_k=1.5, progress=False)
    assert model.cfg.max_seq_len == 256  # hf_tiny's max_position_embeddings
    with pytest.warns(UserWarning, match="holds 300 positions but the model was trained on 256"):
        generate(model, None, [[1, 5]], max_new_tokens=2, cache_len=300, progress=False)


# ------------------------------------------------------------------------------------------------ jsonl resume


class Interrupted(Exception):
    pass


def test_jsonl_resume_is_byte_identical_and_redoes_nothing(ckpt, tmp_path, monkeypatch):
    """Kill generate_to_jsonl after 2 finished prompts, tear a half-written line onto its part file, rerun: the final
    file is byte-identical to an uninterrupted run, and the rerun prefills only the prompts that were not done."""
    model, _ = load(ckpt, "llama2")
    tok = CharTokenizer(stop_ids=())
    texts = ["abc", "hello", "x", "1+1=", "what?", "zz top"]
    records = [{"id": f"q{i}", "prompt": t} for i, t in enumerate(texts)]
    kw = dict(n=2, temperature=1.0, top_k=20, max_new_tokens=6, seed=3, max_batch=3, sync_every=2, progress=False)
    full = sampling_jsonl.generate_to_jsonl(model, tok, records, tmp_path / "full.jsonl", **kw).read_bytes()
    assert full.count(b"\n") == len(records)

    admitted = []  # (global prompt index, sample) of every sequence started, i.e. every prefill
    real_admit = Engine.admit

    def counting_admit(self, items, free):
        admitted.extend((self.global_index[p], j) for p, j in items)
        return real_admit(self, items, free)

    monkeypatch.setattr(Engine, "admit", counting_admit)
    real_iter = sampling.iter_generate

    def dies_after_two(*args, **kwargs):
        for i, item in enumerate(real_iter(*args, **kwargs)):
            if i == 2:
                raise Interrupted
            yield item

    out = tmp_path / "out.jsonl"
    monkeypatch.setattr(sampling, "iter_generate", dies_after_two)
    with pytest.raises(Interrupted):
        sampling_jsonl.generate_to_jsonl(model, tok, records, out, **kw)
    monkeypatch.setattr(sampling, "iter_generate", real_iter)
    part = tmp_path / "out.jsonl.part0"
    finished = [json.loads(line)["id"] for line in part.read_text().splitlines()]
    assert len(finished) == 2 and not out.exists()
    with open(part, "a") as f:  # a writer killed mid-line
        f.write('{"id": "q5", "prompt": "zz top", "completions": [{"te')

    admitted.clear()
    sampling_jsonl.generate_to_jsonl(model, tok, records, out, **kw)
    assert out.read_bytes() == full
    assert not part.exists()
    redone = {f"q{p}" for p, _ in admitted}
    assert redone == {r["id"] for r in records} - set(finished)
    assert sorted(admitted) == sorted(set(admitted))  # each (prompt, sample) started once

    admitted.clear()  # a finished file: nothing to do, file unchanged
    sampling_jsonl.generate_to_jsonl(model, tok, records, out, **kw)
    assert admitted == [] and out.read_bytes() == full


def test_jsonl_bad_lines_are_one_line_errors(ckpt, tmp_path):
    model, _ = load(ckpt, "llama2")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": 1, "prompt": "ab"}\n\n{"id": 2, "prompt": "cd"\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl:3: not valid JSON"):
        sampling_jsonl.read_prompts_jsonl(prompts)
    prompts.write_text('{"id": 1, "prompt": "ab"}\n{"id": 2, "question": "cd"}\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl:2: expected key 'prompt'"):
        sampling_jsonl.read_prompts_jsonl(prompts)
    prompts.write_text('{"q": "ab"}\n{"q": "cd"}\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl:1: missing id key 'id'"):
        sampling_jsonl.read_prompts_jsonl(prompts, prompt_key="q")
    assert [r["id"] for r in sampling_jsonl.read_prompts_jsonl(prompts, prompt_key="q", id_key="")] == [0, 1]
    prompts.write_text('{"id": 7, "prompt": "ab"}\n{"id": 7, "prompt": "cd"}\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl:2: id 7 repeats line 1"):
        sampling_jsonl.read_prompts_jsonl(prompts)

    # A corrupt complete line in an output file is named, not silently skipped or redone.
    out = tmp_path / "out.jsonl"
    (tmp_path / "out.jsonl.part0").write_text('{"id": "a", "completions": []}\nnot json\n')
    records = [{"id": "a", "prompt": [1, 5]}]
    with pytest.raises(ValueError, match=r"out.jsonl.part0:2: not a completion line"):
        sampling_jsonl.generate_to_jsonl(model, None, records, out, progress=False)
    # A prompt longer than the cache names its record; nothing is written.
    (tmp_path / "out.jsonl.part0").unlink()
    with pytest.raises(ValueError, match=r'record "b" has 9 tokens but the KV cache holds 8 positions'):
        sampling_jsonl.generate_to_jsonl(model, None, [*records, {"id": "b", "prompt": list(range(3, 12))}], out,
                                   cache_len=8, progress=False)
    assert not list(tmp_path.glob("out.jsonl*"))


# ------------------------------------------------------------------------------------------------ scripts/sample.py

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bpe_ckpt(tmp_path_factory):
    """A tiny w2s-built Llama checkpoint with a real (trained BPE) tokenizer: text prompts, stop strings, EOS."""
    from w2s.config import ModelConfig
    from w2s.model import Transformer
    from w2s.tokenizer import train_bpe

    tok = train_bpe(["Question: what is 1+1?\nAnswer: 2", "Question: name a colour.\nAnswer: red"] * 20,
                    vocab_size=300)
    cfg = ModelConfig(family="llama", vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      head_dim=8, hidden_dim=64, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    model = Transformer(cfg).init_weights(std=0.2, generator=torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("bpe_ckpt")
    w2s.save_model(model, path, tokenizer=tok)
    return path


def run_script(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "sample.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_sample_script_equals_generate_to_jsonl(bpe_ckpt, tmp_path):
    """`python scripts/sample.py` (what `w2s sample` runs) writes exactly what generate_to_jsonl writes in-process
    with the same options, with text prompts under a custom key, line-number ids, and an escaped stop string; the
    script runs with chunked prefill, which changes no sample."""
    prompts = tmp_path / "prompts.jsonl"
    texts = ["Question: what is 2+3?\nAnswer:", "Question: name a fruit.\nAnswer:", "Question: 7?\nAnswer:"]
    prompts.write_text("".join(json.dumps({"q": t}) + "\n" for t in texts))
    out = tmp_path / "out.jsonl"
    proc = run_script(bpe_ckpt, "--input", prompts, "--output", out, "--prompt-key", "q", "--id-key", "", "-n", 2,
                      "--temperature", 1.0, "--top-p", 0.95, "--max-new-tokens", 12, "--stop", "\\n", "--seed", 4,
                      "--max-batch", 3, "--prefill-chunk", 5, "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]

    model, tok = w2s.load_model(bpe_ckpt, dtype=torch.float32), w2s.load_tokenizer(bpe_ckpt)
    records = [{"q": t, "id": i} for i, t in enumerate(texts)]
    expected = sampling_jsonl.generate_to_jsonl(model, tok, records, tmp_path / "ref.jsonl", prompt_key="q", n=2,
                                          temperature=1.0, top_p=0.95, max_new_tokens=12, stop=["\n"], seed=4,
                                          max_batch=3, progress=False)
    assert out.read_bytes() == expected.read_bytes()
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in lines] == [0, 1, 2] and all(len(r["completions"]) == 2 for r in lines)
    assert all("\n" not in c["text"] for r in lines for c in r["completions"])


def test_sample_script_bad_line_is_one_line_error(bpe_ckpt, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "Question: 1?\\nAnswer:"}\n{"id": "b", "prompt": \n')
    proc = run_script(bpe_ckpt, "--input", prompts, "--output", tmp_path / "out.jsonl")
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [f"Error: {prompts}:2: not valid JSON (Expecting value at column 23)"]
    assert not list(tmp_path.glob("out.jsonl*"))
    prompts.write_text('{"id": "a", "prompt": "Question: 1?\\nAnswer:"}\n')
    proc = run_script(bpe_ckpt, "--input", prompts, "--output", tmp_path / "out.jsonl", "-n", "0")
    assert proc.returncode == 2 and "Invalid value for '-n' / '--n': 0 is not in the range x>=1" in proc.stderr
    assert not list(tmp_path.glob("out.jsonl*"))  # refused before the model loads and the run's options are recorded
    # a run that failed before writing anything (its prompt does not fit the cache) binds no rerun to its options
    proc = run_script(bpe_ckpt, "--input", prompts, "--output", tmp_path / "out.jsonl", "--cache-len", "4")
    assert proc.returncode != 0 and "KV cache holds 4 positions" in proc.stderr
    proc = run_script(bpe_ckpt, "--input", prompts, "--output", tmp_path / "out.jsonl", "--max-new-tokens", "4")
    assert proc.returncode == 0, proc.stderr[-2000:]


# ------------------------------------------------------------------------------------------------ CUDA graphs


def test_cpu_never_captures_cuda_graphs(ckpt, monkeypatch):
    """The graph path is on by default for CUDA only: on CPU the decode step runs eagerly (no CUDAGraph is built),
    and asking for graphs on CPU is a clear error, not a silent fallback."""
    model, _ = load(ckpt, "llama2")

    def no_graphs(*args, **kwargs):
        raise AssertionError("a CUDA graph was requested on CPU")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", no_graphs)
    outs = generate(model, None, [[1, 5, 6]], max_new_tokens=5, progress=False)
    assert outs[0][0]["num_tokens"] == 5
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA model"):
        generate(model, None, [[1, 5, 6]], cuda_graphs=True, progress=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["llama2", "gemma", "gemma2"])
def test_cuda_graph_decode_equals_eager(family, ckpt):
    """Replaying the captured decode step gives the same greedy and seeded samples as running it eagerly (fp32,
    Triton kernels), across several attention limits (sequences grow past 64 positions); so do the captured steps
    of chunked prefill and of the per-prompt cascade (its tables rewritten in place between replays), apart and
    together."""
    model = w2s.load_model(ckpt(family)[0], dtype=torch.float32, device="cuda")
    prompts = random_prompts([5, 30, 2], seed=5, prefix=[1, 7])
    for kw in (dict(temperature=0.0), dict(n=2, temperature=1.0, top_p=0.9, seed=3)):
        eager = generate(model, None, prompts, max_new_tokens=80, max_batch=4, cuda_graphs=False, progress=False, **kw)
        graphs = generate(model, None, prompts, max_new_tokens=80, max_batch=4, cuda_graphs=True, progress=False, **kw)
        chunked = generate(model, None, prompts, max_new_tokens=80, max_batch=4, cuda_graphs=True, prefill_chunk=16,
                           progress=False, **kw)  # mixed steps captured as graphs of their own
        cascaded = generate(model, None, prompts, max_new_tokens=80, max_batch=4, cuda_graphs=True,
                            prompt_cascade=True, progress=False, **kw)
        both = generate(model, None, prompts, max_new_tokens=80, max_batch=4, cuda_graphs=True, prefill_chunk=16,
                        prompt_cascade=True, progress=False, **kw)
        assert graphs == eager == chunked == cascaded == both


def test_stop_string_ends_decoding_early(ckpt, monkeypatch):
    """A stop string is found at the next host look (every sync_every steps), not only when the budget runs out:
    the number of decode steps is bounded by where the stop string appears, not by max_new_tokens."""
    model, _ = load(ckpt, "llama2")
    tok = CharTokenizer(stop_ids=())
    free = generate(model, tok, ["hello world"], max_new_tokens=12, progress=False)[0][0]["text"]
    stop = free[6:8]
    steps = []
    real_step = Engine.step
    monkeypatch.setattr(Engine, "step", lambda self, limit, mixed=False: steps.append(limit) or real_step(self, limit))
    out = generate(model, tok, ["hello world"], max_new_tokens=200, stop=[stop], sync_every=3, progress=False)[0][0]
    assert out["finish_reason"] == "stop" and out["text"] == free[: free.index(stop)]
    assert len(steps) <= out["num_tokens"] + 3


def test_a_vocabulary_padded_past_the_tokenizer_never_draws_the_padding():
    """A checkpoint whose embedding has more rows than its tokenizer has tokens (padded to a round size): ids past
    the tokenizer have no text, so the sampler never draws them (decoding one would fail the whole run)."""
    from w2s.config import ModelConfig
    from w2s.model import Transformer
    from w2s.tokenizer import train_bpe

    tok = train_bpe(["Question: what is 1+1?\nAnswer: 2", "Question: name a colour.\nAnswer: red"] * 20,
                    vocab_size=300)
    padded = tok.vocab_size + 64
    cfg = ModelConfig(family="llama", vocab_size=padded, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                      hidden_dim=64, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    model = Transformer(cfg).init_weights(std=0.2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.lm_head_weight()[tok.vocab_size:] *= 50  # the padding rows would win most draws and every argmax
    prompts = ["Question: what is 1+1?\nAnswer:", "Question: name a colour.\nAnswer:"]
    for temperature in (0.0, 1.0):
        outs = generate(model, tok, prompts, n=4, temperature=temperature, max_new_tokens=12, stop=["\n"],
                        progress=False)
        ids = [i for cs in outs for c in cs for i in c["token_ids"]]
        assert ids and max(ids) < tok.vocab_size


def test_top_p_stops_at_the_token_whose_mass_reaches_it_exactly():
    """Four equally likely tokens (probabilities exactly 1/4): two of them reach top_p=0.5, so two are kept and the
    others never drawn (transformers' TopPLogitsWarper drops the tokens whose ascending cumulative mass is
    <= 1 - top_p); a top_p just above 0.5 needs a third token, 0.75 three."""
    u = torch.arange(1000) / 1000  # (1000,) uniforms spread over [0, 1)
    logits = torch.zeros(1000, 4)  # (1000, 4)
    for top_p, kept in ((0.5, 2), (0.5000001, 3), (0.75, 3), (1.0, 4)):
        drawn = sample_from_logits(logits, u, temperature=1.0, top_p=top_p)
        assert len(drawn.unique()) == kept, top_p


def test_a_stop_string_at_the_very_start_and_the_earliest_of_two(ckpt):
    """A stop string completed by the first generated tokens ends the completion with empty text; when the token that
    ends it completes two stop strings, the text is cut before the one that starts first (whatever the order of
    `stop`)."""
    model, _ = load(ckpt, "llama2")
    never = CharTokenizer(stop_ids=())
    free = generate(model, never, ["abc"], max_new_tokens=16, progress=False)[0][0]
    ids, text = free["token_ids"], free["text"]
    assert never.decode(ids[:2]) == text[:2]  # the first two tokens are characters

    for n_chars in (1, 2):  # token_ids end at the first token whose text completes the stop string
        out = generate(model, never, ["abc"], max_new_tokens=16, stop=[text[:n_chars]], progress=False)[0][0]
        assert (out["finish_reason"], out["text"], out["token_ids"]) == ("stop", "", ids[:n_chars])

    # token i is the first to show its character: it completes both text[i - 1 : i + 1] and text[i]
    i = next(i for i in range(2, len(text)) if text[i] not in text[:i])
    out = generate(model, never, ["abc"], max_new_tokens=16, stop=[text[i], text[i - 1 : i + 1]], progress=False)
    assert out[0][0]["finish_reason"] == "stop" and out[0][0]["text"] == text[: i - 1]


def test_a_prompt_that_is_a_prefix_of_another_matches_transformers(ckpt):
    """The shared prefix is at most the shortest prompt less its last token, which must still run to give that
    prompt's next-token logits: greedy completions of prompts that are prefixes of each other equal transformers'."""
    model, hf = load(ckpt, "llama2")
    prompts = [[1, 40, 41, 42], [1, 40, 41, 42, 43], [1, 40, 41, 42, 43, 44, 45]]
    outs = generate(model, None, prompts, max_new_tokens=6, progress=False)
    for prompt, (out,) in zip(prompts, outs):
        ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=2)
        assert out["token_ids"] == ref[0, len(prompt):].tolist()


def test_the_last_id_below_text_vocab_can_be_drawn(ckpt):
    """text_vocab=t keeps ids 0..t-1, t-1 included: with t one past the largest id a greedy run emits, the
    restricted run emits the same tokens (each step's argmax is still allowed)."""
    model, _ = load(ckpt, "llama2")
    prompt = [1, 5, 9, 13]
    kw = dict(temperature=0.0, top_k=0, top_p=1.0, max_new_tokens=6, seed=0, eos_ids=[], slots=1, cache_len=16)
    (_, (free,)), = Engine(model, [prompt], 1, **kw).run()
    top = max(free["token_ids"])
    assert top < VOCAB - 1  # a real restriction
    (_, (kept,)), = Engine(model, [prompt], 1, text_vocab=top + 1, **kw).run()
    assert kept["token_ids"] == free["token_ids"]


def test_a_stop_string_across_two_host_looks_is_found_at_the_next_look(ckpt, monkeypatch):
    """sync_every=1: each host look sees one new token; a 2-character stop string whose first token was seen at the
    previous look is still found at the look after its second token (the look re-reads a few earlier tokens), so
    decoding ends there instead of running to max_new_tokens."""
    model, _ = load(ckpt, "llama2")
    never = CharTokenizer(stop_ids=())
    ids = generate(model, never, ["hello world"], max_new_tokens=16, progress=False)[0][0]["token_ids"]
    # tokens k-1, k are characters and their text first appears when token k is generated
    k = next(k for k in range(4, 16) if len(never.decode(ids[k - 1 : k + 1])) == 2
             and never.decode(ids[k - 1 : k + 1]) not in never.decode(ids[:k]))
    stop = never.decode(ids[k - 1 : k + 1])
    steps = []
    real_step = Engine.step
    monkeypatch.setattr(Engine, "step", lambda self, limit, mixed=False: steps.append(limit) or real_step(self, limit))
    out = generate(model, never, ["hello world"], max_new_tokens=100, stop=[stop], sync_every=1, progress=False)[0][0]
    assert out["finish_reason"] == "stop" and out["token_ids"] == ids[: k + 1]
    assert len(steps) == k  # token 0 comes from the prefill, tokens 1..k from one decode step each


def test_options_and_prompts_at_the_edge_of_what_is_refused(ckpt):
    """Each limit on both sides: an empty prompt, top_k < 0, n < 1 and top_p > 1 are refused by name; a prompt
    filling the whole cache is refused, one position short of it leaves room for exactly one token."""
    model, _ = load(ckpt, "llama2")
    with pytest.raises(ValueError, match=r"^prompt 1: expected a non-empty string or list of token ids"):
        generate(model, None, [[1, 2], []], max_new_tokens=2, progress=False)
    with pytest.raises(ValueError, match=r"^top_k=-1: expected >= 0$"):
        generate(model, None, [[1, 5]], temperature=1.0, top_k=-1, progress=False)
    with pytest.raises(ValueError, match=r"^n=0, max_new_tokens=2, .* must all be >= 1$"):
        generate(model, None, [[1, 5]], n=0, max_new_tokens=2, progress=False)
    with pytest.raises(ValueError, match=r"^top_p=1.2: expected 0 < top_p <= 1$"):
        generate(model, None, [[1, 5]], temperature=1.0, top_p=1.2, progress=False)
    with pytest.raises(ValueError, match=r"^prompt 0 has 4 tokens but the KV cache holds 4 positions"):
        generate(model, None, [[1, 5, 6, 7]], max_new_tokens=3, cache_len=4, progress=False)
    free = generate(model, None, [[1, 5, 6, 7]], max_new_tokens=3, progress=False)[0][0]["token_ids"]
    (out,), = generate(model, None, [[1, 5, 6, 7]], max_new_tokens=3, cache_len=5, progress=False)
    assert out["token_ids"] == free[:1] and out["finish_reason"] == ("eos" if free[0] == 2 else "length")


def test_stop_as_one_string_and_empty_stop_strings(ckpt):
    """stop="xy" is the single stop string "xy" (not the stop strings "x" and "y"); an empty stop string, which
    every text contains, is ignored instead of ending every completion at its first token."""
    model, _ = load(ckpt, "llama2")
    never = CharTokenizer(stop_ids=())
    free = generate(model, never, ["abc"], max_new_tokens=16, progress=False)[0][0]
    text = free["text"]
    assert generate(model, never, ["abc"], max_new_tokens=16, stop=[""], progress=False)[0][0] == free
    stop = next(text[i : i + 2] for i in range(2, len(text) - 1) if text[i + 1] not in text[: i + 1])
    out = generate(model, never, ["abc"], max_new_tokens=16, stop=stop, progress=False)[0][0]
    assert out["finish_reason"] == "stop" and out["text"] == text[: text.index(stop)]
    assert stop in never.decode(out["token_ids"]) and stop not in never.decode(out["token_ids"][:-1])


def test_jsonl_empty_prompts_other_prompts_and_repeated_ids_are_refused(ckpt, tmp_path):
    """An empty string or an empty id list is no prompt; a finished line whose prompt is not the input's under the
    same id (another input file) and repeated ids are refused instead of mixing or overwriting samples."""
    prompts = tmp_path / "prompts.jsonl"
    for empty in ('""', "[]"):
        prompts.write_text('{"id": 1, "prompt": "ab"}\n{"id": 2, "prompt": ' + empty + "}\n")
        with pytest.raises(ValueError, match=r"prompts.jsonl:2: expected key 'prompt' with a non-empty string"):
            sampling_jsonl.read_prompts_jsonl(prompts)

    model, _ = load(ckpt, "llama2")
    out = tmp_path / "out.jsonl"
    with pytest.raises(ValueError, match=r"^records: 'id' values are not unique$"):
        sampling_jsonl.generate_to_jsonl(model, None, [{"id": "a", "prompt": [1, 5]}, {"id": "a", "prompt": [1, 6]}],
                                         out, max_new_tokens=2, progress=False)
    (tmp_path / "out.jsonl.part0").write_text('{"id": "a", "prompt": [1, 7], "completions": []}\n')
    with pytest.raises(ValueError, match=r'id "a" was sampled from another prompt than the input\'s'):
        sampling_jsonl.generate_to_jsonl(model, None, [{"id": "a", "prompt": [1, 5]}], out, max_new_tokens=2,
                                         progress=False)


def test_jsonl_run_meta_binds_only_a_run_that_wrote_something(tmp_path):
    """The options record binds a resume only once a completion exists: with no output or only an empty part file (a
    run killed before its first prompt finished) other options start afresh; one finished line binds them. Options
    are compared as stored in JSON, so a tuple matches the list it was written as."""
    out = tmp_path / "out.jsonl"
    sampling_jsonl.write_run_meta(out, {"n": 1, "stop": ("\n",)})
    assert sampling_jsonl.check_run_meta(out, {"n": 2, "stop": ["\n"]}) is True
    part = tmp_path / "out.jsonl.part0"
    part.write_text("")
    assert sampling_jsonl.check_run_meta(out, {"n": 2, "stop": ["\n"]}) is True
    part.write_text('{"id": "a", "completions": []}\n')
    assert sampling_jsonl.check_run_meta(out, {"n": 1, "stop": ("\n",)}) is False
    with pytest.raises(ValueError, match=r"out.jsonl: was sampled with other options \(n 1, now 2\)"):
        sampling_jsonl.check_run_meta(out, {"n": 2, "stop": ("\n",)})


def test_jsonl_final_file_is_in_input_order_not_the_order_lines_were_written(ckpt, tmp_path):
    """A resumed run appends the prompts it samples after the lines a killed run left: the final file still lists
    the records in input order."""
    model, _ = load(ckpt, "llama2")
    records = [{"id": "a", "prompt": [1, 5]}, {"id": "b", "prompt": [1, 6]}]
    out = tmp_path / "out.jsonl"
    (tmp_path / "out.jsonl.part0").write_text('{"id": "b", "prompt": [1, 6], "completions": []}\n')
    sampling_jsonl.generate_to_jsonl(model, None, records, out, max_new_tokens=2, progress=False)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in lines] == ["a", "b"] and lines[1]["completions"] == []
