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
#define SVMM_BUS_PIO 0
#define SVMM_BUS_MMIO 1

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
    /* the access handed out */
    uint32_t bus;
    uint32_t size;
    uint32_t is_write;
    uint64_t addr;
    uint64_t value;
    uint64_t owner;
    uint64_t cookie;
    uint64_t offset;
    int err;
    int reg_error;
    /* counters */
    uint64_t exits;
    uint64_t unclaimed;
    uint64_t put_errors;
    /* internal */
    uint32_t pending;
    uint32_t exit_pending;     /* an exit not decoded yet (after a DRAIN) */
    uint32_t has_ref;
    uint32_t elem;
    uint32_t count;
    uint64_t data_offset;
    uint64_t slot;
    uint64_t generation;
};

int svmm_step(struct svmm_vcpu *v);
int svmm_finish(struct svmm_vcpu *v);
