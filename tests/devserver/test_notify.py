"""sd_notify without libsystemd (devserver.notify): real datagram sockets,
a path and an abstract name, the watchdog's cadence and its environment."""

from __future__ import annotations

import os

import pytest

from devserver.notify import Notifier, Watchdog, notify_address, watchdog_interval
from tests.devserver.servicekit import NotifySocket


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_ready_status_watchdog_stopping_arrive(tmp_path, abstract):
    sink = NotifySocket(tmp_path, abstract=abstract)
    env = {"NOTIFY_SOCKET": sink.env_value, "OTHER": "1"}
    n = Notifier.from_environ(env)
    try:
        assert "NOTIFY_SOCKET" not in env and env["OTHER"] == "1"     # unset, like sd_notify(1, ...)
        assert n.ready("listening on fd 3")
        assert sink.receive(5) == {"READY": "1", "STATUS": "listening on fd 3"}
        assert n.status("two\nlines")
        assert sink.receive(5) == {"STATUS": "two lines"}            # one line, always
        assert n.watchdog()
        assert sink.receive(5) == {"WATCHDOG": "1"}
        assert n.stopping()
        assert sink.receive(5) == {"STOPPING": "1"}
    finally:
        n.close()
        sink.close()


def test_without_notify_socket_nothing_is_sent():
    n = Notifier.from_environ({})
    assert not n.enabled
    assert not n.ready() and not n.watchdog()


def test_a_manager_that_went_away_is_not_an_error(tmp_path, caplog):
    sink = NotifySocket(tmp_path)
    n = Notifier.from_environ({"NOTIFY_SOCKET": sink.env_value})
    sink.close()
    os.unlink(sink.env_value)
    assert not n.ready()
    assert not n.watchdog()           # logged once, never raised
    assert sum("cannot notify" in r.getMessage() for r in caplog.records) == 1
    n.close()


def test_addresses():
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("@abc") == "\0abc"
    assert notify_address("vsock:2:1234") is None
    assert notify_address("@") is None


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_pid_only():
    me = os.getpid()
    assert watchdog_interval({"WATCHDOG_USEC": "2000000"}) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(me)}) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(me + 1)}) is None
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None


def test_watchdog_pings_once_per_interval_with_the_status(tmp_path):
    sink = NotifySocket(tmp_path)
    now = [100.0]
    n = Notifier(sink.env_value)
    dog = Watchdog(n, 0.5, status=lambda: "serving", clock=lambda: now[0])
    try:
        dog.tick()
        assert sink.receive(5) == {"WATCHDOG": "1", "STATUS": "serving"}
        for _ in range(100):          # ticks within the interval cost a clock read, send nothing
            now[0] += 0.004
            dog.tick()
        assert sink.receive(0) is None
        now[0] += 0.2
        dog.tick()
        assert sink.receive(5) == {"WATCHDOG": "1", "STATUS": "serving"}
        assert dog.pings == 2
        assert Watchdog(n, None).wait_slice(1.0) == 1.0 and dog.wait_slice(1.0) == 0.5
    finally:
        n.close()
        sink.close()


def test_a_manager_that_does_not_read_never_stalls_the_sender(tmp_path):
    """The keep-alives come from the loop that serves the VM: with the
    manager's queue full, a send returns at once (dropped, logged once)."""
    import time

    sink = NotifySocket(tmp_path)          # never read
    n = Notifier(sink.env_value)
    try:
        start = time.monotonic()
        sent = [n.watchdog() for _ in range(5000)]
        assert time.monotonic() - start < 5.0
        assert sent[0] and not sent[-1]     # the queue filled up and the rest were dropped
    finally:
        n.close()
        sink.close()
