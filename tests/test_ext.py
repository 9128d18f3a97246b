"""fastmaskformer._C: it is built (with its CUDA sources on this machine) and its ops match PyTorch."""
import os
import sys

import pytest
import torch

import fastmaskformer
from fastmaskformer.config import REPO_ROOT

sys.path.insert(0, REPO_ROOT)
import build_config  # noqa: E402


def test_extension_is_built():
    info = fastmaskformer.build_info()
    assert info["available"], info.get("error")
    assert info["version"] == fastmaskformer.__version__
    # OpenMP is in the build exactly when setup.py's probe of this compiler (and FASTMASKFORMER_OPENMP) says so.
    assert info["openmp"] == build_config.probe_openmp(os.environ.get("FASTMASKFORMER_OPENMP")).enabled
    if os.environ.get("FASTMASKFORMER_CUDA") != "0" and torch.version.cuda and os.path.exists(
            os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        # CI compiles the CUDA sources: a .cu file that does not compile fails here.
        assert info["with_cuda"], "nvcc and a CUDA torch are present, but _C was built without CUDA sources"
