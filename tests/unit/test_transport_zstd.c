// SPDX-License-Identifier: Apache-2.0
/*
 * Description: compressed pages on the TCP data path (PAGES_ZSTD, protocol v2) over real
 * loopback sockets, memfds and threads. A 16 MiB source mixing compressible pages, random
 * pages and zero pages is sent compressed over 1 and 4 streams into guest memory, through
 * the region's memfd (pwrite) and through a userfaultfd (postcopy placement): every page
 * lands byte-exact, fewer bytes cross the wire than raw, and source and destination agree
 * on the counts. Random memory falls back to raw PAGES frames (no more bytes than without
 * compression). A compressing source into a destination that did not enable ZSTD, and a
 * plain source into one that did, behave as protocol v1 says. Hand-crafted PAGES_ZSTD
 * frames from a raw socket — corrupt blocks, a content size larger or smaller than the
 * header's pages, trailing bytes, an oversized frame, random mutations — disconnect the
 * stream with a reason naming the problem and write nothing outside the region (and
 * nothing at all when the frame failed its checks).
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <cmocka.h>
#include <zstd.h>

#include "tio.h"
#include "txport.h"

#include "transport/transport.h"

#define PAGE 4096u
#define NPAGES 4096u /* 16 MiB */
#define SIZE ((uint64_t)NPAGES * PAGE)

static const uint8_t token[XPORT_TOKEN_LEN] = "fedcba9876543210";

static const struct pagereader_config small_reader = {
	.queue_depth = 4, .batch_pages = 64, .nr_buffers = 4
};

/* A source to dst over `streams` streams (tx_src_open), compressing or not. */
static struct xport_src *open_src(unsigned streams, bool compress, int src_fd, uint64_t size,
				  struct xport_dst *dst)
{
	struct xport_src_config cfg = { .streams = streams, .reader = small_reader,
					.compress = compress };
	return tx_src_open(&cfg, token, &src_fd, &size, 1, dst);
}

/* Page kinds by page number: zero, random, text-like (compressible), half zero. */
static void fill_mixed(uint8_t *mem, bool all_random)
{
	for (uint64_t p = 0; p < NPAGES; p++) {
		uint8_t *pg = mem + p * PAGE;
		unsigned kind = all_random ? 1 : (unsigned)(tio_mix(p) % 4);
		switch (kind) {
		case 0:
			memset(pg, 0, PAGE);
			break;
		case 1:
			for (unsigned i = 0; i < PAGE / 8; i++) {
				uint64_t w = tio_mix(p * 4096 + i + 1);
				memcpy(pg + i * 8, &w, 8);
			}
			break;
		case 2:
			for (unsigned i = 0; i < PAGE; i++)
				pg[i] = (uint8_t)"the quick brown fox jumps over page "[i % 36] ^
					(uint8_t)(p & 7);
			break;
		default:
			memset(pg, 0, PAGE);
			for (unsigned i = 0; i < PAGE / 2; i++)
				pg[i] = (uint8_t)(i * p);
			break;
		}
	}
}

struct ends {
	int src_fd, dst_fd;
	uint8_t *src, *dst;
};

static void ends_open(struct ends *e)
{
	e->src = tio_memfd_map(SIZE, &e->src_fd);
	e->dst = tio_memfd_map(SIZE, &e->dst_fd);
}

static void ends_close(struct ends *e)
{
	munmap(e->src, SIZE);
	munmap(e->dst, SIZE);
	close(e->src_fd);
	close(e->dst_fd);
}

