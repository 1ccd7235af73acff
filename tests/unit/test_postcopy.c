// SPDX-License-Identifier: Apache-2.0
/*
 * Description: postcopy on the destination (agent/postcopy.c) with real KVM, in one
 * process. A 2-vCPU memcheck guest in two memslots runs two passes and is paused (the
 * "source"); its state moves into a second, guestless VM (the "destination") as in
 * test_state_move.c, but only part of its memory is copied up front: the rest is named with
 * postcopy_dst_discard and served while the destination runs — on demand, by a server
 * thread answering the fault thread's requests from the source's memory with
 * postcopy_dst_place, and in the background, by a pusher placing the rest in order (or by
 * the real TCP transport after xport_dst_set_uffd). memcheck verifies every page against
 * the previous pass, so more passes with zero errors prove every page arrived whole and in
 * time; every needed page ends up present, and faults were counted. Discard: stale copies
 * (corrupted here) and a page the source changed after the copy are re-fetched. Failure: a
 * source that never answers leaves vCPUs blocked in the kernel; postcopy_dst_fail pauses the
 * VM with the reason, and nothing hangs (a watchdog alarm kills the test if it does); freeing
 * before completion pauses it too. Without KVM: the transport's userfaultfd placement leaves
 * pages already present alone, fills missing ones and wakes a thread blocked on one.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/userfaultfd.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "testutil.h"
#include "tio.h"
#include "txport.h"

#include "agent/postcopy.h"
#include "transport/transport.h"

#define PAGE 4096u
#define MIB (1ull << 20)
#define PC_MEM (16 * MIB)
#define PC_SLOT (8 * MIB) /* two memslots */
#define PC_VCPUS 2u
#define PASS_TIMEOUT_MS 120000
/* Copy up front the first half of every 64-page block; the second half comes later. */
#define BLOCK 64u
#define WATCHDOG_S 240u

static const uint8_t token[XPORT_TOKEN_LEN] = "postcopy-test-tk";

static bool bit(const uint64_t *map, uint64_t i) { return (map[i / 64] >> (i % 64)) & 1; }

/* ---------------- the source, the destination, the up-front copy ---------------- */

struct pair {
	struct vm *src, *dst;
	void *blob;
	size_t blob_len;
	uint64_t at_pause[PC_VCPUS];
	unsigned nr_slots;
	uint64_t *need[4]; /* per slot: pages not copied up front */
	uint64_t pages[4];
};

/* The source runs memcheck for two passes and is paused; the destination is created. */
static void pair_setup(struct pair *p, const char *name)
{
	static const char *const params[] = {"wss=2M", NULL};
	struct vm_config cfg;
	char n[VM_NAME_MAX];

	memset(p, 0, sizeof(*p));
	snprintf(n, sizeof(n), "%s-src", name);
	vm_config_init(&cfg, n);
	cfg.mem_size = PC_MEM;
	cfg.vcpus = PC_VCPUS;
	cfg.slot_size = PC_SLOT;
	cfg.tracker.backend = TRACKER_AUTO;
	p->src = tu_vm_builtin_cfg(&cfg, "memcheck", params);
	assert_int_equal(vm_start(p->src), 0);
	int r = tu_wait_passes(p->src, 2, PASS_TIMEOUT_MS);
	if (r < 0 || vm_state(p->src) == VM_FAILED) {
		tu_dump_console(p->src);
		fail_msg("source did not make 2 passes: %d, %s", r, vm_failure(p->src));
	}
	assert_int_equal(vm_pause(p->src), 0);
	for (unsigned i = 0; i < PC_VCPUS; i++) {
		struct vm_vcpu_stats s;
		vm_vcpu_stats(p->src, i, &s);
		p->at_pause[i] = s.passes;
	}
	struct vm_error err = {{0}};
	r = vm_state_save(p->src, &p->blob, &p->blob_len, &err);
	if (r < 0)
		fail_msg("vm_state_save: %s (%s)", strerror(-r), err.msg);

	const struct vm_config *sc = vm_config(p->src);
	snprintf(n, sizeof(n), "%s-dst", name);
	vm_config_init(&cfg, n);
	cfg.mem_size = sc->mem_size;
	cfg.vcpus = sc->vcpus;
	cfg.slot_size = sc->slot_size;
	cfg.irqchip = sc->irqchip;
	cfg.tracker = sc->tracker;
	r = vm_new(&cfg, &p->dst, &err);
	if (r < 0)
		fail_msg("vm_new: %s (%s)", strerror(-r), err.msg);
	p->nr_slots = vm_nr_slots(p->dst);
	assert_int_equal(p->nr_slots, vm_nr_slots(p->src));
	assert_true(p->nr_slots >= 2 && p->nr_slots <= 4);
	for (unsigned i = 0; i < p->nr_slots; i++) {
		p->pages[i] = vm_slot(p->dst, i)->size / PAGE;
		p->need[i] = calloc((p->pages[i] + 63) / 64, sizeof(uint64_t));
		assert_non_null(p->need[i]);
	}
}

