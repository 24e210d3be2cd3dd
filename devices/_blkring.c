/* The C core of virtio-blk's usual request: see devices/blkring.py for
 * what it does and why.  Every value read from guest RAM is read once,
 * into a local, then checked; nothing outside [0, ram_len) is touched. */
#include <stdint.h>
#include <string.h>
#include <errno.h>
#include <sys/uio.h>
#include <time.h>

#include "_blkring.h"

#define F_NEXT 1u
#define F_WRITE 2u
#define F_INDIRECT 4u
#define SECTOR 512u
#define MAX_CHAIN_BYTES (64ull << 20)

struct desc { uint64_t addr; uint32_t len; uint16_t flags, next; };

/* the mapping offset of guest [addr, addr + len), or -1 */
static int64_t where(const struct blk_span *spans, int nspans, uint64_t ram_len, uint64_t addr, uint64_t len)
{
    uint64_t end = addr + len;
    if (end < addr)
        return -1;
    for (int i = 0; i < nspans; i++)
        if (spans[i].first <= addr && end <= spans[i].end) {
            uint64_t off = (uint64_t)((int64_t)addr + spans[i].delta);
            return off + len <= ram_len && off + len >= off ? (int64_t)off : -1;
        }
    return -1;
}

static int get_desc(const uint8_t *ram, uint64_t desc_off, uint32_t i, struct desc *d)
{
    memcpy(d, ram + desc_off + 16ull * i, 16);
    return 0;
}

int blk_scan(const uint8_t *ram, uint64_t ram_len, const struct blk_span *spans, int nspans,
             uint64_t desc_off, uint64_t avail_off, uint32_t size, uint16_t last_avail, uint32_t pending,
             uint64_t capacity, int readonly, struct blk_req *reqs, int max)
{
    /* the rings were checked whole by the caller; check again, cheaply */
    if (size == 0 || (size & (size - 1)) || desc_off + 16ull * size > ram_len
            || avail_off + 6ull + 2ull * size > ram_len)
        return 0;
    int k = 0;
    for (uint32_t n = 0; n < pending && k < max; n++, k++) {
        uint16_t head;
        memcpy(&head, ram + avail_off + 4 + 2ull * ((uint16_t)(last_avail + n) & (size - 1)), 2);
        if (head >= size)
            break;
        int again = 0;          /* a head twice in one batch (a broken driver): the batch ends before it */
        for (int j = 0; j < k; j++)
            again |= reqs[j].head == head;
        if (again)
            break;
        struct desc h, d, s;
        get_desc(ram, desc_off, head, &h);
        if (h.flags != F_NEXT || h.len != 16 || h.next >= size)
            break;
        get_desc(ram, desc_off, h.next, &d);
        if ((d.flags & ~F_WRITE) != F_NEXT || d.next >= size || d.len == 0 || d.len % SECTOR
                || 17ull + d.len > MAX_CHAIN_BYTES)
            break;
        get_desc(ram, desc_off, d.next, &s);
        if (s.flags != F_WRITE || s.len != 1)
            break;
        int64_t ho = where(spans, nspans, ram_len, h.addr, 16);
        int64_t dofs = where(spans, nspans, ram_len, d.addr, d.len);
        int64_t so = where(spans, nspans, ram_len, s.addr, 1);
        if (ho < 0 || dofs < 0 || so < 0)
            break;
        uint32_t type;
        uint64_t sector;
        memcpy(&type, ram + ho, 4);
        memcpy(&sector, ram + ho + 8, 8);
        int write = d.flags & F_WRITE ? 0 : 1;
        if (type != (uint32_t)write || (write && readonly))
            break;          /* (type 0 needs a writable buffer, type 1 a readable one) */
        if (sector > capacity || d.len / SECTOR > capacity - sector)
            break;
        reqs[k] = (struct blk_req){ .sector = sector, .data_off = (uint64_t)dofs, .status_off = (uint64_t)so,
                                    .len = d.len, .head = head, .write = (uint16_t)write };
    }
    return k;
}

/* Keeps the compiler from moving stores across it: the in-flight record
 * is crash-consistent only if its stores reach the mapping in program
 * order (a SIGKILL stops the process between two stores; x86-64 and
 * arm64 keep one thread's stores in order for a later reader that
 * synchronised through the kernel, as the restarted device does). */
#define STORE_ORDER() __asm__ volatile("" ::: "memory")

#define REC_HEADER 64u
#define REC_ENTRY 16u
#define REC_FLAG 8u

