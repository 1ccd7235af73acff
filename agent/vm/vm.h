/* SPDX-License-Identifier: Apache-2.0 */
/*
 * ferry's small VMM: one KVM VM with memfd-backed guest RAM split into memslots, one named
 * thread per vCPU, a COM1 serial port captured into a console buffer, a debug port through
 * which guests report structured results, pause/resume by signal kick plus immediate_exit,
 * guest loaders (boot sector in real mode, flat 64-bit images in long mode) and vCPU/VM state
 * save and restore in a versioned, bounds-checked format.
 *
 * Threads: vm_* calls are made by one controlling thread at a time (the agent serialises
 * them per VM). vCPU threads only touch their own struct vcpu, the console (under
 * console_lock), the stats atomics and the tracker's per-ring entry point.
 */
#ifndef FERRY_VM_H
#define FERRY_VM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "guest_abi.h"
#include "tracker/tracker.h"

#define VM_NAME_MAX 64u
#define VM_MAX_VCPUS 64u
#define VM_CONSOLE_SIZE (64u * 1024u)
#define VM_ERR_MAX 256u
#define VM_ERRORS_KEPT 16u

/* A human-readable reason to go with a -errno, filled by the call that failed. */
struct vm_error {
	char msg[VM_ERR_MAX];
};

enum vm_guest_kind {
	VM_GUEST_NONE = 0, /* no loader: memory and state arrive later (migration target) */
	VM_GUEST_BOOT,     /* 512-byte boot sector, real mode at 0x7c00 */
	VM_GUEST_FLAT,     /* flat 64-bit image with a struct ferry_image_hdr */
};

struct vm_config {
	char name[VM_NAME_MAX];
	uint64_t mem_size;   /* bytes, multiple of 4 KiB (2 MiB with hugepages) */
	uint32_t vcpus;
	uint64_t slot_size;  /* max bytes per memslot; 0 = one slot for all of RAM */
	bool hugepages;      /* back RAM with 2 MiB hugetlb pages */
	bool irqchip;        /* in-kernel LAPIC/IOAPIC (KVM_CREATE_IRQCHIP) */
	struct tracker_config tracker;
};

/* Fills cfg with defaults: 1 vCPU, 64 MiB, one slot, irqchip on, tracker auto. */
void vm_config_init(struct vm_config *cfg, const char *name);

enum vm_run_state {
	VM_CREATED = 0, /* vCPU threads exist but never ran */
	VM_RUNNING,
	VM_PAUSED,
	VM_FAILED,      /* a vCPU hit an unrecoverable exit; see vm_failure() */
};
const char *vm_run_state_name(enum vm_run_state s);

struct vm_slot {
	uint32_t slot;
	uint64_t gpa;
	uint64_t size;
	void *hva;
	int memfd;
};

/* What the guests reported through the debug port, per vCPU. */
struct vm_vcpu_stats {
	uint64_t exits;
	uint64_t io_exits;
	uint64_t ring_full_exits;
	uint64_t ready;      /* FERRY_DBG_READY seen */
	uint64_t passes;     /* last FERRY_DBG_PROGRESS a0 */
	uint64_t pages;      /* last FERRY_DBG_PROGRESS a1 */
	uint64_t errors;     /* FERRY_DBG_ERROR count */
	uint64_t done_gen;   /* last FERRY_DBG_DONE a0 */
	uint64_t sleep_ns;   /* total asked for with FERRY_DBG_SLEEP */
	uint32_t throttle_pct;      /* vm_vcpu_set_throttle: share of time held back */
	uint64_t throttle_sleep_ns; /* total time held back by the throttle */
};

/* A FERRY_DBG_ERROR record, kept for the operator (the first VM_ERRORS_KEPT). */
struct vm_guest_error {
	uint32_t vcpu;
	uint32_t kind; /* enum ferry_dbg_err */
	uint64_t gpa;
	uint64_t expected;
	uint64_t found;
};

struct vm;

/*
 * Creates the VM: KVM fd, tracker (before any vCPU), memslots, vCPUs with their threads
 * parked. Validates the shape first: -EINVAL for 0 vCPUs or unaligned memory, -E2BIG when
 * vCPUs or memory exceed host limits; err says which. Nothing is left behind on failure.
 */
int vm_new(const struct vm_config *cfg, struct vm **ret, struct vm_error *err);
/* Stops the vCPU threads and frees everything. NULL-safe; works on half-built VMs. */
void vm_free(struct vm *vm);

/* Loaders, before vm_start(). Bad images get -EINVAL (malformed) or -EFBIG (too big). */
int vm_load_boot_sector(struct vm *vm, const void *img, size_t len, struct vm_error *err);
int vm_load_flat(struct vm *vm, const void *img, size_t len, const struct ferry_param *params,
		 unsigned nr_params, struct vm_error *err);

