"""What a hostile device can still do to its siblings through the shared
registry, claim by claim (docs/DESIGN-registry-trust.md).  The hostile
side is a real child process that maps the registry segment; the VMM side
is the dispatcher's Python path, which calls the same C window check as
the exit loop (vmm.windows).  The KVM end-to-end version is
tests/vmm/test_windows.py."""

from __future__ import annotations

import mmap
import struct
import subprocess
import sys
import threading

import posix_ipc
import pytest

from devices.base import all_ones
from ipc import Bus, LockTimeout, RegionConflict, Registry, RegistryFull
from tests.ipc._children import spawn
from vmm.dispatch import Dispatcher
from vmm.endpoint import VMM_OWNER
from vmm.lockwatch import LockWatch
from vmm.windows import Grant, OwnerWindows

SIBLING, HOSTILE = 2, 3
BAR = 0xE030_0000
BAR_LEN = 0x1000
HPORT = 0x2000


class Recorder:
    """An endpoint that records what reaches it."""

    def __init__(self, owner: int, name: str):
        self.owner = owner
        self.name = name
        self.seen: list[tuple[int, int, int, bool]] = []

    def access(self, vcpu, space, cookie, offset, size, is_write, value):
        self.seen.append((space, cookie, offset, is_write))
        return 0x1234

    def access_batch(self, vcpu, writes):
        for space, cookie, offset, size, value in writes:
            self.access(vcpu, space, cookie, offset, size, True, value)

    def close(self):
        pass


@pytest.fixture
def vm(registry_name):
    """A registry, windows as the VMM grants them (the VMM's test-exit
    port, a sibling's BAR 0, the hostile's own ports) and a dispatcher."""
    reg = Registry.create(registry_name, capacity=64, lock_timeout=0.2)
    windows = OwnerWindows(VMM_OWNER)
    windows.grant(VMM_OWNER, "exit", Grant(Bus.PIO, 0xF4, 4, 0))
    windows.grant(SIBLING, "bar0", Grant(Bus.MMIO, BAR, BAR_LEN, 0))
    windows.grant(HOSTILE, "ports", Grant(Bus.PIO, HPORT, 0x40, 0))
    eps = {o: Recorder(o, n) for o, n in ((VMM_OWNER, "vmm"), (SIBLING, "sibling"), (HOSTILE, "hostile"))}
    reg.register(Bus.PIO, 0xF4, 4, VMM_OWNER, 0)
    reg.register(Bus.MMIO, BAR, BAR_LEN, SIBLING, 0)
    reg.register(Bus.PIO, HPORT, 0x40, HOSTILE, 0)
    d = Dispatcher(reg, eps, windows=windows)
    yield reg, d, eps
    reg.close()
    reg.unlink()


def hostile(name: str, *ops: tuple) -> list:
    """Run registry operations in a separate process (the hostile device)."""
    return spawn(_hostile_ops, name, ops).result()


def _hostile_ops(name: str, ops: tuple) -> list:
    reg = Registry.attach(name)
    out = []
    for op, *args in ops:
        try:
            getattr(reg, op)(*args)
            out.append("ok")
        except Exception as e:
            out.append(type(e).__name__)
    return out


def read(d: Dispatcher, bus: Bus, addr: int, size: int = 4) -> int:
    return d.access(0, int(bus), addr, size, False, 0)


def test_it_can_unregister_a_sibling_and_make_its_accesses_miss(vm, registry_name):
    reg, d, eps = vm
    assert read(d, Bus.MMIO, BAR) == 0x1234
    # The owner id is an argument of unregister, so nothing stops it.
    assert hostile(registry_name, ("unregister", Bus.MMIO, BAR, SIBLING)) == ["ok"]
    assert read(d, Bus.MMIO, BAR) == all_ones(4)
    assert eps[HOSTILE].seen == []


def test_it_can_squat_where_a_sibling_goes_next_and_block_its_claim(vm, registry_name):
    reg, d, eps = vm
    new = BAR + 0x10_0000
    d.windows.grant(SIBLING, "bar0", Grant(Bus.MMIO, new, BAR_LEN, 0))   # the guest moved BAR 0
    assert hostile(registry_name, ("register", Bus.MMIO, new, BAR_LEN, HOSTILE, 0)) == ["ok"]
    reg.unregister(Bus.MMIO, BAR, SIBLING)
    with pytest.raises(RegionConflict):
        reg.register(Bus.MMIO, new, BAR_LEN, SIBLING, 0)
    assert read(d, Bus.MMIO, new) == all_ones(4)      # refused: the squat captures nothing
    assert eps[HOSTILE].seen == [] and eps[SIBLING].seen == []
    assert d.windows.refused == 1
    # Once the squat goes, the sibling's claim (its retry) succeeds.
    assert hostile(registry_name, ("unregister", Bus.MMIO, new, HOSTILE)) == ["ok"]
    reg.register(Bus.MMIO, new, BAR_LEN, SIBLING, 0)
    assert read(d, Bus.MMIO, new) == 0x1234


def test_a_forged_owner_id_reaches_the_sibling_only_as_its_own_region_would(vm, registry_name):
    reg, d, eps = vm
    reg.unregister(Bus.MMIO, BAR, SIBLING)
    # In the sibling's name at its own place and cookie: honoured, and the
    # sibling sees the offsets its own region gives.
    assert hostile(registry_name, ("register", Bus.MMIO, BAR, BAR_LEN, SIBLING, 0)) == ["ok"]
    assert read(d, Bus.MMIO, BAR + 0x10) == 0x1234
    assert eps[SIBLING].seen == [(int(Bus.MMIO), 0, 0x10, False)]
    # Shifted (the sibling would see wrong offsets), or with another cookie: refused.
    for start, cookie in ((BAR - 0x100, 0), (BAR, 7)):
        assert hostile(registry_name, ("unregister", Bus.MMIO, BAR, SIBLING),
                       ("register", Bus.MMIO, start, BAR_LEN, SIBLING, cookie)) == ["ok", "ok"]
        assert read(d, Bus.MMIO, BAR + 0x10) == all_ones(4)
        assert hostile(registry_name, ("unregister", Bus.MMIO, start, SIBLING),
                       ("register", Bus.MMIO, BAR, BAR_LEN, SIBLING, 0)) == ["ok", "ok"]
    assert len(eps[SIBLING].seen) == 1 and eps[HOSTILE].seen == []


