"""The benchmark scripts still run end to end (tiny shapes, one repeat). They measure speed and memory; these tests
only check that every mode runs and prints its result line, never a number (performance goals live in BENCHMARKS.md),
and that every command line of scripts/gpu_check.sh is one its script accepts (a GPU session has no minutes for a
misspelt option).

    python -m pytest -q tests/test_bench_scripts.py
"""

import importlib.util
import os
import re
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


def test_bench_train_profile_says_where_a_step_goes():
    out = run_script("scripts/bench_train.py", "--profile", *TINY_LLAMA, "--steps", "3")
    assert "alone" in out and "speed ratio" not in out  # --profile times w2s alone
    profiled = out.split("profile: 2 steps after 1 warm-up")[1]
    assert "CPU time per step:" in profiled and "\nmatmul " in profiled and "[matmul] aten::mm" in profiled
    assert "medians over the last 1 of 4 steps" in profiled  # the profiled steps stay out of the medians
    dpo = run_script("scripts/bench_train.py", "--dpo", "--profile", *TINY_LLAMA)
    assert "profile: 2 steps after 1 warm-up" in dpo and "median of the last 2 of 3 steps" in dpo  # all profiled
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    refused = subprocess.run([sys.executable, "scripts/bench_train.py", "--profile", "--warmup", "0"], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--profile needs --warmup >= 1" in refused.stderr


def test_bench_sampling_runs_with_a_shared_prefix_and_top_p():
    out = run_script("scripts/bench_sampling.py", "--prompts", "2", "--samples", "2", "--new-tokens", "4",
                     "--prompt-len", "4", "--shared-prefix", "8", "--repeats", "1", "--threads", "1", "--top-p", "0.5")
    assert "after a shared prefix of 8" in out and "top_p 0.5" in out and "speed-up over transformers:" in out
    # the prefix in a forward of its own (1 x 8), the two prompts' 4-token suffixes in one (2 x 4); samples copy rows
    assert "prefill: 2 forwards of 16 token rows for 16 prompt tokens (0.0% padding)" in out


def test_bench_train_without_transformers_times_w2s_alone():
    out = run_script("scripts/bench_train.py", "--no-hf", *TINY_LLAMA)
    assert "alone" in out and "\nw2s " in out
    assert "transformers" not in out.split("alone")[1]  # no transformers rows, no ratio


def test_bench_sampling_profile_lists_the_decode_ops():
    out = run_script("scripts/bench_sampling.py", "--prompts", "2", "--samples", "2", "--new-tokens", "4",
                     "--prompt-len", "4", "--repeats", "1", "--threads", "1", "--no-hf", "--profile")
    batch, batch1 = out.split("profile: eager batch decode (2 x 2)")[1].split("profile: eager batch-1 greedy decode")
    assert "CPU time per step" in batch and "aten::mm" in batch
    assert "CPU time per step" in batch1 and "aten::mm" in batch1


def test_sweep_without_cuda_says_it_needs_one():
    out = run_script("-m", "w2s.kernels.sweep")
    assert "needs a CUDA GPU" in out


def test_sweep_compile_workers_share_out_every_candidate_once_and_time_none(monkeypatch, capsys):
    """Compile workers (--compile-shard I/N) between them run each candidate of a part once, over the part's several
    _time_launches calls, each with the candidate in the table, and time nothing; the timing pass takes them all."""
    import torch

    from w2s.kernels import compile_workers, sweep
    from w2s.kernels.attention_common import Launch

    table = {128: Launch(64, 64, 4, 2)}
    first = [Launch(64, 64, 4, 2), Launch(128, 64, 8, 3), Launch(32, 64, 4, 3), Launch(64, 32, 4, 2)]
    second = [Launch(128, 32, 8, 2), Launch(16, 64, 4, 1), Launch(64, 64, 8, 3)]
    ran = []

    def run(name):
        def fn():
            ran.append((name, table[128]))
            if table[128] == Launch(32, 64, 4, 3):
                raise RuntimeError("out of resource: shared memory")  # a worker goes on to its next candidate
            return torch.ones(2)
        return fn

    def part():
        for candidates in (first, second):
            sweep._time_launches(table, 128, candidates, {"a": run("a"), "b": run("b")}, torch.ones(2),
                                 lambda ms: 1 / ms, 0, 1)

    def no_timing(fn, warmup, repeats):
        raise AssertionError("a compile worker timed a candidate")

    monkeypatch.setattr(sweep, "_median_ms", no_timing)
    shares = []
    for index in range(3):
        monkeypatch.setattr(compile_workers, "SHARD", (index, 3))
        monkeypatch.setattr(compile_workers, "_points_met", 0)
        ran.clear()
        part()
        shares.append([config for name, config in ran if name == "a"])
        assert [config for name, config in ran if name == "b"] == [c for c in shares[-1] if c != Launch(32, 64, 4, 3)]
        assert table[128] == Launch(64, 64, 4, 2)  # the table's own launch back after each candidate
    assert sorted(sum(shares, [])) == sorted(first + second)  # every candidate once, in one worker
    assert all(len(share) in (2, 3) for share in shares)
    assert capsys.readouterr().out == ""  # the timing pass prints the candidates' lines and errors

    monkeypatch.setattr(compile_workers, "SHARD", None)
    monkeypatch.setattr(sweep, "_median_ms", lambda fn, warmup, repeats: 2.0)
    ran.clear()
    part()
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("fastest")]
    assert len(lines) == 2 * len(first + second) - 1  # a line per run; the failing candidate's one error line
    assert sum("n/a: RuntimeError: out of resource" in line for line in lines) == 1
    assert sum(line.endswith("(table)") for line in lines) == 2


