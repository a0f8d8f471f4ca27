"""The benchmark modes added for the GPU targets run end to end on CPU at tiny shapes: the GSM8K-like sampling
workload (EOS-terminated lengths, slot occupancy, admission share, chunked prefill), MBU and the batch-1 roofline
beside tok/s, and the DPO step's tokens/s and MFU. Like tests/test_bench_scripts.py, they check that each mode runs
and prints its lines, never a number.

    python -m pytest -q tests/test_bench_modes.py
"""

import re

from test_bench_scripts import TINY_LLAMA, run_script


def test_bench_sampling_gsm8k_workload_prints_occupancy_and_mbu():
    # 6 EOS-terminated sequences through 3 slots: slots free at different host looks, so prompts join decode steps
    out = run_script("scripts/bench_sampling.py", "--gsm8k", "--prompts", "2", "--samples", "3", "--new-tokens",
                     "160", "--max-batch", "3", "--repeats", "1", "--threads", "1", "--batch1", "--prefill-chunk", "16")
    assert "EOS-terminated" in out and "prompt lengths " in out and "prefill_chunk 16" in out
    assert "copy bandwidth" in out
    assert "occupancy" in out and "admission (prefill forwards)" in out and "MBU" in out
    assert int(re.search(r"\((\d+) mixed\)", out)[1]) > 0  # chunked prefill ran
    assert "speed-up over transformers:" in out  # transformers runs the same EOS workload on CPU
    assert "batch-1 roofline" in out and "w2s batch-1 decode" in out


def test_bench_train_dpo_mode_reports_tokens_per_second():
    out = run_script("scripts/bench_train.py", "--dpo", *TINY_LLAMA)
    assert "w2s DPO step:" in out and "tok/s, MFU" in out