/*
 * What precopy would have left: page pg of slot i copied if keep(i, pg) — a zero page as a
 * hole, as the TCP receivers leave it — else marked needed.
 */
static void pair_copy(struct pair *p, bool (*keep)(unsigned slot, uint64_t page))
{
	for (unsigned i = 0; i < p->nr_slots; i++) {
		const struct vm_slot *a = vm_slot(p->src, i), *b = vm_slot(p->dst, i);
		for (uint64_t pg = 0; pg < p->pages[i]; pg++) {
			const uint8_t *sp = (const uint8_t *)a->hva + pg * PAGE;
			off_t off = (off_t)(pg * PAGE);
			if (!keep(i, pg)) {
				p->need[i][pg / 64] |= 1ull << (pg % 64);
				continue;
			}
			if (tio_page_zero(sp))
				assert_int_equal(
				    fallocate(b->memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
					      off, PAGE),
				    0);
			else
				assert_int_equal(pwrite(b->memfd, sp, PAGE, off), PAGE);
		}
	}
}

static bool keep_first_half(unsigned slot, uint64_t page)
{
	(void)slot;
	return page % BLOCK < BLOCK / 2;
}

static bool keep_all(unsigned slot, uint64_t page)
{
	(void)slot;
	(void)page;
	return true;
}

static bool keep_none(unsigned slot, uint64_t page)
{
	(void)slot;
	(void)page;
	return false;
}

static void pair_discard(struct pair *p, struct postcopy_dst *d)
{
	for (unsigned i = 0; i < p->nr_slots; i++)
		assert_int_equal(postcopy_dst_discard(d, i, p->need[i], p->pages[i]), 0);
}

static void pair_restore_and_start(struct pair *p)
{
	struct vm_error err = {{0}};
	int r = vm_state_restore(p->dst, p->blob, p->blob_len, &err);
	if (r < 0)
		fail_msg("vm_state_restore: %s (%s)", strerror(-r), err.msg);
	assert_int_equal(vm_start(p->dst), 0);
}

static void pair_free(struct pair *p)
{
	vm_free(p->dst);
	vm_free(p->src);
	free(p->blob);
	for (unsigned i = 0; i < p->nr_slots; i++)
		free(p->need[i]);
}

/* ---------------- serving pages from the source's memory ---------------- */

/* Places pages [first, first + n) of slot from the (paused) source, zero pages as such. */
static int place_from_src(struct postcopy_dst *d, struct vm *src, uint32_t slot, uint64_t first,
			  uint32_t n)
{
	const uint8_t *base = vm_slot(src, slot)->hva;
	uint64_t mask[(BLOCK * 4 + 63) / 64] = {0};
	uint8_t *buf = aligned_alloc(PAGE, (size_t)n * PAGE);
	size_t at = 0;

	assert_true(n <= BLOCK * 4);
	assert_non_null(buf);
	for (uint32_t i = 0; i < n; i++) {
		const uint8_t *sp = base + (first + i) * PAGE;
		if (tio_page_zero(sp)) {
			mask[i / 64] |= 1ull << (i % 64);
			continue;
		}
		memcpy(buf + at, sp, PAGE);
		at += PAGE;
	}
	int r = postcopy_dst_place(d, slot, first, n, buf, mask);
	free(buf);
	return r;
}

#define QUEUE 4096u

/* The source's side of PAGE_REQ: a queue the fault thread fills, a thread serving it. */
struct server {
	struct postcopy_dst *d;
	struct vm *src;
	pthread_t thread;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	struct {
		uint32_t slot;
		uint64_t first;
		uint32_t n;
	} q[QUEUE];
	unsigned head, tail;
	bool stop;
	bool mute; /* never answers: the source is gone */
	atomic_uint_fast64_t asked, served, errors;
};

static int server_request(void *arg, uint32_t slot, uint64_t first, uint32_t n)
{
	struct server *s = arg;
	int r = 0;

	atomic_fetch_add(&s->asked, 1);
	pthread_mutex_lock(&s->lock);
	if (s->tail - s->head == QUEUE) {
		r = -EAGAIN;
	} else {
		s->q[s->tail % QUEUE].slot = slot;
		s->q[s->tail % QUEUE].first = first;
		s->q[s->tail % QUEUE].n = n;
		s->tail++;
		pthread_cond_signal(&s->cond);
	}
	pthread_mutex_unlock(&s->lock);
	return r;
}

