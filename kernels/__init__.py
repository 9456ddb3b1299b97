"""Triton kernels (installed as igpt.kernels)."""
