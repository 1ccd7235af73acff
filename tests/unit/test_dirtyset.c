// SPDX-License-Identifier: Apache-2.0
/*
 * Description: the tracker's dirty set without KVM — setting, testing, counting and taking
 * chunks (bounds, the short last word and chunk, the summary skipping clean chunks), the
 * helpers the backends use (OR a word, put a chunk back, set/clear all), and the concurrency
 * contract: with several threads setting bits while others take chunks, every bit set is
 * taken exactly once, none lost and none invented.
 */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "tracker/dirtyset.h"

static struct dirtyset *ds_new(uint64_t npages)
{
	struct dirtyset *ds = NULL;
	assert_int_equal(dirtyset_new(npages, &ds), 0);
	assert_non_null(ds);
	return ds;
}

/* Takes every chunk; returns the total bits taken, checking each chunk's shape. */
static uint64_t take_all(struct dirtyset *ds, uint8_t *seen)
{
	uint64_t bits[TRACKER_CHUNK_WORDS], chunk = 0, total = 0, last = 0;
	bool first = true;
	unsigned n;

	while ((n = dirtyset_take_next(ds, &chunk, bits)) > 0) {
		if (!first)
			assert_true(chunk > last); /* ascending, each chunk once per pass */
		first = false;
		last = chunk;
		unsigned pop = 0;
		for (unsigned w = 0; w < TRACKER_CHUNK_WORDS; w++) {
			pop += (unsigned)__builtin_popcountll(bits[w]);
			for (uint64_t v = bits[w]; v; v &= v - 1) {
				uint64_t page = chunk * TRACKER_CHUNK_PAGES + w * 64 +
						(uint64_t)__builtin_ctzll(v);
				assert_true(page < dirtyset_npages(ds));
				if (seen && seen[page] < UINT8_MAX)
					seen[page]++;
			}
		}
		assert_int_equal(pop, n);
		total += n;
		chunk++;
	}
	return total;
}

static void test_new_rejects_empty(void **state)
{
	(void)state;
	struct dirtyset *ds = (struct dirtyset *)0x1;
	assert_int_equal(dirtyset_new(0, &ds), -EINVAL);
	assert_ptr_equal(ds, (struct dirtyset *)0x1); /* untouched on failure */
	dirtyset_free(NULL);                          /* NULL-safe */
}

static void test_set_test_count(void **state)
{
	(void)state;
	/* Not a multiple of 64 nor of a chunk: exercises both tails. */
	const uint64_t npages = 3 * TRACKER_CHUNK_PAGES + 100;
	struct dirtyset *ds = ds_new(npages);

	assert_int_equal(dirtyset_nchunks(ds), 4);
	assert_int_equal(dirtyset_count(ds), 0);
	assert_true(dirtyset_set(ds, 0));
	assert_false(dirtyset_set(ds, 0)); /* already set */
	assert_true(dirtyset_set(ds, 63));
	assert_true(dirtyset_set(ds, 64));
	assert_true(dirtyset_set(ds, npages - 1));
	assert_false(dirtyset_set(ds, npages));     /* out of range: ignored */
	assert_false(dirtyset_set(ds, UINT64_MAX)); /* out of range: ignored */
	assert_true(dirtyset_test(ds, 0));
	assert_true(dirtyset_test(ds, 63));
	assert_true(dirtyset_test(ds, 64));
	assert_false(dirtyset_test(ds, 65));
	assert_true(dirtyset_test(ds, npages - 1));
	assert_false(dirtyset_test(ds, npages));
	assert_int_equal(dirtyset_count(ds), 4);
	dirtyset_free(ds);
}

