/* SPDX-License-Identifier: Apache-2.0 */
/*
 * scheduler: the pure decision logic of a migration. No syscalls and no clocks: every
 * function takes the measurements and the current time (in ns) from its caller, so the whole
 * library is tested deterministically with made-up inputs.
 *
 * This first part is the rate estimator that turns cumulative counters (pages dirtied,
 * bytes sent) sampled at arbitrary times into a smoothed rate over a sliding window.
 */
#ifndef FERRY_SCHEDULER_H
#define FERRY_SCHEDULER_H

#include <stdint.h>

#define SCHED_RATE_SAMPLES 32u

/*
 * Sliding-window rate of a monotonic counter. Samples older than window_ns (relative to the
 * newest) are dropped; the rate is (newest - oldest kept) / (their time difference).
 */
struct sched_rate {
	uint64_t window_ns;
	unsigned head;  /* index of the oldest sample */
	unsigned count; /* samples held */
	uint64_t t_ns[SCHED_RATE_SAMPLES];
	uint64_t value[SCHED_RATE_SAMPLES];
};

void sched_rate_init(struct sched_rate *r, uint64_t window_ns);
/*
 * Adds a sample of the cumulative counter at time now_ns. Samples with a time not after the
 * newest are ignored, and so is a counter that went backwards (it restarts the window).
 */
void sched_rate_add(struct sched_rate *r, uint64_t now_ns, uint64_t value);
/* Units of the counter per second over the window; 0 with fewer than two samples. */
double sched_rate_per_sec(const struct sched_rate *r);

#endif
