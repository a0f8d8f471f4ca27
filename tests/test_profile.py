"""Tests for w2s/profile.py: the FLOPs formula, MFU arithmetic, the log line, the timers, the trace (all on CPU).

    python -m pytest -q tests/test_profile.py

The FLOPs formula is checked twice: against a count by hand for a tiny config, and against torch's own
FlopCounterMode on w2s's Transformer (every matmul of a forward, and of forward+backward, on a 1 x T batch).
"""

import json
import time

import pytest
import torch

from w2s import profile
from w2s.config import ModelConfig
from w2s.profile import (
    GiB,
    StageProfiler,
    flops_per_token,
    fmt_log_line,
    mfu,
    peak_flops,
)


def tiny_cfg(**overrides):
    fields = dict(family="llama", vocab_size=100, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4,
                  hidden_dim=32)
    return ModelConfig(**{**fields, **overrides})


def test_flops_per_token_by_hand():
    # Per layer: q 16x16 + k 16x8 + v 16x8 + o 16x16 = 768, MLP 3 x 16x32 = 1536, two norms 2x16 = 32 -> 2336.
    # N = 2 layers x 2336 + final norm 16 + output projection 100x16 = 6288 (the embedding table is a lookup).
    n = 2 * 2336 + 16 + 1600
    T = 10
    attention_fwd = 4 * 2 * 4 * 4 * T  # 4 * L * H * D * T
    assert flops_per_token(tiny_cfg(), seq_len=T, training=False) == 2 * n + attention_fwd
    assert flops_per_token(tiny_cfg(), seq_len=T, training=True) == 6 * n + 3 * attention_fwd
    # Tied embeddings: the output projection still multiplies, so N does not change.
    assert flops_per_token(tiny_cfg(tie_embeddings=True), seq_len=T) == 6 * n + 3 * attention_fwd
    # The same from plain numbers, and without the attention term.
    assert flops_per_token(n_params=n, n_layers=2, n_heads=4, head_dim=4, seq_len=T) == 6 * n + 12 * 2 * 4 * 4 * T
    assert flops_per_token(n_params=n, training=False) == 2 * n
    # Sliding window 4 on layer 0 only: that layer attends to min(T, 4) keys.
    windowed = flops_per_token(n_params=n, n_layers=2, n_heads=4, head_dim=4, seq_len=T, windows=[4, None],
                               training=False)
    assert windowed == 2 * n + 4 * 4 * 4 * (4 + T)
    # The same windows read from a config: Gemma-2's alternating layers, and Mistral's window on every layer.
    alternating = tiny_cfg(sliding_window=4, layer_types=["sliding_attention", "full_attention"])
    assert flops_per_token(alternating, seq_len=T, training=False) == windowed
    assert flops_per_token(tiny_cfg(sliding_window=4), seq_len=T, training=False) == 2 * n + 4 * 4 * 4 * (4 + 4)


def test_flops_per_token_matches_torch_flop_counter(monkeypatch):
    from torch.utils.flop_counter import FlopCounterMode

    from w2s import ops
    from w2s.model import Transformer

    # The formula counts attention as the explicit matmuls of the reference (full QK^T and PV); the CPU SDPA path
    # would be counted by its own rule, so count the reference's.
    monkeypatch.setattr(ops, "_backend", "reference")

    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = Transformer(cfg).float()
    norm_params = sum(p.numel() for name, p in model.named_parameters() if "norm" in name)
    T = 12
    tokens = torch.randint(0, cfg.vocab_size, (1, T))

    with FlopCounterMode(display=False) as counter:
        model(tokens)
    # FlopCounterMode counts matmuls only: the formula's N includes the (tiny) norm weights, so remove them.
    expected_fwd = T * (flops_per_token(cfg, seq_len=T, training=False) - 2 * norm_params)
    assert counter.get_total_flops() == expected_fwd

    with FlopCounterMode(display=False) as counter:
        model(tokens).float().sum().backward()
    assert counter.get_total_flops() == 3 * expected_fwd


