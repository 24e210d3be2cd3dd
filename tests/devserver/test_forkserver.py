"""The fork server (devserver.forkserver, vmm.forkserver) on real
processes: what a forked device holds, how its end is reported, what a
bad request gets, and what happens when either side goes away.  The
sandbox of forked devices is tests/devserver/test_sandbox.py's (run for
both launchers); restarts through it, tests/vmm/test_restart_forkserver.py."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import time

import pytest

from devserver.forkserver import CHANNEL_FD
from devserver.runtime import EXIT_PROTOCOL
from ipc.protocol import Hello, Role, Welcome
from ipc.transport import Channel
from ipc.transport import socketpair
from vmm.forkserver import ForkServer, ForkServerError
from vmm.remote import DEVSERVER_COMMAND
from vmm.remote.forked import ForkedProcess
from vmm.remote.process import DeviceProcess

from tests.waiting import poll


@pytest.fixture
def server():
    s = ForkServer.start()
    yield s
    s.close()


def fds_of(pid: int) -> dict[int, str]:
    """``pid``'s open descriptors and what they are; one closed between the
    listing and its readlink (a file the server's preload opens while it
    imports) is left out: a descriptor held for good is always there."""
    out = {}
    for n in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(n)] = os.readlink(f"/proc/{pid}/fd/{n}")
        except FileNotFoundError:
            pass
    return out


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def spare(server: ForkServer, log_fd: int) -> tuple[socket.socket, ForkedProcess]:
    """A forked ``devserver --spare``: it waits for our Hello, no deadline."""
    ours, theirs = socketpair()
    try:
        proc = DeviceProcess.start([*DEVSERVER_COMMAND, "--spare"], theirs, "spare", stderr=log_fd,
                                   forkserver=server)
    except BaseException:
        ours.close()
        raise
    assert isinstance(proc, ForkedProcess)
    return ours, proc


@contextlib.contextmanager
def hung_up_at_the_end(sock: socket.socket, proc: DeviceProcess):
    """On leaving: our end of ``proc``'s socket closed, the device seen to
    leave for it (within 20 s), its handle closed."""
    try:
        yield
    finally:
        sock.close()
        assert proc.wait(20)
        proc.close()


def test_a_forked_device_holds_its_own_descriptors_only(server, tmp_path):
    """Two devices from one server: each has /dev/null as stdin and stdout,
    the stderr it was given, its own control socket as fd 3, and nothing
    else -- not the server's socket, not the server's pidfd of the other
    device, not the other request's descriptors; it is the server's child
    and runs in a session of its own."""
    log = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        a, pa = spare(server, log)
        b, pb = spare(server, log)
    finally:
        os.close(log)
    try:
        for sock, proc in ((a, pa), (b, pb)):
            chan = Channel(sock, Role.VMM)      # once it answers, it runs the device's code
            chan.send(Hello())
            assert isinstance(chan.receive(20), Welcome)
            assert parent_of(proc.pid) == server.pid
            assert os.getsid(proc.pid) == proc.pid
            fds = fds_of(proc.pid)
            assert fds[0] == fds[1] == os.devnull
            assert fds[2] == str(tmp_path / "log")
            assert set(fds) == {0, 1, 2, CHANNEL_FD}, fds
        assert fds_of(pa.pid)[CHANNEL_FD] != fds_of(pb.pid)[CHANNEL_FD]
    finally:
        for sock, proc in ((a, pa), (b, pb)):
            sock.close()
            proc.kill()
            proc.wait(10)
            proc.close()


def test_exit_status_comes_from_the_server(server):
    """A device whose VMM hangs up in the handshake exits with
    EXIT_PROTOCOL; one killed dies of SIGKILL; both as an exec'd device's
    Popen would say."""
    sock, proc = spare(server, 2)
    Channel(sock, Role.VMM).send(Hello())
    sock.close()
    assert proc.wait(20)
    assert proc.returncode == EXIT_PROTOCOL, proc.exit_text(0)
    sock, proc = spare(server, 2)
    try:
        assert not proc.wait(0.05)
        proc.kill()
        assert proc.wait(20)
        assert proc.returncode == -signal.SIGKILL
        assert proc.exit_text(0) == "killed by SIGKILL"
    finally:
        sock.close()
        proc.close()


def test_a_bad_request_is_refused_and_the_server_goes_on(server):
    """Not JSON, the wrong descriptors, argv not strings: one error reply
    each (ForkServerError); the next good request is served."""
    raw = server._sock
    r, w = os.pipe()
    try:
        for data, fds in ((b"not json", [r, w]), (json.dumps({"argv": [1]}).encode(), [r, w]),
                          (json.dumps({"argv": []}).encode(), [r])):
            with server._lock:
                socket.send_fds(raw, [data], fds)
                reply = server._reply(time.monotonic() + 30)
            assert "error" in reply and "pid" not in reply, reply
    finally:
        os.close(r)
        os.close(w)
    with pytest.raises(ForkServerError, match="refused"):
        _refused(server)
    sock, proc = spare(server, 2)
    sock.close()
    assert proc.wait(20)
    proc.close()


def _refused(server: ForkServer) -> None:
    """A request the server refuses, through the public call: argv must be
    strings (sent as the server receives it)."""
    r, w = os.pipe()
    try:
        server.spawn([1], r, w)        # type: ignore[list-item]
    finally:
        os.close(r)
        os.close(w)


def test_the_server_leaves_when_the_vmm_hangs_up():
    s = ForkServer.start()
    pid = s.pid
    s.close()
    assert not os.path.exists(f"/proc/{pid}")       # it left and was reaped (close() waited)
    with pytest.raises(ForkServerError):
        s.spawn(["--spare"], 0, 2)


def test_a_dead_server_means_exec(caplog):
    """Its death is noticed; the next device is exec'd, with a warning."""
    s = ForkServer.start()
    try:
        os.kill(s.pid, signal.SIGKILL)
        assert poll(lambda: not s.alive)
        ours, theirs = socketpair()
        caplog.set_level(logging.WARNING, logger="vmm.remote.process")
        proc = DeviceProcess.start([*DEVSERVER_COMMAND, "--spare"], theirs, "late", stderr=2, forkserver=s)
        with hung_up_at_the_end(ours, proc):
            assert not isinstance(proc, ForkedProcess)
            assert parent_of(proc.pid) == os.getpid()
            assert any("the slow way" in r.getMessage() for r in caplog.records)
    finally:
        s.close()


