"""The fault engine: each trigger kind, times, matching, shadowing, arming
while running, thread safety, determinism by seed, and replay."""

from __future__ import annotations

import io
import sys
import threading
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from devices.faults import (
    POINTS, Choice, FaultEngine, Int, Span, FaultError, ReplayEngine, TraceWriter, parse_fault, parse_plan, read_trace, trace_digest,
    uniform64,
)
from devices.faults.engine import mix64
from tests.devices.faults.test_plan import any_fault


def make(*entries: dict[str, object], seed: int = 0, sink=None, device: str = "blk") -> FaultEngine:
    plan = parse_plan({"seed": seed, "fault": [{"device": device, **e} for e in entries]})
    return FaultEngine(device, plan.for_device(device), seed=plan.seed, sink=sink)


def fired(engine: FaultEngine, point: str, n: int, **match: object) -> list[int]:
    """Hit ``point`` n times; the event numbers that fired (each reported)."""
    out = []
    for _ in range(n):
        f = engine.point(point, **match)
        if f is not None:
            out.append(f.event)
            f.done(f"did {f.action}")
    return out


W = {"point": "blk.write", "action": "ioerr"}


def test_nth_fires_once_on_the_nth():
    assert fired(make({**W, "nth": 3}), "blk.write", 20, sector=0) == [3]
    assert fired(make({**W, "nth": 1}), "blk.write", 5, sector=0) == [1]
    assert fired(make({**W, "nth": 30}), "blk.write", 20, sector=0) == []


def test_every_and_after_with_and_without_times():
    assert fired(make({**W, "every": 4}), "blk.write", 20, sector=0) == [4, 8, 12, 16, 20]
    assert fired(make({**W, "every": 4, "times": 2}), "blk.write", 20, sector=0) == [4, 8]
    assert fired(make({**W, "after": 17}), "blk.write", 20, sector=0) == [18, 19, 20]
    assert fired(make({**W, "after": 0}), "blk.write", 3, sector=0) == [1, 2, 3]
    assert fired(make({**W, "after": 5, "times": 1}), "blk.write", 20, sector=0) == [6]


def test_probability_edges_rate_and_times():
    assert fired(make({**W, "probability": 0}), "blk.write", 2000, sector=0) == []
    assert fired(make({**W, "probability": 1}), "blk.write", 50, sector=0) == list(range(1, 51))
    hits = fired(make({**W, "probability": 0.1}, seed=5), "blk.write", 20000, sector=0)
    # Binomial(20000, 0.1): mean 2000, sd 42; the seed fixes the draw, the
    # bound says the generator is not biased.
    assert 1800 < len(hits) < 2200
    assert len(fired(make({**W, "probability": 0.5, "times": 7}), "blk.write", 1000, sector=0)) == 7


def test_generator_is_splitmix64_keyed_by_a_digest_of_the_name():
    # SplitMix64 from state 0: its published first outputs.
    assert mix64(0x9E3779B97F4A7C15) == 0xE220A8397B1DCDAF
    assert mix64((2 * 0x9E3779B97F4A7C15) % 2**64) == 0x6E789E6AA1B965F4
    # A function of (seed, name, count) only.
    assert uniform64(1, "a", 5) == uniform64(1, "a", 5)
    assert len({uniform64(1, "a", 5), uniform64(2, "a", 5), uniform64(1, "b", 5), uniform64(1, "a", 6)}) == 4


def test_match_keys_filter_and_the_trigger_counts_matching_events():
    engine = make({**W, "nth": 2, "sector": [10, 20]})
    events = []
    for i, sector in enumerate([0, 15, 30, 5, 20, 12], 1):
        f = engine.point("blk.write", sector=sector)
        if f is not None:
            events.append((i, f.event, f.count))
    # The 2nd write inside 10..20 is the 5th write: event 5 of the point, count 2 of the fault.
    assert events == [(5, 5, 2)]
    assert engine.events("blk.write") == 6
    status, = engine.query()
    assert (status.events, status.firings) == (3, 1)


def test_choice_codes_and_implied_match():
    engine = make({"point": "access", "after": 0, "action": "ones", "space": "pio"})
    assert engine.point("access", space=0, offset=0, dir="read") is not None      # Space.PIO == 0
    assert engine.point("access", space="pio", offset=4, dir="read") is not None
    assert engine.point("access", space=1, offset=0, dir="read") is None
    assert engine.point("access", space=0, offset=0, dir="write") is None         # ones: reads only
    assert engine.query()[0].events == 2


def test_a_hit_without_a_match_key_is_the_models_bug():
    engine = make({**W, "nth": 1, "sector": [0, 1]})
    with pytest.raises(FaultError, match="without its match key 'sector'"):
        engine.point("blk.write")


