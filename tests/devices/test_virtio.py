"""virtio-pci transport and split virtqueues against a real mmap'd buffer
acting as guest RAM, with PROT_NONE guard pages around it: a device access
outside guest RAM would kill this process.  Hostile rings (addresses out
of RAM or across a hole, loops, huge lengths, runaway indices, bad heads,
random garbage) fail the request or set DEVICE_NEEDS_RESET; the device
keeps working after a reset."""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import struct
import time

import pytest

from devices.base import DeviceHost, Space
from devices.guestmem import GuestMemoryFault, GuestRam, RamRange
from devices.virtio import pci as vp
from devices.virtio import spec as vs
from devices.virtio.rng import VirtioRng
from devices.virtio.virtqueue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, Virtqueue

PAGE = mmap.PAGESIZE
LOW = 0x10_0000          # RAM 0 .. 1 MiB
HIGH = 0x20_0000         # and 2 MiB .. 2.25 MiB (a hole between)
HIGH_SIZE = 0x4_0000
DESC, AVAIL, USED, BUF = 0x1000, 0x2000, 0x3000, 0x8000
QSIZE = 8


class GuardedRam:
    """Guest RAM in one mapping with inaccessible pages before, between
    and after the regions."""

    def __init__(self):
        self.size = PAGE + LOW + PAGE + HIGH_SIZE + PAGE
        self.map = mmap.mmap(-1, self.size)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        libc = ctypes.CDLL(None, use_errno=True)
        for off in (0, PAGE + LOW, PAGE + LOW + PAGE + HIGH_SIZE):
            assert libc.mprotect(ctypes.c_void_p(base + off), PAGE, 0) == 0   # PROT_NONE
        self.ram = GuestRam(self.map, [RamRange(0, LOW, PAGE), RamRange(HIGH, HIGH_SIZE, PAGE + LOW + PAGE)])


class FakeVector:
    def __init__(self, log, index):
        self.log, self.index = log, index

    def program(self, address, data):
        pass

    def unprogram(self):
        pass

    def trigger(self):
        self.log.append(("msi", self.index))


class FakeLine:
    def __init__(self, log):
        self.log = log

    def trigger(self):
        self.log.append(("intx",))


class FakeHost(DeviceHost):
    def __init__(self, ram):
        self.ram = ram
        self.log = []

    def claim(self, space, start, length, cookie=0):
        pass

    def release(self, space, start):
        pass

    def process_id(self):
        return 1

    def guest_memory(self):
        return self.ram

    def irq_line(self, gsi):
        return FakeLine(self.log)

    def msi_vector(self, index):
        return FakeVector(self.log, index)


@pytest.fixture
def rng(guarded):
    dev = VirtioRng(FakeHost(guarded.ram), slot="3", intx_gsi="19")
    dev.start()
    yield dev
    dev.stop()


def common_w(dev, off, size, value):
    dev.write(Space.MMIO, vp.BAR_VIRTIO, vp.COMMON_OFFSET + off, size, value)


def common_r(dev, off, size):
    return dev.read(Space.MMIO, vp.BAR_VIRTIO, vp.COMMON_OFFSET + off, size)


def negotiate(dev, features_hi=1):
    common_w(dev, vs.VIRTIO_PCI_COMMON_STATUS, 1, 0)
    common_w(dev, vs.VIRTIO_PCI_COMMON_STATUS, 1, vs.VIRTIO_CONFIG_S_ACKNOWLEDGE | vs.VIRTIO_CONFIG_S_DRIVER)
    common_w(dev, vs.VIRTIO_PCI_COMMON_DFSELECT, 4, 1)
    assert common_r(dev, vs.VIRTIO_PCI_COMMON_DF, 4) & 1       # VERSION_1
    common_w(dev, vs.VIRTIO_PCI_COMMON_GFSELECT, 4, 1)
    common_w(dev, vs.VIRTIO_PCI_COMMON_GF, 4, features_hi)
    common_w(dev, vs.VIRTIO_PCI_COMMON_STATUS, 1, 0xB)
    return common_r(dev, vs.VIRTIO_PCI_COMMON_STATUS, 1)


