// SPDX-License-Identifier: Apache-2.0
/*
 * The KVM dirty ring backend. KVM appends one 16-byte entry (slot, page offset) to the
 * running vCPU's ring for every page it write-protects and then sees written; we harvest by
 * the kernel's protocol (Documentation/virt/kvm/api.rst, KVM_CAP_DIRTY_LOG_RING): walk the
 * ring from our own fetch index, load-acquire each entry's flags, stop at the first entry
 * that is not DIRTY (never skip one), store-release RESET into each harvested entry, and
 * finally KVM_RESET_DIRTY_RINGS so KVM re-protects those pages and recycles the entries.
 * Harvested pages enter the dirty set only after that ioctl has returned, because a page in
 * the dirty set may be taken and read by the sender at once, and a read before
 * re-protection could miss a write that lands between the read and the reset.
 *
 * Overflow. KVM does not always honour its own soft limit: when it handles guest writes in
 * a loop of its own (emulated rep stos, faults under nested shadow paging: kvm_pvm), it
 * pushes hundreds or thousands of entries without checking, and kvm_dirty_ring_push() then
 * writes past the end of the ring (a WARN in dmesg). KVM's state is two free-running
 * indices: R, where its reset walk resumes, and D, where it pushes next; it counts D - R
 * entries in use and exits with "ring full" while that is at least its soft limit. Its
 * reset walks from R over RESET entries only, clearing them, and stops at the first other
 * one. An overflow leaves behind:
 *  - Lost entries, and pages left writable with no re-protection coming (their entry, or
 *    the RESET we stored into it, was overwritten). Nothing says which, so whoever finds an
 *    overflow sets t->overflow_pending, and the next tracker_ring_sync() re-protects every
 *    page (logging off and on) and marks every page dirty: the next pass resends it all.
 *  - Holes: entries KVM counts as used that are clear, because its walk already went over
 *    their contents a lap earlier. Its walk stops at the first one, so D - R never drops
 *    and the vCPU exits with "ring full" forever; our harvest stops at one too, so what KVM
 *    pushes after it is never seen. Filling holes with RESET lets the walk go on (it
 *    re-protects the stale page a hole names, which is harmless).
 *  - Our fetch index no longer between R and D, which the harvest protocol relies on.
 * The one rule that keeps recovery safe: a RESET is only ever left in an entry KVM counts
 * as used (between R and D). A RESET at D would let the walk run past D, after which KVM
 * counts a negative number in use and never runs the vCPU again. DIRTY entries and RESETs
 * we stored are always in use; clear ones are holes or free, and free ones are only told
 * apart by where they sit: from D up to R. Our fetch index cannot be trusted to tell once
 * KVM has overflowed (an early version that filled the clear entries between it and the
 * next DIRTY one walked KVM past D within seconds). So clear entries are filled only where
 * KVM itself proves them used: a soft limit's worth from R once the vCPU is known stuck and
 * R is known to be at our fetch index (skip_stuck()); everywhere else resync() finds R with
 * probes whose walk is bound to stop at a chosen entry, and takes back the RESETs it did not
 * reach.
 * An overflow shows as: a harvest taking a whole ring of DIRTY entries in a row, or
 * stopping at one of our RESETs from a lap ago; clear entries before DIRTY ones; one of our
 * RESETs still there after KVM_RESET_DIRTY_RINGS (the walk stopped at a hole); a ring-full
 * exit that finds the ring just as the previous one left it.
 */
#include "tracker/tracker_internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

uint32_t tracker_ring_max_bytes(int vm_fd, long *ret_cap)
{
	/* ACQ_REL is the same ring with the ordering contract spelled out; prefer it. */
	static const long caps[] = {KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING};

	for (unsigned i = 0; i < sizeof(caps) / sizeof(caps[0]); i++) {
		int r = tracker_kvm_check(vm_fd, caps[i]);
		if (r > 0) {
			if (ret_cap)
				*ret_cap = caps[i];
			return (uint32_t)r;
		}
	}
	return 0;
}

