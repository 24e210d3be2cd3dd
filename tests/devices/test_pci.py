"""The PCI configuration-space model (devices.pci, pci_config, pci_msix) and pci-echo on their
own, against a recording host that refuses overlaps like the registry
(the same behaviour through real KVM and processes: tests/vmm/test_pci*.py)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices import pci
from devices import pci_config as cfg
from devices.base import BadParameter, DeviceHost, NotOffered, RegionBusy, Space, all_ones
from devices.pci_echo import (
    BAR_IO,
    BAR_MSIX,
    BAR_REGS,
    DEVICE_ID,
    MSIX_PBA,
    REG_ACK,
    REG_CONFLICT,
    REG_INTX_SENT,
    REG_RAISE,
    VENDOR_ID,
    PciEcho,
)
from ipc import pci_address
from tests.waiting import wait_for

CFG = pci.COOKIE_CONFIG
MMIO_WIN, IO_WIN = 0xE010_0000, 0xC200


class Vector:
    def __init__(self, log, n):
        self.log, self.n = log, n

    def program(self, address, data):
        self.log.append(("program", self.n, address, data))

    def trigger(self):
        self.log.append(("trigger", self.n))


class Line:
    def __init__(self, log, gsi):
        self.log, self.gsi = log, gsi

    def trigger(self):
        self.log.append(("intx", self.gsi))


class RecordingHost(DeviceHost):
    """Regions by (space, start) -> (length, cookie); overlapping claims
    fail, as the registry's do."""

    def __init__(self, msi: bool = True, lines: bool = True):
        self.regions: dict[tuple[Space, int], tuple[int, int]] = {}
        self.log: list = []
        self.msi, self.lines = msi, lines

    def claim(self, space, start, length, cookie=0):
        for (s, a), (n, _) in self.regions.items():
            if s == space and a < start + length and start < a + n:
                raise RegionBusy(f"overlap with {a:#x}+{n:#x}")
        self.regions[(space, start)] = (length, cookie)

    def release(self, space, start):
        del self.regions[(space, start)]

    def process_id(self):
        return 4242

    def msi_vector(self, n):
        if not self.msi:
            raise NotOffered("no MSI")
        return Vector(self.log, n)

    def irq_line(self, gsi):
        if not self.lines:
            raise NotOffered("no irqchip")
        return Line(self.log, gsi)


def make(host=None, **params):
    host = host or RecordingHost()
    params.setdefault("slot", "3")
    params.setdefault("mmio_window", hex(MMIO_WIN))
    params.setdefault("io_window", hex(IO_WIN))
    dev = PciEcho(host, **params)
    dev.start()
    return host, dev


def cfg_read(dev, off, size=4):
    return dev.read(Space.PCI, CFG, off, size)


def cfg_write(dev, off, value, size=4):
    dev.write(Space.PCI, CFG, off, size, value)


def bar_regions(host):
    return {k: v for k, v in host.regions.items() if k[0] is not Space.PCI}


def test_config_address_matches_ipc():
    for b, d, f, o in [(0, 0, 0, 0), (0, 31, 7, 0xFFF), (255, 3, 1, 0x10)]:
        assert cfg.config_address(b, d, f, o) == pci_address(b, d, f, o)


def test_header_ids_class_and_claims():
    host, dev = make()
    assert cfg_read(dev, cfg.PCI_VENDOR_ID) == DEVICE_ID << 16 | VENDOR_ID
    assert cfg_read(dev, cfg.PCI_CLASS_PROG - 1) >> 8 == 0xFF0000
    assert cfg_read(dev, cfg.PCI_HEADER_TYPE, 1) == 0
    assert cfg_read(dev, cfg.PCI_SUBSYSTEM_VENDOR_ID) == DEVICE_ID << 16 | VENDOR_ID
    assert cfg_read(dev, cfg.PCI_STATUS, 2) & cfg.PCI_STATUS_CAP_LIST
    assert (Space.PCI, pci_address(0, 3, 0)) in host.regions
    # pre-assigned, naturally aligned, decode on
    assert bar_regions(host) == {(Space.MMIO, MMIO_WIN): (0x1000, 0), (Space.PIO, IO_WIN): (0x100, 1),
                                 (Space.MMIO, MMIO_WIN + 0x1000): (0x1000, 2)}
    assert cfg_read(dev, cfg.PCI_COMMAND, 2) == cfg.PCI_COMMAND_IO | cfg.PCI_COMMAND_MEMORY
    # extended space reads 0, past the window all ones
    assert cfg_read(dev, 0x100) == 0
    assert cfg_read(dev, 0xFFE, 2) == 0
    # byte and word reads are slices of the dword
    d = cfg_read(dev, 0)
    assert [cfg_read(dev, i, 1) for i in range(4)] == list(d.to_bytes(4, "little"))
    assert cfg_read(dev, 2, 2) == d >> 16


