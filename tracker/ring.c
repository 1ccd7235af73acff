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
	t->sync_mark = calloc(nr_rings, sizeof(*t->sync_mark));
	t->sync_epoch = calloc(nr_rings, sizeof(*t->sync_epoch));
	if (!t->rings || !t->sync_mark || !t->sync_epoch)
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
	free(t->sync_mark);
	free(t->sync_epoch);
	t->sync_mark = NULL;
	t->sync_epoch = NULL;
	if (!t->rings)
		return;
	size_t bytes = (size_t)t->ring_entries * sizeof(struct kvm_dirty_gfn);
	for (unsigned i = 0; i < t->nr_rings; i++) {
		struct tracker_ring *r = &t->rings[i];
		if (r->gfns)
			munmap(r->gfns, bytes);
		free(r->pending);
		if (r->lock_ready)
			pthread_mutex_destroy(&r->lock);
	}
	free(t->rings);
	t->rings = NULL;
	t->nr_rings = 0;
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
	void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu_fd,
		       (off_t)KVM_DIRTY_LOG_PAGE_OFFSET * (off_t)t->host_page_size);
	if (p == MAP_FAILED) {
		rc = -errno;
		goto err_free_pending;
	}
	r->gfns = p;
	/* A fresh ring: KVM starts filling at index 0 too. */
	r->fetch = 0;
	r->nr_pending = 0;
	goto out_unlock;

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
 * Moves DIRTY entries from r's ring into r->pending, marking each RESET. Called with
 * r->lock held. Returns how many valid entries it took; sets *ret_more when it stopped
 * because pending[] was full rather than at a non-DIRTY entry.
 */
static uint32_t harvest(struct tracker *t, struct tracker_ring *r, bool *ret_more)
{
	unsigned nr_slots = atomic_load_explicit(&t->nr_slots, memory_order_acquire);
	uint32_t mask = t->ring_entries - 1, valid = 0;
	unsigned hint = 0;

	*ret_more = false;
	for (;;) {
		if (r->nr_pending >= t->ring_entries) {
			/* Stop rather than skip: the rest stays DIRTY for the next round. */
			*ret_more = true;
			break;
		}
		struct kvm_dirty_gfn *e = &r->gfns[r->fetch & mask];
		/* Pairs with KVM's barrier between filling slot/offset and setting DIRTY. */
		uint32_t flags = __atomic_load_n(&e->flags, __ATOMIC_ACQUIRE);
		/*
		 * DIRTY alone, as QEMU checks: an entry with RESET too is one we harvested that
		 * KVM has not recycled yet, which only a ring we lost track of could show here;
		 * taking it again would run our index ahead of KVM's.
		 */
		if ((flags & KVM_DIRTY_GFN_F_MASK) != KVM_DIRTY_GFN_F_DIRTY)
			break;
		uint32_t kslot = __atomic_load_n(&e->slot, __ATOMIC_RELAXED);
		uint64_t off = __atomic_load_n(&e->offset, __ATOMIC_RELAXED);

		/* Tolerate garbage: unknown slots and offsets past the slot are dropped. */
		int si = slot_index(t, nr_slots, kslot, &hint);
		if (si >= 0 && off < t->slots[si].npages) {
			r->pending[r->nr_pending++] =
				((uint64_t)si << TRACKER_PENDING_SLOT_SHIFT) | off;
			valid++;
		}
		/*
		 * Release: our reads of the entry are done before KVM, which load-acquires the
		 * flags in KVM_RESET_DIRTY_RINGS, may recycle it.
		 */
		__atomic_store_n(&e->flags, KVM_DIRTY_GFN_F_RESET, __ATOMIC_RELEASE);
		r->fetch++;
	}
	if (valid)
		atomic_fetch_add(&r->dirty_count, valid);
	return valid;
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
	/* Resets every vCPU's RESET-marked entries and re-protects their pages. */
	if (ioctl(t->vm_fd, KVM_RESET_DIRTY_RINGS) < 0)
		return -errno;
	return 0;
}

int tracker_vcpu_ring_full(struct tracker *t, unsigned idx)
{
	if (!t || t->backend != TRACKER_RING || idx >= t->nr_rings)
		return -EINVAL;

	uint64_t t0 = tracker_now_ns();
	struct tracker_ring *r = &t->rings[idx];
	int rc = 0;
	bool more = true;

	pthread_mutex_lock(&r->lock);
	if (!r->gfns) {
		rc = -ENXIO;
		goto out_unlock;
	}
	/*
	 * Every pending entry had RESET stored before this ioctl, under this lock, so all of
	 * them (ours and any a concurrent tracker_sync() left) are safe to publish after it.
	 */
	while (more) {
		harvest(t, r, &more);
		rc = reset_rings(t);
		if (rc < 0)
			break;
		publish(t, r, r->nr_pending);
	}
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
	 */
	uint32_t *mark = t->sync_mark;
	uint64_t *epoch = t->sync_epoch;
	for (unsigned i = 0; i < t->nr_rings; i++) {
		struct tracker_ring *r = &t->rings[i];
		mark[i] = 0;
		pthread_mutex_lock(&r->lock);
		if (r->gfns) {
			bool more;
			do {
				harvested += harvest(t, r, &more);
				/* pending[] full: reset and publish now, then carry on. */
				if (more) {
					rc = reset_rings(t);
					if (rc < 0)
						break;
					publish(t, r, r->nr_pending);
				}
			} while (more);
			mark[i] = r->nr_pending;
			epoch[i] = r->epoch;
			if (r->nr_pending)
				need_reset = true;
		}
		pthread_mutex_unlock(&r->lock);
		if (rc < 0)
			return rc;
	}
	if (!need_reset)
		goto out;

	rc = reset_rings(t);
	if (rc < 0)
		return rc;

	/*
	 * Phase 2: publish what phase 1 harvested. If the vCPU's own ring-full path emptied
	 * pending[] meanwhile (new epoch), it has published those entries itself after its own
	 * reset. Entries it appended after our mark (only possible if its own reset failed)
	 * may predate our ioctl or not; they wait for the next reset.
	 */
	for (unsigned i = 0; i < t->nr_rings; i++) {
		struct tracker_ring *r = &t->rings[i];
		if (!mark[i])
			continue;
		pthread_mutex_lock(&r->lock);
		if (r->epoch == epoch[i])
			publish(t, r, mark[i]);
		pthread_mutex_unlock(&r->lock);
	}

out:
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