static void *server_main(void *arg)
{
	struct server *s = arg;

	pthread_mutex_lock(&s->lock);
	for (;;) {
		while (!s->stop && (s->mute || s->head == s->tail))
			pthread_cond_wait(&s->cond, &s->lock);
		if (s->stop)
			break;
		uint32_t slot = s->q[s->head % QUEUE].slot;
		uint64_t first = s->q[s->head % QUEUE].first;
		uint32_t n = s->q[s->head % QUEUE].n;
		s->head++;
		pthread_mutex_unlock(&s->lock);
		if (place_from_src(s->d, s->src, slot, first, n) < 0)
			atomic_fetch_add(&s->errors, 1);
		else
			atomic_fetch_add(&s->served, 1);
		pthread_mutex_lock(&s->lock);
	}
	pthread_mutex_unlock(&s->lock);
	return NULL;
}

static void server_init(struct server *s, struct vm *src, bool mute)
{
	memset(s, 0, sizeof(*s));
	s->src = src;
	s->mute = mute;
	pthread_mutex_init(&s->lock, NULL);
	pthread_cond_init(&s->cond, NULL);
}

static void server_start(struct server *s, struct postcopy_dst *d)
{
	s->d = d;
	assert_int_equal(pthread_create(&s->thread, NULL, server_main, s), 0);
}

static void server_stop(struct server *s)
{
	pthread_mutex_lock(&s->lock);
	s->stop = true;
	pthread_cond_broadcast(&s->cond);
	pthread_mutex_unlock(&s->lock);
	pthread_join(s->thread, NULL);
	pthread_mutex_destroy(&s->lock);
	pthread_cond_destroy(&s->cond);
}

static struct postcopy_dst *pc_new(struct vm *dst, struct server *s, uint32_t prefetch)
{
	struct postcopy_dst_config cfg = {
	    .request = server_request, .arg = s, .prefetch_pages = prefetch};
	struct postcopy_dst *d = NULL;
	char err[256] = "";
	int r = postcopy_dst_new(dst, &cfg, &d, err, sizeof(err));
	if (r == -EPERM)
		fail_msg("postcopy_dst_new: %s (run as root or allow userfaultfd)", err);
	if (r < 0)
		fail_msg("postcopy_dst_new: %s (%s)", strerror(-r), err);
	return d;
}

/* The background push: every needed page, in order, a run at a time, once started. */
struct pusher {
	struct pair *p;
	struct postcopy_dst *d;
	pthread_t thread;
	unsigned delay_ms;   /* before the first page: let the guest fault first */
	unsigned per_run_ms; /* between runs */
	atomic_bool done;
	int err;
};

static void *pusher_main(void *arg)
{
	struct pusher *u = arg;

	tio_sleep_ms(u->delay_ms);
	for (unsigned i = 0; i < u->p->nr_slots && !u->err; i++) {
		for (uint64_t pg = 0; pg < u->p->pages[i] && !u->err;) {
			if (!bit(u->p->need[i], pg)) {
				pg++;
				continue;
			}
			uint64_t e = pg + 1;
			while (e < u->p->pages[i] && e - pg < BLOCK && bit(u->p->need[i], e))
				e++;
			int r = place_from_src(u->d, u->p->src, i, pg, (uint32_t)(e - pg));
			if (r < 0)
				u->err = r;
			pg = e;
			if (u->per_run_ms)
				tio_sleep_ms(u->per_run_ms);
		}
	}
	atomic_store(&u->done, true);
	return NULL;
}

/* ---------------- checks ---------------- */

struct target {
	uint64_t want[PC_VCPUS];
};

static bool passes_beyond(struct vm *vm, void *arg)
{
	const struct target *t = arg;
	struct vm_vcpu_stats total;

	vm_stats_total(vm, &total);
	if (vm_state(vm) == VM_FAILED || total.errors)
		return true;
	for (unsigned i = 0; i < PC_VCPUS; i++) {
		struct vm_vcpu_stats s;
		vm_vcpu_stats(vm, i, &s);
		if (s.passes < t->want[i])
			return false;
	}
	return true;
}

/* memcheck goes on from where it was for `more` passes, without an error. */
static void expect_passes(struct pair *p, uint64_t more)
{
	struct target t;
	for (unsigned i = 0; i < PC_VCPUS; i++)
		t.want[i] = p->at_pause[i] + more;
	uint64_t t0 = tu_now_ns();
	int r = vm_wait(p->dst, passes_beyond, &t, PASS_TIMEOUT_MS);
	struct vm_vcpu_stats total;
	vm_stats_total(p->dst, &total);
	if (r < 0 || total.errors || vm_state(p->dst) == VM_FAILED)
		tu_dump_console(p->dst);
	assert_int_equal(r, 0);
	assert_int_not_equal(vm_state(p->dst), VM_FAILED);
	assert_int_equal(total.errors, 0);
	assert_int_equal(total.ready, 0); /* went on, did not start over */
	print_message("  %" PRIu64 " more passes in %.2fs\n", more,
		      (double)(tu_now_ns() - t0) / 1e9);
}

