// SPDX-License-Identifier: Apache-2.0
/*
 * ferryctl: the operator's command line for one ferryd, over its control API (docs/api.md)
 * on the unix socket (--socket, $FERRY_SOCKET, /run/ferry/ferryd.sock). It is a thin client:
 * it builds the JSON the API takes, leaves every check of values (sizes, rates, guests) to
 * the agent so there is one set of rules and one set of messages, and prints the answer as a
 * table or, with --json, as the API's JSON. `ferryctl migrate --wait` follows a migration
 * with a live progress line on a terminal and plain lines elsewhere (logs, CI).
 * Exit status: 0 success, 1 the agent refused or could not be reached (its message is
 * printed), 2 usage error.
 */
#include <curl/curl.h>
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_SOCKET "/run/ferry/ferryd.sock"
#define PARAMS_MAX 32
#define EXIT_FAIL 1
#define EXIT_USAGE 2

/* ---------------- HTTP over the unix socket ---------------- */

struct ctl {
	CURL *curl;
	const char *socket;
	bool json; /* --json: print the API's JSON */
};

struct reply {
	long status;
	char *body;
	size_t len;
	char console_offset[32]; /* X-Console-Offset */
};

static size_t on_body(char *p, size_t size, size_t n, void *arg)
{
	struct reply *r = arg;
	size_t add = size * n;
	char *b = realloc(r->body, r->len + add + 1);
	if (!b)
		return 0; /* makes curl fail the transfer */
	memcpy(b + r->len, p, add);
	r->body = b;
	r->len += add;
	b[r->len] = '\0';
	return add;
}

static size_t on_header(char *p, size_t size, size_t n, void *arg)
{
	struct reply *r = arg;
	size_t len = size * n;
	static const char name[] = "x-console-offset:";
	if (len > sizeof(name) - 1 && strncasecmp(p, name, sizeof(name) - 1) == 0) {
		size_t i = sizeof(name) - 1, o = 0;
		while (i < len && p[i] == ' ')
			i++;
		while (i < len && p[i] >= '0' && p[i] <= '9' && o + 1 < sizeof(r->console_offset))
			r->console_offset[o++] = p[i++];
		r->console_offset[o] = '\0';
	}
	return len;
}

static void reply_free(struct reply *r)
{
	free(r->body);
	memset(r, 0, sizeof(*r));
}

/* Sets up one request on the shared handle (the connection is kept between requests). */
static void prepare(struct ctl *ctl, const char *method, const char *path, const char *body,
		    struct curl_slist **hdrs, char *errbuf)
{
	char url[1024];
	snprintf(url, sizeof(url), "http://localhost%s", path);
	curl_easy_reset(ctl->curl);
	curl_easy_setopt(ctl->curl, CURLOPT_UNIX_SOCKET_PATH, ctl->socket);
	curl_easy_setopt(ctl->curl, CURLOPT_URL, url);
	curl_easy_setopt(ctl->curl, CURLOPT_ERRORBUFFER, errbuf);
	curl_easy_setopt(ctl->curl, CURLOPT_CONNECTTIMEOUT, 10L);
	curl_easy_setopt(ctl->curl, CURLOPT_NOSIGNAL, 1L);
	if (strcmp(method, "POST") == 0) {
		curl_easy_setopt(ctl->curl, CURLOPT_POST, 1L);
		curl_easy_setopt(ctl->curl, CURLOPT_POSTFIELDS, body ? body : "");
		*hdrs = curl_slist_append(*hdrs, "Content-Type: application/json");
		/* The API answers at once; curl's 1 s wait for "100 Continue" only slows us. */
		*hdrs = curl_slist_append(*hdrs, "Expect:");
		curl_easy_setopt(ctl->curl, CURLOPT_HTTPHEADER, *hdrs);
	} else if (strcmp(method, "GET") != 0) {
		curl_easy_setopt(ctl->curl, CURLOPT_CUSTOMREQUEST, method);
	}
}

static void unreachable(const struct ctl *ctl, CURLcode rc, const char *errbuf)
{
	fprintf(stderr, "ferryctl: cannot talk to ferryd at %s: %s\n", ctl->socket,
		errbuf[0] ? errbuf : curl_easy_strerror(rc));
	if (rc == CURLE_COULDNT_CONNECT)
		fprintf(stderr, "ferryctl: is ferryd running? Point at its socket with --socket "
				"PATH or FERRY_SOCKET.\n");
}

/* One request; 0 when an HTTP answer came back (whatever its status), else EXIT_FAIL. */
static int http(struct ctl *ctl, const char *method, const char *path, const char *body,
		struct reply *r)
{
	char errbuf[CURL_ERROR_SIZE] = "";
	struct curl_slist *hdrs = NULL;
	memset(r, 0, sizeof(*r));
	prepare(ctl, method, path, body, &hdrs, errbuf);
	curl_easy_setopt(ctl->curl, CURLOPT_WRITEFUNCTION, on_body);
	curl_easy_setopt(ctl->curl, CURLOPT_WRITEDATA, r);
	curl_easy_setopt(ctl->curl, CURLOPT_HEADERFUNCTION, on_header);
	curl_easy_setopt(ctl->curl, CURLOPT_HEADERDATA, r);
	CURLcode rc = curl_easy_perform(ctl->curl);
	curl_slist_free_all(hdrs);
	if (rc != CURLE_OK) {
		unreachable(ctl, rc, errbuf);
		reply_free(r);
		return EXIT_FAIL;
	}
	curl_easy_getinfo(ctl->curl, CURLINFO_RESPONSE_CODE, &r->status);
	return 0;
}

/* Prints the API's error message for a non-2xx reply. */
static int api_error(const struct reply *r)
{
	json_t *j = r->body ? json_loads(r->body, 0, NULL) : NULL;
	const char *msg =
	    json_string_value(json_object_get(json_object_get(j, "error"), "message"));
	if (msg)
		fprintf(stderr, "ferryctl: %s\n", msg);
	else
		fprintf(stderr, "ferryctl: ferryd answered HTTP %ld%s%.200s\n", r->status,
			r->len ? ": " : "", r->len ? r->body : "");
	json_decref(j);
	return EXIT_FAIL;
}

/* A JSON request whose answer is a JSON document; *ret is NULL for 204. */
static int call(struct ctl *ctl, const char *method, const char *path, json_t *body, json_t **ret)
{
	char *text = body ? json_dumps(body, JSON_COMPACT) : NULL;
	struct reply r;
	int e = http(ctl, method, path, text, &r);
	free(text);
	if (e)
		return e;
	if (r.status < 200 || r.status >= 300) {
		e = api_error(&r);
		reply_free(&r);
		return e;
	}
	json_t *j = NULL;
	if (r.len) {
		json_error_t jerr;
		j = json_loads(r.body, 0, &jerr);
		if (!j) {
			fprintf(stderr, "ferryctl: ferryd sent malformed JSON: %s\n", jerr.text);
			reply_free(&r);
			return EXIT_FAIL;
		}
	}
	reply_free(&r);
	*ret = j;
	return 0;
}

/* ---------------- formatting ---------------- */

static void print_json(const json_t *j)
{
	char *s = json_dumps(j, JSON_INDENT(2) | JSON_REAL_PRECISION(15));
	if (s)
		puts(s);
	free(s);
}

static const char *str(const json_t *o, const char *k)
{
	const char *s = json_string_value(json_object_get(o, k));
	return s ? s : "";
}

static uint64_t num(const json_t *o, const char *k)
{
	json_t *v = json_object_get(o, k);
	double d = json_number_value(v);
	return d > 0 ? (uint64_t)d : 0;
}

/* A migration's downtime in milliseconds: downtime_us where the agent gives it. */
static double downtime(const json_t *m)
{
	if (json_is_number(json_object_get(m, "downtime_us")))
		return (double)num(m, "downtime_us") / 1000.0;
	return (double)num(m, "downtime_ms");
}

