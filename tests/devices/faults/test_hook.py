"""The model side: FaultPoints (the mixin devices.base.Device takes), a
model's own points, the table's shape, the benchmark's output."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from devices.faults import (
    COMMON_POINTS, POINTS, SILENT, ActionSpec, FaultEngine, FaultError, FaultPoints, Int, Number, PlanError,
    PointSpec, Span, TableError, check_points, parse_fault, parse_plan,
)
from devices.faults import bench
from devices.faults.table import RESERVED


class Watchdog(FaultPoints):
    """A user's model with a built-in point and one of its own."""

    fault_points = {
        "irq": POINTS["irq"],
        "watchdog.kick": PointSpec(
            events="each kick the guest writes",
            match={"value": Span(0, 0xFFFF)},
            actions={"ignore": ActionSpec("the kick is not seen"),
                     "late": ActionSpec("the kick is seen ms late", {"ms": Number(0, 10_000)})}),
    }

    def __init__(self) -> None:
        self.kicks: list[int] = []

    def kick(self, value: int) -> None:
        firing = self.fault_point("watchdog.kick", value=value)
        if firing is not None and firing.action == "ignore":
            firing.done(f"kick {value:#x} ignored")
            return
        self.kicks.append(value)


def test_table_is_well_formed():
    check_points(POINTS)
    for name in COMMON_POINTS:
        assert name in POINTS
    # Every point of the table, no more.
    assert set(POINTS) == {"access", "blk.read", "blk.write", "blk.flush", "rng.request", "console.tx",
                           "console.rx", "serial.tx", "serial.rx", "irq", "queue.complete", "process"}
    assert set(POINTS["process"].actions) == {"crash", "hang", "exit", "hold_lock", "die_holding_lock"}
    assert set(POINTS["access"].actions) == {"delay", "ones", "value", "garbage", "drop", "irq"}


def test_a_model_has_access_process_and_its_own_points():
    assert list(Watchdog.all_fault_points()) == ["access", "process", "irq", "watchdog.kick"]
    assert FaultPoints.all_fault_points() == {n: POINTS[n] for n in COMMON_POINTS}


def test_fault_point_is_silent_without_an_engine():
    dog = Watchdog()
    assert dog.fault_engine is SILENT
    dog.kick(1)
    assert dog.kicks == [1]
    with pytest.raises(FaultError, match="no fault engine attached"):
        SILENT.arm(parse_fault({"device": "(none)", "point": "access", "nth": 1, "action": "drop"}))
    assert SILENT.armed == {}


def test_a_plan_arms_a_models_own_point():
    devices = {"wd": Watchdog.all_fault_points()}
    plan = parse_plan({"fault": [{"device": "wd", "point": "watchdog.kick", "every": 2, "action": "ignore",
                                  "value": [0, 0xFF]}]}, devices=devices)
    with pytest.raises(PlanError, match="not a point of device 'wd'"):
        parse_plan({"fault": [{"device": "wd", "point": "blk.write", "nth": 1, "action": "ioerr"}]},
                   devices=devices)
    dog = Watchdog()
    records: list[dict[str, object]] = []
    dog.attach_faults(FaultEngine("wd", plan.for_device("wd"), points=Watchdog.all_fault_points(),
                                  sink=records.append))
    for v in (1, 2, 0x1000, 3, 4):
        dog.kick(v)
    # 0x1000 is outside the match: the 2nd and 4th matching kicks (2 and 4) are ignored.
    assert dog.kicks == [1, 0x1000, 3]
    assert [r["detail"] for r in records] == ["kick 0x2 ignored", "kick 0x4 ignored"]


@pytest.mark.parametrize("bad", [
    {"my.p": PointSpec("e", {"name": Int(0, 1)}, {"a": ActionSpec("a")})},
    {"my.p": PointSpec("e", {"k": Int(0, 1)}, {"a": ActionSpec("a", {"k": Int(0, 1)})})},
    {"my.p": PointSpec("e", {}, {"a": ActionSpec("a", {"times": Int(0, 1)})})},
    {"my.p": PointSpec("e", {}, {})},
    {"my.p": PointSpec("e", {}, {"a": ActionSpec("a", {"x": Int(0, 1, default=5)})})},
    {"my.p": PointSpec("e", {}, {"a": ActionSpec("a", when={"dir": "read"})})},
    {"my.p": "not a spec"},
    {"access": PointSpec("mine", {}, {"a": ActionSpec("a")})},
])
def test_a_bad_declaration_fails_when_the_class_is_defined(bad):
    with pytest.raises(TableError):
        type("Bad", (FaultPoints,), {"fault_points": bad})


def test_reserved_keys_are_the_plans():
    assert set(RESERVED) == {"name", "device", "point", "action", "times", "nth", "every", "after", "probability"}


def test_bench_prints_json(capsys):
    assert bench.main(["--loops", "2000"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["unit"] == "ns/event"
    results = out["results"]
    assert set(results) >= {"silent_dict_test", "silent_fault_point", "armed_never_matching", "firing_1_percent"}
    assert all(v > 0 for v in results.values())


def test_the_package_imports_nothing_of_vmm_ipc_devserver():
    code = ("import sys, devices.faults, devices.faults.bench, devices.faults.__main__; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('vmm', 'ipc', 'devserver')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=pathlib.Path(__file__).resolve().parents[3])
    assert out.stdout.strip() == "[]"
