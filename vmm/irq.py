"""Interrupt routing of one VM: irqchip pins, MSI routes, irqfds.

KVM keeps one GSI routing table per VM and ``KVM_SET_GSI_ROUTING``
replaces it whole (Documentation/virt/kvm/api.rst 4.52), so
:class:`IrqRouter` holds the complete table: the routes
``KVM_CREATE_IRQCHIP`` installs (``kvm_setup_default_irq_routing``,
arch/x86/kvm/irq_comm.c: GSI 0-15 to the 8259 pair *and* IOAPIC pin n,
GSI 16-23 to IOAPIC pin n only) plus one MSI route per programmed vector,
on GSIs from :data:`FIRST_MSI_GSI` up.

Every interrupt source a device gets is an eventfd bound with
``KVM_IRQFD`` (api.rst 4.75) to a GSI: writing it raises an edge on that
GSI in the kernel, with no VMM thread involved.  The same path serves an
inline model (vmm.local) and a device process (vmm.remote, which passes
the eventfd over the control socket).

:class:`DeviceIrqs` is one device's share: its pins and MSI vectors,
validated and bounded (:class:`IrqRefused` names what was wrong), and
released all at once when the device goes.  Masking and pending bits
(MSI-X Vector Control, PBA) are the device model's business: a masked
vector is simply not triggered; the route stays.
"""

from __future__ import annotations

import errno
import logging
import os
import threading

from vmm import kvm
from vmm.endpoint import VmmError

log = logging.getLogger(__name__)

IRQCHIP_PIC_MASTER = kvm.lib.KVM_IRQCHIP_PIC_MASTER
IRQCHIP_PIC_SLAVE = kvm.lib.KVM_IRQCHIP_PIC_SLAVE
IRQCHIP_IOAPIC = kvm.lib.KVM_IRQCHIP_IOAPIC
ROUTE_IRQCHIP = kvm.lib.KVM_IRQ_ROUTING_IRQCHIP
ROUTE_MSI = kvm.lib.KVM_IRQ_ROUTING_MSI

#: Inputs of the in-kernel IOAPIC (and so the pin GSIs a device may ask for).
IOAPIC_PINS = 24
#: ISA IRQs, also wired to the 8259 pair.
ISA_IRQS = 16
#: MSI routes are allocated from here up.
FIRST_MSI_GSI = IOAPIC_PINS
#: KVM_MAX_IRQ_ROUTES on x86 (not exported to user space).
MAX_GSI = 4096
#: MSI address window (Intel SDM Vol. 3A §11.11.1: 0xFEEx_xxxx).
MSI_WINDOW_MASK = 0xFFF0_0000
MSI_WINDOW = 0xFEE0_0000
#: Defaults of what one device may hold.
MAX_PINS_PER_DEVICE = 4
MAX_VECTORS_PER_DEVICE = 64
#: MSI-X allows 2048 table entries (PCIe 6.0 §7.7.2.2).
MAX_VECTOR_INDEX = 2048


class IrqError(VmmError):
    """Base of the interrupt-routing errors."""


class IrqRefused(IrqError):
    """A device asked for something it may not have (bad pin, address
    outside the MSI window, over its limits)."""


def default_routes() -> list[tuple[int, int, int, int, int]]:
    """The table KVM_CREATE_IRQCHIP installs on x86 (irq_comm.c
    ``default_routing``): (gsi, type, irqchip, pin, 0)."""
    routes = []
    for gsi in range(IOAPIC_PINS):
        routes.append((gsi, ROUTE_IRQCHIP, IRQCHIP_IOAPIC, gsi, 0))
        if gsi < ISA_IRQS:
            chip = IRQCHIP_PIC_MASTER if gsi < 8 else IRQCHIP_PIC_SLAVE
            routes.append((gsi, ROUTE_IRQCHIP, chip, gsi % 8, 0))
    return routes


def check_msi(address: int, data: int) -> None:
    """Raise IrqRefused unless ``address``/``data`` is an x86 MSI."""
    if type(address) is not int or not 0 <= address < 1 << 32 or address & MSI_WINDOW_MASK != MSI_WINDOW:
        shown = f"{address:#x}" if type(address) is int else repr(address)
        raise IrqRefused(f"MSI address {shown} is outside the 0xFEExxxxx window")
    if type(data) is not int or not 0 <= data <= 0xFFFF_FFFF:
        # MSI-X Message Data is 32 bits; x86 reads the low 16 (SDM §11.11.2).
        shown = f"{data:#x}" if type(data) is int else repr(data)
        raise IrqRefused(f"MSI data {shown} is not a 32-bit value")


