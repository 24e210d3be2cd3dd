/* Observes the virtio fault points from the guest (tests/vmm/test_faults.py):
 * virtio-blk and virtio-rng through the driver library (vmm/guests/virtio.h),
 * completion by MSI-X, every request recorded for the host -- nothing is
 * judged here, the host compares the records with its plan.
 *
 * Command line: stats=ADDR, rounds=R (blk rounds, default 10), base=S (first
 * sector), seed=X (pattern), rng=N (rng requests, default 6), settle=CYCLES
 * (how long after each completion interrupts are counted, default 50e6),
 * timeout=CYCLES (a request not completed by then is hung, default 6e9).
 *
 * Records (8 u64 each, from stats): [0] the result (blk: status byte; rng:
 * used length; negative: VIRTIO_E*), [1] TSC cycles from kick to completion,
 * [2] cycles from completion to the first interrupt of the settle window (0:
 * none), [3] interrupts in the window, [4] extra used entries found after
 * it, [5] used length, [6] bytes of a read that differ from what was
 * written, [7] what: 1 write, 2 flush, 3 read (| 0x10 * round), 0x100 rng,
 * 0x200 the spurious-interrupt probe.  stats[511] = number of records; the
 * rng bytes at stats + 4096, 16 a request.
 *
 * A driver that sees a bad used element (wrong id, too long, a duplicate)
 * resets the device and sets it up again; a hung request ends the blk part. */
#include "guest.h"
#include "irq.h"
#include "virtio.h"

IRQ_RING3_INTERRUPTS_ON;

#define BLK_VECTOR 0x70
#define RNG_VECTOR 0x60
#define C 4                         /* sectors a request */
#define STATS_REG 0x3800            /* splitvmm's counter register in BAR 0 */

struct hdr { uint32_t type, reserved; uint64_t sector; };
static struct hdr hdr __attribute__((aligned(16)));
static volatile uint8_t status_byte;
static uint8_t wbuf[C * 512] __attribute__((aligned(4096)));
static uint8_t rbuf[C * 512] __attribute__((aligned(4096)));
static uint8_t rng_buf[16] __attribute__((aligned(16)));
static struct virtio_blk blk;
static struct virtio_dev rng;
static volatile uint64_t *stats;
static unsigned nrec;
static uint64_t settle, timeout;

static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

static volatile uint64_t *record(void)
{
    volatile uint64_t *r = stats + 8 * nrec;
    if (nrec < 63)
        nrec++;
    stats[511] = nrec;
    return r;
}

/* Interrupts of `d`'s queue 0 in the settle window after `t`: latency and count. */
static void count_irqs(struct virtio_dev *d, uint32_t before, volatile uint64_t *r)
{
    uint64_t t = rdtsc(), lat = 0;
    while (rdtsc() - t < settle)
        if (!lat && virtq_irqs(d, 0) != before)
            lat = rdtsc() - t;
    r[2] = lat;
    r[3] = virtq_irqs(d, 0) - before;
}

/* One request on queue 0 of `d`: the used length, or VIRTIO_E*. */
static int64_t request(struct virtio_dev *d, const struct virtio_buf *bufs, unsigned n, volatile uint64_t *r)
{
    int head = virtq_add(d, 0, bufs, n);
    if (head < 0)
        return VIRTIO_EINVAL;
    uint32_t before = virtq_irqs(d, 0), id = 0, len = 0;
    uint64_t t0 = rdtsc();
    virtq_kick(d, 0);
    while (!virtq_get(d, 0, &id, &len)) {
        if (rdtsc() - t0 > timeout) {
            r[1] = rdtsc() - t0;
            return VIRTIO_ETIMEOUT;
        }
        cpu_relax();
    }
    r[1] = rdtsc() - t0;
    count_irqs(d, before, r);
    uint32_t xid, xlen;
    r[4] = 0;
    while (r[4] < 8 && virtq_get(d, 0, &xid, &xlen))
        r[4]++;
    r[5] = len;
    if (id != (uint32_t)head)
        return VIRTIO_ERING;
    return len;
}

