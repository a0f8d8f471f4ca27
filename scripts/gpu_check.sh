#!/usr/bin/env bash
# Every GPU-only check of BENCHMARKS.md in one run, for a session lent a GPU for a few minutes: the bf16 GPU-marked
# tests, then the training, attention and sampling benchmarks at the shapes of BENCHMARKS.md's targets (SFT MFU at the
# Llama-3.2-1B and -3B shapes and DPO step MFU, each with a profile of two steps, attention fwd/bwd, 8B batch sampling
# 512 x (128 -> 256) with batch-1 decode and its MBU, the 256 x 8 GSM8K-like EOS workload). Each step has its own
# time limit, so one slow step cannot eat the others' time; every log and a summary land in $OUT (default gpu_out/).
# The default steps' limits add up to 9 1/2 minutes (plus 2 s of kill grace each), so the whole run fits one
# 10-minute device call (the steps usually end well before their limits); to fit, the training benchmarks time w2s
# alone (its model built on the GPU, no checkpoint), the kernel benchmark runs attention only without torch.compile
# baselines, and the sampling benchmarks time one run after their warm-up.
# Output is unbuffered, so a step stopped at its limit still leaves what it printed.
#
#     OUT=gpu_out bash scripts/gpu_check.sh        # <= 9.5 minutes on one H100/H200; then copy the numbers into
#                                                  # BENCHMARKS.md (each with the device, date and commit)
#     OUT=gpu_out bash scripts/gpu_check.sh sweep profile_sampling    # named steps only (see run_step below)
#     OUT=gpu_out bash scripts/gpu_check.sh gsm8k gsm8k_chunked       # chunked prefill against a prefill forward
#     OUT=gpu_out bash scripts/gpu_check.sh gsm8k gsm8k_no_compact    # a draining batch compacted, and not
#     OUT=gpu_out bash scripts/gpu_check.sh matvec batch1 batch1_cublas    # batch-1 matvec kernel; decode on and off
#     OUT=gpu_out bash scripts/gpu_check.sh profile_attention   # Nsight Compute on the 3 attention kernels
#     OUT=gpu_out bash scripts/gpu_check.sh profile_decode decode128   # the batch step's decode attention: Nsight
#                                                  # Compute, then its launch sweep (~3 minutes; next to measure)
#     OUT=gpu_out bash scripts/gpu_check.sh pipeline    # the demo recipe end to end on CUDA, bf16 (<= 7 min, own call)
#     OUT=gpu_out bash scripts/gpu_check.sh test_gpu bench_sampling share_prompt_reads prompt_cascade gsm8k \
#         profile_decode                           # what the next session measures first (limits 9.8 min; such
#                                                  # steps took 5-6 min before): the tests after the sampler's
#                                                  # changes, the batch and GSM8K-like workloads with a prompt's keys
#                                                  # read from one row (now the whole prompt), read once through the
#                                                  # per-prompt cascade, and neither, the admission's share without
#                                                  # padded sibling rows, the decode kernels under Nsight Compute;
#                                                  # then, in a second call,
#     OUT=gpu_out bash scripts/gpu_check.sh bench_attention deferred128 sweep_backward128 dpo_mfu decode128
#                                                  # the attention forward with each key block's P V product
#                                                  # deferred beside the softmax (triton-deferred against triton,
#                                                  # then at three tiles), the backward's tiles through TMA and
#                                                  # with dq summed by atomic adds (never timed), DPO's idle share,
#                                                  # the decode launch sweep (three ways; limits 9.7 min, most
#                                                  # telling first, the sweeps' compiles 8 at a time); and with
#                                                  # device time left, gsm8k_no_compact (the drain compacted or
#                                                  # not, against the first call's gsm8k), tiles256 (3.3 min:
#                                                  # D = 256's tiles, never swept) and prompt_cascade_chunked
#                                                  # (2 min: the cascade beside chunked prefill, each against
#                                                  # gsm8k_chunked)
#
# The pipeline step runs recipes/demo.toml as a derived recipe ($out/demo_cuda.toml: dtype bfloat16, device cuda,
# absolute paths) through scripts/pipeline.py: Triton kernels, CUDA-graph decoding and FSDP2 training on a 1-GPU
# process group, every stage of the paper. It writes the run to $RUNS (default /tmp/w2s-gpu-runs, fresh each time)
# and the report with every stage's cost (wall time, tokens, tokens/s, MFU, peak memory) to $out/pipeline_report.md.
#
# Not run by `make test` (no GPU there). Needs torch with CUDA and triton; run from the repository root.
set -u
out="${OUT:-gpu_out}"
mkdir -p "$out"
py="${PYTHON:-python3}"  # the device image has python3 (with torch) and maybe no `python`
export PYTHONPATH="${PYTHONPATH:-.}" PYTHONUNBUFFERED=1
summary="$out/SUMMARY.md"

