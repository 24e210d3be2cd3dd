/* The virtio-pci driver library of the test guests (see virtio.h). */
#include "irq.h"
#include "virtio.h"

#define POOL_SIZE (192 * 1024)
#define RESET_SPINS 10000000ull
#define GEN_TRIES 16

static uint8_t pool[POOL_SIZE] __attribute__((aligned(4096)));
static size_t pool_used;

static uint64_t bar_next = 0xe8000000ull, bar_end = 0xf0000000ull;

static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }
static inline void mb(void) { __asm__ volatile("mfence" ::: "memory"); }

void *virtio_alloc(size_t size, size_t align)
{
    if (align < 16)
        align = 16;
    size_t start = (pool_used + align - 1) & ~(align - 1);
    if (start > POOL_SIZE || size > POOL_SIZE - start)
        return NULL;
    pool_used = start + size;
    memset(pool + start, 0, size);
    return pool + start;
}

void virtio_bar_window(uint64_t base, uint64_t end)
{
    bar_next = base;
    bar_end = end;
}

const char *virtio_strerror(int err)
{
    switch (err) {
    case VIRTIO_OK: return "ok";
    case VIRTIO_ENODEV: return "no such device";
    case VIRTIO_ENOCAP: return "virtio capability missing or bad";
    case VIRTIO_ENOV1: return "VERSION_1 not offered";
    case VIRTIO_EFEATURES: return "FEATURES_OK not accepted";
    case VIRTIO_ENOQUEUE: return "queue not available";
    case VIRTIO_ENOMEM: return "out of pool memory";
    case VIRTIO_ETIMEOUT: return "timed out";
    case VIRTIO_ERING: return "bad used ring entry";
    case VIRTIO_ENOMSIX: return "no MSI-X";
    case VIRTIO_EIO: return "I/O error";
    case VIRTIO_EUNSUPP: return "unsupported";
    case VIRTIO_EINVAL: return "invalid argument";
    default: return "?";
    }
}

/* -- transport --------------------------------------------------------- */

static inline uint8_t common_read8(const struct virtio_dev *d, unsigned off) { return mmio_read8(d->common + off); }
static inline uint16_t common_read16(const struct virtio_dev *d, unsigned off) { return mmio_read16(d->common + off); }
static inline uint32_t common_read32(const struct virtio_dev *d, unsigned off) { return mmio_read32(d->common + off); }
static inline void common_write8(const struct virtio_dev *d, unsigned off, uint8_t v) { mmio_write8(d->common + off, v); }
static inline void common_write16(const struct virtio_dev *d, unsigned off, uint16_t v) { mmio_write16(d->common + off, v); }
static inline void common_write32(const struct virtio_dev *d, unsigned off, uint32_t v) { mmio_write32(d->common + off, v); }
static void common_write64(const struct virtio_dev *d, unsigned off, uint64_t v)
{
    common_write32(d, off, (uint32_t)v);
    common_write32(d, off + 4, (uint32_t)(v >> 32));
}

static int matches(const struct pci_dev *p, uint16_t device_id)
{
    if (p->vendor != VIRTIO_PCI_VENDOR)
        return 0;
    if (p->device == VIRTIO_PCI_MODERN_BASE + device_id)
        return 1;
    /* transitional (§4.1.2.3): the subsystem device id is the virtio id */
    return p->device >= 0x1000 && p->device < 0x1040
           && pci_cfg_read16(p->bdf, PCI_SUBSYSTEM_VENDOR_ID + 2) == device_id;
}

/* Makes BAR `index` usable: returns its address, assigning it first when
 * it is unassigned or beyond the identity map.  0 when it cannot. */
static uint64_t ensure_bar(uint32_t bdf, unsigned index)
{
    struct pci_bar bar;
    pci_bar_probe(bdf, index, &bar);
    if (!bar.size || bar.io)
        return 0;
    if (bar.address && bar.address + bar.size <= 0x100000000ull)
        return bar.address;
    uint64_t a = (bar_next + bar.size - 1) & ~(bar.size - 1);
    if (a + bar.size > bar_end)
        return 0;
    bar_next = a + bar.size;
    uint16_t cmd = pci_cfg_read16(bdf, PCI_COMMAND);
    pci_cfg_write16(bdf, PCI_COMMAND, cmd & ~PCI_COMMAND_MEMORY);
    pci_bar_set(bdf, index, a, bar.is64);
    pci_cfg_write16(bdf, PCI_COMMAND, cmd);
    return a;
}

