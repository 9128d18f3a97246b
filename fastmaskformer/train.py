"""Train MaskFormer:

    python -m fastmaskformer.train [--config FILE] [--fused] [--resume] [--debug] [section.field=value ...]
    torchrun --nproc-per-node 8 -m fastmaskformer.train --config configs/ade20k_r50.yaml

Without --config the CPU-sized synthetic recipe (configs/synthetic.yaml) runs. Errors in the input
print their message and exit with status 1 (2 for a bad config or argument); ``--debug`` or
FASTMASKFORMER_DEBUG=1 shows the traceback.
"""
from __future__ import annotations

from typing import List, Optional

from .config import argument_parser, config_from_args
from .engine import train
from .engine.cli import user_errors


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argument_parser()
    args = parser.parse_args(argv)
    cfg = config_from_args(parser, args)
    with user_errors(parser.prog, args.debug):
        return train(cfg)


if __name__ == "__main__":
    main()
