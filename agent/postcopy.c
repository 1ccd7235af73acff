// SPDX-License-Identifier: Apache-2.0
/*
 * Postcopy on the destination (postcopy.h): a userfaultfd in MISSING mode over every
 * memslot's memfd mapping, a fault thread that turns faults into page requests to the
 * source (or serves holes that are zero pages itself), placement with UFFDIO_COPY /
 * UFFDIO_ZEROPAGE, discard of stale pages by punching holes into the memfds, and the
 * bookkeeping that says when every needed page is here.
 *
 * Per slot, three bitmaps of atomic words: `need` (named by discard: must come from the
 * source), `asked` (a request or a pull covers it: do not ask twice) and `here` (seen
 * arriving: placed by us or pulled, or found in the memfd by mincore).
 *
 * Pull mode (cfg.fetch, RDMA): nobody pushes; POSTCOPY_PULLERS threads ("pull-<vm>") fetch
 * every needed page themselves. The fault thread's requests go to a queue they serve first;
 * in between, all but one of them walk the slots for needed pages nobody asked for and fetch
 * them in runs of cfg.pull_pages, so one is always free for the next fault.
 *
 * A needed page that is not `here` may still have arrived through the TCP receivers; mincore on the mapping says whether the memfd holds it
 * without faulting, which is the same test the kernel makes before raising a MISSING fault.
 */
#include "agent/postcopy.h"
#include "transport/transport.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "agent/vm/vm.h"

#define PAGE POSTCOPY_PAGE
#define MSGS_PER_READ 64u
/* How long postcopy_dst_fail lets the pause's kick work before it releases stuck vCPUs. */
#define RELEASE_AFTER_MS 300
#define PULL_QUEUE POSTCOPY_MAX_PENDING /* demand runs waiting for a puller */

struct pc_slot {
	uint8_t *hva;
	uint64_t size;
	uint64_t pages;
	int memfd;
	bool registered;
	_Atomic uint64_t *need;
	_Atomic uint64_t *asked;
	_Atomic uint64_t *here;
};

/* A fault on a needed page, waiting: for latency, and to retry a failed request. */
struct pc_pending {
	bool used;
	bool requested; /* a request for it went out (else retried on the tick) */
	uint32_t slot;
	uint64_t page;
	int64_t t0_ns; /* when the fault thread read the fault */
};

struct postcopy_dst {
	struct vm *vm;
	struct postcopy_dst_config cfg;
	int uffd;
	int stop_efd;
	pthread_t thread;
	bool thread_started;
	unsigned nr_slots;
	struct pc_slot *slots;

	/*
	 * lock: pending[] and the failure reason. Also held by discard across marking pages
	 * needed and punching their holes, and by the fault thread across deciding a hole is
	 * a zero page and filling it, so a zero fill can never land after a punch it raced
	 * with (which would make a stale zero page look current).
	 */
	pthread_mutex_t lock;
	struct pc_pending pending[POSTCOPY_MAX_PENDING];
	unsigned nr_pending;
	atomic_bool failed; /* set once, after why is written */
	char why[256];
	/*
	 * Failing: the pause could not get every vCPU out of a missing-page wait, so faults
	 * are answered with zero pages until it could (postcopy_dst_fail). cond, with lock:
	 * pause_done became true.
	 */
	atomic_bool release;
	pthread_cond_t cond;
	bool pause_done;
	int pause_r;

	_Atomic uint64_t faults, fault_pages, zero_fills, requests, pages_requested, request_errors,
	    pages_placed, pages_existing, faults_resolved, wait_sum_ns, wait_max_ns,
	    faults_after_fail, pages_released, pulls, pages_pulled;

	/*
	 * Pull mode. Under lock: the demand queue (a ring), the walk's cursor, how many pullers
	 * are on a background run, stop, and the first fetch error. pull_cond (with lock): a
	 * demand run was queued, or stop.
	 */
	pthread_cond_t pull_cond;
	struct {
		uint32_t slot;
		uint64_t page;
		uint32_t n;
	} queue[PULL_QUEUE];
	unsigned q_head, q_len;
	uint32_t walk_slot;
	uint64_t walk_page;
	unsigned pull_bg;
	bool pull_stop;
	int pull_err;
	char pull_why[160];
	pthread_t pullers[POSTCOPY_PULLERS];
	unsigned nr_pullers;
};

static int64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void set_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;

	if (!err || !errlen)
		return;
	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
}

static bool test_bit(_Atomic uint64_t *map, uint64_t i)
{
	return atomic_load_explicit(&map[i / 64], memory_order_acquire) & (1ull << (i % 64));
}

/* Sets bit i; true if it was clear. */
static bool set_bit(_Atomic uint64_t *map, uint64_t i)
{
	uint64_t b = 1ull << (i % 64);

	return !(atomic_fetch_or_explicit(&map[i / 64], b, memory_order_acq_rel) & b);
}

static void clear_bit(_Atomic uint64_t *map, uint64_t i)
{
	atomic_fetch_and_explicit(&map[i / 64], ~(1ull << (i % 64)), memory_order_acq_rel);
}

static void stat_max(_Atomic uint64_t *m, uint64_t v)
{
	uint64_t cur = atomic_load_explicit(m, memory_order_relaxed);

	while (cur < v && !atomic_compare_exchange_weak_explicit(m, &cur, v, memory_order_relaxed,
								 memory_order_relaxed))
		;
}

