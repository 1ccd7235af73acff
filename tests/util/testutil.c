// SPDX-License-Identifier: Apache-2.0
/* Shared helpers for ferry's cmocka tests (see testutil.h). */
#include "testutil.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <sys/ioctl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

void tu_require_kvm(void)
{
	int fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (fd < 0) {
		fprintf(stderr, "SKIP: /dev/kvm: %s\n", strerror(errno));
		exit(TU_SKIP);
	}
	close(fd);
}

void tu_require_backend(enum tracker_backend b)
{
	tu_require_kvm();
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	int vmfd = kvm >= 0 ? ioctl(kvm, KVM_CREATE_VM, 0) : -1;
	unsigned avail = vmfd >= 0 ? tracker_backends_available(vmfd) : 0;
	if (vmfd >= 0)
		close(vmfd);
	if (kvm >= 0)
		close(kvm);
	if (!(avail & (1u << b))) {
		fprintf(stderr, "SKIP: dirty tracking backend %s not offered by this kernel\n",
			tracker_backend_name(b));
		exit(TU_SKIP);
	}
}

uint64_t tu_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

struct vm *tu_vm_builtin_cfg(const struct vm_config *cfg, const char *guest,
			     const char *const *params)
{
	struct vm_error err = {{0}};
	struct ferry_param p[FERRY_PARAM_MAX];
	unsigned n = 0;
	for (; params && params[n]; n++) {
		assert_true(n < FERRY_PARAM_MAX);
		int r = vm_param_parse(guest, params[n], &p[n], &err);
		if (r < 0)
			fail_msg("param %s: %s", params[n], err.msg);
	}
	const struct vm_builtin_guest *g = vm_builtin_guest_find(guest);
	if (!g)
		fail_msg("no built-in guest %s", guest);
	struct vm *vm = NULL;
	int r = vm_new(cfg, &vm, &err);
	if (r < 0)
		fail_msg("vm_new: %s (%s)", strerror(-r), err.msg);
	r = vm_load_flat(vm, g->image, g->size, p, n, &err);
	if (r < 0)
		fail_msg("vm_load_flat: %s (%s)", strerror(-r), err.msg);
	return vm;
}

struct vm *tu_vm_builtin(const char *name, const char *guest, uint64_t mem, unsigned vcpus,
			 enum tracker_backend backend, const char *const *params)
{
	struct vm_config cfg;
	vm_config_init(&cfg, name);
	cfg.mem_size = mem;
	cfg.vcpus = vcpus;
	cfg.tracker.backend = backend;
	return tu_vm_builtin_cfg(&cfg, guest, params);
}

bool tu_all_ready(struct vm *vm, void *arg)
{
	(void)arg;
	if (vm_state(vm) == VM_FAILED)
		return true;
	for (unsigned i = 0; i < vm_config(vm)->vcpus; i++) {
		struct vm_vcpu_stats s;
		vm_vcpu_stats(vm, i, &s);
		if (!s.ready)
			return false;
	}
	return true;
}

uint64_t tu_min_passes(const struct vm *vm)
{
	uint64_t min = UINT64_MAX;
	for (unsigned i = 0; i < vm_config(vm)->vcpus; i++) {
		struct vm_vcpu_stats s;
		vm_vcpu_stats(vm, i, &s);
		if (s.passes < min)
			min = s.passes;
	}
	return min;
}

static bool passes_reached(struct vm *vm, void *arg)
{
	return tu_min_passes(vm) >= *(uint64_t *)arg || vm_state(vm) == VM_FAILED;
}

int tu_wait_passes(struct vm *vm, uint64_t passes, int timeout_ms)
{
	return vm_wait(vm, passes_reached, &passes, timeout_ms);
}

void tu_dump_console(struct vm *vm)
{
	char buf[4096];
	uint64_t pos = 0;
	size_t n;
	fprintf(stderr, "---- console of %s ----\n", vm_name(vm));
	while ((n = vm_console_read(vm, &pos, buf, sizeof(buf))) > 0)
		fwrite(buf, 1, n, stderr);
	fprintf(stderr, "---- end of console ----\n");
}