int virtio_pci_init(struct virtio_dev *d, uint16_t device_id, unsigned n)
{
    struct pci_dev devs[32];
    unsigned count = pci_scan(devs, 32), seen = 0, i;
    memset(d, 0, sizeof *d);
    for (i = 0; i < count; i++)
        if (matches(&devs[i], device_id) && seen++ == n)
            break;
    if (i == count)
        return VIRTIO_ENODEV;
    d->pci = devs[i];
    d->device_id = device_id;
    uint32_t bdf = d->pci.bdf;
    if (!(pci_cfg_read16(bdf, PCI_STATUS) & PCI_STATUS_CAP_LIST))
        return VIRTIO_ENOCAP;

    /* BARs in use stay where they are; ensure_bar turns memory decode off
     * only around an assignment */
    uint64_t bars[6] = {0};
    unsigned off = pci_cfg_read8(bdf, PCI_CAPABILITY_LIST) & 0xfc;
    for (int guard = 0; off && guard < 48; guard++) {
        uint8_t id = pci_cfg_read8(bdf, off);
        unsigned next = pci_cfg_read8(bdf, off + 1) & 0xfc;
        if (id == PCI_CAP_ID_VNDR && pci_cfg_read8(bdf, off + 2) >= 16) {
            uint8_t type = pci_cfg_read8(bdf, off + 3);
            uint8_t bar = pci_cfg_read8(bdf, off + VIRTIO_PCI_CAP_BAR);
            uint32_t coff = pci_cfg_read32(bdf, off + VIRTIO_PCI_CAP_OFFSET);
            uint32_t clen = pci_cfg_read32(bdf, off + VIRTIO_PCI_CAP_LENGTH);
            uint64_t *slot = NULL;
            switch (type) {
            case VIRTIO_PCI_CAP_COMMON_CFG: slot = &d->common; break;
            case VIRTIO_PCI_CAP_NOTIFY_CFG: slot = &d->notify_base; break;
            case VIRTIO_PCI_CAP_ISR_CFG: slot = &d->isr; break;
            case VIRTIO_PCI_CAP_DEVICE_CFG: slot = &d->device_cfg; break;
            }
            /* the first of each type wins (§4.1.4: "the driver SHOULD use
             * the first instance"); reserved BAR numbers are skipped */
            if (slot && !*slot && bar <= 5) {
                if (!bars[bar])
                    bars[bar] = ensure_bar(bdf, bar);
                if (!bars[bar])
                    return VIRTIO_ENOCAP;
                *slot = bars[bar] + coff;
                if (type == VIRTIO_PCI_CAP_NOTIFY_CFG)
                    d->notify_mult = pci_cfg_read32(bdf, off + VIRTIO_PCI_NOTIFY_MULTIPLIER);
                if (type == VIRTIO_PCI_CAP_DEVICE_CFG)
                    d->device_cfg_len = clen;
            }
        }
        off = next;
    }
    if (!d->common || !d->notify_base || !d->isr)
        return VIRTIO_ENOCAP;
    /* the MSI-X table and PBA may live in BARs no virtio capability uses */
    unsigned mcap = pci_find_cap(bdf, PCI_CAP_ID_MSIX);
    int msix_ok = mcap != 0;
    for (unsigned reg = PCI_MSIX_TABLE; mcap && reg <= PCI_MSIX_PBA; reg += 4) {
        unsigned bir = pci_cfg_read32(bdf, mcap + reg) & PCI_MSIX_BIR;
        if (bir > 5)
            msix_ok = 0;
        else if (!bars[bir] && !(bars[bir] = ensure_bar(bdf, bir)))
            msix_ok = 0;
    }
    pci_command(bdf, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER, 0);
    d->has_msix = msix_ok && pci_msix_init(bdf, &d->msix);
    d->num_queues = common_read16(d, VIRTIO_COMMON_NUMQ);
    return VIRTIO_OK;
}

uint8_t virtio_status(const struct virtio_dev *d) { return common_read8(d, VIRTIO_COMMON_STATUS); }
uint8_t virtio_isr(const struct virtio_dev *d) { return mmio_read8(d->isr); }

