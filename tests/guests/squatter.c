/* A hostile device (tests/testkinds.py Squatter) registers regions outside
 * the windows the VMM granted it; every guest access must still go to
 * the rightful owner, or read all ones where there is none
 * (vmm/windows.py, docs/DESIGN-registry-trust.md).
 *
 * Command line: hostile=PORT (its registers), slot=N (a pci-echo, whose
 * BAR 0 is scratch memory), empty=N (a slot nobody uses), squat=ADDR (a
 * PCI-aperture address no BAR uses), moveto=ADDR (where BAR 0 is moved).
 * Success: the guest writes 0x5a to the test-exit port -- which the
 * hostile device squats on, so the run ends only if the VMM still owns it.
 * A failed check exits with its step number (1..).
 */
#include "guest.h"
#include "pci.h"

#define OK 0x5a
#define ONES 0xffffffffu
#define PAT 0x1234abcdu
#define BUS_PIO 0
#define BUS_MMIO 1
#define BUS_PCI 2
#define OWNER_SELF 0
#define OWNER_EVICTED 0xffffffffu
#define CMD_REGISTER 1
#define CMD_EVICT 2
#define CMD_RESTORE 3
#define CMD_DROP 4
#define CONFLICT 1

static uint16_t hport;

static uint32_t hostile(uint32_t cmd, uint32_t bus, uint64_t addr, uint32_t len, uint32_t owner, uint32_t cookie)
{
    outl(hport + 0x00, (uint32_t)addr);
    outl(hport + 0x04, (uint32_t)(addr >> 32));
    outl(hport + 0x08, len);
    outl(hport + 0x0c, owner);
    outl(hport + 0x10, cookie);
    outl(hport + 0x14, bus);
    outl(hport + 0x18, cmd);
    return inl(hport + 0x1c);
}

static uint32_t cfg_key(unsigned slot) { return (uint32_t)slot << 15; }

#define CHECK(step, cond) do { if (!(cond)) test_exit(step); } while (0)

int guest_main(void)
{
    hport = (uint16_t)guest_arg("hostile", 0x2000);
    unsigned slot = (unsigned)guest_arg("slot", 3);
    unsigned empty = (unsigned)guest_arg("empty", 9);
    uint64_t squat = guest_arg("squat", 0xe1000000);
    uint64_t moveto = guest_arg("moveto", 0xe8000000);
    uint32_t bdf = PCI_BDF(0, slot, 0);
    uint16_t vendor = pci_cfg_read16(bdf, 0);
    uint64_t bar0 = pci_bar_address(bdf, 0);

    CHECK(1, vendor != 0xffff && bar0 != 0);
    mmio_write32(bar0, PAT);
    CHECK(2, mmio_read32(bar0) == PAT);

    /* Over a sibling's BAR while it is there: the registry says no. */
    CHECK(3, hostile(CMD_REGISTER, BUS_MMIO, bar0, 0x1000, OWNER_SELF, 0) == CONFLICT);
    CHECK(4, mmio_read32(bar0) == PAT);

    /* Evict the sibling's BAR and squat on it, as itself and as the
     * sibling at a shifted start (wrong offsets for the sibling). */
    CHECK(5, hostile(CMD_EVICT, BUS_MMIO, bar0, 0x1000, 0, 0) == 1);
    CHECK(6, hostile(CMD_REGISTER, BUS_MMIO, bar0, 0x1000, OWNER_SELF, 0) == 0);
    CHECK(7, mmio_read32(bar0) == ONES);
    mmio_write32(bar0, 0x6b6b6b6b);                  /* dropped */
    CHECK(8, hostile(CMD_DROP, 0, 0, 0, 0, 0) == 0);
    CHECK(9, hostile(CMD_REGISTER, BUS_MMIO, bar0 - 0x100, 0x1000, OWNER_EVICTED, 0) == 0);
    CHECK(10, mmio_read32(bar0) == ONES);            /* not the sibling's offset 0x100 */
    CHECK(11, hostile(CMD_DROP, 0, 0, 0, 0, 0) == 0);
    CHECK(12, hostile(CMD_RESTORE, 0, 0, 0, 0, 0) == 0);
    CHECK(13, mmio_read32(bar0) == PAT);             /* the dropped write never landed */

    /* Another device's configuration space, and a fake function. */
    CHECK(20, hostile(CMD_EVICT, BUS_PCI, cfg_key(slot), 0x1000, 0, 0) == 1);
    CHECK(21, hostile(CMD_REGISTER, BUS_PCI, cfg_key(slot), 0x1000, OWNER_SELF, 0x100) == 0);
    CHECK(22, pci_cfg_read16(bdf, 0) == 0xffff);
    CHECK(23, hostile(CMD_REGISTER, BUS_PCI, cfg_key(empty), 0x1000, OWNER_SELF, 0x100) == 0);
    CHECK(24, pci_cfg_read32(PCI_BDF(0, empty, 0), 0) == ONES);
    CHECK(25, hostile(CMD_DROP, 0, 0, 0, 0, 0) == 0);
    CHECK(26, hostile(CMD_RESTORE, 0, 0, 0, 0, 0) == 0);
    CHECK(27, pci_cfg_read16(bdf, 0) == vendor);

    /* Inside the PCI aperture, outside every BAR: as itself, and as the
     * sibling with BAR 0's cookie. */
    CHECK(28, hostile(CMD_REGISTER, BUS_MMIO, squat, 0x1000, OWNER_SELF, 0) == 0);
    CHECK(29, mmio_read32(squat) == ONES);
    CHECK(30, hostile(CMD_EVICT, BUS_MMIO, bar0, 0x1000, 0, 0) == 1);   /* learn the sibling's owner */
    CHECK(31, hostile(CMD_RESTORE, 0, 0, 0, 0, 0) == 0);
    CHECK(32, hostile(CMD_REGISTER, BUS_MMIO, squat + 0x10000, 0x1000, OWNER_EVICTED, 0) == 0);
    CHECK(33, mmio_read32(squat + 0x10000) == ONES);

    /* The guest moves BAR 0: the window follows, the old place is free
     * for squatting and refused, even under the sibling's name. */
    pci_bar_set(bdf, 0, moveto, 0);
    CHECK(34, mmio_read32(moveto) == PAT);
    CHECK(35, hostile(CMD_REGISTER, BUS_MMIO, bar0, 0x1000, OWNER_EVICTED, 0) == 0);
    CHECK(36, mmio_read32(bar0) == ONES);
    CHECK(37, mmio_read32(moveto) == PAT);

    /* The VMM's ports: test exit and CONFIG_ADDRESS/CONFIG_DATA. */
    CHECK(14, hostile(CMD_EVICT, BUS_PIO, 0xf4, 4, 0, 0) == 1);
    CHECK(15, hostile(CMD_REGISTER, BUS_PIO, 0xf4, 4, OWNER_SELF, 0) == 0);
    CHECK(16, hostile(CMD_EVICT, BUS_PIO, 0xcf8, 8, 0, 0) == 2);
    CHECK(17, hostile(CMD_REGISTER, BUS_PIO, 0xcf8, 8, OWNER_SELF, 0) == 0);
    CHECK(18, pci_cfg_read16(bdf, 0) == vendor);     /* mechanism #1 still the VMM's */
    CHECK(19, inl(0xcf8) != 0x6b6b6b6bu);

    /* Nothing ever reached the hostile model through a foreign region. */
    CHECK(38, inl(hport + 0x20) == 0);
    test_exit(OK);
    return 0;
}
