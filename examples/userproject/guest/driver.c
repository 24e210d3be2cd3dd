/* The sensor's driver under test (a freestanding guest built by the
 * splitvmm plugin's build_guest fixture with the project's guest library).
 *
 * Command line: pio=PORT (default 0x540), n=N samples (default 32).
 * Reads samples 0..N-1; a read of all ones is a glitch of the device and
 * is retried (at most 16 times a sample).  Prints each sample and, at the
 * end, "driver: N samples, R retries, ok" -- or "driver: sample K wrong"
 * and test_exit(2) when a sample is not what the sensor gives, or
 * test_exit(3) when a sample never comes.  Powers off when done. */
#include "guest.h"
#include "serial.h"

int guest_main(void)
{
    uint16_t port = (uint16_t)guest_arg("pio", 0x540);
    uint32_t n = (uint32_t)guest_arg("n", 32);
    uint32_t retries = 0;

    serial_init(COM1_BASE);
    serial_puts("driver: reading the sensor\n");
    for (uint32_t i = 0; i < n; i++) {
        uint32_t v = 0xffffffffu;
        for (int attempt = 0; attempt < 16 && v == 0xffffffffu; attempt++) {
            if (attempt)
                retries++;
            outl(port, i);
            v = inl(port);
        }
        if (v == 0xffffffffu) {
            serial_printf("driver: sample %u never came\n", i);
            test_exit(3);
        }
        if (v != 20000 + 10 * i) {
            serial_printf("driver: sample %u wrong: %u\n", i, v);
            test_exit(2);
        }
        serial_printf("sample %u: %u.%03u C\n", i, v / 1000, v % 1000);
    }
    serial_printf("driver: %u samples, %u retries, ok\n", n, retries);
    return 0;
}
