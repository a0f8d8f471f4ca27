"""Compile every Triton kernel for an H100 (sm_90a) on a machine WITHOUT a GPU, at the launch configs the GPU would
use, and report each variant's shared memory, registers and spilled bytes. It catches what the CPU interpreter cannot:
tiles that overflow shared memory, tl.dot shapes or dtypes the hardware rejects, heavy register spills.

    python -m w2s.kernels.compile_check                 # bf16 everything, fp32 forward and decode; minutes on 2 cores
    python -m w2s.kernels.compile_check --only attention --dtype bf16
    python -m w2s.kernels.compile_check --only sweep    # the launch configs sweep.py tries (bf16)
    python -m w2s.kernels.compile_check --only matvec   # the batch-1 projections at the Llama-3-8B shapes
    python -m w2s.kernels.compile_check --only options  # each launch option on the table tiles, as the GPU tests run it
    python -m w2s.kernels.compile_check --only attention --dtype bf16 --sass   # and each kernel's SASS instructions

How: Triton's active driver is replaced by a stand-in that reports an sm_90 target, and every `kernel[grid](...)`
launch becomes a compile-only warm-up (JITFunction.run(..., warmup=True)). So the real launchers pick their real GPU
configs while operating on small CPU tensors (only the arguments' dtypes, divisibility and constexprs matter to the
compiler). Registers and spills come from `ptxas -v` on the generated PTX (ptxas ships with Triton's NVIDIA backend).
This leans on Triton internals (checked with Triton 3.9); a Triton that moved them fails here with a clear message.
Exit status 1 when a variant fails to compile or needs more shared memory than an H100 thread block may use.
With --compile-workers N (default: up to 8, one a CPU core) N processes share the launches out (compile_workers.py)
and hand their rows back; the table is the same as one process prints.
"""

import argparse
import functools
import os
import pickle
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("w2s.kernels.compile_check compiles for the GPU: unset TRITON_INTERPRET")

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns unless set; 1 is its (and 3.6's) default
import torch  # noqa: E402
import triton  # noqa: E402

from w2s.kernels import compile_workers  # noqa: E402

H100_SMS = 132
H100_SHARED_PER_BLOCK = 232448  # bytes of shared memory one thread block may opt in to on sm_90 (227 KB)
# (launch index, kernel, constexprs, shared bytes, registers, spilled bytes, warps, error, SASS opcode counts or None)
ROWS = []
_PTXAS_USAGE = {}  # PTX text -> (registers, spilled bytes): variants that compile to the same PTX run ptxas once
# --sass: the machine instructions that carry a softmax's per-score work (fp32 add, multiply, fused multiply-add,
# select, min/max, integer compare, the exp2 unit) and the tensor-core products (HGMMA: Hopper's warp-group ones;
# HMMA: the older warp-level ones), counted in each kernel's whole SASS
SASS_OPS = ("HGMMA", "HMMA", "MUFU", "FFMA", "FMUL", "FADD", "FSEL", "FMNMX", "ISETP")
COUNT_SASS = False


def _install_compile_only_launches():
    """Point Triton at an sm_90 target and turn `kernel[grid](...)` into compile-and-record."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    class H100Target:  # just enough of a driver for JITFunction.run(warmup=True)
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        def is_active(self):
            return True

    driver.set_active(H100Target())
    from w2s.kernels import attention, decode_attention  # launchers that size their grids by the SM count: an H100's

    attention._sm_count = decode_attention._sm_count = lambda device: H100_SMS

    def compile_only(self, grid):
        def launch(*args, **kwargs):
            index, mine = compile_workers.next_point()
            if not mine:  # another compile worker's launch
                return None
            shown = {k: v for k, v in kwargs.items() if k.isupper() or k.startswith("num_")}
            try:
                kernel = self.run(*args, grid=grid, warmup=True, **kwargs)
            except Exception as e:  # a compile error is the finding, not a crash of this script
                ROWS.append((index, self.fn.__name__, shown, None, None, None, None,
                             str(e).strip().splitlines()[-1][:200], None))
                return None
            regs, spills = _ptxas_usage(kernel.asm["ptx"])
            ROWS.append((index, self.fn.__name__, shown, kernel.metadata.shared, regs, spills,
                         kernel.metadata.num_warps, None, _sass_opcodes(kernel.asm["cubin"]) if COUNT_SASS else None))
            return kernel

        return launch

    JITFunction.__getitem__ = compile_only


@functools.cache
def _ptxas():
    """(path, release) of the ptxas Triton itself runs for sm_90, as Triton resolves it: one it ships (Triton 3.6 its
    `ptxas`, 3.9 its `ptxas-blackwell`) or the one its TRITON_<NAME>_PATH variable names. Resolving it runs
    `ptxas --version`, hence once per process."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        tool = get_ptxas(90)
        return str(tool.path), tool.version
    except (ImportError, AttributeError, TypeError):
        path = str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")
        release = re.findall(r"release ([\d.]+)", subprocess.run([path, "--version"], capture_output=True,
                                                                  text=True).stdout)
        return path, release[0] if release else "?"


def _ptxas_usage(ptx):
    """(registers, spill-store bytes) of one kernel's PTX, from `ptxas -v`."""
    if ptx not in _PTXAS_USAGE:
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ptx)
        info = subprocess.run([_ptxas()[0], "-v", "-arch=sm_90a", f.name, "-o", os.devnull],
                              capture_output=True, text=True).stderr
        os.unlink(f.name)
        regs, spills = re.findall(r"Used (\d+) registers", info), re.findall(r"(\d+) bytes spill stores", info)
        _PTXAS_USAGE[ptx] = (int(regs[-1]) if regs else None, int(spills[-1]) if spills else None)
    return _PTXAS_USAGE[ptx]


