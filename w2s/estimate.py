"""What a recipe will cost before it runs: per stage, tokens generated and trained, disk written, peak memory per
device and time, from the recipe, the data files and the models' config.json (no weights are read).

`w2s run RECIPE --dry-run` prints it beside each stage's status (w2s/pipeline.py `dry_run`). It is an estimate, and
says how it is made:

  * sizes: train_1 / train_2 / test from the data files; mean prompt and response tokens from the strong
    checkpoint's tokenizer over the train file's questions and gold solutions (4 characters a token without one); a
    generated response is as long as a gold solution, capped at the stage's max_new_tokens;
  * selection: Stage I keeps KEPT_FRACTION of train_2 per round and Stage II finds pairs for PAIRED_FRACTION of it
    (max_pairs each), from the released runs' scale (docs/PAPER.md, Stage I and Stage II);
  * time: training runs at TRAIN_MFU, sampling at SAMPLING_MFU of the device's peak bf16 FLOP/s, both measured on an
    H100 (BENCHMARKS.md: the Llama-3.2-1B training step, the Llama-3-8B 512-sequence sampling run); a 70B model on
    8 GPUs will not reach them (tensor-parallel all-reduces, FSDP gathers), so read the times as lower bounds;
  * memory per device: training under FSDP2 over every process (fp32 master weights, gradients and two AdamW moments
    for trainable parameters, the frozen LoRA base in its dtype, one gathered block, the activations of a
    micro-batch: a pair is two sequences, a GRPO question its group; in full fine-tuning the output matrix's bf16
    gradient); sampling holds 1/tp of the blocks (and, for a LoRA model, of a merged copy of the adapted matrices),
    the embedding and output matrices whole, and 1/tp of the KV cache of max_batch sequences. Lengths are means:
    the longest prompts and rows need more;
  * disk: an exported model (a LoRA stage writes its fp32 adapter, and a merged copy only where the recipe asks:
    `export_merged`) and the generations written as text and token ids.

    python -m pytest -q tests/test_estimate.py
"""

from dataclasses import dataclass

from w2s import profile
from w2s.config import ModelConfig
from w2s.lora import TARGETS
from w2s.losses import PREFERENCE_LOSSES
from w2s.recipe import grpo_config, train_config
from w2s.tasks import few_shot_prompt, load_records, zero_shot_prompt

KEPT_FRACTION = 0.55  # GSM8K round 1 keeps 31-55 % of train_2: the upper end, so the estimate errs high
PAIRED_FRACTION = 0.5  # questions of train_2 that get pairs
TRAIN_MFU = 0.476  # BENCHMARKS.md, Training, GPU: the Llama-3.2-1B shape on one H100
SAMPLING_TOK_S, SAMPLING_SHAPE = 21_470, dict(  # BENCHMARKS.md, Sampling, GPU: Llama-3-8B shape, 512 sequences, H100
    family="llama", vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=14336)
MEASURED_ON = "H100 SXM"
BYTES_PER_TOKEN = {"text": 4, "ids": 7}  # a token as text, and as a JSON token id (", 12345")
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass
class Workload:
    """What the data files say: question counts and mean token lengths."""

    n_train_1: int
    n_train_2: int
    n_test: int
    prompt_tokens: float  # zero-shot prompt
    few_shot_tokens: float  # 4 demonstrations + the question
    response_tokens: float  # a gold solution (what a response is assumed to be)


@dataclass
class Cost:
    generated: int = 0  # tokens
    trained: int = 0  # tokens, over all epochs
    disk: int = 0  # bytes written and kept
    memory: int = 0  # peak bytes per device
    seconds: float | None = None  # None where the device's peak FLOP/s is unknown


def workload(recipe):
    """Counts and mean lengths from the recipe's data files (and the strong checkpoint's tokenizer, if it has one)."""
    d = recipe.data
    train, test = load_records(d.task, d.train), load_records(d.task, d.test)
    n_1 = d.n_train_1 or len(train) // 2
    n_2 = d.n_train_2 or len(train) - n_1
    count = _token_counter(recipe.models.strong)
    sample = train[:2000]  # the means settle long before; tokenizing 12k solutions takes a while
    prompts = [count(zero_shot_prompt(r["question"])) for r in sample]
    responses = [count(r.get("solution") or "") for r in sample]
    demos = [{"question": r["question"], "response": r.get("solution") or ""} for r in sample[:4]]
    few_shot = count(few_shot_prompt(demos, sample[0]["question"])) if len(demos) == 4 else 5 * max(prompts)
    return Workload(n_1, n_2, min(d.n_test or len(test), len(test)), sum(prompts) / len(prompts), few_shot,
                    sum(responses) / len(responses))


