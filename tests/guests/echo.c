/* Exercises the echo device through both windows.
 *
 * Command line: pio=PORT mmio=ADDR (the echo windows), free_pio=PORT and
 * free_mmio=ADDR (addresses nobody claims), vmm_pid=PID and pid=same|other
 * (1: the device's pid must equal vmm_pid, 2: it must differ).
 * Ends with status 0 (power off) when every check passes, else
 * test_exit(n) naming the first failed check (see the CHECK numbers).
 */
#include "guest.h"

#define SCRATCH_END 0xf0
#define REG_PID 0xf0
#define REG_COUNT 0xf4

static uint64_t pio, mmio;

#define CHECK(n, cond) do { if (!(cond)) test_exit(n); } while (0)

static uint64_t pio_read(unsigned off, int size)
{
    uint16_t port = (uint16_t)(pio + off);
    switch (size) {
    case 1: return inb(port);
    case 2: return inw(port);
    default: return inl(port);
    }
}

static void pio_write(unsigned off, int size, uint64_t v)
{
    uint16_t port = (uint16_t)(pio + off);
    switch (size) {
    case 1: outb(port, (uint8_t)v); break;
    case 2: outw(port, (uint16_t)v); break;
    default: outl(port, (uint32_t)v); break;
    }
}

static uint64_t mmio_read(uint64_t addr, int size)
{
    switch (size) {
    case 1: return mmio_read8(addr);
    case 2: return mmio_read16(addr);
    case 4: return mmio_read32(addr);
    default: return mmio_read64(addr);
    }
}

static void mmio_write(uint64_t addr, int size, uint64_t v)
{
    switch (size) {
    case 1: mmio_write8(addr, (uint8_t)v); break;
    case 2: mmio_write16(addr, (uint16_t)v); break;
    case 4: mmio_write32(addr, (uint32_t)v); break;
    default: mmio_write64(addr, v); break;
    }
}

static uint64_t ones(int size)
{
    return size == 8 ? ~0ull : (1ull << (8 * size)) - 1;
}

static uint64_t pattern(unsigned off, int size, unsigned salt)
{
    uint64_t v = 0;
    for (int i = 0; i < size; i++)
        v |= (uint64_t)((off + i) * 7 + salt + size) << (8 * i);
    return v & ones(size);
}

int guest_main(void)
{
    pio = guest_arg("pio", 0);
    mmio = guest_arg("mmio", 0);
    uint64_t free_pio = guest_arg("free_pio", 0x3000);
    uint64_t free_mmio = guest_arg("free_mmio", 0xd0100000);
    static const int sizes[] = {1, 2, 4, 8};

    /* 1-2: scratch starts at 0, in both windows */
    CHECK(1, pio_read(0, 4) == 0);
    CHECK(2, mmio_read(mmio, 8) == 0);

    /* 3-4: every size, written through one window, read through both */
    for (unsigned salt = 0; salt < 2; salt++) {
        for (int s = 0; s < 4; s++) {
            int size = sizes[s];
            for (unsigned off = 0; off + size <= SCRATCH_END; off += size) {
                uint64_t v = pattern(off, size, salt);
                if (size < 8)
                    pio_write(off, size, v);
                else
                    mmio_write(mmio + off, size, v);
                if (size < 8)
                    CHECK(3, pio_read(off, size) == v);
                CHECK(4, mmio_read(mmio + off, size) == v);
            }
            for (unsigned off = 0; off + size <= SCRATCH_END; off += size) {
                uint64_t v = pattern(off, size, salt + 100);
                mmio_write(mmio + off, size, v);
                if (size < 8)
                    CHECK(5, pio_read(off, size) == v);
                CHECK(6, mmio_read(mmio + off, size) == v);
            }
        }
    }

    /* 7: unaligned and mixed sizes see one little-endian register file */
    mmio_write(mmio + 0x10, 8, 0x1122334455667788ull);
    CHECK(7, pio_read(0x11, 2) == 0x6677 && pio_read(0x14, 4) == 0x11223344 && mmio_read(mmio + 0x17, 1) == 0x11);

    /* 8-11: nothing there reads all ones, every size; writes vanish */
    for (int s = 0; s < 3; s++) {
        uint16_t port = (uint16_t)free_pio;
        uint64_t v = sizes[s] == 1 ? inb(port) : sizes[s] == 2 ? inw(port) : inl(port);
        CHECK(8, v == ones(sizes[s]));
        pio_write((unsigned)(free_pio - pio), sizes[s], 0);
    }
    for (int s = 0; s < 4; s++) {
        mmio_write(free_mmio, sizes[s], 0);
        CHECK(9, mmio_read(free_mmio, sizes[s]) == ones(sizes[s]));
    }
    /* the MMIO page beyond the 256 registers reads all ones */
    CHECK(10, mmio_read(mmio + 0x800, 4) == 0xffffffffu);
    /* an access straddling the end of the PIO window is no one's */
    CHECK(11, inl((uint16_t)(pio + 0xfe)) == 0xffffffffu);

    /* 12-13: string I/O, one access per element */
    {
        static const uint8_t out[5] = {1, 2, 3, 4, 5};
        uint8_t in[4] = {0};
        uint32_t before = (uint32_t)pio_read(REG_COUNT, 4);
        outsb((uint16_t)pio, out, 5);
        insb((uint16_t)pio, in, 4);
        uint32_t after = (uint32_t)pio_read(REG_COUNT, 4);
        CHECK(12, in[0] == 5 && in[1] == 5 && in[2] == 5 && in[3] == 5);
        CHECK(13, after - before == 5 + 4 + 1);
    }

    /* 14-15: pid register, same through both windows */
    {
        uint32_t p1 = (uint32_t)pio_read(REG_PID, 4), p2 = (uint32_t)mmio_read(mmio + REG_PID, 4);
        uint64_t vmm_pid = guest_arg("vmm_pid", 0);
        uint64_t mode = guest_arg("pid", 0);
        CHECK(14, p1 == p2 && p1 != 0 && p1 != 0xffffffffu);
        if (mode == 1)
            CHECK(15, p1 == vmm_pid);
        if (mode == 2)
            CHECK(16, p1 != vmm_pid);
    }
    return 0;
}
