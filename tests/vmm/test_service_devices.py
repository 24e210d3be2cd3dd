"""Devices as services serving real VMs (real KVM, real processes): a device
under ``systemd-socket-activate`` with a NOTIFY_SOCKET the test binds, under
the test supervisor that re-executes it with LISTEN_FDS when it dies (what a
socket unit with ``Restart=on-failure`` does), a VMM killed and started
again, and what is refused: a kind mismatch, a parameter on both sides, a
second VMM while one is served, garbage.

Guests: tests/guests/echo_loop.c (uses one echo device; checks it starts
fresh and that its access counter counts exactly this guest's accesses;
test_exit(0x2a) = every check held, so status 85) and
tests/guests/virtio_blk.c.  Restart with the device's state kept is a later
phase: here a device that dies is cut off from its VM, and the service that
comes back serves the next VM.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from ipc import Bus, Registry
from tests.devserver.servicekit import connect, needs_socket_activate, service_env, started_pids
from tests.testkinds import FAULT_ECHO
from tests.vmm.conftest import GUEST_SOURCES, needs_kvm, vmm_run
from vmm import guests
from vmm.config import parse_device_spec
from vmm.endpoint import DeviceFailed
from vmm.machine import Machine
from vmm.outcome import Ending
from vmm.remote import RemoteOptions
from vmm.remote.connect import attach_service

PIO = 0x1000
ECHO = f"echo,pio={PIO:#x}"
PASS_STATUS = (0x2A << 1) | 1
RUN_TIMEOUT = 60


@pytest.fixture(scope="session")
def loop_guest(guest):
    return guest("echo_loop")


@pytest.fixture(scope="session")
def blk_guest(guest_cache):
    return guests.build([GUEST_SOURCES / "virtio_blk.c", guests.HERE / "pci.c"], guest_cache)


def run_vm(guest, path, rounds: int = 500, extra: str = "", **kw) -> subprocess.CompletedProcess:
    return vmm_run("--guest", str(guest), "--cmdline", f"pio={PIO:#x} rounds={rounds}", "--serial", "none",
                   "--timeout", str(RUN_TIMEOUT), "--device", f"echo,connect={path},id=e0{extra}", **kw)


def start_vm(guest, path, rounds: int = 0, extra: str = "") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vmm.cli", "run", "--guest", str(guest), "--cmdline",
                             f"pio={PIO:#x} rounds={rounds}", "--serial", "none", "--timeout", str(RUN_TIMEOUT),
                             "--device", f"echo,connect={path},id=e0{extra}"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def served_by(stderr: str) -> int:
    """The device pid the VMM's summary line names for e0."""
    m = re.search(r"e0: pid (\d+) \(service at ", stderr)
    assert m, stderr
    return int(m.group(1))


def device_pids(svc) -> list[int]:
    """Pids of the session processes that served a device (each VM gets
    one, forked by the service and sandboxed; its ready line names it)."""
    return [int(m.group(1)) for line in svc.err.lines
            if (m := re.match(r"devserver\[\S+ pid (\d+)\] INFO: ready: ", line))]


def a_session_of(svc, pid: int, listener: int) -> bool:
    """``pid`` served a VM for the service whose listener is ``listener``
    (a process of its own, never the listener itself).  Its ready line is
    written just after Ready is sent: waited for."""
    svc.err.wait(lambda line: re.match(rf"devserver\[\S+ pid {pid}\] INFO: ready: ", line) is not None,
                 what=f"the ready line of pid {pid}")
    return pid != listener and listener not in device_pids(svc)


def errors(svc) -> list[str]:
    return [line for line in svc.err.lines if " ERROR: " in line]


def accesses(status: dict[str, str]) -> int:
    m = re.search(r"(\d+) access\(es\)", status.get("STATUS", ""))
    return int(m.group(1)) if m else -1


