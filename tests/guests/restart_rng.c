/* Keeps reading random bytes from virtio-rng while the host kills and
 * restarts the device process (tests/vmm/test_restart.py); the minimal
 * driver of virtio_min.h, completions by polling the used ring.
 *
 * Command line: stop=PORT (reads non-zero once the host wants the run to
 * end), stats=ADDR: u64 requests completed, u64 rounds, the guest
 * addresses of the avail and used rings (for a host that wants to kill
 * the device while a request is outstanding); on check 3, the round, the
 * extra used element (id << 32 | len) and the used indexes (expected
 * << 16 | found).
 *
 * Round r posts one 16-byte device-writable buffer as head r % QSZ.
 * Each request must complete exactly once: the used index moves by
 * exactly one, naming the head posted, with length 16, and the bytes are
 * not all zero, not all the same, not the previous request's.  Status 0
 * (power off) when the host says stop, else test_exit(n): 1 no device,
 * 2 wrong head, 3 two completions for one request, 4 wrong length,
 * 5 bytes not random, 6 no completion. */
#include "guest.h"
#include "pci.h"
#include "virtio_min.h"

#define CHECK VCHECK
#define VIRTIO_VENDOR 0x1af4
#define VIRTIO_RNG_DEVICE 0x1044
#define LEN 16

static uint8_t bufs[QSZ][LEN] __attribute__((aligned(16)));

int guest_main(void)
{
    struct pci_dev d;
    CHECK(1, pci_find(VIRTIO_VENDOR, VIRTIO_RNG_DEVICE, &d));
    bdf = d.bdf;
    vm_find_caps();
    vm_locate(pci_bar_address(bdf, 0));
    pci_command(bdf, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER, 0);
    use_msix = 0;
    vm_setup();
    uint16_t stop = (uint16_t)guest_arg("stop", 0x3f0);
    volatile uint64_t *stats = (volatile uint64_t *)(uintptr_t)guest_arg("stats", 0x200000);
    stats[2] = (uintptr_t)&avail;
    stats[3] = (uintptr_t)&used;
    uint8_t prev[LEN] = {0};
    uint64_t completed = 0;
    for (uint64_t round = 1;; round++) {
        unsigned head = (unsigned)round % QSZ, id;
        memset(bufs[head], 0, LEN);
        descs[head] = (struct desc){ (uintptr_t)bufs[head], LEN, F_WRITE, 0 };
        vm_post(head);
        long got = vm_wait_used(&id);
        CHECK(6, got >= 0);
        CHECK(2, id == head);
        CHECK(4, got == LEN);
        completed++;
        for (int i = 0; i < 2000; i++)
            cpu_relax();
        if (*(volatile uint16_t *)&used.idx != last_used) {
            /* for the host: the round, the extra element, the used index */
            stats[4] = round;
            stats[5] = (uint64_t)used.ring[last_used % QSZ].id << 32 | used.ring[last_used % QSZ].len;
            stats[6] = (uint64_t)last_used << 16 | *(volatile uint16_t *)&used.idx;
            test_exit(3);
        }
        int zero = 1, same = 1, as_prev = 1;
        for (int i = 0; i < LEN; i++) {
            zero &= bufs[head][i] == 0;
            same &= bufs[head][i] == bufs[head][0];
            as_prev &= bufs[head][i] == prev[i];
        }
        CHECK(5, !zero && !same && !as_prev);
        memcpy(prev, bufs[head], LEN);
        stats[0] = completed;
        stats[1] = round;
        if ((round & 15) == 0 && inb(stop))
            return 0;
    }
}
