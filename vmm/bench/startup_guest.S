/* The start-up benchmark's guest (vmm.bench.startup): its first
 * instructions, at the PVH entry in 32-bit protected mode, write 0 to the
 * test-exit port (QEMU's isa-debug-exit at 0xf4, splitvmm's TEST_EXIT_PORT),
 * which ends the run with status 1 under both.  Nothing else runs: the
 * wall time of the whole command is the VMM's start-up and teardown. */

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
	movw $0xf4, %dx
	xorl %eax, %eax
	outl %eax, %dx
1:	hlt                     /* not reached: the write ended the run */
	jmp 1b

	.section .note.GNU-stack, "", @progbits
