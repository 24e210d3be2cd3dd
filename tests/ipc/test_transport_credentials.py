"""SO_PASSCRED on a control socket: the pid the kernel attaches to each
packet is the sending process's (another process, for real), descriptors
still arrive and are still policed alongside the credentials."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from ipc.protocol import PROTOCOL_VERSION, Hello, RemoteProtocolError, Role, Welcome
from ipc.transport import Channel, socketpair

# The child: the device side of a handshake, from another process, answering
# the Hello with a Welcome; with "extra-fd" the Welcome carries a descriptor
# it should not.
CHILD = r"""
import os, socket, sys
import msgpack
s = socket.socket(fileno=int(sys.argv[1]))
s.recv(65536)                                    # the Hello
body = msgpack.packb({"type": "welcome", "version": %d, "features": []})
frame = len(body).to_bytes(4, "little") + body
if sys.argv[2] == "extra-fd":
    r, w = os.pipe()
    socket.send_fds(s, [frame], [r])
else:
    s.send(frame)
s.recv(1)                                        # wait for the parent to hang up
""" % PROTOCOL_VERSION


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def run_child(mode: str, passcred: bool):
    ours, theirs = socketpair()
    if passcred:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(theirs.fileno()), mode], pass_fds=[theirs.fileno()])
    theirs.close()
    return Channel(ours, Role.VMM), child


@pytest.mark.parametrize("passcred", [True, False])
def test_the_kernel_names_the_sending_process(passcred):
    channel, child = run_child("plain", passcred)
    try:
        assert channel.sender_pid == 0
        channel.send(Hello())
        assert isinstance(channel.receive(30), Welcome)
        assert channel.sender_pid == (child.pid if passcred else 0)
        assert child.pid != os.getpid()
    finally:
        channel.close()
        child.wait(30)


def test_descriptors_beside_credentials_are_still_policed():
    before = open_fds()
    channel, child = run_child("extra-fd", passcred=True)
    try:
        channel.send(Hello())
        with pytest.raises(RemoteProtocolError, match="descriptor"):
            channel.receive(30)
        assert channel.sender_pid == child.pid
    finally:
        channel.close()
        child.wait(30)
    assert open_fds() == before      # the smuggled descriptor was closed, nothing leaked

