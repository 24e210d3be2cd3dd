"""The coalesced-MMIO messages of the control protocol, driven with no sockets."""

from __future__ import annotations

import pytest

from ipc import IpcError, ProtocolError, RegistryError, SlotError
from ipc.protocol import (CoalescedMmioRemoveRequest, CoalescedMmioRequest, IrqDone, IrqRefused, Ready,
                          RemoteProtocolError, State)
from tests.ipc.test_protocol import deliver, frame, to_configuring
from tests.ipc.test_protocol_irq import to_starting


def test_add_and_remove_from_start_on():
    vmm, dev = to_starting()
    req = CoalescedMmioRequest(seq=1, address=0xD000_0000, length=0x1000)
    assert deliver(dev, vmm, req) == req
    assert deliver(vmm, dev, IrqDone(seq=1)) == IrqDone(1)
    deliver(dev, vmm, Ready(pid=5))
    again = CoalescedMmioRequest(seq=2, address=0xD010_0000, length=0x1000)
    assert deliver(dev, vmm, again) == again
    assert deliver(vmm, dev, IrqRefused(seq=2, message="not yours")) == IrqRefused(2, "not yours")
    rm = CoalescedMmioRemoveRequest(seq=3, address=0xD000_0000)
    assert deliver(dev, vmm, rm) == rm
    assert deliver(vmm, dev, IrqDone(seq=3)) == IrqDone(3)
    assert vmm.state is State.RUNNING


def test_before_start_is_a_protocol_error():
    vmm, _ = to_configuring()
    vmm.receive_data(frame({"type": "coalesced-mmio", "seq": 1, "address": 0xD000_0000, "length": 16}))
    with pytest.raises(RemoteProtocolError, match="not allowed"):
        vmm.next_event()


def test_only_the_device_asks():
    vmm, dev = to_starting()
    dev.receive_data(frame({"type": "coalesced-mmio", "seq": 1, "address": 0xD000_0000, "length": 16}))
    with pytest.raises(RemoteProtocolError):
        dev.next_event()


@pytest.mark.parametrize("change", [{"length": 0}, {"length": 1 << 32}, {"length": "16"},
                                    {"address": -1}, {"seq": -1},
                                    {"extra": 1}])
def test_malformed_requests_are_refused(change):
    vmm, _ = to_starting()
    body = {"type": "coalesced-mmio", "seq": 1, "address": 0xD000_0000, "length": 0x1000}
    body.update(change)
    vmm.receive_data(frame(body))
    with pytest.raises(RemoteProtocolError):
        vmm.next_event()


def test_malformed_remove_is_refused():
    vmm, _ = to_starting()
    vmm.receive_data(frame({"type": "coalesced-mmio-remove", "seq": 1, "address": 0xD000_0000,
                            "length": 16}))
    with pytest.raises(RemoteProtocolError):
        vmm.next_event()


def test_ipc_errors_share_one_base():
    from ipc.batch import BatchError
    from ipc.inflight import InflightError
    from ipc.state import StateError

    for family in (RegistryError, SlotError, ProtocolError, RemoteProtocolError, BatchError, InflightError,
                   StateError):
        assert issubclass(family, IpcError)
