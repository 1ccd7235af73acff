// SPDX-License-Identifier: Apache-2.0
/*
 * Description: the TCP transport (transport/tcp_ctl.c, transport/tcp_data.c) over real
 * loopback sockets, real memfds and real threads. Random page runs of a 64 MiB memfd with
 * random content and zero pages, sent over 1, 4 and 8 streams in fenced batches, land
 * byte-exact in the destination's memory, zero pages as markers that allocate nothing,
 * unsent pages untouched, and a page re-sent in a later batch (or turned zero) always ends
 * with its newest content. Hand-crafted bad frames on raw sockets — writes outside the
 * regions, garbage, wrong types, backwards fences, truncation, mutated headers — are refused
 * with a reason and touch nothing. wait_fence times out on a silent stream and fails on a
 * stream that closed short of the fence. A destination that vanishes mid-batch fails the
 * source promptly; cancel frees a send stuck on a full socket; the bandwidth cap holds.
 * The control channel: round trips, timeouts that keep a half-read frame, interrupt,
 * garbage and oversized frames, a closing peer, bad addresses. Prints loopback throughput
 * for 1 and 4 streams (informative only).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>

#include "tio.h"
#include "txport.h"

#include "transport/transport.h"

#define PAGE 4096u
#define SRC_PAGES (16384u) /* 64 MiB */
#define SRC_SIZE ((uint64_t)SRC_PAGES * PAGE)

static const uint8_t token[XPORT_TOKEN_LEN] = "0123456789abcdef";

/* ---------------- helpers ---------------- */

static uint64_t memfd_allocated(int fd)
{
	struct stat st;

	assert_int_equal(fstat(fd, &st), 0);
	return (uint64_t)st.st_blocks * 512;
}

/* A valid frame into buf (header + payload); returns its length. */
static size_t frame(uint8_t *buf, uint16_t type, const void *payload, size_t len)
{
	proto_hdr_encode(buf, type, (uint32_t)len);
	if (len)
		memcpy(buf + PROTO_HDR_LEN, payload, len);
	return PROTO_HDR_LEN + len;
}

static size_t fence_frame(uint8_t *buf, uint64_t fence)
{
	struct proto_fence f = { .fence = fence };
	void *p;
	size_t len;

	assert_int_equal(proto_encode_fence(&f, &p, &len), 0);
	size_t n = frame(buf, PROTO_FENCE, p, len);
	free(p);
	return n;
}

/* The header of a PAGES frame whose data (if any) the caller sends after it. */
static size_t pages_frame_hdr(uint8_t *buf, uint32_t region, uint64_t first, uint32_t npages,
			      const uint64_t *zero_mask, uint64_t data_len)
{
	struct proto_pages ph = { .region = region, .first_page = first, .npages = npages };

	if (zero_mask)
		memcpy(ph.zero_mask, zero_mask, (npages + 63) / 64 * 8);
	size_t hl = proto_encode_pages_hdr(&ph, buf + PROTO_HDR_LEN, PROTO_PAGES_HDR_LEN(1024));
	assert_true(hl > 0);
	proto_hdr_encode(buf, PROTO_PAGES, (uint32_t)(hl + data_len));
	return PROTO_HDR_LEN + hl;
}

/* Memlock-friendly reader settings: 8 streams of these pin 4 MiB in all. */
static const struct pagereader_config small_reader = {
	.queue_depth = 4, .batch_pages = 32, .nr_buffers = 4
};

/*
 * Opens an xport_src to a listener and plays the agent's part on the other side: accepts
 * every stream, reads and checks its STREAM_HELLO, and hands it to dst — or, with dst NULL
 * or the stream's bit in hold_mask, keeps its raw fd in held_fds so nobody reads it.
 */
static struct xport_src *open_src_hold(unsigned streams, uint64_t bw,
				       const struct pagereader_config *rc, int src_fd,
				       uint64_t size, struct xport_dst *dst, int *held_fds,
				       uint64_t hold_mask)
{
	struct xport_src_config cfg = { .streams = streams, .bandwidth = bw };

	if (rc)
		cfg.reader = *rc;
	struct xport_src *src =
		tx_src_open_hold(&cfg, token, &src_fd, &size, 1, dst, held_fds, hold_mask);
	assert_string_equal(xport_src_name(src), "tcp");
	return src;
}

static struct xport_src *open_src(unsigned streams, uint64_t bw,
				  const struct pagereader_config *rc, int src_fd, uint64_t size,
				  struct xport_dst *dst, int *held_fds)
{
	return open_src_hold(streams, bw, rc, src_fd, size, dst, held_fds, 0);
}

/* ---------------- the shared 64 MiB source ---------------- */

struct big {
	int src_fd;
	uint8_t *src;
	int dst_fd;
	uint8_t *dst;
};

static int big_setup(void **state)
{
	struct big *b = calloc(1, sizeof(*b));

	b->src = tio_memfd_map(SRC_SIZE, &b->src_fd);
	for (uint64_t p = 0; p < SRC_PAGES; p++)
		tio_fill_page(b->src + p * PAGE, p);
	b->dst = tio_memfd_map(SRC_SIZE, &b->dst_fd);
	*state = b;
	return 0;
}

static int big_teardown(void **state)
{
	struct big *b = *state;

	munmap(b->src, SRC_SIZE);
	munmap(b->dst, SRC_SIZE);
	close(b->src_fd);
	close(b->dst_fd);
	free(b);
	return 0;
}

static unsigned random_runs(struct page_run *runs, unsigned max, uint32_t max_len)
{
	unsigned n = 1 + (unsigned)(tio_rnd() % max);

	for (unsigned i = 0; i < n; i++) {
		uint32_t len = 1 + (uint32_t)(tio_rnd() % max_len);
		uint64_t first = tio_rnd() % (SRC_PAGES - len + 1);
		runs[i] = (struct page_run){ .region = 0, .first_page = first, .npages = len };
	}
	return n;
}

/*
 * Random batches over `streams` streams; between batches some already-sent pages change
 * (some to zero) and are sent again. After each fence the destination must equal the
 * source on every page sent so far, and be zero everywhere else.
 */