int tracker_ring_setup(struct tracker *t, uint32_t entries, unsigned nr_rings)
{
	long cap = 0;
	uint32_t max = tracker_ring_max_bytes(t->vm_fd, &cap);
	if (!max)
		return -EOPNOTSUPP;
	if (!entries) {
		entries = TRACKER_RING_ENTRIES_DEFAULT;
		while (entries > TRACKER_RING_ENTRIES_MIN &&
		       (uint64_t)entries * sizeof(struct kvm_dirty_gfn) > max)
			entries /= 2;
	}
	if ((uint64_t)entries * sizeof(struct kvm_dirty_gfn) > max)
		return -EINVAL;

	/* Allocate first: once the capability is on, the VM cannot take it back. */
	t->rings = calloc(nr_rings, sizeof(*t->rings));
	t->sync_marks = calloc(nr_rings, sizeof(*t->sync_marks));
	if (!t->rings || !t->sync_marks)
		return -ENOMEM; /* tracker_ring_teardown() frees what was allocated */
	t->nr_rings = nr_rings;
	for (unsigned i = 0; i < nr_rings; i++) {
		int r = pthread_mutex_init(&t->rings[i].lock, NULL);
		if (r)
			return -r;
		t->rings[i].lock_ready = true;
		atomic_init(&t->rings[i].dirty_count, 0);
	}

	struct kvm_enable_cap ec;
	memset(&ec, 0, sizeof(ec));
	ec.cap = (uint32_t)cap;
	ec.args[0] = (uint64_t)entries * sizeof(struct kvm_dirty_gfn);
	if (ioctl(t->vm_fd, KVM_ENABLE_CAP, &ec) < 0)
		return -errno;
	t->ring_entries = entries;
	return 0;
}

void tracker_ring_teardown(struct tracker *t)
{
	free(t->sync_marks);
	t->sync_marks = NULL;
	if (!t->rings)
		return;
	size_t bytes = (size_t)t->ring_entries * sizeof(struct kvm_dirty_gfn);
	for (unsigned i = 0; i < t->nr_rings; i++) {
		struct tracker_ring *r = &t->rings[i];
		if (r->gfns)
			munmap(r->gfns, bytes);
		free(r->pending);
		free(r->probe);
		if (r->lock_ready)
			pthread_mutex_destroy(&r->lock);
	}
	free(t->rings);
	t->rings = NULL;
	t->nr_rings = 0;
}

static inline struct kvm_dirty_gfn *entry_at(const struct tracker *t, const struct tracker_ring *r,
					     uint32_t i)
{
	return &r->gfns[i & (t->ring_entries - 1)];
}

/* DIRTY, RESET or 0. Acquire: pairs with KVM's barrier between filling an entry and
 * setting DIRTY, and with the release in its reset's clearing of an entry. */
static inline uint32_t load_flags(const struct kvm_dirty_gfn *e)
{
	return __atomic_load_n(&e->flags, __ATOMIC_ACQUIRE) & KVM_DIRTY_GFN_F_MASK;
}

/*
 * Flags from `from` to `to` unless the entry changed meanwhile (KVM may push into it while
 * its vCPU runs; a push must never be overwritten). Release on success, like every RESET.
 */
static inline bool swap_flags(struct kvm_dirty_gfn *e, uint32_t from, uint32_t to,
			      uint32_t *ret_seen)
{
	uint32_t expect = from;
	bool ok = __atomic_compare_exchange_n(&e->flags, &expect, to, false, __ATOMIC_RELEASE,
					      __ATOMIC_ACQUIRE);
	if (ret_seen)
		*ret_seen = expect & KVM_DIRTY_GFN_F_MASK;
	return ok;
}

static inline bool probe_bit(const struct tracker_ring *r, uint32_t pos)
{
	return r->probe[pos / 64] >> (pos % 64) & 1;
}

/*
 * A lower bound on KVM's soft limit, the entries a vCPU may fill before it must exit: the
 * ring minus KVM_DIRTY_RING_RSVD_ENTRIES (64), minus x86's PML buffer (512) when PML is
 * on, which needs rings of at least 1024 entries. Only used where more would be unsafe.
 */
static uint32_t soft_limit_floor(uint32_t entries)
{
	return entries - 64u - (entries >= 1024u ? 512u : 0u);
}

/*
 * An overflow was found in r (r->lock held): every page goes again at the next sync.
 * lose_trust: harvesting in order from our fetch index can no longer be relied on to find
 * what KVM pushes; resync() must find KVM's reset index first.
 */
static void note_overflow(struct tracker *t, struct tracker_ring *r, bool lose_trust)
{
	if (!r->suspect) {
		r->suspect = true;
		atomic_fetch_add(&t->ring_overflows, 1);
	}
	r->notes++;
	if (lose_trust) {
		r->trusted = false;
		r->in_sync = false;
		r->lap_pending = false;
	}
	atomic_store(&t->overflow_pending, true);
}

/* KVM's reset index is known to be at our fetch index (see tracker_ring). */
static bool in_sync(const struct tracker_ring *r)
{
	return r->in_sync && r->sync_fetch == r->fetch;
}

static void set_in_sync(struct tracker_ring *r)
{
	r->in_sync = true;
	r->sync_fetch = r->fetch;
}

