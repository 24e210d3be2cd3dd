/* A process-shared robust lock that trusts nothing in shared memory.
 *
 * This is the kernel's robust-futex protocol (Documentation/locking/
 * robust-futexes.rst and robust-futex-ABI.rst), the same one glibc's
 * PTHREAD_MUTEX_ROBUST mutexes use, written out so that the only things in
 * the shared segment are a 32-bit lock word and the list link the kernel
 * walks when a thread dies:
 *
 *   word == 0                       free
 *   word & FUTEX_TID_MASK           thread id of the holder
 *   word & FUTEX_WAITERS            someone sleeps in FUTEX_WAIT on it
 *   word & FUTEX_OWNER_DIED         the kernel saw the holder die
 *
 * Why not pthread_mutex_t itself: glibc reads the mutex's kind and its
 * robust-list links back from the (shared) mutex on every lock and unlock
 * and acts on them -- a device that scribbles over a pthread mutex can make
 * the VMM take the lock-elision path (SIGILL here), trip glibc asserts
 * (SIGABRT), or write through a pointer of its choosing.  Here the kind is
 * fixed by the code and every link the code follows lives in private
 * memory; what a scribbler can do to the word is make lockers wait until
 * their deadline or see the lock as dead, and both are handled.
 *
 * Death detection: before taking the word the thread records it in its
 * robust-list head's list_op_pending (so dying between the compare-and-
 * swap and the list insert is covered), then links the lock's node at the
 * head of the thread's robust list.  If the thread dies holding it, the
 * kernel sets FUTEX_OWNER_DIED and wakes a waiter; the next locker gets
 * RLOCK_OWNER_DEAD, repairs the protected data, and holds the lock as
 * usual (there is no separate "consistent" step: a locker that dies during
 * repair leaves OWNER_DIED for the next one).
 *
 * The per-thread robust-list head is glibc's (found with get_robust_list);
 * the node is placed so that node + futex_offset is the word, as the kernel
 * expects.  Locks may nest (a thread holds at most RLOCK_MAX_HELD at once)
 * and may be released in any order; the links to splice are kept privately.
 */
#ifndef SPLITVMM_RLOCK_H
#define SPLITVMM_RLOCK_H

#include <errno.h>
#include <linux/futex.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define RLOCK_OK 0
#define RLOCK_OWNER_DEAD 1      /* acquired; the previous holder died */
#define RLOCK_TIMEDOUT 2
#define RLOCK_ERROR 3           /* no robust list for this thread, or too deep */
#define RLOCK_MAX_HELD 8

/* The part of the segment the lock uses: 64 bytes, 64-byte aligned. */
struct rlock {
    uint32_t word;
    uint32_t reserved;
    uint64_t node[7];           /* the list node sits at -futex_offset */
};

struct rlock_held {
    struct rlock *lock;
    void *node;                 /* address of our node inside lock */
    void *next;                 /* what the node points to (private copy) */
};

static __thread struct robust_list_head *rlock_head;
static __thread struct robust_list_head rlock_own_head;
static __thread struct rlock_held rlock_stack[RLOCK_MAX_HELD];
static __thread int rlock_depth;
static __thread pid_t rlock_tid;

static inline long rlock_futex(uint32_t *uaddr, int op, uint32_t val,
                               const struct timespec *ts, uint32_t val3)
{
    return syscall(SYS_futex, uaddr, op, val, ts, NULL, val3);
}

/* This thread's robust-list head, registering one if glibc did not. */
static struct robust_list_head *rlock_thread_head(void)
{
    if (rlock_head)
        return rlock_head;
    struct robust_list_head *head = NULL;
    size_t len = 0;
    if (syscall(SYS_get_robust_list, 0, &head, &len) != 0 || head == NULL ||
        len != sizeof(*head)) {
        rlock_own_head.list.next = &rlock_own_head.list;
        rlock_own_head.futex_offset = -(long)offsetof(struct rlock, node[3]);
        rlock_own_head.list_op_pending = NULL;
        if (syscall(SYS_set_robust_list, &rlock_own_head, sizeof(rlock_own_head)) != 0)
            return NULL;
        head = &rlock_own_head;
    }
    /* The node must fit inside struct rlock, pointer-aligned, past the word. */
    long off = -head->futex_offset;
    if (off < 8 || off > (long)(sizeof(struct rlock) - sizeof(void *)) || off % 8)
        return NULL;
    rlock_tid = (pid_t)syscall(SYS_gettid);
    rlock_head = head;
    return head;
}

static inline void *rlock_node(struct robust_list_head *head, struct rlock *l)
{
    return (char *)&l->word - head->futex_offset;
}

/* Link l's node at the head of this thread's robust list. */
static void rlock_enlist(struct robust_list_head *head, struct rlock *l,
                         void *node)
{
    void *first = head->list.next;               /* private */
    __atomic_store_n((void **)node, first, __ATOMIC_RELAXED);
    __atomic_store_n(&head->list.next, (struct robust_list *)node,
                     __ATOMIC_RELEASE);
    struct rlock_held *h = &rlock_stack[rlock_depth++];
    h->lock = l;
    h->node = node;
    h->next = first;
    __atomic_store_n(&head->list_op_pending, NULL, __ATOMIC_RELEASE);
}

