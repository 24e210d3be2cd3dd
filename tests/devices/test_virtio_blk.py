"""virtio-blk requests against a real image file and a guarded mmap'd
buffer as guest RAM (tests/devices/test_virtio.py): reads and writes go
straight between the file and guest RAM, flush, get-id, read-only, and
malformed or unsupported requests get IOERR / UNSUPP."""

from __future__ import annotations

import os
import struct

import pytest

from devices.base import BadParameter
from devices.virtio import blk as vb
from devices.virtio.blk import VirtioBlk
from devices.virtio.virtqueue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from tests.devices.test_virtio import (AVAIL, BUF, HIGH, USED, LOW, FakeHost, GuardedRam, common_r, common_w, negotiate,
                                       notify, offer, put_desc, setup_queue, status, used)
from devices.base import Space
from devices.virtio import pci as vp
from devices.virtio import spec as vs

SECTORS = 64
HDR, DATA, STATUS = BUF, BUF + 0x1000, BUF + 0x100


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(bytes(range(256)) * (SECTORS * 2))
    return p


def make(image, qsize=8, **params):
    g = GuardedRam()
    dev = VirtioBlk(FakeHost(g.ram), slot="4", path=str(image), **params)
    dev.start()
    assert negotiate(dev) == 0xB
    common_w(dev, vs.VIRTIO_PCI_COMMON_Q_SELECT, 2, 0)
    setup_queue(dev, size=qsize)
    common_w(dev, vs.VIRTIO_PCI_COMMON_STATUS, 1, 0xF)
    assert common_r(dev, vs.VIRTIO_PCI_COMMON_STATUS, 1) == 0xF
    return dev, g.ram


@pytest.fixture
def blk(image):
    dev, ram = make(image)
    yield dev, ram
    dev.stop()


def request(dev, ram, rtype, sector, data_len=0, data_writable=True, header_len=16, status=True, data=None):
    """One request as head 0; returns (used length, status byte)."""
    ram.write(HDR, struct.pack("<IIQ", rtype, 0, sector)[:header_len])
    ram.write(STATUS, b"\xee")
    descs = [(HDR, header_len, 0)]
    if data_len:
        if data is not None:
            ram.write(DATA, data)
        descs.append((DATA, data_len, VIRTQ_DESC_F_WRITE if data_writable else 0))
    if status:
        descs.append((STATUS, 1, VIRTQ_DESC_F_WRITE))
    for i, (a, n, f) in enumerate(descs):
        put_desc(ram, i, a, n, f | (VIRTQ_DESC_F_NEXT if i + 1 < len(descs) else 0), i + 1)
    offer(ram, 0)
    notify(dev)
    idx, elems = used(ram)
    return elems[-1][1], ram.read(STATUS, 1)[0]


def test_config_space(blk):
    dev, _ = blk
    raw = bytes(dev.read(Space.MMIO, 0, vp.DEVICE_OFFSET + i, 1) for i in range(24))
    capacity, _size_max, seg_max, _c, _h, _s, blk_size = struct.unpack("<QIIHBBI", raw)
    assert (capacity, seg_max, blk_size) == (SECTORS, vb.QUEUE_SIZE - 2, 512)
    common_w(dev, vs.VIRTIO_PCI_COMMON_DFSELECT, 4, 0)
    feats = common_r(dev, vs.VIRTIO_PCI_COMMON_DF, 4)
    assert feats & (1 << vb.VIRTIO_BLK_F_FLUSH) and not feats & (1 << vb.VIRTIO_BLK_F_RO)


