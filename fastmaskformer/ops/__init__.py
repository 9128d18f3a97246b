"""fastmaskformer.ops: one function per op, the only place that chooses a backend.

Each op is called as ``op(*args, backend="reference"|"auto"|<name>)``; see ``_dispatch``. The
model, matcher and criterion pass ``backend_for(fused)``.
"""
from ._dispatch import Op, backend_for, load_backends
from ._linear_sum_assignment import linear_sum_assignment
from ._mask_logits import mask_logits
from ._mask_loss import mask_loss
from ._matching_cost import matching_cost
from ._ms_deform_attn import ms_deform_attn
from ._point_mask_loss import point_mask_loss
from ._point_matching_cost import point_matching_cost
from ._point_uncertainty import point_uncertainty
from ._semantic_inference import semantic_inference

OPS = {op.name: op for op in (mask_logits, mask_loss, matching_cost, linear_sum_assignment, semantic_inference,
                              ms_deform_attn, point_matching_cost, point_mask_loss, point_uncertainty)}

# Every backend registers itself now, once, so that no call ever imports or locks (see _dispatch).
load_backends()


def explain(op: str, *args, backend: str = "auto", **kwargs) -> str:
    """Which backend ``op`` would run for these arguments, and why each other one would not."""
    return OPS[op].explain(*args, backend=backend, **kwargs)


def available_backends(op: str) -> list:
    return sorted(OPS[op].backends)


__all__ = ["OPS", "Op", "available_backends", "backend_for", "explain", "linear_sum_assignment", "mask_logits",
           "mask_loss", "matching_cost", "ms_deform_attn", "point_mask_loss", "point_matching_cost",
           "point_uncertainty", "semantic_inference"]
