// SPDX-License-Identifier: Apache-2.0
/*
 * Description: the io_uring page reader (transport/pagereader.c) against real memfds: dirty
 * bitmaps coalesce into maximal runs that respect the length cap and never leave their
 * bitmap; random runs over a 64 MiB patterned memfd are delivered page by page exactly once
 * with the right bytes and zero flags, at queue depths 1..1024 and batch sizes 1..1024;
 * many regions at once; bad runs and configurations are refused before any I/O; a consumer
 * that aborts, keeps buffers, or starves the reader gets a clean error with nothing left in
 * flight and a reader that still works; a memfd truncated under the reader is -EIO, not a
 * hang.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>
#include <cmocka.h>

#include "transport/pagereader.h"

#define PAGE PAGEREADER_PAGE_SIZE

static uint64_t mix(uint64_t x)
{
	/* splitmix64 finaliser: cheap, and every input bit moves every output bit */
	x += 0x9e3779b97f4a7c15ull;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

static uint64_t rng_state = 0x1234;

static uint64_t rnd(void)
{
	rng_state = mix(rng_state);
	return rng_state;
}

/*
 * Page p of a region with seed s: 0-1 zero, 2 zero but for its last byte, 3 zero but for
 * one byte in the middle, else a pattern word per 8 bytes.
 */
static unsigned page_kind(uint32_t seed, uint64_t p)
{
	return (unsigned)(mix(((uint64_t)seed << 40) ^ p ^ 0xabcdef) % 10);
}

static void expected_page(uint32_t seed, uint64_t p, uint8_t *out)
{
	unsigned kind = page_kind(seed, p);

	memset(out, 0, PAGE);
	if (kind <= 1)
		return;
	if (kind == 2) {
		out[PAGE - 1] = 0x80;
		return;
	}
	if (kind == 3) {
		out[PAGE / 2 + 3] = 1;
		return;
	}
	uint64_t *w = (uint64_t *)out;
	for (unsigned i = 0; i < PAGE / 8; i++)
		w[i] = mix(((uint64_t)seed << 48) ^ (p << 10) ^ i) | 1;
}

static int make_region(uint32_t seed, uint64_t pages)
{
	int fd = memfd_create("pagereader-test", MFD_CLOEXEC);
	assert_true(fd >= 0);
	assert_int_equal(ftruncate(fd, (off_t)(pages * PAGE)), 0);
	if (!pages)
		return fd;
	uint8_t *m = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	assert_true(m != MAP_FAILED);
	for (uint64_t p = 0; p < pages; p++)
		expected_page(seed, p, m + p * PAGE);
	munmap(m, pages * PAGE);
	return fd;
}

/* What a consumer checks against: the regions' pattern and which pages were asked for. */
struct region_model {
	uint32_t seed;
	uint64_t pages;
	uint8_t *want; /* 1 = page requested */
	uint8_t *seen; /* deliveries */
};

struct check_ctx {
	struct pagereader *r;
	struct region_model *m;
	unsigned nr;
	unsigned batch;
	uint8_t *area;
	size_t area_len;
	unsigned long chunks;
	unsigned long abort_at; /* consume fails with abort_err at this chunk (1-based), 0 = never */
	int abort_err;
	bool try_reenter;
};

static void check_chunk_content(const struct check_ctx *x, const struct page_chunk *c)
{
	static uint8_t want[PAGE];
	unsigned nz = 0;

	for (uint32_t i = 0; i < c->npages; i++) {
		uint64_t p = c->first_page + i;
		expected_page(x->m[c->region].seed, p, want);
		assert_memory_equal(c->data + (size_t)i * PAGE, want, PAGE);
		bool zero = page_kind(x->m[c->region].seed, p) <= 1;
		assert_int_equal(page_chunk_page_is_zero(c, i), zero);
		nz += zero;
	}
	for (uint32_t i = c->npages; i < PAGEREADER_MAX_BATCH_PAGES; i++)
		assert_false(page_chunk_page_is_zero(c, i));
	assert_int_equal(c->nr_zero, nz);
}

static int check_consume(void *arg, const struct page_chunk *c)
{
	struct check_ctx *x = arg;

	x->chunks++;
	if (x->try_reenter) {
		struct page_run run = { .region = 0, .first_page = 0, .npages = 1 };
		assert_int_equal(pagereader_read(x->r, &run, 1, check_consume, x), -EBUSY);
	}
	if (x->abort_at && x->chunks == x->abort_at)
		return x->abort_err;

	assert_true(c->npages >= 1 && c->npages <= x->batch);
	assert_true(c->region < x->nr);
	struct region_model *m = &x->m[c->region];
	assert_true(c->first_page + c->npages <= m->pages);
	size_t buf_len = (size_t)x->batch * PAGE;
	assert_ptr_equal(c->data, x->area + (size_t)c->buffer * buf_len);
	assert_true((uintptr_t)c->data % 4096 == 0);
	assert_true((size_t)(c->data - x->area) + c->npages * PAGE <= x->area_len);
	for (uint32_t i = 0; i < c->npages; i++) {
		uint64_t p = c->first_page + i;
		assert_true(m->want[p]);
		assert_int_equal(m->seen[p], 0);
		m->seen[p] = 1;
	}
	check_chunk_content(x, c);
	return 0;
}

