"""The GRPO toy of tests/test_grpo.py, and its torchrun worker: the same GRPO runs under FSDP2 as in one process.

    OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc_per_node=2 tests/dist_grpo_worker.py OUT

The toy: a tiny random Llama over a 16-token character vocabulary, questions "Q0:" .. "Q7:", and a grader whose
answer is the first digit of a response. At initialization the policy is near uniform, so G samples seldom agree;
the vote reward (agree with the group's majority) is learnable by concentrating the first digit's distribution.
Each run of RUNS trains from the same initial weights and writes OUT/<name>/metrics.jsonl and the exported
safetensors (rank 0).
"""

import sys
from pathlib import Path

import torch

from w2s.config import ModelConfig
from w2s.grpo import train_grpo
from w2s.model import Transformer
from w2s.train_config import GRPOConfig, TrainConfig

CHARS = "0123456789Q:A\n"  # ids 2.. ; 0 pad, 1 EOS
QUESTIONS = [{"id": f"q{i}", "prompt": f"Q{i}:"} for i in range(8)]


class ToyTokenizer:
    """One character per token (ids 2..), pad 0, EOS 1; no BOS: the interface of w2s.tokenizer the sampler uses."""

    pad_id, eos_id, bos_id = 0, 1, None
    stop_ids = frozenset({1})

    def encode(self, text, bos=True):
        return [2 + CHARS.index(c) for c in text]

    def decode(self, ids):
        return "".join(CHARS[i - 2] for i in ids if 2 <= i < 2 + len(CHARS))

    def save(self, path):  # the export writes the tokenizer beside the weights; this one is rebuilt from CHARS
        pass


class FirstDigit:
    """A grader: the answer is the response's first digit ("" without one)."""

    name = "first-digit"

    def answer(self, text):
        return next((c for c in text if c.isdigit()), "")

    def same(self, a, b, record=None):
        return a != "" and a == b


def toy_model(seed=0):
    cfg = ModelConfig(family="llama", vocab_size=2 + len(CHARS), dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      head_dim=8, hidden_dim=64, max_seq_len=64, bos_token_id=None, eos_token_id=1, pad_token_id=0)
    return Transformer(cfg).init_weights(std=0.02, generator=torch.Generator().manual_seed(seed)).float()


STEPS = 3
COMMON = dict(lr=3e-3, batch_size=4, micro_batch_size=1, max_steps=STEPS, clip=1.0, seed=5, progress=False)
# name: (TrainConfig, GRPOConfig). 5 questions of 8 per step would leave ranks unequal; 4 on 2 ranks: 2 each.
RUNS = {
    "full": (TrainConfig(**COMMON), GRPOConfig(group_size=4, max_new_tokens=3, kl_beta=0.1)),
    "lora_mu2": (TrainConfig(**COMMON, lora_rank=4, lora_alpha=8.0),
                 GRPOConfig(group_size=4, max_new_tokens=3, kl_beta=0.1, updates_per_batch=2,
                            aggregation="token")),
}


def run(name, out_dir, on_step=None):
    cfg, gcfg = RUNS[name]
    return train_grpo(toy_model(), ToyTokenizer(), QUESTIONS, cfg, gcfg, FirstDigit(), out_dir=out_dir,
                      on_step=on_step)


def main(out_root):
    torch.set_num_threads(1)
    for name in RUNS:
        run(name, Path(out_root) / name)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