def test_read_only_registers_stay():
    _, dev = make()
    before = [cfg_read(dev, off) for off in (0, 8, 0x2C, 0x34)]
    for off in (0, 8, 0x2C, 0x34):
        cfg_write(dev, off, 0x12345678)
    assert [cfg_read(dev, off) for off in (0, 8, 0x2C, 0x34)] == before


def test_status_write_1_to_clear_and_read_only_bits():
    _, dev = make()
    dev.config.set(cfg.PCI_STATUS, 2, dev.config.get(cfg.PCI_STATUS, 2) | cfg.STATUS_W1C)
    cfg_write(dev, cfg.PCI_STATUS, cfg.PCI_STATUS_REC_MASTER_ABORT | cfg.PCI_STATUS_CAP_LIST, 2)
    st_ = cfg_read(dev, cfg.PCI_STATUS, 2)
    assert not st_ & cfg.PCI_STATUS_REC_MASTER_ABORT       # cleared
    assert st_ & cfg.PCI_STATUS_DETECTED_PARITY            # written 0: kept
    assert st_ & cfg.PCI_STATUS_CAP_LIST                   # read-only
    cfg_write(dev, cfg.PCI_STATUS, 0, 2)
    assert cfg_read(dev, cfg.PCI_STATUS, 2) == st_
    # a dword write to COMMAND with zeros in the status half clears nothing
    cfg_write(dev, cfg.PCI_COMMAND, 0x0003)
    assert cfg_read(dev, cfg.PCI_STATUS, 2) == st_


def test_command_unimplemented_bits_read_0():
    _, dev = make()
    cfg_write(dev, cfg.PCI_COMMAND, 0xFFFF, 2)
    assert cfg_read(dev, cfg.PCI_COMMAND, 2) == cfg.COMMAND_WRITABLE


@pytest.mark.parametrize("index, size, low", [(BAR_REGS, 0x1000, 0x0), (BAR_IO, 0x100, 0x1),
                                               (BAR_MSIX, 0x1000, 0x4)])
def test_bar_sizing(index, size, low):
    host, dev = make()
    off = cfg.PCI_BASE_ADDRESS_0 + 4 * index
    cmd = cfg_read(dev, cfg.PCI_COMMAND, 2)
    cfg_write(dev, cfg.PCI_COMMAND, 0, 2)
    assert bar_regions(host) == {}
    orig = cfg_read(dev, off)
    cfg_write(dev, off, 0xFFFF_FFFF)
    got = cfg_read(dev, off)
    assert got & 0xF == low
    mask = 0xFFFF if index == BAR_IO else 0xFFFF_FFFF   # 16-bit I/O decode
    assert (~(got & ~(0x3 if index == BAR_IO else 0xF)) & mask) + 1 == size
    if index == BAR_MSIX:
        cfg_write(dev, off + 4, 0xFFFF_FFFF)
        assert cfg_read(dev, off + 4) == 0xFFFF_FFFF
        cfg_write(dev, off + 4, 0)
    cfg_write(dev, off, orig)
    cfg_write(dev, cfg.PCI_COMMAND, cmd, 2)
    assert len(bar_regions(host)) == 3


def test_sizing_probe_with_decode_on_keeps_the_region():
    host, dev = make()
    off = cfg.PCI_BASE_ADDRESS_0
    cfg_write(dev, off, 0xFFFF_FFFF)
    assert (Space.MMIO, MMIO_WIN) in host.regions
    cfg_write(dev, off, 0xE800_0000)
    assert (Space.MMIO, 0xE800_0000) in host.regions and (Space.MMIO, MMIO_WIN) not in host.regions