static int64_t blk_request(uint32_t type, uint64_t sector, void *data, int in, volatile uint64_t *r)
{
    struct virtio_buf bufs[3];
    unsigned n = 0;
    hdr = (struct hdr){type, 0, sector};
    status_byte = 0xee;
    bufs[n++] = (struct virtio_buf){&hdr, sizeof hdr, 0};
    if (data)
        bufs[n++] = (struct virtio_buf){data, C * 512, in};
    bufs[n++] = (struct virtio_buf){(const void *)&status_byte, 1, 1};
    int64_t got = request(&blk.dev, bufs, n, r);
    return got < 0 ? got : status_byte;
}

static int bad(volatile uint64_t *r)
{
    return (int64_t)r[0] == VIRTIO_ERING || r[4];
}

static void blk_part(void)
{
    uint64_t rounds = guest_arg("rounds", 10), base = guest_arg("base", 64), seed = guest_arg("seed", 1);
    for (uint64_t i = 0; i < rounds; i++) {
        uint64_t x = seed + i;
        for (unsigned k = 0; k < sizeof wbuf; k++) {
            x = x * 6364136223846793005ull + 1442695040888963407ull;
            wbuf[k] = (uint8_t)(x >> 56);
        }
        uint64_t sector = base + i * C;
        volatile uint64_t *r = record();
        r[7] = 1 | i << 4;
        r[0] = (uint64_t)blk_request(VIRTIO_BLK_T_OUT, sector, wbuf, 0, r);
        if ((int64_t)r[0] == VIRTIO_ETIMEOUT)
            return;                                  /* hung: the queue is stuck */
        if (bad(r)) {
            if (virtio_blk_init(&blk, 0, BLK_VECTOR))
                test_exit(3);
            continue;
        }
        r = record();
        r[7] = 2 | i << 4;
        r[0] = (uint64_t)blk_request(VIRTIO_BLK_T_FLUSH, 0, 0, 0, r);
        if ((int64_t)r[0] == VIRTIO_ETIMEOUT)
            return;
        memset(rbuf, 0, sizeof rbuf);
        r = record();
        r[7] = 3 | i << 4;
        r[0] = (uint64_t)blk_request(VIRTIO_BLK_T_IN, sector, rbuf, 1, r);
        if ((int64_t)r[0] == VIRTIO_ETIMEOUT)
            return;
        uint64_t diff = 0;
        for (unsigned k = 0; k < sizeof rbuf; k++)
            diff += rbuf[k] != wbuf[k];
        r[6] = diff;
    }
}

static int rng_setup(void)
{
    int err = virtio_pci_init(&rng, VIRTIO_ID_RNG, 0);
    if (!err)
        err = virtio_negotiate(&rng, 0);
    if (!err)
        err = virtio_use_msix(&rng, RNG_VECTOR);
    if (!err)
        err = virtio_setup_queue(&rng, 0);
    if (!err)
        virtio_driver_ok(&rng);
    return err;
}

static void rng_part(void)
{
    uint64_t n = guest_arg("rng", 6);
    for (uint64_t i = 0; i < n && i < 32; i++) {
        volatile uint64_t *r = record();
        r[7] = 0x100 | i << 4;
        memset(rng_buf, 0xee, sizeof rng_buf);
        struct virtio_buf b = {rng_buf, sizeof rng_buf, 1};
        int64_t got = request(&rng, &b, 1, r);
        r[0] = (uint64_t)got;
        memcpy((void *)(stats + 512 + 2 * i), rng_buf, sizeof rng_buf);
        if (got > (int64_t)sizeof rng_buf || bad(r))
            if (rng_setup())
                test_exit(4);
    }
}

int guest_main(void)
{
    stats = (volatile uint64_t *)(uintptr_t)guest_arg("stats", 0);
    settle = guest_arg("settle", 50000000);
    timeout = guest_arg("timeout", 6000000000ull);
    if (!stats)
        test_exit(1);
    irq_init();
    irq_enable();
    if (virtio_blk_init(&blk, 0, BLK_VECTOR))
        test_exit(2);
    /* a read of a register no driver reads: an access fault's spurious interrupt */
    volatile uint64_t *r = record();
    r[7] = 0x200;
    uint32_t before = virtq_irqs(&blk.dev, 0);
    r[0] = mmio_read32(blk.dev.common + STATS_REG);
    count_irqs(&blk.dev, before, r);
    blk_part();
    if (rng_setup())
        test_exit(5);
    rng_part();
    return 0;
}
