"""Coalesced MMIO zones: guest writes that KVM queues instead of exiting.

kvmtool's ``kvm__register_mmio(..., coalesce, ...)``: a device claims an
MMIO window with ``host.claim(Space.MMIO, start, length, cookie,
coalesce=True)`` and the VMM registers it with KVM as a coalesced zone
(``KVM_REGISTER_COALESCED_MMIO``).  A guest write inside it is stored in a
ring page of the VM (page :attr:`vmm.kvm.Kvm.coalesced_mmio_page` of every
vCPU's mapping) and the vCPU goes on; reads still exit.  When the ring is
full the next write exits as usual.

The dispatcher (:meth:`vmm.dispatch.Dispatcher.drain`) empties the ring on
every exit, and before it forwards any access to any device, and hands
each queued write through the normal registry lookup to the region's
owner, in ring order, under one lock (vCPUs drain one at a time, so a
write is delivered once, and an access that a vCPU forwards after a drain
by another vCPU waits for that drain to finish).  A device therefore sees
its queued writes, in order, before any later access it serves -- the
read of a status register, the test-exit port -- but a doorbell
(ioeventfd) does not flush them: a guest that needs its writes seen does
an access that exits.

:class:`DeviceZones` is one device's share, validated and bounded like
:class:`vmm.ioevent.DeviceIoeventfds`: a zone lies inside one MMIO region
of the registry that this device owns (it cannot make another device's or
the VMM's writes lag), overlaps no other zone, and a device holds at most
:data:`MAX_ZONES_PER_DEVICE`.  A zone goes with its region: the host
removes it when the model releases the region (a BAR that moves is a
release and a claim), and every zone of a device goes when the device is
cut off, reaped, reset or closed.  Writes still queued for a zone that has
gone are delivered through the registry like any other, to whoever owns
the address then (nobody, usually: dropped).  A device process that takes
its region out of the registry without asking the VMM to drop the zone
leaves a stale zone: it still queues (and the registry still routes) the
guest's writes there, and is removed when a zone asked for later overlaps
it.
"""

from __future__ import annotations

import logging
import threading

from ipc import Bus, Registry
from vmm import kvm
from vmm.endpoint import VmmError

log = logging.getLogger(__name__)

MAX_ZONES_PER_DEVICE = 16
#: KVM's zone size is a u32.
MAX_ZONE_LENGTH = 0xFFFF_FFFF
U64_END = 1 << 64


class CoalesceRefused(VmmError):
    """A device's coalesced-zone request is invalid or over its limit."""


