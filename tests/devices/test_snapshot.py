"""Snapshot and restore of echo, serial and pci-echo at the model level: a
model driven into a non-trivial state is snapshotted, the snapshot goes
through msgpack (as through a state segment), a fresh model on a new host
over the same registry (a new device process of the same owner) restores
it; every register reads the same on both, behaviour goes on, the
regions are adopted (never claimed twice, none lost, stale ones
released), no interrupt is repeated.  Hostile snapshots are refused with
BadState and leave the fresh model as built and usable."""

from __future__ import annotations


import msgpack
import pytest

from devices import pci
from devices import pci_config as cfg
from devices.base import BadState, Device, NoSnapshot, Space, packs_snapshot, resume
from devices.echo import ECHO_COUNT, ECHO_MOVE, ECHO_PID, Echo
from devices.pci_echo import BAR_IO, BAR_MSIX, BAR_REGS, MSIX_PBA, REG_ACK, REG_INTX_SENT, REG_RAISE, PciEcho
from devices.serial import (UART_FCR, UART_IER, UART_IIR, UART_LCR, UART_LCR_DLAB, UART_LSR, UART_MCR,
                            UART_MCR_LOOP, UART_MCR_OUT2, UART_MSR, UART_RX, UART_SCR, UART_TX, Serial)
from ipc import Bus
from tests.devices.snapshots import KeptHost, hostile, plain, wire
from tests.waiting import wait_for

CFG = pci.COOKIE_CONFIG
MMIO_WIN, IO_WIN = 0xE010_0000, 0xC200


def restart(registry, cls, state, **params):
    """A new "process": a fresh host over the same registry and owner,
    a fresh model with the same parameters, resumed from ``state``."""
    host = KeptHost(registry)
    dev = cls(host, **params)
    resume(dev, wire(state))
    return host, dev


def refuses_all(registry, cls, state, check, **params):
    """Every hostile variant of ``state`` raises BadState and leaves a
    fresh model as built; the last one then starts fresh and passes
    ``check``."""
    host = KeptHost(registry, owner=9)
    dev = cls(host, **params)
    built = _state_before_start(dev)
    n = 0
    for what, bad in hostile(state):
        with pytest.raises(BadState):
            dev.restore(bad)
            pytest.fail(f"accepted: {what}")
        assert _state_before_start(dev) == built, what
        n += 1
    dev.start()
    check(dev)
    dev.stop()
    return n


def _state_before_start(dev: Device) -> dict:
    return dev.snapshot()


# -- echo -----------------------------------------------------------------------

ECHO = {"pio": "0x500", "mmio": "0xd0000000"}


def echo_in_use(registry):
    host = KeptHost(registry)
    dev = Echo(host, **ECHO)
    dev.start()
    for off in range(0, 0xF0, 4):
        dev.write(Space.PIO, 0, off, 4, 0x01020304 * (off + 1) & 0xFFFF_FFFF)
    dev.write(Space.MMIO, 1, ECHO_MOVE, 8, 0xD0004000)       # the window moved
    for _ in range(7):
        dev.read(Space.MMIO, 1, ECHO_COUNT, 4)
    return host, dev


def test_echo_round_trip(registry):
    host, old = echo_in_use(registry)
    state = old.snapshot()
    plain(state)
    held = host.regions()
    assert (Space.MMIO, 0xD0004000, 0x1000, 1) in held
    new_host, new = restart(registry, Echo, state, **ECHO)
    assert new.base == {Space.PIO: 0x500, Space.MMIO: 0xD0004000}
    assert new_host.regions() == held                              # adopted, not claimed twice
    assert new.snapshot() == state
    for off in list(range(0, 0xF0)) + [ECHO_PID, ECHO_COUNT]:
        for size in (1, 2, 4, 8):
            assert new.read(Space.MMIO, 1, off, size) == old.read(Space.MMIO, 1, off, size), (off, size)
    before = new.read(Space.PIO, 0, ECHO_COUNT, 4)
    new.write(Space.PIO, 0, 0x10, 2, 0xBEEF)
    assert new.read(Space.PIO, 0, ECHO_COUNT, 4) == before + 2      # the counter went on
    new.write(Space.MMIO, 1, ECHO_MOVE, 8, 0xD0008000)             # and it still moves
    assert (Space.MMIO, 0xD0008000, 0x1000, 1) in new_host.regions()
    new.stop()
    assert new_host.regions() == set()


