/* A minimal modern virtio-pci driver for the test guests (virtio 1.2
 * §3.1.1, §4.1.4, §2.7), header-only, on purpose independent of the
 * project's driver library: find the capabilities, negotiate
 * VIRTIO_F_VERSION_1, set up queue 0 (QSZ entries, in guest RAM), post
 * chains and wait for the used ring.  One device per guest. */
#ifndef VIRTIO_MIN_H
#define VIRTIO_MIN_H

#include "guest.h"
#include "pci.h"

#define PCI_CAP_ID_VNDR 0x09
#define CAP_COMMON 1
#define CAP_NOTIFY 2
#define CAP_ISR 3
#define CAP_DEVICE 4
#define S_ACK 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_NEEDS_RESET 0x40
/* struct virtio_pci_common_cfg */
#define DFSELECT 0x00
#define DF 0x04
#define GFSELECT 0x08
#define GF 0x0c
#define CFG_MSIX 0x10
#define NUMQ 0x12
#define STATUS 0x14
#define Q_SELECT 0x16
#define Q_SIZE 0x18
#define Q_MSIX 0x1a
#define Q_ENABLE 0x1c
#define Q_NOFF 0x1e
#define Q_DESC 0x20
#define Q_AVAIL 0x28
#define Q_USED 0x30
#define NO_VECTOR 0xffff
#define F_NEXT 1
#define F_WRITE 2
#define QSZ 8
#define SPINS 200000000ull
#define STATS_REG 0x3800     /* splitvmm's counters in BAR 0 */

#define VCHECK(n, cond) do { if (!(cond)) test_exit(n); } while (0)

struct desc { uint64_t addr; uint32_t len; uint16_t flags, next; };
struct avail { uint16_t flags, idx, ring[QSZ], used_event; };
struct used_elem { uint32_t id, len; };
struct used { uint16_t flags, idx; struct used_elem ring[QSZ]; uint16_t avail_event; };

static struct desc descs[QSZ] __attribute__((aligned(16)));
static struct avail avail __attribute__((aligned(4)));
static struct used used __attribute__((aligned(4)));

static uint32_t bdf;
static uint64_t bar0, common, notify_base, isr, devcfg;
static uint32_t common_off, notify_off_cap, notify_mult, isr_off, dev_off, qnotify_off;
static uint16_t last_used;
static int use_msix;
static uint64_t kicks;          /* doorbell writes so far */

static inline void vm_find_caps(void)
{
    unsigned at = pci_cfg_read8(bdf, PCI_CAPABILITY_LIST);
    for (int guard = 0; at && guard < 48; guard++) {
        if (pci_cfg_read8(bdf, at) == PCI_CAP_ID_VNDR) {
            uint8_t type = pci_cfg_read8(bdf, at + 3);
            uint32_t off = pci_cfg_read32(bdf, at + 8);
            VCHECK(3, pci_cfg_read8(bdf, at + 4) == 0);      /* all in BAR 0 */
            if (type == CAP_COMMON) common_off = off;
            if (type == CAP_ISR) isr_off = off;
            if (type == CAP_DEVICE) dev_off = off;
            if (type == CAP_NOTIFY) {
                notify_off_cap = off;
                notify_mult = pci_cfg_read32(bdf, at + 16);
            }
        }
        at = pci_cfg_read8(bdf, at + 1);
    }
    VCHECK(4, notify_mult != 0);
}

static inline void vm_locate(uint64_t base)
{
    bar0 = base;
    common = bar0 + common_off;
    isr = bar0 + isr_off;
    devcfg = bar0 + dev_off;
    notify_base = bar0 + notify_off_cap + (uint64_t)qnotify_off * notify_mult;
}

/* Reset, negotiate VERSION_1 only, queue 0 with QSZ entries, DRIVER_OK. */
static inline void vm_setup(void)
{
    mmio_write8(common + STATUS, 0);
    VCHECK(5, mmio_read8(common + STATUS) == 0);
    mmio_write8(common + STATUS, S_ACK | S_DRIVER);
    mmio_write32(common + DFSELECT, 1);
    VCHECK(6, mmio_read32(common + DF) & 1);                  /* VIRTIO_F_VERSION_1 */
    mmio_write32(common + GFSELECT, 0);
    mmio_write32(common + GF, 0);
    mmio_write32(common + GFSELECT, 1);
    mmio_write32(common + GF, 1);
    mmio_write8(common + STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    VCHECK(7, mmio_read8(common + STATUS) & S_FEATURES_OK);
    mmio_write16(common + Q_SELECT, 0);
    VCHECK(9, mmio_read16(common + Q_SIZE) >= QSZ);
    mmio_write16(common + Q_SIZE, QSZ);
    mmio_write64(common + Q_DESC, (uintptr_t)descs);
    mmio_write64(common + Q_AVAIL, (uintptr_t)&avail);
    mmio_write64(common + Q_USED, (uintptr_t)&used);
    if (use_msix) {
        mmio_write16(common + CFG_MSIX, 1);
        VCHECK(10, mmio_read16(common + CFG_MSIX) == 1);
        mmio_write16(common + Q_MSIX, 0);
        VCHECK(11, mmio_read16(common + Q_MSIX) == 0);
    } else {
        mmio_write16(common + Q_MSIX, NO_VECTOR);
    }
    qnotify_off = mmio_read16(common + Q_NOFF);
    memset(descs, 0, sizeof descs);
    memset(&avail, 0, sizeof avail);
    memset(&used, 0, sizeof used);
    last_used = 0;
    mmio_write16(common + Q_ENABLE, 1);
    VCHECK(12, mmio_read16(common + Q_ENABLE) == 1);
    mmio_write8(common + STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    VCHECK(13, mmio_read8(common + STATUS) == (S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK));
    vm_locate(bar0);
}

static inline void vm_kick(void)
{
    kicks++;
    mmio_write16(notify_base, 0);
}

/* splitvmm's counters (BAR 0 + STATS_REG): doorbells seen through the
 * ioeventfd and as MMIO writes.  A request may complete before the device
 * has counted its doorbell (it serves what is available), so wait until
 * every kick is counted (bounded). */
static inline void vm_doorbell_stats(uint64_t *by_eventfd, uint64_t *by_mmio)
{
    uint32_t e = 0, m = 0;
    for (uint64_t i = 0; i < SPINS / 1000; i++) {
        e = mmio_read32(bar0 + STATS_REG);
        m = mmio_read32(bar0 + STATS_REG + 4);
        if (e + m >= kicks)
            break;
    }
    *by_eventfd = e;
    *by_mmio = m;
}

static inline void vm_post(unsigned head)
{
    avail.ring[avail.idx % QSZ] = head;
    __asm__ volatile("" ::: "memory");
    avail.idx++;
    __asm__ volatile("mfence" ::: "memory");
    vm_kick();
}

/* Waits up to `spins` for the next used element; its length, or -1. */
static inline long vm_wait_used_for(unsigned *id, uint64_t spins)
{
    for (uint64_t i = 0; i < spins; i++) {
        if (*(volatile uint16_t *)&used.idx != last_used) {
            struct used_elem e = used.ring[last_used % QSZ];
            last_used++;
            *id = e.id;
            return e.len;
        }
        cpu_relax();
    }
    return -1;
}

static inline long vm_wait_used(unsigned *id)
{
    return vm_wait_used_for(id, SPINS);
}

#endif
