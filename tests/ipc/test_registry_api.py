"""The registry's public API contract, on real POSIX shared memory.

Everything here goes through :mod:`ipc` as a user would: no mocks, real
segments (unique names, always unlinked), and a real second process where
the contract is about other processes.
"""

from __future__ import annotations

import copy
import multiprocessing
import os
import struct

import posix_ipc
import pytest

import ipc
from ipc import Bus, RegionConflict, RegionNotFound, Registry, RegistryFull
from ipc import LayoutError, RegistryError, StaleReference, pci_address
from tests.conftest import segment_name

TOP = 2**64 - 1
BASE = 0x1000
LEN = 0x1000


def state(reg: Registry) -> list[tuple]:
    """The registry's content as comparable tuples (slot numbers left out)."""
    return sorted(
        (int(r.bus), r.start, r.length, r.owner, r.cookie, r.refcount, r.removing)
        for r in reg.regions()
    )


@pytest.fixture
def one_slot():
    """A registry with a single slot, so that every region reuses it."""
    name = segment_name("one")
    reg = Registry.create(name, capacity=1)
    try:
        yield reg
    finally:
        reg.close()
        posix_ipc.unlink_shared_memory(name)


# -- imports and names -------------------------------------------------------


def test_public_imports():
    from ipc import Bus as B, RegionConflict as C, RegionNotFound as N  # noqa: F401
    from ipc import Registry as R, RegistryFull as F  # noqa: F401

    for exc in (C, F, N, StaleReference, LayoutError, ipc.LockTimeout, ipc.LockUnusable):
        assert issubclass(exc, RegistryError)
    assert {B.PIO, B.MMIO, B.PCI} == set(B)
    assert len({int(b) for b in B}) == 3


# -- register: argument validation ------------------------------------------


@pytest.mark.parametrize("bus", list(Bus))
def test_register_rejects_zero_length(registry, bus):
    with pytest.raises(ValueError):
        registry.register(bus, BASE, 0, owner=1)
    with pytest.raises(ValueError):
        registry.register(bus, 0, 0, owner=1)
    assert registry.regions() == []


@pytest.mark.parametrize(
    "start,length",
    [
        (TOP, 2),
        (TOP - 0xF, 0x11),
        (2, TOP),
        (2**63, 2**63 + 1),
        (TOP, TOP),
    ],
)
@pytest.mark.parametrize("bus", list(Bus))
def test_register_rejects_wrapping_range(registry, bus, start, length):
    assert start + length > 2**64
    with pytest.raises(ValueError):
        registry.register(bus, start, length, owner=1)
    assert registry.regions() == []
    assert registry.check() == []


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(start=-1, length=1, owner=1, cookie=0),
        dict(start=2**64, length=1, owner=1, cookie=0),
        dict(start=0, length=-1, owner=1, cookie=0),
        dict(start=0, length=2**64, owner=1, cookie=0),
        dict(start=0, length=1, owner=-1, cookie=0),
        dict(start=0, length=1, owner=2**64, cookie=0),
        dict(start=0, length=1, owner=1, cookie=-1),
        dict(start=0, length=1, owner=1, cookie=2**64),
        dict(start=2**100, length=1, owner=1, cookie=0),
        dict(start=1.0, length=1, owner=1, cookie=0),
    ],
)
def test_register_rejects_out_of_range_ints(registry, kwargs):
    with pytest.raises(ValueError):
        registry.register(Bus.MMIO, **kwargs)
    assert registry.regions() == []


def test_register_rejects_bad_bus(registry):
    for bus in (3, -1, 99):
        with pytest.raises(ValueError):
            registry.register(bus, BASE, LEN, owner=1)
    assert registry.regions() == []


@pytest.mark.parametrize("bus", list(Bus))
def test_edge_ranges_are_accepted(registry, bus):
    # The very last byte, and a region reaching exactly the end.
    registry.register(bus, TOP, 1, owner=1, cookie=11)
    registry.register(bus, 0, 1, owner=2, cookie=22)
    registry.register(bus, 2**63, 2**63 - 1, owner=3, cookie=33)
    with registry.get(bus, TOP) as ref:
        assert (ref.start, ref.length, ref.owner, ref.cookie, ref.offset) == (TOP, 1, 1, 11, 0)
    with registry.get(bus, 0) as ref:
        assert ref.owner == 2
    with registry.get(bus, TOP - 1) as ref:
        assert ref.owner == 3 and ref.offset == 2**63 - 2
    assert registry.check() == []
    registry.unregister(bus, TOP, 1)
    registry.unregister(bus, 2**63, 3)
    # The whole space but one byte, then that byte conflicts.
    registry.unregister(bus, 0, 2)
    registry.register(bus, 0, TOP, owner=4)
    with pytest.raises(RegionConflict):
        registry.register(bus, TOP - 1, 1, owner=5)
    registry.register(bus, TOP, 1, owner=5)
    with registry.get(bus, 2**62, 2**62) as ref:
        assert ref.owner == 4 and ref.length == TOP
    assert registry.check() == []