static double real(const json_t *o, const char *k)
{
	return json_number_value(json_object_get(o, k));
}

/* 268435456 -> "256M", 1610612736 -> "1.5G": what an operator types for --memory. */
static const char *size_text(uint64_t b, char *buf, size_t len)
{
	static const char units[] = "KMGTP";
	double v = (double)b;
	int u = -1;
	while (v >= 1024 && u < 4) {
		v /= 1024;
		u++;
	}
	if (u < 0)
		snprintf(buf, len, "%lluB", (unsigned long long)b);
	else if (v == floor(v))
		snprintf(buf, len, "%.0f%c", v, units[u]);
	else
		snprintf(buf, len, "%.1f%c", v, units[u]);
	return buf;
}

static const char *time_text(int64_t unix_s, char *buf, size_t len)
{
	if (unix_s <= 0)
		return "-";
	time_t t = (time_t)unix_s;
	struct tm tm;
	localtime_r(&t, &tm);
	strftime(buf, len, "%Y-%m-%d %H:%M:%S %Z", &tm);
	return buf;
}

/* A table: rows of cells, column widths from the widest cell. */
#define TABLE_COLS 10
struct table {
	unsigned cols, rows, cap;
	char **cells; /* rows * cols */
};

static void table_add(struct table *t, ...)
{
	if (t->rows == t->cap) {
		unsigned cap = t->cap ? t->cap * 2 : 16;
		char **c = realloc(t->cells, sizeof(*c) * cap * t->cols);
		if (!c)
			return;
		t->cells = c;
		t->cap = cap;
	}
	va_list ap;
	va_start(ap, t);
	for (unsigned i = 0; i < t->cols; i++) {
		const char *s = va_arg(ap, const char *);
		t->cells[t->rows * t->cols + i] = strdup(s ? s : "");
	}
	va_end(ap);
	t->rows++;
}

static void table_print(struct table *t)
{
	size_t w[TABLE_COLS] = {0};
	for (unsigned r = 0; r < t->rows; r++)
		for (unsigned c = 0; c < t->cols; c++) {
			const char *s = t->cells[r * t->cols + c];
			size_t n = s ? strlen(s) : 0;
			if (n > w[c])
				w[c] = n;
		}
	for (unsigned r = 0; r < t->rows; r++) {
		for (unsigned c = 0; c < t->cols; c++) {
			const char *s = t->cells[r * t->cols + c];
			if (c + 1 == t->cols)
				printf("%s\n", s ? s : "");
			else
				printf("%-*s  ", (int)w[c], s ? s : "");
		}
	}
	for (unsigned i = 0; i < t->rows * t->cols; i++)
		free(t->cells[i]);
	free(t->cells);
}

/* ---------------- health ---------------- */

static int cmd_health(struct ctl *ctl)
{
	json_t *j = NULL;
	int e = call(ctl, "GET", "/v1/health", NULL, &j);
	if (e)
		return e;
	if (ctl->json)
		print_json(j);
	else
		printf("ferryd %s: %s, %llu VMs, %llu migrations active, migration listener %s\n",
		       str(j, "name"), str(j, "status"), (unsigned long long)num(j, "vms"),
		       (unsigned long long)num(j, "migrations_active"), str(j, "listen"));
	json_decref(j);
	return 0;
}

/* ---------------- VMs ---------------- */

struct opts {
	const char *memory, *guest, *tracker, *slot_size;
	long vcpus;
	const char *params[PARAMS_MAX];
	unsigned nr_params;
	bool hugepages, paused, follow;
	const char *to, *bandwidth, *transport, *compress;
	long downtime, streams;
	int verify; /* -1 unset */
	bool wait;
	const char *since, *offset;
	int postcopy; /* -1 unset */
	long postcopy_after; /* -2 unset, -1 off */
	const char *timeout_action;
	long completion_timeout, progress_timeout, priority; /* -1 unset */
};

static void print_vm(const json_t *vm)
{
	char b1[32], b2[64];
	printf("name:       %s\n", str(vm, "name"));
	printf("state:      %s\n", str(vm, "state"));
	if (json_is_string(json_object_get(vm, "failure")))
		printf("failure:    %s\n", str(vm, "failure"));
	printf("guest:      %s\n", str(vm, "guest"));
	printf("memory:     %s (%llu bytes)\n", size_text(num(vm, "memory"), b1, sizeof(b1)),
	       (unsigned long long)num(vm, "memory"));
	printf("vcpus:      %llu\n", (unsigned long long)num(vm, "vcpus"));
	printf("tracker:    %s\n", str(vm, "tracker"));
	printf("created:    %s\n", time_text((int64_t)num(vm, "created"), b2, sizeof(b2)));
	json_t *mig = json_object_get(vm, "migration");
	if (json_is_integer(mig))
		printf("migration:  %lld\n", (long long)json_integer_value(mig));
	else
		printf("migration:  -\n");
	printf("params:    ");
	const char *k;
	json_t *v;
	bool any = false;
	json_object_foreach ((json_t *)json_object_get(vm, "params"), k, v) {
		printf(" %s=%s", k, json_string_value(v) ? json_string_value(v) : "?");
		any = true;
	}
	printf("%s\n", any ? "" : " -");
	json_t *s = json_object_get(vm, "stats");
	printf("stats:      passes %llu, pages %llu, exits %llu, ring-full exits %llu, guest "
	       "errors %llu\n",
	       (unsigned long long)num(s, "passes"), (unsigned long long)num(s, "pages"),
	       (unsigned long long)num(s, "exits"), (unsigned long long)num(s, "ring_full_exits"),
	       (unsigned long long)num(s, "guest_errors"));
	size_t i;
	json_t *ge;
	json_array_foreach (json_object_get(vm, "guest_errors"), i, ge) {
		if (i == 0)
			printf("guest errors:\n");
		printf("  vcpu %llu %s at %s: expected %s, found %s\n",
		       (unsigned long long)num(ge, "vcpu"), str(ge, "kind"), str(ge, "gpa"),
		       str(ge, "expected"), str(ge, "found"));
	}
}

/* Turns a relative image or dump path into an absolute one: the agent opens it, from its
 * own working directory. */
static char *absolute(const char *path)
{
	char *out = NULL;
	if (path[0] == '/')
		return strdup(path);
	char cwd[PATH_MAX];
	if (!getcwd(cwd, sizeof(cwd)))
		return NULL;
	if (asprintf(&out, "%s/%s", cwd, path) < 0)
		return NULL;
	return out;
}

static int cmd_vm_create(struct ctl *ctl, const char *name, const struct opts *o)
{
	char *guest = NULL;
	if (strncmp(o->guest, "boot:", 5) == 0 || strncmp(o->guest, "flat:", 5) == 0) {
		char *file = absolute(o->guest + 5);
		if (!file || asprintf(&guest, "%.5s%s", o->guest, file) < 0)
			guest = NULL;
		free(file);
	} else {
		guest = strdup(o->guest);
	}
	json_t *body = json_object();
	json_object_set_new(body, "name", json_string(name));
	json_object_set_new(body, "memory", json_string(o->memory));
	json_object_set_new(body, "vcpus", json_integer(o->vcpus));
	json_object_set_new(body, "guest", json_string(guest ? guest : o->guest));
	free(guest);
	if (o->nr_params) {
		json_t *p = json_array();
		for (unsigned i = 0; i < o->nr_params; i++)
			json_array_append_new(p, json_string(o->params[i]));
		json_object_set_new(body, "params", p);
	}
	if (o->tracker)
		json_object_set_new(body, "tracker", json_string(o->tracker));
	if (o->slot_size)
		json_object_set_new(body, "slot_size", json_string(o->slot_size));
	if (o->hugepages)
		json_object_set_new(body, "hugepages", json_true());
	if (o->paused)
		json_object_set_new(body, "paused", json_true());
	json_t *vm = NULL;
	int e = call(ctl, "POST", "/v1/vms", body, &vm);
	json_decref(body);
	if (e)
		return e;
	char b[32];
	if (ctl->json)
		print_json(vm);
	else
		printf("%s: %s (%s, %s, %llu vCPU%s, tracker %s)\n", str(vm, "name"),
		       str(vm, "state"), str(vm, "guest"),
		       size_text(num(vm, "memory"), b, sizeof(b)),
		       (unsigned long long)num(vm, "vcpus"), num(vm, "vcpus") == 1 ? "" : "s",
		       str(vm, "tracker"));
	json_decref(vm);
	return 0;
}

