/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The VMM's private structures, shared by vm.c (VM and memory), vcpu.c (threads, run loop,
 * pause), loader.c (guest loaders) and state.c (save/restore). Nothing outside agent/vm
 * includes this file.
 */
#ifndef FERRY_VM_INTERNAL_H
#define FERRY_VM_INTERNAL_H

#include <linux/kvm.h>
#include <pthread.h>
#include <stdatomic.h>

#include "vm.h"

struct vcpu {
	struct vm *vm;
	unsigned idx;
	int fd;
	struct kvm_run *run;
	size_t run_size;
	pthread_t thread;
	bool thread_started;
	char name[16]; /* "vcpu-3" */

	/* Set under vm->lock; true while the thread waits in park(). */
	bool parked;

	/* Counters read by other threads without locks. */
	_Atomic uint64_t exits, io_exits, ring_full_exits;
	_Atomic uint64_t ready, passes, pages, errors, done_gen, sleep_ns;

	/* Throttle: set by vm_vcpu_set_throttle from any thread, read by this vCPU's thread. */
	_Atomic uint32_t throttle_pct;
	_Atomic uint64_t throttle_sleep_ns;
	/* The vCPU thread's own account (throttle_point): level seen, since when, slept since. */
	uint32_t seen_pct;
	uint64_t account_start_ns, account_held_ns;
};

struct vm {
	struct vm_config cfg;
	int kvm_fd;
	int vm_fd;
	struct tracker *tracker;
	struct vm_slot slots[TRACKER_MAX_SLOTS];
	unsigned nr_slots;
	struct vcpu *vcpus; /* cfg.vcpus of them */
	struct kvm_cpuid2 *cpuid;
	uint64_t tsc_khz;
	enum vm_guest_kind guest_kind;
	bool loaded; /* a loader ran or state was restored: vm_start() may run it */
	struct ferry_bootinfo *bootinfo;

	/*
	 * lock guards run_state, want_run, stopping, the vCPUs' parked flags, nr_parked,
	 * failure and errors[]. cond is broadcast when any of them changes and whenever a
	 * guest reports through the debug port (so vm_wait() re-checks its predicate).
	 */
	pthread_mutex_t lock;
	pthread_cond_t cond;
	enum vm_run_state run_state;
	bool want_run;  /* vCPUs should run (false: park) */
	bool stopping;  /* vCPU threads should exit */
	unsigned nr_parked;
	char failure[VM_ERR_MAX];
	struct vm_guest_error errors[VM_ERRORS_KEPT];
	unsigned nr_errors;

	/*
	 * The throttle ticker ("throttle-vmN"), running while any vCPU is throttled: it kicks
	 * the throttled vCPUs out of KVM_RUN every slice so they can take their sleep.
	 * throttle_lock guards the thread's existence (throttle_running, throttle_thread).
	 */
	pthread_mutex_t throttle_lock;
	pthread_t throttle_thread;
	bool throttle_running;
	bool throttle_thread_joinable;
	_Atomic unsigned nr_throttled;

	/* console_lock guards console[] and console_total (bytes ever written). */
	pthread_mutex_t console_lock;
	char console[VM_CONSOLE_SIZE];
	uint64_t console_total;
};

/* vcpu.c */
int vcpu_threads_start(struct vm *vm);
void vcpu_threads_stop(struct vm *vm);
void vm_throttle_stop(struct vm *vm);
/* Records a fatal condition, marks the VM failed; called with vm->lock NOT held. */
void vm_fail(struct vm *vm, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* vm.c */
void vm_console_put(struct vm *vm, const char *p, size_t n);
/* Sets err->msg (if err) and returns e (a -errno). */
int vm_err(struct vm_error *err, int e, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
uint64_t vm_now_ns(void);

#endif
