/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Entry point of every built-in guest. The VMM starts each vCPU here in 64-bit mode with
 * rdi = vCPU index, rsi = boot info gpa and rsp at the top of the vCPU's own stack, with
 * interrupts off and no IDT. We re-align the stack anyway (a misaligned rsp would only show
 * up later as a crash in compiler-generated code), clear the frame pointer so backtraces in
 * a debugger end here, clear DF because guestlib uses rep string instructions, and call
 * guest_main(idx, bootinfo). Guests never return; if one does, the vCPU halts for good.
 */
	.section .text.entry, "ax"
	.globl _start
	.type _start, @function
_start:
	andq	$-16, %rsp
	xorl	%ebp, %ebp
	cld
	call	guest_main
1:	cli
	hlt
	jmp	1b
	.size _start, . - _start

	.section .note.GNU-stack, "", @progbits