def test_write_read_flush_get_id(blk, image):
    dev, ram = blk
    pattern = os.urandom(1024)
    assert request(dev, ram, vb.VIRTIO_BLK_T_OUT, 3, 1024, data_writable=False, data=pattern) == (1, 0)
    assert image.read_bytes()[3 * 512:5 * 512] == pattern      # in the file when acknowledged
    ram.write(DATA, bytes(1024))
    assert request(dev, ram, vb.VIRTIO_BLK_T_IN, 3, 1024) == (1025, 0)
    assert ram.read(DATA, 1024) == pattern
    assert request(dev, ram, vb.VIRTIO_BLK_T_FLUSH, 0) == (1, 0)
    assert request(dev, ram, vb.VIRTIO_BLK_T_GET_ID, 0, 20) == (21, 0)
    assert ram.read(DATA, 20) == b"disk.img".ljust(20, b"\0")
    # the status byte sharing the data's descriptor, data across the RAM hole
    ram.write(HDR, struct.pack("<IIQ", vb.VIRTIO_BLK_T_IN, 0, 0))
    put_desc(ram, 0, HDR, 16, VIRTQ_DESC_F_NEXT, 1)
    put_desc(ram, 1, LOW - 512, 512, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 2)
    put_desc(ram, 2, HIGH, 513, VIRTQ_DESC_F_WRITE)
    offer(ram, 0)
    notify(dev)
    assert used(ram)[1][-1] == (0, 1025)
    assert ram.read(LOW - 512, 512) + ram.read(HIGH, 512) == image.read_bytes()[:1024]
    assert ram.read(HIGH + 512, 1) == b"\0"


@pytest.mark.parametrize("case,expect", [
    (dict(rtype=vb.VIRTIO_BLK_T_IN, sector=SECTORS - 1, data_len=1024), (1, vb.VIRTIO_BLK_S_IOERR)),
    (dict(rtype=vb.VIRTIO_BLK_T_IN, sector=(1 << 64) - 1, data_len=512), (1, vb.VIRTIO_BLK_S_IOERR)),
    (dict(rtype=vb.VIRTIO_BLK_T_IN, sector=0, data_len=100), (1, vb.VIRTIO_BLK_S_IOERR)),
    (dict(rtype=vb.VIRTIO_BLK_T_OUT, sector=0, data_len=512, data_writable=True), (1, vb.VIRTIO_BLK_S_IOERR)),
    (dict(rtype=vb.VIRTIO_BLK_T_IN, sector=0, data_len=512, data_writable=False), (1, vb.VIRTIO_BLK_S_IOERR)),
    (dict(rtype=vb.VIRTIO_BLK_T_IN, sector=0, header_len=8), (1, vb.VIRTIO_BLK_S_IOERR)),
    (dict(rtype=99, sector=0), (1, vb.VIRTIO_BLK_S_UNSUPP)),
    (dict(rtype=vb.VIRTIO_BLK_T_IN, sector=0, status=False), (0, 0xEE)),
])
def test_malformed_and_unsupported(blk, image, case, expect):
    dev, ram = blk
    before = image.read_bytes()
    assert request(dev, ram, **case) == expect
    assert image.read_bytes() == before
    assert common_r(dev, vs.VIRTIO_PCI_COMMON_STATUS, 1) == 0xF


def test_readonly(image):
    dev, ram = make(image, readonly="on")
    try:
        common_w(dev, vs.VIRTIO_PCI_COMMON_DFSELECT, 4, 0)
        assert common_r(dev, vs.VIRTIO_PCI_COMMON_DF, 4) & (1 << vb.VIRTIO_BLK_F_RO)
        before = image.read_bytes()
        assert request(dev, ram, vb.VIRTIO_BLK_T_OUT, 0, 512, data_writable=False,
                       data=b"x" * 512) == (1, vb.VIRTIO_BLK_S_IOERR)
        assert image.read_bytes() == before
        assert request(dev, ram, vb.VIRTIO_BLK_T_IN, 0, 512) == (513, 0)
    finally:
        dev.stop()


def test_parameters(tmp_path):
    with pytest.raises(BadParameter, match="path"):
        VirtioBlk(FakeHost(None), slot="4")
    with pytest.raises(BadParameter, match="readonly"):
        VirtioBlk(FakeHost(None), slot="4", path="x", readonly="maybe")
    with pytest.raises(BadParameter, match="serial"):
        VirtioBlk(FakeHost(None), slot="4", path="x", serial="y" * 21)
    dev = VirtioBlk(FakeHost(None), slot="4", path=str(tmp_path / "missing"))
    with pytest.raises(BadParameter, match="missing"):
        dev.start()


