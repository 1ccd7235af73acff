// SPDX-License-Identifier: Apache-2.0
/*
 * The agent object: configuration, logging, the VM registry, the event feed and the
 * agent-to-agent listener. VMs are reference counted: an API call holds a reference for its
 * duration, so a concurrent delete only unlinks the VM and the last holder frees it.
 * Migration jobs live in migration.c; the listener hands each accepted connection to it.
 */
#include "agent/agent_internal.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

int agent_err(struct agent_error *err, int e, const char *code, const char *fmt, ...)
{
	if (err) {
		va_list ap;
		snprintf(err->code, sizeof(err->code), "%s", code);
		va_start(ap, fmt);
		vsnprintf(err->message, sizeof(err->message), fmt, ap);
		va_end(ap);
	}
	return e;
}

int agent_error_http_status(const char *code)
{
	static const struct {
		const char *code;
		int status;
	} map[] = {
		{"invalid_argument", 400}, {"not_found", 404},          {"already_exists", 409},
		{"conflict", 409},         {"resource_exhausted", 422}, {"busy", 429},
		{"unavailable", 503},
	};
	for (size_t i = 0; i < sizeof(map) / sizeof(map[0]); i++)
		if (strcmp(code, map[i].code) == 0)
			return map[i].status;
	return 500;
}

int64_t agent_unix_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

uint64_t agent_mono_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

void agent_log(struct agent *a, enum log_level lvl, const char *fmt, ...)
{
	static const char *const names[] = {"error", "warn", "info", "debug"};
	if ((int)lvl > (int)a->cfg.log_level)
		return;
	char line[1024];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	struct tm tm;
	gmtime_r(&ts.tv_sec, &tm);
	pthread_mutex_lock(&a->log_lock);
	fprintf(stderr, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ %s ferryd[%s]: %s\n",
		tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
		ts.tv_nsec / 1000000, names[lvl], a->cfg.name, line);
	fflush(stderr);
	pthread_mutex_unlock(&a->log_lock);
}

void agent_json_escape(const char *s, char *out, size_t outlen)
{
	size_t o = 0;
	if (!outlen)
		return;
	for (; *s && o + 7 < outlen; s++) {
		unsigned char c = (unsigned char)*s;
		if (c == '"' || c == '\\') {
			out[o++] = '\\';
			out[o++] = (char)c;
		} else if (c < 0x20) {
			o += (size_t)snprintf(out + o, outlen - o, "\\u%04x", c);
		} else {
			out[o++] = (char)c;
		}
	}
	out[o] = '\0';
}

/* ---------------- events ---------------- */

void agent_event(struct agent *a, const char *type, const char *fmt, ...)
{
	char fields[1024] = "";
	if (fmt) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(fields, sizeof(fields), fmt, ap);
		va_end(ap);
	}
	pthread_mutex_lock(&a->ev_lock);
	uint64_t seq = ++a->ev_seq;
	char *ev = NULL;
	if (asprintf(&ev, "{\"seq\":%llu,\"time_ms\":%lld,\"type\":\"%s\"%s%s}",
		     (unsigned long long)seq, (long long)agent_unix_ms(), type,
		     fields[0] ? "," : "", fields) < 0)
		ev = NULL;
	free(a->events[seq % AGENT_EVENTS_RING]);
	a->events[seq % AGENT_EVENTS_RING] = ev;
	pthread_cond_broadcast(&a->ev_cond);
	pthread_mutex_unlock(&a->ev_lock);
}

uint64_t agent_events_last_seq(struct agent *a)
{
	pthread_mutex_lock(&a->ev_lock);
	uint64_t s = a->ev_seq;
	pthread_mutex_unlock(&a->ev_lock);
	return s;
}

