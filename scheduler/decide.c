// SPDX-License-Identifier: Apache-2.0
/*
 * The per-migration decision, called by the engine at every precopy round boundary (and on
 * timer ticks inside long rounds): switch over when the expected downtime fits the
 * (possibly stepped) target; otherwise watch the completion and progress budgets, detect a
 * stall early from the round history, and answer it by raising per-vCPU dirty limits one
 * level at a time, then by postcopy (if allowed), the timeout action (act_on_stall) or by
 * waiting for the timeouts. Every call yields a record of its inputs and its reason.
 */
#include "scheduler/scheduler.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Round-boundary remaining bytes kept for the "not shrinking" test. */
#define STALL_HISTORY 8u

struct sched_migration {
	struct sched_policy pol;
	unsigned nr_vcpus;

	/* Progress: the lowest boundary remaining so far and when it was reached. */
	bool have_low;
	uint64_t low_remaining;
	uint64_t low_ns;

	/* Stall: recent boundary remaining (since the last throttle change) and counters. */
	uint64_t hist[STALL_HISTORY];
	unsigned hist_n, hist_head;
	uint32_t stall_count;
	uint32_t dirty_over;

	/* Throttle. */
	uint32_t level;
	double budget_pps;
	double demand[SCHED_MAX_VCPUS]; /* pages/s each vCPU would dirty unthrottled */
	double limit[SCHED_MAX_VCPUS];  /* 0 = unlimited */
};

const char *sched_action_name(enum sched_action a)
{
	static const char *const names[] = {
		[SCHED_CONTINUE] = "continue",     [SCHED_THROTTLE] = "throttle",
		[SCHED_SWITCHOVER] = "switchover", [SCHED_POSTCOPY] = "postcopy",
		[SCHED_ABORT] = "abort",
	};
	if ((unsigned)a < sizeof(names) / sizeof(names[0]) && names[a])
		return names[a];
	return "unknown";
}

const char *sched_reason_name(enum sched_reason r)
{
	static const char *const names[] = {
		[SCHED_R_PRECOPY] = "precopy",
		[SCHED_R_NO_ESTIMATE] = "no_estimate",
		[SCHED_R_CONVERGED] = "converged",
		[SCHED_R_THROTTLE_STEP] = "throttle_step",
		[SCHED_R_THROTTLE_HOLD] = "throttle_hold",
		[SCHED_R_STALLED] = "stalled",
		[SCHED_R_STALL_POSTCOPY] = "stall_postcopy",
		[SCHED_R_POSTCOPY_AFTER] = "postcopy_after_rounds",
		[SCHED_R_STALL_ACTION] = "stall_action",
		[SCHED_R_COMPLETION_TIMEOUT] = "completion_timeout",
		[SCHED_R_PROGRESS_TIMEOUT] = "progress_timeout",
	};
	if ((unsigned)r < sizeof(names) / sizeof(names[0]) && names[r])
		return names[r];
	return "unknown";
}

int sched_migration_new(const struct sched_policy *p, unsigned nr_vcpus,
			struct sched_migration **ret)
{
	if (sched_policy_check(p, NULL, 0) < 0 || nr_vcpus == 0 || nr_vcpus > SCHED_MAX_VCPUS)
		return -EINVAL;
	struct sched_migration *m = calloc(1, sizeof(*m));
	if (!m)
		return -ENOMEM;
	m->pol = *p;
	m->nr_vcpus = nr_vcpus;
	*ret = m;
	return 0;
}

void sched_migration_free(struct sched_migration *m)
{
	free(m);
}

static void clear_history(struct sched_migration *m)
{
	m->hist_n = 0;
	m->hist_head = 0;
	m->stall_count = 0;
	m->dirty_over = 0;
}

static void push_history(struct sched_migration *m, uint64_t remaining)
{
	if (m->hist_n == STALL_HISTORY) {
		m->hist_head = (m->hist_head + 1) % STALL_HISTORY;
		m->hist_n--;
	}
	m->hist[(m->hist_head + m->hist_n) % STALL_HISTORY] = remaining;
	m->hist_n++;
}

void sched_migration_lift(struct sched_migration *m)
{
	m->level = 0;
	m->budget_pps = 0;
	for (unsigned i = 0; i < m->nr_vcpus; i++)
		m->limit[i] = 0;
}

double sched_migration_vcpu_limit(const struct sched_migration *m, unsigned idx)
{
	return idx < m->nr_vcpus ? m->limit[idx] : 0.0;
}

uint32_t sched_migration_throttle_level(const struct sched_migration *m)
{
	return m->level;
}

