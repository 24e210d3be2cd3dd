"""The instruction-emulation fallback (vmm.emulate): each instruction on a
fake vCPU, then all of them on real KVM in a tiny 64-bit kernel, and the
report naming an instruction that is not emulated."""

from __future__ import annotations

import re
import struct

import pytest

from tests.vmm.conftest import needs_kvm
from tests.vmm.linux import images
from vmm import emulate, kvm, layout, x86
from vmm.machine import Machine
from vmm.memory import GuestMemory
from vmm.outcome import Ending


class FakeVcpu:
    """The calls vmm.emulate makes, on real cffi structs."""

    index = 0

    def __init__(self, rip=0x1000, long_mode=True, **gprs):
        self.regs = kvm.ffi.new("struct kvm_regs *")
        self.sregs = kvm.ffi.new("struct kvm_sregs *")
        self.events = kvm.ffi.new("struct kvm_vcpu_events *")
        self.regs.rip = rip
        self.regs.rflags = x86.RFLAGS_RESERVED
        for k, v in gprs.items():
            setattr(self.regs, k, v)
        if long_mode:
            self.sregs.efer = x86.EFER_LMA | x86.EFER_LME
            self.sregs.cs.l = 1
        else:
            self.sregs.cs.db = 1
        self.set_events = 0

    def get_regs(self):
        return self.regs

    def set_regs(self, regs):
        self.regs = regs

    def get_sregs(self):
        return self.sregs

    def get_vcpu_events(self):
        return self.events

    def set_vcpu_events(self, events):
        self.events = events
        self.set_events += 1

    xsave = bytearray(4096)

    def get_xsave(self):
        return bytearray(self.xsave)

    def set_xsave(self, data):
        self.xsave = bytearray(data)


def run(code: bytes, **kw):
    v = FakeVcpu(**kw)
    done, what = emulate.fallback(v, None, code)
    return v, done, what


def test_int3_injects_bp_after_the_instruction():
    v, done, what = run(b"\xcc\x90")
    assert (done, what) == (True, "int3")
    assert v.regs.rip == 0x1001
    assert v.events.exception.injected == 1 and v.events.exception.nr == 3
    assert v.events.exception.has_error_code == 0 and v.set_events == 1


def test_clac_and_stac():
    v, done, _ = run(b"\x0f\x01\xcb")
    assert done and v.regs.rflags & emulate.RFLAGS_AC and v.regs.rip == 0x1003
    v.regs.rflags |= emulate.RFLAGS_AC
    done, what = emulate.fallback(v, None, b"\x0f\x01\xca")
    assert (done, what) == (True, "clac") and not v.regs.rflags & emulate.RFLAGS_AC and v.regs.rip == 0x1006


def test_fwait_is_a_no_op():
    v, done, what = run(b"\x9b", rax=5)
    assert (done, what) == (True, "fwait") and v.regs.rip == 0x1001 and v.regs.rax == 5


def test_popcnt_rax_rdi_as_linux_uses_it():
    # f3 48 0f b8 c7: popcnt rax, rdi (DESIGN.md: at 0xffffffff81597201)
    v, done, what = run(bytes.fromhex("f3480fb8c7"), rdi=0xF0F0_0000_0000_0001, rax=99)
    assert (done, what) == (True, "popcnt") and v.regs.rax == 9 and v.regs.rip == 0x1005
    assert not v.regs.rflags & emulate.RFLAGS_ZF


def test_popcnt_of_zero_sets_zf_and_clears_the_rest():
    v = FakeVcpu(rdi=0)
    v.regs.rflags |= emulate.RFLAGS_CF | emulate.RFLAGS_SF | emulate.RFLAGS_OF
    emulate.fallback(v, None, bytes.fromhex("f3480fb8c7"))
    assert v.regs.rax == 0 and v.regs.rflags & emulate._ARITH == emulate.RFLAGS_ZF


def test_popcnt_32_bit_zero_extends_and_16_bit_keeps_upper_bits():
    v, _, _ = run(bytes.fromhex("f30fb8c7"), rdi=0xFFFF_FFFF_FFFF_FFFF, rax=0xAAAA_AAAA_AAAA_AAAA)
    assert v.regs.rax == 32
    v, _, _ = run(bytes.fromhex("66f30fb8c7"), rdi=0xFFFF_FFFF_FFFF_00FF, rax=0xAAAA_AAAA_AAAA_AAAA)
    assert v.regs.rax == 0xAAAA_AAAA_AAAA_0008


