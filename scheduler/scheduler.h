/* SPDX-License-Identifier: Apache-2.0 */
/*
 * scheduler: the pure decision logic of a migration. No syscalls and no clocks: every
 * function takes the measurements and the current time (in ns) from its caller, so the whole
 * library is tested deterministically with made-up inputs. Nothing here locks: the caller
 * serialises calls on one object (docs/scheduler.md has the model and every default).
 *
 * Parts, in order: rate estimators (a counter's rate, send bandwidth, per-vCPU dirty
 * rates, expected downtime); the policy (KubeVirt/Nova-style timeouts, stepped downtime);
 * the per-migration decision called once per precopy round and on timer ticks, with the
 * record of each decision; throttling by per-vCPU dirty limits and the vCPU's sleep quota;
 * per-host admission of migrations; the bandwidth share of a link.
 */
#ifndef FERRY_SCHEDULER_H
#define FERRY_SCHEDULER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define SCHED_PAGE_SIZE 4096u
#define SCHED_GIB 1073741824ull
#define SCHED_MAX_VCPUS 256u

/* ---------------- estimators ---------------- */

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

#define SCHED_BW_SAMPLES 32u

/*
 * Send bandwidth: bytes over the time actually spent sending them, over the samples of the
 * last window_ns (the newest always counts). Idle gaps between rounds (harvest, ROUND_END)
 * do not dilute it, and a tiny send weighs by its bytes, so a latency-bound last round does
 * not drag the estimate down.
 */
struct sched_bw {
	uint64_t window_ns;
	unsigned head;
	unsigned count;
	uint64_t t_ns[SCHED_BW_SAMPLES];
	uint64_t bytes[SCHED_BW_SAMPLES];
	uint64_t busy_ns[SCHED_BW_SAMPLES];
};

void sched_bw_init(struct sched_bw *b, uint64_t window_ns);
/* One send: `bytes` went out in `busy_ns` of sending, ending at now_ns. Ignored if busy_ns
 * is 0 or now_ns is before the newest sample. */
void sched_bw_add(struct sched_bw *b, uint64_t now_ns, uint64_t bytes, uint64_t busy_ns);
/* Bytes per second over the window; 0 before the first sample. */
double sched_bw_bytes_per_sec(const struct sched_bw *b);

/*
 * Per-vCPU dirty rates from the tracker's cumulative per-vCPU counts
 * (tracker_vcpu_dirty_count), one sched_rate per vCPU. Sample right after the round's
 * tracker_sync, when every ring has been harvested and the counts are current.
 */
struct sched_dirty;

int sched_dirty_new(unsigned nr_vcpus, uint64_t window_ns, struct sched_dirty **ret);
void sched_dirty_free(struct sched_dirty *d);
/* counts[i] is vCPU i's cumulative count at now_ns; n may be below nr_vcpus. */
void sched_dirty_add(struct sched_dirty *d, uint64_t now_ns, const uint64_t *counts,
		     unsigned n);
/* Pages/s of vCPU idx (0 for an unknown idx or fewer than two samples). */
double sched_dirty_vcpu_pps(const struct sched_dirty *d, unsigned idx);
/* Fills ret_pps[0..min(n, nr_vcpus)) and returns how many it filled. */
unsigned sched_dirty_rates(const struct sched_dirty *d, double *ret_pps, unsigned n);
double sched_dirty_total_pps(const struct sched_dirty *d);

/*
 * Expected downtime of a switch-over now, in ms: the remaining dirty bytes and the state
 * both go at the measured bandwidth, plus one round trip for the commit. -1 when the
 * bandwidth is unknown (<= 0).
 */
double sched_expected_downtime_ms(uint64_t remaining_bytes, uint64_t state_bytes,
				  double bandwidth_Bps, uint64_t rtt_ns);
/*
 * Remaining dirty bytes after one more round: the round lasts remaining / bandwidth and
 * the guest dirties at dirty_Bps meanwhile, never more than mem_bytes (0 = no cap).
 * Returns remaining_bytes unchanged when the bandwidth is unknown.
 */
uint64_t sched_remaining_next(uint64_t remaining_bytes, double dirty_Bps, double bandwidth_Bps,
			      uint64_t mem_bytes);

/* ---------------- policy ---------------- */

/* What happens when the completion or progress timeout fires (or on a hopeless stall with
 * act_on_stall). */
enum sched_timeout_action {
	SCHED_TIMEOUT_ABORT,      /* cancel; the VM keeps running here (KubeVirt, Nova default) */
	SCHED_TIMEOUT_SWITCHOVER, /* pause and switch over whatever the downtime */
	SCHED_TIMEOUT_POSTCOPY,   /* run on the destination now, pull the rest (needs
				   * allow_postcopy; refused by sched_policy_check otherwise) */
};

