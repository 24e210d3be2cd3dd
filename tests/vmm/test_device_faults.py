"""Devices failing under a running guest, on real KVM (guest:
tests/guests/faults.c): a device SIGKILLed while a vCPU waits on it,
garbage on a device's control socket, a device holding the registry lock,
and a lock word naming no device at all.

The misbehaving device is ``fault-echo`` (:mod:`tests.testkinds`, a
TEST-ONLY model named ``MODULE:CLASS`` like any model of a user's own);
the guest makes it misbehave through its fault register and checks what
it sees, then ends with test_exit(PASS) -- or with the number of the first
check that failed.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time

import pytest

from ipc import Bus
from ipc.registry import ffi as reg_ffi, lib as reg_lib
from tests.testkinds import FAULT_ECHO
from tests.vmm.conftest import needs_kvm
from vmm.config import DeviceSpec, parse_device_spec
from vmm.remote.restart import RestartPolicy
from vmm.endpoint import VMM_OWNER
from vmm.machine import Machine
from vmm.outcome import Ending
from tests.waiting import poll

pytestmark = needs_kvm

PASS = 0x2A
A_PIO, A_MMIO = 0x2000, 0xD000_0000
B_PIO, B_MMIO = 0x2400, 0xD000_2000
SYNC, FREE = 0x500, 0x3000
FLAG = 0x80_0000                 # guest RAM the test sets once A is cut off
MODES = {"kill": 1, "garbage": 2, "hog": 3, "scribble": 4}
FAULT_GARBAGE = {"framing": 1, "msgpack": 2, "unknown-message": 3}
FAULT_HOG, FAULT_HOG_LATER, FAULT_HOG_MAIN = 4, 5, 6
C_PIO = 0x2800
RUN_TIMEOUT = 30


def cmdline(mode: str, **args) -> str:
    args = {"mode": MODES[mode], "a": A_PIO, "b": B_PIO, "b_mmio": B_MMIO, "sync": SYNC,
            "free": FREE, "flag": FLAG, **args}
    return " ".join(f"{k}={v:#x}" if isinstance(v, int) else f"{k}={v}" for k, v in args.items())


def fault_echo(name: str, pio: int, mmio: int | None = None, **params) -> DeviceSpec:
    p = {"pio": hex(pio)}
    if mmio is not None:
        p["mmio"] = hex(mmio)
    p.update({k: str(v) for k, v in params.items()})
    # restart=no: these tests are about a device that is cut off for good
    return DeviceSpec(FAULT_ECHO, name, "isolated", tuple(p.items()), restart=RestartPolicy(mode="no"))


def echo(name: str, pio: int, mmio: int | None = None, placement: str = "isolated") -> DeviceSpec:
    text = f"echo,id={name},pio={pio:#x},process={placement}"
    if placement == "isolated":
        text += ",restart=no"
    if mmio is not None:
        text += f",mmio={mmio:#x}"
    return parse_device_spec(text)


def owned(m: Machine, owner: int):
    return [r for r in m.registry.regions() if r.owner == owner]


def gone(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}")


def all_stopped(pid: int) -> bool:
    """Every thread of ``pid`` is stopped (SIGSTOP has landed)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        states = []
        for t in tasks:
            with open(f"/proc/{pid}/task/{t}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
    except OSError:
        return False
    return bool(states) and all(s in "tT" for s in states)


def errors(caplog, logger: str) -> list[str]:
    """Error lines of ``logger`` and its children."""
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.ERROR and (r.name == logger or r.name.startswith(logger + "."))]


def healthy(m: Machine, *endpoints) -> None:
    """The registry is consistent, no slot is left referenced, and each of
    ``endpoints`` still has its regions."""
    assert m.registry.check() == []
    regions = m.registry.regions()
    assert all(r.refcount == 0 and not r.removing for r in regions), regions
    for ep in endpoints:
        assert getattr(ep, "failed", None) is None, ep.failed
        assert ep.owner not in m.dispatcher.failed
        assert owned(m, ep.owner), f"{ep.name} lost its regions"


# ---- a device SIGKILLed while a vCPU waits on it -----------------------------

ACCESS_TIMEOUT = 5.0
KILL_AFTER = 0.3


