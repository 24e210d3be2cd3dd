/*
 * PVH entry and ring-3 start of the project's freestanding test guests.
 *
 * Entered as the PVH ABI says (Xen docs/misc/pvh.pandoc): 32-bit flat
 * protected mode, paging off, %ebx = guest-physical address of the
 * hvm_start_info.  Every vCPU enters here (splitvmm starts secondary vCPUs
 * at the PVH entry too, see vmm/boot/pvh.py); each tells itself apart by
 * its local APIC id.  The code below is all the ring-0 work there is --
 * ring 0 is instruction-emulated on the project's hosts -- so it is short
 * and loop-free:
 *
 *   1. load the GDT, enable PAE and long mode with the static identity
 *      page tables (2 MiB pages, user-accessible, the whole 4 GiB),
 *   2. set up this CPU's TSS (rsp0 = its kernel stack, an I/O permission
 *      bitmap that allows every port),
 *   3. call guest_ring0_init(cpu) (weak, empty by default), and, when
 *      ring 3 runs with interrupts on, mask the 8259 PICs (vCPU 0),
 *   4. iretq to ring 3 with IOPL 3, where
 *      vCPU 0 runs guest_main() and then guest_finish(its result), and
 *      vCPU n runs guest_ap_main(n) and then parks (guest.h).
 *
 * The IDT (irq.S, loaded here, its gates filled from ring 3 by irq_init)
 * has gates for vectors 32..255 only: external interrupts taken in ring 3
 * enter the ring-0 stub through it and iretq back, also on the PVM host
 * (this guest never switches PVM on, so the host delivers events the x86
 * way; see irq.h).  An exception in ring 3 finds no gate and is a triple
 * fault that the VMM reports.
 *
 * Ring 3 may do port I/O: real hardware allows it through IOPL 3, PVM
 * (which runs ring 3 natively and keeps the host's IOPL 0) through the
 * TSS I/O permission bitmap (SDM Vol. 1 §19.5.2), so both are set.
 *
 * Intel SDM Vol. 3A: §9.8.5 (switching to IA-32e mode), §8.2.3 (64-bit
 * TSS descriptor).
 */

#define MAX_CPUS     8
#define KSTACK_SHIFT 12            /* 4 KiB ring-0 stack per CPU */
#define USTACK_SHIFT 16            /* 64 KiB ring-3 stack per CPU */
#define TSS_SHIFT    14            /* 16 KiB slot: TSS + I/O bitmap */
#define TSS_IOMAP    104           /* I/O permission bitmap right after the TSS */
#define TSS_LIMIT    (TSS_IOMAP + 8192)  /* bitmap of 65536 ports + its 0xff end byte */
#define SEL_KCODE    0x08
#define SEL_KDATA    0x10
#define SEL_UCODE    (0x18 | 3)
#define SEL_UDATA    (0x20 | 3)
#define SEL_TSS0     0x28
#define LAPIC_ID     0xfee00020
#define MSR_EFER     0xc0000080

/* XEN_ELFNOTE_PHYS32_ENTRY (xen/include/public/elfnote.h) */
	.section .note.Xen, "a", @note
	.balign 4
	.long 4, 4, 18
	.asciz "Xen"
	.balign 4
	.long _start32

	.section .text.entry, "ax", @progbits
	.code32
	.globl _start32
_start32:
	cli
	cld
	movl LAPIC_ID, %esi
	shrl $24, %esi
	/* Every vCPU stores the start info (the same one, vmm/boot/pvh.py):
	 * a secondary vCPU may reach guest_arg() before vCPU 0 is this far. */
	movl %ebx, guest_start_info
	lgdt gdt_ptr
	movl %cr4, %eax
	orl $0x620, %eax                /* PAE | OSFXSR | OSXMMEXCPT */
	movl %eax, %cr4
	movl $pml4, %eax
	movl %eax, %cr3
	movl $MSR_EFER, %ecx
	rdmsr
	orl $0x100, %eax                /* LME */
	wrmsr
	movl %cr0, %eax
	orl $0x80000001, %eax           /* PG | PE */
	movl %eax, %cr0
	ljmp $SEL_KCODE, $_start64

	.code64
