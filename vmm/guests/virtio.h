/* A virtio-pci driver for the project's test guests (Virtual I/O Device
 * (VIRTIO) Version 1.2, OASIS, 2022): the modern PCI transport (§4.1.4),
 * driver initialization (§3.1.1), split virtqueues (§2.7), and thin
 * drivers for virtio-rng (§5.4) and virtio-blk (§5.2).  Freestanding C,
 * ring 3 (the MMIO of the BARs is user-accessible in the identity map of
 * start.S); build a guest with vmm/guests/virtio.c and pci.c (and irq.S /
 * irq.c, always linked) among its sources.
 *
 * Addresses: guest-physical == guest-virtual (start.S maps the low 4 GiB
 * 1:1), so the rings and buffers are plain pointers into the guest image's
 * .bss handed to the device as they are.  BARs: used where they are
 * (SeaBIOS assigns them under QEMU, splitvmm pre-assigns them); a BAR the
 * driver needs that is unassigned (0) or out of the 4 GiB identity map is
 * assigned by virtio_pci_init from a window the caller may set
 * (virtio_bar_window).
 *
 * Completion: by polling the used ring (default: the driver also sets
 * VIRTQ_AVAIL_F_NO_INTERRUPT and gives the queue no MSI-X vector), or by
 * MSI-X (virtio_use_msix: one vector per queue, counted by irq.h; the
 * guest must say IRQ_RING3_INTERRUPTS_ON and call irq_init/irq_enable).
 *
 * Not thread-safe: one vCPU drives a device (several queues of it
 * round-robin, see virtio_blk_submit). */
#ifndef SPLITVMM_VIRTIO_H
#define SPLITVMM_VIRTIO_H

#include "guest.h"
#include "pci.h"

/* PCI IDs (§4.1.2): modern devices are 0x1040 + device id. */
#define VIRTIO_PCI_VENDOR 0x1af4
#define VIRTIO_PCI_MODERN_BASE 0x1040
#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_CONSOLE 3
#define VIRTIO_ID_RNG 4

/* Device status (§2.1). */
#define VIRTIO_STATUS_ACKNOWLEDGE 1
#define VIRTIO_STATUS_DRIVER 2
#define VIRTIO_STATUS_DRIVER_OK 4
#define VIRTIO_STATUS_FEATURES_OK 8
#define VIRTIO_STATUS_NEEDS_RESET 0x40
#define VIRTIO_STATUS_FAILED 0x80

/* Reserved feature bits (§6). */
#define VIRTIO_F_INDIRECT_DESC 28
#define VIRTIO_F_EVENT_IDX 29
#define VIRTIO_F_VERSION_1 32
#define VIRTIO_F_ACCESS_PLATFORM 33
#define VIRTIO_F_RING_PACKED 34

/* PCI capability (§4.1.4): vendor-specific, cfg_type. */
#define PCI_CAP_ID_VNDR 0x09
#define VIRTIO_PCI_CAP_COMMON_CFG 1
#define VIRTIO_PCI_CAP_NOTIFY_CFG 2
#define VIRTIO_PCI_CAP_ISR_CFG 3
#define VIRTIO_PCI_CAP_DEVICE_CFG 4
#define VIRTIO_PCI_CAP_PCI_CFG 5
#define VIRTIO_PCI_CAP_BAR 4            /* offsets inside struct virtio_pci_cap */
#define VIRTIO_PCI_CAP_OFFSET 8
#define VIRTIO_PCI_CAP_LENGTH 12
#define VIRTIO_PCI_NOTIFY_MULTIPLIER 16

/* struct virtio_pci_common_cfg (§4.1.4.3), byte offsets. */
#define VIRTIO_COMMON_DFSELECT 0x00
#define VIRTIO_COMMON_DF 0x04
#define VIRTIO_COMMON_GFSELECT 0x08
#define VIRTIO_COMMON_GF 0x0c
#define VIRTIO_COMMON_MSIX 0x10
#define VIRTIO_COMMON_NUMQ 0x12
#define VIRTIO_COMMON_STATUS 0x14
#define VIRTIO_COMMON_CFGGENERATION 0x15
#define VIRTIO_COMMON_Q_SELECT 0x16
#define VIRTIO_COMMON_Q_SIZE 0x18
#define VIRTIO_COMMON_Q_MSIX 0x1a
#define VIRTIO_COMMON_Q_ENABLE 0x1c
#define VIRTIO_COMMON_Q_NOFF 0x1e
#define VIRTIO_COMMON_Q_DESCLO 0x20
#define VIRTIO_COMMON_Q_AVAILLO 0x28
#define VIRTIO_COMMON_Q_USEDLO 0x30
#define VIRTIO_MSI_NO_VECTOR 0xffff