def test_echo_packed_snapshot_is_its_snapshot(registry):
    """The form a device process stores before every answer decodes to
    snapshot()'s dict after reads, scratch writes, a move, a restore and
    at the counter's extremes."""
    assert packs_snapshot(Echo)

    def same(dev):
        assert msgpack.unpackb(dev.packed_snapshot(), raw=False) == dev.snapshot()

    host, dev = echo_in_use(registry)
    same(dev)
    dev.write(Space.PIO, 0, 0x20, 1, 0x5A)
    same(dev)
    dev.regs.scratch[3] ^= 0xFF          # even a change behind the model's back
    same(dev)
    dev.write(Space.MMIO, 1, ECHO_MOVE, 8, 0xD0008000)
    assert dev.base[Space.MMIO] == 0xD0008000
    same(dev)
    for count in (0, 1, 0x7F, 0x80, 0xFFFF, 0xFFFF_FFFF):
        dev.regs.count = count
        same(dev)
    state = dev.snapshot()
    _, new = restart(registry, Echo, state, **ECHO)
    same(new)
    assert new.snapshot() == state
    new.stop()


def test_a_subclass_that_changes_the_snapshot_does_not_pack_it():
    class Wider(Echo):
        def snapshot(self) -> dict:
            return {**super().snapshot(), "extra": 1}

    class Plain(Device):
        def snapshot(self) -> dict:
            return {}

    assert not packs_snapshot(Wider) and not packs_snapshot(Plain) and not packs_snapshot(Device)


def test_echo_restore_releases_what_the_dead_process_held_and_claims_what_it_lost(registry):
    host, old = echo_in_use(registry)
    state = old.snapshot()
    # The process died inside its next move: the new window claimed, the
    # old one released, the snapshot (taken before) still has the old one.
    host.release(Space.MMIO, 0xD0004000)
    host.claim(Space.MMIO, 0xD000C000, 0x1000, 1)
    new_host = KeptHost(registry)
    new = Echo(new_host, **ECHO)
    new.restore(wire(state))
    new.start()
    assert new_host.release_unadopted() == 1
    assert new_host.regions() == {(Space.PIO, 0x500, 0x100, 0), (Space.MMIO, 0xD0004000, 0x1000, 1)}


def test_echo_hostile_snapshots(registry):
    _, old = echo_in_use(registry)
    state = old.snapshot()

    def fresh(dev):
        assert dev.base == {Space.PIO: 0x500, Space.MMIO: 0xD0000000}
        assert dev.read(Space.PIO, 0, 0, 4) == 0 and dev.read(Space.PIO, 0, ECHO_COUNT, 4) == 2

    old.stop()
    assert refuses_all(registry, Echo, state, fresh, **ECHO) > 30


@pytest.mark.parametrize("change", [
    {"mmio": None},                          # a window the parameters have
    {"mmio": 0xD0000010},                    # not 4 KiB aligned
    {"pio": 0xFFF0},                         # beyond the port space
])
def test_echo_inconsistent_snapshots(registry, change):
    _, old = echo_in_use(registry)
    state = {**old.snapshot(), **change}
    with pytest.raises(BadState):
        Echo(KeptHost(registry, owner=9), **ECHO).restore(state)
    with pytest.raises(BadState):                                  # a window the parameters lack
        Echo(KeptHost(registry, owner=9), pio="0x500").restore(old.snapshot())


def test_a_model_without_snapshots_says_so(registry):
    class Plain(Device):
        def read(self, space, cookie, offset, size):
            return 0

        def write(self, space, cookie, offset, size, value):
            pass

    with pytest.raises(NoSnapshot):
        Plain(KeptHost(registry)).snapshot()
    with pytest.raises(NoSnapshot):
        Plain(KeptHost(registry)).restore({})


# -- serial ---------------------------------------------------------------------

def rd(dev, reg):
    return dev.read(Space.PIO, 0, reg, 1)


def wr(dev, reg, value):
    dev.write(Space.PIO, 0, reg, 1, value)


UART_REGS_READ = (UART_IER, UART_LCR, UART_MCR, UART_SCR, UART_IIR, UART_MSR, UART_LSR, UART_RX)


