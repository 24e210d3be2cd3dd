"""The VMM's side of the fork server (:mod:`devserver.forkserver`): start
it, ask it for device processes, learn how they ended.  Standard library
only, so that the ``vmm`` command can start it before its own imports
(:mod:`vmm.entry`).

:meth:`ForkServer.start` execs ``python -m devserver.forkserver --fd N``
with nothing of the VMM's but that socket (stdin and stdout /dev/null,
stderr the VMM's unless that is a terminal, a session of its own; the
server closes any other descriptor left inheritable first thing), so it
may be started at any time, before or after guest RAM is mapped.
:meth:`ForkServer.spawn` hands it a device's command line and two
descriptors and returns its pid and a pidfd, which
:class:`vmm.remote.forked.ForkedProcess` turns into the same kind of
:class:`vmm.remote.peer.Peer` as an exec'd device process; the exit
status, which the server (its parent, which reaps it) reports on the
socket, comes from :meth:`ForkServer.status`.

A server that has died, or that refuses, raises :class:`ForkServerError`;
:meth:`DeviceProcess.start` then falls back to an exec.
"""

from __future__ import annotations

import os
import sys
import time

TYPE_CHECKING = False       # typing's own import (~5 ms with re) is not paid before the server starts
if TYPE_CHECKING:
    import socket
    from collections.abc import Mapping, Sequence

__all__ = ["ForkServer", "ForkServerError", "FORKSERVER_COMMAND", "FORKSERVER_ENV", "spawn_server"]

#: ``SPLITVMM_FORKSERVER=1``: a vmm.Machine forks its device processes
#: from a fork server by default (``vmm run`` always does).
FORKSERVER_ENV = "SPLITVMM_FORKSERVER"
#: How the fork server is started (``--fd N`` is appended).  (``-c`` would
#: skip runpy's imports, ~1 ms, but ``ps`` and the tests know the server by
#: its ``-m devserver.forkserver``.)
FORKSERVER_COMMAND: tuple[str, ...] = (sys.executable, "-m", "devserver.forkserver")
#: How long a request may take (the server forks at once; it may still be
#: importing when the first request comes).
REQUEST_TIMEOUT = 30.0


class ForkServerError(Exception):
    """The fork server is gone or refused a request."""


def spawn_server(command: Sequence[str] = FORKSERVER_COMMAND) -> tuple[int, int]:
    """Exec the fork server; its pid and our end of its socket (a
    descriptor, for :meth:`ForkServer.adopt`).  Only ``os`` and ``_socket``:
    the ``vmm`` command calls this first thing, before its imports
    (``subprocess``, ``socket``, ``threading`` and what they import are
    ~5 ms the server would otherwise start later).  ``posix_spawn``: the
    child is a vfork, it execs at once; it gets the socket (inheritable
    for the exec only), /dev/null as stdin and stdout, stderr the
    caller's unless that is a terminal, a session of its own; what else
    the caller may have left inheritable the server closes first thing."""
    import _socket

    ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    try:
        fd = theirs.fileno()
        os.set_inheritable(fd, True)
        actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                   (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)]
        if os.isatty(2):
            actions.append((os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0))
        pid = os.posix_spawn(command[0], [*command, "--fd", str(fd)], os.environ,
                             file_actions=actions, setsid=True)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return pid, ours.detach()