def test_decode_toggle_unregisters_and_registers():
    host, dev = make()
    cfg_write(dev, cfg.PCI_COMMAND, cfg.PCI_COMMAND_IO, 2)
    assert set(bar_regions(host)) == {(Space.PIO, IO_WIN)}
    cfg_write(dev, cfg.PCI_COMMAND, cfg.PCI_COMMAND_MEMORY, 2)
    assert set(bar_regions(host)) == {(Space.MMIO, MMIO_WIN), (Space.MMIO, MMIO_WIN + 0x1000)}
    cfg_write(dev, cfg.PCI_COMMAND, 0, 2)
    assert bar_regions(host) == {}


def test_bar_write_with_decode_on_moves_and_64bit_halves():
    host, dev = make()
    cfg_write(dev, cfg.PCI_BASE_ADDRESS_0 + 4, 0xD800)
    assert (Space.PIO, 0xD800) in host.regions and (Space.PIO, IO_WIN) not in host.regions
    # 64-bit BAR above 4 GiB, one qword-ish pair of dword writes
    off = cfg.PCI_BASE_ADDRESS_0 + 8
    cfg_write(dev, off + 4, 0x1)
    cfg_write(dev, off, 0x2000)
    assert (Space.MMIO, 0x1_0000_2000) in host.regions
    assert dev.bar_address(dev.bars[BAR_MSIX]) == 0x1_0000_2000
    # address 0: unassigned, not decoded
    cfg_write(dev, cfg.PCI_BASE_ADDRESS_0, 0)
    assert not any(k[0] is Space.MMIO and v[1] == 0 for k, v in host.regions.items())


def test_unaligned_bar_value_is_aligned_down():
    host, dev = make()
    cfg_write(dev, cfg.PCI_BASE_ADDRESS_0, 0xE800_0FFF)
    assert cfg_read(dev, cfg.PCI_BASE_ADDRESS_0) == 0xE800_0000
    assert (Space.MMIO, 0xE800_0000) in host.regions


def test_overlap_is_kept_and_retried():
    host = RecordingHost()
    _, a = make(host, slot="3")
    _, b = make(host, slot="4", mmio_window=hex(MMIO_WIN + 0x10_0000), io_window=hex(IO_WIN + 0x200))
    # b's BAR 0 onto a's: refused, remembered, visible
    cfg_write(b, cfg.PCI_BASE_ADDRESS_0, MMIO_WIN)
    assert cfg_read(b, cfg.PCI_BASE_ADDRESS_0) == MMIO_WIN
    assert b.conflicted() == 1 << BAR_REGS
    assert b.read(Space.MMIO, BAR_REGS, REG_CONFLICT, 4) == 1
    assert host.regions[(Space.MMIO, MMIO_WIN)] == (0x1000, 0)
    # a moves away: b's next config access registers its BAR
    cfg_write(a, cfg.PCI_BASE_ADDRESS_0, 0xE900_0000)
    cfg_read(b, 0)
    assert b.conflicted() == 0
    assert (Space.MMIO, MMIO_WIN) in host.regions and (Space.MMIO, 0xE900_0000) in host.regions
    a.stop()
    b.stop()
    assert host.regions == {}


def test_overlap_retry_thread_registers_without_config_access():

    host = RecordingHost()
    _, a = make(host, slot="3")
    _, b = make(host, slot="4", mmio_window=hex(MMIO_WIN + 0x10_0000), io_window=hex(IO_WIN + 0x200))
    cfg_write(b, cfg.PCI_BASE_ADDRESS_0 + 4, IO_WIN)
    assert b.conflicted() == 1 << BAR_IO
    with a._lock:
        a.stop()
    wait_for(lambda: b.conflicted() == 0, 2, "the conflicted BAR retried")
    assert (Space.PIO, IO_WIN) in host.regions
    b.stop()


def test_echo_register_file_behind_both_bars():
    _, dev = make()
    dev.write(Space.MMIO, BAR_REGS, 0x10, 8, 0x1122334455667788)
    assert dev.read(Space.PIO, BAR_IO, 0x10, 4) == 0x55667788
    assert dev.read(Space.PIO, BAR_IO, 0xF0, 4) == 4242
    dev.write(Space.PIO, BAR_IO, 0xF8, 4, 0x1234)       # move register: ignored
    assert dev.read(Space.PIO, BAR_IO, 0x10, 1) == 0x88
    assert dev.read(Space.MMIO, BAR_REGS, 0x800, 4) == 0xFFFF_FFFF


