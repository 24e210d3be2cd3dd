/* PCI for the project's test guests: configuration mechanism #1 through
 * ports 0xCF8/0xCFC (PCI Local Bus 3.0, 3.2.2.3.2), enumeration of bus 0,
 * BAR sizing and assignment, the COMMAND register, the capability list
 * and MSI-X table programming (PCI 3.0 6.8.2).  Runs in ring 3 (IOPL 3).
 * Register names follow linux/pci_regs.h.
 *
 * Not reentrant across vCPUs: CONFIG_ADDRESS is one register for the
 * machine, so only one vCPU at a time may use the pci_cfg_* calls. */
#ifndef SPLITVMM_PCI_H
#define SPLITVMM_PCI_H

#include "guest.h"

#define PCI_CONFIG_ADDRESS 0xcf8
#define PCI_CONFIG_DATA 0xcfc

#define PCI_VENDOR_ID 0x00
#define PCI_DEVICE_ID 0x02
#define PCI_COMMAND 0x04
#define PCI_COMMAND_IO 0x1
#define PCI_COMMAND_MEMORY 0x2
#define PCI_COMMAND_MASTER 0x4
#define PCI_COMMAND_INTX_DISABLE 0x400
#define PCI_STATUS 0x06
#define PCI_STATUS_INTERRUPT 0x08
#define PCI_STATUS_CAP_LIST 0x10
#define PCI_CLASS_REVISION 0x08
#define PCI_HEADER_TYPE 0x0e
#define PCI_BASE_ADDRESS_0 0x10
#define PCI_SUBSYSTEM_VENDOR_ID 0x2c
#define PCI_CAPABILITY_LIST 0x34
#define PCI_INTERRUPT_LINE 0x3c     /* firmware-owned: the GSI here */
#define PCI_INTERRUPT_PIN 0x3d      /* 0 none, 1 INTA# .. 4 INTD# */
#define PCI_BASE_ADDRESS_SPACE_IO 0x1
#define PCI_BASE_ADDRESS_MEM_TYPE_64 0x4
#define PCI_CAP_ID_MSIX 0x11
#define PCI_MSIX_FLAGS 2
#define PCI_MSIX_FLAGS_QSIZE 0x7ff
#define PCI_MSIX_FLAGS_MASKALL 0x4000
#define PCI_MSIX_FLAGS_ENABLE 0x8000
#define PCI_MSIX_TABLE 4
#define PCI_MSIX_PBA 8
#define PCI_MSIX_BIR 0x7
#define PCI_MSIX_ENTRY_VECTOR_CTRL 12
#define PCI_MSIX_ENTRY_CTRL_MASKBIT 1

/* bus:device.function as CONFIG_ADDRESS wants it (without enable, register). */
#define PCI_BDF(bus, dev, fn) ((uint32_t)(bus) << 16 | (uint32_t)(dev) << 11 | (uint32_t)(fn) << 8)

uint32_t pci_cfg_read32(uint32_t bdf, unsigned reg);
uint16_t pci_cfg_read16(uint32_t bdf, unsigned reg);
uint8_t pci_cfg_read8(uint32_t bdf, unsigned reg);
void pci_cfg_write32(uint32_t bdf, unsigned reg, uint32_t v);
void pci_cfg_write16(uint32_t bdf, unsigned reg, uint16_t v);
void pci_cfg_write8(uint32_t bdf, unsigned reg, uint8_t v);

/* A function found on bus 0. */
struct pci_dev {
    uint32_t bdf;
    uint16_t vendor, device;
    uint32_t class_rev;             /* class << 8 | revision */
};

/* Fills up to `max` functions of bus 0 (function 0 of every device, more
 * when the header says multi-function); returns how many. */
unsigned pci_scan(struct pci_dev *out, unsigned max);
/* The first function with these IDs, or 0 (bdf 0 is the host bridge,
 * so never a match for a device). */
int pci_find(uint16_t vendor, uint16_t device, struct pci_dev *out);

struct pci_bar {
    uint64_t address;
    uint64_t size;                  /* 0: BAR not implemented */
    int io, is64, prefetch;
};
/* Sizes BAR `index` (decode is switched off around it and restored) and
 * returns its current address and size. */
void pci_bar_probe(uint32_t bdf, unsigned index, struct pci_bar *bar);
/* Writes a new address into BAR `index` (both halves of a 64-bit BAR,
 * low dword first), leaving COMMAND as it is. */
void pci_bar_set(uint32_t bdf, unsigned index, uint64_t address, int is64);
uint64_t pci_bar_address(uint32_t bdf, unsigned index);
/* Turns memory decode off and writes 0 into every memory BAR, so that a
 * driver assigns them itself (I/O BARs are left as they are). */
void pci_unassign_memory_bars(uint32_t bdf);
/* Sets / clears bits of COMMAND. */
void pci_command(uint32_t bdf, uint16_t set, uint16_t clear);
/* Offset of the first capability with this ID, or 0. */
unsigned pci_find_cap(uint32_t bdf, uint8_t id);

/* MSI-X: where the table and PBA are, once the BARs are assigned. */
struct pci_msix {
    unsigned cap, nvectors;
    uint64_t table, pba;
};
int pci_msix_init(uint32_t bdf, struct pci_msix *m);
void pci_msix_enable(uint32_t bdf, const struct pci_msix *m, int enable, int maskall);
void pci_msix_program(const struct pci_msix *m, unsigned n, uint64_t address, uint32_t data);
void pci_msix_mask(const struct pci_msix *m, unsigned n, int masked);
int pci_msix_pending(const struct pci_msix *m, unsigned n);

#endif
