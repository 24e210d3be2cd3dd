/* Declarations of the access slots' C core (ipc/_slots.c).
 *
 * Read twice: by cffi as the cdef (declarations only, no #include, no
 * expressions) and by the C compiler through _slots.c, so the two cannot
 * drift apart.
 */

/* Return codes (0 is success). */
#define SVS_OK 0
#define SVS_ETIMEDOUT 1   /* no answer (VMM) or no request (device) in time */
#define SVS_EDEAD 2       /* the peer was declared dead (svs_mark_dead) */
#define SVS_EBADRESP 3    /* the device answered with an unknown status */
#define SVS_EINVAL 4      /* bad argument (slot number, size, space) */
#define SVS_ELAYOUT 5     /* segment is not a slot segment this code understands */
#define SVS_ESYS 6        /* a system call failed; errno in svs_errno() */
#define SVS_ESTOPPED 7    /* the device side was asked to stop (svs_stop) */
#define SVS_EDEVICE 8     /* the device answered SVS_STATUS_ERROR */

/* Status a device writes with its answer. */
#define SVS_STATUS_OK 0
#define SVS_STATUS_ERROR 1    /* the model raised: the VMM fails the device */

/* Layout identification. */
#define SVS_MAGIC 0x53544f4c534d5653
#define SVS_VERSION 2
#define SVS_MAX_SLOTS 256

struct svs;   /* a process-private handle on one mapped slot segment */

/* One request as the device receives it: copied out of the segment once,
 * then validated, so a later scribble cannot change what was checked. */
struct svs_request {
    uint32_t slot;
    uint32_t seq;
    uint32_t space;
    uint32_t size;
    uint32_t is_write;
    uint32_t reserved;
    uint64_t cookie;
    uint64_t offset;
    uint64_t value;
    uint64_t aseq;      /* the access sequence number (issue 10 §2) */
};

/* The device's serve-loop counters.  The device keeps them privately and
 * publishes a copy in the segment header, where the VMM may read them as
 * untrusted, informational figures. */
struct svs_stats {
    uint64_t served;          /* requests answered */
    uint64_t polled_hits;     /* requests found while polling (no sleep) */
    uint64_t sleeps;          /* futex waits entered */
    uint64_t wakeups;         /* futex waits that ended with work to do */
    uint64_t poll_ns;         /* time spent polling, in ns (CPU burnt) */
    uint64_t poll_wasted_ns;  /* polling that ended in a sleep anyway */
    uint64_t sleep_ns;        /* time spent asleep in futex waits */
    uint64_t window_ns;       /* the current adaptive poll window */
    uint64_t poll_yields;     /* polls cut short: the caller shares our CPU */
    uint64_t moves;           /* moves off the caller's CPU (move=1) */
};

/* What the VMM side counts (private, trusted). */
struct svs_client_stats {
    uint64_t calls;
    uint64_t spin_hits;       /* answers seen while spinning */
    uint64_t sleeps;          /* futex waits entered */
    uint64_t spin_ns;         /* time spent spinning */
    uint64_t timeouts;
    uint64_t yields;          /* spins cut short: the device shares our CPU */
};

/* Segment size for nslots slots (0 when nslots is out of range). */
uint64_t svs_size(uint32_t nslots);

/* Map the memory object open on fd.  create != 0 formats it (it must be
 * svs_size(nslots) bytes already); otherwise the header is validated
 * against the object's size and *nslots is ignored on input.  The caller
 * keeps fd. */
int svs_open(int fd, int create, uint32_t nslots, struct svs **out);
void svs_close(struct svs *h);
uint32_t svs_nslots(struct svs *h);
int svs_errno(void);

/* ---- VMM side ----------------------------------------------------------
 * One caller per slot at a time.  Writes the request, publishes its
 * sequence number, rings the device's doorbell (a futex wake only when the
 * device says it sleeps), then waits for the answer: spin for spin_ns,
 * then futex waits in slices of at most slice_ns until timeout_ns.  Every
 * slice checks the private "dead" flag.  The answer counts only when its
 * slot sequence number is the request's and it echoes the access sequence
 * number aseq (the device's per-access number, kept across restarts); a
 * read's value is masked to size. */
int svs_call(struct svs *h, uint32_t slot, uint32_t space, uint64_t cookie,
             uint64_t offset, uint32_t size, uint32_t is_write,
             uint64_t value, uint64_t aseq, int64_t spin_ns, int64_t slice_ns,
             int64_t timeout_ns, uint64_t *out_value);

/* After the device died: the answer to access aseq, the last request sent
 * on slot, if it is in the slot (SVS_OK, checked as svs_call checks it);
 * SVS_ETIMEDOUT if it is not; SVS_EINVAL if aseq is not the last request
 * sent on slot (it was never sent: the slot was dead already). */
