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

``--demo``: the memory target of issue 15 §2 instead -- the demo's
devices (serial, virtio-rng, virtio-blk, virtio-console: the runners of
``vmm.bench.startup``'s memory part, 256 MiB, a guest spinning in ring 3)
under ``vmm run --api`` and under QEMU (q35 and microvm), ``--repeat``
rounds interleaved, once the control socket says "running": Rss and Pss
of every process from ``/proc/PID/smaps_rollup``, medians, ours by role
(the VMM, the fork server, the device processes, the sandbox's reapers),
and how much of each side's figure is guest RAM (ours: the guest memfd's
pages, counted 1/n in each of the n processes that map them; QEMU's: its
anonymous guest RAM mapping).  Findings: ``docs/startup-and-memory.md``.
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


# -- --demo: the demo's memory against QEMU's (issue 15 §2) ----------------------

def _role(pid: int, root: int) -> str:
    """What process ``pid`` of the VM's tree (``root``: the VMM) is."""
    try:
        exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
        with open(f"/proc/{pid}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return "gone"
    if pid == root:
        return "vmm"
    if exe == "_reaper":
        return "reaper"
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        forkserver = b"devserver.forkserver" in f.read()
    return "forkserver" if forkserver and ppid == root else "device"


def _mappings_kib(pid: int, field: str, wanted) -> int:
    """Sum of ``field`` (e.g. Pss) over the mappings of ``pid`` for which
    ``wanted(name, size_kib)`` is true (``/proc/PID/smaps``)."""
    total, take = 0, False
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                words = line.split()
                if not words[0].endswith(":"):
                    lo, hi = (int(x, 16) for x in words[0].split("-"))
                    take = wanted(words[5] if len(words) > 5 else "", (hi - lo) >> 10)
                elif take and words[0] == field + ":":
                    total += int(words[1])
    except OSError:
        pass
    return total


def _rollup(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss", "Private_Dirty"):
                out[key.lower()] = int(rest.split()[0])
    return out


def demo_once(cmd: list[str], qmp_path: pathlib.Path, ours: bool, timeout: float) -> dict:
    """One run of ``cmd``: once running (+0.5 s), per role Rss/Pss/private
    (KiB) and the guest RAM part of Pss."""
    from vmm.bench import startup

    roles: dict[str, dict[str, int]] = {}
    guest_ram = 0
    ram_mib = startup.GUEST_RAM_MIB
    with startup.running_vm(cmd, qmp_path, timeout, 0.5) as proc:
        for pid in tree(proc.pid):
            try:
                r = _rollup(pid)
            except OSError:
                continue
            role = _role(pid, proc.pid) if ours else "qemu"
            acc = roles.setdefault(role, {"count": 0, "rss": 0, "pss": 0, "private_dirty": 0})
            acc["count"] += 1
            for k, v in r.items():
                acc[k] += v
            if ours:
                guest_ram += _mappings_kib(pid, "Pss", lambda name, _kib: name == "/memfd:splitvmm-ram")
            else:
                guest_ram += _mappings_kib(pid, "Pss", lambda name, kib: not name and kib == ram_mib << 10)
    total = {k: sum(r[k] for r in roles.values()) for k in ("count", "rss", "pss", "private_dirty")}
    return {"roles": roles, "total": total, "guest_ram_pss": guest_ram}


def demo(repeat: int, timeout: float) -> dict:
    """``--demo``: see the module docstring."""
    from vmm import guests
    from vmm.bench import startup

    report: dict = {"benchmark": "memory of the demo's devices, vmm run against QEMU (issue 15 section 2)",
                    "unit": "MiB, medians of the runs", "repeat": repeat, "guest_ram_mib": startup.GUEST_RAM_MIB,
                    "load_avg_before": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory(prefix="splitvmm-footprint-") as tmp_name:
        tmp = pathlib.Path(tmp_name)
        spin = guests.build([startup.ROOT / "tests" / "guests" / "spin.c"], tmp, name="spin")
        disk = tmp / "disk.img"
        with open(disk, "wb") as f:
            f.truncate(startup.DEMO_DISK)
        args = "counter=0x800000 flag=0x801000"
        cmds: dict[str, tuple[list[str], pathlib.Path]] = {}
        sock = tmp / "ours.qmp"
        ours = [*startup.vmm_command(), "run", "--guest", str(spin), "--memory", f"{startup.GUEST_RAM_MIB}M",
                "--api", str(sock), "--timeout", str(int(timeout)), "--cmdline", args]
        for d in startup.OURS_DEVICES:
            ours += ["--device", d.format(disk=disk)]
        cmds["splitvmm"] = (ours, sock)
        for name, machine in (("qemu_q35_kvm", "q35"), ("qemu_microvm_pcie_kvm", "microvm,pcie=on")):
            qsock = tmp / f"{name}.qmp"
            cmds[name] = ([QEMU, "-accel", "kvm", "-M", machine, "-m", str(startup.GUEST_RAM_MIB), "-kernel",
                           str(spin), "-append", args, "-display", "none", "-nodefaults", "-no-reboot",
                           "-qmp", f"unix:{qsock},server=on,wait=off",
                           *[a.format(disk=disk) for a in startup.QEMU_DEVICES]], qsock)
        runs: dict[str, list[dict]] = {name: [] for name in cmds}
        for _ in range(repeat):
            for name, (cmd, path) in cmds.items():
                if path.exists():
                    path.unlink()
                runs[name].append(demo_once(cmd, path, name == "splitvmm", timeout))

    def mib(values) -> float:
        return round(statistics.median(values) / 1024, 1)

    for name, rs in runs.items():
        out: dict = {k: mib(r["total"][k] for r in rs) for k in ("rss", "pss", "private_dirty")}
        out["processes"] = max(r["total"]["count"] for r in rs)
        out["guest_ram_pss"] = mib(r["guest_ram_pss"] for r in rs)
        out["pss_runs"] = [round(r["total"]["pss"] / 1024, 1) for r in rs]
        if name == "splitvmm":
            out["by_role"] = {role: {"count": rs[0]["roles"][role]["count"],
                                     **{k: mib(r["roles"].get(role, {}).get(k, 0) for r in rs)
                                        for k in ("rss", "pss", "private_dirty")}}
                              for role in rs[0]["roles"]}
        report[name] = {k: out[k] for k in ("pss", "rss", "private_dirty", "processes", "guest_ram_pss",
                                           "pss_runs", *(["by_role"] if "by_role" in out else []))}
    ratios = {}
    for name in ("qemu_q35_kvm", "qemu_microvm_pcie_kvm"):
        ratios[f"splitvmm pss / {name} rss"] = round(report["splitvmm"]["pss"] / report[name]["rss"], 2)
        ratios[f"splitvmm pss / {name} rss, guest RAM left out"] = round(
            (report["splitvmm"]["pss"] - report["splitvmm"]["guest_ram_pss"])
            / (report[name]["rss"] - report[name]["guest_ram_pss"]), 2)
    report["ratios"] = ratios
    report["target"] = "splitvmm pss <= QEMU rss"
    report["load_avg_after"] = round(os.getloadavg()[0], 2)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vmm.bench.footprint", description=__doc__.split("\n\n")[0])
    ap.add_argument("--loops", type=int, default=3_000_000_000, help="guest spin iterations (default 3e9)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each, interleaved (default 3)")
    ap.add_argument("--timeout", type=float, default=300, help="per run, seconds (default 300)")
    ap.add_argument("--demo", action="store_true",
                    help="the memory of the demo's devices against QEMU's instead (issue 15 section 2)")
    args = ap.parse_args(argv)
    if shutil.which(QEMU) is None:
        print(f"footprint: {QEMU} is not installed", file=sys.stderr)
        return 1
    if args.demo:
        json.dump(demo(args.repeat, min(args.timeout, 120)), sys.stdout, indent=2)
        print()
        return 0
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
