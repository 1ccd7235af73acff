// SPDX-License-Identifier: Apache-2.0
/*
 * Description: the bandwidth share of a destination path among the migrations using it:
 * equal split, weights (priority), demands below the share redistributed (cascading),
 * every demand satisfied, unlimited capacity, odd weights.
 */
#include "testutil.h"

#include <math.h>

#include "scheduler/scheduler.h"

static void near(double got, double want, double tol)
{
	if (!(got >= want - tol && got <= want + tol))
		fail_msg("got %.9f, want %.9f +- %g", got, want, tol);
}

#define GBIT 125000000.0 /* bytes/s */

static void equal_and_weighted(void **state)
{
	(void)state;
	double cap[4];
	struct sched_share_flow eq[] = {{1, 0}, {1, 0}, {1, 0}};
	near(sched_share(10 * GBIT, eq, 3, cap), 0, 0);
	for (int i = 0; i < 3; i++)
		near(cap[i], 10 * GBIT / 3, 1e-6);

	struct sched_share_flow w[] = {{1, 0}, {2, 0}, {1, 0}};
	sched_share(10 * GBIT, w, 3, cap);
	near(cap[0], 2.5 * GBIT, 1e-6);
	near(cap[1], 5 * GBIT, 1e-6);
	near(cap[2], 2.5 * GBIT, 1e-6);

	/* A lone flow gets the whole link. */
	sched_share(10 * GBIT, w, 1, cap);
	near(cap[0], 10 * GBIT, 0);
}

static void redistribution(void **state)
{
	(void)state;
	double cap[4];
	/* 1 Gbit wanted, under the 3.33 share: the other two split the remaining 9. */
	struct sched_share_flow f[] = {{1, 1 * GBIT}, {1, 0}, {1, 0}};
	near(sched_share(10 * GBIT, f, 3, cap), 0, 0);
	near(cap[0], 1 * GBIT, 1e-6);
	near(cap[1], 4.5 * GBIT, 1e-6);
	near(cap[2], 4.5 * GBIT, 1e-6);

	/*
	 * Cascade with weights 1:1:2:4 on 16 Gbit: one unit of weight is worth 2. Flow 0 wants
	 * 1 (under 2) and flow 2 wants 3 (under 4): both settled. 12 left for weights 1 + 4:
	 * 2.4 a unit; flow 1 wants 2.5, over 2.4, so it gets 2.4 and flow 3 gets 9.6.
	 */
	struct sched_share_flow g[] = {{1, 1 * GBIT}, {1, 2.5 * GBIT}, {2, 3 * GBIT}, {4, 0}};
	near(sched_share(16 * GBIT, g, 4, cap), 0, 0);
	near(cap[0], 1 * GBIT, 1e-6);
	near(cap[1], 2.4 * GBIT, 1e-6);
	near(cap[2], 3 * GBIT, 1e-6);
	near(cap[3], 9.6 * GBIT, 1e-6);
	near(cap[0] + cap[1] + cap[2] + cap[3], 16 * GBIT, 1e-3);

	/* Everyone wants less than the link: everyone gets its demand, the rest is unused. */
	struct sched_share_flow h[] = {{1, 1 * GBIT}, {3, 2 * GBIT}};
	near(sched_share(10 * GBIT, h, 2, cap), 7 * GBIT, 1e-6);
	near(cap[0], 1 * GBIT, 0);
	near(cap[1], 2 * GBIT, 0);
}

static void edges(void **state)
{
	(void)state;
	double cap[3];
	/* Unlimited capacity: each gets its demand, 0 = uncapped. */
	struct sched_share_flow f[] = {{1, 3 * GBIT}, {1, 0}};
	near(sched_share(0, f, 2, cap), 0, 0);
	near(cap[0], 3 * GBIT, 0);
	near(cap[1], 0, 0);
	/* No flows: all of it is left. */
	near(sched_share(5 * GBIT, f, 0, cap), 5 * GBIT, 0);
	/* Non-positive or NaN weights count as 1. */
	struct sched_share_flow g[] = {{0, 0}, {-3, 0}, {NAN, 0}};
	sched_share(9 * GBIT, g, 3, cap);
	for (int i = 0; i < 3; i++)
		near(cap[i], 3 * GBIT, 1e-6);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(equal_and_weighted),
		cmocka_unit_test(redistribution),
		cmocka_unit_test(edges),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