/* alpha^level of the link in pages/s: what level `level` lets the guest dirty in total. */
static double level_budget(const struct sched_migration *m, uint32_t level, double bw_Bps)
{
	double b = bw_Bps / SCHED_PAGE_SIZE;
	for (uint32_t i = 0; i < level; i++)
		b *= m->pol.throttle_alpha;
	return b;
}

/* What the guest may dirty in total under the given limits (limit 0 = its demand). */
static double allowed_pps(const struct sched_migration *m, const double *limit)
{
	double t = 0;
	for (unsigned i = 0; i < m->nr_vcpus; i++)
		t += limit[i] > 0 ? limit[i] : m->demand[i];
	return t;
}

static void set_level(struct sched_migration *m, uint32_t level, double bw_Bps)
{
	m->level = level;
	m->budget_pps = level_budget(m, level, bw_Bps);
	sched_throttle_fill(m->demand, m->nr_vcpus, m->budget_pps,
			    (double)m->pol.throttle_floor_pps, m->limit);
}

/*
 * The next level that actually allows less than now (a level whose budget is above the
 * demand, or whose limits all sit on the floor already, changes nothing). 0 if none.
 */
static uint32_t next_level(const struct sched_migration *m, double bw_Bps)
{
	double cur[SCHED_MAX_VCPUS], lim[SCHED_MAX_VCPUS];
	if (m->level)
		sched_throttle_fill(m->demand, m->nr_vcpus, level_budget(m, m->level, bw_Bps),
				    (double)m->pol.throttle_floor_pps, cur);
	else
		memset(cur, 0, sizeof(cur));
	double now = allowed_pps(m, cur);
	for (uint32_t l = m->level + 1; l <= m->pol.throttle_max_level; l++) {
		sched_throttle_fill(m->demand, m->nr_vcpus, level_budget(m, l, bw_Bps),
				    (double)m->pol.throttle_floor_pps, lim);
		if (allowed_pps(m, lim) < now * (1.0 - 1e-9))
			return l;
	}
	return 0;
}

static void why(struct sched_round_record *r, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));
static void why(struct sched_round_record *r, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(r->why, sizeof(r->why), fmt, ap);
	va_end(ap);
}

static void finish(struct sched_migration *m, struct sched_round_record *r,
		   enum sched_action a, enum sched_reason reason)
{
	if (a == SCHED_SWITCHOVER || a == SCHED_POSTCOPY || a == SCHED_ABORT)
		sched_migration_lift(m);
	if (a == SCHED_CONTINUE && m->level)
		a = SCHED_THROTTLE; /* holding a level means keeping its limits */
	r->action = a;
	r->reason = reason;
	r->throttle_level = m->level;
	r->throttle_budget_pps = m->level ? m->budget_pps : 0;
	for (unsigned i = 0; i < r->nr_vcpus; i++) {
		struct sched_vcpu_report *v = &r->vcpu[i];
		v->demand_pps = m->demand[i];
		v->limit_pps = m->limit[i];
		v->slowed_pct = m->limit[i] > 0 && m->demand[i] > 0
					? 100.0 * (1.0 - m->limit[i] / m->demand[i])
					: 0.0;
		if (v->slowed_pct < 0)
			v->slowed_pct = 0;
	}
}

/* The configured action for a spent budget; postcopy only when allowed. */
static void timeout_action(struct sched_migration *m, struct sched_round_record *r,
			   enum sched_reason reason, const char *what)
{
	switch (m->pol.timeout_action) {
	case SCHED_TIMEOUT_SWITCHOVER:
		why(r, "%s: forcing switch-over (expected downtime %.1f ms, target %.0f ms)", what,
		    r->expected_downtime_ms, r->downtime_target_ms);
		finish(m, r, SCHED_SWITCHOVER, reason);
		return;
	case SCHED_TIMEOUT_POSTCOPY:
		if (m->pol.allow_postcopy) {
			why(r, "%s: switching to postcopy with %llu bytes left", what,
			    (unsigned long long)r->remaining_bytes);
			finish(m, r, SCHED_POSTCOPY, reason);
			return;
		}
		why(r, "%s: postcopy is not allowed, aborting", what);
		finish(m, r, SCHED_ABORT, reason);
		return;
	case SCHED_TIMEOUT_ABORT:
	default:
		why(r, "%s: aborting; the VM keeps running here", what);
		finish(m, r, SCHED_ABORT, reason);
		return;
	}
}

