"""Crash consistency of the registry (issue 2, section 3).

A writer is SIGKILLed inside its critical section, and the next locker
(the pytest process) must recover: ``registry.recoveries`` goes up by one,
``check()`` is empty, every region other than the one the dead writer was
changing is still there with all its fields (slot, generation, refcount,
state), the references the parent holds are intact, and the registry is
fully usable afterwards.

(a) Deterministic: the C core's test hook counts the ``step()`` points of
each mutation and raises SIGKILL (or SIGSTOP) at a chosen one.  For every
operation variant below we first count its steps in a child that is not
killed, then fork one child per step number and kill it there.

(b) Random: a child registers and unregisters as fast as it can and the
parent SIGKILLs it after a random delay between tens of microseconds and a
few milliseconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
import signal
import struct
import time

import pytest

from ipc import Bus, LockTimeout, Registry, RegionConflict, RegistryFull, StaleReference
from ipc._registry_c import lib
from tests.conftest import segment_name
from tests.ipc._children import child_ready, spawn

CAPACITY = 32
NO_CRASH = 1 << 62
PROBE = (Bus.PCI, 0xF0000, 0x100)  # never used by a scenario's layout
BUSES = (Bus.PIO, Bus.MMIO, Bus.PCI)


def cookie_for(owner: int, bus: int, start: int, length: int) -> int:
    digest = hashlib.blake2b(struct.pack("<QQQQ", owner, int(bus), start, length), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def snap(reg: Registry) -> dict:
    """slot -> RegionRecord of every slot in use."""
    return {rec.slot: rec for rec in reg.regions()}


def add(reg: Registry, bus, start, length, owner):
    reg.register(bus, start, length, owner, cookie_for(owner, bus, start, length))


# ---- scenarios -------------------------------------------------------------


@dataclasses.dataclass
class Scenario:
    """One mutation, run by a child against a registry the parent set up.

    ``kind`` is what the dead writer was doing: "register", "unregister",
    "unregister_owner" or "put"; ``target`` says which region (for register,
    the (bus, start, length, owner) being added)."""

    name: str
    layout: list            # (bus, start, length, owner) registered first
    kind: str
    target: tuple
    refs: int = 0           # references the parent takes on the target first
    other_refs: int = 0     # references the parent takes on a bystander
    removing_first: bool = False  # parent unregisters the target (put scenarios)
    fails: bool = False     # the mutation is refused (RegistryFull)

    def __str__(self) -> str:
        return self.name


def row(bus, n, base=0x1000, stride=0x100, length=0x80, owner=1):
    return [(bus, base + k * stride, length, owner) for k in range(n)]


def build_scenarios() -> list[Scenario]:
    out = []
    for bus in (Bus.PIO, Bus.MMIO):
        # Background on the other buses, so that index counts of several
        # buses are in play and the bystander checks have something to check.
        others = [b for b in BUSES if b != bus]
        background = row(others[0], 3, base=0x8000, owner=7) + row(others[1], 2, base=0x4000, owner=8)
        b = bus.name
        for n in (0, 1, 3, 8):
            lay = row(bus, n) + background
            positions = {"first": 0x800, "last": 0x1000 + n * 0x100}
            if n >= 3:
                positions["middle"] = 0x1000 + (n // 2) * 0x100 - 0x80  # in a gap
            for where, start in positions.items():
                out.append(Scenario(f"register-{b}-n{n}-{where}", lay, "register",
                                    (bus, start, 0x40, 5), other_refs=1 if n else 0))
        for n in (1, 3, 8):
            lay = row(bus, n) + background
            picks = {"first": 0, "last": n - 1}
            if n >= 3:
                picks["middle"] = n // 2
            for where, k in picks.items():
                for refs in (0, 2):
                    out.append(Scenario(f"unregister-{b}-n{n}-{where}-refs{refs}", lay, "unregister",
                                        lay[k], refs=refs, other_refs=1 if n > 1 else 0))
    # A nearly full table whose only free slot is in the middle (the free
    # slot search wraps), and a table that is full (nothing may change).
    full = row(Bus.MMIO, CAPACITY, base=0x10000, stride=0x100)
    hole = full[:10] + full[11:]
    out.append(Scenario("register-into-last-free-slot", hole, "register",
                        (Bus.MMIO, 0x10000 + 10 * 0x100, 0x80, 5), other_refs=1))
    out.append(Scenario("register-when-full", full, "register",
                        (Bus.PIO, 0x100, 0x10, 5), other_refs=1, fails=True))
    # unregister_owner: owner 3 has regions on several buses, interleaved
    # with other owners' regions; sometimes one of them is referenced.
    mixed = []
    for k in range(6):
        mixed.append((Bus.PIO, 0x100 * k, 0x80, 3 if k % 2 else 1))
        mixed.append((Bus.MMIO, 0x100 * k, 0x80, 3 if k % 3 == 0 else 2))
    mixed.append((Bus.PCI, 0x2000, 0x1000, 3))
    for refs in (0, 1):
        out.append(Scenario(f"unregister_owner-refs{refs}", mixed, "unregister_owner",
                            (3,), refs=refs, other_refs=1))
    out.append(Scenario("unregister_owner-single", row(Bus.MMIO, 1, owner=3) + background,
                        "unregister_owner", (3,)))
    # put: the last reference of a removing slot (frees it), one of two
    # references of a removing slot, and a reference of a live slot.
    lay = row(Bus.PIO, 4) + background
    out.append(Scenario("put-frees-removing", lay, "put", lay[1], refs=1, other_refs=1, removing_first=True))
    out.append(Scenario("put-one-of-two-removing", lay, "put", lay[2], refs=2, removing_first=True))
    out.append(Scenario("put-live", lay, "put", lay[0], refs=1, other_refs=1))
    return out


SCENARIOS = build_scenarios()


class Setup:
    """A fresh registry holding a scenario's layout and the parent's refs."""

    def __init__(self, sc: Scenario):
        self.sc = sc
        self.name = segment_name("crash")
        self.reg = Registry.create(self.name, capacity=CAPACITY, lock_timeout=2.0)
        self.held = []           # (ref, slot) the parent holds
        self.target_refs = []
        try:
            for bus, start, length, owner in sc.layout:
                add(self.reg, bus, start, length, owner)
            if sc.kind in ("unregister", "put"):
                bus, start = sc.target[0], sc.target[1]
                for _ in range(sc.refs):
                    self.target_refs.append(self.reg.get(bus, start))
                if sc.removing_first:
                    self.reg.unregister(bus, start, sc.target[3])
            elif sc.kind == "unregister_owner" and sc.refs:
                mine = [r for r in sc.layout if r[3] == sc.target[0]]
                self.target_refs.append(self.reg.get(mine[-1][0], mine[-1][1]))
            bystanders = [r for r in sc.layout if r[:2] != tuple(sc.target[:2])
                          and (sc.kind != "unregister_owner" or r[3] != sc.target[0])]
            for r in bystanders[:sc.other_refs]:
                self.held.append(self.reg.get(r[0], r[1]))
            assert all(r is not None for r in self.target_refs + self.held)
        except BaseException:
            self.close()
            raise

    def close(self):
        self.reg.close()
        self.reg.unlink()


def mutate(reg: Registry, sc: Scenario, target_refs, crash_step: int, action: int = 1) -> dict:
    """Child: perform the scenario's one mutation with the crash hook armed."""
    lib.svm_test_crash_action = action
    lib.svm_test_step_counter = 0
    lib.svm_test_crash_step = crash_step
    if sc.kind == "register":
        bus, start, length, owner = sc.target
        try:
            add(reg, bus, start, length, owner)
        except RegistryFull:
            if not sc.fails:
                raise
        else:
            assert not sc.fails
    elif sc.kind == "unregister":
        reg.unregister(sc.target[0], sc.target[1], sc.target[3])
    elif sc.kind == "unregister_owner":
        reg.unregister_owner(sc.target[0])
    elif sc.kind == "put":
        reg.put(target_refs[0])
    steps = lib.svm_test_step_counter
    lib.svm_test_crash_step = 0
    return {"steps": steps}


