"""virtio-rng (virtio 1.2 §5.4): one request queue; each device-writable
buffer is filled from ``os.getrandom``.

``--device virtio-rng[,slot=N]``.  No feature bits, no configuration.  At
most :data:`MAX_BYTES_PER_REQUEST` bytes are written per request (the
device may write less than offered, §5.4.6.1); device-readable buffers
are ignored.
"""

from __future__ import annotations

import os

from devices.faults.engine import Firing
from devices.faults.table import POINTS
from devices.guestmem import GuestRam
from devices.virtio.pci import VirtioPciDevice
from devices.virtio.virtqueue import Chain, Virtqueue

VIRTIO_ID_RNG = 4
QUEUE_SIZE = 64
MAX_BYTES_PER_REQUEST = 64 << 10


class VirtioRng(VirtioPciDevice):
    kind = "virtio-rng"
    virtio_id = VIRTIO_ID_RNG
    class_code = 0xFF0000         # QEMU: PCI_CLASS_OTHERS
    queue_sizes = (QUEUE_SIZE,)
    fault_points = {**VirtioPciDevice.fault_points, "rng.request": POINTS["rng.request"]}
    #: The bytes of the last request, kept only while rng.request is armed
    #: (for the ``repeat`` action).
    _last = b""

    def handle(self, queue: Virtqueue, chain: Chain, mem: GuestRam) -> int:
        firing = None
        if "rng.request" in self.fault_engine.armed:
            firing = self.fault_engine.point("rng.request")
        left = MAX_BYTES_PER_REQUEST
        if firing is not None and firing.action == "short":
            left = min(left, firing.params["bytes"])
        written = 0
        given = []
        for buf in chain.writable:
            n = min(buf.length, left)
            if n <= 0:
                break
            data = self._bytes(firing, n, written)
            with mem.view(buf.addr, n) as window:
                window[:] = data
            given.append(data)
            written += n
            left -= n
        if "rng.request" in self.fault_engine.armed:
            self._last = b"".join(given)
        if firing is not None:
            firing.done(f"{firing.action}: {written} byte(s) given")
        return written

    def _bytes(self, firing: Firing | None, n: int, at: int) -> bytes:
        if firing is None or firing.action == "short":
            return os.getrandom(n)
        if firing.action == "zeros":
            return bytes(n)
        # repeat: the previous request's bytes (zeros past their end)
        return self._last[at:at + n].ljust(n, b"\0")