/* ---------------- userfaultfd ---------------- */

/*
 * Not UFFD_USER_MODE_ONLY: KVM reaches guest memory through get_user_pages and
 * copy_to_user, kernel-mode faults that such a descriptor answers with SIGBUS. Without
 * CAP_SYS_PTRACE (and with vm.unprivileged_userfaultfd = 0) the syscall refuses those;
 * /dev/userfaultfd grants them to whoever may open it.
 */
static int uffd_open(char *err, size_t errlen)
{
	int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);

	if (fd >= 0)
		return fd;
	int e = errno;
	if (e == EPERM || e == ENOSYS) {
		int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
		if (dev >= 0) {
			fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
			int e2 = errno;
			close(dev);
			if (fd >= 0)
				return fd;
			e = e2;
		}
	}
	if (e == EPERM || e == EACCES) {
		set_err(err, errlen,
			"userfaultfd: permission denied (needs CAP_SYS_PTRACE, "
			"vm.unprivileged_userfaultfd=1 or access to /dev/userfaultfd)");
		return -EPERM;
	}
	set_err(err, errlen, "userfaultfd: %s", strerror(e));
	return e == ENOSYS ? -EOPNOTSUPP : -e;
}

/* Wakes threads waiting on [addr, addr + len): for pages that became present without a
 * placement that woke them. Harmless when nobody waits. */
static void uffd_wake(int uffd, void *addr, uint64_t len)
{
	struct uffdio_range r = {.start = (uintptr_t)addr, .len = len};

	(void)ioctl(uffd, UFFDIO_WAKE, &r);
}

/* ---------------- bookkeeping ---------------- */

/*
 * Marks the pages of the pending table in [first, first + n) of slot resolved at `now`.
 * Called with d->lock held.
 */
static void resolve_pending_locked(struct postcopy_dst *d, uint32_t slot, uint64_t first,
				   uint64_t n, int64_t now)
{
	for (unsigned i = 0; i < POSTCOPY_MAX_PENDING && d->nr_pending; i++) {
		struct pc_pending *p = &d->pending[i];
		if (!p->used || p->slot != slot || p->page < first || p->page >= first + n)
			continue;
		uint64_t w = now > p->t0_ns ? (uint64_t)(now - p->t0_ns) : 0;
		atomic_fetch_add_explicit(&d->faults_resolved, 1, memory_order_relaxed);
		atomic_fetch_add_explicit(&d->wait_sum_ns, w, memory_order_relaxed);
		stat_max(&d->wait_max_ns, w);
		p->used = false;
		d->nr_pending--;
	}
}

/* Whether the memfd holds page `page` of s (without faulting it in). */
static bool page_resident(const struct pc_slot *s, uint64_t page)
{
	unsigned char v = 0;

	if (mincore(s->hva + page * PAGE, PAGE, &v) < 0)
		return false;
	return v & 1;
}

/* ---------------- the fault thread ---------------- */

/*
 * Failing, and a vCPU cannot be kicked out of its wait for this page: lets it go on with a
 * zero page. The VM is lost and paused for good; only the pages stuck vCPUs wait on get
 * made-up contents.
 */
static void release_page(struct postcopy_dst *d, uint8_t *pa)
{
	uint64_t placed = 0, existing = 0;

	if (xport_uffd_place(d->uffd, pa, NULL, PAGE, &placed, &existing) == 0 && existing)
		uffd_wake(d->uffd, pa, PAGE);
	atomic_fetch_add_explicit(&d->pages_released, placed, memory_order_relaxed);
}

static int find_slot(const struct postcopy_dst *d, uint64_t addr, uint64_t *ret_page)
{
	for (unsigned i = 0; i < d->nr_slots; i++) {
		const struct pc_slot *s = &d->slots[i];
		uint64_t base = (uintptr_t)s->hva;
		if (addr >= base && addr - base < s->size) {
			*ret_page = (addr - base) / PAGE;
			return (int)i;
		}
	}
	return -1;
}

/* Pull mode: hands a demand run to the pullers. -EBUSY when the queue is full (retried). */
static int enqueue_demand(struct postcopy_dst *d, uint32_t si, uint64_t page, uint32_t n)
{
	int r = 0;

	pthread_mutex_lock(&d->lock);
	if (d->pull_err || d->pull_stop) {
		r = d->pull_err ? d->pull_err : -ECANCELED;
	} else if (d->q_len == PULL_QUEUE) {
		r = -EBUSY;
	} else {
		unsigned i = (d->q_head + d->q_len++) % PULL_QUEUE;
		d->queue[i].slot = si;
		d->queue[i].page = page;
		d->queue[i].n = n;
		pthread_cond_signal(&d->pull_cond);
	}
	pthread_mutex_unlock(&d->lock);
	return r;
}

/*
 * Asks for page `page` of slot si and up to prefetch following needed pages nobody asked
 * for. Called on the fault thread, without d->lock. Returns the callback's result; on
 * failure the pages are no longer marked asked.
 */