/*
 * Every knob of the per-migration decision. Budgets "per GiB" scale with the guest memory,
 * counting a guest under SCHED_MIN_SCALE_GIB as that size (Nova does the same), so a small
 * guest still gets time for connection setup and the first copy. 0 turns a timeout off.
 */
#define SCHED_MIN_SCALE_GIB 2u
struct sched_policy {
	uint32_t downtime_ms;                  /* max downtime target; default 300 (config) */
	uint32_t downtime_steps;               /* 0: flat target; N: Nova-style ramp, default 0 */
	uint32_t downtime_delay_s_per_gib;     /* time between steps per GiB; default 75 */
	uint32_t completion_timeout_s_per_gib; /* whole precopy budget; default 150 */
	uint32_t progress_timeout_s;           /* no new low in remaining for this long; 150 */
	enum sched_timeout_action timeout_action; /* default SCHED_TIMEOUT_ABORT */
	bool allow_postcopy;                   /* default false: see docs/scheduler.md */
	int32_t postcopy_after_rounds;         /* -1 (default): postcopy only as a last resort
						* (stall, timeout); N >= 0: postcopy once N
						* precopy rounds are done, unless precopy
						* converged first (0: no precopy round at all);
						* needs allow_postcopy */
	bool act_on_stall;                     /* hopeless stall: act now, not at the timeout;
						* default false */
	uint32_t stall_rounds;                 /* rounds without shrinking = stalled; default 3 */
	double stall_ratio;                    /* "not shrinking": >= ratio * recent min; 0.9 */
	bool throttle;                         /* per-vCPU dirty limits on a stall; default true */
	double throttle_alpha;                 /* level L allows alpha^L of the link; 0.5 */
	uint32_t throttle_max_level;           /* default 4 (1/16 of the link) */
	uint32_t throttle_floor_pps;           /* no limit below this; default 256 (1 MiB/s) */
};

void sched_policy_default(struct sched_policy *p);
/* 0, or -EINVAL with a message naming the field in err. */
int sched_policy_check(const struct sched_policy *p, char *err, size_t errlen);
/*
 * The downtime target at elapsed_ns into the migration (ms), and which step it is (0..steps;
 * steps when stepping is off). With steps N, max M and delay D s/GiB (Nova's
 * live_migration_downtime, _steps, _delay): step i starts at i * D * GiB and allows
 * M/N + i * (M - M/N)/N ms, reaching M at step N.
 */
double sched_downtime_target_ms(const struct sched_policy *p, uint64_t elapsed_ns,
				uint64_t mem_bytes, uint32_t *ret_step);
/* The completion budget in ns for a guest of mem_bytes; 0 when off. */
uint64_t sched_completion_budget_ns(const struct sched_policy *p, uint64_t mem_bytes);

/* ---------------- the per-migration decision ---------------- */

enum sched_action {
	SCHED_CONTINUE,   /* next round, no dirty limits (lift any) */
	SCHED_THROTTLE,   /* next round with the per-vCPU limits in the record */
	SCHED_SWITCHOVER, /* pause and switch over now; limits lifted */
	SCHED_POSTCOPY,   /* switch to postcopy now; limits lifted */
	SCHED_ABORT,      /* give up; the VM keeps running here; limits lifted */
};

enum sched_reason {
	SCHED_R_PRECOPY,            /* shrinking (or not judged yet): keep going */
	SCHED_R_NO_ESTIMATE,        /* no bandwidth measured yet */
	SCHED_R_CONVERGED,          /* expected downtime fits the target */
	SCHED_R_THROTTLE_STEP,      /* stalled: throttle raised one level (or more) */
	SCHED_R_THROTTLE_HOLD,      /* throttled and shrinking: keep the level */
	SCHED_R_STALLED,            /* stalled, nothing left to try: waiting for a timeout */
	SCHED_R_STALL_POSTCOPY,     /* stalled with throttling exhausted: postcopy */
	SCHED_R_STALL_ACTION,       /* stalled, exhausted, act_on_stall: the timeout action */
	SCHED_R_COMPLETION_TIMEOUT, /* completion budget spent */
	SCHED_R_PROGRESS_TIMEOUT,   /* no new low in remaining for progress_timeout_s */
	SCHED_R_POSTCOPY_AFTER,     /* postcopy_after_rounds precopy rounds are done */
};

const char *sched_action_name(enum sched_action a);  /* "continue", "throttle", ... */
const char *sched_reason_name(enum sched_reason r);  /* "converged", "stalled", ... */

