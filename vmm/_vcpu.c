/* The vCPU exit fast path: KVM_RUN, exit decoding and the registry lookup
 * in C, so that Python runs only the owner's handler.
 *
 * svmm_step() completes the access it handed out last time (stores the
 * value Python read into kvm_run, puts the registry reference), then runs
 * the vCPU until an access needs a handler: it returns SVMM_STEP_ACCESS
 * with owner, cookie, offset, size, direction and value in the context.
 * Accesses nobody claims are completed here (reads all ones, writes
 * dropped) and the vCPU re-entered at once.  String and rep I/O is one
 * lookup and one access per element (kvm_run io.count, io.data_offset).
 * Any other exit, and KVM_RUN failing (EINTR after a kick), goes back to
 * Python, and so does a registry call that misses its lock deadline
 * (SVMM_STEP_REGISTRY_ERROR for a get: the access completes as unclaimed;
 * SVMM_STEP_PUT_ERROR for a put: retried at the next step), so that Python
 * can deal with the lock's holder (vmm/lockwatch.py).  Same protocol as vmm/dispatch.py: get, handler, put.
 * With a coalesced-MMIO ring (ring != NULL), an exit that finds queued
 * writes in it returns SVMM_STEP_DRAIN first: Python delivers them, and
 * the next step decodes the exit itself.
 *
 * The registry functions come from ipc's C core (ipc/_registry.c) as
 * function pointers, so that the two extension modules stay separate. */
#include <time.h>
#include "_registry.h"
#include "_slots.h"           /* svs_call's type (the function is ipc's) */

typedef int (*svmm_get_fn)(struct svm_reg *, uint32_t, uint64_t, uint64_t, struct svm_ref *, int64_t);
typedef int (*svmm_put_fn)(struct svm_reg *, uint32_t, uint64_t, int64_t);
/* The pointers Python hands in must have these types: fail the build, not
 * the VMM, if ipc's declarations change. */
_Static_assert(__builtin_types_compatible_p(__typeof__(&svm_reg_get), svmm_get_fn), "svm_reg_get changed");
_Static_assert(__builtin_types_compatible_p(__typeof__(&svm_reg_put), svmm_put_fn), "svm_reg_put changed");

typedef int (*svmm_call_fn)(struct svs *, uint32_t, uint32_t, uint64_t, uint64_t, uint32_t, uint32_t,
                            uint64_t, uint64_t, int64_t, int64_t, int64_t, uint64_t *);
_Static_assert(__builtin_types_compatible_p(__typeof__(&svs_call), svmm_call_fn), "svs_call changed");

/* -- forwarding in C ------------------------------------------------------- */

uint64_t svmm_forward_next_aseq(struct svmm_forward *f)
{
    return __atomic_add_fetch(&f->aseq, 1, __ATOMIC_RELAXED);
}

uint64_t svmm_forward_inflight(struct svmm_forward *f)
{
    return __atomic_load_n(&f->inflight, __ATOMIC_SEQ_CST);
}

void svmm_forward_switch(struct svmm_forward *f, uint32_t on)
{
    __atomic_store_n(&f->on, on, __ATOMIC_SEQ_CST);
}

void svmm_drain_begin(struct svmm_forwards *t)
{
    __atomic_fetch_add(&t->draining, 1, __ATOMIC_SEQ_CST);
}

void svmm_drain_end(struct svmm_forwards *t)
{
    __atomic_fetch_sub(&t->draining, 1, __ATOMIC_SEQ_CST);
}

static inline int64_t svmm_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

#define FWD_PYTHON 0       /* Python serves the access (SVMM_STEP_ACCESS) */
#define FWD_DONE 1         /* answered: v->value holds what a read got */
#define FWD_FAILED 2       /* the call failed: SVMM_STEP_FORWARD_ERROR */
#define FWD_LOCAL 3        /* a local model's: SVMM_STEP_LOCAL */

/* One access of v (bus, direction) that took ns, in f's cell: the layout
 * of vmm/stats.py (counts, total, failures, log2 histogram). */
static void svmm_count(struct svmm_forward *f, const struct svmm_vcpu *v, uint64_t ns, uint32_t failed)
{
    int bucket = ns ? 64 - __builtin_clzll(ns) : 0;
    if (bucket > SVMM_FWD_CELL - SVMM_FWD_HIST - 1)
        bucket = SVMM_FWD_CELL - SVMM_FWD_HIST - 1;
    __atomic_fetch_add(&f->cell[v->bus * 2 + (v->is_write ? 1 : 0)], 1, __ATOMIC_RELAXED);
    __atomic_fetch_add(&f->cell[SVMM_FWD_TOTAL_NS], ns, __ATOMIC_RELAXED);
    __atomic_fetch_add(&f->cell[SVMM_FWD_HIST + bucket], 1, __ATOMIC_RELAXED);
    if (failed)
        __atomic_fetch_add(&f->cell[SVMM_FWD_FAILURES], 1, __ATOMIC_RELAXED);
}

