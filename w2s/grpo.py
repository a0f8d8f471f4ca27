"""GRPO with a vote reward: a Stage II alternative to the preference pairs (recipe: `[stage2] losses = ["grpo"]`).

    model, stats = train_grpo(model, tok, [{"id", "prompt"}], TrainConfig(lr=1e-6, batch_size=16), GRPOConfig(),
                              grader, weak_answers={id: answer}, out_dir="runs/x/16_grpo/model", return_stats=True)

No pairs and no fixed data: at each rollout the CURRENT policy samples G responses to each question of the step, each
response is rewarded for agreeing with its group's majority answer, and the policy takes a step on the clipped
surrogate of w2s/losses.py (grpo_loss; its formula, and where it differs from TRL's, are there). It is a Task of the
one training loop (w2s/train.py): rows are questions; the Task's make_batches samples, grades and collates this
rank's micro-batches of the step; its loss step calls grpo_loss; setup, AdamW, clipping, FSDP2, LoRA, checkpoints,
the log line and the export are the loop's.

Rewards, per question, from the answers a_1..a_G the grader reads from its G responses and their majority answer a+
(w2s/stages/metrics.majority_vote: the most frequent non-empty answer, ties to the earliest; none when no
response has an answer):
    "vote"          r_i = 1 if a_i = a+, else 0 (an empty answer never agrees): the vote is the label, as in TTRL
                    (Zuo et al. 2025), with no confidence threshold.
    "vote_or_weak"  r_i = 1 if a_i = a+ and a+ = the weak model's answer to the question (D_weak), else 0: the vote is
                    a label only where the weak supervisor agrees with it (as Stage I keeps a question only where two
                    labellers agree); a group whose vote differs from the weak answer, or where either is missing,
                    gets rewards 0 and so no gradient.
Advantages are group-normalized (losses.group_advantages): a group with equal rewards (unanimous, or no answer at
all) carries no signal. train_2 gold is never read.

Reading the live weights:
  * one plain process (CPU): the sampler runs on the training module's own Transformer (LoRA layers unmerged), in
    eval mode under no_grad: no copy; the KV cache is the only extra memory.
  * FSDP2 (torchrun, and one GPU through its 1-rank group): before each rollout every rank gathers the full weights
    (one all-gather per tensor, as the export does: w2s.export.export_trained), merges LoRA, and samples from that plain
    Transformer in the model's input dtype on its device; the copy is dropped after the rollout. Cost: one whole
    model per rank while sampling (2 bytes per parameter in bf16: 16 GB for an 8B model; a 70B model needs a
    tensor-parallel sampling copy, w2s/tensor_parallel.py, not built here), and per rollout one all-gather of the
    weights (every rank receives the full model in the shards' dtype: fp32 master weights when fully fine-tuned,
    the frozen base's dtype under LoRA) plus the merge: small next to decoding G x questions responses. FSDP's
    unshard() around generation would spare the merge but not the memory: the whole model has to stay gathered
    through the generation, because ranks decode different numbers of steps and per-layer gathers inside the
    forward would not line up across ranks.
  * each rank samples its own questions (no data-parallel split inside the sampler); the counter-based RNG keys every
    draw by (the rollout's seed, the question's index, the sample, the token), so a question gets the same responses
    in one process and under FSDP, whichever rank draws it (up to float rounding: merged vs unmerged LoRA, batch
    composition).

The reference of the KL term (kl_beta > 0):
  * with LoRA: the adapters as they were when training started, copied into the LoRA layers for one no-grad forward
    per micro-batch (a fresh adapter: the base alone; M_plus's adapter, continued: M_plus): no second model, one
    more copy of the adapter.
  * full fine-tuning: a frozen copy of the initial weights (a plain Transformer, gathered under FSDP, in the model's
    input dtype), kept for the whole run: one more whole model per rank (4 bytes per parameter in fp32, 2 in bf16).
    Log-probs "computed before the step" would be pi_old's, not the initial policy's, so the copy cannot be avoided;
    kl_beta = 0 (the default) needs none.

Old log-probs: with updates_per_batch = 1 pi_old is the policy itself (detached in the loss step: ratio 1, see
w2s/losses.py). With updates_per_batch = mu > 1 the loop runs mu optimizer steps on each rollout batch (Task.repeat)
and one no-grad forward per micro-batch before the first records pi_old's log-probs; a resume inside a rollout batch
samples it again, from the resumed weights.

The log line / metrics.jsonl record adds to the loop's own (loss, lr, grad_norm, tokens, tok_per_s over the whole
step: sampling, scoring and update): reward (mean), reward_std (mean within-group std, Bessel-corrected as TRL's),
frac_reward_zero_std (groups without signal), vote_confidence (mean count(a+) / G), vote_agrees_weak (groups whose a+
is the weak answer), kl (mean k3 per token; 0 without a reference), clip_ratio, completion_len (mean tokens per
response), truncated (share stopped at max_new_tokens), rollout/s (seconds of sampling, the gather of the sampling
copy included, mean over ranks) and rollout/tok_s (sampled tokens per second, summed over ranks).

    python -m pytest -q tests/test_grpo.py tests/test_losses.py
    python scripts/bench_grpo.py            # tokens/s of sampling and of the update, demo strong model, CPU
"""

