// SPDX-License-Identifier: Apache-2.0
/*
 * The migration policy: defaults, validation, and the two budgets that scale with the
 * guest's size — the completion timeout (KubeVirt completionTimeoutPerGiB, Nova
 * live_migration_completion_timeout) and the stepped downtime target (Nova
 * live_migration_downtime, _steps, _delay). docs/scheduler.md says why each default is
 * what it is.
 */
#include "scheduler/scheduler.h"

#include <errno.h>
#include <stdio.h>

void sched_policy_default(struct sched_policy *p)
{
	*p = (struct sched_policy){
		.downtime_ms = 300,
		.downtime_steps = 0,
		.downtime_delay_s_per_gib = 75,
		.completion_timeout_s_per_gib = 150,
		.progress_timeout_s = 150,
		.timeout_action = SCHED_TIMEOUT_ABORT,
		.allow_postcopy = false,
		.postcopy_after_rounds = -1,
		.act_on_stall = false,
		.stall_rounds = 3,
		.stall_ratio = 0.9,
		.throttle = true,
		.throttle_alpha = 0.5,
		.throttle_max_level = 4,
		.throttle_floor_pps = 256,
	};
}

#define FAIL(...)                                         \
	do {                                              \
		if (err && errlen)                        \
			snprintf(err, errlen, __VA_ARGS__); \
		return -EINVAL;                           \
	} while (0)

int sched_policy_check(const struct sched_policy *p, char *err, size_t errlen)
{
	if (p->downtime_ms < 1 || p->downtime_ms > 60000)
		FAIL("downtime_ms must be 1..60000");
	if (p->downtime_steps > 1000)
		FAIL("downtime_steps must be 0..1000");
	if (p->downtime_delay_s_per_gib > 86400)
		FAIL("downtime_delay_s_per_gib must be 0..86400");
	if (p->completion_timeout_s_per_gib > 86400)
		FAIL("completion_timeout_s_per_gib must be 0..86400 (0 = none)");
	if (p->progress_timeout_s > 7 * 86400)
		FAIL("progress_timeout_s must be 0..604800 (0 = none)");
	if (p->timeout_action > SCHED_TIMEOUT_POSTCOPY)
		FAIL("timeout_action must be abort, switchover or postcopy");
	if (p->timeout_action == SCHED_TIMEOUT_POSTCOPY && !p->allow_postcopy)
		FAIL("timeout_action postcopy needs allow_postcopy");
	if (p->postcopy_after_rounds < -1 || p->postcopy_after_rounds > 1000)
		FAIL("postcopy_after_rounds must be -1..1000 (-1 = only as a last resort)");
	if (p->postcopy_after_rounds >= 0 && !p->allow_postcopy)
		FAIL("postcopy_after_rounds needs allow_postcopy");
	if (p->stall_rounds < 1 || p->stall_rounds > 64)
		FAIL("stall_rounds must be 1..64");
	if (!(p->stall_ratio > 0.0 && p->stall_ratio <= 1.0))
		FAIL("stall_ratio must be in (0, 1]");
	if (!(p->throttle_alpha > 0.0 && p->throttle_alpha < 1.0))
		FAIL("throttle_alpha must be in (0, 1)");
	if (p->throttle_max_level < 1 || p->throttle_max_level > 16)
		FAIL("throttle_max_level must be 1..16");
	if (p->throttle_floor_pps < 1)
		FAIL("throttle_floor_pps must be at least 1");
	return 0;
}

/* The guest size the per-GiB budgets scale with, in GiB. */
static double scale_gib(uint64_t mem_bytes)
{
	double gib = (double)mem_bytes / (double)SCHED_GIB;
	return gib < SCHED_MIN_SCALE_GIB ? (double)SCHED_MIN_SCALE_GIB : gib;
}

double sched_downtime_target_ms(const struct sched_policy *p, uint64_t elapsed_ns,
				uint64_t mem_bytes, uint32_t *ret_step)
{
	uint32_t steps = p->downtime_steps;
	double max = (double)p->downtime_ms;
	if (steps == 0) {
		if (ret_step)
			*ret_step = 0;
		return max;
	}
	double interval_ns = (double)p->downtime_delay_s_per_gib * scale_gib(mem_bytes) * 1e9;
	uint32_t step = steps;
	if (interval_ns > 0) {
		double k = (double)elapsed_ns / interval_ns;
		if (k < (double)steps)
			step = (uint32_t)k;
	}
	if (ret_step)
		*ret_step = step;
	if (step >= steps)
		return max;
	double base = max / steps;
	return base + (max - base) / steps * step;
}

uint64_t sched_completion_budget_ns(const struct sched_policy *p, uint64_t mem_bytes)
{
	if (!p->completion_timeout_s_per_gib)
		return 0;
	return (uint64_t)((double)p->completion_timeout_s_per_gib * scale_gib(mem_bytes) * 1e9);
}