void virtio_reset(struct virtio_dev *d)
{
    common_write8(d, VIRTIO_COMMON_STATUS, 0);
    for (uint64_t i = 0; i < RESET_SPINS && common_read8(d, VIRTIO_COMMON_STATUS) != 0; i++)
        cpu_relax();
}

static void add_status(struct virtio_dev *d, uint8_t bits)
{
    common_write8(d, VIRTIO_COMMON_STATUS, (uint8_t)(common_read8(d, VIRTIO_COMMON_STATUS) | bits));
}

int virtio_negotiate(struct virtio_dev *d, uint64_t wanted)
{
    virtio_reset(d);
    add_status(d, VIRTIO_STATUS_ACKNOWLEDGE);
    add_status(d, VIRTIO_STATUS_DRIVER);
    uint64_t offered = 0;
    for (uint32_t sel = 0; sel < 2; sel++) {
        common_write32(d, VIRTIO_COMMON_DFSELECT, sel);
        offered |= (uint64_t)common_read32(d, VIRTIO_COMMON_DF) << (32 * sel);
    }
    d->device_features = offered;
    if (!(offered & (1ull << VIRTIO_F_VERSION_1))) {
        add_status(d, VIRTIO_STATUS_FAILED);
        return VIRTIO_ENOV1;
    }
    d->features = (wanted | 1ull << VIRTIO_F_VERSION_1) & offered;
    for (uint32_t sel = 0; sel < 2; sel++) {
        common_write32(d, VIRTIO_COMMON_GFSELECT, sel);
        common_write32(d, VIRTIO_COMMON_GF, (uint32_t)(d->features >> (32 * sel)));
    }
    add_status(d, VIRTIO_STATUS_FEATURES_OK);
    if (!(common_read8(d, VIRTIO_COMMON_STATUS) & VIRTIO_STATUS_FEATURES_OK)) {
        add_status(d, VIRTIO_STATUS_FAILED);
        return VIRTIO_EFEATURES;
    }
    return VIRTIO_OK;
}

static unsigned msix_first_vector;

int virtio_use_msix(struct virtio_dev *d, unsigned first_vector)
{
    if (!d->has_msix || d->msix.nvectors < 2 || first_vector < IRQ_FIRST_VECTOR + 1 || first_vector > 0xf0)
        return VIRTIO_ENOMSIX;
    msix_first_vector = first_vector;
    unsigned apic = lapic_id();
    /* entry 0: configuration changes (counted, nothing else) */
    pci_msix_program(&d->msix, 0, MSI_ADDRESS(apic), MSI_DATA(first_vector - 1));
    pci_msix_mask(&d->msix, 0, 0);
    pci_msix_enable(d->pci.bdf, &d->msix, 1, 0);
    common_write16(d, VIRTIO_COMMON_MSIX, 0);
    if (common_read16(d, VIRTIO_COMMON_MSIX) != 0)
        return VIRTIO_ENOMSIX;
    d->use_msix = 1;
    return VIRTIO_OK;
}