class IrqRouter:
    """The VM's GSI routing table and irqfds (thread-safe)."""

    def __init__(self, vm: kvm.Vm):
        self.vm = vm
        self._lock = threading.Lock()
        self._msi: dict[int, tuple[int, int]] = {}     # gsi -> (address, data)
        self._next_gsi = FIRST_MSI_GSI
        self._free: list[int] = []

    def _apply(self) -> None:
        routes = default_routes()
        routes += [(gsi, ROUTE_MSI, addr & 0xFFFF_FFFF, addr >> 32, data)
                   for gsi, (addr, data) in sorted(self._msi.items())]
        self.vm.set_gsi_routing(routes)

    def msi_routes(self) -> dict[int, tuple[int, int]]:
        with self._lock:
            return dict(self._msi)

    def pin_irqfd(self, gsi: int) -> int:
        """A new eventfd bound to irqchip input ``gsi`` (0-23)."""
        if type(gsi) is not int or not 0 <= gsi < IOAPIC_PINS:
            raise IrqRefused(f"interrupt pin {gsi!r} is outside 0-{IOAPIC_PINS - 1}")
        return self._bind(gsi)

    def add_msi(self, address: int, data: int) -> tuple[int, int]:
        """Route a new GSI to ``address``/``data``; returns (gsi, eventfd)."""
        check_msi(address, data)
        with self._lock:
            if self._free:
                gsi = self._free.pop()
            elif self._next_gsi < MAX_GSI:
                gsi = self._next_gsi
                self._next_gsi += 1
            else:
                raise IrqRefused(f"the VM's {MAX_GSI - FIRST_MSI_GSI} MSI routes are all taken")
            self._msi[gsi] = (address, data)
            try:
                self._apply()
            except kvm.KvmError:
                del self._msi[gsi]
                self._free.append(gsi)
                raise
        try:
            return gsi, self._bind(gsi)
        except BaseException:
            self.remove_msi(gsi)
            raise

    def update_msi(self, gsi: int, address: int, data: int) -> None:
        check_msi(address, data)
        with self._lock:
            if gsi not in self._msi:
                raise IrqError(f"GSI {gsi} is not an MSI route")
            old = self._msi[gsi]
            self._msi[gsi] = (address, data)
            try:
                self._apply()
            except kvm.KvmError:
                self._msi[gsi] = old
                raise

    def remove_msi(self, gsi: int, fd: int | None = None) -> None:
        """Unbind ``fd`` (if given, and close it) and drop the route."""
        if fd is not None:
            self.unbind(fd, gsi)
        with self._lock:
            if self._msi.pop(gsi, None) is not None:
                self._free.append(gsi)
                self._apply()

    def _bind(self, gsi: int) -> int:
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            self.vm.irqfd(fd, gsi)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def unbind(self, fd: int, gsi: int) -> None:
        """KVM_IRQFD deassign, then close ``fd``."""
        try:
            self.vm.irqfd(fd, gsi, deassign=True)
        except kvm.KvmError as e:
            if e.errno != errno.ENOENT:
                log.warning("irqfd on GSI %d: %s", gsi, e)
        finally:
            os.close(fd)


class DeviceIrqs:
    """The pins and MSI vectors of one device, bounded and validated.

    Each method returns the eventfd that raises the interrupt; this object
    keeps it (its own copy) until :meth:`release_all`.  Errors a device
    can cause raise :class:`IrqRefused` and change nothing.
    """

    def __init__(self, router: IrqRouter, name: str, max_pins: int = MAX_PINS_PER_DEVICE,
                 max_vectors: int = MAX_VECTORS_PER_DEVICE):
        self.router = router
        self.name = name
        self.max_pins = max_pins
        self.max_vectors = max_vectors
        self._lock = threading.Lock()
        self.pins: dict[int, int] = {}                   # gsi -> eventfd
        self.vectors: dict[int, tuple[int, int]] = {}    # index -> (gsi, eventfd)

    def pin(self, gsi: int) -> int:
        """The eventfd of irqchip input ``gsi`` (the same one on a repeat)."""
        with self._lock:
            if gsi in self.pins:
                return self.pins[gsi]
            if len(self.pins) >= self.max_pins:
                raise IrqRefused(f"device {self.name} already holds {self.max_pins} interrupt pins")
            fd = self.router.pin_irqfd(gsi)
            self.pins[gsi] = fd
            log.debug("device %s: pin %d -> eventfd %d", self.name, gsi, fd)
            return fd

    def program(self, index: int, address: int, data: int) -> int:
        """Route vector ``index`` to ``address``/``data`` (a new route, or
        an update of its route); returns the route's eventfd."""
        if type(index) is not int or not 0 <= index < MAX_VECTOR_INDEX:
            raise IrqRefused(f"MSI vector index {index!r} is outside 0-{MAX_VECTOR_INDEX - 1}")
        check_msi(address, data)
        with self._lock:
            if index in self.vectors:
                gsi, fd = self.vectors[index]
                self.router.update_msi(gsi, address, data)
                return fd
            if len(self.vectors) >= self.max_vectors:
                raise IrqRefused(f"device {self.name} already holds {self.max_vectors} MSI routes")
            gsi, fd = self.router.add_msi(address, data)
            self.vectors[index] = (gsi, fd)
            log.debug("device %s: MSI vector %d -> GSI %d (%#x/%#x)", self.name, index, gsi, address, data)
            return fd

    def unprogram(self, index: int) -> None:
        """Drop vector ``index``'s route (nothing if it has none)."""
        with self._lock:
            entry = self.vectors.pop(index, None)
        if entry is not None:
            self.router.remove_msi(entry[0], entry[1])

    def release_all(self) -> None:
        with self._lock:
            pins, self.pins = self.pins, {}
            vectors, self.vectors = self.vectors, {}
        for gsi, fd in pins.items():
            self.router.unbind(fd, gsi)
        for gsi, fd in vectors.values():
            try:
                self.router.remove_msi(gsi, fd)
            except kvm.KvmError as e:
                log.warning("device %s: dropping GSI %d: %s", self.name, gsi, e)


def signal(fd: int) -> None:
    """Raise the interrupt behind eventfd ``fd`` once."""
    os.eventfd_write(fd, 1)
