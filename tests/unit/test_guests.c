// SPDX-License-Identifier: Apache-2.0
/*
 * Description: the built-in guests on real KVM. memcheck runs clean passes on 2 vCPUs, and
 * (the negative controls that prove the oracle can fail) reports a flipped body byte as a
 * checksum error, two swapped pages as page-number errors and a page put back to an older
 * version as a generation error, at the right addresses, then heals; mass damage gets 16
 * reports and a console count. The dirtier keeps to its page rate by sleeping, its random
 * pattern covers the region and its hot/cold pattern stays in the hot part when told to.
 * touch writes exactly one byte per stride-th page per host generation and, per the
 * tracker, dirties nothing but those pages and its stack. Bad parameters (wss beyond
 * memory, unknown keys or values that bypass the host-side parser) come back as
 * FERRY_ERR_PARAM reports.
 */
#include "testutil.h"

#include <errno.h>
#include <string.h>
#include <unistd.h>

#define MIB (1ull << 20)
#define PAGE 4096ull

/* ---- helpers ---- */

static void check_wait(struct vm *vm, int r, const char *what)
{
	if (r == 0 && vm_state(vm) != VM_FAILED)
		return;
	tu_dump_console(vm);
	fail_msg("%s: %s (vm state %s, failure \"%s\")", what, r ? "timed out" : "vm failed",
		 vm_run_state_name(vm_state(vm)), vm_failure(vm));
}

/* Counts kept error records (the first VM_ERRORS_KEPT), so the records can be read as soon
 * as the wait ends. */
static bool errors_at_least(struct vm *vm, void *arg)
{
	struct vm_guest_error e[VM_ERRORS_KEPT];
	return vm_guest_errors(vm, e, VM_ERRORS_KEPT) >= *(uint64_t *)arg ||
	       vm_state(vm) == VM_FAILED;
}

static bool done_gen_reached(struct vm *vm, void *arg)
{
	for (unsigned i = 0; i < vm_config(vm)->vcpus; i++) {
		struct vm_vcpu_stats s;
		vm_vcpu_stats(vm, i, &s);
		if (s.done_gen < *(uint64_t *)arg)
			return vm_state(vm) == VM_FAILED;
	}
	return true;
}

static bool console_has(struct vm *vm, const char *needle)
{
	static char buf[VM_CONSOLE_SIZE + 1];
	uint64_t pos = 0;
	size_t n = vm_console_read(vm, &pos, buf, sizeof(buf) - 1);
	buf[n] = '\0';
	return strstr(buf, needle) != NULL;
}

static uint64_t *page_at(struct vm *vm, uint64_t gpa)
{
	uint64_t *p = vm_gpa_to_hva(vm, gpa, PAGE);
	assert_non_null(p);
	return p;
}

/* ---- memcheck ---- */

static void memcheck_clean(void **state)
{
	(void)state;
	/* The smallest flat VM: hosts that emulate guest code (nested, no hardware support)
	 * still get through 3 passes of 2 x 512 pages in seconds. */
	struct vm *vm = tu_vm_builtin("mc-clean", "memcheck", FERRY_FLAT_MIN_MEM, 2, TRACKER_AUTO,
				      NULL);
	assert_int_equal(vm_start(vm), 0);
	check_wait(vm, tu_wait_passes(vm, 3, 60000), "memcheck 3 passes");

	struct vm_vcpu_stats tot;
	vm_stats_total(vm, &tot);
	assert_int_equal(tot.ready, 2);
	if (tot.errors) {
		tu_dump_console(vm);
		fail_msg("memcheck reported %llu errors on an untouched VM",
			 (unsigned long long)tot.errors);
	}
	struct vm_guest_error e[1];
	assert_int_equal(vm_guest_errors(vm, e, 1), 0);

	/* Default wss splits the free 4 MiB over the vCPUs: vCPU 1's region starts at 6 MiB
	 * and its pages carry their own numbers and the writer's index. */
	assert_int_equal(vm_pause(vm), 0);
	uint64_t gpa = FERRY_FREE_GPA + 2 * MIB;
	struct ferry_memcheck_hdr h;
	memcpy(&h, page_at(vm, gpa), sizeof(h));
	assert_int_equal(h.page, gpa >> 12);
	assert_int_equal(h.vcpu, 1);
	assert_true(h.gen >= 3);
	assert_true(console_has(vm, "memcheck vcpu 1: 2048 KiB at 0x600000"));
	vm_free(vm);
}