# -- register: overlap and capacity ------------------------------------------

# Existing region: [BASE, BASE + LEN) = [0x1000, 0x2000).
OVERLAPS = {
    "identical": (BASE, LEN),
    "same start, shorter": (BASE, 0x10),
    "same start, longer": (BASE, 2 * LEN),
    "same end": (BASE + 0x800, LEN - 0x800),
    "inside": (BASE + 0x100, 0x10),
    "first byte": (BASE, 1),
    "last byte": (BASE + LEN - 1, 1),
    "straddles left": (BASE - 0x10, 0x20),
    "straddles left by one byte": (BASE - 1, 2),
    "straddles right": (BASE + LEN - 0x10, 0x20),
    "straddles right by one byte": (BASE + LEN - 1, 2),
    "encloses": (BASE - 0x100, LEN + 0x200),
    "encloses to the top": (0, TOP),
}


@pytest.mark.parametrize("shape", list(OVERLAPS))
@pytest.mark.parametrize("bus", list(Bus))
def test_overlap_raises_conflict(registry, bus, shape):
    registry.register(bus, BASE, LEN, owner=1, cookie=7)
    before = state(registry)
    start, length = OVERLAPS[shape]
    with pytest.raises(RegionConflict):
        registry.register(bus, start, length, owner=2, cookie=8)
    # Another owner conflicts the same way as the same owner.
    with pytest.raises(RegionConflict):
        registry.register(bus, start, length, owner=1, cookie=8)
    assert state(registry) == before
    assert registry.check() == []


@pytest.mark.parametrize("bus", list(Bus))
def test_adjacent_ranges_do_not_overlap(registry, bus):
    registry.register(bus, BASE, LEN, owner=1)
    registry.register(bus, BASE - 0x100, 0x100, owner=2)  # ends where it starts
    registry.register(bus, BASE + LEN, 0x100, owner=3)  # starts where it ends
    registry.register(bus, 0, BASE - 0x100, owner=4)  # fills the gap below
    assert [r[1:4] for r in state(registry)] == [
        (0, BASE - 0x100, 4),
        (BASE - 0x100, 0x100, 2),
        (BASE, LEN, 1),
        (BASE + LEN, 0x100, 3),
    ]
    assert registry.check() == []


def test_overlap_checked_against_both_neighbours(registry):
    registry.register(Bus.PIO, 0x100, 0x100, owner=1)  # [0x100, 0x200)
    registry.register(Bus.PIO, 0x300, 0x100, owner=2)  # [0x300, 0x400)
    for start, length in [(0x1FF, 2), (0x2FF, 2), (0x1FF, 0x102), (0x200, 0x101), (0x150, 0x300)]:
        with pytest.raises(RegionConflict):
            registry.register(Bus.PIO, start, length, owner=3)
    registry.register(Bus.PIO, 0x200, 0x100, owner=3)  # exactly the gap
    assert registry.check() == []
    assert len(registry.regions()) == 3


def test_full_table_raises_registry_full(small_registry):
    reg = small_registry
    assert reg.capacity == 16
    for i in range(16):
        reg.register(Bus(i % 3), i * 0x100, 0x10, owner=i)
    with pytest.raises(RegistryFull):
        reg.register(Bus.MMIO, 0x100000, 0x10, owner=99)
    with pytest.raises(RegistryFull):
        reg.register(Bus.PCI, 0x100000, 0x10, owner=99)
    assert len(reg.regions()) == 16
    assert reg.check() == []
    # Freeing one slot makes room for exactly one.
    reg.unregister(Bus.PIO, 0, owner=0)
    reg.register(Bus.MMIO, 0x100000, 0x10, owner=99)
    with pytest.raises(RegistryFull):
        reg.register(Bus.MMIO, 0x200000, 0x10, owner=99)
    assert reg.check() == []


