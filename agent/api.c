// SPDX-License-Identifier: Apache-2.0
/*
 * The control API (docs/api.md): libmicrohttpd serves HTTP/1.1 on the unix socket and the
 * optional TLS listener, one thread per connection; this file routes each request, checks
 * its JSON body field by field (jansson), calls agent.h and turns the result into JSON or an
 * error {"error":{"code","message"}} with agent_error_http_status(). It holds no agent state
 * and takes no agent lock: every request is independent, so a malformed, huge, slow or
 * abandoned request can only cost its own thread. /v1/events is a chunked feed that blocks
 * its connection's thread on agent_events_next(); /metrics renders Prometheus text.
 */
#include "agent/api.h"
#include "agent/agent_internal.h" /* agent_log only: the API's operations all go through agent.h */

#include <arpa/inet.h>
#include <errno.h>
#include <gnutls/gnutls.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <microhttpd.h>
#include <netdb.h>
#include <poll.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "agent/vm/guest_abi.h"

/* One MHD daemon; cls of the access handler, so a request knows whether it came over TLS. */
struct listener {
	struct api *api;
	struct MHD_Daemon *daemon;
	bool tls;
};

struct api {
	struct agent *agent;
	struct listener unix_l;
	struct listener tcp_l;
	/* The socket file we created, identified by inode so stop never unlinks a successor's. */
	char socket_path[FERRY_CONFIG_SOCKET_MAX];
	dev_t socket_dev;
	ino_t socket_ino;
	bool socket_created;
	char tcp_addr[AGENT_HOSTPORT_MAX];
	/* PEM text handed to MHD, which keeps pointers to it while the daemon runs. */
	char *tls_cert;
	char *tls_key;
	char *tls_ca;
	/* Set by api_stop; events feeds poll it to end. */
	atomic_bool stopping;
	/* Event feeds whose response still exists: api_stop lets them send their final chunk
	 * before the daemon shuts connections down, so clients see a clean end of stream. */
	atomic_uint feeds;
	bool stopped;
};

/* Per-request state (MHD's con_cls): the body as it arrives. */
struct request {
	char *body;
	size_t len;
	bool responded;	  /* a response was queued before the body was read (403, 413) */
	bool too_big;	  /* the body passed FERRY_API_BODY_MAX: drained, then 413 */
	size_t discarded; /* bytes drained */
};

/* How much of an oversized chunked body is read and dropped to answer 413 cleanly. */
#define FERRY_API_DRAIN_MAX (4u << 20)

#define JSON_TYPE "application/json"
#define JSON_FLAGS (JSON_COMPACT | JSON_REAL_PRECISION(15))

/* ---------------- responses ---------------- */

/* Queues body (malloc'd, ownership taken; NULL with len 0 for none) with status. */
static enum MHD_Result respond(struct MHD_Connection *c, unsigned status, const char *ctype,
			       char *body, size_t len, const char *hname, const char *hval)
{
	struct MHD_Response *r;
	if (body)
		r = MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_FREE);
	else
		r = MHD_create_response_from_buffer(0, (void *)"", MHD_RESPMEM_PERSISTENT);
	if (!r) {
		free(body);
		return MHD_NO; /* MHD closes the connection: the best we can do out of memory */
	}
	if (ctype)
		MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, ctype);
	if (hname)
		MHD_add_response_header(r, hname, hval);
	enum MHD_Result ret = MHD_queue_response(c, status, r);
	MHD_destroy_response(r);
	return ret;
}

/* Queues j (reference stolen) as a one-line JSON document. */
static enum MHD_Result respond_json_hdr(struct MHD_Connection *c, unsigned status, json_t *j,
					const char *hname, const char *hval)
{
	char *s = j ? json_dumps(j, JSON_FLAGS) : NULL;
	json_decref(j);
	if (!s)
		return MHD_NO;
	size_t n = strlen(s);
	char *body = realloc(s, n + 2);
	if (!body) {
		free(s);
		return MHD_NO;
	}
	body[n] = '\n'; /* so `curl` output ends its line */
	body[n + 1] = '\0';
	return respond(c, status, JSON_TYPE, body, n + 1, hname, hval);
}

static enum MHD_Result respond_json(struct MHD_Connection *c, unsigned status, json_t *j)
{
	return respond_json_hdr(c, status, j, NULL, NULL);
}

/* A JSON string for arbitrary C text: bytes that are not valid UTF-8 become '?', because
 * jansson refuses them and an error message must never turn into a missing field. */
static json_t *text(const char *s)
{
	json_t *j = json_string(s);
	if (j)
		return j;
	char *copy = strdup(s);
	if (!copy)
		return NULL;
	for (char *p = copy; *p; p++)
		if ((unsigned char)*p >= 0x80 || (unsigned char)*p < 0x20)
			*p = '?';
	j = json_string(copy);
	free(copy);
	return j;
}

static json_t *text_or_null(const char *s) { return s && s[0] ? text(s) : json_null(); }

static json_t *uint_json(uint64_t v)
{
	return json_integer(v > (uint64_t)LLONG_MAX ? LLONG_MAX : (json_int_t)v);
}

/* Sets o[k] = v (reference stolen), with null standing in for a failed allocation. */
static void put(json_t *o, const char *k, json_t *v)
{
	json_object_set_new(o, k, v ? v : json_null());
}

static enum MHD_Result respond_error_hdr(struct MHD_Connection *c, unsigned status,
					 const char *code, const char *hname, const char *hval,
					 const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));
static enum MHD_Result respond_error_hdr(struct MHD_Connection *c, unsigned status,
					 const char *code, const char *hname, const char *hval,
					 const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	json_t *e = json_object();
	if (!e)
		return MHD_NO;
	put(e, "code", text(code));
	put(e, "message", text(msg));
	json_t *root = json_object();
	if (!root) {
		json_decref(e);
		return MHD_NO;
	}
	put(root, "error", e);
	return respond_json_hdr(c, status, root, hname, hval);
}

#define respond_error(c, status, code, ...)                                                        \
	respond_error_hdr(c, status, code, NULL, NULL, __VA_ARGS__)

static enum MHD_Result respond_agent_error(struct MHD_Connection *c, const struct agent_error *e)
{
	const char *code = e->code[0] ? e->code : "internal";
	const char *msg = e->message[0] ? e->message : "internal error";
	return respond_error(c, (unsigned)agent_error_http_status(code), code, "%s", msg);
}

/* ---------------- request bodies ---------------- */

/* Each field helper returns 1 when the field is present, 0 when absent (or null: clients
 * that serialise every member may send null for "default"), -1 with msg filled when it is
 * malformed. */
static int bad(char *msg, size_t mlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int bad(char *msg, size_t mlen, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, mlen, fmt, ap);
	va_end(ap);
	return -1;
}

static const char *json_kind(const json_t *v)
{
	switch (json_typeof(v)) {
	case JSON_OBJECT:
		return "an object";
	case JSON_ARRAY:
		return "an array";
	case JSON_STRING:
		return "a string";
	case JSON_INTEGER:
		return "an integer";
	case JSON_REAL:
		return "a fractional number";
	case JSON_TRUE:
	case JSON_FALSE:
		return "a boolean";
	case JSON_NULL:
		return "null";
	}
	return "something else";
}

/*
 * Parses the body as one JSON object whose members all appear in known (NULL-terminated).
 * An empty body is an empty object unless required. Duplicate keys are refused: which one
 * would win is exactly the ambiguity a control API must not have.
 */
static json_t *body_object(const struct request *rq, const char *const *known, bool required,
			   char *msg, size_t mlen)
{
	if (rq->len == 0) {
		if (required) {
			bad(msg, mlen, "a JSON object body is required");
			return NULL;
		}
		return json_object();
	}
	json_error_t jerr;
	json_t *root = json_loadb(rq->body, rq->len, JSON_REJECT_DUPLICATES, &jerr);
	if (!root) {
		bad(msg, mlen, "malformed JSON at line %d, column %d: %s", jerr.line, jerr.column,
		    jerr.text);
		return NULL;
	}
	if (!json_is_object(root)) {
		bad(msg, mlen, "the body must be a JSON object, not %s", json_kind(root));
		json_decref(root);
		return NULL;
	}
	const char *key;
	json_t *val;
	json_object_foreach (root, key, val) {
		bool ok = false;
		for (const char *const *k = known; *k && !ok; k++)
			ok = strcmp(*k, key) == 0;
		if (ok)
			continue;
		char list[256] = "";
		size_t o = 0;
		for (const char *const *k = known; *k && o < sizeof(list); k++)
			o += (size_t)snprintf(list + o, sizeof(list) - o, "%s%s",
					      k == known ? "" : ", ", *k);
		if (known[0])
			bad(msg, mlen, "unknown field '%.64s' (known fields: %s)", key, list);
		else
			bad(msg, mlen, "unknown field '%.64s' (this request takes no fields)", key);
		json_decref(root);
		return NULL;
	}
	return root;
}

static int field_string(json_t *o, const char *key, char *out, size_t outlen, char *msg,
			size_t mlen)
{
	json_t *v = json_object_get(o, key);
	if (!v || json_is_null(v))
		return 0;
	if (!json_is_string(v))
		return bad(msg, mlen, "field '%s' must be a string, not %s", key, json_kind(v));
	const char *s = json_string_value(v);
	size_t n = json_string_length(v);
	if (strlen(s) != n)
		return bad(msg, mlen, "field '%s' must not contain NUL characters", key);
	if (n >= outlen)
		return bad(msg, mlen, "field '%s' is too long (%zu bytes; at most %zu)", key, n,
			   outlen - 1);
	memcpy(out, s, n + 1);
	return 1;
}