static void transfer(struct big *b, unsigned streams, bool via_fd)
{
	struct xport_region reg = { .hva = b->dst, .size = SRC_SIZE, .has_fd = via_fd,
				    .fd = via_fd ? b->dst_fd : -1 };
	struct xport_dst *dst = NULL;
	uint8_t *sent = calloc(SRC_PAGES, 1);
	struct page_run runs[64];
	uint64_t want_zero = 0, want_data = 0;

	memset(b->dst, 0, SRC_SIZE);
	assert_int_equal(fallocate(b->dst_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0,
				   (off_t)SRC_SIZE),
			 0);
	assert_int_equal(xport_dst_tcp_new(&reg, 1, streams, &dst), 0);
	struct xport_src *src = open_src(streams, 0, &small_reader, b->src_fd, SRC_SIZE, dst, NULL);

	for (uint64_t fence = 1; fence <= 12; fence++) {
		unsigned n = random_runs(runs, 64, fence % 3 ? 64 : 700);
		/* Rewrite some pages that were sent before, and include them in this batch. */
		if (fence > 1) {
			for (unsigned k = 0; k < 8 && n < 64; k++) {
				uint64_t p = tio_rnd() % SRC_PAGES;
				if (!sent[p])
					continue;
				tio_fill_page(b->src + p * PAGE, p ^ (fence << 32));
				if (k % 2)
					memset(b->src + p * PAGE, 0, PAGE); /* data turned zero */
				runs[n++] = (struct page_run){ .region = 0, .first_page = p,
							       .npages = 1 };
			}
		}
		for (unsigned i = 0; i < n; i++) {
			for (uint64_t p = runs[i].first_page; p < runs[i].first_page + runs[i].npages;
			     p++) {
				sent[p] = 1;
				if (tio_page_zero(b->src + p * PAGE))
					want_zero++;
				else
					want_data++;
			}
		}
		assert_int_equal(xport_src_send(src, runs, n, fence), 0);
		int r = xport_dst_wait_fence(dst, fence, 10000);
		if (r)
			fail_msg("wait_fence(%llu): %s: %s", (unsigned long long)fence,
				 strerror(-r), xport_dst_error(dst));
	}
	for (uint64_t p = 0; p < SRC_PAGES; p++) {
		if (sent[p]) {
			if (memcmp(b->dst + p * PAGE, b->src + p * PAGE, PAGE))
				fail_msg("page %llu differs", (unsigned long long)p);
		} else if (!tio_page_zero(b->dst + p * PAGE)) {
			fail_msg("unsent page %llu is not zero", (unsigned long long)p);
		}
	}

	struct xport_src_stats ss;
	struct xport_dst_stats ds;
	xport_src_stats(src, &ss);
	xport_dst_stats(dst, &ds);
	assert_int_equal(ss.batches, 12);
	assert_int_equal(ss.zero_pages, want_zero);
	assert_int_equal(ss.pages, want_data);
	assert_int_equal(ds.zero_pages, want_zero);
	assert_int_equal(ds.pages, want_data);
	assert_int_equal(ds.bytes, ss.bytes);
	assert_int_equal(ds.streams, streams);
	/* Zero pages went as mask bits: the wire carried little more than the data pages. */
	assert_true(ss.bytes < want_data * PAGE + (want_data + want_zero) * 64 + 12 * 64 * streams);
	assert_string_equal(xport_dst_error(dst), "");

	xport_src_free(src);
	/* Clean EOF after the last fence is no error. */
	assert_int_equal(xport_dst_wait_fence(dst, 12, 5000), 0);
	xport_dst_free(dst);
	free(sent);
}

static void transfer_1(void **state)
{
	transfer(*state, 1, false);
}

static void transfer_4(void **state)
{
	transfer(*state, 4, false);
}

static void transfer_8(void **state)
{
	transfer(*state, 8, false);
}

/* The same with the destination writing through the region's memfd (pwrite), as ferryd. */
static void transfer_fd_1(void **state)
{
	transfer(*state, 1, true);
}

static void transfer_fd_4(void **state)
{
	transfer(*state, 4, true);
}

/*
 * Batch after batch without waiting for fences, each rewriting the same hot pages, while
 * the destination does not read stream 0 at all until the end: a page's copies must still
 * land in the order they were sent. (A transport that let a page change streams between
 * batches would have stream 0 deliver old copies over newer ones here.)
 */
static void resend(struct big *b, bool via_fd)
{
	struct xport_region reg = { .hva = b->dst, .size = SRC_SIZE, .has_fd = via_fd,
				    .fd = via_fd ? b->dst_fd : -1 };
	struct xport_dst *dst = NULL;
	uint64_t hot[200];
	struct page_run runs[200];
	int held[8] = { -1, -1, -1, -1, -1, -1, -1, -1 };
	const uint64_t last = 20;

	memset(b->dst, 0, SRC_SIZE);
	for (unsigned i = 0; i < 200; i++)
		hot[i] = tio_rnd() % SRC_PAGES;
	assert_int_equal(xport_dst_tcp_new(&reg, 1, 8, &dst), 0);
	/* ~100 KiB a batch lands on stream 0: all of it fits in its socket buffers. */
	struct xport_src *src =
		open_src_hold(8, 0, &small_reader, b->src_fd, SRC_SIZE, dst, held, 1u << 0);
	for (uint64_t fence = 1; fence <= last; fence++) {
		for (unsigned i = 0; i < 200; i++) {
			tio_fill_page(b->src + hot[i] * PAGE, hot[i] ^ (fence << 40));
			runs[i] = (struct page_run){ .region = 0, .first_page = hot[i], .npages = 1 };
		}
		assert_int_equal(xport_src_send(src, runs, 200, fence), 0);
	}
	assert_int_equal(xport_dst_wait_fence(dst, last, 50), -ETIMEDOUT);
	assert_int_equal(xport_dst_add_stream(dst, held[0], 0), 0);
	assert_int_equal(xport_dst_wait_fence(dst, last, 10000), 0);
	for (unsigned i = 0; i < 200; i++)
		if (memcmp(b->dst + hot[i] * PAGE, b->src + hot[i] * PAGE, PAGE))
			fail_msg("hot page %llu holds an older copy", (unsigned long long)hot[i]);
	xport_src_free(src);
	xport_dst_free(dst);
}

static void resend_without_waiting(void **state)
{
	resend(*state, false);
}

static void resend_without_waiting_fd(void **state)
{
	resend(*state, true);
}

