/* Declarations of the registry's C core (ipc/_registry.c).
 *
 * This file is read twice: by cffi as the cdef (so it holds declarations
 * only, no #include and no expressions), and by the C compiler through
 * _registry.c.  Constants marked "..." in the cdef are filled in by the
 * compiler from _registry.c.
 */

/* Return codes of every svm_reg_* call (0 is success). */
#define SVM_OK 0
#define SVM_ECONFLICT 1   /* overlaps a region in the index */
#define SVM_EFULL 2       /* no free slot */
#define SVM_ENOTFOUND 3   /* no such region, or not its owner */
#define SVM_ETIMEDOUT 4   /* lock deadline expired */
#define SVM_EINVAL 5      /* bad argument (zero length, wrapping range, bad bus) */
#define SVM_ESTALE 6      /* reference does not match the slot's tenant */
#define SVM_ELAYOUT 7     /* segment is not a registry this code understands */
#define SVM_ELOCK 8       /* this thread cannot use the lock (see _rlock.h) */
#define SVM_ENOMEM 9
#define SVM_ESYS 10       /* a system call failed; errno is kept in svm_reg_errno */

#define SVM_NBUS 3

/* Slot states. */
#define SVM_FREE 0
#define SVM_LIVE 1
#define SVM_REMOVING 2

/* Layout identification. */
#define SVM_MAGIC 0x52474d5654494c50
#define SVM_VERSION 1

struct svm_reg;   /* a process-private handle on one mapped segment */

/* What a successful get hands back (copied out under the lock). */
struct svm_ref {
    uint64_t start;
    uint64_t length;
    uint64_t owner;
    uint64_t cookie;
    uint64_t generation;
    uint64_t offset;     /* addr - start */
    uint64_t slot;
};

/* One slot as seen by svm_reg_snapshot (raw copy, not validated). */
struct svm_slot_view {
    uint64_t start;
    uint64_t length;
    uint64_t owner;
    uint64_t cookie;
    uint64_t generation;
    uint32_t refcount;
    uint32_t state;
    uint32_t bus;
};

/* Who holds, or last held, the lock. */
struct svm_holder {
    int32_t tid;        /* from the lock word (the holder's thread id) */
    int32_t pid;        /* what the holder wrote after locking */
};

/* Segment size for a given capacity (0 when capacity is out of range). */
uint64_t svm_reg_size(uint32_t capacity);

/* Map the shared-memory object open on fd.  create != 0 formats it (the
 * object must already be svm_reg_size(capacity) bytes); otherwise the
 * header is validated against the object's size.  On failure *out stays
 * NULL and the return code says why. */
int svm_reg_open(int fd, int create, uint32_t capacity, struct svm_reg **out);
void svm_reg_close(struct svm_reg *r);
uint32_t svm_reg_capacity(struct svm_reg *r);
int svm_reg_errno(void);
/* Why the last svm_reg_open on this thread returned SVM_ELAYOUT. */
const char *svm_reg_layout_reason(void);

/* Formats the segment again in place: empty registry, free lock.  Only
 * for the VMM, when nobody else can be using it (e.g. after corruption). */
int svm_reg_reinit(struct svm_reg *r);

/* The registry operations.  timeout_ns bounds the wait for the lock. */
int svm_reg_register(struct svm_reg *r, uint32_t bus, uint64_t start,
                     uint64_t length, uint64_t owner, uint64_t cookie,
                     int64_t timeout_ns);
int svm_reg_get(struct svm_reg *r, uint32_t bus, uint64_t addr, uint64_t size,
                struct svm_ref *out, int64_t timeout_ns);
int svm_reg_put(struct svm_reg *r, uint32_t slot, uint64_t generation,
                int64_t timeout_ns);
int svm_reg_unregister(struct svm_reg *r, uint32_t bus, uint64_t start,
                       uint64_t owner, int64_t timeout_ns);
int svm_reg_unregister_owner(struct svm_reg *r, uint64_t owner,
                             uint32_t *count, int64_t timeout_ns);

/* Rebuild the index from the slots under the lock, as owner-death recovery does. */
int svm_reg_repair(struct svm_reg *r, uint32_t *fixed, int64_t timeout_ns);

/* Copy slots, per-bus index counts, keys and index entries out under the
 * lock.  slots: capacity entries; counts: SVM_NBUS entries; keys and
 * index: SVM_NBUS * capacity entries each. */
int svm_reg_snapshot(struct svm_reg *r, struct svm_slot_view *slots,
                     uint32_t *counts, uint64_t *keys, uint32_t *index,
                     int64_t timeout_ns);

/* Who holds the lock right now (read without taking it). */
void svm_reg_holder(struct svm_reg *r, struct svm_holder *out);

/* How many times this segment went through owner-death recovery. */
uint64_t svm_reg_recoveries(struct svm_reg *r);

/* Lock and unlock without doing anything else (tests: lock hog). */
int svm_reg_lock_for_test(struct svm_reg *r, int64_t timeout_ns);
int svm_reg_unlock_for_test(struct svm_reg *r);

/* A raw, unlocked look at one slot (tests: is my reference's slot still
 * mine?).  Returns SVM_EINVAL for an out-of-range slot. */
int svm_reg_peek(struct svm_reg *r, uint32_t slot, struct svm_slot_view *out);

/* Base address and size of the mapping (tests: bounds checks). */
uint64_t svm_reg_base(struct svm_reg *r);

/* Benchmarks: n get+put pairs in a C loop, the k-th at address
 * base + ((k * 7919) % spread) * stride, so consecutive lookups land in
 * different regions; returns the elapsed nanoseconds or -(return code). */
int64_t svm_reg_bench_getput(struct svm_reg *r, uint32_t bus, uint64_t base,
                             uint64_t stride, uint64_t spread, uint64_t n);

/* Test hook for crash-consistency tests.  When svm_test_crash_step is
 * non-zero, every mutation counts its steps in svm_test_step_counter and
 * the step whose number equals svm_test_crash_step raises SIGKILL (action
 * 1) or SIGSTOP (action 2) on the calling process. */
extern int64_t svm_test_crash_step;
extern int64_t svm_test_step_counter;
extern int svm_test_crash_action;