static int field_uint(json_t *o, const char *key, uint64_t min, uint64_t max, uint64_t *out,
		      char *msg, size_t mlen)
{
	json_t *v = json_object_get(o, key);
	if (!v || json_is_null(v))
		return 0;
	if (!json_is_integer(v))
		return bad(msg, mlen, "field '%s' must be an integer, not %s", key, json_kind(v));
	if (json_integer_value(v) < 0 || (uint64_t)json_integer_value(v) < min ||
	    (uint64_t)json_integer_value(v) > max)
		return bad(msg, mlen, "field '%s' is %lld; it must be from %llu to %llu", key,
			   (long long)json_integer_value(v), (unsigned long long)min,
			   (unsigned long long)max);
	*out = (uint64_t)json_integer_value(v);
	return 1;
}

static int field_bool(json_t *o, const char *key, bool *out, char *msg, size_t mlen)
{
	json_t *v = json_object_get(o, key);
	if (!v || json_is_null(v))
		return 0;
	if (!json_is_boolean(v))
		return bad(msg, mlen, "field '%s' must be true or false, not %s", key,
			   json_kind(v));
	*out = json_is_true(v);
	return 1;
}

/* A byte count as an integer or as text for parse ("512M", "1Gbit"). */
static int field_amount(json_t *o, const char *key, int (*parse)(const char *, uint64_t *),
			const char *example, uint64_t *out, char *msg, size_t mlen)
{
	json_t *v = json_object_get(o, key);
	if (!v || json_is_null(v))
		return 0;
	if (json_is_integer(v) && json_integer_value(v) >= 0) {
		*out = (uint64_t)json_integer_value(v);
		return 1;
	}
	if (json_is_string(v) && strlen(json_string_value(v)) == json_string_length(v)) {
		int r = parse(json_string_value(v), out);
		if (r == 0)
			return 1;
		return bad(msg, mlen, "field '%s': '%.64s' is %s (for example %s)", key,
			   json_string_value(v), r == -ERANGE ? "out of range" : "not understood",
			   example);
	}
	if (json_is_integer(v))
		return bad(msg, mlen, "field '%s' must not be negative", key);
	return bad(msg, mlen,
		   "field '%s' must be a non-negative integer or a string like %s, not %s", key,
		   example, json_kind(v));
}

static int field_required(int r, const char *key, char *msg, size_t mlen)
{
	if (r == 0)
		return bad(msg, mlen, "missing field '%s'", key);
	return r;
}

/* "params": {"k":"v" or k:number} or ["k=v", ...], into spec's "k=v" texts. */
static int field_params(json_t *o, struct agent_vm_spec *spec, char *msg, size_t mlen)
{
	json_t *v = json_object_get(o, "params");
	if (!v || json_is_null(v))
		return 0;
	size_t count = json_is_object(v)  ? json_object_size(v)
		       : json_is_array(v) ? json_array_size(v)
					  : 0;
	if (!json_is_object(v) && !json_is_array(v))
		return bad(msg, mlen,
			   "field 'params' must be an object {\"key\": \"value\"} or an array "
			   "of \"key=value\" strings, not %s",
			   json_kind(v));
	if (count > FERRY_PARAM_MAX)
		return bad(msg, mlen, "field 'params' has %zu entries; at most %u", count,
			   FERRY_PARAM_MAX);
	unsigned n = 0;
	if (json_is_object(v)) {
		const char *k;
		json_t *pv;
		json_object_foreach (v, k, pv) {
			char val[AGENT_PARAM_TEXT_MAX];
			if (json_is_string(pv) &&
			    strlen(json_string_value(pv)) == json_string_length(pv) &&
			    json_string_length(pv) < sizeof(val))
				snprintf(val, sizeof(val), "%s", json_string_value(pv));
			else if (json_is_integer(pv) && json_integer_value(pv) >= 0)
				snprintf(val, sizeof(val), "%lld",
					 (long long)json_integer_value(pv));
			else
				return bad(msg, mlen,
					   "params.%.32s must be a short string or a non-negative "
					   "integer, not %s",
					   k, json_kind(pv));
			if (!k[0] || strchr(k, '='))
				return bad(msg, mlen,
					   "parameter names must be non-empty and contain no '='");
			if ((size_t)snprintf(spec->params[n], AGENT_PARAM_TEXT_MAX, "%s=%s", k,
					     val) >= AGENT_PARAM_TEXT_MAX)
				return bad(msg, mlen,
					   "parameter '%.32s' is too long (at most %u bytes)", k,
					   AGENT_PARAM_TEXT_MAX - 1);
			n++;
		}
	} else {
		size_t i;
		json_t *pv;
		json_array_foreach (v, i, pv) {
			const char *s = json_is_string(pv) ? json_string_value(pv) : NULL;
			if (!s || strlen(s) != json_string_length(pv) || !strchr(s, '=') ||
			    s[0] == '=')
				return bad(msg, mlen, "params[%zu] must be a \"key=value\" string",
					   i);
			if (strlen(s) >= AGENT_PARAM_TEXT_MAX)
				return bad(msg, mlen, "params[%zu] is too long (at most %u bytes)",
					   i, AGENT_PARAM_TEXT_MAX - 1);
			snprintf(spec->params[n++], AGENT_PARAM_TEXT_MAX, "%s", s);
		}
	}
	spec->nr_params = n;
	return 1;
}

/* ---------------- JSON documents ---------------- */

static const char *guest_error_kind(uint32_t kind)
{
	switch (kind) {
	case FERRY_ERR_PAGENO:
		return "wrong_page";
	case FERRY_ERR_GEN:
		return "wrong_generation";
	case FERRY_ERR_CSUM:
		return "torn_page";
	case FERRY_ERR_PARAM:
		return "bad_parameter";
	}
	return "unknown";
}

static json_t *hex_json(uint64_t v)
{
	char b[24];
	snprintf(b, sizeof(b), "0x%llx", (unsigned long long)v);
	return json_string(b);
}

static json_t *vm_json(const struct agent_vm_info *v)
{
	json_t *o = json_object();
	if (!o)
		return NULL;
	put(o, "name", text(v->name));
	put(o, "guest", text(v->guest));
	put(o, "memory", uint_json(v->mem_size));
	put(o, "vcpus", uint_json(v->vcpus));
	put(o, "state", text(agent_vm_state_name(v->state)));
	put(o, "failure", text_or_null(v->failure));
	put(o, "tracker", text(v->tracker));
	put(o, "created", json_integer(v->created_unix));
	put(o, "migration", v->migration_id ? uint_json(v->migration_id) : json_null());
	json_t *params = json_object();
	for (unsigned i = 0; params && i < v->nr_params && i < FERRY_PARAM_MAX; i++) {
		char k[AGENT_PARAM_TEXT_MAX];
		snprintf(k, sizeof(k), "%s", v->params[i]);
		char *eq = strchr(k, '=');
		if (!eq)
			continue;
		*eq = '\0';
		put(params, k, text(eq + 1));
	}
	put(o, "params", params);
	json_t *stats = json_object();
	if (stats) {
		put(stats, "passes", uint_json(v->stats.passes));
		put(stats, "pages", uint_json(v->stats.pages));
		put(stats, "guest_errors", uint_json(v->stats.errors));
		put(stats, "exits", uint_json(v->stats.exits));
		put(stats, "ring_full_exits", uint_json(v->stats.ring_full_exits));
		put(stats, "throttle_pct", uint_json(v->stats.throttle_pct));
		put(stats, "throttle_held_ms", uint_json(v->stats.throttle_sleep_ns / 1000000ull));
	}
	put(o, "stats", stats);
	json_t *errs = json_array();
	for (unsigned i = 0; errs && i < v->nr_guest_errors && i < VM_ERRORS_KEPT; i++) {
		const struct vm_guest_error *g = &v->guest_errors[i];
		json_t *e = json_object();
		if (!e)
			break;
		put(e, "vcpu", uint_json(g->vcpu));
		put(e, "kind", json_string(guest_error_kind(g->kind)));
		put(e, "gpa", hex_json(g->gpa));
		put(e, "expected", hex_json(g->expected));
		put(e, "found", hex_json(g->found));
		json_array_append_new(errs, e);
	}
	put(o, "guest_errors", errs);
	return o;
}

static bool migration_final(enum migration_state s)
{
	return s == MIG_COMPLETED || s == MIG_CANCELLED || s == MIG_FAILED;
}

static json_t *rate_json(double v)
{
	return isfinite(v) && v >= 0 ? json_integer((json_int_t)llround(v)) : json_null();
}

