/* virtio-rng from the guest side (devices/virtio/rng.py): a minimal
 * modern virtio-pci driver written here, on purpose independent of the
 * project's driver library (virtio 1.2 §3.1.1, §4.1.4, §2.7).
 *
 * Command line: rounds=N (requests, default 4), msix=0|1 (completion by
 * MSI-X interrupt, else by polling the used ring), move=ADDR (move BAR 0
 * there after half the rounds, decode on: the device takes its
 * ioeventfds along), hostile=1 (first post broken requests: a buffer
 * outside RAM, a descriptor loop, a huge length -- each must complete
 * with length 0 -- then a runaway avail index, which must set
 * DEVICE_NEEDS_RESET; then reset and go on), stats=ADDR (results for
 * the host: u64 notifications by ioeventfd, u64 by MMIO, u64 good
 * rounds, then the last 16 random bytes, u64 doorbell writes).
 *
 * Status 0 when everything holds, else test_exit(n) for check n. */
#include "guest.h"
#include "irq.h"
#include "pci.h"
#include "virtio_min.h"

IRQ_RING3_INTERRUPTS_ON;

#define CHECK VCHECK
#define VIRTIO_VENDOR 0x1af4
#define VIRTIO_RNG_DEVICE 0x1044
#define VEC 0x41

static uint8_t bufs[QSZ][16] __attribute__((aligned(16)));

static void good_round(unsigned r, uint8_t *prev)
{
    unsigned slot = r % QSZ, id;
    memset(bufs[slot], 0, 16);
    descs[slot] = (struct desc){ (uintptr_t)bufs[slot], 16, F_WRITE, 0 };
    vm_post(slot);
    if (use_msix)
        CHECK(20, irq_wait(0, VEC, r + 1, SPINS));
    CHECK(21, vm_wait_used(&id) == 16 && id == slot);
    int zero = 1, same = 1, as_prev = 1;
    for (int i = 0; i < 16; i++) {
        zero &= bufs[slot][i] == 0;
        same &= bufs[slot][i] == bufs[slot][0];
        as_prev &= bufs[slot][i] == prev[i];
    }
    CHECK(22, !zero && !same && !as_prev);
    memcpy(prev, bufs[slot], 16);
}

static void hostile(void)
{
    unsigned id;
    /* a buffer far outside guest RAM */
    descs[0] = (struct desc){ 0xfff0000000000000ull, 16, F_WRITE, 0 };
    vm_post(0);
    CHECK(30, vm_wait_used(&id) == 0 && id == 0);
    /* a descriptor loop */
    descs[1] = (struct desc){ (uintptr_t)bufs[1], 16, F_WRITE | F_NEXT, 2 };
    descs[2] = (struct desc){ (uintptr_t)bufs[2], 16, F_WRITE | F_NEXT, 1 };
    vm_post(1);
    CHECK(31, vm_wait_used(&id) == 0 && id == 1);
    /* a huge length */
    descs[3] = (struct desc){ (uintptr_t)bufs[3], 0xffffffffu, F_WRITE, 0 };
    vm_post(3);
    CHECK(32, vm_wait_used(&id) == 0 && id == 3);
    /* a runaway avail index: the whole ring is broken */
    avail.idx += 1000;
    __asm__ volatile("mfence" ::: "memory");
    vm_kick();
    uint64_t i;
    for (i = 0; i < SPINS && !(mmio_read8(common + STATUS) & S_NEEDS_RESET); i++)
        cpu_relax();
    CHECK(33, i < SPINS);
    vm_setup();                        /* reset, and start over */
}

int guest_main(void)
{
    struct pci_dev d;
    CHECK(1, pci_find(VIRTIO_VENDOR, VIRTIO_RNG_DEVICE, &d));
    bdf = d.bdf;
    CHECK(2, pci_cfg_read8(bdf, PCI_CLASS_REVISION) >= 1);       /* modern: revision 1 */
    vm_find_caps();
    vm_locate(pci_bar_address(bdf, 0));
    pci_command(bdf, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER, 0);
    use_msix = guest_arg("msix", 1);
    if (use_msix) {
        struct pci_msix m;
        irq_init();
        irq_enable();
        CHECK(14, pci_msix_init(bdf, &m) && m.nvectors == 2);
        pci_msix_program(&m, 0, MSI_ADDRESS(0), MSI_DATA(VEC));
        pci_msix_program(&m, 1, MSI_ADDRESS(0), MSI_DATA(VEC + 1));
        pci_msix_enable(bdf, &m, 1, 0);
        pci_msix_mask(&m, 0, 0);
        pci_msix_mask(&m, 1, 0);
    }
    vm_setup();
    if (guest_arg("hostile", 0))
        hostile();
    unsigned rounds = guest_arg("rounds", 4);
    uint64_t move = guest_arg("move", 0);
    uint8_t prev[16] = {0};
    unsigned r = 0;
    for (; r < rounds; r++) {
        if (move && r == rounds / 2) {
            pci_bar_set(bdf, 0, move, 1);            /* decode stays on */
            CHECK(40, pci_bar_address(bdf, 0) == move);
            vm_locate(move);
        }
        good_round(r, prev);
    }
    uint64_t *stats = (uint64_t *)(uintptr_t)guest_arg("stats", 0);
    if (stats) {
        vm_doorbell_stats(&stats[0], &stats[1]);
        stats[2] = r;
        memcpy(&stats[3], prev, 16);
        stats[5] = kicks;
    }
    return 0;
}
