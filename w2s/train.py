"""The one training loop: SFT, DPO, IPO, ORPO and GRPO (w2s/grpo.py) plug in as a Task; FSDP2, LoRA, checkpoints.

    model = train_sft(model, tokenizer, [{"prompt": ..., "response": ...}], TrainConfig(lr=1e-5), out_dir="runs/x")
    model = train_preference(model, tokenizer, [{"prompt", "chosen", "rejected"}], cfg, out_dir, loss="dpo")
    model, stats = train_sft(..., return_stats=True)   # stats: the run's cost and outcome (Trainer.run_stats)
    train_sft(..., on_step=print, report_to=["tensorboard"])  # each metrics record; TensorBoard in out_dir/tb

(TrainConfig, the options, lives in w2s/train_config.py; what a micro-batch computes, the model with its loss head
and the SFT and preference loss steps, in w2s/loss_steps.py; the loss formulas in w2s/losses.py.)

Both run in-process (the pipeline keeps weights resident between stages) and under torchrun (each rank calls the
same function). A run is a Trainer, in three parts as in torchtitan's train.py:

  setup (Trainer.__init__): fp32 master weights, LoRA, activation checkpointing and FSDP2 sharding (w2s/parallel.py,
     applied from outside the model; ranks holding no weights are filled from rank 0), the task's reference pass,
     AdamW, and resume from the newest checkpoint in out_dir/ckpt;
  the step loop (Trainer.train), where one optimizer step (Trainer.train_step) does:
     1. take the step's global batch (cfg.batch_size rows, length-grouped, w2s/data.py) and cut it into
        world_size * grad_accum micro-batches; this rank runs its grad_accum of them;
     2. count the valid target tokens (and pairs) of ALL micro-batches on all ranks: one all-reduce of 3 numbers;
     3. for each micro-batch: hidden = model(tokens, return_hidden=True); the fused linear loss/log-prob op turns
        hidden states + the output matrix into per-token quantities without building (N, V) logits on GPU; the loss
        step returns sum / GLOBAL count, and backward accumulates. FSDP2 SUMS gradients over ranks (w2s/parallel.py
        sets a divide factor of 1 where FSDP2 would average), so the result equals one big batch on one device,
        whatever the micro-batch size or world size;
     4. clip the global gradient norm, AdamW step at the warmup + cosine learning rate;
     then w2s/profile.py's meter counts the step's tokens and exact FLOPs (step_flops); every cfg.log_every steps
     the loop writes the one log line (loss, lr, grad norm, tokens/s, MFU, peak memory) and a metrics.jsonl record,
     and every cfg.ckpt_every steps model/optimizer/RNG/step atomically (torch.distributed.checkpoint into a temp
     dir, then rename). A rerun with the same data and config resumes from the newest checkpoint;
  export (Trainer.export, w2s/export.py): full fine-tuning gathers the weights and exports them in HF format to
     out_dir; LoRA saves the adapter alone (PEFT layout, pointing at the base checkpoint; a merged HF copy only with
     export_merged). The model comes back as a plain unsharded Transformer in the input dtype (the model passed in is
     consumed: use the returned one).

A model loaded from an adapter directory arrives with live LoRA layers: a LoRA run with the same rank, alpha and
targets continues training that adapter, a full fine-tune merges it first (w2s/lora.py prepare_lora). A nan or inf
gradient norm (checked every step, before the update) or loss (log steps) stops the run with one line.

DPO/IPO need log ref(y|x) of the initial weights: one no-grad pass before training computes them for every pair,
cached in out_dir/ref_logps.pt under a hash of the tokenized pairs and the model weights, so the reference model
is never resident during training and a rerun or resume reuses them (w2s/reference_logps.py).

Precision: master weights and optimizer state are fp32. On GPU, FSDP2 computes in bf16 and reduces gradients in
fp32 (also on a single GPU, through a 1-rank group); a single CPU process runs plain fp32 without FSDP.

    python -m pytest -q tests/test_train.py tests/test_fsdp.py
"""

