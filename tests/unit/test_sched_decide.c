// SPDX-License-Identifier: Apache-2.0
/*
 * Description: the per-migration decision, driven round by round by a simulated guest:
 * vCPUs dirty pages at their (possibly limited) rates within their working sets while each
 * round sends what the previous one left at the link's bandwidth; the scheduler's
 * estimators measure it as the engine would. Covers convergence without throttling,
 * throttling only the fast vCPUs by exactly the needed amount until it converges within
 * the downtime target, early stall detection, the throttle stepping up when limits do not
 * help, postcopy only when allowed, the timeout actions, downtime stepping, ticks and the
 * JSON record.
 */
#include "testutil.h"

#include <errno.h>
#include <string.h>

#include "scheduler/scheduler.h"

#define PAGE 4096.0
#define MS 1000000ull
#define SEC 1000000000ull
#define GIB 1073741824ull

/* ---------------- the simulated guest and link ---------------- */

struct sim_vcpu {
	double rate_pps; /* what the guest wants to dirty */
	double ws_pages; /* its working set: at most this many of its pages are dirty at once */
	double limit;    /* current limit from the scheduler, 0 = none */
	double count;    /* cumulative dirtied pages (what the ring hands out) */
};

struct sim {
	unsigned n;
	struct sim_vcpu v[8];
	double mem_pages;
	double link_Bps;
	uint64_t rtt_ns;
	uint64_t state_bytes;
	bool ignore_limits; /* vCPUs that do not honour their quota */

	double now_s;
	double to_send; /* pages the next round sends */
	uint64_t sent;
	uint32_t round;
	struct sched_policy pol;
	struct sched_migration *m;
	struct sched_dirty *est;
	struct sched_bw bw;
	struct sched_round_record rec;
	double downtime_ms; /* simulated downtime of the switch-over, when it happens */
};

static void sim_init(struct sim *s, unsigned n, double mem_pages, double link_Bps)
{
	memset(s, 0, sizeof(*s));
	s->n = n;
	s->mem_pages = mem_pages;
	s->link_Bps = link_Bps;
	s->rtt_ns = 200000;      /* 200 us */
	s->state_bytes = 1u << 20;
	s->to_send = mem_pages;  /* round 1: everything */
	sched_policy_default(&s->pol);
}

static void sim_start(struct sim *s)
{
	assert_int_equal(sched_migration_new(&s->pol, s->n, &s->m), 0);
	/* A 1 s window: once rounds get short it averages several of them, as in ferryd. */
	assert_int_equal(sched_dirty_new(s->n, 1 * SEC, &s->est), 0);
	sched_bw_init(&s->bw, 3 * SEC);
	uint64_t zero[8] = {0};
	sched_dirty_add(s->est, 0, zero, s->n);
}

static void sim_free(struct sim *s)
{
	sched_migration_free(s->m);
	sched_dirty_free(s->est);
}

static uint64_t ns_of(double s)
{
	return (uint64_t)(s * 1e9 + 0.5);
}

/* One precopy round and the decision at its end. Returns the action. */
static enum sched_action sim_round(struct sim *s)
{
	double t = s->to_send * PAGE / s->link_Bps;
	double next = 0;
	uint64_t counts[8];
	for (unsigned i = 0; i < s->n; i++) {
		struct sim_vcpu *v = &s->v[i];
		double r = v->rate_pps;
		if (!s->ignore_limits && v->limit > 0 && v->limit < r)
			r = v->limit;
		double d = r * t;
		v->count += d;
		next += d < v->ws_pages ? d : v->ws_pages;
		counts[i] = (uint64_t)(v->count + 0.5);
	}
	s->sent += (uint64_t)(s->to_send * PAGE + 0.5);
	s->now_s += t;
	s->to_send = next;
	s->round++;

