"""The fused path under torch.autocast (issue: fused=True on a GPU): the fused ops receive dtypes
they support and accumulate in fp32 where the official code does (matching costs, loss sums), so
the fused matcher + criterion under CPU bf16 autocast equal the fp32 step within the table's bf16
tolerance, and a model's fused step under autocast equals its reference step under autocast."""
import pytest
import torch
import torch.nn.functional as F

from fastmaskformer import HungarianMatcher, MaskFormer, SetCriterion, ops

from conftest import DEVICES
from tolerances import assert_close

# CPU autocast runs bf16; CUDA autocast fp16 and bf16 (the GPU run covers those).
AUTOCAST = [pytest.param(d, t, id=f"{d}-{str(t)[6:]}", marks=[pytest.mark.gpu] if d == "cuda" else [])
            for d in DEVICES for t in ((torch.bfloat16,) if d == "cpu" else (torch.float16, torch.bfloat16))]


def confident_batch(B=2, Q=6, K=4, n=3, hw=(8, 8), HW=(32, 32), seed=0):
    """Targets and predictions that agree with them through a known permutation (logits +-4 on the
    downsampled masks, class logits peaked at the label), so bf16 rounding cannot change the
    matching; unmatched queries predict "no object"."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, Q, K + 1, generator=g)
    logits[..., K] += 4
    masks = torch.randn(B, Q, *hw, generator=g)
    targets = []
    for b in range(B):
        tm = torch.rand(n, *HW, generator=g) > 0.5
        labels = torch.randint(0, K, (n,), generator=g)
        perm = torch.randperm(Q, generator=g)[:n]
        low = F.interpolate(tm[:, None].float(), size=hw, mode="nearest")[:, 0]
        masks[b, perm] = low * 8 - 4 + 0.3 * masks[b, perm]
        logits[b, perm] = torch.randn(n, K + 1, generator=g)
        logits[b, perm, labels] += 6
        targets.append({"labels": labels, "masks": tm})
    return {"pred_logits": logits, "pred_masks": masks}, targets


def test_fused_matcher_and_criterion_under_cpu_bf16_autocast_equal_fp32():
    outputs, targets = confident_batch()
    aux, _ = confident_batch(seed=0)
    outputs["aux_outputs"] = [aux]
    criterion = SetCriterion(4, HungarianMatcher(1, 20, 1, fused=True), {}, 0.1, fused=True)
    layers = [{k: v for k, v in outputs.items() if k != "aux_outputs"}, aux]
    want_idx = criterion.matcher.match_layers(layers, targets)
    want = criterion(outputs, targets)

    low = {k: v.bfloat16() for k, v in outputs.items() if k != "aux_outputs"}  # what a model emits under autocast
    low["aux_outputs"] = [{k: v.bfloat16() for k, v in aux.items()}]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cost, _ = ops.matching_cost(low["pred_logits"], low["pred_masks"], [t["labels"] for t in targets],
                                    [t["masks"] for t in targets], 1, 20, 1, backend="auto")
        got_idx = criterion.matcher.match_layers([{k: v for k, v in low.items() if k != "aux_outputs"},
                                                  low["aux_outputs"][0]], targets)
        got = criterion(low, targets)
    assert cost.dtype == torch.float32
    for layer_got, layer_want in zip(got_idx, want_idx):
        for (r1, c1), (r2, c2) in zip(layer_got, layer_want):
            assert torch.equal(r1, r2) and torch.equal(c1, c2)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == torch.float32, k
        assert_close(got[k], want[k], torch.bfloat16, what=k)


@pytest.mark.parametrize("device,dtype", AUTOCAST)
def test_model_fused_step_under_autocast_equals_reference_step_under_autocast(device, dtype):
    torch.manual_seed(0)
    model = MaskFormer(4, backbone="resnet18", num_queries=6, hidden_dim=32, mask_dim=16, nheads=2,
                       dim_feedforward=32, dec_layers=2, dropout=0.0, conv_dim=32).to(device)
    images = torch.rand(2, 3, 64, 64, device=device)
    _, targets = confident_batch(HW=(64, 64))
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    results = {}
    for fused in (False, True):
        model.fused = fused
        model.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=dtype):
            losses = model.loss(model(images), targets)
        sum(losses.values()).backward()
        results[fused] = ({k: v.detach().float() for k, v in losses.items()},
                          {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None})
    (ref_losses, ref_grads), (losses, grads) = results[False], results[True]
    for k in ref_losses:
        assert_close(losses[k], ref_losses[k], dtype, what=k)
    assert grads.keys() == ref_grads.keys()
    for n in ref_grads:
        assert_close(grads[n], ref_grads[n], dtype, what=n, grad=True)


def test_mask_logits_casts_to_the_autocast_dtype_like_einsum():
    emb, pix = torch.randn(2, 1, 3, 8), torch.randn(1, 8, 4, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ops.mask_logits(emb, pix, backend="auto")
        want = torch.einsum("lbqc,bchw->lbqhw", emb, pix)
    assert got.dtype == want.dtype == torch.bfloat16
    assert_close(got, want, torch.bfloat16)
