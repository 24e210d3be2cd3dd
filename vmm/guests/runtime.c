/* The ring-3 half of the guest library (see guest.h), and its weak
 * defaults. */
#include "guest.h"

/* struct hvm_start_info (xen/include/public/arch-x86/hvm/start_info.h) */
struct hvm_start_info {
    uint32_t magic, version, flags, nr_modules;
    uint64_t modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
    uint32_t memmap_entries, reserved;
};

extern uint64_t guest_start_info;   /* %ebx at entry, saved by start.S */

void test_exit(uint32_t v)
{
    outl(TEST_EXIT_PORT, v);
    for (;;)
        cpu_relax();
}

void power_off(void)
{
    outw(POWER_OFF_PORT, POWER_OFF_SLP_EN);
    for (;;)
        cpu_relax();
}

void park_cpu(void)
{
    outb(VCPU_PARK_PORT, 0);
    for (;;)
        cpu_relax();
}

void guest_finish(int status)
{
    if (status == 0)
        power_off();
    test_exit((uint32_t)status);
}

__attribute__((weak)) void guest_ap_main(unsigned cpu) { (void)cpu; }
__attribute__((weak)) void guest_ring0_init(unsigned cpu) { (void)cpu; }

const char *guest_cmdline(void)
{
    const struct hvm_start_info *si = (const void *)(uintptr_t)guest_start_info;
    if (!si || si->magic != 0x336ec578 || !si->cmdline_paddr)
        return "";
    return (const char *)(uintptr_t)si->cmdline_paddr;
}

static int parse_u64(const char *s, uint64_t *out)
{
    uint64_t v = 0;
    int base = 10, any = 0;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        s += 2;
    }
    for (; *s && *s != ' '; s++, any = 1) {
        int d;
        if (*s >= '0' && *s <= '9') d = *s - '0';
        else if (base == 16 && *s >= 'a' && *s <= 'f') d = *s - 'a' + 10;
        else if (base == 16 && *s >= 'A' && *s <= 'F') d = *s - 'A' + 10;
        else return 0;
        v = v * base + d;
    }
    *out = v;
    return any;
}

uint64_t guest_arg(const char *key, uint64_t dflt)
{
    const char *p = guest_cmdline();
    while (*p) {
        while (*p == ' ')
            p++;
        const char *k = key, *q = p;
        while (*k && *q == *k) {
            k++;
            q++;
        }
        uint64_t v;
        if (!*k && *q == '=' && parse_u64(q + 1, &v))
            return v;
        while (*p && *p != ' ')
            p++;
    }
    return dflt;
}

void *memset(void *dst, int c, size_t n)
{
    unsigned char *d = dst;
    while (n--)
        *d++ = (unsigned char)c;
    return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
    unsigned char *d = dst;
    const unsigned char *s = src;
    while (n--)
        *d++ = *s++;
    return dst;
}