int virtio_setup_queue(struct virtio_dev *d, unsigned q)
{
    if (q >= VIRTIO_MAX_QUEUES || q >= d->num_queues)
        return VIRTIO_ENOQUEUE;
    struct virtq *vq = &d->vq[q];
    common_write16(d, VIRTIO_COMMON_Q_SELECT, (uint16_t)q);
    uint16_t size = common_read16(d, VIRTIO_COMMON_Q_SIZE);
    if (size == 0)
        return VIRTIO_ENOQUEUE;
    if (size > VIRTQ_MAX_SIZE)
        size = VIRTQ_MAX_SIZE;
    /* §2.7: descriptor table 16-aligned, available ring 2, used ring 4;
     * queue sizes need not be powers of two in 1.x, any value <= max */
    common_write16(d, VIRTIO_COMMON_Q_SIZE, size);
    memset(vq, 0, sizeof *vq);
    vq->index = (uint16_t)q;
    vq->size = size;
    vq->desc = virtio_alloc(16u * size, 4096);
    vq->avail = virtio_alloc(6u + 2u * size, 64);
    vq->used = virtio_alloc(6u + 8u * size, 4096);
    if (!vq->desc || !vq->avail || !vq->used) {
        vq->size = 0;
        return VIRTIO_ENOMEM;
    }
    for (uint16_t i = 0; i < size; i++)
        vq->desc[i].next = (uint16_t)(i + 1);
    vq->free_head = 0;
    vq->num_free = size;
    vq->vector = VIRTIO_MSI_NO_VECTOR;
    if (d->use_msix && q + 1 < d->msix.nvectors) {
        vq->vector = (uint16_t)(q + 1);
        vq->irq_vector = msix_first_vector + q;
        pci_msix_program(&d->msix, q + 1, MSI_ADDRESS(lapic_id()), MSI_DATA(vq->irq_vector));
        pci_msix_mask(&d->msix, q + 1, 0);
        vq->irqs_seen = irq_count(lapic_id(), vq->irq_vector);
    } else {
        vq->avail->flags = VIRTQ_AVAIL_F_NO_INTERRUPT;
    }
    common_write16(d, VIRTIO_COMMON_Q_MSIX, vq->vector);
    if (common_read16(d, VIRTIO_COMMON_Q_MSIX) != vq->vector) {
        vq->vector = VIRTIO_MSI_NO_VECTOR;
        vq->irq_vector = 0;
        vq->avail->flags = VIRTQ_AVAIL_F_NO_INTERRUPT;
    }
    common_write64(d, VIRTIO_COMMON_Q_DESCLO, (uint64_t)(uintptr_t)vq->desc);
    common_write64(d, VIRTIO_COMMON_Q_AVAILLO, (uint64_t)(uintptr_t)vq->avail);
    common_write64(d, VIRTIO_COMMON_Q_USEDLO, (uint64_t)(uintptr_t)vq->used);
    uint16_t noff = common_read16(d, VIRTIO_COMMON_Q_NOFF);
    vq->notify = d->notify_base + (uint64_t)noff * d->notify_mult;
    common_write16(d, VIRTIO_COMMON_Q_ENABLE, 1);
    return VIRTIO_OK;
}

void virtio_driver_ok(struct virtio_dev *d)
{
    add_status(d, VIRTIO_STATUS_DRIVER_OK);
}

uint64_t virtio_cfg_read(const struct virtio_dev *d, unsigned off, unsigned size)
{
    uint64_t v = 0;
    for (int i = 0; i < GEN_TRIES; i++) {
        uint8_t gen = common_read8(d, VIRTIO_COMMON_CFGGENERATION);
        uint64_t a = d->device_cfg + off;
        switch (size) {
        case 1: v = mmio_read8(a); break;
        case 2: v = mmio_read16(a); break;
        case 4: v = mmio_read32(a); break;
        default: v = mmio_read32(a) | (uint64_t)mmio_read32(a + 4) << 32; break;
        }
        if (common_read8(d, VIRTIO_COMMON_CFGGENERATION) == gen)
            break;
    }
    return v;
}

/* -- split virtqueue ----------------------------------------------------- */

int virtq_add(struct virtio_dev *d, unsigned q, const struct virtio_buf *bufs, unsigned n)
{
    struct virtq *vq = &d->vq[q];
    if (q >= VIRTIO_MAX_QUEUES || !vq->size || n == 0 || n > vq->num_free)
        return -1;
    uint16_t head = vq->free_head, i = head, last = head;
    for (unsigned k = 0; k < n; k++) {
        struct virtq_desc *desc = &vq->desc[i];
        desc->addr = (uint64_t)(uintptr_t)bufs[k].addr;
        desc->len = bufs[k].len;
        desc->flags = (uint16_t)((bufs[k].device_writes ? VIRTQ_DESC_F_WRITE : 0)
                                 | (k + 1 < n ? VIRTQ_DESC_F_NEXT : 0));
        last = i;
        i = desc->next;
    }
    vq->free_head = vq->desc[last].next;
    vq->num_free = (uint16_t)(vq->num_free - n);
    vq->chains++;
    uint16_t idx = vq->avail->idx;
    vq->avail->ring[idx % vq->size] = head;
    barrier();                          /* x86: stores stay in order */
    vq->avail->idx = (uint16_t)(idx + 1);
    return head;
}

void virtq_kick(struct virtio_dev *d, unsigned q)
{
    struct virtq *vq = &d->vq[q];
    mb();                               /* avail->idx before used->flags (§2.7.10) */
    if (vq->used->flags & VIRTQ_USED_F_NO_NOTIFY) {
        vq->kicks_suppressed++;
        return;
    }
    vq->notifies++;
    mmio_write16(vq->notify, vq->index);
}

