"""ops.mask_logits: the Triton backend against an fp32 einsum, values and gradients.

All decoder layers at once ([L, B, Q, C]) and one layer ([B, Q, C]); sizes that are not multiples
of any block; fp32/fp16/bf16; strided inputs read in place; empty batches; bad input rejected
before the backend runs. CPU runs use the Triton interpreter (conftest sets TRITON_INTERPRET=1).
"""
import pytest
import torch

from conftest import DEVICES
from fastmaskformer import ops
from fastmaskformer.ops.backends.triton import INTERPRET
from tolerances import assert_close
from backend_checks import assert_rejected_before_backend

ops.load_backends()

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TRITON_DEVICES = [d for d in DEVICES if d == "cuda" or INTERPRET]  # CUDA, and the CPU under the interpreter
# (mask_embed shape, pixel_embed shape): rows L*Q, channels C and pixels h*w off every block size.
SHAPES = [((3, 2, 5, 7), (2, 7, 6, 9)), ((2, 5, 33), (2, 33, 10, 14)), ((2, 1, 37, 40), (1, 40, 9, 13))]


def _inputs(e_shape, f_shape, device, dtype):
    return torch.randn(e_shape, device=device).to(dtype), torch.randn(f_shape, device=device).to(dtype)


def _check(e, f, dtype, grad_out=None):
    """Triton forward and gradients against the einsum of the same (rounded) inputs in fp32."""
    e, f = e.detach().requires_grad_(), f.detach().requires_grad_()
    e32, f32 = e.detach().float().requires_grad_(), f.detach().float().requires_grad_()
    out = ops.mask_logits(e, f, backend="triton")
    ref = ops.mask_logits(e32, f32, backend="reference")
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out, ref, dtype, what="mask logits")
    grad_out = torch.randn(out.shape, device=out.device) if grad_out is None else grad_out
    got = torch.autograd.grad(out, (e, f), grad_out.to(dtype))
    want = torch.autograd.grad(ref, (e32, f32), grad_out.to(dtype).float())
    for name, g, g_ref, x in zip(("mask_embed", "pixel_embed"), got, want, (e, f)):
        assert g.dtype == dtype and g.shape == x.shape
        assert_close(g, g_ref, dtype, what=f"d/d({name})", grad=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shapes", SHAPES, ids=str)
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_matches_reference(device, shapes, dtype):
    _check(*_inputs(*shapes, device, dtype), dtype)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_strided_inputs(device):
    """A permuted mask_embed and a channels-last pixel_embed with transposed spatial axes."""
    e = torch.randn(4, 2, 3, 9, device=device).permute(2, 1, 0, 3)  # [L=3, B=2, Q=4, C=9]
    f = torch.randn(2, 9, 11, 7, device=device).to(memory_format=torch.channels_last).transpose(2, 3)
    assert not e.is_contiguous() and not f.is_contiguous()
    _check(e, f, torch.float32)


@pytest.mark.parametrize("e_shape,f_shape", [((2, 3, 0, 8), (3, 8, 4, 5)), ((0, 3, 4, 8), (3, 8, 4, 5)),
                                             ((2, 0, 4, 8), (0, 8, 4, 5)), ((2, 3, 4, 0), (3, 0, 4, 5))], ids=str)
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_empty(device, e_shape, f_shape):
    """No queries, layers, images or channels: the empty (or all-zero, for C=0) einsum result."""
    _check(*_inputs(e_shape, f_shape, device, torch.float32), torch.float32)


def _bad_inputs(device):
    e, f = _inputs((2, 3, 4, 8), (3, 8, 4, 5), device, torch.float32)
    return [
        ("dtype mix", (e, f.half()), TypeError, "one dtype"),
        ("int dtype", (e.int(), f.int()), TypeError, "mask_embed"),
        ("channels", (e[..., :7], f), ValueError, "mask_embed"),
        ("batch", (e, f[:2]), ValueError, "mask_embed"),
        ("rank", (e[0, 0], f), ValueError, "mask_embed"),
        ("device mix", (e, torch.zeros(3, 8, 4, 5, device="meta")), ValueError, "meta"),
    ]


@pytest.mark.parametrize("case", range(6))
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_bad_input_raises_before_the_backend_runs(device, case, monkeypatch):
    assert_rejected_before_backend(ops.mask_logits, "triton", _bad_inputs(device)[case], monkeypatch)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_maskformer_shape_and_compile(dtype):
    """MaskFormer's channel count. Small integers make every product and partial sum exact in fp32
    (and the inputs exact in every dtype), so any summation order or TF32 split gives the einsum's
    values: random floats summed over C=256 differ between any two fp32 orders by more than the
    fp32 tolerance near zero."""
    e, f = (torch.randint(-8, 9, shape, device="cuda").to(dtype) for shape in ((6, 2, 100, 256), (2, 256, 32, 48)))
    assert ops.mask_logits.choose("auto", (e, f), {}).name == "triton"
    _check(e, f, dtype, grad_out=torch.randint(-2, 3, (6, 2, 100, 32, 48), device="cuda").float())
    compiled = torch.compile(ops.mask_logits.backends["triton"].fn, fullgraph=True)
    assert_close(compiled(e, f), ops.mask_logits(e, f, backend="triton"), dtype, what="compiled mask logits")
