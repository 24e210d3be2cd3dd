/* PCI configuration mechanism #1, enumeration, BARs, capabilities and
 * MSI-X for the test guests (see pci.h). */
#include "pci.h"

#define CONFIG_ENABLE 0x80000000u

static void select_reg(uint32_t bdf, unsigned reg)
{
    outl(PCI_CONFIG_ADDRESS, CONFIG_ENABLE | bdf | (reg & 0xfc));
}

uint32_t pci_cfg_read32(uint32_t bdf, unsigned reg)
{
    select_reg(bdf, reg);
    return inl(PCI_CONFIG_DATA);
}

uint16_t pci_cfg_read16(uint32_t bdf, unsigned reg)
{
    select_reg(bdf, reg);
    return inw((uint16_t)(PCI_CONFIG_DATA + (reg & 2)));
}

uint8_t pci_cfg_read8(uint32_t bdf, unsigned reg)
{
    select_reg(bdf, reg);
    return inb((uint16_t)(PCI_CONFIG_DATA + (reg & 3)));
}

void pci_cfg_write32(uint32_t bdf, unsigned reg, uint32_t v)
{
    select_reg(bdf, reg);
    outl(PCI_CONFIG_DATA, v);
}

void pci_cfg_write16(uint32_t bdf, unsigned reg, uint16_t v)
{
    select_reg(bdf, reg);
    outw((uint16_t)(PCI_CONFIG_DATA + (reg & 2)), v);
}

void pci_cfg_write8(uint32_t bdf, unsigned reg, uint8_t v)
{
    select_reg(bdf, reg);
    outb((uint16_t)(PCI_CONFIG_DATA + (reg & 3)), v);
}

unsigned pci_scan(struct pci_dev *out, unsigned max)
{
    unsigned n = 0;
    for (unsigned dev = 0; dev < 32; dev++) {
        for (unsigned fn = 0; fn < 8; fn++) {
            uint32_t bdf = PCI_BDF(0, dev, fn);
            uint32_t id = pci_cfg_read32(bdf, PCI_VENDOR_ID);
            if ((id & 0xffff) == 0xffff) {
                if (fn == 0)
                    break;
                continue;
            }
            if (n < max) {
                out[n].bdf = bdf;
                out[n].vendor = (uint16_t)id;
                out[n].device = (uint16_t)(id >> 16);
                out[n].class_rev = pci_cfg_read32(bdf, PCI_CLASS_REVISION);
            }
            n++;
            if (fn == 0 && !(pci_cfg_read8(bdf, PCI_HEADER_TYPE) & 0x80))
                break;
        }
    }
    return n < max ? n : max;
}

int pci_find(uint16_t vendor, uint16_t device, struct pci_dev *out)
{
    struct pci_dev devs[32];
    unsigned n = pci_scan(devs, 32);
    for (unsigned i = 0; i < n; i++)
        if (devs[i].vendor == vendor && devs[i].device == device) {
            *out = devs[i];
            return 1;
        }
    return 0;
}

uint64_t pci_bar_address(uint32_t bdf, unsigned index)
{
    unsigned reg = PCI_BASE_ADDRESS_0 + 4 * index;
    uint32_t lo = pci_cfg_read32(bdf, reg);
    if (lo & PCI_BASE_ADDRESS_SPACE_IO)
        return lo & ~3u;
    uint64_t a = lo & ~0xfu;
    if (lo & PCI_BASE_ADDRESS_MEM_TYPE_64)
        a |= (uint64_t)pci_cfg_read32(bdf, reg + 4) << 32;
    return a;
}

void pci_bar_probe(uint32_t bdf, unsigned index, struct pci_bar *bar)
{
    unsigned reg = PCI_BASE_ADDRESS_0 + 4 * index;
    uint16_t cmd = pci_cfg_read16(bdf, PCI_COMMAND);
    pci_cfg_write16(bdf, PCI_COMMAND, cmd & ~(PCI_COMMAND_IO | PCI_COMMAND_MEMORY));
    uint32_t lo = pci_cfg_read32(bdf, reg);
    memset(bar, 0, sizeof *bar);
    bar->io = lo & PCI_BASE_ADDRESS_SPACE_IO;
    bar->is64 = !bar->io && (lo & PCI_BASE_ADDRESS_MEM_TYPE_64);
    bar->prefetch = !bar->io && (lo & 0x8);
    uint32_t hi = bar->is64 ? pci_cfg_read32(bdf, reg + 4) : 0;
    pci_cfg_write32(bdf, reg, 0xffffffffu);
    uint32_t slo = pci_cfg_read32(bdf, reg);
    uint64_t mask = slo & (bar->io ? ~3u : ~0xfu);
    if (bar->is64) {
        pci_cfg_write32(bdf, reg + 4, 0xffffffffu);
        mask |= (uint64_t)pci_cfg_read32(bdf, reg + 4) << 32;
        pci_cfg_write32(bdf, reg + 4, hi);
    } else {
        mask |= 0xffffffff00000000ull;
        if (bar->io && !(mask & 0xffff0000u))
            mask |= 0xffff0000u;        /* 16-bit I/O decode */
    }
    pci_cfg_write32(bdf, reg, lo);
    bar->size = (mask & 0xffffffffull) == 0 && !bar->is64 ? 0 : ~mask + 1;
    bar->address = bar->io ? (lo & ~3u) : ((lo & ~0xfu) | (uint64_t)hi << 32);
    pci_cfg_write16(bdf, PCI_COMMAND, cmd);
}

