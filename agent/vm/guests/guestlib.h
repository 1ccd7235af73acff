/* SPDX-License-Identifier: Apache-2.0 */
/*
 * guestlib: the small freestanding runtime shared by ferry's built-in guests. Port I/O, a
 * COM1 console with a tiny printf, debug-port records (struct ferry_dbg_rec on the caller's
 * stack, whose guest-physical address is below 4 GiB by the layout in guest_abi.h), rdtsc,
 * a PRNG and a 64-bit mixing function, boot-info parameter lookup, and the per-vCPU region
 * computation every guest shares. No libc: the guests run identity-mapped in long mode with
 * interrupts off and no IDT, so anything that faults is a triple fault, and this code avoids
 * SSE (built with -mgeneral-regs-only) and anything that needs a runtime.
 */
#ifndef FERRY_GUESTLIB_H
#define FERRY_GUESTLIB_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "guest_abi.h"

#define G_PAGE_SHIFT 12
#define G_PAGE_SIZE (1ull << G_PAGE_SHIFT)
#define G_PAGE_WORDS (G_PAGE_SIZE / sizeof(uint64_t))

/* Every guest implements this; entry.S calls it with the vCPU index and the boot info. */
void guest_main(uint32_t idx, struct ferry_bootinfo *bi);

/* The compiler may emit calls to these even in freestanding code (struct copies, zeroing). */
void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);

static inline void g_outb(uint16_t port, uint8_t v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port) : "memory");
}

/* "memory": the host reads the record the port value points at, so stores must land first. */
static inline void g_outl(uint16_t port, uint32_t v)
{
	__asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port) : "memory");
}

static inline uint64_t g_rdtsc(void)
{
	uint32_t lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((uint64_t)hi << 32) | lo;
}

static inline void g_pause(void)
{
	__asm__ volatile("pause" : : : "memory");
}

/* Stops this vCPU for good: interrupts are off, so hlt never returns (the loop is for NMIs). */
__attribute__((noreturn)) void g_halt(void);

/* ---- console (COM1) ---- */

/*
 * Formats into a stack buffer and writes the line under a guest-wide spinlock so lines from
 * several vCPUs do not interleave byte by byte. Supports %s %c %d %i %u %x %X %p %% with the
 * l, ll and z length modifiers, a '#' flag for 0x, and a zero-padded width. Lines longer than
 * 160 bytes are cut.
 */
void g_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* The same without the lock, for guests that must not write any memory but their stack. */
void g_printf_nolock(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* ---- debug port ---- */

/* Sends one record; the host handles it before the out instruction completes. */
void g_dbg(uint16_t type, uint32_t vcpu, uint64_t a0, uint64_t a1, uint64_t a2, uint64_t a3);
/* Asks the host to sleep this vCPU for ns nanoseconds (rate limiting without spinning). */
void g_sleep_ns(uint32_t vcpu, uint64_t ns);

/* ---- randomness and mixing ---- */

/* A bijective 64-bit finaliser (splitmix64's): every input bit affects every output bit. */
static inline uint64_t g_mix64(uint64_t x)
{
	x ^= x >> 30;
	x *= 0xbf58476d1ce4e5b9ull;
	x ^= x >> 27;
	x *= 0x94d049bb133111ebull;
	x ^= x >> 31;
	return x;
}

/* splitmix64 stream: small state, good enough statistics for access patterns. */
static inline uint64_t g_rand(uint64_t *state)
{
	*state += 0x9e3779b97f4a7c15ull;
	return g_mix64(*state);
}

/* Uniform in [0, n) by multiply-high (no division, no modulo bias worth caring about). */
static inline uint64_t g_rand_below(uint64_t *state, uint64_t n)
{
	return (uint64_t)(((unsigned __int128)g_rand(state) * n) >> 64);
}

/* ---- boot info and parameters ---- */

/* This vCPU's working region: [base, base + size), size a multiple of 4 KiB. */
struct g_region {
	uint64_t base;
	uint64_t size;
	uint64_t pages;
};

/*
 * Checks the boot info (magic, version, vCPU count, parameter table) and that every key in
 * it is one of `keys` (NULL-terminated). On any problem reports FERRY_ERR_PARAM and halts.
 * Writes nothing but the stack unless it fails.
 */
void g_start(uint32_t idx, const struct ferry_bootinfo *bi, const char *guest,
	     const char *const *keys);

/* Looks up key; the last occurrence wins (later parameters override earlier defaults). */
bool g_param(const struct ferry_bootinfo *bi, const char *key, uint64_t *ret);
/* The value of key, or def when absent. */
uint64_t g_param_or(const struct ferry_bootinfo *bi, const char *key, uint64_t def);

/*
 * Reports a bad parameter: a serial line naming guest, key, value and why, then
 * FERRY_DBG_ERROR with a1 = FERRY_ERR_PARAM, a2 = the key's first 8 bytes packed little
 * endian (so the host can print it), a3 = the bad value. Then halts this vCPU.
 */
__attribute__((noreturn)) void g_param_fail(uint32_t idx, const char *guest, const char *key,
					    uint64_t value, const char *why);

/* First 8 bytes of s packed little endian, zero padded. */
uint64_t g_pack8(const char *s);

/*
 * Computes this vCPU's region from param wss (default: the free memory split evenly over
 * the vCPUs, rounded down to 4 KiB). A wss that is 0, not a multiple of 4 KiB or does not
 * fit nr_vcpus times above free_start is a parameter error (reported, then halt).
 */
void g_region_init(uint32_t idx, const struct ferry_bootinfo *bi, const char *guest,
		   struct g_region *ret);

#endif
