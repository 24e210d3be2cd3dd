"""The seed's scenario at registry level: a BAR moves under an access.

kvmtool's reassignable BARs: a vCPU is inside the handler of region R when
the device moves R (unregisters it and registers R2, which overlaps R).
Here the vCPU is thread A of this process, holding a reference to R, and
the device is a separate process B attached to the segment by name.  A
keeps R's values, new lookups see R2, A's put frees R's slot, nothing
leaks.  A second case has the handler move its own region while it holds
the reference: no deadlock, because the lock is not held while handling.
"""

from __future__ import annotations

import multiprocessing
import threading

import pytest

from ipc import Bus, Registry

R_START, R_LEN, R_OWNER, R_COOKIE = 0xE000_0000, 0x1000, 7, 0xAAAA
# The moved BAR, by how it overlaps R.
MOVES = {
    "same start": (R_START, 0x2000),
    "overlapping right": (R_START + 0x800, 0x1000),
    "overlapping left": (R_START - 0x800, 0x1000),
    "enclosing": (R_START - 0x1000, 0x4000),
    "inside": (R_START + 0x400, 0x100),
}
R2_OWNER, R2_COOKIE = 8, 0xBBBB

CTX = multiprocessing.get_context("spawn")  # this process has threads


def _device_moves_bar(name: str, r2_start: int, r2_len: int, conn) -> None:
    """Process B: unregister R, register R2 overlapping it."""
    try:
        with Registry.attach(name) as reg:
            reg.unregister(Bus.MMIO, R_START, R_OWNER)
            reg.register(Bus.MMIO, r2_start, r2_len, R2_OWNER, R2_COOKIE)
            with reg.get(Bus.MMIO, r2_start) as ref:
                seen = (ref.owner, ref.cookie)
            conn.send(("ok", seen, reg.check()))
    except BaseException as e:
        conn.send(("error", repr(e)))


def _run_device(name: str, r2_start: int, r2_len: int) -> None:
    parent, child = CTX.Pipe()
    p = CTX.Process(target=_device_moves_bar, args=(name, r2_start, r2_len, child))
    p.start()
    try:
        assert parent.poll(30), "device process did not answer"
        msg = parent.recv()
    finally:
        p.join(30)
        if p.is_alive():
            p.kill()
            p.join()
    assert msg == ("ok", (R2_OWNER, R2_COOKIE), []), msg
    assert p.exitcode == 0


class VCpu(threading.Thread):
    """Thread A: looks up ``addr`` and 'handles' it until released."""

    def __init__(self, reg: Registry, addr: int):
        super().__init__(daemon=True)
        self.reg, self.addr = reg, addr
        self.holding = threading.Event()
        self.release = threading.Event()
        self.ref = None
        self.seen_after = None
        self.error = None

    def run(self):
        try:
            self.ref = self.reg.get(Bus.MMIO, self.addr, 4)
            self.holding.set()
            assert self.release.wait(30)
            r = self.ref
            self.seen_after = (r.start, r.length, r.owner, r.cookie, r.offset)
            self.reg.put(r)
        except BaseException as e:
            self.error = e
            self.holding.set()

    def finish(self):
        self.release.set()
        self.join(30)
        assert not self.is_alive()
        if self.error:
            raise self.error


def _records(reg: Registry):
    return sorted((r.start, r.length, r.owner, r.cookie, r.refcount, r.removing)
                  for r in reg.regions())


@pytest.mark.parametrize("move", list(MOVES))
def test_bar_moves_under_an_access(registry, move):
    r2_start, r2_len = MOVES[move]
    registry.register(Bus.MMIO, R_START, R_LEN, R_OWNER, R_COOKIE)
    registry.register(Bus.PIO, 0xCF8, 8, owner=99)  # a bystander
    (r_slot,) = [r.slot for r in registry.regions() if r.bus == Bus.MMIO]

    a = VCpu(registry, R_START + 0x10)
    a.start()
    assert a.holding.wait(30) and a.error is None
    assert a.ref.owner == R_OWNER

    _run_device(registry.name, r2_start, r2_len)

    # New lookups see R2 wherever it lies, and miss where only R was.
    with registry.get(Bus.MMIO, r2_start, 4) as ref:
        assert (ref.owner, ref.cookie, ref.start, ref.length) == (R2_OWNER, R2_COOKIE, r2_start, r2_len)
    for addr in (R_START, R_START + 0x10, R_START + R_LEN - 4):
        ref = registry.get(Bus.MMIO, addr, 4)
        inside_r2 = r2_start <= addr and addr + 4 <= r2_start + r2_len
        if inside_r2:
            assert ref is not None and ref.owner == R2_OWNER
            registry.put(ref)
        else:
            assert ref is None
    # R's slot waits for A; R2 has a slot of its own.
    by_slot = {r.slot: r for r in registry.regions()}
    old = by_slot[r_slot]
    assert (old.start, old.owner, old.cookie, old.refcount, old.removing) == (
        R_START, R_OWNER, R_COOKIE, 1, True)
    assert old.generation == a.ref.generation
    assert registry.check() == []

    a.finish()
    # A's reference reported R throughout.
    assert a.seen_after == (R_START, R_LEN, R_OWNER, R_COOKIE, 0x10)
    # A's put freed R's slot; R2 and the bystander are untouched.
    assert _records(registry) == [
        (0xCF8, 8, 99, 0, 0, False),
        (r2_start, r2_len, R2_OWNER, R2_COOKIE, 0, False),
    ]
    assert not any(r.removing for r in registry.regions())
    assert registry.check() == []

    registry.unregister(Bus.MMIO, r2_start, R2_OWNER)
    registry.unregister(Bus.PIO, 0xCF8, 99)
    assert registry.regions() == []
    assert registry.check() == []


