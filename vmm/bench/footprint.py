"""Start-to-end time and memory against QEMU: ``python -m vmm.bench.footprint``
prints JSON.

One guest ELF (``footprint_guest.c``: spins in ring 3 for about a second,
then the test-exit port) runs under ``vmm run`` and under QEMU
(``-enable-kvm -M q35 -kernel``, ``isa-debug-exit``), each with no devices
and with virtio-rng, virtio-blk (a 16 MiB image) and virtio-console --
ours each in its own process.  For every run: the wall time from spawn to
exit (process start, VM set-up, device processes, guest boot and work,
teardown), and the peak of the summed proportional set size (PSS, from
``/proc/PID/smaps_rollup``: a page shared by n processes, as guest RAM is
with the device processes, counts 1/n in each) of the VMM and its device
processes, or of QEMU, sampled every 20 ms.  The
ratios ours/QEMU are of the same run; absolute times on this nested host
are not a real host's.  Needs QEMU (``qemu-system-x86_64``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from vmm import guests

HERE = pathlib.Path(__file__).resolve().parent
QEMU = "qemu-system-x86_64"
MEMORY_MIB = 64
STATUS = 33          # test_exit(0x10)
SAMPLE_S = 0.02


def tree(pid: int) -> list[int]:
    """pid and every descendant (through /proc/PID/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return out


def pss_kib(pids: list[int]) -> int:
    """Summed proportional set size: a page shared by n of the processes
    (guest RAM that device processes map) counts 1/n in each."""
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


def measure(cmd: list[str], timeout: float) -> dict:
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    peak = procs = 0
    try:
        while proc.poll() is None:
            if time.perf_counter() - started > timeout:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"{cmd[0]}: no end within {timeout:g} s")
            pids = tree(proc.pid)
            peak = max(peak, pss_kib(pids))
            procs = max(procs, len(pids))
            time.sleep(SAMPLE_S)
    finally:
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    seconds = time.perf_counter() - started
    if proc.returncode != STATUS:
        raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}, not {STATUS}: {err.strip()[-500:]}")
    return {"seconds": seconds, "peak_pss_kib": peak, "processes": procs}


def commands(elf: pathlib.Path, image: pathlib.Path, loops: int, devices: bool) -> dict[str, list[str]]:
    ours = [sys.executable, "-m", "vmm.cli", "run", "--guest", str(elf), "--memory", f"{MEMORY_MIB}M",
            "--serial", "none", "--cmdline", f"loops={loops}"]
    qemu = [QEMU, "-enable-kvm", "-M", "q35", "-m", str(MEMORY_MIB), "-no-reboot", "-kernel", str(elf),
            "-append", f"loops={loops}", "-device", "isa-debug-exit,iobase=0xf4", "-serial", "none",
            "-display", "none", "-nodefaults"]
    if devices:
        ours += ["--device", "virtio-rng", "--device", f"virtio-blk,path={image}", "--device",
                 "virtio-console,socket=" + str(image.with_suffix(".sock"))]
        qemu += ["-device", "virtio-rng-pci", "-drive", f"file={image},if=none,id=d0,format=raw",
                 "-device", "virtio-blk-pci,drive=d0", "-device", "virtio-serial-pci",
                 "-chardev", "null,id=c0", "-device", "virtconsole,chardev=c0"]
    return {"splitvmm": ours, "qemu": qemu}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vmm.bench.footprint", description=__doc__.split("\n\n")[0])
    ap.add_argument("--loops", type=int, default=3_000_000_000, help="guest spin iterations (default 3e9)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each, interleaved (default 3)")
    ap.add_argument("--timeout", type=float, default=300, help="per run, seconds (default 300)")
    args = ap.parse_args(argv)
    if shutil.which(QEMU) is None:
        print(f"footprint: {QEMU} is not installed", file=sys.stderr)
        return 1
    report: dict = {"benchmark": "start-to-end time and peak memory, vmm run against QEMU, same guest ELF",
                    "guest_ring": 3, "loops": args.loops, "repeat": args.repeat, "memory_mib": MEMORY_MIB,
                    "unit": "seconds (median), MiB of summed PSS (median of the peaks)",
                    "load_avg_before": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory(prefix="splitvmm-footprint-") as tmp:
        elf = guests.build([HERE / "footprint_guest.c"], tmp, name="footprint")
        image = pathlib.Path(tmp) / "disk.img"
        with open(image, "wb") as f:
            f.truncate(16 << 20)
        for config in ("no_devices", "three_devices"):
            cmds = commands(elf, image, args.loops, config == "three_devices")
            runs: dict[str, list[dict]] = {name: [] for name in cmds}
            for _ in range(args.repeat):
                for name, cmd in cmds.items():
                    runs[name].append(measure(cmd, args.timeout))
            out: dict = {}
            for name, rs in runs.items():
                out[name] = {"seconds": round(statistics.median(r["seconds"] for r in rs), 3),
                             "peak_pss_mib": round(statistics.median(r["peak_pss_kib"] for r in rs) / 1024, 1),
                             "processes": max(r["processes"] for r in rs)}
            out["time_ratio"] = round(out["splitvmm"]["seconds"] / out["qemu"]["seconds"], 3)
            out["memory_ratio"] = round(out["splitvmm"]["peak_pss_mib"] / out["qemu"]["peak_pss_mib"], 3)
            report[config] = out
    report["load_avg_after"] = round(os.getloadavg()[0], 2)
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
