"""Fault plans: parsing TOML and JSON, every validation error, defaults,
the seed and its override, the digest."""

from __future__ import annotations

import hashlib
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.faults import (
    POINTS, ActionSpec, Choice, Int, Number, Plan, PlanError, PointSpec, Span, load_plan, loads_plan, next_name,
    parse_fault, parse_plan,
)

DEVICES = {"blk", "rng", "con", "com1"}

GOOD = """
seed = 1234

[[fault]]
name = "third-write-fails"
device = "blk"
point = "blk.write"
nth = 3
times = 1
action = "ioerr"
sector = [0, 2047]

[[fault]]
device = "blk"
point = "access"
probability = 0.25
action = "delay"
ms = 1.5
space = "mmio"
offset = 16

[[fault]]
device = "rng"
point = "rng.request"
every = 4
times = 2
action = "short"
bytes = 3
"""


def fault(**keys: object) -> dict[str, object]:
    """A valid blk.write fault with ``keys`` changed (None: removed)."""
    base: dict[str, object] = {"device": "blk", "point": "blk.write", "nth": 1, "action": "ioerr"}
    base.update(keys)
    return {k: v for k, v in base.items() if v is not None}


def error_of(entry: object, **kw: object) -> PlanError:
    with pytest.raises(PlanError) as info:
        parse_plan({"fault": [entry]}, devices=kw.pop("devices", DEVICES), **kw)  # type: ignore[arg-type]
    return info.value


def test_good_plan_with_defaults():
    plan = loads_plan(GOOD, devices=DEVICES)
    assert plan.seed == 1234
    a, b, c = plan.faults
    assert (a.name, a.trigger, a.arg, a.times, a.action, dict(a.match)) == (
        "third-write-fails", "nth", 3, 1, "ioerr", {"sector": [0, 2047]})
    assert (b.name, b.trigger, b.arg, b.times, dict(b.params)) == ("fault-2", "probability", 0.25, None, {"ms": 1.5})
    assert dict(b.match) == {"space": "mmio", "offset": [16, 16]}
    assert (c.name, c.times, dict(c.params)) == ("fault-3", 2, {"bytes": 3})
    assert plan.for_device("rng") == (c,)
    assert plan.devices() == ["blk", "rng"]
    assert plan.fault("fault-2") is b


def test_times_defaults_one_with_nth_else_unlimited():
    assert parse_fault(fault(nth=2), default_name="f").times == 1
    for trigger in ({"every": 2}, {"after": 0}, {"probability": 0.5}):
        f = parse_fault({**fault(nth=None), **trigger}, default_name="f")
        assert f.times is None
    assert parse_fault({**fault(nth=None), "every": 2, "times": None}, default_name="f").times is None


def test_default_params_and_implied_match_are_filled_in():
    f = parse_fault({"device": "blk", "point": "blk.read", "after": 0, "action": "corrupt"}, default_name="f")
    assert dict(f.params) == {"bits": 1}
    f = parse_fault({"device": "blk", "point": "access", "nth": 1, "action": "ones"}, default_name="f")
    assert dict(f.match) == {"dir": "read"}
    f = parse_fault({"device": "blk", "point": "access", "nth": 1, "action": "drop", "dir": "write"},
                    default_name="f")
    assert dict(f.match) == {"dir": "write"}


def test_seed_default_override_and_range():
    assert loads_plan("").seed == 0
    assert loads_plan("seed = 7", seed=9).seed == 9
    assert loads_plan("seed = 7").with_seed(None).seed == 7
    assert loads_plan("seed = 7").with_seed(2**64 - 1).seed == 2**64 - 1
    for bad in ("-1", "18446744073709551616", "true", "1.5", '"7"'):
        with pytest.raises(PlanError, match="key 'seed'"):
            loads_plan(f"seed = {bad}")
    with pytest.raises(PlanError, match="key 'seed'"):
        loads_plan("seed = 1", seed=-3)