def test_peak_flops_table_and_mfu(monkeypatch):
    monkeypatch.delenv("W2S_PEAK_FLOPS", raising=False)
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12  # how an H100 SXM names itself
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H100 NVL") == 835e12  # not the SXM's 989: the NVL variant is matched first
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA L40S") == 362e12
    assert peak_flops("NVIDIA L4") == 121e12
    assert peak_flops("NVIDIA GeForce RTX 4090") == 165e12
    assert peak_flops("cpu") is None and peak_flops("Some Future GPU") is None
    monkeypatch.setenv("W2S_PEAK_FLOPS", "1e12")
    assert peak_flops("Some Future GPU") == 1e12
    monkeypatch.setenv("W2S_PEAK_FLOPS", "fast")
    with pytest.raises(ValueError, match="W2S_PEAK_FLOPS='fast'"):
        peak_flops("x")

    # 10k tok/s x 6e9 FLOPs/token = 6e13 FLOP/s: 6e13 / 989e12 of one H100, half that on two.
    assert mfu(10_000, 6e9, 989e12) == pytest.approx(6e13 / 989e12)
    assert mfu(10_000, 6e9, 989e12, n_devices=2) == pytest.approx(3e13 / 989e12)
    assert mfu(10_000, 6e9, None) is None


def test_fmt_log_line():
    line = fmt_log_line(step=12, total_steps=500, loss=1.23456, lr=2e-5, dt=0.1234, tok_s=12345.6, mfu=0.4123,
                        mem=12.34)
    assert line == "step 12/500 | loss 1.2346 | lr 2.00e-05 | dt 0.1234 | tok/s 12,346 | mfu 41.2% | mem 12.3GiB"
    assert fmt_log_line(step=3, loss=0.5, tok_s=100.0, mfu=None) == "step 3 | loss 0.5000 | tok/s 100 | mfu -"
    assert fmt_log_line() == "mfu -"
    assert fmt_log_line(mfu=float("nan")) == "mfu -"  # an MFU that could not be computed, never "mfu nan%"
    assert fmt_log_line(loss=torch.tensor(2.0), n_pairs=8, grad_norm=None) == "loss 2.0000 | n_pairs 8 | mfu -"


def test_stage_profiler_counts_and_skips_warmup():
    cfg = tiny_cfg()
    prof = StageProfiler(cfg, mode="training", seq_len=8, warmup_steps=2, device="cpu")
    with prof:
        for i in range(6):
            time.sleep(0.3 if i < 2 else 0.02)  # two slow warm-up steps
            prof.step(tokens=100, sync=i % 2 == 1)  # windows close at steps 2 (end of warm-up), 4 and 6
    summary = prof.summary()
    assert summary["steps"] == 6 and summary["tokens"] == 600
    assert summary["flops_per_token"] == flops_per_token(cfg, seq_len=8)
    assert summary["device"] == "cpu" and summary["mfu"] is None and summary["cuda_peak_gib"] is None
    assert summary["host_peak_rss_gib"] > 0.01
    # Overall rate includes warm-up; the median (windows of 2 steps x 100 tokens in ~0.04 s) does not.
    assert summary["wall_s"] >= 0.6 + 4 * 0.02
    assert summary["tok_s"] == pytest.approx(600 / summary["wall_s"])
    assert 200 / 0.3 < summary["tok_s_median"] <= 200 / 0.04
    assert 0.02 <= summary["step_s_median"] < 0.15
    assert len(prof._windows) == 2
    json.dumps(summary)  # meta.json-ready
    assert fmt_log_line(step=5, **prof.window_metrics()).startswith("step 5 | tok/s ")


