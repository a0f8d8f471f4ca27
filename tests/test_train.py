"""Tests for the training loop (w2s/train.py, w2s/loss_steps.py, w2s/data.py, w2s/lora.py) on a tiny random Llama,
one CPU process.

References are independent of the code under test: transformers' LlamaForCausalLM on the same weights for masked
SFT losses, gradients and exported checkpoints; the papers' formulas in plain `math` over full-logit log-probs for
DPO / IPO / ORPO; hand-written token layouts for masking; two runs of the loop for invariances (micro-batch size,
resume). The FSDP (2 processes) equivalence lives in tests/test_fsdp.py.

    python -m pytest -q tests/test_train.py
"""

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import COMMON, hf_model  # noqa: E402

import w2s  # noqa: E402
from w2s import data, loss_steps, profile, reference_logps, train  # noqa: E402
from w2s.files import read_jsonl  # noqa: E402
from w2s.lora import TARGETS, LoRALinear, inject_lora, lora_scale, merge_lora_state_dict  # noqa: E402
from w2s.train import TrainConfig, train_preference, train_sft  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(checkpoint dir, the transformers model it holds) of a tiny random Llama (vocab 128, dim 64, 2 layers)."""
    path = tmp_path_factory.mktemp("llama")
    hf = hf_model("llama2")
    hf.save_pretrained(path)
    return path, hf


def load(path):
    return w2s.load_model(path, dtype=torch.float32)


def id_rows(n, seed=0):
    """SFT rows of token ids with prompts of 2..5 and responses of 1..6 tokens (ids 3.. avoid pad/BOS/EOS)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        prompt = torch.randint(3, 128, (2 + i % 4,), generator=g).tolist()
        response = torch.randint(3, 128, (1 + (i * 5) % 6,), generator=g).tolist()
        rows.append({"prompt_ids": prompt, "response_ids": response})
    return rows


def id_pairs(n, seed=0):
    rows = id_rows(2 * n, seed)
    return [{"prompt_ids": rows[i]["prompt_ids"], "chosen_ids": rows[i]["response_ids"],
             "rejected_ids": rows[n + i]["response_ids"] + [7]} for i in range(n)]


def records(fn, *args, **kwargs):
    """Run a train_* function; -> (trained model, [per-step metrics records])."""
    recs = []
    model = fn(*args, on_step=recs.append, **kwargs)
    return model, recs


def cfg(**overrides):
    base = dict(lr=1e-3, batch_size=4, micro_batch_size=2, max_steps=2, clip=None, progress=False, seed=3)
    return TrainConfig(**{**base, **overrides})


def response_logps(logits_fn, prompt, response):
    """Per-token log p(response token) under full logits of the unpadded sequence prompt + response. (R',)

    The first token of a sequence has no context, so with an empty prompt the response's first token is skipped.
    """
    ids = torch.tensor([prompt + response])
    logp = torch.log_softmax(logits_fn(ids)[0].double(), dim=-1)  # (T, V)
    first = max(len(prompt), 1)
    return torch.stack([logp[t - 1, ids[0, t]] for t in range(first, ids.shape[1])])


def hf_logits(hf):
    return lambda ids: hf(ids).logits


def w2s_logits(model):
    return lambda ids: model(ids)


def assert_same_weights(a, b, atol):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], atol=atol, rtol=0, msg=name)


# ---------------------------------------------------------------------------------------------- SFT masking, loss


def test_collate_masks_the_prompt_and_padding_by_hand():
    a = data.Example([10, 11, 12, 13, 14], n_prompt=2)  # response 12 13 14: predicted at positions 1, 2, 3
    b = data.Example([20, 21, 22], n_prompt=1)  # response 21 22
    tokens, targets = data.collate([a, b], pad_id=0)
    X = data.IGNORE_INDEX
    assert tokens.tolist() == [[10, 11, 12, 13], [20, 21, 0, 0]]
    assert targets.tolist() == [[X, 12, 13, 14], [21, 22, X, X]]
    tokens, targets = data.collate_pairs([data.Pair(a, b)], pad_id=0)  # chosen rows first, then rejected
    assert targets.tolist() == [[X, 12, 13, 14], [21, 22, X, X]]


def test_sft_loss_is_the_global_masked_token_mean(ckpt, tmp_path):
    """Step 1's loss = sum of response-token NLLs / number of response tokens over ALL micro-batches (transformers)."""
    path, hf = ckpt
    rows = id_rows(6)
    _, recs = records(train_sft, load(path), None, rows, cfg(batch_size=6, micro_batch_size=2, max_steps=1))
    with torch.no_grad():
        per_row = [-response_logps(hf_logits(hf), r["prompt_ids"], r["response_ids"]) for r in rows]
    token_mean = torch.cat(per_row).mean().item()
    assert recs[0]["loss"] == pytest.approx(token_mean, rel=1e-5)
    row_mean = sum(x.mean().item() for x in per_row) / len(per_row)  # the wrong normalisation differs here
    assert abs(row_mean - token_mean) > 1e-3


@pytest.mark.parametrize("family", ["gemma", "gemma2"])
def test_sft_loss_with_tied_embeddings_and_softcap(tmp_path, family):
    """Gemma (tied output matrix, sqrt(D) scale) and Gemma-2 (final logit soft-cap): the loss head sees both."""
    hf = hf_model(family)
    hf.save_pretrained(tmp_path)
    rows = id_rows(4, seed=12)
    _, recs = records(train_sft, load(tmp_path), None, rows, cfg(batch_size=4, micro_batch_size=2, max_steps=1))
    with torch.no_grad():
        nll = torch.cat([-response_logps(hf_logits(hf), r["prompt_ids"], r["response_ids"]) for r in rows])
    assert recs[0]["loss"] == pytest.approx(nll.mean().item(), rel=1e-5)



def test_per_token_log_probs_come_from_the_soft_capped_logits(tmp_path):
    """DPO / IPO / ORPO read per-token log-probs: on Gemma-2 they are those of the final soft-capped logits, as
    transformers computes them (the SFT test above covers the summed loss only)."""
    hf = hf_model("gemma2")
    hf.save_pretrained(tmp_path)
    examples = [data.Example([5, 9, 17, 33, 40, 41], n_prompt=2), data.Example([7, 8, 9], n_prompt=1)]
    tokens, targets = data.collate(examples, pad_id=0)
    with torch.no_grad():
        got = loss_steps.TrainModule(load(tmp_path))(tokens, targets, per_token=True).view_as(targets)
        for row, ex in enumerate(examples):
            expected = response_logps(hf_logits(hf), ex.tokens[:ex.n_prompt], ex.tokens[ex.n_prompt:])
            torch.testing.assert_close(got[row][targets[row] != data.IGNORE_INDEX].double(), expected, rtol=1e-5,
                                       atol=1e-5)


def test_sft_gradient_equals_transformers_masked_gradient(ckpt):
    """Prompt targets carry no gradient: our loss + backward == transformers with labels -100 on the prompt."""
    path, hf = ckpt
    rows = id_rows(3, seed=1)
    examples, _, _ = data.encode_sft_rows(None, rows, max_seq_len=64)
    tokens, targets = data.collate(examples, pad_id=0)
    model = load(path).float()
    module = loss_steps.TrainModule(model)
    n_valid = (targets != data.IGNORE_INDEX).sum()
    loss, _ = loss_steps.sft_step(module, {"tokens": tokens, "targets": targets}, torch.tensor([float(n_valid), 0, 0]))
    loss.backward()

    hf.zero_grad()
    total, count = 0.0, 0
    for r in rows:  # one unpadded sequence at a time, labels -100 on the prompt (HF shifts them itself)
        ids = torch.tensor([r["prompt_ids"] + r["response_ids"]])
        labels = ids.clone()
        labels[0, : len(r["prompt_ids"])] = -100
        logits = hf(ids).logits
        total = total + F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")
        count += len(r["response_ids"])
    (total / count).backward()
    assert loss.item() == pytest.approx(total.item() / count, rel=1e-5)
    hf_grads = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        ref = hf_grads[w2s.checkpoint.hf_name(name)].grad
        torch.testing.assert_close(p.grad, ref, atol=1e-6, rtol=1e-4, msg=name)
    hf.zero_grad()


