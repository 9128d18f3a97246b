"""ops.ms_deform_attn: every fused backend that runs on this machine against the reference.

Output and all three gradients (value, sampling_locations, attention_weights) at odd level sizes,
one and four levels, many heads, odd head widths; points exactly on the borders, outside them and on
pixel centres; fp16/bf16 inputs; empty queries; strided views; bad input rejected before any backend
runs; the native ops under torch.library.opcheck and torch.compile. The Triton backend runs on CPU
tensors under the interpreter (conftest sets TRITON_INTERPRET=1), so shapes stay tiny.

Half-precision inputs are compared with the reference evaluated in fp32 on the same (rounded)
inputs: the fused backends compute in fp32 and round once, while the reference's own fp16 run
rounds every grid_sample product and sum.
"""
import pytest
import torch

from backend_checks import assert_rejected_before_backend
from conftest import DEVICES
from fastmaskformer import ops
from tolerances import assert_close

ops.load_backends()
OP = ops.ms_deform_attn
BACKENDS = [b for b in ("native", "triton") if b in OP.backends and OP.backends[b].available() is None]
C = torch.ops.fastmaskformer
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _levels(shapes, device="cpu"):
    ss = torch.tensor(shapes, dtype=torch.int64, device=device).reshape(-1, 2)
    starts = torch.cat([ss.new_zeros(1), (ss[:, 0] * ss[:, 1]).cumsum(0)[:-1]])
    return ss, starts


def _inputs(B, shapes, heads, dh, Lq, P, device="cpu", dtype=torch.float32, lo=-0.1, hi=1.1):
    """Random value and weights; locations uniform in [lo, hi] (beyond the borders by default)."""
    ss, starts = _levels(shapes, device)
    S, L = sum(h * w for h, w in shapes), len(shapes)
    value = torch.randn(B, S, heads, dh, device=device).to(dtype)
    loc = (lo + (hi - lo) * torch.rand(B, Lq, heads, L, P, 2, device=device)).to(dtype)
    weights = torch.rand(B, Lq, heads, L, P, device=device).to(dtype)
    return value, ss, starts, loc, weights


def _takes(backend, device):
    return OP.backends[backend].supports(*_inputs(1, [(2, 2)], 1, 2, 1, 1, device)) is None


CASES = [pytest.param(b, d, id=f"{b}-{d}") for b in BACKENDS for d in DEVICES if _takes(b, d)]


def _run(backend, args, grad_out=None, upcast=False):
    """Output and d(sum(out * grad_out)) / d(value, sampling_locations, attention_weights)."""
    value, ss, starts, loc, weights = args
    leaves = [t.detach().float() if upcast else t.detach() for t in (value, loc, weights)]
    leaves = [t.requires_grad_() for t in leaves]
    out = OP(leaves[0], ss, starts, leaves[1], leaves[2], backend=backend)
    if grad_out is None:  # rounded to the inputs' dtype, so an upcast reference sees the same values
        grad_out = torch.randn(out.shape, device=out.device).to(value.dtype)
    if out.numel() == 0:
        return out, [torch.zeros_like(t) for t in leaves], grad_out
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return out, grads, grad_out


def _check(backend, args):
    dtype = args[0].dtype
    out, grads, grad_out = _run(backend, args)
    out_ref, grads_ref, _ = _run("reference", args, grad_out, upcast=dtype != torch.float32)
    assert out.dtype == dtype and out.shape == out_ref.shape
    assert_close(out, out_ref, dtype, what=f"{backend} output")
    for name, g, g_ref, arg in zip(("value", "sampling_locations", "attention_weights"), grads, grads_ref,
                                   (args[0], args[3], args[4])):
        assert g.dtype == arg.dtype and g.shape == arg.shape, name
        assert_close(g, g_ref, dtype, what=f"{backend} d/d({name})", grad=True)
    return out, grads


