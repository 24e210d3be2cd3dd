"""The example plans of examples/faults/: valid for the demo's devices,
and firing where their comments say, on the demo's own requests."""

from __future__ import annotations

import json
import pathlib

import pytest

from devices.faults import FaultEngine, load_plan, read_trace
from devices.faults.__main__ import main

EXAMPLES = pathlib.Path(__file__).resolve().parents[3] / "examples" / "faults"
#: The demo's device ids (vmm/cli.py DEMO_DEVICES).
DEMO = {"rng", "blk", "console"}
#: The demo's virtio-blk requests in order: one write and one read of
#: sectors 16384-16447 (the middle of its 16 MiB disk), then a flush.
DEMO_BLK = [("blk.write", 16384), ("blk.read", 16384), ("blk.flush", None)]


def demo_firings(name: str) -> list[tuple[str, str]]:
    plan = load_plan(EXAMPLES / name, devices=DEMO)
    engine = FaultEngine("blk", plan.for_device("blk"), seed=plan.seed)
    out = []
    for point, sector in DEMO_BLK:
        f = engine.point(point, **({} if sector is None else {"sector": sector}))
        if f is not None:
            out.append((point, f.action))
    return out


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_every_example_is_valid_for_the_demo(path):
    assert load_plan(path, devices=DEMO).faults


def test_blk_errors_fails_the_demos_write():
    assert demo_firings("demo-blk-errors.toml") == [("blk.write", "ioerr")]


def test_blk_corrupt_flips_the_demos_read():
    assert demo_firings("demo-blk-corrupt.toml") == [("blk.read", "corrupt")]


def test_cli_check_summary_merge(tmp_path, capsys):
    assert main(["check", str(EXAMPLES / "demo-seeded.toml"), "--seed", "8"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["seed"] == 8 and len(out["digest"]) == 64
    assert main(["check", str(EXAMPLES / "demo-seeded.toml"), "--device", "blk"]) == 2
    assert "no device 'rng' (devices: blk)" in capsys.readouterr().err
    trace = tmp_path / "t.jsonl"
    trace.write_text(json.dumps({"type": "header", "format": "splitvmm-fault-trace", "version": 1,
                                 "plan": "c" * 64, "seed": 0, "devices": ["blk"]}) + "\n"
                     + json.dumps({"type": "fire", "seq": 1, "t": 5, "device": "blk", "fault": "f",
                                   "point": "blk.write", "event": 1, "action": "ioerr", "params": {},
                                   "detail": ""}) + "\n")
    assert main(["summary", str(trace)]) == 0
    assert json.loads(capsys.readouterr().out)["firings"] == {"blk/f": 1}
    merged = tmp_path / "m.jsonl"
    assert main(["merge", str(merged), str(trace)]) == 0
    capsys.readouterr()
    assert len(read_trace(merged).firings) == 1
    assert main(["summary", str(tmp_path / "missing")]) == 2
