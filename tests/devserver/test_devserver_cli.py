"""``devserver --fd N`` driven by hand over a real socket: the handshake,
its failures, and exiting when the VMM goes away."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator

import pytest

from ipc.protocol import (ConnectionClosed, DeviceConfig, Error, Hello, Ready, Role, SetRegistry,
                          SetSlots, Start, Welcome)
from ipc.slots import SlotCaller
from ipc.transport import Channel, socketpair

import posix_ipc


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


@contextlib.contextmanager
def devserver(handshake_timeout: float = 5.0) -> Iterator[tuple[Channel, subprocess.Popen]]:
    """``devserver --fd N`` on one end of a socket pair, the VMM's channel
    on the other; the process is killed (if it still runs) and the
    channel closed at the end."""
    ours, theirs = socketpair()
    proc = subprocess.Popen([sys.executable, "-m", "devserver", "--fd", str(theirs.fileno()),
                             "--handshake-timeout", str(handshake_timeout)], pass_fds=[theirs.fileno()])
    theirs.close()
    chan = Channel(ours, Role.VMM)
    try:
        yield chan, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        chan.close()


def configure(chan: Channel, registry, slots: SlotCaller, params) -> object:
    chan.send(Hello())
    assert isinstance(chan.receive(10), Welcome)
    chan.send(DeviceConfig(kind="echo", params=params, owner=7, name="cli0", nvcpus=1))
    shm = posix_ipc.SharedMemory(registry.name)
    try:
        chan.send(SetRegistry(fd=shm.fd))
    finally:
        shm.close_fd()
    chan.send(SetSlots(fd=slots.fd, nslots=1, poll_ns=0))
    chan.send(Start())
    return chan.receive(10)


def test_device_exits_when_the_vmm_closes_its_socket(registry):
    with contextlib.closing(SlotCaller.create(1)) as slots, devserver() as (chan, proc):
        ready = configure(chan, registry, slots, {"pio": "0x5000"})
        # Sandboxed: the device is the grandchild of the process started here
        # (the child of pid 1 of a pid namespace of its own) and reports its
        # pid as seen from here.
        assert isinstance(ready, Ready) and ready.pid in [g for k in children(proc.pid) for g in children(k)]
        assert [r.start for r in registry.regions() if r.owner == 7] == [0x5000]
        assert slots.call(0, 0, 0, 0xF0, 4, False, 0, timeout=5.0) == ready.pid
        chan.close()                       # the VMM goes away, no Shutdown
        assert proc.wait(5) == 0
        assert [r for r in registry.regions() if r.owner == 7] == []   # released its own


def test_device_reports_bad_parameters(registry):
    with contextlib.closing(SlotCaller.create(1)) as slots, devserver() as (chan, proc):
        answer = configure(chan, registry, slots, {"pio": "nonsense"})
        assert isinstance(answer, Error) and "not an integer" in answer.message
        assert isinstance(chan.receive(5), ConnectionClosed)
        assert proc.wait(5) == 1


def test_handshake_deadline():
    with devserver(handshake_timeout=0.5) as (chan, proc):
        assert proc.wait(15) == 2          # nothing said within 0.5 s


def test_garbage_from_the_vmm_makes_the_device_exit():
    with devserver() as (chan, proc):
        chan.sock.send(b"\x10\x00\x00\x00not msgpack at all")
        assert proc.wait(10) == 2


@pytest.mark.parametrize("argv", [["--fd", "999"], ["--fd", "0"]])
def test_bad_fd_argument(argv):
    r = subprocess.run([sys.executable, "-m", "devserver", *argv], stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=20)
    assert r.returncode == 2
    assert b"--fd" in r.stderr
