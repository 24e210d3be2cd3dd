"""virtio-console on real KVM, inline and in a device process: the test
guest (tests/guests/virtio_console.c) reads a line the client typed on
the port's Unix socket and answers hello and the line."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from tests.vmm.conftest import GUEST_SOURCES, needs_kvm
from vmm import guests
from vmm.config import parse_device_spec
from vmm.machine import Machine
from vmm.outcome import Ending

pytestmark = needs_kvm


@pytest.fixture(scope="session")
def console_guest(guest_cache):
    return guests.build([GUEST_SOURCES / "virtio_console.c", guests.HERE / "pci.c"], guest_cache)


def client(path: str, got: list) -> None:
    deadline = time.monotonic() + 20
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    while True:
        try:
            s.connect(path)
            break
        except OSError:
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)
    s.settimeout(20)
    buf = b""
    try:
        s.sendall(b"ping\n")
        while not buf.endswith(b"ping\n"):
            data = s.recv(100)
            if not data:
                break
            buf += data
    finally:
        got.append(buf)
        s.close()


@pytest.mark.parametrize("placement", ["isolated", "inline"])
def test_hello_and_echo(console_guest, tmp_path, placement):
    path = str(tmp_path / "console.sock")
    got: list[bytes] = []
    with Machine(memory=32 << 20, vcpus=1) as m:
        m.load_pvh(console_guest, "")
        m.add_device(parse_device_spec(f"virtio-console,socket={path},process={placement}"))
        t = threading.Thread(target=client, args=(path, got), daemon=True)
        t.start()
        outcome = m.run(timeout=40)
        t.join(10)
    assert outcome.ending is Ending.POWER_OFF, str(outcome)
    assert got == [b"hello\nping\n"]
