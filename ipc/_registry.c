/* The region registry's C core: layout, robust locking, lookup, mutation
 * and crash recovery of one POSIX shared-memory segment.
 *
 * Layout (all offsets fixed at creation, recorded in the header):
 *
 *   header   magic, version, sizes, per-bus index counts, robust lock
 *   slots    capacity x struct slot -- the source of truth
 *   keys     SVM_NBUS x capacity x uint64 region starts, sorted
 *   index    SVM_NBUS x capacity x uint32 slot numbers, parallel to keys
 *
 * Rules (see DESIGN.md, "Rules for shared memory"):
 *  - The segment is hostile.  Sizes and offsets are taken once, at open
 *    time, and kept in the private handle; every index read from the
 *    segment is bounds-checked before use; every loop is bounded by the
 *    private capacity; nothing stored in the segment is a pointer, and
 *    the lock (_rlock.h) follows no link read from the segment.
 *  - Slots are the truth and the index is derived.  A slot enters or
 *    leaves service by one aligned store to its state word; the index is
 *    rebuilt from the slots whenever a locker finds the previous owner
 *    dead (the robust futex's OWNER_DIED, pthread's EOWNERDEAD), so a
 *    writer killed at any instruction leaves a registry that recovery
 *    makes valid again.
 *  - Removal (after kvmtool's refcounted mmio/ioport nodes): unregister
 *    takes the region out of the index at once; its slot waits in the
 *    REMOVING state until the last put.  Each slot carries a generation,
 *    bumped whenever it is freed, so a stale put is caught.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "_registry.h"
#include "_rlock.h"

#define SVM_MAX_CAPACITY (1u << 20)

struct slot {
    uint64_t start;
    uint64_t length;
    uint64_t owner;
    uint64_t cookie;
    uint64_t generation;
    uint32_t refcount;
    uint32_t state;      /* written last when a slot goes live */
    uint32_t bus;
    uint32_t reserved[3];
};                        /* 64 bytes: one cache line */

struct header {
    uint64_t magic;
    uint32_t version;
    uint32_t header_size;
    uint32_t slot_size;
    uint32_t capacity;
    uint32_t nbus;
    uint32_t reserved0;
    uint64_t slots_offset;
    uint64_t index_offset;
    uint64_t total_size;
    uint64_t recoveries;
    uint64_t keys_offset;
    int32_t holder_pid;
    int32_t holder_tid;
    uint32_t count[4];            /* index length per bus */
    uint8_t pad[40];
    struct rlock lock __attribute__((aligned(64)));
};

_Static_assert(sizeof(struct slot) == 64, "slot is one cache line");
_Static_assert(sizeof(struct header) % 64 == 0, "header keeps slots aligned");

/* The private handle.  Everything the code trusts lives here. */
struct svm_reg {
    uint8_t *base;
    uint64_t size;
    uint32_t capacity;
    struct header *hdr;
    struct slot *slots;
    uint64_t *keys;               /* SVM_NBUS * capacity */
    uint32_t *index;              /* SVM_NBUS * capacity */
    uint32_t free_hint;
};

int64_t svm_test_crash_step = 0;
int64_t svm_test_step_counter = 0;
int svm_test_crash_action = 1;
static __thread int last_errno;
static __thread const char *layout_reason = "";

/* getpid() is a real system call (glibc does not cache it), and a slow one
 * on a nested host, so the pid recorded by each locker is cached here and
 * refreshed in the child after fork. */
static int32_t my_pid;

static void refresh_pid(void)
{
    my_pid = (int32_t)getpid();
    rlock_atfork_child();
}

__attribute__((constructor)) static void init_pid(void)
{
    refresh_pid();
    pthread_atfork(NULL, NULL, refresh_pid);
}

static inline void step(void)
{
    if (__builtin_expect(svm_test_crash_step != 0, 0)) {
        if (++svm_test_step_counter == svm_test_crash_step)
            raise(svm_test_crash_action == 2 ? SIGSTOP : SIGKILL);
    }
}

