"""``python -m vmm.bench.report`` (make bench): one folder with every
benchmark's JSON, the markdown table of same-run ratios and the plots
(tiny sizes, the benchmarks that need no KVM: a smoke test)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

from vmm.bench.report import ratios


def test_ratios_are_the_keys_that_name_one():
    got = ratios({"iterations": 3, "a": {"pio_ratio": 1.2}, "ratios": {"x/y seq1m": 0.9},
                  "targets": {"lookup_ratio": 1.5}, "store_share": 0.3, "flag_ratio": True, "n": [1, 2]})
    assert got == [("a.pio_ratio", 1.2), ("ratios.x/y seq1m", 0.9), ("store_share", 0.3)]


def test_report_folder(tmp_path):
    out = tmp_path / "report"
    r = subprocess.run([sys.executable, "-m", "vmm.bench.report", "--quick", "--out", str(out), "--only", "registry",
                        "--only", "fault_points", "--only", "state_store"], capture_output=True, text=True,
                       timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    # progress on the terminal, one line as each starts and ends
    assert "bench: [1/3] registry: region registry" in r.stderr and "bench: [3/3] state_store: done in" in r.stderr
    results = json.loads((out / "results.json").read_text())["benchmarks"]
    assert results["registry"]["result"]["c_pair_ns"] > 0
    assert results["fault_points"]["status"] == 0
    md = (out / "report.md").read_text()
    assert "| registry | `lookup_ratio_4096_over_8` |" in md and "| state_store | `store_share` |" in md
    assert "`targets." not in md
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "registry.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "no plots" not in r.stderr
    else:
        assert "no plots (matplotlib missing" in r.stderr
