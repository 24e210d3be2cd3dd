/* Declarations of the vCPU exit fast path (_vcpu.c), read by cffi as part
 * of the cdef and included by the C source (declarations only). */

/* Python fills the first block, reads an
 * access from the second and stores the value of a read in "value". */
#define SVMM_STEP_ACCESS 1           /* an access for Python's handler */
#define SVMM_STEP_EXIT 2             /* another exit: look at kvm_run */
#define SVMM_STEP_ERRNO 3            /* KVM_RUN failed with errno "err" */
#define SVMM_STEP_REGISTRY_ERROR 4   /* get failed with "reg_error"; set value */
#define SVMM_STEP_PUT_ERROR 5        /* the put of the access served last timed
                                      * out ("reg_error"); the reference is kept
                                      * and the next step retries the put
                                      * (clear has_ref to abandon it) */
#define SVMM_STEP_DRAIN 6            /* the coalesced-MMIO ring holds writes:
                                      * deliver them; the next step handles
                                      * the exit that came with them */
#define SVMM_STEP_REFUSED 7          /* the lookup found a region outside its
                                      * owner's windows: completed as
                                      * unclaimed (reads all ones); the region
                                      * is in owner/cookie/addr/offset/slot/
                                      * generation, for Python to log */
#define SVMM_STEP_FORWARD_ERROR 8    /* the slot call of an access forwarded
                                      * here (struct svmm_forward) failed with
                                      * "fwd_rc" (ipc/_slots.h codes) for access
                                      * number "fwd_aseq" on the slots at
                                      * "fwd_slots": Python completes it (the
                                      * endpoint's restart rules) and stores
                                      * the value; the reference is held */
#define SVMM_STEP_LOCAL 9            /* an access to a model served in this
                                      * process (its forward has "local" set
                                      * and is on): Python calls the model
                                      * and stores the value; this loop times
                                      * and counts the access in the forward's
                                      * cell when it completes it (Python sets
                                      * "acct_failed" first for one that
                                      * failed) */
#define SVMM_BUS_PIO 0
#define SVMM_BUS_MMIO 1

/* Owner windows (vmm/windows.py): the guest ranges the VMM granted each
 * owner, in the VMM's private memory.  A region the registry returns must
 * lie in one of its owner's windows of the same bus and cookie; a window
 * is either pinned (the region starts at "start", at most "length" long)
 * or an area (the region lies inside [start, start + length) and is at
 * most "max_len" long).  Written by svmm_windows_store under a seqlock
 * ("seq" odd while it writes), read by every vCPU without a lock. */
#define SVMM_MAX_OWNERS 256
#define SVMM_MAX_WINDOWS 1024
#define SVMM_WIN_PINNED 1
#define SVMM_WIN_ANY_COOKIE 2

struct svmm_window {
    uint32_t bus;
    uint32_t flags;
    uint64_t start;
    uint64_t length;
    uint64_t max_len;
    uint64_t cookie;
};

struct svmm_windows {
    uint64_t seq;
    uint64_t vmm_owner;        /* whose windows serve a miss (the VMM's) */
    uint32_t first[256];       /* SVMM_MAX_OWNERS: owner -> first entry */
    uint32_t count[256];
    struct svmm_window w[1024];   /* SVMM_MAX_WINDOWS */
};

/* Forwarding in C (vmm/remote/endpoint.py): an access whose region belongs
 * to a device process goes from the exit straight into its slot
 * (ipc/_slots.c svs_call, through a function pointer), without Python.
 * Python owns each struct svmm_forward: "on" is 1 only while the endpoint
 * may take accesses this way (not failed, down, paused or closing); a call
 * counts itself in "inflight" before it looks at "on" (both sequentially
 * consistent), so once Python cleared "on" and saw inflight == 0 no call
 * uses "slots" any more.  "aseq" is the endpoint's access counter (the
 * Python path takes its numbers from it too).  "cell" is the accesses
 * served here, as vmm/stats.py counts them (SVMM_FWD_CELL entries).
 *
 * A forward with "local" set is a model inside the VMM (vmm/local.py):
 * nothing is called here; while it is on, its accesses come to Python as
 * SVMM_STEP_LOCAL and are counted in "cell" (from the hand-out to the
 * completion), so that Python does nothing per access but call the model.
 * While it is off (a fault armed on the access path, closed) they come as
 * SVMM_STEP_ACCESS, without "fresh": Python's dispatcher serves them. */
#define SVMM_FWD_CELL 72
#define SVMM_FWD_TOTAL_NS 6          /* vmm/stats.py: 2 * len(Bus) */
#define SVMM_FWD_FAILURES 7
#define SVMM_FWD_HIST 8
struct svmm_forward {
    uint32_t on;
    uint32_t nslots;
    uint64_t aseq;             /* the last access number handed out */
    uint64_t inflight;
    uintptr_t slots;           /* struct svs * */
    uintptr_t call_fn;         /* svs_call */
    uint64_t gen;              /* the endpoint's generation of "slots" */
    int64_t spin_ns;
    int64_t slice_ns;
    int64_t timeout_ns;
    uint64_t cell[72];         /* SVMM_FWD_CELL */
    uint32_t local;            /* served by Python in this process */
    uint32_t local_pad;
};

/* owner -> its forward (NULL: Python serves it); seen[owner] != 0 once
 * Python looked at the owner's endpoint (until then each access to it is
 * handed out with "fresh" set, and so is one to a forward that is off). */
struct svmm_forwards {
    struct svmm_forward *f[256];   /* SVMM_MAX_OWNERS */
    uint8_t seen[256];
    /* Drains of the coalesced-MMIO ring in progress (vmm/dispatch.py, one
     * at a time): while one runs, writes it has taken from the ring are not
     * delivered yet, so no access is forwarded here -- Python's path waits
     * for the drain, as every access did before forwarding in C. */
    uint32_t draining;
};

/* The next access number of a forward (atomic), its calls in flight. */
uint64_t svmm_forward_next_aseq(struct svmm_forward *f);
uint64_t svmm_forward_inflight(struct svmm_forward *f);
/* Set or clear "on" (sequentially consistent). */
void svmm_forward_switch(struct svmm_forward *f, uint32_t on);
/* A drain of the coalesced ring begins (before it takes any write) / ends
 * (after it delivered the last). */
void svmm_drain_begin(struct svmm_forwards *t);
void svmm_drain_end(struct svmm_forwards *t);

struct svmm_vcpu {
    /* set up by Python */
    int fd;
    struct kvm_run *run;
    uint32_t run_size;
    uintptr_t registry;        /* struct svm_reg * of ipc's C core */
    uintptr_t get_fn;          /* svm_reg_get */
    uintptr_t put_fn;          /* svm_reg_put */
    int64_t lock_timeout_ns;
    void *ring;                /* the coalesced-MMIO ring page, or NULL */
    struct svmm_windows *windows;  /* owner windows, or NULL: no check */
    struct svmm_forwards *forwards;  /* forwarding in C, or NULL: none */
    /* the access handed out */
    uint32_t bus;
    uint32_t size;
    uint32_t is_write;
    uint32_t fresh;            /* Python should look at the owner's forward */
    uint64_t addr;
    uint64_t value;
    uint64_t owner;
    uint64_t cookie;
    uint64_t offset;
    int err;
    int reg_error;
    uint32_t index;            /* set up by Python: the vCPU's index, its slot */
    /* counters */
    uint64_t exits;
    uint64_t unclaimed;
    uint64_t put_errors;
    uint64_t refused;          /* lookups that found a region outside its windows */
    uint64_t region_start;     /* the refused region (SVMM_STEP_REFUSED) */
    uint64_t region_length;
    /* internal */
    uint32_t pending;
    uint32_t exit_pending;     /* an exit not decoded yet (after a DRAIN) */
    uint32_t has_ref;
    uint32_t relookup;         /* go on with the elements after a REFUSED */
    uint32_t elem;
    uint32_t count;
    uint64_t data_offset;
    uint64_t slot;
    uint64_t generation;
    /* a forwarded access whose call failed (SVMM_STEP_FORWARD_ERROR) */
    int fwd_rc;
    uint64_t fwd_aseq;
    uint64_t fwd_slots;
    uint64_t fwd_gen;
    uint64_t forwarded;        /* accesses served in C */
    /* the local access handed out (SVMM_STEP_LOCAL), counted when it completes */
    struct svmm_forward *acct;
    int64_t acct_t0;
    uint32_t acct_failed;      /* set by Python: the model failed */
    uint32_t acct_pad;
    uint64_t local_served;     /* SVMM_STEP_LOCAL accesses handed out */
};

int svmm_step(struct svmm_vcpu *v);
/* svmm_step with the value of the pending access (a read's; a write or no
 * pending access ignore it): "value" without a store into the context
 * from Python first.  After SVMM_STEP_PUT_ERROR that is "value" as it is
 * (the access may be one forwarded here). */
int svmm_step_value(struct svmm_vcpu *v, uint64_t value);
/* Count the local access handed out now (its time ends here), not when it
 * completes: before the vCPU thread waits with it pending (a pause). */
void svmm_account(struct svmm_vcpu *v);
/* Replace every window: entries w[0..n), owner o's are w[first[o]..+count[o]). */
int svmm_windows_store(struct svmm_windows *t, const uint32_t *first, const uint32_t *count,
                       const struct svmm_window *w, uint32_t n);
/* 1 when a region (bus, start, length, owner, cookie) is inside a window
 * of its owner (the check of the exit path, for Python and tests). */
int svmm_windows_check(struct svmm_windows *t, uint32_t bus, uint64_t start, uint64_t length,
                       uint64_t owner, uint64_t cookie);
int svmm_finish(struct svmm_vcpu *v);
