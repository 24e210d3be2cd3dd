"""The DSDT, encoded in AML by hand (ACPI 6.4 §20.2 "AML Grammar
Definition", resource descriptors §6.4).

What it declares, as ASL would say it::

    Scope (\\_SB) {
        Device (PCI0) {                      // the host bridge of vmm.pci
            Name (_HID, EisaId ("PNP0A03"))
            Name (_UID, 0)
            Name (_BBN, 0)
            Name (_CRS, ResourceTemplate () {
                WordBusNumber (bus 0-255)
                IO (0xCF8, 8)                // configuration mechanism #1
                WordIO (0x0000-0x0CF7), WordIO (0x0D00-0xFFFF)
                DWordMemory (layout.PCI_MMIO_WINDOW .. PCI_MMIO_WINDOW_END - 1)
            })
            Name (_PRT, Package () { ... })  // INTx swizzle of layout.pci_intx_gsi
        }
        Device (COM1) {                      // the 16550A at 0x3f8, IRQ 4
            Name (_HID, EisaId ("PNP0501"))
            Name (_UID, 1)
            Name (_CRS, ResourceTemplate () { IO (0x3F8, 8) IRQNoFlags () {4} })
        }
    }
    Name (\\_S5, Package () { 0, 0, 0, 0 })   // soft-off: SLP_EN at PM1a_CNT
"""

from __future__ import annotations

import struct

from vmm import layout

ZERO_OP = 0x00
ONE_OP = 0x01
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82
ROOT_CHAR = 0x5C

COM1_PORT = 0x3F8
COM1_IRQ = 4
PCI_SLOTS = 32
DSDT_REVISION = 2


def pkg_length(body_len: int) -> bytes:
    """PkgLength (§20.2.4) of a package whose body is ``body_len`` bytes;
    the encoded length counts its own bytes."""
    for extra in range(4):
        total = body_len + 1 + extra
        if extra == 0 and total < 0x40:
            return bytes([total])
        if extra and total < 1 << (4 + 8 * extra):
            out = [(extra << 6) | (total & 0xF)]
            out += [(total >> (4 + 8 * i)) & 0xFF for i in range(extra)]
            return bytes(out)
    raise ValueError(f"AML package of {body_len} bytes is too long")


def name_seg(name: str) -> bytes:
    raw = name.encode("ascii")
    if not 1 <= len(raw) <= 4:
        raise ValueError(f"AML name {name!r}")
    return raw.ljust(4, b"_")


def name_string(path: str) -> bytes:
    """``\\_SB_`` or ``PCI0``: one segment, optionally rooted."""
    if path.startswith("\\"):
        return bytes([ROOT_CHAR]) + name_seg(path[1:])
    return name_seg(path)


def integer(value: int) -> bytes:
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    if value < 1 << 8:
        return bytes([BYTE_PREFIX, value])
    if value < 1 << 16:
        return bytes([WORD_PREFIX]) + struct.pack("<H", value)
    if value < 1 << 32:
        return bytes([DWORD_PREFIX]) + struct.pack("<I", value)
    raise ValueError(f"AML integer {value:#x} needs a QWord")


def name(path: str, data: bytes) -> bytes:
    return bytes([NAME_OP]) + name_string(path) + data


def package(elements: list[bytes]) -> bytes:
    body = bytes([len(elements)]) + b"".join(elements)
    return bytes([PACKAGE_OP]) + pkg_length(len(body)) + body


def buffer(data: bytes) -> bytes:
    body = integer(len(data)) + data
    return bytes([BUFFER_OP]) + pkg_length(len(body)) + body


def scope(path: str, terms: list[bytes]) -> bytes:
    body = name_string(path) + b"".join(terms)
    return bytes([SCOPE_OP]) + pkg_length(len(body)) + body


def device(path: str, terms: list[bytes]) -> bytes:
    body = name_string(path) + b"".join(terms)
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + pkg_length(len(body)) + body


