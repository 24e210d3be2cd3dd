"""Asynchronous events of a VM (``STOP``, ``RESUME``, ``SHUTDOWN``,
``DEVICE_FAILED``, ``FAULT_FIRED``), and the hub that hands them to whoever listens.

Events are emitted from any thread (a vCPU ending the run, the thread
that ran ``stop``); a listener must return at once and must not block --
the QMP server only queues the event and wakes its own thread.  The
timestamp is wall-clock time, as QEMU gives it (``g_get_real_time``).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from devices.record import record
from vmm.outcome import Ending, Outcome

log = logging.getLogger(__name__)

STOP = "STOP"
RESUME = "RESUME"
SHUTDOWN = "SHUTDOWN"
DEVICE_FAILED = "DEVICE_FAILED"
DEVICE_DELETED = "DEVICE_DELETED"
#: A device process ended and is being started again (issue 10 §3).
DEVICE_RESTARTING = "DEVICE_RESTARTING"
#: The new process serves the device (data: pid, restarts, pause_ms).
DEVICE_RESTARTED = "DEVICE_RESTARTED"
#: A fault fired (vmm.faults): device, fault, point, event, action, params, detail.
FAULT_FIRED = "FAULT_FIRED"


@record
class Event:
    """One event as QMP sends it: its name, its data and when it happened."""

    name: str
    data: dict[str, Any]
    #: Wall-clock time of the event, in microseconds since the epoch.
    time_us: int

    def as_json(self) -> dict[str, Any]:
        """The QMP form: ``{"event", "data", "timestamp": {"seconds", "microseconds"}}``."""
        out: dict[str, Any] = {"event": self.name}
        if self.data:
            out["data"] = self.data
        out["timestamp"] = {"seconds": self.time_us // 1_000_000, "microseconds": self.time_us % 1_000_000}
        return out


Listener = Callable[[Event], None]


class EventHub:
    """Listeners of one VM's events; safe to use from many threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def unsubscribe(self, listener: Listener) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def emit(self, name: str, data: dict[str, Any] | None = None) -> Event:
        event = Event(name, dict(data or {}), time.time_ns() // 1000)
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(event)
            except Exception:
                log.exception("event listener %r failed on %s", listener, name)
        return event


#: QEMU's ShutdownCause for each ending (qapi/run-state.json), where one fits.
_SHUTDOWN_REASONS = {
    Ending.POWER_OFF: ("guest-shutdown", True),
    Ending.TEST_EXIT: ("guest-shutdown", True),
    Ending.RESET: ("guest-reset", True),
    Ending.KVM_FAILURE: ("host-error", False),
    Ending.VMM_ERROR: ("host-error", False),
    Ending.TIMEOUT: ("host-timeout", False),
    Ending.INTERRUPTED: ("host-signal", False),
    Ending.QUIT: ("host-ui", False),
}


def shutdown_data(outcome: Outcome, qmp_quit: bool = False) -> dict[str, Any]:
    """The data of a SHUTDOWN event: QEMU's ``guest`` and ``reason``, plus
    splitvmm's ending, its detail and the exit status ``vmm run`` gives."""
    reason, guest = _SHUTDOWN_REASONS.get(outcome.ending, ("host-error", False))
    if qmp_quit:
        reason = "host-qmp-quit"
    return {"guest": guest, "reason": reason, "ending": outcome.ending.value, "detail": outcome.detail,
            "status": outcome.status}
