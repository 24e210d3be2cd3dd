/* Access slots' C core: one shared-memory segment per device holding one
 * request slot per vCPU, a doorbell futex the device sleeps on, and the
 * device's published serve-loop counters.
 *
 * Layout (offsets fixed by the version, sizes recorded in the header):
 *
 *   header   magic, version, sizes               (line 0)
 *            doorbell, device_sleeping            (line 1)
 *            published device counters            (line 2)
 *   slots    nslots x struct slot: a request line the VMM writes and a
 *            response line the device writes (128 bytes each)
 *
 * One access (a vCPU thread of the VMM, then the device's serving thread):
 *
 *   VMM     write the request; req_seq = seq; doorbell++;
 *           if device_sleeping: futex_wake(doorbell)
 *           spin on rsp_seq == seq, then vmm_waiting = 1 and futex_wait
 *           on rsp_seq in slices until the deadline
 *   device  poll every slot for req_seq != the seq it last took, for an
 *           adaptive window after each request (KVM halt-polling style);
 *           then device_sleeping = 1, re-scan, futex_wait(doorbell)
 *           answer: rsp_value, status, rsp_seq = seq;
 *           if vmm_waiting: futex_wake(rsp_seq)
 *
 * Spinning only pays while the other side runs on another CPU: a spinner
 * sharing a CPU with its peer only delays it (and the scheduler here
 * readily keeps a waker and its wakee on one CPU).  So each side publishes
 * the CPU it runs on (sched_getcpu, a few ns through rseq), and the VMM
 * spins, and the device polls, only while the peer is elsewhere.
 *
 * Each "store the flag, then look at the other side's word" pair uses
 * sequentially consistent atomics (the Dekker pattern), so a wake-up is
 * never lost and no syscall is made while the other side is awake.
 *
 * The device is untrusted (DESIGN.md, "Rules for shared memory"): the VMM
 * takes sizes once at open time and keeps them privately, bounds every
 * loop by its own deadline, accepts an answer only when its sequence
 * number is the one it sent, masks the value to the access size, and
 * refuses unknown statuses.  The VMM creates the segment as a sealed
 * memfd, so the device cannot shrink it under the VMM's mapping.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <limits.h>
#include <sched.h>
#include <linux/futex.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "_slots.h"

struct slot {
    /* request line: written by the VMM */
    uint32_t req_seq;
    uint32_t space;
    uint32_t size;
    uint32_t is_write;
    uint64_t cookie;
    uint64_t offset;
    uint64_t value;
    uint32_t vmm_waiting;       /* 1 while the VMM sleeps on rsp_seq */
    int32_t vmm_cpu;            /* CPU the caller ran on when it asked */
    uint64_t aseq;              /* the device's access sequence number */
    uint32_t pad0[2];
    /* response line: written by the device */
    uint32_t rsp_seq;           /* written last */
    uint32_t status;
    uint64_t rsp_value;
    uint64_t rsp_aseq;          /* must echo aseq */
    uint8_t pad1[40];
};

struct header {
    uint64_t magic;
    uint32_t version;
    uint32_t header_size;
    uint32_t slot_size;
    uint32_t nslots;
    uint64_t total_size;
    uint8_t pad0[32];
    uint32_t doorbell;          /* bumped by every request; futex word */
    uint32_t device_sleeping;   /* 1 while the device sleeps on doorbell */
    int32_t device_cpu;         /* CPU the device last ran on */
    uint8_t pad1[52];
    struct svs_stats stats;     /* published by the device (untrusted) */
    uint8_t pad2[128 - sizeof(struct svs_stats)];
};

_Static_assert(sizeof(struct slot) == 128, "slot is two cache lines");
_Static_assert(offsetof(struct slot, rsp_seq) == 64, "the response starts the second line");
_Static_assert(sizeof(struct svs_stats) <= 128, "stats fit two cache lines");
_Static_assert(sizeof(struct header) == 256, "header is four cache lines");