static json_t *migration_json(const struct migration_info *m)
{
	json_t *o = json_object();
	if (!o)
		return NULL;
	bool done = m->finished_unix_ms != 0 || migration_final(m->state);
	put(o, "id", uint_json(m->id));
	put(o, "vm", text(m->vm));
	put(o, "direction", json_string(m->incoming ? "incoming" : "outgoing"));
	put(o, "peer", text_or_null(m->peer));
	put(o, "state", text(migration_state_name(m->state)));
	put(o, "transport", text_or_null(m->transport));
	put(o, "transport_reason", text_or_null(m->transport_reason));
	put(o, "compression", text_or_null(m->compression));
	put(o, "compression_reason", text_or_null(m->compression_reason));
	put(o, "round", uint_json(m->round));
	put(o, "bytes_sent", uint_json(m->bytes_sent));
	put(o, "bytes_uncompressed",
	    m->bytes_uncompressed ? uint_json(m->bytes_uncompressed) : json_null());
	put(o, "pages_normal", uint_json(m->pages_normal));
	put(o, "pages_zero", uint_json(m->pages_zero));
	put(o, "postcopy", json_boolean(m->postcopy));
	put(o, "pages_rdma_read", uint_json(m->pages_rdma_read));
	put(o, "remaining_bytes", uint_json(m->remaining_bytes));
	put(o, "dirty_rate_pps", rate_json(m->dirty_rate_pps));
	put(o, "bandwidth_bps", rate_json(m->bandwidth_bps));
	put(o, "expected_downtime_ms",
	    isfinite(m->expected_downtime_ms) && m->expected_downtime_ms >= 0
		? json_real(round(m->expected_downtime_ms * 1000.0) / 1000.0)
		: json_null());
	put(o, "downtime_target_ms", uint_json(m->downtime_target_ms));
	put(o, "verify", json_boolean(m->verify));
	put(o, "verified", json_boolean(m->verified));
	put(o, "started",
	    m->started_unix_ms ? json_integer(m->started_unix_ms / 1000) : json_null());
	put(o, "finished",
	    m->finished_unix_ms ? json_integer(m->finished_unix_ms / 1000) : json_null());
	put(o, "total_time_ms", done ? uint_json(m->total_time_ms) : json_null());
	put(o, "setup_time_ms",
	    done || m->setup_time_ms ? uint_json(m->setup_time_ms) : json_null());
	put(o, "downtime_ms", done ? uint_json(m->downtime_ms) : json_null());
	put(o, "downtime_us", done ? uint_json(m->downtime_us) : json_null());
	put(o, "error", text_or_null(m->error));
	put(o, "decision", text_or_null(m->decision));
	put(o, "decision_reason", text_or_null(m->decision_reason));
	json_t *th = json_object(), *pcts = json_array();
	for (unsigned i = 0; pcts && i < m->nr_vcpus; i++)
		json_array_append_new(pcts, json_integer(m->vcpu_throttle_pct[i]));
	if (th) {
		put(th, "level", uint_json(m->throttle_level));
		put(th, "vcpu_pct", pcts ? pcts : json_array());
		put(o, "throttle", th);
	} else {
		json_decref(pcts);
	}
	put(o, "queue_position", m->state == MIG_QUEUED && m->queue_position > 0
					  ? json_integer(m->queue_position)
					  : json_null());
	put(o, "bandwidth_cap_bps",
	    m->bandwidth_cap_bps > 0 ? rate_json(m->bandwidth_cap_bps) : json_null());
	put(o, "priority", json_integer(m->priority));
	return o;
}

/* ---------------- query strings and path arguments ---------------- */

/* Strict decimal: digits only, no sign, no overflow. */
static bool parse_u64(const char *s, uint64_t *ret)
{
	if (!s || !*s || strlen(s) > 20)
		return false;
	uint64_t v = 0;
	for (const char *p = s; *p; p++) {
		if (*p < '0' || *p > '9')
			return false;
		unsigned d = (unsigned)(*p - '0');
		if (v > (UINT64_MAX - d) / 10)
			return false;
		v = v * 10 + d;
	}
	*ret = v;
	return true;
}

static const char *query(struct MHD_Connection *c, const char *key)
{
	return MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, key);
}

/* ---------------- /v1/health ---------------- */

static enum MHD_Result get_health(struct api *api, struct MHD_Connection *c)
{
	struct agent_error err = {0};
	struct agent_vm_info *vms = NULL;
	struct migration_info *migs = NULL;
	unsigned nv = 0, nm = 0, active = 0;
	if (agent_vm_list(api->agent, &vms, &nv, &err) < 0 ||
	    agent_migration_list(api->agent, &migs, &nm, &err) < 0) {
		free(vms);
		return respond_agent_error(c, &err);
	}
	for (unsigned i = 0; i < nm; i++)
		active += !migration_final(migs[i].state);
	free(vms);
	free(migs);
	json_t *o = json_object();
	if (!o)
		return MHD_NO;
	put(o, "status", json_string("ok"));
	put(o, "name", text(agent_name(api->agent)));
	put(o, "listen", text(agent_listen_address(api->agent)));
	put(o, "vms", json_integer(nv));
	put(o, "migrations_active", json_integer(active));
	return respond_json(c, MHD_HTTP_OK, o);
}

/* ---------------- /v1/vms ---------------- */

static enum MHD_Result respond_vm(struct api *api, struct MHD_Connection *c, const char *name,
				  unsigned status, bool location)
{
	struct agent_error err = {0};
	struct agent_vm_info *info = malloc(sizeof(*info));
	if (!info)
		return MHD_NO;
	if (agent_vm_info(api->agent, name, info, &err) < 0) {
		free(info);
		return respond_agent_error(c, &err);
	}
	json_t *j = vm_json(info);
	free(info);
	char loc[VM_NAME_MAX + 16];
	snprintf(loc, sizeof(loc), "/v1/vms/%s", name);
	return respond_json_hdr(c, status, j, location ? MHD_HTTP_HEADER_LOCATION : NULL,
				location ? loc : NULL);
}

/* {"<key>": arr}, 200: the shape of every list. Takes arr over. */
static enum MHD_Result respond_list(struct MHD_Connection *c, const char *key, json_t *arr)
{
	json_t *o = json_object();
	if (!o || !arr) {
		json_decref(o);
		json_decref(arr);
		return MHD_NO;
	}
	put(o, key, arr);
	return respond_json(c, MHD_HTTP_OK, o);
}

static enum MHD_Result list_vms(struct api *api, struct MHD_Connection *c)
{
	struct agent_error err = {0};
	struct agent_vm_info *vms = NULL;
	unsigned n = 0;
	if (agent_vm_list(api->agent, &vms, &n, &err) < 0)
		return respond_agent_error(c, &err);
	json_t *arr = json_array();
	for (unsigned i = 0; arr && i < n; i++)
		json_array_append_new(arr, vm_json(&vms[i]));
	free(vms);
	return respond_list(c, "vms", arr);
}

static const char *const vm_create_fields[] = {"name",	 "memory",  "vcpus",	 "guest",
					       "params", "tracker", "slot_size", "hugepages",
					       "paused", NULL};

static int parse_vm_spec(json_t *o, struct agent_vm_spec *spec, char *msg, size_t mlen)
{
	uint64_t v = 0;
	char tracker[16] = "";
	int r;
	memset(spec, 0, sizeof(*spec));
	spec->tracker = TRACKER_AUTO;
	if (field_required(field_string(o, "name", spec->name, sizeof(spec->name), msg, mlen),
			   "name", msg, mlen) < 0)
		return -1;
	if (field_required(field_amount(o, "memory", ferry_config_parse_size, "\"512M\"",
					&spec->mem_size, msg, mlen),
			   "memory", msg, mlen) < 0)
		return -1;
	r = field_uint(o, "vcpus", 0, UINT32_MAX, &v, msg, mlen);
	if (r < 0)
		return -1;
	spec->vcpus = r ? (uint32_t)v : 1;
	if (field_required(field_string(o, "guest", spec->guest, sizeof(spec->guest), msg, mlen),
			   "guest", msg, mlen) < 0)
		return -1;
	/* The agent opens image files itself: a relative path would be relative to ferryd's
	 * working directory, which is never what the client meant. */
	if ((strncmp(spec->guest, "boot:", 5) == 0 || strncmp(spec->guest, "flat:", 5) == 0) &&
	    spec->guest[5] != '/')
		return bad(msg, mlen, "field 'guest': the image path in '%.64s' must be absolute",
			   spec->guest);
	if (field_params(o, spec, msg, mlen) < 0)
		return -1;
	r = field_string(o, "tracker", tracker, sizeof(tracker), msg, mlen);
	if (r < 0 || (r > 0 && tracker_backend_parse(tracker, &spec->tracker) < 0))
		return r < 0 ? -1
			     : bad(msg, mlen,
				   "field 'tracker' must be one of auto, ring, bitmap, legacy");
	if (field_amount(o, "slot_size", ferry_config_parse_size, "\"1G\"", &spec->slot_size, msg,
			 mlen) < 0 ||
	    field_bool(o, "hugepages", &spec->hugepages, msg, mlen) < 0 ||
	    field_bool(o, "paused", &spec->start_paused, msg, mlen) < 0)
		return -1;
	return 0;
}

static enum MHD_Result create_vm(struct api *api, struct MHD_Connection *c,
				 const struct request *rq)
{
	char msg[512];
	struct agent_vm_spec *spec = malloc(sizeof(*spec));
	if (!spec)
		return MHD_NO;
	json_t *o = body_object(rq, vm_create_fields, true, msg, sizeof(msg));
	if (!o || parse_vm_spec(o, spec, msg, sizeof(msg)) < 0) {
		json_decref(o);
		free(spec);
		return respond_error(c, MHD_HTTP_BAD_REQUEST, "invalid_argument", "%s", msg);
	}
	json_decref(o);
	struct agent_error err = {0};
	char name[VM_NAME_MAX];
	snprintf(name, sizeof(name), "%s", spec->name);
	int r = agent_vm_create(api->agent, spec, &err);
	free(spec);
	if (r < 0)
		return respond_agent_error(c, &err);
	return respond_vm(api, c, name, MHD_HTTP_CREATED, true);
}

static enum MHD_Result delete_vm(struct api *api, struct MHD_Connection *c, const char *name)
{
	struct agent_error err = {0};
	if (agent_vm_delete(api->agent, name, &err) < 0)
		return respond_agent_error(c, &err);
	return respond(c, MHD_HTTP_NO_CONTENT, NULL, NULL, 0, NULL, NULL);
}

static enum MHD_Result get_console(struct api *api, struct MHD_Connection *c, const char *name)
{
	uint64_t pos = 0;
	const char *off = query(c, "offset");
	if (off && !parse_u64(off, &pos))
		return respond_error(c, MHD_HTTP_BAD_REQUEST, "invalid_argument",
				     "offset must be a non-negative integer, got '%.32s'", off);
	char *buf = malloc(VM_CONSOLE_SIZE);
	if (!buf)
		return MHD_NO;
	struct agent_error err = {0};
	ssize_t n = agent_vm_console(api->agent, name, &pos, buf, VM_CONSOLE_SIZE, &err);
	if (n < 0) {
		free(buf);
		return respond_agent_error(c, &err);
	}
	char next[24];
	snprintf(next, sizeof(next), "%llu", (unsigned long long)pos);
	if (n == 0) {
		free(buf);
		buf = NULL;
	}
	return respond(c, MHD_HTTP_OK, "text/plain", buf, (size_t)n, "X-Console-Offset", next);
}

