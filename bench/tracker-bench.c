// SPDX-License-Identifier: Apache-2.0
/*
 * tracker-bench: measures what one dirty sync costs — harvesting KVM's dirty state into the
 * dirty set and re-protecting those pages — for each tracker backend (ring, bitmap, legacy)
 * over a matrix of guest sizes, vCPU counts and dirty fractions, so that the choice of the
 * ring as ferry's default rests on numbers. Each case boots a real KVM VM running the
 * built-in "touch" guest, which writes one byte into every stride-th page of its vCPU's
 * region each time the host bumps bootinfo->host_gen. The host then pauses the VM (so the
 * timing runs on a quiet machine) and times tracker_sync() plus one full pass of
 * tracker_take_next() — the pass is where the bitmap backend re-protects, chunk by chunk —
 * plus whatever the vCPU threads spent harvesting full rings during that generation, since
 * for the ring that is part of the harvest too. The result is the median over --reps
 * generations, as a readable table or, with --csv, as backend,guest_gib,vcpus,dirty_pct,sync_us.
 * main() only parses and wires; results and how they were produced are in docs/benchmarks.md.
 */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "agent/vm/vm.h"

#define PAGE_SIZE_BYTES 4096ull
#define GIB (1ull << 30)
/* Guest RAM is rounded down to this so any --gib value gives a valid 2 MiB-mapped guest. */
#define MEM_ALIGN (2ull << 20)
#define LIST_MAX 16u
#define REPS_MAX 1000u
/* A generation at 16 GiB and 10% touches ~420k pages, each a write-protect fault that a
 * nested KVM host serves slowly; five minutes is ample, more is a hung guest. */
#define GEN_TIMEOUT_MS (5 * 60 * 1000)
/* How often a waiting generation checks for a ring-full storm (see run_generation). */
#define GEN_SLICE_MS 1000
#define EXIT_USAGE 2
#define EXIT_SKIP 77 /* nothing could run on this host (no KVM, no requested backend) */

struct options {
	enum tracker_backend backends[LIST_MAX];
	unsigned nr_backends;
	double gib[LIST_MAX];
	unsigned nr_gib;
	unsigned vcpus[LIST_MAX];
	unsigned nr_vcpus;
	double dirty[LIST_MAX];
	unsigned nr_dirty;
	unsigned reps;
	uint32_t ring_entries;
	uint64_t wss; /* bytes per vCPU region; 0 = all free memory split evenly */
	bool csv;
};

/* One point of the matrix and what the touch guest is told to do for it. */
struct bench_case {
	enum tracker_backend backend;
	double gib;
	double dirty_pct;
	unsigned vcpus;
	uint64_t mem;	   /* guest RAM bytes */
	uint64_t wss;	   /* bytes per vCPU region */
	uint64_t stride;   /* the guest writes pages 0, stride, 2*stride, ... of its region */
	uint64_t expected; /* pages written per generation, all vCPUs */
};

/* One timed generation. */
struct rep_sample {
	uint64_t sync_ns;      /* tracker_sync() */
	uint64_t take_ns;      /* the full tracker_take_next() pass */
	uint64_t ring_full_ns; /* vCPU threads harvesting full rings during the generation */
	uint64_t ring_full_exits;
	uint64_t taken; /* dirty pages the pass handed out */
};

struct case_result {
	double median_us;      /* median of the reps' totals: the sync_us column */
	struct rep_sample mid; /* the (lower) middle rep, for the breakdown columns */
	uint64_t min_ns;
	uint64_t max_ns;
	uint64_t taken_min; /* fewest pages one rep took: checked against expected */
};

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t sample_total(const struct rep_sample *s)
{
	return s->sync_ns + s->take_ns + s->ring_full_ns;
}