# -- multi-queue (VIRTIO_BLK_F_MQ, §5.2.3) ------------------------------------

def _queue_at(q):
    """Ring addresses of queue q in the low RAM of GuardedRam."""
    base = 0x20000 + q * 0x4000
    return base, base + 0x1000, base + 0x2000, base + 0x3000     # desc, avail, used, header/status


def _setup(dev, q):
    desc, avail, usedr, _ = _queue_at(q)
    common_w(dev, vs.VIRTIO_PCI_COMMON_Q_SELECT, 2, q)
    common_w(dev, vs.VIRTIO_PCI_COMMON_Q_SIZE, 2, 8)
    for off, v in ((vs.VIRTIO_PCI_COMMON_Q_DESCLO, desc), (vs.VIRTIO_PCI_COMMON_Q_AVAILLO, avail),
                   (vs.VIRTIO_PCI_COMMON_Q_USEDLO, usedr)):
        common_w(dev, off, 4, v)
        common_w(dev, off + 4, 4, 0)
    common_w(dev, vs.VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1)


def _read_on(dev, ram, q, sector):
    desc, avail, usedr, hdr = _queue_at(q)
    ram.write(hdr, struct.pack("<IIQ", vb.VIRTIO_BLK_T_IN, 0, sector))
    ram.write(hdr + 0x100, b"\xee")
    chain = ((hdr, 16, VIRTQ_DESC_F_NEXT), (hdr + 0x200, 512, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT),
             (hdr + 0x100, 1, VIRTQ_DESC_F_WRITE))
    for i, (a, n, f) in enumerate(chain):
        ram.write(desc + 16 * i, struct.pack("<QIHH", a, n, f, i + 1))
    idx = ram.read_int(avail + 2, 2)
    ram.write_int(avail + 4 + 2 * (idx % 8), 2, 0)
    ram.write_int(avail + 2, 2, idx + 1)
    notify(dev, q)
    return ram.read_int(usedr + 2, 2), ram.read(hdr + 0x100, 1)[0], ram.read(hdr + 0x200, 512)


def test_mq_negotiation_config_and_per_queue_requests(image):
    g = GuardedRam()
    dev = VirtioBlk(FakeHost(g.ram), slot="4", path=str(image), num_queues="4")
    dev.start()
    try:
        assert dev.doorbells._nthreads == 4
        common_w(dev, vs.VIRTIO_PCI_COMMON_DFSELECT, 4, 0)
        assert common_r(dev, vs.VIRTIO_PCI_COMMON_DF, 4) & (1 << vb.VIRTIO_BLK_F_MQ)
        assert common_r(dev, vs.VIRTIO_PCI_COMMON_NUMQ, 2) == 4
        raw = bytes(dev.read(Space.MMIO, 0, vp.DEVICE_OFFSET + i, 1) for i in range(36))
        assert struct.unpack_from("<H", raw, 34)[0] == 4          # num_queues (§5.2.4)
        assert dev.msix.nvectors == 5
        common_w(dev, vs.VIRTIO_PCI_COMMON_STATUS, 1, 0)
        common_w(dev, vs.VIRTIO_PCI_COMMON_STATUS, 1, 3)
        for sel, v in ((0, 1 << vb.VIRTIO_BLK_F_MQ), (1, 1)):
            common_w(dev, vs.VIRTIO_PCI_COMMON_GFSELECT, 4, sel)
            common_w(dev, vs.VIRTIO_PCI_COMMON_GF, 4, v)
        common_w(dev, vs.VIRTIO_PCI_COMMON_STATUS, 1, 0xB)
        assert status(dev) == 0xB and dev.driver_features & (1 << vb.VIRTIO_BLK_F_MQ)
        for q in range(4):
            _setup(dev, q)
        common_w(dev, vs.VIRTIO_PCI_COMMON_STATUS, 1, 0xF)
        assert status(dev) == 0xF
        for q in (3, 0, 2, 1):
            used_idx, st, data = _read_on(dev, g.ram, q, q + 5)
            assert (used_idx, st) == (1, vb.VIRTIO_BLK_S_OK)
            assert data == image.read_bytes()[(q + 5) * 512:(q + 6) * 512]
        assert [dev.queues[q].served for q in range(4)] == [1, 1, 1, 1]
        # a hostile ring on queue 2 alone: avail idx far ahead -> NEEDS_RESET, nothing served
        _desc, avail, _u, _h = _queue_at(2)
        g.ram.write_int(avail + 2, 2, 200)
        notify(dev, 2)
        assert status(dev) & vs.VIRTIO_CONFIG_S_NEEDS_RESET and dev.queues[2].served == 1
        _read_on(dev, g.ram, 1, 0)
        assert dev.queues[1].served == 1                           # queues stop until reset
        snap = dev.model_state()
        assert len(snap["core"]["queues"]) == 4
    finally:
        dev.stop()