def test_rex_extended_registers():
    # f3 4d 0f b8 c8: popcnt r9, r8
    v, done, _ = run(bytes.fromhex("f34d0fb8c8"), r8=0b1011)
    assert done and v.regs.r9 == 3


@pytest.mark.parametrize("value, tz, lz", [(0b1000, 3, 60), (1 << 63, 63, 0), (0, 64, 64), (1, 0, 63)])
def test_tzcnt_and_lzcnt(value, tz, lz):
    v, done, what = run(bytes.fromhex("f3480fbcc7"), rdi=value)    # tzcnt rax, rdi
    assert (done, what) == (True, "tzcnt") and v.regs.rax == tz
    assert bool(v.regs.rflags & emulate.RFLAGS_CF) == (value == 0)
    assert bool(v.regs.rflags & emulate.RFLAGS_ZF) == (tz == 0)
    v, done, what = run(bytes.fromhex("f3480fbdc7"), rdi=value)    # lzcnt rax, rdi
    assert (done, what) == (True, "lzcnt") and v.regs.rax == lz
    assert bool(v.regs.rflags & emulate.RFLAGS_CF) == (value == 0)
    assert bool(v.regs.rflags & emulate.RFLAGS_ZF) == (lz == 0)


def test_lzcnt_32_bit():
    v, _, _ = run(bytes.fromhex("f30fbdc7"), rdi=0x1_0000_8000)   # lzcnt eax, edi: low 32 bits only
    assert v.regs.rax == 16


def test_memory_forms_are_not_emulated():
    v, done, what = run(bytes.fromhex("f3480fb807"), rax=7)           # popcnt rax, [rdi]
    assert not done and "popcnt (memory operand)" in what and v.regs.rip == 0x1000 and v.regs.rax == 7


@pytest.mark.parametrize("code, expected", [
    ("f0480fc70e", "cmpxchg16b"), ("0fc70e", "cmpxchg8b"), ("480fae2f", "xrstor64"), ("0fae27", "xsave"),
    ("0f01d1", "xsetbv"), ("0f0b", "ud2"), ("0faee8", "unknown instruction (0f ae e8)"),
])
def test_failures_are_named(code, expected):
    v, done, what = run(bytes.fromhex(code))
    assert not done and what == expected and v.regs.rip == 0x1000


def test_32_bit_mode_has_no_rex():
    # In 32-bit mode 0x48 is dec eax, not REX: not ours.
    _, done, _ = run(bytes.fromhex("48cc"), long_mode=False)
    assert not done
    v, done, _ = run(bytes.fromhex("f30fb8c7"), long_mode=False, rdi=7)
    assert done and v.regs.rax == 3


def test_fetch_crosses_pages():
    m = GuestMemory(16 * layout.MiB)
    try:
        # Identity map of the bzImage loader, then code across a page boundary.
        from vmm.boot import bzimage
        bzimage.write_page_tables(m)
        m.write(0x20FFE, b"\x0f\x01\xca")
        sregs = kvm.ffi.new("struct kvm_sregs *")
        sregs.cr0, sregs.cr3, sregs.cr4 = x86.CR0_PE | x86.CR0_PG, layout.LINUX_PML4, x86.CR4_PAE
        sregs.efer = x86.EFER_LMA | x86.EFER_LME
        assert emulate.fetch(m, sregs, 0x20FFE, 3) == b"\x0f\x01\xca"
    finally:
        m.close()


@pytest.fixture
def paged():
    """Guest RAM with the bzImage loader's identity map, and a vCPU in
    long mode on it."""
    from vmm.boot import bzimage
    m = GuestMemory(16 * layout.MiB)
    bzimage.write_page_tables(m)
    v = FakeVcpu(rip=0x40000, rsp=0x30000)
    v.sregs.cr0, v.sregs.cr3, v.sregs.cr4 = x86.CR0_PE | x86.CR0_PG, layout.LINUX_PML4, x86.CR4_PAE
    v.xsave = bytearray(4096)
    struct.pack_into("<II", v.xsave, emulate.XSAVE_MXCSR, 0x1F80, 0xFFFF)
    yield m, v
    m.close()


