"""virtio-console on real KVM, inline and in a device process: the test
guest (tests/guests/virtio_console.c) reads a line typed on the port --
through its Unix socket, or on the VMM's terminal after Ctrl-A c passed
the input from COM1 to it -- and answers hello and the line."""

from __future__ import annotations

import socket
import termios
import threading
import time

import pytest

from tests.vmm.conftest import needs_kvm, vmm_run
from vmm.config import parse_device_spec
from vmm.machine import Machine
from vmm.outcome import Ending

pytestmark = needs_kvm


def client(path: str, got: list, done=lambda buf: buf.endswith(b"ping\n")) -> None:
    """Connect to the console's socket once it is there, send ``ping``,
    read until ``done(what was read)``, and append what was read to ``got``."""
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
        while not done(buf):
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


@pytest.mark.parametrize("placement", ["isolated", "inline"])
def test_on_the_vmm_terminal_after_ctrl_a_c(console_guest, pty_vmm, placement):
    # COM1 has the input first: what is typed now is COM1's (this guest
    # never reads it); Ctrl-A c passes the input to the virtio-console.
    vm = pty_vmm(console_guest, "--device", f"virtio-console,id=hvc,process={placement}")
    deadline = time.monotonic() + 20
    while vm.lflag() & termios.ICANON:       # typed before raw mode, it would be echoed
        assert time.monotonic() < deadline, "the terminal never went raw"
        time.sleep(0.02)
    vm.type(b"lost\n")
    vm.type(b"\x01c")
    vm.type(b"ping\n")
    vm.expect(b"hello\nping\n")
    assert b"lost" not in vm.seen
    status, err = vm.wait()
    assert status == 0, err
    assert "console input to hvc" in err
    assert termios.tcgetattr(vm.master) == vm.attrs


def test_output_to_the_serial_file(console_guest, tmp_path):
    sock = tmp_path / "c.sock"
    out = tmp_path / "out.log"
    got: list[bytes] = []
    t = threading.Thread(target=client, args=(str(sock), got), daemon=True)
    t.start()
    r = vmm_run("--guest", str(console_guest), "--timeout", "30", "--serial", f"file:{out}",
                "--device", f"virtio-console,socket={sock}")
    t.join(10)
    assert r.returncode == 0, r.stderr
    assert got == [b"hello\nping\n"]              # socket= keeps the port off the console
    assert out.read_bytes() == b""