char *agent_events_next(struct agent *a, uint64_t *seq, int timeout_ms)
{
	struct timespec dl;
	clock_gettime(CLOCK_MONOTONIC, &dl);
	dl.tv_sec += timeout_ms / 1000;
	dl.tv_nsec += (long)(timeout_ms % 1000) * 1000000;
	if (dl.tv_nsec >= 1000000000) {
		dl.tv_sec++;
		dl.tv_nsec -= 1000000000;
	}
	char *out = NULL;
	pthread_mutex_lock(&a->ev_lock);
	while (a->ev_seq <= *seq && !a->ev_closed) {
		if (pthread_cond_timedwait(&a->ev_cond, &a->ev_lock, &dl) == ETIMEDOUT)
			break;
	}
	if (a->ev_seq > *seq) {
		uint64_t oldest = a->ev_seq >= AGENT_EVENTS_RING ? a->ev_seq - AGENT_EVENTS_RING + 1
								 : 1;
		if (*seq + 1 < oldest) {
			unsigned long long lost = oldest - *seq - 1;
			*seq = oldest - 1;
			if (asprintf(&out, "{\"type\":\"events.lost\",\"count\":%llu}", lost) < 0)
				out = NULL;
		} else {
			*seq += 1;
			const char *ev = a->events[*seq % AGENT_EVENTS_RING];
			out = strdup(ev ? ev : "{\"type\":\"events.lost\",\"count\":1}");
		}
	}
	pthread_mutex_unlock(&a->ev_lock);
	return out;
}

/* ---------------- VMs ---------------- */

const char *agent_vm_state_name(enum agent_vm_state s)
{
	switch (s) {
	case AGENT_VM_RUNNING:
		return "running";
	case AGENT_VM_PAUSED:
		return "paused";
	case AGENT_VM_FAILED:
		return "failed";
	case AGENT_VM_MIGRATING:
		return "migrating";
	case AGENT_VM_INCOMING:
		return "incoming";
	}
	return "unknown";
}

static bool valid_name(const char *n)
{
	size_t len = strlen(n);
	if (len == 0 || len >= VM_NAME_MAX)
		return false;
	for (size_t i = 0; i < len; i++)
		if (!isalnum((unsigned char)n[i]) && n[i] != '-' && n[i] != '_' && n[i] != '.')
			return false;
	return n[0] != '.';
}

struct agent_vm *agent_vm_alloc(const struct agent_vm_spec *spec)
{
	struct agent_vm *v = calloc(1, sizeof(*v));
	if (!v)
		return NULL;
	v->spec = *spec;
	v->refs = 1; /* the list's */
	v->created_unix = (int64_t)time(NULL);
	pthread_mutex_init(&v->op_lock, NULL);
	return v;
}

static void vm_release(struct agent_vm *v)
{
	vm_free(v->vm);
	pthread_mutex_destroy(&v->op_lock);
	free(v);
}

struct agent_vm *agent_vm_get(struct agent *a, const char *name, struct agent_error *err)
{
	pthread_mutex_lock(&a->lock);
	struct agent_vm *v = a->vms;
	while (v && strcmp(v->spec.name, name) != 0)
		v = v->next;
	if (v)
		v->refs++;
	pthread_mutex_unlock(&a->lock);
	if (!v)
		agent_err(err, -ENOENT, "not_found", "no VM named '%s'", name);
	return v;
}

void agent_vm_put(struct agent *a, struct agent_vm *v)
{
	if (!v)
		return;
	pthread_mutex_lock(&a->lock);
	bool last = --v->refs == 0;
	pthread_cond_broadcast(&a->cond);
	pthread_mutex_unlock(&a->lock);
	if (last)
		vm_release(v);
}

static uint64_t held_memory(struct agent *a)
{
	uint64_t sum = 0;
	for (struct agent_vm *v = a->vms; v; v = v->next)
		sum += v->spec.mem_size;
	return sum;
}

static unsigned held_vms(struct agent *a)
{
	unsigned n = 0;
	for (struct agent_vm *v = a->vms; v; v = v->next)
		n++;
	return n;
}