@pytest.mark.parametrize("how", ["in-handler", "stopped"])
def test_device_killed_while_a_vcpu_waits(guest, caplog, how):
    """The guest reads a register of device A; while the vCPU waits for the
    answer, A is SIGKILLed -- either inside its handler (fault-echo's read
    of 0xFC answers only after 30 s) or before it has even seen the
    request (a plain echo, SIGSTOPped first).  The read completes with all
    ones at once, not at the access deadline; the guest checks that and
    that A reads all ones afterwards, keeps using device B, and ends with
    PASS; A's regions are reaped."""
    events: dict[str, float] = {}
    timer = None
    with Machine(memory=32 << 20, access_timeout=ACCESS_TIMEOUT) as m:
        probe = 0xFC if how == "in-handler" else 0
        m.load_pvh(guest("faults"), cmdline("kill", a_mmio=A_MMIO, probe=probe))
        if how == "in-handler":
            a = m.add_device(fault_echo("a0", A_PIO, A_MMIO, stall_ms=30_000))
        else:
            a = m.add_device(echo("a0", A_PIO, A_MMIO))
        b = m.add_device(echo("b0", B_PIO, B_MMIO, placement="inline"))

        def kill() -> None:
            events["killed"] = time.monotonic()
            os.kill(a.pid, signal.SIGKILL)

        def on_sync(vcpu: int, offset: int, size: int, value: int) -> None:
            nonlocal timer
            if offset == 0 and value == 1:        # the guest is about to read A
                if how == "stopped":
                    os.kill(a.pid, signal.SIGSTOP)
                    assert poll(lambda: all_stopped(a.pid)), "SIGSTOP did not land"
                events["armed"] = time.monotonic()
                timer = threading.Timer(KILL_AFTER, kill)
                timer.start()
            elif offset == 4:                     # the read has completed
                events["done"] = time.monotonic()
                events["value"] = value

        m.add_handler(Bus.PIO, SYNC, 8, write=on_sync)
        try:
            outcome = m.run(timeout=RUN_TIMEOUT)
        finally:
            if timer is not None:
                timer.cancel()
        assert outcome.ending is Ending.TEST_EXIT and outcome.value == PASS, str(outcome)
        assert events["value"] == 0xFFFF_FFFF
        # The kill landed while the vCPU waited, and the wait ended with it,
        # well within the access deadline.
        assert events["armed"] < events["killed"] < events["done"]
        assert events["done"] - events["killed"] < 1.0, events
        assert events["done"] - events["armed"] < ACCESS_TIMEOUT
        assert a.failed is not None and "SIGKILL" in a.failed, a.failed
        assert poll(lambda: not owned(m, a.owner)), "A's regions were not reaped"
        healthy(m, b)
    cut = errors(caplog, "vmm.remote")
    assert len(cut) == 1 and "a0" in cut[0] and "SIGKILL" in cut[0], cut
    assert gone(a.pid)


# ---- garbage on a device's control socket -------------------------------------

@pytest.mark.parametrize("garbage", list(FAULT_GARBAGE))
def test_garbage_on_the_control_socket_cuts_off_only_that_device(guest, caplog, garbage):
    """Device A sends garbage on its control socket while the guest runs
    (the guest pokes its fault register).  A is cut off with one clear log
    line, killed, and its regions reaped; the guest keeps using device B
    (also a device process) all along, sees A read all ones, and ends with
    PASS."""
    with Machine(memory=32 << 20) as m:
        m.load_pvh(guest("faults"), cmdline("garbage", a_mmio=A_MMIO, fault=FAULT_GARBAGE[garbage]))
        a = m.add_device(fault_echo("a0", A_PIO, A_MMIO))
        b = m.add_device(echo("b0", B_PIO, B_MMIO))
        outcome = m.run(timeout=RUN_TIMEOUT)
        assert outcome.ending is Ending.TEST_EXIT and outcome.value == PASS, str(outcome)
        assert a.failed is not None and "broke the control protocol" in a.failed, a.failed
        assert poll(lambda: not owned(m, a.owner)), "A's regions were not reaped"
        assert poll(lambda: gone(a.pid)), "A was not killed"
        healthy(m, b)
        assert len(owned(m, b.owner)) == 2
    cut = errors(caplog, "vmm.remote")
    assert len(cut) == 1, cut
    assert "a0" in cut[0] and "broke the control protocol" in cut[0], cut


