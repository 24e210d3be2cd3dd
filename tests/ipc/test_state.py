"""The state segment (ipc.state): layout, round trips, the writer's rules,
and a reader that survives any content (the segment is device-writable)."""

from __future__ import annotations

import fcntl
import os
import random
import struct
import time
import zlib

import msgpack
import pytest

from ipc.state import (
    BUFFER_HEADER_SIZE,
    MAX_CAPACITY,
    AccessRecord,
    SnapshotTooLarge,
    StateLayout,
    StateLayoutError,
    StateSegment,
)


def blk_state(n: int = 0) -> dict:
    """Roughly what a virtio-blk model's snapshot holds (~1.5 KiB)."""
    return {
        "pci": {"config": bytes((n + i) & 0xFF for i in range(256)),
                "bars": [0xFEBF0000 + n, 0, 0xFE000000, 0, 0, 0], "command": 0x0407},
        "msix": {"table": bytes(16 * 8), "pba": [0, 0], "enabled": True, "masked": False},
        "virtio": {"status": 15, "driver_features": (1 << 32) | (1 << 9), "device_features_sel": 1,
                   "driver_features_sel": 0, "queue_sel": 0, "config_generation": n,
                   "isr": 0, "config_msix": 0},
        "queues": [{"size": 256, "ready": True, "desc": 0x10000 + n, "avail": 0x20000,
                    "used": 0x30000, "msix": 1, "notify_off": 0}],
        "blk": {"capacity": 2048, "read_only": False, "serial": f"disk-{n}", "blk_size": 512,
                "requests": n, "written": [n, n * 2, n * 3], "ratio": 0.5, "none": None},
        "scratch": bytes(800),
    }


@pytest.fixture
def seg():
    with StateSegment.create(capacity=8192, queue_sizes=(256, 8)) as s:
        yield s


def test_empty_segment_reads_none(seg):
    res = seg.inspect()
    assert res.snapshot is None and res.problems == ()


def test_round_trip_and_record(seg):
    st = blk_state(3)
    assert len(msgpack.packb(st)) > 1024
    assert seg.store(st, AccessRecord(seq=41, value=0xDEAD, status=0))
    snap = seg.read()
    assert snap.number == 1
    assert snap.state == {**st, "queues": st["queues"]}
    assert snap.access == AccessRecord(41, 0xDEAD, 0)
    # A store outside an access keeps the record: the snapshot still includes access 41.
    seg.store(blk_state(4))
    snap = seg.read()
    assert snap.number == 2 and snap.state["virtio"]["config_generation"] == 4
    assert snap.access == AccessRecord(41, 0xDEAD, 0)
    seg.store(blk_state(5), AccessRecord(42, 1, 1))
    assert seg.read().access == AccessRecord(42, 1, 1)


def test_tuples_come_back_as_lists(seg):
    seg.store({"t": (1, 2), 7: "int key"})
    assert seg.read().state == {"t": [1, 2], 7: "int key"}


def test_device_attaches_and_a_restarted_writer_continues(seg):
    dev = StateSegment.attach(seg.fd)
    assert dev.layout == seg.layout and dev.fd is None
    dev.store({"n": 1}, AccessRecord(1, 0, 0))
    dev.store({"n": 2}, AccessRecord(2, 0, 0))
    dev.close()
    again = StateSegment.attach(seg.fd)      # the next process
    again.store({"n": 3})
    snap = seg.read()
    assert (snap.number, snap.state, snap.access) == (3, {"n": 3}, AccessRecord(2, 0, 0))
    again.close()


def test_only_if_changed(seg):
    assert seg.store({"a": 1}, AccessRecord(1, 0, 0), only_if_changed=True)
    assert not seg.store({"a": 1}, AccessRecord(2, 0, 0), only_if_changed=True)
    snap = seg.read()
    assert snap.number == 1 and snap.access.seq == 1
    assert seg.store({"a": 2}, AccessRecord(3, 0, 0), only_if_changed=True)
    assert seg.read().access.seq == 3


def test_store_packed(seg):
    """A snapshot the model packed itself: stored with its record, read
    back decoded, skipped when equal to the last one, refused when too
    large; a restarted writer's first packed store continues the numbers."""
    dev = StateSegment.attach(seg.fd)
    dev.store({"n": 0}, AccessRecord(1, 0, 0))
    assert dev.store_packed(msgpack.packb({"n": 1, "b": b"x"}), 2, 0x1_0000_0000_0000_0007)
    snap = seg.read()
    assert (snap.number, snap.state, snap.access) == (2, {"n": 1, "b": b"x"}, AccessRecord(2, 7, 0))   # masked to 64 bits
    assert not dev.store_packed(msgpack.packb({"n": 1, "b": b"x"}), 3, 0)      # nothing changed
    assert seg.read().access.seq == 2
    with pytest.raises(SnapshotTooLarge):
        dev.store_packed(msgpack.packb({"big": bytes(9000)}), 4, 0)
    with pytest.raises(ValueError):
        dev.store_packed(msgpack.packb({"n": 5}), 0, 0)
    with pytest.raises(TypeError):
        dev.store_packed(bytearray(msgpack.packb({"n": 5})), 5, 0)    # type: ignore[arg-type]
    assert seg.read().number == 2
    dev.close()
    again = StateSegment.attach(seg.fd)      # the next process
    assert again.store_packed(msgpack.packb({"n": 6}), 6, 1)
    snap = seg.read()
    assert (snap.number, snap.state, snap.access) == (3, {"n": 6}, AccessRecord(6, 1, 0))
    again.close()


