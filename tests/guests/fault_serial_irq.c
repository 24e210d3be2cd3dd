/* The serial port's interrupt under the `irq` fault point
 * (tests/vmm/test_faults.py): COM1's IRQ 4 routed through the IOAPIC to a
 * handler that counts its entries.
 *
 * `rounds` rounds (4): with IER off (no interrupt pending), enable the
 * THRE interrupt -- the transmitter is empty, so the UART raises IRQ 4 at
 * once: one edge per round; the handler reads IIR and turns the THRE
 * interrupt off again.  Then wait `settle` TSC ticks (1.5e9) counting
 * handler entries, and print by polling "round <r> irqs <n> first <ticks
 * from the IER write to the first entry, 0 for none>".  Then "done".
 * test_exit(n) names a failed check.
 */
#include "guest.h"
#include "irq.h"
#include "serial.h"

IRQ_RING3_INTERRUPTS_ON;

#define VECTOR 0x35
#define B COM1_BASE
#define CHECK(n, cond) do { if (!(cond)) test_exit(n); } while (0)

static volatile uint32_t entries;
static volatile uint64_t first_at;

static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("lfence; rdtsc" : "=a"(lo), "=d"(hi) :: "memory");
    return (uint64_t)hi << 32 | lo;
}

/* Ring 0, interrupts off. */
static void uart_isr(unsigned vector)
{
    (void)vector;
    if (!entries)
        first_at = rdtsc();
    entries++;
    inb(B + UART_IIR);                  /* THRE: reading IIR clears it */
    outb(B + UART_IER, 0);              /* and no more THRE interrupts */
}

int guest_main(void)
{
    uint64_t rounds = guest_arg("rounds", 4), settle = guest_arg("settle", 1500000000ull);
    CHECK(1, serial_init(B) == 0);
    outb(B + UART_IER, 0);
    irq_init();
    irq_set_handler(VECTOR, uart_isr);
    ioapic_route(COM1_IRQ, VECTOR, lapic_id());
    outb(B + UART_MCR, UART_MCR_DTR | UART_MCR_RTS | UART_MCR_OUT2);   /* OUT2 gates IRQ 4 */
    irq_enable();
    for (uint64_t r = 0; r < rounds; r++) {
        irq_disable();
        entries = 0;
        first_at = 0;
        irq_enable();
        uint64_t t0 = rdtsc();
        outb(B + UART_IER, UART_IER_THRI);
        while (rdtsc() - t0 < settle)
            cpu_relax();
        irq_disable();
        outb(B + UART_IER, 0);          /* a lost edge left THRE pending: off */
        uint32_t n = entries;
        uint64_t first = n ? first_at - t0 : 0;
        irq_enable();
        serial_printf("round %lu irqs %u first %lu\n", r, n, first);
    }
    irq_disable();
    serial_printf("done\n");
    return 0;
}