def _token_counter(checkpoint):
    from w2s.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(checkpoint)
    except (FileNotFoundError, ValueError):
        return lambda text: max(1, len(text) // 4)
    return lambda text: len(tokenizer.encode(text, bos=False))


def lora_parameters(cfg, rank, targets=TARGETS):
    """Trainable parameters of rank-r adapters on `targets` of every block: r * (in + out) per matrix."""
    D, F, hd = cfg.dim, cfg.hidden_dim, cfg.head_dim
    shapes = {"q_proj": (D, cfg.n_heads * hd), "k_proj": (D, cfg.n_kv_heads * hd), "v_proj": (D, cfg.n_kv_heads * hd),
              "o_proj": (cfg.n_heads * hd, D), "gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}
    return cfg.n_layers * sum(rank * sum(shapes[t]) for t in targets)


def model_configs(recipe):
    return {name: ModelConfig.from_pretrained(getattr(recipe.models, name)) for name in ("weak", "strong")}


def stage_cost(stage, recipe, work, configs, world=1, device=MEASURED_ON):
    """The Cost of one stage (w2s/engine.Stage) of the paper's table."""
    name = stage.run.__name__
    cfg = configs["weak" if _uses_weak(stage) else "strong"]
    if name in ("run_data", "run_test_set", "run_filter", "run_pairs"):
        return Cost(seconds=0.0)
    if name in ("run_labels", "run_samples", "run_eval"):
        return _generation_cost(stage, recipe, work, cfg, world, device)
    if name == "run_grpo":
        return _grpo_cost(recipe, work, cfg, world, device)
    return _training_cost(stage, recipe, work, cfg, world, device)


def _lora_rank(recipe, model):
    """The LoRA rank a model argument ("strong", "01_weak_sft", "16_dpo", ...) was trained with; None for a base
    checkpoint or full fine-tuning."""
    if model in (None, "weak", "strong"):
        return None
    kind = model.rsplit("_", 1)[1]  # "16_dpo", "39_round2_dpo" -> "dpo"; "16_grpo" -> "grpo"; "07_r1_sft_hybrid"
    section = "weak_sft" if model == "01_weak_sft" else "grpo" if kind == "grpo" else \
        "preference" if kind in PREFERENCE_LOSSES else "strong_sft"
    return train_config(recipe, section, progress=False).lora_rank


def _uses_weak(stage):
    return stage.run.__name__ == "run_weak_sft" or stage.args.get("model") in ("weak", "01_weak_sft")


def _generation_cost(stage, recipe, work, cfg, world, device):
    s, name = recipe.sampling, stage.run.__name__
    if name == "run_eval":
        prompts, n = work.n_test, stage.args.get("n", 1)
    else:
        prompts, n = work.n_train_2, (stage.args.get("n") or recipe.stage2.n_samples) if name == "run_samples" else 1
    limit = s.max_new_tokens if n == 1 else s.sample_max_new_tokens
    prompt = work.few_shot_tokens if stage.args.get("prompt") == "few_shot" else work.prompt_tokens
    length = min(work.response_tokens, limit)
    generated = int(prompts * n * length)
    tp = s.weak_tp if _uses_weak(stage) else s.tp
    dtype_bytes = DTYPE_BYTES[recipe.models.dtype]
    kv = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * dtype_bytes * min(s.max_batch, prompts * n) * (
        prompt + limit)  # k and v of every layer, for the sequences decoded at once
    blocks = cfg.n_params(embeddings=False)  # split over tp ranks; the embedding and output matrices are copied whole
    replicated = (cfg.n_params() - blocks) * dtype_bytes
    split = blocks * dtype_bytes
    if _lora_rank(recipe, stage.args.get("model")) is not None:  # a merged copy of the adapted matrices, for the stage
        split += (blocks - cfg.n_layers * cfg.dim * (4 if cfg.sandwich_norms else 2)) * dtype_bytes
    memory = replicated + (split + kv) / tp
    disk = int(generated * (BYTES_PER_TOKEN["text"] * 2 + BYTES_PER_TOKEN["ids"]) +
               prompts * prompt * BYTES_PER_TOKEN["text"])  # generations (text + ids), labels (text), the prompts
    per_token = profile.flops_per_token(cfg, seq_len=int(prompt + length / 2), training=False)
    rate = _peak(device) and SAMPLING_MFU * _peak(device) * world / per_token
    return Cost(generated=generated, disk=disk, memory=int(memory), seconds=generated / rate if rate else None)


def _training_cost(stage, recipe, work, cfg, world, device):
    name, s2 = stage.run.__name__, recipe.stage2
    section = {"run_weak_sft": "weak_sft", "run_preference": "preference"}.get(name, "strong_sft")
    tc = train_config(recipe, section, progress=False)
    rows, per_row = {
        "run_weak_sft": (work.n_train_1, 1),
        "run_stage1_sft": (KEPT_FRACTION * work.n_train_2 * (2 if stage.args.get("sft_set") == "hybrid" else 1), 1),
        "run_full_weak_ft": (work.n_train_2, 1),
        "run_ceiling": (work.n_train_2, 1),
        "run_preference": (PAIRED_FRACTION * work.n_train_2 * s2.max_pairs, 2),  # chosen and rejected
    }[name]
    length = work.prompt_tokens + min(work.response_tokens, tc.max_seq_len)
    steps = tc.max_steps or tc.epochs * max(1, -(-int(rows) // tc.batch_size))
    sequences = steps * min(tc.batch_size, max(1, int(rows))) * per_row
    lora = tc.lora_rank is not None
    flops = sequences * profile.step_flops(cfg, [(int(length), int(work.response_tokens))], lora)
    if tc.activation_checkpointing:  # the forward runs again in backward
        flops += sequences * length * profile.flops_per_token(cfg, seq_len=int(length), training=False)
    rate = _peak(device) and TRAIN_MFU * _peak(device) * world
    merged = tc.export_merged or stage.args.get("loss") in recipe.stage2.export_merged
    return Cost(trained=int(sequences * length), disk=_export_bytes(cfg, tc, recipe, merged),
                memory=int(_training_memory(cfg, tc, recipe, length, world, per_row)),
                seconds=flops / rate if rate else None)


def _grpo_cost(recipe, work, cfg, world, device):
    """GRPO: each step samples group_size responses to batch_size train_2 questions, then trains on all of them."""
    tc, gc = train_config(recipe, "grpo", progress=False), grpo_config(recipe)
    steps = tc.max_steps or tc.epochs * max(1, -(-work.n_train_2 // tc.batch_size))
    length = min(work.response_tokens, gc.max_new_tokens)
    sequences = steps * min(tc.batch_size, work.n_train_2) * gc.group_size
    sampled = sequences * length * profile.flops_per_token(cfg, seq_len=int(work.prompt_tokens + length / 2),
                                                            training=False)
    lora = tc.lora_rank is not None
    trained = sequences * profile.step_flops(cfg, [(int(work.prompt_tokens + length), int(length))], lora)
    peak = _peak(device)
    seconds = peak and sampled / (SAMPLING_MFU * peak * world) + trained / (TRAIN_MFU * peak * world)
    return Cost(generated=int(sequences * length), trained=int(sequences * (work.prompt_tokens + length)),
                disk=_export_bytes(cfg, tc, recipe, tc.export_merged),
                memory=int(_training_memory(cfg, tc, recipe, work.prompt_tokens + length, world, gc.group_size) +
                           cfg.n_params() * 2),  # + the gathered bf16 copy the rollouts sample from
                seconds=seconds or None)


def _export_bytes(cfg, tc, recipe, merged):
    """A full model in the recipe's dtype; a LoRA stage writes its fp32 adapter, and a merged model only on request."""
    model = cfg.n_params() * DTYPE_BYTES[recipe.models.dtype]
    if tc.lora_rank is None:
        return model
    return lora_parameters(cfg, tc.lora_rank, tc.lora_targets) * 4 + (model if merged else 0)


def activation_bytes(cfg):
    """Bytes one block saves for its backward per token, in bf16: the inputs of its two norms, q / k / v, the
    attention output, the MLP's gate, up and product (the kernels' save_for_backward): 2 (4 D + 2 H hd + 2 KV hd +
    3 F). About 34 D for Llama and Mistral shapes, 60 D for Gemma-2B's wide MLP and single 256-wide KV head."""
    return 2 * (4 * cfg.dim + 2 * cfg.n_heads * cfg.head_dim + 2 * cfg.n_kv_heads * cfg.head_dim + 3 * cfg.hidden_dim)


def _training_memory(cfg, tc, recipe, length, world, sequences_per_row=1):
    """FSDP2 over `world` devices: sharded state, one gathered block and its neighbour, the embeddings, activations
    of a micro-batch (micro_batch_size rows of sequences_per_row sequences: a pair's 2, a GRPO question's group),
    and, in full fine-tuning, the output matrix's bf16 gradient the fused loss keeps from forward to backward."""
    n = cfg.n_params()
    if tc.lora_rank is None:
        state = 16 * n  # fp32 master weights, gradients, two AdamW moments
    else:
        state = 16 * lora_parameters(cfg, tc.lora_rank, tc.lora_targets) + DTYPE_BYTES[recipe.models.dtype] * n
    embeddings, per_block = n - cfg.n_params(embeddings=False), cfg.n_params(embeddings=False) / cfg.n_layers
    gathered = 2 * (embeddings + 2 * per_block)  # bf16: the root's tensors, the block running and the next one
    tokens = tc.micro_batch_size * sequences_per_row * length
    one_block = activation_bytes(cfg) * tokens
    if tc.activation_checkpointing:  # every block's input, and one block's activations while it is recomputed
        activations = 2 * cfg.dim * tokens * cfg.n_layers + one_block
    else:
        activations = one_block * cfg.n_layers
    output_grad = 2 * cfg.vocab_size * cfg.dim if tc.lora_rank is None else 0
    return state / world + gathered + activations + output_grad


def _peak(device):
    return profile.peak_flops(device)


def _sampling_mfu():
    cfg = ModelConfig(**SAMPLING_SHAPE)
    return SAMPLING_TOK_S * profile.flops_per_token(cfg, seq_len=128 + 128, training=False) / _peak(MEASURED_ON)


SAMPLING_MFU = _sampling_mfu()


def human_bytes(n):
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def human_seconds(s):
    if s is None:
        return "-"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"
