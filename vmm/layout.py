"""Every fixed guest address and port the VMM uses, in one place.

Guest-physical memory map (x86, PC-like, no firmware):

================================  ==========================================
0x0000_0000 - 0x0009_fc00          RAM (the boot structures below live here)
0x000a_0000 - 0x0010_0000          RAM, reported reserved (legacy VGA/BIOS hole)
0x0010_0000 - MMIO_HOLE_START      RAM; PVH guests load at 1 MiB and up
MMIO_HOLE_START - 4 GiB            MMIO: devices, IOAPIC, LAPIC, KVM's TSS pages
4 GiB - ...                        RAM beyond what fits below the hole
================================  ==========================================
"""

from __future__ import annotations

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

PAGE_SIZE = 4 * KiB

# -- boot structures (written by vmm.boot) ----------------------------------

#: GDT of the 32-bit flat protected-mode state PVH vCPUs start in
#: (null, code, data, TSS descriptors; vmm.boot.x86).
BOOT_GDT = 0x0500
#: The PVH ``hvm_start_info`` (xen/include/public/arch-x86/hvm/start_info.h).
PVH_START_INFO = 0x6000
#: Its memory map: ``hvm_memmap_table_entry`` array, up to the command line.
PVH_MEMMAP = 0x6040
#: PVH module list (``hvm_modlist_entry``; the initrd), PVH_MODLIST_MAX entries.
PVH_MODLIST = 0x6F00
PVH_MODLIST_MAX = 8
#: The NUL-terminated guest command line, at most CMDLINE_MAX bytes with it.
PVH_CMDLINE = 0x7000
CMDLINE_MAX = 4 * KiB
#: Lowest address a guest image may occupy (above the boot structures).
BOOT_AREA_END = PVH_CMDLINE + CMDLINE_MAX

#: Linux 64-bit boot protocol (vmm.boot.bzimage): the zero page
#: (``struct boot_params``), the identity-mapping page tables (PML4, PDPT
#: and four page directories of 2 MiB pages: the low 4 GiB) and the
#: command line (up to LINUX_CMDLINE_MAX bytes with its NUL).  The 64-bit
#: GDT goes to BOOT_GDT.  All below EBDA_START, in RAM the e820 map reports.
LINUX_ZERO_PAGE = 0x0000_8000
LINUX_PML4 = 0x0000_9000
LINUX_PDPT = 0x0000_A000
LINUX_PD = 0x0000_B000
LINUX_CMDLINE = 0x0002_0000
LINUX_CMDLINE_MAX = 64 * KiB
#: Where the protected-mode kernel of a bzImage is loaded when it does not
#: ask for a higher (aligned) address: 16 MiB, Linux's own default.
LINUX_KERNEL_ADDR = 16 * MiB
#: ACPI tables written by the VMM (vmm.boot.acpi): the RSDP at the start of
#: the BIOS area Linux scans (ACPI 6.4 §5.2.5.1), the other tables after it;
#: inside the e820-reserved hole below 1 MiB.
ACPI_START = 0x000E_0000
ACPI_END = 0x0010_0000

#: End of conventional memory reported as RAM (the EBDA would start here).
EBDA_START = 0x9FC00
#: Start of "high" memory, where PVH images are linked.
HIMEM_START = 1 * MiB

# -- MMIO hole --------------------------------------------------------------

#: RAM stops here below 4 GiB; the rest of the 32-bit space is for MMIO.
MMIO_HOLE_START = 0xD000_0000
MMIO_HOLE_END = 4 * GiB
#: Where RAM that does not fit below the hole continues.
HIGH_RAM_START = 4 * GiB
#: In-kernel IOAPIC and local APIC (KVM_CREATE_IRQCHIP), never exits.
IOAPIC_BASE = 0xFEC0_0000
LAPIC_BASE = 0xFEE0_0000
#: PCI memory BARs: pre-assigned here, PCI_MMIO_PER_SLOT bytes per device
#: number (vmm.pci); the guest may move them anywhere.  Inside the hole,
#: clear of the addresses the echo tests use (0xD000_0000 and up).
PCI_MMIO_WINDOW = 0xE000_0000
PCI_MMIO_PER_SLOT = 1 * MiB
PCI_MMIO_WINDOW_END = PCI_MMIO_WINDOW + 32 * PCI_MMIO_PER_SLOT
#: The PCI apertures: where the guest may place memory BARs (32-bit: the
#: MMIO hole below the IOAPIC; 64-bit: above 4 GiB, below 2**48).  A BAR
#: region outside them is refused (vmm.windows).
PCI_MMIO32_APERTURE = MMIO_HOLE_START
PCI_MMIO32_APERTURE_END = IOAPIC_BASE
PCI_MMIO64_APERTURE = 4 * GiB
PCI_MMIO64_APERTURE_END = 1 << 48
#: Three pages KVM_SET_TSS_ADDR reserves (used by VMX for real mode).
KVM_TSS_ADDR = 0xFFFB_D000

