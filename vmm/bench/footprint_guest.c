/* The footprint benchmark's guest: spins `loops` times in ring 3 (no exit;
 * about 0.3 ns an iteration on the development host), then ends with
 * test_exit(0x10) -- status 33 under vmm run and under QEMU's
 * isa-debug-exit alike. */
#include "guest.h"

int guest_main(void)
{
    uint64_t n = guest_arg("loops", 3000000000ull);
    for (volatile uint64_t i = 0; i < n; i++)
        ;
    test_exit(0x10);
}
