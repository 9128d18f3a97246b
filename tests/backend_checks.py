"""Shared assertions for the ops: argument checks, and native ops releasing the GIL."""
import sys
import threading
import time

import pytest


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
