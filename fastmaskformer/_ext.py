"""Loading fastmaskformer._C, the C++/CUDA extension, and describing what it holds.

Importing this module never fails: when the extension is missing or does not load against the
installed torch, ``native_error()`` says why and the native backends report it as their reason.
"""
from __future__ import annotations

from typing import Optional

import torch

_C = None
_error: Optional[str] = None
try:
    from fastmaskformer import _C  # noqa: F811  (registers torch.ops.fastmaskformer.*)
except Exception as exc:  # not built, or built against another torch
    _error = f"fastmaskformer._C is not available ({type(exc).__name__}: {exc}); build it with `make build` " \
             f"or `pip install --no-build-isolation -e .`"


def native_error() -> Optional[str]:
    """None when _C is loaded, else why it is not."""
    return _error


def native_cuda_error() -> Optional[str]:
    """None when _C was built with its CUDA sources, else why not."""
    if _error is not None:
        return _error
    if not _C.build_info()["with_cuda"]:
        return "fastmaskformer._C was built without its CUDA sources (no nvcc, or FASTMASKFORMER_CUDA=0)"
    return None


def build_info() -> dict:
    if _error is not None:
        return {"available": False, "error": _error}
    return {"available": True, **_C.build_info()}


if _C is not None:
    # Fake (meta) kernels: output shapes for torch.compile / torch.export, no data touched.
    @torch.library.register_fake("fastmaskformer::resize_nearest")
    def _resize_nearest_fake(masks, out_h, out_w):
        return masks.new_empty((masks.shape[0], out_h, out_w))


def resize_nearest(masks: torch.Tensor, size) -> torch.Tensor:
    """F.interpolate(masks[:, None], size, mode="nearest")[:, 0] for a [N, H, W] stack of any dtype."""
    if _error is not None:
        raise RuntimeError(_error)
    return torch.ops.fastmaskformer.resize_nearest(masks, int(size[0]), int(size[1]))