def test_ldmxcsr_from_the_stack(paged):
    m, v = paged
    m.write(0x30004, struct.pack("<I", 0x9F80))
    done, what = emulate.fallback(v, m, bytes.fromhex("0fae542404"))    # ldmxcsr [rsp+4], as Linux does
    assert (done, what) == (True, "ldmxcsr") and v.regs.rip == 0x40005
    assert struct.unpack_from("<I", v.xsave, emulate.XSAVE_MXCSR)[0] == 0x9F80
    assert v.xsave[emulate.XSAVE_XSTATE_BV] & emulate.XFEATURE_SSE


def test_stmxcsr_rip_relative_and_fs(paged):
    m, v = paged
    done, what = emulate.fallback(v, m, bytes.fromhex("0fae1d") + struct.pack("<i", 0x100))   # stmxcsr [rip+0x100]
    assert (done, what) == (True, "stmxcsr") and v.regs.rip == 0x40007
    assert m.read(0x40007 + 0x100, 4) == struct.pack("<I", 0x1F80)
    v.sregs.fs.base = 0x50000
    v.regs.rbx, v.regs.rcx = 0x100, 3
    done, _ = emulate.fallback(v, m, bytes.fromhex("640fae1c8b"))        # stmxcsr fs:[rbx+rcx*4]
    assert done and m.read(0x5010C, 4) == struct.pack("<I", 0x1F80) and v.regs.rip == 0x40007 + 5


def test_ldmxcsr_reserved_bits_raise_gp(paged):
    m, v = paged
    m.write(0x30000, struct.pack("<I", 0x1_0000))
    done, what = emulate.fallback(v, m, bytes.fromhex("0fae1424"))       # ldmxcsr [rsp]
    assert (done, what) == (True, "ldmxcsr") and v.regs.rip == 0x40000
    assert v.events.exception.nr == emulate.GP_VECTOR and v.events.exception.has_error_code == 1
    assert struct.unpack_from("<I", v.xsave, emulate.XSAVE_MXCSR)[0] == 0x1F80


def test_mxcsr_operand_not_mapped(paged):
    m, v = paged
    v.regs.rsp = 5 << 30                                                  # above the 4 GiB identity map
    done, what = emulate.fallback(v, m, bytes.fromhex("0fae1424"))
    assert not done and what == "ldmxcsr (operand not mapped)" and v.regs.rip == 0x40000


def test_modrm_memory_forms():
    mem, used = emulate.decode_modrm_memory(bytes.fromhex("542404"), 0)
    assert (mem.base, mem.index, mem.disp, used) == (4, None, 4, 3)
    mem, used = emulate.decode_modrm_memory(bytes.fromhex("9488") + struct.pack("<i", -8), 0b0011)  # REX.X|B
    assert (mem.base, mem.index, mem.scale, mem.disp, used) == (8, 9, 4, -8, 6)
    mem, used = emulate.decode_modrm_memory(bytes.fromhex("1425") + struct.pack("<I", 0x1234), 0)
    assert (mem.base, mem.index, mem.disp, used) == (None, None, 0x1234, 6)
    assert emulate.decode_modrm_memory(bytes.fromhex("c0"), 0) is None


# -- on KVM: a 64-bit "kernel" that uses every emulated instruction ------------

KERNEL = 0x100_0000            # load address of images.bzimage (pref_address)
ENTRY = KERNEL + 0x200
HANDLER = KERNEL + 0x300
IDT = KERNEL + 0x380
IDTR = KERNEL + 0x370