/* One aligned store other processes may observe; the compiler must not
 * split, merge or reorder it with the stores before it. */
#define STORE(lhs, val) __atomic_store_n(&(lhs), (val), __ATOMIC_RELEASE)
#define LOAD(lhs) __atomic_load_n(&(lhs), __ATOMIC_ACQUIRE)
/* A read whose value is only a hint (it is validated afterwards). */
#define RELAXED(lhs) __atomic_load_n(&(lhs), __ATOMIC_RELAXED)

static inline uint32_t *bus_index(struct svm_reg *r, uint32_t bus)
{
    return r->index + (uint64_t)bus * r->capacity;
}

static inline uint64_t *bus_keys(struct svm_reg *r, uint32_t bus)
{
    return r->keys + (uint64_t)bus * r->capacity;
}

static inline uint32_t bus_count(struct svm_reg *r, uint32_t bus)
{
    uint32_t n = LOAD(r->hdr->count[bus]);
    return n > r->capacity ? r->capacity : n;
}

static inline int range_ok(uint64_t start, uint64_t length)
{
    return length != 0 && start + (length - 1) >= start;
}

static inline uint64_t range_last(uint64_t start, uint64_t length)
{
    return start + (length - 1);
}

uint64_t svm_reg_size(uint32_t capacity)
{
    if (capacity == 0 || capacity > SVM_MAX_CAPACITY)
        return 0;
    uint64_t size = sizeof(struct header)
                  + (uint64_t)capacity * sizeof(struct slot)
                  + (uint64_t)SVM_NBUS * capacity * sizeof(uint64_t)
                  + (uint64_t)SVM_NBUS * capacity * sizeof(uint32_t);
    return (size + 4095) & ~4095ull;
}

int svm_reg_errno(void)
{
    return last_errno;
}

const char *svm_reg_layout_reason(void)
{
    return layout_reason;
}

/* ---- locking --------------------------------------------------------- */

static void rebuild(struct svm_reg *r, uint32_t *fixed);

/* Take the registry lock.  A locker that finds the previous holder dead
 * repairs the slots and rebuilds the index before doing anything else. */
static int lock(struct svm_reg *r, int64_t timeout_ns)
{
    int rc = rlock_lock(&r->hdr->lock, timeout_ns);
    if (rc == RLOCK_TIMEDOUT)
        return SVM_ETIMEDOUT;
    if (rc == RLOCK_ERROR)
        return SVM_ELOCK;
    if (rc == RLOCK_OWNER_DEAD) {
        rebuild(r, NULL);
        r->hdr->recoveries++;
    }
    STORE(r->hdr->holder_pid, my_pid);
    return SVM_OK;
}

static void unlock(struct svm_reg *r)
{
    rlock_unlock(&r->hdr->lock);
}

/* ---- open / format ----------------------------------------------------- */

static int format(struct svm_reg *r)
{
    struct header *h = r->hdr;
    memset(r->base, 0, r->size);
    h->version = SVM_VERSION;
    h->header_size = sizeof(struct header);
    h->slot_size = sizeof(struct slot);
    h->capacity = r->capacity;
    h->nbus = SVM_NBUS;
    h->slots_offset = (uint8_t *)r->slots - r->base;
    h->keys_offset = (uint8_t *)r->keys - r->base;
    h->index_offset = (uint8_t *)r->index - r->base;
    h->total_size = r->size;
    /* The lock word is 0 (free) after the memset.  The magic goes last:
     * a half-formatted segment is refused. */
    STORE(h->magic, (uint64_t)SVM_MAGIC);
    return SVM_OK;
}

static void place(struct svm_reg *r, uint32_t capacity)
{
    r->capacity = capacity;
    r->hdr = (struct header *)r->base;
    r->slots = (struct slot *)(r->base + sizeof(struct header));
    r->keys = (uint64_t *)(r->slots + capacity);
    r->index = (uint32_t *)(r->keys + (uint64_t)SVM_NBUS * capacity);
}

