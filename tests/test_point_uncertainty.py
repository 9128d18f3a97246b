"""ops.point_uncertainty: every fused backend that runs on this machine against the reference and
against a float64 bilinear read written here.

-|x| at odd sizes, with points on the borders, outside [0, 1], on pixel centres and edges, fp32/fp16/
bf16 logits, half coordinates, row indices (int64, int32, a row read twice), strided views, empty
inputs; a row out of range; bad input rejected before any backend runs; opcheck and a fullgraph
compile of the native op. The Triton backend runs on CPU tensors under the interpreter (conftest
sets TRITON_INTERPRET=1), so shapes stay small.
"""
import pytest
import torch

import independent_points as ind
from backend_checks import assert_rejected_before_backend
from conftest import DEVICES
from fastmaskformer import ops
from test_point_mask_loss import _coords, _logits
from tolerances import assert_close

ops.load_backends()
OP = ops.point_uncertainty
BACKENDS = [b for b in ("triton", "native") if b in OP.backends and OP.backends[b].available() is None]


def _takes(backend: str, device: str) -> bool:
    return OP.backends[backend].supports(torch.zeros(1, 2, 2, device=device), torch.zeros(1, 3, 2, device=device)) is None


CASES = [pytest.param(b, d, id=f"{b}-{d}") for b in BACKENDS for d in DEVICES if _takes(b, d)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (M, N, h, w, S): odd sizes, one pixel high, one point, many points (several blocks per mask).
SHAPES = [(3, 3, 5, 7, 50), (2, 2, 1, 3, 33), (1, 1, 12, 12, 1), (4, 4, 7, 3, 2500)]


def _independent(logits, coords, index=None):
    """-|x| from a float64 bilinear read (independent_points) of each row at each point."""
    x = logits.double().cpu().numpy()
    c = coords.double().cpu().numpy()
    rows = range(len(c)) if index is None else index.tolist()
    return torch.tensor([[-abs(ind.bilinear_sample(x[r], *p)) for p in pts] for r, pts in zip(rows, c)],
                        dtype=torch.float32).reshape(coords.shape[:2])


def _check(backend, logits, coords, index=None, dtype=torch.float32):
    got = OP(logits, coords, index, backend=backend)
    ref = OP(logits, coords, index, backend="reference")
    assert got.dtype == torch.float32 and got.shape == coords.shape[:2]
    assert_close(got, ref, dtype, what=f"{backend} point_uncertainty")
    return got


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend,device", CASES)
def test_matches_reference(backend, device, shape, dtype):
    M, N, h, w, S = shape
    x, c = _logits(M, h, w, device, dtype), _coords(N, S, h, w, h, w, device)
    _check(backend, x, c, dtype=dtype)


def test_reference_matches_a_float64_bilinear_read():
    x, c = _logits(3, 5, 7, "cpu"), _coords(3, 40, 5, 7, 5, 7, "cpu")
    index = torch.tensor([2, 2, 0])
    assert_close(OP(x, c, index), _independent(x, c, index), what="reference point_uncertainty")


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("backend,device", CASES)
def test_rows_read_in_place(backend, device, index_dtype):
    """Row index[n] of [M, h, w] logits, one row twice: the same as the reference on a gathered copy,
    and as the float64 read."""
    x, c = _logits(6, 5, 6, device), _coords(4, 45, 5, 6, 5, 6, device)
    index = torch.tensor([5, 0, 5, 2], dtype=index_dtype, device=device)
    got = _check(backend, x, c, index)
    assert_close(got, OP(x[index.long()], c), what="in place vs gathered")
    assert_close(got.cpu(), _independent(x, c, index), what=f"{backend} vs float64")


@pytest.mark.parametrize("backend,device", CASES)
def test_points_far_outside_read_zero(backend, device):
    x = _logits(2, 3, 4, device)
    c = torch.tensor([[-0.5, 0.5], [1.6, 0.2], [0.3, -3.0], [0.4, 9.0]], device=device).expand(2, 4, 2)
    assert torch.equal(OP(x, c, backend=backend), torch.zeros(2, 4, device=device))


@pytest.mark.parametrize("backend,device", CASES)
def test_strided_inputs_and_half_coords(backend, device):
    x = _logits(3, 7, 5, device).transpose(1, 2)
    c = torch.rand(3, 40, 3, device=device)[..., 1:]
    assert not x.is_contiguous() and not c.is_contiguous()
    _check(backend, x, c)
    _check(backend, x, c.to(torch.bfloat16))


@pytest.mark.parametrize("device", [c.values[1] for c in CASES if c.values[0] == "native"])
def test_native_vector_gathers_equal_the_scalar_reads(device):
    """fp32 logits with unit column stride take the vector-gather path (on a CPU with AVX2), the
    same values with a column stride of 2 the scalar one: the same bits, at S not a multiple of 8."""
    x, c = _logits(3, 9, 11, device), _coords(3, 203, 9, 11, 9, 11, device)
    wide = torch.zeros(3, 9, 22, device=device)
    wide[..., ::2] = x
    index = torch.tensor([2, 0, 2], device=device)
    assert torch.equal(OP(x, c, index, backend="native"), OP(wide[..., ::2], c, index, backend="native"))


@pytest.mark.parametrize("backend,device", CASES)
def test_empty(backend, device):
    x = _logits(4, 5, 6, device)
    assert OP(x[:0], torch.rand(0, 7, 2, device=device), backend=backend).shape == (0, 7)
    assert OP(x, torch.rand(2, 0, 2, device=device), torch.tensor([1, 3], device=device),
              backend=backend).shape == (2, 0)


@pytest.mark.parametrize("backend,device", CASES)
def test_row_out_of_range(backend, device):
    """The reference and the native backend raise an IndexError; Triton (whose indices nothing on the
    host reads) returns NaN for that mask only, never a read out of bounds."""
    x, c = _logits(3, 4, 5, device), _coords(2, 20, 4, 5, 4, 5, device)
    index = torch.tensor([1, 3], device=device)
    if backend == "triton":
        got = OP(x, c, index, backend=backend)
        assert got[1].isnan().all()
        assert_close(got[0], OP(x[1:2], c[:1])[0], what="the row in range")
        return
    for b in ("reference", backend):
        with pytest.raises(IndexError, match="index" if b == "native" else "out of bounds"):
            OP(x, c, index, backend=b)


def _bad_inputs(device):
    x, c = _logits(2, 5, 6, device), torch.rand(2, 9, 2, device=device)
    return [
        ("logits dtype", (x.to(torch.int32), c), TypeError, "logits"),
        ("coords dtype", (x, c.to(torch.int64)), TypeError, "coords"),
        ("coords shape", (x, torch.rand(2, 9, 3, device=device)), ValueError, "coords"),
        ("count", (x[:1], c), ValueError, "logits"),
        ("index dtype", (x, c, torch.zeros(2, device=device)), TypeError, "index"),
        ("index length", (x, c, torch.zeros(3, dtype=torch.int64, device=device)), ValueError, "index"),
        ("device mix", (x, torch.rand(2, 9, 2, device="meta")), ValueError, "meta"),
        ("empty map", (x[:, :0], c), ValueError, "logits"),
    ]


@pytest.mark.parametrize("case", range(8))
@pytest.mark.parametrize("backend,device", CASES)
def test_bad_input_raises_before_the_backend_runs(backend, device, case, monkeypatch):
    assert_rejected_before_backend(OP, backend, _bad_inputs(device)[case], monkeypatch)


@pytest.mark.parametrize("case", ["coords shape", "count", "index length", "index range"])
def test_native_op_checks_its_arguments(case):
    """The C++ op checks what it reads when called directly (the op's check is bypassed)."""
    x, c = _logits(2, 4, 4, "cpu"), torch.rand(2, 5, 2)
    C = torch.ops.fastmaskformer
    error, name, args = {"coords shape": (ValueError, "coords", (x, c[..., :1])),
                         "count": (ValueError, "logits", (x[:1], c)),
                         "index length": (ValueError, "index", (x, c, torch.zeros(3, dtype=torch.int64))),
                         "index range": (IndexError, "index", (x, c, torch.tensor([0, 2])))}[case]
    with pytest.raises(error, match=name):
        C.point_uncertainty(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_native(dtype):
    x, c = _logits(4, 5, 6, "cpu", dtype), torch.rand(3, 20, 2)
    torch.library.opcheck(torch.ops.fastmaskformer.point_uncertainty.default, (x[:3], c))
    torch.library.opcheck(torch.ops.fastmaskformer.point_uncertainty.default, (x, c, torch.tensor([3, 0, 3])))


def test_native_compiles_fullgraph():
    x, c, index = _logits(4, 5, 6, "cpu"), torch.rand(3, 30, 2), torch.tensor([1, 3, 1])
    fn = OP.backends["native"].fn
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, c, index)
    assert torch.equal(got, fn(x, c, index))


def test_auto_picks_native_on_cpu():
    """make test builds fastmaskformer._C: the native tests above fail, not skip, without it."""
    assert "native" in BACKENDS, OP.backends["native"].available()
    assert OP.choose("auto", (torch.zeros(1, 2, 2), torch.zeros(1, 3, 2)), {}).name == "native"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_auto_uses_triton_and_compiles(dtype):
    """At Mask2Former's sizes (128 x 128 logits, 37632 candidates, matched rows of a layer)."""
    x, c = _logits(800, 128, 128, "cuda", dtype), torch.rand(80, 37632, 2, device="cuda")
    index = torch.randint(0, 800, (80,), device="cuda")
    assert OP.choose("auto", (x, c, index), {}).name == "triton"
    eager = _check("triton", x, c, index, dtype)
    compiled = torch.compile(OP.backends["triton"].fn, fullgraph=True)
    assert torch.equal(compiled(x, c, index), eager)