def _code() -> bytes:
    c = b""
    c += b"\x48\xc7\xc4\x00\x00\x08\x00"            # mov rsp, 0x80000
    c += b"\x0f\x01\x1c\x25" + struct.pack("<I", IDTR)  # lidt [IDTR]
    c += b"\x48\xc7\xc7\xf0\xf0\x00\x00"            # mov rdi, 0xf0f0
    c += bytes.fromhex("f3480fb8c7")                # popcnt rax, rdi      -> 8
    c += bytes.fromhex("f3480fbddf")                # lzcnt rbx, rdi       -> 48
    c += bytes.fromhex("f3480fbccf")                # tzcnt rcx, rdi       -> 4
    c += b"\x48\x01\xd8\x48\x01\xc8"                # add rax, rbx; add rax, rcx   -> 60
    c += b"\x0f\x01\xcb"                            # stac
    c += b"\x9c\x5a\xc1\xea\x12\x83\xe2\x01\x01\xd0"  # pushfq; pop rdx; shr edx, 18; and edx, 1; add eax, edx -> 61
    c += b"\x0f\x01\xca"                            # clac
    c += b"\x9b"                                    # fwait
    c += b"\x9c\x5a\xc1\xea\x12\x83\xe2\x01\x01\xd0"  # AC is clear again: + 0
    c += bytes.fromhex("0fae5c24f8")                # stmxcsr [rsp-8]
    c += bytes.fromhex("814c24f800800000")          # or dword [rsp-8], 0x8000 (FZ)
    c += bytes.fromhex("0fae5424f8")                # ldmxcsr [rsp-8]
    c += bytes.fromhex("0fae5c24f0")                # stmxcsr [rsp-16]
    c += bytes.fromhex("8b5424f0c1ea0f83e20101d0")  # mov edx, [rsp-16]; shr edx, 15; and edx, 1; add eax, edx -> +1
    c += b"\xcc"                                    # int3 -> HANDLER
    c += b"\xe6\xf4\xf4"                            # (not reached) out 0xf4, al; hlt
    return c


def _handler(after_int3: int) -> bytes:
    # The pushed rip must be the byte after the int3: add 2 to al if so.
    return (b"\x48\x8b\x1c\x24"                           # mov rbx, [rsp]
            + b"\x48\x81\xfb" + struct.pack("<i", after_int3)  # cmp rbx, imm32 (sign-extended: low addresses)
            + b"\x75\x02\x04\x02"                         # jne +2; add al, 2   -> 63
            + b"\xe6\xf4\xf4")                            # out 0xf4, al; hlt


def tiny_kernel() -> bytes:
    code = _code()
    after_int3 = ENTRY + code.index(b"\xcc") + 1
    img = bytearray(images.bzimage(code=code))
    base = (img[0x1F1] + 1) * 512
    handler = _handler(after_int3)
    img[base + 0x300:base + 0x300 + len(handler)] = handler
    img[base + 0x370:base + 0x37A] = struct.pack("<HQ", 16 * 4 - 1, IDT)
    gate = struct.pack("<HHBBHII", HANDLER & 0xFFFF, 0x10, 0, 0x8E, (HANDLER >> 16) & 0xFFFF, HANDLER >> 32, 0)
    img[base + 0x380 + 3 * 16:base + 0x380 + 4 * 16] = gate
    return bytes(img)


@needs_kvm
def test_every_emulated_instruction_on_kvm(tmp_path):
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(tiny_kernel())
    before = dict(emulate.counts)
    with Machine(memory=64 * layout.MiB) as m:
        m.load_linux(kernel, boot="bzimage")
        result = m.run(timeout=60)
    # F3 0F BD is lzcnt only on a CPU with ABM (CPUID 0x80000001 ECX[5]); on
    # one without, it is bsr (SDM), and KVM's emulator runs it as that.
    k = kvm.Kvm()
    try:
        abm = any(e.function == 0x8000_0001 and e.ecx & (1 << 5) for e in k.supported_cpuid())
    finally:
        k.close()
    lzcnt = 48 if abm else 15
    assert result.ending == Ending.TEST_EXIT and result.value == 8 + lzcnt + 4 + 1 + 1 + 2, result
    used = {k: emulate.counts[k] - before.get(k, 0) for k in emulate.counts if emulate.counts[k] > before.get(k, 0)}
    from vmm.boot.linux import host_is_pvm
    if host_is_pvm():   # measured here: KVM's emulator fails on these five
        assert all(used.get(n) == 1 for n in ("int3", "clac", "stac", "popcnt", "fwait", "ldmxcsr")), used
        assert used.get("stmxcsr") == 2, used
    # What this host's emulator could not do itself went through the fallback
    # (on a VMX/SVM host the CPU runs them and nothing is counted).
    assert set(used) <= {"popcnt", "lzcnt", "tzcnt", "clac", "stac", "fwait", "int3", "ldmxcsr", "stmxcsr"}


@needs_kvm
def test_report_names_the_instruction(guest):
    from tests.vmm.test_endings import run_mode
    r = run_mode(guest, "4")
    assert r.returncode == 6, r.stderr
    assert re.search(r"emulation failure \(suberror 1\) on cmpxchg16b", r.stderr), r.stderr
