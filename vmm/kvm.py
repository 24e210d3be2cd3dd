"""The KVM API as Python objects: /dev/kvm, a VM fd, a vCPU fd.

The only module of :mod:`vmm` that touches ``vmm._kvm_c.lib``.  Each
method is one ioctl (Documentation/virt/kvm/api.rst, section 4, names the
ioctl in its docstring) issued through cffi -- never ``fcntl.ioctl``, which
newer CPython retries on EINTR and so would swallow a vCPU kick.  cffi
releases the GIL around every call, so ``KVM_RUN`` blocks one vCPU thread
only.  A negative return becomes :class:`KvmError` carrying the errno name.

Constants (exit reasons and the like) are re-exported under their KVM
names without the ``KVM_`` prefix; their values come from <linux/kvm.h>
through the compiler.
"""

from __future__ import annotations

import errno
import functools
import os
import struct

from vmm._kvm_c import ffi, lib
from vmm.endpoint import VmmError

__all__ = ["ffi", "Kvm", "Vm", "Vcpu", "KvmError", "FastPath", "CoalescedRing", "install_kick_handler",
           "exit_reason_name"]

KVM_DEVICE = "/dev/kvm"

_ioctl = lib.ioctl
_ZERO = ffi.cast("unsigned long", 0)

# Exit reasons, internal-error sub-types, system events, MP states.
EXIT_IO = lib.KVM_EXIT_IO
EXIT_MMIO = lib.KVM_EXIT_MMIO
EXIT_HLT = lib.KVM_EXIT_HLT
EXIT_SHUTDOWN = lib.KVM_EXIT_SHUTDOWN
EXIT_FAIL_ENTRY = lib.KVM_EXIT_FAIL_ENTRY
EXIT_INTR = lib.KVM_EXIT_INTR
EXIT_INTERNAL_ERROR = lib.KVM_EXIT_INTERNAL_ERROR
EXIT_SYSTEM_EVENT = lib.KVM_EXIT_SYSTEM_EVENT
EXIT_UNKNOWN = lib.KVM_EXIT_UNKNOWN
EXIT_IO_IN = lib.KVM_EXIT_IO_IN
EXIT_IO_OUT = lib.KVM_EXIT_IO_OUT
INTERNAL_ERROR_EMULATION = lib.KVM_INTERNAL_ERROR_EMULATION
INTERNAL_ERROR_FLAG_INSN_BYTES = lib.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
SYSTEM_EVENT_SHUTDOWN = lib.KVM_SYSTEM_EVENT_SHUTDOWN
SYSTEM_EVENT_RESET = lib.KVM_SYSTEM_EVENT_RESET
SYSTEM_EVENT_CRASH = lib.KVM_SYSTEM_EVENT_CRASH
MP_STATE_RUNNABLE = lib.KVM_MP_STATE_RUNNABLE
MP_STATE_HALTED = lib.KVM_MP_STATE_HALTED
MP_STATE_UNINITIALIZED = lib.KVM_MP_STATE_UNINITIALIZED
PIT_SPEAKER_DUMMY = lib.KVM_PIT_SPEAKER_DUMMY

_EXIT_NAMES = {
    getattr(lib, name): name[len("KVM_"):]
    for name in dir(lib)
    if name.startswith("KVM_EXIT_") and name not in ("KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT")
}

_INTERNAL_NAMES = {
    lib.KVM_INTERNAL_ERROR_EMULATION: "emulation failure",
    lib.KVM_INTERNAL_ERROR_SIMUL_EX: "exception while delivering an exception",
    lib.KVM_INTERNAL_ERROR_DELIVERY_EV: "event delivery failed",
    lib.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "unexpected exit reason",
}

#: Largest CPUID table asked of KVM_GET_SUPPORTED_CPUID before giving up.
MAX_CPUID_ENTRIES = 1024


def exit_reason_name(reason: int) -> str:
    """``EXIT_MMIO`` for 6, ``exit 99`` for an unknown one."""
    return _EXIT_NAMES.get(reason, f"exit {reason}")


def internal_error_name(suberror: int) -> str:
    return _INTERNAL_NAMES.get(suberror, f"suberror {suberror}")


class KvmError(VmmError, OSError):
    """A KVM ioctl failed; ``errno`` holds the code, the message its name."""

    def __init__(self, what: str, err: int):
        name = errno.errorcode.get(err, str(err))
        OSError.__init__(self, err, f"{what}: {name} ({os.strerror(err)})")

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise KvmError(what, ffi.errno)
    return rc


