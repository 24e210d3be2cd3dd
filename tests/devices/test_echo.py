"""The echo model on its own, against a recording host (the same behaviour
is shown through real KVM and real device processes in tests/vmm)."""

from __future__ import annotations

import pytest

from devices.base import BadParameter, DeviceHost, RegionBusy, Space
from devices.echo import ECHO_COUNT, ECHO_MOVE, ECHO_PID, Echo


class RecordingHost(DeviceHost):
    def __init__(self, refuse: set[int] = frozenset()):
        self.regions: dict[tuple[Space, int], tuple[int, int]] = {}
        self.refuse = refuse

    def claim(self, space, start, length, cookie=0):
        if start in self.refuse:
            raise RegionBusy("overlap")
        assert (space, start) not in self.regions
        self.regions[(space, start)] = (length, cookie)

    def release(self, space, start):
        del self.regions[(space, start)]

    def process_id(self):
        return 4242


def make(**params):
    host = RecordingHost()
    dev = Echo(host, **params)
    dev.start()
    return host, dev


def test_claims_both_windows():
    host, _ = make(pio="0x500", mmio="0xd0000000")
    assert host.regions == {(Space.PIO, 0x500): (0x100, 0), (Space.MMIO, 0xD0000000): (0x1000, 1)}


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_scratch_little_endian_shared_by_windows(size):
    _, dev = make(pio="0x500", mmio="0xd0000000")
    value = int.from_bytes(bytes(range(1, size + 1)), "little")
    dev.write(Space.MMIO, 1, 0x10, size, value)
    assert dev.read(Space.MMIO, 1, 0x10, size) == value
    assert dev.read(Space.PIO, 0, 0x10, 1) == 1
    if size <= 4:
        dev.write(Space.PIO, 0, 0x20, size, value)
        assert dev.read(Space.MMIO, 1, 0x20, size) == value


def test_registers_and_bad_accesses():
    _, dev = make(pio="0x500", mmio="0xd0000000")
    assert dev.read(Space.PIO, 0, ECHO_PID, 4) == 4242
    assert dev.read(Space.PIO, 0, ECHO_COUNT, 4) == 2
    assert dev.read(Space.PIO, 0, 0x00, 8) == (1 << 64) - 1  # no 8-byte port I/O
    assert dev.read(Space.MMIO, 1, 0x800, 4) == 0xFFFFFFFF    # past the register file
    assert dev.read(Space.PIO, 0, ECHO_MOVE, 4) == 0xFFFFFFFF  # write-only
    dev.write(Space.MMIO, 1, 0xEE, 4, 0x12345678)             # straddles the end of scratch
    assert dev.read(Space.MMIO, 1, 0xEE, 2) == 0


def test_move_relocates_own_window_and_keeps_registers():
    host, dev = make(pio="0x500", mmio="0xd0000000")
    dev.write(Space.MMIO, 1, 0, 4, 0xCAFE)
    dev.write(Space.MMIO, 1, ECHO_MOVE, 8, 0xD0001000)
    assert (Space.MMIO, 0xD0001000) in host.regions and (Space.MMIO, 0xD0000000) not in host.regions
    assert dev.read(Space.MMIO, 1, 0, 4) == 0xCAFE
    dev.write(Space.PIO, 0, ECHO_MOVE, 4, 0x580)  # overlaps the old window
    assert (Space.PIO, 0x580) in host.regions and (Space.PIO, 0x500) not in host.regions


def test_move_refused_keeps_old_window():
    host = RecordingHost(refuse={0x600})
    dev = Echo(host, pio="0x500")
    dev.start()
    dev.write(Space.PIO, 0, ECHO_MOVE, 4, 0x600)
    assert host.regions == {(Space.PIO, 0x500): (0x100, 0)}
    dev.write(Space.PIO, 0, ECHO_MOVE, 4, 0xFFFF)  # would not fit the port space
    assert dev.base[Space.PIO] == 0x500


@pytest.mark.parametrize("params", [{}, {"pio": "x"}, {"mmio": "0xd0000010"}, {"pio": "0xff80"}, {"pio": "1", "colour": "red"}])
def test_bad_parameters(params):
    with pytest.raises(BadParameter):
        Echo(RecordingHost(), **params)
