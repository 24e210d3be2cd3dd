"""Fault plans on real KVM, each effect seen from a guest (issue 12 §3).

- ``access`` (tests/guests/fault_access.c on echo devices, both
  placements): all ones, a value, garbage on exactly the planned read, a
  dropped write, a late read;
- ``process`` (one echo device process per action, one run): crash, exit
  and hang at the 10th access fail that device and the VM goes on; hold_lock
  gets the holder killed by the lock watch; die_holding_lock is recovered
  through owner-died -- with today's restart-less VMM the device is lost
  in every case, and the other devices keep working;
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
import struct

import pytest

from devices.faults.plan import loads_plan
from devices.faults.trace import read_trace, trace_digest
from tests.vmm.conftest import REPO, needs_kvm, vmm_run
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
    specs = [f"echo,id={a.replace('_', '-')},pio={0x2000 + 0x100 * i:#x}" for i, a in enumerate(PROCESS_ACTIONS)]
    specs.append("echo,id=bystander,pio=0x2800")
    text = "".join(f'[[fault]]\ndevice = "{a.replace("_", "-")}"\npoint = "process"\nnth = 10\naction = "{a}"\n'
                   for a in PROCESS_ACTIONS)
    outcome, values, _cycles, records, _s, failures = run_access(guest, specs, text, n=8, lock_timeout=0.5)
    assert outcome.ending is Ending.POWER_OFF, str(outcome)
    for d, action in enumerate(PROCESS_ACTIONS):
        name = action.replace("_", "-")
        # accesses 1-9 served (write, read: rounds 0-3 and the 5th write), the 10th dies
        # -- or, hold_lock, is served by a process that keeps the lock and is
        # killed at the next access, when the vCPU's wait for the lock times out
        served = 5 if action == "hold_lock" else 4
        assert values[d][:served] == [0x1000 + i for i in range(served)], (action, values[d])
        assert values[d][served:] == [ONES32] * (8 - served), (action, values[d])
        assert failures[name], action
        fire = [r for r in records if r["device"] == name and r["type"] == "fire"]
        assert [(r["point"], r["event"], r["action"]) for r in fire] == [("process", 10, action)], records
    assert values[len(PROCESS_ACTIONS)] == [0x1000 + i for i in range(8)]
    assert failures["bystander"] is None
    assert "held the registry lock" in failures["hold-lock"]
    assert "no answer" in failures["hang"] and "SIGKILL" in failures["crash"]
    assert "status 1" in failures["exit"]
    assert failures["(recoveries)"] >= 2      # the lock of the killed holder and of the one that died


def test_process_faults_refused_inline():
    specs = {"e": parse_device_spec("echo,id=e,pio=0x2000,process=inline")}
    with pytest.raises(Exception, match=r'fault #1 "fault-1": key \'point\': device \'e\' runs inside the VMM'):
        plan('[[fault]]\ndevice = "e"\npoint = "process"\nnth = 1\naction = "crash"\n', specs)