def test_a_forked_device_has_the_environment_of_the_request(server, registry, monkeypatch):
    """The environment is the VMM's at the request, not the server's at its
    start (an exec'd device's would be): here the measurement switch of
    the sandbox (SPLITVMM_SANDBOX_LAYERS) set after the server started."""
    from devserver.sandbox import ONLY_ENV
    from vmm.remote import RemoteEndpoint, RemoteOptions

    monkeypatch.setenv(ONLY_ENV, "preload,fds")
    ep = RemoteEndpoint.spawn("echo", {"pio": "0x5000"}, 2, "env0", registry, 1, RemoteOptions(forkserver=server))
    try:
        assert parent_of(ep.pid) == server.pid
        assert ep.sandbox.layers == ("preload", "fds")
    finally:
        ep.close()


def test_the_server_keeps_no_descriptor_its_starter_left_inheritable(tmp_path):
    """posix_spawn passes on whatever is inheritable; the server closes all
    of it but its socket before it imports anything of the devices'."""
    r, w = os.pipe()
    os.set_inheritable(w, True)
    leaked = os.readlink(f"/proc/self/fd/{w}")
    s = ForkServer.start()
    try:
        with open(tmp_path / "log", "wb") as log:
            ours, proc = spare(s, log.fileno())     # answered: the server is past its start
        with hung_up_at_the_end(ours, proc):
            held = fds_of(s.pid)
            assert leaked not in held.values(), held
            assert {0, 1, 2} <= set(held) and any(t.startswith("socket:") for t in held.values()), held
    finally:
        s.close()
        os.close(r)
        os.close(w)


def test_a_request_during_the_preload_waits_for_all_of_it(tmp_path):
    """The first request goes out as soon as the server is spawned, while it
    still imports: its child is forked once every model is imported (it
    maps virtio-blk's C part, which a spare without --preload never
    imports itself), so no device imports a model into pages of its own
    or keeps copies of what the server imported after forking it."""
    s = ForkServer.start()
    try:
        log = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            sock, proc = spare(s, log)
        finally:
            os.close(log)
        with hung_up_at_the_end(sock, proc):
            with open(f"/proc/{proc.pid}/maps") as f:
                maps = f.read()
            assert "_blkring_c" in maps
    finally:
        s.close()
