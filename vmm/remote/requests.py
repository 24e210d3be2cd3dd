"""The VMM's service of what a device asks for on its control channel:
interrupt pins, MSI routes, ioeventfds and coalesced-MMIO zones (see
ipc.protocol).

One handler per request type, in a table (:attr:`RequestService.handlers`);
each validates the request, acts on the VM and returns the answer.  A
refusal is logged and answered (IrqRefused); it does not cut the device
off.  The service runs on the endpoint's monitor thread, or during the
handshake for requests the model makes from its ``start()``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ipc.protocol import CoalescedMmioRemoveRequest, CoalescedMmioRequest
from ipc.protocol import (IRQ_REQUESTS, IoeventfdRemoveRequest, IoeventfdRequest, IrqDone, IrqGranted,
                          IrqLineRequest, IrqRefused, Message, MsiRouteRequest, MsiUnrouteRequest)
from vmm.coalesce import CoalesceRefused, DeviceZones
from vmm.ioevent import DeviceIoeventfds, IoeventfdRefused
from vmm.irq import DeviceIrqs, IrqError

__all__ = ["RequestService"]

log = logging.getLogger(__name__)

Handler = Callable[[Message], Message]


class RequestService:
    """Answers one device's interrupt requests.

    ``irqs``/``ioevents``: what the device may be given (None: nothing, every
    request is refused); ``send``: sends the answer; ``stopping``: True once
    the device is cut off or closing (requests are refused then, except
    removals, which teardown does anyway); ``on_send_error``: called with
    the reason when an answer cannot be sent while not stopping;
    ``zones``: the device's coalesced-MMIO zones (None: refused), and
    ``batch_fd``: the descriptor of its batch segment to answer a granted
    zone with, or None to answer IrqDone (no batches).
    """

    def __init__(self, name: str, irqs: DeviceIrqs | None, ioevents: DeviceIoeventfds | None, *,
                 send: Callable[[Message], None], stopping: Callable[[], bool],
                 on_send_error: Callable[[str], None], zones: DeviceZones | None = None,
                 batch_fd: Callable[[], int | None] = lambda: None):
        self.name = name
        self.irqs = irqs
        self.ioevents = ioevents
        self.zones = zones
        self._batch_fd = batch_fd
        self._send = send
        self._stopping = stopping
        self._on_send_error = on_send_error
        #: {request type: handler returning the answer}.
        self.handlers: dict[type[Message], Handler] = {
            IrqLineRequest: self._pin,
            MsiRouteRequest: self._route,
            MsiUnrouteRequest: self._unroute,
            IoeventfdRequest: self._add_ioeventfd,
            IoeventfdRemoveRequest: self._remove_ioeventfd,
            CoalescedMmioRequest: self._add_zone,
            CoalescedMmioRemoveRequest: self._remove_zone,
        }
        assert set(self.handlers) == set(IRQ_REQUESTS), "a request type without a handler"

    def serve(self, msg: Message) -> None:
        """Answer one request (one of ``handlers``)."""
        seq = msg.seq  # type: ignore[attr-defined]
        answer: Message
        try:
            if self.irqs is None:
                raise IrqError("this VMM gives the device no interrupts")
            answer = self.handlers[type(msg)](msg)
        except (IrqError, IoeventfdRefused, CoalesceRefused, OSError) as e:
            log.warning("device %s: %s refused: %s", self.name, msg.TYPE, e)
            answer = IrqRefused(seq, str(e)[:1000] or type(e).__name__)
        try:
            self._send(answer)
        except Exception as e:
            if not self._stopping():
                self._on_send_error(f"cannot answer {msg.TYPE}: {e}")

    # -- handlers ------------------------------------------------------------

    def _live_irqs(self) -> DeviceIrqs:
        if self._stopping():
            raise IrqError("the device is cut off or closing")
        assert self.irqs is not None    # checked by serve()
        return self.irqs

    def _live_ioevents(self) -> DeviceIoeventfds:
        self._live_irqs()
        if self.ioevents is None:
            raise IrqError("this VMM gives the device no ioeventfds")
        return self.ioevents

    def _pin(self, msg: Message) -> Message:
        assert isinstance(msg, IrqLineRequest)
        return IrqGranted(msg.seq, self._live_irqs().pin(msg.gsi))

    def _route(self, msg: Message) -> Message:
        assert isinstance(msg, MsiRouteRequest)
        return IrqGranted(msg.seq, self._live_irqs().program(msg.index, msg.address, msg.data))

    def _unroute(self, msg: Message) -> Message:
        assert isinstance(msg, MsiUnrouteRequest)
        self._live_irqs().unprogram(msg.index)
        return IrqDone(msg.seq)

    def _add_ioeventfd(self, msg: Message) -> Message:
        assert isinstance(msg, IoeventfdRequest)
        fd = self._live_ioevents().add(msg.space, msg.address, msg.length,
                                       msg.datamatch if msg.match else None)
        return IrqGranted(msg.seq, fd)

    def _remove_ioeventfd(self, msg: Message) -> Message:
        assert isinstance(msg, IoeventfdRemoveRequest)
        if self._stopping():
            return IrqDone(msg.seq)     # released with the rest at teardown
        self._live_ioevents().remove(msg.space, msg.address, msg.length,
                                     msg.datamatch if msg.match else None)
        return IrqDone(msg.seq)

    def _add_zone(self, msg: Message) -> Message:
        assert isinstance(msg, CoalescedMmioRequest)
        self._live_irqs()
        if self.zones is None:
            raise IrqError("this VMM gives the device no coalesced MMIO")
        self.zones.add(msg.address, msg.length)
        fd = self._batch_fd()
        return IrqDone(msg.seq) if fd is None else IrqGranted(msg.seq, fd)

    def _remove_zone(self, msg: Message) -> Message:
        assert isinstance(msg, CoalescedMmioRemoveRequest)
        if not self._stopping() and self.zones is not None:    # else released at teardown
            self.zones.remove(msg.address)
        return IrqDone(msg.seq)
