// SPDX-License-Identifier: Apache-2.0
/*
 * io_uring page reader (see pagereader.h). One ring per reader with the region memfds as
 * fixed files and one registered buffer per chunk slot. pagereader_read_async() is a loop
 * of "fill the ring from the run cursor while buffers and depth allow; submit and wait for
 * one completion; reap everything ready". A buffer is in exactly one of three states —
 * free (on the free stack), in flight (a READ_FIXED owns it), held (the consumer owns it) —
 * and `inflight` counts SQEs whose CQE has not been reaped, so "nothing left in flight"
 * is the loop's exit condition rather than a hope.
 */
#include "transport/pagereader.h"

#include <errno.h>
#include <liburing.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>

enum buf_state { BUF_FREE, BUF_INFLIGHT, BUF_HELD };

/* What the read into one buffer is after; bytes `done` of the chunk have landed. */
struct buf_slot {
	enum buf_state state;
	uint32_t region;
	uint64_t first_page;
	uint32_t npages;
	uint32_t done;
};

struct pagereader {
	struct io_uring ring;
	bool ring_ready; /* queue_init succeeded: queue_exit owed (it also unregisters all) */

	unsigned queue_depth;
	unsigned batch_pages;
	unsigned nr_buffers;
	unsigned copy_threads; /* > 0: every read IOSQE_ASYNC, worker pool capped at this */
	size_t buf_len; /* batch_pages * 4096 */

	unsigned nr_regions;
	uint64_t *region_pages;

	uint8_t *area; /* nr_buffers * buf_len, registered buffer b at b * buf_len */
	size_t area_len;

	struct buf_slot *slots;
	struct page_chunk *chunks; /* per buffer, so a kept chunk outlives its consume call */
	unsigned *free_stack;      /* LIFO: the most recently used buffer is the cache-warm one */
	unsigned nr_free;

	unsigned inflight; /* SQEs prepared whose CQE has not been reaped */
	bool in_read;      /* a read call is running: consume must not start another */
	int broken;        /* the ring failed with SQEs possibly in it: sticky error */

	struct pagereader_stats stats;
};

/* may_alias: callers may hand us a uint8_t array; the OR reads it as 64-bit words. */
typedef uint64_t __attribute__((may_alias)) alias_u64;

bool pagereader_page_is_zero(const void *page)
{
	const alias_u64 *w = page;

	/*
	 * One cache line per step: the eight ORs vectorise and the branch is taken once per
	 * line, and a page with data almost always shows it in its first line, so the scan of
	 * a non-zero page costs one load of data that the read just left in cache.
	 */
	for (unsigned i = 0; i < PAGEREADER_PAGE_SIZE / 8; i += 8) {
		if (w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7])
			return false;
	}
	return true;
}

/* First index >= from in [from, npages) whose bit equals `want`, or npages. */
static uint32_t find_bit(const uint64_t *bits, uint32_t from, uint32_t npages, bool want)
{
	if (from >= npages)
		return npages;
	uint32_t w = from / 64;
	uint64_t word = (want ? bits[w] : ~bits[w]) & (~0ull << (from % 64));
	while (!word) {
		w++;
		if ((uint64_t)w * 64 >= npages)
			return npages;
		word = want ? bits[w] : ~bits[w];
	}
	uint32_t i = w * 64 + (uint32_t)__builtin_ctzll(word);
	return i < npages ? i : npages;
}

unsigned pagereader_runs_from_bitmap(uint32_t region, uint64_t first_page, const uint64_t *bits,
				     uint32_t npages, unsigned max_run, struct page_run *out,
				     unsigned out_cap)
{
	unsigned n = 0;

	if (!max_run)
		max_run = UINT32_MAX;
	for (uint32_t start = find_bit(bits, 0, npages, true); start < npages;
	     start = find_bit(bits, start, npages, true)) {
		uint32_t end = find_bit(bits, start, npages, false);
		while (start < end) {
			uint32_t len = end - start < max_run ? end - start : max_run;
			if (n < out_cap)
				out[n] = (struct page_run){ .region = region,
							    .first_page = first_page + start,
							    .npages = len };
			n++;
			start += len;
		}
	}
	return n;
}

