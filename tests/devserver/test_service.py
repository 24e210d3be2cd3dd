"""``devserver serve`` as a process: socket activation (real
``systemd-socket-activate``), sd_notify to a socket the test binds, its
own ``--listen`` socket, and clients that are not VMMs.  Serving real VMs
is in tests/vmm/test_service_devices.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import msgpack
import pytest

from devices.kinds import kinds
from ipc.protocol import PROTOCOL_VERSION
from tests.devserver.servicekit import DEVSERVER, Service, connect, needs_socket_activate, service_env

ECHO = "echo,pio=0x1000"


def errors(svc: Service) -> list[str]:
    return [line for line in svc.err.lines if " ERROR: " in line]


def test_print_capabilities():
    r = subprocess.run([*DEVSERVER, "serve", "--print-capabilities"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    caps = json.loads(r.stdout)
    assert caps["type"] == "splitvmm-device"
    assert caps["protocol"]["version"] == PROTOCOL_VERSION
    assert set(caps["kinds"]) == set(kinds()) >= {"echo", "serial", "virtio-blk", "virtio-rng"}
    assert {"listen", "socket-activation", "sd-notify", "watchdog"} <= set(caps["features"])


@needs_socket_activate
def test_socket_activated_service_notifies_and_survives_garbage_clients(tmp_path, services):
    """Under systemd-socket-activate (fd 3, LISTEN_FDNAMES=control): READY
    with a status once listening, WATCHDOG at half of WATCHDOG_USEC,
    garbage refused with one line each while it keeps listening, STOPPING
    on SIGTERM."""
    notify = services.notify()
    path = tmp_path / "dev.sock"
    svc = services.activated(ECHO, path, "--handshake-timeout", "2",
                             env_pass={"NOTIFY_SOCKET": notify.env_value, "WATCHDOG_USEC": "300000"})
    first = connect(path)               # the activator execs the service at the first connection
    ready = notify.wait(lambda m: m.get("READY") == "1", what="READY=1")
    assert ready["STATUS"].startswith("listening on fd 3")
    first.send(b"\x00\x01 not a frame")
    svc.err.wait(lambda line: "handshake with the VMM failed" in line)
    assert first.recv(100) == b""       # hung up on
    first.close()
    # The session's own keep-alives (relayed while it waited for a
    # hello) may be queued before the status of its end.
    notify.wait(lambda m: "1 VM(s) served" in m.get("STATUS", ""), what="listening again")
    pings = [notify.wait(lambda m: m.get("WATCHDOG") == "1", what="WATCHDOG=1") for _ in range(3)]
    assert all("listening on fd 3" in p["STATUS"] for p in pings)
    # A well-framed message that is not a Hello, an unknown type, a
    # client that says nothing, one that leaves at once.
    for payload in (msgpack.packb({"type": "ready", "pid": 1}), msgpack.packb({"type": "nope"}), None, b""):
        with connect(path) as s:
            if payload:
                s.send(len(payload).to_bytes(4, "little") + payload)
            if payload is None:
                assert s.recv(100) == b""   # the handshake deadline cuts it off
    svc.err.wait(lambda line: line.count("listening again") >= 1 and "session 5" in line,
                 what="the fifth session ending")
    assert len(errors(svc)) == 5, svc.err.text()
    status = notify.wait(lambda m: "5 VM(s) served" in m.get("STATUS", ""), what="the status after 5 sessions")
    assert "listening" in status["STATUS"]
    svc.proc.terminate()
    notify.wait(lambda m: m.get("STOPPING") == "1", what="STOPPING=1")
    assert svc.stop() == 0


@needs_socket_activate
def test_a_stream_socket_from_activation_is_refused_with_one_line(tmp_path, services):
    path = tmp_path / "dev.sock"
    svc = services.activated(ECHO, path, seqpacket=False)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    assert svc.proc.wait(30) == 1
    svc.err.join()
    assert len(errors(svc)) == 1 and "SOCK_SEQPACKET" in errors(svc)[0], svc.err.text()
    s.close()


def test_listen_fds_meant_for_another_pid_are_not_taken(tmp_path):
    """LISTEN_PID names someone else (a variable inherited by mistake): the
    descriptors are not ours, and without --listen there is nothing to serve."""
    env = service_env(LISTEN_FDS="1", LISTEN_PID="1", LISTEN_FDNAMES="control")
    r = subprocess.run([*DEVSERVER, "serve", ECHO], env=env, capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 1
    assert "no listening socket" in r.stderr and r.stderr.count("ERROR") == 1, r.stderr


@pytest.mark.parametrize("spec, message", [
    ("nosuch", "unknown device type 'nosuch'"),
    ("tests.nosuch:Model", "cannot import tests.nosuch"),
    ("echo,pio", "is not key=value"),
    ("echo,id=blk", "id= is given by the VMM"),
    ("echo,pio=1,pio=2", "pio given twice"),
])
def test_bad_service_specs_exit_2_with_one_line(tmp_path, spec, message):
    r = subprocess.run([*DEVSERVER, "serve", spec, "--listen", str(tmp_path / "s")], capture_output=True,
                       text=True, timeout=60, env=service_env())
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "s").exists()


def test_listen_replaces_a_stale_socket_but_not_a_live_one(tmp_path, services):
    path = tmp_path / "dev.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(str(path))
    stale.close()                               # a dead service's socket file
    svc = services.listen(ECHO, path)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    r = subprocess.run([*DEVSERVER, "serve", ECHO, "--listen", str(path)], capture_output=True, text=True,
                       timeout=60, env=service_env())
    assert r.returncode == 1 and "another service is listening there" in r.stderr, r.stderr
    assert path.exists()                    # the live one's socket was left alone
    assert svc.stop() == 0
    assert not path.exists()                    # removed by the service that made it


@pytest.mark.parametrize("abstract", [False, True], ids=["notify-path", "notify-abstract"])
def test_sigterm_while_a_client_is_connected(tmp_path, services, abstract):
    notify = services.notify(abstract=abstract)
    path = tmp_path / "dev.sock"
    svc = services.listen(ECHO, path, env=service_env(notify))
    notify.wait(lambda m: m.get("READY") == "1")
    with connect(path):
        svc.err.wait(lambda line: "connected (session 1)" in line)
        svc.proc.terminate()
        notify.wait(lambda m: m.get("STOPPING") == "1")
        assert svc.proc.wait(30) == 0


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
