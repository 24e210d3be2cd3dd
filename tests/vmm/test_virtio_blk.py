"""virtio-blk on real KVM, inline and in a device process, driven by the
test guest tests/guests/virtio_blk.c: capacity, get-id, a pattern written,
flushed, read back in the guest and checked on the host image after the
VM is gone; read-only; data written and flushed before the device process
is SIGKILLed is in the image; broken requests and rings from a hostile
guest; and BAR 0 moved by one vCPU while the other keeps doing I/O on it."""

from __future__ import annotations

import struct

import pytest

from tests.vmm.conftest import GUEST_SOURCES, needs_kvm
from vmm import guests
from vmm.config import parse_device_spec
from vmm.machine import Machine
from vmm.outcome import Ending

pytestmark = needs_kvm

STATS = 0x80_0000
SECTORS = 2048          # 1 MiB
PLACEMENTS = ["isolated", "inline"]


@pytest.fixture(scope="session")
def blk_guest(guest_cache):
    return guests.build([GUEST_SOURCES / "virtio_blk.c", guests.HERE / "pci.c"], guest_cache)


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(b"\x5a" * (SECTORS * 512))
    return p


def pattern(seed: int, n: int) -> bytes:
    x, out = seed, bytearray()
    for _ in range(n):
        x = (x * 6364136223846793005 + 1442695040888963407) & (1 << 64) - 1
        out.append(x >> 56)
    return bytes(out)


def run(path, image, placement, vcpus=1, extra="", **args):
    args.setdefault("stats", hex(STATS))
    args.setdefault("sectors", SECTORS)
    with Machine(memory=32 << 20, vcpus=vcpus) as m:
        m.load_pvh(path, " ".join(f"{k}={v}" for k, v in args.items()))
        ep = m.add_device(parse_device_spec(f"virtio-blk,path={image},serial=disk-A,process={placement}{extra}"))
        outcome = m.run(timeout=50)
        stats = struct.unpack("<5Q", m.memory.read(STATS, 40))
        if outcome.value == 52:     # the guest's report of a request that never completed
            print("stuck: avail, used, status, doorbells by eventfd, by MMIO, BAR, mover done:",
                  struct.unpack("<7Q", m.memory.read(STATS + 80, 56)))
        ident = m.memory.read(STATS + 40, 20)
        failed = getattr(ep, "failed", None)
    return outcome, stats, ident, failed


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_write_flush_read_and_the_image(blk_guest, image, placement):
    outcome, stats, ident, failed = run(blk_guest, image, placement, start=100, count=8, seed=7)
    assert outcome.ending is Ending.POWER_OFF, str(outcome)
    assert stats[:3] == (0, 0, 1) and failed is None
    assert ident == b"disk-A".ljust(20, b"\0")
    data = image.read_bytes()
    assert data[100 * 512:108 * 512] == pattern(7, 8 * 512)
    assert data[:100 * 512] == b"\x5a" * (100 * 512) and data[108 * 512:] == b"\x5a" * ((SECTORS - 108) * 512)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_readonly(blk_guest, image, placement):
    outcome, stats, _ident, _failed = run(blk_guest, image, placement, extra=",readonly=on", readonly=1)
    assert outcome.ending is Ending.POWER_OFF, str(outcome)
    assert stats[0] == 1            # VIRTIO_BLK_S_IOERR
    assert image.read_bytes() == b"\x5a" * (SECTORS * 512)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_hostile_requests(blk_guest, image, placement):
    # Each broken request completes without S_OK and writes nothing to the
    # image; a head index out of range needs a reset; after it the device
    # works (a write, flush and read back), and neither it nor the VMM fails.
    outcome, stats, ident, failed = run(blk_guest, image, placement, start=100, count=4, seed=5,
                                        hostile=1000, ramtop=hex(32 << 20))
    assert outcome.ending is Ending.POWER_OFF, str(outcome)
    assert stats[:3] == (0, 0, 1) and failed is None
    assert ident == b"disk-A".ljust(20, b"\0")
    data = image.read_bytes()
    assert data[100 * 512:104 * 512] == pattern(5, 4 * 512)
    assert data[1000 * 512:1001 * 512] == b"\x5a" * 512


def test_flushed_data_survives_sigkill(blk_guest, image):
    # The device process is killed right after the guest's run (no clean
    # shutdown of the model): what was written and flushed is in the image.
    import os
    import signal

    with Machine(memory=32 << 20, vcpus=1) as m:
        m.load_pvh(blk_guest, f"sectors={SECTORS} start=5 count=16 seed=3 stats={STATS:#x}")
        ep = m.add_device(parse_device_spec(f"virtio-blk,path={image}"))
        outcome = m.run(timeout=50)
        assert outcome.ending is Ending.POWER_OFF, str(outcome)
        os.kill(ep.pid, signal.SIGKILL)
        assert ep.wait_exited(10)
    assert image.read_bytes()[5 * 512:21 * 512] == pattern(3, 16 * 512)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_bar_moved_while_the_other_vcpu_does_io(blk_guest, image, placement):
    # vCPU 1 moves BAR 0 back and forth 40 times (each move re-binds the
    # doorbell ioeventfd) while vCPU 0 writes, flushes and reads back.
    outcome, stats, _ident, failed = run(blk_guest, image, placement, vcpus=2,
                                         start=9, count=2, seed=11, mover=40, move=hex(0xE900_0000))
    assert outcome.ending is Ending.POWER_OFF, str(outcome)
    assert stats[0] == 0 and stats[1] == 0 and stats[2] >= 1 and failed is None
    assert stats[3] == 40
    assert image.read_bytes()[9 * 512:11 * 512] == pattern(11 + stats[2] - 1, 2 * 512)