/*
 * What the engine measured. At a round boundary (tick false) this is right after the
 * round's harvest: remaining_bytes is the dirty set the next round (or the switch-over)
 * must send. On a timer tick inside a round (tick true) remaining_bytes is what this round
 * still has to send; only the completion timeout is judged on ticks.
 */
struct sched_measure {
	uint64_t now_ns;          /* monotonic; recorded */
	uint64_t elapsed_ns;      /* since precopy began: drives timeouts and steps */
	uint32_t round;           /* precopy round just finished (1 = the full copy; 0 = none
				   * yet: the decision before round 1) */
	bool tick;
	uint64_t remaining_bytes;
	uint64_t bytes_sent;      /* cumulative; recorded */
	uint64_t mem_bytes;       /* guest memory */
	uint64_t state_bytes;     /* vCPU + device state sent during the downtime */
	uint64_t rtt_ns;          /* measured control round trip (0 = unknown) */
	double bandwidth_Bps;     /* sched_bw estimate; 0 = unknown */
	double dirty_pps;         /* total pages/s; 0 = the sum of vcpu_dirty_pps */
	unsigned nr_vcpus;        /* entries in vcpu_dirty_pps */
	const double *vcpu_dirty_pps; /* per-vCPU pages/s; NULL = unknown (bitmap backend):
				       * the total is spread evenly over nr_vcpus */
};

/* One vCPU's line in a record. */
struct sched_vcpu_report {
	double dirty_pps;  /* as measured */
	double demand_pps; /* what it would dirty unthrottled (rate seen before its limit) */
	double limit_pps;  /* 0 = unlimited */
	double slowed_pct; /* 100 * (1 - limit / demand), 0 when unlimited */
};

/*
 * One decision with everything it was based on, for the migration's history (the engine
 * keeps these and serialises them with sched_record_json).
 */
struct sched_round_record {
	/* inputs, as given */
	uint64_t now_ns;
	uint64_t elapsed_ns;
	uint32_t round;
	bool tick;
	uint64_t remaining_bytes;
	uint64_t bytes_sent;
	uint64_t mem_bytes;
	uint64_t state_bytes;
	uint64_t rtt_ns;
	double bandwidth_Bps;
	double dirty_pps;            /* total as measured */
	/* derived */
	double dirty_Bps;            /* effective: each vCPU at min(measured, limit) */
	double expected_downtime_ms; /* -1 = unknown */
	double downtime_target_ms;
	uint32_t downtime_step;
	uint64_t completion_budget_ns;  /* 0 = none */
	uint64_t since_progress_ns;     /* since the last new low of remaining */
	uint64_t low_remaining_bytes;   /* that low (the progress watermark) */
	uint32_t stall_count;           /* consecutive rounds not shrinking */
	uint32_t dirty_over_count;      /* consecutive rounds dirtying >= bandwidth */
	bool stalled;
	uint32_t throttle_level;        /* 0 = off */
	double throttle_budget_pps;     /* total dirty rate allowed at this level; 0 = off */
	/* the decision */
	enum sched_action action;
	enum sched_reason reason;
	char why[192]; /* one human-readable sentence with the figures */
	unsigned nr_vcpus;
	struct sched_vcpu_report vcpu[SCHED_MAX_VCPUS];
};

/*
 * Writes r as one JSON object (no newline) into buf. Returns its length, or -ENOSPC if
 * buf is too small (buf then holds a truncated, NUL-terminated prefix).
 */
int sched_record_json(const struct sched_round_record *r, char *buf, size_t len);

/* The per-migration state: progress watermark, stall history, throttle level. */
struct sched_migration;

/* -EINVAL if the policy fails sched_policy_check or nr_vcpus > SCHED_MAX_VCPUS. */
int sched_migration_new(const struct sched_policy *p, unsigned nr_vcpus,
			struct sched_migration **ret);
void sched_migration_free(struct sched_migration *m);
/*
 * Decides, once per round boundary and on timer ticks. Always fills *ret (its action says
 * what to do; for THROTTLE apply ret->vcpu[i].limit_pps, 0 = unlimited). Order at a round
 * boundary: converged -> switch over; postcopy_after_rounds reached -> postcopy; completion
 * timeout; progress timeout; stall ->
 * throttle a level up, or when throttling is exhausted postcopy (if allowed) /
 * act_on_stall / wait; otherwise continue at the current level.
 */
void sched_migration_decide(struct sched_migration *m, const struct sched_measure *in,
			    struct sched_round_record *ret);
