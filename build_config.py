"""The decisions setup.py makes before it compiles fastmaskformer._C, as functions that tests can call
without building anything: which CUDA architectures to build for when nobody said.

Each decision is a pure function of its inputs (``cuda_arch_list``) plus a probe that gathers those
inputs from the machine (``probe_cuda_archs``).
"""
from __future__ import annotations

import os
import re
import subprocess
from typing import List, Optional, Sequence, Tuple

# ---------------------------------------------------------------------------------------------- CUDA


def _arch_number(name: str) -> Optional[Tuple[int, int]]:
    """"sm_90" / "compute_90" / "sm_90a" / "9.0" -> (9, 0); None for anything else."""
    m = re.fullmatch(r"(?:sm_|compute_)(\d+)(\d)[a-z]?|(\d+)\.(\d)", name.strip())
    if m is None:
        return None
    major, minor = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    return int(major), int(minor)


def cuda_arch_list(env_value: Optional[str], visible_gpus: int, torch_archs: Sequence[str],
                   nvcc_archs: Optional[Sequence[str]]) -> Tuple[Optional[str], str]:
    """The TORCH_CUDA_ARCH_LIST to set, and why.

    Returns ``(None, why)`` when the variable should be left alone: it is set, or a GPU is visible
    (torch then builds for the visible GPUs' architectures). Otherwise torch's cpp_extension has
    nothing to ask and fails (``IndexError`` in ``_get_cuda_arch_flags`` on torch 2.x), so the
    default is every architecture the installed torch itself was built for (``torch_archs``, e.g.
    ``torch.cuda.get_arch_list()``), kept to those ``nvcc`` can compile (``nvcc_archs``, from
    ``nvcc --list-gpu-arch``; None when unknown), with PTX of the newest for GPUs newer than all of
    them: the extension then runs on every GPU that torch runs on.
    """
    if env_value is not None and env_value.strip():
        return None, f"TORCH_CUDA_ARCH_LIST={env_value.strip()} (from the environment)"
    if visible_gpus > 0:
        return None, f"TORCH_CUDA_ARCH_LIST unset: torch builds for the {visible_gpus} visible GPU(s)"
    archs = sorted({a for a in map(_arch_number, torch_archs) if a is not None})
    if nvcc_archs is not None:
        nvcc = {a for a in map(_arch_number, nvcc_archs) if a is not None}
        archs = [a for a in archs if a in nvcc]
    if not archs:
        raise ValueError(f"no CUDA architecture that both torch ({list(torch_archs)}) and nvcc "
                         f"({None if nvcc_archs is None else list(nvcc_archs)}) support; set TORCH_CUDA_ARCH_LIST")
    value = ";".join(f"{major}.{minor}" for major, minor in archs) + "+PTX"
    return value, (f"TORCH_CUDA_ARCH_LIST unset and no GPU visible: building for {value}, the architectures "
                   "this torch was built for (set TORCH_CUDA_ARCH_LIST, e.g. 9.0, to build faster for one GPU)")


def probe_cuda_archs(cuda_home: Optional[str]) -> Tuple[int, List[str], Optional[List[str]]]:
    """(visible GPUs, torch's architectures, nvcc's architectures or None) on this machine."""
    import torch

    nvcc_archs = None
    if cuda_home:
        try:
            out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--list-gpu-arch"], capture_output=True,
                                 text=True, timeout=60)
            if out.returncode == 0:
                nvcc_archs = out.stdout.split()
        except (OSError, subprocess.SubprocessError):
            pass
    return torch.cuda.device_count(), torch.cuda.get_arch_list(), nvcc_archs
