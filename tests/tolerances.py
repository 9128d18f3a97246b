"""The one table of tolerances for comparing a backend with the reference, per input dtype.

Fused backends accumulate in fp32 like the reference; low-precision inputs only change where the
inputs were rounded, so half-precision tolerances are looser on values and much looser on
gradients (which are returned in the input dtype).
"""
import torch

TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-9),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}
GRAD_TOL = {
    torch.float64: dict(rtol=1e-8, atol=1e-9),
    torch.float32: dict(rtol=1e-3, atol=1e-5),
    torch.float16: dict(rtol=1e-2, atol=1e-3),
    torch.bfloat16: dict(rtol=5e-2, atol=1e-2),
}


# fp32 under torch.set_float32_matmul_precision("high"/"medium"): matmuls, ours and cuBLAS's, round
# their inputs to TF32 (10-bit mantissa), so fp32 comparisons get about bf16's 8-bit margin.
TF32 = dict(rtol=5e-3, atol=5e-3)
GRAD_TF32 = dict(rtol=1e-2, atol=2e-3)


def assert_close(actual, expected, dtype=torch.float32, what="value", grad=False):
    """torch.testing.assert_close with the table's tolerance for ``dtype`` and a message naming ``what``."""
    tol = (GRAD_TOL if grad else TOL)[dtype]
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        tol = GRAD_TF32 if grad else TF32
    torch.testing.assert_close(actual.float() if actual.is_floating_point() else actual,
                               expected.float() if expected.is_floating_point() else expected,
                               msg=lambda m: f"{what} ({dtype}, {'grad' if grad else 'value'}): {m}", **tol)