def setup_queue(dev, desc=DESC, avail=AVAIL, used=USED, size=QSIZE):
    common_w(dev, vs.VIRTIO_PCI_COMMON_Q_SELECT, 2, 0)
    assert common_r(dev, vs.VIRTIO_PCI_COMMON_Q_SIZE, 2) == dev.queues[0].max_size
    common_w(dev, vs.VIRTIO_PCI_COMMON_Q_SIZE, 2, size)
    common_w(dev, vs.VIRTIO_PCI_COMMON_Q_DESCLO, 4, desc & 0xFFFF_FFFF)
    common_w(dev, vs.VIRTIO_PCI_COMMON_Q_DESCHI, 4, desc >> 32)
    common_w(dev, vs.VIRTIO_PCI_COMMON_Q_AVAILLO, 4, avail & 0xFFFF_FFFF)
    common_w(dev, vs.VIRTIO_PCI_COMMON_Q_AVAILHI, 4, avail >> 32)
    common_w(dev, vs.VIRTIO_PCI_COMMON_Q_USEDLO, 4, used & 0xFFFF_FFFF)
    common_w(dev, vs.VIRTIO_PCI_COMMON_Q_USEDHI, 4, used >> 32)
    common_w(dev, vs.VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1)


def ready(dev):
    assert negotiate(dev) == 0xB
    setup_queue(dev)
    common_w(dev, vs.VIRTIO_PCI_COMMON_STATUS, 1, 0xF)
    assert common_r(dev, vs.VIRTIO_PCI_COMMON_STATUS, 1) == 0xF


def put_desc(ram, i, addr, length, flags, nxt=0):
    ram.write(DESC + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))


def offer(ram, head, slot_idx=None):
    idx = ram.read_int(AVAIL + 2, 2)
    ram.write_int(AVAIL + 4 + 2 * (idx % QSIZE), 2, head)
    ram.write_int(AVAIL + 2, 2, idx + 1)


def notify(dev, q=0):
    dev.write(Space.MMIO, vp.BAR_VIRTIO, vp.NOTIFY_OFFSET + 4 * q, 2, q)


def used(ram):
    idx = ram.read_int(USED + 2, 2)
    elems = [struct.unpack("<II", ram.read(USED + 4 + 8 * (i % QSIZE), 8)) for i in range(idx)]
    return idx, elems


def status(dev):
    return common_r(dev, vs.VIRTIO_PCI_COMMON_STATUS, 1)


def test_guest_ram_bounds(guarded):
    ram = guarded.ram
    ram.write(LOW - 4, b"abcd")
    assert ram.read(LOW - 4, 4) == b"abcd"
    assert ram.read(HIGH, 4) == b"\0" * 4
    for addr, n in ((LOW - 3, 4), (LOW, 1), (HIGH - 1, 2), (HIGH + HIGH_SIZE - 1, 2), (-1, 1),
                    ((1 << 64) - 1, 2), (0, LOW + 1), (HIGH, 1 << 64)):
        assert not ram.contains(addr, n)
        with pytest.raises(GuestMemoryFault):
            ram.read(addr, n)
        with pytest.raises(GuestMemoryFault):
            ram.view(addr, n)
        if n <= 4:
            with pytest.raises(GuestMemoryFault):
                ram.write(addr, b"x" * n)


def test_pci_identity_and_capabilities(rng):
    c = rng.config
    assert c.get(0, 2) == 0x1AF4 and c.get(2, 2) == 0x1044 and c.get(8, 1) == 1
    seen = {}
    at = c.get(0x34, 1)
    while at:
        if c.get(at, 1) == vs.PCI_CAP_ID_VNDR:
            seen[c.get(at + 3, 1)] = (c.get(at + 4, 1), c.get(at + 8, 4), c.get(at + 12, 4), at)
        at = c.get(at + 1, 1)
    assert set(seen) == {1, 2, 3, 4, 5}
    assert seen[vs.VIRTIO_PCI_CAP_COMMON_CFG][:2] == (0, vp.COMMON_OFFSET)
    assert c.get(seen[vs.VIRTIO_PCI_CAP_NOTIFY_CFG][3] + 16, 4) == vp.NOTIFY_OFF_MULTIPLIER
    assert common_r(rng, vs.VIRTIO_PCI_COMMON_NUMQ, 2) == 1


def test_rng_request_and_interrupt(rng, guarded):
    ram = guarded.ram
    ready(rng)
    put_desc(ram, 0, BUF, 64, VIRTQ_DESC_F_WRITE)
    offer(ram, 0)
    notify(rng)
    idx, elems = used(ram)
    assert idx == 1 and elems[0] == (0, 64)
    data = ram.read(BUF, 64)
    assert len(set(data)) > 8
    assert ("intx",) in rng.host.log            # MSI-X off: INTx
    assert rng.read(Space.MMIO, vp.BAR_VIRTIO, vp.ISR_OFFSET, 1) == vs.VIRTIO_PCI_ISR_QUEUE
    assert rng.read(Space.MMIO, vp.BAR_VIRTIO, vp.ISR_OFFSET, 1) == 0
    assert rng.notifies_mmio == 1
    # a chain across both RAM regions
    put_desc(ram, 1, LOW - 16, 16, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 2)
    put_desc(ram, 2, HIGH, 16, VIRTQ_DESC_F_WRITE)
    offer(ram, 1)
    notify(rng)
    assert used(ram)[1][1] == (1, 32)


