// SPDX-License-Identifier: Apache-2.0
/*
 * The tracker's front: backend choice, memslot bookkeeping, turning KVM dirty logging on
 * and off (re-registering each slot with or without KVM_MEM_LOG_DIRTY_PAGES), dispatching
 * sync to the ring or bitmap backend, and handing out dirty chunks from the per-slot dirty
 * sets. For the manual-protect bitmap, a chunk is re-protected with KVM_CLEAR_DIRTY_LOG
 * right before it is handed out, so the caller's read always follows re-protection.
 */
#include "tracker/tracker_internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

uint64_t tracker_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int tracker_kvm_check(int vm_fd, long cap)
{
	int r = ioctl(vm_fd, KVM_CHECK_EXTENSION, cap);
	return r < 0 ? 0 : r;
}

static const char *const backend_names[] = {
	[TRACKER_AUTO] = "auto",
	[TRACKER_RING] = "ring",
	[TRACKER_BITMAP] = "bitmap",
	[TRACKER_LEGACY] = "legacy",
};

const char *tracker_backend_name(enum tracker_backend b)
{
	if ((unsigned)b < sizeof(backend_names) / sizeof(backend_names[0]))
		return backend_names[b];
	return "unknown";
}

int tracker_backend_parse(const char *s, enum tracker_backend *ret)
{
	if (!s || !ret)
		return -EINVAL;
	for (unsigned i = 0; i < sizeof(backend_names) / sizeof(backend_names[0]); i++) {
		if (!strcmp(s, backend_names[i])) {
			*ret = (enum tracker_backend)i;
			return 0;
		}
	}
	return -EINVAL;
}

unsigned tracker_backends_available(int vm_fd)
{
	/* KVM_GET_DIRTY_LOG is as old as KVM itself; it has no capability. */
	unsigned m = 1u << TRACKER_LEGACY;

	if (vm_fd < 0)
		return 0;
	if (tracker_ring_max_bytes(vm_fd, NULL) >= TRACKER_RING_ENTRIES_MIN * 16u)
		m |= 1u << TRACKER_RING;
	if (tracker_bitmap_manual_available(vm_fd))
		m |= 1u << TRACKER_BITMAP;
	return m;
}

static bool is_pow2(uint32_t v)
{
	return v && !(v & (v - 1));
}

int tracker_new(int vm_fd, const struct tracker_config *cfg, struct tracker **ret)
{
	if (vm_fd < 0 || !cfg || !ret)
		return -EINVAL;
	if (cfg->max_vcpus > TRACKER_MAX_VCPUS)
		return -EINVAL;
	if (cfg->ring_entries &&
	    (!is_pow2(cfg->ring_entries) || cfg->ring_entries < TRACKER_RING_ENTRIES_MIN ||
	     cfg->ring_entries > TRACKER_RING_ENTRIES_MAX))
		return -EINVAL;

	unsigned avail = tracker_backends_available(vm_fd);
	enum tracker_backend b = cfg->backend;
	switch (b) {
	case TRACKER_AUTO:
		/*
		 * The ring, except under kvm_pvm: there KVM overflows the rings of guests that
		 * rewrite pages, and each overflow costs a resend of the whole guest, so
		 * precopy of such guests cannot converge (docs/architecture.md). The bitmap
		 * is exact there. The ring can still be asked for by name.
		 */
		if ((avail & (1u << TRACKER_RING)) &&
		    !((avail & (1u << TRACKER_BITMAP)) && access("/sys/module/kvm_pvm", F_OK) == 0))
			b = TRACKER_RING;
		else if (avail & (1u << TRACKER_BITMAP))
			b = TRACKER_BITMAP;
		else
			b = TRACKER_LEGACY;
		break;
	case TRACKER_RING:
	case TRACKER_BITMAP:
	case TRACKER_LEGACY:
		if (!(avail & (1u << b)))
			return -EOPNOTSUPP;
		break;
	default:
		return -EINVAL;
	}

	struct tracker *t = calloc(1, sizeof(*t));
	if (!t)
		return -ENOMEM;
	t->vm_fd = vm_fd;
	t->backend = b;
	long ps = sysconf(_SC_PAGESIZE);
	t->host_page_size = ps > 0 ? (size_t)ps : TRACKER_PAGE_SIZE;
	atomic_init(&t->nr_slots, 0);
	atomic_init(&t->ring_full_ns, 0);
	atomic_init(&t->ring_full_exits, 0);
	atomic_init(&t->ring_overflows, 0);
	atomic_init(&t->overflow_pending, false);

	int rc = 0;
	switch (b) {
	case TRACKER_RING:
		/* No vCPU count given: rings for as many as KVM could have. */
		rc = tracker_ring_setup(t, cfg->ring_entries,
					cfg->max_vcpus ? cfg->max_vcpus : TRACKER_MAX_VCPUS);
		break;
	case TRACKER_BITMAP:
		rc = tracker_bitmap_enable_manual(t);
		break;
	default:
		break;
	}
	if (rc < 0)
		goto err_free;
	*ret = t;
	return 0;

err_free:
	tracker_free(t);
	return rc;
}