static void ctx_init(struct check_ctx *x, struct pagereader *r, struct region_model *m, unsigned nr)
{
	struct pagereader_config cfg;

	memset(x, 0, sizeof(*x));
	pagereader_get_config(r, &cfg);
	x->r = r;
	x->m = m;
	x->nr = nr;
	x->batch = cfg.batch_pages;
	x->area = pagereader_buffer_area(r, &x->area_len);
}

static void model_clear(struct region_model *m, unsigned nr)
{
	for (unsigned i = 0; i < nr; i++) {
		memset(m[i].want, 0, m[i].pages);
		memset(m[i].seen, 0, m[i].pages);
	}
}

static void model_check_all_seen(const struct region_model *m, unsigned nr)
{
	for (unsigned i = 0; i < nr; i++)
		assert_memory_equal(m[i].seen, m[i].want, m[i].pages);
}

static void assert_idle(const struct pagereader *r)
{
	struct pagereader_stats st;

	pagereader_get_stats(r, &st);
	assert_int_equal(st.inflight, 0);
	assert_int_equal(st.held, 0);
}

/*
 * Random dirty bitmaps per 4096-page chunk of every region (density from empty to full),
 * coalesced with a random cap; returns the run count, runs in *ret (caller frees).
 */
static unsigned random_runs(struct region_model *m, unsigned nr, unsigned cap_pages,
			    struct page_run **ret)
{
	uint64_t total = 0;
	for (unsigned i = 0; i < nr; i++)
		total += m[i].pages;
	struct page_run *runs = calloc(total + 1, sizeof(*runs));
	unsigned n = 0;
	assert_non_null(runs);

	for (unsigned ri = 0; ri < nr; ri++) {
		for (uint64_t base = 0; base < m[ri].pages; base += 4096) {
			uint32_t np = (uint32_t)(m[ri].pages - base < 4096 ? m[ri].pages - base : 4096);
			uint64_t bits[64] = { 0 };
			static const unsigned density[] = { 0, 1, 10, 50, 90, 100 };
			unsigned d = density[rnd() % 6];
			for (uint32_t i = 0; i < np; i++) {
				if (rnd() % 100 < d) {
					bits[i / 64] |= 1ull << (i % 64);
					m[ri].want[base + i] = 1;
				}
			}
			/* Garbage past npages must be ignored. */
			if (np % 64)
				bits[np / 64] |= ~0ull << (np % 64);
			unsigned max_run = rnd() % 3 ? (unsigned)(rnd() % (cap_pages * 2) + 1) : 0;
			unsigned k = pagereader_runs_from_bitmap(ri, base, bits, np, max_run, runs + n,
								 (unsigned)(total - n));
			assert_true(k <= np);
			n += k;
		}
	}
	*ret = runs;
	return n;
}

static void page_is_zero_test(void **state)
{
	(void)state;
	uint8_t *p = aligned_alloc(4096, PAGE);
	assert_non_null(p);
	memset(p, 0, PAGE);
	assert_true(pagereader_page_is_zero(p));
	for (unsigned i = 0; i < PAGE; i++) {
		p[i] = (uint8_t)(1u << (i % 8));
		assert_false(pagereader_page_is_zero(p));
		p[i] = 0;
	}
	assert_true(pagereader_page_is_zero(p));
	free(p);
}

