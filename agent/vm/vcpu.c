// SPDX-License-Identifier: Apache-2.0
/*
 * vCPU threads: one named thread per vCPU running KVM_RUN in a loop and dispatching exits
 * (serial port, debug port, dirty-ring-full, halts, failures), plus pause/resume. A pause
 * sets want_run = false, then kicks every vCPU with immediate_exit = 1 and a signal, so a
 * vCPU inside KVM_RUN returns with EINTR and one about to enter returns at once; the pause
 * returns only when every thread is parked. That kick is also what flushes hardware dirty
 * buffers into the rings before a final harvest (DESIGN.md rule 3).
 */
#include "vm_internal.h"

#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>

/* A real-time signal, so it does not collide with SIGUSR1/2 users in the agent. */
#define KICK_SIGNAL (SIGRTMIN + 1)
#define MAX_GUEST_SLEEP_NS 1000000000ull

/* Serial (COM1) register offsets we answer. */
#define UART_IIR 2
#define UART_LSR 5
#define UART_LSR_IDLE 0x60 /* transmitter empty, holding register empty */

static const char *const exit_names[] = {
	[KVM_EXIT_UNKNOWN] = "unknown",
	[KVM_EXIT_EXCEPTION] = "exception",
	[KVM_EXIT_IO] = "io",
	[KVM_EXIT_HYPERCALL] = "hypercall",
	[KVM_EXIT_DEBUG] = "debug",
	[KVM_EXIT_HLT] = "hlt",
	[KVM_EXIT_MMIO] = "mmio",
	[KVM_EXIT_IRQ_WINDOW_OPEN] = "irq_window_open",
	[KVM_EXIT_SHUTDOWN] = "shutdown (triple fault)",
	[KVM_EXIT_FAIL_ENTRY] = "fail_entry",
	[KVM_EXIT_INTR] = "intr",
	[KVM_EXIT_SET_TPR] = "set_tpr",
	[KVM_EXIT_TPR_ACCESS] = "tpr_access",
	[KVM_EXIT_NMI] = "nmi",
	[KVM_EXIT_INTERNAL_ERROR] = "internal_error",
	[KVM_EXIT_SYSTEM_EVENT] = "system_event",
	[KVM_EXIT_DIRTY_RING_FULL] = "dirty_ring_full",
};

static const char *exit_name(uint32_t reason)
{
	if (reason < sizeof(exit_names) / sizeof(exit_names[0]) && exit_names[reason])
		return exit_names[reason];
	return "unhandled";
}

static void kick_handler(int sig)
{
	(void)sig; /* only here to make KVM_RUN return EINTR */
}

static void vcpu_kick(struct vcpu *v)
{
	if (!v->thread_started)
		return;
	/* Set before the signal: a vCPU about to enter KVM_RUN then leaves at once. */
	__atomic_store_n(&v->run->immediate_exit, 1, __ATOMIC_SEQ_CST);
	pthread_kill(v->thread, KICK_SIGNAL);
}

static void kick_all(struct vm *vm)
{
	for (unsigned i = 0; i < vm->cfg.vcpus; i++)
		vcpu_kick(&vm->vcpus[i]);
}

void vm_fail(struct vm *vm, const char *fmt, ...)
{
	pthread_mutex_lock(&vm->lock);
	if (vm->run_state != VM_FAILED) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(vm->failure, sizeof(vm->failure), fmt, ap);
		va_end(ap);
		vm->run_state = VM_FAILED;
	}
	vm->want_run = false;
	pthread_cond_broadcast(&vm->cond);
	pthread_mutex_unlock(&vm->lock);
	kick_all(vm);
	char line[VM_ERR_MAX + 32];
	int n = snprintf(line, sizeof(line), "\n[ferry] VM failed: %s\n", vm->failure);
	if (n > 0)
		vm_console_put(vm, line, (size_t)n < sizeof(line) ? (size_t)n : sizeof(line) - 1);
}

static bool should_park(struct vm *vm)
{
	pthread_mutex_lock(&vm->lock);
	bool park = vm->stopping || !vm->want_run;
	pthread_mutex_unlock(&vm->lock);
	return park;
}

