"""The registry segment is hostile (issue 2, section 3; DESIGN.md, "Rules
for shared memory").

A device process may write anything anywhere in the segment, including the
header and the mutex.  The VMM side must never crash or hang, and must
never hand out a region outside the segment's slot table or a range that
wraps; after the VMM re-initialises the segment it works again.

* ``test_scribbler_vs_looker``: one process writes random bytes over the
  segment for 10 s while another does VMM-side lookups the whole time.
* ``test_attach_refuses_*``: attach() refuses a corrupted header.
* ``test_scribbled_mutex_*``: targeted versions of the ways the random run
  kills the looker through the mutex (see its doc).
* ``test_unregister_*``: an index entry changing between two reads of it
  (the double read in unregister fixed in eab6c0e; kept as a regression test).
"""

from __future__ import annotations

import collections
import mmap
import os
import random
import struct
import threading
import time
import zlib

import posix_ipc
import pytest

from ipc import Bus, LayoutError, Registry, RegionNotFound, RegistryError
from ipc._registry_c import lib
from tests.conftest import segment_name
from tests.ipc._children import child_ready, kill_all, spawn

U64_MAX = (1 << 64) - 1
SCRIBBLE_SECONDS = 10.0
CAPACITY = 256
RACE_SECONDS = 4.0


def map_segment(name: str) -> mmap.mmap:
    shm = posix_ipc.SharedMemory(name)
    try:
        return mmap.mmap(shm.fd, 0)
    finally:
        shm.close_fd()