def test_toml_and_json_files_give_one_plan(tmp_path):
    toml = tmp_path / "p.toml"
    toml.write_text(GOOD)
    from_toml = load_plan(toml, devices=DEVICES)
    js = tmp_path / "p.json"
    js.write_text(json.dumps(from_toml.to_dict()))
    from_json = load_plan(js, devices=DEVICES)
    assert from_json == from_toml
    assert from_json.digest == from_toml.digest


def test_to_dict_round_trips():
    plan = loads_plan(GOOD, devices=DEVICES)
    again = parse_plan(plan.to_dict(), devices=DEVICES)
    assert again == plan
    for f in plan.faults:
        assert parse_fault(f.to_dict(), devices=DEVICES) == f


def test_digest_is_stable_and_ignores_spelling_and_seed():
    plan = loads_plan(GOOD, devices=DEVICES)
    # Pinned: a change of the canonical form (or of the defaults) must be
    # deliberate, since traces name plans by this digest.
    canonical = (
        '[{"action":"ioerr","device":"blk","name":"third-write-fails","nth":3,"point":"blk.write",'
        '"sector":[0,2047],"times":1},'
        '{"action":"delay","device":"blk","ms":1.5,"name":"fault-2","offset":[16,16],"point":"access",'
        '"probability":0.25,"space":"mmio","times":null},'
        '{"action":"short","bytes":3,"device":"rng","every":4,"name":"fault-3","point":"rng.request","times":2}]')
    assert plan.digest == hashlib.sha256(canonical.encode()).hexdigest()
    assert plan.digest == "8b3aedcd023fa841b8a89d6effcc701c88d547dd1a31f199c14a9db74322e3fb"
    assert plan.with_seed(99).digest == plan.digest
    # The same faults, spelt otherwise: keys reordered, defaults written out.
    data = plan.to_dict()
    for entry in data["fault"]:
        items = list(entry.items())
        random.Random(1).shuffle(items)
        entry.clear()
        entry.update(items)
    data["fault"][1]["offset"] = 16
    del data["fault"][0]["times"]
    assert parse_plan(data, devices=DEVICES).digest == plan.digest
    # Another fault: another digest.
    data["fault"][0]["nth"] = 4
    assert parse_plan(data, devices=DEVICES).digest != plan.digest


def test_a_plan_without_faults_is_valid():
    assert loads_plan("seed = 3") == Plan(seed=3, faults=())
    assert loads_plan("").digest == Plan().digest


def test_next_name_and_qmp_arming():
    assert next_name(()) == "fault-1"
    assert next_name({"fault-1", "fault-2", "fault-4"}) == "fault-3"
    f = parse_fault(fault(), taken={"fault-1"}, devices=DEVICES)
    assert f.name == "fault-2"
    with pytest.raises(PlanError, match="already armed"):
        parse_fault(fault(name="x"), taken={"x"})


# -- every validation error: (entry, the key named, a phrase of the message)

