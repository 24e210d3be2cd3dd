"""ACPI tables written by the VMM: RSDP, XSDT, FADT (with FACS and DSDT)
and MADT, so that a Linux guest finds every vCPU, the IOAPIC, the PCI host
bridge with its windows, COM1 and the power-off register.

Layouts from the ACPI 6.4 specification: RSDP §5.2.5.3, system description
table header §5.2.6, XSDT §5.2.8, FADT §5.2.9 (revision 6, 276 bytes),
FACS §5.2.10, MADT §5.2.12 (Processor Local APIC §5.2.12.2, I/O APIC
§5.2.12.3, Interrupt Source Override §5.2.12.5, Local APIC NMI §5.2.12.7);
the DSDT is AML (§20.2) built by :mod:`vmm.boot.aml`.  Each table is
checksummed so its bytes add up to 0 (mod 256).  The tables live in
``[layout.ACPI_START, layout.ACPI_END)``, the BIOS area Linux also scans
for the RSDP, which the e820 map reports reserved.
"""

from __future__ import annotations

import struct

from vmm import layout
from vmm.boot import BootError, aml
from vmm.memory import GuestMemory

OEM_ID = b"SPLITV"
OEM_TABLE_ID = b"SPLITVMM"
OEM_REVISION = 1
CREATOR_ID = b"SVMM"
CREATOR_REVISION = 1

#: struct acpi_table_header (36 bytes): signature, length, revision,
#: checksum, OEM id, OEM table id, OEM revision, creator id and revision.
HEADER = struct.Struct("<4sIBB6s8sI4sI")
#: RSDP, ACPI 2.0+: signature, checksum, OEM id, revision, RSDT address,
#: length, XSDT address, extended checksum, reserved.
RSDP = struct.Struct("<8sB6sBIIQB3s")
assert HEADER.size == 36 and RSDP.size == 36

FADT_REVISION = 6
FADT_MINOR = 4
FADT_LENGTH = 276
FACS_LENGTH = 64
MADT_REVISION = 5

# FADT fields (offsets in the table; ACPI 6.4 table 5.9).
SCI_IRQ = 9
PM1A_EVT_BLK = layout.POWER_OFF_PORT - 4     # 0x600: PM1a status + enable (4 bytes)
PM1A_CNT_BLK = layout.POWER_OFF_PORT         # 0x604: SLP_TYP/SLP_EN, served by the VMM
FADT_WBINVD = 1 << 0
FADT_PROC_C1 = 1 << 2
FADT_PWR_BUTTON = 1 << 4
FADT_SLP_BUTTON = 1 << 5
FADT_RESET_REG_SUP = 1 << 10
#: IAPC_BOOT_ARCH: no VGA, no CMOS RTC; MSI is supported (bit 3 clear).
IAPC_VGA_NOT_PRESENT = 1 << 2
IAPC_CMOS_RTC_NOT_PRESENT = 1 << 5

