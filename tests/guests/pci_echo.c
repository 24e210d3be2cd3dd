/* PCI from the guest side: mechanism #1, the host bridge and pci-echo
 * (devices/pci_echo.py), through vmm/guests/pci.c.
 *
 * Command line: mode=M slot=N mmio_win=A io_win=P (where the VMM
 * pre-assigned BARs 0 and 1), mmio_new=B io_new=Q (free places to move
 * them to), bar64=C (a 64-bit address for BAR 2), moves=N, seed=S,
 * stats=ADDR (guest RAM where vCPU 0 leaves counters for the host).
 *
 * mode 1: probe and enumerate -- Linux's type-1 probe, CONFIG_ADDRESS
 *         rules, the host bridge's and pci-echo's IDs, all ones for absent
 *         functions, byte/word/dword views, BAR sizes (BAR 2 is 64-bit),
 *         the MSI-X capability; then assign the BARs as firmware would
 *         (decode off, B, Q, C, decode on) for the host to check.
 * mode 2: move BARs with decode on and keep using them; memory and I/O
 *         decode off (all ones) and on again.
 * mode 3: vCPU 1 moves BAR 0 between A and B and BAR 1 between P and Q
 *         `moves` times while vCPU 0 reads them.
 * mode 4: seeded random configuration writes of every size to every
 *         offset of pci-echo, the bridge and CONFIG_ADDRESS.
 * mode 5: MSI-X: vectors raised by the device (its REG_RAISE register)
 *         arrive in this guest's handler; a masked vector (per-vector
 *         mask, function mask, bus mastering off) is held pending with its
 *         PBA bit visible, and delivered on unmask.
 * mode 6: two pci-echo functions (slot, slot2=N at mmio_win2/io_win2):
 *         the second's BAR 0 moved onto the first's stays conflicted
 *         (accesses reach the first, the conflict is visible), and takes
 *         the range over once the first moves away.
 * mode 7: INTx with MSI-X disabled: Interrupt Pin 1, Interrupt Line =
 *         intx_gsi=G, routed through IOAPIC pin G; a request arrives as
 *         that vector and sets STATUS.Interrupt_Status until the device's
 *         REG_ACK; with COMMAND.INTx_Disable set nothing arrives but the
 *         status sets, and clearing it delivers; with MSI-X enabled the
 *         MSI vector fires and the INTx one does not.
 *
 * Status 0 when everything holds, else test_exit(n) for check n. */
#include "guest.h"
#include "irq.h"
#include "pci.h"

IRQ_RING3_INTERRUPTS_ON;

#define CHECK(n, cond) do { if (!(cond)) test_exit(n); } while (0)
#define SV_VENDOR 0x5356
#define BRIDGE_DEVICE 0x0001
#define ECHO_DEVICE 0x0002
#define OFF 0x10

struct stats {
    uint64_t good, ones, bad, first_bad, moves, rounds;
};

static uint32_t bdf;
static uint64_t mmio_a, mmio_b, pio_p, pio_q;
static volatile int go, done;

static uint32_t pat32(unsigned off) { return 0x9e3779b9u * (off + 7); }

static void fill(uint64_t mmio)
{
    for (unsigned i = 0; i < 0xf0; i += 4)
        mmio_write32(mmio + i, pat32(i));
}