/* The ticker's exit test: the VM is stopping (a paused VM keeps its throttle). */
static bool should_park_all(struct vm *vm)
{
	pthread_mutex_lock(&vm->lock);
	bool stop = vm->stopping;
	pthread_mutex_unlock(&vm->lock);
	return stop;
}

static void notify(struct vm *vm)
{
	pthread_mutex_lock(&vm->lock);
	pthread_cond_broadcast(&vm->cond);
	pthread_mutex_unlock(&vm->lock);
}

static void guest_sleep(uint64_t ns)
{
	if (ns > MAX_GUEST_SLEEP_NS)
		ns = MAX_GUEST_SLEEP_NS;
	struct timespec ts = {.tv_sec = (time_t)(ns / 1000000000ull),
			      .tv_nsec = (long)(ns % 1000000000ull)};
	/* A kick interrupts the sleep (EINTR), so pausing never waits for it. */
	nanosleep(&ts, NULL);
}

/*
 * Called by the vCPU thread after every return from KVM_RUN (the ticker's kicks make sure
 * that happens every few ms). A throttled vCPU keeps the account since its level was set:
 * it owes pct % of the time elapsed since then, minus what it already slept, and sleeps off
 * what it owes once that reaches half a slice (at most a second at a time). Keeping
 * the account, rather than sleeping a fixed amount per kick, holds the share even when the
 * thread gets the CPU late on a busy host. The sleep has an absolute deadline (kicks do not
 * cut it short) but ends at once when the VM is to pause or stop.
 */
static void throttle_point(struct vcpu *v)
{
	uint32_t pct = atomic_load_explicit(&v->throttle_pct, memory_order_relaxed);

	if (!pct && !v->seen_pct)
		return; /* every exit of an unthrottled vCPU: not even a clock read */
	uint64_t now = vm_now_ns();
	if (pct != v->seen_pct) {
		v->seen_pct = pct;
		v->account_start_ns = now;
		v->account_held_ns = 0;
	}
	if (!pct)
		return;
	const uint64_t slice = VM_THROTTLE_SLICE_MS * 1000000ull;
	uint64_t owed = (now - v->account_start_ns) * pct / 100u;
	if (owed < v->account_held_ns + slice / 2)
		return;
	owed -= v->account_held_ns;
	/* Long sleeps are fine: a pause kicks the thread out of it at once. */
	if (owed > 100 * slice)
		owed = 100 * slice;
	uint64_t end = now + owed;
	while (!should_park(v->vm)) {
		if (vm_now_ns() >= end)
			break;
		struct timespec ts = {.tv_sec = (time_t)(end / 1000000000ull),
				      .tv_nsec = (long)(end % 1000000000ull)};
		clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
	}
	uint64_t held = vm_now_ns() - now;
	v->account_held_ns += held;
	atomic_fetch_add_explicit(&v->throttle_sleep_ns, held, memory_order_relaxed);
}

static void *throttle_main(void *arg)
{
	struct vm *vm = arg;

	for (;;) {
		pthread_mutex_lock(&vm->throttle_lock);
		bool done = !atomic_load(&vm->nr_throttled) || should_park_all(vm);
		if (done)
			vm->throttle_running = false;
		pthread_mutex_unlock(&vm->throttle_lock);
		if (done)
			return NULL;
		struct timespec ts = {.tv_nsec = (long)VM_THROTTLE_SLICE_MS * 1000000l / 2};
		nanosleep(&ts, NULL);
		for (unsigned i = 0; i < vm->cfg.vcpus; i++) {
			struct vcpu *v = &vm->vcpus[i];
			/* A plain signal: KVM_RUN returns EINTR, the vCPU takes its sleep. */
			if (atomic_load(&v->throttle_pct) && v->thread_started)
				pthread_kill(v->thread, KICK_SIGNAL);
		}
	}
}

