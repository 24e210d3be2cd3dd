"""The interface between a device model and whatever hosts it.

The same model runs inside the VMM (``process=inline``) or in a device
process (``process=isolated``); only the :class:`DeviceHost` differs.  Like
Firecracker's bus, a model is told the *offset* of an access inside one of
its regions, never the absolute address, plus the ``cookie`` it chose when
it claimed that region, so it can tell its windows apart.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from devices.guestmem import GuestRam


class Space(enum.IntEnum):
    """Address spaces, numbered as :class:`ipc.Bus` numbers them."""

    PIO = 0
    MMIO = 1
    PCI = 2


class DeviceError(Exception):
    """Base of the errors device models raise."""


class BadParameter(DeviceError):
    """A device parameter (from the command line or a config) is invalid."""


class Interrupt(Protocol):
    """One interrupt source a host handed to a model."""

    def trigger(self) -> None:
        """Signal it once (an edge; through an irqfd when isolated)."""


@dataclasses.dataclass(frozen=True)
class ConsoleFds:
    """The byte console a host hands a model (a UART's line): bytes the
    model sends go to ``output``, bytes it receives come from ``input``
    (-1: none).  The host owns both descriptors."""

    output: int
    input: int


class DeviceHost(Protocol):
    """What a model may ask of its host."""

    def claim(self, space: Space, start: int, length: int, cookie: int = 0,
              coalesce: bool = False) -> None:
        """Register ``[start, start + length)`` for this device.

        May be called from inside :meth:`Device.write` (a device that moves
        its own window).  Raises the registry's errors (overlap, full).
        ``coalesce`` (MMIO only): guest writes to the region may be queued
        by KVM and delivered later, in order, before any other access the
        device serves (coalesced MMIO; reads are never coalesced); raises
        :class:`DeviceError` when the host refuses it.  :meth:`release`
        removes the zone with the region."""

    def release(self, space: Space, start: int) -> None:
        """Unregister this device's region starting at ``start``."""

    def process_id(self) -> int:
        """The pid of the process the model runs in."""

    def console(self) -> ConsoleFds | None:
        """The console given to this device (``vmm run --serial``), or
        None.  Hosts without one may lack the method."""

    def irq_line(self, gsi: int) -> Interrupt:
        """An interrupt on the in-kernel irqchip's input ``gsi`` (ISA IRQ
        4 for COM1, or a PCI INTx line), for the model to trigger.
        Raises :class:`DeviceError` when the host refuses it (a pin
        outside 0-23, more pins than a device may hold)."""

    def msi_vector(self, index: int) -> MsiVector:
        """The model's MSI (MSI-X table entry) number ``index``: the host
        turns it into a KVM MSI route when the model programs it."""


    def guest_memory(self) -> GuestRam:
        """Guest RAM, by guest-physical address, bounds-checked
        (:class:`devices.guestmem.GuestRam`).  Raises
        :class:`DeviceError` when the host has none (a device process
        started without a memory table)."""

    def ioeventfd(self, space: Space, address: int, length: int,
                  datamatch: int | None = None) -> Doorbell:
        """A doorbell: an eventfd that KVM signals on each guest write of
        ``length`` bytes at ``address`` (inside a region this device has
        claimed; writes of ``datamatch`` only, when given), with no exit
        to the VMM.  The model polls :attr:`Doorbell.fd` and calls
        :meth:`Doorbell.remove` before the region moves or goes (also
        from inside an access handler).  Raises :class:`DeviceError` when
        refused (not this device's region, too many, no VM)."""


class Doorbell(Protocol):
    """One ioeventfd (:meth:`DeviceHost.ioeventfd`)."""

    #: The eventfd to poll (nonblocking; read it to consume the count).
    fd: int

    def remove(self) -> None:
        """Unbind it from the guest address and close the eventfd."""


class MsiVector(Interrupt, Protocol):
    """An MSI vector: program it with the address/data pair the guest
    wrote into the MSI-X table, then trigger it (PCI Local Bus 3.0 6.8,
    PCIe 6.0 7.7.2)."""

    def program(self, address: int, data: int) -> None:
        """Route this vector to ``address``/``data`` (a KVM MSI route).

        May be called from inside an access handler (an MSI-X table
        write); again to change the route.  The host refuses an address
        outside 0xFEExxxxx, or more routes than a device may hold, with a
        :class:`DeviceError`.  Program a complete entry (e.g. when the
        guest unmasks it), not each dword as it is written: a half-written
        address may be refused.  Masking and pending bits are the model's:
        it does not trigger a masked vector, it sets its PBA bit and
        triggers on unmask."""

    def unprogram(self) -> None:
        """Drop the route (a trigger after this is dropped)."""


class Device(abc.ABC):
    """Base class of device models.

    Subclasses set ``kind`` (the ``TYPE`` of ``--device TYPE,...``), parse
    their parameters in ``__init__`` (raising :class:`BadParameter`),
    claim their regions in :meth:`start`, and serve accesses.
    """

    kind = ""

    def __init__(self, host: DeviceHost, **params: str):
        self.host = host
        if params:
            raise BadParameter(f"{self.kind}: unknown parameter(s): {', '.join(sorted(params))}")

    def start(self) -> None:
        """Claim the device's initial regions."""

    @abc.abstractmethod
    def read(self, space: Space, cookie: int, offset: int, size: int) -> int:
        """Value of a ``size``-byte read at ``offset`` in region ``cookie``."""

    @abc.abstractmethod
    def write(self, space: Space, cookie: int, offset: int, size: int, value: int) -> None:
        """A ``size``-byte write of ``value`` at ``offset`` in region ``cookie``."""

    def stop(self) -> None:
        """Release what the device holds; called once, at teardown."""


def parse_int(kind: str, key: str, text: str) -> int:
    """An integer parameter (decimal or 0x-hex), or a clear error."""
    try:
        return int(text, 0)
    except ValueError:
        raise BadParameter(f"{kind}: {key}={text!r} is not an integer") from None
