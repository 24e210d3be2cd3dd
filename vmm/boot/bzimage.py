"""bzImage: the x86 Linux boot protocol, 64-bit entry.

Linux ``Documentation/arch/x86/boot.rst``: the image starts with the
real-mode setup (``setup_sects`` + 1 sectors of 512 bytes) whose header at
0x1f1 (:class:`vmm.boot.bootparams.SetupHeader`) describes the kernel;
the rest of the file is the protected-mode kernel.  This loader

* checks the header: ``boot_flag`` 0xAA55, magic "HdrS", protocol 2.12 or
  later with ``XLF_KERNEL_64`` (the 64-bit entry), ``LOADED_HIGH`` in
  ``loadflags``, ``kernel_alignment`` a power of two when
  ``relocatable_kernel``, ``init_size`` (the memory the kernel needs from
  its load address while it decompresses itself) inside guest RAM;
* loads the protected-mode kernel at ``pref_address`` (or 16 MiB, rounded
  up to ``kernel_alignment``);
* writes the zero page (``struct boot_params``): the setup header copied
  from the image (up to 0x202 + the byte at 0x201), ``type_of_loader``,
  ``cmd_line_ptr`` (at most ``cmdline_size`` bytes), the initrd placed as
  high as it fits below ``initrd_addr_max`` and below the MMIO hole,
  the e820 map of :func:`vmm.boot.pvh.memory_map` and ``acpi_rsdp_addr``;
* builds page tables that identity-map the low 4 GiB with 2 MiB pages and
  a GDT with ``__BOOT_CS`` (0x10, 64-bit code) and ``__BOOT_DS`` (0x18);
* starts the boot vCPU in 64-bit mode at load address + 0x200 with ``rsi``
  pointing at the zero page and interrupts off ("64-bit BOOT PROTOCOL").

:func:`vmlinux` gives the decompressed kernel inside a bzImage
(:mod:`vmm.boot.payload`), which :mod:`vmm.boot.linux` may boot through
PVH instead (the decompressor itself runs slowly where ring 0 is
emulated).
"""

from __future__ import annotations

import ctypes
import dataclasses

from vmm import layout, x86
from vmm.boot import BootError
from vmm.boot import bootparams as bp
from vmm.boot import payload as payloads
from vmm.boot.pvh import memory_map
from vmm.kvm import MP_STATE_RUNNABLE
from vmm.memory import GuestMemory

#: Oldest protocol with the 64-bit entry (``XLF_KERNEL_64``, 2.12) and
#: ``payload_offset``/``pref_address``/``init_size`` (2.08/2.10).
MIN_PROTOCOL = 0x020C
#: The 64-bit entry's offset from the load address.
ENTRY_64 = 0x200
#: GDT selectors the protocol names.
BOOT_CS = 0x10
BOOT_DS = 0x18
_GDT = (
    0,
    0,
    x86.gdt_entry(0, 0xFFFFF, 0x90 | x86.SEG_TYPE_CODE_XRA, 0xA),   # 64-bit code (G, L)
    x86.gdt_entry(0, 0xFFFFF, 0x90 | x86.SEG_TYPE_DATA_RWA, 0xC),   # flat data
)
_PTE_RW = 1 << 1
_IDENTITY_GIB = 4


def is_bzimage(data: bytes) -> bool:
    return len(data) >= 0x206 and data[0x202:0x206] == b"HdrS"


@dataclasses.dataclass(frozen=True)
class BzImage:
    """A parsed bzImage: its header and where its parts are in the file."""

    name: str
    data: bytes
    header: bp.SetupHeader
    #: File offset of the protected-mode kernel.
    kernel_offset: int

    @property
    def protocol(self) -> str:
        return f"{self.header.version >> 8}.{self.header.version & 0xFF:02d}"

    def payload(self) -> bytes:
        h = self.header
        start = self.kernel_offset + h.payload_offset
        if h.payload_length == 0 or start + h.payload_length > len(self.data):
            raise BootError(f"{self.name}: payload {h.payload_offset:#x}+{h.payload_length:#x} is outside the file")
        return self.data[start:start + h.payload_length]


