"""virtio-blk's C loop passes over the requests no armed fault can take
(devices.blkring.FaultTable, counted in bulk): the same statuses, used
ring, event numbers, fault counts and firings as the Python path, which
asks the engine about every request -- with nth beyond a passed-over run,
sector spans hit at their edges, every/after with times, probability,
faults armed and disarmed between doorbells, and the in-flight record
hooked as in a device process."""

from __future__ import annotations

import random
import struct

import pytest

from devices import blkring
from devices.faults import FaultEngine, parse_fault, parse_plan
from devices.virtio import blk as vb
from devices.virtio.blk import VirtioBlk
from devices.virtio.virtqueue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from tests.devices.test_virtio import AVAIL, USED, notify, put_desc
from tests.devices.test_virtio_blk import DATA, HDR, SECTORS, STATUS, make, record_queue

POINTS = VirtioBlk.all_fault_points()


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(bytes(range(256)) * (SECTORS * 2))
    return p

PLANS = {
    "nth_beyond_runs": [{"name": "n3", "point": "blk.read", "nth": 3, "action": "ioerr"},
                        {"name": "n290", "point": "blk.read", "nth": 290, "action": "unsupp"},
                        {"name": "w-span", "point": "blk.write", "every": 2, "action": "ioerr",
                         "sector": [10, 20]}],
    "span_edges": [{"name": "lo-hi", "point": "blk.read", "after": 0, "action": "ioerr", "sector": [10, 20]},
                   {"name": "last", "point": "blk.read", "every": 3, "action": "unsupp", "sector": [63, 63]},
                   {"name": "w-first", "point": "blk.write", "after": 0, "times": 7, "action": "ioerr",
                    "sector": [0, 0]}],
    "every_after_times": [{"name": "e4", "point": "blk.read", "every": 4, "times": 6, "action": "ioerr"},
                          {"name": "a30", "point": "blk.write", "after": 30, "times": 9, "action": "unsupp"},
                          {"name": "e2-span", "point": "blk.read", "every": 2, "action": "unsupp",
                           "sector": [31, 32]}],
    "probability": [{"name": "p-span", "point": "blk.read", "probability": 0.5, "action": "ioerr",
                     "sector": [40, 50]},
                    {"name": "p-write", "point": "blk.write", "probability": 0.1, "action": "unsupp"}],
}
EDGES = [0, 1, 9, 10, 11, 19, 20, 21, 30, 31, 32, 33, 39, 40, 50, 51, 62, 63]


def batches(seed: int, n: int = 160, per_batch: int = 5) -> list[list[tuple[int, int]]]:
    """``n`` batches of 1 to ``per_batch`` reads and writes (3 descriptors
    each: 5 fit a queue of 16)."""
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        out.append([(rnd.choice((vb.VIRTIO_BLK_T_IN, vb.VIRTIO_BLK_T_IN, vb.VIRTIO_BLK_T_OUT)),
                     rnd.choice(EDGES) if rnd.random() < 0.4 else rnd.randrange(SECTORS))
                    for _ in range(rnd.randint(1, per_batch))])
    return out


def serve(image, monkeypatch, c_path: bool, faults: list[dict], plan_batches, *, recorded: bool = False,
          arm_at: dict[int, dict] | None = None, disarm_at: dict[int, str] | None = None, qsize: int = 16) -> dict:
    """Serve the batches (one doorbell each) under the faults: what the
    guest saw and what the engine counted."""
    monkeypatch.setattr(blkring, "AVAILABLE", c_path)
    skipped = []
    if c_path:
        skip = FaultEngine.skip
        monkeypatch.setattr(FaultEngine, "skip", lambda self, p, n: skipped.append(n) or skip(self, p, n))
    dev, ram = make(image, qsize=qsize)
    release = None
    if recorded:
        _hook, _rec, release = record_queue(dev)
    records: list[dict] = []
    plan = parse_plan({"fault": [{"device": "blk", **f} for f in faults]}, devices={"blk": POINTS})
    engine = FaultEngine("blk", plan.for_device("blk"), seed=11, points=POINTS, sink=records.append)
    dev.attach_faults(engine)
    statuses, avail = [], 0
    try:
        for b, batch in enumerate(plan_batches):
            if arm_at and b in arm_at:
                engine.arm(parse_fault({"device": "blk", **arm_at[b]}, devices={"blk": POINTS}))
            if disarm_at and b in disarm_at:
                engine.disarm(disarm_at[b])
            for k, (rtype, sector) in enumerate(batch):
                hdr, data = HDR + 0x20 * k, DATA + 0x200 * k
                ram.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
                dflag = VIRTQ_DESC_F_WRITE if rtype == vb.VIRTIO_BLK_T_IN else 0
                for i, (a, n, f) in enumerate(((hdr, 16, VIRTQ_DESC_F_NEXT), (data, 512, dflag | VIRTQ_DESC_F_NEXT),
                                               (STATUS + k, 1, VIRTQ_DESC_F_WRITE))):
                    put_desc(ram, 3 * k + i, a, n, f, 3 * k + i + 1)
                ram.write_int(AVAIL + 4 + 2 * (avail % qsize), 2, 3 * k)
                avail += 1
            ram.write(STATUS, b"\xee" * len(batch))
            ram.write_int(AVAIL + 2, 2, avail & 0xFFFF)
            notify(dev)
            assert ram.read_int(USED + 2, 2) == avail & 0xFFFF       # all completed
            statuses.append(ram.read(STATUS, len(batch)))
        used = [struct.unpack("<II", ram.read(USED + 4 + 8 * i, 8)) for i in range(qsize)]
        return {"statuses": statuses, "used": used,
                "faults": [(s.fault.name, s.events, s.firings, s.shadowed) for s in engine.query()],
                "events": {p: engine.events(p) for p in ("blk.read", "blk.write")},
                "fired": [(r["fault"], r["point"], r["event"]) for r in records if r["type"] == "fire"],
                "skipped": sum(skipped)}
    finally:
        dev.stop()
        if release is not None:
            release()