def populate(reg: Registry) -> list[tuple[int, int, int]]:
    regions = []
    for k in range(120):
        bus = k % 3
        start = 0x1000 * (k // 3) + (0x10 if bus == Bus.PCI else 0)
        length = 0x100 + 0x10 * (k % 7)
        reg.register(bus, start, length, owner=1 + k % 5, cookie=k)
        regions.append((bus, start, length))
    return regions


def working(reg: Registry) -> None:
    """The registry does its job: register, get, put, unregister, check."""
    assert reg.check() == []
    reg.register(Bus.MMIO, 0xFEE00000, 0x1000, owner=9, cookie=77)
    reg.register(Bus.PIO, 0x3F8, 8, owner=9, cookie=78)
    with reg.get(Bus.MMIO, 0xFEE00010, 4) as ref:
        assert (ref.owner, ref.cookie, ref.offset, ref.length) == (9, 77, 0x10, 0x1000)
    ref = reg.get(Bus.PIO, 0x3FD)
    assert (ref.cookie, ref.offset) == (78, 5)
    reg.unregister(Bus.PIO, 0x3F8, owner=9)
    assert reg.get(Bus.PIO, 0x3F8) is None
    reg.put(ref)
    assert reg.unregister_owner(9) == 1
    assert reg.regions() == []
    assert reg.check() == []


# ---- the random scribbler against a looker ----------------------------------


def scribbler(name: str, seed: int, deadline: float) -> dict:
    """Child: write random data at random places until the deadline."""
    rng = random.Random(seed)
    mm = map_segment(name)
    size = len(mm)
    header_size = struct.unpack_from("=I", mm, 12)[0] or 256
    header_size = min(header_size, size)
    # The registry as it was, to write back in pieces: keeps much of the
    # segment plausible, so the looker meets valid-looking tables with
    # wrong parts rather than only noise.
    image = bytes(mm)
    writes = 0
    child_ready()
    while time.monotonic() < deadline:
        for _ in range(500):
            # One write in ten lands in the header (magic, sizes, counts,
            # the mutex); the rest anywhere, slots and index included.
            if rng.random() < 0.1:
                off = rng.randrange(header_size)
            else:
                off = rng.randrange(size)
            n = min(rng.choice((1, 2, 4, 4, 8, 8, 16, 64, 256)), size - off)
            what = rng.random()
            if what < 0.35:
                data = image[off:off + n]              # an old, valid piece
            elif what < 0.60:
                data = rng.randbytes(n)
            elif what < 0.75:
                data = bytes(n)                      # zeros: free states, unlocked lock
            elif what < 0.80:
                data = b"\xff" * n
            else:
                # Plausible small numbers: slot numbers near the capacity,
                # states, counts.
                words = [rng.choice((0, 1, 2, 3, CAPACITY - 1, CAPACITY, rng.randrange(2 * CAPACITY)))
                         for _ in range((n + 3) // 4)]
                data = struct.pack(f"<{len(words)}I", *words)[:n]
            mm[off:off + n] = data
            writes += 1
    mm.close()
    return {"writes": writes}


def looker(name: str, seed: int, deadline: float, regions: list) -> dict:
    """Child: VMM-side lookups until the deadline; never crash."""
    rng = random.Random(seed)
    reg = Registry.attach(name, lock_timeout=0.05)
    cap = reg.capacity
    counts = collections.Counter()
    violations = []
    child_ready()

    def bad(msg):
        if len(violations) < 20:
            violations.append(msg)

    while time.monotonic() < deadline:
        for _ in range(100):
            counts["lookups"] += 1
            bus = rng.randrange(3)
            r = rng.random()
            if r < 0.8:
                _, start, length = regions[rng.randrange(len(regions))]
                addr = start + rng.randrange(length + 0x10)
            elif r < 0.9:
                addr = rng.randrange(1 << 64)
            else:
                addr = U64_MAX - rng.randrange(16)
            size = rng.choice((1, 2, 4, 8))
            if addr + size - 1 > U64_MAX:
                size = 1
            try:
                ref = reg.get(bus, addr, size)
            except RegistryError as e:
                counts[type(e).__name__] += 1
                continue
            if ref is None:
                counts["miss"] += 1
                continue
            counts["hit"] += 1
            if not 0 <= ref.slot < cap:
                bad(f"slot out of range: {ref!r}")
            if ref.length == 0 or ref.start + ref.length - 1 > U64_MAX:
                bad(f"empty or wrapping region: {ref!r}")
            if not (ref.start <= addr and addr + size <= ref.start + ref.length):
                bad(f"{addr:#x}+{size} outside {ref!r}")
            if ref.offset != addr - ref.start:
                bad(f"offset of {ref!r} for {addr:#x}")
            try:
                reg.put(ref)
                counts["put"] += 1
            except RegistryError as e:
                counts["put_" + type(e).__name__] += 1
        # The VMM's other readers and its reaper, now and then.
        r = rng.random()
        try:
            if r < 0.1:
                counts["check_problems"] += len(reg.check())
            elif r < 0.15:
                reg.regions()
            elif r < 0.2:
                reg.repair()
            elif r < 0.25:
                reg.unregister_owner(rng.randrange(1, 7))
        except RegistryError as e:
            counts["other_" + type(e).__name__] += 1
    reg.close()
    return {"counts": dict(counts), "violations": violations}


def test_scribbler_vs_looker():
    name = segment_name("hostile")
    reg = Registry.create(name, capacity=CAPACITY)
    children = []
    try:
        regions = populate(reg)
        start = time.monotonic()
        look = spawn(looker, name, 1, start + SCRIBBLE_SECONDS + 0.5, regions)
        children.append(look)
        look.wait_ready(timeout=20)
        scrib = spawn(scribbler, name, 2, start + SCRIBBLE_SECONDS + 0.3)
        children.append(scrib)
        scrib.wait_ready(timeout=20)

        scrib.wait(timeout=SCRIBBLE_SECONDS + 30)
        look.wait(timeout=SCRIBBLE_SECONDS + 30)
        assert scrib.exitcode == 0, scrib.describe()
        assert look.exitcode == 0, f"the looker crashed: {look.describe()}"
        out = look.result()
        print("scribbler:", scrib.result(), "looker:", out["counts"])
        assert out["violations"] == []
        assert scrib.result()["writes"] > 10000
        assert out["counts"]["lookups"] > 1000

        # Nothing uses the segment any more: the VMM formats it again.
        kill_all(children)
        reg.reinitialize()
        working(reg)
        # And a device can attach to it again.
        with Registry.attach(name) as dev:
            dev.register(Bus.PIO, 0x60, 1, owner=3)
            with reg.get(Bus.PIO, 0x60) as ref:
                assert ref.owner == 3
            assert dev.unregister_owner(3) == 1
        assert reg.regions() == [] and reg.check() == []
    finally:
        kill_all(children)
        reg.close()
        reg.unlink()


# ---- attach refuses what it does not understand -----------------------------

# Header fields (offset, struct format) ahead of everything else in the
# layout: magic, version, header size, slot size, capacity, number of
# buses, slots offset, index offset, total size.
HEADER_FIELDS = {
    "magic": (0, "=Q"),
    "version": (8, "=I"),
    "header_size": (12, "=I"),
    "slot_size": (16, "=I"),
    "capacity": (20, "=I"),
    "nbus": (24, "=I"),
    "slots_offset": (32, "=Q"),
    "index_offset": (40, "=Q"),
    "total_size": (48, "=Q"),
}


@pytest.fixture
def closed_segment(registry_name):
    """A registry of capacity 64, closed again: only the segment is left."""
    reg = Registry.create(registry_name, capacity=64)
    reg.register(Bus.PIO, 0x60, 1, owner=1)
    reg.close()
    return registry_name


@pytest.mark.parametrize("field", sorted(HEADER_FIELDS))
@pytest.mark.parametrize("how", ["plus_one", "random"])
def test_attach_refuses_a_corrupted_header_field(closed_segment, field, how):
    mm = map_segment(closed_segment)
    try:
        off, fmt = HEADER_FIELDS[field]
        (old,) = struct.unpack_from(fmt, mm, off)
        width = struct.calcsize(fmt) * 8
        if how == "plus_one":
            new = (old + 1) % (1 << width)
        else:
            new = random.Random(zlib.crc32(field.encode())).randrange(1 << width)
            if new == old:
                new ^= 1
        struct.pack_into(fmt, mm, off, new)
        with pytest.raises(LayoutError):
            Registry.attach(closed_segment)
        struct.pack_into(fmt, mm, off, old)
        with Registry.attach(closed_segment) as reg:   # intact again
            assert [r.start for r in reg.regions()] == [0x60]
    finally:
        mm.close()


def test_attach_refuses_garbage_zeros_and_short_segments(closed_segment):
    mm = map_segment(closed_segment)
    size = len(mm)
    try:
        mm[0:256] = random.Random(5).randbytes(256)
        with pytest.raises(LayoutError):
            Registry.attach(closed_segment)
        mm[:] = bytes(size)
        with pytest.raises(LayoutError):
            Registry.attach(closed_segment)
    finally:
        mm.close()
    # A segment too short for a header, and one cut short of its slots.
    for length in (0, 16, size // 2):
        shm = posix_ipc.SharedMemory(closed_segment)
        try:
            os.ftruncate(shm.fd, length)
        finally:
            shm.close_fd()
        with pytest.raises(LayoutError):
            Registry.attach(closed_segment)
    with pytest.raises(LayoutError):
        Registry.attach(segment_name("absent"))


# ---- targeted: the lock word and its robust-list node -----------------------


def find_lock_word(reg: Registry, mm: mmap.mmap) -> int:
    """Offset of the registry's lock word in the segment.

    Found from what it looks like while a thread (not the main one, so its
    thread id differs from the process id) holds it: the word holds the
    thread id (the robust-futex protocol), and 32 bytes on sits the node the
    kernel walks, which points back into this thread's robust list."""
    found = []
    header_size = struct.unpack_from("=I", mm, 12)[0]

    def hold():
        assert lib.svm_reg_lock_for_test(reg._h, 10**9) == 0
        tid = threading.get_native_id()
        for off in range(0, header_size - 4, 4):
            if struct.unpack_from("=I", mm, off)[0] == tid:
                found.append(off)
        lib.svm_reg_unlock_for_test(reg._h)

    t = threading.Thread(target=hold)
    t.start()
    t.join(10)
    assert len(found) == 1, found
    return found[0]


def dead_pid() -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def lookup_under_scribbled_lock(name: str, word_off: int, area: bytes) -> list:
    """Child: the VMM has the segment mapped; a device writes the 64 bytes
    of the lock (word, robust-list node) with ``area``; the VMM looks an
    address up three times.  Any RegistryError is fine; dying is not."""
    reg = Registry.attach(name, lock_timeout=0.05)
    mm = map_segment(name)
    mm[word_off:word_off + len(area)] = area
    outcome = []
    for _ in range(3):
        try:
            ref = reg.get(Bus.PIO, 0x60)
            outcome.append("hit" if ref is not None else "miss")
            if ref is not None:
                reg.put(ref)
        except RegistryError as e:
            outcome.append(type(e).__name__)
    return outcome


FUTEX_WAITERS = 0x80000000
FUTEX_OWNER_DIED = 0x40000000


def _area(word: int, node: int = 0, fill: int = 0) -> bytes:
    body = bytearray(struct.pack("=I", word) + bytes([fill]) * 60)
    struct.pack_into("=Q", body, 32, node)
    return bytes(body)


# What a device may write over the lock.  The first five are pthread_mutex_t
# images (glibc __kind values PSHARED 0x80, ROBUST 0x10, PI 0x20, PP 0x40,
# ELISION 0x100 at byte 16) that crashed the VMM while the registry used a
# glibc robust mutex: glibc took its code path from the shared kind (SIGILL
# on the lock-elision path, SIGABRT on PP/PI asserts).  The rest attack the
# futex protocol itself.
SCRIBBLED_LOCK = {
    "glibc elision kind": struct.pack("=IIiIi", 0, 0, 0, 0, 0x180) + bytes(44),
    "glibc priority-protect kind": struct.pack("=IIiIi", 0, 0, 0, 0, 0xC0) + bytes(44),
    "glibc PP kind, owner died": struct.pack("=IIiIi", FUTEX_OWNER_DIED | 12345, 0, 12345, 0, 0xC0) + bytes(44),
    "glibc PI kind, owner died": struct.pack("=IIiIi", FUTEX_OWNER_DIED | 12345, 0, 12345, 0, 0xA0) + bytes(44),
    "glibc PI robust kind, owner gone": "dead-pthread",
    "held by a dead thread": "dead",
    "owner died": _area(FUTEX_OWNER_DIED),
    "owner died, waiters": _area(FUTEX_OWNER_DIED | FUTEX_WAITERS),
    "all ones": b"\xff" * 64,
    "wild node pointer": _area(0, node=0xDEADBEEF000, fill=0xA5),
    "node points at itself": "self-node",
}


@pytest.mark.parametrize("case", list(SCRIBBLED_LOCK))
def test_scribbled_lock_does_not_kill_the_vmm(registry_name, case):
    """The device writes over the lock word and the robust-list node.  The
    VMM's lookup must end with a result or an error (LockTimeout when the
    word names a holder that never lets go), never with a signal, and the
    registry must work after reinitialisation."""
    area = SCRIBBLED_LOCK[case]
    if area == "dead":
        area = _area(dead_pid())
    elif area == "dead-pthread":
        pid = dead_pid()
        area = struct.pack("=IIiIi", pid, 0, pid, 0, 0xB0) + bytes(44)
    reg = Registry.create(registry_name, capacity=16)
    child = None
    try:
        reg.register(Bus.PIO, 0x60, 1, owner=1)
        mm = map_segment(registry_name)
        off = find_lock_word(reg, mm)
        mm.close()
        if area == "self-node":
            area = _area(0, node=lib.svm_reg_base(reg._h) + off + 32)
        child = spawn(lookup_under_scribbled_lock, registry_name, off, area)
        child.wait(timeout=30)
        assert child.signaled is None, f"{case}: the VMM's lookup died: {child.describe()}"
        assert child.exitcode == 0, child.describe()
        reg.reinitialize()
        working(reg)
    finally:
        if child is not None:
            child.kill()
        reg.close()
        reg.unlink()


def test_owner_died_word_recovers_without_reinit(registry_name):
    """A word with FUTEX_OWNER_DIED and no holder is what the kernel leaves
    when a holder dies: the next locker rebuilds and carries on."""
    with Registry.create(registry_name, capacity=16) as reg:
        reg.register(Bus.PIO, 0x60, 1, owner=1)
        mm = map_segment(registry_name)
        off = find_lock_word(reg, mm)
        before = reg.recoveries
        struct.pack_into("=I", mm, off, FUTEX_OWNER_DIED)
        mm.close()
        with reg.get(Bus.PIO, 0x60) as ref:
            assert ref.owner == 1
        assert reg.recoveries == before + 1
        assert reg.check() == []
        reg.unlink()


# ---- targeted: an index entry changing under unregister ---------------------


def unregister_loop(name: str, deadline: float) -> int:
    """Child: keep trying to unregister a region that is not ours.  The
    region is found, then the owner check fails: no mutation, ever."""
    reg = Registry.attach(name, lock_timeout=1.0)
    n = 0
    child_ready()
    while time.monotonic() < deadline:
        for _ in range(1000):
            try:
                reg.unregister(Bus.PIO, 0x100, owner=2)
            except RegionNotFound:
                pass
            n += 1
    return n


def test_unregister_survives_an_index_entry_changing_under_it(registry_name):
    """A device flips the first PIO index entry between the right slot and
    a slot number far outside the table while the VMM unregisters.
    Every index entry read from the segment must be bounds-checked where
    it is used; a second, unchecked read of the same entry lets the device
    point the VMM at memory outside the mapping."""
    reg = Registry.create(registry_name, capacity=64)
    child = None
    try:
        reg.register(Bus.PIO, 0x100, 0x10, owner=1)
        (rec,) = reg.regions()
        mm = map_segment(registry_name)
        index_off = struct.unpack_from("=Q", mm, 40)[0]
        assert struct.unpack_from("=I", mm, index_off)[0] == rec.slot
        good, evil = struct.pack("=I", rec.slot), struct.pack("=I", 0x7FFFFFFF)
        deadline = time.monotonic() + RACE_SECONDS
        child = spawn(unregister_loop, registry_name, deadline)
        child.wait_ready(timeout=20)
        while child.alive and time.monotonic() < deadline + 1:
            for _ in range(5000):
                mm[index_off:index_off + 4] = evil
                mm[index_off:index_off + 4] = good
        mm.close()
        child.wait(timeout=30)
        assert child.signaled is None, f"the VMM's unregister died: {child.describe()}"
        assert child.exitcode == 0 and child.result() > 1000, child.describe()
        assert reg.check() == []
        (after,) = reg.regions()
        assert after == rec
        working_after = reg.unregister_owner(1)
        assert working_after == 1 and reg.regions() == []
    finally:
        if child is not None:
            child.kill()
        reg.close()
        reg.unlink()
