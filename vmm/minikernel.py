"""``vmm image --minimal``: a small Linux kernel built from Debian's
``linux-source`` package, for this project's devices only.

The Debian cloud kernel spends most of its boot in code that PVM runs in
emulated ring 0 (DESIGN.md "This machine's KVM"): tracing, hundreds of
initcalls, SIMD crypto.  This kernel has what the VMM's machine needs and
little else (:data:`FRAGMENT`): x86_64 with the PVH entry, ACPI, PCI with
MSI, the 8250 console, virtio-pci with virtio-blk, virtio-rng and
virtio-console built in, an initramfs, devtmpfs; no modules, no crypto API
(so no SIMD: the entropy pool's BLAKE2s is the generic C code), no
tracing, HZ=100.

In a cache folder (``$XDG_CACHE_HOME/splitvmm/linux-minimal``):

1. the build dependencies installed with apt when a tool or header is
   missing (:data:`BUILD_DEPS`);
2. ``apt-get download linux-source`` (the versioned package it depends on)
   and its ``linux-source-*.tar.xz`` unpacked into ``src/``;
3. ``make allnoconfig``, :data:`FRAGMENT` merged with the kernel's own
   ``scripts/kconfig/merge_config.sh``, ``make olddefconfig``, and every
   fragment line checked against the result (Kconfig silently drops an
   option whose dependencies are off);
   :data:`PATCHES` applied (one, for this host's PVM: see there);
4. ``nice -n 19 make -jN bzImage`` in ``build/`` (the kernel's ``O=``);
5. ``vmlinux`` (an ELF with the PVH note, booted without decompressing) and
   ``bzImage`` copied out, and the initramfs of :mod:`vmm.image` without
   modules (the drivers are built in).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import pathlib
import re
import shutil
import subprocess
import tarfile
import zlib

from vmm import image
from vmm.image import ImageError

log = logging.getLogger(__name__)

SOURCE_META = "linux-source"

#: tool or header -> the Debian package that provides it.
BUILD_DEPS = {
    "gcc": "build-essential", "make": "build-essential", "flex": "flex", "bison": "bison", "bc": "bc",
    "/usr/include/libelf.h": "libelf-dev", "/usr/include/openssl/ssl.h": "libssl-dev",
    "perl": "perl", "xz": "xz-utils",
}

#: Merged into allnoconfig.  ``=n`` lines make the intent explicit (and are
#: checked like the rest).
FRAGMENT = """\
CONFIG_64BIT=y
CONFIG_SMP=y
CONFIG_NR_CPUS=8
CONFIG_LOCALVERSION="-splitvmm"
CONFIG_DEFAULT_HOSTNAME="splitvmm"
CONFIG_PRINTK=y
CONFIG_PRINTK_TIME=y
CONFIG_EARLY_PRINTK=y
CONFIG_BUG=y
CONFIG_MULTIUSER=y
CONFIG_FUTEX=y
CONFIG_EPOLL=y
CONFIG_SIGNALFD=y
CONFIG_TIMERFD=y
CONFIG_EVENTFD=y
CONFIG_SHMEM=y
CONFIG_POSIX_TIMERS=y
CONFIG_BLK_DEV_INITRD=y
CONFIG_RD_GZIP=y
CONFIG_BINFMT_ELF=y
CONFIG_BINFMT_SCRIPT=y
CONFIG_HYPERVISOR_GUEST=y
CONFIG_PARAVIRT=y
CONFIG_KVM_GUEST=y
CONFIG_PVH=y
CONFIG_X86_MPPARSE=y
CONFIG_ACPI=y
CONFIG_PCI=y
CONFIG_PCI_MSI=y
CONFIG_HZ_100=y
CONFIG_NO_HZ_IDLE=y
CONFIG_RANDOMIZE_BASE=n
CONFIG_RELOCATABLE=y
CONFIG_BLOCK=y
CONFIG_BLK_DEV=y
CONFIG_DEVTMPFS=y
CONFIG_DEVTMPFS_MOUNT=y
CONFIG_PROC_FS=y
CONFIG_SYSFS=y
CONFIG_TMPFS=y
CONFIG_TTY=y
CONFIG_UNIX98_PTYS=y
CONFIG_SERIAL_8250=y
CONFIG_SERIAL_8250_CONSOLE=y
CONFIG_SERIAL_8250_NR_UARTS=4
CONFIG_SERIAL_8250_RUNTIME_UARTS=4
CONFIG_VIRTIO_MENU=y
CONFIG_VIRTIO=y
CONFIG_VIRTIO_PCI=y
CONFIG_VIRTIO_PCI_LEGACY=n
CONFIG_VIRTIO_BLK=y
CONFIG_VIRTIO_CONSOLE=y
CONFIG_HW_RANDOM=y
CONFIG_HW_RANDOM_VIRTIO=y
CONFIG_MODULES=n
CONFIG_CRYPTO=n
CONFIG_CRYPTO_BLAKE2S_X86=n
CONFIG_FTRACE=n
CONFIG_DEBUG_KERNEL=n
CONFIG_KALLSYMS=y
CONFIG_UNWINDER_FRAME_POINTER=y
CONFIG_RETPOLINE=n
CONFIG_SPECULATION_MITIGATIONS=n
CONFIG_X86_X2APIC=y
"""


#: The one source change, for this project's PVM host: there a ``syscall``
#: from user mode jumps to MSR_LSTAR (``entry_SYSCALL_64``) with rcx and r11
#: set as the instruction defines, but stays in CPL 3, so the kernel sees
#: a user-mode page fault on its own entry point and kills /init (seen on
#: the first syscall of /init: ``init[1]: segfault at ffffffff81400040 ip
#: ffffffff81400040``, CS 0x33).  The patch makes that fault the syscall it
#: was meant to be: rip and rflags back from rcx and r11 (as ``sysret``
#: would), orig_ax = nr, ax = -ENOSYS, then ``do_syscall_64`` -- what the
#: entry code does -- and the exception's own ``iret`` back to user mode.
#: On hardware without that flaw the branch is never taken (a user jump to
#: kernel text only gets what a real ``syscall`` would).
PVM_SYSCALL_MARK = "splitvmm: PVM syscall-as-page-fault"
PATCHES: tuple[tuple[str, str, str], ...] = (
    ("arch/x86/mm/fault.c",
     "\tif (kvm_handle_async_pf(regs, (u32)address))\n\t\treturn;\n",
     f"""
