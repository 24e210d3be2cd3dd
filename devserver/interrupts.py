"""Interrupts of a device process: irqfds asked of the VMM over the control
socket (ipc.protocol, "interrupts" block).

:class:`IrqClient` sends a request and waits for its answer.  Once the
runtime's control thread reads the socket, it hands answers over
(:meth:`IrqClient.on_answer`) and the asking thread -- typically the
serving thread inside an access handler, e.g. an MSI-X table write --
waits on an event; the VMM answers on its monitor thread, never on the
vCPU that waits for this access, so this cannot deadlock.  Before the
control thread runs (the model's ``start()`` during the handshake) and on
the control thread itself (a reset rebuilding the model), the client reads
the socket in line; a message that is not its answer is kept for the
control loop (:meth:`take_deferred`).

:class:`RemoteLine` and :class:`RemoteMsi` are what a model gets from
:meth:`devserver.host.RemoteHost.irq_line` / ``msi_vector``: ``trigger``
writes the eventfd (the VMM is not on that path).  Masking and pending
bits (MSI-X Vector Control, PBA) are the model's business: it does not
trigger a masked vector and sets its PBA bit instead.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from devices.base import HostRefused
from ipc.protocol import (
    IRQ_ANSWERS,
    CoalescedMmioRemoveRequest,
    CoalescedMmioRequest,
    IoeventfdRemoveRequest,
    IoeventfdRequest,
    ConnectionClosed,
    IrqGranted,
    IrqLineRequest,
    IrqRefused,
    Message,
    MsiRouteRequest,
    MsiUnrouteRequest,
)
from ipc.batch import BatchError, BatchReader
from ipc.transport import ChannelTimeout

log = logging.getLogger(__name__)

#: How long a request may wait for the VMM's answer.
REQUEST_TIMEOUT = 5.0


class IrqUnavailable(HostRefused):
    """The VMM refused an interrupt or ioeventfd request, or did not
    answer it (what a model catches is :class:`devices.base.HostRefused`)."""


class IrqClient:
    """Request/answer over the control socket (see the module docstring)."""

    def __init__(self, send: Callable[[Message], None], receive: Callable[[float], Message | ConnectionClosed],
                 timeout: float = REQUEST_TIMEOUT):
        self._send = send
        self._receive = receive
        self.timeout = timeout
        self._seq = itertools.count(1)
        self._lock = threading.Lock()
        self._waiting: dict[int, list] = {}       # seq -> [event, answer]
        self._deferred: collections.deque[Message | ConnectionClosed] = collections.deque()
        #: The thread that reads the socket once the device runs (set by
        #: the runtime); None while the handshake still reads it in line.
        self.reader: threading.Thread | None = None
        self._fds: set[int] = set()
        #: The batch segment the VMM delivers coalesced writes through
        #: (ipc.batch), once it gave one.
        self.batch: BatchReader | None = None

    def request(self, make: Callable[[int], Message]) -> Message:
        """Send ``make(seq)`` and return the VMM's answer to it (IrqGranted
        or IrqDone); raises IrqUnavailable for a refusal or no answer."""
        seq = next(self._seq) & 0xFFFF_FFFF
        msg = make(seq)
        reader = self.reader
        if reader is None or reader is threading.current_thread() or not reader.is_alive():
            answer = self._request_in_line(msg)
        else:
            answer = self._request_waiting(msg)
        if isinstance(answer, IrqRefused):
            raise IrqUnavailable(f"the VMM refused {msg.TYPE}: {answer.message}")
        if isinstance(answer, IrqGranted):
            with self._lock:
                self._fds.add(answer.fd)
        return answer

    def _request_waiting(self, msg: Message) -> Message:
        slot: list = [threading.Event(), None]
        with self._lock:
            self._waiting[msg.seq] = slot  # type: ignore[attr-defined]
        try:
            self._send(msg)
            if not slot[0].wait(self.timeout):
                raise IrqUnavailable(f"no answer to {msg.TYPE} within {self.timeout:g} s")
        finally:
            with self._lock:
                self._waiting.pop(msg.seq, None)  # type: ignore[attr-defined]
        return slot[1]

    def _request_in_line(self, msg: Message) -> Message:
        self._send(msg)
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise ChannelTimeout()
                got = self._receive(left)
            except ChannelTimeout:
                raise IrqUnavailable(f"no answer to {msg.TYPE} within {self.timeout:g} s") from None
            if isinstance(got, IRQ_ANSWERS) and got.seq == msg.seq:  # type: ignore[attr-defined]
                return got
            if isinstance(got, IRQ_ANSWERS):
                self._orphan(got)
                continue
            self._deferred.append(got)
            raise IrqUnavailable(f"{type(got).__name__} arrived before the answer to {msg.TYPE}")

    def on_answer(self, msg: Message) -> None:
        """Called by the control thread with each IrqGranted/IrqDone/IrqRefused."""
        with self._lock:
            slot = self._waiting.get(msg.seq)  # type: ignore[attr-defined]
            if slot is not None:
                slot[1] = msg
                slot[0].set()
                return
        self._orphan(msg)

    def _orphan(self, msg: Message) -> None:
        log.warning("late or unknown interrupt answer %s (seq %d); dropped",
                    msg.TYPE, msg.seq)  # type: ignore[attr-defined]
        if isinstance(msg, IrqGranted):
            os.close(msg.fd)

    def take_deferred(self) -> Message | ConnectionClosed | None:
        """A message read in line that was not an answer, for the control loop."""
        return self._deferred.popleft() if self._deferred else None

    def forget(self, fd: int) -> None:
        """Close a granted eventfd the model no longer uses."""
        with self._lock:
            if fd not in self._fds:
                return
            self._fds.discard(fd)
        os.close(fd)

    def close(self) -> None:
        """Close every granted eventfd (teardown)."""
        with self._lock:
            fds, self._fds = self._fds, set()
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass


class RemoteLine:
    """An irqchip input of the VMM's in-kernel irqchip: its irqfd."""

    def __init__(self, client: IrqClient, gsi: int):
        answer = client.request(lambda seq: IrqLineRequest(seq, gsi))
        if not isinstance(answer, IrqGranted):
            raise IrqUnavailable(f"the VMM answered irq-line {gsi} without an eventfd")
        self.gsi = gsi
        self._fd = answer.fd

    def trigger(self) -> None:
        os.eventfd_write(self._fd, 1)


