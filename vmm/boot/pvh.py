"""PVH boot: load an ELF with a ``XEN_ELFNOTE_PHYS32_ENTRY`` note and start
its vCPUs in 32-bit flat protected mode.

The ABI (Xen ``docs/misc/pvh.pandoc``; structures from
``xen/include/public/arch-x86/hvm/start_info.h``):

* PT_LOAD segments are placed at their physical addresses (``p_paddr``).
* The entry is the 32-bit value of the note of type 18 in the "Xen" name
  space (``xen/include/public/elfnote.h``).
* ``ebx`` holds the guest-physical address of an ``hvm_start_info``
  (magic 0x336ec578, version 1) that points at the command line and at an
  E820-style memory map (``hvm_memmap_table_entry``).
* CR0.PE = 1, paging off, CS a flat 32-bit execute/read segment, DS, ES,
  SS flat 32-bit read/write segments, TR a 32-bit TSS, EFLAGS bit 1 only,
  interrupts off.

**Secondary vCPUs** are not started with INIT/SIPI: splitvmm enters every
vCPU directly at the same PVH entry, in the same state as vCPU 0 (``ebx``
pointing at the same start info), with KVM_MP_STATE_RUNNABLE.  vCPU *n*
has APIC id *n*; a guest tells the vCPUs apart by reading its local APIC
id (xAPIC register 0x20 at 0xFEE00000, paging off) or CPUID leaf 1
EBX[31:24].  A guest that sends INIT/SIPI anyway finds its APs already
running.  (Real hardware, and QEMU, start APs only on INIT/SIPI; that
path, a real-mode trampoline, is slow on an emulated ring 0 and not
needed by the project's guests.)
"""

from __future__ import annotations

import os
import struct

from devices.record import record
from vmm import layout, x86
from vmm.boot import BootError
from vmm.boot.elf import ElfFile
from vmm.kvm import MP_STATE_RUNNABLE
from vmm.memory import GuestMemory

XEN_ELFNOTE_PHYS32_ENTRY = 18
HVM_START_MAGIC = 0x336EC578
HVM_START_VERSION = 1
XEN_HVM_MEMMAP_TYPE_RAM = 1
XEN_HVM_MEMMAP_TYPE_RESERVED = 2

# struct hvm_start_info (version 1): magic, version, flags, nr_modules,
# modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr, memmap_entries,
# reserved.
START_INFO = struct.Struct("<IIIIQQQQII")
# struct hvm_memmap_table_entry: addr, size, type, reserved.
MEMMAP_ENTRY = struct.Struct("<QQII")
# struct hvm_modlist_entry: paddr, size, cmdline_paddr, reserved.
MODLIST_ENTRY = struct.Struct("<QQQQ")
assert START_INFO.size == 56 and MEMMAP_ENTRY.size == 24 and MODLIST_ENTRY.size == 32
assert layout.PVH_MODLIST + layout.PVH_MODLIST_MAX * MODLIST_ENTRY.size <= layout.PVH_CMDLINE
assert layout.PVH_START_INFO + START_INFO.size <= layout.PVH_MEMMAP

# The boot GDT (at layout.BOOT_GDT): selectors of the initial state.
BOOT_CS = 0x08
BOOT_DS = 0x10
BOOT_TR = 0x18
_BOOT_GDT = (
    0,
    x86.gdt_entry(0, 0xFFFFF, 0x90 | x86.SEG_TYPE_CODE_XRA, 0xC),  # flat 32-bit code
    x86.gdt_entry(0, 0xFFFFF, 0x90 | x86.SEG_TYPE_DATA_RWA, 0xC),  # flat 32-bit data
    x86.gdt_entry(0, 0x67, 0x80 | x86.SEG_TYPE_TSS32_BUSY, 0x0),   # 32-bit TSS
)


@record
class PvhBoot:
    """What the vCPUs need to start a loaded PVH image."""

    entry: int
    start_info: int
    #: [start, end) of guest-physical memory the image occupies.
    image: tuple[int, int]
    #: (address, size) of each module (the initrd), in start-info order.
    modules: tuple[tuple[int, int], ...] = ()


def find_entry(elf: ElfFile) -> int:
    """The PHYS32 entry from the image's Xen notes."""
    for note in elf.notes():
        if note.name == b"Xen" and note.type == XEN_ELFNOTE_PHYS32_ENTRY:
            if len(note.desc) not in (4, 8):
                raise BootError(f"{elf.name}: PHYS32_ENTRY note of {len(note.desc)} bytes")
            entry = int.from_bytes(note.desc, "little")
            if entry >= 1 << 32:
                raise BootError(f"{elf.name}: PVH entry {entry:#x} is above 4 GiB")
            return entry
    raise BootError(f"{elf.name}: no XEN_ELFNOTE_PHYS32_ENTRY note: not a PVH image")


def memory_map(memory: GuestMemory) -> list[tuple[int, int, int]]:
    """(addr, size, type) entries describing guest RAM."""
    low = memory.regions[0]
    out = [(0, min(layout.EBDA_START, low.size), XEN_HVM_MEMMAP_TYPE_RAM)]
    if low.size > layout.HIMEM_START:
        out.append((layout.EBDA_START, layout.HIMEM_START - layout.EBDA_START, XEN_HVM_MEMMAP_TYPE_RESERVED))
        out.append((layout.HIMEM_START, low.size - layout.HIMEM_START, XEN_HVM_MEMMAP_TYPE_RAM))
    for r in memory.regions[1:]:
        out.append((r.guest_addr, r.size, XEN_HVM_MEMMAP_TYPE_RAM))
    return out


