"""One report of every benchmark: ``python -m vmm.bench.report`` (``make bench``).

Runs each benchmark of :data:`BENCHMARKS` (its own ``python -m MODULE``
process, one after the other, progress on stderr) and writes one folder:

* ``results.json`` -- every benchmark's own JSON, with its command line,
  exit status and wall time (a failed one keeps its stderr's end);
* ``report.md`` -- a table of the same-run ratios (every number whose key
  names a ratio, share or speedup: a figure over its baseline of the same run,
  the only figures that carry over from this nested host), then each
  benchmark's headline figures;
* ``NAME.png`` -- a bar chart of each benchmark's ratios (1.0 marked),
  when matplotlib is installed (``pip install -e '.[bench]'``).

``--quick`` runs every benchmark with small sizes (a smoke run, not a
measurement); ``--only NAME`` (repeatable) runs just those.  A benchmark
whose module is not in this build is listed as such, not run.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

#: Keys of a benchmark's JSON whose numbers are same-run ratios.
RATIO_WORDS = ("ratio", "share", "speedup")
#: How much of a failed benchmark's stderr the report keeps.
ERR_TAIL = 4000


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    #: What it measures, one line for the report.
    title: str
    module: str
    args: tuple[str, ...] = ()
    #: The arguments of --quick (small sizes).
    quick: tuple[str, ...] = ()
    #: Keys (dotted paths) of its headline figures.
    headline: tuple[str, ...] = ()
    #: Longest run, seconds.
    timeout: float = 1800
    #: Programs it needs on PATH (else it is listed, not run: it would
    #: install them itself).
    needs: tuple[str, ...] = ()


#: Every benchmark of the project.  Add one here.
BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("registry", "region registry get+put, Python and C, 8 and 4096 regions", "ipc.bench",
              quick=("--quick",), headline=("python_pair_ns", "c_pair_ns", "lookup_ratio_4096_over_8")),
    Benchmark("device_round_trip", "a port read forwarded to a device process, no KVM", "devserver.bench",
              quick=("--quick",), headline=("inline.round_trip_us", "echo.polling.round_trip_us",
                                            "echo.polling.ratio_to_inline")),
    Benchmark("exits", "guest exit round trip (ring 3): bare C loop, inline, isolated", "vmm.bench",
              quick=("--iters", "300", "--rounds", "1", "--repeat", "1"),
              headline=("bare_c.pio_us", "inline.pio_ratio", "isolated.pio_ratio", "isolated.mmio_ratio")),
    Benchmark("coalesced_mmio", "MMIO writes through a coalesced zone against plain exits", "vmm.bench.coalesce",
              quick=("--iters", "300", "--rounds", "1", "--repeat", "1"),
              headline=("inline.speedup", "isolated.speedup", "isolated.exits_per_coalesced_write")),
    Benchmark("virtio_blk", "virtio-blk: 1 MiB sequential and 4 KiB QD1 reads against QEMU", "vmm.bench.virtio_blk",
              quick=("--image-mib", "8", "--passes", "1", "--n4k", "200", "--repeat", "1", "--timeout", "300"),
              headline=("ratios",), needs=("qemu-system-x86_64", "qemu-storage-daemon")),
    Benchmark("footprint", "start-to-end time and memory of one guest ELF, vmm run against QEMU",
              "vmm.bench.footprint", quick=("--loops", "300000000", "--repeat", "1"),
              headline=("no_devices.time_ratio", "three_devices.time_ratio", "no_devices.memory_ratio",
                        "three_devices.memory_ratio"), needs=("qemu-system-x86_64",)),
    Benchmark("fault_points", "cost of a fault point per event: silent, armed, firing", "devices.faults.bench",
              quick=("--loops", "20000"), headline=("results.silent_fault_point", "results.armed_never_matching")),
    Benchmark("state_store", "device-state snapshot store and inflight record per access", "ipc.statebench",
              quick=("--iterations", "2000"), headline=("store_ns", "inflight_request_ns", "store_share")),
)


def missing(bench: Benchmark) -> str | None:
    """Why a benchmark cannot run here, or None."""
    try:
        if importlib.util.find_spec(bench.module) is None:
            return f"not in this build ({bench.module})"
    except ModuleNotFoundError:
        return f"not in this build ({bench.module})"
    absent = [p for p in bench.needs if shutil.which(p) is None]
    if absent:
        return f"needs {', '.join(absent)} (not installed)"
    return None


def run_one(bench: Benchmark, quick: bool, out: pathlib.Path) -> dict[str, Any]:
    """Run one benchmark; its JSON (or the error) with how it ran."""
    argv = [sys.executable, "-m", bench.module, *(bench.quick if quick else bench.args)]
    started = time.monotonic()
    err_path = out / f"{bench.name}.stderr.txt"
    with open(err_path, "w") as err:
        try:
            proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True,
                                  timeout=bench.timeout)
            status: int | None = proc.returncode
            stdout = proc.stdout
        except subprocess.TimeoutExpired:
            status, stdout = None, ""
    entry: dict[str, Any] = {"title": bench.title, "command": argv[1:], "status": status,
                             "seconds": round(time.monotonic() - started, 1)}
    try:
        entry["result"] = json.loads(stdout)
    except json.JSONDecodeError:
        entry["error"] = "timed out" if status is None else f"no JSON on stdout (status {status})"
    tail = err_path.read_text(errors="replace")[-ERR_TAIL:]
    if "error" in entry or status:
        entry["stderr"] = tail
    if not tail:
        err_path.unlink()
    return entry


def leaves(value: Any, path: str = "") -> Iterator[tuple[str, float]]:
    """(dotted key, number) of every number in a JSON value."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        if math.isfinite(value):
            yield path, float(value)
    elif isinstance(value, dict):
        for key, v in value.items():
            yield from leaves(v, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from leaves(v, f"{path}[{i}]")


_RATIO = re.compile(r"(?:^|[^a-z])(?:" + "|".join(RATIO_WORDS) + ")", re.I)


def ratios(result: Any) -> list[tuple[str, float]]:
    """The numbers whose key names a ratio or share (a word of their key,
    or under a ``ratios`` table), targets left out."""
    out = []
    for key, value in leaves(result):
        parts = key.split(".")
        if "targets" not in parts and any(_RATIO.search(p) for p in parts):
            out.append((key, value))
    return out


def headline(result: Any, keys: Sequence[str]) -> list[tuple[str, float]]:
    found = dict(leaves(result))
    return [(k, v) for k, v in found.items() if any(k == h or k.startswith(h + ".") for h in keys)]


def markdown(results: dict[str, dict[str, Any]], started: str, quick: bool) -> str:
    lines = [f"# splitvmm benchmarks, {started}", "",
             "Figures of the project's nested PVM host are not those of a real host: read the ratios, "
             "each a figure over its baseline measured in the same run." +
             (" **Quick run: small sizes, a smoke test, not a measurement.**" if quick else ""), "",
             "## Same-run ratios", "", "| benchmark | ratio | value |", "|---|---|---:|"]
    for name, entry in results.items():
        for key, value in ratios(entry.get("result")):
            lines.append(f"| {name} | `{key}` | {value:.3g} |")
    lines += ["", "## Runs", "", "| benchmark | what | status | seconds | headline figures |", "|---|---|---|---:|---|"]
    for name, entry in results.items():
        if entry.get("skipped"):
            state, figures = entry["skipped"], ""
        elif "error" in entry:
            state, figures = f"failed: {entry['error']}", ""
        else:
            state = "ok" if entry["status"] == 0 else f"status {entry['status']}"
            keys = next((b.headline for b in BENCHMARKS if b.name == name), ())
            figures = "; ".join(f"`{k}` {v:.4g}" for k, v in headline(entry["result"], keys))
        lines.append(f"| {name} | {entry['title']} | {state} | {entry.get('seconds', '')} | {figures} |")
    lines += ["", "Every figure is in `results.json`; the plots (`NAME.png`) show each benchmark's ratios.", ""]
    return "\n".join(lines)


def plot(results: dict[str, dict[str, Any]], out: pathlib.Path) -> list[pathlib.Path]:
    """One bar chart per benchmark with ratios; [] without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    for name, entry in results.items():
        rows = ratios(entry.get("result"))
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(8, 0.4 * len(rows) + 1.2))
        ax.barh([k for k, _ in rows], [v for _, v in rows], color="#4878a8")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.invert_yaxis()
        ax.set_xlabel("ratio (same run)")
        ax.set_title(f"{name}: {entry['title']}", fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        made.append(path)
    return made


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vmm.bench.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, metavar="DIR",
                    help="the report folder (default bench-report/YYYYmmdd-HHMMSS)")
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run, not a measurement")
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    choices=[b.name for b in BENCHMARKS], help="run only this benchmark (repeatable)")
    args = ap.parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    out = pathlib.Path(args.out or pathlib.Path("bench-report") / time.strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    chosen = [b for b in BENCHMARKS if not args.only or b.name in args.only]
    results: dict[str, dict[str, Any]] = {}
    failed = 0
    for i, bench in enumerate(chosen, 1):
        tag = f"[{i}/{len(chosen)}] {bench.name}"
        why = missing(bench)
        if why is not None:
            print(f"bench: {tag}: skipped: {why}", file=sys.stderr)
            results[bench.name] = {"title": bench.title, "skipped": why}
            continue
        print(f"bench: {tag}: {bench.title} ...", file=sys.stderr, flush=True)
        entry = run_one(bench, args.quick, out)
        results[bench.name] = entry
        if "error" in entry:
            failed += 1
            print(f"bench: {tag}: FAILED ({entry['error']}) after {entry['seconds']} s; "
                  f"see {out / (bench.name + '.stderr.txt')}", file=sys.stderr)
        else:
            print(f"bench: {tag}: done in {entry['seconds']} s, {len(ratios(entry['result']))} ratio(s)",
                  file=sys.stderr)
    report = {"started": started, "quick": args.quick, "host_cpus": os.cpu_count(),
              "load_avg": round(os.getloadavg()[0], 2), "benchmarks": results}
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(results, started, args.quick))
    plots = plot(results, out)
    note = f", {len(plots)} plot(s)" if plots else ", no plots (matplotlib missing: pip install -e '.[bench]')"
    print(f"bench: report in {out}/ (report.md, results.json{note})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
