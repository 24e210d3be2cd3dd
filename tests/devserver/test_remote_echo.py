"""An isolated echo device: real processes, sockets and shared memory, no
KVM.  Python threads play the vCPUs: registry lookup, then
``endpoint.access``, then put, as the dispatcher does."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

import pytest

from devices.base import all_ones
from ipc import Bus
from vmm.endpoint import DeviceFailed
from vmm.remote import RemoteEndpoint, RemoteOptions
from tests.waiting import poll

PIO_A, PIO_B = 0x1000, 0x2000
MMIO = 0xD000_0000
FAKE = os.path.join(os.path.dirname(__file__), "fake_device.py")


def spawn_echo(registry, owner=2, name="echo0", pio=PIO_A, mmio=MMIO, **kw) -> RemoteEndpoint:
    params = {}
    if pio is not None:
        params["pio"] = hex(pio)
    if mmio is not None:
        params["mmio"] = hex(mmio)
    kw.setdefault("access_timeout", 5.0)
    return RemoteEndpoint.spawn("echo", params, owner, name, registry, 2, RemoteOptions(**kw))


def vcpu_access(registry, ep, vcpu, bus, addr, size, is_write=False, value=0):
    """What the dispatcher does for one exit: None when unclaimed."""
    ref = registry.get(bus, addr, size)
    if ref is None:
        return None
    try:
        assert ref.owner == ep.owner
        return ep.access(vcpu, int(bus), ref.cookie, ref.offset, size, is_write, value)
    finally:
        registry.put(ref)


def owned(registry, owner):
    return [r for r in registry.regions() if r.owner == owner]


def gone(pid: int) -> bool:
    """The process does not exist (it was reaped, not a zombie)."""
    return not os.path.exists(f"/proc/{pid}")


@pytest.fixture
def echo(registry):
    ep = spawn_echo(registry)
    try:
        yield ep
    finally:
        ep.close()


def test_scratch_at_every_size_from_two_vcpus(registry, echo):
    results = {}

    def vcpu(index, bus, base, sizes):
        out = []
        for size in sizes:
            for off in (0x00, 0x10, 0x28):
                value = (0x0102030405060708 * (size + index)) & all_ones(size)
                vcpu_access(registry, echo, index, bus, base + off, size, True, value)
                out.append(vcpu_access(registry, echo, index, bus, base + off, size) == value)
        results[index] = out

    threads = [threading.Thread(target=vcpu, args=(0, Bus.PIO, PIO_A, (1, 2, 4))),
               threading.Thread(target=vcpu, args=(1, Bus.MMIO, MMIO + 0x80, (1, 2, 4, 8)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(results[0]) and all(results[1]) and len(results[1]) == 12
    # Both windows address one register file.
    vcpu_access(registry, echo, 0, Bus.PIO, PIO_A + 0x40, 4, True, 0xA5A5_5A5A)
    assert vcpu_access(registry, echo, 1, Bus.MMIO, MMIO + 0x40, 4) == 0xA5A5_5A5A
    # An unknown register reads all ones; a PIO window takes no 8-byte access.
    assert vcpu_access(registry, echo, 0, Bus.PIO, PIO_A + 0xFC, 4) == all_ones(4)


def test_pid_register_names_the_device_process(registry, echo):
    pid = vcpu_access(registry, echo, 0, Bus.PIO, PIO_A + 0xF0, 4)
    assert pid == echo.pid == echo.reported_pid
    assert pid != os.getpid()
    n1 = vcpu_access(registry, echo, 0, Bus.PIO, PIO_A + 0xF4, 4)
    n2 = vcpu_access(registry, echo, 1, Bus.MMIO, MMIO + 0xF4, 4)
    assert n2 == n1 + 1


def test_relocation_back_and_forth_while_accessed(registry, echo):
    """The device moves its own PIO window from inside the handler of the
    very write that asks for it, 120 times, onto ranges that also overlap
    the old one, while another vCPU keeps reading."""
    pattern = 0x5EED_F00D
    vcpu_access(registry, echo, 0, Bus.PIO, PIO_A + 0x10, 4, True, pattern)
    bases = [PIO_A, PIO_B, PIO_B + 0x80, PIO_A]       # B+0x80 overlaps B
    stop = threading.Event()
    bad, reads = [], [0, 0]

    expect = {0x10: pattern, 0x90: 0}   # what each scratch offset holds

    def hammer():
        while not stop.is_set():
            for base in bases[:3]:
                ref = registry.get(Bus.PIO, base + 0x10, 4)
                if ref is None:
                    reads[1] += 1
                    continue
                try:
                    v = echo.access(1, Bus.PIO, ref.cookie, ref.offset, 4, False, 0)
                finally:
                    registry.put(ref)
                if v not in (expect[ref.offset], all_ones(4)):
                    bad.append((hex(ref.offset), hex(v)))
                else:
                    reads[0] += 1

    t = threading.Thread(target=hammer)
    t.start()
    current = PIO_A
    try:
        for i in range(120):
            new = bases[(i + 1) % len(bases)]
            if new == current:
                continue
            vcpu_access(registry, echo, 0, Bus.PIO, current + 0xF8, 4, True, new)
            pio = [r for r in owned(registry, echo.owner) if r.bus == Bus.PIO and not r.removing]
            assert [r.start for r in pio] == [new], (i, hex(current), hex(new))
            if not new <= current < new + 0x100:
                assert registry.get(Bus.PIO, current, 1) is None
            current = new
    finally:
        stop.set()
        t.join(30)
    assert not bad
    assert reads[0] > 0
    assert registry.check() == []
    assert not [r for r in registry.regions() if r.removing]
    assert vcpu_access(registry, echo, 0, Bus.PIO, current + 0x10, 4) == pattern


def test_sigkill_while_an_access_waits(registry, caplog):
    ep = spawn_echo(registry, access_timeout=5.0)
    try:
        os.kill(ep.pid, signal.SIGSTOP)           # the access will wait...
        out = {}

        def access():
            t = time.monotonic()
            try:
                vcpu_access(registry, ep, 0, Bus.PIO, PIO_A, 4)
            except DeviceFailed as e:
                out["error"], out["at"] = e, time.monotonic()
            out["started"] = t
        th = threading.Thread(target=access)
        th.start()
        assert poll(lambda: ep.call_stats().sleeps >= 1), "the access never waited"
        killed = time.monotonic()
        os.kill(ep.pid, signal.SIGKILL)           # ...and the device dies meanwhile
        th.join(10)
        assert "error" in out, "the access did not fail"
        assert out["at"] - killed < 1.0, "death must be noticed at once, not at the deadline"
        assert poll(lambda: not owned(registry, ep.owner)), "regions not reaped"
        assert ep.failed and "SIGKILL" in ep.failed
        with pytest.raises(DeviceFailed):
            ep.access(1, 0, 0, 0, 4, False, 0)
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("vmm.remote")]
        assert len(errors) == 1 and "echo0" in errors[0].getMessage()
    finally:
        ep.close()
    assert gone(ep.pid)


def test_a_device_that_does_not_answer_misses_the_deadline(registry):
    ep = spawn_echo(registry, access_timeout=0.3)
    try:
        os.kill(ep.pid, signal.SIGSTOP)
        t = time.monotonic()
        with pytest.raises(DeviceFailed, match="no answer within 0.3"):
            vcpu_access(registry, ep, 0, Bus.MMIO, MMIO, 8)
        assert 0.29 <= time.monotonic() - t < 2.0
        assert poll(lambda: not owned(registry, ep.owner))
    finally:
        ep.close()
    assert gone(ep.pid)


@pytest.mark.parametrize("mode, at_start", [
    ("junk-instead", True),
    ("silent", True),
    ("error", True),
    ("junk-after", False),
    ("bad-msgpack", False),
    ("unknown-type", False),
    ("extra-fds", False),
])
def test_garbage_on_the_control_socket_cuts_only_that_device(registry, echo, caplog, mode, at_start):
    command = (sys.executable, FAKE, mode)
    caplog.set_level(logging.ERROR, logger="vmm.remote")
    if at_start:
        with pytest.raises(DeviceFailed, match="fake0"):
            RemoteEndpoint.spawn("echo", {"pio": "0x3000"}, 3, "fake0", registry, 1,
                                 RemoteOptions(command=command, start_timeout=1.0))
    else:
        bad = RemoteEndpoint.spawn("echo", {"pio": "0x3000"}, 3, "fake0", registry, 1,
                                   RemoteOptions(command=command, start_timeout=5.0))
        try:
            assert poll(lambda: bad.failed is not None), "garbage went unnoticed"
            with pytest.raises(DeviceFailed):
                bad.access(0, 0, 0, 0, 4, False, 0)
            assert poll(lambda: gone(bad.pid) or bad._exited.is_set())
        finally:
            bad.close()
        assert gone(bad.pid)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("vmm.remote")]
    # A start failure is the DeviceFailed the caller reports (one line, not
    # a log line too); a device cut off later is one error line.
    assert len(errors) == (0 if at_start else 1) and all("fake0" in e for e in errors), errors
    # The other device never noticed.
    vcpu_access(registry, echo, 0, Bus.PIO, PIO_A + 4, 4, True, 77)
    assert vcpu_access(registry, echo, 1, Bus.MMIO, MMIO + 4, 4) == 77
    assert echo.failed is None


@pytest.mark.parametrize("kind, params, match", [
    ("echo", {}, "needs pio"),
    ("echo", {"pio": "0x1000", "colour": "red"}, "unknown parameter"),
    ("teapot", {}, "unknown device type"),
])
def test_bad_configuration_is_refused_clearly(registry, kind, params, match):
    with pytest.raises(DeviceFailed, match=match):
        RemoteEndpoint.spawn(kind, params, 4, "bad0", registry, nvcpus=1)
    assert not owned(registry, 4)


def test_overlapping_claim_is_refused(registry, echo):
    with pytest.raises(DeviceFailed, match="cannot claim"):
        spawn_echo(registry, owner=5, name="echo1", mmio=None)   # PIO_A is taken
    assert not owned(registry, 5)
    assert owned(registry, echo.owner)


def test_close_shuts_down_and_releases_everything(registry):
    ep = spawn_echo(registry)
    assert len(owned(registry, ep.owner)) == 2
    ep.close()
    assert ep.peer.returncode == 0, "the device should exit cleanly on shutdown"
    assert not owned(registry, ep.owner)
    with pytest.raises(DeviceFailed):
        ep.access(0, 0, 0, 0, 4, False, 0)
    ep.close()    # idempotent


def test_reset_restores_power_on_state(registry, echo):
    vcpu_access(registry, echo, 0, Bus.PIO, PIO_A, 4, True, 1234)
    echo.reset()
    assert vcpu_access(registry, echo, 0, Bus.PIO, PIO_A, 4) == 0


def test_polling_off_works_and_sleeps(registry):
    ep = spawn_echo(registry, poll_us=0)
    try:
        for i in range(50):
            vcpu_access(registry, ep, i & 1, Bus.PIO, PIO_A, 1, True, i)
            assert vcpu_access(registry, ep, i & 1, Bus.PIO, PIO_A, 1) == i
        s = ep.device_stats()
        assert s.poll_ns == 0 and s.window_ns == 0 and s.served >= 100
    finally:
        ep.close()


def test_no_fd_shm_or_process_leaks(registry):
    def shm():
        return set(os.listdir("/dev/shm"))
    fds_before, shm_before = len(os.listdir("/proc/self/fd")), shm()
    eps = [spawn_echo(registry, owner=10 + i, name=f"e{i}", pio=0x4000 + 0x100 * i, mmio=None)
           for i in range(2)]
    for i, ep in enumerate(eps):
        vcpu_access(registry, ep, 0, Bus.PIO, 0x4000 + 0x100 * i, 4, True, 5)
    os.kill(eps[1].pid, signal.SIGKILL)              # one dies, one closes cleanly
    assert poll(lambda: eps[1].failed is not None)
    for ep in eps:
        ep.close()
    assert all(gone(ep.pid) for ep in eps)
    assert len(os.listdir("/proc/self/fd")) == fds_before
    # Other processes on the machine may come and go in /dev/shm: look at
    # names of this process only (the slot segments are memfds, never there).
    assert not [n for n in shm() - shm_before if str(os.getpid()) in n]
    with open("/proc/self/maps") as f:
        assert "splitvmm-slots" not in f.read(), "a slot segment is still mapped"
    assert registry.regions() == []


def test_device_cpu_affinity(registry):
    cpu = sorted(os.sched_getaffinity(0))[-1]
    ep = spawn_echo(registry, cpus={cpu})
    try:
        assert os.sched_getaffinity(ep.pid) == {cpu}
        assert vcpu_access(registry, ep, 0, Bus.PIO, PIO_A + 0xF0, 4) == ep.pid
    finally:
        ep.close()