def test_output_layer_runs_on_target_positions_only(ckpt, monkeypatch):
    """Prompt and padding positions never reach the output layer, and dropping them changes no value or gradient:
    per-token log-probs and their gradients equal log_softmax over the model's full logits."""
    path, _ = ckpt
    pairs = id_pairs(3, seed=3)
    examples, _, _ = data.encode_pair_rows(None, pairs, max_seq_len=64)
    tokens, targets = data.collate_pairs(examples, pad_id=0)  # (6, T): ragged, so padded as well as prompt-masked
    valid = targets != data.IGNORE_INDEX
    seen = []
    linear_logprobs = loss_steps.ops.linear_logprobs
    monkeypatch.setattr(loss_steps.ops, "linear_logprobs", lambda h, *a, **k: seen.append(h.shape[0]) or
                        linear_logprobs(h, *a, **k))
    weights = torch.randn(targets.shape, generator=torch.Generator().manual_seed(0))  # a loss mixing every position

    model = load(path).float()
    logps = loss_steps.TrainModule(model)(tokens, targets, per_token=True).view_as(targets)  # (6, T)
    (logps * weights).sum().backward()
    assert seen == [int(valid.sum())] and 0 < valid.sum() <= valid.numel() // 2  # half the rows never computed

    def full_logits_reference(dtype):  # log_softmax over the full (B, T, V) logits, every position computed
        reference = load(path).to(dtype)
        full = torch.log_softmax(reference(tokens), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        (torch.where(valid, full, 0.0) * weights.to(dtype)).sum().backward()
        return torch.where(valid, full, 0.0), {name: p.grad for name, p in reference.named_parameters()}

    full, grads = full_logits_reference(torch.float32)
    torch.testing.assert_close(logps, full, atol=1e-5, rtol=1e-5)
    assert (logps[~valid] == 0).all()
    # Gradients: both fp32 paths carry rounding error of the same size (~1e-6 on gradients of magnitude ~3), so each
    # is held against the fp64 truth: the fused path must be as accurate as the full-logits path, within 2x.
    _, truth = full_logits_reference(torch.float64)
    for name, p in model.named_parameters():
        fused_error = (p.grad.double() - truth[name]).abs().max().item()
        full_error = (grads[name].double() - truth[name]).abs().max().item()
        assert fused_error <= 2 * full_error + 1e-7, (name, fused_error, full_error)


@pytest.mark.parametrize("loss", ["sft", "dpo"])
def test_the_loop_finds_target_rows_on_the_host(ckpt, tmp_path, monkeypatch, loss):
    """Every forward of a training run (DPO's reference pass included) gets its target rows from the host, found
    before the batch moved (on CUDA, finding them on the device waits for the forward), and they are the rows that
    hold a target."""
    path, _ = ckpt
    calls = []
    forward = loss_steps.TrainModule.forward

    def spy(self, tokens, targets, per_token, target_rows=None):
        calls.append((target_rows, targets.clone()))
        return forward(self, tokens, targets, per_token, target_rows)

    monkeypatch.setattr(loss_steps.TrainModule, "forward", spy)
    c = cfg(max_steps=2)
    if loss == "sft":
        train_sft(load(path), None, id_rows(8, seed=5), c, out_dir=tmp_path)
    else:
        train_preference(load(path), None, id_pairs(8, seed=5), c, out_dir=tmp_path, loss="dpo")
    # 2 steps x 2 micro-batches; DPO first runs its reference pass: 8 pairs in micro-batches of 2
    assert len(calls) == (2 * 2 if loss == "sft" else 2 * 2 + 4)
    for rows, targets in calls:
        assert rows is not None
        flat = targets.flatten()
        expected = [i for i in range(flat.numel()) if flat[i] != data.IGNORE_INDEX]
        assert rows.tolist() == expected and 0 < len(expected) < flat.numel()


def test_sft_loss_goes_down_and_export_loads_in_transformers(ckpt, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.delenv("W2S_PEAK_FLOPS", raising=False)

    path, _ = ckpt
    rows = id_rows(4, seed=2)
    out = tmp_path / "sft"
    recs = []
    model, stats = train_sft(load(path), None, rows, cfg(lr=1e-2, max_steps=12, batch_size=4), out_dir=out,
                             on_step=recs.append, return_stats=True)
    losses = [r["loss"] for r in recs]
    assert len(losses) == 12 and losses[-1] < 0.5 * losses[0], losses
    input_tokens = sum(len(r["prompt_ids"]) + len(r["response_ids"]) - 1 for r in rows)  # every row, every step
    assert (stats["steps"], stats["tokens"], stats["final_loss"]) == (12, 12 * input_tokens, losses[-1])
    assert stats["n_skipped"] == 0 and stats["tok_s"] > 0 and stats["mfu"] is None  # no peak FLOPs for a CPU
    # the contract a pipeline stage records (w2s/plan.py)
    assert {"tokens", "tok_s", "mfu", "peak_mem_gib", "steps", "final_loss", "resumed_from_step", "n_rows",
            "n_skipped", "device", "wall_s"} <= set(stats)
    assert (stats["device"], stats["resumed_from_step"], stats["n_rows"]) == ("cpu", 0, 4)
    assert stats["tok_s"] == pytest.approx(stats["tokens"] / stats["wall_s"]) and stats["peak_mem_gib"] > 0.01
    assert sum(r["tokens"] for r in recs) == stats["tokens"]  # the log windows add up to the run
    assert [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()] == losses
    assert not (out / "ckpt").exists()  # the export supersedes the training state

    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([rows[0]["prompt_ids"] + rows[0]["response_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-5, rtol=1e-5)
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(ids).logits
    assert (base - model(ids)).abs().max() > 1e-2  # the export really holds the trained weights


def test_a_row_past_the_trained_context_is_said(ckpt):
    path, _ = ckpt
    model = load(path)
    rows = [{"prompt_ids": [3] * 5, "response_ids": [4] * (model.cfg.max_seq_len - 4)}]
    with pytest.warns(UserWarning, match=rf"a training row holds {model.cfg.max_seq_len + 1} tokens but the model was "
                                         rf"trained on {model.cfg.max_seq_len} positions"):
        train_sft(model, None, rows, cfg(batch_size=1, micro_batch_size=1, max_steps=1, max_seq_len=100_000))


def test_micro_batch_size_does_not_change_losses_or_weights(ckpt):
    path, _ = ckpt
    rows = id_rows(8, seed=4)  # 2 steps per epoch: the 3 steps cross an epoch boundary
    m1, r1 = records(train_sft, load(path), None, rows, cfg(batch_size=4, micro_batch_size=1, max_steps=3))
    m4, r4 = records(train_sft, load(path), None, rows, cfg(batch_size=4, micro_batch_size=4, max_steps=3))
    # a micro-batch larger than the batch is a cap, not a bigger step: still 4 rows a step, 2 steps an epoch
    m9, r9 = records(train_sft, load(path), None, rows, cfg(batch_size=4, micro_batch_size=9, max_steps=3))
    for a, b, c in zip(r1, r4, r9, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) == c["loss"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4) == c["grad_norm"]
        assert b["tokens"] == c["tokens"]
    assert_same_weights(m1, m4, atol=1e-5)
    assert_same_weights(m4, m9, atol=0)


# ---------------------------------------------------------------------------------------------- resume


class Killed(Exception):
    pass


def _kill_at(step, log):
    def on_step(rec):
        log.append(rec)
        if rec["step"] == step:
            raise Killed

    return on_step


@pytest.mark.parametrize("kind", ["sft_full", "dpo_lora"])
def test_resume_gives_the_same_losses_and_weights(ckpt, tmp_path, kind):
    """Checkpoint every 2 steps, die after step 5, resume: steps 5-6 and the weights match an uninterrupted run."""
    path, _ = ckpt
    if kind == "sft_full":
        rows, c = id_rows(8, seed=5), cfg(max_steps=6, ckpt_every=2, weight_decay=0.1, warmup_steps=2, clip=0.5)

        def run(out, on_step):
            return train_sft(load(path), None, rows, c, out_dir=out, on_step=on_step)
    else:
        rows = id_pairs(8, seed=5)
        c = cfg(max_steps=6, ckpt_every=2, lora_rank=4, lora_alpha=8, lora_dropout=0.1, lr=1e-2)

        def run(out, on_step):
            return train_preference(load(path), None, rows, c, out_dir=out, loss="dpo", on_step=on_step)

    straight = []
    reference = run(tmp_path / "straight", straight.append)
    first, second = [], []
    with pytest.raises(Killed):
        run(tmp_path / "resumed", _kill_at(5, first))
    assert (tmp_path / "resumed" / "ckpt" / "step00000004").is_dir()
    resumed = run(tmp_path / "resumed", second.append)
    assert [r["step"] for r in second] == [5, 6]
    for a, b in zip(straight[4:], second, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert_same_weights(reference, resumed, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # the killed run's step 5 was dropped, not duplicated


@pytest.mark.parametrize("failure", ["disk full", "ctrl-c", "sigterm, then a lost peer"])
def test_a_checkpoint_write_that_fails_is_a_disk_error_or_an_interrupt_not_dcps_wrapper(ckpt, tmp_path, monkeypatch,
                                                                                      failure):
    """torch.distributed.checkpoint wraps a writer's exception, a KeyboardInterrupt too, in a CheckpointException,
    which is a BaseException: the run must still end as a full disk (one OSError naming the checkpoint) or as a
    Ctrl-C, and the next run resumes from the last complete checkpoint."""
    import errno
    import os
    import signal
    import time

    from w2s.parallel import command_line_process

    path, _ = ckpt
    rows, c = id_rows(8, seed=3), cfg(max_steps=6, ckpt_every=2)
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):  # DCP's file writer serializes each item with torch.save
        if (tmp_path / "ckpt" / "step00000002").is_dir():  # the step-4 checkpoint fails
            if failure == "ctrl-c":
                raise KeyboardInterrupt
            if failure == "disk full":
                raise OSError(errno.ENOSPC, "No space left on device")
            try:  # under torchrun: DCP swallows this rank's interrupt, then its next collective finds the peer gone
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            except KeyboardInterrupt:
                pass
            raise RuntimeError("Connection reset by peer")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with command_line_process(), pytest.raises(OSError if failure == "disk full" else KeyboardInterrupt) as info:
        train_sft(load(path), None, rows, c, out_dir=tmp_path)
    if failure == "disk full":
        assert info.value.errno == errno.ENOSPC and "writing the training checkpoint" in str(info.value)
    monkeypatch.setattr(torch, "save", real_save)
    log = []
    train_sft(load(path), None, rows, c, out_dir=tmp_path, on_step=log.append)
    assert [r["step"] for r in log] == [3, 4, 5, 6]  # from the complete step-2 checkpoint


def test_a_fresh_start_forgets_the_old_states_and_a_torn_metrics_line_is_dropped(ckpt, tmp_path):
    """resume=False starts over: the abandoned run's newer checkpoint must not be resumed by a later rerun. A metrics
    line torn by a kill while it was appended does not stop the resume."""
    path, _ = ckpt
    rows, c = id_rows(8, seed=7), cfg(max_steps=6, ckpt_every=2)
    with pytest.raises(Killed):
        train_sft(load(path), None, rows, c, out_dir=tmp_path, on_step=_kill_at(5, []))  # leaves step00000004
    with pytest.raises(Killed):
        train_sft(load(path), None, rows, cfg(max_steps=6, ckpt_every=2, resume=False), out_dir=tmp_path,
                  on_step=_kill_at(3, []))
    assert [d.name for d in (tmp_path / "ckpt").iterdir()] == ["step00000002"]
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "lo')  # a kill mid-append
    log = []
    train_sft(load(path), None, rows, c, out_dir=tmp_path, on_step=log.append)
    assert [r["step"] for r in log] == [3, 4, 5, 6]
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_checkpoints_deleted_by_a_killed_run_are_never_resumed_from_half(tmp_path, monkeypatch):
    """A fresh start and the end of an export delete the training checkpoints; a kill mid-delete must not leave one
    that latest_checkpoint calls complete (a resume would load its missing shards; a finished export would look
    unfinished)."""
    import w2s.train_state
    from w2s.train_state import latest_checkpoint, remove_checkpoints

    for step in (2, 4):
        (tmp_path / "ckpt" / f"step{step:08d}").mkdir(parents=True)
        for name in ("__0_0.distcp", "rng_rank0.pt", "train_state.json"):
            (tmp_path / "ckpt" / f"step{step:08d}" / name).write_text("{}")
    assert latest_checkpoint(tmp_path / "ckpt").name == "step00000004"

    def killed_after_one_shard(path, *args, **kwargs):
        next(Path(path).rglob("*.distcp")).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(w2s.train_state.shutil, "rmtree", killed_after_one_shard)
    with pytest.raises(KeyboardInterrupt):
        remove_checkpoints(tmp_path / "ckpt")
    assert latest_checkpoint(tmp_path / "ckpt") is None
    monkeypatch.undo()
    remove_checkpoints(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("other", [{"lr": 5e-4}, {"seed": 4}])  # the seed sets the data order and LoRA's init
def test_resume_refuses_a_checkpoint_of_a_different_run(ckpt, tmp_path, other):
    path, _ = ckpt
    rows = id_rows(8, seed=6)
    with pytest.raises(Killed):
        train_sft(load(path), None, rows, cfg(max_steps=4, ckpt_every=2), out_dir=tmp_path, on_step=_kill_at(3, []))
    with pytest.raises(ValueError, match="different run"):
        train_sft(load(path), None, rows, cfg(max_steps=4, ckpt_every=2, **other), out_dir=tmp_path)
    state = next((tmp_path / "ckpt").glob("step*")) / "train_state.json"
    state.write_text("{bad")  # a torn or hand-edited record: named, with the way out
    with pytest.raises(ValueError, match=rf"^{state}:1: not valid JSON .*; delete {state.parent.name} to resume from"):
        train_sft(load(path), None, rows, cfg(max_steps=4, ckpt_every=2), out_dir=tmp_path)


# ---------------------------------------------------------------------------------------------- preference losses


def _hand_preference_loss(kind, beta, policy, reference, pairs):
    """The step's loss from the papers' formulas over full-logit log-probs (math floats, no w2s loss code)."""
    total_pair_loss, chosen_nll = 0.0, 0.0
    for p in pairs:
        c = response_logps(policy, p["prompt_ids"], p["chosen_ids"])
        r = response_logps(policy, p["prompt_ids"], p["rejected_ids"])
        if kind == "orpo":
            pc, pr = math.exp(c.mean().item()), math.exp(r.mean().item())
            log_odds_ratio = math.log(pc / (1 - pc)) - math.log(pr / (1 - pr))
            total_pair_loss += math.log1p(math.exp(-log_odds_ratio))  # -log sigmoid
            chosen_nll -= c.mean().item()  # LLaMA-Factory v0.6.2: each chosen response's mean, averaged over pairs
            continue
        rc = response_logps(reference, p["prompt_ids"], p["chosen_ids"]).sum().item()
        rr = response_logps(reference, p["prompt_ids"], p["rejected_ids"]).sum().item()
        h = (c.sum().item() - rc) - (r.sum().item() - rr)
        total_pair_loss += math.log1p(math.exp(-beta * h)) if kind == "dpo" else (h - 1 / (2 * beta)) ** 2
    if kind == "orpo":
        return chosen_nll / len(pairs) + beta * total_pair_loss / len(pairs)
    return total_pair_loss / len(pairs)


@pytest.mark.parametrize("kind", ["dpo", "ipo", "orpo"])
def test_preference_losses_equal_the_formulas_by_hand(ckpt, kind):
    """Steps 1 and 2 of a run (all pairs in every batch) against the formula at the initial / once-updated weights."""
    path, _ = ckpt
    pairs = id_pairs(5, seed=7)
    c = cfg(batch_size=5, micro_batch_size=2, beta=0.5, lr=1e-2, max_steps=2)
    _, recs = records(train_preference, load(path), None, pairs, c, loss=kind)
    once = train_preference(load(path), None, pairs, cfg(**{**c.__dict__, "max_steps": 1}), loss=kind)
    initial = load(path)
    with torch.no_grad():
        for rec, policy in zip(recs, (initial, once), strict=True):
            expected = _hand_preference_loss(kind, c.beta, w2s_logits(policy), w2s_logits(initial), pairs)
            assert rec["loss"] == pytest.approx(expected, rel=1e-5), rec["step"]
    if kind == "dpo":
        assert recs[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)  # the policy starts AT the reference
        assert recs[1]["rewards/accuracies"] > 0.5  # one step already separates chosen from rejected


def test_an_unknown_preference_loss_names_the_known_ones(ckpt):
    path, _ = ckpt
    with pytest.raises(ValueError, match=r"^loss='kto': expected 'dpo', 'ipo' or 'orpo'$"):
        train_preference(load(path), None, id_pairs(2), cfg(), loss="kto")


def test_reference_logps_are_cached_and_reused(ckpt, tmp_path, monkeypatch):
    path, _ = ckpt
    pairs = id_pairs(4, seed=8)
    calls = []
    compute = reference_logps.compute_reference_logps
    monkeypatch.setattr(reference_logps, "compute_reference_logps",
                        lambda *a, **k: calls.append(1) or compute(*a, **k))
    c = cfg(max_steps=1)
    _, first = records(train_preference, load(path), None, pairs, c, out_dir=tmp_path, loss="dpo")
    assert len(calls) == 1 and (tmp_path / "ref_logps.pt").is_file()
    _, second = records(train_preference, load(path), None, pairs, c, out_dir=tmp_path, loss="dpo")
    assert len(calls) == 1  # reused: no second reference pass
    assert first[0]["loss"] == second[0]["loss"]
    other = load(path)
    with torch.no_grad():
        other.norm.weight.mul_(1.5)  # different initial weights: the cached table must not be used
    train_preference(other, None, pairs, c, out_dir=tmp_path, loss="dpo")
    assert len(calls) == 2


def test_only_a_loss_with_a_reference_pass_reads_the_weights_fingerprint(ckpt, tmp_path, monkeypatch):
    """The fingerprint (an fp64 pass over every weight on rank 0) keys the reference cache: DPO computes it, ORPO,
    which has no reference, does not; ORPO also writes no reference table."""
    path, _ = ckpt
    calls = []
    fingerprint = train.model_fingerprint
    monkeypatch.setattr(train, "model_fingerprint", lambda m: calls.append(1) or fingerprint(m))
    train_preference(load(path), None, id_pairs(4, seed=8), cfg(max_steps=1), out_dir=tmp_path / "orpo", loss="orpo")
    assert calls == [] and not (tmp_path / "orpo" / "ref_logps.pt").exists()
    train_preference(load(path), None, id_pairs(4, seed=8), cfg(max_steps=1), out_dir=tmp_path / "dpo", loss="dpo")
    assert calls == [1] and (tmp_path / "dpo" / "ref_logps.pt").is_file()


# ---------------------------------------------------------------------------------------------- LoRA


def test_lora_targets_scale_and_merged_export(ckpt):
    path, _ = ckpt
    model = load(path)
    n = inject_lora(model, rank=4, alpha=12.0, dropout=0.0, seed=1)
    assert n == len(TARGETS) * model.cfg.n_layers
    wrapped = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == set(TARGETS)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(name.endswith((".lora_A", ".lora_B")) for name in trainable)
    assert lora_scale(model) == 3.0  # alpha / rank
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.5, generator=g)

    q = model.layers[0].self_attn.q_proj  # the update by hand: W x + (alpha / r) B A x
    x = torch.randn(3, model.cfg.dim, generator=g)
    expected = x @ q.weight.T + 3.0 * (x @ q.lora_A.T @ q.lora_B.T)
    torch.testing.assert_close(q(x), expected, atol=1e-5, rtol=1e-5)

    # Merged vs unmerged in fp64, so the comparison sees the algebra, not fp32 summation order.
    model.double()
    merged = w2s.Transformer(model.cfg).double()
    merged.load_state_dict(merge_lora_state_dict(model.state_dict(), lora_scale(model)))
    merged.reset_buffers()
    ids = torch.randint(3, 128, (2, 9), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), model(ids), atol=1e-10, rtol=1e-10)
        assert (merged(ids) - load(path)(ids)).abs().max() > 1e-2  # the adapters really changed the model


def test_lora_dropout_applies_only_in_training_mode():
    base = torch.nn.Linear(16, 8, bias=False)
    layer = LoRALinear(base, rank=2, alpha=2.0, dropout=0.5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.lora_B.fill_(1.0)
    x = torch.randn(4, 16)
    no_dropout = base(x) + x @ layer.lora_A.T @ layer.lora_B.T
    layer.eval()
    torch.testing.assert_close(layer(x), no_dropout)
    layer.train()
    assert not torch.allclose(layer(x), no_dropout)


def test_lora_training_changes_only_the_target_matrices(ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    path, _ = ckpt
    c = cfg(lora_rank=4, lora_alpha=8, lr=5e-2, max_steps=2, lora_targets=("q_proj", "down_proj"))
    trained = train_sft(load(path), None, id_rows(4, seed=9), c, out_dir=tmp_path)
    base = load(path).state_dict()
    changed = {name for name, t in trained.state_dict().items() if not torch.equal(t, base[name])}
    assert changed == {f"layers.{i}.{m}.weight" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj")}
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 33, 70]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, trained(ids), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- bad data


def test_bad_rows_are_skipped_with_their_location_or_stop_the_run(capsys):
    rows = [{"prompt_ids": [5, 6], "response_ids": [7, 8]},
            {"prompt": "q", "response": "", "_where": "sft.jsonl:2"},
            {"prompt_ids": [5] * 10, "response_ids": [7] * 10, "_where": "sft.jsonl:3"},
            {"prompt_ids": [5, 6], "response_ids": [9]}]
    examples, kept, bad = data.encode_sft_rows(None, rows, max_seq_len=16)
    assert kept == [0, 3] and len(examples) == 2
    assert [loc for loc, _ in bad] == ["sft.jsonl:2", "sft.jsonl:3"]
    err = capsys.readouterr().err
    assert "skipped sft.jsonl:2: empty 'response'" in err
    assert "skipped sft.jsonl:3: sequence of 20 tokens is longer than max_seq_len=16" in err
    assert "skipped 2 of 4 rows" in err
    with pytest.raises(ValueError, match=r"^sft\.jsonl:2: empty 'response'"):
        data.encode_sft_rows(None, rows, max_seq_len=16, bad_rows="error")

    pairs = [{"prompt_ids": [5], "chosen_ids": [7, 8], "rejected_ids": [7, 8], "_where": "pairs.jsonl:1"},
             {"prompt_ids": [5], "chosen_ids": [7, 8], "rejected_ids": [9]}]
    encoded, kept, bad = data.encode_pair_rows(None, pairs, max_seq_len=16)
    assert kept == [1] and bad == [("pairs.jsonl:1", "chosen == rejected (the pair carries no preference)")]
    with pytest.raises(ValueError, match=r"^pairs\.jsonl:1: chosen == rejected"):
        data.encode_pair_rows(None, pairs, max_seq_len=16, bad_rows="error")


def test_no_usable_rows_is_one_clear_error(ckpt):
    path, _ = ckpt
    with pytest.raises(ValueError, match="none of the 1 rows is usable"):
        train_sft(load(path), None, [{"prompt_ids": [5], "response_ids": [6] * 50}], cfg(max_seq_len=8))


def test_a_warmup_longer_than_the_run_is_said(ckpt):
    path, _ = ckpt
    with pytest.warns(UserWarning, match=r"^warmup_steps=5 is more than the run's 2 steps: the learning rate ends at "
                                         r"0\.4 x lr and never decays$"):
        train_sft(load(path), None, id_rows(4), cfg(max_steps=2, warmup_steps=5))


def test_lr_schedule_warmup_then_cosine():
    c = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=2)
    got = [train.lr_at(s, 6, c) for s in range(6)]
    cosine = [0.1 + 0.45 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert got == pytest.approx([0.5, 1.0] + cosine)


@pytest.mark.parametrize("max_norm", [None, 100.0, 0.5])
def test_clip_grad_norm_equals_torchs_clip_and_leaves_gradients_under_the_limit_unwritten(max_norm):
    """train.clip_grad_norm against torch.nn.utils.clip_grad_norm_ on a copy: the same norm and bit-equal gradients,
    with no limit, a limit above the norm (~8.3) and one below it. Under the limit the gradients are not written at
    all (their version counters stay); over it they are scaled to the limit. A NaN gradient gives a NaN norm."""
    def with_grads():
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.zeros(shape)) for shape in [(7, 5), (5,), (3, 2, 4)]]
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        return params

    params, mirror = with_grads(), with_grads()
    versions = [p.grad._version for p in params]
    expected = torch.nn.utils.clip_grad_norm_(mirror, float("inf") if max_norm is None else max_norm, foreach=True)
    norm = train.clip_grad_norm(params, max_norm)
    assert isinstance(norm, float) and norm == expected.item() and 8.0 < norm < 9.0
    assert all(torch.equal(p.grad, m.grad) for p, m in zip(params, mirror))
    over = max_norm is not None and norm > max_norm
    assert [p.grad._version != v for p, v in zip(params, versions)] == [over] * len(params)
    if over:
        total = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params]))
        assert total.item() == pytest.approx(max_norm, rel=1e-5)
    params[1].grad[0] = float("nan")
    assert math.isnan(train.clip_grad_norm(params, max_norm))


def test_step_flops_leave_the_output_layer_out_for_prompt_tokens():
    from w2s.config import ModelConfig
    from w2s.profile import flops_per_token

    cfg = ModelConfig(family="llama", vocab_size=100, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4,
                      hidden_dim=32)
    n = 2 * 2336 + 16 + 1600  # matmul parameters, counted by hand in tests/test_profile.py
    full = 10 * flops_per_token(cfg, seq_len=10)
    assert profile.step_flops(cfg, [(10, 10)], lora=False) == full
    # 4 prompt tokens skip the output layer (100 x 16) forward and backward: 6 FLOPs per weight each
    assert profile.step_flops(cfg, [(10, 6), (10, 10)], lora=False) == 2 * full - 4 * 6 * 1600
    # LoRA: no weight gradients anywhere (2 N less per token), and the prompt skips 4 of the output layer's 6
    assert profile.step_flops(cfg, [(10, 6)], lora=True) == full - 10 * 2 * n - 4 * 4 * 1600


# ---------------------------------------------------------------------------------------------- scripts


ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory):
    """A tiny random Llama with a real (byte-level BPE) tokenizer in the same directory, as the scripts expect."""
    import transformers

    from w2s import world

    path = tmp_path_factory.mktemp("text_llama")
    texts = ["Question: 3 apples and 4 pears? Answer: 7", "Tom has 12 marbles and gives 5 away: 7 are left"] * 20
    world.train_world_tokenizer(texts, path, vocab_size=300)  # <s>, </s>, <pad> = 0, 1, 2
    config = transformers.LlamaConfig(**{**COMMON, "vocab_size": 300, "bos_token_id": 0, "eos_token_id": 1,
                                         "pad_token_id": 2})
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def _script(name, *args):
    import subprocess

    cmd = [sys.executable, str(ROOT / "scripts" / name), *map(str, args)]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def _write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_sft_script_trains_exports_and_reports_bad_lines(text_ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    good = [{"prompt": f"Question: {a} apples and {b} pears?", "response": f"Answer: {a + b}"}
            for a, b in [(1, 2), (3, 4), (5, 1), (2, 2)]]
    data_file = _write_jsonl(tmp_path / "sft.jsonl", [good[0], good[1], {"prompt": "Question: 1?"}, "", *good[2:]])
    out = tmp_path / "out"
    common = ["--model", text_ckpt, "--out", out, "--dtype", "float32", "--batch-size", 2, "--micro-batch-size", 1,
              "--max-steps", 2, "--lr", 1e-3, "--no-progress"]
    proc = _script("sft.py", "--data", data_file, *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipped {data_file}:3: missing 'response'; expected the keys" in proc.stderr
    assert "skipped 1 of 5 rows" in proc.stderr
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert hf.config.vocab_size == 300 and (out / "tokenizer.json").is_file()

    # a finished run is not rerun over: the old record would describe weights that a failed rerun left behind
    proc = _script("sft.py", "--data", data_file, *common)
    assert (proc.returncode, proc.stderr.strip()) == (2, f"error: --out {out}: holds a trained model already "
                                                         f"(model.safetensors); pass --overwrite to replace it, or "
                                                         f"choose another --out")
    proc = _script("sft.py", "--data", data_file, *common, "--out", text_ckpt, "--overwrite")
    assert proc.returncode == 2 and f"holds {text_ckpt}, which this run trains from" in proc.stderr
    from w2s.train_cli import finished_model_files

    # an adapter trains from its base's weights: an OUT that is (or whose merged/ is) that base is refused too
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for base in (out, out / "merged"):
        (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2,
                                                                 "base_model_name_or_path": str(base)}))
        (out / "merged").mkdir(exist_ok=True)
        with pytest.raises(ValueError, match=rf"^--out {out}: holds {base}, which this run trains from"):
            finished_model_files(out, adapter, overwrite=True)
    (out / "merged").rmdir()
    from w2s.train_cli import remove_model_files

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "merged").symlink_to(tmp_path / "elsewhere")  # removed as a link, never followed
    remove_model_files([tmp_path / "linked" / "merged"])
    assert not (tmp_path / "linked" / "merged").is_symlink() and (tmp_path / "elsewhere").is_dir()
    (out / "ckpt" / "step00001").mkdir(parents=True)  # weights beside a training state: killed while exporting
    (out / "ckpt" / "step00001" / "train_state.json").write_text("{}")
    assert finished_model_files(out, text_ckpt, overwrite=False) == []  # resumes; nothing removed before the export
    shutil.rmtree(out / "ckpt")
    before = (out / "model.safetensors").read_bytes()
    proc = _script("sft.py", "--data", data_file, *common, "--max-steps", 1, "--lr", 1e-2, "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert json.loads((out / "train_config.json").read_text())["lr"] == 1e-2
    assert (out / "model.safetensors").read_bytes() != before

    broken = _write_jsonl(tmp_path / "broken.jsonl", [good[0], '{"prompt": "x", "response": '])
    proc = _script("sft.py", "--data", broken, *common, "--micro-batch-size", 2)
    assert proc.returncode == 2  # the whole of stderr is one line naming file:line
    assert proc.stderr.strip().splitlines() == [f"error: {broken}:2: not valid JSON (Expecting value at column 29)"]
    empty = _write_jsonl(tmp_path / "empty.jsonl", [])
    proc = _script("sft.py", "--data", empty, *common)
    assert (proc.returncode, proc.stderr.strip()) == (2, f"error: {empty}: no rows (an empty file)")
    (tmp_path / "a_file").write_text("")
    proc = _script("sft.py", "--data", data_file, *[tmp_path / "a_file" if a is out else a for a in common])
    assert proc.returncode == 2 and "is a file; expected a directory" in proc.stderr


def test_dpo_script_refuses_a_zero_beta_and_a_missing_model_or_tokenizer_before_loading(tmp_path):
    pairs = _write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    proc = _script("dpo.py", "--model", tmp_path / "no_model", "--data", pairs, "--out", tmp_path / "out",
                   "--loss", "ipo", "--beta", 0)  # the model directory does not exist: the beta error comes first
    assert (proc.returncode, proc.stderr.strip()) == (2, "error: beta=0.0: IPO needs a finite beta > 0")
    proc = _script("dpo.py", "--model", tmp_path / "no_model", "--data", pairs, "--out", tmp_path / "out")
    assert (proc.returncode, proc.stderr.strip()) == (2, f"error: --model {tmp_path / 'no_model'}: no such directory "
                                                         f"(expected a Hugging Face checkpoint)")
    (tmp_path / "no_model").mkdir()
    (tmp_path / "no_model" / "config.json").write_text("{}")  # no weights and no tokenizer: the tokenizer is first
    proc = _script("dpo.py", "--model", tmp_path / "no_model", "--data", pairs, "--out", tmp_path / "out")
    assert proc.returncode == 2 and "tokenizer" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_rows_are_read_before_the_weights_and_a_ctrl_c_is_one_line(text_ckpt, tmp_path, capsys):
    import shutil

    from w2s import train_cli

    no_weights = tmp_path / "no_weights"  # config and tokenizer only: loading the weights would fail
    shutil.copytree(text_ckpt, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "rejected": "b"}, {"prompt": "q", "chosen": 3,
                                                                                   "rejected": "b"}])
    proc = _script("dpo.py", "--model", no_weights, "--data", bad, "--out", tmp_path / "out")
    assert (proc.returncode, proc.stderr.strip()) == (
        2, f"error: {bad}: none of the 2 rows is usable (the first: {bad}:1: missing 'chosen')")
    proc = _script("dpo.py", "--model", no_weights, "--data", bad, "--out", tmp_path / "out", "--bad-rows", "error")
    assert (proc.returncode, proc.stderr.strip()) == (
        2, f"error: {bad}:1: missing 'chosen' (bad_rows='error'; use 'skip' to drop such rows)")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    good, out, stop = _write_jsonl(tmp_path / "good.jsonl", [{"prompt": "p", "response": "r"}]), tmp_path / "o", \
        "stopped (Ctrl-C or SIGTERM): "
    last = out / "ckpt" / "step00000004"
    for extra, checkpoint, said in (
            ([], False, "nothing to resume from (--ckpt-every 0); the same command starts over"),
            (["--ckpt-every", "2"], False, "nothing to resume from (no checkpoint written yet); the same command "
                                           "starts over"),
            (["--ckpt-every", "2"], True, f"the training state after step 4 is kept in {last}; the same command "
                                          f"resumes from it"),
            (["--ckpt-every", "2", "--no-resume"], True, f"the training state after step 4 is kept in {last}; the "
                                                         f"same command without --no-resume resumes from it"),
            ([], True, f"the training state after step 4 is kept in {last}; the same command resumes from it")):
        if checkpoint:  # what the trainer leaves complete: a step directory with its train_state.json
            last.mkdir(parents=True, exist_ok=True)
            (last / "train_state.json").write_text('{"step": 4}')
        args = train_cli.parser("", "").parse_args(["--model", str(text_ckpt), "--data", str(good), "--out", str(out),
                                                    *extra])
        with pytest.raises(SystemExit) as exit_:
            train_cli.run(interrupted, data.encode_sft_rows, args)
        assert exit_.value.code == 130 and capsys.readouterr().err.strip() == stop + said
    args.export_merged = True  # without --lora-rank: a note, and the run goes on
    with pytest.raises(SystemExit):
        train_cli.run(interrupted, data.encode_sft_rows, args)
    assert capsys.readouterr().err.startswith("note: --export-merged does nothing without --lora-rank")
    args.export_merged, args.out = False, "/proc/w2s-nowhere/o"  # /proc takes no new directory
    with pytest.raises(SystemExit) as exit_:
        train_cli.run(interrupted, data.encode_sft_rows, args)
    assert exit_.value.code == 2
    said = capsys.readouterr().err.strip()
    assert said == "error: --out /proc/w2s-nowhere/o: cannot create it (No such file or directory)"


