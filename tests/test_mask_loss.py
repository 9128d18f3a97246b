"""ops.mask_loss: every fused backend that runs on this machine against the reference.

Forward values and gradients at odd sizes and non-integer scales, in fp32/fp16/bf16, with bool,
uint8 and soft float targets, empty and degenerate inputs, saturated logits and strided views; a
finite-difference check of each fused backward; bad input rejected before any backend runs. The
Triton backend runs on CPU tensors under the interpreter (conftest sets TRITON_INTERPRET=1).
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import DEVICES
from fastmaskformer import ops
from tolerances import assert_close
from backend_checks import assert_rejected_before_backend

ops.load_backends()
BACKENDS = [b for b in ("triton", "native")
            if b in ops.mask_loss.backends and ops.mask_loss.backends[b].available() is None]


def _takes(backend: str, device: str) -> bool:
    probe = (torch.zeros(1, 2, 2, device=device), torch.zeros(1, 4, 4, dtype=torch.bool, device=device), 1.0)
    return ops.mask_loss.backends[backend].supports(*probe) is None


CASES = [pytest.param(b, d, id=f"{b}-{d}") for b in BACKENDS for d in DEVICES if _takes(b, d)]
TRITON_DEVICES = [d for d in DEVICES if "triton" in BACKENDS and _takes("triton", d)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (N, h, w, H, W): non-integer scales, x4, identity, a 1-pixel-high prediction, an uneven mix,
# several low-res tiles per mask, and targets larger than one pixel block (loops over blocks).
SHAPES = [(3, 10, 14, 37, 53), (2, 5, 7, 20, 28), (1, 12, 12, 12, 12), (4, 1, 3, 9, 16), (2, 6, 3, 13, 40),
          (1, 20, 18, 41, 37), (1, 5, 4, 150, 130)]


def _logits(N, h, w, device, dtype=torch.float32, spread=3.0):
    return (torch.randn(N, h, w, device=device) * spread).to(dtype)


def _masks(N, H, W, device, dtype=torch.bool):
    t = torch.rand(N, H, W, device=device)
    return t if dtype.is_floating_point else (t > 0.5).to(dtype)


def _run(backend, x, t, num_masks=2.0, alpha=0.25, gamma=2.0):
    """Both losses and d(0.7 loss_mask + 1.3 loss_dice)/dx, so each term's gradient path counts."""
    x = x.detach().requires_grad_()
    losses = ops.mask_loss(x, t, num_masks, alpha, gamma, backend=backend)
    weights = [torch.tensor(c, device=x.device) for c in (0.7, 1.3)]
    (grad,) = torch.autograd.grad(losses, x, weights)
    return losses, grad


def _check(backend, x, t, dtype=torch.float32, **kw):
    (mask, dice), grad = _run(backend, x, t, **kw)
    (mask_ref, dice_ref), grad_ref = _run("reference", x, t, **kw)
    assert_close(mask, mask_ref, dtype, what=f"{backend} loss_mask")
    assert_close(dice, dice_ref, dtype, what=f"{backend} loss_dice")
    assert grad.dtype == x.dtype and grad.shape == x.shape
    assert_close(grad, grad_ref, dtype, what=f"{backend} d/d(pred_masks)", grad=True)
    return grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend,device", CASES)
def test_matches_reference(backend, device, shape, dtype):
    N, h, w, H, W = shape
    _check(backend, _logits(N, h, w, device, dtype), _masks(N, H, W, device), dtype)


@pytest.mark.parametrize("alpha,gamma", [(-1.0, 2.0), (0.25, 0.0), (0.5, 1.0), (0.25, 2.5), (0.9, 0.5)])
@pytest.mark.parametrize("backend,device", CASES)
def test_focal_parameters(backend, device, alpha, gamma):
    _check(backend, _logits(2, 5, 6, device), _masks(2, 17, 19, device), alpha=alpha, gamma=gamma, num_masks=3.0)