def test_sweep_names_the_fastest_candidate_that_agrees_with_the_reference(monkeypatch, capsys):
    """After its lines, each run's fastest candidate among those whose outputs agree with the reference (max relative
    difference under sweep.AGREES), and how much faster than the table's launch it is."""
    import torch

    from w2s.kernels import compile_workers, sweep
    from w2s.kernels.attention_common import Launch

    table = {64: Launch(64, 64, 4, 2)}
    ms = {Launch(64, 64, 4, 2): 2.0, Launch(128, 64, 8, 3): 1.6, Launch(32, 64, 4, 3): 1.0, Launch(64, 32, 4, 2): 1.8}
    wrong = Launch(32, 64, 4, 3)  # the fastest, but its output is off: it must not be named

    def run():
        return torch.ones(4) * (1.5 if table[64] == wrong else 1.0)

    monkeypatch.setattr(compile_workers, "SHARD", None)
    monkeypatch.setattr(sweep, "_median_ms", lambda fn, warmup, repeats: ms[table[64]])
    sweep._time_launches(table, 64, list(ms), {"": run}, torch.ones(4), lambda t: 1 / t, 0, 1)
    assert capsys.readouterr().out.splitlines()[-1] == \
        "fastest: (128, 64, 8, 3, False, 0, False, False) 1.600 ms, 25.0 % faster than the table's 2.000 ms"
    ms[Launch(64, 64, 4, 2)] = 1.5
    sweep._time_launches(table, 64, list(ms), {"own": run, "shared": run}, torch.ones(4), lambda t: 1 / t, 0, 1)
    assert capsys.readouterr().out.splitlines()[-2:] == [
        "fastest own: (64, 64, 4, 2, False, 0, False, False) 1.500 ms (the table's)",
        "fastest shared: (64, 64, 4, 2, False, 0, False, False) 1.500 ms (the table's)"]