def test_two_faults_on_one_event_first_wins_second_is_shadowed():
    engine = make({**W, "every": 2, "name": "a"}, {"point": "blk.write", "every": 3, "action": "lose", "name": "b",
                                                   "times": 2})
    got = []
    for _ in range(12):
        f = engine.point("blk.write", sector=0)
        if f is not None:
            got.append((f.event, f.fault))
            f.done()
    # b's 6th event is shadowed by a and does not use up b's times.
    assert got == [(2, "a"), (3, "b"), (4, "a"), (6, "a"), (8, "a"), (9, "b"), (10, "a"), (12, "a")]
    a, b = engine.query()
    assert (a.firings, a.shadowed) == (6, 0)
    assert (b.firings, b.shadowed, b.events) == (2, 1, 12)


def test_faults_do_not_influence_each_other_across_points():
    alone = fired(make({**W, "probability": 0.3, "name": "p"}, seed=9), "blk.write", 500, sector=0)
    engine = make({**W, "probability": 0.3, "name": "p"}, {"point": "blk.read", "after": 0, "action": "ioerr"},
                  seed=9)
    together = []
    for _ in range(500):
        engine.point("blk.read", sector=0)
        f = engine.point("blk.write", sector=0)
        if f is not None:
            together.append(f.event)
    assert together == alone


def test_nothing_armed_is_one_dict_test():
    engine = make({**W, "nth": 1})
    assert "blk.read" not in engine.armed
    assert engine.point("blk.read", sector=0) is None
    assert engine.events("blk.read") == 0          # not even counted
    assert FaultEngine("x").armed == {}


def test_arm_and_disarm_while_running():
    out = io.StringIO()
    sink = TraceWriter(out, plan="0" * 64, seed=0, devices=["blk"])
    engine = make({**W, "every": 2, "name": "w"}, sink=sink)
    assert fired(engine, "blk.write", 4, sector=0) == [2, 4]
    engine.arm(parse_fault({"device": "blk", "point": "blk.write", "nth": 1, "action": "lose", "name": "x"}))
    assert [s.fault.name for s in engine.query()] == ["w", "x"]
    f = engine.point("blk.write", sector=0)             # event 5: x's 1st
    assert (f.event, f.fault, f.action) == (5, "x", "lose")
    f.done("lost")
    status = engine.disarm("w")
    assert (status.fault.name, status.events, status.firings) == ("w", 5, 2)
    assert fired(engine, "blk.write", 3, sector=0) == []
    # Disarmed points keep counting, so later numbers are still the run's.
    assert engine.events("blk.write") == 8
    engine.arm(parse_fault({"device": "blk", "point": "blk.write", "nth": 1, "action": "ioerr", "name": "y"}))
    assert fired(engine, "blk.write", 1, sector=0) == [9]
    trace = read_trace(out.getvalue().splitlines())
    assert [(m["type"], m["fault"], m["event"]) for m in trace.marks] == [
        ("arm", "x", 4), ("disarm", "w", 5), ("arm", "y", 8)]
    assert [(f["fault"], f["event"]) for f in trace.firings] == [("w", 2), ("w", 4), ("x", 5), ("y", 9)]


def test_arm_refusals():
    engine = make({**W, "nth": 1, "name": "a"})
    with pytest.raises(FaultError, match="already armed"):
        engine.arm(parse_fault({**W, "device": "blk", "nth": 1, "name": "a"}))
    with pytest.raises(FaultError, match="for device 'rng', not 'blk'"):
        engine.arm(parse_fault({**W, "device": "rng", "nth": 1}))
    with pytest.raises(FaultError, match="no fault 'zz'"):
        engine.disarm("zz")
    bare = FaultEngine("blk", points={})
    with pytest.raises(FaultError, match="has no point 'blk.write'"):
        bare.arm(parse_fault({**W, "device": "blk", "nth": 1}))


def test_done_once_and_flush_reports_the_forgotten():
    records: list[dict[str, object]] = []
    engine = make({**W, "after": 0}, sink=records.append)
    a = engine.point("blk.write", sector=0)
    b = engine.point("blk.write", sector=0)
    a.done("first")
    a.done("again")
    assert [r["detail"] for r in records] == ["first"]
    engine.flush()
    assert [(r["seq"], r["detail"]) for r in records] == [(1, "first"), (2, "(not reported)")]
    assert b.detail == "(not reported)"


PROB_PLAN = [
    {"point": "blk.write", "probability": 0.2, "action": "ioerr"},
    {"point": "blk.read", "probability": 0.05, "action": "corrupt", "bits": 3},
    {"point": "access", "probability": 0.1, "action": "delay", "ms": 1},
]
DEVS = ("blk", "rng", "con")


