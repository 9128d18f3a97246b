"""The reference criterion against independent NumPy losses, edge cases and num_masks averaging."""
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from fastmaskformer.criterion import SetCriterion, average_num_masks
from fastmaskformer.matcher import HungarianMatcher

import independent
from conftest import free_port
from test_matcher import make_batch


def make_criterion(K, eos=0.1, fused=False):
    return SetCriterion(K, HungarianMatcher(1, 20, 1, fused=fused), {"loss_ce": 1, "loss_mask": 20, "loss_dice": 1},
                        eos, ("labels", "masks"), fused=fused)


def expected_losses(outputs, targets, indices, K, eos, num_masks):
    """Cross-entropy with the no-object weight, and mask losses, computed independently."""
    logits = outputs["pred_logits"].double().numpy()
    B, Q, _ = logits.shape
    weights = np.ones(K + 1)
    weights[K] = eos
    num = den = 0.0
    preds, tgts = [], []
    for b in range(B):
        target_class = np.full(Q, K)
        for q, j in zip(*indices[b]):
            target_class[q] = targets[b]["labels"][j]
            preds.append(outputs["pred_masks"][b, q].double().numpy())
            tgts.append(targets[b]["masks"][j].double().numpy())
        for q in range(Q):
            z = logits[b, q]
            logp = z - z.max() - np.log(np.exp(z - z.max()).sum())
            num -= weights[target_class[q]] * logp[target_class[q]]
            den += weights[target_class[q]]
    lm, ld = independent.mask_losses(preds, tgts, num_masks) if preds else (0.0, 0.0)
    return num / den, lm, ld


@pytest.mark.parametrize("B,Q,sizes,hw,HW", [
    (2, 5, [3, 2], (4, 4), (16, 16)),     # predictions at 1/4 of the target size
    (3, 4, [1, 0, 5], (5, 6), (13, 17)),  # an empty image, Q < N, odd scale
    (1, 3, [0], (4, 4), (8, 8)),          # no targets at all
])
def test_losses_match_independent_computation(B, Q, sizes, hw, HW):
    K = 5
    outputs, targets = make_batch(B, Q, K, sizes, hw, HW)
    aux = make_batch(B, Q, K, sizes, hw, HW, seed=3)[0]
    outputs["aux_outputs"] = [aux]
    crit = make_criterion(K)
    losses = crit(outputs, targets)
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "loss_mask_0", "loss_dice_0"}
    num_masks = max(sum(sizes), 1)
    for out, suffix in ((outputs, ""), (aux, "_0")):
        ce, lm, ld = expected_losses(out, targets, crit.matcher(out, targets), K, 0.1, num_masks)
        np.testing.assert_allclose(losses["loss_ce" + suffix].item(), ce, rtol=1e-5)
        np.testing.assert_allclose(losses["loss_mask" + suffix].item(), lm, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(losses["loss_dice" + suffix].item(), ld, rtol=1e-4, atol=1e-7)


def test_empty_targets_give_zero_mask_losses_and_backward_works():
    outputs, targets = make_batch(2, 4, 3, [0, 0], (4, 4), (8, 8))
    for v in outputs.values():
        v.requires_grad_(True)
    losses = make_criterion(3)(outputs, targets)
    assert losses["loss_mask"].item() == 0 and losses["loss_dice"].item() == 0
    sum(losses.values()).backward()
    assert outputs["pred_logits"].grad.abs().sum() > 0
    assert outputs["pred_masks"].grad is not None and outputs["pred_masks"].grad.abs().sum() == 0


def test_single_target_gradients_flow():
    outputs, targets = make_batch(1, 3, 2, [1], (4, 4), (16, 16))
    for v in outputs.values():
        v.requires_grad_(True)
    losses = make_criterion(2)(outputs, targets)
    (losses["loss_mask"] + losses["loss_dice"]).backward()
    matched = make_criterion(2).matcher(outputs, targets)[0][0].item()
    g = outputs["pred_masks"].grad[0]
    assert g[matched].abs().sum() > 0
    assert all(g[q].abs().sum() == 0 for q in range(3) if q != matched)


def test_bad_inputs():
    outputs, targets = make_batch(2, 4, 3, [2, 1], (4, 4), (16, 16))
    crit = make_criterion(3)
    with pytest.raises(ValueError, match="losses: unknown"):
        SetCriterion(3, crit.matcher, {}, 0.1, ("labels", "boxes"))
    with pytest.raises(ValueError, match=r"expected 5 classes \(K\+1\)"):
        make_criterion(4)(outputs, targets)
    small = [{"labels": t["labels"], "masks": t["masks"][:, :2, :2]} for t in targets]
    with pytest.raises(ValueError, match="target_masks: expected a size at least"):
        crit(outputs, small)


def _dist_worker(rank, world, port, counts, out_file):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    targets = [{"labels": torch.zeros(n, dtype=torch.int64)} for n in counts[rank]]
    value = average_num_masks(targets, torch.device("cpu"))
    if rank == 0:
        with open(out_file, "w") as f:
            f.write(repr(float(value)))  # a 0-d tensor under torch.distributed: no host sync
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("counts,expected", [([[3, 4], [1]], 4.0), ([[0], [1]], 1.0)])
def test_num_masks_is_averaged_across_two_gloo_ranks(tmp_path, counts, expected):
    out = tmp_path / "num_masks.txt"
    mp.spawn(_dist_worker, args=(2, free_port(), counts, str(out)), nprocs=2, join=True)
    assert float(out.read_text()) == expected