def count_steps(sc: Scenario) -> int:
    s = Setup(sc)
    try:
        child = spawn(mutate, s.reg, sc, s.target_refs, NO_CRASH)
        child.wait(timeout=20)
        assert child.exitcode == 0, child.describe()
        return child.result()["steps"]
    finally:
        s.close()


def target_slots(sc: Scenario, before: dict) -> set:
    """Slots of the regions the dead writer was changing."""
    if sc.kind == "register":
        return set()
    if sc.kind == "unregister_owner":
        return {s for s, r in before.items() if r.owner == sc.target[0]}
    bus, start = sc.target[0], sc.target[1]
    return {s for s, r in before.items() if (r.bus, r.start) == (bus, start)}


def verify_after_crash(s: Setup, before: dict, finished: bool) -> None:
    """The registry after the writer died (or finished, when ``finished``)."""
    sc, reg = s.sc, s.reg
    after = snap(reg)
    changing = target_slots(sc, before)
    assert changing or sc.kind == "register"

    # Nobody else's region moved, lost a reference or changed a field.
    for slot, rec in before.items():
        if slot not in changing:
            assert after.get(slot) == rec, f"{sc}: bystander slot {slot} changed: {rec} -> {after.get(slot)}"

    # What may have become of the regions the writer was changing.
    new = {slot: rec for slot, rec in after.items() if slot not in before}
    if sc.kind == "register":
        bus, start, length, owner = sc.target
        assert len(new) <= 1, new
        if new:
            (rec,) = new.values()
            assert (rec.bus, rec.start, rec.length, rec.owner) == (bus, start, length, owner), rec
            assert rec.cookie == cookie_for(owner, bus, start, length)
            assert (rec.refcount, rec.removing) == (0, False), rec
        if sc.fails:
            assert not new, f"{sc}: a refused register left {new}"
        elif finished:
            assert new, f"{sc}: register finished but the region is missing"
    else:
        assert new == {}, f"{sc}: slots appeared: {new}"
    for slot in changing:
        old, now = before[slot], after.get(slot)
        if sc.kind in ("unregister", "unregister_owner"):
            if old.refcount == 0:
                # Gone, or still there (the generation may already be new:
                # nobody holds a reference that could notice).
                if now is not None:
                    assert dataclasses.replace(now, generation=old.generation) == old, (old, now)
                    assert not finished, f"{sc}: unregister finished but {now} is left"
            else:
                # Referenced: never freed under the parent's references.
                assert now is not None, f"{sc}: referenced slot {slot} freed by unregister"
                assert dataclasses.replace(now, removing=old.removing) == old, (old, now)
                if finished:
                    assert now.removing, now
        elif sc.kind == "put":
            if now is None:
                assert old.removing and old.refcount == 1, f"{sc}: slot {slot} freed by a put: {old}"
            else:
                assert dataclasses.replace(now, refcount=old.refcount) == old, (old, now)
                assert now.refcount in (old.refcount, old.refcount - 1), (old, now)
                assert now.refcount > 0 or not now.removing
                if finished:
                    assert now.refcount == old.refcount - 1