static void runs_basic(void **state)
{
	(void)state;
	uint64_t bits[64] = { 0 };
	struct page_run out[4096];

	/* Empty bitmap. */
	assert_int_equal(pagereader_runs_from_bitmap(3, 8192, bits, 4096, 0, out, 4096), 0);

	/* Adjacent bits across a word boundary are one run. */
	for (unsigned i = 60; i < 70; i++)
		bits[i / 64] |= 1ull << (i % 64);
	bits[0] |= 1; /* page 0 alone */
	bits[63] |= 1ull << 63; /* last page alone */
	assert_int_equal(pagereader_runs_from_bitmap(3, 8192, bits, 4096, 0, out, 4096), 3);
	assert_int_equal(out[0].region, 3);
	assert_true(out[0].first_page == 8192 && out[0].npages == 1);
	assert_true(out[1].first_page == 8192 + 60 && out[1].npages == 10);
	assert_true(out[2].first_page == 8192 + 4095 && out[2].npages == 1);

	/* The last bit is outside a 4095-page bitmap. */
	assert_int_equal(pagereader_runs_from_bitmap(3, 8192, bits, 4095, 0, out, 4096), 2);

	/* All dirty, capped at 64: 64 runs of 64, in order, tiling the chunk. */
	memset(bits, 0xff, sizeof(bits));
	assert_int_equal(pagereader_runs_from_bitmap(0, 0, bits, 4096, 64, out, 4096), 64);
	for (unsigned i = 0; i < 64; i++)
		assert_true(out[i].first_page == i * 64 && out[i].npages == 64);
	/* Uncapped: one run of the whole chunk, never beyond it. */
	assert_int_equal(pagereader_runs_from_bitmap(0, 4096, bits, 4096, 0, out, 4096), 1);
	assert_true(out[0].first_page == 4096 && out[0].npages == 4096);
	/* A cap that doesn't divide: 100 + 100 + ... + 96. */
	assert_int_equal(pagereader_runs_from_bitmap(0, 0, bits, 4096, 100, out, 4096), 41);
	assert_int_equal(out[40].npages, 96);

	/* Truncation: reports the full count, writes only out_cap. */
	memset(out, 0xee, sizeof(out));
	assert_int_equal(pagereader_runs_from_bitmap(0, 0, bits, 4096, 1, out, 5), 4096);
	assert_true(out[4].first_page == 4 && out[4].npages == 1);
	assert_true(out[5].npages == 0xeeeeeeee);

	/* Alternating bits: the worst case without a cap is npages / 2 runs. */
	memset(bits, 0x55, sizeof(bits));
	assert_int_equal(pagereader_runs_from_bitmap(0, 0, bits, 4096, 0, out, 4096), 2048);
}

/* Random bitmaps: runs reproduce the bitmap exactly, are sorted, capped and maximal. */
static void runs_random(void **state)
{
	(void)state;
	struct page_run out[4096];

	for (unsigned iter = 0; iter < 2000; iter++) {
		uint64_t bits[64], back[64] = { 0 };
		uint32_t np = (uint32_t)(rnd() % 4096 + 1);
		unsigned max_run = (unsigned)(rnd() % 5 == 0 ? 0 : rnd() % 300 + 1);
		unsigned d = (unsigned)(rnd() % 101);
		uint64_t first = rnd() % (1ull << 40);

		for (unsigned w = 0; w < 64; w++) {
			bits[w] = 0;
			for (unsigned b = 0; b < 64; b++)
				if (rnd() % 100 < d)
					bits[w] |= 1ull << b;
		}
		unsigned n = pagereader_runs_from_bitmap(7, first, bits, np, max_run, out, 4096);
		assert_true(n <= np);
		for (unsigned i = 0; i < n; i++) {
			assert_int_equal(out[i].region, 7);
			assert_true(out[i].npages >= 1);
			if (max_run)
				assert_true(out[i].npages <= max_run);
			assert_true(out[i].first_page >= first);
			assert_true(out[i].first_page + out[i].npages <= first + np);
			if (i) {
				uint64_t prev_end = out[i - 1].first_page + out[i - 1].npages;
				assert_true(out[i].first_page >= prev_end);
				/* Touching runs only where the cap split them. */
				if (out[i].first_page == prev_end)
					assert_true(max_run && out[i - 1].npages == max_run);
			}
			for (uint32_t k = 0; k < out[i].npages; k++) {
				uint64_t b = out[i].first_page - first + k;
				back[b / 64] |= 1ull << (b % 64);
			}
		}
		for (uint32_t b = 0; b < np; b++)
			assert_int_equal((back[b / 64] >> (b % 64)) & 1, (bits[b / 64] >> (b % 64)) & 1);
	}
}

#define BIG_PAGES ((64u << 20) / PAGE)

struct big {
	int fd;
	struct region_model m;
};

static int big_setup(void **state)
{
	struct big *b = calloc(1, sizeof(*b));
	assert_non_null(b);
	b->m.seed = 0x5eed;
	b->m.pages = BIG_PAGES;
	b->m.want = calloc(BIG_PAGES, 1);
	b->m.seen = calloc(BIG_PAGES, 1);
	assert_true(b->m.want && b->m.seen);
	b->fd = make_region(b->m.seed, BIG_PAGES);
	*state = b;
	return 0;
}

static int big_teardown(void **state)
{
	struct big *b = *state;
	close(b->fd);
	free(b->m.want);
	free(b->m.seen);
	free(b);
	return 0;
}

