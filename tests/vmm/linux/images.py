"""Small kernel images made by the tests: a bzImage with a chosen setup
header and payload, and a PVH ELF, built byte by byte (no toolchain)."""

from __future__ import annotations

import ctypes
import lzma
import struct
import zlib

from vmm.boot import bootparams as bp

#: Jump at 0x200 whose offset byte (0x201) puts the header's end at 0x26c.
HEADER_JUMP = 0xEB | (0x26C - 0x202) << 8


def bzimage(*, version=0x020F, loadflags=bp.LOADED_HIGH, xloadflags=bp.XLF_KERNEL_64, relocatable=1,
            alignment=0x20_0000, init_size=0x40_0000, cmdline_size=2047, initrd_addr_max=0x7FFF_FFFF,
            setup_sects=2, pref_address=0x100_0000, payload=b"", code=b"\xf4", boot_flag=bp.BOOT_FLAG) -> bytes:
    """A bzImage: setup sectors with the header, then a protected-mode
    kernel with ``code`` at its 64-bit entry (+0x200) and ``payload`` at
    +0x400 (payload_offset/length)."""
    h = bp.SetupHeader()
    h.setup_sects = setup_sects
    h.boot_flag = boot_flag
    h.jump = HEADER_JUMP
    h.header = bp.HDRS_MAGIC
    h.version = version
    h.loadflags = loadflags
    h.xloadflags = xloadflags
    h.relocatable_kernel = relocatable
    h.kernel_alignment = alignment
    h.init_size = init_size
    h.cmdline_size = cmdline_size
    h.initrd_addr_max = initrd_addr_max
    h.pref_address = pref_address
    h.code32_start = 0x10_0000
    h.payload_offset = 0x400 if payload else 0
    h.payload_length = len(payload)
    setup = bytearray((setup_sects + 1) * 512)
    setup[bp.SETUP_HEADER_OFFSET:bp.SETUP_HEADER_OFFSET + ctypes.sizeof(h)] = bytes(h)
    kernel = bytearray(0x400)
    kernel[0x200:0x200 + len(code)] = code
    return bytes(setup) + bytes(kernel) + payload


def lz4_legacy(data: bytes, block: int = 8 << 20) -> bytes:
    """The kernel's LZ4 legacy frame, with the size word it appends."""
    import lz4.block
    out = [b"\x02\x21\x4c\x18"]
    for i in range(0, len(data), block):
        c = lz4.block.compress(data[i:i + block], store_size=False)
        out.append(struct.pack("<I", len(c)) + c)
    return b"".join(out) + struct.pack("<I", len(data))


def gzip_payload(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


def xz_payload(data: bytes) -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32) + struct.pack("<I", len(data))


def pvh_elf(entry: int = 0x100_0000, code: bytes = b"\xf4", paddr: int = 0x100_0000, memsz: int = 0x2000) -> bytes:
    """An ELF64 with one PT_LOAD at ``paddr`` and a Xen PHYS32_ENTRY note."""
    note = struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", entry)
    ehdr_size, phdr_size = 64, 56
    note_off = ehdr_size + 2 * phdr_size
    code_off = (note_off + len(note) + 15) & ~15
    ehdr = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9) + struct.pack(
        "<HHIQQQIHHHHHH", 2, 62, 1, entry, ehdr_size, 0, 0, ehdr_size, phdr_size, 2, 64, 0, 0)
    load = struct.pack("<IIQQQQQQ", 1, 7, code_off, paddr, paddr, len(code), memsz, 0x1000)
    pnote = struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(note), len(note), 4)
    out = bytearray(ehdr + load + pnote + note)
    out += bytes(code_off - len(out))
    return bytes(out + code)
