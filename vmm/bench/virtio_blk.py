"""virtio-blk against QEMU: ``python -m vmm.bench.virtio_blk`` prints JSON.

One guest ELF (``virtio_blk_guest.c`` with the driver library of
``vmm/guests/virtio.h``, its work in **ring 3**) does sequential 1 MiB reads
and random 4 KiB reads at queue depth 1 on the same raw image, then random
4 KiB reads at queue depth ``--qd`` (32: 32 in flight on each queue,
several per doorbell), every read verified against the image's pattern,
timed with rdtsc in the guest.  With ``--queues 1,2,4`` the depth phase
runs again with 2 and 4 queues (VIRTIO_BLK_F_MQ): the guest is one vCPU in
ring 3 that drives its queues round-robin (reap, verify, refill, one
doorbell per queue per round) -- the device side has a thread per queue;
the guest side is one CPU, as fio's io_uring with one job is.  It runs
under

(a) ``splitvmm``: ``vmm run`` with the ``virtio-blk`` device in its own
    process (sandboxed, as by default), ``num_queues=N``;
(b) ``qemu``: QEMU's in-process ``virtio-blk-pci`` (``-enable-kvm -M q35
    -kernel guest.elf``, ``num-queues=N``, served in QEMU's main loop);
(c) ``qemu_iothread``: the same with ``-object iothread,id=io0`` and
    ``iothread=io0``;
(d) ``qemu_vhost_user``: QEMU with ``qemu-storage-daemon`` serving the
    image as ``vhost-user-blk`` (``num-queues=N``; out of process, guest RAM
    in a shared memfd), the export in an iothread of the daemon (which
    polls, as (c)'s iothread and (a)'s doorbell thread do; without it,
    ``--qsd-main-loop``, the export runs in the daemon's main loop, which
    does not poll, and was slower in an interleaved run here: 1 MiB median
    8.0 against 16.7 GB/s, 3 runs each, load average 2.2).

Like with like: all four read the same image through the host's page
cache (QEMU ``cache=writeback``, the daemon ``cache.direct=off``, (a)
buffered ``preadv``), with ``aio=threads`` (QEMU's default) for the
peers; the guest's 1 MiB read is one 1 MiB descriptor on every runner
(none offers size_max), so each side does one 1 MiB copy from the page
cache into guest RAM per request.  Guest RAM: (a) and (d) a shared memfd
(4 KiB pages where the host's ``shmem_enabled`` is ``never``), (b) and
(c) QEMU's anonymous RAM (transparent huge pages with ``enabled=madvise``);
with shmem huge pages on, (a) went 25.1 -> 25.5 GB/s: the page size is
not where the time goes.

Trustworthy figures on a small, shared host: each run does ``--rounds``
short rounds (every phase once per round, each round one sample), runs
are interleaved (each repeat runs every configuration of every runner
once, the runners' order rotated from one repeat to the next), and before
each run the benchmark waits (at most ``--quiet-wait`` s) for the host's
CPU to be at most ``--quiet-below`` busy.  Figures are medians over all
samples, with quartiles, range and the spread (IQR / median); the ratios
are of medians, and ``paired_ratios`` pairs the runs of the same repeat
(median and range of the per-pair ratios).  The report carries
``uptime`` and the load before, the load after and how busy the CPU was
before each run.

The TSC rate comes from the host: the guest prints a ``tsc`` line before
and after its work and the host timestamps both lines as they arrive (the
same delay at both ends cancels).  QEMU is installed with apt-get when it
is missing (needs root).  Not part of the tests.  Absolute figures on the
project's nested PVM host are not those of a real host; the ratios of the
same run are what count (issue 15 §4 targets: 4 KiB QD1 >= 1.2x (d); 4 KiB
QD32 >= 1.0x (d) and (c); 1 MiB >= 1.0x (c) and (d)).  The host has few CPUs: anything else running
(a test suite) skews the figures badly -- the report carries the load
average before and after.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from vmm import guests
from devices.kinds import kinds

log = logging.getLogger(__name__)

HERE = pathlib.Path(__file__).resolve().parent
GUEST_SOURCES = (HERE / "virtio_blk_guest.c", guests.HERE / "virtio.c", guests.HERE / "pci.c",
                 guests.HERE / "serial.c")
QEMU = "qemu-system-x86_64"
QSD = "qemu-storage-daemon"
SECTOR = 512
MiB = 1 << 20
MEMORY_MIB = 256
#: the ``--device`` of runner (a); {image} is replaced by the image path.
DEFAULT_OURS_DEVICE = "virtio-blk,path={image}"

_RESULT = re.compile(r"^result (\w+) bytes=(\d+) requests=(\d+) tsc=(\d+)")


class BenchError(RuntimeError):
    pass


def ensure_qemu() -> None:
    """Installs qemu-system-x86 and qemu-utils with apt-get when QEMU is
    missing."""
    if shutil.which(QEMU) and shutil.which(QSD):
        return
    if os.geteuid() != 0:
        raise BenchError(f"{QEMU} is not installed and installing it needs root "
                         "(apt-get install -y qemu-system-x86 qemu-utils)")
    log.info("installing QEMU with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "qemu-system-x86", "qemu-utils"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise BenchError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    if not shutil.which(QEMU):
        raise BenchError(f"{QEMU} still missing after apt-get")


def qemu_version() -> str:
    out = subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0] if out else "?"


def build_guest(cache: pathlib.Path) -> pathlib.Path:
    return guests.build(GUEST_SOURCES, cache, name="virtio-blk-bench")


def make_image(path: pathlib.Path, size_mib: int) -> None:
    """A raw image whose every 512-byte sector starts with its number
    (u64 little-endian), the rest zero -- what the guest verifies."""
    sectors_per_chunk = 2048
    with open(path, "wb") as f:
        for base in range(0, size_mib * 2048, sectors_per_chunk):
            chunk = bytearray(sectors_per_chunk * SECTOR)
            for i in range(sectors_per_chunk):
                chunk[i * SECTOR:i * SECTOR + 8] = (base + i).to_bytes(8, "little")
            f.write(chunk)


def run_guest(cmd: list[str], timeout: float, cleanup=None, cwd: pathlib.Path | None = None,
              env: dict[str, str] | None = None) -> dict:
    """Runs one VM (QEMU or vmm), timestamps the ``tsc`` lines, parses the
    results.  Returns {"phases": {...}, "tsc_hz": .., "lines": [...]}"""
    log.debug("running %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, cwd=cwd, env=env)
    assert proc.stdout is not None and proc.stderr is not None     # both PIPE
    stamps: list[tuple[int, int]] = []
    lines: list[str] = []
    phases: dict[str, list[tuple[int, int, int]]] = {}
    timed_out: list[bool] = []

    def kill() -> None:
        timed_out.append(True)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    watchdog = threading.Timer(timeout, kill)
    watchdog.start()
    try:
        for raw in proc.stdout:
            now = time.perf_counter_ns()
            line = raw.decode(errors="replace").rstrip("\r\n")
            lines.append(line)
            if line.startswith("tsc "):
                stamps.append((int(line.split()[1]), now))
            m = _RESULT.match(line)
            if m:
                phases.setdefault(m[1], []).append((int(m[2]), int(m[3]), int(m[4])))
        proc.wait()
    finally:
        watchdog.cancel()
        if cleanup is not None:
            cleanup()
    if timed_out:
        raise BenchError(f"{cmd[0]} timed out after {timeout} s; output so far:\n" + "\n".join(lines[-20:]))
    err = proc.stderr.read().decode(errors="replace")
    if "done" not in lines:
        raise BenchError(f"{cmd[0]} exited with {proc.returncode} before the guest was done:\n"
                         + "\n".join(lines[-20:]) + "\n" + err[-2000:])
    tsc_hz = None
    if len(stamps) >= 2:
        (tsc0, t0), (tsc1, t1) = stamps[0], stamps[-1]
        tsc_hz = (tsc1 - tsc0) / ((t1 - t0) / 1e9)
    return {"phases": phases, "tsc_hz": tsc_hz, "lines": lines, "status": proc.returncode}


def qemu_common(elf: pathlib.Path, cmdline: str) -> list[str]:
    return [QEMU, "-enable-kvm", "-M", "q35", "-m", str(MEMORY_MIB), "-no-reboot", "-kernel", str(elf),
            "-append", cmdline, "-device", "isa-debug-exit,iobase=0xf4", "-serial", "stdio",
            "-display", "none", "-nodefaults"]


def run_qemu(elf: pathlib.Path, image: pathlib.Path, cmdline: str, timeout: float, queues: int = 1,
             iothread: bool = False) -> dict:
    cmd = qemu_common(elf, cmdline) + (["-device", "virtio-rng-pci"] if "bench=0" in cmdline else []) + [
        "-drive", f"file={image},if=none,id=d0,format=raw,cache=writeback,aio=threads"]
    dev = f"virtio-blk-pci,drive=d0,serial=splitvmm-bench,num-queues={queues}"
    if iothread:
        cmd += ["-object", "iothread,id=io0"]
        dev += ",iothread=io0"
    return run_guest(cmd + ["-device", dev], timeout)


def run_qemu_vhost(elf: pathlib.Path, image: pathlib.Path, cmdline: str, timeout: float,
                   tmp: pathlib.Path, queues: int = 1, iothread: bool = True) -> dict:
    """Runner (d); ``iothread``: the export in an iothread of the daemon."""
    sock = tmp / "vhost-user-blk.sock"
    sock.unlink(missing_ok=True)
    # With an iothread the export runs in its own event loop, which polls
    # (poll-max-ns, 32 us by default) as runner (c)'s does and as runner
    # (a)'s doorbell thread does (poll_us); without one, in the daemon's
    # main loop, which does not poll.
    io = ["--object", "iothread,id=io0"] if iothread else []
    qsd = subprocess.Popen(
        [QSD, *io, "--blockdev", f"driver=file,node-name=file0,filename={image},cache.direct=off,aio=threads",
         "--blockdev", "driver=raw,node-name=disk0,file=file0",
         "--export", f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={sock},"
                     f"writable=on,num-queues={queues}" + (",iothread=io0" if iothread else "")],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)

    def stop() -> None:
        if qsd.poll() is None:
            qsd.terminate()
            try:
                qsd.wait(timeout=10)
            except subprocess.TimeoutExpired:
                qsd.kill()
                qsd.wait()

    for _ in range(200):
        if sock.exists() or qsd.poll() is not None:
            break
        time.sleep(0.05)
    if not sock.exists():
        stop()
        assert qsd.stderr is not None
        raise BenchError(f"qemu-storage-daemon did not come up: {qsd.stderr.read().decode(errors='replace')}")
    cmd = qemu_common(elf, cmdline)
    cmd[cmd.index("-M") + 1] = "q35,memory-backend=mem0"
    cmd += ["-object", f"memory-backend-memfd,id=mem0,size={MEMORY_MIB}M,share=on",
            "-chardev", f"socket,id=vu0,path={sock}",
            "-device", f"vhost-user-blk-pci,chardev=vu0,num-queues={queues}"]
    return run_guest(cmd, timeout, cleanup=stop)


def ours_available() -> bool:
    return "virtio-blk" in kinds()


def run_ours(elf: pathlib.Path, image: pathlib.Path, cmdline: str, timeout: float, device: str,
             queues: int = 1, tree: pathlib.Path | None = None) -> dict:
    """Runner (a); ``tree``: another tree of the project (its own
    packages, its built .so files) instead of this one."""
    spec = device.format(image=image) + (f",num_queues={queues}" if queues > 1 else "")
    cmd = [sys.executable, "-m", "vmm.cli", "run", "--guest", str(elf), "--memory", f"{MEMORY_MIB}M",
           "--cmdline", cmdline, "--timeout", str(int(timeout)), "--serial", "stdio",
           "--device", spec]
    if "bench=0" in cmdline and "virtio-rng" in kinds():
        cmd += ["--device", "virtio-rng"]
    if tree is None:
        return run_guest(cmd, timeout + 30)
    env = dict(os.environ, PYTHONPATH=str(tree))     # the VMM and its device processes
    return run_guest(cmd, timeout + 30, cwd=tree, env=env)


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def run_medians(res: dict, tsc_hz: float) -> dict[str, float]:
    """One run's median per phase (MB/s for seq phases, else IOPS)."""
    out = {}
    for phase, samples in res["phases"].items():
        vals = [(nbytes / 1e6 if phase.startswith("seq") else nreq) / (tsc / tsc_hz) for nbytes, nreq, tsc in samples]
        if vals:
            out[phase] = statistics.median(vals)
    return out


