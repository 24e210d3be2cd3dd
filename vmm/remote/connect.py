"""Attaching to a device that runs as a service: ``--device
KIND,connect=PATH`` (the service is ``devserver serve``, devserver/service.py).

The VMM connects to the service's listening socket (``AF_UNIX
SOCK_SEQPACKET``) and runs the same handshake as with a device it spawns
(:meth:`vmm.remote.endpoint.RemoteEndpoint.attach`): it sends the memory
table, the registry and slot segments, and the placement it decided (PCI
slot, BAR windows, id); the service adds the model's own parameters.  What
differs is supervision: the device is not this VMM's child.  The end of
the control stream is the end of the device as this VM knew it (the
service listens again for the next VM), so the endpoint watches the
stream, not the process (:class:`ServicePeer`, a
:class:`vmm.remote.peer.SocketPeer`).  Stopping it at once -- a device cut
off for a missed deadline, garbage, or holding the registry lock -- kills
its process through a pidfd, as for a child, but only while the
connection is up: a service serves one VM at a time, so until it hangs up
that process is this VM's device and nobody else's; its manager restarts
it behind the socket.  After it hung up, nothing is signalled.

Its pid is the kernel's word, not the device's: SO_PEERCRED on a
connecting socket names whoever called listen() (the service manager,
under a socket unit), so the socket has SO_PASSCRED instead and the pid
is the one the kernel attached to the device's Ready (the process that
sent it, in this VMM's pid namespace; the device cannot forge it without
CAP_SYS_ADMIN).  The pid the device reports in Ready is only shown.

Failures to attach (nothing listening, a refusal: kind mismatch, a
parameter on both sides, busy) are configuration errors: the run stops
before the guest starts, with status 2.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import socket

from ipc.registry import Registry
from vmm import sandbox_report
from vmm.config import ConfigError
from vmm.endpoint import DeviceFailed
from vmm.remote.endpoint import RemoteEndpoint
from vmm.remote.options import RemoteOptions
from vmm.remote.peer import SocketPeer

__all__ = ["connect", "attach_service", "ServicePeer", "CONNECT_TIMEOUT"]

log = logging.getLogger(__name__)

#: How long connect() may wait for room in the service's backlog.
CONNECT_TIMEOUT = 5.0


class ServicePeer(SocketPeer):
    """The process of a device service, reached over ``sock``: the stream's
    end is its end for this VM; :meth:`kill` also kills the process while
    the connection is up (module docstring)."""

    def __init__(self, sock: socket.socket):
        super().__init__(sock, 0)
        self._pidfd = -1
        self._killed = False
        #: Set once Ready (attach_service): the device's sandbox and name.
        self.sandbox: sandbox_report.DeviceSandbox | None = None
        self.name = "?"

    def adopt(self, pid: int) -> None:
        """Watch process ``pid`` (the kernel's word for who sent Ready)."""
        if pid <= 0:
            return
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as e:
            log.debug("pidfd_open(%d): %s", pid, e)
            return
        if super().wait(0):         # gone already: the pid may be someone else's by now
            os.close(pidfd)
            return
        self.pid, self._pidfd = pid, pidfd

    def kill(self) -> None:
        if self._pidfd >= 0 and not self._killed and not super().wait(0):
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
                self._killed = True
            except OSError as e:    # not ours to signal (another user): hanging up must do
                log.debug("device service pid %d: %s", self.pid, e)
        super().kill()

    def wait(self, timeout: float) -> bool:
        """Hung up -- and, once killed, dead (what frees a robust lock it held)."""
        if not self._killed:
            return super().wait(timeout)
        try:
            return bool(select.select([self._pidfd], [], [], max(0.0, timeout))[0])
        except (OSError, ValueError):
            return True

    def exit_text(self, wait: float) -> str:
        if self._killed:
            return "killed" if self.wait(wait) else "still running after SIGKILL"
        text = super().exit_text(wait)
        if text == "hung up" and self.sandbox is not None and self._dead(wait):
            # Not our child (no exit status): a seccomp kill is in the kernel log.
            call = sandbox_report.seccomp_death(self.name, self.sandbox)
            if call is not None:
                return f"hung up: killed by seccomp: {call}"
        return text

    def _dead(self, wait: float) -> bool:
        if self._pidfd < 0:
            return False
        try:
            return bool(select.select([self._pidfd], [], [], max(0.0, wait))[0])
        except (OSError, ValueError):
            return False

    def close(self) -> None:
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1


def connect(path: str, name: str, timeout: float = CONNECT_TIMEOUT) -> socket.socket:
    """A control socket connected to the service at ``path``; ConfigError
    (one line, naming the device) when there is none."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)    # the sender's pid on every packet
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as e:
        sock.close()
        why = {
            errno.ENOENT: "no such socket (is the service, or its socket unit, started?)",
            errno.ECONNREFUSED: "nothing listens there (the service is not running)",
            errno.EPROTOTYPE: "not a SOCK_SEQPACKET socket (devserver serve listens on one)",
            errno.ENOTSOCK: "not a socket",
            errno.EACCES: "permission denied",
        }.get(e.errno or 0, e.strerror or str(e))
        if isinstance(e, TimeoutError):
            why = f"the service's backlog stayed full for {timeout:g} s"
        raise ConfigError(f"device {name}: connect={path}: {why}") from None
    sock.settimeout(None)
    return sock


def attach_service(path: str, kind: str, params: dict[str, str], owner: int, name: str,
                   registry: Registry, nvcpus: int, options: RemoteOptions) -> RemoteEndpoint:
    """Connect to the service at ``path`` and return its endpoint once the
    device is Ready.  Raises ConfigError when it cannot be reached or
    refuses (the service's reason in the message)."""
    sock = connect(path, name, min(CONNECT_TIMEOUT, options.start_timeout))
    peer = ServicePeer(sock)
    try:
        endpoint = RemoteEndpoint.attach(sock, peer, kind, params, owner, name, registry, nvcpus, options)
    except DeviceFailed as e:
        reason = str(e).removeprefix(f"device {name}: ")
        if reason.startswith("refused: "):
            raise ConfigError(f"device {name}: the service at {path} refused: {reason[9:]}") from None
        raise ConfigError(f"device {name}: the service at {path}: {reason}") from None
    endpoint.service_path = path
    peer.adopt(endpoint.sender_pid)
    # The kernel's pid is the session's device process (the service forks
    # one per VM and sandboxes it): the lock watch finds the thread ids of
    # its pid namespace there, and a seccomp death is looked up by it.
    endpoint.sandbox = sandbox_report.for_service(endpoint.sandbox.layers, peer.pid)
    peer.sandbox = endpoint.sandbox
    peer.name = name
    log.info("device %s: attached to the service at %s, pid %d (it reports %d)", name, path, peer.pid,
             endpoint.reported_pid)
    return endpoint