def test_full_counts_slots_waiting_for_their_last_put(small_registry):
    reg = small_registry
    for i in range(16):
        reg.register(Bus.MMIO, i * 0x100, 0x10, owner=1)
    ref = reg.get(Bus.MMIO, 0x500)
    reg.unregister(Bus.MMIO, 0x500, owner=1)
    # Out of the index, but its slot is still taken.
    with pytest.raises(RegistryFull):
        reg.register(Bus.MMIO, 0x500, 0x10, owner=2)
    reg.put(ref)
    reg.register(Bus.MMIO, 0x500, 0x10, owner=2)
    assert reg.check() == []


# -- get ---------------------------------------------------------------------


@pytest.mark.parametrize("bus", list(Bus))
def test_get_misses_return_none(registry, bus):
    assert registry.get(bus, 0) is None
    assert registry.get(bus, TOP) is None
    registry.register(bus, BASE, LEN, owner=1)
    assert registry.get(bus, BASE - 1) is None
    assert registry.get(bus, BASE + LEN) is None
    assert registry.get(bus, 0) is None
    assert registry.get(bus, TOP) is None
    # Starts inside, runs past the end.
    assert registry.get(bus, BASE + LEN - 2, 4) is None
    assert registry.get(bus, BASE, LEN + 1) is None
    # Starts before, ends inside.
    assert registry.get(bus, BASE - 2, 4) is None
    # Another bus at the same address.
    other = Bus((int(bus) + 1) % 3)
    assert registry.get(other, BASE) is None
    # Misses take no reference.
    assert [r.refcount for r in registry.regions()] == [0]


def test_get_straddling_two_adjacent_regions_is_none(registry):
    registry.register(Bus.MMIO, BASE, LEN, owner=1)
    registry.register(Bus.MMIO, BASE + LEN, LEN, owner=1)  # same owner, even
    assert registry.get(Bus.MMIO, BASE + LEN - 2, 4) is None
    assert registry.get(Bus.MMIO, BASE + LEN - 1, 2) is None
    assert registry.get(Bus.MMIO, BASE, 2 * LEN) is None
    with registry.get(Bus.MMIO, BASE + LEN - 4, 4) as a, registry.get(Bus.MMIO, BASE + LEN, 4) as b:
        assert (a.start, a.offset) == (BASE, LEN - 4)
        assert (b.start, b.offset) == (BASE + LEN, 0)
    assert all(r.refcount == 0 for r in registry.regions())


def test_get_wrapping_access_is_a_miss(registry):
    """An access with ``addr + size > 2**64`` matches nothing (kvmtool's 2022
    fix: a guest ``rep`` access must not wrap into a region at address 0).
    The contract: ``get`` returns None, no reference is taken."""
    registry.register(Bus.MMIO, 0, 0x1000, owner=1)
    registry.register(Bus.MMIO, TOP - 0xFFF, 0x1000, owner=2)
    for addr, size in [(TOP, 2), (TOP - 1, 4), (TOP - 0xFFF, 0x2000), (TOP, TOP)]:
        assert addr + size > 2**64
        assert registry.get(Bus.MMIO, addr, size) is None
    assert all(r.refcount == 0 for r in registry.regions())


def test_get_rejects_out_of_range_arguments(registry):
    registry.register(Bus.PIO, 0, 0x100, owner=1)
    for addr, size in [(-1, 1), (2**64, 1), (0, -1), (0, 2**64)]:
        with pytest.raises(ValueError):
            registry.get(Bus.PIO, addr, size)
    with pytest.raises(ValueError):
        registry.get(3, 0)
    assert [r.refcount for r in registry.regions()] == [0]


def test_reference_fields(registry):
    registry.register(Bus.MMIO, 0xFEE00000, 0x1000, owner=42, cookie=0xC0FFEE)
    ref = registry.get(Bus.MMIO, 0xFEE00020, 4)
    assert ref is not None and ref.held
    assert ref.owner == 42
    assert ref.cookie == 0xC0FFEE
    assert ref.start == 0xFEE00000
    assert ref.length == 0x1000
    assert ref.offset == 0x20
    assert isinstance(ref.generation, int)
    (rec,) = registry.regions()
    assert ref.slot == rec.slot and ref.generation == rec.generation
    assert rec.refcount == 1
    assert "0xfee00000" in repr(ref)
    # Default size is one byte, and every get counts.
    ref2 = registry.get(Bus.MMIO, 0xFEE00FFF)
    assert ref2.offset == 0xFFF
    assert registry.regions()[0].refcount == 2
    registry.put(ref)
    registry.put(ref2)
    assert registry.regions()[0].refcount == 0
    assert not ref.held