static int request_run(struct postcopy_dst *d, uint32_t si, uint64_t page)
{
	struct pc_slot *s = &d->slots[si];
	uint32_t n = 1;

	(void)set_bit(s->asked, page);
	while (n <= d->cfg.prefetch_pages && page + n < s->pages && test_bit(s->need, page + n) &&
	       !test_bit(s->here, page + n) && set_bit(s->asked, page + n))
		n++;
	int r = d->cfg.fetch ? enqueue_demand(d, si, page, n)
			     : d->cfg.request(d->cfg.arg, si, page, n);
	if (r < 0) {
		for (uint32_t i = 0; i < n; i++)
			clear_bit(s->asked, page + i);
		atomic_fetch_add_explicit(&d->request_errors, 1, memory_order_relaxed);
		return r;
	}
	atomic_fetch_add_explicit(&d->requests, 1, memory_order_relaxed);
	atomic_fetch_add_explicit(&d->pages_requested, n, memory_order_relaxed);
	return 0;
}

/*
 * Lists a wait on page `page` of slot si (d->lock held): *known when it is listed already;
 * else a new entry if there is room. Returns the new entry, or NULL.
 */
static struct pc_pending *list_pending_locked(struct postcopy_dst *d, uint32_t si,
					      uint64_t page, int64_t now, bool *known)
{
	struct pc_pending *p = NULL;

	*known = false;
	for (unsigned i = 0; i < POSTCOPY_MAX_PENDING; i++) {
		struct pc_pending *q = &d->pending[i];
		if (q->used && q->slot == si && q->page == page) {
			*known = true;
			return NULL;
		}
		if (!q->used && !p)
			p = q;
	}
	if (p) {
		*p = (struct pc_pending){.used = true, .slot = si, .page = page, .t0_ns = now};
		d->nr_pending++;
	}
	return p;
}

static void on_fault(struct postcopy_dst *d, uint64_t addr, int64_t now)
{
	uint64_t page;
	int si = find_slot(d, addr, &page);

	atomic_fetch_add_explicit(&d->faults, 1, memory_order_relaxed);
	if (si < 0)
		return; /* cannot happen: only the slots are registered */
	struct pc_slot *s = &d->slots[si];
	uint8_t *pa = s->hva + page * PAGE;

	if (atomic_load_explicit(&d->failed, memory_order_acquire)) {
		/*
		 * Nobody will send it: the thread waits until the pause's kick gets it out — or,
		 * where the kick cannot, until postcopy_dst_fail releases it. Both decided under
		 * d->lock, so a fault is either released here or listed for that release.
		 */
		atomic_fetch_add_explicit(&d->faults_after_fail, 1, memory_order_relaxed);
		pthread_mutex_lock(&d->lock);
		bool rel = atomic_load_explicit(&d->release, memory_order_acquire), known;
		if (!rel)
			list_pending_locked(d, (uint32_t)si, page, now, &known);
		pthread_mutex_unlock(&d->lock);
		if (rel)
			release_page(d, pa);
		return;
	}

	pthread_mutex_lock(&d->lock);
	if (!test_bit(s->need, page)) {
		/* Current here, a hole: precopy sent it as a zero page. */
		uint64_t placed = 0, existing = 0;
		if (xport_uffd_place(d->uffd, pa, NULL, PAGE, &placed, &existing) == 0 && existing)
			uffd_wake(d->uffd, pa, PAGE);
		pthread_mutex_unlock(&d->lock);
		atomic_fetch_add_explicit(&d->zero_fills, 1, memory_order_relaxed);
		return;
	}
	pthread_mutex_unlock(&d->lock);

	if (test_bit(s->here, page) || page_resident(s, page)) {
		/* Arrived between the fault and now, by a path that may not have woken it. */
		if (set_bit(s->here, page)) {
			pthread_mutex_lock(&d->lock);
			resolve_pending_locked(d, (uint32_t)si, page, 1, now);
			pthread_mutex_unlock(&d->lock);
		}
		uffd_wake(d->uffd, pa, PAGE);
		return;
	}

	/* Track it (once per page) for latency and retries. */
	bool known = false;
	pthread_mutex_lock(&d->lock);
	struct pc_pending *p = list_pending_locked(d, (uint32_t)si, page, now, &known);
	if (!known)
		atomic_fetch_add_explicit(&d->fault_pages, 1, memory_order_relaxed);
	pthread_mutex_unlock(&d->lock);

	if (test_bit(s->asked, page))
		return; /* a request covers it; its arrival wakes every waiter */
	int r = request_run(d, (uint32_t)si, page);
	if (r == 0 && p && !known) {
		pthread_mutex_lock(&d->lock);
		if (p->used && p->slot == (uint32_t)si && p->page == page)
			p->requested = true;
		pthread_mutex_unlock(&d->lock);
	}
}

/*
 * Every tick while faults wait: a waiting page that arrived through the transport is
 * resolved (and woken, in case its path did not), a page whose request failed is asked
 * again.
 */
