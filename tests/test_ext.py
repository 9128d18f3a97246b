"""fastmaskformer._C: it is built (with its CUDA sources on this machine) and its ops match PyTorch."""
import os

import pytest
import torch
import torch.nn.functional as F

import fastmaskformer
from fastmaskformer import _ext

from conftest import DEVICES


def test_extension_is_built():
    info = fastmaskformer.build_info()
    assert info["available"], info.get("error")
    assert info["version"] == fastmaskformer.__version__
    assert info["openmp"]
    if os.environ.get("FASTMASKFORMER_CUDA") != "0" and torch.version.cuda and os.path.exists(
            os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        # CI compiles the CUDA sources: a .cu file that does not compile fails here.
        assert info["with_cuda"], "nvcc and a CUDA torch are present, but _C was built without CUDA sources"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.float32, torch.float16])
@pytest.mark.parametrize("src,dst", [((37, 53), (10, 14)), ((12, 12), (24, 24)), ((8, 9), (8, 9)), ((5, 7), (64, 3))])
def test_resize_nearest_matches_interpolate(device, dtype, src, dst):
    x = torch.rand(3, *src, device=device)
    x = (x > 0.5).to(dtype) if dtype in (torch.bool, torch.uint8) else x.to(dtype)
    got = _ext.resize_nearest(x, dst)
    want = F.interpolate(x[:, None].float(), size=dst, mode="nearest")[:, 0].to(dtype)
    assert got.dtype == dtype and torch.equal(got, want)


def test_resize_nearest_non_contiguous_and_empty():
    x = torch.rand(6, 20, 30)[::2, :, ::3]
    assert torch.equal(_ext.resize_nearest(x, (7, 4)), F.interpolate(x[:, None], size=(7, 4), mode="nearest")[:, 0])
    assert _ext.resize_nearest(torch.zeros(0, 5, 5), (2, 2)).shape == (0, 2, 2)


def test_resize_nearest_bad_input():
    with pytest.raises(ValueError, match="expected a 3-d tensor"):
        _ext.resize_nearest(torch.zeros(5, 5), (2, 2))
    with pytest.raises(ValueError, match="expected positive sizes"):
        _ext.resize_nearest(torch.zeros(1, 5, 5), (0, 2))


def test_resize_nearest_fake_kernel_for_compile():
    torch.library.opcheck(torch.ops.fastmaskformer.resize_nearest.default, (torch.rand(2, 9, 7), 4, 5))