/* A few batches of runs over all of memory, then a changed hot set sent again. */
static void send_all(struct xport_src *src, struct xport_dst *dst, uint8_t *mem, bool random)
{
	struct page_run runs[4] = {
		{ .region = 0, .first_page = 0, .npages = NPAGES / 4 },
		{ .region = 0, .first_page = NPAGES / 4, .npages = NPAGES / 4 },
		{ .region = 0, .first_page = NPAGES / 2, .npages = NPAGES / 2 - 5 },
		{ .region = 0, .first_page = NPAGES - 5, .npages = 5 },
	};
	assert_int_equal(xport_src_send(src, runs, 2, 1), 0);
	assert_int_equal(xport_src_send(src, runs + 2, 2, 2), 0);
	/* Pages turn zero, zero pages turn data: the newest content must win. */
	for (unsigned k = 0; k < 64; k++) {
		uint64_t p = tio_mix(k + 99) % NPAGES;
		if (k % 2) {
			memset(mem + p * PAGE, 0, PAGE);
		} else if (random) {
			for (unsigned i = 0; i < PAGE / 8; i++) {
				uint64_t w = tio_rnd();
				memcpy(mem + p * PAGE + i * 8, &w, 8);
			}
		} else {
			memset(mem + p * PAGE, 0x30 + k, PAGE);
		}
		struct page_run r = { .region = 0, .first_page = p, .npages = 1 };
		assert_int_equal(xport_src_send(src, &r, 1, 3 + k), 0);
	}
	int r = xport_dst_wait_fence(dst, 3 + 63, 10000);
	if (r)
		fail_msg("wait_fence: %s: %s", strerror(-r), xport_dst_error(dst));
}

static void transfer(unsigned streams, bool via_fd, bool all_random)
{
	struct ends e;
	struct xport_dst *dst = NULL;

	ends_open(&e);
	fill_mixed(e.src, all_random);
	struct xport_region reg = { .hva = e.dst, .size = SIZE, .has_fd = via_fd,
				    .fd = via_fd ? e.dst_fd : -1 };
	assert_int_equal(xport_dst_tcp_new(&reg, 1, streams, &dst), 0);
	assert_int_equal(xport_dst_enable_zstd(dst), 0);
	struct xport_src *src = open_src(streams, true, e.src_fd, SIZE, dst);
	send_all(src, dst, e.src, all_random);
	if (memcmp(e.src, e.dst, SIZE)) {
		for (uint64_t p = 0; p < NPAGES; p++)
			if (memcmp(e.src + p * PAGE, e.dst + p * PAGE, PAGE))
				fail_msg("page %llu differs", (unsigned long long)p);
	}
	struct xport_src_stats ss;
	struct xport_dst_stats ds;
	xport_src_stats(src, &ss);
	xport_dst_stats(dst, &ds);
	assert_int_equal(ds.bytes, ss.bytes);
	assert_int_equal(ds.pages, ss.pages);
	assert_int_equal(ds.zero_pages, ss.zero_pages);
	assert_int_equal(ds.zstd_frames, ss.zstd_frames);
	print_message("%u streams%s%s: %llu pages, %llu zero, %llu raw bytes -> %llu on the wire "
		      "(%llu zstd frames)\n",
		      streams, via_fd ? ", via memfd" : "", all_random ? ", random" : "",
		      (unsigned long long)ss.pages, (unsigned long long)ss.zero_pages,
		      (unsigned long long)ss.raw_bytes, (unsigned long long)ss.bytes,
		      (unsigned long long)ss.zstd_frames);
	if (all_random) {
		/* Nothing compresses: every chunk went raw, not one byte more than raw. */
		assert_int_equal(ss.zstd_frames, 0);
		assert_int_equal(ss.bytes, ss.raw_bytes);
	} else {
		assert_true(ss.zstd_frames > 0);
		/* A quarter of the pages is random: at best ~1/4 + ~1/8 of the raw bytes. */
		assert_true(ss.bytes < ss.raw_bytes * 3 / 4);
	}
	assert_string_equal(xport_dst_error(dst), "");
	xport_src_free(src);
	xport_dst_free(dst);
	ends_close(&e);
}

static void compressed_1(void **state)
{
	(void)state;
	transfer(1, false, false);
}

static void compressed_4(void **state)
{
	(void)state;
	transfer(4, false, false);
}

static void compressed_fd_4(void **state)
{
	(void)state;
	transfer(4, true, false);
}

static void incompressible_goes_raw(void **state)
{
	(void)state;
	transfer(2, true, true);
}

