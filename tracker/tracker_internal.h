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

/* What tracker_ring_sync() noted about one ring between its harvest and its reset. */
struct tracker_ring_mark {
	uint32_t pending; /* pending[] entries harvested, to publish after the reset */
	uint64_t epoch;   /* the ring's epoch then (see tracker_ring.epoch) */
	uint32_t fetch;   /* the fetch index after the harvest */
	bool stored;      /* the harvest stored RESET into at least one entry */
	bool trusted;     /* the ring was trusted (see tracker_ring) after the harvest */
	bool at_reset;    /* the entry at that fetch index was RESET (ours, a lap old) */
};

/* One vCPU's dirty ring. */
struct tracker_ring {
	/*
	 * lock serialises everything below except dirty_count: the fetch index, every store
	 * into gfns[] (RESET on harvest, RESET into holes, probe stores and their undo), the
	 * overflow bookkeeping and the pending[] buffer. Taken by the vCPU's own thread on a
	 * ring-full exit and by tracker_sync(); never held together with another ring's lock.
	 */
	pthread_mutex_t lock;
	bool lock_ready;
	struct kvm_dirty_gfn *gfns; /* the vCPU's ring, mmap'd; NULL until attached */
	uint32_t fetch;             /* free-running index of the next entry to look at */

	/*
	 * Overflow bookkeeping (see "Overflow" in ring.c). KVM can push past the end of the
	 * ring when it emulates a long run of guest writes; entries are lost and KVM's reset
	 * index (where its KVM_RESET_DIRTY_RINGS walk resumes) and dirty index (where it
	 * pushes next) stop matching our fetch index.
	 *
	 * trusted: no overflow found since the ring was last known in step with KVM, so
	 * harvesting in order from the fetch index finds what KVM pushes. Cleared when an
	 * overflow is found; resync() sets it again once it knows where KVM's reset index is.
	 * in_sync, sync_fetch: KVM's reset index is known to be at our fetch index (modulo the
	 * ring size), established when fetch was sync_fetch; any harvest moves fetch and so
	 * voids it.
	 * suspect: an overflow was found and the ring has not yet been seen working normally
	 * since; counts tracker_ring_overflows() on each false-to-true change. While it is
	 * set, tracker_sync() also looks for holes ahead of the fetch index.
	 * run: DIRTY entries taken in a row since a harvest last stopped at a non-DIRTY one.
	 * lap_pending, lap_fetch: see lap_check() in ring.c.
	 * stamp: bumped whenever anything is harvested from the ring or we store into it in a
	 * way that may let KVM's reset move on; quiet_stamp is its value when the last
	 * ring-full exit was done (if quiet_valid), so that the next one can tell whether
	 * anything was pushed, or KVM's reset index moved, in between.
	 * probe: one bit per entry, for resync()'s probes and their undo.
	 */
	uint32_t run;
	uint32_t notes; /* overflow findings in this ring, ever */
	bool trusted;
	bool in_sync;
	uint32_t sync_fetch;
	bool suspect;
	bool lap_pending;   /* a whole ring was taken at lap_fetch: overflow or not? */
	uint32_t lap_fetch;
	bool quiet_valid;
	uint64_t stamp;
	uint64_t quiet_stamp;
	uint64_t *probe;
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
	/* tracker_ring_sync()'s per-ring notes (controlling thread only), nr_rings of them. */
	struct tracker_ring_mark *sync_marks;
	_Atomic uint64_t ring_full_ns;
	_Atomic uint64_t ring_full_exits;
	/* Rings found overflowed by KVM (tracker_ring_overflows()). */
	_Atomic uint64_t ring_overflows;
	/*
	 * Set by whoever finds a ring overflowed: pages may have been lost from the ring or
	 * left writable without a pending re-protection, so the next tracker_ring_sync()
	 * re-protects every page and marks every page dirty (tracker_relog_all()).
	 */
	atomic_bool overflow_pending;
};

uint64_t tracker_now_ns(void);
/* KVM_CHECK_EXTENSION on the VM fd; 0 when absent or on error. */
int tracker_kvm_check(int vm_fd, long cap);
/*
 * Recovery after a ring overflow (tracker.c): while logging is on, turns it off and on
 * again on every slot, which makes KVM write-protect every page afresh, then marks every
 * page dirty. Controlling thread only (it toggles logging, like tracker_start/stop).
 */
int tracker_relog_all(struct tracker *t);

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