static void read_random_with(struct big *b, unsigned qd, unsigned batch, unsigned nbufs,
			     unsigned threads)
{
	struct pagereader_config cfg = { .queue_depth = qd, .batch_pages = batch,
					 .nr_buffers = nbufs, .copy_threads = threads };
	uint64_t size = (uint64_t)BIG_PAGES * PAGE;
	struct pagereader *r = NULL;
	struct check_ctx x;

	assert_int_equal(pagereader_new(&cfg, &b->fd, &size, 1, &r), 0);
	pagereader_get_config(r, &cfg); /* zeros became the defaults */
	for (unsigned round = 0; round < 2; round++) {
		struct page_run *runs;

		model_clear(&b->m, 1);
		unsigned n = random_runs(&b->m, 1, cfg.batch_pages, &runs);
		ctx_init(&x, r, &b->m, 1);
		assert_int_equal(pagereader_read(r, runs, n, check_consume, &x), 0);
		model_check_all_seen(&b->m, 1);
		assert_idle(r);
		free(runs);
	}
	struct pagereader_stats st;
	pagereader_get_stats(r, &st);
	assert_true(st.zero_pages > 0 && st.zero_pages < st.pages);
	assert_int_equal(st.short_reads, 0);
	pagereader_free(r);
}

static void read_qd1_batch1(void **state)
{
	read_random_with(*state, 1, 1, 1, 0);
}

static void read_qd1_batch64(void **state)
{
	read_random_with(*state, 1, 64, 0, 0);
}

static void read_qd64_batch8(void **state)
{
	read_random_with(*state, 64, 8, 0, 0);
}

static void read_qd256_batch2(void **state)
{
	read_random_with(*state, 256, 2, 300, 0);
}

static void read_qd1024_batch1(void **state)
{
	read_random_with(*state, 1024, 1, 1024, 0);
}

static void read_qd1_batch1024(void **state)
{
	read_random_with(*state, 1, 1024, 1, 0);
}

/* Forced-async reads on a pool of 3 kernel workers, whose completions may overtake. */
static void read_qd32_batch16_threads3(void **state)
{
	read_random_with(*state, 32, 16, 0, 3);
}

/* The whole file as one run: split into full batches, in order of submission. */
static void read_whole_split(void **state)
{
	struct big *b = *state;
	struct pagereader_config cfg = { .queue_depth = 16, .batch_pages = 64, .nr_buffers = 16 };
	uint64_t size = (uint64_t)BIG_PAGES * PAGE;
	struct pagereader *r = NULL;
	struct check_ctx x;
	struct page_run runs[2] = { { 0, 0, 1000 }, { 0, 1000, BIG_PAGES - 1000 } };

	assert_int_equal(pagereader_new(&cfg, &b->fd, &size, 1, &r), 0);
	model_clear(&b->m, 1);
	memset(b->m.want, 1, BIG_PAGES);
	ctx_init(&x, r, &b->m, 1);
	assert_int_equal(pagereader_read(r, runs, 2, check_consume, &x), 0);
	model_check_all_seen(&b->m, 1);
	/* 1000 = 15 * 64 + 40; the rest is 15384 = 240 * 64 + 24: chunks never span runs. */
	assert_int_equal(x.chunks, 16 + 241);
	pagereader_free(r);
}

static void many_regions(void **state)
{
	(void)state;
	enum { NR = 48 };
	struct region_model m[NR];
	int fds[NR];
	uint64_t sizes[NR];
	struct pagereader_config cfg = { .queue_depth = 16, .batch_pages = 8 };
	struct pagereader *r = NULL;

	for (unsigned i = 0; i < NR; i++) {
		m[i].seed = 1000 + i;
		m[i].pages = i == 5 ? 0 : rnd() % 300 + 1; /* one empty memslot */
		if (i == 7)
			m[i].pages = 4096 + 17; /* more than one bitmap chunk */
		m[i].want = calloc(m[i].pages + 1, 1);
		m[i].seen = calloc(m[i].pages + 1, 1);
		fds[i] = make_region(m[i].seed, m[i].pages);
		sizes[i] = m[i].pages * PAGE;
	}
	assert_int_equal(pagereader_new(&cfg, fds, sizes, NR, &r), 0);
	/* The ring holds its own references to the files. */
	for (unsigned i = 0; i < NR; i++)
		close(fds[i]);

	for (unsigned round = 0; round < 3; round++) {
		struct page_run *runs;
		struct check_ctx x;

		model_clear(m, NR);
		unsigned n = random_runs(m, NR, 8, &runs);
		/* Shuffle: the reader takes runs in any order, regions interleaved. */
		for (unsigned i = n; i > 1; i--) {
			unsigned j = (unsigned)(rnd() % i);
			struct page_run t = runs[i - 1];
			runs[i - 1] = runs[j];
			runs[j] = t;
		}
		ctx_init(&x, r, m, NR);
		assert_int_equal(pagereader_read(r, runs, n, check_consume, &x), 0);
		model_check_all_seen(m, NR);
		free(runs);
	}
	struct page_run bad = { .region = 5, .first_page = 0, .npages = 1 };
	assert_int_equal(pagereader_read(r, &bad, 1, check_consume, NULL), -EINVAL);
	pagereader_free(r);
	for (unsigned i = 0; i < NR; i++) {
		free(m[i].want);
		free(m[i].seen);
	}
}

