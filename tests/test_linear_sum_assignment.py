"""linear_sum_assignment backends ("native", "lapjv") against scipy's optimum on thousands of random
problems (uniform, integer costs full of ties, low rank, duplicated rows, wide-range negatives,
forbidden +inf pairs), both orientations, the edge cases, the errors naming the image, the GIL
released during the solve, and (with a GPU) the CUDA solver."""
import sys
import threading
import time

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment as scipy_lsa

import fastmaskformer.ops as ops
from fastmaskformer.ops import linear_sum_assignment as lsa
from tolerances import assert_close

BACKENDS = ["native", "lapjv"]
KINDS = ["uniform", "integer", "low_rank", "duplicate_rows", "wide_negative", "forbidden"]


def random_costs(kind, rng, B, Q, N, sizes):
    """[B, Q, N] float64 costs of one kind; image b's real block is [:, :sizes[b]], the padding is NaN
    (a solver must never read it)."""
    if kind == "uniform":
        c = rng.random((B, Q, N))
    elif kind == "integer":  # 4 values: ties everywhere, many optimal matchings
        c = rng.integers(0, 4, (B, Q, N)).astype(np.float64)
    elif kind == "low_rank":
        c = rng.random((B, Q, 2)) @ rng.random((B, 2, N))
    elif kind == "duplicate_rows":
        c = np.take_along_axis(rng.random((B, 3, N)), rng.integers(0, 3, (B, Q, 1)), axis=1)
    elif kind == "wide_negative":
        c = rng.normal(scale=1e4, size=(B, Q, N))
    else:  # forbidden: +inf on about half the pairs, but a random complete matching stays finite
        c = np.where(rng.random((B, Q, N)) < 0.5, np.inf, rng.random((B, Q, N)))
        for b, n in enumerate(sizes):
            k = min(Q, n)
            c[b, rng.permutation(Q)[:k], rng.permutation(n)[:k]] = rng.random(k)
    for b, n in enumerate(sizes):
        c[b, :, n:] = np.nan
    return c


def check_optimal(c, rows, cols, what):
    """(rows, cols) is a valid matching of the [Q, n] float64 cost c in scipy's convention whose total
    equals scipy's optimum."""
    rows, cols = rows.cpu().numpy(), cols.cpu().numpy()
    Q, n = c.shape
    assert rows.dtype == np.int64 and cols.dtype == np.int64, what
    assert len(rows) == len(cols) == min(Q, n), f"{what}: {len(rows)} pairs, expected {min(Q, n)}"
    assert np.all(np.diff(rows) > 0), f"{what}: rows not strictly ascending: {rows}"
    assert len(np.unique(cols)) == len(cols), f"{what}: a column is used twice: {cols}"
    assert np.all((rows >= 0) & (rows < Q) & (cols >= 0) & (cols < n)), f"{what}: index out of range"
    r, k = scipy_lsa(c)
    got, want = c[rows, cols].sum(), c[r, k].sum()
    assert np.isfinite(got), f"{what}: uses a forbidden pair"
    # The solvers work in float64 on the exactly converted inputs, whatever the input dtype: the
    # float64 tolerance applies to every dtype.
    assert_close(torch.tensor(got), torch.tensor(want), torch.float64, what=f"{what} total cost")