	uint64_t now = ns_of(s->now_s);
	sched_dirty_add(s->est, now, counts, s->n);
	sched_bw_add(&s->bw, now, (uint64_t)(t * s->link_Bps + 0.5), ns_of(t));
	double rates[8];
	sched_dirty_rates(s->est, rates, s->n);
	struct sched_measure in = {
		.now_ns = now,
		.elapsed_ns = now,
		.round = s->round,
		.remaining_bytes = (uint64_t)(s->to_send * PAGE + 0.5),
		.bytes_sent = s->sent,
		.mem_bytes = (uint64_t)(s->mem_pages * PAGE),
		.state_bytes = s->state_bytes,
		.rtt_ns = s->rtt_ns,
		.bandwidth_Bps = sched_bw_bytes_per_sec(&s->bw),
		.nr_vcpus = s->n,
		.vcpu_dirty_pps = rates,
	};
	sched_migration_decide(s->m, &in, &s->rec);
	switch (s->rec.action) {
	case SCHED_CONTINUE:
	case SCHED_THROTTLE:
		for (unsigned i = 0; i < s->n; i++)
			s->v[i].limit = s->rec.action == SCHED_THROTTLE ? s->rec.vcpu[i].limit_pps : 0;
		break;
	case SCHED_SWITCHOVER:
		/* Paused: the rest and the state go at the link's rate, then the commit. */
		s->downtime_ms = (s->to_send * PAGE + (double)s->state_bytes) / s->link_Bps * 1e3 +
				 (double)s->rtt_ns / 1e6;
		/* fall through */
	default:
		for (unsigned i = 0; i < s->n; i++)
			s->v[i].limit = 0;
		break;
	}
	return s->rec.action;
}

static void near(double got, double want, double tol)
{
	if (!(got >= want - tol && got <= want + tol))
		fail_msg("got %.9f, want %.9f +- %g", got, want, tol);
}

/* 4 GiB guest, 1 GB/s link. */
#define MEM_4G (4.0 * GIB / PAGE)
#define LINK 1e9

/* ---------------- convergence without throttling ---------------- */

static void converges_below_bandwidth(void **state)
{
	(void)state;
	struct sim s;
	sim_init(&s, 2, MEM_4G, LINK);
	for (unsigned i = 0; i < 2; i++)
		s.v[i] = (struct sim_vcpu){.rate_pps = 20000, .ws_pages = 65536};
	sim_start(&s);

	/* Round 1 sends 4 GiB in 4.29 s; both 256 MiB working sets fill: 512 MiB left. */
	assert_int_equal(sim_round(&s), SCHED_CONTINUE);
	assert_int_equal(s.rec.reason, SCHED_R_PRECOPY);
	assert_int_equal(s.rec.remaining_bytes, 536870912ull);
	near(s.rec.bandwidth_Bps, LINK, 1e-3);
	near(s.rec.dirty_pps, 40000, 1.0); /* from whole-page counts: within a page/s */
	near(s.rec.expected_downtime_ms, (536870912.0 + 1048576.0) / 1e6 + 0.2, 1e-6);
	assert_false(s.rec.stalled);

	/* Round 2 lasts 0.537 s: 2 * 20000 * 0.537 pages = 88 MB left, 89.2 ms: switch. */
	assert_int_equal(sim_round(&s), SCHED_SWITCHOVER);
	assert_int_equal(s.rec.reason, SCHED_R_CONVERGED);
	assert_int_equal(s.rec.round, 2);
	double left = 40000.0 * (536870912.0 / LINK) * PAGE;
	near((double)s.rec.remaining_bytes, left, 1.0);
	near(s.rec.expected_downtime_ms, (left + 1048576.0) / 1e6 + 0.2, 1e-3);
	near(s.rec.downtime_target_ms, 300, 0);
	assert_true(s.downtime_ms <= 300.0);
	assert_int_equal(s.rec.throttle_level, 0);
	for (unsigned i = 0; i < 2; i++)
		assert_true(s.rec.vcpu[i].limit_pps == 0);
	sim_free(&s);
}

/* ---------------- throttling ---------------- */

/* Two vCPUs at 150k pages/s (1 GiB working sets), two at 10k (256 MiB): 1.31 GB/s total. */
static void heavy_guest(struct sim *s)
{
	sim_init(s, 4, MEM_4G, LINK);
	for (unsigned i = 0; i < 2; i++)
		s->v[i] = (struct sim_vcpu){.rate_pps = 150000, .ws_pages = 262144};
	for (unsigned i = 2; i < 4; i++)
		s->v[i] = (struct sim_vcpu){.rate_pps = 10000, .ws_pages = 65536};
}

