/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The source side's page reader: reads runs of dirty guest pages out of the guest's memfds
 * with io_uring READ_FIXED into buffers registered with the ring, flags the all-zero pages
 * in each, and hands every filled buffer ("chunk") to the sender, which transmits it from
 * that buffer (zero pages as markers, not data) and gives the buffer back. Guest memory is
 * a set of regions (memslots), region i being bytes 0..size of file region_fds[i]; pages are
 * 4 KiB guest pages whatever the host page size. The reader knows nothing of dirty tracking:
 * the sender turns its dirty bitmaps into plain runs (pagereader_runs_from_bitmap) and the
 * rule "clear the dirty state before reading" stays the sender's.
 *
 * Thread-safety: none inside. A pagereader belongs to one sending thread (the TCP backend
 * runs one per stream); every call on it, pagereader_release included, comes from that
 * thread. Separate readers over the same memfds are independent.
 */
#ifndef FERRY_PAGEREADER_H
#define FERRY_PAGEREADER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define PAGEREADER_PAGE_SIZE 4096u
#define PAGEREADER_PAGE_SHIFT 12

#define PAGEREADER_DEFAULT_QUEUE_DEPTH 64u
#define PAGEREADER_MAX_QUEUE_DEPTH 4096u
#define PAGEREADER_DEFAULT_BATCH_PAGES 64u
#define PAGEREADER_MAX_BATCH_PAGES 1024u
/* The kernel refuses to register more buffers than this (IORING_MAX_REG_BUFFERS). */
#define PAGEREADER_MAX_BUFFERS 16384u

/* Returned by an async consume callback: "I still use this buffer, I will release it". */
#define PAGEREADER_KEEP 1

#define PAGEREADER_MAX_COPY_THREADS 64u

/*
 * Zero fields take the defaults.
 *
 * copy_threads: who does the copying. 0 (default) leaves it to io_uring: a file that
 * supports nonblocking reads is copied inline in the sending thread, any other — memfds
 * among them (shmem refuses RWF_NOWAIT; seen on 6.18) — goes to io_uring's worker pool,
 * which runs such never-blocking work on one worker at a time. N > 0 marks
 * every read IOSQE_ASYNC, which lets the pool run them concurrently, and caps the pool
 * at N threads (io_uring_register_iowq_max_workers): up to N cores copy for this reader.
 * The cap is per submitting thread, so it also bounds that thread's other rings.
 */
struct pagereader_config {
	unsigned queue_depth;  /* reads in flight, 1..4096; default 64 */
	unsigned batch_pages;  /* pages per read = per buffer, 1..1024; default 64 (256 KiB) */
	unsigned nr_buffers;   /* registered buffers, queue_depth..16384; default 2 * queue_depth */
	unsigned copy_threads; /* 0..64, see above; default 0 */
};

/* Pages first_page .. first_page + npages - 1 of one region. */
struct page_run {
	uint32_t region;
	uint64_t first_page;
	uint32_t npages;
};

/*
 * One completed read: npages whole pages of a region, in registered buffer `buffer`.
 * The struct and data stay valid until the buffer goes back to the reader: when consume
 * returns, or for an async consumer that returned PAGEREADER_KEEP, until pagereader_release.
 */
struct page_chunk {
	uint32_t region;
	uint64_t first_page;
	uint32_t npages;   /* 1..batch_pages */
	unsigned nr_zero;  /* pages whose 4096 bytes are all zero */
	unsigned buffer;   /* index of the registered buffer (for pagereader_release, RDMA keys) */
	const uint8_t *data; /* npages * 4096 bytes, page aligned, inside pagereader_buffer_area */
	uint64_t zero_mask[PAGEREADER_MAX_BATCH_PAGES / 64]; /* bit i: page first_page + i is zero */
};

static inline bool page_chunk_page_is_zero(const struct page_chunk *c, uint32_t i)
{
	return (c->zero_mask[i / 64] >> (i % 64)) & 1;
}

/* Counters since pagereader_new, plus two gauges; for metrics and tests. */
struct pagereader_stats {
	uint64_t reads;       /* READ_FIXED SQEs submitted, resubmissions included */
	uint64_t chunks;      /* chunks handed to consume */
	uint64_t pages;       /* pages handed to consume */
	uint64_t zero_pages;  /* of which all zero */
	uint64_t short_reads; /* completions with fewer bytes than asked (the rest was resubmitted) */
	uint64_t retries;     /* -EAGAIN / -EINTR completions resubmitted */
	unsigned inflight;    /* reads submitted and not yet reaped: 0 whenever no call is running */
	unsigned held;        /* buffers kept by an async consumer, not yet released */
};

struct pagereader;

/*
 * Sets up a ring of cfg->queue_depth entries with the region files registered (reads use
 * IOSQE_FIXED_FILE, index = region) and nr_buffers buffers of batch_pages pages registered
 * from one page-aligned anonymous mapping. cfg may be NULL. Region sizes must be multiples
 * of 4096; a regular file shorter than its region is refused. The fds are not taken over:
 * the ring holds its own references, so the caller may close them once this returns.
 * Registered buffers are pinned memory: without CAP_IPC_LOCK they count against
 * RLIMIT_MEMLOCK (-ENOMEM when over it). Returns 0, -EINVAL, -ENOMEM, or the ring's error.
 */
