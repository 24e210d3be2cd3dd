/* Interrupts from an irq-echo device (devserver/testkinds.py) into this
 * guest's handlers: MSIs to vCPU 0 and vCPU 1, a route re-programmed, an
 * ISA IRQ through the IOAPIC, and requests the VMM must refuse.
 *
 * Command line: dev=PORT (the irq-echo window), cpus=N (1 or 2),
 * pin=GSI (the ISA IRQ to use, default 4).  Ends with power off when
 * every check passes, else test_exit(n) naming the first failed check.
 */
#include "irq.h"

IRQ_RING3_INTERRUPTS_ON;

#define REG_PIN 0x00
#define REG_PIN_TRIGGER 0x04
#define REG_MSI_ADDRESS 0x08
#define REG_MSI_DATA 0x0c
#define REG_MSI_PROGRAM 0x10
#define REG_MSI_TRIGGER 0x14
#define REG_MSI_UNPROGRAM 0x18
#define REG_STATUS 0x1c

#define VEC_MSI0 0x41
#define VEC_MSI1 0x42
#define VEC_MOVED 0x43
#define VEC_PIN 0x44
#define SPINS 200000000ull
#define MAX_ROUTES 64            /* vmm.irq.MAX_VECTORS_PER_DEVICE */

#define CHECK(n, cond) do { if (!(cond)) test_exit(n); } while (0)

static uint16_t dev;
static volatile uint32_t ap_ready, done;

static void reg(unsigned off, uint32_t v) { outl((uint16_t)(dev + off), v); }
static uint32_t status(void) { return inl((uint16_t)(dev + REG_STATUS)); }

static void program(unsigned index, uint32_t address, uint32_t data)
{
    reg(REG_MSI_ADDRESS, address);
    reg(REG_MSI_DATA, data);
    reg(REG_MSI_PROGRAM, index);
}

void guest_ap_main(unsigned cpu)
{
    if (cpu != 1)
        return;
    irq_cpu_init();
    irq_enable();
    ap_ready = 1;
    for (uint64_t i = 0; i < 40 * SPINS && !done; i++)
        cpu_relax();
}

int guest_main(void)
{
    dev = (uint16_t)guest_arg("dev", 0);
    unsigned cpus = (unsigned)guest_arg("cpus", 1);
    unsigned pin = (unsigned)guest_arg("pin", 4);

    irq_init();

    /* 1-3: an MSI to vCPU 0, held back by the TPR until irq_enable() */
    program(0, MSI_ADDRESS(0), MSI_DATA(VEC_MSI0));
    CHECK(1, status() == 0);
    reg(REG_MSI_TRIGGER, 0);
    for (int i = 0; i < 20000; i++)
        cpu_relax();
    CHECK(2, irq_count(0, VEC_MSI0) == 0);
    irq_enable();
    CHECK(3, irq_wait(0, VEC_MSI0, 1, SPINS) && irq_last_vector(0) == VEC_MSI0);

    /* 4: one interrupt per trigger */
    for (uint32_t n = 2; n <= 5; n++) {
        reg(REG_MSI_TRIGGER, 0);
        CHECK(4, irq_wait(0, VEC_MSI0, n, SPINS));
    }

    /* 5: the same vector re-programmed (a route update) */
    program(0, MSI_ADDRESS(0), MSI_DATA(VEC_MOVED));
    CHECK(5, status() == 0);
    reg(REG_MSI_TRIGGER, 0);
    CHECK(6, irq_wait(0, VEC_MOVED, 1, SPINS) && irq_count(0, VEC_MSI0) == 5);

    /* 7-8: an MSI to APIC id 1 lands on vCPU 1 only */
    if (cpus > 1) {
        for (uint64_t i = 0; i < SPINS && !ap_ready; i++)
            cpu_relax();
        CHECK(7, ap_ready);
        program(1, MSI_ADDRESS(1), MSI_DATA(VEC_MSI1));
        reg(REG_MSI_TRIGGER, 1);
        CHECK(8, irq_wait(1, VEC_MSI1, 1, SPINS) && irq_count(0, VEC_MSI1) == 0 &&
                 irq_last_vector(1) == VEC_MSI1);
    }

    /* 9-10: an ISA IRQ through IOAPIC pin `pin` */
    ioapic_route(pin, VEC_PIN, 0);
    reg(REG_PIN, pin);
    CHECK(9, status() == 0);
    reg(REG_PIN_TRIGGER, 0);
    CHECK(10, irq_wait(0, VEC_PIN, 1, SPINS));
    reg(REG_PIN_TRIGGER, 0);
    CHECK(10, irq_wait(0, VEC_PIN, 2, SPINS));

    /* 11-13: refused requests: a pin out of range, an address outside the
     * MSI window, more routes than a device may hold */
    reg(REG_PIN, 24);
    CHECK(11, status() == 1);
    program(2, 0xfed00000u, VEC_MSI0);
    CHECK(12, status() == 1);
    unsigned refused_at = 0;
    for (unsigned i = 2; i < MAX_ROUTES + 4 && !refused_at; i++) {
        program(i, MSI_ADDRESS(0), MSI_DATA(VEC_MSI0));
        if (status() == 1)
            refused_at = i;
    }
    unsigned held = cpus > 1 ? 2 : 1;      /* vectors 0 (and 1) */
    CHECK(13, refused_at == MAX_ROUTES - held + 2);
    for (unsigned i = 2; i < refused_at; i++)
        reg(REG_MSI_UNPROGRAM, i);

    /* 14-15: the device and its routes still work afterwards */
    reg(REG_MSI_TRIGGER, 0);
    CHECK(14, irq_wait(0, VEC_MOVED, 2, SPINS));
    reg(REG_PIN_TRIGGER, 0);
    CHECK(15, irq_wait(0, VEC_PIN, 3, SPINS));

    done = 1;
    return 0;
}