def test_reset_host_peak_rss_restarts_the_high_water_mark():
    """Linux: after a 256 MiB buffer is freed, a reset brings the peak back down to what the process holds now."""
    if not profile.reset_host_peak_rss():
        pytest.skip("no /proc/self/clear_refs (not Linux)")
    buffer = torch.ones(64 * 2**20)  # 256 MiB of fp32, every page touched
    with_buffer = profile.host_peak_rss_bytes()
    del buffer
    assert profile.reset_host_peak_rss()
    assert profile.host_peak_rss_bytes() < with_buffer - 128 * 2**20


class FakeClock:
    """time.perf_counter under test control: every reading is the value last set."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_stage_profiler_with_given_flops_windows_and_cost(monkeypatch):
    """The training loop's use: exact FLOPs per step, a window per log interval, callback time between windows left
    out of tokens/s but not out of the totals. Every value by hand on a fake clock and a 1e6 FLOP/s peak."""
    clock = FakeClock()
    monkeypatch.setattr(profile.time, "perf_counter", clock)
    monkeypatch.setenv("W2S_PEAK_FLOPS", "1e6")  # applies on CPU too
    prof = StageProfiler(name="train", device="cpu", n_devices=2, warmup_steps=0, reset_peak_memory=False)
    assert prof.last_window() is None
    with prof:  # enters at t = 0
        clock.now = 1.0
        prof.step(tokens=100, flops=1e6, sync=False)
        clock.now = 2.0
        prof.step(tokens=50, flops=5e5, sync=True)  # window 1: 150 tokens, 1.5e6 FLOPs in 2 s
        assert prof.last_window() == {"seconds": 2.0, "tokens": 150, "flops": 1.5e6, "steps": 2, "tok_s": 75.0,
                                      "mfu": 1.5e6 / 2.0 / (1e6 * 2)}
        clock.now = 5.0  # 3 s of logging and checkpointing
        prof.restart_window()
        clock.now = 6.0
        prof.step(tokens=10, flops=2e5, sync=True)  # window 2: 1 s, not 4
        window = prof.window_metrics()
        assert (window["tok_s"], window["mfu"]) == (10.0, 2e5 / 1.0 / 2e6)
        assert window["mem"] == profile.host_peak_rss_bytes() / GiB  # CPU: the process's peak resident memory
        clock.now = 7.0
        prof.step(tokens=5, flops=1e5, sync=False)
        prof.restart_window()  # a step ran since the last window closed: nothing to restart
        clock.now = 8.0
        prof.step(tokens=5, flops=1e5, sync=True)
        assert prof.last_window()["seconds"] == 2.0
        clock.now = 10.0
    cost = prof.cost()  # the whole block: 170 tokens, 1.9e6 FLOPs in 10 s
    assert {k: cost[k] for k in ("tokens", "tok_s", "mfu", "wall_s", "device")} == {
        "tokens": 170, "tok_s": 17.0, "mfu": 1.9e6 / 10.0 / 2e6, "wall_s": 10.0, "device": "cpu"}
    assert cost["peak_mem_gib"] > 0.01
    summary = prof.summary()
    assert summary["steps"] == 5 and summary["flops_per_token"] == 1.9e6 / 170
    assert summary["tok_s_median"] == 10.0  # the median of windows of 75, 10 and 5 tok/s
    assert summary["step_s_median"] == 1.0  # windows of 2 s / 2 steps, 1 s / 1 step, 2 s / 2 steps: per step

    with StageProfiler(device="cpu", warmup_steps=0) as uncounted:  # no cfg and no FLOPs given: no MFU, not 0
        clock.now = 10.5
        uncounted.step(tokens=4)
    assert uncounted.cost()["mfu"] is None and uncounted.last_window()["mfu"] is None

    monkeypatch.delenv("W2S_PEAK_FLOPS")
    with StageProfiler(device="cpu", warmup_steps=0) as cpu:
        clock.now = 11.0
        cpu.step(tokens=4, flops=8.0)
    assert cpu.cost()["mfu"] is None and cpu.window_metrics()["mfu"] is None  # no peak known for a CPU


def test_the_step_ending_warm_up_closes_a_window_without_a_sync_request(monkeypatch):
    """A loop that logs (syncs) only every k steps still keeps warm-up out of every window."""
    clock = FakeClock()
    monkeypatch.setattr(profile.time, "perf_counter", clock)
    with StageProfiler(device="cpu", warmup_steps=2) as prof:
        for now, sync in ((10.0, False), (20.0, False), (21.0, False), (22.0, True)):  # two slow warm-up steps
            clock.now = now
            prof.step(tokens=10, sync=sync)
    assert prof.last_window()["seconds"] == 2.0 and prof.last_window()["tokens"] == 20
    assert prof.summary()["tok_s_median"] == 10.0


def test_stage_profiler_add_tokens_and_bad_mode():
    with StageProfiler(n_params=1000, mode="inference", device="cpu") as prof:
        prof.add_tokens(50)
        prof.add_tokens(10)
        with pytest.raises(ValueError, match="attention term needs n_layers"):
            prof.add_tokens(10, seq_len=4)
    assert prof.tokens == 70 and prof.flops == 60 * 2000
    with pytest.raises(ValueError, match="mode 'eval'"):
        StageProfiler(mode="eval")


def test_trace_written_when_enabled(tmp_path, monkeypatch):
    monkeypatch.setenv("W2S_PROFILE", "1")
    monkeypatch.setenv("W2S_PROFILE_DIR", str(tmp_path / "whole"))
    with StageProfiler(name="demo", device="cpu") as prof:
        torch.randn(64, 64) @ torch.randn(64, 64)
    trace = json.loads(prof.trace_path.read_text())
    assert prof.trace_path.parent == tmp_path / "whole" and "aten::mm" in {e.get("name") for e in trace["traceEvents"]}
    assert prof.summary()["trace"] == str(prof.trace_path)

    # trace_steps: only steps after warm-up are recorded.
    with StageProfiler(name="steps", device="cpu", warmup_steps=2, trace_steps=2, trace_dir=tmp_path / "s") as prof:
        for i in range(6):
            with torch.profiler.record_function(f"step{i}"):
                torch.randn(8, 8) @ torch.randn(8, 8)
            prof.step(tokens=1)
    names = {e.get("name") for e in json.loads(prof.trace_path.read_text())["traceEvents"]}
    assert {"step2", "step3"} <= names and not names & {"step0", "step1", "step4", "step5"}

    # A profiler inside a tracing one (a training run inside a traced stage) leaves the trace to the outer one.
    with StageProfiler(name="outer", device="cpu", trace_dir=tmp_path / "outer") as outer:
        with StageProfiler(name="inner", device="cpu", trace_dir=tmp_path / "inner") as inner:
            torch.randn(8, 8) @ torch.randn(8, 8)
        assert inner.trace_path is None and not (tmp_path / "inner").exists()
    assert outer.trace_path.parent == tmp_path / "outer"
    assert "aten::mm" in {e.get("name") for e in json.loads(outer.trace_path.read_text())["traceEvents"]}

    monkeypatch.setenv("W2S_PROFILE", "0")
    with StageProfiler(device="cpu", trace_dir=tmp_path / "off") as prof:
        pass
    assert prof.trace_path is None and not (tmp_path / "off").exists()


# Kernel names as a CUDA torch.profiler trace shows them (cuBLAS, torch's own kernels, NCCL, FSDP2's copy-in and
# w2s's Triton kernels), each with the group a reader of the profile would put it in.
CUDA_KERNEL_NAMES = {
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k_off_kernel"
    "__5x_cublas": "matmul",
    "nvjet_tst_128x256_64x4_2x1_v_bz_coopB_TNT": "matmul",
    "_attn_bwd_dkdv_kernel": "attention",
    "_attn_decode_kernel": "attention",
    "_merge_splits_kernel": "attention",
    "_rms_norm_bwd_kernel": "norm, rope, glu",
    "_glu_fwd_kernel": "norm, rope, glu",
    "_rope_cache_kernel": "norm, rope, glu",
    "_rows_nll_kernel": "fused cross-entropy rows",
    "_sample_kernel": "sampling draw",
    "_matvec_kernel": "matmul",
    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
    "TensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMathFunctor<float, 4, (at::native::ADAM_MODE)1,"
    " false>, double*, double, double, double, double, double, double, bool*, float*>": "optimizer, clipping",
    "void at::native::multi_tensor_apply_kernel<at::native::TensorListMetadata<1>, at::native::(anonymous namespace)"
    "::LpNormFunctor<float, (at::native::(anonymous namespace)::NormType)1, float, float>, float*, int>":
        "optimizer, clipping",
    "ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)": "communication",
    "ncclDevKernel_ReduceScatter_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)": "communication",
    "void at::native::(anonymous namespace)::chunk_cat_cuda_kernel<float, c10::BFloat16>(...)": "copies, casts",
    "Memcpy HtoD (Pageable -> Device)": "copies, casts",
    "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::direct_copy_kernel_cuda"
    "(at::TensorIteratorBase&)::{lambda()#3}::operator()() const::{lambda(float)#1}>(...)": "copies, casts",
    "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>, ...>":
        profile.OTHER_GROUP,
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t<...>>>(...)":
        profile.OTHER_GROUP,
    "aten::mm": "matmul",  # CPU profiles name ops, not kernels
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "aten::mul": profile.OTHER_GROUP,
}


@pytest.mark.parametrize("name", CUDA_KERNEL_NAMES)
def test_kernel_group_puts_each_kernel_where_a_reader_would(name):
    assert profile.kernel_group(name) == CUDA_KERNEL_NAMES[name]


class FakeEvent:  # a key_averages() row: the fields time_by_group and profile_summary read
    def __init__(self, key, us, count):
        self.key, self.self_cpu_time_total, self.count, self.is_user_annotation = key, us, count, False


def test_time_by_group_sums_each_group_most_time_first():
    rows = [FakeEvent("aten::mm", 300.0, 3), FakeEvent("aten::addmm", 100.0, 1), FakeEvent("aten::mul", 50.0, 5),
            FakeEvent("aten::add", 70.0, 7), FakeEvent("_rms_norm_fwd_kernel", 200.0, 2)]
    assert profile.time_by_group(rows, "self_cpu_time_total") == [
        ("matmul", 400.0, 4), ("norm, rope, glu", 200.0, 2), (profile.OTHER_GROUP, 120.0, 12)]


def test_profile_summary_of_a_real_cpu_profile_is_per_step_and_adds_up():
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    a, b = torch.randn(64, 64), torch.randn(64, 64)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(4):
            with torch.profiler.record_function("a user region"):
                torch.nn.functional.silu(a @ b) * b
    text = profile.profile_summary(prof, torch.device("cpu"), per=4, per_name="step", wall_s=1.0)
    lines = text.splitlines()
    assert lines[0].startswith("CPU time per step:") and "of 250.00 ms wall" in lines[0]
    rows, key = profile.counted_events(prof, torch.device("cpu"))
    assert "a user region" not in {e.key for e in rows}  # its time is its ops' time: never counted twice
    busy_ms = sum(getattr(e, key) for e in rows) / 1e3 / 4
    assert f"{busy_ms:.2f} ms busy" in lines[0]
    table = lines[2:lines.index("")]
    groups = {line[:32].strip(): line[32:].split() for line in table}
    assert groups["matmul"][2] == "2"  # per step: aten::matmul and the aten::mm it calls
    assert abs(sum(float(ms) for ms, _, _ in groups.values()) - busy_ms) < 0.01 * len(groups) + 1e-6
    assert abs(sum(float(share.rstrip("%")) for _, share, _ in groups.values()) - 100) < 0.1 * len(groups)
