"""The serial console end to end: a real guest (tests/guests/serial.c with
vmm/guests/serial.c) on real KVM, the 16550A in its own process (or
inline), ``vmm run`` as a real process -- with pipes, a file, and a
pseudo-terminal as its controlling terminal."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import termios
import time

import pytest

from tests.vmm.conftest import GUEST_SOURCES, needs_kvm
from vmm import cli, guests

pytestmark = needs_kvm

EXPECTED_OUT = (b"BEGIN\n" + bytes(range(256))
                + b"printf: -42 42 beef str c 00001234 123456789abc 0x3f8 %\nEND\n")
PLACEMENTS = ["isolated", "inline"]


@pytest.fixture(scope="session")
def serial_guest(guest_cache):
    return guests.build([guests.HERE / "serial.c", GUEST_SOURCES / "serial.c"], guest_cache, name="serial")


def run(guest, *args: str, stdin=subprocess.DEVNULL, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmm.cli", "run", "--guest", str(guest), "--timeout", "30",
                           *args], stdin=stdin, capture_output=True, timeout=60, check=False, **kw)


def placed(placement: str) -> list[str]:
    return [] if placement == "isolated" else ["--device", "serial,process=inline"]


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_guest_output_reaches_stdout_byte_for_byte(serial_guest, placement):
    r = run(serial_guest, "--cmdline", "mode=out", *placed(placement))
    assert r.returncode == 0, r.stderr
    assert r.stdout == EXPECTED_OUT
    where = "(own process)" if placement == "isolated" else "(the VMM)"
    assert "serial0: pid" in r.stderr.decode() and where in r.stderr.decode()


def test_output_to_a_file(serial_guest, tmp_path):
    path = tmp_path / "console.log"
    path.write_bytes(b"old contents, truncated")
    r = run(serial_guest, "--cmdline", "mode=out", "--serial", f"file:{path}")
    assert r.returncode == 0, r.stderr
    assert path.read_bytes() == EXPECTED_OUT
    assert r.stdout == b""


def test_serial_none_leaves_com1_unclaimed(serial_guest):
    r = run(serial_guest, "--cmdline", "mode=absent", "--serial", "none")
    assert r.returncode == 0, r.stderr
    assert b"no devices" in r.stderr


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_registers_from_the_guest(serial_guest, placement):
    """DLAB and the divisor latch, scratch, LSR, IIR priorities, loopback,
    MSR, FIFO on and off: tests/guests/serial.c names each check."""
    r = run(serial_guest, "--cmdline", "mode=regs", *placed(placement))
    assert r.returncode == 0, f"failed check {(r.returncode - 1) >> 1}: {r.stderr}"
    assert r.stdout == b"regs ok\n"          # loopback bytes never reach the line


def talk(guest, ready: bytes, data: bytes, *args: str) -> tuple[int, bytes, str]:
    """Run ``guest`` with stdin and stdout pipes; once it has printed
    ``ready``, write ``data`` and close its stdin (the guest clears its
    receive FIFO when it starts, as a driver does: input typed before that
    is lost, as on a real UART)."""
    proc = subprocess.Popen([sys.executable, "-m", "vmm.cli", "run", "--guest", str(guest), "--timeout", "30",
                             *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        seen = b""
        deadline = time.monotonic() + 20
        while ready not in seen:
            assert time.monotonic() < deadline, f"no {ready!r} in {seen!r}"
            if select.select([proc.stdout], [], [], 1)[0]:
                chunk = os.read(proc.stdout.fileno(), 4096)
                assert chunk, f"no {ready!r} in {seen!r}: {proc.stderr.read().decode()}"
                seen += chunk
        proc.stdin.write(data)
        proc.stdin.close()
        status = proc.wait(30)
        return status, seen + proc.stdout.read(), proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_piped_stdin_reaches_the_guest_verbatim(serial_guest):
    status, out, err = talk(serial_guest, b"ready\n", b"ab\x01c\xff.", "--cmdline", "mode=echo")
    assert status == 0, err
    assert out == b"ready\n61 62 01 63 ff bye\n"


@pytest.mark.parametrize("value, words", [
    ("bogus", "expected stdio, none or file:PATH"),
    ("file:", "needs a path"),
    ("", "expected stdio"),
    ("tcp:4444", "expected stdio"),
    ("file:/nonexistent-dir/console.log", "No such file or directory"),
])
def test_bad_serial_values(capsys, serial_guest, value, words):
    status = cli.main(["run", "--guest", str(serial_guest), "--serial", value])
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.count("\n") == 1 and err.startswith("vmm: ") and words in err, err


# -- through a pseudo-terminal ---------------------------------------------

@pytest.mark.parametrize("placement", PLACEMENTS)
def test_typed_input_reaches_the_guest_in_raw_mode(serial_guest, pty_vmm, placement):
    vm = pty_vmm(serial_guest, "--cmdline", "mode=echo", *placed(placement))
    vm.expect(b"ready\n")
    assert not vm.lflag() & (termios.ICANON | termios.ECHO | termios.ISIG)   # raw while it runs
    # Ctrl-C, CR and DEL are bytes for the guest now; Ctrl-A Ctrl-A is one
    # Ctrl-A; Ctrl-A and a key that means nothing are both dropped.
    vm.type(b"hi\x03\r\x7f\x01\x01")
    vm.expect(b"68 69 03 0d 7f 01 ")
    vm.type(b"\x01q.")
    vm.expect(b"bye\n")
    assert vm.seen.endswith(b"68 69 03 0d 7f 01 bye\r\n"), vm.seen
    status, err = vm.wait()
    assert status == 0, err
    assert termios.tcgetattr(vm.master) == vm.attrs


def device_processes(vmm_pid: int) -> list[int]:
    """The processes serving the VMM's devices: its children, or, for a
    sandboxed device in a pid namespace of its own, the grandchild of that
    child (the one the VMM started and pid 1 of the namespace only reap it).
    Devices forked by the VMM's fork server (vmm.forkserver) are its children."""
    out = []
    started = []
    for pid in _children(vmm_pid):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            forkserver = b"\0devserver.forkserver\0" in f.read()
        started += _children(pid) if forkserver else [pid]
    for pid in started:
        inner = _children(pid)
        out.extend([g for k in inner for g in (_children(k) or [k])] or [pid])
    return out