# Triton compiles PTX for Hopper with a ptxas it ships unless TRITON_<ITS NAME>_PATH names another (Triton 3.6 uses its
# `ptxas`, CUDA 12.8, and 3.9 its `ptxas-blackwell`, CUDA 13.4). Triton 3.6's crashes on the PTX Triton 3.6 writes for
# some attention forwards through TMA (two pipeline stages, e.g. the D = 256 table tiles) and CUDA 13.0's compiles
# them (BENCHMARKS.md), so a newer ptxas of the machine's CUDA toolkit is used when there is one. PTXAS=triton keeps
# Triton's own, and so does a TRITON_PTXAS_PATH or TRITON_PTXAS_BLACKWELL_PATH already set. The summary names the ptxas
# Triton resolves in the end.
triton_ptxas() {
  "$py" -c "from triton.backends.nvidia.compiler import get_ptxas; print(get_ptxas(90).path)" 2>/dev/null
}
ptxas_release() { "$1" --version 2>/dev/null | sed -n 's/.*release \([0-9][0-9.]*\),.*/\1/p'; }
own=$(triton_ptxas)
chosen="${TRITON_PTXAS_PATH:-}${TRITON_PTXAS_BLACKWELL_PATH:-}"
if [ -n "$own" ] && [ -z "$chosen" ] && [ "${PTXAS:-newest}" != triton ]; then
  own_release=$(ptxas_release "$own")
  for candidate in "$(command -v ptxas)" "${CUDA_HOME:-/usr/local/cuda}/bin/ptxas"; do
    release=$(ptxas_release "$candidate")
    newest=$(printf '%s\n%s\n' "$own_release" "$release" | sort -V | tail -n 1)
    if [ -n "$release" ] && [ "$release" != "$own_release" ] && [ "$newest" = "$release" ]; then
      export "TRITON_$(basename "$own" | tr 'a-z-' 'A-Z_')_PATH=$candidate"
      break
    fi
  done
fi
ptxas_used=$(triton_ptxas)
{
  echo "# gpu_check $(date -u +%Y-%m-%dT%H:%MZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  "$py" -c "import torch, triton; print('device', torch.cuda.get_device_name(0), '| torch', torch.__version__,
'| triton', triton.__version__)" 2>&1
  echo "ptxas ${ptxas_used:-unknown}, release $(ptxas_release "$ptxas_used")"
} > "$summary"

# The GPU-marked tests spend most of their time in Triton compiles, one CPU core each: 8 pytest-xdist workers compile
# 8 at a time (the machine has 16 cores; the tests share the GPU, the largest holding a few GB). Without pytest-xdist
# they run in one process. -v names each test as it ends, so a step stopped at its limit still says which passed.
test_opts="-v $("$py" -c "import xdist" 2>/dev/null && echo "-n 8")"

