/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Postcopy on the destination (issue 4): the VM runs before all of its memory is here, and
 * a page it touches that is not here yet is fetched from the source on demand. The guest's
 * memory mappings (one per memslot, a memfd each) are registered with a userfaultfd in
 * MISSING mode: an access to a page the memfd does not hold — by a vCPU through KVM, or by
 * any thread of this process — blocks in the kernel and is reported to a fault thread
 * ("uffd-<vm>"), which asks the source for it through a callback; the page is then placed
 * with UFFDIO_COPY (postcopy_dst_place, or the TCP receivers after xport_dst_set_uffd),
 * which installs it and wakes whoever waits. A page the memfd holds never faults, so what
 * precopy delivered is used without a round trip.
 *
 * Two ways the pages come. Push (cfg.request, TCP): the fault thread asks the source, which
 * sends the asked pages first and every other needed page after them. Pull (cfg.fetch,
 * RDMA): the source's CPU is not in the path; POSTCOPY_PULLERS threads ("pull-<vm>") of this
 * module fetch the pages themselves with the blocking fetch callback (an RDMA READ from the
 * source's exposed memory, placed through the userfaultfd), the pages faults wait on first
 * and every other needed page in runs of cfg.pull_pages in between, until none is missing.
 *
 * Which pages come from the source: the engine names them with postcopy_dst_discard() —
 * the pages dirtied since they were last sent, and those never sent at all. Those are
 * "needed": their stale copies are dropped (a hole is punched into the memfd) and a fault
 * on one asks the source. Every other page is current here: the memfd holds its data, or
 * it is a hole because precopy sent it as a zero page (the receivers leave never-written
 * zero pages as holes); a fault on such a hole is served at once with a zero page, no
 * request. So the engine must name every page the destination does not have current.
 *
 * Completion: postcopy_dst_remaining() counts needed pages not yet here; pages that arrived
 * by any path (including the TCP receivers, which this module does not see) are found by
 * asking the kernel which pages the memfd holds (mincore), which is exact: nothing but a
 * placement can fill a needed page's hole.
 *
 * Failure: once the VM ran here, neither side has a complete copy (docs/scheduler.md). If
 * the source is lost, postcopy_dst_fail() stops asking and pauses the VM; the VM must then
 * be destroyed, never resumed. Missing pages stay missing, with one exception: where KVM
 * cannot be kicked out of a wait for a missing page (it retries the fault in the kernel
 * during instruction emulation, seen on kvm_pvm), the pages stuck vCPUs wait on are filled
 * with zeros so that they return and park; the VM is paused for good by then.
 *
 * Threads: new/discard/fail/free/pull_start/pull_stop are called by the VM's controlling
 * thread (fail and free may call vm_pause). place, remaining, complete, stats and failure may be called from any
 * thread, concurrently. The request callback runs on the fault thread; neither it nor the
 * thread that ends up serving the request may touch guest memory through the mappings (it
 * would fault on a missing page and wait for itself).
 *
 * Hugepage-backed guests are refused (-EOPNOTSUPP): hugetlb faults would have to be served
 * 2 MiB at a time.
 */
#ifndef FERRY_POSTCOPY_H
#define FERRY_POSTCOPY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct vm;
struct postcopy_dst;

#define POSTCOPY_PAGE 4096u
/* Pending faults tracked for latency and retry; far more than threads that can block. */
#define POSTCOPY_MAX_PENDING 256u
/* The fault thread's tick while faults are pending: sweep for pages that arrived through
 * other paths, retry failed requests. Bounds the error of the latency figures. */
#define POSTCOPY_TICK_MS 5

/*
 * Asks the source for pages first_page .. first_page + npages - 1 of slot `slot` (the index
 * in vm_slot(), which is also the transport's region index). Called on the fault thread:
 * it must not block long (queue a PAGE_REQ and return). 0, or -errno: the pages are then
 * asked again on the fault thread's next tick while a fault waits for them.
 */
typedef int (*postcopy_request_fn)(void *arg, uint32_t slot, uint64_t first_page, uint32_t npages);

/*
 * Pull mode: fetches pages first_page .. first_page + npages - 1 of slot `slot` from the
 * source and places them (through the userfaultfd: a page already here is left alone) before
 * it returns. Called on the puller threads, several at once; may block (bounded by its own
 * timeout). 0, or -errno: pulling stops and postcopy_dst_pull_status() reports it — the
 * engine then treats the source as lost.
 */
typedef int (*postcopy_fetch_fn)(void *arg, uint32_t slot, uint64_t first_page, uint32_t npages);

/* Pull mode: puller threads; all but one walk for pages nobody asked for. */
#define POSTCOPY_PULLERS 3u
/* Pull mode: the walk's run length by default, and at most (an RDMA bounce slot's pages). */
#define POSTCOPY_PULL_PAGES 128u
#define POSTCOPY_MAX_PULL_PAGES 1024u

struct postcopy_dst_config {
	/* Exactly one of request (push) and fetch (pull). */
	postcopy_request_fn request;
	postcopy_fetch_fn fetch;
	void *arg;
	/*
	 * With a fault on page p, also ask for up to this many following pages of the same
	 * slot that are needed and not asked for yet (guests touch neighbouring pages). 0 asks
	 * for the faulting page only.
	 */
	uint32_t prefetch_pages;
	/* Pull mode: pages per fetch of the walk; 0 = POSTCOPY_PULL_PAGES. */
	uint32_t pull_pages;
};

struct postcopy_dst_stats {
	uint64_t faults;	  /* fault messages read (a re-fault after a kick counts again) */
	uint64_t fault_pages;	  /* faults on needed pages that waited (one per page) */
	uint64_t zero_fills;	  /* faults on holes that are zero pages, served here */
	uint64_t requests;	  /* request callbacks that succeeded */
	uint64_t pages_requested; /* pages in them (prefetch included) */
	uint64_t request_errors;  /* request callbacks that failed (retried) */
	uint64_t pages_placed;	  /* installed by postcopy_dst_place */
	uint64_t pages_existing;  /* given to postcopy_dst_place but already here (EEXIST) */
	uint64_t pages_needed;	  /* named by postcopy_dst_discard */
	uint64_t pages_missing;	  /* of those, not here yet (as of the last refresh) */
	uint64_t faults_resolved; /* waiting pages seen arriving: the latency figures' count */
	uint64_t fault_wait_sum_ns;
	uint64_t fault_wait_max_ns;
	uint64_t faults_after_fail; /* faults read after postcopy_dst_fail */
	uint64_t pages_released;    /* zero pages given to vCPUs the pause could not kick out */
	uint64_t pulls;		    /* pull mode: fetch callbacks that succeeded */
	uint64_t pages_pulled;	    /* pages in them (demand runs and the walk) */
};

/*
 * Opens a userfaultfd (the userfaultfd syscall, or /dev/userfaultfd where the syscall is
 * refused; not UFFD_USER_MODE_ONLY, which cannot serve KVM's faults on guest memory),
 * registers every memslot's mapping in MISSING mode and starts the fault thread. Call it
 * after the last precopy page landed and before the VM runs. -EPERM (no privilege for
 * userfaultfd), -EOPNOTSUPP (hugepages, or a kernel without shmem support), -EINVAL;
 * err says why. Nothing is left behind on failure.
 */
int postcopy_dst_new(struct vm *vm, const struct postcopy_dst_config *cfg,
		     struct postcopy_dst **ret, char *err, size_t errlen);

/*
 * Pages of slot whose bit is set in bitmap (bit p of word p / 64; npages bits, at most the
 * slot's pages) are stale or absent here: their copies are dropped (a hole punched into the
 * memfd, which also unmaps them from the process and from KVM) and they are needed from the
 * source. Before the VM runs: -EBUSY while it runs. May be called once per slot or several
 * times; -EINVAL for a bad slot or size, -errno from fallocate.
 */
int postcopy_dst_discard(struct postcopy_dst *d, uint32_t slot, const uint64_t *bitmap,
			 uint64_t npages);

/*
 * Places pages first_page .. first_page + npages - 1 of slot: bit i of zero_mask (NULL:
 * none) set means page i is zero; data holds the other pages, packed in order (the layout
 * of a PAGES frame; page-aligned data is placed without a copy). Each page is installed
 * only where none is (UFFDIO_COPY / UFFDIO_ZEROPAGE), waking any thread waiting for it; a
 * page already here is left alone and counts as delivered. -EINVAL outside the slot,
 * -ECANCELED after postcopy_dst_fail, -errno from the kernel.
 */
int postcopy_dst_place(struct postcopy_dst *d, uint32_t slot, uint64_t first_page, uint32_t npages,
		       const void *data, const uint64_t *zero_mask);

/*
 * Pull mode: starts the puller threads. Call it after every postcopy_dst_discard() (a page
 * pulled before its stale copy is punched out would be lost) — before the VM runs is fine.
 * -EINVAL without cfg.fetch, -EALREADY the second time, -errno from pthread_create.
 */
int postcopy_dst_pull_start(struct postcopy_dst *d);
/*
 * Pull mode: 1 when every needed page is here, 0 while pulling, -errno when a fetch failed
 * or postcopy was failed (why says what). Any thread.
 */
int postcopy_dst_pull_status(struct postcopy_dst *d, char *why, size_t len);
/*
 * Pull mode: stops the pullers and waits for them (a fetch in progress finishes or times
 * out first). Call it before the transport the fetch callback uses goes away. Idempotent;
 * postcopy_dst_free() calls it too. Controlling thread.
 */
void postcopy_dst_pull_stop(struct postcopy_dst *d);

/* The userfaultfd, for xport_dst_set_uffd() (which takes its own reference). */
int postcopy_dst_uffd(const struct postcopy_dst *d);

/* Needed pages not here yet (asks the kernel about the ones not seen arriving). */
uint64_t postcopy_dst_remaining(struct postcopy_dst *d);
/* Every needed page is here: the VM no longer depends on the source. */
bool postcopy_dst_complete(struct postcopy_dst *d);

/*
 * The source is lost (or postcopy must stop): records why, stops asking, pauses the VM
 * (vm_pause, whose kick interrupts vCPUs waiting for missing pages; a vCPU it cannot get
 * out within 300 ms is let go with a zero page, see above). The VM is lost: the engine
 * must report it failed with postcopy_dst_failure() and destroy it, never resume it.
 * Idempotent (the first reason stays). Returns vm_pause's result.
 */
int postcopy_dst_fail(struct postcopy_dst *d, const char *why);
/* Why postcopy failed, "" while it has not. */
const char *postcopy_dst_failure(const struct postcopy_dst *d);

void postcopy_dst_stats(struct postcopy_dst *d, struct postcopy_dst_stats *ret);

/*
 * Stops the fault thread, unregisters the mappings and closes the userfaultfd. If needed
 * pages are still missing and the VM was not failed, fails it first ("postcopy ended with N
 * pages missing"): after unregistering, a missing page would read as zeros. NULL-safe.
 */
void postcopy_dst_free(struct postcopy_dst *d);

#endif
