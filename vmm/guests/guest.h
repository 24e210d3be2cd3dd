/* The guest library of the project's test guests: port I/O, MMIO, the
 * command line, and the ways a guest ends.  Everything here runs in
 * ring 3 (IOPL 3), see start.S. */
#ifndef SPLITVMM_GUEST_H
#define SPLITVMM_GUEST_H

#include <stddef.h>
#include <stdint.h>

#define GUEST_MAX_CPUS 8
#define TEST_EXIT_PORT 0xf4         /* QEMU isa-debug-exit,iobase=0xf4 */
#define POWER_OFF_PORT 0x604        /* ACPI PM1a control (QEMU q35/PIIX4) */
#define POWER_OFF_SLP_EN 0x2000
#define VCPU_PARK_PORT 0x0ff0       /* splitvmm: a write stops this vCPU */

static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port) : "memory"); }
static inline void outw(uint16_t port, uint16_t v) { __asm__ volatile("outw %0, %1" :: "a"(v), "Nd"(port) : "memory"); }
static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(port) : "memory"); }
static inline uint8_t inb(uint16_t port) { uint8_t v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port) : "memory"); return v; }
static inline uint16_t inw(uint16_t port) { uint16_t v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port) : "memory"); return v; }
static inline uint32_t inl(uint16_t port) { uint32_t v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port) : "memory"); return v; }

/* String forms: "rep outsb/insb" etc., count elements of the given size. */
static inline void outsb(uint16_t port, const void *buf, size_t n) { __asm__ volatile("rep outsb" : "+S"(buf), "+c"(n) : "d"(port) : "memory"); }
static inline void insb(uint16_t port, void *buf, size_t n) { __asm__ volatile("rep insb" : "+D"(buf), "+c"(n) : "d"(port) : "memory"); }
static inline void outsl(uint16_t port, const void *buf, size_t n) { __asm__ volatile("rep outsl" : "+S"(buf), "+c"(n) : "d"(port) : "memory"); }
static inline void insl(uint16_t port, void *buf, size_t n) { __asm__ volatile("rep insl" : "+D"(buf), "+c"(n) : "d"(port) : "memory"); }

#define MMIO(type, addr) (*(volatile type *)(uintptr_t)(addr))
static inline uint8_t mmio_read8(uint64_t a) { return MMIO(uint8_t, a); }
static inline uint16_t mmio_read16(uint64_t a) { return MMIO(uint16_t, a); }
static inline uint32_t mmio_read32(uint64_t a) { return MMIO(uint32_t, a); }
static inline uint64_t mmio_read64(uint64_t a) { return MMIO(uint64_t, a); }
static inline void mmio_write8(uint64_t a, uint8_t v) { MMIO(uint8_t, a) = v; }
static inline void mmio_write16(uint64_t a, uint16_t v) { MMIO(uint16_t, a) = v; }
static inline void mmio_write32(uint64_t a, uint32_t v) { MMIO(uint32_t, a) = v; }
static inline void mmio_write64(uint64_t a, uint64_t v) { MMIO(uint64_t, a) = v; }

static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }

/* Ends the run: the VMM exits with status (v << 1) | 1. */
__attribute__((noreturn)) void test_exit(uint32_t v);
/* Ends the run cleanly: the VMM exits with status 0. */
__attribute__((noreturn)) void power_off(void);
/* Stops this vCPU for good (splitvmm's park port; the run ends cleanly
 * once every vCPU is parked).  Spins where no VMM serves the port. */
__attribute__((noreturn)) void park_cpu(void);

/* The PVH command line, and the value of "key=value" on it (decimal or
 * 0x-hex), or dflt. */
const char *guest_cmdline(void);
uint64_t guest_arg(const char *key, uint64_t dflt);

/* Written by the test: vCPU 0 runs guest_main() and ends the run with
 * its result (0: power off; v: test_exit(v)); vCPU n > 0 runs
 * guest_ap_main(n) (default: nothing) and then parks. */
int guest_main(void);
void guest_ap_main(unsigned cpu);
/* Runs in ring 0 on each CPU before ring 3 (default: nothing). */
void guest_ring0_init(unsigned cpu);

void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);

#endif
