"""Benchmarks run with `pytest benchmarks/ --benchmark-only` (or `make bench`). Each records its
peak memory in extra_info["peak_mb"] next to the time, and the device it ran on."""
import functools
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# The variants an op benchmark compares; the interpreter's times say nothing about the kernels.
OP_VARIANTS = ["reference", "compiled", pytest.param("triton", marks=pytest.mark.skipif(
    DEVICE != "cuda", reason="Triton kernels are timed on CUDA only (the CPU runs them in the interpreter)"))]


def op_variant(op, variant: str):
    """What an op benchmark times: the op's reference eager or under torch.compile, or a fused backend."""
    if variant == "reference":
        return op.reference
    if variant == "compiled":
        return torch.compile(op.reference, dynamic=False)
    return functools.partial(op, backend=variant)


def criterion_step(criterion, logits: torch.Tensor, masks: torch.Tensor, targets):
    """One call of the criterion on every decoder layer, forward and backward: ``logits`` [L, B, Q,
    K+1] and ``masks`` [L, B, Q, h, w] (leaves with grad) become the per-layer outputs as the model
    makes them, unbound views of one tensor, the last layer's on top and the others as aux_outputs."""

    def step():
        lg, mk = logits.unbind(0), masks.unbind(0)
        outputs = {"pred_logits": lg[-1], "pred_masks": mk[-1],
                   "aux_outputs": [{"pred_logits": c, "pred_masks": m} for c, m in zip(lg[:-1], mk[:-1])]}
        loss = sum(criterion(outputs, targets).values())
        loss.backward()
        logits.grad = masks.grad = None
        return loss.detach()

    return step


def run_and_time(benchmark, variant: str, fn, rounds: int = 5) -> None:
    """Warm ``fn`` up (compiling, autotuning), record its peak extra memory in extra_info["peak_mb"],
    then time it; on CUDA every call waits for the GPU so the time is the kernels', not the launch's."""
    from memory import peak_extra_mb

    def call():
        out = fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    call()
    benchmark.extra_info.update(variant=variant, device=DEVICE, peak_mb=peak_extra_mb(call, DEVICE))
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=0)
