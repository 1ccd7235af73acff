// SPDX-License-Identifier: Apache-2.0
/*
 * Description: the issue's acceptance test for state save/restore, all in one process. A
 * 4-vCPU memcheck guest runs two passes, is paused, its vCPU/VM state saved and its memory
 * copied slot by slot into a second, guestless VM of the same shape; the state is restored
 * there, the first VM freed, and the second started. memcheck carries its pass counter in
 * registers and on the stack and verifies every page against the previous pass, so it
 * going on for three more passes with no error and no new READY proves the move kept
 * registers, memory and the guest's view of both. A negative control corrupts one byte of
 * one page in the copy and requires memcheck to report exactly that page: the oracle can fail.
 * Both use TRACKER_AUTO, as a migrating VM would, though nothing harvests here.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

/* 4 vCPUs in 64 MiB, memcheck covering 4 MiB each: guest code is slow on the nested CI
 * host (about 1 ms per page per pass), so the suite stays within budget. The whole of
 * memory is still copied into the second VM. */
#define MOVE_MEM (64ull << 20)
/* The negative control only has to show the oracle failing. */
#define CONTROL_MEM (32ull << 20)
#define MOVE_VCPUS 4u
/* Generous: the host may be loaded (two test suites, sanitizers). */
#define PASS_TIMEOUT_MS 300000
/* memcheck's first region (vCPU 0's) starts at FERRY_FREE_GPA: page 10 of it, byte 100. */
#define CORRUPT_GPA (FERRY_FREE_GPA + 4096ull * 10 + 100)

struct target_passes {
	uint64_t want[MOVE_VCPUS];
};

/* Every vCPU reached its target, or there is already something to fail on. */
static bool passes_beyond(struct vm *vm, void *arg)
{
	const struct target_passes *t = arg;
	struct vm_vcpu_stats total;
	vm_stats_total(vm, &total);
	if (vm_state(vm) == VM_FAILED || total.errors)
		return true;
	for (unsigned i = 0; i < MOVE_VCPUS; i++) {
		struct vm_vcpu_stats s;
		vm_vcpu_stats(vm, i, &s);
		if (s.passes < t->want[i])
			return false;
	}
	return true;
}

static bool has_errors(struct vm *vm, void *arg)
{
	(void)arg;
	struct vm_vcpu_stats total;
	vm_stats_total(vm, &total);
	return total.errors > 0 || vm_state(vm) == VM_FAILED;
}

/*
 * Steps 1-3: run memcheck for two passes, pause, save, copy memory into a fresh guestless
 * VM (corrupting one byte if asked), restore, free the source, start the copy. Returns the
 * copy and each vCPU's passes at the pause.
 */
static struct vm *run_and_move(uint64_t mem, bool corrupt, uint64_t *ret_passes)
{
	uint64_t t0 = tu_now_ns();
	/* memcheck's working set: 4 MiB per vCPU (1024 pages), a few seconds per pass here. */
	static const char *const params[] = {"wss=4M", NULL};
	struct vm *src =
		tu_vm_builtin("move-src", "memcheck", mem, MOVE_VCPUS, TRACKER_AUTO, params);
	assert_int_equal(vm_start(src), 0);
	int r = tu_wait_passes(src, 2, PASS_TIMEOUT_MS);
	if (r < 0 || vm_state(src) == VM_FAILED) {
		tu_dump_console(src);
		fail_msg("source did not make 2 passes: %d, %s", r, vm_failure(src));
	}

	assert_int_equal(vm_pause(src), 0);
	struct vm_vcpu_stats total;
	vm_stats_total(src, &total);
	assert_int_equal(total.errors, 0);
	for (unsigned i = 0; i < MOVE_VCPUS; i++) {
		struct vm_vcpu_stats s;
		vm_vcpu_stats(src, i, &s);
		ret_passes[i] = s.passes;
	}
	struct vm_error err = {{0}};
	void *blob = NULL;
	size_t len = 0;
	r = vm_state_save(src, &blob, &len, &err);
	if (r < 0)
		fail_msg("vm_state_save: %s (%s)", strerror(-r), err.msg);

	/* The target: same shape, no guest; everything it runs comes from src. */
	const struct vm_config *sc = vm_config(src);
	struct vm_config cfg;
	vm_config_init(&cfg, corrupt ? "move-dst-bad" : "move-dst");
	cfg.mem_size = sc->mem_size;
	cfg.vcpus = sc->vcpus;
	cfg.slot_size = sc->slot_size;
	cfg.hugepages = sc->hugepages;
	cfg.irqchip = sc->irqchip;
	cfg.tracker = sc->tracker;
	struct vm *dst = NULL;
	r = vm_new(&cfg, &dst, &err);
	if (r < 0)
		fail_msg("vm_new: %s (%s)", strerror(-r), err.msg);