/* The private handle: everything either side trusts lives here. */
struct svs {
    uint8_t *base;
    uint64_t size;
    uint32_t nslots;
    struct header *hdr;
    struct slot *slots;
    uint32_t seq[SVS_MAX_SLOTS];    /* VMM: last sent; device: last taken */
    /* VMM: the last request sent on each slot, for svs_answer */
    uint64_t sent_aseq[SVS_MAX_SLOTS];
    uint32_t sent_size[SVS_MAX_SLOTS];
    uint8_t sent_write[SVS_MAX_SLOTS];
    int dead;                       /* VMM: the device was declared dead */
    int32_t caller_cpu;             /* device: CPU of the last request's caller */
    int stop;                       /* device: svs_stop was called */
    uint32_t next_scan;             /* device: round-robin start */
    int64_t poll_max_ns;
    int adaptive;
    int move;                       /* device: move off the caller's CPU */
    int64_t moved_at_ns;
    int64_t window_ns;
    struct svs_stats stats;         /* device side */
    struct svs_client_stats cstats; /* VMM side (updated by many threads) */
};

#define POLL_GROW_START_NS 10000    /* KVM's halt_poll_ns_grow_start */

static __thread int last_errno;

#define STORE(lhs, val) __atomic_store_n(&(lhs), (val), __ATOMIC_SEQ_CST)
#define LOAD(lhs) __atomic_load_n(&(lhs), __ATOMIC_SEQ_CST)
#define RELAXED_STORE(lhs, val) __atomic_store_n(&(lhs), (val), __ATOMIC_RELAXED)
#define RELAXED_LOAD(lhs) __atomic_load_n(&(lhs), __ATOMIC_RELAXED)
#define COUNT(h, field, n) __atomic_fetch_add(&(h)->cstats.field, (n), __ATOMIC_RELAXED)

static inline void cpu_relax(void)
{
    __builtin_ia32_pause();
}

static inline int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Shared (not private) futex operations: the word is in a MAP_SHARED
 * mapping that another process waits on or wakes. */
static int futex_wait(uint32_t *word, uint32_t expected, int64_t timeout_ns)
{
    struct timespec ts;
    if (timeout_ns < 0)
        timeout_ns = 0;
    ts.tv_sec = timeout_ns / 1000000000;
    ts.tv_nsec = timeout_ns % 1000000000;
    return (int)syscall(SYS_futex, word, FUTEX_WAIT, expected, &ts, NULL, 0);
}

static void futex_wake(uint32_t *word, int count)
{
    syscall(SYS_futex, word, FUTEX_WAKE, count, NULL, NULL, 0);
}

static inline uint64_t mask(uint64_t value, uint32_t size)
{
    return size >= 8 ? value : value & ((1ull << (8 * size)) - 1);
}

uint64_t svs_size(uint32_t nslots)
{
    if (nslots == 0 || nslots > SVS_MAX_SLOTS)
        return 0;
    uint64_t size = sizeof(struct header) + (uint64_t)nslots * sizeof(struct slot);
    return (size + 4095) & ~4095ull;
}

int svs_errno(void)
{
    return last_errno;
}

int svs_open(int fd, int create, uint32_t nslots, struct svs **out)
{
    struct stat st;
    *out = NULL;
    if (fstat(fd, &st) != 0) {
        last_errno = errno;
        return SVS_ESYS;
    }
    uint64_t size = (uint64_t)st.st_size;
    if (create && (svs_size(nslots) == 0 || size != svs_size(nslots)))
        return SVS_EINVAL;
    if (size < sizeof(struct header) || size > svs_size(SVS_MAX_SLOTS))
        return SVS_ELAYOUT;
    void *base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        last_errno = errno;
        return SVS_ESYS;
    }
    struct header *hdr = base;
    if (create) {
        memset(base, 0, size);
        hdr->version = SVS_VERSION;
        hdr->header_size = sizeof(struct header);
        hdr->slot_size = sizeof(struct slot);
        hdr->nslots = nslots;
        hdr->total_size = size;
        hdr->device_cpu = -1;
        STORE(hdr->magic, (uint64_t)SVS_MAGIC);
    } else {
        /* Take every size once, here, and check it against the object. */
        nslots = hdr->nslots;
        if (hdr->magic != SVS_MAGIC || hdr->version != SVS_VERSION
            || hdr->header_size != sizeof(struct header)
            || hdr->slot_size != sizeof(struct slot)
            || svs_size(nslots) == 0 || svs_size(nslots) != size
            || hdr->total_size != size) {
            munmap(base, size);
            return SVS_ELAYOUT;
        }
    }
    struct svs *h = calloc(1, sizeof(*h));
    if (h == NULL) {
        munmap(base, size);
        last_errno = ENOMEM;
        return SVS_ESYS;
    }
    h->base = base;
    h->size = size;
    h->nslots = nslots;
    h->hdr = hdr;
    h->slots = (struct slot *)((uint8_t *)base + sizeof(struct header));
    h->poll_max_ns = 0;
    h->caller_cpu = -1;
    /* A fresh device answers what is already pending (none, normally). */
    for (uint32_t i = 0; i < nslots; i++)
        h->seq[i] = create ? 0 : RELAXED_LOAD(h->slots[i].rsp_seq);
    *out = h;
    return SVS_OK;
}

