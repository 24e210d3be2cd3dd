/* Coalesced MMIO behind a PCI BAR that the guest moves (the
 * pci-coalesce-sum test device, tests/testkinds.py).
 *
 * Command line: n=N (writes per phase, default 10000), moveto=ADDR (where
 * BAR 0 goes after the first phase).  Ends with status 0 (power off)
 * when every check passes, else test_exit(n) naming the first failed
 * check.
 */
#include "guest.h"
#include "pci.h"

#define VENDOR 0x1234
#define DEVICE 0x5c01
#define REG_ADD 0x00
#define REG_COUNT 0x08
#define REG_SUM 0x10
#define REG_HASH 0x18
#define REG_RESET 0x20

#define FNV_OFFSET 0xcbf29ce484222325ull
#define FNV_PRIME 0x100000001b3ull

#define CHECK(n, cond) do { if (!(cond)) test_exit(n); } while (0)

static uint64_t value_of(uint64_t i, uint64_t salt)
{
    uint64_t x = (i + salt) * 0x9e3779b97f4a7c15ull;
    return x ^ (x >> 31);
}

static void phase(uint64_t win, uint64_t n, uint64_t salt, int first_check)
{
    uint64_t sum = 0, hash = FNV_OFFSET;
    mmio_write64(win + REG_RESET, 1);
    for (uint64_t i = 0; i < n; i++) {
        uint64_t v = value_of(i, salt);
        mmio_write64(win + REG_ADD, v);
        sum += v;
        hash = (hash ^ v) * FNV_PRIME;
    }
    CHECK(first_check, mmio_read64(win + REG_COUNT) == n);
    CHECK(first_check + 1, mmio_read64(win + REG_SUM) == sum);
    CHECK(first_check + 2, mmio_read64(win + REG_HASH) == hash);
}

int guest_main(void)
{
    uint64_t n = guest_arg("n", 10000);
    uint64_t moveto = guest_arg("moveto", 0xe8000000);
    struct pci_dev dev;

    CHECK(20, pci_find(VENDOR, DEVICE, &dev));
    uint64_t bar = pci_bar_address(dev.bdf, 0);
    CHECK(21, bar != 0);
    phase(bar, n, 1, 1);
    /* Reprogram BAR 0 (memory decode stays on): the device moves its
     * region, and its coalesced zone, from the configuration write. */
    pci_bar_set(dev.bdf, 0, moveto, 0);
    CHECK(22, pci_bar_address(dev.bdf, 0) == moveto);
    CHECK(4, mmio_read64(bar + REG_COUNT) == ~0ull);
    phase(moveto, n, 2, 5);
    return 0;
}