def test_reference_context_manager_puts(registry):
    registry.register(Bus.PIO, 0x3F8, 8, owner=1)
    with registry.get(Bus.PIO, 0x3FD) as ref:
        assert ref.offset == 5
        assert registry.regions()[0].refcount == 1
    assert registry.regions()[0].refcount == 0
    assert not ref.held
    with pytest.raises(StaleReference):
        registry.put(ref)
    # Also on the way out of an exception.
    with pytest.raises(KeyError):
        with registry.get(Bus.PIO, 0x3F8):
            raise KeyError
    assert registry.regions()[0].refcount == 0


def test_put_twice_raises_stale(registry):
    registry.register(Bus.MMIO, BASE, LEN, owner=1)
    a = registry.get(Bus.MMIO, BASE)
    b = registry.get(Bus.MMIO, BASE)
    registry.put(a)
    with pytest.raises(StaleReference):
        registry.put(a)
    # The failed put did not take b's count.
    assert registry.regions()[0].refcount == 1
    registry.put(b)
    with pytest.raises(StaleReference):
        registry.put(b)
    assert registry.regions()[0].refcount == 0
    assert registry.check() == []


def test_put_inside_context_then_exit_raises_stale(registry):
    """A put by hand inside ``with`` makes the exit's put the second one:
    StaleReference (not some other error), and the count is not touched."""
    registry.register(Bus.MMIO, BASE, LEN, owner=1)
    other = registry.get(Bus.MMIO, BASE)
    with pytest.raises(StaleReference):
        with registry.get(Bus.MMIO, BASE) as ref:
            registry.put(ref)
    assert registry.regions()[0].refcount == 1
    registry.put(other)
    assert registry.regions()[0].refcount == 0


def test_put_through_another_handle_is_refused(registry):
    registry.register(Bus.MMIO, BASE, LEN, owner=1)
    with Registry.attach(registry.name) as other:
        ref = registry.get(Bus.MMIO, BASE)
        with pytest.raises(StaleReference):
            other.put(ref)
        assert registry.regions()[0].refcount == 1
        registry.put(ref)
    assert registry.regions()[0].refcount == 0


# -- unregister --------------------------------------------------------------


def test_unregister_by_non_owner_is_refused(registry):
    registry.register(Bus.MMIO, BASE, LEN, owner=1, cookie=5)
    before = state(registry)
    with pytest.raises(RegionNotFound):
        registry.unregister(Bus.MMIO, BASE, owner=2)
    assert state(registry) == before
    with registry.get(Bus.MMIO, BASE) as ref:
        assert ref.owner == 1
    # Nor is anything but the exact start on the exact bus.
    for bus, start in [(Bus.MMIO, BASE + 1), (Bus.MMIO, BASE - 1), (Bus.PIO, BASE), (Bus.PCI, BASE)]:
        with pytest.raises(RegionNotFound):
            registry.unregister(bus, start, owner=1)
    assert state(registry) == before
    registry.unregister(Bus.MMIO, BASE, owner=1)
    with pytest.raises(RegionNotFound):
        registry.unregister(Bus.MMIO, BASE, owner=1)
    assert registry.regions() == []


def test_unregister_of_nothing(registry):
    with pytest.raises(RegionNotFound):
        registry.unregister(Bus.PIO, 0, owner=0)
    with pytest.raises(RegionNotFound):
        registry.unregister(Bus.PIO, TOP, owner=TOP)
    with pytest.raises(ValueError):
        registry.unregister(Bus.PIO, -1, owner=0)
    with pytest.raises(ValueError):
        registry.unregister(Bus.PIO, 0, owner=2**64)


def test_unregister_unreferenced_frees_at_once(registry):
    registry.register(Bus.MMIO, BASE, LEN, owner=1)
    registry.unregister(Bus.MMIO, BASE, owner=1)
    assert registry.regions() == []
    assert registry.get(Bus.MMIO, BASE) is None
    assert registry.check() == []


