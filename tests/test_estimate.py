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


# TINY by hand: 2 blocks of attention 8 x 4 x (2 x 2 + 2 x 1) = 192, MLP 3 x 8 x 16 = 384 and two norms of 8, the
# final norm, and untied embedding and output matrices of 100 x 8 each.
TINY_PARAMS = 2 * (192 + 384 + 16) + 8 + 2 * 100 * 8  # 2,792
# Rank-2 adapters on q, k, v, o, gate, up, down: 2 x (in + out) = 2 x (16 + 12 + 12 + 16 + 24 + 24 + 24) per block
TINY_LORA_2 = 2 * 2 * 128  # 512
TINY_ADAPTED = 2 * (64 + 32 + 32 + 64 + 128 + 128 + 128)  # elements of the adapted matrices: 1,152
TINY_WORK = estimate.Workload(5, 10, 4, prompt_tokens=13, few_shot_tokens=100, response_tokens=20)


def _costs(recipe, stages, runs=None):
    return estimate.stage_costs(stages, recipe, TINY_WORK, {"weak": TINY, "strong": TINY}, runs=runs)


def test_full_fine_tuning_host_memory_resume_state_and_reads(recipe):
    """Rank 0 reads the bf16 checkpoint (2 bytes a parameter) and casts it to fp32 (4) before sharding; a checkpoint
    holds 12 bytes per parameter (fp32 weight + two moments), two of them on disk while the second is written, none
    at the last step."""
    assert TINY.n_params() == TINY_PARAMS
    recipe.models.dtype = "bfloat16"
    sft = Stage("07_r1_sft_hybrid", run_stage1_sft, [], {}, {"filter": "04_r1_filter", "sft_set": "hybrid",
                                                             "init": "strong"})
    costs = {}
    for every in (5, 6, 12):  # 12 steps (6 per epoch, 2 epochs): saves after 5 and 10 / after 6 / none
        recipe.strong_sft["ckpt_every"] = every
        costs[every] = _costs(recipe, [sft])[0]
    assert [costs[every].resume for every in (5, 6, 12)] == [2 * 12 * 2792, 12 * 2792, 0]
    assert costs[5].host == 4 * 2792  # the fp32 copy; the read (2 x 2,792) and the bf16 export are smaller
    assert costs[5].read == 2 * 2792
    assert costs[5].read_seconds == 2 * 2792 / estimate.DISK_READ_BYTES_S


def test_a_70b_full_fine_tune_needs_a_terabyte_of_resume_state():
    from w2s.train_config import TrainConfig

    # 80 blocks of attention 8,192 x 128 x (2 x 64 + 2 x 8), MLP 3 x 8,192 x 28,672, two norms; final norm; embedding
    # and output matrices of 32,000 x 8,192: the 68,976,648,192 parameters of Llama-2-70B
    n = 80 * (8192 * 128 * 144 + 3 * 8192 * 28672 + 2 * 8192) + 8192 + 2 * 32000 * 8192
    assert LLAMA2_70B.n_params() == n == 68_976_648_192
    tc = TrainConfig(ckpt_every=50)
    assert estimate.resume_bytes(LLAMA2_70B, tc, steps=101) == 2 * 12 * n  # 1.66 TB while the second is written
    assert estimate.resume_bytes(LLAMA2_70B, tc, steps=100) == 12 * n  # 828 GB
    assert estimate.host_memory(LLAMA2_70B, tc, 2, world=8) == 4 * n  # 276 GB on rank 0: the fp32 cast
    # with cpu_offload rank 0 also keeps its eighth of the fp32 weights while it still holds the whole model, and
    # its eighth of weights, gradients and moments (16 bytes) while training
    offload = TrainConfig(cpu_offload=True)
    assert estimate.host_memory(LLAMA2_70B, offload, 2, world=8) == 4 * n + 4 * n / 8
    assert estimate.host_memory(LLAMA2_70B, offload, 2, world=2) == 16 * n / 2


@pytest.fixture
def lora_recipe(recipe, tmp_path):
    """The fixture's recipe with rank-2 LoRA for Stage I and Stage II, DPO's model merged, in bf16."""
    text = (tmp_path / "r.toml").read_text().replace("[strong_sft]\n", "[strong_sft]\nlora_rank = 2\n")
    (tmp_path / "r.toml").write_text(text + 'losses = ["dpo"]\nexport_merged = ["dpo"]\n'
                                            "[preference]\nlora_rank = 2\nckpt_every = 1\nmax_steps = 3\n")
    lora = load_recipe(tmp_path / "r.toml")
    lora.models.dtype = "bfloat16"
    return lora


