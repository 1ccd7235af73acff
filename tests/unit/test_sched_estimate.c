// SPDX-License-Identifier: Apache-2.0
/*
 * Description: the scheduler's estimators with made-up inputs: send bandwidth as bytes over
 * busy time in a sliding window, per-vCPU dirty rates from cumulative counts, the expected
 * downtime and the one-round projection of the remainder; the policy's defaults, checks
 * and the completion budget.
 */
#include "testutil.h"

#include <errno.h>
#include <string.h>

#include "scheduler/scheduler.h"

#define MS 1000000ull
#define SEC 1000000000ull
#define GIB 1073741824ull

static void near(double got, double want, double tol)
{
	if (!(got >= want - tol && got <= want + tol))
		fail_msg("got %.9f, want %.9f +- %g", got, want, tol);
}

static void bandwidth_busy_time(void **state)
{
	(void)state;
	struct sched_bw b;
	sched_bw_init(&b, 3 * SEC);
	assert_true(sched_bw_bytes_per_sec(&b) == 0);
	/* 1 GB in 1 s of sending, then a 2 s gap (harvest, waiting): still 1 GB/s. */
	sched_bw_add(&b, 1 * SEC, 1000000000, 1 * SEC);
	near(sched_bw_bytes_per_sec(&b), 1e9, 1e-6);
	/* A tiny latency-bound send (4 KiB in 1 ms) weighs by its bytes and time. */
	sched_bw_add(&b, 3 * SEC, 4096, 1 * MS);
	near(sched_bw_bytes_per_sec(&b), 1000004096.0 / 1.001, 1e-3);
	/* 2 GB/s for a while: the old samples leave the window. */
	for (uint64_t t = 4; t <= 10; t++)
		sched_bw_add(&b, t * SEC, 1000000000, 500 * MS);
	near(sched_bw_bytes_per_sec(&b), 2e9, 1e-6);
	/* Ignored: no busy time, or older than the newest. */
	sched_bw_add(&b, 11 * SEC, 5, 0);
	sched_bw_add(&b, 9 * SEC, 1, 1 * SEC);
	near(sched_bw_bytes_per_sec(&b), 2e9, 1e-6);
	/* Only the newest is within the window: it alone counts. */
	sched_bw_add(&b, 100 * SEC, 300000000, 1 * SEC);
	near(sched_bw_bytes_per_sec(&b), 3e8, 1e-6);
	assert_int_equal(b.count, 1);
}

static void per_vcpu_dirty_rates(void **state)
{
	(void)state;
	struct sched_dirty *d;
	assert_int_equal(sched_dirty_new(0, SEC, &d), -EINVAL);
	assert_int_equal(sched_dirty_new(SCHED_MAX_VCPUS + 1, SEC, &d), -EINVAL);
	assert_int_equal(sched_dirty_new(3, 2 * SEC, &d), 0);
	uint64_t c[3] = {0, 0, 0};
	sched_dirty_add(d, 0, c, 3);
	assert_true(sched_dirty_total_pps(d) == 0);
	/* vCPU 0: 1000/s; vCPU 1: 50000/s; vCPU 2 idle. */
	for (uint64_t t = 1; t <= 10; t++) {
		c[0] = t * 1000;
		c[1] = t * 50000;
		sched_dirty_add(d, t * SEC / 2, c, 3);
	}
	near(sched_dirty_vcpu_pps(d, 0), 2000, 1e-9);
	near(sched_dirty_vcpu_pps(d, 1), 100000, 1e-9);
	near(sched_dirty_vcpu_pps(d, 2), 0, 0);
	near(sched_dirty_vcpu_pps(d, 3), 0, 0); /* no such vCPU */
	near(sched_dirty_total_pps(d), 102000, 1e-9);
	double r[4] = {-1, -1, -1, -1};
	assert_int_equal(sched_dirty_rates(d, r, 4), 3);
	near(r[1], 100000, 1e-9);
	assert_true(r[3] == -1);
	/* vCPU 0 slows to 100/s; the 2 s window forgets the old rate. */
	for (uint64_t t = 11; t <= 20; t++) {
		c[0] = 10000 + (t - 10) * 50;
		sched_dirty_add(d, t * SEC / 2, c, 1); /* only vCPU 0 reported */
	}
	near(sched_dirty_vcpu_pps(d, 0), 100, 1e-9);
	near(sched_dirty_vcpu_pps(d, 1), 100000, 1e-9);
	sched_dirty_free(d);
	sched_dirty_free(NULL);
}

