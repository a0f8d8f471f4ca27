"""Throughput, MFU, peak memory and the log line: the one meter of every loop and stage, and an opt-in
torch.profiler trace.

    prof = StageProfiler(model.cfg, mode="training", seq_len=2048, name="sft")
    with prof:
        for step in range(n_steps):
            loss = train_step(...)
            log = step % 10 == 0
            prof.step(tokens=n_tokens_this_step, sync=log)   # host sync (and a clock read that means something)
            if log:                                          # only on log steps: no sync in the hot loop
                print(fmt_log_line(step=step, loss=loss.item(), lr=lr, **prof.window_metrics()))
    meta.update(prof.cost())      # tokens, tok_s, mfu, peak_mem_gib, device, wall_s (summary() has the rest)

A caller that counts its FLOPs exactly passes them: `prof.step(tokens=n, flops=f)` (w2s/train.py does, with each
sequence's own length and LoRA's frozen base, from step_flops below); then no cfg is needed. Stages without steps
just do `with StageProfiler(cfg, mode="inference") as prof: ...; prof.add_tokens(n)`.

Honest clocks: CUDA work is asynchronous, so the clock is read only after `torch.cuda.synchronize()` (at enter, exit
and every `step(sync=True)`). Medians are taken over the windows between synced steps, skipping the first
`warmup_steps` steps (compilation, autotuning, allocator growth).

Where the time goes: `profile_summary(torch_profiler, device)` groups a finished torch.profiler run's kernels
(attention, matmul, norms, optimizer, copies, ...) by name (KERNEL_GROUPS); the benchmarks' --profile prints it.

Trace: W2S_PROFILE=1 (or trace=True) records a torch.profiler chrome trace (open in chrome://tracing or
ui.perfetto.dev) into W2S_PROFILE_DIR (default ./profile_traces): the whole `with` block, or, with trace_steps=k
(env W2S_PROFILE_STEPS), k steps right after warm-up. A profiler entered while another one traces (a training run
inside a traced pipeline stage) leaves the trace to the outer one.

Test: python -m pytest -q tests/test_profile.py
"""

import math
import os
import re
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

# Dense (no sparsity) bf16 tensor-core peak FLOP/s per device, from the vendors' data sheets. Matched in order
# against the lowercased device name (torch.cuda.get_device_name), so the specific variants come first; the H100
# SXM reports itself as "NVIDIA H100 80GB HBM3". Unknown devices: set W2S_PEAK_FLOPS (FLOP/s), else MFU is None.
PEAK_BF16_FLOPS = (
    (r"gh200|h200", "H200", 989e12),
    (r"h100.*nvl", "H100 NVL", 835e12),
    (r"h100.*pcie", "H100 PCIe", 756e12),
    (r"h100|h800", "H100 SXM", 989e12),
    (r"b200", "B200", 2250e12),
    (r"a100|a800", "A100", 312e12),
    (r"l40s", "L40S", 362e12),
    (r"\bl40\b", "L40", 181e12),
    (r"\bl4\b", "L4", 121e12),
    (r"rtx 4090", "RTX 4090", 165e12),
    (r"rtx 3090", "RTX 3090", 71e12),
    (r"rtx a6000", "RTX A6000", 155e12),
    (r"mi300x", "MI300X", 1307e12),
)
GiB = 2**30