int blk_run(uint8_t *ram, uint64_t ram_len, int fd, const struct blk_req *reqs, int k, int taken,
            uint64_t used_off, uint32_t size, uint16_t used_idx, struct blk_record *rec)
{
    if (k < 0 || taken < k)
        return -1;
    if (size == 0 || (size & (size - 1)) || used_off + 6ull + 8ull * size > ram_len)
        return 0;           /* nothing done: the caller serves them */
    if (rec) {
        /* ipc.inflight.InflightQueue.pop for each taken chain, before any
         * is acted on: the entry's counter, then its flag. */
        for (int i = 0; i < taken; i++)
            if (reqs[i].head >= rec->size || REC_HEADER + REC_ENTRY * ((uint64_t)reqs[i].head + 1) > rec->len)
                return -1;
        for (int i = 0; i < taken; i++) {
            uint8_t *e = rec->base + REC_HEADER + REC_ENTRY * (uint64_t)reqs[i].head;
            uint64_t c = rec->counter++;
            memcpy(e, &c, 8);
            STORE_ORDER();
            e[REC_FLAG] = 1;
            STORE_ORDER();
        }
    }
    int done = k;
    for (int i = 0; i < k; i++) {
        const struct blk_req *r = &reqs[i];
        if (r->data_off + r->len > ram_len || r->status_off >= ram_len) {
            done = i;
            break;
        }
        struct iovec iov = { ram + r->data_off, r->len };
        ssize_t got;
        do
            got = r->write ? pwritev(fd, &iov, 1, (off_t)(r->sector * SECTOR))
                           : preadv(fd, &iov, 1, (off_t)(r->sector * SECTOR));
        while (got < 0 && errno == EINTR);
        if (got != (ssize_t)r->len) {
            done = i;       /* the caller serves this one (and fails or finishes it) */
            break;
        }
        ram[r->status_off] = 0;                         /* VIRTIO_BLK_S_OK */
        uint32_t elem[2] = { r->head, r->write ? 1u : r->len + 1u };
        memcpy(ram + used_off + 4 + 8ull * ((uint16_t)(used_idx + i) & (size - 1)), elem, 8);
    }
    if (done > 0 && rec) {
        /* used->idx once (the guest's commit point, virtio 1.2 2.7.8), then
         * InflightQueue.complete_batch: the flags, then the record's index */
        uint16_t idx = (uint16_t)(used_idx + done);
        STORE_ORDER();
        memcpy(ram + used_off + 2, &idx, 2);
        {
            STORE_ORDER();
            for (int i = 0; i < done; i++)
                rec->base[REC_HEADER + REC_ENTRY * (uint64_t)reqs[i].head + REC_FLAG] = 0;
            STORE_ORDER();
            memcpy(rec->base, &idx, 2);
        }
    }
    return done;
}

/* The requests of a scanned batch (in ring order) that no armed fault can
 * take: each one's sector outside its point's spans and its point's quiet
 * run not used up; each is counted as passed over.  Returns the index of
 * the first request the fault engine must decide (k: none). */
static int blk_faults_pass(struct blk_faults *f, const struct blk_req *reqs, int k)
{
    for (int i = 0; i < k; i++) {
        struct blk_fault_point *p = &f->point[reqs[i].write ? 1 : 0];
        uint64_t sector = reqs[i].sector;
        if (p->quiet == 0 || p->nspans > BLK_FAULT_SPANS)
            return i;
        for (uint32_t s = 0; s < p->nspans; s++)
            if (p->lo[s] <= sector && sector <= p->hi[s])
                return i;
        p->quiet--;
        p->passed++;
    }
    return k;
}

int blk_scan_faults(const uint8_t *ram, uint64_t ram_len, const struct blk_span *spans, int nspans,
                    uint64_t desc_off, uint64_t avail_off, uint32_t size, uint16_t last_avail, uint32_t pending,
                    uint64_t capacity, int readonly, struct blk_req *reqs, int max, struct blk_faults *f)
{
    int k = blk_scan(ram, ram_len, spans, nspans, desc_off, avail_off, size, last_avail, pending, capacity,
                     readonly, reqs, max);
    int ask = blk_faults_pass(f, reqs, k);
    return ask < k ? -(ask + 1) : k;
}

/* Waits (spinning, at most max_ns) for the driver to make a buffer
 * available past last_avail: 1 when avail->idx moved, 0 when the time ran
 * out, -1 for an index outside RAM.  Called with the GIL released (cffi),
 * after a batch: a driver that submits its next request within max_ns is
 * served without the doorbell thread going to sleep and being woken again
 * (on this project's nested host a wake-up of an idle CPU costs 5-70 us;
 * QEMU's iothreads poll the same way, poll-max-ns 32 us by default). */
int blk_wait(const uint8_t *ram, uint64_t ram_len, uint64_t avail_off, uint16_t last_avail, uint64_t max_ns)
{
    if (avail_off > ram_len || ram_len - avail_off < 4 || (avail_off & 1))
        return -1;
    const volatile uint16_t *idx = (const volatile uint16_t *)(ram + avail_off + 2);
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (unsigned spins = 1;; spins++) {
        if (*idx != last_avail) {
            __atomic_thread_fence(__ATOMIC_ACQUIRE);    /* the index before the entries it covers */
            return 1;
        }
#if defined(__x86_64__) || defined(__i386__)
        __asm__ volatile("pause");
#elif defined(__aarch64__)
        __asm__ volatile("yield");
#endif
        if (spins % 64 == 0) {
            clock_gettime(CLOCK_MONOTONIC, &t);
            uint64_t ns = (uint64_t)(t.tv_sec - t0.tv_sec) * 1000000000ull + (uint64_t)t.tv_nsec - (uint64_t)t0.tv_nsec;
            if (ns >= max_ns)
                return 0;
        }
    }
}