static void expected_downtime(void **state)
{
	(void)state;
	/* 100 MB + 1 MB of state at 1 GB/s, plus a 0.5 ms round trip. */
	near(sched_expected_downtime_ms(100000000, 1000000, 1e9, 500000), 101.5, 1e-9);
	near(sched_expected_downtime_ms(0, 0, 1e9, 0), 0, 0);
	near(sched_expected_downtime_ms(100, 0, 0, 0), -1, 0);
	near(sched_expected_downtime_ms(100, 0, -5, 0), -1, 0);
	/* The remainder after one more round: 1 GB at 1 GB/s while dirtying 250 MB/s. */
	assert_int_equal(sched_remaining_next(1000000000, 2.5e8, 1e9, 0), 250000000);
	/* Dirtying faster than the link: it grows, up to guest memory. */
	assert_int_equal(sched_remaining_next(1000000000, 3e9, 1e9, 0), 3000000000ull);
	assert_int_equal(sched_remaining_next(1000000000, 3e9, 1e9, 2 * GIB), 2 * GIB);
	assert_int_equal(sched_remaining_next(1000000000, 0, 1e9, 0), 0);
	assert_int_equal(sched_remaining_next(1000000000, 3e9, 0, 0), 1000000000);
}

static void policy_defaults_and_checks(void **state)
{
	(void)state;
	struct sched_policy p;
	sched_policy_default(&p);
	/* The documented defaults (docs/scheduler.md). */
	assert_int_equal(p.downtime_ms, 300);
	assert_int_equal(p.downtime_steps, 0);
	assert_int_equal(p.downtime_delay_s_per_gib, 75);
	assert_int_equal(p.completion_timeout_s_per_gib, 150);
	assert_int_equal(p.progress_timeout_s, 150);
	assert_int_equal(p.timeout_action, SCHED_TIMEOUT_ABORT);
	assert_false(p.allow_postcopy);
	assert_false(p.act_on_stall);
	assert_int_equal(p.stall_rounds, 3);
	near(p.stall_ratio, 0.9, 0);
	assert_true(p.throttle);
	near(p.throttle_alpha, 0.5, 0);
	assert_int_equal(p.throttle_max_level, 4);
	assert_int_equal(p.throttle_floor_pps, 256);
	char err[128] = "";
	assert_int_equal(sched_policy_check(&p, err, sizeof(err)), 0);

	struct sched_policy q = p;
	q.downtime_ms = 0;
	assert_int_equal(sched_policy_check(&q, err, sizeof(err)), -EINVAL);
	assert_non_null(strstr(err, "downtime_ms"));
	q = p;
	q.stall_ratio = 1.5;
	assert_int_equal(sched_policy_check(&q, err, sizeof(err)), -EINVAL);
	assert_non_null(strstr(err, "stall_ratio"));
	q = p;
	q.throttle_alpha = 1.0;
	assert_int_equal(sched_policy_check(&q, err, sizeof(err)), -EINVAL);
	assert_non_null(strstr(err, "throttle_alpha"));
	q = p;
	q.throttle_max_level = 0;
	assert_int_equal(sched_policy_check(&q, NULL, 0), -EINVAL);
	q = p;
	q.stall_rounds = 0;
	assert_int_equal(sched_policy_check(&q, err, sizeof(err)), -EINVAL);
	assert_non_null(strstr(err, "stall_rounds"));
	q = p;
	q.timeout_action = (enum sched_timeout_action)7;
	assert_int_equal(sched_policy_check(&q, err, sizeof(err)), -EINVAL);

	/* Budgets: 150 s per GiB, a guest under 2 GiB counts as 2 GiB, 0 turns it off. */
	assert_int_equal(sched_completion_budget_ns(&p, 8 * GIB), 1200 * SEC);
	assert_int_equal(sched_completion_budget_ns(&p, 3 * GIB / 2 * 3), 675 * SEC);
	assert_int_equal(sched_completion_budget_ns(&p, 256ull << 20), 300 * SEC);
	q = p;
	q.completion_timeout_s_per_gib = 800; /* Nova's default */
	assert_int_equal(sched_completion_budget_ns(&q, 4 * GIB), 3200 * SEC);
	q.completion_timeout_s_per_gib = 0;
	assert_int_equal(sched_completion_budget_ns(&q, 4 * GIB), 0);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(bandwidth_busy_time),
		cmocka_unit_test(per_vcpu_dirty_rates),
		cmocka_unit_test(expected_downtime),
		cmocka_unit_test(policy_defaults_and_checks),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
