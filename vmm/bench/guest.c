/* Benchmark guest: round trips of one port read and one MMIO read.
 * Command line: iters=N rounds=R pio=PORT mmio=ADDR mark=PORT ring=0|3.
 * Each round writes marks 1, 2, 3 to the mark port around N 4-byte reads
 * of pio, then N 4-byte reads of mmio; the host timestamps the marks.
 *
 * ring=3 (default): the loops run in ring 3 (native on the PVM host).
 * ring=0: they run in guest_ring0_init on vCPU 0, before ring 3 is
 * entered; ring 0 is instruction-emulated on the PVM host (~0.5 us per
 * instruction), so its loops are three instructions each ("in" or
 * "mov" from the window, "dec", "jnz") and N should be small. */
#include "guest.h"

static void ring0_reads(uint16_t pio, uint64_t n)
{
    uint64_t c = n;
    if (c == 0)
        return;
    __asm__ volatile("1: inl %%dx, %%eax\n\tdec %0\n\tjnz 1b"
                     : "+c"(c) : "d"(pio) : "rax", "memory", "cc");
}

static void ring0_mmio_reads(uint64_t mmio, uint64_t n)
{
    uint64_t c = n;
    if (c == 0)
        return;
    __asm__ volatile("1: movl (%1), %%eax\n\tdec %0\n\tjnz 1b"
                     : "+c"(c) : "r"(mmio) : "rax", "memory", "cc");
}

static void rounds_of_reads(int ring0)
{
    uint64_t n = guest_arg("iters", 10000);
    uint64_t rounds = guest_arg("rounds", 3);
    uint16_t pio = (uint16_t)guest_arg("pio", 0x1000);
    uint64_t mmio = guest_arg("mmio", 0xd0000000);
    uint16_t mark = (uint16_t)guest_arg("mark", 0xff8);
    uint32_t sink = 0;

    if (ring0) {
        for (uint64_t r = 0; r < rounds; r++) {
            outb(mark, 1);
            ring0_reads(pio, n);
            outb(mark, 2);
            ring0_mmio_reads(mmio, n);
            outb(mark, 3);
        }
        return;
    }
    for (uint64_t r = 0; r < rounds; r++) {
        outb(mark, 1);
        for (uint64_t i = 0; i < n; i++)
            sink += inl(pio);
        outb(mark, 2);
        for (uint64_t i = 0; i < n; i++)
            sink += mmio_read32(mmio);
        outb(mark, 3);
    }
    (void)sink;
}

void guest_ring0_init(unsigned cpu)
{
    if (cpu == 0 && guest_arg("ring", 3) == 0)
        rounds_of_reads(1);
}

int guest_main(void)
{
    if (guest_arg("ring", 3) != 0)
        rounds_of_reads(0);
    return 0;
}
