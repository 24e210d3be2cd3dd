"""The device host of a separate device process (``process=isolated``).

:class:`RemoteHost` implements :class:`devices.base.DeviceHost` over the
shared registry: a model claims and releases its regions there directly,
under the owner id the VMM gave this process, with no round trip to the
VMM, also from inside the handler of an access (a window that moves).
Interrupt lines and MSI vectors are irqfds the VMM hands over on request
(:mod:`devserver.interrupts`); triggering one is an eventfd write.  The
registry's errors reach the model as the :class:`devices.base.HostRefused`
family (:func:`devserver.regions.registry_refusal`).
"""

from __future__ import annotations

import os

from devices.base import (ConsoleFds, HostRefused, NotOffered, Space)
from devices.faults.apply import FaultyInterrupt
from devices.guestmem import GuestRam
from devserver.interrupts import IrqClient, RemoteDoorbell, RemoteLine, RemoteMsi, remove_zone, request_zone
from devserver.regions import RegistryHost, registry_refusal
from ipc import Bus, Registry, RegistryError




class RemoteHost(RegistryHost):
    """What a model running in a device process may ask of its host."""

    def __init__(self, registry: Registry, owner: int, console: ConsoleFds | None = None,
                 irq: IrqClient | None = None, memory: GuestRam | None = None,
                 pid: int | None = None):
        self._memory = memory
        self.registry = registry
        self.owner = owner
        #: The pid as the VMM sees it (a sandboxed device in a pid
        #: namespace of its own has another one there).
        self._pid = os.getpid() if pid is None else pid
        self._console = console
        self._irq = irq
        #: (space, start) -> length of the regions claimed with
        #: ``coalesce=True``; the VMM was asked for a zone over each when
        #: the host has a control channel (else they are plain regions).
        self.coalesced: dict[tuple[Space, int], int] = {}
        #: The regions claimed or adopted through this host, for
        #: :meth:`release_unadopted` (devices.base, "Snapshots").
        self.taken: set[tuple[Space, int]] = set()

    def claim(self, space: Space, start: int, length: int, cookie: int = 0, *,
              coalesce: bool = False) -> None:
        """Register the region; with ``coalesce`` (MMIO only) then ask the
        VMM for a coalesced zone over it (devserver.interrupts), or undo
        the registration and raise the refusal (IrqUnavailable)."""
        if coalesce and Space(space) != Space.MMIO:
            raise HostRefused(f"only MMIO regions can be coalesced, not {Space(space).name}")
        try:
            self.registry.register(Bus(int(space)), start, length, self.owner, cookie)
        except (RegistryError, ValueError) as e:
            raise registry_refusal(e) from None
        self.taken.add((Space(space), start))
        if not coalesce:
            return
        if self._irq is not None:
            try:
                request_zone(self._irq, start, length)
            except HostRefused:
                self.registry.unregister(Bus.MMIO, start, self.owner)
                raise
        self.coalesced[(Space.MMIO, start)] = length

    def release(self, space: Space, start: int) -> None:
        """Unregister the region (and have the VMM drop its zone, if any)."""
        if self.coalesced.pop((Space(space), start), None) is not None and self._irq is not None:
            remove_zone(self._irq, start)
        self.taken.discard((Space(space), start))
        try:
            self.registry.unregister(Bus(int(space)), start, self.owner)
        except (RegistryError, ValueError) as e:
            raise registry_refusal(e) from None

    def process_id(self) -> int:
        return self._pid

    def console(self) -> ConsoleFds | None:
        """The console the VMM passed (SetConsole), or None."""
        return self._console

    def _irq_client(self) -> IrqClient:
        if self._irq is None:
            raise NotOffered("this device host has no interrupt channel")
        return self._irq

    def irq_line(self, gsi: int) -> RemoteLine:
        """Asks the VMM for an irqfd on irqchip input ``gsi`` (raises
        :class:`devserver.interrupts.IrqUnavailable`, a HostRefused, when
        refused)."""
        return FaultyInterrupt(RemoteLine(self._irq_client(), gsi), self, 0)  # type: ignore[return-value]

    def msi_vector(self, index: int) -> RemoteMsi:
        """MSI vector ``index``; its route is asked for at program()."""
        return FaultyInterrupt(RemoteMsi(self._irq_client(), index), self, index)  # type: ignore[return-value]

    def guest_memory(self) -> GuestRam:
        """Guest RAM as mapped from the VMM's memory table."""
        if self._memory is None:
            raise NotOffered("the VMM gave this device no guest memory")
        return self._memory

    def ioeventfd(self, space: Space, address: int, length: int,
                  datamatch: int | None = None) -> RemoteDoorbell:
        """Asks the VMM to bind an ioeventfd (raises
        :class:`devserver.interrupts.IrqUnavailable` when refused)."""
        return RemoteDoorbell(self._irq_client(), int(space), address, length, datamatch)
