"""The interrupt messages of the control protocol (irqfds, MSI routes),
driven with no sockets."""

from __future__ import annotations

import pytest

from ipc.protocol import (
    IrqDone,
    IrqGranted,
    IrqLineRequest,
    IrqRefused,
    MsiRouteRequest,
    MsiUnrouteRequest,
    Ready,
    RemoteProtocolError,
    SetRegistry,
    SetSlots,
    Start,
    State,
)
from tests.ipc.test_protocol import CONFIG, deliver, frame, to_configuring


def to_starting():
    vmm, dev = to_configuring()
    for msg in (CONFIG, SetRegistry(fd=10), SetSlots(fd=11, nslots=2, poll_ns=0)):
        deliver(vmm, dev, msg)
    deliver(vmm, dev, Start())
    return vmm, dev


def test_requests_from_start_on_and_answers_carry_the_eventfd():
    vmm, dev = to_starting()
    # a model's start() asks before Ready
    assert deliver(dev, vmm, IrqLineRequest(seq=1, gsi=4)) == IrqLineRequest(1, 4)
    data, fds = vmm.send(IrqGranted(seq=1, fd=33))
    assert fds == [33]
    dev.receive_data(data, [77])
    assert dev.next_event() == IrqGranted(seq=1, fd=77)
    deliver(dev, vmm, Ready(pid=5))
    assert vmm.state is dev.state is State.RUNNING
    # and any time while running (an MSI-X table write)
    req = MsiRouteRequest(seq=2, index=3, address=0xFEE0_1000, data=0x41)
    assert deliver(dev, vmm, req) == req
    assert deliver(vmm, dev, IrqDone(seq=2)) == IrqDone(2)
    assert deliver(dev, vmm, MsiUnrouteRequest(seq=3, index=3)) == MsiUnrouteRequest(3, 3)
    assert deliver(vmm, dev, IrqRefused(seq=3, message="no")) == IrqRefused(3, "no")
    assert vmm.state is State.RUNNING


def test_a_request_before_start_is_a_protocol_error():
    vmm, _ = to_configuring()
    vmm.receive_data(frame({"type": "irq-line", "seq": 1, "gsi": 4}))
    with pytest.raises(RemoteProtocolError, match="not allowed"):
        vmm.next_event()


@pytest.mark.parametrize("body", [
    {"type": "irq-line", "seq": 1, "gsi": -1},
    {"type": "irq-line", "seq": "1", "gsi": 4},
    {"type": "msi-route", "seq": 1, "index": -3, "address": 0xFEE00000, "data": 0},
    {"type": "msi-route", "seq": 1, "index": 0, "address": 0xFEE00000},
])
def test_malformed_requests_are_refused(body):
    vmm, _ = to_starting()
    vmm.receive_data(frame(body))
    with pytest.raises(RemoteProtocolError):
        vmm.next_event()


def test_values_are_judged_by_the_vmm_not_the_protocol():
    # an address outside the MSI window is a well-formed request; the VMM
    # answers it with IrqRefused (vmm.irq), the device is not cut off
    req = MsiRouteRequest(seq=1, index=0, address=0xFED0_0000, data=0)
    assert req.address == 0xFED0_0000
