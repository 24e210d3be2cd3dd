/* Hot plug from the guest side: rescan bus 0 over and over, as a driver
 * polling for presence would, and keep using every pci-echo it finds.
 *
 * Each round reads the vendor/device dword of slots 1-31.  A slot that
 * appears is printed as "add SS VVVVDDDD bar0=ADDR" (decode switched on);
 * one that disappears as "del SS cfg=CFGDWORD bar0=BAR0READ" -- its
 * configuration dword and a read of its old BAR 0, all ones after a
 * surprise removal.  In every round each pci-echo present gets a pattern
 * written to and read back from its BAR 0; every 64 rounds a line
 * "round R: SS ok=N bad=M; ..." gives the counts since the last one.  A
 * mismatch on a device that the next scan still finds counts as bad; one
 * that the next scan no longer finds was removed under the access and is
 * not counted.  Runs until the host ends it. */
#include "guest.h"
#include "pci.h"
#include "serial.h"

#define SV_VENDOR 0x5356
#define ECHO_DEVICE 0x0002
#define ECHO_ID ((uint32_t)ECHO_DEVICE << 16 | SV_VENDOR)
#define OFF 0x20
#define SLOTS 32
#define REPORT_EVERY 64

static uint32_t ids[SLOTS];
static uint64_t bar0[SLOTS];
static uint64_t ok[SLOTS], bad[SLOTS], maybe[SLOTS];

static uint32_t bdf_of(unsigned slot) { return PCI_BDF(0, slot, 0); }

int guest_main(void)
{
    serial_init(COM1_BASE);
    serial_puts("hotplug: scanning\n");
    for (uint64_t round = 1;; round++) {
        for (unsigned s = 1; s < SLOTS; s++) {
            uint32_t id = pci_cfg_read32(bdf_of(s), PCI_VENDOR_ID);
            if (id == 0xffffffffu && ids[s] != 0) {
                uint32_t old = ids[s];
                uint32_t cfg = id, bar = 0;
                if (old == ECHO_ID)
                    bar = mmio_read32(bar0[s] + OFF);
                serial_printf("del %02u cfg=%08x bar0=%08x\n", s, cfg, bar);
                ids[s] = 0;
                maybe[s] = 0;
            } else if (id != 0xffffffffu && ids[s] == 0) {
                ids[s] = id;
                bar0[s] = pci_bar_address(bdf_of(s), 0);
                pci_command(bdf_of(s), PCI_COMMAND_MEMORY | PCI_COMMAND_IO, 0);
                ok[s] = bad[s] = maybe[s] = 0;
                serial_printf("add %02u %08x bar0=%lx\n", s, id, bar0[s]);
            } else if (ids[s] != 0) {
                bad[s] += maybe[s];     /* still there: a real mismatch */
                maybe[s] = 0;
            }
        }
        for (unsigned s = 1; s < SLOTS; s++) {
            if (ids[s] != ECHO_ID)
                continue;
            uint32_t pat = (uint32_t)(round * 0x9e3779b9u) ^ s;
            mmio_write32(bar0[s] + OFF, pat);
            if (mmio_read32(bar0[s] + OFF) == pat)
                ok[s]++;
            else
                maybe[s]++;
        }
        if (round % REPORT_EVERY == 0) {
            serial_printf("round %lu:", round);
            for (unsigned s = 1; s < SLOTS; s++) {
                if (ids[s] == ECHO_ID) {
                    serial_printf(" %02u ok=%lu bad=%lu;", s, ok[s], bad[s]);
                    ok[s] = bad[s] = 0;
                }
            }
            serial_puts("\n");
        }
    }
}