def test_lora_stages_host_memory_fingerprint_and_merged_export(lora_recipe):
    """A LoRA stage keeps the bf16 base and fp32 adapters. DPO continuing M_plus's adapter reads base and adapter;
    its reference fingerprint takes two fp64 copies of the largest tensor (the 100 x 8 output matrix: 16 bytes an
    element); its merged export gathers the base and computes each adapted matrix in fp32 (12 bytes an element of
    the largest, 8 x 16), in place at tp > 1, beside the base at tp 1."""
    from w2s.recipe import train_config
    from w2s.runners import run_preference

    base, adapter = 2 * TINY_PARAMS, 4 * TINY_LORA_2
    dpo = Stage("16_dpo", run_preference, [], {}, {"pairs": "15_pairs", "init": "07_r1_sft_hybrid", "loss": "dpo"})
    lora_recipe.sampling.tp = 2
    cost = _costs(lora_recipe, [dpo])[0]
    assert cost.read == base + adapter
    assert cost.host == base + adapter + 16 * 800  # the fingerprint; the export needs base + adapter + 12 x 128
    assert cost.resume == 2 * 12 * TINY_LORA_2  # 3 steps, a checkpoint every step: two on disk at the third
    assert estimate.host_memory(TINY, train_config(lora_recipe, "preference"), 2, 1, merged=True,
                                tp_out=2) == adapter + base + 12 * 128
    sft = Stage("05_r1_sft_weak", run_stage1_sft, [], {}, {"filter": "04_r1_filter", "sft_set": "weak",
                                                           "init": "strong"})
    lora_recipe.strong_sft["export_merged"] = True
    assert _costs(lora_recipe, [sft])[0].host == adapter + base + 12 * 128  # merged in place at tp 2
    lora_recipe.sampling.tp = 1  # the runner keeps the base: the merged matrices are a second copy (bf16)
    assert _costs(lora_recipe, [sft])[0].host == adapter + base + 12 * 128 + 2 * TINY_ADAPTED
    assert _costs(lora_recipe, [sft])[0].read == base  # a fresh adapter: the base alone


def test_sampling_reads_only_what_the_stage_before_did_not_leave_in_memory(lora_recipe):
    """Weak SFT at weak_tp 1 leaves its model resident for the weak labels; the strong base stays resident between
    sampling stages of adapters on it (each reads its fp32 adapter); a training stage drops it, and at tp 1 keeps
    the base it trained a LoRA adapter on. A load holds one tensor at a time in host memory: here the 100 x 8
    embedding, whole on every tensor-parallel rank."""
    from w2s.runners import run_weak_sft

    base, adapter = 2 * TINY_PARAMS, 4 * TINY_LORA_2
    stages = [Stage("01_weak_sft", run_weak_sft, [], {}, {}),
              Stage("02_weak_labels", run_labels, [], {}, {"model": "01_weak_sft", "prompt": "zero_shot"}),
              Stage("03_icl_labels", run_labels, [], {}, {"model": "strong", "prompt": "few_shot"}),
              Stage("05_r1_sft_weak", run_stage1_sft, [], {}, {"filter": "04", "sft_set": "weak", "init": "strong"}),
              Stage("08_r2_labels_weak", run_labels, [], {}, {"model": "05_r1_sft_weak", "prompt": "zero_shot"}),
              Stage("09_r2_labels_icl", run_labels, [], {}, {"model": "06_r1_sft_icl", "prompt": "zero_shot"})]
    lora_recipe.sampling.tp = 2
    costs = _costs(lora_recipe, stages)
    assert [c.read for c in costs] == [base, 0, base, base, base + adapter, adapter]
    assert [c.host for c in costs[1:3]] == [0, 2 * 800]
    assert [c.host for c in costs[4:]] == [2 * 800 + adapter, adapter]
    assert _costs(lora_recipe, stages, runs=[True] * 4 + [False, True])[5].read == base + adapter  # 08 was done
    lora_recipe.sampling.tp = 1
    assert _costs(lora_recipe, stages)[4].read == adapter
    total = estimate.total_cost(costs)
    assert (total.read, total.host, total.resume) == (4 * base + 2 * adapter, max(c.host for c in costs), 0)


