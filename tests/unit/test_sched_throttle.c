// SPDX-License-Identifier: Apache-2.0
/*
 * Description: throttling by per-vCPU dirty limits: the max-min fair split of a dirty
 * budget (vCPUs under their share untouched, the rest equal, the floor, demands under the
 * floor), the split when only a total rate is known (bitmap backend), lifting, and the
 * quota a vCPU thread applies: the sleep owed for the pages it dirtied, stateless and with
 * debt carried across capped sleeps.
 */
#include "testutil.h"

#include <math.h>
#include <string.h>

#include "scheduler/scheduler.h"

#define MS 1000000ull
#define SEC 1000000000ull

static void near(double got, double want, double tol)
{
	if (!(got >= want - tol && got <= want + tol))
		fail_msg("got %.9f, want %.9f +- %g", got, want, tol);
}

static void fill_max_min(void **state)
{
	(void)state;
	double lim[6];
	/* Two slow vCPUs under the fair share keep their demand; two fast ones share the rest. */
	double d1[] = {150000, 150000, 10000, 10000};
	double w = sched_throttle_fill(d1, 4, 122070.3125, 256, lim);
	near(w, 51035.15625, 1e-9);
	near(lim[0], 51035.15625, 1e-9);
	near(lim[1], 51035.15625, 1e-9);
	assert_true(lim[2] == 0 && lim[3] == 0);

	/*
	 * Cascade: the equal split is 20000, which 1000 and 20000 fit under; the other three
	 * share the 79000 left (26333.3 each, under 50000 too, so all three are limited).
	 */
	double d2[] = {1000, 20000, 50000, 90000, 400000};
	w = sched_throttle_fill(d2, 5, 100000, 256, lim);
	near(w, 79000.0 / 3, 1e-9);
	assert_true(lim[0] == 0 && lim[1] == 0);
	for (int i = 2; i < 5; i++)
		near(lim[i], 79000.0 / 3, 1e-9);
	/* 160000: the three share 139000, 46333.3 each, still under 50000. */
	w = sched_throttle_fill(d2, 5, 160000, 256, lim);
	near(w, 139000.0 / 3, 1e-9);
	near(lim[2], 139000.0 / 3, 1e-9);
	/* 190000: 169000 / 3 = 56333 fits 50000 too; 90000 and 400000 share 119000. */
	w = sched_throttle_fill(d2, 5, 190000, 256, lim);
	near(w, 59500, 1e-9);
	assert_true(lim[0] == 0 && lim[1] == 0 && lim[2] == 0);
	near(lim[3], 59500, 1e-9);
	near(lim[4], 59500, 1e-9);

	/* All equal: an equal split. */
	double d3[] = {1000, 1000, 1000, 1000};
	w = sched_throttle_fill(d3, 4, 2000, 1, lim);
	near(w, 500, 1e-12);
	for (int i = 0; i < 4; i++)
		near(lim[i], 500, 1e-12);

	/* Demands fit: nobody is limited. */
	w = sched_throttle_fill(d3, 4, 4000, 1, lim);
	assert_true(w == 0);
	for (int i = 0; i < 4; i++)
		assert_true(lim[i] == 0);

	/* Idle vCPUs (0, negative) count as 0 and are never limited. */
	double d4[] = {0, -5, 9000};
	w = sched_throttle_fill(d4, 3, 3000, 1, lim);
	near(w, 3000, 1e-12);
	assert_true(lim[0] == 0 && lim[1] == 0);
	near(lim[2], 3000, 1e-12);
}

static void fill_floor(void **state)
{
	(void)state;
	double lim[3];
	/* The water level is 100 pages/s, under the floor of 256: the floor wins. */
	double d[] = {5000, 5000, 5000};
	double w = sched_throttle_fill(d, 3, 300, 256, lim);
	near(w, 100, 1e-12);
	for (int i = 0; i < 3; i++)
		near(lim[i], 256, 0);
	/*
	 * The level is 100 again (200 is above it), but the floored limit of 256 would be
	 * above that vCPU's demand of 200: no limit for it at all.
	 */
	double e[] = {200, 5000, 5000};
	w = sched_throttle_fill(e, 3, 300, 256, lim);
	near(w, 100, 1e-12);
	assert_true(lim[0] == 0);
	near(lim[1], 256, 0);
	near(lim[2], 256, 0);
}