import contextlib
import time
from dataclasses import asdict, replace

import torch
import torch.distributed as dist

from w2s import data, losses, tracking
from w2s.data import IGNORE_INDEX, Example
from w2s.export import export_trained
from w2s.files import stable_hash
from w2s.lora import LoRALinear
from w2s.loss_steps import TrainModule
from w2s.parallel import Dist, init_distributed, reshard_all
from w2s.sampling import encode_prompts, iter_generate
from w2s.stages.metrics import answers_agree, comparator, majority_vote
from w2s.train import Task, _pad_id, _run
from w2s.train_config import GRPOConfig, TrainConfig

# Sums a batch carries for the metrics, per response and per question; the loss step divides them by the step's
# global counts of responses and questions.
SEQ_STATS = ("reward", "completion_len", "truncated")
GROUP_STATS = ("reward_std", "frac_reward_zero_std", "vote_confidence", "vote_agrees_weak")


def group_rewards(answers, reward, same, weak_answer=""):
    """(rewards [G floats], a_plus, confidence) of one question's G answers under `reward` (module docstring)."""
    a_plus, confidence = majority_vote(answers, same)
    target = a_plus if reward == "vote" or answers_agree(a_plus, weak_answer, same) else ""
    return [float(answers_agree(a, target, same)) for a in answers], a_plus, confidence


@contextlib.contextmanager
def live_weights(module, d: Dist, dtype):
    """The Transformer that holds the current policy's weights, to sample from (module docstring): the training
    module's own in one plain process, a gathered and merged copy under FSDP (a collective: every rank enters)."""
    was_training = module.training
    module.eval()  # no LoRA dropout while sampling
    try:
        yield module.model if not d.sharded else export_trained(module, module.model.cfg, dtype, d.device, d, None,
                                                                 None)
    finally:
        module.train(was_training)


def adapter_snapshot(layers):
    """[(LoRALinear, (A, B) copies)] of these adapters now. Taken when training starts it is the reference policy: a
    fresh adapter (B = 0) is the base alone, a continued one (M_plus's) is M_plus."""
    return [(m, (m.lora_A.detach().clone(), m.lora_B.detach().clone())) for m in layers]


@contextlib.contextmanager
def adapters_as(snapshot, sharded_root=None):
    """Inside the block every adapter holds the snapshot's values, copied in place, and gets its own back after.
    Under FSDP2 (sharded_root: the sharded module) the copies go into the shards, which the snapshot holds: every
    module is resharded before each copy (a forward leaves the root and the last block gathered)."""
    def reshard():
        if sharded_root is not None:
            reshard_all(sharded_root)

    reshard()
    current = adapter_snapshot([m for m, _ in snapshot])
    try:
        _copy_adapters(snapshot)
        yield
    finally:
        reshard()
        _copy_adapters(current)


@torch.no_grad()
def _copy_adapters(snapshot):
    for m, (a, b) in snapshot:
        m.lora_A.copy_(a)
        m.lora_B.copy_(b)


def frozen_copy(module, d: Dist, dtype):
    """A plain, frozen Transformer of the module's current weights (LoRA merged) on this rank's device, owning its
    storage (a gather on one rank, or a cast to the same dtype, may hand back the training tensors themselves)."""
    plain = export_trained(module, module.model.cfg, dtype, d.device, d, None, None)
    with torch.no_grad():
        for p in plain.parameters():
            p.data = p.data.clone()
            p.requires_grad_(False)
    return TrainModule(plain).eval()


@torch.no_grad()
def token_logps(module, batch, device):
    """Per-token log-probs (S, T) of a collated batch under a TrainModule in eval mode, 0 off the responses; CPU."""
    was_training = module.training
    module.eval()
    tokens, targets = batch["tokens"].to(device), batch["targets"].to(device)
    logps = module(tokens, targets, per_token=True).view_as(targets)
    module.train(was_training)
    return logps.float().cpu()


