"""Fault plans on real KVM, each effect seen from a guest (issue 12 §3).

- ``access`` (tests/guests/fault_access.c on echo devices, both
  placements): all ones, a value, garbage on exactly the planned read, a
  dropped write, a late read;
- ``process`` (one echo device process per action, one run): crash, exit
  and hang at the 10th access fail that device and the VM goes on; hold_lock
  gets the holder killed by the lock watch; die_holding_lock is recovered
  through owner-died -- with restart=no the device is lost in every case,
  and the other devices keep working; with restart=on-failure crash,
  hold_lock and die_holding_lock are invisible to the guest (one restart
  each, the spent fault not fired again, a later fault still fired);
- virtio (tests/guests/fault_virtio.c, both placements): ``blk.*`` (IOERR,
  UNSUPP, lost and torn writes seen in the image, a corrupt read, a late
  request, a hung one), ``irq`` (lost, duplicated, late), ``queue.complete``
  (bad_id, bad_len and a duplicate reach the driver, which resets the
  device), ``rng.request`` (zeros, repeat, short), and a spurious interrupt
  from an ``access`` fault;
- byte streams: ``serial.tx`` and ``console.tx`` in the console output;
- determinism: probability faults on three devices, 20 runs with one seed
  give one trace digest, another seed another;
- the trace file, the closing summary, bad plans (status 2, one line) and
  bad ``fault-arm`` arguments; run-time arming through Machine.faults.
"""

from __future__ import annotations

import json
import statistics
import struct

import pytest

from devices.faults.plan import load_plan, loads_plan
from devices.faults.trace import read_trace, trace_digest
from tests.vmm.conftest import REPO, needs_kvm, vmm_run
from tests.vmm.test_virtio_blk import pattern      # the guests' byte pattern (virtio_blk.c, fault_virtio.c)
from vmm.config import parse_device_spec
from vmm.faults import check_plan, device_points
from vmm.machine import Machine
from vmm.outcome import Ending

pytestmark = needs_kvm

STATS = 0x80_0000
ONES32 = 0xFFFF_FFFF


def plan(text: str, specs: dict, seed: int | None = None):
    p = loads_plan(text, devices=device_points(specs), seed=seed)
    check_plan(p, specs)
    return p


def run_access(guest, specs: list[str], text: str, n: int = 20, lock_timeout: float = 1.0,
               access_timeout: float = 1.0):
    """fault_access.c over the echo devices ``specs`` (p0, p1, ... in
    order) under plan ``text``; (outcome, values[d][i], cycles[d][i],
    machine faults, failures by id)."""
    parsed = [parse_device_spec(s) for s in specs]
    by_name = {s.name: s for s in parsed}
    ports = {f"p{i}": dict(s.params)["pio"] for i, s in enumerate(parsed)}
    with Machine(memory=32 << 20, lock_timeout=lock_timeout, access_timeout=access_timeout) as m:
        m.faults.configure(plan(text, by_name))
        m.load_pvh(guest("fault_access"), " ".join(f"{k}={v}" for k, v in
                                                   {**ports, "n": n, "stats": hex(STATS)}.items()))
        for s in parsed:
            m.add_device(s)
        outcome = m.run(timeout=60)
        raw = struct.unpack(f"<{8 * 64}Q", m.memory.read(STATS, 8 * 64 * 8))
        failures = {m.endpoints[o].name: m.device_failure(o) for o in m.device_specs}
        failures["(recoveries)"] = m.registry.recoveries
        failures["(devices)"] = {d["id"]: d for d in m.query_devices()}
        records = m.faults.trace()
        statuses = m.faults.list()
    values = [[raw[d * 64 + 2 * i] for i in range(n)] for d in range(len(parsed))]
    cycles = [[raw[d * 64 + 2 * i + 1] for i in range(n)] for d in range(len(parsed))]
    return outcome, values, cycles, records, statuses, failures


ACCESS_PLAN = """
seed = 5
[[fault]]
name = "ones"
device = "e"
point = "access"
nth = 2
action = "ones"
[[fault]]
name = "value"
device = "e"
point = "access"
nth = 3
action = "value"
value = 0x1234
[[fault]]
name = "garbage"
device = "e"
point = "access"
nth = 4
action = "garbage"
[[fault]]
name = "drop"
device = "e"
point = "access"
nth = 6
action = "drop"
[[fault]]
name = "late"
device = "e"
point = "access"
nth = 16
action = "delay"
ms = 300
[[fault]]
name = "port-4-never"
device = "e"
point = "access"
every = 1
offset = [4, 7]
action = "ones"
"""