int tracker_ring_attach(struct tracker *t, unsigned idx, int vcpu_fd)
{
	if (idx >= t->nr_rings || vcpu_fd < 0)
		return -EINVAL;

	struct tracker_ring *r = &t->rings[idx];
	size_t bytes = (size_t)t->ring_entries * sizeof(struct kvm_dirty_gfn);
	int rc = 0;

	pthread_mutex_lock(&r->lock);
	if (r->gfns) {
		rc = -EBUSY;
		goto out_unlock;
	}
	r->pending = calloc(t->ring_entries, sizeof(*r->pending));
	if (!r->pending) {
		rc = -ENOMEM;
		goto out_unlock;
	}
	r->probe = calloc(t->ring_entries / 64, sizeof(*r->probe));
	if (!r->probe) {
		rc = -ENOMEM;
		goto err_free_pending;
	}
	void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu_fd,
		       (off_t)KVM_DIRTY_LOG_PAGE_OFFSET * (off_t)t->host_page_size);
	if (p == MAP_FAILED) {
		rc = -errno;
		goto err_free_probe;
	}
	r->gfns = p;
	/* A fresh ring: KVM starts filling at index 0 too, and resets from there. */
	r->fetch = 0;
	r->nr_pending = 0;
	r->run = 0;
	r->trusted = true;
	set_in_sync(r);
	r->suspect = false;
	r->lap_pending = false;
	r->quiet_valid = false;
	goto out_unlock;

err_free_probe:
	free(r->probe);
	r->probe = NULL;
err_free_pending:
	free(r->pending);
	r->pending = NULL;
out_unlock:
	pthread_mutex_unlock(&r->lock);
	return rc;
}

/* Slot index for a ring entry's slot field ((as_id << 16) | id), or -1. */
static int slot_index(const struct tracker *t, unsigned nr_slots, uint32_t kvm_slot,
		      unsigned *hint)
{
	if (kvm_slot >> 16)
		return -1; /* another address space (SMM); we register none */
	if (*hint < nr_slots && t->slots[*hint].desc.slot == kvm_slot)
		return (int)*hint;
	for (unsigned i = 0; i < nr_slots; i++) {
		if (t->slots[i].desc.slot == kvm_slot) {
			*hint = i;
			return (int)i;
		}
	}
	return -1;
}

/*
 * Takes one entry we load-acquired as DIRTY: its page into r->pending (garbage — unknown
 * slots, offsets past the slot — is dropped), then RESET with release, so that our reads
 * of the entry are done before KVM, which load-acquires the flags in
 * KVM_RESET_DIRTY_RINGS, may recycle it. Returns 1 if the page was valid.
 */
static uint32_t take(struct tracker *t, struct tracker_ring *r, struct kvm_dirty_gfn *e,
		     unsigned nr_slots, unsigned *hint)
{
	uint32_t kslot = __atomic_load_n(&e->slot, __ATOMIC_RELAXED);
	uint64_t off = __atomic_load_n(&e->offset, __ATOMIC_RELAXED);
	uint32_t valid = 0;

	int si = slot_index(t, nr_slots, kslot, hint);
	if (si >= 0 && off < t->slots[si].npages) {
		r->pending[r->nr_pending++] = ((uint64_t)si << TRACKER_PENDING_SLOT_SHIFT) | off;
		valid = 1;
	}
	__atomic_store_n(&e->flags, KVM_DIRTY_GFN_F_RESET, __ATOMIC_RELEASE);
	return valid;
}

/* Why harvest() stopped. */
enum harvest_stop {
	STOP_PENDING_FULL, /* pending[] is full; the rest stays DIRTY for later */
	STOP_CLEAR,        /* the entry at the fetch index is clear */
	STOP_RESET,        /* ... holds a RESET of ours from a lap ago (an overflow) */
};

/*
 * Moves DIRTY entries from r's ring into r->pending, in order from the fetch index,
 * marking each RESET. Called with r->lock held. Returns how many valid entries it took and
 * says why it stopped. ret_lap, if not NULL, is set instead of reporting an overflow when
 * a whole ring's worth is taken in a row (see lap_check()).
 */
static uint32_t harvest(struct tracker *t, struct tracker_ring *r, enum harvest_stop *ret_stop,
			bool *ret_lap)
{
	unsigned nr_slots = atomic_load_explicit(&t->nr_slots, memory_order_acquire);
	uint32_t valid = 0, fetch0 = r->fetch;
	unsigned hint = 0;

	for (;;) {
		if (r->nr_pending >= t->ring_entries) {
			/* Stop rather than skip: the rest stays DIRTY for the next round. */
			*ret_stop = STOP_PENDING_FULL;
			break;
		}
		struct kvm_dirty_gfn *e = entry_at(t, r, r->fetch);
		/*
		 * DIRTY alone, as QEMU checks: an entry with RESET is one we harvested that KVM
		 * has not recycled yet; taking it again would run our index ahead of KVM's.
		 */
		uint32_t flags = load_flags(e);
		if (flags != KVM_DIRTY_GFN_F_DIRTY) {
			r->run = 0;
			if (flags) {
				/*
				 * Our RESET from a lap ago, not yet walked over by KVM's reset:
				 * KVM counts the whole ring in use, and any further push
				 * overwrites an entry.
				 */
				note_overflow(t, r, true);
				*ret_stop = STOP_RESET;
			} else {
				*ret_stop = STOP_CLEAR;
			}
			break;
		}
		valid += take(t, r, e, nr_slots, &hint);
		r->fetch++;
		/*
		 * A whole ring of DIRTY entries in a row: more than KVM's soft limit lets it
		 * push, so it filled the ring to the brim at least, and past it if it pushed on.
		 */
		if (++r->run == t->ring_entries) {
			if (ret_lap)
				*ret_lap = true;
			else
				note_overflow(t, r, true);
		}
	}
	if (r->fetch != fetch0)
		r->stamp++;
	if (valid)
		atomic_fetch_add(&r->dirty_count, valid);
	return valid;
}

