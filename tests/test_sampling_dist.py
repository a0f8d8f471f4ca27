"""Tensor parallel (tp=2) and data parallel (dp=2) sampling under torchrun, 2 CPU processes over gloo, against one
process: greedy completions, seeded samples and the jsonl files must be identical. One torchrun launch covers every
family (startup costs seconds); the worker is tests/dist_sample_worker.py. The split rules, the sliced loader, the
row projections' partial sums and the group layout are also checked in this process, with torch.distributed stood
in for where they would call it.

    python -m pytest -q tests/test_sampling_dist.py
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_tiny import FAMILIES, VOCAB, save_hf, save_llama_with_biases, store_output_matrix

import w2s
from w2s.sampling import generate
from w2s.sampling_engine import Engine
from w2s.sampling_jsonl import generate_to_jsonl
from w2s.tensor_parallel import check_divisible, kv_heads_of_rank, shard_slice

ROOT = Path(__file__).resolve().parents[1]
# Ragged prompts with a shared prefix; 5 prompts so the dp shards are uneven (3 + 2) and slots get refilled.
PROMPTS_SEED = 11


def make_prompts():
    g = torch.Generator().manual_seed(PROMPTS_SEED)
    prefix = [1, 17, 18, 19]
    return [prefix + torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (3, 9, 1, 6, 4)]


OPTIONS = dict(max_new_tokens=10, max_batch=2, sync_every=3)
SAMPLED = dict(n=2, temperature=1.0, top_p=0.9, seed=5, max_new_tokens=8, max_batch=3)
# cache_len 14 gives the prompts budgets of 1 to 9 tokens: slots free at different host looks and are refilled
# while decode runs, so the chunked run has mixed steps
CHUNKED = dict(n=2, temperature=1.0, seed=5, max_new_tokens=8, max_batch=3, cache_len=14, sync_every=2,
               prefill_chunk=3)


def save_lora_adapter(base, path):
    """A PEFT LoRA adapter on every projection of `base`, with random A and B (a real update), pointing at base."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(2)
    model = get_peft_model(transformers_model(base), LoraConfig(
        r=2, lora_alpha=4, init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.save_pretrained(path)
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    return path


def transformers_model(path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def run_worker(tmp_path, families, options, sampled, chunked=None):
    """Run tests/dist_sample_worker.py on 2 gloo processes over `families` {name: ckpt}; its result.json."""
    (tmp_path / "job.json").write_text(json.dumps({"prompts": make_prompts(), "families": families,
                                                   "options": options, "sampled_options": sampled,
                                                   "chunked_options": chunked}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "dist_sample_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((tmp_path / "result.json").read_text())


def check_against_one_process(tmp_path, result, families, options, sampled):
    """Every tp / dp result of the worker equals this process's run of the same options (jsonl bytes too)."""
    prompts = make_prompts()
    records = [{"id": f"r{i}", "prompt": p} for i, p in enumerate(prompts)]
    for family, ckpt in families.items():
        model = w2s.load_model(ckpt, dtype=torch.float32)
        greedy = generate(model, None, prompts, progress=False, **options)
        assert any(c["finish_reason"] == "length" for (c,) in greedy)  # the comparison covers real decoding
        assert result[f"{family}/tp/greedy"] == greedy, family
        if f"{family}/tp_in_memory/greedy" in result:
            assert result[f"{family}/tp_in_memory/greedy"] == greedy, family
        assert result[f"{family}/dp/greedy"] == greedy, family
        assert result[f"{family}/dp/sampled"] == generate(model, None, prompts, progress=False, **sampled), family
        one = generate_to_jsonl(model, None, records, tmp_path / f"{family}_one.jsonl", progress=False, **options)
        for mode in ("tp", "dp"):
            assert (tmp_path / f"{family}_{mode}.jsonl").read_bytes() == one.read_bytes(), (family, mode)
    assert not list(tmp_path.glob("*.part*")), "part files must be merged and removed"


def test_tp2_and_dp2_equal_one_process(tmp_path):
    """Every family (GQA split, Gemma's single kv head replicated, sliding windows, soft-caps, tied embeddings), a
    Gemma whose checkpoint stores an output matrix of its own (loaded untied), a Llama with biases, LoRA adapters (a
    tp rank merges its slice of the adapter): tp=2 and dp=2 give exactly the one-process greedy completions, samples
    and jsonl bytes; an in-memory split of an already loaded model (apply_tensor_parallel) agrees too."""
    families = {}
    for family in FAMILIES:
        families[family] = str(tmp_path / family)
        save_hf(family, tmp_path / family)
    families["llama_bias"] = str(tmp_path / "llama_bias")
    save_llama_with_biases(tmp_path / "llama_bias")
    families["gemma_untied"] = str(tmp_path / "gemma_untied")  # a tied config storing another output matrix
    save_hf("gemma", tmp_path / "gemma_untied")
    store_output_matrix(tmp_path / "gemma_untied")
    for family in ("llama2", "gemma"):  # LoRA adapter directories: each rank merges its slice of the adapter
        families[f"{family}_lora"] = str(save_lora_adapter(tmp_path / family, tmp_path / f"{family}_lora"))
    result = run_worker(tmp_path, families, OPTIONS, SAMPLED)
    check_against_one_process(tmp_path, result, families, OPTIONS, SAMPLED)
    assert "llama2/tp_in_memory/greedy" in result


def test_tp2_with_fused_projections_equals_one_process(tmp_path, monkeypatch):
    """The same with q/k/v and gate/up fused (w2s/fused.py; the CUDA default): each tp rank fuses its own slices
    (GQA heads, Gemma's replicated kv head, sliced biases) and gives the one-process completions, which equal the
    unfused ones. Chunked prefill at tp=2 gives the one-process samples without it."""
    families = {"llama2": str(tmp_path / "llama2"), "gemma": str(tmp_path / "gemma"),
                "llama_bias": str(tmp_path / "llama_bias")}
    save_hf("llama2", tmp_path / "llama2")
    save_hf("gemma", tmp_path / "gemma")
    save_llama_with_biases(tmp_path / "llama_bias")
    fused, fused_sampled = {**OPTIONS, "fused_projections": True}, {**SAMPLED, "fused_projections": True}
    chunked = {**CHUNKED, "fused_projections": True}
    result = run_worker(tmp_path, families, fused, fused_sampled, chunked)
    check_against_one_process(tmp_path, result, families, fused, fused_sampled)
    kinds = []  # for each decode step: mixed (it carried prompt tokens) or not
    real_step = Engine.step

    def step(self, limit, mixed=False):
        kinds.append(mixed)
        return real_step(self, limit, mixed)

    monkeypatch.setattr(Engine, "step", step)
    for family, ckpt in families.items():
        model = w2s.load_model(ckpt, dtype=torch.float32)
        unfused = generate(model, None, make_prompts(), progress=False, **OPTIONS)
        assert result[f"{family}/tp/greedy"] == unfused, family
        unchunked = generate(model, None, make_prompts(), progress=False, **{**CHUNKED, "prefill_chunk": 0})
        kinds.clear()
        assert generate(model, None, make_prompts(), progress=False, **CHUNKED) == unchunked, family
        assert any(kinds), family  # the options do refill slots while decode runs: there are mixed steps
        assert result[f"{family}/tp/chunked"] == unchunked, family


def test_a_split_models_row_projections_sum_over_the_ranks_to_the_full_one_with_the_bias_once(monkeypatch):
    """apply_tensor_parallel on each rank of tp=2, in one process: the column-split q/k/v/gate/up projections give
    the rank's slice of the full output (bias included), and the row-split o/down ones, fed the rank's slice of the
    input, give partial outputs (what each rank's all-reduce receives) that sum to the full projection with its bias
    added once. The reference is the unsplit model's own nn.Linear."""
    import copy

    import torch.distributed as dist

    from w2s.tensor_parallel import apply_tensor_parallel

    cfg = w2s.ModelConfig(family="llama", vocab_size=VOCAB, dim=32, n_layers=1, n_heads=4, n_kv_heads=2,
                          head_dim=8, hidden_dim=48, attention_bias=True, mlp_bias=True)
    g = torch.Generator().manual_seed(0)
    full = w2s.Transformer(cfg).init_weights(std=0.2, generator=g)
    with torch.no_grad():
        for name, p in full.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 1.0, generator=g)  # init_weights zeroes biases: make adding one twice visible
    received = []  # the partial outputs the row projections hand to the all-reduce, in call order
    monkeypatch.setattr(dist, "all_reduce", lambda t, *args, **kwargs: received.append(t.clone()))
    attn, mlp = full.layers[0].self_attn, full.layers[0].mlp
    x, x_heads, x_hidden = (torch.randn(2, 3, n, generator=g) for n in (32, 32, 48))
    rows = {"o_proj": [], "down_proj": []}
    for rank in range(2):
        split = apply_tensor_parallel(copy.deepcopy(full), None, rank, 2)
        s_attn, s_mlp = split.layers[0].self_attn, split.layers[0].mlp
        assert (s_attn.cfg.n_heads, s_attn.cfg.n_kv_heads) == (2, 1)
        with torch.no_grad():
            for proj, width in (("q_proj", 16), ("k_proj", 8), ("v_proj", 8)):
                mine = getattr(attn, proj)(x)[..., rank * width:(rank + 1) * width]
                torch.testing.assert_close(getattr(s_attn, proj)(x), mine, rtol=0, atol=1e-6, msg=proj)
            for proj in ("gate_proj", "up_proj"):
                mine = getattr(mlp, proj)(x)[..., rank * 24:(rank + 1) * 24]
                torch.testing.assert_close(getattr(s_mlp, proj)(x), mine, rtol=0, atol=1e-6, msg=proj)
            received.clear()
            s_attn.o_proj(x_heads[..., rank * 16:(rank + 1) * 16])
            s_mlp.down_proj(x_hidden[..., rank * 24:(rank + 1) * 24])
        assert len(received) == 2  # each row projection's output goes through the all-reduce
        rows["o_proj"].append(received[0])
        rows["down_proj"].append(received[1])
    with torch.no_grad():
        torch.testing.assert_close(sum(rows["o_proj"]), attn.o_proj(x_heads), rtol=0, atol=1e-5)
        torch.testing.assert_close(sum(rows["down_proj"]), mlp.down_proj(x_hidden), rtol=0, atol=1e-5)


@pytest.mark.parametrize("n_kv_heads,tp", [(4, 2), (2, 2), (1, 2), (2, 4)])
def test_shards_tile_the_weights(n_kv_heads, tp):
    """Hand check of the split rules: over the tp ranks the slices of q/gate (rows) and o/down (columns) tile the
    full tensors exactly once, and every rank's kv heads are exactly the ones its query heads use (GQA group H / K;
    replicated on tp / K ranks when K < tp)."""
    cfg = w2s.ModelConfig(family="llama", vocab_size=VOCAB, dim=64, n_layers=1, n_heads=8, n_kv_heads=n_kv_heads,
                          head_dim=8, hidden_dim=96)
    H, K, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    for name, dim, size in (("self_attn.q_proj.weight", 0, H * hd), ("mlp.gate_proj.weight", 0, cfg.hidden_dim),
                            ("self_attn.o_proj.weight", 1, H * hd), ("mlp.down_proj.weight", 1, cfg.hidden_dim)):
        covered = []
        for r in range(tp):
            d, start, length = shard_slice(f"layers.0.{name}", cfg, r, tp)
            assert d == dim
            covered += list(range(start, start + length))
        assert covered == list(range(size)), name
    assert shard_slice("embed_tokens.weight", cfg, 1, tp) is None
    assert shard_slice("layers.0.self_attn.o_proj.bias", cfg, 1, tp) is None
    for r in range(tp):
        first, count = kv_heads_of_rank(cfg, r, tp)
        q_heads = range(r * H // tp, (r + 1) * H // tp)
        assert {h // (H // K) for h in q_heads} == set(range(first, first + count))
        assert shard_slice("layers.0.self_attn.k_proj.weight", cfg, r, tp) == (0, first * hd, count * hd)


def test_a_tensor_parallel_rank_loads_its_slices_in_the_asked_dtype_frozen_for_inference(tmp_path, monkeypatch):
    """load_model_tp for each rank of tp=2, in one process (torch.distributed stood in for: the load itself makes no
    collective): every tensor is the checkpoint's, read with safetensors here, cut by the module docstring's rule
    (4 heads of 8 dims and 2 kv heads: rank r keeps q rows [16r, 16r+16), k/v rows [8r, 8r+8), gate/up rows
    [24r, 24r+24), o columns [16r, 16r+16), down columns [24r, 24r+24)); o/down biases whole on rank 0 and zero on
    rank 1; embeddings, norms and lm_head whole; all in the asked dtype, frozen, the model in eval mode."""
    import torch.distributed as dist
    from safetensors.torch import load_file

    from w2s.checkpoint import hf_name, save_model
    from w2s.tensor_parallel import load_model_tp

    cfg = w2s.ModelConfig(family="llama", vocab_size=VOCAB, dim=32, n_layers=1, n_heads=4, n_kv_heads=2,
                          head_dim=8, hidden_dim=48, attention_bias=True, mlp_bias=True, tie_embeddings=False)
    g = torch.Generator().manual_seed(0)
    model = w2s.Transformer(cfg).init_weights(std=0.2, generator=g)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g))  # nonzero biases and norms
    save_model(model, tmp_path / "ckpt")
    state = load_file(tmp_path / "ckpt" / "model.safetensors")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "new_group", lambda ranks: tuple(ranks))
    rows = {"q_proj": 16, "k_proj": 8, "v_proj": 8, "gate_proj": 24, "up_proj": 24}
    columns = {"o_proj": 16, "down_proj": 24}
    for rank in range(2):
        monkeypatch.setattr(dist, "get_rank", lambda: rank)
        model = load_model_tp(tmp_path / "ckpt", tp=2, dtype=torch.bfloat16)
        assert not model.training and (model.tp_size, model.tp_rank) == (2, rank)
        named = dict(model.named_parameters())
        assert len(named) == len(state) and "lm_head.weight" in named
        for name, param in named.items():
            full, (proj, kind) = state[hf_name(name)], name.split(".")[-2:]
            if proj in rows:
                expected = full[rank * rows[proj]:(rank + 1) * rows[proj]]
            elif proj in columns and kind == "weight":
                expected = full[:, rank * columns[proj]:(rank + 1) * columns[proj]]
            elif proj in columns:  # a row-split bias: the all-reduce adds rank 0's alone
                expected = full if rank == 0 else torch.zeros_like(full)
            else:
                expected = full
            assert param.dtype == torch.bfloat16 and not param.requires_grad, name
            assert torch.equal(param, expected.to(torch.bfloat16)), name


@pytest.mark.parametrize("rank", range(6))
def test_tensor_parallel_groups_are_consecutive_ranks(monkeypatch, rank):
    """tp_group_for at world 6, tp 3: every rank creates the groups [0, 1, 2] and [3, 4, 5] in that order (new_group
    is collective) and gets the one holding it, with its place in it; a tp that does not divide the world is
    refused. torch.distributed is stood in for, so one process plays each rank."""
    import torch.distributed as dist

    from w2s.tensor_parallel import tp_group_for

    made = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 6)
    monkeypatch.setattr(dist, "get_rank", lambda: rank)
    monkeypatch.setattr(dist, "new_group", lambda ranks: made.append(ranks) or tuple(ranks))
    assert tp_group_for(3) == (tuple(range(rank // 3 * 3, rank // 3 * 3 + 3)), rank % 3)
    assert made == [[0, 1, 2], [3, 4, 5]]
    for tp in (4, 0):
        with pytest.raises(ValueError, match=f"tensor parallel size {tp} must divide the world size 6"):
            tp_group_for(tp)


def test_indivisible_split_is_a_clear_error():
    cfg = w2s.ModelConfig(family="llama", vocab_size=VOCAB, dim=64, n_layers=1, n_heads=6, n_kv_heads=3,
                          head_dim=8, hidden_dim=96)
    with pytest.raises(ValueError, match="tensor parallel size 4 must divide num_attention_heads=6"):
        check_divisible(cfg, 4)
    # the MLP width must split too, and the kv heads must divide tp or be a multiple of it (Gemma's single kv head
    # is replicated; 3 kv heads cannot be shared out over 2 ranks)
    cfg = cfg.replace(n_heads=8, n_kv_heads=2, hidden_dim=90)
    with pytest.raises(ValueError, match="tensor parallel size 4 must divide .* intermediate_size=90"):
        check_divisible(cfg, 4)
    with pytest.raises(ValueError, match="num_key_value_heads=3"):
        check_divisible(cfg.replace(n_heads=6, n_kv_heads=3, hidden_dim=96), 2)
    for kv_heads in (1, 2, 4, 8):
        check_divisible(cfg.replace(n_kv_heads=kv_heads, hidden_dim=96), 4)
