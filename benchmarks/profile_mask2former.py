"""Where one Mask2Former R50 training step spends its time and memory (B=2, crop 512, K=150, 10
targets per image), reference or fused path, as a markdown table.

    python benchmarks/profile_mask2former.py [--fused] [--batch 2] [-o benchmarks/results/mask2former_profile_cpu.md]

The whole step is timed first (forward, matcher, criterion, backward). Then each part runs alone on
the inputs it saw in that step, forward and backward (the matcher has no backward): the backbone,
the deformable-attention pixel decoder (and, inside it, the ms_deform_attn calls alone), the
masked-attention decoder, the prediction heads, the matcher and the criterion's losses. Each part's
share is its time over the step's; the parts add up to about the step (the rest is glue). Peak MB is
the peak memory above the inputs while the part runs alone (benchmarks/memory.py). Times are the
median of ``--rounds`` runs after a warm-up.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory import peak_extra_mb  # noqa: E402

from fastmaskformer import Mask2Former, ops  # noqa: E402

K, CROP, TARGETS = 150, 512, 10


def timed(fn, rounds):
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), peak_extra_mb(fn)


def backward_of(outputs):
    """Backward from a scalar that touches every floating output (a stand-in for the loss)."""
    leaves = [o for o in outputs if isinstance(o, torch.Tensor) and o.requires_grad]
    sum(o.float().sum() for o in leaves).backward()


def detached(x):
    if isinstance(x, torch.Tensor):
        return x.detach().requires_grad_(x.is_floating_point())
    if isinstance(x, dict):
        return {k: detached(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(detached(v) for v in x)
    return x


def flat(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for v in x.values() for t in flat(v)]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in flat(v)]
    return []


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fused", action="store_true")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("-o", "--output")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = Mask2Former(K, backbone="resnet50", fused=args.fused).train()
    backend = ops.backend_for(args.fused)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, 3, CROP, CROP, generator=g)
    targets = [{"labels": torch.randint(0, K, (TARGETS,), generator=g),
                "masks": torch.rand(TARGETS, CROP, CROP, generator=g) > 0.5} for _ in range(args.batch)]

    # The inputs each part sees, recorded during one forward.
    seen = {}
    msda_calls = []
    real_msda = ops.ms_deform_attn

    class Recorder:
        def __call__(self, *a, **k):
            msda_calls.append((detached(a), k))
            return real_msda(*a, **k)

        def __getattr__(self, name):
            return getattr(real_msda, name)

    ops.ms_deform_attn = Recorder()
    try:
        x = model._normalize(images)
        seen["features"] = model.backbone(x)
        mask_features, multi_scale = model.pixel_decoder(seen["features"], backend=backend)
        seen["pixel"] = (mask_features, multi_scale)
        seen["hs"] = model.transformer_decoder(multi_scale, mask_features, model.head.mask_embed, backend=backend)
        outputs = model.head(seen["hs"], mask_features, backend=backend)
    finally:
        ops.ms_deform_attn = real_msda
    layers = [{k: v for k, v in outputs.items() if k != "aux_outputs"}] + outputs["aux_outputs"]
    layers = detached(layers)
    indices = model.matcher.match_layers(layers, targets)

    def step():
        loss = sum(model.loss(model(images), targets).values())
        loss.backward()
        model.zero_grad(set_to_none=True)

    def backbone():
        backward_of(model.backbone(x).values())

    feats = detached(seen["features"])

    def pixel_decoder():
        backward_of(flat(model.pixel_decoder(feats, backend=backend)))

    def msda():
        outs = [real_msda(*a, backend=backend, **{k: v for k, v in kw.items() if k != "backend"})
                for a, kw in msda_calls]
        backward_of(outs)

    pix = detached(seen["pixel"])

    def decoder():
        backward_of([model.transformer_decoder(pix[1], pix[0], model.head.mask_embed, backend=backend)])

    hs, mf = detached(seen["hs"]), detached(mask_features)

    def heads():
        backward_of(flat(model.head(hs, mf, backend=backend)))

    def matcher():
        model.matcher.match_layers(layers, targets)

    def criterion():
        backward_of(list(model.criterion.losses_from_matches(layers, targets, indices).values()))

    rows = [("training step", step)]
    rows += [("backbone (ResNet-50)", backbone), ("pixel decoder (6 MSDeformAttn layers + FPN)", pixel_decoder),
             (f"  of which ms_deform_attn ({len(msda_calls)} calls)", msda),
             ("masked-attention decoder (9 layers)", decoder), ("prediction heads (10 x class + mask logits)", heads),
             ("matcher (10 predictions, no grad)", matcher), ("criterion losses (10 predictions)", criterion)]
    results = [(name, *timed(fn, args.rounds)) for name, fn in rows]
    total = results[0][1]
    lines = [f"# Mask2Former R50 training step on the CPU: where the time and memory go "
             f"({'fused=True' if args.fused else 'reference'})",
             "",
             f"B={args.batch}, crop {CROP}, K={K}, {TARGETS} targets per image, Q=100, 12544 points; torch "
             f"{torch.__version__}, {torch.get_num_threads()} threads; median of {args.rounds} runs after a warm-up. "
             "Parts run alone, forward and backward, on the inputs they saw in the step.",
             "",
             "| part | time | share of the step | peak MB |",
             "|---|---:|---:|---:|"]
    for name, t, mb in results:
        lines.append(f"| {name} | {t:.2f} s | {t / total:.0%} | {mb:.0f} |")
    text = "\n".join(lines) + "\n"
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