static enum MHD_Result pause_resume_vm(struct api *api, struct MHD_Connection *c, const char *name,
				       const struct request *rq, bool pause)
{
	static const char *const none[] = {NULL};
	char msg[512];
	json_t *o = body_object(rq, none, false, msg, sizeof(msg));
	if (!o)
		return respond_error(c, MHD_HTTP_BAD_REQUEST, "invalid_argument", "%s", msg);
	json_decref(o);
	struct agent_error err = {0};
	int r = pause ? agent_vm_pause(api->agent, name, &err)
		      : agent_vm_resume(api->agent, name, &err);
	if (r < 0)
		return respond_agent_error(c, &err);
	return respond_vm(api, c, name, MHD_HTTP_OK, false);
}

static enum MHD_Result dump_vm(struct api *api, struct MHD_Connection *c, const char *name,
			       const struct request *rq)
{
	static const char *const fields[] = {"path", NULL};
	char msg[512];
	char path[PATH_MAX];
	json_t *o = body_object(rq, fields, true, msg, sizeof(msg));
	int r = o ? field_required(field_string(o, "path", path, sizeof(path), msg, sizeof(msg)),
				   "path", msg, sizeof(msg))
		  : -1;
	json_decref(o);
	if (r < 0)
		return respond_error(c, MHD_HTTP_BAD_REQUEST, "invalid_argument", "%s", msg);
	if (path[0] != '/')
		return respond_error(c, MHD_HTTP_BAD_REQUEST, "invalid_argument",
				     "field 'path' must be an absolute path (the agent opens it)");
	struct agent_error err = {0};
	struct agent_vm_info *info = malloc(sizeof(*info));
	if (!info)
		return MHD_NO;
	if (agent_vm_dump(api->agent, name, path, &err) < 0 ||
	    agent_vm_info(api->agent, name, info, &err) < 0) {
		free(info);
		return respond_agent_error(c, &err);
	}
	json_t *j = json_object();
	if (j) {
		put(j, "vm", text(name));
		put(j, "path", text(path));
		put(j, "bytes", uint_json(info->mem_size));
	}
	free(info);
	return respond_json(c, MHD_HTTP_OK, j);
}

/* ---------------- /v1/migrations ---------------- */

static enum MHD_Result respond_migration(struct api *api, struct MHD_Connection *c, uint64_t id,
					 unsigned status, bool location)
{
	struct agent_error err = {0};
	struct migration_info info;
	if (agent_migration_info(api->agent, id, &info, &err) < 0) {
		if (status == MHD_HTTP_OK)
			return respond_agent_error(c, &err);
		/* Accepted but already gone from the records: the id is what the client needs. */
		json_t *o = json_object();
		if (o)
			put(o, "id", uint_json(id));
		return respond_json(c, status, o);
	}
	char loc[48];
	snprintf(loc, sizeof(loc), "/v1/migrations/%llu", (unsigned long long)id);
	return respond_json_hdr(c, status, migration_json(&info),
				location ? MHD_HTTP_HEADER_LOCATION : NULL, location ? loc : NULL);
}

static enum MHD_Result list_migrations(struct api *api, struct MHD_Connection *c)
{
	struct agent_error err = {0};
	struct migration_info *migs = NULL;
	unsigned n = 0;
	if (agent_migration_list(api->agent, &migs, &n, &err) < 0)
		return respond_agent_error(c, &err);
	json_t *arr = json_array();
	for (unsigned i = 0; arr && i < n; i++)
		json_array_append_new(arr, migration_json(&migs[i]));
	free(migs);
	return respond_list(c, "migrations", arr);
}

static const char *const migration_create_fields[] = {
    "vm", "to", "downtime_ms", "bandwidth", "streams", "verify", "transport", "compress",
    "allow_postcopy", "postcopy_after_rounds", "timeout_action", "completion_timeout_per_gib",
    "progress_timeout", "priority", NULL};

/* The per-migration policy overrides (docs/scheduler.md); absent fields keep -1. */
static int parse_policy_fields(json_t *o, struct migration_request *req, char *msg, size_t mlen)
{
	bool b = false;
	uint64_t v;
	char act[16];
	int r = field_bool(o, "allow_postcopy", &b, msg, mlen);
	if (r < 0)
		return -1;
	if (r)
		req->allow_postcopy = b;
	json_t *pa = json_object_get(o, "postcopy_after_rounds");
	if (pa && !json_is_null(pa)) {
		if (!json_is_integer(pa) || json_integer_value(pa) < -1 ||
		    json_integer_value(pa) > 1000)
			return bad(msg, mlen, "field 'postcopy_after_rounds' must be an integer from "
					      "-1 (postcopy only as a last resort) to 1000");
		req->postcopy_after_rounds = (int)json_integer_value(pa);
	}
	r = field_string(o, "timeout_action", act, sizeof(act), msg, mlen);
	if (r < 0)
		return -1;
	if (r) {
		enum ferry_config_timeout_action a;
		if (ferry_config_timeout_action_parse(act, &a) < 0)
			return bad(msg, mlen,
				   "field 'timeout_action' must be one of abort, switchover, postcopy");
		req->timeout_action = (int)a;
	}
	r = field_uint(o, "completion_timeout_per_gib", 0, 86400, &v, msg, mlen);
	if (r < 0)
		return -1;
	if (r)
		req->completion_timeout_per_gib = (int64_t)v;
	r = field_uint(o, "progress_timeout", 0, 86400, &v, msg, mlen);
	if (r < 0)
		return -1;
	if (r)
		req->progress_timeout = (int64_t)v;
	r = field_uint(o, "priority", 0, 100, &v, msg, mlen);
	if (r < 0)
		return -1;
	if (r)
		req->priority = (int)v;
	return 0;
}

static int parse_migration_request(json_t *o, struct migration_request *req, char *msg, size_t mlen)
{
	char host[FERRY_CONFIG_HOST_MAX + 1];
	char transport[16] = "";
	uint16_t port = 0;
	uint64_t v;
	bool verify = false;
	int r;
	migration_request_init(req);
	if (field_required(field_string(o, "vm", req->vm, sizeof(req->vm), msg, mlen), "vm", msg,
			   mlen) < 0 ||
	    field_required(field_string(o, "to", req->dest, sizeof(req->dest), msg, mlen), "to",
			   msg, mlen) < 0)
		return -1;
	if (ferry_config_parse_hostport(req->dest, host, sizeof(host), &port) < 0)
		return bad(msg, mlen,
			   "field 'to' must be the destination agent's migration address "
			   "HOST:PORT ([IPV6]:PORT), got '%.64s'",
			   req->dest);
	if (port == 0)
		return bad(msg, mlen, "field 'to' needs a port other than 0");
	r = field_uint(o, "downtime_ms", 1, 60000, &v, msg, mlen);
	if (r < 0)
		return -1;
	req->downtime_ms = r ? (uint32_t)v : 0;
	if (field_amount(o, "bandwidth", ferry_config_parse_rate, "\"1Gbit\" or \"100M\"",
			 &req->bandwidth, msg, mlen) < 0)
		return -1;
	r = field_uint(o, "streams", 1, 64, &v, msg, mlen);
	if (r < 0)
		return -1;
	req->streams = r ? (uint32_t)v : 0;
	r = field_bool(o, "verify", &verify, msg, mlen);
	if (r < 0)
		return -1;
	if (r)
		req->verify = verify;
	r = field_string(o, "transport", transport, sizeof(transport), msg, mlen);
	if (r < 0)
		return -1;
	req->transport = MIG_TRANSPORT_AUTO;
	if (r && strcmp(transport, "tcp") == 0)
		req->transport = MIG_TRANSPORT_TCP;
	else if (r && strcmp(transport, "rdma") == 0)
		req->transport = MIG_TRANSPORT_RDMA;
	else if (r && strcmp(transport, "auto") != 0)
		return bad(msg, mlen, "field 'transport' must be one of auto, tcp, rdma");
	char compress[16] = "";
	r = field_string(o, "compress", compress, sizeof(compress), msg, mlen);
	if (r < 0)
		return -1;
	if (r && !strcmp(compress, "off"))
		req->compress = FERRY_CONFIG_COMPRESS_OFF;
	else if (r && !strcmp(compress, "on"))
		req->compress = FERRY_CONFIG_COMPRESS_ON;
	else if (r && !strcmp(compress, "auto"))
		req->compress = FERRY_CONFIG_COMPRESS_AUTO;
	else if (r)
		return bad(msg, mlen, "field 'compress' must be one of off, on, auto");
	return parse_policy_fields(o, req, msg, mlen);
}

static enum MHD_Result create_migration(struct api *api, struct MHD_Connection *c,
					const struct request *rq)
{
	char msg[512];
	struct migration_request req;
	json_t *o = body_object(rq, migration_create_fields, true, msg, sizeof(msg));
	if (!o || parse_migration_request(o, &req, msg, sizeof(msg)) < 0) {
		json_decref(o);
		return respond_error(c, MHD_HTTP_BAD_REQUEST, "invalid_argument", "%s", msg);
	}
	json_decref(o);
	struct agent_error err = {0};
	uint64_t id = 0;
	if (agent_migration_create(api->agent, &req, &id, &err) < 0)
		return respond_agent_error(c, &err);
	return respond_migration(api, c, id, MHD_HTTP_ACCEPTED, true);
}

static enum MHD_Result migration_action(struct api *api, struct MHD_Connection *c, uint64_t id,
					const struct request *rq, bool cancel)
{
	static const char *const none[] = {NULL};
	char msg[512];
	json_t *o = body_object(rq, none, false, msg, sizeof(msg));
	if (!o)
		return respond_error(c, MHD_HTTP_BAD_REQUEST, "invalid_argument", "%s", msg);
	json_decref(o);
	struct agent_error err = {0};
	int r = cancel ? agent_migration_cancel(api->agent, id, &err)
		       : agent_migration_switchover(api->agent, id, &err);
	if (r < 0)
		return respond_agent_error(c, &err);
	return respond_migration(api, c, id, MHD_HTTP_ACCEPTED, false);
}

