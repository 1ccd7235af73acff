// SPDX-License-Identifier: Apache-2.0
/*
 * Description: each tracker backend (ring, bitmap with manual protect, legacy) reports
 * exactly what a guest wrote. The built-in "touch" guest writes one byte into every
 * stride-th page of its vCPU's region per host generation and otherwise only its stack, so
 * after tracker_sync() and taking every chunk the harvested set must contain every page it
 * touched and nothing outside those pages and the vCPU stacks. Repeated generations check
 * that taken pages were re-protected (they must show up again); a stop/start cycle checks
 * the logging toggle and mark_all. The VM has several memslots, and the regions straddle
 * a slot boundary, so slot mapping is exercised too.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "testutil.h"

#define PAGE 4096ull
#define MEM (32ull << 20)
#define SLOT_SIZE (8ull << 20)
#define VCPUS 2u
#define WSS (6ull << 20) /* vCPU 0: 4..10 MiB, vCPU 1: 10..16 MiB: both cross a slot edge */
#define STRIDE 3u
#define OFFSET 1u
#define WAIT_MS 20000

static bool all_done(struct vm *vm, void *arg)
{
	uint64_t gen = *(uint64_t *)arg;
	if (vm_state(vm) == VM_FAILED)
		return true;
	for (unsigned i = 0; i < vm_config(vm)->vcpus; i++) {
		struct vm_vcpu_stats s;
		vm_vcpu_stats(vm, i, &s);
		if (s.done_gen != gen)
			return false;
	}
	return true;
}

static void check_alive(struct vm *vm)
{
	if (vm_state(vm) == VM_FAILED) {
		tu_dump_console(vm);
		fail_msg("VM failed: %s", vm_failure(vm));
	}
}

/* Pages the guest writes in one generation (by guest page number), set in `want`. */
static void expected_pages(const struct ferry_bootinfo *bi, uint8_t *want)
{
	for (unsigned v = 0; v < VCPUS; v++) {
		uint64_t base = bi->free_start + v * WSS;
		for (uint64_t pg = OFFSET; pg < WSS / PAGE; pg += STRIDE)
			want[(base >> 12) + pg] = 1;
	}
}

static bool in_stack(uint64_t gpa)
{
	return gpa >= FERRY_STACK_GPA && gpa < FERRY_STACK_GPA + VCPUS * FERRY_STACK_SIZE;
}

/*
 * Syncs and takes every chunk into got[] (by guest page number). Checks each batch's
 * shape. Returns the number of pages taken.
 */
static uint64_t harvest(struct vm *vm, uint8_t *got, bool do_sync)
{
	struct tracker *t = vm_tracker(vm);
	struct tracker_sync_stats st = {0};
	struct tracker_cursor cur = {0};
	struct tracker_batch b;
	uint64_t total = 0;
	int r;

	if (do_sync)
		assert_int_equal(tracker_sync(t, &st), 0);
	while ((r = tracker_take_next(t, &cur, &b)) == 1) {
		assert_true(b.slot_index < vm_nr_slots(vm));
		const struct vm_slot *s = vm_slot(vm, b.slot_index);
		assert_int_equal(b.first_page % TRACKER_CHUNK_PAGES, 0);
		assert_true(b.npages > 0 && b.npages <= TRACKER_CHUNK_PAGES);
		assert_true(b.first_page + b.npages <= s->size / PAGE);
		unsigned n = 0;
		for (unsigned w = 0; w < TRACKER_CHUNK_WORDS; w++) {
			for (uint64_t v = b.bits[w]; v; v &= v - 1) {
				uint64_t i = w * 64 + (uint64_t)__builtin_ctzll(v);
				assert_true(i < b.npages);
				got[(s->gpa >> 12) + b.first_page + i] = 1;
				n++;
			}
		}
		assert_int_equal(n, b.dirty);
		assert_true(n > 0);
		total += n;
	}
	assert_int_equal(r, 0);
	/* Everything was taken. */
	assert_int_equal(tracker_dirty_pages(t), 0);
	return total;
}

/* got must contain all of want, and nothing outside want and the stacks. */
static void compare(const char *what, const uint8_t *want, const uint8_t *got)
{
	uint64_t missing = 0, extra = 0, first_missing = 0, first_extra = 0, nwant = 0;

	for (uint64_t p = 0; p < MEM / PAGE; p++) {
		nwant += want[p];
		if (want[p] && !got[p] && !missing++)
			first_missing = p << 12;
		if (got[p] && !want[p] && !in_stack(p << 12) && !extra++)
			first_extra = p << 12;
	}
	if (missing || extra)
		fail_msg("%s: %llu of %llu written pages missing (first gpa %#llx), %llu pages "
			 "reported that the guest did not write (first gpa %#llx)",
			 what, (unsigned long long)missing, (unsigned long long)nwant,
			 (unsigned long long)first_missing, (unsigned long long)extra,
			 (unsigned long long)first_extra);
}

