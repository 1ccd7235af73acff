// SPDX-License-Identifier: Apache-2.0
/*
 * The TCP data path (struct xport_src / struct xport_dst, transport.h). The source runs one
 * thread per stream ("send-sN"), each with its own socket and its own page reader (its own
 * io_uring): a batch is split over the streams, every stream reads its share with READ_FIXED
 * into registered buffers and sends each chunk as one PAGES frame straight from the buffer
 * (zero pages only as bits of the frame's mask), then a FENCE. With ZSTD chosen (protocol v2)
 * a stream first tries to compress the chunk's non-zero pages with its own zstd context into
 * a buffer of 7/8 of their size and sends a PAGES_ZSTD frame when they fit, the raw PAGES
 * frame otherwise. The destination runs one
 * thread per stream ("recv-sN") that checks every frame against the registered regions and
 * receives page bytes directly into guest memory — or, in postcopy (xport_dst_set_uffd), places
 * them with UFFDIO_COPY/UFFDIO_ZEROPAGE, which install a page only where none is and wake
 * the vCPUs waiting for it.
 *
 * Which stream carries a page is a function of the page's address, not of the batch: a page
 * sent in round k and again in round k+1 travels both times on the same stream, so TCP's
 * in-order delivery guarantees the newer copy lands last. Splitting by count alone would let
 * round k's copy, still queued on a slow stream, overwrite round k+1's on the destination.
 * The address space is cut into stripes (a reader batch, at least 64 pages) and each group
 * of `streams` consecutive stripes is dealt out to all streams with a pseudo-random rotation:
 * contiguous memory spreads evenly, and strided dirty patterns do not pile onto one stream.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/sockios.h>
#include <sys/ioctl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

#define FERRY_MADV_POPULATE_WRITE 23 /* MADV_POPULATE_WRITE, Linux 5.14 */
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <zstd.h>

#include "transport/xport_internal.h"

#define PAGE PAGEREADER_PAGE_SIZE
#define SRC_CONNECT_TIMEOUT_MS 10000
#define SOCK_BUF_BYTES (4 << 20)
#define MIN_STRIPE_PAGES 64u
/* At most every other page of a chunk starts a data span, plus the header. */
#define MAX_SPANS (PROTO_PAGES_MAX / 2 + 1)
#define PAGES_HDR_MAX PROTO_PAGES_HDR_LEN(PROTO_PAGES_MAX)
/* Token bucket: at most this much credit accumulates while idle (20 ms worth, >= 256 KiB). */

static int set_blocking(int fd)
{
	int flags = fcntl(fd, F_GETFL);

	if (flags < 0 || fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) < 0)
		return -errno;
	return 0;
}

/* ======================= source ======================= */

struct tcp_src;

struct src_stream {
	struct tcp_src *x;
	unsigned idx;
	int fd;
	pthread_t thread;
	bool thread_started;          /* joined by free */
	struct pagereader *reader;    /* created, used and freed on this stream's thread */

	/*
	 * This stream's share of the batch. The engine thread writes them before it bumps
	 * x->gen under x->lock; this thread reads them after it saw the new gen under the same
	 * lock, so the lock orders the two and they need no lock of their own.
	 */
	struct xport_runs runs;
	uint64_t fence;
	unsigned gen_seen;

	/* Frame + PAGES header and iovecs of the chunk being sent: consume allocates nothing. */
	uint8_t hdrbuf[PROTO_HDR_LEN + PAGES_HDR_MAX];
	struct iovec iov[MAX_SPANS + 1];

	/* ZSTD chosen: this stream's compression context and output (7/8 of a chunk). */
	ZSTD_CCtx *cctx;
	uint8_t *zbuf;
	size_t zcap;
};

struct tcp_src {
	struct xport_src base;
	unsigned nr_streams;
	struct src_stream *streams;
	unsigned nr_regions;
	int *region_fds;         /* the caller's, only used (by the threads) until new returns */
	uint64_t *region_pages;
	struct pagereader_config reader_cfg;
	unsigned stripe_pages;

	/*
	 * Written (never read back, never drained) to stop every stream at once: by cancel, or
	 * by the first stream that fails. Stays readable, so every later wait sees it too.
	 */
	int stop_fd;
	atomic_bool stop;      /* the same, cheap to test per chunk */
	atomic_bool cancelled; /* xport_src_cancel() was called: -ECANCELED from now on */
	int broken;            /* sticky error of a failed batch; engine thread only */

	/*
	 * Batch hand-off between the engine thread and the stream threads: gen, nr_done,
	 * first_err, quit, nr_started, start_err. work_cond: a new gen or quit (to streams);
	 * done_cond: a stream started or finished its batch (to the engine).
	 */
	pthread_mutex_t lock;
	pthread_cond_t work_cond;
	pthread_cond_t done_cond;
	unsigned gen;
	unsigned nr_done;
	int first_err;
	bool quit;
	unsigned nr_started;
	int start_err;

	struct xport_bucket bucket; /* the bandwidth cap, shared by all streams */

	_Atomic uint64_t bytes, raw_bytes, pages, zero_pages, zstd_frames, batches;
};

static struct tcp_src *to_src(struct xport_src *x)
{
	return container_of(x, struct tcp_src, base);
}

static void src_stop_all(struct tcp_src *x)
{
	uint64_t one = 1;

	atomic_store(&x->stop, true);
	(void)!write(x->stop_fd, &one, sizeof(one));
}

/*
 * Sends the whole iovec (modified in place), waiting for socket space in poll() beside the
 * stop eventfd, so a cancel or another stream's failure gets a stream out of a full socket.
 */
static int src_sendv(struct src_stream *s, struct iovec *iov, size_t cnt, int flags)
{
	struct tcp_src *x = s->x;

	while (cnt) {
		struct msghdr msg = { .msg_iov = iov, .msg_iovlen = cnt };
		ssize_t n = sendmsg(s->fd, &msg, flags | MSG_DONTWAIT | MSG_NOSIGNAL);

		if (n >= 0) {
			cnt = iov_advance(&iov, cnt, (size_t)n);
			continue;
		}
		if (errno == EINTR)
			continue;
		if (errno != EAGAIN)
			return errno == EPIPE ? -ECONNRESET : -errno;
		/*
		 * No timeout here: a peer that vanished makes the socket fail on its own
		 * (TCP_USER_TIMEOUT), and one that is alive but slow is the engine's to judge.
		 */
		struct pollfd pfd[2] = {
			{ .fd = s->fd, .events = POLLOUT },
			{ .fd = x->stop_fd, .events = POLLIN },
		};
		if (poll(pfd, 2, -1) < 0 && errno != EINTR)
			return -errno;
		if (pfd[1].revents & POLLIN)
			return -ECANCELED;
	}
	return 0;
}

/*
 * Compresses the data spans iov[1..cnt) (data bytes in all) into s->zbuf as one zstd frame
 * with its content size. Returns the frame's length, or 0 when it would not be smaller than
 * the buffer (7/8 of the data) or zstd failed: the caller then sends the pages raw.
 */