@pytest.mark.parametrize("placement", ["isolated", "inline"])
def test_access_faults_seen_by_the_guest(guest, placement):
    outcome, values, cycles, records, statuses, failures = run_access(
        guest, [f"echo,id=e,pio=0x2000,process={placement}"], ACCESS_PLAN, n=10)
    assert outcome.ending is Ending.POWER_OFF, str(outcome)
    v = values[0]
    garbage = next(r for r in records if r["fault"] == "garbage")
    g = int(garbage["detail"].rsplit(" ", 1)[1], 16)
    # reads are the access events 2, 4, 6 ... (write, read per round);
    # nth counts the fault's own matches: reads for ones/value/garbage, writes for drop
    expected = [0x1000 + i for i in range(10)]
    expected[1], expected[2], expected[3] = ONES32, 0x1234, g
    expected[5] = 0x1000 + 4            # the 6th write was dropped: the 5th's value stays
    assert v == expected
    assert failures["e"] is None
    # the late read took longer than all the others together (300 ms)
    assert cycles[0][7] > 10 * max(c for i, c in enumerate(cycles[0]) if i != 7)
    fired = sorted((r["fault"], r["event"]) for r in records if r["type"] == "fire")
    assert fired == [("drop", 11), ("garbage", 8), ("late", 16), ("ones", 4), ("value", 6)]
    by_name = {s["name"]: s for s in statuses}
    assert by_name["port-4-never"]["events"] == 0 and by_name["port-4-never"]["firings"] == 0
    assert by_name["ones"]["events"] == 10 and by_name["ones"]["firings"] == 1
    assert by_name["drop"]["events"] == 10


PROCESS_ACTIONS = ["crash", "exit", "hang", "hold_lock", "die_holding_lock"]


def test_process_faults_lose_only_their_device(guest, caplog):
    # restart=no: a process fault ends the device for good here (with the
    # default on-failure it would be started again: tests/vmm/test_restart.py)
    specs = [f"echo,id={a.replace('_', '-')},pio={0x2000 + 0x100 * i:#x},restart=no"
             for i, a in enumerate(PROCESS_ACTIONS)]
    specs.append("echo,id=bystander,pio=0x2800")
    text = "".join(f'[[fault]]\ndevice = "{a.replace("_", "-")}"\npoint = "process"\nnth = 10\naction = "{a}"\n'
                   for a in PROCESS_ACTIONS)
    outcome, values, _cycles, records, _s, failures = run_access(guest, specs, text, n=8, lock_timeout=0.5,
                                                                 access_timeout=2.0)
    assert outcome.ending is Ending.POWER_OFF, str(outcome)
    for d, action in enumerate(PROCESS_ACTIONS):
        name = action.replace("_", "-")
        # accesses 1-9 served (write, read: rounds 0-3 and the 5th write), the 10th dies
        # -- or, hold_lock, is served by a process whose main thread keeps the
        # lock (among six sandboxed devices, each main thread's id in its own
        # pid namespace is its own) and is killed at the next access, when the
        # vCPU's wait for the lock times out
        served = 5 if action == "hold_lock" else 4
        assert values[d][:served] == [0x1000 + i for i in range(served)], (action, values[d])
        assert values[d][served:] == [ONES32] * (8 - served), (action, values[d])
        assert failures[name], action
        fire = [r for r in records if r["device"] == name and r["type"] == "fire"]
        assert [(r["point"], r["event"], r["action"]) for r in fire] == [("process", 10, action)], records
    assert values[len(PROCESS_ACTIONS)] == [0x1000 + i for i in range(8)]
    assert failures["bystander"] is None
    assert "held the registry lock" in failures["hold-lock"]
    # the device is not pid 1 of its pid namespace (a reaper is): its own SIGKILL kills it
    assert "no answer" in failures["hang"] and "SIGKILL" in failures["crash"], failures["crash"]
    assert "status 1" in failures["exit"]
    assert failures["(recoveries)"] >= 2      # the lock of the killed holder and of the one that died


RESTARTED_ACTIONS = ["crash", "hold_lock", "die_holding_lock"]


def test_process_faults_with_restart_are_guest_invisible(guest):
    # restart=on-failure (the default): the device dies (or, hold_lock, is
    # killed by the lock watch) at its 10th access, is started once again
    # and serves the access it died in; the guest sees every value right.
    # The new process gets the plan less what fired: the nth=10 fault is
    # spent and does not fire at the new process's 10th access (no loop).
    specs = [f"echo,id={a.replace('_', '-')},pio={0x2000 + 0x100 * i:#x},restart=on-failure"
             for i, a in enumerate(RESTARTED_ACTIONS)]
    text = "".join(f'[[fault]]\ndevice = "{a.replace("_", "-")}"\npoint = "process"\nnth = 10\naction = "{a}"\n'
                   for a in RESTARTED_ACTIONS)
    # and one that is still to fire when "crash" dies: the new process gets it
    # (its numbering begins again: the new process's 7th read, of round 10,
    # its 13th access -- its first is the read of round 4 the old one died in)
    text += '[[fault]]\nname = "later"\ndevice = "crash"\npoint = "access"\ndir = "read"\nnth = 7\naction = "ones"\n'
    outcome, values, _cycles, records, statuses, failures = run_access(
        guest, specs, text, n=12, lock_timeout=0.5, access_timeout=2.0)
    assert outcome.ending is Ending.POWER_OFF, str(outcome)
    devices = failures["(devices)"]
    for d, action in enumerate(RESTARTED_ACTIONS):
        name = action.replace("_", "-")
        expected = [0x1000 + i for i in range(12)]
        if action == "crash":
            expected[10] = ONES32
        assert values[d] == expected, (action, values[d])
        assert failures[name] is None, (action, failures[name])
        assert devices[name]["restarts"] == 1, (action, devices[name])
        fire = [r for r in records if r["device"] == name and r["type"] == "fire" and r["fault"] != "later"]
        assert [(r["point"], r["event"], r["action"]) for r in fire] == [("process", 10, action)], records
    later = [r for r in records if r["type"] == "fire" and r["fault"] == "later"]
    assert [(r["device"], r["event"]) for r in later] == [("crash", 13)], later
    assert "held the registry lock" in devices["hold-lock"]["last-cause"]
    assert failures["(recoveries)"] >= 1      # the lock the dying holder left (and the killed one's)
    # the restarted processes have nothing armed any more: the faults are spent
    assert [(s["device"], s["name"], s["firings"]) for s in statuses] == [("crash", "later", 1)], statuses