def parse(data: bytes, name: str = "kernel") -> BzImage:
    """Check a bzImage's setup header; BootError says what is wrong."""
    if not is_bzimage(data):
        raise BootError(f"{name}: neither a bzImage (no 'HdrS' at 0x202) nor an ELF vmlinux")
    header = bp.SetupHeader.from_buffer_copy(data, bp.SETUP_HEADER_OFFSET)
    if header.boot_flag != bp.BOOT_FLAG:
        raise BootError(f"{name}: boot_flag {header.boot_flag:#06x}, not 0xaa55")
    if header.version < MIN_PROTOCOL:
        raise BootError(f"{name}: boot protocol {header.version >> 8}.{header.version & 0xFF:02d} is too old "
                        "(the 64-bit entry needs 2.12 or later)")
    if not header.xloadflags & bp.XLF_KERNEL_64:
        raise BootError(f"{name}: not a 64-bit kernel (XLF_KERNEL_64 clear in xloadflags)")
    if not header.loadflags & bp.LOADED_HIGH:
        raise BootError(f"{name}: a zImage (LOADED_HIGH clear): only bzImages are loaded")
    if header.relocatable_kernel:
        align = header.kernel_alignment
        if align == 0 or align & (align - 1) or align < layout.PAGE_SIZE:
            raise BootError(f"{name}: kernel_alignment {align:#x} is not a power of two of at least 4 KiB")
    sects = header.setup_sects or bp.DEFAULT_SETUP_SECTS
    kernel_offset = (sects + 1) * 512
    if kernel_offset >= len(data):
        raise BootError(f"{name}: {sects} setup sectors but the file has {len(data)} bytes")
    if header.init_size == 0:
        raise BootError(f"{name}: init_size is 0")
    return BzImage(name, data, header, kernel_offset)


def vmlinux(image: BzImage) -> bytes:
    """The decompressed kernel inside the image's payload."""
    return payloads.decompress(image.payload(), image.name)


@dataclasses.dataclass(frozen=True)
class LinuxBoot:
    """What the boot vCPU needs to start a kernel loaded by :func:`load`."""

    entry: int
    zero_page: int
    load_address: int
    initrd: tuple[int, int] | None


def load_address(header: bp.SetupHeader) -> int:
    addr = max(header.pref_address, layout.LINUX_KERNEL_ADDR) if header.relocatable_kernel else header.pref_address
    if header.relocatable_kernel:
        align = header.kernel_alignment
        addr = (addr + align - 1) & ~(align - 1)
    return addr


def ram_below(memory: GuestMemory, limit: int) -> int:
    """End of the RAM that starts at 1 MiB, capped at ``limit``."""
    return min(memory.regions[0].end, limit)


def place_initrd(memory: GuestMemory, size: int, lowest: int, highest_end: int, name: str = "initrd") -> int:
    """The page-aligned address of an initrd of ``size`` bytes, as high as
    it fits with its end at most ``highest_end`` and its start at least
    ``lowest``; BootError when it does not fit."""
    end = ram_below(memory, highest_end)
    addr = (end - size) & ~(layout.PAGE_SIZE - 1)
    if size == 0 or addr < lowest:
        raise BootError(f"{name}: {size} bytes do not fit between {lowest:#x} and {end:#x} "
                        f"(guest RAM {memory.size >> 20} MiB); give more --memory")
    return addr


