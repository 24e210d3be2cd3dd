"""virtio-console with its port on a Unix socket, against a guarded
mmap'd buffer as guest RAM (tests/devices/test_virtio.py): bytes from
the client land in the receive buffers the driver posted, bytes the
driver transmits reach the client; input waits for buffers."""

from __future__ import annotations

import socket
import time

import pytest

from devices.base import Space
from devices.virtio import pci as vp
from devices.virtio import spec as vs
from devices.virtio.console import RECEIVEQ, TRANSMITQ, VirtioConsole
from devices.virtio.virtqueue import VIRTQ_DESC_F_WRITE
from tests.devices.test_virtio import FakeHost, GuardedRam, common_r, common_w, negotiate, put_desc
from tests.waiting import wait_for

RX = dict(desc=0x1000, avail=0x2000, used=0x3000)
TX = dict(desc=0x4000, avail=0x5000, used=0x6000)
QSIZE = 8


def setup(dev, q, desc, avail, used):
    common_w(dev, vs.VIRTIO_PCI_COMMON_Q_SELECT, 2, q)
    common_w(dev, vs.VIRTIO_PCI_COMMON_Q_SIZE, 2, QSIZE)
    for off, v in ((vs.VIRTIO_PCI_COMMON_Q_DESCLO, desc), (vs.VIRTIO_PCI_COMMON_Q_AVAILLO, avail),
                   (vs.VIRTIO_PCI_COMMON_Q_USEDLO, used)):
        common_w(dev, off, 4, v)
        common_w(dev, off + 4, 4, 0)
    common_w(dev, vs.VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1)


def offer(ram, q, head):
    avail = q["avail"]
    idx = ram.read_int(avail + 2, 2)
    ram.write_int(avail + 4 + 2 * (idx % QSIZE), 2, head)
    ram.write_int(avail + 2, 2, idx + 1)


def wait_used(ram, q, n, timeout=5.0):
    end = time.monotonic() + timeout
    while ram.read_int(q["used"] + 2, 2) < n:
        assert time.monotonic() < end, "no used buffer"
        time.sleep(0.005)
    slot = (n - 1) % QSIZE
    return ram.read_int(q["used"] + 4 + 8 * slot, 4), ram.read_int(q["used"] + 8 + 8 * slot, 4)


@pytest.fixture
def console(tmp_path):
    g = GuardedRam()
    path = str(tmp_path / "con.sock")
    dev = VirtioConsole(FakeHost(g.ram), slot="5", socket=path)
    dev.start()
    assert negotiate(dev) == 0xB
    setup(dev, RECEIVEQ, **RX)
    setup(dev, TRANSMITQ, **TX)
    common_w(dev, vs.VIRTIO_PCI_COMMON_STATUS, 1, 0xF)
    assert common_r(dev, vs.VIRTIO_PCI_COMMON_STATUS, 1) == 0xF
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)
    client.settimeout(5)
    yield dev, g.ram, client
    client.close()
    dev.stop()


def test_both_directions(console):
    dev, ram, client = console
    # transmit
    ram.write(0x10000, b"hello, host\n")
    ram.write(TX["desc"], (0x10000).to_bytes(8, "little") + (12).to_bytes(4, "little") + bytes(4))
    offer(ram, TX, 0)
    wait_for(lambda: dev._client is not None, 5, "the accept")     # the accept is asynchronous
    dev.write(Space.MMIO, vp.BAR_VIRTIO, vp.NOTIFY_OFFSET + 4 * TRANSMITQ, 2, TRANSMITQ)
    assert wait_used(ram, TX, 1) == (0, 0)
    assert client.recv(100) == b"hello, host\n"
    # receive: input waits until the driver posts a buffer
    client.sendall(b"typed")
    # Held by the device before any receive buffer is posted.
    wait_for(lambda: dev.snapshot()["model"]["device"]["pending"] == b"typed")
    put_desc_rx = RX["desc"]
    ram.write(put_desc_rx, (0x20000).to_bytes(8, "little") + (64).to_bytes(4, "little")
              + VIRTQ_DESC_F_WRITE.to_bytes(2, "little") + bytes(2))
    offer(ram, RX, 0)
    dev.write(Space.MMIO, vp.BAR_VIRTIO, vp.NOTIFY_OFFSET + 4 * RECEIVEQ, 2, RECEIVEQ)
    assert wait_used(ram, RX, 1) == (0, 5)
    assert ram.read(0x20000, 5) == b"typed"
    # a buffer already waiting is filled as input arrives
    offer(ram, RX, 0)
    client.sendall(b"more")
    assert wait_used(ram, RX, 2) == (0, 4)
    assert ram.read(0x20000, 4) == b"more"


def test_no_connection_drops_output(tmp_path):
    g = GuardedRam()
    dev = VirtioConsole(FakeHost(g.ram), slot="5")
    dev.start()
    try:
        assert negotiate(dev) == 0xB
        setup(dev, RECEIVEQ, **RX)
        setup(dev, TRANSMITQ, **TX)
        common_w(dev, vs.VIRTIO_PCI_COMMON_STATUS, 1, 0xF)
        put_desc(ram := g.ram, 0, 0x10000, 7, 0)
        ram.write(TX["desc"], ram.read(0x1000, 16))
        offer(ram, TX, 0)
        dev.write(Space.MMIO, vp.BAR_VIRTIO, vp.NOTIFY_OFFSET + 4 * TRANSMITQ, 2, TRANSMITQ)
        assert wait_used(ram, TX, 1) == (0, 0) and dev.dropped == 7
    finally:
        dev.stop()