# ---- device, peak FLOPs, memory ----------------------------------------------------------------------------------
def resolve_device(device=None):
    """torch.device: the given one, else the current CUDA device if there is one, else CPU."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def device_name(device=None):
    device = resolve_device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_flops(name):
    """Peak dense bf16 FLOP/s for a device name; W2S_PEAK_FLOPS overrides; None for CPUs and unknown devices."""
    override = os.environ.get("W2S_PEAK_FLOPS")
    if override:
        try:
            return float(override)
        except ValueError:
            raise ValueError(f"W2S_PEAK_FLOPS={override!r}: expected a number of FLOP/s such as 989e12") from None
    lowered = name.lower()
    for pattern, _, flops in PEAK_BF16_FLOPS:
        if re.search(pattern, lowered):
            return flops
    return None


def mfu(tokens_per_s, flops_per_token, peak, n_devices=1):
    """Model FLOPs utilization: achieved model FLOP/s over the peak of n_devices; None when the peak is unknown."""
    if peak is None or tokens_per_s is None or flops_per_token is None:
        return None
    return tokens_per_s * flops_per_token / (peak * n_devices)


def host_peak_rss_bytes():
    """Peak resident memory of this process since it started, or since reset_host_peak_rss() on Linux."""
    try:  # Linux: the resettable high-water mark (VmHWM, in KiB)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # cannot be reset
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def reset_host_peak_rss():
    """Linux: restart the peak-RSS high-water mark at the current RSS (-> True); elsewhere a no-op (-> False)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory_gib(device):
    """Peak allocated CUDA memory of `device` since the last reset_peak_memory, else (CPU) the process's peak
    resident host memory, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GiB
    return host_peak_rss_bytes() / GiB


def reset_peak_memory(device):
    """Restart the CUDA peak-memory counter of `device` (a no-op on CPU, whose peak RSS covers the whole process)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- model FLOPs ----------------------------------------------------------------------------------------------------
def flops_per_token(cfg=None, seq_len=None, training=True, *, n_params=None, n_layers=None, n_heads=None,
                    head_dim=None, windows=None):
    """Model FLOPs for one token at context length seq_len (the convention of PaLM's MFU, also torchtitan's):

        training:   6 * N + 12 * L * H * D * T        inference (forward only): 2 * N + 4 * L * H * D * T

    N: parameters that take part in a matrix multiply, i.e. every parameter but the input embedding table (a lookup),
       with the output projection counted even when it is tied to the embeddings. A weight does one multiply-add
       (2 FLOPs) per token forward; backward costs twice the forward (gradients of inputs and of weights): 6N.
    4 * H * D * T per layer forward: each of the H query heads scores T keys (T dot products of length D, 2*D*T FLOPs)
       and sums T values (2*D*T). T is the full context, not halved for the causal mask, as in PaLM and torchtitan,
       so MFU numbers compare with theirs; a sliding-window layer uses min(T, window). For decoding with a KV cache,
       T is the current cache length. seq_len None or 0 leaves the attention term out.

    Give either a ModelConfig `cfg` (w2s.config) or n_params, n_layers, n_heads, head_dim (and optionally `windows`,
    one sliding window or None per layer).
    """
    if cfg is not None:
        n_params = cfg.n_params(embeddings=False) + cfg.vocab_size * cfg.dim  # + output projection
        n_layers, n_heads, head_dim = cfg.n_layers, cfg.n_heads, cfg.head_dim
        windows = [cfg.layer_window(i) for i in range(n_layers)]
    if n_params is None:
        raise ValueError("flops_per_token: give a ModelConfig or n_params (with n_layers, n_heads, head_dim)")
    attention = 0
    if seq_len:
        if None in (n_layers, n_heads, head_dim):
            raise ValueError("flops_per_token: the attention term needs n_layers, n_heads and head_dim")
        windows = windows if windows is not None else [None] * n_layers
        if len(windows) != n_layers:
            raise ValueError(f"flops_per_token: {len(windows)} windows for {n_layers} layers")
        context = sum(seq_len if w is None else min(seq_len, w) for w in windows)  # sum over layers of T_eff
        attention = 4 * n_heads * head_dim * context
    forward = 2 * n_params + attention
    return 3 * forward if training else forward


# ---- the standard log line ---------------------------------------------------------------------------------------
def _fmt_value(value):
    if isinstance(value, bool) or isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def fmt_log_line(step=None, loss=None, lr=None, tok_s=None, mfu=None, mem=None, total_steps=None, **extra):
    """The one log line of every loop and stage, fields in a fixed order, absent ones left out; MFU is always
    shown and is "-" where unknown (CPU). mem is in GiB; extra fields (dt=0.12, grad_norm=1.3) go before tok/s.

        step 12/500 | loss 1.2346 | lr 2.00e-05 | dt 0.12 | tok/s 12,345 | mfu 41.2% | mem 12.3GiB
    """
    parts = []
    if step is not None:
        parts.append(f"step {step}" + (f"/{total_steps}" if total_steps is not None else ""))
    if loss is not None:
        parts.append(f"loss {float(loss):.4f}")
    if lr is not None:
        parts.append(f"lr {float(lr):.2e}")
    parts.extend(f"{key} {_fmt_value(value)}" for key, value in extra.items() if value is not None)
    if tok_s is not None:
        parts.append(f"tok/s {tok_s:,.0f}")
    parts.append("mfu -" if mfu is None or (isinstance(mfu, float) and math.isnan(mfu)) else f"mfu {100 * mfu:.1f}%")
    if mem is not None:
        parts.append(f"mem {mem:.1f}GiB")
    return " | ".join(parts)


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