@needs_kvm
@needs_socket_activate
def test_socket_activated_device_serves_vms_and_notifies(tmp_path, services, loop_guest):
    notify = services.notify()
    path = tmp_path / "echo.sock"
    svc = services.activated(ECHO, path, env_pass={"NOTIFY_SOCKET": notify.env_value, "WATCHDOG_USEC": "400000"})
    r = run_vm(loop_guest, path, rounds=3000)
    assert r.returncode == PASS_STATUS, r.stderr
    # The activator exec'd the service in place; each VM is served by a
    # sandboxed process of its own, whose pid the kernel gave the VMM.
    assert a_session_of(svc, served_by(r.stderr), svc.proc.pid)
    assert "sandbox preload userns namespaces fds caps landlock seccomp=kill" in r.stderr
    ready = notify.wait(lambda m: m.get("READY") == "1", what="READY=1")
    assert "listening on fd 3" in ready["STATUS"]
    m = re.search(r"VMM pid (\d+)", r.stderr)
    assert m, r.stderr
    vmm_pid = int(m.group(1))
    notify.wait(lambda m: f"serving the VM of pid {vmm_pid}" in m.get("STATUS", ""), what="serving the VM")
    # The VM went away: listening again, with the count of what it served.
    done = notify.wait(lambda m: "1 VM(s) served" in m.get("STATUS", ""), what="the status after the VM")
    assert accesses(done) >= 60 + 2 * 3000 + 1
    pings = [notify.wait(lambda m: m.get("WATCHDOG") == "1", what="WATCHDOG=1") for _ in range(3)]
    assert all("listening" in p["STATUS"] for p in pings)
    # A second VM gets a fresh device from the same process (the guest
    # checks the scratch starts at 0 and the counter counts it alone).
    r = run_vm(loop_guest, path, rounds=200)
    assert r.returncode == PASS_STATUS, r.stderr
    assert a_session_of(svc, served_by(r.stderr), svc.proc.pid)
    assert len(set(device_pids(svc))) == 2
    assert errors(svc) == [], svc.err.text()
    svc.proc.terminate()
    notify.wait(lambda m: m.get("STOPPING") == "1", what="STOPPING=1")
    assert svc.stop() == 0


@needs_kvm
@needs_socket_activate
def test_socket_activated_virtio_blk_with_placement_from_the_vmm(tmp_path, services, blk_guest):
    """The image, read-only flag and serial id are the service's; the PCI
    slot and BAR windows are the VMM's (slot=5 here)."""
    image = tmp_path / "disk.img"
    image.write_bytes(b"\x5a" * (2048 * 512))
    path = tmp_path / "blk.sock"
    svc = services.activated(f"virtio-blk,path={image},serial=svc-disk", path)
    with Machine(memory=32 << 20, vcpus=1) as m:
        m.load_pvh(blk_guest, "stats=0x800000 sectors=2048 start=100 count=8 seed=7")
        ep = m.add_device(parse_device_spec(f"virtio-blk,connect={path},id=blk,slot=5"))
        outcome = m.run(timeout=RUN_TIMEOUT)
        ident = m.memory.read(0x800000 + 40, 20)
        assert ep.reported_pid == ep.pid and ep.pid != svc.proc.pid and ep.failed is None
        assert ep.sandbox.device_pid == ep.pid and "seccomp=kill" in ep.sandbox.layers
        assert any(r.owner == ep.owner for r in m.registry.regions())
    assert outcome.ending is Ending.POWER_OFF, str(outcome)
    assert ident == b"svc-disk".ljust(20, b"\0")
    data = image.read_bytes()
    assert data[100 * 512:101 * 512] != b"\x5a" * 512      # the guest's pattern reached the image
    svc.err.wait(lambda line: "listening again" in line)
    cfg = [line for line in svc.err.lines if "ready: virtio-blk" in line]
    assert cfg, svc.err.text()