def test_sweep_compiles_each_part_in_workers_before_timing_it(tmp_path, monkeypatch, capsys):
    """With --compile-workers N the sweep starts N real worker processes for a part (each `python -m
    w2s.kernels.sweep --only PART --compile-shard I/N`), waits for all of them, and only then times the part; a failing
    worker is reported with its last line. rms_norm and matvec are compiled as they are timed, and so is everything
    with --compile-workers 1."""
    import torch

    from w2s.kernels import compile_workers, sweep

    events = []
    real_popen = subprocess.Popen

    class Recorded(real_popen):
        def __init__(self, command, **kwargs):
            events.append(("start", command[command.index("--only") + 1], command[-1]))
            super().__init__(command, **kwargs)

        def wait(self, timeout=None):
            rc = super().wait(timeout)
            events.append(("done", self.args[-1]))
            return rc

    # a python that fails as worker 1 of 3 and runs every other worker for real (which, with no GPU here, parses its
    # arguments, says so and exits 0)
    shim = tmp_path / "python"
    shim.write_text(f'#!/bin/sh\ncase "$*" in *1/3*) echo "CUDA error: out of memory"; exit 3;; esac\n'
                    f'exec {sys.executable} "$@"\n')
    shim.chmod(0o755)
    monkeypatch.setattr(compile_workers.sys, "executable", str(shim))
    monkeypatch.setattr(compile_workers.subprocess, "Popen", Recorded)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "stand-in")
    monkeypatch.setattr(sweep, "_run_part", lambda part, warmup, repeats: events.append(("time", part)))
    monkeypatch.setattr(compile_workers, "SHARD", None)
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))

    assert sweep.main(["--only", "deferred128,rms_norm,decode128", "--compile-workers", "3"]) == 0
    shards = ["0/3", "1/3", "2/3"]
    assert events[:3] == [("start", "deferred128", s) for s in shards]
    assert sorted(events[3:6]) == [("done", s) for s in shards] and events[6] == ("time", "deferred128")
    assert events[7] == ("time", "rms_norm")
    assert events[8:11] == [("start", "decode128", s) for s in shards] and events[14] == ("time", "decode128")
    out = capsys.readouterr().out
    assert out.count("its candidates: compiled by 3 processes") == 2
    assert out.count("worker 1 exited with 3: CUDA error: out of memory") == 2

    events.clear()
    assert sweep.main(["--only", "deferred128", "--compile-workers", "1"]) == 0
    assert events == [("time", "deferred128")]
    events.clear()
    capsys.readouterr()
    assert sweep.main(["--only", "deferred128", "--compile-shard", "2/3"]) == 0  # a worker starts none itself
    assert events == [("time", "deferred128")] and compile_workers.SHARD == (2, 3)
    assert "device:" not in capsys.readouterr().out


def test_bench_compile_workers_run_each_triton_attention_row_once_and_start_before_anything_is_timed(monkeypatch):
    """bench.py's compile workers share out the attention rows' Triton launches (each forward variant as it is timed,
    without autograd, and the table's forward + backward, for causal and non-causal), run nothing else and time
    nothing; the timing run starts them, with its own arguments and --only attention, before it times anything."""
    import torch

    from w2s.kernels import attention, bench, compile_workers

    calls, untouchable = [], []

    def recorded_attention(q, k, v, q_positions=None):
        calls.append((tuple(attention._GPU_FWD[16]), q_positions is None, torch.is_grad_enabled() and q.requires_grad))
        return (q + k + v) * 1.0

    def no_timing(*args, **kwargs):
        untouchable.append(args)
        raise AssertionError("a compile worker timed or ran a baseline")

    monkeypatch.setattr(attention, "attention", recorded_attention)
    monkeypatch.setattr(attention, "_GPU_FWD", {16: attention.Launch(32, 16, 4, 1)})
    for name in ("median_ms", "copy_gbps"):
        monkeypatch.setattr(bench, name, no_timing)
    monkeypatch.setattr(bench.reference, "attention", no_timing)
    monkeypatch.setattr(bench.F, "scaled_dot_product_attention", no_timing)
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(compile_workers, "SHARD", None)
    tiny = ["--seq-len", "8", "--attn-batch", "1", "--attn-heads", "2", "--head-dim", "16"]
    shares = []
    for index in range(3):
        calls.clear()
        assert bench.main(tiny + ["--only", "attention,rms_norm", "--compile-shard", f"{index}/3"]) == 0
        shares.append(list(calls))
    every = sorted(sum(shares, []))
    table = (32, 16, 4, 1, False, 0, False, False)
    variants = [table, table[:4] + (False,) + table[5:], table[:4] + (True,) + table[5:],
                table[:4] + (True, 1) + table[6:], table[:7] + (True,)]  # triton, -pointers, -tma, -persist, -deferred
    expected = [(launch, causal, False) for launch in variants for causal in (True, False)]
    expected += [(table, causal, True) for causal in (True, False)]  # the backward row's forward, with autograd
    assert every == sorted(expected) and not untouchable
    assert [len(share) for share in shares] == [4, 4, 4]

    started = []
    monkeypatch.setattr(compile_workers, "compile_in_workers",
                        lambda module, argv, workers, what: started.append((module, argv, workers)))

    def stop(*args):
        started.append("timing begins")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.cuda, "get_device_properties", stop)
    try:
        bench.main(tiny + ["--only", "rms_norm,attention", "--compile-workers", "5"])
    except KeyboardInterrupt:
        pass
    argv = tiny + ["--only", "rms_norm,attention", "--compile-workers", "5"]
    assert started == [("w2s.kernels.bench", argv + ["--only", "attention"], 5), "timing begins"]
    started.clear()
    try:
        bench.main(tiny + ["--only", "rms_norm", "--compile-workers", "5"])  # nothing worth sharing out
    except KeyboardInterrupt:
        pass
    assert started == ["timing begins"]