/* Zero pages on a fresh destination arrive as markers and allocate none of its memory. */
static void zero_pages_allocate_nothing(void **state)
{
	struct big *b = *state;
	struct xport_region reg = { .hva = b->dst, .size = SRC_SIZE };
	struct xport_dst *dst = NULL;
	struct page_run run = { .region = 0, .first_page = 0, .npages = 4096 };

	assert_int_equal(fallocate(b->dst_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0,
				   (off_t)SRC_SIZE),
			 0);
	memset(b->src, 0, (size_t)run.npages * PAGE); /* first 16 MiB of the source: zero */
	b->src[100 * PAGE + 7] = 0x5a;                /* one data page among them */
	assert_int_equal(xport_dst_tcp_new(&reg, 1, 2, &dst), 0);
	struct xport_src *src = open_src(2, 0, &small_reader, b->src_fd, SRC_SIZE, dst, NULL);

	assert_int_equal(xport_src_send(src, &run, 1, 1), 0);
	assert_int_equal(xport_dst_wait_fence(dst, 1, 10000), 0);
	struct xport_src_stats ss;
	xport_src_stats(src, &ss);
	assert_int_equal(ss.zero_pages, 4095);
	assert_int_equal(ss.pages, 1);
	assert_true(ss.bytes < 2 * PAGE + 4096 / 8 + 64 * 200);
	assert_int_equal(b->dst[100 * PAGE + 7], 0x5a);
	/* One data page (plus maybe a huge-page's worth of shmem rounding): not 16 MiB. */
	assert_true(memfd_allocated(b->dst_fd) <= (2u << 20));

	xport_src_free(src);
	xport_dst_free(dst);
}

/* Bad runs are refused before anything is sent; the transport still works afterwards. */
static void bad_runs(void **state)
{
	struct big *b = *state;
	struct xport_region reg = { .hva = b->dst, .size = SRC_SIZE };
	struct xport_dst *dst = NULL;
	const struct page_run bad[] = {
		{ .region = 1, .first_page = 0, .npages = 1 },
		{ .region = 0, .first_page = SRC_PAGES, .npages = 1 },
		{ .region = 0, .first_page = SRC_PAGES - 1, .npages = 2 },
		{ .region = 0, .first_page = 0, .npages = 0 },
		{ .region = 0, .first_page = UINT64_MAX, .npages = 2 },
	};

	assert_int_equal(xport_dst_tcp_new(&reg, 1, 1, &dst), 0);
	struct xport_src *src = open_src(1, 0, &small_reader, b->src_fd, SRC_SIZE, dst, NULL);
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		assert_int_equal(xport_src_send(src, &bad[i], 1, 1), -EINVAL);
	struct xport_src_stats ss;
	xport_src_stats(src, &ss);
	assert_int_equal(ss.bytes, 0);
	assert_int_equal(xport_src_send(src, NULL, 0, 7), 0); /* a fence alone */
	assert_int_equal(xport_dst_wait_fence(dst, 7, 5000), 0);
	xport_src_free(src);
	xport_dst_free(dst);
}

/* ---------------- bad frames on raw sockets ---------------- */

/* Regions between guard pages: tx_guarded (tests/util/txport.h). */

static void guarded_expect_error_at(struct tx_guarded *g, uint64_t fence, int err,
				    const char *reason_part)
{
	int r = xport_dst_wait_fence(g->dst, fence, 5000);

	if (r != err)
		fail_msg("wait_fence: %d (%s), want %d; reason \"%s\"", r, strerror(-r), err,
			 xport_dst_error(g->dst));
	if (!strstr(xport_dst_error(g->dst), reason_part))
		fail_msg("reason \"%s\" lacks \"%s\"", xport_dst_error(g->dst), reason_part);
	/* The error sticks: any later wait reports it too. */
	assert_int_equal(xport_dst_wait_fence(g->dst, 0, 0), err);
}

static void guarded_expect_error(struct tx_guarded *g, int err, const char *reason_part)
{
	guarded_expect_error_at(g, 1, err, reason_part);
}

static void write_outside_regions(void **state)
{
	(void)state;
	uint8_t buf[256], page[PAGE];
	struct tx_guarded g;
	size_t n;

	memset(page, 0x77, sizeof(page));

	/* Region id past the end. */
	tx_guarded_open(&g, 1, false);
	n = pages_frame_hdr(buf, 7, 0, 1, NULL, PAGE);
	tio_write_all(g.src_fd, buf, n);
	tio_write_refused(g.src_fd, page, PAGE);
	guarded_expect_error(&g, -EPROTO, "stream 0: PAGES for region 7 but only 1 regions");
	tx_peer_closed(g.src_fd);
	tx_guarded_check(&g, true);
	tx_guarded_close(&g);

	/* A run that starts inside and ends past the region. */
	tx_guarded_open(&g, 1, false);
	n = pages_frame_hdr(buf, 0, TX_REG_PAGES - 2, 4, NULL, 4 * PAGE);
	tio_write_all(g.src_fd, buf, n);
	for (int i = 0; i < 4; i++)
		tio_write_refused(g.src_fd, page, PAGE);
	guarded_expect_error(&g, -EPROTO, "outside region 0");
	tx_guarded_check(&g, true);
	tx_guarded_close(&g);

	/* A run starting far past the end, and one whose end wraps around 2^64. */
	tx_guarded_open(&g, 1, false);
	uint64_t zeros[16];
	memset(zeros, 0xff, sizeof(zeros));
	zeros[0] = ~0ull >> (64 - 8); /* all 8 pages zero: no data follows */
	n = pages_frame_hdr(buf, 0, 0, 8, zeros, 0);
	uint64_t wrap = UINT64_MAX - 3; /* patched in: the encoder refuses to write it */
	memcpy(buf + PROTO_HDR_LEN + 4, &wrap, 8);
	tio_write_all(g.src_fd, buf, n);
	guarded_expect_error(&g, -EPROTO, "stream 0: ");
	tx_guarded_check(&g, true);
	tx_guarded_close(&g);

	/* Valid pages first, then a bad frame: the good write stays, nothing else happens. */
	tx_guarded_open(&g, 1, false);
	n = pages_frame_hdr(buf, 0, 3, 1, NULL, PAGE);
	tio_write_all(g.src_fd, buf, n);
	tio_write_all(g.src_fd, page, PAGE);
	n = fence_frame(buf, 1);
	tio_write_all(g.src_fd, buf, n);
	assert_int_equal(xport_dst_wait_fence(g.dst, 1, 5000), 0);
	assert_int_equal(g.region[3 * PAGE], 0x77);
	assert_int_equal(g.region[4 * PAGE - 1], 0x77);
	n = pages_frame_hdr(buf, 0, TX_REG_PAGES, 1, NULL, PAGE);
	tio_write_all(g.src_fd, buf, n);
	tio_write_refused(g.src_fd, page, PAGE);
	int r = xport_dst_wait_fence(g.dst, 2, 5000);
	assert_int_equal(r, -EPROTO);
	assert_non_null(strstr(xport_dst_error(g.dst), "outside region 0"));
	tx_guarded_check(&g, false);
	for (unsigned p = 0; p < TX_REG_PAGES; p++)
		assert_int_equal(g.region[p * PAGE], p == 3 ? 0x77 : 0x11);
	tx_guarded_close(&g);
}