static void throttle_only_fast_and_converges(void **state)
{
	(void)state;
	struct sim s;
	heavy_guest(&s);
	sim_start(&s);

	/* Round 1: dirtying 1.31 GB/s >= the link, once: not yet a stall. */
	assert_int_equal(sim_round(&s), SCHED_CONTINUE);
	assert_int_equal(s.rec.dirty_over_count, 1);
	assert_false(s.rec.stalled);
	uint64_t r1 = s.rec.remaining_bytes;

	/* Round 2: the second round over the link is a stall: throttle level 1. */
	assert_int_equal(sim_round(&s), SCHED_THROTTLE);
	assert_int_equal(s.rec.reason, SCHED_R_THROTTLE_STEP);
	assert_true(s.rec.stalled);
	assert_int_equal(s.rec.throttle_level, 1);
	assert_true((double)s.rec.remaining_bytes >= 0.9 * (double)r1); /* indeed stuck */
	/*
	 * Budget: half the link = 122070.3125 pages/s. The slow vCPUs (10k, under the fair
	 * share of 30517.6) keep all they want; the fast ones split the other 102070.3125
	 * equally: exactly the budget is allowed, no less. (Rates come from whole-page
	 * counts, hence the tolerance of one page/s.)
	 */
	double budget = 0.5 * LINK / PAGE;
	near(s.rec.throttle_budget_pps, budget, 1e-6);
	near(s.rec.vcpu[0].limit_pps, (budget - 20000) / 2, 1.0);
	near(s.rec.vcpu[1].limit_pps, (budget - 20000) / 2, 1.0);
	near(s.rec.vcpu[0].limit_pps + s.rec.vcpu[1].limit_pps + s.rec.vcpu[2].demand_pps +
		     s.rec.vcpu[3].demand_pps,
	     budget, 1e-6);
	assert_true(s.rec.vcpu[2].limit_pps == 0);
	assert_true(s.rec.vcpu[3].limit_pps == 0);
	near(s.rec.vcpu[0].slowed_pct, 100.0 * (1.0 - 51035.15625 / 150000.0), 1e-3);
	assert_true(s.rec.vcpu[2].slowed_pct == 0);
	near(s.rec.vcpu[0].demand_pps, 150000, 1.0);

	/* Throttled, the remainder halves every round; the level holds. */
	double prev = (double)s.rec.remaining_bytes;
	for (uint32_t round = 3; round <= 4; round++) {
		assert_int_equal(sim_round(&s), SCHED_THROTTLE);
		assert_int_equal(s.rec.reason, SCHED_R_THROTTLE_HOLD);
		assert_int_equal(s.rec.throttle_level, 1);
		near((double)s.rec.remaining_bytes / prev, 0.5, 1e-5);
		prev = (double)s.rec.remaining_bytes;
		/* The limits stay: a limited vCPU's demand is the rate it had before. */
		near(s.rec.vcpu[0].dirty_pps, 51035.15625, 1.0);
		near(s.rec.vcpu[0].limit_pps, 51035.15625, 1.0);
		near(s.rec.vcpu[0].demand_pps, 150000, 1.0);
		assert_true(s.rec.vcpu[3].limit_pps == 0);
		assert_false(s.rec.stalled);
	}

	/* Round 5: 294 MB left, 295.3 ms expected: switch over, limits lifted. */
	assert_int_equal(sim_round(&s), SCHED_SWITCHOVER);
	assert_int_equal(s.rec.round, 5);
	assert_int_equal(s.rec.reason, SCHED_R_CONVERGED);
	assert_true(s.rec.expected_downtime_ms <= 300.0);
	assert_true(s.rec.expected_downtime_ms > 290.0);
	assert_true(s.downtime_ms <= 300.0);
	assert_int_equal(s.rec.throttle_level, 0);
	for (unsigned i = 0; i < 4; i++)
		assert_true(s.rec.vcpu[i].limit_pps == 0);
	assert_int_equal(sched_migration_throttle_level(s.m), 0);
	assert_true(sched_migration_vcpu_limit(s.m, 0) == 0);
	sim_free(&s);
}

/*
 * Limits that are not honoured: the remainder does not shrink, so the level steps up every
 * stall_rounds rounds until the last level; then postcopy if allowed, else wait.
 */
