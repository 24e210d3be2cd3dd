/* virtio-blk from the guest side (devices/virtio/blk.py), with the minimal
 * driver of virtio_min.h; completions by polling the used ring.
 *
 * Command line: sectors=N (the expected capacity), start=S (first sector
 * of the pattern), count=C (sectors written and read back, at most 16),
 * seed=X (the pattern), readonly=1 (the write must fail with IOERR and
 * the data must stay as it was), stats=ADDR (results for the host: u64
 * write status, u64 flush status, u64 rounds done, then the 20-byte ID),
 * mover=N (vCPU 1 moves BAR 0 between its address and move=ADDR N times
 * while vCPU 0 keeps writing and reading; a doorbell written to the old
 * address is lost, so vCPU 0 rings again after a while, as a polling
 * driver would), rounds=R (write/read rounds of vCPU 0, default 1),
 * hostile=SECTOR (first post broken requests -- a write from far outside
 * guest RAM to SECTOR, a read into a buffer across the end of RAM
 * (ramtop=ADDR), a huge length, a descriptor loop, a next index out of
 * range: each must complete without S_OK -- then a head index out of
 * range, which must set DEVICE_NEEDS_RESET; then reset and go on).
 *
 * Status 0 when everything holds, else test_exit(n) for check n. */
#include "guest.h"
#include "pci.h"
#include "virtio_min.h"

#define CHECK VCHECK
#define VIRTIO_VENDOR 0x1af4
#define VIRTIO_BLK_DEVICE 0x1042
#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8
#define S_OK 0
#define S_IOERR 1
#define MAX_COUNT 16

struct hdr { uint32_t type, reserved; uint64_t sector; };
static struct hdr hdr __attribute__((aligned(16)));
static uint8_t status_byte;
static uint8_t wbuf[MAX_COUNT * 512] __attribute__((aligned(4096)));
static uint8_t rbuf[MAX_COUNT * 512] __attribute__((aligned(4096)));
static uint8_t ident[20];
static volatile uint64_t cur_bar;        /* 0 while vCPU 1 moves it */
static volatile int mover_done, go;
static volatile uint64_t moves, rekicks;

static uint8_t request(uint32_t type, uint64_t sector, void *data, uint32_t len, int data_in)
{
    unsigned id, n = 0;
    hdr = (struct hdr){ type, 0, sector };
    status_byte = 0xee;
    descs[n] = (struct desc){ (uintptr_t)&hdr, sizeof hdr, F_NEXT, n + 1 }; n++;
    if (len) {
        descs[n] = (struct desc){ (uintptr_t)data, len, (uint16_t)(F_NEXT | (data_in ? F_WRITE : 0)), n + 1 };
        n++;
    }
    descs[n] = (struct desc){ (uintptr_t)&status_byte, 1, F_WRITE, 0 };
    vm_post(0);
    long got;
    while ((got = vm_wait_used_for(&id, 2000000)) < 0) {
        CHECK(50, moves || rekicks < 100);       /* no mover: it must not take this long */
        uint64_t b;
        while (!(b = cur_bar))
            (void)inb(0x80);                     /* an exit: let the host finish the move */
        vm_locate(b);
        if (rekicks > 2000) {                    /* stuck: leave a report for the host */
            uint64_t *st = (uint64_t *)(uintptr_t)guest_arg("stats", 0);
            st[10] = avail.idx;
            st[11] = used.idx;
            st[12] = mmio_read8(common + STATUS);
            st[13] = mmio_read32(bar0 + STATS_REG);
            st[14] = mmio_read32(bar0 + STATS_REG + 4);
            st[15] = b;
            st[16] = mover_done;
            test_exit(52);
        }
        rekicks++;
        vm_kick();
    }
    CHECK(51, id == 0 && got >= 1);
    return status_byte;
}

/* Posts the chain at `head`, waits for it: it must complete, not with S_OK. */
static void broken(unsigned head, int check)
{
    unsigned id;
    status_byte = 0xee;
    vm_post(head);
    CHECK(check, vm_wait_used(&id) >= 0 && id == head && status_byte != S_OK);
}