static int never_consume(void *arg, const struct page_chunk *c)
{
	(void)arg;
	(void)c;
	fail_msg("consume called for a refused read");
	return -1;
}

static void bad_runs(void **state)
{
	(void)state;
	int fds[2] = { make_region(1, 100), make_region(2, 10) };
	uint64_t sizes[2] = { 100 * PAGE, 10 * PAGE };
	struct pagereader *r = NULL;
	static const struct page_run bad[] = {
		{ .region = 2, .first_page = 0, .npages = 1 },	 /* no such region */
		{ .region = 1, .first_page = 9, .npages = 2 },	 /* one page past the end */
		{ .region = 1, .first_page = 10, .npages = 1 },	 /* starts at the end */
		{ .region = 0, .first_page = 5, .npages = 0 },	 /* empty */
		{ .region = 0, .first_page = UINT64_MAX, .npages = 1 }, /* wraps */
		{ .region = 0, .first_page = 1, .npages = UINT32_MAX },
	};

	struct pagereader_config cfg = { .queue_depth = 4, .batch_pages = 4 };
	assert_int_equal(pagereader_new(&cfg, fds, sizes, 2, &r), 0);
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		assert_int_equal(pagereader_read(r, &bad[i], 1, never_consume, NULL), -EINVAL);

	/* One bad run at the end of a good batch: refused whole, before any read. */
	struct page_run mixed[3] = { { 0, 0, 100 }, { 1, 0, 10 }, { 1, 5, 6 } };
	assert_int_equal(pagereader_read(r, mixed, 3, never_consume, NULL), -EINVAL);
	assert_int_equal(pagereader_read(r, NULL, 1, never_consume, NULL), -EINVAL);
	assert_int_equal(pagereader_read(r, mixed, 1, NULL, NULL), -EINVAL);
	struct pagereader_stats st;
	pagereader_get_stats(r, &st);
	assert_int_equal(st.reads, 0);

	/* Nothing to do is fine; the last page of each region is fine. */
	assert_int_equal(pagereader_read(r, NULL, 0, never_consume, NULL), 0);
	struct region_model m[2] = { { 1, 100, calloc(100, 1), calloc(100, 1) },
				     { 2, 10, calloc(10, 1), calloc(10, 1) } };
	struct page_run edge[2] = { { 0, 99, 1 }, { 1, 0, 10 } };
	struct check_ctx x;
	m[0].want[99] = 1;
	memset(m[1].want, 1, 10);
	ctx_init(&x, r, m, 2);
	assert_int_equal(pagereader_read(r, edge, 2, check_consume, &x), 0);
	model_check_all_seen(m, 2);
	for (unsigned i = 0; i < 2; i++) {
		free(m[i].want);
		free(m[i].seen);
	}
	pagereader_free(r);
	close(fds[0]);
	close(fds[1]);
}

static void bad_config(void **state)
{
	(void)state;
	int fd = make_region(1, 16);
	uint64_t size = 16 * PAGE;
	struct pagereader *r = (struct pagereader *)&size; /* must stay untouched on failure */
	static const struct pagereader_config bad[] = {
		{ .queue_depth = 4097 },
		{ .batch_pages = 1025 },
		{ .queue_depth = 8, .nr_buffers = 7 },
		{ .queue_depth = 8, .nr_buffers = 16385 },
		{ .copy_threads = 65 },
	};

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		assert_int_equal(pagereader_new(&bad[i], &fd, &size, 1, &r), -EINVAL);
	uint64_t odd = 16 * PAGE - 512, toobig = 17 * PAGE;
	int badfd = -1;
	assert_int_equal(pagereader_new(NULL, &fd, &odd, 1, &r), -EINVAL);
	assert_int_equal(pagereader_new(NULL, &fd, &toobig, 1, &r), -EINVAL);
	assert_int_equal(pagereader_new(NULL, &badfd, &size, 1, &r), -EINVAL);
	assert_int_equal(pagereader_new(NULL, &fd, &size, 0, &r), -EINVAL);
	assert_ptr_equal(r, (struct pagereader *)&size);

	/*
	 * Zeros take the defaults (64 deep, 64 pages, 2 * depth buffers), tested in two halves
	 * so no reader pins more than 2 MiB: unit tests must pass under an 8 MiB memlock limit.
	 */
	struct pagereader_config cfg = { .batch_pages = 4 };
	assert_int_equal(pagereader_new(&cfg, &fd, &size, 1, &r), 0);
	pagereader_get_config(r, &cfg);
	assert_int_equal(cfg.queue_depth, 64);
	assert_int_equal(cfg.batch_pages, 4);
	assert_int_equal(cfg.nr_buffers, 128);
	size_t len = 0;
	void *area = pagereader_buffer_area(r, &len);
	assert_int_equal(len, 128 * 4 * PAGE);
	assert_true((uintptr_t)area % 4096 == 0);
	pagereader_free(r);
	cfg = (struct pagereader_config){ .queue_depth = 2 };
	assert_int_equal(pagereader_new(&cfg, &fd, &size, 1, &r), 0);
	pagereader_get_config(r, &cfg);
	assert_int_equal(cfg.batch_pages, 64);
	assert_int_equal(cfg.nr_buffers, 4);
	pagereader_free(r);
	pagereader_free(NULL);
	close(fd);
}