def run_threads(seed: int, threads: int = 4, total: int = 1200) -> str:
    """Three devices, each with the probability plan, hit ``total`` times
    at each point by ``threads`` threads at once; the trace digest."""
    events = total // threads
    plan = parse_plan({"seed": seed, "fault": [{"device": d, **e} for d in DEVS for e in PROB_PLAN]})
    out = io.StringIO()
    sink = TraceWriter(out, plan=plan.digest, seed=plan.seed, devices=DEVS)
    engines = [FaultEngine(d, plan.for_device(d), seed=plan.seed, sink=sink) for d in DEVS]
    start = threading.Barrier(threads)

    def work(k: int) -> None:
        start.wait()
        for i in range(events):
            for engine in engines:
                for point in ("blk.write", "blk.read", "access"):
                    f = engine.point(point, sector=i, space="mmio", offset=k, dir="read")
                    if f is not None:
                        f.done(f"{f.action} {dict(f.params)}")

    workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for engine in engines:
        assert engine.events("blk.write") == total
    trace = read_trace(out.getvalue().splitlines())
    assert len(trace.firings) > 50
    return trace_digest(trace)


def test_same_seed_same_trace_across_runs_and_interleavings():
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)         # switch threads as often as CPython will
    try:
        digests = {run_threads(1234, threads=1 + i % 4) for i in range(20)}
    finally:
        sys.setswitchinterval(interval)
    assert len(digests) == 1
    assert run_threads(1235) not in digests
    assert run_threads(0) not in digests


