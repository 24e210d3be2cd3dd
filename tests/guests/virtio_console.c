/* virtio-console from the guest side (devices/virtio/console.py), one
 * port: receiveq0 (queue 0) and transmitq0 (queue 1), set up here with the
 * helpers of virtio_min.h; completions by polling.  Waits for a line
 * of input, sends "hello\n" and the line back, and powers off (input
 * first: output sent before the client is connected would be dropped).  Status 0 when everything holds, else test_exit(n). */
#include "guest.h"
#include "pci.h"
#include "virtio_min.h"

#define CHECK VCHECK
#define VIRTIO_CONSOLE_DEVICE 0x1043

struct vq {
    struct desc d[QSZ] __attribute__((aligned(16)));
    struct avail a __attribute__((aligned(4)));
    struct used u __attribute__((aligned(4)));
    uint16_t last;
    uint64_t notify;
};
static struct vq rxq, txq;
static char rxbuf[64], txbuf[64];

static void queue_setup(unsigned index, struct vq *q)
{
    mmio_write16(common + Q_SELECT, index);
    CHECK(30, mmio_read16(common + Q_SIZE) >= QSZ);
    mmio_write16(common + Q_SIZE, QSZ);
    mmio_write64(common + Q_DESC, (uintptr_t)q->d);
    mmio_write64(common + Q_AVAIL, (uintptr_t)&q->a);
    mmio_write64(common + Q_USED, (uintptr_t)&q->u);
    mmio_write16(common + Q_MSIX, NO_VECTOR);
    q->notify = bar0 + notify_off_cap + (uint64_t)mmio_read16(common + Q_NOFF) * notify_mult;
    mmio_write16(common + Q_ENABLE, 1);
}

static void put(struct vq *q, unsigned index, void *buf, uint32_t len, uint16_t flags)
{
    q->d[0] = (struct desc){ (uintptr_t)buf, len, flags, 0 };
    q->a.ring[q->a.idx % QSZ] = 0;
    __asm__ volatile("" ::: "memory");
    q->a.idx++;
    __asm__ volatile("mfence" ::: "memory");
    mmio_write16(q->notify, index);
}

static uint32_t take(struct vq *q)
{
    for (uint64_t i = 0; i < SPINS * 4; i++) {
        if (*(volatile uint16_t *)&q->u.idx != q->last) {
            uint32_t len = q->u.ring[q->last % QSZ].len;
            q->last++;
            return len;
        }
        cpu_relax();
    }
    test_exit(31);
}

int guest_main(void)
{
    struct pci_dev d;
    CHECK(1, pci_find(0x1af4, VIRTIO_CONSOLE_DEVICE, &d));
    bdf = d.bdf;
    vm_find_caps();
    vm_locate(pci_bar_address(bdf, 0));
    pci_command(bdf, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER, 0);
    mmio_write8(common + STATUS, 0);
    mmio_write8(common + STATUS, S_ACK | S_DRIVER);
    mmio_write32(common + GFSELECT, 1);
    mmio_write32(common + GF, 1);
    mmio_write8(common + STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    CHECK(2, mmio_read8(common + STATUS) & S_FEATURES_OK);
    CHECK(3, mmio_read16(common + NUMQ) == 2);
    queue_setup(0, &rxq);
    queue_setup(1, &txq);
    mmio_write8(common + STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    put(&rxq, 0, rxbuf, sizeof rxbuf, F_WRITE);
    memcpy(txbuf, "hello\n", 6);
    unsigned n = 6;
    while (n == 6 || txbuf[n - 1] != '\n') {
        uint32_t got = take(&rxq);
        CHECK(5, got >= 1 && n + got <= sizeof txbuf);
        memcpy(txbuf + n, rxbuf, got);
        n += got;
        put(&rxq, 0, rxbuf, sizeof rxbuf, F_WRITE);
    }
    put(&txq, 1, txbuf, n, 0);
    CHECK(6, take(&txq) == 0);
    return 0;
}
