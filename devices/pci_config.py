"""PCI configuration registers: names and bits (as ``linux/pci_regs.h``
names them; sections of the PCI Local Bus Specification 3.0, "PCI 3.0"),
the 256 bytes of a function's configuration space with their write rules,
and the BAR description.  No regions and no host here: devices.pci does
that."""

from __future__ import annotations

import dataclasses
import enum

from devices.base import Space, all_ones

# -- type-0 header (PCI 3.0 6.1, figure 6-1) -------------------------------

PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_REVISION_ID = 0x08
PCI_CLASS_PROG = 0x09
PCI_CLASS_DEVICE = 0x0A
PCI_CACHE_LINE_SIZE = 0x0C
PCI_LATENCY_TIMER = 0x0D
PCI_HEADER_TYPE = 0x0E
PCI_BASE_ADDRESS_0 = 0x10
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_ROM_ADDRESS = 0x30
PCI_CAPABILITY_LIST = 0x34
PCI_INTERRUPT_LINE = 0x3C
PCI_INTERRUPT_PIN = 0x3D

PCI_HEADER_TYPE_NORMAL = 0x00
#: The 256-byte configuration space of conventional PCI; the function's
#: 4 KiB window (PCIe extended space) reads 0 beyond it.
PCI_CFG_SPACE_SIZE = 0x100
PCI_CFG_SPACE_EXP_SIZE = 0x1000
#: Capabilities live after the header (PCI 3.0 6.7).
PCI_STD_HEADER_SIZEOF = 0x40

# COMMAND (PCI 3.0 6.2.2)
PCI_COMMAND_IO = 0x001
PCI_COMMAND_MEMORY = 0x002
PCI_COMMAND_MASTER = 0x004
PCI_COMMAND_PARITY = 0x040
PCI_COMMAND_SERR = 0x100
PCI_COMMAND_INTX_DISABLE = 0x400
#: The COMMAND bits this model implements; the others are hardwired to 0.
COMMAND_WRITABLE = (PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_PARITY
                    | PCI_COMMAND_SERR | PCI_COMMAND_INTX_DISABLE)

# STATUS (PCI 3.0 6.2.3): read-only bits and write-1-to-clear error bits.
PCI_STATUS_INTERRUPT = 0x0008
PCI_STATUS_CAP_LIST = 0x0010
PCI_STATUS_PARITY = 0x0100
PCI_STATUS_SIG_TARGET_ABORT = 0x0800
PCI_STATUS_REC_TARGET_ABORT = 0x1000
PCI_STATUS_REC_MASTER_ABORT = 0x2000
PCI_STATUS_SIG_SYSTEM_ERROR = 0x4000
PCI_STATUS_DETECTED_PARITY = 0x8000
STATUS_W1C = (PCI_STATUS_PARITY | PCI_STATUS_SIG_TARGET_ABORT | PCI_STATUS_REC_TARGET_ABORT
              | PCI_STATUS_REC_MASTER_ABORT | PCI_STATUS_SIG_SYSTEM_ERROR | PCI_STATUS_DETECTED_PARITY)

# Base address registers (PCI 3.0 6.2.5.1)
PCI_BASE_ADDRESS_SPACE_IO = 0x01
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x04
PCI_BASE_ADDRESS_MEM_PREFETCH = 0x08
PCI_BASE_ADDRESS_IO_MASK = ~0x3 & 0xFFFF_FFFF
PCI_BASE_ADDRESS_MEM_MASK = ~0xF & 0xFFFF_FFFF
PCI_NUM_BARS = 6

# Capabilities (PCI 3.0 6.7, appendix H)
PCI_CAP_LIST_ID = 0
PCI_CAP_LIST_NEXT = 1
PCI_CAP_ID_MSIX = 0x11

# MSI-X (PCI 3.0 6.8.2)
PCI_MSIX_FLAGS = 2
PCI_MSIX_FLAGS_QSIZE = 0x07FF
PCI_MSIX_FLAGS_MASKALL = 0x4000
PCI_MSIX_FLAGS_ENABLE = 0x8000
PCI_MSIX_TABLE = 4
PCI_MSIX_PBA = 8
PCI_MSIX_BIR = 0x7
PCI_CAP_MSIX_SIZEOF = 12
PCI_MSIX_ENTRY_SIZE = 16
PCI_MSIX_ENTRY_LOWER_ADDR = 0
PCI_MSIX_ENTRY_UPPER_ADDR = 4
PCI_MSIX_ENTRY_DATA = 8
PCI_MSIX_ENTRY_VECTOR_CTRL = 12
PCI_MSIX_ENTRY_CTRL_MASKBIT = 0x1
MSIX_MAX_VECTORS = 2048

