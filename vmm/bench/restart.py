"""Restart cost of a spawned device: ``python -m vmm.bench.restart`` prints JSON.

A real guest (``tests/guests/restart_echo.c``, ring 3) keeps using the
``echo`` device in its own process, checking every value and the exact
access count, while the host, in the same run:

* SIGKILLs the device (``--kills`` times, each once a warm spare is up,
  and again with ``spare`` off): ``kill_to_serving_ms`` is the time from
  ``kill(2)`` to the new process serving (the endpoint's
  DEVICE_RESTARTED), ``guest_pause_ms`` the longest time one guest access
  waited across that restart;
* asks for live restarts (QMP ``device-restart``, ``--live`` times):
  ``pause_ms`` is the time accesses were held back;
* where the time of a cold start goes: the interpreter alone, and the
  imports a device process makes (``python -X importtime``), measured by
  starting them as processes.

Targets (issue 10 §7): spawned auto-restart median <= 100 ms, live
device-restart <= 50 ms.  The nested PVM host is shared and slow: the
figures carry the load average before and after; quote the same run's
ratios.  The virtio-blk cost of the state segment (4 KiB QD1, state=on
against state=off, interleaved) is ``python -m vmm.bench.state_cost``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from ipc import Bus
from vmm import guests
from vmm.config import parse_device_spec
from vmm.machine import Machine
from vmm.outcome import Ending
from vmm.remote import RemoteEndpoint

REPO = pathlib.Path(__file__).resolve().parents[2]
GUEST = REPO / "tests" / "guests" / "restart_echo.c"
PIO, MMIO, STOP, STATS = 0x1000, 0xD000_0000, 0x3F0, 0x20_0000


def _summary(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    return {"n": len(values), "median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3)}


def _wait(cond, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark condition not met in time")
        time.sleep(0.001)


def restarts(elf: pathlib.Path, kills: int, live: int, spare: bool, gap: float) -> dict:
    """One VM: ``kills`` SIGKILLs, then ``live`` device-restarts."""
    kill_ms: list[float] = []
    pause_ms: list[float] = []
    live_ms: list[float] = []
    errors: list[str] = []
    with Machine(memory=32 << 20, vcpus=1) as m:
        m.remote_options = dataclasses.replace(m.remote_options, spare=spare)
        m.load_pvh(elf, f"pio={PIO:#x} mmio={MMIO:#x} stop={STOP:#x} stats={STATS:#x}")
        ep = m.add_device(parse_device_spec(f"echo,id=e0,pio={PIO:#x},mmio={MMIO:#x},restart_burst=1000"))
        assert isinstance(ep, RemoteEndpoint)   # echo with the default placement: its own process
        memory = m.memory
        assert memory is not None
        restarted = threading.Event()
        m.events.subscribe(lambda e: restarted.set() if e.name == "DEVICE_RESTARTED" else None)
        done = threading.Event()
        m.add_handler(Bus.PIO, STOP, 1, read=lambda v, o, s: 1 if done.is_set() else 0)

        def drive() -> None:
            try:
                for _ in range(kills):
                    time.sleep(gap)             # the spare is up and idle by then
                    restarted.clear()
                    ep.longest_wait = 0.0
                    t0 = time.monotonic()
                    os.kill(ep.pid, signal.SIGKILL)
                    if not restarted.wait(30):
                        raise TimeoutError("no restart")
                    kill_ms.append((time.monotonic() - t0) * 1000)
                    seen = memory.read_u64(STATS)
                    _wait(lambda s=seen: memory.read_u64(STATS) > s + 10, 30)
                    pause_ms.append(ep.longest_wait * 1000)
                for _ in range(live):
                    time.sleep(gap)
                    live_ms.append(m.qmp("device-restart", id="e0")["pause-ms"])
            except Exception as e:
                errors.append(repr(e))
            finally:
                done.set()

        t = threading.Thread(target=drive, daemon=True)
        t.start()
        outcome = m.run(timeout=60 + (kills + live) * (gap + 10))
        t.join(10)
        made, count = memory.read_u64(STATS), memory.read_u64(STATS + 16)
    ok = outcome.ending is Ending.POWER_OFF and not errors and made == count
    return {"spare": spare, "ok": ok, "outcome": str(outcome), "errors": errors, "accesses": made,
            "kill_to_serving_ms": _summary(kill_ms), "guest_pause_ms": _summary(pause_ms),
            "device_restart_pause_ms": _summary(live_ms)}


def cold_start() -> dict:
    """Where a cold device process's start goes: interpreter, imports."""
    def timed(args: list[str]) -> float:
        t0 = time.monotonic()
        subprocess.run([sys.executable, *args], check=True, capture_output=True)
        return (time.monotonic() - t0) * 1000

    bare = [timed(["-c", "pass"]) for _ in range(5)]
    imports = [timed(["-c", "import devserver.runtime, devices.kinds; devices.kinds.kinds()"]) for _ in range(5)]
    out = subprocess.run([sys.executable, "-X", "importtime", "-c",
                          "import devserver.runtime, devices.kinds; devices.kinds.kinds()"],
                         capture_output=True, text=True).stderr
    top = []
    for line in out.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if m and len(m.group(3)) <= 3:          # top-level and first-level imports
            top.append((int(m.group(2)), m.group(4)))
    top.sort(reverse=True)
    return {"interpreter_ms": _summary(bare), "interpreter_and_imports_ms": _summary(imports),
            "largest_imports_us": [{"module": n, "cumulative_us": us} for us, n in top[:8]]}


