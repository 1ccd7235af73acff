// SPDX-License-Identifier: Apache-2.0
/*
 * Description: per-host admission of migrations: at most N outgoing and M incoming at once,
 * the rest queued FIFO (higher priority first) with visible positions; finishing a running
 * or a queued one, limit changes, a closed direction, duplicates and unknown ids.
 */
#include "testutil.h"

#include <errno.h>

#include "scheduler/scheduler.h"

static void fifo_and_positions(void **state)
{
	(void)state;
	struct sched_admission *a;
	assert_int_equal(sched_admission_new(2, 2, &a), 0);
	/* Two start at once, three wait in arrival order. */
	assert_int_equal(sched_admission_enqueue(a, 11, SCHED_DIR_OUT, 0), 1);
	assert_int_equal(sched_admission_enqueue(a, 12, SCHED_DIR_OUT, 0), 1);
	assert_int_equal(sched_admission_enqueue(a, 13, SCHED_DIR_OUT, 0), 0);
	assert_int_equal(sched_admission_enqueue(a, 14, SCHED_DIR_OUT, 0), 0);
	assert_int_equal(sched_admission_enqueue(a, 15, SCHED_DIR_OUT, 0), 0);
	assert_int_equal(sched_admission_running(a, SCHED_DIR_OUT), 2);
	assert_int_equal(sched_admission_waiting(a, SCHED_DIR_OUT), 3);
	assert_int_equal(sched_admission_position(a, 11), 0);
	assert_int_equal(sched_admission_position(a, 12), 0);
	assert_int_equal(sched_admission_position(a, 13), 1);
	assert_int_equal(sched_admission_position(a, 14), 2);
	assert_int_equal(sched_admission_position(a, 15), 3);
	uint64_t id = 0;
	assert_int_equal(sched_admission_next(a, &id), 0); /* no free slot */

	/* Incoming has its own slots and queue. */
	assert_int_equal(sched_admission_enqueue(a, 21, SCHED_DIR_IN, 0), 1);
	assert_int_equal(sched_admission_enqueue(a, 22, SCHED_DIR_IN, 0), 1);
	assert_int_equal(sched_admission_enqueue(a, 23, SCHED_DIR_IN, 0), 0);
	assert_int_equal(sched_admission_position(a, 23), 1);

	/* 12 finishes: 13 starts, the others move up. */
	assert_int_equal(sched_admission_finish(a, 12), 0);
	assert_int_equal(sched_admission_next(a, &id), 1);
	assert_int_equal(id, 13);
	assert_int_equal(sched_admission_next(a, &id), 0);
	assert_int_equal(sched_admission_position(a, 13), 0);
	assert_int_equal(sched_admission_position(a, 14), 1);
	assert_int_equal(sched_admission_position(a, 15), 2);

	/* A queued one is cancelled: the one behind moves up, nothing starts. */
	assert_int_equal(sched_admission_finish(a, 14), 0);
	assert_int_equal(sched_admission_position(a, 15), 1);
	assert_int_equal(sched_admission_next(a, &id), 0);
	assert_int_equal(sched_admission_position(a, 14), -ENOENT);

	/* A new arrival with a free slot but someone waiting does not jump the queue. */
	assert_int_equal(sched_admission_finish(a, 11), 0);
	assert_int_equal(sched_admission_enqueue(a, 16, SCHED_DIR_OUT, 0), 0);
	assert_int_equal(sched_admission_position(a, 16), 2);
	assert_int_equal(sched_admission_next(a, &id), 1);
	assert_int_equal(id, 15);
	assert_int_equal(sched_admission_position(a, 16), 1);

	/* Finishing an incoming one starts the next incoming. */
	assert_int_equal(sched_admission_finish(a, 21), 0);
	assert_int_equal(sched_admission_next(a, &id), 1);
	assert_int_equal(id, 23);
	assert_int_equal(sched_admission_running(a, SCHED_DIR_IN), 2);
	assert_int_equal(sched_admission_waiting(a, SCHED_DIR_IN), 0);
	sched_admission_free(a);
	sched_admission_free(NULL);
}