static void mode_probe(void)
{
    /* Linux arch/x86/pci/direct.c pci_check_type1() */
    outb(0xcfb, 0x01);
    uint32_t tmp = inl(PCI_CONFIG_ADDRESS);
    outl(PCI_CONFIG_ADDRESS, 0x80000000u);
    CHECK(1, inl(PCI_CONFIG_ADDRESS) == 0x80000000u);
    outl(PCI_CONFIG_ADDRESS, tmp);
    /* reserved bits read 0; non-dword accesses are not CONFIG_ADDRESS */
    outl(PCI_CONFIG_ADDRESS, 0xffffffffu);
    CHECK(2, inl(PCI_CONFIG_ADDRESS) == 0x80fffffcu);
    outw(PCI_CONFIG_ADDRESS, 0);
    outb(0xcf9, 0);
    CHECK(3, inl(PCI_CONFIG_ADDRESS) == 0x80fffffcu && inb(0xcf9) == 0xff && inw(0xcfa) == 0xffff);
    /* enable bit clear: CONFIG_DATA is nobody's */
    outl(PCI_CONFIG_ADDRESS, 0);
    CHECK(4, inl(PCI_CONFIG_DATA) == 0xffffffffu && inb(PCI_CONFIG_DATA + 3) == 0xff);

    /* the host bridge */
    CHECK(5, pci_cfg_read32(PCI_BDF(0, 0, 0), PCI_VENDOR_ID) == (BRIDGE_DEVICE << 16 | SV_VENDOR));
    CHECK(6, pci_cfg_read32(PCI_BDF(0, 0, 0), PCI_CLASS_REVISION) >> 8 == 0x060000);
    struct pci_dev devs[8], echo;
    CHECK(7, pci_scan(devs, 8) == 2 && devs[0].bdf == 0);
    CHECK(8, pci_find(SV_VENDOR, ECHO_DEVICE, &echo) && echo.bdf == bdf && echo.class_rev >> 8 == 0xff0000);
    /* absent functions, absent bus */
    CHECK(9, pci_cfg_read32(PCI_BDF(0, 31, 0), 0) == 0xffffffffu && pci_cfg_read32(bdf | 1 << 8, 0) == 0xffffffffu);
    CHECK(10, pci_cfg_read32(PCI_BDF(1, 0, 0), 0) == 0xffffffffu && pci_cfg_read16(PCI_BDF(1, 0, 0), 2) == 0xffff);
    /* bytes and words are slices of the dword, at every offset */
    for (unsigned r = 0; r < 0x40; r += 4) {
        uint32_t d = pci_cfg_read32(bdf, r);
        for (unsigned b = 0; b < 4; b++)
            CHECK(11, pci_cfg_read8(bdf, r + b) == (uint8_t)(d >> (8 * b)));
        CHECK(11, pci_cfg_read16(bdf, r) == (uint16_t)d && pci_cfg_read16(bdf, r + 2) == (uint16_t)(d >> 16));
    }
    CHECK(12, pci_cfg_read8(bdf, PCI_HEADER_TYPE) == 0 && (pci_cfg_read16(bdf, PCI_STATUS) & PCI_STATUS_CAP_LIST)
              && pci_cfg_read32(bdf, PCI_SUBSYSTEM_VENDOR_ID) == (ECHO_DEVICE << 16 | SV_VENDOR));

    struct pci_bar b0, b1, b2, b4, b5;
    pci_bar_probe(bdf, 0, &b0);
    pci_bar_probe(bdf, 1, &b1);
    pci_bar_probe(bdf, 2, &b2);
    pci_bar_probe(bdf, 4, &b4);
    pci_bar_probe(bdf, 5, &b5);
    CHECK(13, !b0.io && !b0.is64 && b0.size == 0x1000 && b0.address == mmio_a);
    CHECK(14, b1.io && b1.size == 0x100 && b1.address == pio_p);
    CHECK(15, b2.is64 && b2.size == 0x1000 && b2.address == mmio_a + 0x1000);
    CHECK(16, b4.size == 0 && b5.size == 0);
    /* sizing left everything working: both BARs reach one register file */
    mmio_write32(mmio_a + OFF, 0x12345678);
    CHECK(17, inl((uint16_t)(pio_p + OFF)) == 0x12345678 && inb((uint16_t)(pio_p + OFF + 3)) == 0x12);
    struct pci_msix m;
    CHECK(18, pci_msix_init(bdf, &m) && m.nvectors == 4 && m.table == b2.address && m.pba == b2.address + 0x800);
    CHECK(19, mmio_read32(m.table + 12) == 1 && pci_msix_pending(&m, 0) == 0);

    /* assign as firmware does: decode off, addresses, decode on */
    pci_command(bdf, 0, PCI_COMMAND_IO | PCI_COMMAND_MEMORY);
    CHECK(20, mmio_read32(mmio_a + OFF) == 0xffffffffu && inl((uint16_t)(pio_p + OFF)) == 0xffffffffu);
    pci_bar_set(bdf, 0, mmio_b, 0);
    pci_bar_set(bdf, 1, pio_q, 0);
    pci_bar_set(bdf, 2, guest_arg("bar64", 0x800000000ull), 1);
    CHECK(21, mmio_read32(mmio_b + OFF) == 0xffffffffu);        /* still off */
    pci_command(bdf, PCI_COMMAND_IO | PCI_COMMAND_MEMORY, 0);
    CHECK(22, mmio_read32(mmio_b + OFF) == 0x12345678 && inl((uint16_t)(pio_q + OFF)) == 0x12345678);
    CHECK(23, pci_bar_address(bdf, 2) == guest_arg("bar64", 0x800000000ull));
}

