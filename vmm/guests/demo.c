/* The demo guest that `vmm run` boots when no --guest is given.
 *
 * It talks to two echo devices -- one in its own process, one inside the
 * VMM -- through port I/O and MMIO from ring 3: fills and checks their
 * scratch registers at every access size, makes sure an unclaimed port and
 * page read all ones, moves the isolated device's MMIO window (the device
 * re-registers it itself, from inside the handler of that very write),
 * and checks that the old window is gone and the new one keeps the data.
 * It reports on the serial console (COM1) as it goes, and powers off
 * (status 0) when everything holds, else ends with test_exit(n), n naming
 * the failed check.  Built with vmm/guests/serial.c.
 *
 * Command line: iso_pio= iso_mmio= inl_pio= free_pio= free_mmio= move_to=
 */
#include "guest.h"
#include "serial.h"

#define REG_PID 0xf0
#define REG_COUNT 0xf4
#define REG_MOVE 0xf8

#define CHECK(n, cond) do { \
        if (!(cond)) { serial_printf("demo: check %d failed\n", n); test_exit(n); } \
    } while (0)

static uint32_t pattern(unsigned i)
{
    return 0x9e3779b9u * (i + 1);
}

static void check_pio(uint16_t base, unsigned tag)
{
    for (unsigned i = 0; i < 0x40; i += 4)
        outl((uint16_t)(base + i), pattern(i + tag));
    for (unsigned i = 0; i < 0x40; i += 4)
        CHECK(10 + tag, inl((uint16_t)(base + i)) == pattern(i + tag));
    outb((uint16_t)(base + 0x41), 0x5a);
    CHECK(11 + tag, inb((uint16_t)(base + 0x41)) == 0x5a);
    outw((uint16_t)(base + 0x42), 0xbeef);
    CHECK(12 + tag, inw((uint16_t)(base + 0x42)) == 0xbeef);
}

static void check_mmio(uint64_t base)
{
    for (unsigned i = 0; i < 0x80; i += 8)
        mmio_write64(base + i, ((uint64_t)pattern(i) << 32) | pattern(i + 1));
    for (unsigned i = 0; i < 0x80; i += 8)
        CHECK(20, mmio_read64(base + i) == (((uint64_t)pattern(i) << 32) | pattern(i + 1)));
    mmio_write8(base + 0x81, 0xa5);
    CHECK(21, mmio_read8(base + 0x81) == 0xa5);
    mmio_write16(base + 0x82, 0x1234);
    CHECK(22, mmio_read16(base + 0x82) == 0x1234);
    mmio_write32(base + 0x84, 0xfeedface);
    CHECK(23, mmio_read32(base + 0x84) == 0xfeedface);
}

int guest_main(void)
{
    uint16_t iso_pio = (uint16_t)guest_arg("iso_pio", 0x1000);
    uint64_t iso_mmio = guest_arg("iso_mmio", 0xd0000000);
    uint16_t inl_pio = (uint16_t)guest_arg("inl_pio", 0x1100);
    uint16_t free_pio = (uint16_t)guest_arg("free_pio", 0x2000);
    uint64_t free_mmio = guest_arg("free_mmio", 0xd0100000);
    uint64_t move_to = guest_arg("move_to", 0xd0200000);

    serial_init(COM1_BASE);
    serial_printf("splitvmm demo: echo devices at ports %#x (own process) and %#x (in the VMM)\n",
                  iso_pio, inl_pio);
    check_pio(iso_pio, 0);
    check_pio(inl_pio, 5);
    serial_puts("  port I/O, 1/2/4 bytes, both devices: ok\n");
    check_mmio(iso_mmio);
    serial_printf("  MMIO at %#lx, 1/2/4/8 bytes: ok\n", iso_mmio);
    /* Both windows of the isolated device address one register file. */
    CHECK(30, inl(iso_pio) == (uint32_t)mmio_read64(iso_mmio));
    /* One device runs in its own process, the other in the VMM's. */
    CHECK(31, inl((uint16_t)(iso_pio + REG_PID)) != inl((uint16_t)(inl_pio + REG_PID)));
    CHECK(32, inl((uint16_t)(iso_pio + REG_COUNT)) > 0x20);
    /* Nobody claims these: all ones. */
    CHECK(40, inl(free_pio) == 0xffffffffu);
    CHECK(41, mmio_read32(free_mmio) == 0xffffffffu);
    serial_puts("  unclaimed port and page read all ones: ok\n");
    /* The device moves its own window from inside this write's handler. */
    mmio_write64(iso_mmio + REG_MOVE, move_to);
    CHECK(50, mmio_read32(iso_mmio) == 0xffffffffu);
    CHECK(51, mmio_read64(move_to) == (((uint64_t)pattern(0) << 32) | pattern(1)));
    mmio_write64(move_to + REG_MOVE, iso_mmio);
    CHECK(52, mmio_read64(iso_mmio + 8) == (((uint64_t)pattern(8) << 32) | pattern(9)));
    serial_printf("  the device moved its window to %#lx and back itself: ok\n", move_to);
    serial_puts("demo: all checks passed\n");
    return 0;
}