/* The access just looked up (a registry reference held): into its
 * owner's slot, if the owner has a forward that is on. */
static int svmm_forward(struct svmm_vcpu *v)
{
    struct svmm_forwards *t = v->forwards;
    v->fresh = 0;
    if (t == NULL || v->owner >= SVMM_MAX_OWNERS)
        return FWD_PYTHON;
    struct svmm_forward *f = __atomic_load_n(&t->f[v->owner], __ATOMIC_ACQUIRE);
    if (f == NULL) {
        v->fresh = !__atomic_load_n(&t->seen[v->owner], __ATOMIC_RELAXED);
        return FWD_PYTHON;
    }
    /* Another vCPU may have taken queued coalesced writes from the ring and
     * not delivered them yet: this access must come after them.  (The ring
     * was seen empty before this load; a drainer counts itself before it
     * takes anything.)  The same for a local model's access. */
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if (__atomic_load_n(&t->draining, __ATOMIC_SEQ_CST))
        return FWD_PYTHON;
    if (f->local) {
        /* Python calls the model; the time runs until the completion.
         * Off: Python's dispatcher serves it (it has seen the forward). */
        if (!__atomic_load_n(&f->on, __ATOMIC_ACQUIRE))
            return FWD_PYTHON;
        v->acct = f;
        v->acct_failed = 0;
        v->local_served++;
        v->acct_t0 = svmm_now_ns();
        return FWD_LOCAL;
    }
    if (v->index >= f->nslots) {
        return FWD_PYTHON;
    }
    __atomic_fetch_add(&f->inflight, 1, __ATOMIC_SEQ_CST);
    if (!__atomic_load_n(&f->on, __ATOMIC_SEQ_CST)) {
        __atomic_fetch_sub(&f->inflight, 1, __ATOMIC_SEQ_CST);
        v->fresh = 1;
        return FWD_PYTHON;
    }
    uintptr_t slots = f->slots;
    uint64_t gen = f->gen;
    uint64_t aseq = __atomic_add_fetch(&f->aseq, 1, __ATOMIC_RELAXED);
    uint64_t out = 0;
    int64_t t0 = svmm_now_ns();
    int rc = ((svmm_call_fn)f->call_fn)((struct svs *)slots, v->index, v->bus, v->cookie, v->offset, v->size,
                                        v->is_write, v->value, aseq, f->spin_ns, f->slice_ns,
                                        f->timeout_ns, &out);
    uint64_t ns = (uint64_t)(svmm_now_ns() - t0);
    __atomic_fetch_sub(&f->inflight, 1, __ATOMIC_SEQ_CST);
    if (rc != 0) {
        v->fwd_rc = rc;
        v->fwd_aseq = aseq;
        v->fwd_slots = slots;
        v->fwd_gen = gen;
        return FWD_FAILED;
    }
    if (!v->is_write)
        v->value = out;                 /* masked to the size by svs_call */
    svmm_count(f, v, ns, 0);
    v->forwarded++;
    return FWD_DONE;
}

/* The local access handed out last (v->acct) is over: count it. */
static void svmm_count_local(struct svmm_vcpu *v)
{
    struct svmm_forward *f = v->acct;
    v->acct = NULL;
    svmm_count(f, v, (uint64_t)(svmm_now_ns() - v->acct_t0), v->acct_failed);
}

void svmm_account(struct svmm_vcpu *v)
{
    if (v->acct != NULL)
        svmm_count_local(v);
}

/* -- owner windows --------------------------------------------------------- */

static int svmm_window_fits(const struct svmm_window *w, uint32_t bus, uint64_t start,
                            uint64_t length, uint64_t cookie)
{
    if (w->bus != bus || length == 0)
        return 0;
    if (!(w->flags & SVMM_WIN_ANY_COOKIE) && w->cookie != cookie)
        return 0;
    if (w->flags & SVMM_WIN_PINNED)
        return start == w->start && length <= w->length;
    /* [start, start + length) inside [w->start, w->start + w->length),
     * written so that nothing overflows. */
    return start >= w->start && start - w->start <= w->length
        && length <= w->length - (start - w->start) && length <= w->max_len;
}

/* One consistent read of the table (seqlock): does a window of "owner"
 * hold the region?  With find != NULL instead: the pinned window of owner
 * that holds the access [start, start + length), copied to *find. */
