/* The demo guest that `vmm run` boots when no --guest is given, with
 * virtio-rng, virtio-blk and virtio-console (each in its own device
 * process) next to the serial console.
 *
 * With the driver library of virtio.h it enumerates PCI bus 0 and prints
 * the device list, takes the virtio-rng function's memory BARs away and
 * assigns them itself (from window=ADDR), sets up MSI-X for virtio-rng and
 * virtio-blk, prints 16 random bytes, the disk's id and capacity, writes a
 * pattern to `sectors` sectors of the disk, reads it back, verifies it,
 * flushes, sends a line to the virtio-console port and powers off (status
 * 0) when everything holds, else ends with test_exit(n), n naming the
 * failed check.  Built with vmm/guests/{virtio,pci,serial}.c.
 *
 * Command line: window=ADDR (default 0xe8000000), sectors=N (default 64).
 */
#include "guest.h"
#include "irq.h"
#include "pci.h"
#include "serial.h"
#include "virtio.h"

IRQ_RING3_INTERRUPTS_ON;

#define RNG_VECTOR 0x60
#define BLK_VECTOR 0x70
#define MAX_SECTORS 256

#define CHECK(n, cond, ...) do { if (!(cond)) { serial_printf("demo: check %d failed: ", n); \
        serial_printf(__VA_ARGS__); serial_puts("\n"); test_exit(n); } } while (0)

static struct virtio_dev rng, console;
static struct virtio_blk blk;
static uint8_t buf[MAX_SECTORS * VIRTIO_BLK_SECTOR] __attribute__((aligned(4096)));

static const char *pci_name(const struct pci_dev *p)
{
    if (p->vendor != VIRTIO_PCI_VENDOR)
        return (p->class_rev >> 8) == 0x060000 ? "host bridge" : "";
    switch (p->device) {
    case VIRTIO_PCI_MODERN_BASE + VIRTIO_ID_BLOCK: return "virtio-blk";
    case VIRTIO_PCI_MODERN_BASE + VIRTIO_ID_CONSOLE: return "virtio-console";
    case VIRTIO_PCI_MODERN_BASE + VIRTIO_ID_RNG: return "virtio-rng";
    default: return "virtio";
    }
}

static void list_pci(void)
{
    struct pci_dev devs[32];
    unsigned n = pci_scan(devs, 32);
    serial_printf("demo: %u PCI functions on bus 0\n", n);
    for (unsigned i = 0; i < n; i++)
        serial_printf("  pci %02x:%02x.%x %04x:%04x class %06x %s\n", devs[i].bdf >> 16,
                      (devs[i].bdf >> 11) & 0x1f, (devs[i].bdf >> 8) & 7, devs[i].vendor, devs[i].device,
                      devs[i].class_rev >> 8, pci_name(&devs[i]));
}

static void rng_demo(void)
{
    struct pci_dev p;
    CHECK(10, pci_find(VIRTIO_PCI_VENDOR, VIRTIO_PCI_MODERN_BASE + VIRTIO_ID_RNG, &p), "no virtio-rng");
    /* Take the function's memory BARs away (decode off, address 0), so
     * that virtio_pci_init assigns them from our window. */
    uint64_t window = guest_arg("window", 0xe8000000);
    uint64_t old_bar0 = pci_bar_address(p.bdf, 0);
    pci_unassign_memory_bars(p.bdf);
    virtio_bar_window(window, window + 0x1000000);
    int err = virtio_pci_init(&rng, VIRTIO_ID_RNG, 0);
    CHECK(11, err == 0, "virtio-rng: %s", virtio_strerror(err));
    uint64_t new_bar0 = pci_bar_address(p.bdf, 0);
    CHECK(12, new_bar0 >= window && new_bar0 < window + 0x1000000, "BAR0 at %#lx", new_bar0);
    serial_printf("demo: virtio-rng BAR0 assigned by the guest: %#lx -> %#lx\n", old_bar0, new_bar0);
    CHECK(13, (err = virtio_negotiate(&rng, 0)) == 0, "virtio-rng negotiate: %s", virtio_strerror(err));
    CHECK(14, (err = virtio_use_msix(&rng, RNG_VECTOR)) == 0, "virtio-rng MSI-X: %s", virtio_strerror(err));
    CHECK(15, (err = virtio_setup_queue(&rng, 0)) == 0, "virtio-rng queue: %s", virtio_strerror(err));
    virtio_driver_ok(&rng);

    uint8_t r[16];
    memset(r, 0, sizeof r);
    int64_t got = virtio_rng_read(&rng, r, sizeof r);
    CHECK(16, got == 16, "virtio-rng read: %s", virtio_strerror((int)got));
    unsigned zero = 0;
    for (int i = 0; i < 16; i++)
        zero += r[i] == 0;
    CHECK(17, zero < 16, "virtio-rng gave zeros");
    irq_wait(lapic_id(), RNG_VECTOR, 1, 100000000ull);
    serial_puts("demo: 16 random bytes from virtio-rng: ");
    for (int i = 0; i < 16; i++)
        serial_printf("%02x", r[i]);
    serial_printf(" (MSI-X vector %#x, interrupts: %u)\n", RNG_VECTOR, virtq_irqs(&rng, 0));
    CHECK(18, virtq_irqs(&rng, 0) >= 1, "no virtio-rng interrupt");
}

