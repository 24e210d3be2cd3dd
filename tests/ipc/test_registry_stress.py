"""Multi-process stress of the registry (issue 2, section 3).

Four writer processes, each with its own owner id and its own handle
(attached by name), register and unregister random regions on a coarse
grid of starts, so that ranges overlap and registrations conflict all the
time.  Meanwhile two threads of the pytest process look random addresses
up and put the references back, some at once, some after holding them for
a while.  Every reference is checked:

* its cookie is the hash of the (owner, bus, start, length) it reports, so
  it was not stitched together from two tenants of a slot;
* the looked-up access lies inside the region;
* while it is held, an unlocked peek of its slot shows the same tenant
  (generation, start, length, owner, cookie) and a state that is not free:
  the slot was never freed or reused under it.

At the end every writer unregisters all its regions, every reference is
put, and the registry must be empty and consistent.
"""

from __future__ import annotations

import collections
import hashlib
import random
import struct
import threading
import time

from ipc import Bus, Registry, RegionConflict, RegionNotFound, RegistryFull
from ipc._registry_c import ffi, lib
from tests.conftest import segment_name
from tests.ipc._children import kill_all, spawn

RUN_SECONDS = 8.0
WRITERS = 4
READER_THREADS = 2
CAPACITY = 256
GRID = 0x100              # starts fall on this grid (plus a small skew)
CELLS = 40                # grid cells per bus
LENGTHS = (0x40, 0x100, 0x180, 0x300)
MAX_REGIONS_PER_WRITER = 20
HELD_MAX = 8              # references a reader thread keeps at once


