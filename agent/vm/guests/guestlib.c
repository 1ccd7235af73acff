// SPDX-License-Identifier: Apache-2.0
/*
 * guestlib: console, debug-port records, parameters and regions for ferry's built-in
 * guests (see guestlib.h). Everything here runs on the vCPU's own stack; the only shared
 * state is the console lock in .bss, which is taken only by g_printf() — never by the touch
 * guest on its normal path, since it promises to write nothing but its stack.
 */
#include <stdarg.h>

#include "guestlib.h"

#define LINE_MAX 160

/* ---- string and memory helpers (rep string ops so the compiler cannot turn them back
 * into calls to themselves) ---- */

void *memset(void *dst, int c, size_t n)
{
	void *d = dst;
	__asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
	return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
	void *d = dst;
	__asm__ volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(n) : : "memory");
	return dst;
}

void *memmove(void *dst, const void *src, size_t n)
{
	unsigned char *d = dst;
	const unsigned char *s = src;
	if (d <= s || d >= s + n)
		return memcpy(dst, src, n);
	/* Overlapping with dst above src: copy backwards. */
	while (n--)
		d[n] = s[n];
	return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const unsigned char *x = a, *y = b;
	for (size_t i = 0; i < n; i++)
		if (x[i] != y[i])
			return x[i] < y[i] ? -1 : 1;
	return 0;
}

static bool streq(const char *a, const char *b)
{
	while (*a && *a == *b) {
		a++;
		b++;
	}
	return *a == *b;
}

void g_halt(void)
{
	for (;;)
		__asm__ volatile("cli; hlt" : : : "memory");
}

/* ---- console ---- */

/* Guest-wide: serialises whole lines from several vCPUs. Zeroed by the loader (bss). */
static volatile int console_lock;

struct buf {
	char *p;
	size_t len;
	size_t cap;
};

static void put(struct buf *b, char c)
{
	if (b->len < b->cap)
		b->p[b->len++] = c;
}

static void put_num(struct buf *b, uint64_t v, unsigned base, bool upper, unsigned width,
		    bool zero)
{
	const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
	char tmp[24];
	unsigned n = 0;
	do {
		tmp[n++] = digits[v % base];
		v /= base;
	} while (v);
	while (width > n) {
		put(b, zero ? '0' : ' ');
		width--;
	}
	while (n)
		put(b, tmp[--n]);
}

static void format(struct buf *b, const char *fmt, va_list ap)
{
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			put(b, *fmt);
			continue;
		}
		fmt++;
		bool alt = false, zero = false;
		for (;; fmt++) {
			if (*fmt == '#')
				alt = true;
			else if (*fmt == '0')
				zero = true;
			else
				break;
		}
		unsigned width = 0;
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (unsigned)(*fmt++ - '0');
		int lng = 0;
		while (*fmt == 'l' || *fmt == 'z') {
			lng++;
			fmt++;
		}
		uint64_t u;
		switch (*fmt) {
		case 'd':
		case 'i': {
			int64_t v = lng ? va_arg(ap, int64_t) : va_arg(ap, int);
			if (v < 0) {
				put(b, '-');
				u = -(uint64_t)v;
			} else {
				u = (uint64_t)v;
			}
			put_num(b, u, 10, false, width, zero);
			break;
		}
		case 'u':
			u = lng ? va_arg(ap, uint64_t) : va_arg(ap, unsigned);
			put_num(b, u, 10, false, width, zero);
			break;
		case 'x':
		case 'X':
		case 'p':
			if (*fmt == 'p')
				u = (uint64_t)(uintptr_t)va_arg(ap, void *);
			else
				u = lng ? va_arg(ap, uint64_t) : va_arg(ap, unsigned);
			if (alt || *fmt == 'p') {
				put(b, '0');
				put(b, 'x');
			}
			put_num(b, u, 16, *fmt == 'X', width, zero);
			break;
		case 'c':
			put(b, (char)va_arg(ap, int));
			break;
		case 's': {
			const char *s = va_arg(ap, const char *);
			for (s = s ? s : "(null)"; *s; s++)
				put(b, *s);
			break;
		}
		case '%':
			put(b, '%');
			break;
		case '\0':
			return;
		default:
			put(b, '%');
			put(b, *fmt);
			break;
		}
	}
}

static void emit(const char *p, size_t n, bool lock)
{
	if (lock) {
		while (__atomic_exchange_n(&console_lock, 1, __ATOMIC_ACQUIRE))
			while (console_lock)
				g_pause();
	}
	/* The VMM reports the transmitter always empty, so no LSR polling is needed. */
	for (size_t i = 0; i < n; i++)
		g_outb(FERRY_SERIAL_PORT, (uint8_t)p[i]);
	if (lock)
		__atomic_store_n(&console_lock, 0, __ATOMIC_RELEASE);
}

void g_printf(const char *fmt, ...)
{
	char line[LINE_MAX];
	struct buf b = {line, 0, sizeof(line)};
	va_list ap;
	va_start(ap, fmt);
	format(&b, fmt, ap);
	va_end(ap);
	emit(line, b.len, true);
}