def check_batch(cost, sizes, result, what):
    c64 = cost.detach().cpu().double().numpy()
    assert len(result) == cost.shape[0]
    for b, (rows, cols) in enumerate(result):
        check_optimal(c64[b, :, : int(sizes[b])], rows, cols, f"{what} image {b}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_optimal_on_random_problems(backend, kind, dtype):
    rng = np.random.default_rng(KINDS.index(kind))
    for Q in (1, 3, 8, 17, 30):  # sizes in [0, 2Q + 3]: Q > N, Q = N and Q < N all occur
        B, N = 40, 2 * Q + 3
        sizes = rng.integers(0, N + 1, B)
        cost = torch.from_numpy(random_costs(kind, rng, B, Q, N, sizes)).to(dtype)
        got = lsa(cost, torch.from_numpy(sizes), backend=backend)
        check_batch(cost, sizes, got, f"{backend} {kind} Q={Q}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(backend, dtype):
    cost = torch.rand(6, 9, 13).to(dtype)
    sizes = torch.tensor([13, 9, 4, 0, 1, 11])
    check_batch(cost, sizes, lsa(cost, sizes, backend=backend), f"{backend} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_list_of_matrices(backend):
    costs = [torch.rand(7, n, dtype=torch.float64) for n in (0, 1, 7, 12, 3)]
    got = lsa(costs, backend=backend)
    assert len(got) == len(costs)
    for b, (c, (rows, cols)) in enumerate(zip(costs, got)):
        check_optimal(c.numpy(), rows, cols, f"{backend} list image {b}")
    assert lsa([], backend=backend) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_cost(backend):
    base = torch.rand(5, 16, 21, dtype=torch.float64)
    cost = base.transpose(1, 2)[:, ::2, 1:]  # [5, 11, 15], strides in every dim
    assert not cost.is_contiguous()
    sizes = torch.tensor([15, 3, 11, 0, 14])
    check_batch(cost, sizes, lsa(cost, sizes, backend=backend), f"{backend} non-contiguous")


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_cases(backend):
    one = lsa(torch.tensor([[[3.5]]]), torch.tensor([1]), backend=backend)
    assert [(r.tolist(), c.tolist()) for r, c in one] == [([0], [0])]
    for cost, sizes in ((torch.rand(3, 4, 5), torch.zeros(3, dtype=torch.int64)),  # N_i = 0
                        (torch.rand(2, 0, 5), torch.tensor([5, 2]))):  # no queries
        for rows, cols in lsa(cost, sizes, backend=backend):
            assert rows.dtype == cols.dtype == torch.int64 and rows.numel() == cols.numel() == 0
    assert lsa(torch.rand(0, 4, 4), torch.zeros(0, dtype=torch.int64), backend=backend) == []
    # Every matching of a constant cost is optimal; duplicated rows and columns tie everywhere.
    flat = torch.full((2, 5, 8), 2.0)
    check_batch(flat, [8, 3], lsa(flat, torch.tensor([8, 3]), backend=backend), f"{backend} constant")
    dup = torch.tensor([[1.0, 2.0, 3.0]]).repeat(4, 1)[None]
    check_batch(dup, [3], lsa(dup, torch.tensor([3]), backend=backend), f"{backend} duplicate rows")


def _with_bad_image(bad, image=2, B=4):
    cost = torch.rand(B, 4, 6, dtype=torch.float64)
    cost[image, :, :bad.shape[1]] = bad
    return cost, torch.tensor([bad.shape[1] if b == image else 6 for b in range(B)])


INF = float("inf")
INFEASIBLE = {
    "a row all forbidden": torch.tensor([[1.0, 2, 3, 4, 5], [INF] * 5, [1, 2, 3, 4, 5], [1, 2, 3, 4, 5]]),
    "a column all forbidden, Q > N": torch.tensor([[1.0, INF], [2, INF], [3, INF], [4, INF]]),
    "two rows sharing one column": torch.tensor([[1.0, INF, INF, INF, INF], [2, INF, INF, INF, INF],
                                                 [1, 2, 3, 4, 5], [5, 4, 3, 2, 1]]),
    "every pair forbidden": torch.full((4, 3), INF),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(INFEASIBLE))
def test_infeasible_raises_naming_the_image(backend, case):
    cost, sizes = _with_bad_image(INFEASIBLE[case])
    with pytest.raises(ValueError, match="image 2 has no feasible matching"):
        lsa(cost, sizes, backend=backend)
    feasible = INFEASIBLE[case].clone()
    feasible[feasible == INF] = 7.0  # the same problem without the +inf is fine
    cost, sizes = _with_bad_image(feasible)
    check_batch(cost, sizes, lsa(cost, sizes, backend=backend), f"{backend} {case} made feasible")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_neg_inf_raise_naming_the_first_bad_image(backend):
    cost = torch.rand(4, 3, 5)
    cost[1, 2, 0] = -INF
    cost[2, 0, 1] = float("nan")
    with pytest.raises(ValueError, match="image 1 contains -inf"):
        lsa(cost, torch.tensor([5, 5, 5, 5]), backend=backend)
    cost[1, 2, 0] = 0.5
    with pytest.raises(ValueError, match="image 2 contains NaN"):
        lsa(cost, torch.tensor([5, 5, 5, 5]), backend=backend)
    # In the padding (image 2 uses 1 column): never read.
    check_batch(cost, [5, 5, 1, 5], lsa(cost, torch.tensor([5, 5, 1, 5]), backend=backend), f"{backend} NaN padding")


@pytest.mark.parametrize("backend", BACKENDS)
def test_costs_too_wide_to_stand_in_for_inf(backend):
    cost = torch.tensor([[[1e308, -1e308], [INF, 0.0]]], dtype=torch.float64)
    with pytest.raises(ValueError, match="image 0 span too wide"):
        lsa(cost, torch.tensor([2]), backend=backend)


def test_bad_arguments_raise_before_solving():
    cost = torch.rand(2, 3, 4)
    cases = [
        (lambda: lsa(torch.rand(3, 4), torch.tensor([4]), backend="native"), ValueError, "cost: expected a 3-d"),
        (lambda: lsa(torch.ones(2, 3, 4, dtype=torch.int64), torch.tensor([4, 4]), backend="native"), TypeError,
         "cost: expected a floating-point"),
        (lambda: lsa(cost, None, backend="native"), ValueError, "sizes: required"),
        (lambda: lsa(cost, torch.tensor([4]), backend="native"), ValueError, r"sizes: expected shape \(2,\)"),
        (lambda: lsa(cost, torch.tensor([4, 5]), backend="native"), ValueError, r"sizes: expected values in \[0, 4\]"),
        (lambda: lsa(cost, torch.tensor([4.0, 4.0]), backend="native"), TypeError, "sizes: expected an integer"),
        (lambda: lsa(cost, torch.tensor([4, 4], device="meta"), backend="native"), ValueError,
         "sizes is on meta but cost is on cpu"),
        (lambda: lsa([torch.rand(3, 4), torch.rand(3, 4, device="meta")], backend="native"), ValueError,
         "cost\\[1\\] is on meta but cost\\[0\\] is on cpu"),
        (lambda: lsa([torch.rand(3, 4), torch.rand(3)], backend="native"), ValueError, r"cost\[1\]: expected a 2-d"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()


def test_native_op_checks_its_own_arguments():
    op = torch.ops.fastmaskformer.linear_sum_assignment
    cost = torch.rand(2, 3, 4)
    with pytest.raises(TypeError, match="sizes: expected int64"):
        op(cost, torch.tensor([4, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"sizes: expected values in \[0, 4\], got 9 at image 1"):
        op(cost, torch.tensor([4, 9]))
    with pytest.raises(TypeError, match="cost: expected float16, bfloat16, float32 or float64"):
        op(torch.ones(2, 3, 4, dtype=torch.int32), torch.tensor([4, 4]))


def test_native_packed_output_and_fake_kernel():
    cost, sizes = torch.rand(3, 4, 6), torch.tensor([6, 2, 0])
    pairs = torch.ops.fastmaskformer.linear_sum_assignment(cost, sizes)
    assert pairs.shape == (2, 3 * 4) and pairs.dtype == torch.int64
    assert (pairs[:, 6:] == -1).all() and (pairs[:, :6] >= 0).all()  # 4 + 2 + 0 pairs, then padding
    torch.library.opcheck(torch.ops.fastmaskformer.linear_sum_assignment.default, (cost, sizes))


def test_native_declines_mixed_lists_and_auto_falls_back():
    costs = [torch.rand(3, 4), torch.rand(5, 4)]
    with pytest.raises(RuntimeError, match="must share rows, dtype and device"):
        lsa(costs, backend="native")
    for c, (rows, cols) in zip(costs, lsa(costs, backend="auto")):
        check_optimal(c.double().numpy(), rows, cols, "auto fallback")


def test_auto_rules():
    for B, Q, N in ((1, 1, 1), (16, 100, 10), (16, 100, 100)):  # native is measured fastest at every size
        cost, sizes = torch.rand(B, Q, N), torch.full((B,), N)
        assert lsa.choose("auto", (cost, sizes), {}).name == "native", ops.explain("linear_sum_assignment", cost, sizes)
    assert lsa.backends["lapjv"].auto_devices == ()  # only ever by name


def _longest_stall_during(fn):
    """Runs fn in another thread; returns how long it took and the longest pause this thread's
    Python loop saw meanwhile (the whole call if fn held the GIL)."""
    done, took = threading.Event(), []

    def work():
        t0 = time.perf_counter()
        fn()
        took.append(time.perf_counter() - t0)
        done.set()

    worker = threading.Thread(target=work)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)  # hand the GIL over quickly when the worker needs it
    try:
        last, stall = time.perf_counter(), 0.0
        worker.start()
        while not done.is_set():
            now = time.perf_counter()
            stall, last = max(stall, now - last), now
        worker.join()
    finally:
        sys.setswitchinterval(interval)
    return took[0], stall


@pytest.mark.parametrize("backend,B", [("native", 32), ("lapjv", 8)])
def test_the_gil_is_released_while_solving(backend, B):
    cost, sizes = torch.rand(B, 400, 400), torch.full((B,), 400)  # one call of 30 ms or more
    # Holding the GIL would stall this thread for the whole call, every time; a busy machine (CI
    # runs two test workers on two cores) can stall it too, but not on three tries in a row.
    for _ in range(3):
        took, stall = _longest_stall_during(lambda: lsa(cost, sizes, backend=backend))
        if stall < took / 2:
            break
    assert stall < took / 2, f"{backend}: another Python thread stalled {stall:.3f} s of a {took:.3f} s solve"


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_solver_matches_the_cpu_solver(kind):
    rng = np.random.default_rng(7)
    for Q, N in ((100, 100), (100, 30), (20, 70), (1, 5)):
        sizes = rng.integers(0, N + 1, 16)
        cost = torch.from_numpy(random_costs(kind, rng, 16, Q, N, sizes))
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            c = cost.to(dtype)
            got = lsa(c.cuda(), torch.from_numpy(sizes), backend="native")
            assert all(r.is_cuda and k.is_cuda for r, k in got)
            check_batch(c, sizes, got, f"cuda {kind} {Q}x{N} {dtype}")
            # The kernel follows the CPU solver step by step: the same matching, ties included.
            for (r, k), (r_cpu, k_cpu) in zip(got, lsa(c, torch.from_numpy(sizes), backend="native")):
                assert torch.equal(r.cpu(), r_cpu) and torch.equal(k.cpu(), k_cpu), f"cuda {kind} {Q}x{N} {dtype}"


@pytest.mark.gpu
@gpu
def test_cuda_errors_name_the_image():
    cost, sizes = _with_bad_image(INFEASIBLE["two rows sharing one column"])
    with pytest.raises(ValueError, match="image 2 has no feasible matching"):
        lsa(cost.cuda(), sizes, backend="native")
    cost = torch.rand(3, 4, 4, device="cuda")
    cost[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="image 1 contains NaN"):
        lsa(cost, torch.tensor([4, 4, 4]), backend="native")
    costs = [torch.rand(5, n, device="cuda") for n in (3, 0, 8)]
    for c, (rows, cols) in zip(costs, lsa(costs, backend="native")):
        check_optimal(c.double().cpu().numpy(), rows, cols, "cuda list")
