"""Dispatch: one guest port-I/O or MMIO access, from registry lookup to
the owning endpoint and back.

Every access goes ``registry.get`` -> ``endpoint.access`` -> ``registry.put``
(the seed's protocol, kvmtool ``mmio.c``): the registry lock is held only
inside ``get`` and ``put``, so the endpoint's handler may itself register
or unregister regions -- a device moving its own window from the handler
of the very write that asks for it.  What the guest sees on failure
follows DESIGN.md "Failure semantics":

* no region claims the address: reads return all ones, writes are dropped;
* the owner raises :class:`DeviceFailed` (dead, timed out, broke the
  protocol): the same, and the device is marked failed and its regions are
  reaped with ``unregister_owner``; the VM goes on;
* the registry lock cannot be had in time (:class:`ipc.LockTimeout`): the
  lookup completes as unclaimed, and :class:`vmm.lockwatch.LockWatch`
  deals with the holder -- kills it when it is one of our device
  processes, ends the VM when the lock stays unusable.  A ``put`` that
  misses the deadline is retried once the holder is dealt with.

One path, two speeds: the C exit loop (``vmm/_vcpu.c``) does the lookup
itself and calls :meth:`Dispatcher.forward` for an access it found an
owner for (its owner's windows checked in C, :mod:`vmm.windows`),
:meth:`Dispatcher.lookup_failed` and
:meth:`Dispatcher.put_timed_out` when its registry call fails; the Python
loop calls :meth:`Dispatcher.access`, which does the lookup in Python and
then the same three.  Coalesced MMIO (:mod:`vmm.coalesce`): before any
access is forwarded, :meth:`Dispatcher.drain` delivers the writes queued
in the ring, as writes through :meth:`access` (in ring order, one vCPU at
a time).  An access to a device process whose forward is installed
(:meth:`Dispatcher.look_at_forward`) is served by the C loop itself,
counted in :attr:`Dispatcher.stats` from the forward's own cell, and
reaches Python only when its slot call fails
(:meth:`Dispatcher.forward_failed`); the C loop takes the coalesced ring
first on every exit, and while another vCPU's drain is delivering what it
took (``svmm_drain_begin``/``end``) hands its accesses to Python, which
waits for that drain: so the order is the same.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Mapping

from devices.base import all_ones
from ipc import Bus, LockTimeout, Reference, Registry, RegistryError
from vmm._kvm_c import ffi as _kvm_ffi, lib as _kvm_lib
from ipc.registry import CApi
from vmm.coalesce import CoalescedMmio
from vmm.endpoint import DeviceFailed, Endpoint
from vmm.lockwatch import MAX_PUT_RETRIES, LockWatch
from vmm.outcome import Outcome
from vmm.stats import AccessStats
from vmm.windows import OwnerWindows

log = logging.getLogger(__name__)

PIO = int(Bus.PIO)
MMIO = int(Bus.MMIO)


def registry_c_api(registry: Registry) -> CApi | None:
    """The registry's C core for the C exit fast path; None when it cannot
    be had (then the vCPU runs the Python loop)."""
    try:
        return registry.c_api()
    except RegistryError as e:
        log.warning("no C fast path (registry C core not reachable: %s)", e)
        return None


class Dispatcher:
    """Routes accesses of every vCPU; safe to call from many threads."""

    def __init__(self, registry: Registry, endpoints: Mapping[int, Endpoint],
                 on_failure: Callable[[Endpoint, Exception], None] | None = None,
                 on_fatal: Callable[[Outcome], None] | None = None,
                 coalesced: CoalescedMmio | None = None, windows: OwnerWindows | None = None):
        self.registry = registry
        #: The windows granted to each owner (vmm.windows); None: no check.
        self.windows = windows
        #: owner id -> endpoint; read on every access, changed rarely.
        self.endpoints = endpoints
        self.on_failure = on_failure
        self.failed: set[int] = set()
        self._fail_lock = threading.Lock()
        self._get = registry.get
        self._put = registry.put
        #: accesses that found no region (both buses).
        self.unclaimed = 0
        #: Deals with whoever holds the registry lock past a deadline.
        self.lock_watch = LockWatch(registry, endpoints, self.fail, on_fatal)
        #: Per-device counts and forwarding latency (vmm.stats); both exit
        #: loops hand every access to its owner through ``stats.access``
        #: (in :meth:`forward`), drained coalesced writes through
        #: ``stats.access_batch``, but for what the C loop serves without
        #: this dispatcher (forwarded in C, STEP_LOCAL), which C counts in
        #: the owner's forward (``stats.c_cells``).
        self.stats = AccessStats()
        #: The VM's coalesced-MMIO zones and ring (None: no coalescing).
        self.coalesced = coalesced
        #: The ring, when coalescing is possible at all, and its page in
        #: each vCPU mapping (0: none).
        self.ring = coalesced.ring if coalesced is not None else None
        self.coalesced_page = coalesced.page if coalesced is not None else 0
        self._drain_lock = threading.RLock()
        self._draining = threading.local()
        #: queued writes delivered, and drains that found any.
        self.coalesced_writes = 0
        self.drains = 0
        #: ``struct svmm_forwards *``: owner -> the device process's
        #: forward (its endpoint's ``c_forward``), through which the C exit
        #: loop serves its accesses without Python (vmm/_vcpu.h).
        self.forwards = _kvm_ffi.new("struct svmm_forwards *")
        self._forward_of: dict[int, Any] = {}      # keeps each installed one alive
        #: accesses forwarded in C whose slot call failed (forward_failed).
        self.forward_errors = 0
        #: owner -> the model's ``read``/``write`` and its endpoint, for the
        #: owners served in this process whose forward has ``local`` set
        #: (:class:`vmm.local.LocalEndpoint`): the C loop hands their
        #: accesses out as STEP_LOCAL and the vCPU loop calls these
        #: directly; filled by :meth:`look_at_forward` before the forward is
        #: installed.
        self.local_reads: list[Callable[..., int] | None] = [None] * len(self.forwards.f)
        self.local_writes: list[Callable[..., None] | None] = [None] * len(self.forwards.f)
        self._local_endpoints: dict[int, Endpoint] = {}

    # -- the path of every access -------------------------------------------

    def access(self, vcpu: int, bus: int, addr: int, size: int, is_write: bool, value: int) -> int:
        """Serve one access; returns the value read (0 for a write)."""
        return self._access(vcpu, bus, addr, size, is_write, value, True)

    def _access(self, vcpu: int, bus: int, addr: int, size: int, is_write: bool, value: int,
                drain: bool) -> int:
        try:
            ref = self._get(bus, addr, size)
        except RegistryError as e:
            return self.lookup_failed(vcpu, bus, addr, size, is_write, e)
        except ValueError:
            # A wrapping or empty access (e.g. a rep string at the top of
            # the address space): nothing can claim it.
            ref = None
        windows = self.windows
        if windows is not None:
            if ref is not None and not windows.allows(bus, ref.start, ref.length, ref.owner, ref.cookie):
                windows.note_refused(bus, ref.start, ref.length, ref.owner, ref.cookie, ref.slot,
                                     ref.generation)
                self._put_ref(vcpu, ref)
                ref = None
            if ref is None:
                # The VMM's own ports answer whatever the registry says.
                mine = windows.vmm_window(bus, addr, size)
                if mine is not None:
                    return self.forward(vcpu, bus, windows.vmm_owner, mine[0], mine[1], size, is_write,
                                        value, drain)
        if ref is None:
            self.unclaimed += 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug("vCPU %d: unclaimed %s %s %#x+%d", vcpu, Bus(bus).name,
                          "write" if is_write else "read", addr, size)
            return 0 if is_write else all_ones(size)
        try:
            return self.forward(vcpu, bus, ref.owner, ref.cookie, ref.offset, size, is_write, value, drain)
        finally:
            self._put_ref(vcpu, ref)

    def forward(self, vcpu: int, bus: int, owner: int, cookie: int, offset: int, size: int,
                is_write: bool, value: int, drain: bool = True) -> int:
        """Hand an access that the lookup found in ``owner``'s region to its
        endpoint (the caller holds the registry reference); the value read,
        all ones / dropped when the owner has no endpoint or fails.  Queued
        coalesced writes are delivered first (``drain``)."""
        if drain and self.coalesced is not None and self.coalesced.used:
            self.drain(vcpu)
        endpoint = self.endpoints.get(owner)
        if endpoint is None or owner in self.failed:
            if endpoint is None:
                log.warning("%s access: region owner %d has no endpoint", Bus(bus).name, owner)
            return 0 if is_write else all_ones(size)
        try:
            return self.stats.access(endpoint, vcpu, bus, cookie, offset, size, is_write, value)
        except DeviceFailed as e:
            self.fail(endpoint, e)
            return 0 if is_write else all_ones(size)

    def look_at_forward(self, owner: int) -> None:
        """The C exit loop met an access to ``owner`` that it handed to
        Python with ``fresh`` set (first access, or its forward was off):
        install the owner's endpoint's forward if it has one and it may
        be used, else none (a local one with the model's read and write in
        :attr:`local_reads` / :attr:`local_writes` first).  Its accesses
        count in :attr:`stats`."""
        if not 0 <= owner < len(self.forwards.f):
            return
        endpoint = self.endpoints.get(owner)
        fwd = getattr(endpoint, "c_forward", None) if owner not in self.failed else None
        if fwd is not None and fwd.local:
            assert endpoint is not None
            self._local_endpoints[owner] = endpoint
            self.local_reads[owner] = endpoint.model_read     # type: ignore[attr-defined]
            self.local_writes[owner] = endpoint.model_write   # type: ignore[attr-defined]
        self._forward_of[owner] = fwd
        if fwd is not None:
            # (a failed owner's counts so far stay in query-stats)
            self.stats.c_cells[owner] = fwd
        self.forwards.f[owner] = _kvm_ffi.NULL if fwd is None else fwd
        self.forwards.seen[owner] = 1

    def local_failed(self, vcpu: int, owner: int, size: int, is_write: bool, error: Exception) -> int:
        """The model of a STEP_LOCAL access raised ``error``: the device
        fails as in :meth:`forward` (a DeviceFailed from its endpoint); the
        value read, all ones."""
        endpoint = self._local_endpoints[owner]
        self.fail(endpoint, endpoint.failure(error))     # type: ignore[attr-defined]
        return 0 if is_write else all_ones(size)

    def forward_failed(self, vcpu: int, bus: int, owner: int, cookie: int, offset: int, size: int,
                       is_write: bool, value: int, rc: int, aseq: int, handle: int, gen: int) -> int:
        """An access forwarded in C whose slot call failed with ``rc``:
        completed by its endpoint (``access_failed``) as :meth:`forward`
        completes one; the value read."""
        self.forward_errors += 1
        endpoint = self.endpoints.get(owner)
        if endpoint is None or owner in self.failed or not hasattr(endpoint, "access_failed"):
            return 0 if is_write else all_ones(size)
        try:
            return self.stats.timed(endpoint, vcpu, bus, is_write, endpoint.access_failed, vcpu, bus, cookie,
                                    offset, size, is_write, value, rc, aseq, handle, gen)
        except DeviceFailed as e:
            self.fail(endpoint, e)
            return 0 if is_write else all_ones(size)

    def lookup_failed(self, vcpu: int, bus: int, addr: int, size: int, is_write: bool,
                      error: Exception) -> int:
        """A lookup failed (a missed lock deadline: the holder is dealt
        with); the access completes as unclaimed: returns its value."""
        what = f"lookup of {Bus(bus).name} {addr:#x}"
        if isinstance(error, LockTimeout):
            self.lock_watch.stalled(vcpu, what)
        else:
            log.error("vCPU %d: registry %s failed: %s; the access completes as unclaimed",
                      vcpu, what, error)
        return 0 if is_write else all_ones(size)

    def put_timed_out(self, vcpu: int, slot: int, error: Exception, attempt: int) -> bool:
        """Attempt ``attempt`` (from 1) to put a reference to ``slot``
        failed with ``error``: deal with the lock holder; True when the put
        should be tried again, False when the reference is given up (its
        slot stays referenced, which is logged)."""
        if isinstance(error, LockTimeout):
            self.lock_watch.stalled(vcpu, f"put of slot {slot}", put=True)
            if self.lock_watch.unusable is None and attempt <= MAX_PUT_RETRIES:
                return True
            log.error("vCPU %d: the put of slot %d kept missing the lock deadline; abandoned, the "
                      "slot stays referenced", vcpu, slot)
        else:
            log.error("vCPU %d: registry put of slot %d failed: %s", vcpu, slot, error)
        return False

    def _put_ref(self, vcpu: int, ref: Reference) -> None:
        try:
            self._put(ref)
        except RegistryError as e:
            self._put_failed(vcpu, ref, e)

    def _put_failed(self, vcpu: int, ref: Reference, error: RegistryError) -> None:
        """Deal with a put that failed and put again while that is worth it."""
        attempt = 1
        while self.put_timed_out(vcpu, ref.slot, error, attempt):
            try:
                self._put(ref)
                return
            except RegistryError as e:
                error = e
                attempt += 1

    # -- coalesced MMIO -------------------------------------------------------

    def drain(self, vcpu: int) -> int:
        """Deliver every write queued in the coalesced-MMIO ring, oldest
        first, through the registry (as vCPU ``vcpu``); returns how many.
        One vCPU at a time: a second one waits, so that what it forwards
        next comes after every queued write.  Re-entered from a handler
        the delivery itself runs, it does nothing."""
        ring = self.ring
        if ring is None or getattr(self._draining, "on", False):
            return 0
        n = 0
        with self._drain_lock:
            self._draining.on = True
            _kvm_lib.svmm_drain_begin(self.forwards)    # no access forwarded in C meanwhile
            try:
                while True:
                    batch = ring.take()
                    if not batch:
                        break
                    n += len(batch)
                    self._deliver(vcpu, batch)
            finally:
                _kvm_lib.svmm_drain_end(self.forwards)
                self._draining.on = False
            if n:
                self.coalesced_writes += n
                self.drains += 1
        return n

    def _deliver(self, vcpu: int, writes: list[tuple[int, int, int]]) -> None:
        """Deliver drained (address, size, value) writes in order: each is
        looked up in the registry, and a run of consecutive writes to one
        owner goes to its endpoint as one batch (one request to a device
        process), the references held until the batch is served.  So a
        write in a batch that moves its own region takes effect for the
        lookups of the next batch: the rest of its batch was in flight."""
        get = self._get
        run: list[tuple[int, int, int, int, int]] = []
        refs: list[Reference] = []
        owner = -1
        try:
            for addr, size, value in writes:
                try:
                    ref = get(MMIO, addr, size)
                except RegistryError as e:
                    self.lookup_failed(vcpu, MMIO, addr, size, True, e)
                    continue
                except ValueError:
                    ref = None
                if ref is not None and self.windows is not None and not self.windows.allows(
                        MMIO, ref.start, ref.length, ref.owner, ref.cookie):
                    self.windows.note_refused(MMIO, ref.start, ref.length, ref.owner, ref.cookie,
                                              ref.slot, ref.generation)
                    self._put_refs(vcpu, [ref])
                    ref = None
                if ref is None:
                    self.unclaimed += 1
                    continue
                if ref.owner != owner and run:
                    self._forward_batch(vcpu, owner, run, refs)
                    run, refs = [], []
                owner = ref.owner
                refs.append(ref)
                run.append((MMIO, ref.cookie, ref.offset, size, value))
            if run:
                self._forward_batch(vcpu, owner, run, refs)
                refs = []
        finally:
            self._put_refs(vcpu, refs)

    def _forward_batch(self, vcpu: int, owner: int, writes: list[tuple[int, int, int, int, int]],
                       refs: list[Reference]) -> None:
        """:meth:`forward` for a run of writes to one owner; puts ``refs``."""
        try:
            endpoint = self.endpoints.get(owner)
            if endpoint is None or owner in self.failed:
                return
            try:
                self.stats.access_batch(endpoint, vcpu, writes)
            except DeviceFailed as e:
                self.fail(endpoint, e)
        finally:
            self._put_refs(vcpu, refs)

    def _put_refs(self, vcpu: int, refs: list[Reference]) -> None:
        put = self._put
        for ref in refs:
            try:
                put(ref)
            except RegistryError as e:
                self._put_failed(vcpu, ref, e)

    # -- failures -------------------------------------------------------------

    def fail(self, endpoint: Endpoint, error: Exception) -> None:
        """Mark ``endpoint`` failed and reap its regions and zones (once)."""
        with self._fail_lock:
            if endpoint.owner in self.failed:
                return
            self.failed.add(endpoint.owner)
            if 0 <= endpoint.owner < len(self.forwards.f):
                self.forwards.f[endpoint.owner] = _kvm_ffi.NULL
        log.error("device %s failed: %s; its regions are reaped, the VM goes on", endpoint.name, error)
        if self.coalesced is not None:
            self.coalesced.remove_owner(endpoint.owner)
        try:
            n = self.registry.unregister_owner(endpoint.owner)
            log.info("device %s: %d region(s) reaped", endpoint.name, n)
        except RegistryError as e:
            log.error("device %s: reaping its regions failed: %s", endpoint.name, e)
        if self.on_failure is not None:
            self.on_failure(endpoint, error)
