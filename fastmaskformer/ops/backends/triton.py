"""Triton backends of the ops (kernels live in the top-level kernels/ package)."""
