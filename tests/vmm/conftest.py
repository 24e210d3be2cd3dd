"""Fixtures of the VMM tests: KVM presence, guests built once per session,
a watch on /dev/shm, and ``vmm run`` on a pseudo-terminal."""

from __future__ import annotations

import fcntl
import os
import pathlib
import pty
import select
import subprocess
import sys
import termios
import time

import pytest

from vmm import guests

REPO = pathlib.Path(__file__).resolve().parents[2]
GUEST_SOURCES = REPO / "tests" / "guests"

needs_kvm = pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK),
                               reason="no usable /dev/kvm on this machine")


@pytest.fixture(scope="session")
def guest_cache(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("guests")


@pytest.fixture(scope="session")
def guest(guest_cache):
    """guest("echo") -> path of tests/guests/echo.c built as a PVH ELF."""
    def build(name: str) -> pathlib.Path:
        return guests.build([GUEST_SOURCES / f"{name}.c"], guest_cache)
    return build


@pytest.fixture(scope="session")
def console_guest(guest_cache) -> pathlib.Path:
    """tests/guests/virtio_console.c with the PCI library."""
    return guests.build([GUEST_SOURCES / "virtio_console.c", guests.HERE / "pci.c"], guest_cache)


def shm_segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("splitvmm-")}


def vmm_run(*args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    """``vmm run ARGS`` as a separate process (the real exit status); stdin
    is /dev/null unless given (so a run never takes the terminal of the
    person running the tests into raw mode, see vmm.console)."""
    if "input" not in kw:
        kw.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run([sys.executable, "-m", "vmm.cli", "run", *args], capture_output=True,
                          text=True, timeout=timeout, **kw)



class PtyVmm:
    """``vmm run`` with a new pty as its controlling terminal, stdin and
    stdout (stderr is a pipe)."""

    def __init__(self, guest, *args: str):
        self.master, slave = pty.openpty()
        self.attrs = termios.tcgetattr(self.master)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vmm.cli", "run", "--guest", str(guest), "--timeout", "40", *args],
            stdin=slave, stdout=slave, stderr=subprocess.PIPE, start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        os.close(slave)
        self.seen = b""

    def expect(self, text: bytes, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.seen.replace(b"\r\n", b"\n"):
            left = deadline - time.monotonic()
            assert left > 0, f"no {text!r} in {self.seen!r}"
            if select.select([self.master], [], [], left)[0]:
                try:
                    data = os.read(self.master, 4096)
                except OSError:       # EIO: every slave descriptor is closed
                    data = b""
                if not data:
                    assert text in self.seen.replace(b"\r\n", b"\n"), f"no {text!r} in {self.seen!r}"
                    return
                self.seen += data

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def wait(self, timeout: float = 20) -> tuple[int, str]:
        _, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, err.decode()

    def lflag(self) -> int:
        return termios.tcgetattr(self.master)[3]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


@pytest.fixture
def pty_vmm():
    made = []

    def start(guest, *args):
        p = PtyVmm(guest, *args)
        made.append(p)
        return p
    yield start
    for p in made:
        p.close()