void svs_close(struct svs *h)
{
    if (h == NULL)
        return;
    munmap(h->base, h->size);
    free(h);
}

uint32_t svs_nslots(struct svs *h)
{
    return h->nslots;
}

uint64_t svs_base(struct svs *h)
{
    return (uint64_t)(uintptr_t)h->base;
}

/* ---- VMM side ---------------------------------------------------------- */

/* The answer to the last request on slot, whose rsp_seq matched: checked
 * against what was sent (access sequence number, status), masked. */
static int take_answer(struct svs *h, uint32_t slot, uint64_t *out_value)
{
    struct slot *s = &h->slots[slot];
    uint32_t status = LOAD(s->status);
    uint64_t v = LOAD(s->rsp_value);
    uint64_t aseq = LOAD(s->rsp_aseq);
    if (LOAD(s->rsp_seq) != h->seq[slot] || aseq != h->sent_aseq[slot])
        return SVS_EBADRESP;
    if (status != SVS_STATUS_OK)
        return status == SVS_STATUS_ERROR ? SVS_EDEVICE : SVS_EBADRESP;
    *out_value = h->sent_write[slot] ? 0 : mask(v, h->sent_size[slot]);
    return SVS_OK;
}

int svs_call(struct svs *h, uint32_t slot, uint32_t space, uint64_t cookie,
             uint64_t offset, uint32_t size, uint32_t is_write,
             uint64_t value, uint64_t aseq, int64_t spin_ns, int64_t slice_ns,
             int64_t timeout_ns, uint64_t *out_value)
{
    if (slot >= h->nslots || (size != 1 && size != 2 && size != 4 && size != 8))
        return SVS_EINVAL;
    if (LOAD(h->dead))
        return SVS_EDEAD;
    if (slice_ns <= 0)
        slice_ns = 1000000;
    struct slot *s = &h->slots[slot];
    uint32_t seq = h->seq[slot] + 1;
    if (seq == 0)
        seq = 1;                /* 0 is the initial value of rsp_seq */
    h->seq[slot] = seq;
    h->sent_aseq[slot] = aseq;
    h->sent_size[slot] = size;
    h->sent_write[slot] = is_write ? 1 : 0;
    COUNT(h, calls, 1);

    RELAXED_STORE(s->space, space);
    RELAXED_STORE(s->cookie, cookie);
    RELAXED_STORE(s->offset, offset);
    RELAXED_STORE(s->size, size);
    RELAXED_STORE(s->is_write, is_write ? 1u : 0u);
    RELAXED_STORE(s->value, is_write ? mask(value, size) : 0);
    RELAXED_STORE(s->aseq, aseq);
    int32_t cpu = sched_getcpu();
    RELAXED_STORE(s->vmm_cpu, cpu);
    STORE(s->req_seq, seq);
    __atomic_fetch_add(&h->hdr->doorbell, 1, __ATOMIC_SEQ_CST);
    if (LOAD(h->hdr->device_sleeping))
        futex_wake(&h->hdr->doorbell, 1);

    int64_t start = now_ns();
    int64_t deadline = start + (timeout_ns > 0 ? timeout_ns : 0);
    int64_t spin_end = start + (spin_ns > 0 ? spin_ns : 0);
    int64_t t = start;
    int rc = SVS_ETIMEDOUT;
    /* Spin: the answer usually comes within a few microseconds when the
     * device is polling, far sooner than a futex wake-up here. */
    for (uint32_t i = 0; t < spin_end; i++) {
        if (LOAD(s->rsp_seq) == seq) {
            COUNT(h, spin_hits, 1);
            rc = SVS_OK;
            break;
        }
        cpu_relax();
        if ((i & 15) == 15) {
            if (LOAD(h->dead)) {
                rc = SVS_EDEAD;
                break;
            }
            /* The device runs (or was woken onto) this CPU: get out of
             * its way.  What it wrote here only changes how we wait. */
            if (RELAXED_LOAD(h->hdr->device_cpu) == cpu) {
                COUNT(h, yields, 1);
                break;
            }
            t = now_ns();
        }
    }
    if (spin_ns > 0)
        COUNT(h, spin_ns, (uint64_t)(now_ns() - start));
    if (rc == SVS_ETIMEDOUT) {
        STORE(s->vmm_waiting, 1u);
        int slept = 0;
        for (;;) {
            uint32_t cur = LOAD(s->rsp_seq);
            if (cur == seq) {
                rc = SVS_OK;
                break;
            }
            if (LOAD(h->dead)) {
                rc = SVS_EDEAD;
                break;
            }
            t = now_ns();
            if (t >= deadline)
                break;
            int64_t wait = deadline - t;
            if (!slept) {
                COUNT(h, sleeps, 1);
                slept = 1;
            }
            /* A device that keeps changing rsp_seq only makes this loop
             * spin until the deadline: it stays bounded. */
            futex_wait(&s->rsp_seq, cur, wait < slice_ns ? wait : slice_ns);
        }
        STORE(s->vmm_waiting, 0u);
    }
    if (rc == SVS_ETIMEDOUT) {
        COUNT(h, timeouts, 1);
        return rc;
    }
    if (rc != SVS_OK)
        return rc;
    return take_answer(h, slot, out_value);
}