static void mode_move(void)
{
    fill(mmio_a);
    /* move with decode on: the device re-registers inside this write */
    pci_bar_set(bdf, 0, mmio_b, 0);
    CHECK(30, mmio_read32(mmio_a + OFF) == 0xffffffffu);
    CHECK(31, mmio_read32(mmio_b + OFF) == pat32(OFF) && pci_bar_address(bdf, 0) == mmio_b);
    pci_bar_set(bdf, 1, pio_q, 0);
    CHECK(32, inl((uint16_t)(pio_p + OFF)) == 0xffffffffu && inl((uint16_t)(pio_q + OFF)) == pat32(OFF));
    mmio_write32(mmio_b + 0x20, 0xabcdef01);
    CHECK(33, inl((uint16_t)(pio_q + 0x20)) == 0xabcdef01);
    /* memory decode off: all ones on the memory BAR, I/O unaffected */
    pci_command(bdf, 0, PCI_COMMAND_MEMORY);
    CHECK(34, mmio_read32(mmio_b + OFF) == 0xffffffffu && mmio_read64(mmio_b) == ~0ull);
    CHECK(35, inl((uint16_t)(pio_q + OFF)) == pat32(OFF));
    /* a BAR write while memory decode is off: no region until it is on */
    pci_bar_set(bdf, 0, mmio_a, 0);
    CHECK(36, mmio_read32(mmio_a + OFF) == 0xffffffffu && mmio_read32(mmio_b + OFF) == 0xffffffffu);
    pci_command(bdf, PCI_COMMAND_MEMORY, 0);
    CHECK(37, mmio_read32(mmio_a + OFF) == pat32(OFF) && mmio_read32(mmio_b + OFF) == 0xffffffffu);
    /* I/O decode off and on */
    pci_command(bdf, 0, PCI_COMMAND_IO);
    CHECK(38, inl((uint16_t)(pio_q + OFF)) == 0xffffffffu && mmio_read32(mmio_a + OFF) == pat32(OFF));
    pci_command(bdf, PCI_COMMAND_IO, 0);
    CHECK(39, inl((uint16_t)(pio_q + OFF)) == pat32(OFF));
    /* back and forth a few times, data kept */
    for (int i = 0; i < 20; i++) {
        pci_bar_set(bdf, 0, i & 1 ? mmio_a : mmio_b, 0);
        CHECK(40, mmio_read32((i & 1 ? mmio_a : mmio_b) + OFF) == pat32(OFF));
    }
}

void guest_ap_main(unsigned cpu)
{
    if (cpu != 1 || guest_arg("mode", 0) != 3)
        return;
    uint64_t n = guest_arg("moves", 1001);
    while (!__atomic_load_n(&go, __ATOMIC_ACQUIRE))
        cpu_relax();
    uint64_t m = mmio_a, p = pio_p;
    for (uint64_t i = 0; i < n; i++) {
        m = m == mmio_a ? mmio_b : mmio_a;
        p = p == pio_p ? pio_q : pio_p;
        pci_bar_set(bdf, 0, m, 0);
        pci_bar_set(bdf, 1, p, 0);
    }
    __atomic_store_n(&done, 1, __ATOMIC_RELEASE);
}

