"""Fault traces: writing, reading (a trace is input), merging the traces
of several device processes, and the digest."""

from __future__ import annotations

import io
import json
import os

import pytest

from devices.faults import (
    FaultEngine, Trace, TraceError, TraceWriter, merge_traces, parse_plan, read_trace, trace_digest,
)

PLAN = parse_plan({"seed": 5, "fault": [
    {"device": "blk", "point": "blk.write", "every": 2, "action": "ioerr"},
    {"device": "rng", "point": "rng.request", "every": 3, "action": "short", "bytes": 1},
]})
HDR = json.dumps({"type": "header", "format": "splitvmm-fault-trace", "version": 1, "plan": "a" * 64, "seed": 1,
                  "devices": ["blk"]})
FIRE = {"type": "fire", "seq": 1, "t": 10, "device": "blk", "fault": "f", "point": "blk.write", "event": 3,
        "action": "ioerr", "params": {}, "detail": "x"}


def one_device(device: str, point: str, n: int, out: io.StringIO | None = None, **match: object) -> Trace:
    out = out or io.StringIO()
    with TraceWriter(out, plan=PLAN.digest, seed=PLAN.seed, devices=[device]) as writer:
        engine = FaultEngine(device, PLAN.for_device(device), seed=PLAN.seed, sink=writer)
        for _ in range(n):
            f = engine.point(point, **match)
            if f is not None:
                f.done(f"{f.action} at {f.event}")
    return read_trace(out.getvalue().splitlines(), name=device)


def test_write_and_read_back(tmp_path):
    path = tmp_path / "t.jsonl"
    writer = TraceWriter(path, plan=PLAN.digest, seed=PLAN.seed, devices=["blk"])
    engine = FaultEngine("blk", PLAN.for_device("blk"), seed=PLAN.seed, sink=writer)
    for _ in range(6):
        f = engine.point("blk.write", sector=1)
        if f:
            f.done("status IOERR")
    writer.close()
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"type": "header", "format": "splitvmm-fault-trace", "version": 1,
                                    "plan": PLAN.digest, "seed": 5, "devices": ["blk"]}
    trace = read_trace(path)
    assert (trace.plan, trace.seed, trace.devices) == (PLAN.digest, 5, ["blk"])
    assert [(f["seq"], f["event"], f["fault"], f["detail"]) for f in trace.firings] == [
        (1, 2, "fault-1", "status IOERR"), (2, 4, "fault-1", "status IOERR"), (3, 6, "fault-1", "status IOERR")]
    assert trace.summary() == {"blk/fault-1": 3}


def test_writer_on_a_file_descriptor(tmp_path):
    path = tmp_path / "fd.jsonl"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    writer = TraceWriter(fd, plan=PLAN.digest, seed=0)
    writer(dict(FIRE))
    writer.close()
    assert len(read_trace(path).firings) == 1
    with pytest.raises(TraceError, match="cannot write the trace"):
        TraceWriter(tmp_path / "no" / "such", plan=PLAN.digest, seed=0)


def test_every_line_is_flushed_at_once(tmp_path):
    path = tmp_path / "live.jsonl"
    writer = TraceWriter(path, plan=PLAN.digest, seed=0)
    writer(dict(FIRE))
    # Still open: another reader (the VMM after the device killed itself) sees the line.
    assert len(read_trace(path).firings) == 1
    writer.close()