demo_cuda_recipe() {  # demo_cuda_recipe PATH: recipes/demo.toml in bf16 on CUDA, its relative paths made absolute
  "$py" - "$1" <<'PY'
import re, sys
from pathlib import Path

src = Path("recipes/demo.toml").resolve()
text = src.read_text().replace('name = "demo"', 'name = "demo-cuda"', 1)
text = re.sub(r'(?m)^dtype = .*$', 'dtype = "bfloat16"', text)
text = re.sub(r'(?m)^device = .*$', 'device = "cuda"', text)
text = text.replace('"../demo/', f'"{src.parent.parent / "demo"}/')
Path(sys.argv[1]).write_text(text)
PY
}

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $out/NAME.txt, record status and last lines
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout -k 2 "$limit" "$@" > "$out/$name.txt" 2>&1
  local rc=$?
  { echo; echo "## $name (rc $rc, $((SECONDS - start)) s): $*"; tail -n 12 "$out/$name.txt"; } >> "$summary"
}

run_step() {  # the checks by name; the default run is ordered: tests first, then training, kernels, sampler
  case $1 in
    test_gpu) step "$1" 120 "$py" -m pytest $test_opts -m gpu tests ;;  # every bf16 GPU-marked test (sampler, kernels)
    # SFT MFU at the Llama-3.2-1B and -3B shapes and the DPO step's: the first 2 steps after warm-up run under
    # torch.profiler (where the step's time goes, by group of kernels), the medians count the 5 after them.
    # 3B: 8 x 2048 tokens a step as at 1B (the optimizer step and FSDP2's casts cost the same per step at any
    # batch); ~100 GiB estimated, fits an H200; on an 80 GB H100 pass --batch 2
    train_llama32_1b) step "$1" 90 "$py" scripts/bench_train.py --dim 2048 --layers 16 --heads 32 --kv-heads 8 \
      --hidden 8192 --vocab 128256 --batch 8 --seq 2048 --steps 7 --warmup 2 --no-hf --profile ;;
    train_llama32_3b) step "$1" 90 "$py" scripts/bench_train.py --dim 3072 --layers 28 --heads 24 --kv-heads 8 \
      --hidden 8192 --vocab 128256 --batch 8 --seq 2048 --steps 7 --warmup 2 --no-hf --profile ;;
    dpo_mfu) step "$1" 70 "$py" scripts/bench_train.py --dpo --dim 2048 --layers 16 --heads 32 --kv-heads 8 \
      --hidden 8192 --vocab 128256 --batch 4 --seq 1024 --steps 7 --warmup 2 --profile ;;  # DPO step MFU, 1B shape
    dpo_memory) step "$1" 45 "$py" scripts/bench_train.py --dpo-memory --dim 2048 --layers 4 --heads 16 \
      --kv-heads 8 --hidden 5632 --vocab 128256 --batch 4 --seq 1024 --steps 1 ;;
    test_kernels) step "$1" 100 "$py" -m pytest $test_opts -m gpu tests/test_kernel_attention.py \
      tests/test_kernels.py ;;
    bench_kernels) step "$1" 95 "$py" -m w2s.kernels.bench --no-compile --warmup 3 --repeats 10 ;;
    # attention fwd (pointer loads, TMA, TMA + persistent, the P V product deferred) and bwd at the target shape,
    # SDPA's flash backend beside (the Triton launches compiled by 8 processes first)
    bench_attention) step "$1" 60 "$py" -m w2s.kernels.bench --only attention --no-compile --warmup 3 --repeats 10 ;;
    # Nsight Compute on the attention kernels at the bench's shape (B4 T4096 H16 D128, the tables' configs): one
    # causal and one non-causal forward + backward, compiled and warmed up outside the profiled range (ncu
    # --profile-from-start off; the range is torch.cuda.profiler's). Throughput against the chip's peaks, launch
    # resources, occupancy and where the warps stall: what keeps the attention targets out of reach (ncu reads the
    # counters on the Firecracker machines; clocks left alone)
    profile_attention)
      ncu="${NCU:-$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -n 1)}"
      step "$1" 150 "${ncu:-ncu}" --clock-control none --profile-from-start off \
        -k "regex:^_attn_(fwd|bwd_dkdv|bwd_dq)_kernel\$" --section SpeedOfLight --section LaunchStats \
        --section Occupancy --section WarpStateStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
        "$py" - <<'PY'
