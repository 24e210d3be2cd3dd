/* Smallest guest: ends the run with test-exit value "code=" (default 0x21). */
#include "guest.h"

int guest_main(void)
{
    test_exit((uint32_t)guest_arg("code", 0x21));
}
