/* The counter example's test guest (a PVH ELF built by vmm.guests).
 *
 * Command line: pio=PORT (default 0x520), n=N (default 100).  Adds 1..N
 * through the counter and checks the sum and the count; ends with power
 * off (status 0) when every check passes, else test_exit(check).
 */
#include "guest.h"

#define CHECK(n, cond) do { if (!(cond)) test_exit(n); } while (0)

int guest_main(void)
{
    uint16_t port = (uint16_t)guest_arg("pio", 0x520);
    uint32_t n = (uint32_t)guest_arg("n", 100);

    CHECK(1, inl(port + 4) == 0);
    for (uint32_t i = 1; i <= n; i++)
        outl(port, i);
    CHECK(2, inl(port) == n * (n + 1) / 2);
    CHECK(3, inl(port + 4) == n);
    outl(port + 8, 1);
    CHECK(4, inl(port) == 0 && inl(port + 4) == 0);
    CHECK(5, inl(port + 0xc) != 0);     /* the serving process's pid */
    CHECK(6, inw(port) == 0xffff);     /* not a 4-byte access: all ones */
    return 0;
}