import torch
from w2s.kernels.attention import attention

B, T, H, D = 4, 4096, 16, 128
q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
last = torch.full((B, T), T - 1, device="cuda", dtype=torch.int32)  # non-causal: every query sees every key
for profiled in (False, True):  # the first pass compiles, the second is the one ncu measures
    if profiled:
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    for positions in (None, last):
        out = attention(q, k, v, q_positions=positions)
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    torch.cuda.synchronize()
torch.cuda.profiler.stop()
print("profiled: causal fwd, dk/dv, dq; non-causal fwd, dk/dv, dq")
PY
      ;;
    # Nsight Compute on the decode kernel at the batch-sampling shape (sweep.py's DECODE_SHAPE: 512 rows x 1 query,
    # cache 384, H32 KH8 D128, the table's launch): each row reading its own keys, then a prompt's 128 positions read
    # from its first sample's row (share_prompt_reads): whether the step's attention waits on memory, latency or the
    # L2; then the per-prompt cascade (attention_after_prompt_groups: a prompt's keys once for its 8 samples, then
    # each row's own, and the merge)
    profile_decode)
      ncu="${NCU:-$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -n 1)}"
      step "$1" 70 "${ncu:-ncu}" --clock-control none --profile-from-start off \
        -k "regex:^_(attn_decode|attn_prompt_group|merge_splits)_kernel\$" \
        --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
        --section MemoryWorkloadAnalysis "$py" - <<'PY'
import torch
from w2s.kernels import decode_attention, sweep

q, k, v, positions, row_prefix, _ = sweep.decode_inputs(128)
shape = sweep.DECODE_SHAPE
groups = sweep.prompt_groups(shape["rows"], shape["samples"], shape["prompt"])
for profiled in (False, True):  # the first pass compiles, the second is the one ncu measures
    if profiled:
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    decode_attention.attention_decode(q, k, v, q_positions=positions)
    decode_attention.attention_decode(q, k, v, q_positions=positions, row_prefix=row_prefix)
    decode_attention.attention_after_prompt_groups(q, k, v, positions, groups)
    torch.cuda.synchronize()
torch.cuda.profiler.stop()
print("profiled: the decode kernel with each row's own keys, then with the prompt's read from one row, then the "
      "per-prompt cascade (decode over the prompts, decode over the rows' own keys, merge)")