class _ServerProcess:
    """The server's process, as much of ``subprocess.Popen`` as is used:
    pid, returncode, kill, wait (through a pidfd)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None
        self._pidfd = os.pidfd_open(pid)

    def kill(self) -> None:
        if self.returncode is None:
            import signal
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except OSError:
                pass

    def wait(self, timeout: float | None = None) -> int:
        """Its exit status; TimeoutError after ``timeout`` seconds."""
        if self.returncode is None:
            if timeout is not None:
                import select
                poller = select.poll()
                poller.register(self._pidfd, select.POLLIN)
                if not poller.poll(max(0, int(timeout * 1000))):
                    raise TimeoutError(f"the fork server (pid {self.pid}) still runs")
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
            os.close(self._pidfd)
        return self.returncode


class ForkServer:
    """One running fork server and the reader of its socket."""

    def __init__(self, proc: _ServerProcess, sock: socket.socket):
        import threading

        self._proc = proc
        self._sock = sock
        self._lock = threading.Lock()           # one request at a time
        self._cond = threading.Condition()
        self._replies: list[dict] = []
        self._status: dict[int, int] = {}       # pid -> wait status
        self._dead: str | None = None
        self._used = False
        self._reader = threading.Thread(target=self._read, name="forkserver", daemon=True)
        self._reader.start()

    @classmethod
    def start(cls, command: Sequence[str] = FORKSERVER_COMMAND) -> ForkServer:
        return cls.adopt(*spawn_server(command))

    @classmethod
    def adopt(cls, pid: int, fd: int) -> ForkServer:
        """The client of a server :func:`spawn_server` started (it takes
        the descriptor)."""
        import socket

        try:
            proc = _ServerProcess(pid)
        except BaseException:
            os.close(fd)
            raise
        return cls(proc, socket.socket(fileno=fd))

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def alive(self) -> bool:
        return self._dead is None

    def spawn(self, argv: Sequence[str], channel: int, stderr: int,
              env: Mapping[str, str] | None = None) -> tuple[int, int]:
        """Fork a device process running ``devserver`` with ``argv`` (its
        ``--fd`` names ``channel``), its stderr on ``stderr``, ``env`` its
        environment (None: the server's, which was the VMM's); its pid and
        a pidfd of it.  The caller keeps (and closes) its descriptors."""
        import json
        import socket

        request: dict = {"argv": list(argv)}
        if env is not None:
            request["env"] = dict(env)
        with self._lock:
            if self._dead is not None:
                raise ForkServerError(self._dead)
            self._used = True
            try:
                socket.send_fds(self._sock, [json.dumps(request).encode()], [channel, stderr])
            except OSError as e:
                raise ForkServerError(f"the fork server is gone: {e}") from None
            reply = self._reply(time.monotonic() + REQUEST_TIMEOUT)
        if "pid" not in reply or not isinstance(reply["pid"], int) or reply["pid"] <= 0:
            raise ForkServerError(f"the fork server refused: {reply.get('error', reply)}")
        pid = reply["pid"]
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as e:    # our server's child, not yet reaped by it unless reported
            raise ForkServerError(f"pidfd_open({pid}): {e}") from None
        return pid, pidfd

    def status(self, pid: int, timeout: float) -> int | None:
        """The wait status of child ``pid`` once the server reports it
        (within ``timeout`` seconds), else None."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while pid not in self._status and self._dead is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return self._status.get(pid)

    def close(self) -> None:
        """Hang up (the server leaves) and reap it.  A server never asked
        for a process (a run that ended early, or had no device process)
        may still be importing: it is killed, not waited for."""
        import socket

        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if not self._used and self._proc.returncode is None:
            self._proc.kill()
        try:
            self._proc.wait(5.0)
        except TimeoutError:
            self._proc.kill()
            self._proc.wait()
        self._reader.join(5.0)
        self._sock.close()

    def _reply(self, deadline: float) -> dict:
        with self._cond:
            while not self._replies:
                if self._dead is not None:
                    raise ForkServerError(self._dead)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ForkServerError("the fork server does not answer")
                self._cond.wait(left)
            return self._replies.pop(0)

    def _read(self) -> None:
        import json     # here, not at the top: the vmm command starts the server before its own imports

        why = "the fork server has exited"
        try:
            while True:
                data = self._sock.recv(4096)
                if not data:
                    break
                msg = json.loads(data)
                if not isinstance(msg, dict):
                    raise ValueError(f"not an object: {msg!r}")
                with self._cond:
                    if "exit" in msg:
                        self._status[int(msg["exit"])] = int(msg["status"])
                    else:
                        self._replies.append(msg)
                    self._cond.notify_all()
        except (OSError, ValueError, TypeError, KeyError) as e:
            why = f"the fork server's socket failed: {e}"
        with self._cond:
            self._dead = why
            self._cond.notify_all()