@needs_kvm
def test_supervisor_reexecutes_a_killed_device_and_it_serves_the_next_vm(tmp_path, services, loop_guest):
    notify = services.notify()
    path = tmp_path / "echo.sock"
    svc = services.supervised(ECHO, path, env=service_env(notify, WATCHDOG_USEC="400000"))
    first = started_pids(svc)[0]
    r = run_vm(loop_guest, path)
    assert r.returncode == PASS_STATUS, r.stderr
    # The socket's listener (SO_PEERCRED) is the supervisor; the VMM
    # takes the pid the kernel attached to the device's messages.
    assert a_session_of(svc, served_by(r.stderr), first)
    os.kill(first, signal.SIGKILL)                    # between VMs
    svc.out.wait(lambda line: line == f"exited {first} signal SIGKILL")
    second = int(svc.out.wait(lambda line: line.startswith("started ") and line != f"started {first}")
                 .split()[1])
    r = run_vm(loop_guest, path)                       # may connect before it listens: the backlog holds it
    assert r.returncode == PASS_STATUS, r.stderr
    assert a_session_of(svc, served_by(r.stderr), second)
    # Killed in the middle of a VM that does not reconnect (restart=no;
    # tests/vmm/test_restart.py has the reconnect): that VM loses the
    # device (the guest reads all ones: check 2 fails, status 5); the
    # device comes back and the VMM started afresh is served.
    vm = start_vm(loop_guest, path, extra=",restart=no")
    notify.wait(lambda m: accesses(m) > 200 and f"serving the VM of pid {vm.pid}" in m.get("STATUS", ""),
                what="the VM being served")
    os.kill(second, signal.SIGKILL)
    out, err = vm.communicate(timeout=RUN_TIMEOUT)
    assert vm.returncode == (2 << 1) | 1, err
    assert "cut off" in err
    svc.out.wait(lambda line: line == f"exited {second} signal SIGKILL")
    r = run_vm(loop_guest, path)
    assert r.returncode == PASS_STATUS, r.stderr + svc.out.text() + svc.err.text()
    third = started_pids(svc)[-1]
    assert third not in (first, second) and a_session_of(svc, served_by(r.stderr), third)


@needs_kvm
def test_vmm_killed_and_started_again_is_served_by_the_same_service(tmp_path, services, loop_guest):
    notify = services.notify()
    path = tmp_path / "echo.sock"
    svc = services.listen(ECHO, path, env=service_env(notify, WATCHDOG_USEC="400000"))
    for _ in range(2):
        vm = start_vm(loop_guest, path)
        notify.wait(lambda m, pid=vm.pid: f"serving the VM of pid {pid}" in m.get("STATUS", "")
                    and accesses(m) > 100, what="the VM being served")
        vm.kill()                                   # SIGKILL: no Shutdown, the socket just ends
        vm.wait(30)
        # Started again at once: it may connect before the old session's
        # end is noticed (it waits in the busy grace, then is served).
        r = run_vm(loop_guest, path, rounds=300)
        assert r.returncode == PASS_STATUS, r.stderr
        assert a_session_of(svc, served_by(r.stderr), svc.proc.pid)
    assert errors(svc) == [], svc.err.text()
    assert svc.proc.poll() is None


@needs_kvm
@pytest.mark.parametrize("spec, vmm_extra, message", [
    ("virtio-rng", "", "kind mismatch: this service runs virtio-rng, the VMM asked for echo"),
    (ECHO, f",pio={PIO:#x}", "pio= given both by the VMM and on the service's command line"),
])
def test_refusals_are_one_line_on_each_side_and_the_service_keeps_serving(tmp_path, services, loop_guest, spec,
                                                                         vmm_extra, message):
    path = tmp_path / "dev.sock"
    svc = services.listen(spec, path)
    r = run_vm(loop_guest, path, extra=vmm_extra)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and f"the service at {path} refused" in lines[0], r.stderr
    svc.err.wait(lambda line: "refused; listening again" in line)
    assert len(errors(svc)) == 1 and message in errors(svc)[0], svc.err.text()
    if spec == ECHO:                               # still serving: a correct VMM is served
        r = run_vm(loop_guest, path)
        assert r.returncode == PASS_STATUS, r.stderr
    assert svc.proc.poll() is None


