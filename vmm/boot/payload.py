"""The compressed payload of a bzImage, decompressed on the host.

A bzImage's protected-mode part is the kernel's own decompressor followed
by the compressed vmlinux (setup header ``payload_offset`` and
``payload_length``, boot protocol 2.08+; the payload's last four bytes are
the decompressed size, little-endian: gzip's own ISIZE, or the word
``scripts/Makefile.lib`` appends for the others).  Which compressor was used shows in the payload's magic.  Formats
Python reads: gzip and xz from the standard library, LZ4 through the
``lz4`` package (the kernel's LZ4 is the *legacy* frame: magic 02 21 4c 18,
then blocks of a 32-bit little-endian compressed size and LZ4 block data
that decompress to at most 8 MiB each; ``lib/decompress_unlz4.c``).
Others (bzip2, lzma, lzo, zstd) are named in the error.
"""

from __future__ import annotations

import lzma
import struct
import zlib

from vmm.boot import BootError

LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
LZ4_LEGACY_BLOCK = 8 << 20
#: Largest decompressed kernel accepted (a sanity bound, not a real limit).
MAX_VMLINUX = 1 << 30

_MAGICS = (
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (LZ4_LEGACY_MAGIC, "lz4"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"BZh", "bzip2"),
    (b"\x5d\x00\x00", "lzma"),
    (b"\x89LZO", "lzo"),
)


def compression(payload: bytes) -> str:
    """The compressor's name from the payload's magic, or 'unknown'."""
    for magic, name in _MAGICS:
        if payload.startswith(magic):
            return name
    return "unknown"


def decompress(payload: bytes, name: str = "kernel") -> bytes:
    """The vmlinux inside a bzImage payload, or BootError."""
    kind = compression(payload)
    if len(payload) < 8:
        raise BootError(f"{name}: payload of {len(payload)} bytes is too short")
    expected = struct.unpack_from("<I", payload, len(payload) - 4)[0]
    try:
        if kind == "gzip":
            out = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
        elif kind == "xz":
            out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
        elif kind == "lz4":
            out = _lz4_legacy(payload[:-4], name)
        else:
            raise BootError(f"{name}: the payload is {kind}-compressed; the host decompresses only gzip, "
                            "xz and lz4 (boot it through the 64-bit protocol instead: --kernel-boot bzimage)")
    except (zlib.error, lzma.LZMAError, EOFError) as e:
        raise BootError(f"{name}: {kind} payload does not decompress: {e}") from None
    if len(out) != expected:
        raise BootError(f"{name}: {kind} payload decompressed to {len(out)} bytes, "
                        f"its trailer says {expected}")
    return out


def _lz4_legacy(data: bytes, name: str) -> bytes:
    try:
        import lz4.block
    except ImportError:
        raise BootError(f"{name}: the payload is LZ4; decompressing it needs the 'lz4' Python package") from None
    out: list[bytes] = []
    total = 0
    pos = len(LZ4_LEGACY_MAGIC)
    while pos + 4 <= len(data):
        size = struct.unpack_from("<I", data, pos)[0]
        pos += 4
        if data[pos - 4:pos] == LZ4_LEGACY_MAGIC:   # concatenated streams
            continue
        if size == 0 or pos + size > len(data):
            raise BootError(f"{name}: LZ4 block of {size} bytes at {pos - 4:#x} runs past the payload")
        try:
            block = lz4.block.decompress(data[pos:pos + size], uncompressed_size=LZ4_LEGACY_BLOCK)
        except lz4.block.LZ4BlockError as e:
            raise BootError(f"{name}: bad LZ4 block at {pos - 4:#x}: {e}") from None
        total += len(block)
        if total > MAX_VMLINUX:
            raise BootError(f"{name}: LZ4 payload decompresses to more than {MAX_VMLINUX >> 20} MiB")
        out.append(block)
        pos += size
    if pos != len(data):
        raise BootError(f"{name}: {len(data) - pos} stray bytes at the end of the LZ4 payload")
    return b"".join(out)
