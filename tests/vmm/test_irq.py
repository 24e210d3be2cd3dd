"""vmm.irq on a real VM: the routing table KVM starts with, MSI routes,
irqfds, and what one device may hold."""

from __future__ import annotations

import os

import pytest

from tests.vmm.conftest import needs_kvm
from vmm import kvm
from vmm.irq import (
    FIRST_MSI_GSI,
    IRQCHIP_IOAPIC,
    IRQCHIP_PIC_MASTER,
    IRQCHIP_PIC_SLAVE,
    ROUTE_IRQCHIP,
    DeviceIrqs,
    IrqRefused,
    IrqRouter,
    check_msi,
    default_routes,
)

pytestmark = needs_kvm


@pytest.fixture
def router():
    with_kvm = kvm.Kvm()
    vm = with_kvm.create_vm()
    try:
        vm.create_irqchip()
        yield IrqRouter(vm)
    finally:
        vm.close()
        with_kvm.close()


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_default_routes_are_kvms():
    routes = default_routes()
    assert len(routes) == 24 + 16
    assert (0, ROUTE_IRQCHIP, IRQCHIP_IOAPIC, 0, 0) in routes
    assert (0, ROUTE_IRQCHIP, IRQCHIP_PIC_MASTER, 0, 0) in routes
    assert (9, ROUTE_IRQCHIP, IRQCHIP_PIC_SLAVE, 1, 0) in routes
    assert [r for r in routes if r[0] == 20] == [(20, ROUTE_IRQCHIP, IRQCHIP_IOAPIC, 20, 0)]


@pytest.mark.parametrize("address,data", [(0xFED0_0000, 0), (0x1_FEE0_0000, 0), (0xFEE0_0000, 1 << 32),
                                          (-1, 0), ("0xfee00000", 0)])
def test_check_msi_refuses(address, data):
    with pytest.raises(IrqRefused):
        check_msi(address, data)


def test_msi_routes_are_allocated_updated_and_reused(router):
    gsi, fd = router.add_msi(0xFEE0_0000, 0x41)
    assert gsi >= FIRST_MSI_GSI and is_open(fd)
    router.update_msi(gsi, 0xFEE0_1000, 0x42)
    assert router.msi_routes() == {gsi: (0xFEE0_1000, 0x42)}
    router.remove_msi(gsi, fd)
    assert router.msi_routes() == {} and not is_open(fd)
    again, fd2 = router.add_msi(0xFEE0_0000, 0x43)
    assert again == gsi
    router.remove_msi(again, fd2)


def test_device_limits(router):
    dev = DeviceIrqs(router, "d", max_pins=2, max_vectors=3)
    a = dev.pin(4)
    assert dev.pin(4) == a
    dev.pin(5)
    with pytest.raises(IrqRefused, match="2 interrupt pins"):
        dev.pin(6)
    with pytest.raises(IrqRefused, match="outside 0-23"):
        DeviceIrqs(router, "e").pin(24)
    fds = [dev.program(i, 0xFEE0_0000, 0x40 + i) for i in range(3)]
    assert dev.program(0, 0xFEE0_0000, 0x50) == fds[0]        # an update
    with pytest.raises(IrqRefused, match="3 MSI routes"):
        dev.program(3, 0xFEE0_0000, 0x44)
    with pytest.raises(IrqRefused, match="index"):
        dev.program(5000, 0xFEE0_0000, 0x44)
    other = DeviceIrqs(router, "other")
    ofd = other.program(0, 0xFEE0_0000, 0x60)                  # others unaffected
    dev.release_all()
    assert not any(is_open(fd) for fd in [a, *fds])
    assert list(router.msi_routes().values()) == [(0xFEE0_0000, 0x60)] and is_open(ofd)
    other.release_all()
