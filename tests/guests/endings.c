/* Ends the run in the way "mode=" on the command line asks:
 *   0  return 0 from guest_main: power off (status 0)
 *   1  test_exit(value=)           (status (value << 1) | 1)
 *   2  ud2 in ring 3 with no IDT gate for it: triple fault
 *   3  spin in ring 3 forever (for --timeout)
 *   4  an instruction the ring-0 emulator lacks (cmpxchg16b, in ring 0)
 *   5  xrstor in ring 0
 *   6  cmpxchg16b on MMIO from ring 3
 *   7  halt vCPU 0 with interrupts off (ring-0 "cli; hlt")
 *   8  park vCPU 0 (and every other vCPU returns from guest_ap_main)
 *   9  a 1-byte write of value= to the test-exit port
 */
#include "guest.h"

static uint64_t mode(void) { return guest_arg("mode", 0); }

void guest_ring0_init(unsigned cpu)
{
    static __attribute__((aligned(64))) uint8_t area[4096];
    if (cpu != 0)
        return;
    if (mode() == 4) {
        static __attribute__((aligned(16))) uint64_t pair[2];
        __asm__ volatile("xor %%eax, %%eax; xor %%edx, %%edx; xor %%ebx, %%ebx; xor %%ecx, %%ecx;"
                         "lock cmpxchg16b %0" : "+m"(pair) :: "rax", "rbx", "rcx", "rdx", "memory");
    }
    if (mode() == 7)
        __asm__ volatile("cli; hlt");
    if (mode() == 5)
        __asm__ volatile("xor %%eax, %%eax; xor %%edx, %%edx; xrstor %0" :: "m"(area) : "rax", "rdx", "memory");
}

int guest_main(void)
{
    switch (mode()) {
    case 1:
        test_exit((uint32_t)guest_arg("value", 0));
    case 2:
        __asm__ volatile("ud2");
        break;
    case 3:
        for (;;)
            __asm__ volatile("" ::: "memory");
    case 6: {
        uint64_t addr = guest_arg("mmio", 0xd0000000);
        __asm__ volatile("xor %%eax, %%eax; xor %%edx, %%edx; xor %%ebx, %%ebx; xor %%ecx, %%ecx;"
                         "lock cmpxchg16b (%0)" :: "r"(addr) : "rax", "rbx", "rcx", "rdx", "memory");
        break;
    }
    case 8:
        park_cpu();
    case 9:
        outb(TEST_EXIT_PORT, (uint8_t)guest_arg("value", 0));
        for (;;)
            cpu_relax();
    }
    return 0;
}