def test_single_queue_offers_no_mq_and_bad_num_queues(image):
    dev = VirtioBlk(FakeHost(GuardedRam().ram), slot="4", path=str(image))
    assert not dev.features & (1 << vb.VIRTIO_BLK_F_MQ) and len(dev.queues) == 1
    for bad in ("0", "17", "x"):
        with pytest.raises(BadParameter, match="num_queues"):
            VirtioBlk(FakeHost(GuardedRam().ram), slot="4", path=str(image), num_queues=bad)
    with pytest.raises(BadParameter, match="notify_threads"):
        VirtioBlk(FakeHost(GuardedRam().ram), slot="4", path=str(image), notify_threads="many")


def record_queue(dev):
    """Queue 0's in-flight record as a device process hooks it
    (devserver.persist.QueueRecord over ipc.inflight.InflightQueue, size
    8): (hook, record, release)."""
    import mmap

    from devserver.persist import QueueRecord
    from ipc.inflight import InflightQueue, region_size

    region = mmap.mmap(-1, region_size(dev.queues[0].max_size))
    rec = InflightQueue(memoryview(region), dev.queues[0].max_size)
    hook = QueueRecord(rec)
    hook.enabled(0, 8)
    dev.queues[0].inflight = hook

    def release() -> None:
        rec.release()
        region.close()
    return hook, rec, release


@pytest.mark.parametrize("c_path", [True, False], ids=["c", "python"])
def test_batch_of_requests_one_doorbell(image, monkeypatch, c_path):
    """Several requests on the avail ring before one doorbell -- reads and
    a write of the usual shape (devices.blkring's C path), a flush (the
    Python path), the same head offered twice -- are all served in ring
    order, published with one used->idx, and the in-flight record
    (devserver.persist.QueueRecord, as a device process hooks it) shows
    nothing in flight after; the Python path alone gives the same."""
    from devices import blkring

    if c_path and not blkring.AVAILABLE:
        pytest.skip("devices._blkring_c is not built (make install)")
    if not c_path:
        monkeypatch.setattr(blkring, "AVAILABLE", False)
    dev, ram = make(image)
    hook, rec, release = record_queue(dev)
    try:
        hdr = lambda k: HDR + 0x20 * k         # noqa: E731
        st = lambda k: STATUS + k              # noqa: E731
        data = lambda k: DATA + 0x200 * k      # noqa: E731
        # A: read sector 3 (descs 0-2); B: write sector 5 (3-5); C: flush (6-7)
        ram.write(hdr(0), struct.pack("<IIQ", vb.VIRTIO_BLK_T_IN, 0, 3))
        ram.write(hdr(1), struct.pack("<IIQ", vb.VIRTIO_BLK_T_OUT, 0, 5))
        ram.write(hdr(2), struct.pack("<IIQ", vb.VIRTIO_BLK_T_FLUSH, 0, 0))
        ram.write(data(1), b"\x5a" * 512)
        chains = [[(hdr(0), 16, 0), (data(0), 512, VIRTQ_DESC_F_WRITE), (st(0), 1, VIRTQ_DESC_F_WRITE)],
                  [(hdr(1), 16, 0), (data(1), 512, 0), (st(1), 1, VIRTQ_DESC_F_WRITE)],
                  [(hdr(2), 16, 0), (st(2), 1, VIRTQ_DESC_F_WRITE)]]
        heads, d = [], 0
        for chain in chains:
            heads.append(d)
            for i, (a, n, f) in enumerate(chain):
                put_desc(ram, d, a, n, f | (VIRTQ_DESC_F_NEXT if i + 1 < len(chain) else 0), d + 1)
                d += 1
        for k in range(3):
            ram.write(st(k), b"\xee")
        for h in heads + [heads[0]]:            # A twice: a broken driver, served twice
            offer(ram, h)
        notify(dev)
        idx, elems = used(ram)
        assert idx == 4
        assert elems == [(0, 513), (3, 1), (6, 1), (0, 513)]
        assert ram.read(st(0), 3) == b"\0\0\0"
        assert ram.read(data(0), 512) == image.read_bytes()[3 * 512:4 * 512]
        assert image.read_bytes()[5 * 512:6 * 512] == b"\x5a" * 512
        hook.flush()
        assert rec.in_flight() == 0
        assert dev.queues[0].served == 4 and dev.queues[0].failed == 0
    finally:
        dev.stop()
        release()