# -- MSI-X ---------------------------------------------------------------------

def msix_cap(dev):
    off = cfg_read(dev, cfg.PCI_CAPABILITY_LIST, 1)
    seen = 0
    while off and seen < 48:
        if cfg_read(dev, off, 1) == cfg.PCI_CAP_ID_MSIX:
            return off
        off = cfg_read(dev, off + 1, 1)
        seen += 1
    raise AssertionError("no MSI-X capability")


def table_write(dev, n, field, value, size=4):
    dev.write(Space.MMIO, BAR_MSIX, n * 16 + field, size, value)


def test_msix_capability_layout():
    _, dev = make(vectors="8")
    cap = msix_cap(dev)
    assert cfg_read(dev, cap + 2, 2) == 7                      # table size N-1, disabled
    assert cfg_read(dev, cap + 4) == 0x000 | BAR_MSIX
    assert cfg_read(dev, cap + 8) == MSIX_PBA | BAR_MSIX
    cfg_write(dev, cap + 2, 0xFFFF, 2)
    assert cfg_read(dev, cap + 2, 2) == 0xC007                 # only enable and mask-all change
    # entries start masked
    assert all(dev.read(Space.MMIO, BAR_MSIX, n * 16 + 12, 4) == 1 for n in range(8))


def test_msix_delivery_mask_pending_and_unmask():
    host, dev = make()
    cap = msix_cap(dev)
    log = host.log
    table_write(dev, 1, 0, 0xFEE0_0000, 8)
    table_write(dev, 1, 8, 0x4041)
    cfg_write(dev, cap + 2, cfg.PCI_MSIX_FLAGS_ENABLE, 2)
    # enabled, vector masked: pending (disabled would be INTx: test_intx_*)
    dev.write(Space.MMIO, BAR_REGS, REG_RAISE, 4, 1)
    assert dev.read(Space.MMIO, BAR_MSIX, MSIX_PBA, 8) == 0b10
    assert log == []
    table_write(dev, 1, 12, 0)                                # unmask: programmed...
    assert log == [("program", 1, 0xFEE0_0000, 0x4041)]      # ...not sent: no bus mastering
    cfg_write(dev, cfg.PCI_COMMAND, 0x7, 2)
    assert log == [("program", 1, 0xFEE0_0000, 0x4041), ("trigger", 1)]
    assert dev.read(Space.MMIO, BAR_MSIX, MSIX_PBA, 4) == 0
    log.clear()
    dev.write(Space.MMIO, BAR_REGS, REG_RAISE, 4, 1)
    assert log == [("trigger", 1)]
    # function mask: pending until cleared
    log.clear()
    cfg_write(dev, cap + 2, cfg.PCI_MSIX_FLAGS_ENABLE | cfg.PCI_MSIX_FLAGS_MASKALL, 2)
    dev.write(Space.MMIO, BAR_REGS, REG_RAISE, 4, 1)
    assert log == [] and dev.read(Space.MMIO, BAR_MSIX, MSIX_PBA, 4) == 0b10
    cfg_write(dev, cap + 2, cfg.PCI_MSIX_FLAGS_ENABLE, 2)
    assert log == [("trigger", 1)]
    # vector mask, new address while masked: reprogrammed at unmask
    log.clear()
    table_write(dev, 1, 12, 1)
    dev.write(Space.MMIO, BAR_REGS, REG_RAISE, 4, 1)
    table_write(dev, 1, 8, 0x4042)
    assert log == []
    table_write(dev, 1, 12, 0)
    assert log == [("program", 1, 0xFEE0_0000, 0x4042), ("trigger", 1)]
    # PBA is read-only; out-of-range vector ignored
    dev.write(Space.MMIO, BAR_MSIX, MSIX_PBA, 8, ~0)
    dev.write(Space.MMIO, BAR_REGS, REG_RAISE, 4, 99)
    assert dev.read(Space.MMIO, BAR_MSIX, MSIX_PBA, 8) == 0