static void tick(struct postcopy_dst *d, int64_t now)
{
	struct {
		uint32_t slot;
		uint64_t page;
	} retry[POSTCOPY_MAX_PENDING];
	unsigned nr_retry = 0;

	pthread_mutex_lock(&d->lock);
	if (atomic_load_explicit(&d->failed, memory_order_acquire)) {
		/*
		 * Nothing will answer any more, but the waits stay listed: postcopy_dst_fail
		 * releases the vCPUs that the pause cannot kick out by these entries (a fault
		 * already read is not reported again).
		 */
		pthread_mutex_unlock(&d->lock);
		return;
	}
	for (unsigned i = 0; i < POSTCOPY_MAX_PENDING && d->nr_pending; i++) {
		struct pc_pending *p = &d->pending[i];
		if (!p->used)
			continue;
		struct pc_slot *s = &d->slots[p->slot];
		if (test_bit(s->here, p->page) || page_resident(s, p->page)) {
			set_bit(s->here, p->page);
			uffd_wake(d->uffd, s->hva + p->page * PAGE, PAGE);
			resolve_pending_locked(d, p->slot, p->page, 1, now);
			continue;
		}
		if (!p->requested && !test_bit(s->asked, p->page) &&
		    !atomic_load_explicit(&d->failed, memory_order_relaxed)) {
			retry[nr_retry].slot = p->slot;
			retry[nr_retry].page = p->page;
			nr_retry++;
		}
	}
	pthread_mutex_unlock(&d->lock);

	for (unsigned i = 0; i < nr_retry; i++) {
		if (request_run(d, retry[i].slot, retry[i].page) < 0)
			continue;
		pthread_mutex_lock(&d->lock);
		for (unsigned j = 0; j < POSTCOPY_MAX_PENDING; j++) {
			struct pc_pending *p = &d->pending[j];
			if (p->used && p->slot == retry[i].slot && p->page == retry[i].page)
				p->requested = true;
		}
		pthread_mutex_unlock(&d->lock);
	}
}

static void *fault_thread(void *arg)
{
	struct postcopy_dst *d = arg;
	char name[16];
	struct uffd_msg msgs[MSGS_PER_READ];

	snprintf(name, sizeof(name), "uffd-%s", vm_name(d->vm));
	pthread_setname_np(pthread_self(), name);

	for (;;) {
		struct pollfd pfd[2] = {{.fd = d->uffd, .events = POLLIN},
					{.fd = d->stop_efd, .events = POLLIN}};
		pthread_mutex_lock(&d->lock);
		int timeout = d->nr_pending && !atomic_load(&d->failed) ? POSTCOPY_TICK_MS : -1;
		pthread_mutex_unlock(&d->lock);

		int n = poll(pfd, 2, timeout);
		if (n < 0 && errno != EINTR)
			break;
		if (pfd[1].revents)
			break;
		if (n > 0 && (pfd[0].revents & POLLIN)) {
			ssize_t got = read(d->uffd, msgs, sizeof(msgs));
			int64_t now = now_ns();
			for (ssize_t i = 0; got > 0 && i < got / (ssize_t)sizeof(msgs[0]); i++) {
				if (msgs[i].event == UFFD_EVENT_PAGEFAULT)
					on_fault(d, msgs[i].arg.pagefault.address, now);
			}
		}
		tick(d, now_ns());
	}
	return NULL;
}

/* ---------------- pull mode ---------------- */

/*
 * The walk: the next run of needed pages that are not here and that nobody asked for, from
 * the cursor on, at most pull_pages long; claims them (asked). Called with d->lock held.
 */
static bool next_walk_run_locked(struct postcopy_dst *d, uint32_t *ret_slot, uint64_t *ret_page,
				 uint32_t *ret_n)
{
	for (; d->walk_slot < d->nr_slots; d->walk_slot++, d->walk_page = 0) {
		struct pc_slot *s = &d->slots[d->walk_slot];
		uint64_t p = d->walk_page;
		while (p < s->pages) {
			uint64_t w = p / 64;
			uint64_t open = atomic_load_explicit(&s->need[w], memory_order_acquire) &
					~atomic_load_explicit(&s->here[w], memory_order_acquire) &
					~atomic_load_explicit(&s->asked[w], memory_order_acquire);
			open &= ~0ull << (p % 64);
			if (!open) {
				p = (w + 1) * 64;
				continue;
			}
			p = w * 64 + (uint64_t)__builtin_ctzll(open);
			if (p >= s->pages)
				break;
			uint32_t n = 0;
			/* set_bit claims a page the fault thread did not just ask for itself. */
			while (n < d->cfg.pull_pages && p + n < s->pages && test_bit(s->need, p + n) &&
			       !test_bit(s->here, p + n) && set_bit(s->asked, p + n))
				n++;
			if (!n) {
				p++;
				continue;
			}
			d->walk_page = p + n;
			*ret_slot = d->walk_slot;
			*ret_page = p;
			*ret_n = n;
			return true;
		}
	}
	return false;
}

