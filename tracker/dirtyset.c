// SPDX-License-Identifier: Apache-2.0
/*
 * The dirty set: an atomic page bitmap per memslot with a one-bit-per-chunk summary, so
 * that vCPU threads and the harvester can mark pages while the sender takes whole chunks by
 * snapshot-and-clear, at a cost that follows the number of dirty chunks. The ordering rules
 * (word before summary when setting, summary before words when taking) are in dirtyset.h;
 * every atomic here is sequentially consistent because the argument that no bit is lost
 * relies on a single order over the summary and word operations.
 */
#include "tracker/dirtyset.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdlib.h>

struct dirtyset {
	uint64_t npages;
	uint64_t nwords;    /* words that hold pages: ceil(npages / 64) */
	uint64_t nchunks;   /* ceil(npages / TRACKER_CHUNK_PAGES) */
	uint64_t tail_mask; /* pages present in the last word */
	/* Bit c set: chunk c may hold bits. ceil(nchunks / 64) words. */
	_Atomic uint64_t *summary;
	/*
	 * nchunks * TRACKER_CHUNK_WORDS words: padded to whole chunks so a take copies a full
	 * chunk without bounds checks; the padding is never set.
	 */
	_Atomic uint64_t *words;
};

int dirtyset_new(uint64_t npages, struct dirtyset **ret)
{
	if (!npages || !ret || npages > (UINT64_MAX >> 13))
		return -EINVAL;

	struct dirtyset *ds = calloc(1, sizeof(*ds));
	if (!ds)
		return -ENOMEM;
	ds->npages = npages;
	ds->nwords = (npages + 63) / 64;
	ds->nchunks = (npages + TRACKER_CHUNK_PAGES - 1) / TRACKER_CHUNK_PAGES;
	ds->tail_mask = (npages % 64) ? (1ull << (npages % 64)) - 1 : ~0ull;
	/* calloc's zero bytes are a valid zero for lock-free atomics. */
	ds->summary = calloc((ds->nchunks + 63) / 64, sizeof(*ds->summary));
	if (!ds->summary)
		goto err_free_ds;
	ds->words = calloc(ds->nchunks * TRACKER_CHUNK_WORDS, sizeof(*ds->words));
	if (!ds->words)
		goto err_free_summary;
	*ret = ds;
	return 0;

err_free_summary:
	free(ds->summary);
err_free_ds:
	free(ds);
	return -ENOMEM;
}

void dirtyset_free(struct dirtyset *ds)
{
	if (!ds)
		return;
	free(ds->words);
	free(ds->summary);
	free(ds);
}

uint64_t dirtyset_npages(const struct dirtyset *ds)
{
	return ds->npages;
}

uint64_t dirtyset_nchunks(const struct dirtyset *ds)
{
	return ds->nchunks;
}

/*
 * Called after the bits are in their word. The plain load first keeps most sets from
 * writing the summary line, which every vCPU thread shares. It is safe: a load that sees the
 * bit either precedes a taker's clear of it (then that taker's exchange of the words comes
 * later still and carries our bit) or sees a mark made after the clear (then the chunk stays
 * visible and the next take carries it).
 */
static void summary_mark(struct dirtyset *ds, uint64_t chunk)
{
	_Atomic uint64_t *s = &ds->summary[chunk / 64];
	uint64_t bit = 1ull << (chunk % 64);

	if (!(atomic_load(s) & bit))
		atomic_fetch_or(s, bit);
}

bool dirtyset_set(struct dirtyset *ds, uint64_t page)
{
	if (page >= ds->npages)
		return false;
	uint64_t bit = 1ull << (page % 64);
	uint64_t old = atomic_fetch_or(&ds->words[page / 64], bit);
	summary_mark(ds, page / TRACKER_CHUNK_PAGES);
	return !(old & bit);
}

