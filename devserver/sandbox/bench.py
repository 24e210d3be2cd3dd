"""Figures of the device-process sandbox: ``python -m devserver.sandbox.bench
[--quick]`` prints JSON.

* ``allowlist``: system calls each kind's seccomp filter allows (distinct
  names; the common part plus the kind's file), next to the figures of
  crosvm and Firecracker (see ``PEERS``);
* ``setup_ms``: spawning an ``echo`` device process until it is Ready,
  sandboxed (strict) and not (``sandbox=off``): the difference is the
  sandbox's cost per device;
* ``attack_x_layer``: the hostile test model's attacks
  (:mod:`devserver.sandbox.hostile`) against each layer alone (plus
  preload) and against all of them: ``error <ERRNO>``, ``killed (<call>)``
  or ``SUCCEEDED``;
* ``demo_boot_s``: wall time of ``vmm run`` (the demo: four devices)
  sandboxed and not;
* ``virtio_blk_4k_qd1``: IOPS of the virtio-blk benchmark's random 4 KiB
  reads at queue depth 1 (:mod:`vmm.bench.virtio_blk`'s guest, ring 3),
  the device sandboxed and not, interleaved runs, and their ratio.

Unsandboxed runs use ``sandbox=off`` or, where the devices are not on the
command line (the demo), ``SPLITVMM_SANDBOX_LAYERS=none``.  Absolute
times on the nested development host are not those of a real host; the
ratios of the same run are what count.  Runs attacks with layers off: run
it as root on a machine of its own (the attacks are harmless probes: a
file created and a tmpfs mounted in a temporary directory, both removed;
ptrace and signal 0 on this process).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from devserver.sandbox import LAYERS, ONLY_ENV
from devserver.sandbox.hostile import ATTACKS
from devserver.sandbox.policy import KIND_MODULES, common, kind_rules

#: Allowlist sizes of the anchors, for comparison (distinct system calls,
#: counted by hand in their files, 2026-12).
PEERS = {
    "crosvm_common_device": {"syscalls": 65, "source": "google/crosvm jail/seccomp/x86_64/common_device.policy "
                             "(every device adds its own file on top)"},
    "firecracker_vmm_thread": {"syscalls": 38, "source": "firecracker resources/seccomp/"
                               "x86_64-unknown-linux-musl.json, the vmm thread's filter (all devices, Rust, "
                               "no interpreter)"},
}
KINDS = ("echo", "pci-echo", "serial", "virtio-rng", "virtio-blk", "virtio-console")
USER_MODEL = "devserver.sandbox.hostile:Hostile"


def allowlist() -> dict:
    base = {r.name for r in common.rules(1)}
    out: dict = {"common": len(base)}
    for kind in KINDS:
        out[kind] = len(base | {r.name for r in kind_rules(kind, None)})
    out["kind_files"] = {k: [r.name for r in kind_rules(k, None)] for k in KIND_MODULES}
    return out


def _spawn_ms(registry, sandbox: str, n: int) -> list[float]:
    from vmm.remote import RemoteEndpoint, RemoteOptions

    out = []
    for _ in range(n):
        t = time.perf_counter()
        ep = RemoteEndpoint.spawn("echo", {"pio": "0x5000"}, 2, "echo0", registry, 1,
                                  RemoteOptions(sandbox=sandbox))
        out.append((time.perf_counter() - t) * 1e3)
        ep.close()
    return out


def setup_cost(n: int) -> dict:
    from ipc import Registry

    with Registry.create_sealed(capacity=64) as reg:
        rounds: dict[str, list[float]] = {"strict": [], "off": []}
        for _ in range(n):
            for mode in rounds:
                rounds[mode] += _spawn_ms(reg, mode, 1)
    med = {k: round(statistics.median(v), 1) for k, v in rounds.items()}
    return {"spawn_to_ready_ms_median": med, "sandbox_cost_ms": round(med["strict"] - med["off"], 1),
            "spawns_each": n}


def _attack_once(registry, name: str, layers: str | None, params: dict) -> str:
    from ipc import Bus
    from vmm.endpoint import DeviceFailed
    from vmm.remote import RemoteEndpoint, RemoteOptions

    env_before = os.environ.get(ONLY_ENV)
    if layers is None:
        os.environ.pop(ONLY_ENV, None)
    else:
        os.environ[ONLY_ENV] = layers
    try:
        ep = RemoteEndpoint.spawn(USER_MODEL, params, 2, "hostile0", registry, 1,
                                  RemoteOptions(access_timeout=10.0, sandbox="auto"))
    finally:
        if env_before is None:
            os.environ.pop(ONLY_ENV, None)
        else:
            os.environ[ONLY_ENV] = env_before
    try:
        ref = registry.get(Bus.PIO, 0x6000, 4)
        try:
            ep.access(0, 0, ref.cookie, 0, 4, True, ATTACKS.index(name))
            v = ep.access(0, 0, ref.cookie, 4, 4, False, 0)
            return "SUCCEEDED" if v == 0 else f"error {errno_name(v)}"
        except DeviceFailed:
            ep.wait_exited(5.0)
            why = ep.failed or ""
            if "killed by seccomp: " in why:
                return f"killed ({why.split('killed by seccomp: ')[1].split(')')[0]})"
            return "SUCCEEDED" if name == "execve" and "status 0" in why else f"died: {why}"
        finally:
            registry.put(ref)
    finally:
        ep.close()


def errno_name(v: int) -> str:
    import errno

    return errno.errorcode.get(v, str(v))


def attack_matrix() -> dict:
    from ipc import Registry

    configs = {"none": "none"} | {layer: f"preload,{layer}" for layer in LAYERS[1:]} | {"all": None}
    table: dict = {}
    with tempfile.TemporaryDirectory(prefix="splitvmm-attacks-") as tmp, \
            Registry.create_sealed(capacity=64) as reg:
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(64)
        unix_path = os.path.join(tmp, "vmm.sock")
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        unix.bind(unix_path)
        unix.listen(64)
        target = pathlib.Path(tmp, "dir")
        target.mkdir()
        params = {"pio": "0x6000", "vmm_pid": str(os.getpid()), "port": str(tcp.getsockname()[1]),
                  "unix": unix_path, "dir": str(target)}
        for name in ATTACKS:
            table[name] = {}
            for label, layers in configs.items():
                table[name][label] = _attack_once(reg, name, layers, params)
                if os.path.ismount(target):
                    subprocess.run(["umount", str(target)], check=False)
                for f in target.iterdir():
                    f.unlink()
        tcp.close()
        unix.close()
    stopped_by = {label: sum(1 for row in table.values() if row[label] != "SUCCEEDED") for label in configs}
    return {"columns": "the layer alone (with preload), none, all", "table": table,
            "attacks_stopped": stopped_by, "attacks": len(ATTACKS)}


def _timed(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=True, timeout=300)
    return time.perf_counter() - t


def demo_boot(n: int) -> dict:
    cmd = [sys.executable, "-m", "vmm.cli", "run", "--serial", "none"]
    on = dict(os.environ)
    on.pop(ONLY_ENV, None)
    off = dict(on, **{ONLY_ENV: "none"})
    _timed(cmd, on)     # builds the demo guest once
    runs: dict[str, list[float]] = {"sandboxed": [], "not_sandboxed": []}
    for _ in range(n):
        runs["sandboxed"].append(_timed(cmd, on))
        runs["not_sandboxed"].append(_timed(cmd, off))
    med = {k: round(statistics.median(v), 3) for k, v in runs.items()}
    return {"wall_s_median": med, "ratio": round(med["sandboxed"] / med["not_sandboxed"], 3), "runs_each": n}


def blk_4k(n4k: int, repeat: int) -> dict:
    from vmm.bench import virtio_blk as vb

    runs: dict[str, list[dict]] = {"sandboxed": [], "not_sandboxed": []}
    with tempfile.TemporaryDirectory(prefix="splitvmm-sbbench-") as tmp:
        elf = vb.build_guest(pathlib.Path(tmp))
        image = pathlib.Path(tmp, "disk.img")
        vb.make_image(image, 64)
        cmdline = f"bench=1 passes=1 n4k={n4k} msix=0"
        devices = {"sandboxed": "virtio-blk,path={image}", "not_sandboxed": "virtio-blk,path={image},sandbox=off"}
        for i in range(repeat):     # interleaved, the order alternating (drift cancels)
            for label in sorted(devices, reverse=bool(i % 2)):
                runs[label].append(vb.run_ours(elf, image, cmdline, 600, devices[label]))
    tsc = statistics.median([r["tsc_hz"] for v in runs.values() for r in v if r["tsc_hz"]])
    out = {k: vb.summarize(v, tsc).get("rand4k", {}) for k, v in runs.items()}
    a, b = out["sandboxed"].get("IOPS"), out["not_sandboxed"].get("IOPS")
    best = {k: v.get("IOPS_best") for k, v in out.items()}
    return {"IOPS_median": {"sandboxed": a, "not_sandboxed": b}, "IOPS_best": best,
            "ratio_best": round(best["sandboxed"] / best["not_sandboxed"], 3)
            if best["sandboxed"] and best["not_sandboxed"] else None,
            "IOPS_per_run": {k: v.get("IOPS_per_run") for k, v in out.items()},
            "ratio": round(a / b, 3) if a and b else None, "target": ">= 0.95", "reads_per_run": n4k,
            "runs_each": repeat, "guest_ring": 3}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m devserver.sandbox.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer runs")
    ap.add_argument("--skip", action="append", default=[],
                    choices=["setup", "attacks", "demo", "blk"])
    args = ap.parse_args(argv)
    n = 3 if args.quick else 7
    report: dict = {"benchmark": "device-process sandbox (devserver.sandbox)", "host_cpus": os.cpu_count(),
                    "euid": os.geteuid(), "load_avg_before": round(os.getloadavg()[0], 2),
                    "allowlist_syscalls": allowlist(), "peers": PEERS}
    if "setup" not in args.skip:
        report["setup"] = setup_cost(n)
    if "attacks" not in args.skip:
        report["attack_x_layer"] = attack_matrix()
    if "demo" not in args.skip:
        report["demo_boot"] = demo_boot(n)
    if "blk" not in args.skip:
        report["virtio_blk_4k_qd1"] = blk_4k(1000 if args.quick else 3000, 2 if args.quick else 8)
    report["load_avg_after"] = round(os.getloadavg()[0], 2)
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