/* Index of the page vCPU 0 was writing when paused: the first whose generation differs
 * from page 0's (0 if the pass just ended). Pages far from it are safe to corrupt. */
static uint64_t write_cursor(struct vm *vm, uint64_t base, uint64_t pages)
{
	uint64_t g0 = page_at(vm, base)[1];
	for (uint64_t i = 1; i < pages; i++)
		if (page_at(vm, base + i * PAGE)[1] != g0)
			return i;
	return 0;
}

static const struct vm_guest_error *find_error(const struct vm_guest_error *e, unsigned n,
					       uint64_t gpa)
{
	for (unsigned i = 0; i < n; i++)
		if (e[i].gpa == gpa)
			return &e[i];
	return NULL;
}

static void memcheck_detects_corruption(void **state)
{
	(void)state;
	static const char *const params[] = {"wss=1M", NULL};
	const uint64_t pages = MIB / PAGE, base = FERRY_FREE_GPA;
	struct vm *vm = tu_vm_builtin("mc-bad", "memcheck", 16 * MIB, 2, TRACKER_AUTO, params);
	assert_int_equal(vm_start(vm), 0);
	check_wait(vm, tu_wait_passes(vm, 2, 20000), "memcheck 2 passes");
	assert_int_equal(vm_pause(vm), 0);

	/* Three pages of vCPU 0's region, each a quarter of the region away from where the
	 * guest is writing, so it cannot overwrite our damage before verifying it. */
	uint64_t cur = write_cursor(vm, base, pages);
	uint64_t a = base + ((cur + pages / 4) % pages) * PAGE;
	uint64_t b = base + ((cur + pages / 2) % pages) * PAGE;
	uint64_t c = base + ((cur + 3 * pages / 4) % pages) * PAGE;

	/* Swap a and b: each now carries the other's page number. */
	uint64_t tmp[PAGE / 8];
	memcpy(tmp, page_at(vm, a), PAGE);
	memcpy(page_at(vm, a), page_at(vm, b), PAGE);
	memcpy(page_at(vm, b), tmp, PAGE);
	/* Flip one byte of c's pattern: header intact, so only the checksum can tell. */
	uint64_t c_csum = page_at(vm, c)[2];
	((uint8_t *)page_at(vm, c))[1000] ^= 0x40;

	uint64_t want = 3;
	assert_int_equal(vm_resume(vm), 0);
	check_wait(vm, vm_wait(vm, errors_at_least, &want, 20000), "memcheck error reports");
	/* Two more passes: every damaged page was rewritten, nothing else is wrong. */
	uint64_t p = tu_min_passes(vm);
	check_wait(vm, tu_wait_passes(vm, p + 2, 20000), "memcheck passes after damage");

	struct vm_vcpu_stats s0, s1;
	vm_vcpu_stats(vm, 0, &s0);
	vm_vcpu_stats(vm, 1, &s1);
	struct vm_guest_error e[VM_ERRORS_KEPT];
	unsigned n = vm_guest_errors(vm, e, VM_ERRORS_KEPT);
	if (s0.errors != 3 || s1.errors != 0 || n != 3) {
		tu_dump_console(vm);
		fail_msg("errors: vcpu0 %llu, vcpu1 %llu, kept %u; want 3, 0, 3",
			 (unsigned long long)s0.errors, (unsigned long long)s1.errors, n);
	}

	const struct vm_guest_error *ea = find_error(e, n, a), *eb = find_error(e, n, b),
				    *ec = find_error(e, n, c);
	assert_non_null(ea);
	assert_non_null(eb);
	assert_non_null(ec);
	assert_int_equal(ea->vcpu, 0);
	assert_int_equal(ea->kind, FERRY_ERR_PAGENO);
	assert_int_equal(ea->expected, a >> 12);
	assert_int_equal(ea->found, b >> 12);
	assert_int_equal(eb->kind, FERRY_ERR_PAGENO);
	assert_int_equal(eb->expected, b >> 12);
	assert_int_equal(eb->found, a >> 12);
	assert_int_equal(ec->kind, FERRY_ERR_CSUM);
	assert_int_equal(ec->expected, c_csum); /* the checksum the header carried */
	assert_int_not_equal(ec->found, c_csum);
	assert_true(console_has(vm, "bad checksum at"));
	assert_true(console_has(vm, "bad page number at"));
	vm_free(vm);
}

