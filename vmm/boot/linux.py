"""Linux kernels: pick the loader for a kernel file and boot it.

Two image formats:

* an **ELF vmlinux** with a PVH note boots through :mod:`vmm.boot.pvh`,
  the initrd as module 0 of ``hvm_start_info``;
* a **bzImage** boots through the 64-bit boot protocol
  (:mod:`vmm.boot.bzimage`), or -- ``--kernel-boot pvh`` -- its payload is
  decompressed on the host (:mod:`vmm.boot.payload`) and the vmlinux
  inside booted through PVH, when it has a PVH note (Debian's kernels do).

``auto`` (the default) chooses PVH for a bzImage on a host whose KVM is
PVM (``/sys/module/kvm_pvm``): there the guest's ring 0 is emulated
instruction by instruction and the kernel's own decompressor takes
minutes, while the host decompresses the same payload in well under a
second.  Elsewhere (VMX/SVM) ``auto`` takes the 64-bit boot protocol, as
a bootloader would.  A file that is neither format, a protocol too old,
an initrd or command line that does not fit: :class:`vmm.boot.BootError`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable

from vmm.boot import BootError, bzimage, pvh
from vmm.boot.elf import ELF_MAGIC, ElfFile
from vmm.memory import GuestMemory

log = logging.getLogger(__name__)

KERNEL_BOOTS = ("auto", "pvh", "bzimage")
#: Present when the host's KVM is PVM (no VMX/SVM; ring 0 emulated).
PVM_MODULE = "/sys/module/kvm_pvm"


def host_is_pvm() -> bool:
    return os.path.isdir(PVM_MODULE)


@dataclasses.dataclass(frozen=True)
class LoadedKernel:
    """A kernel in guest memory: how it was booted and how to start vCPU 0."""

    #: "pvh" or "bzimage" (the 64-bit boot protocol).
    method: str
    #: What was loaded, for the log: format, protocol, compression.
    description: str
    enter: Callable[[object], None]
    initrd: tuple[int, int] | None


def read_file(path: str | os.PathLike, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise BootError(f"{what} {os.fspath(path)}: {e.strerror}") from None


def load(memory: GuestMemory, kernel: str | os.PathLike, initrd: str | os.PathLike | None = None,
         cmdline: str = "", boot: str = "auto", rsdp: int = 0) -> LoadedKernel:
    """Load a kernel file (and initrd) by the method ``boot`` names."""
    if boot not in KERNEL_BOOTS:
        raise BootError(f"--kernel-boot {boot!r}: one of {', '.join(KERNEL_BOOTS)}")
    name = os.fspath(kernel)
    data = read_file(kernel, "kernel")
    initrd_data = read_file(initrd, "initrd") if initrd is not None else None
    if data[:4] == ELF_MAGIC:
        if boot == "bzimage":
            raise BootError(f"{name}: an ELF vmlinux, not a bzImage (it boots through PVH)")
        return _pvh(memory, data, name, initrd_data, cmdline, rsdp, "ELF vmlinux")
    image = bzimage.parse(data, name)
    if boot == "auto":
        boot = "pvh" if host_is_pvm() else "bzimage"
        if boot == "pvh":
            try:
                inner = bzimage.vmlinux(image)
                pvh.find_entry(ElfFile(inner, f"{name} (payload)"))
            except BootError as e:
                log.warning("%s: cannot boot its payload through PVH (%s); using the 64-bit boot protocol, "
                            "whose decompressor runs slowly on this host", name, e)
                boot = "bzimage"
            else:
                return _pvh(memory, inner, name, initrd_data, cmdline, rsdp,
                            f"bzImage (protocol {image.protocol}), "
                            f"{bzimage.payloads.compression(image.payload())} payload decompressed on the host")
    if boot == "pvh":
        return _pvh(memory, bzimage.vmlinux(image), name, initrd_data, cmdline, rsdp,
                    f"bzImage (protocol {image.protocol}), "
                    f"{bzimage.payloads.compression(image.payload())} payload decompressed on the host")
    loaded = bzimage.load(memory, image, cmdline, initrd_data, rsdp)
    return LoadedKernel("bzimage", f"bzImage, boot protocol {image.protocol}, 64-bit entry at {loaded.entry:#x}",
                        lambda vcpu: bzimage.enter(vcpu, loaded), loaded.initrd)


def _pvh(memory: GuestMemory, data: bytes, name: str, initrd: bytes | None, cmdline: str, rsdp: int,
         what: str) -> LoadedKernel:
    booted = pvh.load(memory, data, cmdline, initrd=initrd, rsdp=rsdp)
    return LoadedKernel("pvh", f"{what}, PVH entry {booted.entry:#x}",
                        lambda vcpu: pvh.enter(vcpu, booted), booted.modules[0] if booted.modules else None)