def test_process_faults_refused_inline():
    specs = {"e": parse_device_spec("echo,id=e,pio=0x2000,process=inline")}
    with pytest.raises(Exception, match=r'fault #1 "fault-1": key \'point\': device \'e\' runs inside the VMM'):
        plan('[[fault]]\ndevice = "e"\npoint = "process"\nnth = 1\naction = "crash"\n', specs)


VIRTIO_PLAN = """seed = 11
[[fault]]
name = "spurious"
device = "blk"
point = "access"
nth = 1
space = "mmio"
offset = 0x3800
dir = "read"
action = "irq"
vector = 1
[[fault]]
name = "w1-ioerr"
device = "blk"
point = "blk.write"
nth = 1
action = "ioerr"
[[fault]]
name = "w2-unsupp"
device = "blk"
point = "blk.write"
nth = 2
action = "unsupp"
[[fault]]
name = "f2-ioerr"
device = "blk"
point = "blk.flush"
nth = 2
action = "ioerr"
[[fault]]
name = "w3-lose"
device = "blk"
point = "blk.write"
nth = 3
action = "lose"
[[fault]]
name = "w4-torn"
device = "blk"
point = "blk.write"
nth = 4
action = "torn"
sectors = 1
[[fault]]
name = "r5-corrupt"
device = "blk"
point = "blk.read"
nth = 5
action = "corrupt"
bits = 3
[[fault]]
name = "r6-ioerr"
device = "blk"
point = "blk.read"
nth = 6
action = "ioerr"
[[fault]]
name = "irq-lose"
device = "blk"
point = "irq"
nth = 17
vector = 1
action = "lose"
[[fault]]
name = "irq-twice"
device = "blk"
point = "irq"
nth = 18
action = "duplicate"
[[fault]]
name = "irq-late"
device = "blk"
point = "irq"
nth = 19
action = "delay"
ms = 10
[[fault]]
name = "w7-late"
device = "blk"
point = "blk.write"
nth = 7
action = "delay"
ms = 300
[[fault]]
name = "c22-twice"
device = "blk"
point = "queue.complete"
nth = 22
action = "duplicate"
[[fault]]
name = "c23-bad-id"
device = "blk"
point = "queue.complete"
nth = 23
action = "bad_id"
[[fault]]
name = "w10-hang"
device = "blk"
point = "blk.write"
nth = 10
action = "hang"
[[fault]]
name = "r1-unsupp"
device = "blk"
point = "blk.read"
nth = 1
action = "unsupp"
[[fault]]
name = "f3-unsupp"
device = "blk"
point = "blk.flush"
nth = 3
action = "unsupp"
[[fault]]
name = "r7-late"
device = "blk"
point = "blk.read"
nth = 7
action = "delay"
ms = 300
[[fault]]
name = "f7-late"
device = "blk"
point = "blk.flush"
nth = 7
action = "delay"
ms = 300
[[fault]]
name = "rng2-repeat"
device = "rng"
point = "rng.request"
nth = 2
action = "repeat"
[[fault]]
name = "rng3-zeros"
device = "rng"
point = "rng.request"
nth = 3
action = "zeros"
[[fault]]
name = "rng4-short"
device = "rng"
point = "rng.request"
nth = 4
action = "short"
bytes = 4
[[fault]]
name = "rng5-bad-len"
device = "rng"
point = "queue.complete"
nth = 5
action = "bad_len"
"""
SECTOR, C = 512, 4
BASE = 64
TSC_HZ = 2.0e9          # a lower bound of this machine's TSC rate (2.6 GHz), for "at least N ms"


@pytest.fixture(scope="session")
def virtio_guest(guest_cache):
    from vmm import guests
    return guests.build([REPO / "tests" / "guests" / "fault_virtio.c", guests.HERE / "virtio.c",
                         guests.HERE / "pci.c"], guest_cache)


def signed(v: int) -> int:
    return v - (1 << 64) if v >> 63 else v


