"""``python -m vmm.bench.report`` (make bench): one folder with each
benchmark's JSON, report.md with the headline figures and same-run ratios,
run.json, and PNG plots when matplotlib (the ``bench`` extra) is there --
a smoke run of the benchmarks that need no KVM, at their quick sizes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys


def test_report_folder(tmp_path):
    out = tmp_path / "report"
    r = subprocess.run([sys.executable, "-m", "vmm.bench.report", "--quick", "--out", str(out),
                        "--only", "registry", "--only", "faults", "--only", "state_segment"],
                       capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    for name in ("registry", "faults", "state_segment"):
        assert name in r.stderr                      # progress on the terminal
        assert json.loads((out / f"{name}.json").read_text())
    assert json.loads((out / "registry.json").read_text())["c_pair_ns"] > 0
    run = json.loads((out / "run.json").read_text())
    assert run
    md = (out / "report.md").read_text()
    assert "get+put from C" in md and "registry" in md
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "registry.png").stat().st_size > 0
