"""Triton kernels of fastmaskformer (installed as fastmaskformer.kernels)."""
