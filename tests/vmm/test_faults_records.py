"""The VMM's side of fault records (vmm.faults), without a VM: records from
a device process are input -- a malformed one, or one naming another
device, is dropped with a warning; good ones are counted, kept, written to
the trace and announced as FAULT_FIRED."""

from __future__ import annotations

import logging
import types

from devices.faults.plan import loads_plan
from devices.faults.trace import read_trace
from vmm.faults import MachineFaults
from vmm.qmp.events import EventHub

PLAN = '[[fault]]\nname = "w"\ndevice = "blk"\npoint = "blk.write"\nnth = 1\naction = "ioerr"\n'


def fire(device: str = "blk", **over) -> dict:
    rec = {"type": "fire", "seq": 1, "t": 5, "device": device, "fault": "w", "point": "blk.write", "event": 1,
           "action": "ioerr", "params": {}, "detail": "write failed"}
    rec.update(over)
    return rec


def test_records_checked_counted_written(tmp_path, caplog):
    events = []
    hub = EventHub()
    hub.subscribe(events.append)
    faults = MachineFaults(types.SimpleNamespace(events=hub))  # type: ignore[arg-type]
    trace = tmp_path / "t.jsonl"
    faults.configure(loads_plan(PLAN), trace=str(trace), devices=["blk", "rng"])
    with caplog.at_level(logging.WARNING):
        faults.record("rng", fire("blk"))                 # rng may not speak for blk
        faults.record("blk", fire(event=0))               # event numbers start at 1
        faults.record("blk", fire(extra=1))               # unknown key
        faults.record("blk", "not a record")
        faults.record("blk", fire())
    faults.close()
    assert caplog.text.count("fault record dropped") == 4
    assert faults.firings() == {"blk/w": 1}
    assert faults.summary() == "faults: blk/w: 1 firing(s)"
    assert [e.name for e in events] == ["FAULT_FIRED"] and events[0].data["detail"] == "write failed"
    t = read_trace(trace)
    assert t.plan == loads_plan(PLAN).digest and t.devices == ["blk", "rng"]
    assert len(t.firings) == 1 and t.firings[0]["device"] == "blk"