static void usage(FILE *f)
{
	fprintf(
	    f,
	    "usage: tracker-bench [options]\n"
	    "Measures the cost of one dirty sync (harvest + re-protect) per tracker backend,\n"
	    "guest size, vCPU count and dirty fraction, on real KVM with the touch guest.\n"
	    "Lists are comma-separated; by default the full matrix runs.\n"
	    "  --backend LIST      ring,bitmap,legacy (default all three)\n"
	    "  --gib LIST          guest sizes in GiB, fractions allowed (default 1,4,16)\n"
	    "  --vcpus LIST        vCPU counts (default 1,8,32)\n"
	    "  --dirty LIST        %% of pages written per sync (default 0.01,0.1,1,10)\n"
	    "  --reps N            timed syncs per case; the median is reported (default 5)\n"
	    "  --ring-entries N    dirty ring entries per vCPU, power of two %u..%u (default %u)\n"
	    "  --wss SIZE          bytes each vCPU writes in (e.g. 1000M); default: all guest\n"
	    "                      memory above 4 MiB split evenly. With it, --dirty is the\n"
	    "                      fraction of each region, so guests of any size see the same\n"
	    "                      write pattern (to separate guest size from dirty pages)\n"
	    "  --csv               print backend,guest_gib,vcpus,dirty_pct,sync_us only\n"
	    "  --help              this text\n"
	    "sync_us = tracker_sync() + one full tracker_take_next() pass + ring-full harvests in\n"
	    "vCPU threads during the generation. Progress goes to stderr.\n"
	    "Exit status: 0 ok, 1 a case failed, 2 bad options, 77 nothing could run here.\n",
	    TRACKER_RING_ENTRIES_MIN, TRACKER_RING_ENTRIES_MAX, TRACKER_RING_ENTRIES_MAX);
}

/* Strict decimal number: the whole string, finite. */
static int parse_double(const char *s, double *ret)
{
	char *end;
	errno = 0;
	double v = strtod(s, &end);
	if (errno || end == s || *end || v != v || v > 1e18 || v < -1e18)
		return -EINVAL;
	*ret = v;
	return 0;
}

static int parse_uint(const char *s, uint64_t max, uint64_t *ret)
{
	char *end;
	if (*s < '0' || *s > '9')
		return -EINVAL; /* strtoull would accept "-1" and " 1" */
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno || *end || v > max)
		return -EINVAL;
	*ret = v;
	return 0;
}

/*
 * Splits a comma-separated option value and hands each item to parse_item(item, index).
 * Empty items and more than LIST_MAX items are errors; *ret_n is the number parsed.
 */
static int parse_list(const char *opt, const char *arg, unsigned *ret_n,
		      int (*parse_item)(const char *opt, const char *item, unsigned i, void *dst),
		      void *dst)
{
	char buf[512];
	unsigned n = 0;

	if (strlen(arg) >= sizeof(buf)) {
		fprintf(stderr, "tracker-bench: --%s: list too long\n", opt);
		return -EINVAL;
	}
	strcpy(buf, arg);
	char *p = buf;
	for (;;) {
		char *comma = strchr(p, ',');
		if (comma)
			*comma = '\0';
		if (*p == '\0') {
			fprintf(stderr, "tracker-bench: --%s %s: empty item in list\n", opt, arg);
			return -EINVAL;
		}
		if (n == LIST_MAX) {
			fprintf(stderr, "tracker-bench: --%s: at most %u values\n", opt, LIST_MAX);
			return -E2BIG;
		}
		if (parse_item(opt, p, n, dst) < 0)
			return -EINVAL;
		n++;
		if (!comma)
			break;
		p = comma + 1;
	}
	*ret_n = n;
	return 0;
}

static int parse_backend_item(const char *opt, const char *item, unsigned i, void *dst)
{
	enum tracker_backend *out = dst;
	enum tracker_backend b;
	/* auto is refused: a benchmark must say what it measured, not what the kernel picked. */
	if (tracker_backend_parse(item, &b) < 0 || b == TRACKER_AUTO) {
		fprintf(stderr, "tracker-bench: --%s %s: use ring, bitmap or legacy\n", opt, item);
		return -EINVAL;
	}
	out[i] = b;
	return 0;
}