def load(memory: GuestMemory, image: bytes | str | os.PathLike, cmdline: str = "",
         initrd: bytes | None = None, rsdp: int = 0) -> PvhBoot:
    """Load a PVH ELF (bytes or a path) and write its start info.

    ``initrd`` becomes module 0 of the start info (``hvm_modlist_entry``),
    placed page-aligned as high as it fits in RAM below the MMIO hole and
    above the image (Linux takes its first module as the initrd);
    ``rsdp`` is the ACPI RSDP's address (0: none)."""
    if isinstance(image, (str, os.PathLike)):
        name = os.fspath(image)
        try:
            with open(name, "rb") as f:
                data = f.read()
        except OSError as e:
            raise BootError(f"{name}: {e.strerror}") from None
    else:
        name, data = "image", bytes(image)
    elf = ElfFile(data, name)
    entry = find_entry(elf)
    loads = elf.loads
    if not loads:
        raise BootError(f"{name}: no loadable segment")
    lo, hi = 1 << 64, 0
    for seg in loads:
        start, end = seg.paddr, seg.paddr + seg.memsz
        if start < layout.BOOT_AREA_END:
            raise BootError(f"{name}: segment at {start:#x} overlaps the boot area "
                            f"(below {layout.BOOT_AREA_END:#x})")
        if not memory.contains(start, seg.memsz):
            raise BootError(f"{name}: segment {start:#x}-{end:#x} does not fit in "
                            f"{memory.size >> 20} MiB of guest RAM")
        lo, hi = min(lo, start), max(hi, end)
    if not any(s.paddr <= entry < s.paddr + s.memsz for s in loads):
        raise BootError(f"{name}: PVH entry {entry:#x} is outside the loaded segments")
    for seg in loads:
        memory.write(seg.paddr, data[seg.offset:seg.offset + seg.filesz])
        if seg.memsz > seg.filesz:
            memory.fill(seg.paddr + seg.filesz, seg.memsz - seg.filesz)
    modules = []
    if initrd is not None:
        from vmm.boot.bzimage import place_initrd
        at = place_initrd(memory, len(initrd), (hi + layout.PAGE_SIZE - 1) & ~(layout.PAGE_SIZE - 1),
                          layout.MMIO_HOLE_START)
        memory.write(at, initrd)
        modules.append((at, len(initrd)))
    write_start_info(memory, cmdline, modules, rsdp)
    write_boot_gdt(memory)
    return PvhBoot(entry=entry, start_info=layout.PVH_START_INFO, image=(lo, hi), modules=tuple(modules))


def write_start_info(memory: GuestMemory, cmdline: str, modules: list[tuple[int, int]] | None = None,
                     rsdp: int = 0) -> None:
    raw = cmdline.encode()
    if b"\0" in raw or len(raw) + 1 > layout.CMDLINE_MAX:
        raise BootError(f"command line must have no NUL and at most {layout.CMDLINE_MAX - 1} bytes")
    memory.write(layout.PVH_CMDLINE, raw + b"\0")
    entries = memory_map(memory)
    assert layout.PVH_MEMMAP + len(entries) * MEMMAP_ENTRY.size <= layout.PVH_MODLIST
    modules = modules or []
    assert len(modules) <= layout.PVH_MODLIST_MAX
    for i, (addr, size) in enumerate(modules):
        memory.write(layout.PVH_MODLIST + i * MODLIST_ENTRY.size, MODLIST_ENTRY.pack(addr, size, 0, 0))
    for i, (addr, size, kind) in enumerate(entries):
        memory.write(layout.PVH_MEMMAP + i * MEMMAP_ENTRY.size, MEMMAP_ENTRY.pack(addr, size, kind, 0))
    memory.write(layout.PVH_START_INFO, START_INFO.pack(
        HVM_START_MAGIC, HVM_START_VERSION, 0, len(modules), layout.PVH_MODLIST if modules else 0,
        layout.PVH_CMDLINE, rsdp, layout.PVH_MEMMAP, len(entries), 0))


def write_boot_gdt(memory: GuestMemory) -> None:
    memory.write(layout.BOOT_GDT, b"".join(e.to_bytes(8, "little") for e in _BOOT_GDT))


def enter(vcpu, boot: PvhBoot) -> None:
    """Put ``vcpu`` (a :class:`vmm.kvm.Vcpu`) at the PVH entry, runnable."""
    sregs = vcpu.get_sregs()
    x86.describe_segment(sregs.cs, _BOOT_GDT[BOOT_CS >> 3], BOOT_CS)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        x86.describe_segment(seg, _BOOT_GDT[BOOT_DS >> 3], BOOT_DS)
    x86.describe_segment(sregs.tr, _BOOT_GDT[BOOT_TR >> 3], BOOT_TR)
    sregs.gdt.base = layout.BOOT_GDT
    sregs.gdt.limit = len(_BOOT_GDT) * 8 - 1
    sregs.idt.base = 0
    sregs.idt.limit = 0
    sregs.cr0 = x86.CR0_PE | 0x10  # PE, and ET (always 1 on modern CPUs)
    sregs.cr3 = 0
    sregs.cr4 = 0
    sregs.efer = 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    for name in ("rax", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10",
                 "r11", "r12", "r13", "r14", "r15"):
        setattr(regs, name, 0)
    regs.rip = boot.entry
    regs.rbx = boot.start_info
    regs.rflags = x86.RFLAGS_RESERVED
    vcpu.set_regs(regs)
    vcpu.set_mp_state(MP_STATE_RUNNABLE)
