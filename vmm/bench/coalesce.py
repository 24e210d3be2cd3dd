"""Coalesced-MMIO benchmark: ``python -m vmm.bench.coalesce`` prints JSON.

One guest (``coalesce_guest.c``, **ring 3**) does N 8-byte MMIO writes to
a coalesced window, then N to a plain window of the same device (the
test-only ``coalesce-sum`` model, ``--device tests.testkinds:CoalesceSum``:
run it from a source tree; one instance, both windows feeding one sum), each phase closed by a read that
must see every write; the host timestamps marks around the phases.  The
per-write cost of the two windows is measured in the same run, inline and
in a device process, with the exits counted and the machine's load
average read before and after.  On the project's nested PVM host absolute
times are not a real host's; the ratio plain / coalesced is what counts.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

from ipc import Bus
from vmm import guests, layout
from vmm.bench import _samples, build_dir
from vmm.config import DeviceSpec
from vmm.machine import Machine

HERE = pathlib.Path(__file__).resolve().parent
WIN = 0xD000_0000
PLAIN = 0xD000_1000
MEMORY = 32 * layout.MiB
#: The model (test-only, in the source tree's tests/).
COALESCE_SUM = "tests.testkinds:CoalesceSum"


def run(image: pathlib.Path, cmdline: str, iters: int, placement: str, timeout: float,
        fast_path: bool = True) -> dict:
    marks: list[tuple[int, int]] = []
    exits: list[int] = []
    clock = time.perf_counter_ns

    def mark(vcpu: int, offset: int, size: int, value: int) -> None:
        marks.append((value, clock()))
        exits.append(m.vcpus[vcpu].exit_count)

    with Machine(memory=MEMORY, vcpus=1, fast_path=fast_path) as m:
        if not m.coalesced.page:
            raise RuntimeError("KVM on this host has no coalesced MMIO")
        m.add_handler(Bus.PIO, layout.BENCH_MARK_PORT, 1, write=mark)
        m.load_pvh(image, cmdline)
        m.add_device(DeviceSpec(COALESCE_SUM, "sum0", placement,
                                (("mmio", hex(WIN)), ("plain", hex(PLAIN)))))
        outcome = m.run(timeout=timeout)
        if outcome.status != 0:
            raise RuntimeError(f"{placement} run ended badly: {outcome}")
        # (coalesced, plain): the phases between marks 1, 2 and 3
        coalesced, plain = _samples(marks, iters)
        # exits between marks 1 and 2 (coalesced) and 2 and 3 (plain); live
        # counts only with the C fast path
        phase = [0, 0]
        if fast_path:
            for i in range(0, len(exits) - 2, 3):
                phase[0] += exits[i + 1] - exits[i]
                phase[1] += exits[i + 2] - exits[i + 1]
        return {"coalesced": coalesced, "plain": plain, "phase_exits": phase,
                "delivered": m.dispatcher.coalesced_writes, "drains": m.dispatcher.drains}


def _loadavg() -> list[float]:
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except (OSError, ValueError):
        return []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vmm.bench.coalesce", description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=10000, help="writes per phase (default 10000)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per run (default 3)")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each placement, interleaved (default 2)")
    ap.add_argument("--skip", action="append", default=[], choices=["inline", "inline_python", "isolated"])
    ap.add_argument("--cache", default=None, help="build directory (default: a temporary one)")
    args = ap.parse_args(argv)
    with build_dir(args.cache) as cache:
        image = guests.build([HERE / "coalesce_guest.c"], cache, name="bench-coalesce")
        cmdline = (f"iters={args.iters} rounds={args.rounds} win={WIN:#x} plain={PLAIN:#x} "
                   f"mark={layout.BENCH_MARK_PORT:#x}")
        timeout = 60 + args.iters * args.rounds * 2 * 500e-6
        report: dict = {"benchmark": "8-byte MMIO writes, coalesced window vs plain window of one device",
                        "guest_ring": 3, "iterations": args.iters, "rounds": args.rounds,
                        "repeats": args.repeat, "host_cpus": os.cpu_count(), "loadavg_before": _loadavg(),
                        "unit": "microseconds per write (delivery to the device included); median and "
                                "best of all rounds, placements interleaved"}
        runners = [r for r in ("inline", "inline_python", "isolated") if r not in args.skip]
        raw: dict[str, dict] = {r: {"coalesced": [], "plain": [], "exits": [0, 0], "delivered": 0}
                                for r in runners}
        for _ in range(args.repeat):
            for r in runners:
                res = run(image, cmdline, args.iters, "inline" if r == "inline_python" else r, timeout,
                          fast_path=r != "inline_python")
                for k in ("coalesced", "plain"):
                    raw[r][k] += res[k]
                raw[r]["exits"] = [a + b for a, b in zip(raw[r]["exits"], res["phase_exits"], strict=True)]
                raw[r]["delivered"] += res["delivered"]
        for r in runners:
            c, p = raw[r]["coalesced"], raw[r]["plain"]
            writes = args.iters * args.rounds * args.repeat
            report[r] = {
                "coalesced_us": round(statistics.median(c), 3), "plain_us": round(statistics.median(p), 3),
                "coalesced_us_best": round(min(c), 3), "plain_us_best": round(min(p), 3),
                "speedup": round(statistics.median(p) / statistics.median(c), 2),
                "exits_per_coalesced_write": round(raw[r]["exits"][0] / writes, 4) if r != "inline_python" else None,
                "exits_per_plain_write": round(raw[r]["exits"][1] / writes, 4) if r != "inline_python" else None,
                "coalesced_writes_delivered": raw[r]["delivered"],
            }
        report["loadavg_after"] = _loadavg()
        json.dump(report, sys.stdout, indent=2)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