static enum MHD_Result get_history(struct api *api, struct MHD_Connection *c, uint64_t id)
{
	struct agent_error err = {0};
	char *js = NULL;
	if (agent_migration_history(api->agent, id, &js, &err) < 0)
		return respond_agent_error(c, &err);
	json_error_t je;
	json_t *arr = json_loads(js, 0, &je);
	free(js);
	if (!arr)
		return respond_error(c, MHD_HTTP_INTERNAL_SERVER_ERROR, "internal",
				     "history is not JSON: %s", je.text);
	json_t *o = json_object();
	if (!o) {
		json_decref(arr);
		return MHD_NO;
	}
	put(o, "migration", uint_json(id));
	put(o, "history", arr);
	return respond_json(c, MHD_HTTP_OK, o);
}

/* ---------------- /v1/evacuate ---------------- */

static const char *const evacuate_fields[] = {
    "to", "vms", "downtime_ms", "bandwidth", "streams", "verify", "transport", "compress",
    "allow_postcopy",
    "postcopy_after_rounds", "timeout_action", "completion_timeout_per_gib", "progress_timeout",
    "priority", NULL};

#define EVACUATE_DESTS_MAX 16u

static enum MHD_Result evacuate(struct api *api, struct MHD_Connection *c,
				const struct request *rq)
{
	char msg[512];
	char dests[EVACUATE_DESTS_MAX][AGENT_HOSTPORT_MAX];
	unsigned nd = 0;
	struct migration_request req;
	json_t *o = body_object(rq, evacuate_fields, true, msg, sizeof(msg));
	if (!o)
		return respond_error(c, MHD_HTTP_BAD_REQUEST, "invalid_argument", "%s", msg);
	json_t *to = json_object_get(o, "to");
	if (!to || !json_is_array(to) || json_array_size(to) == 0 ||
	    json_array_size(to) > EVACUATE_DESTS_MAX) {
		json_decref(o);
		return respond_error(c, MHD_HTTP_BAD_REQUEST, "invalid_argument",
				     "field 'to' must be a list of 1 to %u destination agents "
				     "(HOST:PORT)",
				     EVACUATE_DESTS_MAX);
	}
	size_t i;
	json_t *d;
	json_array_foreach(to, i, d)
	{
		char host[FERRY_CONFIG_HOST_MAX + 1];
		uint16_t port = 0;
		const char *hp = json_is_string(d) ? json_string_value(d) : NULL;
		if (!hp || strlen(hp) >= AGENT_HOSTPORT_MAX ||
		    ferry_config_parse_hostport(hp, host, sizeof(host), &port) < 0 || !port) {
			json_decref(o);
			return respond_error(c, MHD_HTTP_BAD_REQUEST, "invalid_argument",
					     "field 'to' item %zu must be a destination agent's "
					     "migration address HOST:PORT",
					     i);
		}
		snprintf(dests[nd++], AGENT_HOSTPORT_MAX, "%s", hp);
	}
	enum { ONLY_MAX = 256 };
	char(*names)[VM_NAME_MAX] = NULL;
	unsigned nv = 0;
	json_t *vms = json_object_get(o, "vms");
	if (vms && !json_is_null(vms)) {
		if (!json_is_array(vms) || json_array_size(vms) > ONLY_MAX) {
			json_decref(o);
			return respond_error(c, MHD_HTTP_BAD_REQUEST, "invalid_argument",
					     "field 'vms' must be a list of at most %u VM names",
					     ONLY_MAX);
		}
		names = calloc(json_array_size(vms) ? json_array_size(vms) : 1, VM_NAME_MAX);
		if (!names) {
			json_decref(o);
			return MHD_NO;
		}
		json_array_foreach(vms, i, d)
		{
			const char *vn = json_is_string(d) ? json_string_value(d) : NULL;
			if (!vn || !*vn || strlen(vn) >= VM_NAME_MAX) {
				free(names);
				json_decref(o);
				return respond_error(c, MHD_HTTP_BAD_REQUEST, "invalid_argument",
						     "field 'vms' item %zu must be a VM name", i);
			}
			snprintf(names[nv++], VM_NAME_MAX, "%s", vn);
		}
		json_object_del(o, "vms");
	}

	/* The rest are the migrations' settings, checked as for POST /v1/migrations. */
	json_object_set_new(o, "vm", json_string("-"));
	json_object_set_new(o, "to", json_string(dests[0]));
	int pr = parse_migration_request(o, &req, msg, sizeof(msg));
	json_decref(o);
	if (pr < 0) {
		free(names);
		return respond_error(c, MHD_HTTP_BAD_REQUEST, "invalid_argument", "%s", msg);
	}
	struct agent_error err = {0};
	struct evacuation_item *items = NULL;
	unsigned n = 0;
	int er = agent_evacuate(api->agent, (const char(*)[AGENT_HOSTPORT_MAX])dests, nd,
				(const char(*)[VM_NAME_MAX])names, nv, &req, &items, &n, &err);
	free(names);
	if (er < 0)
		return respond_agent_error(c, &err);
	json_t *arr = json_array();
	for (unsigned k = 0; arr && k < n; k++) {
		json_t *it = json_object();
		if (!it)
			continue;
		put(it, "vm", text(items[k].vm));
		put(it, "to", text(items[k].dest));
		put(it, "migration", items[k].migration_id ? uint_json(items[k].migration_id)
							   : json_null());
		put(it, "error", text_or_null(items[k].error));
		json_array_append_new(arr, it);
	}
	free(items);
	json_t *res = json_object();
	if (!res) {
		json_decref(arr);
		return MHD_NO;
	}
	put(res, "evacuation", arr ? arr : json_array());
	return respond_json(c, MHD_HTTP_ACCEPTED, res);
}

/* ---------------- /v1/events ---------------- */

struct feed {
	struct api *api;
	uint64_t seq;	       /* last event sent */
	int fd;		       /* the client's socket, watched for hang-up */
	uint64_t heartbeat_ns; /* a line at least this often, so dead peers and idle proxies
				* notice */
	uint64_t last_ns;
	char *line;
	size_t len, off;
};

static uint64_t mono_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* True once the client closed its end: without this a feed with no events would keep its
 * thread until the next heartbeat write fails. */
static bool client_gone(int fd)
{
	if (fd < 0)
		return false;
	struct pollfd p = {.fd = fd, .events = POLLRDHUP};
	return poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR));
}

static ssize_t feed_read(void *cls, uint64_t pos, char *buf, size_t max)
{
	struct feed *f = cls;
	(void)pos;
	while (f->off >= f->len) {
		free(f->line);
		f->line = NULL;
		f->len = f->off = 0;
		if (atomic_load(&f->api->stopping))
			return MHD_CONTENT_READER_END_OF_STREAM;
		if (client_gone(f->fd))
			return MHD_CONTENT_READER_END_WITH_ERROR;
		/* Wait in 1 s slices so stop and hang-ups are noticed within a second. */
		uint64_t t0 = mono_ns();
		char *ev = agent_events_next(f->api->agent, &f->seq, 1000);
		uint64_t t1 = mono_ns();
		int n = -1;
		if (ev) {
			n = asprintf(&f->line, "%s\n", ev);
			free(ev);
		} else if (t1 - t0 < 500000000ull) {
			/* agent_events_next returns early without an event only once the feed is
			 * closed (agent_shutdown): end the stream cleanly. */
			return MHD_CONTENT_READER_END_OF_STREAM;
		} else if (t1 - f->last_ns >= f->heartbeat_ns) {
			struct timespec ts;
			clock_gettime(CLOCK_REALTIME, &ts);
			n = asprintf(&f->line,
				     "{\"type\":\"heartbeat\",\"seq\":%llu,\"time_ms\":%lld}\n",
				     (unsigned long long)f->seq,
				     (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000);
		} else {
			continue;
		}
		if (n < 0) {
			f->line = NULL;
			return MHD_CONTENT_READER_END_WITH_ERROR;
		}
		f->len = (size_t)n;
		f->last_ns = t1;
	}
	size_t n = f->len - f->off < max ? f->len - f->off : max;
	memcpy(buf, f->line + f->off, n);
	f->off += n;
	return (ssize_t)n;
}

static void feed_free(void *cls)
{
	struct feed *f = cls;
	atomic_fetch_sub(&f->api->feeds, 1);
	free(f->line);
	free(f);
}

static enum MHD_Result get_events(struct api *api, struct MHD_Connection *c)
{
	uint64_t since = 0, hb = FERRY_API_HEARTBEAT_S;
	const char *s = query(c, "since");
	const char *h = query(c, "heartbeat");
	if (s && !parse_u64(s, &since))
		return respond_error(c, MHD_HTTP_BAD_REQUEST, "invalid_argument",
				     "since must be an event sequence number, got '%.32s'", s);
	if (h && (!parse_u64(h, &hb) || hb < 1 || hb > FERRY_API_IDLE_TIMEOUT_S / 2))
		return respond_error(c, MHD_HTTP_BAD_REQUEST, "invalid_argument",
				     "heartbeat must be 1 to %u seconds, got '%.32s'",
				     FERRY_API_IDLE_TIMEOUT_S / 2, h);
	struct feed *f = calloc(1, sizeof(*f));
	if (!f)
		return MHD_NO;
	f->api = api;
	f->seq = s ? since : agent_events_last_seq(api->agent);
	f->heartbeat_ns = hb * 1000000000ull;
	f->last_ns = mono_ns();
	const union MHD_ConnectionInfo *ci =
	    MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
	f->fd = ci ? ci->connect_fd : -1;
	atomic_fetch_add(&api->feeds, 1);
	struct MHD_Response *r =
	    MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 4096, feed_read, f, feed_free);
	if (!r) {
		feed_free(f);
		return MHD_NO;
	}
	MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "application/x-ndjson");
	MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
	enum MHD_Result ret = MHD_queue_response(c, MHD_HTTP_OK, r);
	MHD_destroy_response(r);
	return ret;
}

