/* MSIs injected by the VMM itself (KVM_SIGNAL_MSI): a write to port
 * ASK=0x500 asks for vector 0x40 (value 1) or 0x41 (value 2).  The first
 * is held back by the LAPIC TPR until irq_enable().  Power off when every
 * check passes, else test_exit(n). */
#include "irq.h"

IRQ_RING3_INTERRUPTS_ON;

#define ASK 0x500
#define SPINS 100000000ull
#define CHECK(n, cond) do { if (!(cond)) test_exit(n); } while (0)

static volatile uint32_t seen_vector;

static void record(unsigned vector)
{
    seen_vector = vector;
}

int guest_main(void)
{
    irq_init();
    irq_set_handler(0x41, record);
    outb(ASK, 1);
    for (int i = 0; i < 100000; i++)
        cpu_relax();
    CHECK(1, irq_count(0, 0x40) == 0);
    irq_enable();
    CHECK(2, irq_wait(0, 0x40, 1, SPINS) && irq_last_vector(0) == 0x40);
    outb(ASK, 2);
    CHECK(3, irq_wait(0, 0x41, 1, SPINS) && seen_vector == 0x41);
    irq_disable();
    outb(ASK, 2);
    for (int i = 0; i < 100000; i++)
        cpu_relax();
    CHECK(4, irq_count(0, 0x41) == 1);
    irq_enable();
    CHECK(5, irq_wait(0, 0x41, 2, SPINS));
    return 0;
}
