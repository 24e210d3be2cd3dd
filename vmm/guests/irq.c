/* The ring-3 half of the interrupt library (irq.h); the ring-0 stubs are
 * in irq.S. */
#include "irq.h"

struct idt_gate {
    uint16_t offset_lo, selector;
    uint8_t ist, type_attr;
    uint16_t offset_mid;
    uint32_t offset_hi, zero;
} __attribute__((packed));

extern struct idt_gate idt[IRQ_VECTORS];
extern char irq_stubs[];
extern volatile uint32_t irq_counts[GUEST_MAX_CPUS][IRQ_VECTORS];
extern volatile uint32_t irq_last[GUEST_MAX_CPUS];
extern irq_handler_t volatile irq_handlers[IRQ_VECTORS];

#define SEL_KCODE 0x08
#define GATE_INTERRUPT_DPL0 0x8e    /* present, DPL 0, 64-bit interrupt gate */

static struct idt_gate gate(void *entry, uint8_t type_attr)
{
    uint64_t addr = (uint64_t)(uintptr_t)entry;
    struct idt_gate g = {
        .offset_lo = (uint16_t)addr, .selector = SEL_KCODE, .ist = 0,
        .type_attr = type_attr, .offset_mid = (uint16_t)(addr >> 16),
        .offset_hi = (uint32_t)(addr >> 32), .zero = 0,
    };
    return g;
}

static inline uint32_t lapic_read(unsigned reg) { return mmio_read32(LAPIC_BASE + reg); }
static inline void lapic_write(unsigned reg, uint32_t v) { mmio_write32(LAPIC_BASE + reg, v); }

void irq_init(void)
{
    for (unsigned v = IRQ_FIRST_VECTOR; v < IRQ_VECTORS; v++)
        idt[v] = gate(irq_stubs + 16 * (v - IRQ_FIRST_VECTOR), GATE_INTERRUPT_DPL0);
    outb(PIC1_DATA, 0xff);
    outb(PIC2_DATA, 0xff);
    __asm__ volatile("" ::: "memory");
    irq_cpu_init();
}

void irq_cpu_init(void)
{
    lapic_write(LAPIC_REG_TPR, LAPIC_TPR_BLOCK_ALL);
    lapic_write(LAPIC_REG_SVR, LAPIC_SVR_ENABLE | LAPIC_SPURIOUS_VECTOR);
}

void irq_set_handler(unsigned vector, irq_handler_t fn)
{
    if (vector < IRQ_VECTORS)
        irq_handlers[vector] = fn;
}

void irq_enable(void) { lapic_write(LAPIC_REG_TPR, 0); }
void irq_disable(void) { lapic_write(LAPIC_REG_TPR, LAPIC_TPR_BLOCK_ALL); }

unsigned lapic_id(void) { return lapic_read(LAPIC_REG_ID) >> 24; }
void lapic_eoi(void) { lapic_write(LAPIC_REG_EOI, 0); }

static void ioapic_write(unsigned reg, uint32_t v)
{
    mmio_write32(IOAPIC_BASE + IOAPIC_REGSEL, reg);
    mmio_write32(IOAPIC_BASE + IOAPIC_WINDOW, v);
}

void ioapic_route(unsigned pin, unsigned vector, unsigned apic_id)
{
    if (pin >= IOAPIC_PINS)
        return;
    ioapic_write(IOAPIC_REDTBL(pin) + 1, (uint32_t)apic_id << 24);
    ioapic_write(IOAPIC_REDTBL(pin), vector & 0xff);
}

void ioapic_mask(unsigned pin)
{
    if (pin < IOAPIC_PINS)
        ioapic_write(IOAPIC_REDTBL(pin), IOAPIC_MASKED);
}

uint32_t irq_count(unsigned cpu, unsigned vector)
{
    if (cpu >= GUEST_MAX_CPUS || vector >= IRQ_VECTORS)
        return 0;
    return irq_counts[cpu][vector];
}

unsigned irq_last_vector(unsigned cpu)
{
    return cpu < GUEST_MAX_CPUS ? irq_last[cpu] : 0;
}

int irq_wait(unsigned cpu, unsigned vector, uint32_t n, uint64_t spins)
{
    for (uint64_t i = 0; i < spins; i++) {
        if (irq_count(cpu, vector) >= n)
            return 1;
        cpu_relax();
    }
    return irq_count(cpu, vector) >= n;
}