static int parse_gib_item(const char *opt, const char *item, unsigned i, void *dst)
{
	double *out = dst;
	double v;
	double max_gib = (double)FERRY_PD_MAX; /* flat guests map at most this much */
	double min_gib = (double)FERRY_FLAT_MIN_MEM / (double)GIB;
	if (parse_double(item, &v) < 0 || v < min_gib || v > max_gib) {
		fprintf(stderr,
			"tracker-bench: --%s %s: want a size in GiB from %g to %g (e.g. 1, 0.25)\n",
			opt, item, min_gib, max_gib);
		return -EINVAL;
	}
	out[i] = v;
	return 0;
}

static int parse_vcpus_item(const char *opt, const char *item, unsigned i, void *dst)
{
	unsigned *out = dst;
	uint64_t v;
	unsigned max = VM_MAX_VCPUS < FERRY_FLAT_MAX_VCPUS ? VM_MAX_VCPUS : FERRY_FLAT_MAX_VCPUS;
	if (parse_uint(item, max, &v) < 0 || v == 0) {
		fprintf(stderr, "tracker-bench: --%s %s: want a vCPU count from 1 to %u\n", opt,
			item, max);
		return -EINVAL;
	}
	out[i] = (unsigned)v;
	return 0;
}

static int parse_dirty_item(const char *opt, const char *item, unsigned i, void *dst)
{
	double *out = dst;
	double v;
	if (parse_double(item, &v) < 0 || v <= 0 || v > 100) {
		fprintf(stderr,
			"tracker-bench: --%s %s: want a percentage above 0 and at most 100 "
			"(e.g. 0.01 for one page in 10000)\n",
			opt, item);
		return -EINVAL;
	}
	out[i] = v;
	return 0;
}

static int parse_args(int argc, char **argv, struct options *o)
{
	enum { O_BACKEND = 1, O_GIB, O_VCPUS, O_DIRTY, O_REPS, O_RING, O_WSS, O_CSV, O_HELP };
	static const struct option lo[] = {
	    {"backend", required_argument, 0, O_BACKEND},
	    {"gib", required_argument, 0, O_GIB},
	    {"vcpus", required_argument, 0, O_VCPUS},
	    {"dirty", required_argument, 0, O_DIRTY},
	    {"reps", required_argument, 0, O_REPS},
	    {"ring-entries", required_argument, 0, O_RING},
	    {"wss", required_argument, 0, O_WSS},
	    {"csv", no_argument, 0, O_CSV},
	    {"help", no_argument, 0, O_HELP},
	    {0, 0, 0, 0},
	};
	static const enum tracker_backend def_backends[] = {TRACKER_RING, TRACKER_BITMAP,
							    TRACKER_LEGACY};
	static const double def_gib[] = {1, 4, 16};
	static const unsigned def_vcpus[] = {1, 8, 32};
	static const double def_dirty[] = {0.01, 0.1, 1, 10};
	uint64_t v;
	int c;

	memset(o, 0, sizeof(*o));
	o->nr_backends = 3;
	memcpy(o->backends, def_backends, sizeof(def_backends));
	o->nr_gib = 3;
	memcpy(o->gib, def_gib, sizeof(def_gib));
	o->nr_vcpus = 3;
	memcpy(o->vcpus, def_vcpus, sizeof(def_vcpus));
	o->nr_dirty = 4;
	memcpy(o->dirty, def_dirty, sizeof(def_dirty));
	o->reps = 5;
	o->ring_entries = TRACKER_RING_ENTRIES_MAX;

	opterr = 0; /* we print our own, clearer, messages */
	while ((c = getopt_long(argc, argv, ":h", lo, NULL)) != -1) {
		switch (c) {
		case O_BACKEND:
			if (parse_list("backend", optarg, &o->nr_backends, parse_backend_item,
				       o->backends) < 0)
				return -EINVAL;
			break;
		case O_GIB:
			if (parse_list("gib", optarg, &o->nr_gib, parse_gib_item, o->gib) < 0)
				return -EINVAL;
			break;
		case O_VCPUS:
			if (parse_list("vcpus", optarg, &o->nr_vcpus, parse_vcpus_item, o->vcpus) <
			    0)
				return -EINVAL;
			break;
		case O_DIRTY:
			if (parse_list("dirty", optarg, &o->nr_dirty, parse_dirty_item, o->dirty) <
			    0)
				return -EINVAL;
			break;
		case O_REPS:
			if (parse_uint(optarg, REPS_MAX, &v) < 0 || v == 0) {
				fprintf(stderr,
					"tracker-bench: --reps %s: want a number from 1 to %u\n",
					optarg, REPS_MAX);
				return -EINVAL;
			}
			o->reps = (unsigned)v;
			break;
		case O_RING:
			if (parse_uint(optarg, TRACKER_RING_ENTRIES_MAX, &v) < 0 ||
			    v < TRACKER_RING_ENTRIES_MIN || (v & (v - 1))) {
				fprintf(
				    stderr,
				    "tracker-bench: --ring-entries %s: want a power of two from %u "
				    "to %u\n",
				    optarg, TRACKER_RING_ENTRIES_MIN, TRACKER_RING_ENTRIES_MAX);
				return -EINVAL;
			}
			o->ring_entries = (uint32_t)v;
			break;
		case O_WSS:
			if (vm_size_parse(optarg, &o->wss) < 0 || o->wss == 0 ||
			    o->wss % PAGE_SIZE_BYTES) {
				fprintf(stderr,
					"tracker-bench: --wss %s: want a size that is a positive "
					"multiple of 4 KiB (e.g. 1000M)\n",
					optarg);
				return -EINVAL;
			}
			break;
		case O_CSV:
			o->csv = true;
			break;
		case O_HELP:
		case 'h':
			usage(stdout);
			exit(0);
		case ':':
			fprintf(stderr, "tracker-bench: %s needs a value\n", argv[optind - 1]);
			return -EINVAL;
		default:
			fprintf(stderr, "tracker-bench: unknown option %s (try --help)\n",
				argv[optind - 1]);
			return -EINVAL;
		}
	}
	if (optind != argc) {
		fprintf(stderr, "tracker-bench: unexpected argument %s (try --help)\n",
			argv[optind]);
		return -EINVAL;
	}
	return 0;
}