static void test_take_chunks(void **state)
{
	(void)state;
	const uint64_t npages = 10 * TRACKER_CHUNK_PAGES + 7;
	struct dirtyset *ds = ds_new(npages);
	uint64_t bits[TRACKER_CHUNK_WORDS], chunk;

	/* Pages in chunks 2, 5 (two of them) and the short last chunk 10. */
	dirtyset_set(ds, 2 * TRACKER_CHUNK_PAGES + 5);
	dirtyset_set(ds, 5 * TRACKER_CHUNK_PAGES);
	dirtyset_set(ds, 5 * TRACKER_CHUNK_PAGES + TRACKER_CHUNK_PAGES - 1);
	dirtyset_set(ds, npages - 1);

	chunk = 0;
	assert_int_equal(dirtyset_take_next(ds, &chunk, bits), 1);
	assert_int_equal(chunk, 2);
	assert_int_equal(bits[0], 1ull << 5);
	for (unsigned w = 1; w < TRACKER_CHUNK_WORDS; w++)
		assert_int_equal(bits[w], 0);

	/* Starting past chunk 5 skips it; it stays in the set. */
	chunk = 6;
	assert_int_equal(dirtyset_take_next(ds, &chunk, bits), 1);
	assert_int_equal(chunk, 10);
	assert_int_equal(bits[0], 1ull << 6);
	assert_int_equal(dirtyset_count(ds), 2);

	chunk = 11;
	assert_int_equal(dirtyset_take_next(ds, &chunk, bits), 0);
	assert_int_equal(chunk, 11); /* untouched when nothing is left */

	chunk = 0;
	assert_int_equal(dirtyset_take_next(ds, &chunk, bits), 2);
	assert_int_equal(chunk, 5);
	assert_int_equal(bits[0], 1);
	assert_int_equal(bits[TRACKER_CHUNK_WORDS - 1], 1ull << 63);

	/* Taken means gone. */
	chunk = 0;
	assert_int_equal(dirtyset_take_next(ds, &chunk, bits), 0);
	assert_int_equal(dirtyset_count(ds), 0);
	assert_false(dirtyset_test(ds, 5 * TRACKER_CHUNK_PAGES));
	dirtyset_free(ds);
}

static void test_set_all_clear_all(void **state)
{
	(void)state;
	const uint64_t sizes[] = {1, 63, 64, 65, TRACKER_CHUNK_PAGES, TRACKER_CHUNK_PAGES + 1,
				  70 * TRACKER_CHUNK_PAGES - 3};

	for (unsigned i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
		uint64_t npages = sizes[i];
		struct dirtyset *ds = ds_new(npages);
		uint8_t *seen = calloc(npages, 1);
		assert_non_null(seen);

		dirtyset_set_all(ds);
		assert_int_equal(dirtyset_count(ds), npages);
		/* Every page exactly once; nothing past the end (take_all checks). */
		assert_int_equal(take_all(ds, seen), npages);
		for (uint64_t p = 0; p < npages; p++)
			assert_int_equal(seen[p], 1);
		assert_int_equal(take_all(ds, NULL), 0);

		dirtyset_set_all(ds);
		dirtyset_clear_all(ds);
		assert_int_equal(dirtyset_count(ds), 0);
		assert_int_equal(take_all(ds, NULL), 0);
		/* Usable after a clear. */
		dirtyset_set(ds, npages - 1);
		assert_int_equal(take_all(ds, NULL), 1);

		free(seen);
		dirtyset_free(ds);
	}
}

static void test_or_word_and_chunk(void **state)
{
	(void)state;
	const uint64_t npages = TRACKER_CHUNK_PAGES + 70; /* last word holds 6 pages */
	struct dirtyset *ds = ds_new(npages);
	uint64_t bits[TRACKER_CHUNK_WORDS], chunk;

	dirtyset_or_word(ds, 3, 0xf0f0);
	assert_int_equal(dirtyset_count(ds), 8);
	dirtyset_or_word(ds, (npages - 1) / 64, ~0ull); /* masked to the 6 real pages */
	assert_int_equal(dirtyset_count(ds), 14);
	dirtyset_or_word(ds, 1000, ~0ull); /* past the end: ignored */
	assert_int_equal(dirtyset_count(ds), 14);

	chunk = 0;
	assert_int_equal(dirtyset_take_next(ds, &chunk, bits), 8);
	assert_int_equal(chunk, 0);
	assert_int_equal(bits[3], 0xf0f0);
	/* Put it back, as the tracker does when re-protection fails. */
	dirtyset_or_chunk(ds, 0, bits);
	assert_int_equal(dirtyset_count(ds), 14);
	assert_true(dirtyset_test(ds, 3 * 64 + 4));

	chunk = 1;
	assert_int_equal(dirtyset_take_next(ds, &chunk, bits), 6);
	assert_int_equal(bits[1], 0x3f);
	/* Putting back bits past the end must not invent pages. */
	bits[1] = ~0ull;
	bits[2] = ~0ull;
	dirtyset_or_chunk(ds, 1, bits);
	assert_int_equal(dirtyset_count(ds), 14);
	dirtyset_free(ds);
}