def test_a_dry_run_needs_only_the_models_config_json(recipe, tmp_path):
    """The checkpoints of the recipe fixture are bare config.json files: planning a run comes before downloading
    its weights (w2s/recipe.py's error for a missing checkpoint says so). Every stage is listed as to run."""
    from w2s.estimate import dry_run
    from w2s.pipeline import build_stages

    text = dry_run(tmp_path / "r.toml", runs_dir=tmp_path / "runs", world=8, device="H100 SXM")
    assert sorted(p.name for p in (tmp_path / "strong").iterdir()) == ["config.json"]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
    status = {row[0]: row[1] for row in cells if len(row) == 8}  # the first table: stage, status, why, ...
    assert [status.get(s.name) for s in build_stages(recipe)] == ["will run"] * len(build_stages(recipe))
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_a_split_file_decides_the_sizes_as_in_the_data_stage(recipe, tmp_path):
    """[data] split_file overrides n_train_1 / n_train_2 in the run (runners.run_data): the estimate counts its ids."""
    from w2s.tasks import load_records

    ids = [r["id"] for r in load_records("gsm8k", tmp_path / "train.jsonl")]
    (tmp_path / "split.json").write_text(json.dumps({"train_1": ids[:2], "train_2": ids[2:9]}))
    split = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, split_file=str(tmp_path / "split.json"),
                                                                 n_train_1=1, n_train_2=1))
    work = estimate.workload(split)
    assert (work.n_train_1, work.n_train_2, work.n_test) == (2, 7, 4)


def test_one_size_given_leaves_the_other_half_the_file_as_in_the_data_stage(recipe):
    """n_train_1 = 3 alone: the data stage takes 3 and half of the 10 records (split_train's default), not 10 - 3."""
    one = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, n_train_1=3))
    work = estimate.workload(one)
    assert (work.n_train_1, work.n_train_2) == (3, 5)


def test_total_adds_tokens_disk_reads_and_time_and_peaks_memory():
    """Stages run one after another: what they write and read and how long they take add up; per-device memory,
    host memory and the resume state (deleted after each stage) are the largest of any stage."""
    a = estimate.Cost(generated=1, trained=2, disk=3, memory=40, seconds=5.0, host=60, resume=7, read=8)
    b = estimate.Cost(generated=10, trained=20, disk=30, memory=4, seconds=50.0, host=6, resume=70, read=80)
    total = estimate.total_cost([a, b])
    assert (total.generated, total.trained, total.disk, total.read, total.seconds) == (11, 22, 33, 88, 55.0)
    assert (total.memory, total.host, total.resume) == (40, 60, 70)
    assert estimate.total_cost([a, estimate.Cost()]).seconds is None  # a stage of unknown time: the total is unknown


def test_largest_tensor_splits_only_the_block_projections_over_tensor_parallel_ranks():
    # A wide MLP (8 x 200 = 1,600 elements) outgrows the 100 x 8 = 800 embedding: whole at tp 1, half at tp 2,
    # where the embedding (copied whole on every rank) is as large again
    wide = dataclasses.replace(TINY, hidden_dim=200)
    assert [estimate.largest_tensor(wide, tp) for tp in (1, 2, 4)] == [1600, 800, 800]


def test_sampling_kv_cache_holds_the_prompt_and_the_token_limit_of_the_sequences_decoded_at_once(recipe):
    """The KV cache is allocated for prompt + max_new_tokens positions whatever the response's length, for
    min(max_batch, sequences) sequences; a few-shot prompt is the 4-shot prompt's length."""
    short = estimate.Workload(5, 2, 4, prompt_tokens=13, few_shot_tokens=100, response_tokens=10)
    configs = {"weak": TINY, "strong": TINY}
    labels = Stage("02_weak_labels", run_labels, [], {}, {"model": "01_weak_sft", "prompt": "zero_shot"})
    # 2 prompts < max_batch 3: 2 sequences of 13 + 15 positions; k and v, 2 layers x 1 kv head x 4 dims x 4 bytes
    assert estimate.stage_cost(labels, recipe, short, configs).memory == 4 * TINY_PARAMS + 2 * 2 * 1 * 4 * 4 * 2 * 28
    icl = Stage("03_icl_labels", run_labels, [], {}, {"model": "strong", "prompt": "few_shot"})
    assert estimate.stage_cost(icl, recipe, short, configs).memory == 4 * TINY_PARAMS + 2 * 2 * 1 * 4 * 4 * 2 * 115


