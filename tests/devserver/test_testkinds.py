"""The TEST-ONLY ``fault-echo`` kind (devserver.testkinds) and the VMM's
answer to a device holding the registry lock, without KVM: real device
processes, the real dispatcher, a Python thread for the vCPU."""

from __future__ import annotations

import os
import time

import pytest

from ipc import Bus
from vmm.dispatch import Dispatcher
from vmm.endpoint import DeviceFailed
from vmm.outcome import Ending
from vmm.remote import RemoteEndpoint, RemoteOptions

PIO = 0x1000
ENV = "SPLITVMM_TEST_KINDS"


def spawn(registry, owner=2, **params) -> RemoteEndpoint:
    return RemoteEndpoint.spawn("fault-echo", {"pio": hex(PIO), **params}, owner, f"f{owner}", registry,
                                1, RemoteOptions(access_timeout=5.0))


def test_test_kinds_exist_only_under_the_environment_switch(registry, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(DeviceFailed, match="unknown device type 'fault-echo'"):
        spawn(registry)


@pytest.mark.parametrize("params, match", [
    ({"stall_ms": "0"}, "stall_ms=0"),
    ({"hog_delay_ms": "soon"}, "not an integer"),
    ({"colour": "red"}, "unknown parameter"),
])
def test_fault_echo_parameters_are_validated(registry, monkeypatch, params, match):
    monkeypatch.setenv(ENV, "1")
    with pytest.raises(DeviceFailed, match=match):
        spawn(registry, **params)


def test_a_device_holding_the_lock_is_killed_and_the_registry_recovers(registry, monkeypatch):
    """The dispatcher path (the all-Python vCPU loop): the put of the
    write that makes the device hog the lock misses the deadline; the
    lock watch kills the device (the lock word names its thread), the put
    goes through after owner-death recovery, the device's regions are
    reaped, and nothing ends the run."""
    monkeypatch.setenv(ENV, "1")
    registry.lock_timeout = 0.2
    ep = spawn(registry)
    ended = []
    try:
        d = Dispatcher(registry, {ep.owner: ep}, on_fatal=ended.append)
        d.access(0, int(Bus.PIO), PIO + 8, 4, True, 0x1234)
        assert d.access(0, int(Bus.PIO), PIO + 8, 4, False, 0) == 0x1234
        before = registry.recoveries
        t0 = time.monotonic()
        d.access(0, int(Bus.PIO), PIO + 0xFC, 4, True, 4)      # FAULT_HOG
        assert time.monotonic() - t0 < 3.0
        assert ep.failed is not None and "registry lock" in ep.failed
        assert d.lock_watch.kills == 1 and d.lock_watch.unusable is None and not ended
        assert ep.wait_exited(5.0)
        assert registry.recoveries > before
        assert registry.check() == []
        assert not [r for r in registry.regions() if r.owner == ep.owner]
        assert d.access(0, int(Bus.PIO), PIO + 8, 4, False, 0) == 0xFFFF_FFFF
    finally:
        ep.close()
    assert not os.path.exists(f"/proc/{ep.pid}")


def test_a_lock_word_naming_a_stranger_ends_the_run_and_kills_nobody(registry, monkeypatch):
    """The lock word names the test process itself (none of the devices):
    nothing is killed, and after three deadlines the run is ended."""
    from ipc.registry import lib

    monkeypatch.setenv(ENV, "1")
    registry.lock_timeout = 0.1
    ep = spawn(registry)
    ended = []
    try:
        d = Dispatcher(registry, {ep.owner: ep}, on_fatal=ended.append)
        assert lib.svm_reg_lock_for_test(registry._h, 10**9) == 0   # this thread holds it
        try:
            for _ in range(4):
                assert d.access(0, int(Bus.PIO), PIO, 4, False, 0) == 0xFFFF_FFFF
        finally:
            lib.svm_reg_unlock_for_test(registry._h)
        assert d.lock_watch.kills == 0 and ep.failed is None
        assert len(ended) == 1 and ended[0].ending is Ending.VMM_ERROR
        assert "the VMM itself" in ended[0].detail
    finally:
        ep.close()
