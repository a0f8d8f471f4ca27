"""GRPO (w2s/grpo.py, losses.grpo_loss): the loss by hand and against TRL's, the vote rewards, the loop on a toy whose
reward is learnable, the reference of the KL term, several updates per rollout batch, FSDP2 on 2 processes == one
process, the recipe's [grpo] section, the stage-table rows and the runner (which never reads train_2 gold).

References are independent of the code under test: plain `math` over the formulas of DeepSeekMath eq. 3 / 4 for the
loss and its gradient; TRL's own GRPOTrainer loss (its compute_loss on prepared log-probs); hand-counted votes; two
runs of the loop for the invariances.

    python -m pytest -q tests/test_grpo.py
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import dist_grpo_worker as toy  # noqa: E402

from w2s import losses  # noqa: E402
from w2s.checkpoint import hf_name  # noqa: E402
from w2s.grpo import group_rewards, train_grpo  # noqa: E402
from w2s.lora import LoRALinear, inject_lora  # noqa: E402
from w2s.train_config import GRPOConfig, TrainConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------- the loss by hand
# Three responses of up to 3 tokens: per-token log-probs under the policy, pi_old and the reference, and a mask.
LOGP = [[-1.0, -0.5, -2.0], [-0.3, -1.2, 0.0], [-0.7, -0.9, -1.5]]
OLD = [[-1.3, -0.45, -2.0], [-0.2, -1.0, 0.0], [-0.7, -1.4, -1.1]]
REF = [[-1.1, -0.6, -1.8], [-0.35, -1.0, 0.0], [-0.9, -0.8, -1.5]]
MASK = [[1, 1, 1], [1, 1, 0], [1, 1, 1]]
ADV = [1.5, -0.8, -0.4]


def _per_token_by_hand(i, t, eps, beta):
    """(l_it, d l_it / d logp_it) of DeepSeekMath eq. 3 (as a loss) with the k3 KL of eq. 4."""
    ratio, a = math.exp(LOGP[i][t] - OLD[i][t]), ADV[i]
    clipped = min(max(ratio, 1 - eps), 1 + eps)
    surrogate = -min(ratio * a, clipped * a)
    # the min picks the unclipped term (gradient -ratio * a) unless the clipped one is smaller (gradient 0)
    grad = -ratio * a if ratio * a <= clipped * a else 0.0
    x = REF[i][t] - LOGP[i][t]
    return surrogate + beta * (math.exp(x) - x - 1), grad + beta * (1 - math.exp(x))


@pytest.mark.parametrize("aggregation", ["sequence", "token"])
@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_grpo_loss_and_gradient_by_hand(aggregation, beta):
    eps = 0.2
    logp = torch.tensor(LOGP, dtype=torch.float64, requires_grad=True)
    loss, stats = losses.grpo_loss(logp, torch.tensor(OLD, dtype=torch.float64), torch.tensor(ADV, dtype=torch.float64),
                                   torch.tensor(MASK, dtype=torch.bool), clip_eps=eps, beta=beta,
                                   ref_logps=torch.tensor(REF, dtype=torch.float64), aggregation=aggregation)
    loss.backward()
    n_tok = sum(map(sum, MASK))
    expected, kl, clipped = 0.0, 0.0, 0
    for i in range(3):
        length = sum(MASK[i])
        for t in range(3):
            if not MASK[i][t]:
                assert logp.grad[i, t].item() == 0.0
                continue
            value, grad = _per_token_by_hand(i, t, eps, beta)
            weight = 1 / (3 * length) if aggregation == "sequence" else 1 / n_tok
            expected += weight * value
            assert logp.grad[i, t].item() == pytest.approx(weight * grad, rel=1e-10, abs=1e-14), (i, t)
            x = REF[i][t] - LOGP[i][t]
            kl += math.exp(x) - x - 1
            ratio = math.exp(LOGP[i][t] - OLD[i][t])
            clipped += (ratio < 1 - eps and ADV[i] < 0) or (ratio > 1 + eps and ADV[i] > 0)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert stats["kl"].item() == pytest.approx(kl / n_tok if beta else 0.0, rel=1e-12)
    assert stats["clip_ratio"].item() == pytest.approx(clipped / n_tok) and 0 < clipped < n_tok


def test_grpo_loss_at_the_sampling_policy_is_the_policy_gradient():
    """One update per rollout batch: pi_old = pi, the ratio is 1, the clip never bites, d l / d logp = -A."""
    logp = torch.tensor(LOGP, dtype=torch.float64, requires_grad=True)
    adv, mask = torch.tensor(ADV, dtype=torch.float64), torch.tensor(MASK, dtype=torch.bool)
    loss, stats = losses.grpo_loss(logp, logp.detach(), adv, mask, aggregation="token")
    loss.backward()
    assert torch.allclose(logp.grad, -adv[:, None] * mask / mask.sum())
    assert stats["clip_ratio"].item() == 0.0


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    mean, std = 0.6, math.sqrt((3 * 0.4**2 + 2 * 0.6**2) / 4)  # Bessel's correction: / (G - 1)
    expected = [(r - mean) / (std + 1e-4) for r in (1.0, 0.0, 0.0, 1.0, 1.0)]
    got = losses.group_advantages(rewards)
    assert got[0].tolist() == pytest.approx(expected, rel=1e-12)
    assert got[1].tolist() == [0.0] * 5  # a unanimous group carries no signal
    assert losses.group_advantages(rewards, scale=False)[0].tolist() == pytest.approx([0.4, -0.6, -0.6, 0.4, 0.4])
    with pytest.raises(ValueError, match="needs >= 2"):
        losses.group_advantages(rewards[:, :1])


def test_grpo_loss_split_into_micro_batches_sums_back():
    """With the step's global counts as normalizers, micro-batches (and ranks) add up to the whole batch's loss."""
    args = [torch.tensor(x, dtype=torch.float64) for x in (LOGP, OLD)]
    mask, adv, ref = torch.tensor(MASK, dtype=torch.bool), torch.tensor(ADV), torch.tensor(REF, dtype=torch.float64)
    for aggregation in ("sequence", "token"):
        whole, _ = losses.grpo_loss(*args, adv, mask, beta=0.1, ref_logps=ref, aggregation=aggregation)
        parts = [losses.grpo_loss(args[0][s], args[1][s], adv[s], mask[s], beta=0.1, ref_logps=ref[s],
                                  aggregation=aggregation, n_sequences=3, n_tokens=mask.sum())[0]
                 for s in (slice(0, 1), slice(1, 3))]
        assert sum(p.item() for p in parts) == pytest.approx(whole.item(), rel=1e-12)


# ---------------------------------------------------------------------------------------------- against TRL


@pytest.fixture(scope="module")
def trl_trainer(tmp_path_factory):
    """make(loss_type, beta) -> a TRL GRPOTrainer on a tiny saved Llama; its loss is read through compute_loss with
    the policy's log-prob function replaced by the prepared log-probs (the model never runs)."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from hf_tiny import hf_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("trl_llama")
    words = Tokenizer(models.WordLevel({"<pad>": 0, "<s>": 1, "</s>": 2, **{str(i): 3 + i for i in range(10)}},
                                       unk_token="<pad>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="</s>", bos_token="<s>")
    hf_model("llama2").save_pretrained(path)  # a path: TRL builds its own reference model from it when beta > 0
    tok.save_pretrained(path)

    def make(loss_type, beta):
        args = trl.GRPOConfig(output_dir=str(path / "out"), per_device_train_batch_size=3, num_generations=3,
                              beta=beta, loss_type=loss_type, epsilon=0.2, use_bias_correction_kl=False,
                              report_to=[], use_cpu=True,
                              max_completion_length=3, save_strategy="no")
        return trl.GRPOTrainer(model=str(path), reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
                               args=args, train_dataset=Dataset.from_dict({"prompt": ["1 2"]}),
                               processing_class=tok)

    return make


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type,aggregation", [("grpo", "sequence"), ("dapo", "token")])
def test_grpo_loss_matches_trl(trl_trainer, loss_type, aggregation, beta):
    """TRL's loss_type "grpo" is our "sequence", its "dapo" (the TRL default) our "token", on the same log-probs,
    old log-probs, reference log-probs and advantages (TRL's own advantage code: rewards minus the group mean, over
    the Bessel-corrected group std + 1e-4). One micro-batch, TRL in eval mode: no accumulation factor. The KL term is
    DeepSeekMath's plain k3: TRL with use_bias_correction_kl=False (its default True multiplies it by the ratio)."""
    from trl.trainer.utils import nanstd

    trainer = trl_trainer(loss_type, beta)
    rewards = torch.tensor([1.0, 0.0, 1.0])
    trl_adv = (rewards - rewards.mean()) / (nanstd(rewards) + 1e-4)
    assert torch.allclose(losses.group_advantages(rewards[None])[0], trl_adv, rtol=1e-6)
    logp = torch.tensor(LOGP, requires_grad=True)
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logp, torch.zeros_like(logp), None)
    mask = torch.tensor(MASK)
    inputs = {"prompt_ids": torch.ones(3, 2, dtype=torch.long), "prompt_mask": torch.ones(3, 2, dtype=torch.long),
              "completion_ids": torch.ones(3, 3, dtype=torch.long), "completion_mask": mask,
              "advantages": trl_adv, "old_per_token_logps": torch.tensor(OLD),
              "ref_per_token_logps": torch.tensor(REF), "num_items_in_batch": mask.sum()}
    trainer.model.eval()
    theirs = trainer.compute_loss(trainer.model, inputs)
    (grad_theirs,) = torch.autograd.grad(theirs, logp)
    ours, _ = losses.grpo_loss(logp, torch.tensor(OLD), trl_adv, mask.bool(), clip_eps=0.2, beta=beta,
                               ref_logps=torch.tensor(REF), aggregation=aggregation)
    (grad_ours,) = torch.autograd.grad(ours, logp)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6, abs=1e-7)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------- rewards