def test_too_large_is_refused_and_writes_nothing(seg):
    seg.store({"ok": 1})
    with pytest.raises(SnapshotTooLarge, match="capacity of 8192"):
        seg.store({"big": bytes(9000)})
    assert seg.read().state == {"ok": 1}
    seg.store({"big": bytes(8192 - 16)})        # just fits
    assert len(seg.read().state["big"]) == 8176


@pytest.mark.parametrize("bad", [{"x": object()}, {"x": {1, 2}}, [1, 2], {"x": 1 << 70}])
def test_not_plain_data_is_refused(seg, bad):
    with pytest.raises(TypeError):
        seg.store(bad)
    assert seg.read() is None


def test_bad_arguments():
    with pytest.raises(ValueError):
        StateSegment.create(capacity=0)
    with pytest.raises(ValueError):
        StateSegment.create(capacity=MAX_CAPACITY + 1)
    with pytest.raises(ValueError):
        StateSegment.create(queue_sizes=(0,))
    with StateSegment.create(capacity=64) as s:
        with pytest.raises(ValueError):
            s.store({}, AccessRecord(0, 0, 0))
        with pytest.raises(ValueError):
            s.queue(0)


def test_segment_is_sealed(seg):
    seals = fcntl.fcntl(seg.fd, fcntl.F_GET_SEALS)
    assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW and seals & fcntl.F_SEAL_SEAL
    with pytest.raises(OSError):
        os.ftruncate(seg.fd, 4096)


def test_attach_checks_the_header(seg):
    header = os.pread(seg.fd, 64, 0)
    for off, val in [(0, b"X"), (8, b"\x02"), (12, b"\x00"), (16, b"\x01"), (20, b"\x07"), (24, b"\x00"),
                     (32, b"\x07"), (40, b"\x01"), (64, b"\x00\x02")]:
        os.pwrite(seg.fd, val, off)
        with pytest.raises(StateLayoutError):
            StateSegment.attach(seg.fd)
        os.pwrite(seg.fd, header, 0)
        os.pwrite(seg.fd, struct.pack("<HH", 256, 8), 64)
    StateSegment.attach(seg.fd).close()


def test_attach_refuses_unsealed_and_foreign_fds(tmp_path):
    fd = os.memfd_create("x", os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, StateLayout(64, ()).total_size)
        os.pwrite(fd, StateLayout(64, ()).pack_header(), 0)
        with pytest.raises(StateLayoutError, match="sealed"):
            StateSegment.attach(fd)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        StateSegment.attach(fd).close()
    finally:
        os.close(fd)
    path = tmp_path / "f"
    path.write_bytes(b"")
    with open(path, "rb") as f:
        with pytest.raises(StateLayoutError):
            StateSegment.attach(f.fileno())


# ---- hostile buffers -------------------------------------------------------


def _forge(seg, i: int, number: int, payload: bytes, seq=0, value=0, status=0, length=None,
           crc=None) -> None:
    """Write buffer i as a device could: any content, a correct CRC unless told."""
    off = seg.layout.buffer_offset(i)
    length = len(payload) if length is None else length
    rec = struct.pack("<QQII", seq, value, length, status)
    numb = struct.pack("<Q", number)
    if crc is None:
        crc = zlib.crc32(payload[:length], zlib.crc32(rec, zlib.crc32(numb)))
    os.pwrite(seg.fd, payload, off + BUFFER_HEADER_SIZE)
    os.pwrite(seg.fd, numb + rec + struct.pack("<I", crc), off)


HOSTILE_PAYLOADS = {
    "not msgpack": b"\xc1\xc1\xc1",
    "truncated": msgpack.packb({"a": "x" * 100})[:50],
    "trailing data": msgpack.packb({"a": 1}) + b"\x01",
    "a list": msgpack.packb([1, 2, 3]),
    "an int": msgpack.packb(5),
    "ext type": msgpack.packb({"a": msgpack.ExtType(3, b"abc")}),
    "timestamp": b"\x81\xa1a\xd6\xff\x00\x00\x00\x01",
    "huge map length": b"\xdf\xff\xff\xff\xff",
    "huge str length": b"\x81\xa1a\xdb\xff\xff\xff\xff",
    "huge bin length": b"\x81\xa1a\xc6\x7f\xff\xff\xff",
    "deep nesting": b"\x81\xa1a" + b"\x91" * 4000 + b"\xc0",
    "list key": b"\x81\x92\x01\x02\x03",
    "float key": b"\x81\xcb" + struct.pack(">d", 1.5) + b"\x01",
    "bad utf-8": b"\x81\xa1a\xa2\xff\xfe",
    "map in key": b"\x81\x81\x01\x02\x03",
}


