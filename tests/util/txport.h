/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Transport test helpers (library ferry_testxport, on top of tio.h): a source connected to
 * a destination the way the agents wire them, and a destination region between guard
 * pages for the bad-frame tests. Every helper fails the running cmocka test on an error.
 */
#ifndef FERRY_TEST_TXPORT_H
#define FERRY_TEST_TXPORT_H

#include <stdbool.h>
#include <stdint.h>

#include "transport/transport.h"

/*
 * Opens a TCP source (cfg, token, its regions) to a fresh loopback listener and plays the
 * agent's part for each of its cfg->streams streams: accepts it, checks its STREAM_HELLO
 * (the token; an index below the count, each once) and hands it to dst at that index.
 */
struct xport_src *tx_src_open(const struct xport_src_config *cfg,
			      const uint8_t token[XPORT_TOKEN_LEN], const int *fds,
			      const uint64_t *sizes, unsigned nr, struct xport_dst *dst);

/* The same, but a stream whose bit is set in hold_mask (or every one, dst NULL) is not
 * handed over: its raw fd goes to held_fds[index], for nobody to read. */
struct xport_src *tx_src_open_hold(const struct xport_src_config *cfg,
				   const uint8_t token[XPORT_TOKEN_LEN], const int *fds,
				   const uint64_t *sizes, unsigned nr, struct xport_dst *dst,
				   int *held_fds, uint64_t hold_mask);

/* Our end of a stream must be shut by the destination: it reads EOF (or a reset). */
void tx_peer_closed(int fd);

#define TX_GUARD_PAGES 8u
#define TX_REG_PAGES 16u

/*
 * A TCP destination over one region of TX_REG_PAGES pages (filled with 0x11) with
 * TX_GUARD_PAGES of 0xee on each side, expecting `streams` streams (zstd: PAGES_ZSTD
 * accepted); stream 0 is connected, its raw other end in src_fd.
 */
struct tx_guarded {
	uint8_t *map;
	uint8_t *region;
	struct xport_dst *dst;
	int src_fd;
};
void tx_guarded_open(struct tx_guarded *g, unsigned streams, bool zstd);
/* Nothing outside the region changed; with region_untouched nothing inside either. */
void tx_guarded_check(const struct tx_guarded *g, bool region_untouched);
void tx_guarded_close(struct tx_guarded *g);

#endif