/* ---------------- the pool of ready buffer areas ---------------- */

/*
 * Buffer areas are faulted in when made (MAP_POPULATE) and pinned at registration; on a
 * host where fresh memory is slow to touch that is most of a migration's set-up. Areas
 * handed back by pagereader_free are kept (up to the bytes pagereader_pool_fill asked for)
 * and the next reader with the same area size takes one: already faulted in, its pinning
 * is cheap. Only the size must match; the contents are whatever the last reader read.
 */
#define POOL_MAX 64u
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static struct {
	void *p;
	size_t len;
} pool[POOL_MAX];
static unsigned pool_n;
static size_t pool_bytes, pool_keep; /* idle bytes held; the most worth holding */

static void *area_new(size_t len)
{
	void *a = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE,
		       -1, 0);
	if (a == MAP_FAILED)
		return NULL;
	/* A forked helper has no use for pinned I/O buffers; don't make fork copy them. */
	(void)madvise(a, len, MADV_DONTFORK);
	return a;
}

static void *area_get(size_t len)
{
	void *a = NULL;
	pthread_mutex_lock(&pool_lock);
	for (unsigned i = 0; i < pool_n; i++) {
		if (pool[i].len == len) {
			a = pool[i].p;
			pool[i] = pool[--pool_n];
			pool_bytes -= len;
			break;
		}
	}
	pthread_mutex_unlock(&pool_lock);
	return a ? a : area_new(len);
}

static void area_put(void *a, size_t len)
{
	pthread_mutex_lock(&pool_lock);
	bool keep = pool_n < POOL_MAX && pool_bytes + len <= pool_keep;
	if (keep) {
		pool[pool_n].p = a;
		pool[pool_n++].len = len;
		pool_bytes += len;
	}
	pthread_mutex_unlock(&pool_lock);
	if (!keep)
		munmap(a, len);
}

static int check_config(const struct pagereader_config *cfg, struct pagereader *r);

int pagereader_pool_fill(const struct pagereader_config *cfg, unsigned n)
{
	struct pagereader probe = {0};
	int err = check_config(cfg, &probe);
	if (err < 0)
		return err;
	if (n > POOL_MAX)
		return -EINVAL;
	pthread_mutex_lock(&pool_lock);
	size_t want = probe.area_len * n;
	if (want > pool_keep)
		pool_keep = want;
	unsigned have = 0;
	for (unsigned i = 0; i < pool_n; i++)
		have += pool[i].len == probe.area_len;
	pthread_mutex_unlock(&pool_lock);
	unsigned made = have;
	for (; made < n; made++) {
		void *a = area_new(probe.area_len);
		if (!a)
			return made ? (int)made : -ENOMEM;
		area_put(a, probe.area_len);
	}
	return (int)made;
}

void pagereader_pool_drain(void)
{
	pthread_mutex_lock(&pool_lock);
	for (unsigned i = 0; i < pool_n; i++)
		munmap(pool[i].p, pool[i].len);
	pool_n = 0;
	pool_bytes = 0;
	pool_keep = 0;
	pthread_mutex_unlock(&pool_lock);
}

size_t pagereader_pool_bytes(void)
{
	pthread_mutex_lock(&pool_lock);
	size_t b = pool_bytes;
	pthread_mutex_unlock(&pool_lock);
	return b;
}

void pagereader_free(struct pagereader *r)
{
	if (!r)
		return;
	/*
	 * Closing the ring cancels whatever a broken reader left in it; the kernel keeps the
	 * buffer pages pinned until those requests are gone, so unmapping after is safe.
	 */
	if (r->ring_ready)
		io_uring_queue_exit(&r->ring);
	/*
	 * Reads still in flight when the ring closes may land after io_uring_queue_exit
	 * returns (teardown is asynchronous): such an area is never handed to another reader.
	 */
	if (r->area && r->inflight == 0)
		area_put(r->area, r->area_len);
	else if (r->area)
		munmap(r->area, r->area_len);
	free(r->free_stack);
	free(r->chunks);
	free(r->slots);
	free(r->region_pages);
	free(r);
}