/* Fills the record's inputs and per-vCPU rates; updates the demand estimates. */
static void take_inputs(struct sched_migration *m, const struct sched_measure *in,
			struct sched_round_record *r)
{
	memset(r, 0, offsetof(struct sched_round_record, vcpu));
	r->now_ns = in->now_ns;
	r->elapsed_ns = in->elapsed_ns;
	r->round = in->round;
	r->tick = in->tick;
	r->remaining_bytes = in->remaining_bytes;
	r->bytes_sent = in->bytes_sent;
	r->mem_bytes = in->mem_bytes;
	r->state_bytes = in->state_bytes;
	r->rtt_ns = in->rtt_ns;
	r->bandwidth_Bps = in->bandwidth_Bps > 0 ? in->bandwidth_Bps : 0;
	r->nr_vcpus = m->nr_vcpus;

	unsigned n = m->nr_vcpus;
	double sum = 0;
	bool per_vcpu = in->vcpu_dirty_pps && in->nr_vcpus > 0;
	if (per_vcpu)
		for (unsigned i = 0; i < n && i < in->nr_vcpus; i++)
			sum += in->vcpu_dirty_pps[i] > 0 ? in->vcpu_dirty_pps[i] : 0;
	double total = in->dirty_pps > 0 ? in->dirty_pps : sum;
	r->dirty_pps = total;

	double eff = 0;
	for (unsigned i = 0; i < n; i++) {
		double d;
		if (per_vcpu)
			d = i < in->nr_vcpus && in->vcpu_dirty_pps[i] > 0 ? in->vcpu_dirty_pps[i]
									  : 0;
		else
			d = total / n;
		r->vcpu[i].dirty_pps = d;
		/*
		 * A limited vCPU's measured rate is its limit, not its demand: keep the rate
		 * seen before it was limited (or a higher one seen since). Ticks measure
		 * mid-round and leave the estimates alone.
		 */
		if (!in->tick) {
			if (m->limit[i] > 0)
				m->demand[i] = d > m->demand[i] ? d : m->demand[i];
			else
				m->demand[i] = d;
		}
		/* The quota holds a limited vCPU to its limit from now on, whatever the
		 * window still remembers of its unthrottled past. */
		eff += m->limit[i] > 0 && d > m->limit[i] ? m->limit[i] : d;
	}
	r->dirty_Bps = eff * SCHED_PAGE_SIZE;
	r->expected_downtime_ms = sched_expected_downtime_ms(in->remaining_bytes, in->state_bytes,
							     r->bandwidth_Bps, in->rtt_ns);
	r->downtime_target_ms =
		sched_downtime_target_ms(&m->pol, in->elapsed_ns, in->mem_bytes, &r->downtime_step);
	r->completion_budget_ns = sched_completion_budget_ns(&m->pol, in->mem_bytes);
}

static void hold(struct sched_migration *m, struct sched_round_record *r)
{
	if (m->level) {
		why(r, "throttle level %u holds: %.0f ms expected, target %.0f ms", m->level,
		    r->expected_downtime_ms, r->downtime_target_ms);
		finish(m, r, SCHED_THROTTLE, SCHED_R_THROTTLE_HOLD);
	} else if (r->bandwidth_Bps <= 0) {
		why(r, "no bandwidth measured yet");
		finish(m, r, SCHED_CONTINUE, SCHED_R_NO_ESTIMATE);
	} else {
		why(r, "precopy: %.0f ms expected, target %.0f ms", r->expected_downtime_ms,
		    r->downtime_target_ms);
		finish(m, r, SCHED_CONTINUE, SCHED_R_PRECOPY);
	}
}

void sched_migration_decide(struct sched_migration *m, const struct sched_measure *in,
			    struct sched_round_record *r)
{
	const struct sched_policy *p = &m->pol;
	take_inputs(m, in, r);

	if (in->tick) {
		/* Mid-round: only the completion budget can end things; nothing else moves. */
		r->low_remaining_bytes = m->low_remaining;
		r->since_progress_ns = m->have_low && in->now_ns > m->low_ns ? in->now_ns - m->low_ns
									       : 0;
		r->stall_count = m->stall_count;
		r->dirty_over_count = m->dirty_over;
		if (r->completion_budget_ns && in->elapsed_ns >= r->completion_budget_ns) {
			timeout_action(m, r, SCHED_R_COMPLETION_TIMEOUT, "completion timeout");
			return;
		}
		hold(m, r);
		return;
	}

	/* Progress: a new low of the boundary remaining (KubeVirt's watermark). */
	if (!m->have_low || in->remaining_bytes < m->low_remaining) {
		m->have_low = true;
		m->low_remaining = in->remaining_bytes;
		m->low_ns = in->now_ns;
	}
	r->low_remaining_bytes = m->low_remaining;
	r->since_progress_ns = in->now_ns > m->low_ns ? in->now_ns - m->low_ns : 0;