def test_the_checkpoint_dtype_is_most_of_its_floating_weights_and_an_adapters_is_its_bases(tmp_path):
    """--dtype auto loads and exports in the dtype most floating-point tensors are stored in (integer buffers do not
    vote); an adapter directory, whose own tensors are fp32, has its base's."""
    from safetensors.torch import save_file

    from w2s.train_cli import checkpoint_dtype

    base = tmp_path / "base"
    base.mkdir()
    save_file({"a": torch.zeros(2, dtype=torch.bfloat16), "b": torch.zeros(2, dtype=torch.bfloat16),
               "c": torch.zeros(2), "i": torch.zeros(2, dtype=torch.int64), "j": torch.zeros(2, dtype=torch.int64),
               "k": torch.zeros(2, dtype=torch.int64)}, base / "model.safetensors")
    assert checkpoint_dtype(base) == torch.bfloat16
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                             "base_model_name_or_path": str(base)}))
    save_file({"x.lora_A.weight": torch.zeros(2, 2)}, adapter / "adapter_model.safetensors")
    assert checkpoint_dtype(adapter) == torch.bfloat16


def test_overwrite_removes_every_file_of_a_finished_export(tmp_path):
    """A finished run's export in the layout save_model and save_pretrained write (sharded weights and their index,
    config.json, an adapter, merged/): --overwrite removes all of it, so nothing of the old model is left beside
    the new one; a merged/ copy alone is a finished model too."""
    from w2s.train_cli import finished_model_files

    out, model = tmp_path / "out", tmp_path / "model"
    (out / "merged").mkdir(parents=True)
    model.mkdir()
    names = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
             "model.safetensors.index.json", "adapter_config.json", "adapter_model.safetensors"]
    for name in names:
        (out / name).write_text("x")
    (out / "tokenizer.json").write_text("x")  # the tokenizer is rewritten by the export, not removed first
    assert sorted(p.name for p in finished_model_files(out, model, overwrite=True)) == sorted([*names, "merged"])
    for name in names:
        (out / name).unlink()
    (out / "merged" / "model.safetensors").write_text("x")
    with pytest.raises(ValueError, match=r"holds a trained model already \(merged/model\.safetensors\)"):
        finished_model_files(out, model, overwrite=False)


