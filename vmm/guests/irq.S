/*
 * Ring-0 interrupt entry of the test guests (see irq.h).
 *
 * One 16-byte stub per vector 32..255 pushes its vector and jumps to
 * irq_common, which runs on this CPU's TSS rsp0 stack (start.S: kstacks,
 * 4 KiB per CPU, so the CPU index is (rsp - kstacks) >> 12):
 *
 *   irq_counts[cpu][vector]++, irq_last[cpu] = vector;
 *   if (irq_handlers[vector]) irq_handlers[vector](vector);  (C, ring 0)
 *   LAPIC EOI; iretq.
 *
 * The fast path (no handler) is 18 instructions: ring 0 is emulated on the
 * development host, ~0.5 us each.  The IDT itself is filled from ring 3
 * (irq_init in irq.c); start.S only loads it (idt_ptr).
 *
 * Intel SDM Vol. 3A §6.12.1 (interrupt gates), §6.14 (64-bit IDT, stack
 * switch through the TSS, iretq).
 */

#define KSTACK_SHIFT 12
#define LAPIC_EOI 0xfee000b0
#define MAX_CPUS 8

	.text
	.balign 16
	.globl irq_stubs
irq_stubs:
	.set vec, 32
	.rept 224
	.balign 16
	pushq $vec
	jmp irq_common
	.set vec, vec + 1
	.endr

irq_common:                          /* stack: vector, rip, cs, rflags, rsp, ss */
	pushq %rax
	pushq %rdx
	movq 16(%rsp), %rax              /* vector */
	movq %rsp, %rdx
	subq $kstacks, %rdx
	shrq $KSTACK_SHIFT, %rdx         /* cpu */
	movl %eax, irq_last(,%rdx,4)
	shlq $8, %rdx
	addq %rax, %rdx
	incl irq_counts(,%rdx,4)
	movq irq_handlers(,%rax,8), %rdx
	testq %rdx, %rdx
	jnz 2f
1:	movl $LAPIC_EOI, %edx            /* above 2 GiB: not a disp32 */
	movl $0, (%rdx)
	popq %rdx
	popq %rax
	addq $8, %rsp
	iretq

2:	pushq %rcx                       /* the C handler: save what it may clobber */
	pushq %rsi
	pushq %rdi
	pushq %r8
	pushq %r9
	pushq %r10
	pushq %r11
	subq $8, %rsp                    /* 16-byte alignment at the call */
	movl %eax, %edi
	call *%rdx
	addq $8, %rsp
	popq %r11
	popq %r10
	popq %r9
	popq %r8
	popq %rdi
	popq %rsi
	popq %rcx
	jmp 1b

	.data
	.balign 8
	.word 0, 0, 0
	.globl idt_ptr
idt_ptr:
	.word 256 * 16 - 1
	.quad idt

	.bss
	.balign 4096
	.globl idt
idt:
	.skip 256 * 16
	.globl irq_counts, irq_last, irq_handlers
	.balign 64
irq_counts:
	.skip MAX_CPUS * 256 * 4
irq_last:
	.skip MAX_CPUS * 4
	.balign 8
irq_handlers:
	.skip 256 * 8

	.section .note.GNU-stack, "", @progbits