@pytest.mark.parametrize("placement", ["isolated", "inline"])
def test_virtio_faults_seen_by_the_guest(virtio_guest, tmp_path, placement):
    image = tmp_path / "disk.img"
    image.write_bytes(b"\x5a" * (2048 * SECTOR))
    specs = {s.name: s for s in (parse_device_spec(f"virtio-blk,id=blk,path={image},process={placement}"),
                                 parse_device_spec(f"virtio-rng,id=rng,process={placement}"))}
    with Machine(memory=32 << 20) as m:
        m.faults.configure(plan(VIRTIO_PLAN, specs))
        m.load_pvh(virtio_guest, f"stats={STATS:#x} base={BASE} seed=1 settle=150000000 timeout=5000000000")
        for s in specs.values():
            m.add_device(s)
        outcome = m.run(timeout=90)
        raw = struct.unpack("<512Q", m.memory.read(STATS, 4096))
        rng_bytes = m.memory.read(STATS + 4096, 16 * 8)
        records = m.faults.trace()
        failed = {name: m.device_failure(o) for o, name in ((o, s.name) for o, s in m.device_specs.items())}
    assert outcome.ending is Ending.POWER_OFF, str(outcome)
    assert failed == {"blk": None, "rng": None}
    recs = {raw[8 * i + 7]: [signed(raw[8 * i])] + list(raw[8 * i + 1:8 * i + 7]) for i in range(raw[511])}
    W, F, R = 1, 2, 3
    # each record: result, cycles, irq latency, irqs, extra used elements, used length, bytes differing

    def rec(what: int, rnd: int = 0) -> list[int]:
        return recs[what | rnd << 4]

    ok = [rec(k, r) for r in (2, 3, 4, 6) for k in (W, F)]

    # the median: one normal interrupt late under load (the device process
    # descheduled for ms) must not make the 10 ms delay look small
    normal_lat = statistics.median(r[2] for r in ok)
    # the spurious interrupt of the access fault, on a read that raises none
    assert rec(0x200)[3] == 1
    # blk.write ioerr / unsupp, blk.flush ioerr: the statuses, and nothing in the image
    assert rec(W, 0)[0] == 1 and rec(F, 0)[0] == 0 and rec(R, 0)[0] == 2 and rec(R, 0)[6] > 0
    assert rec(W, 1)[0] == 2 and rec(F, 1)[0] == 1 and rec(F, 2)[0] == 2
    # lose: acknowledged, read back differs, missing from the image; torn: the first sector only
    assert rec(W, 2)[0] == 0 and rec(R, 2)[6] > 1000
    assert rec(W, 3)[0] == 0 and 0 < rec(R, 3)[6] <= (C - 1) * SECTOR
    data = image.read_bytes()

    def sectors(rnd: int) -> bytes:
        at = (BASE + rnd * C) * SECTOR
        return data[at:at + C * SECTOR]

    for rnd in (0, 1, 2):
        assert sectors(rnd) == b"\x5a" * (C * SECTOR), rnd
    assert sectors(3)[:SECTOR] == pattern(1 + 3, C * SECTOR)[:SECTOR]
    assert sectors(3)[SECTOR:] == b"\x5a" * ((C - 1) * SECTOR)
    # corrupt: 3 bits flipped in what the guest read, the image intact
    assert rec(R, 4)[0] == 0 and 1 <= rec(R, 4)[6] <= 3
    assert sectors(4) == pattern(1 + 4, C * SECTOR)
    # irq: the write's interrupt lost, the flush's twice, the read's (an IOERR) 10 ms late
    assert rec(W, 5)[2:4] == [0, 0]
    assert rec(F, 5)[3] == 2
    assert rec(R, 5)[0] == 1 and rec(R, 5)[3] == 1
    assert rec(R, 5)[2] > max(0.010 * TSC_HZ * 0.8, 5 * normal_lat)
    # requests 300 ms late: write, flush, read
    for kind in (W, F, R):
        assert rec(kind, 6)[0] == 0 and rec(kind, 6)[1] > 0.3 * TSC_HZ, kind
    assert rec(R, 6)[6] == 0
    assert sectors(6) == pattern(1 + 6, C * SECTOR)
    # queue.complete: a duplicate completion, then a used element naming another descriptor:
    # the driver sees both and resets the device each time; then a write that never completes
    assert rec(W, 7)[0] == 0 and rec(W, 7)[4] == 1      # one extra used element
    assert rec(W, 8)[0] == -8                # VIRTIO_ERING
    assert rec(W, 9)[0] == -7                # VIRTIO_ETIMEOUT: hung
    assert (F | 7 << 4) not in recs and (W | 10 << 4) not in recs
    # rng: random, the same again (repeat), zeros, 4 bytes (short), a length past the buffer
    # (bad_len; the driver resets), random again
    got = [rec(0x100, i)[0] for i in range(6)]
    assert got == [16, 16, 16, 4, 16 + (16 << 20), 16]
    chunk = [rng_bytes[16 * i:16 * i + 16] for i in range(6)]
    assert chunk[1] == chunk[0] and chunk[0] != bytes(16) and chunk[2] == bytes(16)
    assert chunk[3][4:] == b"\xee" * 12 and chunk[5] not in (bytes(16), chunk[0])
    fired = [(r["device"], r["fault"], r["point"], r["event"]) for r in records if r["type"] == "fire"]
    assert sorted(f[1] for f in fired) == sorted(n for n in _names(VIRTIO_PLAN))
    assert ("blk", "irq-lose", "irq", 17) in fired and ("blk", "w10-hang", "blk.write", 10) in fired