def test_unregister_while_referenced(registry):
    registry.register(Bus.MMIO, BASE, LEN, owner=1, cookie=100)
    old1 = registry.get(Bus.MMIO, BASE + 8, 4)
    old2 = registry.get(Bus.MMIO, BASE + 16)
    registry.unregister(Bus.MMIO, BASE, owner=1)

    # Out of the index at once: new gets miss...
    assert registry.get(Bus.MMIO, BASE + 8, 4) is None
    # ...but the slot waits, marked removing, with its references.
    (rec,) = registry.regions()
    assert (rec.start, rec.length, rec.owner, rec.cookie) == (BASE, LEN, 1, 100)
    assert rec.removing and rec.refcount == 2
    assert registry.check() == []
    # It cannot be unregistered twice.
    with pytest.raises(RegionNotFound):
        registry.unregister(Bus.MMIO, BASE, owner=1)

    # An overlapping range can be registered at once.
    registry.register(Bus.MMIO, BASE + 0x800, LEN, owner=2, cookie=200)
    with registry.get(Bus.MMIO, BASE + 0x800) as new:
        assert (new.owner, new.cookie, new.start) == (2, 200, BASE + 0x800)
    assert registry.get(Bus.MMIO, BASE + 8) is None
    # The held references still describe the old region.
    assert (old1.owner, old1.cookie, old1.start, old1.length, old1.offset) == (1, 100, BASE, LEN, 8)
    assert state(registry) == [
        (int(Bus.MMIO), BASE, LEN, 1, 100, 2, True),
        (int(Bus.MMIO), BASE + 0x800, LEN, 2, 200, 0, False),
    ]
    assert registry.check() == []

    registry.put(old1)
    assert state(registry) == [
        (int(Bus.MMIO), BASE, LEN, 1, 100, 1, True),
        (int(Bus.MMIO), BASE + 0x800, LEN, 2, 200, 0, False),
    ]
    registry.put(old2)  # the last put frees the slot
    assert state(registry) == [(int(Bus.MMIO), BASE + 0x800, LEN, 2, 200, 0, False)]
    assert registry.check() == []


def test_slot_reuse_bumps_generation(one_slot):
    reg = one_slot
    reg.register(Bus.PIO, 0x60, 1, owner=1)
    ref = reg.get(Bus.PIO, 0x60)
    slot, gen = ref.slot, ref.generation
    reg.put(ref)
    reg.unregister(Bus.PIO, 0x60, owner=1)
    reg.register(Bus.PIO, 0x60, 1, owner=2)
    ref = reg.get(Bus.PIO, 0x60)
    assert ref.slot == slot and ref.generation != gen
    reg.put(ref)


def test_stale_generation_put_leaves_new_tenant_alone(one_slot):
    reg = one_slot
    reg.register(Bus.MMIO, BASE, LEN, owner=1, cookie=1)
    old = reg.get(Bus.MMIO, BASE)
    stale = copy.copy(old)  # a duplicate handle of the same reference
    assert stale.held and stale.generation == old.generation
    reg.unregister(Bus.MMIO, BASE, owner=1)
    reg.put(old)  # last put: the slot is freed
    assert reg.regions() == []

    # The only slot gets a new tenant, which holds a reference.
    reg.register(Bus.MMIO, BASE, LEN, owner=2, cookie=2)
    new = reg.get(Bus.MMIO, BASE)
    assert new.slot == stale.slot and new.generation != stale.generation
    with pytest.raises(StaleReference):
        reg.put(stale)
    (rec,) = reg.regions()
    assert (rec.owner, rec.cookie, rec.refcount, rec.removing) == (2, 2, 1, False)
    assert rec.generation == new.generation

    # Also when the new tenant is unreferenced or waiting for its last put.
    stale2 = copy.copy(old)
    reg.unregister(Bus.MMIO, BASE, owner=2)
    with pytest.raises(StaleReference):
        reg.put(stale2)
    (rec,) = reg.regions()
    assert rec.removing and rec.refcount == 1
    reg.put(new)
    assert reg.regions() == []
    assert reg.check() == []


def test_unregister_owner(registry):
    registry.register(Bus.PIO, 0x60, 1, owner=1)
    registry.register(Bus.PIO, 0x64, 1, owner=1)
    registry.register(Bus.MMIO, 0x60, 1, owner=1)
    registry.register(Bus.PCI, pci_address(0, 3, 0), 0x1000, owner=1)
    registry.register(Bus.PIO, 0x70, 2, owner=2, cookie=9)
    registry.register(Bus.MMIO, 0x1000, 0x10, owner=3)
    held = registry.get(Bus.MMIO, 0x60)

    assert registry.unregister_owner(1) == 4
    assert registry.get(Bus.PIO, 0x60) is None
    assert registry.get(Bus.PCI, pci_address(0, 3, 0)) is None
    assert state(registry) == [
        (int(Bus.PIO), 0x70, 2, 2, 9, 0, False),
        (int(Bus.MMIO), 0x60, 1, 1, 0, 1, True),
        (int(Bus.MMIO), 0x1000, 0x10, 3, 0, 0, False),
    ]
    assert registry.check() == []
    # Regions already waiting for their last put are not counted again.
    assert registry.unregister_owner(1) == 0
    assert registry.unregister_owner(12345) == 0
    registry.put(held)
    assert registry.unregister_owner(2) == 1
    assert registry.unregister_owner(3) == 1
    assert registry.regions() == []
    assert registry.check() == []


