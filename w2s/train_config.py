"""TrainConfig: every option of the training loop (w2s/train.py), its checks, and its command-line form; GRPOConfig:
the options of the GRPO task (w2s/grpo.py) that the loop's own fields do not cover.

    cfg = TrainConfig(lr=1e-5, batch_size=64, lora_rank=16)   # impossible values fail here, naming the field
    add_config_args(parser); cfg = config_from_args(parser.parse_args())   # one --flag per field (w2s/train_cli.py)

Recipes ([weak_sft], [strong_sft], [preference], [grpo] in recipes/*.toml) are checked against these fields too
(w2s/recipe.py; [grpo] takes both classes' fields). Tested in tests/test_train.py, tests/test_recipe.py and
tests/test_grpo.py.
"""

import math
from dataclasses import dataclass, fields

from w2s.lora import TARGETS
from w2s.losses import GRPO_AGGREGATIONS, ORPO_NLL


@dataclass
class TrainConfig:
    lr: float = 1e-5
    min_lr: float = 0.0  # cosine decays lr -> min_lr over the steps after warmup
    warmup_steps: int = 0
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 32  # rows (SFT) or pairs (preference) per optimizer step, over all ranks and micro-batches
    micro_batch_size: int = 4  # rows (pairs) per forward/backward on one rank, at most; grad_accum is derived (a
    # value above batch_size / world_size means no accumulation: a step still takes batch_size rows)
    max_seq_len: int = 2048
    weight_decay: float = 0.0  # AdamW decoupled decay, on matrices only (not norms or biases)
    adam_betas: tuple = (0.9, 0.95)
    clip: float | None = 1.0  # global gradient-norm clip; None: no clipping
    beta: float = 0.1  # DPO/IPO beta; ORPO's lambda
    nll_weight: float = 0.0  # DPO/IPO + this x the chosen response's mean token NLL (Iterative RPO's alpha); 0: off
    orpo_nll: str = "sequence_mean"  # ORPO's NLL: per-response token mean averaged over pairs (LLaMA-Factory v0.6.2),
    # or "token_mean" over all chosen tokens of the step (w2s/losses.py)
    seed: int = 0
    lora_rank: int | None = None  # None: full fine-tuning
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: tuple = TARGETS
    export_merged: bool = False  # LoRA: also write the merged HF model to OUT/merged (as large as the base)
    activation_checkpointing: bool = False  # recompute each block in backward: activations of one block at a time
    cpu_offload: bool = False  # FSDP2 OffloadPolicy: sharded params/grads/optimizer state in host memory
    ckpt_every: int = 0  # steps between training-state checkpoints; 0: none
    log_every: int = 1
    bad_rows: str = "skip"  # "skip": report and drop bad rows; "error": stop at the first (see w2s/data.py)
    resume: bool = True  # continue from the newest checkpoint in out_dir/ckpt when there is one
    progress: bool = True  # tqdm bar on rank 0

    def __post_init__(self):
        """Impossible settings fail here, with the field's name, not steps later deep inside the loop."""
        positive = ["lr", "epochs", "batch_size", "micro_batch_size", "max_seq_len", "log_every"]
        positive += [name for name in ("max_steps", "clip", "lora_rank") if getattr(self, name) is not None]
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}: expected a number > 0")
        counts = ["epochs", "batch_size", "micro_batch_size", "max_seq_len", "log_every", "warmup_steps", "ckpt_every"]
        for name in counts + [n for n in ("max_steps", "lora_rank") if getattr(self, n) is not None]:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"TrainConfig.{name}={value!r}: expected a whole number")
        betas = tuple(self.adam_betas) if isinstance(self.adam_betas, (list, tuple)) else ()
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"TrainConfig.adam_betas={self.adam_betas!r}: expected two numbers in [0, 1)")
        for name in ("min_lr", "warmup_steps", "weight_decay", "ckpt_every", "beta", "nll_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}: expected a number >= 0")
        finite = ["lr", "min_lr", "weight_decay", "beta", "nll_weight", "lora_alpha"]
        for name in finite + ["clip"] * (self.clip is not None):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"TrainConfig.{name}={value!r}: expected a finite number")
        if self.min_lr > self.lr:  # the cosine would climb from lr to min_lr: a swapped pair, not a schedule
            raise ValueError(f"TrainConfig.min_lr={self.min_lr!r}: expected a number <= lr ({self.lr!r})")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"TrainConfig.lora_dropout={self.lora_dropout!r}: expected 0 <= p < 1")
        if self.orpo_nll not in ORPO_NLL:
            raise ValueError(f"TrainConfig.orpo_nll={self.orpo_nll!r}: expected {' or '.join(map(repr, ORPO_NLL))}")
        if self.bad_rows not in ("skip", "error"):
            raise ValueError(f"TrainConfig.bad_rows={self.bad_rows!r}: expected 'skip' or 'error'")
        unknown = sorted(set(self.lora_targets) - set(TARGETS))
        if unknown:
            raise ValueError(f"TrainConfig.lora_targets: unknown {unknown}; expected names from {list(TARGETS)}")

    def grad_accum(self, world_size):
        return max(1, math.ceil(self.batch_size / (self.micro_batch_size * world_size)))


