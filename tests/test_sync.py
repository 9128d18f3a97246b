"""The fused matcher + criterion wait for the device once per training step, whatever the number of
decoder layers and images (issue: fused=True on a GPU).

On the CPU there is no device to wait for, so the test counts the places where a GPU run would
wait: every call that reads a tensor's value on the host (item, tolist, numpy, bool/int/float of a
tensor, nonzero) or copies it to the host (.cpu(), .to("cpu")), seen through a TorchFunctionMode.
Copies to the predictions' device are written with a torch.device in this code base, so they are
not counted. The count must not grow with the number of layers (2 vs 6) or images (2 vs 8); the
reference path, which reads values per image, shows that the counter sees them.
"""
import pytest
import torch
from torch.overrides import TorchFunctionMode

from fastmaskformer import HungarianMatcher, SetCriterion, ops

from test_matcher import make_batch

READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__bool__, torch.Tensor.__int__,
         torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero, torch.Tensor.cpu}


class HostReads(TorchFunctionMode):
    """Counts the calls that would make the host wait for a GPU."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in READS or (func is torch.Tensor.to and "cpu" in (kwargs.get("device"), *args[1:2])):
            self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)


def _step(B, L, fused, device="cpu", backward=False):
    outputs, targets = make_batch(B, 10, 5, [3] * (B - 1) + [0], (16, 16), (64, 64), device=device)
    outputs["aux_outputs"] = [make_batch(B, 10, 5, [3] * B, (16, 16), (64, 64), seed=s, device=device)[0]
                              for s in range(1, L)]
    leaves = [v for layer in [outputs] + outputs["aux_outputs"] for k, v in layer.items() if k != "aux_outputs"]
    for v in leaves:
        v.requires_grad_(backward)
    criterion = SetCriterion(5, HungarianMatcher(1, 20, 1, fused=fused), {}, 0.1, fused=fused)
    return lambda: criterion(outputs, targets), leaves


def count_host_reads(B, L, fused):
    run, _ = _step(B, L, fused)
    run()  # the first call chooses and caches the backends
    with HostReads() as mode:
        run()
    return mode.calls


def test_fused_step_reads_the_host_a_fixed_number_of_times():
    counts = {(B, L): count_host_reads(B, L, fused=True) for B in (2, 8) for L in (2, 6)}
    first = counts[(2, 2)]
    for key, calls in counts.items():
        assert calls == first, f"B, L = {key}: {calls} != {first} at B, L = (2, 2)"
    # What is left is host metadata of the solver call, not a read of a device value: the sizes of
    # the solver's problems (a host tensor made from shapes) and its packed result split on the host.
    assert len(first) <= 4, first


def test_reference_reads_grow_with_images_so_the_counter_sees_them():
    assert len(count_host_reads(8, 2, fused=False)) > len(count_host_reads(2, 2, fused=False))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_step_on_cuda_syncs_only_in_the_solver(monkeypatch):
    """torch.cuda.set_sync_debug_mode("error") around the fused step and its backward, except in the
    one allowed place: the linear assignment solver reporting its status (or the cost going to the
    host solver)."""
    lap = ops.linear_sum_assignment
    chosen = lap.choose("auto", (torch.zeros(1, 2, 2, device="cuda"), torch.tensor([2])), {})
    solve = chosen.fn

    def allowed(*args, **kwargs):
        torch.cuda.set_sync_debug_mode(0)
        try:
            return solve(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    run, leaves = _step(8, 6, fused=True, device="cuda", backward=True)
    sum(run().values()).backward()  # warm-up: autotuning and first-call allocations may sync
    monkeypatch.setattr(chosen, "fn", allowed)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = run()
        sum(losses.values()).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.isfinite(v).item() for v in losses.values())
    assert all(v.grad is not None for v in leaves)