def _stand_in_ptxas(bin_dir, release):
    """bin_dir/ptxas: a program that answers --version as a real ptxas of that release does (None: none there)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "ptxas").unlink(missing_ok=True)
    if release is not None:
        version = f"Cuda compilation tools, release {release}, V{release}.1"
        (bin_dir / "ptxas").write_text(f"#!/bin/sh\necho '{version}'\n")
        (bin_dir / "ptxas").chmod(0o755)
    return bin_dir / "ptxas"


def _gpu_check_ptxas(tmp_path, path_release, cuda_home_release, **env):
    """The ptxas line of scripts/gpu_check.sh's summary, with stand-in ptxas programs of the given releases on PATH
    and in CUDA_HOME. The step name is unknown, so nothing runs but the summary."""
    _stand_in_ptxas(tmp_path / "path" / "bin", path_release)
    _stand_in_ptxas(tmp_path / "cuda" / "bin", cuda_home_release)
    unset = ("TRITON_PTXAS_PATH", "TRITON_PTXAS_BLACKWELL_PATH", "PTXAS")
    env = {**{k: v for k, v in os.environ.items() if k not in unset},
           "PATH": f"{tmp_path / 'path' / 'bin'}:{os.environ['PATH']}", "CUDA_HOME": str(tmp_path / "cuda"),
           "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, **env}
    out = subprocess.run(["bash", "scripts/gpu_check.sh", "no_such_step"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    summary = (tmp_path / "out" / "SUMMARY.md").read_text()
    assert "unknown step no_such_step" in out.stdout
    return next(line for line in summary.splitlines() if line.startswith("ptxas "))


def test_gpu_check_hands_triton_a_newer_ptxas_of_the_machine(tmp_path, monkeypatch):
    """The summary names the ptxas Triton itself resolves for Hopper afterwards, so a choice made through the wrong
    environment variable would show there."""
    from triton.backends.nvidia.compiler import get_ptxas

    for variable in ("TRITON_PTXAS_PATH", "TRITON_PTXAS_BLACKWELL_PATH"):  # Triton reads them at each call
        monkeypatch.delenv(variable, raising=False)
    own = get_ptxas(90).path  # this Triton's own
    own_variable = "TRITON_" + Path(own).name.upper().replace("-", "_") + "_PATH"  # how Triton names it
    assert _gpu_check_ptxas(tmp_path, "99.0", None) == f"ptxas {tmp_path}/path/bin/ptxas, release 99.0"
    assert _gpu_check_ptxas(tmp_path, "1.0", "98.1") == f"ptxas {tmp_path}/cuda/bin/ptxas, release 98.1"
    assert _gpu_check_ptxas(tmp_path, "1.0", None).startswith(f"ptxas {own}, release ")  # older: Triton's own
    assert _gpu_check_ptxas(tmp_path, "99.0", None, PTXAS="triton").startswith(f"ptxas {own}, release ")
    users = _stand_in_ptxas(tmp_path / "user", "50.0")  # a user's own choice is kept
    assert _gpu_check_ptxas(tmp_path, "99.0", None, **{own_variable: str(users)}) == f"ptxas {users}, release 50.0"


def _gpu_check_commands(tmp_path):
    """Every command line scripts/gpu_check.sh runs through $PYTHON, for every step it names (the default run's and
    the named ones), recorded by a stand-in interpreter that runs nothing."""
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    body = script[script.index("run_step() {"):script.index("\n}\n", script.index("run_step() {"))]
    steps = [name for name in re.findall(r"^    (\w+)\)", body, flags=re.M)]
    record = tmp_path / "commands"
    recorder = tmp_path / "python"
    recorder.write_text(f"#!/bin/sh\nprintf '%s\\037' \"$@\" >> '{record}'\nprintf '\\036' >> '{record}'\n")
    recorder.chmod(0o755)
    ncu = tmp_path / "ncu"  # a stand-in profiler: drops its own options and runs the command it profiles
    ncu.write_text(f"#!/bin/sh\nwhile [ \"$1\" != '{recorder}' ]; do shift; done\nexec \"$@\"\n")
    ncu.chmod(0o755)
    env = {**os.environ, "PYTHON": str(recorder), "OUT": str(tmp_path / "out"), "RUNS": str(tmp_path / "runs"),
           "PTXAS": "triton", "NCU": str(ncu)}
    subprocess.run(["bash", "scripts/gpu_check.sh", *steps], cwd=ROOT, env=env, capture_output=True, text=True,
                   timeout=120, check=True)
    commands = [line.split("\037")[:-1] for line in record.read_text().split("\036")[:-1]]  # args may hold newlines
    return steps, commands


def _module_from(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_gpu_check_step_runs_a_command_line_its_script_accepts(tmp_path, monkeypatch):
    """A GPU session has minutes: a misspelt option or step of scripts/gpu_check.sh must fail here, not there.
    Each benchmark command's arguments go through its script's own parser; each pytest command collects tests."""
    from w2s.kernels import bench, sweep

    steps, commands = _gpu_check_commands(tmp_path)
    assert {"test_gpu", "train_llama32_1b", "train_llama32_3b", "dpo_mfu", "bench_attention", "bench_sampling",
            "gsm8k", "sweep", "pipeline", "profile_attention"} <= set(steps)
    scripts = {name: _module_from(ROOT / "scripts" / f"{name}.py") for name in ("bench_train", "bench_sampling")}
    checked = {"bench_train": 0, "bench_sampling": 0, "w2s.kernels.bench": 0, "w2s.kernels.sweep": 0, "pytest": 0}
    for argv in commands:
        if argv[0].startswith("scripts/bench_"):
            name = Path(argv[0]).stem
            monkeypatch.setattr(sys, "argv", argv)
            scripts[name].parse_args()  # exits with status 2 and the parser's message on a bad option
            checked[name] += 1
        elif argv[0] == "-c" and "bench_sampling.py" in argv[1]:  # cascade_off: the same script, run through runpy
            monkeypatch.setattr(sys, "argv", ["bench_sampling.py", *argv[2:]])
            scripts["bench_sampling"].parse_args()
            checked["bench_sampling"] += 1
        elif argv[:2] == ["-m", "w2s.kernels.bench"]:
            bench.parse_args(argv[2:])
            checked["w2s.kernels.bench"] += 1
        elif argv[:2] == ["-m", "w2s.kernels.sweep"]:
            assert sweep.main(argv[2:]) == 0  # no GPU here: parses and checks the parts, then says so
            checked["w2s.kernels.sweep"] += 1
        elif argv[:2] == ["-m", "pytest"]:
            # one process, quiet: -v dropped, and -n with the worker count after it
            selection = [a for i, a in enumerate(argv[2:]) if a not in ("-v", "-n") and argv[1 + i] != "-n"]
            out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *selection], cwd=ROOT,
                                 capture_output=True, text=True, timeout=300)
            assert out.returncode == 0, (argv, out.stdout[-500:])  # 5: nothing selected; 4: a bad option or path
            checked["pytest"] += 1
    assert all(checked.values()), checked  # every kind of command was seen and checked