/* Split virtqueue (§2.7). */
#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1
#define VIRTQ_USED_F_NO_NOTIFY 1

struct virtq_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags, next;
};
struct virtq_avail {
    uint16_t flags, idx;
    uint16_t ring[];                    /* then used_event */
};
struct virtq_used_elem {
    uint32_t id, len;
};
struct virtq_used {
    uint16_t flags, idx;
    struct virtq_used_elem ring[];      /* then avail_event */
};

#define VIRTIO_MAX_QUEUES 4
#define VIRTQ_MAX_SIZE 256              /* the driver uses min(device max, this) */

struct virtq {
    uint16_t index, size;               /* size 0: not set up */
    struct virtq_desc *desc;
    struct virtq_avail *avail;
    struct virtq_used *used;
    uint64_t notify;                    /* doorbell address */
    uint16_t free_head, num_free;
    uint16_t last_used;                 /* next used->ring entry to consume */
    uint16_t chains;                    /* chains made available, not yet used */
    uint16_t vector;                    /* MSI-X table entry, or VIRTIO_MSI_NO_VECTOR */
    unsigned irq_vector;                /* LAPIC vector it is programmed with (0: none) */
    uint32_t irqs_seen;                 /* irq_count() consumed so far */
    uint64_t notifies, kicks_suppressed;
    /* used->idx reads of 0 that claimed more completions than chains in
     * flight (the host's zero view of the page; ignored, read again: see
     * virtq_get) */
    uint64_t bad_used_idx;
};

struct virtio_dev {
    struct pci_dev pci;
    uint16_t device_id;                 /* VIRTIO_ID_* */
    uint64_t common, notify_base, isr, device_cfg;
    uint32_t notify_mult, device_cfg_len;
    uint64_t device_features, features; /* offered, negotiated */
    struct pci_msix msix;
    int has_msix, use_msix;
    unsigned num_queues;                /* reported by the device */
    struct virtq vq[VIRTIO_MAX_QUEUES];
};

/* Where virtio_pci_init puts a memory BAR that is unassigned or above
 * 4 GiB (a bump allocator, aligned to each BAR's size); the default is
 * 0xe8000000, inside the PCI holes of both QEMU and splitvmm
 * (vmm/layout.py). */
void virtio_bar_window(uint64_t base, uint64_t end);

/* Finds the n-th (0-based) virtio-pci function whose virtio device id is
 * `device_id` (modern 0x1040 + id, or a transitional 0x1000-0x103f one
 * with the same subsystem id), walks its capability list for the common,
 * notify, ISR and device configuration structures, makes sure the BARs
 * they live in are assigned, enables memory decode and bus mastering.
 * Returns 0, or a negative VIRTIO_E* code. */
int virtio_pci_init(struct virtio_dev *d, uint16_t device_id, unsigned n);

/* §3.1.1 steps 1-6: reset (and wait for status 0), ACKNOWLEDGE, DRIVER,
 * read the device features, accept `wanted` & offered | VERSION_1, write
 * them, FEATURES_OK and check it stuck.  VERSION_1 must be offered.
 * Returns 0 or VIRTIO_E*. */
int virtio_negotiate(struct virtio_dev *d, uint64_t wanted);
/* Completion by MSI-X from here on: queue q gets table entry q + 1 and
 * LAPIC vector `first_vector` + q (entry 0 is the configuration vector,
 * `first_vector` - 1 is not used).  Call after virtio_negotiate and before
 * virtio_setup_queue; the guest must have done irq_init() and
 * irq_enable().  Returns 0 or VIRTIO_ENOMSIX. */
int virtio_use_msix(struct virtio_dev *d, unsigned first_vector);
/* §3.1.1 step 7 for queue `q`: size min(device's, VIRTQ_MAX_SIZE), rings
 * from the library's pool, MSI-X vector if virtio_use_msix, enable. */