static int cmd_vm_list(struct ctl *ctl)
{
	json_t *j = NULL;
	int e = call(ctl, "GET", "/v1/vms", NULL, &j);
	if (e)
		return e;
	if (ctl->json) {
		print_json(j);
		json_decref(j);
		return 0;
	}
	struct table t = {.cols = 8};
	table_add(&t, "NAME", "STATE", "GUEST", "MEMORY", "VCPUS", "TRACKER", "MIGRATION",
		  "ERRORS");
	size_t i;
	json_t *vm;
	json_array_foreach (json_object_get(j, "vms"), i, vm) {
		char mem[32], cpus[16], mig[24], errs[24];
		json_t *m = json_object_get(vm, "migration");
		snprintf(cpus, sizeof(cpus), "%llu", (unsigned long long)num(vm, "vcpus"));
		if (json_is_integer(m))
			snprintf(mig, sizeof(mig), "%lld", (long long)json_integer_value(m));
		else
			snprintf(mig, sizeof(mig), "-");
		snprintf(errs, sizeof(errs), "%llu",
			 (unsigned long long)num(json_object_get(vm, "stats"), "guest_errors"));
		table_add(&t, str(vm, "name"), str(vm, "state"), str(vm, "guest"),
			  size_text(num(vm, "memory"), mem, sizeof(mem)), cpus, str(vm, "tracker"),
			  mig, errs);
	}
	table_print(&t);
	json_decref(j);
	return 0;
}

static int vm_path(char *buf, size_t len, const char *name, const char *suffix)
{
	/* Names the API accepts are [A-Za-z0-9_.-]; anything else would be a URL problem,
	 * and the agent answers 404 for it anyway. */
	for (const char *p = name; *p; p++)
		if (*p == '/' || *p == '?' || *p == '#' || *p == '%' || *p <= ' ') {
			fprintf(stderr, "ferryctl: '%s' is not a valid VM name\n", name);
			return EXIT_FAIL;
		}
	snprintf(buf, len, "/v1/vms/%s%s", name, suffix);
	return 0;
}

/* GET one resource and print it: JSON as is, or through the human printer. */
static int show(struct ctl *ctl, const char *path, void (*print)(const json_t *))
{
	json_t *o = NULL;
	int e = call(ctl, "GET", path, NULL, &o);
	if (e)
		return e;
	if (ctl->json)
		print_json(o);
	else
		print(o);
	json_decref(o);
	return 0;
}

static int cmd_vm_show(struct ctl *ctl, const char *name)
{
	char path[256];
	int e = vm_path(path, sizeof(path), name, "");
	return e ? e : show(ctl, path, print_vm);
}

static int cmd_vm_action(struct ctl *ctl, const char *name, const char *action)
{
	char path[256];
	json_t *vm = NULL;
	bool del = strcmp(action, "delete") == 0;
	int e = vm_path(path, sizeof(path), name, del ? "" : action);
	if (!e)
		e = call(ctl, del ? "DELETE" : "POST", path, NULL, &vm);
	if (e)
		return e;
	if (ctl->json && !vm)
		vm = json_pack("{s:s,s:b}", "name", name, "deleted", 1);
	if (ctl->json)
		print_json(vm);
	else if (del)
		printf("%s: deleted\n", name);
	else
		printf("%s: %s\n", name, str(vm, "state"));
	json_decref(vm);
	return 0;
}

static int cmd_vm_dump(struct ctl *ctl, const char *name, const char *file)
{
	char path[256];
	char *abs = absolute(file);
	if (!abs) {
		fprintf(stderr, "ferryctl: cannot make %s absolute: %s\n", file, strerror(errno));
		return EXIT_FAIL;
	}
	json_t *out = NULL;
	int e = vm_path(path, sizeof(path), name, "/dump");
	if (!e) {
		json_t *body = json_pack("{s:s}", "path", abs);
		e = call(ctl, "POST", path, body, &out);
		json_decref(body);
	}
	free(abs);
	if (e)
		return e;
	if (ctl->json)
		print_json(out);
	else
		printf("%s: wrote %llu bytes of guest memory to %s\n", name,
		       (unsigned long long)num(out, "bytes"), str(out, "path"));
	json_decref(out);
	return 0;
}

/* Console bytes as a JSON string; a guest may print anything, so bytes that are not UTF-8
 * are taken as Latin-1 rather than dropping the whole chunk. */
static json_t *console_text(const char *b, size_t len)
{
	json_t *j = json_stringn(b ? b : "", len);
	if (j)
		return j;
	char *u = malloc(2 * len + 1);
	size_t o = 0;
	if (!u)
		return json_null();
	for (size_t i = 0; i < len; i++) {
		unsigned char ch = (unsigned char)b[i];
		if (ch >= 0x80) {
			u[o++] = (char)(0xc0 | (ch >> 6));
			u[o++] = (char)(0x80 | (ch & 0x3f));
		} else {
			u[o++] = (char)ch;
		}
	}
	j = json_stringn(u, o);
	free(u);
	return j ? j : json_null();
}

static int cmd_vm_console(struct ctl *ctl, const char *name, const struct opts *o)
{
	char base[256], path[320];
	int e = vm_path(base, sizeof(base), name, "/console");
	if (e)
		return e;
	char offset[32];
	snprintf(offset, sizeof(offset), "%s", o->offset ? o->offset : "0");
	for (;;) {
		struct reply r;
		snprintf(path, sizeof(path), "%s?offset=%s", base, offset);
		e = http(ctl, "GET", path, NULL, &r);
		if (e)
			return e;
		if (r.status != 200) {
			e = api_error(&r);
			reply_free(&r);
			return e;
		}
		if (ctl->json) {
			json_t *j = json_object();
			json_object_set_new(j, "offset", json_integer(strtoll(offset, NULL, 10)));
			json_object_set_new(j, "next_offset",
					    json_integer(strtoll(r.console_offset, NULL, 10)));
			json_object_set_new(j, "data", console_text(r.body, r.len));
			if (o->follow) {
				char *line = json_dumps(j, JSON_COMPACT);
				if (line)
					puts(line);
				free(line);
			} else {
				print_json(j);
			}
			json_decref(j);
		} else if (r.len) {
			fwrite(r.body, 1, r.len, stdout);
		}
		fflush(stdout);
		if (r.console_offset[0])
			snprintf(offset, sizeof(offset), "%s", r.console_offset);
		reply_free(&r);
		if (!o->follow)
			return 0;
		usleep(250 * 1000);
	}
}

/* ---------------- migrations ---------------- */

static bool final_state(const char *s)
{
	return !strcmp(s, "completed") || !strcmp(s, "cancelled") || !strcmp(s, "failed");
}