/* Protocol v1 on either side: a plain source into a ZSTD-enabled destination works. */
static void plain_source_zstd_destination(void **state)
{
	(void)state;
	struct ends e;
	struct xport_dst *dst = NULL;

	ends_open(&e);
	fill_mixed(e.src, false);
	struct xport_region reg = { .hva = e.dst, .size = SIZE, .has_fd = true, .fd = e.dst_fd };
	assert_int_equal(xport_dst_tcp_new(&reg, 1, 2, &dst), 0);
	assert_int_equal(xport_dst_enable_zstd(dst), 0);
	struct xport_src *src = open_src(2, false, e.src_fd, SIZE, dst);
	send_all(src, dst, e.src, false);
	assert_memory_equal(e.src, e.dst, SIZE);
	struct xport_src_stats ss;
	xport_src_stats(src, &ss);
	assert_int_equal(ss.zstd_frames, 0);
	assert_int_equal(ss.bytes, ss.raw_bytes);
	xport_src_free(src);
	xport_dst_free(dst);
	ends_close(&e);
}

/* A destination that did not choose ZSTD refuses the first compressed frame. */
static void zstd_not_chosen(void **state)
{
	(void)state;
	struct ends e;
	struct xport_dst *dst = NULL;

	ends_open(&e);
	fill_mixed(e.src, false);
	struct xport_region reg = { .hva = e.dst, .size = SIZE };
	assert_int_equal(xport_dst_tcp_new(&reg, 1, 1, &dst), 0);
	struct xport_src *src = open_src(1, true, e.src_fd, SIZE, dst);
	struct page_run r = { .region = 0, .first_page = 0, .npages = NPAGES };
	(void)xport_src_send(src, &r, 1, 1); /* may fail once the destination hung up */
	assert_int_equal(xport_dst_wait_fence(dst, 1, 10000), -EPROTO);
	assert_non_null(strstr(xport_dst_error(dst), "ZSTD was not chosen"));
	xport_src_free(src);
	xport_dst_free(dst);
	ends_close(&e);
}

/* ---------------- postcopy placement (userfaultfd) ---------------- */

static void compressed_into_uffd(void **state)
{
	(void)state;
	struct ends e;
	struct xport_dst *dst = NULL;

	ends_open(&e);
	fill_mixed(e.src, false);
	int uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	struct uffdio_api api = { .api = UFFD_API };
	if (uffd < 0 || ioctl(uffd, UFFDIO_API, &api) < 0) {
		ends_close(&e);
		if (uffd >= 0)
			close(uffd);
		skip(); /* no userfaultfd for us (vm.unprivileged_userfaultfd = 0) */
	}
	struct uffdio_register reg_u = {
		.range = { .start = (uintptr_t)e.dst, .len = SIZE },
		.mode = UFFDIO_REGISTER_MODE_MISSING,
	};
	assert_int_equal(ioctl(uffd, UFFDIO_REGISTER, &reg_u), 0);
	/* Page 1 already there (the guest wrote it): a copy from the source must not win. */
	struct uffdio_copy cp = { .dst = (uintptr_t)e.dst + PAGE, .src = 0, .len = PAGE };
	static uint8_t mine[PAGE] __attribute__((aligned(4096)));
	memset(mine, 0xab, sizeof(mine));
	cp.src = (uintptr_t)mine;
	assert_int_equal(ioctl(uffd, UFFDIO_COPY, &cp), 0);

	struct xport_region reg = { .hva = e.dst, .size = SIZE, .has_fd = true, .fd = e.dst_fd };
	assert_int_equal(xport_dst_tcp_new(&reg, 1, 2, &dst), 0);
	assert_int_equal(xport_dst_enable_zstd(dst), 0);
	assert_int_equal(xport_dst_set_uffd(dst, 0, uffd), 0);
	struct xport_src *src = open_src(2, true, e.src_fd, SIZE, dst);
	struct page_run r = { .region = 0, .first_page = 0, .npages = NPAGES };
	assert_int_equal(xport_src_send(src, &r, 1, 1), 0);
	int w = xport_dst_wait_fence(dst, 1, 10000);
	if (w)
		fail_msg("wait_fence: %s: %s", strerror(-w), xport_dst_error(dst));
	struct xport_src_stats ss;
	xport_src_stats(src, &ss);
	assert_true(ss.zstd_frames > 0);
	/* Every page is placed now: reading the mapping faults nothing. */
	for (uint64_t p = 0; p < NPAGES; p++) {
		const uint8_t *want = p == 1 ? mine : e.src + p * PAGE;
		if (memcmp(e.dst + p * PAGE, want, PAGE))
			fail_msg("page %llu differs", (unsigned long long)p);
	}
	xport_src_free(src);
	xport_dst_free(dst);
	close(uffd);
	ends_close(&e);
}

