"""Forwarding in C (vmm/_vcpu.c): the exit loop serves an isolated device's
accesses through its slot without Python, counts them in the per-device
statistics, and hands a failed call back to the endpoint's restart rules
(guest: tests/guests/echo.c, every size through both windows, string I/O)."""

from __future__ import annotations

import os

from tests.vmm.conftest import needs_kvm
from tests.vmm.test_restart import run_echo_guest
from vmm.config import parse_device_spec
from vmm.machine import Machine
from vmm.outcome import Ending

pytestmark = needs_kvm

PIO, MMIO = 0x1000, 0xD000_0000
CMDLINE = f"pio={PIO:#x} mmio={MMIO:#x} free_pio=0x3000 free_mmio=0xd0100000"


def test_isolated_accesses_go_through_c_and_are_counted(guest):
    with Machine(memory=32 << 20, vcpus=1) as m:
        m.load_pvh(guest("echo"), f"{CMDLINE} vmm_pid={os.getpid()} pid=2")
        ep = m.add_device(parse_device_spec(f"echo,pio={PIO:#x},mmio={MMIO:#x},process=isolated"))
        outcome = m.run(timeout=60)
        assert outcome.ending is Ending.POWER_OFF, str(outcome)
        forwarded = m.vcpus[0].fast.ctx.forwarded
        # the first access of the device goes through Python (it installs
        # the forward), the rest in C
        assert forwarded > 10
        st = m.dispatcher.stats.device(ep.owner)
        calls = ep.call_stats().calls
        assert st.accesses == calls, (st, calls)
        assert sum(st.histogram) == st.accesses
        assert ep.c_forward.aseq >= calls


def test_forward_is_off_while_the_endpoint_cannot_take_accesses(guest):
    with Machine(memory=32 << 20, vcpus=1) as m:
        m.load_pvh(guest("echo"), f"{CMDLINE} vmm_pid={os.getpid()} pid=2")
        ep = m.add_device(parse_device_spec(f"echo,pio={PIO:#x},mmio={MMIO:#x},process=isolated"))
        f = ep.c_forward
        assert f.on == 1 and f.slots == ep._live[0].c_handle()
        ep._paused += 1
        assert f.on == 0
        ep._paused -= 1
        assert f.on == 1
    assert f.on == 0            # closed


def test_a_device_killed_under_c_forwarding_loses_no_access(guest):
    # restart_echo counts its accesses and checks every answer; the device
    # dies while the vCPU waits in C on its slot, so the failed call comes
    # back to Python (STEP_FORWARD_ERROR) and the restart rules complete it
    # exactly once (run_echo_guest checks the device's count is the guest's).
    m, ep, killer = run_echo_guest(guest, f"echo,id=e0,pio={PIO:#x},mmio={MMIO:#x},restart=on-failure,"
                                          "restart_burst=100", kills=5)
    assert ep.restarts == 5
    assert m.dispatcher.forward_errors >= 1
    assert m.vcpus[0].exits > 0 and m.vcpus[0].fast is not None and m.vcpus[0].fast.ctx.forwarded > 100