def test_sampling_writes_generations_as_text_and_ids_labels_as_text_and_the_prompts(recipe):
    """5 greedy labels of 15 tokens: each token as text twice (generations and labels, BYTES_PER_TOKEN 4) and as a
    token id (7), plus the 5 prompts of 13 tokens as text."""
    labels = Stage("02_weak_labels", run_labels, [], {}, {"model": "01_weak_sft", "prompt": "zero_shot"})
    work = estimate.Workload(5, 5, 4, prompt_tokens=13, few_shot_tokens=100, response_tokens=20)
    cost = estimate.stage_cost(labels, recipe, work, {"weak": TINY, "strong": TINY})
    assert cost.disk == 75 * (4 + 4 + 7) + 5 * 13 * 4


def test_sampling_an_adapter_holds_a_merged_copy_of_the_adapted_matrices(lora_recipe):
    """A LoRA model is sampled from its bf16 base plus a bf16 merged copy of the matrices its adapter changes (every
    linear layer of a block here: 1,152 elements, not the norms), and the KV cache of 3 sequences of 13 + 15."""
    stage = Stage("08_r2_labels_weak", run_labels, [], {}, {"model": "05_r1_sft_weak", "prompt": "zero_shot"})
    cost = estimate.stage_cost(stage, lora_recipe, TINY_WORK, {"weak": TINY, "strong": TINY})
    assert cost.memory == 2 * TINY_PARAMS + 2 * TINY_ADAPTED + 2 * 2 * 1 * 4 * 2 * 3 * 28


def test_a_preference_pair_trains_two_sequences(recipe):
    """[preference] defaults (batch 32, one epoch): 0.5 x 10 questions x max_pairs 1 = 5 pairs in one step, each a
    chosen and a rejected sequence of 13 + 20 tokens."""
    from w2s.runners import run_preference

    dpo = Stage("16_dpo", run_preference, [], {}, {"pairs": "15_pairs", "init": "07_r1_sft_hybrid", "loss": "dpo"})
    assert _costs(recipe, [dpo])[0].trained == 5 * 2 * 33


def test_lora_exports_its_fp32_adapter_and_the_merged_model_only_on_request(lora_recipe):
    """A LoRA stage writes its rank-2 adapter in fp32 (4 bytes a parameter); with export_merged also the whole
    model in the recipe's dtype (bf16)."""
    sft = Stage("05_r1_sft_weak", run_stage1_sft, [], {}, {"filter": "04_r1_filter", "sft_set": "weak",
                                                           "init": "strong"})
    assert _costs(lora_recipe, [sft])[0].disk == 4 * TINY_LORA_2
    lora_recipe.strong_sft["export_merged"] = True
    assert _costs(lora_recipe, [sft])[0].disk == 4 * TINY_LORA_2 + 2 * TINY_PARAMS


def test_continuing_an_adapter_holds_it_twice_while_it_is_attached(lora_recipe):
    """ORPO (no reference pass) continuing M_plus's adapter: rank 0 holds the bf16 base, the fp32 adapter read from
    disk (lora.read_adapter) and its copy in the LoRA layers (lora.attach_adapter) at once."""
    from w2s.runners import run_preference

    lora_recipe.sampling.tp = 2
    orpo = Stage("17_orpo", run_preference, [], {}, {"pairs": "15_pairs", "init": "07_r1_sft_hybrid", "loss": "orpo"})
    assert _costs(lora_recipe, [orpo])[0].host == 2 * TINY_PARAMS + 2 * 4 * TINY_LORA_2


def test_cpu_offload_keeps_the_state_off_the_device_and_its_shards_on_the_host_through_the_export(recipe):
    from w2s.train_config import TrainConfig

    on, off = (estimate._training_memory(TINY, TrainConfig(cpu_offload=c), recipe, 33, 2) for c in (True, False))
    assert off - on == 16 * TINY_PARAMS / 2  # fp32 weights, gradients, two moments: this rank's half
    # A merged rank-2 export at tp 1 (base 2 x 2,792 + adapter 4 x 512 + 12 x 128 merge temporaries + the bf16
    # merged matrices beside the base) while this rank's half of the bf16 base and fp32 adapter stays offloaded
    lora = TrainConfig(lora_rank=2, cpu_offload=True)
    base, adapter = 2 * TINY_PARAMS, 4 * TINY_LORA_2
    assert estimate.host_memory(TINY, lora, 2, world=2, merged=True, tp_out=1) == \
        adapter + base + 12 * 128 + 2 * TINY_ADAPTED + (base + adapter) / 2