/* ---------------- hand-crafted PAGES_ZSTD frames ---------------- */

/* A region between guard pages: tx_guarded (tests/util/txport.h). */

static void guarded_expect(struct tx_guarded *g, const char *reason_part)
{
	int r = xport_dst_wait_fence(g->dst, 1, 5000);

	if (r >= 0 || r == -ETIMEDOUT)
		fail_msg("wait_fence %d, want an error; reason \"%s\"", r, xport_dst_error(g->dst));
	if (!strstr(xport_dst_error(g->dst), reason_part))
		fail_msg("reason \"%s\" lacks \"%s\"", xport_dst_error(g->dst), reason_part);
	tx_peer_closed(g->src_fd); /* disconnected */
}

static uint8_t frame_buf[PROTO_HDR_LEN + 2 * PAGE * TX_REG_PAGES];

/*
 * A PAGES_ZSTD frame for pages first..first+npages (none zero) of `content` compressed,
 * into frame_buf; returns its length. content_len may differ from npages pages (a lie).
 */
static size_t zframe(uint64_t first, uint32_t npages, const uint8_t *content,
		     size_t content_len)
{
	struct proto_pages ph = { .region = 0, .first_page = first, .npages = npages };
	uint8_t *p = frame_buf + PROTO_HDR_LEN;
	size_t hl = proto_encode_pages_hdr(&ph, p, PROTO_PAGES_HDR_LEN(PROTO_PAGES_MAX));
	assert_true(hl > 0);
	size_t z = ZSTD_compress(p + hl, sizeof(frame_buf) - PROTO_HDR_LEN - hl, content,
				 content_len, 1);
	assert_false(ZSTD_isError(z));
	proto_hdr_encode(frame_buf, PROTO_PAGES_ZSTD, (uint32_t)(hl + z));
	return PROTO_HDR_LEN + hl + z;
}

static uint8_t content[PAGE * (TX_REG_PAGES + 2)];

