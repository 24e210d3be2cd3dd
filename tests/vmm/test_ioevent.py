"""vmm.ioevent on a real VM: a device gets ioeventfds only inside its own
registered regions, bounded; removal and release unbind them."""

from __future__ import annotations

import os

import pytest

from ipc import Bus, Registry
from tests.vmm.conftest import needs_kvm
from vmm import kvm
from vmm.ioevent import SPACE_MMIO, SPACE_PIO, DeviceIoeventfds, IoeventfdRefused

pytestmark = needs_kvm

ME, OTHER = 5, 6


@pytest.fixture
def setup():
    k = kvm.Kvm()
    vm = k.create_vm()
    reg = Registry.create_sealed(capacity=64)
    reg.register(Bus.MMIO, 0xE000_0000, 0x4000, ME, 0)
    reg.register(Bus.PIO, 0xC000, 0x100, ME, 1)
    reg.register(Bus.MMIO, 0xE100_0000, 0x1000, OTHER, 0)
    try:
        yield vm, reg
    finally:
        reg.close()
        vm.close()
        k.close()


def is_open(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_add_remove_release(setup):
    vm, reg = setup
    dev = DeviceIoeventfds(vm, reg, ME, "d", limit=3)
    a = dev.add(SPACE_MMIO, 0xE000_3000, 2)
    assert dev.add(SPACE_MMIO, 0xE000_3000, 2) == a          # the same one again
    b = dev.add(SPACE_PIO, 0xC010, 2, datamatch=1)
    c = dev.add(SPACE_MMIO, 0xE000_3004, 4)
    with pytest.raises(IoeventfdRefused, match="3 ioeventfds"):
        dev.add(SPACE_MMIO, 0xE000_3008, 2)
    dev.remove(SPACE_MMIO, 0xE000_3000, 2)
    assert not is_open(a) and is_open(b)
    dev.remove(SPACE_MMIO, 0xE000_3000, 2)                   # nothing bound: nothing happens
    dev.release_all()
    assert not is_open(b) and not is_open(c)


@pytest.mark.parametrize("space,address,length,datamatch,why", [
    (SPACE_MMIO, 0xE100_0000, 2, None, "another owner"),
    (SPACE_MMIO, 0xE200_0000, 2, None, "not a registered region"),
    (SPACE_MMIO, 0xE000_3FFF, 2, None, "crosses|not a registered region"),
    (SPACE_MMIO, 0xE000_3000, 3, None, "length"),
    (SPACE_PIO, 0xFFFF, 2, None, "outside"),
    (SPACE_MMIO, (1 << 64) - 1, 2, None, "outside"),
    (SPACE_PIO, 0xC000, 1, 0x100, "wider"),
    (2, 0xE000_0000, 2, None, "space"),
])
def test_refusals(setup, space, address, length, datamatch, why):
    vm, reg = setup
    dev = DeviceIoeventfds(vm, reg, ME, "d")
    with pytest.raises(IoeventfdRefused, match=why):
        dev.add(space, address, length, datamatch)
    assert dev.bound == {}
