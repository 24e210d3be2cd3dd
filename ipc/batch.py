"""Write batches: many guest writes handed to a device process in one access.

The VMM delivers the coalesced-MMIO writes it drains from KVM's ring
(vmm.coalesce) to a device process in batches: it stores the writes in the
device's batch segment and sends one request on the vCPU's access slot
(:mod:`ipc.slots`) with space :data:`BATCH_SPACE` and the number of writes
as the value; the device applies them in order and answers once.  Both
sides agreed on it in the handshake (feature ``coalesced-batch``).

Layout (little-endian): a header (magic, version, capacity), then
``capacity`` entries of (cookie u64, offset u64, value u64, size u32,
space u32).  The VMM creates the segment in a memfd sealed against
resizing, writes it, and never reads it back; the device maps it
read-only and checks the count and every entry it reads (a VMM is
trusted, but a reader that trusts no shared memory is cheap to have).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct

from ipc.errors import IpcError

__all__ = ["BATCH_SPACE", "BATCH_CAPACITY", "BatchError", "BatchWriter", "BatchReader"]

#: The ``space`` of the slot request that carries a batch.
BATCH_SPACE = 3
#: Writes per batch: one coalesced-MMIO ring's worth, and some.
BATCH_CAPACITY = 256
MAGIC = 0x4843_5442_4D4D_5653   # "SVMMBTCH"
VERSION = 1
_HEADER = struct.Struct("<QII")
_ENTRY = struct.Struct("<QQQII")
SIZES = frozenset((1, 2, 4, 8))
#: Space numbers an entry may name (ipc.Bus: PIO, MMIO, PCI).
SPACES = frozenset((0, 1, 2))


def segment_size(capacity: int) -> int:
    return _HEADER.size + capacity * _ENTRY.size


class BatchError(IpcError):
    """A batch segment or a batch in it is not what this code understands."""


class BatchWriter:
    """The VMM's side: a new sealed segment it fills; :attr:`fd` goes to
    the device."""

    def __init__(self, capacity: int = BATCH_CAPACITY):
        if not 0 < capacity <= 1 << 16:
            raise ValueError(f"batch capacity {capacity!r} out of range")
        self.capacity = capacity
        size = segment_size(capacity)
        fd = os.memfd_create("splitvmm-batch", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            self._map = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self.fd: int | None = fd
        _HEADER.pack_into(self._map, 0, MAGIC, VERSION, capacity)

    def write(self, writes: list[tuple[int, int, int, int, int]]) -> int:
        """Store (space, cookie, offset, size, value) writes from entry 0;
        returns how many (at most :attr:`capacity`)."""
        n = min(len(writes), self.capacity)
        pack, buf, off = _ENTRY.pack_into, self._map, _HEADER.size
        step = _ENTRY.size
        for i in range(n):
            space, cookie, offset, size, value = writes[i]
            pack(buf, off + i * step, cookie, offset, value, size, space)
        return n

    def close(self) -> None:
        if self.fd is not None:
            self._map.close()
            os.close(self.fd)
            self.fd = None


class BatchReader:
    """The device's side: the segment it was given, mapped read-only."""

    def __init__(self, fd: int):
        """Map the segment open on ``fd`` (the caller keeps ``fd``)."""
        size = os.fstat(fd).st_size
        if size < _HEADER.size:
            raise BatchError(f"batch segment of {size} bytes is too small")
        self._map = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        magic, version, capacity = _HEADER.unpack_from(self._map, 0)
        if magic != MAGIC or version != VERSION or segment_size(capacity) > size:
            self._map.close()
            raise BatchError(f"not a batch segment of version {VERSION} (magic {magic:#x}, version "
                             f"{version}, capacity {capacity}, {size} bytes)")
        self.capacity = capacity

    def read(self, count: int) -> list[tuple[int, int, int, int, int]]:
        """The first ``count`` writes as (space, cookie, offset, size,
        value); raises BatchError for a count over the capacity or an
        entry with a bad size or space."""
        if not 0 <= count <= self.capacity:
            raise BatchError(f"batch of {count} writes (capacity {self.capacity})")
        unpack, buf, off, step = _ENTRY.unpack_from, self._map, _HEADER.size, _ENTRY.size
        out = []
        for i in range(count):
            cookie, offset, value, size, space = unpack(buf, off + i * step)
            if size not in SIZES or space not in SPACES:
                raise BatchError(f"batch entry {i}: size {size}, space {space}")
            out.append((space, cookie, offset, size, value & ((1 << (8 * size)) - 1)))
        return out

    def close(self) -> None:
        self._map.close()
