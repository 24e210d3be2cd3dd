"""Both hosts (vmm.local.LocalHost inline, devserver.host.RemoteHost in a
device process) are a devices.base.DeviceHost and refuse the same way:
the registry's errors reach the model as the HostRefused family."""

from __future__ import annotations

import pytest

from devices.base import (DeviceHost, HostRefused, NotOffered, RegionBusy, RegionNotHeld, RegionTableFull,
                          Space)
from devserver.host import RemoteHost
from ipc import Registry
from tests.conftest import segment_name
from vmm.local import LocalHost

HOSTS = {"inline": LocalHost, "isolated": RemoteHost}


@pytest.fixture(params=sorted(HOSTS))
def make_host(request):
    made = []

    def make(capacity: int = 64, owner: int = 2):
        name = segment_name("host")
        reg = Registry.create(name, capacity=capacity)
        made.append(reg)
        return HOSTS[request.param](reg, owner), reg
    yield make
    for reg in made:
        reg.unlink()
        reg.close()


def test_a_host_is_a_device_host(make_host):
    host, _ = make_host()
    assert isinstance(host, DeviceHost)


def test_overlap_is_region_busy_and_changes_nothing(make_host):
    host, reg = make_host()
    host.claim(Space.PIO, 0x1000, 16, cookie=7)
    other = type(host)(reg, 3)
    with pytest.raises(RegionBusy):
        other.claim(Space.PIO, 0x1008, 16)
    with pytest.raises(RegionBusy):
        host.claim(Space.PIO, 0x100F, 1)
    assert [(r.owner, r.start, r.cookie) for r in reg.regions()] == [(2, 0x1000, 7)]


def test_a_full_table_is_region_table_full(make_host):
    host, _ = make_host(capacity=2)
    host.claim(Space.MMIO, 0x1000, 16)
    host.claim(Space.MMIO, 0x2000, 16)
    with pytest.raises(RegionTableFull):
        host.claim(Space.MMIO, 0x3000, 16)


def test_releasing_what_is_not_held_is_region_not_held(make_host):
    host, reg = make_host()
    with pytest.raises(RegionNotHeld):
        host.release(Space.PIO, 0x1000)
    host.claim(Space.PIO, 0x1000, 16)
    reg.unregister_owner(2)            # the VMM reaped the device's regions
    with pytest.raises(RegionNotHeld):
        host.release(Space.PIO, 0x1000)


@pytest.mark.parametrize("start, length", [(0x1000, 0), ((1 << 64) - 8, 16)])
def test_a_bad_range_is_refused(make_host, start, length):
    host, reg = make_host()
    with pytest.raises(HostRefused):
        host.claim(Space.MMIO, start, length)
    assert reg.regions() == []


def test_coalesce_is_accepted_and_goes_with_the_region(make_host):
    host, reg = make_host()
    host.claim(Space.MMIO, 0xD000_0000, 0x1000, 1, coalesce=True)
    host.claim(Space.MMIO, 0xD000_1000, 0x1000, 2)
    assert host.coalesced == {(Space.MMIO, 0xD000_0000): 0x1000}
    host.release(Space.MMIO, 0xD000_0000)
    assert host.coalesced == {} and len(reg.regions()) == 1


def test_what_a_bare_host_does_not_offer(make_host):
    host, _ = make_host()
    assert host.console() is None
    for ask in (lambda: host.irq_line(4), lambda: host.msi_vector(0), host.guest_memory,
                lambda: host.ioeventfd(Space.MMIO, 0xD000_0000, 4)):
        with pytest.raises(NotOffered):
            ask()


def test_adopt_takes_over_what_a_previous_process_left(make_host):
    old, reg = make_host()
    old.claim(Space.MMIO, 0xD000_0000, 0x1000, cookie=1)
    old.claim(Space.PIO, 0x500, 0x100, cookie=0)
    old.claim(Space.PCI, 0x18000, 0x1000, cookie=0x100)
    before = {(r.start, r.slot, r.generation) for r in reg.regions()}
    new = type(old)(reg, 2)                      # the restarted process, same owner
    new.adopt(Space.MMIO, 0xD000_0000, 0x1000, 1)
    new.adopt(Space.PCI, 0x18000, 0x1000, 0x100)
    new.adopt(Space.MMIO, 0xD000_4000, 0x1000, 2)   # a free range: claimed
    assert {(r.start, r.slot, r.generation) for r in reg.regions()} >= before   # never left the registry
    assert new.release_unadopted() == 1          # the PIO window the new model does not hold
    assert sorted((r.bus.name, r.start) for r in reg.regions()) == [("MMIO", 0xD000_0000), ("MMIO", 0xD000_4000),
                                                                    ("PCI", 0x18000)]
    assert new.release_unadopted() == 0
    new.release(Space.MMIO, 0xD000_4000)
    assert new.release_unadopted() == 0          # released by the model: not taken, not stale


@pytest.mark.parametrize("owner, length, cookie", [(3, 0x1000, 1), (2, 0x800, 1), (2, 0x1000, 4)])
def test_adopt_refuses_anything_but_the_same_region(make_host, owner, length, cookie):
    host, reg = make_host()
    type(host)(reg, owner).claim(Space.MMIO, 0xD000_0000, 0x1000, 1)
    with pytest.raises(RegionBusy):
        host.adopt(Space.MMIO, 0xD000_0000, length, cookie)
    assert host.release_unadopted() == (1 if owner == 2 else 0)
    assert len(reg.regions()) == (0 if owner == 2 else 1)
