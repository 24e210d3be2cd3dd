"""``vmm image``: a Linux kernel and an initramfs built from Debian packages.

In a cache folder (``$XDG_CACHE_HOME/splitvmm/linux``, or ``--cache``):

1. ``apt-get download linux-image-cloud-amd64``, the versioned kernel
   package it depends on, and ``busybox-static`` (``apt-get update`` once
   when the package lists do not know them);
2. the ``.deb`` files are read here -- an ``ar`` archive holding
   ``data.tar.*`` (deb(5)) -- for ``boot/vmlinuz-*``, ``bin/busybox`` and
   the virtio-pci and virtio-blk modules with what they depend on (the
   ``depends=`` of each module's ``.modinfo``; ``.ko.xz`` decompressed);
3. the initramfs is written as a newc cpio archive (Linux
   ``Documentation/driver-api/early-userspace/buffer-format.rst``), with an
   ``/init`` that prints a banner, mounts /proc, /sys and /dev, loads the
   modules, reads the first bytes and the size of every virtio disk,
   prints them and powers off.

No ``cpio``, ``dpkg`` or ``ar`` binary is needed: a fresh machine has apt
and Python.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import lzma
import os
import pathlib
import re
import shutil
import subprocess
import tarfile
import zlib

log = logging.getLogger(__name__)

KERNEL_META = "linux-image-cloud-amd64"
BUSYBOX = "busybox-static"
#: The modules /init loads, in this order after their dependencies.
WANTED_MODULES = ("virtio_pci", "virtio_blk")
BANNER = "splitvmm initramfs: /init started"
DONE = "splitvmm initramfs: done, powering off"


class ImageError(Exception):
    """The image cannot be built (download, package contents)."""


# -- newc cpio --------------------------------------------------------------

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"
S_IFDIR, S_IFREG, S_IFLNK, S_IFCHR = 0o040000, 0o100000, 0o120000, 0o020000


@dataclasses.dataclass(frozen=True)
class CpioEntry:
    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


def write_newc(entries: list[CpioEntry]) -> bytes:
    """A newc archive of ``entries`` (and the trailer).  Every field is 8
    hex digits; name and data are each padded to 4 bytes."""
    out = io.BytesIO()
    for ino, e in enumerate([*entries, CpioEntry(TRAILER, 0)], start=1):
        name = e.name.encode() + b"\0"
        nlink = 2 if e.mode & 0o170000 == S_IFDIR else 1
        fields = (ino if e.name != TRAILER else 0, e.mode, 0, 0, nlink if e.name != TRAILER else 1, 0,
                  len(e.data), 0, 0, e.rdev[0], e.rdev[1], len(name), 0)
        head = NEWC_MAGIC + b"".join(b"%08x" % f for f in fields)
        out.write(head + name + bytes(_pad4(len(head) + len(name))))
        out.write(e.data + bytes(_pad4(len(e.data))))
    return out.getvalue()


def read_newc(data: bytes) -> list[CpioEntry]:
    """Parse a newc archive (up to its trailer); ValueError when malformed."""
    out: list[CpioEntry] = []
    pos = 0
    while True:
        if data[pos:pos + 6] != NEWC_MAGIC:
            raise ValueError(f"no newc magic at {pos:#x}")
        fields = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, rmaj, rmin, namesize = fields[1], fields[6], fields[9], fields[10], fields[11]
        pos += 110
        name = data[pos:pos + namesize - 1].decode()
        pos += namesize
        pos += _pad4(pos)
        body = data[pos:pos + filesize]
        if len(body) != filesize:
            raise ValueError(f"{name}: truncated")
        pos += filesize + _pad4(filesize)
        if name == TRAILER:
            return out
        out.append(CpioEntry(name, mode, body, (rmaj, rmin)))


# -- Debian packages -----------------------------------------------------------

def deb_members(deb: bytes) -> dict[str, bytes]:
    """The members of a .deb's ar archive (``!<arch>``, 60-byte headers)."""
    if not deb.startswith(b"!<arch>\n"):
        raise ImageError("not a .deb (no ar magic)")
    pos, out = 8, {}
    while pos + 60 <= len(deb):
        head = deb[pos:pos + 60]
        name = head[:16].decode().strip().rstrip("/")
        size = int(head[48:58].decode().strip())
        pos += 60
        out[name] = deb[pos:pos + size]
        pos += size + (size & 1)
    return out


def deb_files(deb_path: pathlib.Path) -> tarfile.TarFile:
    members = deb_members(deb_path.read_bytes())
    data = next((v for k, v in members.items() if k.startswith("data.tar")), None)
    if data is None:
        raise ImageError(f"{deb_path.name}: no data.tar member")
    return tarfile.open(fileobj=io.BytesIO(data))   # xz, gz, zst-less: tarfile guesses


