"""setup.py's build decisions (build_config), checked without building: the CUDA architecture list
it picks when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible, and the OpenMP flags it passes
(probed from the compiler, FASTMASKFORMER_OPENMP=0 forcing them off).

Why no second build with OpenMP off in CI: a build of _C costs minutes of the 2-core CI machine and
ninja cannot share objects between two flag sets, so CI checks the flags that reach the compiler
(below) and the real build's OpenMP state against the probe (tests/test_ext.py)."""
import os
import subprocess
import sys

import pytest
import torch
from torch.utils import cpp_extension

from fastmaskformer.config import REPO_ROOT

sys.path.insert(0, REPO_ROOT)
import build_config  # noqa: E402

TORCH_130 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]  # torch 2.14.1+cu130's get_arch_list()
NVCC_130 = ["compute_75", "compute_80", "compute_86", "compute_87", "compute_88", "compute_89", "compute_90",
            "compute_100", "compute_110", "compute_103", "compute_120", "compute_121"]  # nvcc 13.0 --list-gpu-arch


@pytest.mark.parametrize("env, gpus, nvcc, expected", [
    # No GPU to ask and nothing set: torch's own architectures, PTX of the newest for later GPUs.
    (None, 0, NVCC_130, "7.5;8.0;8.6;9.0;10.0;12.0+PTX"),
    ("", 0, NVCC_130, "7.5;8.0;8.6;9.0;10.0;12.0+PTX"),
    ("  ", 0, None, "7.5;8.0;8.6;9.0;10.0;12.0+PTX"),  # nvcc's list unknown: torch's alone
    (None, 0, ["compute_75", "compute_80", "compute_90"], "7.5;8.0;9.0+PTX"),  # an older nvcc: what it can build
    ("9.0", 0, NVCC_130, None),  # the user's choice stands
    ("8.0;9.0+PTX", 2, NVCC_130, None),
    (None, 1, NVCC_130, None),  # a visible GPU: torch builds for it
])
def test_cuda_arch_list_decision(env, gpus, nvcc, expected):
    value, why = build_config.cuda_arch_list(env, gpus, TORCH_130, nvcc)
    assert value == expected
    if expected is not None:
        assert "no GPU visible" in why and expected in why
    elif env and env.strip():
        assert env in why
    else:
        assert f"{gpus} visible GPU" in why


def test_cuda_arch_list_without_a_common_architecture():
    with pytest.raises(ValueError, match=r"no CUDA architecture .*sm_50.*compute_90.*set TORCH_CUDA_ARCH_LIST"):
        build_config.cuda_arch_list(None, 0, ["sm_50"], ["compute_90"])


def test_torch_accepts_the_default(monkeypatch):
    """The chosen list is one that torch's cpp_extension turns into nvcc flags: one -gencode per
    architecture, and compute_120 PTX for the newest."""
    value, _ = build_config.cuda_arch_list(None, 0, TORCH_130, NVCC_130)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", value)
    flags = cpp_extension._get_cuda_arch_flags()
    sass = sorted(f.split(",code=")[1] for f in flags if ",code=sm_" in f)
    assert sass == sorted(["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"])
    assert ["-gencode=arch=compute_120,code=compute_120"] == [f for f in flags if ",code=compute_" in f]


