"""virtio-blk's usual request in C (``devices._blkring_c``, cffi API mode).

Why: in-process, the Python request path costs ~10 us per 4 KiB request
on the project's host against ~1.3 us for the ``preadv`` itself
(``python -m vmm.bench.virtio_blk_path --profile``: descriptor walk,
request parsing and the used ring are the top entries); at queue depth
32 the device process is then the limit.  This module serves a run of
requests of the usual shape -- a 16-byte header (device-readable), one
data buffer, a one-byte status (device-writable) -- with two C calls per
batch:

* :func:`scan` reads avail entries from ``last_avail`` on and describes
  each request of that shape (type IN or OUT, in range, every buffer in
  guest RAM, no INDIRECT, the writable-after-readable rule), stopping
  at the first entry that is anything else (not taken: the Python path
  serves it, and fails it where it must);
* :func:`run` does each one's ``preadv``/``pwritev`` straight between the
  image and guest RAM, writes its status byte and its used element, and
  stops at the first that fails or is short (the caller serves that one
  in Python).

:func:`run` writes the used elements; the caller stores ``used->idx``
once per batch (:meth:`devices.virtio.virtqueue.Virtqueue.published`),
except with the device's in-flight record at hand (:meth:`Ring.recording`:
a device process's state segment): then :func:`run` stores the index
itself and keeps the record, with the stores of
:class:`ipc.inflight.InflightQueue` in the same order: every taken chain
popped before any is acted on, the finished ones completed after
``used->idx`` -- in Python those two steps cost ~1 us of a ~4 us request
(``python -m vmm.bench.state_cost``: state=on 0.75x state=off before,
0.98-1.01x after).  Otherwise the caller records each chain itself.  The
caller (:meth:`devices.virtio.blk.VirtioBlk.process_queue`) keeps the
fault points: with a :class:`FaultTable`, :meth:`Ring.scan` passes over
the requests no armed ``blk.read``/``blk.write`` fault can take (first
sector outside every armed span, no trigger due: what
:meth:`devices.faults.engine.FaultEngine.quiet` allows), counting them in
C, and stops at the first the engine must decide, which the caller asks
it about (one that fires stops the run there and goes to Python); the
passed-over events reach the engine in bulk
(:meth:`FaultTable.hand_over`, before it decides or is read).  In
process, a Python decision per request cost ~0.46 us of a ~4 us request;
with ``queue.complete`` armed the C path is not used.  (A separate cffi
call for it cost ~0.1-0.2 us a batch here, as much again: it is part of
the scan's call.)
After a doorbell's batch, :meth:`Ring.wait` spins a while on the avail
index (``poll_us=`` of the device) so that the next request of a driver
at queue depth 1 is served without a sleep and a wake-up.
Missing extension (a tree not built): :data:`AVAILABLE` is False and the
device serves everything in Python.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from devices.faults.engine import Firing

try:
    from devices._blkring_c import ffi, lib
except ImportError:         # not built: the Python path serves everything
    ffi = lib = None

AVAILABLE = lib is not None
#: Requests per scan (a queue holds at most 128 in this device).
BATCH = 128


class Ring:
    """The C side's view of guest RAM's ranges, kept while they stay; the
    pointer into the mapping is taken per batch (:meth:`mapped`), so no
    export of the mapping outlives a call (guest RAM can be released)."""

    def __init__(self, buffer: memoryview, spans: tuple[tuple[int, int, int], ...]):
        assert ffi is not None
        self.buffer = buffer
        self.length = len(buffer)
        self.spans = ffi.new("struct blk_span[]", [{"first": a, "end": b, "delta": d} for a, b, d in spans])
        self.nspans = len(spans)
        self.reqs: Any = ffi.new("struct blk_req[]", BATCH)
        self.ptr: Any = None
        #: The in-flight record :meth:`run` writes (:meth:`recording`), or NULL.
        self.rec: Any = ffi.new("struct blk_record *")
        self._rec_ptr: Any = ffi.NULL

    def mapped(self) -> Any:
        """``with ring.mapped():`` -- the pointer :meth:`scan` and
        :meth:`run` use, released at the end."""
        assert ffi is not None
        self.ptr = ffi.from_buffer("uint8_t[]", self.buffer, require_writable=True)
        return self.ptr

    def scan(self, desc: int, avail: int, size: int, last_avail: int, pending: int, capacity: int,
             readonly: bool, faults: FaultTable | None = None) -> int:
        """Describe the requests of the usual shape from ``last_avail`` on:
        how many.  With ``faults``, those no armed fault can take are
        passed over (:class:`FaultTable`) and the batch ends at the first
        the engine must decide: then the count is negative (``-k``: the
        ``k``-th, the last, is to be decided)."""
        if faults is None:
            return int(lib.blk_scan(self.ptr, self.length, self.spans, self.nspans, desc, avail, size, last_avail,
                                    pending, capacity, readonly, self.reqs, min(pending, BATCH)))
        return int(lib.blk_scan_faults(self.ptr, self.length, self.spans, self.nspans, desc, avail, size,
                                       last_avail, pending, capacity, readonly, self.reqs, min(pending, BATCH),
                                       faults.c))

    def wait(self, avail: int, last_avail: int, ns: int) -> bool:
        """Spin (the GIL released) until the driver makes a buffer
        available past ``last_avail`` -- True -- or ``ns`` nanoseconds
        passed -- False (``blk_wait``)."""
        got = int(lib.blk_wait(self.ptr, self.length, avail, last_avail, ns))
        if got < 0:
            raise ValueError(f"blk_wait: avail ring at {avail:#x} outside guest RAM")
        return got > 0

    def recording(self, record: Any) -> Any:
        """``with ring.recording(record):`` -- :meth:`run` also keeps
        ``record`` (an :class:`ipc.inflight.InflightQueue`, its pending
        completions already written): each taken chain popped before any
        is acted on, the finished ones completed after ``used->idx``.
        The pointer into its region is released at the end."""
        assert ffi is not None
        buf = ffi.from_buffer("uint8_t[]", record.buffer, require_writable=True)
        self.rec.base, self.rec.len, self.rec.size = buf, len(buf), record.size
        self._rec_ptr = self.rec
        self._record = record
        return _Recording(self, buf)

    def run(self, fd: int, k: int, taken: int, used: int, size: int, used_idx: int) -> int:
        """Serve the first ``k`` of the ``taken`` chains described by
        :meth:`scan` (each recorded in flight first, when recording), their
        used elements stored (and ``used->idx`` and the record, when
        recording): how many were served."""
        rec = self._rec_ptr
        if rec != ffi.NULL:
            rec.counter = self._record.counter
        done = int(lib.blk_run(self.ptr, self.length, fd, self.reqs, k, taken, used, size, used_idx, rec))
        if done < 0:
            raise ValueError("blk_run refused its arguments (ring size, head past the record)")
        if rec != ffi.NULL:
            self._record.counter = int(rec.counter)
        return done


#: The points :class:`FaultTable` passes over, by ``blk_req.write``.
FAULT_POINTS = ("blk.read", "blk.write")
#: What the C side takes for "no limit" (:attr:`devices.faults.engine.Quiet.events` None).
_UNLIMITED = 2**64 - 1


class FaultTable:
    """The ``blk.read``/``blk.write`` fault decisions the C loop takes
    itself (``struct blk_faults``), filled from a fault engine's
    :meth:`~devices.faults.engine.FaultEngine.quiet` and kept true by its
    owner: :meth:`fill` whenever the engine's faults changed (``armed`` is
    not the engine's), every other event of the two points decided through
    :meth:`ask`, :meth:`hand_over` before the engine is read.  Used under the lock that serialises the
    device's requests (the engine's :meth:`counted_elsewhere` lock)."""

    def __init__(self) -> None:
        assert ffi is not None
        self.c: Any = ffi.new("struct blk_faults *")
        self._points = (self.c.point[0], self.c.point[1])
        #: The engine the passed-over events belong to, and the ``armed``
        #: mapping the table was filled for (a new one -- the engine's faults
        #: changed, or another engine, whose mapping is its own: fill again).
        self.engine: Any = None
        self.armed: Any = None
        #: Whether the C loop passes over (and so decides) blk.read/blk.write
        #: requests, and whether the Python loop must serve everything
        #: (``queue.complete`` armed), for that ``armed``.
        self.decides = False
        self.whole_python = False

    def fill(self, engine: Any) -> None:
        """The table for ``engine``'s faults as they stand (the events
        passed over so far handed over first)."""
        self.hand_over()
        self.engine, self.armed = engine, engine.armed
        self.decides = any(point in self.armed for point in FAULT_POINTS)
        self.whole_python = "queue.complete" in self.armed
        for p, point in zip(self._points, FAULT_POINTS, strict=True):
            p.passed = 0
            if point not in self.armed:         # not counted: pass every one, uncounted
                p.quiet, p.nspans = _UNLIMITED, 0
                continue
            quiet = engine.quiet(point)
            if len(quiet.spans) > lib.BLK_FAULT_SPANS or quiet.key not in (None, "sector"):
                p.quiet, p.nspans = 0, 0       # more than C holds: the engine decides each one
                continue
            p.quiet = _UNLIMITED if quiet.events is None else min(quiet.events, _UNLIMITED)
            p.nspans = len(quiet.spans)
            for j, (lo, hi) in enumerate(quiet.spans):
                p.lo[j], p.hi[j] = lo, hi

    def hand_over(self) -> None:
        """Give the engine the events passed over since the last time
        (:meth:`~devices.faults.engine.FaultEngine.skip`)."""
        if self.engine is None:
            return
        for p, point in zip(self._points, FAULT_POINTS, strict=True):
            n = int(p.passed)
            if n:
                p.passed = 0
                self.engine.skip(point, n)

    def ask(self, engine: Any, write: bool, sector: int) -> Firing | None:
        """One event of ``blk.read`` (``write``: ``blk.write``), armed on
        ``engine`` (the device's), decided by it -- after the events of the
        point passed over so far were handed over, so it gets its number
        in ring order.  One that fires nothing uses up one more of the
        point's quiet run; a firing (or another engine than the table's)
        makes the table stale (:meth:`fill` again)."""
        point = FAULT_POINTS[write]
        p = self._points[write]
        n = p.passed
        if n:
            p.passed = 0
            self.engine.skip(point, int(n))
        firing: Firing | None = engine.armed[point]({"sector": sector})
        if firing is not None or engine is not self.engine:
            self.armed = None
        elif p.quiet:
            p.quiet -= 1
        return firing


class _Recording:
    def __init__(self, ring: Ring, buf: Any):
        self.ring, self.buf = ring, buf

    def __enter__(self) -> Any:
        return self.buf

    def __exit__(self, *exc: object) -> None:
        assert ffi is not None
        self.ring._rec_ptr = ffi.NULL
        self.ring.rec.base = ffi.NULL
        self.ring._record = None
        ffi.release(self.buf)
