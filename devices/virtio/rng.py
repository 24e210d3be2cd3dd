"""virtio-rng (virtio 1.2 §5.4): one request queue; each device-writable
buffer is filled from ``os.getrandom``.

``--device virtio-rng[,slot=N]``.  No feature bits, no configuration.  At
most :data:`MAX_BYTES_PER_REQUEST` bytes are written per request (the
device may write less than offered, §5.4.6.1); device-readable buffers
are ignored.
"""

from __future__ import annotations

import os

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

    def handle(self, queue: Virtqueue, chain: Chain, mem: GuestRam) -> int:
        left = MAX_BYTES_PER_REQUEST
        written = 0
        for buf in chain.writable:
            n = min(buf.length, left)
            if n <= 0:
                break
            with mem.view(buf.addr, n) as window:
                window[:] = os.getrandom(n)
            written += n
            left -= n
        return written
