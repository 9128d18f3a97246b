"""The one place that chooses a backend for an op.

Every op is an :class:`Op` holding its plain-PyTorch ``reference`` and any number of fused
backends with the same signature. A call names a backend:

- ``"reference"``: the reference, always.
- ``"auto"``: the highest-priority backend that is installed, runs on the inputs' device
  automatically, and says it supports these inputs; else the reference. If a backend that would
  have served the device is *not installed* (extension not built, Triton missing), one warning per
  process says so.
- any other name: that backend, or a ``RuntimeError`` listing why it cannot take the call.

``FASTMASKFORMER_BACKEND_<OP>=<name>`` (e.g. ``FASTMASKFORMER_BACKEND_MASK_LOSS=triton``) or
``FASTMASKFORMER_BACKEND=<name>`` (every op that has such a backend) turns ``"auto"`` into that
name. ``explain(...)`` prints the reasoning for given inputs.

The choice is made once per (requested backend, device type, dtype, traits) and cached; ``traits``
is a small per-op function of the inputs (e.g. "needs a gradient", "batch beyond a launch grid")
and a backend's ``supports()`` may depend on nothing else. The hot path is a dict lookup: no lock,
no import, nothing Dynamo cannot trace, so ``torch.compile`` of a model sees the chosen backend's
custom op and no graph break. The backend modules are imported once, when ``fastmaskformer.ops``
is imported.
"""
from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Hashable, Iterable, List, Optional, Tuple

import torch

# Modules under fastmaskformer.ops.backends that register fused backends when imported. A module
# that fails to import is recorded, and explain() shows the error.
_BACKEND_MODULES = ("triton", "native", "lapjv")
_loaded = False
_load_errors: Dict[str, str] = {}
_warned = False


@dataclass
class Backend:
    name: str
    fn: Callable
    # Install-level check: None when usable in this process, else why not (e.g. "_C not built").
    available: Callable[[], Optional[str]] = lambda: None
    # Input-level check, called with the op's arguments: None when it takes them, else why not.
    supports: Callable[..., Optional[str]] = lambda *a, **k: None
    # Device types "auto" may pick this backend for; a named backend may run on any device its
    # supports() accepts (the Triton interpreter runs on CPU tensors, but only when asked for).
    auto_devices: Tuple[str, ...] = ("cpu", "cuda")
    priority: int = 0


def _first_tensor(args: Iterable, kwargs: dict) -> Optional[torch.Tensor]:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, torch.Tensor):
                    return b
    return None


def load_backends() -> None:
    """Import every backend module once; each registers what it provides. ``fastmaskformer.ops``
    calls this when it is imported (under Python's import lock), never on the hot path."""
    global _loaded
    if _loaded:
        return
    for mod in _BACKEND_MODULES:
        try:
            importlib.import_module(f"fastmaskformer.ops.backends.{mod}")
        except Exception as exc:  # a broken optional backend must not break the reference path
            _load_errors[mod] = f"{type(exc).__name__}: {exc}"
    _loaded = True


