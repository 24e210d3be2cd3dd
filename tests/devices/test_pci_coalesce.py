"""A PCI memory BAR claimed with coalescing (devices.pci add_bar(coalesce=True)):
its region is claimed with ``coalesce=True`` wherever the guest moves it, and
an I/O BAR cannot be coalesced (the same on real KVM: tests/vmm/test_coalesce.py)."""

from __future__ import annotations

import pytest

from devices import pci
from devices import pci_config as cfg
from devices.base import BadParameter, DeviceHost, Space

MMIO_WIN = 0xE010_0000


class CoalescingHost(DeviceHost):
    """Records every claim with its coalesce flag; refuses overlaps."""

    def __init__(self):
        self.regions: dict[tuple[Space, int], tuple[int, int, bool]] = {}

    def claim(self, space, start, length, cookie=0, coalesce=False):
        for (s, a), (n, _, _) in self.regions.items():
            if s == space and a < start + length and start < a + n:
                raise RuntimeError(f"overlap with {a:#x}+{n:#x}")
        self.regions[(space, start)] = (length, cookie, coalesce)

    def release(self, space, start):
        del self.regions[(space, start)]

    def process_id(self):
        return 1


class Window(pci.PciDevice):
    kind = "coalesced-window"

    def __init__(self, host, **params):
        super().__init__(host, **params)
        self.add_bar(0, cfg.BarKind.MEM32, 0x1000, coalesce=True)
        self.add_bar(1, cfg.BarKind.MEM32, 0x1000)

    def bar_read(self, bar, offset, size):
        return 0

    def bar_write(self, bar, offset, size, value):
        pass


def test_a_coalesced_bar_keeps_coalescing_where_it_moves():
    host = CoalescingHost()
    dev = Window(host, slot="2", mmio_window=hex(MMIO_WIN))
    dev.start()
    mem = {k: v for k, v in host.regions.items() if k[0] is Space.MMIO}
    assert mem == {(Space.MMIO, MMIO_WIN): (0x1000, 0, True), (Space.MMIO, MMIO_WIN + 0x1000): (0x1000, 1, False)}
    dev.write(Space.PCI, pci.COOKIE_CONFIG, cfg.PCI_BASE_ADDRESS_0, 4, 0xE800_0000)
    mem = {k: v for k, v in host.regions.items() if k[0] is Space.MMIO}
    assert mem == {(Space.MMIO, 0xE800_0000): (0x1000, 0, True), (Space.MMIO, MMIO_WIN + 0x1000): (0x1000, 1, False)}
    dev.stop()


def test_an_io_bar_cannot_be_coalesced():
    class IoWindow(Window):
        def __init__(self, host, **params):
            pci.PciDevice.__init__(self, host, **params)
            self.add_bar(0, cfg.BarKind.IO, 0x100, coalesce=True)

    with pytest.raises(BadParameter, match="only memory BARs"):
        IoWindow(CoalescingHost(), slot="2")