/* consume aborting mid-way, at depth 1 and 8: its error, nothing in flight, reusable. */
static void abort_midway(void **state)
{
	struct big *b = *state;
	uint64_t size = (uint64_t)BIG_PAGES * PAGE;
	static const unsigned depths[] = { 1, 8 };

	for (unsigned d = 0; d < 2; d++) {
		struct pagereader_config cfg = { .queue_depth = depths[d], .batch_pages = 4 };
		struct pagereader *r = NULL;
		struct check_ctx x;
		struct page_run run = { .region = 0, .first_page = 100, .npages = 400 };

		assert_int_equal(pagereader_new(&cfg, &b->fd, &size, 1, &r), 0);
		model_clear(&b->m, 1);
		memset(b->m.want + 100, 1, 400);
		ctx_init(&x, r, &b->m, 1);
		x.abort_at = 5;
		x.abort_err = -ECANCELED;
		x.try_reenter = true;
		assert_int_equal(pagereader_read(r, &run, 1, check_consume, &x), -ECANCELED);
		assert_int_equal(x.chunks, 5); /* nothing delivered after the abort */
		assert_idle(r);

		model_clear(&b->m, 1);
		memset(b->m.want + 100, 1, 400);
		ctx_init(&x, r, &b->m, 1);
		assert_int_equal(pagereader_read(r, &run, 1, check_consume, &x), 0);
		assert_int_equal(x.chunks, 100);
		model_check_all_seen(&b->m, 1);
		pagereader_free(r);
	}
}

/* A memfd cut mid-page under the reader: -EIO via a short read then EOF, never a hang. */
static void truncated_file(void **state)
{
	(void)state;
	const uint64_t pages = 1024;
	struct region_model m = { 77, pages, calloc(pages, 1), calloc(pages, 1) };
	int fd = make_region(m.seed, pages);
	uint64_t size = pages * PAGE;
	struct page_run all = { 0, 0, (uint32_t)pages }, head = { 0, 0, 600 };
	static const unsigned depths[] = { 1, 16 };

	for (unsigned d = 0; d < 2; d++) {
		struct pagereader_config cfg = { .queue_depth = depths[d], .batch_pages = 64,
						 .nr_buffers = depths[d] };
		struct pagereader *r = NULL;
		struct pagereader_stats st;
		struct check_ctx x;

		assert_int_equal(ftruncate(fd, (off_t)size), 0);
		/* Refill what a previous truncation dropped. */
		for (uint64_t p = 600; p < pages; p++) {
			uint8_t pg[PAGE];
			expected_page(m.seed, p, pg);
			assert_int_equal(pwrite(fd, pg, PAGE, (off_t)(p * PAGE)), PAGE);
		}
		assert_int_equal(pagereader_new(&cfg, &fd, &size, 1, &r), 0);
		assert_int_equal(ftruncate(fd, 600 * PAGE + 100), 0);

		model_clear(&m, 1);
		memset(m.want, 1, pages);
		ctx_init(&x, r, &m, 1);
		assert_int_equal(pagereader_read(r, &all, 1, check_consume, &x), -EIO);
		assert_idle(r);
		pagereader_get_stats(r, &st);
		if (depths[d] == 1) {
			/* In order: 9 full chunks, then 576..639 comes back short, then EOF. */
			assert_int_equal(x.chunks, 9);
			assert_int_equal(st.short_reads, 1);
		}
		/* What is still inside the file reads fine. */
		model_clear(&m, 1);
		memset(m.want, 1, 600);
		ctx_init(&x, r, &m, 1);
		assert_int_equal(pagereader_read(r, &head, 1, check_consume, &x), 0);
		model_check_all_seen(&m, 1);
		pagereader_free(r);
	}
	close(fd);
	free(m.want);
	free(m.seen);
}

/* An async consumer that keeps every buffer and releases the oldest ones late. */
struct keep_ctx {
	struct check_ctx x;
	const struct page_chunk *held[PAGEREADER_MAX_BUFFERS];
	unsigned nheld;
	unsigned keep_max;   /* release down to this many in consume; 0 = never release */
	unsigned reclaims;
	int reclaim_ret;
	bool reclaim_frees;
};