static int check_config(const struct pagereader_config *cfg, struct pagereader *r)
{
	struct pagereader_config c = cfg ? *cfg : (struct pagereader_config){ 0 };

	if (!c.queue_depth)
		c.queue_depth = PAGEREADER_DEFAULT_QUEUE_DEPTH;
	if (!c.batch_pages)
		c.batch_pages = PAGEREADER_DEFAULT_BATCH_PAGES;
	if (!c.nr_buffers)
		c.nr_buffers = c.queue_depth * 2 < PAGEREADER_MAX_BUFFERS ? c.queue_depth * 2
									   : PAGEREADER_MAX_BUFFERS;
	if (c.queue_depth > PAGEREADER_MAX_QUEUE_DEPTH || c.batch_pages > PAGEREADER_MAX_BATCH_PAGES ||
	    c.nr_buffers < c.queue_depth || c.nr_buffers > PAGEREADER_MAX_BUFFERS ||
	    c.copy_threads > PAGEREADER_MAX_COPY_THREADS)
		return -EINVAL;
	r->queue_depth = c.queue_depth;
	r->copy_threads = c.copy_threads;
	r->batch_pages = c.batch_pages;
	r->nr_buffers = c.nr_buffers;
	r->buf_len = (size_t)c.batch_pages * PAGEREADER_PAGE_SIZE;
	if (__builtin_mul_overflow(r->buf_len, (size_t)c.nr_buffers, &r->area_len))
		return -ENOMEM;
	return 0;
}

static int check_regions(const int *fds, const uint64_t *sizes, unsigned n)
{
	if (!n || !fds || !sizes)
		return -EINVAL;
	for (unsigned i = 0; i < n; i++) {
		struct stat st;

		if (fds[i] < 0 || sizes[i] % PAGEREADER_PAGE_SIZE)
			return -EINVAL;
		if (fstat(fds[i], &st) < 0)
			return -errno;
		/* Catch a wrong fd or size now rather than as -EIO mid-migration. */
		if (S_ISREG(st.st_mode) && (uint64_t)st.st_size < sizes[i])
			return -EINVAL;
	}
	return 0;
}

static int ring_init(struct pagereader *r)
{
	/*
	 * SUBMIT_ALL: a bad SQE gets its own CQE instead of stopping the batch, which keeps
	 * "every prepared SQE yields one CQE" true. COOP_TASKRUN: completions are run when we
	 * enter the ring to wait anyway, so nothing needs to interrupt the thread for them.
	 * All three are hints; older kernels get a plain ring.
	 */
	static const unsigned flag_sets[] = {
		IORING_SETUP_SUBMIT_ALL | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG,
		IORING_SETUP_SUBMIT_ALL,
		0,
	};
	int ret = -EINVAL;

	for (size_t i = 0; i < sizeof(flag_sets) / sizeof(flag_sets[0]); i++) {
		/* CQ = 2 * SQ (the default) >= queue_depth, so the CQ can never overflow. */
		ret = io_uring_queue_init(r->queue_depth, &r->ring, flag_sets[i]);
		if (ret != -EINVAL)
			break;
	}
	if (ret < 0)
		return ret;
	r->ring_ready = true;
	return 0;
}

