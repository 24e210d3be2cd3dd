/* The Python API's test guest: prints "api: line I" for I in 0..lines-1
 * on COM1, then "api: done", then ends with test_exit(code) (command line
 * lines=N code=C; defaults 3 and 0x10); forever=1 keeps printing instead. */
#include "guest.h"
#include "serial.h"

int guest_main(void)
{
    uint64_t lines = guest_arg("lines", 3);
    serial_init(COM1_BASE);
    for (uint64_t i = 0; guest_arg("forever", 0) || i < lines; i++)
        serial_printf("api: line %lu\n", i);
    serial_puts("api: done\n");
    test_exit((uint32_t)guest_arg("code", 0x10));
}
