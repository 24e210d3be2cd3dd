"""Micro-benchmark of a silent fault point (JSON on stdout).

``python -m devices.faults.bench [--loops N]``: nanoseconds per event of a
point with nothing armed (the caller's dict test, and the model's
``fault_point`` call), with a fault armed at another point, armed at the
point but never matching (a sector range the events miss), armed with
``probability = 0``, and firing 1% of the time; the armed-but-never-matching
event as virtio-blk's request path makes it (its own ``in armed`` test,
then :meth:`FaultEngine.point`); beside them an empty loop and an empty
method call, the floor those figures stand on.  Best of 5 interleaved
rounds, timed in this thread's CPU time (time.thread_time: the time other
processes take the core is not counted; their cache traffic still is), so
compare figures within one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import timeit
from typing import Any

from devices.faults.engine import FaultEngine
from devices.faults.hook import FaultPoints
from devices.faults.plan import loads_plan


class _Model(FaultPoints):
    """A model with the blk points, as a built-in virtio-blk would have."""

    def nothing(self, name: str, /, **match: Any) -> None:
        return None


def _plan(fault: str) -> Any:
    return loads_plan(f'[[fault]]\ndevice = "blk"\n{fault}\n', devices={"blk"}).for_device("blk")


CASES = {
    "armed_elsewhere": 'point = "blk.read"\nnth = 1\naction = "ioerr"',
    "armed_never_matching": 'point = "blk.write"\nafter = 0\naction = "ioerr"\nsector = [1000000, 2000000]',
    "armed_probability_0": 'point = "blk.write"\nprobability = 0\naction = "ioerr"',
    "firing_1_percent": 'point = "blk.write"\nprobability = 0.01\naction = "ioerr"',
}


def measure(loops: int, repeat: int = 5) -> dict[str, float]:
    """ns per event of each case: the best of ``repeat`` rounds, the cases
    interleaved in each round (a shared machine's noise only adds)."""
    cases: dict[str, tuple[str, dict[str, Any]]] = {}
    model = _Model()
    env: dict[str, Any] = {"m": model, "e": model.fault_engine}
    cases["empty_loop"] = ("pass", env)
    cases["empty_method_call"] = ("m.nothing('blk.write', sector=5)", env)
    cases["silent_dict_test"] = ("'blk.write' in e.armed", env)
    cases["silent_fault_point"] = ("m.fault_point('blk.write', sector=5)", env)
    for case, fault in CASES.items():
        engine = FaultEngine("blk", _plan(fault), seed=1)
        armed = _Model()
        armed.attach_faults(engine)
        env = {"m": armed, "e": engine}
        if case == "armed_elsewhere":
            cases[case + "_dict_test"] = ("'blk.write' in e.armed", env)
        cases[case] = ("f = m.fault_point('blk.write', sector=5)\nif f is not None: f.done('x')", env)
        if case == "armed_never_matching":
            # what VirtioBlk.handle does: its own test, then the engine
            cases["blk_path_armed_never_matching"] = (
                "if 'blk.write' in e.armed: e.point('blk.write', sector=5)", env)
    best = {name: float("inf") for name in cases}
    for _ in range(repeat):
        for name, (stmt, env) in cases.items():
            best[name] = min(best[name], timeit.timeit(stmt, globals=env, number=loops, timer=time.thread_time))
    return {name: round(t / loops * 1e9, 1) for name, t in best.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devices.faults.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--loops", type=int, default=200_000, help="events per run (default 200000)")
    args = parser.parse_args(argv)
    json.dump({"bench": "devices.faults", "unit": "ns/event", "loops": args.loops,
               "results": measure(args.loops)}, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