static void garbage_on_stream(void **state)
{
	(void)state;
	uint8_t buf[512];
	struct tx_guarded g;
	size_t n;

	/* Plain garbage: an HTTP request on a data stream. */
	tx_guarded_open(&g, 1, false);
	const char *http = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
	tio_write_all(g.src_fd, http, strlen(http));
	guarded_expect_error(&g, -EPROTO, "bad frame header");
	tx_peer_closed(g.src_fd);
	tx_guarded_check(&g, true);
	tx_guarded_close(&g);

	/* A well-formed control frame where only data frames belong. */
	tx_guarded_open(&g, 1, false);
	n = frame(buf, PROTO_HELLO, "hello", 5);
	tio_write_all(g.src_fd, buf, n);
	guarded_expect_error(&g, -EPROTO, "unexpected");
	tx_guarded_close(&g);

	/* A fence that goes backwards. */
	tx_guarded_open(&g, 1, false);
	n = fence_frame(buf, 5);
	n += fence_frame(buf + n, 4);
	tio_write_all(g.src_fd, buf, n);
	/* (Fence 5 itself would be reached before the bad one is read: wait past it.) */
	guarded_expect_error_at(&g, 6, -EPROTO, "FENCE 4 after FENCE 5");
	tx_guarded_close(&g);

	/* A PAGES frame whose length disagrees with its header (one page too many). */
	tx_guarded_open(&g, 1, false);
	n = pages_frame_hdr(buf, 0, 0, 1, NULL, 2 * PAGE);
	tio_write_all(g.src_fd, buf, n);
	guarded_expect_error(&g, -EPROTO, "PAGES");
	tx_guarded_check(&g, true);
	tx_guarded_close(&g);

	/* A PAGES frame shorter than any header. */
	tx_guarded_open(&g, 1, false);
	n = frame(buf, PROTO_PAGES, "abc", 3);
	tio_write_all(g.src_fd, buf, n);
	guarded_expect_error(&g, -EPROTO, "no valid header");
	tx_guarded_close(&g);

	/* A frame cut short by the peer closing. */
	tx_guarded_open(&g, 1, false);
	n = pages_frame_hdr(buf, 0, 0, 2, NULL, 2 * PAGE);
	memset(buf + n, 0x42, 100);
	tio_write_all(g.src_fd, buf, n + 100);
	shutdown(g.src_fd, SHUT_WR);
	guarded_expect_error(&g, -ECONNRESET, "closed mid-frame");
	tx_guarded_close(&g);

	/*
	 * Mutated PAGES frames: flip random bytes of a valid header (or truncate the data),
	 * then close. Whatever the receiver makes of it, it reports an error and never writes
	 * outside the region.
	 */
	for (int iter = 0; iter < 200; iter++) {
		uint8_t data[2 * PAGE];
		uint64_t zm[16] = { 0 };
		tx_guarded_open(&g, 1, false);
		zm[0] = tio_rnd() & 3;
		uint32_t nz = (uint32_t)__builtin_popcountll(zm[0]);
		n = pages_frame_hdr(buf, 0, tio_rnd() % TX_REG_PAGES, 2, zm, (2 - nz) * PAGE);
		unsigned flips = 1 + (unsigned)(tio_rnd() % 3);
		for (unsigned f = 0; f < flips; f++)
			buf[tio_rnd() % n] ^= (uint8_t)(1u << (tio_rnd() % 8));
		memset(data, 0x99, sizeof(data));
		tio_write_all(g.src_fd, buf, n);
		(void)!send(g.src_fd, data, (size_t)(tio_rnd() % (sizeof(data) + 1)), MSG_NOSIGNAL);
		shutdown(g.src_fd, SHUT_WR);
		int r = xport_dst_wait_fence(g.dst, 1, 5000);
		if (r >= 0 || r == -ETIMEDOUT)
			fail_msg("iteration %d: wait_fence %d", iter, r);
		assert_true(strlen(xport_dst_error(g.dst)) > 0);
		tx_guarded_check(&g, false);
		tx_guarded_close(&g);
	}
}

/* ---------------- fences ---------------- */

