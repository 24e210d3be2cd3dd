/* cffi declarations of the KVM API that vmm uses (read by cffi as the cdef).
 *
 * Declarations only.  Every "..." is filled in by the C compiler from
 * <linux/kvm.h> (see Documentation/virt/kvm/api.rst), so no number or
 * struct layout here is copied by hand.  Sub-structures of the anonymous
 * union in struct kvm_run get names (svmm_run_*) and offsets in _kvm.c.
 */

/* ioctl(2) itself: every KVM call, KVM_RUN included, goes through it. */
int ioctl(int fd, unsigned long request, ...);

/* System ioctls (on /dev/kvm). */
#define KVM_API_VERSION ...
#define KVM_GET_API_VERSION ...
#define KVM_CREATE_VM ...
#define KVM_CHECK_EXTENSION ...
#define KVM_GET_VCPU_MMAP_SIZE ...
#define KVM_GET_SUPPORTED_CPUID ...

/* VM ioctls. */
#define KVM_SET_TSS_ADDR ...
#define KVM_CREATE_IRQCHIP ...
#define KVM_CREATE_PIT2 ...
#define KVM_REINJECT_CONTROL ...
#define KVM_SET_USER_MEMORY_REGION ...
#define KVM_CREATE_VCPU ...

/* vCPU ioctls. */
#define KVM_RUN ...
#define KVM_GET_REGS ...
#define KVM_SET_REGS ...
#define KVM_GET_SREGS ...
#define KVM_SET_SREGS ...
#define KVM_SET_CPUID2 ...
#define KVM_GET_MP_STATE ...
#define KVM_SET_MP_STATE ...
#define KVM_GET_VCPU_EVENTS ...
#define KVM_GET_XSAVE ...
#define KVM_SET_XSAVE ...
#define KVM_SET_VCPU_EVENTS ...

/* Capabilities. */
#define KVM_CAP_IRQCHIP ...
#define KVM_CAP_PIT2 ...
#define KVM_CAP_USER_MEMORY ...
#define KVM_CAP_SET_TSS_ADDR ...
#define KVM_CAP_EXT_CPUID ...
#define KVM_CAP_MP_STATE ...
#define KVM_CAP_IMMEDIATE_EXIT ...
#define KVM_CAP_NR_VCPUS ...
#define KVM_CAP_MAX_VCPUS ...
#define KVM_CAP_INTERNAL_ERROR_DATA ...

#define KVM_PIT_SPEAKER_DUMMY ...

/* Exit reasons (struct kvm_run.exit_reason). */
#define KVM_EXIT_UNKNOWN ...
#define KVM_EXIT_EXCEPTION ...
#define KVM_EXIT_IO ...
#define KVM_EXIT_HYPERCALL ...
#define KVM_EXIT_DEBUG ...
#define KVM_EXIT_HLT ...
#define KVM_EXIT_MMIO ...
#define KVM_EXIT_IRQ_WINDOW_OPEN ...
#define KVM_EXIT_SHUTDOWN ...
#define KVM_EXIT_FAIL_ENTRY ...
#define KVM_EXIT_INTR ...
#define KVM_EXIT_SET_TPR ...
#define KVM_EXIT_TPR_ACCESS ...
#define KVM_EXIT_NMI ...
#define KVM_EXIT_INTERNAL_ERROR ...
#define KVM_EXIT_SYSTEM_EVENT ...
#define KVM_EXIT_IOAPIC_EOI ...
#define KVM_EXIT_X86_RDMSR ...
#define KVM_EXIT_X86_WRMSR ...
#define KVM_EXIT_X86_BUS_LOCK ...
#define KVM_EXIT_NOTIFY ...
#define KVM_EXIT_IO_IN ...
#define KVM_EXIT_IO_OUT ...

/* Sub-errors of KVM_EXIT_INTERNAL_ERROR. */
#define KVM_INTERNAL_ERROR_EMULATION ...
#define KVM_INTERNAL_ERROR_SIMUL_EX ...
#define KVM_INTERNAL_ERROR_DELIVERY_EV ...
#define KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON ...
#define KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES ...

/* Types of KVM_EXIT_SYSTEM_EVENT. */
#define KVM_SYSTEM_EVENT_SHUTDOWN ...
#define KVM_SYSTEM_EVENT_RESET ...
#define KVM_SYSTEM_EVENT_CRASH ...

/* struct kvm_mp_state.mp_state */
#define KVM_MP_STATE_RUNNABLE ...
#define KVM_MP_STATE_UNINITIALIZED ...
#define KVM_MP_STATE_INIT_RECEIVED ...
#define KVM_MP_STATE_HALTED ...
#define KVM_MP_STATE_SIPI_RECEIVED ...