void pci_bar_set(uint32_t bdf, unsigned index, uint64_t address, int is64)
{
    unsigned reg = PCI_BASE_ADDRESS_0 + 4 * index;
    pci_cfg_write32(bdf, reg, (uint32_t)address);
    if (is64)
        pci_cfg_write32(bdf, reg + 4, (uint32_t)(address >> 32));
}

void pci_unassign_memory_bars(uint32_t bdf)
{
    pci_command(bdf, 0, PCI_COMMAND_MEMORY);
    for (unsigned i = 0; i < 6; i++) {
        struct pci_bar bar;
        pci_bar_probe(bdf, i, &bar);
        if (bar.size && !bar.io)
            pci_bar_set(bdf, i, 0, bar.is64);
        if (bar.is64)
            i++;
    }
}

void pci_command(uint32_t bdf, uint16_t set, uint16_t clear)
{
    uint16_t cmd = pci_cfg_read16(bdf, PCI_COMMAND);
    pci_cfg_write16(bdf, PCI_COMMAND, (uint16_t)((cmd & ~clear) | set));
}

unsigned pci_find_cap(uint32_t bdf, uint8_t id)
{
    if (!(pci_cfg_read16(bdf, PCI_STATUS) & PCI_STATUS_CAP_LIST))
        return 0;
    unsigned off = pci_cfg_read8(bdf, PCI_CAPABILITY_LIST) & 0xfc;
    for (int i = 0; off && i < 48; i++) {     /* bounded: a loop in the list ends here */
        if (pci_cfg_read8(bdf, off) == id)
            return off;
        off = pci_cfg_read8(bdf, off + 1) & 0xfc;
    }
    return 0;
}

int pci_msix_init(uint32_t bdf, struct pci_msix *m)
{
    unsigned cap = pci_find_cap(bdf, PCI_CAP_ID_MSIX);
    if (!cap)
        return 0;
    m->cap = cap;
    m->nvectors = (pci_cfg_read16(bdf, cap + PCI_MSIX_FLAGS) & PCI_MSIX_FLAGS_QSIZE) + 1;
    uint32_t t = pci_cfg_read32(bdf, cap + PCI_MSIX_TABLE);
    uint32_t p = pci_cfg_read32(bdf, cap + PCI_MSIX_PBA);
    m->table = pci_bar_address(bdf, t & PCI_MSIX_BIR) + (t & ~PCI_MSIX_BIR);
    m->pba = pci_bar_address(bdf, p & PCI_MSIX_BIR) + (p & ~PCI_MSIX_BIR);
    return 1;
}

void pci_msix_enable(uint32_t bdf, const struct pci_msix *m, int enable, int maskall)
{
    uint16_t f = pci_cfg_read16(bdf, m->cap + PCI_MSIX_FLAGS);
    f &= (uint16_t)~(PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL);
    if (enable)
        f |= PCI_MSIX_FLAGS_ENABLE;
    if (maskall)
        f |= PCI_MSIX_FLAGS_MASKALL;
    pci_cfg_write16(bdf, m->cap + PCI_MSIX_FLAGS, f);
}

void pci_msix_program(const struct pci_msix *m, unsigned n, uint64_t address, uint32_t data)
{
    uint64_t e = m->table + 16ull * n;
    mmio_write32(e + 0, (uint32_t)address);
    mmio_write32(e + 4, (uint32_t)(address >> 32));
    mmio_write32(e + 8, data);
}

void pci_msix_mask(const struct pci_msix *m, unsigned n, int masked)
{
    uint64_t e = m->table + 16ull * n + PCI_MSIX_ENTRY_VECTOR_CTRL;
    uint32_t c = mmio_read32(e);
    mmio_write32(e, masked ? (c | PCI_MSIX_ENTRY_CTRL_MASKBIT) : (c & ~PCI_MSIX_ENTRY_CTRL_MASKBIT));
}

int pci_msix_pending(const struct pci_msix *m, unsigned n)
{
    uint64_t q = mmio_read64(m->pba + 8ull * (n / 64));
    return (int)((q >> (n % 64)) & 1);
}
