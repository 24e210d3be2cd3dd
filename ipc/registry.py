"""The region registry: which process serves which guest address.

One POSIX shared-memory segment holds a fixed table of region slots and,
per address space (:class:`Bus`), an index sorted by start address, behind
one process-shared robust lock (a robust futex, ``_rlock.h``).  The VMM's vCPU threads look addresses up
with :meth:`Registry.get` and hand the reference back with
:meth:`Registry.put`; device processes :meth:`Registry.register` and
:meth:`Registry.unregister` their own regions, also while a vCPU is inside
one of their handlers.

The refcount protocol follows kvmtool's mmio/ioport registry (a mutex and a
per-node reference count instead of a VM-wide reader lock), with two
changes: an unregistered region leaves the index at once, so new lookups
miss it and an overlapping range can be registered straight away, and
every reference carries the slot's generation, so a stale put can never
touch the slot's next tenant.  The C core (``_registry.c``) holds the
layout and the crash-recovery rules.
"""

from __future__ import annotations

import dataclasses
import enum
import fcntl
import os
import struct
import threading

import posix_ipc

from ipc._registry_c import ffi, lib
from ipc.errors import IpcError

__all__ = [
    "Bus",
    "Registry",
    "Reference",
    "RegionRecord",
    "RegistryError",
    "RegionConflict",
    "RegistryFull",
    "RegionNotFound",
    "StaleReference",
    "LockTimeout",
    "LayoutError",
    "LockUnusable",
    "pci_address",
    "DEFAULT_CAPACITY",
    "DEFAULT_LOCK_TIMEOUT",
    "CApi",
]

DEFAULT_CAPACITY = 4096
DEFAULT_LOCK_TIMEOUT = 1.0  # seconds
U64_MAX = (1 << 64) - 1


class Bus(enum.IntEnum):
    """The three address spaces a region can live in."""

    PIO = 0
    MMIO = 1
    #: PCI configuration space; addresses come from :func:`pci_address`.
    PCI = 2


def pci_address(bus: int, device: int, function: int, offset: int = 0) -> int:
    """Key of a PCI configuration-space register on :attr:`Bus.PCI`.

    Each function owns a 4 KiB window (PCIe extended configuration space),
    ordered by bus/device/function as in ECAM (PCI Express Base Spec, 7.2.2):
    ``bus << 20 | device << 15 | function << 12 | offset``.
    """
    if not (0 <= bus < 256 and 0 <= device < 32 and 0 <= function < 8 and 0 <= offset < 4096):
        raise ValueError(f"bad PCI address {bus:#x}:{device:#x}.{function} +{offset:#x}")
    return bus << 20 | device << 15 | function << 12 | offset


class RegistryError(IpcError):
    """Base of every error the registry raises."""


class RegionConflict(RegistryError):
    """The range overlaps a region that is in the index."""


class RegistryFull(RegistryError):
    """Every slot of the table is in use."""


class RegionNotFound(RegistryError):
    """No region starts there, or it belongs to another owner."""


class StaleReference(RegistryError):
    """A put of a reference that was already put or whose slot moved on."""


class LayoutError(RegistryError):
    """The segment is not a registry of a layout this code understands."""


class LockUnusable(RegistryError):
    """The lock cannot be used by this thread (no robust list, nested too
    deeply); see ``_rlock.h``."""


class LockTimeout(RegistryError):
    """The registry lock was not free before the deadline."""

    def __init__(self, holder_pid: int | None, holder_tid: int, timeout: float):
        self.holder_pid = holder_pid
        self.holder_tid = holder_tid
        who = f"pid {holder_pid}" if holder_pid else "an unknown process"
        super().__init__(
            f"registry lock not acquired within {timeout:g} s: held by {who} "
            f"(thread {holder_tid})"
        )


@dataclasses.dataclass(frozen=True)
class RegionRecord:
    """One slot in use, as :meth:`Registry.regions` lists it."""

    bus: Bus
    start: int
    length: int
    owner: int
    cookie: int
    refcount: int
    removing: bool
    slot: int
    generation: int


@dataclasses.dataclass(frozen=True)
class CApi:
    """The registry's C core for C code of another extension module (the
    VMM's vCPU exit fast path), as addresses: ``handle`` is the
    ``struct svm_reg *`` of one open registry, ``get`` and ``put`` are
    ``svm_reg_get`` and ``svm_reg_put`` (signatures in ``_registry.h``).
    Valid while the registry stays open."""

    handle: int
    get: int
    put: int