/* Checks the agent's limits for one more VM of mem bytes; with a->lock held. */
static int check_limits(struct agent *a, uint64_t mem, struct agent_error *err)
{
	if (a->shutting_down)
		return agent_err(err, -ESHUTDOWN, "unavailable", "the agent is shutting down");
	if (held_vms(a) >= a->cfg.limits.max_vms)
		return agent_err(err, -ENOSPC, "resource_exhausted",
				 "this agent already holds %u VMs (limits.max_vms)",
				 a->cfg.limits.max_vms);
	uint64_t cap = a->cfg.limits.max_memory;
	if (!cap) {
		long pages = sysconf(_SC_PHYS_PAGES);
		cap = pages > 0 ? (uint64_t)pages * (uint64_t)sysconf(_SC_PAGESIZE) : UINT64_MAX;
	}
	uint64_t held = held_memory(a);
	if (mem > cap || held > cap - mem)
		return agent_err(err, -ENOMEM, "resource_exhausted",
				 "%llu MiB more guest RAM would exceed this agent's %llu MiB "
				 "(%llu MiB held)",
				 (unsigned long long)(mem >> 20), (unsigned long long)(cap >> 20),
				 (unsigned long long)(held >> 20));
	return 0;
}

int agent_vm_insert(struct agent *a, struct agent_vm *v, struct agent_error *err)
{
	pthread_mutex_lock(&a->lock);
	int r = 0;
	for (struct agent_vm *o = a->vms; o; o = o->next)
		if (strcmp(o->spec.name, v->spec.name) == 0)
			r = agent_err(err, -EEXIST, "already_exists", "a VM named '%s' exists",
				      v->spec.name);
	if (r == 0)
		r = check_limits(a, v->spec.mem_size, err);
	if (r == 0) {
		struct agent_vm **pp = &a->vms;
		while (*pp && strcmp((*pp)->spec.name, v->spec.name) < 0)
			pp = &(*pp)->next;
		v->next = *pp;
		*pp = v;
	}
	pthread_mutex_unlock(&a->lock);
	return r;
}

void agent_vm_remove(struct agent *a, struct agent_vm *v)
{
	pthread_mutex_lock(&a->lock);
	bool found = false;
	for (struct agent_vm **pp = &a->vms; *pp; pp = &(*pp)->next) {
		if (*pp == v) {
			*pp = v->next;
			found = true;
			break;
		}
	}
	v->unlinked = true;
	pthread_mutex_unlock(&a->lock);
	if (found)
		agent_vm_put(a, v);
}

/* Reads a guest image file, at most max bytes (one more is read to detect oversize). */
static int read_image(const char *path, size_t max, void **ret, size_t *ret_len,
		      struct agent_error *err)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return agent_err(err, -errno, "invalid_argument", "guest image %s: %s", path,
				 strerror(errno));
	struct stat st;
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
		close(fd);
		return agent_err(err, -EINVAL, "invalid_argument",
				 "guest image %s is not a regular file", path);
	}
	if ((uint64_t)st.st_size > max) {
		close(fd);
		return agent_err(err, -EFBIG, "invalid_argument",
				 "guest image %s is %lld bytes; at most %zu", path,
				 (long long)st.st_size, max);
	}
	uint8_t *buf = malloc(max + 1);
	size_t n = 0;
	ssize_t r = 0;
	while (buf && n <= max && (r = read(fd, buf + n, max + 1 - n)) > 0)
		n += (size_t)r;
	close(fd);
	if (!buf || r < 0) {
		free(buf);
		return agent_err(err, -EIO, "invalid_argument", "reading guest image %s failed",
				 path);
	}
	*ret = buf;
	*ret_len = n;
	return 0;
}

