"""In-process placement: device models and VMM handlers served inside the
VMM, with no hop.

* :class:`LocalHost` is the :class:`devices.base.DeviceHost` of a model
  placed ``process=inline``: claims and releases go straight to the
  shared registry under the device's owner id (exactly what a device
  process does on its side), the pid is the VMM's; interrupt lines and
  MSI vectors are irqfds from :class:`vmm.irq.DeviceIrqs`, the same
  kernel path a device process writes to.
* :class:`LocalEndpoint` is the endpoint the dispatcher calls for such a
  model: it calls the model's ``read``/``write``.  A model that raises is
  a failed device (:class:`DeviceFailed`), as a dead process would be.
  With the C exit loop the vCPU calls the model's methods itself
  (``STEP_LOCAL``, through the endpoint's ``c_forward``: vmm/vcpu.py)
  while no fault is armed on the endpoint's own points.
* :class:`VmmHandlers` is the endpoint of owner ``VMM_OWNER``: small
  handlers the VMM itself serves (test exit, power off, vCPU park,
  benchmark marks; addresses in :mod:`vmm.layout`).
"""

from __future__ import annotations

import logging
import os
from typing import Callable

from devices.base import (ConsoleFds, Device, HostRefused, NotOffered, Space, all_ones)
from devices.faults.apply import FaultyInterrupt, attach_engine, serve_access
from devices.faults.engine import FaultEngine
from devices.guestmem import GuestRam
from devserver.regions import RegistryHost, registry_refusal
from ipc import Bus, Registry, RegistryError
from vmm._kvm_c import ffi as _kvm_ffi
from vmm._kvm_c import lib as _kvm_lib
from vmm.coalesce import CoalescedMmio, CoalesceRefused, DeviceZones
from vmm.endpoint import VMM_OWNER, DeviceFailed
from vmm.ioevent import DeviceIoeventfds, IoeventfdRefused
from vmm.irq import DeviceIrqs, IrqError, IrqRouter, signal
from vmm.windows import Grant, OwnerWindows

log = logging.getLogger(__name__)
#: This process's pid, for ``process_id`` (the echo model reads it on
#: every access; os.getpid is a system call, ~0.2 us here).  Set again in
#: a forked child.
_PID = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _PID.__setitem__(0, os.getpid()))

_SPACES = {int(s): s for s in Space}
_BUSES = {s: Bus(int(s)) for s in Space}




class LocalHost(RegistryHost):
    """DeviceHost of an inline model: the registry, with its owner id."""

    def __init__(self, registry: Registry, owner: int, console: ConsoleFds | None = None,
                 irqs: DeviceIrqs | None = None, memory: GuestRam | None = None,
                 ioevents: DeviceIoeventfds | None = None, zones: DeviceZones | None = None):
        self.registry = registry
        self.owner = owner
        self._console = console
        self.irqs = irqs
        self._memory = memory
        self.ioevents = ioevents
        #: The device's coalesced-MMIO zones (None: this host has none).
        self.zones = zones
        #: (space, start) -> length of the regions claimed with
        #: ``coalesce=True`` (a zone each, when the host has zones).
        self.coalesced: dict[tuple[Space, int], int] = {}
        #: The regions claimed or adopted through this host, for
        #: :meth:`release_unadopted` (devices.base, "Snapshots").
        self.taken: set[tuple[Space, int]] = set()

    def guest_memory(self) -> GuestRam:
        """The VMM's own mapping of guest RAM, bounds-checked."""
        if self._memory is None:
            raise NotOffered("this host gives the device no guest memory")
        return self._memory

    def ioeventfd(self, space: Space, address: int, length: int,
                  datamatch: int | None = None) -> LocalDoorbell:
        if self.ioevents is None:
            raise NotOffered("this host has no ioeventfds")
        try:
            fd = self.ioevents.add(int(space), address, length, datamatch)
        except IoeventfdRefused as e:
            raise HostRefused(str(e)) from None
        return LocalDoorbell(self.ioevents, int(space), address, length, datamatch, fd)

    def claim(self, space: Space, start: int, length: int, cookie: int = 0, *,
              coalesce: bool = False) -> None:
        """Register the region; with ``coalesce`` (MMIO only) also as a KVM
        coalesced zone (vmm.coalesce) -- a plain region on a host without
        zones -- or neither when the zone is refused."""
        if coalesce and Space(space) != Space.MMIO:
            raise HostRefused(f"only MMIO regions can be coalesced, not {Space(space).name}")
        try:
            self.registry.register(_BUSES[Space(space)], start, length, self.owner, cookie)
        except (RegistryError, ValueError) as e:
            raise registry_refusal(e) from None
        self.taken.add((Space(space), start))
        if not coalesce:
            return
        if self.zones is not None:
            try:
                self.zones.add(start, length)
            except CoalesceRefused as e:
                self.registry.unregister(_BUSES[Space.MMIO], start, self.owner)
                raise HostRefused(str(e)) from None
        self.coalesced[(Space.MMIO, start)] = length

    def release(self, space: Space, start: int) -> None:
        """Unregister the region (and its coalesced zone, if it has one)."""
        if self.coalesced.pop((Space(space), start), None) is not None and self.zones is not None:
            self.zones.remove(start)
        self.taken.discard((Space(space), start))
        try:
            self.registry.unregister(_BUSES[Space(space)], start, self.owner)
        except (RegistryError, ValueError) as e:
            raise registry_refusal(e) from None

    def process_id(self) -> int:
        return _PID[0]

    def console(self) -> ConsoleFds | None:
        """The VMM's console (``--serial``) if this device was given it."""
        return self._console

    def _irqs(self) -> DeviceIrqs:
        if self.irqs is None:
            raise NotOffered("this host has no interrupt controller")
        return self.irqs

    def irq_line(self, gsi: int) -> LocalLine:
        try:
            line = LocalLine(self._irqs().pin(gsi))
        except IrqError as e:
            raise HostRefused(str(e)) from None
        return FaultyInterrupt(line, self, 0)  # type: ignore[return-value]  # the irq fault point

    def msi_vector(self, index: int) -> LocalMsi:
        return FaultyInterrupt(LocalMsi(self._irqs(), index), self, index)  # type: ignore[return-value]