/* Fills in what the guest is told for one point of the matrix, and what it should dirty. */
static void case_init(struct bench_case *c, enum tracker_backend b, double gib, unsigned vcpus,
		      double dirty_pct, uint64_t wss)
{
	memset(c, 0, sizeof(*c));
	c->backend = b;
	c->gib = gib;
	c->vcpus = vcpus;
	c->dirty_pct = dirty_pct;
	c->mem = (uint64_t)(gib * (double)GIB) / MEM_ALIGN * MEM_ALIGN;
	c->wss = wss ? wss : (c->mem - FERRY_FREE_GPA) / vcpus / PAGE_SIZE_BYTES * PAGE_SIZE_BYTES;
	c->stride = (uint64_t)(100.0 / dirty_pct + 0.5);
	if (c->stride == 0)
		c->stride = 1;
	/* Small guests with many vCPUs have regions shorter than the stride (1 GiB over 32
	 * vCPUs is 8160 pages, 0.01% asks for 1 in 10000); the guest refuses that, and one page
	 * per region is the nearest it can do, so clamp. The pages column tells the truth. */
	uint64_t region_pages = c->wss / PAGE_SIZE_BYTES;
	if (c->stride > region_pages)
		c->stride = region_pages;
	/* The stride restarts in each vCPU's region, so count per region: pages 0, s, 2s... */
	c->expected = (uint64_t)vcpus * ((region_pages + c->stride - 1) / c->stride);
}

/* Shows the end of the guest console: where the guest explains why it gave up. */
static void dump_console_tail(struct vm *vm)
{
	static char buf[VM_CONSOLE_SIZE];
	uint64_t pos = 0;
	size_t n = 0, got;
	while (n < sizeof(buf) && (got = vm_console_read(vm, &pos, buf + n, sizeof(buf) - n)) > 0)
		n += got;
	if (n == 0)
		return;
	size_t from = n > 2048 ? n - 2048 : 0;
	fprintf(stderr, "tracker-bench: guest console (last %zu bytes):\n%.*s\n", n - from,
		(int)(n - from), buf + from);
}