def test_vote_rewards_by_hand():
    same = toy.FirstDigit().same
    answers = ["3", "5", "3", "", "3", "7"]  # a+ = "3", 3 votes of 6 (the empty answer stays in the denominator)
    rewards, a_plus, confidence = group_rewards(answers, "vote", same)
    assert (rewards, a_plus, confidence) == ([1, 0, 1, 0, 1, 0], "3", 0.5)
    assert group_rewards(answers, "vote_or_weak", same, weak_answer="3")[0] == [1, 0, 1, 0, 1, 0]  # weak agrees
    assert group_rewards(answers, "vote_or_weak", same, weak_answer="5")[0] == [0] * 6  # weak disagrees: no label
    assert group_rewards(answers, "vote_or_weak", same, weak_answer="")[0] == [0] * 6  # no weak answer: no label
    assert group_rewards(["", ""], "vote", same)[0] == [0, 0]  # no answer at all: no a+
    assert group_rewards(["5", "3", "3", "5"], "vote", same)[:2] == ([1, 0, 0, 1], "5")  # a tie: the earliest


def test_grpo_config_checks():
    for bad, message in [(dict(group_size=1), "group_size"), (dict(reward="gold"), "reward"),
                         (dict(aggregation="dr_grpo"), "aggregation"), (dict(kl_beta=-1.0), "kl_beta")]:
        with pytest.raises(ValueError, match=message):
            GRPOConfig(**bad)