def test_features_without_version_1_refused(rng):
    assert negotiate(rng, features_hi=0) & vs.VIRTIO_CONFIG_S_FEATURES_OK == 0
    assert negotiate(rng, features_hi=3) & vs.VIRTIO_CONFIG_S_FEATURES_OK == 0   # not offered
    assert negotiate(rng, features_hi=1) & vs.VIRTIO_CONFIG_S_FEATURES_OK


@pytest.mark.parametrize("bad", ["out_of_ram", "hole", "huge", "wrap", "loop", "next_range", "indirect",
                                 "read_after_write"])
def test_bad_chain_fails_only_that_request(rng, guarded, bad):
    ram = guarded.ram
    ready(rng)
    if bad == "out_of_ram":
        put_desc(ram, 0, LOW + 0x100, 16, VIRTQ_DESC_F_WRITE)
    elif bad == "hole":
        put_desc(ram, 0, LOW - 8, 16, VIRTQ_DESC_F_WRITE)
    elif bad == "huge":
        put_desc(ram, 0, BUF, 0xFFFF_FFFF, VIRTQ_DESC_F_WRITE)
    elif bad == "wrap":
        put_desc(ram, 0, (1 << 64) - 8, 16, VIRTQ_DESC_F_WRITE)
    elif bad == "loop":
        put_desc(ram, 0, BUF, 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1)
        put_desc(ram, 1, BUF, 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 0)
    elif bad == "next_range":
        put_desc(ram, 0, BUF, 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, QSIZE)
    elif bad == "indirect":
        put_desc(ram, 0, BUF, 16, 4)
    elif bad == "read_after_write":
        put_desc(ram, 0, BUF, 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1)
        put_desc(ram, 1, BUF, 8, 0)
    offer(ram, 0)
    notify(rng)
    assert used(ram)[1] == [(0, 0)]
    assert rng.queues[0].failed == 1
    assert status(rng) == 0xF                  # still running
    put_desc(ram, 3, BUF, 8, VIRTQ_DESC_F_WRITE)
    offer(ram, 3)
    notify(rng)
    assert used(ram)[1][1] == (3, 8)


@pytest.mark.parametrize("bad", ["avail_idx", "head"])
def test_broken_ring_needs_reset(rng, guarded, bad):
    ram = guarded.ram
    ready(rng)
    put_desc(ram, 0, BUF, 8, VIRTQ_DESC_F_WRITE)
    if bad == "avail_idx":
        ram.write_int(AVAIL + 2, 2, QSIZE + 1)          # more than size ahead
    else:
        ram.write_int(AVAIL + 4, 2, QSIZE)              # head out of range
        ram.write_int(AVAIL + 2, 2, 1)
    notify(rng)
    assert status(rng) & vs.VIRTIO_CONFIG_S_NEEDS_RESET
    assert used(ram)[0] == 0
    assert rng.read(Space.MMIO, vp.BAR_VIRTIO, vp.ISR_OFFSET, 1) & vs.VIRTIO_PCI_ISR_CONFIG
    notify(rng)                                          # ignored until reset
    ram.write(AVAIL, bytes(64))
    ram.write(USED, bytes(128))
    ready(rng)                                           # reset, then works again
    offer(ram, 0)
    notify(rng)
    assert used(ram)[1] == [(0, 8)]


@pytest.mark.parametrize("where", [dict(desc=LOW - 64), dict(avail=LOW + 0x10000), dict(used=0x3001),
                                   dict(desc=0x1008), dict(size=3)])
def test_unusable_queue_layout_needs_reset(rng, where):
    assert negotiate(rng) == 0xB
    setup_queue(rng, **where)
    assert status(rng) & vs.VIRTIO_CONFIG_S_NEEDS_RESET
    assert not rng.queues[0].enabled


def test_msix_vector_mapping_failure_reads_no_vector(rng):
    common_w(rng, vs.VIRTIO_PCI_COMMON_Q_MSIX, 2, 99)
    assert common_r(rng, vs.VIRTIO_PCI_COMMON_Q_MSIX, 2) == vs.VIRTIO_MSI_NO_VECTOR
    common_w(rng, vs.VIRTIO_PCI_COMMON_Q_MSIX, 2, 1)
    assert common_r(rng, vs.VIRTIO_PCI_COMMON_Q_MSIX, 2) == 1
    common_w(rng, vs.VIRTIO_PCI_COMMON_Q_SELECT, 2, 5)
    assert common_r(rng, vs.VIRTIO_PCI_COMMON_Q_SIZE, 2) == 0