class GRPOTask:
    """GRPO as a Task of the training loop: rows are questions (see the module docstring for what each part does)."""

    def __init__(self, tokenizer, questions, cfg: TrainConfig, gcfg: GRPOConfig, grader, weak_answers, same_for, stop,
                 max_batch, d: Dist, dtype, pad_id):
        self.tokenizer, self.cfg, self.g, self.grader, self.same_for = tokenizer, cfg, gcfg, grader, same_for
        self.ids = [q["id"] for q in questions]
        self.weak = dict(weak_answers or {})
        if gcfg.reward == "vote_or_weak" and (missing := [i for i in self.ids if i not in self.weak]):
            raise ValueError(f"reward 'vote_or_weak' needs the weak answer of every question; {len(missing)} have "
                             f"none (first: {missing[0]!r})")
        self.prompt_ids = encode_prompts(tokenizer, [q["prompt"] for q in questions])  # as the sampler does
        self.stop, self.max_batch, self.d, self.dtype, self.pad_id = tuple(stop), max_batch, d, dtype, pad_id
        G, new = gcfg.group_size, gcfg.max_new_tokens
        # Until a question is sampled its sequences are only bounded: the loop groups rows by these lengths.
        self.row_seqs = [((len(p) + new, new),) * G for p in self.prompt_ids]
        self.module = self.reference = self.initial_adapters = self.cache = None

    def task(self):
        key = stable_hash([self.prompt_ids, asdict(self.g), self.grader.name, sorted(self.weak.items()), self.stop])
        return Task(row_seqs=self.row_seqs, make_batch=None, count_fn=self.counts, loss_step=self.loss_step,
                    data_key=f"grpo:{key}", prepare=self.prepare, make_batches=self.make_batches,
                    repeat=self.g.updates_per_batch)

    def prepare(self, module, fingerprint):
        """After sharding, before any resume: keep the module to sample from, and the reference when the KL needs one
        (the initial adapters with LoRA, else a frozen copy of the initial weights)."""
        self.module = module
        lora = [m for m in module.modules() if isinstance(m, LoRALinear)]
        if self.g.kl_beta > 0:
            if lora:
                self.initial_adapters = adapter_snapshot(lora)
            else:
                self.reference = frozen_copy(module, self.d, self.dtype)

    # -- the step's batches -------------------------------------------------------------------------------------
    def make_batches(self, step, slots):
        """This rank's micro-batches of optimizer step `step`: slots[m] is micro-batch m's question indices."""
        first = step - step % self.g.updates_per_batch  # the step that sampled this rollout batch
        if self.cache is not None and self.cache[0] == first:
            return [b | {"rollout": torch.zeros(2)} for b in self.cache[1]]  # its sampling was logged at `first`
        questions = [q for rows in slots for q in rows]
        start = time.perf_counter()
        with live_weights(self.module, self.d, self.dtype) as model, torch.no_grad():
            done = dict(iter_generate(
                model, self.tokenizer, [self.prompt_ids[q] for q in questions], n=self.g.group_size,
                temperature=self.g.temperature, max_new_tokens=self.g.max_new_tokens, stop=self.stop,
                seed=self.cfg.seed * 1_000_003 + first, max_batch=self.max_batch, prompt_indices=questions))
            del model  # the sampling copy (FSDP) is freed here, before the scoring and update passes
        seconds = time.perf_counter() - start
        completions = {questions[i]: outs for i, outs in done.items()}
        batches = [self.collate(rows, completions) for rows in slots]
        sampled = sum(c["num_tokens"] for outs in completions.values() for c in outs)
        batches[0]["rollout"] = torch.tensor([sampled / max(seconds, 1e-9), seconds / self.d.world_size])
        self.score(batches)
        self.share_lengths(completions)
        self.cache = (first, batches)
        return batches

    def collate(self, rows, completions):
        """One micro-batch: prompt + response ids of every sample of the questions `rows` (prompts masked), their
        advantages, and the metric sums."""
        examples, advantages = [], []
        seq, group = torch.zeros(len(SEQ_STATS)), torch.zeros(len(GROUP_STATS))
        for q in rows:
            outs, qid = completions[q], self.ids[q]
            same = comparator(self.grader.same, self.same_for, qid)
            answers = [self.grader.answer(c["text"]) for c in outs]
            rewards, a_plus, confidence = group_rewards(answers, self.g.reward, same, self.weak.get(qid, ""))
            r = torch.tensor(rewards, dtype=torch.float64)
            advantages += losses.group_advantages(r[None], self.g.scale_rewards)[0].tolist()
            examples += [Example(self.prompt_ids[q] + c["token_ids"], len(self.prompt_ids[q])) for c in outs]
            seq += torch.tensor([r.sum(), sum(c["num_tokens"] for c in outs),
                                 sum(c["finish_reason"] == "length" for c in outs)], dtype=torch.float32)
            group += torch.tensor([r.std(), float(r.std() == 0), confidence,
                                   float(answers_agree(a_plus, self.weak.get(qid, ""), same))], dtype=torch.float32)
        tokens, targets = data.collate(examples, self.pad_id)  # no rows: one all-ignored dummy row
        return {"tokens": tokens, "targets": targets, "n_seqs": len(examples), "seq_stats": seq,
                "advantages": torch.tensor(advantages or [0.0], dtype=torch.float32),  # (S,), one per row
                "group_stats": group, "rollout": torch.zeros(2)}

    def score(self, batches):
        """pi_old's (updates_per_batch > 1) and the reference's (kl_beta > 0) per-token log-probs of each micro-batch:
        no-grad forwards of the training module, the same number on every rank (FSDP's gathers are collective)."""
        device, module = self.d.device, self.module
        if self.g.updates_per_batch > 1:
            for b in batches:
                b["old_logps"] = token_logps(module, b, device)
        if self.g.kl_beta > 0 and self.reference is not None:
            for b in batches:
                b["ref_logps"] = token_logps(self.reference, b, device)
        elif self.g.kl_beta > 0:
            with adapters_as(self.initial_adapters, module if self.d.sharded else None):
                for b in batches:
                    b["ref_logps"] = token_logps(module, b, device)
        if self.d.sharded and (self.g.updates_per_batch > 1 or (self.g.kl_beta > 0 and self.reference is None)):
            reshard_all(module)  # the root and last block stay gathered after a forward; the update gathers anew

    def share_lengths(self, completions):
        """Write the sampled sequences' (length, response tokens) into row_seqs, every rank's, so that every rank
        meters the whole step (w2s/train.py counts tokens and FLOPs from row_seqs)."""
        local = {q: tuple((len(self.prompt_ids[q]) + c["num_tokens"], c["num_tokens"]) for c in outs)
                 for q, outs in completions.items()}
        parts = [local]
        if self.d.sharded and self.d.world_size > 1:
            parts = [None] * self.d.world_size
            dist.all_gather_object(parts, local)
        for part in parts:
            for q, seqs in part.items():
                self.row_seqs[q] = seqs

    # -- the loss step ------------------------------------------------------------------------------------------
    @staticmethod
    def counts(batch):
        return [int((batch["targets"] != IGNORE_INDEX).sum()), batch["n_seqs"], 0]

    def loss_step(self, module, batch, norm):
        """grpo_loss of one micro-batch, normalized by the step's global token / response counts (norm[0], norm[1])."""
        targets = batch["targets"]
        logps = module(batch["tokens"], targets, per_token=True, target_rows=batch.get("target_rows")).view_as(targets)
        old = batch.get("old_logps")
        loss, stats = losses.grpo_loss(
            logps, logps.detach() if old is None else old, batch["advantages"], targets != IGNORE_INDEX,
            clip_eps=self.g.clip_eps, beta=self.g.kl_beta, ref_logps=batch.get("ref_logps"),
            aggregation=self.g.aggregation, n_sequences=norm[1], n_tokens=norm[0])
        n_groups = norm[1] / self.g.group_size
        stats = {"loss": loss.detach(), **stats,
                 **{name: v / norm[1] for name, v in zip(SEQ_STATS, batch["seq_stats"])},
                 **{name: v / n_groups for name, v in zip(GROUP_STATS, batch["group_stats"])},
                 "rollout/tok_s": batch["rollout"][0], "rollout/s": batch["rollout"][1]}
        return loss, stats