static void run_ignored_limits(bool allow_postcopy)
{
	struct sim s;
	heavy_guest(&s);
	s.ignore_limits = true;
	s.pol.allow_postcopy = allow_postcopy;
	sim_start(&s);

	const double bp = LINK / PAGE;
	struct {
		uint32_t round, level;
		double fast_limit, slow_limit;
	} steps[] = {
		{2, 1, (bp / 2 - 20000) / 2, 0},      /* slow vCPUs under the share: free */
		{5, 2, (bp / 4 - 20000) / 2, 0},
		{8, 3, bp / 8 / 4, bp / 8 / 4},       /* share 7629 < 10k: all four limited */
		{11, 4, bp / 16 / 4, bp / 16 / 4},
	};
	unsigned k = 0;
	for (uint32_t round = 1; round <= 13; round++) {
		enum sched_action a = sim_round(&s);
		if (k < 4 && round == steps[k].round) {
			assert_int_equal(a, SCHED_THROTTLE);
			assert_int_equal(s.rec.reason, SCHED_R_THROTTLE_STEP);
			assert_int_equal(s.rec.throttle_level, steps[k].level);
			near(s.rec.vcpu[0].limit_pps, steps[k].fast_limit, 1.0);
			near(s.rec.vcpu[1].limit_pps, steps[k].fast_limit, 1.0);
			near(s.rec.vcpu[2].limit_pps, steps[k].slow_limit, 1.0);
			k++;
		} else {
			assert_int_equal(a, round == 1 ? SCHED_CONTINUE : SCHED_THROTTLE);
			assert_int_not_equal(s.rec.reason, SCHED_R_THROTTLE_STEP);
		}
	}
	assert_int_equal(k, 4);
	/* Round 14: stalled at the last level. */
	enum sched_action a = sim_round(&s);
	assert_true(s.rec.stalled);
	if (allow_postcopy) {
		assert_int_equal(a, SCHED_POSTCOPY);
		assert_int_equal(s.rec.reason, SCHED_R_STALL_POSTCOPY);
		assert_int_equal(s.rec.throttle_level, 0); /* lifted */
		assert_true(s.rec.vcpu[0].limit_pps == 0);
	} else {
		/* Nothing left to try: keep the last level and wait for a timeout. */
		assert_int_equal(a, SCHED_THROTTLE);
		assert_int_equal(s.rec.reason, SCHED_R_STALLED);
		assert_int_equal(s.rec.throttle_level, 4);
		for (int i = 0; i < 5; i++) {
			assert_int_equal(sim_round(&s), SCHED_THROTTLE);
			assert_int_equal(s.rec.reason, SCHED_R_STALLED);
		}
	}
	assert_true(s.now_s < 150.0); /* all of this long before any timeout */
	sim_free(&s);
}

static void throttle_steps_up_then_postcopy(void **state)
{
	(void)state;
	run_ignored_limits(true);
}

static void no_postcopy_unless_allowed(void **state)
{
	(void)state;
	run_ignored_limits(false);
}

/* Throttling off and postcopy allowed: the stall goes to postcopy at once (round 2). */
static void stall_postcopy_without_throttle(void **state)
{
	(void)state;
	struct sim s;
	heavy_guest(&s);
	s.pol.throttle = false;
	s.pol.allow_postcopy = true;
	sim_start(&s);
	assert_int_equal(sim_round(&s), SCHED_CONTINUE);
	assert_int_equal(sim_round(&s), SCHED_POSTCOPY);
	assert_int_equal(s.rec.reason, SCHED_R_STALL_POSTCOPY);
	assert_int_equal(s.rec.round, 2);
	sim_free(&s);
}

/*
 * postcopy_after_rounds: the decision before round 1 (round 0, nothing measured) goes to
 * postcopy at once with 0; with 2 the heavy guest gets two precopy rounds, then postcopy;
 * a guest that converges first switches over (precopy wins when it fits the target).
 */
static void postcopy_after_rounds(void **state)
{
	(void)state;
	struct sim s;
	heavy_guest(&s);
	s.pol.allow_postcopy = true;
	s.pol.postcopy_after_rounds = 0;
	sim_start(&s);
	struct sched_measure in = {.now_ns = 0, .round = 0, .remaining_bytes = 4 * GIB,
				   .mem_bytes = 4 * GIB, .nr_vcpus = 4};
	sched_migration_decide(s.m, &in, &s.rec);
	assert_int_equal(s.rec.action, SCHED_POSTCOPY);
	assert_int_equal(s.rec.reason, SCHED_R_POSTCOPY_AFTER);
	assert_string_equal(sched_reason_name(s.rec.reason), "postcopy_after_rounds");
	assert_non_null(strstr(s.rec.why, "0 precopy round(s) done"));
	sim_free(&s);

	heavy_guest(&s);
	s.pol.allow_postcopy = true;
	s.pol.postcopy_after_rounds = 2;
	sim_start(&s);
	assert_int_equal(sim_round(&s), SCHED_CONTINUE);
	assert_int_equal(sim_round(&s), SCHED_POSTCOPY);
	assert_int_equal(s.rec.reason, SCHED_R_POSTCOPY_AFTER);
	assert_int_equal(s.rec.round, 2);
	sim_free(&s);

	/* The light guest of converges_below_bandwidth switches over in round 2 anyway. */
	sim_init(&s, 2, MEM_4G, LINK);
	for (unsigned i = 0; i < 2; i++)
		s.v[i] = (struct sim_vcpu){.rate_pps = 20000, .ws_pages = 65536};
	s.pol.allow_postcopy = true;
	s.pol.postcopy_after_rounds = 2;
	sim_start(&s);
	assert_int_equal(sim_round(&s), SCHED_CONTINUE);
	assert_int_equal(sim_round(&s), SCHED_SWITCHOVER);
	assert_int_equal(s.rec.reason, SCHED_R_CONVERGED);
	sim_free(&s);

	/* Without allow_postcopy the policy is refused; the range is -1..1000. */
	struct sched_policy p;
	char err[128];
	sched_policy_default(&p);
	assert_int_equal(p.postcopy_after_rounds, -1);
	p.postcopy_after_rounds = 1;
	assert_int_equal(sched_policy_check(&p, err, sizeof(err)), -EINVAL);
	assert_non_null(strstr(err, "allow_postcopy"));
	p.allow_postcopy = true;
	assert_int_equal(sched_policy_check(&p, err, sizeof(err)), 0);
	p.postcopy_after_rounds = 1001;
	assert_int_equal(sched_policy_check(&p, err, sizeof(err)), -EINVAL);
	p.postcopy_after_rounds = -2;
	assert_int_equal(sched_policy_check(&p, err, sizeof(err)), -EINVAL);
}

