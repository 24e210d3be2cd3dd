/* virtio-blk benchmark and probe guest (vmm/bench/virtio_blk.py), built
 * with vmm/guests/{virtio,pci,serial}.c.  The same ELF runs under
 * `vmm run` and under `qemu-system-x86_64 -kernel`.
 *
 * It finds the devices with the library of virtio.h and prints what it
 * found (PCI functions, BARs, features, capacity, block size, the disk's
 * id, 16 bytes of virtio-rng when there is one), then checks a write /
 * read-back / restore of the disk's last 4 KiB and a flush, then runs
 *   phase "seq1m":  sequential 1 MiB reads over the first `span` MiB of
 *                   the disk, `passes` times per round (after one warm-up
 *                   pass before the first round);
 *   phase "rand4k": `n4k` 4 KiB reads at random 4 KiB-aligned offsets
 *                   in the same span, queue depth 1;
 *   phase "rand4k_qd<D>" (qd=D > 1): `n4k` such reads, D in flight on
 *                   each of the `queues` queues, one vCPU driving the
 *                   queues round-robin: fill every queue, one doorbell
 *                   each, then per queue reap what completed, verify,
 *                   refill, one doorbell per queue per round;
 *   check "mqcheck=1" (instead of the phases): writes sectors [0, n4k*8)
 *                   in 4 KiB requests spread over the queues at depth qd,
 *                   with a pattern of (sector, seed), then reads them
 *                   back the same way and verifies; every completion must
 *                   be of a request in flight (none twice);
 * timing each with rdtsc (ring 3).  Every read is verified: the host fills
 * the image so that each 512-byte sector begins with its number (u64 LE).
 * The host turns TSC counts into seconds from the "tsc" lines, which it
 * timestamps as they arrive.
 *
 * Command line: bench=0|1 (default 1), span=MiB (default: the whole disk,
 * at most 1024), passes=N (3), n4k=N (4000), msix=0|1 (0: poll the used
 * ring; 1: MSI-X vectors, still polling, interrupts counted), seed=S,
 * queues=N (1; up to 4 with VIRTIO_BLK_F_MQ), qd=D (1: no depth phase),
 * qd1=0 (only the depth phase), rounds=R (1: each phase R times,
 * interleaved: round 1's phases, then round 2's, ...).
 * Output lines: "virtio-blk: ...", "tsc <n>", "result <phase> bytes=<n>
 * requests=<n> tsc=<n>", "done".  Status 0 when everything holds, else
 * test_exit(n) for check n. */
#include "guest.h"
#include "irq.h"
#include "pci.h"
#include "serial.h"
#include "virtio.h"

IRQ_RING3_INTERRUPTS_ON;

#define MiB (1024u * 1024u)
#define MSIX_VECTOR 0x60
#define CHECK(n, cond, ...) do { if (!(cond)) { serial_printf("virtio-blk: check %d failed: ", n); \
        serial_printf(__VA_ARGS__); serial_puts("\n"); test_exit(n); } } while (0)

static uint8_t buf[MiB] __attribute__((aligned(4096)));
static uint8_t save[4096] __attribute__((aligned(4096)));
static struct virtio_blk blk;
static struct virtio_dev rng;

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

static int sectors_ok(const uint8_t *p, uint64_t first, uint32_t sectors)
{
    for (uint32_t i = 0; i < sectors; i++)
        if (*(const uint64_t *)(p + (uint64_t)i * 512) != first + i)
            return 0;
    return 1;
}

static void list_pci(void)
{
    struct pci_dev devs[32];
    unsigned n = pci_scan(devs, 32);
    for (unsigned i = 0; i < n; i++)
        serial_printf("virtio-blk: pci %02x:%02x.%x %04x:%04x class %06x\n", devs[i].bdf >> 16,
                      (devs[i].bdf >> 11) & 0x1f, (devs[i].bdf >> 8) & 7, devs[i].vendor, devs[i].device,
                      devs[i].class_rev >> 8);
}

static void probe_rng(void)
{
    int err = virtio_rng_init(&rng, 0);
    if (err == VIRTIO_ENODEV) {
        serial_puts("virtio-blk: no virtio-rng\n");
        return;
    }
    CHECK(10, err == 0, "virtio-rng init: %s", virtio_strerror(err));
    uint8_t r[16];
    memset(r, 0, sizeof r);
    int64_t got = virtio_rng_read(&rng, r, sizeof r);
    CHECK(11, got == 16, "virtio-rng read: %s", virtio_strerror((int)got));
    serial_printf("virtio-blk: rng %02x:%02x.%x features %#lx: ", rng.pci.bdf >> 16, (rng.pci.bdf >> 11) & 0x1f,
                  (rng.pci.bdf >> 8) & 7, rng.features);
    for (int i = 0; i < 16; i++)
        serial_printf("%02x", r[i]);
    serial_puts("\n");
}