needs_c = pytest.mark.skipif(not blkring.AVAILABLE, reason="devices._blkring_c is not built (make install)")


def same(c: dict, py: dict) -> None:
    assert py["skipped"] == 0
    for key in ("statuses", "used", "faults", "events", "fired"):
        assert c[key] == py[key], key


@needs_c
@pytest.mark.parametrize("plan", PLANS)
def test_c_preselection_counts_and_fires_as_the_python_path(image, monkeypatch, plan):
    work = batches(5)
    c = serve(image, monkeypatch, True, PLANS[plan], work)
    py = serve(image, monkeypatch, False, PLANS[plan], work)
    same(c, py)
    requests = sum(len(b) for b in work)
    assert c["events"]["blk.read"] + c["events"]["blk.write"] == requests
    assert c["fired"]                                       # the plans do fire
    if plan != "probability":
        assert c["skipped"] > requests // 3                 # and C did pass over requests
    if plan == "nth_beyond_runs":
        assert ("n290", "blk.read", 290) in c["fired"]      # the 290th read, past runs passed over


@needs_c
def test_c_preselection_with_the_inflight_record_and_arms_between_doorbells(image, monkeypatch):
    """Faults armed and disarmed while requests run (QMP fault-arm), with
    the in-flight record kept by the C loop: each arm counts only the
    events after it, the same as in Python."""
    work = batches(9, n=240, per_batch=2)          # the record's queue holds 8: two requests
    arms = {10: {"name": "late-nth", "point": "blk.read", "nth": 12, "action": "ioerr"},
            20: {"name": "late-span", "point": "blk.write", "every": 1, "action": "unsupp", "sector": [62, 63]},
            40: {"name": "late-every", "point": "blk.write", "every": 5, "action": "ioerr"}}
    disarms = {30: "late-nth", 50: "n3"}
    kw = dict(recorded=True, arm_at=arms, disarm_at=disarms, qsize=8)
    c = serve(image, monkeypatch, True, PLANS["nth_beyond_runs"][:1], work, **kw)
    py = serve(image, monkeypatch, False, PLANS["nth_beyond_runs"][:1], work, **kw)
    same(c, py)
    assert {f[0] for f in c["fired"]} >= {"n3", "late-nth", "late-span", "late-every"}
    assert c["skipped"] > 0


@needs_c
def test_a_wrong_quiet_run_is_refused_not_passed_over(image, monkeypatch):
    """If the C table said more events were quiet than the engine allows
    (a bug), handing them over raises instead of silently losing a firing."""
    from devices.faults import FaultError

    monkeypatch.setattr(blkring, "AVAILABLE", True)
    fill = blkring.FaultTable.fill

    def generous(self, engine):
        fill(self, engine)
        self._points[0].quiet = 2**64 - 1            # every read "quiet"
    monkeypatch.setattr(blkring.FaultTable, "fill", generous)
    with pytest.raises(FaultError, match="passed over"):
        serve(image, monkeypatch, True, [{"name": "n2", "point": "blk.read", "nth": 2, "action": "ioerr"}],
              [[(vb.VIRTIO_BLK_T_IN, 1), (vb.VIRTIO_BLK_T_IN, 2), (vb.VIRTIO_BLK_T_IN, 3)]])