/* Mass damage: 16 reports per vCPU, then the rest only counted (and summed on the console),
 * so a badly broken migration cannot flood the host with debug-port exits. */
static void memcheck_caps_reports(void **state)
{
	(void)state;
	static const char *const params[] = {"wss=1M", NULL};
	const uint64_t pages = MIB / PAGE, base = FERRY_FREE_GPA;
	struct vm *vm = tu_vm_builtin("mc-cap", "memcheck", 16 * MIB, 1, TRACKER_AUTO, params);
	assert_int_equal(vm_start(vm), 0);
	check_wait(vm, tu_wait_passes(vm, 2, 20000), "memcheck 2 passes");
	assert_int_equal(vm_pause(vm), 0);
	uint64_t cur = write_cursor(vm, base, pages);
	for (uint64_t i = 0; i < 40; i++)
		((uint8_t *)page_at(vm, base + ((cur + 100 + i) % pages) * PAGE))[64] ^= 1;
	assert_int_equal(vm_resume(vm), 0);

	uint64_t want = 16;
	check_wait(vm, vm_wait(vm, errors_at_least, &want, 20000), "memcheck error reports");
	uint64_t p = tu_min_passes(vm);
	check_wait(vm, tu_wait_passes(vm, p + 2, 20000), "memcheck passes after damage");
	struct vm_vcpu_stats st;
	vm_vcpu_stats(vm, 0, &st);
	assert_int_equal(st.errors, 16);
	if (!console_has(vm, ", 40 in all")) {
		tu_dump_console(vm);
		fail_msg("console lacks the count of all 40 bad pages");
	}
	vm_free(vm);
}

/* A page that misses one round of writes (what a migration that drops a dirty page
 * produces) is a generation error: put back page d's content from an earlier pass. */
static void memcheck_detects_stale_page(void **state)
{
	(void)state;
	static const char *const params[] = {"wss=256K", NULL};
	const uint64_t pages = 64, base = FERRY_FREE_GPA;
	struct vm *vm = tu_vm_builtin("mc-stale", "memcheck", 16 * MIB, 1, TRACKER_AUTO, params);
	assert_int_equal(vm_start(vm), 0);
	check_wait(vm, tu_wait_passes(vm, 2, 20000), "memcheck 2 passes");
	assert_int_equal(vm_pause(vm), 0);
	uint64_t d = base + ((write_cursor(vm, base, pages) + pages / 2) % pages) * PAGE;
	uint64_t old[PAGE / 8];
	memcpy(old, page_at(vm, d), PAGE);
	assert_int_equal(vm_resume(vm), 0);
	uint64_t p = tu_min_passes(vm);
	check_wait(vm, tu_wait_passes(vm, p + 2, 20000), "memcheck 2 more passes");
	assert_int_equal(vm_pause(vm), 0);
	uint64_t gen_now = page_at(vm, d)[1];
	assert_true(gen_now > old[1]);
	memcpy(page_at(vm, d), old, PAGE);
	assert_int_equal(vm_resume(vm), 0);

	uint64_t want = 1;
	check_wait(vm, vm_wait(vm, errors_at_least, &want, 20000), "memcheck stale report");
	struct vm_guest_error e;
	assert_int_equal(vm_guest_errors(vm, &e, 1), 1);
	assert_int_equal(e.kind, FERRY_ERR_GEN);
	assert_int_equal(e.gpa, d);
	assert_int_equal(e.found, old[1]);
	assert_true(e.expected >= gen_now);
	vm_free(vm);
}

/* ---- dirtier ---- */

static void dirtier_rate(void **state)
{
	(void)state;
	/* 64-page regions: progress (and so the host's page count) every 64 pages. */
	static const char *const params[] = {"wss=256K", "rate=2000", NULL};
	struct vm *vm = tu_vm_builtin("dirt-rate", "dirtier", 16 * MIB, 2, TRACKER_AUTO, params);
	assert_int_equal(vm_start(vm), 0);
	check_wait(vm, tu_wait_passes(vm, 1, 10000), "dirtier first pass");

	struct vm_vcpu_stats a[2], b[2];
	uint64_t t0 = tu_now_ns();
	for (unsigned i = 0; i < 2; i++)
		vm_vcpu_stats(vm, i, &a[i]);
	usleep(1000000);
	uint64_t t1 = tu_now_ns();
	for (unsigned i = 0; i < 2; i++)
		vm_vcpu_stats(vm, i, &b[i]);

	double secs = (double)(t1 - t0) / 1e9;
	for (unsigned i = 0; i < 2; i++) {
		double rate = (double)(b[i].pages - a[i].pages) / secs;
		print_message("dirtier vcpu %u: %.0f pages/s (asked 2000), slept %.3f s\n", i,
			      rate, (double)(b[i].sleep_ns - a[i].sleep_ns) / 1e9);
		if (rate < 1000 || rate > 3000) {
			tu_dump_console(vm);
			fail_msg("vcpu %u wrote %.0f pages/s, want 2000 (1000..3000)", i, rate);
		}
		/* It paced itself by sleeping on the host, not by spinning. */
		assert_true(b[i].sleep_ns - a[i].sleep_ns > 500000000ull);
	}
	vm_free(vm);
}