static void release_oldest(struct keep_ctx *k)
{
	const struct page_chunk *c = k->held[0];

	/* The bytes must not have moved while we held them. */
	check_chunk_content(&k->x, c);
	assert_int_equal(pagereader_release(k->x.r, c->buffer), 0);
	memmove(k->held, k->held + 1, --k->nheld * sizeof(k->held[0]));
}

static int keep_consume(void *arg, const struct page_chunk *c)
{
	struct keep_ctx *k = arg;
	int ret = check_consume(&k->x, c);

	if (ret < 0)
		return ret;
	k->held[k->nheld++] = c;
	while (k->keep_max && k->nheld > k->keep_max)
		release_oldest(k);
	return PAGEREADER_KEEP;
}

static int keep_reclaim(void *arg)
{
	struct keep_ctx *k = arg;

	k->reclaims++;
	if (k->reclaim_ret < 0)
		return k->reclaim_ret;
	while (k->reclaim_frees && k->nheld)
		release_oldest(k);
	return 0;
}

static void async_keep(void **state)
{
	struct big *b = *state;
	uint64_t size = (uint64_t)BIG_PAGES * PAGE;
	struct pagereader_config cfg = { .queue_depth = 8, .batch_pages = 16, .nr_buffers = 24 };
	struct pagereader *r = NULL;
	struct keep_ctx *k = calloc(1, sizeof(*k));
	struct pagereader_sink sink = { keep_consume, keep_reclaim, k };
	struct page_run *runs;
	struct pagereader_stats st;

	assert_non_null(k);
	assert_int_equal(pagereader_new(&cfg, &b->fd, &size, 1, &r), 0);

	/* Releasing inside consume, and in reclaim when all 24 are held. */
	static const unsigned keep[] = { 20, 0 };
	for (unsigned i = 0; i < 2; i++) {
		model_clear(&b->m, 1);
		unsigned n = random_runs(&b->m, 1, 16, &runs);
		memset(k, 0, sizeof(*k));
		ctx_init(&k->x, r, &b->m, 1);
		k->keep_max = keep[i];
		k->reclaim_frees = true;
		assert_int_equal(pagereader_read_async(r, runs, n, &sink), 0);
		if (!keep[i])
			assert_true(k->reclaims > 0);
		pagereader_get_stats(r, &st);
		assert_int_equal(st.inflight, 0);
		assert_int_equal(st.held, k->nheld);
		while (k->nheld)
			release_oldest(k);
		assert_idle(r);
		model_check_all_seen(&b->m, 1);
		free(runs);
	}

	/* Starved without reclaim: -ENOBUFS with every buffer held, none in flight. */
	struct pagereader_sink bare = { keep_consume, NULL, k };
	struct page_run run = { 0, 0, 64 * 16 };
	model_clear(&b->m, 1);
	memset(b->m.want, 1, 64 * 16);
	memset(k, 0, sizeof(*k));
	ctx_init(&k->x, r, &b->m, 1);
	assert_int_equal(pagereader_read_async(r, &run, 1, &bare), -ENOBUFS);
	pagereader_get_stats(r, &st);
	assert_int_equal(st.inflight, 0);
	assert_int_equal(st.held, 24);
	assert_int_equal(k->nheld, 24);
	/* Held buffers block nothing but themselves: release is strict. */
	assert_int_equal(pagereader_release(r, 24), -EINVAL);
	while (k->nheld)
		release_oldest(k);
	assert_int_equal(pagereader_release(r, 0), -EINVAL);

	/* A reclaim that frees nothing is -ENOBUFS; one that fails gives its error. */
	memset(k, 0, sizeof(*k));
	ctx_init(&k->x, r, &b->m, 1);
	model_clear(&b->m, 1);
	memset(b->m.want, 1, 64 * 16);
	assert_int_equal(pagereader_read_async(r, &run, 1, &sink), -ENOBUFS);
	assert_int_equal(k->reclaims, 1);
	while (k->nheld)
		release_oldest(k);
	memset(k, 0, sizeof(*k));
	ctx_init(&k->x, r, &b->m, 1);
	model_clear(&b->m, 1);
	memset(b->m.want, 1, 64 * 16);
	k->reclaim_ret = -EPIPE;
	assert_int_equal(pagereader_read_async(r, &run, 1, &sink), -EPIPE);
	while (k->nheld)
		release_oldest(k);
	assert_idle(r);

	/* And the plain reader still works after all that. */
	struct check_ctx x;
	model_clear(&b->m, 1);
	memset(b->m.want, 1, 64 * 16);
	ctx_init(&x, r, &b->m, 1);
	assert_int_equal(pagereader_read(r, &run, 1, check_consume, &x), 0);
	model_check_all_seen(&b->m, 1);
	pagereader_free(r);
	free(k);
}