def test_an_out_below_a_file_is_refused_before_loading(tmp_path, capsys):
    from w2s import train_cli

    (tmp_path / "a_file").write_text("")
    good = _write_jsonl(tmp_path / "good.jsonl", [{"prompt": "p", "response": "r"}])
    args = train_cli.parser("", "").parse_args(["--model", str(tmp_path), "--data", str(good), "--out",
                                                str(tmp_path / "a_file" / "out")])
    with pytest.raises(SystemExit) as exit_:
        train_cli.run(None, data.encode_sft_rows, args)
    assert exit_.value.code == 2
    assert "a directory above it, is a file; expected a directory" in capsys.readouterr().err


def test_a_command_stops_on_sigterm_as_on_ctrl_c_and_prints_a_warning_as_one_line(capsys, monkeypatch):
    # a scheduler's SIGTERM before it kills a job: the scripts' and `w2s run`'s Ctrl-C path says what is kept
    import os
    import signal
    import time
    import warnings

    from w2s.parallel import command_line_process, exit_if_stopped, stop_requested

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    lost = RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:46251.")
    assert exit_if_stopped(lost, "the steps are kept") is None  # no stop: the error is its own, reported as such

    before_handler, before_format = signal.getsignal(signal.SIGTERM), warnings.formatwarning
    before_ctrl_c = signal.getsignal(signal.SIGINT)
    with command_line_process():
        said = warnings.formatwarning("a row holds 683 tokens", UserWarning, "/w2s/train.py", 209, "warnings.warn()")
        assert said == "warning: a row holds 683 tokens\n"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs at the next bytecode boundary
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # a second SIGTERM would kill at once
        assert stop_requested()  # an error that follows (a collective whose peer left) is part of the stop
        capsys.readouterr()
        with pytest.raises(SystemExit) as stopped:
            exit_if_stopped(lost, "the steps are kept")
        # exit 130 as a shell reports an interrupt; the line starts below whatever a progress bar left on its line
        assert stopped.value.code == 130
        assert capsys.readouterr().err == "\nstopped (Ctrl-C or SIGTERM): the steps are kept\n"
    # put back after the command (the tests run commands in this process)
    assert (signal.getsignal(signal.SIGTERM), warnings.formatwarning) == (before_handler, before_format)
    assert signal.getsignal(signal.SIGINT) == before_ctrl_c and not stop_requested()