def verify_usable(s: Setup, before: dict) -> None:
    """Put the parent's references, use the registry, empty it."""
    sc, reg = s.sc, s.reg
    after = snap(reg)
    # The parent's references: a bystander's must put cleanly.  For the
    # dead writer's put, the shared reference was either put by it (the
    # count dropped or the slot is gone) or not (then the parent puts it).
    refs = list(s.held)
    if sc.kind == "put":
        tref = s.target_refs[0]
        now = after.get(tref.slot)
        done = now is None or now.refcount < before[tref.slot].refcount
        if done:
            if now is None:
                with pytest.raises(StaleReference):
                    reg.put(tref)
        else:
            refs.append(tref)
        refs += s.target_refs[1:]
    else:
        refs += s.target_refs
    # Every live region resolves to itself.
    for rec in after.values():
        if not rec.removing:
            with reg.get(rec.bus, rec.start + rec.length - 1) as ref:
                assert (ref.slot, ref.owner, ref.cookie, ref.start) == (rec.slot, rec.owner, rec.cookie, rec.start)
                assert ref.generation == rec.generation
    for ref in refs:
        reg.put(ref)
    # New work goes through, beside the old regions and in an empty table.
    if len(snap(reg)) < CAPACITY:
        probe(reg)
    for owner in {rec.owner for rec in snap(reg).values()}:
        reg.unregister_owner(owner)
    assert reg.regions() == []
    assert reg.check() == []
    probe(reg)
    assert reg.regions() == []