def serial_in_use(registry):
    host = KeptHost(registry)
    dev = Serial(host)
    dev.start()
    wr(dev, UART_LCR, UART_LCR_DLAB)
    wr(dev, 0, 3)                                  # 38400 baud
    wr(dev, 1, 0)
    wr(dev, UART_LCR, 0x1B)                        # 8 bits, even parity, no DLAB
    wr(dev, UART_FCR, 0x81)                        # FIFO on, trigger 8
    wr(dev, UART_SCR, 0x5A)
    wr(dev, UART_MCR, UART_MCR_LOOP | UART_MCR_OUT2 | 0x3)
    for b in b"hello":
        wr(dev, UART_TX, b)                        # looped back into the receive FIFO
    wr(dev, UART_IER, 0x0D)                        # RDI, RLSI, MSI: the timeout interrupt is pending
    return host, dev


def test_serial_round_trip(registry):
    host, old = serial_in_use(registry)
    assert host.log == [("intx", 4)]               # the timeout interrupt went out, once
    state = old.snapshot()
    plain(state)
    assert state["rx"] == b"hello" and state["level"] is True
    new_host, new = restart(registry, Serial, state)
    assert new_host.log == []                      # the edge is not sent again
    assert new_host.regions() == host.regions() == {(Space.PIO, 0x3F8, 8, 0)}
    assert new.snapshot() == state
    for reg in UART_REGS_READ * 6:                 # drains the FIFO on both
        assert rd(new, reg) == rd(old, reg), reg
    wr(new, UART_LCR, 0x9B)
    assert rd(new, 0) == 3                         # the divisor
    wr(new, UART_LCR, 0x1B)
    wr(new, UART_TX, ord("!"))                     # behaviour goes on: loopback, interrupt
    assert rd(new, UART_RX) == ord("!")
    new.stop()
    old.stop()


def test_serial_hostile_snapshots(registry):
    _, old = serial_in_use(registry)
    state = old.snapshot()
    old.stop()

    def fresh(dev):
        assert rd(dev, UART_SCR) == 0 and rd(dev, UART_LSR) == 0x60

    assert refuses_all(registry, Serial, state, fresh) > 50


@pytest.mark.parametrize("change", [
    {"lsr": 0x60},                                  # DR clear with bytes in the FIFO
    {"fcr": 0, "rx": b"hello"},                     # five bytes without a FIFO
    {"fcr": 0x02},                                  # a clear command is not a state
    {"msr": 0xF0},                                  # RI on, with MCR OUT1 off in loopback
    {"ier": 0x10},
    {"rx": bytes(17), "lsr": 0x61},
    {"lsr": 0x61 | 0x04},                           # a parity error this UART never reports
])
def test_serial_inconsistent_snapshots(registry, change):
    _, old = serial_in_use(registry)
    state = {**old.snapshot(), **change}
    old.stop()
    with pytest.raises(BadState):
        Serial(KeptHost(registry, owner=9)).restore(state)


# -- pci-echo -------------------------------------------------------------------

def cfg_r(dev, off, size=4):
    return dev.read(Space.PCI, CFG, off, size)


def cfg_w(dev, off, size, value):
    dev.write(Space.PCI, CFG, off, size, value)


def msix_cap(dev):
    assert dev.msix is not None
    return dev.msix.cap