_start64:
	movl $SEL_KDATA, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	xorl %eax, %eax
	movl %eax, %fs
	movl %eax, %gs
	movl %esi, %ebx                 /* cpu index, zero-extended, callee-saved */
	cmpl $MAX_CPUS, %ebx
	jae park

	leaq 1(%rbx), %rax
	shlq $KSTACK_SHIFT, %rax
	leaq kstacks(%rax), %rsp

	/* this CPU's TSS: rsp0 and an all-zero I/O permission bitmap (every
	 * port allowed in ring 3: PVM ignores IOPL, it honours the bitmap) */
	movq %rbx, %rdx
	shlq $TSS_SHIFT, %rdx
	leaq tss(%rdx), %rdx
	movq %rsp, 4(%rdx)
	movw $TSS_IOMAP, 102(%rdx)
	movb $0xff, TSS_LIMIT(%rdx)
	/* its descriptor in GDT slot SEL_TSS0 + 16 * cpu */
	movq %rdx, %rax
	movq %rax, %rcx
	andq $0xffffff, %rcx
	shlq $16, %rcx
	orq $TSS_LIMIT, %rcx            /* limit */
	movq $0x89, %r8                 /* present, available 64-bit TSS */
	shlq $40, %r8
	orq %r8, %rcx
	movq %rax, %r8
	shrq $24, %r8
	andq $0xff, %r8
	shlq $56, %r8
	orq %r8, %rcx
	movq %rbx, %r9
	shlq $4, %r9
	leaq gdt+SEL_TSS0(%r9), %r10
	movq %rcx, (%r10)
	shrq $32, %rax
	movq %rax, 8(%r10)
	leal SEL_TSS0(%r9), %eax
	ltr %ax

	lidt idt_ptr                    /* irq.S; its gates are filled from ring 3 */

	movq %rbx, %rdi
	call guest_ring0_init

	/* Ring 3 with IF = 1 (irq.h): vCPU 0 masks both 8259s first, with
	 * interrupts still off.  A firmware may have left them programmed
	 * (SeaBIOS under QEMU: the PIT's IRQ 0 on vector 8, which has no gate
	 * here, a triple fault); irq_init() masks them again. */
	testq $0x200, guest_ring3_rflags
	jz 1f
	testq %rbx, %rbx
	jnz 1f
	movb $0xff, %al
	outb %al, $0x21
	outb %al, $0xa1
1:
	leaq 1(%rbx), %rax
	shlq $USTACK_SHIFT, %rax
	leaq ustacks(%rax), %rax
	pushq $SEL_UDATA
	pushq %rax
	pushq guest_ring3_rflags        /* IOPL 3, bit 1; IF per irq.h */
	pushq $SEL_UCODE
	pushq $user_entry
	movq %rbx, %rdi
	iretq

park:
	cli
	hlt
	jmp park

/* Ring 3 from here on; %rdi = cpu index. */
	.text
user_entry:
	testq %rdi, %rdi
	jnz 1f
	call guest_main
	movl %eax, %edi
	call guest_finish
1:	call guest_ap_main
	call park_cpu

	.data
	.balign 16
gdt:
	.quad 0
	.quad 0x00af9a000000ffff        /* 0x08 ring-0 code, 64-bit */
	.quad 0x00cf92000000ffff        /* 0x10 ring-0 data */
	.quad 0x00affa000000ffff        /* 0x18 ring-3 code, 64-bit */
	.quad 0x00cff2000000ffff        /* 0x20 ring-3 data */
	.fill 2 * MAX_CPUS, 8, 0        /* 0x28: a 16-byte TSS descriptor per CPU */
gdt_end:
	.balign 8
	.word 0, 0, 0
gdt_ptr:
	.word gdt_end - gdt - 1
	.quad gdt

	/* RFLAGS of ring 3: IOPL 3, IF 0, reserved bit 1.  A guest that takes
	 * interrupts overrides it with IF 1 (irq.h, IRQ_RING3_INTERRUPTS_ON). */
	.balign 8
	.weak guest_ring3_rflags
guest_ring3_rflags:
	.quad 0x3002

	.balign 8
	.globl guest_start_info
guest_start_info:
	.quad 0

/* Identity map of the low 4 GiB: 2 MiB pages, present, writable, user. */
	.section .data.pagetables, "aw", @progbits
	.balign 4096
pml4:
	.quad pdpt + 0x7
	.fill 511, 8, 0
pdpt:
	.quad pd + 0x7, pd + 0x1007, pd + 0x2007, pd + 0x3007
	.fill 508, 8, 0
pd:
	.set page, 0
	.rept 2048
	.quad page + 0x87
	.set page, page + 0x200000
	.endr

	.bss
	.balign 4096
	.globl kstacks
kstacks:
	.skip MAX_CPUS << KSTACK_SHIFT
ustacks:
	.skip MAX_CPUS << USTACK_SHIFT
tss:
	.skip MAX_CPUS << TSS_SHIFT

	.section .note.GNU-stack, "", @progbits
