"""The host bridge and configuration mechanism #1 (vmm.pci) without KVM:
port accesses go through the real dispatcher and registry to an inline
pci-echo, as a vCPU's would (the guest-side view is tests/vmm/test_pci.py)."""

from __future__ import annotations

import pytest

from devices.pci_echo import DEVICE_ID, VENDOR_ID
from ipc import Bus
from vmm import layout
from vmm.config import ConfigError, parse_device_spec
from vmm.dispatch import Dispatcher
from vmm.local import LocalEndpoint, VmmHandlers
from vmm.pci import BRIDGE_DEVICE_ID, BRIDGE_VENDOR_ID, PciHost

CF8, CFC = layout.PCI_CONFIG_ADDRESS, layout.PCI_CONFIG_DATA


class Bus0:
    """A registry, the VMM's handlers, the PCI host, and helpers that do
    what a vCPU's port I/O does."""

    def __init__(self, registry):
        self.registry = registry
        self.endpoints = {}
        self.handlers = VmmHandlers(registry)
        self.endpoints[self.handlers.owner] = self.handlers
        self.dispatcher = Dispatcher(registry, self.endpoints)
        self.host = PciHost(self.dispatcher, self.handlers)

    def add(self, text: str, owner: int) -> LocalEndpoint:
        spec = self.host.place(parse_device_spec(text + ",process=inline"))
        ep = LocalEndpoint.create(spec.model_class, spec.param_dict(), owner, spec.name, self.registry)
        self.endpoints[owner] = ep
        return ep

    def out(self, port: int, size: int, value: int) -> None:
        self.dispatcher.access(0, Bus.PIO, port, size, True, value)

    def inp(self, port: int, size: int) -> int:
        return self.dispatcher.access(0, Bus.PIO, port, size, False, 0)

    def cfg(self, dev: int, reg: int, size: int = 4, bus: int = 0, fn: int = 0) -> int:
        self.out(CF8, 4, 1 << 31 | bus << 16 | dev << 11 | fn << 8 | (reg & 0xFC))
        return self.inp(CFC + (reg & 3), size)


@pytest.fixture
def bus0(registry):
    b = Bus0(registry)
    yield b
    for ep in b.endpoints.values():
        ep.close()


def test_linux_type1_probe(bus0):
    # arch/x86/pci/direct.c pci_check_type1()
    bus0.out(0xCFB, 1, 0x01)
    tmp = bus0.inp(CF8, 4)
    bus0.out(CF8, 4, 0x8000_0000)
    assert bus0.inp(CF8, 4) == 0x8000_0000
    bus0.out(CF8, 4, tmp)
    assert bus0.inp(CF8, 4) == tmp


def test_config_address_reserved_bits_and_sizes(bus0):
    bus0.out(CF8, 4, 0xFFFF_FFFF)
    assert bus0.inp(CF8, 4) == 0x80FF_FFFC
    bus0.out(CF8, 2, 0)                 # not a dword: not CONFIG_ADDRESS
    bus0.out(CF8 + 1, 1, 0)
    assert bus0.inp(CF8, 4) == 0x80FF_FFFC
    assert bus0.inp(CF8, 2) == 0xFFFF and bus0.inp(CF8 + 3, 1) == 0xFF


def test_host_bridge_and_absent_functions(bus0):
    assert bus0.cfg(0, 0) == BRIDGE_DEVICE_ID << 16 | BRIDGE_VENDOR_ID
    assert bus0.cfg(0, 8) >> 8 == 0x060000
    assert bus0.cfg(0, 0x0E, 1) == 0
    assert bus0.cfg(5, 0) == 0xFFFF_FFFF
    assert bus0.cfg(0, 0, fn=1) == 0xFFFF_FFFF
    assert bus0.cfg(0, 0, bus=1) == 0xFFFF_FFFF
    assert bus0.cfg(0, 0, 2) == BRIDGE_VENDOR_ID
    # the bridge's IDs are read-only
    bus0.out(CF8, 4, 0x8000_0000)
    bus0.out(CFC, 4, 0)
    assert bus0.cfg(0, 0) == BRIDGE_DEVICE_ID << 16 | BRIDGE_VENDOR_ID
    # enable bit clear: nobody answers
    bus0.out(CF8, 4, 0)
    assert bus0.inp(CFC, 4) == 0xFFFF_FFFF


def test_config_reaches_the_owning_function_at_every_offset_and_size(bus0):
    bus0.add("pci-echo,slot=7", owner=9)
    assert bus0.cfg(7, 0) == DEVICE_ID << 16 | VENDOR_ID
    for reg in range(0, 0x40, 4):
        d = bus0.cfg(7, reg)
        assert [bus0.cfg(7, reg + i, 1) for i in range(4)] == list(d.to_bytes(4, "little"))
        assert bus0.cfg(7, reg + 2, 2) == d >> 16
    # a config write through CONFIG_DATA moves the BAR in the registry
    mmio = layout.PCI_MMIO_WINDOW + 7 * layout.PCI_MMIO_PER_SLOT
    bus0.out(CF8, 4, 0x8000_0000 | 7 << 11 | 0x10)
    bus0.out(CFC, 4, 0xE900_0000)
    owned = {(r.bus, r.start) for r in bus0.registry.regions() if r.owner == 9}
    assert (Bus.MMIO, 0xE900_0000) in owned and (Bus.MMIO, mmio) not in owned
    assert bus0.registry.check() == []


def test_place_assigns_slots_and_windows(bus0):
    a = bus0.host.place(parse_device_spec("pci-echo"))
    b = bus0.host.place(parse_device_spec("pci-echo,slot=5"))
    c = bus0.host.place(parse_device_spec("pci-echo"))
    assert [s.param_dict()["slot"] for s in (a, b, c)] == ["1", "5", "2"]
    assert int(b.param_dict()["mmio_window"], 16) == layout.PCI_MMIO_WINDOW + 5 * layout.PCI_MMIO_PER_SLOT
    assert int(b.param_dict()["io_window"], 16) == layout.PCI_IO_WINDOW + 5 * layout.PCI_IO_PER_SLOT
    with pytest.raises(ConfigError, match="taken"):
        bus0.host.place(parse_device_spec("pci-echo,slot=5"))
    echo = parse_device_spec("echo,pio=0x1000")
    assert bus0.host.place(echo) is echo
