"""A small, strict ELF reader: program headers and notes, nothing else.

Everything read from the file is input: offsets and sizes are checked
against the file before use (System V gABI, "ELF Header", "Program
Header", "Note Section").  ELF32 and ELF64, little-endian, x86 only.
"""

from __future__ import annotations

import struct

from devices.record import record
from vmm.boot import BootError

ELF_MAGIC = b"\x7fELF"
ELFCLASS32 = 1
ELFCLASS64 = 2
ELFDATA2LSB = 1
EM_386 = 3
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
MAX_PHDRS = 256
MAX_NOTES = 1024

# e_type .. e_shstrndx after e_ident, per class.
_EHDR = {ELFCLASS32: struct.Struct("<HHIIIIIHHHHHH"), ELFCLASS64: struct.Struct("<HHIQQQIHHHHHH")}
# (p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_flags, p_align)
_PHDR32 = struct.Struct("<IIIIIIII")
_PHDR64 = struct.Struct("<IIQQQQQQ")
_NHDR = struct.Struct("<III")


@record
class Segment:
    """One program header (ELF ``Elf32_Phdr``/``Elf64_Phdr``), its fields by their ``p_`` names."""

    type: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    flags: int


@record
class Note:
    """One note of a ``PT_NOTE`` segment: its owner name, type and descriptor."""

    name: bytes
    type: int
    desc: bytes


class ElfFile:
    """An ELF image held in memory, with its program headers parsed."""

    def __init__(self, data: bytes, name: str = "image"):
        self.data = data
        self.name = name
        if len(data) < 16 or data[:4] != ELF_MAGIC:
            raise BootError(f"{name}: not an ELF file")
        cls, endian = data[4], data[5]
        if cls not in _EHDR:
            raise BootError(f"{name}: unknown ELF class {cls}")
        if endian != ELFDATA2LSB:
            raise BootError(f"{name}: not a little-endian ELF file")
        self.elf_class = cls
        ehdr = _EHDR[cls]
        if len(data) < 16 + ehdr.size:
            raise BootError(f"{name}: truncated ELF header")
        (_type, machine, _version, self.entry, phoff, _shoff, _flags, _ehsize,
         phentsize, phnum, _shentsize, _shnum, _shstrndx) = ehdr.unpack_from(data, 16)
        if machine not in (EM_386, EM_X86_64):
            raise BootError(f"{name}: ELF machine {machine} is not x86")
        phdr = _PHDR64 if cls == ELFCLASS64 else _PHDR32
        if phnum == 0:
            raise BootError(f"{name}: no program headers")
        if phnum > MAX_PHDRS or phentsize < phdr.size:
            raise BootError(f"{name}: bad program header table ({phnum} x {phentsize} bytes)")
        if phoff + phnum * phentsize > len(data):
            raise BootError(f"{name}: program header table runs past the end of the file")
        self.segments: list[Segment] = []
        for i in range(phnum):
            fields = phdr.unpack_from(data, phoff + i * phentsize)
            if cls == ELFCLASS64:
                ptype, flags, off, vaddr, paddr, filesz, memsz, _align = fields
            else:
                ptype, off, vaddr, paddr, filesz, memsz, flags, _align = fields
            seg = Segment(ptype, off, vaddr, paddr, filesz, memsz, flags)
            if ptype in (PT_LOAD, PT_NOTE):
                if off + filesz > len(data):
                    raise BootError(f"{name}: segment {i} runs past the end of the file")
                if ptype == PT_LOAD and filesz > memsz:
                    raise BootError(f"{name}: segment {i} has more file bytes than memory bytes")
            self.segments.append(seg)

    @property
    def loads(self) -> list[Segment]:
        return [s for s in self.segments if s.type == PT_LOAD and s.memsz]

    def notes(self) -> list[Note]:
        """Every note of every PT_NOTE segment."""
        out: list[Note] = []
        for seg in self.segments:
            if seg.type != PT_NOTE:
                continue
            pos, end = seg.offset, seg.offset + seg.filesz
            while pos + _NHDR.size <= end and len(out) < MAX_NOTES:
                namesz, descsz, ntype = _NHDR.unpack_from(self.data, pos)
                pos += _NHDR.size
                name_end = pos + namesz
                desc_start = pos + _align4(namesz)
                desc_end = desc_start + descsz
                if desc_end > end:
                    raise BootError(f"{self.name}: note runs past the end of its segment")
                name = bytes(self.data[pos:name_end]).rstrip(b"\0")
                out.append(Note(name, ntype, bytes(self.data[desc_start:desc_end])))
                pos = desc_start + _align4(descsz)
        return out


def _align4(n: int) -> int:
    return (n + 3) & ~3
