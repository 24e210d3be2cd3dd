"""sd_notify(3) with the standard library: readiness, status, watchdog.

The protocol (``man 3 sd_notify``): the service manager names a datagram
socket in ``$NOTIFY_SOCKET`` -- a filesystem path, or a name in the
abstract namespace written with a leading ``@`` -- and the service sends it
datagrams of newline-separated ``KEY=VALUE`` assignments: ``READY=1`` once
it serves, ``STATUS=...`` (one line of free text shown by ``systemctl
status``), ``WATCHDOG=1`` keep-alives, ``STOPPING=1`` when it begins to
shut down.  With ``WatchdogSec=`` the manager also sets ``$WATCHDOG_USEC``
(and ``$WATCHDOG_PID``, the process meant), and restarts the service when
no keep-alive arrives within that time; ``sd_watchdog_enabled(3)``
recommends pinging at half of it.

Without ``$NOTIFY_SOCKET`` every call does nothing, so the same code runs
under systemd, under ``systemd-socket-activate`` and by hand.  A failed
send is logged once and never raised: the manager's troubles must not stop
a device from serving its VM (a lost keep-alive is then judged by the
manager, as it would judge a hung device).  Sends never block: a
datagram the manager's full queue has no room for is dropped.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, MutableMapping

__all__ = ["Notifier", "Watchdog", "watchdog_interval", "notify_address"]

log = logging.getLogger(__name__)

#: STATUS= text is cut to this many characters (systemd shows one line).
MAX_STATUS = 200


def notify_address(value: str) -> str | None:
    """The socket address that ``$NOTIFY_SOCKET`` names: a path, or an
    abstract name (``@name`` -> ``"\\0name"``); None for what this module
    does not speak (e.g. ``vsock:`` addresses of newer managers)."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None


def watchdog_interval(environ: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between keep-alives (half of ``$WATCHDOG_USEC``), or None
    when the watchdog is off or meant for another process
    (``$WATCHDOG_PID``)."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    owner = env.get("WATCHDOG_PID", "")
    if owner:
        try:
            if int(owner) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            log.warning("ignoring WATCHDOG_PID=%r (not a pid)", owner)
            return None
    if not usec:
        return None
    try:
        n = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r (not a number of microseconds)", usec)
        return None
    if n <= 0:
        return None
    return n / 2e6


class Notifier:
    """One connection to the service manager's notification socket (or to
    nothing, when ``address`` is None)."""

    def __init__(self, address: str | None):
        self.address = address
        self._sock: socket.socket | None = None
        self._warned = False
        if address is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            # Never wait: the keep-alives are sent from the loop that serves
            # the VM, and a manager whose queue is full must not stall it.
            sock.setblocking(False)
            self._sock = sock

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None, unset: bool = True) -> Notifier:
        """The notifier ``$NOTIFY_SOCKET`` asks for.  With ``unset`` the
        variable is removed, as ``sd_notify(unset_environment=1)`` does, so
        nothing this process starts talks to the manager in its name."""
        env = os.environ if environ is None else environ
        value = env.get("NOTIFY_SOCKET", "")
        if unset:
            env.pop("NOTIFY_SOCKET", None)
        if not value:
            return cls(None)
        address = notify_address(value)
        if address is None:
            log.warning("NOTIFY_SOCKET=%r: not a path or an @abstract name; not notifying", value)
        return cls(address)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, **fields: str | int) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines; True when it was sent
        (False when disabled or the send failed)."""
        if self._sock is None or self.address is None:
            return False
        lines = []
        for key, value in fields.items():
            text = str(value).replace("\n", " ")
            lines.append(f"{key}={text}")
        try:
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify the service manager at %r: %s", self.address.replace("\0", "@"), e)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        if status is None:
            return self.notify(READY=1)
        return self.notify(READY=1, STATUS=status[:MAX_STATUS])

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text[:MAX_STATUS])

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def stopping(self, status: str | None = None) -> bool:
        if status is None:
            return self.notify(STOPPING=1)
        return self.notify(STOPPING=1, STATUS=status[:MAX_STATUS])

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class Watchdog:
    """Keep-alives at a fixed interval, sent by whoever calls :meth:`tick`
    -- the loop whose health they vouch for: when it hangs, the pings stop.

    ``status`` (optional) gives the STATUS= text sent along with each ping,
    so ``systemctl status`` stays current without another timer."""

    def __init__(self, notifier: Notifier, interval: float | None,
                 status: Callable[[], str] | None = None, clock: Callable[[], float] = time.monotonic):
        self.notifier = notifier
        self.interval = interval
        self.status = status
        self._clock = clock
        self._due = 0.0
        #: Keep-alives sent so far.
        self.pings = 0

    @property
    def enabled(self) -> bool:
        return self.interval is not None and self.notifier.enabled

    def wait_slice(self, longest: float) -> float:
        """How long a loop may block before it must :meth:`tick` again."""
        if self.interval is None:
            return longest
        return min(longest, self.interval)

    def tick(self) -> None:
        """Ping when due (cheap otherwise: one clock read)."""
        if self.interval is None:
            return
        now = self._clock()
        if now < self._due:
            return
        self._due = now + self.interval
        fields: dict[str, str | int] = {"WATCHDOG": 1}
        if self.status is not None:
            fields["STATUS"] = self.status()[:MAX_STATUS]
        if self.notifier.notify(**fields):
            self.pings += 1