/* memcheck makes `more` passes from where it is now, without an error. */
static void expect_more_passes(struct pair *p, uint64_t more)
{
	uint64_t saved[PC_VCPUS];

	memcpy(saved, p->at_pause, sizeof(saved));
	for (unsigned i = 0; i < PC_VCPUS; i++) {
		struct vm_vcpu_stats s;
		vm_vcpu_stats(p->dst, i, &s);
		p->at_pause[i] = s.passes;
	}
	expect_passes(p, more);
	memcpy(p->at_pause, saved, sizeof(saved));
}

static void print_stats(struct postcopy_dst *d, const char *what)
{
	struct postcopy_dst_stats st;

	postcopy_dst_stats(d, &st);
	print_message("  %s: faults %" PRIu64 " (pages waited %" PRIu64 ", zero fills %" PRIu64
		      "), requests %" PRIu64 " for %" PRIu64 " pages (errors %" PRIu64
		      "), placed %" PRIu64 ", already there %" PRIu64 ", needed %" PRIu64
		      ", missing %" PRIu64 ", released %" PRIu64 ", wait avg %.1f us max %.1f us"
		      " over %" PRIu64 "\n",
		      what, st.faults, st.fault_pages, st.zero_fills, st.requests,
		      st.pages_requested, st.request_errors, st.pages_placed, st.pages_existing,
		      st.pages_needed, st.pages_missing, st.pages_released,
		      st.faults_resolved ? (double)st.fault_wait_sum_ns / st.faults_resolved / 1e3
					 : 0,
		      (double)st.fault_wait_max_ns / 1e3, st.faults_resolved);
}

static void wait_complete(struct postcopy_dst *d, int timeout_ms)
{
	uint64_t t0 = tu_now_ns();
	while (!postcopy_dst_complete(d)) {
		if (tu_now_ns() - t0 > (uint64_t)timeout_ms * 1000000ull)
			fail_msg("postcopy not complete: %" PRIu64 " pages missing",
				 postcopy_dst_remaining(d));
		tio_sleep_ms(10);
	}
}

/* Whether the destination's memfd holds page pg of slot (without faulting). */
static bool dst_resident(struct vm *vm, unsigned slot, uint64_t pg)
{
	unsigned char v = 0;

	assert_int_equal(mincore((uint8_t *)vm_slot(vm, slot)->hva + pg * PAGE, PAGE, &v), 0);
	return v & 1;
}

/* ---------------- tests ---------------- */

/*
 * Half the memory up front, the other half on demand (server) and in the background
 * (pusher, started late and slow so the guest faults first).
 */
static void test_on_demand(void **state)
{
	(void)state;
	struct pair p;
	struct server s;

	alarm(WATCHDOG_S);
	pair_setup(&p, "pc-demand");
	pair_copy(&p, keep_first_half);
	server_init(&s, p.src, false);
	struct postcopy_dst *d = pc_new(p.dst, &s, 7);
	server_start(&s, d);
	pair_discard(&p, d);
	uint64_t need0 = postcopy_dst_remaining(d);
	assert_int_equal(need0, PC_MEM / PAGE / 2);
	pair_restore_and_start(&p);

	/* A page that was a zero page at the copy (above memcheck's 8 MiB), kept as a hole:
	 * current here, so a fault on it is served locally, with zeros. */
	const uint8_t *z = vm_gpa_to_hva(p.dst, 12 * MIB, PAGE);
	assert_non_null(z);
	assert_true(tio_page_zero(z));

	struct pusher u = {.p = &p, .d = d, .delay_ms = 1500, .per_run_ms = 5};
	assert_int_equal(pthread_create(&u.thread, NULL, pusher_main, &u), 0);
	expect_passes(&p, 2);
	pthread_join(u.thread, NULL);
	assert_int_equal(u.err, 0);
	wait_complete(d, 30000);
	print_stats(d, "on demand");

	struct postcopy_dst_stats st;
	postcopy_dst_stats(d, &st);
	assert_true(st.faults > 0);
	assert_true(st.fault_pages > 0);
	assert_true(st.requests > 0);
	assert_true(st.zero_fills >= 1);
	assert_int_equal(st.request_errors, 0);
	assert_int_equal(st.pages_missing, 0);
	assert_true(st.pages_placed + st.pages_existing >= need0);
	assert_int_equal(atomic_load(&s.errors), 0);
	assert_string_equal(postcopy_dst_failure(d), "");
	/* Every page is here: memcheck goes on without a fault. */
	postcopy_dst_stats(d, &st);
	uint64_t faults = st.faults;
	expect_more_passes(&p, 2);
	postcopy_dst_stats(d, &st);
	assert_int_equal(st.faults, faults);

	assert_int_equal(vm_pause(p.dst), 0);
	postcopy_dst_free(d);
	server_stop(&s);
	/* Unregistered and complete: the VM runs on as any other. */
	assert_int_equal(vm_resume(p.dst), 0);
	expect_more_passes(&p, 2);
	assert_int_equal(vm_pause(p.dst), 0);
	pair_free(&p);
	alarm(0);
}