static void print_migration(const json_t *m)
{
	char b1[32], b2[32], t1[64], t2[64];
	printf("id:                %llu\n", (unsigned long long)num(m, "id"));
	printf("vm:                %s\n", str(m, "vm"));
	printf("direction:         %s\n", str(m, "direction"));
	printf("peer:              %s\n", str(m, "peer")[0] ? str(m, "peer") : "-");
	printf("state:             %s\n", str(m, "state"));
	if (json_is_string(json_object_get(m, "error")))
		printf("error:             %s\n", str(m, "error"));
	printf("transport:         %s%s%s%s\n", str(m, "transport")[0] ? str(m, "transport") : "-",
	       str(m, "transport_reason")[0] ? " (" : "", str(m, "transport_reason"),
	       str(m, "transport_reason")[0] ? ")" : "");
	printf("compression:       %s%s%s%s\n",
	       str(m, "compression")[0] ? str(m, "compression") : "-",
	       str(m, "compression_reason")[0] ? " (" : "", str(m, "compression_reason"),
	       str(m, "compression_reason")[0] ? ")" : "");
	printf("round:             %llu\n", (unsigned long long)num(m, "round"));
	printf("sent:              %s (%llu pages, %llu zero pages)",
	       size_text(num(m, "bytes_sent"), b1, sizeof(b1)),
	       (unsigned long long)num(m, "pages_normal"),
	       (unsigned long long)num(m, "pages_zero"));
	if (num(m, "bytes_uncompressed") > num(m, "bytes_sent") && num(m, "bytes_sent"))
		printf(", %.2fx smaller than raw %s",
		       (double)num(m, "bytes_uncompressed") / (double)num(m, "bytes_sent"),
		       size_text(num(m, "bytes_uncompressed"), b2, sizeof(b2)));
	printf("\n");
	if (json_is_true(json_object_get(m, "postcopy")) && num(m, "pages_rdma_read"))
		printf("postcopy:          yes (%llu pages pulled by RDMA READ)\n",
		       (unsigned long long)num(m, "pages_rdma_read"));
	else if (json_is_true(json_object_get(m, "postcopy")))
		printf("postcopy:          yes\n");
	printf("remaining:         %s\n", size_text(num(m, "remaining_bytes"), b2, sizeof(b2)));
	printf("dirty rate:        %.0f pages/s\n", real(m, "dirty_rate_pps"));
	printf("bandwidth:         %.1f MB/s\n", real(m, "bandwidth_bps") / 1e6);
	printf("expected downtime: %.1f ms (target %llu ms)\n", real(m, "expected_downtime_ms"),
	       (unsigned long long)num(m, "downtime_target_ms"));
	printf("verify:            %s%s\n",
	       json_is_true(json_object_get(m, "verify")) ? "yes" : "no",
	       json_is_true(json_object_get(m, "verified")) ? " (digests equal)" : "");
	printf("started:           %s\n", time_text((int64_t)num(m, "started"), t1, sizeof(t1)));
	printf("finished:          %s\n", time_text((int64_t)num(m, "finished"), t2, sizeof(t2)));
	if (json_is_number(json_object_get(m, "total_time_ms")))
		printf("total time:        %llu ms (setup %llu ms, downtime %.2f ms)\n",
		       (unsigned long long)num(m, "total_time_ms"),
		       (unsigned long long)num(m, "setup_time_ms"), downtime(m));
	if (json_is_integer(json_object_get(m, "queue_position")))
		printf("queue position:    %llu\n", (unsigned long long)num(m, "queue_position"));
	if (str(m, "decision")[0])
		printf("decision:          %s: %s\n", str(m, "decision"), str(m, "decision_reason"));
	else if (str(m, "decision_reason")[0])
		printf("decision:          %s\n", str(m, "decision_reason"));
	json_t *th = json_object_get(m, "throttle");
	if (th && num(th, "level")) {
		printf("throttle:          level %llu, held per vCPU:",
		       (unsigned long long)num(th, "level"));
		size_t i;
		json_t *p;
		json_array_foreach (json_object_get(th, "vcpu_pct"), i, p)
			printf(" %lld%%", (long long)json_integer_value(p));
		printf("\n");
	}
}

static int migration_path(char *buf, size_t len, const char *id, const char *suffix)
{
	if (!*id || strspn(id, "0123456789") != strlen(id) || strlen(id) > 20) {
		fprintf(stderr, "ferryctl: migration id '%s' is not a number\n", id);
		return EXIT_USAGE;
	}
	snprintf(buf, len, "/v1/migrations/%s%s", id, suffix);
	return 0;
}

static int cmd_migration_list(struct ctl *ctl)
{
	json_t *j = NULL;
	int e = call(ctl, "GET", "/v1/migrations", NULL, &j);
	if (e)
		return e;
	if (ctl->json) {
		print_json(j);
		json_decref(j);
		return 0;
	}
	struct table t = {.cols = 9};
	table_add(&t, "ID", "VM", "DIRECTION", "PEER", "STATE", "ROUND", "SENT", "REMAINING",
		  "DOWNTIME");
	size_t i;
	json_t *m;
	json_array_foreach (json_object_get(j, "migrations"), i, m) {
		char id[24], round[16], sent[32], rem[32], down[32];
		snprintf(id, sizeof(id), "%llu", (unsigned long long)num(m, "id"));
		snprintf(round, sizeof(round), "%llu", (unsigned long long)num(m, "round"));
		if (json_is_number(json_object_get(m, "downtime_ms")))
			snprintf(down, sizeof(down), "%llu ms",
				 (unsigned long long)num(m, "downtime_ms"));
		else
			snprintf(down, sizeof(down), "-");
		table_add(&t, id, str(m, "vm"), str(m, "direction"),
			  str(m, "peer")[0] ? str(m, "peer") : "-", str(m, "state"), round,
			  size_text(num(m, "bytes_sent"), sent, sizeof(sent)),
			  size_text(num(m, "remaining_bytes"), rem, sizeof(rem)), down);
	}
	table_print(&t);
	json_decref(j);
	return 0;
}

/* The scheduler's decisions, one line each (or the JSON with --json). */
static int cmd_migration_history(struct ctl *ctl, const char *id)
{
	char path[64];
	json_t *j = NULL;
	int e = migration_path(path, sizeof(path), id, "/history");
	if (!e)
		e = call(ctl, "GET", path, NULL, &j);
	if (e)
		return e;
	if (ctl->json) {
		print_json(j);
		json_decref(j);
		return 0;
	}
	size_t i;
	json_t *r;
	json_array_foreach (json_object_get(j, "history"), i, r) {
		printf("round %-3llu %s%-10s %s\n", (unsigned long long)num(r, "round"),
		       json_is_true(json_object_get(r, "tick")) ? "(tick) " : "",
		       str(r, "action"), str(r, "why"));
	}
	json_decref(j);
	return 0;
}

/* The settings a migration request takes from the command line (migrate and evacuate). */
static void put_migration_settings(json_t *body, const struct opts *o)
{
	if (o->downtime >= 0)
		json_object_set_new(body, "downtime_ms", json_integer(o->downtime));
	if (o->bandwidth)
		json_object_set_new(body, "bandwidth", json_string(o->bandwidth));
	if (o->streams >= 0)
		json_object_set_new(body, "streams", json_integer(o->streams));
	if (o->verify >= 0)
		json_object_set_new(body, "verify", json_boolean(o->verify));
	if (o->transport)
		json_object_set_new(body, "transport", json_string(o->transport));
	if (o->compress)
		json_object_set_new(body, "compress", json_string(o->compress));
	if (o->postcopy >= 0)
		json_object_set_new(body, "allow_postcopy", json_boolean(o->postcopy));
	if (o->postcopy_after >= -1)
		json_object_set_new(body, "postcopy_after_rounds", json_integer(o->postcopy_after));
	if (o->timeout_action)
		json_object_set_new(body, "timeout_action", json_string(o->timeout_action));
	if (o->completion_timeout >= 0)
		json_object_set_new(body, "completion_timeout_per_gib",
				    json_integer(o->completion_timeout));
	if (o->progress_timeout >= 0)
		json_object_set_new(body, "progress_timeout", json_integer(o->progress_timeout));
	if (o->priority >= 0)
		json_object_set_new(body, "priority", json_integer(o->priority));
}

