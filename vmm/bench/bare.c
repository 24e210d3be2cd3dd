/* The physical floor of the exit benchmark: a bare KVM runner in C.
 *
 * It runs one vCPU of a guest that vmm.bench has already loaded (PVH ELF,
 * start info and boot GDT written into the guest-RAM memfd it inherits),
 * entering it like vmm.boot.pvh does (32-bit flat protected mode at the
 * entry, ebx = start info), and answers every exit itself: port and MMIO
 * reads get all ones, writes to the mark port are timestamped, a write
 * to the test-exit or power-off port ends the run.  It prints one JSON
 * object: {"marks": [[value, ns], ...], "exits": n}.
 *
 * usage: bare MEMFD SIZE ENTRY START_INFO BOOT_GDT MARK_PORT TEST_EXIT_PORT
 *             POWER_OFF_PORT TSS_ADDR
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MAX_MARKS 4096

static void die(const char *what)
{
    fprintf(stderr, "bare: %s: %s\n", what, strerror(errno));
    exit(1);
}

static uint64_t arg(char **argv, int i) { return strtoull(argv[i], NULL, 0); }

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void flat(struct kvm_segment *s, uint16_t sel, uint8_t type)
{
    memset(s, 0, sizeof *s);
    s->base = 0;
    s->limit = 0xffffffff;
    s->selector = sel;
    s->type = type;
    s->present = 1;
    s->s = 1;
    s->db = 1;
    s->g = 1;
}

int main(int argc, char **argv)
{
    if (argc != 10) {
        fprintf(stderr, "usage: bare MEMFD SIZE ENTRY START_INFO BOOT_GDT MARK TEST_EXIT POWER_OFF TSS_ADDR\n");
        return 2;
    }
    int memfd = (int)arg(argv, 1);
    uint64_t size = arg(argv, 2), entry = arg(argv, 3), start_info = arg(argv, 4), gdt = arg(argv, 5);
    uint16_t mark = (uint16_t)arg(argv, 6), test_exit = (uint16_t)arg(argv, 7), power_off = (uint16_t)arg(argv, 8);
    uint64_t tss_addr = arg(argv, 9);

    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) die("/dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) die("KVM_CREATE_VM");
    if (ioctl(vm, KVM_SET_TSS_ADDR, tss_addr) < 0) die("KVM_SET_TSS_ADDR");
    if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0) die("KVM_CREATE_IRQCHIP");
    struct kvm_pit_config pit = { .flags = KVM_PIT_SPEAKER_DUMMY };
    if (ioctl(vm, KVM_CREATE_PIT2, &pit) < 0) die("KVM_CREATE_PIT2");
    void *ram = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    if (ram == MAP_FAILED) die("mmap guest RAM");
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = size, .userspace_addr = (uintptr_t)ram,
    };
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("KVM_SET_USER_MEMORY_REGION");

    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0) die("KVM_CREATE_VCPU");
    int nent = 256;
    struct kvm_cpuid2 *cpuid = calloc(1, sizeof *cpuid + nent * sizeof(struct kvm_cpuid_entry2));
    cpuid->nent = nent;
    if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid) < 0) die("KVM_GET_SUPPORTED_CPUID");
    if (ioctl(vcpu, KVM_SET_CPUID2, cpuid) < 0) die("KVM_SET_CPUID2");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED) die("mmap kvm_run");

    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0) die("KVM_GET_SREGS");
    flat(&sregs.cs, 0x08, 0xb);
    flat(&sregs.ds, 0x10, 0x3);
    sregs.es = sregs.fs = sregs.gs = sregs.ss = sregs.ds;
    memset(&sregs.tr, 0, sizeof sregs.tr);
    sregs.tr.selector = 0x18;
    sregs.tr.limit = 0x67;
    sregs.tr.type = 0xb;
    sregs.tr.present = 1;
    sregs.gdt.base = gdt;
    sregs.gdt.limit = 4 * 8 - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = 0x11;
    sregs.cr3 = sregs.cr4 = sregs.efer = 0;
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) die("KVM_SET_SREGS");
    struct kvm_regs regs;
    memset(&regs, 0, sizeof regs);
    regs.rip = entry;
    regs.rbx = start_info;
    regs.rflags = 2;
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");

    static uint64_t marks[MAX_MARKS][2];
    int nmarks = 0;
    uint64_t exits = 0;
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            die("KVM_RUN");
        }
        exits++;
        if (run->exit_reason == KVM_EXIT_IO) {
            uint8_t *data = (uint8_t *)run + run->io.data_offset;
            if (run->io.direction == KVM_EXIT_IO_OUT) {
                if (run->io.port == mark && nmarks < MAX_MARKS) {
                    marks[nmarks][0] = data[0];
                    marks[nmarks][1] = now_ns();
                    nmarks++;
                } else if (run->io.port == test_exit || run->io.port == power_off) {
                    break;
                }
            } else {
                memset(data, 0xff, (size_t)run->io.size * run->io.count);
            }
        } else if (run->exit_reason == KVM_EXIT_MMIO) {
            if (!run->mmio.is_write)
                memset(run->mmio.data, 0xff, sizeof run->mmio.data);
        } else {
            fprintf(stderr, "bare: unexpected exit %u\n", run->exit_reason);
            return 1;
        }
    }
    printf("{\"exits\": %llu, \"marks\": [", (unsigned long long)exits);
    for (int i = 0; i < nmarks; i++)
        printf("%s[%llu, %llu]", i ? ", " : "", (unsigned long long)marks[i][0], (unsigned long long)marks[i][1]);
    printf("]}\n");
    return 0;
}
