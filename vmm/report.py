"""Readable reports of a vCPU that KVM cannot run: exit reason, suberror,
registers, CPU mode, and the bytes at rip (rip translated through the
guest's page tables, Intel SDM Vol. 3A §4.5)."""

from __future__ import annotations

from vmm import kvm, x86
from vmm.memory import GuestMemory, GuestMemoryError

INSN_WINDOW = 16


def cpu_mode(sregs) -> str:
    if not sregs.cr0 & x86.CR0_PE:
        return "real mode"
    if sregs.efer & x86.EFER_LMA:
        return "64-bit mode" if sregs.cs.l else "compatibility mode"
    return "32-bit protected mode" if sregs.cs.db else "16-bit protected mode"


def bytes_at(memory: GuestMemory, sregs, linear: int, n: int = INSN_WINDOW) -> tuple[int | None, bytes, str]:
    """(physical address, bytes, note) of ``n`` bytes at linear ``linear``."""
    try:
        phys = x86.translate(memory.read_u64, sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer, linear)
    except (x86.TranslationError, GuestMemoryError) as e:
        return None, b"", f"not mapped ({e})"
    out = bytearray()
    for i in range(n):  # stop at the end of RAM, byte by byte (n is tiny)
        if not memory.contains(phys + i):
            break
        out += memory.read(phys + i, 1)
    return phys, bytes(out), "" if out else "not in RAM"


def describe(vcpu: kvm.Vcpu, memory: GuestMemory, insn: bytes | None = None) -> str:
    """Registers, mode and the instruction bytes at rip of ``vcpu``."""
    try:
        regs = vcpu.get_regs()
        sregs = vcpu.get_sregs()
    except kvm.KvmError as e:
        return f"  (registers unavailable: {e})"
    cpl = sregs.cs.dpl if sregs.cr0 & x86.CR0_PE else 0
    linear = regs.rip if sregs.efer & x86.EFER_LMA and sregs.cs.l else (sregs.cs.base + regs.rip) & 0xFFFF_FFFF
    phys, code, note = bytes_at(memory, sregs, linear)
    lines = [
        f"  rip {regs.rip:#018x}  rsp {regs.rsp:#018x}  rflags {regs.rflags:#x}",
        f"  rax {regs.rax:#018x}  rbx {regs.rbx:#018x}  rcx {regs.rcx:#018x}  rdx {regs.rdx:#018x}",
        f"  rsi {regs.rsi:#018x}  rdi {regs.rdi:#018x}  rbp {regs.rbp:#018x}",
        f"  {cpu_mode(sregs)}, CPL {cpl}, cs {sregs.cs.selector:#x}  cr0 {sregs.cr0:#x}  cr3 {sregs.cr3:#x}"
        f"  cr4 {sregs.cr4:#x}  efer {sregs.efer:#x}",
    ]
    where = f"linear {linear:#x}" + (f" = physical {phys:#x}" if phys is not None else "")
    if code:
        lines.append(f"  bytes at rip ({where}): {code.hex(' ')}")
    else:
        lines.append(f"  bytes at rip ({where}): {note}")
    if insn:
        lines.append(f"  instruction KVM failed on: {insn.hex(' ')}")
    return "\n".join(lines)
