"""The bzImage loader (vmm.boot.bzimage): every setup-header check, every
zero-page field it writes, the page tables and GDT, and the error cases."""

from __future__ import annotations

import struct

import pytest

from tests.vmm.linux import images
from vmm import layout, x86
from vmm.boot import BootError, bzimage
from vmm.boot import bootparams as bp
from vmm.boot.pvh import memory_map
from vmm.memory import GuestMemory


@pytest.fixture
def memory():
    with_mem = GuestMemory(64 * layout.MiB)
    yield with_mem
    with_mem.close()


def zero_page(memory: GuestMemory) -> bp.BootParams:
    return bp.BootParams.from_buffer_copy(memory.read(layout.LINUX_ZERO_PAGE, 4096))


def test_parse_reads_the_header():
    img = bzimage.parse(images.bzimage(setup_sects=3), "k")
    assert img.header.version == 0x020F and img.protocol == "2.15"
    assert img.kernel_offset == 4 * 512


def test_setup_sects_zero_means_four():
    assert bzimage.parse(images.bzimage(setup_sects=0) + bytes(4096)).kernel_offset == 5 * 512


@pytest.mark.parametrize("kwargs, message", [
    (dict(version=0x020B), "boot protocol 2.11 is too old"),
    (dict(xloadflags=0), "not a 64-bit kernel"),
    (dict(loadflags=0), "zImage"),
    (dict(alignment=0x3000), "kernel_alignment 0x3000"),
    (dict(alignment=0), "kernel_alignment 0x0"),
    (dict(init_size=0), "init_size is 0"),
    (dict(boot_flag=0x1234), "boot_flag 0x1234"),
])
def test_header_errors(kwargs, message):
    with pytest.raises(BootError, match=message):
        bzimage.parse(images.bzimage(**kwargs), "k")


def test_neither_format():
    with pytest.raises(BootError, match="neither a bzImage .* nor an ELF vmlinux"):
        bzimage.parse(b"just some text" * 100, "k")


def test_setup_sectors_past_the_end():
    data = images.bzimage(setup_sects=2)
    with pytest.raises(BootError, match="setup sectors"):
        bzimage.parse(data[:0x1F1] + bytes([200]) + data[0x1F2:0x600], "k")


def test_non_relocatable_kernel_loads_at_pref_address():
    img = bzimage.parse(images.bzimage(relocatable=0, pref_address=0x20_0000, alignment=0x3000))
    assert bzimage.load_address(img.header) == 0x20_0000


def test_relocatable_kernel_is_aligned():
    img = bzimage.parse(images.bzimage(pref_address=0x110_0000, alignment=0x40_0000))
    assert bzimage.load_address(img.header) == 0x140_0000


def test_load_writes_the_zero_page(memory):
    data = images.bzimage(code=b"\x90\xf4")
    img = bzimage.parse(data, "k")
    initrd = bytes(range(256)) * 100
    boot = bzimage.load(memory, img, "console=ttyS0 quiet", initrd, rsdp=0xE0000)
    zp = zero_page(memory)
    # The header is the image's, up to 0x202 + data[0x201], plus the loader's fields.
    assert zp.hdr.header == bp.HDRS_MAGIC and zp.hdr.version == 0x020F and zp.hdr.boot_flag == bp.BOOT_FLAG
    assert zp.hdr.init_size == 0x40_0000 and zp.hdr.kernel_alignment == 0x20_0000
    assert zp.hdr.type_of_loader == bp.LOADER_TYPE_UNDEFINED
    assert zp.hdr.vid_mode == bp.VID_MODE_NORMAL
    assert zp.hdr.loadflags & bp.LOADED_HIGH and zp.hdr.loadflags & bp.CAN_USE_HEAP
    assert not zp.hdr.loadflags & (bp.QUIET_FLAG | bp.KEEP_SEGMENTS)
    assert zp.hdr.code32_start == boot.load_address == 0x100_0000
    assert zp.hdr.cmd_line_ptr == layout.LINUX_CMDLINE and zp.ext_cmd_line_ptr == 0
    assert memory.read(layout.LINUX_CMDLINE, 20) == b"console=ttyS0 quiet\0"
    assert zp.acpi_rsdp_addr == 0xE0000
    # The initrd: page-aligned, as high as RAM allows, below initrd_addr_max, intact.
    at, size = zp.hdr.ramdisk_image, zp.hdr.ramdisk_size
    assert (at, size) == boot.initrd and size == len(initrd)
    assert at % layout.PAGE_SIZE == 0 and at + size <= memory.size and memory.size - (at + size) < layout.PAGE_SIZE
    assert at >= boot.load_address + 0x40_0000
    assert memory.read(at, size) == initrd
    # e820: the memory map of the PVH loader, in the zero page.
    table = [(zp.e820_table[i].addr, zp.e820_table[i].size, zp.e820_table[i].type) for i in range(zp.e820_entries)]
    assert table == memory_map(memory)
    assert table[0] == (0, layout.EBDA_START, bp.E820_RAM)
    assert (layout.HIMEM_START, memory.size - layout.HIMEM_START, bp.E820_RAM) in table
    # The protected-mode kernel at the load address; the entry at +0x200.
    assert memory.read(boot.load_address, len(data) - img.kernel_offset) == data[img.kernel_offset:]
    assert boot.entry == boot.load_address + 0x200 and memory.read(boot.entry, 2) == b"\x90\xf4"
    assert boot.zero_page == layout.LINUX_ZERO_PAGE