static int svmm_windows_lookup(struct svmm_windows *t, uint32_t bus, uint64_t start, uint64_t length,
                               uint64_t owner, uint64_t cookie, struct svmm_window *find)
{
    for (;;) {
        uint64_t seq = __atomic_load_n(&t->seq, __ATOMIC_ACQUIRE);
        int found = 0;
        if (seq & 1) {
            __builtin_ia32_pause();
            continue;
        }
        if (owner < SVMM_MAX_OWNERS) {
            uint32_t first = t->first[owner], n = t->count[owner];
            if (first <= SVMM_MAX_WINDOWS && n <= SVMM_MAX_WINDOWS - first) {
                for (uint32_t i = first; i < first + n && !found; i++) {
                    struct svmm_window w = t->w[i];
                    if (find == NULL) {
                        found = svmm_window_fits(&w, bus, start, length, cookie);
                    } else if (w.bus == bus && (w.flags & SVMM_WIN_PINNED) && start >= w.start
                               && start - w.start < w.length && length <= w.length - (start - w.start)) {
                        *find = w;
                        found = 1;
                    }
                }
            }
        }
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (__atomic_load_n(&t->seq, __ATOMIC_RELAXED) == seq)
            return found;
    }
}

int svmm_windows_check(struct svmm_windows *t, uint32_t bus, uint64_t start, uint64_t length,
                       uint64_t owner, uint64_t cookie)
{
    return svmm_windows_lookup(t, bus, start, length, owner, cookie, NULL);
}