def _apt(args: list[str], cwd: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run(["apt-get", *args], cwd=cwd, capture_output=True, text=True, timeout=900)


def download(cache: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """(kernel .deb, busybox .deb) in ``cache``, fetched when missing."""
    cache.mkdir(parents=True, exist_ok=True)

    def depends() -> str | None:
        r = subprocess.run(["apt-cache", "depends", KERNEL_META], capture_output=True, text=True, timeout=120)
        m = re.search(r"Depends: (linux-image-\S+)", r.stdout)
        return m.group(1) if m else None

    kernel_pkg = depends()
    if kernel_pkg is None:
        _apt(["update", "-q"], cache)
        kernel_pkg = depends()
        if kernel_pkg is None:
            raise ImageError(f"apt does not know {KERNEL_META}")
    wanted = {kernel_pkg: f"{kernel_pkg}_*.deb", BUSYBOX: f"{BUSYBOX}_*.deb"}
    found = {pkg: sorted(cache.glob(glob)) for pkg, glob in wanted.items()}
    missing = [pkg for pkg, paths in found.items() if not paths]
    if missing:
        r = _apt(["download", *missing], cache)
        if r.returncode != 0:
            _apt(["update", "-q"], cache)
            r = _apt(["download", *missing], cache)
            if r.returncode != 0:
                raise ImageError(f"apt-get download {' '.join(missing)}: {r.stderr.strip()}")
        found = {pkg: sorted(cache.glob(glob)) for pkg, glob in wanted.items()}
    return found[kernel_pkg][-1], found[BUSYBOX][-1]


def module_depends(ko: bytes) -> list[str]:
    """The ``depends=`` of a module's .modinfo strings."""
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", ko)
    return [d for d in m.group(1).decode().split(",") if d] if m else []


def select_modules(modules: dict[str, bytes], wanted=WANTED_MODULES) -> list[str]:
    """``wanted`` and their dependencies, dependencies first."""
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in path:
            raise ImageError(f"module dependency cycle: {' -> '.join((*path, name))}")
        if name not in modules:
            raise ImageError(f"module {name} is not in the kernel package (built in?)")
        for dep in module_depends(modules[name]):
            visit(dep, (*path, name))
        order.append(name)

    for name in wanted:
        visit(name, ())
    return order


INIT = """#!/bin/sh
/bin/busybox mkdir -p /proc /sys /dev /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
echo "{banner} (kernel $(uname -r))"
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in {modules}; do
    insmod /lib/modules/$m.ko || echo "splitvmm initramfs: insmod $m failed"
done
found=0
for d in /sys/block/vd*; do
    [ -e "$d" ] || continue
    n=${{d##*/}}
    found=$((found + 1))
    echo "splitvmm initramfs: disk $n: $(cat $d/size) sectors, serial '$(cat $d/serial 2>/dev/null)'"
    echo "splitvmm initramfs: $n first bytes: $(head -c 16 /dev/$n | od -An -tx1)"
done
echo "splitvmm initramfs: $found virtio disk(s)"
echo "{done}"
poweroff -f
"""


@dataclasses.dataclass(frozen=True)
class Image:
    kernel: pathlib.Path
    initrd: pathlib.Path
    version: str
    modules: tuple[str, ...]


def build_initramfs(busybox: bytes, modules: list[tuple[str, bytes]]) -> bytes:
    names = " ".join(name for name, _ in modules)
    entries = [CpioEntry(d, S_IFDIR | 0o755) for d in ("bin", "dev", "proc", "sys", "lib", "lib/modules")]
    entries.append(CpioEntry("dev/console", S_IFCHR | 0o600, rdev=(5, 1)))
    entries.append(CpioEntry("bin/busybox", S_IFREG | 0o755, busybox))
    entries.append(CpioEntry("bin/sh", S_IFLNK | 0o777, b"busybox"))
    entries += [CpioEntry(f"lib/modules/{name}.ko", S_IFREG | 0o644, data) for name, data in modules]
    entries.append(CpioEntry("init", S_IFREG | 0o755, INIT.format(banner=BANNER, done=DONE, modules=names).encode()))
    return write_newc(entries)


def default_cache() -> pathlib.Path:
    base = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache")
    return base / "splitvmm" / "linux"


def build(cache: pathlib.Path | None = None) -> Image:
    """Download (if needed) and build the kernel and initramfs in ``cache``."""
    cache = cache or default_cache()
    kernel_deb, busybox_deb = download(cache)
    out_kernel = cache / "vmlinuz"
    out_initrd = cache / "initramfs.cpio"
    stamp = cache / "built-from"
    source = f"{kernel_deb.name} {busybox_deb.name} {zlib.crc32(INIT.encode()):08x}\n"
    with deb_files(kernel_deb) as tar:
        vmlinuz = next((m for m in tar.getmembers() if re.fullmatch(r"\./boot/vmlinuz-.*|boot/vmlinuz-.*", m.name)),
                       None)
        if vmlinuz is None:
            raise ImageError(f"{kernel_deb.name}: no boot/vmlinuz-*")
        version = vmlinuz.name.split("vmlinuz-", 1)[1]
        if stamp.exists() and stamp.read_text() == source and out_kernel.exists() and out_initrd.exists():
            mods = tuple(stamp.with_name("modules").read_text().split())
            return Image(out_kernel, out_initrd, version, mods)
        modules: dict[str, bytes] = {}
        for m in tar.getmembers():
            base = m.name.rsplit("/", 1)[-1]
            if "/kernel/drivers/" in m.name and base.startswith("virtio") and m.isfile():
                raw = tar.extractfile(m).read()
                if base.endswith(".ko.xz"):
                    raw, base = lzma.decompress(raw), base[:-3]
                if base.endswith(".ko"):
                    modules[base[:-3]] = raw
        kernel_bytes = tar.extractfile(vmlinuz).read()
    with deb_files(busybox_deb) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith("bin/busybox") and m.isfile()), None)
        if member is None:
            raise ImageError(f"{busybox_deb.name}: no bin/busybox")
        busybox = tar.extractfile(member).read()
    order = select_modules(modules)
    initramfs = build_initramfs(busybox, [(n, modules[n]) for n in order])
    _write_atomic(out_kernel, kernel_bytes)
    _write_atomic(out_initrd, initramfs)
    stamp.with_name("modules").write_text(" ".join(order))
    stamp.write_text(source)
    return Image(out_kernel, out_initrd, version, tuple(order))


def _write_atomic(path: pathlib.Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def have_apt() -> bool:
    return shutil.which("apt-get") is not None
