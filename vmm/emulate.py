"""Instruction-emulation fallback: the few instructions KVM's emulator
fails on where ring 0 is emulated (PVM here; DESIGN.md "This machine's
KVM"), done by the VMM on ``KVM_EXIT_INTERNAL_ERROR`` / emulation failure.

The bytes at rip come from the exit (``KVM_INTERNAL_ERROR_EMULATION_FLAG_
INSTRUCTION_BYTES``) or are read through the guest's page tables
(:func:`vmm.x86.translate`, page by page).  Emulated (Intel SDM Vol. 2):

* ``int3`` (CC): rip += 1, then ``#BP`` (vector 3) injected with
  KVM_SET_VCPU_EVENTS, so the handler sees the address after the int3, as
  the CPU would push it;
* ``clac`` (0F 01 CA) / ``stac`` (0F 01 CB): clear / set RFLAGS.AC;
* ``popcnt`` / ``tzcnt`` / ``lzcnt`` (F3 [REX] 0F B8 / BC / BD), register
  operands only: the count and the flags the SDM defines (popcnt: ZF =
  source zero, CF OF SF AF PF cleared; tzcnt/lzcnt: CF = source zero,
  ZF = result zero);
* ``fwait`` (9B): a no-op (no x87 exception is ever pending here);
* ``ldmxcsr m32`` / ``stmxcsr m32`` (0F AE /2, /3; 64-bit mode, any
  ModRM/SIB/displacement/RIP-relative form, FS/GS overrides): MXCSR is
  read or written in the vCPU's XSAVE area (KVM_GET/SET_XSAVE), the
  operand through the guest's page tables; reserved MXCSR bits set by
  ldmxcsr raise ``#GP(0)``, as the CPU does (SDM Vol. 2A "LDMXCSR").

Anything else is left to the caller to report; :func:`name` names the
usual suspects (``cmpxchg16b``, ``xrstor``...) for that report.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading

from vmm import x86
from vmm.memory import GuestMemory, GuestMemoryError

log = logging.getLogger(__name__)

MAX_INSN = 15
BP_VECTOR = 3
RFLAGS_CF = 1 << 0
RFLAGS_PF = 1 << 2
RFLAGS_AF = 1 << 4
RFLAGS_ZF = 1 << 6
RFLAGS_SF = 1 << 7
RFLAGS_OF = 1 << 11
RFLAGS_AC = 1 << 18
_ARITH = RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF

#: kvm_regs fields by register number (ModRM reg/rm + REX.R/B).
GPRS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
_LEGACY_PREFIXES = frozenset((0x66, 0x67, 0xF2, 0xF3, 0xF0, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65))

#: Emulated so far, by name (all vCPUs), for the log and the tests.
counts: collections.Counter[str] = collections.Counter()
_counts_lock = threading.Lock()


@dataclasses.dataclass(frozen=True)
class Memory:
    """A ModRM memory operand: base + index * scale + disp (register
    numbers or None), RIP-relative, and a segment override (fs/gs)."""

    base: int | None
    index: int | None
    scale: int
    disp: int
    rip_relative: bool = False
    segment: str | None = None


@dataclasses.dataclass(frozen=True)
class Decoded:
    """One instruction: its name, length and, for the bit counts, the
    operands (register numbers) and operand size in bits; for
    ldmxcsr/stmxcsr the memory operand."""

    name: str
    length: int
    dest: int = 0
    src: int = 0
    size: int = 0
    mem: Memory | None = None


def decode_modrm_memory(code: bytes, rex: int) -> tuple[Memory, int] | None:
    """The memory operand of the ModRM byte at ``code[0]`` (64-bit
    addressing, SDM Vol. 2A §2.1.5 and §2.2.1.6) and the bytes it takes
    (ModRM, SIB, displacement); None for a register operand or too few bytes."""
    if not code:
        return None
    modrm = code[0]
    mod, rm = modrm >> 6, modrm & 7
    if mod == 3:
        return None
    pos = 1
    base: int | None = rm | (8 if rex & 1 else 0)
    index: int | None = None
    scale = 1
    rip_relative = False
    if rm == 4:
        if len(code) < 2:
            return None
        sib = code[1]
        pos = 2
        scale = 1 << (sib >> 6)
        idx = ((sib >> 3) & 7) | (8 if rex & 2 else 0)
        index = None if idx == 4 else idx
        base = (sib & 7) | (8 if rex & 1 else 0)
        if sib & 7 == 5 and mod == 0:
            base = None
    elif rm == 5 and mod == 0:
        base, rip_relative = None, True
    disp_size = 1 if mod == 1 else 4 if (mod == 2 or base is None) else 0
    if len(code) < pos + disp_size:
        return None
    disp = int.from_bytes(code[pos:pos + disp_size], "little", signed=True) if disp_size else 0
    return Memory(base, index, scale, disp, rip_relative), pos + disp_size


def decode(code: bytes, long_mode: bool = True, default_size: int = 32) -> Decoded | None:
    """Decode one of the emulated instructions at the start of ``code``;
    None for anything else (including memory forms of the bit counts)."""
    pos = 0
    prefixes: set[int] = set()
    while pos < len(code) and code[pos] in _LEGACY_PREFIXES and pos < MAX_INSN:
        prefixes.add(code[pos])
        pos += 1
    rex = 0
    if long_mode and pos < len(code) and 0x40 <= code[pos] <= 0x4F:
        rex = code[pos]
        pos += 1
    rest = code[pos:]
    if not rest:
        return None
    if rest[0] == 0xCC and not rex:
        return Decoded("int3", pos + 1)
    if rest[0] == 0x9B and not rex:
        return Decoded("fwait", pos + 1)
    if long_mode and len(rest) >= 3 and rest[:2] == b"\x0f\xae" and (rest[2] >> 3) & 7 in (2, 3) \
            and not prefixes & {0x66, 0xF2, 0xF3, 0x67}:
        operand = decode_modrm_memory(rest[2:], rex)
        if operand is None:
            return None
        mem, used = operand
        segment = "fs" if 0x64 in prefixes else "gs" if 0x65 in prefixes else None
        mem = dataclasses.replace(mem, segment=segment)
        return Decoded("ldmxcsr" if (rest[2] >> 3) & 7 == 2 else "stmxcsr", pos + 2 + used, mem=mem)
    if rest[:3] == b"\x0f\x01\xca":
        return Decoded("clac", pos + 3)
    if rest[:3] == b"\x0f\x01\xcb":
        return Decoded("stac", pos + 3)
    if len(rest) >= 3 and rest[0] == 0x0F and rest[1] in (0xB8, 0xBC, 0xBD) and 0xF3 in prefixes:
        modrm = rest[2]
        if modrm >> 6 != 3:
            return None                     # memory operand: not emulated
        name = {0xB8: "popcnt", 0xBC: "tzcnt", 0xBD: "lzcnt"}[rest[1]]
        size = 64 if rex & 8 else (16 if 0x66 in prefixes else default_size)
        dest = ((modrm >> 3) & 7) | (8 if rex & 4 else 0)
        src = (modrm & 7) | (8 if rex & 1 else 0)
        return Decoded(name, pos + 3, dest=dest, src=src, size=size)
    return None


def bit_count(name: str, value: int, size: int) -> tuple[int, int]:
    """(result, flags to set among CF/ZF) of popcnt/tzcnt/lzcnt on ``value``."""
    value &= (1 << size) - 1
    if name == "popcnt":
        return bin(value).count("1"), RFLAGS_ZF if value == 0 else 0
    if name == "tzcnt":
        result = size if value == 0 else (value & -value).bit_length() - 1
    else:
        result = size - value.bit_length()
    return result, (RFLAGS_CF if value == 0 else 0) | (RFLAGS_ZF if result == 0 else 0)


def write_gpr(regs, number: int, value: int, size: int) -> None:
    """A register write of ``size`` bits: 32-bit writes zero-extend, 16-bit
    ones keep the upper bits (SDM Vol. 1 §3.4.1.1)."""
    field = GPRS[number]
    if size == 16:
        value = (getattr(regs, field) & ~0xFFFF) | (value & 0xFFFF)
    setattr(regs, field, value & 0xFFFF_FFFF_FFFF_FFFF)


def effective_address(mem: Memory, regs, sregs, next_rip: int) -> int:
    addr = mem.disp
    if mem.rip_relative:
        addr += next_rip
    if mem.base is not None:
        addr += getattr(regs, GPRS[mem.base])
    if mem.index is not None:
        addr += getattr(regs, GPRS[mem.index]) * mem.scale
    if mem.segment is not None:
        addr += getattr(sregs, mem.segment).base
    return addr & 0xFFFF_FFFF_FFFF_FFFF


class OperandFault(Exception):
    """The memory operand is not mapped (the guest would take a #PF)."""


def _phys(memory: GuestMemory, sregs, linear: int, length: int) -> list[tuple[int, int]]:
    """(physical, length) pieces of [linear, linear + length), per page."""
    out = []
    done = 0
    while done < length:
        addr = linear + done
        try:
            phys = x86.translate(memory.read_u64, sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer, addr)
        except (x86.TranslationError, GuestMemoryError) as e:
            raise OperandFault(str(e)) from None
        n = min(length - done, 0x1000 - (addr & 0xFFF))
        if not memory.contains(phys, n):
            raise OperandFault(f"{addr:#x} is not RAM")
        out.append((phys, n))
        done += n
    return out


def read_linear(memory: GuestMemory, sregs, linear: int, length: int) -> bytes:
    return b"".join(memory.read(p, n) for p, n in _phys(memory, sregs, linear, length))


def write_linear(memory: GuestMemory, sregs, linear: int, data: bytes) -> None:
    pos = 0
    for p, n in _phys(memory, sregs, linear, len(data)):
        memory.write(p, data[pos:pos + n])
        pos += n


#: Offsets in the XSAVE area (SDM Vol. 1 §10.5.1, §13.4): MXCSR,
#: MXCSR_MASK, XSTATE_BV; XSTATE_BV bit 1 is SSE state.
XSAVE_MXCSR = 24
XSAVE_MXCSR_MASK = 28
XSAVE_XSTATE_BV = 512
XFEATURE_SSE = 1 << 1
DEFAULT_MXCSR_MASK = 0xFFBF
GP_VECTOR = 13


def _mxcsr(vcpu, memory: GuestMemory, d: Decoded, regs, sregs, next_rip: int) -> bool | None:
    """ldmxcsr/stmxcsr: True when done, False when #GP(0) was injected
    instead, None when the operand is unmapped (nothing done)."""
    assert d.mem is not None
    addr = effective_address(d.mem, regs, sregs, next_rip)
    area = vcpu.get_xsave()
    try:
        if d.name == "stmxcsr":
            write_linear(memory, sregs, addr, bytes(area[XSAVE_MXCSR:XSAVE_MXCSR + 4]))
            return True
        value = int.from_bytes(read_linear(memory, sregs, addr, 4), "little")
    except OperandFault:
        return None
    mask = int.from_bytes(area[XSAVE_MXCSR_MASK:XSAVE_MXCSR_MASK + 4], "little") or DEFAULT_MXCSR_MASK
    if value & ~mask:
        _inject(vcpu, GP_VECTOR, 0)
        return False
    area[XSAVE_MXCSR:XSAVE_MXCSR + 4] = value.to_bytes(4, "little")
    area[XSAVE_XSTATE_BV] |= XFEATURE_SSE      # so KVM takes MXCSR from the area
    vcpu.set_xsave(area)
    return True


def _inject(vcpu, vector: int, error_code: int | None = None) -> None:
    events = vcpu.get_vcpu_events()
    events.exception.injected = 1
    events.exception.nr = vector
    events.exception.has_error_code = 0 if error_code is None else 1
    events.exception.error_code = error_code or 0
    events.exception.pending = 0
    vcpu.set_vcpu_events(events)


def fetch(memory: GuestMemory, sregs, linear: int, n: int = MAX_INSN) -> bytes:
    """Up to ``n`` bytes at ``linear``, translated page by page; stops at
    the first unmapped page or the end of RAM."""
    out = bytearray()
    while len(out) < n:
        addr = linear + len(out)
        try:
            phys = x86.translate(memory.read_u64, sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer, addr)
        except (x86.TranslationError, GuestMemoryError):
            break
        chunk = min(n - len(out), 0x1000 - (addr & 0xFFF))
        if not memory.contains(phys, chunk):
            break
        out += memory.read(phys, chunk)
    return bytes(out)


def _code_at_rip(vcpu, memory: GuestMemory, regs, sregs, insn: bytes | None) -> bytes:
    if insn:
        return insn
    long_mode = bool(sregs.efer & x86.EFER_LMA and sregs.cs.l)
    linear = regs.rip if long_mode else (sregs.cs.base + regs.rip) & 0xFFFF_FFFF
    return fetch(memory, sregs, linear)


def fallback(vcpu, memory: GuestMemory, insn: bytes | None = None) -> tuple[bool, str]:
    """Emulate the instruction at rip of ``vcpu`` (a :class:`vmm.kvm.Vcpu`)
    if it is one of ours: (True, name) when done, the vCPU ready to run on;
    (False, name or description) otherwise, nothing changed."""
    regs = vcpu.get_regs()
    sregs = vcpu.get_sregs()
    code = _code_at_rip(vcpu, memory, regs, sregs, insn)
    long_mode = bool(sregs.efer & x86.EFER_LMA and sregs.cs.l)
    d = decode(code, long_mode, 32 if (long_mode or sregs.cs.db) else 16)
    if d is None:
        return False, name(code)
    rip_mask = 0xFFFF_FFFF_FFFF_FFFF if long_mode else 0xFFFF_FFFF
    next_rip = (regs.rip + d.length) & rip_mask
    if d.name in ("ldmxcsr", "stmxcsr"):
        done = _mxcsr(vcpu, memory, d, regs, sregs, next_rip)
        if done is None:
            return False, f"{d.name} (operand not mapped)"
        if done:                  # a #GP leaves rip on the instruction
            regs.rip = next_rip
            vcpu.set_regs(regs)
        _count(vcpu, d.name)
        return True, d.name
    regs.rip = next_rip
    if d.name == "clac":
        regs.rflags &= ~RFLAGS_AC
    elif d.name == "stac":
        regs.rflags |= RFLAGS_AC
    elif d.name in ("popcnt", "tzcnt", "lzcnt"):
        result, flags = bit_count(d.name, getattr(regs, GPRS[d.src]), d.size)
        write_gpr(regs, d.dest, result, d.size)
        clear = _ARITH if d.name == "popcnt" else (RFLAGS_CF | RFLAGS_ZF)
        regs.rflags = (regs.rflags & ~clear) | flags
    vcpu.set_regs(regs)
    if d.name == "int3":
        _inject(vcpu, BP_VECTOR)
    _count(vcpu, d.name)
    return True, d.name


def _count(vcpu, what: str) -> None:
    with _counts_lock:
        counts[what] += 1
        first = counts[what] == 1
    if first:
        log.info("vCPU %d: emulating %s for the guest (KVM's emulator failed on it)",
                 getattr(vcpu, "index", -1), what)


# -- naming what is not emulated ------------------------------------------

#: (opcode bytes after prefixes/REX, ModRM reg field or None, name)
_KNOWN = (
    (b"\x0f\xc7", 1, "cmpxchg8b/cmpxchg16b"),
    (b"\x0f\xae", 2, "ldmxcsr"), (b"\x0f\xae", 3, "stmxcsr"), (b"\x0f\xae", 4, "xsave"), (b"\x0f\xae", 5, "xrstor"), (b"\x0f\xae", 6, "xsaveopt"),
    (b"\x0f\xc7", 4, "xsavec"), (b"\x0f\xc7", 5, "xsaves"), (b"\x0f\xc7", 3, "xrstors"),
    (b"\x0f\xc7", 6, "rdrand"), (b"\x0f\xc7", 7, "rdseed"),
    (b"\x0f\x01\xd0", None, "xgetbv"), (b"\x0f\x01\xd1", None, "xsetbv"),
    (b"\x0f\x01\xef", None, "wrpkru"), (b"\x0f\x01\xee", None, "rdpkru"),
    (b"\x0f\x01\xf9", None, "rdtscp"), (b"\x0f\x0b", None, "ud2"), (b"\x0f\xa2", None, "cpuid"),
    (b"\x0f\xb8", None, "popcnt (memory operand)"), (b"\x0f\xbc", None, "tzcnt/bsf"),
    (b"\x0f\xbd", None, "lzcnt/bsr"), (b"\x0f\x38\xf0", None, "movbe"), (b"\x0f\x38\xf1", None, "movbe"),
)


def name(code: bytes) -> str:
    """A name for the instruction at the start of ``code`` (for reports)."""
    pos = 0
    while pos < len(code) and code[pos] in _LEGACY_PREFIXES:
        pos += 1
    rex = 0
    if pos < len(code) and 0x40 <= code[pos] <= 0x4F:
        rex = code[pos]
        pos += 1
    rest = code[pos:]
    for opcode, reg, what in _KNOWN:
        if not rest.startswith(opcode):
            continue
        if reg is None:
            return what
        if len(rest) > len(opcode) and (rest[len(opcode)] >> 3) & 7 == reg:
            if what == "cmpxchg8b/cmpxchg16b":
                return "cmpxchg16b" if rex & 8 else "cmpxchg8b"
            if what in ("xsave", "xrstor", "xsaveopt", "ldmxcsr", "stmxcsr") and rest[len(opcode)] >> 6 == 3:
                continue                     # register forms are fences (lfence, mfence...)
            return what + ("64" if rex & 8 and what.startswith("x") else "")
    if rest[:1] == b"\xcc":
        return "int3"
    return f"unknown instruction ({code[:MAX_INSN].hex(' ') or 'no bytes readable'})"
