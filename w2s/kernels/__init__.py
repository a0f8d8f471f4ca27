"""Triton kernels for w2s and their pure-PyTorch reference (reference.py). Selected through w2s/ops.py.

Test: python -m pytest -q tests/test_kernels.py tests/test_kernel_attention.py tests/test_kernel_matvec.py
(CPU, TRITON_INTERPRET=1); make check-sm90 compiles every kernel for Hopper without a GPU; make test-gpu runs the bf16
tests on a GPU.
"""
