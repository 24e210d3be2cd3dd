"""Interrupts end to end on real KVM (guest: tests/guests/interrupts.c).

An ``irq-echo`` device (tests.testkinds, named ``MODULE:CLASS``) raises MSIs (routes it asks
the VMM for from inside its own access handler, as an MSI-X table write
does) and an ISA IRQ through the IOAPIC, placed in a device process and
inline; the guest's ring-0 handler counts each vector per vCPU, with a
second vCPU as the destination of APIC id 1.  Bad requests (a pin out of
range, an address outside the MSI window, too many routes) are refused
and the device goes on.
"""

from __future__ import annotations

import logging

import pytest

from ipc import Bus
from tests.testkinds import IRQ_ECHO
from tests.vmm.conftest import needs_kvm
from vmm.config import DeviceSpec
from vmm.machine import Machine
from vmm.outcome import Ending

pytestmark = needs_kvm

DEV = 0x2800
RUN_TIMEOUT = 30


def run(guest, placement: str, vcpus: int):
    with Machine(memory=32 << 20, vcpus=vcpus) as m:
        m.load_pvh(guest("interrupts"), f"dev={DEV:#x} cpus={vcpus} pin=4")
        ep = m.add_device(DeviceSpec(IRQ_ECHO, "irq0", placement, (("pio", hex(DEV)),)))
        outcome = m.run(timeout=RUN_TIMEOUT)
        assert getattr(ep, "failed", None) is None
        routes = m.irq.msi_routes()
        assert m.registry.check() == []
    return outcome, routes


@pytest.mark.parametrize("vcpus", [1, 2])
def test_isolated_device_interrupts(guest, vcpus, caplog):
    caplog.set_level(logging.WARNING, logger="vmm.remote")
    outcome, routes = run(guest, "isolated", vcpus)
    assert outcome.ending is Ending.POWER_OFF, str(outcome)
    # the guest dropped the extra routes it made; 0 (and 1) remain
    assert len(routes) == vcpus
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert any("pin 24" in m for m in refused), refused
    assert any("0xFEExxxxx" in m for m in refused), refused
    assert any("64 MSI routes" in m for m in refused), refused


@pytest.mark.parametrize("vcpus", [1, 2])
def test_inline_device_interrupts(guest, vcpus):
    outcome, routes = run(guest, "inline", vcpus)
    assert outcome.ending is Ending.POWER_OFF, str(outcome)
    assert len(routes) == vcpus


@pytest.mark.parametrize("placement", ["isolated", "inline"])
def test_line_asked_for_in_start_and_again_after_a_reset(guest, placement):
    # A model that asks for its line in start() (during the device
    # process's handshake), then a reset (the new model asks on the
    # device's control thread); everything still works afterwards.
    with Machine(memory=32 << 20, vcpus=1) as m:
        m.load_pvh(guest("interrupts"), f"dev={DEV:#x} cpus=1 pin=4")
        params = (("pio", hex(DEV)), ("pin", "5"))
        ep = m.add_device(DeviceSpec(IRQ_ECHO, "irq0", placement, params))
        assert list(ep.irqs.pins) == [5]
        if placement == "isolated":
            ep.reset()
            assert list(ep.irqs.pins) == [5] and ep.failed is None
        outcome = m.run(timeout=RUN_TIMEOUT)
        assert outcome.ending is Ending.POWER_OFF, str(outcome)
        assert getattr(ep, "failed", None) is None


def test_signal_msi_from_the_vmm(guest):
    # KVM_SIGNAL_MSI with no route: held back by the TPR, taken after
    # irq_enable(), a C handler in ring 0 sees its vector.
    with Machine(memory=32 << 20, vcpus=1) as m:
        m.load_pvh(guest("signal_msi"))
        delivered = []

        def ask(vcpu: int, offset: int, size: int, value: int) -> None:
            delivered.append(m.vm.signal_msi(0xFEE0_0000, 0x40 if value == 1 else 0x41))

        m.add_handler(Bus.PIO, 0x500, 1, write=ask)
        outcome = m.run(timeout=RUN_TIMEOUT)
    assert outcome.ending is Ending.POWER_OFF, str(outcome)
    assert len(delivered) == 3 and all(n >= 1 for n in delivered)
