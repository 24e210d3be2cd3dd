"""Start-up time and memory against QEMU: ``python -m vmm.bench.startup``
prints JSON.

**Start-up** (wall time of the whole command, from ``exec`` to exit):
``startup_guest.S``, a PVH ELF whose first instructions (32-bit protected
mode, at the PVH entry) write 0 to the test-exit port, so every runner ends
with status 1 and the time is the VMM's own start-up and teardown.  Runners,
interleaved, ``--repeat`` rounds:

- ``vmm_nodev``: ``vmm run --guest G --serial none`` (no device process);
- ``vmm_com1``: ``vmm run --guest G`` (COM1 in its own process, the default);
- ``vmm_demo``: ``vmm run`` (the demo guest with serial, virtio-rng,
  virtio-blk and virtio-console, each in its own process; status 0);
- ``qemu_microvm_kvm`` / ``qemu_microvm_tcg`` / ``qemu_q35_kvm`` /
  ``qemu_q35_tcg``: ``qemu-system-x86_64 -M microvm|q35 -accel kvm|tcg
  -kernel G -device isa-debug-exit,iobase=0xf4,iosize=4`` on the same ELF
  (q35 boots SeaBIOS first: in ring 0 under this host's KVM that is
  seconds, so its KVM runner has its own, smaller ``--q35-repeat``).

**Memory**: the demo's devices (serial, virtio-rng, virtio-blk on a 16 MiB
image, virtio-console) with a guest that spins in ring 3
(``tests/guests/spin.c``), 256 MiB of guest RAM, under ``vmm run --api``
and under QEMU with the same devices (``-M q35`` and ``-M
microvm,pcie=on``, KVM); once the control socket (QMP under both) says
"running", Rss and Pss of every process of the VM from
``/proc/PID/smaps_rollup``, then ``quit``.

**Where the time goes** (``phases``): the interpreter alone (``python -c
pass``), ``import devserver.cli`` (what a device process imports before it
can answer) and ``import vmm.cli``, as wall times of their own commands
(interleaved medians); the phases of one ``vmm run`` traced from inside
(imports, Machine set-up, guest load, each device's start, the run, the
teardown; ``TRACE_CODE``); and the top self times of ``python -X
importtime`` for both imports.

``vmm run`` forks its device processes from a fork server that the
``vmm`` script starts before the VMM's own imports (``vmm.entry``,
``devserver.forkserver``); the trace marks when it was started and each
device process's start.  A ``--baseline`` tree is run through its own
entry point (``vmm.entry`` if it has one, else ``vmm.cli``), with the
working directory outside any tree.  Findings: ``docs/startup-and-memory.md``.

Every run records the 1-minute load average before it; figures are
medians over the rounds, runners interleaved.  Targets (issue 15):
``vmm_nodev`` <= 1.5x ``qemu_microvm_kvm``, ``vmm_com1`` <= 2.5x, demo
<= 0.4 s, Pss of the demo's processes <= QEMU's Rss with the same devices.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
QEMU = "qemu-system-x86_64"
GUEST_RAM_MIB = 256
DEMO_DISK = 16 << 20
#: The demo's devices (vmm.cli.DEMO_DEVICES) plus COM1, as each VMM names them.
OURS_DEVICES = ("virtio-rng,id=rng", "virtio-blk,id=blk,serial=splitvmm-demo,path={disk}",
                "virtio-console,id=console")
QEMU_DEVICES = ("-device", "virtio-rng-pci", "-drive", "file={disk},if=none,id=d0,format=raw",
                "-device", "virtio-blk-pci,drive=d0,serial=splitvmm-demo",
                "-device", "virtio-serial-pci", "-chardev", "null,id=con0",
                "-device", "virtconsole,chardev=con0", "-serial", "null")


# -- building ------------------------------------------------------------------

def build_startup_guest(out_dir: pathlib.Path) -> pathlib.Path:
    """``startup_guest.S`` linked by the guest library's ``guest.ld``."""
    from vmm import guests

    src = HERE / "startup_guest.S"
    target = out_dir / "startup-guest.elf"
    if not target.exists() or target.stat().st_mtime < src.stat().st_mtime:
        subprocess.run([guests.compiler(), "-m64", "-nostdlib", "-static", "-no-pie", "-T",
                        str(guests.LINKER_SCRIPT), *guests.LDFLAGS, "-o", str(target), str(src)], check=True)
    return target


