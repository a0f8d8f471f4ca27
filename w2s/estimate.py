"""What a recipe will cost before it runs: per stage, tokens generated and trained, disk written, peak memory per
device and time, and rank 0's peak host memory, the checkpoints read and the resume state written while it runs,
from the recipe, the data files and the models' config.json (no weights are read).

`w2s run RECIPE --dry-run` prints it beside each stage's status (`dry_run` below). It is an estimate, and
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
    `export_merged`) and the generations written as text and token ids;
  * resume state: the training-state checkpoints a stage with ckpt_every > 0 writes to OUT/ckpt while it runs (12
    bytes per trainable parameter: the fp32 master weight and two fp32 AdamW moments; the newest is kept, two while
    one is written; the engine deletes them once the stage is done);
  * host memory, rank 0 of a GPU run (`host_memory` says which function holds what): a training stage reads its
    whole checkpoint there in the recipe's dtype, a full fine-tune casts it to fp32, a stage with a reference pass
    (DPO, IPO) fingerprints it in fp64 one tensor at a time, and the export gathers the trained model (or
    the adapter, and the base it is merged into) there; a sampling stage holds one tensor at a time on its way to
    the GPU, and the fp32 adapter it applies. The other ranks of a training stage hold the model on the meta device;
  * checkpoint reads: what a stage reads from disk at DISK_READ_BYTES_S (checkpoints stored in the recipe's dtype):
    a training stage its whole initial model, a sampling stage its weights unless the stage before left them in
    memory (w2s/runners.py: a sampled base stays resident, and after a training stage sampled at tp 1 its model)
    and its adapter. `stage_costs` follows that through the table; a resumed stage's training state is not counted.

    python -m pytest -q tests/test_estimate.py
"""

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from w2s import profile
from w2s.config import ModelConfig
from w2s.engine import plan
from w2s.lora import TARGETS
from w2s.losses import PREFERENCE_LOSSES
from w2s.pipeline import build_stages, check_reuse
from w2s.recipe import check_data_sizes, grpo_config, load_recipe, split_sizes, train_config
from w2s.report import _table
from w2s.runners import load_questions, task_prompt
from w2s.tasks import few_shot_prompt, load_records, load_split, zero_shot_prompt

KEPT_FRACTION = 0.55  # GSM8K round 1 keeps 31-55 % of train_2: the upper end, so the estimate errs high
PAIRED_FRACTION = 0.5  # questions of train_2 that get pairs
TRAIN_MFU = 0.476  # BENCHMARKS.md, Training, GPU: the Llama-3.2-1B shape on one H100
SAMPLING_TOK_S, SAMPLING_SHAPE = 21_470, dict(  # BENCHMARKS.md, Sampling, GPU: Llama-3-8B shape, 512 sequences, H100
    family="llama", vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=14336)
MEASURED_ON = "H100 SXM"
BYTES_PER_TOKEN = {"text": 4, "ids": 7}  # a token as text, and as a JSON token id (", 12345")
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# An assumption, printed with every dry run: a local NVMe SSD streams several GB/s, a shared file system often less
DISK_READ_BYTES_S = 2e9
RESUME_BYTES = 12  # per trainable parameter in a training-state checkpoint: fp32 weight, AdamW's two fp32 moments


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
    host: int = 0  # peak bytes of host memory on rank 0
    resume: int = 0  # peak bytes of training state on disk while the stage runs (deleted once it is done)
    read: int = 0  # bytes of checkpoints read from disk

    @property
    def read_seconds(self):
        return self.read / DISK_READ_BYTES_S


def total_cost(costs):
    """Stages run one after another: tokens, bytes written and read and seconds add up; memory and the resume state
    (deleted after each stage) peak."""
    total = Cost(seconds=0.0)
    for cost in costs:
        for field in ("generated", "trained", "disk", "read"):
            setattr(total, field, getattr(total, field) + getattr(cost, field))
        for field in ("memory", "host", "resume"):
            setattr(total, field, max(getattr(total, field), getattr(cost, field)))
        total.seconds = None if total.seconds is None or cost.seconds is None else total.seconds + cost.seconds
    return total


