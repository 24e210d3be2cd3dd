"""The per-device state segment: the model's latest snapshot and the
virtqueues' inflight records, kept by the VMM across device restarts
(issue 10 §2).

The VMM creates the segment (:meth:`StateSegment.create`, a sealed memfd)
once per device and hands the same descriptor to every process that serves
the device.  The device runtime stores the model's ``snapshot()`` with
:meth:`StateSegment.store` *before* it answers the access that changed it;
the VMM and a restarted process read it back with
:meth:`StateSegment.read`.  The segment is written by a device process, so
every reader treats all of it as hostile input.

Snapshots are double-buffered.  Snapshot number ``n`` goes to buffer
``n & 1``, so a store never touches the buffer holding the latest one.  A
store (1) zeroes the target buffer's number, (2) writes the payload, (3)
writes the access record, the length and a CRC-32 over number, record and
payload, and (4) publishes with one final 8-byte store of the number.  A
death at any instruction leaves the previous snapshot intact, and the one
being written either complete (all four steps done) or rejected (number 0,
or a CRC that does not match).  The reader copies each buffer into private
memory, checks it there and returns the valid one with the highest number.
The CRC detects torn writes, not forgery: the device may write anything,
and what protects the VMM and the next process is the bounded msgpack
decoding, the plain-type check here and ``restore()``'s own validation.

Each snapshot carries an :class:`AccessRecord`: the sequence number of the
last access whose effect it includes and that access's answer (value,
status), for exactly-once completion (see :mod:`ipc.accessseq`).  A store
made outside an access (queue processing, a timer) keeps the previous
record, since the snapshot still includes that access.

A store's four steps are one call into C (``svs_state_store`` in
``ipc/_slots.c``: it runs before every answer of an isolated device); see
:mod:`ipc.inflight` for why program order of a single process's stores is
all that crash consistency needs; here the last store is even allowed to
tear, because the CRC covers the number it publishes.

Layout (little-endian; offsets in bytes)::

    header (64):  0 magic "SVMSTATE"  8 u32 version  12 u32 header_size
                  16 u32 capacity  20 u32 nqueues  24 u32 buffer_stride
                  28 u32 0  32 u64 inflight_offset  40 u64 total_size
    64:           u16 max size of each queue, zero padded to header_size
    header_size + i * buffer_stride, i = 0, 1: snapshot buffer i
                  0 u64 number (0: empty)  8 u64 access seq  16 u64 value
                  24 u32 length  28 u32 status  32 u32 crc32  36 zero to 64
                  64 payload (msgpack map, at most capacity bytes)
    inflight_offset: one region per queue, each ipc.inflight.region_size()
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import mmap
import os
import struct
import threading
import zlib
from typing import Any, Callable, NamedTuple

import msgpack

from ipc._slots_c import ffi as _cffi, lib as _clib
from ipc.errors import IpcError
from ipc.inflight import InflightQueue, region_size

__all__ = [
    "StateError",
    "StateLayoutError",
    "SnapshotTooLarge",
    "AccessRecord",
    "Snapshot",
    "ReadResult",
    "StateLayout",
    "StateSegment",
    "MAGIC",
    "VERSION",
    "DEFAULT_CAPACITY",
    "MAX_CAPACITY",
    "MAX_QUEUES",
]

MAGIC = b"SVMSTATE"
VERSION = 1
BASE_HEADER_SIZE = 64
BUFFER_HEADER_SIZE = 64
#: A virtio-blk model's snapshot is 1-2 KiB; leave room for bigger models.
DEFAULT_CAPACITY = 64 * 1024
MAX_CAPACITY = 16 * 1024 * 1024
MAX_QUEUES = 1024
#: Snapshot numbers at or above this are rejected (never reached honestly).
MAX_NUMBER = 1 << 62
#: The steps of one snapshot store (svs_state_store in ipc/_slots.c).
STORE_STEPS = 4

_HEADER = struct.Struct("<8sIIIIII QQ16x")
_RECORD = struct.Struct("<QQII")          # access seq, value, length, status
_CRC = struct.Struct("<I")
_NUMBER = struct.Struct("<Q")
assert _HEADER.size == BASE_HEADER_SIZE
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_U64 = (1 << 64) - 1
_U32 = (1 << 32) - 1

log = logging.getLogger(__name__)


class StateError(IpcError):
    """Base of the state segment's errors."""


