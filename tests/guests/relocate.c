/* The seed's scenario: vCPU 1 moves the echo windows back and forth while
 * vCPU 0 hammers them.
 *
 * Command line: mmio=A mmio2=B (4 KiB-aligned MMIO bases), pio=P pio2=Q
 * (PIO bases; Q = P + 0x80 makes the two ranges overlap), moves=N (odd:
 * the windows end at B and Q), stats=ADDR (guest RAM where vCPU 0 leaves
 * its counters for the host to read).
 *
 * vCPU 0 fills the scratch registers with a pattern, lets vCPU 1 go, then
 * reads A + off (MMIO) and Q + off (PIO) until vCPU 1 is done.  A read
 * must be a pattern value (through whichever window is there) or all
 * ones (no window there); anything else is counted as bad.  Afterwards
 * the old ranges must read all ones and the new windows must work.
 */
#include "guest.h"

#define MOVE 0xf8
#define OFF 0x10                        /* where vCPU 0 reads */

struct stats {
    uint64_t good, ones, bad, first_bad, moves, rounds;
};

static volatile int go, done;
static uint64_t mmio_a, mmio_b, pio_p, pio_q;

static uint8_t pat(unsigned i) { return (uint8_t)(i * 13 + 1); }

static uint32_t pat32(unsigned off)
{
    return pat(off) | pat(off + 1) << 8 | pat(off + 2) << 16 | (uint32_t)pat(off + 3) << 24;
}

void guest_ap_main(unsigned cpu)
{
    if (cpu != 1)
        return;
    uint64_t n = guest_arg("moves", 1001);
    while (!__atomic_load_n(&go, __ATOMIC_ACQUIRE))
        cpu_relax();
    uint64_t m = mmio_a, p = pio_p;         /* set by vCPU 0 before go */
    for (uint64_t i = 0; i < n; i++) {
        uint64_t m2 = m == mmio_a ? mmio_b : mmio_a;
        uint64_t p2 = p == pio_p ? pio_q : pio_p;
        mmio_write64(m + MOVE, m2);       /* 8-byte move on MMIO */
        outl((uint16_t)(p + MOVE), (uint32_t)p2);
        m = m2;
        p = p2;
    }
    __atomic_store_n(&done, 1, __ATOMIC_RELEASE);
}

int guest_main(void)
{
    mmio_a = guest_arg("mmio", 0xd0000000);
    mmio_b = guest_arg("mmio2", 0xd0001000);
    pio_p = guest_arg("pio", 0x1000);
    pio_q = guest_arg("pio2", 0x1080);
    struct stats *st = (struct stats *)(uintptr_t)guest_arg("stats", 0x800000);
    memset(st, 0, sizeof *st);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);

    for (unsigned i = 0; i < 0xf0; i += 4)
        mmio_write32(mmio_a + i, pat32(i));
    __atomic_store_n(&go, 1, __ATOMIC_RELEASE);

    /* Valid values at A + OFF: pat32(OFF) (window at A) or all ones (at
     * B).  At Q + OFF: pat32(OFF) (window at Q) or pat32(OFF + 0x80)
     * (window at P, which covers Q + OFF at offset 0x80 + OFF). */
    while (!__atomic_load_n(&done, __ATOMIC_ACQUIRE)) {
        uint32_t v = mmio_read32(mmio_a + OFF);
        if (v == pat32(OFF)) st->good++;
        else if (v == 0xffffffffu) st->ones++;
        else { if (!st->bad++) st->first_bad = v; }
        v = inl((uint16_t)(pio_q + OFF));
        if (v == pat32(OFF) || v == pat32(OFF + 0x80)) st->good++;
        else if (v == 0xffffffffu) st->ones++;
        else { if (!st->bad++) st->first_bad = v | 1ull << 32; }
        uint64_t w = mmio_read64(mmio_a + OFF);
        if (w == ((uint64_t)pat32(OFF + 4) << 32 | pat32(OFF))) st->good++;
        else if (w == ~0ull) st->ones++;
        else { if (!st->bad++) st->first_bad = w; }
        st->rounds++;
    }
    if (st->bad)
        return 1;
    /* the old MMIO window is gone, the new one has the register file */
    if (mmio_read32(mmio_a) != 0xffffffffu || mmio_read64(mmio_a + OFF) != ~0ull)
        return 2;
    if (mmio_read32(mmio_b + OFF) != pat32(OFF))
        return 3;
    mmio_write32(mmio_b, 0xa5a5a5a5);
    if (mmio_read32(mmio_b) != 0xa5a5a5a5 || inl((uint16_t)pio_q) != 0xa5a5a5a5)
        return 4;
    /* the part of the old PIO range the new one does not cover is empty */
    if (inl((uint16_t)pio_p) != 0xffffffffu || inb((uint16_t)(pio_p + 0x7f)) != 0xff)
        return 5;
    return 0;
}
