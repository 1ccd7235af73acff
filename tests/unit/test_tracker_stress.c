// SPDX-License-Identifier: Apache-2.0
/*
 * Description: the tracker under a live, write-heavy guest, per backend. Eight vCPUs run
 * the "dirtier" guest (random pages, no rate limit) over most of a 256 MiB VM split into
 * four memslots while this thread plays precopy: tracker_start(mark_all), then for about
 * two seconds sync, take every dirty chunk and copy each dirty page from guest memory into
 * a shadow copy. Then the VM is paused (every vCPU kicked out of KVM_RUN), one last sync,
 * take and copy, and the shadow must equal guest memory byte for byte. A page whose
 * re-protection came after its read, a skipped ring entry, or a bit lost in the dirty set
 * shows up as a difference. Ring-full exits happen along the way and are harvested by the
 * vCPU threads concurrently with this loop.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "testutil.h"

#define PAGE 4096ull
#define MEM (256ull << 20)
#define SLOT_SIZE (64ull << 20)
#define VCPUS 8u
#define WSS (24ull << 20) /* 8 x 24 MiB from 4 MiB: 196 MiB, across all four slots */
#define RUN_NS 2000000000ull
#define PAUSE_US 100000u
#define RING_ENTRIES 1024u
#define RING_FULL_WAIT_NS 10000000000ull
#define WAIT_MS 20000

static void check_alive(struct vm *vm)
{
	if (vm_state(vm) == VM_FAILED) {
		tu_dump_console(vm);
		fail_msg("VM failed: %s", vm_failure(vm));
	}
}

struct pass_stats {
	uint64_t passes, pages, chunks;
};

/* One precopy pass: sync, then copy every dirty page out of guest memory. */
static void copy_pass(struct vm *vm, uint8_t **shadow, struct pass_stats *ps)
{
	struct tracker *t = vm_tracker(vm);
	struct tracker_cursor cur = {0};
	struct tracker_batch b;
	int r;

	assert_int_equal(tracker_sync(t, NULL), 0);
	while ((r = tracker_take_next(t, &cur, &b)) == 1) {
		const struct vm_slot *s = vm_slot(vm, b.slot_index);
		const uint8_t *src = s->hva;
		for (unsigned w = 0; w < TRACKER_CHUNK_WORDS; w++) {
			for (uint64_t v = b.bits[w]; v; v &= v - 1) {
				uint64_t pg = b.first_page + w * 64 + (uint64_t)__builtin_ctzll(v);
				memcpy(shadow[b.slot_index] + pg * PAGE, src + pg * PAGE, PAGE);
			}
		}
		ps->pages += b.dirty;
		ps->chunks++;
	}
	assert_int_equal(r, 0);
	ps->passes++;
}

