/* Keeps writing lines to virtio-console's port while the host kills and
 * restarts the device process (tests/vmm/test_restart.py); the minimal
 * driver of virtio_min.h on transmitq0 (queue 1; receiveq0 is left
 * disabled: this guest takes no input), completions by polling.
 *
 * Command line: stop=PORT (reads non-zero once the host wants the run to
 * end), stats=ADDR: u64 lines completed, u64 rounds, the guest addresses
 * of transmitq0's avail and used rings.
 *
 * Line n (from 0) is LINE bytes: n in ten decimal digits, a space,
 * letters 'a' + (n + i) % 26, a newline; one chain of one buffer, head
 * n % QSZ.  Each must complete exactly once: the used index moves by
 * exactly one, naming the head posted, with length 0.  Status 0 (power
 * off) when the host says stop, else test_exit(n): 1 no device, 2 wrong
 * head, 3 two completions for one request, 4 wrong length, 6 no
 * completion, 7 set-up refused. */
#include "guest.h"
#include "pci.h"
#include "virtio_min.h"

#define CHECK VCHECK
#define VIRTIO_VENDOR 0x1af4
#define VIRTIO_CONSOLE_DEVICE 0x1043
#define TRANSMITQ 1
#define LINE 48

static char lines[QSZ][LINE] __attribute__((aligned(16)));

static void line(char *b, uint64_t n)
{
    uint64_t x = n;
    for (int i = 9; i >= 0; i--, x /= 10)
        b[i] = (char)('0' + x % 10);
    b[10] = ' ';
    for (int i = 11; i < LINE - 1; i++)
        b[i] = (char)('a' + (n + (uint64_t)i) % 26);
    b[LINE - 1] = '\n';
}

static void setup_transmitq(void)
{
    mmio_write8(common + STATUS, 0);
    mmio_write8(common + STATUS, S_ACK | S_DRIVER);
    mmio_write32(common + GFSELECT, 0);
    mmio_write32(common + GF, 0);
    mmio_write32(common + GFSELECT, 1);
    mmio_write32(common + GF, 1);
    mmio_write8(common + STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    CHECK(7, mmio_read8(common + STATUS) & S_FEATURES_OK);
    mmio_write16(common + Q_SELECT, TRANSMITQ);
    CHECK(7, mmio_read16(common + Q_SIZE) >= QSZ);
    mmio_write16(common + Q_SIZE, QSZ);
    mmio_write64(common + Q_DESC, (uintptr_t)descs);
    mmio_write64(common + Q_AVAIL, (uintptr_t)&avail);
    mmio_write64(common + Q_USED, (uintptr_t)&used);
    mmio_write16(common + Q_MSIX, NO_VECTOR);
    qnotify_off = mmio_read16(common + Q_NOFF);
    mmio_write16(common + Q_ENABLE, 1);
    mmio_write8(common + STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    CHECK(7, mmio_read8(common + STATUS) == (S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK));
    vm_locate(bar0);
}

int guest_main(void)
{
    struct pci_dev d;
    CHECK(1, pci_find(VIRTIO_VENDOR, VIRTIO_CONSOLE_DEVICE, &d));
    bdf = d.bdf;
    vm_find_caps();
    vm_locate(pci_bar_address(bdf, 0));
    pci_command(bdf, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER, 0);
    setup_transmitq();
    uint16_t stop = (uint16_t)guest_arg("stop", 0x3f0);
    volatile uint64_t *stats = (volatile uint64_t *)(uintptr_t)guest_arg("stats", 0x200000);
    stats[2] = (uintptr_t)&avail;
    stats[3] = (uintptr_t)&used;
    for (uint64_t n = 0;; n++) {
        unsigned head = (unsigned)n % QSZ, id;
        line(lines[head], n);
        descs[head] = (struct desc){ (uintptr_t)lines[head], LINE, 0, 0 };
        avail.ring[avail.idx % QSZ] = (uint16_t)head;
        __asm__ volatile("" ::: "memory");
        avail.idx++;
        __asm__ volatile("mfence" ::: "memory");
        kicks++;
        mmio_write16(notify_base, TRANSMITQ);
        long got = vm_wait_used(&id);
        CHECK(6, got >= 0);
        CHECK(2, id == head);
        CHECK(4, got == 0);
        for (int i = 0; i < 2000; i++)
            cpu_relax();
        CHECK(3, *(volatile uint16_t *)&used.idx == last_used);
        stats[0] = n + 1;
        stats[1] = n + 1;
        if ((n & 15) == 15 && inb(stop))
            return 0;
    }
}
