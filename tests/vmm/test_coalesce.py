"""Coalesced MMIO end to end on real KVM (guest: tests/guests/coalesce.c).

A ``coalesce-sum`` device (tests.testkinds, named ``MODULE:CLASS``) claims a coalesced MMIO
window; the guest (ring 3) writes 10,000 values to it and then reads the
count, the sum and an order-sensitive hash of what the device received,
checking them itself.  Inline and in a device process: every write
arrives, once, in order, and the vCPU exits far fewer than 10,000 times.
The window moves (its zone goes with it), two vCPUs drain the one ring at
the same time, and the VMM refuses zones outside a device's own regions.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

import pytest

from ipc import Bus
from tests.testkinds import COALESCE_SUM, PCI_COALESCE_SUM
from tests.vmm.conftest import GUEST_SOURCES, needs_kvm
from tests.waiting import wait_for
from vmm import guests
from vmm.coalesce import MAX_ZONES_PER_DEVICE, CoalesceRefused
from vmm.config import DeviceSpec
from vmm.endpoint import VMM_OWNER
from vmm.machine import Machine
from vmm.outcome import Ending
from vmm.remote.restart import RestartPolicy

pytestmark = needs_kvm

WIN = 0xD000_0000
MOVETO = 0xD010_0000
WIN2 = 0xD020_0000
PCI_MOVETO = 0xE800_0000
WINDOW = 0x1000
N = 10_000
RUN_TIMEOUT = 120


def run(guest, placement: str, cmdline: str, coalesce: str = "on", vcpus: int = 1,
        second: bool = False, fast_path: bool = True) -> dict:
    with Machine(memory=32 << 20, vcpus=vcpus, fast_path=fast_path) as m:
        if not m.coalesced.page:
            pytest.skip("KVM on this host has no coalesced MMIO")
        m.load_pvh(guest("coalesce"), cmdline)
        eps = [m.add_device(DeviceSpec(COALESCE_SUM, "sum0", placement,
                                       (("mmio", hex(WIN)), ("coalesce", coalesce))))]
        if second:
            eps.append(m.add_device(DeviceSpec(COALESCE_SUM, "sum1", placement,
                                               (("mmio", hex(WIN2)), ("coalesce", coalesce)))))
        outcome = m.run(timeout=RUN_TIMEOUT)
        assert all(getattr(ep, "failed", None) is None for ep in eps)
        assert m.registry.check() == []
        # requests on the access slots of a device process (None inline)
        calls = [ep.call_stats().calls if hasattr(ep, "call_stats") else None for ep in eps]
        return {"outcome": outcome, "exits": [v.exits for v in m.vcpus], "calls": calls,
                "delivered": m.dispatcher.coalesced_writes, "drains": m.dispatcher.drains,
                "zones": m.coalesced.zones(), "owners": [ep.owner for ep in eps]}


@pytest.mark.parametrize("placement,fast_path", [("inline", True), ("isolated", True), ("inline", False)],
                         ids=["inline", "isolated", "inline-python-loop"])
def test_ten_thousand_writes_arrive_in_order_with_few_exits(guest, placement, fast_path):
    r = run(guest, placement, f"win={WIN:#x} n={N} moveto={MOVETO:#x}", fast_path=fast_path)
    assert r["outcome"].ending is Ending.POWER_OFF, str(r["outcome"])
    # two phases of N writes; a full ring (~170 entries) costs one exit
    assert r["exits"][0] < 2 * N / 20, r
    assert r["delivered"] >= 2 * N - r["exits"][0], r
    # the zone moved with the window
    assert r["zones"] == [(MOVETO, WINDOW, r["owners"][0])]
    if placement == "isolated":     # delivered in batches: a request per drain, not per write
        assert r["calls"][0] < 2 * N / 20, r


@pytest.mark.parametrize("placement", ["inline", "isolated"])
def test_the_zone_moves_with_a_reprogrammed_pci_bar(guest_cache, placement):
    image = guests.build([GUEST_SOURCES / "coalesce_pci.c", guests.HERE / "pci.c"], guest_cache)
    with Machine(memory=32 << 20) as m:
        if not m.coalesced.page:
            pytest.skip("KVM on this host has no coalesced MMIO")
        m.load_pvh(image, f"n={N} moveto={PCI_MOVETO:#x}")
        ep = m.add_device(DeviceSpec(PCI_COALESCE_SUM, "psum0", placement, ()))
        outcome = m.run(timeout=RUN_TIMEOUT)
        assert outcome.ending is Ending.POWER_OFF, str(outcome)
        assert getattr(ep, "failed", None) is None
        assert m.vcpus[0].exits < 2 * N / 20
        assert m.coalesced.zones() == [(PCI_MOVETO, WINDOW, ep.owner)]


@pytest.mark.parametrize("placement", ["inline", "isolated"])
def test_without_coalescing_every_write_exits(guest, placement):
    r = run(guest, placement, f"win={WIN:#x} n={N}", coalesce="off")
    assert r["outcome"].ending is Ending.POWER_OFF, str(r["outcome"])
    assert r["exits"][0] >= N
    assert r["delivered"] == 0 and r["zones"] == []


@pytest.mark.parametrize("placement", ["inline", "isolated"])
def test_two_vcpus_share_the_ring(guest, placement):
    r = run(guest, placement, f"win={WIN:#x} win2={WIN2:#x} n={N}", vcpus=2, second=True)
    assert r["outcome"].ending is Ending.POWER_OFF, str(r["outcome"])
    assert sum(r["exits"]) < 2 * N / 10, r


@pytest.mark.parametrize("placement", ["inline", "isolated"])
def test_two_vcpus_write_one_window_at_once(guest, placement):
    r = run(guest, placement, f"win={WIN:#x} n={N} shared=1", vcpus=2)
    assert r["outcome"].ending is Ending.POWER_OFF, str(r["outcome"])
    assert sum(r["exits"]) < 2 * N / 10, r
    assert r["delivered"] >= 2 * N - sum(r["exits"]), r


def test_zone_requests_are_validated():
    with Machine(memory=16 << 20) as m:
        if not m.coalesced.page:
            pytest.skip("KVM on this host has no coalesced MMIO")
        reg, zones = m.registry, m.coalesced
        reg.register(Bus.MMIO, WIN, WINDOW, owner=7)
        reg.register(Bus.MMIO, WIN2, 0x100000, owner=8)
        reg.register(Bus.PIO, 0x2000, 8, owner=7)
        for start, length, why in [
            (WIN + 0x10000, 0x100, "not inside"),        # nobody's
            (WIN + 0x800, WINDOW, "not inside"),         # crosses the region's end
            (WIN2, 0x100, "another owner"),              # device 8's
            (WIN, 0, "empty"),
            ((1 << 64) - 0x10, 0x20, "wraps"),
        ]:
            with pytest.raises(CoalesceRefused, match=why):
                zones.add(reg, 7, "dev7", start, length)
        with pytest.raises(CoalesceRefused, match="another owner"):
            zones.add(reg, VMM_OWNER, "vmm", WIN, 0x10)
        zones.add(reg, 7, "dev7", WIN, 0x100)
        zones.add(reg, 7, "dev7", WIN, 0x100)             # again: the same zone
        with pytest.raises(CoalesceRefused, match="overlaps"):
            zones.add(reg, 7, "dev7", WIN + 0x80, 0x100)
        for k in range(1, MAX_ZONES_PER_DEVICE):
            zones.add(reg, 8, "dev8", WIN2 + k * 0x1000, 0x1000)
        zones.add(reg, 8, "dev8", WIN2, 0x1000)
        with pytest.raises(CoalesceRefused, match="already holds"):
            zones.add(reg, 8, "dev8", WIN2 + 0x20000, 0x1000)
        assert zones.count(8) == MAX_ZONES_PER_DEVICE
        assert not zones.remove(8, WIN)                     # device 7's
        assert zones.remove(7, WIN)
        assert zones.remove_owner(8) == MAX_ZONES_PER_DEVICE
        assert zones.zones() == []
        # a zone whose region went behind the VMM's back gives way
        zones.add(reg, 7, "dev7", WIN, 0x100)
        reg.unregister(Bus.MMIO, WIN, owner=7)
        reg.register(Bus.MMIO, WIN, WINDOW, owner=9)
        zones.add(reg, 9, "dev9", WIN, WINDOW)
        assert zones.zones() == [(WIN, WINDOW, 9)]


def test_zones_of_a_device_process_go_when_it_dies(guest):
    with Machine(memory=16 << 20) as m:
        if not m.coalesced.page:
            pytest.skip("KVM on this host has no coalesced MMIO")
        ep = m.add_device(DeviceSpec(COALESCE_SUM, "sum0", "isolated", (("mmio", hex(WIN)),),
                                     restart=RestartPolicy(mode="no")))   # it dies for good here
        assert m.coalesced.zones() == [(WIN, WINDOW, ep.owner)]
        os.kill(ep.pid, signal.SIGKILL)
        assert ep.wait_exited(30)
        wait_for(lambda: m.coalesced.zones() == [], 30, "the dead device's zone removed")
        assert not [r for r in m.registry.regions() if r.owner == ep.owner]


def test_a_device_process_gets_no_zone_outside_its_regions(caplog):
    """A hostile device asks for zones over another device's window, part
    of it, and an address nobody claimed: each is refused, it stays up."""
    from tests.devserver.fake_device import ZONE_THEFTS
    from vmm.remote import RemoteEndpoint, RemoteOptions

    fake = os.path.join(os.path.dirname(__file__), "..", "devserver", "fake_device.py")
    caplog.set_level(logging.WARNING, logger="vmm.remote")
    with Machine(memory=16 << 20) as m:
        if not m.coalesced.page:
            pytest.skip("KVM on this host has no coalesced MMIO")
        victim = m.add_device(DeviceSpec(COALESCE_SUM, "sum0", "inline", (("mmio", hex(WIN)),)))
        options = RemoteOptions(command=(sys.executable, fake, "zone-thief"), irq_router=m.irq,
                                coalesced=m.coalesced)
        with RemoteEndpoint.spawn("echo", {}, 40, "thief", m.registry, 1, options) as thief:
            assert thief.failed is None
            assert m.coalesced.zones() == [(WIN, WINDOW, victim.owner)]
        refused = [r.getMessage() for r in caplog.records if "coalesced-mmio refused" in r.getMessage()]
        assert len(refused) == len(ZONE_THEFTS), refused


def test_a_reset_device_process_asks_for_its_zone_again():
    with Machine(memory=16 << 20) as m:
        if not m.coalesced.page:
            pytest.skip("KVM on this host has no coalesced MMIO")
        ep = m.add_device(DeviceSpec(COALESCE_SUM, "sum0", "isolated", (("mmio", hex(WIN)),),
                                     restart=RestartPolicy(mode="no")))   # it dies for good here
        assert "coalesced-batch" in ep.features
        ep.reset()
        assert ep.failed is None
        assert m.coalesced.zones() == [(WIN, WINDOW, ep.owner)]
