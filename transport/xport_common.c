// SPDX-License-Identifier: Apache-2.0
/*
 * What the TCP and RDMA backends share (xport_internal.h): the bandwidth bucket all streams
 * (queue pairs) of a source draw from, the dealing of a batch's page runs onto the streams
 * stripe by stripe, and the placement of pages through userfaultfd (transport.h), which the
 * TCP receivers and the agent's postcopy fault service both use.
 */
#include <errno.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <time.h>

#include "transport/xport_internal.h"

#define PAGE 4096u
#define BUCKET_BURST_DIV 50              /* a burst is 1/50 s of the rate ... */
#define BUCKET_MIN_BURST (256u << 10)    /* ... but at least 256 KiB */
#define PLACE_SPINS 1000u                /* EAGAIN without progress before giving up */

static int64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* ---------------- bandwidth bucket ---------------- */

void xport_bucket_init(struct xport_bucket *b)
{
	pthread_mutex_init(&b->lock, NULL);
	b->rate = 0;
	b->tokens = 0;
	b->last_ns = now_ns();
}

void xport_bucket_destroy(struct xport_bucket *b)
{
	pthread_mutex_destroy(&b->lock);
}

void xport_bucket_set(struct xport_bucket *b, uint64_t bytes_per_sec)
{
	pthread_mutex_lock(&b->lock);
	if (b->rate != bytes_per_sec) {
		/* A new cap starts with a full burst's credit, as the first one did. */
		b->rate = bytes_per_sec;
		b->tokens = (double)bytes_per_sec / BUCKET_BURST_DIV;
		if (b->tokens < BUCKET_MIN_BURST)
			b->tokens = BUCKET_MIN_BURST;
		b->last_ns = now_ns();
	}
	pthread_mutex_unlock(&b->lock);
}

int xport_bucket_take(struct xport_bucket *b, uint64_t bytes, int stop_fd)
{
	int64_t wait_ns = 0;

	pthread_mutex_lock(&b->lock);
	if (b->rate) {
		int64_t now = now_ns();
		double burst = (double)b->rate / BUCKET_BURST_DIV;

		if (burst < BUCKET_MIN_BURST)
			burst = BUCKET_MIN_BURST;
		b->tokens += (double)(now - b->last_ns) * (double)b->rate / 1e9;
		if (b->tokens > burst)
			b->tokens = burst;
		b->last_ns = now;
		/* Debt, not refusal: concurrent streams queue up behind each other's debt. */
		b->tokens -= (double)bytes;
		if (b->tokens < 0)
			wait_ns = (int64_t)(-b->tokens * 1e9 / (double)b->rate);
	}
	pthread_mutex_unlock(&b->lock);

	if (wait_ns <= 0)
		return 0;
	struct pollfd pfd = { .fd = stop_fd, .events = POLLIN };
	struct timespec ts = { .tv_sec = wait_ns / 1000000000, .tv_nsec = wait_ns % 1000000000 };
	if (ppoll(&pfd, 1, &ts, NULL) > 0)
		return -ECANCELED;
	return 0; /* slept (an EINTR only shortens one sleep; the debt carries over) */
}

/* ---------------- dealing runs onto streams ---------------- */

static uint64_t mix64(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ull;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

/*
 * Which lane carries stripe `stripe` of `region`: every group of nr consecutive stripes is
 * dealt over all nr lanes, in an order that a hash of (region, group) rotates, so lanes get
 * equal shares of any long run and a page is always on the same lane.
 */
static unsigned stripe_lane(unsigned nr, uint32_t region, uint64_t stripe)
{
	uint64_t n = nr, group = stripe / n;

	if (n == 1)
		return 0;
	return (unsigned)((stripe % n + mix64(((uint64_t)region << 48) ^ group)) % n);
}

static int runs_reserve(struct xport_runs *l, unsigned want)
{
	if (want <= l->cap)
		return 0;
	unsigned cap = l->cap ? l->cap : 64;
	while (cap < want)
		cap *= 2;
	struct page_run *n = realloc(l->v, (size_t)cap * sizeof(*n));
	if (!n)
		return -ENOMEM;
	l->v = n;
	l->cap = cap;
	return 0;
}

static int runs_append(struct xport_runs *l, uint32_t region, uint64_t first, uint32_t npages)
{
	if (l->n) {
		struct page_run *last = &l->v[l->n - 1];
		/* Neighbouring stripes dealt to the same lane: one run, fewer reads. */
		if (last->region == region && last->first_page + last->npages == first &&
		    (uint64_t)last->npages + npages <= UINT32_MAX) {
			last->npages += npages;
			return 0;
		}
	}
	int r = runs_reserve(l, l->n + 1);
	if (r < 0)
		return r;
	l->v[l->n++] = (struct page_run){ .region = region, .first_page = first,
					 .npages = npages };
	return 0;
}

void xport_runs_free(struct xport_runs *l)
{
	free(l->v);
	l->v = NULL;
	l->n = l->cap = 0;
}

int xport_deal_runs(const struct page_run *runs, unsigned n, uint64_t stripe_pages,
		    struct xport_runs *const *lanes, unsigned nr_lanes)
{
	for (unsigned i = 0; i < nr_lanes; i++)
		lanes[i]->n = 0;
	for (unsigned i = 0; i < n; i++) {
		uint64_t p = runs[i].first_page, end = p + runs[i].npages;
		while (p < end) {
			uint64_t stripe = p / stripe_pages;
			uint64_t e = (stripe + 1) * stripe_pages;
			if (e > end)
				e = end;
			int r = runs_append(lanes[stripe_lane(nr_lanes, runs[i].region, stripe)],
					    runs[i].region, p, (uint32_t)(e - p));
			if (r < 0)
				return r;
			p = e;
		}
	}
	return 0;
}

/* ---------------- userfaultfd placement ---------------- */

int xport_uffd_place(int uffd, void *dst, const void *src, uint64_t len, uint64_t *ret_placed,
		     uint64_t *ret_existing)
{
	uint8_t *d = dst;
	const uint8_t *s = src;
	uint64_t done = 0, placed = 0, existing = 0;
	unsigned spins = 0;
	int r = 0;

	while (done < len) {
		int64_t res;
		int ir;

		if (s) {
			struct uffdio_copy c = { .dst = (uintptr_t)(d + done),
						 .src = (uintptr_t)(s + done),
						 .len = len - done };
			ir = ioctl(uffd, UFFDIO_COPY, &c);
			res = c.copy;
		} else {
			struct uffdio_zeropage z = { .range = { .start = (uintptr_t)(d + done),
								.len = len - done } };
			ir = ioctl(uffd, UFFDIO_ZEROPAGE, &z);
			res = z.zeropage;
		}
		if (ir == 0) {
			placed += (len - done) / PAGE;
			break;
		}
		int e = errno;
		if (res > 0) { /* part of it placed; the rest is retried (it may be EEXIST) */
			placed += (uint64_t)res / PAGE;
			done += (uint64_t)res;
			spins = 0;
			continue;
		}
		if (e == EEXIST) { /* the first page of the rest is there already */
			existing++;
			done += PAGE;
			spins = 0;
			continue;
		}
		/* EAGAIN without progress: the address space is changing under us; bounded. */
		if ((e == EAGAIN || e == EINTR) && ++spins < PLACE_SPINS)
			continue;
		r = -e;
		break;
	}
	if (ret_placed)
		*ret_placed += placed;
	if (ret_existing)
		*ret_existing += existing;
	return r;
}
