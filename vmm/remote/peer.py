"""What sits at the far end of a device's control channel, as the endpoint
supervises it.

:class:`vmm.remote.endpoint.RemoteEndpoint` talks to a device through a
connected control socket and the access slots; how the device *process* is
watched, stopped and described is a :class:`Peer`.  A child this VMM
spawned is a :class:`vmm.remote.process.DeviceProcess` (a pidfd says when
it exits, SIGKILL stops it); a device reached by connecting to a listening
socket is a :class:`SocketPeer` (the end of the control stream is its end,
hanging up stops it).
"""

from __future__ import annotations

import select
import socket
from typing import Protocol

__all__ = ["Peer", "SocketPeer"]


class Peer(Protocol):
    """The device process behind one control channel."""

    #: Its pid as this VMM knows it (0: unknown, e.g. not our child).
    pid: int

    @property
    def exit_fd(self) -> int | None:
        """A descriptor that polls readable once the process is gone; None:
        the end of the control stream is the end of the device."""

    def kill(self) -> None:
        """Stop the device at once (no grace); safe to call again."""

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the device to end; True once
        it has."""

    def exit_text(self, wait: float) -> str:
        """How the device ended, for an error line (waits up to ``wait``)."""

    def close(self) -> None:
        """Release what watching it holds (idempotent)."""


class SocketPeer:
    """A device this VMM did not start, reached over ``sock``: its end is the
    end of the stream; stopping it means hanging up.  ``pid``: what the
    caller knows of it (SO_PEERCRED, say), 0 if nothing."""

    exit_fd = None

    def __init__(self, sock: socket.socket, pid: int = 0):
        self.pid = pid
        self._sock = sock

    def kill(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass    # already hung up or closed

    def wait(self, timeout: float) -> bool:
        poller = select.poll()
        try:
            poller.register(self._sock, select.POLLRDHUP)
            events = poller.poll(max(0, int(timeout * 1000)))
        except (OSError, ValueError):
            return True     # closed under us
        return any(ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL)
                   for _fd, ev in events)

    def exit_text(self, wait: float) -> str:
        return "hung up" if self.wait(wait) else "still connected"

    def close(self) -> None:
        pass    # the control channel owns the socket