static void priorities(void **state)
{
	(void)state;
	struct sched_admission *a;
	assert_int_equal(sched_admission_new(1, 1, &a), 0);
	assert_int_equal(sched_admission_enqueue(a, 1, SCHED_DIR_OUT, 0), 1);
	assert_int_equal(sched_admission_enqueue(a, 2, SCHED_DIR_OUT, 0), 0);
	assert_int_equal(sched_admission_enqueue(a, 3, SCHED_DIR_OUT, 5), 0);
	assert_int_equal(sched_admission_enqueue(a, 4, SCHED_DIR_OUT, 5), 0);
	assert_int_equal(sched_admission_enqueue(a, 5, SCHED_DIR_OUT, -1), 0);
	/* Higher priority first, FIFO within a priority. */
	assert_int_equal(sched_admission_position(a, 3), 1);
	assert_int_equal(sched_admission_position(a, 4), 2);
	assert_int_equal(sched_admission_position(a, 2), 3);
	assert_int_equal(sched_admission_position(a, 5), 4);
	uint64_t order[4], id;
	for (unsigned i = 0; i < 4; i++) {
		uint64_t running = i == 0 ? 1 : order[i - 1];
		assert_int_equal(sched_admission_finish(a, running), 0);
		assert_int_equal(sched_admission_next(a, &id), 1);
		order[i] = id;
	}
	assert_int_equal(order[0], 3);
	assert_int_equal(order[1], 4);
	assert_int_equal(order[2], 2);
	assert_int_equal(order[3], 5);
	sched_admission_free(a);
}

static void limits_and_errors(void **state)
{
	(void)state;
	struct sched_admission *a;
	assert_int_equal(sched_admission_new(1, 0, &a), 0);
	/* Incoming closed (limits.max_incoming: 0): refused, not queued. */
	assert_int_equal(sched_admission_enqueue(a, 9, SCHED_DIR_IN, 0), -EPERM);
	assert_int_equal(sched_admission_position(a, 9), -ENOENT);
	assert_int_equal(sched_admission_enqueue(a, 1, SCHED_DIR_OUT, 0), 1);
	assert_int_equal(sched_admission_enqueue(a, 1, SCHED_DIR_OUT, 0), -EEXIST);
	assert_int_equal(sched_admission_enqueue(a, 1, SCHED_DIR_IN, 0), -EEXIST);
	assert_int_equal(sched_admission_enqueue(a, 7, (enum sched_dir)5, 0), -EINVAL);
	assert_int_equal(sched_admission_finish(a, 42), -ENOENT);
	/* Many waiting (the array grows). */
	for (uint64_t id = 100; id < 140; id++)
		assert_int_equal(sched_admission_enqueue(a, id, SCHED_DIR_OUT, 0), 0);
	assert_int_equal(sched_admission_position(a, 139), 40);
	/* Raising the limit lets three more start, in order. */
	sched_admission_set_limits(a, 4, 0);
	uint64_t id;
	for (uint64_t want = 100; want < 103; want++) {
		assert_int_equal(sched_admission_next(a, &id), 1);
		assert_int_equal(id, want);
	}
	assert_int_equal(sched_admission_next(a, &id), 0);
	assert_int_equal(sched_admission_position(a, 139), 37);
	/* Lowering it stops nothing that runs; starts wait until below the new limit. */
	sched_admission_set_limits(a, 2, 0);
	assert_int_equal(sched_admission_running(a, SCHED_DIR_OUT), 4);
	assert_int_equal(sched_admission_finish(a, 1), 0);
	assert_int_equal(sched_admission_finish(a, 100), 0);
	assert_int_equal(sched_admission_next(a, &id), 0); /* 2 running = the limit */
	assert_int_equal(sched_admission_finish(a, 101), 0);
	assert_int_equal(sched_admission_next(a, &id), 1);
	assert_int_equal(id, 103);
	sched_admission_free(a);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(fifo_and_positions),
		cmocka_unit_test(priorities),
		cmocka_unit_test(limits_and_errors),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