static void probe_blk(int msix, unsigned queues)
{
    int err = virtio_blk_init_mq(&blk, 0, msix ? MSIX_VECTOR : 0, queues);
    CHECK(20, err == 0, "init: %s", virtio_strerror(err));
    struct virtio_dev *d = &blk.dev;
    serial_printf("virtio-blk: blk %02x:%02x.%x device %04x common %#lx notify %#lx (x%u) isr %#lx cfg %#lx\n",
                  d->pci.bdf >> 16, (d->pci.bdf >> 11) & 0x1f, (d->pci.bdf >> 8) & 7, d->pci.device, d->common,
                  d->notify_base, d->notify_mult, d->isr, d->device_cfg);
    serial_printf("virtio-blk: features offered %#lx accepted %#lx queues %u used %u size %u msix %s\n",
                  d->device_features, d->features, d->num_queues, blk.nqueues, d->vq[0].size,
                  d->vq[0].irq_vector ? "on" : "off");
    serial_printf("virtio-blk: capacity %lu sectors (%lu MiB) blk_size %u size_max %u seg_max %u%s%s\n",
                  blk.capacity, blk.capacity / 2048, blk.blk_size, blk.size_max, blk.seg_max,
                  blk.read_only ? " ro" : "", blk.has_flush ? " flush" : "");
    char id[VIRTIO_BLK_ID_BYTES + 1];
    err = virtio_blk_get_id(&blk, id);
    serial_printf("virtio-blk: id \"%s\" (%s)\n", err ? "" : id, virtio_strerror(err));
    CHECK(21, blk.capacity >= 16, "capacity %lu", blk.capacity);

    /* read, write, read back, restore: the last 4 KiB */
    uint64_t s = (blk.capacity - 8) & ~7ull;
    CHECK(22, (err = virtio_blk_read(&blk, s, save, 8)) == 0, "read: %s", virtio_strerror(err));
    CHECK(23, sectors_ok(save, s, 8), "pattern at sector %lu: %lx", s, *(uint64_t *)save);
    if (!blk.read_only) {
        for (unsigned i = 0; i < 4096; i++)
            buf[i] = (uint8_t)(i * 7 + 3);
        CHECK(24, (err = virtio_blk_write(&blk, s, buf, 8)) == 0, "write: %s", virtio_strerror(err));
        memset(buf, 0, 4096);
        CHECK(25, (err = virtio_blk_read(&blk, s, buf, 8)) == 0, "read back: %s", virtio_strerror(err));
        for (unsigned i = 0; i < 4096; i++)
            CHECK(26, buf[i] == (uint8_t)(i * 7 + 3), "byte %u reads %02x", i, buf[i]);
        CHECK(27, (err = virtio_blk_write(&blk, s, save, 8)) == 0, "restore: %s", virtio_strerror(err));
        if (blk.has_flush)
            CHECK(28, (err = virtio_blk_flush(&blk)) == 0, "flush: %s", virtio_strerror(err));
        serial_printf("virtio-blk: write, read back, restore%s at sector %lu: ok\n",
                      blk.has_flush ? ", flush" : "", s);
    }
    /* a request beyond the end fails cleanly */
    err = virtio_blk_read(&blk, blk.capacity, buf, 8);
    serial_printf("virtio-blk: read past the end: %s\n", virtio_strerror(err));
    CHECK(29, err == VIRTIO_EIO || err == VIRTIO_EUNSUPP, "read past the end: %s", virtio_strerror(err));
    if (msix)
        serial_printf("virtio-blk: MSI-X interrupts so far %u\n", virtq_irqs(d, 0));
}

#define DEPTH_SLOTS (MiB / 4096)       /* 4 KiB buffers in buf */

static uint64_t slot_sector[DEPTH_SLOTS];

/* `n` 4 KiB requests over blk.nqueues queues, `qd` in flight on each;
 * next(i) gives request i's sector, done(slot, sector) checks one. */
