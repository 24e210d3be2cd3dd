"""Builds the project's freestanding test guests into PVH ELF images.

A guest is one or more C (or assembly) files that define ``guest_main``
(and optionally ``guest_ap_main``), linked with this package's runtime:
``start.S`` (PVH entry, long mode, ring 3), ``runtime.c`` and ``guest.h``
(port I/O, MMIO, command line, test exit), laid out by ``guest.ld``.  gcc
builds them on demand into a cache directory the caller names; nothing
built is committed.  Images are cached by the hash of every input.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import subprocess
from typing import Iterable, Mapping

from vmm.endpoint import VmmError

log = logging.getLogger(__name__)

HERE = pathlib.Path(__file__).resolve().parent
RUNTIME = (HERE / "start.S", HERE / "runtime.c", HERE / "irq.S", HERE / "irq.c")
#: The drivers a guest may link with: serial (COM1), PCI, virtio.
LIBRARY = (HERE / "serial.c", HERE / "pci.c", HERE / "virtio.c")
LINKER_SCRIPT = HERE / "guest.ld"
HEADER = HERE / "guest.h"
#: Every header of the guest library (guest.h, irq.h, serial.h, pci.h...):
#: a change to any of them rebuilds the cached guests.
HEADERS = tuple(sorted(HERE.glob("*.h")))

CFLAGS = (
    "-m64", "-O2", "-std=gnu11", "-ffreestanding", "-fno-pic", "-no-pie", "-static",
    "-nostdlib", "-mno-red-zone", "-mgeneral-regs-only", "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables", "-fno-unwind-tables", "-fcf-protection=none",
    "-fno-tree-loop-distribute-patterns", "-Wall", "-Wextra", "-Werror",
)
LDFLAGS = ("-Wl,--build-id=none", "-Wl,-z,noexecstack", "-Wl,--no-warn-rwx-segments")


class GuestBuildError(VmmError):
    """gcc could not build a guest."""


def compiler() -> str:
    cc = os.environ.get("CC", "gcc")
    if shutil.which(cc) is None:
        raise GuestBuildError(f"no C compiler {cc!r} on PATH (the test guests are built with gcc)")
    return cc


def build(sources: Iterable[os.PathLike | str], out_dir: os.PathLike | str, name: str | None = None,
          defines: Mapping[str, object] | None = None) -> pathlib.Path:
    """Compile ``sources`` with the runtime into ``out_dir/<name>-<hash>.elf``.

    Returns the cached image when every input is unchanged."""
    srcs = [pathlib.Path(s) for s in sources]
    if not srcs:
        raise GuestBuildError("a guest needs at least one source file")
    name = name or srcs[0].stem
    flags = list(CFLAGS) + [f"-D{k}={v}" for k, v in sorted((defines or {}).items())]
    try:        # CPython's own SHA-256: hashlib would load OpenSSL into the VMM (~4 MB, issue 15)
        from _sha256 import sha256
    except ImportError:
        from hashlib import sha256
    digest = sha256()
    for path in (*RUNTIME, LINKER_SCRIPT, *HEADERS, *srcs):
        try:
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
        except OSError as e:
            raise GuestBuildError(f"{path}: {e.strerror}") from None
    digest.update("\0".join(flags).encode())
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{name}-{digest.hexdigest()[:16]}.elf"
    if target.exists():
        return target
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    cmd = [compiler(), *flags, f"-I{HERE}", "-T", str(LINKER_SCRIPT), *LDFLAGS,
           "-o", str(tmp), *map(str, RUNTIME), *map(str, srcs)]
    log.debug("building guest %s: %s", name, " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise GuestBuildError(f"building guest {name} failed:\n{proc.stderr.strip()}")
    os.replace(tmp, target)
    return target


#: The demo guest's sources (the default guest of ``vmm run``).
DEMO_SOURCES = (HERE / "demo.c", *LIBRARY)


def default_cache() -> pathlib.Path:
    """Where built guests are kept between runs: $XDG_CACHE_HOME/splitvmm/guests
    (~/.cache/splitvmm/guests)."""
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "splitvmm" / "guests"


def demo(out_dir: os.PathLike | str | None = None) -> pathlib.Path:
    """The demo guest (``vmm/guests/demo.c``: PCI, virtio-rng, virtio-blk,
    virtio-console, serial), built into ``out_dir`` or the default cache."""
    return build(DEMO_SOURCES, out_dir if out_dir is not None else default_cache(), name="demo")