static size_t src_compress(struct src_stream *s, size_t cnt, uint64_t data)
{
	size_t cap = (size_t)(data - data / 8);
	ZSTD_outBuffer out = { .dst = s->zbuf, .size = cap < s->zcap ? cap : s->zcap };
	size_t r;

	ZSTD_CCtx_reset(s->cctx, ZSTD_reset_session_only);
	if (ZSTD_isError(ZSTD_CCtx_setPledgedSrcSize(s->cctx, data)))
		return 0;
	for (size_t k = 1; k < cnt; k++) {
		ZSTD_inBuffer in = { .src = s->iov[k].iov_base, .size = s->iov[k].iov_len };
		ZSTD_EndDirective op = k + 1 == cnt ? ZSTD_e_end : ZSTD_e_continue;
		do {
			r = ZSTD_compressStream2(s->cctx, &out, &in, op);
			if (ZSTD_isError(r))
				goto fail;
			/* Output full with work left: it will not fit in 7/8. */
			if (out.pos == out.size && (in.pos < in.size || (op == ZSTD_e_end && r)))
				goto fail;
		} while (in.pos < in.size || (op == ZSTD_e_end && r));
	}
	if (out.pos >= cap)
		goto fail;
	return out.pos;
fail:
	ZSTD_CCtx_reset(s->cctx, ZSTD_reset_session_only);
	return 0;
}

/*
 * The page reader's consumer: one PAGES frame per chunk, sent from the registered buffer —
 * or, compressed, one PAGES_ZSTD frame from the stream's zstd buffer.
 */
static int src_consume(void *arg, const struct page_chunk *c)
{
	struct src_stream *s = arg;
	struct tcp_src *x = s->x;
	struct proto_pages ph = { .region = c->region, .first_page = c->first_page,
				  .npages = c->npages };
	unsigned words = (c->npages + 63) / 64, nr_zero = 0;
	size_t hl, cnt = 1, zlen = 0;
	uint64_t data = 0;
	int r;

	if (atomic_load_explicit(&x->stop, memory_order_relaxed))
		return -ECANCELED;
	memcpy(ph.zero_mask, c->zero_mask, words * sizeof(uint64_t));
	if (c->npages % 64)
		ph.zero_mask[words - 1] &= (1ull << (c->npages % 64)) - 1;
	hl = proto_encode_pages_hdr(&ph, s->hdrbuf + PROTO_HDR_LEN, PAGES_HDR_MAX);
	if (!hl)
		return -EINVAL;

	/* One iovec per run of non-zero pages, pointing into the reader's buffer. */
	for (uint32_t i = 0; i < c->npages;) {
		if (page_chunk_page_is_zero(c, i)) {
			nr_zero++;
			i++;
			continue;
		}
		uint32_t j = i + 1;
		while (j < c->npages && !page_chunk_page_is_zero(c, j))
			j++;
		s->iov[cnt].iov_base = (void *)(c->data + (size_t)i * PAGE);
		s->iov[cnt].iov_len = (size_t)(j - i) * PAGE;
		data += (uint64_t)(j - i) * PAGE;
		cnt++;
		i = j;
	}
	uint64_t raw = PROTO_HDR_LEN + hl + data;
	if (s->cctx && data)
		zlen = src_compress(s, cnt, data);
	if (zlen) {
		proto_hdr_encode(s->hdrbuf, PROTO_PAGES_ZSTD, (uint32_t)(hl + zlen));
		s->iov[1].iov_base = s->zbuf;
		s->iov[1].iov_len = zlen;
		cnt = 2;
	} else {
		proto_hdr_encode(s->hdrbuf, PROTO_PAGES, (uint32_t)(hl + data));
	}
	s->iov[0].iov_base = s->hdrbuf;
	s->iov[0].iov_len = PROTO_HDR_LEN + hl;

	/* The cap counts what the link carries: compressed bytes when compressed. */
	uint64_t total = PROTO_HDR_LEN + hl + (zlen ? zlen : data);
	r = xport_bucket_take(&x->bucket, total, x->stop_fd);
	if (r < 0)
		return r;
	/* MSG_MORE: full segments for bulk data; the FENCE (sent without it) pushes them out. */
	r = src_sendv(s, s->iov, cnt, MSG_MORE);
	if (r < 0)
		return r;
	atomic_fetch_add_explicit(&x->bytes, total, memory_order_relaxed);
	atomic_fetch_add_explicit(&x->raw_bytes, raw, memory_order_relaxed);
	atomic_fetch_add_explicit(&x->pages, c->npages - nr_zero, memory_order_relaxed);
	atomic_fetch_add_explicit(&x->zero_pages, nr_zero, memory_order_relaxed);
	if (zlen)
		atomic_fetch_add_explicit(&x->zstd_frames, 1, memory_order_relaxed);
	return 0;
}

/* A small frame (payload from a proto encoder), sent without MSG_MORE so it leaves now. */
static int src_send_frame(struct src_stream *s, uint16_t type, void *payload, size_t len)
{
	uint8_t hdr[PROTO_HDR_LEN];
	struct iovec iov[2] = {
		{ .iov_base = hdr, .iov_len = sizeof(hdr) },
		{ .iov_base = payload, .iov_len = len },
	};

	proto_hdr_encode(hdr, type, (uint32_t)len);
	return src_sendv(s, iov, 2, 0);
}

static int src_stream_batch(struct src_stream *s)
{
	struct proto_fence f = { .fence = s->fence };
	void *payload = NULL;
	size_t len = 0;
	int r;

	if (s->runs.n) {
		r = pagereader_read(s->reader, s->runs.v, s->runs.n, src_consume, s);
		if (r < 0)
			return r;
	}
	r = proto_encode_fence(&f, &payload, &len);
	if (r < 0)
		return r;
	/*
	 * Counted before it goes: once the FENCE is out, the destination may report it (and a
	 * reader compare both ends' counts) before this thread would get to count it after.
	 */
	atomic_fetch_add_explicit(&s->x->bytes, PROTO_HDR_LEN + len, memory_order_relaxed);
	atomic_fetch_add_explicit(&s->x->raw_bytes, PROTO_HDR_LEN + len, memory_order_relaxed);
	r = src_send_frame(s, PROTO_FENCE, payload, len);
	free(payload);
	if (r < 0) {
		atomic_fetch_sub_explicit(&s->x->bytes, PROTO_HDR_LEN + len, memory_order_relaxed);
		atomic_fetch_sub_explicit(&s->x->raw_bytes, PROTO_HDR_LEN + len,
					  memory_order_relaxed);
	}
	return r;
}

static void *src_stream_main(void *arg)
{
	struct src_stream *s = arg;
	struct tcp_src *x = s->x;
	char name[16];
	int r;

	snprintf(name, sizeof(name), "send-s%u", s->idx);
	pthread_setname_np(pthread_self(), name);

	/* The reader (its ring) belongs to this thread: it is made, used and freed here. */
	uint64_t sizes[XPORT_MAX_REGIONS];
	for (unsigned i = 0; i < x->nr_regions; i++)
		sizes[i] = x->region_pages[i] * PAGE;
	r = pagereader_new(&x->reader_cfg, x->region_fds, sizes, x->nr_regions, &s->reader);

	pthread_mutex_lock(&x->lock);
	x->nr_started++;
	if (r < 0 && !x->start_err)
		x->start_err = r;
	pthread_cond_broadcast(&x->done_cond);
	if (r < 0) {
		pthread_mutex_unlock(&x->lock);
		return NULL;
	}
	for (;;) {
		while (!x->quit && s->gen_seen == x->gen)
			pthread_cond_wait(&x->work_cond, &x->lock);
		if (x->quit)
			break;
		s->gen_seen = x->gen;
		pthread_mutex_unlock(&x->lock);

		r = src_stream_batch(s);

		pthread_mutex_lock(&x->lock);
		if (r < 0 && !x->first_err) {
			/* First failure wins; the others are stopped and report what it was. */
			x->first_err = r;
			src_stop_all(x);
		}
		x->nr_done++;
		pthread_cond_broadcast(&x->done_cond);
	}
	pthread_mutex_unlock(&x->lock);
	pagereader_free(s->reader);
	s->reader = NULL;
	return NULL;
}

