# w2s: the two commands a new user needs are `make demo` and `make test`; each installs what it needs first.
PY ?= python3
TORCH_CPU ?= torch==2.13.0
NPROC ?= 1
# One process: plain python. Several: torchrun (sampling shards prompts, training uses FSDP2).
LAUNCH = $(if $(filter 1,$(NPROC)),$(PY),$(PY) -m torch.distributed.run --nproc_per_node=$(NPROC))

.PHONY: help reinstall install test test-gpu check-sm90 lint demo demo-pretrain demo-seeds demo-compare gsm8k math bench-kernels bench-sampling bench-train

# Every target that runs code depends on the install stamp, so a fresh clone needs no separate `make install`. The
# stamp is named after the interpreter's environment (sys.prefix): another virtual environment installs again, and so
# does any change to setup.py. Git ignores it (.gitignore: .install-*). When the environment's `w2s` is another
# checkout's (a second clone installed into the same environment since), the stamp is stale and the install reruns.
STAMP := .install-$(shell $(PY) -c "import hashlib, sys; print(hashlib.sha1(sys.prefix.encode()).hexdigest()[:10])")
INSTALLED_HERE := $(shell cd / && $(PY) -I -c "import importlib.util as u, os; s = u.find_spec('w2s'); \
	print(int(bool(s and s.origin) and os.path.realpath(s.origin).startswith(os.path.realpath('$(CURDIR)') + os.sep)))")

help:
	@echo "w2s: make demo (the paper's pipeline on a miniature world, CPU) and make test (the test suite) come first."
	@echo "  make install | test | lint | test-gpu | check-sm90 (compile every Triton kernel for Hopper, no GPU needed)"
	@echo "  make demo | demo-seeds | demo-compare | demo-olympic | demo-pretrain (rebuild demo/)"
	@echo "  make gsm8k | math | olympicarena NPROC=8 [RECIPE=...] [DRY=1 [GPU=\"H100 SXM\"]]: the paper's runs"
	@echo "  make bench-kernels | bench-sampling | bench-train; GPU checks: OUT=gpu_out bash scripts/gpu_check.sh"
	@echo "  PY=python3 (the interpreter), NPROC=1 (processes: torchrun when > 1)"

install: $(STAMP)

# Installs torch only when none is importable (a GPU node keeps its own CUDA build); the pinned
# version resolves to the local CPU wheel on the development machines and in CI.
$(STAMP): setup.py $(if $(filter 1,$(INSTALLED_HERE)),,reinstall)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH_CPU)
	$(PY) -m pip install -e ".[dev,plot]"
	@touch $@

# Two pytest workers (pytest-xdist), each file on one worker so its module fixtures are built once; TEST_JOBS=1:
# one process, in file order.
TEST_JOBS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q $(if $(filter 1,$(TEST_JOBS)),,-n $(TEST_JOBS) --dist loadfile) tests

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu tests

# Compile every Triton kernel for an H100 (sm_90a) without a GPU: shared memory, registers, spills per variant
# (one compile process a core, up to 8).
check-sm90: $(STAMP)
	env -u TRITON_INTERPRET $(PY) -m w2s.kernels.compile_check

lint: $(STAMP)
	$(PY) -m ruff check w2s scripts tests

# The demo: every stage of the paper on the miniature world (w2s/world.py) with the tiny bases shipped in demo/, on
# CPU. One thread: for models this small, a second thread costs more in synchronization than it gains.
DEMO_THREADS ?= 1

demo: $(STAMP)
	OMP_NUM_THREADS=$(DEMO_THREADS) $(PY) scripts/pipeline.py recipes/demo.toml

# Rebuild demo/ (world data, tokenizer, weak + strong bases, PRETRAIN.json with the probe); ~20 min on 2 cores.
demo-pretrain: $(STAMP)
	$(PY) scripts/pretrain_demo.py --threads 1 --probe 200

# The demo over seeds 0, 1, 2 (split, demos, pairs, batch order): runs/demo-seed{0,1,2}/ and a mean/spread table.
demo-seeds: $(STAMP)
	OMP_NUM_THREADS=$(DEMO_THREADS) $(PY) scripts/demo_seeds.py --recipe recipes/demo.toml --seeds 0 1 2

# The paper's Stage II (DPO) beside the options beyond it (docs/PAPER.md) over seeds 0, 1, 2, Stage I shared between
# variants: runs/demo-seed{0,1,2}-<variant>/ and one table (accuracy mean/spread, PGR, pairs, minutes).
demo-compare: $(STAMP)
	OMP_NUM_THREADS=$(DEMO_THREADS) $(PY) scripts/demo_compare.py --recipe recipes/demo.toml --seeds 0 1 2

# The paper's experiments: make gsm8k NPROC=8 [RECIPE=recipes/gsm8k.toml] [DRY=1: list the stages and estimate the
# run's tokens, disk, memory and time for NPROC processes, running nothing; GPU="H100 SXM": the times for that GPU
# when the planning machine has another or none]
RUN_RECIPE = $(if $(DRY),$(PY) scripts/pipeline.py $(1) --dry-run --world-size $(NPROC) $(if $(GPU),--gpu "$(GPU)"),\
	$(LAUNCH) scripts/pipeline.py $(1))

gsm8k: $(STAMP)
	$(call RUN_RECIPE,$(or $(RECIPE),recipes/gsm8k.toml))

math: $(STAMP)
	$(call RUN_RECIPE,$(or $(RECIPE),recipes/math.toml))

bench-kernels: $(STAMP)
	$(PY) -m w2s.kernels.bench

bench-sampling: $(STAMP)
	$(PY) scripts/bench_sampling.py

bench-train: $(STAMP)
	$(PY) scripts/bench_train.py

# The setting without gold (docs/PAPER.md, OlympicArena). make olympicarena NPROC=8 [DRY=1]: Llama-3-8B-Instruct
# supervising Llama-3-70B, the weak model used as is, no ceiling. demo-olympic: the same on the miniature world
# (recipes/demo_olympic.toml, docs/DEMO_WORLD.md); demo-olympic-build rebuilds its data and models from demo/.
.PHONY: olympicarena demo-olympic demo-olympic-seeds demo-olympic-build

olympicarena: $(STAMP)
	$(call RUN_RECIPE,$(or $(RECIPE),recipes/olympicarena.toml))

demo-olympic: $(STAMP)
	OMP_NUM_THREADS=$(DEMO_THREADS) $(PY) scripts/pipeline.py recipes/demo_olympic.toml

demo-olympic-seeds: $(STAMP)
	OMP_NUM_THREADS=$(DEMO_THREADS) $(PY) scripts/demo_seeds.py --recipe recipes/demo_olympic.toml --seeds 0 1 2

demo-olympic-build: $(STAMP)
	$(PY) scripts/pretrain_demo.py --olympic --threads 1
