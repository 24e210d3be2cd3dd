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
fault points: it
takes each request's ``blk.read``/``blk.write`` decision before the run
(one that fires stops the run there and goes to Python); with
``queue.complete`` armed the C path is not used.
Missing extension (a tree not built): :data:`AVAILABLE` is False and the
device serves everything in Python.
"""

from __future__ import annotations

from typing import Any

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
             readonly: bool) -> int:
        return int(lib.blk_scan(self.ptr, self.length, self.spans, self.nspans, desc, avail, size, last_avail,
                                pending, capacity, readonly, self.reqs, min(pending, BATCH)))

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
