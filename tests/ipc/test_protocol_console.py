"""SetConsole, the message that hands the serial device its console fds:
when it may be sent, and its two descriptors over a real socket."""

from __future__ import annotations

import os

import pytest

from ipc.protocol import (
    Connection,
    DeviceConfig,
    Hello,
    LocalProtocolError,
    RemoteProtocolError,
    Role,
    SetConsole,
    SetRegistry,
    SetSlots,
    Start,
    Welcome,
)
from ipc.transport import Channel, socketpair


def configuring() -> tuple[Connection, Connection]:
    vmm, dev = Connection(Role.VMM), Connection(Role.DEVICE)
    for sender, receiver, msg in ((vmm, dev, Hello()), (dev, vmm, Welcome())):
        data, fds = sender.send(msg)
        receiver.receive_data(data, fds)
        receiver.next_event()
    return vmm, dev


def test_console_is_optional_configuration_sent_once():
    vmm, dev = configuring()
    for msg in (DeviceConfig("serial", {}, 2, "serial0", 1), SetRegistry(3), SetSlots(4, 1, 0),
                SetConsole(5, 6)):
        data, fds = vmm.send(msg)
        dev.receive_data(data, fds)
        assert dev.next_event() == msg
    with pytest.raises(LocalProtocolError, match="sent twice"):
        vmm.send(SetConsole(5, 6))
    vmm.send(Start())


def test_console_after_start_is_refused():
    vmm, _ = configuring()
    for msg in (DeviceConfig("serial", {}, 2, "serial0", 1), SetRegistry(3), SetSlots(4, 1, 0), Start()):
        vmm.send(msg)
    with pytest.raises(LocalProtocolError, match="not allowed"):
        vmm.send(SetConsole(5, 6))


def test_console_without_its_descriptors_is_a_remote_error():
    vmm, dev = configuring()
    data, _ = vmm.send(SetConsole(5, 6))
    dev.receive_data(data, [7])
    with pytest.raises(RemoteProtocolError, match="needs 2 descriptor"):
        dev.next_event()
    assert dev.take_unclaimed_fds() == [7]


def test_console_descriptors_cross_a_real_socket():
    a, b = socketpair()
    out_r, out_w = os.pipe()
    in_r, in_w = os.pipe()
    with Channel(a, Role.VMM) as vmm, Channel(b, Role.DEVICE) as dev:
        vmm.send(Hello())
        dev.receive(5)
        dev.send(Welcome())
        vmm.receive(5)
        vmm.send(SetConsole(out_w, in_r))
        msg = dev.receive(5)
        assert isinstance(msg, SetConsole) and {msg.out_fd, msg.in_fd}.isdisjoint({out_w, in_r})
        os.write(msg.out_fd, b"out")
        os.write(in_w, b"in")
        assert os.read(out_r, 3) == b"out" and os.read(msg.in_fd, 2) == b"in"
        for fd in (msg.out_fd, msg.in_fd):
            os.close(fd)
    for fd in (out_r, out_w, in_r, in_w):
        os.close(fd)