def vmm_command() -> list[str]:
    """What a user runs: the ``vmm`` script next to this interpreter."""
    script = pathlib.Path(sys.executable).with_name("vmm")
    return [str(script)] if script.exists() else [sys.executable, "-m", "vmm.cli"]


def qemu_command(machine: str, accel: str, elf: pathlib.Path) -> list[str]:
    return [QEMU, "-accel", accel, "-M", machine, "-m", str(GUEST_RAM_MIB), "-kernel", str(elf),
            "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-display", "none", "-nodefaults",
            "-no-reboot", "-serial", "none"]


# -- timing ----------------------------------------------------------------------

def time_command(cmd: list[str], expect: int, timeout: float, env: dict | None = None) -> float:
    """Wall seconds of one run of ``cmd``; RuntimeError unless it exits ``expect``."""
    t0 = time.perf_counter()
    # cwd: not a project tree ('' on sys.path of `python -c`/`-m` would pick the tree there).
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          timeout=timeout, env=env, cwd=tempfile.gettempdir())
    seconds = time.perf_counter() - t0
    if proc.returncode != expect:
        raise RuntimeError(f"{' '.join(cmd)}: status {proc.returncode}, expected {expect}: "
                           f"{proc.stderr.decode(errors='replace')[-1500:]}")
    return seconds


#: name -> (command, expected status[, environment])
Runners = dict[str, tuple]


