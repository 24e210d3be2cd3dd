"""A minimal split-virtqueue device for the inflight record's tests.

"Guest memory" is a shared anonymous mapping holding the used ring's
elements and ``used->idx`` (virtio 1.2 §2.7.8); the available ring is the
list ``Guest.avail``, which the driver filled before the device starts
(virtio 1.2 §2.7.6, reduced to the order of the heads).  The device pops heads
in order and completes them following a script, updating the inflight
record exactly as ``ipc.inflight`` prescribes; the guest stores can go
through the same tripwire as the record's, so a kill can land between
any two stores of either.
"""

from __future__ import annotations

import mmap
import struct

from ipc.inflight import InflightQueue

USED_IDX = 1024     # u16
USED_RING = 2048    # (u32 id, u32 len) elements


class Guest:
    def __init__(self, size: int, avail: list[int]):
        self.size = size
        self.avail = list(avail)
        self.map = mmap.mmap(-1, 4096 + 8 * size)        # MAP_SHARED: survives into children
        self.b = memoryview(self.map)
        self.h = self.b.cast("H")

    def used_idx(self) -> int:
        return struct.unpack_from("<H", self.map, USED_IDX)[0]

    def used_id(self, i: int) -> int:
        """The head of used-ring element ``i`` (counting from the start)."""
        return struct.unpack_from("<I", self.map, USED_RING + 8 * (i % self.size))[0]

    def used_ids(self) -> list[int]:
        return [self.used_id(i) for i in range(self.used_idx())]


class Device:
    """The device side: pop and complete with the record kept."""

    def __init__(self, q: InflightQueue, guest: Guest, last_avail: int = 0, used: int = 0):
        self.q = q
        self.g = guest
        self.last_avail = last_avail
        self.used = used
        self.inflight: list[int] = []       # popped, not completed, in pop order
        self.gb = guest.b                   # views the tests may wire
        self.gh = guest.h

    def pop(self) -> int:
        head = self.g.avail[self.last_avail]
        self.last_avail += 1
        self.q.pop(head)
        self.inflight.append(head)
        return head

    def complete(self, heads: list[int]) -> None:
        for i, head in enumerate(heads):
            off = USED_RING + 8 * ((self.used + i) % self.g.size)
            self.gb[off:off + 8] = struct.pack("<II", head, 512)
        self.used = (self.used + len(heads)) & 0xFFFF
        self.gh[USED_IDX // 2] = self.used                  # the commit point
        if len(heads) == 1:
            self.q.complete(heads[0], self.used)
        else:
            self.q.complete_batch(heads, self.used)
        for head in heads:
            self.inflight.remove(head)

    def run(self, script: list) -> None:
        """``script``: "pop" or a list of positions in the in-flight list
        (0: the oldest) completed together as one batch."""
        for op in script:
            if op == "pop":
                self.pop()
            else:
                self.complete([self.inflight[i] for i in op])

    def finish(self) -> None:
        """Complete everything in flight and everything still available."""
        while self.inflight:
            self.complete([self.inflight[0]])
        while self.last_avail < len(self.g.avail):
            self.pop()
            self.complete([self.inflight[0]])