def probe(reg: Registry) -> None:
    """register / conflict / get / put / unregister of a fresh region."""
    bus, start, length = PROBE
    add(reg, bus, start, length, 42)
    with pytest.raises(RegionConflict):
        add(reg, bus, start + 1, 1, 43)
    with reg.get(bus, start + 5, 2) as ref:
        assert (ref.owner, ref.offset, ref.length) == (42, 5, length)
    reg.unregister(bus, start, 42)
    assert reg.get(bus, start) is None


def run_one(sc: Scenario, k: int, action: int = 1) -> str:
    """Set up, run the child with the hook at step k, verify.  Returns how
    the child ended ("killed" or "finished")."""
    s = Setup(sc)
    child = None
    try:
        before = snap(s.reg)
        assert s.reg.check() == []
        rec0 = s.reg.recoveries
        child = spawn(mutate, s.reg, sc, s.target_refs, k, action)
        if action == 2:
            assert child.wait_stopped(timeout=20), f"{sc} step {k}: {child.describe()}, not stopped"
            # Stopped inside the critical section: the lock is held by it.
            with pytest.raises(LockTimeout) as ei:
                s.reg.get(Bus.PIO, 0x1000, timeout=0.02)
            assert ei.value.holder_pid == child.pid
            child.kill()
        else:
            child.wait(timeout=20)
        finished = child.exitcode == 0
        if not finished:
            assert child.signaled == signal.SIGKILL, f"{sc} step {k}: {child.describe()}"
        problems = s.reg.check()
        assert s.reg.recoveries == rec0 + (0 if finished else 1), f"{sc} step {k}: no recovery"
        assert problems == [], f"{sc} step {k}: {problems}"
        verify_after_crash(s, before, finished)
        verify_usable(s, before)
        return "finished" if finished else "killed"
    except AssertionError as e:
        raise AssertionError(f"{sc}, crash at step {k}: {e}") from e
    finally:
        if child is not None:
            child.kill()
        s.close()


@pytest.fixture(scope="module")
def step_counts():
    return {sc.name: count_steps(sc) for sc in SCENARIOS}


def test_every_mutation_has_steps(step_counts):
    for sc in SCENARIOS:
        assert step_counts[sc.name] >= (1 if sc.fails else 2), (sc.name, step_counts[sc.name])
    # Index shifts add steps: inserting at the front of 8 takes more than
    # inserting into an empty index.
    assert step_counts["register-PIO-n8-first"] > step_counts["register-PIO-n0-first"]


def test_sigkill_at_every_step_of_every_mutation(step_counts):
    kills = 0
    for sc in SCENARIOS:
        n = step_counts[sc.name]
        for k in range(1, n + 1):
            assert run_one(sc, k) == "killed", f"{sc}: child survived step {k} of {n}"
            kills += 1
        # One past the last step: the mutation completes normally.
        assert run_one(sc, n + 1) == "finished"
    print(f"deterministic kills: {kills} over {len(SCENARIOS)} scenarios")
    assert kills >= 200


