"""The control socket: the thin part of the control protocol that does I/O.

A :class:`Channel` wraps one connected ``AF_UNIX`` ``SOCK_SEQPACKET``
socket (one frame per packet) and an :class:`ipc.protocol.Connection`:
``send`` packs a message and its descriptors into one ``sendmsg`` with
SCM_RIGHTS; ``receive`` waits (with a deadline) for the next message.

Descriptors: every descriptor that arrives is either carried out by a
message (and then belongs to whoever takes the message) or closed here:
truncated ancillary data, descriptors the protocol refuses, descriptors
still pending when the channel breaks or closes.  Nothing is leaked.
"""

from __future__ import annotations

import array
import errno
import logging
import math
import os
import select
import socket
import struct
import threading
import time

from ipc.protocol import (MAX_FDS, MAX_FRAME, NEED_DATA, Connection, ConnectionClosed, Message,
                          ProtocolError, RemoteProtocolError, Role)

__all__ = ["Channel", "ChannelTimeout", "ChannelClosed", "socketpair", "peer_credentials"]

log = logging.getLogger(__name__)

_PACKET = MAX_FRAME + 4
_INT = array.array("i")
#: struct ucred (pid, uid, gid), as SO_PEERCRED and SCM_CREDENTIALS give it.
_UCRED = struct.Struct("3i")


class ChannelTimeout(ProtocolError):
    """No whole message arrived before the deadline."""


class ChannelClosed(ProtocolError):
    """The channel was closed on this side."""


def socketpair() -> tuple[socket.socket, socket.socket]:
    """A connected pair for one control connection (both close-on-exec;
    pass one end to the child with ``pass_fds``)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` the kernel recorded for the other end of a
    connected ``AF_UNIX`` socket (SO_PEERCRED, ``man 7 unix``): on an
    accepted socket, the process that connected; on a connecting one, the
    process that called listen() -- under socket activation, the service
    manager.  ``(0, -1, -1)`` when unknown."""
    try:
        return _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    except OSError:
        return (0, -1, -1)