int svs_answer(struct svs *h, uint32_t slot, uint64_t aseq, uint64_t *out_value)
{
    if (slot >= h->nslots || h->seq[slot] == 0 || h->sent_aseq[slot] != aseq)
        return SVS_EINVAL;
    if (LOAD(h->slots[slot].rsp_seq) != h->seq[slot])
        return SVS_ETIMEDOUT;
    return take_answer(h, slot, out_value);
}

void svs_mark_dead(struct svs *h)
{
    STORE(h->dead, 1);
    for (uint32_t i = 0; i < h->nslots; i++)
        futex_wake(&h->slots[i].rsp_seq, INT_MAX);
}

void svs_client_stats(struct svs *h, struct svs_client_stats *out)
{
    out->calls = RELAXED_LOAD(h->cstats.calls);
    out->spin_hits = RELAXED_LOAD(h->cstats.spin_hits);
    out->sleeps = RELAXED_LOAD(h->cstats.sleeps);
    out->spin_ns = RELAXED_LOAD(h->cstats.spin_ns);
    out->timeouts = RELAXED_LOAD(h->cstats.timeouts);
    out->yields = RELAXED_LOAD(h->cstats.yields);
}

void svs_device_stats(struct svs *h, struct svs_stats *out)
{
    struct svs_stats *p = &h->hdr->stats;
    out->served = RELAXED_LOAD(p->served);
    out->polled_hits = RELAXED_LOAD(p->polled_hits);
    out->sleeps = RELAXED_LOAD(p->sleeps);
    out->wakeups = RELAXED_LOAD(p->wakeups);
    out->poll_ns = RELAXED_LOAD(p->poll_ns);
    out->poll_wasted_ns = RELAXED_LOAD(p->poll_wasted_ns);
    out->sleep_ns = RELAXED_LOAD(p->sleep_ns);
    out->window_ns = RELAXED_LOAD(p->window_ns);
    out->poll_yields = RELAXED_LOAD(p->poll_yields);
    out->moves = RELAXED_LOAD(p->moves);
}

/* ---- device side ------------------------------------------------------- */

void svs_set_polling(struct svs *h, int64_t poll_max_ns, int adaptive, int move)
{
    h->move = move != 0;
    h->poll_max_ns = poll_max_ns > 0 ? poll_max_ns : 0;
    h->adaptive = adaptive != 0;
    h->window_ns = h->adaptive ? 0 : h->poll_max_ns;
}

static void publish(struct svs *h)
{
    struct svs_stats *p = &h->hdr->stats;
    h->stats.window_ns = (uint64_t)h->window_ns;
    RELAXED_STORE(p->served, h->stats.served);
    RELAXED_STORE(p->polled_hits, h->stats.polled_hits);
    RELAXED_STORE(p->sleeps, h->stats.sleeps);
    RELAXED_STORE(p->wakeups, h->stats.wakeups);
    RELAXED_STORE(p->poll_ns, h->stats.poll_ns);
    RELAXED_STORE(p->poll_wasted_ns, h->stats.poll_wasted_ns);
    RELAXED_STORE(p->sleep_ns, h->stats.sleep_ns);
    RELAXED_STORE(p->window_ns, h->stats.window_ns);
    RELAXED_STORE(p->poll_yields, h->stats.poll_yields);
    RELAXED_STORE(p->moves, h->stats.moves);
}

