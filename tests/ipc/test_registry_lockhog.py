"""Lock hog: a process takes the registry lock and sleeps on it.

A lookup with a deadline fails within that deadline and names the holder's
pid; once the hog is SIGKILLed, the next locker gets EOWNERDEAD, recovers
(slots are the truth, the index is rebuilt) and carries on.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

import pytest

from ipc import Bus, LockTimeout, Registry

CTX = multiprocessing.get_context("spawn")


def _hog(name: str, conn, hold: float) -> None:
    """Take the lock, report, and sleep holding it (or exit holding it)."""
    from ipc._registry_c import lib

    reg = Registry.attach(name)
    rc = lib.svm_reg_lock_for_test(reg._h, 5_000_000_000)
    conn.send(rc)
    if hold > 0:
        time.sleep(hold)
    os._exit(0)  # never unlocks


def _start_hog(name: str, hold: float = 60.0):
    parent, child = CTX.Pipe()
    p = CTX.Process(target=_hog, args=(name, child, hold), daemon=True)
    p.start()
    assert parent.poll(30), "hog did not start"
    assert parent.recv() == 0, "hog could not take the lock"
    return p


def _kill(p) -> None:
    if p.is_alive():
        os.kill(p.pid, signal.SIGKILL)
    p.join(10)
    assert not p.is_alive()


@pytest.fixture
def hogged(registry):
    registry.register(Bus.MMIO, 0x1000, 0x1000, owner=1, cookie=11)
    registry.register(Bus.PIO, 0x60, 4, owner=2, cookie=22)
    p = _start_hog(registry.name)
    try:
        yield registry, p
    finally:
        _kill(p)


def test_get_times_out_naming_the_holder(hogged):
    registry, hog = hogged
    before = registry.recoveries
    t0 = time.monotonic()
    with pytest.raises(LockTimeout) as info:
        registry.get(Bus.MMIO, 0x1000, timeout=0.2)
    elapsed = time.monotonic() - t0
    assert 0.15 <= elapsed < 1.0, elapsed
    exc = info.value
    assert exc.holder_pid == hog.pid
    assert exc.holder_tid == hog.pid  # the hog's main thread
    assert str(hog.pid) in str(exc)
    assert registry.holder() == (hog.pid, hog.pid)

    # Kill the hog: the next operation recovers through EOWNERDEAD.
    _kill(hog)
    t0 = time.monotonic()
    with registry.get(Bus.MMIO, 0x1800, 4, timeout=0.2) as ref:
        assert (ref.owner, ref.cookie, ref.offset) == (1, 11, 0x800)
    assert time.monotonic() - t0 < 1.0
    assert registry.recoveries == before + 1
    assert registry.check() == []
    assert sorted((r.start, r.owner, r.refcount, r.removing) for r in registry.regions()) == [
        (0x60, 2, 0, False), (0x1000, 1, 0, False)]
    # And the lock works normally again.
    registry.register(Bus.MMIO, 0x3000, 0x10, owner=3)
    assert registry.unregister_owner(3) == 1
    assert registry.recoveries == before + 1
    assert registry.holder()[1] == 0


def test_every_operation_honours_the_deadline(hogged):
    registry, hog = hogged
    registry.lock_timeout = 0.1  # the default deadline, used when none is given
    ops = [
        lambda: registry.get(Bus.PIO, 0x60),
        lambda: registry.register(Bus.MMIO, 0x5000, 0x10, owner=3),
        lambda: registry.unregister(Bus.PIO, 0x60, owner=2),
        lambda: registry.unregister_owner(2),
        lambda: registry.regions(),
        lambda: registry.check(),
    ]
    for op in ops:
        t0 = time.monotonic()
        with pytest.raises(LockTimeout) as info:
            op()
        elapsed = time.monotonic() - t0
        assert 0.07 <= elapsed < 1.0, elapsed
        assert info.value.holder_pid == hog.pid
    _kill(hog)
    assert registry.check() == []
    assert len(registry.regions()) == 2


def test_put_timeout_keeps_the_reference(registry):
    registry.register(Bus.MMIO, 0x1000, 0x1000, owner=1)
    ref = registry.get(Bus.MMIO, 0x1000)
    hog = _start_hog(registry.name)
    try:
        with pytest.raises(LockTimeout):
            registry.put(ref, timeout=0.1)
        assert ref.held  # nothing happened; it can be put later
    finally:
        _kill(hog)
    registry.put(ref)
    assert not ref.held
    assert registry.regions()[0].refcount == 0
    assert registry.check() == []


def test_waiter_wakes_when_the_holder_dies(registry):
    """A locker already waiting (long deadline) gets the lock as soon as the
    holder is killed, not at its deadline."""
    registry.register(Bus.MMIO, 0x1000, 0x1000, owner=1, cookie=11)
    before = registry.recoveries
    hog = _start_hog(registry.name)
    killer = threading.Timer(0.3, lambda: os.kill(hog.pid, signal.SIGKILL))
    killer.start()
    try:
        t0 = time.monotonic()
        with registry.get(Bus.MMIO, 0x1000, timeout=10) as ref:
            assert ref.cookie == 11
        elapsed = time.monotonic() - t0
    finally:
        killer.cancel()
        _kill(hog)
    assert 0.25 <= elapsed < 3.0, elapsed
    assert registry.recoveries == before + 1
    assert registry.check() == []


def test_holder_exiting_without_unlock_is_recovered(registry):
    """A holder that exits (not killed) with the lock held is a dead owner too."""
    registry.register(Bus.PCI, 0x8000, 0x1000, owner=5)
    before = registry.recoveries
    hog = _start_hog(registry.name, hold=0)
    hog.join(10)
    assert hog.exitcode == 0
    with registry.get(Bus.PCI, 0x8000) as ref:
        assert ref.owner == 5
    assert registry.recoveries == before + 1
    assert registry.check() == []


def test_recovery_is_seen_by_other_handles(registry):
    registry.register(Bus.MMIO, 0x1000, 0x1000, owner=1)
    with Registry.attach(registry.name) as other:
        before = other.recoveries
        hog = _start_hog(registry.name)
        with pytest.raises(LockTimeout) as info:
            other.regions(timeout=0.1)
        assert info.value.holder_pid == hog.pid
        _kill(hog)
        assert other.check() == []
        assert other.recoveries == before + 1 == registry.recoveries
        assert len(registry.regions()) == 1