def test_msix_without_host_support_keeps_the_model_working():
    _, dev = make(RecordingHost(msi=False))
    cap = msix_cap(dev)
    cfg_write(dev, cfg.PCI_COMMAND, 0x7, 2)
    cfg_write(dev, cap + 2, cfg.PCI_MSIX_FLAGS_ENABLE, 2)
    table_write(dev, 0, 12, 0)
    dev.write(Space.MMIO, BAR_REGS, REG_RAISE, 4, 0)
    assert dev.msix.lost == 1 and dev.msix.pending == 0


# -- INTx --------------------------------------------------------------------------

def raise_(dev, n=0):
    dev.write(Space.MMIO, BAR_REGS, REG_RAISE, 4, n)


def intx_status(dev):
    return bool(cfg_read(dev, cfg.PCI_STATUS, 2) & cfg.PCI_STATUS_INTERRUPT)


def test_intx_pin_and_line_preset():
    _, dev = make(intx_gsi="19")
    assert cfg_read(dev, cfg.PCI_INTERRUPT_PIN, 1) == 1            # INTA#
    assert cfg_read(dev, cfg.PCI_INTERRUPT_LINE, 1) == 19           # as firmware left it
    cfg_write(dev, cfg.PCI_INTERRUPT_LINE, 0x0B, 1)                 # RW, firmware's
    cfg_write(dev, cfg.PCI_INTERRUPT_PIN, 0x04, 1)                  # RO
    assert cfg_read(dev, cfg.PCI_INTERRUPT_LINE, 2) == 0x010B
    # no wiring given: 0xFF, "unknown / no connection" (PCI 3.0 6.2.4)
    _, dev = make()
    assert cfg_read(dev, cfg.PCI_INTERRUPT_LINE, 2) == 0x01FF
    with pytest.raises(BadParameter):
        make(intx_gsi="255")


def test_intx_raise_status_and_ack():
    host, dev = make(intx_gsi="17")
    log = host.log
    assert not intx_status(dev) and dev.read(Space.MMIO, BAR_REGS, REG_ACK, 4) == 0
    raise_(dev, 2)                                   # MSI-X disabled: INTx
    assert log == [("intx", 17)]
    assert intx_status(dev) and dev.read(Space.MMIO, BAR_REGS, REG_ACK, 4) == 1
    assert dev.read(Space.MMIO, BAR_MSIX, MSIX_PBA, 8) == 0            # not an MSI-X pending bit
    # the status bit is read-only: writes (W1C of the error bits too) keep it
    cfg_write(dev, cfg.PCI_STATUS, 0xFFFF, 2)
    assert intx_status(dev)
    # a request while the condition lasts: the wire is already asserted
    raise_(dev)
    assert log == [("intx", 17)]
    dev.write(Space.MMIO, BAR_REGS, REG_ACK, 4, 0)
    assert not intx_status(dev) and dev.read(Space.MMIO, BAR_REGS, REG_ACK, 4) == 0
    raise_(dev)
    assert log == [("intx", 17)] * 2
    assert dev.read(Space.MMIO, BAR_REGS, REG_INTX_SENT, 4) == 2


def test_intx_disable_holds_and_delivers_on_clear():
    host, dev = make(intx_gsi="17")
    log = host.log
    cmd = cfg_read(dev, cfg.PCI_COMMAND, 2)
    cfg_write(dev, cfg.PCI_COMMAND, cmd | cfg.PCI_COMMAND_INTX_DISABLE, 2)
    raise_(dev)
    assert log == [] and intx_status(dev)            # PCI 3.0 6.2.3: status still set
    cfg_write(dev, cfg.PCI_COMMAND, cmd, 2)
    assert log == [("intx", 17)]                     # delivered on clear
    # set and clear again while the condition lasts: a new assertion
    cfg_write(dev, cfg.PCI_COMMAND, cmd | cfg.PCI_COMMAND_INTX_DISABLE, 2)
    cfg_write(dev, cfg.PCI_COMMAND, cmd, 2)
    assert log == [("intx", 17)] * 2
    # acknowledged while disabled: nothing on clear
    cfg_write(dev, cfg.PCI_COMMAND, cmd | cfg.PCI_COMMAND_INTX_DISABLE, 2)
    dev.write(Space.MMIO, BAR_REGS, REG_ACK, 4, 0)
    cfg_write(dev, cfg.PCI_COMMAND, cmd, 2)
    assert log == [("intx", 17)] * 2 and not intx_status(dev)