def test_stopped_writer_blocks_then_dies_and_is_recovered(step_counts):
    """SIGSTOP at a step inside the critical section: lookups time out and
    name the writer; SIGKILL it, and the next locker recovers."""
    for sc in SCENARIOS[::3]:
        n = step_counts[sc.name]
        for k in sorted({1, (n + 1) // 2, n}):
            assert run_one(sc, k, action=2) == "killed"


# ---- (b) random kills ------------------------------------------------------


RANDOM_KILLS = 100
RANDOM_CAPACITY = 1024
BACKGROUND = 900
WARMUP = 0.015


def churn(name: str, owner: int, seed: int) -> dict:
    """Child: register and unregister as fast as possible until killed."""
    rng = random.Random(seed)
    reg = Registry.attach(name, lock_timeout=2.0)
    mine: list[tuple[int, int]] = []
    deadline = time.monotonic() + 20
    # Signal readiness only after a warm-up: a freshly forked child spends
    # its first milliseconds in copy-on-write faults, outside the lock.
    warm = time.monotonic() + WARMUP
    ops = 0
    while time.monotonic() < deadline:
        if warm is not None and time.monotonic() > warm:
            child_ready()
            warm = None
        for _ in range(100):
            r = rng.random()
            if mine and (r < 0.45 or len(mine) >= 12):
                bus, start = mine.pop(rng.randrange(len(mine)))
                reg.unregister(bus, start, owner)
            elif r < 0.60:
                # Walks and compacts every bus's index: a long critical section.
                reg.unregister_owner(owner)
                mine.clear()
            else:
                bus = rng.choice(BUSES)
                start = rng.randrange(64) * 0x40
                length = rng.choice((0x10, 0x40, 0x80))
                try:
                    add(reg, bus, start, length, owner)
                except RegionConflict:
                    pass
                else:
                    mine.append((int(bus), start))
            ops += 1
    return {"ops": ops}  # not reached when killed


def sleep_precise(seconds: float) -> None:
    """Let ``seconds`` pass, precisely (sleep, then spin): when the kill
    lands is what the test varies, so this is timing, not a wait."""
    end = time.perf_counter() + seconds
    if seconds > 0.002:
        time.sleep(seconds - 0.001)
    while time.perf_counter() < end:
        pass


def test_random_sigkill_of_a_busy_writer():
    name = segment_name("crashrnd")
    reg = Registry.create(name, capacity=RANDOM_CAPACITY, lock_timeout=2.0)
    rng = random.Random(1234)
    child = None
    try:
        # The parent's own regions (owner 1): some in the child's range (so
        # its registers conflict), some referenced, one removing, and many
        # above the child's range on PIO and MMIO, so that every insert or
        # remove by the child shifts a long index (a long critical section).
        for k in range(16):
            add(reg, BUSES[k % 3], 0x40 * (4 * k + 1), 0x20, 1)
        for k in range(BACKGROUND):
            add(reg, Bus.PIO if k % 3 else Bus.MMIO, 0x100000 + 0x10 * k, 8, 1)
        held = [reg.get(BUSES[k % 3], 0x40 * (4 * k + 1)) for k in (0, 4, 8, 9)]
        held.append(reg.get(Bus.PIO, 0x100000 + 0x10 * 1))
        reg.unregister(BUSES[9 % 3], 0x40 * (4 * 9 + 1), 1)  # held[3]'s region
        assert reg.check() == []
        before = snap(reg)

        recovered = 0
        for it in range(RANDOM_KILLS):
            owner = 1000 + it
            rec0 = reg.recoveries
            child = spawn(churn, name, owner, it)
            child.wait_ready(timeout=20)
            # Log-uniform between 20 us and 5 ms.
            sleep_precise(math.exp(rng.uniform(math.log(20e-6), math.log(5e-3))))
            child.kill()
            assert child.signaled == signal.SIGKILL, child.describe()
            child = None

            problems = reg.check()
            delta = reg.recoveries - rec0
            assert delta in (0, 1), delta
            recovered += delta
            assert problems == [], f"kill {it}: {problems}"
            after = snap(reg)
            for slot, rec in before.items():
                assert after.get(slot) == rec, f"kill {it}: slot {slot}: {rec} -> {after.get(slot)}"
            mine = [rec for slot, rec in after.items() if slot not in before]
            for rec in mine:
                assert rec.owner == owner, rec
                assert rec.cookie == cookie_for(owner, rec.bus, rec.start, rec.length), rec
                assert (rec.refcount, rec.removing) == (0, False), rec
                with reg.get(rec.bus, rec.start) as ref:
                    assert (ref.slot, ref.owner) == (rec.slot, owner)
            # The dead device's regions are reaped; everything else stays.
            assert reg.unregister_owner(owner) == len(mine)
            assert snap(reg) == before
            probe(reg)
        print(f"random kills: {RANDOM_KILLS}, recoveries: {recovered}")
        assert recovered >= 3, "too few kills landed inside the critical section"

        for ref in held:
            reg.put(ref)
        assert reg.unregister_owner(1) == 15 + BACKGROUND
        assert reg.regions() == []
        assert reg.check() == []
    finally:
        if child is not None:
            child.kill()
        reg.close()
        reg.unlink()
