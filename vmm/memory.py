"""Guest RAM: one memfd, mapped shared, split around the MMIO hole.

The RAM lives in an anonymous memfd (``memfd_create(2)``) so that device
processes can map the very same pages later (the descriptor is kept open
and handed out with the table of :attr:`GuestMemory.regions`).  RAM up to
``layout.MMIO_HOLE_START`` sits at guest-physical 0; the rest continues at
4 GiB.  Each piece is one KVM memory slot.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import re

from devices.record import record
from vmm import layout
from vmm.endpoint import VmmError
from vmm.kvm import Vm, ffi


class GuestMemoryError(VmmError):
    """Guest RAM cannot be set up, or an access falls outside it."""


_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``256M``, ``1G``, ``65536`` (bytes), ``512MiB`` -> bytes."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a size (examples: 256M, 1G)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


@record
class RamRegion:
    """One contiguous piece of guest RAM."""

    guest_addr: int
    size: int
    #: Offset of the piece in the memfd (and in the host mapping).
    offset: int

    @property
    def end(self) -> int:
        return self.guest_addr + self.size


class GuestMemory:
    """Guest RAM of ``size`` bytes (a multiple of the page size)."""

    def __init__(self, size: int):
        if size % layout.PAGE_SIZE or not layout.MIN_MEMORY <= size <= layout.MAX_MEMORY:
            raise GuestMemoryError(
                f"memory size {size:#x} must be a multiple of 4 KiB between "
                f"{layout.MIN_MEMORY >> 20} MiB and {layout.MAX_MEMORY >> 30} GiB")
        self.size = size
        low = min(size, layout.MMIO_HOLE_START)
        regions = [RamRegion(0, low, 0)]
        if size > low:
            regions.append(RamRegion(layout.HIGH_RAM_START, size - low, low))
        self.regions: tuple[RamRegion, ...] = tuple(regions)
        # Sealed against shrinking: device processes get this fd, and one
        # that truncated it would make the VMM fault on guest RAM (SIGBUS).
        self.fd = os.memfd_create("splitvmm-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        self._map = None
        self._cdata = None
        try:
            os.ftruncate(self.fd, size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            self._map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self._cdata = ffi.from_buffer(self._map)
            self.host_base = int(ffi.cast("uintptr_t", self._cdata))
            self.view = memoryview(self._map)
        except BaseException:
            self.close()
            raise

    def register(self, vm: Vm) -> None:
        """Give every region to KVM (one memory slot each)."""
        for slot, r in enumerate(self.regions):
            vm.set_user_memory_region(slot, r.guest_addr, r.size, self.host_base + r.offset)

    # -- access by guest-physical address --------------------------------

    def _offset(self, addr: int, length: int) -> int:
        for r in self.regions:
            if r.guest_addr <= addr and addr + length <= r.end:
                return r.offset + addr - r.guest_addr
        raise GuestMemoryError(f"guest-physical {addr:#x}+{length:#x} is not RAM")

    def contains(self, addr: int, length: int = 1) -> bool:
        return any(r.guest_addr <= addr and addr + length <= r.end for r in self.regions)

    def read(self, addr: int, length: int) -> bytes:
        off = self._offset(addr, length)
        return bytes(self.view[off:off + length])

    def write(self, addr: int, data: bytes) -> None:
        off = self._offset(addr, len(data))
        self.view[off:off + len(data)] = data

    def fill(self, addr: int, length: int, byte: int = 0) -> None:
        off = self._offset(addr, length)
        self.view[off:off + length] = bytes([byte]) * length

    def read_u64(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 8), "little")

    def close(self) -> None:
        """Unmap and close the memfd (KVM must not run any more)."""
        if getattr(self, "view", None) is not None:
            self.view.release()
            del self.view
        if self._cdata is not None:
            ffi.release(self._cdata)
            self._cdata = None
        if self._map is not None:
            self._map.close()
            self._map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
