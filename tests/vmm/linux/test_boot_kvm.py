"""Kernels on real KVM: the 64-bit entry of the boot protocol (a tiny
bzImage whose kernel checks rsi and its zero page, then writes the test
exit port) and secondary vCPUs waiting for INIT/SIPI."""

from __future__ import annotations

import struct

from tests.vmm.conftest import needs_kvm
from tests.vmm.linux import images
from vmm import kvm, layout
from vmm.machine import Machine
from vmm.outcome import Ending

# cmp dword [rsi + 0x228], LINUX_CMDLINE (cmd_line_ptr); jne fail
# cmp byte [rsi + 0x210], 0xff (type_of_loader); jne fail
# mov al, 0x21; out 0xf4, al; hlt;  fail: mov al, 5; out 0xf4, al; hlt
CHECK_ZERO_PAGE = (b"\x81\xbe\x28\x02\x00\x00" + struct.pack("<I", layout.LINUX_CMDLINE) + b"\x75\x0e"
                   + b"\x80\xbe\x10\x02\x00\x00\xff" + b"\x75\x05"
                   + b"\xb0\x21\xe6\xf4\xf4" + b"\xb0\x05\xe6\xf4\xf4")


@needs_kvm
def test_64bit_entry_sees_its_zero_page(tmp_path):
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(images.bzimage(code=CHECK_ZERO_PAGE))
    with Machine(memory=64 * layout.MiB) as m:
        loaded = m.load_linux(kernel, cmdline="console=ttyS0", boot="bzimage")
        assert loaded.method == "bzimage"
        result = m.run(timeout=60)
    assert result.ending == Ending.TEST_EXIT and result.value == 0x21, result


@needs_kvm
def test_secondary_vcpus_wait_for_sipi(tmp_path):
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(images.bzimage())
    with Machine(memory=64 * layout.MiB, vcpus=3) as m:
        m.load_linux(kernel, boot="bzimage")
        states = [fd.get_mp_state() for fd in m._vcpu_fds]
    assert states[0] == kvm.MP_STATE_RUNNABLE
    assert states[1:] == [kvm.MP_STATE_UNINITIALIZED] * 2


def _cpuid_leaf1_ecx_bit(tmp_path, bit: int, hide: tuple[str, ...]) -> int:
    # mov eax, 1; xor ecx, ecx; cpuid; mov eax, ecx; shr eax, BIT; and al, 1; or al, 0x20;
    # out 0xf4, al; hlt -- in ring 0, through the bzImage's 64-bit entry
    code = b"\xb8\x01\x00\x00\x00\x31\xc9\x0f\xa2\x89\xc8\xc1\xe8" + bytes([bit]) + b"\x24\x01\x0c\x20\xe6\xf4\xf4"
    kernel = tmp_path / f"cpuid-{bit}-{len(hide)}"
    kernel.write_bytes(images.bzimage(code=code))
    with Machine(memory=64 * layout.MiB, cpuid_hide=hide) as m:
        m.load_linux(kernel, boot="bzimage")
        result = m.run(timeout=60)
    assert result.ending == Ending.TEST_EXIT and result.value in (0x20, 0x21), result
    return result.value & 1


@needs_kvm
def test_cpuid_hide_reaches_ring_0(tmp_path):
    """cx16 is in KVM_GET_SUPPORTED_CPUID on every x86-64 host KVM runs
    on; hidden, the kernel's CPUID no longer shows it.  (Bits KVM does not
    report may still show on PVM: README "What this host does with Linux".)"""
    k = kvm.Kvm()
    try:
        leaf1 = next(e for e in k.supported_cpuid() if e.function == 1)
    finally:
        k.close()
    assert leaf1.ecx >> 13 & 1, "KVM does not report cx16"
    assert _cpuid_leaf1_ecx_bit(tmp_path, 13, ()) == 1
    assert _cpuid_leaf1_ecx_bit(tmp_path, 13, ("cx16",)) == 0
