"""The native ops themselves (fastmaskformer._C): torch.library registration (opcheck, fake kernels,
autograd, torch.compile), the C++ argument checks, the mask-loss backward op against finite
differences, the GIL, and the fallback when the extension is missing. Values against the reference
are in test_matching_cost.py and test_mask_loss.py."""
import warnings

import pytest
import torch

from fastmaskformer import ops
from fastmaskformer.ops import _dispatch

ops.load_backends()
from fastmaskformer.ops._mask_loss import losses_from_stats
from fastmaskformer.ops.backends.native import mask_loss_native, matching_cost_native

from backend_checks import assert_releases_gil

C = torch.ops.fastmaskformer


def _cost_inputs(B=2, Q=5, K=4, h=6, w=7, H=15, W=16, ns=(3, 0), mask_dtype=torch.bool):
    logits = torch.randn(B, Q, K + 1)
    masks = torch.randn(B, Q, h, w) * 3
    labels = torch.randint(0, K, (sum(ns),))
    targets = [(torch.rand(n, H, W) > 0.5).to(mask_dtype) for n in ns]
    return logits, masks, labels, targets


def _loss_inputs(N=3, h=5, w=6, H=13, W=17):
    return torch.randn(N, h, w) * 3, torch.rand(N, H, W) > 0.5


SCALARS = (1.0, 20.0, 1.0, 0.25, 2.0)


def test_opcheck_matching_cost():
    torch.library.opcheck(C.matching_cost.default, (*_cost_inputs(), *SCALARS))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_opcheck_matching_cost_cuda():
    """The CUDA kernel at MaskFormer's size (several query tiles, pixels split into shares)."""
    logits, masks, labels, targets = _cost_inputs(B=4, Q=100, K=150, h=128, w=128, H=512, W=512, ns=(30, 0, 45, 7))
    args = [logits.cuda(), masks.cuda(), labels.cuda(), [t.cuda() for t in targets], *SCALARS]
    torch.library.opcheck(C.matching_cost.default, args)
    assert ops.matching_cost.choose("auto", (args[0], args[1], [labels], args[3]), {}).name == "native"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_opcheck_mask_loss(dtype):
    x, t = _loss_inputs()
    x = x.to(dtype).requires_grad_()
    torch.library.opcheck(C.mask_loss_forward.default, (x, t, 0.25, 2.0))
    torch.library.opcheck(C.mask_loss_backward.default, (torch.randn(3, 4), x.detach(), t, 0.25, 2.0))


def test_backward_op_matches_finite_differences():
    """d(sum_k g_k stats_k)/dx for a random g over all four stats, central differences in fp64."""
    x, t = _loss_inputs(N=2, h=3, w=4, H=7, W=9)
    g = torch.randn(2, 4)
    grad = C.mask_loss_backward(g, x, t, 0.25, 2.0)
    eps, numeric = 1e-2, torch.zeros_like(x)
    for i in range(x.numel()):
        step = torch.zeros(x.numel())
        step[i] = eps
        step = step.view_as(x)
        diff = C.mask_loss_forward(x + step, t, 0.25, 2.0).double() - C.mask_loss_forward(x - step, t, 0.25, 2.0).double()
        numeric.view(-1)[i] = (diff * g).sum() / (2 * eps)
    torch.testing.assert_close(grad, numeric, rtol=2e-2, atol=2e-5)


def test_compiles_fullgraph_with_autograd():
    """The fake kernels and the registered autograd let torch.compile trace both native ops in one graph."""
    logits, masks, labels, targets = _cost_inputs()
    x, t = _loss_inputs()

    def step(logits, masks, x):
        cost, _ = matching_cost_native(logits, masks, [labels[:3], labels[3:]], targets)
        loss_mask, loss_dice = mask_loss_native(x, t, 2.0)
        return cost, loss_mask + loss_dice

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    cost, loss = step(logits, masks, xe)
    cost_c, loss_c = compiled(logits, masks, xc)
    torch.testing.assert_close(cost_c, cost)
    torch.testing.assert_close(loss_c, loss)
    loss.backward()
    loss_c.backward()
    torch.testing.assert_close(xc.grad, xe.grad)


def test_losses_from_stats_formula():
    stats = torch.tensor([[2.0, 2.0, 3.0, 4.0], [1.0, 0.0, 1.0, 0.0]])  # focal sums over 4 pixels
    loss_mask, loss_dice = losses_from_stats(stats, 2.0, pixels=4)
    assert loss_mask.item() == pytest.approx(0.375)
    assert loss_dice.item() == pytest.approx(((1 - 5 / 8) + (1 - 1 / 2)) / 2)


