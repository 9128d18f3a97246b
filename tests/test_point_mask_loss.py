"""ops.point_mask_loss: every fused backend that runs on this machine against the reference.

Forward values and gradients at odd sizes, with points on the borders, outside [0, 1], on pixel
centres and pixel edges of both maps, P = 1 and P in the thousands, fp32/fp16/bf16 logits, bool,
uint8 and soft float targets, empty batches, saturated logits, strided views and a 0-d num_masks; a
finite-difference check of the native backward; the per-mask statistics of both kernels against a
per-point computation; bad input rejected before any backend runs; opcheck and a fullgraph compile of
the native ops. The Triton backend runs on CPU tensors under the interpreter (conftest sets
TRITON_INTERPRET=1), so shapes stay small.
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES
from fastmaskformer import ops
from tolerances import assert_close
from backend_checks import assert_rejected_before_backend
from test_mask_loss import _Allocations

ops.load_backends()
OP = ops.point_mask_loss
BACKENDS = [b for b in ("triton", "native") if b in OP.backends and OP.backends[b].available() is None]


def _takes(backend: str, device: str) -> bool:
    probe = (torch.zeros(1, 2, 2, device=device), torch.zeros(1, 4, 4, dtype=torch.bool, device=device),
             torch.zeros(1, 3, 2, device=device), 1.0)
    return OP.backends[backend].supports(*probe) is None


CASES = [pytest.param(b, d, id=f"{b}-{d}") for b in BACKENDS for d in DEVICES if _takes(b, d)]
NATIVE = [pytest.param(d, id=d) for d in DEVICES if "native" in BACKENDS and _takes("native", d)]
TRITON_DEVICES = [d for d in DEVICES if "triton" in BACKENDS and _takes("triton", d)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (N, h, w, H, W, P): odd sizes and ratios, a 1-pixel-high prediction, equal sizes with one point,
# and a few thousand points (several point blocks per mask).
SHAPES = [(3, 5, 7, 17, 19, 50), (2, 1, 3, 9, 16, 33), (1, 12, 12, 12, 12, 1), (4, 7, 3, 13, 40, 21),
          (2, 6, 5, 40, 30, 2500)]


def _logits(N, h, w, device, dtype=torch.float32, spread=3.0):
    return (torch.randn(N, h, w, device=device) * spread).to(dtype)


def _masks(N, H, W, device, dtype=torch.bool):
    t = torch.rand(N, H, W, device=device)
    return t.to(dtype) if dtype.is_floating_point else (t > 0.5).to(dtype)


def _coords(N, P, h, w, H, W, device):
    """Uniform points in [-0.15, 1.15]^2 (some outside the maps), then, cycling over the first ones:
    the corners and edges of [0, 1]^2, pixel centres of the logits and of the targets, and the
    logits' pixel edges."""
    c = torch.rand(N, P, 2) * 1.3 - 0.15
    special = [(0.0, 0.0), (1.0, 1.0), (0.0, 1.0), (1.0, 0.5), (0.5, 0.0), (-1e-7, 0.5), (1.0 + 1e-7, 0.3)]
    special += [((j + 0.5) / w, (i + 0.5) / h) for i, j in ((0, 0), (h - 1, w - 1), (h // 2, w // 3))]
    special += [((j + 0.5) / W, (i + 0.5) / H) for i, j in ((0, 0), (H - 1, W - 1), (H // 3, W // 2))]
    special += [(j / w, i / h) for i, j in ((1, 1), (h // 2, w - 1))]
    k = min(P, len(special))
    for n in range(N):
        c[n, :k] = torch.tensor(special[n % len(special):] + special[:n % len(special)])[:k]
    return c.to(device)


def _inputs(N, h, w, H, W, P, device, dtype=torch.float32, target_dtype=torch.bool):
    return _logits(N, h, w, device, dtype), _masks(N, H, W, device, target_dtype), _coords(N, P, h, w, H, W, device)


def _run(backend, x, t, c, num_masks=2.0):
    """Both losses and d(0.7 loss_mask + 1.3 loss_dice)/dx, so each term's gradient path counts."""
    x = x.detach().requires_grad_()
    losses = OP(x, t, c, num_masks, backend=backend)
    weights = [torch.tensor(v, device=x.device) for v in (0.7, 1.3)]
    (grad,) = torch.autograd.grad(losses, x, weights)
    return losses, grad


def _check(backend, x, t, c, dtype=torch.float32, num_masks=2.0):
    (mask, dice), grad = _run(backend, x, t, c, num_masks)
    (mask_ref, dice_ref), grad_ref = _run("reference", x, t, c, num_masks)
    assert mask.dtype == dice.dtype == torch.float32 and mask.dim() == dice.dim() == 0
    assert_close(mask, mask_ref, dtype, what=f"{backend} loss_mask")
    assert_close(dice, dice_ref, dtype, what=f"{backend} loss_dice")
    assert grad.dtype == x.dtype and grad.shape == x.shape
    assert_close(grad, grad_ref, dtype, what=f"{backend} d/d(pred_masks)", grad=True)
    return grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend,device", CASES)
def test_matches_reference(backend, device, shape, dtype):
    _check(backend, *_inputs(*shape, device, dtype), dtype)


@pytest.mark.parametrize("target_dtype", [torch.uint8, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend,device", CASES)
def test_target_dtypes(backend, device, target_dtype):
    """uint8 like bool; float targets are soft labels in [0, 1], sampled as the reference samples them."""
    _check(backend, *_inputs(2, 5, 6, 17, 19, 40, device, target_dtype=target_dtype))


@pytest.mark.parametrize("backend,device", CASES)
def test_only_special_points(backend, device):
    """Every point on a border, a pixel centre or edge, or just outside the map (no uniform ones)."""
    x, t, c = _inputs(3, 4, 6, 9, 11, 15, device)
    assert ((c < 0) | (c > 1)).any() and (c == 0).any() and (c == 1).any()
    _check(backend, x, t, c)


@pytest.mark.parametrize("backend,device", CASES)
def test_points_far_outside_read_zeros(backend, device):
    """Points outside the maps read logit 0 and target 0 there: BCE log 2 and s = 1/2 per point, and
    no gradient reaches the logits."""
    x, t = _logits(2, 3, 4, device), _masks(2, 7, 8, device)
    c = torch.tensor([[-0.5, 0.5], [1.6, 0.2], [0.3, -3.0], [0.4, 9.0]], device=device).expand(2, 4, 2)
    (mask, dice), grad = _run(backend, x, t, c, num_masks=1.0)
    assert_close(mask, torch.tensor(2 * torch.log(torch.tensor(2.0)).item()), what="loss_mask")
    assert_close(dice, torch.tensor(2 * (1 - 1 / 3.0)), what="loss_dice")
    assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("kind", ["+-100", "randn*100"])
@pytest.mark.parametrize("backend,device", CASES)
def test_saturated_logits_stay_finite(backend, device, kind):
    N, h, w, H, W, P = 2, 5, 6, 18, 23, 60
    _, t, c = _inputs(N, h, w, H, W, P, device)
    if kind == "+-100":
        x = 100.0 * torch.randint(0, 2, (N, h, w), device=device).float().mul(2).sub(1)
    else:
        x = _logits(N, h, w, device, spread=100.0)
    grad = _check(backend, x, t, c)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("backend,device", CASES)
def test_strided_inputs(backend, device):
    """Transposed predictions, a strided offset slice of the targets, coords from a wider tensor."""
    x = _logits(3, 7, 5, device).transpose(1, 2)
    t = _masks(3, 2 * 23, 3 * 31 + 1, device)[:, 1::2, 1::3]
    c = torch.rand(3, 40, 3, device=device)[..., 1:]
    assert not x.is_contiguous() and not t.is_contiguous() and not c.is_contiguous()
    _check(backend, x, t, c)


@pytest.mark.parametrize("coords_dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend,device", CASES)
def test_half_coords(backend, device, coords_dtype):
    """Half-precision coordinates are read as the reference reads them (coords.float())."""
    x, t, c = _inputs(2, 5, 6, 17, 19, 30, device)
    _check(backend, x, t, c.to(coords_dtype))


@pytest.mark.parametrize("backend,device", CASES)
def test_num_masks_as_tensor(backend, device):
    x, t, c = _inputs(3, 5, 6, 17, 19, 30, device)
    _check(backend, x, t, c, num_masks=torch.tensor(2.5, device=device))


@pytest.mark.parametrize("backend,device", CASES)
def test_empty_batch(backend, device):
    (mask, dice), grad = _run(backend, *_inputs(0, 5, 6, 20, 24, 7, device))
    assert mask.item() == 0.0 and dice.item() == 0.0 and grad.shape == (0, 5, 6)


@pytest.mark.parametrize("device", NATIVE)
def test_native_gradient_matches_finite_differences(device):
    """The native backward against central differences of the native forward itself (fp32)."""
    x, t, c = _inputs(2, 3, 4, 7, 9, 40, device)
    x = x / 3
    _, grad = _run("native", x, t, c)
    eps, numeric = 1e-2, torch.zeros_like(x)

    def loss(z):
        mask, dice = OP(z, t, c, 2.0, backend="native")
        return (0.7 * mask + 1.3 * dice).double()

    for i in range(x.numel()):
        step = torch.zeros_like(x).flatten()
        step[i] = eps
        numeric.view(-1)[i] = (loss(x + step.view_as(x)) - loss(x - step.view_as(x))) / (2 * eps)
    torch.testing.assert_close(grad, numeric, rtol=2e-2, atol=2e-5)


@pytest.mark.parametrize("device", NATIVE)
def test_native_is_deterministic_across_thread_counts(device):
    x, t, c = _inputs(5, 9, 11, 31, 29, 300, device)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        (a, b), g = _run("native", x, t, c)
        torch.set_num_threads(2)
        (a2, b2), g2 = _run("native", x, t, c)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, a2) and torch.equal(b, b2) and torch.equal(g, g2)


@pytest.mark.parametrize("target_dtype", [torch.bool, torch.uint8], ids=str)
@pytest.mark.parametrize("device", NATIVE)
def test_native_vector_gathers_equal_the_scalar_reads(device, target_dtype):
    """fp32 logits and byte targets with unit column stride take the vector-gather loads (on a CPU
    with AVX2); the same values with a column stride of 2 take the scalar reads. Both give the same
    bits. The targets start 1 byte into their storage with 5 x 7 maps, so their rows sit at every
    byte alignment (each gather lane reads the aligned word holding its byte), and the points
    include the maps' last pixel."""
    N, h, w, H, W, P = 4, 9, 11, 5, 7, 301
    x = _logits(N, h, w, device)
    t = _masks(N + 1, H, W, device, target_dtype)[1:]
    assert t.storage_offset() % 4 != 0
    c = _coords(N, P, h, w, H, W, device)
    c[:, -1] = torch.tensor([1.0 - 0.5 / W, 1.0 - 0.5 / H])
    x_wide = torch.zeros(N, h, 2 * w, device=device)
    x_wide[..., ::2] = x
    t_wide = torch.zeros(N, H, 2 * W, dtype=target_dtype, device=device)
    t_wide[..., ::2] = t
    (a, b), g = _run("native", x, t, c)
    (a2, b2), g2 = _run("native", x_wide[..., ::2], t_wide[..., ::2], c)
    assert torch.equal(a, a2) and torch.equal(b, b2) and torch.equal(g, g2)
    (ref_a, ref_b), ref_g = _run("reference", x, t, c)
    assert_close(a, ref_a, what="loss_mask")
    assert_close(b, ref_b, what="loss_dice")
    assert_close(g, ref_g, what="d/d(pred_masks)", grad=True)


@pytest.mark.parametrize("backend,device", [pytest.param("reference", "cpu", id="reference-cpu")] + CASES)
def test_grad_out_receives_the_gradient(backend, device):
    """With grad_out the gradient of pred_masks is added into that buffer, which autograd receives as
    the gradient: starting from zeros it is the gradient; from other values, those plus it. Logits
    that need no gradient leave it untouched."""
    x, t, c, pi, ti = _rows_case(device)
    xr = x.detach().requires_grad_()
    losses = OP(xr, t, c, 2.0, pred_index=pi, target_index=ti, backend=backend)
    weights = [torch.tensor(v, device=device) for v in (0.7, 1.3)]
    (expected,) = torch.autograd.grad(losses, xr, weights)
    for start in (0.0, 0.25):
        buf = torch.full_like(x, start)
        xr = x.detach().requires_grad_()
        got_losses = OP(xr, t, c, 2.0, pred_index=pi, target_index=ti, grad_out=buf, backend=backend)
        assert torch.equal(got_losses[0], losses[0]) and torch.equal(got_losses[1], losses[1])
        (grad,) = torch.autograd.grad(got_losses, xr, weights)
        assert grad.data_ptr() == buf.data_ptr()
        assert_close(grad - start, expected, what=f"{backend} grad_out from {start}", grad=True)
    buf = torch.zeros_like(x)
    OP(x, t, c, 2.0, pred_index=pi, target_index=ti, grad_out=buf, backend=backend)
    assert torch.count_nonzero(buf) == 0


@pytest.mark.parametrize("case", ["dtype", "shape", "strided", "device", "type"])
def test_grad_out_is_checked(case):
    x, t, c, pi, ti = _rows_case("cpu")
    bad = {"dtype": torch.zeros_like(x, dtype=torch.float64), "shape": torch.zeros(x.shape[0] + 1, *x.shape[1:]),
           "strided": torch.zeros(x.shape[0], x.shape[2], x.shape[1]).transpose(1, 2),
           "device": torch.zeros(x.shape, device="meta"), "type": x.numpy()}[case]
    error = TypeError if case in ("dtype", "type") else ValueError
    with pytest.raises(error, match="grad_out"):
        OP(x.requires_grad_(), t, c, 2.0, pred_index=pi, target_index=ti, grad_out=bad)


def _rows_case(device, index_dtype=torch.int64):
    """A layer's logits [M, h, w] and the step's targets [T, H, W] with N = 5 masks reading rows of
    each, one logit row twice and some rows never."""
    M, T, N, h, w, H, W, P = 7, 4, 5, 5, 6, 17, 19, 40
    x, t = _logits(M, h, w, device), _masks(T, H, W, device)
    c = _coords(N, P, h, w, H, W, device)
    pred_index = torch.tensor([6, 0, 3, 0, 2], dtype=index_dtype, device=device)
    target_index = torch.tensor([1, 3, 3, 0, 2], dtype=index_dtype, device=device)
    return x, t, c, pred_index, target_index


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("backend,device", CASES)
def test_row_indices_read_the_rows_in_place(backend, device, index_dtype):
    """With pred_index / target_index the op equals the reference on gathered copies, and its gradient
    is the gathered gradient scattered back: zero in rows no mask reads, summed in a row read twice."""
    x, t, c, pi, ti = _rows_case(device, index_dtype)
    xr = x.detach().requires_grad_()
    losses = OP(xr, t, c, 2.0, pred_index=pi, target_index=ti, backend=backend)
    weights = [torch.tensor(v, device=device) for v in (0.7, 1.3)]
    (grad,) = torch.autograd.grad(losses, xr, weights)
    (mask_ref, dice_ref), grad_rows = _run("reference", x[pi.long()], t[ti.long()], c)
    assert_close(losses[0], mask_ref, what=f"{backend} loss_mask")
    assert_close(losses[1], dice_ref, what=f"{backend} loss_dice")
    expected = torch.zeros_like(x).index_add_(0, pi.long(), grad_rows)
    assert grad.shape == x.shape
    assert_close(grad, expected, what=f"{backend} d/d(pred_masks) by row", grad=True)
    assert torch.count_nonzero(grad[[1, 4, 5]]) == 0


@pytest.mark.parametrize("backend,device", CASES)
def test_row_index_out_of_range_is_not_read(backend, device):
    """The reference and the native backend raise an IndexError naming the index; Triton (whose
    indices nothing on the host reads) gives NaN losses and no gradient, never a read out of bounds."""
    x, t, c, pi, ti = _rows_case(device)
    bad = ti.clone()
    bad[2] = t.shape[0]
    if backend == "triton":
        xr = x.detach().requires_grad_()
        mask, dice = OP(xr, t, c, 2.0, pred_index=pi, target_index=bad, backend=backend)
        assert mask.isnan() and dice.isnan()
        return
    for b in ("reference", backend):
        with pytest.raises(IndexError, match="target_index" if b == "native" else "out of bounds"):
            OP(x, t, c, 2.0, pred_index=pi, target_index=bad, backend=b)


@pytest.mark.parametrize("backend,device", CASES)
def test_groups_sum_each_run_of_masks(backend, device):
    """groups=[2, 0, 3] gives [3] vectors: entry g is the loss of mask run g alone (the reference on
    that slice, 0 for the empty run), and the gradient of a weighted sum of the entries is the
    weighted sum of the runs' gradients."""
    x, t, c = _inputs(5, 6, 7, 18, 21, 40, device)
    groups, weights = [2, 0, 3], torch.tensor([0.7, 1.9, 1.3], device=device)
    xr = x.detach().requires_grad_()
    mask, dice = OP(xr, t, c, 2.0, groups=groups, backend=backend)
    assert mask.shape == dice.shape == (3,) and mask.dtype == dice.dtype == torch.float32
    (grad,) = torch.autograd.grad((mask * weights).sum() + (dice * weights.flip(0)).sum(), xr)
    expected_grad = torch.zeros_like(x)
    for g, (lo, hi) in enumerate([(0, 2), (2, 2), (2, 5)]):
        if lo == hi:
            assert mask[g] == 0 and dice[g] == 0
            continue
        xg = x[lo:hi].detach().requires_grad_()
        m_ref, d_ref = OP(xg, t[lo:hi], c[lo:hi], 2.0, backend="reference")
        assert_close(mask[g], m_ref, what=f"{backend} loss_mask of group {g}")
        assert_close(dice[g], d_ref, what=f"{backend} loss_dice of group {g}")
        (expected_grad[lo:hi],) = torch.autograd.grad(m_ref * weights[g] + d_ref * weights.flip(0)[g], xg)
    assert_close(grad, expected_grad, what=f"{backend} d/d(pred_masks) of grouped losses", grad=True)
    empty = OP(x[:0], t[:0], c[:0], 2.0, groups=[], backend=backend)
    assert empty[0].shape == empty[1].shape == (0,)


def _per_point_stats(x, t, c):
    """(sum BCE, sum s t, sum s, sum t) over the points, from grid_sample in float64."""
    grid = (2 * c.double() - 1)[:, :, None]
    xs = F.grid_sample(x[:, None].double(), grid, align_corners=False)[:, 0, :, 0]
    ts = F.grid_sample(t[:, None].double(), grid, align_corners=False)[:, 0, :, 0]
    s = xs.sigmoid()
    bce = F.binary_cross_entropy_with_logits(xs, ts, reduction="none")
    return torch.stack([bce.sum(1), (s * ts).sum(1), s.sum(1), ts.sum(1)], 1).float()


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernels_reduce_to_the_mask_loss_statistics(backend):
    """Per mask, the sums over the points of (BCE, s t, s, t): ops._mask_loss.losses_from_stats's
    contract with BCE in place of focal, checked column by column against float64 grid_sample."""
    x, t, c = _inputs(3, 5, 7, 17, 19, 45, "cpu", target_dtype=torch.float32)
    if backend == "native":
        got = torch.ops.fastmaskformer.point_mask_loss_forward(x, t, c)
    else:
        from fastmaskformer.kernels.point_mask_loss import stats

        got = stats(x, t, c)
    assert got.shape == (3, 4) and got.dtype == torch.float32
    assert_close(got, _per_point_stats(x, t, c), what=f"{backend} statistics")


def _bad_inputs(device):
    x, t, c = _inputs(2, 8, 8, 16, 16, 10, device)
    return [
        ("pred dtype", (x.to(torch.int32), t, c, 1.0), TypeError, "pred_masks"),
        ("target dtype", (x, t.to(torch.int64), c, 1.0), TypeError, "target_masks"),
        ("coords dtype", (x, t, c.to(torch.int64), 1.0), TypeError, "coords"),
        ("count", (x, t[:1], c, 1.0), ValueError, "target_masks"),
        ("coords shape", (x, t, torch.rand(2, 10, 3, device=device), 1.0), ValueError, "coords"),
        ("no points", (x, t, c[:, :0], 1.0), ValueError, "coords"),
        ("device mix", (x, t, torch.rand(2, 10, 2, device="meta"), 1.0), ValueError, "meta"),
        ("num_masks", (x, t, c, 0.0), ValueError, "num_masks"),
        ("num_masks shape", (x, t, c, torch.ones(2, device=device)), ValueError, "num_masks"),
        ("index dtype", (x, t, c, 1.0, torch.zeros(2, device=device)), TypeError, "pred_index"),
        ("index shape", (x, t, c, 1.0, None, torch.zeros(2, 1, dtype=torch.int64, device=device)), ValueError,
         "target_index"),
        ("index length", (x, t[:1], c, 1.0, None, torch.zeros(3, dtype=torch.int64, device=device)), ValueError,
         "target_index"),
        ("index device", (x, t, c, 1.0, torch.zeros(2, dtype=torch.int64, device="meta")), ValueError, "meta"),
        ("groups sum", (x, t, c, 1.0, None, None, [1, 2]), ValueError, r"groups: expected counts summing to the 2"),
        ("groups type", (x, t, c, 1.0, None, None, torch.tensor([2])), TypeError, "groups: expected a list or tuple"),
    ]


@pytest.mark.parametrize("case", range(15))
@pytest.mark.parametrize("backend,device", CASES)
def test_bad_input_raises_before_the_backend_runs(backend, device, case, monkeypatch):
    assert_rejected_before_backend(OP, backend, _bad_inputs(device)[case], monkeypatch)


@pytest.mark.skipif("native" not in BACKENDS, reason="fastmaskformer._C is not built")
@pytest.mark.parametrize("case,name", [("coords shape", "coords"), ("count", "target_masks"),
                                       ("grad_stats", "grad_stats"), ("index length", "pred_index"),
                                       ("index dtype", "target_index"), ("index range", "pred_index")])
def test_native_ops_check_their_arguments(case, name):
    """The C++ ops check what they read, when called directly (the op's check is bypassed)."""
    x, t, c = _inputs(2, 4, 4, 8, 8, 5, "cpu")
    C = torch.ops.fastmaskformer
    error = {"index dtype": TypeError, "index range": IndexError}.get(case, ValueError)
    with pytest.raises(error, match=name):
        if case == "coords shape":
            C.point_mask_loss_forward(x, t, c[..., :1])
        elif case == "count":
            C.point_mask_loss_forward(x, t[:1], c)
        elif case == "index length":
            C.point_mask_loss_forward(x, t, c, torch.zeros(3, dtype=torch.int64))
        elif case == "index dtype":
            C.point_mask_loss_forward(x, t, c, None, torch.zeros(2))
        elif case == "index range":
            C.point_mask_loss_backward(torch.ones(2, 4), x, t, c, torch.tensor([0, -1]))
        else:
            C.point_mask_loss_backward(torch.ones(2, 3), x, t, c)


@pytest.mark.skipif("native" not in BACKENDS, reason="fastmaskformer._C is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_native(dtype):
    """Schemas, fake kernels (torch.compile / export) and the registered autograd of both ops."""
    x, t, c = _inputs(3, 4, 5, 9, 7, 20, "cpu", dtype)
    C = torch.ops.fastmaskformer
    torch.library.opcheck(C.point_mask_loss_forward.default, (x.requires_grad_(), t, c))
    torch.library.opcheck(C.point_mask_loss_backward.default, (torch.randn(3, 4), x.detach(), t, c))
    rows = (torch.tensor([2, 0]), torch.tensor([1, 1]))  # two masks reading rows of each
    torch.library.opcheck(C.point_mask_loss_forward.default, (x, t, c[:2], *rows))
    torch.library.opcheck(C.point_mask_loss_backward.default, (torch.randn(2, 4), x.detach(), t, c[:2], *rows))
    if dtype == torch.float32:  # the gradient added into a float32 buffer
        torch.library.opcheck(C.point_mask_loss_backward_into.default,
                              (torch.randn(2, 4), x.detach(), t, c[:2], *rows, torch.zeros(x.shape)))


@pytest.mark.skipif("native" not in BACKENDS, reason="fastmaskformer._C is not built")
def test_native_compiles_fullgraph_with_autograd():
    x, t, c = _inputs(3, 5, 6, 17, 19, 30, "cpu")
    fn = OP.backends["native"].fn
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager, got = fn(xe, t, c, 2.0), compiled(xc, t, c, 2.0)
    for a, b in zip(got, eager):
        assert_close(a, b, what="compiled loss")
    (sum(got) * 1.0).backward()
    sum(eager).backward()
    assert_close(xc.grad, xe.grad, what="compiled d/d(pred_masks)", grad=True)


@pytest.mark.skipif("native" not in BACKENDS, reason="fastmaskformer._C is not built")
def test_auto_picks_native_on_cpu():
    assert OP.choose("auto", _inputs(1, 2, 2, 4, 4, 3, "cpu") + (1.0,), {}).name == "native"


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_never_allocates_per_point_tensors(device, monkeypatch):
    """Forward and backward launchers allocate nothing of N x P elements, not even bytes: only the
    per-block sums and the [N, h, w] fp32 gradient. The kernels (which allocate nothing) are not
    launched here, since the interpreter copies every argument, coords [N, P, 2] included."""
    from fastmaskformer.kernels import point_mask_loss as k

    launched = []

    class _Record:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kw: launched.append(self.kernel)

    monkeypatch.setattr(k, "wrap_triton", _Record)
    N, P = 2, 3000
    x, t, c = _inputs(N, 6, 6, 12, 12, P, device)
    with _Allocations() as seen:
        k._stats(x, t, c)
        k._stats_backward(torch.ones(N, 4, device=device), x, t, c)
    assert launched == [k._stats_kernel, k._grad_kernel]
    assert 0 < seen.largest < N * P


@pytest.mark.skipif("triton" not in BACKENDS, reason="the triton backend is not installed")
def test_triton_declines_what_it_cannot_run(monkeypatch):
    from fastmaskformer.ops.backends import triton as backend

    b = OP.backends["triton"]
    meta = (torch.zeros(1, 2, 2, device="meta"), torch.zeros(1, 4, 4, device="meta"), torch.zeros(1, 3, 2), 1.0)
    assert "cuda" in b.supports(*meta)
    monkeypatch.setattr(backend, "INTERPRET", False)
    cpu = _inputs(1, 2, 2, 4, 4, 3, "cpu") + (1.0,)
    assert "TRITON_INTERPRET" in b.supports(*cpu)
    assert OP.choose("auto", cpu, {}).name != "triton"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_auto_uses_triton_and_compiles(dtype):
    """At Mask2Former's sizes (128 -> 512, 12544 points, a few masks); torch.compile traces the
    kernels' ops, forward and backward, in one graph."""
    x, t, c = _inputs(6, 128, 128, 512, 512, 12544, "cuda", dtype)
    assert OP.choose("auto", (x, t, c, 6.0), {}).name == "triton"
    eager = _check("triton", x, t, c, dtype, num_masks=6.0)
    fused = torch.compile(OP.backends["triton"].fn, fullgraph=True)
    z = x.detach().requires_grad_()
    mask, dice = fused(z, t, c, 6.0)
    (grad,) = torch.autograd.grad(0.7 * mask + 1.3 * dice, z)
    assert_close(grad, eager, dtype, what="compiled d/d(pred_masks)", grad=True)
