/* Keeps using one echo device (devices/echo.py) through its PIO window, for
 * the service-mode tests (tests/vmm/test_service_devices.py): a VMM killed
 * while this guest runs, a device that is served again afterwards.
 *
 * Command line: pio=PORT (the echo window), rounds=N (write/read rounds,
 * 0: until the VM is stopped from outside).  Check 1: the scratch register
 * file starts at 0 (a fresh device, not the last VM's); check 2: every
 * value written reads back; check 3: the access counter (0xf4) counts every
 * access of this guest, from a fresh device.  Ends with test_exit(0x2a)
 * when all hold, else test_exit(n) for check n. */
#include "guest.h"

#define PASS 0x2a
#define REG_COUNT 0xf4
#define SCRATCH_WORDS 60            /* 0x00-0xef */

#define CHECK(n, cond) do { if (!(cond)) test_exit(n); } while (0)

int guest_main(void)
{
    uint16_t pio = (uint16_t)guest_arg("pio", 0x1000);
    uint64_t rounds = guest_arg("rounds", 0);
    uint32_t accesses = 0;

    for (unsigned i = 0; i < SCRATCH_WORDS; i++, accesses++)
        CHECK(1, inl((uint16_t)(pio + 4 * i)) == 0);
    for (uint64_t r = 0; rounds == 0 || r < rounds; r++) {
        uint16_t port = (uint16_t)(pio + 4 * (r % SCRATCH_WORDS));
        uint32_t v = (uint32_t)(r * 2654435761u) ^ 0x5a5a0000u;
        outl(port, v);
        CHECK(2, inl(port) == v);
        accesses += 2;
    }
    /* The counter read counts itself (devices/echo.py). */
    CHECK(3, inl((uint16_t)(pio + REG_COUNT)) == accesses + 1);
    test_exit(PASS);
}