static void *pull_thread(void *arg)
{
	struct postcopy_dst *d = arg;
	char name[16];

	snprintf(name, sizeof(name), "pull-%s", vm_name(d->vm));
	pthread_setname_np(pthread_self(), name);
	pthread_mutex_lock(&d->lock);
	for (;;) {
		if (d->pull_stop || d->pull_err || atomic_load(&d->failed))
			break;
		uint32_t slot = 0, n = 0;
		uint64_t page = 0;
		bool walk = false;
		if (d->q_len) {
			slot = d->queue[d->q_head].slot;
			page = d->queue[d->q_head].page;
			n = d->queue[d->q_head].n;
			d->q_head = (d->q_head + 1) % PULL_QUEUE;
			d->q_len--;
		} else if (d->pull_bg + 1 < POSTCOPY_PULLERS &&
			   next_walk_run_locked(d, &slot, &page, &n)) {
			walk = true;
			d->pull_bg++;
		} else {
			pthread_cond_wait(&d->pull_cond, &d->lock);
			continue;
		}
		pthread_mutex_unlock(&d->lock);

		int r = d->cfg.fetch(d->cfg.arg, slot, page, n);
		struct pc_slot *s = &d->slots[slot];
		for (uint32_t i = 0; i < n; i++) {
			if (r == 0)
				set_bit(s->here, page + i);
			else
				clear_bit(s->asked, page + i);
		}
		if (r == 0) {
			atomic_fetch_add_explicit(&d->pulls, 1, memory_order_relaxed);
			atomic_fetch_add_explicit(&d->pages_pulled, n, memory_order_relaxed);
		}

		pthread_mutex_lock(&d->lock);
		if (walk)
			d->pull_bg--;
		if (r < 0 && !d->pull_err) {
			d->pull_err = r;
			snprintf(d->pull_why, sizeof(d->pull_why),
				 "fetching %u pages at page %llu of slot %u: %s", n,
				 (unsigned long long)page, slot, strerror(-r));
		}
		if (r == 0 && d->nr_pending)
			resolve_pending_locked(d, slot, page, n, now_ns());
		/* A walker that finished leaves room for another: wake one. */
		pthread_cond_signal(&d->pull_cond);
	}
	pthread_cond_broadcast(&d->pull_cond);
	pthread_mutex_unlock(&d->lock);
	return NULL;
}

int postcopy_dst_pull_start(struct postcopy_dst *d)
{
	if (!d || !d->cfg.fetch)
		return -EINVAL;
	if (d->nr_pullers)
		return -EALREADY;
	for (unsigned i = 0; i < POSTCOPY_PULLERS; i++) {
		int r = -pthread_create(&d->pullers[i], NULL, pull_thread, d);
		if (r < 0) {
			if (!d->nr_pullers)
				return r;
			break; /* fewer pullers still pull every page */
		}
		pthread_mutex_lock(&d->lock);
		d->nr_pullers++;
		pthread_mutex_unlock(&d->lock);
	}
	return 0;
}

int postcopy_dst_pull_status(struct postcopy_dst *d, char *why, size_t len)
{
	int r = 0;

	if (!d || !d->cfg.fetch)
		return -EINVAL;
	pthread_mutex_lock(&d->lock);
	if (d->pull_err) {
		r = d->pull_err;
		set_err(why, len, "%s", d->pull_why);
	}
	pthread_mutex_unlock(&d->lock);
	if (r < 0)
		return r;
	if (atomic_load(&d->failed)) {
		set_err(why, len, "%s", d->why);
		return -ECANCELED;
	}
	return postcopy_dst_remaining(d) == 0 ? 1 : 0;
}

void postcopy_dst_pull_stop(struct postcopy_dst *d)
{
	if (!d)
		return;
	pthread_mutex_lock(&d->lock);
	unsigned n = d->nr_pullers;
	d->pull_stop = true;
	pthread_cond_broadcast(&d->pull_cond);
	pthread_mutex_unlock(&d->lock);
	for (unsigned i = 0; i < n; i++)
		pthread_join(d->pullers[i], NULL);
	pthread_mutex_lock(&d->lock);
	d->nr_pullers = 0;
	pthread_mutex_unlock(&d->lock);
}

/* ---------------- API ---------------- */

int postcopy_dst_new(struct vm *vm, const struct postcopy_dst_config *cfg,
		     struct postcopy_dst **ret, char *err, size_t errlen)
{
	struct postcopy_dst *d;
	int r;

