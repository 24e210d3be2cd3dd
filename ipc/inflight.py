"""Inflight record of a split virtqueue: which requests a device popped and
did not complete, so that a restarted process finishes exactly those.

The facts come from vhost-user's inflight I/O tracking (QEMU
``docs/interop/vhost-user.rst``, "Inflight I/O tracking", split virtqueue):
one entry per descriptor head with an inflight flag and a counter that
orders the pops, and the used index the device last finished recording.
The commit point of a completion is the guest's own ``used->idx`` (virtio
1.2 §2.7.8): it lives in guest RAM, which the VMM keeps across device
restarts, so recovery compares the record against it.

The device side, per request (one thread per queue writes the record):

1. :meth:`InflightQueue.pop` after reading a head from the available ring
   and before acting on it: the counter, then the flag (one byte store);
2. the virtio code writes the used-ring element(s), then ``used->idx``;
3. :meth:`InflightQueue.complete` (or :meth:`complete_batch`) with the heads
   and that index: the flags are cleared, then the record's used index is
   stored.

A SIGKILL between any two stores leaves a record from which
:meth:`InflightQueue.recover` computes the exact set: a head popped but not
yet flagged is not in the set and is popped again from the available ring
(the returned ``last_avail_idx`` = guest used index + heads in flight); a
head the guest saw completed (``used->idx`` past the record's) whose flag
was not cleared yet is dropped; everything else still flagged is run again,
in pop order.

Where vhost-user keeps a linked list of the last batch of completions
(``last_batch_head`` and a ``next`` per entry) to find the heads whose
flags may be stale, this record reads them from the used ring itself: the
heads of used elements [record's used index, guest's used index) are
exactly that batch (the device wrote them; a driver only reads the used
ring, virtio 1.2 §2.7.8).  The restarted device has guest memory anyway,
and it saves one call and two stores per request: the whole record costs
one call before a request and one after.  A guest that scribbles on its
used ring can only lose its own requests, and whatever it writes is
checked (heads in range, none twice).

Why Python and no C: crash consistency needs only that the stores of one
process reach the shared mapping in program order and that each field is
written by one store.  SIGKILL stops a process at an instruction boundary
and every store before it is in the page cache (the reader runs after the
death, synchronised through the kernel), so ordering between CPUs does not
enter (one writer thread per queue; a reader never runs concurrently with
it).  Every store below is a single aligned item assignment through a
``memoryview`` cast to ``B``/``H``/``Q``, which CPython performs as one
fixed-size copy (one machine store on x86-64 and arm64), in statement order.
virtio-blk's C request loop (``devices/_blkring.c``, ``blk_run``) writes the
same stores in the same order, with compiler barriers between them, through
:attr:`InflightQueue.buffer` and :attr:`InflightQueue.counter`.

Layout of one queue's region (little-endian, ``region_size(max_size)``
bytes)::

    0   u16 used_idx          the guest used index of the last complete()
    2   u16 max_size          written by the creator (informational; 0 = 32768)
    4   ... zero to 64
    64  max_size entries of 16 bytes:
        0  u64 counter        order of the pops
        8  u8  inflight       0 or 1
        9  ... zero

Everything is bounded and checked on :meth:`InflightQueue.recover`: the
region is read into private memory first; a flag other than 0/1, a counter
out of range, more completions than the queue holds, or a used ring naming
a head out of range or twice raises :class:`InflightCorrupt` (the queue
cannot be resumed: the device must fail it, as a device that needs a reset).
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable

from ipc.errors import IpcError

__all__ = [
    "InflightError",
    "InflightCorrupt",
    "InflightQueue",
    "Recovery",
    "region_size",
    "QUEUE_HEADER_SIZE",
    "ENTRY_SIZE",
    "MAX_QUEUE_SIZE",
]

QUEUE_HEADER_SIZE = 64
ENTRY_SIZE = 16
#: virtio 1.2 §2.7: a split virtqueue has at most 32768 entries.
MAX_QUEUE_SIZE = 32768
#: Counters at or above this are treated as corrupt (a pop a nanosecond
#: would take centuries to get there).
MAX_COUNTER = 1 << 62

_USED = 0            # u16 index in the header
_MAXSZ = 1           # u16 index in the header
_FLAG = 8            # byte offset of the flag in an entry
_ENTRY = struct.Struct("<QB7x")
assert _ENTRY.size == ENTRY_SIZE == 16 and QUEUE_HEADER_SIZE % 8 == 0


def region_size(max_size: int) -> int:
    """Bytes of one queue's region for queues of up to ``max_size`` entries."""
    if not isinstance(max_size, int) or not 1 <= max_size <= MAX_QUEUE_SIZE:
        raise ValueError(f"queue size must be in [1, {MAX_QUEUE_SIZE}], not {max_size!r}")
    return QUEUE_HEADER_SIZE + max_size * ENTRY_SIZE