/* Pages/s vCPU idx wrote over `ms`. */
static double rate_over(struct vm *vm, unsigned idx, unsigned ms)
{
	struct vm_vcpu_stats a, b;
	vm_vcpu_stats(vm, idx, &a);
	uint64_t t0 = tu_now_ns();
	usleep(ms * 1000u);
	vm_vcpu_stats(vm, idx, &b);
	return (double)(b.pages - a.pages) / ((double)(tu_now_ns() - t0) / 1e9);
}

/*
 * vm_vcpu_set_throttle: an unpaced dirtier on 2 vCPUs; vCPU 0 held back 75 % of the time
 * writes about a quarter of what it did, vCPU 1 (not throttled) keeps its pace, the held
 * time shows in the stats, pausing a throttled VM is prompt, and lifting restores the pace.
 */
static void dirtier_throttled(void **state)
{
	(void)state;
	static const char *const params[] = {"wss=4M", NULL};
	struct vm *vm = tu_vm_builtin("dirt-thr", "dirtier", 16 * MIB, 2, TRACKER_AUTO, params);
	assert_int_equal(vm_start(vm), 0);
	check_wait(vm, tu_wait_passes(vm, 1, 20000), "dirtier first pass");

	double free0 = rate_over(vm, 0, 600), free1 = rate_over(vm, 1, 600);
	assert_int_equal(vm_vcpu_set_throttle(vm, 0, 75), 0);
	assert_int_equal(vm_vcpu_set_throttle(vm, 2, 10), -EINVAL);
	assert_int_equal(vm_vcpu_set_throttle(vm, 0, 100), -EINVAL);
	usleep(100000);
	struct vm_vcpu_stats s0, s;
	vm_vcpu_stats(vm, 0, &s0);
	uint64_t w0 = tu_now_ns();
	double thr0 = rate_over(vm, 0, 1000), thr1 = rate_over(vm, 1, 600);
	vm_vcpu_stats(vm, 0, &s);
	double held = (double)(s.throttle_sleep_ns - s0.throttle_sleep_ns) /
		      (double)(tu_now_ns() - w0);
	print_message("throttle: vcpu0 %.0f -> %.0f pages/s at 75 %%, vcpu1 %.0f -> %.0f, "
		      "vcpu0 held %.0f %% of the time\n", free0, thr0, free1, thr1, held * 100);
	assert_int_equal(s.throttle_pct, 75);
	/*
	 * The throttle holds wall time: 75 % of it, give or take the slices' rounding. What
	 * that does to the page rate depends on how much CPU the vCPU got unthrottled (on a
	 * busy 2-core host, not a whole core), so the rate is only required to drop clearly.
	 */
	if (held < 0.6 || held > 0.85)
		fail_msg("vcpu0 at 75 %% was held %.0f %% of the time", held * 100);
	if (thr0 > 0.75 * free0)
		fail_msg("vcpu0 at 75 %% throttle wrote %.0f pages/s, free pace %.0f", thr0, free0);
	assert_true(thr1 > 0.5 * free1);

	uint64_t t0 = tu_now_ns();
	assert_int_equal(vm_pause(vm), 0);
	assert_true(tu_now_ns() - t0 < 200000000ull); /* no waiting out a sleep */
	assert_int_equal(vm_resume(vm), 0);

	vm_clear_throttle(vm);
	usleep(100000);
	double after0 = rate_over(vm, 0, 600);
	vm_vcpu_stats(vm, 0, &s);
	vm_vcpu_stats(vm, 0, &s0);
	usleep(200000);
	vm_vcpu_stats(vm, 0, &s);
	assert_int_equal(s.throttle_sleep_ns, s0.throttle_sleep_ns); /* no longer held */
	assert_int_equal(s.throttle_pct, 0);
	if (after0 < 0.35 * free0)
		fail_msg("vcpu0 after the throttle was lifted: %.0f pages/s, free pace %.0f",
			 after0, free0);
	vm_free(vm);
}