	/* Stall: not shrinking below ratio * the recent minimum, or dirtying >= the link. */
	if (m->hist_n) {
		uint64_t min = UINT64_MAX;
		for (unsigned i = 0; i < m->hist_n; i++) {
			uint64_t v = m->hist[(m->hist_head + i) % STALL_HISTORY];
			min = v < min ? v : min;
		}
		if ((double)in->remaining_bytes >= p->stall_ratio * (double)min)
			m->stall_count++;
		else
			m->stall_count = 0;
	}
	push_history(m, in->remaining_bytes);
	if (r->bandwidth_Bps > 0 && r->dirty_Bps >= r->bandwidth_Bps)
		m->dirty_over++;
	else
		m->dirty_over = 0;
	uint32_t dirty_rounds = p->stall_rounds > 1 ? p->stall_rounds - 1 : 1;
	r->stall_count = m->stall_count;
	r->dirty_over_count = m->dirty_over;
	r->stalled = m->stall_count >= p->stall_rounds || m->dirty_over >= dirty_rounds;

	if (r->bandwidth_Bps > 0 && r->expected_downtime_ms <= r->downtime_target_ms) {
		why(r, "expected downtime %.1f ms fits the target %.0f ms", r->expected_downtime_ms,
		    r->downtime_target_ms);
		finish(m, r, SCHED_SWITCHOVER, SCHED_R_CONVERGED);
		return;
	}
	if (p->allow_postcopy && p->postcopy_after_rounds >= 0 &&
	    in->round >= (uint32_t)p->postcopy_after_rounds) {
		why(r, "%u precopy round(s) done (postcopy_after_rounds %d): switching to postcopy "
		       "with %llu bytes left",
		    in->round, p->postcopy_after_rounds, (unsigned long long)in->remaining_bytes);
		finish(m, r, SCHED_POSTCOPY, SCHED_R_POSTCOPY_AFTER);
		return;
	}
	if (r->completion_budget_ns && in->elapsed_ns >= r->completion_budget_ns) {
		timeout_action(m, r, SCHED_R_COMPLETION_TIMEOUT, "completion timeout");
		return;
	}
	if (p->progress_timeout_s &&
	    r->since_progress_ns >= (uint64_t)p->progress_timeout_s * 1000000000ull) {
		timeout_action(m, r, SCHED_R_PROGRESS_TIMEOUT, "no progress");
		return;
	}
	if (!r->stalled || r->bandwidth_Bps <= 0) {
		if (m->level) /* bandwidth and demands move: re-split this level's budget */
			set_level(m, m->level, r->bandwidth_Bps);
		hold(m, r);
		return;
	}

	uint32_t l = p->throttle ? next_level(m, r->bandwidth_Bps) : 0;
	if (l) {
		uint32_t from = m->level;
		set_level(m, l, r->bandwidth_Bps);
		/* The new level gets stall_rounds rounds to show its effect, measured from
		 * where things stand now. */
		clear_history(m);
		push_history(m, in->remaining_bytes);
		unsigned limited = 0;
		double demand = 0;
		for (unsigned i = 0; i < m->nr_vcpus; i++) {
			limited += m->limit[i] > 0;
			demand += m->demand[i];
		}
		why(r, "stalled (%s): throttle level %u -> %u, %.0f of %.0f pages/s allowed, "
		       "%u vCPU(s) limited",
		    r->dirty_over_count >= dirty_rounds ? "dirtying at least the bandwidth"
							: "remaining not shrinking",
		    from, l, allowed_pps(m, m->limit), demand, limited);
		finish(m, r, SCHED_THROTTLE, SCHED_R_THROTTLE_STEP);
		return;
	}

	/* Throttling exhausted (or off): precopy cannot converge on its own. */
	if (p->allow_postcopy) {
		why(r, "stalled with throttling %s: switching to postcopy with %llu bytes left",
		    p->throttle ? "exhausted" : "off", (unsigned long long)in->remaining_bytes);
		finish(m, r, SCHED_POSTCOPY, SCHED_R_STALL_POSTCOPY);
		return;
	}
	if (p->act_on_stall && (p->downtime_steps == 0 || r->downtime_step >= p->downtime_steps)) {
		timeout_action(m, r, SCHED_R_STALL_ACTION, "stalled, cannot converge");
		return;
	}
	if (m->level)
		set_level(m, m->level, r->bandwidth_Bps);
	why(r, "stalled with throttling %s: %.0f ms expected, target %.0f ms; waiting for a "
	       "timeout",
	    p->throttle ? "exhausted" : "off", r->expected_downtime_ms, r->downtime_target_ms);
	finish(m, r, SCHED_CONTINUE, SCHED_R_STALLED);
}