/* Starts the evacuation; with --wait follows every migration to its end. */
static int cmd_evacuate(struct ctl *ctl, const struct opts *o)
{
	json_t *to = json_array();
	char *list = strdup(o->to), *save = NULL;
	for (char *t = strtok_r(list, ",", &save); t; t = strtok_r(NULL, ",", &save))
		json_array_append_new(to, json_string(t));
	free(list);
	json_t *body = json_pack("{s:o}", "to", to);
	put_migration_settings(body, o);
	json_t *res = NULL;
	int e = call(ctl, "POST", "/v1/evacuate", body, &res);
	json_decref(body);
	if (e)
		return e;
	json_t *items = json_object_get(res, "evacuation");
	size_t i;
	json_t *it;
	int failed = 0;
	if (!o->wait) {
		if (ctl->json) {
			print_json(res);
		} else {
			json_array_foreach (items, i, it) {
				if (json_is_integer(json_object_get(it, "migration")))
					printf("%s -> %s: migration %llu\n", str(it, "vm"), str(it, "to"),
					       (unsigned long long)num(it, "migration"));
				else
					printf("%s -> %s: not started: %s\n", str(it, "vm"),
					       str(it, "to"), str(it, "error"));
			}
			if (json_array_size(items) == 0)
				printf("nothing to evacuate\n");
		}
		json_array_foreach (items, i, it)
			failed |= !json_is_integer(json_object_get(it, "migration"));
		json_decref(res);
		return failed ? EXIT_FAIL : 0;
	}
	/* --wait: poll each migration until all ended; one line per VM as it ends. */
	size_t n = json_array_size(items);
	bool *done = calloc(n ? n : 1, sizeof(bool));
	json_t *finals = json_array();
	for (size_t left = n; left;) {
		json_array_foreach (items, i, it) {
			if (done[i])
				continue;
			json_t *m = NULL;
			char path[64];
			if (!json_is_integer(json_object_get(it, "migration"))) {
				done[i] = true;
				left--;
				failed = 1;
				if (!ctl->json)
					printf("%s -> %s: not started: %s\n", str(it, "vm"),
					       str(it, "to"), str(it, "error"));
				continue;
			}
			snprintf(path, sizeof(path), "/v1/migrations/%llu",
				 (unsigned long long)num(it, "migration"));
			if (call(ctl, "GET", path, NULL, &m) != 0)
				continue;
			if (final_state(str(m, "state"))) {
				done[i] = true;
				left--;
				bool ok = !strcmp(str(m, "state"), "completed");
				failed |= !ok;
				if (!ctl->json)
					printf("%s -> %s: %s in %llu ms (downtime %.1f ms)%s%s\n",
					       str(it, "vm"), str(it, "to"), str(m, "state"),
					       (unsigned long long)num(m, "total_time_ms"),
					       downtime(m),
					       ok ? "" : ": ", ok ? "" : str(m, "error"));
				json_array_append(finals, m);
			}
			json_decref(m);
		}
		if (left)
			usleep(200000);
	}
	if (ctl->json) {
		json_t *out = json_pack("{s:O}", "evacuation", finals);
		print_json(out);
		json_decref(out);
	} else if (!n) {
		printf("nothing to evacuate\n");
	}
	json_decref(finals);
	free(done);
	json_decref(res);
	return failed ? EXIT_FAIL : 0;
}

static int cmd_migration_show(struct ctl *ctl, const char *id)
{
	char path[64];
	int e = migration_path(path, sizeof(path), id, "");
	return e ? e : show(ctl, path, print_migration);
}

static int cmd_migration_action(struct ctl *ctl, const char *id, bool cancel)
{
	char path[64];
	json_t *m = NULL;
	int e = migration_path(path, sizeof(path), id, cancel ? "" : "/switchover");
	if (!e)
		e = call(ctl, cancel ? "DELETE" : "POST", path, NULL, &m);
	if (e)
		return e;
	if (ctl->json)
		print_json(m);
	else
		printf("migration %s: %s requested (state %s)\n", id,
		       cancel ? "cancel" : "switch-over", str(m, "state"));
	json_decref(m);
	return 0;
}

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Share of guest memory no longer waiting to be sent, 0..100. */
static double progress_pct(const json_t *m, uint64_t memory)
{
	const char *s = str(m, "state");
	if (!strcmp(s, "completed"))
		return 100;
	/* Before the first figures arrive "nothing remaining" means "nothing measured". */
	if (!memory || !strcmp(s, "queued") || !strcmp(s, "setup") || !num(m, "bytes_sent"))
		return 0;
	double rem = (double)num(m, "remaining_bytes");
	double p = 100.0 * (1.0 - rem / (double)memory);
	return p < 0 ? 0 : p > 100 ? 100 : p;
}

static void progress(const json_t *m, uint64_t memory, bool tty)
{
	char sent[32], rem[32];
	double pct = progress_pct(m, memory);
	size_text(num(m, "bytes_sent"), sent, sizeof(sent));
	size_text(num(m, "remaining_bytes"), rem, sizeof(rem));
	if (tty) {
		char bar[31];
		int fill = (int)(pct * 30 / 100);
		for (int i = 0; i < 30; i++)
			bar[i] = i < fill ? '#' : '-';
		bar[30] = '\0';
		/* \r + erase-line: redraw in place, whatever the previous line's length. */
		printf("\r\033[K%-10s round %-3llu [%s] %3.0f%%  sent %s, left %s  %.1f MB/s  "
		       "dirty %.0f p/s  est. downtime %.0f ms",
		       str(m, "state"), (unsigned long long)num(m, "round"), bar, pct, sent, rem,
		       real(m, "bandwidth_bps") / 1e6, real(m, "dirty_rate_pps"),
		       real(m, "expected_downtime_ms"));
	} else {
		printf("migration %llu: %s round %llu, %.0f%% of memory sent, sent %s, remaining "
		       "%s, %.1f MB/s, dirty %.0f pages/s, expected downtime %.0f ms\n",
		       (unsigned long long)num(m, "id"), str(m, "state"),
		       (unsigned long long)num(m, "round"), pct, sent, rem,
		       real(m, "bandwidth_bps") / 1e6, real(m, "dirty_rate_pps"),
		       real(m, "expected_downtime_ms"));
	}
	fflush(stdout);
}

static void summary(const json_t *m)
{
	char sent[32];
	const char *s = str(m, "state");
	printf("migration %llu %s: %s -> %s", (unsigned long long)num(m, "id"), s, str(m, "vm"),
	       str(m, "peer"));
	if (json_is_number(json_object_get(m, "total_time_ms")))
		printf(" in %.2f s (setup %llu ms, downtime %.1f ms)",
		       (double)num(m, "total_time_ms") / 1000.0,
		       (unsigned long long)num(m, "setup_time_ms"), downtime(m));
	printf(", %s sent (%llu pages, %llu zero pages) over %s%s\n",
	       size_text(num(m, "bytes_sent"), sent, sizeof(sent)),
	       (unsigned long long)num(m, "pages_normal"), (unsigned long long)num(m, "pages_zero"),
	       str(m, "transport")[0] ? str(m, "transport") : "-",
	       json_is_true(json_object_get(m, "verified")) ? ", memory verified" : "");
	if (json_is_string(json_object_get(m, "error")))
		printf("error: %s\n", str(m, "error"));
}