class StateLayoutError(StateError):
    """The descriptor does not hold a state segment this code understands."""


class SnapshotTooLarge(StateError, ValueError):
    """A snapshot does not fit the capacity chosen at creation."""


class AccessRecord(NamedTuple):
    """The last access a snapshot includes and the answer it got (a named
    tuple: one is made per access, so it must be cheap)."""

    seq: int
    value: int
    status: int


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """One valid snapshot as read back (``state`` is plain data: dict,
    list, str, int, float, bytes, bool, None; tuples come back as lists)."""

    number: int
    state: dict
    #: None when the snapshot includes no access at all.
    access: AccessRecord | None


@dataclasses.dataclass(frozen=True)
class ReadResult:
    """:meth:`StateSegment.inspect`: the snapshot chosen and why the other
    buffer(s) were not (one line per rejected buffer)."""

    snapshot: Snapshot | None
    problems: tuple[str, ...]


def _round64(n: int) -> int:
    return (n + 63) & ~63


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Where everything is, from the two numbers chosen at creation."""

    capacity: int
    queue_sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.capacity, int) or not 1 <= self.capacity <= MAX_CAPACITY:
            raise ValueError(f"capacity must be in [1, {MAX_CAPACITY}] bytes, not {self.capacity!r}")
        if len(self.queue_sizes) > MAX_QUEUES:
            raise ValueError(f"at most {MAX_QUEUES} queues, not {len(self.queue_sizes)}")
        for size in self.queue_sizes:
            region_size(size)       # raises ValueError for a bad size

    @property
    def header_size(self) -> int:
        return _round64(BASE_HEADER_SIZE + 2 * len(self.queue_sizes))

    @property
    def buffer_stride(self) -> int:
        return BUFFER_HEADER_SIZE + _round64(self.capacity)

    def buffer_offset(self, i: int) -> int:
        return self.header_size + i * self.buffer_stride

    @property
    def inflight_offset(self) -> int:
        return self.buffer_offset(2)

    def queue_offset(self, i: int) -> int:
        return self.inflight_offset + sum(region_size(s) for s in self.queue_sizes[:i])

    @property
    def total_size(self) -> int:
        return self.queue_offset(len(self.queue_sizes))

    def pack_header(self) -> bytes:
        head = _HEADER.pack(MAGIC, VERSION, self.header_size, self.capacity, len(self.queue_sizes),
                            self.buffer_stride, 0, self.inflight_offset, self.total_size)
        sizes = struct.pack(f"<{len(self.queue_sizes)}H", *(s & 0xFFFF for s in self.queue_sizes))
        return (head + sizes).ljust(self.header_size, b"\0")

    @classmethod
    def parse_header(cls, raw: bytes, file_size: int) -> StateLayout:
        """The layout a header describes; StateLayoutError unless every
        field is the one the creator computes and ``file_size`` matches."""
        if len(raw) < BASE_HEADER_SIZE:
            raise StateLayoutError("segment smaller than its header")
        magic, version, hsize, capacity, nq, stride, _, ioff, total = _HEADER.unpack_from(raw)
        if magic != MAGIC or version != VERSION:
            raise StateLayoutError(
                f"not a splitvmm state segment of version {VERSION} (magic {magic!r}, version {version})")
        if nq > MAX_QUEUES or BASE_HEADER_SIZE + 2 * nq > len(raw):
            raise StateLayoutError(f"bad queue count {nq}")
        sizes = struct.unpack_from(f"<{nq}H", raw, BASE_HEADER_SIZE)
        try:
            # u16 0 stands for 32768 (the largest split queue)
            layout = cls(capacity, tuple(s or 32768 for s in sizes))
        except ValueError as e:
            raise StateLayoutError(f"bad state segment header: {e}") from None
        got = (hsize, stride, ioff, total)
        want = (layout.header_size, layout.buffer_stride, layout.inflight_offset, layout.total_size)
        if got != want or file_size != layout.total_size:
            raise StateLayoutError(
                f"state segment sizes {got} (file {file_size} bytes) do not match its layout {want}")
        return layout


def _check_plain(obj: Any, budget: int) -> str | None:
    """None if ``obj`` is plain data (iteratively: no recursion limit),
    else what is wrong.  ``budget`` bounds the nodes visited."""
    stack = [obj]
    while stack:
        budget -= 1
        if budget < 0:
            return "too many objects"
        o = stack.pop()
        t = type(o)
        if t is dict:
            for k, v in o.items():
                if type(k) not in (str, int):
                    return f"map key of type {type(k).__name__}"
                stack.append(v)
        elif t is list:
            stack.extend(o)
        elif t not in (str, int, float, bytes, bool) and o is not None:
            return f"value of type {t.__name__}"
    return None


class StateSegment:
    """One device's state segment, mapped in this process.

    The VMM calls :meth:`create` and keeps :attr:`fd`; a device process
    calls :meth:`attach` with the descriptor it received.  The writer side
    is :meth:`store` (one snapshot at a time: calls are serialised by a
    lock), the reader side :meth:`read` / :meth:`inspect`, the virtqueues'
    records :meth:`queue`.  The layout the VMM uses is the one it created,
    never one read back from the (device-writable) header.
    """

    def __init__(self, fd: int, layout: StateLayout, owns_fd: bool):
        self.layout = layout
        #: The memfd this object owns (the creator's), else None.
        self.fd: int | None = fd if owns_fd else None
        self._map = mmap.mmap(fd, layout.total_size, mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE)
        self._mem = memoryview(self._map)
        self._lock = threading.Lock()
        self._packer = msgpack.Packer(use_bin_type=True, autoreset=True)
        # the payload of the last store made here in Python (store,
        # store_answer) and its number: store_packed's are only in C
        self._last_payload: bytes | None = None
        self._last_number = 0
        self._queues: dict[int, InflightQueue] = {}
        self._buffers = (layout.buffer_offset(0), layout.buffer_offset(1))
        # The mapping's address, for the store in C (ipc/_slots.c:
        # svs_state_store); released in close() before the unmap.
        self._cbuf = _cffi.from_buffer(self._map)
        self._base = int(_cffi.cast("uint64_t", self._cbuf))
        self._store_c = _clib.svs_state_store
        # The writer's numbers (svs_state_writer: the next number, 0 until
        # known; the last store's record and length), in C so that
        # store_packed is one call of five arguments.
        self._w = w = _cffi.new("struct svs_state_writer *")
        w.buf[0], w.buf[1] = self._base + self._buffers[0], self._base + self._buffers[1]
        w.cap = layout.capacity
        self._store_packed_c = _clib.svs_state_store_packed

    # ---- creation -----------------------------------------------------

    @classmethod
    def create(cls, capacity: int = DEFAULT_CAPACITY, queue_sizes: tuple[int, ...] = ()) -> StateSegment:
        """A new, empty segment in a sealed memfd: snapshots of up to
        ``capacity`` bytes, one inflight record per entry of
        ``queue_sizes`` (each the queue's maximum size)."""
        layout = StateLayout(capacity, tuple(queue_sizes))
        fd = os.memfd_create("splitvmm-state", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, layout.total_size)
            # Device processes get this fd: they must not shrink it under
            # the VMM's mapping (SIGBUS) nor grow it.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            seg = cls(fd, layout, owns_fd=True)
        except BaseException:
            os.close(fd)
            raise
        seg._mem[:layout.header_size] = layout.pack_header()
        for i, size in enumerate(layout.queue_sizes):
            off = layout.queue_offset(i)
            struct.pack_into("<H", seg._map, off + 2, size & 0xFFFF)   # its max_size
        return seg

    @classmethod
    def attach(cls, fd: int) -> StateSegment:
        """Map the segment open on ``fd`` (the caller keeps ``fd``),
        checking its header, size and seals."""
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            size = os.fstat(fd).st_size
        except OSError as e:
            raise StateLayoutError(f"not a sealed memfd: {e.strerror}") from None
        if seals & (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW) != fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW:
            raise StateLayoutError("state segment is not sealed against resizing")
        if size < BASE_HEADER_SIZE:
            raise StateLayoutError(f"state segment of {size} bytes is smaller than its header")
        raw = os.pread(fd, min(size, BASE_HEADER_SIZE + 2 * MAX_QUEUES), 0)
        return cls(fd, StateLayout.parse_header(raw, size), owns_fd=False)

    # ---- writer ---------------------------------------------------------

    def store(self, state: dict, access: AccessRecord | None = None, *,
              only_if_changed: bool = False) -> bool:
        """Store ``state`` as the latest snapshot, including ``access`` (the
        access being answered; None keeps the previous record).

        Returns False when ``only_if_changed`` and the snapshot equals the
        one this object stored last (nothing written: the record keeps the
        older access, and an access that changed nothing is safe to run
        again), True once published.  Raises :class:`SnapshotTooLarge` (nothing written) and
        TypeError for a state that is not plain data.
        """
        if access is not None and not 1 <= access.seq <= _U64:
            raise ValueError(f"access sequence numbers start at 1, not {access.seq}")
        return self._store(state, access, only_if_changed)

    def store_answer(self, state: dict, seq: int, value: int) -> bool:
        """``store(state, AccessRecord(seq, value, STATUS_OK),
        only_if_changed=True)``: the device runtime's store before every
        answer, with nothing built for the record that is not needed."""
        # (the body of _store, inlined: this runs before every answer)
        if not 1 <= seq <= _U64:
            raise ValueError(f"access sequence numbers start at 1, not {seq}")
        w = self._w
        if type(state) is not dict or not w.next:
            return self._store(state, (seq, value & _U64, 0), True)
        with self._lock:
            try:
                payload = self._packer.pack(state)
            except (TypeError, ValueError, OverflowError) as e:
                raise TypeError(f"snapshot is not plain data: {e}") from None
            number = w.next
            if payload == self._last_payload and self._last_number + 1 == number:
                return False
            n = len(payload)
            cap = self.layout.capacity
            if n > cap:
                raise SnapshotTooLarge(
                    f"snapshot of {n} bytes does not fit the state segment's capacity of {cap} bytes")
            value &= _U64
            if self._store_c(self._base + self._buffers[number & 1], cap, number, seq, value, 0,
                             payload, n, STORE_STEPS, 0) != 0:
                raise StateError(f"snapshot {number} could not be stored")
            self._stored(number, seq, value, 0, payload)
            return True

    def store_packed(self, payload: bytes, seq: int, value: int) -> bool:
        """:meth:`store_answer` for a snapshot packed already
        (:meth:`devices.base.Device.packed_snapshot`): ``payload`` is the
        msgpack encoding of the state's map.  Nothing checks here that it
        decodes to plain data: the writer is the model's own process, and
        every reader checks what it reads anyway (:meth:`inspect`).
        False when ``payload`` equals the last one stored (nothing
        written), True once published."""
        # (the arguments are checked by cffi's conversions and by C: this
        # runs before every answer)
        lock = self._lock
        lock.acquire()
        try:
            # the comparison with the last payload, the store's four steps
            # (svs_state_store) and the writer's numbers: one call into C
            rc = self._store_packed_c(self._w, seq, value, payload, len(payload))
            if rc < 0 and not self._w.next and seq:
                self._continue_numbers()
                rc = self._store_packed_c(self._w, seq, value, payload, len(payload))
        except OverflowError:
            if type(seq) is not int or not 1 <= seq <= _U64:
                raise ValueError(f"access sequence numbers are in [1, 2**64), not {seq}") from None
            if type(value) is not int or value == value & _U64:
                raise SnapshotTooLarge(f"a packed snapshot of {len(payload)} bytes") from None
            rc = None       # the value, masked to 64 bits below (the lock released first)
        except TypeError:
            raise TypeError(f"a packed snapshot is bytes, not {type(payload).__name__}") from None
        finally:
            lock.release()
        if rc is None:
            return self.store_packed(payload, seq, value & _U64)
        if rc >= 0:
            return rc == 1
        if not seq:
            raise ValueError("access sequence numbers start at 1, not 0")
        if len(payload) > self.layout.capacity:
            raise SnapshotTooLarge(f"snapshot of {len(payload)} bytes does not fit the state segment's "
                                   f"capacity of {self.layout.capacity} bytes")
        raise StateError(f"a packed snapshot could not be stored ({rc})")

    def packed_writer(self) -> Callable[[bytes, int, int], bool]:
        """:meth:`store_packed` as a closure over the segment's lock, the
        C call and the writer's numbers, for a caller that stores before
        every answer (devserver.persist.StateKeeper): one Python frame and
        no attribute lookups while the store succeeds; anything else
        (the first store of a restarted writer, a bad argument) goes
        through :meth:`store_packed` itself, which stores or raises.
        Taken once: what it holds is fixed for the segment's life (a test
        that reroutes ``_store_packed_c`` does so before taking it)."""
        acquire, release = self._lock.acquire, self._lock.release
        store_c, w, slow = self._store_packed_c, self._w, self.store_packed

        def store(payload: bytes, seq: int, value: int) -> bool:
            acquire()
            try:
                rc = store_c(w, seq, value, payload, len(payload))
            except (OverflowError, TypeError):
                rc = -1             # nothing stored: store_packed says why
            finally:
                release()
            if rc > 0:
                return True
            return False if rc == 0 else slow(payload, seq, value)

        return store

    def _continue_numbers(self) -> None:
        """A restarted writer: continue after the latest valid snapshot
        (its record is the one a store outside an access keeps)."""
        best = self.inspect().snapshot
        w = self._w
        w.next = best.number + 1 if best else 1
        rec = best.access if best else None
        w.seq, w.value, w.status = rec if rec is not None else (0, 0, 0)
        w.has_last = 0

    def _stored(self, number: int, seq: int, value: int, status: int, payload: bytes) -> None:
        """Snapshot ``number`` is published with this record and payload."""
        w = self._w
        w.next = number + 1
        w.seq, w.value, w.status = seq, value, status
        w.last_n, w.has_last = len(payload), 1
        self._last_payload, self._last_number = payload, number

    def _store(self, state: dict, access: tuple[int, int, int] | None, only_if_changed: bool) -> bool:
        if type(state) is not dict:
            raise TypeError(f"a snapshot is a dict, not {type(state).__name__}")
        with self._lock:
            try:
                payload = self._packer.pack(state)
            except (TypeError, ValueError, OverflowError) as e:
                raise TypeError(f"snapshot is not plain data: {e}") from None
            n = len(payload)
            cap = self.layout.capacity
            if n > cap:
                raise SnapshotTooLarge(
                    f"snapshot of {n} bytes does not fit the state segment's capacity of {cap} bytes")
            w = self._w
            if not w.next:
                self._continue_numbers()
            number = w.next
            if only_if_changed and payload == self._last_payload and self._last_number + 1 == number:
                return False
            if access is None:      # the record stays: the snapshot still includes that access
                seq, value, status = w.seq, w.value, w.status
            else:
                seq, value, status = access[0], access[1] & _U64, access[2] & _U32
            # unpublish, payload, record and crc (as _read_buffer checks
            # it), publish: one call into C (svs_state_store)
            if self._store_c(self._base + self._buffers[number & 1], cap, number, seq, value, status,
                             payload, n, STORE_STEPS, 0) != 0:
                raise StateError(f"snapshot {number} could not be stored")
            self._stored(number, seq, value, status, payload)
            return True

    # ---- reader ---------------------------------------------------------

    def read(self) -> Snapshot | None:
        """The latest valid snapshot, or None (see :meth:`inspect`)."""
        return self.inspect().snapshot

    def inspect(self) -> ReadResult:
        """Check both buffers (copied into private memory first) and return
        the valid one with the highest number, with the reasons the others
        were rejected.  Never raises for anything found in the segment.

        Meant for a segment whose writer is dead or idle (a restart, a
        drained device).  With a writer still storing, a torn copy fails its
        checksum and the other buffer is used; both are missed only if two
        stores complete during one read."""
        problems: list[str] = []
        found: list[Snapshot] = []
        for i in (0, 1):
            snap, why = self._read_buffer(i)
            if snap is not None:
                found.append(snap)
            elif why:
                problems.append(f"buffer {i}: {why}")
        found.sort(key=lambda s: s.number, reverse=True)
        return ReadResult(found[0] if found else None, tuple(problems))

    def _read_buffer(self, i: int) -> tuple[Snapshot | None, str]:
        cap = self.layout.capacity
        off = self.layout.buffer_offset(i)
        head = bytes(self._mem[off:off + BUFFER_HEADER_SIZE])
        (number,) = _NUMBER.unpack_from(head)
        if number == 0:
            return None, ""                    # empty or being written
        if number >= MAX_NUMBER:
            return None, f"snapshot number {number} out of range"
        if number & 1 != i:
            return None, f"snapshot number {number} in the wrong buffer"
        seq, value, length, status = _RECORD.unpack_from(head, 8)
        (crc,) = _CRC.unpack_from(head, 32)
        if length > cap:
            return None, f"length {length} exceeds the capacity {cap}"
        payload = bytes(self._mem[off + BUFFER_HEADER_SIZE:off + BUFFER_HEADER_SIZE + length])
        want = zlib.crc32(payload, zlib.crc32(head[8:32], zlib.crc32(head[:8])))
        if crc != want:
            return None, f"snapshot {number}: checksum mismatch (torn or scribbled)"
        try:
            state = msgpack.unpackb(
                payload, raw=False, use_list=True, strict_map_key=False,
                max_str_len=cap, max_bin_len=cap,
                max_array_len=cap, max_map_len=cap, max_ext_len=0)
        except (ValueError, TypeError, msgpack.UnpackException) as e:
            return None, f"snapshot {number}: not valid msgpack ({type(e).__name__}: {e})"
        if type(state) is not dict:
            return None, f"snapshot {number}: a {type(state).__name__}, not a map"
        why = _check_plain(state, length + 1)
        if why is not None:
            return None, f"snapshot {number}: {why}"
        access = AccessRecord(seq, value, status) if seq else None
        return Snapshot(number, state, access), ""

    # ---- inflight records -----------------------------------------------

    def queue(self, i: int) -> InflightQueue:
        """The inflight record of queue ``i`` (one object per queue)."""
        if not 0 <= i < len(self.layout.queue_sizes):
            raise ValueError(f"queue {i} out of range [0, {len(self.layout.queue_sizes)})")
        q = self._queues.get(i)
        if q is None:
            size = self.layout.queue_sizes[i]
            off = self.layout.queue_offset(i)
            q = InflightQueue(self._mem[off:off + region_size(size)], size)
            self._queues[i] = q
        return q

    # ---- lifetime -------------------------------------------------------

    def close(self) -> None:
        """Unmap (views handed out must be gone) and close an owned fd."""
        for q in self._queues.values():
            q.release()
        self._queues.clear()
        if self._mem is not None:
            self._mem.release()
            self._mem = None  # type: ignore[assignment]
            w = self._w                 # no store into the mapping from here on
            w.buf[0] = w.buf[1] = w.cap = w.next = w.has_last = 0
            _cffi.release(self._cbuf)
            try:
                self._map.close()
            except BufferError:
                # A view of it is still held somewhere: the mapping goes
                # when the last one does.
                log.warning("state segment: a view is still held; unmapping later")
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> StateSegment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