def _setup_py_output(**env_changes):
    """stdout of ``setup.py --version`` (it configures the extension without compiling it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_CUDA_ARCH_LIST", "FASTMASKFORMER_CUDA",
                                                             "FASTMASKFORMER_NO_EXT", "FASTMASKFORMER_OPENMP")}
    env.update(env_changes)
    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return [ln for ln in out.stdout.splitlines() if ln.startswith("fastmaskformer:")]


def test_setup_py_reports_its_choice_on_this_machine():
    """What `pip install -e .` prints here, from the real probes (torch, nvcc, GPUs): setup.py is run
    with --version, which configures the extension without compiling it."""
    lines = _setup_py_output()
    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        assert any("skipping the CUDA sources" in ln for ln in lines), lines
        return
    gpus, torch_archs, nvcc_archs = build_config.probe_cuda_archs(cpp_extension.CUDA_HOME)
    assert torch_archs == torch.cuda.get_arch_list() and gpus == torch.cuda.device_count()
    expected, _ = build_config.cuda_arch_list(None, gpus, torch_archs, nvcc_archs)
    if gpus:
        assert any(f"{gpus} visible GPU" in ln for ln in lines), lines
    else:
        assert any(f"no GPU visible: building for {expected}," in ln for ln in lines), lines


# ---------------------------------------------------------------------------------------------- OpenMP
def _accepts(*flags):
    return lambda flag: flag in flags


@pytest.mark.parametrize("setting, supported, enabled, cxx, why", [
    (None, ("-fopenmp", "-fopenmp-simd"), True, ("-fopenmp",), "the compiler supports it"),
    ("1", ("-fopenmp", "-fopenmp-simd"), True, ("-fopenmp",), "FASTMASKFORMER_OPENMP=1"),
    ("0", ("-fopenmp", "-fopenmp-simd"), False, ("-fopenmp-simd",), "FASTMASKFORMER_OPENMP=0"),
    ("", ("-fopenmp-simd",), False, ("-fopenmp-simd",), "does not support -fopenmp"),  # Apple clang
    ("", (), False, ("-Wno-unknown-pragmas",), "does not support -fopenmp"),
])
def test_openmp_decision(setting, supported, enabled, cxx, why):
    omp = build_config.choose_openmp(setting, _accepts(*supported))
    assert (omp.enabled, omp.cxx_flags, omp.link_flags) == (enabled, cxx, ("-fopenmp",) if enabled else ())
    assert why in omp.reason


def test_openmp_required_but_missing_or_misspelt():
    with pytest.raises(ValueError, match="FASTMASKFORMER_OPENMP=1, but the C\\+\\+ compiler does not"):
        build_config.choose_openmp("1", _accepts("-fopenmp-simd"))
    with pytest.raises(ValueError, match="FASTMASKFORMER_OPENMP: expected 0, 1 or unset, got 'yes'"):
        build_config.choose_openmp("yes", _accepts())


@pytest.mark.parametrize("with_cuda", [False, True])
def test_extension_flags_without_openmp(with_cuda):
    """What setup.py hands the compilers and the linker when OpenMP is off: no -fopenmp anywhere."""
    off = build_config.choose_openmp("0", _accepts("-fopenmp", "-fopenmp-simd"))
    flags = build_config.compile_flags("9.9.9", off, with_cuda)
    assert flags["extra_link_args"] == []
    assert flags["extra_compile_args"]["cxx"] == ["-O3", "-fopenmp-simd", '-DFMF_VERSION="9.9.9"']
    assert set(flags["extra_compile_args"]) == ({"cxx", "nvcc"} if with_cuda else {"cxx"})
    on = build_config.compile_flags("9.9.9", build_config.choose_openmp("", _accepts("-fopenmp")), with_cuda)
    assert on["extra_link_args"] == ["-fopenmp"] and "-fopenmp" in on["extra_compile_args"]["cxx"]


@pytest.fixture
def compiler_without_openmp(tmp_path):
    """A C++ compiler that, like Apple's clang, rejects -fopenmp (and compiles everything else)."""
    path = tmp_path / "c++-no-openmp"
    path.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = "-fopenmp" ] && { echo "unsupported option '
                    "'-fopenmp'\" >&2; exit 1; }; done\nexec c++ \"$@\"\n")
    path.chmod(0o755)
    return str(path)


def test_probe_on_this_machine_and_on_a_compiler_without_openmp(compiler_without_openmp):
    import shutil

    assert shutil.which("c++")
    version = subprocess.run(["c++", "--version"], capture_output=True, text=True).stdout
    if "Free Software Foundation" in version:  # GCC (CI's compiler) ships libgomp
        assert build_config.probe_openmp(None, "c++").enabled
    omp = build_config.probe_openmp(None, compiler_without_openmp)
    assert not omp.enabled and omp.cxx_flags == ("-fopenmp-simd",) and omp.link_flags == ()
    assert not build_config.probe_openmp("0", "c++").enabled


def test_setup_py_configures_without_openmp(compiler_without_openmp):
    assert "fastmaskformer: OpenMP off (FASTMASKFORMER_OPENMP=0); CPU ops run their parallel loops on one thread" \
        in _setup_py_output(FASTMASKFORMER_OPENMP="0", FASTMASKFORMER_CUDA="0")
    lines = _setup_py_output(CXX=compiler_without_openmp, FASTMASKFORMER_CUDA="0")
    assert any("OpenMP off (the C++ compiler does not support -fopenmp)" in ln for ln in lines), lines
    assert "fastmaskformer: OpenMP on (the compiler supports it)" in _setup_py_output(FASTMASKFORMER_CUDA="0")