static uint8_t pattern(uint64_t sector, unsigned i)
{
    return (uint8_t)(sector * 31 + i * 7 + 0x5a);
}

static void blk_demo(void)
{
    int err = virtio_blk_init(&blk, 0, BLK_VECTOR);
    CHECK(20, err == 0, "virtio-blk: %s", virtio_strerror(err));
    char id[VIRTIO_BLK_ID_BYTES + 1];
    err = virtio_blk_get_id(&blk, id);
    CHECK(21, err == 0, "virtio-blk get id: %s", virtio_strerror(err));
    serial_printf("demo: virtio-blk id \"%s\", capacity %lu sectors (%lu MiB), MSI-X vector %#x\n", id,
                  blk.capacity, blk.capacity / 2048, BLK_VECTOR);
    uint64_t sectors = guest_arg("sectors", 64);
    if (sectors > MAX_SECTORS)
        sectors = MAX_SECTORS;
    CHECK(22, !blk.read_only && blk.capacity >= 2 * sectors, "disk read-only or too small");
    /* the pattern goes to the middle of the disk */
    uint64_t first = blk.capacity / 2;
    for (uint64_t s = 0; s < sectors; s++)
        for (unsigned i = 0; i < VIRTIO_BLK_SECTOR; i++)
            buf[s * VIRTIO_BLK_SECTOR + i] = pattern(first + s, i);
    CHECK(23, (err = virtio_blk_write(&blk, first, buf, (uint32_t)sectors)) == 0, "write: %s",
          virtio_strerror(err));
    memset(buf, 0, sizeof buf);
    CHECK(24, (err = virtio_blk_read(&blk, first, buf, (uint32_t)sectors)) == 0, "read: %s",
          virtio_strerror(err));
    for (uint64_t s = 0; s < sectors; s++)
        for (unsigned i = 0; i < VIRTIO_BLK_SECTOR; i++)
            CHECK(25, buf[s * VIRTIO_BLK_SECTOR + i] == pattern(first + s, i), "sector %lu byte %u reads %02x",
                  first + s, i, buf[s * VIRTIO_BLK_SECTOR + i]);
    CHECK(26, blk.has_flush, "no flush");
    CHECK(27, (err = virtio_blk_flush(&blk)) == 0, "flush: %s", virtio_strerror(err));
    serial_printf("demo: virtio-blk wrote, read back and verified sectors %lu-%lu, flushed: ok "
                  "(interrupts: %u)\n", first, first + sectors - 1, virtq_irqs(&blk.dev, 0));
}

static void console_demo(void)
{
    static const char line[] = "virtio-console: hello from the splitvmm demo guest\n";
    int err = virtio_pci_init(&console, VIRTIO_ID_CONSOLE, 0);
    CHECK(30, err == 0, "virtio-console: %s", virtio_strerror(err));
    CHECK(31, (err = virtio_negotiate(&console, 0)) == 0, "virtio-console negotiate: %s", virtio_strerror(err));
    CHECK(32, (err = virtio_setup_queue(&console, 0)) == 0 && (err = virtio_setup_queue(&console, 1)) == 0,
          "virtio-console queues: %s", virtio_strerror(err));
    virtio_driver_ok(&console);
    struct virtio_buf b = {line, sizeof line - 1, 0};
    int64_t got = virtq_request(&console, 1, &b, 1, 1000000000ull);
    CHECK(33, got >= 0, "virtio-console write: %s", virtio_strerror((int)got));
    serial_printf("demo: virtio-console port: wrote %u bytes: ok\n", (unsigned)(sizeof line - 1));
}

int guest_main(void)
{
    serial_init(COM1_BASE);
    serial_puts("splitvmm demo guest: every device in its own process\n");
    irq_init();
    irq_enable();
    list_pci();
    rng_demo();
    blk_demo();
    console_demo();
    serial_puts("demo: all checks passed: ok\n");
    return 0;
}
