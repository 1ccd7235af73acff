/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Shared helpers for ferry's cmocka tests: skipping when /dev/kvm is absent (exit 77, which
 * tests/run.sh turns into a failure under CI), building VMs with built-in guests in one
 * call, and waiting on guest progress.
 */
#ifndef FERRY_TESTUTIL_H
#define FERRY_TESTUTIL_H

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "agent/vm/vm.h"

#define TU_SKIP 77

/* Exits 77 when /dev/kvm cannot be opened. */
void tu_require_kvm(void);
/* Exits 77 (a skip, which tests/run.sh fails under CI) unless KVM offers backend b. */
void tu_require_backend(enum tracker_backend b);
uint64_t tu_now_ns(void);

/*
 * Creates and loads (not starts) a VM running built-in guest `guest` with the given shape
 * and NULL-terminated "k=v" params. Fails the test on error.
 */
struct vm *tu_vm_builtin(const char *name, const char *guest, uint64_t mem, unsigned vcpus,
			 enum tracker_backend backend, const char *const *params);
/* Same, from a full config. */
struct vm *tu_vm_builtin_cfg(const struct vm_config *cfg, const char *guest,
			     const char *const *params);

/* vm_wait() predicate: every vCPU sent READY, or the VM failed. */
bool tu_all_ready(struct vm *vm, void *arg);

/* Waits until every vCPU reported at least `passes` passes (memcheck/dirtier). */
int tu_wait_passes(struct vm *vm, uint64_t passes, int timeout_ms);
/* Minimum passes over vCPUs. */
uint64_t tu_min_passes(const struct vm *vm);
/* Prints the VM's console to stderr (for failing tests). */
void tu_dump_console(struct vm *vm);

#endif