@pytest.mark.parametrize("placement", ["isolated", "inline"])
@pytest.mark.parametrize("point", ["blk.read", "blk.flush"])
def test_blk_hang_on_read_and_flush(virtio_guest, tmp_path, placement, point):
    image = tmp_path / "disk.img"
    image.write_bytes(b"\x5a" * (2048 * SECTOR))
    specs = {"blk": parse_device_spec(f"virtio-blk,id=blk,path={image},process={placement}"),
             "rng": parse_device_spec(f"virtio-rng,id=rng,process={placement}")}
    text = f'[[fault]]\ndevice = "blk"\npoint = "{point}"\nnth = 1\naction = "hang"\n'
    with Machine(memory=32 << 20) as m:
        m.faults.configure(plan(text, specs))
        m.load_pvh(virtio_guest, f"stats={STATS:#x} rounds=2 rng=1 settle=1000000 timeout=3000000000")
        for s in specs.values():
            m.add_device(s)
        outcome = m.run(timeout=60)
        raw = struct.unpack("<512Q", m.memory.read(STATS, 4096))
    assert outcome.ending is Ending.POWER_OFF, str(outcome)
    recs = [(raw[8 * i + 7], signed(raw[8 * i])) for i in range(raw[511])]
    hung = 2 if point == "blk.flush" else 3
    # probe, the write, (the flush,) the hung request; then the rng request: the VM goes on
    assert recs[1] == (1, 0) and recs[hung] == (hung, -7) and recs[hung + 1] == (0x100, 16), recs


def _names(text: str) -> list[str]:
    return [line.split('"')[1] for line in text.splitlines() if line.startswith("name = ")]


# -- vmm run: the demo, the trace, replay, byte streams, bad plans ----------------

EXAMPLES = REPO / "examples" / "faults"


def test_demo_under_a_plan_fails_readably_and_replays(tmp_path):
    out, trace, again = tmp_path / "out.txt", tmp_path / "run.jsonl", tmp_path / "replay.jsonl"
    r = vmm_run("--serial", f"file:{out}", "--faults", str(EXAMPLES / "demo-blk-errors.toml"),
                "--fault-trace", str(trace), "--timeout", "60")
    assert r.returncode == 47, r.stderr        # test exit 23: (23 << 1) | 1
    assert "demo: check 23 failed: write: I/O error" in out.read_text()
    assert "vmm: faults: blk/demo-write-fails: 1 firing(s)" in r.stderr
    t = read_trace(trace)
    assert t.plan == load_plan(EXAMPLES / "demo-blk-errors.toml").digest and t.seed == 0
    assert [(f["device"], f["point"], f["event"], f["action"]) for f in t.firings] == [
        ("blk", "blk.write", 1, "ioerr")]
    r = vmm_run("--serial", f"file:{out}", "--fault-replay", str(trace), "--fault-trace", str(again),
                "--timeout", "60")
    assert r.returncode == 47, r.stderr
    assert "demo: check 23 failed: write: I/O error" in out.read_text()
    assert trace_digest(read_trace(again)) == trace_digest(t)


BYTES_PLAN = """
[[fault]]
name = "s-drop"
device = "serial0"
point = "serial.tx"
nth = 1
action = "drop"
[[fault]]
name = "s-twice"
device = "serial0"
point = "serial.tx"
nth = 3
action = "duplicate"
[[fault]]
name = "s-garbage"
device = "serial0"
point = "serial.tx"
nth = 5
action = "garbage"
[[fault]]
name = "c-twice"
device = "console"
point = "console.tx"
nth = 3
action = "duplicate"
[[fault]]
name = "c-garbage"
device = "console"
point = "console.tx"
nth = 1
action = "garbage"
[[fault]]
name = "c-drop"
device = "console"
point = "console.tx"
nth = 2
action = "drop"
"""


