/* virtio-rng through the project's driver library (vmm/guests/virtio.h):
 * find the function, negotiate VERSION_1, set up queue 0, DRIVER_OK, read
 * random bytes -- completion by polling the used ring, or by MSI-X with
 * msix=1 (every request must then raise its queue's vector).
 *
 * Command line: rounds=N (default 8), len=L (bytes a request, default 16),
 * msix=0|1, unassign=1 (first clear every memory BAR of the function, decode
 * off, as firmware-less boot would leave them: the library must assign
 * them itself, from window=ADDR).  Prints "rng: <hex>" for each round on COM1 and "rng: ok";
 * status 0 when everything holds, else test_exit(n) for check n. */
#include "guest.h"
#include "irq.h"
#include "serial.h"
#include "virtio.h"

IRQ_RING3_INTERRUPTS_ON;

#define VECTOR 0x70
#define CHECK(n, cond) do { if (!(cond)) { serial_printf("rng: check %d failed\n", n); test_exit(n); } } while (0)

static struct virtio_dev rng;
static uint8_t bytes[2][256];

int guest_main(void)
{
    unsigned rounds = (unsigned)guest_arg("rounds", 8);
    uint32_t len = (uint32_t)guest_arg("len", 16);
    int msix = (int)guest_arg("msix", 0);
    serial_init(COM1_BASE);
    CHECK(1, len >= 8 && len <= sizeof bytes[0]);
    irq_init();
    irq_enable();

    if (guest_arg("unassign", 0)) {
        struct pci_dev p;
        CHECK(15, pci_find(VIRTIO_PCI_VENDOR, VIRTIO_PCI_MODERN_BASE + VIRTIO_ID_RNG, &p)
                  || pci_find(VIRTIO_PCI_VENDOR, 0x1005, &p));
        pci_unassign_memory_bars(p.bdf);
        virtio_bar_window(guest_arg("window", 0xe8000000), guest_arg("window", 0xe8000000) + 0x1000000);
    }
    int err = virtio_pci_init(&rng, VIRTIO_ID_RNG, 0);
    if (err)
        serial_printf("rng: %s\n", virtio_strerror(err));
    CHECK(2, err == 0);
    CHECK(3, rng.common && rng.notify_base && rng.isr && rng.notify_mult % 2 == 0);
    CHECK(4, virtio_negotiate(&rng, 0) == 0 && rng.features == 1ull << VIRTIO_F_VERSION_1);
    CHECK(5, (virtio_status(&rng) & 0xf) == (VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER
                                            | VIRTIO_STATUS_FEATURES_OK));
    if (msix)
        CHECK(6, virtio_use_msix(&rng, VECTOR) == 0);
    CHECK(7, virtio_setup_queue(&rng, 0) == 0 && rng.vq[0].size > 0);
    CHECK(8, !msix || rng.vq[0].irq_vector == VECTOR);
    virtio_driver_ok(&rng);
    CHECK(9, virtio_status(&rng) & VIRTIO_STATUS_DRIVER_OK);
    CHECK(10, !(virtio_status(&rng) & (VIRTIO_STATUS_NEEDS_RESET | VIRTIO_STATUS_FAILED)));
    serial_printf("rng: %02x:%02x.%x device %04x common %#lx queue size %u %s\n", rng.pci.bdf >> 16,
                  (rng.pci.bdf >> 11) & 0x1f, (rng.pci.bdf >> 8) & 7, rng.pci.device, rng.common,
                  rng.vq[0].size, msix ? "msix" : "polling");

    for (unsigned r = 0; r < rounds; r++) {
        uint8_t *b = bytes[r & 1];
        memset(b, 0, len);
        int64_t got = virtio_rng_read(&rng, b, len);
        if (got < 0)
            serial_printf("rng: %s\n", virtio_strerror((int)got));
        CHECK(11, got == len);
        serial_puts("rng: ");
        for (uint32_t i = 0; i < len; i++)
            serial_printf("%02x", b[i]);
        serial_puts("\n");
        uint64_t zero = 0, same = 0;
        for (uint32_t i = 0; i < len; i++) {
            zero += b[i] == 0;
            same += r && b[i] == bytes[(r & 1) ^ 1][i];
        }
        CHECK(12, zero < len && same < len);
    }
    if (msix) {
        /* one vector a request at least (some devices split a read) */
        irq_wait(lapic_id(), VECTOR, rounds, 100000000ull);
        serial_printf("rng: interrupts %u\n", virtq_irqs(&rng, 0));
        CHECK(13, virtq_irqs(&rng, 0) >= rounds);
    }
    virtio_reset(&rng);
    CHECK(14, virtio_status(&rng) == 0);
    serial_puts("rng: ok\n");
    return 0;
}