/* Absolute CLOCK_MONOTONIC time timeout_ns from now. */
static void rlock_deadline(struct timespec *ts, int64_t timeout_ns)
{
    clock_gettime(CLOCK_MONOTONIC, ts);
    if (timeout_ns < 0)
        timeout_ns = 0;
    ts->tv_sec += timeout_ns / 1000000000;
    ts->tv_nsec += timeout_ns % 1000000000;
    if (ts->tv_nsec >= 1000000000) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000;
    }
}

/* Take the lock, waiting at most timeout_ns (the clock is read only when
 * the lock is contended). */
static int rlock_lock(struct rlock *l, int64_t timeout_ns)
{
    struct robust_list_head *head = rlock_thread_head();
    if (!head || rlock_depth >= RLOCK_MAX_HELD)
        return RLOCK_ERROR;
    void *node = rlock_node(head, l);
    uint32_t tid = (uint32_t)rlock_tid & FUTEX_TID_MASK;
    __atomic_store_n(&head->list_op_pending, (struct robust_list *)node,
                     __ATOMIC_RELEASE);
    uint32_t w = 0;
    if (__atomic_compare_exchange_n(&l->word, &w, tid, 0, __ATOMIC_ACQUIRE,
                                    __ATOMIC_RELAXED)) {
        rlock_enlist(head, l, node);
        return RLOCK_OK;
    }
    /* Contended.  Once we have slept, others may sleep too: take the word
     * with FUTEX_WAITERS set so our unlock wakes the next one. */
    struct timespec deadline;
    rlock_deadline(&deadline, timeout_ns);
    uint32_t want = tid;
    for (int rounds = 0; rounds < 1000000; rounds++) {
        w = __atomic_load_n(&l->word, __ATOMIC_RELAXED);
        if ((w & FUTEX_TID_MASK) == 0) {
            /* Free, or its holder died (OWNER_DIED set by the kernel). */
            uint32_t dead = w & FUTEX_OWNER_DIED;
            if (__atomic_compare_exchange_n(&l->word, &w, want, 0,
                                            __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
                rlock_enlist(head, l, node);
                return dead ? RLOCK_OWNER_DEAD : RLOCK_OK;
            }
            continue;
        }
        if (!(w & FUTEX_WAITERS)) {
            if (!__atomic_compare_exchange_n(&l->word, &w, w | FUTEX_WAITERS, 0,
                                             __ATOMIC_RELAXED, __ATOMIC_RELAXED))
                continue;
            w |= FUTEX_WAITERS;
        }
        want = tid | FUTEX_WAITERS;
        long rc = rlock_futex(&l->word, FUTEX_WAIT_BITSET, w, &deadline,
                              FUTEX_BITSET_MATCH_ANY);
        if (rc != 0 && errno == ETIMEDOUT)
            break;
    }
    __atomic_store_n(&head->list_op_pending, NULL, __ATOMIC_RELEASE);
    return RLOCK_TIMEDOUT;
}

/* Release a lock this thread holds.  Returns -1 if the word no longer
 * names this thread (someone wrote over it); the lock is off our robust
 * list either way. */
static int rlock_unlock(struct rlock *l)
{
    struct robust_list_head *head = rlock_head;
    int k = rlock_depth - 1;
    while (k >= 0 && rlock_stack[k].lock != l)
        k--;
    if (k < 0 || !head)
        return -1;
    struct rlock_held *h = &rlock_stack[k];
    __atomic_store_n(&head->list_op_pending, (struct robust_list *)h->node,
                     __ATOMIC_RELEASE);
    /* Unlink: whoever points at our node now points at what it pointed to.
     * That is the head, or the node of a lock taken after this one (its
     * address is in our private stack), never a link read from the segment. */
    if (k == rlock_depth - 1) {
        __atomic_store_n(&head->list.next, (struct robust_list *)h->next,
                         __ATOMIC_RELEASE);
    } else {
        struct rlock_held *above = &rlock_stack[k + 1];
        __atomic_store_n((void **)above->node, h->next, __ATOMIC_RELEASE);
        above->next = h->next;
    }
    for (int i = k; i + 1 < rlock_depth; i++)
        rlock_stack[i] = rlock_stack[i + 1];
    rlock_depth--;
    uint32_t tid = (uint32_t)rlock_tid & FUTEX_TID_MASK;
    uint32_t w = __atomic_load_n(&l->word, __ATOMIC_RELAXED);
    int rc = 0;
    if ((w & FUTEX_TID_MASK) != tid) {
        rc = -1;            /* not ours any more: leave the word alone */
    } else {
        w = __atomic_exchange_n(&l->word, 0, __ATOMIC_RELEASE);
        if (w & FUTEX_WAITERS)
            rlock_futex(&l->word, FUTEX_WAKE, 1, NULL, 0);
    }
    __atomic_store_n(&head->list_op_pending, NULL, __ATOMIC_RELEASE);
    return rc;
}

/* Thread id named by the lock word (0 when free). */
static inline uint32_t rlock_holder(struct rlock *l)
{
    return __atomic_load_n(&l->word, __ATOMIC_RELAXED) & FUTEX_TID_MASK;
}

/* After fork only the calling thread survives, with a new thread id, and
 * holds no lock (the parent's holdings are the parent's). */
static void rlock_atfork_child(void)
{
    rlock_head = NULL;
    rlock_depth = 0;
}

#endif