static int cmd_migrate(struct ctl *ctl, const char *vm, const struct opts *o)
{
	/* Guest RAM size, for the progress percentage; best effort. */
	uint64_t memory = 0;
	char path[256];
	int e = vm_path(path, sizeof(path), vm, "");
	if (e)
		return e;
	if (o->wait && !ctl->json) {
		json_t *info = NULL;
		if (call(ctl, "GET", path, NULL, &info) == 0)
			memory = num(info, "memory");
		else
			return EXIT_FAIL;
		json_decref(info);
	}
	json_t *body = json_pack("{s:s,s:s}", "vm", vm, "to", o->to);
	put_migration_settings(body, o);
	json_t *m = NULL;
	e = call(ctl, "POST", "/v1/migrations", body, &m);
	json_decref(body);
	if (e)
		return e;
	uint64_t id = num(m, "id");
	if (!o->wait) {
		if (ctl->json)
			print_json(m);
		else
			printf(
			    "migration %llu started: %s -> %s (follow it with: ferryctl migration "
			    "show %llu)\n",
			    (unsigned long long)id, vm, o->to, (unsigned long long)id);
		json_decref(m);
		return 0;
	}
	bool tty = isatty(STDOUT_FILENO) && !ctl->json;
	double last_print = 0;
	snprintf(path, sizeof(path), "/v1/migrations/%llu", (unsigned long long)id);
	for (;;) {
		const char *s = str(m, "state");
		if (final_state(s))
			break;
		double t = now_s();
		if (!ctl->json && (tty || t - last_print >= 1.0)) {
			progress(m, memory, tty);
			last_print = t;
		}
		usleep(200 * 1000);
		json_t *next = NULL;
		e = call(ctl, "GET", path, NULL, &next);
		if (e) {
			if (tty)
				putchar('\n');
			fprintf(stderr, "ferryctl: lost track of migration %llu\n",
				(unsigned long long)id);
			json_decref(m);
			return e;
		}
		json_decref(m);
		m = next;
	}
	bool ok = strcmp(str(m, "state"), "completed") == 0;
	if (ctl->json) {
		print_json(m);
	} else {
		if (tty) {
			progress(m, memory, tty);
			putchar('\n');
		}
		summary(m);
	}
	json_decref(m);
	return ok ? 0 : EXIT_FAIL;
}

/* ---------------- events ---------------- */

struct feed {
	bool json;
	char *buf;
	size_t len;
};

static void print_event(const char *line, bool json)
{
	json_t *ev = json_loads(line, 0, NULL);
	const char *type = str(ev, "type");
	if (json) {
		puts(line);
	} else if (ev && strcmp(type, "heartbeat") != 0) {
		char when[32] = "";
		json_t *t = json_object_get(ev, "time_ms");
		if (json_is_integer(t)) {
			time_t s = (time_t)(json_integer_value(t) / 1000);
			struct tm tm;
			localtime_r(&s, &tm);
			size_t n = strftime(when, sizeof(when), "%H:%M:%S", &tm);
			snprintf(when + n, sizeof(when) - n, ".%03lld",
				 (long long)(json_integer_value(t) % 1000));
		}
		printf("%s %s", when, type);
		const char *k;
		json_t *v;
		json_object_foreach (ev, k, v) {
			if (!strcmp(k, "type") || !strcmp(k, "time_ms") || !strcmp(k, "seq"))
				continue;
			char *val = json_is_string(v)
					? strdup(json_string_value(v))
					: json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT);
			printf(" %s=%s", k, val ? val : "?");
			free(val);
		}
		printf(" (seq %lld)\n", (long long)json_integer_value(json_object_get(ev, "seq")));
	}
	fflush(stdout);
	json_decref(ev);
}

static size_t on_feed(char *p, size_t size, size_t n, void *arg)
{
	struct feed *f = arg;
	size_t add = size * n;
	char *b = realloc(f->buf, f->len + add + 1);
	if (!b)
		return 0;
	memcpy(b + f->len, p, add);
	f->buf = b;
	f->len += add;
	b[f->len] = '\0';
	char *start = f->buf, *nl;
	while ((nl = memchr(start, '\n', f->len - (size_t)(start - f->buf)))) {
		*nl = '\0';
		if (*start)
			print_event(start, f->json);
		start = nl + 1;
	}
	f->len -= (size_t)(start - f->buf);
	memmove(f->buf, start, f->len);
	return add;
}

static int cmd_events(struct ctl *ctl, const struct opts *o)
{
	char path[96], errbuf[CURL_ERROR_SIZE] = "";
	struct curl_slist *hdrs = NULL;
	struct feed f = {.json = ctl->json};
	if (o->since && (strspn(o->since, "0123456789") != strlen(o->since) || !*o->since)) {
		fprintf(stderr, "ferryctl: --since takes an event sequence number\n");
		return EXIT_USAGE;
	}
	snprintf(path, sizeof(path), "/v1/events%s%s", o->since ? "?since=" : "",
		 o->since ? o->since : "");
	prepare(ctl, "GET", path, NULL, &hdrs, errbuf);
	curl_easy_setopt(ctl->curl, CURLOPT_WRITEFUNCTION, on_feed);
	curl_easy_setopt(ctl->curl, CURLOPT_WRITEDATA, &f);
	curl_easy_setopt(ctl->curl, CURLOPT_FAILONERROR, 1L);
	CURLcode rc = curl_easy_perform(ctl->curl);
	free(f.buf);
	if (rc != CURLE_OK) {
		unreachable(ctl, rc, errbuf);
		return EXIT_FAIL;
	}
	fprintf(stderr, "ferryctl: the event feed ended (ferryd stopped)\n");
	return 0;
}

/* ---------------- command line ---------------- */

static void usage(FILE *f)
{
	fprintf(f,
		"Usage: ferryctl [--socket PATH] [--json] COMMAND ...\n"
		"Controls one ferryd over its API socket (--socket, $FERRY_SOCKET, "
		"default\n" DEFAULT_SOCKET ").\n"
		"\n"
		"  health\n"
		"  vm create NAME --memory SIZE [--vcpus N] --guest GUEST [--param K=V ...]\n"
		"            [--tracker auto|ring|bitmap|legacy] [--slot-size SIZE] [--hugepages]\n"
		"            [--paused]          GUEST: dirtier, memcheck, touch, boot:FILE, "
		"flat:FILE\n"
		"  vm list\n"
		"  vm show NAME\n"
		"  vm console NAME [--offset N] [--follow]\n"
		"  vm pause|resume|delete NAME\n"
		"  vm dump NAME FILE             write guest memory to FILE (on the agent's host)\n"
		"  migrate NAME --to HOST:PORT [--downtime MS] [--bandwidth RATE] [--streams N]\n"
		"          [--verify|--no-verify] [--transport auto|tcp|rdma] [--wait]\n"
		"          [--compress off|on|auto]\n"
		"          [--postcopy|--no-postcopy] [--postcopy-after ROUNDS|off]\n"
		"          [--timeout-action abort|switchover|postcopy]\n"
		"          [--completion-timeout S_PER_GIB] [--progress-timeout S] [--priority 0..100]\n"
		"  migration list\n"
		"  migration show|cancel|switchover|history ID\n"
		"  evacuate --to HOST:PORT[,HOST:PORT...] [the migrate options] [--wait]\n"
		"                                move every VM off this host\n"
		"  events [--since SEQ]          follow the event feed until interrupted\n"
		"\n"
		"--json prints the API's JSON instead of tables. With --wait, migrate follows the\n"
		"migration to its end and exits 0 only if it completed. Exit status: 0 success,\n"
		"1 failure (the agent's message is printed), 2 usage error.\n");
}