# ---- a device holding the registry lock ------------------------------------------

LOCK_TIMEOUT = 0.3


@pytest.mark.parametrize("fast_path", [True, False], ids=["c-loop", "python-loop"])
@pytest.mark.parametrize("when", ["in-put", "in-lookup"])
def test_device_holding_the_registry_lock_is_killed(guest, caplog, when, fast_path):
    """A thread of device A takes the registry lock and keeps it.

    ``in-put``: it takes it inside the handler of the guest's write, so the
    put of that very access misses the deadline.  ``in-lookup``: it takes
    it 50 ms after answering, while the guest only reads a port nobody
    claims, so a lookup misses it.  Either way the VMM finds the holder
    (the lock word's thread id, which belongs to A's process), kills A,
    and the kernel's robust-futex handling lets the next locker rebuild the
    registry; the guest's accesses complete (the stalled read as all
    ones), it keeps using device B and ends with PASS."""
    with Machine(memory=32 << 20, lock_timeout=LOCK_TIMEOUT, fast_path=fast_path) as m:
        fault = FAULT_HOG if when == "in-put" else FAULT_HOG_LATER
        m.load_pvh(guest("faults"), cmdline("hog", a_mmio=A_MMIO, fault=fault))
        a = m.add_device(fault_echo("a0", A_PIO, A_MMIO, hog_delay_ms=50))
        b = m.add_device(echo("b0", B_PIO, B_MMIO))
        recoveries = m.registry.recoveries
        outcome, elapsed = run_with_flag(m, a)
        hog_killed_and_recovered(m, a, outcome, recoveries)
        healthy(m, b)
        assert elapsed < 10, elapsed
    watched = errors(caplog, "vmm.lockwatch")
    assert watched and f"of device a0 (pid {a.pid})" in watched[0], watched
    assert ("put of slot" if when == "in-put" else f"lookup of PIO {FREE:#x}") in watched[0], watched


# ---- the holder among several sandboxed devices ----------------------------------------

