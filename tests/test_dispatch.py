"""The backend dispatcher: reference by default, auto with fallback and one warning, named backends
that raise with their reasons, environment overrides, explain()."""
import warnings

import pytest
import torch

from fastmaskformer.ops import _dispatch
from fastmaskformer.ops._dispatch import Op


def ref(x):
    return x + 1


@pytest.fixture
def op():
    o = Op("toy", ref)
    o.register("fast", lambda x: x + 1.0, supports=lambda x: None if x.dtype == torch.float32 else "fp32 only",
               priority=10)
    o.register("gpuonly", lambda x: x + 2, auto_devices=("cuda",), priority=20)
    o.register("missing", lambda x: x + 3, available=lambda: "not built", priority=30)
    return o


def test_reference_is_the_default(op):
    assert op.choose("reference", (torch.zeros(1),), {}).name == "reference"
    assert op(torch.zeros(2)).tolist() == [1, 1]


def test_auto_picks_the_first_supported_and_warns_once_for_missing(op, monkeypatch):
    monkeypatch.setattr(_dispatch, "_warned", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fused backend was found: nothing to warn about
        assert op.choose("auto", (torch.zeros(1),), {}).name == "fast"
    with pytest.warns(RuntimeWarning, match="missing: not built"):
        assert op.choose("auto", (torch.zeros(1, dtype=torch.float64),), {}).name == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # at most one warning per process
        assert op.choose("auto", (torch.zeros(1, dtype=torch.float64),), {}).name == "reference"


def test_named_backend_raises_with_its_reason(op):
    with pytest.raises(RuntimeError, match="fp32 only"):
        op(torch.zeros(1, dtype=torch.float64), backend="fast")
    with pytest.raises(RuntimeError, match="not built"):
        op(torch.zeros(1), backend="missing")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        op(torch.zeros(1), backend="nope")
    with pytest.raises(TypeError, match="backend must be a str"):
        op(torch.zeros(1), backend=True)
    assert op(torch.zeros(1), backend="gpuonly").tolist() == [2]  # named: device restriction of auto does not apply


def test_environment_forces_a_backend(op, monkeypatch):
    monkeypatch.setenv("FASTMASKFORMER_BACKEND_TOY", "gpuonly")
    assert op.choose("auto", (torch.zeros(1),), {}).name == "gpuonly"
    monkeypatch.delenv("FASTMASKFORMER_BACKEND_TOY")
    monkeypatch.setenv("FASTMASKFORMER_BACKEND", "reference")
    assert op.choose("auto", (torch.zeros(1),), {}).name == "reference"


def test_explain_lists_every_backend(op):
    text = op.explain(torch.zeros(1, dtype=torch.float64))
    assert "fast" in text and "declines: fp32 only" in text and "not installed: not built" in text
    assert text.strip().endswith("-> reference")


def test_check_runs_before_dispatch():
    calls = []
    o = Op("checked", ref, check=lambda x: calls.append(x) or (_ for _ in ()).throw(ValueError("x: bad")))
    with pytest.raises(ValueError, match="x: bad"):
        o(torch.zeros(1))
    assert len(calls) == 1


def test_reserved_names():
    with pytest.raises(ValueError, match="reserved"):
        Op("o", ref).register("auto", ref)


def test_every_backend_is_installed_here():
    """The backend-parametrized tests run only what is installed; this makes sure that is everything
    (a triton or _C that fails to load must fail CI, not shrink the test matrix)."""
    import os

    from fastmaskformer import ops
    from fastmaskformer.ops.backends.triton import INTERPRET

    ops.load_backends()
    assert _dispatch._load_errors == {}
    expected = {"mask_logits": {"triton"}, "mask_loss": {"triton", "native"}, "matching_cost": {"native"},
                "linear_sum_assignment": {"native", "lapjv"}, "semantic_inference": {"triton"}}
    for name, backends in expected.items():
        op = ops.OPS[name]
        assert backends <= set(op.backends), (name, sorted(op.backends))
        for b in backends:
            assert op.backends[b].available() is None, (name, b, op.backends[b].available())
    if not torch.cuda.is_available():
        assert INTERPRET and os.environ.get("TRITON_INTERPRET") == "1"
