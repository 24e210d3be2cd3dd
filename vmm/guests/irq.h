/* Interrupts for the project's test guests: an IDT whose gates enter a
 * tiny ring-0 stub, the local APIC, the IOAPIC and the 8259 PICs.
 *
 * How an interrupt arrives (measured on the PVM development host and
 * matching bare metal / QEMU): the guest runs in ring 3; a device raises
 * an MSI or an irqchip pin; the vCPU's LAPIC accepts the vector; the CPU
 * takes interrupt gate N of the IDT (start.S loads it on every CPU),
 * switching to the TSS rsp0 stack; the stub (irq.S) counts the vector for
 * this CPU, calls the C handler installed for it if any, writes the LAPIC
 * EOI and returns to ring 3 with iretq.  Ring 0 is instruction-emulated
 * on that host (~0.5 us an instruction), so the stub is 18 instructions,
 * and a C handler, if you install one, should be short.
 *
 * Why the IDT works under PVM: the PVM specification (RFC, Documentation/
 * virt/kvm/x86/pvm-spec.rst, "PVM modes and states", "MSR_PVM_EVENT_ENTRY")
 * ignores IDT and TR and sends events from user mode to
 * MSR_PVM_EVENT_ENTRY, with the interrupted state in the PVCS -- but only
 * in PVM mode, which a PVM-aware kernel enters by programming the PVM
 * MSRs.  These guests never do; they stay in what the spec calls non-PVM
 * (bootstrap) mode, "implementation-defined" and meant to follow the plain
 * x86 ABI, and there this host delivers external interrupts through the
 * guest's IDT and TSS as x86 does (measured: MSIs and IOAPIC pins, one and
 * two vCPUs, tests/vmm/test_interrupts.py).
 *
 * Ring 3 cannot change its own interrupt flag here: sti, cli and int n
 * from ring 3 fault on the PVM host (it runs user mode with the host's
 * IOPL 0; measured: each ends the run with a triple fault), so a guest that takes
 * interrupts says IRQ_RING3_INTERRUPTS_ON once at file scope and start.S
 * enters ring 3 with RFLAGS.IF = 1 (the iretq sets it, on every host).
 * From then on interrupts are gated by the local APIC's task priority
 * (SDM Vol. 3A §11.8.3.1): irq_disable() raises the TPR to 0xf0, which
 * holds back every vector, irq_enable() lowers it to 0.  Without the
 * macro ring 3 runs with IF = 0 as before, and nothing is delivered.
 *
 * Everything in this header runs in ring 3, except the handlers you
 * install (ring 0, interrupts off).  Vectors 32..255 may be used; 0..31
 * (exceptions) have no gate, so an exception still ends the run with a
 * triple fault the VMM reports.
 *
 * Intel SDM Vol. 3A §6.10-6.14 (IDT, 64-bit gates), §11.4-11.8 (LAPIC),
 * §11.11 (MSI address/data); 82093AA IOAPIC datasheet §3.2.4.
 */
#ifndef SPLITVMM_IRQ_H
#define SPLITVMM_IRQ_H

#include "guest.h"

#define IRQ_FIRST_VECTOR 32
#define IRQ_VECTORS 256

#define LAPIC_BASE 0xfee00000u
#define LAPIC_REG_ID 0x20
#define LAPIC_REG_TPR 0x80
#define LAPIC_REG_EOI 0xb0
#define LAPIC_REG_SVR 0xf0
#define LAPIC_SVR_ENABLE 0x100
#define LAPIC_TPR_BLOCK_ALL 0xf0    /* priority class 15: no vector gets through */
#define LAPIC_SPURIOUS_VECTOR 0xff

#define IOAPIC_BASE 0xfec00000u
#define IOAPIC_REGSEL 0x00
#define IOAPIC_WINDOW 0x10
#define IOAPIC_REDTBL(pin) (0x10 + 2 * (pin))
#define IOAPIC_PINS 24
#define IOAPIC_MASKED (1u << 16)
#define IOAPIC_LEVEL (1u << 15)

#define PIC1_DATA 0x21
#define PIC2_DATA 0xa1

/* MSI address for a fixed, physical-destination message to APIC id
 * `apic_id` (SDM Vol. 3A §11.11.1), and its data for `vector`, edge. */
#define MSI_ADDRESS(apic_id) (0xfee00000u | ((uint32_t)(apic_id) << 12))
#define MSI_DATA(vector) ((uint32_t)(vector) & 0xff)

/* A handler runs in ring 0 with interrupts off, after the vector has been
 * counted and before the EOI.  Keep it short: ring 0 is emulated. */
typedef void (*irq_handler_t)(unsigned vector);

/* At file scope in a guest that takes interrupts: ring 3 starts with
 * RFLAGS.IF = 1 (start.S reads guest_ring3_rflags; IOPL 3, bit 1). */
#define IRQ_RING3_INTERRUPTS_ON const uint64_t guest_ring3_rflags = 0x3202


/* Fills the IDT gates of vectors 32..255 (ring 3 writes the table, start.S
 * has loaded it on every CPU), masks both 8259 PICs (so nothing arrives
 * through them unasked), and enables this CPU's local APIC (SVR) with
 * every vector held back (TPR 0xf0) until irq_enable().  Call it
 * once on vCPU 0, then irq_cpu_init() on every other vCPU that takes
 * interrupts. */
void irq_init(void);
/* Enables this CPU's local APIC (spurious vector 0xff, TPR 0xf0). */
void irq_cpu_init(void);
/* Installs `fn` (or NULL: count only) for `vector`. */
void irq_set_handler(unsigned vector, irq_handler_t fn);
/* Lets every vector through to this CPU (TPR 0), or holds every one
 * back (TPR 0xf0; held ones stay pending in the IRR).  Each is one LAPIC
 * MMIO write. */
void irq_enable(void);
void irq_disable(void);

/* This CPU's local APIC id, and the LAPIC EOI (the stub already sends one
 * after every vector; this is for code that takes vectors other ways). */
unsigned lapic_id(void);
void lapic_eoi(void);

/* Programs IOAPIC pin `pin` to deliver `vector` to APIC id `apic_id`,
 * edge-triggered, active high, fixed, physical destination (unmasked);
 * irq_pin_mask() masks it again.  With KVM's default routing, ISA IRQ n
 * (GSI n) is IOAPIC pin n. */
void ioapic_route(unsigned pin, unsigned vector, unsigned apic_id);
void ioapic_mask(unsigned pin);

/* Interrupts of `vector` counted on CPU `cpu` so far, and the last vector
 * CPU `cpu` took (0: none yet). */
uint32_t irq_count(unsigned cpu, unsigned vector);
unsigned irq_last_vector(unsigned cpu);
/* Spins in ring 3 until CPU `cpu` has counted at least `n` of `vector`,
 * at most `spins` rounds of cpu_relax(); returns 1 when it got there. */
int irq_wait(unsigned cpu, unsigned vector, uint32_t n, uint64_t spins);

#endif