def state_cost(iterations: int = 50_000) -> dict:
    """The device-side cost of the state segment, in the device's own code:
    the inflight record per virtio request (devserver.persist.QueueRecord,
    a pop and a completion) and a snapshot store per access (a virtio-blk
    sized snapshot, changed and unchanged), best of five."""
    from devserver.persist import QueueRecord
    from ipc.state import AccessRecord, StateSegment

    with StateSegment.create(64 * 1024, (128,)) as seg:
        rec = QueueRecord(seg.queue(0))
        rec.clear()
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter_ns()
            used = 0
            for i in range(iterations):
                rec.popped(0, i % 128, 0)
                used = (used + 1) & 0xFFFF
                rec.pushed(0, i % 128, used)
            best = min(best, (time.perf_counter_ns() - t0) / iterations)
        state: dict[str, Any] = {"transport": {"isr": 0, "queue_select": 0}, "core": {"queues": [
            {"size": 128, "desc": 0x10000, "driver": 0x20000, "device": 0x30000, "last_avail": 0, "used_idx": 0}]},
            "config": bytes(256), "msix": [[0xFEE00000, 0x4021, 0] for _ in range(8)]}
        store = unchanged = float("inf")
        for _ in range(5):
            t0 = time.perf_counter_ns()
            for i in range(iterations // 10):
                state["core"]["queues"][0]["used_idx"] = i
                seg.store(state, AccessRecord(i + 1, i, 0), only_if_changed=True)
            store = min(store, (time.perf_counter_ns() - t0) / (iterations // 10))
            t0 = time.perf_counter_ns()
            for i in range(iterations // 10):
                seg.store(state, AccessRecord(i + 1, i, 0), only_if_changed=True)
            unchanged = min(unchanged, (time.perf_counter_ns() - t0) / (iterations // 10))
    return {"inflight_per_request_us": round(best / 1000, 3), "snapshot_store_us": round(store / 1000, 3),
            "snapshot_unchanged_us": round(unchanged / 1000, 3),
            "note": "virtio-blk's data path (ioeventfd doorbell) pays only the inflight record; "
                    "compare with us_per_request of python -m vmm.bench.virtio_blk"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vmm.bench.restart", description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--live", type=int, default=10)
    ap.add_argument("--gap", type=float, default=0.8, help="seconds between restarts (the spare starts)")
    ap.add_argument("--cache", default=None)
    args = ap.parse_args(argv)
    cache = pathlib.Path(args.cache or tempfile.mkdtemp(prefix="splitvmm-bench-"))
    elf = guests.build([GUEST], cache)
    load0 = os.getloadavg()
    report: dict[str, Any] = {
        "benchmark": "restart", "guest_ring": 3, "host_cpus": os.cpu_count(),
        "with_spare": restarts(elf, args.kills, args.live, True, args.gap),
        "without_spare": restarts(elf, args.kills, 0, False, args.gap),
        "cold_start": cold_start(),
        "state_cost": state_cost(),
        "loadavg_before": load0, "loadavg_after": os.getloadavg(),
        "targets": {"kill_to_serving_median_ms": 100, "device_restart_pause_ms": 50},
    }
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0 if report["with_spare"]["ok"] and report["without_spare"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