void g_printf_nolock(const char *fmt, ...)
{
	char line[LINE_MAX];
	struct buf b = {line, 0, sizeof(line)};
	va_list ap;
	va_start(ap, fmt);
	format(&b, fmt, ap);
	va_end(ap);
	emit(line, b.len, false);
}

/* ---- debug port ---- */

void g_dbg(uint16_t type, uint32_t vcpu, uint64_t a0, uint64_t a1, uint64_t a2, uint64_t a3)
{
	struct ferry_dbg_rec rec = {
		.magic = FERRY_DBG_MAGIC,
		.type = type,
		.vcpu = (uint16_t)vcpu,
		.a = {a0, a1, a2, a3},
	};
	/* Stacks sit below 4 GiB (guest_abi.h), so the 32-bit port value is the full gpa. The
	 * "m" input makes sure the record is in memory, not only in registers, at the out. */
	uint32_t gpa = (uint32_t)(uintptr_t)&rec;
	__asm__ volatile("outl %0, %1"
			 :
			 : "a"(gpa), "Nd"((uint16_t)FERRY_DEBUG_PORT), "m"(rec)
			 : "memory");
}

void g_sleep_ns(uint32_t vcpu, uint64_t ns)
{
	g_dbg(FERRY_DBG_SLEEP, vcpu, ns, 0, 0, 0);
}

/* ---- parameters ---- */

uint64_t g_pack8(const char *s)
{
	uint64_t v = 0;
	for (unsigned i = 0; i < 8 && s[i]; i++)
		v |= (uint64_t)(uint8_t)s[i] << (8 * i);
	return v;
}

void g_param_fail(uint32_t idx, const char *guest, const char *key, uint64_t value,
		  const char *why)
{
	g_printf("%s vcpu %u: bad parameter %s=%lu (%#lx): %s\n", guest, idx, key, value, value,
		 why);
	g_dbg(FERRY_DBG_ERROR, idx, 0, FERRY_ERR_PARAM, g_pack8(key), value);
	g_halt();
}

static bool key_ok(const char *k)
{
	for (unsigned i = 0; i < FERRY_PARAM_KEY_MAX; i++)
		if (!k[i])
			return i > 0;
	return false;
}

void g_start(uint32_t idx, const struct ferry_bootinfo *bi, const char *guest,
	     const char *const *keys)
{
	if (bi->magic != FERRY_BOOTINFO_MAGIC || bi->version != FERRY_BOOTINFO_VERSION)
		g_param_fail(idx, guest, "bootinfo", bi->magic, "bad boot info magic or version");
	if (bi->nr_vcpus == 0 || bi->nr_vcpus > FERRY_FLAT_MAX_VCPUS || idx >= bi->nr_vcpus)
		g_param_fail(idx, guest, "nr_vcpus", bi->nr_vcpus, "vCPU count out of range");
	if (bi->nr_params > FERRY_PARAM_MAX)
		g_param_fail(idx, guest, "nr_params", bi->nr_params, "too many parameters");
	for (uint32_t i = 0; i < bi->nr_params; i++) {
		const char *k = bi->params[i].key;
		if (!key_ok(k))
			g_param_fail(idx, guest, "key", i, "parameter key empty or unterminated");
		bool known = false;
		for (const char *const *p = keys; *p && !known; p++)
			known = streq(k, *p);
		if (!known)
			g_param_fail(idx, guest, k, bi->params[i].value, "unknown parameter");
	}
}

bool g_param(const struct ferry_bootinfo *bi, const char *key, uint64_t *ret)
{
	bool found = false;
	for (uint32_t i = 0; i < bi->nr_params && i < FERRY_PARAM_MAX; i++) {
		if (streq(bi->params[i].key, key)) {
			*ret = bi->params[i].value;
			found = true;
		}
	}
	return found;
}

uint64_t g_param_or(const struct ferry_bootinfo *bi, const char *key, uint64_t def)
{
	uint64_t v;
	return g_param(bi, key, &v) ? v : def;
}

void g_region_init(uint32_t idx, const struct ferry_bootinfo *bi, const char *guest,
		   struct g_region *ret)
{
	uint64_t free = bi->free_start, mem = bi->mem_size;
	if (free < FERRY_FREE_GPA || free % G_PAGE_SIZE || mem <= free)
		g_param_fail(idx, guest, "mem_size", mem, "no free memory above free_start");
	uint64_t per_vcpu = (mem - free) / bi->nr_vcpus / G_PAGE_SIZE * G_PAGE_SIZE;
	uint64_t wss;
	if (!g_param(bi, "wss", &wss)) {
		wss = per_vcpu;
		if (!wss)
			g_param_fail(idx, guest, "mem_size", mem, "less than a page per vCPU");
	} else if (!wss || wss % G_PAGE_SIZE) {
		g_param_fail(idx, guest, "wss", wss, "must be a positive multiple of 4 KiB");
	} else if (wss > per_vcpu) {
		g_printf("%s vcpu %u: %lu bytes free above %#lx for %u vCPUs: wss at most %lu\n",
			 guest, idx, mem - free, free, bi->nr_vcpus, per_vcpu);
		g_param_fail(idx, guest, "wss", wss, "vCPUs x wss exceed the free memory");
	}
	ret->base = free + (uint64_t)idx * wss;
	ret->size = wss;
	ret->pages = wss / G_PAGE_SIZE;
}