def interleaved(runners: Runners, repeat: int, timeout: float,
                only_first: dict[str, int] | None = None, progress=None) -> dict[str, dict]:
    """Every runner once per round, rounds ``repeat`` times; per runner the
    median, min, max and the samples, each with the load before it."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
    errors: dict[str, str] = {}
    for i in range(repeat):
        for name, (cmd, expect, *env) in runners.items():
            if name in errors or (only_first and i >= only_first.get(name, repeat)):
                continue
            load = os.getloadavg()[0]
            try:
                samples[name].append((time_command(cmd, expect, timeout, env[0] if env else None), load))
            except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
                errors[name] = str(e)[-1500:]
            if progress:
                progress(f"round {i + 1}/{repeat} {name}")
    out: dict[str, dict] = {}
    for name in runners:
        if name in errors:
            out[name] = {"error": errors[name]}
            continue
        secs = [s for s, _ in samples[name]]
        out[name] = {"median_s": round(statistics.median(secs), 4), "min_s": round(min(secs), 4),
                     "max_s": round(max(secs), 4), "runs": len(secs),
                     "samples": [{"s": round(s, 4), "load_before": round(ld, 2)} for s, ld in samples[name]],
                     "command": " ".join(runners[name][0])}
        if len(runners[name]) > 2 and runners[name][2] is not None:
            out[name]["PYTHONPATH"] = runners[name][2].get("PYTHONPATH")
    return out


def bytecode_cached(tree) -> bool:
    """Whether the tree's modules have up-to-date .pyc files (with
    PYTHONDONTWRITEBYTECODE set, as on this project's machines, Python
    never writes them for an editable install: every process compiles
    every module it imports)."""
    import importlib.util
    paths = [pathlib.Path(tree) / p for p in ("vmm/cli.py", "ipc/protocol.py", "devserver/runtime.py")]
    for src in paths:
        pyc = pathlib.Path(importlib.util.cache_from_source(str(src)))
        if not pyc.exists() or pyc.stat().st_mtime < src.stat().st_mtime:
            return False
    return True


# -- memory ------------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    out = []
    for task in pathlib.Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.append(p)
            todo += _children(p)
    return seen


def smaps_rollup(pid: int) -> dict[str, int]:
    """Rss and Pss of one process in KiB (``/proc/PID/smaps_rollup``)."""
    out = {}
    for line in pathlib.Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
            out[key.lower() + "_kib"] = int(rest.split()[0])
    return out


def _comm(pid: int) -> str:
    try:
        cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [w.decode(errors="replace") for w in cmdline if w]
    return " ".join(pathlib.Path(words[0]).name if i == 0 else w for i, w in enumerate(words[:4]))


class Qmp:
    """The few lines of QMP both VMMs speak (greeting, capabilities, commands)."""

    def __init__(self, path: pathlib.Path, deadline: float):
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no QMP socket at {path}") from None
                time.sleep(0.02)
        self.sock.settimeout(max(1.0, deadline - time.monotonic()))
        self.file = self.sock.makefile("rb")
        self._read()                       # greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        while True:
            line = self.file.readline()
            if not line:
                raise RuntimeError("QMP connection closed")
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    def execute(self, command: str) -> dict:
        self.sock.sendall(json.dumps({"execute": command}).encode() + b"\n")
        return self._read()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@contextlib.contextmanager
def running_vm(cmd: list[str], qmp_path: pathlib.Path, timeout: float,
               settle: float) -> Iterator[subprocess.Popen]:
    """``with running_vm(...) as proc:`` -- ``cmd`` started, its QMP saying
    running for ``settle`` s; at the end told to quit and waited for
    (killed if it does not leave)."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        qmp = Qmp(qmp_path, deadline)
        try:
            while qmp.execute("query-status").get("return", {}).get("status") != "running":
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{cmd[0]}: the VM never ran")
                time.sleep(0.05)
            time.sleep(settle)
            yield proc
            qmp.execute("quit")
        finally:
            qmp.close()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def measure_memory(cmd: list[str], qmp_path: pathlib.Path, timeout: float, settle: float) -> dict:
    """Start ``cmd``, wait until its QMP says running (+ ``settle`` s), sum Rss/Pss over its process tree."""
    procs: list[dict[str, Any]] = []
    with running_vm(cmd, qmp_path, timeout, settle) as proc:
        for pid in tree(proc.pid):
            try:
                procs.append({"pid": pid, "what": _comm(pid), **smaps_rollup(pid)})
            except OSError:
                pass
    return {"processes": procs, "rss_mib": round(sum(p["rss_kib"] for p in procs) / 1024, 1),
            "pss_mib": round(sum(p["pss_kib"] for p in procs) / 1024, 1), "count": len(procs)}


def memory(tmp: pathlib.Path, spin: pathlib.Path, timeout: float) -> dict:
    disk = tmp / "mem-disk.img"
    with open(disk, "wb") as f:
        f.truncate(DEMO_DISK)
    out: dict = {"guest": "tests/guests/spin.c (ring 3, spins)", "guest_ram_mib": GUEST_RAM_MIB,
                 "load_before": round(os.getloadavg()[0], 2)}
    sock = tmp / "ours.qmp"
    ours = [*vmm_command(), "run", "--guest", str(spin), "--memory", f"{GUEST_RAM_MIB}M", "--api", str(sock),
            "--timeout", str(int(timeout)), "--cmdline", "counter=0x800000 flag=0x801000"]
    for d in OURS_DEVICES:
        ours += ["--device", d.format(disk=disk)]
    try:
        out["splitvmm"] = measure_memory(ours, sock, timeout, settle=0.5)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        out["splitvmm"] = {"error": str(e)}
    if shutil.which(QEMU):
        for name, machine in (("qemu_q35_kvm", "q35"), ("qemu_microvm_pcie_kvm", "microvm,pcie=on")):
            qsock = tmp / f"{name}.qmp"
            cmd = [QEMU, "-accel", "kvm", "-M", machine, "-m", str(GUEST_RAM_MIB), "-kernel", str(spin),
                   "-append", "counter=0x800000 flag=0x801000", "-display", "none", "-nodefaults",
                   "-no-reboot", "-qmp", f"unix:{qsock},server=on,wait=off",
                   *[a.format(disk=disk) for a in QEMU_DEVICES]]
            try:
                out[name] = measure_memory(cmd, qsock, timeout, settle=0.5)
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
                out[name] = {"error": str(e)}
    return out