ERRORS = [
    (fault(sectr=[0, 1]), "sectr", "unknown key"),
    (fault(ms=3), "ms", "a parameter of action 'delay', not of 'ioerr'"),
    (fault(space="pio"), "space", "a match key of 'access', not of 'blk.write'"),
    (fault(sector=[0, 1], point="blk.flush"), "sector", "unknown key"),
    (fault(action="corrupt"), "action", "not an action of point 'blk.write'"),
    (fault(action="lose", point="blk.read"), "action", "not an action of point 'blk.read'"),
    (fault(action=3), "action", "must be an action name"),
    (fault(action=None), "action", "missing"),
    (fault(device="nvme"), "device", "no device 'nvme'"),
    (fault(device=None), "device", "missing"),
    (fault(device=5), "device", "must be a device id"),
    (fault(point="blk.trim"), "point", "not a point"),
    (fault(point=None), "point", "missing"),
    (fault(nth=None), None, "no trigger"),
    (fault(every=2), "every", "two triggers at once (nth and every)"),
    (fault(nth=None, after=1, probability=0.5), "probability", "two triggers at once"),
    (fault(nth=0), "nth", "must be in 1.."),
    (fault(nth=True), "nth", "must be an integer"),
    (fault(nth=1.0), "nth", "must be an integer"),
    (fault(nth=None, every=0), "every", "must be in 1.."),
    (fault(nth=None, after=-1), "after", "must be in 0.."),
    (fault(nth=None, probability=1.5), "probability", "must be in 0..1"),
    (fault(nth=None, probability=float("nan")), "probability", "must be in 0..1"),
    (fault(nth=None, probability="1%"), "probability", "must be a number"),
    (fault(times=2), "times", "nth fires once"),
    (fault(nth=None, every=1, times=0), "times", "must be in 1.."),
    (fault(nth=None, every=1, times=False), "times", "must be an integer"),
    (fault(action="delay"), "ms", "missing: action 'delay' needs it"),
    (fault(action="delay", ms="5"), "ms", "must be a number"),
    (fault(action="delay", ms=-1), "ms", "must be in 0.."),
    (fault(action="torn", sectors=2**32), "sectors", "must be in 0.."),
    (fault(sector=[5, 4]), "sector", "lo <= hi"),
    (fault(sector=[1, 2, 3]), "sector", "must be [lo, hi]"),
    (fault(sector=[1, True]), "sector", "must be [lo, hi]"),
    (fault(sector=-1), "sector", "lo <= hi"),
    (fault(point="access", action="garbage", dir="sideways"), "dir", "must be one of read, write"),
    (fault(point="access", action="ones", dir="write"), "dir", "applies to dir = 'read' only"),
    (fault(point="access", action="drop", dir="read"), "dir", "applies to dir = 'write' only"),
    (fault(point="access", action="irq", vector=2048), "vector", "must be in 0..2047"),
    (fault(point="access", action="value"), "value", "missing"),
    (fault(name="two words"), "name", "must be 1-64 letters"),
    (fault(name=""), "name", "must be 1-64 letters"),
    (fault(name=7), "name", "must be 1-64 letters"),
]


@pytest.mark.parametrize(("entry", "key", "phrase"), ERRORS, ids=[f"{e[1]}-{i}" for i, e in enumerate(ERRORS)])
def test_each_error_is_one_line_naming_fault_and_key(entry, key, phrase):
    e = error_of(entry)
    text = str(e)
    assert "\n" not in text
    assert phrase in text
    assert e.key == key
    assert e.fault is not None and e.fault.startswith("fault #1")
    if key is not None:
        assert f"key {key!r}" in text


def test_error_names_the_fault_by_name_and_position():
    e = error_of(fault(name="third-write-fails", action="bogus"))
    assert str(e).startswith('fault #1 "third-write-fails": key \'action\': ')
    e = error_of(fault(action="bogus"))
    assert str(e).startswith('fault #1 "fault-1": ')


def test_duplicate_names():
    with pytest.raises(PlanError, match=r'fault #2 "a": key \'name\': \'a\' is already the name of fault #1'):
        parse_plan({"fault": [fault(name="a"), fault(name="a")]})
    # An explicit name may not take a default name either.
    with pytest.raises(PlanError, match="fault #2 \"fault-1\".*already the name of fault #1"):
        parse_plan({"fault": [fault(), fault(name="fault-1")]})


def test_plan_level_errors(tmp_path):
    with pytest.raises(PlanError, match="key 'faults': unknown key"):
        parse_plan({"faults": []})
    with pytest.raises(PlanError, match="key 'fault': must be a list"):
        parse_plan({"fault": {"device": "blk"}})
    with pytest.raises(PlanError, match="a plan is a table"):
        parse_plan([])
    with pytest.raises(PlanError, match="fault #1: a fault is a table"):
        parse_plan({"fault": ["x"]})
    with pytest.raises(PlanError, match="keys are strings"):
        parse_plan({"fault": [{1: 2}]})
    with pytest.raises(PlanError, match="not valid TOML"):
        loads_plan("[[fault]\n")
    path = tmp_path / "bad.toml"
    path.write_text('[[fault]]\ndevice = "blk"\npoint = "blk.write"\nnth = 1\naction = "ioerr"\nsecter = 1\n')
    with pytest.raises(PlanError) as info:
        load_plan(path, devices=DEVICES)
    assert str(info.value).startswith(f"{path}: fault #1 \"fault-1\": key 'secter': unknown key")
    with pytest.raises(PlanError, match="cannot read"):
        load_plan(tmp_path / "missing.toml")
    js = tmp_path / "bad.json"
    js.write_text("{")
    with pytest.raises(PlanError, match="not valid JSON"):
        load_plan(js)
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(PlanError, match="not valid TOML"):
        load_plan(binary)