/* One pass over the slots, starting after the last one served. */
static int scan(struct svs *h, struct svs_request *out)
{
    uint32_t n = h->nslots;
    for (uint32_t k = 0; k < n; k++) {
        uint32_t i = h->next_scan + k;
        if (i >= n)
            i -= n;
        struct slot *s = &h->slots[i];
        uint32_t seq = LOAD(s->req_seq);
        if (seq == h->seq[i])
            continue;
        h->seq[i] = seq;
        h->next_scan = i + 1 >= n ? 0 : i + 1;
        out->slot = i;
        out->seq = seq;
        out->space = RELAXED_LOAD(s->space);
        out->size = RELAXED_LOAD(s->size);
        out->is_write = RELAXED_LOAD(s->is_write);
        out->reserved = 0;
        out->cookie = RELAXED_LOAD(s->cookie);
        out->offset = RELAXED_LOAD(s->offset);
        out->value = RELAXED_LOAD(s->value);
        out->aseq = RELAXED_LOAD(s->aseq);
        h->caller_cpu = RELAXED_LOAD(s->vmm_cpu);
        return 1;
    }
    return 0;
}

/* KVM-style window adaptation after a sleep that lasted slept_ns: a sleep
 * shorter than the maximum window would have been caught by polling, so
 * poll longer next time; a long one means the device is idle, so poll
 * less (kvm_vcpu_halt's grow_halt_poll_ns / shrink_halt_poll_ns). */
static void adapt(struct svs *h, int64_t slept_ns)
{
    if (!h->adaptive || h->poll_max_ns == 0)
        return;
    if (slept_ns > h->poll_max_ns) {
        h->window_ns /= 2;
        if (h->window_ns < POLL_GROW_START_NS)
            h->window_ns = 0;
    } else if (h->window_ns < h->poll_max_ns) {
        h->window_ns = h->window_ns ? h->window_ns * 2 : POLL_GROW_START_NS;
        if (h->window_ns > h->poll_max_ns)
            h->window_ns = h->poll_max_ns;
    }
}

/* The serving thread shares a CPU with the vCPU thread it serves: move to
 * another CPU it may run on (set the affinity without this CPU, which
 * migrates at once, then give the old mask back, which does not move it
 * again).  At most every 10 ms; nothing happens on a single-CPU mask. */
static void move_off(struct svs *h, int32_t cpu)
{
    int64_t t = now_ns();
    if (!h->move || cpu < 0 || cpu >= CPU_SETSIZE || t - h->moved_at_ns < 10000000)
        return;
    h->moved_at_ns = t;
    cpu_set_t mask, others;
    if (sched_getaffinity(0, sizeof(mask), &mask) != 0)
        return;
    others = mask;
    CPU_CLR(cpu, &others);
    if (CPU_COUNT(&others) == 0)
        return;
    if (sched_setaffinity(0, sizeof(others), &others) == 0) {
        h->stats.moves++;
        sched_setaffinity(0, sizeof(mask), &mask);
    }
}

static inline int32_t note_cpu(struct svs *h)
{
    int32_t cpu = sched_getcpu();
    if (RELAXED_LOAD(h->hdr->device_cpu) != cpu)
        STORE(h->hdr->device_cpu, cpu);
    return cpu;
}