/* Why the VM cannot go on, or NULL: a failed vCPU or a guest that reported an error. */
static const char *vm_trouble(struct vm *vm)
{
	if (vm_state(vm) == VM_FAILED)
		return vm_failure(vm);
	struct vm_vcpu_stats s;
	vm_stats_total(vm, &s);
	if (s.errors)
		return "the guest reported an error through the debug port";
	return NULL;
}

struct gen_wait {
	unsigned vcpus;
	uint64_t gen;
};

/* vm_wait() predicate: every vCPU finished generation gen — or waiting is pointless. */
static bool gen_done(struct vm *vm, void *arg)
{
	const struct gen_wait *w = arg;
	if (vm_trouble(vm))
		return true;
	for (unsigned i = 0; i < w->vcpus; i++) {
		struct vm_vcpu_stats s;
		vm_vcpu_stats(vm, i, &s);
		if (s.done_gen != w->gen)
			return false;
	}
	return true;
}

/* Harvests and takes everything, untimed; returns pages taken or -errno. */
static int64_t drain(struct tracker *t)
{
	struct tracker_cursor cur = {0};
	struct tracker_batch b;
	int64_t n = 0;
	int r = tracker_sync(t, NULL);
	if (r < 0)
		return r;
	while ((r = tracker_take_next(t, &cur, &b)) > 0)
		n += b.dirty;
	return r < 0 ? r : n;
}

/*
 * Runs one generation of the touch guest: resume, bump host_gen, wait until every vCPU
 * reported it done, pause. Pausing kicks each vCPU out of KVM_RUN, which also flushes
 * hardware-buffered dirty entries into the rings (DESIGN.md rule 3).
 */
static int run_generation(struct vm *vm, const struct bench_case *c, uint32_t ring_entries,
			  uint64_t gen)
{
	struct ferry_bootinfo *bi = vm_bootinfo(vm);
	struct tracker *t = vm_tracker(vm);
	struct gen_wait w = {.vcpus = c->vcpus, .gen = gen};
	/*
	 * Ring-full exits one generation can honestly need: each vCPU's share of the pages over
	 * a ring, rounded up, with slack for the soft limit. Far more means the vCPUs are stuck
	 * exiting with a "full" ring that harvesting does not empty — seen when the kernel
	 * overflowed the ring (a WARN in kvm_dirty_ring_push in dmesg) and the harvester lost
	 * its place — so stop the case rather than spin until the timeout.
	 */
	uint64_t rf_budget = 0;
	if (c->backend == TRACKER_RING)
		rf_budget =
		    100 + 4 * (uint64_t)c->vcpus * (c->expected / c->vcpus / ring_entries + 1);
	uint64_t rf0 = tracker_ring_full_exits(t);
	int r = vm_resume(vm);
	if (r < 0) {
		fprintf(stderr, "tracker-bench: resuming the VM: %s\n", strerror(-r));
		return r;
	}
	/* Release: the guest polls this word; nothing else it reads changes, but be exact. */
	__atomic_store_n(&bi->host_gen, gen, __ATOMIC_RELEASE);
	bool storm = false;
	for (int waited = 0; waited < GEN_TIMEOUT_MS; waited += GEN_SLICE_MS) {
		r = vm_wait(vm, gen_done, &w, GEN_SLICE_MS);
		if (r != -ETIMEDOUT)
			break;
		if (rf_budget && tracker_ring_full_exits(t) - rf0 > rf_budget) {
			storm = true;
			break;
		}
	}
	vm_pause(vm);
	if (storm) {
		fprintf(stderr,
			"tracker-bench: generation %llu: %llu ring-full exits and counting, where "
			"about %llu would do: the dirty ring harvest is stuck (did the kernel "
			"overflow the ring? see dmesg for kvm_dirty_ring_push)\n",
			(unsigned long long)gen,
			(unsigned long long)(tracker_ring_full_exits(t) - rf0),
			(unsigned long long)rf_budget);
		return -EPROTO;
	}
	const char *why = vm_trouble(vm);
	if (why) {
		fprintf(stderr, "tracker-bench: generation %llu: %s\n", (unsigned long long)gen,
			why);
		struct vm_guest_error ge[VM_ERRORS_KEPT];
		unsigned n = vm_guest_errors(vm, ge, VM_ERRORS_KEPT);
		for (unsigned i = 0; i < n; i++)
			fprintf(stderr,
				"  vcpu %u: error kind %u gpa %#llx expected %#llx found %#llx\n",
				ge[i].vcpu, ge[i].kind, (unsigned long long)ge[i].gpa,
				(unsigned long long)ge[i].expected,
				(unsigned long long)ge[i].found);
		dump_console_tail(vm);
		return -EIO;
	}
	if (r < 0) {
		fprintf(stderr, "tracker-bench: generation %llu not done after %d s:",
			(unsigned long long)gen, GEN_TIMEOUT_MS / 1000);
		for (unsigned i = 0; i < c->vcpus; i++) {
			struct vm_vcpu_stats s;
			vm_vcpu_stats(vm, i, &s);
			fprintf(stderr, " vcpu%u=%llu", i, (unsigned long long)s.done_gen);
		}
		fprintf(stderr, "\n");
		dump_console_tail(vm);
		return r;
	}
	return 0;
}