def test_several_vcpus_in_the_old_bar(registry):
    """Two vCPUs inside R; the slot is freed only at the second put."""
    registry.register(Bus.MMIO, R_START, R_LEN, R_OWNER, R_COOKIE)
    a, b = VCpu(registry, R_START), VCpu(registry, R_START + 0x100)
    for t in (a, b):
        t.start()
        assert t.holding.wait(30) and t.error is None
    r2_start, r2_len = MOVES["overlapping right"]
    _run_device(registry.name, r2_start, r2_len)
    removing = [r for r in registry.regions() if r.removing]
    assert [(r.start, r.refcount) for r in removing] == [(R_START, 2)]
    a.finish()
    removing = [r for r in registry.regions() if r.removing]
    assert [(r.start, r.refcount) for r in removing] == [(R_START, 1)]
    b.finish()
    assert _records(registry) == [(r2_start, r2_len, R2_OWNER, R2_COOKIE, 0, False)]
    assert registry.check() == []
    registry.unregister(Bus.MMIO, r2_start, R2_OWNER)
    assert registry.regions() == []


def test_bar_moves_back_and_forth(small_registry):
    """Repeated moves while a vCPU holds each old position: no slot leaks."""
    reg = small_registry
    start = R_START
    reg.register(Bus.MMIO, start, R_LEN, R_OWNER, 0)
    for i in range(1, 40):
        ref = reg.get(Bus.MMIO, start + 8, 4)
        new = R_START + (i % 3) * 0x800
        reg.unregister(Bus.MMIO, start, R_OWNER)
        reg.register(Bus.MMIO, new, R_LEN, R_OWNER, i)
        assert ref.cookie == i - 1
        reg.put(ref)
        start = new
        assert [(r.start, r.cookie, r.removing) for r in reg.regions()] == [(start, i, False)]
    reg.unregister(Bus.MMIO, start, R_OWNER)
    assert reg.regions() == []
    assert reg.check() == []


@pytest.mark.parametrize("move", ["same start", "overlapping right", "enclosing"])
def test_handler_moves_its_own_bar(registry, move):
    """The thread holding the reference moves the region itself (a guest
    write to the BAR): unregister and register run while the reference is
    held, which needs the lock to be free during handling."""
    r2_start, r2_len = MOVES[move]
    registry.register(Bus.MMIO, R_START, R_LEN, R_OWNER, R_COOKIE)
    registry.lock_timeout = 5.0  # a deadlock shows as LockTimeout, not a hang
    result = {}

    def handler():
        try:
            with registry.get(Bus.MMIO, R_START + 0x10, 4) as ref:
                registry.unregister(Bus.MMIO, R_START, R_OWNER)
                registry.register(Bus.MMIO, r2_start, r2_len, R2_OWNER, R2_COOKIE)
                # A nested access from inside the handler hits the new BAR.
                with registry.get(Bus.MMIO, r2_start) as inner:
                    result["inner"] = (inner.owner, inner.cookie)
                result["during"] = _records(registry)
                result["ref"] = (ref.start, ref.owner, ref.cookie)
        except BaseException as e:
            result["error"] = e

    t = threading.Thread(target=handler, daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "handler deadlocked"
    if "error" in result:
        raise result["error"]
    assert result["inner"] == (R2_OWNER, R2_COOKIE)
    assert result["ref"] == (R_START, R_OWNER, R_COOKIE)
    assert (R_START, R_LEN, R_OWNER, R_COOKIE, 1, True) in result["during"]
    assert _records(registry) == [(r2_start, r2_len, R2_OWNER, R2_COOKIE, 0, False)]
    assert registry.check() == []
    registry.unregister(Bus.MMIO, r2_start, R2_OWNER)
    assert registry.regions() == []
    assert registry.check() == []