int pagereader_new(const struct pagereader_config *cfg, const int *region_fds,
		   const uint64_t *region_sizes, unsigned nr_regions, struct pagereader **ret)
{
	struct iovec *iov = NULL;
	int err;

	if (!ret)
		return -EINVAL;
	err = check_regions(region_fds, region_sizes, nr_regions);
	if (err < 0)
		return err;

	struct pagereader *r = calloc(1, sizeof(*r));
	if (!r)
		return -ENOMEM;
	err = check_config(cfg, r);
	if (err < 0)
		goto err_free;

	r->nr_regions = nr_regions;
	r->region_pages = calloc(nr_regions, sizeof(*r->region_pages));
	r->slots = calloc(r->nr_buffers, sizeof(*r->slots));
	r->chunks = calloc(r->nr_buffers, sizeof(*r->chunks));
	r->free_stack = calloc(r->nr_buffers, sizeof(*r->free_stack));
	iov = calloc(r->nr_buffers, sizeof(*iov));
	if (!r->region_pages || !r->slots || !r->chunks || !r->free_stack || !iov) {
		err = -ENOMEM;
		goto err_free;
	}
	for (unsigned i = 0; i < nr_regions; i++)
		r->region_pages[i] = region_sizes[i] / PAGEREADER_PAGE_SIZE;

	/*
	 * One anonymous mapping for all buffers: page aligned as READ_FIXED wants, one RDMA
	 * memory region can cover it, and the kernel pins it once at registration. From the
	 * pool when one of this size is ready.
	 */
	r->area = area_get(r->area_len);
	if (!r->area) {
		err = -ENOMEM;
		goto err_free;
	}

	err = ring_init(r);
	if (err < 0)
		goto err_free;
	if (r->copy_threads) {
		/*
		 * Bounded workers (regular-file reads are bounded work) capped; the unbounded
		 * class is left alone (0 = unchanged). The ring remembers the cap and applies it
		 * to whichever thread submits.
		 */
		unsigned limits[2] = { r->copy_threads, 0 };
		err = io_uring_register_iowq_max_workers(&r->ring, limits);
		if (err < 0)
			goto err_free;
	}
	err = io_uring_register_files(&r->ring, region_fds, nr_regions);
	if (err < 0)
		goto err_free;
	for (unsigned b = 0; b < r->nr_buffers; b++) {
		iov[b].iov_base = r->area + (size_t)b * r->buf_len;
		iov[b].iov_len = r->buf_len;
	}
	err = io_uring_register_buffers(&r->ring, iov, r->nr_buffers);
	if (err < 0)
		goto err_free;
	free(iov);

	/* Stack so that buffer 0 is popped first: low buffers stay warm under light load. */
	for (unsigned b = 0; b < r->nr_buffers; b++)
		r->free_stack[b] = r->nr_buffers - 1 - b;
	r->nr_free = r->nr_buffers;
	*ret = r;
	return 0;

err_free:
	/* queue_exit in pagereader_free drops the file and buffer registrations with the ring. */
	free(iov);
	pagereader_free(r);
	return err;
}

void pagereader_get_config(const struct pagereader *r, struct pagereader_config *ret)
{
	*ret = (struct pagereader_config){ .queue_depth = r->queue_depth,
					   .batch_pages = r->batch_pages,
					   .nr_buffers = r->nr_buffers,
					   .copy_threads = r->copy_threads };
}

void pagereader_get_stats(const struct pagereader *r, struct pagereader_stats *ret)
{
	*ret = r->stats;
	ret->inflight = r->inflight;
	ret->held = r->nr_buffers - r->nr_free - r->inflight;
}

void *pagereader_buffer_area(const struct pagereader *r, size_t *ret_len)
{
	if (ret_len)
		*ret_len = r->area_len;
	return r->area;
}

static void buf_put(struct pagereader *r, unsigned b)
{
	r->slots[b].state = BUF_FREE;
	r->free_stack[r->nr_free++] = b;
}

int pagereader_release(struct pagereader *r, unsigned buffer)
{
	if (!r || buffer >= r->nr_buffers || r->slots[buffer].state != BUF_HELD)
		return -EINVAL;
	buf_put(r, buffer);
	return 0;
}

/* Is this io_uring_enter() failure one to retry rather than a dead ring? */
static bool enter_transient(int err)
{
	/* -EAGAIN/-EBUSY: out of request memory or CQ backlog, both drain; -EINTR: a signal. */
	return err == -EAGAIN || err == -EBUSY || err == -EINTR || err == -ETIME;
}

