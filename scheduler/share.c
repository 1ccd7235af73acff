// SPDX-License-Identifier: Apache-2.0
/*
 * Bandwidth share of one destination path among the migrations using it: weighted max-min
 * fairness by progressive filling. Flows that want less than their weighted share get what
 * they want, and what they leave is split again among the others by weight.
 */
#include "scheduler/scheduler.h"

#include <stdlib.h>

static double weight_of(const struct sched_share_flow *f)
{
	return f->weight > 0 && f->weight < 1e300 ? f->weight : 1.0;
}

static double demand_of(const struct sched_share_flow *f)
{
	return f->demand_Bps > 0 ? f->demand_Bps : 0; /* 0 = unbounded */
}

double sched_share(double capacity_Bps, const struct sched_share_flow *flows, unsigned n,
		   double *ret_cap_Bps)
{
	if (!(capacity_Bps > 0)) {
		for (unsigned i = 0; i < n; i++)
			ret_cap_Bps[i] = demand_of(&flows[i]);
		return 0;
	}
	if (n == 0)
		return capacity_Bps;

	/* ret_cap_Bps[i] < 0 marks a flow still open while filling. */
	double left = capacity_Bps, wsum = 0;
	unsigned open = n;
	for (unsigned i = 0; i < n; i++) {
		ret_cap_Bps[i] = -1;
		wsum += weight_of(&flows[i]);
	}
	for (;;) {
		double unit = left / wsum; /* bytes/s per unit of weight */
		bool settled = false;
		for (unsigned i = 0; i < n; i++) {
			double d = demand_of(&flows[i]), w = weight_of(&flows[i]);
			if (ret_cap_Bps[i] < 0 && d > 0 && d <= unit * w) {
				ret_cap_Bps[i] = d;
				left -= d;
				wsum -= w;
				open--;
				settled = true;
			}
		}
		if (open == 0) /* every flow got its demand */
			return left > 0 ? left : 0;
		if (!settled) {
			for (unsigned i = 0; i < n; i++)
				if (ret_cap_Bps[i] < 0)
					ret_cap_Bps[i] = unit * weight_of(&flows[i]);
			return 0;
		}
	}
}