/*
 * For a ring that is not trusted: takes every DIRTY entry wherever it is in the ring (any
 * entry KVM marked DIRTY is one it counts as used, so storing RESET into it is always
 * safe). Leaves the fetch index alone. Sets *ret_more if it stopped because pending[] was
 * full. With r->lock held.
 */
static uint32_t harvest_all(struct tracker *t, struct tracker_ring *r, bool *ret_more)
{
	unsigned nr_slots = atomic_load_explicit(&t->nr_slots, memory_order_acquire);
	uint32_t valid = 0, taken = 0;
	unsigned hint = 0;

	*ret_more = false;
	for (uint32_t i = 0; i < t->ring_entries; i++) {
		struct kvm_dirty_gfn *e = entry_at(t, r, r->fetch + i);
		if (load_flags(e) != KVM_DIRTY_GFN_F_DIRTY)
			continue;
		if (r->nr_pending >= t->ring_entries) {
			*ret_more = true;
			break;
		}
		valid += take(t, r, e, nr_slots, &hint);
		taken++;
	}
	r->run = 0;
	if (taken)
		r->stamp++;
	if (valid)
		atomic_fetch_add(&r->dirty_count, valid);
	return valid;
}

/*
 * With r->lock held, when the entry at the fetch index is clear: is there a DIRTY entry
 * further on, before any RESET of ours? KVM pushes in order, so clear entries before a
 * DIRTY one are holes (or KVM's dirty index lies among them, if our fetch index is not
 * where we think): either way the ring is out of step, and its entries beyond would never
 * be taken by harvest(). Filling the holes is left to resync(), which needs no assumption
 * about where our fetch index lies.
 */
static bool holes_ahead(const struct tracker *t, const struct tracker_ring *r)
{
	for (uint32_t k = 1; k < t->ring_entries; k++) {
		uint32_t f = load_flags(entry_at(t, r, r->fetch + k));
		if (f == KVM_DIRTY_GFN_F_DIRTY)
			return true;
		if (f)
			return false; /* our RESETs not yet walked: what we passed is free space */
	}
	return false;
}

/*
 * For a stuck vCPU (KVM counts at least a soft limit of entries in use, and nothing was
 * pushed since it last could) whose ring has nothing DIRTY and whose KVM reset index is
 * known to be at our fetch index: the next soft limit's worth of entries are all in use by
 * KVM, so all holes or RESETs of ours. RESET them and move past them, and past any RESETs
 * of ours right after them, which KVM's reset will walk over too; so that it stops at our
 * fetch index again. With r->lock held.
 */
static void skip_stuck(struct tracker *t, struct tracker_ring *r)
{
	uint32_t n = soft_limit_floor(t->ring_entries), seen, j;

	for (j = 0; j < n; j++) {
		if (!swap_flags(entry_at(t, r, r->fetch), 0, KVM_DIRTY_GFN_F_RESET, &seen) &&
		    seen == KVM_DIRTY_GFN_F_DIRTY)
			break; /* cannot happen while the vCPU is out of KVM_RUN; never skip */
		r->fetch++;
	}
	for (; j < t->ring_entries; j++) {
		if (load_flags(entry_at(t, r, r->fetch)) != KVM_DIRTY_GFN_F_RESET)
			break;
		r->fetch++;
	}
	r->stamp++;
}

static bool ring_has_dirty(const struct tracker *t, const struct tracker_ring *r)
{
	for (uint32_t i = 0; i < t->ring_entries; i++)
		if (load_flags(&r->gfns[i]) == KVM_DIRTY_GFN_F_DIRTY)
			return true;
	return false;
}

/* Pages in pending[0, n) go into the dirty set; the rest moves down. With r->lock held. */
static void publish(struct tracker *t, struct tracker_ring *r, uint32_t n)
{
	for (uint32_t i = 0; i < n; i++) {
		uint64_t v = r->pending[i];
		unsigned si = (unsigned)(v >> TRACKER_PENDING_SLOT_SHIFT);
		dirtyset_set(t->slots[si].ds, v & TRACKER_PENDING_PAGE_MASK);
	}
	if (n < r->nr_pending)
		memmove(r->pending, r->pending + n, (r->nr_pending - n) * sizeof(*r->pending));
	r->nr_pending -= n;
	if (!r->nr_pending)
		r->epoch++;
}

