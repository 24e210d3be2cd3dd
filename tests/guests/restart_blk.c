/* Keeps writing and reading virtio-blk sectors while the host kills and
 * restarts the device process (tests/vmm/test_restart.py); the minimal
 * driver of virtio_min.h, completions by polling the used ring.
 *
 * Command line: stop=PORT (reads non-zero once the host wants the run to
 * end), stats=ADDR: u64 requests completed, u64 rounds, the guest
 * addresses of the avail and used rings (for a host that wants to kill
 * the device while a request is outstanding), then at
 * ADDR + 64 one u64 per sector 0..SECTORS-1: the round of the last write
 * to it the guest saw completed (0: none).
 *
 * Round r writes sector r % SECTORS with a pattern naming r (its first
 * u64) and the sector, on a chain starting at head (3 r) % QSZ; every
 * fourth round reads it back.  Each request must complete exactly once:
 * the used index moves by exactly one, naming the head posted, with
 * status OK.  Status 0 (power off) when the host says stop, else
 * test_exit(n): 1 no device, 2 wrong head, 3 two completions for one
 * request, 4 status not OK, 5 data read back wrong, 6 no completion. */
#include "guest.h"
#include "pci.h"
#include "virtio_min.h"

#define CHECK VCHECK
#define VIRTIO_VENDOR 0x1af4
#define VIRTIO_BLK_DEVICE 0x1042
#define T_IN 0
#define T_OUT 1
#define S_OK 0
#define SECTORS 64

struct hdr { uint32_t type, reserved; uint64_t sector; };
static struct hdr hdrs[QSZ] __attribute__((aligned(16)));
static uint8_t status_bytes[QSZ];
static uint8_t wbuf[512] __attribute__((aligned(512)));
static uint8_t rbuf[512] __attribute__((aligned(512)));
static uint64_t completed;

static void pattern(uint8_t *buf, uint64_t round, uint64_t sector)
{
    uint64_t x = round * 0x9e3779b97f4a7c15ull ^ sector;
    memcpy(buf, &round, 8);
    memcpy(buf + 8, &sector, 8);
    for (unsigned i = 16; i < 512; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        buf[i] = (uint8_t)(x >> 56);
    }
}

static void request(unsigned head, uint32_t type, uint64_t sector, void *data, int data_in)
{
    unsigned a = head, b = (head + 1) % QSZ, c = (head + 2) % QSZ, id;
    hdrs[head] = (struct hdr){ type, 0, sector };
    status_bytes[head] = 0xee;
    descs[a] = (struct desc){ (uintptr_t)&hdrs[head], sizeof hdrs[0], F_NEXT, (uint16_t)b };
    descs[b] = (struct desc){ (uintptr_t)data, 512, (uint16_t)(F_NEXT | (data_in ? F_WRITE : 0)), (uint16_t)c };
    descs[c] = (struct desc){ (uintptr_t)&status_bytes[head], 1, F_WRITE, 0 };
    vm_post(head);
    long got = vm_wait_used(&id);
    CHECK(6, got >= 0);
    CHECK(2, id == head);
    completed++;
    /* nothing more may come: the request completed once */
    for (int i = 0; i < 2000; i++)
        cpu_relax();
    CHECK(3, *(volatile uint16_t *)&used.idx == last_used);
    CHECK(4, status_bytes[head] == S_OK);
}

int guest_main(void)
{
    struct pci_dev d;
    CHECK(1, pci_find(VIRTIO_VENDOR, VIRTIO_BLK_DEVICE, &d));
    bdf = d.bdf;
    vm_find_caps();
    vm_locate(pci_bar_address(bdf, 0));
    pci_command(bdf, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER, 0);
    use_msix = 0;
    vm_setup();
    uint16_t stop = (uint16_t)guest_arg("stop", 0x3f0);
    volatile uint64_t *stats = (volatile uint64_t *)(uintptr_t)guest_arg("stats", 0x200000);
    volatile uint64_t *done = stats + 8;
    stats[2] = (uintptr_t)&avail;
    stats[3] = (uintptr_t)&used;
    for (uint64_t round = 1;; round++) {
        uint64_t sector = round % SECTORS;
        unsigned head = (unsigned)(round * 3) % QSZ;
        pattern(wbuf, round, sector);
        request(head, T_OUT, sector, wbuf, 0);
        done[sector] = round;
        if ((round & 3) == 0) {
            request((head + 3) % QSZ, T_IN, sector, rbuf, 1);
            for (unsigned i = 0; i < 512; i++)
                CHECK(5, rbuf[i] == wbuf[i]);
        }
        stats[0] = completed;
        stats[1] = round;
        if ((round & 15) == 0 && inb(stop))
            return 0;
    }
}