/* ---- concurrency ---- */

#define CONC_PAGES (1u << 21) /* 8 GiB of guest: 256 KiB bitmap, 512 chunks */
#define CONC_SETTERS 3u
#define CONC_TAKERS 2u

struct conc {
	struct dirtyset *ds;
	_Atomic uint8_t *seen; /* per page: how often it was taken */
	_Atomic unsigned setters_left;
	_Atomic uint64_t taken;
	_Atomic uint64_t not_new; /* sets that found their bit already set: must stay 0 */
	_Atomic uint64_t taken_live; /* what takers saw before the setters finished */
};

struct setter_arg {
	struct conc *c;
	unsigned id;
};

static void *setter(void *p)
{
	struct setter_arg *a = p;
	struct conc *c = a->c;
	/*
	 * Setter id owns pages with page % CONC_SETTERS == id, so every word is shared by all
	 * setters; it visits them in a scrambled order (an odd multiplier is a permutation mod
	 * 2^k) so chunks are hit over and over while takers empty them.
	 */
	const uint64_t mul = 2654435761u;
	for (uint64_t i = 0; i < CONC_PAGES; i++) {
		uint64_t page = (i * mul) & (CONC_PAGES - 1);
		/* No cmocka asserts off the main thread: count, check after the join. */
		if (page % CONC_SETTERS == a->id && !dirtyset_set(c->ds, page))
			atomic_fetch_add(&c->not_new, 1);
	}
	atomic_fetch_sub(&c->setters_left, 1);
	return NULL;
}

static void take_pass(struct conc *c)
{
	uint64_t bits[TRACKER_CHUNK_WORDS], chunk = 0;
	unsigned n;

	while ((n = dirtyset_take_next(c->ds, &chunk, bits)) > 0) {
		for (unsigned w = 0; w < TRACKER_CHUNK_WORDS; w++)
			for (uint64_t v = bits[w]; v; v &= v - 1)
				atomic_fetch_add(&c->seen[chunk * TRACKER_CHUNK_PAGES + w * 64 +
							  (uint64_t)__builtin_ctzll(v)],
						 1);
		atomic_fetch_add(&c->taken, n);
		chunk++;
	}
}

static void *taker(void *p)
{
	struct conc *c = p;
	while (atomic_load(&c->setters_left))
		take_pass(c);
	atomic_fetch_add(&c->taken_live, atomic_load(&c->taken));
	return NULL;
}