def _arg(value: int):
    return ffi.cast("unsigned long", value)


def install_kick_handler(signo: int) -> None:
    """Give ``signo`` a handler that does nothing (installed in C, without
    SA_RESTART), so a thread kicked with it leaves ``KVM_RUN`` with EINTR
    and the main thread's Python signal handling is not involved."""
    rc = lib.svmm_install_kick_handler(signo)
    if rc < 0:
        raise KvmError(f"sigaction({signo})", -rc)


class _Fd:
    fd: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _ioctl_ptr(self, request: int, arg, what: str) -> int:
        return _check(_ioctl(self.fd, request, arg), what)

    def _ioctl_int(self, request: int, value: int, what: str) -> int:
        return _check(_ioctl(self.fd, request, _arg(value)), what)


class Kvm(_Fd):
    """``/dev/kvm``: capability checks, CPUID, VM creation."""

    def __init__(self, path: str = KVM_DEVICE):
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KvmError(f"opening {path}", e.errno or errno.ENODEV) from None
        try:
            version = self._ioctl_int(lib.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
            if version != lib.KVM_API_VERSION:
                raise VmmError(f"KVM API version {version}, expected {lib.KVM_API_VERSION}")
            for cap in ("IRQCHIP", "PIT2", "USER_MEMORY", "SET_TSS_ADDR", "EXT_CPUID",
                        "MP_STATE", "IMMEDIATE_EXIT"):
                if not self.check_extension(getattr(lib, f"KVM_CAP_{cap}")):
                    raise VmmError(f"KVM lacks KVM_CAP_{cap}, which splitvmm needs")
            self.vcpu_mmap_size = self._ioctl_int(lib.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")
        except BaseException:
            self.close()
            raise

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 when absent, else a cap-specific value."""
        return max(0, _ioctl(self.fd, lib.KVM_CHECK_EXTENSION, _arg(cap)))

    @property
    def coalesced_mmio_page(self) -> int:
        """KVM_CAP_COALESCED_MMIO: the page of every vCPU mapping that holds
        the VM's coalesced-MMIO ring (0: KVM has no coalesced MMIO, or a
        ring this code cannot read -- pages other than 4 KiB)."""
        page = self.check_extension(lib.KVM_CAP_COALESCED_MMIO)
        if page <= 0 or os.sysconf("SC_PAGE_SIZE") != lib.SVMM_COALESCED_PAGE:
            return 0
        if (page + 1) * lib.SVMM_COALESCED_PAGE > self.vcpu_mmap_size:
            return 0
        return page

    @property
    def max_vcpus(self) -> int:
        return self.check_extension(lib.KVM_CAP_MAX_VCPUS) or self.check_extension(lib.KVM_CAP_NR_VCPUS) or 4

    def supported_cpuid(self) -> Cpuid:
        """KVM_GET_SUPPORTED_CPUID, growing the table on E2BIG."""
        n = 128
        while True:
            table = Cpuid(n)
            rc = _ioctl(self.fd, lib.KVM_GET_SUPPORTED_CPUID, table.ptr)
            if rc >= 0:
                return table
            err = ffi.errno
            if err != errno.E2BIG or n >= MAX_CPUID_ENTRIES:
                raise KvmError("KVM_GET_SUPPORTED_CPUID", err)
            n *= 2

    def create_vm(self) -> Vm:
        """KVM_CREATE_VM (default machine type)."""
        fd = self._ioctl_int(lib.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
        os.set_inheritable(fd, False)
        return Vm(fd, self.vcpu_mmap_size)


class Cpuid:
    """A ``struct kvm_cpuid2`` with room for ``capacity`` entries."""

    def __init__(self, capacity: int):
        entry = ffi.sizeof("struct kvm_cpuid_entry2")
        self._raw = ffi.new("char[]", lib.SVMM_CPUID2_ENTRIES + capacity * entry)
        self.ptr = ffi.cast("struct kvm_cpuid2 *", self._raw)
        self.ptr.nent = capacity
        self._entries = ffi.cast("struct kvm_cpuid_entry2 *", self._raw + lib.SVMM_CPUID2_ENTRIES)

    def __len__(self) -> int:
        return self.ptr.nent

    def __getitem__(self, i: int):
        if not 0 <= i < self.ptr.nent:
            raise IndexError(i)
        return self._entries[i]

    def __iter__(self):
        return (self._entries[i] for i in range(self.ptr.nent))

    def copy(self) -> Cpuid:
        other = Cpuid(self.ptr.nent)
        ffi.memmove(other._raw, self._raw, len(other._raw))
        return other


class Vm(_Fd):
    """A VM fd: machine set-up and vCPU creation."""

    def __init__(self, fd: int, vcpu_mmap_size: int):
        self.fd = fd
        self.vcpu_mmap_size = vcpu_mmap_size

    def set_tss_addr(self, addr: int) -> None:
        """KVM_SET_TSS_ADDR: three pages of guest-physical space KVM may use."""
        self._ioctl_int(lib.KVM_SET_TSS_ADDR, addr, "KVM_SET_TSS_ADDR")

    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP: in-kernel PIC, IOAPIC and a LAPIC per vCPU."""
        self._ioctl_int(lib.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")

    def create_pit2(self, flags: int = PIT_SPEAKER_DUMMY) -> None:
        """KVM_CREATE_PIT2: in-kernel i8254 (and a dummy port 0x61 speaker)."""
        cfg = ffi.new("struct kvm_pit_config *")
        cfg.flags = flags
        self._ioctl_ptr(lib.KVM_CREATE_PIT2, cfg, "KVM_CREATE_PIT2")

    def set_pit_reinject(self, reinject: bool) -> None:
        """KVM_REINJECT_CONTROL: whether the in-kernel PIT re-injects ticks
        the guest missed (on from KVM_CREATE_PIT2).  Turning it off
        unhooks the PIT's interrupt-acknowledge and mask notifiers, which
        waits for two SRCU grace periods (7-16 ms on this nested host):
        the cost that otherwise falls on the VM fd's last close."""
        ctl = ffi.new("struct kvm_reinject_control *")
        ctl.pit_reinject = 1 if reinject else 0
        self._ioctl_ptr(lib.KVM_REINJECT_CONTROL, ctl, "KVM_REINJECT_CONTROL")

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, size: int,
                               userspace_addr: int, flags: int = 0) -> None:
        """KVM_SET_USER_MEMORY_REGION."""
        r = ffi.new("struct kvm_userspace_memory_region *")
        r.slot, r.flags = slot, flags
        r.guest_phys_addr, r.memory_size, r.userspace_addr = guest_phys_addr, size, userspace_addr
        self._ioctl_ptr(lib.KVM_SET_USER_MEMORY_REGION, r,
                        f"KVM_SET_USER_MEMORY_REGION slot {slot} at {guest_phys_addr:#x}+{size:#x}")

    # -- interrupts (vmm.irq keeps the routing table) ------------------

    def irq_line(self, gsi: int, level: int) -> None:
        """KVM_IRQ_LINE: drive irqchip input ``gsi`` to ``level``."""
        rc = lib.svmm_irq_line(self.fd, gsi, level)
        if rc < 0:
            raise KvmError(f"KVM_IRQ_LINE gsi {gsi}", -rc)

    def set_gsi_routing(self, routes) -> None:
        """KVM_SET_GSI_ROUTING: replace the whole routing table with
        ``routes``, (gsi, type, a, b, c) tuples (see ``svmm_route``)."""
        table = ffi.new("svmm_route[]", max(1, len(routes)))
        for i, (gsi, kind, a, b, c) in enumerate(routes):
            table[i].gsi, table[i].type, table[i].a, table[i].b, table[i].c = gsi, kind, a, b, c
        rc = lib.svmm_set_gsi_routing(self.fd, table, len(routes))
        if rc < 0:
            raise KvmError(f"KVM_SET_GSI_ROUTING ({len(routes)} routes)", -rc)

    def irqfd(self, fd: int, gsi: int, deassign: bool = False) -> None:
        """KVM_IRQFD: a write to eventfd ``fd`` raises ``gsi`` (an edge);
        ``deassign`` removes that binding."""
        req = ffi.new("struct kvm_irqfd *")
        req.fd, req.gsi = fd, gsi
        req.flags = lib.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        self._ioctl_ptr(lib.KVM_IRQFD, req, f"KVM_IRQFD{' deassign' if deassign else ''} gsi {gsi}")

    def ioeventfd(self, fd: int, address: int, length: int, pio: bool = False,
                  datamatch: int | None = None, deassign: bool = False) -> None:
        """KVM_IOEVENTFD: a guest write of ``length`` bytes (0: any, MMIO
        only) at ``address`` (a port when ``pio``) signals eventfd ``fd``
        instead of exiting -- only writes of ``datamatch`` when given;
        ``deassign`` removes the binding (the same arguments)."""
        req = ffi.new("struct kvm_ioeventfd *")
        req.addr, req.len, req.fd = address, length, fd
        flags = 0
        if pio:
            flags |= lib.KVM_IOEVENTFD_FLAG_PIO
        if datamatch is not None:
            flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
            req.datamatch = datamatch
        if deassign:
            flags |= lib.KVM_IOEVENTFD_FLAG_DEASSIGN
        req.flags = flags
        self._ioctl_ptr(lib.KVM_IOEVENTFD, req,
                        f"KVM_IOEVENTFD{' deassign' if deassign else ''} {'PIO' if pio else 'MMIO'} "
                        f"{address:#x}+{length}")

    def coalesced_mmio(self, address: int, size: int, unregister: bool = False) -> None:
        """KVM_REGISTER_COALESCED_MMIO (``unregister``: KVM_UNREGISTER_...)
        of the zone ``[address, address + size)``: guest writes there are
        queued in the ring instead of exiting; reads still exit."""
        zone = ffi.new("struct kvm_coalesced_mmio_zone *")
        zone.addr, zone.size = address, size
        name = "KVM_UNREGISTER_COALESCED_MMIO" if unregister else "KVM_REGISTER_COALESCED_MMIO"
        request = lib.KVM_UNREGISTER_COALESCED_MMIO if unregister else lib.KVM_REGISTER_COALESCED_MMIO
        self._ioctl_ptr(request, zone, f"{name} {address:#x}+{size:#x}")

    def signal_msi(self, address: int, data: int) -> int:
        """KVM_SIGNAL_MSI: inject one MSI; >0 delivered, 0 blocked by the guest."""
        msi = ffi.new("struct kvm_msi *")
        msi.address_lo, msi.address_hi, msi.data = address & 0xFFFF_FFFF, address >> 32, data
        return self._ioctl_ptr(lib.KVM_SIGNAL_MSI, msi, f"KVM_SIGNAL_MSI {address:#x}/{data:#x}")

    def create_vcpu(self, index: int) -> Vcpu:
        """KVM_CREATE_VCPU with vCPU (and APIC) id ``index``; maps its kvm_run."""
        fd = self._ioctl_int(lib.KVM_CREATE_VCPU, index, f"KVM_CREATE_VCPU {index}")
        os.set_inheritable(fd, False)
        try:
            return Vcpu(fd, index, self.vcpu_mmap_size)
        except BaseException:
            os.close(fd)
            raise


class Vcpu(_Fd):
    """A vCPU fd and its shared ``struct kvm_run`` page.

    ``run`` is the struct; ``io``, ``mmio``, ``internal``, ... are typed
    views of the members of its exit union, ``page`` the whole mapping as
    a writable buffer (string I/O data lives at ``io.data_offset`` in it).
    """

    def __init__(self, fd: int, index: int, mmap_size: int):
        self.fd = fd
        self.index = index
        self._size = mmap_size
        addr = lib.mmap(ffi.NULL, mmap_size, lib.PROT_READ | lib.PROT_WRITE, lib.MAP_SHARED, fd, 0)
        if int(ffi.cast("long", addr)) == lib.SVMM_MAP_FAILED:
            raise KvmError("mmap of kvm_run", ffi.errno)
        self._addr = addr
        base = ffi.cast("char *", addr)
        self.run = ffi.cast("struct kvm_run *", base)
        self.io = ffi.cast("svmm_run_io *", base + lib.SVMM_RUN_IO)
        self.mmio = ffi.cast("svmm_run_mmio *", base + lib.SVMM_RUN_MMIO)
        self.internal = ffi.cast("svmm_run_internal *", base + lib.SVMM_RUN_INTERNAL)
        self.emulation_failure = ffi.cast("svmm_run_emulation_failure *", base + lib.SVMM_RUN_EMULATION_FAILURE)
        self.fail_entry = ffi.cast("svmm_run_fail_entry *", base + lib.SVMM_RUN_FAIL_ENTRY)
        self.hw = ffi.cast("svmm_run_hw *", base + lib.SVMM_RUN_HW)
        self.system_event = ffi.cast("svmm_run_system_event *", base + lib.SVMM_RUN_SYSTEM_EVENT)
        self.page = ffi.buffer(base, mmap_size)
        #: Offset of ``mmio.data`` in :attr:`page`.
        self.mmio_data_offset = lib.SVMM_RUN_MMIO + ffi.offsetof("svmm_run_mmio", "data")
        self._run_request = lib.KVM_RUN

    # -- KVM_RUN ------------------------------------------------------

    def run_once(self) -> int:
        """KVM_RUN: 0 after an exit to handle, or EINTR/EAGAIN when kicked
        (``immediate_exit`` or a signal).  Other failures raise."""
        if _ioctl(self.fd, self._run_request, _ZERO) == 0:
            return 0
        err = ffi.errno
        if err in (errno.EINTR, errno.EAGAIN):
            return err
        raise KvmError(f"KVM_RUN on vCPU {self.index}", err)

    def coalesced_ring(self, page: int) -> CoalescedRing:
        """The VM's coalesced-MMIO ring as seen through this vCPU's mapping
        (``page``: :attr:`Kvm.coalesced_mmio_page`); valid while this vCPU
        is open."""
        if not (0 < page and (page + 1) * lib.SVMM_COALESCED_PAGE <= self._size):
            raise ValueError(f"coalesced-MMIO page {page} is outside the vCPU mapping")
        return CoalescedRing(ffi.cast("char *", self._addr) + page * lib.SVMM_COALESCED_PAGE)

    def emulation_insn_bytes(self) -> bytes | None:
        """The instruction bytes KVM put in an emulation-failure exit, if any."""
        ef = self.emulation_failure
        if ef.ndata < 1 or not ef.flags & INTERNAL_ERROR_FLAG_INSN_BYTES:
            return None
        base = lib.SVMM_RUN_EMULATION_FAILURE
        size = self.page[base + lib.SVMM_EMULATION_FAILURE_INSN_SIZE][0]
        start = base + lib.SVMM_EMULATION_FAILURE_INSN_BYTES
        return bytes(self.page[start:start + min(size, 15)])

    def system_event_data(self) -> list[int]:
        ev = self.system_event
        n = min(ev.ndata, 16)
        data = ffi.cast("uint64_t *", ffi.cast("char *", self.system_event) + lib.SVMM_SYSTEM_EVENT_DATA)
        return [data[i] for i in range(n)]

    # -- state --------------------------------------------------------

    def get_regs(self):
        """KVM_GET_REGS -> ``struct kvm_regs``."""
        regs = ffi.new("struct kvm_regs *")
        self._ioctl_ptr(lib.KVM_GET_REGS, regs, "KVM_GET_REGS")
        return regs

    def set_regs(self, regs) -> None:
        """KVM_SET_REGS."""
        self._ioctl_ptr(lib.KVM_SET_REGS, regs, "KVM_SET_REGS")

    def get_sregs(self):
        """KVM_GET_SREGS -> ``struct kvm_sregs``."""
        sregs = ffi.new("struct kvm_sregs *")
        self._ioctl_ptr(lib.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        return sregs

    def set_sregs(self, sregs) -> None:
        """KVM_SET_SREGS."""
        self._ioctl_ptr(lib.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def get_vcpu_events(self):
        """KVM_GET_VCPU_EVENTS -> ``struct kvm_vcpu_events``."""
        events = ffi.new("struct kvm_vcpu_events *")
        self._ioctl_ptr(lib.KVM_GET_VCPU_EVENTS, events, "KVM_GET_VCPU_EVENTS")
        return events

    def set_vcpu_events(self, events) -> None:
        """KVM_SET_VCPU_EVENTS."""
        self._ioctl_ptr(lib.KVM_SET_VCPU_EVENTS, events, "KVM_SET_VCPU_EVENTS")

    def get_xsave(self) -> bytearray:
        """KVM_GET_XSAVE -> the 4 KiB XSAVE area (standard format)."""
        area = ffi.new("struct kvm_xsave *")
        self._ioctl_ptr(lib.KVM_GET_XSAVE, area, "KVM_GET_XSAVE")
        return bytearray(ffi.buffer(area, 4096))

    def set_xsave(self, data: bytes) -> None:
        """KVM_SET_XSAVE of a 4 KiB XSAVE area."""
        area = ffi.new("struct kvm_xsave *")
        ffi.memmove(area, bytes(data[:4096]), min(len(data), 4096))
        self._ioctl_ptr(lib.KVM_SET_XSAVE, area, "KVM_SET_XSAVE")

    def set_cpuid(self, cpuid: Cpuid) -> None:
        """KVM_SET_CPUID2."""
        self._ioctl_ptr(lib.KVM_SET_CPUID2, cpuid.ptr, "KVM_SET_CPUID2")

    def get_mp_state(self) -> int:
        """KVM_GET_MP_STATE."""
        st = ffi.new("struct kvm_mp_state *")
        self._ioctl_ptr(lib.KVM_GET_MP_STATE, st, "KVM_GET_MP_STATE")
        return st.mp_state

    def set_mp_state(self, state: int) -> None:
        """KVM_SET_MP_STATE."""
        st = ffi.new("struct kvm_mp_state *")
        st.mp_state = state
        self._ioctl_ptr(lib.KVM_SET_MP_STATE, st, "KVM_SET_MP_STATE")

    def close(self) -> None:
        if self._addr is not None:
            lib.munmap(self._addr, self._size)
            self._addr = None
            self.page = None
        super().close()


STEP_ACCESS = lib.SVMM_STEP_ACCESS
STEP_EXIT = lib.SVMM_STEP_EXIT
STEP_ERRNO = lib.SVMM_STEP_ERRNO
STEP_REGISTRY_ERROR = lib.SVMM_STEP_REGISTRY_ERROR
STEP_PUT_ERROR = lib.SVMM_STEP_PUT_ERROR
STEP_DRAIN = lib.SVMM_STEP_DRAIN
STEP_REFUSED = lib.SVMM_STEP_REFUSED
STEP_FORWARD_ERROR = lib.SVMM_STEP_FORWARD_ERROR
STEP_LOCAL = lib.SVMM_STEP_LOCAL

#: Entries of the coalesced-MMIO ring (KVM_COALESCED_MMIO_MAX).
COALESCED_MAX = lib.SVMM_COALESCED_MAX


class CoalescedRing:
    """The coalesced-MMIO ring page (``struct kvm_coalesced_mmio_ring``).

    :meth:`take` copies the queued writes out, oldest first, and gives
    their entries back to KVM.  The caller serialises takers (one ring per
    VM, many vCPUs)."""

    def __init__(self, address):
        self.address = address
        self._buf = ffi.new("uint64_t[]", 3 * COALESCED_MAX)
        self._view = memoryview(ffi.buffer(self._buf)).cast("Q")
        self._take = lib.svmm_coalesced_take
        self._pending = lib.svmm_coalesced_pending

    def pending(self) -> bool:
        return bool(self._pending(self.address))

    def take(self) -> list[tuple[int, int, int]]:
        """(guest-physical address, length, value) of each queued write.
        Entries of a length other than 1, 2, 4 or 8 are dropped (KVM
        never queues them); a ring with indices out of range is reset and
        raises :class:`KvmError`."""
        n = self._take(self.address, self._buf, COALESCED_MAX)
        if n < 0:
            raise KvmError("coalesced-MMIO ring indices out of range; ring reset", errno.EIO)
        flat = self._view[:3 * n].tolist()
        return list(zip(flat[0::3], flat[1::3], flat[2::3], strict=True))


# The access fields of struct svmm_vcpu, laid out in this order (checked).
_ACCESS = struct.Struct("=IIIIQQQQQ")
_ACCESS_AT = ffi.offsetof("struct svmm_vcpu", "bus")
if [ffi.offsetof("struct svmm_vcpu", f) - _ACCESS_AT
        for f in ("bus", "size", "is_write", "fresh", "addr", "value", "owner", "cookie", "offset")] \
        != [0, 4, 8, 12, 16, 24, 32, 40, 48]:
    raise ImportError("struct svmm_vcpu's access fields moved: update vmm.kvm._ACCESS")
#: The same fields without ``fresh`` and ``addr`` (what STEP_LOCAL needs).
_LOCAL = struct.Struct("=III4x8xQQQQ")
LOCAL_AT = _ACCESS_AT


class FastPath:
    """The C exit loop of one vCPU (``_vcpu.c``), bound to a registry.

    ``step()`` returns one of the ``STEP_*`` codes; after STEP_ACCESS the
    access is in ``ctx`` (``bus``, ``addr``, ``size``, ``is_write``,
    ``value``, ``owner``, ``cookie``, ``offset``) and the caller stores the
    value of a read in ``ctx.value`` before the next ``step()``, which
    completes it (and puts the registry reference).  STEP_REGISTRY_ERROR:
    the lookup failed (``reg_error``; the caller stores the value to read,
    all ones).  STEP_PUT_ERROR: that put missed the lock deadline; the
    reference is kept and the next ``step()`` puts again (set
    ``ctx.has_ref = 0`` to give it up).  STEP_DRAIN: the coalesced-MMIO
    ring (``ring``, when given) holds writes; the caller delivers them and
    the next ``step()`` handles the exit that found them.  STEP_REFUSED:
    the lookup found a region outside its owner's windows (``windows``,
    :mod:`vmm.windows`) and completed the access as unclaimed; the region
    is in ``owner``, ``cookie``, ``region_start``, ``region_length``,
    ``slot``, ``generation``.  With ``forwards`` (a ``struct
    svmm_forwards *``), an access to a device process whose forward is on
    goes into its slot in C and STEP_ACCESS is not returned for it;
    STEP_FORWARD_ERROR: that call failed (``fwd_rc``, ``fwd_aseq``,
    ``fwd_slots``, ``fwd_gen``), the caller completes it and stores the
    value as after STEP_ACCESS.  STEP_LOCAL: an access to a model in this process, whose
    forward has ``local`` set; the caller calls the model and stores the
    value as after STEP_ACCESS, and the step that completes it counts it in
    the forward's cell (``ctx.acct_failed = 1`` first: as failed).  ``finish()``
    completes a pending access without running the vCPU.
    """

    def __init__(self, vcpu: Vcpu, registry_handle: int, get_fn: int, put_fn: int, lock_timeout_ns: int,
                 ring: CoalescedRing | None = None, windows=None, forwards=None):
        ctx = ffi.new("struct svmm_vcpu *")
        ctx.index = vcpu.index
        #: ``struct svmm_forwards *`` (the dispatcher's), kept alive here.
        ctx.forwards = ffi.NULL if forwards is None else forwards
        self._forwards = forwards
        ctx.fd = vcpu.fd
        ctx.run = vcpu.run
        ctx.run_size = vcpu._size
        ctx.registry = registry_handle
        ctx.get_fn = get_fn
        ctx.put_fn = put_fn
        ctx.lock_timeout_ns = lock_timeout_ns
        ctx.ring = ffi.NULL if ring is None else ring.address
        #: ``struct svmm_windows *`` (vmm.windows), kept alive here.
        ctx.windows = ffi.NULL if windows is None else windows
        self._ring = ring
        self._windows = windows
        self.ctx = ctx
        self._step = lib.svmm_step
        self._finish = lib.svmm_finish
        #: The C step itself, ``c_step(ctx)``: ``step()`` without a Python
        #: frame, for the vCPU loop (one call per exit).
        self.c_step = lib.svmm_step
        #: ``ctx`` as bytes, and ``read_access(view)`` the access after
        #: STEP_ACCESS as one tuple (bus, size, is_write, fresh, addr,
        #: value, owner, cookie, offset): one call, not nine field reads.
        self.view = ffi.buffer(ctx)
        self.read_access = functools.partial(_ACCESS.unpack_from, offset=_ACCESS_AT)
        #: ``unpack_local(view, LOCAL_AT)``: (bus, size, is_write, value,
        #: owner, cookie, offset), after STEP_LOCAL (no partial: its keyword
        #: costs a dict per call, half of the unpack).
        self.unpack_local = _LOCAL.unpack_from
        #: ``c_step_value(ctx, value)``: ``c_step`` that stores ``value`` as
        #: the pending read's value first (svmm_step_value): the caller keeps
        #: the value of the access it served last and hands it in.
        self.c_step_value = lib.svmm_step_value
        #: ``account(ctx)``: count a STEP_LOCAL access now (svmm_account).
        self.account = lib.svmm_account

    def step(self) -> int:
        return self._step(self.ctx)

    def finish(self) -> None:
        self._finish(self.ctx)
