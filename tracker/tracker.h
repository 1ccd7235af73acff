/* SPDX-License-Identifier: Apache-2.0 */
/*
 * tracker: which guest pages changed. One interface over three KVM backends — the per-vCPU
 * dirty ring (default), the dirty bitmap with KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 and chunked
 * KVM_CLEAR_DIRTY_LOG, and the legacy KVM_GET_DIRTY_LOG — feeding one dirty set: an atomic
 * bitmap per memslot with a summary level, taken in chunks by snapshot-and-clear.
 *
 * Correctness rule (DESIGN.md rule 1): when tracker_take_next() hands out a chunk's dirty
 * pages, those pages are already re-protected in KVM, so a guest write racing the caller's
 * read of the page shows up dirty again. Callers must never read a page before taking it.
 *
 * Life cycle, driven by the VMM:
 *   tracker_new()            before any vCPU exists (the ring must be enabled first)
 *   tracker_slot_add()       for each memslot, before tracker_start()
 *   tracker_vcpu_attach()    for each vCPU, after KVM_CREATE_VCPU
 *   tracker_start()          turns dirty logging on (KVM_MEM_LOG_DIRTY_PAGES)
 *   tracker_sync()           harvests KVM's dirty state into the dirty set
 *   tracker_take_next()      hands out dirty chunks, re-protected, to the sender
 *   tracker_stop()           turns logging off
 *   tracker_free()
 * tracker_vcpu_ring_full() is called from the vCPU's own thread on KVM_EXIT_DIRTY_RING_FULL.
 *
 * Threads: tracker_sync(), tracker_take_next(), tracker_start() and tracker_stop() are called
 * by one controlling thread at a time (the migration's harvester/sender). Any number of vCPU
 * threads may call tracker_vcpu_ring_full() concurrently with them; each ring has its own
 * lock, there is no global one.
 */
#ifndef FERRY_TRACKER_H
#define FERRY_TRACKER_H

#include <stdbool.h>
#include <stdint.h>

enum tracker_backend {
	TRACKER_AUTO = 0, /* ring if the kernel has it (bitmap under kvm_pvm), else bitmap, else legacy */
	TRACKER_RING,
	TRACKER_BITMAP,
	TRACKER_LEGACY,
};

/* Pages per take chunk: 64 words of 64 bits. Also the KVM_CLEAR_DIRTY_LOG granule. */
#define TRACKER_CHUNK_PAGES 4096u
#define TRACKER_CHUNK_WORDS (TRACKER_CHUNK_PAGES / 64u)

#define TRACKER_RING_ENTRIES_DEFAULT 4096u
#define TRACKER_RING_ENTRIES_MIN 256u /* one host page of 16-byte entries, the smallest KVM takes */
#define TRACKER_RING_ENTRIES_MAX 65536u /* 1 MiB of 16-byte entries, the kernel's limit */
#define TRACKER_MAX_SLOTS 64u
#define TRACKER_MAX_VCPUS 1024u

struct tracker_config {
	enum tracker_backend backend;
	uint32_t ring_entries; /* power of two; 0 = TRACKER_RING_ENTRIES_DEFAULT */
	uint32_t max_vcpus;    /* number of vCPUs that will be attached */
};

/* One KVM memslot, as the VMM registered it with KVM_SET_USER_MEMORY_REGION. */
struct tracker_slot {
	uint32_t slot;      /* KVM slot id (address space 0) */
	uint64_t gpa;       /* guest physical base, page aligned */
	uint64_t size;      /* bytes, page aligned */
	void *hva;          /* userspace mapping */
	uint32_t kvm_flags; /* other KVM_MEM_* flags to keep when toggling logging */
};

/* One chunk of dirty pages handed out by tracker_take_next(). */
struct tracker_batch {
	uint32_t slot_index;  /* index in the order of tracker_slot_add() */
	uint64_t first_page;  /* page index within the slot, multiple of TRACKER_CHUNK_PAGES */
	uint32_t npages;      /* pages covered (the last chunk of a slot may be shorter) */
	uint32_t dirty;       /* number of bits set in bits[] */
	uint64_t bits[TRACKER_CHUNK_WORDS]; /* bit i = page first_page + i is dirty */
};

/* Cursor for a pass over the dirty set; zero-initialise to start at the beginning. */
struct tracker_cursor {
	uint32_t slot_index;
	uint64_t chunk;
};

struct tracker_sync_stats {
	uint64_t harvested;  /* dirty entries/bits collected by this sync (duplicates included) */
	uint64_t sync_ns;    /* time spent in this call */
};

struct tracker;

/* Which backends this kernel offers (bit (1 << TRACKER_RING) etc.), from the VM fd. */
unsigned tracker_backends_available(int vm_fd);
const char *tracker_backend_name(enum tracker_backend b);
/* Parses "auto", "ring", "bitmap", "legacy"; returns -EINVAL otherwise. */
int tracker_backend_parse(const char *s, enum tracker_backend *ret);