# ---------------------------------------------------------------------------------------------- the loop


def _run(cfg, gcfg, out_dir=None, model=None, **kwargs):
    recs = []
    trained = train_grpo(model or toy.toy_model(), toy.ToyTokenizer(), toy.QUESTIONS, cfg, gcfg, toy.FirstDigit(),
                         out_dir=out_dir, on_step=recs.append, **kwargs)
    return trained, recs


def test_mean_reward_rises_on_a_learnable_toy():
    """The policy starts near uniform over 16 tokens, so 8 samples seldom agree on a first digit; GRPO with the vote
    reward concentrates it, and the mean reward rises."""
    cfg = TrainConfig(lr=2e-2, min_lr=2e-2, batch_size=8, micro_batch_size=4, max_steps=12, seed=0, progress=False)
    _, recs = _run(cfg, GRPOConfig(group_size=8, max_new_tokens=2))
    rewards = [r["reward"] for r in recs]
    assert len(recs) == 12
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.25, rewards
    first = recs[0]
    # what the log line carries: the reward, its spread, the response length, the sampler's and the loop's speed
    assert 0 < first["reward_std"] and 0 < first["completion_len"] <= 2 and first["rollout/tok_s"] > 0
    assert first["tok_per_s"] > 0 and first["tokens"] == sum(len(q["prompt"]) for q in toy.QUESTIONS) * 8 + \
        round(first["completion_len"] * 64) - 64  # model inputs: prompt + response - 1 per sequence
    assert first["loss"] == pytest.approx(0.0, abs=1e-6)  # sequence means of advantages that sum to 0 per group
    assert first["kl"] == 0.0  # kl_beta = 0: no reference pass


