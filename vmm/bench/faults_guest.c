/* Fault-injection cost guest (vmm/bench/faults.py), built with
 * vmm/guests/{virtio,pci,serial}.c.
 *
 * It drives `devs` virtio-blk disks (the 1st, 2nd, ... virtio-blk
 * functions the PCI scan finds: the VMM's --device order) in one VM, so
 * that the variants of the benchmark -- one plan per disk -- share the
 * machine's load: `rounds` rounds (after one warm-up round), each a slice
 * of `n4k` 4 KiB reads at random 4 KiB-aligned offsets, queue depth 1,
 * polling, on every disk in turn, the disk that starts a round rotating;
 * every read verified (the host fills each image so that each 512-byte
 * sector begins with its number, u64 LE) and timed with rdtsc (ring 3).
 *
 * Around the rounds it prints a "tsc" line and then waits `settle` TSC
 * ticks doing no I/O, so that the host can read the device processes'
 * CPU time while they are idle.
 *
 * Command line: devs=N (3, at most 4), rounds=N (30), n4k=N (200),
 * settle=TICKS (0), seed=S.
 * Output lines: "faults: disk <i> id <serial>", "tsc <n>",
 * "result d<i> bytes=<n> requests=<n> tsc=<n>" (one per slice, in round
 * order), "done".  Status 0 when every read held, else test_exit(n) for
 * check n. */
#include "guest.h"
#include "pci.h"
#include "serial.h"
#include "virtio.h"

#define MAX_DEVS 4
#define CHECK(n, cond, ...) do { if (!(cond)) { serial_printf("faults: check %d failed: ", n); \
        serial_printf(__VA_ARGS__); serial_puts("\n"); test_exit(n); } } while (0)

static uint8_t buf[4096] __attribute__((aligned(4096)));
static struct virtio_blk disks[MAX_DEVS];

static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("lfence; rdtsc" : "=a"(lo), "=d"(hi) :: "memory");
    return (uint64_t)hi << 32 | lo;
}

static uint64_t rng_state;
static uint64_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

/* `n` verified 4 KiB reads of disk `d`; the TSC ticks they took. */
static uint64_t slice(unsigned d, uint64_t n)
{
    struct virtio_blk *b = &disks[d];
    uint64_t blocks = b->capacity / 8;
    uint64_t t0 = rdtsc();
    for (uint64_t i = 0; i < n; i++) {
        uint64_t s = (rnd() % blocks) * 8;
        int err = virtio_blk_read(b, s, buf, 8);
        CHECK(3, err == 0, "disk %u: 4 KiB read at sector %lu: %s", d, s, virtio_strerror(err));
        CHECK(4, *(uint64_t *)buf == s && *(uint64_t *)(buf + 3584) == s + 7,
              "disk %u: 4 KiB read at %lu: wrong data", d, s);
    }
    return rdtsc() - t0;
}

int guest_main(void)
{
    serial_init(COM1_BASE);
    unsigned devs = (unsigned)guest_arg("devs", 3);
    uint64_t rounds = guest_arg("rounds", 30), n4k = guest_arg("n4k", 200);
    rng_state = guest_arg("seed", 12345) | 1;
    CHECK(1, devs >= 1 && devs <= MAX_DEVS, "devs=%u (1 to %u)", devs, MAX_DEVS);
    for (unsigned d = 0; d < devs; d++) {
        int err = virtio_blk_init(&disks[d], d, 0);
        CHECK(2, err == 0, "disk %u: init: %s", d, virtio_strerror(err));
        CHECK(2, disks[d].capacity >= 16, "disk %u: capacity %lu", d, disks[d].capacity);
        char id[VIRTIO_BLK_ID_BYTES + 1];
        err = virtio_blk_get_id(&disks[d], id);
        serial_printf("faults: disk %u id %s\n", d, err ? "?" : id);
    }
    uint64_t settle = guest_arg("settle", 0);
    serial_printf("tsc %lu\n", rdtsc());
    for (uint64_t t0 = rdtsc(); rdtsc() - t0 < settle;)
        cpu_relax();
    for (uint64_t r = 0; r <= rounds; r++) {        /* round 0: warm-up, not reported */
        for (unsigned k = 0; k < devs; k++) {
            unsigned d = (unsigned)((r + k) % devs);
            uint64_t t = slice(d, n4k);
            if (r)
                serial_printf("result d%u bytes=%lu requests=%lu tsc=%lu\n", d, n4k * 4096, n4k, t);
        }
    }
    serial_printf("tsc %lu\n", rdtsc());
    for (uint64_t t0 = rdtsc(); rdtsc() - t0 < settle;)
        cpu_relax();
    serial_puts("done\n");
    return 0;
}