GRPO_REWARDS = ("vote", "vote_or_weak")  # w2s/grpo.py's docstring defines both


@dataclass
class GRPOConfig:
    """GRPO's own options. Questions per optimizer step are TrainConfig.batch_size (questions per forward/backward:
    micro_batch_size, each with its group_size samples); TrainConfig.beta is not used (kl_beta is GRPO's)."""

    group_size: int = 8  # G: samples per question per rollout, the voters of its majority answer
    max_new_tokens: int = 512  # per sample
    temperature: float = 1.0  # of the rollouts (top-p 1, as the paper's Stage II samples)
    clip_eps: float = 0.2  # the ratio is clipped to [1 - eps, 1 + eps]
    kl_beta: float = 0.0  # weight of the k3 KL to the reference (0: no reference pass, as TRL's default)
    reward: str = "vote"  # "vote": agree with the group's majority; "vote_or_weak": only where it is the weak label
    updates_per_batch: int = 1  # optimizer steps on each rollout batch (mu); 1: pi_old = pi, the ratio is 1
    aggregation: str = "sequence"  # "sequence": mean over samples of token means (GRPO); "token": DAPO's token mean
    scale_rewards: bool = True  # divide advantages by the group's reward std (False: Dr. GRPO)

    def __post_init__(self):
        for name in ("group_size", "max_new_tokens", "updates_per_batch"):
            if getattr(self, name) < (2 if name == "group_size" else 1):
                raise ValueError(f"GRPOConfig.{name}={getattr(self, name)!r}: expected an integer >= "
                                 f"{2 if name == 'group_size' else 1}")
        for name in ("temperature", "clip_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"GRPOConfig.{name}={getattr(self, name)!r}: expected a number > 0")
        for name in ("temperature", "clip_eps", "kl_beta"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"GRPOConfig.{name}={getattr(self, name)!r}: expected a finite number")
        if self.kl_beta < 0:
            raise ValueError(f"GRPOConfig.kl_beta={self.kl_beta!r}: expected a number >= 0")
        for name, allowed in (("reward", GRPO_REWARDS), ("aggregation", GRPO_AGGREGATIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"GRPOConfig.{name}={getattr(self, name)!r}: expected one of {allowed}")


# TrainConfig fields only the preference losses read: scripts/sft.py does not offer them, and the pipeline keys them
# to the preference stages alone (w2s/pipeline.py).
PREFERENCE_ONLY = ("beta", "nll_weight", "orpo_nll")


# Help text of every TrainConfig field, for the scripts' --help (w2s/train_cli.py: scripts/sft.py, scripts/dpo.py).
CONFIG_HELP = {
    "lr": "peak learning rate (AdamW)",
    "min_lr": "learning rate at the end of the cosine decay",
    "warmup_steps": "linear warmup steps before the cosine decay",
    "epochs": "passes over the data (ignored when --max-steps is given)",
    "max_steps": "optimizer steps to run; unset: epochs * ceil(rows / batch size)",
    "batch_size": "rows (pairs) per optimizer step, summed over all ranks and accumulation steps",
    "micro_batch_size": "rows (pairs) per forward/backward on one rank, at most; gradient accumulation makes up the "
                        "rest (above batch_size / world size: none, a step still takes batch_size rows)",
    "max_seq_len": "longest sequence in tokens (prompt + response); longer rows are bad rows",
    "weight_decay": "AdamW decoupled weight decay, on matrices only",
    "adam_betas": "AdamW betas (two numbers)",
    "clip": "global gradient-norm clip ('none' to disable)",
    "beta": "DPO/IPO beta, or ORPO's lambda (weight of the odds-ratio term)",
    "nll_weight": "DPO/IPO: add this times the chosen response's mean token NLL (Iterative RPO's alpha; 0: off)",
    "orpo_nll": "ORPO's NLL term: 'sequence_mean' (each chosen response's mean token NLL, averaged over pairs, as "
                "LLaMA-Factory v0.6.2) or 'token_mean' (over all chosen tokens of the step)",
    "seed": "seed of the data order and of the LoRA init",
    "lora_rank": "LoRA rank r; unset: full fine-tuning",
    "lora_alpha": "LoRA alpha; the update is scaled by alpha / r",
    "lora_dropout": "dropout on the LoRA branch's input",
    "lora_targets": "linear layers that get LoRA adapters",
    "export_merged": "LoRA: besides the adapter (PEFT layout) in OUT, write the merged HF model to OUT/merged",
    "activation_checkpointing": "recompute each block in backward (less memory, ~1/3 more compute)",
    "cpu_offload": "FSDP2: keep sharded params, grads and optimizer state in host memory",
    "ckpt_every": "steps between resumable training-state checkpoints in OUT/ckpt (0: none)",
    "log_every": "steps between log lines / metrics.jsonl records",
    "bad_rows": "'skip': report every bad row (file:line, reason) and train on the rest; 'error': stop at the first",
    "resume": "continue from the newest checkpoint in OUT/ckpt if there is one (--no-resume: start over)",
    "progress": "show a progress bar on rank 0",
}


def add_config_args(parser, skip=()):
    """Add one --option per TrainConfig field (defaults and help from the dataclass) to an argparse parser."""
    import argparse

    defaults = TrainConfig()
    for f in fields(TrainConfig):
        if f.name in skip:
            continue
        flag, default, help_text = "--" + f.name.replace("_", "-"), getattr(defaults, f.name), CONFIG_HELP[f.name]
        shown = "unset" if default is None else " ".join(map(str, default)) if isinstance(default, tuple) else default
        help_text += f" (default: {shown})"
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif isinstance(default, tuple):
            kind = float if f.name == "adam_betas" else str
            parser.add_argument(flag, nargs=len(default) if kind is float else "+", type=kind, default=default,
                                help=help_text)
        elif f.name == "clip":
            parser.add_argument(flag, type=lambda v: None if v.lower() == "none" else float(v), default=default,
                                help=help_text)
        elif f.name in ("bad_rows", "orpo_nll"):
            choices = ("skip", "error") if f.name == "bad_rows" else ORPO_NLL
            parser.add_argument(flag, choices=choices, default=default, help=help_text)
        else:
            kind = {"max_steps": int, "lora_rank": int}.get(f.name, type(default))
            parser.add_argument(flag, type=kind, default=default, help=help_text)
    return parser


def config_from_args(args, **overrides):
    """TrainConfig from parsed add_config_args options (fields not on the command line keep their defaults)."""
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
    return TrainConfig(**{**given, **overrides})
