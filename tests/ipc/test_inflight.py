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


def test_pop_push_publish_and_recover(seg):
    q = seg.queue(0)
    q.reset(SIZE)
    for h in (5, 9, 2):
        q.pop(h)
    q.push(9)
    q.publish(1)
    assert q.in_flight() == 2
    fresh = StateSegment.attach(seg.fd).queue(0)          # the restarted device
    rec = fresh.recover(SIZE, 1)
    assert rec.resubmit == (5, 2) and rec.last_avail_idx == 3 and rec.dropped == ()
    # it carries on: new pops order after the old ones
    fresh.pop(7)
    again = StateSegment.attach(seg.fd).queue(0).recover(SIZE, 1)
    assert again.resubmit == (5, 2, 7)


def test_guest_saw_the_batch_but_flags_were_not_cleared(seg):
    q = seg.queue(0)
    q.reset(SIZE)
    for h in (1, 2, 3, 4):
        q.pop(h)
    q.push(3)
    q.push(1)
    # death here, after the guest's used->idx store (now 2), before publish()
    rec = StateSegment.attach(seg.fd).queue(0).recover(SIZE, 2)
    assert rec.resubmit == (2, 4) and sorted(rec.dropped) == [1, 3] and rec.last_avail_idx == 4
    # the repair stuck, and a second recovery finds the same
    rec2 = StateSegment.attach(seg.fd).queue(0).recover(SIZE, 2)
    assert rec2.resubmit == (2, 4) and rec2.dropped == ()


def test_pushed_but_guest_index_not_stored(seg):
    q = seg.queue(0)
    q.reset(SIZE)
    q.pop(6)
    q.push(6)
    rec = StateSegment.attach(seg.fd).queue(0).recover(SIZE, 0)
    assert rec.resubmit == (6,) and rec.last_avail_idx == 1


def test_used_index_wraps(seg):
    q = seg.queue(0)
    q.reset(SIZE)
    q.publish(0xFFFF)
    q.pop(0)
    q.pop(1)
    q.push(0)
    rec = StateSegment.attach(seg.fd).queue(0).recover(SIZE, 0)   # guest's 0xFFFF + 1
    assert rec.resubmit == (1,) and rec.dropped == (0,) and rec.last_avail_idx == 1


def test_device_errors(seg):
    q = seg.queue(0)
    with pytest.raises(ValueError):
        q.pop(0)                   # not reset: size 0
    q.reset(8)
    with pytest.raises(ValueError):
        q.pop(8)
    with pytest.raises(InflightError):
        q.push(3)                  # never popped
    q.pop(3)
    q.push(3)
    with pytest.raises(InflightError):
        q.push(3)                  # twice in one batch
    with pytest.raises(ValueError):
        q.reset(SIZE + 1)
    with pytest.raises(ValueError):
        q.recover(0, 0)
    with pytest.raises(ValueError):
        q.recover(8, 1 << 16)


def test_full_run_through_the_model(seg):
    g = Guest(SIZE, [3, 1, 4, 15, 9, 2, 6, 5, 10, 11])
    q = seg.queue(0)
    q.reset(SIZE)
    dev = Device(q, g)
    dev.run(["pop", "pop", [1], "pop", "pop", [2, 0], "pop"])
    rec = StateSegment.attach(seg.fd).queue(0).recover(SIZE, g.used_idx())
    assert list(rec.resubmit) == dev.inflight
    assert rec.last_avail_idx == dev.last_avail
    dev.finish()
    assert sorted(g.used_ids()) == sorted(g.avail)


# ---- hostile records --------------------------------------------------------


def _entry(seg, head: int) -> int:
    return seg.layout.queue_offset(0) + QUEUE_HEADER_SIZE + head * ENTRY_SIZE


def _pw(seg, off: int, data: bytes) -> None:
    os.pwrite(seg.fd, data, off)


@pytest.mark.parametrize("case", ["flag 2", "batch too long", "list loops", "list leaves queue",
                                  "huge counter"])
def test_hostile_record_is_refused(seg, case):
    q = seg.queue(0)
    q.reset(SIZE)
    q.pop(1)
    q.pop(2)
    base = seg.layout.queue_offset(0)
    guest_used = 0
    if case == "flag 2":
        _pw(seg, _entry(seg, 4) + 10, b"\x02")
    elif case == "batch too long":
        guest_used = SIZE + 1
    elif case == "list loops":
        _pw(seg, base + 2, struct.pack("<H", 1))
        _pw(seg, _entry(seg, 1) + 8, struct.pack("<H", 1))
        guest_used = 2
    elif case == "list leaves queue":
        _pw(seg, base + 2, struct.pack("<H", 1))
        _pw(seg, _entry(seg, 1) + 8, struct.pack("<H", 900))
        guest_used = 2
    elif case == "huge counter":
        _pw(seg, _entry(seg, 2), struct.pack("<Q", 1 << 63))
    with pytest.raises(InflightCorrupt):
        StateSegment.attach(seg.fd).queue(0).recover(SIZE, guest_used)


def test_hostile_entries_past_the_queue_size_are_ignored(seg):
    q = seg.queue(0)
    q.reset(SIZE)
    q.pop(1)
    _pw(seg, _entry(seg, 12) + 10, b"\x07")
    assert StateSegment.attach(seg.fd).queue(0).recover(8, 0).resubmit == (1,)


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
                    _pw(seg, _entry(seg, head), struct.pack("<QHB", rng.randrange(1 << 20),
                                                             rng.randrange(1 << 16), rng.randint(0, 1)))
            size = rng.choice((1, 256, 32768))
            t0 = time.perf_counter()
            try:
                if rng.random() < 0.5:
                    guest_used = rng.randrange(1 << 16)
                else:                  # close to the record's, as after a real death
                    rec_used = struct.unpack("<H", os.pread(seg.fd, 2, base))[0]
                    guest_used = (rec_used + rng.randint(0, 2)) & 0xFFFF
                rec = StateSegment.attach(seg.fd).queue(0).recover(size, guest_used)
            except InflightCorrupt:
                outcomes["corrupt"] += 1
            else:
                outcomes["ok"] += 1
                assert len(set(rec.resubmit)) == len(rec.resubmit) <= size
                assert all(0 <= h < size for h in rec.resubmit + rec.dropped)
            slowest = max(slowest, time.perf_counter() - t0)
        assert slowest < 2.0
        assert outcomes["ok"] and outcomes["corrupt"]