@pytest.mark.parametrize("lora", [False, "fresh", "continued"])
def test_kl_reference_is_the_initial_policy(lora):
    """LoRA: the adapters as they were at the start (a fresh one: the base; a trained one GRPO continues, as M_plus's:
    that adapter, not the base); full fine-tuning: a frozen copy. Either way the KL is 0 at the first update (the
    policy is still the reference) and grows once the policy moves; the reference does not move."""
    extra = dict(lora_rank=4, lora_alpha=16.0) if lora else {}
    cfg = TrainConfig(lr=2e-2, batch_size=4, micro_batch_size=2, max_steps=4, seed=1, progress=False, **extra)
    model = toy.toy_model()
    if lora == "continued":
        inject_lora(model, rank=4, alpha=16.0)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, LoRALinear):
                    m.lora_B.normal_(0.0, 0.3)
    _, recs = _run(cfg, GRPOConfig(group_size=4, max_new_tokens=2, kl_beta=0.5), model=model)
    assert recs[0]["kl"] == 0.0
    assert all(r["kl"] > 1e-6 for r in recs[1:]), [r["kl"] for r in recs]


def test_several_updates_per_rollout_batch():
    """updates_per_batch = 2: steps 1 and 2 train on the same rollouts (sampled once, logged once); at step 1 the
    ratio is 1 (no clipping), at step 2 it has moved."""
    cfg = TrainConfig(lr=3e-2, batch_size=4, micro_batch_size=2, max_steps=4, seed=2, progress=False)
    _, recs = _run(cfg, GRPOConfig(group_size=4, max_new_tokens=3, updates_per_batch=2, clip_eps=0.05))
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert recs[0]["rollout/s"] > 0 and recs[1]["rollout/s"] == 0 and recs[2]["rollout/s"] > 0
    assert recs[1]["reward"] == recs[0]["reward"] and recs[1]["completion_len"] == recs[0]["completion_len"]
    assert recs[0]["clip_ratio"] == 0.0 and recs[1]["clip_ratio"] > 0.0


def test_a_resumed_run_counts_the_tokens_it_sampled_before_its_checkpoint(tmp_path, monkeypatch):
    """Killed right after its step-2 checkpoint and resumed, a GRPO run's stats count the tokens of every step: the
    sampled lengths before the checkpoint (not max_new_tokens per response) plus the resumed steps', as the per-step
    records of metrics.jsonl (log_every = 1) sum them."""
    import w2s.train as train

    cfg = TrainConfig(lr=2e-2, batch_size=4, micro_batch_size=2, max_steps=4, ckpt_every=2, log_every=1, seed=3,
                      progress=False)
    gcfg = GRPOConfig(group_size=4, max_new_tokens=6)
    real_save = train.save_training_state
    with monkeypatch.context() as mp:
        mp.setattr(train, "save_training_state", lambda *a, **k: real_save(*a, **k) or (_ for _ in ()).throw(
            KeyboardInterrupt("killed after a checkpoint")))
        with pytest.raises(KeyboardInterrupt):
            _run(cfg, gcfg, tmp_path)
    (_, stats), _ = _run(cfg, gcfg, tmp_path, return_stats=True)
    steps = _metrics(tmp_path)
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and (stats["resumed_from_step"], stats["steps"]) == (2, 4)
    assert any(r["completion_len"] < gcfg.max_new_tokens for r in steps[:2])  # an over-count would show
    assert stats["tokens"] == sum(r["tokens"] for r in steps) and stats["run_tokens"] == steps[2]["tokens"] + \
        steps[3]["tokens"]


