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
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Mapping

from devices.base import all_ones
from ipc import Bus, LockTimeout, Registry, RegistryError
from ipc.registry import lib as _reg_lib
from vmm.endpoint import DeviceFailed, Endpoint
from vmm.lockwatch import MAX_PUT_RETRIES, LockWatch
from vmm.outcome import Outcome
from vmm.stats import AccessStats

log = logging.getLogger(__name__)

PIO = int(Bus.PIO)
MMIO = int(Bus.MMIO)

#: svm_reg_* code of a missed lock deadline (what the C fast path reports).
SVM_ETIMEDOUT = _reg_lib.SVM_ETIMEDOUT


def registry_c_api(registry: Registry) -> tuple[int, int, int] | None:
    """(handle, svm_reg_get, svm_reg_put) of the registry's C core as
    addresses, for the C exit fast path; None when they cannot be had."""
    try:
        from ipc.registry import ffi as reg_ffi, lib as reg_lib

        handle = registry._h
        if handle is None:
            return None
        return (int(reg_ffi.cast("uintptr_t", handle)),
                int(reg_ffi.cast("uintptr_t", reg_ffi.addressof(reg_lib, "svm_reg_get"))),
                int(reg_ffi.cast("uintptr_t", reg_ffi.addressof(reg_lib, "svm_reg_put"))))
    except (ImportError, AttributeError, TypeError) as e:
        log.warning("no C fast path (registry C core not reachable: %s)", e)
        return None


class Dispatcher:
    """Routes accesses of every vCPU; safe to call from many threads."""

    def __init__(self, registry: Registry, endpoints: Mapping[int, Endpoint],
                 on_failure: Callable[[Endpoint, Exception], None] | None = None,
                 on_fatal: Callable[[Outcome], None] | None = None):
        self.registry = registry
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
        #: loops hand every access to its owner through ``stats.access``.
        self.stats = AccessStats()

    def access(self, vcpu: int, bus: int, addr: int, size: int, is_write: bool, value: int) -> int:
        """Serve one access; returns the value read (0 for a write)."""
        try:
            ref = self._get(bus, addr, size)
        except LockTimeout:
            self.lock_watch.stalled(vcpu, f"lookup of {Bus(bus).name} {addr:#x}")
            return 0 if is_write else all_ones(size)
        except RegistryError as e:
            log.error("vCPU %d: %s %s %#x: registry lookup failed: %s", vcpu,
                      Bus(bus).name, "write" if is_write else "read", addr, e)
            return 0 if is_write else all_ones(size)
        except ValueError:
            # A wrapping or empty access (e.g. a rep string at the top of
            # the address space): nothing can claim it.
            ref = None
        if ref is None:
            self.unclaimed += 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug("vCPU %d: unclaimed %s %s %#x+%d", vcpu, Bus(bus).name,
                          "write" if is_write else "read", addr, size)
            return 0 if is_write else all_ones(size)
        try:
            owner = ref.owner
            endpoint = self.endpoints.get(owner)
            if endpoint is None or owner in self.failed:
                if endpoint is None:
                    log.warning("%s %#x: region owner %d has no endpoint", Bus(bus).name, addr, owner)
                return 0 if is_write else all_ones(size)
            try:
                return self.stats.access(endpoint, vcpu, bus, ref.cookie, ref.offset, size, is_write, value)
            except DeviceFailed as e:
                self.fail(endpoint, e)
                return 0 if is_write else all_ones(size)
        finally:
            try:
                self._put(ref)
            except LockTimeout:
                self.put_stalled(vcpu, ref)
            except RegistryError as e:
                log.error("vCPU %d: registry put of %r failed: %s", vcpu, ref, e)

    def put_stalled(self, vcpu: int, ref) -> None:
        """A put missed the lock deadline: deal with the holder, put again."""
        for _ in range(MAX_PUT_RETRIES):
            self.lock_watch.stalled(vcpu, f"put of slot {ref.slot}", put=True)
            if self.lock_watch.unusable is not None:
                break
            try:
                self._put(ref)
                return
            except LockTimeout:
                continue
            except RegistryError as e:
                log.error("vCPU %d: registry put of %r failed: %s", vcpu, ref, e)
                return
        log.error("vCPU %d: %r abandoned: its put kept missing the lock deadline; the slot stays "
                  "referenced", vcpu, ref)

    def fail(self, endpoint: Endpoint, error: Exception) -> None:
        """Mark ``endpoint`` failed and reap its regions (once)."""
        with self._fail_lock:
            if endpoint.owner in self.failed:
                return
            self.failed.add(endpoint.owner)
        log.error("device %s failed: %s; its regions are reaped, the VM goes on", endpoint.name, error)
        try:
            n = self.registry.unregister_owner(endpoint.owner)
            log.info("device %s: %d region(s) reaped", endpoint.name, n)
        except RegistryError as e:
            log.error("device %s: reaping its regions failed: %s", endpoint.name, e)
        if self.on_failure is not None:
            self.on_failure(endpoint, error)