def test_initrd_stays_below_initrd_addr_max(memory):
    img = bzimage.parse(images.bzimage(initrd_addr_max=0x200_0000 - 1, init_size=0x80_0000))
    boot = bzimage.load(memory, img, "", b"x" * 5000)
    at, size = boot.initrd
    assert at + size <= 0x200_0000 and at >= 0x180_0000


def test_page_tables_identity_map_4_gib(memory):
    bzimage.load(memory, bzimage.parse(images.bzimage()), "")
    for addr in (0, 0x1234_5678, 0xFEE0_0000, 0xFFFF_F000, layout.LINUX_ZERO_PAGE):
        assert x86.translate(memory.read_u64, x86.CR0_PE | x86.CR0_PG, layout.LINUX_PML4, x86.CR4_PAE,
                             x86.EFER_LME | x86.EFER_LMA, addr) == addr
    with pytest.raises(x86.TranslationError):
        x86.translate(memory.read_u64, x86.CR0_PG, layout.LINUX_PML4, x86.CR4_PAE, x86.EFER_LMA, 4 << 30)


def test_gdt_has_the_boot_selectors(memory):
    bzimage.load(memory, bzimage.parse(images.bzimage()), "")
    cs, ds = struct.unpack("<QQ", memory.read(layout.BOOT_GDT + bzimage.BOOT_CS, 16))
    assert (cs >> 53) & 1 == 1 and (cs >> 43) & 1 == 1      # L (64-bit), code
    assert (ds >> 43) & 1 == 0 and (ds >> 41) & 1 == 1      # data, writable
    assert (cs >> 47) & 1 and (ds >> 47) & 1                # present


def test_command_line_longer_than_cmdline_size(memory):
    img = bzimage.parse(images.bzimage(cmdline_size=10))
    bzimage.load(memory, img, "x" * 10)
    with pytest.raises(BootError, match="at most 10 .cmdline_size"):
        bzimage.load(memory, img, "x" * 11)


def test_command_line_with_nul(memory):
    with pytest.raises(BootError, match="no NUL"):
        bzimage.load(memory, bzimage.parse(images.bzimage()), "a\0b")


def test_initrd_that_does_not_fit(memory):
    img = bzimage.parse(images.bzimage())
    with pytest.raises(BootError, match="initrd: .* do not fit"):
        bzimage.load(memory, img, "", bytes(60 * layout.MiB))


def test_initrd_below_a_low_initrd_addr_max(memory):
    img = bzimage.parse(images.bzimage(initrd_addr_max=0x120_0000 - 1))
    with pytest.raises(BootError, match="initrd"):
        bzimage.load(memory, img, "", bytes(4096))


def test_kernel_larger_than_memory(memory):
    img = bzimage.parse(images.bzimage(init_size=80 * layout.MiB))
    with pytest.raises(BootError, match="init_size.*give more --memory"):
        bzimage.load(memory, img, "")


def test_structure_sizes():
    import ctypes
    assert ctypes.sizeof(bp.BootParams) == 4096
    assert ctypes.sizeof(bp.SetupHeader) == 0x26C - 0x1F1
    assert bp.BootParams.e820_table.offset == 0x2D0 and bp.BootParams.hdr.offset == 0x1F1
