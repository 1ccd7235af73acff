// SPDX-License-Identifier: Apache-2.0
/*
 * memcheck: the self-verifying oracle for migration correctness. Every page of a vCPU's
 * region carries a struct ferry_memcheck_hdr (page number, generation, checksum, writer)
 * followed by a pattern derived from (page, generation). Pass 1 writes every page with
 * generation 1; pass g > 1 first verifies each page — right page number (catches pages
 * delivered to the wrong address), generation g-1 (catches a page the migration never sent
 * after its last write, or sent twice out of order), checksum (catches torn or corrupted
 * pages) — then rewrites it with generation g. A page can only pass if the destination holds
 * exactly the last version the guest wrote, so a migration that loses one dirty page shows
 * up within two passes.
 *
 * The pass counter is a local: it lives in registers and on the stack, which migrate with
 * the vCPU, so the oracle does not trust guest RAM to tell it what it expects of guest RAM.
 *
 * Parameters: wss. Reports: READY at start; ERROR per bad page (a0 = gpa, a1 = kind,
 * a2 = expected, a3 = found; at most REPORT_MAX per vCPU, the rest are counted and summed
 * up on the console); PROGRESS after each pass (a0 = passes completed, a1 = pages written).
 */
#include "guestlib.h"

#define NAME "memcheck"
#define REPORT_MAX 16u
#define HDR_WORDS (sizeof(struct ferry_memcheck_hdr) / sizeof(uint64_t))

static const char *const keys[] = {"wss", NULL};

/* Odd multipliers: multiplying by them is a bijection mod 2^64, see csum_step(). */
#define K_CSUM 0x9fb21c651e98df25ull
#define K_WORD 0xd6e8feb86659fd93ull
#define K_GEN 0xc2b2ae3d27d4eb4full

/*
 * One checksum step, h' = (h + w) * K. Since K is odd, a change of any single word changes
 * the final sum with certainty (the difference is multiplied by K^n, never 0 mod 2^64), and
 * the running product makes the sum depend on word positions, so swapped words are caught.
 * One multiply per word keeps a 4 KiB page at well under a microsecond.
 */
static inline uint64_t csum_step(uint64_t h, uint64_t w)
{
	return (h + w) * K_CSUM;
}

static inline uint64_t csum_head(uint64_t page, uint64_t gen, uint64_t vcpu)
{
	uint64_t h = 0x6d656d636865636bull; /* "memcheck" */
	h = csum_step(h, page);
	h = csum_step(h, gen);
	return csum_step(h, vcpu);
}

/* Checksum of a page as it is: header fields page/gen/vcpu and the pattern words. */
static uint64_t page_csum(const uint64_t *w)
{
	uint64_t h = csum_head(w[0], w[1], w[3]);
	for (unsigned i = HDR_WORDS; i < G_PAGE_WORDS; i++)
		h = csum_step(h, w[i]);
	return g_mix64(h);
}

/* Writes the page's pattern and header for generation gen. */
static void page_fill(uint64_t *w, uint64_t page, uint64_t gen, uint64_t vcpu)
{
	uint64_t base = g_mix64(page ^ (gen * K_GEN));
	uint64_t h = csum_head(page, gen, vcpu);
	for (unsigned i = HDR_WORDS; i < G_PAGE_WORDS; i++) {
		uint64_t v = base + i * K_WORD;
		w[i] = v;
		h = csum_step(h, v);
	}
	w[0] = page;
	w[1] = gen;
	w[2] = g_mix64(h);
	w[3] = vcpu;
}

struct checker {
	uint32_t idx;
	uint64_t pass;
	uint64_t errors;    /* in this pass */
	uint64_t reported;  /* ever, capped at REPORT_MAX */
};

static void bad_page(struct checker *c, uint64_t gpa, uint32_t kind, uint64_t expected,
		     uint64_t found)
{
	static const char *const kind_names[] = {"?", "page number", "generation", "checksum"};
	c->errors++;
	if (c->reported >= REPORT_MAX)
		return;
	c->reported++;
	g_dbg(FERRY_DBG_ERROR, c->idx, gpa, kind, expected, found);
	g_printf("%s vcpu %u: pass %lu: bad %s at %#lx: expected %#lx, found %#lx\n", NAME, c->idx,
		 c->pass, kind_names[kind <= 3 ? kind : 0], gpa, expected, found);
}

/* Checks the page against what pass c->pass - 1 wrote; reports the first thing wrong. */
static void page_verify(struct checker *c, const uint64_t *w, uint64_t gpa)
{
	uint64_t page = gpa >> G_PAGE_SHIFT;
	if (w[0] != page) {
		bad_page(c, gpa, FERRY_ERR_PAGENO, page, w[0]);
	} else if (w[1] != c->pass - 1) {
		bad_page(c, gpa, FERRY_ERR_GEN, c->pass - 1, w[1]);
	} else {
		uint64_t sum = page_csum(w);
		if (sum != w[2])
			bad_page(c, gpa, FERRY_ERR_CSUM, w[2], sum);
	}
}

void guest_main(uint32_t idx, struct ferry_bootinfo *bi)
{
	struct g_region reg;
	g_start(idx, bi, NAME, keys);
	g_region_init(idx, bi, NAME, &reg);

	g_printf("%s vcpu %u: %lu KiB at %#lx\n", NAME, idx, reg.size >> 10, reg.base);
	g_dbg(FERRY_DBG_READY, idx, reg.base, reg.size, 0, 0);

	struct checker c = {.idx = idx};
	uint64_t written = 0, total_errors = 0;
	for (c.pass = 1;; c.pass++) {
		c.errors = 0;
		uint64_t reported_before = c.reported;
		for (uint64_t gpa = reg.base; gpa < reg.base + reg.size; gpa += G_PAGE_SIZE) {
			uint64_t *w = (uint64_t *)(uintptr_t)gpa;
			if (c.pass > 1)
				page_verify(&c, w, gpa);
			page_fill(w, gpa >> G_PAGE_SHIFT, c.pass, idx);
		}
		written += reg.pages;
		total_errors += c.errors;
		if (c.errors > c.reported - reported_before)
			g_printf("%s vcpu %u: pass %lu: %lu bad pages (%lu not reported), %lu in all\n",
				 NAME, idx, c.pass, c.errors, c.errors - (c.reported - reported_before),
				 total_errors);
		/* The out instruction's memory clobber also makes the next pass re-read RAM
		 * rather than trust anything the compiler kept from this one. */
		g_dbg(FERRY_DBG_PROGRESS, idx, c.pass, written, 0, 0);
	}
}