def test_a_command_run_off_the_main_thread_sets_no_signal_handler_but_still_formats_warnings():
    # Python lets only the main thread set signal handlers (signal.signal raises ValueError elsewhere); a command
    # run from another thread (a notebook's worker, a test runner's) must still run, with its one-line warnings.
    import signal
    import threading
    import warnings

    from w2s.parallel import command_line_process

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT), warnings.formatwarning
    outcome = []

    def command():
        try:
            with command_line_process():
                outcome.append(warnings.formatwarning("a row holds 683 tokens", UserWarning, "/w2s/train.py", 209))
        except Exception as e:  # the thread's error, reported by the assertion below
            outcome.append(e)

    thread = threading.Thread(target=command)
    thread.start()
    thread.join()
    assert outcome == ["warning: a row holds 683 tokens\n"]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT), warnings.formatwarning) == before


def test_a_command_leaves_the_process_group_it_joined_and_only_that_one():
    # A torchrun process that exits still in its gloo group can abort at interpreter shutdown ("terminate called
    # without an active exception", pytorch/pytorch#190489): every command leaves the group it joined, on success and
    # on error alike, while a group joined before the command (a test's, a notebook's) is its owner's to leave.
    import torch.distributed as dist

    from w2s.parallel import command_line_process

    def join():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)

    with command_line_process():
        join()
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="bad row"), command_line_process():
        join()
        raise ValueError("bad row")
    assert not dist.is_initialized()
    join()
    try:
        with command_line_process():
            pass
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_jsonl_rows_and_impossible_configs_get_one_line_errors(tmp_path):
    good = _write_jsonl(tmp_path / "good.jsonl", [{"prompt": "p", "response": "r"}, "", {"prompt": "q"}])
    assert read_jsonl(good, tag_lines=True) == [{"prompt": "p", "response": "r", "_where": f"{good}:1"},
                                     {"prompt": "q", "_where": f"{good}:3"}]  # blank line 2 skipped
    not_object = _write_jsonl(tmp_path / "list.jsonl", [{"prompt": "p", "response": "r"}, "[1, 2]"])
    with pytest.raises(ValueError, match=rf"^{not_object}:2: expected a JSON object per line, got list$"):
        read_jsonl(not_object)
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl: no such file"):
        read_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match=r"^TrainConfig\.micro_batch_size=0: expected a number > 0$"):
        TrainConfig(micro_batch_size=0)
    with pytest.raises(ValueError, match=r"^TrainConfig\.lora_targets: unknown \['qproj'\]"):
        TrainConfig(lora_targets=("qproj",))
    with pytest.raises(ValueError, match=r"^TrainConfig\.bad_rows='drop': expected 'skip' or 'error'$"):
        TrainConfig(bad_rows="drop")
    with pytest.raises(ValueError, match=r"^TrainConfig\.epochs=1\.5: expected a whole number$"):
        TrainConfig(epochs=1.5)  # at construction, not a TypeError in range() after the model is set up
    with pytest.raises(ValueError, match=r"^TrainConfig\.adam_betas=\(0\.9, 1\.0\): expected two numbers in \[0, 1\)$"):
        TrainConfig(adam_betas=(0.9, 1.0))
    with pytest.raises(ValueError, match=r"^TrainConfig\.min_lr=0\.001: expected a number <= lr \(1e-05\)$"):
        TrainConfig(lr=1e-5, min_lr=1e-3)
    assert train.lr_at(3, 4, TrainConfig(lr=1e-5, min_lr=1e-5)) == 1e-5  # a constant schedule stays allowed
    # not finite: each of these trained to NaN weights (or stopped steps later with a misleading hint)
    for name, value in (("lr", math.inf), ("min_lr", math.nan), ("weight_decay", math.nan), ("lora_alpha", math.nan),
                        ("beta", math.inf), ("nll_weight", math.nan), ("clip", math.inf)):
        with pytest.raises(ValueError, match=rf"^TrainConfig\.{name}=(nan|inf): expected a finite number$"):
            TrainConfig(**{name: value})
    from w2s.loss_steps import PreferenceStep

    for kind in ("dpo", "ipo"):  # 0: a constant DPO loss (nothing trained), a division by zero in IPO
        with pytest.raises(ValueError, match=rf"^beta=0\.0: {kind.upper()} needs a finite beta > 0$"):
            PreferenceStep(kind, 0.0)
    assert PreferenceStep("orpo", 0.0).beta == 0.0  # ORPO's lambda 0 is its NLL term alone