static void hostile(uint64_t sector)
{
    uint64_t top = guest_arg("ramtop", 0);
    CHECK(40, top != 0);
    /* a write whose data lies far outside guest RAM */
    hdr = (struct hdr){ T_OUT, 0, sector };
    descs[0] = (struct desc){ (uintptr_t)&hdr, sizeof hdr, F_NEXT, 1 };
    descs[1] = (struct desc){ 0xfff0000000000000ull, 512, F_NEXT, 2 };
    descs[2] = (struct desc){ (uintptr_t)&status_byte, 1, F_WRITE, 0 };
    broken(0, 41);
    /* a read into a buffer that runs past the end of RAM */
    hdr = (struct hdr){ T_IN, 0, sector };
    descs[1] = (struct desc){ top - 256, 512, F_NEXT | F_WRITE, 2 };
    broken(0, 42);
    /* a huge length */
    descs[1] = (struct desc){ (uintptr_t)rbuf, 0xffffffffu, F_NEXT | F_WRITE, 2 };
    broken(0, 43);
    /* a descriptor loop: data -> status -> data ... */
    descs[1] = (struct desc){ (uintptr_t)rbuf, 512, F_NEXT | F_WRITE, 2 };
    descs[2] = (struct desc){ (uintptr_t)&status_byte, 1, F_WRITE | F_NEXT, 1 };
    broken(0, 44);
    /* a next index beyond the ring */
    descs[2] = (struct desc){ (uintptr_t)&status_byte, 1, F_WRITE | F_NEXT, 100 };
    broken(0, 45);
    /* a head index beyond the ring: the whole ring is broken */
    vm_post(QSZ + 3);
    uint64_t i;
    for (i = 0; i < SPINS && !(mmio_read8(common + STATUS) & S_NEEDS_RESET); i++)
        cpu_relax();
    CHECK(46, i < SPINS);
    vm_setup();                        /* reset, and start over */
}

void guest_ap_main(unsigned cpu)
{
    uint64_t n = guest_arg("mover", 0), b = guest_arg("move", 0);
    if (cpu != 1 || !n)
        return;
    while (!go)                  /* vCPU 0 is done with configuration space */
        cpu_relax();
    uint64_t a = cur_bar;        /* volatile: read after go (bar0 could be read early) */
    for (uint64_t i = 0; i < n; i++) {
        uint64_t to = (i & 1) ? a : b;
        cur_bar = 0;
        pci_bar_set(bdf, 0, to, 1);              /* decode stays on: the region moves */
        cur_bar = to;
        moves++;
    }
    mover_done = 1;
}

int guest_main(void)
{
    struct pci_dev d;
    CHECK(1, pci_find(VIRTIO_VENDOR, VIRTIO_BLK_DEVICE, &d));
    bdf = d.bdf;
    vm_find_caps();
    vm_locate(pci_bar_address(bdf, 0));
    cur_bar = bar0;
    pci_command(bdf, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER, 0);
    use_msix = 0;
    vm_setup();
    uint64_t sectors = guest_arg("sectors", 0), start = guest_arg("start", 0);
    uint64_t count = guest_arg("count", 8), seed = guest_arg("seed", 1);
    uint64_t *stats = (uint64_t *)(uintptr_t)guest_arg("stats", 0);
    int readonly = guest_arg("readonly", 0);
    CHECK(2, count && count <= MAX_COUNT);
    CHECK(20, mmio_read32(devcfg) == (uint32_t)sectors && mmio_read32(devcfg + 4) == sectors >> 32);
    CHECK(21, mmio_read32(devcfg + 20) == 512);                   /* blk_size */
    if (guest_arg("hostile", 0))
        hostile(guest_arg("hostile", 0));
    CHECK(22, request(T_GET_ID, 0, ident, sizeof ident, 1) == S_OK);
    go = 1;
    uint64_t rounds = guest_arg("rounds", 1), r, wst = 0, fst = 0;
    int moving = guest_arg("mover", 0) != 0;
    for (r = 0; r < rounds || (moving && !mover_done); r++) {
        CHECK(53, r < rounds + 100000);          /* the mover never finished */
        uint64_t x = seed + r;
        for (unsigned i = 0; i < count * 512; i++) {
            x = x * 6364136223846793005ull + 1442695040888963407ull;
            wbuf[i] = x >> 56;
        }
        wst = request(T_OUT, start, wbuf, count * 512, 0);
        fst = request(T_FLUSH, 0, 0, 0, 0);
        CHECK(23, request(T_IN, start, rbuf, count * 512, 1) == S_OK);
        int same = 1;
        for (unsigned i = 0; i < count * 512; i++)
            same &= rbuf[i] == wbuf[i];
        if (readonly) {
            CHECK(24, wst == S_IOERR && !same);
        } else {
            CHECK(25, wst == S_OK && fst == S_OK && same);
        }
        /* beyond the end: IOERR */
        CHECK(26, request(T_IN, sectors, rbuf, 512, 1) == S_IOERR);
    }
    if (stats) {
        stats[0] = wst;
        stats[1] = fst;
        stats[2] = r;
        stats[3] = moves;
        stats[4] = rekicks;
        memcpy(&stats[5], ident, sizeof ident);
    }
    return 0;
}