static void bad_zstd_frames(void **state)
{
	(void)state;
	struct tx_guarded g;
	size_t n;

	for (size_t i = 0; i < sizeof(content); i++)
		content[i] = (uint8_t)(0x40 + i / 1000);

	/* A good frame lands: the path works before we break it. */
	tx_guarded_open(&g, 1, true);
	n = zframe(2, 3, content, 3 * PAGE);
	tio_write_all(g.src_fd, frame_buf, n);
	struct proto_fence f = { .fence = 1 };
	void *fp;
	size_t fl;
	assert_int_equal(proto_encode_fence(&f, &fp, &fl), 0);
	uint8_t fb[64];
	proto_hdr_encode(fb, PROTO_FENCE, (uint32_t)fl);
	memcpy(fb + PROTO_HDR_LEN, fp, fl);
	free(fp);
	tio_write_all(g.src_fd, fb, PROTO_HDR_LEN + fl);
	assert_int_equal(xport_dst_wait_fence(g.dst, 1, 5000), 0);
	assert_memory_equal(g.region + 2 * PAGE, content, 3 * PAGE);
	tx_guarded_check(&g, false);
	tx_guarded_close(&g);

	/* Oversized: the zstd frame holds a page more than the header's pages. */
	tx_guarded_open(&g, 1, true);
	n = zframe(TX_REG_PAGES - 2, 2, content, 3 * PAGE);
	tio_write_all(g.src_fd, frame_buf, n);
	guarded_expect(&g, "stream 0: bad PAGES_ZSTD: pages_zstd: zstd frame of 12288 bytes");
	tx_guarded_check(&g, true);
	tx_guarded_close(&g);

	/* Undersized: a page less. */
	tx_guarded_open(&g, 1, true);
	n = zframe(0, 3, content, 2 * PAGE);
	tio_write_all(g.src_fd, frame_buf, n);
	guarded_expect(&g, "the header's pages are 12288");
	tx_guarded_check(&g, true);
	tx_guarded_close(&g);

	/* Corrupt blocks behind a valid frame header: decompression fails, nothing lands. */
	tx_guarded_open(&g, 1, true);
	n = zframe(0, 4, content, 4 * PAGE);
	size_t zstart = PROTO_HDR_LEN + PROTO_PAGES_HDR_LEN(4);
	/* Magic (4) + frame header (2 bytes + content size) + block header (3): then block. */
	for (size_t i = zstart + 12; i < n; i++)
		frame_buf[i] = 0xff;
	tio_write_all(g.src_fd, frame_buf, n);
	guarded_expect(&g, "stream 0: PAGES_ZSTD pages 0..3 of region 0:");
	tx_guarded_check(&g, true);
	tx_guarded_close(&g);

	/* Trailing bytes after the zstd frame. */
	tx_guarded_open(&g, 1, true);
	n = zframe(0, 2, content, 2 * PAGE);
	frame_buf[n] = 0;
	proto_hdr_encode(frame_buf, PROTO_PAGES_ZSTD, (uint32_t)(n + 1 - PROTO_HDR_LEN));
	tio_write_all(g.src_fd, frame_buf, n + 1);
	guarded_expect(&g, "bytes follow it");
	tx_guarded_check(&g, true);
	tx_guarded_close(&g);

	/* Pages outside the region, compressed. */
	tx_guarded_open(&g, 1, true);
	n = zframe(TX_REG_PAGES - 1, 2, content, 2 * PAGE);
	tio_write_all(g.src_fd, frame_buf, n);
	guarded_expect(&g, "PAGES_ZSTD 15..16 outside region 0");
	tx_guarded_check(&g, true);
	tx_guarded_close(&g);

	/* A frame longer than any raw PAGES frame: refused before its payload is read. */
	tx_guarded_open(&g, 1, true);
	proto_hdr_encode(frame_buf, PROTO_PAGES_ZSTD, PROTO_PAGES_MAX * PAGE + 8192);
	tio_write_all(g.src_fd, frame_buf, PROTO_HDR_LEN);
	guarded_expect(&g, "PAGES_ZSTD frame of");
	tx_guarded_check(&g, true);
	tx_guarded_close(&g);

	/* PAGES_ZSTD where ZSTD was not chosen (a v1 migration). */
	tx_guarded_open(&g, 1, false);
	n = zframe(0, 2, content, 2 * PAGE);
	tio_write_all(g.src_fd, frame_buf, n);
	guarded_expect(&g, "ZSTD was not chosen");
	tx_guarded_check(&g, true);
	tx_guarded_close(&g);

	/* Random mutations of a good frame: an error or a landing, never outside the region. */
	unsigned errors = 0;
	for (int iter = 0; iter < 150; iter++) {
		tx_guarded_open(&g, 1, true);
		n = zframe(tio_rnd() % (TX_REG_PAGES - 3), 3, content, 3 * PAGE);
		unsigned flips = 1 + (unsigned)(tio_rnd() % 4);
		for (unsigned k = 0; k < flips; k++) {
			size_t at = PROTO_HDR_LEN + tio_rnd() % (n - PROTO_HDR_LEN);
			frame_buf[at] ^= (uint8_t)(1u << (tio_rnd() % 8));
		}
		tio_write_all(g.src_fd, frame_buf, n);
		shutdown(g.src_fd, SHUT_WR); /* no fence follows: any wait ends in an error */
		int r = xport_dst_wait_fence(g.dst, 1, 5000);
		assert_true(r < 0 && r != -ETIMEDOUT);
		if (r == -EPROTO)
			errors++;
		tx_guarded_check(&g, false);
		tx_guarded_close(&g);
	}
	assert_true(errors > 0);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(compressed_1),
		cmocka_unit_test(compressed_4),
		cmocka_unit_test(compressed_fd_4),
		cmocka_unit_test(incompressible_goes_raw),
		cmocka_unit_test(plain_source_zstd_destination),
		cmocka_unit_test(zstd_not_chosen),
		cmocka_unit_test(compressed_into_uffd),
		cmocka_unit_test(bad_zstd_frames),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
