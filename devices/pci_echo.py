"""The ``pci-echo`` test device: the echo register file behind PCI BARs,
plus MSI-X, to exercise the PCI model from a guest.

``--device pci-echo[,slot=N][,vectors=N]``.  Function ``00:N.0``
(vendor :data:`VENDOR_ID`, device :data:`DEVICE_ID`, class 0xFF0000
"unassigned"), with

===== ============= ====================================================
BAR   kind, size    contents
===== ============= ====================================================
0     mem32, 4 KiB  0x000-0x0FF: the echo register file (devices.echo;
                    the move register 0xF8 is ignored: BARs move through
                    configuration space); 0x100-0x113: :data:`REG_RAISE`,
                    :data:`REG_CONFLICT`, :data:`REG_DELIVERED`,
                    :data:`REG_ACK`, :data:`REG_INTX_SENT`; the rest
                    reads all ones
1     I/O, 256      the echo register file (move ignored), except
                    0xFC: :data:`REG_CONFLICT` again (read 4)
2-3   mem64, 4 KiB  MSI-X table at :data:`MSIX_TABLE`, PBA at
                    :data:`MSIX_PBA`
===== ============= ====================================================

One capability: MSI-X with ``vectors`` entries (default 4).  Interrupt
pin INTA# (1), wired where the VMM says (``intx_gsi=``, which the
Interrupt Line register starts with).  A write to :data:`REG_RAISE` sends
MSI-X vector N while MSI-X is enabled, else sets the interrupt condition
and asserts INTx# (devices.pci, "Interrupts"); the condition lasts until
the guest acknowledges it by writing :data:`REG_ACK`.
"""

from __future__ import annotations

from devices.base import BadParameter, DeviceHost, all_ones, parse_int
from devices.echo import RegisterFile
from devices.pci import Bar, BarKind, PciDevice

#: splitvmm's own IDs: 0x5356 is "SV" in ASCII, not a PCI-SIG assignment;
#: fine for a test VMM's private devices, never for hardware.
VENDOR_ID = 0x5356
DEVICE_ID = 0x0002
CLASS_CODE = 0xFF0000

BAR_REGS = 0
BAR_IO = 1
BAR_MSIX = 2
REGS_SIZE = 0x1000
IO_SIZE = 0x100
MSIX_BAR_SIZE = 0x1000
MSIX_TABLE = 0x000
MSIX_PBA = 0x800

#: BAR 0, write 4: raise MSI-X vector N (the value written) while MSI-X is
#: enabled; otherwise INTx (the value is ignored).
REG_RAISE = 0x100
#: BAR 0, read 4: bit mask of BARs waiting for a conflicting range to be
#: freed (devices.pci, "overlaps").
REG_CONFLICT = 0x104
#: BAR 1, read 4: the same mask (BAR 0 may be the conflicted one).
IO_REG_CONFLICT = 0xFC
#: BAR 0, read 4: MSI-X deliveries so far.
REG_DELIVERED = 0x108
#: BAR 0, 4 bytes: read 1 while the INTx interrupt condition is set (as
#: STATUS.Interrupt_Status), else 0; a write (any value) acknowledges it:
#: the condition and Interrupt_Status clear, INTx# is released.
REG_ACK = 0x10C
#: BAR 0, read 4: INTx edges sent so far.
REG_INTX_SENT = 0x110

DEFAULT_VECTORS = 4
MAX_VECTORS = 64


class PciEcho(PciDevice):
    kind = "pci-echo"
    vendor_id = VENDOR_ID
    device_id = DEVICE_ID
    class_code = CLASS_CODE
    subsystem_vendor_id = VENDOR_ID
    subsystem_id = DEVICE_ID
    interrupt_pin = 1

    def __init__(self, host: DeviceHost, **params: str):
        vectors = params.pop("vectors", None)
        super().__init__(host, **params)
        nvec = DEFAULT_VECTORS if vectors is None else parse_int(self.kind, "vectors", vectors)
        if not 1 <= nvec <= MAX_VECTORS:
            raise BadParameter(f"{self.kind}: vectors={nvec} (1 to {MAX_VECTORS})")
        self.add_bar(BAR_REGS, BarKind.MEM32, REGS_SIZE)
        self.add_bar(BAR_IO, BarKind.IO, IO_SIZE)
        self.add_bar(BAR_MSIX, BarKind.MEM64, MSIX_BAR_SIZE)
        self.add_msix(nvec, BAR_MSIX, MSIX_TABLE, MSIX_PBA)
        self.regs = RegisterFile()

    # -- snapshot: the register file (the PCI state is devices.pci's) --------

    def model_state(self) -> dict:
        return self.regs.snapshot()

    def check_model_state(self, state: object, where: str) -> object:
        return RegisterFile.check(state, where)

    def load_model_state(self, checked: object) -> None:
        self.regs.load(checked)  # type: ignore[arg-type]  # what check_model_state returned

    def bar_read(self, bar: Bar, offset: int, size: int) -> int:
        if bar.index == BAR_IO:
            if offset == IO_REG_CONFLICT and size == 4:
                return self.conflicted()
            return self.regs.read(offset, size, (1, 2, 4), self.host.process_id)
        if bar.index == BAR_REGS:
            if offset < IO_SIZE:
                return self.regs.read(offset, size, (1, 2, 4, 8), self.host.process_id)
            if size == 4 and offset == REG_CONFLICT:
                return self.conflicted()
            if size == 4 and offset == REG_DELIVERED and self.msix is not None:
                return self.msix.delivered & 0xFFFF_FFFF
            if size == 4 and offset == REG_ACK:
                return int(self.intx_pending)
            if size == 4 and offset == REG_INTX_SENT:
                return self.intx_sent & 0xFFFF_FFFF
        return all_ones(size)

    def bar_write(self, bar: Bar, offset: int, size: int, value: int) -> None:
        if bar.index == BAR_IO:
            self.regs.write(offset, size, (1, 2, 4), value)
        elif bar.index == BAR_REGS:
            if offset < IO_SIZE:
                self.regs.write(offset, size, (1, 2, 4, 8), value)
            elif offset == REG_RAISE and size == 4:
                self.raise_interrupt(value)
            elif offset == REG_ACK and size == 4:
                self.deassert_intx()