static int reset_rings(struct tracker *t)
{
	/*
	 * Resets every vCPU's RESET-marked entries and re-protects their pages. Newer kernels
	 * stop early with EINTR when a signal is pending (our vCPU kick is one); the entries
	 * not reached yet are still marked, so going again finishes the job.
	 */
	for (;;) {
		if (ioctl(t->vm_fd, KVM_RESET_DIRTY_RINGS) >= 0)
			return 0;
		if (errno != EINTR)
			return -errno;
	}
}

/*
 * KVM_RESET_DIRTY_RINGS, and what it tells about r (with r->lock held): if the last entry
 * we stored RESET into was still RESET before the call and is clear after it, KVM's reset
 * walked through it, so its reset index reached our fetch index — and stayed there if the
 * entry at the fetch index was not RESET (nothing but us stores RESET). If it is still
 * RESET, KVM's reset stopped at a hole before it; *ret_blocked says so.
 */
static int reset_and_check(struct tracker *t, struct tracker_ring *r, bool *ret_blocked)
{
	struct kvm_dirty_gfn *last = entry_at(t, r, r->fetch - 1);
	bool armed = load_flags(last) == KVM_DIRTY_GFN_F_RESET;
	bool at_reset = load_flags(entry_at(t, r, r->fetch)) == KVM_DIRTY_GFN_F_RESET;
	int rc = reset_rings(t);
	if (rc < 0)
		return rc;
	if (armed) {
		uint32_t now = load_flags(last);
		if (!now && !at_reset)
			set_in_sync(r);
		else if (now == KVM_DIRTY_GFN_F_RESET && ret_blocked)
			*ret_blocked = true;
	}
	return 0;
}

/*
 * A whole ring taken in a row is not always an overflow: KVM may have stopped exactly at
 * the brim. When the vCPU's own thread took that lap from a fetch index known to be at
 * KVM's reset index, with nothing pending, the lap consists of KVM's pushes since that
 * reset index, oldest first, and KVM's reset walks all of it: afterwards its reset index is
 * at our fetch index again. Whatever it pushed beyond the brim (k entries, lost) left k
 * holes right there, and it pushes on after them. So the first harvest after the lap tells:
 * if it starts with a DIRTY entry at the fetch index and ends at a clear one, with nothing
 * DIRTY left anywhere (a push that wrapped around to the fetch index would leave the ones
 * it pushed before it DIRTY further on, and having load-acquired it we would see them),
 * KVM resumed at the fetch index: k was 0 and nothing was lost. Anything else counts as an
 * overflow. Until then r->lap_pending holds the verdict back.
 */
static bool lap_check(struct tracker *t, struct tracker_ring *r)
{
	/* KVM's reset must have walked the whole lap. */
	for (uint32_t i = 0; i < t->ring_entries; i++)
		if (load_flags(&r->gfns[i]))
			return false;
	set_in_sync(r);
	r->lap_pending = true;
	r->lap_fetch = r->fetch;
	return true;
}

/* The first harvest since a lap is over (r->lock held); notes0: r->notes before it. */
static void lap_settle(struct tracker *t, struct tracker_ring *r, enum harvest_stop why,
		       uint32_t notes0)
{
	uint32_t taken = r->fetch - r->lap_fetch;
	bool exact = taken && taken < t->ring_entries && why == STOP_CLEAR &&
		     r->notes == notes0 && !ring_has_dirty(t, r);
	r->lap_pending = false;
	if (!exact)
		note_overflow(t, r, false);
}

/*
 * One probe of resync(): RESET into every clear entry except those excluded, then
 * KVM_RESET_DIRTY_RINGS, then the RESETs KVM's reset did not reach are taken back
 * (compare-and-swap, so that an entry KVM pushed into meanwhile keeps its push), so that no
 * later reset can walk into an entry KVM has not pushed. KVM's reset walks from its reset
 * index through RESETs only, so it stops at the first excluded entry on its way; the caller
 * excludes entries that make sure that is before KVM's dirty index. r->probe is left
 * holding the entries this probe made RESET; the ones KVM walked over are clear now.
 */
static int probe(struct tracker *t, struct tracker_ring *r,
		 bool (*excluded)(uint32_t pos, void *arg), void *arg)
{
	uint32_t n = t->ring_entries;

	memset(r->probe, 0, n / 8);
	for (uint32_t pos = 0; pos < n; pos++) {
		if (excluded(pos, arg))
			continue;
		if (swap_flags(&r->gfns[pos], 0, KVM_DIRTY_GFN_F_RESET, NULL))
			r->probe[pos / 64] |= 1ull << (pos % 64);
	}
	int rc = reset_rings(t);
	for (uint32_t w = 0; w < n / 64; w++)
		for (uint64_t b = r->probe[w]; b; b &= b - 1)
			swap_flags(&r->gfns[w * 64 + (uint32_t)__builtin_ctzll(b)],
				   KVM_DIRTY_GFN_F_RESET, 0, NULL);
	/* KVM's reset index may have moved: a ring-full exit must not count as stuck. */
	r->stamp++;
	return rc;
}