static int load_guest(struct agent_vm *v, struct agent_error *err)
{
	struct vm_error verr = {{0}};
	const char *g = v->spec.guest;
	struct ferry_param params[FERRY_PARAM_MAX];
	const char *builtin = strchr(g, ':') ? NULL : g;
	int r;

	if (v->spec.nr_params > FERRY_PARAM_MAX)
		return agent_err(err, -E2BIG, "invalid_argument", "at most %u guest parameters",
				 FERRY_PARAM_MAX);
	for (unsigned i = 0; i < v->spec.nr_params; i++) {
		r = vm_param_parse(builtin, v->spec.params[i], &params[i], &verr);
		if (r < 0)
			return agent_err(err, r, "invalid_argument", "guest parameter '%s': %s",
					 v->spec.params[i], verr.msg);
	}
	if (strncmp(g, "boot:", 5) == 0 || strncmp(g, "flat:", 5) == 0) {
		void *img = NULL;
		size_t len = 0;
		bool boot = g[0] == 'b';
		r = read_image(g + 5, boot ? FERRY_BOOT_SIZE : FERRY_IMAGE_MAX, &img, &len, err);
		if (r < 0)
			return r;
		if (boot && v->spec.nr_params) {
			free(img);
			return agent_err(err, -EINVAL, "invalid_argument",
					 "boot-sector guests take no parameters");
		}
		if (boot)
			r = vm_load_boot_sector(v->vm, img, len, &verr);
		else
			r = vm_load_flat(v->vm, img, len, params, v->spec.nr_params, &verr);
		free(img);
	} else {
		const struct vm_builtin_guest *bg = vm_builtin_guest_find(g);
		if (!bg)
			return agent_err(err, -ENOENT, "invalid_argument",
					 "unknown guest '%s' (built-in: dirtier, memcheck, touch; "
					 "or boot:FILE, flat:FILE)",
					 g);
		r = vm_load_flat(v->vm, bg->image, bg->size, params, v->spec.nr_params, &verr);
	}
	if (r < 0)
		return agent_err(err, r, "invalid_argument", "loading guest %s: %s", g, verr.msg);
	return 0;
}

int agent_vm_create(struct agent *a, const struct agent_vm_spec *spec, struct agent_error *err)
{
	struct vm_error verr = {{0}};
	struct vm_config cfg;
	int r;

	if (!valid_name(spec->name))
		return agent_err(err, -EINVAL, "invalid_argument",
				 "VM name '%s' is invalid: use 1-63 of [A-Za-z0-9_.-], not "
				 "starting with '.'",
				 spec->name);
	if (!spec->guest[0])
		return agent_err(err, -EINVAL, "invalid_argument", "a guest is required");
	/* Refuse early (cheaply) what the limits forbid; insert checks again under lock. */
	pthread_mutex_lock(&a->lock);
	r = check_limits(a, spec->mem_size, err);
	bool taken = false;
	for (struct agent_vm *o = a->vms; o; o = o->next)
		taken |= strcmp(o->spec.name, spec->name) == 0;
	pthread_mutex_unlock(&a->lock);
	if (r < 0)
		return r;
	if (taken)
		return agent_err(err, -EEXIST, "already_exists", "a VM named '%s' exists",
				 spec->name);

	struct agent_vm *v = agent_vm_alloc(spec);
	if (!v)
		return agent_err(err, -ENOMEM, "internal", "out of memory");
	vm_config_init(&cfg, spec->name);
	cfg.mem_size = spec->mem_size;
	cfg.vcpus = spec->vcpus;
	cfg.slot_size = spec->slot_size;
	cfg.hugepages = spec->hugepages;
	cfg.tracker.backend = spec->tracker;
	r = vm_new(&cfg, &v->vm, &verr);
	if (r < 0) {
		agent_err(err, r, r == -E2BIG || r == -ENOMEM ? "resource_exhausted"
							       : "invalid_argument",
			  "%s", verr.msg);
		goto fail;
	}
	r = load_guest(v, err);
	if (r < 0)
		goto fail;
	r = agent_vm_insert(a, v, err);
	if (r < 0)
		goto fail;
	if (!spec->start_paused) {
		pthread_mutex_lock(&v->op_lock);
		r = vm_start(v->vm);
		pthread_mutex_unlock(&v->op_lock);
		if (r < 0) {
			agent_vm_remove(a, v);
			return agent_err(err, r, "internal", "starting VM: %s", strerror(-r));
		}
	}
	agent_log(a, LOG_INFO, "vm %s created: %s, %llu MiB, %u vCPUs", spec->name, spec->guest,
		  (unsigned long long)(spec->mem_size >> 20), spec->vcpus);
	char g[2 * AGENT_GUEST_MAX];
	agent_json_escape(spec->guest, g, sizeof(g));
	agent_event(a, "vm.created", "\"vm\":\"%s\",\"guest\":\"%s\"", spec->name, g);
	return 0;
fail:
	vm_release(v);
	return r;
}

