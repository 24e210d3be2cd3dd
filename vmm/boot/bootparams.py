"""The x86 Linux boot protocol's structures: ``struct setup_header``,
``struct boot_e820_entry`` and ``struct boot_params`` (the "zero page").

Mirrors ``arch/x86/include/uapi/asm/bootparam.h`` and
``arch/x86/include/uapi/asm/e820.h`` of Linux 6.1, whose comments give the
offsets asserted below (Documentation/arch/x86/zero-page.rst and boot.rst,
"THE REAL-MODE KERNEL HEADER").  Packed little-endian ctypes structures:
every offset is checked at import, so a typo cannot shift a field.
"""

from __future__ import annotations

import ctypes

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64

#: ``setup_header.header``: "HdrS".
HDRS_MAGIC = 0x53726448
#: ``setup_header.boot_flag``.
BOOT_FLAG = 0xAA55
#: Where the setup header starts in the image file and in the zero page.
SETUP_HEADER_OFFSET = 0x1F1
#: ``setup_sects`` of 0 means 4 (boot.rst).
DEFAULT_SETUP_SECTS = 4

# loadflags (boot.rst, "Details of header fields").
LOADED_HIGH = 1 << 0
KASLR_FLAG = 1 << 1
QUIET_FLAG = 1 << 5
KEEP_SEGMENTS = 1 << 6
CAN_USE_HEAP = 1 << 7

# xloadflags.
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1
XLF_EFI_HANDOVER_32 = 1 << 2
XLF_EFI_HANDOVER_64 = 1 << 3
XLF_EFI_KEXEC = 1 << 4

#: ``type_of_loader``: 0xFF, "undefined", as kvmtool and Firecracker say.
LOADER_TYPE_UNDEFINED = 0xFF
#: ``vid_mode``: "normal" (VGA 80x25, i.e. leave the screen alone).
VID_MODE_NORMAL = 0xFFFF

# e820 types (arch/x86/include/asm/e820/types.h).
E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3
#: ``E820_MAX_ENTRIES_ZEROPAGE``.
E820_MAX_ENTRIES_ZEROPAGE = 128


class SetupHeader(ctypes.LittleEndianStructure):
    """``struct setup_header`` (at 0x1f1 of the image and of the zero page)."""

    _pack_ = 1
    _fields_ = [
        ("setup_sects", u8), ("root_flags", u16), ("syssize", u32), ("ram_size", u16),
        ("vid_mode", u16), ("root_dev", u16), ("boot_flag", u16), ("jump", u16), ("header", u32),
        ("version", u16), ("realmode_swtch", u32), ("start_sys_seg", u16), ("kernel_version", u16),
        ("type_of_loader", u8), ("loadflags", u8), ("setup_move_size", u16), ("code32_start", u32),
        ("ramdisk_image", u32), ("ramdisk_size", u32), ("bootsect_kludge", u32), ("heap_end_ptr", u16),
        ("ext_loader_ver", u8), ("ext_loader_type", u8), ("cmd_line_ptr", u32), ("initrd_addr_max", u32),
        ("kernel_alignment", u32), ("relocatable_kernel", u8), ("min_alignment", u8), ("xloadflags", u16),
        ("cmdline_size", u32), ("hardware_subarch", u32), ("hardware_subarch_data", u64),
        ("payload_offset", u32), ("payload_length", u32), ("setup_data", u64), ("pref_address", u64),
        ("init_size", u32), ("handover_offset", u32), ("kernel_info_offset", u32),
    ]


class BootE820Entry(ctypes.LittleEndianStructure):
    """``struct boot_e820_entry``."""

    _pack_ = 1
    _fields_ = [("addr", u64), ("size", u64), ("type", u32)]