/* After probe(): the entry right after the run of probe RESETs KVM walked over, or -1. */
static int64_t probe_stop(const struct tracker *t, const struct tracker_ring *r)
{
	uint32_t n = t->ring_entries, mask = n - 1;
	int64_t stop = -1;

	for (uint32_t pos = 0; pos < n; pos++) {
		uint32_t next = (pos + 1) & mask;
		if (probe_bit(r, pos) && !load_flags(&r->gfns[pos]) &&
		    !(probe_bit(r, next) && !load_flags(&r->gfns[next]))) {
			if (stop >= 0)
				return -1; /* two runs: not what a walk leaves */
			stop = next;
		}
	}
	return stop;
}

struct excl_one {
	uint32_t pos;
};

static bool excl_one(uint32_t pos, void *arg)
{
	return pos == ((struct excl_one *)arg)->pos;
}

struct excl_every {
	uint32_t step, phase;
};

static bool excl_every(uint32_t pos, void *arg)
{
	const struct excl_every *x = arg;
	return pos % x->step == x->phase;
}

/*
 * Finds KVM's reset index for a ring that is not trusted, puts our fetch index there and
 * trusts the ring again; leaves it untrusted if it cannot tell yet. With r->lock held.
 * `frozen`: the vCPU is out of KVM_RUN, so nothing is pushed meanwhile. `stuck`: also, KVM
 * counts at least a soft limit of entries in use (nothing was pushed since it last refused
 * to run).
 *
 * What it relies on: KVM's reset index is followed, up to its dirty index, by entries KVM
 * counts as used — DIRTY ones, RESETs of ours, holes — and then by free, clear entries up
 * to the reset index again; every DIRTY or RESET entry is a used one. Its walk consumes
 * RESETs from the reset index on and stops at the first other entry.
 *  1. Take every DIRTY entry, anywhere (adding the valid ones to *ret_valid), and note
 *     every RESET entry; reset.
 *  2. If the walk consumed all of them, they were one run starting at its reset index, and
 *     its reset index is now right after that run.
 *  3. Else some RESET q is left whose successor is clear: q is used, so its successor is
 *     used or the next to be pushed. Probe with RESET everywhere but there: the walk comes
 *     to a stop exactly there. Unless frozen, a push may stop it earlier; so then only if
 *     we see it consume q.
 *  4. Else (nothing at all to go by) and if stuck, KVM counts at least a soft limit in use
 *     from its reset index: probe with RESET everywhere but every s-th entry, s at most a
 *     soft limit, so that the walk stops within what is used, at the next excluded entry
 *     after its reset index. If it did not move, its reset index is an excluded entry: a
 *     second probe excluding the entries right after those finds which.
 */
static int resync(struct tracker *t, struct tracker_ring *r, bool frozen, bool stuck,
		  uint64_t *ret_valid)
{
	uint32_t n = t->ring_entries, mask = n - 1;
	int64_t at = -1;
	bool more;
	int rc;

	do {
		*ret_valid += harvest_all(t, r, &more);
		if (more) {
			rc = reset_rings(t);
			if (rc < 0)
				return rc;
			publish(t, r, r->nr_pending);
		}
	} while (more);

	uint32_t marked = 0, remaining = 0;
	memset(r->probe, 0, n / 8);
	for (uint32_t pos = 0; pos < n; pos++) {
		if (load_flags(&r->gfns[pos]) == KVM_DIRTY_GFN_F_RESET) {
			r->probe[pos / 64] |= 1ull << (pos % 64);
			marked++;
		}
	}
	rc = reset_rings(t);
	if (rc < 0)
		return rc;
	publish(t, r, r->nr_pending);

	int64_t left = -1; /* a RESET left over whose successor is clear */
	for (uint32_t pos = 0; pos < n; pos++) {
		if (load_flags(&r->gfns[pos]) != KVM_DIRTY_GFN_F_RESET)
			continue;
		remaining++;
		if (left < 0 && !load_flags(&r->gfns[(pos + 1) & mask]))
			left = pos;
	}

	/* Pushes racing with us (tracker_sync()) could blur step 2: only without any. */
	if (marked && marked < n && !remaining && !ring_has_dirty(t, r)) {
		at = probe_stop(t, r); /* step 2 */
	} else if (left >= 0) {
		struct excl_one x = {.pos = (uint32_t)(left + 1) & mask};
		rc = probe(t, r, excl_one, &x); /* step 3 */
		if (rc < 0)
			return rc;
		if (!load_flags(&r->gfns[left]) || (frozen && !ring_has_dirty(t, r)))
			at = x.pos;
	} else if (frozen && stuck && !marked && !ring_has_dirty(t, r)) {
		uint32_t step = 1; /* step 4: a power of two, at most a soft limit */
		while (step * 2 <= soft_limit_floor(n))
			step *= 2;
		for (uint32_t phase = 0; phase < 2 && at < 0; phase++) {
			struct excl_every x = {.step = step, .phase = phase};
			rc = probe(t, r, excl_every, &x);
			if (rc < 0)
				return rc;
			at = probe_stop(t, r);
		}
	}
	if (at < 0)
		return 0;
	r->fetch += ((uint32_t)at - r->fetch) & mask;
	r->run = 0;
	r->stamp++;
	r->trusted = true;
	set_in_sync(r);
	return 0;
}

