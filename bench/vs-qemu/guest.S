/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The guest of the ferry-vs-QEMU benchmark: one 512-byte boot sector that runs unchanged in
 * QEMU (SeaBIOS loads it at 0x7c00) and in ferry (`--guest boot:FILE`, loaded at 0x7c00 in
 * real mode). Like the guest of QEMU's own migration test, it switches to 32-bit protected
 * mode with flat 4 GiB segments and then loops forever incrementing the first byte of every
 * page in [1 MiB, 1 MiB + RANGE), so every page of the range is dirtied on every pass and
 * nothing else is (but one counter word in page 0). RANGE is the little-endian dword at
 * offset RANGE_OFF of the image, after the 4 bytes "RNGE"; bench/vs-qemu/run.sh patches it
 * per case. On COM1 (0x3f8) it prints "A" once started, then "B" whenever bit 30 of the TSC
 * has moved on since the last one (about every 0.4 s at 2.5-3 GHz, at most once per pass),
 * so a console that keeps growing shows the guest runs. Passes completed are counted in the
 * dword at PASSES_GPA (0x600), for a memory dump to read.
 *
 * Build: as --32 -o guest.o guest.S && ld -m elf_i386 -Ttext=0x7c00 --oformat binary -o guest.img guest.o
 */
	.set	RANGE_BASE, 0x100000	/* 1 MiB */
	.set	PASSES_GPA, 0x600
	.set	COM1, 0x3f8
	.set	SEL_CODE, 0x08
	.set	SEL_DATA, 0x10

	.text
	.code16
	.globl	_start
_start:
	cli
	xor	%ax, %ax		/* a BIOS may leave DS/ES/SS anywhere */
	mov	%ax, %ds
	mov	%ax, %es
	mov	%ax, %ss
	mov	$0x7c00, %sp
	lgdtl	gdt_desc
	mov	%cr0, %eax
	or	$1, %eax		/* PE */
	mov	%eax, %cr0
	ljmpl	$SEL_CODE, $pm32

	.code32
pm32:
	mov	$SEL_DATA, %ax
	mov	%ax, %ds
	mov	%ax, %es
	mov	%ax, %fs
	mov	%ax, %gs
	mov	%ax, %ss
	mov	$0x7c00, %esp

	/* A20 through the fast gate; bit 0 (reset) must stay clear. SeaBIOS has already
	 * opened it, and ferry's VMM has no A20 gate at all (it ignores port 0x92). */
	in	$0x92, %al
	or	$2, %al
	and	$0xfe, %al
	out	%al, $0x92

	mov	$COM1, %dx
	mov	$'A', %al
	out	%al, %dx

	movl	$0, PASSES_GPA
	mov	range, %esi
	add	$RANGE_BASE, %esi	/* esi = end of the range */
	rdtsc
	shrd	$30, %edx, %eax
	mov	%eax, %edi		/* edi = TSC >> 30 at the last marker */

pass:
	mov	$RANGE_BASE, %ebx
1:	incb	(%ebx)
	add	$4096, %ebx
	cmp	%esi, %ebx
	jb	1b
	incl	PASSES_GPA
	rdtsc
	shrd	$30, %edx, %eax
	cmp	%eax, %edi
	je	pass
	mov	%eax, %edi
	mov	$COM1, %dx
	mov	$'B', %al
	out	%al, %dx
	jmp	pass

	.p2align 3
gdt:
	.quad	0			/* null */
	.quad	0x00cf9a000000ffff	/* 0x08: code, base 0, limit 4 GiB, 32-bit, DPL 0 */
	.quad	0x00cf92000000ffff	/* 0x10: data, base 0, limit 4 GiB, read/write */
gdt_desc:
	.word	gdt_desc - gdt - 1
	.long	gdt

	/* The patchable range: "RNGE" then RANGE in bytes (default 100 MiB). */
	.org	0x1f4
	.ascii	"RNGE"
range:
	.long	100 * 1024 * 1024
	.org	0x1fe
	.byte	0x55, 0xaa