void tracker_free(struct tracker *t)
{
	if (!t)
		return;
	/*
	 * No ioctls here: logging stays as it is (the VM is normally going away too), and the
	 * ring and manual-protect capabilities cannot be turned off anyway.
	 */
	tracker_ring_teardown(t);
	unsigned n = atomic_load(&t->nr_slots);
	for (unsigned i = 0; i < n; i++) {
		dirtyset_free(t->slots[i].ds);
		free(t->slots[i].scratch);
	}
	free(t);
}

enum tracker_backend tracker_backend(const struct tracker *t)
{
	return t ? t->backend : TRACKER_AUTO;
}

uint32_t tracker_ring_entries(const struct tracker *t)
{
	return t && t->backend == TRACKER_RING ? t->ring_entries : 0;
}

int tracker_slot_add(struct tracker *t, const struct tracker_slot *s)
{
	if (!t || !s || !s->size || !s->hva)
		return -EINVAL;
	if ((s->gpa | s->size) & (TRACKER_PAGE_SIZE - 1))
		return -EINVAL;
	/* Ring entries carry (as_id << 16) | id; we register address space 0 only. */
	if (s->slot > 0xffff)
		return -EINVAL;
	if (t->running)
		return -EBUSY;

	unsigned n = atomic_load(&t->nr_slots);
	if (n >= TRACKER_MAX_SLOTS)
		return -ENOSPC;
	for (unsigned i = 0; i < n; i++)
		if (t->slots[i].desc.slot == s->slot)
			return -EEXIST;

	struct tracker_slot_state *st = &t->slots[n];
	uint64_t npages = s->size >> TRACKER_PAGE_SHIFT;
	int rc = dirtyset_new(npages, &st->ds);
	if (rc < 0)
		return rc;
	if (t->backend == TRACKER_BITMAP || t->backend == TRACKER_LEGACY) {
		st->scratch = calloc((npages + 63) / 64, sizeof(uint64_t));
		if (!st->scratch) {
			rc = -ENOMEM;
			goto err_free_ds;
		}
	}
	st->desc = *s;
	st->npages = npages;
	/* Publish: ring harvesters in vCPU threads read slots[] below nr_slots. */
	atomic_store_explicit(&t->nr_slots, n + 1, memory_order_release);
	return 0;

err_free_ds:
	dirtyset_free(st->ds);
	st->ds = NULL;
	return rc;
}

int tracker_vcpu_attach(struct tracker *t, unsigned idx, int vcpu_fd)
{
	if (!t)
		return -EINVAL;
	if (t->backend != TRACKER_RING)
		return 0;
	return tracker_ring_attach(t, idx, vcpu_fd);
}

/* Re-registers slot i with the same shape, toggling only KVM_MEM_LOG_DIRTY_PAGES. */
static int set_logging(struct tracker *t, unsigned i, bool on)
{
	const struct tracker_slot *d = &t->slots[i].desc;
	struct kvm_userspace_memory_region r;

	memset(&r, 0, sizeof(r));
	r.slot = d->slot;
	r.flags = d->kvm_flags & ~(uint32_t)KVM_MEM_LOG_DIRTY_PAGES;
	if (on)
		r.flags |= KVM_MEM_LOG_DIRTY_PAGES;
	r.guest_phys_addr = d->gpa;
	r.memory_size = d->size;
	r.userspace_addr = (uint64_t)(uintptr_t)d->hva;
	if (ioctl(t->vm_fd, KVM_SET_USER_MEMORY_REGION, &r) < 0)
		return -errno;
	return 0;
}

int tracker_relog_all(struct tracker *t)
{
	unsigned n = atomic_load(&t->nr_slots);
	int rc = 0, r;

	/*
	 * Off then on: re-registering a slot with KVM_MEM_LOG_DIRTY_PAGES set again makes KVM
	 * write-protect (or, with PML, clean) all of it, which is the only way the ring backend
	 * has to re-protect pages whose ring entries KVM overwrote. Writes in between are not
	 * logged; marking every page dirty afterwards covers them and everything lost before.
	 * Keep going on errors so that no slot is left with logging off if it can be helped.
	 */
	if (t->running) {
		for (unsigned i = 0; i < n; i++) {
			r = set_logging(t, i, false);
			if (r < 0 && rc >= 0)
				rc = r;
			r = set_logging(t, i, true);
			if (r < 0 && rc >= 0)
				rc = r;
		}
	}
	for (unsigned i = 0; i < n; i++)
		dirtyset_set_all(t->slots[i].ds);
	return rc;
}

static int sync_backend(struct tracker *t, uint64_t *ret_harvested)
{
	*ret_harvested = 0;
	switch (t->backend) {
	case TRACKER_RING:
		return tracker_ring_sync(t, ret_harvested);
	case TRACKER_BITMAP:
	case TRACKER_LEGACY:
		/* Without logging the slots have no KVM bitmap (KVM_GET_DIRTY_LOG: ENOENT). */
		if (!t->running)
			return 0;
		return tracker_bitmap_sync(t, ret_harvested);
	default:
		return -EINVAL;
	}
}