# -- where the time goes --------------------------------------------------------

_IMPORTTIME = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)")


def importtime(module: str, top: int = 12) -> dict:
    """One ``python -X importtime -c 'import MODULE'``: total, and the
    largest self times (µs)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"],
                          capture_output=True, text=True, timeout=120)
    rows = []
    for line in proc.stderr.splitlines():
        m = _IMPORTTIME.match(line)
        if m:
            rows.append((int(m[1]), int(m[2]), len(m[3]) // 2, m[4]))
    total = next((cum for _, cum, depth, name in rows if name == module and depth == 0), None)
    rows.sort(reverse=True)
    return {"cumulative_ms": None if total is None else round(total / 1000, 1),
            "top_self_ms": {name: round(self_us / 1000, 1) for self_us, _, _, name in rows[:top]}}


#: The traced ``vmm run`` (``python -c`` so nothing else is imported first):
#: prints ``{"status", "marks": [[phase, seconds since exec]...]}`` on
#: stderr; exec time is the parent's monotonic clock in SPLITVMM_T0.
TRACE_CODE = r"""
import json, os, sys, time
marks = [("interpreter up", time.monotonic())]
server = spawned = None
try:
    import vmm.entry        # the vmm command's entry point: the fork server first
except ImportError:         # a tree from before it (--baseline)
    pass
else:
    if vmm.entry.wants_forkserver(sys.argv[1:]):
        import vmm.forkserver
        if hasattr(vmm.forkserver, "spawn_server"):     # as vmm.entry does: before the VMM's imports
            spawned = vmm.forkserver.spawn_server()
        else:
            server = vmm.forkserver.ForkServer.start()
        marks.append(("fork server started (it imports meanwhile)", time.monotonic()))
try:
    from vmm.deferred import defer_imports      # as vmm.entry does, before the VMM's imports
except ImportError:                             # a tree from before it
    pass
else:
    defer_imports()
import gc
gc.disable()
import vmm.cli
gc.enable()
if spawned is not None:
    server = vmm.forkserver.ForkServer.adopt(*spawned)
marks.append(("import vmm.cli", time.monotonic()))
from vmm.machine import Machine
from vmm.remote import process as _process

_start = _process.DeviceProcess.start
def _timed_start(*a, **kw):
    t = time.monotonic()
    p = _start(*a, **kw)
    marks.append((f"device process {a[2]} started (took {time.monotonic() - t:.4f} s, {type(p).__name__})",
                  time.monotonic()))
    return p
_process.DeviceProcess.start = staticmethod(_timed_start)

def wrap(name, label):
    original = getattr(Machine, name)
    def timed(self, *a, **kw):
        t = time.monotonic()
        try:
            return original(self, *a, **kw)
        finally:
            what = label(a) if callable(label) else label
            marks.append((f"{what} (took {time.monotonic() - t:.4f} s)", time.monotonic()))
    setattr(Machine, name, timed)

wrap("__init__", "Machine(): KVM, memory, registry, vCPUs")
wrap("load_pvh", "load_pvh")
wrap("add_device", lambda a: f"add_device {a[0].name}")
if hasattr(Machine, "add_devices"):
    wrap("add_devices", lambda a: f"add_devices {', '.join(spec.name for spec, _ in a[0])}")
