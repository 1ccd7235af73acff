// SPDX-License-Identifier: Apache-2.0
/*
 * Description: the scheduler's sliding-window rate estimator, fed made-up samples (time is
 * passed in): steady rates, window expiry, counter resets, out-of-order samples.
 */
#include "testutil.h"

#include "scheduler/scheduler.h"

#define MS 1000000ull

static void steady_rate(void **state)
{
	(void)state;
	struct sched_rate r;
	sched_rate_init(&r, 1000 * MS);
	assert_true(sched_rate_per_sec(&r) == 0.0);
	sched_rate_add(&r, 0, 0);
	assert_true(sched_rate_per_sec(&r) == 0.0); /* one sample: no rate yet */
	for (uint64_t t = 100; t <= 3000; t += 100)
		sched_rate_add(&r, t * MS, t * 5); /* 5 per ms = 5000/s */
	double v = sched_rate_per_sec(&r);
	assert_true(v > 4999.0 && v < 5001.0);
}

static void window_forgets_old_burst(void **state)
{
	(void)state;
	struct sched_rate r;
	sched_rate_init(&r, 500 * MS);
	sched_rate_add(&r, 0, 0);
	sched_rate_add(&r, 100 * MS, 1000000); /* burst */
	for (uint64_t t = 200; t <= 2000; t += 100)
		sched_rate_add(&r, t * MS, 1000000 + (t - 100)); /* then 1 per ms */
	double v = sched_rate_per_sec(&r);
	assert_true(v > 900.0 && v < 1100.0);
}

static void reset_and_disorder(void **state)
{
	(void)state;
	struct sched_rate r;
	sched_rate_init(&r, 1000 * MS);
	sched_rate_add(&r, 100 * MS, 500);
	sched_rate_add(&r, 200 * MS, 600);
	sched_rate_add(&r, 150 * MS, 10); /* older than newest: ignored */
	double v = sched_rate_per_sec(&r);
	assert_true(v > 999.0 && v < 1001.0);
	sched_rate_add(&r, 300 * MS, 5); /* counter went backwards: new window */
	assert_true(sched_rate_per_sec(&r) == 0.0);
	sched_rate_add(&r, 400 * MS, 105);
	v = sched_rate_per_sec(&r);
	assert_true(v > 999.0 && v < 1001.0);
}

static void many_samples_wrap(void **state)
{
	(void)state;
	struct sched_rate r;
	sched_rate_init(&r, 100000 * MS); /* window longer than the ring */
	for (uint64_t i = 0; i < 10 * SCHED_RATE_SAMPLES; i++)
		sched_rate_add(&r, (i + 1) * MS, i * 2);
	double v = sched_rate_per_sec(&r);
	assert_true(v > 1999.0 && v < 2001.0);
	assert_true(r.count <= SCHED_RATE_SAMPLES);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(steady_rate),
		cmocka_unit_test(window_forgets_old_burst),
		cmocka_unit_test(reset_and_disorder),
		cmocka_unit_test(many_samples_wrap),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