/* The timed part: one sync and one full take pass on the paused VM. */
static int timed_sync(struct tracker *t, struct rep_sample *s)
{
	struct tracker_cursor cur = {0};
	struct tracker_batch b;
	uint64_t taken = 0;
	uint64_t t0 = now_ns();
	int r = tracker_sync(t, NULL);
	uint64_t t1 = now_ns();
	if (r < 0) {
		fprintf(stderr, "tracker-bench: tracker_sync: %s\n", strerror(-r));
		return r;
	}
	while ((r = tracker_take_next(t, &cur, &b)) > 0)
		taken += b.dirty;
	uint64_t t2 = now_ns();
	if (r < 0) {
		fprintf(stderr, "tracker-bench: tracker_take_next: %s\n", strerror(-r));
		return r;
	}
	s->sync_ns = t1 - t0;
	s->take_ns = t2 - t1;
	s->taken = taken;
	return 0;
}

static int cmp_total(const void *a, const void *b)
{
	uint64_t x = sample_total(a), y = sample_total(b);
	return x < y ? -1 : x > y;
}

static void summarise(struct rep_sample *s, unsigned n, struct case_result *res)
{
	memset(res, 0, sizeof(*res));
	res->taken_min = UINT64_MAX;
	for (unsigned i = 0; i < n; i++)
		if (s[i].taken < res->taken_min)
			res->taken_min = s[i].taken;
	qsort(s, n, sizeof(*s), cmp_total);
	res->min_ns = sample_total(&s[0]);
	res->max_ns = sample_total(&s[n - 1]);
	res->mid = s[(n - 1) / 2];
	uint64_t mid2 = sample_total(&s[n / 2]);
	res->median_us = ((double)sample_total(&res->mid) + (double)mid2) / 2.0 / 1000.0;
}

static const char *bname(enum tracker_backend b) { return tracker_backend_name(b); }