class CoalescedMmio:
    """The zones of one VM and its ring (None when KVM has no coalesced
    MMIO: a request is granted without a zone, the region stays plain --
    what the guest sees is the same, only slower)."""

    @classmethod
    def for_vm(cls, kvm_fd: kvm.Kvm, vm: kvm.Vm, vcpu: kvm.Vcpu) -> CoalescedMmio:
        """The VM's ring as seen through ``vcpu``'s mapping, when KVM has one."""
        page = kvm_fd.coalesced_mmio_page
        return cls(vm, vcpu.coalesced_ring(page) if page else None, page)

    def __init__(self, vm: kvm.Vm, ring: kvm.CoalescedRing | None, page: int = 0):
        self.vm = vm
        self.ring = ring
        #: The ring's page in every vCPU mapping (0 with no ring).
        self.page = page if ring is not None else 0
        self._lock = threading.Lock()
        #: start -> (length, owner) of every zone registered with KVM.
        self._zones: dict[int, tuple[int, int]] = {}
        #: True once a zone was ever registered (the dispatcher drains
        #: before forwarding only from then on).
        self.used = False

    def zones(self) -> list[tuple[int, int, int]]:
        """(start, length, owner) of every zone, by start."""
        with self._lock:
            return sorted((s, n, o) for s, (n, o) in self._zones.items())

    def count(self, owner: int) -> int:
        with self._lock:
            return sum(1 for _, o in self._zones.values() if o == owner)

    def add(self, registry: Registry, owner: int, name: str, start: int, length: int,
            limit: int = MAX_ZONES_PER_DEVICE) -> None:
        """Register ``[start, start + length)`` as a zone of ``owner``
        (raises :class:`CoalesceRefused`, changes nothing then)."""
        if self.ring is None:       # nothing to coalesce with: the region stays plain
            log.debug("device %s: KVM has no coalesced MMIO; %#x+%#x stays a plain region", name,
                      start, length)
            return
        if type(start) is not int or type(length) is not int:
            raise CoalesceRefused(f"zone {start!r}+{length!r}: not integers")
        if not 0 < length <= MAX_ZONE_LENGTH or not 0 <= start < U64_END - length:
            raise CoalesceRefused(f"zone {start:#x}+{length:#x} is empty, too long or wraps")
        ref = registry.get(Bus.MMIO, start, length)
        if ref is None:
            raise CoalesceRefused(f"MMIO {start:#x}+{length:#x} is not inside one registered region")
        with ref:
            if ref.owner != owner:
                raise CoalesceRefused(f"MMIO {start:#x}+{length:#x} belongs to another owner")
        end = start + length
        with self._lock:
            for s, (n, o) in list(self._zones.items()):
                if s == start and n == length and o == owner:
                    return      # asked twice: the same zone
                if s < end and start < s + n:
                    if not _stale(registry, s, n, o):
                        raise CoalesceRefused(f"zone {start:#x}+{length:#x} overlaps the zone {s:#x}+{n:#x}")
                    # Its owner took the region out of the registry without
                    # asking the VMM to drop the zone: drop it now.
                    log.warning("coalesced MMIO zone %#x+%#x of owner %d outlived its region; removed",
                                s, n, o)
                    del self._zones[s]
                    self._unregister(s, n)
            held = sum(1 for _, o in self._zones.values() if o == owner)
            if held >= limit:
                raise CoalesceRefused(f"device {name} already holds {limit} coalesced zones")
            try:
                self.vm.coalesced_mmio(start, length)
            except kvm.KvmError as e:
                raise CoalesceRefused(str(e)) from None
            self._zones[start] = (length, owner)
            self.used = True
        log.debug("device %s: coalesced MMIO zone %#x+%#x", name, start, length)

    def remove(self, owner: int, start: int) -> bool:
        """Unregister ``owner``'s zone at ``start``; False when there is none."""
        with self._lock:
            zone = self._zones.get(start)
            if zone is None or zone[1] != owner:
                return False
            del self._zones[start]
            self._unregister(start, zone[0])
        return True

    def remove_owner(self, owner: int) -> int:
        """Unregister every zone of ``owner``; returns how many."""
        with self._lock:
            mine = [(s, n) for s, (n, o) in self._zones.items() if o == owner]
            for s, n in mine:
                del self._zones[s]
                self._unregister(s, n)
        return len(mine)

    def _unregister(self, start: int, length: int) -> None:
        try:
            self.vm.coalesced_mmio(start, length, unregister=True)
        except kvm.KvmError as e:
            log.warning("coalesced MMIO zone %#x+%#x: %s", start, length, e)


def _stale(registry: Registry, start: int, length: int, owner: int) -> bool:
    """True when no region of ``owner`` holds the zone any more."""
    ref = registry.get(Bus.MMIO, start, length)
    if ref is None:
        return True
    with ref:
        return ref.owner != owner


class DeviceZones:
    """The coalesced zones of one device (registry owner ``owner``)."""

    def __init__(self, coalesced: CoalescedMmio, registry: Registry, owner: int, name: str,
                 limit: int = MAX_ZONES_PER_DEVICE):
        self.coalesced = coalesced
        self.registry = registry
        self.owner = owner
        self.name = name
        self.limit = limit

    def add(self, start: int, length: int) -> None:
        self.coalesced.add(self.registry, self.owner, self.name, start, length, self.limit)

    def remove(self, start: int) -> bool:
        """Drop the zone at ``start`` (needs no registry check: the region
        may already be gone)."""
        return self.coalesced.remove(self.owner, start)

    def release_all(self) -> int:
        return self.coalesced.remove_owner(self.owner)