/* ---------------- /metrics ---------------- */

/* Prometheus label values escape backslash, double quote and newline. */
static void label(FILE *f, const char *s)
{
	for (; *s; s++) {
		if (*s == '\\' || *s == '"')
			fprintf(f, "\\%c", *s);
		else if (*s == '\n')
			fputs("\\n", f);
		else
			fputc(*s, f);
	}
}

static void family(FILE *f, const char *name, const char *type, const char *help)
{
	fprintf(f, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* One sample per migration of a numeric field, labelled {id, vm}. */
static void migration_samples(FILE *f, const char *name, const char *type, const char *help,
			      const struct migration_info *m, unsigned n,
			      double (*get)(const struct migration_info *))
{
	family(f, name, type, help);
	for (unsigned i = 0; i < n; i++) {
		double v = get(&m[i]);
		if (!isfinite(v))
			continue;
		fprintf(f, "%s{id=\"%llu\",vm=\"", name, (unsigned long long)m[i].id);
		label(f, m[i].vm);
		fprintf(f, "\"} %.17g\n", v);
	}
}

static double m_bytes_sent(const struct migration_info *m) { return (double)m->bytes_sent; }
static double m_remaining(const struct migration_info *m) { return (double)m->remaining_bytes; }
static double m_dirty_rate(const struct migration_info *m) { return m->dirty_rate_pps; }
static double m_bandwidth(const struct migration_info *m) { return m->bandwidth_bps; }
static double m_expected(const struct migration_info *m) { return m->expected_downtime_ms; }
static double m_round(const struct migration_info *m) { return m->round; }
static double m_pages_normal(const struct migration_info *m) { return (double)m->pages_normal; }
static double m_pages_zero(const struct migration_info *m) { return (double)m->pages_zero; }
static double m_downtime(const struct migration_info *m)
{
	return m->finished_unix_ms || migration_final(m->state) ? (double)m->downtime_us / 1000.0 : NAN;
}
static double m_total(const struct migration_info *m)
{
	return m->finished_unix_ms || migration_final(m->state) ? (double)m->total_time_ms : NAN;
}

static enum MHD_Result get_metrics(struct api *api, struct MHD_Connection *c)
{
	struct agent_error err = {0};
	struct agent_vm_info *vms = NULL;
	struct migration_info *migs = NULL;
	unsigned nv = 0, nm = 0;
	if (agent_vm_list(api->agent, &vms, &nv, &err) < 0 ||
	    agent_migration_list(api->agent, &migs, &nm, &err) < 0) {
		free(vms);
		return respond_agent_error(c, &err);
	}
	char *out = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&out, &len);
	if (!f) {
		free(vms);
		free(migs);
		return MHD_NO;
	}
	family(f, "ferry_agent_info", "gauge", "This agent: name and migration listener.");
	fputs("ferry_agent_info{name=\"", f);
	label(f, agent_name(api->agent));
	fputs("\",listen=\"", f);
	label(f, agent_listen_address(api->agent));
	fputs("\"} 1\n", f);

	family(f, "ferry_vms", "gauge", "VMs this agent holds, incoming ones included.");
	fprintf(f, "ferry_vms %u\n", nv);
	family(f, "ferry_vm_info", "gauge", "One series per VM with its guest and state.");
	for (unsigned i = 0; i < nv; i++) {
		fputs("ferry_vm_info{vm=\"", f);
		label(f, vms[i].name);
		fputs("\",guest=\"", f);
		label(f, vms[i].guest);
		fprintf(f, "\",state=\"%s\"} 1\n", agent_vm_state_name(vms[i].state));
	}
	static const struct {
		const char *name, *type, *help;
	} vm_families[] = {
	    {"ferry_vm_memory_bytes", "gauge", "Guest RAM of the VM."},
	    {"ferry_vm_vcpus", "gauge", "vCPUs of the VM."},
	    {"ferry_vm_guest_errors_total", "counter",
	     "Errors the guest reported (memcheck: pages with wrong content)."},
	    {"ferry_vm_exits_total", "counter", "KVM exits over all vCPUs."},
	    {"ferry_vm_ring_full_exits_total", "counter",
	     "Exits because a vCPU's dirty ring filled up."},
	};
	for (unsigned k = 0; k < sizeof(vm_families) / sizeof(vm_families[0]); k++) {
		family(f, vm_families[k].name, vm_families[k].type, vm_families[k].help);
		for (unsigned i = 0; i < nv; i++) {
			const struct agent_vm_info *v = &vms[i];
			uint64_t val = k == 0	? v->mem_size
				       : k == 1 ? v->vcpus
				       : k == 2 ? v->stats.errors
				       : k == 3 ? v->stats.exits
						: v->stats.ring_full_exits;
			fprintf(f, "%s{vm=\"", vm_families[k].name);
			label(f, v->name);
			fprintf(f, "\"} %llu\n", (unsigned long long)val);
		}
	}

	family(f, "ferry_migrations", "gauge", "Migrations this agent knows of, by state.");
	for (int s = MIG_QUEUED; s <= MIG_POSTCOPY; s++) {
		unsigned count = 0;
		for (unsigned i = 0; i < nm; i++)
			count += migs[i].state == (enum migration_state)s;
		fprintf(f, "ferry_migrations{state=\"%s\"} %u\n",
			migration_state_name((enum migration_state)s), count);
	}
	family(f, "ferry_migration_info", "gauge",
	       "One series per migration with its direction, peer, transport and state.");
	for (unsigned i = 0; i < nm; i++) {
		fprintf(f, "ferry_migration_info{id=\"%llu\",vm=\"",
			(unsigned long long)migs[i].id);
		label(f, migs[i].vm);
		fprintf(f, "\",direction=\"%s\",peer=\"",
			migs[i].incoming ? "incoming" : "outgoing");
		label(f, migs[i].peer);
		fputs("\",transport=\"", f);
		label(f, migs[i].transport);
		fprintf(f, "\",state=\"%s\"} 1\n", migration_state_name(migs[i].state));
	}
	migration_samples(f, "ferry_migration_round", "gauge", "Current precopy round.", migs, nm,
			  m_round);
	migration_samples(f, "ferry_migration_bytes_sent", "counter",
			  "Bytes of guest memory sent so far.", migs, nm, m_bytes_sent);
	migration_samples(f, "ferry_migration_pages_normal", "counter",
			  "Pages sent with their contents.", migs, nm, m_pages_normal);
	migration_samples(f, "ferry_migration_pages_zero", "counter",
			  "Pages sent as zero pages (no contents).", migs, nm, m_pages_zero);
	migration_samples(f, "ferry_migration_remaining_bytes", "gauge",
			  "Dirty guest memory still to send.", migs, nm, m_remaining);
	migration_samples(f, "ferry_migration_dirty_rate_pps", "gauge",
			  "Pages the guest dirties per second.", migs, nm, m_dirty_rate);
	migration_samples(f, "ferry_migration_bandwidth_bps", "gauge",
			  "Measured send bandwidth in bytes per second.", migs, nm, m_bandwidth);
	migration_samples(f, "ferry_migration_expected_downtime_ms", "gauge",
			  "Downtime if the migration switched over now.", migs, nm, m_expected);
	migration_samples(f, "ferry_migration_downtime_ms", "gauge",
			  "Downtime of a finished migration.", migs, nm, m_downtime);
	migration_samples(f, "ferry_migration_total_time_ms", "gauge",
			  "Duration of a finished migration.", migs, nm, m_total);
	free(vms);
	free(migs);
	if (fclose(f) != 0) {
		free(out);
		return MHD_NO;
	}
	return respond(c, MHD_HTTP_OK, "text/plain; version=0.0.4; charset=utf-8", out, len, NULL,
		       NULL);
}

/* ---------------- routing ---------------- */

enum route {
	R_NONE,
	R_HEALTH,
	R_VMS,
	R_VM,
	R_VM_CONSOLE,
	R_VM_PAUSE,
	R_VM_RESUME,
	R_VM_DUMP,
	R_MIGRATIONS,
	R_MIGRATION,
	R_MIGRATION_SWITCHOVER,
	R_MIGRATION_HISTORY,
	R_EVACUATE,
	R_EVENTS,
	R_METRICS,
};

enum { M_GET = 1, M_POST = 2, M_DELETE = 4 };

static const struct {
	unsigned methods;
	const char *allow;
} routes[] = {
    [R_HEALTH] = {M_GET, "GET, HEAD"},
    [R_VMS] = {M_GET | M_POST, "GET, HEAD, POST"},
    [R_VM] = {M_GET | M_DELETE, "GET, HEAD, DELETE"},
    [R_VM_CONSOLE] = {M_GET, "GET, HEAD"},
    [R_VM_PAUSE] = {M_POST, "POST"},
    [R_VM_RESUME] = {M_POST, "POST"},
    [R_VM_DUMP] = {M_POST, "POST"},
    [R_MIGRATIONS] = {M_GET | M_POST, "GET, HEAD, POST"},
    [R_MIGRATION] = {M_GET | M_DELETE, "GET, HEAD, DELETE"},
    [R_MIGRATION_SWITCHOVER] = {M_POST, "POST"},
    [R_MIGRATION_HISTORY] = {M_GET, "GET, HEAD"},
    [R_EVACUATE] = {M_POST, "POST"},
    [R_EVENTS] = {M_GET, "GET, HEAD"},
    [R_METRICS] = {M_GET, "GET, HEAD"},
};

#define SEGMENTS_MAX 4

/* Splits the (already percent-decoded) path and matches it; arg gets the {name}/{id}. */
static enum route match(const char *url, char *arg, size_t arglen)
{
	char path[512];
	char *seg[SEGMENTS_MAX];
	unsigned n = 0;
	if (strlen(url) >= sizeof(path))
		return R_NONE;
	snprintf(path, sizeof(path), "%s", url);
	char *save = NULL;
	for (char *t = strtok_r(path, "/", &save); t; t = strtok_r(NULL, "/", &save)) {
		if (n == SEGMENTS_MAX)
			return R_NONE;
		seg[n++] = t;
	}
	if (n == 1 && strcmp(seg[0], "metrics") == 0)
		return R_METRICS;
	if (n < 2 || strcmp(seg[0], "v1") != 0)
		return R_NONE;
	if (n >= 3) {
		if (strlen(seg[2]) >= arglen)
			return R_NONE;
		snprintf(arg, arglen, "%s", seg[2]);
	}
	if (strcmp(seg[1], "health") == 0 && n == 2)
		return R_HEALTH;
	if (strcmp(seg[1], "events") == 0 && n == 2)
		return R_EVENTS;
	if (strcmp(seg[1], "evacuate") == 0 && n == 2)
		return R_EVACUATE;
	if (strcmp(seg[1], "vms") == 0) {
		if (n == 2)
			return R_VMS;
		if (n == 3)
			return R_VM;
		if (strcmp(seg[3], "console") == 0)
			return R_VM_CONSOLE;
		if (strcmp(seg[3], "pause") == 0)
			return R_VM_PAUSE;
		if (strcmp(seg[3], "resume") == 0)
			return R_VM_RESUME;
		if (strcmp(seg[3], "dump") == 0)
			return R_VM_DUMP;
		return R_NONE;
	}
	if (strcmp(seg[1], "migrations") == 0) {
		if (n == 2)
			return R_MIGRATIONS;
		if (n == 3)
			return R_MIGRATION;
		if (strcmp(seg[3], "switchover") == 0)
			return R_MIGRATION_SWITCHOVER;
		if (strcmp(seg[3], "history") == 0)
			return R_MIGRATION_HISTORY;
	}
	return R_NONE;
}

static enum MHD_Result dispatch(struct api *api, struct MHD_Connection *c, const char *url,
				const char *method, const struct request *rq)
{
	char arg[AGENT_HOSTPORT_MAX] = "";
	enum route r = match(url, arg, sizeof(arg));
	if (r == R_NONE)
		return respond_error(c, MHD_HTTP_NOT_FOUND, "not_found",
				     "no such endpoint: %.200s (see docs/api.md)", url);
	unsigned m = strcmp(method, "GET") == 0 || strcmp(method, "HEAD") == 0 ? M_GET
		     : strcmp(method, "POST") == 0			       ? M_POST
		     : strcmp(method, "DELETE") == 0			       ? M_DELETE
									       : 0;
	if (!(routes[r].methods & m))
		return respond_error_hdr(c, MHD_HTTP_METHOD_NOT_ALLOWED, "method_not_allowed",
					 MHD_HTTP_HEADER_ALLOW, routes[r].allow,
					 "%.16s is not allowed on %.200s (allowed: %s)", method,
					 url, routes[r].allow);
	uint64_t id = 0;
	if ((r == R_MIGRATION || r == R_MIGRATION_SWITCHOVER || r == R_MIGRATION_HISTORY) &&
	    !parse_u64(arg, &id))
		return respond_error(c, MHD_HTTP_BAD_REQUEST, "invalid_argument",
				     "migration id '%.32s' is not a number", arg);

	switch (r) {
	case R_HEALTH:
		return get_health(api, c);
	case R_VMS:
		return m == M_GET ? list_vms(api, c) : create_vm(api, c, rq);
	case R_VM:
		return m == M_GET ? respond_vm(api, c, arg, MHD_HTTP_OK, false)
				  : delete_vm(api, c, arg);
	case R_VM_CONSOLE:
		return get_console(api, c, arg);
	case R_VM_PAUSE:
	case R_VM_RESUME:
		return pause_resume_vm(api, c, arg, rq, r == R_VM_PAUSE);
	case R_VM_DUMP:
		return dump_vm(api, c, arg, rq);
	case R_MIGRATIONS:
		return m == M_GET ? list_migrations(api, c) : create_migration(api, c, rq);
	case R_MIGRATION:
		return m == M_GET ? respond_migration(api, c, id, MHD_HTTP_OK, false)
				  : migration_action(api, c, id, rq, true);
	case R_MIGRATION_SWITCHOVER:
		return migration_action(api, c, id, rq, false);
	case R_MIGRATION_HISTORY:
		return get_history(api, c, id);
	case R_EVACUATE:
		return evacuate(api, c, rq);
	case R_EVENTS:
		return get_events(api, c);
	case R_METRICS:
		return get_metrics(api, c);
	case R_NONE:
		break;
	}
	return MHD_NO;
}

static enum MHD_Result respond_too_big(struct MHD_Connection *c)
{
	return respond_error(c, MHD_HTTP_CONTENT_TOO_LARGE, "too_large",
			     "request body larger than %u bytes", FERRY_API_BODY_MAX);
}

/* The TLS listener serves only clients whose certificate the configured CA signed. MHD asks
 * for a certificate (because of HTTPS_MEM_TRUST) but does not insist, so insist here. */
static bool client_cert_ok(struct MHD_Connection *c)
{
	const union MHD_ConnectionInfo *ci =
	    MHD_get_connection_info(c, MHD_CONNECTION_INFO_GNUTLS_SESSION);
	if (!ci || !ci->tls_session)
		return false;
	gnutls_session_t s = (gnutls_session_t)ci->tls_session;
	unsigned n = 0, status = 0;
	if (!gnutls_certificate_get_peers(s, &n) || n == 0)
		return false;
	return gnutls_certificate_verify_peers2(s, &status) == 0 && status == 0;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url,
				  const char *method, const char *version, const char *upload,
				  size_t *upload_size, void **con_cls)
{
	struct listener *l = cls;
	struct request *rq = *con_cls;
	(void)version;
	if (!rq) {
		/* First call: headers only. Refuse what we will refuse anyway before reading
		 * (or, with Expect: 100-continue, before the client even sends) the body. */
		rq = calloc(1, sizeof(*rq));
		if (!rq)
			return MHD_NO;
		*con_cls = rq;
		if (l->tls && !client_cert_ok(c)) {
			rq->responded = true;
			return respond_error(c, MHD_HTTP_FORBIDDEN, "permission_denied",
					     "a client certificate signed by this agent's CA "
					     "(tls.ca) is required");
		}
		const char *cl =
		    MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
		uint64_t n = 0;
		if (cl && parse_u64(cl, &n) && n > FERRY_API_BODY_MAX) {
			rq->responded = true;
			return respond_error(c, MHD_HTTP_CONTENT_TOO_LARGE, "too_large",
					     "request body of %llu bytes; at most %u",
					     (unsigned long long)n, FERRY_API_BODY_MAX);
		}
		return MHD_YES;
	}
	if (*upload_size) {
		size_t add = *upload_size;
		*upload_size = 0;
		if (rq->responded)
			return MHD_YES;
		if (rq->too_big || rq->len + add > FERRY_API_BODY_MAX) {
			/*
			 * A chunked body (no Content-Length to refuse up front) that grew too big.
			 * Answering while the client still sends would make our close reset the
			 * connection before it reads the 413, so drain the rest and answer at the
			 * end, up to a bound past which a reset is what the sender deserves.
			 */
			rq->too_big = true;
			rq->discarded += add;
			if (rq->discarded <= FERRY_API_DRAIN_MAX)
				return MHD_YES;
			rq->responded = true;
			return respond_too_big(c);
		}
		char *b = realloc(rq->body, rq->len + add);
		if (!b)
			return MHD_NO;
		memcpy(b + rq->len, upload, add);
		rq->body = b;
		rq->len += add;
		return MHD_YES;
	}
	if (rq->responded)
		return MHD_YES;
	rq->responded = true;
	if (rq->too_big)
		return respond_too_big(c);
	return dispatch(l->api, c, url, method, rq);
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls,
			 enum MHD_RequestTerminationCode toe)
{
	struct request *rq = *con_cls;
	(void)cls;
	(void)c;
	(void)toe;
	if (rq) {
		free(rq->body);
		free(rq);
		*con_cls = NULL;
	}
}

/* MHD's own complaints (a client that vanished mid-write, ...) are about one connection,
 * never the agent: debug level. */
static void on_mhd_log(void *cls, const char *fmt, va_list ap)
    __attribute__((format(printf, 2, 0)));
static void on_mhd_log(void *cls, const char *fmt, va_list ap)
{
	struct api *api = cls;
	char line[512];
	vsnprintf(line, sizeof(line), fmt, ap);
	size_t n = strlen(line);
	while (n && line[n - 1] == '\n')
		line[--n] = '\0';
	agent_log(api->agent, LOG_DEBUG, "api: %s", line);
}

/* ---------------- listeners ---------------- */

static int fail(char *err, size_t errlen, int e, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int fail(char *err, size_t errlen, int e, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	if (errlen)
		vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
	return e;
}

/* mkdir -p for the socket's directory (/run/ferry under systemd's RuntimeDirectory is
 * already there; by hand it often is not). */
static int make_parent_dirs(const char *path, char *err, size_t errlen)
{
	char dir[FERRY_CONFIG_SOCKET_MAX];
	snprintf(dir, sizeof(dir), "%s", path);
	char *slash = strrchr(dir, '/');
	if (!slash || slash == dir)
		return 0;
	*slash = '\0';
	for (char *p = dir + 1;; p++) {
		if (*p != '/' && *p != '\0')
			continue;
		char saved = *p;
		*p = '\0';
		if (mkdir(dir, 0755) < 0 && errno != EEXIST)
			return fail(err, errlen, -errno, "control.socket: cannot create %s: %s",
				    dir, strerror(errno));
		*p = saved;
		if (!saved)
			return 0;
	}
}

static int bind_unix(struct api *api, const char *path, int *ret_fd, char *err, size_t errlen)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	if (strlen(path) >= sizeof(sa.sun_path))
		return fail(err, errlen, -ENAMETOOLONG, "control.socket: %s is too long", path);
	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
	int r = make_parent_dirs(path, err, errlen);
	if (r < 0)
		return r;
	struct stat st;
	if (lstat(path, &st) == 0) {
		if (!S_ISSOCK(st.st_mode))
			return fail(err, errlen, -EEXIST,
				    "control.socket: %s exists and is not a socket", path);
		/* A socket file left by a ferryd that died: remove it, unless someone still
		 * answers on it (a second ferryd must not steal the first one's socket). */
		int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (probe < 0)
			return fail(err, errlen, -errno, "socket: %s", strerror(errno));
		bool alive = connect(probe, (struct sockaddr *)&sa, sizeof(sa)) == 0;
		close(probe);
		if (alive)
			return fail(err, errlen, -EADDRINUSE,
				    "control.socket: another process is serving %s", path);
		if (unlink(path) < 0 && errno != ENOENT)
			return fail(err, errlen, -errno,
				    "control.socket: cannot remove stale %s: %s", path,
				    strerror(errno));
	}
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0)
		return fail(err, errlen, -errno, "socket: %s", strerror(errno));
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		r = fail(err, errlen, -errno, "control.socket: cannot bind %s: %s", path,
			 strerror(errno));
		close(fd);
		return r;
	}
	/* Owner and group only: whoever reaches this socket controls every VM here. */
	if (chmod(path, 0660) < 0 || listen(fd, 128) < 0 || lstat(path, &st) < 0) {
		r = fail(err, errlen, -errno, "control.socket %s: %s", path, strerror(errno));
		close(fd);
		unlink(path);
		return r;
	}
	snprintf(api->socket_path, sizeof(api->socket_path), "%s", path);
	api->socket_dev = st.st_dev;
	api->socket_ino = st.st_ino;
	api->socket_created = true;
	*ret_fd = fd;
	return 0;
}

