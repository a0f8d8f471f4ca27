"""Triton kernels for w2s and their pure-PyTorch reference (reference.py). Selected through w2s/ops.py."""