def test_intx_never_used_with_msix_enabled():
    host, dev = make(intx_gsi="17")
    cap = msix_cap(dev)
    log = host.log
    table_write(dev, 0, 0, 0xFEE0_0000, 8)
    table_write(dev, 0, 8, 0x41)
    table_write(dev, 0, 12, 0)
    cfg_write(dev, cfg.PCI_COMMAND, 0x7, 2)
    cfg_write(dev, cap + 2, cfg.PCI_MSIX_FLAGS_ENABLE, 2)
    log.clear()
    raise_(dev, 0)
    assert log == [("trigger", 0)] and not intx_status(dev)     # PCI 3.0 6.8.2
    # a condition left from before MSI-X was enabled is not driven while
    # it is, and is again once it is disabled
    cfg_write(dev, cap + 2, 0, 2)
    cfg_write(dev, cfg.PCI_COMMAND, 0x407, 2)
    raise_(dev)
    cfg_write(dev, cfg.PCI_COMMAND, 0x7, 2)
    assert log == [("trigger", 0), ("intx", 17)]
    cfg_write(dev, cap + 2, cfg.PCI_MSIX_FLAGS_ENABLE, 2)
    cfg_write(dev, cfg.PCI_COMMAND, 0x407, 2)
    cfg_write(dev, cfg.PCI_COMMAND, 0x7, 2)
    assert log == [("trigger", 0), ("intx", 17)]
    cfg_write(dev, cap + 2, 0, 2)
    assert log == [("trigger", 0), ("intx", 17), ("intx", 17)]


def test_intx_without_host_lines_keeps_the_model_working():
    _, dev = make(RecordingHost(lines=False), intx_gsi="17")
    raise_(dev)
    assert intx_status(dev) and dev.intx_lost == 1 and dev.intx_sent == 0


def test_model_without_pin_keeps_msix_pending_while_disabled():
    class NoPin(PciEcho):
        interrupt_pin = 0

    host = RecordingHost()
    dev = NoPin(host, slot="3", mmio_window=hex(MMIO_WIN), io_window=hex(IO_WIN), intx_gsi="17")
    dev.start()
    assert cfg_read(dev, cfg.PCI_INTERRUPT_LINE, 2) == 0
    raise_(dev, 1)
    assert host.log == [] and not intx_status(dev)
    assert dev.read(Space.MMIO, BAR_MSIX, MSIX_PBA, 8) == 0b10


def test_bad_parameters():
    with pytest.raises(BadParameter):
        PciEcho(RecordingHost(), slot="0")
    with pytest.raises(BadParameter):
        PciEcho(RecordingHost(), slot="32")
    with pytest.raises(BadParameter):
        PciEcho(RecordingHost(), vectors="0")
    with pytest.raises(BadParameter):
        PciEcho(RecordingHost(), colour="red")


# -- fuzz ----------------------------------------------------------------------

DECLARED = {0: 0x1000, 1: 0x100, 2: 0x1000}


def check_regions(host):
    for (space, start), (length, cookie) in host.regions.items():
        if space is Space.PCI:
            assert (start, length) == (pci_address(0, 3, 0), 0x1000)
            continue
        assert length == DECLARED[cookie]
        assert start % length == 0 and start != 0
        if space is Space.PIO:
            assert start + length <= 0x10000


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 0xFFF), st.sampled_from([1, 2, 4]), st.integers(0, 0xFFFF_FFFF)),
                max_size=60))
def test_fuzz_config_writes_keep_regions_declared(writes):
    host, dev = make()
    for off, size, value in writes:
        off -= off % size
        cfg_write(dev, off, value & all_ones(size), size)
        check_regions(host)
    assert cfg_read(dev, 0) == DEVICE_ID << 16 | VENDOR_ID
    dev.stop()
    assert host.regions == {}


def test_fuzz_every_offset_seeded():
    rng = random.Random(1234)
    host, dev = make()
    for _ in range(20):
        for off in range(0x100):
            size = rng.choice([1, 2, 4])
            if off % size:
                size = 1
            cfg_write(dev, off, rng.getrandbits(8 * size), size)
        check_regions(host)
    assert cfg_read(dev, 0) == DEVICE_ID << 16 | VENDOR_ID
