/* Drives the hostile test device (devserver/sandbox/hostile.py) from a
 * guest: asks it for one attack on its host, reads the outcome, then
 * checks that the VM goes on with another device (echo's scratch register).
 *
 * Command line: hostile=PORT attack=N echo=PORT.
 * Ends with test_exit(v): v = the errno the attack failed with (0: it
 * succeeded), 0x7e when the device is gone (its outcome reads all ones:
 * the sandbox killed it), 0x7f when the echo device did not answer after.
 */
#include "guest.h"

int guest_main(void)
{
    uint16_t hostile = (uint16_t)guest_arg("hostile", 0x6000);
    uint16_t echo = (uint16_t)guest_arg("echo", 0x7000);
    uint32_t attack = (uint32_t)guest_arg("attack", 0);

    outl(hostile, attack);
    uint32_t outcome = inl((uint16_t)(hostile + 4));
    for (uint32_t i = 0; i < 16; i++) {
        outl(echo, 0x5a5a0000u + i);
        if (inl(echo) != 0x5a5a0000u + i)
            test_exit(0x7f);
    }
    test_exit(outcome == 0xffffffffu ? 0x7e : outcome & 0x7f);
    return 0;
}