enum opt_id {
	O_SOCKET = 1,
	O_JSON,
	O_HELP,
	O_MEMORY,
	O_VCPUS,
	O_GUEST,
	O_PARAM,
	O_TRACKER,
	O_SLOT_SIZE,
	O_HUGEPAGES,
	O_PAUSED,
	O_FOLLOW,
	O_OFFSET,
	O_TO,
	O_DOWNTIME,
	O_BANDWIDTH,
	O_STREAMS,
	O_VERIFY,
	O_NO_VERIFY,
	O_TRANSPORT,
	O_WAIT,
	O_SINCE,
	O_POSTCOPY,
	O_NO_POSTCOPY,
	O_TIMEOUT_ACTION,
	O_COMPLETION_TIMEOUT,
	O_PROGRESS_TIMEOUT,
	O_PRIORITY,
	O_POSTCOPY_AFTER,
	O_COMPRESS,
};
#define BIT(o) (1ull << (o))
#define COMMON (BIT(O_SOCKET) | BIT(O_JSON) | BIT(O_HELP))
/* What migrate and evacuate take (put_migration_settings). */
#define MIGRATION_FLAGS                                                                      \
	(BIT(O_TO) | BIT(O_DOWNTIME) | BIT(O_BANDWIDTH) | BIT(O_STREAMS) | BIT(O_VERIFY) |   \
	 BIT(O_NO_VERIFY) | BIT(O_TRANSPORT) | BIT(O_WAIT) | BIT(O_POSTCOPY) |                \
	 BIT(O_NO_POSTCOPY) | BIT(O_TIMEOUT_ACTION) | BIT(O_COMPLETION_TIMEOUT) |             \
	 BIT(O_PROGRESS_TIMEOUT) | BIT(O_PRIORITY) | BIT(O_POSTCOPY_AFTER) | BIT(O_COMPRESS))

