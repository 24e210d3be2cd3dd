"""Where a virtio-blk request's time goes in the device, in-process:
``python -m vmm.bench.virtio_blk_path [--requests N] [--profile]`` prints JSON.

The device model (:class:`devices.virtio.blk.VirtioBlk`, the same code a
device process runs) serves 4 KiB random reads and 1 MiB reads from a
page-cached image into guest RAM (a shared memfd mapping, as a device
process has), with the in-flight record of the state segment hooked to
its queue (``devserver.persist.QueueRecord`` over an
``ipc.inflight.InflightQueue``, as by default).  A driver written in
Python here puts ``qd`` requests on the avail ring, then one doorbell
(``process_queue``, what the doorbell thread calls) serves them all;
the driver's own work is outside the timing.  Figures, per request:

* ``serve_ns``: the whole of ``process_queue`` divided by the requests;
* ``syscall_ns``: one ``preadv`` of the same size into the same memory
  (what the kernel costs; the rest is Python);
* ``eventfd_ns``: one ``eventfd_read`` + ``poll`` of a doorbell that rang
  (the doorbell thread's cost per wake-up, shared by a batch);
* with ``--profile``: the functions where ``process_queue`` spends its
  time (cProfile, ``tottime`` shares), QD1 and QD32.

No VM, no IPC: this is the device's own floor, the part a faster device
model (or a C core) could change.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import mmap
import os
import pstats
import random
import select
import struct
import sys
import tempfile
import time

from devices.base import DeviceHost, Space
from devices.guestmem import GuestRam, RamRange
from devices.virtio import pci as vp
from devices.virtio import spec as vs
from devices.virtio.blk import VirtioBlk
from devices.virtio.virtqueue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from devserver.persist import QueueRecord
from ipc.inflight import InflightQueue, region_size

RAM = 64 << 20
QSIZE = 128
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000
HDRS, STATUS, DATA = 0x10000, 0x18000, 0x100000
IMAGE_MIB = 64


class _Host(DeviceHost):
    def __init__(self, ram: GuestRam):
        self.ram = ram

    def claim(self, space, start, length, cookie=0, **kw):
        pass

    def release(self, space, start):
        pass

    def process_id(self) -> int:
        return os.getpid()

    def guest_memory(self) -> GuestRam:
        return self.ram


def _w(dev: VirtioBlk, off: int, size: int, value: int) -> None:
    dev.write(Space.MMIO, vp.BAR_VIRTIO, vp.COMMON_OFFSET + off, size, value)


class Driver:
    """A minimal driver of one queue, in Python (outside the timing)."""

    def __init__(self, dev: VirtioBlk, ram: GuestRam):
        self.dev, self.ram = dev, ram
        self.avail_idx = 0
        _w(dev, vs.VIRTIO_PCI_COMMON_STATUS, 1, 0)
        _w(dev, vs.VIRTIO_PCI_COMMON_STATUS, 1, vs.VIRTIO_CONFIG_S_ACKNOWLEDGE | vs.VIRTIO_CONFIG_S_DRIVER)
        _w(dev, vs.VIRTIO_PCI_COMMON_GFSELECT, 4, 1)
        _w(dev, vs.VIRTIO_PCI_COMMON_GF, 4, 1)
        _w(dev, vs.VIRTIO_PCI_COMMON_STATUS, 1, 0xB)
        _w(dev, vs.VIRTIO_PCI_COMMON_Q_SELECT, 2, 0)
        _w(dev, vs.VIRTIO_PCI_COMMON_Q_SIZE, 2, QSIZE)
        for lo, hi, addr in ((vs.VIRTIO_PCI_COMMON_Q_DESCLO, vs.VIRTIO_PCI_COMMON_Q_DESCHI, DESC),
                             (vs.VIRTIO_PCI_COMMON_Q_AVAILLO, vs.VIRTIO_PCI_COMMON_Q_AVAILHI, AVAIL),
                             (vs.VIRTIO_PCI_COMMON_Q_USEDLO, vs.VIRTIO_PCI_COMMON_Q_USEDHI, USED)):
            _w(dev, lo, 4, addr)
            _w(dev, hi, 4, 0)
        _w(dev, vs.VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1)
        _w(dev, vs.VIRTIO_PCI_COMMON_STATUS, 1, 0xF)
        # no interrupts wanted: the driver polls (as the benchmark guest)
        ram.write(AVAIL, struct.pack("<H", 1))

    def offer(self, sectors: list[int], nbytes: int) -> None:
        """Requests (slot k: descriptors 3k .. 3k+2) on the avail ring."""
        ram = self.ram
        for k, sector in enumerate(sectors):
            d = 3 * k
            ram.write(HDRS + 16 * k, struct.pack("<IIQ", 0, 0, sector))
            data = DATA + k * nbytes
            for i, (a, n, f) in enumerate(((HDRS + 16 * k, 16, VIRTQ_DESC_F_NEXT),
                                           (data, nbytes, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT),
                                           (STATUS + k, 1, VIRTQ_DESC_F_WRITE))):
                ram.write(DESC + 16 * (d + i), struct.pack("<QIHH", a, n, f, d + i + 1))
            ram.write(AVAIL + 4 + 2 * (self.avail_idx % QSIZE), struct.pack("<H", d))
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        ram.write(AVAIL + 2, struct.pack("<H", self.avail_idx))


def setup(image: str) -> tuple[VirtioBlk, GuestRam, Driver, mmap.mmap, InflightQueue]:
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, RAM)
    m = mmap.mmap(fd, RAM)
    os.close(fd)
    ram = GuestRam(m, [RamRange(0, RAM, 0)])
    dev = VirtioBlk(_Host(ram), slot="4", path=image)
    dev.start()
    region = mmap.mmap(-1, region_size(QSIZE))
    rec = InflightQueue(memoryview(region), QSIZE)
    dev.queues[0].inflight = QueueRecord(rec)
    drv = Driver(dev, ram)
    return dev, ram, drv, region, rec


def serve_ns(dev: VirtioBlk, drv: Driver, qd: int, nbytes: int, requests: int, rnd: random.Random,
             profile: cProfile.Profile | None = None) -> float:
    q = dev.queues[0]
    blocks = (IMAGE_MIB << 20) // nbytes
    spent = 0
    done = 0
    while done < requests:
        drv.offer([rnd.randrange(blocks) * (nbytes // 512) for _ in range(qd)], nbytes)
        if profile is not None:
            profile.enable()
        t0 = time.perf_counter_ns()
        with dev._lock:
            dev.process_queue(q)
        spent += time.perf_counter_ns() - t0
        if profile is not None:
            profile.disable()
        done += qd
    assert q.used_idx == drv.avail_idx, "the device served every request"
    return spent / done


def syscall_ns(fd: int, ram: GuestRam, nbytes: int, requests: int, rnd: random.Random) -> float:
    blocks = (IMAGE_MIB << 20) // nbytes
    with ram.view(DATA, nbytes) as window:
        t0 = time.perf_counter_ns()
        for _ in range(requests):
            os.preadv(fd, [window], rnd.randrange(blocks) * nbytes)
        return (time.perf_counter_ns() - t0) / requests


def eventfd_ns(loops: int) -> float:
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    p = select.poll()
    p.register(efd, select.POLLIN)
    t0 = time.perf_counter_ns()
    for _ in range(loops):
        os.eventfd_write(efd, 1)
        p.poll(1000)
        os.eventfd_read(efd)
    ns = (time.perf_counter_ns() - t0) / loops
    os.close(efd)
    return ns


def top(profile: cProfile.Profile, n: int = 12) -> list[dict]:
    st = pstats.Stats(profile)
    total = sum(v[2] for v in st.stats.values())  # type: ignore[attr-defined]
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:n]  # type: ignore[attr-defined]
    return [{"function": f"{os.path.basename(k[0])}:{k[1]}({k[2]})", "calls": v[1],
             "tottime_share": round(v[2] / total, 3)} for k, v in rows]


def best(fn, repeat: int) -> float:
    return round(min(fn() for _ in range(repeat)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vmm.bench.virtio_blk_path", description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=4096, help="requests per figure (default 4096)")
    ap.add_argument("--repeat", type=int, default=5, help="figures are the best of this many runs (default 5)")
    ap.add_argument("--profile", action="store_true", help="also where process_queue spends its time (cProfile)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="splitvmm-blkpath-") as tmp:
        image = os.path.join(tmp, "disk.img")
        with open(image, "wb") as f:
            f.write(os.urandom(IMAGE_MIB << 20))
        dev, ram, drv, region, rec = setup(image)
        rnd = random.Random(1)
        out: dict = {"load_avg_before": [round(x, 2) for x in os.getloadavg()], "requests": args.requests,
                     "best_of": args.repeat}
        for name, qd, nbytes, n in (("4k_qd1", 1, 4096, args.requests), ("4k_qd32", 32, 4096, args.requests),
                                    ("1m_qd1", 1, 1 << 20, max(16, args.requests // 64))):
            row: dict = {"serve_ns": best(lambda qd=qd, nbytes=nbytes, n=n: serve_ns(dev, drv, qd, nbytes, n, rnd),
                                    args.repeat),
                   "syscall_ns": best(lambda nbytes=nbytes, n=n: syscall_ns(dev.fd, ram, nbytes, n, rnd),
                                      args.repeat)}
            row["python_ns"] = row["serve_ns"] - row["syscall_ns"]
            if args.profile and nbytes == 4096:
                prof = cProfile.Profile()
                serve_ns(dev, drv, qd, nbytes, n, rnd, prof)
                row["profile"] = top(prof)
            out[name] = row
        out["eventfd_ns"] = best(lambda: eventfd_ns(args.requests), args.repeat)
        out["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
        dev.stop()
        rec.release()
        region.close()
        ram.release()
    json.dump(out, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