	assert_int_equal(vm_nr_slots(dst), vm_nr_slots(src));
	uint64_t copied = 0;
	for (unsigned i = 0; i < vm_nr_slots(src); i++) {
		const struct vm_slot *a = vm_slot(src, i), *b = vm_slot(dst, i);
		assert_true(a->gpa == b->gpa);
		assert_true(a->size == b->size);
		memcpy(b->hva, a->hva, a->size);
		copied += a->size;
	}
	assert_true(copied == mem);
	if (corrupt) {
		uint8_t *p = vm_gpa_to_hva(dst, CORRUPT_GPA, 1);
		assert_non_null(p);
		*p ^= 0xff;
	}

	r = vm_state_restore(dst, blob, len, &err);
	if (r < 0)
		fail_msg("vm_state_restore: %s (%s)", strerror(-r), err.msg);
	print_message("%.1fs: moved %zu bytes of state (%d MSRs skipped) and %" PRIu64
		      " MiB of memory; passes at pause: %" PRIu64 " %" PRIu64 " %" PRIu64
		      " %" PRIu64 "\n",
		      (double)(tu_now_ns() - t0) / 1e9, len, r, copied >> 20, ret_passes[0],
		      ret_passes[1], ret_passes[2], ret_passes[3]);
	free(blob);

	vm_free(src); /* the source is gone: whatever runs now runs from the copy */
	assert_int_equal(vm_start(dst), 0);
	return dst;
}

static void test_move_continues(void **state)
{
	(void)state;
	uint64_t at_pause[MOVE_VCPUS];
	struct vm *dst = run_and_move(MOVE_MEM, false, at_pause);

	uint64_t t0 = tu_now_ns();
	struct target_passes t;
	for (unsigned i = 0; i < MOVE_VCPUS; i++)
		t.want[i] = at_pause[i] + 3;
	int r = vm_wait(dst, passes_beyond, &t, PASS_TIMEOUT_MS);
	print_message("%.1fs after the start of the copy: %s\n", (double)(tu_now_ns() - t0) / 1e9,
		      r == 0 ? "done waiting" : "timed out");

	struct vm_vcpu_stats total;
	vm_stats_total(dst, &total);
	bool ok = r == 0 && vm_state(dst) != VM_FAILED && total.errors == 0;
	if (!ok)
		tu_dump_console(dst);
	assert_int_equal(r, 0);
	assert_int_not_equal(vm_state(dst), VM_FAILED);
	assert_int_equal(total.errors, 0);
	/* It went on from where it was rather than starting over: no vCPU said READY again. */
	assert_int_equal(total.ready, 0);
	for (unsigned i = 0; i < MOVE_VCPUS; i++) {
		struct vm_vcpu_stats s;
		vm_vcpu_stats(dst, i, &s);
		print_message("vcpu %u: passes %" PRIu64 " -> %" PRIu64 "\n", i, at_pause[i],
			      s.passes);
		assert_true(s.passes >= at_pause[i] + 3);
	}
	assert_int_equal(vm_pause(dst), 0);
	vm_free(dst);
}

static void test_move_corrupt_page_detected(void **state)
{
	(void)state;
	uint64_t at_pause[MOVE_VCPUS];
	struct vm *dst = run_and_move(CONTROL_MEM, true, at_pause);

	/* The bad page is verified within the pass under way or the next one. */
	int r = vm_wait(dst, has_errors, NULL, PASS_TIMEOUT_MS);
	if (r < 0)
		tu_dump_console(dst);
	assert_int_equal(r, 0);
	assert_int_not_equal(vm_state(dst), VM_FAILED);

	struct vm_guest_error ge[VM_ERRORS_KEPT];
	unsigned n = vm_guest_errors(dst, ge, VM_ERRORS_KEPT);
	assert_true(n >= 1);
	print_message("memcheck: vcpu %u kind %u at %#" PRIx64 " expected %#" PRIx64
		      " found %#" PRIx64 "\n",
		      ge[0].vcpu, ge[0].kind, ge[0].gpa, ge[0].expected, ge[0].found);
	assert_int_equal(ge[0].vcpu, 0);
	assert_int_equal(ge[0].kind, FERRY_ERR_CSUM);
	assert_true(ge[0].gpa >> 12 == CORRUPT_GPA >> 12);
	assert_int_equal(vm_pause(dst), 0);
	vm_free(dst);
}

int main(void)
{
	tu_require_kvm();
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_move_continues),
	    cmocka_unit_test(test_move_corrupt_page_detected),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
