"""Attaching to a device that runs as a service: ``--device
KIND,connect=PATH`` (the service is ``devserver serve``, devserver/service.py).

The VMM connects to the service's listening socket (``AF_UNIX
SOCK_SEQPACKET``) and runs the same handshake as with a device it spawns
(:meth:`vmm.remote.endpoint.RemoteEndpoint.attach`): it sends the memory
table, the registry and slot segments, and the placement it decided (PCI
slot, BAR windows, id); the service adds the model's own parameters.  What
differs is supervision: the device is not this VMM's child, so there is no
pidfd -- the end of the control stream is its end, and stopping it means
hanging up (:class:`vmm.remote.peer.SocketPeer`), after which the service
listens again.  It is never signalled.

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
import socket

from ipc.registry import Registry
from vmm.config import ConfigError
from vmm.endpoint import DeviceFailed
from vmm.remote.endpoint import RemoteEndpoint
from vmm.remote.options import RemoteOptions
from vmm.remote.peer import SocketPeer

__all__ = ["connect", "attach_service", "CONNECT_TIMEOUT"]

log = logging.getLogger(__name__)

#: How long connect() may wait for room in the service's backlog.
CONNECT_TIMEOUT = 5.0


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
    peer = SocketPeer(sock, 0)
    try:
        endpoint = RemoteEndpoint.attach(sock, peer, kind, params, owner, name, registry, nvcpus, options)
    except DeviceFailed as e:
        reason = str(e).removeprefix(f"device {name}: ")
        if reason.startswith("refused: "):
            raise ConfigError(f"device {name}: the service at {path} refused: {reason[9:]}") from None
        raise ConfigError(f"device {name}: the service at {path}: {reason}") from None
    endpoint.service_path = path
    peer.pid = endpoint.sender_pid
    log.info("device %s: attached to the service at %s, pid %d (it reports %d)", name, path, peer.pid,
             endpoint.reported_pid)
    return endpoint