def _slot_offset(mm: mmap.mmap, start: int, length: int, owner: int, cookie: int) -> int:
    """Where a slot holding this region sits in the segment (its fields
    start, length, owner, cookie in that order, as svm_slot_view has them)."""
    at = mm.find(struct.pack("=4Q", start, length, owner, cookie))
    assert at >= 0
    return at


def _map(name: str) -> mmap.mmap:
    shm = posix_ipc.SharedMemory(name)
    try:
        return mmap.mmap(shm.fd, 0)
    finally:
        shm.close_fd()


def _scribble(name: str, region: tuple, field: int, value: int) -> None:
    mm = _map(name)
    struct.pack_into("=Q", mm, _slot_offset(mm, *region) + 8 * field, value)
    mm.close()


def test_scribbling_slots_misroutes_nothing_outside_the_windows(vm, registry_name):
    reg, d, eps = vm
    # Its own region rewritten, no lock taken: onto the VMM's owner id and
    # then the sibling's -- refused either way (not their windows).
    spawn(_scribble, registry_name, (HPORT, 0x40, HOSTILE, 0), 2, VMM_OWNER).result()
    assert read(d, Bus.PIO, HPORT) == all_ones(4)
    spawn(_scribble, registry_name, (HPORT, 0x40, VMM_OWNER, 0), 2, SIBLING).result()
    assert read(d, Bus.PIO, HPORT) == all_ones(4)
    # The sibling's region given the hostile's owner id: refused, not captured.
    spawn(_scribble, registry_name, (BAR, BAR_LEN, SIBLING, 0), 2, HOSTILE).result()
    assert read(d, Bus.MMIO, BAR) == all_ones(4)
    assert eps[HOSTILE].seen == [] and eps[SIBLING].seen == [] and eps[VMM_OWNER].seen == []
    assert d.windows.refused == 3


def test_it_can_fill_the_table_but_not_take_the_vmms_ports(vm, registry_name):
    reg, d, eps = vm
    ops = [("register", Bus.MMIO, 0x1_0000_0000 + i * 0x1000, 0x1000, HOSTILE, 0) for i in range(80)]
    out = hostile(registry_name, ("unregister", Bus.PIO, 0xF4, VMM_OWNER), *ops)
    assert "RegistryFull" in out
    with pytest.raises(RegistryFull):          # a sibling's next claim (a BAR move) fails
        reg.register(Bus.MMIO, BAR + 0x10_0000, BAR_LEN, SIBLING, 0)
    # The VMM's own port is found in its private windows all the same.
    d.access(0, int(Bus.PIO), 0xF4, 4, True, 1)
    assert eps[VMM_OWNER].seen == [(int(Bus.PIO), 0, 0, True)]


def test_holding_the_lock_delays_every_lookup_to_the_deadline(vm, registry_name):
    """(Its killing by LockWatch is tests/vmm/test_device_faults.py::
    test_device_holding_the_registry_lock_is_killed.)"""
    reg, d, eps = vm
    from ipc.registry import lib
    other = Registry.attach(registry_name)
    held, done = threading.Event(), threading.Event()

    def hog():
        assert lib.svm_reg_lock_for_test(other._h, 10**9) == 0
        held.set()
        done.wait(10)
        lib.svm_reg_unlock_for_test(other._h)

    t = threading.Thread(target=hog)
    t.start()
    try:
        assert held.wait(10)
        with pytest.raises(LockTimeout):
            reg.get(Bus.MMIO, BAR, 4)
    finally:
        done.set()
        t.join(10)
        other.close()
    assert read(d, Bus.MMIO, BAR) == 0x1234


class _Sibling:
    """An endpoint of a real process that LockWatch may cut off."""

    def __init__(self, owner: int):
        self.owner = owner
        self.name = "sibling"
        self.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        self.pid = self.proc.pid
        self.failed: str | None = None

    def cut_off(self, reason: str) -> None:
        self.failed = reason
        self.proc.kill()

    def wait_exited(self, timeout: float) -> bool:
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False


def test_a_forged_lock_word_gets_a_sibling_killed(registry_name):
    from tests.ipc.test_registry_hostile import find_lock_word
    reg = Registry.create(registry_name, capacity=16, lock_timeout=0.2)
    sibling = _Sibling(SIBLING)
    failed: list = []
    try:
        mm = _map(registry_name)
        word = find_lock_word(reg, mm)
        # The hostile device writes the sibling's thread id into the word.
        struct.pack_into("=I", mm, word, sibling.pid)
        with pytest.raises(LockTimeout) as e:
            reg.get(Bus.MMIO, BAR, 4)
        assert e.value.holder_pid == sibling.pid
        watch = LockWatch(reg, {SIBLING: sibling}, lambda ep, err: failed.append(ep))
        watch.stalled(0, "lookup")
        assert sibling.wait_exited(10) and sibling.failed is not None
        assert failed == [sibling] and watch.kills == 1
        struct.pack_into("=I", mm, word, 0)
        mm.close()
    finally:
        if sibling.proc.poll() is None:
            sibling.proc.kill()
        reg.close()