@pytest.mark.parametrize("c_path", [True, False], ids=["c", "python"])
def test_batch_with_bad_requests(image, monkeypatch, c_path):
    """In one batch a read past the end gets IOERR, a write whose header
    says read (the data buffer is device-readable) IOERR, a good read
    between them its data: the C path leaves both bad ones to the Python
    path, which fails them alone."""
    from devices import blkring

    if c_path and not blkring.AVAILABLE:
        pytest.skip("devices._blkring_c is not built (make install)")
    if not c_path:
        monkeypatch.setattr(blkring, "AVAILABLE", False)
    dev, ram = make(image)
    try:
        hdr = lambda k: HDR + 0x20 * k         # noqa: E731
        ram.write(hdr(0), struct.pack("<IIQ", vb.VIRTIO_BLK_T_IN, 0, SECTORS))      # past the end
        ram.write(hdr(1), struct.pack("<IIQ", vb.VIRTIO_BLK_T_IN, 0, 1))
        ram.write(hdr(2), struct.pack("<IIQ", vb.VIRTIO_BLK_T_IN, 0, 2))            # data not writable
        flags = (VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_WRITE, 0)
        for k in range(3):
            for i, (a, n, f) in enumerate(((hdr(k), 16, VIRTQ_DESC_F_NEXT),
                                           (DATA + 0x200 * k, 512, flags[k] | VIRTQ_DESC_F_NEXT),
                                           (STATUS + k, 1, VIRTQ_DESC_F_WRITE))):
                if k < 2 or i < 2:
                    put_desc(ram, 3 * k + i, a, n, f, 3 * k + i + 1)
        # the third chain: header, data; its status at descriptor 0 of... no room: reuse a chain of 2
        put_desc(ram, 6, hdr(2), 16, VIRTQ_DESC_F_NEXT, 7)
        put_desc(ram, 7, DATA + 0x400, 512, 0, 0)   # no status byte: completes with length 0
        ram.write(STATUS, b"\xee\xee")
        for h in (0, 3, 6):
            offer(ram, h)
        notify(dev)
        idx, elems = used(ram)
        assert idx == 3
        assert elems == [(0, 1), (3, 513), (6, 0)]
        assert ram.read(STATUS, 2) == bytes([vb.VIRTIO_BLK_S_IOERR, vb.VIRTIO_BLK_S_OK])
        assert ram.read(DATA + 0x200, 512) == image.read_bytes()[512:1024]
    finally:
        dev.stop()


