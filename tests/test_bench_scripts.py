"""The benchmark scripts still run end to end (tiny shapes, one repeat). They measure speed and memory; these tests
only check that every mode runs and prints its result line, never a number (performance goals live in BENCHMARKS.md).

    python -m pytest -q tests/test_bench_scripts.py
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_LLAMA = ["--dim", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--hidden", "64", "--vocab", "128",
              "--batch", "2", "--seq", "16", "--steps", "2", "--warmup", "1"]


def run_script(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_bench_train_speed_and_dpo_memory_modes_run():
    speed = run_script("scripts/bench_train.py", "--prompt-frac", "0.5", *TINY_LLAMA)
    assert "speed ratio w2s / transformers:" in speed
    memory = run_script("scripts/bench_train.py", "--dpo-memory", *TINY_LLAMA)
    assert "fused linear log-probs" in memory and "unfused (reference)" in memory and "fused / unfused:" in memory


def test_bench_sampling_runs_with_a_shared_prefix():
    out = run_script("scripts/bench_sampling.py", "--prompts", "2", "--samples", "2", "--new-tokens", "4",
                     "--prompt-len", "4", "--shared-prefix", "8", "--repeats", "1", "--threads", "1")
    assert "after a shared prefix of 8" in out and "speed-up over transformers:" in out


def test_bench_train_without_transformers_times_w2s_alone():
    out = run_script("scripts/bench_train.py", "--no-hf", *TINY_LLAMA)
    assert "alone" in out and "\nw2s " in out
    assert "transformers" not in out.split("alone")[1]  # no transformers rows, no ratio


def test_bench_sampling_profile_lists_the_decode_ops():
    out = run_script("scripts/bench_sampling.py", "--prompts", "1", "--samples", "1", "--new-tokens", "4",
                     "--prompt-len", "4", "--repeats", "1", "--threads", "1", "--no-hf", "--profile")
    assert "profile: eager batch-1 greedy decode" in out and "aten::mm" in out


def test_sweep_without_cuda_says_it_needs_one():
    out = run_script("-m", "kernels.sweep")
    assert "needs a CUDA GPU" in out