int svm_reg_open(int fd, int create, uint32_t capacity, struct svm_reg **out)
{
    struct stat st;
    *out = NULL;
    if (fstat(fd, &st) != 0) {
        last_errno = errno;
        return SVM_ESYS;
    }
    uint64_t size = (uint64_t)st.st_size;
    if (create) {
        if (svm_reg_size(capacity) == 0 || size != svm_reg_size(capacity))
            return SVM_EINVAL;
    } else if (size < sizeof(struct header)) {
        layout_reason = "segment smaller than a registry header";
        return SVM_ELAYOUT;
    }
    void *base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        last_errno = errno;
        return SVM_ESYS;
    }
    struct svm_reg *r = calloc(1, sizeof(*r));
    if (!r) {
        munmap(base, size);
        return SVM_ENOMEM;
    }
    r->base = base;
    r->size = size;
    if (create) {
        place(r, capacity);
        int rc = format(r);
        if (rc != SVM_OK) {
            svm_reg_close(r);
            return rc;
        }
    } else {
        /* Copy the header fields once and check them against each other
         * and against the object's real size; only the copy is used. */
        struct header h;
        memcpy(&h, base, sizeof(h));
        uint32_t cap = h.capacity;
        const char *why = NULL;
        if (h.magic != SVM_MAGIC)
            why = "bad magic (not a splitvmm registry)";
        else if (h.version != SVM_VERSION)
            why = "unsupported layout version";
        else if (h.header_size != sizeof(struct header) ||
                 h.slot_size != sizeof(struct slot) || h.nbus != SVM_NBUS)
            why = "header, slot or bus-count sizes differ from this build";
        else if (svm_reg_size(cap) == 0)
            why = "capacity out of range";
        else if (svm_reg_size(cap) != size || h.total_size != size)
            why = "segment length does not match its capacity";
        if (!why) {
            place(r, cap);
            if (h.slots_offset != (uint64_t)((uint8_t *)r->slots - r->base) ||
                h.keys_offset != (uint64_t)((uint8_t *)r->keys - r->base) ||
                h.index_offset != (uint64_t)((uint8_t *)r->index - r->base))
                why = "table offsets differ from this build";
        }
        if (why) {
            layout_reason = why;
            svm_reg_close(r);
            return SVM_ELAYOUT;
        }
    }
    *out = r;
    return SVM_OK;
}

void svm_reg_close(struct svm_reg *r)
{
    if (!r)
        return;
    munmap(r->base, r->size);
    free(r);
}

uint32_t svm_reg_capacity(struct svm_reg *r)
{
    return r->capacity;
}

uint64_t svm_reg_base(struct svm_reg *r)
{
    return (uint64_t)(uintptr_t)r->base;
}

int svm_reg_reinit(struct svm_reg *r)
{
    return format(r);
}

/* ---- index ----------------------------------------------------------- */

/* Number of index entries of `bus` whose key (region start) is at or
 * below addr, so the candidate region is entry n-1.
 *
 * An 8-way search: each round loads 7 keys spread over the remaining
 * range -- independent loads that the CPU overlaps -- and keeps the one
 * eighth that must hold the answer; the last <= 16 keys are counted in
 * one pass.  A binary search would chain log2(n) dependent loads (12 for
 * 4096 regions, 3 for 8), and that chain, not the comparisons, is what
 * made large registries slower.  Keys are untrusted like everything else
 * here: an unsorted array gives a wrong position, never one outside
 * [0, n], and callers re-validate the slot they end up with.
 *
 * Invariant: keys before lo are <= addr; keys from lo + len on are > addr. */
