/* Benchmark guest: round trips of one port read and one MMIO read, from
 * ring 3.  Command line: iters=N rounds=R pio=PORT mmio=ADDR mark=PORT.
 * Each round writes marks 1, 2, 3 to the mark port around N 4-byte reads
 * of pio, then N 4-byte reads of mmio; the host timestamps the marks. */
#include "guest.h"

int guest_main(void)
{
    uint64_t n = guest_arg("iters", 10000);
    uint64_t rounds = guest_arg("rounds", 3);
    uint16_t pio = (uint16_t)guest_arg("pio", 0x1000);
    uint64_t mmio = guest_arg("mmio", 0xd0000000);
    uint16_t mark = (uint16_t)guest_arg("mark", 0xff8);
    uint32_t sink = 0;

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
    return 0;
}