/* Deals the batch's runs onto the streams (xport_deal_runs) and sets their fence. */
static int src_distribute(struct tcp_src *x, const struct page_run *runs, unsigned n,
			  uint64_t fence)
{
	struct xport_runs *lanes[XPORT_MAX_STREAMS];

	for (unsigned i = 0; i < x->nr_streams; i++) {
		lanes[i] = &x->streams[i].runs;
		x->streams[i].fence = fence;
	}
	return xport_deal_runs(runs, n, x->stripe_pages, lanes, x->nr_streams);
}

static int src_send(struct xport_src *base, const struct page_run *runs, unsigned n,
		    uint64_t fence)
{
	struct tcp_src *x = to_src(base);
	int r;

	if (atomic_load(&x->cancelled))
		return -ECANCELED;
	if (x->broken)
		return x->broken;
	if (n && !runs)
		return -EINVAL;
	/* Checked here, not by the readers, so a bad run fails the batch before any byte moves. */
	for (unsigned i = 0; i < n; i++) {
		if (runs[i].region >= x->nr_regions || !runs[i].npages ||
		    runs[i].first_page > x->region_pages[runs[i].region] ||
		    runs[i].npages > x->region_pages[runs[i].region] - runs[i].first_page)
			return -EINVAL;
	}
	r = src_distribute(x, runs, n, fence);
	if (r < 0)
		return r;

	pthread_mutex_lock(&x->lock);
	x->nr_done = 0;
	x->first_err = 0;
	x->gen++;
	pthread_cond_broadcast(&x->work_cond);
	while (x->nr_done < x->nr_streams)
		pthread_cond_wait(&x->done_cond, &x->lock);
	r = x->first_err;
	pthread_mutex_unlock(&x->lock);

	if (atomic_load(&x->cancelled))
		r = -ECANCELED;
	if (r < 0) {
		/* Some streams may have stopped mid-frame: none of them can be used again. */
		x->broken = r;
		return r;
	}
	atomic_fetch_add_explicit(&x->batches, 1, memory_order_relaxed);
	return 0;
}

static void src_set_bandwidth(struct xport_src *base, uint64_t bytes_per_sec)
{
	xport_bucket_set(&to_src(base)->bucket, bytes_per_sec);
}

static void src_cancel(struct xport_src *base)
{
	struct tcp_src *x = to_src(base);

	atomic_store(&x->cancelled, true);
	src_stop_all(x);
}

static void src_stats(const struct xport_src *base, struct xport_src_stats *ret)
{
	struct tcp_src *x = container_of(base, struct tcp_src, base);

	ret->bytes = atomic_load_explicit(&x->bytes, memory_order_relaxed);
	ret->raw_bytes = atomic_load_explicit(&x->raw_bytes, memory_order_relaxed);
	ret->pages = atomic_load_explicit(&x->pages, memory_order_relaxed);
	ret->zero_pages = atomic_load_explicit(&x->zero_pages, memory_order_relaxed);
	ret->zstd_frames = atomic_load_explicit(&x->zstd_frames, memory_order_relaxed);
	ret->batches = atomic_load_explicit(&x->batches, memory_order_relaxed);
}

static void src_free(struct xport_src *base)
{
	struct tcp_src *x = to_src(base);

	if (x->streams) {
		pthread_mutex_lock(&x->lock);
		x->quit = true;
		pthread_cond_broadcast(&x->work_cond);
		pthread_mutex_unlock(&x->lock);
		for (unsigned i = 0; i < x->nr_streams; i++) {
			struct src_stream *s = &x->streams[i];
			if (s->thread_started)
				pthread_join(s->thread, NULL);
			if (s->fd >= 0)
				close(s->fd);
			xport_runs_free(&s->runs);
			ZSTD_freeCCtx(s->cctx);
			free(s->zbuf);
		}
		free(x->streams);
	}
	if (x->stop_fd >= 0)
		close(x->stop_fd);
	pthread_cond_destroy(&x->done_cond);
	pthread_cond_destroy(&x->work_cond);
	xport_bucket_destroy(&x->bucket);
	pthread_mutex_destroy(&x->lock);
	free(x->region_pages);
	free(x);
}

/* Every stream's unacknowledged bytes (SIOCOUTQ) reach 0, polled each millisecond. */
static int src_drain(struct xport_src *base, int timeout_ms)
{
	struct tcp_src *x = to_src(base);
	int64_t deadline = tcp_now_ms() + timeout_ms;

	for (unsigned i = 0; i < x->nr_streams; i++) {
		for (;;) {
			int q = 0;
			if (x->streams[i].fd < 0 || ioctl(x->streams[i].fd, SIOCOUTQ, &q) < 0 || q <= 0)
				break;
			if (atomic_load(&x->cancelled))
				return -ECANCELED;
			if (tcp_now_ms() >= deadline)
				return -ETIMEDOUT;
			usleep(1000);
		}
	}
	return 0;
}

static const struct xport_src_ops tcp_src_ops = {
	.name = "tcp",
	.send = src_send,
	.set_bandwidth = src_set_bandwidth,
	.cancel = src_cancel,
	.stats = src_stats,
	.drain = src_drain,
	.free = src_free,
};

/* Starts the stream threads and waits until each has its page reader (or failed to). */
static int src_start_threads(struct tcp_src *x, char *err, size_t errlen)
{
	int r = 0;

	for (unsigned i = 0; i < x->nr_streams; i++) {
		r = -pthread_create(&x->streams[i].thread, NULL, src_stream_main, &x->streams[i]);
		if (r < 0) {
			xport_set_err(err, errlen, "starting stream thread %u: %s", i, strerror(-r));
			break;
		}
		x->streams[i].thread_started = true;
	}
	pthread_mutex_lock(&x->lock);
	for (unsigned started = 0; started < x->nr_streams; started++) {
		if (!x->streams[started].thread_started)
			break;
		while (x->nr_started <= started)
			pthread_cond_wait(&x->done_cond, &x->lock);
	}
	if (!r && x->start_err) {
		r = x->start_err;
		xport_set_err(err, errlen, "page reader: %s%s", strerror(-r),
			r == -ENOMEM ? " (RLIMIT_MEMLOCK too low for the registered buffers?)"
				     : "");
	}
	pthread_mutex_unlock(&x->lock);
	return r;
}

/* A compression context per stream, and an output buffer of 7/8 of the largest chunk. */
static int src_setup_zstd(struct tcp_src *x, int level, char *err, size_t errlen)
{
	struct pagereader_config eff;

	if (level < 0 || level > XPORT_ZSTD_MAX_LEVEL) {
		xport_set_err(err, errlen, "compression level %d, want 1..%d", level,
			      XPORT_ZSTD_MAX_LEVEL);
		return -EINVAL;
	}
	pagereader_get_config(x->streams[0].reader, &eff);
	for (unsigned i = 0; i < x->nr_streams; i++) {
		struct src_stream *s = &x->streams[i];
		s->zcap = (size_t)eff.batch_pages * PAGE - (size_t)eff.batch_pages * PAGE / 8;
		s->cctx = ZSTD_createCCtx();
		s->zbuf = malloc(s->zcap);
		if (!s->cctx || !s->zbuf ||
		    ZSTD_isError(ZSTD_CCtx_setParameter(s->cctx, ZSTD_c_compressionLevel,
						       level ? level : XPORT_ZSTD_DEFAULT_LEVEL)) ||
		    ZSTD_isError(ZSTD_CCtx_setParameter(s->cctx, ZSTD_c_contentSizeFlag, 1))) {
			xport_set_err(err, errlen, "stream %u: zstd context: out of memory", i);
			return -ENOMEM;
		}
	}
	return 0;
}