/* Runs the dirtier with params until every vCPU made `passes` passes, then pauses and
 * returns how many pages of vCPU 0's region (at the 4 MiB free start) are not all zero. */
static uint64_t dirtier_touched(struct vm *vm, uint64_t passes, uint64_t pages)
{
	assert_int_equal(vm_start(vm), 0);
	check_wait(vm, tu_wait_passes(vm, passes, 20000), "dirtier passes");
	assert_int_equal(vm_pause(vm), 0);
	uint64_t touched = 0;
	for (uint64_t i = 0; i < pages; i++) {
		const uint64_t *w = page_at(vm, FERRY_FREE_GPA + i * PAGE);
		for (unsigned j = 0; j < PAGE / 8; j++) {
			if (w[j]) {
				touched++;
				break;
			}
		}
	}
	return touched;
}

static void dirtier_random(void **state)
{
	(void)state;
	static const char *const params[] = {"wss=1M", "pattern=random", NULL};
	struct vm *vm = tu_vm_builtin("dirt-rand", "dirtier", 16 * MIB, 2, TRACKER_AUTO, params);
	/* 12 passes of uniform picks miss a given page with probability e^-12. */
	uint64_t touched = dirtier_touched(vm, 12, 256);
	assert_true(touched >= 255);
	struct vm_vcpu_stats s;
	vm_stats_total(vm, &s);
	assert_int_equal(s.errors, 0);
	vm_free(vm);
}

/* passes=1: after its first pass the dirtier writes nothing more and only sleeps. */
static void dirtier_stops_after_passes(void **state)
{
	(void)state;
	static const char *const params[] = {"wss=256K", "passes=1", NULL};
	struct vm *vm = tu_vm_builtin("dirt-stop", "dirtier", 16 * MIB, 2, TRACKER_AUTO, params);
	assert_int_equal(vm_start(vm), 0);
	check_wait(vm, tu_wait_passes(vm, 1, 10000), "dirtier first pass");
	usleep(100000);

	static uint8_t snap[256 * 1024];
	struct vm_vcpu_stats a, b;
	vm_stats_total(vm, &a);
	const uint8_t *region = vm_gpa_to_hva(vm, FERRY_FREE_GPA, sizeof(snap));
	assert_non_null(region);
	memcpy(snap, region, sizeof(snap));
	usleep(300000);
	vm_stats_total(vm, &b);
	assert_int_equal(b.passes, a.passes);
	assert_int_equal(b.pages, a.pages);
	assert_true(b.sleep_ns > a.sleep_ns); /* it sleeps on the host, it does not spin */
	assert_memory_equal(snap, region, sizeof(snap));
	/* And the pass it made touched every page of the region. */
	for (uint64_t i = 0; i < sizeof(snap) / PAGE; i++) {
		const uint64_t *w = page_at(vm, FERRY_FREE_GPA + i * PAGE);
		unsigned j = 0;
		while (j < PAGE / 8 && !w[j])
			j++;
		assert_true(j < PAGE / 8);
	}
	assert_int_equal(b.errors, 0);
	vm_free(vm);
}

static void dirtier_hotcold(void **state)
{
	(void)state;
	/* All writes to the hot quarter: the other three quarters stay zero. */
	static const char *const only_hot[] = {"wss=1M", "pattern=hotcold", "hot_pct=25",
					       "hot_ratio=100", NULL};
	struct vm *vm = tu_vm_builtin("dirt-hot", "dirtier", 16 * MIB, 1, TRACKER_AUTO, only_hot);
	uint64_t touched = dirtier_touched(vm, 8, 256);
	assert_true(touched >= 60 && touched <= 64);
	for (uint64_t i = 64; i < 256; i++)
		assert_int_equal(page_at(vm, FERRY_FREE_GPA + i * PAGE)[0], 0);
	vm_free(vm);

	/* Defaults (10% hot, 90% of writes there): the cold part still gets written. */
	static const char *const dflt[] = {"wss=1M", "pattern=hotcold", NULL};
	vm = tu_vm_builtin("dirt-hc", "dirtier", 16 * MIB, 1, TRACKER_AUTO, dflt);
	touched = dirtier_touched(vm, 40, 256);
	assert_true(touched > 200);
	vm_free(vm);
}

