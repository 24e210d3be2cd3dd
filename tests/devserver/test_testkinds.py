"""The TEST-ONLY ``fault-echo`` kind (tests.testkinds) and the VMM's
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
from devices.echo import ECHO_PID
from tests.testkinds import FAULT_ECHO

PIO = 0x1000


def spawn(registry, owner=2, kind=FAULT_ECHO, **params) -> RemoteEndpoint:
    return RemoteEndpoint.spawn(kind, {"pio": hex(PIO), **params}, owner, f"f{owner}", registry,
                                1, RemoteOptions(access_timeout=5.0))


def test_a_module_class_model_is_imported_where_the_vmm_imported_it(registry, monkeypatch, tmp_path):
    # The device process does not run in the repository (nor has it on
    # PYTHONPATH): the VMM passes the directory it imported tests/ from.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    ep = spawn(registry)
    try:
        with registry.get(Bus.PIO, PIO + ECHO_PID, 4) as ref:
            assert ep.access(0, int(Bus.PIO), ref.cookie, ref.offset, 4, False, 0) == ep.pid
    finally:
        ep.close()


def test_the_device_process_names_a_kind_it_does_not_know(registry):
    with pytest.raises(DeviceFailed, match="unknown device type 'no-such-kind'"):
        spawn(registry, kind="no-such-kind")


@pytest.mark.parametrize("params, match", [
    ({"stall_ms": "0"}, "stall_ms=0"),
    ({"hog_delay_ms": "soon"}, "not an integer"),
    ({"colour": "red"}, "unknown parameter"),
])
def test_fault_echo_parameters_are_validated(registry, params, match):
    with pytest.raises(DeviceFailed, match=match):
        spawn(registry, **params)


def test_a_device_holding_the_lock_is_killed_and_the_registry_recovers(registry, monkeypatch):
    """The dispatcher path (the all-Python vCPU loop): the put of the
    write that makes the device hog the lock misses the deadline; the
    lock watch kills the device (the lock word names its thread), the put
    goes through after owner-death recovery, the device's regions are
    reaped, and nothing ends the run."""
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
