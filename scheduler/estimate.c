// SPDX-License-Identifier: Apache-2.0
/*
 * Estimators the decision is built on: send bandwidth as bytes over the time spent
 * sending (so pauses between rounds do not count as a slow link), per-vCPU dirty rates from
 * the tracker's cumulative per-vCPU counts, the expected downtime of a switch-over now, and
 * the one-round projection of what will remain.
 */
#include "scheduler/scheduler.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

void sched_bw_init(struct sched_bw *b, uint64_t window_ns)
{
	memset(b, 0, sizeof(*b));
	b->window_ns = window_ns ? window_ns : 3000000000ull;
}

static unsigned bw_slot(const struct sched_bw *b, unsigned i)
{
	return (b->head + i) % SCHED_BW_SAMPLES;
}

void sched_bw_add(struct sched_bw *b, uint64_t now_ns, uint64_t bytes, uint64_t busy_ns)
{
	if (!busy_ns)
		return;
	if (b->count && now_ns < b->t_ns[bw_slot(b, b->count - 1)])
		return;
	if (b->count == SCHED_BW_SAMPLES) {
		b->head = (b->head + 1) % SCHED_BW_SAMPLES;
		b->count--;
	}
	unsigned s = bw_slot(b, b->count);
	b->t_ns[s] = now_ns;
	b->bytes[s] = bytes;
	b->busy_ns[s] = busy_ns;
	b->count++;
	/* A sample counts while it ended within the window; the newest always counts. */
	while (b->count > 1 && now_ns - b->t_ns[b->head] >= b->window_ns) {
		b->head = (b->head + 1) % SCHED_BW_SAMPLES;
		b->count--;
	}
}

double sched_bw_bytes_per_sec(const struct sched_bw *b)
{
	double bytes = 0, ns = 0;
	for (unsigned i = 0; i < b->count; i++) {
		bytes += (double)b->bytes[bw_slot(b, i)];
		ns += (double)b->busy_ns[bw_slot(b, i)];
	}
	return ns > 0 ? bytes / (ns / 1e9) : 0.0;
}

struct sched_dirty {
	unsigned nr_vcpus;
	struct sched_rate rate[]; /* one per vCPU */
};

int sched_dirty_new(unsigned nr_vcpus, uint64_t window_ns, struct sched_dirty **ret)
{
	if (nr_vcpus == 0 || nr_vcpus > SCHED_MAX_VCPUS)
		return -EINVAL;
	struct sched_dirty *d = malloc(sizeof(*d) + nr_vcpus * sizeof(d->rate[0]));
	if (!d)
		return -ENOMEM;
	d->nr_vcpus = nr_vcpus;
	for (unsigned i = 0; i < nr_vcpus; i++)
		sched_rate_init(&d->rate[i], window_ns);
	*ret = d;
	return 0;
}

void sched_dirty_free(struct sched_dirty *d)
{
	free(d);
}

void sched_dirty_add(struct sched_dirty *d, uint64_t now_ns, const uint64_t *counts,
		     unsigned n)
{
	for (unsigned i = 0; i < n && i < d->nr_vcpus; i++)
		sched_rate_add(&d->rate[i], now_ns, counts[i]);
}

double sched_dirty_vcpu_pps(const struct sched_dirty *d, unsigned idx)
{
	return idx < d->nr_vcpus ? sched_rate_per_sec(&d->rate[idx]) : 0.0;
}

unsigned sched_dirty_rates(const struct sched_dirty *d, double *ret_pps, unsigned n)
{
	unsigned i;
	for (i = 0; i < n && i < d->nr_vcpus; i++)
		ret_pps[i] = sched_rate_per_sec(&d->rate[i]);
	return i;
}

double sched_dirty_total_pps(const struct sched_dirty *d)
{
	double t = 0;
	for (unsigned i = 0; i < d->nr_vcpus; i++)
		t += sched_rate_per_sec(&d->rate[i]);
	return t;
}

double sched_expected_downtime_ms(uint64_t remaining_bytes, uint64_t state_bytes,
				  double bandwidth_Bps, uint64_t rtt_ns)
{
	if (!(bandwidth_Bps > 0))
		return -1.0;
	return ((double)remaining_bytes + (double)state_bytes) / bandwidth_Bps * 1e3 +
	       (double)rtt_ns / 1e6;
}

uint64_t sched_remaining_next(uint64_t remaining_bytes, double dirty_Bps, double bandwidth_Bps,
			      uint64_t mem_bytes)
{
	if (!(bandwidth_Bps > 0))
		return remaining_bytes;
	if (!(dirty_Bps > 0))
		return 0;
	double next = (double)remaining_bytes / bandwidth_Bps * dirty_Bps;
	if (mem_bytes && next > (double)mem_bytes)
		return mem_bytes;
	if (next >= 1.8e19)
		return UINT64_MAX;
	return (uint64_t)(next + 0.5);
}