@pytest.mark.parametrize("c_path", [True, False], ids=["c", "python"])
def test_blk_faults_in_a_batch_count_each_request_once(image, monkeypatch, c_path):
    """Five reads on one doorbell with ``blk.read`` faults armed (IOERR on
    the 2nd, a hang on the 4th, one that never matches): the C path serves
    the requests the faults pass over, Python the ones they fire on, and
    each request is one event of the point -- the same statuses, used
    ring and counts as the Python path alone."""
    from devices import blkring
    from devices.faults import FaultEngine, parse_plan

    if c_path and not blkring.AVAILABLE:
        pytest.skip("devices._blkring_c is not built (make install)")
    if not c_path:
        monkeypatch.setattr(blkring, "AVAILABLE", False)
    plan = parse_plan({"fault": [
        {"device": "blk", "name": "second", "point": "blk.read", "nth": 2, "action": "ioerr"},
        {"device": "blk", "name": "fourth", "point": "blk.read", "nth": 4, "action": "hang"},
        {"device": "blk", "name": "never", "point": "blk.read", "after": 0, "action": "ioerr",
         "sector": [SECTORS * 8, SECTORS * 8]}]})
    in_c: list[int] = []          # how many requests each C run was given
    if c_path:
        run = blkring.Ring.run
        monkeypatch.setattr(blkring.Ring, "run", lambda self, fd, k, *a: in_c.append(k) or run(self, fd, k, *a))
    dev, ram = make(image, qsize=16)
    dev.fault_engine = FaultEngine("blk", plan.for_device("blk"), points=VirtioBlk.all_fault_points())
    try:
        hdr = lambda k: HDR + 0x20 * k         # noqa: E731
        data = lambda k: DATA + 0x200 * k      # noqa: E731
        for k in range(5):
            ram.write(hdr(k), struct.pack("<IIQ", vb.VIRTIO_BLK_T_IN, 0, k))
            for i, (a, n, f) in enumerate(((hdr(k), 16, VIRTQ_DESC_F_NEXT),
                                           (data(k), 512, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT),
                                           (STATUS + k, 1, VIRTQ_DESC_F_WRITE))):
                put_desc(ram, 3 * k + i, a, n, f, 3 * k + i + 1)
            ram.write_int(AVAIL + 4 + 2 * k, 2, 3 * k)
        ram.write_int(AVAIL + 2, 2, 5)
        ram.write(STATUS, b"\xee" * 5)
        notify(dev)
        idx = ram.read_int(USED + 2, 2)
        elems = [struct.unpack("<II", ram.read(USED + 4 + 8 * i, 8)) for i in range(idx)]
        assert idx == 4                        # the 4th hangs: never completed
        assert elems == [(0, 513), (3, 1), (6, 513), (12, 513)]
        ok, err = vb.VIRTIO_BLK_S_OK, vb.VIRTIO_BLK_S_IOERR
        assert ram.read(STATUS, 5) == bytes([ok, err, ok, 0xEE, ok])
        for k in (0, 2, 4):
            assert ram.read(data(k), 512) == image.read_bytes()[k * 512:(k + 1) * 512]
        assert dev.fault_engine.events("blk.read") == 5
        status = {s.fault.name: (s.events, s.firings) for s in dev.fault_engine.query()}
        assert status == {"second": (5, 1), "fourth": (5, 1), "never": (0, 0)}
        assert in_c == ([1, 1, 1] if c_path else [])    # 1st, 3rd, 5th in C; 2nd, 4th in Python
    finally:
        dev.stop()


def test_c_loop_writes_the_inflight_record_as_python_does(image, monkeypatch):
    """The C loop pops and completes in the in-flight record itself
    (devices.blkring.Ring.recording): after the same batch of reads and a
    write, the record's bytes -- pop counters in ring order, flags, used
    index -- are the ones the Python path (ipc.inflight.InflightQueue)
    leaves, and its counter goes on from the same value."""
    from devices import blkring

    if not blkring.AVAILABLE:
        pytest.skip("devices._blkring_c is not built (make install)")

    recorded: list[int] = []            # the C loop's batches that kept the record themselves
    recording = blkring.Ring.recording
    monkeypatch.setattr(blkring.Ring, "recording", lambda self, r: recorded.append(1) or recording(self, r))

    def run(c_path: bool) -> tuple[bytes, int, list]:
        monkeypatch.setattr(blkring, "AVAILABLE", c_path)
        dev, ram = make(image)
        hook, rec, release = record_queue(dev)
        try:
            for rounds in range(2):             # the second batch starts from the first's counter
                for k, (rtype, sector) in enumerate(((vb.VIRTIO_BLK_T_IN, 1), (vb.VIRTIO_BLK_T_OUT, 2))):
                    hdr = HDR + 0x20 * k
                    ram.write(hdr, struct.pack("<IIQ", rtype, 0, sector + rounds))
                    flags = VIRTQ_DESC_F_WRITE if rtype == vb.VIRTIO_BLK_T_IN else 0
                    for i, (a, n, f) in enumerate(((hdr, 16, VIRTQ_DESC_F_NEXT),
                                                   (DATA + 0x200 * k, 512, flags | VIRTQ_DESC_F_NEXT),
                                                   (STATUS + k, 1, VIRTQ_DESC_F_WRITE))):
                        put_desc(ram, 3 * k + i, a, n, f, 3 * k + i + 1)
                    offer(ram, 3 * k)
                notify(dev)
            hook.flush()
            return bytes(rec.buffer), rec.counter, used(ram)
        finally:
            dev.stop()
            release()

    c_bytes, c_counter, c_used = run(True)
    assert len(recorded) == 2
    py_bytes, py_counter, py_used = run(False)
    assert len(recorded) == 2
    assert c_used == py_used and c_used[0] == 4
    assert c_counter == py_counter == 5
    assert c_bytes == py_bytes