def test_dpo_script_trains_and_explains_its_rules(text_ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    help_text = _script("dpo.py", "--help").stdout
    assert "chosen equals its\nrejected response" in help_text and "--bad-rows error" in help_text
    assert "--loss {dpo,ipo,orpo}" in help_text  # losses.PREFERENCE_LOSSES
    preference_only = ("--beta ", "--nll-weight ", "--orpo-nll ")  # the options SFT would ignore: sft.py lacks them
    sft_help = _script("sft.py", "--help").stdout
    assert all(o in help_text and o not in sft_help for o in preference_only) and "--lora-rank" in sft_help
    pairs = [{"prompt": f"Question: {a} apples and {b} pears?", "chosen": f"Answer: {a + b}",
              "rejected": f"Answer: {a + b + 1}"} for a, b in [(1, 2), (3, 4), (5, 1)]]
    pairs.append({"prompt": "Question: 2 and 2?", "chosen": "Answer: 4", "rejected": " Answer: 4 "})
    data_file = _write_jsonl(tmp_path / "pairs.jsonl", pairs)
    out = tmp_path / "out"
    proc = _script("dpo.py", "--model", text_ckpt, "--data", data_file, "--out", out, "--dtype", "float32",
                   "--loss", "dpo", "--batch-size", 3, "--max-steps", 2, "--lora-rank", 2, "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipped {data_file}:4: chosen == rejected" in proc.stderr
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["loss"] == pytest.approx(math.log(2), rel=1e-5) and (out / "ref_logps.pt").is_file()
    AutoModelForCausalLM.from_pretrained(out)


def test_activation_checkpointing_recomputes_blocks_with_the_same_gradients(ckpt):
    """parallel.enable_activation_checkpointing: each block runs again in backward, with the RNG replayed (LoRA
    dropout draws the same masks), and the gradients and parameter names are exactly those of the plain model."""
    from w2s.parallel import enable_activation_checkpointing

    path, _ = ckpt
    tokens = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    runs = []
    for checkpointed in (False, True):
        model = load(path).float()
        inject_lora(model, rank=2, alpha=4.0, dropout=0.5, seed=1)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, LoRALinear):
                    m.lora_B.fill_(0.1)  # so the dropped-out LoRA input reaches the gradients of A
        if checkpointed:
            enable_activation_checkpointing(model.layers)
        calls = []
        model.layers[0].self_attn.register_forward_hook(lambda *args: calls.append(1))
        model.train()
        torch.manual_seed(5)
        model(tokens).float().logsumexp(-1).sum().backward()
        runs.append((len(calls), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (plain_calls, plain), (ckpt_calls, recomputed) = runs
    assert (plain_calls, ckpt_calls) == (1, 2)  # forward, then once more in backward
    assert plain.keys() == recomputed.keys() and plain
    for name in plain:
        assert torch.equal(plain[name], recomputed[name]), name


def test_activation_checkpointing_changes_nothing_but_memory(ckpt):
    path, _ = ckpt
    rows = id_rows(4, seed=10)
    plain, r1 = records(train_sft, load(path), None, rows, cfg(max_steps=2))
    recomputed, r2 = records(train_sft, load(path), None, rows, cfg(max_steps=2, activation_checkpointing=True))
    assert [r["loss"] for r in r1] == pytest.approx([r["loss"] for r in r2], rel=1e-6)
    assert_same_weights(plain, recomputed, atol=1e-6)


def test_meta_model_loads_nothing_and_a_plain_process_refuses_to_train_it(ckpt, monkeypatch):
    """load_for_training on a rank > 0 builds the model on the meta device; without FSDP there is no rank 0 to fill
    it from, so training says so instead of failing deep inside a matmul."""
    from w2s.checkpoint import load_for_training

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    path, _ = ckpt
    model = load_for_training(path)
    assert all(p.is_meta for p in model.parameters())
    monkeypatch.setenv("RANK", "0")
    assert not any(p.is_meta for p in load_for_training(path).parameters())
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    with pytest.raises(ValueError, match="meta device"):
        train_sft(model, None, id_rows(4), cfg(max_steps=1))


def test_rank_0_holding_a_meta_model_is_refused_before_any_collective():
    """fill_from_rank0 broadcasts rank 0's weights: rank 0 on the meta device has none to give, which must be one
    clear error there (no process group is needed to say it) rather than garbage shards on every rank."""
    from w2s.config import ModelConfig
    from w2s.model import Transformer
    from w2s.parallel import Dist, fill_from_rank0

    with torch.device("meta"):
        model = Transformer(ModelConfig(family="llama", vocab_size=32, dim=16, n_layers=1, n_heads=2, n_kv_heads=1,
                                        head_dim=8, hidden_dim=24))
    with pytest.raises(ValueError, match="fill_from_rank0: rank 0 holds meta parameters"):
        fill_from_rank0(model, {}, Dist(0, 2, torch.device("cpu"), sharded=True))


def test_the_reference_pass_runs_without_dropout_and_leaves_the_training_mode_as_it_was():
    """A LoRA run with lora_dropout > 0 trains in training mode; its reference log-probs must be the deterministic
    (eval-mode) forward, or DPO's reference would be noise."""
    from w2s.data import IGNORE_INDEX, Example, Pair
    from w2s.parallel import Dist

    class DropoutScorer(torch.nn.Module):  # a response token's log-prob, through dropout as a LoRA layer's would be
        def __init__(self):
            super().__init__()
            self.drop = torch.nn.Dropout(0.5)

        def forward(self, tokens, targets, per_token, target_rows=None):
            return torch.where(targets != IGNORE_INDEX, -self.drop(torch.ones(targets.shape)), 0.0).flatten()

    pairs = [Pair(Example([1, 2, 3, 4], 2), Example([1, 2, 5, 6, 7], 2)) for _ in range(3)]
    module = DropoutScorer().train()
    table = reference_logps.compute_reference_logps(module, pairs, 0, 2, Dist(0, 1, torch.device("cpu"), False))
    assert torch.equal(table, torch.tensor([[-2.0, -3.0]] * 3)) and module.training
    reference_logps.compute_reference_logps(module.eval(), pairs, 0, 2, Dist(0, 1, torch.device("cpu"), False))
    assert not module.training  # a module in eval mode (a full fine-tune's reference) stays there


def test_reference_pass_ranks_take_micro_batches_in_turn_and_their_tables_add_up_to_every_pair():
    """Each rank scores every world_size-th micro-batch (the same number of forwards on every rank, an empty one if
    need be) and fills only those rows: the all-reduce's sum of the ranks' tables is the whole table."""
    from w2s.data import IGNORE_INDEX, Example, Pair
    from w2s.parallel import Dist

    class TokenCounter(torch.nn.Module):  # every response token at log-prob -1: a sequence scores -(its targets)
        def __init__(self):
            super().__init__()
            self.forwards = 0

        def forward(self, tokens, targets, per_token, target_rows=None):
            self.forwards += 1
            return -(targets != IGNORE_INDEX).float().flatten()

    # (response tokens of the chosen, of the rejected): 5 pairs, 3 micro-batches of at most 2
    lengths = [(1, 4), (3, 2), (5, 1), (2, 2), (4, 3)]
    pairs = [Pair(Example([1, 2] + [3] * c, 2), Example([1, 2] + [4] * r, 2)) for c, r in lengths]
    tables, forwards = [], []
    for rank in (0, 1):
        module = TokenCounter()
        tables.append(reference_logps.compute_reference_logps(module, pairs, 0, 2,
                                                              Dist(rank, 2, torch.device("cpu"), False)))
        forwards.append(module.forwards)
    assert forwards == [2, 2]
    assert torch.equal(tables[0] + tables[1], -torch.tensor(lengths, dtype=torch.float32))
    assert not ((tables[0] != 0).any(1) & (tables[1] != 0).any(1)).any()  # each pair scored by one rank


def test_a_cached_reference_table_of_another_size_is_recomputed_even_under_the_same_key(tmp_path):
    """ref_logps.pt is reused only when its key matches AND it holds a row per pair: a table of another size (a torn or
    hand-copied file) is recomputed and written over, never handed to the trainer, whose pair indices it does not
    fit. By hand: every response token at log-prob -1, so a response scores minus its token count."""
    from types import SimpleNamespace

    from w2s.data import IGNORE_INDEX, Example, Pair
    from w2s.parallel import Dist

    class TokenCounter(torch.nn.Module):
        def forward(self, tokens, targets, per_token, target_rows=None):
            return -(targets != IGNORE_INDEX).float().flatten()

    lengths = [(1, 4), (3, 2), (5, 1)]  # (chosen, rejected) response tokens
    pairs = [Pair(Example([1, 2] + [3] * c, 2), Example([1, 2] + [4] * r, 2)) for c, r in lengths]
    torch.save({"key": "k", "logps": torch.zeros(2, 2)}, tmp_path / "ref_logps.pt")
    table = reference_logps.reference_logps(TokenCounter(), pairs, 0, SimpleNamespace(micro_batch_size=2),
                                            Dist(0, 1, torch.device("cpu"), False), tmp_path, "k")
    expected = -torch.tensor(lengths, dtype=torch.float32)
    assert torch.equal(table, expected)
    assert torch.equal(torch.load(tmp_path / "ref_logps.pt", weights_only=True)["logps"], expected)


def test_the_weights_fingerprint_sees_changes_that_keep_a_tensors_sum_and_swaps_of_same_shaped_tensors(ckpt):
    """The reference cache's key must change with the weights: mass moved between two entries (the same sum, exactly:
    0.5 + 0.5 and 0.75 + 0.25), a tiny update of one weight, and two same-shaped matrices swapped (same values, other
    layers)."""
    path, _ = ckpt
    original, base, moved, nudged, swapped = load(path), load(path), load(path), load(path), load(path)
    assert reference_logps.model_fingerprint(original) == reference_logps.model_fingerprint(base)
    with torch.no_grad():
        base.norm.weight[:2] = torch.tensor([0.5, 0.5])
        moved.norm.weight[:2] = torch.tensor([0.75, 0.25])
        nudged.layers[0].mlp.up_proj.weight[0, 0] *= 1 + 1e-6
        q0, q1 = swapped.layers[0].self_attn.q_proj.weight, swapped.layers[1].self_attn.q_proj.weight
        tmp = q0.clone()
        q0.copy_(q1)
        q1.copy_(tmp)
    keys = [reference_logps.model_fingerprint(m) for m in (original, base, moved, nudged, swapped)]
    assert len(set(keys)) == 5


# ---------------------------------------------------------------------------------------------- batching rules


def test_epoch_batches_are_length_grouped_reshuffled_per_epoch_with_the_short_batch_last():
    """w2s/data.py: rows shuffled per epoch, a window sorted longest first and cut into batches, the batch order
    shuffled again, the one short batch last. 42 rows of distinct lengths, batch 4, one window: 10 full + 1 of 2."""
    lengths = [(7 * i) % 43 + 1 for i in range(42)]  # a permutation of 1..42 scattered over the indices
    rank = sorted(range(42), key=lambda i: -lengths[i])  # rank[k]: the k-th longest row
    batches = data.epoch_batches(lengths, 4, seed=1, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(42))
    assert [len(b) for b in batches] == [4] * 10 + [2]
    assert set(batches[-1]) == set(rank[40:])  # the window's two shortest rows close it
    for b in batches[:-1]:  # each full batch: 4 rows adjacent in length order
        assert sorted(rank.index(i) for i in b) in [list(range(4 * k, 4 * k + 4)) for k in range(10)]
    longest = [max(lengths[i] for i in b) for b in batches[:-1]]
    assert longest != sorted(longest, reverse=True)  # long and short batches interleave
    assert data.epoch_batches(lengths, 4, seed=1, epoch=0) == batches  # a pure function of (seed, epoch)
    assert data.epoch_batches(lengths, 4, seed=1, epoch=1) != batches  # a new order every epoch


def test_split_slots_cuts_contiguous_slots_whose_sizes_differ_by_at_most_one():
    assert data.split_slots([0, 1, 2, 3], 2) == [[0, 1], [2, 3]]
    assert data.split_slots([0, 1, 2, 3, 4], 2) == [[0, 1, 2], [3, 4]]
    assert data.split_slots([0, 1, 2], 4) == [[0], [1], [2], []]  # a rank past the rows gets an empty slot


def test_an_empty_micro_batch_is_one_all_ignored_dummy_row():
    """A rank with no rows in a short last batch still runs forward/backward; its dummy row carries no target."""
    tokens, targets = data.collate([], pad_id=5)  # (1, 1)
    assert tokens.tolist() == [[5]] and targets.tolist() == [[data.IGNORE_INDEX]]


def test_rows_at_the_limits_of_length_and_targets(capsys):
    """A sequence of exactly max_seq_len tokens is kept (only a longer one is bad), for every sequence of a pair;
    a sequence whose only response token is its first token has nothing to predict (no context), on either side
    of a pair; a pair weight of 0 is a weight (>= 0)."""
    sft = [{"prompt_ids": [5, 6], "response_ids": [7, 8, 9, 10]},  # 6 tokens == max_seq_len: kept
           {"prompt_ids": [5, 6], "response_ids": [7, 8, 9, 10, 11]},  # 7 tokens
           {"prompt_ids": [], "response_ids": [7]},  # the first token is never a target
           {"prompt_ids": [], "response_ids": [7, 8]}]  # one target: 8
    examples, kept, bad = data.encode_sft_rows(None, sft, max_seq_len=6)
    assert kept == [0, 3] and [data.n_targets(ex) for ex in examples] == [4, 1]
    assert [reason.split(" (")[0] for _, reason in bad] == ["sequence of 7 tokens is longer than max_seq_len=6",
                                                             "no response token to predict"]
    pairs = [{"prompt_ids": [5], "chosen_ids": [7] * 6, "rejected_ids": [8]},  # only chosen is too long
             {"prompt_ids": [5], "chosen_ids": [7] * 5, "rejected_ids": [8]},  # 6 and 2 tokens: kept
             {"prompt_ids": [], "chosen_ids": [7], "rejected_ids": [8, 9]},  # chosen has no target
             {"prompt_ids": [5], "chosen_ids": [7], "rejected_ids": [8], "weight": 0}]
    _, kept, bad = data.encode_pair_rows(None, pairs, max_seq_len=6)
    assert kept == [1, 3] and [loc for loc, _ in bad] == ["row 0", "row 2"]
    capsys.readouterr()


def test_examples_hash_covers_the_loss_mask():
    """The run key (resume) must change when the same tokens carry loss elsewhere, e.g. a new prompt split."""
    a, b = data.Example([1, 2, 3, 4], n_prompt=2), data.Example([1, 2, 3, 4], n_prompt=3)
    assert train.examples_hash([a]) != train.examples_hash([b])
    chat = data.Example([1, 2, 3, 4], n_prompt=1, spans=((1, 2),))
    assert train.examples_hash([chat]) != train.examples_hash([data.Example([1, 2, 3, 4], 1, spans=((1, 4),))])


def test_a_pair_without_a_weight_weighs_one_beside_weighted_ones():
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b", "weight": 2.5},
            {"prompt": "q", "chosen": "c", "rejected": "d"},
            {"prompt": "q", "chosen": "e", "rejected": "f", "weight": 0.5}]
    assert train.pair_weights(rows, [0, 1, 2]).tolist() == [2.5, 1.0, 0.5]
    assert train.pair_weights(rows, [1, 2]).tolist() == [1.0, 0.5]


# ---------------------------------------------------------------------------------------------- the step loop


def test_an_epoch_is_ceil_rows_over_batch_size_steps_and_the_last_step_is_logged(ckpt):
    """5 rows, batch 2, 2 epochs: ceil(5 / 2) = 3 steps an epoch (the short batch is a step), 6 in all; with
    log_every=4 the records are step 4 and the last step."""
    path, _ = ckpt
    c = cfg(batch_size=2, micro_batch_size=2, max_steps=None, epochs=2, log_every=4)
    _, recs = records(train_sft, load(path), None, id_rows(5), c)
    assert [r["step"] for r in recs] == [4, 6]
    assert [r["epoch"] for r in recs] == [1, 1]


def test_batches_group_rows_by_token_length(ckpt):
    """Grouping sorts by sequence length, not by the number of loss tokens. Rows (prompt + response tokens):
    9 + 1, 3 + 5, 1 + 2, 1 + 1; batch 2 -> {10, 8} and {3, 2} tokens, i.e. 9 + 7 = 16 and 2 + 1 = 3 model inputs
    per step (grouping by loss tokens 1, 5, 2, 1 would pair them otherwise)."""
    path, _ = ckpt
    rows = [{"prompt_ids": [3] * p, "response_ids": [4] * r} for p, r in [(9, 1), (3, 5), (1, 2), (1, 1)]]
    _, recs = records(train_sft, load(path), None, rows, cfg(batch_size=2, micro_batch_size=2, max_steps=None))
    assert sorted(r["tokens"] for r in recs) == [3, 16]


def test_the_gradient_norm_is_clipped_before_the_adamw_step(ckpt):
    """One step with clip=1e-5 equals transformers' masked-loss gradient, torch's clip_grad_norm_ and torch's AdamW
    (betas 0.9/0.95, eps 1e-8, no decay). The clip is tiny so that Adam's eps makes the step differ from an
    unclipped one (Adam's first step is otherwise invariant to the gradient's scale)."""
    from transformers import AutoModelForCausalLM

    path, _ = ckpt
    rows = id_rows(4, seed=2)
    c = cfg(batch_size=4, micro_batch_size=4, max_steps=1, lr=1e-2, clip=1e-5)
    trained = train_sft(load(path), None, rows, c)

    def reference(clip):
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        total, count = 0.0, 0
        for r in rows:  # unpadded, labels -100 on the prompt
            ids = torch.tensor([r["prompt_ids"] + r["response_ids"]])
            labels = ids.clone()
            labels[0, : len(r["prompt_ids"])] = -100
            total = total + F.cross_entropy(hf(ids).logits[0, :-1], labels[0, 1:], ignore_index=-100,
                                            reduction="sum")
            count += len(r["response_ids"])
        (total / count).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(hf.parameters(), clip)
        torch.optim.AdamW(hf.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0).step()
        return dict(hf.named_parameters())

    clipped, unclipped = reference(1e-5), reference(None)
    far = 0.0
    for name, p in trained.named_parameters():
        hf_name = w2s.checkpoint.hf_name(name)
        torch.testing.assert_close(p.detach(), clipped[hf_name].detach(), atol=2e-4, rtol=0, msg=name)
        far = max(far, (p.detach() - unclipped[hf_name].detach()).abs().max().item())
    assert far > 1e-3  # the clip changed the step


def test_adamw_gets_the_configured_betas_and_decays_matrices_only(ckpt, monkeypatch):
    path, _ = ckpt
    seen = []
    real = torch.optim.AdamW

    def spy(groups, **kwargs):
        seen.append((groups, kwargs))
        return real(groups, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    train_sft(load(path), None, id_rows(4), cfg(max_steps=1, weight_decay=0.1, adam_betas=(0.8, 0.9)))
    [(groups, kwargs)] = seen
    assert tuple(kwargs["betas"]) == (0.8, 0.9)
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    params = list(load(path).parameters())
    assert len(decay) == len(params) and sorted(decay.values()) == sorted(0.1 if p.ndim >= 2 else 0.0 for p in params)
    for g in groups:  # norm weights (1-D) never decay
        assert all((p.ndim >= 2) == (g["weight_decay"] == 0.1) for p in g["params"])


def test_a_non_finite_gradient_stops_the_run_before_the_update(ckpt):
    """The gradient norm is checked before optimizer.step: no weight moves (the passed model is trained in place
    on one CPU process, so its tensors show what the step did)."""
    path, _ = ckpt
    model = load(path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.layers[0].mlp.down_proj.weight.register_hook(lambda g: torch.full_like(g, math.nan))
    with pytest.raises(train.NonFiniteError, match="step 1: gradient norm is nan"):
        train_sft(model, None, id_rows(4), cfg(max_steps=1, lr=1e-2))
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_a_row_exactly_as_long_as_the_trained_context_is_not_said(ckpt, recwarn):
    path, _ = ckpt
    model = load(path)
    rows = [{"prompt_ids": [3] * 5, "response_ids": [4] * (model.cfg.max_seq_len - 5)}]
    train_sft(model, None, rows, cfg(batch_size=1, micro_batch_size=1, max_steps=1, max_seq_len=100_000))
    assert not [w for w in recwarn if "a training row holds" in str(w.message)]  # only a longer row is said


# ---------------------------------------------------------------------------------------------- resume, stats


def test_a_resumed_run_counts_every_token_of_the_whole_run(ckpt, tmp_path):
    """stats["tokens"]: the model-input tokens of the WHOLE run (each sequence less its last token), a resumed run
    included, also from a checkpoint that did not record its count. 8 rows, batch 4, 4 steps: every row twice."""
    path, _ = ckpt
    rows = id_rows(8, seed=8)
    by_hand = 2 * sum(len(r["prompt_ids"]) + len(r["response_ids"]) - 1 for r in rows)
    c = cfg(max_steps=4, ckpt_every=2)
    for recorded in (True, False):
        out = tmp_path / str(recorded)
        with pytest.raises(Killed):
            train_sft(load(path), None, rows, c, out_dir=out, on_step=_kill_at(3, []))
        if not recorded:
            state = out / "ckpt" / "step00000002" / "train_state.json"
            state.write_text(json.dumps({k: v for k, v in json.loads(state.read_text()).items() if k != "tokens"}))
        _, stats = train_sft(load(path), None, rows, c, out_dir=out, return_stats=True)
        assert (stats["resumed_from_step"], stats["steps"], stats["tokens"]) == (2, 4, by_hand), recorded


def test_a_fresh_start_killed_before_its_first_checkpoint_leaves_nothing_to_resume(ckpt, tmp_path):
    path, _ = ckpt
    rows = id_rows(8, seed=7)
    with pytest.raises(Killed):
        train_sft(load(path), None, rows, cfg(max_steps=6, ckpt_every=2), out_dir=tmp_path, on_step=_kill_at(5, []))
    with pytest.raises(Killed):  # resume=False, killed at step 1: before it writes a checkpoint of its own
        train_sft(load(path), None, rows, cfg(max_steps=6, ckpt_every=2, resume=False), out_dir=tmp_path,
                  on_step=_kill_at(1, []))
    log = []
    train_sft(load(path), None, rows, cfg(max_steps=6, ckpt_every=2), out_dir=tmp_path, on_step=log.append)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------------------------- config


def test_grad_accum_is_the_ceiling_so_no_micro_batch_exceeds_micro_batch_size():
    assert TrainConfig(batch_size=6, micro_batch_size=4).grad_accum(1) == 2  # 3 + 3, not one of 6
    assert TrainConfig(batch_size=6, micro_batch_size=2).grad_accum(2) == 2  # 2 ranks x 2 slots of <= 2
    assert TrainConfig(batch_size=4, micro_batch_size=9).grad_accum(1) == 1


def test_more_impossible_configs_are_refused_naming_the_field():
    for kwargs, says in [({"clip": 0.0}, r"clip=0\.0: expected a number > 0"),
                         ({"lora_dropout": 1.0}, r"lora_dropout=1\.0: expected 0 <= p < 1"),
                         ({"warmup_steps": 1.5}, r"warmup_steps=1\.5: expected a whole number")]:
        with pytest.raises(ValueError, match=rf"^TrainConfig\.{says}"):
            TrainConfig(**kwargs)


def test_command_line_options_give_the_same_config_as_python():
    """--clip none disables clipping; list options arrive as the tuples a TrainConfig holds."""
    import argparse

    from w2s.train_config import add_config_args, config_from_args

    parser = add_config_args(argparse.ArgumentParser())
    args = parser.parse_args(["--clip", "none", "--adam-betas", "0.8", "0.9", "--lora-targets", "q_proj", "v_proj"])
    assert config_from_args(args) == TrainConfig(clip=None, adam_betas=(0.8, 0.9), lora_targets=("q_proj", "v_proj"))


# ---------------------------------------------------------------------------------------------- LoRA layers


class _Proj(torch.nn.Module):
    """One target layer with a bias (as Qwen2's q/k/v projections): q_proj (8 <- 16)."""

    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(16, 8, bias=True)


def test_lora_a_starts_as_nn_linears_default_init_and_b_at_zero(ckpt):
    """A ~ kaiming_uniform_(a=sqrt(5)), nn.Linear's default (the paper's code); B = 0, so an injected model computes
    exactly what the base did."""
    layer = LoRALinear(torch.nn.Linear(16, 8), rank=4, alpha=8.0, dropout=0.0,
                       generator=torch.Generator().manual_seed(0))
    expected = torch.empty(4, 16)  # (r, in)
    torch.nn.init.kaiming_uniform_(expected, a=math.sqrt(5), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(layer.lora_A.detach(), expected, atol=1e-7, rtol=0)
    path, _ = ckpt
    model, ids = load(path), torch.tensor([[1, 5, 9, 33, 70]])
    with torch.no_grad():
        before = model(ids)
        inject_lora(model, rank=4, alpha=8.0)
        assert torch.equal(model(ids), before)


def test_unwrapping_lora_keeps_the_bias_merges_only_when_asked_and_unfreezes_everything():
    """unwrap_lora(merge=True): a plain Linear computing W x + b + (alpha / r) B A x; merge=False: the untouched base
    layer; either way every parameter is trainable again (full fine-tuning of an adapter's model)."""
    from w2s.lora import unwrap_lora

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, generator=g)
    results = {}
    for merge in (True, False):
        torch.manual_seed(1)
        model = _Proj()
        w, b = model.q_proj.weight.detach().clone(), model.q_proj.bias.detach().clone()
        inject_lora(model, rank=2, alpha=4.0, seed=1)
        with torch.no_grad():
            model.q_proj.lora_B.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
        by_hand = x @ w.T + b + 2.0 * (x @ model.q_proj.lora_A.detach().T @ model.q_proj.lora_B.detach().T)
        unwrap_lora(model, merge=merge)
        assert type(model.q_proj) is torch.nn.Linear and all(p.requires_grad for p in model.parameters())
        with torch.no_grad():
            results[merge] = (model.q_proj(x), by_hand, x @ w.T + b)
    torch.testing.assert_close(results[True][0], results[True][1], atol=1e-5, rtol=1e-5)
    assert torch.equal(results[False][0], results[False][2])


def test_an_arrived_adapter_continues_only_with_its_rank_alpha_and_targets_under_this_runs_dropout():
    """prepare_lora on a model with LoRA layers: rank 2 alpha 4 (scale 2) cannot continue as rank 4 alpha 8 (the same
    scale, another shape); the same shape continues, with this run's lora_dropout on the branch."""
    from w2s.lora import prepare_lora

    model = _Proj()
    inject_lora(model, rank=2, alpha=4.0, dropout=0.0)
    with pytest.raises(ValueError, match=r"adapter \(rank 2, alpha 4, .*cannot continue as lora_rank 4"):
        prepare_lora(model, 4, 8.0, 0.0, ("q_proj",), seed=0)
    prepare_lora(model, 2, 4.0, 0.5, ("q_proj",), seed=0)
    with torch.no_grad():
        model.q_proj.lora_B.fill_(1.0)
    x = torch.randn(4, 16)
    model.eval()
    deterministic = model.q_proj(x)
    model.train()
    assert not torch.allclose(model.q_proj(x), deterministic)  # dropout 0.5 acts in training mode


def test_an_adapter_whose_b_does_not_fit_the_layer_is_refused():
    """B (1, r) on an (8, 16) layer would broadcast silently into every output row: a clear error instead."""
    from w2s.lora import Adapter, merge_adapter

    model = _Proj()
    adapter = Adapter(rank=2, alpha=4.0, base=None, tensors={"q_proj": (torch.randn(2, 16), torch.randn(1, 2))})
    with pytest.raises(ValueError, match=r"adapter tensor q_proj: .* do not fit the model's layer \(8 x 16\)"):
        merge_adapter(model, adapter)