class Reference:
    """A counted reference to a region, from :meth:`Registry.get`.

    While it is held the region's slot stays with this tenant, even if the
    owner unregisters the region.  Use it as a context manager, or hand it
    to :meth:`Registry.put` exactly once.
    """

    __slots__ = ("owner", "cookie", "start", "length", "offset", "generation", "slot", "_registry")

    owner: int
    cookie: int
    start: int
    length: int
    #: ``addr - start`` of the access that was looked up.
    offset: int
    generation: int
    slot: int
    #: The handle it is to be put to; None once put.
    _registry: Registry | None

    def __enter__(self) -> Reference:
        return self

    def __exit__(self, *exc: object) -> None:
        registry = self._registry
        if registry is None:
            raise StaleReference("reference was already put")
        registry.put(self)

    @property
    def held(self) -> bool:
        """True until the reference has been put."""
        return self._registry is not None

    def __repr__(self) -> str:
        return (
            f"Reference(start={self.start:#x}, length={self.length:#x}, owner={self.owner}, "
            f"cookie={self.cookie}, offset={self.offset:#x}, slot={self.slot}, "
            f"generation={self.generation})"
        )


_new_reference = Reference.__new__
_tls = threading.local()
_get = lib.svm_reg_get
_put = lib.svm_reg_put
_ENOTFOUND = lib.SVM_ENOTFOUND
# struct svm_ref, read as seven u64 in this order (checked field by field).
_REF_FIELDS = ("start", "length", "owner", "cookie", "generation", "offset", "slot")
_REF = struct.Struct("=7Q")
_unpack_ref = _REF.unpack_from
assert _REF.size == ffi.sizeof("struct svm_ref")
assert all(ffi.offsetof("struct svm_ref", f) == 8 * i for i, f in enumerate(_REF_FIELDS))


def _holder_pid(tid: int) -> int | None:
    """Process id of the thread ``tid`` (its thread-group id), if visible."""
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _check_u64(name: str, value: int) -> None:
    if not isinstance(value, int) or not 0 <= value <= U64_MAX:
        raise ValueError(f"{name} must be an integer in [0, 2**64), not {value!r}")


