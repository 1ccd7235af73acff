// SPDX-License-Identifier: Apache-2.0
/*
 * A decision record as JSON, so the engine can keep each round's decision and inputs in
 * the migration's history and serve them from the API without knowing the record's
 * fields. Plain snprintf into the caller's buffer: no allocation.
 */
#include "scheduler/scheduler.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>

struct out {
	char *buf;
	size_t len, pos;
	bool full;
};

static void put(struct out *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(struct out *o, const char *fmt, ...)
{
	va_list ap;
	size_t room = o->pos < o->len ? o->len - o->pos : 0;
	va_start(ap, fmt);
	int n = vsnprintf(o->buf + (o->pos < o->len ? o->pos : o->len), room, fmt, ap);
	va_end(ap);
	if (n < 0 || (size_t)n >= room)
		o->full = true;
	if (n > 0)
		o->pos += (size_t)n;
}

/* A double as JSON: fixed precision; non-finite or negative "unknown" as null. */
static void put_num(struct out *o, const char *key, double v, bool neg_is_null)
{
	if (v != v || v > 1e300 || v < -1e300 || (neg_is_null && v < 0))
		put(o, ",\"%s\":null", key);
	else
		put(o, ",\"%s\":%.3f", key, v);
}

static void put_str(struct out *o, const char *key, const char *s)
{
	put(o, ",\"%s\":\"", key);
	for (; *s; s++) {
		unsigned char c = (unsigned char)*s;
		if (c == '"' || c == '\\')
			put(o, "\\%c", c);
		else if (c < 0x20)
			put(o, "\\u%04x", c);
		else
			put(o, "%c", c);
	}
	put(o, "\"");
}

int sched_record_json(const struct sched_round_record *r, char *buf, size_t len)
{
	struct out o = {.buf = buf, .len = len};
	if (!buf || !len)
		return -ENOSPC;
	buf[0] = '\0';
	put(&o, "{\"round\":%u,\"tick\":%s,\"now_ns\":%llu,\"elapsed_ms\":%llu", r->round,
	    r->tick ? "true" : "false", (unsigned long long)r->now_ns,
	    (unsigned long long)(r->elapsed_ns / 1000000ull));
	put_str(&o, "action", sched_action_name(r->action));
	put_str(&o, "reason", sched_reason_name(r->reason));
	put_str(&o, "why", r->why);
	put(&o, ",\"remaining_bytes\":%llu,\"bytes_sent\":%llu,\"mem_bytes\":%llu,"
		"\"state_bytes\":%llu,\"rtt_us\":%llu",
	    (unsigned long long)r->remaining_bytes, (unsigned long long)r->bytes_sent,
	    (unsigned long long)r->mem_bytes, (unsigned long long)r->state_bytes,
	    (unsigned long long)(r->rtt_ns / 1000ull));
	put_num(&o, "bandwidth_Bps", r->bandwidth_Bps, false);
	put_num(&o, "dirty_pps", r->dirty_pps, false);
	put_num(&o, "dirty_Bps", r->dirty_Bps, false);
	put_num(&o, "expected_downtime_ms", r->expected_downtime_ms, true);
	put_num(&o, "downtime_target_ms", r->downtime_target_ms, false);
	put(&o, ",\"downtime_step\":%u,\"completion_budget_ms\":%llu,\"since_progress_ms\":%llu,"
		"\"low_remaining_bytes\":%llu,\"stall_count\":%u,\"dirty_over_count\":%u,"
		"\"stalled\":%s,\"throttle_level\":%u",
	    r->downtime_step, (unsigned long long)(r->completion_budget_ns / 1000000ull),
	    (unsigned long long)(r->since_progress_ns / 1000000ull),
	    (unsigned long long)r->low_remaining_bytes, r->stall_count, r->dirty_over_count,
	    r->stalled ? "true" : "false", r->throttle_level);
	put_num(&o, "throttle_budget_pps", r->throttle_budget_pps, false);
	put(&o, ",\"vcpus\":[");
	for (unsigned i = 0; i < r->nr_vcpus && i < SCHED_MAX_VCPUS; i++) {
		const struct sched_vcpu_report *v = &r->vcpu[i];
		put(&o, "%s{\"dirty_pps\":%.1f,\"demand_pps\":%.1f,\"limit_pps\":%.1f,"
			"\"slowed_pct\":%.1f}",
		    i ? "," : "", v->dirty_pps, v->demand_pps, v->limit_pps, v->slowed_pct);
	}
	put(&o, "]}");
	if (o.full)
		return -ENOSPC;
	return (int)o.pos;
}