static void mode_relocate(void)
{
    struct stats *st = (struct stats *)(uintptr_t)guest_arg("stats", 0x800000);
    memset(st, 0, sizeof *st);
    fill(mmio_a);
    __atomic_store_n(&go, 1, __ATOMIC_RELEASE);
    while (!__atomic_load_n(&done, __ATOMIC_ACQUIRE)) {
        uint32_t v = mmio_read32(mmio_a + OFF);
        if (v == pat32(OFF)) st->good++;
        else if (v == 0xffffffffu) st->ones++;
        else if (!st->bad++) st->first_bad = v;
        v = inl((uint16_t)(pio_q + OFF));
        if (v == pat32(OFF)) st->good++;
        else if (v == 0xffffffffu) st->ones++;
        else if (!st->bad++) st->first_bad = v | 1ull << 32;
        uint64_t w = mmio_read64(mmio_b + OFF);
        if (w == ((uint64_t)pat32(OFF + 4) << 32 | pat32(OFF))) st->good++;
        else if (w == ~0ull) st->ones++;
        else if (!st->bad++) st->first_bad = w;
        st->rounds++;
    }
    CHECK(50, st->bad == 0);
    /* an odd number of moves: the BARs end at B and Q */
    CHECK(51, pci_bar_address(bdf, 0) == mmio_b && pci_bar_address(bdf, 1) == pio_q);
    CHECK(52, mmio_read32(mmio_a + OFF) == 0xffffffffu && inl((uint16_t)(pio_p + OFF)) == 0xffffffffu);
    CHECK(53, mmio_read32(mmio_b + OFF) == pat32(OFF) && inl((uint16_t)(pio_q + OFF)) == pat32(OFF));
}

static uint64_t rng_state;
static uint64_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static void fuzz_function(uint32_t target, unsigned rounds)
{
    for (unsigned r = 0; r < rounds; r++)
        for (unsigned off = 0; off < 0x100; off++) {
            uint64_t x = rnd();
            unsigned size = 1u << (x % 3);
            if (off % size)
                size = 1;
            uint32_t v = (uint32_t)(x >> 16);
            if (size == 1) pci_cfg_write8(target, off, (uint8_t)v);
            else if (size == 2) pci_cfg_write16(target, off, (uint16_t)v);
            else pci_cfg_write32(target, off, v);
            if (x & (1ull << 60))
                (void)pci_cfg_read32(target, off);
        }
}

static void mode_fuzz(void)
{
    rng_state = guest_arg("seed", 1) | 1;
    unsigned rounds = (unsigned)guest_arg("rounds", 4);
    fuzz_function(bdf, rounds);
    fuzz_function(PCI_BDF(0, 0, 0), 1);
    for (int i = 0; i < 64; i++) {                /* random CONFIG_ADDRESS + data */
        outl(PCI_CONFIG_ADDRESS, (uint32_t)rnd());
        outl(PCI_CONFIG_DATA, (uint32_t)rnd());
    }
    /* both functions still answer */
    CHECK(60, pci_cfg_read32(bdf, PCI_VENDOR_ID) == (ECHO_DEVICE << 16 | SV_VENDOR));
    CHECK(61, pci_cfg_read32(PCI_BDF(0, 0, 0), PCI_VENDOR_ID) == (BRIDGE_DEVICE << 16 | SV_VENDOR));
}

#define REG_RAISE 0x100
#define REG_DELIVERED 0x108
#define VEC0 0x51
#define VEC1 0x52
#define SPINS 200000000ull
#define QUIET 2000000ull             /* long enough for a stray MSI to land */

