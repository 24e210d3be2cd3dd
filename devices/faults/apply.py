"""Applying firings: the code both placements share.

The engine decides (:mod:`devices.faults.engine`); this module does what a
firing says at the points a host serves, the same way inline (the VMM's
:class:`vmm.local.LocalEndpoint`) and in a device process
(:class:`devserver.runtime.DeviceServer`):

- :func:`serve_access` -- one guest access through the ``process`` and
  ``access`` points, then the model (or not: a read answered by the fault,
  a write dropped);
- :class:`FaultyInterrupt` -- the ``irq`` point around an
  :class:`devices.base.Interrupt` the host hands a model (lose, duplicate,
  delay);
- :func:`fault_bytes` -- the byte-stream points (``serial.tx`` ...).

Callers test ``point in engine.armed`` first (the whole cost of a point
with nothing armed) and call in here only when it is.  This module, like
the package, imports nothing of :mod:`vmm`, :mod:`ipc` or
:mod:`devserver`: what the ``process`` actions need of the host (taking
the registry lock) comes in as :class:`ProcessHooks`.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Protocol

from devices.faults.engine import FaultEngine, Firing
from devices.record import record

log = logging.getLogger(__name__)

#: How long after the first edge ``duplicate`` sends the second, so the
#: guest's LAPIC sees two interrupts rather than one edge merged into an
#: interrupt already pending (an MSI is an edge; IRR holds one).
DUPLICATE_GAP = 0.010
_SPACE_NAMES = ("pio", "mmio", "pci")
_NO_MATCH: dict[str, Any] = {}
_BYTES = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF, 8: 0xFFFF_FFFF_FFFF_FFFF}


class AccessModel(Protocol):
    def read(self, space: Any, cookie: int, offset: int, size: int) -> int: ...

    def write(self, space: Any, cookie: int, offset: int, size: int, value: int) -> None: ...


@record
class ProcessHooks:
    """What the ``process`` actions need of a device process's host.

    ``take_lock(hold)`` takes the registry lock on the calling thread; it
    returns only when taken (``hold`` true: keep it until the process
    ends).  None: the device runs inline, where ``process`` faults are
    refused before they are armed."""

    take_lock: Callable[[], None]


def serve_access(model: AccessModel, engine: FaultEngine, spaces: Any, space: int, cookie: int, offset: int,
                 size: int, is_write: int, value: int, process: ProcessHooks | None = None) -> int:
    """Serve one access with the ``process`` and ``access`` points applied;
    the value read (0 for a write).  ``spaces`` maps the space number to
    what the model takes (:class:`devices.base.Space`)."""
    armed = engine.armed
    if "process" in armed:
        firing = armed["process"](_NO_MATCH)
        if firing is not None:
            apply_process(firing, process)
    if "access" in armed:
        firing = armed["access"]({"space": space, "offset": offset, "dir": "write" if is_write else "read"})
        if firing is not None:
            return _apply_access(firing, model, spaces, space, cookie, offset, size, is_write, value)
    if is_write:
        model.write(spaces[space], cookie, offset, size, value)
        return 0
    return model.read(spaces[space], cookie, offset, size)


def _apply_access(firing: Firing, model: AccessModel, spaces: Any, space: int, cookie: int, offset: int,
                  size: int, is_write: int, value: int) -> int:
    action, params = firing.action, firing.params
    where = f"{_SPACE_NAMES[space] if space < 3 else space} {'write' if is_write else 'read'} at {offset:#x}"
    mask = _BYTES.get(size, (1 << (8 * size)) - 1)
    if action == "ones" and not is_write:
        firing.done(f"{where} answered {mask:#x}")
        return mask
    if action == "value" and not is_write:
        v = params["value"] & mask
        firing.done(f"{where} answered {v:#x}")
        return v
    if action == "garbage" and not is_write:
        v = firing.random().getrandbits(8 * size)
        firing.done(f"{where} answered garbage {v:#x}")
        return v
    if action == "drop" and is_write:
        firing.done(f"{where} of {value:#x} dropped")
        return 0
    if action == "delay":
        ms = params["ms"]
        if ms:
            time.sleep(ms / 1000)
        firing.done(f"{where} served {ms:g} ms late")
    if is_write:
        model.write(spaces[space], cookie, offset, size, value)
        result = 0
    else:
        result = model.read(spaces[space], cookie, offset, size)
    if action == "irq":
        vector = params["vector"]
        raise_ = getattr(model, "raise_interrupt", None)
        if callable(raise_):
            raise_(vector)
            firing.done(f"{where} served; spurious interrupt {vector} raised")
        else:
            firing.done(f"{where} served; the model has no raise_interrupt, nothing raised")
    firing.done(f"{where} served")      # an action that does not apply here (done() is once)
    return result


def apply_process(firing: Firing, hooks: ProcessHooks | None) -> None:
    """Do a ``process`` firing; crash, exit, hang and die_holding_lock do
    not return.  The record is sent first (:meth:`Firing.done`: the sink
    writes before this goes on), so the VMM has it when the process dies."""
    action = firing.action
    if hooks is None:
        firing.done("not applied: the device runs inside the VMM")
        return
    pid = os.getpid()
    if action == "crash":
        firing.done(f"pid {pid} SIGKILLs itself")
        _die()
    elif action == "exit":
        firing.done(f"pid {pid} exits with status 1")
        logging.shutdown()
        os._exit(1)
    elif action == "hang":
        firing.done(f"pid {pid} stops answering")
        threading.Event().wait()
    elif action == "die_holding_lock":
        hooks.take_lock()
        firing.done(f"pid {pid} took the registry lock and SIGKILLs itself")
        _die()
    elif action == "hold_lock":
        # On the thread serving the access -- a device process's main
        # thread -- which then serves on, holding it: the VMM must tell
        # main threads of different sandboxed devices apart to kill this one.
        try:
            hooks.take_lock()
        except Exception as e:
            firing.done(f"pid {pid} could not take the registry lock: {e}")
            return
        firing.done(f"pid {pid} took the registry lock on thread {threading.get_native_id()} and keeps it")
    else:
        firing.done("not applied")


def _die() -> None:
    """End this process at once, with no clean-up: SIGKILL itself.  Should
    it be pid 1 of a pid namespace (the sandbox forks a device below its
    namespace's pid 1, so it is not), its own SIGKILL would be ignored
    (pid_namespaces(7)): it then ``_exit``s with status 137, as abrupt (no
    handler, no ``finally``; the kernel still marks a robust lock it holds
    owner-died)."""
    os.kill(os.getpid(), signal.SIGKILL)
    os._exit(128 + signal.SIGKILL)


class FaultyInterrupt:
    """An interrupt (:class:`devices.base.Interrupt`, or an MSI vector with
    ``program``/``unprogram``) behind the ``irq`` point.  ``holder`` is
    whatever carries the device's engine as ``fault_engine`` (the host);
    ``vector`` is the point's match value (the MSI-X entry, 0 for a line).

    While the engine has never counted ``irq``, :attr:`trigger` *is* the
    inner interrupt's own method (no extra call on the completion path);
    :func:`attach_engine` and the engine's arm/disarm switch it over
    (:func:`refresh_interrupts`)."""

    def __init__(self, inner: Any, holder: Any, vector: int):
        self._inner = inner
        self._holder = holder
        self._vector = vector
        self.trigger: Callable[[], None] = inner.trigger
        holder.__dict__.setdefault("_fault_interrupts", []).append(weakref.ref(self))
        self.refresh()

    def refresh(self) -> None:
        """Route :attr:`trigger` through the point iff it is counted."""
        armed = "irq" in self._holder.fault_engine.armed
        self.trigger = self._faulty_trigger if armed else self._inner.trigger

    def _faulty_trigger(self) -> None:
        engine: FaultEngine = self._holder.fault_engine
        firing = engine.point("irq", vector=self._vector)
        if firing is None:
            self._inner.trigger()
            return
        action = firing.action
        if action == "lose":
            firing.done(f"interrupt {self._vector} not delivered")
        elif action == "duplicate":
            self._inner.trigger()
            _later(DUPLICATE_GAP, self._inner.trigger)
            firing.done(f"interrupt {self._vector} delivered twice")
        elif action == "delay":
            ms = firing.params["ms"]
            _later(ms / 1000, self._inner.trigger)
            firing.done(f"interrupt {self._vector} delivered {ms:g} ms late")
        else:
            self._inner.trigger()
            firing.done(f"interrupt {self._vector} delivered")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def refresh_interrupts(holder: Any) -> None:
    """Re-route every :class:`FaultyInterrupt` handed out by ``holder``."""
    for ref in list(holder.__dict__.get("_fault_interrupts", ())):
        interrupt = ref()
        if interrupt is not None:
            interrupt.refresh()


def attach_engine(holder: Any, engine: FaultEngine) -> None:
    """Make ``engine`` the one of ``holder`` (a device host) and of the
    interrupts it handed out, now and whenever a fault is armed or
    disarmed on it."""
    holder.fault_engine = engine
    engine.on_change.append(lambda: refresh_interrupts(holder))
    refresh_interrupts(holder)


def _later(seconds: float, fn: Callable[[], None]) -> None:
    def run() -> None:
        try:
            fn()
        except Exception as e:      # the route went away meanwhile
            log.debug("delayed interrupt: %s", e)
    timer = threading.Timer(seconds, run)
    timer.daemon = True
    timer.start()


def fault_bytes(engine: FaultEngine, point: str, data: bytes) -> bytes:
    """``data`` with the byte point ``point`` applied to each byte (one
    event per byte): drop, duplicate, garbage.  Call only when ``point in
    engine.armed``."""
    out = bytearray()
    hit = engine.armed[point]
    for byte in data:
        firing = hit(_NO_MATCH)
        if firing is None:
            out.append(byte)
            continue
        if firing.action == "drop":
            firing.done(f"byte {byte:#04x} dropped")
        elif firing.action == "duplicate":
            out += bytes((byte, byte))
            firing.done(f"byte {byte:#04x} sent twice")
        elif firing.action == "garbage":
            g = firing.random().getrandbits(8)
            out.append(g)
            firing.done(f"byte {byte:#04x} replaced by {g:#04x}")
        else:
            out.append(byte)
            firing.done("not applied")
    return bytes(out)


def flip_bits(firing: Firing, data: bytearray, bits: int) -> list[int]:
    """Flip ``bits`` distinct bits of ``data`` (fewer if it is shorter),
    chosen by the firing's generator; the bit positions flipped."""
    total = len(data) * 8
    if total == 0:
        return []
    rng = firing.random()
    chosen = sorted(rng.sample(range(total), min(bits, total)))
    for bit in chosen:
        data[bit // 8] ^= 1 << (bit % 8)
    return chosen