int virtq_get(struct virtio_dev *d, unsigned q, uint32_t *id, uint32_t *len)
{
    struct virtq *vq = &d->vq[q];
    uint16_t idx = *(volatile uint16_t *)&vq->used->idx;
    uint16_t ahead = (uint16_t)(idx - vq->last_used);
    if (ahead == 0)
        return 0;
    /* An index of 0 that runs further ahead than the chains in flight is
     * not a completion: on this host's nested KVM (PVM) the guest's view
     * of the used ring page was seen to read all zeros for a while (flags,
     * idx, elements) while the device's mapping of the same RAM held the
     * right values, and "idx != last_used" then took stale elements.
     * Ignore it and read again.  Any other index ahead of the chains in
     * flight is the device's (a duplicated completion, say): the element
     * is taken, and its id checked, so the driver sees what it did. */
    if (ahead > vq->chains && idx == 0) {
        vq->bad_used_idx++;
        return 0;
    }
    mb();                               /* the element after the index (virtio_rmb): with a compiler
                                         * barrier alone, queue depth 32 read stale used elements
                                         * here (PVM host), a completion whose status was still 0xff */
    struct virtq_used_elem e = vq->used->ring[vq->last_used % vq->size];
    vq->last_used++;
    if (vq->chains)
        vq->chains--;
    *id = e.id;
    *len = e.len;
    if (e.id >= vq->size)
        return 1;                       /* caller sees the bad id */
    /* free the chain (our own descriptor table: bounded walk) */
    uint16_t i = (uint16_t)e.id, count = 1;
    while ((vq->desc[i].flags & VIRTQ_DESC_F_NEXT) && count < vq->size) {
        i = vq->desc[i].next;
        count++;
    }
    vq->desc[i].next = vq->free_head;
    vq->free_head = (uint16_t)e.id;
    vq->num_free = (uint16_t)(vq->num_free + count);
    return 1;
}

int virtq_wait(struct virtio_dev *d, unsigned q, uint32_t *id, uint32_t *len, uint64_t spins)
{
    struct virtq *vq = &d->vq[q];
    for (uint64_t i = 0; spins == 0 || i < spins; i++) {
        if (virtq_get(d, q, id, len)) {
            if (vq->irq_vector)
                vq->irqs_seen = irq_count(lapic_id(), vq->irq_vector);
            return 1;
        }
        cpu_relax();
    }
    return 0;
}

uint32_t virtq_irqs(const struct virtio_dev *d, unsigned q)
{
    const struct virtq *vq = &d->vq[q];
    return vq->irq_vector ? irq_count(lapic_id(), vq->irq_vector) : 0;
}

int64_t virtq_request(struct virtio_dev *d, unsigned q, const struct virtio_buf *bufs, unsigned n,
                      uint64_t spins)
{
    int head = virtq_add(d, q, bufs, n);
    if (head < 0)
        return VIRTIO_EINVAL;
    virtq_kick(d, q);
    uint32_t id, len;
    if (!virtq_wait(d, q, &id, &len, spins))
        return VIRTIO_ETIMEOUT;
    if (id != (uint32_t)head)
        return VIRTIO_ERING;
    return len;
}

/* -- virtio-rng ------------------------------------------------------------ */

#define REQUEST_SPINS 2000000000ull

int virtio_rng_init(struct virtio_dev *d, unsigned n)
{
    int err = virtio_pci_init(d, VIRTIO_ID_RNG, n);
    if (!err)
        err = virtio_negotiate(d, 0);
    if (!err)
        err = virtio_setup_queue(d, 0);
    if (!err)
        virtio_driver_ok(d);
    return err;
}

int64_t virtio_rng_read(struct virtio_dev *d, void *buf, uint32_t len)
{
    uint32_t done = 0;
    for (int tries = 0; done < len && tries < 1000; tries++) {
        struct virtio_buf b = {(uint8_t *)buf + done, len - done, 1};
        int64_t got = virtq_request(d, 0, &b, 1, REQUEST_SPINS);
        if (got < 0)
            return got;
        if ((uint64_t)got > len - done)
            return VIRTIO_ERING;
        done += (uint32_t)got;
    }
    return done == len ? (int64_t)len : VIRTIO_EIO;
}

/* -- virtio-blk ------------------------------------------------------------ */

static struct virtio_blk_hdr *blk_req_pool;