def workload(recipe):
    """Counts and mean lengths from the recipe's data files (and the strong checkpoint's tokenizer, if it has one)."""
    d = recipe.data
    train, test = load_records(d.task, d.train), load_records(d.task, d.test)
    check_data_sizes(recipe, train, test)
    if d.split_file:  # the user's split decides the sizes, as in the data stage (w2s/runners.py run_data)
        n_1, n_2 = map(len, load_split(d.split_file, train))
    else:
        n_1, n_2 = split_sizes(d, len(train))
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


def projection_shapes(cfg):
    """(in, out) features of each linear layer of a block."""
    D, F, hd = cfg.dim, cfg.hidden_dim, cfg.head_dim
    return {"q_proj": (D, cfg.n_heads * hd), "k_proj": (D, cfg.n_kv_heads * hd), "v_proj": (D, cfg.n_kv_heads * hd),
            "o_proj": (cfg.n_heads * hd, D), "gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}


def lora_parameters(cfg, rank, targets=TARGETS):
    """Trainable parameters of rank-r adapters on `targets` of every block: r * (in + out) per matrix."""
    shapes = projection_shapes(cfg)
    return cfg.n_layers * sum(rank * sum(shapes[t]) for t in targets)


def largest_tensor(cfg, tp=1):
    """Elements of the largest tensor of a checkpoint one rank reads: the embedding or output matrix (whole on every
    tensor-parallel rank) or a block's projection (1/tp of it)."""
    return max(cfg.vocab_size * cfg.dim, max(i * o for i, o in projection_shapes(cfg).values()) // tp)


def model_configs(recipe):
    return {name: ModelConfig.from_pretrained(getattr(recipe.models, name)) for name in ("weak", "strong")}


GENERATION = ("run_labels", "run_samples", "run_eval")
NO_MODEL = ("run_data", "run_test_set", "run_filter", "run_pairs")


def stage_cost(stage, recipe, work, configs, world=1, device=MEASURED_ON, resident=None):
    """The Cost of one stage (w2s/engine.Stage) of the paper's table. resident: the weights the stage before left in
    memory (`weights_key`; None: none, as in a fresh process)."""
    name = stage.run.__name__
    cfg = configs["weak" if _uses_weak(stage) else "strong"]
    if name in NO_MODEL:
        return Cost(seconds=0.0)
    if name in GENERATION:
        return _generation_cost(stage, recipe, work, cfg, world, device, resident)
    if name == "run_grpo":
        return _grpo_cost(stage, recipe, work, cfg, world, device)
    return _training_cost(stage, recipe, work, cfg, world, device)


def stage_costs(stages, recipe, work, configs, world=1, device=MEASURED_ON, runs=None):
    """The Cost of every stage in table order, run in one process as `w2s run` runs them, so that a sampling stage
    finds in memory what the stage before left there (w2s/runners.py load_for_inference, keep_resident). runs[i]
    False: stage i is done, so it is skipped, loads nothing and leaves nothing."""
    resident, costs = None, []
    for i, stage in enumerate(stages):
        costs.append(stage_cost(stage, recipe, work, configs, world, device, resident))
        if runs is None or runs[i]:
            resident = _resident_after(stage, recipe, resident)
    return costs


def _resident_after(stage, recipe, resident):
    """What w2s/runners.py keeps in memory after `stage`: a sampling stage its weights (load_for_inference); a
    training stage drops them (drop_resident) and, when its model is sampled at tp 1, keeps what it returns: the
    trained model, or under LoRA the base it loaded (_train)."""
    name = stage.run.__name__
    if name in NO_MODEL:
        return resident
    if name in GENERATION:
        return weights_key(recipe, stage.args.get("model"))
    if (recipe.sampling.weak_tp if _uses_weak(stage) else recipe.sampling.tp) != 1:
        return None
    lora = train_config(recipe, _stage_section(stage), progress=False).lora_rank is not None
    return weights_key(recipe, _init(stage)) if lora else stage.name


def weights_key(recipe, model):
    """The weights a stage sampling `model` holds: an adapter's base, else the model's own. An adapter's base is the
    recipe's checkpoint unless it was trained on a fully fine-tuned model ("<model>:base", never resident)."""
    if _lora_rank(recipe, model) is None:
        return model
    if model == "01_weak_sft":
        return "weak"
    if _section(model) == "strong_sft" or train_config(recipe, "strong_sft", progress=False).lora_rank is not None:
        return "strong"  # Stage I's adapters are on the strong base, and Stage II's continue M_plus's
    return f"{model}:base"


def _stage_section(stage):
    """The recipe section a training stage trains with."""
    return {"run_weak_sft": "weak_sft", "run_preference": "preference", "run_grpo": "grpo"}.get(stage.run.__name__,
                                                                                                "strong_sft")


def _init(stage):
    """The model a training stage starts from (a model argument)."""
    return {"run_weak_sft": "weak", "run_full_weak_ft": "strong", "run_ceiling": "strong"}.get(
        stage.run.__name__) or stage.args.get("init", "strong")


def _section(model):
    kind = model.rsplit("_", 1)[1]  # "16_dpo", "39_round2_dpo" -> "dpo"; "16_grpo" -> "grpo"; "07_r1_sft_hybrid"
    return "weak_sft" if model == "01_weak_sft" else "grpo" if kind == "grpo" else \
        "preference" if kind in PREFERENCE_LOSSES else "strong_sft"


def _trained_config(recipe, model):
    """The TrainConfig a model argument ("strong", "01_weak_sft", "16_dpo", ...) was trained with; None for a base
    checkpoint."""
    return None if model in (None, "weak", "strong") else train_config(recipe, _section(model), progress=False)


def _lora_rank(recipe, model):
    """The LoRA rank a model argument was trained with; None for a base checkpoint or full fine-tuning."""
    tc = _trained_config(recipe, model)
    return None if tc is None else tc.lora_rank


def _adapter_parameters(recipe, model, cfg):
    """Parameters of the adapter a model argument names (0: a base checkpoint or a fully fine-tuned model)."""
    tc = _trained_config(recipe, model)
    return 0 if tc is None or tc.lora_rank is None else lora_parameters(cfg, tc.lora_rank, tc.lora_targets)


def _uses_weak(stage):
    return stage.run.__name__ == "run_weak_sft" or stage.args.get("model") in ("weak", "01_weak_sft")


def _generation_cost(stage, recipe, work, cfg, world, device, resident):
    s, name, model = recipe.sampling, stage.run.__name__, stage.args.get("model")
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
    tc = _trained_config(recipe, model)
    if tc is not None and tc.lora_rank is not None:  # a merged copy of the adapted matrices, for the stage
        split += cfg.n_layers * sum(i * o for t, (i, o) in projection_shapes(cfg).items() if t in tc.lora_targets) * \
            dtype_bytes
    memory = replicated + (split + kv) / tp
    # Host memory: runners.load_for_inference reads the fp32 adapter whole on every rank (lora.read_adapter; the
    # tensor-parallel slices of tensor_parallel.adapter_for_rank are views of it) and keeps it for the stage; a load
    # goes one tensor at a time through host memory to the GPU (checkpoint.read_tensor at tp 1, load_model_tp's
    # slices at tp > 1). Weights resident from the stage before are not read again.
    adapter = 4 * _adapter_parameters(recipe, model, cfg)
    loads = resident is None or resident != weights_key(recipe, model)
    host = adapter + (dtype_bytes * largest_tensor(cfg, tp) if loads else 0)
    read = adapter + (cfg.n_params() * dtype_bytes if loads else 0)
    disk = int(generated * (BYTES_PER_TOKEN["text"] * 2 + BYTES_PER_TOKEN["ids"]) +
               prompts * prompt * BYTES_PER_TOKEN["text"])  # generations (text + ids), labels (text), the prompts
    per_token = profile.flops_per_token(cfg, seq_len=int(prompt + length / 2), training=False)
    rate = _peak(device) and SAMPLING_MFU * _peak(device) * world / per_token
    return Cost(generated=generated, disk=disk, memory=int(memory), seconds=generated / rate if rate else None,
                host=host, read=read)


def _training_cost(stage, recipe, work, cfg, world, device):
    name, s2 = stage.run.__name__, recipe.stage2
    tc = train_config(recipe, _stage_section(stage), progress=False)
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
                seconds=flops / rate if rate else None,
                **_training_io(stage, recipe, cfg, tc, world, steps, merged,
                                 name == "run_preference" and stage.args.get("loss") != "orpo"))


def _grpo_cost(stage, recipe, work, cfg, world, device):
    """GRPO: each rollout samples group_size responses to batch_size train_2 questions, then takes updates_per_batch
    optimizer steps on all of them (w2s/train.py: max_steps, or epochs x batches x updates_per_batch, steps)."""
    tc, gc = train_config(recipe, "grpo", progress=False), grpo_config(recipe)
    steps = tc.max_steps or tc.epochs * max(1, -(-work.n_train_2 // tc.batch_size)) * gc.updates_per_batch
    rollouts = -(-steps // gc.updates_per_batch)  # a rollout batch is sampled at the first of its steps
    length = min(work.response_tokens, gc.max_new_tokens)
    per_batch = min(tc.batch_size, work.n_train_2) * gc.group_size  # sequences of a rollout batch
    sampled = rollouts * per_batch * length * profile.flops_per_token(
        cfg, seq_len=int(work.prompt_tokens + length / 2), training=False)
    lora = tc.lora_rank is not None
    trained = steps * per_batch * profile.step_flops(cfg, [(int(work.prompt_tokens + length), int(length))], lora)
    peak = _peak(device)
    seconds = peak and sampled / (SAMPLING_MFU * peak * world) + trained / (TRAIN_MFU * peak * world)
    return Cost(generated=int(rollouts * per_batch * length),
                trained=int(steps * per_batch * (work.prompt_tokens + length)),
                disk=_export_bytes(cfg, tc, recipe, tc.export_merged),
                memory=int(_training_memory(cfg, tc, recipe, work.prompt_tokens + length, world, gc.group_size) +
                           _grpo_copies(cfg, tc, gc, recipe)),
                seconds=seconds or None,
                **_training_io(stage, recipe, cfg, tc, world, steps, tc.export_merged, False))


def _grpo_copies(cfg, tc, gc, recipe):
    """Whole models GRPO holds on each device beside the sharded training state (w2s/grpo.py): the gathered copy the
    rollouts sample from, in the model's dtype, and with kl_beta > 0 under full fine-tuning the frozen reference
    (a LoRA reference is a copy of the fp32 adapter)."""
    model = cfg.n_params() * DTYPE_BYTES[recipe.models.dtype]
    if gc.kl_beta == 0:
        return model
    return 2 * model if tc.lora_rank is None else model + 4 * trainable_parameters(cfg, tc)


def _export_bytes(cfg, tc, recipe, merged):
    """A full model in the recipe's dtype; a LoRA stage writes its fp32 adapter, and a merged model only on request."""
    model = cfg.n_params() * DTYPE_BYTES[recipe.models.dtype]
    if tc.lora_rank is None:
        return model
    return lora_parameters(cfg, tc.lora_rank, tc.lora_targets) * 4 + (model if merged else 0)


def _training_io(stage, recipe, cfg, tc, world, steps, merged, fingerprint):
    """Host memory on rank 0, resume state and checkpoint reads of a training stage of `steps` optimizer steps."""
    n, dtype_bytes = cfg.n_params(), DTYPE_BYTES[recipe.models.dtype]
    adapter = _adapter_parameters(recipe, _init(stage), cfg)  # the adapter it starts from (lora.read_adapter)
    tp_out = recipe.sampling.weak_tp if _uses_weak(stage) else recipe.sampling.tp
    host = host_memory(cfg, tc, dtype_bytes, world, adapter, tp_out, merged, fingerprint)
    return dict(host=int(host), resume=resume_bytes(cfg, tc, steps), read=n * dtype_bytes + 4 * adapter)


def trainable_parameters(cfg, tc):
    return cfg.n_params() if tc.lora_rank is None else lora_parameters(cfg, tc.lora_rank, tc.lora_targets)


def resume_bytes(cfg, tc, steps):
    """Peak bytes in OUT/ckpt: train_state.save_training_state writes the trainable parameters (fp32 master weights)
    and the AdamW state (two fp32 moments each; frozen parameters are left out) every ckpt_every steps but the last
    (train.Trainer.train), into a temporary directory renamed into place before the older one is deleted: two
    checkpoints at once from the second on."""
    saves = (steps - 1) // tc.ckpt_every if tc.ckpt_every else 0
    return min(saves, 2) * RESUME_BYTES * trainable_parameters(cfg, tc)


def host_memory(cfg, tc, dtype_bytes, world, adapter=0, tp_out=1, merged=False, fingerprint=False):
    """Peak bytes of host memory on rank 0 of a training stage on GPUs: the largest of its three phases, as each
    frees what the one before held. adapter: parameters of the adapter it starts from; tp_out: the tensor
    parallelism its model is sampled at; fingerprint: a task with a cached reference pass (DPO, IPO).

    setup: checkpoint.load_for_training reads the whole model on rank 0 in the recipe's dtype (the other ranks
      build it on the meta device); an adapter arrives in fp32 (lora.read_adapter) and is copied into fp32 LoRA
      layers (lora.attach_adapter), both alive for a moment. train.Trainer._build_module fingerprints the weights
      for the reference cache (reference_logps.model_fingerprint: .double() and .square() of each tensor, two fp64
      copies of the largest), casts a fully fine-tuned model to fp32 (model.float(): 4 bytes a parameter; LoRA keeps the
      base's dtype and adds fp32 adapters) and holds that state_dict until parallel.fill_from_rank0 has broadcast
      it, one tensor at a time through the GPU (torch's _broadcast_state_dict); fully_shard moves the weights block
      by block to the GPU, or with cpu_offload keeps this rank's shards in host memory.
    training: with cpu_offload the rank's shards of the weights, gradients and AdamW moments.
    export: export.export_trained gathers onto rank 0's host (where it loaded the model) the full model in the
      recipe's dtype, or the fp32 adapter, plus the base where a merged copy is written (export_merged) or the
      model is sampled at tp 1 (the runner keeps it resident); a merge computes each adapted matrix in fp32
      (lora.merged_weight: 12 bytes an element of bf16 weights), in place, except at tp 1, where
      merge_lora_state_dict keeps the base and writes the merged matrices beside it. save_model writes the shards
      from the tensors' own memory (safetensors' save_file through _flatten_as_ptr); a release whose save_file goes
      through _flatten copies each shard (up to 5 GiB) first, which is not counted.
    """
    n, lora = cfg.n_params(), tc.lora_rank is not None
    trained = trainable_parameters(cfg, tc)
    shapes = projection_shapes(cfg)
    # merged_weight's fp32 temporaries per element of a matrix: B @ A, its scaled copy, then the sum (and the weight
    # cast to fp32 unless it is fp32 already)
    merging = 8 + (4 if dtype_bytes < 4 else 0)
    loaded = dtype_bytes * n + 4 * adapter
    if lora:
        master = dtype_bytes * n + 4 * trained
    else:  # an adapter it arrived with is merged into the fp32 weights (lora.prepare_lora -> unwrap_lora)
        master = 4 * n + (4 * adapter + 8 * max(i * o for i, o in shapes.values()) if adapter else 0)
    setup = max(loaded + 4 * adapter, loaded + 16 * largest_tensor(cfg) if fingerprint else 0, master)
    shards = master / world if tc.cpu_offload else 0
    state = 16 * trained + (dtype_bytes * n if lora else 0)  # sharded weights, gradients, moments
    if not lora:
        export = dtype_bytes * n
    else:
        matrices = [i * o for t, (i, o) in shapes.items() if t in tc.lora_targets]
        base = dtype_bytes * n if merged or tp_out == 1 else 0
        merge = merging * max(matrices) + (dtype_bytes * cfg.n_layers * sum(matrices) if tp_out == 1 else 0)
        export = 4 * trained + base + (merge if merged else 0)
    return max(setup + shards, state / world if tc.cpu_offload else 0, export + shards)


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
    device_state = 0 if tc.cpu_offload else state / world  # cpu_offload keeps it in host memory (host_memory)
    return device_state + gathered + activations + output_grad


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


# ------------------------------------------------------------------------------------------------ the dry run


def dry_run(recipe_path, runs_dir="runs", world=None, device=None, reuse=None):
    """What `run_pipeline` would do (w2s/pipeline.py), and its estimated cost, as markdown; reads no weights and
    writes nothing. world: processes of the run (default: this launch's); device: a GPU name for the time estimate
    (default: this machine's CUDA device; none on a CPU-only machine); reuse: as run_pipeline's."""
    recipe = load_recipe(recipe_path)
    check_reuse(reuse, Path(runs_dir) / recipe.name)
    world = world or int(os.environ.get("WORLD_SIZE", 1))
    device = device or (profile.device_name() if torch.cuda.is_available() else "cpu")
    stages = build_stages(recipe)
    work, configs = workload(recipe) if not recipe.data.train_2 else questions_workload(recipe), model_configs(recipe)
    planned = list(plan(stages, Path(runs_dir) / recipe.name, reuse))
    runs = [status not in ("done", "taken") for _, status, _ in planned]
    costs = stage_costs([stage for stage, _, _ in planned], recipe, work, configs, world, device, runs=runs)
    rows, io_rows = [], []
    for (stage, status, reasons), cost in zip(planned, costs):
        why = "; ".join(reasons[:3]) + (f"; and {len(reasons) - 3} more" if len(reasons) > 3 else "")
        rows.append((stage.name, status, why or "-", f"{cost.generated:,}", f"{cost.trained:,}",
                     human_bytes(cost.disk), human_bytes(cost.memory), human_seconds(cost.seconds)))
        if cost.generated or cost.trained:  # a stage that runs a model
            io_rows.append((stage.name, *_io_cells(cost)))
    todo = total_cost(cost for runs_it, cost in zip(runs, costs) if runs_it)
    rows.append(("to do", "", "", f"{todo.generated:,}", f"{todo.trained:,}", human_bytes(todo.disk),
                 human_bytes(todo.memory), human_seconds(todo.seconds)))
    io_rows.append(("to do", *_io_cells(todo)))
    header = ["stage", "status", "why", "tokens generated", "tokens trained", "disk written", "peak memory / device",
              "time"]
    io_header = ["stage", "host memory, rank 0", "checkpoints read", "resume state on disk"]
    tp = max(recipe.sampling.tp, recipe.sampling.weak_tp)
    warning = (f"**The recipe's tensor parallelism (tp = {tp}) needs a multiple of {tp} processes; this plans for "
               f"{world}**: pass --world-size {tp} (make ... NPROC={tp}).\n\n" if world % tp else "")
    return (f"# Dry run: {recipe.name} on {world} x {device}\n\n{warning}The estimate starts from:\n\n" +
            "\n".join(_workload_lines(work, gold=not recipe.data.train_2)) + "\n\n" + _table(header, rows) +
            "\n\nHost memory, checkpoint reads and resume state of the stages that run a model (reading is not in "
            "the time above):\n\n" + _table(io_header, io_rows) +
            "\n")


def _io_cells(cost):
    """The loading table's cells of a Cost: host memory, checkpoint bytes read and their time, resume state."""
    return (human_bytes(cost.host), f"{human_bytes(cost.read)} ({human_seconds(cost.read_seconds)})",
            human_bytes(cost.resume))


def questions_workload(recipe):
    """The estimate's Workload in the setting without gold, from the train_2 and test files. No gold solution to
    measure a response by: one is assumed half of [sampling] sample_max_new_tokens long."""
    d, s1 = recipe.data, recipe.stage1
    train_2, test = load_questions(d.task, d.train_2), load_records(d.task, d.test)
    check_data_sizes(recipe, train_2, test)
    count = _token_counter(recipe.models.strong)
    prompts = [count(task_prompt(d.task, r)) for r in train_2[:2000]]  # the mean settles long before
    prompt, response = sum(prompts) / len(prompts), recipe.sampling.sample_max_new_tokens / 2
    return Workload(0, len(train_2), min(d.n_test or len(test), len(test)), prompt,
                    (s1.n_demos + 1) * prompt + s1.n_demos * response, response)


def _workload_lines(work, gold=True):
    response = (f"gold solution {work.response_tokens:.0f} (a response is assumed as long" if gold else
                f"response {work.response_tokens:.0f} (no gold to measure: half of sample_max_new_tokens")
    return [f"- train_1 / train_2 / test: {work.n_train_1:,} / {work.n_train_2:,} / {work.n_test:,} questions",
            f"- mean tokens: zero-shot prompt {work.prompt_tokens:.0f}, 4-shot prompt {work.few_shot_tokens:.0f}, "
            f"{response}, capped at max_new_tokens)",
            f"- Stage I keeps {KEPT_FRACTION:.0%} of train_2 per round; pairs for {PAIRED_FRACTION:.0%} of it",
            f"- training at {TRAIN_MFU:.1%} MFU, sampling at {SAMPLING_MFU:.1%} of peak (measured on an "
            f"{MEASURED_ON}, BENCHMARKS.md): lower bounds for a multi-GPU 70B run",
            f"- checkpoints read at {DISK_READ_BYTES_S / 1e9:g} GB/s, in the recipe's dtype; a sampling stage whose "
            f"weights the stage before left in memory reads only its adapter"]