/* Refuses control operations on a VM a migration holds; with a->lock NOT held. */
static int check_not_held(struct agent *a, struct agent_vm *v, struct agent_error *err)
{
	pthread_mutex_lock(&a->lock);
	uint64_t mid = v->migration_id;
	bool incoming = v->incoming;
	pthread_mutex_unlock(&a->lock);
	if (mid)
		return agent_err(err, -EBUSY, "conflict", "VM '%s' is held by %s migration %llu",
				 v->spec.name, incoming ? "incoming" : "outgoing",
				 (unsigned long long)mid);
	return 0;
}

int agent_vm_delete(struct agent *a, const char *name, struct agent_error *err)
{
	struct agent_vm *v = agent_vm_get(a, name, err);
	if (!v)
		return -ENOENT;
	int r = check_not_held(a, v, err);
	if (r == 0) {
		pthread_mutex_lock(&v->op_lock);
		vm_pause(v->vm);
		pthread_mutex_unlock(&v->op_lock);
		agent_vm_remove(a, v);
		agent_log(a, LOG_INFO, "vm %s deleted", name);
		agent_event(a, "vm.deleted", "\"vm\":\"%s\"", name);
	}
	agent_vm_put(a, v);
	return r;
}

static int pause_resume(struct agent *a, const char *name, bool pause, struct agent_error *err)
{
	struct agent_vm *v = agent_vm_get(a, name, err);
	if (!v)
		return -ENOENT;
	int r = check_not_held(a, v, err);
	if (r == 0) {
		pthread_mutex_lock(&v->op_lock);
		if (vm_state(v->vm) == VM_FAILED)
			r = agent_err(err, -EIO, "conflict", "VM '%s' has failed: %s", name,
				      vm_failure(v->vm));
		else
			r = pause ? vm_pause(v->vm) : vm_resume(v->vm);
		pthread_mutex_unlock(&v->op_lock);
		if (r == 0)
			agent_event(a, pause ? "vm.paused" : "vm.resumed", "\"vm\":\"%s\"", name);
		else if (!err || !err->code[0])
			agent_err(err, r, "internal", "%s: %s", pause ? "pause" : "resume",
				  strerror(-r));
	}
	agent_vm_put(a, v);
	return r;
}

int agent_vm_pause(struct agent *a, const char *name, struct agent_error *err)
{
	return pause_resume(a, name, true, err);
}

int agent_vm_resume(struct agent *a, const char *name, struct agent_error *err)
{
	return pause_resume(a, name, false, err);
}