# (B, level shapes, heads, dh, Lq, P): odd sizes, a 1-pixel level, vector-plus-tail head widths.
SHAPES = {
    "one-level": (2, [(5, 7)], 2, 12, 9, 3),
    "four-levels": (1, [(6, 9), (3, 5), (2, 3), (1, 1)], 3, 5, 7, 2),
    "many-heads": (1, [(4, 4), (2, 3)], 16, 4, 5, 2),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend,device", CASES)
def test_matches_reference(backend, device, shape, dtype):
    _check(backend, _inputs(*SHAPES[shape], device=device, dtype=dtype))


def _locations(shapes, B, Lq, heads, P, pick):
    """Locations [B, Lq, heads, L, P, 2] whose x and y per level are drawn by pick(size, n)."""
    loc = torch.empty(B, Lq, heads, len(shapes), P, 2)
    for level, (h, w) in enumerate(shapes):
        loc[..., level, :, 0] = pick(w, (B, Lq, heads, P))
        loc[..., level, :, 1] = pick(h, (B, Lq, heads, P))
    return loc


BORDER = torch.tensor([0.0, 1.0, -0.1, 1.1])


@pytest.mark.parametrize("where", ["borders", "pixel-centres"])
@pytest.mark.parametrize("backend,device", CASES)
def test_special_points(backend, device, where):
    """Every point exactly on a border or just outside ({0, 1, -0.1, 1.1}, mixed with centres), or
    exactly on a pixel centre ((i + 0.5) / size), where d out / d loc changes from one side to the
    other: both sides of the rule must match the reference's (fmf/ms_deform_attn.h)."""
    shapes, B, Lq, heads, P = [(5, 7), (3, 3), (1, 4), (8, 2)], 1, 6, 2, 4
    centre = lambda size, n: (torch.randint(0, size, n) + 0.5) / size  # noqa: E731
    if where == "borders":
        def pick(size, n):
            return torch.where(torch.rand(n) < 0.7, BORDER[torch.randint(0, 4, n)], centre(size, n))
    else:
        pick = centre
    value, ss, starts, _, weights = _inputs(B, shapes, heads, 9, Lq, P, device)
    _check(backend, (value, ss, starts, _locations(shapes, B, Lq, heads, P, pick).to(device), weights))


@pytest.mark.parametrize("backend,device", CASES)
def test_empty_queries(backend, device):
    args = _inputs(2, [(3, 4), (2, 2)], 2, 4, 0, 3, device)
    out, grads = _check(backend, args)
    assert out.shape == (2, 0, 8)
    value_grad = torch.autograd.grad(OP(args[0].requires_grad_(), *args[1:], backend=backend).sum(), args[0])[0]
    assert value_grad.shape == args[0].shape and not value_grad.any()


@pytest.mark.parametrize("backend,device", CASES)
def test_strided_inputs(backend, device):
    """A head-major value viewed as [B, S, heads, dh], a slice of a larger location tensor, weights
    transposed from another layout, and a strided output gradient, all read without copies."""
    B, shapes, heads, dh, Lq, P = 2, [(4, 5), (2, 3)], 3, 6, 7, 2
    ss, starts = _levels(shapes, device)
    S, L = 26, 2
    value = torch.randn(B, heads, S, dh, device=device).transpose(1, 2)
    loc = torch.rand(B, Lq, heads, L, P + 1, 3, device=device)[..., :P, 1:]
    weights = torch.rand(B, Lq, L, P, heads, device=device).permute(0, 1, 4, 2, 3)
    assert not (value.is_contiguous() or loc.is_contiguous() or weights.is_contiguous())
    args = (value, ss, starts, loc, weights)
    grad_out = torch.randn(B, heads * dh, Lq, device=device).transpose(1, 2)
    out, grads, _ = _run(backend, args, grad_out)
    out_ref, grads_ref, _ = _run("reference", args, grad_out)
    assert_close(out, out_ref, what=f"{backend} output")
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref, what=f"{backend} gradient", grad=True)


@pytest.mark.parametrize("backend,device", CASES)
def test_spatial_shapes_as_tuple(backend, device):
    """The (h, w) pairs as Python ints, as the model passes them, give the tensor's result."""
    value, ss, starts, loc, weights = _inputs(1, [(3, 5), (2, 2)], 2, 4, 5, 2, device)
    as_tensor = OP(value, ss, starts, loc, weights, backend=backend)
    as_tuple = OP(value, ((3, 5), (2, 2)), starts, loc, weights, backend=backend)
    torch.testing.assert_close(as_tuple, as_tensor, rtol=0, atol=0)


def _bad_inputs(device):
    value, ss, starts, loc, weights = _inputs(2, [(3, 4), (2, 2)], 2, 4, 5, 3, device)
    return [
        ("dtype mix", (value, ss, starts, loc.half(), weights), TypeError, "one dtype"),
        ("int value", (value.long(), ss, starts, loc, weights), TypeError, "value"),
        ("shapes dtype", (value, ss.int(), starts, loc, weights), TypeError, "spatial_shapes"),
        ("rows", (value[:, :-1], ss, starts, loc, weights), ValueError, "sum of h.w"),
        ("starts", (value, ss, starts + 1, loc, weights), ValueError, "level_start_index"),
        ("heads", (value, ss, starts, loc[:, :, :1], weights), ValueError, "sampling_locations"),
        ("weights", (value, ss, starts, loc, weights[..., :2]), ValueError, "attention_weights"),
        ("device mix", (value, ss, starts, loc.to("meta"), weights), ValueError, "meta"),
    ]


@pytest.mark.parametrize("case", range(8))
@pytest.mark.parametrize("backend,device", CASES)
def test_bad_input_raises_before_the_backend_runs(backend, device, case, monkeypatch):
    assert_rejected_before_backend(OP, backend, _bad_inputs(device)[case], monkeypatch)


# ---- the native ops themselves (fastmaskformer._C) ----

needs_native = pytest.mark.skipif("native" not in BACKENDS, reason="fastmaskformer._C is not built")