def test_random_garbage_rings(rng, guarded):
    # Seeded garbage in the descriptor table and both rings, many notifies:
    # the device never raises and never touches the guard pages.
    ram = guarded.ram
    r = random.Random(1234)
    handled = broken = 0
    for _round in range(200):
        ram.write(AVAIL, bytes(6 + 2 * QSIZE))
        ready(rng)
        ram.write(DESC, r.randbytes(16 * QSIZE))
        for i in range(QSIZE):            # descriptors near the edges of RAM, mostly
            if r.random() < 0.7:
                addr = r.choice([0, BUF, LOW - 64, LOW, HIGH - 8, HIGH, HIGH + HIGH_SIZE - 32,
                                 (1 << 64) - 16, r.getrandbits(64)])
                put_desc(ram, i, addr, r.choice([0, 1, 32, 64, 4096, 0xFFFF_FFFF]),
                         r.getrandbits(3), r.randrange(QSIZE + 2))
        ram.write(AVAIL, r.randbytes(6 + 2 * QSIZE))
        if r.random() < 0.8:
            ram.write_int(AVAIL + 2, 2, r.randrange(QSIZE + 1))
            for i in range(QSIZE):
                ram.write_int(AVAIL + 4 + 2 * i, 2, r.randrange(QSIZE + 1))
        ram.write(USED, bytes(6 + 8 * QSIZE))
        for _ in range(3):
            notify(rng)
        handled += rng.queues[0].served + rng.queues[0].failed
        broken += bool(status(rng) & vs.VIRTIO_CONFIG_S_NEEDS_RESET)
    assert handled > 50 and 0 < broken < 200


def test_virtqueue_pop_bounds_direct(guarded):
    ram = guarded.ram
    q = Virtqueue(0, 8)
    q.desc, q.driver, q.device = DESC, AVAIL, USED
    assert q.check_layout(ram) is None
    q.desc = LOW - 16
    assert "not in guest RAM" in q.check_layout(ram)


def test_used_idx_is_one_store_a_polling_driver_never_sees_zero():
    # A driver polls used->idx while the device publishes (virtio 1.2
    # §2.7.8); the index must go from one value to the next in one store.
    # struct.pack_into zeroes its bytes before writing them: a driver
    # polling the field saw 0, took it for new completions and read used
    # elements never written (test_bar_moved_while_the_other_vcpu_does_io
    # failed so when a batch's index was stored twice).  Here a forked
    # child polls the field of a shared mapping while this process pushes
    # 50,000 completions; the index runs 2..50001, so 0 is only ever a
    # torn store.
    size = 0x10000
    shared = mmap.mmap(-1, size)                  # MAP_SHARED: the child sees the stores
    ram = GuestRam(shared, [RamRange(0, size, 0)])
    q = Virtqueue(0, 8)
    q.desc, q.driver, q.device = DESC, AVAIL, USED
    assert q.check_layout(ram) is None
    q.used_idx = 1
    ram.write_int(USED + 2, 2, 1)                 # (a fresh mapping holds 0)
    words = memoryview(shared).cast("Q")
    RUNNING, STOP, ZEROS, READS, CHANGES = range(5)        # the child's report, words at the end
    base = size // 8 - 8
    pid = os.fork()
    if pid == 0:                                  # the polling driver
        try:
            u16 = memoryview(shared).cast("H")
            at, zeros, reads, changes, last = (USED + 2) // 2, 0, 0, 0, -1
            words[base + RUNNING] = 1
            while not words[base + STOP]:
                v = u16[at]
                reads += 1
                if v != last:
                    changes += 1
                    last = v
                    zeros += v == 0
            words[base + ZEROS], words[base + READS], words[base + CHANGES] = zeros, reads, changes
        finally:
            os._exit(0)
    try:
        deadline = time.monotonic() + 30
        while not words[base + RUNNING]:
            assert time.monotonic() < deadline, "the polling child did not start"
            os.sched_yield()
        for _ in range(50_000):
            q.push(ram, 0, 1)
    finally:
        words[base + STOP] = 1
        _, st = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(st) == 0
    assert words[base + READS] > 0
    assert words[base + ZEROS] == 0, f"the driver saw used->idx 0 {words[base + ZEROS]} times " \
        f"in {words[base + READS]} reads"
    words.release()
    ram.release()