# -- ports served by the VMM itself ------------------------------------------

#: Test exit, as QEMU's ``isa-debug-exit,iobase=0xf4``: a write of v ends
#: the run with status ``(v << 1) | 1``.
TEST_EXIT_PORT = 0xF4
TEST_EXIT_LENGTH = 4
#: ACPI PM1a control block as QEMU's q35/PIIX4 place it; a 16-bit write
#: with SLP_EN (bit 13) set powers the guest off (ACPI 6.4, 4.8.3.2.1).
POWER_OFF_PORT = 0x604
POWER_OFF_LENGTH = 2
POWER_OFF_SLP_EN = 1 << 13
#: splitvmm's own: a write stops the writing vCPU for good (the guest
#: library's park_cpu(); ring 3 cannot HLT).  The run ends cleanly once
#: every vCPU is parked.
VCPU_PARK_PORT = 0x0FF0
VCPU_PARK_LENGTH = 1
#: vmm.bench: the benchmark guest writes phase marks here, the host
#: timestamps them.
BENCH_MARK_PORT = 0x0FF8

# -- PCI configuration mechanism #1 (PCI Local Bus 3.0, 3.2.2.3.2) -------------

#: CONFIG_ADDRESS (dword) and CONFIG_DATA (bytes 0xCFC-0xCFF), VMM-local.
PCI_CONFIG_ADDRESS = 0xCF8
PCI_CONFIG_DATA = 0xCFC
#: PCI I/O BARs: pre-assigned here, PCI_IO_PER_SLOT ports per device number.
PCI_IO_WINDOW = 0xC000
PCI_IO_PER_SLOT = 0x200
PCI_IO_WINDOW_END = PCI_IO_WINDOW + 32 * PCI_IO_PER_SLOT
#: Where the guest may place I/O BARs: above the legacy and VMM ports.
PCI_IO_APERTURE = 0x1000
PCI_IO_APERTURE_END = 0x10000

# -- PCI INTx (PCI Local Bus 3.0, 2.2.6 and 6.2.4) ----------------------------

#: The INTx# pins of the devices on bus 0 are wired to IOAPIC inputs
#: PCI_INTX_GSI_BASE .. + PCI_INTX_LINES - 1 (GSI 16-19: the IOAPIC pins no
#: ISA IRQ uses; KVM's default routing sends them to the IOAPIC only), with
#: the classic swizzle (PCI-to-PCI Bridge Architecture 1.2, 9.1): pin P
#: (1 = INTA#) of device N goes to input 16 + (N + P - 1) % 4, so INTA# of
#: slot N is GSI 16 + N % 4.  vmm.pci tells each device model the GSI of
#: its INTA# (``intx_gsi=``); the model pre-sets its Interrupt Line register
#: to it, as firmware would.  Devices on slots N and N + 4 share a line.
PCI_INTX_GSI_BASE = 16
PCI_INTX_LINES = 4


def pci_intx_gsi(slot: int, pin: int = 1) -> int:
    """The GSI (IOAPIC input) that INTx pin ``pin`` (1-4, INTA#-INTD#) of
    bus-0 device ``slot`` is wired to (the swizzle above)."""
    if not 1 <= pin <= 4:
        raise ValueError(f"interrupt pin {pin} (1-4: INTA#-INTD#)")
    return PCI_INTX_GSI_BASE + (slot + pin - 1) % PCI_INTX_LINES


# -- limits ------------------------------------------------------------------

MIN_MEMORY = 2 * MiB
MAX_MEMORY = 1 << 40