/* ---------------- stall detection from the round history ---------------- */

static struct sched_measure boundary(uint32_t round, uint64_t elapsed_ns, uint64_t remaining)
{
	return (struct sched_measure){
		.now_ns = 1000 * SEC + elapsed_ns,
		.elapsed_ns = elapsed_ns,
		.round = round,
		.remaining_bytes = remaining,
		.mem_bytes = 4 * GIB,
		.bandwidth_Bps = LINK,
		.dirty_pps = 1000, /* far below the link: only the history can show a stall */
		.nr_vcpus = 2,
	};
}

static void stall_not_shrinking(void **state)
{
	(void)state;
	struct sched_policy p;
	sched_policy_default(&p);
	p.throttle = false;
	struct sched_migration *m;
	assert_int_equal(sched_migration_new(&p, 2, &m), 0);
	struct sched_round_record r;
	const uint64_t mb = 1000000;
	uint64_t rem[] = {1000 * mb, 950 * mb, 990 * mb, 960 * mb};
	uint32_t want_count[] = {0, 1, 2, 3};
	for (unsigned i = 0; i < 4; i++) {
		struct sched_measure in = boundary(i + 1, (i + 1) * SEC, rem[i]);
		sched_migration_decide(m, &in, &r);
		assert_int_equal(r.stall_count, want_count[i]);
		assert_int_equal(r.dirty_over_count, 0);
		assert_int_equal(r.stalled, i == 3);
		assert_int_equal(r.action, SCHED_CONTINUE);
		assert_int_equal(r.reason, i == 3 ? SCHED_R_STALLED : SCHED_R_PRECOPY);
		/* the uneven dirty total is spread evenly when per-vCPU rates are unknown */
		near(r.vcpu[1].dirty_pps, 500, 0);
	}
	/* A real drop (below 0.9 * the recent minimum of 950 = 855) clears the count. */
	struct sched_measure in = boundary(5, 5 * SEC, 850 * mb);
	sched_migration_decide(m, &in, &r);
	assert_int_equal(r.stall_count, 0);
	assert_false(r.stalled);
	/* 800 MB is not below 0.9 * 850 = 765: one round not shrinking again. */
	in = boundary(6, 6 * SEC, 800 * mb);
	sched_migration_decide(m, &in, &r);
	assert_int_equal(r.stall_count, 1);
	sched_migration_free(m);
}

/* Dirtying at or above the bandwidth for two rounds is a stall, shrinking or not. */
static void stall_dirty_over_bandwidth(void **state)
{
	(void)state;
	struct sched_policy p;
	sched_policy_default(&p);
	p.throttle = false;
	struct sched_migration *m;
	assert_int_equal(sched_migration_new(&p, 1, &m), 0);
	struct sched_round_record r;
	double rate = LINK / PAGE; /* exactly the link */
	struct sched_measure in = boundary(1, SEC, 2000000000ull);
	in.dirty_pps = 0;
	in.nr_vcpus = 1;
	in.vcpu_dirty_pps = &rate;
	sched_migration_decide(m, &in, &r);
	assert_int_equal(r.dirty_over_count, 1);
	assert_false(r.stalled);
	in = boundary(2, 2 * SEC, 1000000000ull); /* even though it halved */
	in.dirty_pps = 0;
	in.nr_vcpus = 1;
	in.vcpu_dirty_pps = &rate;
	sched_migration_decide(m, &in, &r);
	assert_int_equal(r.dirty_over_count, 2);
	assert_int_equal(r.stall_count, 0);
	assert_true(r.stalled);
	assert_int_equal(r.reason, SCHED_R_STALLED);
	sched_migration_free(m);
}

