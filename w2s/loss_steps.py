"""What one micro-batch of SFT or preference training computes: the model with its output-layer loss head
(TrainModule), and the loss steps the training loop (w2s/train.py) calls with each micro-batch.

A loss step gets (module, batch on device, norm), where norm = the global [valid tokens, pairs, chosen tokens] of
the whole optimizer step. It returns (loss to backward, {metric: tensor}) with every metric already divided by its
global normalizer, so summing metrics over micro-batches and ranks gives the step's value. The counts functions give
a batch's share of norm. The formulas themselves are w2s/losses.py's; GRPO's step lives with its task (w2s/grpo.py).

    python -m pytest -q tests/test_train.py -k "sft_loss or gradient or output_layer or preference_losses"
"""

import torch
import torch.nn as nn

from w2s import losses, ops
from w2s.data import IGNORE_INDEX


class TrainModule(nn.Module):
    """The model and its output-layer loss in one forward, so FSDP2 gathers the output matrix around the loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens, targets, per_token, target_rows=None):
        """tokens, targets (B, T) -> per-token target log-probs (B*T,) if per_token else the summed token NLL.
        targets come shifted from data.collate: targets[b, t] = tokens[b, t + 1] on response tokens, IGNORE_INDEX
        elsewhere, so hidden[b, t] predicts targets[b, t]. target_rows: those of targets, when the caller has them;
        else they are found here, which on CUDA waits for the forward (one host sync per micro-batch).

        The log-probs come back flat: the caller reshapes them, because FSDP2 hooks this module's outputs for
        backward and warns about (and cannot protect) outputs that are views.
        """
        hidden = self.model(tokens, return_hidden=True)  # (B, T, D)
        weight, cap = self.model.lm_head_weight(), self.model.cfg.final_logit_softcap
        t = targets.flatten()  # (N,)
        # Only positions with a target reach the output layer: prompt and padding positions would cost the (N, V)
        # matmuls forward and backward to produce zeros (a large share of a big-vocabulary model's FLOPs, and of a
        # row's tokens when its prompt is long).
        rows = find_target_rows(targets) if target_rows is None else target_rows  # (n,)
        h = hidden.flatten(0, 1).index_select(0, rows)  # (n, D)
        if per_token:
            logps = ops.linear_logprobs(h, weight, t[rows], softcap=cap, ignore_index=IGNORE_INDEX)  # (n,)
            return logps.new_zeros(t.shape).index_copy(0, rows, logps)  # (N,), 0 where ignored
        loss_sum, _ = ops.linear_cross_entropy(h, weight, t[rows], softcap=cap, ignore_index=IGNORE_INDEX)
        return loss_sum


def find_target_rows(targets):
    """The flat indices (n,) of targets' (B, T) positions that have a target. The training loop finds them on the
    host, in the collated batch, and sends them with it: on CUDA, nonzero() must wait for every queued kernel to know
    n, and a wait per micro-batch leaves the GPU idle while the host queues the rest of the step."""
    return (targets.flatten() != IGNORE_INDEX).nonzero().squeeze(1)


def batch_on_device(batch, device):
    """A collated micro-batch {name: tensor or value} on `device`, with its "target_rows" (find_target_rows) found
    first, while its targets are still on the host. For CUDA the tensors are copied from pinned memory: a copy from
    pageable memory makes the host wait, and the host should be queuing the step's kernels ahead of the GPU."""
    if "target_rows" not in batch:
        batch = {**batch, "target_rows": find_target_rows(batch["targets"])}
    return {k: to_device(v, device) if torch.is_tensor(v) else v for k, v in batch.items()}


def to_device(tensor, device):
    """tensor on device without making the host wait: a host tensor bound for CUDA goes through pinned memory (the
    copy queues on the stream and the caching host allocator keeps the buffer until it has run)."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def sft_counts(batch):
    return [int((batch["targets"] != IGNORE_INDEX).sum()), 0, 0]


def sft_step(module, batch, norm):
    """Token-mean NLL of the response tokens: the fused cross-entropy's sum over the global target-token count."""
    loss = module(batch["tokens"], batch["targets"], per_token=False, target_rows=batch.get("target_rows")) / norm[0]
    return loss, {"loss": loss.detach()}


def pair_counts(batch):
    P = batch["n_pairs"]
    valid = batch["targets"] != IGNORE_INDEX
    return [int(valid.sum()), P, int(valid[:P].sum()) if P else 0]


class PreferenceStep:
    """DPO / IPO (with cached reference log-probs) or ORPO; the formulas are w2s/losses.py's. nll_weight adds the
    chosen response's mean token NLL to DPO / IPO (ORPO has its own, by orpo_nll); a batch's "weights" (P,), when the
    pairs carry them, weight every per-pair term."""

    def __init__(self, kind, beta, nll_weight=0.0, orpo_nll="sequence_mean"):
        if kind not in losses.PREFERENCE_LOSSES:
            *rest, last = losses.PREFERENCE_LOSSES
            raise ValueError(f"loss={kind!r}: expected {', '.join(map(repr, rest))} or {last!r}")
        losses.check_beta(kind, beta)
        self.kind, self.beta, self.nll_weight, self.orpo_nll = kind, beta, nll_weight, orpo_nll

    @property
    def needs_reference(self):
        return self.kind != "orpo"

    def __call__(self, module, batch, norm):
        logps = module(batch["tokens"], batch["targets"], per_token=True, target_rows=batch.get("target_rows"))
        logps = logps.view_as(batch["targets"])  # (2P, T)
        P = batch["n_pairs"]
        names = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected"] + (["nll", "or_loss", "log_odds"] if self.kind == "orpo" else
                                                      ["nll"] if self.nll_weight else [])
        if P == 0:  # a rank's empty slot in a short last batch: still backward (FSDP needs every rank), adds 0
            zero = logps.sum() * 0.0
            return zero, {n: zero.detach() for n in names}
        n_tokens = (batch["targets"] != IGNORE_INDEX).sum(-1)  # (2P,)
        seq = logps.sum(-1)  # (2P,) summed response log-probs, chosen rows first
        chosen, rejected = seq[:P], seq[P:]
        _, pairs, chosen_tokens = norm  # global counts
        weights = batch.get("weights")  # (P,) or None
        if self.kind == "orpo":
            loss, chosen_rewards, rejected_rewards, extra = losses.orpo_loss(
                chosen, rejected, n_tokens[:P], n_tokens[P:], self.beta, n_pairs=pairs, n_chosen_tokens=chosen_tokens,
                nll=self.orpo_nll, weights=weights)
        else:
            ref = batch["ref"]  # (2P,)
            per_pair, chosen_rewards, rejected_rewards, nll = losses.reference_pair_losses(
                self.kind, chosen, rejected, ref[:P], ref[P:], n_tokens[:P], self.beta, self.nll_weight)
            loss = losses.weighted_pair_mean(per_pair, pairs, weights)
            extra = {"nll": losses.weighted_pair_mean(nll, pairs, weights)} if nll is not None else {}
        if self.kind == "orpo":  # logged as TRL logs them: per-token means for ORPO, sums for DPO / IPO
            chosen, rejected = chosen / n_tokens[:P], rejected / n_tokens[P:]
        stats = {"loss": loss.detach(), "rewards/chosen": chosen_rewards.sum() / pairs,
                 "rewards/rejected": rejected_rewards.sum() / pairs,
                 "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum() / pairs,
                 "rewards/margins": (chosen_rewards - rejected_rewards).sum() / pairs,
                 "logps/chosen": chosen.detach().sum() / pairs, "logps/rejected": rejected.detach().sum() / pairs,
                 **extra}
        return loss, stats