def test_c_loop_completes_pending_python_completions_before_a_reused_head(image, monkeypatch):
    """A request a fault fires on is finished by Python, its completion
    left pending in the record; the driver reuses its head at once (as a
    fast guest does while the device process runs).  The C loop that
    takes it again in the same call writes the pending completion first:
    the record never sees a head popped twice or completed when it is not
    in flight (it raised InflightError)."""
    from devices import blkring
    from devices.faults import FaultEngine, parse_plan

    if not blkring.AVAILABLE:
        pytest.skip("devices._blkring_c is not built (make install)")
    dev, ram = make(image)
    plan = parse_plan({"fault": [{"device": "blk", "point": "blk.read", "nth": 1, "action": "delay", "ms": 0}]})
    dev.fault_engine = FaultEngine("blk", plan.for_device("blk"), points=VirtioBlk.all_fault_points())
    hook, rec, release = record_queue(dev)
    faulted = VirtioBlk._faulted
    reoffered: list[int] = []

    def faulted_then_reuse(self, *args):
        written = faulted(self, *args)
        if not reoffered:                   # the driver offers head 0 again, the same request
            reoffered.append(1)
            offer(ram, 0)
        return written

    monkeypatch.setattr(VirtioBlk, "_faulted", faulted_then_reuse)
    try:
        ram.write(HDR, struct.pack("<IIQ", vb.VIRTIO_BLK_T_IN, 0, 3))
        for i, (a, n, f) in enumerate(((HDR, 16, VIRTQ_DESC_F_NEXT),
                                       (DATA, 512, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT),
                                       (STATUS, 1, VIRTQ_DESC_F_WRITE))):
            put_desc(ram, i, a, n, f, i + 1)
        offer(ram, 0)
        notify(dev)
        assert reoffered
        idx, elems = used(ram)
        assert idx == 2 and elems == [(0, 513), (0, 513)]
        hook.flush()
        assert rec.in_flight() == 0
        assert dev.fault_engine.events("blk.read") == 2
    finally:
        dev.stop()
        release()


# -- watching the avail ring after a doorbell (poll_us=) -----------------------

def _read_chain(ram, k, sector):
    """Read request k (descriptors 3k..3k+2) of sector ``sector``; its head."""
    hdr, data, st = HDR + 0x20 * k, DATA + 0x200 * k, STATUS + k
    ram.write(hdr, struct.pack("<IIQ", vb.VIRTIO_BLK_T_IN, 0, sector))
    ram.write(st, b"\xee")
    chain = [(hdr, 16, 0), (data, 512, VIRTQ_DESC_F_WRITE), (st, 1, VIRTQ_DESC_F_WRITE)]
    for i, (a, n, f) in enumerate(chain):
        put_desc(ram, 3 * k + i, a, n, f | (VIRTQ_DESC_F_NEXT if i + 1 < len(chain) else 0), 3 * k + i + 1)
    return 3 * k