def test_a_lora_weak_model_is_sampled_on_the_resident_weak_base(lora_recipe, tmp_path):
    """Weak SFT with LoRA at weak_tp 1 leaves the weak base resident: its labels read only the adapter."""
    from w2s.runners import run_weak_sft

    (tmp_path / "r.toml").write_text((tmp_path / "r.toml").read_text() + "[weak_sft]\nlora_rank = 2\n")
    recipe = load_recipe(tmp_path / "r.toml")
    recipe.models.dtype = "bfloat16"
    stages = [Stage("01_weak_sft", run_weak_sft, [], {}, {}),
              Stage("02_weak_labels", run_labels, [], {}, {"model": "01_weak_sft", "prompt": "zero_shot"})]
    assert [c.read for c in _costs(recipe, stages)] == [2 * TINY_PARAMS, 4 * TINY_LORA_2]


def test_human_units_are_decimal_bytes_and_seconds_minutes_hours():
    # 4 bytes x the 68,976,648,192 parameters of Llama-2-70B: 275.9 GB (10^9 bytes, as disks are sold), not GiB
    assert estimate.human_bytes(4 * 68_976_648_192) == "275.9 GB"
    assert [estimate.human_bytes(n) for n in (999, 1000, 2_500_000)] == ["999 B", "1.0 KB", "2.5 MB"]
    assert [estimate.human_seconds(s) for s in (None, 119, 120, 7199, 7200)] == ["-", "119 s", "2 min", "120 min",
                                                                                    "2.0 h"]


@pytest.fixture
def grpo_recipe(recipe, tmp_path):
    """The fixture's recipe (fp32, full fine-tuning) with a [grpo] section: groups of 4 responses of at most 16
    tokens, 2 questions a step, 1 a micro-batch."""
    (tmp_path / "r.toml").write_text((tmp_path / "r.toml").read_text() + "[grpo]\ngroup_size = 4\nmax_new_tokens = 16\n"
                                     "batch_size = 2\nmicro_batch_size = 1\n")
    return load_recipe(tmp_path / "r.toml")


def _grpo_cost(recipe):
    from w2s.runners import run_grpo

    grpo = Stage("16_grpo", run_grpo, [], {}, {"init": "13_r2_sft_hybrid"})
    return estimate.stage_cost(grpo, recipe, TINY_WORK, {"weak": TINY, "strong": TINY}, device="H100 SXM")


def test_grpo_cost_samples_groups_and_trains_on_them(grpo_recipe):
    """10 train_2 questions, 2 a step: 5 steps, each sampling 4 responses (20 tokens, capped at 16) to 2 questions,
    then training on those 8 sequences of 13 + 16 tokens."""
    cost = _grpo_cost(grpo_recipe)
    assert (cost.generated, cost.trained) == (5 * 2 * 4 * 16, 5 * 2 * 4 * 29)
    # fp32 state (16 B a parameter), the gathered root and two blocks in bf16, the activations of a micro-batch of
    # one question's 4 sequences of 29 tokens (208 B a token a block, 2 blocks), the output matrix's bf16 gradient,
    # and the whole-model copy the rollouts sample from, in the model's dtype (fp32 here; w2s/grpo.py live_weights)
    n, embeddings, per_block = TINY_PARAMS, 2 * 100 * 8, (TINY_PARAMS - 2 * 100 * 8) / 2
    assert estimate.activation_bytes(TINY) == 2 * (4 * 8 + 2 * 2 * 4 + 2 * 1 * 4 + 3 * 16) == 208
    expected = 16 * n + 2 * (embeddings + 2 * per_block) + 208 * 4 * 29 * 2 + 2 * 100 * 8 + 4 * n
    assert cost.memory == int(expected)
    # a KL reference under full fine-tuning is one more frozen whole model (w2s/grpo.py: 4 bytes a parameter in fp32)
    grpo_recipe.grpo["kl_beta"] = 0.04
    assert _grpo_cost(grpo_recipe).memory == int(expected + 4 * n)
    # sampling at SAMPLING_MFU (forward FLOPs at the mean context 13 + 16 / 2), training at TRAIN_MFU (a step's FLOPs:
    # 6N + attention per token, the 13 prompt tokens skip the output layer's 6 V D)
    sampled = 40 * 16 * profile.flops_per_token(TINY, seq_len=21, training=False)
    trained = 40 * (29 * profile.flops_per_token(TINY, seq_len=29) - 13 * 6 * 100 * 8)
    assert cost.seconds == pytest.approx(sampled / (estimate.SAMPLING_MFU * 989e12) +
                                         trained / (estimate.TRAIN_MFU * 989e12))