BAD = [
    ([], "empty"),
    (["{"], "not JSON"),
    (["[1]"], "a line is a JSON object"),
    (['{"type": "fire"}'], "not a splitvmm-fault-trace header"),
    ([HDR.replace('"version":1', '"version":2').replace('"version": 1', '"version": 2')], "trace version 2"),
    ([HDR.replace("a" * 64, "xyz")], "plan must be a SHA-256"),
    ([HDR.replace('"seed": 1', '"seed": -1')], "seed must be"),
    ([HDR, json.dumps({**FIRE, "type": "boom"})], "unknown record type"),
    ([HDR, json.dumps({**FIRE, "extra": 1})], "unknown key(s) extra"),
    ([HDR, json.dumps({**FIRE, "event": 0})], "event must be a positive integer"),
    ([HDR, json.dumps({**FIRE, "event": True})], "event must be a positive integer"),
    ([HDR, json.dumps({**FIRE, "seq": "1"})], "seq must be a positive integer"),
    ([HDR, json.dumps({**FIRE, "device": ""})], "device must be"),
    ([HDR, json.dumps({**FIRE, "device": "d" * 300})], "device must be"),
    ([HDR, json.dumps({**FIRE, "fault": "a b"})], "fault must be a fault name"),
    ([HDR, json.dumps({**FIRE, "t": -5})], "t must be"),
    ([HDR, json.dumps({**FIRE, "params": []})], "params must be"),
    ([HDR, json.dumps({**FIRE, "params": {"x": {"deep": 1}}})], "params must be"),
    ([HDR, json.dumps({**FIRE, "detail": 3})], "detail must be"),
    ([HDR, json.dumps({**FIRE, "detail": "x" * 5000})], "detail must be"),
    ([HDR, json.dumps(FIRE), json.dumps({**FIRE, "seq": 2})], "a second firing at blk/blk.write event 3"),
    ([HDR, json.dumps(FIRE), json.dumps({**FIRE, "event": 4})], "a second firing with seq 1"),
    ([HDR, json.dumps({"type": "arm", "t": 1, "device": "blk", "fault": "f", "point": "p", "event": 0})],
     "an arm record carries the fault"),
]


@pytest.mark.parametrize(("lines", "phrase"), BAD, ids=[b[1] for b in BAD])
def test_a_bad_trace_is_refused_with_its_line(lines, phrase):
    with pytest.raises(TraceError) as info:
        read_trace(lines, name="t")
    assert phrase in str(info.value)
    if len(lines) > 1:
        assert str(info.value).startswith(f"t:{len(lines)}: ")


def test_missing_file_and_binary(tmp_path):
    with pytest.raises(TraceError, match="cannot read"):
        read_trace(tmp_path / "none")
    (tmp_path / "bin").write_bytes(b"\xff\n")
    with pytest.raises(TraceError, match="not ASCII"):
        read_trace(tmp_path / "bin")


def test_merge_orders_by_time_and_keeps_each_devices_sequence():
    blk = one_device("blk", "blk.write", 8, sector=0)
    rng = one_device("rng", "rng.request", 9)
    # Interleave the clocks: rng's firings between blk's.
    for i, f in enumerate(blk.firings):
        f["t"] = 100 * (i + 1)
    for i, f in enumerate(rng.firings):
        f["t"] = 100 * (i + 1) + 50
    merged = merge_traces([blk, rng])
    assert merged.devices == ["blk", "rng"]
    assert [(f["device"], f["seq"]) for f in merged.firings] == [
        ("blk", 1), ("rng", 1), ("blk", 2), ("rng", 2), ("blk", 3), ("rng", 3), ("blk", 4)]
    out = io.StringIO()
    merged.write(out)
    again = read_trace(out.getvalue().splitlines())
    assert again.firings == merged.firings
    assert trace_digest(again) == trace_digest(merged)
    assert again.for_device("rng") == rng.firings


def test_merge_refusals():
    blk = one_device("blk", "blk.write", 4, sector=0)
    other = Trace(plan="b" * 64, seed=blk.seed, devices=["rng"], firings=[])
    with pytest.raises(TraceError, match="trace #2 is of plan bbbbbbbbbbbb"):
        merge_traces([blk, other])
    with pytest.raises(TraceError, match="device 'blk' has records in traces #1 and #2"):
        merge_traces([blk, one_device("blk", "blk.write", 4, sector=0)])
    with pytest.raises(TraceError, match="nothing to merge"):
        merge_traces([])


def test_digest_ignores_order_time_and_seq_but_not_what_fired():
    trace = one_device("blk", "blk.write", 10, sector=0)
    digest = trace_digest(trace)
    shuffled = Trace(plan=trace.plan, seed=trace.seed, devices=trace.devices,
                     firings=[{**f, "t": 0, "seq": 99 - f["seq"]} for f in reversed(trace.firings)])
    assert trace_digest(shuffled) == digest
    fewer = Trace(plan=trace.plan, seed=trace.seed, devices=trace.devices, firings=trace.firings[:-1])
    assert trace_digest(fewer) != digest
    reseeded = Trace(plan=trace.plan, seed=trace.seed + 1, devices=trace.devices, firings=trace.firings)
    assert trace_digest(reseeded) != digest
    changed = [dict(f) for f in trace.firings]
    changed[0]["detail"] = "something else"
    assert trace_digest(Trace(plan=trace.plan, seed=trace.seed, devices=[], firings=changed)) != digest