int vm_vcpu_set_throttle(struct vm *vm, unsigned idx, unsigned pct)
{
	if (!vm || idx >= vm->cfg.vcpus || pct > VM_THROTTLE_MAX_PCT)
		return -EINVAL;
	struct vcpu *v = &vm->vcpus[idx];
	pthread_mutex_lock(&vm->throttle_lock);
	uint32_t old = atomic_exchange(&v->throttle_pct, pct);
	if (!old && pct)
		atomic_fetch_add(&vm->nr_throttled, 1);
	else if (old && !pct)
		atomic_fetch_sub(&vm->nr_throttled, 1);
	int r = 0;
	if (atomic_load(&vm->nr_throttled) && !vm->throttle_running) {
		if (vm->throttle_thread_joinable) {
			pthread_join(vm->throttle_thread, NULL);
			vm->throttle_thread_joinable = false;
		}
		r = -pthread_create(&vm->throttle_thread, NULL, throttle_main, vm);
		if (r == 0) {
			char name[16];
			snprintf(name, sizeof(name), "throttle-%.6s", vm->cfg.name);
			pthread_setname_np(vm->throttle_thread, name);
			vm->throttle_running = true;
			vm->throttle_thread_joinable = true;
		}
	}
	pthread_mutex_unlock(&vm->throttle_lock);
	return r;
}

void vm_clear_throttle(struct vm *vm)
{
	if (!vm || !vm->vcpus)
		return;
	for (unsigned i = 0; i < vm->cfg.vcpus; i++)
		vm_vcpu_set_throttle(vm, i, 0);
}

/* Stops the ticker for good (vm_free). */
void vm_throttle_stop(struct vm *vm)
{
	vm_clear_throttle(vm);
	pthread_mutex_lock(&vm->throttle_lock);
	bool join = vm->throttle_thread_joinable;
	vm->throttle_thread_joinable = false;
	pthread_mutex_unlock(&vm->throttle_lock);
	if (join)
		pthread_join(vm->throttle_thread, NULL);
}

static void console_note(struct vm *vm, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));
static void console_note(struct vm *vm, const char *fmt, ...)
{
	char line[160];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	if (n > 0)
		vm_console_put(vm, line, (size_t)n < sizeof(line) ? (size_t)n : sizeof(line) - 1);
}

/* A guest wrote the address of a struct ferry_dbg_rec to the debug port. */
static void debug_record(struct vcpu *v, uint32_t gpa)
{
	struct vm *vm = v->vm;
	struct ferry_dbg_rec rec;
	const void *p = vm_gpa_to_hva(vm, gpa, sizeof(rec));

	if (!p) {
		console_note(vm, "[ferry] %s: debug record at 0x%x is outside RAM, ignored\n",
			     v->name, gpa);
		return;
	}
	memcpy(&rec, p, sizeof(rec));
	if (rec.magic != FERRY_DBG_MAGIC || rec.type == 0 || rec.type > FERRY_DBG_TYPE_MAX) {
		console_note(vm, "[ferry] %s: malformed debug record (magic %#x type %u), ignored\n",
			     v->name, rec.magic, rec.type);
		return;
	}
	switch ((enum ferry_dbg_type)rec.type) {
	case FERRY_DBG_READY:
		atomic_fetch_add(&v->ready, 1);
		break;
	case FERRY_DBG_PROGRESS:
		atomic_store(&v->passes, rec.a[0]);
		atomic_store(&v->pages, rec.a[1]);
		break;
	case FERRY_DBG_ERROR:
		/* Record first, count after: a waiter that sees the count finds the record. */
		pthread_mutex_lock(&vm->lock);
		if (vm->nr_errors < VM_ERRORS_KEPT)
			vm->errors[vm->nr_errors++] = (struct vm_guest_error){
				.vcpu = v->idx,
				.kind = (uint32_t)rec.a[1],
				.gpa = rec.a[0],
				.expected = rec.a[2],
				.found = rec.a[3],
			};
		atomic_fetch_add(&v->errors, 1);
		pthread_mutex_unlock(&vm->lock);
		break;
	case FERRY_DBG_SLEEP:
		atomic_fetch_add(&v->sleep_ns, rec.a[0]);
		guest_sleep(rec.a[0]);
		return; /* nothing for waiters to see */
	case FERRY_DBG_DONE:
		atomic_store(&v->done_gen, rec.a[0]);
		break;
	}
	notify(vm);
}

