"""torch.compile sees the fused path without graph breaks (issue: fused=True on a GPU).

- A fresh process, compiling before any eager call, as a new user would: torch._dynamo.explain of
  the debug MaskFormer and Mask2Former forward reports 0 graph breaks, fused or not.
- ops.mask_loss ("native" and "auto") and the criterion's losses given the matched indices compile
  with fullgraph=True on the CPU and equal eager, values and gradients.
- On a GPU: the Triton ops compile with fullgraph=True.
The matcher itself is not compiled: its solver runs on the host, where the graph breaks by design.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastmaskformer import HungarianMatcher, SetCriterion, ops

from test_matcher import make_batch
from tolerances import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXPLAIN = """
import json, sys, torch
from fastmaskformer import MaskFormer, Mask2Former
small = dict(backbone="resnet18", num_queries=8, hidden_dim=32, mask_dim=32, nheads=2, dim_feedforward=64)
out = {}
for name, build in (("maskformer", lambda f: MaskFormer(5, dec_layers=2, conv_dim=32, fused=f, **small)),
                    ("mask2former", lambda f: Mask2Former(5, dec_layers=3, conv_dim=32, fused=f, **small))):
    for fused in (False, True):
        torch.manual_seed(0)
        model = build(fused)
        e = torch._dynamo.explain(model)(torch.rand(1, 3, 64, 64))
        out[f"{name} fused={fused}"] = [e.graph_break_count, [str(r.reason)[:200] for r in e.break_reasons]]
        torch._dynamo.reset()
print(json.dumps(out))
"""


def test_models_compile_without_graph_breaks_in_a_fresh_process():
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)  # as a user without a GPU runs it
    res = subprocess.run([sys.executable, "-c", EXPLAIN], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(report) == 4
    for case, (breaks, reasons) in report.items():
        assert breaks == 0, f"{case}: {breaks} graph breaks: {reasons}"


@pytest.mark.parametrize("backend", ["native", "auto"])
def test_mask_loss_compiles_fullgraph(backend):
    torch._dynamo.reset()
    x = torch.randn(5, 9, 11) * 3
    t = torch.rand(5, 37, 45) > 0.5
    compiled = torch.compile(lambda p, t: ops.mask_loss(p, t, 6.0, backend=backend), fullgraph=True)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager, got = ops.mask_loss(xe, t, 6.0, backend=backend), compiled(xc, t)
    for a, b, what in zip(got, eager, ("loss_mask", "loss_dice")):
        assert_close(a, b, what=what)
    sum(eager).backward()
    sum(got).backward()
    assert_close(xc.grad, xe.grad, what="d/d pred_masks", grad=True)


def test_criterion_losses_compile_fullgraph():
    torch._dynamo.reset()
    outputs, targets = make_batch(2, 6, 5, [3, 0], (8, 8), (32, 32))
    aux, _ = make_batch(2, 6, 5, [3, 0], (8, 8), (32, 32), seed=1)
    layers = [outputs, aux]
    criterion = SetCriterion(5, HungarianMatcher(1, 20, 1, fused=True), {}, 0.1, fused=True)
    indices = criterion.matcher.match_layers(layers, targets)

    def losses(layers):
        return criterion.losses_from_matches(layers, targets, indices)

    eager_layers = [{k: v.clone().requires_grad_() for k, v in layer.items()} for layer in layers]
    comp_layers = [{k: v.clone().requires_grad_() for k, v in layer.items()} for layer in layers]
    eager, got = losses(eager_layers), torch.compile(losses, fullgraph=True)(comp_layers)
    assert sorted(got) == sorted(eager) == sorted(["loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "loss_mask_0",
                                                   "loss_dice_0"])
    for k in eager:
        assert_close(got[k], eager[k], what=k)
    sum(eager.values()).backward()
    sum(got.values()).backward()
    for le, lc in zip(eager_layers, comp_layers):
        for k in le:
            assert_close(lc[k].grad, le[k].grad, what=f"d/d {k}", grad=True)


def test_point_sampled_losses_compile_across_changing_match_counts():
    """Mask2Former's losses draw points for however many masks matched, a size that changes every
    step: compiled with dynamic shapes they equal eager over three batches (the draws run eagerly)."""
    torch._dynamo.reset()
    criterion = SetCriterion(5, HungarianMatcher(2, 5, 5, num_points=64, fused=True), {}, 0.1, num_points=64,
                             fused=True)
    compiled = torch.compile(criterion.losses_from_matches, dynamic=True)
    for sizes in ([3, 2], [1, 4], [2, 2, 3]):
        outputs, targets = make_batch(len(sizes), 6, 5, sizes, (8, 8), (32, 32))
        indices = criterion.matcher.match_layers([outputs], targets)
        torch.manual_seed(0)
        eager = criterion.losses_from_matches([outputs], targets, indices)
        torch.manual_seed(0)
        got = compiled([outputs], targets, indices)
        for k in eager:
            assert_close(got[k], eager[k], what=f"{k} at sizes {sizes}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ["maskformer", "mask2former"])
def test_fused_model_compiles_fullgraph_on_cuda(arch):
    """The fused model's forward (Triton mask logits, Triton deformable attention) as one graph."""
    from fastmaskformer import Mask2Former, MaskFormer

    torch._dynamo.reset()
    torch.manual_seed(0)
    small = dict(backbone="resnet18", num_queries=8, hidden_dim=32, mask_dim=32, nheads=2, dim_feedforward=64,
                 conv_dim=32, fused=True)
    model = (MaskFormer(5, dec_layers=2, **small) if arch == "maskformer" else Mask2Former(5, dec_layers=3, **small))
    model = model.cuda().eval()
    images = torch.rand(2, 3, 64, 96, device="cuda")
    with torch.no_grad():
        want, got = model(images), torch.compile(model, fullgraph=True)(images)
    assert_close(got["pred_logits"], want["pred_logits"], what="pred_logits")
    assert_close(got["pred_masks"], want["pred_masks"], what="pred_masks")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_ops_compile_fullgraph_on_cuda():
    torch._dynamo.reset()
    x = (torch.randn(5, 9, 11, device="cuda") * 3).requires_grad_()
    t = torch.rand(5, 37, 45, device="cuda") > 0.5
    loss = torch.compile(lambda p, t: ops.mask_loss(p, t, 6.0, backend="triton"), fullgraph=True)(x, t)
    for a, b in zip(loss, ops.mask_loss(x, t, 6.0, backend="reference")):
        assert_close(a, b)
    emb, pix = torch.randn(2, 3, 7, 16, device="cuda"), torch.randn(3, 16, 9, 10, device="cuda")
    got = torch.compile(lambda e, p: ops.mask_logits(e, p, backend="triton"), fullgraph=True)(emb, pix)
    assert_close(got, ops.mask_logits(emb, pix), what="mask_logits")
    logits, masks = torch.randn(2, 5, 4, device="cuda"), torch.randn(2, 5, 8, 8, device="cuda")
    with torch.no_grad():
        got = torch.compile(lambda c, m: ops.semantic_inference(c, m, (30, 31), backend="triton"), fullgraph=True)(
            logits, masks)
    assert_close(got, ops.semantic_inference(logits, masks, (30, 31)), what="semantic_inference")