\t/* {PVM_SYSCALL_MARK} (vmm/minikernel.py) */
\tif (user_mode(regs) && address == (unsigned long)entry_SYSCALL_64 &&
\t    regs->ip == address) {{
\t\tregs->ip = regs->cx;
\t\tregs->flags = regs->r11;
\t\tregs->orig_ax = regs->ax;
\t\tregs->ax = -ENOSYS;
\t\tdo_syscall_64(regs, (int)regs->orig_ax);
\t\treturn;
\t}}
"""),
    ("arch/x86/mm/fault.c",
     "#include <asm/irq_stack.h>\n",
     "#include <asm/proto.h>\t\t\t/* entry_SYSCALL_64 (splitvmm) */\n#include <asm/syscall.h>\n"),
)


def apply_patches(src: pathlib.Path, patches=PATCHES) -> None:
    """Insert each patch's text after its anchor (once: a file that already
    has the text is left alone)."""
    for rel, anchor, text in patches:
        path = src / rel
        code = path.read_text()
        if text in code:
            continue
        if code.count(anchor) != 1:
            raise ImageError(f"{rel}: the anchor of a splitvmm patch is not there exactly once: {anchor!r}")
        path.write_text(code.replace(anchor, anchor + text))


def parse_config(text: str) -> dict[str, str]:
    """``CONFIG_X=v`` and ``# CONFIG_X is not set`` (as ``n``) lines of a
    .config or a fragment."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if m := re.fullmatch(r"(CONFIG_\w+)=(.*)", line):
            out[m.group(1)] = m.group(2)
        elif m := re.fullmatch(r"# (CONFIG_\w+) is not set", line):
            out[m.group(1)] = "n"
    return out


def config_mismatches(fragment: str, config: str) -> list[str]:
    """The fragment's options the final .config does not have as asked
    (an option absent from .config counts as ``n``)."""
    have = parse_config(config)
    return [f"{k}={v} (got {have.get(k, 'n')})" for k, v in parse_config(fragment).items()
            if have.get(k, "n") != v]


def missing_build_deps(which=shutil.which, exists=os.path.exists) -> list[str]:
    """The Debian packages to install for what :data:`BUILD_DEPS` lacks."""
    out: list[str] = []
    for what, pkg in BUILD_DEPS.items():
        present = exists(what) if what.startswith("/") else which(what) is not None
        if not present and pkg not in out:
            out.append(pkg)
    return out


def install_build_deps() -> None:
    missing = missing_build_deps()
    if not missing:
        return
    log.info("installing the kernel's build dependencies: %s", " ".join(missing))
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", *missing]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    if r.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=900)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    if r.returncode != 0:
        raise ImageError(f"apt-get install {' '.join(missing)}: {r.stderr.strip()[-500:]}")


def _fetch(cache: pathlib.Path, pkg: str) -> pathlib.Path:
    """``pkg``'s .deb in ``cache``, ``apt-get download``-ed when missing."""
    found = sorted(cache.glob(f"{pkg}_*.deb"))
    if not found:
        r = subprocess.run(["apt-get", "download", pkg], cwd=cache, capture_output=True, text=True, timeout=1800)
        if r.returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=900)
            r = subprocess.run(["apt-get", "download", pkg], cwd=cache, capture_output=True, text=True,
                               timeout=1800)
        if r.returncode != 0:
            raise ImageError(f"apt-get download {pkg}: {r.stderr.strip()}")
        found = sorted(cache.glob(f"{pkg}_*.deb"))
    if not found:
        raise ImageError(f"apt-get download {pkg} left no {pkg}_*.deb in {cache}")
    return found[-1]