def summarize(runs: list[dict], tsc_hz: float) -> dict:
    """MB/s (10^6 bytes) and IOPS per phase over every sample (round) of
    every run: median, quartiles, range, and the spread (interquartile
    range / median); per-run medians show the run-to-run variance."""
    out: dict = {}
    for phase in sorted({p for r in runs for p in r["phases"]}):
        mbs, iops, per_run = [], [], []
        for r in runs:
            run_iops = []
            for nbytes, nreq, tsc in r["phases"].get(phase, []):
                secs = tsc / tsc_hz
                mbs.append(nbytes / secs / 1e6)
                iops.append(nreq / secs)
                run_iops.append(nreq / secs)
            if run_iops:
                per_run.append(round(statistics.median(run_iops)))
        if mbs:
            key = mbs if phase.startswith("seq") else iops
            med = statistics.median(key)
            out[phase] = {"MB_s": round(statistics.median(mbs), 1), "MB_s_best": round(max(mbs), 1),
                          "IOPS": round(statistics.median(iops)), "IOPS_best": round(max(iops)),
                          "us_per_request": round(1e6 / statistics.median(iops), 1), "samples": len(mbs),
                          "p25_p75": [round(_quantile(key, 0.25), 1), round(_quantile(key, 0.75), 1)],
                          "min_max": [round(min(key), 1), round(max(key), 1)],
                          "spread": round((_quantile(key, 0.75) - _quantile(key, 0.25)) / med, 3) if med else None,
                          "IOPS_per_run": per_run}
    return out


