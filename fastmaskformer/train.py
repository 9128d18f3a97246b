"""Train MaskFormer:

    python -m fastmaskformer.train [--config FILE] [--fused] [--resume] [section.field=value ...]
    torchrun --nproc-per-node 8 -m fastmaskformer.train --config configs/ade20k_r50.yaml

Without --config the CPU-sized synthetic recipe (configs/synthetic.yaml) runs.
"""
from __future__ import annotations

from typing import List, Optional

from .config import parse_args
from .engine import train


def main(argv: Optional[List[str]] = None) -> dict:
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