/* Sets up the VM for one case; -EOPNOTSUPP means the kernel lacks the backend. */
static int case_vm_new(const struct options *o, const struct bench_case *c, struct vm **ret)
{
	const struct vm_builtin_guest *g = vm_builtin_guest_find("touch");
	struct vm_error err = {{0}};
	struct ferry_param params[2];
	struct vm_config cfg;
	struct vm *vm = NULL;
	char kv[64];
	int r;

	if (!g) {
		fprintf(stderr, "tracker-bench: this build has no built-in guest 'touch'\n");
		return -ENOENT;
	}
	snprintf(kv, sizeof(kv), "wss=%llu", (unsigned long long)c->wss);
	r = vm_param_parse("touch", kv, &params[0], &err);
	if (r >= 0) {
		snprintf(kv, sizeof(kv), "stride=%llu", (unsigned long long)c->stride);
		r = vm_param_parse("touch", kv, &params[1], &err);
	}
	if (r < 0) {
		fprintf(stderr, "tracker-bench: touch parameter %s: %s\n", kv, err.msg);
		return r;
	}

	vm_config_init(&cfg, "tracker-bench");
	cfg.mem_size = c->mem;
	cfg.vcpus = c->vcpus;
	cfg.tracker.backend = c->backend;
	if (c->backend == TRACKER_RING)
		cfg.tracker.ring_entries = o->ring_entries;
	r = vm_new(&cfg, &vm, &err);
	if (r < 0) {
		if (r != -EOPNOTSUPP)
			fprintf(stderr, "tracker-bench: creating the VM: %s\n", err.msg);
		return r;
	}
	r = vm_load_flat(vm, g->image, g->size, params, 2, &err);
	if (r < 0) {
		fprintf(stderr, "tracker-bench: loading the touch guest: %s\n", err.msg);
		vm_free(vm);
		return r;
	}
	if (!vm_bootinfo(vm)) {
		fprintf(stderr, "tracker-bench: the touch guest has no boot info page\n");
		vm_free(vm);
		return -EINVAL;
	}
	*ret = vm;
	return 0;
}

/*
 * Runs one case: a fresh VM (so the stride, a load-time parameter, can differ and every case
 * starts from untouched memory), one untimed warm-up generation (first touches allocate
 * memory, which is not what we measure), then o->reps timed ones.
 */
static int run_case(const struct options *o, const struct bench_case *c, struct case_result *res)
{
	struct rep_sample *samples = calloc(o->reps, sizeof(*samples));
	struct vm *vm = NULL;
	int r;

	if (!samples)
		return -ENOMEM;
	r = case_vm_new(o, c, &vm);
	if (r < 0)
		goto out;
	struct tracker *t = vm_tracker(vm);
	r = tracker_start(t, false);
	if (r < 0) {
		fprintf(stderr, "tracker-bench: starting dirty tracking: %s\n", strerror(-r));
		goto out;
	}
	uint64_t gen = __atomic_load_n(&vm_bootinfo(vm)->host_gen, __ATOMIC_ACQUIRE);
	for (int rep = -1; rep < (int)o->reps; rep++) {
		/* Empty the set first, so the timed sync sees exactly one generation's writes. */
		int64_t d = drain(t);
		if (d < 0) {
			r = (int)d;
			fprintf(stderr, "tracker-bench: draining the dirty set: %s\n",
				strerror(-r));
			goto out;
		}
		uint64_t rf_ns0 = tracker_ring_full_ns(t);
		uint64_t rf_ex0 = tracker_ring_full_exits(t);
		r = run_generation(vm, c, o->ring_entries, ++gen);
		if (r < 0)
			goto out;
		struct rep_sample s = {0};
		s.ring_full_ns = tracker_ring_full_ns(t) - rf_ns0;
		s.ring_full_exits = tracker_ring_full_exits(t) - rf_ex0;
		r = timed_sync(t, &s);
		if (r < 0)
			goto out;
		if (rep >= 0)
			samples[rep] = s;
	}
	tracker_stop(t);
	summarise(samples, o->reps, res);
	r = 0;
out:
	vm_free(vm);
	free(samples);
	return r;
}

static void print_header(const struct options *o)
{
	if (o->csv) {
		printf("backend,guest_gib,vcpus,dirty_pct,sync_us\n");
	} else {
		printf("%-7s %5s %5s %6s %9s %11s %9s %9s %11s %9s %9s %8s\n", "backend", "GiB",
		       "vCPUs", "dirty%", "pages", "sync_us", "min_us", "max_us", "in_sync_us",
		       "take_us", "rfull_us", "rf_exits");
	}
	fflush(stdout);
}