int virtio_setup_queue(struct virtio_dev *d, unsigned q);
/* DRIVER_OK (step 8). */
void virtio_driver_ok(struct virtio_dev *d);
/* Writes 0 to the status (device reset, §4.1.4.3.1) and waits for it. */
void virtio_reset(struct virtio_dev *d);
uint8_t virtio_status(const struct virtio_dev *d);
/* The ISR status byte (reading it clears it, §4.1.4.5). */
uint8_t virtio_isr(const struct virtio_dev *d);

/* Device configuration space, read consistently (config_generation
 * before and after, §4.1.4.3.1), 1/2/4/8 bytes. */
uint64_t virtio_cfg_read(const struct virtio_dev *d, unsigned off, unsigned size);

/* A buffer of a request: `len` bytes at `addr`, device-writable or not. */
struct virtio_buf {
    const void *addr;
    uint32_t len;
    int device_writes;
};
/* Puts a chain of `n` buffers (device-readable ones first, as §2.7.4.2
 * wants) on the available ring; returns its head descriptor id, or -1
 * when there are not `n` free descriptors.  Does not notify. */
int virtq_add(struct virtio_dev *d, unsigned q, const struct virtio_buf *bufs, unsigned n);
/* Notifies the device of queue q (unless it asked not to be, §2.7.10). */
void virtq_kick(struct virtio_dev *d, unsigned q);
/* Takes one used element if there is one: its id (head) and written
 * length; frees its chain.  Returns 1 when it took one, else 0. */
int virtq_get(struct virtio_dev *d, unsigned q, uint32_t *id, uint32_t *len);
/* Waits for one used element (polling the used ring; with MSI-X it spins
 * on the ring too, and counts the interrupt) for at most `spins` rounds
 * (0: forever).  Returns 1 with id/len, or 0 on timeout. */
int virtq_wait(struct virtio_dev *d, unsigned q, uint32_t *id, uint32_t *len, uint64_t spins);
/* add + kick + wait for that very chain: one synchronous request.
 * Returns the used length, or a negative VIRTIO_E*. */
int64_t virtq_request(struct virtio_dev *d, unsigned q, const struct virtio_buf *bufs, unsigned n,
                      uint64_t spins);
/* Interrupts taken for queue q so far (MSI-X mode). */
uint32_t virtq_irqs(const struct virtio_dev *d, unsigned q);

/* 16-byte-aligned memory from the library's static pool (rings, request
 * headers); never freed.  NULL when the pool is exhausted. */
void *virtio_alloc(size_t size, size_t align);

#define VIRTIO_OK 0
#define VIRTIO_ENODEV (-1)          /* no such function */
#define VIRTIO_ENOCAP (-2)          /* a capability is missing or bad */
#define VIRTIO_ENOV1 (-3)           /* VERSION_1 not offered */
#define VIRTIO_EFEATURES (-4)       /* FEATURES_OK did not stick */
#define VIRTIO_ENOQUEUE (-5)        /* queue absent or size 0 */
#define VIRTIO_ENOMEM (-6)          /* pool exhausted */
#define VIRTIO_ETIMEOUT (-7)        /* no completion in time */
#define VIRTIO_ERING (-8)           /* used ring returned a bad id */
#define VIRTIO_ENOMSIX (-9)
#define VIRTIO_EIO (-10)            /* request status not OK */
#define VIRTIO_EUNSUPP (-11)        /* VIRTIO_BLK_S_UNSUPP */
#define VIRTIO_EINVAL (-12)
const char *virtio_strerror(int err);

/* -- virtio-rng (§5.4): one queue, device-writable buffers ------------- */
int virtio_rng_init(struct virtio_dev *d, unsigned n);
/* Fills buf with len random bytes (several requests if the device returns
 * fewer); returns len or VIRTIO_E*. */
int64_t virtio_rng_read(struct virtio_dev *d, void *buf, uint32_t len);

/* -- virtio-blk (§5.2) -------------------------------------------------- */
#define VIRTIO_BLK_F_SIZE_MAX 1
#define VIRTIO_BLK_F_SEG_MAX 2
#define VIRTIO_BLK_F_RO 5
#define VIRTIO_BLK_F_BLK_SIZE 6
#define VIRTIO_BLK_F_FLUSH 9
#define VIRTIO_BLK_F_MQ 12