/* ---- the same over the real TCP transport ---- */

/* Connects `streams` data streams from src_fds to dst, playing the agent's part. */
static struct xport_src *connect_streams(unsigned streams, const int *fds, const uint64_t *sizes,
					 unsigned nr, struct xport_dst *dst, uint64_t bw)
{
	struct xport_src_config cfg = {.streams = streams, .bandwidth = bw};
	return tx_src_open(&cfg, token, fds, sizes, nr, dst);
}

/* Runs of pages of every slot whose bit in map is (want) set, at most BLOCK pages each. */
static unsigned runs_of(struct pair *p, bool want_needed, struct page_run *runs, unsigned cap)
{
	unsigned n = 0;

	for (unsigned i = 0; i < p->nr_slots; i++) {
		for (uint64_t pg = 0; pg < p->pages[i];) {
			if (bit(p->need[i], pg) != want_needed) {
				pg++;
				continue;
			}
			uint64_t e = pg + 1;
			while (e < p->pages[i] && e - pg < BLOCK &&
			       bit(p->need[i], e) == want_needed)
				e++;
			assert_true(n < cap);
			runs[n++] = (struct page_run){
			    .region = i, .first_page = pg, .npages = (uint32_t)(e - pg)};
			pg = e;
		}
	}
	return n;
}

struct bg_send {
	struct xport_src *x;
	struct page_run *runs;
	unsigned n;
	uint64_t fence;
	int r;
};

static void *bg_send_main(void *arg)
{
	struct bg_send *b = arg;

	b->r = xport_src_send(b->x, b->runs, b->n, b->fence);
	return NULL;
}

/*
 * The engine's shape: precopy over TCP through the memfds (half the pages, fence 1), then
 * postcopy: register, discard, switch the receivers to userfaultfd placement, start the VM,
 * push the rest over the same streams (bandwidth-capped, so the guest faults meanwhile),
 * serve faults from the "control channel" (the server), wait for the last fence. Pages that
 * came over TCP are counted present without this module having seen them (mincore).
 */