wrap("run", "run: guest start to ending")
wrap("close", "close: teardown")
status = vmm.cli.main(sys.argv[1:], forkserver=server) if server is not None else vmm.cli.main(sys.argv[1:])
marks.append(("main returned", time.monotonic()))
t0 = float(os.environ["SPLITVMM_T0"])
print(json.dumps({"status": status, "marks": [(n, round(t - t0, 4)) for n, t in marks]}), file=sys.stderr)
sys.exit(status)
"""


def trace(args: list[str], expect: int, timeout: float) -> dict:
    env = dict(os.environ)
    load = os.getloadavg()[0]
    t0 = time.monotonic()
    env["SPLITVMM_T0"] = repr(t0)
    proc = subprocess.run([sys.executable, "-c", TRACE_CODE, *args],
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          timeout=timeout, env=env)
    wall = time.monotonic() - t0
    line = next((ln for ln in reversed(proc.stderr.decode(errors="replace").splitlines())
                 if ln.startswith('{"status"')), None)
    if line is None or proc.returncode != expect:
        return {"error": f"status {proc.returncode}: {proc.stderr.decode(errors='replace')[-1500:]}"}
    data = json.loads(line)
    data["load_before"] = round(load, 2)
    return {"wall_s": round(wall, 4), "seconds_since_exec": dict(data["marks"]),
            "load_before": data["load_before"]}


# -- the report ---------------------------------------------------------------------

def _ratio(a: dict, b: dict) -> float | None:
    if "median_s" in a and "median_s" in b and b["median_s"] > 0:
        return round(a["median_s"] / b["median_s"], 2)
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vmm.bench.startup", description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--q35-repeat", type=int, default=1,
                    help="rounds of the slow q35+KVM runner (SeaBIOS in emulated ring 0; default 1)")
    ap.add_argument("--skip", action="append", default=[],
                    choices=["demo", "qemu", "memory", "phases", "q35-kvm"])
    ap.add_argument("--timeout", type=float, default=120, help="per run, seconds (default 120)")
    ap.add_argument("--baseline", action="append", default=[], metavar="LABEL=DIR",
                    help="also time the vmm runners with the project tree at DIR (PYTHONPATH), "
                         "interleaved, as LABEL:vmm_... (e.g. before=/tmp/main-export)")
    ap.add_argument("--cache", default=None, help="build directory (default: a temporary one)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)

    def progress(text: str) -> None:
        if not args.quiet:
            print(f"startup: {text}", file=sys.stderr, flush=True)

    tmp_ctx = tempfile.TemporaryDirectory(prefix="splitvmm-startup-")
    tmp = pathlib.Path(tmp_ctx.name)
    cache = pathlib.Path(args.cache) if args.cache else tmp
    try:
        from vmm import guests
        elf = build_startup_guest(cache)
        spin = guests.build([ROOT / "tests" / "guests" / "spin.c"], cache, name="spin")
        have_qemu = shutil.which(QEMU) is not None and "qemu" not in args.skip
        report: dict = {
            "benchmark": "start-up: wall time of the whole command on a guest whose first instructions "
                         "write the test-exit port; memory of the demo's devices",
            "host_cpus": os.cpu_count(), "load_avg_before": round(os.getloadavg()[0], 2),
            "repeats": args.repeat, "guest": "vmm/bench/startup_guest.S (PVH, 32-bit, out 0xf4 first)",
            "unit": "seconds, wall, exec to exit; median of interleaved runs",
            "qemu_version": (subprocess.run([QEMU, "--version"], capture_output=True, text=True)
                             .stdout.splitlines() or ["?"])[0] if have_qemu else None,
        }
        vmm = vmm_command()
        runners: Runners = {
            "vmm_nodev": ([*vmm, "run", "--guest", str(elf), "--serial", "none"], 1),
            "vmm_com1": ([*vmm, "run", "--guest", str(elf)], 1),
        }
        if "demo" not in args.skip:
            # The demo guest is built into the user's cache once: do it before timing.
            subprocess.run([*vmm, "run"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=args.timeout)
            runners["vmm_demo"] = ([*vmm, "run"], 0)
        # Other trees of the project, same commands, interleaved with this one
        # (before/after figures of one run): PYTHONPATH=DIR reaches the device
        # processes too.
        for spec in args.baseline:
            label, _, tree_dir = spec.partition("=")
            root = pathlib.Path(tree_dir).resolve()
            env = dict(os.environ, PYTHONPATH=str(root))
            # What that tree's own ``vmm`` script runs (its entry point).
            if (root / "vmm" / "entry.py").exists():     # the console script's own function
                code = "import vmm.entry as e; getattr(e, 'command', None) and e.command(); raise SystemExit(e.main())"
            else:
                code = "import sys; from vmm.cli import main; sys.exit(main())"
            script = [sys.executable, "-c", code]
            for name in [n for n in runners if n.startswith("vmm_")]:
                cmd, expect = runners[name][:2]
                runners[f"{label}:{name}"] = ([*script, *cmd[len(vmm):]], expect, env)
            report.setdefault("trees", {})[label] = {"path": tree_dir, "bytecode_cached": bytecode_cached(tree_dir)}
        report.setdefault("trees", {})["this"] = {"path": str(ROOT), "bytecode_cached": bytecode_cached(ROOT)}
        limit: dict[str, int] = {}
        if have_qemu:
            for machine in ("microvm", "q35"):
                for accel in ("kvm", "tcg"):
                    if machine == "q35" and accel == "kvm":
                        if "q35-kvm" in args.skip:
                            continue
                        limit["qemu_q35_kvm"] = args.q35_repeat
                    runners[f"qemu_{machine}_{accel}"] = (qemu_command(machine, accel, elf), 1)
        progress(f"{len(runners)} runners x {args.repeat} rounds: {', '.join(runners)}")
        times = interleaved(runners, args.repeat, args.timeout, limit, progress)
        report["startup"] = times
        ratios: dict = {}
        base = times.get("qemu_microvm_kvm", {})
        for ours, target in (("vmm_nodev", 1.5), ("vmm_com1", 2.5), ("vmm_demo", None)):
            r = _ratio(times.get(ours, {}), base)
            if r is not None:
                ratios[f"{ours}/qemu_microvm_kvm"] = r
                if target:
                    ratios[f"{ours}/qemu_microvm_kvm target"] = target
        report["ratios"] = ratios
        if "median_s" in times.get("vmm_demo", {}):
            report["demo_target_s"] = 0.4
        if "phases" not in args.skip:
            progress("phases: interpreter, imports, a traced vmm run")
            py = sys.executable
            imports = interleaved({
                "python -c pass": ([py, "-c", "pass"], 0),
                "python -S -c pass (no site, no editable finder)": ([py, "-S", "-c", "pass"], 0),
                "import devserver.cli": ([py, "-c", "import devserver.cli"], 0),
                "import vmm.cli": ([py, "-c", "import vmm.cli"], 0),
                "import ipc.protocol": ([py, "-c", "import ipc.protocol"], 0),
            }, args.repeat, args.timeout)
            report["phases"] = {
                "commands": {k: v.get("median_s", v.get("error")) for k, v in imports.items()},
                "importtime_devserver_cli": importtime("devserver.cli"),
                "importtime_vmm_cli": importtime("vmm.cli"),
                "trace_vmm_com1": trace(["run", "--guest", str(elf)], 1, args.timeout),
                "trace_vmm_demo": (trace(["run"], 0, args.timeout) if "demo" not in args.skip else None),
            }
        if "memory" not in args.skip:
            progress("memory: the demo's devices under vmm and QEMU")
            mem = memory(tmp, spin, args.timeout)
            report["memory"] = mem
            ours = mem.get("splitvmm", {})
            for name in ("qemu_q35_kvm", "qemu_microvm_pcie_kvm"):
                q = mem.get(name, {})
                if "pss_mib" in ours and "rss_mib" in q:
                    ratios[f"splitvmm pss/{name} rss"] = round(ours["pss_mib"] / q["rss_mib"], 2)
        report["load_avg_after"] = round(os.getloadavg()[0], 2)
        json.dump(report, sys.stdout, indent=2)
        print()
        errors = [k for k, v in times.items() if "error" in v]
        return 1 if errors else 0
    finally:
        tmp_ctx.cleanup()


if __name__ == "__main__":
    sys.exit(main())
