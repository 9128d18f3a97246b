"""Shared assertion for the ops' argument checks."""
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