def _sass_opcodes(cubin):
    """{opcode: count} over one kernel's SASS, from the nvdisasm Triton ships (predicates and modifiers dropped)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    sass = subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    opcodes = re.findall(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass, re.M)
    counts = {op: opcodes.count(op) for op in SASS_OPS}
    counts["all"] = len(opcodes)
    return counts


def check_attention(dtypes):
    """Forward and backward (bf16) at every head dim and masking mode; decode at real model shapes (the cascade over a
    shared prefix launches these same two kernels)."""
    from w2s.kernels import attention, attention_backward, decode_attention

    modes = [dict(), dict(q_positions=torch.arange(64, dtype=torch.int32)[None]),
             dict(kv_lengths=torch.tensor([40], dtype=torch.int32), sliding_window=32, softcap=50.0)]
    for dtype in dtypes:
        for D in (64, 128, 256):
            q, k = torch.zeros(1, 64, 32, D, dtype=dtype), torch.zeros(1, 64, 8, D, dtype=dtype)
            for m in modes:
                args = (m.get("q_positions"), m.get("kv_lengths"), m.get("sliding_window"), m.get("softcap"), 0.1)
                attention._forward(q, k, k, *args)
                if dtype != torch.float32:  # fp32 backward (no GPU path trains in fp32) compiles slowly, all spills
                    attention_backward._backward(q, q, k, k, q, torch.zeros(1, 32, 64), *args)
        # decode: Llama-3-8B (32 q / 8 kv heads, D 128), Gemma-2B (8 / 1, D 256), Gemma-2-9B (16 / 8, D 256); one
        # token also through kv_rows (the sampler's mixed steps of chunked prefill)
        for H, K, D, window, cap in [(32, 8, 128, None, None), (8, 1, 256, None, None), (16, 8, 256, 4096, 50.0)]:
            for T in (1, 2, 16):
                if T * H // K <= 128:
                    q, k = torch.zeros(4, T, H, D, dtype=dtype), torch.zeros(4, 256, K, D, dtype=dtype)
                    positions = torch.zeros(4, T, dtype=torch.int32)
                    for kv_rows in (None, torch.arange(4)) if T == 1 else (None,):
                        decode_attention._decode(q, k, k, positions, None, window, cap, 0.1, kv_rows)
                    if T == 1:  # the sampler's int64 positions; the cascade's merge with the prefix's result;
                        # a prompt's keys read from the row named for them (share_prompt_reads, int32 tables)
                        decode_attention._decode(q, k, k, positions.long(), None, window, cap, 0.1)
                        decode_attention.attention_after_shared_prefix(q, k, k, k[0, :64], k[0, :64], positions,
                                                                       window, cap, 0.1)
                        table = (torch.zeros(5, dtype=torch.int32), torch.zeros(5, dtype=torch.int32))
                        decode_attention._decode(q, k, k, positions.long(), None, window, cap, 0.1,
                                                 row_prefix=table)


def check_fused_linear(dtypes):
    from w2s.kernels import fused_linear

    for V in (32000, 128256, 256000):
        for softcap in (None, 30.0):
            for write_grad in (False, True):
                logits = torch.zeros(2, V, dtype=dtypes[0])
                fused_linear.rows_nll_triton(logits, torch.zeros(2, dtype=torch.long), softcap, -100,
                                             torch.zeros(2) if write_grad else None, write_grad)


def check_elementwise(dtypes):
    from w2s.kernels import glu, rms_norm, rope, rope_cache, sample

    dtype = dtypes[0]
    for D in (2048, 2304, 4096, 8192):  # Gemma-2B, Gemma-2-2B, Llama-3-8B, Llama-2-70B hidden sizes
        for unit_offset in (False, True):
            x, w = torch.zeros(8, D, dtype=dtype), torch.zeros(D, dtype=dtype)
            _, rstd = rms_norm.rms_norm_forward(x, w, 1e-5, unit_offset)
            rms_norm.rms_norm_backward(x, x, w, rstd, unit_offset)
            rms_norm.add_rms_norm(x, x, w, 1e-5, unit_offset)  # a decode step's residual add with the norm
    for D in (64, 128, 256):
        rope.rope_apply(torch.zeros(2, 4, 32, D, dtype=dtype), torch.zeros(2, 4, dtype=torch.long), torch.zeros(D // 2))
    # RoPE + KV-cache write: Llama-3-8B (32 q / 8 kv heads, D 128), Llama-3.2-1B (D 64), Gemma-2B (8 / 1, D 256); a
    # decode step (one token, q/k/v strided views of one fused projection) and a prefill into scattered rows
    for H, K, D in ((32, 8, 128), (32, 8, 64), (8, 1, 256)):
        qkv = torch.zeros(4, 1, (H + 2 * K) * D, dtype=dtype)
        q, k, v = (t.unflatten(-1, (-1, D)) for t in qkv.split([H * D, K * D, K * D], dim=-1))
        cache = torch.zeros(4, K, 64, D, dtype=dtype)
        for rows in (None, torch.zeros(4, dtype=torch.long)):
            rope_cache.rope_cache_write(q, k, v, torch.zeros(4, 1, dtype=torch.long), torch.zeros(D // 2), cache,
                                        cache, rows)
    gate = torch.zeros(4, 1024, dtype=dtype)
    gate_up = torch.zeros(4, 2048, dtype=dtype)  # the halves of a fused gate/up projection: the row kernel
    for gelu in (False, True):
        glu.glu_forward(gate, gate, gelu)
        glu.glu_forward(gate_up[:, :1024], gate_up[:, 1024:], gelu)
        glu.glu_backward(gate, gate, gate, gelu)
    # sampling: the logits of a decode step (Llama-3 vocabulary) in the model's dtype, and top-k's fp32 columns
    for logits in (torch.zeros(4, 128256, dtype=dtype), torch.zeros(4, 50)):
        sample.sample_inverse_cdf(logits, torch.zeros(4), 0.7)
    for steps in (torch.zeros(512, dtype=torch.long), torch.zeros(512)):  # the counters as integers or floats
        sample.stream_uniforms(torch.zeros(512, dtype=torch.long), steps)


def check_matvec(dtypes):
    """The batch-1 decode step's matrix-vector products at the GPU table's launches (bf16; fp32 too with --dtype
    both, the tiny test models' dtype), plain, with a bias and adding into the residual row: Llama-3-8B's down
    projection (every 8B shape compiles to the same code: each K a multiple of the chunk width) and Gemma-2-2B's
    K = 2304, no multiple of 512: the masked K loop."""
    from w2s.kernels import matvec

    for dtype in dtypes:
        for N, K in ((4096, 14336), (2048, 2304)):
            x, w = torch.zeros(1, K, dtype=dtype), torch.zeros(N, K, dtype=dtype)
            matvec.matvec(x, w)
            matvec.matvec(x, w, torch.zeros(N, dtype=dtype))
            matvec.matvec(x, w, accumulate_into=torch.zeros(1, N, dtype=dtype))


def check_sweep(dtypes):
    """Every attention launch config sweep.py tries (bf16, causal), forward and backward, every decode one
    (check_decode_sweep) and every matrix-vector one (bf16): a candidate the GPU sweep would time must at least
    compile and fit."""
    from w2s.kernels import attention, attention_backward, matvec, sweep

    check_decode_sweep()

    for launch in sweep.MATVEC_CANDIDATES:  # K = 4096 compiles what every 8B shape runs: each K a multiple of BLOCK_K
        matvec.matvec(torch.zeros(1, 4096, dtype=torch.bfloat16), torch.zeros(64, 4096, dtype=torch.bfloat16),
                      launch=launch)

    for D in sorted(set(sweep.FWD_CANDIDATES) | set(sweep.DKDV_CANDIDATES)):
        q, k = torch.zeros(1, 64, 16, D, dtype=torch.bfloat16), torch.zeros(1, 64, 8, D, dtype=torch.bfloat16)
        tables = [(attention._GPU_FWD, sweep.FWD_CANDIDATES.get(D, []), lambda: attention._forward(
                      q, k, k, None, None, None, None, 0.1)),
                  (attention_backward._GPU_BWD_DKDV, sweep.DKDV_CANDIDATES[D], None),
                  (attention_backward._GPU_BWD_DQ, sweep.DQ_CANDIDATES[D], None)]
        for table, candidates, launch in tables:
            launch = launch or (lambda: attention_backward._backward(q, q, k, k, q, torch.zeros(1, 16, 64), None, None,
                                                                     None, None, 0.1))
            current = table[D]
            try:
                for config in candidates[1:]:  # the first is the table's, which the attention check compiles
                    table[D] = config
                    launch()
            finally:
                table[D] = current


def check_decode_sweep():
    """Every decode launch sweep.py tries (bf16, Llama-3-8B's heads at D 128), with each row's own keys, with
    row_prefix and as the per-prompt cascade (8 samples a prompt): what its GPU run compiles."""
    from w2s.kernels import decode_attention, sweep
    from w2s.kernels.attention_common import launch_changes

    q, k = torch.zeros(16, 1, 32, 128, dtype=torch.bfloat16), torch.zeros(16, 256, 8, 128, dtype=torch.bfloat16)
    positions, table = torch.full((16, 1), 200, dtype=torch.int32), torch.zeros(16, dtype=torch.int32)
    for i, config in enumerate(sweep.DECODE_CANDIDATES[128]):
        with launch_changes([(decode_attention.GPU_DECODE, decode_attention.DecodeLaunch(*config)._asdict())], 128):
            if i:  # the table's plain launches are the attention check's
                for row_prefix in (None, (table, table)):
                    decode_attention.attention_decode(q, k, k, q_positions=positions, row_prefix=row_prefix)
            decode_attention.attention_after_prompt_groups(q, k, k, positions, sweep.prompt_groups(16, 8, 128, "cpu"))


def check_launch_options(dtypes):
    """Each launch option (sweep.py's LAUNCH_OPTIONS: TMA loads, the persistent forward, dq summed by atomic
    adds) on the tables' own tiles at every head dim (bf16), causal and with the masks the GPU-marked
    test_gpu_bf16_launch_options uses (ragged kv_lengths and a window): what that test and the benchmarks compile."""
    from w2s.kernels import attention, attention_backward, sweep
    from w2s.kernels.attention_common import launch_changes

    modes = [(None, None), (torch.tensor([40], dtype=torch.int32), 32)]  # (kv_lengths, sliding_window)
    for D in (64, 128, 256):
        q, k = torch.zeros(1, 64, 16, D, dtype=torch.bfloat16), torch.zeros(1, 64, 8, D, dtype=torch.bfloat16)
        for changes in sweep.LAUNCH_OPTIONS.values():
            forward = any(table is attention._GPU_FWD for table, _ in changes)
            backward = any(table is not attention._GPU_FWD for table, _ in changes)
            with launch_changes(changes, D):
                for kv_lengths, window in modes:
                    args = (None, kv_lengths, window, None, 0.1)
                    if forward:
                        attention._forward(q, k, k, *args)
                    if backward:
                        attention_backward._backward(q, q, k, k, q, torch.zeros(1, 16, 64), *args)


CHECKS = dict(attention=check_attention, fused_linear=check_fused_linear, elementwise=check_elementwise,
              matvec=check_matvec, sweep=check_sweep, options=check_launch_options)


def _run_checks(names, dtypes):
    """{check: its rows}, each check's launches compiled in this process (a compile worker: its share of them)."""
    rows = {}
    for name in names:
        CHECKS[name](dtypes)
        rows[name] = list(ROWS)
        ROWS.clear()
    return rows


def _rows_from_workers(argv, workers):
    """{check: its rows} gathered from `workers` compile workers, each writing its rows to a file; None when one
    failed (the caller then compiles everything itself, mostly from Triton's cache)."""
    with tempfile.TemporaryDirectory() as rows_dir:
        compile_workers.compile_in_workers("w2s.kernels.compile_check", argv + ["--rows-dir", rows_dir], workers,
                                           "compile check")
        shares = []
        for i in range(workers):
            path = Path(rows_dir) / f"worker{i}.pkl"
            if not path.exists():
                return None
            shares.append(pickle.loads(path.read_bytes()))
    return {name: sorted(sum((share[name] for share in shares), [])) for name in shares[0]}


def _print_rows(rows):
    """Print every check's rows in launch order; True when one failed to compile or overflows shared memory."""
    failed = False
    for check_rows in rows.values():
        for _, kernel, config, shared, regs, spills, warps, error, opcodes in check_rows:
            over = shared is not None and shared > H100_SHARED_PER_BLOCK
            failed |= error is not None or over
            flags = " ".join(f"{k}={v}" for k, v in config.items() if v not in (False, None))
            status = f"  COMPILE ERROR: {error}" if error else ("  OVER THE SHARED-MEMORY LIMIT" if over else "")
            print(f"{kernel:<24}{shared if shared is not None else '-':>10}{regs or '-':>6}{spills or 0:>9}"
                  f"{warps or '-':>6}  {flags}{status}")
            if opcodes:
                print(f"{'':<24}SASS {' '.join(f'{op}={n}' for op, n in opcodes.items())}")
    return failed


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated subset of {', '.join(CHECKS)}")
    p.add_argument("--dtype", choices=["bf16", "both"], default="both",
                   help="both: bf16, plus fp32 attention forward and decode (tiny test models run those on GPU)")
    p.add_argument("--sass", action="store_true",
                   help=f"also count each kernel's SASS instructions, all and by opcode ({', '.join(SASS_OPS)})")
    compile_workers.add_arguments(p)
    p.add_argument("--rows-dir", help=argparse.SUPPRESS)  # a compile worker writes its rows there
    args = p.parse_args(argv)
    global COUNT_SASS
    COUNT_SASS = args.sass
    names = args.only.split(",")
    unknown = set(names) - set(CHECKS)
    if unknown:
        p.error(f"--only: unknown {', '.join(sorted(unknown))}; expected some of {', '.join(CHECKS)}")
    try:
        _install_compile_only_launches()
    except (ImportError, AttributeError) as e:
        sys.exit(f"w2s.kernels.compile_check: this Triton ({triton.__version__}) lacks an internal it uses ({e})")
    dtypes = [torch.bfloat16] + ([torch.float32] if args.dtype == "both" else [])
    compile_workers.start(args)
    if compile_workers.SHARD is not None:  # a compile worker: its share of the rows to a file, nothing printed
        rows = _run_checks(names, dtypes)
        (Path(args.rows_dir) / f"worker{compile_workers.SHARD[0]}.pkl").write_bytes(pickle.dumps(rows))
        return 0
    ptxas, release = _ptxas()
    print(f"# Triton {triton.__version__}, ptxas {release} ({ptxas}), target sm_90a (H100), "
          f"shared memory limit {H100_SHARED_PER_BLOCK} B/block", flush=True)
    rows = _rows_from_workers(argv, args.compile_workers) if args.compile_workers > 1 else None
    print(f"{'kernel':<24}{'shared B':>10}{'regs':>6}{'spill B':>9}{'warps':>6}  constexprs / launch config")
    if rows is not None:
        failed = _print_rows(rows)
    else:  # in this process, each check's rows printed as it ends
        failed = False
        for name in names:
            failed |= _print_rows(_run_checks([name], dtypes))
    print("compile check: " + ("FAILED" if failed else "every variant compiled within the H100's shared memory"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
