"""The control socket: messages and descriptors over a real socketpair."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from ipc.protocol import (MAX_FDS, ConnectionClosed, DeviceConfig, Hello, RemoteProtocolError, Role,
                          SetRegistry, negotiate)
from ipc.transport import Channel, ChannelTimeout, socketpair


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def channels():
    a, b = socketpair()
    vmm, dev = Channel(a, Role.VMM), Channel(b, Role.DEVICE)
    yield vmm, dev
    vmm.close()
    dev.close()


def handshake(vmm: Channel, dev: Channel) -> None:
    vmm.send(Hello())
    dev.send(negotiate(dev.receive(1.0)))
    vmm.receive(1.0)


def test_messages_and_fds_cross(channels):
    vmm, dev = channels
    handshake(vmm, dev)
    r, w = os.pipe()
    try:
        vmm.send(DeviceConfig(kind="echo", params={}, owner=2, name="e", nvcpus=1))
        vmm.send(SetRegistry(fd=w))
        assert dev.receive(1.0).kind == "echo"
        got = dev.receive(1.0)
        assert isinstance(got, SetRegistry) and got.fd != w
        os.write(got.fd, b"x")
        os.close(got.fd)
        assert os.read(r, 1) == b"x"
    finally:
        os.close(r)
        os.close(w)


def test_timeout_and_end_of_stream(channels):
    vmm, dev = channels
    with pytest.raises(ChannelTimeout):
        dev.receive(0.05)
    vmm.sock.shutdown(socket.SHUT_WR)
    assert isinstance(dev.receive(1.0), ConnectionClosed)


def test_garbage_fds_are_closed():
    a, b = socketpair()
    dev = Channel(b, Role.DEVICE)
    before = open_fds()
    try:
        r, w = os.pipe()
        # A frame that carries no descriptor, sent with two: refused, closed.
        body = b"\x81\xa4type\xa5hello"           # {"type": "hello"} (missing fields)
        socket.send_fds(a, [struct.pack("<I", len(body)) + body], [r, w])
        os.close(r)
        os.close(w)
        with pytest.raises(RemoteProtocolError):
            dev.receive(1.0)
        assert open_fds() == before        # the two received copies are closed
    finally:
        dev.close()
        a.close()
    assert open_fds() == before - 2


def test_too_many_fds_are_closed():
    a, b = socketpair()
    dev = Channel(b, Role.DEVICE)
    before = open_fds()
    pipes = [os.pipe() for _ in range(MAX_FDS)]
    fds = [fd for p in pipes for fd in p]
    try:
        socket.send_fds(a, [b"\x01\x00\x00\x00\xc0"], fds)
        with pytest.raises(RemoteProtocolError, match="descriptors"):
            dev.receive(1.0)
        assert open_fds() == before + len(fds)   # only our own pipe ends
    finally:
        for fd in fds:
            os.close(fd)
        dev.close()
        a.close()
    assert open_fds() == before - 2


def test_seqpacket_required():
    a, b = socket.socketpair()
    with pytest.raises(ValueError):
        Channel(a, Role.VMM)
    a.close()
    b.close()


def test_a_frame_must_end_with_its_packet():
    a, b = socketpair()
    dev = Channel(b, Role.DEVICE)
    try:
        a.send(b"\xff\x00\x00\x00only the start of a frame")
        with pytest.raises(RemoteProtocolError, match="partial frame"):
            dev.receive(1.0)
    finally:
        dev.close()
        a.close()