static void test_over_tcp(void **state)
{
	(void)state;
	struct pair p;
	struct server s;
	enum { STREAMS = 2 };

	alarm(WATCHDOG_S);
	pair_setup(&p, "pc-tcp");
	for (unsigned i = 0; i < p.nr_slots; i++)
		for (uint64_t pg = 0; pg < p.pages[i]; pg++)
			if (!keep_first_half(i, pg))
				p.need[i][pg / 64] |= 1ull << (pg % 64);

	struct xport_region regions[4];
	int src_fds[4];
	uint64_t sizes[4];
	for (unsigned i = 0; i < p.nr_slots; i++) {
		regions[i] = (struct xport_region){.hva = vm_slot(p.dst, i)->hva,
						   .size = vm_slot(p.dst, i)->size,
						   .has_fd = true,
						   .fd = vm_slot(p.dst, i)->memfd};
		src_fds[i] = vm_slot(p.src, i)->memfd;
		sizes[i] = vm_slot(p.src, i)->size;
	}
	struct xport_dst *xd = NULL;
	assert_int_equal(xport_dst_tcp_new(regions, p.nr_slots, STREAMS, &xd), 0);
	struct xport_src *xs = connect_streams(STREAMS, src_fds, sizes, p.nr_slots, xd, 0);

	static struct page_run runs[1024];
	unsigned n = runs_of(&p, false, runs, 1024);
	assert_int_equal(xport_src_send(xs, runs, n, 1), 0);
	assert_int_equal(xport_dst_wait_fence(xd, 1, 30000), 0);

	server_init(&s, p.src, false);
	struct postcopy_dst *d = pc_new(p.dst, &s, 0);
	server_start(&s, d);
	pair_discard(&p, d);
	for (unsigned i = 0; i < p.nr_slots; i++)
		assert_int_equal(xport_dst_set_uffd(xd, i, postcopy_dst_uffd(d)), 0);
	assert_int_equal(xport_dst_set_uffd(xd, 0, postcopy_dst_uffd(d)), -EALREADY);
	uint64_t need0 = postcopy_dst_remaining(d);
	assert_int_equal(need0, PC_MEM / PAGE / 2);
	pair_restore_and_start(&p);

	/* 8 MiB of pages at 4 MiB/s: about two seconds of postcopy. */
	xport_src_set_bandwidth(xs, 4 * MIB);
	struct bg_send b = {.x = xs, .fence = 2};
	b.runs = calloc(1024, sizeof(*b.runs));
	assert_non_null(b.runs);
	b.n = runs_of(&p, true, b.runs, 1024);
	pthread_t t;
	assert_int_equal(pthread_create(&t, NULL, bg_send_main, &b), 0);
	expect_passes(&p, 2);
	pthread_join(t, NULL);
	assert_int_equal(b.r, 0);
	assert_int_equal(xport_dst_wait_fence(xd, 2, 30000), 0);
	assert_true(postcopy_dst_complete(d));
	print_stats(d, "over tcp");

	struct postcopy_dst_stats st;
	postcopy_dst_stats(d, &st);
	struct xport_dst_stats xst;
	xport_dst_stats(xd, &xst);
	print_message("  transport: %" PRIu64 " pages, %" PRIu64 " zero pages received\n",
		      xst.pages, xst.zero_pages);
	assert_true(st.faults > 0);
	assert_true(st.requests > 0);
	assert_int_equal(st.pages_missing, 0);
	assert_string_equal(xport_dst_error(xd), "");
	expect_more_passes(&p, 2);

	assert_int_equal(vm_pause(p.dst), 0);
	xport_src_free(xs);
	xport_dst_free(xd);
	postcopy_dst_free(d);
	server_stop(&s);
	free(b.runs);
	pair_free(&p);
	alarm(0);
}

/*
 * Discard: everything is copied up front, then 16 of memcheck's pages are made stale here
 * (corrupted) and a page the guest never uses is changed on the source; naming them in the
 * discard bitmap must drop the stale copies, so the guest gets the source's versions. One
 * named run starts with two holes here and ends with a stale copy: discard punches only
 * where the memfd holds data, and must still find that copy behind the holes.
 */
static void test_discard(void **state)
{
	(void)state;
	struct pair p;
	struct server s;
	/* memcheck's region of vCPU 0: 2 MiB from FERRY_FREE_GPA, in slot 0. */
	const uint64_t first_mc = FERRY_FREE_GPA / PAGE;
	const uint64_t changed = 12 * MIB / PAGE - PC_SLOT / PAGE; /* slot 1 */

	alarm(WATCHDOG_S);
	pair_setup(&p, "pc-discard");
	pair_copy(&p, keep_all);
	for (unsigned k = 0; k < 16; k++) {
		uint64_t pg = first_mc + 7 + k * 31;
		uint8_t *dp = (uint8_t *)vm_slot(p.dst, 0)->hva + pg * PAGE;
		dp[100] ^= 0x5a; /* a stale copy */
		p.need[0][pg / 64] |= 1ull << (pg % 64);
	}
	const uint64_t holes = first_mc + 500; /* holes, holes + 1: holes; holes + 2: stale */
	assert_int_equal(fallocate(vm_slot(p.dst, 0)->memfd, FALLOC_FL_PUNCH_HOLE |
				   FALLOC_FL_KEEP_SIZE, (off_t)(holes * PAGE), 2 * PAGE), 0);
	((uint8_t *)vm_slot(p.dst, 0)->hva)[(holes + 2) * PAGE + 8] ^= 0x5a;
	for (uint64_t pg = holes; pg < holes + 3; pg++)
		p.need[0][pg / 64] |= 1ull << (pg % 64);
	uint8_t *sp = (uint8_t *)vm_slot(p.src, 1)->hva + changed * PAGE;
	assert_true(tio_page_zero(sp));
	memset(sp, 0xc3, PAGE); /* changed on the source after the copy */
	p.need[1][changed / 64] |= 1ull << (changed % 64);

	server_init(&s, p.src, false);
	struct postcopy_dst *d = pc_new(p.dst, &s, 0);
	server_start(&s, d);
	assert_true(dst_resident(p.dst, 0, first_mc + 7));
	assert_true(dst_resident(p.dst, 0, holes + 2));
	pair_discard(&p, d);
	assert_false(dst_resident(p.dst, 0, first_mc + 7)); /* the stale copy is gone */
	assert_false(dst_resident(p.dst, 1, changed));
	assert_false(dst_resident(p.dst, 0, holes + 2)); /* found behind the holes */
	assert_true(dst_resident(p.dst, 0, first_mc + 8)); /* its neighbour stays */
	assert_true(dst_resident(p.dst, 0, holes + 3));
	assert_int_equal(postcopy_dst_remaining(d), 20);
	assert_int_equal(postcopy_dst_discard(d, 0, p.need[0], p.pages[0] + 1), -EINVAL);
	pair_restore_and_start(&p);
	assert_int_equal(postcopy_dst_discard(d, 0, p.need[0], p.pages[0]), -EBUSY);

	/* This thread reads the changed page: it faults, and the source's version arrives. */
	const uint8_t *dp = (const uint8_t *)vm_slot(p.dst, 1)->hva + changed * PAGE;
	for (unsigned i = 0; i < PAGE; i++)
		if (dp[i] != 0xc3)
			fail_msg("byte %u of the changed page is %#x", i, dp[i]);
	expect_passes(&p, 2); /* memcheck touched (and verified) every re-fetched page */
	assert_true(postcopy_dst_complete(d));
	print_stats(d, "discard");
	struct postcopy_dst_stats st;
	postcopy_dst_stats(d, &st);
	assert_int_equal(st.pages_needed, 20);
	assert_int_equal(st.fault_pages, 20); /* each re-fetched page waited once */

	assert_int_equal(vm_pause(p.dst), 0);
	postcopy_dst_free(d);
	server_stop(&s);
	pair_free(&p);
	alarm(0);
}

