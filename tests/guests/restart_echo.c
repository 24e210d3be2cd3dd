/* Keeps using the echo device while the host kills and restarts its
 * process (tests/vmm/test_restart.py): every access must complete exactly
 * once with respect to the device's state.
 *
 * Command line: pio=PORT mmio=ADDR (the echo windows), stop=PORT (a
 * VMM-local port that reads non-zero once the host wants the run to
 * end), stats=ADDR (guest RAM where the guest keeps, as u64s: accesses
 * made, rounds done, then the last counter read), hog=R (at round R,
 * write 4 to the fault register 0xFC of tests.testkinds:FaultEcho: a
 * thread of the device takes the registry lock inside the handler and
 * keeps it; that write does not count as an access of the echo).
 *
 * Each round writes a scratch register through one window and reads it
 * back through the other, then reads the access counter, which must be
 * exactly the number of accesses the guest has made (every access counts
 * once, this read included).  Ends with status 0 (power off) when the
 * host says stop, else test_exit(n) for the first failed check:
 * 1 a scratch value read back wrong, 2 the counter is not the number of
 * accesses, 3 a read of all ones (the device was failed), 4 no pci-echo.
 *
 * Built with PCI_ECHO defined (restart_pci_echo.c), the windows are
 * pci-echo's BAR 1 (I/O) and BAR 0 (memory), where the VMM assigned
 * them: the same register file behind PCI BARs. */
#include "guest.h"
#ifdef PCI_ECHO
#include "pci.h"
#endif

#define REG_COUNT 0xf4

#define CHECK(n, cond) do { if (!(cond)) test_exit(n); } while (0)

int guest_main(void)
{
    uint64_t pio = guest_arg("pio", 0x1000);
    uint64_t mmio = guest_arg("mmio", 0xd0000000);
    uint16_t stop = (uint16_t)guest_arg("stop", 0x3f0);
    volatile uint64_t *stats = (volatile uint64_t *)(uintptr_t)guest_arg("stats", 0x200000);
    uint64_t hog = guest_arg("hog", 0);
    uint32_t made = 0;
#ifdef PCI_ECHO
    struct pci_dev d;
    CHECK(4, pci_find(0x5356, 0x0002, &d));
    pio = pci_bar_address(d.bdf, 1);
    mmio = pci_bar_address(d.bdf, 0);
    pci_command(d.bdf, PCI_COMMAND_IO | PCI_COMMAND_MEMORY, 0);
#endif

    for (uint64_t round = 1;; round++) {
        unsigned off = (unsigned)(round * 4) % 0xe0;
        uint32_t v = (uint32_t)(round * 2654435761u) ^ 0x5a5a0000u;
        if (round & 1) {
            outl((uint16_t)(pio + off), v);
            made++;
            uint32_t got = mmio_read32(mmio + off);
            made++;
            CHECK(3, got != 0xffffffffu || v == 0xffffffffu);
            CHECK(1, got == v);
        } else {
            mmio_write32(mmio + off, v);
            made++;
            uint32_t got = inl((uint16_t)(pio + off));
            made++;
            CHECK(3, got != 0xffffffffu || v == 0xffffffffu);
            CHECK(1, got == v);
        }
        uint32_t count = (round & 2) ? inl((uint16_t)(pio + REG_COUNT)) : mmio_read32(mmio + REG_COUNT);
        made++;
        stats[0] = made;
        stats[1] = round;
        stats[2] = count;
        CHECK(3, count != 0xffffffffu);
        CHECK(2, count == made);
        if (round == hog)
            mmio_write32(mmio + 0xfc, 4);
        if ((round & 63) == 0 && inb(stop))
            return 0;
    }
}