# ---------------------------------------------------------------------------------------------- FSDP2


def _metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """(dir of the 2-process runs, dir of the 1-process runs) of dist_grpo_worker.RUNS."""
    base = tmp_path_factory.mktemp("grpo_fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "dist_grpo_worker.py"), str(base / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for name in toy.RUNS:
        toy.run(name, base / "one" / name)
    return base / "two", base / "one"


@pytest.mark.parametrize("name", list(toy.RUNS))
def test_two_fsdp_processes_equal_one_process(fsdp_runs, name):
    """Each rank samples its own questions from a gathered copy of the weights, and the counter-based RNG keys every
    draw by question, so both runs sample the same responses: the rewards, lengths and token counts are equal
    exactly; losses, gradient norms and weights up to fp32 summation order (2 ranks vs 1)."""
    two, one = (d / name for d in fsdp_runs)
    m2, m1 = _metrics(two), _metrics(one)
    assert [r["step"] for r in m2] == [r["step"] for r in m1] == list(range(1, toy.STEPS + 1))
    for a, b in zip(m2, m1):
        for key in ("reward", "reward_std", "completion_len", "tokens", "vote_confidence"):
            assert a[key] == b[key], (a["step"], key)
        for key in ("loss", "kl", "clip_ratio"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), (a["step"], key)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), a["step"]
    w2, w1 = _exported(two), _exported(one)
    assert w2.keys() == w1.keys()
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], atol=1e-5, rtol=0, msg=key)
    if (one / "adapter_model.safetensors").exists():  # LoRA exports the adapter; B starts at zero
        moved = max(w1[k].abs().max().item() for k in w1 if ".lora_B." in k)
    else:
        initial = {hf_name(k): v for k, v in toy.toy_model().state_dict().items()}
        moved = max((w1[k] - initial[k]).abs().max().item() for k in w1)
    assert moved > 1e-3  # training really moved the weights


def _exported(path):
    """The tensors a run exported: the model, or under LoRA the adapter (PEFT's layout and names)."""
    adapter = path / "adapter_model.safetensors"
    return load_file(adapter if adapter.exists() else path / "model.safetensors")


# ---------------------------------------------------------------------------------------------- recipe, table, runner
GRPO_RECIPE = """
[stage2]
losses = ["grpo"]
[grpo]
lr = 1e-3
max_steps = 2
batch_size = 2
micro_batch_size = 1
group_size = 2
max_new_tokens = 4
reward = "vote_or_weak"
"""


def _recipe(tmp_path, extra=GRPO_RECIPE):
    from test_recipe import BASE, _load

    return _load(tmp_path, BASE.replace("[models]\n", '[models]\ndtype = "float32"\ndevice = "cpu"\n') + extra)


