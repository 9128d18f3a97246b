"""The lapjv package (Jonker-Volgenant, square problems only) as the "lapjv" backend of
linear_sum_assignment, the batch spread over a thread pool: lapjv releases the GIL while it solves
(tests/test_linear_sum_assignment.py checks that another thread runs meanwhile).

A rectangular [Q, N] problem is padded to a square of side max(Q, N) with a constant: every complete
matching of the square uses exactly |Q - N| padding entries, so padding adds the same amount to all
of them and the optimum of the real entries is preserved. +inf is replaced by a finite cost larger
than any matching that avoids it (lapjv has no notion of a forbidden pair), and a solution that
still uses one proves the problem infeasible.
"""
from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Tuple

import numpy as np
import torch

from .._linear_sum_assignment import Assignment, as_problems, check_problem
from .._linear_sum_assignment import linear_sum_assignment as op

try:
    import lapjv as _lapjv
except ImportError as exc:  # an optional dependency (pip install 'fastmaskformer[lapjv]')
    _lapjv, _import_error = None, f"the lapjv package is not installed ({exc})"
else:
    _import_error = None

_lapjv_kwargs: Optional[dict] = None


def available() -> Optional[str]:
    return _import_error


def forbidden_cost(lo: float, hi: float, pairs: int) -> float:
    """A cost for +inf entries that no optimal matching pays when a feasible one exists: a matching
    of ``pairs`` entries in [lo, hi] costs at most pairs * hi, one using this costs more (the same
    rule as csrc/include/fmf/lap.h)."""
    return hi + (pairs + 1) * (hi - lo) + abs(hi) + 1.0


def _solver_kwargs() -> dict:
    """lapjv >= 1.3.20 computes in float32 unless told otherwise; older releases keep float64."""
    global _lapjv_kwargs
    if _lapjv_kwargs is None:
        try:
            _lapjv.lapjv(np.zeros((1, 1)), force_doubles=True)
            _lapjv_kwargs = {"force_doubles": True}
        except TypeError:
            _lapjv_kwargs = {}
    return _lapjv_kwargs


def solve_one(b: int, c: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Image b's float64 [Q, N] cost -> (rows, cols) in scipy's convention."""
    Q, N = c.shape
    if Q == 0 or N == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    check_problem(b, c)
    n = max(Q, N)
    forbidden = np.isposinf(c)
    square = np.zeros((n, n))  # padding: 0, which the finite range below includes
    square[:Q, :N] = c
    if forbidden.any():
        finite = c[~forbidden]
        if finite.size == 0:
            raise ValueError(f"linear_sum_assignment: image {b} has no feasible matching (every entry is +inf)")
        big = forbidden_cost(min(float(finite.min()), 0.0), max(float(finite.max()), 0.0), n)
        if not np.isfinite(big):
            raise ValueError(f"linear_sum_assignment: the finite costs of image {b} span too wide a range to stand "
                             "in for +inf entries in float64")
        square[:Q, :N][forbidden] = big
    col_of_row = _lapjv.lapjv(square, **_solver_kwargs())[0][:Q].astype(np.int64)
    rows = np.flatnonzero(col_of_row < N)
    cols = col_of_row[rows]
    if forbidden[rows, cols].any():
        raise ValueError(f"linear_sum_assignment: image {b} has no feasible matching "
                         "(every complete matching uses a +inf entry)")
    return rows, cols


@functools.lru_cache(maxsize=None)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="fastmaskformer-lapjv")


def _solve_range(problems, begin: int, end: int):
    return [solve_one(b, problems[b]) for b in range(begin, end)]


def linear_sum_assignment_lapjv(cost, sizes=None) -> Assignment:
    problems = [c.detach().to("cpu", torch.float64).numpy() for c in as_problems(cost, sizes)]
    workers = max(1, min(len(problems), torch.get_num_threads(), os.cpu_count() or 1))
    # One contiguous range of images per thread: a task per image would cost more in the pool
    # than small problems take to solve.
    bounds = [len(problems) * k // workers for k in range(workers + 1)]
    futures = [_pool().submit(_solve_range, problems, bounds[k], bounds[k + 1]) for k in range(workers - 1)]
    try:  # the calling thread takes the last range
        last = _solve_range(problems, bounds[-2], bounds[-1])
    except ValueError as exc:
        last = exc
    # Collected in batch order, so the error raised is the first failing image's.
    results = [r for f in futures for r in f.result()]
    if isinstance(last, ValueError):
        raise last
    return [(torch.from_numpy(r), torch.from_numpy(c)) for r, c in results + last]


def supports(cost, sizes=None) -> Optional[str]:
    problems = as_problems(cost, sizes)
    if any(c.device.type not in ("cpu", "cuda") for c in problems):
        return "takes cpu and cuda tensors (solved on the host)"
    return None


# Never chosen by "auto" (only by name): see the measurements next to the "native" registration.
op.register("lapjv", linear_sum_assignment_lapjv, available=available, supports=supports, auto_devices=(),
            priority=10)