static void fence_timeout(void **state)
{
	(void)state;
	uint8_t region_mem[PAGE * 2] __attribute__((aligned(4096)));
	struct xport_region reg = { .hva = region_mem, .size = sizeof(region_mem) };
	struct xport_dst *dst = NULL;
	uint8_t buf[64];
	int a0, b0, a1, b1;
	size_t n;

	assert_int_equal(xport_dst_tcp_new(&reg, 1, 2, &dst), 0);
	tio_tcp_pair(&a0, &b0);
	tio_tcp_pair(&a1, &b1);
	assert_int_equal(xport_dst_add_stream(dst, b0, 0), 0);
	assert_int_equal(xport_dst_add_stream(dst, b0, 0), -EEXIST);
	assert_int_equal(xport_dst_add_stream(dst, b1, 2), -EINVAL);

	/* Stream 0 reached fence 1; stream 1 is not even there yet. */
	n = fence_frame(buf, 1);
	tio_write_all(a0, buf, n);
	int64_t t0 = tio_now_ms();
	assert_int_equal(xport_dst_wait_fence(dst, 1, 200), -ETIMEDOUT);
	int64_t took = tio_now_ms() - t0;
	assert_true(took >= 190 && took < 2000);

	/* Stream 1 arrives and stays silent. */
	assert_int_equal(xport_dst_add_stream(dst, b1, 1), 0);
	assert_int_equal(xport_dst_wait_fence(dst, 1, 100), -ETIMEDOUT);
	assert_int_equal(xport_dst_wait_fence(dst, 1, 0), -ETIMEDOUT);

	/* Now it sends its fence: the wait completes at once. */
	tio_write_all(a1, buf, n);
	assert_int_equal(xport_dst_wait_fence(dst, 1, 5000), 0);
	assert_int_equal(xport_dst_wait_fence(dst, 0, 0), 0);
	n = fence_frame(buf, 3);
	tio_write_all(a0, buf, n);
	tio_write_all(a1, buf, n);
	assert_int_equal(xport_dst_wait_fence(dst, 2, 5000), 0);
	assert_int_equal(xport_dst_wait_fence(dst, 3, 5000), 0);
	assert_int_equal(xport_dst_wait_fence(dst, 4, 50), -ETIMEDOUT);

	/* A stream closing after its last fence is fine for that fence... */
	close(a0);
	tio_sleep_ms(50);
	assert_int_equal(xport_dst_wait_fence(dst, 3, 1000), 0);
	assert_string_equal(xport_dst_error(dst), "");
	struct xport_dst_stats ds;
	xport_dst_stats(dst, &ds);
	assert_int_equal(ds.streams, 1);
	/* ...but not for a later one it can never reach. */
	assert_int_equal(xport_dst_wait_fence(dst, 4, 1000), -ECONNRESET);
	assert_non_null(strstr(xport_dst_error(dst), "stream 0 closed before fence 4"));

	xport_dst_free(dst);
	close(a1);
}

/* ---------------- source failures ---------------- */

struct send_job {
	struct xport_src *src;
	struct page_run run;
	int result;
	int64_t done_ms;
	unsigned batches;
};

static void *send_loop(void *arg)
{
	struct send_job *j = arg;

	/* Batch after batch until something fails (capped so a bug cannot hang the test). */
	for (j->batches = 0; j->batches < 1000; j->batches++) {
		j->result = xport_src_send(j->src, &j->run, 1, j->batches + 1);
		if (j->result < 0)
			break;
	}
	j->done_ms = tio_now_ms();
	return NULL;
}

static void peer_vanishes(void **state)
{
	struct big *b = *state;
	struct xport_region reg = { .hva = b->dst, .size = SRC_SIZE };
	struct xport_dst *dst = NULL;
	pthread_t th;

	assert_int_equal(xport_dst_tcp_new(&reg, 1, 4, &dst), 0);
	struct send_job j = { .run = { .region = 0, .first_page = 0, .npages = SRC_PAGES } };
	j.src = open_src(4, 0, &small_reader, b->src_fd, SRC_SIZE, dst, NULL);
	assert_int_equal(pthread_create(&th, NULL, send_loop, &j), 0);
	tio_sleep_ms(100);
	int64_t t0 = tio_now_ms();
	xport_dst_free(dst); /* closes every stream with data unread: the source sees resets */
	pthread_join(th, NULL);
	if (j.result != -ECONNRESET && j.result != -EPIPE)
		fail_msg("send returned %d (%s)", j.result, strerror(-j.result));
	assert_true(j.done_ms - t0 < 3000);
	/* Broken for good. */
	assert_int_equal(xport_src_send(j.src, &j.run, 1, 9999), j.result);
	xport_src_free(j.src);
}

static void *cancel_later(void *arg)
{
	tio_sleep_ms(300);
	xport_src_cancel(arg);
	return NULL;
}

static void cancel_stuck_send(void **state)
{
	struct big *b = *state;
	int held[4];
	pthread_t th;
	struct page_run run = { .region = 0, .first_page = 0, .npages = SRC_PAGES };

	/* Nobody reads the streams: 64 MiB cannot fit in the socket buffers. */
	for (uint64_t p = 0; p < SRC_PAGES; p++)
		b->src[p * PAGE] |= 1; /* no zero pages: every page is data */
	struct xport_src *src = open_src(4, 0, &small_reader, b->src_fd, SRC_SIZE, NULL, held);
	assert_int_equal(pthread_create(&th, NULL, cancel_later, src), 0);
	int64_t t0 = tio_now_ms();
	int r = xport_src_send(src, &run, 1, 1);
	int64_t took = tio_now_ms() - t0;
	pthread_join(th, NULL);
	assert_int_equal(r, -ECANCELED);
	assert_true(took >= 250 && took < 3000);
	assert_int_equal(xport_src_send(src, &run, 1, 2), -ECANCELED);
	xport_src_free(src);
	for (int i = 0; i < 4; i++)
		close(held[i]);
}

static void cancel_throttled_send(void **state)
{
	struct big *b = *state;
	pthread_t th;
	struct xport_region reg = { .hva = b->dst, .size = SRC_SIZE };
	struct xport_dst *dst = NULL;
	struct page_run run = { .region = 0, .first_page = 0, .npages = SRC_PAGES };

	/* 64 MiB at 1 MB/s would take a minute: cancel must cut the sleep short. */
	assert_int_equal(xport_dst_tcp_new(&reg, 1, 2, &dst), 0);
	struct xport_src *src = open_src(2, 1000000, &small_reader, b->src_fd, SRC_SIZE, dst, NULL);
	assert_int_equal(pthread_create(&th, NULL, cancel_later, src), 0);
	int64_t t0 = tio_now_ms();
	assert_int_equal(xport_src_send(src, &run, 1, 1), -ECANCELED);
	assert_true(tio_now_ms() - t0 < 3000);
	pthread_join(th, NULL);
	xport_src_free(src);
	xport_dst_free(dst);
}