def close_fds(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class Channel:
    """One end of a control connection, playing ``role``."""

    def __init__(self, sock: socket.socket, role: Role):
        if sock.type != socket.SOCK_SEQPACKET:
            raise ValueError("the control socket must be AF_UNIX SOCK_SEQPACKET")
        self.sock = sock
        self.conn = Connection(role)
        #: With SO_PASSCRED set on the socket before the peer sends: the pid
        #: the kernel attached to the last packet received -- the process
        #: that sent it, in this side's pid namespace (it cannot be forged
        #: without CAP_SYS_ADMIN); 0 until one arrives, or without SO_PASSCRED.
        self.sender_pid = 0
        self._passcred = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED))
        self._ready: list[Message | ConnectionClosed] = []   # parsed, not yet returned
        self._closed = False
        # One thread may send (a device's serving thread asking for an
        # irqfd) while another receives: the protocol state changes under
        # this lock, never while a thread waits for the socket.
        self._conn_lock = threading.Lock()

    @classmethod
    def from_fd(cls, fd: int, role: Role) -> Channel:
        """Adopt an inherited socket descriptor (e.g. ``devserver --fd N``)."""
        sock = socket.socket(fileno=fd)
        if sock.family != socket.AF_UNIX:
            sock.detach()
            raise ValueError(f"fd {fd} is not an AF_UNIX socket")
        return cls(sock, role)

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def state(self):
        return self.conn.state

    def send(self, msg: Message) -> None:
        """Send ``msg`` (the descriptors it names stay open here)."""
        if self._closed:
            raise ChannelClosed("channel is closed")
        with self._conn_lock:
            data, fds = self.conn.send(msg)
            socket.send_fds(self.sock, [data], fds)

    def receive(self, timeout: float | None) -> Message | ConnectionClosed:
        """The next message, or ConnectionClosed at end of stream.

        Waits at most ``timeout`` seconds (None: forever) and raises
        :class:`ChannelTimeout`; raises :class:`RemoteProtocolError` for
        anything the peer got wrong (its descriptors are closed by then).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._conn_lock:
                if self._ready:
                    return self._ready.pop(0)
                try:
                    event = self.conn.next_event()
                except RemoteProtocolError:
                    close_fds(self.conn.take_unclaimed_fds())
                    raise
            if event is not NEED_DATA:
                return event  # type: ignore[return-value]
            self._wait_readable(deadline)
            self.receive_nowait()

    def receive_nowait(self) -> None:
        """Read one packet into the protocol (call when readable)."""
        if self._closed:
            raise ChannelClosed("channel is closed")
        try:
            if self._passcred:
                data, fds, flags = self._recv_with_credentials()
            else:
                data, fds, flags, _ = socket.recv_fds(self.sock, _PACKET, MAX_FDS,
                                                      socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except ConnectionResetError:
            # The peer closed with packets of ours unread (man 7 unix): the
            # kernel reports that once, ahead of what the peer sent before
            # closing -- a refusal's Error, say.  That is still queued, and
            # end of stream follows it.
            return
        with self._conn_lock:
            self._parse(data, fds, flags)

    def _recv_with_credentials(self) -> tuple[bytes, list[int], int]:
        """recv_fds, plus the SCM_CREDENTIALS the kernel adds under SO_PASSCRED."""
        data, ancdata, flags, _ = self.sock.recvmsg(
            _PACKET, socket.CMSG_SPACE(MAX_FDS * _INT.itemsize) + socket.CMSG_SPACE(_UCRED.size),
            socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT)
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level != socket.SOL_SOCKET:
                continue
            if kind == socket.SCM_RIGHTS:
                whole = len(payload) - len(payload) % _INT.itemsize
                fds.extend(array.array("i", payload[:whole]))
            elif kind == socket.SCM_CREDENTIALS and len(payload) >= _UCRED.size:
                self.sender_pid = _UCRED.unpack_from(payload)[0]
        return data, fds, flags

    def _parse(self, data: bytes, fds: list[int], flags: int) -> None:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            close_fds(fds)
            why = "a packet larger than a frame" if flags & socket.MSG_TRUNC else \
                f"more than {MAX_FDS} descriptors in one packet"
            self.conn.peer_error(f"peer sent {why}")
            close_fds(self.conn.take_unclaimed_fds())
            return
        self.conn.receive_data(data, fds)
        # One frame per packet: whatever the packet held is parsed now, so
        # a frame that does not end with its packet is garbage, not a wait.
        while True:
            try:
                event = self.conn.next_event()
            except RemoteProtocolError:
                break
            if event is NEED_DATA:
                if self.conn.buffered:
                    self.conn.peer_error(f"a packet holds a partial frame ({self.conn.buffered} bytes)")
                break
            assert isinstance(event, (Message, ConnectionClosed))
            self._ready.append(event)
            if isinstance(event, ConnectionClosed):
                break
        if self.conn.broken:
            close_fds(self.conn.take_unclaimed_fds())

    def _wait_readable(self, deadline: float | None) -> None:
        poller = select.poll()
        poller.register(self.sock, select.POLLIN | select.POLLHUP | select.POLLERR)
        while True:
            ms = None if deadline is None else max(0, math.ceil((deadline - time.monotonic()) * 1000))
            if poller.poll(ms):
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise ChannelTimeout("no message from the peer before the deadline")

    def shutdown(self) -> None:
        """Wake any thread blocked on this socket (it sees end of stream)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError as e:
            if e.errno not in (errno.ENOTCONN, errno.EBADF):
                raise

    def close(self) -> None:
        """Close the socket and every descriptor still pending."""
        if self._closed:
            return
        self._closed = True
        self.conn.receive_data(b"")
        close_fds(self.conn.take_unclaimed_fds())
        for event in self._ready:           # messages nobody took: their fds
            if isinstance(event, Message):
                close_fds(event.fds())
        self._ready.clear()
        self.sock.close()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