@pytest.mark.parametrize("placement", ["isolated", "inline"])
def test_byte_faults_in_the_console_output(guest_cache, tmp_path, placement):
    plan_file, out, trace = tmp_path / "bytes.toml", tmp_path / "out.txt", tmp_path / "t.jsonl"
    plan_file.write_text(BYTES_PLAN)
    if placement == "isolated":         # the demo as `vmm run` brings it (its devices in their processes)
        where: list[str] = []
    else:                               # the demo guest with the same devices inside the VMM
        from vmm import guests
        disk = tmp_path / "disk.img"
        disk.write_bytes(bytes(16 << 20))
        where = ["--guest", str(guests.demo(guest_cache))]
        for spec in ("virtio-rng,id=rng", f"virtio-blk,id=blk,serial=splitvmm-demo,path={disk}",
                     "virtio-console,id=console", "serial"):
            where += ["--device", f"{spec},process=inline"]
    r = vmm_run(*where, "--serial", f"file:{out}", "--faults", str(plan_file), "--fault-trace", str(trace),
                "--timeout", "60")
    assert r.returncode == 0, r.stderr
    text = out.read_bytes()
    firings = {f["fault"]: f for f in read_trace(trace).firings}

    def garbage(name: str) -> bytes:
        return bytes([int(firings[name]["detail"].rsplit(" ", 1)[1], 16)])

    # "s" lost, "l" twice, "t" replaced
    assert text.startswith(b"plli" + garbage("s-garbage") + b"vmm demo guest: "), text[:40]
    # "v" replaced, "i" lost, "r" twice
    assert garbage("c-garbage") + b"rrtio-console: hello from the splitvmm demo guest\n" in text


BAD_PLANS = {
    "unknown key": ('[[fault]]\ndevice = "e"\npoint = "access"\nnth = 1\naction = "ones"\ncolour = 1\n',
                    "fault #1 \"fault-1\": key 'colour': unknown key"),
    "action of another point": ('[[fault]]\ndevice = "e"\npoint = "access"\nnth = 1\naction = "ioerr"\n',
                                "key 'action': 'ioerr' is not an action of point 'access'"),
    "no such device": ('[[fault]]\ndevice = "blk"\npoint = "access"\nnth = 1\naction = "ones"\n',
                       "key 'device': no device 'blk'"),
    "two triggers": ('[[fault]]\ndevice = "e"\npoint = "access"\nnth = 1\nevery = 2\naction = "ones"\n',
                     "key 'every': two triggers at once"),
    "point the model lacks": ('[[fault]]\ndevice = "e"\npoint = "blk.write"\nnth = 1\naction = "ioerr"\n',
                              "key 'point': 'blk.write' is not a point of device 'e'"),
    "process inline": ('[[fault]]\ndevice = "e"\npoint = "process"\nnth = 1\naction = "crash"\n',
                       "key 'point': device 'e' runs inside the VMM"),
}


@pytest.mark.parametrize("case", sorted(BAD_PLANS))
def test_bad_plans_one_line_status_2(guest, tmp_path, case):
    text, message = BAD_PLANS[case]
    p = tmp_path / "bad.toml"
    p.write_text(text)
    r = vmm_run("--guest", str(guest("hello")), "--serial", "none", "--device", "echo,id=e,pio=0x2000,process=inline",
                "--faults", str(p))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"vmm: --faults {p}: ") and message in lines[0], r.stderr


def test_bad_replay_and_flag_combinations(guest, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"type":"header"}\n')
    r = vmm_run("--guest", str(guest("hello")), "--serial", "none", "--fault-replay", str(bad))
    assert r.returncode == 2 and "not a splitvmm-fault-trace header" in r.stderr
    r = vmm_run("--guest", str(guest("hello")), "--serial", "none", "--fault-seed", "3")
    assert r.returncode == 2 and "--fault-seed needs --faults" in r.stderr


# -- determinism ----------------------------------------------------------------------

PROBABILITY_PLAN = "".join(
    f'[[fault]]\nname = "{n}"\ndevice = "{d}"\npoint = "access"\nprobability = {p}\naction = "{a}"\n{extra}'
    for n, d, p, a, extra in (("e0-ones", "e0", 0.2, "ones", ""), ("e1-value", "e1", 0.3, "value", "value = 7\n"),
                              ("e2-garbage", "e2", 0.25, "garbage", "")))


def _probability_run(guest, seed: int, placement: str = "inline") -> tuple[str, int, tuple]:
    specs = [f"echo,id=e{i},pio={0x2000 + 0x100 * i:#x},process={placement}" for i in range(3)]
    parsed = [parse_device_spec(s) for s in specs]
    by_name = {s.name: s for s in parsed}
    with Machine(memory=32 << 20) as m:
        m.faults.configure(plan(PROBABILITY_PLAN, by_name, seed=seed))
        m.load_pvh(guest("fault_access"), f"p0=0x2000 p1=0x2100 p2=0x2200 n=16 stats={STATS:#x}")
        for s in parsed:
            m.add_device(s)
        outcome = m.run(timeout=60)
        assert outcome.ending is Ending.POWER_OFF, str(outcome)
        values = struct.unpack("<192Q", m.memory.read(STATS, 192 * 8))
        return m.faults.digest_of_trace(), len(m.faults.trace()), values[:32]


def test_same_seed_same_trace_other_seed_other_trace(guest):
    first, n, values = _probability_run(guest, 1234)
    assert n > 3                    # something fired on the three devices
    for _ in range(19):
        assert _probability_run(guest, 1234)[0] == first
    # the same decisions in device processes
    assert _probability_run(guest, 1234, "isolated")[0] == first
    assert _probability_run(guest, 99)[0] != first