/* Queues the rest of buffer b's read: bytes done.. of its chunk. */
static int queue_read(struct pagereader *r, unsigned b)
{
	struct buf_slot *s = &r->slots[b];
	struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);

	if (!sqe) {
		/*
		 * Can't happen while inflight <= queue_depth <= SQ size, but if the SQ is full
		 * of unsubmitted entries, pushing them to the kernel makes room.
		 */
		int ret = io_uring_submit(&r->ring);
		if (ret < 0 && !enter_transient(ret))
			return ret;
		sqe = io_uring_get_sqe(&r->ring);
		if (!sqe)
			return -EBUSY;
	}
	uint64_t off = (s->first_page << PAGEREADER_PAGE_SHIFT) + s->done;
	unsigned len = s->npages * PAGEREADER_PAGE_SIZE - s->done;

	io_uring_prep_read_fixed(sqe, (int)s->region, r->area + (size_t)b * r->buf_len + s->done,
				 len, off, (int)b);
	sqe->flags |= IOSQE_FIXED_FILE; /* fd field is the registered file index = region */
	if (r->copy_threads)
		sqe->flags |= IOSQE_ASYNC; /* only forced-async work may run on parallel workers */
	io_uring_sqe_set_data64(sqe, b);
	s->state = BUF_INFLIGHT;
	r->inflight++;
	r->stats.reads++;
	return 0;
}

static void fill_chunk(struct pagereader *r, unsigned b)
{
	const struct buf_slot *s = &r->slots[b];
	struct page_chunk *c = &r->chunks[b];
	unsigned nz = 0;

	c->region = s->region;
	c->first_page = s->first_page;
	c->npages = s->npages;
	c->buffer = b;
	c->data = r->area + (size_t)b * r->buf_len;
	memset(c->zero_mask, 0, sizeof(c->zero_mask));
	for (uint32_t i = 0; i < s->npages; i++) {
		if (pagereader_page_is_zero(c->data + (size_t)i * PAGEREADER_PAGE_SIZE)) {
			c->zero_mask[i / 64] |= 1ull << (i % 64);
			nz++;
		}
	}
	c->nr_zero = nz;
	r->stats.chunks++;
	r->stats.pages += s->npages;
	r->stats.zero_pages += nz;
}

static int check_runs(const struct pagereader *r, const struct page_run *runs, unsigned n)
{
	if (n && !runs)
		return -EINVAL;
	for (unsigned i = 0; i < n; i++) {
		const struct page_run *run = &runs[i];

		if (run->region >= r->nr_regions || !run->npages)
			return -EINVAL;
		uint64_t pages = r->region_pages[run->region];
		/* Written so that a huge first_page cannot wrap. */
		if (run->first_page > pages || run->npages > pages - run->first_page)
			return -EINVAL;
	}
	return 0;
}

/*
 * Handles one completion of buffer b: resubmits what is missing, or hands the full chunk
 * to consume. A failure lands in *err, after which the caller issues nothing new and
 * later completions only give their buffers back.
 */
static void reap_one(struct pagereader *r, unsigned b, int res, const struct pagereader_sink *sink,
		     bool async, int *err)
{
	struct buf_slot *s = &r->slots[b];
	uint32_t want = s->npages * PAGEREADER_PAGE_SIZE - s->done;
	int ret;

	if (*err) {
		buf_put(r, b);
		return;
	}
	if (res == -EAGAIN || res == -EINTR) {
		r->stats.retries++;
		ret = queue_read(r, b);
		if (ret < 0) {
			*err = ret;
			buf_put(r, b);
		}
		return;
	}
	if (res < 0 || res == 0 || (uint32_t)res > want) {
		/* res == 0 is end of file inside the region: the memfd shrank under us. */
		*err = res < 0 ? res : -EIO;
		buf_put(r, b);
		return;
	}
	s->done += (uint32_t)res;
	if ((uint32_t)res < want) {
		r->stats.short_reads++;
		ret = queue_read(r, b);
		if (ret < 0) {
			*err = ret;
			buf_put(r, b);
		}
		return;
	}

	fill_chunk(r, b);
	s->state = BUF_HELD; /* while consume runs, and after if it keeps the buffer */
	ret = sink->consume(sink->arg, &r->chunks[b]);
	if (ret < 0)
		*err = ret;
	/* consume may already have released its own buffer; don't stack it twice. */
	if (s->state == BUF_HELD && (ret < 0 || !async || ret != PAGEREADER_KEEP))
		buf_put(r, b);
}

