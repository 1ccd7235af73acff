// SPDX-License-Identifier: Apache-2.0
/* Transport test helpers (txport.h). */
#include "txport.h"

#include <poll.h>
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmocka.h>

#include "tio.h"
#include "transport/proto.h"

#define PAGE 4096u

struct xport_src *tx_src_open(const struct xport_src_config *cfg,
			      const uint8_t token[XPORT_TOKEN_LEN], const int *fds,
			      const uint64_t *sizes, unsigned nr, struct xport_dst *dst)
{
	return tx_src_open_hold(cfg, token, fds, sizes, nr, dst, NULL, 0);
}

struct xport_src *tx_src_open_hold(const struct xport_src_config *cfg,
				   const uint8_t token[XPORT_TOKEN_LEN], const int *fds,
				   const uint64_t *sizes, unsigned nr, struct xport_dst *dst,
				   int *held_fds, uint64_t hold_mask)
{
	struct xport_src *src = NULL;
	char err[256] = "", hp[64];
	uint16_t port;
	int l = tio_listen_any(&port);

	snprintf(hp, sizeof(hp), "127.0.0.1:%u", port);
	/* The listener's backlog completes every connect before anyone accepts. */
	int r = xport_src_tcp_new(cfg, hp, token, fds, sizes, nr, &src, err, sizeof(err));
	if (r < 0)
		fail_msg("xport_src_tcp_new: %s (%s)", strerror(-r), err);
	bool seen[XPORT_MAX_STREAMS] = { false };
	for (unsigned i = 0; i < cfg->streams; i++) {
		int fd = accept(l, NULL, NULL);
		uint8_t hdr[PROTO_HDR_LEN], payload[64];
		struct proto_hdr h;
		struct proto_stream_hello sh;

		assert_true(fd >= 0);
		tio_read_all(fd, hdr, sizeof(hdr));
		assert_int_equal(proto_hdr_decode(hdr, sizeof(payload), &h), 0);
		assert_int_equal(h.type, PROTO_STREAM_HELLO);
		tio_read_all(fd, payload, h.len);
		assert_int_equal(proto_decode_stream_hello(payload, h.len, &sh, err, sizeof(err)),
				 0);
		assert_memory_equal(sh.token, token, XPORT_TOKEN_LEN);
		assert_true(sh.stream < cfg->streams);
		assert_false(seen[sh.stream]);
		seen[sh.stream] = true;
		if (dst && !((hold_mask >> sh.stream) & 1)) {
			assert_int_equal(xport_dst_add_stream(dst, fd, sh.stream), 0);
		} else {
			assert_non_null(held_fds);
			held_fds[sh.stream] = fd;
		}
	}
	close(l);
	return src;
}

void tx_peer_closed(int fd)
{
	struct pollfd pfd = { .fd = fd, .events = POLLIN };
	char c;

	assert_int_equal(poll(&pfd, 1, 5000), 1);
	assert_true(recv(fd, &c, 1, 0) <= 0);
}

static size_t guarded_len(void)
{
	return (size_t)(TX_REG_PAGES + 2 * TX_GUARD_PAGES) * PAGE;
}

void tx_guarded_open(struct tx_guarded *g, unsigned streams, bool zstd)
{
	int fd;

	g->map = mmap(NULL, guarded_len(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
		      -1, 0);
	assert_true(g->map != MAP_FAILED);
	memset(g->map, 0xee, guarded_len());
	g->region = g->map + TX_GUARD_PAGES * PAGE;
	memset(g->region, 0x11, TX_REG_PAGES * PAGE);
	struct xport_region reg = { .hva = g->region, .size = TX_REG_PAGES * PAGE };
	assert_int_equal(xport_dst_tcp_new(&reg, 1, streams, &g->dst), 0);
	if (zstd)
		assert_int_equal(xport_dst_enable_zstd(g->dst), 0);
	tio_tcp_pair(&g->src_fd, &fd);
	assert_int_equal(xport_dst_add_stream(g->dst, fd, 0), 0);
}

void tx_guarded_check(const struct tx_guarded *g, bool region_untouched)
{
	for (size_t i = 0; i < TX_GUARD_PAGES * PAGE; i++) {
		assert_int_equal(g->map[i], 0xee);
		assert_int_equal(g->region[TX_REG_PAGES * PAGE + i], 0xee);
	}
	if (region_untouched)
		for (size_t i = 0; i < TX_REG_PAGES * PAGE; i++)
			assert_int_equal(g->region[i], 0x11);
}

void tx_guarded_close(struct tx_guarded *g)
{
	xport_dst_free(g->dst);
	close(g->src_fd);
	munmap(g->map, guarded_len());
}