static void fill_info(struct agent *a, struct agent_vm *v, struct agent_vm_info *ret)
{
	memset(ret, 0, sizeof(*ret));
	snprintf(ret->name, sizeof(ret->name), "%s", v->spec.name);
	snprintf(ret->guest, sizeof(ret->guest), "%s", v->spec.guest);
	ret->mem_size = v->spec.mem_size;
	ret->vcpus = v->spec.vcpus;
	ret->created_unix = v->created_unix;
	ret->nr_params = v->spec.nr_params;
	memcpy(ret->params, v->spec.params, sizeof(ret->params));
	pthread_mutex_lock(&a->lock);
	ret->migration_id = v->migration_id;
	bool incoming = v->incoming;
	pthread_mutex_unlock(&a->lock);
	snprintf(ret->tracker, sizeof(ret->tracker), "%s",
		 tracker_backend_name(tracker_backend(vm_tracker(v->vm))));
	enum vm_run_state s = vm_state(v->vm);
	if (s == VM_FAILED) {
		ret->state = AGENT_VM_FAILED;
		snprintf(ret->failure, sizeof(ret->failure), "%s", vm_failure(v->vm));
	} else if (ret->migration_id && incoming) {
		ret->state = AGENT_VM_INCOMING;
	} else if (ret->migration_id) {
		ret->state = AGENT_VM_MIGRATING;
	} else {
		ret->state = s == VM_RUNNING ? AGENT_VM_RUNNING : AGENT_VM_PAUSED;
	}
	vm_stats_total(v->vm, &ret->stats);
	ret->nr_guest_errors = vm_guest_errors(v->vm, ret->guest_errors, VM_ERRORS_KEPT);
}

int agent_vm_info(struct agent *a, const char *name, struct agent_vm_info *ret,
		  struct agent_error *err)
{
	struct agent_vm *v = agent_vm_get(a, name, err);
	if (!v)
		return -ENOENT;
	fill_info(a, v, ret);
	agent_vm_put(a, v);
	return 0;
}

int agent_vm_list(struct agent *a, struct agent_vm_info **ret, unsigned *ret_n,
		  struct agent_error *err)
{
	pthread_mutex_lock(&a->lock);
	unsigned n = held_vms(a);
	struct agent_vm **refs = calloc(n ? n : 1, sizeof(*refs));
	if (refs) {
		unsigned i = 0;
		for (struct agent_vm *v = a->vms; v; v = v->next) {
			v->refs++;
			refs[i++] = v;
		}
	}
	pthread_mutex_unlock(&a->lock);
	if (!refs)
		return agent_err(err, -ENOMEM, "internal", "out of memory");
	struct agent_vm_info *out = calloc(n ? n : 1, sizeof(*out));
	for (unsigned i = 0; i < n; i++) {
		if (out)
			fill_info(a, refs[i], &out[i]);
		agent_vm_put(a, refs[i]);
	}
	free(refs);
	if (!out)
		return agent_err(err, -ENOMEM, "internal", "out of memory");
	*ret = out;
	*ret_n = n;
	return 0;
}

ssize_t agent_vm_console(struct agent *a, const char *name, uint64_t *pos, char *buf,
			 size_t len, struct agent_error *err)
{
	struct agent_vm *v = agent_vm_get(a, name, err);
	if (!v)
		return -ENOENT;
	size_t n = vm_console_read(v->vm, pos, buf, len);
	agent_vm_put(a, v);
	return (ssize_t)n;
}

int agent_vm_dump(struct agent *a, const char *name, const char *path, struct agent_error *err)
{
	if (!path || path[0] != '/')
		return agent_err(err, -EINVAL, "invalid_argument",
				 "dump path must be absolute (it is opened by the agent)");
	struct agent_vm *v = agent_vm_get(a, name, err);
	if (!v)
		return -ENOENT;
	int r = check_not_held(a, v, err);
	if (r < 0)
		goto out;
	int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	if (fd < 0) {
		r = agent_err(err, -errno, errno == EEXIST ? "already_exists" : "invalid_argument",
			      "cannot create %s: %s", path, strerror(errno));
		goto out;
	}
	pthread_mutex_lock(&v->op_lock);
	bool was_running = vm_state(v->vm) == VM_RUNNING;
	vm_pause(v->vm);
	for (unsigned i = 0; i < vm_nr_slots(v->vm) && r == 0; i++) {
		const struct vm_slot *s = vm_slot(v->vm, i);
		uint64_t off = 0;
		while (off < s->size) {
			ssize_t w = pwrite(fd, (char *)s->hva + off, s->size - off,
					   (off_t)(s->gpa + off));
			if (w <= 0) {
				r = agent_err(err, w < 0 ? -errno : -EIO, "internal",
					      "writing %s: %s", path,
					      w < 0 ? strerror(errno) : "short write");
				break;
			}
			off += (uint64_t)w;
		}
	}
	if (was_running)
		vm_resume(v->vm);
	pthread_mutex_unlock(&v->op_lock);
	if (close(fd) < 0 && r == 0)
		r = agent_err(err, -errno, "internal", "closing %s: %s", path, strerror(errno));
	if (r < 0)
		unlink(path);
out:
	agent_vm_put(a, v);
	return r;
}