@pytest.mark.parametrize("poll_us", ["50", "0"])
def test_doorbell_thread_serves_a_request_made_available_while_it_watches(image, monkeypatch, poll_us):
    """After the batch a doorbell rang for, the doorbell thread's path
    (_rung) watches the avail ring in C: a request the driver makes
    available then (here: from inside the first wait, as a driver on
    another CPU would) is served with no second doorbell; then the watch
    times out and the thread goes back to its doorbells.  poll_us=0: no
    watch, the second request waits for its doorbell."""
    from devices import blkring

    if not blkring.AVAILABLE:
        pytest.skip("devices._blkring_c is not built (make install)")
    monkeypatch.setattr(vb, "_cpus", lambda: 2)     # a CPU left for the vCPU, on any host
    dev, ram = make(image, poll_us=poll_us)
    second = _read_chain(ram, 1, 7)
    waits = []
    real_wait = blkring.Ring.wait

    def wait(self, avail, last_avail, ns):
        waits.append(ns)
        if len(waits) == 1:
            offer(ram, second)              # the driver's next request, no doorbell
        return real_wait(self, avail, last_avail, ns)

    monkeypatch.setattr(blkring.Ring, "wait", wait)
    try:
        offer(ram, _read_chain(ram, 0, 3))
        with dev._lock:                     # as Doorbells' thread calls it
            dev._rung(0, 1)
        idx, elems = used(ram)
        if poll_us == "0":
            assert waits == [] and idx == 1 and elems == [(0, 513)]
            return
        assert waits == [50_000, 50_000]    # served one, then timed out
        assert idx == 2 and elems == [(0, 513), (3, 513)]
        assert ram.read(STATUS, 2) == b"\0\0"
        img = image.read_bytes()
        assert ram.read(DATA, 512) == img[3 * 512:4 * 512]
        assert ram.read(DATA + 0x200, 512) == img[7 * 512:8 * 512]
        assert dev.notifies_eventfd == 1
    finally:
        dev.stop()


def test_ring_wait_times_out_sees_a_moved_index_and_refuses_outside_ram(image):
    """devices.blkring.Ring.wait (blk_wait): True at once for an index past
    last_avail, False after at least the time asked for an index that
    stays, ValueError for an avail ring outside guest RAM; and poll_us is
    checked (0 to 1000)."""
    import time

    from devices import blkring

    if not blkring.AVAILABLE:
        pytest.skip("devices._blkring_c is not built (make install)")
    dev, ram = make(image)
    try:
        ring = blkring.Ring(dev._mem.buffer, dev._mem.spans)
        avail = dev._mem.offset(AVAIL, 4)
        idx = ram.read_int(AVAIL + 2, 2)
        with ring.mapped():
            assert ring.wait(avail, (idx - 1) & 0xFFFF, 10**9)
            t0 = time.monotonic_ns()
            assert not ring.wait(avail, idx, 2_000_000)
            assert time.monotonic_ns() - t0 >= 2_000_000
            with pytest.raises(ValueError):
                ring.wait(len(dev._mem.buffer) - 2, 0, 1000)
            with pytest.raises(ValueError):
                ring.wait(avail + 1, 0, 1000)
    finally:
        dev.stop()
    for bad in ("-1", "x", "1001"):
        with pytest.raises(BadParameter, match="poll_us"):
            VirtioBlk(FakeHost(None), slot="4", path=str(image), poll_us=bad)


def test_no_watch_without_a_spare_cpu_or_a_thread_per_queue(image, monkeypatch):
    """The doorbell threads watch only while they are fewer than the CPUs
    (one left for the vCPU driving them) and each has its queue alone."""
    monkeypatch.setattr(vb, "_cpus", lambda: 2)
    polls = lambda **p: VirtioBlk(FakeHost(None), slot="4", path=str(image), **p)._polls  # noqa: E731
    assert polls()
    assert not polls(poll_us="0")
    assert not polls(num_queues="2")
    assert not polls(num_queues="2", notify_threads="one")
    monkeypatch.setattr(vb, "_cpus", lambda: 8)
    assert polls(num_queues="4")
    assert not polls(num_queues="4", notify_threads="one")
