// SPDX-License-Identifier: Apache-2.0
/*
 * Sliding-window rate estimator over a cumulative counter. Kept as a ring of the last
 * SCHED_RATE_SAMPLES samples; old samples fall out of the window by time, so a bursty
 * counter does not poison the rate for longer than the window.
 */
#include "scheduler/scheduler.h"

#include <string.h>

void sched_rate_init(struct sched_rate *r, uint64_t window_ns)
{
	memset(r, 0, sizeof(*r));
	r->window_ns = window_ns ? window_ns : 1000000000ull;
}

static unsigned slot(const struct sched_rate *r, unsigned i)
{
	return (r->head + i) % SCHED_RATE_SAMPLES;
}

void sched_rate_add(struct sched_rate *r, uint64_t now_ns, uint64_t value)
{
	if (r->count) {
		unsigned newest = slot(r, r->count - 1);
		if (now_ns <= r->t_ns[newest])
			return;
		if (value < r->value[newest])
			r->count = 0; /* counter reset: start a new window */
	}
	if (r->count == SCHED_RATE_SAMPLES) {
		r->head = (r->head + 1) % SCHED_RATE_SAMPLES;
		r->count--;
	}
	unsigned s = slot(r, r->count);
	r->t_ns[s] = now_ns;
	r->value[s] = value;
	r->count++;
	/* Drop samples that fell out of the window, keeping at least two. */
	while (r->count > 2 && now_ns - r->t_ns[slot(r, 1)] >= r->window_ns) {
		r->head = (r->head + 1) % SCHED_RATE_SAMPLES;
		r->count--;
	}
}

double sched_rate_per_sec(const struct sched_rate *r)
{
	if (r->count < 2)
		return 0.0;
	unsigned o = slot(r, 0), n = slot(r, r->count - 1);
	double dt = (double)(r->t_ns[n] - r->t_ns[o]) / 1e9;
	return (double)(r->value[n] - r->value[o]) / dt;
}