static void at_depth(uint32_t type, uint64_t n, unsigned qd, uint64_t (*next)(uint64_t),
                     void (*done)(uint8_t *, uint64_t), void (*fill)(uint8_t *, uint64_t))
{
    unsigned nq = blk.nqueues;
    CHECK(50, qd >= 1 && qd * nq <= DEPTH_SLOTS && qd <= blk.dev.vq[0].size / 3, "qd %u x %u queues", qd, nq);
    uint64_t issued = 0, completed = 0;
    int err;
    for (unsigned q = 0; q < nq; q++) {
        for (unsigned k = 0; k < qd && issued < n; k++, issued++) {
            unsigned slot = q * qd + k;
            slot_sector[slot] = next(issued);
            if (fill)
                fill(buf + (uint64_t)slot * 4096, slot_sector[slot]);
            err = virtio_blk_submit(&blk, q, type, slot_sector[slot], buf + (uint64_t)slot * 4096, 8, slot);
            CHECK(51, err == 0, "submit: %s", virtio_strerror(err));
        }
        virtio_blk_kick(&blk, q);
    }
    uint64_t idle = 0;
    while (completed < n) {
        int any = 0;
        for (unsigned q = 0; q < nq; q++) {
            uint32_t tag;
            int st, got, refilled = 0;
            while ((got = virtio_blk_complete(&blk, q, &tag, &st)) == 1) {
                any = 1;
                completed++;
                CHECK(52, st == 0 && tag / qd == q, "queue %u tag %u: %s (completed %lu, sector %lu)", q, tag, virtio_strerror(st), completed, slot_sector[tag]);
                done(buf + (uint64_t)tag * 4096, slot_sector[tag]);
                if (issued < n) {
                    slot_sector[tag] = next(issued++);
                    if (fill)
                        fill(buf + (uint64_t)tag * 4096, slot_sector[tag]);
                    err = virtio_blk_submit(&blk, q, type, slot_sector[tag], buf + (uint64_t)tag * 4096, 8, tag);
                    CHECK(53, err == 0, "submit: %s", virtio_strerror(err));
                    refilled = 1;
                }
            }
            CHECK(54, got == 0, "queue %u: a completion of a request not in flight", q);
            if (refilled)
                virtio_blk_kick(&blk, q);
        }
        idle = any ? 0 : idle + 1;
        CHECK(55, idle < 4000000000ull, "no completion (%lu of %lu)", completed, n);
        if (!any)
            cpu_relax();
    }
    for (unsigned q = 0; q < nq; q++)
        CHECK(56, blk.inflight[q] == 0, "queue %u: %u still in flight", q, blk.inflight[q]);
}

static uint64_t span_blocks;
static uint64_t next_random(uint64_t i) { (void)i; return (rnd() % span_blocks) * 8; }
static void check_pattern(uint8_t *p, uint64_t s)
{
    CHECK(57, *(uint64_t *)p == s && *(uint64_t *)(p + 3584) == s + 7, "4 KiB read at %lu: wrong data", s);
}
static uint64_t next_linear(uint64_t i) { return i * 8; }
static uint64_t check_seed;
static void fill_check(uint8_t *p, uint64_t s)
{
    for (unsigned i = 0; i < 4096; i += 8)
        *(uint64_t *)(p + i) = (s * 4096 + i) ^ check_seed;
}
static void verify_check(uint8_t *p, uint64_t s)
{
    for (unsigned i = 0; i < 4096; i += 8)
        CHECK(58, *(uint64_t *)(p + i) == ((s * 4096 + i) ^ check_seed), "sector %lu byte %u reads back wrong", s,
              i);
}
static void no_check(uint8_t *p, uint64_t s) { (void)p; (void)s; }

static void mqcheck(void)
{
    uint64_t n = guest_arg("n4k", 256);
    unsigned qd = (unsigned)guest_arg("qd", 32);
    check_seed = guest_arg("seed", 12345) * 0x9e3779b97f4a7c15ull;
    CHECK(59, n * 8 + 8 <= blk.capacity, "n4k %lu too large", n);
    at_depth(VIRTIO_BLK_T_OUT, n, qd, next_linear, no_check, fill_check);
    memset(buf, 0, MiB);
    at_depth(VIRTIO_BLK_T_IN, n, qd, next_linear, verify_check, NULL);
    serial_printf("virtio-blk: mqcheck %lu writes and reads over %u queues at depth %u: ok (requests %lu)\n", n,
                  blk.nqueues, qd, blk.requests);
    uint64_t bad = 0;
    for (unsigned q = 0; q < blk.nqueues; q++)
        bad += blk.dev.vq[q].bad_used_idx;
    serial_printf("virtio-blk: used idx reads ahead of the requests in flight (ignored): %lu\n", bad);
}

