"""virtio-blk (virtio 1.2 §5.2) on a raw image file.

``--device virtio-blk,path=FILE[,readonly=on][,serial=ID][,num_queues=N]
[,notify_threads=per-queue|one][,poll_us=N]``.  ``num_queues`` request queues (1 to
:data:`MAX_QUEUES`, default 1).  Features offered: VIRTIO_BLK_F_SEG_MAX,
VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO with
``readonly=on`` (the image is then opened read-only), and VIRTIO_BLK_F_MQ
with more than one queue (§5.2.3; a driver that does not accept it uses
queue 0 alone).  Configuration: capacity (the image size in 512-byte
sectors, rounded down), seg_max, blk_size (512), num_queues.

Each queue has its own doorbell thread (``notify_threads=per-queue``, the
default with more than one queue; ``one``: a single thread polls them all,
:class:`devices.virtio.doorbells.Doorbells`).  The requests of a queue are
served under the device's lock, so the threads of several queues overlap
only where it is not held (waiting on the doorbells, interrupts); one
interrupt (and one poll of the ring) covers every request served in a
round.  After the batch a doorbell rang for, the thread watches the
avail ring for ``poll_us`` microseconds more (default
:data:`DEFAULT_POLL_US`; 0: not at all; only with a thread per queue
and fewer queues than CPUs, so that one is left for the vCPU):
a driver that makes its next request available in that time is served
without the thread sleeping and being woken again (:meth:`VirtioBlk._rung`).

Requests (§5.2.6): a 16-byte header (type, reserved, sector) in the
device-readable part, data, and a status byte, the last device-writable
byte.  VIRTIO_BLK_T_IN reads straight into guest RAM (``preadv`` into the
buffers' windows), VIRTIO_BLK_T_OUT writes straight from it (``pwritev``);
a request is completed only after the system call returned, so the data
is in the file (the page cache) when the driver sees it; VIRTIO_BLK_T_FLUSH
is ``fdatasync``; VIRTIO_BLK_T_GET_ID writes the ID (at most 20 bytes,
zero-padded).  Reads and writes of the usual shape (header, one data
buffer, status byte) are served in C in batches (:mod:`devices.blkring`,
:meth:`VirtioBlk.process_queue`), each one's ``blk.read``/``blk.write``
fault decision taken first (in C for a request no armed fault can take,
counted in bulk; by the engine otherwise); a request a fault fires on, other shapes,
and everything while ``queue.complete`` is armed are served by
:meth:`handle`.  A request that is malformed (no room for header or status,
data not a whole number of sectors, beyond the capacity) or fails on the
host gets VIRTIO_BLK_S_IOERR, a write to a read-only disk too (§5.2.6.2);
an unknown type gets VIRTIO_BLK_S_UNSUPP.  A chain without a status byte
completes with length 0.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import time

from devices import blkring
from devices.base import BadParameter, DeviceHost
from devices.faults.apply import flip_bits
from devices.faults.engine import Firing
from devices.faults.table import POINTS
from devices.guestmem import GuestMemoryFault, GuestRam
from devices.virtio.core import NEVER
from devices.hostres import FILE, HostResource, open_file
from devices.snapshot import U64, Fields, require
from devices.virtio.pci import VirtioPciDevice
from devices.virtio.virtqueue import Buffer, Chain, QueueBroken, Virtqueue

log = logging.getLogger(__name__)

VIRTIO_ID_BLOCK = 2
QUEUE_SIZE = 128
SECTOR_SIZE = 512

# §5.2.3 feature bits
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_MQ = 12
#: How long a doorbell thread watches the avail ring after a batch
#: (poll_us=), microseconds: QEMU's iothreads poll up to 32 us too.
DEFAULT_POLL_US = 32
#: Batches served one after another by that watching before the thread
#: goes back to its doorbells (which it must look at now and then).
POLL_ROUNDS = 16
#: Most request queues a device offers (num_queues=).
MAX_QUEUES = 16
# §5.2.6 request types and status values
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2
VIRTIO_BLK_ID_BYTES = 20

_HEADER = struct.Struct("<IIQ")
#: struct virtio_blk_config up to num_queues (§5.2.4): capacity, size_max,
#: seg_max, geometry (cylinders, heads, sectors), blk_size, topology
#: (physical_block_exp, alignment_offset, min_io_size, opt_io_size),
#: writeback, unused0, num_queues.
_CONFIG = struct.Struct("<QIIHBBIBBHIBBH")


def _split(buffers: list[Buffer], at: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The byte ranges of ``buffers`` before and after byte ``at``."""
    head, tail, pos = [], [], 0
    for b in buffers:
        lo, hi = pos, pos + b.length
        if lo < at:
            head.append((b.addr, min(hi, at) - lo))
        if hi > at:
            start = max(lo, at)
            tail.append((b.addr + start - lo, hi - start))
        pos = hi
    return [r for r in head if r[1]], [r for r in tail if r[1]]