	if (!vm || !cfg || !ret || !cfg->request == !cfg->fetch ||
	    cfg->pull_pages > POSTCOPY_MAX_PULL_PAGES) {
		set_err(err, errlen, "postcopy: bad arguments");
		return -EINVAL;
	}
	if (vm_config(vm)->hugepages) {
		set_err(err, errlen, "postcopy needs guest memory in 4 KiB pages, not hugepages");
		return -EOPNOTSUPP;
	}
	if (sysconf(_SC_PAGESIZE) != PAGE) {
		set_err(err, errlen, "postcopy needs 4 KiB host pages");
		return -EOPNOTSUPP;
	}
	d = calloc(1, sizeof(*d));
	if (!d) {
		set_err(err, errlen, "out of memory");
		return -ENOMEM;
	}
	d->vm = vm;
	d->cfg = *cfg;
	if (!d->cfg.pull_pages)
		d->cfg.pull_pages = POSTCOPY_PULL_PAGES;
	d->uffd = -1;
	d->stop_efd = -1;
	pthread_mutex_init(&d->lock, NULL);
	pthread_condattr_t ca;
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&d->cond, &ca);
	pthread_cond_init(&d->pull_cond, &ca);
	pthread_condattr_destroy(&ca);

	d->nr_slots = vm_nr_slots(vm);
	d->slots = calloc(d->nr_slots, sizeof(*d->slots));
	if (!d->slots) {
		set_err(err, errlen, "out of memory");
		r = -ENOMEM;
		goto err_free;
	}
	for (unsigned i = 0; i < d->nr_slots; i++) {
		const struct vm_slot *vs = vm_slot(vm, i);
		struct pc_slot *s = &d->slots[i];
		s->hva = vs->hva;
		s->size = vs->size;
		s->pages = vs->size / PAGE;
		s->memfd = vs->memfd;
		size_t words = (size_t)(s->pages + 63) / 64;
		s->need = calloc(words, sizeof(uint64_t));
		s->asked = calloc(words, sizeof(uint64_t));
		s->here = calloc(words, sizeof(uint64_t));
		if (!s->need || !s->asked || !s->here) {
			set_err(err, errlen, "out of memory");
			r = -ENOMEM;
			goto err_free;
		}
	}

	r = uffd_open(err, errlen);
	if (r < 0)
		goto err_free;
	d->uffd = r;

	struct uffdio_api api = {.api = UFFD_API, .features = 0};
	if (ioctl(d->uffd, UFFDIO_API, &api) < 0) {
		r = -errno;
		set_err(err, errlen, "UFFDIO_API: %s", strerror(errno));
		goto err_free;
	}
	if (!(api.features & UFFD_FEATURE_MISSING_SHMEM)) {
		set_err(err, errlen, "userfaultfd: this kernel cannot serve faults on memfds");
		r = -EOPNOTSUPP;
		goto err_free;
	}

	const uint64_t need_ioctls =
	    (1ull << _UFFDIO_COPY) | (1ull << _UFFDIO_ZEROPAGE) | (1ull << _UFFDIO_WAKE);
	for (unsigned i = 0; i < d->nr_slots; i++) {
		struct pc_slot *s = &d->slots[i];
		struct uffdio_register reg = {
		    .range = {.start = (uintptr_t)s->hva, .len = s->size},
		    .mode = UFFDIO_REGISTER_MODE_MISSING,
		};
		if (ioctl(d->uffd, UFFDIO_REGISTER, &reg) < 0) {
			r = -errno;
			set_err(err, errlen, "UFFDIO_REGISTER of slot %u: %s", i, strerror(errno));
			goto err_free;
		}
		s->registered = true;
		if ((reg.ioctls & need_ioctls) != need_ioctls) {
			set_err(err, errlen, "userfaultfd: slot %u cannot be filled by copy", i);
			r = -EOPNOTSUPP;
			goto err_free;
		}
	}

	d->stop_efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (d->stop_efd < 0) {
		r = -errno;
		set_err(err, errlen, "eventfd: %s", strerror(errno));
		goto err_free;
	}
	r = -pthread_create(&d->thread, NULL, fault_thread, d);
	if (r < 0) {
		set_err(err, errlen, "fault thread: %s", strerror(-r));
		goto err_free;
	}
	d->thread_started = true;
	*ret = d;
	return 0;

err_free:
	postcopy_dst_free(d);
	return r;
}

/* The first page at or after from whose bit is set (set) or clear (!set); npages if none. */
static uint64_t next_bit(const uint64_t *map, uint64_t from, uint64_t npages, bool set)
{
	while (from < npages) {
		uint64_t w = (set ? map[from / 64] : ~map[from / 64]) >> (from % 64);
		if (w) {
			from += (uint64_t)__builtin_ctzll(w);
			break;
		}
		from = (from / 64 + 1) * 64;
	}
	return from < npages ? from : npages;
}

int postcopy_dst_discard(struct postcopy_dst *d, uint32_t slot, const uint64_t *bitmap,
			 uint64_t npages)
{
	if (!d || slot >= d->nr_slots || (!bitmap && npages))
		return -EINVAL;
	struct pc_slot *s = &d->slots[slot];
	if (npages > s->pages)
		return -EINVAL;
	if (vm_state(d->vm) == VM_RUNNING)
		return -EBUSY;

	int r = 0;
	const uint64_t words = (npages + 63) / 64;
	pthread_mutex_lock(&d->lock);
	/* Needed first, then the holes: a fault in between asks instead of zero-filling. */
	for (uint64_t w = 0; w < words; w++) {
		uint64_t bits = bitmap[w];
		if (w == npages / 64) /* the last word may hold bits past npages */
			bits &= (1ull << (npages % 64)) - 1;
		if (!bits)
			continue;
		atomic_fetch_or_explicit(&s->need[w], bits, memory_order_acq_rel);
		atomic_fetch_and_explicit(&s->here[w], ~bits, memory_order_acq_rel);
		atomic_fetch_and_explicit(&s->asked[w], ~bits, memory_order_acq_rel);
	}
	for (uint64_t p = next_bit(bitmap, 0, npages, true); p < npages && r == 0;
	     p = next_bit(bitmap, p, npages, true)) {
		uint64_t q = next_bit(bitmap, p, npages, false);
		/*
		 * Only where the memfd holds data: a hole has no page, so nothing maps it (here
		 * or in KVM) and punching it again is work for nothing — and it is most of the
		 * run when the destination got no precopy round (1 GiB: milliseconds of the
		 * downtime). SEEK_DATA stops at the first page present, so it is cheap.
		 */
		off_t data = lseek(s->memfd, (off_t)(p * PAGE), SEEK_DATA);
		if (data < 0 && errno != ENXIO)
			data = (off_t)(p * PAGE); /* cannot tell: punch the whole run */
		data &= ~(off_t)(PAGE - 1); /* a page partly data is data */
		if (data >= 0 && (uint64_t)data < q * PAGE &&
		    fallocate(s->memfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, data,
			      (off_t)(q * PAGE) - data) < 0)
			/* Also unmaps the pages from every mapping, and so from KVM (MMU notifiers). */
			r = -errno;
		p = q;
	}
	pthread_mutex_unlock(&d->lock);
	return r;
}