@pytest.mark.parametrize("target_dtype", [torch.uint8, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("backend,device", CASES)
def test_target_dtypes(backend, device, target_dtype):
    """uint8 like bool; float targets are soft labels in [0, 1], as the reference reads them."""
    _check(backend, _logits(2, 5, 6, device), _masks(2, 17, 19, device, target_dtype))


@pytest.mark.parametrize("fill", [0, 1])
@pytest.mark.parametrize("backend,device", CASES)
def test_constant_targets(backend, device, fill):
    _check(backend, _logits(2, 4, 5, device), torch.full((2, 16, 21), bool(fill), device=device))


@pytest.mark.parametrize("kind", ["+-100", "randn*100"])
@pytest.mark.parametrize("backend,device", CASES)
def test_saturated_logits_stay_finite(backend, device, kind):
    N, h, w, H, W = 2, 5, 6, 18, 23
    if kind == "+-100":
        x = 100.0 * torch.randint(0, 2, (N, h, w), device=device).float().mul(2).sub(1)
    else:
        x = _logits(N, h, w, device, spread=100.0)
    grad = _check(backend, x, _masks(N, H, W, device))
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("backend,device", CASES)
def test_saturated_logits_any_gamma(backend, device, gamma):
    """Logits of +-100 (half the low-res rows) beside moderate ones, for gamma in {0, 0.5, 1, 2}: the
    fused gradient is finite everywhere and equals the reference wherever the reference's is. For
    gamma < 1 torch's own pow backward is not finite there: (1 - p_t)^gamma at 1 - p_t == 0 has an
    infinite slope times a zero dp_t/dx, which autograd turns into NaN (asserted below, so the
    comparison is known to skip only those entries); gamma in {0, 1, 2} is finite everywhere."""
    x = _logits(3, 8, 6, device)
    x[:, :4] = torch.where(torch.rand(3, 4, 6, device=device) > 0.5, 100.0, -100.0)
    t = _masks(3, 29, 22, device)
    (mask, dice), grad = _run(backend, x, t, gamma=gamma)
    (mask_ref, dice_ref), grad_ref = _run("reference", x, t, gamma=gamma)
    assert_close(mask, mask_ref, what=f"{backend} loss_mask")
    assert_close(dice, dice_ref, what=f"{backend} loss_dice")
    assert torch.isfinite(grad).all(), f"{backend}: non-finite gradient at gamma={gamma}"
    finite = torch.isfinite(grad_ref)
    assert finite.all() == (gamma not in (0.5,)), f"reference finiteness at gamma={gamma}"
    assert finite[:, 6:].all()  # the moderate rows the saturated ones do not reach
    assert_close(grad[finite], grad_ref[finite], what=f"{backend} d/d(pred_masks)", grad=True)


@pytest.mark.parametrize("backend,device", CASES)
def test_strided_inputs(backend, device):
    """Transposed predictions and a strided, offset slice of the targets, read without copies."""
    x = _logits(3, 7, 5, device).transpose(1, 2)
    t = _masks(3, 2 * 23, 3 * 31 + 1, device)[:, 1::2, 1::3]
    assert not x.is_contiguous() and not t.is_contiguous()
    _check(backend, x, t)


@pytest.mark.parametrize("backend,device", CASES)
def test_empty_batch(backend, device):
    (mask, dice), grad = _run(backend, _logits(0, 5, 6, device), _masks(0, 20, 24, device))
    assert mask.item() == 0.0 and dice.item() == 0.0 and grad.shape == (0, 5, 6)


@pytest.mark.parametrize("backend,device", CASES)
def test_gradient_matches_finite_differences(backend, device):
    """The fused backward against central differences of the fused forward itself (fp32)."""
    x = _logits(2, 3, 4, device, spread=1.0)
    t = _masks(2, 7, 9, device)
    _, grad = _run(backend, x, t)
    eps, numeric = 1e-2, torch.zeros_like(x)

    def loss(z):
        mask, dice = ops.mask_loss(z, t, 2.0, backend=backend)
        return (0.7 * mask + 1.3 * dice).double()

    for i in range(x.numel()):
        step = torch.zeros_like(x).flatten()
        step[i] = eps
        numeric.view(-1)[i] = (loss(x + step.view_as(x)) - loss(x - step.view_as(x))) / (2 * eps)
    torch.testing.assert_close(grad, numeric, rtol=2e-2, atol=2e-5)


@pytest.mark.parametrize("backend,device", CASES)
def test_deterministic(backend, device):
    x, t = _logits(3, 9, 11, device), _masks(3, 31, 29, device)
    (a, b), g = _run(backend, x, t)
    (a2, b2), g2 = _run(backend, x, t)
    assert torch.equal(a, a2) and torch.equal(b, b2) and torch.equal(g, g2)


def _bad_inputs(device):
    x, t = _logits(2, 8, 8, device), _masks(2, 16, 16, device)
    return [
        ("target smaller", (x, _masks(2, 8, 7, device), 1.0), ValueError, "at least the prediction's"),
        ("pred dtype", (x.to(torch.int32), t, 1.0), TypeError, "pred_masks"),
        ("target dtype", (x, t.to(torch.int64), 1.0), TypeError, "target_masks"),
        ("count", (x, t[:1], 1.0), ValueError, "target_masks"),
        ("device mix", (x, torch.zeros(2, 16, 16, dtype=torch.bool, device="meta"), 1.0), ValueError, "meta"),
        ("num_masks", (x, t, 0.0), ValueError, "num_masks"),
    ]


@pytest.mark.parametrize("case", range(6))
@pytest.mark.parametrize("backend,device", CASES)
def test_bad_input_raises_before_the_backend_runs(backend, device, case, monkeypatch):
    assert_rejected_before_backend(ops.mask_loss, backend, _bad_inputs(device)[case], monkeypatch)


class _Allocations(TorchDispatchMode):
    """The largest tensor (in bytes) any torch op returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.largest = max(self.largest, o.numel() * o.element_size())
        return out


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_never_allocates_full_resolution(device):
    """Forward and backward launchers allocate nothing larger than the bool targets (N*H*W bytes):
    no full-resolution float tensor, not even a 2-byte one."""
    from fastmaskformer.kernels import mask_loss as k

    N, h, w, H, W = 3, 10, 10, 40, 40
    x, t = _logits(N, h, w, device), _masks(N, H, W, device)
    with _Allocations() as seen:
        k._sums(x, t, 0.25, 2.0)
        k._sums_backward(torch.ones(N, 4, device=device), x, t, 0.25, 2.0)
    assert 0 < seen.largest <= N * H * W


@pytest.mark.skipif("triton" not in BACKENDS, reason="the triton backend is not installed")
def test_triton_declines_what_it_cannot_run(monkeypatch):
    from fastmaskformer.ops.backends import triton as backend

    b = ops.mask_loss.backends["triton"]
    meta = (torch.zeros(1, 2, 2, device="meta"), torch.zeros(1, 4, 4, device="meta"), 1.0)
    assert "cuda" in b.supports(*meta)
    monkeypatch.setattr(backend, "INTERPRET", False)
    cpu = (torch.zeros(1, 2, 2), torch.zeros(1, 4, 4, dtype=torch.bool), 1.0)
    assert "TRITON_INTERPRET" in b.supports(*cpu)
    assert ops.mask_loss.choose("auto", cpu, {}).name != "triton"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_auto_uses_triton_and_compiles():
    """At a MaskFormer-like scale (x4 upsampling); torch.compile traces the kernels' ops, forward and
    backward, in one graph."""
    x, t = _logits(4, 32, 32, "cuda"), _masks(4, 128, 128, "cuda")
    assert ops.mask_loss.choose("auto", (x, t, 4.0), {}).name == "triton"
    eager = _check("triton", x, t, num_masks=4.0)
    fused = torch.compile(ops.mask_loss.backends["triton"].fn, fullgraph=True)
    z = x.detach().requires_grad_()
    mask, dice = fused(z, t, 4.0)
    (grad,) = torch.autograd.grad(0.7 * mask + 1.3 * dice, z)
    assert_close(grad, eager, what="compiled d/d(pred_masks)", grad=True)


@pytest.mark.skipif(not {"native", "triton"} <= set(BACKENDS), reason="needs both fused backends installed")
def test_every_backend_reduces_to_the_same_statistics():
    """The one statistics contract (ops._mask_loss.losses_from_stats): per mask, the sums over the
    H x W pixels of (focal, s t, s, t), checked column by column between the native and Triton
    kernels and against the reference's per-pixel terms."""
    import torch.nn.functional as F

    from fastmaskformer.kernels.mask_loss import sums as triton_sums

    x, t = _logits(3, 5, 7, "cpu"), _masks(3, 17, 19, "cpu")
    native = torch.ops.fastmaskformer.mask_loss_forward(x, t, 0.25, 2.0)
    triton = triton_sums(x, t, 0.25, 2.0)
    up = F.interpolate(x[:, None], size=(17, 19), mode="bilinear", align_corners=False)[:, 0].flatten(1)
    tf, s = t.flatten(1).float(), up.sigmoid()
    p_t = s * tf + (1 - s) * (1 - tf)
    focal = (0.25 * tf + 0.75 * (1 - tf)) * (1 - p_t) ** 2 * F.binary_cross_entropy_with_logits(up, tf, reduction="none")
    want = torch.stack([focal.sum(1), (s * tf).sum(1), s.sum(1), tf.sum(1)], 1)
    for got, name in ((native, "native"), (triton, "triton")):
        assert got.shape == (3, 4) and got.dtype == torch.float32
        assert_close(got, want, what=f"{name} statistics")