def test_recipe_grpo_section_and_the_stage_rows(tmp_path):
    from w2s.pipeline import build_stages
    from w2s.recipe import grpo_config, train_config

    r = _recipe(tmp_path)
    cfg, gcfg = train_config(r, "grpo"), grpo_config(r)
    assert (cfg.lr, cfg.max_steps, cfg.batch_size) == (1e-3, 2, 2) and cfg.beta == TrainConfig().beta
    assert (gcfg.group_size, gcfg.max_new_tokens, gcfg.reward) == (2, 4, "vote_or_weak")
    stages = {s.name: s for s in build_stages(r)}
    # GRPO starts from M_plus, reads the questions and the weak labels; without a pair loss nothing samples or pairs
    assert stages["16_grpo"].reads == ["00_data", "02_weak_labels", "13_r2_sft_hybrid"]
    assert stages["16_grpo"].args == {"init": "13_r2_sft_hybrid"} and stages["16_grpo"].kind == "train"
    assert not {"14_samples", "15_pairs", "16_dpo", "17_orpo"} & set(stages)
    assert stages["41_eval_stage2_grpo"].reads == ["00_test", "16_grpo"]
    both = {s.name for s in build_stages(_recipe(tmp_path, '[stage2]\nlosses = ["dpo", "grpo"]\n'
                                                          '[eval]\npass_k_samples = 2\n'))}
    assert {"14_samples", "15_pairs", "16_dpo", "16_grpo", "28_eval_stage2_dpo", "41_eval_stage2_grpo",
            "42_passk_stage2_grpo"} <= both
    for extra, message in [("[grpo]\ngroup_size = 1\n", r"\[grpo\].*group_size"),
                           ("[grpo]\nreward = 2\n", r"\[grpo\]\.reward: expected str"),
                           ("[grpo]\nvotes = 2\n", "unknown key 'votes'"),
                           ('[stage2]\nlosses = ["ppo"]\n', "unknown loss 'ppo'")]:
        with pytest.raises(ValueError, match=message):
            _recipe(tmp_path, extra)