# -- run-time control: Machine.faults, QMP fault-arm / fault-disarm / query-faults ---------

def test_fault_arm_at_run_time_and_bad_arguments(guest):
    from vmm.qmp import QmpError

    spec = parse_device_spec("echo,id=e,pio=0x2000")
    fired = []
    with Machine(memory=32 << 20) as m:
        m.events.subscribe(lambda ev: fired.append(ev.data) if ev.name == "FAULT_FIRED" else None)
        m.load_pvh(guest("fault_access"), f"p0=0x2000 n=4 stats={STATS:#x}")
        m.add_device(spec)
        for args, message in (
                ({"point": "access", "nth": 1, "action": "ones"}, "key 'device': missing"),
                ({"device": "nope", "point": "access", "nth": 1, "action": "ones"}, "no device 'nope'"),
                ({"device": "e", "point": "access", "nth": 0, "action": "ones"}, "key 'nth': must be in 1.."),
                ({"device": "e", "point": "access", "nth": 1, "action": "value"}, "key 'value': missing"),
                ({"device": "e", "point": "access", "nth": "1", "action": "ones"}, "must be an integer"),
                ({"device": "e", "point": "access", "nth": 1, "action": "ones", "ms": 5},
                 "a parameter of action 'delay'")):
            with pytest.raises(QmpError, match=message):
                m.qmp("fault-arm", **args)
        armed = m.qmp("fault-arm", device="e", point="access", nth=2, action="value", value=0xAB, name="v")
        assert armed["name"] == "v" and armed["dir"] == "read"
        with pytest.raises(QmpError, match="'v' is already armed"):
            m.qmp("fault-arm", device="e", point="access", nth=3, action="ones", name="v")
        m.faults.arm({"device": "e", "point": "access", "nth": 3, "action": "ones", "name": "gone"})
        assert m.faults.disarm("gone")["firings"] == 0
        with pytest.raises(QmpError, match="no fault 'gone' is armed"):
            m.qmp("fault-disarm", name="gone")
        outcome = m.run(timeout=60)
        assert outcome.ending is Ending.POWER_OFF, str(outcome)
        values = struct.unpack("<8Q", m.memory.read(STATS, 64))[::2]
        status = m.qmp("query-faults")
        records = m.faults.trace()
    assert values == (0x1000, 0xAB, 0x1002, 0x1003)
    assert [(s["name"], s["events"], s["firings"]) for s in status] == [("v", 4, 1)]
    assert [r["type"] for r in records] == ["arm", "arm", "disarm", "fire"]
    assert fired and fired[0]["fault"] == "v" and fired[0]["device"] == "e"


def test_vmm_ctl_fault_commands(guest, tmp_path):
    import os
    import subprocess
    import sys
    import time

    path = str(tmp_path / "api.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmm.cli", "run", "--guest", str(guest("spin")), "--api", path, "--serial", "none",
         "--timeout", "120", "--cmdline", "pio=0x1000 accesses=50", "--device", "echo,id=echo0,pio=0x1000"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def ctl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "vmm.cli", "ctl", path, *args], capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(path):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the control socket never appeared"
            time.sleep(0.02)
        r = ctl("fault-arm", "device=echo0", "point=access", "every=1000000", "action=value", "value=0x10",
                "offset=[0, 3]", "name=slow")
        assert r.returncode == 1 and "key 'value': must be an integer" in r.stderr   # 0x10 is not JSON
        r = ctl("fault-arm", "device=echo0", "point=access", "every=1000000", "action=value", "value=16",
                "offset=[0, 3]", "name=v16")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["offset"] == [0, 3] and json.loads(r.stdout)["dir"] == "read"
        r = ctl("--table", "query-faults")
        assert r.returncode == 0 and "v16" in r.stdout and "echo0" in r.stdout
        r = ctl("fault-disarm", "name=v16")
        assert r.returncode == 0 and json.loads(r.stdout)["name"] == "v16"
        r = ctl("fault-disarm", "name=v16")
        assert r.returncode == 1 and "no fault 'v16' is armed" in r.stderr
        assert ctl("quit").returncode == 0
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


RX_PLAN = """
[[fault]]
device = "{dev}"
point = "{point}"
nth = 2
action = "drop"
[[fault]]
device = "{dev}"
point = "{point}"
nth = 3
action = "duplicate"
[[fault]]
name = "g"
device = "{dev}"
point = "{point}"
nth = 4
action = "garbage"
"""