/* Without per-vCPU rates (bitmap backend) the total is spread evenly: equal limits. */
static void even_split_without_per_vcpu_rates(void **state)
{
	(void)state;
	struct sched_policy p;
	sched_policy_default(&p);
	struct sched_migration *m;
	assert_int_equal(sched_migration_new(&p, 4, &m), 0);
	struct sched_round_record r;
	const double bw = 1e9, bp = bw / 4096;
	for (uint32_t round = 1; round <= 2; round++) {
		struct sched_measure in = {.now_ns = round * SEC, .elapsed_ns = round * SEC,
					   .round = round, .remaining_bytes = 2000000000,
					   .mem_bytes = 4ull << 30, .bandwidth_Bps = bw,
					   .dirty_pps = 2 * bp, .nr_vcpus = 4};
		sched_migration_decide(m, &in, &r);
	}
	assert_int_equal(r.action, SCHED_THROTTLE);
	assert_int_equal(r.throttle_level, 1);
	for (int i = 0; i < 4; i++) {
		near(r.vcpu[i].dirty_pps, bp / 2, 1e-9);
		near(r.vcpu[i].limit_pps, bp / 8, 1e-9);
		near(r.vcpu[i].slowed_pct, 75, 1e-9);
		near(sched_migration_vcpu_limit(m, (unsigned)i), bp / 8, 1e-9);
	}
	assert_true(sched_migration_vcpu_limit(m, 99) == 0);
	/* Cancel: everything lifted, level back to 0; the next round continues unthrottled. */
	sched_migration_lift(m);
	assert_int_equal(sched_migration_throttle_level(m), 0);
	for (unsigned i = 0; i < 4; i++)
		assert_true(sched_migration_vcpu_limit(m, i) == 0);
	sched_migration_free(m);
}

static void quota_sleep(void **state)
{
	(void)state;
	/* 1000 pages/s: 100 pages take 100 ms; 50 ms passed: sleep 50 ms. */
	assert_int_equal(sched_quota_sleep_ns(1000, 100, 50 * MS), 50 * MS);
	assert_int_equal(sched_quota_sleep_ns(1000, 100, 100 * MS), 0);
	assert_int_equal(sched_quota_sleep_ns(1000, 100, 200 * MS), 0);
	assert_int_equal(sched_quota_sleep_ns(1000, 0, 0), 0);
	assert_int_equal(sched_quota_sleep_ns(0, 100000, 0), 0);     /* unlimited */
	assert_int_equal(sched_quota_sleep_ns(-1, 100000, 0), 0);
	assert_int_equal(sched_quota_sleep_ns(NAN, 100000, 0), 0);
	/* A full 4096-entry ring at 256 pages/s: 16 s owed. */
	assert_int_equal(sched_quota_sleep_ns(256, 4096, 0), 16 * SEC);
	assert_int_equal(sched_quota_ns_per_page(1000), 1000000);
	assert_int_equal(sched_quota_ns_per_page(3), 333333333);
	assert_int_equal(sched_quota_ns_per_page(0), 0);
	/* Absurdly small limits saturate instead of overflowing. */
	assert_true(sched_quota_sleep_ns(1e-12, UINT64_MAX, 0) <= 1000000000000000000ull);
}

static void quota_stateful(void **state)
{
	(void)state;
	struct sched_quota q = {0};
	/* First check only starts the accounting. */
	assert_int_equal(sched_quota_check(&q, 1000, 10 * SEC, 5000, 0), 0);
	/* 100 pages in 50 ms at 1000/s: 50 ms owed. */
	assert_int_equal(sched_quota_check(&q, 1000, 10 * SEC + 50 * MS, 5100, 0), 50 * MS);
	/* It slept those 50 ms; 100 more pages right after: another 100 ms. */
	assert_int_equal(sched_quota_check(&q, 1000, 10 * SEC + 100 * MS, 5200, 0), 100 * MS);
	/* A capped sleep carries the rest: 1000 pages = 1 s owed, 200 ms at a time. */
	struct sched_quota c = {0};
	uint64_t t = 0;
	sched_quota_check(&c, 1000, t, 0, 0);
	uint64_t s = sched_quota_check(&c, 1000, t, 1000, 200 * MS);
	uint64_t total = 0;
	int checks = 0;
	while (s) {
		total += s;
		t += s;
		checks++;
		s = sched_quota_check(&c, 1000, t, 1000, 200 * MS);
	}
	assert_int_equal(total, 1 * SEC);
	assert_int_equal(checks, 5);
	/* Idle time is not banked: after 10 s idle, 100 pages at once still owe 100 ms. */
	t += 10 * SEC;
	assert_int_equal(sched_quota_check(&c, 1000, t, 1000, 0), 0);
	assert_int_equal(sched_quota_check(&c, 1000, t, 1100, 0), 100 * MS);
	/* A lifted limit clears the debt. */
	assert_int_equal(sched_quota_check(&c, 0, t, 1200, 0), 0);
	assert_int_equal(sched_quota_check(&c, 1000, t, 1200, 0), 0);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(fill_max_min),
		cmocka_unit_test(fill_floor),
		cmocka_unit_test(even_split_without_per_vcpu_rates),
		cmocka_unit_test(quota_sleep),
		cmocka_unit_test(quota_stateful),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