static void bandwidth_cap(void **state)
{
	struct big *b = *state;
	struct xport_region reg = { .hva = b->dst, .size = SRC_SIZE };
	struct xport_dst *dst = NULL;
	/* 20 MB of data pages: 4883 pages. */
	struct page_run run = { .region = 0, .first_page = 1000, .npages = 4883 };

	for (uint64_t p = run.first_page; p < run.first_page + run.npages; p++)
		b->src[p * PAGE] |= 1;
	assert_int_equal(xport_dst_tcp_new(&reg, 1, 4, &dst), 0);
	struct xport_src *src =
		open_src(4, 50000000, &small_reader, b->src_fd, SRC_SIZE, dst, NULL);
	int64_t t0 = tio_now_ms();
	assert_int_equal(xport_src_send(src, &run, 1, 1), 0);
	int64_t took = tio_now_ms() - t0;
	assert_int_equal(xport_dst_wait_fence(dst, 1, 5000), 0);
	print_message("bandwidth cap 50 MB/s: 20 MB took %lld ms\n", (long long)took);
	assert_true(took >= 350);
	assert_true(took < 2000);

	/* Lifting the cap: the same batch goes faster. */
	int64_t capped = took;
	xport_src_set_bandwidth(src, 0);
	t0 = tio_now_ms();
	assert_int_equal(xport_src_send(src, &run, 1, 2), 0);
	took = tio_now_ms() - t0;
	assert_int_equal(xport_dst_wait_fence(dst, 2, 5000), 0);
	assert_true(took < capped);
	assert_memory_equal(b->dst + run.first_page * PAGE, b->src + run.first_page * PAGE,
			    (size_t)run.npages * PAGE);
	xport_src_free(src);
	xport_dst_free(dst);
}

static void src_connect_fails(void **state)
{
	struct big *b = *state;
	struct xport_src_config cfg = { .streams = 2, .reader = small_reader };
	struct xport_src *src = (struct xport_src *)&cfg;
	char err[256] = "", hp[64];
	uint16_t port;
	uint64_t size = SRC_SIZE;
	int l = tio_listen_any(&port);

	close(l); /* nobody listens there any more */
	snprintf(hp, sizeof(hp), "127.0.0.1:%u", port);
	assert_int_equal(xport_src_tcp_new(&cfg, hp, token, &b->src_fd, &size, 1, &src, err,
					   sizeof(err)),
			 -ECONNREFUSED);
	assert_non_null(strstr(err, "connect to"));
	assert_ptr_equal(src, (struct xport_src *)&cfg); /* untouched on failure */
	cfg.streams = 0;
	assert_int_equal(xport_src_tcp_new(&cfg, hp, token, &b->src_fd, &size, 1, &src, err,
					   sizeof(err)),
			 -EINVAL);
	/* Readers come first: a bad reader setting fails before any connection is tried. */
	cfg.streams = 3;
	cfg.reader.queue_depth = PAGEREADER_MAX_QUEUE_DEPTH + 1;
	assert_int_equal(xport_src_tcp_new(&cfg, hp, token, &b->src_fd, &size, 1, &src, err,
					   sizeof(err)),
			 -EINVAL);
	assert_non_null(strstr(err, "page reader"));
	assert_ptr_equal(src, (struct xport_src *)&cfg);
	xport_src_free(NULL);
	xport_dst_free(NULL);
}

/* ---------------- throughput (informative) ---------------- */

static void throughput(void **state)
{
	struct big *b = *state;
	struct xport_region reg = { .hva = b->dst, .size = SRC_SIZE };
	struct page_run run = { .region = 0, .first_page = 0, .npages = SRC_PAGES };
	/* Root pins freely; otherwise stay well inside a default 8 MiB memlock limit. */
	struct pagereader_config rc = geteuid() == 0
		? (struct pagereader_config){ .queue_depth = 16, .batch_pages = 64, .nr_buffers = 32 }
		: (struct pagereader_config){ .queue_depth = 8, .batch_pages = 32, .nr_buffers = 8 };
	static const unsigned streams[] = { 1, 4 };

	for (uint64_t p = 0; p < SRC_PAGES; p++)
		b->src[p * PAGE] |= 1; /* all data, no zero pages */
	for (unsigned k = 0; k < 2; k++) {
		struct xport_dst *dst = NULL;
		assert_int_equal(xport_dst_tcp_new(&reg, 1, streams[k], &dst), 0);
		struct xport_src *src = open_src(streams[k], 0, &rc, b->src_fd, SRC_SIZE, dst, NULL);
		/* Warm up (destination pages allocated), then measure. */
		assert_int_equal(xport_src_send(src, &run, 1, 1), 0);
		assert_int_equal(xport_dst_wait_fence(dst, 1, 10000), 0);
		struct timespec t0, t1;
		clock_gettime(CLOCK_MONOTONIC, &t0);
		unsigned rounds = 8;
		for (unsigned i = 0; i < rounds; i++)
			assert_int_equal(xport_src_send(src, &run, 1, 2 + i), 0);
		assert_int_equal(xport_dst_wait_fence(dst, 1 + rounds, 10000), 0);
		clock_gettime(CLOCK_MONOTONIC, &t1);
		double s = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
		print_message("throughput over loopback, %u stream%s: %.2f GB/s (%u x 64 MiB in "
			      "%.3f s)\n",
			      streams[k], streams[k] > 1 ? "s" : "",
			      (double)rounds * (double)SRC_SIZE / s / 1e9, rounds, s);
		assert_memory_equal(b->dst, b->src, SRC_SIZE);
		xport_src_free(src);
		xport_dst_free(dst);
	}
}

/* ---------------- control channel ---------------- */

struct ctl_pair {
	struct xctl *a; /* connected with xctl_connect */
	struct xctl *b; /* accepted, wrapped with xctl_from_fd */
};

static void ctl_open(struct ctl_pair *p)
{
	uint16_t port;
	int l = tio_listen_any(&port), fd;
	char hp[64], err[256] = "", want[64];

	snprintf(hp, sizeof(hp), "127.0.0.1:%u", port);
	if (xctl_connect(hp, 2000, &p->a, err, sizeof(err)) < 0)
		fail_msg("xctl_connect: %s", err);
	fd = accept(l, NULL, NULL);
	assert_true(fd >= 0);
	assert_int_equal(xctl_from_fd(fd, &p->b), 0);
	close(l);
	assert_string_equal(xctl_peer(p->a), hp);
	snprintf(want, sizeof(want), "127.0.0.1:");
	assert_memory_equal(xctl_peer(p->b), want, strlen(want));
}

static void ctl_close(struct ctl_pair *p)
{
	xctl_free(p->a);
	xctl_free(p->b);
}