def cpu_busy(interval: float = 0.5) -> float:
    """The fraction of the host's CPU time not idle over ``interval``
    seconds (/proc/stat; idle and iowait count as idle)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]
    t0, i0 = sample()
    time.sleep(interval)
    t1, i1 = sample()
    return round(1 - (i1 - i0) / (t1 - t0), 3) if t1 > t0 else 0.0


def wait_quiet(below: float, max_wait: float) -> float:
    """Waits until the host's CPU is busier than ``below`` no more (at
    most ``max_wait`` seconds); returns the last busy fraction seen."""
    deadline = time.monotonic() + max_wait
    busy = cpu_busy()
    while busy > below and time.monotonic() < deadline:
        busy = cpu_busy()
    return busy


RUNNERS = ("splitvmm", "qemu", "qemu_iothread", "qemu_vhost_user")
#: (ours, peer, phase, target) of issue 15 §4; a phase "rand4k_qd" is the
#: depth phase with one queue.
TARGETS = (("seq1m", "qemu_iothread", 1.0), ("seq1m", "qemu_vhost_user", 1.0),
           ("rand4k", "qemu_vhost_user", 1.2),
           ("rand4k_qd", "qemu_vhost_user", 1.0), ("rand4k_qd", "qemu_iothread", 1.0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vmm.bench.virtio_blk", description=__doc__.split("\n\n")[0])
    ap.add_argument("--image-mib", type=int, default=64, help="image size (default 64 MiB)")
    ap.add_argument("--passes", type=int, default=1, help="1 MiB passes over the image per round (default 1)")
    ap.add_argument("--n4k", type=int, default=2000, help="4 KiB reads per phase and round (default 2000)")
    ap.add_argument("--rounds", type=int, default=5,
                    help="rounds inside each run: every phase once per round (default 5); each round is a sample")
    ap.add_argument("--qd", type=int, default=32, help="queue depth of the depth phase, per queue (default 32; "
                    "1: none)")
    ap.add_argument("--queues", default="1,2,4",
                    help="queue counts of the depth phase (default 1,2,4; the 1 MiB and QD1 phases run with 1)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs of each runner, interleaved, the order rotated each time (default 3)")
    ap.add_argument("--quiet-below", type=float, default=0.5,
                    help="before each run, wait until the host's CPU is at most this busy (fraction of all "
                         "CPUs, default 0.5; 1: do not wait)")
    ap.add_argument("--quiet-wait", type=float, default=20,
                    help="the longest wait for a quiet host before a run, seconds (default 20)")
    ap.add_argument("--msix", action="store_true", help="completion by MSI-X (the guest still polls)")
    ap.add_argument("--qsd-main-loop", action="store_true",
                    help="runner (d)'s export in qemu-storage-daemon's main loop (no polling), not an iothread")
    ap.add_argument("--skip", action="append", default=[], choices=list(RUNNERS))
    ap.add_argument("--ours-device", default=DEFAULT_OURS_DEVICE,
                    help=f"--device of runner (a) (default {DEFAULT_OURS_DEVICE!r}; num_queues= is added)")
    ap.add_argument("--timeout", type=float, default=600, help="per run, seconds (default 600)")
    ap.add_argument("--baseline", metavar="DIR", default=None,
                    help="also run runner (a) from another tree of the project (e.g. a git archive of main "
                         "with its .so files built), interleaved: runner splitvmm_baseline")
    ap.add_argument("--probe-only", action="store_true",
                    help="only the guest's device checks (bench=0, plus a virtio-rng device): "
                         "prints what each runner's guest found")
    ap.add_argument("--cache", default=None, help="build directory (default: a temporary one)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, stream=sys.stderr)
    try:
        queue_counts = [int(q) for q in args.queues.split(",")]
    except ValueError:
        ap.error(f"--queues {args.queues!r}: comma-separated numbers")
    if not queue_counts or any(not 1 <= q <= 4 for q in queue_counts):
        ap.error(f"--queues {args.queues!r}: each 1 to 4 (the guest library's VIRTIO_MAX_QUEUES)")
    if not 1 <= args.qd <= 32:
        ap.error(f"--qd {args.qd}: 1 to 32")

    runners = [r for r in RUNNERS if r not in args.skip]
    baseline = pathlib.Path(args.baseline).resolve() if args.baseline else None
    if baseline is not None:
        runners.insert(1, "splitvmm_baseline")
    if any(r.startswith("qemu") for r in runners):
        ensure_qemu()
    tmp_ctx = tempfile.TemporaryDirectory(prefix="splitvmm-blkbench-")
    tmp = pathlib.Path(tmp_ctx.name)
    cache = pathlib.Path(args.cache) if args.cache else tmp
    try:
        elf = build_guest(cache)
        image = tmp / "disk.img"
        make_image(image, args.image_mib)
        base = f"passes={args.passes} n4k={args.n4k} msix={1 if args.msix else 0} rounds={args.rounds}"
        if args.probe_only:
            configs = [(1, f"bench=0 {base}")]
        else:
            # the first configuration carries the QD1 phases; the others only the depth phase
            configs = [(q, f"bench=1 {base} queues={q} qd={args.qd} qd1={1 if i == 0 else 0}")
                       for i, q in enumerate(queue_counts)]
        load_before = [round(x, 2) for x in os.getloadavg()]
        report: dict = {
            "benchmark": "virtio-blk reads from one guest ELF: sequential 1 MiB and random 4 KiB at queue "
                         f"depth 1 (one queue), random 4 KiB at depth {args.qd} per queue on "
                         f"{queue_counts} queues (one ring-3 vCPU, queues round-robin), every read verified",
            "guest_ring": 3, "completion": "MSI-X (guest polls too)" if args.msix else "polling the used ring",
            "image_mib": args.image_mib, "passes_1m": args.passes, "reads_4k": args.n4k, "qd": args.qd,
            "queues": queue_counts, "repeats": args.repeat, "rounds": args.rounds, "host_cpus": os.cpu_count(),
            "load_avg_before": load_before, "uptime_before": _uptime(),
            "qemu_version": qemu_version() if shutil.which(QEMU) else None,
            "qsd_export": "main loop" if args.qsd_main_loop else "iothread",
            "unit": "MB/s = 10^6 bytes/s; median and best over interleaved runs; guest TSC, rate calibrated by "
                    "the host",
        }
        if "splitvmm" in runners and not ours_available():
            report["splitvmm"] = "not available: no virtio-blk kind registered (devices.kinds)"
            runners.remove("splitvmm")
        raw: dict[str, list[dict]] = {r: [] for r in runners}
        errors: dict[str, str] = {}
        failed: dict[str, list] = {}
        busy_before: list[float] = []
        for rep in range(1 if args.probe_only else args.repeat):
            for queues, cmdline in configs:
                for r in runners[rep % len(runners):] + runners[:rep % len(runners)]:
                    if r in errors:
                        continue
                    if args.quiet_below < 1:
                        busy_before.append(wait_quiet(args.quiet_below, args.quiet_wait))
                    for attempt in (1, 2):     # one retry: a failed run is counted, not hidden
                        try:
                            if r == "qemu":
                                res = run_qemu(elf, image, cmdline, args.timeout, queues)
                            elif r == "qemu_iothread":
                                res = run_qemu(elf, image, cmdline, args.timeout, queues, iothread=True)
                            elif r == "qemu_vhost_user":
                                res = run_qemu_vhost(elf, image, cmdline, args.timeout, tmp, queues,
                                                     iothread=not args.qsd_main_loop)
                            elif r == "splitvmm_baseline":
                                res = run_ours(elf, image, cmdline, args.timeout, args.ours_device, queues,
                                               tree=baseline)
                            else:
                                res = run_ours(elf, image, cmdline, args.timeout, args.ours_device, queues)
                        except BenchError as e:
                            failed.setdefault(r, []).append(str(e).splitlines()[-3:])
                            log.error("%s: %s", r, e)
                            if attempt == 2:
                                errors[r] = str(e)
                            continue
                        res["repeat"] = rep
                        raw[r].append(res)
                        break
        tsc_all = [res["tsc_hz"] for runs in raw.values() for res in runs if res["tsc_hz"]]
        tsc_hz = statistics.median(tsc_all) if tsc_all else 0.0
        if tsc_all:
            report["tsc_hz"] = round(tsc_hz)
            report["tsc_hz_spread"] = [round(min(tsc_all)), round(max(tsc_all))]
        for r in runners:
            if r in errors:
                report[r] = {"error": errors[r]}
                continue
            if args.probe_only:
                report[r] = {"found": [ln for ln in raw[r][0]["lines"] if ln.startswith("virtio-blk:")]}
            else:
                report[r] = summarize(raw[r], tsc_hz)
                report[r]["found"] = [ln for ln in raw[r][0]["lines"]
                                      if ln.startswith(("virtio-blk: blk", "virtio-blk: features",
                                                        "virtio-blk: capacity", "virtio-blk: notifies"))]
        report["failed_runs"] = failed
        report["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
        if busy_before:
            report["cpu_busy_before_runs"] = {"median": statistics.median(busy_before), "max": max(busy_before),
                                              "runs": len(busy_before), "threshold": args.quiet_below}
        if not args.probe_only:
            report["ratios"] = ratios(report)
            report["paired_ratios"] = paired_ratios(raw, tsc_hz)
            report["targets"] = targets(report, args.qd)
        json.dump(report, sys.stdout, indent=2)
        print()
        return 1 if errors else 0
    finally:
        tmp_ctx.cleanup()


def _key(phase: str) -> str:
    return "MB_s" if phase.startswith("seq") else "IOPS"


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def paired_ratios(raw: dict[str, list[dict]], tsc_hz: float) -> dict:
    """splitvmm / each peer per phase, pairing the runs of the same
    repeat (run back to back): each pair's ratio of per-run medians, then
    the median and range of those.  Robust to the host's load drifting
    between repeats, as a ratio of overall medians is not."""
    out: dict = {}
    ours: dict[int, list[dict[str, float]]] = {}
    for res in raw.get("splitvmm", []):
        ours.setdefault(res["repeat"], []).append(run_medians(res, tsc_hz))
    for peer in ("qemu", "qemu_iothread", "qemu_vhost_user", "splitvmm_baseline"):
        theirs: dict[int, list[dict[str, float]]] = {}
        for res in raw.get(peer, []):
            theirs.setdefault(res["repeat"], []).append(run_medians(res, tsc_hz))
        per_phase: dict[str, list[float]] = {}
        for rep, mine in ours.items():
            for a, b in zip(mine, theirs.get(rep, []), strict=False):
                for phase, v in a.items():
                    if b.get(phase):
                        per_phase.setdefault(phase, []).append(v / b[phase])
        for phase, rs in per_phase.items():
            out[f"splitvmm/{peer} {phase}"] = {"median": round(statistics.median(rs), 3),
                                               "min_max": [round(min(rs), 3), round(max(rs), 3)], "pairs": len(rs)}
    return out


def ratios(report: dict) -> dict:
    """splitvmm / each peer (and vhost-user / QEMU) for every phase both have."""
    out: dict = {}
    for ours in ("splitvmm", "qemu_vhost_user"):
        for base in ("qemu", "qemu_iothread", "qemu_vhost_user", "splitvmm_baseline"):
            a_all, b_all = report.get(ours), report.get(base)
            if ours == base or not isinstance(a_all, dict) or not isinstance(b_all, dict):
                continue
            for phase, a in a_all.items():
                b = b_all.get(phase)
                if isinstance(a, dict) and isinstance(b, dict) and b.get(_key(phase)):
                    out[f"{ours}/{base} {phase}"] = round(a[_key(phase)] / b[_key(phase)], 3)
    return out


def targets(report: dict, qd: int) -> list[dict]:
    """Issue 15 §4's targets, each with the measured ratio and met or not."""
    out = []
    for phase, peer, want in TARGETS:
        name = f"rand4k_qd{qd}_q1" if phase == "rand4k_qd" else phase
        got = report.get("ratios", {}).get(f"splitvmm/{peer} {name}")
        paired = report.get("paired_ratios", {}).get(f"splitvmm/{peer} {name}", {})
        out.append({"phase": name, "peer": peer, "target": want, "ratio": got,
                    "paired_median": paired.get("median"), "paired_min_max": paired.get("min_max"),
                    "met": None if got is None else got >= want})
    return out


if __name__ == "__main__":
    sys.exit(main())