/*
 * Creates the tracker for a VM and resolves the backend (TRACKER_AUTO picks the best one
 * present). For the ring it enables KVM_CAP_DIRTY_LOG_RING_ACQ_REL (or the plain ring) on
 * vm_fd, so it must run before any vCPU is created. Fails with -EOPNOTSUPP if an explicitly
 * requested backend is missing, -EINVAL on a bad config.
 */
int tracker_new(int vm_fd, const struct tracker_config *cfg, struct tracker **ret);
void tracker_free(struct tracker *t);
enum tracker_backend tracker_backend(const struct tracker *t);
/* Ring entries per vCPU actually configured (0 for non-ring backends). */
uint32_t tracker_ring_entries(const struct tracker *t);

/* Describes a memslot; the dirty set grows by size/4096/8 bytes (+ summary). */
int tracker_slot_add(struct tracker *t, const struct tracker_slot *s);

/* Maps vCPU idx's dirty ring (ring backend; a no-op otherwise). */
int tracker_vcpu_attach(struct tracker *t, unsigned idx, int vcpu_fd);

/*
 * Turns on dirty logging on every slot. With mark_all, every page starts dirty in the dirty
 * set (the first precopy round sends everything); otherwise the set starts empty and only
 * pages written from now on appear.
 */
int tracker_start(struct tracker *t, bool mark_all);
int tracker_stop(struct tracker *t);
bool tracker_running(const struct tracker *t);

/*
 * Harvests KVM's dirty state into the dirty set: for the ring, every vCPU's ring followed by
 * KVM_RESET_DIRTY_RINGS; for the bitmap, KVM_GET_DIRTY_LOG per slot (re-protection is
 * deferred to tracker_take_next(), chunk by chunk); for legacy, KVM_GET_DIRTY_LOG, which
 * re-protects in the kernel. ret_stats may be NULL.
 */
int tracker_sync(struct tracker *t, struct tracker_sync_stats *ret_stats);

/*
 * Hands out the next chunk at or after *cur that has dirty pages: its bits are cleared from
 * the dirty set (snapshot-and-clear) and, for the bitmap backend, re-protected in KVM with
 * KVM_CLEAR_DIRTY_LOG for that chunk only. Returns 1 with *ret filled and *cur advanced past
 * it, 0 when the pass is over, or -errno. Cost follows the number of dirty chunks, not the
 * guest size (the dirty set keeps a summary bit per 64 words).
 */
int tracker_take_next(struct tracker *t, struct tracker_cursor *cur, struct tracker_batch *ret);
/*
 * The same without re-protecting anything in KVM: for the final passes over a VM whose
 * vCPUs are paused and do not run again while this tracking run lasts (the switch-over;
 * the caller stops tracking before a vCPU may resume, and a new run starts afresh with
 * tracker_start). Re-protecting a large dirty set costs a write-protect of every page —
 * most of a postcopy's downtime on a large guest under shadow paging — and buys nothing
 * when no vCPU runs. Pages taken here but written in KVM's eyes stay dirty there.
 */
int tracker_take_next_paused(struct tracker *t, struct tracker_cursor *cur,
			     struct tracker_batch *ret);

/* Marks pages dirty by hand (e.g. a page whose send failed must go again). */
void tracker_mark_dirty(struct tracker *t, uint32_t slot_index, uint64_t page);

/* Pages currently in the dirty set (approximate while writers run). */
uint64_t tracker_dirty_pages(const struct tracker *t);

/*
 * Called in vCPU idx's thread on KVM_EXIT_DIRTY_RING_FULL: harvests that vCPU's ring into the
 * dirty set and resets it, so KVM_RUN can go on. Takes only that ring's lock. It must be that
 * thread, between KVM_RUN calls: recovering from a ring KVM overflowed relies on nothing being
 * pushed into the ring meanwhile.
 */
int tracker_vcpu_ring_full(struct tracker *t, unsigned idx);

/* Cumulative pages harvested from vCPU idx's ring (ring backend only; 0 otherwise). */
uint64_t tracker_vcpu_dirty_count(const struct tracker *t, unsigned idx);
/* Cumulative ns spent harvesting in vCPU threads on ring-full exits. */
uint64_t tracker_ring_full_ns(const struct tracker *t);
/* Cumulative number of ring-full exits. */
uint64_t tracker_ring_full_exits(const struct tracker *t);
/*
 * Cumulative number of times a vCPU's ring was found overflowed: KVM pushed entries past
 * the end of the ring (it does so when it emulates long runs of guest writes, e.g. under
 * nested shadow paging), overwriting entries not yet harvested. The tracker recovers by
 * resynchronising with KVM and, at the next tracker_sync(), re-protecting every page and
 * marking every page dirty, so the next pass resends the whole guest. 0 for other backends.
 */
uint64_t tracker_ring_overflows(const struct tracker *t);

#endif
