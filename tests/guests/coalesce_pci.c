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
#include "coalesce.h"

#define VENDOR 0x1234
#define DEVICE 0x5c01

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