struct kvm_userspace_memory_region {
    uint32_t slot;
    uint32_t flags;
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
    ...;
};

struct kvm_pit_config {
    uint32_t flags;
    ...;
};

struct kvm_reinject_control {
    uint8_t pit_reinject;
    ...;
};

struct kvm_regs {
    uint64_t rax, rbx, rcx, rdx;
    uint64_t rsi, rdi, rsp, rbp;
    uint64_t r8, r9, r10, r11;
    uint64_t r12, r13, r14, r15;
    uint64_t rip, rflags;
    ...;
};

struct kvm_segment {
    uint64_t base;
    uint32_t limit;
    uint16_t selector;
    uint8_t type;
    uint8_t present, dpl, db, s, l, g, avl;
    uint8_t unusable;
    ...;
};

struct kvm_dtable {
    uint64_t base;
    uint16_t limit;
    ...;
};

struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8;
    uint64_t efer;
    uint64_t apic_base;
    ...;
};

struct kvm_cpuid_entry2 {
    uint32_t function;
    uint32_t index;
    uint32_t flags;
    uint32_t eax, ebx, ecx, edx;
    ...;
};

/* Variable-sized: allocate SVMM_CPUID2_ENTRIES + n * sizeof(entry). */
struct kvm_cpuid2 {
    uint32_t nent;
    ...;
};
#define SVMM_CPUID2_ENTRIES ...

/* Pending/injected events (vmm.emulate injects #BP through it). */
struct kvm_vcpu_events {
    struct {
        uint8_t injected;
        uint8_t nr;
        uint8_t has_error_code;
        uint8_t pending;
        uint32_t error_code;
    } exception;
    uint32_t flags;
    ...;
};

/* x87/SSE/AVX state in the standard XSAVE layout (vmm.emulate's
 * ldmxcsr/stmxcsr: MXCSR is bytes 24-27, XSTATE_BV bytes 512-519). */
struct kvm_xsave {
    uint32_t region[1024];
    ...;
};

struct kvm_mp_state {
    uint32_t mp_state;
};

/* The shared vCPU page (mmap of the vCPU fd). */
struct kvm_run {
    uint8_t request_interrupt_window;
    uint8_t immediate_exit;
    uint32_t exit_reason;
    uint8_t ready_for_interrupt_injection;
    uint8_t if_flag;
    uint16_t flags;
    uint64_t cr8;
    uint64_t apic_base;
    ...;
};

/* Members of kvm_run's exit union, named, with their offsets. */
typedef struct {
    uint8_t direction;
    uint8_t size;
    uint16_t port;
    uint32_t count;
    uint64_t data_offset;
    ...;
} svmm_run_io;
#define SVMM_RUN_IO ...

typedef struct {
    uint64_t phys_addr;
    uint8_t data[8];
    uint32_t len;
    uint8_t is_write;
    ...;
} svmm_run_mmio;
#define SVMM_RUN_MMIO ...

typedef struct {
    uint32_t suberror;
    uint32_t ndata;
    uint64_t data[16];
    ...;
} svmm_run_internal;
#define SVMM_RUN_INTERNAL ...

typedef struct {
    uint32_t suberror;
    uint32_t ndata;
    uint64_t flags;
    ...;
} svmm_run_emulation_failure;
#define SVMM_RUN_EMULATION_FAILURE ...
/* insn_size and insn_bytes[15] live in an anonymous union: offsets only. */
#define SVMM_EMULATION_FAILURE_INSN_SIZE ...
#define SVMM_EMULATION_FAILURE_INSN_BYTES ...

typedef struct {
    uint64_t hardware_entry_failure_reason;
    uint32_t cpu;
    ...;
} svmm_run_fail_entry;
#define SVMM_RUN_FAIL_ENTRY ...

typedef struct {
    uint64_t hardware_exit_reason;
    ...;
} svmm_run_hw;
#define SVMM_RUN_HW ...

typedef struct {
    uint32_t type;
    uint32_t ndata;
    ...;
} svmm_run_system_event;
#define SVMM_RUN_SYSTEM_EVENT ...
/* data[16] (an anonymous union with flags): offset inside the member. */
#define SVMM_SYSTEM_EVENT_DATA ...

/* mmap(2) of the vCPU page. */
#define PROT_READ ...
#define PROT_WRITE ...
#define MAP_SHARED ...
void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
int munmap(void *addr, size_t length);

/* Helpers in _kvm.c. */

