"""TEST-ONLY device kinds: devices that misbehave on request.

Not for anything but tests.  These kinds exist only in a device process
whose environment has ``SPLITVMM_TEST_KINDS=1`` (see
:mod:`devserver.kinds`); the VMM's ``--device`` parser does not know them
(a test names one in a :class:`vmm.config.DeviceSpec` of its own).  They
reach into the device-process runtime (its control socket, its registry
mapping) through ``bind_test_server``, which no real device model has.

``fault-echo``: the ``echo`` device (:mod:`devices.echo`, same parameters
and registers) plus a fault register at offset 0xFC of either window:

======================  ===================================================
access at 0xFC           what the device does
======================  ===================================================
write 4 bytes, value 1   sends bytes that are not a frame on its control
                         socket (:data:`FAULT_GARBAGE_FRAMING`)
write 2                  sends a frame whose body is not msgpack
write 3                  sends a well-formed message of an unknown type
write 4                  a thread of the device takes the registry lock
                         and keeps it; the write is answered once it holds
                         it (:data:`FAULT_HOG`)
write 5                  the same, ``hog_delay_ms`` after the write was
                         answered (:data:`FAULT_HOG_LATER`)
read 4 bytes             answers only after ``stall_ms`` milliseconds (a
                         device hanging in its handler), then reads the
                         access count
======================  ===================================================

Other values and sizes at 0xFC are ignored (writes) or read all ones.
Extra parameters: ``stall_ms=`` (1 to 600000, default 30000) and
``hog_delay_ms=`` (0 to 60000, default 50).  Every fault is logged at
WARNING as a test hook.
"""

from __future__ import annotations

import logging
import struct
import threading
import time

from devices.base import BadParameter, DeviceHost, Space, parse_int
from devices.echo import ECHO_COUNT, Echo, ones

log = logging.getLogger(__name__)

FAULT_REG = 0xFC
FAULT_GARBAGE_FRAMING = 1
FAULT_GARBAGE_MSGPACK = 2
FAULT_GARBAGE_UNKNOWN = 3
FAULT_HOG = 4
FAULT_HOG_LATER = 5


def _frame(body: bytes) -> bytes:
    return struct.pack("<I", len(body)) + body


#: What each garbage fault sends (one packet each).
GARBAGE = {
    FAULT_GARBAGE_FRAMING: b"\xff\xff\xff\x7fthis is not a frame",
    FAULT_GARBAGE_MSGPACK: _frame(b"\xc1\xc1\xc1"),
    FAULT_GARBAGE_UNKNOWN: _frame(b"\x81\xa4type\xa9no-such-m"),
}


class FaultEcho(Echo):
    """``echo`` with a test-only fault register (module docstring)."""

    kind = "fault-echo"

    def __init__(self, host: DeviceHost, **params: str):
        self.stall_ms = self._bounded(params.pop("stall_ms", "30000"), "stall_ms", 1, 600_000)
        self.hog_delay_ms = self._bounded(params.pop("hog_delay_ms", "50"), "hog_delay_ms", 0, 60_000)
        super().__init__(host, **params)
        self._server = None
        self._hog: threading.Thread | None = None

    def _bounded(self, text: str, key: str, low: int, high: int) -> int:
        value = parse_int(self.kind, key, text)
        if not low <= value <= high:
            raise BadParameter(f"{self.kind}: {key}={value} (expected {low} to {high})")
        return value

    def bind_test_server(self, server) -> None:
        """Called by the device-process runtime (devserver.runtime) with
        itself: the control socket and the registry mapping to abuse."""
        self._server = server

    def read(self, space: Space, cookie: int, offset: int, size: int) -> int:
        if offset != FAULT_REG:
            return super().read(space, cookie, offset, size)
        if size != 4:
            return ones(size)
        log.warning("test hook: stalling this read for %d ms", self.stall_ms)
        time.sleep(self.stall_ms / 1000)
        return super().read(space, cookie, ECHO_COUNT, 4)

    def write(self, space: Space, cookie: int, offset: int, size: int, value: int) -> None:
        if offset != FAULT_REG:
            return super().write(space, cookie, offset, size, value)
        if size != 4 or self._server is None:
            return None
        if value in GARBAGE:
            server = self._server
            log.warning("test hook: sending garbage (fault %d) on the control socket", value)
            with server._send_lock:
                server.channel.sock.send(GARBAGE[value])
        elif value in (FAULT_HOG, FAULT_HOG_LATER) and self._hog is None:
            self._start_hog(0.0 if value == FAULT_HOG else self.hog_delay_ms / 1000)
        return None

    def _start_hog(self, delay: float) -> None:
        from ipc._registry_c import lib

        registry = self._server.registry
        holding = threading.Event()

        def hog() -> None:
            if delay:
                time.sleep(delay)
            rc = lib.svm_reg_lock_for_test(registry._h, 10_000_000_000)
            log.warning("test hook: thread %d took the registry lock (code %d) and keeps it",
                        threading.get_native_id(), rc)
            holding.set()
            threading.Event().wait()      # until the process is killed

        self._hog = threading.Thread(target=hog, name="lock-hog", daemon=True)
        self._hog.start()
        if not delay:
            holding.wait(15)


#: kind -> class, added to devserver.kinds.KINDS under SPLITVMM_TEST_KINDS=1.
TEST_KINDS = {FaultEcho.kind: FaultEcho}
