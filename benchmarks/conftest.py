"""Benchmarks run with `pytest benchmarks/ --benchmark-only` (or `make bench`). Each records its
peak memory in extra_info["peak_mb"] next to the time, and the device it ran on."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
