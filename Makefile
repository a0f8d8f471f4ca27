# w2s: the two commands a new user needs are `make demo` and `make test`.
PY ?= python3
TORCH_CPU ?= torch==2.13.0

.PHONY: install test test-gpu lint bench-kernels bench-sampling bench-train

# Installs torch only when none is importable (a GPU node keeps its own CUDA build); the pinned
# version resolves to the local CPU wheel on the development machines and in CI.
install:
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH_CPU)
	$(PY) -m pip install -e ".[dev]"

test:
	$(PY) -m pytest -q tests

test-gpu:
	$(PY) -m pytest -q -m gpu tests

lint:
	$(PY) -m ruff check w2s kernels scripts tests