/* ---- touch ---- */

static void touch_generations(void **state)
{
	(void)state;
	static const char *const params[] = {"wss=256K", "stride=4", "offset=1", NULL};
	struct vm *vm = tu_vm_builtin("touch", "touch", 16 * MIB, 2, TRACKER_AUTO, params);
	struct ferry_bootinfo *bi = vm_bootinfo(vm);
	assert_non_null(bi);
	assert_int_equal(vm_start(vm), 0);
	check_wait(vm, vm_wait(vm, tu_all_ready, NULL, 10000), "touch ready");

	for (uint64_t gen = 1; gen <= 3; gen++) {
		bi->host_gen = gen;
		check_wait(vm, vm_wait(vm, done_gen_reached, &gen, 10000), "touch done");
		for (unsigned v = 0; v < 2; v++) {
			uint64_t base = FERRY_FREE_GPA + v * 256 * 1024;
			for (uint64_t i = 0; i < 64; i++) {
				const uint8_t *p = (const uint8_t *)page_at(vm, base + i * PAGE);
				uint8_t want = (i % 4 == 1) ? (uint8_t)gen : 0;
				if (p[0] != want)
					fail_msg("gen %llu vcpu %u page %llu: byte %u, want %u",
						 (unsigned long long)gen, v, (unsigned long long)i,
						 p[0], want);
				for (unsigned j = 1; j < PAGE; j++)
					assert_int_equal(p[j], 0);
			}
		}
	}
	/* Without a new generation it does nothing more. */
	usleep(100000);
	for (unsigned v = 0; v < 2; v++) {
		struct vm_vcpu_stats s;
		vm_vcpu_stats(vm, v, &s);
		assert_int_equal(s.done_gen, 3);
		assert_int_equal(s.errors, 0);
	}
	vm_free(vm);
}

/* Harvests the tracker and returns the dirty gpas (at most max) in ret. */
static unsigned dirty_gpas(struct vm *vm, uint64_t *ret, unsigned max)
{
	struct tracker *t = vm_tracker(vm);
	struct tracker_cursor cur = {0};
	static struct tracker_batch b;
	unsigned n = 0;
	assert_int_equal(tracker_sync(t, NULL), 0);
	while (tracker_take_next(t, &cur, &b) == 1) {
		uint64_t base = vm_slot(vm, b.slot_index)->gpa + b.first_page * PAGE;
		for (uint32_t i = 0; i < b.npages; i++)
			if (b.bits[i / 64] & (1ull << (i % 64))) {
				assert_true(n < max);
				ret[n++] = base + i * PAGE;
			}
	}
	return n;
}

/* touch's promise to the tracker tests: one generation dirties its stride pages and its
 * stack, nothing else (no console lock, no counters). */
static void touch_dirties_only_its_pages(void **state)
{
	(void)state;
	static const char *const params[] = {"wss=256K", "stride=3", NULL};
	struct vm *vm = tu_vm_builtin("touch-dirty", "touch", 16 * MIB, 2, TRACKER_BITMAP, params);
	assert_int_equal(vm_start(vm), 0);
	check_wait(vm, vm_wait(vm, tu_all_ready, NULL, 10000), "touch ready");
	assert_int_equal(vm_pause(vm), 0);
	assert_int_equal(tracker_start(vm_tracker(vm), false), 0);
	assert_int_equal(vm_resume(vm), 0);

	static uint64_t gpas[4096];
	usleep(50000);
	dirty_gpas(vm, gpas, 4096); /* whatever the spin loop did so far: stacks only */
	uint64_t gen = 1;
	vm_bootinfo(vm)->host_gen = gen;
	check_wait(vm, vm_wait(vm, done_gen_reached, &gen, 10000), "touch done");
	unsigned n = dirty_gpas(vm, gpas, 4096);

	const uint64_t stacks = FERRY_STACK_GPA;
	const uint64_t stacks_end = FERRY_STACK_GPA + 2 * FERRY_STACK_SIZE;
	unsigned touched = 0;
	for (unsigned i = 0; i < n; i++) {
		uint64_t g = gpas[i];
		if (g >= stacks && g < stacks_end)
			continue;
		uint64_t off = g - FERRY_FREE_GPA;
		if (g < FERRY_FREE_GPA || off >= 2 * 256 * 1024 || (off % (256 * 1024)) / PAGE % 3)
			fail_msg("touch dirtied page %#llx, outside its stride pages and stacks",
				 (unsigned long long)g);
		touched++;
	}
	/* 64 pages per vCPU, every third from 0: 22 each. */
	assert_int_equal(touched, 2 * 22);
	vm_free(vm);
}

