"""Devices killed and started again while a guest keeps using them (issue
10 §2-§3), on real KVM with real device processes, spawned by the VMM and
as services (``connect=``): the guest sees no error and no wrong value,
every access completes exactly once with respect to the device's state
(guests: tests/guests/restart_*.c)."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time


import pytest

from ipc import Bus
from tests.vmm.conftest import needs_kvm
from vmm.config import parse_device_spec
from vmm.machine import Machine
from vmm.outcome import Ending

pytestmark = needs_kvm

PIO, MMIO = 0x1000, 0xD000_0000
STOP = 0x3F0
STATS = 0x20_0000
KILLS = 20


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


class Killer(threading.Thread):
    """SIGKILLs the device ``kills`` times at random moments, each time
    once it serves again and the guest has made progress."""

    def __init__(self, machine: Machine, ep, kills: int, progress, seed: int = 1,
                 before_kill=None, pid=None):
        super().__init__(daemon=True)
        self.m, self.ep, self.kills, self.progress = machine, ep, kills, progress
        #: the device's pid now (default: as the endpoint knows it)
        self.pid = pid or (lambda: self.ep.pid)
        self.rng = random.Random(seed)
        self.before_kill = before_kill
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.pauses: list[float] = []

    def run(self) -> None:
        try:
            for i in range(self.kills):
                seen = self.progress()
                wait_for(lambda s=seen: self.progress() > s + 20, 60, "guest progress")
                time.sleep(self.rng.uniform(0, 0.03))
                pid, restarts = self.pid(), self.ep.restarts
                if self.before_kill is not None:
                    self.before_kill(i)
                os.kill(pid, signal.SIGKILL)
                wait_for(lambda r=restarts: self.ep.restarts > r or self.ep.failed, 30, "the restart")
                assert self.ep.failed is None, self.ep.failed
                self.pauses.append(self.ep.last_restart)
        except BaseException as e:
            self.error = e
        finally:
            self.done.set()


def run_killed(m: Machine, ep, *, kills: int = KILLS, seed: int = 1, before_kill=None, pid=None):
    """Runs the loaded guest while a Killer kills ``ep`` ``kills`` times,
    the guest's progress being the u64 at STATS + 8; the STOP port reads 1
    once the kills are done.  Checks the guest powered off and every kill
    was a restart; returns the killer."""
    killer = Killer(m, ep, kills, lambda: m.memory.read_u64(STATS + 8), seed=seed, before_kill=before_kill,
                    pid=pid)
    m.add_handler(Bus.PIO, STOP, 1, read=lambda vcpu, off, size: 1 if killer.done.is_set() else 0)
    killer.start()
    outcome = m.run(timeout=240)
    killer.join(10)
    assert killer.error is None, repr(killer.error)
    assert outcome.ending is Ending.POWER_OFF, (
        f"{outcome} after {m.memory.read_u64(STATS + 8)} rounds, {len(killer.pauses)} restarts; guest's "
        f"details {[hex(m.memory.read_u64(STATS + 32 + 8 * i)) for i in range(3)]}")
    assert ep.restarts == kills and ep.failed is None
    return killer


def pauses(killer: Killer) -> str:
    p = sorted(killer.pauses)
    return f"restart ms median {p[len(p) // 2] * 1000:.1f} max {p[-1] * 1000:.1f}"


@contextlib.contextmanager
def placed(m: Machine, spec: str, mode: str, tmp_path, console=None):
    """Adds the device of ``spec`` (kind first, no id; its parameters are
    the service's in service mode) as ``mode`` says: ``spawned`` by the
    VMM, or ``service``: ``devserver serve`` under the test supervisor
    (re-executed with LISTEN_FDS when it dies), the VMM attached with
    connect=PATH.  ``console``: the ConsoleFds it gets (from the VMM in
    either mode).  Yields (endpoint, the pid to kill now): the spawned
    device's, or the service's listener, as a service manager would (the
    session serving the VM dies with it)."""
    if mode == "spawned":
        ep = m.add_device(parse_device_spec(f"{spec},id=d0,restart_burst=100"), console=console)
        yield ep, lambda: ep.pid
        return
    from tests.devserver.servicekit import service_env, started_pids, supervised
    path = tmp_path / "dev.sock"
    svc = supervised(spec, path, env=service_env())
    try:
        ep = m.add_device(parse_device_spec(f"{spec.split(',')[0]},id=d0,connect={path},restart_burst=100,"
                                            "restart_timeout=20"), console=console)
        yield ep, lambda: started_pids(svc)[-1]
    except BaseException:
        print("the service's log, its end:\n" + "\n".join(svc.err.text().splitlines()[-40:]))
        raise
    finally:
        svc.stop()


def pci_guest(guest_cache, name: str):
    """tests/guests/NAME.c with the guest PCI library, built."""
    from tests.vmm.conftest import GUEST_SOURCES
    from vmm import guests
    return guests.build([GUEST_SOURCES / f"{name}.c", guests.HERE / "pci.c"], guest_cache)


def mid_request(m: Machine, seed: int):
    """A Killer's before_kill for a guest whose stats hold its avail and
    used ring addresses at STATS + 16 and + 24: every other kill waits
    until a request is outstanding (avail ahead of used), then a random
    few tens of microseconds -- so some land between the pop and the
    completion."""
    rng = random.Random(seed)

    def before_kill(i: int) -> None:
        if i % 2:
            return
        avail, used = m.memory.read_u64(STATS + 16), m.memory.read_u64(STATS + 24)
        idx = lambda a: int.from_bytes(m.memory.read(a + 2, 2), "little")  # noqa: E731
        deadline = time.monotonic() + 10
        while idx(avail) == idx(used):          # busy: a request lasts ~100 us
            assert time.monotonic() < deadline, "no outstanding request"
        t = time.monotonic() + rng.uniform(0, 0.00008)
        while time.monotonic() < t:
            pass
    return before_kill


class ConsoleCapture:
    """Pipes for a device's console (ConsoleFds): what the device writes
    is collected in ``got`` by a thread until the context ends."""

    def __enter__(self):
        from devices.base import ConsoleFds
        self.out_r, self.out_w = os.pipe()
        self.in_r, self.in_w = os.pipe()
        self.got = bytearray()
        self.fds = ConsoleFds(self.out_w, self.in_r)
        self.reader = threading.Thread(target=self._drain, daemon=True)
        self.reader.start()
        return self

    def _drain(self) -> None:
        while data := os.read(self.out_r, 65536):
            self.got.extend(data)

    def __exit__(self, *exc) -> None:
        os.close(self.out_w)
        self.reader.join(10)
        for fd in (self.out_r, self.in_r, self.in_w):
            os.close(fd)


def test_echo_killed_20_times_every_access_exactly_once(guest):
    with Machine(memory=32 << 20, vcpus=1) as m:
        m.load_pvh(guest("restart_echo"), f"pio={PIO:#x} mmio={MMIO:#x} stop={STOP:#x} stats={STATS:#x}")
        ep = m.add_device(parse_device_spec(f"echo,id=e0,pio={PIO:#x},mmio={MMIO:#x},restart=on-failure,"
                                            "restart_burst=100"))
        events: list = []
        m.events.subscribe(events.append)
        killer = Killer(m, ep, KILLS, lambda: m.memory.read_u64(STATS + 8))
        m.add_handler(Bus.PIO, STOP, 1, read=lambda vcpu, off, size: 1 if killer.done.is_set() else 0)
        killer.start()
        outcome = m.run(timeout=240)
        killer.join(10)
        made, rounds, count = (m.memory.read_u64(STATS + 8 * i) for i in range(3))
        assert killer.error is None, repr(killer.error)
        assert outcome.ending is Ending.POWER_OFF, f"{outcome} after {rounds} rounds, {made} accesses, count {count}"
        assert ep.restarts == KILLS and ep.failed is None
        # The counter the device keeps equals the guest's own count exactly.
        assert count == made
        assert m.registry.check() == []
        print(f"echo: {KILLS} kills, {rounds} rounds, {made} accesses; restart ms "
              f"median {sorted(killer.pauses)[len(killer.pauses) // 2] * 1000:.1f} "
              f"max {max(killer.pauses) * 1000:.1f}")


def run_echo_guest(guest, spec: str, *, kills: int, extra: str = "", machine_kw=None, before_kill=None,
                   on_run=None, stop_when=lambda m, ep: True):
    """The restart_echo guest against ``spec`` while a Killer kills the
    device ``kills`` times; returns (machine figures, endpoint, killer)."""
    with Machine(memory=32 << 20, vcpus=1, **(machine_kw or {})) as m:
        m.load_pvh(guest("restart_echo"), f"pio={PIO:#x} mmio={MMIO:#x} stop={STOP:#x} stats={STATS:#x} {extra}")
        ep = m.add_device(parse_device_spec(spec))
        killer = Killer(m, ep, kills, lambda: m.memory.read_u64(STATS + 8), before_kill=before_kill)
        m.add_handler(Bus.PIO, STOP, 1,
                      read=lambda vcpu, off, size: 1 if killer.done.is_set() and stop_when(m, ep) else 0)
        killer.start()
        if on_run is not None:
            on_run(m, ep)
        outcome = m.run(timeout=240)
        killer.join(10)
        made, rounds, count = (m.memory.read_u64(STATS + 8 * i) for i in range(3))
        assert killer.error is None, repr(killer.error)
        assert outcome.ending is Ending.POWER_OFF, f"{outcome} after {rounds} rounds, {made} accesses, count {count}"
        assert count == made
        assert ep.failed is None
        assert m.registry.check() == []
        return m, ep, killer


def test_echo_killed_during_its_handshake(guest):
    # Each kill is followed by a second one of the new process as soon as it
    # exists -- inside its handshake -- so one restart takes two starts.
    def kill_the_next_one(i: int, ep_box: list) -> None:
        ep = ep_box[0]
        old = ep.pid
        wait_for(lambda: ep.pid != old or ep.failed, 30, "a new process")
        try:
            os.kill(ep.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    box: list = []
    threads: list[threading.Thread] = []

    def before_kill(i: int) -> None:
        t = threading.Thread(target=kill_the_next_one, args=(i, box), daemon=True)
        threads.append(t)
        t.start()

    m, ep, killer = run_echo_guest(
        guest, f"echo,id=e0,pio={PIO:#x},mmio={MMIO:#x},restart_burst=100", kills=5,
        before_kill=before_kill, on_run=lambda m, ep: box.append(ep))
    for t in threads:
        t.join(5)
    assert ep.restarts == 5


def test_echo_killed_while_holding_the_registry_lock_restarts(guest):
    # At round 300 the device takes the registry lock inside the handler of
    # the guest's write and keeps it; the put of that access misses the
    # deadline, the lock watch kills the holder, the robust futex's
    # owner-died recovery repairs the registry, and the device is started
    # again like after any other death: the guest sees nothing.
    from tests.testkinds import FAULT_ECHO

    def check(m, ep):
        recoveries = m.registry.recoveries

        def watch():
            wait_for(lambda: ep.restarts >= 1, 60, "the restart after the lock hog")
            assert m.registry.recoveries > recoveries
            assert m.dispatcher.lock_watch.kills == 1
            wait_for(lambda: m.registry.holder()[1] == 0, 10, "the lock free again")
            watched.append(True)
        t = threading.Thread(target=watch, daemon=True)
        t.start()
        checks.append(t)

    checks: list[threading.Thread] = []
    watched: list[bool] = []
    m, ep, killer = run_echo_guest(
        guest, f"{FAULT_ECHO},id=e0,pio={PIO:#x},mmio={MMIO:#x}", kills=0, extra="hog=300",
        machine_kw={"lock_timeout": 0.3}, on_run=check,
        stop_when=lambda m, ep: ep.restarts >= 1 and m.memory.read_u64(STATS + 8) > 600)
    checks[0].join(5)
    assert watched == [True]
    assert ep.restarts == 1


def expected_serial(n: int) -> int:
    return 0x0A if n % 65 == 64 else 0x41 + n % 26


@pytest.mark.parametrize("mode", ["spawned", "service"])
def test_serial_killed_20_times_loses_no_byte(guest, tmp_path, mode):
    with ConsoleCapture() as cap, Machine(memory=32 << 20, vcpus=1) as m, \
            placed(m, "serial", mode, tmp_path, console=cap.fds) as (ep, pid):
        m.load_pvh(guest("restart_serial"), f"stop={STOP:#x} stats={STATS:#x}")
        run_killed(m, ep, pid=pid)
        written = m.memory.read_u64(STATS)
    got = cap.got
    # Every byte the guest wrote is there, in order; a byte written again
    # (the device died after sending it, before storing the snapshot that
    # includes it, so the write ran again) shows as a repeat of the one
    # before, never as a gap.
    p = repeats = 0
    for i, b in enumerate(got):
        if b == expected_serial(p):
            p += 1
        elif p and b == expected_serial(p - 1):
            repeats += 1
        else:
            raise AssertionError(f"byte {i} is {b:#x}: expected byte {p} ({expected_serial(p):#x}); "
                                 f"{bytes(got[max(0, i - 40):i + 10])!r}")
    assert p == written, (p, written)
    print(f"serial ({mode}): {KILLS} kills, {written} bytes, {repeats} repeated")


def blk_pattern(round_: int, sector: int) -> bytes:
    x = (round_ * 0x9E3779B97F4A7C15 ^ sector) & (1 << 64) - 1
    out = bytearray(round_.to_bytes(8, "little") + sector.to_bytes(8, "little"))
    for _ in range(16, 512):
        x = (x * 6364136223846793005 + 1442695040888963407) & (1 << 64) - 1
        out.append(x >> 56)
    return bytes(out)


@pytest.mark.parametrize("mode", ["spawned", "service"])
def test_virtio_blk_killed_20_times_no_request_lost_or_twice(guest_cache, tmp_path, mode):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(64 * 512))
    with Machine(memory=32 << 20, vcpus=1) as m, \
            placed(m, f"virtio-blk,path={image}", mode, tmp_path) as (ep, pid):
        m.load_pvh(pci_guest(guest_cache, "restart_blk"), f"stop={STOP:#x} stats={STATS:#x}")
        run_killed(m, ep, seed=7, before_kill=mid_request(m, 3), pid=pid)
        completed, rounds = m.memory.read_u64(STATS), m.memory.read_u64(STATS + 8)
        done = [m.memory.read_u64(STATS + 64 + 8 * s) for s in range(64)]
    # Every write the guest saw completed is on the image: each sector holds
    # the last round that wrote it.
    data = image.read_bytes()
    for s in range(64):
        if done[s]:
            assert data[s * 512:(s + 1) * 512] == blk_pattern(done[s], s), f"sector {s}, round {done[s]}"
    assert completed == rounds + rounds // 4
    print(f"virtio-blk ({mode}): {KILLS} kills, {rounds} rounds, {completed} requests")


@pytest.mark.parametrize("mode", ["spawned", "service"])
def test_pci_echo_killed_20_times_every_access_exactly_once(guest_cache, tmp_path, mode):
    # restart_echo's loop through pci-echo's BARs (where the VMM assigned
    # them): every scratch value reads back, the counter is exact.
    with Machine(memory=32 << 20, vcpus=1) as m, placed(m, "pci-echo", mode, tmp_path) as (ep, pid):
        m.load_pvh(pci_guest(guest_cache, "restart_pci_echo"), f"stop={STOP:#x} stats={STATS:#x}")
        killer = run_killed(m, ep, seed=11, pid=pid)
        made, rounds, count = (m.memory.read_u64(STATS + 8 * i) for i in range(3))
        assert count == made and rounds > KILLS * 20
        assert m.registry.check() == []
    print(f"pci-echo ({mode}): {KILLS} kills, {rounds} rounds, {made} accesses; {pauses(killer)}")


@pytest.mark.parametrize("mode", ["spawned", "service"])
def test_virtio_rng_killed_20_times_no_request_lost_or_twice(guest_cache, tmp_path, mode):
    # Every request the guest posted completed exactly once (it checks the
    # used index moves by one per request, naming its head, with 16 random
    # bytes), half of the kills with a request outstanding.
    with Machine(memory=32 << 20, vcpus=1) as m, placed(m, "virtio-rng", mode, tmp_path) as (ep, pid):
        m.load_pvh(pci_guest(guest_cache, "restart_rng"), f"stop={STOP:#x} stats={STATS:#x}")
        killer = run_killed(m, ep, seed=13, before_kill=mid_request(m, 5), pid=pid)
        completed, rounds = m.memory.read_u64(STATS), m.memory.read_u64(STATS + 8)
        used = int.from_bytes(m.memory.read(m.memory.read_u64(STATS + 24) + 2, 2), "little")
    assert completed == rounds and used == rounds % (1 << 16)
    print(f"virtio-rng ({mode}): {KILLS} kills, {rounds} requests; {pauses(killer)}")


def console_line(n: int) -> bytes:
    return b"%010d " % n + bytes(0x61 + (n + i) % 26 for i in range(11, 47)) + b"\n"


@pytest.mark.parametrize("mode", ["spawned", "service"])
def test_virtio_console_killed_20_times_loses_no_line(guest_cache, tmp_path, mode):
    # Every line the guest wrote is on the console, in order; each transmit
    # request completed exactly once for the guest.  A line written again
    # (the device died after writing it, before its completion was kept,
    # so the request ran again) shows as a repeat of the one before --
    # at least once, as serial -- never as a gap.
    with ConsoleCapture() as cap, Machine(memory=32 << 20, vcpus=1) as m, \
            placed(m, "virtio-console", mode, tmp_path, console=cap.fds) as (ep, pid):
        m.load_pvh(pci_guest(guest_cache, "restart_console"), f"stop={STOP:#x} stats={STATS:#x}")
        killer = run_killed(m, ep, seed=17, before_kill=mid_request(m, 9), pid=pid)
        written = m.memory.read_u64(STATS)
    got = bytes(cap.got)
    size = len(console_line(0))
    assert len(got) % size == 0, len(got)
    p = repeats = 0
    for i in range(0, len(got), size):
        line = got[i:i + size]
        if line == console_line(p):
            p += 1
        elif p and line == console_line(p - 1):
            repeats += 1
        else:
            raise AssertionError(f"line at {i} is {line!r}: expected line {p}")
    assert p == written, (p, written)
    print(f"virtio-console ({mode}): {KILLS} kills, {written} lines, {repeats} repeated; {pauses(killer)}")


def test_device_restart_through_qmp_and_vmm_ctl(guest, tmp_path):
    # Live restart on request while the guest keeps using the echo: the
    # guest sees a pause, no error, and the counter stays exact; events
    # DEVICE_RESTARTING and DEVICE_RESTARTED; query-devices shows it.
    from vmm.qmp.ctl import ctl

    events: list = []
    pauses: list[float] = []
    results: list = []

    def restarter(m, ep):
        def run():
            try:
                for i in range(10):
                    seen = m.memory.read_u64(STATS + 8)
                    wait_for(lambda s=seen: m.memory.read_u64(STATS + 8) > s + 50, 60, "guest progress")
                    if i == 0:
                        status, out, err = ctl(str(tmp_path / "qmp.sock"), "device-restart", ["id=e0"])
                        assert status == 0, (status, out, err)
                        results.append(out)
                    else:
                        r = m.qmp("device-restart", id="e0")
                        pauses.append(r["pause-ms"])
                (dev,) = m.query_devices()
                results.append(dev)
            except BaseException as e:
                results.append(e)
        m.events.subscribe(lambda e: events.append(e.name) if e.name.startswith("DEVICE_") else None)
        m.serve_api(str(tmp_path / "qmp.sock"))
        t = threading.Thread(target=run, daemon=True)
        t.start()
        threads.append(t)

    threads: list[threading.Thread] = []
    stop = threading.Event()
    m, ep, killer = run_echo_guest(
        guest, f"echo,id=e0,pio={PIO:#x},mmio={MMIO:#x},restart=no", kills=0, on_run=restarter,
        stop_when=lambda m, ep: len(results) >= 2 or stop.is_set())
    threads[0].join(10)
    assert not any(isinstance(r, BaseException) for r in results), results
    assert ep.restarts == 10
    dev = results[-1]
    assert dev["restarts"] == 10 and dev["state"] == "running"
    assert dev["last-cause"] == "restart requested (device-restart)"
    assert events.count("DEVICE_RESTARTING") == 10 and events.count("DEVICE_RESTARTED") == 10
    assert "DEVICE_FAILED" not in events
    pauses.sort()
    print(f"device-restart pause ms: median {pauses[len(pauses) // 2]:.1f} max {pauses[-1]:.1f}")


def test_start_limit_fails_the_device_as_without_restart(guest):
    # restart_burst=3 within 60 s: the first start and two restarts are
    # allowed; the third kill finds the limit reached, so the device is
    # failed as today: DEVICE_FAILED, its regions reaped, the guest's next
    # read is all ones (its check 3).
    with Machine(memory=32 << 20, vcpus=1) as m:
        m.load_pvh(guest("restart_echo"), f"pio={PIO:#x} mmio={MMIO:#x} stop={STOP:#x} stats={STATS:#x}")
        ep = m.add_device(parse_device_spec(f"echo,id=e0,pio={PIO:#x},mmio={MMIO:#x},"
                                            "restart_burst=3,restart_interval=60"))
        events: list = []
        m.events.subscribe(lambda e: events.append(e.name))
        m.add_handler(Bus.PIO, STOP, 1, read=lambda vcpu, off, size: 0)

        def kill_three() -> None:
            for _ in range(3):
                seen = m.memory.read_u64(STATS + 8)
                wait_for(lambda s=seen: m.memory.read_u64(STATS + 8) > s + 20 or ep.failed, 60, "progress")
                r = ep.restarts
                os.kill(ep.pid, signal.SIGKILL)
                wait_for(lambda r=r: ep.restarts > r or ep.failed, 30, "restart or failure")

        t = threading.Thread(target=kill_three, daemon=True)
        t.start()
        outcome = m.run(timeout=120)
        t.join(10)
        assert outcome.ending is Ending.TEST_EXIT and outcome.value == 3, str(outcome)
        assert ep.restarts == 2
        assert ep.failed is not None and "start limit" in ep.failed, ep.failed
        assert events.count("DEVICE_RESTARTED") == 2
        wait_for(lambda: "DEVICE_FAILED" in events, 10, "DEVICE_FAILED")
        assert not any(r.owner == ep.owner for r in m.registry.regions())
        (dev,) = m.query_devices()
        assert dev["state"] == "failed" and dev["restarts"] == 2


@pytest.mark.parametrize("policy", ["restart=no", "restart_burst=1,restart_interval=60"])
def test_a_device_failure_nothing_polls_for_is_still_an_event(policy):
    # No run loop (whose poll would notice) and no access (whose failure
    # would): the device dies -- without restart, or with its start limit
    # reached at once -- and DEVICE_FAILED still comes, once, after its
    # regions are reaped.  (test_start_limit_... above ended its run right
    # after the limit and waited for an event that never came.)
    with Machine(memory=32 << 20, vcpus=1) as m:
        ep = m.add_device(parse_device_spec(f"echo,id=e0,pio={PIO:#x},mmio={MMIO:#x},{policy}"))
        events: list = []
        m.events.subscribe(events.append)
        os.kill(ep.pid, signal.SIGKILL)
        wait_for(lambda: any(e.name == "DEVICE_FAILED" for e in events), 30, "DEVICE_FAILED")
        (failed,) = [e for e in events if e.name == "DEVICE_FAILED"]
        assert failed.data["device"] == "e0" and failed.data["kind"] == "echo", failed.data
        assert failed.data["reason"] == ep.failed
        assert not any(r.owner == ep.owner for r in m.registry.regions())
        (dev,) = m.query_devices()
        assert dev["state"] == "failed"
    assert [e.name for e in events].count("DEVICE_FAILED") == 1


def test_restart_timeout_fails_a_device_that_cannot_come_back(guest, tmp_path):
    # The device program is replaced after the first start by one that
    # exits at once: restarts keep failing, and after restart_timeout the
    # device is failed; the guest's waiting access completes as all ones.
    import dataclasses

    with Machine(memory=32 << 20, vcpus=1) as m:
        m.load_pvh(guest("restart_echo"), f"pio={PIO:#x} mmio={MMIO:#x} stop={STOP:#x} stats={STATS:#x}")
        m.remote_options = dataclasses.replace(m.remote_options, spare=False)
        ep = m.add_device(parse_device_spec(f"echo,id=e0,pio={PIO:#x},mmio={MMIO:#x},"
                                            "restart_timeout=1.5,restart_burst=1000"))
        m.add_handler(Bus.PIO, STOP, 1, read=lambda vcpu, off, size: 0)
        broken = dataclasses.replace(m.remote_options, command=("/bin/false",))
        from vmm.remote.process import DeviceProcess
        from ipc.transport import socketpair

        def launch():
            ours, theirs = socketpair()
            return ours, DeviceProcess.start(broken.command, theirs, "e0")

        def kill() -> None:
            wait_for(lambda: m.memory.read_u64(STATS + 8) > 50, 60, "progress")
            ep.relaunch = launch
            t0 = time.monotonic()
            os.kill(ep.pid, signal.SIGKILL)
            wait_for(lambda: ep.failed, 30, "the failure")
            took.append(time.monotonic() - t0)

        took: list[float] = []
        t = threading.Thread(target=kill, daemon=True)
        t.start()
        outcome = m.run(timeout=120)
        t.join(10)
        assert outcome.ending is Ending.TEST_EXIT and outcome.value == 3, str(outcome)
        assert ep.failed is not None and ep.restarts == 0
        assert 1.4 <= took[0] < 10, took


def test_service_device_killed_reconnects_and_loses_nothing(guest, tmp_path):
    # The device runs as a service under the test supervisor (the socket
    # held, the device re-executed with LISTEN_FDS when it dies, as a
    # socket unit with Restart=on-failure); the VMM attached with
    # connect=PATH reconnects with backoff within restart_timeout and the
    # new instance restores the state segment: the guest's counter stays
    # exact across every kill.
    from tests.devserver.servicekit import service_env, started_pids, supervised

    path = tmp_path / "echo.sock"
    svc = supervised(f"echo,pio={PIO:#x},mmio={MMIO:#x}", path, env=service_env())
    try:
        with Machine(memory=32 << 20, vcpus=1) as m:
            m.load_pvh(guest("restart_echo"), f"pio={PIO:#x} mmio={MMIO:#x} stop={STOP:#x} stats={STATS:#x}")
            ep = m.add_device(parse_device_spec(f"echo,id=e0,connect={path},restart_burst=100,restart_timeout=20"))
            done = threading.Event()
            errors: list = []
            m.add_handler(Bus.PIO, STOP, 1, read=lambda vcpu, off, size: 1 if done.is_set() else 0)

            def killer() -> None:
                try:
                    for _ in range(5):
                        seen = m.memory.read_u64(STATS + 8)
                        wait_for(lambda s=seen: m.memory.read_u64(STATS + 8) > s + 50, 60, "guest progress")
                        r, pid = ep.restarts, started_pids(svc)[-1]
                        os.kill(pid, signal.SIGKILL)
                        wait_for(lambda r=r: ep.restarts > r or ep.failed, 60, "the reconnect")
                        assert ep.failed is None, ep.failed
                except BaseException as e:
                    errors.append(e)
                finally:
                    done.set()

            t = threading.Thread(target=killer, daemon=True)
            t.start()
            outcome = m.run(timeout=240)
            t.join(10)
            made, count = m.memory.read_u64(STATS), m.memory.read_u64(STATS + 16)
            assert not errors, errors
            assert outcome.ending is Ending.POWER_OFF, str(outcome)
            assert count == made and ep.restarts == 5 and ep.failed is None
            assert len(set(started_pids(svc))) == 6
    finally:
        svc.stop()