static int src_open_stream(struct src_stream *s, const char *hostport,
			   const uint8_t token[XPORT_TOKEN_LEN], char *err, size_t errlen)
{
	struct proto_stream_hello h = { .stream = s->idx };
	void *payload = NULL;
	size_t len = 0;
	int one = 1, r;

	r = tcp_connect(hostport, SRC_CONNECT_TIMEOUT_MS, SOCK_BUF_BYTES, &s->fd, err, errlen);
	if (r < 0)
		return r;
	/* Small frames (FENCE) must leave at once; bulk data is batched with MSG_MORE. */
	(void)setsockopt(s->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	memcpy(h.token, token, XPORT_TOKEN_LEN);
	r = proto_encode_stream_hello(&h, &payload, &len);
	if (r < 0)
		return r;
	r = src_send_frame(s, PROTO_STREAM_HELLO, payload, len);
	free(payload);
	if (r < 0)
		xport_set_err(err, errlen, "stream %u to %s: STREAM_HELLO: %s", s->idx, hostport,
			strerror(-r));
	return r;
}

int xport_src_tcp_new(const struct xport_src_config *cfg, const char *hostport,
		      const uint8_t token[XPORT_TOKEN_LEN], const int *region_fds,
		      const uint64_t *region_sizes, unsigned nr_regions, struct xport_src **ret,
		      char *err, size_t errlen)
{
	struct tcp_src *x;
	int r;

	if (!cfg || !cfg->streams || cfg->streams > XPORT_MAX_STREAMS || !hostport || !token ||
	    !region_fds || !region_sizes || !nr_regions || nr_regions > XPORT_MAX_REGIONS ||
	    !ret) {
		xport_set_err(err, errlen, "bad transport configuration");
		return -EINVAL;
	}
	for (unsigned i = 0; i < nr_regions; i++) {
		if (region_sizes[i] % PAGE || region_fds[i] < 0) {
			xport_set_err(err, errlen, "region %u: bad file or size", i);
			return -EINVAL;
		}
	}

	x = calloc(1, sizeof(*x));
	if (!x) {
		xport_set_err(err, errlen, "out of memory");
		return -ENOMEM;
	}
	x->base.ops = &tcp_src_ops;
	x->stop_fd = -1;
	x->nr_regions = nr_regions;
	x->reader_cfg = cfg->reader;
	/* Mutexes and condvars first: src_free() destroys them whatever else got built. */
	pthread_mutex_init(&x->lock, NULL);
	xport_bucket_init(&x->bucket);
	pthread_cond_init(&x->work_cond, NULL);
	pthread_cond_init(&x->done_cond, NULL);

	x->region_pages = calloc(nr_regions, sizeof(*x->region_pages));
	if (!x->region_pages) {
		r = -ENOMEM;
		xport_set_err(err, errlen, "out of memory");
		goto err_free;
	}
	for (unsigned i = 0; i < nr_regions; i++)
		x->region_pages[i] = region_sizes[i] / PAGE;
	x->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (x->stop_fd < 0) {
		r = -errno;
		xport_set_err(err, errlen, "eventfd: %s", strerror(-r));
		goto err_free;
	}
	x->streams = calloc(cfg->streams, sizeof(*x->streams));
	if (!x->streams) {
		r = -ENOMEM;
		xport_set_err(err, errlen, "out of memory");
		goto err_free;
	}
	x->nr_streams = cfg->streams;
	for (unsigned i = 0; i < x->nr_streams; i++) {
		x->streams[i].x = x;
		x->streams[i].idx = i;
		x->streams[i].fd = -1;
	}

	/* Readers before connections: a memlock failure should not leave the peer half-wired. */
	x->region_fds = (int *)region_fds;
	r = src_start_threads(x, err, errlen);
	x->region_fds = NULL; /* the readers hold their own references now */
	if (r < 0)
		goto err_free;
	{
		struct pagereader_config eff;
		pagereader_get_config(x->streams[0].reader, &eff);
		x->stripe_pages = eff.batch_pages > MIN_STRIPE_PAGES ? eff.batch_pages
								     : MIN_STRIPE_PAGES;
	}
	src_set_bandwidth(&x->base, cfg->bandwidth);
	if (cfg->compress) {
		r = src_setup_zstd(x, cfg->compress_level, err, errlen);
		if (r < 0)
			goto err_free;
	}

	for (unsigned i = 0; i < x->nr_streams; i++) {
		r = src_open_stream(&x->streams[i], hostport, token, err, errlen);
		if (r < 0)
			goto err_free;
	}
	*ret = &x->base;
	return 0;

err_free:
	src_free(&x->base);
	return r;
}

/* ======================= destination ======================= */

struct tcp_dst;

enum dst_state {
	DST_IDLE,    /* not added yet */
	DST_RUNNING, /* receiver thread reading */
	DST_CLOSED,  /* the source closed it cleanly (or we are shutting down) */
	DST_FAILED,  /* protocol or connection error (x->err says which) */
};

struct dst_stream {
	struct tcp_dst *x;
	unsigned idx;
	int fd;
	pthread_t thread;
	bool thread_started; /* joined by free */

	/* Under x->lock: */
	enum dst_state state;
	bool have_fence;
	uint64_t fence;

	/*
	 * The receiver thread's own scratch: iovecs into guest memory, header bytes, mincore,
	 * and for regions written through their file, the frame's page data (bounce, one
	 * frame's worth, allocated on first use).
	 */
	struct iovec iov[MAX_SPANS];
	uint8_t *bounce;
	uint8_t buf[PAGES_HDR_MAX];
	unsigned char resident[PROTO_PAGES_MAX];
	/* PAGES_ZSTD: the whole payload as received, and the decompression context (first use). */
	uint8_t *zbuf;
	ZSTD_DCtx *dctx;
};

struct dst_region {
	uint8_t *hva;
	int fd; /* -1: write through hva */
	uint64_t pages;
	/*
	 * Bit per page: this receiver wrote data there. Shared by all receivers (a word spans
	 * pages of several stripes), hence atomic. See dst_zero_pages() for why it exists.
	 */
	_Atomic uint64_t *written;
	/*
	 * Postcopy: -1, or our duplicate of the userfaultfd that pages are placed through from
	 * now on (xport_dst_set_uffd). Set once, from -1, by the control thread; read by the
	 * receivers at each frame; closed by free only.
	 */
	_Atomic int uffd;
};

struct tcp_dst {
	struct xport_dst base;
	unsigned nr_regions;
	struct dst_region regions[XPORT_MAX_REGIONS];
	unsigned expected;
	struct dst_stream *streams;
	bool host_pages_4k; /* mincore() reports per 4 KiB page, i.e. per guest page */

	/*
	 * Stream states and fences, the first error and its reason, the running count.
	 * cond: a fence advanced or a stream ended (to xport_dst_wait_fence).
	 */
	pthread_mutex_t lock;
	pthread_cond_t cond;
	int err;
	char errstr[256]; /* written once, before err is set; never changed after */
	unsigned running;

	atomic_bool stopping; /* free is tearing down: no more writes, errors no longer count */
	atomic_bool zstd;     /* PAGES_ZSTD accepted (xport_dst_enable_zstd) */
	_Atomic uint64_t bytes, pages, zero_pages, zstd_frames;
};

static struct tcp_dst *to_dst(struct xport_dst *x)
{
	return container_of(x, struct tcp_dst, base);
}

/* Called with x->lock held. The first error wins; later ones are only consequences. */
static void dst_record_error(struct tcp_dst *x, int err, const char *reason)
{
	if (x->err)
		return;
	snprintf(x->errstr, sizeof(x->errstr), "%s", reason);
	x->err = err;
}

/*
 * Fills buf[0..len) from the stream. 1 on a clean EOF before the first byte when eof_ok,
 * 0 when filled, -ECONNRESET (EOF mid-frame or a socket error; reason says) otherwise.
 */
static int dst_recv_exact(struct dst_stream *s, void *buf, size_t len, bool eof_ok,
			  char *reason, size_t rlen)
{
	size_t got = 0;

	while (got < len) {
		ssize_t n = recv(s->fd, (uint8_t *)buf + got, len - got, MSG_WAITALL);
		if (n > 0) {
			got += (size_t)n;
			continue;
		}
		if (n == 0) {
			if (!got && eof_ok)
				return 1;
			snprintf(reason, rlen, "stream %u: connection closed mid-frame", s->idx);
			return -ECONNRESET;
		}
		if (errno == EINTR)
			continue;
		snprintf(reason, rlen, "stream %u: %s", s->idx, strerror(errno));
		return -ECONNRESET;
	}
	return 0;
}

/* Receives straight into the iovecs (guest memory); same results as dst_recv_exact. */
static int dst_recv_iov(struct dst_stream *s, struct iovec *iov, size_t cnt, char *reason,
			size_t rlen)
{
	while (cnt) {
		/* Free shuts the socket down, but queued bytes could still be read: look first. */
		if (atomic_load_explicit(&s->x->stopping, memory_order_relaxed)) {
			snprintf(reason, rlen, "stream %u: stopped", s->idx);
			return -ECONNRESET;
		}
		struct msghdr msg = { .msg_iov = iov, .msg_iovlen = cnt };
		ssize_t n = recvmsg(s->fd, &msg, MSG_WAITALL);
		if (n > 0) {
			cnt = iov_advance(&iov, cnt, (size_t)n);
			continue;
		}
		if (n == 0) {
			snprintf(reason, rlen, "stream %u: connection closed mid-frame", s->idx);
			return -ECONNRESET;
		}
		if (errno == EINTR)
			continue;
		snprintf(reason, rlen, "stream %u: %s", s->idx, strerror(errno));
		return -ECONNRESET;
	}
	return 0;
}

static bool test_written(const struct dst_region *rg, uint64_t page)
{
	return atomic_load_explicit(&rg->written[page / 64], memory_order_relaxed) &
	       (1ull << (page % 64));
}

/*
 * Zero markers. Writing zeros over a page that is already zero would allocate it: reading a
 * never-touched page of a shared memfd mapping allocates it too (shmem has no zero page for
 * shared mappings), so "read it and see" is no cheaper. What we know instead: a page this
 * receiver wrote data to may hold data now (written bit), and a page not in memory at all
 * (mincore) that we never wrote is a hole, zero by definition of fresh guest memory. Only
 * resident or written pages are read, and only those that are not zero are cleared.
 */
static void dst_zero_pages(struct dst_stream *s, struct dst_region *rg,
			   const struct proto_pages *ph)
{
	bool have_resident = false;

	for (uint32_t i = 0; i < ph->npages; i++) {
		if (!((ph->zero_mask[i / 64] >> (i % 64)) & 1))
			continue;
		uint64_t page = ph->first_page + i;
		uint8_t *addr = rg->hva + page * PAGE;
		if (!test_written(rg, page)) {
			if (!have_resident) {
				/* One call for the frame's whole range, made only if needed. */
				if (!s->x->host_pages_4k ||
				    mincore(rg->hva + ph->first_page * PAGE, (size_t)ph->npages * PAGE,
					    s->resident) < 0)
					memset(s->resident, 1, ph->npages);
				have_resident = true;
			}
			if (!(s->resident[i] & 1))
				continue;
		}
		if (!pagereader_page_is_zero(addr))
			memset(addr, 0, PAGE);
	}
}

/*
 * Sets the written bit of pages [first, first + n) of rg; true if some page had not been
 * written before.
 */
static bool mark_written(struct dst_region *rg, uint64_t first, uint32_t n)
{
	bool fresh = false;

	for (uint64_t page = first; page < first + n; page++) {
		uint64_t bit = 1ull << (page % 64);
		fresh |= !(atomic_fetch_or_explicit(&rg->written[page / 64], bit,
						    memory_order_relaxed) &
			   bit);
	}
	return fresh;
}

/* A run of consecutive pages of a frame that are all data or all zero, from i on. */
static uint32_t span_end(const struct proto_pages *ph, uint32_t i, bool *ret_zero)
{
	bool zero = (ph->zero_mask[i / 64] >> (i % 64)) & 1;
	uint32_t j = i + 1;

	while (j < ph->npages && (bool)((ph->zero_mask[j / 64] >> (j % 64)) & 1) == zero)
		j++;
	*ret_zero = zero;
	return j;
}

/* Data spans go straight into guest memory; mark them before they may hold data. */
static int dst_recv_to_memory(struct dst_stream *s, struct dst_region *rg,
			      const struct proto_pages *ph, char *reason, size_t rlen)
{
	size_t cnt = 0;

	for (uint32_t i = 0, j; i < ph->npages; i = j) {
		bool zero;
		j = span_end(ph, i, &zero);
		if (zero)
			continue;
		s->iov[cnt].iov_base = rg->hva + (ph->first_page + i) * PAGE;
		s->iov[cnt].iov_len = (size_t)(j - i) * PAGE;
		/*
		 * Fault a span in with one call before receiving into it when some of it was
		 * never written, rather than page by page in the kernel's copy. Best effort:
		 * older kernels lack MADV_POPULATE_WRITE and the copy then faults as before.
		 */
		if (mark_written(rg, ph->first_page + i, j - i))
			madvise(s->iov[cnt].iov_base, s->iov[cnt].iov_len,
				FERRY_MADV_POPULATE_WRITE);
		cnt++;
	}
	return cnt ? dst_recv_iov(s, s->iov, cnt, reason, rlen) : 0;
}

/* The frame's page data (data_len > 0 bytes) into the stream's bounce buffer. */
static int dst_recv_bounce(struct dst_stream *s, uint64_t data_len, char *reason, size_t rlen)
{
	struct iovec iov;

	if (!s->bounce) {
		s->bounce = aligned_alloc(PAGE, (size_t)PROTO_PAGES_MAX * PAGE);
		if (!s->bounce) {
			snprintf(reason, rlen, "stream %u: out of memory", s->idx);
			return -ENOMEM;
		}
	}
	iov.iov_base = s->bounce;
	iov.iov_len = data_len;
	return dst_recv_iov(s, &iov, 1, reason, rlen);
}

/*
 * Postcopy: every span of the frame placed through the region's userfaultfd from the
 * bounce buffer (which holds the frame's page data) — data spans copied, zero spans as zero
 * pages — so a vCPU blocked on one of them runs on, and a page the destination already has
 * is not touched.
 */
static int dst_place_uffd(struct dst_stream *s, struct dst_region *rg, int uffd,
			  const struct proto_pages *ph, char *reason, size_t rlen)
{
	size_t at = 0;
	int r;

	for (uint32_t i = 0; i < ph->npages;) {
		bool zero;
		uint32_t j = span_end(ph, i, &zero);
		size_t len = (size_t)(j - i) * PAGE;

		r = xport_uffd_place(uffd, rg->hva + (ph->first_page + i) * PAGE,
				     zero ? NULL : s->bounce + at, len, NULL, NULL);
		if (r < 0) {
			snprintf(reason, rlen, "stream %u: placing pages %llu..%llu: %s", s->idx,
				 (unsigned long long)(ph->first_page + i),
				 (unsigned long long)(ph->first_page + j - 1), strerror(-r));
			return r;
		}
		if (!zero) {
			mark_written(rg, ph->first_page + i, j - i);
			at += len;
		}
		i = j;
	}
	return 0;
}

/*
 * The frame's page data, in the bounce buffer, into the region span by span: through its
 * file at the span's offset (pwrite), or copied into the mapping. A span is marked written
 * before it may hold data, like the receive-into-memory path.
 */
static int dst_place_data(struct dst_stream *s, struct dst_region *rg,
			  const struct proto_pages *ph, char *reason, size_t rlen)
{
	size_t at = 0;

	for (uint32_t i = 0, j; i < ph->npages; i = j) {
		bool zero;
		j = span_end(ph, i, &zero);
		if (zero)
			continue;
		size_t len = (size_t)(j - i) * PAGE;
		bool fresh = mark_written(rg, ph->first_page + i, j - i);
		if (rg->fd < 0) {
			uint8_t *dst = rg->hva + (ph->first_page + i) * PAGE;
			if (fresh)
				madvise(dst, len, FERRY_MADV_POPULATE_WRITE);
			memcpy(dst, s->bounce + at, len);
			at += len;
			continue;
		}
		off_t off = (off_t)((ph->first_page + i) * PAGE);
		for (size_t done = 0; done < len;) {
			ssize_t n = pwrite(rg->fd, s->bounce + at + done, len - done,
					   off + (off_t)done);
			if (n > 0) {
				done += (size_t)n;
				continue;
			}
			if (n < 0 && errno == EINTR)
				continue;
			snprintf(reason, rlen, "stream %u: writing guest memory: %s", s->idx,
				 n < 0 ? strerror(errno) : "short write");
			return n < 0 ? -errno : -EIO;
		}
		at += len;
	}
	return 0;
}

/* The frame's pages, data in the bounce buffer, placed where this region takes them. */
static int dst_place(struct dst_stream *s, struct dst_region *rg, int uffd,
		     const struct proto_pages *ph, char *reason, size_t rlen)
{
	return uffd >= 0 ? dst_place_uffd(s, rg, uffd, ph, reason, rlen)
			 : dst_place_data(s, rg, ph, reason, rlen);
}

/* The frame's pages inside a region of ours? Returns it, or NULL with a reason. */
static struct dst_region *dst_frame_region(struct dst_stream *s, const struct proto_pages *ph,
					   const char *what, char *reason, size_t rlen)
{
	struct tcp_dst *x = s->x;

	if (ph->region >= x->nr_regions) {
		snprintf(reason, rlen, "stream %u: %s for region %u but only %u regions", s->idx,
			 what, ph->region, x->nr_regions);
		return NULL;
	}
	struct dst_region *rg = &x->regions[ph->region];
	if (ph->first_page > rg->pages || ph->npages > rg->pages - ph->first_page) {
		snprintf(reason, rlen,
			 "stream %u: %s %llu..%llu outside region %u (%llu pages)", s->idx, what,
			 (unsigned long long)ph->first_page,
			 (unsigned long long)(ph->first_page + ph->npages - 1), ph->region,
			 (unsigned long long)rg->pages);
		return NULL;
	}
	return rg;
}

/* After a frame's pages landed: zero markers (not in postcopy), statistics. */
static void dst_frame_done(struct dst_stream *s, struct dst_region *rg, int uffd,
			   const struct proto_pages *ph, uint64_t data_len, uint32_t len)
{
	struct tcp_dst *x = s->x;
	uint32_t nr_data = (uint32_t)(data_len / PAGE);

	if (nr_data < ph->npages && uffd < 0)
		dst_zero_pages(s, rg, ph);
	atomic_fetch_add_explicit(&x->bytes, PROTO_HDR_LEN + (uint64_t)len, memory_order_relaxed);
	atomic_fetch_add_explicit(&x->pages, nr_data, memory_order_relaxed);
	atomic_fetch_add_explicit(&x->zero_pages, ph->npages - nr_data, memory_order_relaxed);
}

/*
 * A PAGES_ZSTD frame: the whole payload into the stream's buffer (bounded by a raw frame:
 * the compressed bytes must be fewer than the raw ones), checked by the codec (header,
 * one zstd frame declaring exactly the raw size), decompressed into the bounce buffer —
 * which must yield exactly that many bytes — and only then placed like a raw frame. So a
 * frame that fails any check writes nothing.
 */
static int dst_on_pages_zstd(struct dst_stream *s, uint32_t len, char *reason, size_t rlen)
{
	struct tcp_dst *x = s->x;
	struct proto_pages ph;
	uint64_t data_len;
	const void *z;
	size_t zlen;
	char derr[160] = "";
	int r;

	if (!atomic_load_explicit(&x->zstd, memory_order_relaxed)) {
		snprintf(reason, rlen, "stream %u: PAGES_ZSTD frame, but ZSTD was not chosen",
			 s->idx);
		return -EPROTO;
	}
	if (len < PROTO_PAGES_HDR_LEN(1) + 1 || len >= PAGES_HDR_MAX + PROTO_PAGES_MAX * PAGE) {
		snprintf(reason, rlen, "stream %u: PAGES_ZSTD frame of %u bytes", s->idx, len);
		return -EPROTO;
	}
	if (!s->zbuf)
		s->zbuf = malloc((size_t)PAGES_HDR_MAX + PROTO_PAGES_MAX * PAGE);
	if (!s->dctx)
		s->dctx = ZSTD_createDCtx();
	if (!s->bounce)
		s->bounce = aligned_alloc(PAGE, (size_t)PROTO_PAGES_MAX * PAGE);
	if (!s->zbuf || !s->dctx || !s->bounce) {
		snprintf(reason, rlen, "stream %u: out of memory", s->idx);
		return -ENOMEM;
	}
	r = dst_recv_exact(s, s->zbuf, len, false, reason, rlen);
	if (r < 0)
		return r;
	if (proto_decode_pages_zstd(s->zbuf, len, &ph, &data_len, &z, &zlen, derr,
				    sizeof(derr)) < 0) {
		snprintf(reason, rlen, "stream %u: bad PAGES_ZSTD: %.160s", s->idx, derr);
		return -EPROTO;
	}
	struct dst_region *rg = dst_frame_region(s, &ph, "PAGES_ZSTD", reason, rlen);
	if (!rg)
		return -EPROTO;
	size_t n = ZSTD_decompressDCtx(s->dctx, s->bounce, (size_t)data_len, z, zlen);
	if (ZSTD_isError(n) || n != data_len) {
		snprintf(reason, rlen,
			 "stream %u: PAGES_ZSTD pages %llu..%llu of region %u: %s (%zu of %llu "
			 "bytes)",
			 s->idx, (unsigned long long)ph.first_page,
			 (unsigned long long)(ph.first_page + ph.npages - 1), ph.region,
			 ZSTD_isError(n) ? ZSTD_getErrorName(n) : "short decompression",
			 ZSTD_isError(n) ? (size_t)0 : n, (unsigned long long)data_len);
		return -EPROTO;
	}
	if (atomic_load_explicit(&x->stopping, memory_order_relaxed)) {
		snprintf(reason, rlen, "stream %u: stopped", s->idx);
		return -ECONNRESET;
	}
	int uffd = atomic_load_explicit(&rg->uffd, memory_order_acquire);
	r = dst_place(s, rg, uffd, &ph, reason, rlen);
	if (r < 0)
		return r;
	dst_frame_done(s, rg, uffd, &ph, data_len, len);
	atomic_fetch_add_explicit(&x->zstd_frames, 1, memory_order_relaxed);
	return 0;
}

static int dst_on_pages(struct dst_stream *s, uint32_t len, char *reason, size_t rlen)
{
	struct proto_pages ph;
	uint64_t data_len;
	char derr[128] = "";
	/*
	 * Page data comes in 4096-byte multiples after a header shorter than a page, so the
	 * header's length is the remainder: no byte of page data is read into a bounce buffer.
	 */
	uint32_t hl = len % PAGE;
	int r;

	if (hl < PROTO_PAGES_HDR_LEN(1) || hl > PAGES_HDR_MAX) {
		snprintf(reason, rlen, "stream %u: PAGES frame of %u bytes has no valid header",
			 s->idx, len);
		return -EPROTO;
	}
	r = dst_recv_exact(s, s->buf, hl, false, reason, rlen);
	if (r < 0)
		return r;
	if (proto_decode_pages_hdr(s->buf, hl, &ph, &data_len, derr, sizeof(derr)) < 0) {
		snprintf(reason, rlen, "stream %u: bad PAGES header: %s", s->idx, derr);
		return -EPROTO;
	}
	if (hl != PROTO_PAGES_HDR_LEN(ph.npages) || data_len != len - hl) {
		snprintf(reason, rlen,
			 "stream %u: PAGES frame of %u bytes but its header says %u pages with %llu "
			 "data bytes",
			 s->idx, len, ph.npages, (unsigned long long)data_len);
		return -EPROTO;
	}
	struct dst_region *rg = dst_frame_region(s, &ph, "PAGES", reason, rlen);
	if (!rg)
		return -EPROTO;

	/*
	 * Straight into the mapping when nothing stands in between; else the data through the
	 * bounce buffer, then placed (the file, or userfaultfd in postcopy).
	 */
	int uffd = atomic_load_explicit(&rg->uffd, memory_order_acquire);
	if (uffd < 0 && rg->fd < 0)
		r = dst_recv_to_memory(s, rg, &ph, reason, rlen);
	else if (!data_len || (r = dst_recv_bounce(s, data_len, reason, rlen)) == 0)
		r = dst_place(s, rg, uffd, &ph, reason, rlen);
	if (r < 0)
		return r;
	dst_frame_done(s, rg, uffd, &ph, data_len, len);
	return 0;
}

static int dst_on_fence(struct dst_stream *s, uint32_t len, char *reason, size_t rlen)
{
	struct tcp_dst *x = s->x;
	struct proto_fence f;
	char derr[128] = "";
	int r;

	if (len > sizeof(s->buf)) {
		snprintf(reason, rlen, "stream %u: FENCE of %u bytes", s->idx, len);
		return -EPROTO;
	}
	r = dst_recv_exact(s, s->buf, len, false, reason, rlen);
	if (r < 0)
		return r;
	if (proto_decode_fence(s->buf, len, &f, derr, sizeof(derr)) < 0) {
		snprintf(reason, rlen, "stream %u: bad FENCE: %s", s->idx, derr);
		return -EPROTO;
	}
	pthread_mutex_lock(&x->lock);
	if (s->have_fence && f.fence < s->fence) {
		snprintf(reason, rlen, "stream %u: FENCE %llu after FENCE %llu", s->idx,
			 (unsigned long long)f.fence, (unsigned long long)s->fence);
		pthread_mutex_unlock(&x->lock);
		return -EPROTO;
	}
	/* Counted before the waiters wake, so a fence seen means its bytes are counted too. */
	atomic_fetch_add_explicit(&x->bytes, PROTO_HDR_LEN + (uint64_t)len, memory_order_relaxed);
	s->have_fence = true;
	s->fence = f.fence;
	pthread_cond_broadcast(&x->cond);
	pthread_mutex_unlock(&x->lock);
	return 0;
}

/* 0 on a clean EOF between frames; < 0 with a reason otherwise. */
static int dst_stream_loop(struct dst_stream *s, char *reason, size_t rlen)
{
	uint8_t hdr[PROTO_HDR_LEN];
	struct proto_hdr h;
	int r;

	for (;;) {
		r = dst_recv_exact(s, hdr, sizeof(hdr), true, reason, rlen);
		if (r)
			return r > 0 ? 0 : r;
		if (proto_hdr_decode(hdr, PROTO_MAX_PAYLOAD, &h) < 0) {
			snprintf(reason, rlen,
				 "stream %u: bad frame header %02x%02x%02x%02x %02x%02x%02x%02x "
				 "%02x%02x%02x%02x",
				 s->idx, hdr[0], hdr[1], hdr[2], hdr[3], hdr[4], hdr[5], hdr[6],
				 hdr[7], hdr[8], hdr[9], hdr[10], hdr[11]);
			return -EPROTO;
		}
		switch (h.type) {
		case PROTO_PAGES:
			r = dst_on_pages(s, h.len, reason, rlen);
			break;
		case PROTO_PAGES_ZSTD:
			r = dst_on_pages_zstd(s, h.len, reason, rlen);
			break;
		case PROTO_FENCE:
			r = dst_on_fence(s, h.len, reason, rlen);
			break;
		default:
			snprintf(reason, rlen, "stream %u: unexpected %s frame on a data stream",
				 s->idx, proto_type_name(h.type));
			r = -EPROTO;
			break;
		}
		if (r < 0)
			return r;
	}
}

static void *dst_stream_main(void *arg)
{
	struct dst_stream *s = arg;
	struct tcp_dst *x = s->x;
	char name[16], reason[256] = "";
	int r;

	snprintf(name, sizeof(name), "recv-s%u", s->idx);
	pthread_setname_np(pthread_self(), name);

	r = dst_stream_loop(s, reason, sizeof(reason));

	pthread_mutex_lock(&x->lock);
	if (r < 0 && !atomic_load(&x->stopping)) {
		s->state = DST_FAILED;
		dst_record_error(x, r, reason);
	} else {
		s->state = DST_CLOSED;
	}
	x->running--;
	pthread_cond_broadcast(&x->cond);
	pthread_mutex_unlock(&x->lock);
	/* Tell the source now; the fd itself is closed by free, so its number is not reused
	 * while free might still shut it down. */
	if (r < 0)
		shutdown(s->fd, SHUT_RDWR);
	return NULL;
}

static int dst_add_stream(struct xport_dst *base, int fd, unsigned idx)
{
	struct tcp_dst *x = to_dst(base);
	struct dst_stream *s;
	int buf = SOCK_BUF_BYTES, r;

	if (fd < 0)
		return -EBADF;
	if (idx >= x->expected)
		return -EINVAL;
	s = &x->streams[idx];
	pthread_mutex_lock(&x->lock);
	r = s->state != DST_IDLE ? -EEXIST : 0;
	pthread_mutex_unlock(&x->lock);
	if (r < 0)
		return r;
	r = set_blocking(fd);
	if (r < 0)
		return r;
	(void)setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof(buf));
	tcp_set_liveness(fd);

	pthread_mutex_lock(&x->lock);
	s->fd = fd;
	s->state = DST_RUNNING;
	x->running++;
	r = -pthread_create(&s->thread, NULL, dst_stream_main, s);
	if (r < 0) {
		/* The fd stays the caller's, as if we had never seen it. */
		s->fd = -1;
		s->state = DST_IDLE;
		x->running--;
	} else {
		s->thread_started = true;
	}
	pthread_mutex_unlock(&x->lock);
	return r;
}