int tracker_vcpu_ring_full(struct tracker *t, unsigned idx)
{
	if (!t || t->backend != TRACKER_RING || idx >= t->nr_rings)
		return -EINVAL;

	uint64_t t0 = tracker_now_ns();
	struct tracker_ring *r = &t->rings[idx];
	int rc = 0;

	pthread_mutex_lock(&r->lock);
	if (!r->gfns) {
		rc = -ENXIO;
		goto out_unlock;
	}
	/*
	 * This vCPU is out of KVM_RUN, so nothing is pushed into its ring while we hold the
	 * lock; only KVM resets (ours or another thread's) change it, by clearing entries we
	 * marked RESET. Every pending entry had RESET stored before each reset below, under
	 * this lock, so all of them (ours and any a concurrent tracker_sync() left) are safe
	 * to publish after it.
	 *
	 * KVM exits with "ring full" only when it counts at least a soft limit of entries in
	 * use. If nothing was harvested from the ring since our last visit and nothing in it
	 * is DIRTY, nothing was pushed since, and KVM's reset index cannot have moved (nobody
	 * stored a RESET it could walk over): KVM still counts that many entries in use, and
	 * they are not in the ring. The vCPU is stuck.
	 */
	bool dirty_at_fetch = load_flags(entry_at(t, r, r->fetch)) == KVM_DIRTY_GFN_F_DIRTY;
	bool stuck = r->quiet_valid && r->stamp == r->quiet_stamp && !dirty_at_fetch &&
		     !ring_has_dirty(t, r);
	bool suspect0 = r->suspect, blocked = false;
	uint32_t notes0 = r->notes;
	/* A lap may be checked for an exact fill (lap_check()) only from a known start. */
	bool lap_ok = in_sync(r) && !r->nr_pending && !r->run && !r->lap_pending;
	bool settle = r->lap_pending, first = true, lap = false;

	if (r->trusted) {
		enum harvest_stop why;
		for (;;) {
			harvest(t, r, &why, first && lap_ok ? &lap : NULL);
			first = false;
			if (why == STOP_PENDING_FULL) {
				rc = reset_and_check(t, r, NULL);
				if (rc < 0)
					goto out_unlock;
				if (lap && !lap_check(t, r))
					note_overflow(t, r, true);
				lap = false;
				publish(t, r, r->nr_pending);
				continue;
			}
			break;
		}
		if (why == STOP_CLEAR && r->trusted && holes_ahead(t, r))
			note_overflow(t, r, true);
		if (settle && r->lap_pending)
			lap_settle(t, r, why, notes0);
		if (stuck && r->trusted) {
			if (in_sync(r)) {
				note_overflow(t, r, false);
				skip_stuck(t, r);
			} else {
				note_overflow(t, r, true);
			}
		}
		rc = reset_and_check(t, r, &blocked);
		if (rc < 0)
			goto out_unlock;
		publish(t, r, r->nr_pending);
		if (blocked) /* KVM's reset stopped at a hole before our fetch index */
			note_overflow(t, r, true);
	}
	if (!r->trusted) {
		uint64_t valid = 0;
		note_overflow(t, r, false);
		rc = resync(t, r, true, stuck, &valid);
		if (rc < 0)
			goto out_unlock;
	}
	r->quiet_stamp = r->stamp;
	r->quiet_valid = true;
	/*
	 * Seen working normally: KVM was pushing at our fetch index when the vCPU exited, we
	 * took everything up to where it stopped, and its reset followed us there.
	 */
	if (suspect0 && r->trusted && dirty_at_fetch && in_sync(r) && r->notes == notes0)
		r->suspect = false;
out_unlock:
	pthread_mutex_unlock(&r->lock);

	atomic_fetch_add(&t->ring_full_ns, tracker_now_ns() - t0);
	atomic_fetch_add(&t->ring_full_exits, 1);
	return rc;
}

