/* Benchmark guest: 8-byte MMIO writes to a coalesced window and to a plain
 * one, from ring 3.  Command line: iters=N rounds=R win=ADDR plain=ADDR
 * mark=PORT.  Each round writes marks 1, 2, 3 to the mark port around N
 * writes to win, then N writes to plain; each phase ends with a read of
 * the device's count, so it includes the delivery of every queued write
 * (reads are never coalesced).  The host timestamps the marks. */
#include "guest.h"

#define REG_ADD 0x00
#define REG_COUNT 0x08

int guest_main(void)
{
    uint64_t n = guest_arg("iters", 10000);
    uint64_t rounds = guest_arg("rounds", 3);
    uint64_t win = guest_arg("win", 0xd0000000);
    uint64_t plain = guest_arg("plain", 0xd0001000);
    uint16_t mark = (uint16_t)guest_arg("mark", 0xff8);
    int bad = 0;

    for (uint64_t r = 0; r < rounds; r++) {
        outb(mark, 1);
        for (uint64_t i = 0; i < n; i++)
            mmio_write64(win + REG_ADD, i);
        bad |= mmio_read64(win + REG_COUNT) != (2 * r + 1) * n;
        outb(mark, 2);
        for (uint64_t i = 0; i < n; i++)
            mmio_write64(plain + REG_ADD, i);
        bad |= mmio_read64(plain + REG_COUNT) != (2 * r + 2) * n;
        outb(mark, 3);
    }
    /* Both windows feed one count: every write must have arrived. */
    return bad;
}