int tracker_start(struct tracker *t, bool mark_all)
{
	if (!t)
		return -EINVAL;
	if (t->running)
		return -EBUSY;

	unsigned n = atomic_load(&t->nr_slots);
	uint64_t dummy;
	int rc;

	/*
	 * Drop what an earlier run left. Rings first, so nothing harvested from them lands
	 * after the clear; and all of it before logging goes on, because from then on vCPU
	 * threads may publish pages that must stay.
	 */
	if (t->backend == TRACKER_RING) {
		rc = tracker_ring_sync(t, &dummy);
		if (rc < 0)
			return rc;
	}
	for (unsigned i = 0; i < n; i++)
		dirtyset_clear_all(t->slots[i].ds);

	unsigned on;
	for (on = 0; on < n; on++) {
		rc = set_logging(t, on, true);
		if (rc < 0)
			goto err_undo;
	}
	t->running = true;
	if (mark_all)
		for (unsigned i = 0; i < n; i++)
			dirtyset_set_all(t->slots[i].ds);
	return 0;

err_undo:
	while (on--)
		set_logging(t, on, false);
	return rc;
}

int tracker_stop(struct tracker *t)
{
	if (!t)
		return -EINVAL;
	if (!t->running)
		return 0;

	unsigned n = atomic_load(&t->nr_slots);
	uint64_t dummy;
	int rc = 0, r;

	/*
	 * Keep what was logged: the bitmap must be fetched while logging is still on (KVM frees
	 * it with the flag); the ring is drained after, so writes up to the toggle are in.
	 */
	if (t->backend != TRACKER_RING)
		rc = sync_backend(t, &dummy);
	for (unsigned i = 0; i < n; i++) {
		r = set_logging(t, i, false);
		if (r < 0 && rc >= 0)
			rc = r;
	}
	t->running = false;
	if (t->backend == TRACKER_RING) {
		r = tracker_ring_sync(t, &dummy);
		if (r < 0 && rc >= 0)
			rc = r;
	}
	return rc;
}

bool tracker_running(const struct tracker *t)
{
	return t && t->running;
}

int tracker_sync(struct tracker *t, struct tracker_sync_stats *ret_stats)
{
	if (!t)
		return -EINVAL;

	uint64_t t0 = tracker_now_ns(), harvested = 0;
	int rc = sync_backend(t, &harvested);
	if (rc < 0)
		return rc;
	if (ret_stats) {
		ret_stats->harvested = harvested;
		ret_stats->sync_ns = tracker_now_ns() - t0;
	}
	return 0;
}

static int take_next(struct tracker *t, struct tracker_cursor *cur, struct tracker_batch *ret,
		     bool protect)
{
	if (!t || !cur || !ret)
		return -EINVAL;

	unsigned n = atomic_load(&t->nr_slots);
	uint64_t bits[TRACKER_CHUNK_WORDS];

	while (cur->slot_index < n) {
		struct tracker_slot_state *s = &t->slots[cur->slot_index];
		uint64_t c = cur->chunk;
		unsigned cnt = dirtyset_take_next(s->ds, &c, bits);
		if (!cnt) {
			cur->slot_index++;
			cur->chunk = 0;
			continue;
		}

		uint64_t first = c * TRACKER_CHUNK_PAGES;
		uint64_t left = s->npages - first;
		uint32_t np = left < TRACKER_CHUNK_PAGES ? (uint32_t)left : TRACKER_CHUNK_PAGES;

		/* Re-protect before the caller can read (DESIGN.md rule 1). */
		if (protect && t->backend == TRACKER_BITMAP && t->running) {
			int rc = tracker_bitmap_clear_chunk(t, s, first, np, bits);
			if (rc < 0) {
				/* Not handed out, so it must stay dirty. */
				dirtyset_or_chunk(s->ds, c, bits);
				return rc;
			}
		}

		ret->slot_index = cur->slot_index;
		ret->first_page = first;
		ret->npages = np;
		ret->dirty = cnt;
		memcpy(ret->bits, bits, sizeof(bits));
		cur->chunk = c + 1;
		return 1;
	}
	return 0;
}

int tracker_take_next(struct tracker *t, struct tracker_cursor *cur, struct tracker_batch *ret)
{
	return take_next(t, cur, ret, true);
}

int tracker_take_next_paused(struct tracker *t, struct tracker_cursor *cur,
			     struct tracker_batch *ret)
{
	return take_next(t, cur, ret, false);
}

void tracker_mark_dirty(struct tracker *t, uint32_t slot_index, uint64_t page)
{
	if (!t)
		return;
	unsigned n = atomic_load_explicit(&t->nr_slots, memory_order_acquire);
	if (slot_index < n)
		dirtyset_set(t->slots[slot_index].ds, page);
}

uint64_t tracker_dirty_pages(const struct tracker *t)
{
	if (!t)
		return 0;
	unsigned n = atomic_load_explicit(&t->nr_slots, memory_order_acquire);
	uint64_t total = 0;
	for (unsigned i = 0; i < n; i++)
		total += dirtyset_count(t->slots[i].ds);
	return total;
}