static int read_runs(struct pagereader *r, const struct page_run *runs, unsigned n,
		     const struct pagereader_sink *sink, bool async)
{
	unsigned ri = 0;     /* next run to queue */
	uint32_t rdone = 0;  /* pages of runs[ri] already queued */
	int err;

	if (!r || !sink || !sink->consume)
		return -EINVAL;
	if (r->broken)
		return r->broken;
	if (r->in_read)
		return -EBUSY;
	err = check_runs(r, runs, n);
	if (err < 0)
		return err;

	r->in_read = true;
	for (;;) {
		while (!err && ri < n && r->inflight < r->queue_depth && r->nr_free) {
			unsigned b = r->free_stack[--r->nr_free];
			struct buf_slot *s = &r->slots[b];
			uint32_t left = runs[ri].npages - rdone;

			s->region = runs[ri].region;
			s->first_page = runs[ri].first_page + rdone;
			s->npages = left < r->batch_pages ? left : r->batch_pages;
			s->done = 0;
			rdone += s->npages;
			if (rdone == runs[ri].npages) {
				ri++;
				rdone = 0;
			}
			int ret = queue_read(r, b);
			if (ret < 0) {
				err = ret;
				buf_put(r, b);
			}
		}

		if (!r->inflight) {
			if (err || ri == n)
				break;
			/* Depth is free, so every buffer is held by the consumer. */
			int ret = sink->reclaim ? sink->reclaim(sink->arg) : -ENOBUFS;
			if (ret < 0)
				err = ret;
			else if (!r->nr_free)
				err = -ENOBUFS; /* reclaim broke its promise; don't spin */
			continue;
		}

		int ret = io_uring_submit_and_wait(&r->ring, 1);
		if (ret < 0 && !enter_transient(ret)) {
			/*
			 * The ring itself fails: SQEs may sit in it unsubmitted and we can no longer
			 * wait for them, so no later call may trust the buffers. Only free is left.
			 */
			r->broken = ret;
			r->in_read = false;
			return ret;
		}

		struct io_uring_cqe *cqe;
		while (r->inflight && io_uring_peek_cqe(&r->ring, &cqe) == 0) {
			uint64_t b = io_uring_cqe_get_data64(cqe);
			int res = cqe->res;

			/* Seen before consume runs: consume may be slow, the CQ slot need not wait. */
			io_uring_cqe_seen(&r->ring, cqe);
			r->inflight--;
			if (b >= r->nr_buffers || r->slots[b].state != BUF_INFLIGHT) {
				/* Not ours: only a corrupted ring could say this. */
				r->broken = -EIO;
				r->in_read = false;
				return -EIO;
			}
			reap_one(r, (unsigned)b, res, sink, async, &err);
		}
	}
	r->in_read = false;
	return err;
}

int pagereader_read_async(struct pagereader *r, const struct page_run *runs, unsigned n,
			  const struct pagereader_sink *sink)
{
	return read_runs(r, runs, n, sink, true);
}

int pagereader_read(struct pagereader *r, const struct page_run *runs, unsigned n,
		    pagereader_consume_fn consume, void *arg)
{
	const struct pagereader_sink sink = { .consume = consume, .arg = arg };

	return read_runs(r, runs, n, &sink, false);
}
