"""RemoteEndpoint.attach: a device this VMM did not spawn, reached over a
connected control socket (here the test starts ``python -m devserver --fd
N`` itself, as a service manager would).  The handshake, the access proxy
and the request service are the ones spawn() uses; the end of the control
stream is the end of the device."""

from __future__ import annotations

import logging
import os
import signal
import subprocess

import pytest

from ipc import Bus
from ipc.transport import socketpair
from vmm.endpoint import DeviceFailed
from vmm.remote import DEVSERVER_COMMAND, RemoteEndpoint, RemoteOptions, SocketPeer
from tests.waiting import poll

PIO = 0x1000


def owned(registry, owner):
    return [r for r in registry.regions() if r.owner == owner]


@pytest.fixture
def service():
    """A device process the test (not the endpoint) started and reaps."""
    started = []

    def start():
        ours, theirs = socketpair()
        proc = subprocess.Popen([*DEVSERVER_COMMAND, "--fd", str(theirs.fileno())],
                                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL)
        theirs.close()
        started.append(proc)
        return ours, proc
    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def device_pid(proc) -> int:
    """The serving process: under the sandbox, the grandchild of the one
    started here (the child of pid 1 of its own pid namespace; both only
    reap it)."""
    pid = proc.pid
    for _ in range(2):
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(x) for x in f.read().split()]
        if not kids:
            break
        pid = kids[0]
    return pid


def attach(registry, sock, pid, owner=2):
    return RemoteEndpoint.attach(sock, SocketPeer(sock, pid), "echo", {"pio": hex(PIO)}, owner,
                                 "net0", registry, 1, RemoteOptions(access_timeout=5.0))


def access(registry, ep, addr, is_write=False, value=0):
    ref = registry.get(Bus.PIO, addr, 4)
    assert ref is not None and ref.owner == ep.owner
    try:
        return ep.access(0, int(Bus.PIO), ref.cookie, ref.offset, 4, is_write, value)
    finally:
        registry.put(ref)


def test_attached_device_serves_and_shuts_down_cleanly(registry, service):
    sock, proc = service()
    ep = attach(registry, sock, proc.pid)
    try:
        assert ep.reported_pid == device_pid(proc) and ep.pid == proc.pid
        access(registry, ep, PIO + 0x10, True, 0xC0FFEE)
        assert access(registry, ep, PIO + 0x10) == 0xC0FFEE
        ep.reset()
        assert access(registry, ep, PIO + 0x10) == 0
    finally:
        ep.close()
    assert proc.wait(10) == 0, "Shutdown over the connected socket ends the device cleanly"
    assert not owned(registry, ep.owner)
    assert sock.fileno() == -1, "the endpoint owns and closes the socket"


def test_attached_device_that_dies_is_cut_off_at_once(registry, service, caplog):
    sock, proc = service()
    ep = attach(registry, sock, proc.pid)
    try:
        assert owned(registry, ep.owner)
        os.kill(device_pid(proc), signal.SIGKILL)
        assert ep.wait_exited(10), "end of stream is the end of an attached device"
        assert ep.failed and "closed its control socket" in ep.failed
        assert poll(lambda: not owned(registry, ep.owner)), "regions not reaped"
        with pytest.raises(DeviceFailed):
            ep.access(0, 0, 0, 0, 4, False, 0)
        cut = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("vmm.remote")]
        assert len(cut) == 1 and "net0" in cut[0].getMessage()
    finally:
        ep.close()


def test_attach_refused_configuration_closes_the_socket(registry, service):
    sock, proc = service()
    with pytest.raises(DeviceFailed, match="unknown parameter"):
        RemoteEndpoint.attach(sock, SocketPeer(sock, proc.pid), "echo", {"pio": hex(PIO), "colour": "red"},
                              3, "bad0", registry, 1)
    assert sock.fileno() == -1
    assert proc.wait(10) is not None
    assert not owned(registry, 3)
