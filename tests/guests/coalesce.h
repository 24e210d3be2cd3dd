/* What both coalesced-MMIO test guests (coalesce.c, coalesce_pci.c) do to
 * a coalesce-sum window (tests/testkinds.py): its registers, the values
 * written, and a phase of n writes checked against the device's count,
 * sum and order-sensitive hash.  Header-only; include after guest.h. */
#ifndef COALESCE_H
#define COALESCE_H

#include "guest.h"

#define REG_ADD 0x00
#define REG_COUNT 0x08
#define REG_SUM 0x10
#define REG_HASH 0x18
#define REG_RESET 0x20
#define REG_MOVE 0x28

#define FNV_OFFSET 0xcbf29ce484222325ull
#define FNV_PRIME 0x100000001b3ull

#define CHECK(n, cond) do { if (!(cond)) test_exit(n); } while (0)

/* Values that differ in every byte from one write to the next. */
static inline uint64_t value_of(uint64_t i, uint64_t salt)
{
    uint64_t x = (i + salt) * 0x9e3779b97f4a7c15ull;
    return x ^ (x >> 29);
}

/* Reset the window, write n values, then check count, sum and hash
 * (failures first_check, first_check + 1, first_check + 2). */
static inline void phase(uint64_t win, uint64_t n, uint64_t salt, int first_check)
{
    uint64_t sum = 0, hash = FNV_OFFSET;
    mmio_write64(win + REG_RESET, 1);
    for (uint64_t i = 0; i < n; i++) {
        uint64_t v = value_of(i, salt);
        mmio_write64(win + REG_ADD, v);
        sum += v;
        hash = (hash ^ v) * FNV_PRIME;
    }
    /* Reads are never coalesced: each exits, after the queued writes. */
    CHECK(first_check, mmio_read64(win + REG_COUNT) == n);
    CHECK(first_check + 1, mmio_read64(win + REG_SUM) == sum);
    CHECK(first_check + 2, mmio_read64(win + REG_HASH) == hash);
}

#endif
