"""What fault injection costs: ``python -m vmm.bench.faults`` prints JSON.

1. virtio-blk 4 KiB reads at queue depth 1 (the guest of
   :mod:`vmm.bench.virtio_blk`, ring 3, every read verified), the device in
   its own process, under ``vmm run`` with: no plan; a plan armed at
   ``blk.read`` that never matches (a sector range past the image); a
   plan firing on 1% of the reads (``probability = 0.01``, ``delay`` of 0
   ms: the fault path and a trace record sent to the VMM, but no change the
   guest's verification would see).  With ``--base-tree DIR`` (a checkout
   of the tree before fault injection, e.g. ``git archive``), the same
   guest under that tree's VMM as well.  Runs interleaved, ``--repeat``
   times; IOPS are medians.
2. The per-access cost of the ``access`` point in the inline endpoint
   (:class:`vmm.local.LocalEndpoint` serving an ``echo`` read): no engine,
   best of 25 interleaved rounds; an engine with nothing armed (every device's, without a plan), the
   ``process`` point armed (it counts every access), the ``access`` point armed but
   never matching, and firing on every access (``delay`` of 0 ms); ns per access.

3. The same for one virtio-blk 4 KiB read request served in-process
   (``VirtioBlk.handle`` and the used-ring push, on a real image): what
   the ``blk.*`` and ``queue.complete`` tests add to each request.

Absolute figures of this nested host are not a real host's; compare the
ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import timeit

from vmm.bench.virtio_blk import MEMORY_MIB, build_guest, make_image, run_guest, summarize

PLANS = {
    "silent": '[[fault]]\nname = "never"\ndevice = "blk"\npoint = "blk.read"\nafter = 0\naction = "ioerr"\n'
              'sector = [1099511627776, 1099511627776]\n',
    "one_percent": '[[fault]]\nname = "one-percent"\ndevice = "blk"\npoint = "blk.read"\nprobability = 0.01\n'
                   'action = "delay"\nms = 0\n',
}


def run_blk(elf: pathlib.Path, image: pathlib.Path, cmdline: str, plan: pathlib.Path | None,
            cwd: str | None, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "vmm.cli", "run", "--guest", str(elf), "--memory", f"{MEMORY_MIB}M",
           "--cmdline", cmdline, "--timeout", str(int(timeout)), "--serial", "stdio",
           "--device", f"virtio-blk,id=blk,path={image}"]
    if plan is not None:
        cmd += ["--faults", str(plan)]
    old = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)       # ``-m vmm.cli`` imports the tree in the current directory first
    try:
        return run_guest(cmd, timeout + 30)
    finally:
        os.chdir(old)


def access_costs(loops: int = 20_000, rounds: int = 25) -> dict[str, float]:
    """ns per inline ``echo`` read through LocalEndpoint.access."""
    from devices.echo import COOKIE_PIO, Echo
    from devices.faults.engine import FaultEngine
    from devices.faults.plan import loads_plan
    from vmm.config import _NullHost
    from vmm.local import LocalEndpoint

    def endpoint(fault: str | None) -> LocalEndpoint:
        model = Echo(_NullHost(), pio="0x2000")
        ep = LocalEndpoint(model, 16, "e")
        if fault == "":
            ep.attach_faults(FaultEngine("e", (), points=Echo.all_fault_points()))
        elif fault is not None:
            faults = loads_plan(f'[[fault]]\ndevice = "e"\n{fault}\n', devices={"e": Echo.all_fault_points()})
            ep.attach_faults(FaultEngine("e", faults.for_device("e"), points=Echo.all_fault_points()))
        return ep

    cases = {
        "no_engine": None,
        "empty_engine": "",
        "process_armed_never_firing": 'point = "process"\nnth = 1000000000\naction = "hang"',
        "access_armed_never_matching": 'point = "access"\nafter = 0\naction = "ones"\noffset = [4096, 8192]',
        "access_firing_every_time": 'point = "access"\nafter = 0\naction = "delay"\nms = 0',
    }
    eps = {name: endpoint(fault) for name, fault in cases.items()}
    best = {name: float("inf") for name in cases}
    for _ in range(rounds):         # interleaved, best of each: a shared machine's noise is one-sided
        for name, ep in eps.items():
            def read(ep: LocalEndpoint = ep) -> None:
                ep.access(0, 0, COOKIE_PIO, 0, 4, False, 0)
            t = timeit.timeit(read, number=loops)
            best[name] = min(best[name], t)
    out = {name: round(t / loops * 1e9, 1) for name, t in best.items()}
    out["nothing_armed_cost_ns"] = round(out["empty_engine"] - out["no_engine"], 1)
    out["armed_silent_cost_ns"] = round(out["access_armed_never_matching"] - out["no_engine"], 1)
    return out


_BASE_BLK = """
import os, sys, tempfile, timeit
from devices.guestmem import GuestRam
from devices.virtio.blk import VirtioBlk
from devices.virtio.virtqueue import Buffer, Chain, Virtqueue
from ipc.protocol import MemRegion
from vmm.config import _NullHost
ram = bytearray(1 << 20)
mem = GuestRam(ram, [MemRegion(0, len(ram), 0)])
q = Virtqueue(0, 128)
q.desc, q.driver, q.device = 0x1000, 0x2000, 0x3000
ram[0x100:0x110] = (0).to_bytes(4, "little") + bytes(4) + (8).to_bytes(8, "little")
chain = Chain(0, [Buffer(0x100, 16, False), Buffer(0x10000, 4096, True), Buffer(0x200, 1, True)])
with tempfile.NamedTemporaryFile() as image:
    image.truncate(1 << 20)
    image.flush()
    model = VirtioBlk(_NullHost(), path=image.name)
    model.fd = os.open(image.name, os.O_RDWR)
    model.capacity = 2048
    def serve():
        q.push(mem, chain.head, model.handle(q, chain, mem))
    n = int(sys.argv[1])
    print(min(timeit.repeat(serve, number=n, repeat=3)) / n * 1e9)