static uint32_t upper_bound(struct svm_reg *r, uint32_t bus, uint64_t addr,
                            uint32_t n)
{
    const uint64_t *keys = bus_keys(r, bus);
    uint32_t lo = 0, len = n;
    while (len > 16) {                    /* at most 7 rounds */
        uint32_t step = len / 8, below = 0;
        for (uint32_t i = 1; i < 8; i++)
            below += RELAXED(keys[lo + i * step - 1]) <= addr;
        lo += below * step;
        len = below == 7 ? len - 7 * step : step - 1;
    }
    uint32_t below = 0;
    for (uint32_t i = 0; i < len; i++)
        below += RELAXED(keys[lo + i]) <= addr;
    return lo + below;
}

static void index_insert(struct svm_reg *r, uint32_t bus, uint32_t pos,
                         uint32_t slot)
{
    uint32_t *ix = bus_index(r, bus);
    uint64_t *keys = bus_keys(r, bus);
    uint32_t n = bus_count(r, bus);
    for (uint32_t i = n; i > pos; i--) {
        STORE(keys[i], LOAD(keys[i - 1]));
        STORE(ix[i], LOAD(ix[i - 1]));
        if (i == pos + 1 || i == n)
            step();
    }
    STORE(keys[pos], r->slots[slot].start);
    step();
    STORE(ix[pos], slot);
    step();
    STORE(r->hdr->count[bus], n + 1);
    step();
}

static void index_remove(struct svm_reg *r, uint32_t bus, uint32_t pos)
{
    uint32_t *ix = bus_index(r, bus);
    uint64_t *keys = bus_keys(r, bus);
    uint32_t n = bus_count(r, bus);
    for (uint32_t i = pos; i + 1 < n; i++) {
        STORE(keys[i], LOAD(keys[i + 1]));
        STORE(ix[i], LOAD(ix[i + 1]));
        if (i == pos || i + 2 == n)
            step();
    }
    STORE(r->hdr->count[bus], n - 1);
    step();
}

/* Free a slot: new generation first, then the state word. */
static void free_slot(struct slot *s)
{
    STORE(s->generation, s->generation + 1);
    step();
    STORE(s->refcount, 0);
    STORE(s->state, SVM_FREE);
    step();
}

/* Take the region at index position pos out of service. */
static void retire(struct svm_reg *r, uint32_t bus, uint32_t pos,
                   struct slot *s)
{
    if (LOAD(s->refcount) == 0)
        free_slot(s);
    else
        STORE(s->state, SVM_REMOVING);
    step();
    index_remove(r, bus, pos);
}

/* ---- recovery -------------------------------------------------------- */

struct entry {
    uint64_t start;
    uint32_t slot;
};

static int by_start(const void *a, const void *b)
{
    const struct entry *x = a, *y = b;
    if (x->start != y->start)
        return x->start < y->start ? -1 : 1;
    return x->slot < y->slot ? -1 : (x->slot > y->slot);
}

/* Make the slots valid and rebuild the index from them.  Runs with the
 * lock held (after owner death, or on request). */