#: Highest device number on a bus (PCI 3.0 3.2.2.3.2).
MAX_SLOT = 31


def config_address(bus: int, device: int, function: int, offset: int = 0) -> int:
    """Key of a configuration register on ``Space.PCI``: the ECAM order
    ``ipc.pci_address`` uses (PCIe 6.0 7.2.2), repeated here because
    ``devices`` imports no other package of the project."""
    if not (0 <= bus < 256 and 0 <= device <= MAX_SLOT and 0 <= function < 8
            and 0 <= offset < PCI_CFG_SPACE_EXP_SIZE):
        raise ValueError(f"bad PCI address {bus:#x}:{device:#x}.{function} +{offset:#x}")
    return bus << 20 | device << 15 | function << 12 | offset




class BarKind(enum.Enum):
    IO = "io"
    MEM32 = "mem32"
    MEM64 = "mem64"


@dataclasses.dataclass
class Bar:
    """One base address register and the region it decodes."""

    index: int
    kind: BarKind
    size: int
    prefetchable: bool = False
    #: Base currently registered, or None.
    mapped: int | None = None
    #: Base the BAR asks for but another region holds (module docstring).
    conflict: int | None = None
    #: Memory BAR whose region is claimed with ``coalesce=True``
    #: (DeviceHost.claim: guest writes may be queued; the zone moves with
    #: the BAR).
    coalesce: bool = False

    @property
    def space(self) -> Space:
        return Space.PIO if self.kind is BarKind.IO else Space.MMIO

    @property
    def flags(self) -> int:
        """The read-only low bits of the BAR (PCI 3.0 6.2.5.1)."""
        if self.kind is BarKind.IO:
            return PCI_BASE_ADDRESS_SPACE_IO
        f = PCI_BASE_ADDRESS_MEM_TYPE_64 if self.kind is BarKind.MEM64 else 0
        return f | (PCI_BASE_ADDRESS_MEM_PREFETCH if self.prefetchable else 0)

    @property
    def decode_bit(self) -> int:
        return PCI_COMMAND_IO if self.kind is BarKind.IO else PCI_COMMAND_MEMORY

    @property
    def offset(self) -> int:
        return PCI_BASE_ADDRESS_0 + 4 * self.index

    @property
    def width(self) -> int:
        """Bytes of configuration space the BAR takes (8 for 64-bit)."""
        return 8 if self.kind is BarKind.MEM64 else 4


class ConfigSpace:
    """256 bytes of configuration registers with per-bit write rules: a
    write mask (bits software may change) and a write-1-to-clear mask,
    like QEMU's ``wmask``/``w1cmask``.  Knows nothing of regions."""

    def __init__(self) -> None:
        self.data = bytearray(PCI_CFG_SPACE_SIZE)
        self.wmask = bytearray(PCI_CFG_SPACE_SIZE)
        self.w1cmask = bytearray(PCI_CFG_SPACE_SIZE)

    def get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.data[offset:offset + size], "little")

    def set(self, offset: int, size: int, value: int) -> None:
        """Set a register's value as the device (no write rules)."""
        self.data[offset:offset + size] = (value & all_ones(size)).to_bytes(size, "little")

    def set_wmask(self, offset: int, size: int, mask: int) -> None:
        self.wmask[offset:offset + size] = (mask & all_ones(size)).to_bytes(size, "little")

    def set_w1cmask(self, offset: int, size: int, mask: int) -> None:
        self.w1cmask[offset:offset + size] = (mask & all_ones(size)).to_bytes(size, "little")

    def read(self, offset: int, size: int) -> int:
        """A guest read; beyond the 256 bytes it reads 0 (no extended
        capabilities, PCIe 6.0 7.6.3)."""
        if offset >= PCI_CFG_SPACE_SIZE:
            return 0
        return self.get(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        """A guest write, bit by bit as the masks say."""
        for i in range(size):
            at = offset + i
            if at >= PCI_CFG_SPACE_SIZE:
                return
            v = (value >> (8 * i)) & 0xFF
            wm, w1c = self.wmask[at], self.w1cmask[at]
            self.data[at] = ((self.data[at] & ~wm) | (v & wm)) & ~(v & w1c) & 0xFF