/* Drops every limit (cancel, operator-forced switch-over); the level restarts at 0. */
void sched_migration_lift(struct sched_migration *m);
/* vCPU idx's current limit in pages/s; 0 = unlimited. */
double sched_migration_vcpu_limit(const struct sched_migration *m, unsigned idx);
uint32_t sched_migration_throttle_level(const struct sched_migration *m);

/* ---------------- throttling ---------------- */

/*
 * Max-min fair split of a total dirty budget (pages/s) over vCPUs with the given demands:
 * vCPUs under the water level keep their demand (limit 0 = unlimited), the rest share what
 * is left equally; no limit is below floor_pps, and a vCPU whose demand is under the floor
 * is never limited. Returns the water level, or 0 when the demands fit the budget (no
 * limits at all).
 */
double sched_throttle_fill(const double *demand_pps, unsigned n, double budget_pps,
			   double floor_pps, double *ret_limit_pps);

/*
 * How long a vCPU limited to limit_pps must sleep, having dirtied `pages` in the elapsed_ns
 * since its last check: pages take pages / limit seconds, of which elapsed_ns already
 * passed. 0 when unlimited (limit_pps <= 0) or within budget.
 */
uint64_t sched_quota_sleep_ns(double limit_pps, uint64_t pages, uint64_t elapsed_ns);
/* The sleep owed per harvested page at limit_pps (ns); 0 when unlimited. */
uint64_t sched_quota_ns_per_page(double limit_pps);

/*
 * The same as per-vCPU state for the vCPU thread (ring-full exit, or a periodic quota
 * check): keeps the time at which the vCPU's budget balances, so debt beyond max_sleep_ns
 * carries to the next check instead of being forgotten, while unused budget is not banked.
 * Zero-initialise; a lifted limit (<= 0) clears the debt.
 */
struct sched_quota {
	uint64_t due_ns; /* budget balances at this time */
	uint64_t count;  /* cumulative dirty count at the last check */
	bool started;
};
/* count is the vCPU's cumulative dirty count; returns ns to sleep (<= max_sleep_ns, 0 =
 * no cap). */
uint64_t sched_quota_check(struct sched_quota *q, double limit_pps, uint64_t now_ns,
			   uint64_t count, uint64_t max_sleep_ns);

/* ---------------- per-host admission ---------------- */

enum sched_dir { SCHED_DIR_OUT, SCHED_DIR_IN };

/*
 * At most max_out outgoing and max_in incoming migrations run at once; the rest wait in a
 * queue per direction, higher priority first and FIFO within a priority. A limit of 0
 * refuses that direction (as limits.max_* in the config). The caller locks.
 */
struct sched_admission;

int sched_admission_new(unsigned max_out, unsigned max_in, struct sched_admission **ret);
void sched_admission_free(struct sched_admission *a);
/* Changes the limits; running migrations keep running, call _next() for the queue. */
void sched_admission_set_limits(struct sched_admission *a, unsigned max_out, unsigned max_in);
/*
 * Adds migration id: 1 if it may start now (it counts as running), 0 if it waits,
 * -EEXIST (id known), -EPERM (that direction's limit is 0), -ENOMEM.
 */
int sched_admission_enqueue(struct sched_admission *a, uint64_t id, enum sched_dir dir,
			    int priority);
/* Removes id, running or waiting (finished, failed, cancelled); -ENOENT if unknown. */
int sched_admission_finish(struct sched_admission *a, uint64_t id);
/* Starts the next waiting migration that has a free slot: 1 with *ret_id, 0 if none.
 * Call until 0 after every finish and limit change. */
int sched_admission_next(struct sched_admission *a, uint64_t *ret_id);
/* 0 = running, N >= 1 = N-th in its direction's queue, -ENOENT if unknown. */
int sched_admission_position(const struct sched_admission *a, uint64_t id);
unsigned sched_admission_running(const struct sched_admission *a, enum sched_dir dir);
unsigned sched_admission_waiting(const struct sched_admission *a, enum sched_dir dir);

/* ---------------- bandwidth share ---------------- */

struct sched_share_flow {
	double weight;     /* priority; <= 0 (or NaN) counts as 1 */
	double demand_Bps; /* what it can use; <= 0 = unbounded */
};

/*
 * Weighted max-min fair split of a path's capacity among the migrations using it: a flow
 * whose demand is below its weighted share gets its demand and the rest is redistributed
 * to the others in proportion to their weights. ret_cap_Bps[i] is flow i's cap. With
 * capacity <= 0 (unlimited) each cap is the flow's demand (0 = uncapped). Returns the
 * capacity left unused (0 when every flow is unbounded).
 */
double sched_share(double capacity_Bps, const struct sched_share_flow *flows, unsigned n,
		   double *ret_cap_Bps);

#endif