class StageProfiler:
    """Wall time, tokens, tokens/s (overall and median over post-warm-up windows), FLOPs, MFU, peak memory and an
    optional trace for one stage or loop. See the module docstring for use.

    cfg: a ModelConfig, or None (then pass n_params= etc. through flops_kwargs, or FLOPs to step/add_tokens, or get
    no FLOPs/MFU). mode: "training" (6N + ...) or "inference" (2N + ...). seq_len: context length T for the attention
    term. n_devices: how many devices the counted tokens ran on (tokens summed over ranks -> n_devices = world size).
    warmup_steps: steps whose windows the medians skip (0: every window counts, and window_metrics has one from the
    first synced step on). reset_peak_memory=False keeps the CUDA peak counting from an earlier reset_peak_memory
    (the training loop resets it before its setup, and times only its steps).
    """

    _tracing = None  # the profiler whose trace is recording: a nested one leaves the trace to it

    def __init__(self, cfg=None, mode="training", seq_len=None, name="stage", device=None, warmup_steps=1,
                 n_devices=1, trace=None, trace_dir=None, trace_steps=None, reset_peak_memory=True, **flops_kwargs):
        if mode not in ("training", "inference"):
            raise ValueError(f"StageProfiler mode {mode!r}: expected 'training' or 'inference'")
        self.name, self.mode, self.seq_len = name, mode, seq_len
        self.device = resolve_device(device)
        self.device_name = device_name(self.device)
        self.peak_flops = peak_flops(self.device_name)  # None on CPU unless W2S_PEAK_FLOPS is set
        self.n_devices = n_devices
        self.warmup_steps = warmup_steps
        self._reset_memory = reset_peak_memory
        self._flops_args = (cfg, flops_kwargs)
        self.flops_per_token = self._flops(seq_len) if cfg is not None or flops_kwargs else None
        self._counts_flops = self.flops_per_token is not None  # else only once a caller passes flops

        self.trace = _env_flag("W2S_PROFILE") if trace is None else bool(trace)
        self.trace_dir = Path(trace_dir or os.environ.get("W2S_PROFILE_DIR", "profile_traces"))
        env_steps = os.environ.get("W2S_PROFILE_STEPS")
        self.trace_steps = trace_steps if trace_steps is not None else (int(env_steps) if env_steps else None)
        self.trace_path = None
        self._torch_profiler = None

        self.tokens = 0
        self.flops = 0.0
        self.steps = 0
        self.wall_s = None
        self._start = None
        self._windows = []  # (seconds, tokens, flops, steps) between consecutive synced steps after warm-up
        self._window = [0, 0.0, 0]  # tokens, flops, steps since the last synced step

    def _flops(self, seq_len):
        cfg, kwargs = self._flops_args
        return flops_per_token(cfg, seq_len=seq_len, training=self.mode == "training", **kwargs)

    # -- context -------------------------------------------------------------------------------------------------
    def __enter__(self):
        if self._reset_memory:
            reset_peak_memory(self.device)
        if self.trace and StageProfiler._tracing is None:
            self._start_trace()
        _sync(self.device)
        self._start = self._last_sync = time.perf_counter()
        return self

    def __exit__(self, *exc):
        _sync(self.device)
        self.wall_s = time.perf_counter() - self._start
        if self._torch_profiler is not None:
            self._torch_profiler.stop()  # a schedule still in its active steps writes its trace here
            if self.trace_steps is None:
                self._export_trace(self._torch_profiler)
            self._torch_profiler = None
            StageProfiler._tracing = None
        return False

    # -- trace ---------------------------------------------------------------------------------------------------
    def _start_trace(self):
        from torch.profiler import ProfilerActivity, profile, schedule

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        kwargs = {}
        if self.trace_steps is not None:  # skip warm-up, one step of profiler warm-up, then record trace_steps steps
            kwargs["schedule"] = schedule(wait=max(self.warmup_steps - 1, 0), warmup=1, active=self.trace_steps,
                                          repeat=1)
            kwargs["on_trace_ready"] = self._export_trace
        self._torch_profiler = profile(activities=activities, record_shapes=True, **kwargs)
        self._torch_profiler.start()
        StageProfiler._tracing = self

    def _export_trace(self, torch_profiler):
        from w2s.parallel import rank

        self.trace_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.trace_path = self.trace_dir / f"{self.name}-rank{rank()}-{stamp}.json"
        torch_profiler.export_chrome_trace(str(self.trace_path))

    # -- counting ------------------------------------------------------------------------------------------------
    def add_tokens(self, n, seq_len=None, flops=None):
        """Count n processed tokens and their model FLOPs: `flops` when given (the caller's exact count), else n times
        the per-token FLOPs at seq_len (default the profiler's seq_len)."""
        self.tokens += n
        if flops is None:
            fpt = self.flops_per_token if seq_len is None else self._flops(seq_len)
            flops = n * fpt if fpt is not None else 0.0
        else:
            self._counts_flops = True
        self.flops += flops
        self._window[0] += n
        self._window[1] += flops

    def step(self, tokens=0, seq_len=None, sync=True, flops=None):
        """End of one step that processed `tokens` tokens (of `flops` model FLOPs, if the caller counts them; see
        add_tokens). sync=True (only on log steps in a hot loop) synchronizes and closes a timing window; the step that
        ends warm-up always syncs, so windows never include warm-up."""
        self.add_tokens(tokens, seq_len, flops)
        self.steps += 1
        self._window[2] += 1
        if self._torch_profiler is not None and self.trace_steps is not None:
            self._torch_profiler.step()
        if sync or self.steps == self.warmup_steps:
            _sync(self.device)
            now = time.perf_counter()
            if self.steps > self.warmup_steps:
                self._windows.append((now - self._last_sync, *self._window))
            self._last_sync = now
            self._window = [0, 0.0, 0]

    def restart_window(self):
        """Start the next timing window now, if no step has run since the last window closed: time spent between
        steps right after a log line (writing it, a callback, a checkpoint save) stays out of tokens/s. The totals
        (summary, cost) still count it."""
        if self._window[2] == 0:
            self._last_sync = time.perf_counter()

    # -- results -------------------------------------------------------------------------------------------------
    def _rate(self, seconds, tokens, flops, steps=None):
        """(tokens/s, MFU) over `seconds`; MFU is None without a peak or a FLOPs count."""
        if not seconds or seconds <= 0:
            return None, None
        tok_s = tokens / seconds
        fpt = flops / max(tokens, 1) if self._counts_flops else None
        return tok_s, mfu(tok_s, fpt, self.peak_flops, self.n_devices)

    def peak_memory(self):
        """{'cuda_peak_gib': max allocated since the last reset (enter, unless reset_peak_memory=False; None on CPU),
        'cuda_reserved_gib', 'host_peak_rss_gib'}."""
        cuda = self.device.type == "cuda"
        return {
            "cuda_peak_gib": torch.cuda.max_memory_allocated(self.device) / GiB if cuda else None,
            "cuda_reserved_gib": torch.cuda.max_memory_reserved(self.device) / GiB if cuda else None,
            "host_peak_rss_gib": host_peak_rss_bytes() / GiB,
        }

    def last_window(self):
        """The last timing window after warm-up: {"seconds", "tokens", "flops", "steps", "tok_s", "mfu"}, or None."""
        if not self._windows:
            return None
        seconds, tokens, flops, steps = self._windows[-1]
        tok_s, utilization = self._rate(seconds, tokens, flops)
        return {"seconds": seconds, "tokens": tokens, "flops": flops, "steps": steps, "tok_s": tok_s,
                "mfu": utilization}

    def window_metrics(self):
        """tok_s, mfu and mem (peak_memory_gib) of the last timing window, as keyword arguments for fmt_log_line."""
        window = self.last_window() or {"tok_s": None, "mfu": None}
        return {"tok_s": window["tok_s"], "mfu": window["mfu"], "mem": peak_memory_gib(self.device)}

    def cost(self):
        """What a stage records about its cost: tokens, tok_s, mfu and wall_s over the whole `with` block so far,
        peak_mem_gib (peak_memory_gib) and the device name."""
        s = self.summary()
        return {"tokens": s["tokens"], "tok_s": s["tok_s"], "mfu": s["mfu"],
                "peak_mem_gib": peak_memory_gib(self.device), "device": s["device"], "wall_s": s["wall_s"]}

    def summary(self):
        """Everything meta.json records about the run of this stage (plain JSON types)."""
        if self._start is None:
            raise RuntimeError("StageProfiler.summary() before the profiler was entered (use `with prof:`)")
        elapsed = self.wall_s if self.wall_s is not None else time.perf_counter() - self._start
        tok_s, utilization = self._rate(elapsed, self.tokens, self.flops)
        median_tok_s = median_mfu = median_step_s = None
        if self._windows:
            # Each window's rate, then the median: robust to one slow step (a checkpoint save, a GC pause).
            rates = [self._rate(*w) for w in self._windows]
            tok_s_values = [r[0] for r in rates if r[0] is not None]  # a window of 0 s (a coarse clock) has none
            median_tok_s = statistics.median(tok_s_values) if tok_s_values else None
            mfus = [r[1] for r in rates if r[1] is not None]
            median_mfu = statistics.median(mfus) if mfus else None
            median_step_s = statistics.median(seconds / steps for seconds, _, _, steps in self._windows)
        result = {
            "name": self.name,
            "mode": self.mode,
            "device": self.device_name,
            "n_devices": self.n_devices,
            "wall_s": elapsed,
            "steps": self.steps,
            "warmup_steps": self.warmup_steps,
            "tokens": self.tokens,
            "tok_s": tok_s,
            "tok_s_median": median_tok_s,
            "step_s_median": median_step_s,
            "flops_per_token": self.flops_per_token if self.flops_per_token is not None else (
                self.flops / self.tokens if self._counts_flops and self.tokens else None),  # given FLOPs: the mean
            "peak_flops": self.peak_flops,
            "mfu": utilization,
            "mfu_median": median_mfu,
            **self.peak_memory(),
        }
        if self.trace_path is not None:
            result["trace"] = str(self.trace_path)
        return result


