"""setup.py's build decisions (build_config), checked without building: the CUDA architecture list
it picks when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible."""
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


def test_setup_py_reports_its_choice_on_this_machine():
    """What `pip install -e .` prints here, from the real probes (torch, nvcc, GPUs): setup.py is run
    with --version, which configures the extension without compiling it."""
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_CUDA_ARCH_LIST", "FASTMASKFORMER_CUDA",
                                                             "FASTMASKFORMER_NO_EXT")}
    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("fastmaskformer:")]
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
