/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The tracker's private structures, shared by tracker.c (life cycle, slots, logging
 * toggles, take), ring.c (the KVM dirty ring backend) and bitmap.c (KVM_GET_DIRTY_LOG with
 * or without manual protection). Also the KVM constants that Debian 12's uapi headers may
 * lack. Nothing outside tracker/ includes this file.
 */
#ifndef FERRY_TRACKER_INTERNAL_H
#define FERRY_TRACKER_INTERNAL_H

#include <linux/kvm.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>

#include "tracker/dirtyset.h"
#include "tracker/tracker.h"

#ifndef KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
#define KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 168
#endif
#ifndef KVM_CAP_DIRTY_LOG_RING
#define KVM_CAP_DIRTY_LOG_RING 192
#endif
#ifndef KVM_CAP_DIRTY_LOG_RING_ACQ_REL
#define KVM_CAP_DIRTY_LOG_RING_ACQ_REL 223
#endif
#ifndef KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
#define KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE (1 << 0)
#endif
#ifndef KVM_RESET_DIRTY_RINGS
#define KVM_RESET_DIRTY_RINGS _IO(KVMIO, 0xc7)
#endif
#ifndef KVM_DIRTY_GFN_F_DIRTY
#define KVM_DIRTY_GFN_F_DIRTY 1u
#define KVM_DIRTY_GFN_F_RESET 2u
#define KVM_DIRTY_GFN_F_MASK 3u
#endif
/* linux/kvm.h falls back to 0 when asm/kvm.h does not define it; x86's value is 64. */
#if !defined(KVM_DIRTY_LOG_PAGE_OFFSET) || KVM_DIRTY_LOG_PAGE_OFFSET == 0
#undef KVM_DIRTY_LOG_PAGE_OFFSET
#define KVM_DIRTY_LOG_PAGE_OFFSET 64
#endif

#define TRACKER_PAGE_SHIFT 12u
#define TRACKER_PAGE_SIZE (1ull << TRACKER_PAGE_SHIFT)

/* A harvested ring entry waiting to be published: (slot index << 56) | page in slot. */
#define TRACKER_PENDING_SLOT_SHIFT 56u
#define TRACKER_PENDING_PAGE_MASK ((1ull << TRACKER_PENDING_SLOT_SHIFT) - 1)

/* One memslot as the tracker sees it. Written once by tracker_slot_add(), then read-only. */
struct tracker_slot_state {
	struct tracker_slot desc;
	uint64_t npages;
	struct dirtyset *ds;
	/* Bitmap and legacy: KVM_GET_DIRTY_LOG lands here, ceil(npages/64) words. */
	uint64_t *scratch;
};

/* One vCPU's dirty ring. */
struct tracker_ring {
	/*
	 * lock serialises everything below except dirty_count: the fetch index, the RESET
	 * stores into gfns[] and the pending[] buffer. Taken by the vCPU's own thread on a
	 * ring-full exit and by tracker_sync(); never held together with another ring's lock.
	 */
	pthread_mutex_t lock;
	bool lock_ready;
	struct kvm_dirty_gfn *gfns; /* the vCPU's ring, mmap'd; NULL until attached */
	uint32_t fetch;             /* free-running index of the next entry to look at */
	/*
	 * Entries harvested (RESET already stored) whose pages are not yet in the dirty set.
	 * They are published only after a KVM_RESET_DIRTY_RINGS that started after their
	 * RESET stores has returned, so that nobody can take, and read, a page before KVM has
	 * write-protected it again (DESIGN.md rule 1). Capacity: ring entries.
	 */
	uint64_t *pending;
	uint32_t nr_pending;
	/* Bumped whenever pending[] is emptied, so tracker_sync() can tell it was. */
	uint64_t epoch;
	_Atomic uint64_t dirty_count; /* valid entries ever harvested from this ring */
};

struct tracker {
	int vm_fd;
	enum tracker_backend backend;
	uint32_t ring_entries; /* ring backend only */
	size_t host_page_size;

	/* Controlling thread only (see tracker.h). */
	bool running;

	/*
	 * slots[0, nr_slots) are immutable once published; nr_slots is stored with release
	 * after the slot is filled in, and vCPU threads harvesting rings load it with acquire.
	 */
	struct tracker_slot_state slots[TRACKER_MAX_SLOTS];
	_Atomic unsigned nr_slots;

	struct tracker_ring *rings;
	unsigned nr_rings;
	/* tracker_ring_sync()'s per-ring notes (controlling thread only), nr_rings each. */
	uint32_t *sync_mark;
	uint64_t *sync_epoch;
	_Atomic uint64_t ring_full_ns;
	_Atomic uint64_t ring_full_exits;
};

uint64_t tracker_now_ns(void);
/* KVM_CHECK_EXTENSION on the VM fd; 0 when absent or on error. */
int tracker_kvm_check(int vm_fd, long cap);

/* ring.c */
/* Largest ring KVM offers in bytes (0 if none), and which capability offers it. */
uint32_t tracker_ring_max_bytes(int vm_fd, long *ret_cap);
/* Allocates t->rings and enables the ring with `entries` entries per vCPU. */
int tracker_ring_setup(struct tracker *t, uint32_t entries, unsigned nr_rings);
void tracker_ring_teardown(struct tracker *t);
int tracker_ring_attach(struct tracker *t, unsigned idx, int vcpu_fd);
/* Harvests every ring, resets, publishes. *ret_harvested counts valid entries. */
int tracker_ring_sync(struct tracker *t, uint64_t *ret_harvested);

/* bitmap.c */
int tracker_bitmap_enable_manual(struct tracker *t);
bool tracker_bitmap_manual_available(int vm_fd);
/* KVM_GET_DIRTY_LOG for every slot, ORed into the dirty set. */
int tracker_bitmap_sync(struct tracker *t, uint64_t *ret_harvested);
/* KVM_CLEAR_DIRTY_LOG for the given bits of one chunk. */
int tracker_bitmap_clear_chunk(struct tracker *t, const struct tracker_slot_state *s,
			       uint64_t first_page, uint32_t npages,
			       const uint64_t bits[TRACKER_CHUNK_WORDS]);

#endif