int postcopy_dst_place(struct postcopy_dst *d, uint32_t slot, uint64_t first_page, uint32_t npages,
		       const void *data, const uint64_t *zero_mask)
{
	if (!d || slot >= d->nr_slots)
		return -EINVAL;
	struct pc_slot *s = &d->slots[slot];
	if (!npages || first_page > s->pages || npages > s->pages - first_page)
		return -EINVAL;
	if (atomic_load_explicit(&d->failed, memory_order_acquire))
		return -ECANCELED;

	uint32_t nr_data = 0;
	for (uint32_t i = 0; i < npages; i++)
		nr_data += !(zero_mask && ((zero_mask[i / 64] >> (i % 64)) & 1));
	if (nr_data && !data)
		return -EINVAL;
	/* UFFDIO_COPY wants a page-aligned source. */
	const uint8_t *src = data;
	uint8_t *bounce = NULL;
	if (nr_data && (uintptr_t)src % PAGE) {
		bounce = aligned_alloc(PAGE, (size_t)nr_data * PAGE);
		if (!bounce)
			return -ENOMEM;
		memcpy(bounce, src, (size_t)nr_data * PAGE);
		src = bounce;
	}

	uint64_t placed = 0, existing = 0;
	size_t at = 0;
	int r = 0;
	for (uint32_t i = 0; i < npages && r == 0;) {
		bool zero = zero_mask && ((zero_mask[i / 64] >> (i % 64)) & 1);
		uint32_t j = i + 1;
		while (j < npages && (zero_mask && ((zero_mask[j / 64] >> (j % 64)) & 1)) == zero)
			j++;
		size_t len = (size_t)(j - i) * PAGE;
		r = xport_uffd_place(d->uffd, s->hva + (first_page + i) * PAGE,
				     zero ? NULL : src + at, len, &placed, &existing);
		if (r == 0) {
			for (uint32_t k = i; k < j; k++)
				set_bit(s->here, first_page + k);
		}
		if (!zero)
			at += len;
		i = j;
	}
	free(bounce);
	atomic_fetch_add_explicit(&d->pages_placed, placed, memory_order_relaxed);
	atomic_fetch_add_explicit(&d->pages_existing, existing, memory_order_relaxed);

	pthread_mutex_lock(&d->lock);
	if (d->nr_pending)
		resolve_pending_locked(d, slot, first_page, npages, now_ns());
	pthread_mutex_unlock(&d->lock);
	return r;
}

int postcopy_dst_uffd(const struct postcopy_dst *d) { return d ? d->uffd : -EINVAL; }

uint64_t postcopy_dst_remaining(struct postcopy_dst *d)
{
	uint64_t missing = 0;
	unsigned char vec[64];

	if (!d)
		return 0;
	for (unsigned si = 0; si < d->nr_slots; si++) {
		struct pc_slot *s = &d->slots[si];
		for (uint64_t w = 0; w < (s->pages + 63) / 64; w++) {
			uint64_t open = atomic_load_explicit(&s->need[w], memory_order_acquire) &
					~atomic_load_explicit(&s->here[w], memory_order_acquire);
			if (!open)
				continue;
			/* Arrived through the transport? One mincore for the word's 64 pages. */
			uint64_t first = w * 64;
			uint64_t n = s->pages - first < 64 ? s->pages - first : 64;
			if (mincore(s->hva + first * PAGE, n * PAGE, vec) < 0) {
				missing += (uint64_t)__builtin_popcountll(open);
				continue;
			}
			for (unsigned b = 0; b < n; b++) {
				if (!((open >> b) & 1))
					continue;
				if (vec[b] & 1)
					set_bit(s->here, first + b);
				else
					missing++;
			}
		}
	}
	return missing;
}

bool postcopy_dst_complete(struct postcopy_dst *d) { return postcopy_dst_remaining(d) == 0; }

static void *pause_thread(void *arg)
{
	struct postcopy_dst *d = arg;
	int r = vm_pause(d->vm);

	pthread_mutex_lock(&d->lock);
	d->pause_r = r;
	d->pause_done = true;
	pthread_cond_broadcast(&d->cond);
	pthread_mutex_unlock(&d->lock);
	return NULL;
}

/* Waits (d->lock held) until the pause is done or, with ms >= 0, ms passed. */
static bool wait_pause_locked(struct postcopy_dst *d, int ms)
{
	struct timespec dl;

	clock_gettime(CLOCK_MONOTONIC, &dl);
	dl.tv_sec += ms / 1000;
	dl.tv_nsec += (long)(ms % 1000) * 1000000;
	if (dl.tv_nsec >= 1000000000) {
		dl.tv_sec++;
		dl.tv_nsec -= 1000000000;
	}
	while (!d->pause_done) {
		if (ms < 0)
			pthread_cond_wait(&d->cond, &d->lock);
		else if (pthread_cond_timedwait(&d->cond, &d->lock, &dl) == ETIMEDOUT)
			break;
	}
	return d->pause_done;
}

