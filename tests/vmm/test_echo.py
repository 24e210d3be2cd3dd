"""The echo device on real KVM: every size through both windows, unclaimed
addresses, the pid register per placement (guest: tests/guests/echo.c)."""

from __future__ import annotations

import os

import pytest

from tests.vmm.conftest import needs_kvm, vmm_run
from vmm.config import parse_device_spec
from vmm.machine import Machine
from vmm.outcome import Ending

pytestmark = needs_kvm

PIO, MMIO = 0x1000, 0xD000_0000
CMDLINE = f"pio={PIO:#x} mmio={MMIO:#x} free_pio=0x3000 free_mmio=0xd0100000"


def run_echo(guest, placement: str, pid_mode: int, fast_path: bool = True):
    with Machine(memory=32 << 20, vcpus=1, fast_path=fast_path) as m:
        m.load_pvh(guest("echo"), f"{CMDLINE} vmm_pid={os.getpid()} pid={pid_mode}")
        m.add_device(parse_device_spec(f"echo,pio={PIO:#x},mmio={MMIO:#x},process={placement}"))
        outcome = m.run(timeout=30)
        assert m.registry.check() == []
    return outcome


@pytest.mark.parametrize("fast_path", [True, False], ids=["c-loop", "python-loop"])
def test_echo_inline_every_size_and_pid(guest, fast_path):
    # The guest checks sizes 1/2/4 on PIO and 1/2/4/8 on MMIO written through
    # one window and read through the other, all ones where nobody is, string
    # I/O, and (pid=1) that the device's pid is the VMM's.  Status 0 = all
    # passed; test_exit(n) names the first failed check.
    outcome = run_echo(guest, "inline", pid_mode=1, fast_path=fast_path)
    assert outcome.ending is Ending.POWER_OFF, str(outcome)


def test_echo_isolated_pid_differs(guest):
    outcome = run_echo(guest, "isolated", pid_mode=2)
    assert outcome.ending is Ending.POWER_OFF, str(outcome)


def test_echo_through_the_cli(guest):
    r = vmm_run("--guest", str(guest("echo")), "--cmdline", CMDLINE,
                "--device", f"echo,id=e1,pio={PIO:#x},mmio={MMIO:#x},process=inline")
    assert r.returncode == 0, r.stderr


def test_wrong_window_is_seen_by_the_guest(guest):
    # The guest's own checks must be able to fail: with the device elsewhere
    # the first MMIO check (2) reads all ones instead of 0.
    r = vmm_run("--guest", str(guest("echo")), "--cmdline", CMDLINE,
                "--device", f"echo,pio={PIO:#x},mmio=0xd0002000,process=inline")
    assert r.returncode == (2 << 1) | 1, r.stderr


def test_unclaimed_without_any_device(guest):
    # Nothing claims the echo addresses: check 1 (PIO scratch reads 0) fails
    # because the read returns all ones.
    r = vmm_run("--guest", str(guest("echo")), "--cmdline", CMDLINE)
    assert r.returncode == (1 << 1) | 1, r.stderr