def cookie_for(owner: int, bus: int, start: int, length: int) -> int:
    digest = hashlib.blake2b(struct.pack("<QQQQ", owner, int(bus), start, length), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def writer(name: str, owner: int, seed: int, deadline: float) -> dict:
    """Child process: churn this owner's regions until the deadline."""
    rng = random.Random(seed)
    reg = Registry.attach(name, lock_timeout=10.0)
    mine: dict[tuple[int, int], int] = {}
    stats = collections.Counter()
    buses = list(Bus)
    while time.monotonic() < deadline:
        for _ in range(50):
            r = rng.random()
            if mine and (len(mine) >= MAX_REGIONS_PER_WRITER or r < 0.40):
                key = rng.choice(list(mine))
                # Nobody else may unregister our regions: this must succeed.
                reg.unregister(key[0], key[1], owner)
                del mine[key]
                stats["unregistered"] += 1
            elif mine and r < 0.50:
                # Our own live region must resolve to exactly itself.
                (bus, start), length = rng.choice(list(mine.items()))
                ref = reg.get(bus, start + length - 1)
                assert ref is not None, f"own region {bus}:{start:#x} not found"
                assert (ref.owner, ref.start, ref.length) == (owner, start, length), ref
                assert ref.cookie == cookie_for(owner, bus, start, length), ref
                reg.put(ref)
                stats["own_gets"] += 1
            elif r < 0.505:
                n = reg.unregister_owner(owner)
                assert n == len(mine), (n, len(mine))
                stats["unregistered"] += n
                mine.clear()
            else:
                bus = rng.choice(buses)
                start = rng.randrange(CELLS) * GRID + rng.choice((0, 0, 0, 0x20, 0x80))
                length = rng.choice(LENGTHS)
                try:
                    reg.register(bus, start, length, owner, cookie_for(owner, bus, start, length))
                except RegionConflict:
                    stats["conflicts"] += 1
                except RegistryFull:
                    stats["full"] += 1
                else:
                    mine[(int(bus), start)] = length
                    stats["registered"] += 1
    n = reg.unregister_owner(owner)
    assert n == len(mine), (n, len(mine))
    stats["final_unregistered"] = n
    # Every one of them is out of the index now.
    for bus, start in mine:
        ref = reg.get(bus, start)
        if ref is not None:
            assert ref.owner != owner, ref
            reg.put(ref)
    reg.close()
    return dict(stats)


class Reader:
    """One thread of gets and puts on the shared handle."""

    def __init__(self, reg: Registry, seed: int, stop: threading.Event):
        self.reg = reg
        self.rng = random.Random(seed)
        self.stop = stop
        self.stats = collections.Counter()
        self.errors: list[str] = []
        self.held: collections.deque = collections.deque()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def fail(self, msg: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(msg)

    def verify_held(self, ref, bus: int, view) -> None:
        """The slot must still belong to this reference's tenant."""
        if lib.svm_reg_peek(self.reg._h, ref.slot, view) != 0:
            self.fail(f"peek of slot {ref.slot} failed")
            return
        if view.state == lib.SVM_FREE:
            self.fail(f"slot {ref.slot} freed under a held reference {ref!r}")
        elif view.state not in (lib.SVM_LIVE, lib.SVM_REMOVING):
            self.fail(f"slot {ref.slot} in state {view.state} under {ref!r}")
        if view.generation != ref.generation:
            self.fail(f"slot {ref.slot} generation {view.generation} != held {ref!r}")
        if (view.start, view.length, view.owner, view.cookie, view.bus) != (
            ref.start, ref.length, ref.owner, ref.cookie, bus
        ):
            self.fail(
                f"slot {ref.slot} reused under {ref!r}: now {view.start:#x}+{view.length:#x} "
                f"owner {view.owner} cookie {view.cookie} bus {view.bus}"
            )
        if view.refcount == 0:
            self.fail(f"slot {ref.slot} refcount 0 under a held reference {ref!r}")
        if view.state == lib.SVM_REMOVING:
            self.stats["held_while_removing"] += 1

    def run(self) -> None:
        reg, rng, stats = self.reg, self.rng, self.stats
        view = ffi.new("struct svm_slot_view *")
        span = CELLS * GRID + max(LENGTHS)
        try:
            while not self.stop.is_set():
                for _ in range(200):
                    bus = rng.randrange(3)
                    addr = rng.randrange(span)
                    size = rng.choice((1, 2, 4))
                    ref = reg.get(bus, addr, size, timeout=10.0)
                    stats["gets"] += 1
                    if ref is None:
                        continue
                    stats["hits"] += 1
                    if ref.cookie != cookie_for(ref.owner, bus, ref.start, ref.length):
                        self.fail(f"cookie does not match {ref!r} on bus {bus}")
                    if not (ref.start <= addr and addr + size <= ref.start + ref.length):
                        self.fail(f"{addr:#x}+{size} not inside {ref!r}")
                    if ref.offset != addr - ref.start:
                        self.fail(f"offset of {ref!r} for {addr:#x}")
                    if not 0 <= ref.slot < CAPACITY:
                        self.fail(f"slot out of range in {ref!r}")
                        continue
                    self.verify_held(ref, bus, view)
                    if rng.random() < 0.25:
                        self.held.append((ref, bus))
                        if len(self.held) > HELD_MAX:
                            old, obus = self.held.popleft()
                            self.verify_held(old, obus, view)
                            reg.put(old, timeout=10.0)
                            stats["puts"] += 1
                    else:
                        reg.put(ref, timeout=10.0)
                        stats["puts"] += 1
                # Now and then hold the references across a pause, so that
                # writers unregister regions we are "handling".
                time.sleep(0.0005 if rng.random() < 0.5 else 0)
                for old, obus in self.held:
                    self.verify_held(old, obus, view)
        except Exception as e:  # reported by the test, not lost in the thread
            self.fail(f"reader raised {type(e).__name__}: {e}")

    def release(self) -> None:
        view = ffi.new("struct svm_slot_view *")
        while self.held:
            ref, bus = self.held.popleft()
            self.verify_held(ref, bus, view)
            self.reg.put(ref)
            self.stats["puts"] += 1


def test_writers_and_readers_never_see_a_freed_or_reused_slot():
    name = segment_name("stress")
    reg = Registry.create(name, capacity=CAPACITY, lock_timeout=10.0)
    writers = []
    readers: list[Reader] = []
    stop = threading.Event()
    try:
        deadline = time.monotonic() + RUN_SECONDS
        # Fork the writers before the reader threads start.
        for w in range(WRITERS):
            writers.append(spawn(writer, name, 100 + w, 7000 + w, deadline))
        readers = [Reader(reg, 900 + t, stop) for t in range(READER_THREADS)]
        for rd in readers:
            rd.thread.start()

        results = []
        for child in writers:
            child.wait(timeout=RUN_SECONDS + 60)
            assert child.exitcode == 0, child.describe()
            results.append(child.result())

        # Writers are done and gone: their regions are out of the index,
        # some slots may still wait for the readers' last puts.
        stop.set()
        for rd in readers:
            rd.thread.join(timeout=30)
            assert not rd.thread.is_alive(), "reader thread hung"
        errors = [e for rd in readers for e in rd.errors]
        assert errors == []

        for rec in reg.regions():
            assert rec.removing, f"live region left after every owner unregistered: {rec}"
        for rd in readers:
            rd.release()
        assert [e for rd in readers for e in rd.errors] == []

        assert reg.regions() == []
        assert reg.check() == []

        total = collections.Counter()
        for rd in readers:
            total.update(rd.stats)
        for r in results:
            total.update(r)
        print("stress:", dict(total))
        assert total["registered"] > 1000
        assert total["unregistered"] + total["final_unregistered"] == total["registered"]
        assert total["conflicts"] > 100
        assert total["hits"] > 1000
        assert total["puts"] == total["hits"]
        assert total["held_while_removing"] > 0, "no reference was ever held across an unregister"

        # Still fully usable.
        reg.register(Bus.MMIO, 0x1000, 0x10, 1, 5)
        with reg.get(Bus.MMIO, 0x1008) as ref:
            assert (ref.owner, ref.cookie, ref.offset) == (1, 5, 8)
        reg.unregister(Bus.MMIO, 0x1000, 1)
        assert reg.regions() == [] and reg.check() == []
    finally:
        stop.set()
        kill_all(writers)
        for rd in readers:
            rd.thread.join(timeout=10)
        reg.close()
        reg.unlink()


def test_unregister_of_another_owners_region_is_refused_under_load():
    """A writer can never take another writer's region out (RegionNotFound),
    even while both churn: checked by a quick two-process run."""
    name = segment_name("stress2")
    reg = Registry.create(name, capacity=64, lock_timeout=10.0)
    children = []
    try:
        reg.register(Bus.PIO, 0x60, 4, owner=1, cookie=cookie_for(1, Bus.PIO, 0x60, 4))
        deadline = time.monotonic() + 1.0

        def thief(name, deadline):
            r = Registry.attach(name, lock_timeout=10.0)
            refused = 0
            while time.monotonic() < deadline:
                try:
                    r.unregister(Bus.PIO, 0x60, 2)
                except RegionNotFound:
                    refused += 1
                else:
                    raise AssertionError("owner 2 unregistered owner 1's region")
                assert r.unregister_owner(3) == 0
            return refused

        children = [spawn(thief, name, deadline) for _ in range(2)]
        for c in children:
            c.wait(timeout=30)
            assert c.exitcode == 0, c.describe()
            assert c.result() > 100
        (rec,) = reg.regions()
        assert (rec.owner, rec.start, rec.removing) == (1, 0x60, False)
        reg.unregister(Bus.PIO, 0x60, 1)
        assert reg.regions() == [] and reg.check() == []
    finally:
        kill_all(children)
        reg.close()
        reg.unlink()
