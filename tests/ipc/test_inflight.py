"""The inflight record of a split virtqueue (ipc.inflight): the device's
calls, recovery in every situation a death can leave, and hostile records."""

from __future__ import annotations

import os
import random
import struct
import time

import pytest

from ipc.inflight import (
    ENTRY_SIZE,
    QUEUE_HEADER_SIZE,
    InflightCorrupt,
    InflightError,
    InflightQueue,
    region_size,
)
from ipc.state import StateSegment
from tests.ipc._virtq import Guest, Device

SIZE = 16


@pytest.fixture
def seg():
    with StateSegment.create(capacity=256, queue_sizes=(SIZE, 4)) as s:
        yield s


def test_regions_do_not_overlap(seg):
    a, b = seg.queue(0), seg.queue(1)
    a.reset(SIZE)
    b.reset(4)
    for h in range(4):
        b.pop(h)
    a.pop(3)
    assert a.in_flight() == 1 and b.in_flight() == 4
    assert seg.layout.queue_offset(1) == seg.layout.queue_offset(0) + region_size(SIZE)
    assert seg.layout.total_size == seg.layout.queue_offset(1) + region_size(4)


def test_region_checks():
    with pytest.raises(ValueError):
        region_size(0)
    with pytest.raises(ValueError):
        region_size(32769)
    with pytest.raises(ValueError):
        InflightQueue(memoryview(bytearray(100)), 4)


def _used(*heads: int):
    """A used ring holding ``heads`` from element 0 on, as used_head()."""
    return lambda i: heads[i % len(heads)] if heads else 0


def test_pop_complete_and_recover(seg):
    q = seg.queue(0)
    q.reset(SIZE)
    for h in (5, 9, 2):
        q.pop(h)
    q.complete(9, 1)
    assert q.in_flight() == 2
    fresh = StateSegment.attach(seg.fd).queue(0)          # the restarted device
    rec = fresh.recover(SIZE, 1, _used(9))
    assert rec.resubmit == (5, 2) and rec.last_avail_idx == 3 and rec.dropped == ()
    # it carries on: new pops order after the old ones
    fresh.pop(7)
    again = StateSegment.attach(seg.fd).queue(0).recover(SIZE, 1, _used(9))
    assert again.resubmit == (5, 2, 7)


def test_guest_saw_the_batch_but_flags_were_not_cleared(seg):
    q = seg.queue(0)
    q.reset(SIZE)
    for h in (1, 2, 3, 4):
        q.pop(h)
    # death after the guest's used->idx store (now 2: heads 3, 1), before complete_batch()
    rec = StateSegment.attach(seg.fd).queue(0).recover(SIZE, 2, _used(3, 1))
    assert rec.resubmit == (2, 4) and rec.dropped == (3, 1) and rec.last_avail_idx == 4
    # the repair stuck, and a second recovery finds the same
    rec2 = StateSegment.attach(seg.fd).queue(0).recover(SIZE, 2, _used(3, 1))
    assert rec2.resubmit == (2, 4) and rec2.dropped == ()


def test_flags_cleared_but_index_not_recorded(seg):
    q = seg.queue(0)
    q.reset(SIZE)
    q.pop(1)
    q.pop(2)
    q._b[QUEUE_HEADER_SIZE + 8 + ENTRY_SIZE * 2] = 0      # complete(2, 1) died before its last store
    rec = StateSegment.attach(seg.fd).queue(0).recover(SIZE, 1, _used(2))
    assert rec.resubmit == (1,) and rec.dropped == () and rec.last_avail_idx == 2


def test_used_element_written_but_guest_index_not_stored(seg):
    q = seg.queue(0)
    q.reset(SIZE)
    q.pop(6)
    rec = StateSegment.attach(seg.fd).queue(0).recover(SIZE, 0, _used(6))
    assert rec.resubmit == (6,) and rec.last_avail_idx == 1


def test_used_index_wraps(seg):
    q = seg.queue(0)
    q.reset(SIZE)
    q.pop(3)
    q.complete(3, 0xFFFF)
    q.pop(0)
    q.pop(1)
    # the guest's index went 0xFFFF -> 0: element 0xFFFF holds head 0
    rec = StateSegment.attach(seg.fd).queue(0).recover(SIZE, 0, lambda i: {0xFFFF: 0}[i])
    assert rec.resubmit == (1,) and rec.dropped == (0,) and rec.last_avail_idx == 1


