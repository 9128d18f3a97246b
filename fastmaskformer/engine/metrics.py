"""Training metrics: JSON lines (``metrics.jsonl``, one object per log step or evaluation) and,
optionally, TensorBoard scalars. Only the main process writes."""
from __future__ import annotations

import json
import math
import os
from typing import Dict, Optional


def check_tensorboard() -> None:
    """Fail before training starts, not at the first log step, when TensorBoard is asked for but absent."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise RuntimeError("train.tensorboard=true needs the tensorboard package (pip install tensorboard)") from None


class MetricsWriter:
    def __init__(self, output_dir: str, enabled: bool = True, tensorboard: bool = False):
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._tb = None
        if enabled and tensorboard:
            check_tensorboard()
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def write(self, iteration: int, scalars: Dict[str, float], prefix: str = "") -> None:
        """Append ``{"iter": iteration, prefix + name: value, ...}`` (NaN written as null)."""
        if not self.enabled:
            return
        row = {"iter": iteration}
        row.update({prefix + k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in scalars.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "iter" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, iteration)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str, key: Optional[str] = None) -> list:
    """The rows of a metrics.jsonl file (only those having ``key``, when given)."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if key is None or key in r]