/* ---------------- lifecycle and listener ---------------- */

static void *listener_thread(void *arg)
{
	struct agent *a = arg;
	for (;;) {
		struct pollfd p[2] = {{.fd = a->listen_fd, .events = POLLIN},
				      {.fd = a->wake_fd[0], .events = POLLIN}};
		if (poll(p, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			agent_log(a, LOG_ERROR, "listener: poll: %s", strerror(errno));
			return NULL;
		}
		if (p[1].revents)
			return NULL;
		if (!(p[0].revents & POLLIN))
			continue;
		int fd = accept4(a->listen_fd, NULL, NULL, SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno != EINTR && errno != EAGAIN && errno != ECONNABORTED)
				agent_log(a, LOG_WARN, "listener: accept: %s", strerror(errno));
			continue;
		}
		migration_listener_dispatch(a, fd);
	}
}

void agent_format_bound(int fd, char *out, size_t len)
{
	struct sockaddr_storage ss;
	socklen_t sl = sizeof(ss);
	char host[INET6_ADDRSTRLEN] = "?";
	unsigned port = 0;
	if (getsockname(fd, (struct sockaddr *)&ss, &sl) == 0) {
		if (ss.ss_family == AF_INET) {
			struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;
			inet_ntop(AF_INET, &s4->sin_addr, host, sizeof(host));
			port = ntohs(s4->sin_port);
		} else if (ss.ss_family == AF_INET6) {
			struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
			inet_ntop(AF_INET6, &s6->sin6_addr, host, sizeof(host));
			port = ntohs(s6->sin6_port);
		}
	}
	snprintf(out, len, strchr(host, ':') ? "[%s]:%u" : "%s:%u", host, port);
}