def train_grpo(model, tokenizer, questions, cfg: TrainConfig, gcfg: GRPOConfig, grader, weak_answers=None,
               same_for=None, out_dir=None, stop=(), max_batch=256, on_step=None, progress=None, return_stats=False,
               return_model=True, keep_ckpt=False, report_to=(), log_dir=None, run_name=None):
    """GRPO of `model` on questions [{"id", "prompt"}] with the vote reward (module docstring). -> model.

    grader: answer(text) and same(a, b) (w2s/tasks/graders.py); same_for(id), when given, compares per question.
    weak_answers: {id: the grader's answer of the weak response}, needed by reward "vote_or_weak" (and logged as
    vote_agrees_weak). stop: stop strings of the rollouts; max_batch: the sampler's decode slots. cfg.batch_size is
    questions per step, cfg.micro_batch_size questions per forward/backward. on_step, progress, return_stats,
    return_model, keep_ckpt, report_to, log_dir, run_name: as in w2s.train.train_sft.
    """
    cfg = cfg if progress is None else replace(cfg, progress=progress)
    d = init_distributed()
    if not questions:
        raise ValueError("train_grpo: no questions")
    grpo = GRPOTask(tokenizer, questions, cfg, gcfg, grader, weak_answers, same_for, stop, max_batch, d,
                    dtype=model.embed_tokens.weight.dtype, pad_id=_pad_id(tokenizer, model))
    report = tracking.Report(tuple(report_to), log_dir, run_name)
    trained, stats = _run(model, tokenizer, grpo.task(), cfg, out_dir, d, on_step, return_model, keep_ckpt, report,
                          "grpo")
    stats.update(n_rows=len(questions), n_skipped=0)
    return (trained, stats) if return_stats else trained