static void rebuild(struct svm_reg *r, uint32_t *fixed)
{
    uint32_t nfixed = 0;
    struct entry *tmp = malloc(sizeof(*tmp) * (size_t)r->capacity);
    for (uint32_t i = 0; i < r->capacity; i++) {
        struct slot *s = &r->slots[i];
        uint32_t st = s->state;
        if (st == SVM_FREE) {
            if (s->refcount != 0) {
                s->refcount = 0;
                nfixed++;
            }
            continue;
        }
        if ((st != SVM_LIVE && st != SVM_REMOVING) || s->bus >= SVM_NBUS ||
            !range_ok(s->start, s->length) ||
            (st == SVM_REMOVING && s->refcount == 0)) {
            free_slot(s);
            nfixed++;
        }
    }
    for (uint32_t bus = 0; bus < SVM_NBUS; bus++) {
        uint32_t n = 0;
        for (uint32_t i = 0; i < r->capacity; i++) {
            struct slot *s = &r->slots[i];
            if (s->state == SVM_LIVE && s->bus == bus) {
                if (tmp) {
                    tmp[n].start = s->start;
                    tmp[n].slot = i;
                }
                n++;
            }
        }
        uint32_t *ix = bus_index(r, bus);
        uint64_t *keys = bus_keys(r, bus);
        uint32_t kept = 0;
        if (tmp) {
            qsort(tmp, n, sizeof(*tmp), by_start);
            uint64_t prev_last = 0;
            for (uint32_t k = 0; k < n; k++) {
                struct slot *s = &r->slots[tmp[k].slot];
                if (kept > 0 && s->start <= prev_last) {
                    /* Overlap: only a scribbler can cause it.  Keep the
                     * first; the other leaves service like an unregister. */
                    if (s->refcount == 0)
                        free_slot(s);
                    else
                        s->state = SVM_REMOVING;
                    nfixed++;
                    continue;
                }
                keys[kept] = s->start;
                ix[kept++] = tmp[k].slot;
                prev_last = range_last(s->start, s->length);
            }
        } else {
            /* Out of memory: fall back to an empty index and free all. */
            for (uint32_t i = 0; i < r->capacity; i++)
                if (r->slots[i].state == SVM_LIVE && r->slots[i].bus == bus)
                    free_slot(&r->slots[i]);
        }
        if (r->hdr->count[bus] != kept)
            nfixed++;
        r->hdr->count[bus] = kept;
    }
    r->hdr->count[3] = 0;
    free(tmp);
    if (fixed)
        *fixed = nfixed;
}

int svm_reg_repair(struct svm_reg *r, uint32_t *fixed, int64_t timeout_ns)
{
    int rc = lock(r, timeout_ns);
    if (rc)
        return rc;
    rebuild(r, fixed);
    unlock(r);
    return SVM_OK;
}

/* ---- operations ------------------------------------------------------ */

static int find_free(struct svm_reg *r, uint32_t *out)
{
    uint32_t cap = r->capacity;
    uint32_t i = r->free_hint < cap ? r->free_hint : 0;
    for (uint32_t k = 0; k < cap; k++) {
        if (LOAD(r->slots[i].state) == SVM_FREE) {
            *out = i;
            r->free_hint = i + 1 < cap ? i + 1 : 0;
            return SVM_OK;
        }
        i = i + 1 < cap ? i + 1 : 0;
    }
    return SVM_EFULL;
}

int svm_reg_register(struct svm_reg *r, uint32_t bus, uint64_t start,
                     uint64_t length, uint64_t owner, uint64_t cookie,
                     int64_t timeout_ns)
{
    if (bus >= SVM_NBUS || !range_ok(start, length))
        return SVM_EINVAL;
    int rc = lock(r, timeout_ns);
    if (rc)
        return rc;
    step();
    uint64_t last = range_last(start, length);
    uint32_t n = bus_count(r, bus);
    uint32_t pos = upper_bound(r, bus, start, n);
    const uint32_t *ix = bus_index(r, bus);
    if (pos > 0) {
        uint32_t p = LOAD(ix[pos - 1]);
        if (p < r->capacity &&
            range_last(r->slots[p].start, r->slots[p].length) >= start) {
            rc = SVM_ECONFLICT;
            goto out;
        }
    }
    if (pos < n) {
        uint32_t q = LOAD(ix[pos]);
        if (q < r->capacity && r->slots[q].start <= last) {
            rc = SVM_ECONFLICT;
            goto out;
        }
    }
    if (n >= r->capacity) {
        rc = SVM_EFULL;
        goto out;
    }
    uint32_t i;
    rc = find_free(r, &i);
    if (rc)
        goto out;
    struct slot *s = &r->slots[i];
    /* Fill the free slot, then make it live with one store. */
    s->start = start;
    s->length = length;
    step();
    s->owner = owner;
    s->cookie = cookie;
    s->bus = bus;
    s->refcount = 0;
    step();
    STORE(s->state, SVM_LIVE);
    step();
    index_insert(r, bus, pos, i);
out:
    unlock(r);
    return rc;
}