static void expect_msg(struct xctl *c, uint16_t type, const void *payload, size_t len)
{
	uint16_t t = 0;
	void *p = NULL;
	size_t l = 0;
	char err[256] = "";

	int r = xctl_recv(c, &t, &p, &l, 5000, err, sizeof(err));
	if (r)
		fail_msg("xctl_recv: %d %s", r, err);
	assert_int_equal(t, type);
	assert_int_equal(l, len);
	if (len)
		assert_memory_equal(p, payload, len);
	free(p);
}

struct big_send {
	struct xctl *c;
	void *payload;
	size_t len;
	int result;
};

static void *big_send_main(void *arg)
{
	struct big_send *s = arg;

	s->result = xctl_send(s->c, PROTO_STATE, s->payload, s->len);
	return NULL;
}

static void ctl_roundtrip(void **state)
{
	(void)state;
	struct ctl_pair p;
	struct proto_round_end re = { .round = 3, .fence = 42, .pages = 1000, .remaining = 5 };
	void *enc;
	size_t enc_len;

	ctl_open(&p);
	assert_int_equal(proto_encode_round_end(&re, &enc, &enc_len), 0);
	assert_int_equal(xctl_send(p.a, PROTO_ROUND_END, enc, enc_len), 0);
	assert_int_equal(xctl_send(p.a, PROTO_COMMITTED, NULL, 0), 0);
	assert_int_equal(xctl_send(p.b, PROTO_ABORT, "xyz", 3), 0);
	expect_msg(p.b, PROTO_ROUND_END, enc, enc_len);
	expect_msg(p.b, PROTO_COMMITTED, NULL, 0);
	expect_msg(p.a, PROTO_ABORT, "xyz", 3);

	/* The decoded message survived the trip. */
	struct proto_round_end back;
	char err[128];
	assert_int_equal(proto_decode_round_end(enc, enc_len, &back, err, sizeof(err)), 0);
	assert_int_equal(back.fence, 42);
	free(enc);

	/* A big message while the peer reads concurrently (more than the socket buffers). */
	struct big_send bs = { .c = p.a, .len = 8u << 20 };
	bs.payload = malloc(bs.len);
	for (size_t i = 0; i < bs.len; i++)
		((uint8_t *)bs.payload)[i] = (uint8_t)tio_mix(i);
	pthread_t th;
	assert_int_equal(pthread_create(&th, NULL, big_send_main, &bs), 0);
	expect_msg(p.b, PROTO_STATE, bs.payload, bs.len);
	pthread_join(th, NULL);
	assert_int_equal(bs.result, 0);
	free(bs.payload);

	/* Over the control limit: refused before anything is sent. */
	assert_int_equal(xctl_send(p.a, PROTO_STATE, &p, PROTO_MAX_CTRL_PAYLOAD + 1), -EMSGSIZE);
	assert_int_equal(xctl_send(p.a, PROTO_COMMITTED, NULL, 0), 0);
	expect_msg(p.b, PROTO_COMMITTED, NULL, 0);
	ctl_close(&p);
}

static void ctl_timeout_resumes(void **state)
{
	(void)state;
	uint16_t port;
	int l = tio_listen_any(&port);
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(port),
				  .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	int raw = socket(AF_INET, SOCK_STREAM, 0);
	struct xctl *c;
	uint16_t t;
	void *pl = NULL;
	size_t len;
	char err[256];

	assert_int_equal(connect(raw, (struct sockaddr *)&sa, sizeof(sa)), 0);
	assert_int_equal(xctl_from_fd(accept(l, NULL, NULL), &c), 0);
	close(l);

	/* Nothing at all. */
	int64_t t0 = tio_now_ms();
	assert_int_equal(xctl_recv(c, &t, &pl, &len, 150, err, sizeof(err)), -ETIMEDOUT);
	assert_true(tio_now_ms() - t0 >= 140);
	assert_int_equal(xctl_recv(c, &t, &pl, &len, 0, err, sizeof(err)), -ETIMEDOUT);

	/* Half a header, then the rest of the header and half the payload, then the rest. */
	uint8_t buf[64];
	size_t n = frame(buf, PROTO_ABORT, "0123456789", 10);
	tio_write_all(raw, buf, 5);
	assert_int_equal(xctl_recv(c, &t, &pl, &len, 100, err, sizeof(err)), -ETIMEDOUT);
	tio_write_all(raw, buf + 5, 12);
	assert_int_equal(xctl_recv(c, &t, &pl, &len, 100, err, sizeof(err)), -ETIMEDOUT);
	tio_write_all(raw, buf + 17, n - 17);
	expect_msg(c, PROTO_ABORT, "0123456789", 10);

	/* The peer closes: -ECONNRESET, and it stays that way. */
	close(raw);
	assert_int_equal(xctl_recv(c, &t, &pl, &len, 2000, err, sizeof(err)), -ECONNRESET);
	assert_non_null(strstr(err, "closed"));
	assert_int_equal(xctl_recv(c, &t, &pl, &len, 0, err, sizeof(err)), -ECONNRESET);
	xctl_free(c);
}

static void *interrupt_later(void *arg)
{
	tio_sleep_ms(150);
	xctl_interrupt(arg);
	return NULL;
}

static void ctl_interrupt(void **state)
{
	(void)state;
	struct ctl_pair p;
	uint16_t t;
	void *pl = NULL;
	size_t len;
	char err[256];
	pthread_t th;

	ctl_open(&p);
	assert_int_equal(pthread_create(&th, NULL, interrupt_later, p.b), 0);
	int64_t t0 = tio_now_ms();
	assert_int_equal(xctl_recv(p.b, &t, &pl, &len, -1, err, sizeof(err)), -ECANCELED);
	assert_true(tio_now_ms() - t0 < 3000);
	pthread_join(th, NULL);
	/* One interrupt, one cancelled wait: the next wait times out normally... */
	assert_int_equal(xctl_recv(p.b, &t, &pl, &len, 50, err, sizeof(err)), -ETIMEDOUT);
	/* ...an interrupt before the wait is not lost... */
	xctl_interrupt(p.b);
	assert_int_equal(xctl_recv(p.b, &t, &pl, &len, 5000, err, sizeof(err)), -ECANCELED);
	/* ...and the channel still works. */
	assert_int_equal(xctl_send(p.a, PROTO_COMMITTED, NULL, 0), 0);
	expect_msg(p.b, PROTO_COMMITTED, NULL, 0);
	ctl_close(&p);
}