int svs_next(struct svs *h, int64_t sleep_slice_ns, struct svs_request *out)
{
    if (RELAXED_LOAD(h->stop))
        return SVS_ESTOPPED;
    int32_t here = note_cpu(h);
    if (scan(h, out)) {
        h->stats.served++;
        h->stats.polled_hits++;
        publish(h);
        return SVS_OK;
    }
    int64_t start = now_ns();
    int64_t t = start;
    /* The caller shares this CPU (it waits for us to sleep): not even the
     * first sixteen scans of a poll, unless we can move off. */
    int poll = h->window_ns > 0;
    if (poll && here == h->caller_cpu) {
        move_off(h, here);
        if (note_cpu(h) == here) {
            h->stats.poll_yields++;
            poll = 0;
        }
    }
    if (poll) {
        int64_t end = start + h->window_ns;
        for (uint32_t i = 1;; i++) {
            if (scan(h, out)) {
                h->stats.served++;
                h->stats.polled_hits++;
                h->stats.poll_ns += (uint64_t)(now_ns() - start);
                publish(h);
                return SVS_OK;
            }
            cpu_relax();
            if ((i & 15) == 0) {
                if (RELAXED_LOAD(h->stop))
                    return SVS_ESTOPPED;
                t = now_ns();
                if (t >= end)
                    break;
                /* Polling on the CPU of the vCPU that will ask next would
                 * only keep it from asking. */
                int32_t cpu = note_cpu(h);
                if (cpu == h->caller_cpu) {
                    move_off(h, cpu);
                    if (note_cpu(h) == cpu) {
                        h->stats.poll_yields++;
                        break;
                    }
                }
            }
        }
        h->stats.poll_ns += (uint64_t)(t - start);
        h->stats.poll_wasted_ns += (uint64_t)(t - start);
    }

    /* Sleep: announce it, look once more, then wait on the doorbell. */
    h->stats.sleeps++;
    publish(h);
    STORE(h->hdr->device_sleeping, 1u);
    uint32_t bell = LOAD(h->hdr->doorbell);
    int found = scan(h, out);
    int64_t sleep_start = now_ns();
    if (!found && !LOAD(h->stop)) {
        futex_wait(&h->hdr->doorbell, bell, sleep_slice_ns > 0 ? sleep_slice_ns : 1000000);
        note_cpu(h);
        found = scan(h, out);
    }
    STORE(h->hdr->device_sleeping, 0u);
    int64_t slept = now_ns() - sleep_start;
    h->stats.sleep_ns += (uint64_t)slept;
    adapt(h, slept);
    if (found) {
        h->stats.served++;
        h->stats.wakeups++;
        publish(h);
        return SVS_OK;
    }
    publish(h);
    return RELAXED_LOAD(h->stop) ? SVS_ESTOPPED : SVS_ETIMEDOUT;
}

int svs_complete(struct svs *h, uint32_t slot, uint32_t seq, uint64_t aseq, uint64_t value,
                 uint32_t status)
{
    if (slot >= h->nslots)
        return SVS_EINVAL;
    struct slot *s = &h->slots[slot];
    RELAXED_STORE(s->rsp_aseq, aseq);
    RELAXED_STORE(s->rsp_value, value);
    RELAXED_STORE(s->status, status);
    STORE(s->rsp_seq, seq);
    if (LOAD(s->vmm_waiting))
        futex_wake(&s->rsp_seq, INT_MAX);
    return SVS_OK;
}

int svs_complete_next(struct svs *h, uint32_t slot, uint32_t seq, uint64_t aseq, uint64_t value,
                      uint32_t status, int64_t sleep_slice_ns, struct svs_request *out)
{
    int rc = svs_complete(h, slot, seq, aseq, value, status);
    return rc != SVS_OK ? rc : svs_next(h, sleep_slice_ns, out);
}

void svs_stop(struct svs *h)
{
    STORE(h->stop, 1);
    __atomic_fetch_add(&h->hdr->doorbell, 1, __ATOMIC_SEQ_CST);
    futex_wake(&h->hdr->doorbell, INT_MAX);
}

int svs_scribble_response(struct svs *h, uint32_t slot, uint32_t seq,
                          uint64_t value, uint32_t status)
{
    if (slot >= h->nslots)
        return SVS_EINVAL;
    struct slot *s = &h->slots[slot];
    STORE(s->rsp_aseq, LOAD(s->aseq));
    STORE(s->status, status);
    STORE(s->rsp_value, value);
    STORE(s->rsp_seq, seq);
    return SVS_OK;
}

/* ---- the state segment's snapshot store -------------------------------- */

/* CRC-32 (zlib's: reflected, polynomial 0xEDB88320): carry-less
 * multiplication where the CPU has it (crc32_clmul) for all whole 16-byte
 * blocks of a run of 64 bytes or more, else and for the rest eight bytes
 * a step (slice-by-8); the tables are made once, when the module is
 * loaded. */
static uint32_t crc_table[8][256];
static int have_clmul;          /* the CPU has PCLMULQDQ and SSE4.1 */