int svm_reg_get(struct svm_reg *r, uint32_t bus, uint64_t addr, uint64_t size,
                struct svm_ref *out, int64_t timeout_ns)
{
    if (bus >= SVM_NBUS || size == 0)
        return SVM_EINVAL;
    if (!range_ok(addr, size))
        return SVM_ENOTFOUND;   /* a wrapping access lies in no region */
    int rc = lock(r, timeout_ns);
    if (rc)
        return rc;
    rc = SVM_ENOTFOUND;
    uint32_t n = bus_count(r, bus);
    uint32_t pos = upper_bound(r, bus, addr, n);
    if (pos > 0) {
        uint32_t i = LOAD(bus_index(r, bus)[pos - 1]);
        if (i < r->capacity) {
            struct slot *s = &r->slots[i];
            /* Read each field once; judge only the copies. */
            uint64_t st = LOAD(s->start), len = LOAD(s->length);
            uint32_t refs = LOAD(s->refcount);
            if (LOAD(s->state) == SVM_LIVE && LOAD(s->bus) == bus &&
                range_ok(st, len) && addr >= st && addr - st < len &&
                size <= len - (addr - st) && refs < UINT32_MAX) {
                out->start = st;
                out->length = len;
                out->owner = LOAD(s->owner);
                out->cookie = LOAD(s->cookie);
                out->generation = LOAD(s->generation);
                out->offset = addr - st;
                out->slot = i;
                STORE(s->refcount, refs + 1);
                rc = SVM_OK;
            }
        }
    }
    unlock(r);
    return rc;
}

int svm_reg_put(struct svm_reg *r, uint32_t slot, uint64_t generation,
                int64_t timeout_ns)
{
    if (slot >= r->capacity)
        return SVM_EINVAL;
    int rc = lock(r, timeout_ns);
    if (rc)
        return rc;
    struct slot *s = &r->slots[slot];
    uint32_t st = LOAD(s->state);
    uint32_t refs = LOAD(s->refcount);
    if (LOAD(s->generation) != generation || st == SVM_FREE || refs == 0) {
        rc = SVM_ESTALE;
    } else {
        step();
        STORE(s->refcount, refs - 1);
        step();
        if (st == SVM_REMOVING && refs == 1)
            free_slot(s);
    }
    unlock(r);
    return rc;
}

/* Index position of the region of `bus` starting exactly at start. */
static int find_exact(struct svm_reg *r, uint32_t bus, uint64_t start,
                      uint32_t *pos_out, uint32_t *slot_out)
{
    uint32_t n = bus_count(r, bus);
    uint32_t pos = upper_bound(r, bus, start, n);
    if (pos == 0)
        return SVM_ENOTFOUND;
    uint32_t i = LOAD(bus_index(r, bus)[pos - 1]);
    if (i >= r->capacity || r->slots[i].start != start ||
        r->slots[i].state != SVM_LIVE)
        return SVM_ENOTFOUND;
    *pos_out = pos - 1;
    *slot_out = i;       /* the checked copy: the segment may change */
    return SVM_OK;
}

int svm_reg_unregister(struct svm_reg *r, uint32_t bus, uint64_t start,
                       uint64_t owner, int64_t timeout_ns)
{
    if (bus >= SVM_NBUS)
        return SVM_EINVAL;
    int rc = lock(r, timeout_ns);
    if (rc)
        return rc;
    step();
    uint32_t pos, i;
    rc = find_exact(r, bus, start, &pos, &i);
    if (rc == SVM_OK) {
        struct slot *s = &r->slots[i];
        if (s->owner != owner)
            rc = SVM_ENOTFOUND;
        else
            retire(r, bus, pos, s);
    }
    unlock(r);
    return rc;
}