int tracker_ring_sync(struct tracker *t, uint64_t *ret_harvested)
{
	uint64_t harvested = 0;
	bool need_reset = false;
	int rc = 0;

	/*
	 * Phase 1: harvest each ring under its own lock, remembering how much of its
	 * pending[] we stored RESET for (and in which epoch), so one ioctl covers them all.
	 * KVM may be pushing into the rings meanwhile. A ring not trusted since an overflow is
	 * resynchronised as far as that allows, and every page is sent again (the vCPU's own
	 * thread finishes the job on its next ring-full exit, if need be).
	 */
	struct tracker_ring_mark *m = t->sync_marks;
	for (unsigned i = 0; i < t->nr_rings; i++) {
		struct tracker_ring *r = &t->rings[i];
		m[i].pending = 0;
		m[i].stored = false;
		pthread_mutex_lock(&r->lock);
		if (r->gfns && r->trusted) {
			uint32_t fetch0 = r->fetch, notes0 = r->notes;
			enum harvest_stop why;
			for (;;) {
				harvested += harvest(t, r, &why, NULL);
				/* pending[] full: reset and publish now, then carry on. */
				if (why != STOP_PENDING_FULL)
					break;
				rc = reset_rings(t);
				if (rc < 0)
					break;
				publish(t, r, r->nr_pending);
			}
			/* Holes follow overflows only; spare healthy rings the scan. */
			if (rc >= 0 && why == STOP_CLEAR && r->suspect && holes_ahead(t, r))
				note_overflow(t, r, true);
			if (rc >= 0 && r->lap_pending)
				lap_settle(t, r, why, notes0);
			m[i].pending = r->nr_pending;
			m[i].epoch = r->epoch;
			m[i].fetch = r->fetch;
			m[i].stored = r->fetch != fetch0;
			m[i].trusted = r->trusted;
			m[i].at_reset = load_flags(entry_at(t, r, r->fetch)) ==
					KVM_DIRTY_GFN_F_RESET;
		}
		if (rc >= 0 && r->gfns && !r->trusted) {
			note_overflow(t, r, false);
			/* Publishes all of pending[], this phase's harvest included. */
			rc = resync(t, r, false, false, &harvested);
			m[i].pending = 0;
			m[i].stored = false;
		}
		if (m[i].stored)
			need_reset = true;
		pthread_mutex_unlock(&r->lock);
		if (rc < 0)
			return rc;
	}

	if (need_reset) {
		rc = reset_rings(t);
		if (rc < 0)
			return rc;
	}

	/*
	 * Phase 2: see whether KVM's reset walked over our last RESET of each ring (if not, it
	 * stopped at a hole: an overflow), and publish what phase 1 harvested. If the vCPU's
	 * own ring-full path emptied pending[] meanwhile (new epoch), it has published those
	 * entries itself after its own reset. Entries it appended after our mark (only
	 * possible if its own reset failed) may predate our ioctl or not; they wait for the
	 * next reset.
	 */
	for (unsigned i = 0; i < t->nr_rings; i++) {
		struct tracker_ring *r = &t->rings[i];
		if (!m[i].stored && !m[i].pending)
			continue;
		pthread_mutex_lock(&r->lock);
		if (m[i].stored && m[i].trusted && r->trusted) {
			uint32_t last = load_flags(entry_at(t, r, m[i].fetch - 1));
			if (last == KVM_DIRTY_GFN_F_RESET)
				note_overflow(t, r, true);
			else if (!last && !m[i].at_reset && r->fetch == m[i].fetch)
				set_in_sync(r);
		}
		if (m[i].pending && r->epoch == m[i].epoch)
			publish(t, r, m[i].pending);
		pthread_mutex_unlock(&r->lock);
	}

	/*
	 * After an overflow, pages may be missing from the ring or writable in KVM with no
	 * re-protection coming: re-protect them all and send them all again.
	 */
	if (atomic_exchange(&t->overflow_pending, false)) {
		rc = tracker_relog_all(t);
		if (rc < 0) {
			atomic_store(&t->overflow_pending, true);
			return rc;
		}
	}

	if (ret_harvested)
		*ret_harvested = harvested;
	return 0;
}

uint64_t tracker_vcpu_dirty_count(const struct tracker *t, unsigned idx)
{
	if (!t || t->backend != TRACKER_RING || idx >= t->nr_rings)
		return 0;
	return atomic_load(&t->rings[idx].dirty_count);
}

uint64_t tracker_ring_full_ns(const struct tracker *t)
{
	return t ? atomic_load(&t->ring_full_ns) : 0;
}

uint64_t tracker_ring_full_exits(const struct tracker *t)
{
	return t ? atomic_load(&t->ring_full_exits) : 0;
}

uint64_t tracker_ring_overflows(const struct tracker *t)
{
	return t ? atomic_load(&t->ring_overflows) : 0;
}
