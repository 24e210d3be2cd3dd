"""Host files and sockets a model uses, opened before a device process's
sandbox.

Inside the sandbox nothing can be opened or created (no ``open``, no
``socket``, an empty root), so a model that needs a host file or a
listening socket declares it (:meth:`devices.base.Device.host_resources`,
from its parameters) and takes it with :func:`open_file` /
:func:`listen_unix` instead of ``os.open`` / ``socket``: in a sandboxed
device process the runtime opened it beforehand (:func:`preopen`) and the
call hands over that descriptor; anywhere else (inline, tests) the call
opens it itself, so the model does not know where it runs."""

from __future__ import annotations

import dataclasses
import os
import socket
import stat

#: What a model may declare.
FILE = "file"
LISTEN_UNIX = "listen-unix"


@dataclasses.dataclass(frozen=True)
class HostResource:
    """A host file or listening socket a model declares (:meth:`devices.base.Device.host_resources`)."""

    what: str       # FILE or LISTEN_UNIX
    path: str
    #: os.open flags (FILE)
    flags: int = 0


_opened: dict[HostResource, int | socket.socket] = {}


def open_file(path: str, flags: int) -> int:
    """A descriptor on host file ``path`` (the caller owns it); OSError."""
    fd = _opened.pop(HostResource(FILE, path, flags), None)
    return fd if isinstance(fd, int) else os.open(path, flags)


def listen_unix(path: str, backlog: int = 1) -> socket.socket:
    """A Unix stream socket listening on ``path`` (a stale socket file is
    replaced); OSError."""
    s = _opened.pop(HostResource(LISTEN_UNIX, path), None)
    if isinstance(s, socket.socket):
        return s
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)         # a stale socket of an earlier run
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.bind(path)
        s.listen(backlog)
    except OSError:
        s.close()
        raise
    return s


def preopen(resources: tuple[HostResource, ...]) -> set[int]:
    """Open ``resources`` now, for the model to take later; returns their
    descriptors (to keep open).  OSError names the path."""
    out = set()
    for r in resources:
        if r.what == FILE:
            fd = os.open(r.path, r.flags)
            _opened[r] = fd
            out.add(fd)
        elif r.what == LISTEN_UNIX:
            s = listen_unix(r.path)
            _opened[r] = s
            out.add(s.fileno())
        else:
            raise ValueError(f"unknown host resource {r.what!r}")
    return out