# ---- where a profiled run's time goes ---------------------------------------------------------------------------
# Each profiled kernel (CUDA) or op (CPU) falls in the first group whose pattern its lowercased name matches; the rest
# are "other elementwise, reductions" (torch's own adds, casts of single tensors, reductions). The Triton kernels of
# w2s/kernels/*.py are named after their op (_attn_*, _rms_norm_*, _rope_*, _glu_*, _rows_nll_*, _sample_*, _matvec_*);
# cuBLAS names its GEMMs gemm / nvjet / xmma; FSDP2 packs parameters for the all-gather with chunk_cat and unpacks with
# split_with_sizes_copy.
KERNEL_GROUPS = (
    ("attention", r"_attn_|_merge_splits|flash|fmha|scaled_dot_product"),
    ("fused cross-entropy rows", r"_rows_nll"),
    ("norm, rope, glu", r"_rms_norm|_rope|_glu|rms_norm|\bsilu|\bgelu"),
    ("sampling draw", r"_sample_kernel|_uniforms"),
    ("matmul", r"_matvec|gemm|nvjet|xmma|cutlass|cublas|aten::(mm|addmm|bmm|baddbmm|matmul)$"),
    ("optimizer, clipping", r"adam|multi_tensor_apply|_foreach_"),
    ("communication", r"nccl|all_gather|reduce_scatter|all_reduce|allreduce|broadcast"),
    ("copies, casts", r"memcpy|memset|copy|chunk_cat|split_with_sizes|aten::(cat|_to_copy|clone)$"),
)
OTHER_GROUP = "other elementwise, reductions"