/* act_on_stall: a hopeless stall takes the timeout action at once. */
static void act_on_stall(void **state)
{
	(void)state;
	struct sched_policy p;
	sched_policy_default(&p);
	p.throttle = false;
	p.act_on_stall = true;
	p.timeout_action = SCHED_TIMEOUT_SWITCHOVER;
	struct sched_migration *m;
	assert_int_equal(sched_migration_new(&p, 2, &m), 0);
	struct sched_round_record r;
	for (uint32_t i = 1; i <= 4; i++) {
		struct sched_measure in = boundary(i, i * SEC, 1000000000ull);
		sched_migration_decide(m, &in, &r);
		assert_int_equal(r.action, i < 4 ? SCHED_CONTINUE : SCHED_SWITCHOVER);
	}
	assert_int_equal(r.reason, SCHED_R_STALL_ACTION);
	sched_migration_free(m);
}

/* ---------------- timeouts ---------------- */

/*
 * Boundaries every 60 s, each 20 % below the last (no stall, no progress timeout), never
 * near the target: 10 GB down to 1.34 GB at 540 s.
 */
static struct sched_round_record run_to(struct sched_migration *m, uint64_t until_ns)
{
	struct sched_round_record r;
	uint64_t rem = 10000000000ull;
	uint32_t round = 1;
	for (uint64_t t = 60 * SEC; t <= until_ns; t += 60 * SEC) {
		rem -= rem / 5;
		struct sched_measure in = boundary(round++, t, rem);
		sched_migration_decide(m, &in, &r);
		if (r.action != SCHED_CONTINUE)
			break;
	}
	return r;
}

static void completion_timeout_actions(void **state)
{
	(void)state;
	const enum sched_timeout_action acts[] = {SCHED_TIMEOUT_ABORT, SCHED_TIMEOUT_SWITCHOVER,
						  SCHED_TIMEOUT_POSTCOPY};
	const enum sched_action want[] = {SCHED_ABORT, SCHED_SWITCHOVER, SCHED_POSTCOPY};
	for (unsigned k = 0; k < 3; k++) {
		struct sched_policy p;
		sched_policy_default(&p);
		p.timeout_action = acts[k];
		p.allow_postcopy = acts[k] == SCHED_TIMEOUT_POSTCOPY;
		struct sched_migration *m;
		assert_int_equal(sched_migration_new(&p, 2, &m), 0);
		/* 4 GiB * 150 s/GiB = 600 s. */
		struct sched_round_record r = run_to(m, 540 * SEC);
		assert_int_equal(r.round, 9);
		assert_int_equal(r.action, SCHED_CONTINUE);
		assert_int_equal(r.completion_budget_ns, 600 * SEC);
		struct sched_measure in = boundary(10, 600 * SEC - 1, 900000000); /* 900 ms */
		sched_migration_decide(m, &in, &r);
		assert_int_equal(r.action, SCHED_CONTINUE);
		assert_false(r.stalled);
		in = boundary(11, 600 * SEC, 800000000);
		sched_migration_decide(m, &in, &r);
		assert_int_equal(r.action, want[k]);
		assert_int_equal(r.reason, SCHED_R_COMPLETION_TIMEOUT);
		sched_migration_free(m);
	}
}

/* The completion budget also ends a long round, on a timer tick. */
static void completion_timeout_on_tick(void **state)
{
	(void)state;
	struct sched_policy p;
	sched_policy_default(&p);
	struct sched_migration *m;
	assert_int_equal(sched_migration_new(&p, 2, &m), 0);
	struct sched_round_record r;
	/* A 1 GiB guest counts as 2 GiB: 300 s. Round 1 is still running. */
	struct sched_measure in = {.now_ns = 299 * SEC, .elapsed_ns = 299 * SEC, .round = 1,
				   .tick = true, .remaining_bytes = 1000, .mem_bytes = GIB,
				   .bandwidth_Bps = 1e6, .nr_vcpus = 2};
	sched_migration_decide(m, &in, &r);
	/* 1000 bytes would fit the target, but a tick never switches over on its own. */
	assert_int_equal(r.action, SCHED_CONTINUE);
	assert_int_equal(r.completion_budget_ns, 300 * SEC);
	in.now_ns = in.elapsed_ns = 300 * SEC;
	sched_migration_decide(m, &in, &r);
	assert_int_equal(r.action, SCHED_ABORT);
	assert_int_equal(r.reason, SCHED_R_COMPLETION_TIMEOUT);
	assert_true(r.tick);
	sched_migration_free(m);
}