__attribute__((constructor)) static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int j = 1; j < 8; j++)
            crc_table[j][i] = (crc_table[j - 1][i] >> 8) ^ crc_table[0][crc_table[j - 1][i] & 0xff];
#if defined(__x86_64__)
    __builtin_cpu_init();
    have_clmul = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
#endif
}

/* Table-driven, on the inverted register (no ~ in or out). */
static uint32_t crc32_tables(uint32_t crc, const uint8_t *p, uint64_t n)
{
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);                  /* x86: little-endian */
        w ^= crc;
        crc = crc_table[7][w & 0xff] ^ crc_table[6][(w >> 8) & 0xff] ^ crc_table[5][(w >> 16) & 0xff]
            ^ crc_table[4][(w >> 24) & 0xff] ^ crc_table[3][(w >> 32) & 0xff]
            ^ crc_table[2][(w >> 40) & 0xff] ^ crc_table[1][(w >> 48) & 0xff] ^ crc_table[0][w >> 56];
        p += 8;
        n -= 8;
    }
    while (n--)
        crc = (crc >> 8) ^ crc_table[0][(crc ^ *p++) & 0xff];
    return crc;
}

#if defined(__x86_64__)
#include <immintrin.h>

/* The same CRC with carry-less multiplication, 16 bytes a step (the
 * folding of Gopal et al., "Fast CRC Computation for Generic Polynomials
 * Using PCLMULQDQ Instruction", Intel, 2009, for the reflected polynomial
 * 0xEDB88320): four 128-bit lanes folded over 64 bytes at a time, folded
 * into one, then the rest 16 bytes at a time, and a Barrett reduction to
 * 32 bits.  n >= 64 and a multiple of 16; crc is the inverted register.
 * No tables: after a context switch (a device answering on its vCPU's
 * CPU) the eight KiB of crc_table are cold, these constants are not. */
__attribute__((target("pclmul,sse4.1")))
static uint32_t crc32_clmul(uint32_t crc, const uint8_t *p, uint64_t n)
{
    /* x^(4*128+32) and x^(4*128-32) mod P (bit-reflected, shifted by one):
     * one 512-bit fold; then the 128-bit fold's, x^32's and P, mu */
    const __m128i k21 = _mm_set_epi64x(0x1c6e41596LL, 0x154442bd4LL);
    const __m128i k43 = _mm_set_epi64x(0x0ccaa009eLL, 0x1751997d0LL);
    const __m128i k5 = _mm_set_epi64x(0, 0x163cd6124LL);
    const __m128i poly = _mm_set_epi64x(0x1f7011641LL, 0x1db710641LL);
    const __m128i mask32 = _mm_set_epi32(0, 0, 0, -1);
    __m128i x1 = _mm_loadu_si128((const __m128i *)p);
    __m128i x2 = _mm_loadu_si128((const __m128i *)(p + 16));
    __m128i x3 = _mm_loadu_si128((const __m128i *)(p + 32));
    __m128i x4 = _mm_loadu_si128((const __m128i *)(p + 48));
    x1 = _mm_xor_si128(x1, _mm_cvtsi32_si128((int)crc));
    p += 64;
    n -= 64;
#define FOLD(x, k, next) _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128((x), (k), 0x00), \
                                                     _mm_clmulepi64_si128((x), (k), 0x11)), (next))
    while (n >= 64) {
        x1 = FOLD(x1, k21, _mm_loadu_si128((const __m128i *)p));
        x2 = FOLD(x2, k21, _mm_loadu_si128((const __m128i *)(p + 16)));
        x3 = FOLD(x3, k21, _mm_loadu_si128((const __m128i *)(p + 32)));
        x4 = FOLD(x4, k21, _mm_loadu_si128((const __m128i *)(p + 48)));
        p += 64;
        n -= 64;
    }
    x1 = FOLD(x1, k43, x2);
    x1 = FOLD(x1, k43, x3);
    x1 = FOLD(x1, k43, x4);
    while (n >= 16) {
        x1 = FOLD(x1, k43, _mm_loadu_si128((const __m128i *)p));
        p += 16;
        n -= 16;
    }