int svm_reg_unregister_owner(struct svm_reg *r, uint64_t owner,
                             uint32_t *count, int64_t timeout_ns)
{
    int rc = lock(r, timeout_ns);
    if (rc)
        return rc;
    uint32_t removed = 0;
    for (uint32_t bus = 0; bus < SVM_NBUS; bus++) {
        uint32_t *ix = bus_index(r, bus);
        uint64_t *keys = bus_keys(r, bus);
        uint32_t n = bus_count(r, bus), kept = 0;
        for (uint32_t k = 0; k < n; k++) {
            uint32_t i = LOAD(ix[k]);
            if (i < r->capacity && r->slots[i].owner == owner &&
                r->slots[i].state == SVM_LIVE) {
                struct slot *s = &r->slots[i];
                if (LOAD(s->refcount) == 0)
                    free_slot(s);
                else
                    STORE(s->state, SVM_REMOVING);
                removed++;
                step();
                continue;
            }
            STORE(keys[kept], LOAD(keys[k]));
            STORE(ix[kept], i);
            kept++;
        }
        STORE(r->hdr->count[bus], kept);
        step();
    }
    unlock(r);
    *count = removed;
    return SVM_OK;
}

int svm_reg_snapshot(struct svm_reg *r, struct svm_slot_view *slots,
                     uint32_t *counts, uint64_t *keys, uint32_t *index,
                     int64_t timeout_ns)
{
    int rc = lock(r, timeout_ns);
    if (rc)
        return rc;
    for (uint32_t i = 0; i < r->capacity; i++) {
        struct slot *s = &r->slots[i];
        slots[i].start = s->start;
        slots[i].length = s->length;
        slots[i].owner = s->owner;
        slots[i].cookie = s->cookie;
        slots[i].generation = s->generation;
        slots[i].refcount = s->refcount;
        slots[i].state = s->state;
        slots[i].bus = s->bus;
    }
    for (uint32_t b = 0; b < SVM_NBUS; b++)
        counts[b] = r->hdr->count[b];
    memcpy(keys, r->keys, sizeof(uint64_t) * SVM_NBUS * r->capacity);
    memcpy(index, r->index, sizeof(uint32_t) * SVM_NBUS * r->capacity);
    unlock(r);
    return SVM_OK;
}

int svm_reg_peek(struct svm_reg *r, uint32_t slot, struct svm_slot_view *out)
{
    if (slot >= r->capacity)
        return SVM_EINVAL;
    struct slot *s = &r->slots[slot];
    out->start = LOAD(s->start);
    out->length = LOAD(s->length);
    out->owner = LOAD(s->owner);
    out->cookie = LOAD(s->cookie);
    out->generation = LOAD(s->generation);
    out->refcount = LOAD(s->refcount);
    out->state = LOAD(s->state);
    out->bus = LOAD(s->bus);
    return SVM_OK;
}

void svm_reg_holder(struct svm_reg *r, struct svm_holder *out)
{
    out->tid = (int32_t)rlock_holder(&r->hdr->lock);
    out->pid = LOAD(r->hdr->holder_pid);
}

uint64_t svm_reg_recoveries(struct svm_reg *r)
{
    return LOAD(r->hdr->recoveries);
}

int svm_reg_lock_for_test(struct svm_reg *r, int64_t timeout_ns)
{
    return lock(r, timeout_ns);
}

int svm_reg_unlock_for_test(struct svm_reg *r)
{
    unlock(r);
    return SVM_OK;
}

int64_t svm_reg_bench_getput(struct svm_reg *r, uint32_t bus, uint64_t base,
                             uint64_t stride, uint64_t spread, uint64_t n)
{
    struct svm_ref ref;
    struct timespec a, b;
    if (spread == 0)
        spread = 1;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (uint64_t k = 0; k < n; k++) {
        uint64_t addr = base + ((k * 7919) % spread) * stride;
        int rc = svm_reg_get(r, bus, addr, 1, &ref, 1000000000);
        if (rc)
            return -rc;
        rc = svm_reg_put(r, (uint32_t)ref.slot, ref.generation, 1000000000);
        if (rc)
            return -rc;
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    return (int64_t)(b.tv_sec - a.tv_sec) * 1000000000 + (b.tv_nsec - a.tv_nsec);
}