def test_devices_check_is_the_callers():
    # Without a device set, any id passes (a device process validating its own faults).
    assert parse_fault(fault(device="anything"), default_name="f").device == "anything"
    # With each device's points, a point it does not have is refused.
    own = {"blk": {"access": POINTS["access"], "blk.write": POINTS["blk.write"]},
           "rng": {"access": POINTS["access"], "rng.request": POINTS["rng.request"]}}
    assert parse_fault(fault(), default_name="f", devices=own).point == "blk.write"
    e = error_of(fault(device="rng"), devices=own)
    assert e.key == "point" and "not a point of device 'rng'" in str(e)
    # A device with None for its points falls back to the table.
    assert parse_fault(fault(), default_name="f", devices={"blk": None}).device == "blk"


def test_a_models_own_point_validates_like_the_table():
    own = {"wd": {"wd.kick": PointSpec(events="each kick", match={"value": Int(0, 255)},
                                       actions={"late": ActionSpec("late", {"ms": Number(0, 100)})})}}
    f = parse_fault({"device": "wd", "point": "wd.kick", "every": 2, "action": "late", "ms": 5, "value": 7},
                    default_name="f", devices=own)
    assert (f.point, dict(f.params), dict(f.match)) == ("wd.kick", {"ms": 5}, {"value": 7})
    e = error_of({"device": "wd", "point": "wd.kick", "every": 2, "action": "late", "ms": 500}, devices=own)
    assert e.key == "ms"


# -- property: any fault the table allows parses, round-trips, and keeps its digest

def _value(kind: object) -> st.SearchStrategy[object]:
    if isinstance(kind, Int):
        return st.integers(kind.lo, kind.hi)
    if isinstance(kind, Number):
        return st.one_of(st.integers(int(kind.lo), int(kind.hi)),
                         st.floats(kind.lo, kind.hi, allow_nan=False, allow_infinity=False))
    if isinstance(kind, Choice):
        return st.sampled_from(kind.values)
    assert isinstance(kind, Span)
    return st.tuples(st.integers(kind.min, kind.max), st.integers(kind.min, kind.max)).map(
        lambda p: [min(p), max(p)])


@st.composite
def any_fault(draw: st.DrawFn) -> dict[str, object]:
    point = draw(st.sampled_from(sorted(POINTS)))
    spec = POINTS[point]
    action = draw(st.sampled_from(sorted(spec.actions)))
    aspec = spec.actions[action]
    trigger = draw(st.sampled_from(["nth", "every", "after", "probability"]))
    entry: dict[str, object] = {"device": draw(st.sampled_from(sorted(DEVICES))), "point": point,
                                "action": action,
                                trigger: draw(st.floats(0, 1) if trigger == "probability"
                                              else st.integers(1 if trigger != "after" else 0, 10**6))}
    if trigger != "nth" and draw(st.booleans()):
        entry["times"] = draw(st.integers(1, 100))
    for key, kind in aspec.params.items():
        if kind.default is None or draw(st.booleans()):
            entry[key] = draw(_value(kind))
    for key, kind in spec.match.items():
        if key in aspec.when:
            if draw(st.booleans()):
                entry[key] = aspec.when[key]
        elif draw(st.booleans()):
            entry[key] = draw(_value(kind))
    return entry


@settings(max_examples=300, deadline=None)
@given(st.lists(any_fault(), max_size=6), st.integers(0, 2**64 - 1))
def test_any_valid_plan_round_trips(entries, seed):
    plan = parse_plan({"seed": seed, "fault": entries}, devices=DEVICES)
    assert [f.name for f in plan.faults] == [f"fault-{i}" for i in range(1, len(entries) + 1)]
    again = parse_plan(json.loads(json.dumps(plan.to_dict())), devices=DEVICES)
    assert again == plan and again.digest == plan.digest
