/* C side of the KVM bindings: names and offsets for the members of
 * struct kvm_run's anonymous exit union, and the vCPU kick signal handler.
 * Included by the cffi-generated module (see _kvm_build.py). */
#include <errno.h>
#include <signal.h>
#include <stddef.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdlib.h>

#define SVMM_MEMBER(name) __typeof__(((struct kvm_run *)0)->name)

typedef SVMM_MEMBER(io) svmm_run_io;
typedef SVMM_MEMBER(mmio) svmm_run_mmio;
typedef SVMM_MEMBER(internal) svmm_run_internal;
typedef SVMM_MEMBER(emulation_failure) svmm_run_emulation_failure;
typedef SVMM_MEMBER(fail_entry) svmm_run_fail_entry;
typedef SVMM_MEMBER(hw) svmm_run_hw;
typedef SVMM_MEMBER(system_event) svmm_run_system_event;

#define SVMM_RUN_IO offsetof(struct kvm_run, io)
#define SVMM_RUN_MMIO offsetof(struct kvm_run, mmio)
#define SVMM_RUN_INTERNAL offsetof(struct kvm_run, internal)
#define SVMM_RUN_EMULATION_FAILURE offsetof(struct kvm_run, emulation_failure)
#define SVMM_EMULATION_FAILURE_INSN_SIZE offsetof(svmm_run_emulation_failure, insn_size)
#define SVMM_EMULATION_FAILURE_INSN_BYTES offsetof(svmm_run_emulation_failure, insn_bytes)
#define SVMM_RUN_FAIL_ENTRY offsetof(struct kvm_run, fail_entry)
#define SVMM_RUN_HW offsetof(struct kvm_run, hw)
#define SVMM_RUN_SYSTEM_EVENT offsetof(struct kvm_run, system_event)
#define SVMM_SYSTEM_EVENT_DATA offsetof(svmm_run_system_event, data)
#define SVMM_CPUID2_ENTRIES offsetof(struct kvm_cpuid2, entries)
#define SVMM_MAP_FAILED ((long)MAP_FAILED)

static void svmm_kick_handler(int signo)
{
    (void)signo;
}

int svmm_install_kick_handler(int signo)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = svmm_kick_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;  /* no SA_RESTART: KVM_RUN must return EINTR */
    if (sigaction(signo, &sa, NULL) != 0)
        return -errno;
    return 0;
}

/* A GSI route, flattened (see _kvm.h); KVM's own limit is
 * KVM_MAX_IRQ_ROUTES (4096 on x86, not in the uapi headers). */
typedef struct {
    uint32_t gsi;
    uint32_t type;
    uint32_t a, b, c;
} svmm_route;
#define SVMM_MAX_ROUTES 4096

int svmm_set_gsi_routing(int vm_fd, const svmm_route *routes, unsigned n)
{
    size_t size = sizeof(struct kvm_irq_routing) + (size_t)n * sizeof(struct kvm_irq_routing_entry);
    struct kvm_irq_routing *table;
    unsigned i;
    int rc;

    if (n > SVMM_MAX_ROUTES)
        return -E2BIG;
    table = calloc(1, size);
    if (!table)
        return -ENOMEM;
    table->nr = n;
    for (i = 0; i < n; i++) {
        struct kvm_irq_routing_entry *e = &table->entries[i];
        e->gsi = routes[i].gsi;
        e->type = routes[i].type;
        if (routes[i].type == KVM_IRQ_ROUTING_IRQCHIP) {
            e->u.irqchip.irqchip = routes[i].a;
            e->u.irqchip.pin = routes[i].b;
        } else {
            e->u.msi.address_lo = routes[i].a;
            e->u.msi.address_hi = routes[i].b;
            e->u.msi.data = routes[i].c;
        }
    }
    rc = ioctl(vm_fd, KVM_SET_GSI_ROUTING, table);
    rc = rc < 0 ? -errno : 0;
    free(table);
    return rc;
}

int svmm_irq_line(int vm_fd, uint32_t gsi, uint32_t level)
{
    struct kvm_irq_level irq;
    memset(&irq, 0, sizeof irq);
    irq.irq = gsi;
    irq.level = level;
    return ioctl(vm_fd, KVM_IRQ_LINE, &irq) < 0 ? -errno : 0;
}

/* Coalesced MMIO ring (see _kvm.h).  The kernel fills the entry at "last"
 * and then advances "last" (with a write barrier); user space reads from
 * "first" and advances it when done with an entry. */
#define SVMM_COALESCED_PAGE 4096
#define SVMM_COALESCED_MAX \
    ((SVMM_COALESCED_PAGE - sizeof(struct kvm_coalesced_mmio_ring)) / sizeof(struct kvm_coalesced_mmio))

int svmm_coalesced_pending(void *ring)
{
    struct kvm_coalesced_mmio_ring *r = ring;
    return __atomic_load_n(&r->first, __ATOMIC_RELAXED) != __atomic_load_n(&r->last, __ATOMIC_ACQUIRE);
}

int svmm_coalesced_take(void *ring, uint64_t *out, unsigned n)
{
    struct kvm_coalesced_mmio_ring *r = ring;
    uint32_t first = __atomic_load_n(&r->first, __ATOMIC_RELAXED);
    uint32_t last = __atomic_load_n(&r->last, __ATOMIC_ACQUIRE);   /* pairs with KVM's smp_wmb */
    unsigned got = 0;

    if (first >= SVMM_COALESCED_MAX || last >= SVMM_COALESCED_MAX) {
        __atomic_store_n(&r->first, last < SVMM_COALESCED_MAX ? last : 0, __ATOMIC_RELEASE);
        return -1;
    }
    while (first != last && got < n) {
        const struct kvm_coalesced_mmio *e = &r->coalesced_mmio[first];
        uint32_t len = e->len;
        if (len == 1 || len == 2 || len == 4 || len == 8) {
            uint64_t value = 0;
            memcpy(&value, e->data, len);              /* x86: little-endian */
            out[3 * got] = e->phys_addr;
            out[3 * got + 1] = len;
            out[3 * got + 2] = value;
            got++;
        }
        first = (first + 1) % SVMM_COALESCED_MAX;
    }
    /* The entries are copied before KVM may reuse them. */
    __atomic_store_n(&r->first, first, __ATOMIC_RELEASE);
    return (int)got;
}
