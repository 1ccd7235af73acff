/* SPDX-License-Identifier: Apache-2.0 */
/* A flat ferry guest that cycles over 1024 pages, doing K 8-byte stores into each page,
 * and prints one "." on COM1 every 256 pages: the reproducer for how the dirty ring
 * behaves when a guest writes a page several times between harvests. */
.code64
.globl _start
hdr:
 .quad 0x474d495952524546
 .long 1
 .long 48
 .quad 0x100000
 .quad 0x100000 + (entry - hdr)
 .quad end - hdr
 .quad end - hdr
entry:
 mov $0x400000, %rbx
 xor %r9, %r9            # page counter
1:
 mov %r9, %rax
 and $1023, %rax
 shl $12, %rax
 lea (%rbx,%rax), %rdi
 mov $K, %rcx          # stores per page (assembled with -DK=N)
2:
 movq %r9, (%rdi)
 add $8, %rdi
 dec %rcx
 jnz 2b
 inc %r9
 test $255, %r9
 jnz 1b
 mov $0x3f8, %dx
 mov $'.', %al
 out %al, %dx
 jmp 1b
end:
