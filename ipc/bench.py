"""Registry benchmark: prints one JSON object of figures.

    python -m ipc.bench [--quick]

Measures, on a fresh segment:

* ``python_pair_ns``: one ``get`` + ``put`` pair through the Python API
  (the VMM's vCPU threads do this on every exit), among 8 regions;
* ``python_pair_4096_ns``: the same among 4096 regions;
* ``c_pair_ns`` / ``c_pair_4096_ns``: the pair in a C loop inside the
  extension, among 8 and among 4096 regions, consecutive lookups landing
  in different regions;
* ``lookup_ratio_4096_over_8``: ``c_pair_4096_ns / c_pair_ns``;
* ``contended_*``: two threads doing pairs at once on the same registry
  (the C loop releases the GIL, so those two really run in parallel).

Each figure is the median of several rounds.  Targets (DESIGN.md): Python
pair <= 1 us, C pair <= 150 ns, ratio <= 1.5.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import threading
import time
from typing import Callable, cast

from ipc.registry import Bus, Reference, Registry
from ipc._registry_c import lib

TARGETS = {"python_pair_ns": 1000.0, "c_pair_ns": 150.0, "lookup_ratio_4096_over_8": 1.5}
STRIDE = 0x1000
REGION = 0x100


def _fill(reg: Registry, count: int) -> None:
    for i in range(count):
        reg.register(Bus.MMIO, i * STRIDE, REGION, owner=2 + i % 4, cookie=i)


def _python_pairs(reg: Registry, count: int, n: int) -> float:
    # every address is claimed: get never returns None here
    get = cast(Callable[[Bus, int, int], Reference], reg.get)
    put, bus = reg.put, Bus.MMIO
    addrs = [((k * 7919) % count) * STRIDE + 8 for k in range(1024)]
    rounds = n // len(addrs)
    t0 = time.perf_counter_ns()
    for _ in range(rounds):
        for a in addrs:
            put(get(bus, a, 4))
    return (time.perf_counter_ns() - t0) / (rounds * len(addrs))


def _c_pairs(reg: Registry, count: int, n: int) -> float:
    ns = lib.svm_reg_bench_getput(reg._handle(), Bus.MMIO, 8, STRIDE, count, n)
    if ns < 0:
        raise RuntimeError(f"C benchmark loop failed with code {-ns}")
    return ns / n


def _parallel(fn, reg: Registry, count: int, n: int) -> list[float]:
    results: list[float] = [0.0, 0.0]
    start = threading.Barrier(2)

    def run(i: int) -> None:
        start.wait()
        results[i] = fn(reg, count, n)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _median(fn, rounds: int) -> float:
    return statistics.median(fn() for _ in range(rounds))


def measure(quick: bool = False) -> dict:
    n_py = 50_000 if quick else 200_000
    n_c = 500_000 if quick else 2_000_000
    rounds = 3 if quick else 7
    out: dict = {"benchmark": "registry", "unit": "ns per get+put pair", "cpus": os.cpu_count()}
    for count, suffix in ((8, ""), (4096, "_4096")):
        with Registry.create_sealed(capacity=4096) as reg:
            _fill(reg, count)
            py = functools.partial(_python_pairs, reg, count, n_py)
            c = functools.partial(_c_pairs, reg, count, n_c)
            out[f"python_pair{suffix}_ns"] = round(_median(py, rounds), 1)
            out[f"c_pair{suffix}_ns"] = round(_median(c, rounds), 1)
            if count == 8:
                c2 = _parallel(_c_pairs, reg, count, n_c)
                p2 = _parallel(_python_pairs, reg, count, n_py // 2)
                out["contended_c_pair_ns_per_thread"] = [round(x, 1) for x in c2]
                out["contended_python_pair_ns_per_thread"] = [round(x, 1) for x in p2]
            problems = reg.check()
            if problems:
                raise RuntimeError(f"registry inconsistent after benchmark: {problems[:3]}")
    out["lookup_ratio_4096_over_8"] = round(out["c_pair_4096_ns"] / out["c_pair_ns"], 3)
    out["python_lookup_ratio_4096_over_8"] = round(out["python_pair_4096_ns"] / out["python_pair_ns"], 3)
    out["targets"] = TARGETS
    out["meets_targets"] = all(out[k] <= v for k, v in TARGETS.items())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ipc.bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer iterations (a few seconds)")
    args = p.parse_args(argv)
    json.dump(measure(args.quick), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