static int bind_listener(struct agent *a, struct agent_error *err)
{
	const struct ferry_hostport *hp = &a->cfg.migration.listen;
	struct addrinfo hints = {.ai_family = AF_UNSPEC,
				 .ai_socktype = SOCK_STREAM,
				 .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
	struct addrinfo *res = NULL;
	char port[8];
	snprintf(port, sizeof(port), "%u", hp->port);
	int r = getaddrinfo(hp->host[0] ? hp->host : NULL, port, &hints, &res);
	if (r != 0)
		return agent_err(err, -EINVAL, "invalid_argument",
				 "migration.listen %s:%u: %s", hp->host, hp->port, gai_strerror(r));
	int fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
	int one = 1;
	if (fd >= 0)
		setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (fd < 0 || bind(fd, res->ai_addr, res->ai_addrlen) < 0 || listen(fd, 64) < 0) {
		int e = errno;
		if (fd >= 0)
			close(fd);
		freeaddrinfo(res);
		return agent_err(err, -e, "unavailable", "cannot listen on %s:%u: %s", hp->host,
				 hp->port, strerror(e));
	}
	freeaddrinfo(res);
	agent_format_bound(fd, a->listen_addr, sizeof(a->listen_addr));
	a->listen_fd = fd;
	return 0;
}

int agent_new(const struct ferry_config *cfg, struct agent **ret, struct agent_error *err)
{
	struct agent *a = calloc(1, sizeof(*a));
	int r;
	if (!a)
		return agent_err(err, -ENOMEM, "internal", "out of memory");
	a->cfg = *cfg;
	a->listen_fd = -1;
	a->wake_fd[0] = a->wake_fd[1] = -1;
	a->next_migration_id = 1;
	pthread_mutex_init(&a->lock, NULL);
	pthread_cond_init(&a->cond, NULL);
	pthread_mutex_init(&a->log_lock, NULL);
	pthread_mutex_init(&a->ev_lock, NULL);
	pthread_condattr_t ca;
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&a->ev_cond, &ca);
	pthread_condattr_destroy(&ca);
	if (!a->cfg.name[0])
		gethostname(a->cfg.name, sizeof(a->cfg.name) - 1);

	if (pipe2(a->wake_fd, O_CLOEXEC) < 0) {
		r = agent_err(err, -errno, "internal", "pipe: %s", strerror(errno));
		goto fail;
	}
	r = migration_state_init(a, err);
	if (r < 0)
		goto fail;
	r = bind_listener(a, err);
	if (r < 0)
		goto fail;
	r = pthread_create(&a->listener, NULL, listener_thread, a);
	if (r) {
		r = agent_err(err, -r, "internal", "listener thread: %s", strerror(r));
		goto fail;
	}
	pthread_setname_np(a->listener, "listen");
	a->listener_started = true;
	agent_log(a, LOG_INFO, "migration listener on %s", a->listen_addr);
	migration_warm_buffers(a);
	*ret = a;
	return 0;
fail:
	agent_free(a);
	return r;
}

const struct ferry_config *agent_config(const struct agent *a)
{
	return &a->cfg;
}

const char *agent_name(const struct agent *a)
{
	return a->cfg.name;
}

const char *agent_listen_address(const struct agent *a)
{
	return a->listen_addr;
}

void agent_shutdown(struct agent *a)
{
	pthread_mutex_lock(&a->lock);
	bool already = a->shutting_down;
	a->shutting_down = true;
	pthread_mutex_unlock(&a->lock);
	if (already)
		return;
	agent_log(a, LOG_INFO, "shutting down");
	agent_event(a, "agent.shutdown", NULL);
	if (a->listener_started) {
		ssize_t w = write(a->wake_fd[1], "x", 1);
		(void)w;
		pthread_join(a->listener, NULL);
		a->listener_started = false;
	}
	if (a->warm_started) { /* at most one fill of a few hundred MiB */
		pthread_join(a->warm, NULL);
		a->warm_started = false;
	}
	migration_shutdown_all(a);
	/* Stop every VM's vCPUs; the memory goes with agent_free. */
	pthread_mutex_lock(&a->lock);
	for (struct agent_vm *v = a->vms; v; v = v->next)
		vm_pause(v->vm);
	pthread_mutex_unlock(&a->lock);
	pthread_mutex_lock(&a->ev_lock);
	a->ev_closed = true;
	pthread_cond_broadcast(&a->ev_cond);
	pthread_mutex_unlock(&a->ev_lock);
}

void agent_free(struct agent *a)
{
	if (!a)
		return;
	agent_shutdown(a);
	migration_free_all(a);
	while (a->vms)
		agent_vm_remove(a, a->vms);
	if (a->listen_fd >= 0)
		close(a->listen_fd);
	for (int i = 0; i < 2; i++)
		if (a->wake_fd[i] >= 0)
			close(a->wake_fd[i]);
	for (unsigned i = 0; i < AGENT_EVENTS_RING; i++)
		free(a->events[i]);
	pthread_mutex_destroy(&a->lock);
	pthread_cond_destroy(&a->cond);
	pthread_mutex_destroy(&a->log_lock);
	pthread_mutex_destroy(&a->ev_lock);
	pthread_cond_destroy(&a->ev_cond);
	free(a);
}