@pytest.mark.parametrize("placement", ["isolated", "inline"])
def test_serial_rx_faults_seen_by_the_guest(guest_cache, tmp_path, placement):
    from tests.vmm.test_serial import talk
    from vmm import guests

    serial_guest = guests.build([guests.HERE / "serial.c", REPO / "tests" / "guests" / "serial.c"], guest_cache,
                                name="serial")
    p = tmp_path / "rx.toml"
    p.write_text(RX_PLAN.format(dev="serial0", point="serial.rx"))
    extra = [] if placement == "isolated" else ["--device", "serial,process=inline"]
    trace = tmp_path / "t.jsonl"
    status, out, err = talk(serial_guest, b"ready\n", b"ab\x01c.", "--cmdline", "mode=echo", *extra,
                            "--faults", str(p), "--fault-trace", str(trace))
    assert status == 0, err
    g = next(f for f in read_trace(trace).firings if f["fault"] == "g")["detail"].rsplit(" ", 1)[1]
    # 'b' lost, 0x01 twice, 'c' replaced: what the guest received
    assert out == b"ready\n61 01 01 " + f"{int(g, 16):02x}".encode() + b" bye\n"


SERIAL_IRQ_PLAN = """
[[fault]]
name = "lost"
device = "serial0"
point = "irq"
nth = 1
action = "lose"
[[fault]]
name = "twice"
device = "serial0"
point = "irq"
nth = 2
action = "duplicate"
[[fault]]
name = "late"
device = "serial0"
point = "irq"
nth = 3
action = "delay"
ms = 300
"""


@pytest.mark.parametrize("placement", ["isolated", "inline"])
def test_serial_irq_faults_seen_by_the_guest(guest_cache, tmp_path, placement):
    from vmm import guests

    image = guests.build([guests.HERE / "serial.c", REPO / "tests" / "guests" / "fault_serial_irq.c"], guest_cache,
                         name="fault_serial_irq")
    p, out, trace = tmp_path / "irq.toml", tmp_path / "out.txt", tmp_path / "t.jsonl"
    p.write_text(SERIAL_IRQ_PLAN)
    extra = [] if placement == "isolated" else ["--device", "serial,process=inline"]
    r = vmm_run("--guest", str(image), *extra, "--serial", f"file:{out}", "--faults", str(p),
                "--fault-trace", str(trace), "--timeout", "60")
    assert r.returncode == 0, r.stderr
    rounds = {}
    for line in out.read_text().splitlines():
        if line.startswith("round "):
            _, n, _, irqs, _, first = line.split()
            rounds[int(n)] = (int(irqs), int(first))
    assert sorted(rounds) == [0, 1, 2, 3], out.read_text()
    # the 1st edge lost; the 2nd delivered twice; the 3rd 300 ms late; the 4th as usual
    assert rounds[0] == (0, 0)
    assert rounds[1][0] == 2
    assert rounds[2][0] == 1 and rounds[2][1] > 0.3 * TSC_HZ
    assert rounds[3][0] == 1 and rounds[3][1] < rounds[2][1]
    fired = sorted((f["fault"], f["event"]) for f in read_trace(trace).firings)
    assert fired == [("late", 3), ("lost", 1), ("twice", 2)]


@pytest.mark.parametrize("placement", ["isolated", "inline"])
def test_console_rx_faults_seen_by_the_guest(console_guest, tmp_path, placement):
    import threading
    from functools import partial

    from tests.vmm.test_virtio_console import client

    path = str(tmp_path / "console.sock")
    got: list[bytes] = []
    spec = parse_device_spec(f"virtio-console,id=con,socket={path},process={placement}")
    with Machine(memory=32 << 20) as m:
        m.faults.configure(plan(RX_PLAN.format(dev="con", point="console.rx"), {"con": spec}))
        m.load_pvh(console_guest, "")
        m.add_device(spec)
        t = threading.Thread(target=partial(client, path, got, lambda buf: buf.count(b"\n") >= 2), daemon=True)
        t.start()
        outcome = m.run(timeout=40)
        t.join(10)
        records = m.faults.trace()
    assert outcome.ending is Ending.POWER_OFF, str(outcome)
    g = bytes([int(next(r for r in records if r.get("fault") == "g")["detail"].rsplit(" ", 1)[1], 16)])
    # 'i' lost, 'n' twice, 'g' replaced: the line the guest read and sent back
    assert got == [b"hello\npnn" + g + b"\n"]


@pytest.mark.parametrize("placement", ["isolated", "inline"])
def test_a_users_own_point(guest, placement):
    text = ('[[fault]]\nname = "flip"\ndevice = "latch"\npoint = "latch.store"\nevery = 1\nvalue = 0x1003\n'
            'action = "invert"\n[[fault]]\nname = "one"\ndevice = "latch"\npoint = "access"\nnth = 6\n'
            'action = "ones"\n')
    outcome, values, _c, records, _s, failures = run_access(
        guest, [f"tests.vmm.fault_models:Latch,id=latch,pio=0x2000,process={placement}"], text, n=8)
    assert outcome.ending is Ending.POWER_OFF, str(outcome)
    expected = [0x1000 + i for i in range(8)]
    expected[3] = ~0x1003 & ONES32          # its own point: only the write of 0x1003 matched
    expected[5] = ONES32                    # the free access point: the 6th read (nth counts reads)
    assert values[0] == expected
    assert sorted(r["fault"] for r in records if r["type"] == "fire") == ["flip", "one"]