int virtio_blk_init(struct virtio_blk *b, unsigned n, unsigned msix_vector)
{
    return virtio_blk_init_mq(b, n, msix_vector, 1);
}

int virtio_blk_init_mq(struct virtio_blk *b, unsigned n, unsigned msix_vector, unsigned queues)
{
    memset(b, 0, sizeof *b);
    struct virtio_dev *d = &b->dev;
    int err = virtio_pci_init(d, VIRTIO_ID_BLOCK, n);
    if (err)
        return err;
    uint64_t want = 1ull << VIRTIO_BLK_F_SIZE_MAX | 1ull << VIRTIO_BLK_F_SEG_MAX | 1ull << VIRTIO_BLK_F_RO
                    | 1ull << VIRTIO_BLK_F_BLK_SIZE | 1ull << VIRTIO_BLK_F_FLUSH;
    if (queues > 1)
        want |= 1ull << VIRTIO_BLK_F_MQ;
    if ((err = virtio_negotiate(d, want)))
        return err;
    if (msix_vector && (err = virtio_use_msix(d, msix_vector)))
        return err;
    b->nqueues = 1;
    if (d->features & (1ull << VIRTIO_BLK_F_MQ)) {
        unsigned nq = (unsigned)virtio_cfg_read(d, VIRTIO_BLK_CFG_NUM_QUEUES, 2);
        if (nq == 0 || nq > d->num_queues)
            return VIRTIO_ENOQUEUE;
        b->nqueues = nq < queues ? nq : queues;
        if (b->nqueues > VIRTIO_MAX_QUEUES)
            b->nqueues = VIRTIO_MAX_QUEUES;
    }
    for (unsigned q = 0; q < b->nqueues; q++) {
        if ((err = virtio_setup_queue(d, q)))
            return err;
        b->hdr[q] = virtio_alloc(sizeof(struct virtio_blk_hdr) * d->vq[q].size, 64);
        if (!b->hdr[q])
            return VIRTIO_ENOMEM;
    }
    if (!blk_req_pool && !(blk_req_pool = virtio_alloc(sizeof *blk_req_pool, 64)))
        return VIRTIO_ENOMEM;
    b->capacity = virtio_cfg_read(d, VIRTIO_BLK_CFG_CAPACITY, 8);
    b->blk_size = 512;
    if (d->features & (1ull << VIRTIO_BLK_F_BLK_SIZE))
        b->blk_size = (uint32_t)virtio_cfg_read(d, VIRTIO_BLK_CFG_BLK_SIZE, 4);
    if (d->features & (1ull << VIRTIO_BLK_F_SIZE_MAX))
        b->size_max = (uint32_t)virtio_cfg_read(d, VIRTIO_BLK_CFG_SIZE_MAX, 4);
    if (d->features & (1ull << VIRTIO_BLK_F_SEG_MAX))
        b->seg_max = (uint32_t)virtio_cfg_read(d, VIRTIO_BLK_CFG_SEG_MAX, 4);
    b->read_only = !!(d->features & (1ull << VIRTIO_BLK_F_RO));
    b->has_flush = !!(d->features & (1ull << VIRTIO_BLK_F_FLUSH));
    virtio_driver_ok(d);
    return VIRTIO_OK;
}

#define BLK_MAX_SEGS 64

int virtio_blk_request(struct virtio_blk *b, uint32_t type, uint64_t sector,
                       const struct virtio_buf *data, unsigned n)
{
    struct virtio_buf bufs[BLK_MAX_SEGS + 2];
    struct virtio_blk_hdr *r = blk_req_pool;
    unsigned k = 0;
    r->type = type;
    r->reserved = 0;
    r->sector = sector;
    r->status = 0xff;
    bufs[k++] = (struct virtio_buf){r, 16, 0};
    /* split each data buffer into segments of at most size_max bytes */
    for (unsigned i = 0; i < n; i++) {
        const uint8_t *p = data[i].addr;
        uint32_t left = data[i].len;
        while (left) {
            uint32_t chunk = b->size_max && left > b->size_max ? b->size_max : left;
            if (k > BLK_MAX_SEGS || (b->seg_max && k > b->seg_max))
                return VIRTIO_EINVAL;
            bufs[k++] = (struct virtio_buf){p, chunk, data[i].device_writes};
            p += chunk;
            left -= chunk;
        }
    }
    bufs[k++] = (struct virtio_buf){&r->status, 1, 1};
    b->requests++;
    int64_t got = virtq_request(&b->dev, 0, bufs, k, REQUEST_SPINS);
    if (got < 0)
        return (int)got;
    return ((volatile struct virtio_blk_hdr *)r)->status;
}