/* The source never answers; the connection is declared lost. Nothing may hang. */
static void test_source_lost(void **state)
{
	(void)state;
	struct pair p;
	struct server s;

	alarm(90);
	pair_setup(&p, "pc-lost");
	pair_copy(&p, keep_none);
	server_init(&s, p.src, true);
	struct postcopy_dst *d = pc_new(p.dst, &s, 0);
	server_start(&s, d);
	pair_discard(&p, d);
	pair_restore_and_start(&p);

	/* The first instruction fetch faults and waits for a page that never comes. */
	uint64_t t0 = tu_now_ns();
	struct postcopy_dst_stats st;
	do {
		tio_sleep_ms(10);
		postcopy_dst_stats(d, &st);
	} while (st.faults < PC_VCPUS && tu_now_ns() - t0 < 10000000000ull);
	assert_true(st.faults >= 1);
	assert_true(atomic_load(&s.asked) >= 1);
	tio_sleep_ms(300);
	struct vm_vcpu_stats tot;
	vm_stats_total(p.dst, &tot);
	assert_int_equal(tot.passes, 0);
	assert_int_equal(vm_state(p.dst), VM_RUNNING);

	t0 = tu_now_ns();
	assert_int_equal(postcopy_dst_fail(d, "source 10.0.0.1:7070: connection closed"), 0);
	print_message("  postcopy_dst_fail paused the VM in %.1f ms: %s\n",
		      (double)(tu_now_ns() - t0) / 1e6, postcopy_dst_failure(d));
	assert_int_equal(vm_state(p.dst), VM_PAUSED);
	assert_non_null(strstr(postcopy_dst_failure(d), "connection closed"));
	assert_int_equal(postcopy_dst_fail(d, "second reason"), 0); /* idempotent, first stays */
	assert_non_null(strstr(postcopy_dst_failure(d), "connection closed"));
	assert_int_equal(place_from_src(d, p.src, 0, 0, 1), -ECANCELED);
	print_stats(d, "source lost");

	postcopy_dst_free(d);
	server_stop(&s);
	assert_int_equal(vm_state(p.dst), VM_PAUSED);
	pair_free(&p); /* vm_free joins the vCPU threads: none is stuck */
	alarm(0);
}

/* Freeing before every page arrived pauses the VM rather than letting it read zeros. */
static void test_free_early(void **state)
{
	(void)state;
	struct pair p;
	struct server s;

	alarm(90);
	pair_setup(&p, "pc-early");
	pair_copy(&p, keep_none);
	server_init(&s, p.src, true);
	struct postcopy_dst *d = pc_new(p.dst, &s, 0);
	server_start(&s, d);
	pair_discard(&p, d);
	pair_restore_and_start(&p);
	uint64_t t0 = tu_now_ns();
	struct postcopy_dst_stats st;
	do {
		tio_sleep_ms(10);
		postcopy_dst_stats(d, &st);
	} while (st.faults < 1 && tu_now_ns() - t0 < 10000000000ull);
	assert_true(st.faults >= 1);
	postcopy_dst_free(d);
	server_stop(&s);
	assert_int_equal(vm_state(p.dst), VM_PAUSED);
	pair_free(&p);
	alarm(0);
}

/* ---- the transport's placement, without KVM ---- */