static int dst_wait_fence(struct xport_dst *base, uint64_t fence, int timeout_ms)
{
	struct tcp_dst *x = to_dst(base);
	struct timespec deadline;
	bool timed_out = false;
	int r;

	clock_gettime(CLOCK_MONOTONIC, &deadline);
	if (timeout_ms > 0) {
		deadline.tv_sec += timeout_ms / 1000;
		deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000;
		if (deadline.tv_nsec >= 1000000000) {
			deadline.tv_sec++;
			deadline.tv_nsec -= 1000000000;
		}
	}
	pthread_mutex_lock(&x->lock);
	for (;;) {
		bool all = true;

		if (x->err) {
			r = x->err;
			break;
		}
		for (unsigned i = 0; i < x->expected; i++) {
			struct dst_stream *s = &x->streams[i];
			/* Fence 0 comes before every batch: passed by any stream. */
			if (fence == 0 || (s->have_fence && s->fence >= fence))
				continue;
			all = false;
			if (s->state == DST_CLOSED) {
				/* Gone for good: it can never reach this fence. */
				char reason[160];
				snprintf(reason, sizeof(reason),
					 "stream %u closed before fence %llu (it reached %s%llu)", i,
					 (unsigned long long)fence, s->have_fence ? "" : "none, ",
					 (unsigned long long)s->fence);
				dst_record_error(x, -ECONNRESET, reason);
			}
		}
		if (x->err) {
			r = x->err;
			break;
		}
		if (all) {
			r = 0;
			break;
		}
		if (timed_out || timeout_ms == 0) {
			r = -ETIMEDOUT;
			break;
		}
		if (timeout_ms < 0)
			pthread_cond_wait(&x->cond, &x->lock);
		else if (pthread_cond_timedwait(&x->cond, &x->lock, &deadline) == ETIMEDOUT)
			timed_out = true; /* one last look, then give up */
	}
	pthread_mutex_unlock(&x->lock);
	return r;
}