/* Install a handler that does nothing for signal signo, without
 * SA_RESTART: a vCPU thread kicked with it leaves KVM_RUN with EINTR.
 * Returns 0 or -errno. */
int svmm_install_kick_handler(int signo);

/* The MAP_FAILED value, as an integer. */
#define SVMM_MAP_FAILED ...


/* Interrupts (api.rst 4.25 KVM_IRQ_LINE, 4.52 KVM_SET_GSI_ROUTING,
 * 4.75 KVM_IRQFD, 4.71 KVM_SIGNAL_MSI). */
#define KVM_IRQ_LINE ...
#define KVM_IRQFD ...
#define KVM_SET_GSI_ROUTING ...
#define KVM_SIGNAL_MSI ...
#define KVM_CAP_IRQ_ROUTING ...
#define KVM_CAP_IRQFD ...
#define KVM_CAP_SIGNAL_MSI ...
#define KVM_IRQFD_FLAG_DEASSIGN ...
#define KVM_IRQ_ROUTING_IRQCHIP ...
#define KVM_IRQ_ROUTING_MSI ...
#define KVM_IRQCHIP_PIC_MASTER ...
#define KVM_IRQCHIP_PIC_SLAVE ...
#define KVM_IRQCHIP_IOAPIC ...
#define SVMM_MAX_ROUTES ...

struct kvm_irqfd {
    uint32_t fd;
    uint32_t gsi;
    uint32_t flags;
    uint32_t resamplefd;
    ...;
};

struct kvm_msi {
    uint32_t address_lo;
    uint32_t address_hi;
    uint32_t data;
    uint32_t flags;
    ...;
};

/* One GSI route, flattened (kvm_irq_routing_entry has a named union):
 * type KVM_IRQ_ROUTING_IRQCHIP: a = irqchip, b = pin;
 * type KVM_IRQ_ROUTING_MSI: a = address_lo, b = address_hi, c = data. */
typedef struct {
    uint32_t gsi;
    uint32_t type;
    uint32_t a, b, c;
} svmm_route;

/* KVM_SET_GSI_ROUTING with these n routes (the whole table).
 * Returns 0 or -errno. */
int svmm_set_gsi_routing(int vm_fd, const svmm_route *routes, unsigned n);
/* KVM_IRQ_LINE: level of input gsi.  Returns 0 or -errno. */
int svmm_irq_line(int vm_fd, uint32_t gsi, uint32_t level);

/* ioeventfd (api.rst 4.59 KVM_IOEVENTFD): a guest write to an address
 * signals an eventfd instead of exiting to user space. */
#define KVM_IOEVENTFD ...
#define KVM_CAP_IOEVENTFD ...
#define KVM_IOEVENTFD_FLAG_DATAMATCH ...
#define KVM_IOEVENTFD_FLAG_PIO ...
#define KVM_IOEVENTFD_FLAG_DEASSIGN ...

struct kvm_ioeventfd {
    uint64_t datamatch;
    uint64_t addr;
    uint32_t len;
    int32_t fd;
    uint32_t flags;
    ...;
};

/* Coalesced MMIO (api.rst 4.116 KVM_(UN)REGISTER_COALESCED_MMIO): guest
 * writes inside a zone are queued in a ring page instead of exiting.
 * KVM_CHECK_EXTENSION(KVM_CAP_COALESCED_MMIO) returns the page offset of
 * that ring in every vCPU's mapping (0: not supported); the ring is one
 * per VM, seen through each vCPU mapping. */
#define KVM_REGISTER_COALESCED_MMIO ...
#define KVM_UNREGISTER_COALESCED_MMIO ...
#define KVM_CAP_COALESCED_MMIO ...

struct kvm_coalesced_mmio_zone {
    uint64_t addr;
    uint32_t size;
    ...;
};

/* Entries of one ring page (KVM_COALESCED_MMIO_MAX for 4 KiB pages). */
#define SVMM_COALESCED_MAX ...
/* The page size the ring's capacity assumes. */
#define SVMM_COALESCED_PAGE ...

/* Copy up to n queued writes out of the ring (oldest first) and hand
 * their entries back to KVM; returns how many were copied.  Each write
 * becomes three u64 in out: guest-physical address, length, value (the
 * length's bytes of data, little-endian, zero-extended); entries of a
 * length other than 1, 2, 4 or 8 are skipped.  A ring whose indices are
 * out of range is reset (first = last) and -1 returned. */
int svmm_coalesced_take(void *ring, uint64_t *out, unsigned n);
/* 1 when the ring holds at least one write. */
int svmm_coalesced_pending(void *ring);
