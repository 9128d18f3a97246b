"""ops.semantic_inference: the fused Triton kernel against the reference, scores and labels.

Non-integer scales, up- and downsampling, query and class counts off every block size (classes
spanning several blocks, so the running argmax crosses blocks), fp32/fp16/bf16, strided inputs,
argmax ties, empty inputs, no Q x H x W allocation, bad input rejected before the backend runs.
CPU runs use the Triton interpreter (conftest sets TRITON_INTERPRET=1).
"""
import pytest
import torch

from conftest import DEVICES
from fastmaskformer import ops
from fastmaskformer.ops.backends.triton import INTERPRET
from tolerances import assert_close
from test_mask_loss import _Allocations
from backend_checks import assert_rejected_before_backend

ops.load_backends()

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TRITON_DEVICES = [d for d in DEVICES if d == "cuda" or INTERPRET]  # CUDA, and the CPU under the interpreter
# (B, Q, K, h, w, H, W); K=40 spans two class blocks of the interpreter's config.
SHAPES = [(2, 5, 7, 10, 14, 37, 53), (1, 37, 40, 4, 6, 16, 13), (2, 3, 1, 6, 5, 6, 5), (1, 6, 4, 12, 15, 7, 9)]


def _inputs(B, Q, K, h, w, device, dtype=torch.float32):
    logits = (torch.randn(B, Q, K + 1, device=device) * 3).to(dtype)
    masks = (torch.randn(B, Q, h, w, device=device) * 4).to(dtype)
    return logits, masks


def _check_scores(logits, masks, size):
    got = ops.semantic_inference(logits, masks, size, backend="triton")
    want = ops.semantic_inference(logits, masks, size, backend="reference")
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert_close(got, want, what="scores")  # both accumulate in fp32 from the same rounded inputs


def _check_labels(logits, masks, size):
    """Equal to the reference's argmax wherever its top two scores differ by more than rounding."""
    got = ops.semantic_inference(logits, masks, size, return_labels=True, backend="triton")
    scores = ops.semantic_inference(logits, masks, size, backend="reference")
    assert got.dtype == torch.int64 and got.shape == scores[:, 0].shape
    if scores.shape[1] > 1:
        top2 = scores.topk(2, dim=1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-4
        assert clear.float().mean() > 0.9
        assert torch.equal(got[clear], scores.argmax(1)[clear])
    else:
        assert (got == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_matches_reference(device, shape, dtype):
    B, Q, K, h, w, H, W = shape
    logits, masks = _inputs(B, Q, K, h, w, device, dtype)
    _check_scores(logits, masks, (H, W))
    _check_labels(logits, masks, (H, W))


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_strided_inputs(device):
    logits = torch.randn(6, 2, 9, device=device).permute(1, 2, 0)  # [B=2, Q=9, K+1=6]
    masks = torch.randn(2, 9, 7, 5, device=device).to(memory_format=torch.channels_last).transpose(2, 3)
    assert not logits.is_contiguous() and not masks.is_contiguous()
    _check_scores(logits, masks, (19, 26))
    _check_labels(logits, masks, (19, 26))


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_ties_pick_the_lowest_class(device):
    """Classes 3 and 35 (different class blocks) get the same, largest score: argmax says 3, as
    torch.argmax does; with uniform classes every score ties and the label is 0.

    The uniform case makes the ties exact whatever the order of the sum over queries: 64 classes
    (probability 1/64) and zero mask logits (sigmoid 1/2), so every term is 2^-7 and every partial
    sum exact. With other values a tie is only a tie up to rounding, and the interpreter's tl.dot
    (NumPy's BLAS) rounds rows of one block differently on some CPUs: then the largest score wins,
    which is right, but not class 0."""
    logits, masks = _inputs(1, 5, 40, 3, 4, device)
    logits[..., :40] = -10.0
    logits[..., 3] = logits[..., 35] = 5.0
    labels = ops.semantic_inference(logits, masks, (9, 11), return_labels=True, backend="triton")
    assert (labels == 3).all()
    uniform, zero_masks = torch.zeros(1, 5, 64, device=device), torch.zeros(1, 5, 3, 4, device=device)
    scores = ops.semantic_inference(uniform, zero_masks, (9, 11), backend="triton")
    assert torch.equal(scores, torch.full_like(scores, 5 / 128))  # every class, every pixel: exact ties
    labels = ops.semantic_inference(uniform, zero_masks, (9, 11), return_labels=True, backend="triton")
    assert (labels == 0).all()


@pytest.mark.parametrize("return_labels", [False, True])
@pytest.mark.parametrize("B,Q", [(0, 4), (2, 0)])
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_empty(device, B, Q, return_labels):
    """No images, or no queries: every score is an empty sum, 0, and every label 0 (the reference's
    F.interpolate rejects Q = 0, so the expected values are written out)."""
    logits, masks = _inputs(B, Q, 3, 4, 4, device)
    got = ops.semantic_inference(logits, masks, (8, 6), return_labels=return_labels, backend="triton")
    want = torch.zeros((B, 8, 6) if return_labels else (B, 3, 8, 6), device=device,
                       dtype=torch.int64 if return_labels else torch.float32)
    assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_labels_never_allocate_scores_or_probabilities(device):
    """With return_labels the launcher allocates nothing larger than the int64 label map: neither the
    Q x H x W probabilities nor the K x H x W scores (both 4x larger here)."""
    from fastmaskformer.kernels import semantic_inference as k

    logits, masks = _inputs(1, 8, 8, 5, 5, device)
    with _Allocations() as seen:
        k._forward(logits, masks, [30, 30], True)
    assert 0 < seen.largest <= 8 * 30 * 30


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_declines_inputs_that_need_grad(device):
    logits, masks = _inputs(1, 3, 4, 5, 5, device)
    masks.requires_grad_()
    assert "no backward" in ops.semantic_inference.backends["triton"].supports(logits, masks, (8, 8))
    with torch.no_grad():
        assert ops.semantic_inference.backends["triton"].supports(logits, masks, (8, 8)) is None


def _bad_inputs(device):
    logits, masks = _inputs(2, 3, 4, 5, 5, device)
    return [
        ("size", (logits, masks, (0, 8)), ValueError, "output_size"),
        ("size rank", (logits, masks, (8,)), ValueError, "output_size"),
        ("dtype", (logits, masks.int(), (8, 8)), TypeError, "pred_masks"),
        ("queries", (logits, masks[:, :2], (8, 8)), ValueError, "pred_masks"),
        ("classes", (logits[..., :1], masks, (8, 8)), ValueError, "pred_logits"),
        ("device mix", (logits, torch.zeros(2, 3, 5, 5, device="meta"), (8, 8)), ValueError, "meta"),
    ]


@pytest.mark.parametrize("case", range(6))
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_bad_input_raises_before_the_backend_runs(device, case, monkeypatch):
    assert_rejected_before_backend(ops.semantic_inference, "triton", _bad_inputs(device)[case], monkeypatch)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_maskformer_shape_and_compile():
    logits, masks = _inputs(2, 100, 150, 32, 32, "cuda")
    assert ops.semantic_inference.choose("auto", (logits, masks, (128, 128)), {}).name == "triton"
    _check_scores(logits, masks, (128, 128))
    _check_labels(logits, masks, (128, 128))
    compiled = torch.compile(ops.semantic_inference.backends["triton"].fn, fullgraph=True)
    assert_close(compiled(logits, masks, (128, 128)),
                 ops.semantic_inference(logits, masks, (128, 128), backend="triton"), what="compiled scores")
