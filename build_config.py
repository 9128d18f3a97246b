"""The decisions setup.py makes before it compiles fastmaskformer._C, as functions that tests can call
without building anything: which CUDA architectures to build for when nobody said, and whether the
C++ compiler takes OpenMP.

Each decision is a pure function of its inputs (``cuda_arch_list``, ``choose_openmp``) plus a probe
that gathers those inputs from the machine (``probe_cuda_archs``, ``compiler_accepts``).
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

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


# -------------------------------------------------------------------------------------------- OpenMP

OPENMP_TEST = """\
#include <omp.h>
int main() {
  int n = 0;
#pragma omp parallel reduction(+ : n)
  n += 1;
  return n == omp_get_max_threads() ? 0 : 1;
}
"""
SIMD_TEST = """\
int main() {
  float a[8] = {0};
#pragma omp simd
  for (int i = 0; i < 8; ++i) a[i] += 1.0f;
  return a[7] == 1.0f ? 0 : 1;
}
"""


def compiler_accepts(flag: str, source: str, compiler: Optional[str] = None) -> bool:
    """Whether ``compiler`` (default: $CXX or c++, the compiler torch's cpp_extension uses) compiles
    and links ``source`` with ``flag`` in both steps."""
    compiler = shlex.split(compiler or os.environ.get("CXX") or "c++")
    with tempfile.TemporaryDirectory(prefix="fmf_probe_") as d:
        src = os.path.join(d, "probe.cpp")
        with open(src, "w") as f:
            f.write(source)
        try:
            out = subprocess.run([*compiler, flag, src, "-o", os.path.join(d, "probe")], capture_output=True,
                                 timeout=120)
        except (OSError, subprocess.SubprocessError):
            return False
        return out.returncode == 0


@dataclass(frozen=True)
class OpenMP:
    """The OpenMP decision: ``enabled`` (OpenMP runtime: -fopenmp), the compile and link flags, and why."""

    enabled: bool
    cxx_flags: Tuple[str, ...]
    link_flags: Tuple[str, ...]
    reason: str


def choose_openmp(setting: Optional[str], accepts: Callable[[str], bool]) -> OpenMP:
    """OpenMP flags for ``setting`` (FASTMASKFORMER_OPENMP: "" or None = use it when the compiler
    takes it, "0" = off, "1" = required) and ``accepts(flag)``, the compiler probe.

    Without the runtime the CPU kernels still build and give the same results: their
    ``at::parallel_for`` loops run on one thread (ATen's header-only OpenMP path needs _OPENMP), and
    ``#pragma omp simd`` hints keep working under ``-fopenmp-simd`` where the compiler has it.
    """
    setting = (setting or "").strip()
    if setting not in ("", "0", "1"):
        raise ValueError(f"FASTMASKFORMER_OPENMP: expected 0, 1 or unset, got {setting!r}")
    if setting != "0":
        if accepts("-fopenmp"):
            why = "FASTMASKFORMER_OPENMP=1" if setting == "1" else "the compiler supports it"
            return OpenMP(True, ("-fopenmp",), ("-fopenmp",), f"OpenMP on ({why})")
        if setting == "1":
            raise ValueError("FASTMASKFORMER_OPENMP=1, but the C++ compiler does not compile and link -fopenmp "
                             "(Apple clang: install libomp, or unset FASTMASKFORMER_OPENMP)")
        why = "the C++ compiler does not support -fopenmp"
    else:
        why = "FASTMASKFORMER_OPENMP=0"
    # Without -fopenmp, the `#pragma omp simd` loops are unknown pragmas: -fopenmp-simd keeps them as
    # vectorization hints (no runtime library needed); otherwise silence the warning.
    simd = ("-fopenmp-simd",) if accepts("-fopenmp-simd") else ("-Wno-unknown-pragmas",)
    return OpenMP(False, simd, (), f"OpenMP off ({why}); CPU ops run their parallel loops on one thread")


def probe_openmp(setting: Optional[str], compiler: Optional[str] = None) -> OpenMP:
    """``choose_openmp`` with this machine's C++ compiler as the probe."""
    sources = {"-fopenmp": OPENMP_TEST, "-fopenmp-simd": SIMD_TEST}
    return choose_openmp(setting, lambda flag: compiler_accepts(flag, sources[flag], compiler))


# ------------------------------------------------------------------------------------------- flags


def compile_flags(version: str, openmp: OpenMP, with_cuda: bool) -> dict:
    """``extra_compile_args`` (``{"cxx": [...]}``, plus ``"nvcc"`` with CUDA) and ``extra_link_args``
    of the extension."""
    version_macro = f'-DFMF_VERSION="{version}"'
    compile_args = {"cxx": ["-O3", *openmp.cxx_flags, version_macro]}
    if with_cuda:
        compile_args["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", version_macro]
    return {"extra_compile_args": compile_args, "extra_link_args": list(openmp.link_flags)}