def test_grpo_cost_trains_each_rollout_batch_updates_per_batch_times(grpo_recipe):
    """updates_per_batch = 2 (w2s/train.py: an epoch is batches x updates_per_batch optimizer steps; a batch is
    sampled at the first of its steps): one epoch of 5 batches is 10 steps on 8 sequences each, 5 rollouts; with
    max_steps = 3, steps 1 and 3 sample."""
    grpo_recipe.grpo.update(updates_per_batch=2, ckpt_every=5)
    cost = _grpo_cost(grpo_recipe)
    assert (cost.generated, cost.trained) == (5 * 8 * 16, 10 * 8 * 29)
    assert cost.resume == 12 * TINY_PARAMS  # 10 steps, saved after step 5 only (never at the last)
    sampled = 5 * 8 * 16 * profile.flops_per_token(TINY, seq_len=21, training=False)
    trained = 10 * 8 * (29 * profile.flops_per_token(TINY, seq_len=29) - 13 * 6 * 100 * 8)
    assert cost.seconds == pytest.approx(sampled / (estimate.SAMPLING_MFU * 989e12) +
                                         trained / (estimate.TRAIN_MFU * 989e12))
    grpo_recipe.grpo["max_steps"] = 3
    assert (_grpo_cost(grpo_recipe).generated, _grpo_cost(grpo_recipe).trained) == (2 * 8 * 16, 3 * 8 * 29)


def test_dry_run_warns_when_the_processes_are_no_multiple_of_the_tensor_parallelism(recipe, tmp_path):
    from w2s.estimate import dry_run

    text = (tmp_path / "r.toml").read_text().replace("[sampling]\n", "[sampling]\ntp = 2\n")
    (tmp_path / "r.toml").write_text(text)
    for world, warned in ((2, False), (3, True), (4, False)):  # 3 processes: a group of 2 and one left over
        assert ("needs a multiple of 2 processes" in dry_run(tmp_path / "r.toml", runs_dir=tmp_path / "runs",
                                                            world=world, device="cpu")) == warned


def test_dry_run_to_do_row_counts_only_the_stages_that_will_run(recipe, tmp_path, monkeypatch):
    """Every stage done but 02_weak_labels: the to-do row is its cost alone, 5 train_2 questions x 15 tokens."""
    real_plan = estimate.plan

    def plan(stages, run_dir, reuse):
        return [(s, "will run" if s.name == "02_weak_labels" else "done", []) for s, _, _ in
                real_plan(stages, run_dir, reuse)]

    monkeypatch.setattr(estimate, "plan", plan)
    text = estimate.dry_run(tmp_path / "r.toml", runs_dir=tmp_path / "runs", world=1, device="cpu")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
    assert [row[3] for row in rows if row[0] == "to do" and len(row) == 8] == [f"{5 * 15:,}"]


def test_questions_workload_assumes_half_the_sample_limit_for_a_response(recipe, tmp_path):
    """Without gold: a response is sample_max_new_tokens / 2 = 200 tokens, and a 4-shot prompt is 4 demonstrations
    (prompt and response) and the question's prompt."""
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"question": "q" * 36}) + "\n" for _ in range(6)))
    recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, train_2=str(tmp_path / "q.jsonl")))
    work = estimate.questions_workload(recipe)
    # "Question: " + 36 + "\nAnswer:" = 54 characters: 13 tokens at 4 characters a token
    assert (work.n_train_1, work.n_train_2, work.n_test, work.prompt_tokens) == (0, 6, 4, 13)
    assert (work.response_tokens, work.few_shot_tokens) == (200, 5 * 13 + 4 * 200)