/* ---- bad parameters ---- */

static void param_error_reported(struct vm *vm, const char *key, uint64_t value,
				 const char *console)
{
	assert_int_equal(vm_start(vm), 0);
	uint64_t want = vm_config(vm)->vcpus;
	check_wait(vm, vm_wait(vm, errors_at_least, &want, 10000), "param error report");
	struct vm_guest_error e[VM_ERRORS_KEPT];
	unsigned n = vm_guest_errors(vm, e, VM_ERRORS_KEPT);
	assert_int_equal(n, want);
	uint64_t packed = 0;
	for (unsigned i = 0; i < 8 && key[i]; i++)
		packed |= (uint64_t)(uint8_t)key[i] << (8 * i);
	for (unsigned i = 0; i < n; i++) {
		assert_int_equal(e[i].kind, FERRY_ERR_PARAM);
		assert_int_equal(e[i].gpa, 0);
		assert_int_equal(e[i].expected, packed);
		assert_int_equal(e[i].found, value);
	}
	struct vm_vcpu_stats s;
	vm_stats_total(vm, &s);
	assert_int_equal(s.ready, 0);
	if (!console_has(vm, console)) {
		tu_dump_console(vm);
		fail_msg("console lacks \"%s\"", console);
	}
	vm_free(vm);
}

static void bad_params(void **state)
{
	(void)state;
	/* Valid to the parser, impossible in a 16 MiB VM. */
	static const char *const big[] = {"wss=64M", NULL};
	struct vm *vm = tu_vm_builtin("bad-wss", "memcheck", 16 * MIB, 2, TRACKER_AUTO, big);
	param_error_reported(vm, "wss", 64 * MIB, "memcheck vcpu 0: bad parameter wss=67108864");

	/* 2 x 8 MiB do not fit in 12 MiB free. */
	static const char *const two[] = {"wss=8M", NULL};
	vm = tu_vm_builtin("bad-wss2", "dirtier", 16 * MIB, 2, TRACKER_AUTO, two);
	param_error_reported(vm, "wss", 8 * MIB, "wss at most 6291456");

	static const char *const off[] = {"wss=64K", "offset=16", NULL};
	vm = tu_vm_builtin("bad-off", "touch", 16 * MIB, 1, TRACKER_AUTO, off);
	param_error_reported(vm, "offset", 16, "bad parameter offset=16");

	/* Params that bypass vm_param_parse (another front end, or a raw API user) are still
	 * checked by the guest itself. */
	struct vm_config cfg;
	vm_config_init(&cfg, "bad-raw");
	cfg.mem_size = 16 * MIB;
	struct ferry_param raw[2] = {{.key = "pattern", .value = 7}, {.key = "bogus", .value = 1}};
	const struct vm_builtin_guest *g = vm_builtin_guest_find("dirtier");
	struct vm_error err = {{0}};
	assert_int_equal(vm_new(&cfg, &vm, &err), 0);
	assert_int_equal(vm_load_flat(vm, g->image, g->size, &raw[1], 1, &err), 0);
	param_error_reported(vm, "bogus", 1, "unknown parameter");

	assert_int_equal(vm_new(&cfg, &vm, &err), 0);
	assert_int_equal(vm_load_flat(vm, g->image, g->size, &raw[0], 1, &err), 0);
	param_error_reported(vm, "pattern", 7, "bad parameter pattern=7");
}

int main(void)
{
	tu_require_kvm();
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(memcheck_clean),
		cmocka_unit_test(memcheck_detects_corruption),
		cmocka_unit_test(memcheck_detects_stale_page),
		cmocka_unit_test(memcheck_caps_reports),
		cmocka_unit_test(dirtier_rate),
		cmocka_unit_test(dirtier_random),
		cmocka_unit_test(dirtier_throttled),
		cmocka_unit_test(dirtier_hotcold),
		cmocka_unit_test(dirtier_stops_after_passes),
		cmocka_unit_test(touch_generations),
		cmocka_unit_test(touch_dirties_only_its_pages),
		cmocka_unit_test(bad_params),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