def test_unmatched_events_counted_without_the_lock_lose_no_number():
    # Events no fault's match keys take are counted lock-free, the others
    # under the lock: from several threads at once, every event still gets
    # its own number and every matching one is decided exactly once.
    engine = make({**W, "after": 0, "sector": [0, 9], "name": "low"})
    threads, per_thread = 4, 3000
    fired_events: list[list[int]] = [[] for _ in range(threads)]
    start = threading.Barrier(threads)

    def work(k: int) -> None:
        start.wait()
        for i in range(per_thread):
            f = engine.point("blk.write", sector=i % 40)
            if f is not None:
                fired_events[k].append(f.event)
                f.done()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        sys.setswitchinterval(interval)
    total = threads * per_thread
    assert engine.events("blk.write") == total
    events = [e for per in fired_events for e in per]
    assert len(events) == len(set(events)) == total // 4         # sectors 0-9 of each 40
    assert all(1 <= e <= total for e in events)
    status, = engine.query()
    assert (status.events, status.firings) == (total // 4, total // 4)


def test_arm_disarm_recompile_the_point():
    engine = make({**W, "nth": 1, "sector": [5, 5], "name": "five"})
    assert engine.point("blk.write", sector=4) is None       # counted, not taken
    assert engine.events("blk.write") == 1
    engine.arm(parse_fault({"device": "blk", "point": "blk.write", "nth": 1, "action": "lose", "name": "any"}))
    f = engine.point("blk.write", sector=4)                 # now a fault takes every event
    assert (f.fault, f.event) == ("any", 2)
    engine.disarm("any")
    engine.disarm("five")
    assert engine.point("blk.write", sector=5) is None      # nothing armed: counting only
    assert engine.events("blk.write") == 3


def test_replay_reproduces_a_trace_exactly():
    plan = parse_plan({"seed": 77, "fault": [
        {"device": "blk", "point": "blk.write", "probability": 0.3, "action": "torn", "sectors": 1,
         "sector": [0, 99]},
        {"device": "blk", "point": "blk.read", "every": 5, "action": "ioerr"},
        {"device": "blk", "point": "irq", "nth": 4, "action": "lose"},
    ]})
    first = io.StringIO()
    engine = FaultEngine("blk", plan.for_device("blk"), seed=plan.seed,
                         sink=TraceWriter(first, plan=plan.digest, seed=plan.seed, devices=["blk"]))

    def drive(engine: FaultEngine, sectors: list[int]) -> None:
        for i, sector in enumerate(sectors):
            for point in ("blk.write", "blk.read"):
                f = engine.point(point, sector=sector)
                if f is not None:
                    f.done(f"{f.fault}:{f.action}:{f.random().randbytes(4).hex()}")
            f = engine.point("irq", vector=i % 3)
            if f is not None:
                f.done(f"{f.fault}:{f.action}")

    drive(engine, [i * 7 % 150 for i in range(400)])
    original = read_trace(first.getvalue().splitlines())
    assert len(original.firings) > 20

    second = io.StringIO()
    replay = ReplayEngine("blk", original.for_device("blk"), seed=original.seed,
                          sink=TraceWriter(second, plan=original.plan, seed=original.seed, devices=["blk"]))
    assert set(replay.armed) == {"blk.write", "blk.read", "irq"}
    # Other sectors this time: replay goes by event number, not by match.
    drive(replay, [(i * 13 + 5) % 1000 for i in range(400)])
    replayed = read_trace(second.getvalue().splitlines())
    assert trace_digest(replayed) == trace_digest(original)
    strip = [{k: v for k, v in f.items() if k != "t"} for f in original.firings]
    assert [{k: v for k, v in f.items() if k != "t"} for f in replayed.firings] == strip
    assert {s.fault.name: s.firings for s in replay.query()} == {
        name: sum(f["fault"] == name for f in original.firings) for name in ("fault-1", "fault-2", "fault-3")}
    with pytest.raises(FaultError, match="replays a trace"):
        replay.arm(plan.faults[0])
    with pytest.raises(FaultError, match="replays a trace"):
        replay.disarm("fault-1")


def test_replay_refuses_a_bad_script():
    f = {"device": "blk", "point": "blk.write", "event": 3, "fault": "a", "action": "ioerr", "params": {}}
    with pytest.raises(FaultError, match="two firings"):
        ReplayEngine("blk", [f, dict(f)])
    with pytest.raises(FaultError, match="given a firing of 'rng'"):
        ReplayEngine("blk", [{**f, "device": "rng"}])


def test_made_up_bytes_are_a_function_of_the_firing():
    def garbage(seed: int) -> list[bytes]:
        engine = make({"point": "access", "every": 3, "action": "garbage"}, seed=seed)
        out = []
        for _ in range(30):
            f = engine.point("access", space="pio", offset=0, dir="read")
            if f is not None:
                out.append(f.random().randbytes(8))
        return out
    first = garbage(3)
    assert len(first) == 10 and len(set(first)) == 10
    assert garbage(3) == first
    assert garbage(4) != first


# -- property: any plan over any event sequence decides the same twice, and replays

def _event_value(kind: object) -> st.SearchStrategy[object]:
    if isinstance(kind, Span):
        return st.integers(kind.min, min(kind.max, 64))     # small, so plans' spans get hit
    if isinstance(kind, Choice):
        return st.sampled_from(kind.values)
    assert isinstance(kind, Int)
    return st.integers(kind.lo, min(kind.hi, 8))


def _events(points: list[str]) -> st.SearchStrategy[tuple[str, dict[str, object]]]:
    return st.sampled_from(points).flatmap(
        lambda p: st.fixed_dictionaries({k: _event_value(kind) for k, kind in POINTS[p].match.items()}).map(
            lambda m: (p, m)))


def _small(entry: dict[str, Any]) -> dict[str, Any]:
    """``entry`` with small counts and match values, so most plans fire."""
    out = dict(entry, device="blk")
    for key, low in (("nth", 1), ("every", 1), ("after", 0)):
        if key in out:
            out[key] = low + out[key] % 6
    for key, kind in POINTS[out["point"]].match.items():
        if key in out and isinstance(kind, Span):
            lo = out[key][0] % 48
            out[key] = [lo, lo + 16]
        elif key in out and isinstance(kind, Int):
            out[key] = out[key] % 8
    return out


def _run(engine: FaultEngine, events: list[tuple[str, dict[str, object]]]) -> list[dict[str, object]]:
    records: list[dict[str, object]] = []
    engine.sink = records.append
    for point, match in events:
        f = engine.point(point, **match)
        if f is not None:
            f.done(f.random().randbytes(2).hex())
    return [{k: v for k, v in r.items() if k != "t"} for r in records]


@settings(max_examples=150, deadline=None)
@given(st.lists(any_fault(), min_size=1, max_size=5), st.integers(0, 2**64 - 1), st.data())
def test_any_plan_decides_the_same_twice_and_replays(entries, seed, data):
    plan = parse_plan({"seed": seed, "fault": [_small(e) for e in entries]})
    points = sorted({f.point for f in plan.faults} | {"access"})
    events = data.draw(st.lists(_events(points), min_size=20, max_size=200))
    first = _run(FaultEngine("blk", plan.faults, seed=seed), events)
    assert _run(FaultEngine("blk", plan.faults, seed=seed), events) == first
    for f in plan.faults:
        if f.times is not None:
            assert sum(r["fault"] == f.name for r in first) <= f.times
    replayed = _run(ReplayEngine("blk", first, seed=seed), events)
    assert replayed == first
    event("fired" if first else "nothing fired")