import hashlib
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from w2s import data, profile, tracking
from w2s.export import export_trained
from w2s.files import stable_hash, write_atomic
from w2s.lora import prepare_lora
from w2s.loss_steps import (
    PreferenceStep,
    TrainModule,
    batch_on_device,
    pair_counts,
    sft_counts,
    sft_step,
    to_device,
)
from w2s.parallel import (
    Dist,
    all_reduce_sum,
    barrier,
    broadcast_object,
    enable_activation_checkpointing,
    fill_from_rank0,
    init_distributed,
    needs_fill_from_rank0,
    reshard_all,
    shard_model,
)
from w2s.reference_logps import model_fingerprint, reference_logps
from w2s.train_config import TrainConfig
from w2s.train_state import (
    latest_checkpoint,
    load_training_state,
    read_train_state,
    remove_checkpoints,
    save_training_state,
)

# ---------------------------------------------------------------------------------------------- schedule, flops


def lr_at(step, total_steps, cfg: TrainConfig):
    """Learning rate of 0-based optimizer step `step`: linear warmup to cfg.lr, then cosine to cfg.min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------- hashing


def examples_hash(examples):
    """sha256 over the token ids and loss masks (so it covers the tokenizer and the bad-row filtering)."""
    h = hashlib.sha256()
    for ex in examples:
        for e in (ex.chosen, ex.rejected) if isinstance(ex, data.Pair) else (ex,):
            # spans only for chat rows: a prompt/response row hashes as [n_prompt, tokens], whatever the chat format
            h.update(json.dumps([e.n_prompt, e.tokens] + ([e.spans] if e.spans is not None else [])).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- public API


def train_sft(model, tokenizer, rows, cfg: TrainConfig, out_dir=None, on_step=None, progress=None,
              return_stats=False, return_model=True, keep_ckpt=False, report_to=(), log_dir=None, run_name=None):
    """Supervised fine-tuning on rows in any of w2s/data.py's formats ({"prompt", "response"}, {"prompt",
    "completion"}, {"messages"}, id rows); loss on the response (assistant) tokens only. -> model.

    on_step(rec) is called on every rank at every log step (every cfg.log_every steps and the last) with the record
    that goes to metrics.jsonl: {"step", "loss", "lr", "grad_norm", "tokens", "tok_per_s", "mfu" (None without a
    known peak, e.g. CPU), "peak_mem_gib", "epoch"}, plus the preference losses' "rewards/chosen", "rewards/rejected",
    "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected" (ORPO: "nll", "or_loss", "log_odds");
    metrics are already summed over ranks. Use it to log elsewhere, early-stop (raise) or watch a run in a notebook.
    report_to: trackers that get the same records ("tensorboard", "wandb"; w2s/tracking.py), writing under log_dir
    (default out_dir/tb) as run_name (default out_dir's name). out_dir also gets train_config.json, the resolved config.
    progress, when given, overrides cfg.progress; return_stats=True returns (model, stats) with the run's cost and
    outcome for a stage's meta.json (Trainer.run_stats, plus n_rows and n_skipped). return_model=False returns None for
    the model: only out_dir gets it (under FSDP every rank would otherwise hold a whole copy of the trained model,
    140 GB each for a 70B one); with LoRA, return_model="base" returns the untouched base weights (w2s/export.py).
    With LoRA out_dir gets the adapter (PEFT layout), plus out_dir/merged with cfg.export_merged. keep_ckpt=True
    leaves the training state in out_dir/ckpt for the caller to delete once it has recorded the run (a pipeline
    stage: after its meta.json). A non-finite gradient norm or loss stops the run with NonFiniteError.
    """
    cfg = cfg if progress is None else replace(cfg, progress=progress)
    d = init_distributed()
    examples, _, skipped = data.encode_sft_rows(tokenizer, rows, cfg.max_seq_len, cfg.bad_rows, verbose=d.is_main,
                                                vocab_size=model.cfg.vocab_size)
    if not examples:
        raise ValueError(f"train_sft: none of the {len(rows)} rows is usable (see the skipped-row report above)")
    _warn_past_trained_context(model, (ex.tokens for ex in examples))
    pad_id = _pad_id(tokenizer, model)

    def make_batch(indices):
        tokens, targets = data.collate([examples[i] for i in indices], pad_id)
        return {"tokens": tokens, "targets": targets}

    task = Task(row_seqs=[((len(ex.tokens), data.n_targets(ex)),) for ex in examples], make_batch=make_batch,
                count_fn=sft_counts, loss_step=sft_step, data_key=examples_hash(examples))
    report = tracking.Report(tuple(report_to), log_dir, run_name)
    trained, stats = _run(model, tokenizer, task, cfg, out_dir, d, on_step, return_model, keep_ckpt, report, "sft")
    stats.update(n_rows=len(rows), n_skipped=len(skipped))
    return (trained, stats) if return_stats else trained


def train_preference(model, tokenizer, pairs, cfg: TrainConfig, out_dir=None, loss="dpo", on_step=None,
                     progress=None, return_stats=False, return_model=True, keep_ckpt=False, report_to=(), log_dir=None,
                     run_name=None):
    """DPO / IPO / ORPO (losses.PREFERENCE_LOSSES) on [{"prompt", "chosen", "rejected"}] as text or as TRL's
    conversational lists of messages (or id rows), each row optionally with a "weight" on its loss terms. -> model.

    on_step, progress, return_stats, return_model, keep_ckpt, report_to, log_dir, run_name: as in train_sft.
    """
    cfg = cfg if progress is None else replace(cfg, progress=progress)
    d = init_distributed()
    step_fn = PreferenceStep(loss, cfg.beta, cfg.nll_weight, cfg.orpo_nll)
    encoded, kept, skipped = data.encode_pair_rows(tokenizer, pairs, cfg.max_seq_len, cfg.bad_rows, verbose=d.is_main,
                                                   vocab_size=model.cfg.vocab_size)
    weights = pair_weights(pairs, kept)
    if not encoded:
        raise ValueError(f"train_preference: none of the {len(pairs)} pairs is usable (see the report above)")
    _warn_past_trained_context(model, (ex.tokens for p in encoded for ex in (p.chosen, p.rejected)))
    pad_id = _pad_id(tokenizer, model)
    key = examples_hash(encoded)
    ref = {}

    def prepare(module, fingerprint):  # DPO / IPO: the reference log-probs, cached under the weights' fingerprint
        cache_key = hashlib.sha256(f"{key}|{fingerprint}|{d.device.type}|{d.sharded}".encode()).hexdigest()
        ref["table"] = reference_logps(module, encoded, pad_id, cfg, d, out_dir, cache_key)

    def make_batch(indices):
        tokens, targets = data.collate_pairs([encoded[i] for i in indices], pad_id)
        batch = {"tokens": tokens, "targets": targets, "n_pairs": len(indices)}
        if weights is not None:
            batch["weights"] = weights[torch.tensor(indices, dtype=torch.long)]  # (P,)
        if "table" in ref:
            t = ref["table"][torch.tensor(indices, dtype=torch.long)] if indices else torch.zeros(0, 2)
            batch["ref"] = torch.cat([t[:, 0], t[:, 1]])  # (2P,) chosen then rejected, like the rows
        return batch

    row_seqs = [tuple((len(ex.tokens), data.n_targets(ex)) for ex in (p.chosen, p.rejected)) for p in encoded]
    task = Task(row_seqs=row_seqs, make_batch=make_batch, count_fn=pair_counts, loss_step=step_fn,
                data_key=f"{loss}:{key}" + (f":{stable_hash(weights.tolist())}" if weights is not None else ""),
                prepare=prepare if step_fn.needs_reference else None, fingerprint=step_fn.needs_reference)
    report = tracking.Report(tuple(report_to), log_dir, run_name)
    trained, stats = _run(model, tokenizer, task, cfg, out_dir, d, on_step, return_model, keep_ckpt, report, loss)
    stats.update(n_rows=len(pairs), n_skipped=len(skipped))
    return (trained, stats) if return_stats else trained


def _warn_past_trained_context(model, sequences):
    """Say so when a row is longer than the model's trained context (config.json max_position_embeddings): RoPE
    runs past it, but the model never saw those positions (the sampler warns alike)."""
    longest, trained = max(map(len, sequences)), model.cfg.max_seq_len
    if trained and longest > trained:
        warnings.warn(f"a training row holds {longest} tokens but the model was trained on {trained} positions "
                      f"(config.json max_position_embeddings): positions past it are unreliable")


def pair_weights(rows, kept):
    """(n,) float32 weights of the kept pair rows, from each row's "weight" (w2s/stages/preference_pairs.py writes
    them under [stage2] pair_weighting); None when no row carries one (every pair weighs 1)."""
    if not any(isinstance(row, dict) and "weight" in row for row in rows):
        return None
    return torch.tensor([float(rows[i].get("weight", 1.0)) for i in kept], dtype=torch.float32)


def _pad_id(tokenizer, model):
    for pad in (getattr(tokenizer, "pad_id", None), model.cfg.pad_token_id, getattr(tokenizer, "eos_id", None)):
        if pad is not None:
            return pad
    return 0  # padding positions are masked out of the loss; any valid id works


def _run(model, tokenizer, task, cfg, out_dir, d: Dist, on_step, return_model, keep_ckpt, report, loss):
    """Setup, the step loop, export. -> (trained model or None, Trainer.run_stats of the steps this call ran).
    report (w2s/tracking.py) writes train_config.json, says where a resumed run picks up and feeds the trackers."""
    report.check(out_dir)  # a missing tracker package fails before the model is set up
    profile.reset_peak_memory(d.device)  # this run's peak, not that of what ran before it in the process
    trainer = Trainer(model, task, cfg, d, out_dir)
    info = {"loss": loss, "steps": trainer.total, "world_size": d.world_size, "grad_accum": trainer.accum}
    with report.start(cfg, out_dir, d.is_main, trainer.start, info) as trackers:
        stats = trainer.train(trackers if on_step is None else lambda rec: (trackers(rec), on_step(rec)))
    trained = trainer.export(tokenizer, return_model, keep_ckpt)
    if out_dir is not None and d.is_main:
        print(f"exported to {out_dir}", flush=True)
    return trained, stats


class NonFiniteError(ValueError):
    """Training produced a nan / inf loss or gradient norm (a ValueError, so every entry point's one-line error
    handler reports it as it does bad input)."""


# ---------------------------------------------------------------------------------------------- the trainer


@dataclass
class Task:
    """What a kind of training plugs into the loop (train_sft, train_preference and w2s.grpo.train_grpo build one)."""

    row_seqs: list  # row_seqs[i]: (token length, target tokens) of each of row i's sequences (SFT: 1; pairs: 2;
    # a sampling task rewrites the entries of the rows it samples, in make_batches, before the step is metered)
    make_batch: Callable | None  # row indices -> {"tokens", "targets", ...} CPU tensors
    count_fn: Callable  # batch -> its share of norm: [valid tokens, pairs, chosen tokens]
    loss_step: Callable  # (module, batch on device, norm) -> (loss, {metric: tensor}); w2s/loss_steps.py
    data_key: str  # identifies the data (and loss) in the checkpoints' run key
    prepare: Callable | None = None  # (module, weights fingerprint) after sharding: the reference pass
    fingerprint: bool = False  # prepare reads the weights' fingerprint (an fp64 pass over them on rank 0)
    make_batches: Callable | None = None  # instead of make_batch: (step, this rank's micro-batch rows) -> batches
    repeat: int = 1  # optimizer steps on each global batch (GRPO's policy updates per rollout batch)


class Trainer:
    """One training run: __init__ sets up, train() runs the steps, export() hands back the weights."""

    def __init__(self, model, task: Task, cfg: TrainConfig, d: Dist, out_dir):
        self.task, self.cfg, self.d = task, cfg, d
        self.out_dir = Path(out_dir) if out_dir is not None else None
        if self.out_dir is not None and d.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.model_cfg = model.cfg
        self.lora = cfg.lora_rank is not None
        self.lora_base = getattr(model, "name_or_path", None)  # where a saved adapter points (w2s/checkpoint.py)
        self.module = self._build_module(model)
        self.params, self.optimizer = self._build_optimizer()
        self.lengths = [sum(n for n, _ in seqs) for seqs in task.row_seqs]  # what length grouping sorts by
        self.steps_per_epoch = math.ceil(len(self.lengths) / cfg.batch_size)
        self.total = cfg.max_steps or cfg.epochs * self.steps_per_epoch * task.repeat
        if cfg.warmup_steps > self.total and d.is_main:
            warnings.warn(f"warmup_steps={cfg.warmup_steps} is more than the run's {self.total} steps: the learning "
                          f"rate ends at {self.total / cfg.warmup_steps:.2g} x lr and never decays", stacklevel=2)
        self.accum = cfg.grad_accum(d.world_size)
        # not the world size: the loss is normalized over every rank and the state is saved with global shapes, so
        # a run killed on N ranks resumes on M onto the same trajectory (LoRA dropout's streams are per rank)
        self.run_key = stable_hash([task.data_key, _trajectory_config(cfg)], length=64)
        self.ckpt_root = self.out_dir / "ckpt" if self.out_dir is not None else None
        self.metrics_file = self.out_dir / "metrics.jsonl" if self.out_dir is not None else None
        self._epoch = (None, None)  # (epoch, its global batches)
        self.start = self._resume()

    # -- setup -------------------------------------------------------------------------------------------------
    def _build_module(self, model):
        """fp32 master weights, LoRA, activation checkpointing, FSDP2 sharding (ranks that hold no weights are filled
        from rank 0), then the task's reference pass. -> the TrainModule. Records the dtype and device to export to."""
        cfg, d, prepare = self.cfg, self.d, self.task.prepare
        self.export_dtype, self.export_device = model.embed_tokens.weight.dtype, model.embed_tokens.weight.device
        # Ranks > 0 may hold the model on the meta device (w2s.checkpoint.load_for_training): rank 0's weights reach
        # them when the model is sharded below, and so does rank 0's fingerprint (the reference-cache key).
        on_meta = model.embed_tokens.weight.is_meta
        fill = needs_fill_from_rank0(model, d)
        if on_meta:
            self.export_device = torch.device("cpu")  # where this rank's exported copy goes
        fingerprint = model_fingerprint(model) if self.task.fingerprint and not on_meta else None
        if self.task.fingerprint and fill:
            fingerprint = broadcast_object(fingerprint, d)
        torch.manual_seed(cfg.seed + d.rank)  # dropout streams differ per rank; LoRA's init uses its own generator

        # Trainable weights are fp32 master copies. A frozen LoRA base keeps its dtype under FSDP (it is gathered in
        # bf16 anyway); the plain CPU path computes in fp32 throughout.
        if not self.lora or not d.sharded:
            model.float()
        prepare_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, cfg.seed,
                     where=str(self.out_dir or "train"))
        if cfg.activation_checkpointing:
            enable_activation_checkpointing(model.layers)
        module = TrainModule(model)
        if d.sharded:
            full_state = module.state_dict() if fill and d.is_main else None  # the full tensors, before sharding
            shard_model(module, list(model.layers), d, bf16=d.device.type == "cuda", cpu_offload=cfg.cpu_offload)
            if fill:
                fill_from_rank0(module, full_state, d, cpu_offload=cfg.cpu_offload)
                del full_state
            model.reset_buffers(d.device)
        module.train()
        if prepare is not None:
            prepare(module, fingerprint)
            if d.sharded:
                # The reference pass's forwards left the root and the last block gathered, and while they are,
                # module.parameters() yields the temporary unsharded tensors: reshard so the optimizer (and the
                # checkpoint state dict) get the real sharded fp32 parameters.
                reshard_all(module)
        return module

    def _build_optimizer(self):
        """AdamW over the trainable parameters, weight decay on matrices only. -> (parameters, optimizer)."""
        cfg = self.cfg
        params = [p for p in self.module.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        # fused: one kernel over all parameters (CPU and CUDA) instead of a loop of small per-tensor kernels.
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.adam_betas),
                                      eps=1e-8, fused=True)
        return params, optimizer

    def _resume(self):
        """The first step to run: the newest checkpoint's in out_dir/ckpt (its state loaded) or 0. Trims
        metrics.jsonl to the steps before it. resume=False starts over: the old states are deleted, so that a later
        rerun cannot resume from the abandoned run's newer ones."""
        start, self.tokens_before = 0, 0
        if self.ckpt_root is not None and not self.cfg.resume and self.d.is_main and self.ckpt_root.exists():
            remove_checkpoints(self.ckpt_root)
        if self.ckpt_root is not None and self.cfg.resume and (latest := latest_checkpoint(self.ckpt_root)) is not None:
            saved = read_train_state(latest)
            if saved.get("run_key") != self.run_key:
                raise ValueError(f"{latest}: checkpoint is from a different run (data or config changed); use a "
                                 f"fresh --out directory or resume=False (--no-resume) to start over")
            start = load_training_state(latest, self.module, self.optimizer, self.d)["step"]
            # GRPO's sequences before the checkpoint were sampled, so only the checkpoint knows their tokens; a
            # checkpoint written without the count is recounted from the data
            self.tokens_before = saved["tokens"] if "tokens" in saved else self._input_tokens(range(start))
        if self.metrics_file is not None and self.d.is_main:
            _trim_metrics(self.metrics_file, start)
        return start

    def _input_tokens(self, steps):
        """Model-input tokens of these steps' global batches (the last token of a sequence is no input)."""
        return sum(n - 1 for step in steps for j in self.global_batch(step)[0] for n, _ in self.task.row_seqs[j])

    # -- the step loop -----------------------------------------------------------------------------------------
    def global_batch(self, step):
        """(row indices of step `step`'s global batch, its epoch)."""
        epoch, i = divmod(step // self.task.repeat, self.steps_per_epoch)
        if self._epoch[0] != epoch:
            self._epoch = (epoch, data.epoch_batches(self.lengths, self.cfg.batch_size, self.cfg.seed, epoch))
        return self._epoch[1][i], epoch

    def train_step(self, step, global_batch):
        """One optimizer step (module docstring, 1-4). -> ({metric: this rank's sum}, global grad norm, lr)."""
        d, task, accum = self.d, self.task, self.accum
        slots = data.split_slots(global_batch, d.world_size * accum)
        mine = slots[d.rank * accum:(d.rank + 1) * accum]
        micro = task.make_batches(step, mine) if task.make_batches else [task.make_batch(rows) for rows in mine]
        counts = torch.tensor([sum(c) for c in zip(*(task.count_fn(b) for b in micro))], dtype=torch.float32)
        norm = all_reduce_sum(to_device(counts, d.device), d).clamp(min=1.0)  # global [tokens, pairs, chosen tokens]
        lr = lr_at(step, self.total, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        stats = {}
        for batch in micro:
            loss, s = task.loss_step(self.module, batch_on_device(batch, d.device), norm)
            loss.backward()
            for k, v in s.items():
                stats[k] = stats.get(k, 0.0) + v.float()
        grad_norm = clip_grad_norm(self.params, self.cfg.clip)
        self.check_finite(step, "gradient norm", grad_norm)  # before the update: the weights stay finite
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return stats, grad_norm, lr

    def train(self, on_step=None):
        """Run the steps from self.start; on_step(rec) gets every log step's record. -> self.run_stats(...)."""
        from tqdm.auto import tqdm

        cfg, d = self.cfg, self.d
        # Tokens are summed over ranks, so MFU is over world_size devices. Every window is a log interval (no
        # warm-up windows); the CUDA peak counts from _run's reset, so it covers setup and the reference pass too.
        meter = profile.StageProfiler(name="train", device=d.device, n_devices=d.world_size, warmup_steps=0,
                                      reset_peak_memory=False)
        bar = tqdm(total=self.total, initial=self.start, disable=not (cfg.progress and d.is_main), dynamic_ncols=True)
        rec = None
        with meter:
            for step in range(self.start, self.total):
                global_batch, epoch = self.global_batch(step)
                stats, grad_norm, lr = self.train_step(step, global_batch)
                # (input length, target tokens) of every sequence: model inputs drop the last token
                seqs = [(n - 1, t) for j in global_batch for n, t in self.task.row_seqs[j]]
                last = step + 1 == self.total
                log = (step + 1) % cfg.log_every == 0 or last
                flops = profile.step_flops(self.model_cfg, seqs, self.lora)
                meter.step(tokens=sum(n for n, _ in seqs), flops=flops, sync=log)
                bar.update(1)
                if log:
                    rec = self.log(step, epoch, stats, grad_norm, lr, meter, bar)
                    if on_step is not None:
                        on_step(rec)
                    meter.restart_window()  # the callback's time is not the next window's
                if self.ckpt_root is not None and cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0 and not last:
                    save_training_state(self.ckpt_root, step + 1, self.module, self.optimizer, d,
                                        {"run_key": self.run_key, "tokens": self.tokens_before + meter.tokens})
                    meter.restart_window()  # right after a log line: keep the checkpoint's I/O out of tokens/s
        bar.close()
        return self.run_stats(meter, rec)

    def check_finite(self, step, what, value):
        """Stop with one line (NonFiniteError) naming the run, the step and the value when `value` is nan or inf.

        The gradient norm is checked every step, before the optimizer update, so a non-finite step never reaches the
        weights or a checkpoint: reading it (clip_grad_norm) is the step's one host sync (the micro-batches come
        with their target rows and through pinned memory, so nothing before it waits: loss_steps.batch_on_device).
        The loss is checked on log steps, where it is reduced over ranks and read anyway (as torchtitan does)."""
        if not math.isfinite(value):
            kept = latest_checkpoint(self.ckpt_root) if self.ckpt_root is not None else None
            raise NonFiniteError(f"{self.out_dir or 'train'}: step {step + 1}: {what} is {value}; training stopped "
                                 f"({'the last checkpoint stays: ' + str(kept) if kept else 'no checkpoint written'};"
                                 f" lower lr or check the data)")

    def log(self, step, epoch, stats, grad_norm, lr, meter, bar):
        """The log step's record (metrics summed over ranks, lr, grad norm, the meter's window); rank 0 writes the
        log line and appends the record to metrics.jsonl. -> the record."""
        names = sorted(stats)
        values = all_reduce_sum(torch.stack([stats[n] for n in names]), self.d).tolist()
        window = meter.last_window()
        rec = {"step": step + 1, **dict(zip(names, values)), "lr": lr, "grad_norm": grad_norm,
               "tokens": window["tokens"], "tok_per_s": window["tok_s"], "mfu": window["mfu"],
               "peak_mem_gib": profile.peak_memory_gib(self.d.device), "epoch": epoch}
        self.check_finite(step, "loss", rec["loss"])
        if self.d.is_main:
            bar.write(profile.fmt_log_line(step=step + 1, total_steps=self.total, loss=rec["loss"], lr=lr,
                                           grad_norm=rec["grad_norm"], tok_s=rec["tok_per_s"], mfu=rec["mfu"],
                                           mem=rec["peak_mem_gib"]))
            if self.metrics_file is not None:
                with open(self.metrics_file, "a") as f:
                    f.write(json.dumps(rec) + "\n")
        return rec

    def run_stats(self, meter, rec):
        """The run's cost and outcome, what a pipeline stage records: steps and tokens of the WHOLE run (every training
        token, all ranks; a resumed run adds the tokens before its checkpoint, as the checkpoint recorded them),
        resumed_from_step (0: not resumed), final_loss (the last logged loss); and this call's own share: run_steps,
        run_tokens, and the meter's tok_s, mfu (None without a known peak: CPU), peak_mem_gib, device and wall_s."""
        cost = meter.cost()
        return {**cost, "tokens": cost["tokens"] + self.tokens_before, "steps": self.total,
                "resumed_from_step": self.start,
                "run_steps": self.total - self.start, "run_tokens": cost["tokens"],
                "final_loss": rec["loss"] if rec else None}

    # -- export ------------------------------------------------------------------------------------------------
    def export(self, tokenizer, return_model=True, keep_ckpt=False):
        """Free the optimizer, export the weights (w2s/export.py), drop the training checkpoints the export supersedes
        unless keep_ckpt (a pipeline stage drops them itself once the stage is recorded done)."""
        self.optimizer = None
        trained = export_trained(self.module, self.model_cfg, self.export_dtype, self.export_device, self.d,
                                 self.out_dir, tokenizer, return_model, export_merged=self.cfg.export_merged,
                                 lora_base=self.lora_base, lora_dropout=self.cfg.lora_dropout)
        if self.ckpt_root is not None and self.d.is_main and not keep_ckpt:
            remove_checkpoints(self.ckpt_root)
        barrier(self.d)
        return trained


def _trajectory_config(cfg):
    """The config fields that change the loss trajectory (a checkpoint only resumes under the same ones)."""
    skip = {"ckpt_every", "log_every", "resume", "progress", "bad_rows", "cpu_offload", "activation_checkpointing",
            "export_merged"}
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in skip}


def _trim_metrics(path, step):
    """On resume keep the metrics up to the checkpoint; on a fresh start begin a new file. A torn last line (the run
    was killed while appending it) is dropped: it is past any checkpoint."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line]
    keep = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: not valid JSON ({e})") from None
        if record["step"] <= step:
            keep.append(line)
    write_atomic(path, "".join(line + "\n" for line in keep))


def clip_grad_norm(params, max_norm):
    """The global L2 norm of all gradients (a DTensor collective under FSDP2) as a float, after scaling them down to
    max_norm when it is set and the norm exceeds it (torch.nn.utils.clip_grad_norm_'s result).

    Reading the norm is the step's one host sync (check_finite needs the value anyway). Knowing it on the host skips
    the scaling on steps under the limit, where torch's clip would read and write every gradient to multiply it by 1.
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    value = float(norm)
    if max_norm is not None and value > max_norm:  # a NaN norm is not: check_finite stops the run instead
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return value


__all__ = ["TrainConfig", "train_sft", "train_preference", "lr_at", "asdict"]