/* Starts (or, after pause, resumes) all vCPUs. */
int vm_start(struct vm *vm);
/* Kicks every vCPU out of KVM_RUN and waits until all are parked. Idempotent. */
int vm_pause(struct vm *vm);
int vm_resume(struct vm *vm);
enum vm_run_state vm_state(const struct vm *vm);
/* Why the VM failed ("" when it has not). */
const char *vm_failure(const struct vm *vm);

const struct vm_config *vm_config(const struct vm *vm);
const char *vm_name(const struct vm *vm);
int vm_fd(const struct vm *vm);
unsigned vm_nr_slots(const struct vm *vm);
const struct vm_slot *vm_slot(const struct vm *vm, unsigned i);
/* Host pointer for [gpa, gpa+len) if it lies within one slot, else NULL. */
void *vm_gpa_to_hva(const struct vm *vm, uint64_t gpa, uint64_t len);
struct tracker *vm_tracker(const struct vm *vm);
struct ferry_bootinfo *vm_bootinfo(const struct vm *vm); /* NULL unless a flat guest */

/* Copies console bytes from absolute offset *pos on; returns bytes copied and advances
 * *pos (skipping what the ring buffer already dropped). */
size_t vm_console_read(struct vm *vm, uint64_t *pos, char *buf, size_t len);
void vm_vcpu_stats(const struct vm *vm, unsigned idx, struct vm_vcpu_stats *ret);
/* Totals over all vCPUs. */
void vm_stats_total(const struct vm *vm, struct vm_vcpu_stats *ret);
/*
 * Migration throttling (the scheduler's per-vCPU dirty limits, turned into time): vCPU idx
 * runs only (100 - pct) % of the time from now on, in slices of VM_THROTTLE_SLICE_MS of
 * running followed by the matching sleep (the scheme of QEMU's cpu-throttle). pct 0 lifts
 * it; at most VM_THROTTLE_MAX_PCT. A throttled vCPU still pauses at once. -EINVAL for a bad
 * idx or pct.
 */
#define VM_THROTTLE_SLICE_MS 10u
#define VM_THROTTLE_MAX_PCT 99u
int vm_vcpu_set_throttle(struct vm *vm, unsigned idx, unsigned pct);
/* Lifts every vCPU's throttle (switch-over, cancel, failure). */
void vm_clear_throttle(struct vm *vm);

/* Copies up to max kept guest errors; returns how many were kept. */
unsigned vm_guest_errors(const struct vm *vm, struct vm_guest_error *ret, unsigned max);

/*
 * Waits until pred(vm, arg) holds or timeout_ms passes; pred is re-checked whenever a guest
 * reports through the debug port and at least every 50 ms. Returns 0 or -ETIMEDOUT.
 */
int vm_wait(struct vm *vm, bool (*pred)(struct vm *vm, void *arg), void *arg, int timeout_ms);

/*
 * State save and restore (state.c). The VM must be paused (or never started), else -EBUSY.
 * vm_state_save() returns a malloc'd blob in the versioned format of docs/state-format.md;
 * vm_state_restore() validates all of it before touching any vCPU: -EBADMSG for a truncated
 * or corrupt blob, -EPROTONOSUPPORT for another version, -EINVAL for a blob whose shape does
 * not match this VM. On success it returns the number of MSRs the target refused (>= 0).
 */
int vm_state_save(struct vm *vm, void **ret_blob, size_t *ret_len, struct vm_error *err);
int vm_state_restore(struct vm *vm, const void *blob, size_t len, struct vm_error *err);

/* vCPU file descriptor and kvm_run mapping, for state.c. */
int vm_vcpu_fd(const struct vm *vm, unsigned idx);
/* The system /dev/kvm fd this VM was made with. */
int vm_kvm_fd(const struct vm *vm);

/* Built-in guests (guests.c): flat images compiled into the binary. */
struct vm_builtin_guest {
	const char *name;
	const char *help;
	const unsigned char *image;
	size_t size;
};
const struct vm_builtin_guest *vm_builtin_guest_find(const char *name);
unsigned vm_builtin_guest_count(void);
const struct vm_builtin_guest *vm_builtin_guest_at(unsigned i);

/*
 * Parses "K=V" into a guest parameter. V is a number with an optional K/M/G/T suffix
 * (powers of 1024), or one of the symbolic names the built-in guests know
 * (pattern=seq|random|hotcold). Unknown keys for a built-in guest are errors.
 */
int vm_param_parse(const char *guest, const char *kv, struct ferry_param *ret,
		   struct vm_error *err);

/* Parses sizes like "512M", "1G", "4096". */
int vm_size_parse(const char *s, uint64_t *ret);

#endif
