"""``python -m vmm.bench`` runs and prints its JSON (tiny sizes: a smoke
test, not a measurement)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

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
    # the same reads done in ring 0 (before the guest enters ring 3)
    assert report["rings"] == [3, 0] and report["ring0"]["guest_ring"] == 0
    for runner in ("bare_c", "inline", "inline_python", "isolated"):
        assert report["ring0"][runner]["pio_us"] > 0 and report["ring0"][runner]["mmio_us"] > 0
    assert report["isolated"]["handoff_per_access"]["device_served"] == 1.0
    assert report["hogs"] == 0 and report["move"] is False


def test_bench_under_a_hog_with_the_device_moving(tmp_path):
    """--hog runs busy loops alongside, --move reaches the device process:
    the report says both, and the device's counters carry its moves."""
    r = subprocess.run([sys.executable, "-m", "vmm.bench", "--iters", "200", "--rounds", "1", "--repeat", "1",
                        "--rings", "3", "--skip", "inline_python", "--skip", "inline", "--hog", "1", "--move",
                        "--cache", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["hogs"] == 1 and report["move"] is True
    assert report["isolated"]["handoff_per_access"]["device_served"] == 1.0
    assert "device_moves" in report["isolated"]["handoff_per_access"]


def test_exitcost_prints_json():
    r = subprocess.run([sys.executable, "-m", "vmm.bench.exitcost", "--loops", "200"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["vmm"]["isolated_forward_ns"] > 0 and report["vmm"]["inline_forward_ns"] > 0
    vmm = report["vmm"]
    assert vmm["inline_local_ns"] > vmm["inline_model_read_ns"] > 0     # the loop's own part on top
    assert isinstance(vmm["c_count_ns"], int)
    dev = report["device"]
    assert dev["state_store_ns"] > dev["snapshot_ns"] > 0     # the store takes the snapshot too
    assert dev["serve_python_ns"] == dev["request_ns"] + dev["model_read_ns"] + dev["state_store_ns"]


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


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU is not installed")
def test_footprint_prints_json():
    r = subprocess.run([sys.executable, "-m", "vmm.bench.footprint", "--loops", "1000000", "--repeat", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    for config in ("no_devices", "three_devices"):
        assert report[config]["splitvmm"]["seconds"] > 0 and report[config]["qemu"]["peak_pss_mib"] > 0
        assert report[config]["time_ratio"] > 0 and report[config]["memory_ratio"] > 0
    # the VMM and each device's processes (reapers, the device, its warm spare)
    assert report["three_devices"]["splitvmm"]["processes"] >= 4


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU is not installed")
def test_footprint_demo_counts_every_process_by_role():
    r = subprocess.run([sys.executable, "-m", "vmm.bench.footprint", "--demo", "--repeat", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    ours = report["splitvmm"]
    roles = ours["by_role"]
    # the VMM, the fork server, 4 devices (serial and the demo's three), 2 reapers each
    assert {k: v["count"] for k, v in roles.items()} == {"vmm": 1, "forkserver": 1, "device": 4, "reaper": 8}
    assert ours["processes"] == 14 and 0 < ours["guest_ram_pss"] < ours["pss"] < ours["rss"]
    assert abs(sum(v["pss"] for v in roles.values()) - ours["pss"]) < 0.5
    for name in ("qemu_q35_kvm", "qemu_microvm_pcie_kvm"):
        assert report[name]["processes"] == 1 and report[name]["rss"] > report[name]["guest_ram_pss"] > 0
        assert report["ratios"][f"splitvmm pss / {name} rss"] > 0
