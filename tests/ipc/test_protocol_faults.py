"""The fault messages of the control protocol (ipc.protocol, "faults"
block): allowed from Ready on, in their direction only, validated."""

from __future__ import annotations

import pytest

from ipc.protocol import (MAX_FAULT_TEXT, FaultControl, FaultFired, FaultReply, LocalProtocolError, Ready,
                          RemoteProtocolError, SetRegistry, SetSlots, Start)
from tests.ipc.test_protocol import CONFIG, deliver, frame, to_configuring


def running():
    vmm, dev = to_configuring()
    for msg in (CONFIG, SetRegistry(fd=10), SetSlots(fd=11, nslots=2, poll_ns=0), Start()):
        deliver(vmm, dev, msg)
    deliver(dev, vmm, Ready(pid=1))
    return vmm, dev


def test_fault_messages_once_running():
    vmm, dev = running()
    ctl = FaultControl(7, "arm", '{"device":"blk"}')
    assert deliver(vmm, dev, ctl) == ctl
    assert deliver(dev, vmm, FaultReply(7, False, "no")) == FaultReply(7, False, "no")
    fired = FaultFired('{"type":"fire"}')
    assert deliver(dev, vmm, fired) == fired


def test_fault_messages_not_before_ready():
    vmm, dev = to_configuring()
    with pytest.raises(LocalProtocolError, match="not allowed in state configuring"):
        vmm.send(FaultControl(1, "query", "{}"))
    vmm.receive_data(frame({"type": "fault-fired", "record": "{}"}))
    with pytest.raises(RemoteProtocolError, match="not allowed in state configuring"):
        vmm.next_event()


def test_directions_and_fields():
    vmm, dev = running()
    with pytest.raises(LocalProtocolError, match="sent by the device"):
        vmm.send(FaultFired("{}"))
    with pytest.raises(ValueError, match="op must be one of"):
        FaultControl(1, "explode", "{}")
    with pytest.raises(ValueError, match="longer than"):
        FaultFired("x" * (MAX_FAULT_TEXT + 1))
    with pytest.raises(ValueError, match="ok must be a boolean"):
        FaultReply(1, 1, "")  # type: ignore[arg-type]
    vmm.receive_data(frame({"type": "fault-reply", "seq": 1, "ok": "yes", "body": ""}))
    with pytest.raises(RemoteProtocolError, match="bad fault-reply"):
        vmm.next_event()