/* One host generation: resume, bump, wait for every vCPU, pause. */
static void run_generation(struct vm *vm, uint64_t gen)
{
	assert_int_equal(vm_resume(vm), 0);
	__atomic_store_n(&vm_bootinfo(vm)->host_gen, gen, __ATOMIC_RELEASE);
	int r = vm_wait(vm, all_done, &gen, WAIT_MS);
	check_alive(vm);
	assert_int_equal(r, 0);
	/* Kicks every vCPU out of KVM_RUN, which also flushes PML into the rings. */
	assert_int_equal(vm_pause(vm), 0);
}

static void run_backend(enum tracker_backend backend)
{
	tu_require_backend(backend);

	char wss[32], stride[32], offset[32];
	snprintf(wss, sizeof(wss), "wss=%llu", WSS);
	snprintf(stride, sizeof(stride), "stride=%u", STRIDE);
	snprintf(offset, sizeof(offset), "offset=%u", OFFSET);
	const char *params[] = {wss, stride, offset, NULL};

	struct vm_config cfg;
	vm_config_init(&cfg, "known");
	cfg.mem_size = MEM;
	cfg.vcpus = VCPUS;
	cfg.slot_size = SLOT_SIZE;
	cfg.tracker.backend = backend;
	struct vm *vm = tu_vm_builtin_cfg(&cfg, "touch", params);
	struct tracker *t = vm_tracker(vm);
	assert_int_equal(tracker_backend(t), backend);
	assert_int_equal(vm_nr_slots(vm), MEM / SLOT_SIZE);
	if (backend == TRACKER_RING)
		assert_true(tracker_ring_entries(t) >= 256);
	else
		assert_int_equal(tracker_ring_entries(t), 0);

	assert_int_equal(vm_start(vm), 0);
	int r = vm_wait(vm, tu_all_ready, NULL, WAIT_MS);
	check_alive(vm);
	assert_int_equal(r, 0);
	assert_int_equal(vm_pause(vm), 0);

	uint8_t *want = calloc(MEM / PAGE, 1), *got = calloc(MEM / PAGE, 1);
	assert_non_null(want);
	assert_non_null(got);
	expected_pages(vm_bootinfo(vm), want);

	/* Starting empty: nothing is dirty before the guest runs again. */
	assert_int_equal(tracker_start(t, false), 0);
	assert_true(tracker_running(t));
	assert_int_equal(tracker_start(t, false), -EBUSY);
	assert_int_equal(harvest(vm, got, true), 0);

	/* Generations 1 and 2: the second shows that taking re-protected every page. */
	for (uint64_t gen = 1; gen <= 2; gen++) {
		char what[64];
		snprintf(what, sizeof(what), "%s gen %llu", tracker_backend_name(backend),
			 (unsigned long long)gen);
		memset(got, 0, MEM / PAGE);
		run_generation(vm, gen);
		harvest(vm, got, true);
		compare(what, want, got);
		/* Paused guest, everything taken: a second sync finds nothing new. */
		memset(got, 0, MEM / PAGE);
		assert_int_equal(harvest(vm, got, true), 0);
	}
	if (backend == TRACKER_RING) {
		uint64_t sum = 0;
		for (unsigned i = 0; i < VCPUS; i++) {
			assert_true(tracker_vcpu_dirty_count(t, i) > 0);
			sum += tracker_vcpu_dirty_count(t, i);
		}
		/* Two generations of at least the touched pages each. */
		uint64_t nwant = 0;
		for (uint64_t p = 0; p < MEM / PAGE; p++)
			nwant += want[p];
		assert_true(sum >= 2 * nwant);
	}

	/* Logging off, then on with mark_all: every page once, then only what is written. */
	assert_int_equal(tracker_stop(t), 0);
	assert_false(tracker_running(t));
	assert_int_equal(tracker_start(t, true), 0);
	assert_int_equal(tracker_dirty_pages(t), MEM / PAGE);
	memset(got, 0, MEM / PAGE);
	assert_int_equal(harvest(vm, got, false), MEM / PAGE);
	memset(got, 0, MEM / PAGE);
	run_generation(vm, 3);
	harvest(vm, got, true);
	char what[64];
	snprintf(what, sizeof(what), "%s after restart", tracker_backend_name(backend));
	compare(what, want, got);
	assert_int_equal(tracker_stop(t), 0);

	free(want);
	free(got);
	vm_free(vm);
}