def test_device_errors(seg):
    q = seg.queue(0)
    with pytest.raises(ValueError):
        q.pop(0)                   # not reset: size 0
    q.reset(8)
    with pytest.raises(ValueError):
        q.pop(8)
    with pytest.raises(InflightError):
        q.complete(3, 1)           # never popped
    q.pop(3)
    q.complete(3, 1)
    with pytest.raises(InflightError):
        q.complete(3, 2)           # twice
    q.pop(4)
    with pytest.raises(InflightError):
        q.complete_batch([4, 4], 3)
    assert q.in_flight() == 1      # a refused batch changes nothing
    with pytest.raises(InflightError):
        q.complete(9, 3)
    with pytest.raises(ValueError):
        q.reset(SIZE + 1)
    with pytest.raises(ValueError):
        q.recover(0, 0, _used())
    with pytest.raises(ValueError):
        q.recover(8, 1 << 16, _used())


def test_full_run_through_the_model(seg):
    g = Guest(SIZE, [3, 1, 4, 15, 9, 2, 6, 5, 10, 11])
    q = seg.queue(0)
    q.reset(SIZE)
    dev = Device(q, g)
    dev.run(["pop", "pop", [1], "pop", "pop", [2, 0], "pop"])
    rec = StateSegment.attach(seg.fd).queue(0).recover(SIZE, g.used_idx(), g.used_id)
    assert list(rec.resubmit) == dev.inflight
    assert rec.last_avail_idx == dev.last_avail
    dev.finish()
    assert sorted(g.used_ids()) == sorted(g.avail)


# ---- hostile records --------------------------------------------------------


def _entry(seg, head: int) -> int:
    return seg.layout.queue_offset(0) + QUEUE_HEADER_SIZE + head * ENTRY_SIZE


def _pw(seg, off: int, data: bytes) -> None:
    os.pwrite(seg.fd, data, off)


@pytest.mark.parametrize("case", ["flag 2", "batch too long", "head twice", "head outside",
                                  "not an int", "huge counter"])
def test_hostile_record_is_refused(seg, case):
    q = seg.queue(0)
    q.reset(SIZE)
    q.pop(1)
    q.pop(2)
    guest_used, used = 0, _used()
    if case == "flag 2":
        _pw(seg, _entry(seg, 4) + 8, b"\x02")
    elif case == "batch too long":
        guest_used = SIZE + 1
    elif case == "head twice":
        guest_used, used = 2, _used(1, 1)
    elif case == "head outside":
        guest_used, used = 2, _used(1, 900)
    elif case == "not an int":
        guest_used, used = 1, lambda i: "x"
    elif case == "huge counter":
        _pw(seg, _entry(seg, 2), struct.pack("<Q", 1 << 63))
    with pytest.raises(InflightCorrupt):
        StateSegment.attach(seg.fd).queue(0).recover(SIZE, guest_used, used)


def test_hostile_entries_past_the_queue_size_are_ignored(seg):
    q = seg.queue(0)
    q.reset(SIZE)
    q.pop(1)
    _pw(seg, _entry(seg, 12) + 8, b"\x07")
    assert StateSegment.attach(seg.fd).queue(0).recover(8, 0, _used()).resubmit == (1,)


def test_random_scribbles_are_bounded():
    """Any record gives a bounded answer (heads in range, each once) or
    InflightCorrupt, fast, for the largest queue too."""
    rng = random.Random(7)
    with StateSegment.create(capacity=64, queue_sizes=(32768,)) as seg:
        q = seg.queue(0)
        q.reset(32768)
        base = seg.layout.queue_offset(0)
        slowest = 0.0
        outcomes = {"ok": 0, "corrupt": 0}
        for _ in range(60):
            if rng.random() < 0.3:
                q.reset(32768)         # start clean now and then: not everything is corrupt
            for _ in range(rng.randint(1, 20)):
                if rng.random() < 0.2:
                    off = base + rng.randrange(region_size(32768) - 8)
                    _pw(seg, off, rng.randbytes(rng.randint(1, 8)))
                else:              # plausible-looking entries
                    head = rng.randrange(32768)
                    _pw(seg, _entry(seg, head), struct.pack("<QB", rng.randrange(1 << 20),
                                                            rng.randint(0, 1)))
            size = rng.choice((1, 256, 32768))
            t0 = time.perf_counter()
            try:
                if rng.random() < 0.5:
                    guest_used = rng.randrange(1 << 16)
                else:                  # close to the record's, as after a real death
                    rec_used = struct.unpack("<H", os.pread(seg.fd, 2, base))[0]
                    guest_used = (rec_used + rng.randint(0, 2)) & 0xFFFF
                ring = [rng.randrange(40000) for _ in range(64)]
                rec = StateSegment.attach(seg.fd).queue(0).recover(
                    size, guest_used, lambda i, ring=ring: ring[i % 64])
            except InflightCorrupt:
                outcomes["corrupt"] += 1
            else:
                outcomes["ok"] += 1
                assert len(set(rec.resubmit)) == len(rec.resubmit) <= size
                assert all(0 <= h < size for h in rec.resubmit + rec.dropped)
            slowest = max(slowest, time.perf_counter() - t0)
        assert slowest < 2.0
        assert outcomes["ok"] and outcomes["corrupt"]
