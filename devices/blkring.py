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

The caller (:meth:`devices.virtio.blk.VirtioBlk.process_queue`) records
each taken chain in the in-flight record before :func:`run` acts on it,
publishes ``used->idx`` once per batch and keeps the fault points: it
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

    def run(self, fd: int, k: int, used: int, size: int, used_idx: int) -> int:
        return int(lib.blk_run(self.ptr, self.length, fd, self.reqs, k, used, size, used_idx))
