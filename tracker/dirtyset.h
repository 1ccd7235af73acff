/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The dirty set of one memslot, internal to the tracker (and its unit test): an atomic
 * bitmap with one bit per 4 KiB page, plus a summary bitmap with one bit per take chunk
 * (TRACKER_CHUNK_PAGES pages, 64 words), so that taking costs the number of dirty chunks
 * rather than the size of the slot. Any number of threads may set bits while one thread
 * takes chunks; a bit set concurrently with a take is either in that take or stays in the
 * set for the next one, never lost. Memory: npages/8 bytes plus npages/32768 bytes.
 *
 * The ordering that makes this safe: a setter ORs the word, then sets the chunk's summary
 * bit; a taker clears the summary bit, then exchanges the words. A summary bit can thus be
 * set while its chunk is empty (the take skips it), but never be clear while a completed
 * set left a bit in its chunk.
 */
#ifndef FERRY_TRACKER_DIRTYSET_H
#define FERRY_TRACKER_DIRTYSET_H

#include <stdbool.h>
#include <stdint.h>

#include "tracker/tracker.h"

struct dirtyset;

/* -EINVAL for npages == 0, -ENOMEM. */
int dirtyset_new(uint64_t npages, struct dirtyset **ret);
void dirtyset_free(struct dirtyset *ds);
uint64_t dirtyset_npages(const struct dirtyset *ds);
uint64_t dirtyset_nchunks(const struct dirtyset *ds);

/* Sets one page's bit; returns true if it was clear. Pages out of range are ignored. */
bool dirtyset_set(struct dirtyset *ds, uint64_t page);
/* ORs mask into word `word` (pages word*64 ..); bits past the last page are dropped. */
void dirtyset_or_word(struct dirtyset *ds, uint64_t word, uint64_t mask);
/* ORs a whole chunk back (e.g. after a take whose re-protection failed). */
void dirtyset_or_chunk(struct dirtyset *ds, uint64_t chunk,
		       const uint64_t bits[TRACKER_CHUNK_WORDS]);
void dirtyset_set_all(struct dirtyset *ds);
/* Empties the set; bits set concurrently may survive, as with a take. */
void dirtyset_clear_all(struct dirtyset *ds);
bool dirtyset_test(const struct dirtyset *ds, uint64_t page);
/* Bits set now (exact when no setter runs). Costs the number of dirty chunks. */
uint64_t dirtyset_count(const struct dirtyset *ds);

/*
 * Takes the first chunk at index >= *chunk that has bits: clears them from the set and
 * copies them to bits[] (bit i = page chunk*TRACKER_CHUNK_PAGES + i). Returns the number of
 * bits taken (> 0) with *chunk set to the chunk taken, or 0 when no chunk at or after *chunk
 * has any (then *chunk is untouched). Concurrent takers each get distinct bits.
 */
unsigned dirtyset_take_next(struct dirtyset *ds, uint64_t *chunk,
			    uint64_t bits[TRACKER_CHUNK_WORDS]);

#endif
