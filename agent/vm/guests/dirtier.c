// SPDX-License-Identifier: Apache-2.0
/*
 * dirtier: the load generator for migration tests and benchmarks. Each vCPU writes its own
 * region [free_start + idx*wss, +wss) one 8-byte word per page, choosing pages sequentially,
 * uniformly at random, or hot/cold (hot_ratio % of the writes go to the first hot_pct % of
 * the region), at up to `rate` pages per second. The written value is a running counter and
 * its offset in the page moves, so every write really changes the page's content (a tracker
 * or a sender that compares contents cannot shortcut it). Rate limiting sleeps through the
 * debug port instead of spinning, because the hosts that run these tests have few cores.
 *
 * Parameters: wss, pattern (0 seq, 1 random, 2 hotcold), rate (pages/s per vCPU, 0 =
 * unlimited), hot_pct (default 10), hot_ratio (default 90), passes (stop writing after this
 * many passes and sleep quietly through the debug port, 0 = never stop; gives benchmarks an
 * idle guest whose memory is fully touched).
 * Reports: READY at start, PROGRESS (a0 = passes, a1 = pages written) whenever another
 * region's worth of pages has been written.
 */
#include "guestlib.h"

#define NAME "dirtier"

enum { PAT_SEQ = 0, PAT_RANDOM = 1, PAT_HOTCOLD = 2 };

static const char *const keys[] = {"wss", "pattern", "rate", "hot_pct", "hot_ratio", "passes", NULL};
static const char *const pattern_names[] = {"seq", "random", "hotcold"};

/* Longest single sleep: bounds how stale the guest's view of time can get if the host
 * wakes it late, and how long a pause request could wait on a sleeping vCPU. */
#define SLEEP_MAX_NS 50000000ull
/* If the guest falls this far behind its schedule (it was paused, or migrated), it forgets
 * the debt instead of bursting to catch up: the rate is a ceiling, not an average. */
#define CATCHUP_MAX_MS 100u

struct picker {
	uint64_t pattern;
	uint64_t pages;
	uint64_t hot_pages;  /* hotcold: pages [0, hot_pages) are hot */
	uint64_t hot_thresh; /* hotcold: a draw below this (of 2^32) goes to the hot part */
	uint64_t next;       /* seq: next page */
	uint64_t rng;
};

static uint64_t pick(struct picker *p)
{
	uint64_t pg;
	switch (p->pattern) {
	case PAT_SEQ:
		pg = p->next;
		if (++p->next == p->pages)
			p->next = 0;
		return pg;
	case PAT_RANDOM:
		return g_rand_below(&p->rng, p->pages);
	default: {
		uint64_t r = g_rand(&p->rng);
		uint64_t cold = p->pages - p->hot_pages;
		if ((r & 0xffffffffu) < p->hot_thresh || cold == 0)
			return (uint64_t)(((unsigned __int128)(r >> 32) * p->hot_pages) >> 32);
		return p->hot_pages + (uint64_t)(((unsigned __int128)(r >> 32) * cold) >> 32);
	}
	}
}

void guest_main(uint32_t idx, struct ferry_bootinfo *bi)
{
	struct g_region reg;
	g_start(idx, bi, NAME, keys);
	g_region_init(idx, bi, NAME, &reg);

	uint64_t pattern = g_param_or(bi, "pattern", PAT_SEQ);
	uint64_t rate = g_param_or(bi, "rate", 0);
	uint64_t hot_pct = g_param_or(bi, "hot_pct", 10);
	uint64_t hot_ratio = g_param_or(bi, "hot_ratio", 90);
	uint64_t stop_after = g_param_or(bi, "passes", 0);
	if (pattern > PAT_HOTCOLD)
		g_param_fail(idx, NAME, "pattern", pattern,
			     "must be 0 (seq), 1 (random) or 2 (hotcold)");
	if (hot_pct < 1 || hot_pct > 100)
		g_param_fail(idx, NAME, "hot_pct", hot_pct, "must be 1..100");
	if (hot_ratio > 100)
		g_param_fail(idx, NAME, "hot_ratio", hot_ratio, "must be 0..100");
	if (rate && !bi->tsc_khz)
		g_param_fail(idx, NAME, "rate", rate, "the host gave no TSC frequency to pace by");

	struct picker pk = {
		.pattern = pattern,
		.pages = reg.pages,
		.hot_pages = reg.pages * hot_pct / 100 ? reg.pages * hot_pct / 100 : 1,
		.hot_thresh = (hot_ratio << 32) / 100,
		.rng = g_mix64(0x6469727469657200ull + idx), /* reproducible per vCPU */
	};

	/* Ticks per page; 0 (unlimited) also when the rate exceeds the TSC frequency. */
	uint64_t tsc_hz = bi->tsc_khz * 1000;
	uint64_t tpp = rate ? tsc_hz / rate : 0;
	/* Check the clock about 64 times a second at low rates, every 64 pages at high ones. */
	uint64_t chunk = rate / 64;
	chunk = chunk < 1 ? 1 : chunk > 64 ? 64 : chunk;
	if (!tpp)
		chunk = 64;

	g_printf("%s vcpu %u: %lu KiB at %#lx, pattern %s, rate %lu pages/s\n", NAME, idx,
		 reg.size >> 10, reg.base, pattern_names[pattern], rate);
	g_dbg(FERRY_DBG_READY, idx, reg.base, reg.size, 0, 0);

	uint64_t written = 0, in_pass = 0, passes = 0;
	uint64_t t0 = g_rdtsc(), w0 = 0;
	for (;;) {
		for (uint64_t k = 0; k < chunk; k++) {
			uint64_t pg = pick(&pk);
			/* The word offset walks with the counter (and the pass, for seq over a
			 * multiple of 512 pages), so both value and position change. */
			uint64_t word = (written ^ (written >> 9)) & (G_PAGE_WORDS - 1);
			uintptr_t page = (uintptr_t)(reg.base + pg * G_PAGE_SIZE);
			((volatile uint64_t *)page)[word] = ++written;
			if (++in_pass == reg.pages) {
				in_pass = 0;
				g_dbg(FERRY_DBG_PROGRESS, idx, ++passes, written, 0, 0);
				if (stop_after && passes == stop_after)
					goto idle;
			}
		}
		if (!tpp)
			continue;
		uint64_t now = g_rdtsc();
		uint64_t due = t0 + (written - w0) * tpp; /* when these pages were allowed */
		if (now < due) {
			uint64_t ns = (due - now) * 1000000 / bi->tsc_khz;
			g_sleep_ns(idx, ns < SLEEP_MAX_NS ? ns : SLEEP_MAX_NS);
		} else if (now - due > bi->tsc_khz * CATCHUP_MAX_MS) {
			t0 = now;
			w0 = written;
		}
	}
idle:
	/* Done: no more stores, only sleeps (the host's vCPU thread sleeps too). */
	g_printf("%s vcpu %u: stopped after %lu passes\n", NAME, idx, passes);
	for (;;)
		g_sleep_ns(idx, SLEEP_MAX_NS);
}