static void handle_io(struct vcpu *v)
{
	struct kvm_run *run = v->run;
	uint8_t *data = (uint8_t *)run + run->io.data_offset;
	size_t bytes = (size_t)run->io.size * run->io.count;
	uint16_t port = run->io.port;

	atomic_fetch_add(&v->io_exits, 1);
	/* KVM guarantees data lies in the kvm_run page area; check it anyway. */
	if (run->io.data_offset >= v->run_size || bytes > v->run_size - run->io.data_offset)
		return;
	if (run->io.direction == KVM_EXIT_IO_OUT) {
		if (port == FERRY_SERIAL_PORT && run->io.size == 1)
			vm_console_put(v->vm, (const char *)data, bytes);
		else if (port == FERRY_DEBUG_PORT && run->io.size == 4) {
			for (uint32_t i = 0; i < run->io.count; i++) {
				uint32_t gpa;
				memcpy(&gpa, data + 4 * i, 4);
				debug_record(v, gpa);
			}
		}
		/* Other ports (A20 at 0x92, POST codes, ...) are ignored. */
		return;
	}
	uint8_t val = 0xff;
	if (port >= FERRY_SERIAL_PORT && port < FERRY_SERIAL_PORT + 8) {
		unsigned reg = port - FERRY_SERIAL_PORT;
		val = reg == UART_LSR ? UART_LSR_IDLE : reg == UART_IIR ? 0x01 : 0;
	}
	memset(data, val, bytes);
}

/* Returns false when the thread should park until the next state change (halted). */
static bool handle_exit(struct vcpu *v)
{
	struct vm *vm = v->vm;
	struct kvm_run *run = v->run;

	switch (run->exit_reason) {
	case KVM_EXIT_IO:
		handle_io(v);
		return true;
	case KVM_EXIT_MMIO:
		/* No MMIO devices: reads see all-ones, writes vanish. */
		if (!run->mmio.is_write)
			memset(run->mmio.data, 0xff, sizeof(run->mmio.data));
		return true;
	case KVM_EXIT_DIRTY_RING_FULL: {
		atomic_fetch_add(&v->ring_full_exits, 1);
		int r = tracker_vcpu_ring_full(vm->tracker, v->idx);
		if (r < 0)
			vm_fail(vm, "%s: harvesting a full dirty ring: %s", v->name, strerror(-r));
		return true;
	}
	case KVM_EXIT_HLT:
		/* No in-kernel irqchip, so nothing can wake it: sleep until resumed. */
		return false;
	case KVM_EXIT_INTR:
		return true;
	case KVM_EXIT_FAIL_ENTRY:
		vm_fail(vm, "%s: VM entry failed, hardware reason %#llx", v->name,
			(unsigned long long)run->fail_entry.hardware_entry_failure_reason);
		return false;
	case KVM_EXIT_INTERNAL_ERROR:
		vm_fail(vm, "%s: KVM internal error, suberror %u", v->name,
			run->internal.suberror);
		return false;
	case KVM_EXIT_SYSTEM_EVENT:
		vm_fail(vm, "%s: guest requested system event %u (reset/shutdown)", v->name,
			run->system_event.type);
		return false;
	default: {
		struct kvm_regs regs;
		unsigned long long rip = 0;
		if (ioctl(v->fd, KVM_GET_REGS, &regs) == 0)
			rip = regs.rip;
		vm_fail(vm, "%s: exit %s (%u) at rip %#llx", v->name,
			exit_name(run->exit_reason), run->exit_reason, rip);
		return false;
	}
	}
}

/*
 * KVM finishes an IN/OUT or MMIO instruction (advances RIP, stores IN data) only on the next
 * KVM_RUN. Before a vCPU parks — where its state may be saved — run it once with
 * immediate_exit set, which completes the instruction and returns at once.
 */
static void complete_pending_io(struct vcpu *v)
{
	__atomic_store_n(&v->run->immediate_exit, 1, __ATOMIC_SEQ_CST);
	while (ioctl(v->fd, KVM_RUN, 0) == 0) {
		/* Entered the guest anyway (cannot happen with immediate_exit): dispatch it. */
		handle_exit(v);
	}
	__atomic_store_n(&v->run->immediate_exit, 0, __ATOMIC_SEQ_CST);
}