void dirtyset_or_word(struct dirtyset *ds, uint64_t word, uint64_t mask)
{
	if (word >= ds->nwords)
		return;
	if (word == ds->nwords - 1)
		mask &= ds->tail_mask;
	if (!mask)
		return;
	atomic_fetch_or(&ds->words[word], mask);
	summary_mark(ds, word / TRACKER_CHUNK_WORDS);
}

void dirtyset_or_chunk(struct dirtyset *ds, uint64_t chunk,
		       const uint64_t bits[TRACKER_CHUNK_WORDS])
{
	for (unsigned i = 0; i < TRACKER_CHUNK_WORDS; i++)
		if (bits[i])
			dirtyset_or_word(ds, chunk * TRACKER_CHUNK_WORDS + i, bits[i]);
}

void dirtyset_set_all(struct dirtyset *ds)
{
	for (uint64_t w = 0; w < ds->nwords; w++)
		atomic_fetch_or(&ds->words[w], w == ds->nwords - 1 ? ds->tail_mask : ~0ull);
	for (uint64_t c = 0; c < ds->nchunks; c++)
		summary_mark(ds, c);
}

void dirtyset_clear_all(struct dirtyset *ds)
{
	/* Same order as a take: summary first, so a racing set keeps its summary bit. */
	for (uint64_t si = 0; si < (ds->nchunks + 63) / 64; si++) {
		uint64_t s = atomic_exchange(&ds->summary[si], 0);
		while (s) {
			uint64_t c = si * 64 + (uint64_t)__builtin_ctzll(s);
			s &= s - 1;
			for (unsigned i = 0; i < TRACKER_CHUNK_WORDS; i++)
				atomic_store(&ds->words[c * TRACKER_CHUNK_WORDS + i], 0);
		}
	}
}

bool dirtyset_test(const struct dirtyset *ds, uint64_t page)
{
	if (page >= ds->npages)
		return false;
	return atomic_load(&ds->words[page / 64]) & (1ull << (page % 64));
}

uint64_t dirtyset_count(const struct dirtyset *ds)
{
	uint64_t n = 0;

	for (uint64_t si = 0; si < (ds->nchunks + 63) / 64; si++) {
		uint64_t s = atomic_load(&ds->summary[si]);
		while (s) {
			uint64_t c = si * 64 + (uint64_t)__builtin_ctzll(s);
			s &= s - 1;
			for (unsigned i = 0; i < TRACKER_CHUNK_WORDS; i++)
				n += (uint64_t)__builtin_popcountll(
					atomic_load(&ds->words[c * TRACKER_CHUNK_WORDS + i]));
		}
	}
	return n;
}

unsigned dirtyset_take_next(struct dirtyset *ds, uint64_t *chunk,
			    uint64_t bits[TRACKER_CHUNK_WORDS])
{
	uint64_t c = *chunk;

	while (c < ds->nchunks) {
		uint64_t si = c / 64;
		uint64_t s = atomic_load(&ds->summary[si]) & (~0ull << (c % 64));
		if (!s) {
			c = (si + 1) * 64;
			continue;
		}
		c = si * 64 + (uint64_t)__builtin_ctzll(s);
		atomic_fetch_and(&ds->summary[si], ~(1ull << (c % 64)));

		/*
		 * Loading before exchanging skips the locked operation on clean words. A word
		 * that reads zero here and is set right after was set after our summary clear,
		 * so its setter re-marks the summary and the bit waits for the next take.
		 */
		_Atomic uint64_t *w = &ds->words[c * TRACKER_CHUNK_WORDS];
		unsigned n = 0;
		for (unsigned i = 0; i < TRACKER_CHUNK_WORDS; i++) {
			uint64_t v = atomic_load(&w[i]);
			if (v)
				v = atomic_exchange(&w[i], 0);
			bits[i] = v;
			n += (unsigned)__builtin_popcountll(v);
		}
		if (n) {
			*chunk = c;
			return n;
		}
		c++; /* a stale summary bit: the chunk was taken meanwhile */
	}
	return 0;
}