int svmm_windows_store(struct svmm_windows *t, const uint32_t *first, const uint32_t *count,
                       const struct svmm_window *w, uint32_t n)
{
    if (n > SVMM_MAX_WINDOWS)
        return -1;
    __atomic_store_n(&t->seq, t->seq + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    memcpy(t->first, first, sizeof t->first);
    memcpy(t->count, count, sizeof t->count);
    memcpy(t->w, w, (size_t)n * sizeof *w);
    __atomic_store_n(&t->seq, t->seq + 1, __ATOMIC_RELEASE);
    return 0;
}

/* A miss, or a refused region: an access inside one of the VMM's own
 * windows goes to the VMM all the same (its handlers are found in its
 * private memory, whatever a device did to the registry). */
static int svmm_vmm_fallback(struct svmm_vcpu *v)
{
    struct svmm_window w;
    struct svmm_windows *t = v->windows;
    if (t == NULL || !svmm_windows_lookup(t, v->bus, v->addr, v->size, t->vmm_owner, 0, &w))
        return 0;
    v->owner = t->vmm_owner;
    v->cookie = w.cookie;
    v->offset = v->addr - w.start;
    v->has_ref = 0;
    v->pending = 1;
    return SVMM_STEP_ACCESS;
}

static int svmm_complete(struct svmm_vcpu *v, int retry);

static int svmm_lookup(struct svmm_vcpu *v)
{
    svmm_get_fn get = (svmm_get_fn)v->get_fn;
    int refused;
    while (v->elem < v->count) {
        uint8_t *data = (uint8_t *)v->run + v->data_offset + (uint64_t)v->elem * v->size;
        struct svm_ref ref;
        int rc;
        v->value = 0;
        if (v->is_write)
            memcpy(&v->value, data, v->size);           /* x86: little-endian */
        rc = get((struct svm_reg *)v->registry, v->bus, v->addr, v->size, &ref, v->lock_timeout_ns);
        if (rc == SVM_OK && (v->windows == NULL
                             || svmm_windows_lookup(v->windows, v->bus, ref.start, ref.length,
                                                    ref.owner, ref.cookie, NULL))) {
            v->owner = ref.owner;
            v->cookie = ref.cookie;
            v->offset = ref.offset;
            v->slot = ref.slot;
            v->generation = ref.generation;
            v->has_ref = 1;
            v->pending = 1;
            if (v->bus > SVMM_BUS_MMIO)
                return SVMM_STEP_ACCESS;
            switch (svmm_forward(v)) {
            case FWD_DONE:
                if (svmm_complete(v, 1) != 0)
                    return SVMM_STEP_PUT_ERROR;
                continue;               /* the next element, or KVM_RUN */
            case FWD_FAILED:
                return SVMM_STEP_FORWARD_ERROR;
            case FWD_LOCAL:
                return SVMM_STEP_LOCAL;
            default:
                return SVMM_STEP_ACCESS;
            }
        }
        if (rc != SVM_OK && rc != SVM_ENOTFOUND && rc != SVM_EINVAL) {
            v->reg_error = rc;
            v->has_ref = 0;
            v->pending = 1;
            return SVMM_STEP_REGISTRY_ERROR;
        }
        refused = 0;
        if (rc == SVM_OK) {
            /* Outside its owner's windows: as if unclaimed.  The
             * reference goes back at once (a put that fails is counted). */
            if (((svmm_put_fn)v->put_fn)((struct svm_reg *)v->registry, (uint32_t)ref.slot,
                                         ref.generation, v->lock_timeout_ns) != SVM_OK)
                v->put_errors++;
            v->refused++;
            refused = 1;
        }
        if (svmm_vmm_fallback(v))
            return SVMM_STEP_ACCESS;
        v->unclaimed++;
        if (!v->is_write)
            memset(data, 0xff, v->size);
        v->elem++;
        if (refused) {
            /* Tell Python (it logs each region once); the next step goes
             * on with the remaining elements of a string access. */
            v->owner = ref.owner;
            v->cookie = ref.cookie;
            v->slot = ref.slot;
            v->generation = ref.generation;
            v->region_start = ref.start;
            v->region_length = ref.length;
            v->relookup = 1;
            return SVMM_STEP_REFUSED;
        }
    }
    return 0;
}

/* Store the value of the access handed out and put its registry reference.
 * A put that times out with retry != 0 leaves the access pending and the
 * reference held, and returns SVM_ETIMEDOUT: Python deals with the lock's
 * holder and the next step tries the put again.  Any other failure (and a
 * timeout with retry == 0) drops the reference and is counted. */
static int svmm_complete(struct svmm_vcpu *v, int retry)
{
    uint8_t *data = (uint8_t *)v->run + v->data_offset + (uint64_t)v->elem * v->size;
    if (v->acct != NULL)
        svmm_count_local(v);
    if (!v->is_write)
        memcpy(data, &v->value, v->size);              /* idempotent on a retry */
    if (v->has_ref) {
        int rc = ((svmm_put_fn)v->put_fn)((struct svm_reg *)v->registry, (uint32_t)v->slot,
                                          v->generation, v->lock_timeout_ns);
        if (rc != SVM_OK) {
            v->reg_error = rc;
            if (rc == SVM_ETIMEDOUT && retry)
                return rc;
            v->put_errors++;
        }
        v->has_ref = 0;
    }
    v->pending = 0;
    v->elem++;
    return 0;
}

int svmm_finish(struct svmm_vcpu *v)
{
    if (v->pending)
        svmm_complete(v, 0);
    return 0;
}

int svmm_step(struct svmm_vcpu *v)
{
    int rc;
    if (v->pending) {
        if (svmm_complete(v, 1) != 0)
            return SVMM_STEP_PUT_ERROR;
        if ((rc = svmm_lookup(v)) != 0)
            return rc;
    } else if (v->relookup) {
        v->relookup = 0;
        if ((rc = svmm_lookup(v)) != 0)
            return rc;
    }
    for (;;) {
        struct kvm_run *run = v->run;
        if (v->exit_pending) {
            v->exit_pending = 0;
        } else {
            if (ioctl(v->fd, KVM_RUN, 0) < 0) {
                v->err = errno;
                return SVMM_STEP_ERRNO;
            }
            v->exits++;
            /* Writes queued in the ring come before this exit's access
             * (any exit: a full ring makes the next zone write exit). */
            if (v->ring && svmm_coalesced_pending(v->ring)) {
                v->exit_pending = 1;
                return SVMM_STEP_DRAIN;
            }
        }
        if (run->exit_reason == KVM_EXIT_IO) {
            v->bus = SVMM_BUS_PIO;
            v->addr = run->io.port;
            v->size = run->io.size;
            v->count = run->io.count;
            v->data_offset = run->io.data_offset;
            v->is_write = run->io.direction == KVM_EXIT_IO_OUT;
        } else if (run->exit_reason == KVM_EXIT_MMIO) {
            uint32_t len = run->mmio.len;
            if (len != 1 && len != 2 && len != 4 && len != 8)
                return SVMM_STEP_EXIT;
            v->bus = SVMM_BUS_MMIO;
            v->addr = run->mmio.phys_addr;
            v->size = len;
            v->count = 1;
            v->data_offset = offsetof(struct kvm_run, mmio.data);
            v->is_write = run->mmio.is_write != 0;
        } else {
            return SVMM_STEP_EXIT;
        }
        if (v->size != 1 && v->size != 2 && v->size != 4 && v->size != 8)
            return SVMM_STEP_EXIT;
        if ((uint64_t)v->data_offset + (uint64_t)v->count * v->size > v->run_size)
            return SVMM_STEP_EXIT;
        v->elem = 0;
        if ((rc = svmm_lookup(v)) != 0)
            return rc;
    }
}

int svmm_step_value(struct svmm_vcpu *v, uint64_t value)
{
    if (v->pending && !v->is_write)
        v->value = value;
    return svmm_step(v);
}