class LocalDoorbell:
    """An ioeventfd of an inline model (the VMM's DeviceIoeventfds keeps
    the descriptor; remove() unbinds and closes it)."""

    def __init__(self, ioevents: DeviceIoeventfds, space: int, address: int, length: int,
                 datamatch: int | None, fd: int):
        self._ioevents = ioevents
        self._key = (space, address, length, datamatch)
        self.fd = fd

    def remove(self) -> None:
        if self.fd >= 0:
            self.fd = -1
            self._ioevents.remove(*self._key)


class LocalLine:
    """An irqchip input of an inline model: its irqfd."""

    def __init__(self, fd: int):
        self._fd = fd

    def trigger(self) -> None:
        signal(self._fd)


class LocalMsi:
    """An MSI vector of an inline model: a KVM MSI route and its irqfd
    once programmed; a trigger before that is dropped (logged)."""

    def __init__(self, irqs: DeviceIrqs, index: int):
        self._irqs = irqs
        self.index = index
        self._fd: int | None = None

    def program(self, address: int, data: int) -> None:
        try:
            self._fd = self._irqs.program(self.index, address, data)
        except IrqError as e:
            raise HostRefused(str(e)) from None

    def unprogram(self) -> None:
        self._fd = None
        self._irqs.unprogram(self.index)

    def trigger(self) -> None:
        fd = self._fd
        if fd is None:
            log.debug("MSI vector %d triggered before it was programmed; dropped", self.index)
            return
        signal(fd)


