"""Events counted elsewhere (devices.faults.engine: quiet, skip,
counted_elsewhere): a caller that passes over what ``quiet`` allows and
hands the events over with ``skip`` leaves the engine exactly as one
decision per event does -- numbering, each fault's counts, which events
fire -- and the engine refuses a skip past a trigger."""

from __future__ import annotations

import random
import threading

import pytest

from devices.faults import FaultEngine, FaultError, parse_plan
from devices.faults.engine import Quiet, ReplayEngine
from devices.virtio.blk import VirtioBlk

POINTS = VirtioBlk.all_fault_points()


def engine(faults: list[dict], seed: int = 3) -> tuple[FaultEngine, list[dict]]:
    records: list[dict] = []
    plan = parse_plan({"fault": [{"device": "blk", **f} for f in faults]}, devices={"blk": POINTS})
    return FaultEngine("blk", plan.for_device("blk"), seed=seed, points=POINTS, sink=records.append), records


def one_by_one(eng: FaultEngine, events: list[tuple[str, int]]) -> list[tuple[str, str, int]]:
    fired = []
    for point, sector in events:
        if point in eng.armed:
            firing = eng.armed[point]({"sector": sector})
            if firing is not None:
                fired.append((firing.fault, point, firing.event))
                firing.done("x")
    return fired


def passing_over(eng: FaultEngine, events: list[tuple[str, int]]) -> tuple[list[tuple[str, str, int]], int]:
    """What virtio-blk's C loop does, in Python: pass over what quiet()
    allows, count it, hand it over before the engine decides an event of
    that point (and at the end); ask quiet() again after a firing."""
    fired, passed, skipped = [], {}, 0
    quiet: dict[str, Quiet] = {}
    left: dict[str, float] = {}
    for point, sector in events:
        if point not in eng.armed:
            continue
        if point not in quiet:
            quiet[point] = eng.quiet(point)
            left[point] = float("inf") if quiet[point].events is None else quiet[point].events
        q = quiet[point]
        if left[point] > 0 and not any(lo <= sector <= hi for lo, hi in q.spans):
            left[point] -= 1
            passed[point] = passed.get(point, 0) + 1
            continue
        n = passed.pop(point, 0)
        eng.skip(point, n)
        skipped += n
        firing = eng.armed[point]({"sector": sector})
        if firing is not None:
            fired.append((firing.fault, point, firing.event))
            firing.done("x")
            quiet.pop(point)
        elif left[point] > 0:
            left[point] -= 1
    for point, n in passed.items():
        eng.skip(point, n)
        skipped += n
    return fired, skipped


def state(eng: FaultEngine) -> tuple:
    return ([(s.fault.name, s.events, s.firings, s.shadowed) for s in eng.query()],
            {p: eng.events(p) for p in ("blk.read", "blk.write")})


PLANS = {
    # nth far beyond a run of passed-over events (> 256: a new counter), and a
    # near one; a span with its trigger
    "nth_beyond_runs": [{"name": "n5", "point": "blk.read", "nth": 5, "action": "ioerr"},
                        {"name": "n300", "point": "blk.read", "nth": 300, "action": "ioerr"},
                        {"name": "span", "point": "blk.write", "every": 2, "action": "ioerr", "sector": [10, 20]}],
    "every_after_times": [{"name": "e7", "point": "blk.read", "every": 7, "times": 3, "action": "ioerr"},
                          {"name": "a40", "point": "blk.write", "after": 40, "times": 5, "action": "unsupp"},
                          {"name": "edge", "point": "blk.read", "every": 1, "times": 4, "action": "ioerr",
                           "sector": [0, 0]}],
    "shadowing": [{"name": "first", "point": "blk.read", "every": 3, "action": "ioerr"},
                  {"name": "second", "point": "blk.read", "every": 6, "action": "unsupp"},
                  {"name": "spanned", "point": "blk.read", "probability": 0.5, "action": "ioerr",
                   "sector": [30, 31]}],
    "probability_everywhere": [{"name": "p", "point": "blk.write", "probability": 0.05, "action": "ioerr"},
                               {"name": "n9", "point": "blk.read", "nth": 9, "action": "ioerr"}],
    "spans_only": [{"name": "lo", "point": "blk.read", "after": 0, "action": "ioerr", "sector": [10, 20]},
                   {"name": "hi", "point": "blk.read", "nth": 2, "action": "ioerr", "sector": [63, 63]}],
}


def events_for(seed: int, n: int = 900) -> list[tuple[str, int]]:
    rnd = random.Random(seed)
    edges = [0, 9, 10, 11, 19, 20, 21, 30, 31, 32, 62, 63]
    return [(rnd.choice(("blk.read", "blk.write")), rnd.choice(edges) if rnd.random() < 0.3 else rnd.randrange(64))
            for _ in range(n)]


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("seed", [1, 2])
def test_passing_over_and_skipping_equals_one_decision_per_event(plan, seed):
    events = events_for(seed)
    a, rec_a = engine(PLANS[plan])
    b, rec_b = engine(PLANS[plan])
    fired_a = one_by_one(a, events)
    fired_b, skipped = passing_over(b, events)
    assert fired_b == fired_a
    assert state(b) == state(a)
    assert [(r["fault"], r["event"]) for r in rec_b] == [(r["fault"], r["event"]) for r in rec_a]
    if plan != "probability_everywhere":
        assert skipped > len(events) // 4         # the pre-selection did pass over events
    if plan == "nth_beyond_runs":
        assert ("n300", "blk.read", 300) not in fired_a or ("n300", "blk.read", 300) in fired_b
        assert any(f[0] == "n300" for f in fired_a)


