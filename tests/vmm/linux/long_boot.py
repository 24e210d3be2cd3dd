"""``make linux-check``: boot a Linux kernel with the VMM's emulation
fallback and CPUID masks, through its initramfs ``/init`` (banner, the
virtio disk read back, power-off) as far as this host lets it, and report
how far it got (not part of the test suite: it takes minutes).

Prints, as JSON on stdout: the wall time at which each milestone line
appeared on the serial console, the last console line, how the run ended
(the summary line of ``vmm run``, with the instructions the VMM emulated)
and the total time.  Exit status 0 when the initramfs banner and its
last line ("done, powering off") were both printed, 1 otherwise.

    python -m tests.vmm.linux.long_boot [--kernel minimal|cloud] [--timeout SECONDS] [--vcpus N]
                                        [--qemu] [--until TEXT]

``--kernel minimal`` (the default) boots the small kernel of ``vmm image
--minimal`` (:mod:`vmm.minikernel`, its vmlinux through PVH), built first
when not in the cache (tens of minutes on two busy cores); ``--kernel
cloud`` boots Debian's cloud kernel of ``vmm image``, which on this PVM
host cannot run /init (its first syscall; README).

``--qemu`` also boots the same kernel and command line under
``qemu-system-x86_64 -enable-kvm`` (QEMU 7.2 from Debian) for the same
milestones.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from vmm import image, minikernel

MILESTONES = ("Linux version", "Memory:", "x86/fpu:", "smpboot:", "devtmpfs: initialized",
              "PCI: Using configuration type 1", "clocksource: Switched to",
              "Trying to unpack rootfs image as initramfs", "Freeing initrd memory", "Freeing unused kernel",
              "Run /init", image.BANNER, "virtio disk(s)", image.DONE, "reboot: Power down")
#: The last line of a panic: the guest does nothing more after it.
PANIC_END = "---[ end Kernel panic"
#: ``initcall_blacklist=`` skips two tracing initcalls that take minutes in
#: emulated ring 0 and only serve tracing: ftrace's check of every mcount
#: record against kallsyms (soft-lockup warnings), and the trace-event
#: "eval map" update, whose mutex held ``init_kprobe_trace`` for ~230 s.
#: ``clearcpuid=`` (arch/x86/kernel/cpu/common.c, names since 5.19): the
#: guest's ring-0 CPUID here shows features that KVM_GET_SUPPORTED_CPUID
#: lacks (ssse3, popcnt, smap: the host CPU's own bits, whatever
#: --cpuid-hide says), so the kernel is told to drop them itself, before
#: alternatives are patched.  ssse3 gates BLAKE2s' SSSE3 code (the one SIMD
#: user built into the cloud kernel, arch/x86/crypto/blake2s-glue.c; it
#: stopped the boot on ``movd xmm15, ecx``); sse4_1 and sse4_2 go with it;
#: pclmulqdq, aes and sha_ni gate the SIMD crypto modules should one be
#: loaded; popcnt and smap: no ``popcnt``/``clac``/``stac`` patched in, so
#: none of those emulation fallbacks.
CLEARCPUID = "ssse3,sse4_1,sse4_2,pclmulqdq,aes,sha_ni,popcnt,smap"
APPEND = ("console=ttyS0 earlyprintk=ttyS0 noxsave "
          "initcall_blacklist=ftrace_check_for_weak_functions,trace_eval_init "
          f"clearcpuid={CLEARCPUID}")
#: cx16, xsave (with osxsave and leaf 0xD): instructions PVM's emulator
#: lacks (cmpxchg16b, xrstor).  Hiding works for bits KVM reports as
#: supported (cx16); the rest are also in CLEARCPUID.
HIDE = "cx16,xsave,popcnt,smap"


def watch(cmd: list[str], console: pathlib.Path, timeout: float, stderr_path: pathlib.Path,
          until: str | None = None) -> dict:
    started = time.monotonic()
    with open(stderr_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                stderr=err, stdin=subprocess.DEVNULL)
        seen: dict[str, float] = {}
        try:
            while proc.poll() is None and time.monotonic() - started < timeout:
                text = console.read_text(errors="replace") if console.exists() else ""
                for m in (*MILESTONES, *([until] if until else [])):
                    if m not in seen and m in text:
                        seen[m] = round(time.monotonic() - started, 1)
                if until is not None and until in seen:
                    break
                if PANIC_END in text:
                    break
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
    text = console.read_text(errors="replace") if console.exists() else ""
    for m in MILESTONES:
        if m not in seen and m in text:
            seen[m] = round(time.monotonic() - started, 1)
    lines = [line for line in text.splitlines() if line.strip()]
    return {"milestones": seen, "last_line": lines[-1] if lines else "", "seconds": round(time.monotonic() - started, 1),
            "status": proc.returncode, "stderr_tail": stderr_path.read_text(errors="replace").splitlines()[-3:]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--vcpus", type=int, default=1)
    p.add_argument("--memory", default="256M", help="guest RAM (less RAM: fewer struct pages for the "
                   "emulated ring 0 to initialise)")
    p.add_argument("--qemu", action="store_true")
    p.add_argument("--kernel", choices=("minimal", "cloud"), default="minimal",
                   help="minimal: vmm image --minimal (default); cloud: Debian's cloud kernel (vmm image)")
    p.add_argument("--keep", metavar="DIR", help="keep the console logs here")
    p.add_argument("--until", metavar="TEXT", help="stop each run once this console text appears "
                   "(e.g. 'Linux version' for the time-to-banner benchmark)")
    args = p.parse_args(argv)
    if args.kernel == "minimal":
        mini = minikernel.build()
        kernel, initrd, version = mini.vmlinux, mini.initrd, mini.version
    else:
        built = image.build()
        kernel, initrd, version = built.kernel, built.initrd, built.version
    work = pathlib.Path(args.keep or tempfile.mkdtemp(prefix="splitvmm-linux-"))
    work.mkdir(parents=True, exist_ok=True)
    disk = work / "disk.img"
    disk.write_bytes(b"splitvmm-linux-check".ljust(16 << 20, b"\0"))
    report = {"kernel": version}
    cmd = [sys.executable, "-m", "vmm.cli", "-v", "run", "--kernel", str(kernel), "--initrd", str(initrd),
           "--memory", args.memory, "--vcpus", str(args.vcpus), "--cpuid-hide", HIDE, "--append", APPEND,
           "--device", f"virtio-blk,path={disk},serial=linux-check", "--timeout", str(args.timeout),
           "--serial", f"file:{work / 'splitvmm.txt'}"]
    report["splitvmm"] = watch(cmd, work / "splitvmm.txt", args.timeout + 60, work / "splitvmm.err", args.until)
    if args.qemu:
        qemu = shutil.which("qemu-system-x86_64")
        if qemu is None:
            report["qemu"] = "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"
        else:
            qcmd = [qemu, "-enable-kvm", "-m", args.memory, "-smp", str(args.vcpus), "-nographic",
                    "-no-reboot", "-kernel", str(kernel), "-initrd", str(initrd),
                    "-append", APPEND, "-drive", f"file={disk},format=raw,if=virtio",
                    "-serial", f"file:{work / 'qemu.txt'}", "-monitor", "none", "-display", "none"]
            report["qemu"] = watch(qcmd, work / "qemu.txt", args.timeout, work / "qemu.err", args.until)
    report["logs"] = str(work)
    print(json.dumps(report, indent=2))
    goals = [args.until] if args.until else [image.BANNER, image.DONE]
    return 0 if all(g in report["splitvmm"]["milestones"] for g in goals) else 1


if __name__ == "__main__":
    sys.exit(main())