def _cpp_errors():
    logits, masks, labels, targets = _cost_inputs()
    x, t = _loss_inputs()
    return [
        ("label >= K+1", lambda: C.matching_cost(logits, masks, torch.tensor([0, 1, 5]), targets, *SCALARS),
         ValueError, r"tgt_labels: expected values in \[0, 4\)"),
        ("label == K (no object)", lambda: C.matching_cost(logits, masks, torch.tensor([0, 4, 1]), targets, *SCALARS),
         ValueError, r"got 4 at position 1"),
        ("label count", lambda: C.matching_cost(logits, masks, labels[:2], targets, *SCALARS), ValueError,
         "expected 3 labels"),
        ("B mismatch", lambda: C.matching_cost(logits, masks[:1], labels, targets, *SCALARS), ValueError,
         "pred_masks: expected"),
        ("image count", lambda: C.matching_cost(logits, masks, labels, targets[:1], *SCALARS), ValueError,
         "expected 2 tensors"),
        ("mask rank", lambda: C.matching_cost(logits, masks, labels, [targets[0][0], targets[1]], *SCALARS),
         ValueError, r"tgt_masks\[0\]: expected a 3-d"),
        ("mask dtype", lambda: C.matching_cost(logits, masks, labels, [m.long() for m in targets], *SCALARS),
         TypeError, "tgt_masks: expected dtype"),
        ("mixed mask dtypes", lambda: C.matching_cost(logits, masks, labels, [targets[0], targets[1].float()],
                                                      *SCALARS), TypeError, r"tgt_masks\[1\]"),
        ("pred dtype", lambda: C.matching_cost(logits.double(), masks, labels, targets, *SCALARS), TypeError,
         "pred_logits: expected dtype"),
        ("loss pred dtype", lambda: C.mask_loss_forward(x.double(), t, 0.25, 2.0), TypeError, "pred_masks"),
        ("loss count", lambda: C.mask_loss_forward(x, t[:2], 0.25, 2.0), ValueError, "target_masks: expected 3"),
        ("loss target dtype", lambda: C.mask_loss_forward(x, t.long(), 0.25, 2.0), TypeError, "target_masks"),
        ("grad shape", lambda: C.mask_loss_backward(torch.ones(3, 3), x, t, 0.25, 2.0), ValueError, "grad_stats"),
    ]


@pytest.mark.parametrize("case", range(12))
def test_cpp_checks(case):
    """Called directly (bypassing the Python checks), the C++ ops raise clear errors themselves."""
    what, call, exc, text = _cpp_errors()[case]
    with pytest.raises(exc, match=text):
        call()


def test_auto_picks_native_on_cpu():
    logits, masks, labels, targets = _cost_inputs()
    assert ops.matching_cost.choose("auto", (logits, masks, [labels[:3], labels[3:]], targets), {}).name == "native"
    assert ops.mask_loss.choose("auto", (*_loss_inputs(), 1.0), {}).name == "native"


def test_cuda_mask_loss_is_declined():
    assert "cpu" in ops.mask_loss.backends["native"].supports(torch.zeros(1, 2, 2, device="meta"))


def test_missing_extension_falls_back_once_with_a_warning(monkeypatch, request):
    for op in (ops.matching_cost, ops.mask_loss):
        monkeypatch.setattr(op.backends["native"], "available", lambda: "fastmaskformer._C is not available (test)")
        op.clear_cache()  # the choice is cached per device/dtype; forget it now and after the test
        request.addfinalizer(op.clear_cache)
    monkeypatch.setattr(_dispatch, "_warned", False)
    x, t = _loss_inputs()
    with pytest.warns(RuntimeWarning, match="native: fastmaskformer._C is not available"):
        assert ops.mask_loss.choose("auto", (x, t, 1.0), {}).name == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logits, masks, labels, targets = _cost_inputs()
        assert ops.matching_cost.choose("auto", (logits, masks, [labels[:3], labels[3:]], targets), {}).name == \
            "reference"
    with pytest.raises(RuntimeError, match="not available"):
        ops.mask_loss(x, t, 1.0, backend="native")


def test_releases_the_gil():
    logits, masks, labels, targets = _cost_inputs(B=4, Q=50, K=20, h=64, w=64, H=256, W=256, ns=(20,) * 4)
    assert_releases_gil(lambda: C.matching_cost(logits, masks, labels, targets, *SCALARS))