static int usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int usage_error(const char *fmt, ...)
{
	va_list ap;
	fputs("ferryctl: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputs("\nTry 'ferryctl --help'.\n", stderr);
	return EXIT_USAGE;
}

static bool parse_long(const char *s, long min, long max, long *ret)
{
	char *end;
	errno = 0;
	long v = strtol(s, &end, 10);
	if (errno || end == s || *end || v < min || v > max)
		return false;
	*ret = v;
	return true;
}

/* Runs the command named by the positional words pos[0..npos). */
static int run(struct ctl *ctl, char **pos, int npos, uint64_t seen, const struct opts *o)
{
	static const struct {
		const char *w1, *w2;
		int args; /* positional arguments after the command words */
		uint64_t allowed;
	} cmds[] = {
	    {"health", NULL, 0, 0},
	    {"vm", "create", 1,
	     BIT(O_MEMORY) | BIT(O_VCPUS) | BIT(O_GUEST) | BIT(O_PARAM) | BIT(O_TRACKER) |
		 BIT(O_SLOT_SIZE) | BIT(O_HUGEPAGES) | BIT(O_PAUSED)},
	    {"vm", "list", 0, 0},
	    {"vm", "show", 1, 0},
	    {"vm", "console", 1, BIT(O_FOLLOW) | BIT(O_OFFSET)},
	    {"vm", "pause", 1, 0},
	    {"vm", "resume", 1, 0},
	    {"vm", "delete", 1, 0},
	    {"vm", "dump", 2, 0},
	    {"migrate", NULL, 1, MIGRATION_FLAGS},
	    {"evacuate", NULL, 0, MIGRATION_FLAGS},
	    {"migration", "list", 0, 0},
	    {"migration", "show", 1, 0},
	    {"migration", "history", 1, 0},
	    {"migration", "cancel", 1, 0},
	    {"migration", "switchover", 1, 0},
	    {"events", NULL, 0, BIT(O_SINCE)},
	};
	if (npos == 0)
		return usage_error("no command given");
	unsigned i;
	bool known_w1 = false;
	for (i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++) {
		if (strcmp(cmds[i].w1, pos[0]) != 0)
			continue;
		known_w1 = true;
		if (!cmds[i].w2 || (npos > 1 && strcmp(cmds[i].w2, pos[1]) == 0))
			break;
	}
	if (i == sizeof(cmds) / sizeof(cmds[0]))
		return known_w1 ? usage_error("unknown '%s' command%s%s", pos[0],
					      npos > 1 ? ": " : "", npos > 1 ? pos[1] : "")
				: usage_error("unknown command '%s'", pos[0]);
	int words = cmds[i].w2 ? 2 : 1;
	char cmd[64];
	snprintf(cmd, sizeof(cmd), "%s%s%s", cmds[i].w1, cmds[i].w2 ? " " : "",
		 cmds[i].w2 ? cmds[i].w2 : "");
	if (npos - words != cmds[i].args)
		return usage_error("'%s' takes %d argument%s, got %d", cmd, cmds[i].args,
				   cmds[i].args == 1 ? "" : "s", npos - words);
	uint64_t stray = seen & ~(cmds[i].allowed | COMMON);
	if (stray) {
		static const char *const names[] = {
		    [O_MEMORY] = "--memory",
		    [O_VCPUS] = "--vcpus",
		    [O_GUEST] = "--guest",
		    [O_PARAM] = "--param",
		    [O_TRACKER] = "--tracker",
		    [O_SLOT_SIZE] = "--slot-size",
		    [O_HUGEPAGES] = "--hugepages",
		    [O_PAUSED] = "--paused",
		    [O_FOLLOW] = "--follow",
		    [O_OFFSET] = "--offset",
		    [O_TO] = "--to",
		    [O_DOWNTIME] = "--downtime",
		    [O_BANDWIDTH] = "--bandwidth",
		    [O_STREAMS] = "--streams",
		    [O_VERIFY] = "--verify",
		    [O_NO_VERIFY] = "--no-verify",
		    [O_TRANSPORT] = "--transport",
		    [O_WAIT] = "--wait",
		    [O_SINCE] = "--since",
		    [O_POSTCOPY] = "--postcopy",
		    [O_NO_POSTCOPY] = "--no-postcopy",
		    [O_TIMEOUT_ACTION] = "--timeout-action",
		    [O_COMPLETION_TIMEOUT] = "--completion-timeout",
		    [O_PROGRESS_TIMEOUT] = "--progress-timeout",
		    [O_PRIORITY] = "--priority",
		    [O_POSTCOPY_AFTER] = "--postcopy-after",
		    [O_COMPRESS] = "--compress",
		};
		int b = __builtin_ctzll(stray);
		return usage_error("%s does not apply to '%s'", names[b] ? names[b] : "option",
				   cmd);
	}
	char **args = pos + words;
	if (!strcmp(cmd, "health"))
		return cmd_health(ctl);
	if (!strcmp(cmd, "vm create")) {
		if (!o->memory || !o->guest)
			return usage_error("'vm create' needs --memory SIZE and --guest GUEST");
		return cmd_vm_create(ctl, args[0], o);
	}
	if (!strcmp(cmd, "vm list"))
		return cmd_vm_list(ctl);
	if (!strcmp(cmd, "vm show"))
		return cmd_vm_show(ctl, args[0]);
	if (!strcmp(cmd, "vm console"))
		return cmd_vm_console(ctl, args[0], o);
	if (!strcmp(cmd, "vm pause") || !strcmp(cmd, "vm resume") || !strcmp(cmd, "vm delete")) {
		const char *action = !strcmp(cmd, "vm pause")	 ? "/pause"
				     : !strcmp(cmd, "vm resume") ? "/resume"
								 : "delete";
		return cmd_vm_action(ctl, args[0], action);
	}
	if (!strcmp(cmd, "vm dump"))
		return cmd_vm_dump(ctl, args[0], args[1]);
	if (!strcmp(cmd, "migrate")) {
		if (!o->to)
			return usage_error(
			    "'migrate' needs --to HOST:PORT (the destination agent's "
			    "migration listener)");
		return cmd_migrate(ctl, args[0], o);
	}
	if (!strcmp(cmd, "migration list"))
		return cmd_migration_list(ctl);
	if (!strcmp(cmd, "migration show"))
		return cmd_migration_show(ctl, args[0]);
	if (!strcmp(cmd, "migration history"))
		return cmd_migration_history(ctl, args[0]);
	if (!strcmp(cmd, "evacuate")) {
		if (!o->to)
			return usage_error("'evacuate' needs --to HOST:PORT[,HOST:PORT...]");
		return cmd_evacuate(ctl, o);
	}
	if (!strcmp(cmd, "migration cancel") || !strcmp(cmd, "migration switchover"))
		return cmd_migration_action(ctl, args[0], !strcmp(cmd, "migration cancel"));
	return cmd_events(ctl, o);
}

int main(int argc, char **argv)
{
	static const struct option lopts[] = {
	    {"socket", required_argument, NULL, O_SOCKET},
	    {"json", no_argument, NULL, O_JSON},
	    {"help", no_argument, NULL, O_HELP},
	    {"memory", required_argument, NULL, O_MEMORY},
	    {"vcpus", required_argument, NULL, O_VCPUS},
	    {"guest", required_argument, NULL, O_GUEST},
	    {"param", required_argument, NULL, O_PARAM},
	    {"tracker", required_argument, NULL, O_TRACKER},
	    {"slot-size", required_argument, NULL, O_SLOT_SIZE},
	    {"hugepages", no_argument, NULL, O_HUGEPAGES},
	    {"paused", no_argument, NULL, O_PAUSED},
	    {"follow", no_argument, NULL, O_FOLLOW},
	    {"offset", required_argument, NULL, O_OFFSET},
	    {"to", required_argument, NULL, O_TO},
	    {"downtime", required_argument, NULL, O_DOWNTIME},
	    {"bandwidth", required_argument, NULL, O_BANDWIDTH},
	    {"streams", required_argument, NULL, O_STREAMS},
	    {"verify", no_argument, NULL, O_VERIFY},
	    {"no-verify", no_argument, NULL, O_NO_VERIFY},
	    {"transport", required_argument, NULL, O_TRANSPORT},
	    {"compress", required_argument, NULL, O_COMPRESS},
	    {"wait", no_argument, NULL, O_WAIT},
	    {"since", required_argument, NULL, O_SINCE},
	    {"postcopy", no_argument, NULL, O_POSTCOPY},
	    {"no-postcopy", no_argument, NULL, O_NO_POSTCOPY},
	    {"postcopy-after", required_argument, NULL, O_POSTCOPY_AFTER},
	    {"timeout-action", required_argument, NULL, O_TIMEOUT_ACTION},
	    {"completion-timeout", required_argument, NULL, O_COMPLETION_TIMEOUT},
	    {"progress-timeout", required_argument, NULL, O_PROGRESS_TIMEOUT},
	    {"priority", required_argument, NULL, O_PRIORITY},
	    {NULL, 0, NULL, 0},
	};
	struct opts o = {.vcpus = 1, .downtime = -1, .streams = -1, .verify = -1, .postcopy = -1,
			 .postcopy_after = -2, .completion_timeout = -1, .progress_timeout = -1, .priority = -1};
	struct ctl ctl = {.socket = getenv("FERRY_SOCKET")};
	uint64_t seen = 0;
	int c;

	if (!ctl.socket || !*ctl.socket)
		ctl.socket = DEFAULT_SOCKET;
	/* Options may come anywhere (GNU permutation): "ferryctl vm list --json" and
	 * "ferryctl --json vm list" are the same. Which options fit which command is checked
	 * once the command is known. */
	opterr = 0;
	while ((c = getopt_long(argc, argv, ":h", lopts, NULL)) != -1) {
		if (c == 'h')
			c = O_HELP;
		if (c == '?')
			return usage_error("unknown option '%s'", argv[optind - 1]);
		if (c == ':')
			return usage_error("option '%s' needs a value", argv[optind - 1]);
		seen |= BIT(c);
		switch (c) {
		case O_SOCKET:
			ctl.socket = optarg;
			break;
		case O_JSON:
			ctl.json = true;
			break;
		case O_HELP:
			usage(stdout);
			return 0;
		case O_MEMORY:
			o.memory = optarg;
			break;
		case O_VCPUS:
			if (!parse_long(optarg, 0, INT32_MAX, &o.vcpus))
				return usage_error("--vcpus takes a number, got '%s'", optarg);
			break;
		case O_GUEST:
			o.guest = optarg;
			break;
		case O_PARAM:
			if (o.nr_params == PARAMS_MAX)
				return usage_error("at most %d --param", PARAMS_MAX);
			if (!strchr(optarg, '='))
				return usage_error("--param takes KEY=VALUE, got '%s'", optarg);
			o.params[o.nr_params++] = optarg;
			break;
		case O_TRACKER:
			o.tracker = optarg;
			break;
		case O_SLOT_SIZE:
			o.slot_size = optarg;
			break;
		case O_HUGEPAGES:
			o.hugepages = true;
			break;
		case O_PAUSED:
			o.paused = true;
			break;
		case O_FOLLOW:
			o.follow = true;
			break;
		case O_OFFSET:
			if (strspn(optarg, "0123456789") != strlen(optarg) || !*optarg)
				return usage_error("--offset takes a byte offset, got '%s'",
						   optarg);
			o.offset = optarg;
			break;
		case O_TO:
			o.to = optarg;
			break;
		case O_DOWNTIME:
			if (!parse_long(optarg, 0, INT32_MAX, &o.downtime))
				return usage_error("--downtime takes milliseconds, got '%s'",
						   optarg);
			break;
		case O_BANDWIDTH:
			o.bandwidth = optarg;
			break;
		case O_STREAMS:
			if (!parse_long(optarg, 0, INT32_MAX, &o.streams))
				return usage_error("--streams takes a number, got '%s'", optarg);
			break;
		case O_VERIFY:
		case O_NO_VERIFY:
			o.verify = c == O_VERIFY;
			break;
		case O_TRANSPORT:
			o.transport = optarg;
			break;
		case O_COMPRESS:
			if (strcmp(optarg, "off") && strcmp(optarg, "on") && strcmp(optarg, "auto"))
				return usage_error("--compress takes off, on or auto, got '%s'",
						   optarg);
			o.compress = optarg;
			break;
		case O_WAIT:
			o.wait = true;
			break;
		case O_SINCE:
			o.since = optarg;
			break;
		case O_POSTCOPY:
		case O_NO_POSTCOPY:
			o.postcopy = c == O_POSTCOPY;
			break;
		case O_TIMEOUT_ACTION:
			o.timeout_action = optarg;
			break;
		case O_COMPLETION_TIMEOUT:
			if (!parse_long(optarg, 0, 86400, &o.completion_timeout))
				return usage_error("--completion-timeout takes seconds per GiB "
						   "(0..86400), got '%s'",
						   optarg);
			break;
		case O_PROGRESS_TIMEOUT:
			if (!parse_long(optarg, 0, 86400, &o.progress_timeout))
				return usage_error("--progress-timeout takes seconds (0..86400), "
						   "got '%s'",
						   optarg);
			break;
		case O_POSTCOPY_AFTER:
			if (!strcmp(optarg, "off"))
				o.postcopy_after = -1;
			else if (!parse_long(optarg, 0, 1000, &o.postcopy_after))
				return usage_error("--postcopy-after takes a number of precopy rounds "
						   "(0..1000) or 'off', got '%s'",
						   optarg);
			break;
		case O_PRIORITY:
			if (!parse_long(optarg, 0, 100, &o.priority))
				return usage_error("--priority takes 0..100, got '%s'", optarg);
			break;
		}
	}
	if (curl_global_init(CURL_GLOBAL_DEFAULT) != 0) {
		fprintf(stderr, "ferryctl: cannot initialise libcurl\n");
		return EXIT_FAIL;
	}
	ctl.curl = curl_easy_init();
	if (!ctl.curl) {
		fprintf(stderr, "ferryctl: cannot initialise libcurl\n");
		return EXIT_FAIL;
	}
	int r = run(&ctl, argv + optind, argc - optind, seen, &o);
	curl_easy_cleanup(ctl.curl);
	curl_global_cleanup();
	return r;
}