# -- inspection --------------------------------------------------------------


def test_regions_and_check_content(registry):
    assert registry.regions() == []
    assert registry.check() == []
    registry.register(Bus.MMIO, 0xD0000000, 0x100000, owner=7, cookie=77)
    registry.register(Bus.PIO, 0xCF8, 8, owner=8, cookie=88)
    ref = registry.get(Bus.PIO, 0xCFC, 4)
    recs = {r.bus: r for r in registry.regions()}
    assert set(recs) == {Bus.PIO, Bus.MMIO}
    m, p = recs[Bus.MMIO], recs[Bus.PIO]
    assert isinstance(m, ipc.RegionRecord) and isinstance(m.bus, Bus)
    assert (m.start, m.length, m.owner, m.cookie, m.refcount, m.removing) == (
        0xD0000000, 0x100000, 7, 77, 0, False)
    assert (p.start, p.length, p.owner, p.cookie, p.refcount, p.removing) == (
        0xCF8, 8, 8, 88, 1, False)
    assert m.slot != p.slot
    assert 0 <= m.slot < registry.capacity and 0 <= p.slot < registry.capacity
    assert p.generation == ref.generation
    assert registry.check() == []
    registry.put(ref)


# -- other processes ---------------------------------------------------------


def _child_attach(name: str, conn) -> None:
    try:
        with Registry.attach(name) as reg:
            seen = sorted((int(r.bus), r.start, r.length, r.owner, r.cookie, r.refcount)
                          for r in reg.regions())
            ref = reg.get(Bus.MMIO, 0x2004, 4)
            got = (ref.owner, ref.cookie, ref.offset)
            reg.register(Bus.PIO, 0x80, 4, owner=os.getpid(), cookie=5)
            conn.send(("ok", seen, got, reg.capacity, reg.check()))
            conn.recv()  # hold the reference until the parent has looked
            reg.put(ref)
            conn.send("put")
    except BaseException as e:  # report, do not hang the parent
        conn.send(("error", repr(e)))


def test_attach_from_another_process(registry):
    registry.register(Bus.MMIO, 0x2000, 0x100, owner=10, cookie=1010)
    registry.register(Bus.PCI, pci_address(0, 1, 0), 0x1000, owner=11, cookie=1111)
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_child_attach, args=(registry.name, child))
    p.start()
    try:
        assert parent.poll(30), "child did not answer"
        msg = parent.recv()
        assert msg[0] == "ok", msg
        _, seen, got, capacity, problems = msg
        assert seen == [
            (int(Bus.MMIO), 0x2000, 0x100, 10, 1010, 0),
            (int(Bus.PCI), pci_address(0, 1, 0), 0x1000, 11, 1111, 0),
        ]
        assert got == (10, 1010, 4)
        assert capacity == registry.capacity
        assert problems == []
        # The parent sees the child's region and the child's reference.
        recs = {r.bus: r for r in registry.regions()}
        assert recs[Bus.MMIO].refcount == 1
        assert (recs[Bus.PIO].start, recs[Bus.PIO].owner) == (0x80, p.pid)
        with registry.get(Bus.PIO, 0x83) as ref:
            assert ref.owner == p.pid and ref.cookie == 5
        parent.send("go")
        assert parent.poll(30) and parent.recv() == "put"
    finally:
        p.join(30)
        if p.is_alive():
            p.kill()
            p.join()
    assert p.exitcode == 0
    assert {r.bus: r.refcount for r in registry.regions()}[Bus.MMIO] == 0
    assert registry.check() == []


def test_forked_child_uses_inherited_handle(registry):
    """A child forked from the creator uses the parent's mapping directly."""
    registry.register(Bus.MMIO, 0x2000, 0x100, owner=10, cookie=1010)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no pytest machinery from here on
        code = 1
        try:
            ref = registry.get(Bus.MMIO, 0x2010)
            ok = ref is not None and ref.cookie == 1010
            registry.put(ref)
            registry.register(Bus.PIO, 0x40, 4, owner=os.getpid())
            ok = ok and registry.check() == []
            code = 0 if ok else 2
        finally:
            os.write(w, b"x")
            os._exit(code)
    os.close(w)
    try:
        assert os.read(r, 1) == b"x"
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert {(rec.bus, rec.start, rec.owner, rec.refcount) for rec in registry.regions()} == {
        (Bus.MMIO, 0x2000, 10, 0), (Bus.PIO, 0x40, pid, 0)}
    assert registry.check() == []