def kernel_group(name):
    """The KERNEL_GROUPS group of a kernel or op name, else OTHER_GROUP."""
    lowered = name.lower()
    return next((group for group, pattern in KERNEL_GROUPS if re.search(pattern, lowered)), OTHER_GROUP)


def counted_events(torch_profiler, device):
    """(rows, time key) of a finished torch.profiler run's key_averages(): on CUDA the kernels and device copies
    only (an op's row, aten::mm, also carries the time of the kernels it launched), timed by their device time; on
    CPU every op, timed by its own CPU time (a parent op's children are not in its self time)."""
    from torch.autograd import DeviceType

    events = torch_profiler.key_averages()
    if device.type == "cuda":
        rows = [e for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
        return rows, "self_device_time_total"
    return [e for e in events if not e.is_user_annotation], "self_cpu_time_total"


def time_by_group(rows, key):
    """[(group, microseconds, launches)] of counted_events' rows, the most time first."""
    totals = {}
    for event in rows:
        group = totals.setdefault(kernel_group(event.key), [0.0, 0])
        group[0] += getattr(event, key)
        group[1] += event.count
    return sorted(((g, us, n) for g, (us, n) in totals.items()), key=lambda row: -row[1])


def profile_summary(torch_profiler, device, per=1, per_name="step", wall_s=None, top=15):
    """A finished torch.profiler run as text: time and launches per group (time_by_group) and the `top` kernels
    (CUDA) or ops (CPU), each per one of `per` repetitions (steps, tokens) of what was profiled. wall_s: the
    profiled part's wall time, printed beside the busy time (what the device was idle for: launch gaps, host syncs;
    kernels on two streams can also overlap)."""
    rows, key = counted_events(torch_profiler, device)
    where = "device" if device.type == "cuda" else "CPU"
    busy_us = sum(getattr(e, key) for e in rows)
    lines = [f"{where} time per {per_name}: {busy_us / 1e3 / per:.2f} ms busy"
             + (f" of {wall_s * 1e3 / per:.2f} ms wall" if wall_s else "")
             + f", {sum(e.count for e in rows) / per:.0f} {'launches' if device.type == 'cuda' else 'op calls'}",
             f"{'group':<32}{'ms':>10}{'share':>8}{'count':>9}"]
    for group, us, count in time_by_group(rows, key):
        lines.append(f"{group:<32}{us / 1e3 / per:>10.2f}{100 * us / max(busy_us, 1e-9):>7.1f}%{count / per:>9.0f}")
    lines.append(f"\ntop {top} {'kernels' if device.type == 'cuda' else 'ops'} (per {per_name}):")
    for event in sorted(rows, key=lambda e: -getattr(e, key))[:top]:
        us = getattr(event, key)
        name = event.key if len(event.key) <= 90 else event.key[:87] + "..."
        lines.append(f"{us / 1e3 / per:>9.3f} ms {100 * us / max(busy_us, 1e-9):>5.1f}% {event.count / per:>6.0f}x  "
                     f"[{kernel_group(event.key)}] {name}")
    return "\n".join(lines)


def step_flops(model_cfg, seqs, lora):
    """Model FLOPs of one training step over seqs = [(input length L, target tokens)], in flops_per_token's convention.

    Every token of a length-L sequence costs flops_per_token(cfg, L) = 6 N + 12 * layers * H * hd * L (forward 2 N,
    backward 4 N; attention over the full context). With a frozen LoRA base there are no weight gradients, so the
    backward skips 2 N per token: we subtract one forward's worth of matmuls (flops_per_token at inference, no
    attention term = exactly 2 N). A token without a target (prompt) never reaches the output layer (TrainModule),
    so it costs the output layer's share of that less: 6 V D, or 4 V D under LoRA (the output layer gets no LoRA,
    so it too is frozen). Activation recompute is not counted (it is overhead, not model FLOPs).
    """
    frozen = flops_per_token(model_cfg, seq_len=None, training=False) if lora else 0
    output_layer = (4 if lora else 6) * model_cfg.vocab_size * model_cfg.dim  # per token
    return sum(L * (flops_per_token(model_cfg, seq_len=L) - frozen) - (L - n_targets) * output_layer
               for L, n_targets in seqs)