def pci_echo_in_use(registry, squatter_at=0xC800):
    """pci-echo with MSI-X on (vector 0 delivered, vector 1 masked and
    pending, vector 2 unmasked), BAR 0 moved, BAR 1 moved onto a range
    another owner holds (conflicted), scratch written."""
    registry.register(Bus.PIO, squatter_at, 0x100, 77)
    host = KeptHost(registry)
    dev = PciEcho(host, slot="3", mmio_window=hex(MMIO_WIN), io_window=hex(IO_WIN), intx_gsi="19")
    dev.start()
    cfg_w(dev, cfg.PCI_BASE_ADDRESS_0, 4, 0xE020_0000)             # move BAR 0
    cfg_w(dev, cfg.PCI_BASE_ADDRESS_0 + 4, 4, squatter_at | 1)     # BAR 1 onto the squatter
    cfg_w(dev, cfg.PCI_INTERRUPT_LINE, 1, 11)
    cfg_w(dev, cfg.PCI_COMMAND, 2, 0x7)                            # + bus master
    cap = msix_cap(dev)
    for n, (addr, data) in enumerate(((0xFEE0_0000, 0x41), (0xFEE0_1000, 0x42), (0xFEE0_2000, 0x43))):
        base = 16 * n
        dev.write(Space.MMIO, BAR_MSIX, base, 4, addr)
        dev.write(Space.MMIO, BAR_MSIX, base + 8, 4, data)
    dev.write(Space.MMIO, BAR_MSIX, 12, 4, 0)                      # unmask 0
    dev.write(Space.MMIO, BAR_MSIX, 32 + 12, 4, 0)                 # unmask 2
    cfg_w(dev, cap + cfg.PCI_MSIX_FLAGS, 2, cfg.PCI_MSIX_FLAGS_ENABLE)
    dev.write(Space.MMIO, BAR_REGS, REG_RAISE, 4, 0)
    dev.write(Space.MMIO, BAR_REGS, REG_RAISE, 4, 1)               # masked: pending
    dev.write(Space.MMIO, BAR_REGS, 0x20, 8, 0x1122_3344_5566_7788)
    assert dev.conflicted() == 1 << BAR_IO
    return host, dev


def test_pci_echo_round_trip(registry):
    host, old = pci_echo_in_use(registry)
    assert ("msi", 0) in host.log
    state = old.snapshot()
    plain(state)
    held = host.regions()
    new_host, new = restart(registry, PciEcho, state, slot="3", mmio_window=hex(MMIO_WIN),
                            io_window=hex(IO_WIN), intx_gsi="19")
    assert new_host.regions() == held
    # Routes asked for again for the unmasked entries, nothing delivered.
    assert sorted(e for e in new_host.log) == [("program", 0, 0xFEE0_0000, 0x41),
                                               ("program", 2, 0xFEE0_2000, 0x43)]
    assert new.snapshot() == state
    for off in range(0, 0x100, 4):
        assert cfg_r(new, off) == cfg_r(old, off), hex(off)
    for off in range(0, 0x40, 4):
        assert new.read(Space.MMIO, BAR_MSIX, off, 4) == old.read(Space.MMIO, BAR_MSIX, off, 4)
    assert new.read(Space.MMIO, BAR_MSIX, MSIX_PBA, 8) == 0b10
    for off in (0x20, 0x24, ECHO_COUNT):
        assert new.read(Space.MMIO, BAR_REGS, off, 4) == old.read(Space.MMIO, BAR_REGS, off, 4)
    old.stop()
    # Behaviour goes on: unmasking vector 1 delivers the pending one.
    new.write(Space.MMIO, BAR_MSIX, 16 + 12, 4, 0)
    assert new_host.log[-1] == ("msi", 1)
    assert new.read(Space.MMIO, BAR_MSIX, MSIX_PBA, 8) == 0
    # The conflicted BAR is retried, and registered once the range is free.
    registry.unregister(Bus.PIO, 0xC800, 77)
    wait_for(lambda: not new.conflicted(), 10, "the conflicted BAR to be registered")
    assert (Space.PIO, 0xC800, 0x100, BAR_IO) in new_host.regions()
    new.stop()
    assert new_host.regions() == set()


def test_pci_echo_intx_condition_survives_without_a_new_edge(registry):
    host = KeptHost(registry)
    params = dict(slot="4", mmio_window=hex(MMIO_WIN), io_window=hex(IO_WIN), intx_gsi="16")
    old = PciEcho(host, **params)
    old.start()
    old.write(Space.MMIO, BAR_REGS, REG_RAISE, 4, 0)                # INTx: MSI-X is off
    assert host.log == [("intx", 16)]
    state = old.snapshot()
    new_host, new = restart(registry, PciEcho, state, **params)
    assert new_host.log == []
    assert new.read(Space.MMIO, BAR_REGS, REG_ACK, 4) == 1
    assert cfg_r(new, cfg.PCI_STATUS, 2) & cfg.PCI_STATUS_INTERRUPT
    assert new.read(Space.MMIO, BAR_REGS, REG_INTX_SENT, 4) == 1
    new.write(Space.MMIO, BAR_REGS, REG_RAISE, 4, 0)                # still set: no new edge
    assert new_host.log == []
    new.write(Space.MMIO, BAR_REGS, REG_ACK, 4, 0)
    new.write(Space.MMIO, BAR_REGS, REG_RAISE, 4, 0)
    assert new_host.log == [("intx", 16)]
    new.stop()


