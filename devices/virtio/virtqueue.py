"""Split virtqueues (virtio 1.2 §2.7), processed in guest RAM.

Every value read from the rings is guest-controlled and checked before it
is used, against a private copy (the driver may change shared memory at
any time):

* ring addresses and the queue size are validated once, at enable
  (:meth:`Virtqueue.check_layout`: size a power of two up to
  :data:`MAX_QUEUE_SIZE`, alignment §2.7 table, every ring inside RAM);
* ``avail->idx`` may run at most ``size`` entries ahead of the device
  (§2.7.6); further means the driver is broken: :class:`QueueBroken`,
  for which the transport sets DEVICE_NEEDS_RESET (§2.1.2);
* a head index must be below ``size`` (else QueueBroken too);
* a chain (§2.7.5) is at most ``size`` descriptors long -- a longer one
  loops, since ``next`` must stay below ``size`` --, each ``next`` below
  ``size``, each buffer inside guest RAM (addr + len, no wrap),
  device-writable buffers after all device-readable ones (§2.7.4.2), no
  VIRTQ_DESC_F_INDIRECT (not offered), and at most
  :data:`MAX_CHAIN_BYTES` in all.  A chain that breaks a rule is returned
  with :attr:`Chain.error` set, so the device can fail that request alone
  (its head is valid and is returned through the used ring).

Memory is reached only through :class:`devices.guestmem.GuestRam`, which
refuses any byte outside guest RAM.  Interrupt suppression: the device
honours VIRTQ_AVAIL_F_NO_INTERRUPT (§2.7.7); VIRTIO_F_EVENT_IDX and
indirect descriptors are not offered.
"""

from __future__ import annotations

import dataclasses
import typing
import logging
import struct

from devices.guestmem import GuestMemoryFault, GuestRam
from devices.snapshot import U16, Fields, check_int, require

log = logging.getLogger(__name__)

MAX_QUEUE_SIZE = 32768          # §2.7: "The maximum Queue Size value is 32768"
#: Largest total of one chain's buffers this device accepts.
MAX_CHAIN_BYTES = 64 << 20

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

DESC_SIZE = 16
#: Alignment of the three parts (§2.7, "Virtqueue Part" table).
DESC_ALIGN, AVAIL_ALIGN, USED_ALIGN = 16, 2, 4

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")
_U16 = struct.Struct("<H")


class QueueBroken(Exception):
    """The driver broke the ring as a whole: the device needs a reset."""


class Buffer(typing.NamedTuple):
    """One descriptor's buffer, validated (inside guest RAM)."""

    addr: int
    length: int
    writable: bool


@dataclasses.dataclass
class Chain:
    """One request: the head index and its buffers in order, or an error."""

    head: int
    buffers: list[Buffer]
    error: str | None = None

    @property
    def readable(self) -> list[Buffer]:
        return [b for b in self.buffers if not b.writable]

    @property
    def writable(self) -> list[Buffer]:
        return [b for b in self.buffers if b.writable]


#: What :meth:`Virtqueue.pop` returns for a head still held (not taken).
HELD = Chain(-1, [], "held")


def avail_size(n: int) -> int:
    return 6 + 2 * n


def used_size(n: int) -> int:
    return 6 + 8 * n


class InflightHook(typing.Protocol):
    """Where a record of in-flight requests plugs in (issue 10 §2, after
    vhost-user's inflight I/O tracking; ``ipc.inflight.InflightQueue``
    is one): told when the driver enables the queue, of every chain the
    device takes off the avail ring (before it acts on it) and of every
    one it returns (after the used element and ``used->idx`` are
    stored), so a restarted device can finish exactly the requests that
    were taken and not returned (:meth:`Virtqueue.resume_inflight`).  Set
    :attr:`Virtqueue.inflight`; the calls are made with the device's lock
    held, in ring order.  A resubmitted chain is not reported as popped
    again."""

    def enabled(self, queue: int, size: int) -> None:
        """The driver enabled the queue with ``size`` entries: nothing is
        in flight, both indices are 0."""

    def popped(self, queue: int, head: int, last_avail: int) -> None:
        """Chain ``head`` was taken; ``last_avail`` is the device's avail
        index after it."""

    def pushed(self, queue: int, head: int, used_idx: int) -> None:
        """Chain ``head`` was returned; ``used_idx`` is the used index
        just published to the driver."""