"""


def base_blk_ns(base_tree: str, loops: int) -> float:
    """The same request under the tree before fault injection (its own process)."""
    import subprocess
    out = subprocess.run([sys.executable, "-c", _BASE_BLK, str(loops)], cwd=base_tree, capture_output=True,
                         text=True, timeout=300, check=True)
    return float(out.stdout.strip())


def blk_handle_costs(loops: int = 5_000, rounds: int = 15, base_tree: str | None = None) -> dict[str, float]:
    """ns per virtio-blk 4 KiB read request served by ``VirtioBlk.handle``
    and the queue's completion (``Virtqueue.push`` behind the
    ``queue.complete`` test), in this process, on a real image: no engine,
    an engine with nothing armed, a ``blk.read`` fault that never matches;
    best of interleaved rounds."""
    from devices.faults.engine import FaultEngine
    from devices.faults.plan import loads_plan
    from devices.guestmem import GuestRam
    from devices.virtio.blk import VirtioBlk
    from devices.virtio.core import complete_faulted
    from devices.virtio.virtqueue import Buffer, Chain, Virtqueue
    from ipc.protocol import MemRegion
    from vmm.config import _NullHost

    ram = bytearray(1 << 20)
    mem = GuestRam(ram, [MemRegion(0, len(ram), 0)])
    q = Virtqueue(0, 128)
    q.desc, q.driver, q.device = 0x1000, 0x2000, 0x3000
    ram[0x100:0x110] = (0).to_bytes(4, "little") + bytes(4) + (8).to_bytes(8, "little")   # T_IN, sector 8
    chain = Chain(0, [Buffer(0x100, 16, False), Buffer(0x10000, 4096, True), Buffer(0x200, 1, True)])
    with tempfile.NamedTemporaryFile() as image:
        image.truncate(1 << 20)
        image.flush()
        plans = {"no_engine": None, "empty_engine": "",
                 "blk_read_armed_never_matching": '[[fault]]\ndevice = "blk"\npoint = "blk.read"\nafter = 0\n'
                                                  'action = "ioerr"\nsector = [1000000, 2000000]\n'}
        models = {}
        for name, text in plans.items():
            model = VirtioBlk(_NullHost(), path=image.name)
            model.fd = os.open(image.name, os.O_RDWR)
            model.capacity = 2048
            if text is not None:
                faults = loads_plan(text, devices={"blk": VirtioBlk.all_fault_points()}).for_device("blk")
                model.attach_faults(FaultEngine("blk", faults, points=VirtioBlk.all_fault_points()))
            models[name] = model

        def serve(model: VirtioBlk) -> None:
            written = model.handle(q, chain, mem)
            if "queue.complete" in model.fault_engine.armed:
                complete_faulted(model.fault_engine, q, mem, chain.head, written)
            else:
                q.push(mem, chain.head, written)

        best = {name: float("inf") for name in models}
        if base_tree is not None:
            best["before"] = float("inf")
        for _ in range(rounds):
            for name, model in models.items():
                def one(m: VirtioBlk = model) -> None:
                    serve(m)
                best[name] = min(best[name], timeit.timeit(one, number=loops))
            if base_tree is not None:
                best["before"] = min(best["before"], base_blk_ns(base_tree, loops) * loops / 1e9)
        for model in models.values():
            os.close(model.fd)
    out = {name: round(t / loops * 1e9, 1) for name, t in best.items()}
    out["nothing_armed_cost_ns"] = round(out["empty_engine"] - out["no_engine"], 1)
    out["armed_silent_cost_ns"] = round(out["blk_read_armed_never_matching"] - out["no_engine"], 1)
    if "before" in out:
        out["no_plan_vs_before_ns"] = round(out["empty_engine"] - out["before"], 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vmm.bench.faults", description=__doc__.split("\n\n")[0])
    ap.add_argument("--n4k", type=int, default=2000, help="4 KiB reads per run (default 2000)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each variant, interleaved (default 3)")
    ap.add_argument("--base-tree", metavar="DIR", help="a checkout of the tree before fault injection")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--skip-blk", action="store_true", help="only the per-access figures")
    args = ap.parse_args(argv)
    report: dict = {"benchmark": "fault injection costs", "guest_ring": 3,
                    "load_avg_before": round(os.getloadavg()[0], 2)}
    if not args.skip_blk:
        with tempfile.TemporaryDirectory(prefix="splitvmm-faultbench-") as tmp_name:
            tmp = pathlib.Path(tmp_name)
            elf = build_guest(tmp)
            image = tmp / "disk.img"
            make_image(image, 16)
            plans: dict[str, pathlib.Path | None] = {"none": None}
            for name, text in PLANS.items():
                plans[name] = tmp / f"{name}.toml"
                plans[name].write_text(text)        # type: ignore[union-attr]
            variants = list(plans) + (["before"] if args.base_tree else [])
            cmdline = f"bench=1 passes=1 n4k={args.n4k} msix=0"
            raw: dict[str, list[dict]] = {v: [] for v in variants}
            for _ in range(args.repeat):
                for v in variants:
                    plan = plans.get(v)
                    raw[v].append(run_blk(elf, image, cmdline, plan, args.base_tree if v == "before" else None,
                                          args.timeout))
            tsc = [r["tsc_hz"] for runs in raw.values() for r in runs if r["tsc_hz"]]
            tsc_hz = statistics.median(tsc)
            blk = {v: summarize(runs, tsc_hz).get("rand4k", {}) for v, runs in raw.items()}
            report["virtio_blk_4k_qd1"] = {v: {"IOPS": s.get("IOPS"), "IOPS_best": s.get("IOPS_best"),
                                               "IOPS_per_run": s.get("IOPS_per_run")} for v, s in blk.items()}
            base = blk["none"].get("IOPS")
            report["ratios_to_no_plan"] = {v: round(s["IOPS"] / base, 3) for v, s in blk.items()
                                           if base and s.get("IOPS")}
            best = blk["none"].get("IOPS_best")
            report["ratios_of_best_to_no_plan"] = {v: round(s["IOPS_best"] / best, 3) for v, s in blk.items()
                                                   if best and s.get("IOPS_best")}
    report["access_point_ns_per_access"] = access_costs()
    report["blk_request_ns_in_process"] = blk_handle_costs(base_tree=args.base_tree)
    report["load_avg_after"] = round(os.getloadavg()[0], 2)
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
