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


# -- inline models: STEP_LOCAL ------------------------------------------------


def test_inline_accesses_are_local_steps_counted_in_c(guest):
    # The C loop hands an inline model's accesses out as STEP_LOCAL (the
    # vCPU loop calls the model, nothing else) and counts them itself: the
    # statistics still hold every access the model served, once.
    with Machine(memory=32 << 20, vcpus=1) as m:
        m.load_pvh(guest("echo"), f"{CMDLINE} vmm_pid={os.getpid()} pid=1")
        ep = m.add_device(parse_device_spec(f"echo,pio={PIO:#x},mmio={MMIO:#x},process=inline"))
        assert ep.c_forward.local == 1 and ep.c_forward.on == 1
        outcome = m.run(timeout=60)
        assert outcome.ending is Ending.POWER_OFF, str(outcome)
        local = m.vcpus[0].fast.ctx.local_served
        st = m.dispatcher.stats.device(ep.owner)
        assert local > 10
        assert st.accesses == ep.model.regs.count, (st, ep.model.regs.count)
        assert sum(ep.c_forward.cell[i] for i in range(6)) == local
        assert sum(st.histogram) == st.accesses and st.failures == 0 and st.total_ns > 0
        assert m.registry.check() == []


def test_an_inline_model_that_raises_fails_its_device_once(guest):
    with Machine(memory=32 << 20, vcpus=1) as m:
        m.load_pvh(guest("echo"), f"{CMDLINE} vmm_pid={os.getpid()} pid=1")
        ep = m.add_device(parse_device_spec(f"echo,pio={PIO:#x},mmio={MMIO:#x},process=inline"))
        real, calls = ep.model_read, [0]

        def read(*args):
            calls[0] += 1
            if calls[0] == 5:
                raise RuntimeError("the model broke")
            return real(*args)

        ep.model_read = read
        outcome = m.run(timeout=60)
        # the guest's own checks see all ones from then on and say so
        assert outcome.ending is not Ending.VMM_ERROR, str(outcome)
        assert calls[0] == 5
        why = m.device_failure(ep.owner)
        assert why is not None and "RuntimeError: the model broke" in why
        st = m.dispatcher.stats.device(ep.owner)
        assert st.failures == 1 and st.accesses == ep.model.regs.count + 1
        assert not any(r.owner == ep.owner for r in m.registry.regions())


def test_inline_forward_is_off_while_a_fault_is_served_on_its_access_path():
    # An armed access or process point is served by LocalEndpoint.access:
    # the forward goes off after the arm (the engine's on_change), so the
    # next access takes that path.
    from devices.echo import Echo
    from devices.faults.engine import FaultEngine
    from devices.faults.plan import loads_plan
    from vmm.config import _NullHost
    from vmm.local import LocalEndpoint

    points = Echo.all_fault_points()
    ep = LocalEndpoint(Echo(_NullHost(), pio="0x2000"), 16, "e")
    f = ep.c_forward
    assert f.local == 1 and f.on == 1
    engine = FaultEngine("e", (), points=points)
    ep.attach_faults(engine)
    assert f.on == 1
    for point, action in (("access", "ones"), ("process", "hang")):
        (fault,) = loads_plan(f'[[fault]]\nname = "{point}"\ndevice = "e"\npoint = "{point}"\nnth = 1000\n'
                              f'action = "{action}"\n', devices={"e": points}).for_device("e")
        engine.arm(fault)
        assert f.on == 0, point
        engine.disarm(point)
        assert f.on == 0, point       # the point keeps counting its events
        engine = FaultEngine("e", (), points=points)
        ep.attach_faults(engine)
        assert f.on == 1
    old = engine
    ep.attach_faults(FaultEngine("e", (), points=points))
    assert ep._sync_forward not in old.on_change
    ep.close()
    assert f.on == 0
