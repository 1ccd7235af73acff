// SPDX-License-Identifier: Apache-2.0
/*
 * Description: impossible VM shapes (0 vCPUs, unaligned memory, more vCPUs or memory than
 * the host has, too many memslots, a bad ring size) are refused with a clear message, and
 * nothing is left behind: no fd and no mapping leak across many refused attempts.
 */
#include "testutil.h"

#include <dirent.h>
#include <errno.h>
#include <string.h>
#include <unistd.h>

static unsigned count_fds(void)
{
	unsigned n = 0;
	DIR *d = opendir("/proc/self/fd");
	assert_non_null(d);
	while (readdir(d))
		n++;
	closedir(d);
	return n;
}

static void expect_refused(struct vm_config *cfg, int want, const char *needle)
{
	struct vm *vm = NULL;
	struct vm_error err = {{0}};
	int r = vm_new(cfg, &vm, &err);
	if (r != want)
		fail_msg("expected %d, got %d (%s)", want, r, err.msg);
	assert_null(vm);
	if (!strstr(err.msg, needle))
		fail_msg("message '%s' lacks '%s'", err.msg, needle);
}

static void refused_shapes(void **state)
{
	(void)state;
	struct vm_config cfg;
	unsigned fds = count_fds();

	for (int round = 0; round < 20; round++) {
		vm_config_init(&cfg, "bad");
		cfg.vcpus = 0;
		expect_refused(&cfg, -EINVAL, "at least 1 vCPU");

		vm_config_init(&cfg, "bad");
		cfg.mem_size = (64ull << 20) + 123;
		expect_refused(&cfg, -EINVAL, "not a multiple");

		vm_config_init(&cfg, "bad");
		cfg.mem_size = 0;
		expect_refused(&cfg, -EINVAL, "memory size is 0");

		vm_config_init(&cfg, "bad");
		cfg.vcpus = 100000;
		expect_refused(&cfg, -E2BIG, "at most");

		vm_config_init(&cfg, "bad");
		cfg.mem_size = 1ull << 50; /* 1 PiB */
		expect_refused(&cfg, -E2BIG, "RAM");

		vm_config_init(&cfg, "bad");
		cfg.mem_size = 256ull << 20;
		cfg.slot_size = 1ull << 20; /* 256 slots */
		expect_refused(&cfg, -E2BIG, "memslots");

		vm_config_init(&cfg, "bad");
		cfg.tracker.ring_entries = 1000;
		expect_refused(&cfg, -EINVAL, "power of two");

		vm_config_init(&cfg, "bad");
		cfg.hugepages = true;
		cfg.mem_size = (2ull << 20) + 4096;
		expect_refused(&cfg, -EINVAL, "not a multiple");
	}
	assert_int_equal(count_fds(), fds);
}

static void good_shape_and_teardown(void **state)
{
	(void)state;
	unsigned fds = count_fds();
	for (int i = 0; i < 5; i++) {
		struct vm_config cfg;
		struct vm *vm = NULL;
		struct vm_error err = {{0}};
		vm_config_init(&cfg, "good");
		cfg.mem_size = 64ull << 20;
		cfg.slot_size = 16ull << 20;
		cfg.vcpus = 4;
		int r = vm_new(&cfg, &vm, &err);
		if (r < 0)
			fail_msg("vm_new: %s", err.msg);
		assert_int_equal(vm_nr_slots(vm), 4);
		for (unsigned s = 0; s < 4; s++) {
			assert_int_equal(vm_slot(vm, s)->gpa, s * (16ull << 20));
			assert_int_equal(vm_slot(vm, s)->size, 16ull << 20);
		}
		assert_int_equal(vm_state(vm), VM_CREATED);
		/* Nothing loaded: starting is refused. */
		assert_int_equal(vm_start(vm), -ENOEXEC);
		assert_int_equal(vm_pause(vm), 0);
		vm_free(vm);
	}
	vm_free(NULL);
	assert_int_equal(count_fds(), fds);
}

int main(void)
{
	tu_require_kvm();
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(refused_shapes),
		cmocka_unit_test(good_shape_and_teardown),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
