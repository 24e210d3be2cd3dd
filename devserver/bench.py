"""Benchmark of access forwarding without KVM: Python "vCPU" threads in
this process, a Python device process on the other side.

    python -m devserver.bench [--quick]        # prints one JSON object

Sections:

* ``slots``: the bare slot round trip (:mod:`ipc.slotbench`): a Python
  caller and a Python server process, no registry, no model;
* ``echo``: what the dispatcher does for one 4-byte port read of the echo
  device's scratch register: ``registry.get`` -> ``RemoteEndpoint.access``
  -> ``registry.put``, the device served by ``devserver`` in its own
  process; with the device polling (adaptive window up to ``poll_us``) and
  with it sleeping after every request;
* ``inline``: the same lookup and the same echo model called in this
  process (the floor the isolated placement is compared with);
* per polling setting: the device's CPU use while busy and while idle
  (from /proc, coarse: clock ticks) and its own counters (time spent
  polling per request, share of requests found by polling, sleeps).

This tool plays the VMM, so unlike the runtime it imports :mod:`vmm`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid

from devices.base import Space
from devices.echo import Echo
from devserver.host import RemoteHost
from ipc import Registry, slotbench

PORT = 0x1000


def _rounds(one_access, n: int, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            one_access()
        out.append((time.perf_counter() - t) / n * 1e6)
    return out


def _inline(registry: Registry, n: int, rounds: int) -> dict:
    model = Echo(RemoteHost(registry, 3), pio=hex(PORT + 0x1000))
    model.start()
    get, put, read, pio = registry.get, registry.put, model.read, Space.PIO
    addr = PORT + 0x1000 + 0x10

    def one():
        ref = get(0, addr, 4)
        try:
            read(pio, ref.cookie, ref.offset, 4)
        finally:
            put(ref)
    try:
        _rounds(one, n // 10, 1)
        s = _rounds(one, n, rounds)
        return {"round_trip_us": round(statistics.median(s), 2)}
    finally:
        model.stop()


def _isolated(registry: Registry, n: int, rounds: int, poll_us: int, adaptive: bool = True,
              move: bool = False) -> dict:
    from vmm.remote import RemoteEndpoint, RemoteOptions

    ep = RemoteEndpoint.spawn("echo", {"pio": hex(PORT)}, 2, "bench0", registry, 1,
                              RemoteOptions(poll_us=poll_us, adaptive=adaptive, move=move))
    try:
        get, put, access = registry.get, registry.put, ep.access
        addr = PORT + 0x10

        def one():
            ref = get(0, addr, 4)
            try:
                access(0, 0, ref.cookie, ref.offset, 4, False, 0)
            finally:
                put(ref)
        _rounds(one, max(200, n // 10), 1)                    # warm up
        cpu0, wall0, d0, c0 = ep.cpu_seconds(), time.perf_counter(), ep.device_stats(), ep.call_stats()
        samples = _rounds(one, n, rounds)
        cpu1, wall1, d1, c1 = ep.cpu_seconds(), time.perf_counter(), ep.device_stats(), ep.call_stats()
        time.sleep(0.5)                                       # idle: the device should sleep
        cpu2, wall2 = ep.cpu_seconds(), time.perf_counter()
        served = max(1, d1.served - d0.served)
        calls = max(1, c1.calls - c0.calls)
        return {
            "poll_us": poll_us,
            "adaptive": adaptive,
            "move": move,
            "round_trip_us": round(statistics.median(samples), 2),
            "round_trip_us_min": round(min(samples), 2),
            "device_cpu_busy_fraction": round((cpu1 - cpu0) / (wall1 - wall0), 2),
            "device_cpu_idle_fraction": round((cpu2 - cpu1) / (wall2 - wall1), 2),
            "device_poll_us_per_request": round((d1.poll_ns - d0.poll_ns) / served / 1e3, 2),
            "device_poll_fraction_of_wall": round((d1.poll_ns - d0.poll_ns) / 1e9 / (wall1 - wall0), 2),
            "device_poll_hit_ratio": round((d1.polled_hits - d0.polled_hits) / served, 3),
            "device_sleeps_per_request": round((d1.sleeps - d0.sleeps) / served, 3),
            "device_moves_off_vcpu_cpu": d1.moves - d0.moves,
            "device_window_us_at_end": round(d1.window_ns / 1e3, 1),
            "vcpu_spin_us_per_request": round((c1.spin_ns - c0.spin_ns) / calls / 1e3, 2),
            "vcpu_sleeps_per_request": round((c1.sleeps - c0.sleeps) / calls, 3),
        }
    finally:
        ep.close()


def run(quick: bool = False, poll_us: int = 200, move: bool = False) -> dict:
    n, rounds = (2000, 3) if quick else (20000, 5)
    name = f"/svm-bench-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    result: dict = {
        "what": "4-byte port read, Python vCPU thread -> echo device; no KVM (see vmm.bench for guest figures)",
        "cpus": os.cpu_count(),
        "slots": {
            "polling": slotbench.measure(poll_us * 1000, n, rounds, move=move),
            "no_polling": slotbench.measure(0, n // 4, rounds),
        },
    }
    with Registry.create(name) as registry:
        try:
            result["inline"] = _inline(registry, n, rounds)
            result["echo"] = {
                "polling": _isolated(registry, n, rounds, poll_us, move=move),
                "no_polling": _isolated(registry, n // 4, rounds, 0),
            }
        finally:
            registry.unlink()
    inline = result["inline"]["round_trip_us"]
    for k in ("polling", "no_polling"):
        result["echo"][k]["ratio_to_inline"] = round(result["echo"][k]["round_trip_us"] / inline, 2)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer iterations")
    ap.add_argument("--poll-us", type=int, default=200, help="the device's longest poll window")
    ap.add_argument("--move", action="store_true", help="the device moves off the vCPU's CPU")
    args = ap.parse_args(argv)
    json.dump(run(args.quick, args.poll_us, args.move), sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
