"""Helpers of the service-mode tests: a NOTIFY_SOCKET the test binds, device
services started by hand, under ``systemd-socket-activate`` or under the
test supervisor, and waits on their output (never sleeps).  A test takes
the ``services`` fixture (tests/conftest.py, a :class:`Services`) to have
what it started stopped and closed at its end, passed or failed."""

from __future__ import annotations

import os
import pathlib
import select
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

HERE = pathlib.Path(__file__).resolve().parent
SUPERVISOR = HERE / "supervisor.py"
DEVSERVER = (sys.executable, "-m", "devserver")
SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")
needs_socket_activate = pytest.mark.skipif(SOCKET_ACTIVATE is None,
                                           reason="systemd-socket-activate is not installed")


class NotifySocket:
    """A datagram socket playing the service manager's NOTIFY_SOCKET: a
    path in ``tmp`` or, with ``abstract``, a name in the abstract namespace."""

    def __init__(self, tmp: pathlib.Path, abstract: bool = False):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"splitvmm-test-notify-{os.getpid()}-{id(self):x}"
            self.sock.bind("\0" + name)
            self.env_value = "@" + name
        else:
            path = str(tmp / "notify.sock")
            self.sock.bind(path)
            self.env_value = path
        self.messages: list[dict[str, str]] = []

    def receive(self, timeout: float) -> dict[str, str] | None:
        if not select.select([self.sock], [], [], timeout)[0]:
            return None
        data = self.sock.recv(4096).decode()
        fields = dict(line.split("=", 1) for line in data.split("\n") if line)
        self.messages.append(fields)
        return fields

    def wait(self, pred, timeout: float = 20.0, what: str = "a notification") -> dict[str, str]:
        """The first message (from now on, or already received and not yet
        matched) for which ``pred(fields)`` holds."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {what} on NOTIFY_SOCKET; got {self.messages}")
            msg = self.receive(left)
            if msg is not None and pred(msg):
                return msg

    def close(self) -> None:
        self.sock.close()


class Output:
    """A pipe read by a thread: lines kept, waited on."""

    def __init__(self, pipe):
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe) -> None:
        for raw in pipe:
            with self._cond:
                self.lines.append(raw.rstrip("\n"))
                self._cond.notify_all()
        pipe.close()

    def wait(self, pred, timeout: float = 20.0, what: str = "a line") -> str:
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if pred(line):
                        return line
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {what}; got:\n" + "\n".join(self.lines))
                self._cond.wait(left)

    def count(self, pred) -> int:
        with self._cond:
            return sum(1 for line in self.lines if pred(line))

    def text(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def join(self, timeout: float = 10.0) -> None:
        self._thread.join(timeout)


class Service:
    """One process tree serving a device (whatever started it), with its
    stdout and stderr collected."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None):
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
        self.out = Output(self.proc.stdout)
        self.err = Output(self.proc.stderr)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            rc = self.proc.wait(5)
        self.out.join()
        self.err.join()
        return rc


def service_env(notify: NotifySocket | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_", "WATCHDOG_"))}
    if notify is not None:
        env["NOTIFY_SOCKET"] = notify.env_value
    env.update(extra)
    return env


def _started(svc: Service, pred, what: str) -> Service:
    """``svc`` once a line of its stderr satisfies ``pred``; stopped (not
    left behind) when none does."""
    try:
        svc.err.wait(pred, what=what)
    except BaseException:
        svc.stop()
        raise
    return svc


def serve_listen(spec: str, path: pathlib.Path, *args: str, env: dict[str, str] | None = None,
                 program: tuple[str, ...] = DEVSERVER) -> Service:
    """``devserver serve SPEC --listen PATH``; returns once it listens.
    ``program`` is what runs ``devserver`` (a wrapper that restricts it first,
    say)."""
    svc = Service([*program, "serve", spec, "--listen", str(path), *args], env=env or service_env())
    return _started(svc, lambda line: "listening on" in line, "the service listening")


def serve_activated(spec: str, path: pathlib.Path, *args: str, env_pass: dict[str, str] | None = None,
                    seqpacket: bool = True) -> Service:
    """``devserver serve SPEC`` under ``systemd-socket-activate``: the
    program is started at the first connection; returns once the
    activator listens."""
    assert SOCKET_ACTIVATE is not None      # needs_socket_activate skips without it
    argv = [SOCKET_ACTIVATE, "-l", str(path), "--fdname=control"]
    if seqpacket:
        argv.append("--seqpacket")
    for key, value in (env_pass or {}).items():
        argv.append(f"--setenv={key}={value}")
    svc = Service([*argv, *DEVSERVER, "serve", spec, *args], env=service_env())
    return _started(svc, lambda line: line.startswith("Listening on"), "systemd-socket-activate listening")


def supervised(spec: str, path: pathlib.Path, *args: str, restart: str = "on-failure",
               env: dict[str, str] | None = None, watchdog_sec: float = 0.0) -> Service:
    """``devserver serve SPEC`` under the test supervisor (socket held, the
    device re-executed with LISTEN_FDS when it dies; with ``watchdog_sec``
    it is also the NOTIFY_SOCKET and kills a device whose pings stop);
    returns once the first device process listens."""
    watchdog = ["--watchdog-sec", str(watchdog_sec), "--notify", f"{path}.notify"] if watchdog_sec else []
    svc = Service([sys.executable, str(SUPERVISOR), "--listen", str(path), "--restart", restart, *watchdog,
                   "--", *DEVSERVER, "serve", spec, *args], env=env or service_env())
    return _started(svc, lambda line: "listening on fd 3" in line, "the supervised service listening")


class Services:
    """What one test started (the ``services`` fixture): each service is
    stopped and each NotifySocket closed when the test ends, however it
    ends.  A test that checks how a service exits says
    ``assert svc.stop() == 0`` itself; stopping again is harmless."""

    def __init__(self, tmp: pathlib.Path):
        self.tmp = tmp
        self._services: list[Service] = []
        self._sockets: list[NotifySocket] = []

    def _keep(self, svc: Service) -> Service:
        self._services.append(svc)
        return svc

    def notify(self, abstract: bool = False) -> NotifySocket:
        """A NOTIFY_SOCKET in the test's temporary directory (see NotifySocket)."""
        sock = NotifySocket(self.tmp, abstract=abstract)
        self._sockets.append(sock)
        return sock

    def listen(self, spec: str, path: pathlib.Path, *args: str, **kw) -> Service:
        """serve_listen, stopped at the end."""
        return self._keep(serve_listen(spec, path, *args, **kw))

    def activated(self, spec: str, path: pathlib.Path, *args: str, **kw) -> Service:
        """serve_activated, stopped at the end."""
        return self._keep(serve_activated(spec, path, *args, **kw))

    def supervised(self, spec: str, path: pathlib.Path, *args: str, **kw) -> Service:
        """supervised, stopped at the end."""
        return self._keep(supervised(spec, path, *args, **kw))

    def close(self) -> None:
        for svc in reversed(self._services):
            svc.stop()
        for sock in self._sockets:
            sock.close()


def started_pids(svc: Service) -> list[int]:
    return [int(line.split()[1]) for line in svc.out.lines if line.startswith("started ")]


def connect(path: pathlib.Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(str(path))
    return s
