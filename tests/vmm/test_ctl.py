"""``vmm run --api PATH`` and ``vmm ctl`` as a user runs them: separate
processes, real exit statuses (guest: tests/guests/spin.c)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time

import pytest

from tests.vmm.conftest import needs_kvm, vmm_run

pytestmark = needs_kvm

PIO = 0x1000


def ctl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmm.cli", "ctl", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture
def running(guest):
    """A ``vmm run --api`` process with the spin guest and an echo device."""
    d = tempfile.mkdtemp(prefix="ctlt-", dir="/tmp")
    path = os.path.join(d, "api.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmm.cli", "run", "--guest", str(guest("spin")), "--api", path, "--serial", "none",
         "--timeout", "120", "--cmdline", f"pio={PIO:#x} accesses=50",
         "--device", f"echo,id=echo0,pio={PIO:#x},mmio=0xd0000000"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the control socket never appeared"
        time.sleep(0.02)
    yield proc, path
    if proc.poll() is None:
        proc.kill()
    proc.communicate()
    shutil.rmtree(d, ignore_errors=True)


def test_ctl_runs_commands_and_quits(running, guest):
    proc, path = running
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    r = ctl(path, "query-status")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["status"] == "running"

    r = ctl(path, "query-devices")
    (dev,) = json.loads(r.stdout)
    assert dev["id"] == "echo0" and dev["placement"] == "isolated" and dev["state"] == "running"

    r = ctl("--table", path, "query-regions", "bus=pio", "device=echo0")
    assert r.returncode == 0, r.stderr
    header, row = r.stdout.splitlines()
    assert header.split() == ["bus", "start", "length", "owner", "device", "refcount", "removing", "refused"]
    assert row.split()[:3] == ["pio", "0x1000", "0x100"] and "echo0" in row

    deadline = time.monotonic() + 60
    while json.loads(ctl(path, "query-stats", "device=echo0").stdout)[0]["accesses"]["pio"]["read"] < 50:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    r = ctl("--table", path, "query-stats")
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["id", "pio-r", "pio-w"]
    echo = next(line for line in lines if line.startswith("echo0"))
    assert echo.split()[1:3] == ["50", "50"]
    r = ctl("--table", path, "query-status")
    assert "running" in r.stdout and "thread-id" in r.stdout

    assert ctl(path, "stop").returncode == 0
    assert json.loads(ctl(path, "query-status").stdout)["status"] == "paused"
    assert ctl(path, "cont").returncode == 0
    assert json.loads(ctl(path, "query-status").stdout)["status"] == "running"

    # QMP errors: status 1 and the error on stderr.
    r = ctl(path, "no-such-command")
    assert r.returncode == 1 and "CommandNotFound: The command no-such-command has not been found" in r.stderr
    r = ctl(path, "query-regions", "bus=isa")
    assert r.returncode == 1 and "GenericError" in r.stderr
    r = ctl(path, "query-status", "justaword")
    assert r.returncode == 2 and "key=value" in r.stderr

    # A second VM may not take a live socket.
    r = vmm_run("--guest", str(guest("hello")), "--api", path, "--serial", "none")
    assert r.returncode == 2 and "another process is serving this socket" in r.stderr, r.stderr

    r = ctl(path, "quit")
    assert r.returncode == 0 and json.loads(r.stdout) == {}
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 12, err
    assert "quit through the control socket" in err
    assert not os.path.exists(path)
    r = ctl(path, "query-status")
    assert r.returncode == 3 and r.stderr.strip() == (f"vmm ctl: no control socket at {path} "
                                                      f"(is the VM running with --api {path}?)")


def test_ctl_on_a_stale_socket_and_run_replacing_it(guest):
    d = tempfile.mkdtemp(prefix="ctls-", dir="/tmp")
    try:
        path = os.path.join(d, "api.sock")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        s.close()                   # a socket file nobody serves
        r = ctl(path, "query-status")
        assert r.returncode == 3 and "nobody serves" in r.stderr
        # vmm run replaces a stale socket; the guest ends the run itself.
        r = vmm_run("--guest", str(guest("hello")), "--api", path, "--serial", "none")
        assert r.returncode == (0x21 << 1) | 1, r.stderr
        assert not os.path.exists(path)
        r = vmm_run("--guest", str(guest("hello")), "--api", "/nonexistent-dir/api.sock", "--serial", "none")
        assert r.returncode == 2 and "--api /nonexistent-dir/api.sock" in r.stderr
        long = os.path.join(d, "x" * 110)
        r = vmm_run("--guest", str(guest("hello")), "--api", long, "--serial", "none")
        assert r.returncode == 2 and "longer than the 107 bytes" in r.stderr
        assert not os.path.exists(long)
    finally:
        shutil.rmtree(d, ignore_errors=True)
