"""Teardown leaves nothing behind -- no /dev/shm segment, no device
process -- after a clean end, a guest crash, Ctrl-C and SIGTERM; and vCPUs
stuck in KVM_RUN can be paused, resumed and stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.vmm.conftest import needs_kvm, shm_segments
from vmm.config import ConfigError, parse_device_spec
from vmm.machine import Machine
from vmm.outcome import Ending, Outcome

pytestmark = needs_kvm

DEVICE = "echo,pio=0x1000,mmio=0xd0000000,process={}"
PLACEMENTS = ["inline", "isolated"]


def ours(pid: int) -> set[str]:
    """What process ``pid`` holds of splitvmm's shared memory: /dev/shm
    segments named after it (there should never be any) and descriptors
    of its registry memfd (while it runs)."""
    held = {n for n in shm_segments() if n.startswith(f"splitvmm-{pid}-")}
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("/memfd:splitvmm-registry"):
                held.add(f"fd {fd}")
    except OSError:
        pass
    return held


def children(pid: int) -> set[int]:
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.add(int(entry))
    return out


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def start_vmm(guest, mode: str, placement: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "vmm.cli", "run", "--guest", str(guest("endings")), "--cmdline", f"mode={mode}",
         "--timeout", "60", "--device", DEVICE.format(placement)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # as from a shell: SIGINT raises KeyboardInterrupt in the child
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def guest_ticks(pid: int, tid: int | None = None) -> int:
    """Clock ticks process ``pid`` (or its thread ``tid``) has spent running
    a guest (/proc stat field 43, guest_time): above 0 once a vCPU runs."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        with open(path) as f:
            return int(f.read().rsplit(")", 1)[1].split()[40])
    except (OSError, IndexError, ValueError):
        return 0


def wait_guest_runs(pid: int, tid: int | None = None, above: int = 0, timeout: float = 20.0) -> None:
    """Wait until the guest has run more than ``above`` ticks in ``pid`` (or
    its thread ``tid``)."""
    deadline = time.monotonic() + timeout
    while guest_ticks(pid, tid) <= above:
        assert time.monotonic() < deadline, "the guest never ran"
        time.sleep(0.01)


def wait_running(proc: subprocess.Popen, placement: str) -> set[int]:
    """Wait until the VMM has its registry (and its device process) and
    its vCPU runs the guest (run() is reached)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        kids = children(proc.pid)
        if ours(proc.pid) and (placement == "inline" or kids) and guest_ticks(proc.pid) > 0:
            return children(proc.pid)
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the VMM did not come up")


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("signo, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_run_leaves_nothing(guest, placement, signo, status):
    proc = start_vmm(guest, "3", placement)    # spins in ring 3 forever
    try:
        kids = wait_running(proc, placement)
        proc.send_signal(signo)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == status, err
    assert ours(proc.pid) == set()
    assert all(gone(k) for k in kids), kids


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("mode, status", [("0", 0), ("2", 4), ("4", 6)])
def test_ends_and_crashes_leave_nothing(guest, placement, mode, status):
    proc = start_vmm(guest, mode, placement)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == status, err
    assert ours(proc.pid) == set()
    assert children(proc.pid) == set()


def test_in_process_machine_releases_its_registry(guest):
    before = ours(os.getpid())
    shm_before = shm_segments()
    with Machine(memory=16 << 20) as m:
        m.load_pvh(guest("endings"), "mode=2")
        m.add_device(parse_device_spec(DEVICE.format("inline")))
        assert len(ours(os.getpid()) - before) == 1
        assert shm_segments() == shm_before       # the registry is a memfd, not in /dev/shm
        assert m.run(timeout=20).ending is Ending.RESET
    assert ours(os.getpid()) == before


def test_failed_setup_leaves_nothing(guest):
    before = ours(os.getpid())
    with pytest.raises(ConfigError, match="overlaps"):
        with Machine(memory=16 << 20) as m:
            m.load_pvh(guest("hello"))
            m.add_device(parse_device_spec("echo,pio=0xf4,process=inline"))   # the test-exit port
    assert ours(os.getpid()) == before


def test_pause_resume_and_stop_a_vcpu_inside_kvm_run(guest):
    with Machine(memory=16 << 20, vcpus=2) as m:
        # vCPU 0 spins in ring 3 (never exits), vCPU 1 parks at once.
        m.load_pvh(guest("endings"), "mode=3")
        result: list[Outcome] = []
        runner = threading.Thread(target=lambda: result.append(m.run(timeout=60)))
        runner.start()
        pid = os.getpid()
        deadline = time.monotonic() + 20
        while m.vcpus[0].thread.native_id is None:
            assert time.monotonic() < deadline, "vCPU 0 never started"
            time.sleep(0.01)
        tid = m.vcpus[0].thread.native_id
        wait_guest_runs(pid, tid)                 # vCPU 0 is inside KVM_RUN
        t = time.monotonic()
        assert m.vcpus[0].pause(timeout=5)
        assert time.monotonic() - t < 1.0
        paused_at = guest_ticks(pid, tid)
        m.vcpus[0].resume()
        wait_guest_runs(pid, tid, above=paused_at)  # back in the guest
        assert m.vcpus[0].alive
        t = time.monotonic()
        m.end(Outcome(Ending.POWER_OFF, "stopped by the test"))
        runner.join(10)
        assert not runner.is_alive()
        assert time.monotonic() - t < 2.0
        assert result[0].detail == "stopped by the test"
        assert not any(v.alive for v in m.vcpus)


def test_the_pit_is_unhooked_once_the_run_ends(guest):
    """The PIT's tick re-injection is turned off in a thread when no vCPU
    runs any more (its SRCU grace periods pass meanwhile, not in the VM
    fd's close); the VM stays usable for the rest of the teardown."""
    with Machine(memory=16 << 20) as m:
        m.load_pvh(guest("endings"), "mode=2")
        assert m._pit_release is None           # not while the guest may still run
        assert m.run(timeout=20).ending is Ending.RESET
        release = m._pit_release
        assert release is not None and release.name == "pit-release"
        release.join(10)
        assert not release.is_alive()
        assert m.vm is not None
        m.vm.set_pit_reinject(True)             # the ioctl works both ways on the live VM
        m.vm.set_pit_reinject(False)
    assert m.vm is not None and m.vm.fd == -1   # closed after it
