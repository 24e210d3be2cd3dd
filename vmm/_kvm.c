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
