"""Where a device service's listening socket comes from: socket activation
(``$LISTEN_FDS``) or a path of its own (``--listen PATH``).

Socket activation (``man 3 sd_listen_fds``): the manager passes the
sockets as descriptors 3, 4, ... (``SD_LISTEN_FDS_START``), says how many
in ``$LISTEN_FDS``, which process they are meant for in ``$LISTEN_PID``
(a child that inherited the variables must not take them), and their
names (``FileDescriptorName=``) as a colon-separated ``$LISTEN_FDNAMES``.
The variables are removed once read, as ``sd_listen_fds(1)`` does.

The control protocol is one frame per packet with descriptors
(:mod:`ipc.transport`), so the socket must be ``AF_UNIX SOCK_SEQPACKET``
and listening: ``ListenSequentialPacket=`` in a socket unit,
``systemd-socket-activate --seqpacket`` by hand.  Anything else is
refused with a line that says what was found.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from collections.abc import MutableMapping

__all__ = ["ActivationError", "Listener", "SD_LISTEN_FDS_START", "CONTROL_NAME", "listen_fds",
           "from_environ", "bind"]

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3
#: The ``FileDescriptorName=`` of the control socket (systemd/ units).
CONTROL_NAME = "control"
BACKLOG = 8


class ActivationError(Exception):
    """No usable listening socket: the message says why."""


class Listener:
    """The listening control socket of a device service."""

    def __init__(self, sock: socket.socket, where: str, path: str | None = None):
        self.sock = sock
        #: How to name it in logs and STATUS= (a path, or ``fd 3``).
        self.where = where
        #: The path this process bound and removes at close (None: not ours).
        self.path = path
        self._ino: tuple[int, int] | None = None
        if path is not None:
            st = os.stat(path)
            self._ino = (st.st_dev, st.st_ino)

    def close(self) -> None:
        """Close the socket; remove its path if this process made it and
        it is still the same file."""
        self.sock.close()
        if self.path is not None and self._ino is not None:
            try:
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self._ino:
                    os.unlink(self.path)
            except OSError:
                pass
            self.path = None


def listen_fds(environ: MutableMapping[str, str] | None = None, unset: bool = True,
               pid: int | None = None) -> list[tuple[int, str]]:
    """``(fd, name)`` of every descriptor socket activation passed to this
    process (empty when none was, or they are meant for another pid)."""
    env = os.environ if environ is None else environ
    count, owner, names = env.get("LISTEN_FDS"), env.get("LISTEN_PID"), env.get("LISTEN_FDNAMES")
    if unset:
        for key in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            env.pop(key, None)
    if not count:
        return []
    me = os.getpid() if pid is None else pid
    try:
        n, target = int(count), int(owner or "")
    except ValueError:
        raise ActivationError(f"LISTEN_FDS={count!r} LISTEN_PID={owner!r}: not numbers") from None
    if target != me:
        log.info("LISTEN_PID=%d is not this process (%d): ignoring LISTEN_FDS", target, me)
        return []
    if not 1 <= n <= 64:
        raise ActivationError(f"LISTEN_FDS={n}: expected 1 to 64 descriptors")
    fd_names = names.split(":") if names else []
    if fd_names and len(fd_names) != n:
        raise ActivationError(f"LISTEN_FDNAMES names {len(fd_names)} descriptor(s), LISTEN_FDS says {n}")
    out = []
    for i in range(n):
        fd = SD_LISTEN_FDS_START + i
        try:
            os.set_inheritable(fd, False)
        except OSError as e:
            raise ActivationError(f"LISTEN_FDS={n} but descriptor {fd} is not open ({e.strerror})") from None
        out.append((fd, fd_names[i] if fd_names else "unknown"))
    return out


def _check_listening(sock: socket.socket, where: str) -> None:
    if sock.family != socket.AF_UNIX:
        raise ActivationError(f"{where} is not an AF_UNIX socket (family {sock.family!r})")
    if sock.type != socket.SOCK_SEQPACKET:
        kind = {socket.SOCK_STREAM: "SOCK_STREAM", socket.SOCK_DGRAM: "SOCK_DGRAM"}.get(sock.type, str(sock.type))
        raise ActivationError(f"{where} is a {kind} socket; the control protocol needs SOCK_SEQPACKET "
                              "(ListenSequentialPacket= in the socket unit, or systemd-socket-activate --seqpacket)")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise ActivationError(f"{where} is not listening (Accept=no wants a listening socket)")


def from_environ(environ: MutableMapping[str, str] | None = None, pid: int | None = None) -> Listener | None:
    """The control socket socket activation passed (the one named
    ``control``, or the only one), or None when there is none."""
    fds = listen_fds(environ, pid=pid)
    if not fds:
        return None
    named = [fd for fd, name in fds if name == CONTROL_NAME]
    if len(named) == 1:
        fd = named[0]
    elif len(fds) == 1:
        fd = fds[0][0]
    else:
        raise ActivationError(f"{len(fds)} descriptors passed and none (or several) named {CONTROL_NAME!r} "
                              f"(names: {', '.join(name for _, name in fds)})")
    for other, _ in fds:
        if other != fd:
            os.close(other)
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        raise ActivationError(f"descriptor {fd}: {e.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise ActivationError(f"descriptor {fd} from socket activation is not a socket")
    sock = socket.socket(fileno=fd)
    try:
        _check_listening(sock, f"descriptor {fd} from socket activation")
    except ActivationError:
        sock.close()
        raise
    return Listener(sock, f"fd {fd}")


def bind(path: str, mode: int = 0o600) -> Listener:
    """Listen on ``path`` (``AF_UNIX SOCK_SEQPACKET``, mode ``mode``).  A
    stale socket left there by a dead service is replaced; one that a live
    service listens on is not."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        try:
            _bind(sock, path, mode)
        except FileExistsError:
            _remove_stale(path)
            _bind(sock, path, mode)
        sock.listen(BACKLOG)
    except ActivationError:
        sock.close()
        raise
    except OSError as e:
        sock.close()
        raise ActivationError(f"--listen {path}: {e.strerror or e}") from None
    return Listener(sock, path, path)


def _bind(sock: socket.socket, path: str, mode: int) -> None:
    # The socket is made with no permissions at all, then given ``mode``:
    # nobody can connect between bind and chmod.
    old = os.umask(0o777)
    try:
        sock.bind(path)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise FileExistsError(errno.EEXIST, "exists", path) from None
        raise
    finally:
        os.umask(old)
    os.chmod(path, mode)


def _remove_stale(path: str) -> None:
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise ActivationError(f"--listen {path}: exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        pass        # nobody listens: a dead service's socket
    except OSError as e:
        if e.errno != errno.EPROTOTYPE:
            raise ActivationError(f"--listen {path}: exists, and probing it failed: {e.strerror}") from None
        raise ActivationError(f"--listen {path}: a socket of another type is listening there") from None
    else:
        raise ActivationError(f"--listen {path}: another service is listening there")
    finally:
        probe.close()
    os.unlink(path)