static void mode_msix(void)
{
    struct pci_msix m;
    irq_init();
    irq_enable();
    CHECK(70, pci_msix_init(bdf, &m) && m.nvectors == 4);
    pci_msix_program(&m, 0, MSI_ADDRESS(0), MSI_DATA(VEC0));
    pci_msix_program(&m, 1, MSI_ADDRESS(0), MSI_DATA(VEC1));
    pci_command(bdf, PCI_COMMAND_MASTER, 0);
    pci_msix_enable(bdf, &m, 1, 0);
    pci_msix_mask(&m, 0, 0);
    /* an unmasked vector arrives */
    mmio_write32(mmio_a + REG_RAISE, 0);
    CHECK(71, irq_wait(0, VEC0, 1, SPINS));
    /* a masked one is held, its PBA bit set, and sent on unmask */
    mmio_write32(mmio_a + REG_RAISE, 1);
    irq_wait(0, VEC1, 1, QUIET);
    CHECK(72, irq_count(0, VEC1) == 0 && pci_msix_pending(&m, 1));
    pci_msix_mask(&m, 1, 0);
    CHECK(73, irq_wait(0, VEC1, 1, SPINS) && !pci_msix_pending(&m, 1));
    /* function mask */
    pci_msix_enable(bdf, &m, 1, 1);
    mmio_write32(mmio_a + REG_RAISE, 0);
    irq_wait(0, VEC0, 2, QUIET);
    CHECK(74, irq_count(0, VEC0) == 1 && pci_msix_pending(&m, 0));
    pci_msix_enable(bdf, &m, 1, 0);
    CHECK(75, irq_wait(0, VEC0, 2, SPINS) && !pci_msix_pending(&m, 0));
    /* bus mastering off holds it too */
    pci_command(bdf, 0, PCI_COMMAND_MASTER);
    mmio_write32(mmio_a + REG_RAISE, 1);
    irq_wait(0, VEC1, 2, QUIET);
    CHECK(76, irq_count(0, VEC1) == 1 && pci_msix_pending(&m, 1));
    pci_command(bdf, PCI_COMMAND_MASTER, 0);
    CHECK(77, irq_wait(0, VEC1, 2, SPINS));
    /* the route follows a new address/data written while masked */
    pci_msix_mask(&m, 0, 1);
    pci_msix_program(&m, 0, MSI_ADDRESS(0), MSI_DATA(VEC1));
    pci_msix_mask(&m, 0, 0);
    mmio_write32(mmio_a + REG_RAISE, 0);
    CHECK(78, irq_wait(0, VEC1, 3, SPINS) && irq_count(0, VEC0) == 2);
    CHECK(79, mmio_read32(mmio_a + REG_DELIVERED) == 5);
}

#define REG_ACK 0x10c
#define REG_INTX_SENT 0x110
#define VEC_INTX 0x61

static int intx_status(void)
{
    return !!(pci_cfg_read16(bdf, PCI_STATUS) & PCI_STATUS_INTERRUPT);
}