static void progress_timeout(void **state)
{
	(void)state;
	struct sched_policy p;
	sched_policy_default(&p);
	p.throttle = false; /* stalls only wait */
	struct sched_migration *m;
	assert_int_equal(sched_migration_new(&p, 2, &m), 0);
	struct sched_round_record r;
	const uint64_t mb = 1000000;
	/* t=0: 1000 MB (the low); then never lower until t=100 s (900 MB). */
	for (uint64_t t = 0; t <= 240; t += 10) {
		/* 1000 MB at 0 s, 900 MB at 100 s, otherwise never lower. */
		uint64_t rem = t == 100 ? 900 * mb : 1000 * mb + t * mb;
		struct sched_measure in = boundary((uint32_t)t / 10 + 1, t * SEC, rem);
		sched_migration_decide(m, &in, &r);
		assert_int_equal(r.action, SCHED_CONTINUE);
		assert_int_equal(r.since_progress_ns, (t < 100 ? t : t - 100) * SEC);
	}
	assert_int_equal(r.low_remaining_bytes, 900 * mb);
	struct sched_measure in = boundary(26, 250 * SEC, 990 * mb);
	sched_migration_decide(m, &in, &r);
	assert_int_equal(r.action, SCHED_ABORT);
	assert_int_equal(r.reason, SCHED_R_PROGRESS_TIMEOUT);
	/* Ticks never judge progress: they cannot see this round's new dirt. */
	sched_migration_free(m);
	assert_int_equal(sched_migration_new(&p, 2, &m), 0);
	in = boundary(1, 0, 1000 * mb);
	sched_migration_decide(m, &in, &r);
	in = boundary(2, 400 * SEC, 1000 * mb);
	in.tick = true;
	sched_migration_decide(m, &in, &r);
	assert_int_equal(r.action, SCHED_CONTINUE);
	sched_migration_free(m);
}

static void policy_rejects_postcopy_action_without_allow(void **state)
{
	(void)state;
	struct sched_policy p;
	sched_policy_default(&p);
	p.timeout_action = SCHED_TIMEOUT_POSTCOPY;
	char err[128];
	assert_int_equal(sched_policy_check(&p, err, sizeof(err)), -EINVAL);
	assert_non_null(strstr(err, "allow_postcopy"));
	struct sched_migration *m = NULL;
	assert_int_equal(sched_migration_new(&p, 2, &m), -EINVAL);
	assert_null(m);
	p.allow_postcopy = true;
	assert_int_equal(sched_policy_check(&p, err, sizeof(err)), 0);
}

/* ---------------- downtime stepping ---------------- */

static void downtime_steps(void **state)
{
	(void)state;
	struct sched_policy p;
	sched_policy_default(&p);
	uint32_t step = 99;
	/* Off (the default): the flat configured target. */
	near(sched_downtime_target_ms(&p, 0, 4 * GIB, &step), 300, 0);
	assert_int_equal(step, 0);
	near(sched_downtime_target_ms(&p, 1000000 * SEC, 4 * GIB, &step), 300, 0);

	/* Nova's defaults: 500 ms in 10 steps, 75 s per GiB: a step every 300 s at 4 GiB. */
	p.downtime_ms = 500;
	p.downtime_steps = 10;
	p.downtime_delay_s_per_gib = 75;
	struct {
		uint64_t t;
		double want;
		uint32_t step;
	} cases[] = {
		{0, 50, 0},          {300 * SEC - 1, 50, 0}, {300 * SEC, 95, 1},
		{1500 * SEC, 275, 5}, {2999 * SEC, 455, 9},  {3000 * SEC, 500, 10},
		{100000 * SEC, 500, 10},
	};
	for (unsigned i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		near(sched_downtime_target_ms(&p, cases[i].t, 4 * GIB, &step), cases[i].want, 1e-9);
		assert_int_equal(step, cases[i].step);
	}
	/* A 1 GiB guest counts as 2 GiB: a step every 150 s. */
	near(sched_downtime_target_ms(&p, 150 * SEC, GIB, &step), 95, 1e-9);
	assert_int_equal(step, 1);

	/* The decision follows the ramp: 199.8 ms expected fits step 4 (230 ms), not 3. */
	p.throttle = false;
	p.completion_timeout_s_per_gib = 0;
	p.progress_timeout_s = 0;
	struct sched_migration *m;
	assert_int_equal(sched_migration_new(&p, 2, &m), 0);
	struct sched_round_record r;
	uint32_t round = 1;
	for (uint64_t t = 0; t < 1200 * SEC; t += 100 * SEC) {
		struct sched_measure in = boundary(round++, t, 199800000);
		sched_migration_decide(m, &in, &r);
		assert_int_not_equal(r.action, SCHED_SWITCHOVER);
	}
	assert_int_equal(r.downtime_step, 3);
	struct sched_measure in = boundary(round, 1200 * SEC, 199800000);
	sched_migration_decide(m, &in, &r);
	assert_int_equal(r.action, SCHED_SWITCHOVER);
	assert_int_equal(r.downtime_step, 4);
	near(r.downtime_target_ms, 230, 1e-9);
	near(r.expected_downtime_ms, 199.8, 1e-9);
	sched_migration_free(m);
}