def test_from_fd(registry):
    registry.register(Bus.PIO, 0x70, 2, owner=1)
    shm = posix_ipc.SharedMemory(registry.name)
    try:
        other = Registry.from_fd(shm.fd)
    finally:
        shm.close_fd()
    with other:
        assert other.name is None
        with other.get(Bus.PIO, 0x71) as ref:
            assert ref.owner == 1
        other.unlink()  # no name: nothing to remove
    assert len(registry.regions()) == 1


def test_attach_in_same_process_shares_state(registry):
    with Registry.attach(registry.name) as other:
        assert other.capacity == registry.capacity
        other.register(Bus.MMIO, BASE, LEN, owner=1)
        with registry.get(Bus.MMIO, BASE) as ref:
            assert ref.owner == 1
            assert other.regions()[0].refcount == 1
        with pytest.raises(RegionConflict):
            registry.register(Bus.MMIO, BASE, 1, owner=2)
        registry.unregister(Bus.MMIO, BASE, owner=1)
        assert other.regions() == []


def _junk_segment(name: str, data: bytes) -> None:
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=len(data))
    try:
        os.pwrite(shm.fd, data, 0) if data else None
    finally:
        shm.close_fd()


def _valid_image(capacity: int = 16) -> bytes:
    """The bytes of a freshly formatted registry segment."""
    name = segment_name("img")
    reg = Registry.create(name, capacity=capacity)
    try:
        shm = posix_ipc.SharedMemory(name)
        try:
            size = os.fstat(shm.fd).st_size
            return os.pread(shm.fd, size, 0)
        finally:
            shm.close_fd()
    finally:
        reg.close()
        posix_ipc.unlink_shared_memory(name)


def _attach_refused(name: str) -> str:
    with pytest.raises(LayoutError) as info:
        Registry.attach(name)
    msg = str(info.value)
    assert "registry" in msg.lower()
    return msg


def test_attach_refuses_bad_magic(registry_name):
    img = bytearray(_valid_image())
    img[0:8] = b"NOTMAGIC"
    _junk_segment(registry_name, bytes(img))
    msg = _attach_refused(registry_name)
    assert "magic" in msg


def test_attach_refuses_bad_version(registry_name):
    img = bytearray(_valid_image())
    (version,) = struct.unpack_from("=I", img, 8)
    assert version == ipc.registry.lib.SVM_VERSION  # the layout we patch
    struct.pack_into("=I", img, 8, version + 1)
    _junk_segment(registry_name, bytes(img))
    msg = _attach_refused(registry_name)
    assert "version" in msg


@pytest.mark.parametrize("delta", [-4096, 4096, 1])
def test_attach_refuses_wrong_size(registry_name, delta):
    img = _valid_image()
    data = img[: len(img) + delta] if delta < 0 else img + b"\0" * delta
    _junk_segment(registry_name, data)
    _attach_refused(registry_name)


def test_attach_refuses_wrong_size_after_create(registry):
    # A real registry whose object was grown behind its back.
    shm = posix_ipc.SharedMemory(registry.name)
    try:
        os.ftruncate(shm.fd, os.fstat(shm.fd).st_size + 4096)
    finally:
        shm.close_fd()
    _attach_refused(registry.name)


@pytest.mark.parametrize("size", [0, 8, 64, 4096, 1 << 16])
def test_attach_refuses_junk(registry_name, size):
    data = bytes((i * 37 + 11) & 0xFF for i in range(size))
    _junk_segment(registry_name, data)
    _attach_refused(registry_name)


def test_attach_refuses_zeroes(registry_name):
    _junk_segment(registry_name, bytes(len(_valid_image())))
    _attach_refused(registry_name)


def test_attach_missing_name(registry_name):
    with pytest.raises(LayoutError) as info:
        Registry.attach(registry_name)
    assert registry_name in str(info.value)


# -- PCI keys and buses ------------------------------------------------------


def test_pci_address_encoding():
    assert pci_address(0, 0, 0) == 0
    assert pci_address(0, 0, 0, 0x10) == 0x10
    assert pci_address(0, 0, 1) == 0x1000
    assert pci_address(0, 1, 0) == 0x8000
    assert pci_address(1, 0, 0) == 0x100000
    assert pci_address(1, 2, 3, 4) == (1 << 20) | (2 << 15) | (3 << 12) | 4
    assert pci_address(255, 31, 7, 4095) == 2**28 - 1
    seen = {pci_address(b, d, f) for b in (0, 1, 255) for d in range(32) for f in range(8)}
    assert len(seen) == 3 * 32 * 8
    for args in [(256, 0, 0), (0, 32, 0), (0, 0, 8), (0, 0, 0, 4096), (-1, 0, 0), (0, 0, 0, -1)]:
        with pytest.raises(ValueError):
            pci_address(*args)


