"""Shared assertions for the ops: argument checks, matching costs against the reference, and native
ops releasing the GIL."""
import sys
import threading
import time

import pytest
import torch

from tolerances import assert_close


def assert_rejected_before_backend(op, backend, case, monkeypatch):
    """``op(*args, backend=backend)`` raises ``exc`` matching ``text`` without calling the backend.

    case: (what, args, exc, text) — a description, the op's arguments, the exception type and a
    regex its message must match."""
    what, args, exc, text = case

    def must_not_run(*_, **__):
        raise AssertionError(f"{op.name}: {backend} ran on bad input ({what})")

    monkeypatch.setattr(op.backends[backend], "fn", must_not_run)
    with pytest.raises(exc, match=text):
        op(*args, backend=backend)


def assert_releases_gil(run) -> None:
    """With a 10 s switch interval no Python thread preempts another: the main thread can resume
    before the worker's ``run()`` returns only if the op it calls released the GIL."""
    started, times = threading.Event(), {}

    def work():
        started.set()
        run()
        times["op_done"] = time.perf_counter()

    old = sys.getswitchinterval()
    sys.setswitchinterval(10.0)
    try:
        worker = threading.Thread(target=work)
        worker.start()
        started.wait()
        times["main_resumed"] = time.perf_counter()
        worker.join()
    finally:
        sys.setswitchinterval(old)
    assert times["main_resumed"] < times["op_done"]


def assert_cost_matches_reference(op, backend, args, dtype=torch.float32, **kw):
    """A matching-cost op's ``backend`` against its reference: float32 [B, Q, Nmax] on the inputs'
    device, the same sizes, each image's real columns within the table's tolerance and +inf past them."""
    cost, sizes = op(*args, backend=backend, **kw)
    cost_ref, sizes_ref = op(*args, backend="reference", **kw)
    assert cost.dtype == torch.float32 and cost.shape == cost_ref.shape and cost.device == args[0].device
    assert torch.equal(sizes, sizes_ref)
    for b, n in enumerate(sizes.tolist()):
        assert_close(cost[b, :, :n], cost_ref[b, :, :n], dtype, what=f"{backend} cost of image {b}")
        assert torch.isinf(cost[b, :, n:]).all() and (cost[b, :, n:] > 0).all(), f"image {b}: padding is not +inf"
    return cost