struct reader {
	const volatile uint8_t *addr;
	uint8_t seen;
	atomic_bool done;
};

static void *reader_main(void *arg)
{
	struct reader *r = arg;

	r->seen = r->addr[5]; /* blocks in a MISSING fault until the page is placed */
	atomic_store(&r->done, true);
	return NULL;
}

static void test_transport_places(void **state)
{
	(void)state;
	enum { PAGES = 8 };
	alarm(60);

	/* Source memory: page i filled with 0x10 + i; page 3 zero. */
	int sfd = memfd_create("pc-src", MFD_CLOEXEC);
	assert_true(sfd >= 0);
	assert_int_equal(ftruncate(sfd, PAGES * PAGE), 0);
	uint8_t *sm = mmap(NULL, PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, sfd, 0);
	assert_true(sm != MAP_FAILED);
	for (unsigned i = 0; i < PAGES; i++)
		memset(sm + i * PAGE, i == 3 ? 0 : 0x10 + i, PAGE);

	/* Destination: page 0 already here with other contents (the guest wrote it). */
	int dfd = memfd_create("pc-dst", MFD_CLOEXEC);
	assert_true(dfd >= 0);
	assert_int_equal(ftruncate(dfd, PAGES * PAGE), 0);
	uint8_t *dm = mmap(NULL, PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, dfd, 0);
	assert_true(dm != MAP_FAILED);
	memset(dm, 0xee, PAGE);

	int uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	assert_true(uffd >= 0);
	struct uffdio_api api = {.api = UFFD_API};
	assert_int_equal(ioctl(uffd, UFFDIO_API, &api), 0);
	struct uffdio_register reg = {.range = {.start = (uintptr_t)dm, .len = PAGES * PAGE},
				      .mode = UFFDIO_REGISTER_MODE_MISSING};
	assert_int_equal(ioctl(uffd, UFFDIO_REGISTER, &reg), 0);

	struct xport_region region = {.hva = dm, .size = PAGES * PAGE, .has_fd = true, .fd = dfd};
	struct xport_dst *xd = NULL;
	assert_int_equal(xport_dst_tcp_new(&region, 1, 1, &xd), 0);
	assert_int_equal(xport_dst_set_uffd(xd, 1, uffd), -EINVAL);
	assert_int_equal(xport_dst_set_uffd(xd, 0, -1), -EINVAL);
	assert_int_equal(xport_dst_set_uffd(xd, 0, uffd), 0);
	uint64_t size = PAGES * PAGE;
	struct xport_src *xs = connect_streams(1, &sfd, &size, 1, xd, 0);

	/* A thread blocked on page 6, which only the transport will bring. */
	struct reader rd = {.addr = dm + 6 * PAGE};
	pthread_t t;
	assert_int_equal(pthread_create(&t, NULL, reader_main, &rd), 0);
	tio_sleep_ms(100);
	assert_false(atomic_load(&rd.done));

	struct page_run run = {.region = 0, .first_page = 0, .npages = PAGES};
	assert_int_equal(xport_src_send(xs, &run, 1, 1), 0);
	assert_int_equal(xport_dst_wait_fence(xd, 1, 10000), 0);
	pthread_join(t, NULL);
	assert_int_equal(rd.seen, 0x16);
	assert_string_equal(xport_dst_error(xd), "");
	for (unsigned i = 0; i < PAGES; i++) {
		uint8_t want = i == 0 ? 0xee : i == 3 ? 0 : (uint8_t)(0x10 + i);
		for (unsigned b = 0; b < PAGE; b += 511)
			if (dm[i * PAGE + b] != want)
				fail_msg("page %u byte %u: %#x, want %#x", i, b, dm[i * PAGE + b],
					 want);
	}
	/* A second batch over present pages changes nothing (the guest's pages win). */
	memset(sm, 0x77, PAGES * PAGE);
	assert_int_equal(xport_src_send(xs, &run, 1, 2), 0);
	assert_int_equal(xport_dst_wait_fence(xd, 2, 10000), 0);
	assert_int_equal(dm[PAGE + 9], 0x11);
	assert_int_equal(dm[0], 0xee);

	xport_src_free(xs);
	xport_dst_free(xd);
	close(uffd);
	munmap(dm, PAGES * PAGE);
	munmap(sm, PAGES * PAGE);
	close(dfd);
	close(sfd);
	alarm(0);
}

int main(void)
{
	tu_require_kvm();
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_transport_places), cmocka_unit_test(test_on_demand),
	    cmocka_unit_test(test_over_tcp),	     cmocka_unit_test(test_discard),
	    cmocka_unit_test(test_source_lost),	     cmocka_unit_test(test_free_early),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
