"""CPUID of a vCPU (vmm.cpuid): APIC ids, the KVM signature leaves and
--cpuid-hide."""

from __future__ import annotations

import pytest

from vmm import cpuid, kvm


def table(rows):
    t = kvm.Cpuid(len(rows))
    for e, (fn, idx, eax, ebx, ecx, edx) in zip(t, rows, strict=True):
        e.function, e.index, e.eax, e.ebx, e.ecx, e.edx = fn, idx, eax, ebx, ecx, edx
    return t


SUPPORTED = [(0, 0, 0xD, 0, 0, 0), (1, 0, 0, 0x0000_0800, 0xFFFF_FFFF, 0xFFFF_FFFF),
             (7, 0, 0, 0xFFFF_FFFF, 0xFFFF_FFFF, 0xFFFF_FFFF), (0xD, 0, 7, 0x240, 0x340, 0),
             (0xD, 1, 0xF, 0, 0, 0), (0xB, 0, 1, 1, 0x100, 0), (0x8000_0001, 0, 0, 0, 0xFFFF_FFFF, 0xFFFF_FFFF)]


def rows_of(t):
    return {(e.function, e.index): (e.eax, e.ebx, e.ecx, e.edx) for e in t}


def test_apic_id_and_kvm_leaves_added():
    out = rows_of(cpuid.build(table(SUPPORTED), 5))
    assert out[(1, 0)][1] >> 24 == 5 and out[(1, 0)][1] & 0xFFFFFF == 0x800
    assert out[(0xB, 0)][3] == 5
    eax, ebx, ecx, edx = out[(cpuid.KVM_CPUID_SIGNATURE, 0)]
    assert eax == cpuid.KVM_CPUID_FEATURES
    assert b"".join(r.to_bytes(4, "little") for r in (ebx, ecx, edx)) == b"KVMKVMKVM\0\0\0"
    assert (cpuid.KVM_CPUID_FEATURES, 0) in out


def test_existing_kvm_leaves_are_kept():
    rows = SUPPORTED + [(cpuid.KVM_CPUID_SIGNATURE, 0, 0x4000_0001, 0x4B4D564B, 0x564B4D56, 0x4D),
                        (cpuid.KVM_CPUID_FEATURES, 0, 0x1007EFB, 0, 0, 0)]
    out = cpuid.build(table(rows), 0)
    assert len(out) == len(rows)
    assert rows_of(out)[(cpuid.KVM_CPUID_FEATURES, 0)][0] == 0x1007EFB


@pytest.mark.parametrize("name, leaf, reg, bit", [("cx16", (1, 0), 2, 13), ("popcnt", (1, 0), 2, 23),
                                                  ("smap", (7, 0), 1, 20), ("abm", (0x8000_0001, 0), 2, 5),
                                                  ("x2apic", (1, 0), 2, 21), ("nx", (0x8000_0001, 0), 3, 20)])
def test_hide_one_feature(name, leaf, reg, bit):
    out = rows_of(cpuid.build(table(SUPPORTED), 0, cpuid.parse_hide(name)))
    assert not out[leaf][reg] & (1 << bit)
    assert out[leaf][reg] | (1 << bit) == 0xFFFF_FFFF


def test_hide_xsave_zeroes_leaf_0xd_and_its_dependants():
    hide = cpuid.parse_hide("xsave")
    assert {"xsave", "osxsave", "avx", "xsaves"} <= set(hide)
    out = rows_of(cpuid.build(table(SUPPORTED), 0, hide))
    for bit in (26, 27, 28):
        assert not out[(1, 0)][2] & (1 << bit)
    assert out[(0xD, 0)] == (0, 0, 0, 0) and out[(0xD, 1)] == (0, 0, 0, 0)


def test_parse_hide():
    assert cpuid.parse_hide(" CX16, popcnt,,") == ("cx16", "popcnt")
    with pytest.raises(cpuid.CpuidError, match="unknown CPUID feature 'warp'"):
        cpuid.parse_hide("cx16,warp")