/*
 * The pause runs on a helper thread so this one can watch it: KVM interrupts a vCPU
 * waiting for a missing page on the kick's signal where it resolves guest memory through
 * its (interruptible) page-fault path, but not everywhere — in instruction emulation
 * (nested hosts with shadow paging, kvm_pvm here) the vCPU retries the fault in the kernel
 * forever and never returns from KVM_RUN. If the pause does not finish within
 * RELEASE_AFTER_MS, the pages vCPUs are stuck on are filled with zeros (the waits we know of
 * now, and every fault until the pause is done) so they can return and park.
 */
int postcopy_dst_fail(struct postcopy_dst *d, const char *why)
{
	pthread_t t;
	int r;

	if (!d)
		return -EINVAL;
	pthread_mutex_lock(&d->lock);
	if (!atomic_load_explicit(&d->failed, memory_order_relaxed)) {
		snprintf(d->why, sizeof(d->why), "%s", why && why[0] ? why : "postcopy failed");
		atomic_store_explicit(&d->failed, true, memory_order_release);
	}
	d->pause_done = false;
	pthread_mutex_unlock(&d->lock);

	r = -pthread_create(&t, NULL, pause_thread, d);
	if (r < 0)
		return r;
	pthread_mutex_lock(&d->lock);
	if (!wait_pause_locked(d, RELEASE_AFTER_MS)) {
		atomic_store_explicit(&d->release, true, memory_order_release);
		for (unsigned i = 0; i < POSTCOPY_MAX_PENDING; i++) {
			struct pc_pending *p = &d->pending[i];
			if (p->used)
				release_page(d, d->slots[p->slot].hva + p->page * PAGE);
		}
		wait_pause_locked(d, -1);
		atomic_store_explicit(&d->release, false, memory_order_release);
	}
	r = d->pause_r;
	pthread_mutex_unlock(&d->lock);
	pthread_join(t, NULL);
	return r;
}

const char *postcopy_dst_failure(const struct postcopy_dst *d)
{
	if (!d || !atomic_load_explicit(&d->failed, memory_order_acquire))
		return "";
	return d->why;
}

void postcopy_dst_stats(struct postcopy_dst *d, struct postcopy_dst_stats *ret)
{
	uint64_t needed = 0;

	for (unsigned si = 0; si < d->nr_slots; si++) {
		struct pc_slot *s = &d->slots[si];
		for (uint64_t w = 0; w < (s->pages + 63) / 64; w++)
			needed += (uint64_t)__builtin_popcountll(
			    atomic_load_explicit(&s->need[w], memory_order_relaxed));
	}
	*ret = (struct postcopy_dst_stats){
	    .faults = atomic_load(&d->faults),
	    .fault_pages = atomic_load(&d->fault_pages),
	    .zero_fills = atomic_load(&d->zero_fills),
	    .requests = atomic_load(&d->requests),
	    .pages_requested = atomic_load(&d->pages_requested),
	    .request_errors = atomic_load(&d->request_errors),
	    .pages_placed = atomic_load(&d->pages_placed),
	    .pages_existing = atomic_load(&d->pages_existing),
	    .pages_needed = needed,
	    .pages_missing = postcopy_dst_remaining(d),
	    .faults_resolved = atomic_load(&d->faults_resolved),
	    .fault_wait_sum_ns = atomic_load(&d->wait_sum_ns),
	    .fault_wait_max_ns = atomic_load(&d->wait_max_ns),
	    .faults_after_fail = atomic_load(&d->faults_after_fail),
	    .pages_released = atomic_load(&d->pages_released),
	    .pulls = atomic_load(&d->pulls),
	    .pages_pulled = atomic_load(&d->pages_pulled),
	};
}

void postcopy_dst_free(struct postcopy_dst *d)
{
	if (!d)
		return;
	if (d->thread_started && !atomic_load(&d->failed)) {
		uint64_t missing = postcopy_dst_remaining(d);
		if (missing) {
			char why[128];
			snprintf(why, sizeof(why), "postcopy ended with %llu pages missing",
				 (unsigned long long)missing);
			postcopy_dst_fail(d, why);
		}
	}
	/* No fetch may place pages once the mappings are unregistered below. */
	postcopy_dst_pull_stop(d);
	if (d->thread_started) {
		uint64_t one = 1;
		if (write(d->stop_efd, &one, sizeof(one)) < 0) {
			/* An eventfd write of 1 cannot fail short of a counter overflow. */
		}
		pthread_join(d->thread, NULL);
	}
	for (unsigned i = 0; d->slots && i < d->nr_slots; i++) {
		struct pc_slot *s = &d->slots[i];
		if (s->registered) {
			struct uffdio_range r = {.start = (uintptr_t)s->hva, .len = s->size};
			(void)ioctl(d->uffd, UFFDIO_UNREGISTER, &r);
		}
		free(s->need);
		free(s->asked);
		free(s->here);
	}
	free(d->slots);
	if (d->stop_efd >= 0)
		close(d->stop_efd);
	if (d->uffd >= 0)
		close(d->uffd);
	pthread_cond_destroy(&d->pull_cond);
	pthread_cond_destroy(&d->cond);
	pthread_mutex_destroy(&d->lock);
	free(d);
}