PY
      ;;
    # the decode kernel's launches (keys per tile, warps, stages) at the same shape, the three ways (30 compiles)
    decode128) step "$1" 150 "$py" -m w2s.kernels.sweep --only decode128 ;;
    # RMSNorm, RoPE, SwiGLU and the fused linear cross-entropy against the copy bandwidth the bench measures first
    bench_memory) step "$1" 40 "$py" -m w2s.kernels.bench --only rms_norm,rope,swiglu,fused_ce --no-compile \
      --warmup 3 --repeats 10 ;;
    # the whole attention file on CUDA (fp32 + bf16 at the GPU tables): Triton compiles took over 120 s on an H100
    test_attention) step "$1" 300 "$py" -m pytest $test_opts tests/test_kernel_attention.py ;;
    batch1) step "$1" 100 "$py" scripts/bench_sampling.py --prompts 1 --samples 1 ;;  # 8B batch 1, MBU, steady state
    # the same with every projection on torch's matmuls (cuBLAS) instead of the one-row matrix-vector kernel: batch 1
    # with the matvec off, to compare with batch1 in the same call
    batch1_cublas) step "$1" 100 "$py" -c "import runpy, sys; import w2s.ops as o; o.TRITON_MATVEC = False; \
sys.argv = ['bench_sampling.py'] + sys.argv[1:]; runpy.run_path('scripts/bench_sampling.py', run_name='__main__')" \
      --prompts 1 --samples 1 ;;
    # the one-row matrix-vector kernel (batch-1 decode's projections): its bf16 GPU tests at the Llama-3-8B shapes,
    # Triton against F.linear in GB/s of weight read, then its launch configs per shape (23 compiles): 150 s of limits
    matvec)
      step matvec_test 50 "$py" -m pytest $test_opts -m gpu tests/test_kernel_matvec.py
      step matvec_bench 40 "$py" -m w2s.kernels.bench --only matvec --warmup 3 --repeats 20
      step matvec_sweep 60 "$py" -m w2s.kernels.sweep --only matvec ;;
    # Each sweep compiles a part's candidates in up to 8 processes before timing them (w2s/kernels/sweep.py).
    # every launch config, fwd and bwd at D 64/128/256: over 130 compiles, more than one call may finish (alone)
    sweep) step "$1" 590 "$py" -m w2s.kernels.sweep ;;
    # RMSNorm's backward: programs per SM x warps per program at (16384, 4096), bf16
    sweep_rms_norm) step "$1" 40 "$py" -m w2s.kernels.sweep --only rms_norm ;;
    # the forward's tiles at D 128 and 256, each with pointer loads and through TMA, two of them persistent too
    # (32 compiles; alone)
    sweep_forward) step "$1" 420 "$py" -m w2s.kernels.sweep --only forward128,forward256 ;;
    # the attention of the Llama-3.2-1B training shape (D 64, B8 T2048 H32 KH8), forward and backward: the tiles of
    # the two above at D 64, for the 1B MFU target (40 compiles; alone)
    sweep_training64) step "$1" 500 "$py" -m w2s.kernels.sweep --only forward64,attention64 ;;
    # the backward's tiles at the benchmark's D 128: dk/dv and dq, pointer loads and (three tiles each) TMA, and
    # three dk/dv tiles summing dq by atomic adds (both loads): 27 candidates, 3 or 4 compiles a worker
    sweep_backward128) step "$1" 200 "$py" -m w2s.kernels.sweep --only attention128 ;;
    # the attention forward at D = 128, causal and not: the table's launch against the deferred P V product at three
    # tiles, pointer loads and TMA (7 compiles)
    deferred128) step "$1" 90 "$py" -m w2s.kernels.sweep --only deferred128 ;;
    # D 256's forward, dk/dv and dq tiles with pointer loads at the sweep's Gemma-2-9B shape, against the tables'
    # unswept ones (18 compiles)
    tiles256) step "$1" 200 "$py" -m w2s.kernels.sweep --only tiles256 ;;
    # dk/dv at D 128: the table's tile with 4 warps (which spills) against 8 (4 compiles)
    dkdv128) step "$1" 90 "$py" -m w2s.kernels.sweep --only dkdv128 ;;
    # 8B, 64 prompts x 8 samples = 512 sequences x (128 -> 256), then batch-1 decode with its MBU and steady state
    bench_sampling) step "$1" 80 "$py" scripts/bench_sampling.py --prompts 64 --repeats 1 ;;
    gsm8k) step "$1" 60 "$py" scripts/bench_sampling.py --gsm8k --repeats 1 --no-batch1 ;;  # 256 x 8, EOS lengths
    # the same with chunked prefill (refilled slots' prompts inside the decode steps); compare with gsm8k's admission %
    gsm8k_chunked) step "$1" 60 "$py" scripts/bench_sampling.py --gsm8k --repeats 1 --no-batch1 --prefill-chunk 256 ;;
    # the same with a draining batch's samples left in their slots (compaction off): against gsm8k's tok/s and rows
    gsm8k_no_compact) step "$1" 60 "$py" scripts/bench_sampling.py --gsm8k --repeats 1 --no-batch1 --no-compact ;;
    # the same with nucleus sampling (top_p 0.95: every decode step sorts 512 rows of 128k logits); against
    # bench_sampling's tok/s it is what the sort costs (the paper samples at top_p 1, without it)
    top_p) step "$1" 80 "$py" scripts/bench_sampling.py --prompts 64 --repeats 1 --no-batch1 --top-p 0.95 ;;
    # the batch workload with each prompt's keys read from one of its samples' rows (meeting in L2): against
    # bench_sampling's tok/s; then the GSM8K-like one (slots refilled, siblings named anew) against gsm8k's
    share_prompt_reads)
      step "$1" 80 "$py" scripts/bench_sampling.py --prompts 64 --repeats 1 --no-batch1 --share-prompt-reads
      step share_prompt_reads_gsm8k 60 "$py" scripts/bench_sampling.py --gsm8k --repeats 1 --no-batch1 \
        --share-prompt-reads ;;
    # the same two workloads with the per-prompt cascade (each prompt's keys read once for its samples, then their
    # own keys, merged): against bench_sampling's and gsm8k's tok/s
    prompt_cascade)
      step "$1" 60 "$py" scripts/bench_sampling.py --prompts 64 --repeats 1 --no-batch1 --prompt-cascade
      step prompt_cascade_gsm8k 60 "$py" scripts/bench_sampling.py --gsm8k --repeats 1 --no-batch1 \
        --prompt-cascade ;;
    # the GSM8K-like workload with chunked prefill, without the cascade and with it (its plain steps read each prompt
    # once; the mixed steps each row's own keys)
    prompt_cascade_chunked)
      step gsm8k_chunked 60 "$py" scripts/bench_sampling.py --gsm8k --repeats 1 --no-batch1 --prefill-chunk 256
      step "$1" 60 "$py" scripts/bench_sampling.py --gsm8k --repeats 1 --no-batch1 --prefill-chunk 256 \
        --prompt-cascade ;;
    profile_sampling) step "$1" 150 "$py" scripts/bench_sampling.py --prompts 64 --repeats 1 --profile ;;
    cascade)  # ICL-shaped decode with the cascade over a 1024-token shared prefix, then with it turned off
      args="--shared-prefix 1024 --samples 1 --prompts 256 --new-tokens 64 --repeats 1 --no-batch1"
      step cascade_on 90 "$py" scripts/bench_sampling.py $args
      step cascade_off 90 "$py" -c "import runpy, sys; import w2s.ops as o; o.CASCADE_MIN_PREFIX = 10**9; \
sys.argv = ['bench_sampling.py'] + sys.argv[1:]; runpy.run_path('scripts/bench_sampling.py', run_name='__main__')" \
        $args ;;
    pipeline)  # the whole demo on CUDA in bf16, then the report's table of per-stage costs
      runs="${RUNS:-/tmp/w2s-gpu-runs}"
      rm -rf "$runs/demo-cuda"
      demo_cuda_recipe "$out/demo_cuda.toml"
      step "$1" 420 "$py" scripts/pipeline.py "$out/demo_cuda.toml" --runs "$runs" --no-progress
      step pipeline_report 30 "$py" -m w2s.cli report "$runs/demo-cuda" --no-plot
      cp "$out/pipeline_report.txt" "$out/pipeline_report.md" 2>/dev/null ;;
    *) echo "gpu_check.sh: unknown step $1" >> "$summary" ;;
  esac
}
if [ $# -eq 0 ]; then  # the default run: 120 + 90 + 90 + 70 + 60 + 80 + 60 = 570 s of limits
  set -- test_gpu train_llama32_1b train_llama32_3b dpo_mfu bench_attention bench_sampling gsm8k
fi
for name in "$@"; do run_step "$name"; done
cat "$summary"