static void mode_intx(void)
{
    struct pci_msix m;
    irq_init();
    irq_enable();
    uint8_t pin = pci_cfg_read8(bdf, PCI_INTERRUPT_PIN);
    uint8_t line = pci_cfg_read8(bdf, PCI_INTERRUPT_LINE);
    CHECK(90, pin == 1 && line == guest_arg("intx_gsi", 0xff) && line < IOAPIC_PINS);
    ioapic_route(line, VEC_INTX, 0);
    CHECK(91, pci_msix_init(bdf, &m));
    pci_msix_program(&m, 0, MSI_ADDRESS(0), MSI_DATA(VEC0));
    pci_msix_mask(&m, 0, 0);
    pci_command(bdf, PCI_COMMAND_MASTER, PCI_COMMAND_INTX_DISABLE);
    CHECK(92, !intx_status() && mmio_read32(mmio_a + REG_ACK) == 0);
    /* MSI-X disabled: INTx, its status set until acknowledged */
    mmio_write32(mmio_a + REG_RAISE, 0);
    CHECK(93, irq_wait(0, VEC_INTX, 1, SPINS));
    CHECK(94, intx_status() && mmio_read32(mmio_a + REG_ACK) == 1 && irq_count(0, VEC0) == 0);
    mmio_write32(mmio_a + REG_ACK, 0);
    CHECK(95, !intx_status() && mmio_read32(mmio_a + REG_ACK) == 0);
    /* INTx_Disable: nothing sent, the status still sets (PCI 3.0 6.2.3) */
    pci_command(bdf, PCI_COMMAND_INTX_DISABLE, 0);
    mmio_write32(mmio_a + REG_RAISE, 0);
    irq_wait(0, VEC_INTX, 2, QUIET);
    CHECK(96, irq_count(0, VEC_INTX) == 1 && intx_status() && mmio_read32(mmio_a + REG_INTX_SENT) == 1);
    /* cleared while the status is set: delivered */
    pci_command(bdf, 0, PCI_COMMAND_INTX_DISABLE);
    CHECK(97, irq_wait(0, VEC_INTX, 2, SPINS) && mmio_read32(mmio_a + REG_INTX_SENT) == 2);
    mmio_write32(mmio_a + REG_ACK, 0);
    CHECK(98, !intx_status());
    /* MSI-X enabled: the MSI vector, never INTx (PCI 3.0 6.8.2) */
    pci_msix_enable(bdf, &m, 1, 0);
    mmio_write32(mmio_a + REG_RAISE, 0);
    CHECK(99, irq_wait(0, VEC0, 1, SPINS));
    irq_wait(0, VEC_INTX, 3, QUIET);
    CHECK(100, irq_count(0, VEC_INTX) == 2 && !intx_status() && mmio_read32(mmio_a + REG_INTX_SENT) == 2);
    CHECK(101, mmio_read32(mmio_a + REG_DELIVERED) == 1 && irq_count(0, VEC0) == 1);
}

#define IO_REG_CONFLICT 0xfc

static void mode_overlap(void)
{
    uint32_t bdf2 = PCI_BDF(0, guest_arg("slot2", 4), 0);
    uint64_t mmio2 = guest_arg("mmio_win2", 0);
    uint16_t io2 = (uint16_t)guest_arg("io_win2", 0);
    mmio_write32(mmio_a + OFF, 0x11111111);
    mmio_write32(mmio2 + OFF, 0x22222222);
    CHECK(80, inl((uint16_t)(io2 + OFF)) == 0x22222222 && inl((uint16_t)(io2 + IO_REG_CONFLICT)) == 0);
    /* the second function's BAR 0 onto the first's, decode on */
    pci_bar_set(bdf2, 0, mmio_a, 0);
    CHECK(81, pci_bar_address(bdf2, 0) == mmio_a);             /* the value is kept */
    CHECK(82, inl((uint16_t)(io2 + IO_REG_CONFLICT)) == 1);     /* and the conflict seen */
    CHECK(83, mmio_read32(mmio_a + OFF) == 0x11111111);         /* the first keeps the range */
    CHECK(84, mmio_read32(mmio2 + OFF) == 0xffffffffu);         /* the old range is free */
    /* the first moves away: the second's region appears by itself (its
     * retry), no configuration access to it needed */
    pci_bar_set(bdf, 0, mmio_b, 0);
    uint32_t v = 0;
    for (unsigned i = 0; i < 200000 && (v = mmio_read32(mmio_a + OFF)) != 0x22222222; i++)
        cpu_relax();
    CHECK(85, v == 0x22222222);
    CHECK(86, inl((uint16_t)(io2 + IO_REG_CONFLICT)) == 0);
    CHECK(87, mmio_read32(mmio_b + OFF) == 0x11111111);
}

int guest_main(void)
{
    bdf = PCI_BDF(0, guest_arg("slot", 1), 0);
    mmio_a = guest_arg("mmio_win", 0xe0100000);
    pio_p = guest_arg("io_win", 0xc200);
    mmio_b = guest_arg("mmio_new", 0xe8000000);
    pio_q = guest_arg("io_new", 0xd000);
    switch (guest_arg("mode", 0)) {
    case 1: mode_probe(); break;
    case 2: mode_move(); break;
    case 3: mode_relocate(); break;
    case 4: mode_fuzz(); break;
    case 5: mode_msix(); break;
    case 6: mode_overlap(); break;
    case 7: mode_intx(); break;
    default: return 99;
    }
    return 0;
}