def _cpp_errors():
    value, ss, starts, loc, weights = _inputs(2, [(3, 4), (2, 2)], 2, 4, 5, 3)
    grad = torch.randn(2, 5, 8)
    f, b = C.ms_deform_attn_forward, C.ms_deform_attn_backward
    return [
        ("value rank", lambda: f(value[0], ss, starts, loc, weights), ValueError, "value: expected a 4-d"),
        ("dtype mix", lambda: f(value, ss, starts, loc.double(), weights), TypeError,
         "sampling_locations: expected the dtype"),
        ("value dtype", lambda: f(value.double(), ss, starts, loc.double(), weights.double()), TypeError,
         "value: expected dtype float32"),
        ("shapes dtype", lambda: f(value, ss.int(), starts, loc, weights), TypeError,
         "spatial_shapes: expected dtype int64"),
        ("empty level", lambda: f(value, torch.tensor([[3, 4], [0, 2]]), starts, loc, weights), ValueError,
         "H_l, W_l >= 1"),
        ("starts", lambda: f(value, ss, torch.tensor([0, 11]), loc, weights), ValueError, "level_start_index: level 1"),
        ("rows", lambda: f(value[:, 1:], ss, starts, loc, weights), ValueError, "value: expected 16 rows"),
        ("levels", lambda: f(value, ss, starts, loc[:, :, :, :1], weights), ValueError,
         "sampling_locations: expected shape"),
        ("weights", lambda: f(value, ss, starts, loc, weights[:, :1]), ValueError, "attention_weights: expected shape"),
        ("grad shape", lambda: b(grad[:, :4], value, ss, starts, loc, weights), ValueError,
         "grad_output: expected shape"),
    ]


@needs_native
@pytest.mark.parametrize("case", range(10))
def test_cpp_checks(case):
    """Called directly (bypassing the Python checks), the C++ ops raise clear errors themselves."""
    what, call, exc, text = _cpp_errors()[case]
    with pytest.raises(exc, match=text):
        call()


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_native(dtype):
    """Schemas, fake kernels (torch.compile / export) and the registered autograd of both ops."""
    value, ss, starts, loc, weights = _inputs(2, [(3, 4), (2, 2)], 2, 4, 5, 3, dtype=dtype)
    args = (value.requires_grad_(), ss, starts, loc.requires_grad_(), weights.requires_grad_())
    torch.library.opcheck(C.ms_deform_attn_forward.default, args)
    grad = torch.randn(2, 5, 8, dtype=dtype)
    torch.library.opcheck(C.ms_deform_attn_backward.default, (grad, *[a.detach() for a in args]))


@needs_native
def test_native_compiles_fullgraph_with_autograd():
    args = _inputs(1, [(4, 5), (2, 3)], 2, 4, 6, 2)
    fn = OP.backends["native"].fn
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    grad_out = torch.randn(1, 6, 8)
    leaves = [a.clone().requires_grad_() for a in (args[0], args[3], args[4])]
    out = compiled(leaves[0], args[1], args[2], leaves[1], leaves[2])
    out_ref, grads_ref, _ = _run("native", args, grad_out)
    torch.testing.assert_close(out, out_ref)
    for g, g_ref in zip(torch.autograd.grad(out, leaves, grad_out), grads_ref):
        torch.testing.assert_close(g, g_ref)


@needs_native
def test_native_backward_is_deterministic_across_thread_counts():
    """Each (image, head) task owns the rows it writes: bitwise the same on 1 or 2 threads."""
    args = _inputs(2, [(6, 7), (3, 4)], 4, 8, 40, 4, lo=0.2, hi=0.4)  # crowded: many points share rows
    grad = torch.randn(2, 40, 32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = C.ms_deform_attn_backward(grad, *args)
        torch.set_num_threads(2)
        two = C.ms_deform_attn_backward(grad, *args)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


@needs_native
def test_auto_picks_native_on_cpu():
    assert OP.choose("auto", _inputs(1, [(2, 2)], 1, 2, 1, 1), {}).name == "native"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_triton(dtype):
    """At a Mask2Former-like scale (3 levels, 8 heads, dh 32, 4 points, more query blocks than
    SMs), "auto" picks Triton, it matches the reference, and torch.compile traces it in one graph."""
    args = _inputs(2, [(32, 40), (16, 20), (8, 10)], 8, 32, 1000, 4, "cuda", dtype)
    assert OP.choose("auto", args, {}).name == "triton"
    _check("triton", args)
    out, grads, grad_out = _run("triton", args)
    compiled = torch.compile(OP.backends["triton"].fn, fullgraph=True)
    leaves = [a.detach().clone().requires_grad_() for a in (args[0], args[3], args[4])]
    out_c = compiled(leaves[0], args[1], args[2], leaves[1], leaves[2])
    assert_close(out_c, out, dtype, what="compiled output")
    for g_c, g in zip(torch.autograd.grad(out_c, leaves, grad_out.to(dtype)), grads):
        assert_close(g_c, g, dtype, what="compiled gradient", grad=True)
