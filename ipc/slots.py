"""Access slots: how one guest access travels from a vCPU thread of the VMM
to a device process and back, through shared memory.

Each device gets one segment (a sealed memfd, passed to the device over its
control socket) holding one request slot per vCPU and a doorbell.  The VMM
side (:class:`SlotCaller`) writes a request, rings the doorbell and waits
for the answer with a deadline: a short spin, then futex waits in slices,
all in C with the GIL released.  The device side (:class:`SlotServer`)
serves every slot from one thread: after each request it polls its slots
for an adaptive window (KVM halt-polling style: a futex wake-up costs tens
of microseconds on a nested host, polling costs CPU), then sleeps on the
doorbell, which is its default state when idle.  Its counters
(:class:`ServeStats`) say what the polling cost.

Spinning only helps while the two sides run on different CPUs: each side
publishes its CPU, the VMM stops spinning and the device stops polling
when they share one (then a futex hand-off on one CPU is the fast path).
With ``move`` the device's serving thread instead moves itself off its
caller's CPU once in a while; on the nested development host that gave
either the best or the worst figures depending on where the scheduler put
things, so it is off by default (see ``python -m devserver.bench``).

The C core (``_slots.c``) holds the layout and the memory-ordering rules.
Everything the VMM reads back from a slot is treated as untrusted there:
the answer's sequence number must be the request's, the value is masked to
the access size, an unknown status is an error.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import struct
import threading
import time
from typing import NamedTuple

from ipc._slots_c import ffi, lib
from ipc.errors import IpcError

__all__ = [
    "SlotError",
    "SlotLayoutError",
    "SlotTimeout",
    "SlotPeerDead",
    "SlotBadResponse",
    "SlotDeviceError",
    "SlotsStopped",
    "SlotRequest",
    "ServeStats",
    "CallStats",
    "SlotCaller",
    "SlotServer",
    "STATUS_OK",
    "STATUS_ERROR",
    "MAX_SLOTS",
    "DEFAULT_POLL_NS",
    "DEFAULT_SPIN_NS",
]

STATUS_OK = lib.SVS_STATUS_OK
STATUS_ERROR = lib.SVS_STATUS_ERROR
MAX_SLOTS = lib.SVS_MAX_SLOTS
#: Device side: longest poll after a request before sleeping (ns); KVM's
#: halt_poll_ns is 200 us on this machine.
DEFAULT_POLL_NS = 200_000
#: VMM side: how long a caller spins on the answer before a futex wait.
DEFAULT_SPIN_NS = 100_000
#: VMM side: longest single futex wait; the "device dead" flag is looked at
#: between slices (svs_mark_dead also wakes the waiters at once).
DEFAULT_SLICE_NS = 5_000_000

log = logging.getLogger(__name__)

_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
# struct svs_request, read in this order (checked field by field).
_REQUEST_FIELDS = ("slot", "seq", "space", "size", "is_write", "reserved", "cookie", "offset", "value", "aseq")
_REQUEST = struct.Struct("=6I4Q")
_unpack_request = _REQUEST.unpack_from
assert _REQUEST.size == ffi.sizeof("struct svs_request")
assert all(ffi.offsetof("struct svs_request", f) == o
           for f, o in zip(_REQUEST_FIELDS, (0, 4, 8, 12, 16, 20, 24, 32, 40, 48), strict=True))


class SlotError(IpcError):
    """Base of the errors of the access slots."""


class SlotLayoutError(SlotError):
    """The descriptor does not hold a slot segment this code understands."""


class SlotTimeout(SlotError):
    """The device did not answer before the deadline."""


class SlotPeerDead(SlotError):
    """The device was declared dead (:meth:`SlotCaller.mark_dead`)."""


class SlotBadResponse(SlotError):
    """The device wrote an answer this code does not accept."""


class SlotDeviceError(SlotError):
    """The device answered that its model failed to serve the access."""


class SlotsStopped(SlotError):
    """:meth:`SlotServer.stop` was called."""


class SlotRequest(NamedTuple):
    """One access as the device receives it (copied out of the segment)."""

    slot: int
    seq: int
    space: int
    size: int
    is_write: int
    reserved: int
    cookie: int
    offset: int
    value: int
    #: The access sequence number the VMM gave this access (0: none).
    aseq: int = 0


@dataclasses.dataclass(frozen=True)
class ServeStats:
    """The device's serve-loop counters, as published in the segment.

    Read by the VMM they are whatever the device wrote: informational only.
    """

    served: int
    polled_hits: int
    sleeps: int
    wakeups: int
    poll_ns: int
    poll_wasted_ns: int
    sleep_ns: int
    window_ns: int
    #: Polls cut short because the caller ran on the device's CPU.
    poll_yields: int
    #: Times the serving thread moved itself off its caller's CPU.
    moves: int


@dataclasses.dataclass(frozen=True)
class CallStats:
    """What the VMM side counted (trusted)."""

    calls: int
    spin_hits: int
    sleeps: int
    spin_ns: int
    timeouts: int
    #: Spins cut short because the device ran on the caller's CPU.
    yields: int


def _check_system(rc: int, what: str) -> None:
    if rc == lib.SVS_OK:
        return
    if rc == lib.SVS_ELAYOUT:
        raise SlotLayoutError(
            f"{what}: not a splitvmm slot segment of version {lib.SVS_VERSION} "
            "(bad magic, version, sizes or length)")
    if rc == lib.SVS_ESYS:
        err = lib.svs_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    if rc == lib.SVS_EINVAL:
        raise ValueError(f"{what}: invalid argument")
    raise SlotError(f"{what}: code {rc}")


class _Segment:
    """A mapped slot segment; the handle is private to this process."""

    def __init__(self, handle, fd: int | None):
        self._h = handle
        self.nslots = lib.svs_nslots(handle)
        #: The memfd this object owns (the creator's), else None.
        self.fd = fd

    @staticmethod
    def _open(fd: int, create: bool, nslots: int):
        out = ffi.new("struct svs **")
        _check_system(lib.svs_open(fd, 1 if create else 0, nslots, out), "mapping the slot segment")
        return out[0]

    def device_stats(self) -> ServeStats:
        """The serve-loop counters the device last published."""
        out = ffi.new("struct svs_stats *")
        lib.svs_device_stats(self._handle(), out)
        return ServeStats(out.served, out.polled_hits, out.sleeps, out.wakeups,
                          out.poll_ns, out.poll_wasted_ns, out.sleep_ns, out.window_ns,
                          out.poll_yields, out.moves)

    def _handle(self):
        if self._h is None:
            raise SlotError("slot segment is closed")
        return self._h

    @property
    def closed(self) -> bool:
        return self._h is None

    def close(self) -> None:
        """Unmap the segment and close the descriptor this object owns."""
        if self._h is not None:
            lib.svs_close(self._h)
            self._h = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


#: ``svs_call`` itself, for a caller in C (vmm/_vcpu.c).
C_CALL = int(ffi.cast("uintptr_t", ffi.addressof(lib, "svs_call")))


class SlotCaller(_Segment):
    """The VMM's side of one device's slots: ``call`` from vCPU threads.

    ``SlotCaller.create(nslots)`` makes a sealed memfd segment; hand
    :attr:`fd` to the device.  Calls on one slot are serialised; calls on
    different slots run in parallel (the wait releases the GIL).
    """

    def __init__(self, handle, fd: int | None, spin_ns: int = DEFAULT_SPIN_NS,
                 slice_ns: int = DEFAULT_SLICE_NS):
        super().__init__(handle, fd)
        self.spin_ns = spin_ns
        self.slice_ns = slice_ns
        self._locks = [threading.Lock() for _ in range(self.nslots)]
        self._outs = [ffi.new("uint64_t *") for _ in range(self.nslots)]

    @classmethod
    def create(cls, nslots: int, **kw) -> SlotCaller:
        """A new segment of ``nslots`` slots in a sealed memfd."""
        size = lib.svs_size(nslots) if isinstance(nslots, int) and 0 < nslots <= MAX_SLOTS else 0
        if size == 0:
            raise ValueError(f"nslots must be in [1, {MAX_SLOTS}], not {nslots!r}")
        fd = os.memfd_create("splitvmm-slots", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            # The device gets this fd: it must not be able to shrink the
            # object under our mapping (SIGBUS in the VMM) or grow it.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            handle = cls._open(fd, True, nslots)
        except BaseException:
            os.close(fd)
            raise
        return cls(handle, fd, **kw)

    def call(self, slot: int, space: int, cookie: int, offset: int, size: int,
             is_write: bool, value: int, timeout: float, aseq: int = 0) -> int:
        """Forward one access through ``slot`` and wait at most ``timeout``
        seconds; returns the value read (0 for a write).  ``aseq`` is the
        access sequence number (:mod:`ipc.accessseq`): the device must echo
        it in its answer.

        Raises :class:`SlotTimeout`, :class:`SlotPeerDead`,
        :class:`SlotDeviceError`, :class:`SlotBadResponse`, ValueError.
        """
        if not 0 <= slot < self.nslots:
            raise ValueError(f"slot {slot} out of range [0, {self.nslots})")
        out = self._outs[slot]
        with self._locks[slot]:
            h = self._h             # read under the lock: close() takes them all
            if h is None:
                raise SlotError("slot segment is closed")
            try:
                rc = lib.svs_call(h, slot, space, cookie, offset, size, 1 if is_write else 0,
                                  value, aseq, self.spin_ns, self.slice_ns, int(timeout * 1e9), out)
            except (OverflowError, TypeError) as e:
                raise ValueError(f"bad access: {e}") from None
            if rc == 0:
                return out[0]
        raise self.error(rc, slot, timeout, size)

    @staticmethod
    def error(rc: int, slot: int, timeout: float, size: int = 0) -> Exception:
        """The exception for ``svs_call``'s code ``rc`` on ``slot`` (also
        for a call made in C by the vCPU loop, vmm/_vcpu.c)."""
        if rc == lib.SVS_ETIMEDOUT:
            return SlotTimeout(f"no answer within {timeout:g} s on slot {slot}")
        if rc == lib.SVS_EDEAD:
            return SlotPeerDead("the device was declared dead")
        if rc == lib.SVS_EDEVICE:
            return SlotDeviceError(f"the device failed to serve the access on slot {slot}")
        if rc == lib.SVS_EBADRESP:
            return SlotBadResponse(f"the device answered with an unknown status on slot {slot}")
        if rc == lib.SVS_EINVAL:
            return ValueError(f"bad access: size {size} (must be 1, 2, 4 or 8)")
        return SlotError(f"slot call failed (code {rc})")

    def c_handle(self) -> int:
        """The address of the C handle (``struct svs *``), 0 once closed:
        for a caller in C (vmm/_vcpu.c), which must stop using it before
        :meth:`close`."""
        h = self._h
        return 0 if h is None else int(ffi.cast("uintptr_t", h))

    def answer(self, slot: int, aseq: int) -> int | None:
        """After the device died: the answer to access ``aseq`` on
        ``slot`` if the device wrote it before dying (checked like a
        :meth:`call`'s: its access number, status and size), else None
        (also when ``aseq`` never went out on ``slot``).
        Raises :class:`SlotDeviceError`, :class:`SlotBadResponse`."""
        if not 0 <= slot < self.nslots:
            raise ValueError(f"slot {slot} out of range [0, {self.nslots})")
        out = self._outs[slot]
        with self._locks[slot]:
            h = self._h
            if h is None:
                raise SlotError("slot segment is closed")
            rc = lib.svs_answer(h, slot, aseq, out)
            if rc == 0:
                return out[0]
        if rc in (lib.SVS_ETIMEDOUT, lib.SVS_EINVAL):
            return None
        if rc == lib.SVS_EDEVICE:
            raise SlotDeviceError(f"the device failed to serve the access on slot {slot}")
        raise SlotBadResponse(f"the device left a bad answer on slot {slot}")

    def close(self, timeout: float = 5.0) -> None:
        """Mark the device dead (waiting callers return), wait for calls in
        flight to leave the C code, then unmap.  If one does not leave in
        ``timeout`` seconds the mapping is left in place (leaked) rather than
        pulled from under it."""
        if self._h is None:
            super().close()
            return
        lib.svs_mark_dead(self._h)
        deadline = time.monotonic() + timeout
        taken = []
        try:
            for lock in self._locks:
                if not lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                    log.error("slot segment: a call did not return; leaving the mapping in place")
                    self._h = None
                    if self.fd is not None:
                        os.close(self.fd)
                        self.fd = None
                    return
                taken.append(lock)
            super().close()
        finally:
            for lock in taken:
                lock.release()

    def mark_dead(self) -> None:
        """Declare the device dead: waiting and future calls raise
        :class:`SlotPeerDead`.  Safe from any thread."""
        if self._h is not None:
            lib.svs_mark_dead(self._h)

    def stats(self) -> CallStats:
        out = ffi.new("struct svs_client_stats *")
        lib.svs_client_stats(self._handle(), out)
        return CallStats(out.calls, out.spin_hits, out.sleeps, out.spin_ns, out.timeouts,
                         out.yields)


def _no_request(rc: int) -> None:
    """A server wait that brought no request (``rc`` its code): returns
    after its timeout, else raises the error the code names."""
    if rc == lib.SVS_ETIMEDOUT:
        return
    if rc == lib.SVS_ESTOPPED:
        raise SlotsStopped("slot server stopped")
    raise SlotError(f"slot wait failed (code {rc})")


class SlotServer(_Segment):
    """The device's side: one thread takes requests with :meth:`next` and
    answers them with :meth:`complete`.

    ``poll_ns`` is the longest poll after a request before sleeping (0:
    sleep at once); with ``adaptive`` the window grows when sleeps turn out
    short and shrinks when they are long, as KVM's halt-polling does.
    """

    def __init__(self, handle, fd: int | None, poll_ns: int = DEFAULT_POLL_NS,
                 adaptive: bool = True, move: bool = False):
        super().__init__(handle, fd)
        self._req = ffi.new("struct svs_request *")
        self._buf = ffi.buffer(self._req)
        self._complete_next_c = lib.svs_complete_next
        self.set_polling(poll_ns, adaptive, move)

    @classmethod
    def from_fd(cls, fd: int, **kw) -> SlotServer:
        """Map the segment open on ``fd`` (the caller keeps ``fd``)."""
        return cls(cls._open(fd, False, 0), None, **kw)

    def set_polling(self, poll_ns: int, adaptive: bool = True, move: bool = False) -> None:
        """Poll at most ``poll_ns`` after a request (0: never); ``adaptive``
        grows and shrinks the window; ``move`` lets the serving thread move
        itself off the CPU of the vCPU it serves (polling there would only
        keep that vCPU from running)."""
        if not isinstance(poll_ns, int) or poll_ns < 0:
            raise ValueError(f"poll window must be an integer >= 0 ns, not {poll_ns!r}")
        self.poll_ns = poll_ns
        self.adaptive = adaptive
        self.move = move
        lib.svs_set_polling(self._handle(), poll_ns, 1 if adaptive else 0, 1 if move else 0)

    def next(self, timeout: float) -> SlotRequest | None:
        """The next request, or None after ``timeout`` seconds of sleep with
        nothing to do.  Raises :class:`SlotsStopped` after :meth:`stop`."""
        rc = lib.svs_next(self._handle(), int(timeout * 1e9), self._req)
        if rc == 0:
            return SlotRequest._make(_unpack_request(self._buf))
        _no_request(rc)
        return None

    def complete(self, req: SlotRequest, value: int, status: int = STATUS_OK) -> None:
        """Answer ``req``: ``value`` (ignored by the VMM for a write)."""
        lib.svs_complete(self._handle(), req.slot, req.seq, req.aseq, value & 0xFFFFFFFFFFFFFFFF, status)

    def complete_next(self, req: SlotRequest, value: int, status: int, timeout: float) -> SlotRequest | None:
        """:meth:`complete` then :meth:`next` in one call into C (the
        serving loop's hot path: one crossing per access, not two)."""
        got = self.answer_next_raw(req.slot, req.seq, req.aseq, value, status, int(timeout * 1e9))
        return None if got is None else SlotRequest._make(got)

    def answer_next_raw(self, slot: int, seq: int, aseq: int, value: int, status: int,
                        timeout_ns: int) -> tuple[int, ...] | None:
        """:meth:`complete_next` for a serving loop that keeps the request's
        fields in locals: answers the request (``slot``, ``seq``, ``aseq``)
        and returns the next one as a plain tuple in the order of
        :class:`SlotRequest`'s fields, or None after ``timeout_ns`` of sleep
        (no request object made, no method call besides this one)."""
        h = self._h
        if h is None:
            raise SlotError("slot segment is closed")
        rc = self._complete_next_c(h, slot, seq, aseq, value & 0xFFFFFFFFFFFFFFFF, status, timeout_ns, self._req)
        if rc == 0:
            return _unpack_request(self._buf)
        _no_request(rc)
        return None

    def stop(self) -> None:
        """Make :meth:`next` raise :class:`SlotsStopped`; from any thread."""
        if self._h is not None:
            lib.svs_stop(self._h)