/* ---------------- records ---------------- */

static void record_json(void **state)
{
	(void)state;
	struct sim s;
	heavy_guest(&s);
	sim_start(&s);
	sim_round(&s);
	sim_round(&s); /* the throttle step */
	char buf[4096];
	int n = sched_record_json(&s.rec, buf, sizeof(buf));
	assert_true(n > 0);
	assert_int_equal((size_t)n, strlen(buf));
	assert_true(strncmp(buf, "{\"round\":2,\"tick\":false,", 24) == 0);
	assert_non_null(strstr(buf, "\"action\":\"throttle\",\"reason\":\"throttle_step\""));
	assert_non_null(strstr(buf, "\"throttle_level\":1"));
	assert_non_null(strstr(buf, "\"stalled\":true"));
	assert_non_null(strstr(buf, "{\"dirty_pps\":150000.0,\"demand_pps\":150000.0,"
				    "\"limit_pps\":51035."));
	assert_non_null(strstr(buf, ",\"slowed_pct\":66.0},{"));
	assert_non_null(strstr(buf, "\"limit_pps\":0.0,\"slowed_pct\":0.0}]}"));
	assert_non_null(strstr(buf, "\"bandwidth_Bps\":1000000000.000"));
	assert_non_null(strstr(buf, "\"why\":\"stalled (dirtying at least the bandwidth): "
				    "throttle level 0 -> 1, 122070 of 320000 pages/s allowed, "
				    "2 vCPU(s) limited\""));
	assert_true(buf[n - 1] == '}' && buf[n - 2] == ']');
	/* Too small: -ENOSPC and a terminated prefix. */
	assert_int_equal(sched_record_json(&s.rec, buf, 40), -ENOSPC);
	assert_int_equal(strlen(buf), 39);
	/* Quotes in the reason are escaped; an unknown expected downtime is null. */
	struct sched_round_record r = s.rec;
	strcpy(r.why, "a \"b\"\n");
	r.expected_downtime_ms = -1;
	r.nr_vcpus = 0;
	n = sched_record_json(&r, buf, sizeof(buf));
	assert_true(n > 0);
	assert_non_null(strstr(buf, "\"why\":\"a \\\"b\\\"\\u000a\""));
	assert_non_null(strstr(buf, "\"expected_downtime_ms\":null"));
	assert_non_null(strstr(buf, "\"vcpus\":[]}"));
	sim_free(&s);
}

static void names(void **state)
{
	(void)state;
	assert_string_equal(sched_action_name(SCHED_POSTCOPY), "postcopy");
	assert_string_equal(sched_action_name((enum sched_action)42), "unknown");
	assert_string_equal(sched_reason_name(SCHED_R_PROGRESS_TIMEOUT), "progress_timeout");
	assert_string_equal(sched_reason_name(SCHED_R_CONVERGED), "converged");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(converges_below_bandwidth),
		cmocka_unit_test(throttle_only_fast_and_converges),
		cmocka_unit_test(throttle_steps_up_then_postcopy),
		cmocka_unit_test(no_postcopy_unless_allowed),
		cmocka_unit_test(stall_postcopy_without_throttle),
		cmocka_unit_test(stall_not_shrinking),
		cmocka_unit_test(stall_dirty_over_bandwidth),
		cmocka_unit_test(act_on_stall),
		cmocka_unit_test(completion_timeout_actions),
		cmocka_unit_test(completion_timeout_on_tick),
		cmocka_unit_test(progress_timeout),
		cmocka_unit_test(policy_rejects_postcopy_action_without_allow),
		cmocka_unit_test(postcopy_after_rounds),
		cmocka_unit_test(downtime_steps),
		cmocka_unit_test(record_json),
		cmocka_unit_test(names),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
