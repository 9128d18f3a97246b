"""Every autotune config of every Triton kernel against the reference, on a GPU (issue: fused=True
on a GPU). Autotuning keeps the fastest config, so a config that computes a wrong answer would
only show on the shapes where it wins; here each kernel is forced to each of its configs in turn
and every Triton op is compared with its reference at an odd shape and a real one. Under the
interpreter each kernel has a single config, which the other tests cover."""
import pytest
import torch
from triton.runtime.autotuner import Autotuner

from fastmaskformer import ops
from fastmaskformer.kernels import mask_logits as k_mask_logits
from fastmaskformer.kernels import mask_loss as k_mask_loss
from fastmaskformer.kernels import semantic_inference as k_semantic

from tolerances import assert_close

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def autotuners():
    found = {}
    for mod in (k_mask_logits, k_mask_loss, k_semantic):
        for name, obj in vars(mod).items():
            if isinstance(obj, Autotuner):
                found[f"{mod.__name__.split('.')[-1]}.{name}"] = obj
    return found


def _parity(dev="cuda"):
    """Every Triton op (forward and backward) against its reference, at an odd and a real shape."""
    g = torch.Generator(device=dev).manual_seed(0)
    for N, h, w, H, W in ((3, 10, 14, 37, 53), (8, 128, 128, 512, 512)):
        x = (torch.randn(N, h, w, device=dev, generator=g) * 3).requires_grad_()
        t = torch.rand(N, H, W, device=dev, generator=g) > 0.5
        got, want = ops.mask_loss(x, t, 2.0, backend="triton"), ops.mask_loss(x, t, 2.0)
        for a, b in zip(got, want):
            assert_close(a, b, what="mask_loss")
        ga, = torch.autograd.grad(sum(got), x)
        gb, = torch.autograd.grad(sum(want), x)
        assert_close(ga, gb, what="mask_loss grad", grad=True)
    for L, B, Q, C, hh, ww in ((2, 3, 7, 16, 9, 10), (6, 2, 100, 256, 128, 128)):
        emb = torch.randn(L, B, Q, C, device=dev, generator=g)
        pix = torch.randn(B, C, hh, ww, device=dev, generator=g)
        assert_close(ops.mask_logits(emb, pix, backend="triton"), ops.mask_logits(emb, pix), what="mask_logits")
    with torch.no_grad():
        for B, Q, K, h, w, size in ((2, 5, 4, 8, 8, (30, 31)), (2, 100, 151, 128, 128, (512, 512))):
            logits = torch.randn(B, Q, K, device=dev, generator=g)
            masks = torch.randn(B, Q, h, w, device=dev, generator=g)
            assert_close(ops.semantic_inference(logits, masks, size, backend="triton"),
                         ops.semantic_inference(logits, masks, size), what="semantic_inference")


@pytest.mark.parametrize("kernel", sorted(autotuners()))
def test_every_config_matches_the_reference(kernel, monkeypatch):
    tuner = autotuners()[kernel]
    configs = list(tuner.configs)
    assert configs, kernel
    for config in configs:
        monkeypatch.setattr(tuner, "configs", [config])
        monkeypatch.setattr(tuner, "cache", {})
        monkeypatch.setattr(tuner, "early_config_prune", None)
        try:
            _parity()
        except AssertionError as exc:
            raise AssertionError(f"{kernel} with config {config}: {exc}") from exc