def test_quiet_by_trigger():
    eng, _ = engine([{"name": "n", "point": "blk.read", "nth": 4, "action": "ioerr"},
                     {"name": "e", "point": "blk.write", "every": 3, "action": "ioerr"},
                     {"name": "a", "point": "blk.flush", "after": 2, "action": "ioerr"}])
    assert eng.quiet("blk.read") == Quiet(None, (), 3)          # the 1st..3rd cannot fire
    assert eng.quiet("blk.write") == Quiet(None, (), 2)
    assert eng.quiet("blk.flush") == Quiet(None, (), 2)
    eng.skip("blk.read", 3)
    assert eng.quiet("blk.read").events == 0                     # the 4th is due
    with pytest.raises(FaultError, match="passed over"):
        eng.skip("blk.read", 1)
    assert eng.armed["blk.read"]({"sector": 0}).event == 4
    assert eng.quiet("blk.read").events is None                  # spent (times = 1)
    eng.skip("blk.write", 2)
    assert eng.armed["blk.write"]({"sector": 0}) is not None    # the 3rd
    assert eng.quiet("blk.write").events == 2
    eng.skip("blk.flush", 2)
    assert eng.quiet("blk.flush").events == 0                    # every one after the 2nd
    assert eng.events("blk.read") == 4 and eng.events("blk.write") == 3 and eng.events("blk.flush") == 2


def test_quiet_spans_probability_and_uncounted_points():
    eng, _ = engine([{"name": "s1", "point": "blk.read", "every": 1, "action": "ioerr", "sector": [5, 9]},
                     {"name": "s2", "point": "blk.read", "nth": 1, "action": "ioerr", "sector": 100},
                     {"name": "p0", "point": "blk.write", "probability": 0, "action": "ioerr"},
                     {"name": "p", "point": "blk.flush", "probability": 0.5, "action": "ioerr"}])
    assert eng.quiet("blk.read") == Quiet("sector", ((5, 9), (100, 100)), None)
    assert eng.quiet("blk.write") == Quiet(None, (), None)       # probability 0 never fires
    assert eng.quiet("blk.flush") == Quiet(None, (), 0)          # any event may fire
    eng.skip("blk.read", 1000)                                   # outside the spans: no fault counts them
    assert [(s.fault.name, s.events) for s in eng.query()][:2] == [("s1", 0), ("s2", 0)]
    assert eng.events("blk.read") == 1000
    eng.skip("blk.write", 10)
    assert dict((s.fault.name, s.events) for s in eng.query())["p0"] == 10
    eng.skip("rng.request", 5)                                   # not counted yet: not numbered
    assert eng.events("rng.request") == 0


def test_skip_keeps_numbering_with_the_compiled_hit():
    """Both ways of moving the counter on (in place, and a new counter past
    the in-place limit) are seen by the point's Hit."""
    eng, _ = engine([{"name": "n", "point": "blk.read", "nth": 2000, "action": "ioerr"}])
    eng.skip("blk.read", 10)
    assert eng.armed["blk.read"]({"sector": 0}) is None
    eng.skip("blk.read", 1000)
    assert eng.events("blk.read") == 1011
    eng.skip("blk.read", 988)
    firing = eng.armed["blk.read"]({"sector": 0})
    assert firing is not None and firing.event == 2000 and firing.count == 2000


def test_replay_engine_passes_over_up_to_the_next_recorded_event():
    rep = ReplayEngine("blk", [{"device": "blk", "fault": "f", "point": "blk.read", "event": 5,
                                "action": "ioerr", "params": {}}])
    assert rep.quiet("blk.read") == Quiet(None, (), 4)
    rep.skip("blk.read", 4)
    with pytest.raises(FaultError):
        rep.skip("blk.read", 1)
    firing = rep.armed["blk.read"]({"sector": 0})
    assert firing is not None and firing.event == 5
    assert rep.quiet("blk.read").events is None
    rep.skip("blk.read", 500)
    assert rep.events("blk.read") == 505


def test_readers_hand_over_under_the_callers_lock():
    """With counted_elsewhere, query, events, arm and disarm hold the
    caller's lock and take its pending events first: what they report is
    complete, and an arm counts only the events after it."""
    eng, records = engine([{"name": "n", "point": "blk.read", "nth": 50, "action": "ioerr"}])
    lock = threading.RLock()
    pending = {"blk.read": 0}
    held = []

    def hand_over() -> None:
        held.append(lock._is_owned())           # type: ignore[attr-defined]
        n, pending["blk.read"] = pending["blk.read"], 0
        eng.skip("blk.read", n)

    eng.counted_elsewhere(lock, hand_over)
    pending["blk.read"] = 7
    assert eng.events("blk.read") == 7
    pending["blk.read"] = 3
    assert [(s.fault.name, s.events) for s in eng.query()] == [("n", 10)]
    pending["blk.read"] = 5
    from devices.faults import parse_fault
    eng.arm(parse_fault({"device": "blk", "name": "late", "point": "blk.read", "nth": 100, "action": "ioerr"},
                        devices={"blk": POINTS}))
    assert records[-1]["type"] == "arm" and records[-1]["event"] == 15
    assert [(s.fault.name, s.events) for s in eng.query()] == [("n", 15), ("late", 0)]
    pending["blk.read"] = 2
    assert eng.disarm("n").events == 17
    assert held and all(held)
