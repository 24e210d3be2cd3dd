"""Every benchmark of the project into one folder: ``python -m
vmm.bench.report [--out DIR] [--quick] [--only NAME]...`` (``make bench``).

:data:`BENCHMARKS` is the one table: a benchmark is a command that prints
one JSON document on stdout (progress and logs on stderr) and a few
*headline* figures picked from that JSON by path.  Adding one is one line.
The runner runs them one after another (they share 2 CPUs with everything
else, so never in parallel), shows progress on the terminal, and writes
into ``DIR`` (default ``bench-report/<date>-<time>/``):

- ``NAME.json``: each benchmark's own JSON, as it printed it (with
  ``NAME.stderr.txt`` when it said anything there);
- ``report.md``: one table of the headline figures -- value, target, and
  whether it is met -- plus the load average before each benchmark and
  how long it took;
- ``NAME.png``: a bar chart of each benchmark's headline figures (targets
  as red ticks), and ``ratios.png``: every same-run ratio of the run in
  one chart, 1.0 marked;
- ``run.json``: what ran, when, its status and duration.

A benchmark that fails or whose command does not exist (another branch
has not landed) is listed as such; the others still run.  The run's status
is 1 if any benchmark failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any


@dataclasses.dataclass(frozen=True)
class Row:
    """One headline figure: ``path`` into the benchmark's JSON (dots; a
    list index is a number), what it is, its unit, an optional target and
    whether lower is better.  A ``ratio`` row (unit "x") also goes into
    ``ratios.png``."""

    label: str
    path: str
    unit: str
    target: float | None = None
    lower_is_better: bool = True


@dataclasses.dataclass(frozen=True)
class Bench:
    name: str
    title: str
    #: the module run as ``python -m MODULE`` (its presence decides whether it runs)
    module: str
    args: tuple[str, ...] = ()
    #: extra arguments of ``--quick`` (a short run; the figures get noisier)
    quick: tuple[str, ...] = ()
    rows: tuple[Row, ...] = ()
    timeout: float = 1800


def R(label: str, path: str, unit: str, target: float | None = None, lower: bool = True) -> Row:
    return Row(label, path, unit, target, lower)


#: Every benchmark, in the order they run.  One line (one Bench) each.
BENCHMARKS: tuple[Bench, ...] = (
    Bench("registry", "region registry get+put", "ipc.bench", quick=("--quick",), rows=(
        R("get+put from Python", "python_pair_ns", "ns", 1000), R("get+put from C", "c_pair_ns", "ns", 150),
        R("lookup 4096 / 8 regions (C)", "lookup_ratio_4096_over_8", "x", 1.5))),
    Bench("device_round_trip", "access forwarded to a device process (no KVM)", "devserver.bench",
          quick=("--quick",), rows=(
        R("echo, device polls: µs", "echo.polling.round_trip_us", "µs"),
        R("echo, device polls / inline", "echo.polling.ratio_to_inline", "x"),
        R("echo, no polling / inline", "echo.no_polling.ratio_to_inline", "x"))),
    Bench("exits", "guest exit round trip, ring 3 and ring 0 (vs bare C runner)", "vmm.bench",
          quick=("--iters", "3000", "--repeat", "2", "--rounds", "2"), rows=(
        R("bare C, port read", "bare_c.pio_us", "µs"),
        R("inline / bare, port read", "inline.pio_ratio", "x", 1.15),
        R("inline / bare, MMIO read", "inline.mmio_ratio", "x", 1.15),
        R("isolated / bare, port read", "isolated.pio_ratio", "x", 1.3),
        R("isolated / bare, MMIO read", "isolated.mmio_ratio", "x", 1.3),
        R("ring 0: bare C, port read", "ring0.bare_c.pio_us", "µs"),
        R("ring 0: inline / bare, port read", "ring0.inline.pio_ratio", "x", 1.15),
        R("ring 0: isolated / bare, port read", "ring0.isolated.pio_ratio", "x", 1.3),
        R("ring 0: isolated / bare, MMIO read", "ring0.isolated.mmio_ratio", "x", 1.3))),
    Bench("exit_cost", "CPU per forwarded access, piece by piece", "vmm.bench.exitcost",
          quick=("--loops", "5000"), rows=(
        R("VMM Python, isolated access", "vmm.isolated_forward_ns", "ns"),
        R("VMM Python, inline access", "vmm.inline_forward_ns", "ns"),
        R("device Python per access", "device.serve_python_ns", "ns"),
        R("device state store per access", "device.state_store_ns", "ns"))),
    Bench("coalesced_mmio", "8-byte MMIO writes, coalesced vs plain window", "vmm.bench.coalesce",
          quick=("--iters", "3000", "--repeat", "1"), rows=(
        R("inline: plain / coalesced", "inline.speedup", "x", lower=False),
        R("isolated: plain / coalesced", "isolated.speedup", "x", lower=False),
        R("isolated coalesced write", "isolated.coalesced_us", "µs"))),
    Bench("state_segment", "state segment store per access (in one process)", "ipc.statebench", rows=(
        R("snapshot store", "store_ns", "ns"), R("inflight record per request", "inflight_request_ns", "ns"),
        # (each a fraction of a request time given on its command line, not
        # measured: state_cost below measures the budget of issue 10 §7)
        R("store: share of a --request-ns request", "store_share", "fraction"),
        R("inflight: share of a --request-ns request", "inflight_share", "fraction"))),
    Bench("state_cost", "virtio-blk 4 KiB QD1 in a device process, state=on vs state=off", "vmm.bench.state_cost",
          quick=("--pairs", "4"), rows=(
        R("state on / off, IOPS (medians)", "ratio_on_over_off", "x", 0.97, lower=False),
        R("state on / off, median of neighbouring pairs", "pair_ratio_median", "x", lower=False))),
    Bench("faults", "fault-point cost", "devices.faults.bench", quick=("--loops", "50000"), rows=(
        R("silent fault point", "results.silent_fault_point", "ns"),
        R("armed elsewhere", "results.armed_elsewhere", "ns"),
        R("armed, never matching", "results.armed_never_matching", "ns"))),
    Bench("virtio_blk", "virtio-blk reads vs QEMU (needs QEMU; installs it)", "vmm.bench.virtio_blk",
          quick=("--repeat", "1", "--rounds", "3", "--n4k", "1000"), rows=(
        R("splitvmm / QEMU in-process, 1 MiB seq", "ratios.splitvmm/qemu seq1m", "x", 1.0, lower=False),
        R("splitvmm / QEMU in-process, 4 KiB QD1", "ratios.splitvmm/qemu rand4k", "x", 1.0, lower=False),
        R("splitvmm / vhost-user-blk, 1 MiB seq", "ratios.splitvmm/qemu_vhost_user seq1m", "x", 1.0, lower=False),
        R("splitvmm / vhost-user-blk, 4 KiB QD1", "ratios.splitvmm/qemu_vhost_user rand4k", "x", 1.2, lower=False),
        R("splitvmm / vhost-user-blk, 4 KiB QD32", "ratios.splitvmm/qemu_vhost_user rand4k_qd32_q1", "x", 1.0,
          lower=False),
        R("splitvmm / QEMU iothread, 4 KiB QD32", "ratios.splitvmm/qemu_iothread rand4k_qd32_q1", "x", 1.0,
          lower=False),
        R("splitvmm / QEMU iothread, 1 MiB seq", "ratios.splitvmm/qemu_iothread seq1m", "x", 1.0, lower=False),
        R("splitvmm 4 KiB QD1", "splitvmm.rand4k.IOPS", "IOPS", lower=False))),
    Bench("sandbox", "device-process sandbox: its cost and the attacks it stops", "devserver.sandbox.bench",
          quick=("--quick",), rows=(
        R("spawn to Ready, sandboxed", "setup.spawn_to_ready_ms_median.strict", "ms"),
        R("sandbox cost per device", "setup.sandbox_cost_ms", "ms"),
        R("demo sandboxed / not", "demo_boot.ratio", "x"),
        R("4 KiB QD1 sandboxed / not", "virtio_blk_4k_qd1.ratio", "x", 0.95, lower=False))),
    Bench("footprint", "one ELF under vmm run and QEMU: wall time, peak PSS (needs QEMU)", "vmm.bench.footprint",
          quick=("--repeat", "1"), rows=(
        R("time / QEMU, no devices", "no_devices.time_ratio", "x"),
        R("time / QEMU, three devices", "three_devices.time_ratio", "x"),
        R("peak PSS / QEMU, three devices", "three_devices.memory_ratio", "x", 1.0))),
    Bench("restart", "device restart: SIGKILL to serving again, device-restart pause", "vmm.bench.restart",
          quick=("--kills", "3", "--live", "3"), rows=(
        R("SIGKILL to serving, warm spare", "with_spare.kill_to_serving_ms.median", "ms", 100),
        R("longest guest pause per restart", "with_spare.guest_pause_ms.median", "ms"),
        R("device-restart pause", "with_spare.device_restart_pause_ms.median", "ms", 50),
        R("SIGKILL to serving, no spare", "without_spare.kill_to_serving_ms.median", "ms"))),
    Bench("fault_blk", "virtio-blk 4 KiB QD1 with fault plans (none, silent, 1% firing)", "vmm.bench.faults",
          quick=("--vms", "1", "--rounds", "10", "--n4k", "100"), rows=(
        R("armed, never matching / no plan (guest IOPS, median of round ratios)",
          "virtio_blk_4k_qd1.silent_to_none.median_of_round_ratios", "x", lower=False),
        R("armed, never matching / no plan (its in-process cost at the p90 slice)",
          "silent_to_none_estimated.ratios.p90_slice", "x", 0.97, lower=False),
        R("1% firing / no plan (guest IOPS, median of round ratios)",
          "virtio_blk_4k_qd1.one_percent_to_none.median_of_round_ratios", "x", lower=False),
        R("nothing-armed hooks: share of the end-to-end request", "nothing_armed_hooks.share_of_end_to_end_request",
          "fraction", 0.01),
        R("nothing-armed hooks: share of the in-process request", "nothing_armed_hooks.share_of_in_process_request",
          "fraction"))),
    Bench("startup", "start-up and memory vs QEMU on the same ELF", "vmm.bench.startup",
          quick=("--repeat", "3", "--skip", "q35-kvm"), rows=(
        R("no device / QEMU microvm (KVM)", "ratios.vmm_nodev/qemu_microvm_kvm", "x", 1.5),
        R("COM1 in its process / QEMU microvm", "ratios.vmm_com1/qemu_microvm_kvm", "x", 2.5),
        R("no device", "startup.vmm_nodev.median_s", "s"),
        R("COM1 in its own process", "startup.vmm_com1.median_s", "s"),
        R("demo (4 device processes)", "startup.vmm_demo.median_s", "s", 0.4),
        R("QEMU microvm (KVM)", "startup.qemu_microvm_kvm.median_s", "s"),
        R("demo devices: PSS / QEMU q35 RSS", "ratios.splitvmm pss/qemu_q35_kvm rss", "x", 1.0),
        R("demo devices: PSS, VMM + device processes", "memory.splitvmm.pss_mib", "MiB"),
        R("QEMU q35, same devices: RSS", "memory.qemu_q35_kvm.rss_mib", "MiB"))),
)


def lookup(doc: Any, path: str) -> Any:
    """``a.b.0.c`` in nested dicts/lists; a key may itself hold dots or
    spaces only as the last part (``ratios.vmm_nodev/qemu_microvm_kvm``)."""
    cur = doc
    parts = path.split(".")
    for i, part in enumerate(parts):
        if isinstance(cur, dict):
            if part in cur:
                cur = cur[part]
                continue
            rest = ".".join(parts[i:])
            return cur.get(rest)
        if isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
            continue
        return None
    return cur


def met(row: Row, value: Any) -> str:
    if row.target is None or not isinstance(value, (int, float)):
        return ""
    ok = value <= row.target if row.lower_is_better else value >= row.target
    return "yes" if ok else "**no**"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return "—" if value is None else str(value)


# -- running -----------------------------------------------------------------------

def run_one(bench: Bench, out: pathlib.Path, quick: bool, extra: list[str]) -> dict:
    record: dict = {"name": bench.name, "module": bench.module, "load_before": round(os.getloadavg()[0], 2)}
    if importlib.util.find_spec(bench.module) is None:
        record.update(status="missing", note=f"no module {bench.module} in this tree")
        return record
    cmd = [sys.executable, "-m", bench.module, *bench.args, *(bench.quick if quick else ()), *extra]
    record["command"] = " ".join(cmd[1:])
    t0 = time.monotonic()
    err_path = out / f"{bench.name}.stderr.txt"
    try:
        with open(err_path, "w") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            # stderr to the terminal (indented) and to the file, as it comes.
            assert proc.stderr is not None and proc.stdout is not None
            import threading
            chunks: list[bytes] = []
            stdout = proc.stdout
            reader = threading.Thread(target=lambda: chunks.append(stdout.read()), daemon=True)
            reader.start()
            for raw in proc.stderr:
                line = raw.decode(errors="replace")
                err.write(line)
                print(f"    {bench.name}: {line.rstrip()}", file=sys.stderr, flush=True)
            proc.wait(timeout=bench.timeout)
            reader.join()
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        record.update(status="failed", note=f"timed out after {bench.timeout} s")
        return record
    record["seconds"] = round(time.monotonic() - t0, 1)
    record["exit_status"] = proc.returncode
    if err_path.stat().st_size == 0:
        err_path.unlink()
    text = b"".join(chunks).decode(errors="replace")
    try:
        doc = json.loads(text)
    except ValueError:
        record.update(status="failed", note=f"status {proc.returncode}, no JSON on stdout"
                                            f"{'' if not text.strip() else ': ' + text.strip()[-300:]}")
        return record
    (out / f"{bench.name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    record["status"] = "ok" if proc.returncode == 0 else "partial"
    if proc.returncode != 0:
        record["note"] = f"exit status {proc.returncode} (see {bench.name}.stderr.txt and the JSON)"
    record["headline"] = [{"label": r.label, "value": lookup(doc, r.path), "unit": r.unit, "target": r.target,
                           "met": met(r, lookup(doc, r.path))} for r in bench.rows]
    return record


# -- the report ----------------------------------------------------------------------

def markdown(records: list[dict], started: str, quick: bool) -> str:
    lines = [f"# splitvmm benchmark report, {started}", "",
             f"Host: {os.cpu_count()} CPUs, {os.uname().release}; {'quick run (--quick)' if quick else 'full run'}.  "
             "Ratios are of the same run (the benchmark ran both sides, interleaved); absolute times on this "
             "nested PVM host are not a real host's.  Each benchmark's JSON in this folder has every figure "
             "and how it was measured.", "",
             "| benchmark | figure | value | unit | target | met |", "|---|---|---|---|---|---|"]
    for rec in records:
        title = next(b.title for b in BENCHMARKS if b.name == rec["name"])
        if rec["status"] in ("missing", "failed"):
            lines.append(f"| {rec['name']} | {title} | {rec['status']}: {rec.get('note', '')} | | | |")
            continue
        for i, h in enumerate(rec["headline"]):
            lines.append(f"| {rec['name'] if i == 0 else ''} | {h['label']} | {_fmt(h['value'])} | {h['unit']} "
                         f"| {_fmt(h['target']) if h['target'] is not None else ''} | {h['met']} |")
    lines += ["", "| benchmark | status | load before | seconds | command |", "|---|---|---|---|---|"]
    for rec in records:
        lines.append(f"| {rec['name']} | {rec['status']}{': ' + rec['note'] if rec.get('note') and rec['status'] == 'partial' else ''} "
                     f"| {rec['load_before']} | {rec.get('seconds', '')} | `{rec.get('command', rec['module'])}` |")
    lines += ["", "Plots: `NAME.png` per benchmark (its headline figures; red ticks are targets), "
              "`ratios.png` (every ratio above; the dashed line is 1.0).", ""]
    return "\n".join(lines)


def plots(records: list[dict], out: pathlib.Path) -> list[str]:
    """One PNG per benchmark and ratios.png; returns the file names
    (none when matplotlib is missing: ``pip install -e '.[bench]'``)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report: matplotlib missing (pip install -e '.[bench]'): no plots", file=sys.stderr)
        return []
    written = []

    def chart(name: str, title: str, rows: list[dict], ratio: bool) -> None:
        rows = [h for h in rows if isinstance(h["value"], (int, float))]
        if not rows:
            return
        fig, ax = plt.subplots(figsize=(9, 0.55 * len(rows) + 1.6))
        labels = [f"{h['label']}{'' if ratio else ' [' + h['unit'] + ']'}" for h in rows]
        values = [h["value"] for h in rows]
        colors = ["#4c72b0" if h["met"] != "**no**" else "#dd8452" for h in rows]
        y = range(len(rows))
        ax.barh(list(y), values, color=colors)
        for i, h in enumerate(rows):
            ax.text(h["value"], i, f" {_fmt(h['value'])}", va="center", fontsize=9)
            if h["target"] is not None:
                ax.plot([h["target"]] * 2, [i - 0.4, i + 0.4], color="red", linewidth=2)
        ax.set_yticks(list(y), labels, fontsize=9)
        ax.invert_yaxis()
        units = {h["unit"] for h in rows}
        if ratio:
            ax.axvline(1.0, color="gray", linestyle="--", linewidth=1)
            ax.set_xlabel("ratio (same run)")
        elif len(units) > 1 and max(values) / max(min(v for v in values if v > 0) if any(values) else 1, 1e-9) > 50:
            ax.set_xscale("log")
            ax.set_xlabel("value (log scale; unit in each label)")
        else:
            ax.set_xlabel(", ".join(sorted(units)))
        ax.set_xlim(right=max(values + [h["target"] or 0 for h in rows]) * (1.25 if ax.get_xscale() == "linear" else 3))
        ax.set_title(title, fontsize=11)
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=110)
        plt.close(fig)
        written.append(f"{name}.png")

    all_ratios = []
    for rec in records:
        if rec.get("headline"):
            title = next(b.title for b in BENCHMARKS if b.name == rec["name"])
            chart(rec["name"], f"{rec['name']}: {title}", rec["headline"], ratio=False)
            all_ratios += [dict(h, label=f"{rec['name']}: {h['label']}") for h in rec["headline"] if h["unit"] == "x"]
    chart("ratios", "every same-run ratio (red: target; orange: missed)",
          all_ratios, ratio=True)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vmm.bench.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="the report's folder (default bench-report/DATE-TIME)")
    ap.add_argument("--quick", action="store_true", help="shorter runs of every benchmark (noisier)")
    ap.add_argument("--only", action="append", default=[], choices=[b.name for b in BENCHMARKS],
                    help="run only this benchmark (repeatable)")
    ap.add_argument("--skip", action="append", default=[], choices=[b.name for b in BENCHMARKS])
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = ap.parse_args(argv)
    if args.list:
        for b in BENCHMARKS:
            print(f"{b.name:20} python -m {b.module} {' '.join(b.args)}  # {b.title}")
        return 0
    started = datetime.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    out = pathlib.Path(args.out or pathlib.Path("bench-report") / started)
    out.mkdir(parents=True, exist_ok=True)
    chosen = [b for b in BENCHMARKS if (not args.only or b.name in args.only) and b.name not in args.skip]
    records = []
    for i, bench in enumerate(chosen, 1):
        print(f"[{i}/{len(chosen)}] {bench.name}: {bench.title} (load {os.getloadavg()[0]:.2f})",
              file=sys.stderr, flush=True)
        rec = run_one(bench, out, args.quick, [])
        records.append(rec)
        print(f"[{i}/{len(chosen)}] {bench.name}: {rec['status']}"
              f"{' in ' + str(rec['seconds']) + ' s' if 'seconds' in rec else ''}"
              f"{' -- ' + rec['note'] if rec.get('note') else ''}", file=sys.stderr, flush=True)
        (out / "run.json").write_text(json.dumps({"started": started, "quick": args.quick,
                                                  "benchmarks": records}, indent=2) + "\n")
    (out / "report.md").write_text(markdown(records, started, args.quick))
    pngs = plots(records, out)
    print(f"report: {out}/report.md, {len(records)} benchmarks, {len(pngs)} plots", file=sys.stderr)
    return 0 if all(r["status"] in ("ok", "missing") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