static void run_backend(enum tracker_backend backend)
{
	tu_require_backend(backend);

	char wss[32];
	snprintf(wss, sizeof(wss), "wss=%llu", WSS);
	const char *params[] = {wss, "pattern=random", "rate=0", NULL};

	struct vm_config cfg;
	vm_config_init(&cfg, "stress");
	cfg.mem_size = MEM;
	cfg.vcpus = VCPUS;
	cfg.slot_size = SLOT_SIZE;
	cfg.tracker.backend = backend;
	/* A small ring so that ring-full exits are frequent and race with tracker_sync(). */
	cfg.tracker.ring_entries = RING_ENTRIES;
	struct vm *vm = tu_vm_builtin_cfg(&cfg, "dirtier", params);
	struct tracker *t = vm_tracker(vm);
	assert_int_equal(tracker_backend(t), backend);
	unsigned nslots = vm_nr_slots(vm);
	assert_true(nslots >= 2);

	uint8_t *shadow[TRACKER_MAX_SLOTS];
	for (unsigned i = 0; i < nslots; i++) {
		shadow[i] = malloc(vm_slot(vm, i)->size);
		assert_non_null(shadow[i]);
		/*
		 * Fault both sides in now: on a 2-core host with eight busy vCPUs, first
		 * touches of 256 MiB in this thread otherwise take seconds and starve the
		 * very loop under test. (Best effort: without it the test is only slower.)
		 */
		memset(shadow[i], 0, vm_slot(vm, i)->size);
		madvise(vm_slot(vm, i)->hva, vm_slot(vm, i)->size, MADV_POPULATE_READ);
	}

	assert_int_equal(vm_start(vm), 0);
	int r = vm_wait(vm, tu_all_ready, NULL, WAIT_MS);
	check_alive(vm);
	assert_int_equal(r, 0);

	/* Live from here on: the guest keeps writing while we track and copy. */
	struct pass_stats ps = {0};
	assert_int_equal(tracker_start(t, true), 0);
	if (backend == TRACKER_RING) {
		/* Before the first harvest, let a vCPU fill its ring and harvest it itself. */
		uint64_t w0 = tu_now_ns();
		while (!tracker_ring_full_exits(t) && tu_now_ns() - w0 < RING_FULL_WAIT_NS) {
			usleep(10000);
			check_alive(vm);
		}
		assert_true(tracker_ring_full_exits(t) > 0);
	}
	uint64_t t0 = tu_now_ns();
	while (tu_now_ns() - t0 < RUN_NS) {
		copy_pass(vm, shadow, &ps);
		check_alive(vm);
		/* Alternate back-to-back passes (tight races with the guest) with pauses
		 * long enough for rings to fill and vCPUs to harvest on their own. */
		if (ps.passes % 2 == 0)
			usleep(PAUSE_US);
	}

	/* Switch-over: pause kicks every vCPU out of KVM_RUN, then the final pass. */
	assert_int_equal(vm_pause(vm), 0);
	check_alive(vm);
	copy_pass(vm, shadow, &ps);

	struct vm_vcpu_stats tot;
	vm_stats_total(vm, &tot);
	print_message("%s: %llu passes, %llu pages copied in %llu chunks; guest wrote %llu "
		      "pages; %llu ring-full exits (tracker: %llu, %llu us harvesting)\n",
		      tracker_backend_name(backend), (unsigned long long)ps.passes,
		      (unsigned long long)ps.pages, (unsigned long long)ps.chunks,
		      (unsigned long long)tot.pages, (unsigned long long)tot.ring_full_exits,
		      (unsigned long long)tracker_ring_full_exits(t),
		      (unsigned long long)(tracker_ring_full_ns(t) / 1000));
	/* The guest really ran alongside: several passes, and pages copied again after the
	 * first full copy because the guest dirtied them meanwhile. */
	assert_true(ps.passes >= 3);
	assert_true(ps.pages > MEM / PAGE);

	for (unsigned i = 0; i < nslots; i++) {
		const struct vm_slot *s = vm_slot(vm, i);
		const uint8_t *g = s->hva;
		for (uint64_t pg = 0; pg < s->size / PAGE; pg++) {
			if (memcmp(shadow[i] + pg * PAGE, g + pg * PAGE, PAGE)) {
				uint64_t off = 0;
				while (shadow[i][pg * PAGE + off] == g[pg * PAGE + off])
					off++;
				fail_msg("%s: slot %u page %llu (gpa %#llx) differs at byte %llu: "
					 "copy %#x, guest %#x",
					 tracker_backend_name(backend), i, (unsigned long long)pg,
					 (unsigned long long)(s->gpa + pg * PAGE),
					 (unsigned long long)off, shadow[i][pg * PAGE + off],
					 g[pg * PAGE + off]);
			}
		}
	}

	assert_int_equal(tracker_stop(t), 0);
	for (unsigned i = 0; i < nslots; i++)
		free(shadow[i]);
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

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_ring),
		cmocka_unit_test(test_bitmap),
		cmocka_unit_test(test_legacy),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