static const char *dst_error(const struct xport_dst *base)
{
	struct tcp_dst *x = container_of(base, struct tcp_dst, base);
	const char *e;

	pthread_mutex_lock(&x->lock);
	e = x->err ? x->errstr : "";
	pthread_mutex_unlock(&x->lock);
	return e;
}

static void dst_stats(const struct xport_dst *base, struct xport_dst_stats *ret)
{
	struct tcp_dst *x = container_of(base, struct tcp_dst, base);

	ret->bytes = atomic_load_explicit(&x->bytes, memory_order_relaxed);
	ret->pages = atomic_load_explicit(&x->pages, memory_order_relaxed);
	ret->zero_pages = atomic_load_explicit(&x->zero_pages, memory_order_relaxed);
	ret->zstd_frames = atomic_load_explicit(&x->zstd_frames, memory_order_relaxed);
	pthread_mutex_lock(&x->lock);
	ret->streams = x->running;
	pthread_mutex_unlock(&x->lock);
}

static void dst_free(struct xport_dst *base)
{
	struct tcp_dst *x = to_dst(base);

	atomic_store(&x->stopping, true);
	if (x->streams) {
		/* Shut down first, join after: a receiver blocked in recv() wakes up with EOF. */
		for (unsigned i = 0; i < x->expected; i++) {
			if (x->streams[i].fd >= 0)
				shutdown(x->streams[i].fd, SHUT_RDWR);
		}
		for (unsigned i = 0; i < x->expected; i++) {
			struct dst_stream *s = &x->streams[i];
			if (s->thread_started)
				pthread_join(s->thread, NULL);
			if (s->fd >= 0)
				close(s->fd);
			free(s->bounce);
			free(s->zbuf);
			ZSTD_freeDCtx(s->dctx);
		}
		free(x->streams);
	}
	for (unsigned i = 0; i < x->nr_regions; i++) {
		free(x->regions[i].written);
		if (x->regions[i].fd >= 0)
			close(x->regions[i].fd);
		if (atomic_load(&x->regions[i].uffd) >= 0)
			close(atomic_load(&x->regions[i].uffd));
	}
	pthread_cond_destroy(&x->cond);
	pthread_mutex_destroy(&x->lock);
	free(x);
}

