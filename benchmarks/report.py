"""Turn pytest-benchmark JSON into a markdown table of ratios to the reference.

    pytest benchmarks/ --benchmark-only --benchmark-json=benchmarks/results/cpu.json
    python benchmarks/report.py benchmarks/results/cpu.json > benchmarks/results/cpu.md

Benchmarks are grouped by ``benchmark.group`` (one op at one shape); within a group each row is a
variant (``extra_info["variant"]``, else the ``variant``/``backend`` parameter, else the test name).
The baseline of a group is its ``scipy`` variant (the official code's plain loop, where a benchmark
has one), else ``reference`` or ``eager``; every row shows its median time over the rounds it ran
(their count in its own column), the speed-up over the baseline (baseline median / row median), and
its peak memory (``extra_info["peak_mb"]``) with the fraction of the baseline's.
"""
from __future__ import annotations

import argparse
import json
from collections import OrderedDict
from typing import Dict, List

BASELINES = ("scipy", "reference", "eager", "direct")


def variant_of(bench: Dict) -> str:
    extra, params = bench.get("extra_info") or {}, bench.get("params") or {}
    for v in (extra.get("variant"), params.get("variant"), params.get("backend")):
        if v:
            return str(v)
    return bench["name"]


def _fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def render(data: Dict) -> str:
    groups: "OrderedDict[str, List[Dict]]" = OrderedDict()
    for b in data["benchmarks"]:
        groups.setdefault(b.get("group") or b["name"].split("[")[0], []).append(b)
    info = data.get("machine_info", {})
    lines = [f"Machine: {info.get('cpu', {}).get('brand_raw', info.get('processor', '?'))}, "
             f"{data.get('datetime', '')}; device per row in the last column.", ""]
    lines += ["| group | variant | median | rounds | speed-up | peak MB | peak / baseline | device |",
              "|---|---|---:|---:|---:|---:|---:|---|"]
    for group, benches in groups.items():
        by_variant = {variant_of(b): b for b in benches}
        base = next((by_variant[v] for v in BASELINES if v in by_variant), None)
        for v, b in by_variant.items():
            med = b["stats"]["median"]
            extra = b.get("extra_info") or {}
            peak = extra.get("peak_mb")
            speed = f"{base['stats']['median'] / med:.2f}x" if base is not None else "-"
            base_peak = (base.get("extra_info") or {}).get("peak_mb") if base is not None else None
            frac = f"{peak / base_peak:.0%}" if peak is not None and base_peak else "-"
            lines.append(f"| {group} | {v} | {_fmt_time(med)} | {b['stats'].get('rounds', '?')} | {speed} | "
                         f"{'-' if peak is None else f'{peak:.0f}'} | {frac} | {extra.get('device', '?')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", help="a pytest-benchmark --benchmark-json file")
    p.add_argument("-o", "--output", help="write the markdown here instead of stdout")
    args = p.parse_args(argv)
    with open(args.json) as f:
        text = render(json.load(f))
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
