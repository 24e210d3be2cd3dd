/* Observes the `access` and `process` fault points from the guest
 * (tests/vmm/test_faults.py): a write and a read-back on each of up to 8
 * echo devices, `n` times each, with nothing checked here -- every value
 * read and the TSC cycles each read took go to the host.
 *
 * Command line: p0=PORT .. p7=PORT (echo PIO windows; 0: none), n=N
 * (rounds per device, at most 32), stats=ADDR.  Results at stats: for
 * device d and round i, u64 [d*64 + 2*i] the value read, [d*64 + 2*i + 1]
 * the cycles of that read.  Round i writes 0x1000 + i to scratch offset 0,
 * then reads offset 0.  Ends with power off. */
#include "guest.h"

#define MAXDEV 8
#define MAXN 32

static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

int guest_main(void)
{
    static const char *keys[MAXDEV] = {"p0", "p1", "p2", "p3", "p4", "p5", "p6", "p7"};
    volatile uint64_t *stats = (volatile uint64_t *)(uintptr_t)guest_arg("stats", 0);
    uint64_t n = guest_arg("n", 20);
    if (!stats || n > MAXN)
        test_exit(1);
    for (unsigned d = 0; d < MAXDEV; d++) {
        uint16_t port = (uint16_t)guest_arg(keys[d], 0);
        if (!port)
            continue;
        for (unsigned i = 0; i < n; i++) {
            outl(port, 0x1000 + i);
            uint64_t t0 = rdtsc();
            uint32_t v = inl(port);
            stats[d * 64 + 2 * i] = v;
            stats[d * 64 + 2 * i + 1] = rdtsc() - t0;
        }
    }
    return 0;
}
