"""The doorbell thread of a virtio device: one ioeventfd per queue, polled.

The driver notifies a queue by writing its index at the queue's notify
address (virtio 1.2 §4.1.4.4).  :class:`Doorbells` asks the host for an
ioeventfd there (:meth:`devices.base.DeviceHost.ioeventfd`: KVM signals it
with no exit), polls them on threads of its own (one for all queues, or
``threads=N``: queue ``q`` on thread ``q % N``, so a device with several
queues can give each its own) and, under the device's lock, calls ``ring(queue, count)`` for each one that rang.  When
the addresses move (the guest moved the BAR) the owner calls
:meth:`Doorbells.bind` again, under the same lock; a host that refuses a
doorbell leaves the notifications to come as MMIO writes (served by the
transport just the same).
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable, Mapping

from devices.base import DeviceHost, Doorbell, HostRefused, Space

log = logging.getLogger(__name__)


class Doorbells:
    """The ioeventfds of one device and the thread that polls them."""

    def __init__(self, host: DeviceHost, lock: threading.RLock | threading.Lock, name: str,
                 length: int, ring: Callable[[int, int], None], threads: int = 1):
        self._host = host
        self._lock = lock
        self._name = name
        self._length = length
        self._ring = ring
        self._bells: dict[int, Doorbell] = {}     # queue -> doorbell
        self._bound: Mapping[int, int] | None = None
        self._refused = False
        self._stopped = threading.Event()
        self._wakes: list[int] = []
        self._nthreads = max(1, threads)
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start the polling threads (once the model starts: a model built
        only to check its parameters holds no descriptor)."""
        self._wakes = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(self._nthreads)]
        for i in range(self._nthreads):
            name = f"{self._name}-notify" + (f"{i}" if self._nthreads > 1 else "")
            t = threading.Thread(target=self._loop, args=(i,), name=name, daemon=True)
            self._threads.append(t)
            t.start()

    def stop(self) -> None:
        """Stop the thread and drop every doorbell (not under the lock)."""
        self._stopped.set()
        self._kick()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(5.0)
        with self._lock:
            self.drop()
        wakes, self._wakes = self._wakes, []
        for fd in wakes:
            os.close(fd)

    def bind(self, addresses: Mapping[int, int] | None) -> None:
        """One doorbell per queue at ``addresses`` (queue -> guest-physical
        MMIO address; None: none at all).  Lock held; also from inside
        the access handler that moved them."""
        if addresses == self._bound:
            return
        self.drop()
        if addresses is None or self._refused or self._stopped.is_set():
            return
        for q, addr in addresses.items():
            try:
                self._bells[q] = self._host.ioeventfd(Space.MMIO, addr, self._length)
            except HostRefused as e:
                log.info("%s: no ioeventfd for queue %d (%s); notifications come as MMIO writes",
                         self._name, q, e)
                self._refused = True
                break
        self._bound = dict(addresses)
        self._kick()

    def drop(self) -> None:
        """Remove every doorbell (lock held)."""
        bells, self._bells = self._bells, {}
        self._bound = None
        for bell in bells.values():
            try:
                bell.remove()
            except HostRefused as e:  # the host is going away
                log.debug("%s: removing a doorbell: %s", self._name, e)

    def _kick(self) -> None:
        """Make every thread look at the doorbells again."""
        for fd in self._wakes:
            os.eventfd_write(fd, 1)

    def _loop(self, part: int) -> None:
        """Thread ``part``: polls the doorbells of queues ``q % N ==
        part``; the set of descriptors is rebuilt only when woken (bind,
        drop, stop), not per doorbell."""
        n, wake = self._nthreads, self._wakes[part]
        watched: dict[int, int] = {}
        poller = None
        while not self._stopped.is_set():
            if poller is None:
                with self._lock:
                    watched = {bell.fd: q for q, bell in self._bells.items() if bell.fd >= 0 and q % n == part}
                poller = select.poll()
                poller.register(wake, select.POLLIN)
                for fd in watched:
                    poller.register(fd, select.POLLIN)
            try:
                events = poller.poll(1000)
            except (OSError, ValueError):
                poller = None
                continue
            for fd, ev in events:
                if fd == wake:
                    _drain(fd)              # the doorbells changed: look again
                    poller = None
                    continue
                if ev & select.POLLNVAL:
                    poller = None
                    continue
                with self._lock:
                    q = watched.get(fd)
                    if q is None:
                        continue
                    bell = self._bells.get(q)
                    if bell is None or bell.fd != fd:
                        poller = None
                        continue            # moved or dropped since we looked
                    rung = _drain(fd)       # the eventfd sums the guest's writes
                    if rung:
                        self._ring(q, rung)


def _drain(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except (BlockingIOError, OSError):
        return 0