#undef FOLD
    /* 128 -> 64 bits (with 32 zero bits appended), 64 -> 32 by x^32 mod P */
    x1 = _mm_xor_si128(_mm_srli_si128(x1, 8), _mm_clmulepi64_si128(k43, x1, 0x01));
    x2 = _mm_srli_si128(x1, 4);
    x1 = _mm_xor_si128(_mm_clmulepi64_si128(_mm_and_si128(x1, mask32), k5, 0x00), x2);
    /* Barrett reduction (bit-reflected) */
    x2 = x1;
    x1 = _mm_and_si128(_mm_clmulepi64_si128(_mm_and_si128(x1, mask32), poly, 0x10), mask32);
    x1 = _mm_xor_si128(_mm_clmulepi64_si128(x1, poly, 0x00), x2);
    return (uint32_t)_mm_extract_epi32(x1, 1);
}
#endif

static uint32_t crc32_update(uint32_t crc, const uint8_t *p, uint64_t n)
{
    crc = ~crc;
#if defined(__x86_64__)
    if (n >= 64 && have_clmul) {
        uint64_t whole = n & ~(uint64_t)15;
        crc = crc32_clmul(crc, p, whole);
        p += whole;
        n -= whole;
    }
#endif
    return ~crc32_tables(crc, p, n);
}

uint32_t svs_crc32(uint32_t start, const char *data, uint64_t n)
{
    return crc32_update(start, (const uint8_t *)data, n);
}

#define STATE_HEAD 64

/* Step k of a store: "len" bytes from "src" to "dst", all of them, or the
 * first half when it is the torn one; false once the steps are done. */
static int state_step(int k, int steps, int torn, uint8_t *dst, const void *src, uint64_t len)
{
    if (k < steps) {
        memcpy(dst, src, len);
        __atomic_thread_fence(__ATOMIC_RELEASE);
        return 1;
    }
    if (k == steps && torn)
        memcpy(dst, src, len / 2);
    return 0;
}

int svs_state_store(uint64_t buf, uint64_t cap, uint64_t number, uint64_t seq, uint64_t value,
                    uint32_t status, const char *payload, uint32_t n, int steps, int torn)
{
    if (buf == 0 || n > cap || number == 0)
        return SVS_EINVAL;
    uint8_t *b = (uint8_t *)(uintptr_t)buf;
    /* number, then the record (seq, value, length, status) as packed
     * "<QQQII": what the crc covers before the payload */
    uint8_t head[36];
    const uint64_t zero = 0;
    memcpy(head, &number, 8);
    memcpy(head + 8, &seq, 8);
    memcpy(head + 16, &value, 8);
    memcpy(head + 24, &n, 4);
    memcpy(head + 28, &status, 4);
    uint32_t crc = crc32_update(crc32_update(0, head, 32), (const uint8_t *)payload, n);
    memcpy(head + 32, &crc, 4);
    /* each step's stores are ordered before the next one's (the fence in
     * state_step); the reader checks the crc and the number anyway */
    (void)(state_step(0, steps, torn, b, &zero, 8)                          /* unpublish */
           && state_step(1, steps, torn, b + STATE_HEAD, payload, n)        /* payload */
           && state_step(2, steps, torn, b + 8, head + 8, 28)               /* record, crc */
           && state_step(3, steps, torn, b, head, 8));                      /* publish */
    return SVS_OK;
}

int svs_state_store_packed_steps(struct svs_state_writer *w, uint64_t seq, uint64_t value,
                                 const char *payload, uint32_t n, int steps, int torn)
{
    uint64_t number = w->next;
    if (number == 0 || seq == 0)
        return -SVS_EINVAL;
    if (n > w->cap)
        return -SVS_ELAYOUT;
    if (w->has_last && n == w->last_n
        && memcmp((const uint8_t *)(uintptr_t)w->buf[(number - 1) & 1] + STATE_HEAD, payload, n) == 0)
        return 0;
    if (svs_state_store(w->buf[number & 1], w->cap, number, seq, value, 0, payload, n, steps, torn) != SVS_OK)
        return -SVS_EINVAL;
    if (steps < 4)
        return 1;               /* a store cut short (the crash tests): w stays */
    w->next = number + 1;
    w->seq = seq;
    w->value = value;
    w->status = 0;
    w->last_n = n;
    w->has_last = 1;
    return 1;
}

int svs_state_store_packed(struct svs_state_writer *w, uint64_t seq, uint64_t value,
                           const char *payload, uint32_t n)
{
    return svs_state_store_packed_steps(w, seq, value, payload, n, 4, 0);
}