static void print_row(const struct options *o, const struct bench_case *c,
		      const struct case_result *res)
{
	if (o->csv) {
		printf("%s,%g,%u,%g,%.1f\n", bname(c->backend), c->gib, c->vcpus, c->dirty_pct,
		       res->median_us);
	} else {
		const struct rep_sample *m = &res->mid;
		printf("%-7s %5g %5u %6g %9llu %11.1f %9.1f %9.1f %11.1f %9.1f %9.1f %8llu%s\n",
		       bname(c->backend), c->gib, c->vcpus, c->dirty_pct,
		       (unsigned long long)m->taken, res->median_us, (double)res->min_ns / 1e3,
		       (double)res->max_ns / 1e3, (double)m->sync_ns / 1e3,
		       (double)m->take_ns / 1e3, (double)m->ring_full_ns / 1e3,
		       (unsigned long long)m->ring_full_exits,
		       res->taken_min < c->expected ? "  WARNING: fewer pages than written" : "");
	}
	fflush(stdout);
}

int main(int argc, char **argv)
{
	struct options o;
	bool unavailable[TRACKER_LEGACY + 1] = {false};
	unsigned ncases, done = 0, ran = 0, failed = 0;

	if (parse_args(argc, argv, &o) < 0)
		return EXIT_USAGE;
	if (access("/dev/kvm", R_OK | W_OK) < 0) {
		fprintf(stderr, "tracker-bench: /dev/kvm: %s; this benchmark needs KVM\n",
			strerror(errno));
		return EXIT_SKIP;
	}
	ncases = o.nr_backends * o.nr_gib * o.nr_vcpus * o.nr_dirty;
	print_header(&o);
	uint64_t t_start = now_ns();
	/* Backend outermost, dirty fraction innermost, so each backend's rows read as one
	 * block; every case gets its own VM, so the order does not change the numbers. */
	for (unsigned i = 0; i < ncases; i++) {
		unsigned di = i % o.nr_dirty;
		unsigned vi = i / o.nr_dirty % o.nr_vcpus;
		unsigned gi = i / o.nr_dirty / o.nr_vcpus % o.nr_gib;
		unsigned bi = i / o.nr_dirty / o.nr_vcpus / o.nr_gib;
		struct bench_case c;
		struct case_result res;
		case_init(&c, o.backends[bi], o.gib[gi], o.vcpus[vi], o.dirty[di], o.wss);
		done++;
		if (unavailable[c.backend])
			continue;
		if ((uint64_t)c.vcpus * c.wss > c.mem - FERRY_FREE_GPA) {
			fprintf(stderr,
				"tracker-bench: %g GiB, %u vCPUs: --wss %llu does not fit (at most "
				"%llu bytes per vCPU); skipping\n",
				c.gib, c.vcpus, (unsigned long long)c.wss,
				(unsigned long long)((c.mem - FERRY_FREE_GPA) / c.vcpus));
			failed++;
			continue;
		}
		fprintf(
		    stderr,
		    "[%u/%u %.0fs] %s, %g GiB, %u vCPUs, %g%% dirty (stride %llu, %llu pages)...\n",
		    done, ncases, (double)(now_ns() - t_start) / 1e9, bname(c.backend), c.gib,
		    c.vcpus, c.dirty_pct, (unsigned long long)c.stride,
		    (unsigned long long)c.expected);
		int r = run_case(&o, &c, &res);
		if (r == -EOPNOTSUPP) {
			fprintf(stderr,
				"tracker-bench: this kernel has no %s backend; skipping it\n",
				bname(c.backend));
			unavailable[c.backend] = true;
			continue;
		}
		if (r < 0) {
			fprintf(stderr, "tracker-bench: case failed: %s\n", strerror(-r));
			failed++;
			continue;
		}
		ran++;
		if (res.taken_min < c.expected)
			fprintf(stderr,
				"tracker-bench: WARNING: %s %g GiB %u vCPUs %g%%: a sync took %llu "
				"pages, the guest wrote %llu\n",
				bname(c.backend), c.gib, c.vcpus, c.dirty_pct,
				(unsigned long long)res.taken_min, (unsigned long long)c.expected);
		print_row(&o, &c, &res);
	}
	fprintf(stderr, "tracker-bench: %u cases ran, %u failed, in %.0f s\n", ran, failed,
		(double)(now_ns() - t_start) / 1e9);
	if (failed)
		return 1;
	return ran ? 0 : EXIT_SKIP;
}
