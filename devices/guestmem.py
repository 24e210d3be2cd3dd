"""Guest RAM as a device model sees it: guest-physical addresses,
bounds-checked against the RAM layout, over one shared mapping.

The same class serves both placements: inline, the buffer is the VMM's own
mapping of the RAM memfd; in a device process, the memfd mapped there from
the memory table (``SetMemTable``).  Every access names a guest-physical
range; one that is not wholly inside one RAM region raises
:class:`GuestMemoryFault` (a device error, never a host fault), so a
model handling guest-controlled addresses (virtqueue descriptors) cannot
reach a byte outside guest RAM.  The RAM is shared with a running guest:
values read are snapshots, a model copies what it validates before using
it (virtio 1.2 §2.7.5's driver may change a descriptor under it).
"""

from __future__ import annotations

from collections.abc import Iterable

from devices.base import GuestMemoryFault, all_ones
from devices.record import record

__all__ = ["GuestMemoryFault", "GuestRam", "RamRange"]

U64 = 1 << 64


@record
class RamRange:
    """``size`` bytes of RAM at guest-physical ``guest_addr``, found at
    ``offset`` in the buffer."""

    guest_addr: int
    size: int
    offset: int


class GuestRam:
    """Guest-physical access to a buffer (an mmap of guest RAM)."""

    def __init__(self, buffer, regions: Iterable):
        view = memoryview(buffer).cast("B")
        ranges = []
        for r in regions:
            rr = RamRange(int(r.guest_addr), int(r.size), int(r.offset))
            if rr.size <= 0 or rr.offset < 0 or rr.offset + rr.size > len(view) or \
                    rr.guest_addr < 0 or rr.guest_addr + rr.size > U64:
                raise ValueError(f"RAM region {rr} does not fit the {len(view):#x}-byte mapping")
            ranges.append(rr)
        self._view = view
        # 16-bit items of the mapping, for stores a running guest reads
        # concurrently (store_u16: struct.pack_into zeroes its bytes first)
        self._even = view[:len(view) & ~1]
        self._u16 = self._even.cast("H")
        self.ranges: tuple[RamRange, ...] = tuple(sorted(ranges, key=lambda r: r.guest_addr))
        # (first address, end, offset - first address) per range, for offset()
        self._spans = tuple((r.guest_addr, r.guest_addr + r.size, r.offset - r.guest_addr) for r in self.ranges)

    @property
    def buffer(self) -> memoryview:
        """The whole mapping, indexed by :meth:`offset` (for struct's
        ``unpack_from``/``pack_into`` on ranges already checked)."""
        return self._view

    @property
    def spans(self) -> tuple[tuple[int, int, int], ...]:
        """(first address, end, buffer offset - first address) of each RAM
        range: for a hot loop that tests ranges inline, as :meth:`offset`."""
        return self._spans

    def offset(self, addr: int, length: int) -> int:
        """Where ``[addr, addr + length)`` is in :attr:`buffer`; raises
        GuestMemoryFault unless the range is wholly inside one RAM region."""
        if type(addr) is not int or type(length) is not int or addr < 0 or length < 0:
            raise GuestMemoryFault(f"bad guest range {addr!r}+{length!r}")
        end = addr + length
        for first, last, delta in self._spans:
            if first <= addr and end <= last:
                return addr + delta
        raise GuestMemoryFault(f"guest-physical {addr:#x}+{length:#x} is not guest RAM")


    def contains(self, addr: int, length: int = 1) -> bool:
        try:
            self.offset(addr, length)
        except GuestMemoryFault:
            return False
        return True

    def view(self, addr: int, length: int) -> memoryview:
        """A zero-copy window on ``[addr, addr + length)`` (writable).
        Release it (``with``) before the mapping goes away."""
        off = self.offset(addr, length)
        return self._view[off:off + length]

    def read(self, addr: int, length: int) -> bytes:
        off = self.offset(addr, length)
        return bytes(self._view[off:off + length])

    def write(self, addr: int, data) -> None:
        data = memoryview(data).cast("B")
        off = self.offset(addr, len(data))
        self._view[off:off + len(data)] = data

    def read_int(self, addr: int, size: int) -> int:
        """A little-endian unsigned integer of ``size`` bytes."""
        off = self.offset(addr, size)
        return int.from_bytes(self._view[off:off + size], "little")

    def write_int(self, addr: int, size: int, value: int) -> None:
        off = self.offset(addr, size)
        self._view[off:off + size] = (value & all_ones(size)).to_bytes(size, "little")

    def store_u16(self, off: int, value: int) -> None:
        """One aligned 16-bit store of ``value`` at :attr:`buffer` offset
        ``off`` (even, already checked), for a field a running guest reads
        concurrently (``used->idx``).  ``struct.pack_into`` would not do:
        it zeroes the bytes before it writes them, so a driver polling the
        field can see 0 in between (CPython's ``s_pack_internal``), and a
        ``used->idx`` seen going back to 0 is a completion that never
        happened."""
        self._u16[off >> 1] = value

    def release(self) -> None:
        """Drop this object's views (before the mapping is closed)."""
        self._u16.release()
        self._even.release()
        self._view.release()
