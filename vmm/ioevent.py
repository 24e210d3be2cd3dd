"""Doorbells: KVM ioeventfds a device asks for (ipc.protocol,
"ioeventfds" block; inline models through vmm.local).

A guest write to a doorbell address signals an eventfd inside KVM: no exit
to the VMM, no access forwarded -- the device polls the eventfd and does
the work (a virtqueue notify).  :class:`DeviceIoeventfds` is one device's
share, validated and bounded like :class:`vmm.irq.DeviceIrqs`: the range
must lie inside one region of the registry that this device owns (it
cannot steal another device's or the VMM's writes), the length is 1, 2, 4
or 8 bytes, a device holds at most :data:`MAX_IOEVENTFDS_PER_DEVICE`; a
bad request raises :class:`IoeventfdRefused` and changes nothing.
"""

from __future__ import annotations

import logging
import os
import threading

from ipc import Bus, Registry
from vmm import kvm
from vmm.endpoint import VmmError

log = logging.getLogger(__name__)

MAX_IOEVENTFDS_PER_DEVICE = 64
LENGTHS = frozenset((1, 2, 4, 8))
SPACE_PIO = 0
SPACE_MMIO = 1


class IoeventfdRefused(VmmError):
    """A device's ioeventfd request is invalid or over its limit."""


def _key(space: int, address: int, length: int, datamatch: int | None) -> tuple:
    return (space, address, length, datamatch)


class DeviceIoeventfds:
    """The ioeventfds of one device (registry owner ``owner``)."""

    def __init__(self, vm: kvm.Vm, registry: Registry, owner: int, name: str,
                 limit: int = MAX_IOEVENTFDS_PER_DEVICE):
        self.vm = vm
        self.registry = registry
        self.owner = owner
        self.name = name
        self.limit = limit
        self._lock = threading.Lock()
        self.bound: dict[tuple, int] = {}      # key -> eventfd (the VMM's copy)

    def _check(self, space: int, address: int, length: int, datamatch: int | None) -> None:
        if space not in (SPACE_PIO, SPACE_MMIO):
            raise IoeventfdRefused(f"ioeventfd space {space!r} (0 PIO, 1 MMIO)")
        if length not in LENGTHS:
            raise IoeventfdRefused(f"ioeventfd length {length!r} (1, 2, 4 or 8)")
        top = 0x1_0000 if space == SPACE_PIO else 1 << 64
        if type(address) is not int or not 0 <= address <= top - length:
            raise IoeventfdRefused(f"ioeventfd address {address!r} outside the address space")
        if datamatch is not None and not 0 <= datamatch < 1 << (8 * length):
            raise IoeventfdRefused(f"datamatch {datamatch:#x} is wider than {length} byte(s)")
        ref = self.registry.get(Bus(space), address, length)
        if ref is None:
            raise IoeventfdRefused(f"{Bus(space).name} {address:#x}+{length} is not a registered region")
        with ref:
            if ref.owner != self.owner:
                raise IoeventfdRefused(f"{Bus(space).name} {address:#x}+{length} belongs to another owner")
            if ref.offset + length > ref.length:
                raise IoeventfdRefused(f"{Bus(space).name} {address:#x}+{length} crosses the region's end")

    def add(self, space: int, address: int, length: int, datamatch: int | None = None) -> int:
        """Bind a new eventfd to guest writes at ``address`` and return it
        (this object keeps its own copy until :meth:`remove`)."""
        self._check(space, address, length, datamatch)
        key = _key(space, address, length, datamatch)
        with self._lock:
            if key in self.bound:
                return self.bound[key]
            if len(self.bound) >= self.limit:
                raise IoeventfdRefused(f"device {self.name} already holds {self.limit} ioeventfds")
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            try:
                self.vm.ioeventfd(fd, address, length, pio=space == SPACE_PIO, datamatch=datamatch)
            except kvm.KvmError as e:
                os.close(fd)
                raise IoeventfdRefused(str(e)) from None
            self.bound[key] = fd
        log.debug("device %s: ioeventfd %s %#x+%d -> eventfd %d", self.name, Bus(space).name, address,
                  length, fd)
        return fd

    def remove(self, space: int, address: int, length: int, datamatch: int | None = None) -> None:
        """Unbind one (nothing if it is not bound).  Needs no registry
        check: the region may already have moved away."""
        with self._lock:
            fd = self.bound.pop(_key(space, address, length, datamatch), None)
        if fd is not None:
            self._unbind(space, address, length, datamatch, fd)

    def _unbind(self, space: int, address: int, length: int, datamatch: int | None, fd: int) -> None:
        try:
            self.vm.ioeventfd(fd, address, length, pio=space == SPACE_PIO, datamatch=datamatch,
                              deassign=True)
        except kvm.KvmError as e:
            log.warning("device %s: %s", self.name, e)
        finally:
            os.close(fd)

    def release_all(self) -> None:
        with self._lock:
            bound, self.bound = self.bound, {}
        for (space, address, length, datamatch), fd in bound.items():
            self._unbind(space, address, length, datamatch, fd)
