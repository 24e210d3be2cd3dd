"""How runs end, through ``vmm run``'s exit status (vmm/outcome.py), with
the guest tests/guests/endings.c."""

from __future__ import annotations

import re
import time

import pytest

from tests.vmm.conftest import needs_kvm, vmm_run

pytestmark = needs_kvm


def run_mode(guest, mode: str, *extra: str, timeout: str = "20"):
    return vmm_run("--guest", str(guest("endings")), "--cmdline", f"mode={mode}", "--timeout", timeout, *extra)


@pytest.mark.parametrize("value", [0, 1, 0x21, 0x7F])
def test_test_exit_4_byte_write(guest, value):
    r = run_mode(guest, f"1 value={value:#x}")
    assert r.returncode == (value << 1) | 1, r.stderr


@pytest.mark.parametrize("value", [0, 5, 0x55])
def test_test_exit_1_byte_write(guest, value):
    r = run_mode(guest, f"9 value={value:#x}")
    assert r.returncode == (value << 1) | 1, r.stderr


def test_test_exit_status_keeps_the_low_8_bits(guest):
    r = run_mode(guest, "1 value=0x80")   # (0x80 << 1) | 1 = 0x101
    assert r.returncode == 0x01


def test_power_off_is_0(guest):
    r = run_mode(guest, "0")
    assert r.returncode == 0, r.stderr
    # nothing but the closing summary
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("vmm: power off"), r.stderr


def test_every_vcpu_parked_is_0(guest):
    r = run_mode(guest, "8", "--vcpus", "2")
    assert r.returncode == 0, r.stderr


def test_hlt_with_interrupts_off_is_0(guest):
    r = run_mode(guest, "7")
    assert r.returncode == 0, r.stderr


def test_triple_fault_is_4_with_a_report(guest):
    r = run_mode(guest, "2")
    assert r.returncode == 4, r.stderr
    assert "triple fault" in r.stderr
    assert "CPL 3" in r.stderr
    # ud2 is 0f 0b; rip translated through the guest's page tables
    assert re.search(r"bytes at rip \(linear 0x[0-9a-f]+ = physical 0x[0-9a-f]+\): 0f 0b", r.stderr), r.stderr


def test_emulation_failure_in_ring_0_is_6_with_a_report(guest):
    # cmpxchg16b: one of the instructions the ring-0 emulator lacks here
    # (DESIGN.md, "This machine's KVM").
    r = run_mode(guest, "4")
    assert r.returncode == 6, r.stderr
    assert "emulation failure" in r.stderr and "suberror 1" in r.stderr
    assert "CPL 0" in r.stderr
    assert re.search(r"rip 0x[0-9a-f]+", r.stderr)
    assert re.search(r"bytes at rip \(.*\): f0 48 0f c7", r.stderr), r.stderr


def test_emulation_failure_on_mmio_from_ring_3_is_6(guest):
    r = run_mode(guest, "6")
    assert r.returncode == 6, r.stderr
    assert "emulation failure" in r.stderr and "CPL 3" in r.stderr


def test_timeout_is_8(guest):
    t = time.monotonic()
    r = run_mode(guest, "3", timeout="1")
    assert r.returncode == 8, r.stderr
    assert "timeout" in r.stderr
    assert time.monotonic() - t < 10