static int blk_status(int s)
{
    if (s < 0) return s;
    if (s == VIRTIO_BLK_S_OK) return VIRTIO_OK;
    if (s == VIRTIO_BLK_S_UNSUPP) return VIRTIO_EUNSUPP;
    return VIRTIO_EIO;
}

int virtio_blk_read(struct virtio_blk *b, uint64_t sector, void *buf, uint32_t sectors)
{
    struct virtio_buf d = {buf, sectors * VIRTIO_BLK_SECTOR, 1};
    return blk_status(virtio_blk_request(b, VIRTIO_BLK_T_IN, sector, &d, 1));
}

int virtio_blk_write(struct virtio_blk *b, uint64_t sector, const void *buf, uint32_t sectors)
{
    struct virtio_buf d = {buf, sectors * VIRTIO_BLK_SECTOR, 0};
    return blk_status(virtio_blk_request(b, VIRTIO_BLK_T_OUT, sector, &d, 1));
}

int virtio_blk_flush(struct virtio_blk *b)
{
    return blk_status(virtio_blk_request(b, VIRTIO_BLK_T_FLUSH, 0, NULL, 0));
}

int virtio_blk_get_id(struct virtio_blk *b, char id[VIRTIO_BLK_ID_BYTES + 1])
{
    memset(id, 0, VIRTIO_BLK_ID_BYTES + 1);
    struct virtio_buf d = {id, VIRTIO_BLK_ID_BYTES, 1};
    return blk_status(virtio_blk_request(b, VIRTIO_BLK_T_GET_ID, 0, &d, 1));
}

/* -- virtio-blk at queue depth ------------------------------------------- */

int virtio_blk_submit(struct virtio_blk *b, unsigned q, uint32_t type, uint64_t sector, void *buf,
                      uint32_t sectors, uint32_t tag)
{
    if (q >= b->nqueues)
        return VIRTIO_EINVAL;
    struct virtq *vq = &b->dev.vq[q];
    struct virtio_buf bufs[BLK_MAX_SEGS + 2];
    uint16_t head = vq->free_head;      /* what virtq_add will take */
    if (vq->num_free < 3 || head >= vq->size)
        return VIRTIO_EINVAL;
    struct virtio_blk_hdr *r = &b->hdr[q][head];
    r->type = type;
    r->reserved = 0;
    r->sector = sector;
    r->status = 0xff;
    unsigned k = 0;
    bufs[k++] = (struct virtio_buf){r, 16, 0};
    uint8_t *p = buf;
    uint32_t left = sectors * VIRTIO_BLK_SECTOR;
    while (left) {
        uint32_t chunk = b->size_max && left > b->size_max ? b->size_max : left;
        if (k > BLK_MAX_SEGS || (b->seg_max && k > b->seg_max))
            return VIRTIO_EINVAL;
        bufs[k++] = (struct virtio_buf){p, chunk, type == VIRTIO_BLK_T_IN};
        p += chunk;
        left -= chunk;
    }
    bufs[k++] = (struct virtio_buf){&r->status, 1, 1};
    int got = virtq_add(&b->dev, q, bufs, k);
    if (got < 0)
        return VIRTIO_EINVAL;
    b->tag[q][got] = tag;
    b->busy[q][got] = 1;
    b->inflight[q]++;
    b->requests++;
    return VIRTIO_OK;
}

void virtio_blk_kick(struct virtio_blk *b, unsigned q)
{
    virtq_kick(&b->dev, q);
}

int virtio_blk_complete(struct virtio_blk *b, unsigned q, uint32_t *tag, int *status)
{
    uint32_t id, len;
    if (q >= b->nqueues || !virtq_get(&b->dev, q, &id, &len))
        return 0;
    if (id >= b->dev.vq[q].size || !b->busy[q][id])
        return VIRTIO_ERING;
    b->busy[q][id] = 0;
    b->inflight[q]--;
    *tag = b->tag[q][id];
    *status = blk_status(((volatile struct virtio_blk_hdr *)&b->hdr[q][id])->status);
    return 1;
}
