"""The CPUID a vCPU sees: KVM_GET_SUPPORTED_CPUID, its APIC id, the KVM
signature leaves, and features hidden on request (``--cpuid-hide``).

Feature bits from the Intel SDM Vol. 2A, "CPUID" (leaf 1 ECX/EDX, leaf 7
EBX/ECX/EDX, leaf 0xD sub-leaf 1), AMD's APM Vol. 3 (leaf 0x80000001) and
Linux ``Documentation/virt/kvm/x86/cpuid.rst`` (KVM_CPUID_SIGNATURE
0x40000000: "KVMKVMKVM\\0\\0\\0", EAX the highest KVM leaf;
KVM_CPUID_FEATURES 0x40000001).  Names are those of ``/proc/cpuinfo``.
Hiding ``xsave`` also hides what depends on it (``osxsave``, ``avx``...)
and zeroes leaf 0xD, the XSAVE state enumeration.

On this project's PVM host a bit that ``KVM_GET_SUPPORTED_CPUID`` does not
report can still show in the guest kernel's CPUID (the host CPU's own
ssse3, popcnt, smap...), so hiding it here changes nothing; there the
kernel's own ``clearcpuid=`` is what drops it (README, "What this host
does with Linux").  Bits that KVM reports (cx16) are hidden as asked.
"""

from __future__ import annotations

from vmm import kvm

KVM_CPUID_SIGNATURE = 0x4000_0000
KVM_CPUID_FEATURES = 0x4000_0001
KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"
XSTATE_LEAF = 0xD

EAX, EBX, ECX, EDX = "eax", "ebx", "ecx", "edx"

#: name -> (leaf, sub-leaf, register, bit)
FEATURES: dict[str, tuple[int, int, str, int]] = {
    # leaf 1 ECX
    "sse3": (1, 0, ECX, 0), "pclmulqdq": (1, 0, ECX, 1), "monitor": (1, 0, ECX, 3), "vmx": (1, 0, ECX, 5),
    "ssse3": (1, 0, ECX, 9), "fma": (1, 0, ECX, 12), "cx16": (1, 0, ECX, 13), "pcid": (1, 0, ECX, 17),
    "sse4_1": (1, 0, ECX, 19), "sse4_2": (1, 0, ECX, 20), "x2apic": (1, 0, ECX, 21), "movbe": (1, 0, ECX, 22),
    "popcnt": (1, 0, ECX, 23), "tsc_deadline_timer": (1, 0, ECX, 24), "aes": (1, 0, ECX, 25),
    "xsave": (1, 0, ECX, 26), "osxsave": (1, 0, ECX, 27), "avx": (1, 0, ECX, 28), "f16c": (1, 0, ECX, 29),
    "rdrand": (1, 0, ECX, 30), "hypervisor": (1, 0, ECX, 31),
    # leaf 1 EDX
    "mce": (1, 0, EDX, 7), "cx8": (1, 0, EDX, 8), "apic": (1, 0, EDX, 9), "mtrr": (1, 0, EDX, 12),
    "pge": (1, 0, EDX, 13), "mca": (1, 0, EDX, 14), "pat": (1, 0, EDX, 16), "clflush": (1, 0, EDX, 19),
    "ht": (1, 0, EDX, 28),
    # leaf 7 sub-leaf 0
    "fsgsbase": (7, 0, EBX, 0), "bmi1": (7, 0, EBX, 3), "hle": (7, 0, EBX, 4), "avx2": (7, 0, EBX, 5),
    "smep": (7, 0, EBX, 7), "bmi2": (7, 0, EBX, 8), "erms": (7, 0, EBX, 9), "invpcid": (7, 0, EBX, 10),
    "rtm": (7, 0, EBX, 11), "avx512f": (7, 0, EBX, 16), "rdseed": (7, 0, EBX, 18), "adx": (7, 0, EBX, 19),
    "smap": (7, 0, EBX, 20), "clflushopt": (7, 0, EBX, 23), "clwb": (7, 0, EBX, 24), "sha_ni": (7, 0, EBX, 29),
    "umip": (7, 0, ECX, 2), "pku": (7, 0, ECX, 3), "ospke": (7, 0, ECX, 4), "la57": (7, 0, ECX, 16),
    "rdpid": (7, 0, ECX, 22), "md_clear": (7, 0, EDX, 10), "spec_ctrl": (7, 0, EDX, 26),
    "arch_capabilities": (7, 0, EDX, 29),
    # leaf 0xD sub-leaf 1
    "xsaveopt": (XSTATE_LEAF, 1, EAX, 0), "xsavec": (XSTATE_LEAF, 1, EAX, 1), "xgetbv1": (XSTATE_LEAF, 1, EAX, 2),
    "xsaves": (XSTATE_LEAF, 1, EAX, 3),
    # leaf 0x80000001
    "lahf_lm": (0x8000_0001, 0, ECX, 0), "abm": (0x8000_0001, 0, ECX, 5), "sse4a": (0x8000_0001, 0, ECX, 6),
    "3dnowprefetch": (0x8000_0001, 0, ECX, 8), "topoext": (0x8000_0001, 0, ECX, 22),
    "syscall": (0x8000_0001, 0, EDX, 11), "nx": (0x8000_0001, 0, EDX, 20), "pdpe1gb": (0x8000_0001, 0, EDX, 26),
    "rdtscp": (0x8000_0001, 0, EDX, 27),
    # KVM paravirtual features (KVM_CPUID_FEATURES EAX)
    "kvmclock": (KVM_CPUID_FEATURES, 0, EAX, 0), "kvm_nopiodelay": (KVM_CPUID_FEATURES, 0, EAX, 1),
    "kvmclock2": (KVM_CPUID_FEATURES, 0, EAX, 3), "kvm_async_pf": (KVM_CPUID_FEATURES, 0, EAX, 4),
    "kvm_steal_time": (KVM_CPUID_FEATURES, 0, EAX, 5), "kvm_pv_eoi": (KVM_CPUID_FEATURES, 0, EAX, 6),
    "kvm_pv_unhalt": (KVM_CPUID_FEATURES, 0, EAX, 7), "kvm_pv_tlb_flush": (KVM_CPUID_FEATURES, 0, EAX, 9),
    "kvm_pv_send_ipi": (KVM_CPUID_FEATURES, 0, EAX, 11), "kvm_poll_control": (KVM_CPUID_FEATURES, 0, EAX, 12),
    "kvm_pv_sched_yield": (KVM_CPUID_FEATURES, 0, EAX, 13), "kvm_async_pf_int": (KVM_CPUID_FEATURES, 0, EAX, 14),
}
#: Features that make no sense without another one (hidden with it).
DEPENDS: dict[str, tuple[str, ...]] = {
    "xsave": ("osxsave", "avx", "avx2", "avx512f", "fma", "f16c", "xsaveopt", "xsavec", "xgetbv1", "xsaves"),
    "avx": ("avx2", "avx512f", "fma", "f16c"),
}


