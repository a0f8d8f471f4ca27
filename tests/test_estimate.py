"""w2s/estimate.py: the dry run's cost model, against numbers worked out by hand.

    python -m pytest -q tests/test_estimate.py
"""

import dataclasses
import json

import pytest

from w2s import estimate, profile
from w2s.config import ModelConfig
from w2s.engine import Stage
from w2s.recipe import load_recipe
from w2s.runners import run_eval, run_labels, run_samples, run_stage1_sft

LLAMA2_70B = ModelConfig(family="llama", vocab_size=32000, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                         head_dim=128, hidden_dim=28672)
TINY = ModelConfig(family="llama", vocab_size=100, dim=8, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=4,
                   hidden_dim=16)


def test_lora_parameters_of_the_paper_adapters():
    # Rank 8 on q, k, v, o, gate, up, down of Llama-2-70B: 80 layers x 8 x (16,384 + 9,216 + 9,216 + 16,384 +
    # 3 x 36,864) = 103.5M parameters, 207 MB in bf16 like the released adapters.
    assert estimate.lora_parameters(LLAMA2_70B, 8) == 80 * 8 * 161_792 == 103_546_880


@pytest.fixture
def recipe(tmp_path):
    rows = [{"question": "q" * 36, "answer": "a" * 76 + "\n#### 7"} for _ in range(10)]  # 40-char prompt, 82 chars
    for name in ("train", "test"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("weak", "strong"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(TINY.to_hf()))
    (tmp_path / "r.toml").write_text("""
[data]
train = "train.jsonl"
test = "test.jsonl"
n_test = 4
[models]
weak = "weak"
strong = "strong"
dtype = "float32"
[sampling]
max_new_tokens = 15
sample_max_new_tokens = 400
max_batch = 3
[strong_sft]
epochs = 2
batch_size = 2
micro_batch_size = 1
activation_checkpointing = true
[stage2]
n_samples = 10
""")
    return load_recipe(tmp_path / "r.toml")


def test_workload_without_a_tokenizer_counts_four_characters_a_token(recipe):
    work = estimate.workload(recipe)
    assert (work.n_train_1, work.n_train_2, work.n_test) == (5, 5, 4)
    # "Question: " + 36 + "\nAnswer:" = 54 characters -> 13 tokens; the solution "a"*76 + "\n#### 7" = 83 -> 20.
    assert (work.prompt_tokens, work.response_tokens) == (13, 20)


def test_generation_cost(recipe):
    work = estimate.Workload(5, 5, 4, prompt_tokens=13, few_shot_tokens=100, response_tokens=20)
    labels = Stage("02_weak_labels", run_labels, [], {}, {"model": "01_weak_sft", "prompt": "zero_shot"})
    cost = estimate.stage_cost(labels, recipe, work, {"weak": TINY, "strong": TINY}, device="cpu")
    assert cost.generated == 5 * 1 * 15  # capped at max_new_tokens
    # weights (fp32) + k and v of 2 layers x 1 kv head x 4 dims x 4 bytes for 3 sequences of 13 + 15 positions
    assert cost.memory == TINY.n_params() * 4 + 2 * 2 * 1 * 4 * 4 * 3 * (13 + 15)
    assert cost.seconds is None  # no peak FLOP/s for a CPU
    samples = Stage("14_samples", run_samples, [], {}, {"model": "13_r2_sft_hybrid"})
    assert estimate.stage_cost(samples, recipe, work, {"weak": TINY, "strong": TINY}).generated == 5 * 10 * 20
    passk = Stage("32_passk", run_eval, [], {}, {"model": "13_r2_sft_hybrid", "prompt": "zero_shot", "n": 3})
    cost = estimate.stage_cost(passk, recipe, work, {"weak": TINY, "strong": TINY}, world=2, device="H100 SXM")
    assert cost.generated == 4 * 3 * 20
    per_token = profile.flops_per_token(TINY, seq_len=13 + 10, training=False)
    assert cost.seconds == pytest.approx(cost.generated * per_token / (estimate.SAMPLING_MFU * 989e12 * 2))


def test_training_cost(recipe):
    work = estimate.Workload(5, 10, 4, prompt_tokens=13, few_shot_tokens=100, response_tokens=20)
    sft = Stage("07_r1_sft_hybrid", run_stage1_sft, [], {}, {"filter": "04_r1_filter", "sft_set": "hybrid"})
    cost = estimate.stage_cost(sft, recipe, work, {"weak": TINY, "strong": TINY}, device="H100 SXM")
    # hybrid: 2 x 0.55 x 10 = 11 rows -> 6 steps of 2 rows per epoch, 2 epochs: 24 sequences of 33 tokens
    assert cost.trained == 24 * 33
    assert cost.disk == TINY.n_params() * 4  # full fine-tuning exports the whole model in fp32
    n, embeddings = TINY.n_params(), TINY.n_params() - TINY.n_params(embeddings=False)
    per_block = TINY.n_params(embeddings=False) / 2
    # 16 B of state per parameter + gathered bf16 root and two blocks + checkpointed activations of 1 x 33 tokens
    # (every block's bf16 input, one block's saved tensors: 2 (4 D + 2 H hd + 2 KV hd + 3 F) bytes a token) + the
    # output matrix's bf16 gradient the fused loss keeps for the backward (full fine-tuning)
    one_block = 2 * (4 * 8 + 2 * 2 * 4 + 2 * 1 * 4 + 3 * 16) * 33
    assert cost.memory == int(16 * n + 2 * (embeddings + 2 * per_block) + 2 * 8 * 33 * 2 + one_block + 2 * 100 * 8)
    flops = 24 * (33 * profile.flops_per_token(TINY, seq_len=33) - 13 * 6 * 100 * 8) + \
        24 * 33 * profile.flops_per_token(TINY, seq_len=33, training=False)  # + the forward recomputed in backward
    assert cost.seconds == pytest.approx(flops / (estimate.TRAIN_MFU * 989e12))


def test_pairs_hold_two_sequences_and_tensor_parallel_copies_the_embeddings_whole(recipe):
    """A preference micro-batch of P pairs runs 2P sequences (twice an SFT row's activations); a tp-sharded sampler
    splits the blocks over its ranks but holds the embedding and output matrices whole on each."""
    from w2s.estimate import _training_memory, activation_bytes
    from w2s.recipe import train_config

    tc = dataclasses.replace(train_config(recipe, "preference", progress=False), activation_checkpointing=False)
    sft, pairs = (_training_memory(TINY, tc, recipe, 33, 1, rows) for rows in (1, 2))
    assert pairs - sft == activation_bytes(TINY) * TINY.n_layers * tc.micro_batch_size * 33  # one more sequence a row
    work = estimate.Workload(5, 5, 4, prompt_tokens=13, few_shot_tokens=100, response_tokens=20)
    labels = Stage("02_weak_labels", run_labels, [], {}, {"model": "01_weak_sft", "prompt": "zero_shot"})
    recipe.sampling.weak_tp = 2
    cost = estimate.stage_cost(labels, recipe, work, {"weak": TINY, "strong": TINY}, device="cpu")
    embeddings = TINY.n_params() - TINY.n_params(embeddings=False)
    assert cost.memory == int(embeddings * 4 + (TINY.n_params(embeddings=False) * 4 + 2 * 2 * 1 * 4 * 4 * 3 * 28) / 2)


def test_lora_rank_of_each_trained_model_comes_from_its_own_section(recipe, tmp_path):
    """The rank a stage's model was trained with: [weak_sft] for the weak model, [preference] for every Stage II
    pairs model (round 2 on too), [grpo] for GRPO's, [strong_sft] for Stage I's (here full fine-tuning: None)."""
    from w2s.estimate import _lora_rank

    sections = "".join(f"[{section}]\nlora_rank = {rank}\n" for section, rank in
                       (("weak_sft", 2), ("preference", 8), ("grpo", 16)))
    (tmp_path / "r.toml").write_text((tmp_path / "r.toml").read_text() + sections)  # the fixture's recipe + these
    recipe = load_recipe(tmp_path / "r.toml")
    expected = {"strong": None, "01_weak_sft": 2, "07_r1_sft_hybrid": None, "13_r2_sft_hybrid": None, "16_dpo": 8,
                "17_orpo": 8, "39_round2_dpo": 8, "39_round3_orpo": 8, "16_grpo": 16}
    assert {model: _lora_rank(recipe, model) for model in expected} == expected