class InflightError(IpcError):
    """Base of the inflight record's errors."""


class InflightCorrupt(InflightError):
    """The record cannot describe any state a device could have left."""


@dataclasses.dataclass(frozen=True)
class Recovery:
    """What :meth:`InflightQueue.recover` found.

    ``resubmit``: heads to process again, in the order they were popped.
    ``last_avail_idx``: the available-ring index to pop from next.
    ``used_idx``: the guest's used index (the record now holds it too).
    ``dropped``: heads of the last batch that the guest had already seen
    completed and that were still flagged (never run again).
    """

    resubmit: tuple[int, ...]
    last_avail_idx: int
    used_idx: int
    dropped: tuple[int, ...]


class InflightQueue:
    """The record of one split virtqueue, over ``view`` (its region).

    ``view`` must be a writable buffer of exactly ``region_size(max_size)``
    bytes, 8-byte aligned (a slice of a mapping at an offset multiple of 8).
    Call :meth:`reset` when the driver enables the queue and
    :meth:`recover` in a restarted device before popping anything.
    """

    __slots__ = ("max_size", "size", "_region", "_b", "_h", "_q", "_counter")

    def __init__(self, view: memoryview, max_size: int):
        want = region_size(max_size)
        mv = memoryview(view).cast("B")
        if mv.nbytes != want or mv.readonly:
            raise ValueError(f"inflight region must be {want} writable bytes, not {mv.nbytes}")
        self.max_size = max_size
        #: The queue size the driver chose (set by reset() or recover()).
        self.size = 0
        self._region = mv
        self._b = mv
        self._h = mv.cast("H")
        self._q = mv.cast("Q")
        self._counter = 1

    def reset(self, size: int) -> None:
        """Empty the record for a queue of ``size`` entries (the driver
        enabled the queue, so nothing is in flight and ``used->idx`` is 0)."""
        if not isinstance(size, int) or not 1 <= size <= self.max_size:
            raise ValueError(f"queue size must be in [1, {self.max_size}], not {size!r}")
        self._b[QUEUE_HEADER_SIZE:] = bytes(self.max_size * ENTRY_SIZE)
        self._h[_USED] = 0
        self._h[_MAXSZ] = self.max_size & 0xFFFF
        self.size = size
        self._counter = 1

    @property
    def buffer(self) -> memoryview:
        """The region, for a device's own C loop that writes the same
        stores as :meth:`pop` and :meth:`complete_batch`
        (``devices.blkring``)."""
        return self._b

    @property
    def counter(self) -> int:
        """The next pop's counter (a C loop takes it and gives it back)."""
        return self._counter

    @counter.setter
    def counter(self, value: int) -> None:
        if not isinstance(value, int) or value < self._counter:
            raise ValueError(f"pop counter {value!r} behind {self._counter}")
        self._counter = value

    def pop(self, head: int) -> None:
        """``head`` was taken from the available ring: flag it in flight
        (before the request is acted on)."""
        if not 0 <= head < self.size:
            raise ValueError(f"head {head} out of range for a queue of {self.size}")
        c = self._counter
        self._q[(QUEUE_HEADER_SIZE >> 3) + 2 * head] = c        # the entry's counter
        self._counter = c + 1
        self._b[QUEUE_HEADER_SIZE + _FLAG + ENTRY_SIZE * head] = 1

    def complete(self, head: int, used_idx: int) -> None:
        """``head`` is done and the guest's ``used->idx`` is now
        ``used_idx`` (its used element and the index are already stored):
        clear its flag, then record the index.  A batch of one; see
        :meth:`complete_batch`."""
        flag = QUEUE_HEADER_SIZE + _FLAG + ENTRY_SIZE * head
        if not 0 <= head < self.size or self._b[flag] != 1:
            raise InflightError(f"head {head} completed but it is not in flight")
        self._b[flag] = 0
        self._h[_USED] = used_idx & 0xFFFF

    def complete_batch(self, heads: list[int], used_idx: int) -> None:
        """The heads whose used elements end at the guest's ``used->idx``
        = ``used_idx`` (all stored already): clear their flags, then record
        the index."""
        b = self._b
        if len(set(heads)) != len(heads):
            raise InflightError(f"a head completes twice in the batch {heads}")
        for head in heads:
            if not 0 <= head < self.size or b[QUEUE_HEADER_SIZE + _FLAG + ENTRY_SIZE * head] != 1:
                raise InflightError(f"head {head} completed but it is not in flight")
        for head in heads:
            b[QUEUE_HEADER_SIZE + _FLAG + ENTRY_SIZE * head] = 0
        self._h[_USED] = used_idx & 0xFFFF

    def release(self) -> None:
        """Let go of the mapping (the owner unmaps it); the object is unusable after."""
        for v in (self._q, self._h, self._region):
            v.release()

    def in_flight(self) -> int:
        """Heads flagged in flight now (a scan: for tests and diagnostics)."""
        raw = bytes(self._region)
        return sum(1 for i in range(self.size)
                   if raw[QUEUE_HEADER_SIZE + i * ENTRY_SIZE + _FLAG] == 1)

    def recover(self, size: int, guest_used_idx: int, used_head: Callable[[int], int]) -> Recovery:
        """After a restart: ``size`` is the queue size of the restored model,
        ``guest_used_idx`` the ``used->idx`` read from guest memory and
        ``used_head(i)`` the head in used-ring element ``i % size`` (the
        ``id`` field, read from guest memory; only called for the indices
        between the record's used index and the guest's).

        Repairs the record (the flags of heads the guest saw completed are
        cleared, then the record's used index set to the guest's; the repair
        is idempotent, so a death during it is recovered by the next
        process) and makes this object ready to pop.  Raises
        :class:`InflightCorrupt` for a record (or used ring) no device could
        have left, ValueError for a bad ``size`` or index.
        """
        if not isinstance(size, int) or not 1 <= size <= self.max_size:
            raise ValueError(f"queue size must be in [1, {self.max_size}], not {size!r}")
        if not isinstance(guest_used_idx, int) or not 0 <= guest_used_idx <= 0xFFFF:
            raise ValueError(f"used index must be a u16, not {guest_used_idx!r}")
        raw = bytes(self._region)           # private copy: checked once, used once
        (rec_used,) = struct.unpack_from("<H", raw, 0)
        counters = []
        flags = bytearray(size)
        for i, (counter, flag) in enumerate(_ENTRY.iter_unpack(
                raw[QUEUE_HEADER_SIZE:QUEUE_HEADER_SIZE + size * ENTRY_SIZE])):
            if flag > 1:
                raise InflightCorrupt(f"head {i}: inflight flag {flag} (not 0 or 1)")
            if counter >= MAX_COUNTER:
                raise InflightCorrupt(f"head {i}: counter {counter} out of range")
            counters.append(counter)
            flags[i] = flag
        batch = (guest_used_idx - rec_used) & 0xFFFF
        if batch > size:
            raise InflightCorrupt(
                f"guest used index {guest_used_idx} is {batch} past the record's {rec_used}, "
                f"more than a queue of {size} can complete at once")
        seen: set[int] = set()
        done: list[int] = []
        for k in range(batch):
            idx = (rec_used + k) & 0xFFFF
            head = used_head(idx)
            if not isinstance(head, int) or not 0 <= head < size:
                raise InflightCorrupt(f"used element {idx} names head {head!r}, outside the queue")
            if head in seen:
                raise InflightCorrupt(f"used element {idx} names head {head} a second time")
            seen.add(head)
            done.append(head)
        dropped = tuple(h for h in done if flags[h])
        for head in dropped:
            flags[head] = 0
        resubmit = sorted((i for i in range(size) if flags[i]), key=lambda i: (counters[i], i))
        # Repair: flags first, the used index last (the next recovery then
        # finds batch 0 and the same flags).
        b = self._b
        for head in dropped:
            b[QUEUE_HEADER_SIZE + _FLAG + ENTRY_SIZE * head] = 0
        self._h[_USED] = guest_used_idx
        self.size = size
        self._counter = max(counters, default=0) + 1
        return Recovery(tuple(resubmit), (guest_used_idx + len(resubmit)) & 0xFFFF,
                        guest_used_idx, dropped)
