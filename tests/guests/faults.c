/* A guest that keeps going while its devices fail (tests/vmm/test_device_faults.py).
 *
 * Command line: mode=1|2|3|4 (kill, garbage, hog, scribble), a=PORT (device A's PIO
 * window: the one that fails), a_mmio=ADDR (its MMIO window, optional),
 * b=PORT b_mmio=ADDR (device B, which must keep working; optional for
 * kill), sync=PORT (a VMM port the test serves: the guest writes 1 there
 * just before the access that will wait, 2 to ask for the lock to be
 * scribbled, and the value it read to sync+4 right after that access),
 * probe=OFF (the register of A whose read waits), fault=N (the value
 * written to A's fault register 0xFC), free=PORT (a port nobody claims),
 * flag=ADDR (guest RAM the test sets to nonzero once A is cut off).
 *
 * Every check the guest makes has a number; the first that fails ends the
 * run with test_exit(n).  When all pass it ends with test_exit(PASS), so
 * the status also proves the guest ran to its end.
 */
#include "guest.h"

#define PASS 0x2a
#define FAULT_REG 0xfc
#define FAULT_HOG_LATER 5
#define LIMIT 2000000u                  /* bound of every wait loop */
#define ONES32 0xffffffffu

#define CHECK(n, cond) do { if (!(cond)) test_exit(n); } while (0)

static uint16_t a, b, sync_port, free_port;
static uint64_t a_mmio, b_mmio;

/* Device B answers, through both windows. */
static void b_works(unsigned rounds, int n)
{
    for (unsigned i = 0; i < rounds; i++) {
        uint16_t off = (uint16_t)(4 * (i % 32));
        outl((uint16_t)(b + off), 0x0b000000u + i);
        CHECK(n, inl((uint16_t)(b + off)) == 0x0b000000u + i);
        if (b_mmio) {
            mmio_write64(b_mmio + 0x80 + 8 * (i % 8), 0xb0b0000000000000ull + i);
            CHECK(n + 1, mmio_read64(b_mmio + 0x80 + 8 * (i % 8)) == 0xb0b0000000000000ull + i);
        }
    }
}

/* Device A works before its fault. */
static void a_works(void)
{
    outl(a, 0x11223344);
    CHECK(1, inl(a) == 0x11223344);
    if (a_mmio) {
        mmio_write64(a_mmio + 8, 0x5566778899aabbccull);
        CHECK(2, mmio_read64(a_mmio + 8) == 0x5566778899aabbccull);
        CHECK(3, inl((uint16_t)(a + 8)) == 0x99aabbccu);
    }
}

/* Device A is gone: everything of it reads all ones, writes vanish. */
static void a_gone(int n)
{
    CHECK(n, inl(a) == ONES32);
    outl(a, 7);
    CHECK(n, inl(a) == ONES32 && inb((uint16_t)(a + 0x10)) == 0xff);
    if (a_mmio)
        CHECK(n + 1, mmio_read64(a_mmio + 8) == ~0ull && mmio_read32(a_mmio) == ONES32);
}

static int kill_mode(void)
{
    a_works();
    if (b)
        b_works(16, 10);
    outl(sync_port, 1);                 /* the test arms the kill */
    uint32_t v = inl((uint16_t)(a + guest_arg("probe", 0)));   /* waits; A dies */
    outl((uint16_t)(sync_port + 4), v); /* the test notes when it completed */
    CHECK(20, v == ONES32);             /* a dead device's read: all ones */
    a_gone(21);
    if (b)
        b_works(64, 23);
    return PASS;
}

static int garbage_mode(void)
{
    a_works();
    b_works(16, 10);
    outl((uint16_t)(a + FAULT_REG), (uint32_t)guest_arg("fault", 1));
    /* A is cut off soon; B is used all along and never notices. */
    for (uint32_t i = 0;; i++) {
        CHECK(20, i < LIMIT);
        uint16_t off = (uint16_t)(4 * (i % 32));
        outl((uint16_t)(b + off), i);
        CHECK(21, inl((uint16_t)(b + off)) == i);
        uint32_t va = inl(a);
        if (va == ONES32)
            break;
        CHECK(22, va == 0x11223344);   /* until then A still answers, correctly */
    }
    b_works(256, 23);
    a_gone(25);
    return PASS;
}

static int hog_mode(void)
{
    a_works();
    b_works(16, 10);
    uint32_t fault = (uint32_t)guest_arg("fault", 4);
    outl((uint16_t)(a + FAULT_REG), fault);   /* HOG: the put of this write stalls */
    if (fault == FAULT_HOG_LATER) {
        /* Only lookups now (nobody claims free_port, so no put): the lock
         * is taken while the vCPU waits in one; every read is all ones. */
        volatile uint8_t *flag = (volatile uint8_t *)(uintptr_t)guest_arg("flag", 0);
        for (uint32_t i = 0; !*flag; i++) {
            CHECK(20, i < LIMIT);
            CHECK(21, inl(free_port) == ONES32);
        }
    }
    b_works(256, 22);
    a_gone(24);
    return PASS;
}

static int scribble_mode(void)
{
    a_works();
    b_works(16, 10);
    outl(sync_port, 2);                 /* the test writes over the lock */
    /* Every access now misses the lock deadline and reads all ones; the
     * VMM ends the run once the lock is found unusable. */
    for (uint32_t i = 0; i < LIMIT; i++)
        CHECK(20, inl(b) == ONES32 || inl(b) == 0x0b000000u);
    return 21;                          /* should not get here */
}

int guest_main(void)
{
    a = (uint16_t)guest_arg("a", 0x2000);
    a_mmio = guest_arg("a_mmio", 0);
    b = (uint16_t)guest_arg("b", 0);
    b_mmio = guest_arg("b_mmio", 0);
    sync_port = (uint16_t)guest_arg("sync", 0x500);
    free_port = (uint16_t)guest_arg("free", 0x3000);
    switch (guest_arg("mode", 0)) {
    case 1: return kill_mode();
    case 2: return garbage_mode();
    case 3: return hog_mode();
    case 4: return scribble_mode();
    default: return 99;
    }
}
