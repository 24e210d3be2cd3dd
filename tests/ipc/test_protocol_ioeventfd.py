"""The ioeventfd messages of the control protocol, driven with no sockets."""

from __future__ import annotations

import pytest

from ipc.protocol import (IoeventfdRemoveRequest, IoeventfdRequest, IrqDone, IrqGranted, Ready,
                          RemoteProtocolError, State)
from tests.ipc.test_protocol import deliver, frame, to_configuring
from tests.ipc.test_protocol_irq import to_starting


def test_add_and_remove_from_start_on():
    vmm, dev = to_starting()
    req = IoeventfdRequest(seq=1, space=1, address=0xE000_3000, length=2)
    assert deliver(dev, vmm, req) == req
    data, fds = vmm.send(IrqGranted(seq=1, fd=40))
    dev.receive_data(data, [41])
    assert dev.next_event() == IrqGranted(seq=1, fd=41)
    deliver(dev, vmm, Ready(pid=5))
    match = IoeventfdRequest(seq=2, space=0, address=0xC000, length=4, datamatch=7, match=True)
    assert deliver(dev, vmm, match) == match
    rm = IoeventfdRemoveRequest(seq=3, space=1, address=0xE000_3000, length=2)
    got = deliver(dev, vmm, rm)
    assert got == rm and type(got) is IoeventfdRemoveRequest
    assert deliver(vmm, dev, IrqDone(seq=3)) == IrqDone(3)
    assert vmm.state is State.RUNNING


def test_before_start_is_a_protocol_error():
    vmm, _ = to_configuring()
    vmm.receive_data(frame({"type": "ioeventfd", "seq": 1, "space": 1, "address": 0, "length": 2,
                            "datamatch": 0, "match": False}))
    with pytest.raises(RemoteProtocolError, match="not allowed"):
        vmm.next_event()


@pytest.mark.parametrize("change", [{"space": 2}, {"length": 3}, {"length": 0}, {"address": -1},
                                    {"match": 1}, {"datamatch": -1}, {"seq": "1"}])
def test_malformed_requests_are_refused(change):
    vmm, _ = to_starting()
    body = {"type": "ioeventfd", "seq": 1, "space": 1, "address": 0x1000, "length": 2, "datamatch": 0,
            "match": False}
    body.update(change)
    vmm.receive_data(frame(body))
    with pytest.raises(RemoteProtocolError):
        vmm.next_event()
