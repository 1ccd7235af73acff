// SPDX-License-Identifier: Apache-2.0
/*
 * Throttling by per-vCPU dirty limits. The decision hands out a total dirty budget (a
 * fraction of the link); this file splits it max-min fairly, so a vCPU that dirties less
 * than its share is never slowed and the fast ones are slowed only as far as the budget
 * needs, and turns a vCPU's limit into the sleep its thread owes at a quota check.
 */
#include "scheduler/scheduler.h"

#include <stdlib.h>

/* Sleeps are capped here so a tiny limit cannot overflow; about 31 years. */
#define QUOTA_NS_MAX 1e18

double sched_throttle_fill(const double *demand_pps, unsigned n, double budget_pps,
			   double floor_pps, double *ret_limit_pps)
{
	double total = 0;
	for (unsigned i = 0; i < n; i++) {
		ret_limit_pps[i] = 0;
		if (demand_pps[i] > 0)
			total += demand_pps[i];
	}
	if (n == 0 || total <= budget_pps)
		return 0;
	if (budget_pps < 0)
		budget_pps = 0;

	/*
	 * Water-filling: raise a common level w until sum(min(d_i, w)) reaches the budget.
	 * Each pass settles the vCPUs whose demand is under the equal split of what is left;
	 * when none is, everyone still open gets that split. At most n passes.
	 */
	bool *open = calloc(n, sizeof(*open));
	double left = budget_pps, water = 0;
	unsigned nopen = 0;
	if (!open) {
		/* No memory for the bookkeeping: fall back to an equal split (never unsafe). */
		water = budget_pps / n;
	} else {
		for (unsigned i = 0; i < n; i++) {
			open[i] = true;
			nopen++;
		}
		for (;;) {
			water = left / nopen;
			bool settled = false;
			for (unsigned i = 0; i < n; i++) {
				double d = demand_pps[i] > 0 ? demand_pps[i] : 0;
				if (open[i] && d <= water) {
					open[i] = false;
					nopen--;
					left -= d;
					settled = true;
				}
			}
			if (!settled || nopen == 0)
				break;
		}
	}
	for (unsigned i = 0; i < n; i++) {
		double d = demand_pps[i] > 0 ? demand_pps[i] : 0;
		if (open ? !open[i] : d <= water)
			continue;
		double lim = water < floor_pps ? floor_pps : water;
		/* A limit at or above the demand is no limit at all. */
		ret_limit_pps[i] = lim < d ? lim : 0;
	}
	free(open);
	return water;
}

uint64_t sched_quota_sleep_ns(double limit_pps, uint64_t pages, uint64_t elapsed_ns)
{
	if (!(limit_pps > 0) || pages == 0)
		return 0;
	double need = (double)pages / limit_pps * 1e9;
	if (need > QUOTA_NS_MAX)
		need = QUOTA_NS_MAX;
	return need > (double)elapsed_ns ? (uint64_t)(need - (double)elapsed_ns) : 0;
}

uint64_t sched_quota_ns_per_page(double limit_pps)
{
	if (!(limit_pps > 0))
		return 0;
	double ns = 1e9 / limit_pps;
	return ns > QUOTA_NS_MAX ? (uint64_t)QUOTA_NS_MAX : (uint64_t)(ns + 0.5);
}

uint64_t sched_quota_check(struct sched_quota *q, double limit_pps, uint64_t now_ns,
			   uint64_t count, uint64_t max_sleep_ns)
{
	uint64_t pages = q->started && count >= q->count ? count - q->count : 0;
	q->count = count;
	if (!q->started || !(limit_pps > 0)) {
		q->started = true;
		q->due_ns = now_ns;
		return 0;
	}
	/*
	 * due_ns >= the time of the last check (kept so below), so the pages dirtied since
	 * then are paid from there: unused budget is not banked, debt is carried.
	 */
	double need = (double)pages / limit_pps * 1e9;
	if (need > QUOTA_NS_MAX)
		need = QUOTA_NS_MAX;
	q->due_ns += (uint64_t)need;
	if (q->due_ns <= now_ns) {
		q->due_ns = now_ns;
		return 0;
	}
	uint64_t sleep = q->due_ns - now_ns;
	return max_sleep_ns && sleep > max_sleep_ns ? max_sleep_ns : sleep;
}