static int bind_tcp(struct api *api, const struct ferry_hostport *hp, int *ret_fd, char *err,
		    size_t errlen)
{
	struct addrinfo hints = {.ai_family = AF_UNSPEC,
				 .ai_socktype = SOCK_STREAM,
				 .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
	struct addrinfo *res = NULL;
	char port[8];
	snprintf(port, sizeof(port), "%u", hp->port);
	int r = getaddrinfo(hp->host, port, &hints, &res);
	if (r != 0)
		return fail(err, errlen, -EINVAL, "control.tcp %s:%u: %s", hp->host, hp->port,
			    gai_strerror(r));
	int fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	int one = 1;
	if (fd >= 0)
		setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (fd < 0 || bind(fd, res->ai_addr, res->ai_addrlen) < 0 || listen(fd, 128) < 0) {
		int e = errno;
		if (fd >= 0)
			close(fd);
		freeaddrinfo(res);
		return fail(err, errlen, -e, "control.tcp: cannot listen on %s:%u: %s", hp->host,
			    hp->port, strerror(e));
	}
	freeaddrinfo(res);
	agent_format_bound(fd, api->tcp_addr, sizeof(api->tcp_addr));
	*ret_fd = fd;
	return 0;
}

/* Reads a whole PEM file (small; refuses anything past 1 MiB). */
static int read_pem(const char *key, const char *path, char **ret, char *err, size_t errlen)
{
	FILE *f = fopen(path, "re");
	if (!f)
		return fail(err, errlen, -errno, "%s: cannot open %s: %s", key, path,
			    strerror(errno));
	size_t cap = 1u << 20, n;
	char *buf = malloc(cap + 1);
	if (!buf) {
		fclose(f);
		return fail(err, errlen, -ENOMEM, "out of memory");
	}
	n = fread(buf, 1, cap + 1, f);
	bool bad_read = ferror(f) != 0;
	fclose(f);
	if (bad_read || n > cap || n == 0) {
		free(buf);
		return fail(err, errlen, -EINVAL, "%s: %s is %s", key, path,
			    bad_read ? "unreadable"
			    : n	     ? "too large"
				     : "empty");
	}
	buf[n] = '\0';
	*ret = buf;
	return 0;
}

static int start_daemon(struct api *api, struct listener *l, int fd, char *err, size_t errlen)
{
	/* One thread per connection so a blocking events feed or dump never stalls others;
	 * poll() rather than select() because a busy agent holds far more than FD_SETSIZE
	 * descriptors (guest memfds, vCPU fds, migration sockets). */
	unsigned flags = MHD_USE_THREAD_PER_CONNECTION | MHD_USE_POLL_INTERNAL_THREAD |
			 MHD_USE_ITC /* for MHD_quiesce_daemon */ | MHD_USE_ERROR_LOG;
	l->api = api;
	if (l->tls) {
		flags |= MHD_USE_TLS;
		l->daemon = MHD_start_daemon(
		    flags, 0, NULL, NULL, on_request, l, MHD_OPTION_LISTEN_SOCKET, fd,
		    MHD_OPTION_NOTIFY_COMPLETED, on_completed, NULL, MHD_OPTION_CONNECTION_LIMIT,
		    (unsigned)FERRY_API_CONNECTIONS_MAX, MHD_OPTION_CONNECTION_TIMEOUT,
		    (unsigned)FERRY_API_IDLE_TIMEOUT_S, MHD_OPTION_EXTERNAL_LOGGER, on_mhd_log, api,
		    MHD_OPTION_HTTPS_MEM_KEY, api->tls_key, MHD_OPTION_HTTPS_MEM_CERT,
		    api->tls_cert, MHD_OPTION_HTTPS_MEM_TRUST, api->tls_ca, MHD_OPTION_END);
	} else {
		l->daemon = MHD_start_daemon(
		    flags, 0, NULL, NULL, on_request, l, MHD_OPTION_LISTEN_SOCKET, fd,
		    MHD_OPTION_NOTIFY_COMPLETED, on_completed, NULL, MHD_OPTION_CONNECTION_LIMIT,
		    (unsigned)FERRY_API_CONNECTIONS_MAX, MHD_OPTION_CONNECTION_TIMEOUT,
		    (unsigned)FERRY_API_IDLE_TIMEOUT_S, MHD_OPTION_EXTERNAL_LOGGER, on_mhd_log, api,
		    MHD_OPTION_END);
	}
	if (!l->daemon) {
		close(fd);
		return fail(err, errlen, -EIO, "cannot start the %s API server%s",
			    l->tls ? "TLS" : "unix socket",
			    l->tls ? " (check tls.cert, tls.key and tls.ca)" : "");
	}
	return 0;
}

int api_new(struct agent *a, struct api **ret, char *err, size_t errlen)
{
	const struct ferry_config *cfg = agent_config(a);
	struct api *api = calloc(1, sizeof(*api));
	int fd = -1, r;
	if (!api)
		return fail(err, errlen, -ENOMEM, "out of memory");
	api->agent = a;
	atomic_init(&api->stopping, false);
	atomic_init(&api->feeds, 0);
	if (cfg->control.socket[0]) {
		r = bind_unix(api, cfg->control.socket, &fd, err, errlen);
		if (r < 0)
			goto fail;
		r = start_daemon(api, &api->unix_l, fd, err, errlen);
		if (r < 0)
			goto fail;
	}
	if (cfg->control.tcp.host[0]) {
		if (!MHD_is_feature_supported(MHD_FEATURE_TLS)) {
			r = fail(err, errlen, -EOPNOTSUPP,
				 "control.tcp: this libmicrohttpd has no TLS support");
			goto fail;
		}
		r = read_pem("tls.cert", cfg->tls.cert, &api->tls_cert, err, errlen);
		if (r == 0)
			r = read_pem("tls.key", cfg->tls.key, &api->tls_key, err, errlen);
		if (r == 0)
			r = read_pem("tls.ca", cfg->tls.ca, &api->tls_ca, err, errlen);
		if (r < 0)
			goto fail;
		r = bind_tcp(api, &cfg->control.tcp, &fd, err, errlen);
		if (r < 0)
			goto fail;
		api->tcp_l.tls = true;
		r = start_daemon(api, &api->tcp_l, fd, err, errlen);
		if (r < 0)
			goto fail;
	}
	*ret = api;
	return 0;
fail:
	api_free(api);
	return r;
}

const char *api_tcp_address(const struct api *api) { return api->tcp_addr; }

void api_stop(struct api *api)
{
	if (!api || api->stopped)
		return;
	api->stopped = true;
	/* No new connections; then let the feeds end on their own (they notice `stopping`
	 * within a second) so each sends its last chunk; then MHD_stop_daemon shuts the
	 * remaining (idle or busy) connections down and joins their threads. */
	struct listener *ls[] = {&api->unix_l, &api->tcp_l};
	for (unsigned i = 0; i < 2; i++) {
		if (!ls[i]->daemon)
			continue;
		MHD_socket fd = MHD_quiesce_daemon(ls[i]->daemon);
		if (fd != MHD_INVALID_SOCKET)
			close(fd);
	}
	atomic_store(&api->stopping, true);
	for (int waited_ms = 0; atomic_load(&api->feeds) && waited_ms < 3000; waited_ms += 10)
		usleep(10 * 1000);
	if (api->unix_l.daemon)
		MHD_stop_daemon(api->unix_l.daemon);
	if (api->tcp_l.daemon)
		MHD_stop_daemon(api->tcp_l.daemon);
	api->unix_l.daemon = api->tcp_l.daemon = NULL;
	struct stat st;
	if (api->socket_created && lstat(api->socket_path, &st) == 0 &&
	    st.st_dev == api->socket_dev && st.st_ino == api->socket_ino)
		unlink(api->socket_path);
	api->socket_created = false;
}

void api_free(struct api *api)
{
	if (!api)
		return;
	api_stop(api);
	free(api->tls_cert);
	if (api->tls_key) /* private key material: do not leave it in freed heap */
		explicit_bzero(api->tls_key, strlen(api->tls_key));
	free(api->tls_key);
	free(api->tls_ca);
	free(api);
}
