// SPDX-License-Identifier: Apache-2.0
/*
 * memcheck: the self-verifying oracle for migration correctness. Every page of a vCPU's
 * region carries a struct ferry_memcheck_hdr (page number, generation, checksum, writer)
 * followed by a body: one word derived from (page, generation), repeated to the end of the
 * page. Pass 1 writes every page with generation 1; pass g > 1 first verifies each page —
 * right page number (catches pages delivered to the wrong address), generation g-1 (catches
 * a page the migration never sent after its last write, or sent twice out of order),
 * checksum (catches torn or corrupted pages) — then rewrites it with generation g. A page
 * can only pass if the destination holds exactly the last version the guest wrote, so a
 * migration that loses one dirty page shows up within two passes.
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
#define K_GEN 0xc2b2ae3d27d4eb4full
#define BODY_WORDS (G_PAGE_WORDS - HDR_WORDS)

/*
 * One checksum step, h' = (h + w) * K. Since K is odd, a change of any single word changes
 * the final sum with certainty (the difference is multiplied by K^n, never 0 mod 2^64), and
 * the running product makes the sum depend on word positions.
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

/* Checksum of a page as it is: header fields page/gen/vcpu and every body word. The slow,
 * general form, used to say what a damaged page sums to. */
static uint64_t page_csum(const uint64_t *w)
{
	uint64_t h = csum_head(w[0], w[1], w[3]);
	for (unsigned i = HDR_WORDS; i < G_PAGE_WORDS; i++)
		h = csum_step(h, w[i]);
	return g_mix64(h);
}

/*
 * The body of a page is one word derived from (page, gen) repeated. That is as strong as a
 * varying pattern for what the oracle must catch — a torn page mixes two generations' words,
 * a flipped bit breaks equality, a misplaced page has the wrong header — and it lets the
 * guest fill and check a page with single rep stosq / repe scasq instructions, which matters
 * where guest code runs emulated (nested setups without hardware support run it at a few
 * million instructions per second; rep string instructions are ~8x faster per page there).
 */
static inline uint64_t body_word(uint64_t page, uint64_t gen)
{
	return g_mix64(page ^ (gen * K_GEN));
}

/*
 * For a constant body v, the n = BODY_WORDS checksum steps collapse to
 * h_n = h_0 * K^n + v * (K + K^2 + ... + K^n); kn and sum are computed once at start.
 */
struct csum_consts {
	uint64_t kn;
	uint64_t sum;
};

static void csum_consts_init(struct csum_consts *c)
{
	uint64_t p = 1, s = 0;
	for (unsigned i = 0; i < BODY_WORDS; i++) {
		p *= K_CSUM;
		s += p;
	}
	c->kn = p;
	c->sum = s;
}

static inline uint64_t csum_fast(const struct csum_consts *c, uint64_t page, uint64_t gen,
				 uint64_t vcpu, uint64_t v)
{
	return g_mix64(csum_head(page, gen, vcpu) * c->kn + v * c->sum);
}

static inline void fill_words(uint64_t *w, uint64_t n, uint64_t v)
{
	__asm__ volatile("rep stosq" : "+D"(w), "+c"(n) : "a"(v) : "memory");
}

/* True when all n (> 0) words equal v. */
static inline bool all_words(const uint64_t *w, uint64_t n, uint64_t v)
{
	bool eq;
	__asm__ volatile("repe scasq" : "+D"(w), "+c"(n), "=@ccz"(eq) : "a"(v) : "memory");
	return eq;
}

static void page_fill(const struct csum_consts *c, uint64_t *w, uint64_t page, uint64_t gen,
		      uint64_t vcpu)
{
	uint64_t v = body_word(page, gen);
	fill_words(w + HDR_WORDS, BODY_WORDS, v);
	w[0] = page;
	w[1] = gen;
	w[2] = csum_fast(c, page, gen, vcpu, v);
	w[3] = vcpu;
}

struct checker {
	const struct csum_consts *consts;
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

/*
 * Checks the page against what pass c->pass - 1 wrote; reports the first thing wrong. For
 * checksum errors, expected is the checksum the header carries and found is what the page
 * as it is sums to.
 */
static void page_verify(struct checker *c, const uint64_t *w, uint64_t gpa)
{
	uint64_t page = gpa >> G_PAGE_SHIFT, gen = c->pass - 1;
	if (w[0] != page) {
		bad_page(c, gpa, FERRY_ERR_PAGENO, page, w[0]);
	} else if (w[1] != gen) {
		bad_page(c, gpa, FERRY_ERR_GEN, gen, w[1]);
	} else {
		uint64_t v = body_word(page, gen);
		uint64_t sum = all_words(w + HDR_WORDS, BODY_WORDS, v)
				       ? csum_fast(c->consts, page, gen, w[3], v)
				       : page_csum(w);
		if (sum != w[2])
			bad_page(c, gpa, FERRY_ERR_CSUM, w[2], sum);
	}
}

/* The fast and the general checksum must agree, or every page would look torn (or worse,
 * the error reports would lie). Checked once on a page built on the stack. */
static bool csum_selftest(const struct csum_consts *c)
{
	uint64_t w[G_PAGE_WORDS];
	page_fill(c, w, 0x12345, 7, 3);
	return page_csum(w) == w[2];
}

void guest_main(uint32_t idx, struct ferry_bootinfo *bi)
{
	struct g_region reg;
	g_start(idx, bi, NAME, keys);
	g_region_init(idx, bi, NAME, &reg);

	struct csum_consts consts;
	csum_consts_init(&consts);
	if (!csum_selftest(&consts))
		g_param_fail(idx, NAME, "selftest", 0, "closed-form checksum disagrees");

	g_printf("%s vcpu %u: %lu KiB at %#lx\n", NAME, idx, reg.size >> 10, reg.base);
	g_dbg(FERRY_DBG_READY, idx, reg.base, reg.size, 0, 0);

	struct checker c = {.consts = &consts, .idx = idx};
	uint64_t written = 0, total_errors = 0;
	for (c.pass = 1;; c.pass++) {
		c.errors = 0;
		uint64_t reported_before = c.reported;
		for (uint64_t gpa = reg.base; gpa < reg.base + reg.size; gpa += G_PAGE_SIZE) {
			uint64_t *w = (uint64_t *)(uintptr_t)gpa;
			if (c.pass > 1)
				page_verify(&c, w, gpa);
			page_fill(&consts, w, gpa >> G_PAGE_SHIFT, c.pass, idx);
		}
		written += reg.pages;
		total_errors += c.errors;
		uint64_t silent = c.errors - (c.reported - reported_before);
		if (silent)
			g_printf("%s vcpu %u: pass %lu: %lu bad pages (%lu silent), %lu in all\n",
				 NAME, idx, c.pass, c.errors, silent, total_errors);
		/* The out instruction's memory clobber also makes the next pass re-read RAM
		 * rather than trust anything the compiler kept from this one. */
		g_dbg(FERRY_DBG_PROGRESS, idx, c.pass, written, 0, 0);
	}
}