class Registry:
    """A handle on one registry segment, usable from many threads.

    ``Registry.create(name)`` makes and formats a new segment (the VMM);
    ``Registry.attach(name)`` maps an existing one and refuses anything
    whose header it does not understand (device processes);
    ``Registry.from_fd(fd)`` does the same for a descriptor received over a
    socket.  Every operation waits at most ``lock_timeout`` seconds for the
    lock and raises :class:`LockTimeout` naming the holder after that.
    """

    def __init__(self, handle, name: str | None, lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
                 fd: int | None = None):
        self._h = handle
        self.name = name
        #: For a sealed registry: the memfd to hand to device processes.
        self.fd = fd
        self.capacity = lib.svm_reg_capacity(handle)
        self.lock_timeout = lock_timeout

    # -- lifetime ------------------------------------------------------

    @classmethod
    def create(cls, name: str, capacity: int = DEFAULT_CAPACITY, **kw) -> Registry:
        """Create and format a new segment ``name`` (fails if it exists)."""
        size = lib.svm_reg_size(capacity) if isinstance(capacity, int) and 0 < capacity < 2**32 else 0
        if size == 0:
            raise ValueError(f"capacity must be in [1, 2**20], not {capacity!r}")
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
        try:
            handle = cls._open(shm.fd, True, capacity)
        except BaseException:
            shm.close_fd()
            shm.unlink()
            raise
        shm.close_fd()
        return cls(handle, name, **kw)

    @classmethod
    def create_sealed(cls, capacity: int = DEFAULT_CAPACITY, **kw) -> Registry:
        """Create a registry in an anonymous memfd whose size is sealed.

        This is what the VMM uses: ``fd`` goes to device processes (they map
        it with :meth:`from_fd`), and because it can neither shrink nor grow,
        a device cannot truncate it under the VMM to make the VMM's next
        access fault (SIGBUS), which it could do to a POSIX shm segment.
        The memory goes away with the last descriptor and mapping, so a
        killed VMM leaves nothing behind in /dev/shm."""
        size = lib.svm_reg_size(capacity) if isinstance(capacity, int) and 0 < capacity < 2**32 else 0
        if size == 0:
            raise ValueError(f"capacity must be in [1, 2**20], not {capacity!r}")
        fd = os.memfd_create("splitvmm-registry", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            handle = cls._open(fd, True, capacity)
        except BaseException:
            os.close(fd)
            raise
        return cls(handle, None, fd=fd, **kw)

    @classmethod
    def attach(cls, name: str, **kw) -> Registry:
        """Map the existing segment ``name``."""
        try:
            shm = posix_ipc.SharedMemory(name)
        except posix_ipc.ExistentialError as e:
            raise LayoutError(f"no registry segment named {name!r}") from e
        try:
            handle = cls._open(shm.fd, False, 0)
        finally:
            shm.close_fd()
        return cls(handle, name, **kw)

    @classmethod
    def from_fd(cls, fd: int, **kw) -> Registry:
        """Map the segment open on ``fd`` (the caller keeps ``fd``)."""
        return cls(cls._open(fd, False, 0), None, **kw)

    @staticmethod
    def _open(fd: int, create: bool, capacity: int):
        out = ffi.new("struct svm_reg **")
        rc = lib.svm_reg_open(fd, 1 if create else 0, capacity, out)
        if rc == lib.SVM_ELAYOUT:
            why = ffi.string(lib.svm_reg_layout_reason()).decode()
            raise LayoutError(f"not a splitvmm registry segment of layout version {lib.SVM_VERSION}: {why}")
        if rc == lib.SVM_ESYS:
            err = lib.svm_reg_errno()
            raise OSError(err, f"mapping the registry: {os.strerror(err)}")
        if rc != lib.SVM_OK:
            raise RegistryError(f"cannot open registry segment (code {rc})")
        return out[0]

    def close(self) -> None:
        """Unmap the segment.  References still held become invalid."""
        if self._h is not None:
            lib.svm_reg_close(self._h)
            self._h = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def unlink(self) -> None:
        """Remove the segment's name (mappings stay valid until closed)."""
        if self.name is not None:
            try:
                posix_ipc.unlink_shared_memory(self.name)
            except posix_ipc.ExistentialError:
                pass

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    @property
    def closed(self) -> bool:
        return self._h is None

    def _handle(self):
        h = self._h
        if h is None:
            raise RegistryError("registry is closed")
        return h

    @property
    def lock_timeout(self) -> float:
        """Default deadline, in seconds, of every wait for the lock."""
        return self._timeout_ns / 1e9

    @lock_timeout.setter
    def lock_timeout(self, seconds: float) -> None:
        if not seconds >= 0:
            raise ValueError(f"lock timeout must be >= 0 s, not {seconds!r}")
        self._timeout_ns = int(seconds * 1e9)

    def _ns(self, timeout: float | None) -> int:
        return int((self.lock_timeout if timeout is None else timeout) * 1e9)

    def error(self, rc: int, timeout: float | None = None, what: str = "") -> Exception:
        """The exception of the C core's return code ``rc`` (not raised):
        what this class raises for it, so that a caller of the C core
        (:meth:`c_api`) handles failures exactly as a Python caller does.
        ``timeout``: the deadline that was missed (default: this handle's)."""
        if rc == lib.SVM_ETIMEDOUT:
            holder = ffi.new("struct svm_holder *")
            lib.svm_reg_holder(self._handle(), holder)
            pid = _holder_pid(holder.tid) if holder.tid > 0 else None
            return LockTimeout(pid or holder.pid or None, holder.tid,
                               self.lock_timeout if timeout is None else timeout)
        if rc == lib.SVM_ECONFLICT:
            return RegionConflict(what or "range overlaps a registered region")
        if rc == lib.SVM_EFULL:
            return RegistryFull(f"all {self.capacity} registry slots are in use")
        if rc == lib.SVM_ENOTFOUND:
            return RegionNotFound(what or "no such region")
        if rc == lib.SVM_ESTALE:
            return StaleReference(what or "reference was already put or is stale")
        if rc == lib.SVM_EINVAL:
            return ValueError(what or "invalid argument")
        if rc == lib.SVM_ELOCK:
            return LockUnusable("registry lock unusable from this thread (no robust list, or locks nested too deeply)")
        return RegistryError(f"registry call failed (code {rc})")

    def _raise(self, rc: int, timeout: float | None, what: str = "") -> None:
        raise self.error(rc, timeout, what)

    def c_api(self) -> CApi:
        """This registry's C core as addresses, for C code in another
        extension module (see :class:`CApi`).  Raises RegistryError when
        the registry is closed."""
        return CApi(handle=int(ffi.cast("uintptr_t", self._handle())),
                    get=int(ffi.cast("uintptr_t", ffi.addressof(lib, "svm_reg_get"))),
                    put=int(ffi.cast("uintptr_t", ffi.addressof(lib, "svm_reg_put"))))

    # -- operations ----------------------------------------------------

    def register(self, bus: Bus, start: int, length: int, owner: int, cookie: int = 0,
                 timeout: float | None = None) -> None:
        """Claim ``[start, start + length)`` on ``bus`` for ``owner``.

        Raises ValueError for an empty or wrapping range,
        :class:`RegionConflict` on overlap, :class:`RegistryFull`.
        """
        bus = Bus(bus)
        for n, v in (("start", start), ("length", length), ("owner", owner), ("cookie", cookie)):
            _check_u64(n, v)
        if length == 0:
            raise ValueError("region length must not be zero")
        if start + length - 1 > U64_MAX:
            raise ValueError(f"region {start:#x}+{length:#x} wraps around the address space")
        rc = lib.svm_reg_register(self._handle(), bus, start, length, owner, cookie, self._ns(timeout))
        if rc:
            self._raise(rc, timeout, f"{bus.name} {start:#x}+{length:#x} overlaps a registered region")

    def get(self, bus: Bus | int, addr: int, size: int = 1, timeout: float | None = None) -> Reference | None:
        """Look up the region containing ``[addr, addr + size)`` and count a
        reference to it; None when no single region contains the access."""
        # The hot path of every guest access: kept free of anything that
        # is not needed (measured in ipc.bench).
        try:
            out, buf = _tls.io
        except AttributeError:
            out = ffi.new("struct svm_ref *")
            _tls.io = out, buf = out, ffi.buffer(out)
        h = self._h
        if h is None:
            self._handle()
        try:
            rc = _get(h, bus, addr, size, out, self._timeout_ns if timeout is None else self._ns(timeout))
        except (OverflowError, TypeError) as e:
            raise ValueError(f"bad access {addr!r}+{size!r}: {e}") from None
        if rc:
            if rc == _ENOTFOUND:
                return None
            if rc == lib.SVM_EINVAL:
                raise ValueError(f"access {addr:#x}+{size:#x} is empty or the bus is bad")
            self._raise(rc, timeout)
        ref = _new_reference(Reference)
        ref.start, ref.length, ref.owner, ref.cookie, ref.generation, ref.offset, ref.slot = _unpack_ref(buf)
        ref._registry = self
        return ref

    def put(self, ref: Reference, timeout: float | None = None) -> None:
        """Give a reference back; frees the slot if it was unregistered and
        this was its last reference.  A second put raises StaleReference."""
        if ref._registry is not self:
            if ref._registry is None:
                raise StaleReference("reference was already put")
            raise StaleReference("reference belongs to another registry handle")
        ref._registry = None
        h = self._h
        if h is None:
            self._handle()
        rc = _put(h, ref.slot, ref.generation, self._timeout_ns if timeout is None else self._ns(timeout))
        if rc:
            if rc == lib.SVM_ETIMEDOUT:
                ref._registry = self  # nothing happened; it may be put again
            self._raise(rc, timeout, f"reference to slot {ref.slot} generation {ref.generation} is stale")

    def unregister(self, bus: Bus, start: int, owner: int, timeout: float | None = None) -> None:
        """Take ``owner``'s region starting at ``start`` out of the index now;
        its slot is freed at once or at its last put."""
        bus = Bus(bus)
        _check_u64("start", start)
        _check_u64("owner", owner)
        rc = lib.svm_reg_unregister(self._handle(), bus, start, owner, self._ns(timeout))
        if rc:
            self._raise(rc, timeout, f"no {bus.name} region at {start:#x} owned by {owner}")

    def unregister_owner(self, owner: int, timeout: float | None = None) -> int:
        """Unregister every region of ``owner``; returns how many."""
        _check_u64("owner", owner)
        count = ffi.new("uint32_t *")
        rc = lib.svm_reg_unregister_owner(self._handle(), owner, count, self._ns(timeout))
        if rc:
            self._raise(rc, timeout)
        return count[0]

    # -- inspection ----------------------------------------------------

    def _snapshot(self, timeout: float | None = None):
        cap = self.capacity
        slots = ffi.new("struct svm_slot_view[]", cap)
        counts = ffi.new("uint32_t[]", lib.SVM_NBUS)
        keys = ffi.new("uint64_t[]", lib.SVM_NBUS * cap)
        index = ffi.new("uint32_t[]", lib.SVM_NBUS * cap)
        rc = lib.svm_reg_snapshot(self._handle(), slots, counts, keys, index, self._ns(timeout))
        if rc:
            self._raise(rc, timeout)
        return slots, counts, keys, index

    def regions(self, timeout: float | None = None) -> list[RegionRecord]:
        """Every slot in use (live or waiting for its last put)."""
        slots, _, _, _ = self._snapshot(timeout)
        out = []
        for i in range(self.capacity):
            s = slots[i]
            if s.state == lib.SVM_FREE:
                continue
            out.append(RegionRecord(
                bus=Bus(s.bus) if s.bus < lib.SVM_NBUS else s.bus,
                start=s.start, length=s.length, owner=s.owner, cookie=s.cookie,
                refcount=s.refcount, removing=s.state == lib.SVM_REMOVING,
                slot=i, generation=s.generation,
            ))
        return out

    def check(self, timeout: float | None = None) -> list[str]:
        """Invariant violations of the segment (empty when healthy)."""
        slots, counts, keys, index = self._snapshot(timeout)
        cap = self.capacity
        problems: list[str] = []
        indexed: dict[int, int] = {}
        for bus in range(lib.SVM_NBUS):
            n = counts[bus]
            name = Bus(bus).name
            if n > cap:
                problems.append(f"{name}: index count {n} exceeds capacity {cap}")
                n = cap
            prev_last = None
            for k in range(n):
                i = index[bus * cap + k]
                if i >= cap:
                    problems.append(f"{name}[{k}]: slot {i} out of range")
                    continue
                if i in indexed:
                    problems.append(f"{name}[{k}]: slot {i} indexed twice")
                indexed[i] = bus
                s = slots[i]
                if keys[bus * cap + k] != s.start:
                    problems.append(f"{name}[{k}]: key {keys[bus * cap + k]:#x} differs from slot {i} start {s.start:#x}")
                if s.state != lib.SVM_LIVE:
                    problems.append(f"{name}[{k}]: slot {i} is indexed but not live (state {s.state})")
                if s.bus != bus:
                    problems.append(f"{name}[{k}]: slot {i} belongs to bus {s.bus}")
                if s.length == 0 or s.start + s.length - 1 > U64_MAX:
                    problems.append(f"{name}[{k}]: slot {i} range {s.start:#x}+{s.length:#x} invalid")
                    continue
                if prev_last is not None and s.start <= prev_last:
                    problems.append(f"{name}[{k}]: slot {i} at {s.start:#x} overlaps or is out of order")
                prev_last = s.start + s.length - 1
        for i in range(cap):
            s = slots[i]
            if s.state == lib.SVM_FREE:
                if s.refcount:
                    problems.append(f"slot {i}: free but refcount {s.refcount}")
            elif s.state == lib.SVM_LIVE:
                if i not in indexed:
                    problems.append(f"slot {i}: live but missing from the index")
            elif s.state == lib.SVM_REMOVING:
                if s.refcount == 0:
                    problems.append(f"slot {i}: removing with no reference left")
                if i in indexed:
                    problems.append(f"slot {i}: removing but still indexed")
            else:
                problems.append(f"slot {i}: invalid state {s.state}")
        return problems

    def repair(self, timeout: float | None = None) -> int:
        """Rebuild the index from the slots, as owner-death recovery does;
        returns how many inconsistencies were fixed."""
        fixed = ffi.new("uint32_t *")
        rc = lib.svm_reg_repair(self._handle(), fixed, self._ns(timeout))
        if rc:
            self._raise(rc, timeout)
        return fixed[0]

    def reinitialize(self) -> None:
        """Format the segment again: empty registry, free lock.  Only for
        the segment's creator, when nothing else uses it any more."""
        rc = lib.svm_reg_reinit(self._handle())
        if rc:
            self._raise(rc, None)

    @property
    def recoveries(self) -> int:
        """How often a locker found the previous holder dead and recovered."""
        return lib.svm_reg_recoveries(self._handle())

    def holder(self) -> tuple[int, int]:
        """(pid, tid) of the current lock holder as recorded; 0 when free."""
        out = ffi.new("struct svm_holder *")
        lib.svm_reg_holder(self._handle(), out)
        return (_holder_pid(out.tid) or out.pid if out.tid else 0), out.tid


def take_lock_for_fault(registry: Registry, timeout: float = 30.0) -> None:
    """Take ``registry``'s lock on the calling thread and return holding it
    (fault injection, devices.faults ``process`` actions: a device that
    keeps the lock, or dies holding it).  Never released here: the thread
    keeps it until the process ends, when the kernel marks it owner-died.
    Raises :class:`LockTimeout` when it is not free within ``timeout``."""
    rc = lib.svm_reg_lock_for_test(registry._handle(), int(timeout * 1e9))
    if rc:
        registry._raise(rc, timeout)