class Op:
    """An op with a reference implementation and registered fused backends.

    Args:
        name: the op's name (``FASTMASKFORMER_BACKEND_<NAME>`` overrides "auto").
        reference: the plain-PyTorch implementation; every backend has its signature.
        check: argument checks run before any backend (clear errors instead of kernel crashes).
        traits: inputs -> a small hashable value; with the device type and dtype of the first
            tensor argument it is the cache key of the backend choice, so every ``supports()`` of
            this op must be a function of those three alone.
        autocast_lower: under torch.autocast, cast the floating tensor arguments to the autocast
            dtype before any backend runs, as autocast does for matmul-like ops (einsum, bmm), so a
            custom kernel sees what the reference would compute with. Ops that accumulate in fp32
            whatever their input dtype (the losses, the matching cost) leave it False: their
            kernels read fp16/bf16 as they come.
    """

    def __init__(self, name: str, reference: Callable, check: Optional[Callable] = None,
                 traits: Optional[Callable[..., Hashable]] = None, autocast_lower: bool = False):
        self.name = name
        self.check = check
        self.traits = traits
        self.autocast_lower = autocast_lower
        self.backends: Dict[str, Backend] = {"reference": Backend("reference", reference, priority=-(10**9))}
        self._env_keys = (f"FASTMASKFORMER_BACKEND_{name.upper()}", "FASTMASKFORMER_BACKEND")
        self._cache: Dict[tuple, Backend] = {}

    @property
    def reference(self) -> Callable:
        return self.backends["reference"].fn

    def register(self, name: str, fn: Callable, **kwargs) -> Backend:
        if name in ("reference", "auto"):
            raise ValueError(f"{name!r} is a reserved backend name")
        b = Backend(name, fn, **kwargs)
        self.backends[name] = b
        self._cache.clear()
        return b

    def clear_cache(self) -> None:
        """Forget the cached choices (after changing a backend's ``available``/``supports``)."""
        self._cache.clear()

    def _env_choice(self) -> Optional[str]:
        own = os.environ.get(self._env_keys[0])
        if own:
            return own
        glob = os.environ.get(self._env_keys[1])
        if glob and glob in self.backends:
            return glob
        return None

    def _reasons(self, args, kwargs) -> List[Tuple[Backend, Optional[str], bool]]:
        """(backend, reason it cannot run or None, reason is install-level) for each backend."""
        out = []
        for b in sorted(self.backends.values(), key=lambda b: -b.priority):
            why = b.available()
            if why is not None:
                out.append((b, why, True))
                continue
            try:
                why = b.supports(*args, **kwargs)
            except Exception as exc:  # a supports() that trips is a reason, not a crash
                why = f"supports() raised {type(exc).__name__}: {exc}"
            out.append((b, why, False))
        return out

    def _key(self, backend: str, args: tuple, kwargs: dict) -> tuple:
        t = _first_tensor(args, kwargs)
        device, dtype = (t.device.type, t.dtype) if t is not None else ("cpu", None)
        return backend, device, dtype, self.traits(*args, **kwargs) if self.traits is not None else None

    def choose(self, backend: str, args: tuple, kwargs: dict, warn: bool = True) -> Backend:
        if backend == "reference":
            return self.backends["reference"]
        if not isinstance(backend, str):
            raise TypeError(f"{self.name}: backend must be a str, got {type(backend).__name__}")
        if backend == "auto":
            backend = self._env_choice() or "auto"
        key = self._key(backend, args, kwargs)
        chosen = self._cache.get(key)
        if chosen is None:
            chosen = self._choose_uncached(backend, key[1], args, kwargs, warn)
            self._cache[key] = chosen
        return chosen

    def _choose_uncached(self, backend: str, device: str, args: tuple, kwargs: dict, warn: bool) -> Backend:
        if backend != "auto":
            if backend not in self.backends:
                raise ValueError(
                    f"{self.name}: unknown backend {backend!r}; known: {sorted(self.backends)}"
                    + (f" (failed to load: {_load_errors})" if _load_errors else "")
                )
            b = self.backends[backend]
            why = b.available() or b.supports(*args, **kwargs)
            if why is not None:
                raise RuntimeError(f"{self.name}: backend {backend!r} cannot take this call: {why}")
            return b
        missing = []
        for b, why, install_level in self._reasons(args, kwargs):
            if b.name == "reference" or device not in b.auto_devices:
                continue
            if why is None:
                return b
            if install_level:
                missing.append(f"{b.name}: {why}")
        if missing and warn:
            _warn_once(f"fastmaskformer.ops.{self.name}: falling back to the reference because " + "; ".join(missing))
        return self.backends["reference"]

    def explain(self, *args, backend: str = "auto", **kwargs) -> str:
        lines = [f"{self.name} (backend={backend!r}, env={self._env_choice()!r}):"]
        for b, why, install_level in self._reasons(args, kwargs):
            state = "ok" if why is None else ("not installed: " if install_level else "declines: ") + why
            lines.append(f"  {b.name:<10} priority={b.priority:<4} auto_devices={list(b.auto_devices)} {state}")
        try:
            lines.append(f"  -> {self.choose(backend, args, kwargs, warn=False).name}")
        except Exception as exc:
            lines.append(f"  -> error: {exc}")
        if _load_errors:
            lines.append(f"  backend modules that failed to import: {_load_errors}")
        return "\n".join(lines)

    def __call__(self, *args, backend: str = "reference", **kwargs):
        if self.check is not None:
            self.check(*args, **kwargs)
        return self.unchecked(*args, backend=backend, **kwargs)

    def unchecked(self, *args, backend: str = "reference", **kwargs):
        """The call without ``check``, for a caller that has checked arguments of the same types,
        shapes and devices already (the matcher checks the targets once for all decoder layers)."""
        if self.autocast_lower:
            args = _autocast_cast(args)
        return self.choose(backend, args, kwargs).fn(*args, **kwargs)


def _autocast_cast(args: tuple) -> tuple:
    """The floating tensors of ``args`` in the autocast dtype of their device, when autocast is on."""
    t = _first_tensor(args, {})
    if t is None or not torch.is_autocast_enabled(t.device.type):
        return args
    dtype = torch.get_autocast_dtype(t.device.type)
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _warn_once(msg: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(msg + " (further fallbacks in this process are silent; see fastmaskformer.ops.explain)",
                      RuntimeWarning, stacklevel=4)


def backend_for(fused: bool) -> str:
    """The backend name the model, matcher and criterion pass for their ``fused`` flag."""
    return "auto" if fused else "reference"