def _cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _open_flags(readonly: bool) -> int:
    return (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC


#: handle()'s ``fired`` when no fault decision was taken for the request yet.
_UNSET = object()

#: The fault point of each request type (devices.faults).
_FAULT_POINTS = {VIRTIO_BLK_T_IN: "blk.read", VIRTIO_BLK_T_OUT: "blk.write", VIRTIO_BLK_T_FLUSH: "blk.flush"}


class VirtioBlk(VirtioPciDevice):
    kind = "virtio-blk"
    virtio_id = VIRTIO_ID_BLOCK
    fault_points = {**VirtioPciDevice.fault_points, **{p: POINTS[p] for p in _FAULT_POINTS.values()}}
    class_code = 0x018000          # mass storage, other (as QEMU)
    queue_sizes: tuple[int, ...] = (QUEUE_SIZE,)

    def __init__(self, host: DeviceHost, **params: str):
        path = params.pop("path", None)
        readonly = params.pop("readonly", "off")
        serial = params.pop("serial", None)
        nq = params.pop("num_queues", "1")
        threads = params.pop("notify_threads", None)
        poll_us = params.pop("poll_us", str(DEFAULT_POLL_US))
        if not poll_us.isdigit() or int(poll_us) > 1000:
            raise BadParameter(f"virtio-blk: poll_us={poll_us!r} (0 to 1000 microseconds)")
        self.poll_ns = int(poll_us) * 1000
        if not nq.isdigit() or not 1 <= int(nq) <= MAX_QUEUES:
            raise BadParameter(f"virtio-blk: num_queues={nq!r} (1 to {MAX_QUEUES})")
        if threads not in (None, "per-queue", "one"):
            raise BadParameter(f"virtio-blk: notify_threads={threads!r} (per-queue or one)")
        self.num_queues = int(nq)
        self.queue_sizes = (QUEUE_SIZE,) * self.num_queues
        self.notify_threads = self.num_queues if threads != "one" else 1
        # Watching only where each queue has its thread and those threads
        # leave a CPU free (for the vCPU that drives them): with more
        # spinning threads than spare CPUs, depth 32 on 2 and 4 queues fell
        # 8-20% on the project's 2-CPU host.
        self._polls = bool(self.poll_ns) and self.notify_threads == self.num_queues \
            and self.num_queues < _cpus()
        if path is None:
            raise BadParameter("virtio-blk: path=FILE (a raw image) is required")
        if readonly not in ("on", "off"):
            raise BadParameter(f"virtio-blk: readonly={readonly!r} (on or off)")
        self.readonly = readonly == "on"
        features = (1 << VIRTIO_BLK_F_SEG_MAX) | (1 << VIRTIO_BLK_F_BLK_SIZE) | (1 << VIRTIO_BLK_F_FLUSH)
        if self.readonly:
            features |= 1 << VIRTIO_BLK_F_RO
        if self.num_queues > 1:
            features |= 1 << VIRTIO_BLK_F_MQ
        self.device_features = features
        self.path = path
        ident = (serial if serial is not None else os.path.basename(path)).encode()
        if len(ident) > VIRTIO_BLK_ID_BYTES:
            raise BadParameter(f"virtio-blk: serial={serial!r} (at most {VIRTIO_BLK_ID_BYTES} bytes)")
        self.ident = ident.ljust(VIRTIO_BLK_ID_BYTES, b"\0")
        self.fd = -1
        self.capacity = 0
        self._ring: blkring.Ring | None = None
        #: The fault decisions the C loop takes itself (:meth:`_fault_table`).
        self._faults: blkring.FaultTable | None = None
        super().__init__(host, **params)

    @classmethod
    def host_resources(cls, params: dict[str, str]) -> tuple[HostResource, ...]:
        if "path" not in params:
            return ()
        return (HostResource(FILE, params["path"], _open_flags(params.get("readonly") == "on")),)

    def start(self) -> None:
        try:
            self.fd = open_file(self.path, _open_flags(self.readonly))
        except OSError as e:
            raise BadParameter(f"virtio-blk: {self.path}: {e.strerror}") from None
        restored_capacity, self.capacity = self.capacity, os.fstat(self.fd).st_size // SECTOR_SIZE
        super().start()
        if self.restored and self.capacity != restored_capacity:
            # The image changed size while the device was down: tell the
            # driver, as a resize does (§5.2.4, §4.1.4.5).
            log.info("%s: capacity %d -> %d sectors", self.kind, restored_capacity, self.capacity)
            self.config_changed()

    def stop(self) -> None:
        super().stop()
        self._ring = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- snapshot: the configuration the driver read; the image is a parameter --

    def device_state(self) -> dict:
        return {"capacity": self.capacity, "ident": self.ident}

    def check_device_state(self, state: object, where: str) -> object:
        f = Fields(state, where, ("capacity", "ident"))
        require(f.blob("ident", VIRTIO_BLK_ID_BYTES) == self.ident, f.name("ident"),
                "another serial id than this device's (serial= differs)")
        return f.integer("capacity", 0, U64 // SECTOR_SIZE)

    def load_device_state(self, checked: object) -> None:
        assert isinstance(checked, int)
        self.capacity = checked

    def device_config(self) -> bytes:
        return _CONFIG.pack(self.capacity, 0, QUEUE_SIZE - 2, 0, 0, 0, SECTOR_SIZE, 0, 0, 0, 0, 0, 0,
                            self.num_queues)

    # -- requests ------------------------------------------------------------

    def fail_request(self, queue: Virtqueue, chain: Chain, mem: GuestRam) -> int:
        return 0

    def _rung(self, queue: int, count: int) -> None:
        """The doorbell thread (lock held): the batch, then watching the
        avail ring for ``poll_us`` (:meth:`_poll`) when the thread has
        this queue to itself and a CPU is left over."""
        super()._rung(queue, count)
        if self._polls:
            self._poll(self.queues[queue])

    def _poll(self, q: Virtqueue) -> None:
        """While the driver makes buffers available within ``poll_ns`` of
        the last batch, serve them here (at most :data:`POLL_ROUNDS`
        batches): the C spin (:meth:`devices.blkring.Ring.wait`) runs with
        the GIL released, the device's lock held (so guest RAM and the
        queue stay as they are while it looks)."""
        for _ in range(POLL_ROUNDS):
            mem = self.queue_ready(q)
            ring = self._ring
            if mem is None or ring is None or ring.buffer is not mem.buffer:
                return
            try:
                avail = q._where(mem)[2]
                with ring.mapped():
                    if not ring.wait(avail, q.last_avail, self.poll_ns):
                        return
            except (GuestMemoryFault, ValueError):
                return              # (process_queue tells the driver, if it must)
            self.process_queue(q)

    def process_queue(self, q: Virtqueue) -> None:
        """The queue loop with the usual requests in C (devices.blkring):
        batches of what the avail ring holds, each chain recorded in
        flight before it is acted on, ``used->idx`` published once per
        batch, one interrupt; whatever the C path does not take (another
        shape, a failed or short transfer, a resubmitted chain, a request
        a ``blk.read``/``blk.write`` fault fires on) is served by the
        Python path (:meth:`handle`), and with ``queue.complete`` armed
        everything is.  Each request's fault decision is taken once, in
        ring order: C passes over the requests no armed fault can take
        (:class:`devices.blkring.FaultTable`, counted in bulk) and stops at
        the first one the engine must decide (:meth:`_blk_event`), so an
        armed fault that does not fire leaves its requests in C."""
        if not blkring.AVAILABLE or q.resubmit:
            super().process_queue(q)
            return
        # With anything armed, the C loop's fault table, up to date (again
        # after each event the engine decides: a firing changes it), says
        # what it means here; with nothing armed (the usual case) one test.
        armed = self.fault_engine.armed
        faults = None
        if armed:
            faults = self._faults
            if faults is None or faults.armed is not armed:     # (another engine: another armed)
                faults = self._fault_table()
            if faults.whole_python:
                super().process_queue(q)
                return
            if not faults.decides:
                faults = None
        decided = faults is not None
        mem = self.queue_ready(q)
        if mem is None:
            return
        served, rest = 0, False
        try:
            ring = self._ring
            if ring is None or ring.buffer is not mem.buffer:
                ring = self._ring = blkring.Ring(mem.buffer, mem.spans)
            # The in-flight record (devserver.persist.QueueRecord.direct), kept
            # by the C loop itself when the hook offers it and fits the queue.
            direct = getattr(q.inflight, "direct", None) if q.inflight is not None else None
            record = direct() if direct is not None else None
            if record is not None and record.size != q.size:
                record = None
            with ring.mapped(), (ring.recording(record) if record is not None else contextlib.nullcontext()):
                # As many batches as the generic loop would serve requests
                # (each batch is at least one): a driver that keeps adding
                # requests while this runs -- a device process on its own
                # CPU -- stays in C rather than passing to the Python loop.
                for _ in range(4 * q.size):
                    n = q.pending(mem)
                    if not n:
                        break
                    view, table, avail, used = q._where(mem)
                    # With blk.read/blk.write armed each request's fault decision is
                    # taken once, in ring order: the scan passes over (and counts)
                    # the requests no fault can take and ends the batch at the first
                    # the engine must decide, which is asked here; C serves the
                    # requests before one that fires, Python that one (and any C
                    # stopped at) with the decision.
                    k = ring.scan(table, avail, q.size, q.last_avail, n, self.capacity, self.readonly, faults)
                    if not k:
                        rest = True
                        break
                    reqs = ring.reqs
                    fired: tuple[int, Firing] | None = None
                    asked = k < 0
                    if asked:
                        k = -k
                        last = reqs[k - 1]
                        firing = self._blk_event(bool(last.write), int(last.sector))
                        if firing is not None:
                            fired = (k - 1, firing)
                    run = k if fired is None else k - 1
                    if record is not None:      # popped, served and completed in C
                        # completions the Python path left pending are written
                        # first (a head the driver reuses must be completed
                        # before it is popped again)
                        assert direct is not None
                        direct()
                        done = ring.run(self.fd, run, k, used, q.size, q.used_idx)
                        q.advanced(k, done)
                    else:
                        heads = [reqs[i].head for i in range(k)]
                        q.taken(heads)
                        done = ring.run(self.fd, run, k, used, q.size, q.used_idx)
                        q.published(mem, heads[:done])
                    q.served += k
                    served += done
                    if done < k:
                        if record is not None:      # (the other branch has them)
                            heads = [reqs[i].head for i in range(k)]
                        results = []
                        for i in range(done, k):
                            h = heads[i]
                            decision = (fired[1] if fired is not None and i == k - 1
                                        else None if decided else _UNSET)
                            written = self._guarded(lambda q, c, m, d=decision: self.handle(q, c, m, d),
                                                    q, q._walk(mem, view, table, h), mem)
                            if written != NEVER:        # a fault's hang: the request never completes
                                results.append((h, written))
                        q.push_many(mem, results)
                        served += len(results)
                    if asked:               # (the scan stopped there, not at the ring's end)
                        faults = self._fault_table()
                        continue
                    if k < n:
                        rest = True
                        break
                else:
                    rest = True
        except (QueueBroken, GuestMemoryFault) as e:
            self.needs_reset(str(e))
            return
        if served:
            self.used_notify(q, mem)
        if rest:
            super().process_queue(q)

    def _fault_table(self) -> blkring.FaultTable:
        """The C loop's fault table, filled again if the engine's faults
        changed (or the engine); the engine is told the events are counted
        elsewhere (its readers then hand them over first, under the
        device's lock)."""
        engine, table = self.fault_engine, self._faults
        if table is None:
            table = self._faults = blkring.FaultTable()
        if table.engine is not engine:
            engine.counted_elsewhere(self._lock, self._hand_over)
        elif table.armed is engine.armed:
            return table
        table.fill(engine)
        return table

    def _hand_over(self) -> None:
        """The engine's :meth:`~devices.faults.engine.FaultEngine.counted_elsewhere`
        hook (device lock held): the events the C loop passed over."""
        if self._faults is not None:
            self._faults.hand_over()

    def _blk_event(self, write: bool, sector: int) -> Firing | None:
        """One ``blk.read`` (``write``: ``blk.write``) event decided by the
        engine; the caller found the point armed.  The events the C loop
        passed over are handed over first, so this one gets its number in
        ring order, and the C loop's table learns of the decision."""
        table = self._faults
        if table is None:
            return self.fault_engine.armed[blkring.FAULT_POINTS[write]]({"sector": sector})
        return table.ask(self.fault_engine, write, sector)

    def handle(self, queue: Virtqueue, chain: Chain, mem: GuestRam, fired: Firing | None | object = _UNSET) -> int:
        """One request in Python; ``fired``: the fault decision the C
        path already took for it (:meth:`process_queue`), so its
        event is not counted twice."""
        bufs = chain.buffers
        if fired is _UNSET and len(bufs) == 3:
            used, fired = self._fast(bufs, mem)
            if used is not None:
                return used
        readable, writable = chain.readable, chain.writable
        if writable and writable[-1].length == 1:     # the usual layout: the status byte alone
            status_addr = writable[-1].addr
            data_out = [(b.addr, b.length) for b in writable[:-1] if b.length]
        else:
            wlen = sum(b.length for b in writable)
            if wlen < 1:
                log.warning("%s: request %d has no status byte", self.kind, chain.head)
                return 0
            data_out, status_at = _split(writable, wlen - 1)
            status_addr = status_at[0][0]
        if readable and readable[0].length == _HEADER.size:     # the header alone
            payload = [(b.addr, b.length) for b in readable[1:] if b.length]
            rtype, _reserved, sector = _HEADER.unpack_from(mem.buffer, mem.offset(readable[0].addr, _HEADER.size))
        else:
            if sum(b.length for b in readable) < _HEADER.size:
                return self._status(mem, status_addr, VIRTIO_BLK_S_IOERR, 0)
            header, payload = _split(readable, _HEADER.size)
            rtype, _reserved, sector = _HEADER.unpack(b"".join(mem.read(a, n) for a, n in header))
        point = _FAULT_POINTS.get(rtype)
        if fired is not _UNSET:
            if isinstance(fired, Firing):
                return self._faulted(fired, mem, rtype, sector, payload, data_out, status_addr)
        elif point is not None and point in self.fault_engine.armed:
            firing = (self.fault_engine.point(point) if rtype == VIRTIO_BLK_T_FLUSH
                      else self._blk_event(rtype == VIRTIO_BLK_T_OUT, sector))
            if firing is not None:
                return self._faulted(firing, mem, rtype, sector, payload, data_out, status_addr)
        try:
            if rtype == VIRTIO_BLK_T_IN:
                if payload:
                    return self._status(mem, status_addr, VIRTIO_BLK_S_IOERR, 0)
                return self._read(mem, sector, data_out, status_addr)
            if rtype == VIRTIO_BLK_T_OUT:
                if data_out:
                    return self._status(mem, status_addr, VIRTIO_BLK_S_IOERR, 0)
                return self._write(mem, sector, payload, status_addr)
            if rtype == VIRTIO_BLK_T_FLUSH:
                os.fdatasync(self.fd)
                return self._status(mem, status_addr, VIRTIO_BLK_S_OK, 0)
            if rtype == VIRTIO_BLK_T_GET_ID:
                ident, done = self.ident, 0
                for a, n in data_out:
                    k = min(n, len(ident) - done)
                    if k <= 0:
                        break
                    mem.write(a, ident[done:done + k])
                    done += k
                return self._status(mem, status_addr, VIRTIO_BLK_S_OK, done)
        except OSError as e:
            log.warning("%s: request type %d at sector %d: %s", self.kind, rtype, sector, e)
            return self._status(mem, status_addr, VIRTIO_BLK_S_IOERR, 0)
        return self._status(mem, status_addr, VIRTIO_BLK_S_UNSUPP, 0)

    def _fast(self, bufs: list[Buffer], mem: GuestRam) -> tuple[int | None, Firing | None | object]:
        """The usual request -- header, one data buffer, status byte --
        read or written whole with one system call straight between the
        image and guest RAM: (bytes written to the guest, fault decision).
        None for anything else, which :meth:`handle`'s general path
        serves: another layout, another type, a fault firing, a range to
        fail, a short transfer.  With ``blk.read``/``blk.write`` armed the
        request's fault decision is taken here, once, as soon as its type
        and sector are known (where the general path takes it), and
        handed back for the general path (``_UNSET``: none taken)."""
        hdr, data, status = bufs
        if hdr.writable or hdr.length != _HEADER.size or not status.writable or status.length != 1:
            return None, _UNSET
        view = mem.buffer
        rtype, _reserved, sector = _HEADER.unpack_from(view, mem.offset(hdr.addr, _HEADER.size))
        n = data.length
        if rtype == VIRTIO_BLK_T_IN:
            point, writable_data, io = "blk.read", True, os.preadv
        elif rtype == VIRTIO_BLK_T_OUT:
            point, writable_data, io = "blk.write", False, os.pwritev
        else:
            return None, _UNSET
        decision: Firing | None | object = _UNSET
        if point in self.fault_engine.armed:
            decision = self._blk_event(not writable_data, sector)
            if decision is not None:
                return None, decision
        if (data.writable != writable_data or (not writable_data and self.readonly)
                or not n or n % SECTOR_SIZE or sector + n // SECTOR_SIZE > self.capacity):
            return None, decision
        off = mem.offset(data.addr, n)
        with view[off:off + n] as window:
            try:
                moved = io(self.fd, [window], sector * SECTOR_SIZE)
            except OSError:
                return None, decision   # the general path fails it, and logs why
        if moved != n:
            return None, decision       # the general path finishes (or fails) it
        view[mem.offset(status.addr, 1)] = VIRTIO_BLK_S_OK
        return (n + 1 if rtype == VIRTIO_BLK_T_IN else 1), decision

    def _faulted(self, firing: Firing, mem: GuestRam, rtype: int, sector: int, payload: list[tuple[int, int]],
                 data_out: list[tuple[int, int]], status_addr: int) -> int:
        """Serve a request a fault fired on (devices.faults, ``blk.*``)."""
        action, what = firing.action, f"{_FAULT_POINTS[rtype][4:]} at sector {sector}"
        if action in ("ioerr", "unsupp"):
            firing.done(f"{what} failed with {action.upper()}")
            return self._status(mem, status_addr, VIRTIO_BLK_S_IOERR if action == "ioerr" else VIRTIO_BLK_S_UNSUPP, 0)
        if action == "hang":
            firing.done(f"{what} never completes")
            return NEVER
        if action == "lose":
            total = self._range_ok(sector, payload)
            firing.done(f"{what}: {total or 0} bytes acknowledged, not written")
            return self._status(mem, status_addr, VIRTIO_BLK_S_OK, 0)
        if action == "torn":
            keep = firing.params["sectors"] * SECTOR_SIZE
            if self._range_ok(sector, payload) is None:
                firing.done(f"{what}: out of range, failed as without the fault")
                return self._status(mem, status_addr, VIRTIO_BLK_S_IOERR, 0)
            head, _tail = _split([Buffer(a, n, False) for a, n in payload], keep)
            try:
                self._transfer(mem, sector, head, status_addr, write=True)
            except OSError as e:
                firing.done(f"{what}: torn write failed: {e}")
                return self._status(mem, status_addr, VIRTIO_BLK_S_IOERR, 0)
            firing.done(f"{what}: {sum(n for _a, n in head) // SECTOR_SIZE} sector(s) written, acknowledged whole")
            return self._status(mem, status_addr, VIRTIO_BLK_S_OK, 0)
        if action == "delay" and firing.params["ms"]:
            time.sleep(firing.params["ms"] / 1000)
            firing.done(f"{what} served {firing.params['ms']:g} ms late")
        try:
            if rtype == VIRTIO_BLK_T_IN:
                used = self._read(mem, sector, data_out, status_addr)
                if action == "corrupt" and mem.buffer[mem.offset(status_addr, 1)] == VIRTIO_BLK_S_OK:
                    data = bytearray(b"".join(mem.read(a, n) for a, n in data_out))
                    flipped = flip_bits(firing, data, firing.params["bits"])
                    pos = 0
                    for a, n in data_out:
                        mem.write(a, bytes(data[pos:pos + n]))
                        pos += n
                    firing.done(f"{what}: bit(s) {', '.join(f'{b // 8}.{b % 8}' for b in flipped)} "
                                "(byte.bit of the data) flipped")
                return used
            if rtype == VIRTIO_BLK_T_OUT:
                return self._write(mem, sector, payload, status_addr)
            os.fdatasync(self.fd)
            return self._status(mem, status_addr, VIRTIO_BLK_S_OK, 0)
        except OSError as e:
            firing.done(f"{what}: {e}")
            return self._status(mem, status_addr, VIRTIO_BLK_S_IOERR, 0)
        finally:
            firing.done(f"{what}: not applied")

    @staticmethod
    def _status(mem: GuestRam, addr: int, status: int, data_written: int) -> int:
        mem.buffer[mem.offset(addr, 1)] = status
        return data_written + 1

    def _range_ok(self, sector: int, ranges: list[tuple[int, int]]) -> int | None:
        total = sum(n for _a, n in ranges)
        if total % SECTOR_SIZE or sector + total // SECTOR_SIZE > self.capacity:
            return None
        return total

    def _read(self, mem: GuestRam, sector: int, ranges: list[tuple[int, int]], status_addr: int) -> int:
        return self._transfer(mem, sector, ranges, status_addr, write=False)

    def _write(self, mem: GuestRam, sector: int, ranges: list[tuple[int, int]], status_addr: int) -> int:
        return self._transfer(mem, sector, ranges, status_addr, write=True)

    def _transfer(self, mem: GuestRam, sector: int, ranges: list[tuple[int, int]], status_addr: int,
                  write: bool) -> int:
        """Move the request's data between the image and guest RAM with no
        copy in between; a write returns only after pwritev did.  Returns
        the used length (data read plus the status byte)."""
        total = self._range_ok(sector, ranges)
        if total is None or (write and self.readonly):
            return self._status(mem, status_addr, VIRTIO_BLK_S_IOERR, 0)
        io, what = (os.pwritev, "write") if write else (os.preadv, "read")
        offset = sector * SECTOR_SIZE
        for a, n in ranges:
            with mem.view(a, n) as window:
                done = 0
                while done < n:
                    moved = io(self.fd, [window[done:]], offset + done)
                    if moved <= 0:
                        raise OSError(0, f"short {what} at byte {offset + done}")
                    done += moved
            offset += n
        return self._status(mem, status_addr, VIRTIO_BLK_S_OK, 0 if write else total)