class CpuidError(ValueError):
    """An unknown feature name in --cpuid-hide."""


def parse_hide(text: str) -> tuple[str, ...]:
    """``cx16,xsave`` -> the features to hide, dependants included."""
    out: list[str] = []
    for raw in text.split(","):
        name = raw.strip().lower()
        if not name:
            continue
        if name not in FEATURES:
            raise CpuidError(f"unknown CPUID feature {name!r} (known: {', '.join(sorted(FEATURES))})")
        for n in (name, *DEPENDS.get(name, ())):
            if n not in out:
                out.append(n)
    return tuple(out)


def _entries(table: kvm.Cpuid) -> list[list[int]]:
    return [[e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx] for e in table]


def build(supported: kvm.Cpuid, apic_id: int, hide: tuple[str, ...] = ()) -> kvm.Cpuid:
    """The CPUID table of one vCPU."""
    rows = _entries(supported)
    if not any(r[0] == KVM_CPUID_SIGNATURE for r in rows):
        sig = [int.from_bytes(KVM_SIGNATURE[i:i + 4], "little") for i in (0, 4, 8)]
        rows.append([KVM_CPUID_SIGNATURE, 0, 0, KVM_CPUID_FEATURES, *sig])
    if not any(r[0] == KVM_CPUID_FEATURES for r in rows):
        rows.append([KVM_CPUID_FEATURES, 0, 0, 0, 0, 0, 0])
    regs = {EAX: 3, EBX: 4, ECX: 5, EDX: 6}
    for row in rows:
        if row[0] == 1:
            row[4] = (row[4] & 0x00FF_FFFF) | (apic_id & 0xFF) << 24
        elif row[0] in (0xB, 0x1F):
            row[6] = apic_id
    for name in hide:
        leaf, sub, reg, bit = FEATURES[name]
        for row in rows:
            if row[0] == leaf and (row[1] == sub or leaf not in (7, XSTATE_LEAF)):
                row[regs[reg]] &= ~(1 << bit)
    if "xsave" in hide:
        for row in rows:
            if row[0] == XSTATE_LEAF:
                row[3:7] = [0, 0, 0, 0]
    out = kvm.Cpuid(len(rows))
    for entry, row in zip(out, rows, strict=True):
        entry.function, entry.index, entry.flags, entry.eax, entry.ebx, entry.ecx, entry.edx = row
    return out
