"""benchmarks/report.py: ratios and memory fractions from a hand-written pytest-benchmark JSON."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import report  # noqa: E402


def bench(group, variant, median, peak=None, rounds=3):
    return {"name": f"test_x[{variant}]", "group": group, "params": {"variant": variant},
            "stats": {"median": median, "rounds": rounds}, "extra_info": {"peak_mb": peak, "device": "cpu"} if peak else {"device": "cpu"}}


def test_ratios_against_the_reference_row():
    data = {"benchmarks": [bench("loss N=8", "reference", 0.8, 400.0), bench("loss N=8", "native", 0.1, 20.0),
                           bench("lap", "reference", 4e-3), bench("lap", "scipy", 2e-3), bench("lap", "native", 5e-4)]}
    rows = [r for r in report.render(data).splitlines() if r.startswith("| loss") or r.startswith("| lap")]
    assert rows[0] == "| loss N=8 | reference | 800.00 ms | 3 | 1.00x | 400 | 100% | cpu |"
    assert rows[1] == "| loss N=8 | native | 100.00 ms | 3 | 8.00x | 20 | 5% | cpu |"
    # The plain scipy loop is the baseline where a group has one, even beside a "reference" row.
    assert rows[2] == "| lap | reference | 4.00 ms | 3 | 0.50x | - | - | cpu |"
    assert rows[4] == "| lap | native | 500.0 us | 3 | 4.00x | - | - | cpu |"


def test_group_without_baseline_has_no_ratio():
    rows = report.render({"benchmarks": [bench("g", "triton", 1.5)]}).splitlines()
    assert rows[-1] == "| g | triton | 1.50 s | 3 | - | - | - | cpu |"