def ns_tid(pid: int, tid: int | None = None) -> int:
    """The id of thread ``tid`` (default: the main one) of process ``pid``
    in its own pid namespace (what the lock word holds)."""
    with open(f"/proc/{pid}/task/{tid or pid}/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    raise AssertionError("no NSpid line")


def hog_killed_and_recovered(m: Machine, a, outcome, recoveries: int) -> None:
    """The guest passed, the lock watch killed the hogging device ``a``
    (once, the registry still usable), the registry recovered from the
    owner's death and is free, and none of ``a``'s regions is left."""
    assert outcome.ending is Ending.TEST_EXIT and outcome.value == PASS, str(outcome)
    assert a.failed is not None and "registry lock" in a.failed, a.failed
    assert m.dispatcher.lock_watch.kills == 1
    assert m.dispatcher.lock_watch.unusable is None
    assert poll(lambda: gone(a.pid)), "the hogging device still runs"
    assert m.registry.recoveries > recoveries, "no owner-death recovery"
    assert m.registry.holder()[1] == 0
    assert not owned(m, a.owner)


def run_with_flag(m: Machine, a, timeout: float = RUN_TIMEOUT) -> tuple:
    """Run the guest, raising its flag (the guest's sign that ``a`` is cut
    off) once ``a`` fails; (outcome, seconds the run took)."""
    flag_stop = threading.Event()

    def raise_flag() -> None:
        if poll(lambda: a.failed is not None or flag_stop.is_set(), timeout):
            m.memory.write(FLAG, b"\x01")

    flagger = threading.Thread(target=raise_flag, daemon=True)
    flagger.start()
    try:
        t0 = time.monotonic()
        outcome = m.run(timeout=timeout)
        return outcome, time.monotonic() - t0
    finally:
        flag_stop.set()
        flagger.join(5)


@pytest.mark.parametrize("thread", ["main", "secondary"])
def test_lock_hog_among_three_sandboxed_devices_is_killed(guest, caplog, thread):
    """Three sandboxed devices, each in a pid namespace of its own; A takes
    the registry lock from its main thread (the one serving the guest's
    write, which then goes on serving) or from a thread of its own, and
    keeps it.  The lock word holds the holder's id in A's namespace; every
    device's threads, the main ones too, have ids of their own there, so
    the VMM names A, kills A only, the registry recovers, and the guest
    keeps using B and passes."""
    from devserver.sandbox import namespaces

    with Machine(memory=32 << 20, lock_timeout=LOCK_TIMEOUT) as m:
        fault = FAULT_HOG_MAIN if thread == "main" else FAULT_HOG
        m.load_pvh(guest("faults"), cmdline("hog", a_mmio=A_MMIO, fault=fault))
        a = m.add_device(fault_echo("a0", A_PIO, A_MMIO))
        b = m.add_device(echo("b0", B_PIO, B_MMIO))
        c = m.add_device(echo("c0", C_PIO))
        for ep in (a, b, c):
            assert ep.sandbox.device_pid == ep.pid and "namespaces" in ep.sandbox.layers
            assert ns_tid(ep.pid) == namespaces.tid_base(ep.owner)      # the main thread: not 1
        assert len({ns_tid(ep.pid) for ep in (a, b, c)}) == 3
        a_main = ns_tid(a.pid)
        recoveries = m.registry.recoveries
        outcome, elapsed = run_with_flag(m, a)
        hog_killed_and_recovered(m, a, outcome, recoveries)
        healthy(m, b, c)
        assert not gone(b.pid) and not gone(c.pid)
        assert elapsed < 10, elapsed
    watched = errors(caplog, "vmm.lockwatch")
    assert watched and f"of device a0 (pid {a.pid})" in watched[0], watched
    held_by = int(watched[0].split("held by thread ")[1].split()[0])
    if thread == "main":
        assert held_by == a_main, watched[0]
    else:
        assert namespaces.tid_base(a.owner) < held_by < namespaces.tid_base(a.owner) + namespaces.TID_RANGE


def test_holder_sigkilled_mid_lock_among_three_sandboxed_devices(guest, caplog):
    """A's main thread takes the registry lock and keeps it; before the
    (long) deadline, A is SIGKILLed from outside.  The kernel marks the
    lock owner-died, the stalled put gets it and the registry recovers; the
    VMM kills nothing itself, and the guest passes."""
    with Machine(memory=32 << 20, lock_timeout=60.0) as m:
        m.load_pvh(guest("faults"), cmdline("hog", a_mmio=A_MMIO, fault=FAULT_HOG_MAIN))
        a = m.add_device(fault_echo("a0", A_PIO, A_MMIO))
        b = m.add_device(echo("b0", B_PIO, B_MMIO))
        c = m.add_device(echo("c0", C_PIO))
        recoveries = m.registry.recoveries
        a_main = ns_tid(a.pid)

        def kill_holder() -> None:
            if poll(lambda: m.registry.holder()[1] == a_main, RUN_TIMEOUT):
                os.kill(a.pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_holder, daemon=True)
        killer.start()
        outcome, elapsed = run_with_flag(m, a)
        killer.join(5)
        assert outcome.ending is Ending.TEST_EXIT and outcome.value == PASS, str(outcome)
        assert a.failed is not None
        assert m.dispatcher.lock_watch.kills == 0 and m.dispatcher.lock_watch.stalls == 0
        assert m.registry.recoveries > recoveries, "no owner-death recovery"
        assert m.registry.holder()[1] == 0
        assert not owned(m, a.owner)
        healthy(m, b, c)
        assert elapsed < 20, elapsed


# ---- a lock word that names no device ------------------------------------------------

SCRIBBLE_LOCK_TIMEOUT = 0.2


def lock_word_offset(registry) -> int:
    """Offset of the registry's lock word: the 32-bit header word that holds
    a thread's id while that thread (not the main one) holds the lock."""
    base = reg_lib.svm_reg_base(registry._h)
    words = reg_ffi.cast("uint32_t *", base)
    header_size = words[3]
    found = []

    def hold() -> None:
        assert reg_lib.svm_reg_lock_for_test(registry._h, 10**9) == 0
        tid = threading.get_native_id()
        found.extend(4 * i for i in range(header_size // 4) if words[i] == tid)
        reg_lib.svm_reg_unlock_for_test(registry._h)

    t = threading.Thread(target=hold)
    t.start()
    t.join(10)
    assert len(found) == 1, found
    return found[0]


def set_lock_word(registry, offset: int, value: int) -> None:
    reg_ffi.cast("uint32_t *", reg_lib.svm_reg_base(registry._h) + offset)[0] = value


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait(10)
    return p.pid


@pytest.mark.parametrize("holder", ["dead-thread", "stranger", "vmm-itself"])
def test_lock_word_naming_no_device_ends_the_vm(guest, caplog, holder):
    """Something writes over the lock word (as a scribbling device could):
    it names a thread that does not exist, a process that is none of the
    VM's devices, or the VMM itself.  The VMM kills nobody -- not the
    stranger, not its devices -- logs who the word names, and once the
    lock has stayed unusable for three deadlines ends the VM with a clear
    error (Ending.VMM_ERROR, status 10) instead of hanging.  Teardown
    finishes in bounded time even with the lock still wedged."""
    stranger = subprocess.Popen(["sleep", "60"]) if holder == "stranger" else None
    try:
        tid = {"dead-thread": dead_pid, "stranger": lambda: stranger.pid,
               "vmm-itself": os.getpid}[holder]()
        with Machine(memory=32 << 20, lock_timeout=SCRIBBLE_LOCK_TIMEOUT) as m:
            m.load_pvh(guest("faults"), cmdline("scribble"))
            a = m.add_device(echo("a0", A_PIO))
            m.add_device(echo("b0", B_PIO, B_MMIO, placement="inline"))
            offset = lock_word_offset(m.registry)

            def on_sync(vcpu: int, off: int, size: int, value: int) -> None:
                if off == 0 and value == 2:
                    set_lock_word(m.registry, offset, tid)

            m.add_handler(Bus.PIO, SYNC, 8, write=on_sync)
            t0 = time.monotonic()
            outcome = m.run(timeout=RUN_TIMEOUT)
            elapsed = time.monotonic() - t0
            assert outcome.ending is Ending.VMM_ERROR, str(outcome)
            assert outcome.status == 10
            assert "registry lock is unusable" in outcome.detail, outcome.detail
            assert f"thread {tid}" in outcome.detail, outcome.detail
            assert elapsed < 3, elapsed
            # Nobody was killed.
            assert m.dispatcher.lock_watch.kills == 0
            assert a.failed is None and not a.wait_exited(0)
            if stranger is not None:
                assert stranger.poll() is None, "the VMM killed a process that is not its device"
            if holder != "dead-thread":
                # Put the lock back: the registry is intact underneath.
                set_lock_word(m.registry, offset, 0)
                assert m.registry.check() == []
                # 3 ports + the test's handler + PCI (CF8, CFC, host bridge)
                assert len([r for r in m.registry.regions() if r.owner == VMM_OWNER]) == 7
            t0 = time.monotonic()
        # Teardown finishes, also with the lock still wedged (dead-thread):
        # every wait on it has a deadline, and the device process is gone.
        assert time.monotonic() - t0 < 8
        assert gone(a.pid)
        watched = errors(caplog, "vmm.lockwatch")
        assert any("nothing is killed" in e for e in watched), watched
        assert "ending the VM" in watched[-1], watched
    finally:
        if stranger is not None:
            stranger.kill()
            stranger.wait(10)


# ---- fault control to a device whose socket has ended -------------------------

@needs_kvm
def test_fault_control_on_an_ended_channel_is_a_device_failure():
    # Between the device's socket closing and the reader noting the failure
    # (or a restart beginning) the channel is CLOSED; a fault request sent
    # then (QMP query-faults, the plan's re-setup after a restart) must be a
    # DeviceFailed its callers handle, not the channel's LocalProtocolError
    # escaping a thread (seen once in test_restart.py under rapid kills).
    from ipc.protocol import State
    from vmm.remote.endpoint import DeviceFailed
    with Machine(memory=32 << 20) as m:
        ep = m.add_device(echo("a0", A_PIO))
        assert ep.fault_control("query", {}) is not None
        ep._channel.conn.state = State.CLOSED   # as Connection._next leaves it at end of stream
        with pytest.raises(DeviceFailed, match="cannot send fault query"):
            ep.fault_control("query", {})
