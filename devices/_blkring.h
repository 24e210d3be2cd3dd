/* The C core of virtio-blk's usual request (devices/virtio/blk.py,
 * devices/blkring.py): declarations, read by cffi (cdef) and by _blkring.c. */

struct blk_span {
    uint64_t first, end;        /* guest-physical [first, end) */
    int64_t delta;              /* offset in the mapping - guest-physical */
};

struct blk_req {
    uint64_t sector;
    uint64_t data_off;          /* offset of the data buffer in the mapping */
    uint64_t status_off;        /* offset of the status byte in the mapping */
    uint32_t len;               /* data bytes, a whole number of sectors */
    uint16_t head;
    uint16_t write;             /* 1: VIRTIO_BLK_T_OUT, 0: VIRTIO_BLK_T_IN */
};

int blk_scan(const uint8_t *ram, uint64_t ram_len, const struct blk_span *spans, int nspans,
             uint64_t desc_off, uint64_t avail_off, uint32_t size, uint16_t last_avail, uint32_t pending,
             uint64_t capacity, int readonly, struct blk_req *reqs, int max);

/* A queue's in-flight record (ipc/inflight.py's layout): 64-byte header
 * (u16 used_idx at 0), then 16-byte entries (u64 counter, u8 flag). */
struct blk_record {
    uint8_t *base;
    uint64_t len;
    uint32_t size;              /* the queue size the record was reset to */
    uint64_t counter;           /* the next pop's counter (in and out) */
};

int blk_run(uint8_t *ram, uint64_t ram_len, int fd, const struct blk_req *reqs, int k, int taken,
            uint64_t used_off, uint32_t size, uint16_t used_idx, struct blk_record *rec);

/* The fault decisions the C loop takes itself (devices/blkring.py
 * FaultTable): per point (0 blk.read, 1 blk.write), how many more events
 * no trigger can select, the sector spans armed faults match, and how many
 * events were passed over since the engine last counted them. */
#define BLK_FAULT_SPANS 8
struct blk_fault_point {
    uint64_t quiet;             /* events that may still be passed over (0: none) */
    uint64_t passed;            /* passed over, not yet handed to the engine */
    uint32_t nspans;
    uint64_t lo[BLK_FAULT_SPANS], hi[BLK_FAULT_SPANS];     /* inclusive first-sector spans */
};
struct blk_faults {
    struct blk_fault_point point[2];
};

/* blk_scan, then the requests no armed fault can take passed over (and
 * counted); the batch ends at the first one the fault engine must decide:
 * -k when that is its last request, else k. */
int blk_scan_faults(const uint8_t *ram, uint64_t ram_len, const struct blk_span *spans, int nspans,
                    uint64_t desc_off, uint64_t avail_off, uint32_t size, uint16_t last_avail, uint32_t pending,
                    uint64_t capacity, int readonly, struct blk_req *reqs, int max, struct blk_faults *f);

int blk_wait(const uint8_t *ram, uint64_t ram_len, uint64_t avail_off, uint16_t last_avail, uint64_t max_ns);