# MADT.
MADT_PCAT_COMPAT = 1 << 0
MADT_LOCAL_APIC = 0
MADT_IO_APIC = 1
MADT_INT_SRC_OVERRIDE = 2
MADT_LOCAL_APIC_NMI = 4
LAPIC_ENABLED = 1 << 0
#: MPS INTI flags: polarity (bits 1:0) and trigger mode (bits 3:2).
MPS_ACTIVE_HIGH = 1
MPS_LEVEL = 3 << 2
MPS_EDGE = 1 << 2
IOAPIC_ID = 0xFE   # beyond any vCPU's APIC id (at most 254 vCPUs)


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` (with that byte 0) sum to 0 mod 256."""
    return (-sum(data)) & 0xFF


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A system description table: header + body, checksummed."""
    length = HEADER.size + len(body)
    head = HEADER.pack(signature, length, revision, 0, OEM_ID, OEM_TABLE_ID, OEM_REVISION,
                       CREATOR_ID, CREATOR_REVISION)
    raw = bytearray(head + body)
    raw[9] = checksum(raw)
    return bytes(raw)


def rsdp(xsdt_addr: int) -> bytes:
    raw = bytearray(RSDP.pack(b"RSD PTR ", 0, OEM_ID, 2, 0, RSDP.size, xsdt_addr, 0, b"\0\0\0"))
    raw[8] = checksum(raw[:20])
    raw[32] = checksum(raw)
    return bytes(raw)


def xsdt(entries: list[int]) -> bytes:
    return sdt(b"XSDT", 1, b"".join(struct.pack("<Q", e) for e in entries))


def gas_io(port: int, bits: int) -> bytes:
    """A Generic Address Structure (§5.2.3.2) for an I/O port."""
    access = {8: 1, 16: 2, 32: 3}[bits]
    return struct.pack("<BBBBQ", 1, bits, 0, access, port)


def facs() -> bytes:
    """FACS (§5.2.10): no checksum, 64 bytes, version 2."""
    return struct.pack("<4sIIIIIQB3sI24s", b"FACS", FACS_LENGTH, 0, 0, 0, 0, 0, 2, b"\0" * 3, 0, b"\0" * 24)


def fadt(dsdt_addr: int, facs_addr: int) -> bytes:
    """FADT revision 6: PM1a event/control blocks at 0x600/0x604, SCI on
    IRQ 9, no SMI command port (always in ACPI mode), no PM timer."""
    body = bytearray(FADT_LENGTH - HEADER.size)

    def put(offset: int, fmt: str, *values) -> None:
        struct.pack_into(fmt, body, offset - HEADER.size, *values)

    put(36, "<I", 0)                    # FIRMWARE_CTRL: 0, X_FIRMWARE_CTRL holds it (§5.2.9)
    put(40, "<I", dsdt_addr)            # DSDT
    put(45, "<B", 0)                    # Preferred_PM_Profile: unspecified
    put(46, "<H", SCI_IRQ)              # SCI_INT
    put(48, "<I", 0)                    # SMI_CMD: none, the hardware is in ACPI mode
    put(56, "<I", PM1A_EVT_BLK)         # PM1a_EVT_BLK
    put(64, "<I", PM1A_CNT_BLK)         # PM1a_CNT_BLK
    put(88, "<BB", 4, 2)                # PM1_EVT_LEN, PM1_CNT_LEN
    put(96, "<HH", 0x0FFF, 0x0FFF)      # P_LVL2_LAT, P_LVL3_LAT: C2/C3 not supported
    put(109, "<H", IAPC_VGA_NOT_PRESENT | IAPC_CMOS_RTC_NOT_PRESENT)
    put(112, "<I", FADT_WBINVD | FADT_PROC_C1 | FADT_PWR_BUTTON | FADT_SLP_BUTTON)
    put(131, "<B", FADT_MINOR)
    put(132, "<Q", facs_addr)           # X_FIRMWARE_CTRL
    put(140, "<Q", dsdt_addr)           # X_DSDT
    body[148 - HEADER.size:160 - HEADER.size] = gas_io(PM1A_EVT_BLK, 32)   # X_PM1a_EVT_BLK
    body[172 - HEADER.size:184 - HEADER.size] = gas_io(PM1A_CNT_BLK, 16)   # X_PM1a_CNT_BLK
    put(268, "<8s", b"SPLITVMM")        # Hypervisor Vendor Identity
    return sdt(b"FACP", FADT_REVISION, bytes(body))


def madt(nvcpus: int) -> bytes:
    """MADT: a local APIC per vCPU (APIC id = vCPU index), the IOAPIC
    (GSI 0-23), IRQ 0 -> GSI 2 and the SCI level-triggered, LINT1 = NMI."""
    out = [struct.pack("<II", layout.LAPIC_BASE, MADT_PCAT_COMPAT)]
    for i in range(nvcpus):
        out.append(struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, i, i, LAPIC_ENABLED))
    out.append(struct.pack("<BBBBII", MADT_IO_APIC, 12, IOAPIC_ID, 0, layout.IOAPIC_BASE, 0))
    out.append(struct.pack("<BBBBIH", MADT_INT_SRC_OVERRIDE, 10, 0, 0, 2, 0))
    out.append(struct.pack("<BBBBIH", MADT_INT_SRC_OVERRIDE, 10, 0, SCI_IRQ, SCI_IRQ,
                           MPS_ACTIVE_HIGH | MPS_LEVEL))
    out.append(struct.pack("<BBBHB", MADT_LOCAL_APIC_NMI, 6, 0xFF, 0, 1))
    return sdt(b"APIC", MADT_REVISION, b"".join(out))


def build(nvcpus: int, base: int = layout.ACPI_START) -> tuple[int, dict[str, tuple[int, bytes]]]:
    """Every table placed from ``base``: (RSDP address, {name: (address, bytes)})."""
    if not 1 <= nvcpus <= 254:
        raise BootError(f"{nvcpus} vCPUs: the MADT describes 1 to 254")
    placed: dict[str, tuple[int, bytes]] = {}
    cursor = base

    def put(name: str, data: bytes, align: int = 16) -> int:
        nonlocal cursor
        cursor = (cursor + align - 1) & ~(align - 1)
        placed[name] = (cursor, data)
        addr = cursor
        cursor += len(data)
        return addr

    # The RSDP's XSDT address is known only once the XSDT is placed: fix
    # the RSDP's slot first (it must be on a 16-byte boundary in the area).
    put("RSDP", bytes(RSDP.size))
    facs_addr = put("FACS", facs(), 64)
    dsdt_addr = put("DSDT", aml.dsdt())
    fadt_addr = put("FACP", fadt(dsdt_addr, facs_addr))
    madt_addr = put("APIC", madt(nvcpus))
    xsdt_addr = put("XSDT", xsdt([fadt_addr, madt_addr]))
    placed["RSDP"] = (base, rsdp(xsdt_addr))
    if cursor > layout.ACPI_END:
        raise BootError(f"ACPI tables of {cursor - base} bytes do not fit below {layout.ACPI_END:#x}")
    return base, placed


def write(memory: GuestMemory, nvcpus: int) -> int:
    """Write the tables into guest RAM; returns the RSDP's address."""
    rsdp_addr, tables = build(nvcpus)
    for addr, data in tables.values():
        if not memory.contains(addr, len(data)):
            raise BootError(f"ACPI table at {addr:#x} is outside guest RAM")
        memory.write(addr, data)
    return rsdp_addr