class BootParams(ctypes.LittleEndianStructure):
    """``struct boot_params``, the zero page (4096 bytes)."""

    _pack_ = 1
    _fields_ = [
        ("screen_info", u8 * 0x40), ("apm_bios_info", u8 * 0x14), ("_pad2", u8 * 4), ("tboot_addr", u64),
        ("ist_info", u8 * 0x10), ("acpi_rsdp_addr", u64), ("_pad3", u8 * 8), ("hd0_info", u8 * 16),
        ("hd1_info", u8 * 16), ("sys_desc_table", u8 * 0x10), ("olpc_ofw_header", u8 * 0x10),
        ("ext_ramdisk_image", u32), ("ext_ramdisk_size", u32), ("ext_cmd_line_ptr", u32),
        ("_pad4", u8 * 112), ("cc_blob_address", u32), ("edid_info", u8 * 0x80), ("efi_info", u8 * 0x20),
        ("alt_mem_k", u32), ("scratch", u32), ("e820_entries", u8), ("eddbuf_entries", u8),
        ("edd_mbr_sig_buf_entries", u8), ("kbd_status", u8), ("secure_boot", u8), ("_pad5", u8 * 2),
        ("sentinel", u8), ("_pad6", u8 * 1), ("hdr", SetupHeader),
        ("_pad7", u8 * (0x290 - SETUP_HEADER_OFFSET - 0x7B)), ("edd_mbr_sig_buffer", u32 * 16),
        ("e820_table", BootE820Entry * E820_MAX_ENTRIES_ZEROPAGE), ("_pad8", u8 * 48),
        ("eddbuf", u8 * (6 * 82)), ("_pad9", u8 * 276),
    ]


def _check(cls: type[ctypes.Structure], size: int, offsets: dict[str, int]) -> None:
    assert ctypes.sizeof(cls) == size, (cls.__name__, ctypes.sizeof(cls))
    for name, off in offsets.items():
        assert getattr(cls, name).offset == off, (cls.__name__, name, getattr(cls, name).offset, off)


# Offsets in the header are those of boot.rst minus 0x1f1.
_check(SetupHeader, 0x7B, {name: off - SETUP_HEADER_OFFSET for name, off in {
    "setup_sects": 0x1F1, "root_flags": 0x1F2, "syssize": 0x1F4, "ram_size": 0x1F8, "vid_mode": 0x1FA,
    "root_dev": 0x1FC, "boot_flag": 0x1FE, "jump": 0x200, "header": 0x202, "version": 0x206,
    "realmode_swtch": 0x208, "start_sys_seg": 0x20C, "kernel_version": 0x20E, "type_of_loader": 0x210,
    "loadflags": 0x211, "setup_move_size": 0x212, "code32_start": 0x214, "ramdisk_image": 0x218,
    "ramdisk_size": 0x21C, "bootsect_kludge": 0x220, "heap_end_ptr": 0x224, "ext_loader_ver": 0x226,
    "ext_loader_type": 0x227, "cmd_line_ptr": 0x228, "initrd_addr_max": 0x22C, "kernel_alignment": 0x230,
    "relocatable_kernel": 0x234, "min_alignment": 0x235, "xloadflags": 0x236, "cmdline_size": 0x238,
    "hardware_subarch": 0x23C, "hardware_subarch_data": 0x240, "payload_offset": 0x248,
    "payload_length": 0x24C, "setup_data": 0x250, "pref_address": 0x258, "init_size": 0x260,
    "handover_offset": 0x264, "kernel_info_offset": 0x268}.items()})
_check(BootE820Entry, 20, {"addr": 0, "size": 8, "type": 16})
_check(BootParams, 4096, {
    "screen_info": 0x000, "apm_bios_info": 0x040, "tboot_addr": 0x058, "ist_info": 0x060,
    "acpi_rsdp_addr": 0x070, "hd0_info": 0x080, "hd1_info": 0x090, "sys_desc_table": 0x0A0,
    "olpc_ofw_header": 0x0B0, "ext_ramdisk_image": 0x0C0, "ext_ramdisk_size": 0x0C4,
    "ext_cmd_line_ptr": 0x0C8, "cc_blob_address": 0x13C, "edid_info": 0x140, "efi_info": 0x1C0,
    "alt_mem_k": 0x1E0, "scratch": 0x1E4, "e820_entries": 0x1E8, "eddbuf_entries": 0x1E9,
    "edd_mbr_sig_buf_entries": 0x1EA, "kbd_status": 0x1EB, "secure_boot": 0x1EC, "sentinel": 0x1EF,
    "hdr": SETUP_HEADER_OFFSET, "edd_mbr_sig_buffer": 0x290, "e820_table": 0x2D0, "eddbuf": 0xD00})
