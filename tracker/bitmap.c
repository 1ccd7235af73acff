// SPDX-License-Identifier: Apache-2.0
/*
 * The dirty-bitmap backends. Both fetch each slot's bitmap with KVM_GET_DIRTY_LOG into a
 * per-slot scratch buffer and OR it into the dirty set. Legacy: the kernel clears its bitmap
 * and re-protects every returned page inside that ioctl, so the pages are safe to read once
 * it returns. Manual protect (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, enabled without
 * INITIALLY_SET): KVM_GET_DIRTY_LOG only reports; the kernel's bit stays set and the page
 * writable until KVM_CLEAR_DIRTY_LOG, which tracker_take_next() issues for exactly the bits
 * of the chunk it hands out, just before handing it out. That spreads the re-protection
 * (and its TLB flushes) over the pass instead of stalling the guest once per sync.
 */
#include "tracker/tracker_internal.h"

#include <errno.h>
#include <string.h>
#include <sys/ioctl.h>

bool tracker_bitmap_manual_available(int vm_fd)
{
	return tracker_kvm_check(vm_fd, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) &
	       KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE;
}

int tracker_bitmap_enable_manual(struct tracker *t)
{
	struct kvm_enable_cap ec;

	memset(&ec, 0, sizeof(ec));
	ec.cap = KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2;
	/* Not INITIALLY_SET: enabling logging write-protects everything and starts empty. */
	ec.args[0] = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE;
	if (ioctl(t->vm_fd, KVM_ENABLE_CAP, &ec) < 0)
		return -errno;
	return 0;
}

int tracker_bitmap_sync(struct tracker *t, uint64_t *ret_harvested)
{
	unsigned n = atomic_load_explicit(&t->nr_slots, memory_order_acquire);
	uint64_t harvested = 0;

	for (unsigned i = 0; i < n; i++) {
		struct tracker_slot_state *s = &t->slots[i];
		struct kvm_dirty_log log;

		memset(&log, 0, sizeof(log));
		log.slot = s->desc.slot;
		log.dirty_bitmap = s->scratch;
		if (ioctl(t->vm_fd, KVM_GET_DIRTY_LOG, &log) < 0)
			return -errno;

		uint64_t nwords = (s->npages + 63) / 64;
		for (uint64_t w = 0; w < nwords; w++) {
			uint64_t v = s->scratch[w];
			if (!v)
				continue;
			harvested += (uint64_t)__builtin_popcountll(v);
			dirtyset_or_word(s->ds, w, v);
		}
	}
	if (ret_harvested)
		*ret_harvested = harvested;
	return 0;
}

int tracker_bitmap_clear_chunk(struct tracker *t, const struct tracker_slot_state *s,
			       uint64_t first_page, uint32_t npages,
			       const uint64_t bits[TRACKER_CHUNK_WORDS])
{
	struct kvm_clear_dirty_log cl;

	/*
	 * first_page is a multiple of TRACKER_CHUNK_PAGES (so of 64) and npages is either a
	 * whole chunk or runs to the end of the slot: the two shapes KVM accepts. KVM only
	 * clears and re-protects pages whose bit is set both here and in its own bitmap.
	 */
	memset(&cl, 0, sizeof(cl));
	cl.slot = s->desc.slot;
	cl.first_page = first_page;
	cl.num_pages = npages;
	cl.dirty_bitmap = (void *)bits;
	if (ioctl(t->vm_fd, KVM_CLEAR_DIRTY_LOG, &cl) < 0)
		return -errno;
	return 0;
}