def test_pci_echo_hostile_snapshots(registry):
    _, old = pci_echo_in_use(registry)
    state = old.snapshot()
    old.stop()
    params = dict(slot="3", mmio_window=hex(MMIO_WIN), io_window=hex(IO_WIN), intx_gsi="19")

    def fresh(dev):
        assert cfg_r(dev, cfg.PCI_BASE_ADDRESS_0) == MMIO_WIN
        assert dev.read(Space.MMIO, BAR_MSIX, MSIX_PBA, 8) == 0

    assert refuses_all(registry, PciEcho, state, fresh, **params) > 100


def _config_with(state, offset, size, value):
    config = bytearray(state["config"])
    config[offset:offset + size] = value.to_bytes(size, "little")
    return {**state, "config": bytes(config)}


@pytest.mark.parametrize("bad", ["vendor", "bar_flags", "intx_status", "msix_qsize", "mapped_misaligned",
                                 "mapped_and_conflict", "mapped_decode_off", "overlap", "msix_reserved",
                                 "pending_beyond", "bars_shape", "msix_missing"])
def test_pci_echo_inconsistent_snapshots(registry, bad):
    _, old = pci_echo_in_use(registry)
    state = old.snapshot()
    old.stop()
    cap = msix_cap(old)
    bars = [dict(b) if b else b for b in state["bars"]]
    if bad == "vendor":
        state = _config_with(state, cfg.PCI_VENDOR_ID, 2, 0x8086)
    elif bad == "bar_flags":
        state = _config_with(state, cfg.PCI_BASE_ADDRESS_0, 4, 0xE020_0008)    # prefetchable
    elif bad == "intx_status":
        state = _config_with(state, cfg.PCI_STATUS, 2, cfg.PCI_STATUS_CAP_LIST | cfg.PCI_STATUS_INTERRUPT)
    elif bad == "msix_qsize":
        state = _config_with(state, cap + cfg.PCI_MSIX_FLAGS, 2, 0x8000 | 63)
    elif bad == "mapped_misaligned":
        bars[BAR_REGS]["mapped"] = 0xE020_0800
    elif bad == "mapped_and_conflict":
        bars[BAR_REGS]["conflict"] = 0xE030_0000
    elif bad == "mapped_decode_off":
        state = _config_with(state, cfg.PCI_COMMAND, 2, 0x4)
    elif bad == "overlap":
        bars[BAR_MSIX]["mapped"] = 0xE020_0000
    elif bad == "msix_reserved":
        table = bytearray(state["msix"]["table"])
        table[15] = 1
        state = {**state, "msix": {**state["msix"], "table": bytes(table)}}
    elif bad == "pending_beyond":
        state = {**state, "msix": {**state["msix"], "pending": 1 << 4}}
    elif bad == "bars_shape":
        bars[BAR_MSIX + 1] = {"mapped": None, "conflict": None}                # the upper half of BAR 2
    elif bad == "msix_missing":
        state = {**state, "msix": None}
    if bad in ("mapped_misaligned", "mapped_and_conflict", "overlap", "bars_shape"):
        state = {**state, "bars": bars}
    dev = PciEcho(KeptHost(registry, owner=9), slot="3", mmio_window=hex(MMIO_WIN), io_window=hex(IO_WIN),
                  intx_gsi="19")
    with pytest.raises(BadState):
        dev.restore(state)
    assert not dev.restored


def test_restore_is_for_a_fresh_model(registry):
    host, old = pci_echo_in_use(registry)
    with pytest.raises(BadState):
        old.restore(old.snapshot())
    old.stop()


@pytest.mark.parametrize("cls, params", [(Echo, ECHO), (Serial, {})])
def test_restore_after_start_is_refused(registry, cls, params):
    dev = cls(KeptHost(registry), **params)
    dev.start()
    with pytest.raises(BadState, match="freshly built"):
        dev.restore(dev.snapshot())
    dev.stop()