def eisa_id(text: str) -> bytes:
    """EisaId ("PNP0A03"): three letters compressed to 5 bits each, four
    hex digits, stored big-endian in a DWord (§19.6.44)."""
    c = [ord(ch) - 0x40 for ch in text[:3]]
    value = (c[0] << 26) | (c[1] << 21) | (c[2] << 16) | int(text[3:], 16)
    return integer(struct.unpack("<I", struct.pack(">I", value))[0])


# -- resource descriptors (§6.4) -----------------------------------------

RES_MEMORY, RES_IO, RES_BUS = 0, 1, 2
#: General flags: MinFixed | MaxFixed, positive decode, producer.
ADDR_FIXED_PRODUCER = 0x0C
IO_ENTIRE_RANGE = 0x03
MEM_READ_WRITE = 0x01


def io_port(base: int, length: int) -> bytes:
    """I/O Port Descriptor, 16-bit decode, fixed base (§6.4.2.5)."""
    return struct.pack("<BBHHBB", 0x47, 1, base, base, 1, length)


def irq_no_flags(irq: int) -> bytes:
    """IRQ Descriptor without its flags byte (§6.4.2.1)."""
    return struct.pack("<BH", 0x22, 1 << irq)


def word_space(kind: int, type_flags: int, lo: int, hi: int) -> bytes:
    """Word Address Space Descriptor (§6.4.3.5.3)."""
    return struct.pack("<BHBBBHHHHH", 0x88, 13, kind, ADDR_FIXED_PRODUCER, type_flags,
                       0, lo, hi, 0, hi - lo + 1)


def dword_memory(lo: int, hi: int) -> bytes:
    """DWord Address Space Descriptor for memory, non-cacheable, RW (§6.4.3.5.2)."""
    return struct.pack("<BHBBBIIIII", 0x87, 23, RES_MEMORY, ADDR_FIXED_PRODUCER, MEM_READ_WRITE,
                       0, lo, hi, 0, hi - lo + 1)


def resource_template(descriptors: list[bytes]) -> bytes:
    """A Buffer of descriptors closed by an End Tag (checksum 0: ignored)."""
    return buffer(b"".join(descriptors) + bytes([0x79, 0]))


# -- the DSDT ----------------------------------------------------------------

def prt() -> bytes:
    """_PRT (§6.2.13): pin P (0 = INTA#) of every bus-0 slot to its GSI."""
    entries = []
    for slot in range(PCI_SLOTS):
        for pin in range(4):
            entries.append(package([integer((slot << 16) | 0xFFFF), integer(pin), integer(0),
                                    integer(layout.pci_intx_gsi(slot, pin + 1))]))
    return name("_PRT", package(entries))


def pci_host_bridge() -> bytes:
    crs = resource_template([
        word_space(RES_BUS, 0, 0, 0xFF),
        io_port(layout.PCI_CONFIG_ADDRESS, 8),
        word_space(RES_IO, IO_ENTIRE_RANGE, 0x0000, layout.PCI_CONFIG_ADDRESS - 1),
        word_space(RES_IO, IO_ENTIRE_RANGE, 0x0D00, 0xFFFF),
        dword_memory(layout.PCI_MMIO_WINDOW, layout.PCI_MMIO_WINDOW_END - 1),
    ])
    return device("PCI0", [name("_HID", eisa_id("PNP0A03")), name("_UID", integer(0)),
                           name("_BBN", integer(0)), name("_CRS", crs), prt()])


def com1() -> bytes:
    crs = resource_template([io_port(COM1_PORT, 8), irq_no_flags(COM1_IRQ)])
    return device("COM1", [name("_HID", eisa_id("PNP0501")), name("_UID", integer(1)), name("_CRS", crs)])


def dsdt() -> bytes:
    from vmm.boot.acpi import sdt
    body = scope("\\_SB", [pci_host_bridge(), com1()])
    body += name("\\_S5", package([integer(0)] * 4))
    return sdt(b"DSDT", DSDT_REVISION, body)
