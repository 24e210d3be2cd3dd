/* The C core of virtio-blk's usual request: see devices/blkring.py for
 * what it does and why.  Every value read from guest RAM is read once,
 * into a local, then checked; nothing outside [0, ram_len) is touched. */
#include <stdint.h>
#include <string.h>
#include <errno.h>
#include <sys/uio.h>

#include "_blkring.h"

#define F_NEXT 1u
#define F_WRITE 2u
#define F_INDIRECT 4u
#define SECTOR 512u
#define MAX_CHAIN_BYTES (64ull << 20)

struct desc { uint64_t addr; uint32_t len; uint16_t flags, next; };

/* the mapping offset of guest [addr, addr + len), or -1 */
static int64_t where(const struct blk_span *spans, int nspans, uint64_t ram_len, uint64_t addr, uint64_t len)
{
    uint64_t end = addr + len;
    if (end < addr)
        return -1;
    for (int i = 0; i < nspans; i++)
        if (spans[i].first <= addr && end <= spans[i].end) {
            uint64_t off = (uint64_t)((int64_t)addr + spans[i].delta);
            return off + len <= ram_len && off + len >= off ? (int64_t)off : -1;
        }
    return -1;
}

static int get_desc(const uint8_t *ram, uint64_t desc_off, uint32_t i, struct desc *d)
{
    memcpy(d, ram + desc_off + 16ull * i, 16);
    return 0;
}

int blk_scan(const uint8_t *ram, uint64_t ram_len, const struct blk_span *spans, int nspans,
             uint64_t desc_off, uint64_t avail_off, uint32_t size, uint16_t last_avail, uint32_t pending,
             uint64_t capacity, int readonly, struct blk_req *reqs, int max)
{
    /* the rings were checked whole by the caller; check again, cheaply */
    if (size == 0 || (size & (size - 1)) || desc_off + 16ull * size > ram_len
            || avail_off + 6ull + 2ull * size > ram_len)
        return 0;
    int k = 0;
    for (uint32_t n = 0; n < pending && k < max; n++, k++) {
        uint16_t head;
        memcpy(&head, ram + avail_off + 4 + 2ull * ((uint16_t)(last_avail + n) & (size - 1)), 2);
        if (head >= size)
            break;
        int again = 0;          /* a head twice in one batch (a broken driver): the batch ends before it */
        for (int j = 0; j < k; j++)
            again |= reqs[j].head == head;
        if (again)
            break;
        struct desc h, d, s;
        get_desc(ram, desc_off, head, &h);
        if (h.flags != F_NEXT || h.len != 16 || h.next >= size)
            break;
        get_desc(ram, desc_off, h.next, &d);
        if ((d.flags & ~F_WRITE) != F_NEXT || d.next >= size || d.len == 0 || d.len % SECTOR
                || 17ull + d.len > MAX_CHAIN_BYTES)
            break;
        get_desc(ram, desc_off, d.next, &s);
        if (s.flags != F_WRITE || s.len != 1)
            break;
        int64_t ho = where(spans, nspans, ram_len, h.addr, 16);
        int64_t dofs = where(spans, nspans, ram_len, d.addr, d.len);
        int64_t so = where(spans, nspans, ram_len, s.addr, 1);
        if (ho < 0 || dofs < 0 || so < 0)
            break;
        uint32_t type;
        uint64_t sector;
        memcpy(&type, ram + ho, 4);
        memcpy(&sector, ram + ho + 8, 8);
        int write = d.flags & F_WRITE ? 0 : 1;
        if (type != (uint32_t)write || (write && readonly))
            break;          /* (type 0 needs a writable buffer, type 1 a readable one) */
        if (sector > capacity || d.len / SECTOR > capacity - sector)
            break;
        reqs[k] = (struct blk_req){ .sector = sector, .data_off = (uint64_t)dofs, .status_off = (uint64_t)so,
                                    .len = d.len, .head = head, .write = (uint16_t)write };
    }
    return k;
}

int blk_run(uint8_t *ram, uint64_t ram_len, int fd, const struct blk_req *reqs, int k,
            uint64_t used_off, uint32_t size, uint16_t used_idx)
{
    if (size == 0 || (size & (size - 1)) || used_off + 6ull + 8ull * size > ram_len)
        return 0;
    for (int i = 0; i < k; i++) {
        const struct blk_req *r = &reqs[i];
        if (r->data_off + r->len > ram_len || r->status_off >= ram_len)
            return i;
        struct iovec iov = { ram + r->data_off, r->len };
        ssize_t got;
        do
            got = r->write ? pwritev(fd, &iov, 1, (off_t)(r->sector * SECTOR))
                           : preadv(fd, &iov, 1, (off_t)(r->sector * SECTOR));
        while (got < 0 && errno == EINTR);
        if (got != (ssize_t)r->len)
            return i;       /* the caller serves this one (and fails or finishes it) */
        ram[r->status_off] = 0;                         /* VIRTIO_BLK_S_OK */
        uint32_t elem[2] = { r->head, r->write ? 1u : r->len + 1u };
        memcpy(ram + used_off + 4 + 8ull * ((uint16_t)(used_idx + i) & (size - 1)), elem, 8);
    }
    return k;
}