def test_runner_trains_m_plus_and_never_reads_train_2_gold(tmp_path, monkeypatch):
    import w2s.runners as runners
    from w2s.checkpoint import save_model
    from w2s.config import ModelConfig
    from w2s.engine import Context
    from w2s.model import Transformer
    from w2s.tokenizer import load_tokenizer

    run = tmp_path / "run"
    questions = [{"id": f"q{i}", "question": f"Ann has {i} pens. How many pens now?"} for i in range(3)]
    for stage, name, rows in [("00_data", "train_2.jsonl", questions),
                              ("00_data", runners.GOLD_FILE, [{"id": "q0", "answer": "0", "solution": "#### 0"}]),
                              ("02_weak_labels", "labels.jsonl", [q | {"response": "#### 1"} for q in questions])]:
        (run / stage).mkdir(parents=True, exist_ok=True)
        (run / stage / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    tok = load_tokenizer(ROOT / "demo" / "tokenizer")
    cfg = ModelConfig(family="llama", vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      head_dim=8, hidden_dim=64, max_seq_len=256, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    m_plus = Transformer(cfg).init_weights(generator=torch.Generator().manual_seed(0))
    save_model(m_plus, run / "13_r2_sft_hybrid" / "model", tokenizer=tok)

    def no_gold(ctx):
        raise AssertionError("GRPO read train_2 gold")

    monkeypatch.setattr(runners, "read_train_2_gold", no_gold)
    ctx = Context(_recipe(tmp_path), run, progress=False)
    counts = runners.run_grpo(ctx, run / "16_grpo", init="13_r2_sft_hybrid")
    assert (run / "16_grpo" / "model" / "config.json").is_file()
    assert counts["n_questions"] == 3 and counts["steps"] == 2 and counts["grader"] == "paper"
    assert set(counts["final"]) >= {"reward", "reward_std", "kl"}
    assert len(_metrics(run / "16_grpo" / "model")) == 2


def test_an_epoch_of_several_updates_per_rollout_batch_takes_each_batch_that_many_steps():
    """8 questions, batch 4, updates_per_batch 2, one epoch (no max_steps): 2 rollout batches x 2 updates = 4 steps,
    sampling at steps 1 and 3, all in epoch 0."""
    cfg = TrainConfig(lr=3e-2, batch_size=4, micro_batch_size=2, max_steps=None, epochs=1, seed=2, progress=False)
    _, recs = _run(cfg, GRPOConfig(group_size=2, max_new_tokens=2, updates_per_batch=2))
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert [r["epoch"] for r in recs] == [0, 0, 0, 0]
    assert [r["rollout/s"] > 0 for r in recs] == [True, False, True, False]


# ---------------------------------------------------------------------------------------------- one micro-batch


class NumberGrader:
    """A grader whose answers are the responses themselves, compared as numbers: "3" and "3.0" are one answer."""

    name = "number"

    def answer(self, text):
        return text

    def same(self, a, b, record=None):
        return a != "" and b != "" and float(a) == float(b)


def _completion(text, n_tokens, finish="stop"):
    return {"text": text, "token_ids": [3] * n_tokens, "num_tokens": n_tokens, "finish_reason": finish}


def _task(gcfg, weak=None):
    from w2s.grpo import GRPOTask

    return GRPOTask(toy.ToyTokenizer(), toy.QUESTIONS[:2], TrainConfig(progress=False), gcfg, NumberGrader(),
                    weak if weak is not None else {"q0": "3.0", "q1": "8"}, None, (), 8, None, None, 0)


# q0: "3" and "3.0" are the majority (2 of 4, after a "5") and the weak answer; one response stopped at the token
# limit. q1: a unanimous group (4 of 4), not the weak answer. Prompts "Q0:" / "Q1:" are 3 tokens.
COMPLETIONS = {0: [_completion("5", 1), _completion("3", 1), _completion("3.0", 3, "length"), _completion("", 1)],
               1: [_completion("7", 1)] * 4}


@pytest.mark.parametrize("scale", [True, False])
def test_a_micro_batch_carries_group_normalized_advantages_and_the_vote_metrics(scale):
    """Advantages as TRL's scale_rewards="group": (r - group mean) / (Bessel std + 1e-4), or r - mean (Dr. GRPO,
    scale_rewards False); a unanimous group gets 0. Rewards compare answers with the grader (3 == 3.0). The sums
    the metrics divide: rewards, response tokens, truncated responses; per group the reward std (Bessel), whether it
    is 0, count(a+) / G and whether a+ is the weak answer. Only the response tokens are targets."""
    from w2s.data import IGNORE_INDEX

    batch = _task(GRPOConfig(group_size=4, scale_rewards=scale)).collate([0, 1], COMPLETIONS)
    std = math.sqrt(4 * 0.5 ** 2 / 3)  # rewards 0, 1, 1, 0 about their mean 0.5
    a = 0.5 / (std + 1e-4) if scale else 0.5
    assert batch["advantages"].tolist() == pytest.approx([-a, a, a, -a, 0, 0, 0, 0])
    assert batch["n_seqs"] == 8
    assert batch["seq_stats"].tolist() == pytest.approx([2 + 4, 6 + 4, 1])  # reward, completion tokens, truncated
    assert batch["group_stats"].tolist() == pytest.approx([std + 0, 0 + 1, 0.5 + 1.0, 1 + 0])
    for q, group in ((0, [std, 0, 0.5, 1]), (1, [0, 1, 1.0, 0])):
        assert _task(GRPOConfig(group_size=4)).collate([q], COMPLETIONS)["group_stats"].tolist() == pytest.approx(group)
    assert int((batch["targets"] != IGNORE_INDEX).sum()) == 6 + 4  # the response tokens, not the prompts'
    with pytest.raises(ValueError, match="needs the weak answer of every question"):
        _task(GRPOConfig(group_size=4, reward="vote_or_weak"), weak={"q0": "3"})


def test_the_loss_step_passes_the_clip_and_the_aggregation_and_means_the_metrics_per_group():
    """A fake policy whose log-ratio to pi_old is 0.3 on every token (ratio e^0.3): with clip_eps 0.2 the positive
    advantages are clipped at 1.2 and the negative ones are not (DeepSeekMath eq. 3); "sequence" averages each
    response's tokens, then the 8 responses; "token" averages the step's 10 response tokens."""
    std = math.sqrt(4 * 0.5 ** 2 / 3)
    a = 0.5 / (std + 1e-4)

    def loss(clip_eps, aggregation):
        task = _task(GRPOConfig(group_size=4, clip_eps=clip_eps, aggregation=aggregation))
        batch = task.collate([0, 1], COMPLETIONS)
        logps = torch.full(batch["targets"].shape, -1.0)
        batch["old_logps"] = logps - 0.3
        out, stats = task.loss_step(lambda tokens, targets, per_token, **_: logps.flatten(), batch, task.counts(batch))
        return out.item(), stats

    # per-token losses of q0's responses (1, 1, 3, 1 tokens): +r a, -1.2 a, -1.2 a, +r a with r = e^0.3; q1's are 0
    r = math.exp(0.3)
    value, stats = loss(0.2, "sequence")
    assert value == pytest.approx((r * a - 1.2 * a - 1.2 * a + r * a) / 8)
    assert loss(0.2, "token")[0] == pytest.approx((r * a - 1.2 * a - 3 * 1.2 * a + r * a) / 10)
    assert loss(0.5, "sequence")[0] == pytest.approx(0.0, abs=1e-6)  # r inside [0.5, 1.5]: nothing clipped
    # metrics: per response (6 rewards of 8) and per group (2 groups of 4)
    assert stats["reward"].item() == pytest.approx(6 / 8)
    assert [stats[k].item() for k in ("reward_std", "frac_reward_zero_std", "vote_confidence", "vote_agrees_weak")] \
        == pytest.approx([std / 2, 1 / 2, 1.5 / 2, 1 / 2])


def test_each_rollout_samples_afresh_at_the_recipe_temperature_from_the_eval_mode_policy(monkeypatch):
    """updates_per_batch 2, 4 steps: two rollouts, each with its own seed (a question is not given the same draws
    again), at GRPOConfig.temperature, with the policy in eval mode (no LoRA dropout while sampling); no frozen
    reference of a fully fine-tuned model without a KL term; the rollout metrics are the sampled tokens over the
    sampling's seconds (a clock that advances 2 s a reading); the stats count the questions."""
    import w2s.grpo as grpo

    calls, real_generate = [], grpo.iter_generate

    def spy(model, *args, **kwargs):
        calls.append((kwargs["seed"], kwargs["temperature"], model.training))
        return real_generate(model, *args, **kwargs)

    ticks = iter(range(0, 1000, 2))
    monkeypatch.setattr(grpo, "iter_generate", spy)
    monkeypatch.setattr(grpo, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: next(ticks))}))
    monkeypatch.setattr(grpo, "frozen_copy", lambda *a: pytest.fail("a reference copy without a KL term"))
    cfg = TrainConfig(lr=1e-2, batch_size=8, micro_batch_size=4, max_steps=4, seed=2, progress=False)
    (_, stats), recs = _run(cfg, GRPOConfig(group_size=2, max_new_tokens=3, temperature=0.7, updates_per_batch=2),
                            return_stats=True)
    assert len(calls) == 2 and calls[0][0] != calls[1][0]
    assert [c[1:] for c in calls] == [(0.7, False)] * 2
    assert stats["n_rows"] == 8
    first = recs[0]
    assert first["rollout/s"] == 2.0 and first["rollout/tok_s"] == pytest.approx(first["completion_len"] * 8 * 2 / 2)


def test_scoring_leaves_the_module_in_training_mode_and_the_resume_key_follows_the_grpo_options():
    """token_logps (pi_old's and the reference's no-grad passes) puts the module back in training mode, so that the
    update's forward keeps its LoRA dropout; a changed GRPO option is another task: its checkpoint is not resumed."""
    from w2s.grpo import token_logps
    from w2s.loss_steps import TrainModule

    module = TrainModule(toy.toy_model()).train()
    batch = _task(GRPOConfig(group_size=4)).collate([0, 1], COMPLETIONS)
    token_logps(module, batch, "cpu")
    assert module.training
    keys = {_task(GRPOConfig(group_size=4, **option)).task().data_key for option in
            ({}, {"kl_beta": 0.1}, {"clip_eps": 0.1}, {"reward": "vote_or_weak"})}
    assert len(keys) == 4
