"""Crash consistency of the state segment's writer (issue 10 §2).

Both stores are tested: ``store`` (the snapshot as a dict, packed here)
and ``store_packed`` (a model that packs its own, the device runtime's
store before each answer of such a model).

(a) Deterministic: a child process stores snapshots through a tripwire
that SIGKILLs it before its N-th store into the segment (optionally with
that store half done), for every N; the parent then finds exactly the
snapshot it must (the one before, or the one being written if its publish
completed) and a restarted writer continues after it.

(b) Random: a child stores snapshots and "answers" each (a byte on a pipe)
after its store, as fast as it can; the parent SIGKILLs it after a random
delay.  The snapshot read afterwards always includes the last answered
access (exactly once), never more than one beyond it, and the next child
continues from it.
"""

from __future__ import annotations

import os
import random
import signal
import time

import msgpack
import pytest

from ipc.state import AccessRecord, StateSegment
from tests.ipc._children import child_ready, spawn
from tests.ipc._tripwire import Tripwire, wire_state

STEPS_PER_STORE = 4
K = 3                                    # snapshots the child stores
KINDS = ["store", "packed"]


def content(n: int) -> dict:
    # lengths differ from one snapshot to the next
    return {"n": n, "blob": bytes([n & 0xFF]) * (300 * (n % 4) + 17), "s": "x" * n}


def record(n: int) -> AccessRecord:
    return AccessRecord(n, n * 10, 0)


def _check(snap, n: int) -> None:
    assert snap is not None and snap.number == n, snap
    assert snap.state == content(n)
    assert snap.access == record(n)


def _store(dev: StateSegment, kind: str, n: int) -> None:
    """Snapshot ``n`` with the record of access ``n``, by ``kind``."""
    if kind == "packed":
        rec = record(n)
        assert rec.status == 0      # (store_packed's record: an answered access)
        assert dev.store_packed(msgpack.packb(content(n), use_bin_type=True), rec.seq, rec.value)
    else:
        dev.store(content(n), record(n))


def _writer(fd: int, at: int | None, torn: bool, kind: str = "store") -> int:
    dev = StateSegment.attach(fd)
    trip = Tripwire(at, torn)
    wire_state(dev, trip)
    for n in range(2, 2 + K):
        _store(dev, kind, n)
    if kind == "packed":        # the same payload again stores nothing: no step
        assert not dev.store_packed(msgpack.packb(content(1 + K), use_bin_type=True), 99, 0)
    return trip.count


@pytest.mark.parametrize("kind", KINDS)
def test_steps_per_store(kind):
    with StateSegment.create(capacity=4096) as seg:
        seg.store(content(1), record(1))
        assert _writer(seg.fd, None, False, kind) == STEPS_PER_STORE * K
        _check(seg.read(), 1 + K)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("torn", [False, True], ids=["clean", "torn"])
def test_kill_at_every_store(torn, kind):
    for at in range(STEPS_PER_STORE * K):
        with StateSegment.create(capacity=4096) as seg:
            first = StateSegment.attach(seg.fd)
            first.store(content(1), record(1))
            first.close()
            child = spawn(_writer, seg.fd, at, torn, kind)
            try:
                child.wait(30)
            finally:
                child.kill()
            assert child.signaled == signal.SIGKILL, child.describe()
            being_written, step = 2 + at // STEPS_PER_STORE, at % STEPS_PER_STORE
            # Only a publish store that got its low half out (the number's
            # high half is 0 in both old and new) completes the snapshot.
            want = being_written if (torn and step == STEPS_PER_STORE - 1) else being_written - 1
            _check(seg.read(), want)
            # The next process resumes after it, keeping its record (a
            # store outside an access) or with the new access's.
            nxt = StateSegment.attach(seg.fd)
            if kind == "packed":
                assert nxt.store_packed(msgpack.packb({"after": at}), 100 + at, 7)
                rec = AccessRecord(100 + at, 7, 0)
            else:
                nxt.store({"after": at})
                rec = record(want)
            snap = seg.read()
            assert (snap.number, snap.state, snap.access) == (want + 1, {"after": at}, rec)
            nxt.close()


def _answering_writer(fd: int, answers: int, kind: str) -> None:
    dev = StateSegment.attach(fd)
    snap = dev.read()
    n = snap.number if snap else 0
    child_ready()
    while True:
        n += 1
        _store(dev, kind, n)
        os.write(answers, n.to_bytes(8, "little"))     # the answer, after the store


@pytest.mark.parametrize("kind", KINDS)
def test_random_kills_keep_every_answered_access(kind):
    rng = random.Random(99)
    with StateSegment.create(capacity=4096) as seg:
        r, w = os.pipe()
        os.set_blocking(r, False)
        answered = 0
        buf = b""
        try:
            rounds = 0
            while rounds < 25 or (answered < 50 and rounds < 200):
                rounds += 1
                child = spawn(_answering_writer, seg.fd, w, kind)
                try:
                    child.wait_ready(30)
                    deadline = time.monotonic() + rng.uniform(0.0001, 0.005)
                    while time.monotonic() < deadline:
                        pass
                finally:
                    child.kill()
                while True:
                    try:
                        chunk = os.read(r, 1 << 16)
                    except BlockingIOError:
                        break
                    buf += chunk
                whole = len(buf) // 8 * 8
                if whole:
                    answered = int.from_bytes(buf[whole - 8:whole], "little")
                    buf = buf[whole:]
                snap = seg.read()
                if answered:
                    assert snap is not None
                    assert answered <= snap.number <= answered + 1
                if snap is not None:
                    _check(snap, snap.number)
            assert answered >= 50
        finally:
            os.close(r)
            os.close(w)