def test_pci_functions_are_separate_windows(registry):
    registry.register(Bus.PCI, pci_address(0, 2, 0), 0x1000, owner=1)
    registry.register(Bus.PCI, pci_address(0, 2, 1), 0x1000, owner=2)
    with registry.get(Bus.PCI, pci_address(0, 2, 0, 0x10), 4) as ref:
        assert ref.owner == 1 and ref.offset == 0x10
    with registry.get(Bus.PCI, pci_address(0, 2, 1, 0xFFC), 4) as ref:
        assert ref.owner == 2 and ref.offset == 0xFFC
    assert registry.get(Bus.PCI, pci_address(0, 2, 0, 0xFFE), 4) is None
    assert registry.get(Bus.PCI, pci_address(0, 3, 0)) is None
    with pytest.raises(RegionConflict):
        registry.register(Bus.PCI, pci_address(0, 2, 1, 0x100), 4, owner=3)


def test_buses_are_independent(registry):
    registry.register(Bus.PIO, BASE, LEN, owner=1, cookie=10)
    registry.register(Bus.MMIO, BASE, LEN, owner=2, cookie=20)
    registry.register(Bus.PCI, BASE, LEN, owner=3, cookie=30)
    for bus, owner in [(Bus.PIO, 1), (Bus.MMIO, 2), (Bus.PCI, 3)]:
        with registry.get(bus, BASE + 4) as ref:
            assert ref.owner == owner and ref.cookie == owner * 10
    with pytest.raises(RegionNotFound):
        registry.unregister(Bus.PIO, BASE, owner=2)
    registry.unregister(Bus.MMIO, BASE, owner=2)
    assert registry.get(Bus.MMIO, BASE) is None
    with registry.get(Bus.PIO, BASE) as ref:
        assert ref.owner == 1
    with registry.get(Bus.PCI, BASE) as ref:
        assert ref.owner == 3
    registry.register(Bus.MMIO, BASE - 1, 2, owner=4)  # overlaps PIO's and PCI's range
    assert registry.check() == []


# -- lifetime ----------------------------------------------------------------


def test_close_makes_later_calls_fail(registry_name):
    reg = Registry.create(registry_name)
    reg.register(Bus.MMIO, BASE, LEN, owner=1)
    ref = reg.get(Bus.MMIO, BASE)
    reg.close()
    assert reg.closed
    calls = [
        lambda: reg.register(Bus.MMIO, 0, 1, owner=1),
        lambda: reg.get(Bus.MMIO, BASE),
        lambda: reg.put(ref),
        lambda: reg.unregister(Bus.MMIO, BASE, owner=1),
        lambda: reg.unregister_owner(1),
        lambda: reg.regions(),
        lambda: reg.check(),
        lambda: reg.repair(),
        lambda: reg.reinitialize(),
        lambda: reg.recoveries,
        lambda: reg.holder(),
    ]
    for call in calls:
        with pytest.raises(RegistryError):
            call()
    reg.close()  # idempotent
    # The segment itself is still there until unlinked.
    with Registry.attach(registry_name) as again:
        assert len(again.regions()) == 1
    reg.unlink()
    with pytest.raises(LayoutError):
        Registry.attach(registry_name)


def test_context_manager_closes(registry_name):
    with Registry.create(registry_name, capacity=8) as reg:
        assert reg.capacity == 8 and not reg.closed
    assert reg.closed
    with pytest.raises(RegistryError):
        reg.regions()
    reg.unlink()


def test_create_rejects_bad_capacity(registry_name):
    for cap in (0, -1, 2**20 + 1, 2**40):
        with pytest.raises(ValueError):
            Registry.create(registry_name, capacity=cap)
    with pytest.raises(LayoutError):
        Registry.attach(registry_name)  # nothing was left behind


def test_reinitialize_empties(registry):
    for i in range(10):
        registry.register(Bus(i % 3), i * 0x10, 0x10, owner=i)
    ref = registry.get(Bus.PIO, 0)
    registry.unregister(Bus.PIO, 0, owner=0)
    registry.reinitialize()
    assert registry.regions() == []
    assert registry.check() == []
    assert registry.get(Bus.MMIO, 0x10) is None
    registry.register(Bus.MMIO, 0x10, 0x10, owner=1)
    with registry.get(Bus.MMIO, 0x10) as r:
        assert r.owner == 1
    del ref  # its slot is gone; nothing to give back