#: The keys of :meth:`Virtqueue.snapshot`.
QUEUE_STATE = ("size", "msix_vector", "enabled", "desc", "driver", "device", "last_avail", "used_idx",
               "served", "failed")


class Virtqueue:
    """One split virtqueue's driver-set configuration and device state."""

    def __init__(self, index: int, max_size: int):
        if not 1 <= max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue size {max_size} (a power of two up to {MAX_QUEUE_SIZE})")
        self.index = index
        self.max_size = max_size
        #: The in-flight record's hook (:class:`InflightHook`), or None.
        self.inflight: InflightHook | None = None
        self.reset()

    def reset(self) -> None:
        """Power-on values (§4.1.4.3: queue_size reads the maximum)."""
        self.size = self.max_size
        self.msix_vector = 0xFFFF
        self.enabled = False
        self.desc = self.driver = self.device = 0
        self.last_avail = 0
        self.used_idx = 0
        self._rings_key: tuple | None = None
        self._rings: tuple[memoryview, int, int, int] | None = None
        #: Requests served, requests failed (bad chain).
        self.served = 0
        self.failed = 0
        #: Heads to serve again before the avail ring (resume_inflight).
        self.resubmit: list[int] = []

    # -- snapshot (devices.base.Device, "Snapshots") ------------------------

    def snapshot(self) -> dict:
        """The driver's configuration of the queue and the device's ring
        indices (the chains in flight are the inflight record's)."""
        return {"size": self.size, "msix_vector": self.msix_vector, "enabled": self.enabled,
                "desc": self.desc, "driver": self.driver, "device": self.device,
                "last_avail": self.last_avail, "used_idx": self.used_idx,
                "served": self.served, "failed": self.failed}

    def check(self, state: object, where: str, mem: GuestRam | None, nvectors: int) -> dict:
        """A snapshot of this queue, checked (BadState); what
        :meth:`load` takes.  An enabled queue's layout must be usable in
        ``mem``, as at enable."""
        f = Fields(state, where, QUEUE_STATE)
        v = {k: f.integer(k, 0, U16) for k in ("size", "last_avail", "used_idx")}
        v.update({k: f.integer(k) for k in ("desc", "driver", "device", "served", "failed")})
        vector = f.integer("msix_vector", 0, U16)
        require(vector < nvectors or vector == 0xFFFF, f.name("msix_vector"), f"{vector} (the function has "
                f"{nvectors} vectors)")
        v["msix_vector"] = vector
        v["enabled"] = enabled = f.flag("enabled")
        if enabled:
            require(mem is not None, where, "enabled, but this host gives the device no guest memory")
            assert mem is not None
            why = layout_problem(self.index, self.max_size, v["size"], v["desc"], v["driver"], v["device"], mem)
            require(why is None, where, str(why))
            require((v["last_avail"] - v["used_idx"]) & U16 <= v["size"], where,
                    f"{(v['last_avail'] - v['used_idx']) & U16} requests in flight (size {v['size']})")
        else:
            require(v["last_avail"] == v["used_idx"] == 0, where, "ring indices of a disabled queue")
        return v

    def load(self, checked: dict) -> None:
        for k in QUEUE_STATE:
            setattr(self, k, checked[k])
        self._rings_key = self._rings = None

    def resume_inflight(self, heads: typing.Sequence[int], last_avail: int, used_idx: int) -> None:
        """After a restore, before the model starts: the in-flight record
        says ``heads`` (in pop order) were taken and not returned, the
        avail ring is to be read on from ``last_avail`` and the driver has
        seen ``used_idx``.  The heads are served first, then the ring.
        BadState (nothing changed) unless the queue is enabled and the
        numbers agree: every head below the size, none twice,
        ``last_avail - used_idx`` equal to their number."""
        where = f"queue {self.index}: inflight"
        require(self.enabled, where, "the queue is not enabled")
        heads = list(heads)
        require(len(heads) <= self.size and len(set(heads)) == len(heads)
                and all(type(h) is int and 0 <= h < self.size for h in heads), where,
                f"heads {heads[:8]} (size {self.size})")
        for n in (last_avail, used_idx):
            check_int(n, where, 0, U16)
        require((last_avail - used_idx) & U16 == len(heads), where,
                f"avail {last_avail} - used {used_idx} is not the {len(heads)} heads in flight")
        self.resubmit, self.last_avail, self.used_idx = heads, last_avail, used_idx

    def enable(self) -> None:
        """The driver enabled the queue (its layout checked)."""
        self.enabled = True
        self.last_avail = self.used_idx = 0
        self.resubmit = []
        if self.inflight is not None:
            self.inflight.enabled(self.index, self.size)

    # -- configuration ---------------------------------------------------

    def check_layout(self, mem: GuestRam) -> str | None:
        """Why the driver's size/addresses cannot be used, or None."""
        return layout_problem(self.index, self.max_size, self.size, self.desc, self.driver, self.device, mem)


    # -- the device's side of the rings ----------------------------------

    def _where(self, mem: GuestRam) -> tuple[memoryview, int, int, int]:
        """RAM's buffer and where the descriptor table, driver area and
        device area are in it (each checked whole; raises
        GuestMemoryFault), kept while the layout and ``mem`` stay."""
        key = (mem, self.desc, self.driver, self.device, self.size)
        if key != self._rings_key:
            n = self.size
            self._rings = (mem.buffer, mem.offset(self.desc, DESC_SIZE * n),
                           mem.offset(self.driver, avail_size(n)), mem.offset(self.device, used_size(n)))
            self._rings_key = key
        assert self._rings is not None
        return self._rings

    def pending(self, mem: GuestRam) -> int:
        """Entries the driver made available and the device has not taken
        (raises QueueBroken when the index ran ahead by more than size)."""
        view, _table, avail, _used = self._where(mem)
        avail_idx = _U16.unpack_from(view, avail + 2)[0]
        n = (avail_idx - self.last_avail) & 0xFFFF
        if n > self.size:
            raise QueueBroken(f"queue {self.index}: avail idx {avail_idx} is {n} ahead of "
                              f"{self.last_avail} (size {self.size})")
        return n

    def pop(self, mem: GuestRam, held: typing.Container[int] = ()) -> Chain | None:
        """The next available chain (a resubmitted one first), or None
        when there is none.  ``held``: heads taken and not yet returned
        (a batch not yet published); when the next head is one of them
        (a broken driver offered it twice) it is not taken and
        :data:`HELD` is returned -- publish the batch, then pop again."""
        if self.resubmit:
            head = self.resubmit.pop(0)
            view, table, _avail, _used = self._where(mem)
            return self._walk(mem, view, table, head)
        if not self.pending(mem):
            return None
        assert self._rings is not None     # pending() just set them
        view, table, avail, _used = self._rings
        slot = self.last_avail % self.size
        head = _U16.unpack_from(view, avail + 4 + 2 * slot)[0]
        if head >= self.size:
            raise QueueBroken(f"queue {self.index}: head {head} in avail slot {slot} >= size {self.size}")
        if head in held:
            return HELD
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        if self.inflight is not None:
            self.inflight.popped(self.index, head, self.last_avail)
        return self._walk(mem, view, table, head)

    def _walk(self, mem: GuestRam, view: memoryview, table: int, head: int) -> Chain:
        # The hot path of every request: locals, and RAM's spans tested
        # inline (GuestRam.contains with no call per buffer).
        buffers: list[Buffer] = []
        chain = Chain(head, buffers)
        size, spans, unpack = self.size, mem.spans, _DESC.unpack_from
        i, total, seen_writable = head, 0, False
        for _ in range(size):
            addr, length, flags, nxt = unpack(view, table + DESC_SIZE * i)
            if flags & VIRTQ_DESC_F_INDIRECT:
                chain.error = f"descriptor {i}: INDIRECT (not negotiated)"
                return chain
            writable = bool(flags & VIRTQ_DESC_F_WRITE)
            if seen_writable and not writable:
                chain.error = f"descriptor {i}: device-readable after device-writable (§2.7.4.2)"
                return chain
            seen_writable |= writable
            if length:
                end = addr + length
                for first, last, _delta in spans:
                    if first <= addr and end <= last:
                        break
                else:
                    chain.error = f"descriptor {i}: buffer {addr:#x}+{length:#x} is not in guest RAM"
                    return chain
            total += length
            if total > MAX_CHAIN_BYTES:
                chain.error = f"chain at {head}: more than {MAX_CHAIN_BYTES} bytes"
                return chain
            buffers.append(Buffer(addr, length, writable))
            if not flags & VIRTQ_DESC_F_NEXT:
                return chain
            if nxt >= size:
                chain.error = f"descriptor {i}: next {nxt} >= size {size}"
                return chain
            i = nxt
        chain.error = f"chain at {head}: longer than the queue size {size} (a loop)"
        return chain

    def push(self, mem: GuestRam, head: int, written: int) -> None:
        """Return chain ``head`` with ``written`` bytes written (§2.7.8):
        the element first, then the index."""
        view, _table, _avail, used = self._where(mem)
        _USED_ELEM.pack_into(view, used + 4 + 8 * (self.used_idx % self.size), head, written & 0xFFFF_FFFF)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        mem.store_u16(used + 2, self.used_idx)
        if self.inflight is not None:
            self.inflight.pushed(self.index, head, self.used_idx)

    def push_many(self, mem: GuestRam, done: list[tuple[int, int]]) -> None:
        """Return several chains, ``(head, written)`` each, in order
        (§2.7.8): every element first, then ``used->idx`` once -- the
        driver sees the batch at once, and the index store (and the
        in-flight record's update) is paid once per batch.  At most
        ``size`` entries (no element overwritten before the driver saw
        it)."""
        if not done:
            return
        assert len(done) <= self.size
        view, _table, _avail, used = self._where(mem)
        idx, mask, pack = self.used_idx, self.size - 1, _USED_ELEM.pack_into
        for head, written in done:
            pack(view, used + 4 + 8 * (idx & mask), head, written & 0xFFFF_FFFF)
            idx += 1
        self.used_idx = idx = idx & 0xFFFF
        mem.store_u16(used + 2, idx)
        if self.inflight is not None:
            pushed, q = self.inflight.pushed, self.index
            for head, _written in done:
                pushed(q, head, idx)

    # -- for a device's own request loop (devices.blkring: in C) -----------

    def taken(self, heads: list[int]) -> None:
        """A device's own loop took these avail entries from
        ``last_avail`` on (valid heads, in ring order, none resubmitted),
        before acting on them: as :meth:`pop` would, index and in-flight
        record."""
        if self.inflight is None:
            self.last_avail = (self.last_avail + len(heads)) & 0xFFFF
            return
        popped, q, idx = self.inflight.popped, self.index, self.last_avail
        for head in heads:
            idx = (idx + 1) & 0xFFFF
            popped(q, head, idx)
        self.last_avail = idx

    def published(self, mem: GuestRam, heads: list[int]) -> None:
        """The used elements of ``heads`` are stored from ``used_idx`` on
        (by a device's own loop): publish them, ``used->idx`` once, as
        :meth:`push_many` would."""
        if not heads:
            return
        view, _table, _avail, used = self._where(mem)
        self.used_idx = idx = (self.used_idx + len(heads)) & 0xFFFF
        mem.store_u16(used + 2, idx)
        if self.inflight is not None:
            pushed, q = self.inflight.pushed, self.index
            for head in heads:
                pushed(q, head, idx)

    def advanced(self, taken: int, done: int) -> None:
        """A device's own loop took ``taken`` avail entries and returned
        the first ``done`` of them, in-flight record and ``used->idx``
        included (devices.blkring with the record): the indices follow."""
        self.last_avail = (self.last_avail + taken) & 0xFFFF
        self.used_idx = (self.used_idx + done) & 0xFFFF

    def wants_interrupt(self, mem: GuestRam) -> bool:
        """False when the driver set VIRTQ_AVAIL_F_NO_INTERRUPT (§2.7.7)."""
        return not mem.read_int(self.driver, 2) & VIRTQ_AVAIL_F_NO_INTERRUPT


def layout_problem(index: int, max_size: int, n: int, desc: int, driver: int, device: int,
                   mem: GuestRam) -> str | None:
    """Why a queue of size ``n`` with these ring addresses cannot be used
    in ``mem`` (§2.7: size, alignment, inside RAM), or None."""
    if not 1 <= n <= max_size or n & (n - 1):
        return f"queue {index}: size {n} (a power of two up to {max_size})"
    for name, addr, length, align in (("descriptor table", desc, DESC_SIZE * n, DESC_ALIGN),
                                      ("driver area", driver, avail_size(n), AVAIL_ALIGN),
                                      ("device area", device, used_size(n), USED_ALIGN)):
        if addr % align:
            return f"queue {index}: {name} at {addr:#x} is not {align}-byte aligned"
        if not mem.contains(addr, length):
            return f"queue {index}: {name} {addr:#x}+{length:#x} is not in guest RAM"
    return None


def fault_text(e: GuestMemoryFault) -> str:
    return f"guest memory: {e}"