static void *vcpu_thread(void *arg)
{
	struct vcpu *v = arg;
	struct vm *vm = v->vm;
	bool halted = false, io_pending = false;

	for (;;) {
		if (io_pending && should_park(vm))
			complete_pending_io(v);
		io_pending = false;
		pthread_mutex_lock(&vm->lock);
		if (halted && vm->want_run && !vm->stopping) {
			/* Halted: stay parked until the VM is paused (and resumed) or stopped. */
			v->parked = true;
			vm->nr_parked++;
			pthread_cond_broadcast(&vm->cond);
			while (vm->want_run && !vm->stopping)
				pthread_cond_wait(&vm->cond, &vm->lock);
		}
		halted = false;
		while (!vm->stopping && !vm->want_run) {
			if (!v->parked) {
				v->parked = true;
				vm->nr_parked++;
				pthread_cond_broadcast(&vm->cond);
			}
			pthread_cond_wait(&vm->cond, &vm->lock);
		}
		if (v->parked) {
			v->parked = false;
			vm->nr_parked--;
		}
		bool stop = vm->stopping;
		pthread_mutex_unlock(&vm->lock);
		if (stop)
			break;

		if (ioctl(v->fd, KVM_RUN, 0) < 0) {
			int e = errno;
			if (e == EINTR || e == EAGAIN) {
				__atomic_store_n(&v->run->immediate_exit, 0, __ATOMIC_SEQ_CST);
				throttle_point(v);
				continue;
			}
			vm_fail(vm, "%s: KVM_RUN: %s", v->name, strerror(e));
			continue;
		}
		atomic_fetch_add(&v->exits, 1);
		uint32_t reason = v->run->exit_reason;
		if (!handle_exit(v))
			halted = true;
		io_pending = reason == KVM_EXIT_IO || reason == KVM_EXIT_MMIO;
		throttle_point(v);
	}
	return NULL;
}

int vcpu_threads_start(struct vm *vm)
{
	struct sigaction sa = {.sa_handler = kick_handler};
	sigemptyset(&sa.sa_mask);
	/* No SA_RESTART: the kick must interrupt KVM_RUN and guest sleeps. */
	if (sigaction(KICK_SIGNAL, &sa, NULL) < 0)
		return -errno;

	for (unsigned i = 0; i < vm->cfg.vcpus; i++) {
		struct vcpu *v = &vm->vcpus[i];
		int r = pthread_create(&v->thread, NULL, vcpu_thread, v);
		if (r)
			return -r;
		v->thread_started = true;
		pthread_setname_np(v->thread, v->name);
	}
	/* Wait until every thread parked, so a pause right away has nothing to race. */
	pthread_mutex_lock(&vm->lock);
	while (vm->nr_parked < vm->cfg.vcpus)
		pthread_cond_wait(&vm->cond, &vm->lock);
	pthread_mutex_unlock(&vm->lock);
	return 0;
}

void vcpu_threads_stop(struct vm *vm)
{
	if (!vm->vcpus)
		return;
	pthread_mutex_lock(&vm->lock);
	vm->stopping = true;
	vm->want_run = false;
	pthread_cond_broadcast(&vm->cond);
	pthread_mutex_unlock(&vm->lock);
	kick_all(vm);
	for (unsigned i = 0; i < vm->cfg.vcpus; i++) {
		struct vcpu *v = &vm->vcpus[i];
		if (v->thread_started) {
			pthread_join(v->thread, NULL);
			v->thread_started = false;
		}
	}
}

int vm_start(struct vm *vm)
{
	pthread_mutex_lock(&vm->lock);
	int r = 0;
	if (!vm->loaded)
		r = -ENOEXEC; /* nothing to run: no guest loaded, no state restored */
	else if (vm->run_state == VM_FAILED)
		r = -EIO;
	else if (vm->run_state != VM_RUNNING) {
		vm->run_state = VM_RUNNING;
		vm->want_run = true;
		pthread_cond_broadcast(&vm->cond);
	}
	pthread_mutex_unlock(&vm->lock);
	return r;
}

int vm_resume(struct vm *vm)
{
	return vm_start(vm);
}

int vm_pause(struct vm *vm)
{
	pthread_mutex_lock(&vm->lock);
	vm->want_run = false;
	if (vm->run_state == VM_RUNNING)
		vm->run_state = VM_PAUSED;
	pthread_mutex_unlock(&vm->lock);
	kick_all(vm);
	pthread_mutex_lock(&vm->lock);
	while (vm->nr_parked < vm->cfg.vcpus && !vm->stopping)
		pthread_cond_wait(&vm->cond, &vm->lock);
	pthread_mutex_unlock(&vm->lock);
	return 0;
}