class LocalEndpoint:
    """A model running inside the VMM, behind the Endpoint interface."""

    def __init__(self, model: Device, owner: int, name: str, irqs: DeviceIrqs | None = None,
                 ioevents: DeviceIoeventfds | None = None, zones: DeviceZones | None = None):
        self.model = model
        self.owner = owner
        self.name = name
        self.irqs = irqs
        self.ioevents = ioevents
        self.zones = zones
        self._read = model.read
        self._write = model.write
        #: What the vCPU loop calls for a STEP_LOCAL access (vmm.vcpu).
        self.model_read = model.read
        self.model_write = model.write
        self._host = model.host
        #: ``struct svmm_forward *`` with ``local`` set (vmm/_vcpu.h): while
        #: it is on, the C exit loop hands this model's accesses to the vCPU
        #: loop as STEP_LOCAL, which calls :attr:`model_read` /
        #: :attr:`model_write` itself, and counts them in its cell (the
        #: device's statistics); off, they come through :meth:`access`.  On
        #: unless a fault is armed on the ``access`` or ``process`` point
        #: (they are served in :meth:`access`) or the endpoint is closed.
        self.c_forward = _kvm_ffi.new("struct svmm_forward *")
        self.c_forward.local = 1
        self._closed = False
        #: The device's fault engine (devices.faults; SILENT until attach_faults).
        self.fault_engine: FaultEngine = model.fault_engine
        self._sync_forward()

    @classmethod
    def create(cls, model_class: type[Device], params: dict[str, str], owner: int, name: str,
               registry: Registry, console: ConsoleFds | None = None,
               irq_router: IrqRouter | None = None, memory: GuestRam | None = None,
               coalesced: CoalescedMmio | None = None) -> LocalEndpoint:
        """Build the model on a :class:`LocalHost` and let it claim its
        regions (raises the model's BadParameter, the host's HostRefused
        family -- devices.base.DeviceError both).
        ``irq_router``: where its interrupts go, and the VM its doorbells
        are bound in (None: it has neither); ``memory``: guest RAM;
        ``coalesced``: the VM's coalesced-MMIO zones (None: none)."""
        irqs = DeviceIrqs(irq_router, name) if irq_router is not None else None
        ioevents = DeviceIoeventfds(irq_router.vm, registry, owner, name) if irq_router is not None else None
        zones = DeviceZones(coalesced, registry, owner, name) if coalesced is not None else None
        try:
            model = model_class(LocalHost(registry, owner, console, irqs, memory, ioevents, zones), **params)
            model.start()
        except BaseException:
            if irqs is not None:
                irqs.release_all()
            if ioevents is not None:
                ioevents.release_all()
            if zones is not None:
                zones.release_all()
            raise
        return cls(model, owner, name, irqs, ioevents, zones)

    def attach_faults(self, engine: FaultEngine) -> None:
        """Give the model its fault engine (the ``access`` point is served
        here, the model's own points and ``irq`` by the model and host)."""
        old = self.fault_engine
        if self._sync_forward in old.on_change:
            old.on_change.remove(self._sync_forward)
        self.fault_engine = engine
        attach_engine(self._host, engine)
        self.model.attach_faults(engine)
        engine.on_change.append(self._sync_forward)
        self._sync_forward()

    def _sync_forward(self) -> None:
        """The forward is on unless this endpoint serves a fault point
        itself (:meth:`access`) or is closed; called after each arm and
        disarm (the engine's on_change), so the next access sees it."""
        armed = self.fault_engine.armed
        on = not (self._closed or "access" in armed or "process" in armed)
        _kvm_lib.svmm_forward_switch(self.c_forward, int(on))

    def failure(self, error: Exception) -> DeviceFailed:
        """What the model raising ``error`` on an access makes of it."""
        failed = DeviceFailed(f"{self.name}: {type(error).__name__}: {error}")
        failed.__cause__ = error
        return failed

    def access(self, vcpu: int, space: int, cookie: int, offset: int, size: int,
               is_write: bool, value: int) -> int:
        armed = self.fault_engine.armed
        try:
            if "access" in armed or "process" in armed:
                return serve_access(self.model, self.fault_engine, _SPACES, space, cookie, offset, size,
                                    is_write, value)
            if is_write:
                self._write(_SPACES[space], cookie, offset, size, value)
                return 0
            return self._read(_SPACES[space], cookie, offset, size)
        except Exception as e:
            raise self.failure(e) from e

    def access_batch(self, vcpu: int, writes: list[tuple[int, int, int, int, int]]) -> None:
        write = self._write
        engine = self.fault_engine
        try:
            if "access" in engine.armed or "process" in engine.armed:    # each write is an access event
                for space, cookie, offset, size, value in writes:
                    serve_access(self.model, engine, _SPACES, space, cookie, offset, size, True, value)
                return
            for space, cookie, offset, size, value in writes:
                write(_SPACES[space], cookie, offset, size, value)
        except Exception as e:
            raise self.failure(e) from e

    def close(self) -> None:
        self._closed = True
        self._sync_forward()
        try:
            self.model.stop()
        except Exception as e:
            log.warning("device %s: stop failed: %s", self.name, e)
        if self.irqs is not None:
            self.irqs.release_all()
        if self.ioevents is not None:
            self.ioevents.release_all()
        if self.zones is not None:
            self.zones.release_all()


ReadHandler = Callable[[int, int, int], int]           # (vcpu, offset, size) -> value
WriteHandler = Callable[[int, int, int, int], None]    # (vcpu, offset, size, value)


class VmmHandlers:
    """Endpoint of owner VMM_OWNER: regions served by VMM functions.

    Each region is registered with its own cookie, the index of its
    (read, write) pair.  A missing read handler reads all ones, a missing
    write handler drops the write.
    """

    owner = VMM_OWNER
    name = "vmm"

    def __init__(self, registry: Registry, windows: OwnerWindows | None = None):
        self.registry = registry
        #: Where each handler's range is granted to the VMM (vmm.windows).
        self.windows = windows
        self._handlers: list[tuple[ReadHandler | None, WriteHandler | None]] = []
        self._regions: list[tuple[Bus, int]] = []

    def add(self, bus: Bus, start: int, length: int, read: ReadHandler | None = None,
            write: WriteHandler | None = None) -> None:
        cookie = len(self._handlers)
        self._handlers.append((read, write))
        if self.windows is not None:
            self.windows.grant(VMM_OWNER, ("vmm", cookie), Grant(Bus(bus), start, length, cookie))
        self.registry.register(bus, start, length, VMM_OWNER, cookie)
        self._regions.append((bus, start))

    def access(self, vcpu: int, space: int, cookie: int, offset: int, size: int,
               is_write: bool, value: int) -> int:
        read, write = self._handlers[cookie]
        if is_write:
            if write is not None:
                write(vcpu, offset, size, value)
            return 0
        if read is None:
            return all_ones(size)
        return read(vcpu, offset, size)

    def access_batch(self, vcpu: int, writes: list[tuple[int, int, int, int, int]]) -> None:
        for space, cookie, offset, size, value in writes:
            self.access(vcpu, space, cookie, offset, size, True, value)

    def close(self) -> None:
        for bus, start in self._regions:
            try:
                self.registry.unregister(bus, start, VMM_OWNER)
            except Exception as e:
                log.debug("unregistering VMM region %s %#x: %s", bus.name, start, e)
        self._regions.clear()
