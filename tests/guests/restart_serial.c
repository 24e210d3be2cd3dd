/* Keeps writing to the 16550A at COM1 while the host kills and restarts
 * the device process (tests/vmm/test_restart.py).
 *
 * Command line: stop=PORT (reads non-zero once the host wants the run to
 * end), stats=ADDR (u64s: bytes written, rounds done).
 *
 * Each byte: LSR must say the transmitter is empty (0x60), the scratch
 * register must hold what was written there last, then the byte goes to
 * THR: 'A' + n % 26, a newline every 64.  Status 0 (power off) when the
 * host says stop, else test_exit(n): 1 LSR wrong, 2 scratch wrong. */
#include "guest.h"
#include "serial.h"

#define CHECK(n, cond) do { if (!(cond)) test_exit(n); } while (0)

int guest_main(void)
{
    uint16_t stop = (uint16_t)guest_arg("stop", 0x3f0);
    volatile uint64_t *stats = (volatile uint64_t *)(uintptr_t)guest_arg("stats", 0x200000);
    uint64_t n = 0;
    uint8_t scr = 0;
    outb(COM1_BASE + 7, scr);
    for (uint64_t round = 1;; round++) {
        CHECK(1, (inb(COM1_BASE + 5) & 0x60) == 0x60);
        CHECK(2, inb(COM1_BASE + 7) == scr);
        scr = (uint8_t)(round * 37);
        outb(COM1_BASE + 7, scr);
        outb(COM1_BASE, (n % 65) == 64 ? '\n' : (uint8_t)('A' + n % 26));
        n++;
        stats[0] = n;
        stats[1] = round;
        if ((round & 63) == 0 && inb(stop))
            return 0;
    }
}
