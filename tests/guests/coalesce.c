/* Coalesced MMIO: many writes to a coalesced window, then reads that must
 * see every one of them, in order (the coalesce-sum test device,
 * tests/testkinds.py).
 *
 * Command line: win=ADDR (the device's coalesced window), n=N (writes per
 * phase, default 10000), moveto=ADDR (optional: then move the window
 * there and do it again), win2=ADDR (optional: vCPU 1 does the same, at
 * the same time, to a second device's window), shared=1 (with cpus=2: both
 * vCPUs write n values to win at the same time; the count and the sum
 * must be exact).  Ends with status 0 (power off) when every
 * check passes, else test_exit(n) naming the first failed check.
 */
#include "guest.h"
#include "coalesce.h"

static volatile uint32_t ap_go, ap_done;
static volatile uint64_t ap_sum;

static uint64_t write_all(uint64_t win, uint64_t n, uint64_t salt)
{
    uint64_t sum = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t v = value_of(i, salt);
        mmio_write64(win + REG_ADD, v);
        sum += v;
    }
    return sum;
}

void guest_ap_main(unsigned cpu)
{
    uint64_t win2 = guest_arg("win2", 0);
    int shared = (int)guest_arg("shared", 0);
    if (cpu != 1 || (!win2 && !shared))
        return;
    while (!ap_go)
        cpu_relax();
    if (shared)
        ap_sum = write_all(guest_arg("win", 0xd0000000), guest_arg("n", 10000), 3);
    else
        phase(win2, guest_arg("n", 10000), 3, 11);
    __atomic_store_n(&ap_done, 1, __ATOMIC_RELEASE);
}

/* Both vCPUs write to one window at once: nothing lost, nothing twice. */
static void shared_phase(uint64_t win, uint64_t n)
{
    mmio_write64(win + REG_RESET, 1);
    ap_go = 1;
    uint64_t sum = write_all(win, n, 1);
    while (!__atomic_load_n(&ap_done, __ATOMIC_ACQUIRE))
        cpu_relax();
    CHECK(14, mmio_read64(win + REG_COUNT) == 2 * n);
    CHECK(15, mmio_read64(win + REG_SUM) == sum + ap_sum);
}

int guest_main(void)
{
    uint64_t win = guest_arg("win", 0xd0000000);
    uint64_t n = guest_arg("n", 10000);
    uint64_t moveto = guest_arg("moveto", 0);
    uint64_t win2 = guest_arg("win2", 0);

    if (guest_arg("shared", 0)) {
        shared_phase(win, n);
        return 0;
    }
    ap_go = 1;
    phase(win, n, 1, 1);
    if (win2) {
        while (!ap_done)
            cpu_relax();
    }
    if (moveto) {
        mmio_write64(win + REG_MOVE, moveto);
        /* The old window is gone: its registers read all ones. */
        CHECK(4, mmio_read64(win + REG_COUNT) == ~0ull);
        phase(moveto, n, 2, 5);
        /* A write to where the window was reaches nobody. */
        mmio_write64(win + REG_ADD, 7);
        CHECK(8, mmio_read64(moveto + REG_COUNT) == n);
    }
    return 0;
}