class RemoteMsi:
    """An MSI vector: a KVM MSI route the VMM programs on request, and its
    irqfd.  A trigger before the first program() is dropped (logged)."""

    def __init__(self, client: IrqClient, index: int):
        self._client = client
        self.index = index
        self._fd: int | None = None

    def program(self, address: int, data: int) -> None:
        """Route it to ``address``/``data`` (the guest's MSI-X table entry)."""
        answer = self._client.request(lambda seq: MsiRouteRequest(seq, self.index, address, data))
        if not isinstance(answer, IrqGranted):
            raise IrqUnavailable(f"the VMM answered msi-route {self.index} without an eventfd")
        old, self._fd = self._fd, answer.fd
        if old is not None:
            self._client.forget(old)

    def unprogram(self) -> None:
        """Drop the route (its eventfd is closed)."""
        self._client.request(lambda seq: MsiUnrouteRequest(seq, self.index))
        old, self._fd = self._fd, None
        if old is not None:
            self._client.forget(old)

    def trigger(self) -> None:
        fd = self._fd
        if fd is None:
            log.debug("MSI vector %d triggered before it was programmed; dropped", self.index)
            return
        os.eventfd_write(fd, 1)


class RemoteDoorbell:
    """An ioeventfd the VMM bound on request (ipc.protocol, "ioeventfds"):
    the device polls :attr:`fd`; :meth:`remove` asks the VMM to unbind it
    and closes it."""

    def __init__(self, client: IrqClient, space: int, address: int, length: int,
                 datamatch: int | None):
        self._client = client
        self._fields: dict[str, Any] = dict(space=space, address=address, length=length,
                            datamatch=datamatch or 0, match=datamatch is not None)
        answer = client.request(lambda seq: IoeventfdRequest(seq, **self._fields))
        if not isinstance(answer, IrqGranted):
            raise IrqUnavailable(f"the VMM answered ioeventfd {address:#x} without an eventfd")
        self.fd = answer.fd
        os.set_blocking(self.fd, False)

    def remove(self) -> None:
        fd, self.fd = self.fd, -1
        if fd < 0:
            return
        try:
            self._client.request(lambda seq: IoeventfdRemoveRequest(seq, **self._fields))
        except IrqUnavailable as e:
            log.warning("removing ioeventfd %#x: %s", self._fields["address"], e)
        finally:
            self._client.forget(fd)


def request_zone(client: IrqClient, address: int, length: int) -> None:
    """Ask the VMM to coalesce guest writes to ``[address, address +
    length)`` (a region this device has registered); raises
    IrqUnavailable when refused.  An answer that carries the batch
    segment (feature ``coalesced-batch``) maps it as :attr:`IrqClient.batch`
    the first time; later copies are closed."""
    answer = client.request(lambda seq: CoalescedMmioRequest(seq, address, length))
    if isinstance(answer, IrqGranted):
        if client.batch is None:
            try:
                client.batch = BatchReader(answer.fd)
            except (BatchError, OSError, ValueError) as e:
                client.forget(answer.fd)
                remove_zone(client, address)
                raise IrqUnavailable(f"the VMM's batch segment: {e}") from None
        client.forget(answer.fd)     # mapped (or a copy): the descriptor is not needed


def remove_zone(client: IrqClient, address: int) -> None:
    """Ask the VMM to drop the coalesced zone at ``address`` (a refusal or
    no answer is logged: the VMM drops every zone of the device at its end)."""
    try:
        client.request(lambda seq: CoalescedMmioRemoveRequest(seq, address))
    except IrqUnavailable as e:
        log.warning("removing coalesced zone %#x: %s", address, e)