def load(memory: GuestMemory, image: BzImage, cmdline: str = "", initrd: bytes | None = None,
         rsdp: int = 0) -> LinuxBoot:
    """Load ``image`` for the 64-bit entry; write the zero page, the command
    line, the initrd, the page tables and the GDT."""
    h = image.header
    name = image.name
    addr = load_address(h)
    kernel = image.data[image.kernel_offset:]
    need = max(h.init_size, len(kernel))
    if addr < layout.HIMEM_START or not memory.contains(addr, need) or addr + need > layout.MMIO_HOLE_START:
        raise BootError(f"{name}: the kernel needs {need >> 20} MiB from {addr:#x} (init_size); "
                        f"guest RAM is {memory.size >> 20} MiB: give more --memory")
    raw = cmdline.encode()
    limit = min(h.cmdline_size, layout.LINUX_CMDLINE_MAX - 1)
    if b"\0" in raw or len(raw) > limit:
        raise BootError(f"command line of {len(raw)} bytes: this kernel takes at most {limit} "
                        "(cmdline_size), with no NUL")
    zp = bp.BootParams()
    header_end = min(0x202 + image.data[0x201], ctypes.sizeof(zp))
    ctypes.memmove(ctypes.addressof(zp) + bp.SETUP_HEADER_OFFSET, image.data[bp.SETUP_HEADER_OFFSET:header_end],
                   header_end - bp.SETUP_HEADER_OFFSET)
    zp.hdr.type_of_loader = bp.LOADER_TYPE_UNDEFINED
    zp.hdr.vid_mode = bp.VID_MODE_NORMAL
    zp.hdr.loadflags = (zp.hdr.loadflags | bp.CAN_USE_HEAP) & ~(bp.QUIET_FLAG | bp.KEEP_SEGMENTS)
    zp.hdr.heap_end_ptr = 0xFE00
    zp.hdr.code32_start = addr
    zp.hdr.cmd_line_ptr = layout.LINUX_CMDLINE
    zp.ext_cmd_line_ptr = 0
    zp.acpi_rsdp_addr = rsdp
    placed = None
    if initrd is not None:
        lowest = addr + need
        at = place_initrd(memory, len(initrd), lowest, h.initrd_addr_max + 1, "initrd")
        memory.write(at, initrd)
        zp.hdr.ramdisk_image = at
        zp.hdr.ramdisk_size = len(initrd)
        placed = (at, len(initrd))
    entries = memory_map(memory)
    if len(entries) > bp.E820_MAX_ENTRIES_ZEROPAGE:
        raise BootError(f"{len(entries)} e820 entries do not fit in the zero page")
    zp.e820_entries = len(entries)
    for i, (start, size, kind) in enumerate(entries):
        zp.e820_table[i] = bp.BootE820Entry(start, size, kind)
    memory.write(addr, kernel)
    memory.write(layout.LINUX_CMDLINE, raw + b"\0")
    memory.write(layout.LINUX_ZERO_PAGE, bytes(zp))
    write_page_tables(memory)
    memory.write(layout.BOOT_GDT, b"".join(e.to_bytes(8, "little") for e in _GDT))
    return LinuxBoot(entry=addr + ENTRY_64, zero_page=layout.LINUX_ZERO_PAGE, load_address=addr, initrd=placed)


def write_page_tables(memory: GuestMemory) -> None:
    """PML4 -> one PDPT -> four page directories of 2 MiB pages: the low
    4 GiB identity-mapped, writable (SDM Vol. 3A §4.5)."""
    flags = x86.PTE_P | _PTE_RW
    memory.write(layout.LINUX_PML4, (layout.LINUX_PDPT | flags).to_bytes(8, "little") + bytes(4088))
    pdpt = b"".join((layout.LINUX_PD + i * layout.PAGE_SIZE | flags).to_bytes(8, "little")
                    for i in range(_IDENTITY_GIB))
    memory.write(layout.LINUX_PDPT, pdpt + bytes(layout.PAGE_SIZE - len(pdpt)))
    for g in range(_IDENTITY_GIB):
        pd = b"".join(((g << 30) + (i << 21) | flags | x86.PTE_PS).to_bytes(8, "little") for i in range(512))
        memory.write(layout.LINUX_PD + g * layout.PAGE_SIZE, pd)


def enter(vcpu, boot: LinuxBoot) -> None:
    """Put the boot vCPU at the 64-bit entry: long mode, paging on with the
    identity map, CS = __BOOT_CS, the data segments __BOOT_DS, interrupts
    off, ``rsi`` = the zero page."""
    sregs = vcpu.get_sregs()
    x86.describe_segment(sregs.cs, _GDT[BOOT_CS >> 3], BOOT_CS)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        x86.describe_segment(seg, _GDT[BOOT_DS >> 3], BOOT_DS)
    sregs.gdt.base = layout.BOOT_GDT
    sregs.gdt.limit = len(_GDT) * 8 - 1
    sregs.idt.base = 0
    sregs.idt.limit = 0
    sregs.cr0 = x86.CR0_PE | x86.CR0_PG | 0x10
    sregs.cr3 = layout.LINUX_PML4
    sregs.cr4 = x86.CR4_PAE
    sregs.efer = x86.EFER_LME | x86.EFER_LMA
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    for reg in ("rax", "rbx", "rcx", "rdx", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"):
        setattr(regs, reg, 0)
    regs.rsi = boot.zero_page
    regs.rsp = 0
    regs.rip = boot.entry
    regs.rflags = x86.RFLAGS_RESERVED
    vcpu.set_regs(regs)
    vcpu.set_mp_state(MP_STATE_RUNNABLE)