@needs_kvm
def test_a_second_vmm_is_refused_busy_and_garbage_does_not_stop_the_service(tmp_path, services, loop_guest):
    notify = services.notify()
    path = tmp_path / "echo.sock"
    svc = services.listen(ECHO, path, "--busy-grace", "0.5", env=service_env(notify))
    with connect(path) as s:                      # garbage first
        s.send(b"GET / HTTP/1.0\r\n\r\n")
        assert s.recv(10) == b""
    vm = start_vm(loop_guest, path)
    notify.wait(lambda m, pid=vm.pid: f"serving the VM of pid {pid}" in m.get("STATUS", ""),
                what="the first VM being served")
    r = run_vm(loop_guest, path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"busy: this service serves one VM at a time and serves the VMM of pid {vm.pid}" \
        in lines[0], r.stderr
    assert vm.poll() is None                       # the first VM was not disturbed
    vm.kill()
    vm.wait(30)
    r = run_vm(loop_guest, path)
    assert r.returncode == PASS_STATUS, r.stderr
    assert len(errors(svc)) == 1 and "handshake with the VMM failed" in errors(svc)[0], svc.err.text()


def test_a_hung_model_stops_the_watchdog_pings(tmp_path, services, registry):
    """fault-echo's read of 0xFC hangs in the model for stall_ms: no
    WATCHDOG=1 while it does (the manager would restart the service), and
    they come back when it returns.  A Python thread plays the vCPU (no
    KVM needed): registry lookup, access through the slot, put."""
    notify = services.notify()
    path = tmp_path / "fault.sock"
    svc = services.listen(f"{FAULT_ECHO},stall_ms=2500", path,
                          env=service_env(notify, WATCHDOG_USEC="200000"))
    ep = attach_service(str(path), FAULT_ECHO, {"pio": hex(PIO)}, 2, "f0", registry, 1,
                        RemoteOptions(access_timeout=20.0))
    try:
        assert read(registry, ep, 0) == 0
        notify.wait(lambda m: m.get("WATCHDOG") == "1" and "serving" in m["STATUS"])
        result: list[int] = []
        stalled = threading.Thread(target=lambda: result.append(read(registry, ep, 0xFC)))
        stalled.start()
        svc.err.wait(lambda line: "stalling this read" in line, what="the stall beginning")
        while notify.receive(0) is not None:   # sent before the handler began
            pass
        quiet_until = time.monotonic() + 1.5        # 15 intervals, the stall lasts 2.5 s
        while (left := quiet_until - time.monotonic()) > 0:
            m = notify.receive(left)
            assert m is None or "WATCHDOG" not in m, f"a ping while the model hangs: {m}"
        assert stalled.is_alive()
        stalled.join(20)
        assert result and result[0] == 2       # the count after the stall: both reads
        notify.wait(lambda m: m.get("WATCHDOG") == "1", what="pings after the stall")
    finally:
        ep.close()


def test_a_hung_model_is_killed_by_the_watchdog_and_the_service_comes_back(tmp_path, services, registry):
    """The whole loop of WatchdogSec=, with the test supervisor as the
    manager: the model hangs in a handler, the pings stop, the supervisor
    kills the device (SIGABRT) and starts it again, and the next attach is
    served by the new process."""
    path = tmp_path / "fault.sock"
    svc = services.supervised(f"{FAULT_ECHO},stall_ms=60000", path, watchdog_sec=1.0)
    first = started_pids(svc)[0]
    ep = attach_service(str(path), FAULT_ECHO, {"pio": hex(PIO)}, 2, "f0", registry, 1,
                        RemoteOptions(access_timeout=30.0))
    try:
        assert ep.reported_pid == ep.pid and a_session_of(svc, ep.pid, first)
        svc.out.wait(lambda line: line.startswith(f"notify {first} ") and "WATCHDOG=1" in line
                     and "serving" in line, what="pings while serving")
        with pytest.raises(DeviceFailed):
            read(registry, ep, 0xFC)           # hangs until the watchdog ends the process
        svc.out.wait(lambda line: line == f"exited {first} signal SIGABRT")
        assert f"watchdog {first}" in svc.out.lines
    finally:
        ep.close()
    second = int(svc.out.wait(lambda line: line.startswith("started ") and line != f"started {first}")
                 .split()[1])
    ep = attach_service(str(path), FAULT_ECHO, {"pio": hex(PIO)}, 3, "f1", registry, 1,
                        RemoteOptions(access_timeout=30.0))
    try:
        assert ep.reported_pid == ep.pid and a_session_of(svc, ep.pid, second)
        assert read(registry, ep, 0xF4) == 1     # a fresh device: its first access
    finally:
        ep.close()


def read(registry: Registry, ep, offset: int) -> int:
    """A 4-byte PIO read at the echo window's ``offset``, as a vCPU exit does it."""
    ref = registry.get(Bus.PIO, PIO + offset, 4)
    assert ref is not None and ref.owner == ep.owner
    try:
        return ep.access(0, int(Bus.PIO), ref.cookie, ref.offset, 4, False, 0)
    finally:
        registry.put(ref)


@needs_kvm
def test_a_service_device_holding_the_registry_lock_is_killed_and_restarted(tmp_path, services, registry, guest,
                                                                           caplog):
    """As for a spawned device (tests/vmm/test_device_faults.py): a thread
    of service device A takes the registry lock inside the handler of the
    guest's write and keeps it.  The lock watch finds the holder -- the
    kernel-verified pid of A's service process, though the socket's
    listener is the supervisor -- kills it, the registry is recovered, the
    guest goes on with device B and ends with PASS.  What was killed is the
    session's sandboxed process, pid 1 of its own pid namespace (the lock
    word holds its thread id there): the service itself lives on, listens
    again and serves the next VMM."""
    from tests.vmm.test_device_faults import (A_MMIO, A_PIO, B_MMIO, B_PIO, FAULT_HOG, PASS, cmdline, echo,
                                              healthy, run_with_flag)

    path = tmp_path / "a.sock"
    svc = services.supervised(FAULT_ECHO, path)
    first = started_pids(svc)[0]
    with Machine(memory=32 << 20, lock_timeout=0.3) as m:
        m.load_pvh(guest("faults"), cmdline("hog", a_mmio=A_MMIO, fault=FAULT_HOG))
        a = m.add_device(parse_device_spec(f"{FAULT_ECHO},connect={path},id=a0,pio={A_PIO:#x},"
                                           f"mmio={A_MMIO:#x},hog_delay_ms=50,restart=no"))
        b = m.add_device(echo("b0", B_PIO, B_MMIO))
        assert a_session_of(svc, a.pid, first) and a.sandbox.device_pid == a.pid
        recoveries = m.registry.recoveries
        outcome, _ = run_with_flag(m, a, RUN_TIMEOUT)
        assert outcome.ending is Ending.TEST_EXIT and outcome.value == PASS, str(outcome)
        assert a.failed is not None and "registry lock" in a.failed, a.failed
        assert m.dispatcher.lock_watch.kills == 1 and m.dispatcher.lock_watch.unusable is None
        assert m.registry.recoveries > recoveries, "no owner-death recovery"
        assert m.registry.holder()[1] == 0
        assert not [r for r in m.registry.regions() if r.owner == a.owner]
        healthy(m, b)
    svc.err.wait(lambda line: "session 1 " in line and "killed by SIGKILL; listening again" in line,
                 what="the session's end")
    ep = attach_service(str(path), FAULT_ECHO, {"pio": hex(PIO)}, 2, "a1", registry, 1, RemoteOptions())
    try:
        assert ep.pid != a.pid and a_session_of(svc, ep.pid, first)
        assert read(registry, ep, 0xF4) == 1
        assert started_pids(svc) == [first]         # the same service
    finally:
        ep.close()
