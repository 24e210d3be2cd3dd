"""The VMM's side of the fork server (:mod:`devserver.forkserver`): start
it, ask it for device processes, learn how they ended.  Standard library
only, so that the ``vmm`` command can start it before its own imports
(:mod:`vmm.entry`).

:meth:`ForkServer.start` execs ``python -m devserver.forkserver --fd N``
with nothing of the VMM's but that socket (stdin and stdout /dev/null,
stderr the VMM's unless that is a terminal, a session of its own), so it
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

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

__all__ = ["ForkServer", "ForkServerError", "FORKSERVER_COMMAND", "FORKSERVER_ENV"]

log = logging.getLogger(__name__)

#: ``SPLITVMM_FORKSERVER=1``: a vmm.Machine forks its device processes
#: from a fork server by default (``vmm run`` always does).
FORKSERVER_ENV = "SPLITVMM_FORKSERVER"
#: How the fork server is started (``--fd N`` is appended).
FORKSERVER_COMMAND: tuple[str, ...] = (sys.executable, "-m", "devserver.forkserver")
#: How long a request may take (the server forks at once; it may still be
#: importing when the first request comes).
REQUEST_TIMEOUT = 30.0


class ForkServerError(Exception):
    """The fork server is gone or refused a request."""


class ForkServer:
    """One running fork server and the reader of its socket."""

    def __init__(self, proc: subprocess.Popen, sock: socket.socket):
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
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            stderr = None if not os.isatty(2) else subprocess.DEVNULL
            proc = subprocess.Popen([*command, "--fd", str(theirs.fileno())], pass_fds=[theirs.fileno()],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                                    start_new_session=True)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return cls(proc, ours)

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
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if not self._used and self._proc.returncode is None:
            self._proc.kill()
        try:
            self._proc.wait(5.0)
        except subprocess.TimeoutExpired:
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
