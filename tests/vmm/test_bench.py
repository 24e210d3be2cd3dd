"""``python -m vmm.bench`` runs and prints its JSON (tiny sizes: a smoke
test, not a measurement)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.vmm.conftest import needs_kvm

pytestmark = needs_kvm


def test_bench_prints_json(tmp_path):
    r = subprocess.run([sys.executable, "-m", "vmm.bench", "--iters", "200", "--rounds", "1", "--repeat", "1",
                        "--cache", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    for runner in ("bare_c", "inline", "inline_python", "isolated"):
        assert report[runner]["pio_us"] > 0 and report[runner]["mmio_us"] > 0
    assert "pio_ratio" in report["inline"] and "pio_ratio" in report["isolated"]


def test_coalesce_bench_prints_json(tmp_path):
    r = subprocess.run([sys.executable, "-m", "vmm.bench.coalesce", "--iters", "500", "--rounds", "1",
                        "--repeat", "1", "--cache", str(tmp_path)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["guest_ring"] == 3 and report["loadavg_before"]
    for runner in ("inline", "inline_python", "isolated"):
        assert report[runner]["coalesced_us"] > 0 and report[runner]["plain_us"] > 0
        assert report[runner]["coalesced_writes_delivered"] > 0
    for runner in ("inline", "isolated"):
        assert report[runner]["exits_per_coalesced_write"] < 0.1
        assert report[runner]["exits_per_plain_write"] >= 1