def _children(parent: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == parent:
                        out.append(int(entry))
            except OSError:
                pass
    return out


def test_the_device_process_gets_no_terminal(serial_guest, pty_vmm):
    """Only the VMM reads the terminal: the serial device process holds it
    write-only (its output), has no controlling terminal, and receives
    through the pipe it was given."""
    vm = pty_vmm(serial_guest, "--cmdline", "mode=echo")
    vm.expect(b"ready\n")
    # The serving process and its warm spare (vmm.remote: a restart takes
    # the spare), which has no console at all.
    devs = device_processes(vm.proc.pid)
    assert 1 <= len(devs) <= 2, devs
    slave = os.readlink(f"/proc/{vm.proc.pid}/fd/0")
    assert slave.startswith("/dev/pts/")
    holders = []
    for dev in devs:
        with open(f"/proc/{dev}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        assert int(fields[4]) == 0                          # tty_nr: no controlling terminal
        assert int(fields[3]) != os.getsid(vm.proc.pid)     # a session of its own
        held = []
        for fd in os.listdir(f"/proc/{dev}/fd"):
            if os.readlink(f"/proc/{dev}/fd/{fd}") == slave:
                with open(f"/proc/{dev}/fdinfo/{fd}") as f:
                    flags = int(f.read().split("flags:")[1].split()[0], 8)
                held.append(flags & os.O_ACCMODE)
        if held:
            holders.append(held)
    assert holders == [[os.O_WRONLY]]                   # the console output, nothing else
    vm.type(b"z.")
    vm.expect(b"7a bye\n")
    assert vm.wait()[0] == 0


def test_ctrl_a_x_quits_and_restores_the_terminal(serial_guest, pty_vmm):
    vm = pty_vmm(serial_guest, "--cmdline", "mode=echo")
    vm.expect(b"ready\n")
    vm.type(b"a\x01h")
    vm.expect(b"61 ")
    vm.type(b"\x01x")
    status, err = vm.wait()
    assert status == 12, err
    assert "console quit" in err
    assert "C-a x    quit the VMM" in err           # Ctrl-A h
    assert termios.tcgetattr(vm.master) == vm.attrs


def test_sigterm_restores_the_terminal(serial_guest, pty_vmm):
    vm = pty_vmm(serial_guest, "--cmdline", "mode=echo")
    vm.expect(b"ready\n")
    assert not vm.lflag() & termios.ICANON
    vm.proc.send_signal(signal.SIGTERM)
    status, err = vm.wait()
    assert status == 128 + signal.SIGTERM, err
    assert termios.tcgetattr(vm.master) == vm.attrs


def test_guest_crash_restores_the_terminal(guest, pty_vmm):
    vm = pty_vmm(guest("endings"), "--cmdline", "mode=2")      # triple fault
    status, err = vm.wait()
    assert status == 4, err
    assert termios.tcgetattr(vm.master) == vm.attrs


def test_the_demo_reports_on_the_serial_console(tmp_path):
    r = subprocess.run([sys.executable, "-m", "vmm.cli", "run"], capture_output=True, timeout=60, check=False,
                       stdin=subprocess.DEVNULL, env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(b"splitvmm demo guest: every device in its own process\n")
    assert r.stdout.endswith(b"demo: all checks passed: ok\n")
    assert b"serial0: pid" in r.stderr


# -- interrupts --------------------------------------------------------------

@pytest.mark.parametrize("placement", PLACEMENTS)
def test_interrupt_driven_receive_and_transmit(guest_cache, placement):
    """IRQ 4 through the IOAPIC to a guest handler: THRE interrupts send,
    RDA / character-timeout interrupts receive (tests/guests/serial_irq.c)."""
    image = guests.build([guests.HERE / "serial.c", GUEST_SOURCES / "serial_irq.c"], guest_cache,
                         name="serial_irq")
    status, out, err = talk(image, b"irq ready\n", b"abc\x00\xfe.", *placed(placement))
    assert status == 0, f"status {status}: {err}"
    assert out == b"irq ready\ngot 61 62 63 00 fe\nirqs ok\n"