static void test_ring(void **state)
{
	(void)state;
	run_backend(TRACKER_RING);
}

static void test_bitmap(void **state)
{
	(void)state;
	run_backend(TRACKER_BITMAP);
}

static void test_legacy(void **state)
{
	(void)state;
	run_backend(TRACKER_LEGACY);
}

/* API edges that need a VM fd but no guest. */
static void test_api(void **state)
{
	(void)state;
	tu_require_kvm();
	enum tracker_backend b = TRACKER_LEGACY;
	assert_int_equal(tracker_backend_parse("ring", &b), 0);
	assert_int_equal(b, TRACKER_RING);
	assert_int_equal(tracker_backend_parse("auto", &b), 0);
	assert_int_equal(b, TRACKER_AUTO);
	assert_int_equal(tracker_backend_parse("bogus", &b), -EINVAL);
	assert_int_equal(b, TRACKER_AUTO);
	assert_string_equal(tracker_backend_name(TRACKER_BITMAP), "bitmap");
	tracker_free(NULL);

	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	assert_true(kvm >= 0);
	int vmfd = ioctl(kvm, KVM_CREATE_VM, 0);
	assert_true(vmfd >= 0);
	struct tracker *t = NULL;
	struct tracker_config cfg = {.backend = TRACKER_RING, .ring_entries = 1000, .max_vcpus = 1};
	assert_int_equal(tracker_new(vmfd, &cfg, &t), -EINVAL); /* not a power of two */
	assert_null(t);
	cfg.backend = (enum tracker_backend)42;
	cfg.ring_entries = 0;
	assert_int_equal(tracker_new(vmfd, &cfg, &t), -EINVAL);
	cfg.backend = TRACKER_AUTO;
	assert_int_equal(tracker_new(vmfd, &cfg, &t), 0);
	unsigned avail = tracker_backends_available(vmfd);
	assert_true(avail & (1u << TRACKER_LEGACY));
	/* auto: the ring, but the bitmap under kvm_pvm (docs/architecture.md). */
	bool pvm = access("/sys/module/kvm_pvm", F_OK) == 0;
	if (pvm && (avail & (1u << TRACKER_BITMAP))) {
		assert_int_equal(tracker_backend(t), TRACKER_BITMAP);
	} else if (avail & (1u << TRACKER_RING)) {
		assert_int_equal(tracker_backend(t), TRACKER_RING);
		assert_int_equal(tracker_ring_entries(t), TRACKER_RING_ENTRIES_DEFAULT);
	}
	/* Slots: bad shapes, duplicates; marks out of range are ignored. */
	static char mem[4 * 4096] __attribute__((aligned(4096)));
	struct tracker_slot s = {.slot = 0, .gpa = 0, .size = sizeof(mem), .hva = mem};
	assert_int_equal(tracker_slot_add(t, &s), 0);
	assert_int_equal(tracker_slot_add(t, &s), -EEXIST);
	s.slot = 1;
	s.size = 100;
	assert_int_equal(tracker_slot_add(t, &s), -EINVAL);
	tracker_mark_dirty(t, 0, 3);
	tracker_mark_dirty(t, 0, 4); /* past the slot */
	tracker_mark_dirty(t, 7, 0); /* no such slot */
	assert_int_equal(tracker_dirty_pages(t), 1);
	struct tracker_cursor cur = {0};
	struct tracker_batch batch;
	assert_int_equal(tracker_take_next(t, &cur, &batch), 1);
	assert_int_equal(batch.slot_index, 0);
	assert_int_equal(batch.first_page, 0);
	assert_int_equal(batch.npages, 4);
	assert_int_equal(batch.dirty, 1);
	assert_int_equal(batch.bits[0], 1u << 3);
	assert_int_equal(tracker_take_next(t, &cur, &batch), 0);
	/* Not attached / out of range. */
	assert_int_equal(tracker_vcpu_attach(t, TRACKER_MAX_VCPUS, 0),
			 tracker_backend(t) == TRACKER_RING ? -EINVAL : 0);
	assert_int_equal(tracker_vcpu_dirty_count(t, 5), 0);
	tracker_free(t);
	close(vmfd);
	close(kvm);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_api),
		cmocka_unit_test(test_ring),
		cmocka_unit_test(test_bitmap),
		cmocka_unit_test(test_legacy),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