static int dst_set_uffd(struct xport_dst *base, unsigned region, int uffd);

static const struct xport_dst_ops tcp_dst_ops = {
	.name = "tcp",
	.add_stream = dst_add_stream,
	.set_uffd = dst_set_uffd,
	.wait_fence = dst_wait_fence,
	.error = dst_error,
	.stats = dst_stats,
	.free = dst_free,
};

int xport_dst_tcp_new(const struct xport_region *regions, unsigned nr_regions,
		      unsigned expected_streams, struct xport_dst **ret)
{
	struct tcp_dst *x;
	pthread_condattr_t ca;
	int r;

	if (!regions || !nr_regions || nr_regions > XPORT_MAX_REGIONS || !expected_streams ||
	    expected_streams > XPORT_MAX_STREAMS || !ret)
		return -EINVAL;
	for (unsigned i = 0; i < nr_regions; i++) {
		/* Page-aligned: guest memory is mmap'd, and mincore() needs it. */
		if (!regions[i].hva || regions[i].size % PAGE || (uintptr_t)regions[i].hva % PAGE ||
		    (regions[i].has_fd && regions[i].fd < 0))
			return -EINVAL;
	}
	x = calloc(1, sizeof(*x));
	if (!x)
		return -ENOMEM;
	x->base.ops = &tcp_dst_ops;
	x->host_pages_4k = sysconf(_SC_PAGESIZE) == PAGE;
	pthread_mutex_init(&x->lock, NULL);
	/* wait_fence's deadline must not move with the wall clock. */
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&x->cond, &ca);
	pthread_condattr_destroy(&ca);

	for (unsigned i = 0; i < nr_regions; i++) {
		x->regions[i].fd = -1;
		atomic_init(&x->regions[i].uffd, -1);
	}
	x->nr_regions = nr_regions;
	for (unsigned i = 0; i < nr_regions; i++) {
		x->regions[i].hva = regions[i].hva;
		/* Our own reference: the receivers may outlive the caller's use of it. */
		if (regions[i].has_fd &&
		    (x->regions[i].fd = fcntl(regions[i].fd, F_DUPFD_CLOEXEC, 0)) < 0) {
			r = -errno;
			goto err_free;
		}
		x->regions[i].pages = regions[i].size / PAGE;
		x->regions[i].written =
			calloc((x->regions[i].pages + 63) / 64 + 1, sizeof(uint64_t));
		if (!x->regions[i].written) {
			r = -ENOMEM;
			goto err_free;
		}
	}
	x->streams = calloc(expected_streams, sizeof(*x->streams));
	if (!x->streams) {
		r = -ENOMEM;
		goto err_free;
	}
	x->expected = expected_streams;
	for (unsigned i = 0; i < expected_streams; i++) {
		x->streams[i].x = x;
		x->streams[i].idx = i;
		x->streams[i].fd = -1;
		x->streams[i].state = DST_IDLE;
	}
	*ret = &x->base;
	return 0;

err_free:
	dst_free(&x->base);
	return r;
}

/* The receivers place the pages of `region` through uffd from now on (transport.h). */
static int dst_set_uffd(struct xport_dst *base, unsigned region, int uffd)
{
	struct tcp_dst *x = to_dst(base);
	int fd, expected = -1;

	if (region >= x->nr_regions)
		return -EINVAL;
	/* Our own reference, like the region's fd: the caller may close its uffd first. */
	fd = fcntl(uffd, F_DUPFD_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	if (!atomic_compare_exchange_strong_explicit(&x->regions[region].uffd, &expected, fd,
						     memory_order_release, memory_order_relaxed)) {
		close(fd);
		return -EALREADY;
	}
	return 0;
}

/* Defined here like xport_dst_set_uffd: only the TCP receivers decompress. */
int xport_dst_enable_zstd(struct xport_dst *base)
{
	if (!base)
		return -EINVAL;
	if (base->ops != &tcp_dst_ops)
		return -EOPNOTSUPP;
	atomic_store(&to_dst(base)->zstd, true);
	return 0;
}
