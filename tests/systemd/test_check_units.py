"""The unit checks of systemd/check_units.py (``make check-units``) pass on
the units as shipped and fail on what they are there to catch."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
CHECK = REPO / "systemd" / "check_units.py"
pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="systemd-analyze is not installed")


def check(units: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHECK), "--units", str(units)], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def units(tmp_path):
    copy = tmp_path / "systemd"
    shutil.copytree(REPO / "systemd", copy, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    return copy


def edit(path: pathlib.Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_shipped_units_pass():
    r = check(REPO / "systemd")
    assert r.returncode == 0, r.stdout + r.stderr
    exposure = float(r.stdout.split(" exposure ")[1].split()[0])
    assert exposure <= 1.0


def test_an_unknown_key_fails_though_verify_exits_0(units):
    edit(units / "splitvmm-device@.socket", "Accept=no\n", "Accept=no\nAcept=no\n")
    r = check(units)
    assert r.returncode == 1 and "Unknown key 'Acept'" in r.stderr, r.stdout + r.stderr


def test_a_bad_value_in_a_drop_in_fails(units):
    edit(units / "examples" / "splitvmm-vm@demo.service.d" / "devices.conf", "[Unit]\n", "[Unit]\nStartLimitBurst=many\n")
    r = check(units)
    assert r.returncode == 1 and "devices.conf:4: Failed to parse" in r.stderr, r.stdout + r.stderr


def test_weaker_hardening_fails_the_exposure_limit(units):
    edit(units / "splitvmm-device@.service", "DynamicUser=yes\n", "")
    edit(units / "splitvmm-device@.service", "PrivateUsers=yes\n", "")
    edit(units / "splitvmm-device@.service", "ProtectSystem=strict\n", "")
    edit(units / "splitvmm-device@.service", "CapabilityBoundingSet=\n", "")
    r = check(units)
    assert r.returncode == 1 and "exposure" in r.stderr, r.stdout + r.stderr


def test_an_exec_start_that_is_not_ours_fails(units):
    edit(units / "splitvmm-vm@.service", "/opt/splitvmm/bin/vmm run", "/usr/bin/qemu-system-x86_64")
    r = check(units)
    assert r.returncode == 1 and "console scripts" in r.stderr, r.stdout + r.stderr