/*
 * The buffer pool: pagereader_pool_fill readies areas of one configuration; a reader of
 * that configuration takes one (the pool shrinks by an area) and gives it back on free,
 * where it is read correctly again by the next; another configuration maps its own; a
 * drained pool keeps nothing.
 */
static void pool(void **state)
{
	struct big *b = *state;
	struct pagereader_config cfg = {.queue_depth = 4, .batch_pages = 16};
	const size_t area = 2 * 4 * 16 * PAGE; /* nr_buffers defaults to 2 * queue_depth */
	uint64_t size = (uint64_t)BIG_PAGES * PAGE;
	pagereader_pool_drain();
	assert_int_equal(pagereader_pool_bytes(), 0);
	assert_int_equal(pagereader_pool_fill(&cfg, 2), 2);
	assert_int_equal(pagereader_pool_bytes(), 2 * area);
	assert_int_equal(pagereader_pool_fill(&cfg, 2), 2); /* already there: nothing made */
	assert_int_equal(pagereader_pool_bytes(), 2 * area);
	struct pagereader_config bad = {.queue_depth = 8, .nr_buffers = 4};
	assert_int_equal(pagereader_pool_fill(&bad, 1), -EINVAL);
	assert_int_equal(pagereader_pool_fill(&cfg, 65), -EINVAL);

	for (int round = 0; round < 2; round++) {
		struct pagereader *r = NULL;
		assert_int_equal(pagereader_new(&cfg, &b->fd, &size, 1, &r), 0);
		assert_int_equal(pagereader_pool_bytes(), area);
		struct page_run run = {.region = 0, .first_page = 7, .npages = 200};
		struct check_ctx x;
		model_clear(&b->m, 1);
		memset(b->m.want + 7, 1, 200);
		ctx_init(&x, r, &b->m, 1);
		assert_int_equal(pagereader_read(r, &run, 1, check_consume, &x), 0);
		model_check_all_seen(&b->m, 1);
		assert_idle(r);
		pagereader_free(r);
		assert_int_equal(pagereader_pool_bytes(), 2 * area);
	}
	/* Another size maps its own area and does not stay (the pool keeps 2 areas' bytes). */
	struct pagereader_config other = {.queue_depth = 4, .batch_pages = 8};
	struct pagereader *r = NULL;
	assert_int_equal(pagereader_new(&other, &b->fd, &size, 1, &r), 0);
	assert_int_equal(pagereader_pool_bytes(), 2 * area);
	pagereader_free(r);
	assert_int_equal(pagereader_pool_bytes(), 2 * area);
	pagereader_pool_drain();
	assert_int_equal(pagereader_pool_bytes(), 0);
	assert_int_equal(pagereader_new(&cfg, &b->fd, &size, 1, &r), 0);
	pagereader_free(r); /* nothing kept after a drain */
	assert_int_equal(pagereader_pool_bytes(), 0);
}

int main(void)
{
	/* A hang is a failure: SIGALRM kills the binary and ctest reports it. */
	alarm(240);
	/* Registered buffers are pinned; let a non-root run use its whole memlock allowance. */
	struct rlimit rl;
	if (getrlimit(RLIMIT_MEMLOCK, &rl) == 0) {
		rl.rlim_cur = rl.rlim_max;
		(void)setrlimit(RLIMIT_MEMLOCK, &rl);
	}

	const struct CMUnitTest tests[] = {
		cmocka_unit_test(page_is_zero_test),
		cmocka_unit_test(runs_basic),
		cmocka_unit_test(runs_random),
		cmocka_unit_test(bad_runs),
		cmocka_unit_test(bad_config),
		cmocka_unit_test(many_regions),
		cmocka_unit_test(truncated_file),
		cmocka_unit_test_setup_teardown(read_qd1_batch1, big_setup, big_teardown),
		cmocka_unit_test_setup_teardown(read_qd1_batch64, big_setup, big_teardown),
		cmocka_unit_test_setup_teardown(read_qd64_batch8, big_setup, big_teardown),
		cmocka_unit_test_setup_teardown(read_qd256_batch2, big_setup, big_teardown),
		cmocka_unit_test_setup_teardown(read_qd1024_batch1, big_setup, big_teardown),
		cmocka_unit_test_setup_teardown(read_qd1_batch1024, big_setup, big_teardown),
		cmocka_unit_test_setup_teardown(read_qd32_batch16_threads3, big_setup, big_teardown),
		cmocka_unit_test_setup_teardown(read_whole_split, big_setup, big_teardown),
		cmocka_unit_test_setup_teardown(abort_midway, big_setup, big_teardown),
		cmocka_unit_test_setup_teardown(async_keep, big_setup, big_teardown),
		cmocka_unit_test_setup_teardown(pool, big_setup, big_teardown),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
