"""FSDP2 on 2 CPU processes (gloo, torchrun) == one plain process: same per-step losses and final weights (<= 1e-5).

One torchrun launch runs the runs of tests/dist_train_worker.py (SFT and DPO, full and LoRA, ORPO; a short last batch
leaves one rank an empty micro-batch; SFT full and LoRA are killed and resumed from a sharded checkpoint; the LoRA
runs keep their shards and optimizer state in host memory through FSDP2's CPU offload); the test then runs
the same runs in this process without FSDP and compares metrics.jsonl and the exported safetensors, and resumes in
this process a run killed on the 2 ranks.

    python -m pytest -q tests/test_fsdp.py
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import dist_train_worker as worker  # noqa: E402
from hf_tiny import save_hf  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(dir of the 2-process runs, dir of the 1-process runs), each holding one sub-directory per worker.RUNS."""
    base = tmp_path_factory.mktemp("fsdp")
    ckpt = base / "llama"
    save_hf("llama2", ckpt)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "dist_train_worker.py"), str(ckpt), str(base / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    for name in worker.RUNS:
        worker.run(name, ckpt, base / "one" / name)
    return base / "two", base / "one"


def _metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", list(worker.RUNS))
def test_two_fsdp_processes_equal_one_process(runs, name):
    two, one = (d / name for d in runs)
    m2, m1 = _metrics(two), _metrics(one)
    assert [r["step"] for r in m2] == [r["step"] for r in m1] == list(range(1, worker.STEPS + 1))
    for a, b in zip(m2, m1):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), a["step"]
        assert a["tokens"] == b["tokens"]
    if "lora" in name:  # the adapters (gathered alone) agree, and so do the merged exports (base gathered too)
        a2, a1 = load_file(two / "adapter_model.safetensors"), load_file(one / "adapter_model.safetensors")
        assert a2.keys() == a1.keys() and all(torch.allclose(a2[k], a1[k], atol=1e-5, rtol=0) for k in a1)
        two, one = two / "merged", one / "merged"
    w2, w1 = load_file(two / "model.safetensors"), load_file(one / "model.safetensors")
    initial = load_file(runs[0].parent / "llama" / "model.safetensors")
    assert w2.keys() == w1.keys()
    moved = 0.0
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], atol=1e-5, rtol=0, msg=key)
        moved = max(moved, (w1[key] - initial[key]).abs().max().item())
    assert moved > 1e-3  # training really changed the weights, so equality is not trivial


def test_a_run_killed_on_two_ranks_resumes_in_one_process(runs):
    """The training state is saved sharded with the global step and the loss is normalized over every rank, so a
    run killed on 2 ranks resumes on 1 (a node lost at 70B) onto the same trajectory as a 1-process run."""
    two, one = runs
    moved = two / "sft_full_moved"
    assert [r["step"] for r in _metrics(moved)] == [1, 2, 3] and (moved / "ckpt" / "step00000002").is_dir()
    worker.run("sft_full", runs[0].parent / "llama", moved, kill=False)
    m2, m1 = _metrics(moved), _metrics(one / "sft_full")
    assert [r["step"] for r in m2] == [1, 2, 3, 4]
    for a, b in zip(m2, m1):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["tokens"] == b["tokens"], a["step"]
    w2, w1 = load_file(moved / "model.safetensors"), load_file(one / "sft_full" / "model.safetensors")
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], atol=1e-5, rtol=0, msg=key)


def _on_one_gloo_rank(body):
    """Run `body` in a fresh process that has made a 1-rank gloo group and `model`, a tiny 3-block Llama sharded by
    shard_model (fp32), with `plain`, an unsharded copy of it, and `tokens` (2, 5); it passes by printing ok."""
    setup = textwrap.dedent("""
        import copy
        import torch, torch.distributed as dist
        from torch.distributed.tensor import DTensor
        from w2s.config import ModelConfig
        from w2s.model import Transformer
        from w2s.parallel import Dist, reshard_all, shard_model
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        cfg = ModelConfig(family="llama", vocab_size=61, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8,
                          hidden_dim=48)
        model = Transformer(cfg).init_weights(std=0.2, generator=torch.Generator().manual_seed(0))
        plain = copy.deepcopy(model)
        shard_model(model, list(model.layers), Dist(0, 1, torch.device("cpu"), True), bf16=False)
        tokens = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(1))
    """)
    script = setup + textwrap.dedent(body) + '\ndist.destroy_process_group()\nprint("ok")\n'
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_only_the_root_and_last_block_stay_gathered_between_forward_and_backward():
    """After a forward the root and the last block hold their gathered weights (backward needs them first) and the
    other blocks are back to shards; backward frees them all; after a no-grad forward reshard_all does, and
    parameters() yields the sharded parameters again, the same objects as before."""
    _on_one_gloo_rank("""
        sharded = list(model.parameters())
        def gathered():  # which of (root, block 0, 1, 2) hold plain (gathered) tensors instead of DTensor shards
            return [not isinstance(m.weight, DTensor)
                    for m in (model.embed_tokens, *(b.self_attn.q_proj for b in model.layers))]
        assert gathered() == [False] * 4, gathered()
        loss = model(tokens).logsumexp(-1).sum()
        assert gathered() == [True, False, False, True], gathered()
        loss.backward()
        assert gathered() == [False] * 4, gathered()
        with torch.no_grad():
            model(tokens)
        assert gathered() == [True, False, False, True], gathered()
        reshard_all(model)
        assert gathered() == [False] * 4, gathered()
        assert all(p is q for p, q in zip(model.parameters(), sharded, strict=True))
    """)


def test_one_rank_backward_sums_gradients_without_an_extra_division():
    """On one rank the gradients equal the plain model's, and the sharded forward + backward runs exactly the plain
    one's divisions (aten::div): no `gradient / 1` pass per block on the way to the optimizer."""
    _on_one_gloo_rank("""
        from torch.profiler import profile
        def divisions(m):
            with profile() as prof:
                m(tokens).logsumexp(-1).sum().backward()
            return sum(e.count for e in prof.key_averages() if e.key == "aten::div")
        assert divisions(model) == divisions(plain)
        for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
            torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=1e-5, atol=1e-6, msg=name)
    """)
