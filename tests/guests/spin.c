/* Runs in ring 3 until the host says stop: the guest of the control-socket
 * tests (stop/cont, query-stats, quit).
 *
 * Command line: counter=ADDR (vCPU n adds 1 to the u64 at ADDR + 8 n, over
 * and over), flag=ADDR (a u64 the host may write: a nonzero v ends the run
 * with test_exit(v)), pio=PORT accesses=N (vCPU 0 first writes and reads
 * back the echo device's scratch register at PORT N times, so the device
 * has accesses to count; a wrong value ends with test_exit(1)).
 */
#include "guest.h"

static void spin(unsigned cpu)
{
    volatile uint64_t *mine = (volatile uint64_t *)(uintptr_t)guest_arg("counter", 0x800000) + cpu;
    volatile uint64_t *flag = (volatile uint64_t *)(uintptr_t)guest_arg("flag", 0x801000);
    for (;;) {
        (*mine)++;
        if (cpu == 0 && *flag)
            test_exit((uint32_t)*flag);
    }
}

int guest_main(void)
{
    uint16_t port = (uint16_t)guest_arg("pio", 0);
    uint64_t n = guest_arg("accesses", 0);
    for (uint64_t i = 0; port && i < n; i++) {
        outl(port, (uint32_t)i);
        if (inl(port) != (uint32_t)i)
            test_exit(1);
    }
    spin(0);
    return 0;
}

void guest_ap_main(unsigned cpu)
{
    spin(cpu);
}