int svs_answer(struct svs *h, uint32_t slot, uint64_t aseq, uint64_t *out_value);

/* Declare the device dead (private flag) and wake every waiting caller. */
void svs_mark_dead(struct svs *h);
void svs_client_stats(struct svs *h, struct svs_client_stats *out);
/* The device's published counters, copied as they are (untrusted). */
void svs_device_stats(struct svs *h, struct svs_stats *out);

/* ---- device side -------------------------------------------------------
 * One serving thread.  Waits for the next request on any slot: polls the
 * slots for the adaptive window (at most poll_max_ns since the last
 * request; 0 disables polling), then sleeps on the doorbell futex, waking
 * at least every sleep_slice_ns (so the caller can check its parent).
 * Returns SVS_OK with *out filled, SVS_ETIMEDOUT after a slice with
 * nothing to do, SVS_ESTOPPED once svs_stop was called.  Polling stops
 * early when the last caller runs on this CPU; with move != 0 the serving
 * thread first tries to move to another CPU of its affinity mask. */
void svs_set_polling(struct svs *h, int64_t poll_max_ns, int adaptive, int move);
int svs_next(struct svs *h, int64_t sleep_slice_ns, struct svs_request *out);
/* Answer request (slot, seq) with access number aseq: value, status,
 * then the sequence number. */
int svs_complete(struct svs *h, uint32_t slot, uint32_t seq, uint64_t aseq, uint64_t value,
                 uint32_t status);
/* svs_complete, then svs_next: the serving loop's one call per access
 * (what each returns as they would; a failed complete returns at once). */
int svs_complete_next(struct svs *h, uint32_t slot, uint32_t seq, uint64_t aseq, uint64_t value,
                      uint32_t status, int64_t sleep_slice_ns, struct svs_request *out);
/* From any thread: make svs_next return SVS_ESTOPPED. */
void svs_stop(struct svs *h);

/* Tests: base address of the mapping, and a raw store into a slot's
 * response half (a scribbling device). */
uint64_t svs_base(struct svs *h);
int svs_scribble_response(struct svs *h, uint32_t slot, uint32_t seq,
                          uint64_t value, uint32_t status);

/* ---- the state segment's snapshot store (ipc/state.py) -----------------
 * Write one snapshot into the buffer at buf (its 64-byte head, then cap
 * bytes of room), in four steps: unpublish (number 0), the payload, the
 * access record and the crc (zlib's crc32 over number, record and
 * payload, as the reader checks it), publish the number.  What
 * StateSegment.store did in five Python calls, in one: it runs before
 * every answer.  steps < 4 does only the first "steps" of them, and with
 * torn != 0 the first half of the bytes of the next one: the crash tests'
 * deaths between (or inside) two stores (tests/ipc/_tripwire.py). */
int svs_state_store(uint64_t buf, uint64_t cap, uint64_t number, uint64_t seq, uint64_t value,
                    uint32_t status, const char *payload, uint32_t n, int steps, int torn);
/* The writer's numbers of a state segment (ipc/state.py), so that the
 * store before each answer of a model that packs its own snapshot is one
 * call of few arguments: each buffer's address, the capacity, the number
 * of the next snapshot (0: not known yet), the record of the last store,
 * and the length of the last payload stored (when has_last, its bytes are
 * in the buffer of snapshot next - 1). */
struct svs_state_writer {
    uint64_t buf[2];
    uint64_t cap;
    uint64_t next;
    uint64_t seq;
    uint64_t value;
    uint32_t status;
    uint32_t last_n;
    uint32_t has_last;
    uint32_t pad;
};
/* Store payload as snapshot w->next with the record (seq, value, status
 * 0), all four steps (svs_state_store), and advance w: 1; 0 when it is
 * byte for byte the last payload stored (nothing written, the record
 * stays); SVS_EINVAL (-4) when w->next is 0, SVS_ELAYOUT (-5) when n >
 * w->cap (nothing written either way). */
int svs_state_store_packed(struct svs_state_writer *w, uint64_t seq, uint64_t value,
                           const char *payload, uint32_t n);
/* svs_state_store_packed with only the first "steps" steps of the store
 * (and half of the next with torn != 0), as svs_state_store's; w advances
 * only after all four: the crash tests' deaths inside a packed store
 * (tests/ipc/_tripwire.py).  Returns what svs_state_store_packed would. */
int svs_state_store_packed_steps(struct svs_state_writer *w, uint64_t seq, uint64_t value,
                                 const char *payload, uint32_t n, int steps, int torn);
/* zlib's crc32(data, start), for the tests. */
uint32_t svs_crc32(uint32_t start, const char *data, uint64_t n);