#define VIRTIO_BLK_CFG_CAPACITY 0
#define VIRTIO_BLK_CFG_SIZE_MAX 8
#define VIRTIO_BLK_CFG_SEG_MAX 12
#define VIRTIO_BLK_CFG_BLK_SIZE 20
#define VIRTIO_BLK_CFG_NUM_QUEUES 34    /* u16, with VIRTIO_BLK_F_MQ (§5.2.4) */

#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2
#define VIRTIO_BLK_ID_BYTES 20
#define VIRTIO_BLK_SECTOR 512

struct virtio_blk {
    struct virtio_dev dev;
    uint64_t capacity;                  /* 512-byte sectors */
    uint32_t blk_size;                  /* 512 unless BLK_SIZE */
    uint32_t size_max, seg_max;         /* per-segment / per-request limits (0: none) */
    int read_only, has_flush;
    uint64_t requests;
    unsigned nqueues;                   /* request queues set up (1 without MQ) */
    /* queue depth (virtio_blk_submit): per queue and head descriptor, the
     * request header, the caller's tag and whether it is in flight */
    struct virtio_blk_hdr *hdr[VIRTIO_MAX_QUEUES];
    uint32_t tag[VIRTIO_MAX_QUEUES][VIRTQ_MAX_SIZE];
    uint8_t busy[VIRTIO_MAX_QUEUES][VIRTQ_MAX_SIZE];
    unsigned inflight[VIRTIO_MAX_QUEUES];
};
struct virtio_blk_hdr {
    uint32_t type, reserved;
    uint64_t sector;
    uint8_t status;
};

/* Finds the n-th virtio-blk function and brings it up (features: SIZE_MAX,
 * SEG_MAX, BLK_SIZE, RO, FLUSH when offered; one queue).  With `msix_vector`
 * non-zero, completion is by MSI-X on that LAPIC vector (see
 * virtio_use_msix). */
int virtio_blk_init(struct virtio_blk *b, unsigned n, unsigned msix_vector);
/* The same with up to `queues` request queues (at most VIRTIO_MAX_QUEUES):
 * VIRTIO_BLK_F_MQ is accepted when offered and `queues` > 1, and
 * min(queues, the device's num_queues) queues are set up (b->nqueues);
 * without MQ the device has one. */
int virtio_blk_init_mq(struct virtio_blk *b, unsigned n, unsigned msix_vector, unsigned queues);
/* Queue depth: puts one request (type IN or OUT, one data buffer of
 * `sectors` sectors, split at size_max) on queue q without notifying;
 * `tag` comes back from virtio_blk_complete.  Returns 0, VIRTIO_EINVAL
 * (no room: complete some first).  Several submits, then one
 * virtio_blk_kick: several requests per doorbell. */
int virtio_blk_submit(struct virtio_blk *b, unsigned q, uint32_t type, uint64_t sector, void *buf,
                      uint32_t sectors, uint32_t tag);
void virtio_blk_kick(struct virtio_blk *b, unsigned q);
/* Takes one completion of queue q if there is one: returns 1 with its tag
 * and its status (VIRTIO_OK / VIRTIO_EIO / VIRTIO_EUNSUPP), 0 when none,
 * VIRTIO_ERING when the device returned a head that was not in flight
 * (twice, or never submitted). */
int virtio_blk_complete(struct virtio_blk *b, unsigned q, uint32_t *tag, int *status);
/* One request each, synchronous (queue depth 1).  `buf` is guest RAM;
 * `sectors` 512-byte sectors starting at `sector`.  Return 0 or VIRTIO_E*
 * (VIRTIO_EIO / VIRTIO_EUNSUPP from the status byte). */
int virtio_blk_read(struct virtio_blk *b, uint64_t sector, void *buf, uint32_t sectors);
int virtio_blk_write(struct virtio_blk *b, uint64_t sector, const void *buf, uint32_t sectors);
int virtio_blk_flush(struct virtio_blk *b);
/* The device id string (up to 20 bytes, NUL-terminated here: id has 21). */
int virtio_blk_get_id(struct virtio_blk *b, char id[VIRTIO_BLK_ID_BYTES + 1]);
/* Any request: type, sector, `n` data buffers between header and status.
 * Returns the status byte (>= 0) or VIRTIO_E*. */
int virtio_blk_request(struct virtio_blk *b, uint32_t type, uint64_t sector,
                       const struct virtio_buf *data, unsigned n);

#endif