int pagereader_new(const struct pagereader_config *cfg, const int *region_fds,
		   const uint64_t *region_sizes, unsigned nr_regions, struct pagereader **ret);
/* Tears the ring down and gives the buffer area back (to the pool while it keeps areas
 * of that size, else unmapped). NULL-safe. Any chunk still held dies with it. */
void pagereader_free(struct pagereader *r);

/*
 * A pool of buffer areas, faulted in ahead of time, for readers made later with the same
 * sizes (queue_depth, batch_pages, nr_buffers as cfg, after defaults): pagereader_new takes
 * one instead of mapping and faulting in a fresh area — on hosts where first touch of
 * memory is slow that was most of a migration's set-up (docs/benchmarks.md) — and
 * pagereader_free gives it back. pagereader_pool_fill makes areas until n of that size are
 * idle and lets the pool keep that many bytes idle from then on; it may take a while (call
 * it from a thread of its own). Returns the number of idle areas of that size, or -errno
 * (-EINVAL for a bad cfg or n > 64, -ENOMEM when none could be made). Thread-safe.
 * pagereader_pool_drain unmaps every idle area and keeps none from then on.
 */
int pagereader_pool_fill(const struct pagereader_config *cfg, unsigned n);
void pagereader_pool_drain(void);
/* Bytes of idle areas the pool holds now. */
size_t pagereader_pool_bytes(void);

/* The effective configuration (defaults filled in). */
void pagereader_get_config(const struct pagereader *r, struct pagereader_config *ret);
void pagereader_get_stats(const struct pagereader *r, struct pagereader_stats *ret);

/*
 * The whole registered buffer area (nr_buffers * batch_pages * 4096 bytes, page aligned),
 * so an RDMA transport can register it as one memory region. Buffer b starts at
 * b * batch_pages * 4096.
 */
void *pagereader_buffer_area(const struct pagereader *r, size_t *ret_len);

/*
 * Coalesces a dirty bitmap (bit i = page first_page + i, npages bits; bits past npages are
 * ignored) into runs of adjacent dirty pages in page order, each at most max_run pages
 * (0 = unbounded). Runs stay inside the bitmap: runs of two bitmaps are never merged, so
 * a run never crosses the chunk the bitmap describes. Writes at most out_cap runs and
 * returns how many there are in all (like snprintf: more than out_cap means truncated).
 * out_cap >= npages is always enough.
 */
unsigned pagereader_runs_from_bitmap(uint32_t region, uint64_t first_page, const uint64_t *bits,
				     uint32_t npages, unsigned max_run, struct page_run *out,
				     unsigned out_cap);

/* True if the 4096 bytes at page (8-byte aligned) are all zero. */
bool pagereader_page_is_zero(const void *page);

typedef int (*pagereader_consume_fn)(void *arg, const struct page_chunk *c);

/*
 * Reads every page of runs[0..n) exactly once and calls consume for each chunk, in
 * completion order (not run order). A run longer than batch_pages is split into chunks;
 * chunks never span runs. All runs are checked first: a bad region or a run past the end
 * of its region (or of zero length) is -EINVAL before any I/O. Keeps up to queue_depth
 * reads in flight; a buffer is reused as soon as consume returned. consume returns 0
 * (any value >= 0), or < 0 to abort: then no further chunk is delivered, the reads in
 * flight are reaped and discarded, and the call returns that value.
 * Failures: the first read error (-EIO when a file ends inside its region, e.g. it was
 * truncated under the reader), or consume's error; -EBUSY when called from consume. In
 * every case nothing is in flight on return and the reader can be used again — except after
 * a failure of the ring itself (io_uring_enter erroring), which leaves the reader broken:
 * every later call returns that error and only pagereader_free is left to do.
 */
int pagereader_read(struct pagereader *r, const struct page_run *runs, unsigned n,
		    pagereader_consume_fn consume, void *arg);

/*
 * The asynchronous consumer, for a sender that transmits from the buffer after consume
 * returns (an RDMA WRITE posted from the buffer area).
 *   consume   as above, but returning PAGEREADER_KEEP keeps the buffer (and the chunk) for
 *             the consumer until it calls pagereader_release(r, c->buffer); it may do so
 *             inside a later consume, inside reclaim, or after the read call returned.
 *   reclaim   optional; called when the read cannot go on because the consumer holds every
 *             buffer and nothing is in flight. It must release at least one buffer (e.g.
 *             after waiting on its completion queue) and return 0, or return < 0 to abort.
 *             Without it, such a stall fails the call with -ENOBUFS.
 * Buffers still held when the call returns (successfully or not) stay held.
 */
struct pagereader_sink {
	pagereader_consume_fn consume;
	int (*reclaim)(void *arg);
	void *arg;
};

int pagereader_read_async(struct pagereader *r, const struct page_run *runs, unsigned n,
			  const struct pagereader_sink *sink);

/* Gives a kept buffer back. -EINVAL if it is not one the consumer holds. */
int pagereader_release(struct pagereader *r, unsigned buffer);

#endif
