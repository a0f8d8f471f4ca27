"""Triton compiles in parallel for the GPU benchmarks (sweep.py, bench.py) and the sm_90a compile check
(compile_check.py). Triton compiles a kernel on one CPU core, and a sweep or a benchmark of many launch variants spends
most of its time there, with the GPU idle.

A run given --compile-workers N > 1 first starts N copies of itself, each with --compile-shard I/N. Copy I takes the
compile points I, I + N, I + 2N, ... of the run (counted in the order the run meets them: the same in every copy), runs
each once, times nothing and exits. Triton writes what it compiled to its on-disk cache. When every copy has ended, the
run itself times everything, alone on the GPU, and loads the kernels from that cache. A copy that fails costs only time:
the run compiles what it left.

    python -m w2s.kernels.sweep --only deferred128 --compile-workers 8
    python -m w2s.kernels.compile_check --compile-workers 2     # workers hand their rows back; nothing is timed
    python -m pytest -q tests/test_bench_scripts.py -k compile
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

SHARD = None  # (I, N) in compile worker I of N; None in the run that times
_points_met = 0


def next_point():
    """(index of the next compile point, whether this process takes it): the run that times takes every one."""
    global _points_met
    _points_met += 1
    index = _points_met - 1
    return index, SHARD is None or index % SHARD[1] == SHARD[0]


def run_share(points):
    """Run each of `points` (callables, in the order the run meets them) that this process takes, once. An error is
    left for the timed run, which meets it again and reports it."""
    for point in points:
        if next_point()[1]:
            try:
                point()
            except Exception:  # noqa: BLE001, S110
                pass


def _shard(text):
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N, got {text!r}")
    return int(index), int(count)


def add_arguments(parser):
    parser.add_argument("--compile-workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes that compile the kernels before they are timed (default: up to 8, one a CPU "
                             "core); 1: each compiles when it is first timed")
    parser.add_argument("--compile-shard", type=_shard, help=argparse.SUPPRESS)  # I/N: run as compile worker I of N


def start(args):
    """Take --compile-shard from parsed arguments: SHARD is set in a worker and None otherwise."""
    global SHARD, _points_met
    SHARD, _points_met = args.compile_shard, 0


def compile_in_workers(module, argv, workers, what):
    """Run `python -m module *argv --compile-shard I/workers` for every I at once and wait for them all; then print how
    long they took, naming each failed worker with its exit code and last line of output."""
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as logs:
        running = []
        for i in range(workers):
            log = open(os.path.join(logs, f"worker{i}.txt"), "w+")  # noqa: SIM115 (closed below, after the wait)
            command = [sys.executable, "-m", module, *argv, "--compile-shard", f"{i}/{workers}"]
            running.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), log))
        failures = []
        for i, (process, log) in enumerate(running):
            if process.wait() != 0:
                log.seek(0)
                last = ([line.strip() for line in log if line.strip()] or ["no output"])[-1]
                failures.append(f"worker {i} exited with {process.returncode}: {last[:120]}")
            log.close()
    print(f"\n{what}: compiled by {workers} processes in {time.perf_counter() - began:.1f} s"
          + "".join(f"\n  {failure}" for failure in failures), flush=True)
