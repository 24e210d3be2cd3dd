"""Access slots: round trips in one process and across processes, and the
VMM side's distrust of what the device writes back."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time

import pytest

from ipc import slotbench
from ipc.slots import (STATUS_ERROR, STATUS_OK, SlotBadResponse, SlotCaller, SlotDeviceError,
                       SlotLayoutError, SlotPeerDead, SlotServer, SlotsStopped, SlotTimeout)
from ipc._slots_c import lib
from tests.waiting import wait_for


def ones(size: int) -> int:
    return (1 << (8 * size)) - 1


@pytest.fixture
def pair():
    caller = SlotCaller.create(4)
    server = SlotServer.from_fd(caller.fd, poll_ns=50_000)
    yield caller, server
    server.stop()
    server.close()
    caller.close()


def serve_in_thread(server: SlotServer, handler, stop: threading.Event) -> threading.Thread:
    def loop():
        while not stop.is_set():
            try:
                req = server.next(0.05)
            except SlotsStopped:
                return
            if req is not None:
                handler(req)
    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return t


def test_round_trip_in_process_all_sizes(pair):
    caller, server = pair
    seen = []

    def handler(req):
        seen.append(req)
        server.complete(req, 0 if req.is_write else 0x1122334455667788 + req.offset)

    stop = threading.Event()
    t = serve_in_thread(server, handler, stop)
    try:
        for size in (1, 2, 4, 8):
            got = caller.call(1, 1, 7, 0x10, size, False, 0, timeout=2.0)
            assert got == (0x1122334455667798 & ones(size))
            assert caller.call(2, 0, 3, 0x20, size, True, 0xFFFF_FFFF_FFFF_FFFF, timeout=2.0) == 0
        w = seen[1]
        assert (w.slot, w.space, w.cookie, w.offset, w.size, w.is_write, w.value) == (2, 0, 3, 0x20, 1, 1, 0xFF)
    finally:
        stop.set()
        server.stop()
        t.join(2)


def test_bad_arguments(pair):
    caller, _ = pair
    with pytest.raises(ValueError):
        caller.call(4, 0, 0, 0, 4, False, 0, 0.1)
    with pytest.raises(ValueError):
        caller.call(0, 0, 0, 0, 3, False, 0, 0.1)
    with pytest.raises(ValueError):
        caller.call(0, 0, 0, -1, 4, False, 0, 0.1)
    with pytest.raises(ValueError):
        SlotCaller.create(0)


def test_segment_is_sealed_and_checked():
    caller = SlotCaller.create(2)
    try:
        with pytest.raises(OSError) as e:
            os.ftruncate(caller.fd, 0)
        assert e.value.errno == errno.EPERM
        seals = fcntl.fcntl(caller.fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_SEAL
    finally:
        caller.close()
    fd = os.memfd_create("not-slots")
    try:
        os.ftruncate(fd, 4096)
        with pytest.raises(SlotLayoutError):
            SlotServer.from_fd(fd)
        os.write(fd, b"garbage" * 10)
        with pytest.raises(SlotLayoutError):
            SlotServer.from_fd(fd)
    finally:
        os.close(fd)


def test_timeout_when_nobody_answers(pair):
    caller, _ = pair
    t = time.monotonic()
    with pytest.raises(SlotTimeout):
        caller.call(0, 0, 0, 0, 4, False, 0, timeout=0.2)
    assert 0.19 <= time.monotonic() - t < 1.0
    assert caller.stats().timeouts == 1


def wait_asleep(caller: SlotCaller, timeout: float = 10.0) -> None:
    """Return once a call has given up spinning and sleeps on its answer
    (which never comes)."""
    deadline = time.monotonic() + timeout
    while caller.stats().sleeps < 1:
        assert time.monotonic() < deadline, "the call never went to sleep"
        time.sleep(0.005)


def test_mark_dead_wakes_a_waiter_at_once(pair):
    caller, _ = pair
    out = {}

    def wait():
        try:
            caller.call(0, 0, 0, 0, 4, False, 0, timeout=10.0)
        except SlotPeerDead:
            out["at"] = time.monotonic()
    th = threading.Thread(target=wait)
    th.start()
    wait_asleep(caller)
    marked = time.monotonic()
    caller.mark_dead()
    th.join(5)
    assert out["at"] - marked < 0.5
    with pytest.raises(SlotPeerDead):
        caller.call(1, 0, 0, 0, 4, False, 0, timeout=1.0)


def test_answers_are_not_trusted(pair):
    caller, server = pair
    h = server._h

    def scribbler(seq_delta, value, status):
        def run():
            req = server.next(2.0)
            lib.svs_scribble_response(h, req.slot, req.seq + seq_delta, value, status)
        th = threading.Thread(target=run)
        th.start()
        return th

    # The wrong sequence number is no answer at all.
    th = scribbler(1, 5, STATUS_OK)
    with pytest.raises(SlotTimeout):
        caller.call(0, 0, 0, 0, 4, False, 0, timeout=0.3)
    th.join()
    # The value is masked to the access size.
    th = scribbler(0, 0xDEADBEEF_CAFEF00D, STATUS_OK)
    assert caller.call(1, 0, 0, 0, 2, False, 0, timeout=2.0) == 0xF00D
    th.join()
    # A write reads back as 0, whatever the device wrote.
    th = scribbler(0, 0x1234, STATUS_OK)
    assert caller.call(1, 0, 0, 0, 4, True, 9, timeout=2.0) == 0
    th.join()
    th = scribbler(0, 0, STATUS_ERROR)
    with pytest.raises(SlotDeviceError):
        caller.call(2, 0, 0, 0, 4, False, 0, timeout=2.0)
    th.join()
    th = scribbler(0, 0, 77)
    with pytest.raises(SlotBadResponse):
        caller.call(3, 0, 0, 0, 4, False, 0, timeout=2.0)
    th.join()


def test_close_waits_for_a_call_in_flight(pair):
    caller, _ = pair
    errors = []

    def wait():
        try:
            caller.call(0, 0, 0, 0, 4, False, 0, timeout=10.0)
        except Exception as e:
            errors.append(e)
    th = threading.Thread(target=wait)
    th.start()
    wait_asleep(caller)
    caller.close()          # must not unmap under the waiting call
    th.join(5)
    assert isinstance(errors[0], SlotPeerDead)
    assert caller.closed


@pytest.mark.parametrize("poll_ns, move", [(200_000, False), (200_000, True), (0, False)])
def test_cross_process_round_trip(poll_ns, move):
    caller = SlotCaller.create(2)
    proc = slotbench.spawn_server(caller, poll_ns, move=move)
    try:
        for i in range(300):
            assert caller.call(i & 1, 0, 0, i, 4, False, 0, timeout=5.0) == i + 1
        stats = caller.device_stats()
        assert stats.served >= 300
        if poll_ns == 0:
            assert stats.poll_ns == 0 and stats.window_ns == 0
    finally:
        slotbench.stop_server(caller, proc)
        caller.close()
    assert proc.returncode == 0


def test_idle_server_sleeps(pair):
    caller, server = pair
    stop = threading.Event()
    t = serve_in_thread(server, lambda r: server.complete(r, 1), stop)
    try:
        for _ in range(50):
            caller.call(0, 0, 0, 0, 4, False, 0, timeout=2.0)
        # Idle: the poll window runs out and the server goes to sleep.
        wait_for(lambda: caller.device_stats().sleeps >= 1, 10.0, "the idle server to sleep")
        s = caller.device_stats()
        assert s.sleeps >= 1 and s.served == 50
    finally:
        stop.set()
        server.stop()
        t.join(2)


def test_quick_benchmark_function():
    r = slotbench.measure(poll_ns=200_000, n=200, rounds=1)
    assert r["round_trip_us"] > 0 and 0 <= r["device_poll_hit_ratio"] <= 1


def test_answer_must_echo_the_access_number_and_survives_the_death():
    # The VMM checks the access sequence number the device echoes; after
    # a death, answer() finds an answer the device wrote before dying, and
    # only for the access that was actually sent on that slot.
    from ipc.slots import SlotBadResponse

    caller = SlotCaller.create(2)
    server = SlotServer.from_fd(caller.fd, poll_ns=0)
    try:
        def serve_once(aseq_delta: int):
            req = server.next(2.0)
            assert req is not None
            server.complete(req._replace(aseq=req.aseq + aseq_delta), 0x1234)

        t = threading.Thread(target=serve_once, args=(0,))
        t.start()
        assert caller.call(0, 0, 0, 0, 2, False, 0, timeout=2.0, aseq=41) == 0x1234
        t.join()
        t = threading.Thread(target=serve_once, args=(1,))
        t.start()
        with pytest.raises(SlotBadResponse):
            caller.call(0, 0, 0, 0, 2, False, 0, timeout=2.0, aseq=42)
        t.join()
        # an answer written, then the device declared dead: answer() has it
        t = threading.Thread(target=serve_once, args=(0,))
        t.start()
        assert caller.call(1, 0, 0, 0, 4, False, 0, timeout=2.0, aseq=43) == 0x1234
        t.join()
        caller.mark_dead()
        assert caller.answer(1, 43) == 0x1234
        assert caller.answer(1, 44) is None          # never sent on slot 1
        with pytest.raises(SlotPeerDead):
            caller.call(1, 0, 0, 0, 4, False, 0, timeout=0.5, aseq=44)
        assert caller.answer(1, 44) is None          # refused before it was sent
    finally:
        server.close()
        caller.close()


def test_complete_next_answers_then_takes_the_next_request(pair):
    """The serving loop's one call per access: the answer goes out before
    the wait for the next request, on any slot; a stop ends it."""
    caller, server = pair
    answers: list[int] = []

    def ask():
        for i in range(50):
            answers.append(caller.call(i % 4, 0, 0, i, 4, False, 0, timeout=5.0))

    asker = threading.Thread(target=ask, daemon=True)
    asker.start()
    req = None
    deadline = time.monotonic() + 10
    while req is None and time.monotonic() < deadline:
        req = server.next(0.05)
    assert req is not None
    served = 0
    while served < 50 and time.monotonic() < deadline:
        if req is None:
            req = server.next(0.05)
            continue
        served += 1
        if served == 50:
            server.complete(req, 0x100 + req.offset)
            break
        req = server.complete_next(req, 0x100 + req.offset, STATUS_OK, 0.05)
    asker.join(5)
    assert answers == [0x100 + i for i in range(50)]
    assert server.complete_next(req, 0, STATUS_OK, 0.01) is None     # nothing asked: a timeout
    server.stop()
    with pytest.raises(SlotsStopped):
        server.complete_next(req, 0, STATUS_OK, 0.01)