static void bench(void)
{
    uint64_t span_mib = guest_arg("span", blk.capacity / 2048);
    if (span_mib > 1024)
        span_mib = 1024;
    if (span_mib > blk.capacity / 2048)
        span_mib = blk.capacity / 2048;
    if (span_mib * 2048 + 8 > blk.capacity && span_mib > 1)
        span_mib--;                     /* keep clear of the scratch 4 KiB */
    uint64_t passes = guest_arg("passes", 3), n4k = guest_arg("n4k", 4000);
    rng_state = guest_arg("seed", 12345) | 1;
    CHECK(40, span_mib >= 1, "disk too small");
    serial_printf("virtio-blk: bench span %lu MiB passes %lu n4k %lu\n", span_mib, passes, n4k);
    serial_printf("tsc %lu\n", rdtsc());

    int err;
    int qd1 = (int)guest_arg("qd1", 1);      /* 0: only the depth phase */
    uint64_t rounds = guest_arg("rounds", 1);
    unsigned qd = (unsigned)guest_arg("qd", 1);
    uint64_t blocks = span_mib * 256;
    span_blocks = blocks;
    for (uint64_t m = 0; qd1 && m < span_mib; m++) {             /* warm-up: the whole span once */
        err = virtio_blk_read(&blk, m * 2048, buf, 2048);
        CHECK(41, err == 0, "1 MiB read at %lu MiB: %s", m, virtio_strerror(err));
    }
    /* `rounds` short rounds, each phase once per round, so that a burst of
     * load on the host hits one round's samples of every phase alike */
    for (uint64_t round = 0; round < rounds; round++) {
        for (uint64_t pass = 0; qd1 && pass < passes; pass++) {
            uint64_t t0 = rdtsc();
            for (uint64_t m = 0; m < span_mib; m++) {
                err = virtio_blk_read(&blk, m * 2048, buf, 2048);
                CHECK(41, err == 0, "1 MiB read at %lu MiB: %s", m, virtio_strerror(err));
                CHECK(42, sectors_ok(buf, m * 2048, 2048), "1 MiB read at %lu MiB: wrong data", m);
            }
            uint64_t t1 = rdtsc();
            serial_printf("result seq1m bytes=%lu requests=%lu tsc=%lu\n", span_mib * MiB, span_mib, t1 - t0);
        }
        uint64_t t0 = rdtsc();
        for (uint64_t i = 0; qd1 && i < n4k; i++) {
            uint64_t s = (rnd() % blocks) * 8;
            err = virtio_blk_read(&blk, s, buf, 8);
            CHECK(43, err == 0, "4 KiB read at sector %lu: %s", s, virtio_strerror(err));
            CHECK(44, *(uint64_t *)buf == s && *(uint64_t *)(buf + 3584) == s + 7, "4 KiB read at %lu: wrong data",
                  s);
        }
        uint64_t t1 = rdtsc();
        if (qd1)
            serial_printf("result rand4k bytes=%lu requests=%lu tsc=%lu\n", n4k * 4096, n4k, t1 - t0);
        if (qd > 1) {
            t0 = rdtsc();
            at_depth(VIRTIO_BLK_T_IN, n4k, qd, next_random, check_pattern, NULL);
            t1 = rdtsc();
            serial_printf("result rand4k_qd%u_q%u bytes=%lu requests=%lu tsc=%lu\n", qd, blk.nqueues, n4k * 4096,
                          n4k, t1 - t0);
        }
    }
    serial_printf("tsc %lu\n", rdtsc());
    serial_printf("virtio-blk: notifies %lu suppressed %lu interrupts %u\n", blk.dev.vq[0].notifies,
                  blk.dev.vq[0].kicks_suppressed, virtq_irqs(&blk.dev, 0));
}

int guest_main(void)
{
    serial_init(COM1_BASE);
    int msix = (int)guest_arg("msix", 0);
    if (msix) {
        irq_init();
        irq_enable();
    }
    serial_puts("virtio-blk: guest up\n");
    list_pci();
    probe_rng();
    probe_blk(msix, (unsigned)guest_arg("queues", 1));
    if (guest_arg("mqcheck", 0))
        mqcheck();
    else if (guest_arg("bench", 1))
        bench();
    serial_puts("done\n");
    return 0;
}