def source_package() -> str:
    """The versioned package ``linux-source`` depends on (``linux-source-6.1``)."""
    for attempt in range(2):
        r = subprocess.run(["apt-cache", "depends", SOURCE_META], capture_output=True, text=True, timeout=120)
        if m := re.search(r"Depends: (linux-source-[\d.]+)", r.stdout):
            return m.group(1)
        if attempt == 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=900)
    raise ImageError(f"apt does not know {SOURCE_META}")


def unpack_source(deb: pathlib.Path, dest: pathlib.Path) -> None:
    """The kernel tree of the ``linux-source`` .deb into ``dest`` (its
    ``usr/src/linux-source-*.tar.xz``, top folder stripped)."""
    with image.deb_files(deb) as tar:
        member = next((mb for mb in tar.getmembers() if re.search(r"usr/src/linux-source-[^/]*\.tar\.xz$", mb.name)),
                      None)
        if member is None:
            raise ImageError(f"{deb.name}: no usr/src/linux-source-*.tar.xz")
        data = image._member_bytes(tar, member)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:xz") as src:
        members = []
        for mb in src.getmembers():
            parts = mb.name.split("/", 1)
            if len(parts) < 2 or not parts[1] or mb.name.startswith("/") or ".." in mb.name.split("/"):
                continue
            mb.name = parts[1]
            members.append(mb)
        src.extractall(tmp, members=members)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


def _make(src: pathlib.Path, build: pathlib.Path, *targets: str, jobs: int = 1) -> None:
    cmd = ["nice", "-n", "19", "make", f"-j{jobs}", "-C", str(src), f"O={build}", "ARCH=x86_64", *targets]
    log.info("%s", " ".join(cmd))
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-15:])
        raise ImageError(f"make {' '.join(targets)} failed:\n{tail}")


def configure(src: pathlib.Path, build: pathlib.Path, fragment: str = FRAGMENT) -> None:
    build.mkdir(parents=True, exist_ok=True)
    _make(src, build, "allnoconfig")
    frag = build / "splitvmm.config"
    frag.write_text(fragment)
    r = subprocess.run([str(src / "scripts/kconfig/merge_config.sh"), "-m", "-O", str(build),
                        str(build / ".config"), str(frag)], capture_output=True, text=True, cwd=src)
    if r.returncode != 0:
        raise ImageError(f"merge_config.sh: {r.stderr.strip()[-500:]}")
    _make(src, build, "olddefconfig")
    bad = config_mismatches(fragment, (build / ".config").read_text())
    if bad:
        raise ImageError("the kernel config did not take: " + ", ".join(bad))


@dataclasses.dataclass(frozen=True)
class Built:
    vmlinux: pathlib.Path
    bzimage: pathlib.Path
    initrd: pathlib.Path
    version: str


def default_cache() -> pathlib.Path:
    return image.default_cache().with_name("linux-minimal")


def build(cache: pathlib.Path | None = None, jobs: int = 2) -> Built:
    """Download, configure and build (each step only when not done yet)."""
    cache = cache or default_cache()
    cache.mkdir(parents=True, exist_ok=True)
    install_build_deps()
    deb = _fetch(cache, source_package())
    src, build_dir = cache / "src", cache / "build"
    stamp = cache / "built-from"
    patches = zlib.crc32(repr(PATCHES).encode())
    source = (f"{deb.name} {zlib.crc32(FRAGMENT.encode()):08x} {zlib.crc32(image.INIT.encode()):08x} "
              f"{patches:08x}\n")
    out = Built(cache / "vmlinux", cache / "bzImage", cache / "initramfs.cpio", "")
    if stamp.exists() and stamp.read_text() == source and all(p.exists() for p in (out.vmlinux, out.initrd)):
        return dataclasses.replace(out, version=(cache / "version").read_text().strip())
    unpacked = src / ".unpacked-from"
    if not (unpacked.exists() and unpacked.read_text() == deb.name):
        log.info("unpacking %s", deb.name)
        unpack_source(deb, src)
        unpacked.write_text(deb.name)
    apply_patches(src)
    configure(src, build_dir)
    _make(src, build_dir, "bzImage", jobs=jobs)
    release = subprocess.run(["make", "-s", "-C", str(src), f"O={build_dir}", "ARCH=x86_64", "kernelrelease"],
                             capture_output=True, text=True).stdout.strip().splitlines()
    shutil.copyfile(build_dir / "vmlinux", out.vmlinux)
    shutil.copyfile(build_dir / "arch/x86/boot/bzImage", out.bzimage)
    busybox_deb = _fetch(cache, image.BUSYBOX)
    with image.deb_files(busybox_deb) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith("bin/busybox") and m.isfile()), None)
        if member is None:
            raise ImageError(f"{busybox_deb.name}: no bin/busybox")
        busybox = image._member_bytes(tar, member)
    image._write_atomic(out.initrd, image.build_initramfs(busybox, []))
    version = release[-1] if release else "unknown"
    (cache / "version").write_text(version + "\n")
    stamp.write_text(source)
    return dataclasses.replace(out, version=version)