static uint64_t run_concurrent(unsigned takers)
{
	struct conc c;
	pthread_t st[CONC_SETTERS], tt[CONC_TAKERS];
	struct setter_arg args[CONC_SETTERS];

	memset(&c, 0, sizeof(c));
	c.ds = ds_new(CONC_PAGES);
	c.seen = calloc(CONC_PAGES, sizeof(*c.seen));
	assert_non_null(c.seen);
	atomic_store(&c.setters_left, CONC_SETTERS);

	for (unsigned i = 0; i < takers; i++)
		assert_int_equal(pthread_create(&tt[i], NULL, taker, &c), 0);
	for (unsigned i = 0; i < CONC_SETTERS; i++) {
		args[i] = (struct setter_arg){.c = &c, .id = i};
		assert_int_equal(pthread_create(&st[i], NULL, setter, &args[i]), 0);
	}
	for (unsigned i = 0; i < CONC_SETTERS; i++)
		pthread_join(st[i], NULL);
	for (unsigned i = 0; i < takers; i++)
		pthread_join(tt[i], NULL);
	/* The setters are done, so one more pass must find whatever is left. */
	take_pass(&c);

	/* Each page was set exactly once, so it must have been taken exactly once. */
	uint64_t missing = 0, dup = 0;
	for (uint64_t p = 0; p < CONC_PAGES; p++) {
		uint8_t s = atomic_load(&c.seen[p]);
		missing += s == 0;
		dup += s > 1;
	}
	assert_int_equal(atomic_load(&c.not_new), 0);
	assert_int_equal(missing, 0);
	assert_int_equal(dup, 0);
	assert_int_equal(atomic_load(&c.taken), CONC_PAGES);
	assert_int_equal(dirtyset_count(c.ds), 0);

	free(c.seen);
	dirtyset_free(c.ds);
	return atomic_load(&c.taken_live);
}

/* Several rounds, since one interleaving proves little; the takers must really overlap. */
#define CONC_ROUNDS 20u

static void test_concurrent_one_taker(void **state)
{
	(void)state;
	uint64_t live = 0;
	for (unsigned r = 0; r < CONC_ROUNDS; r++)
		live += run_concurrent(1);
	assert_true(live > 0);
}

static void test_concurrent_two_takers(void **state)
{
	(void)state;
	uint64_t live = 0;
	for (unsigned r = 0; r < CONC_ROUNDS; r++)
		live += run_concurrent(CONC_TAKERS);
	assert_true(live > 0);
}

/*
 * Repeated sets of the same hot pages while a taker runs: after the setters finish, every
 * page must have been taken at least once, and the final pass leaves the set empty.
 */
struct hot {
	struct dirtyset *ds;
	_Atomic bool stop;
	uint8_t *seen;
};

static void *hot_setter(void *p)
{
	struct hot *h = p;
	for (unsigned round = 0; round < 200; round++)
		for (uint64_t page = 0; page < 3 * TRACKER_CHUNK_PAGES; page += 7)
			dirtyset_set(h->ds, page);
	return NULL;
}

static void *hot_taker(void *p)
{
	struct hot *h = p;
	while (!atomic_load(&h->stop))
		take_all(h->ds, h->seen);
	return NULL;
}

static void test_concurrent_hot_pages(void **state)
{
	(void)state;
	struct hot h;
	pthread_t s[2], t;

	memset(&h, 0, sizeof(h));
	h.ds = ds_new(3 * TRACKER_CHUNK_PAGES);
	h.seen = calloc(3 * TRACKER_CHUNK_PAGES, 1);
	assert_non_null(h.seen);
	assert_int_equal(pthread_create(&t, NULL, hot_taker, &h), 0);
	for (unsigned i = 0; i < 2; i++)
		assert_int_equal(pthread_create(&s[i], NULL, hot_setter, &h), 0);
	for (unsigned i = 0; i < 2; i++)
		pthread_join(s[i], NULL);
	atomic_store(&h.stop, true);
	pthread_join(t, NULL);
	take_all(h.ds, h.seen);

	for (uint64_t page = 0; page < 3 * TRACKER_CHUNK_PAGES; page++)
		assert_int_equal(h.seen[page] != 0, page % 7 == 0);
	assert_int_equal(dirtyset_count(h.ds), 0);
	free(h.seen);
	dirtyset_free(h.ds);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_new_rejects_empty),
		cmocka_unit_test(test_set_test_count),
		cmocka_unit_test(test_take_chunks),
		cmocka_unit_test(test_set_all_clear_all),
		cmocka_unit_test(test_or_word_and_chunk),
		cmocka_unit_test(test_concurrent_one_taker),
		cmocka_unit_test(test_concurrent_two_takers),
		cmocka_unit_test(test_concurrent_hot_pages),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