@pytest.mark.parametrize("name", sorted(HOSTILE_PAYLOADS))
def test_hostile_payload_falls_back_to_previous(seg, name):
    seg.store({"good": 1}, AccessRecord(7, 1, 0))        # number 1, buffer 1
    _forge(seg, 0, 2, HOSTILE_PAYLOADS[name], seq=8)      # a newer, bad one
    res = seg.inspect()
    assert res.snapshot is not None and res.snapshot.state == {"good": 1}, res
    assert res.snapshot.access.seq == 7
    assert len(res.problems) == 1 and res.problems[0].startswith("buffer 0: snapshot 2")


@pytest.mark.parametrize("case", ["bad crc", "huge length", "length past capacity", "wrong buffer",
                                  "number out of range", "torn publish"])
def test_hostile_header_falls_back(seg, case):
    seg.store({"good": 1})
    good = msgpack.packb({"evil": 1})
    if case == "bad crc":
        _forge(seg, 0, 2, good, crc=12345)
    elif case == "huge length":
        _forge(seg, 0, 2, good, length=0xFFFFFFFF)
    elif case == "length past capacity":
        _forge(seg, 0, 2, good, length=seg.layout.capacity + 1)
    elif case == "wrong buffer":
        _forge(seg, 0, 3, good)
    elif case == "number out of range":
        _forge(seg, 0, 1 << 62, good)
    elif case == "torn publish":
        _forge(seg, 0, 2, good)
        os.pwrite(seg.fd, b"\x06\x00\x00\x01", seg.layout.buffer_offset(0))
    res = seg.inspect()
    assert res.snapshot.state == {"good": 1}, res
    assert res.problems and res.problems[0].startswith("buffer 0")


def test_both_bad_gives_none_with_reasons(seg):
    _forge(seg, 0, 2, b"\xc1")
    _forge(seg, 1, 1, msgpack.packb({"a": 1}), crc=1)
    res = seg.inspect()
    assert res.snapshot is None and len(res.problems) == 2


def test_newest_valid_wins(seg):
    _forge(seg, 1, 5, msgpack.packb({"n": 5}))
    _forge(seg, 0, 4, msgpack.packb({"n": 4}))
    assert seg.read().state == {"n": 5}
    _forge(seg, 0, 6, msgpack.packb({"n": 6}))
    assert seg.read().state == {"n": 6}
    seg.store({"n": 7})                # a writer that never read continues after 6
    assert seg.read().number == 7


def test_random_scribbles_never_crash_or_hang(seg):
    """Whatever a device leaves, read() returns a valid snapshot or None
    quickly, and once a valid snapshot is stored again it is found."""
    rng = random.Random(1234)
    size = seg.layout.inflight_offset
    base = seg.layout.buffer_offset(0)
    slowest = 0.0
    for it in range(400):
        seg.store(blk_state(it), AccessRecord(it + 1, it, 0))
        for _ in range(rng.randint(1, 6)):
            kind = rng.random()
            if kind < 0.4:       # random bytes anywhere in the buffers
                off = rng.randrange(base, size)
                os.pwrite(seg.fd, rng.randbytes(rng.randint(1, 64)), off)
            elif kind < 0.7:     # a header field
                off = seg.layout.buffer_offset(rng.randint(0, 1)) + rng.choice((0, 8, 16, 24, 28, 32))
                os.pwrite(seg.fd, rng.randbytes(rng.choice((1, 4, 8))), off)
            else:                # a forged buffer with a correct CRC over random msgpack-ish bytes
                body = rng.randbytes(rng.randint(0, 200))
                if rng.random() < 0.5:
                    body = b"\x81\xa1a" + body
                _forge(seg, rng.randint(0, 1), rng.randint(1, 1 << 20), body)
        t0 = time.perf_counter()
        res = seg.inspect()
        slowest = max(slowest, time.perf_counter() - t0)
        if res.snapshot is not None:
            assert isinstance(res.snapshot.state, dict)
    assert slowest < 1.0
    seg.store({"final": True})
    assert seg.read().state == {"final": True}


def test_the_c_crc_is_zlibs():
    """The store's checksum (ipc/_slots.c) is the one the reader checks
    with zlib: every length around the 8-byte steps and through the
    carry-less multiplication's (64 bytes and more: 4-lane folds, then
    16-byte ones, then the tables for the rest), and a start value."""
    import os
    import zlib

    from ipc._slots_c import lib
    data = os.urandom(70000)
    for n in list(range(0, 20)) + list(range(60, 200)) + [255, 256, 257, 300, 4096, 65535, 70000]:
        assert lib.svs_crc32(0, data[:n], n) == zlib.crc32(data[:n])
        assert lib.svs_crc32(0x12345678, data[:n], n) == zlib.crc32(data[:n], 0x12345678)