static void ctl_garbage(void **state)
{
	(void)state;
	static const char *const junk[] = {
		"GARBAGE GARBAGE GARBAGE",
		NULL, /* a valid header announcing more than the control limit */
		NULL, /* an unknown type */
	};

	for (size_t k = 0; k < sizeof(junk) / sizeof(junk[0]); k++) {
		int a, b;
		struct xctl *c;
		uint16_t t;
		void *pl = NULL;
		size_t len;
		char err[256] = "";
		uint8_t hdr[PROTO_HDR_LEN];

		tio_tcp_pair(&a, &b);
		assert_int_equal(xctl_from_fd(b, &c), 0);
		if (junk[k]) {
			tio_write_all(a, junk[k], strlen(junk[k]));
		} else if (k == 1) {
			proto_hdr_encode(hdr, PROTO_STATE, PROTO_MAX_CTRL_PAYLOAD + 1);
			tio_write_all(a, hdr, sizeof(hdr));
		} else {
			proto_hdr_encode(hdr, 200, 0);
			tio_write_all(a, hdr, sizeof(hdr));
		}
		assert_int_equal(xctl_recv(c, &t, &pl, &len, 2000, err, sizeof(err)), -EBADMSG);
		assert_non_null(strstr(err, "bad frame header"));
		/* Dead for good, with the same reason. */
		err[0] = '\0';
		assert_int_equal(xctl_recv(c, &t, &pl, &len, 0, err, sizeof(err)), -EBADMSG);
		assert_non_null(strstr(err, "bad frame header"));
		xctl_free(c);
		close(a);
	}
}

static void ctl_connect_errors(void **state)
{
	(void)state;
	struct xctl *c = (struct xctl *)&c;
	char err[256];
	uint16_t port;
	int l = tio_listen_any(&port);
	char hp[64];

	close(l);
	snprintf(hp, sizeof(hp), "127.0.0.1:%u", port);
	assert_int_equal(xctl_connect(hp, 1000, &c, err, sizeof(err)), -ECONNREFUSED);
	assert_non_null(strstr(err, "connect to"));
	static const char *const bad[] = { "nohostport", "::1:80", "[::1]80", "host:", ":80",
					   "[::1:80" };
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		err[0] = '\0';
		assert_int_equal(xctl_connect(bad[i], 1000, &c, err, sizeof(err)), -EINVAL);
		assert_non_null(strstr(err, "bad address"));
	}
	assert_ptr_equal(c, (struct xctl *)&c);
	assert_int_equal(xctl_from_fd(-1, &c), -EINVAL);
	xctl_free(NULL);

	/* IPv6 literal in brackets, where the host has IPv6. */
	int l6 = socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct sockaddr_in6 a6 = { .sin6_family = AF_INET6, .sin6_addr = IN6ADDR_LOOPBACK_INIT };
	socklen_t al = sizeof(a6);
	if (l6 >= 0 && bind(l6, (struct sockaddr *)&a6, sizeof(a6)) == 0 && listen(l6, 4) == 0 &&
	    getsockname(l6, (struct sockaddr *)&a6, &al) == 0) {
		snprintf(hp, sizeof(hp), "[::1]:%u", ntohs(a6.sin6_port));
		assert_int_equal(xctl_connect(hp, 1000, &c, err, sizeof(err)), 0);
		assert_string_equal(xctl_peer(c), hp);
		xctl_free(c);
	} else {
		print_message("no IPv6 loopback: [::1] case not run\n");
	}
	if (l6 >= 0)
		close(l6);

	/* A name that resolves. */
	l = tio_listen_any(&port);
	snprintf(hp, sizeof(hp), "localhost:%u", port);
	int r = xctl_connect(hp, 1000, &c, err, sizeof(err));
	if (r == 0)
		xctl_free(c);
	else /* localhost may resolve to ::1 first on a host without IPv6 listeners here */
		print_message("localhost: %s\n", err);
	close(l);
}

int main(void)
{
	/* A hang is a failure: SIGALRM kills the binary and ctest reports it. */
	alarm(280);
	/* Registered buffers are pinned; let a non-root run use its whole memlock allowance. */
	struct rlimit rl;
	if (getrlimit(RLIMIT_MEMLOCK, &rl) == 0) {
		rl.rlim_cur = rl.rlim_max;
		(void)setrlimit(RLIMIT_MEMLOCK, &rl);
	}

	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(transfer_1, big_setup, big_teardown),
		cmocka_unit_test_setup_teardown(transfer_4, big_setup, big_teardown),
		cmocka_unit_test_setup_teardown(transfer_8, big_setup, big_teardown),
		cmocka_unit_test_setup_teardown(transfer_fd_1, big_setup, big_teardown),
		cmocka_unit_test_setup_teardown(transfer_fd_4, big_setup, big_teardown),
		cmocka_unit_test_setup_teardown(resend_without_waiting, big_setup, big_teardown),
		cmocka_unit_test_setup_teardown(resend_without_waiting_fd, big_setup,
						big_teardown),
		cmocka_unit_test_setup_teardown(zero_pages_allocate_nothing, big_setup,
						big_teardown),
		cmocka_unit_test_setup_teardown(bad_runs, big_setup, big_teardown),
		cmocka_unit_test(write_outside_regions),
		cmocka_unit_test(garbage_on_stream),
		cmocka_unit_test(fence_timeout),
		cmocka_unit_test_setup_teardown(peer_vanishes, big_setup, big_teardown),
		cmocka_unit_test_setup_teardown(cancel_stuck_send, big_setup, big_teardown),
		cmocka_unit_test_setup_teardown(cancel_throttled_send, big_setup, big_teardown),
		cmocka_unit_test_setup_teardown(bandwidth_cap, big_setup, big_teardown),
		cmocka_unit_test_setup_teardown(src_connect_fails, big_setup, big_teardown),
		cmocka_unit_test(ctl_roundtrip),
		cmocka_unit_test(ctl_timeout_resumes),
		cmocka_unit_test(ctl_interrupt),
		cmocka_unit_test(ctl_garbage),
		cmocka_unit_test(ctl_connect_errors),
		cmocka_unit_test_setup_teardown(throughput, big_setup, big_teardown),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
