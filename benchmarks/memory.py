"""Peak memory of a call, in MB, on CUDA (the caching allocator's peak) or on the CPU (the
process's peak resident set, reset through /proc/self/clear_refs before the call)."""
from __future__ import annotations

import ctypes
import gc
import re
from typing import Callable

import torch


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1)) / 1024


def _trim_heap() -> None:
    """Return freed heap pages to the OS: glibc keeps them resident after a warm-up call, and a
    measured call that reuses them would look as if it needed no memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def peak_extra_mb(fn: Callable[[], object], device: str = "cpu") -> float:
    """Peak memory above what was in use before ``fn()`` ran (its output included)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del out
        return (peak - base) / 2**20
    _trim_heap()
    base = _rss_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (the peak RSS) to the current RSS
    out = fn()
    peak = _rss_mb("VmHWM")
    del out
    return peak - base
