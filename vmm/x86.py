"""x86 architectural bits the VMM needs: control-register and EFLAGS
flags, GDT descriptors, and a 4-level page-table walk.

Names follow the Intel SDM (Vol. 3A §2.5 control registers, §3.4.5
segment descriptors, §4.5 4-level paging).
"""

from __future__ import annotations

from typing import Callable

CR0_PE = 1 << 0
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_RESERVED = 1 << 1
RFLAGS_IF = 1 << 9

PTE_P = 1 << 0
PTE_PS = 1 << 7
_ADDR_MASK = ((1 << 52) - 1) & ~0xFFF

# Segment descriptor types (SDM Vol. 3A §3.4.5.1, table 3-1).
SEG_TYPE_CODE_XRA = 0xB   # execute/read, accessed
SEG_TYPE_DATA_RWA = 0x3   # read/write, accessed
SEG_TYPE_TSS32_BUSY = 0xB


def gdt_entry(base: int, limit: int, access: int, flags: int) -> int:
    """A legacy 8-byte segment descriptor.

    ``access`` is byte 5 (P, DPL, S, type); ``flags`` the high nibble of
    byte 6 (G, D/B, L, AVL)."""
    return ((limit & 0xFFFF) | (base & 0xFFFFFF) << 16 | (access & 0xFF) << 40
            | ((limit >> 16) & 0xF) << 48 | (flags & 0xF) << 52 | ((base >> 24) & 0xFF) << 56)


def describe_segment(seg, entry: int, selector: int) -> None:
    """Fill a ``struct kvm_segment`` from descriptor ``entry``."""
    access = (entry >> 40) & 0xFF
    flags = (entry >> 52) & 0xF
    limit = (entry & 0xFFFF) | ((entry >> 48) & 0xF) << 16
    seg.base = (entry >> 16) & 0xFFFFFF | ((entry >> 56) & 0xFF) << 24
    seg.limit = (limit << 12 | 0xFFF) if flags & 0x8 else limit
    seg.selector = selector
    seg.type = access & 0xF
    seg.s = (access >> 4) & 1
    seg.dpl = (access >> 5) & 3
    seg.present = (access >> 7) & 1
    seg.avl = flags & 1
    seg.l = (flags >> 1) & 1
    seg.db = (flags >> 2) & 1
    seg.g = (flags >> 3) & 1
    seg.unusable = 0


class TranslationError(Exception):
    """A linear address has no present mapping."""


def translate(read_u64: Callable[[int], int], cr0: int, cr3: int, cr4: int, efer: int,
              linear: int) -> int:
    """Guest-physical address of ``linear`` under the given paging state.

    Paging off: linear == physical.  Long mode (4-level, 4 KiB / 2 MiB /
    1 GiB pages) is walked; 32-bit and PAE paging are not (they raise)."""
    if not cr0 & CR0_PG:
        return linear & 0xFFFF_FFFF
    if not (efer & EFER_LMA and cr4 & CR4_PAE):
        raise TranslationError("only 4-level (long mode) paging is walked")
    table = cr3 & _ADDR_MASK
    for level, shift in ((4, 39), (3, 30), (2, 21), (1, 12)):
        entry = read_u64(table + ((linear >> shift) & 0x1FF) * 8)
        if not entry & PTE_P:
            raise TranslationError(f"{linear:#x}: level-{level} entry not present")
        if level in (3, 2) and entry & PTE_PS:
            page_mask = (1 << shift) - 1
            return (entry & _ADDR_MASK & ~page_mask) | (linear & page_mask)
        table = entry & _ADDR_MASK
    return table | (linear & 0xFFF)
