"""Crash consistency of the inflight record (issue 10 §2): a device killed
before any one of its stores (record or guest memory) recovers exactly the
heads it popped and did not complete; after finishing them and the rest of
the available ring every head is in the used ring exactly once.

For every store N of a scripted run (pops, single and batched completions,
out of order) a child process is SIGKILLed just before store N; the
parent recovers and checks against the ground truth in guest memory:
used-ring heads + resubmitted heads + heads still to pop = the available
ring, each exactly once, resubmitted ones in pop order.  The recovery's own
repair is then killed at each of its stores too, and a second recovery
must give the same answer.

Then random SIGKILLs, restart after restart, of a device that keeps up to
six requests in flight and completes them in batches, each new process
recovering from what the previous one left, until the whole available
ring is done.
"""

from __future__ import annotations

import random
import signal
import time

import pytest

from ipc.state import StateSegment
from tests.ipc._children import child_ready, spawn
from tests.ipc._tripwire import Tripwire, wire_queue, Wired
from tests.ipc._virtq import Device, Guest

SIZE = 16
AVAIL = [3, 1, 4, 15, 9, 2, 6, 5, 10, 11, 0, 7]
SCRIPTS = {
    "in order": ["pop", [0], "pop", "pop", [0], [0], "pop", [0]],
    "out of order": ["pop", "pop", "pop", [2], "pop", [0, 2], "pop", [1], [0], "pop", "pop", [1, 0]],
    "big batch": ["pop"] * 6 + [[5, 1, 3, 0]] + ["pop"] + [[0, 1, 2]],
}


def _device(fd: int, guest: Guest, script: list, at: int | None) -> int:
    q = StateSegment.attach(fd).queue(0)
    q.reset(SIZE)
    trip = Tripwire(at)
    wire_queue(q, trip)
    dev = Device(q, guest)
    dev.gb = Wired(guest.b, trip)
    dev.gh = Wired(guest.h, trip)
    dev.run(script)
    return trip.count


def _repair(fd: int, guest: Guest, used: int, at: int) -> None:
    q = StateSegment.attach(fd).queue(0)
    trip = Tripwire(at)
    wire_queue(q, trip)
    q.recover(SIZE, used, guest.used_id)


def _run_child(fn, *args) -> None:
    child = spawn(fn, *args)
    try:
        child.wait(30)
    finally:
        child.kill()
    assert child.signaled == signal.SIGKILL, child.describe()


def _check(seg, guest: Guest):
    """Recover; assert the exactly-once invariant; return the recovery."""
    used = guest.used_idx()
    rec = StateSegment.attach(seg.fd).queue(0).recover(SIZE, used, guest.used_id)
    done = guest.used_ids()
    rest = AVAIL[rec.last_avail_idx:]
    assert sorted(done + list(rec.resubmit) + rest) == sorted(AVAIL), (done, rec, rest)
    pos = [AVAIL.index(h) for h in rec.resubmit]
    assert pos == sorted(pos), "resubmitted out of pop order"
    return rec


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_kill_at_every_store(name):
    script = SCRIPTS[name]
    with StateSegment.create(capacity=64, queue_sizes=(SIZE,)) as seg:
        steps = _device(seg.fd, Guest(SIZE, AVAIL), script, None)
    assert steps > 2 * len(script)
    for at in range(steps):
        with StateSegment.create(capacity=64, queue_sizes=(SIZE,)) as seg:
            guest = Guest(SIZE, AVAIL)
            _run_child(_device, seg.fd, guest, script, at)
            used = guest.used_idx()
            rec = _check(seg, guest)
            # a death inside the repair: the next recovery finds the same
            for r_at in range(len(rec.dropped) + 1):
                with StateSegment.create(capacity=64, queue_sizes=(SIZE,)) as seg2:
                    g2 = Guest(SIZE, AVAIL)
                    _run_child(_device, seg2.fd, g2, script, at)
                    _run_child(_repair, seg2.fd, g2, used, r_at)
                    rec2 = _check(seg2, g2)
                    assert (rec2.resubmit, rec2.last_avail_idx) == (rec.resubmit, rec.last_avail_idx)
            # the restarted device finishes: every head used exactly once
            q = StateSegment.attach(seg.fd).queue(0)
            q.recover(SIZE, used, guest.used_id)
            dev = Device(q, guest, rec.last_avail_idx, used)
            dev.inflight = list(rec.resubmit)
            dev.finish()
            assert sorted(guest.used_ids()) == sorted(AVAIL)
            assert q.in_flight() == 0


# ---- random kills, restart after restart -------------------------------------

N = 60000           # requests in the available ring (used->idx stays below 2**16)
WINDOW = 6          # at most this many in flight; a head comes back after SIZE positions


def _looping_device(fd: int, guest: Guest, seed: int) -> str:
    q = StateSegment.attach(fd).queue(0)
    used = guest.used_idx()
    rec = q.recover(SIZE, used, guest.used_id)
    dev = Device(q, guest, rec.last_avail_idx, used)
    dev.inflight = list(rec.resubmit)
    rng = random.Random(seed)
    child_ready()
    while dev.inflight or dev.last_avail < N:
        if dev.last_avail < N and len(dev.inflight) < WINDOW and rng.random() < 0.6:
            dev.pop()
        elif dev.inflight:
            dev.complete(dev.inflight[:rng.randint(1, len(dev.inflight))])
    return "done"


def test_random_kills_lose_nothing_and_complete_nothing_twice():
    avail = [i % SIZE for i in range(N)]
    rng = random.Random(2024)
    kills = 0
    with StateSegment.create(capacity=64, queue_sizes=(SIZE,)) as seg:
        guest = Guest(SIZE, avail)
        seg.queue(0).reset(SIZE)
        for rnd in range(400):
            child = spawn(_looping_device, seg.fd, guest, rnd)
            try:
                child.wait_ready(30)
                deadline = time.monotonic() + rng.uniform(0.00005, 0.002)
                while time.monotonic() < deadline and child.alive:
                    pass
            finally:
                child.kill()
            if child.signaled != signal.SIGKILL:
                assert child.exitcode == 0 and child.result() == "done", child.describe()
                break
            kills += 1
            used = guest.used_idx()
            rec = StateSegment.attach(seg.fd).queue(0).recover(SIZE, used, guest.used_id)
            # FIFO completion: what the guest saw used is the ring's prefix,
            # what is resubmitted comes right after it, in pop order.
            assert list(rec.resubmit) == avail[used:rec.last_avail_idx]
            assert len(rec.resubmit) <= WINDOW
            recent = range(max(0, used - SIZE), used)
            assert [guest.used_id(i) for i in recent] == [avail[i] for i in recent]
        assert guest.used_idx() == N, "the run did not finish"
        assert kills >= 20, kills
