/* SPDX-License-Identifier: Apache-2.0 */
/*
 * transport: how pages and control messages travel between two agents.
 *
 * DESIGN.md rule 4: the data path is one-sided writes of page runs into the destination's
 * registered guest memory, plus small ordered control messages; a control message sent
 * after a batch of writes is acted on by the destination only after those writes landed.
 * Three objects express that, each a struct of function pointers over a backend (Redis's
 * connection.h shape), so the RDMA backend slots in beside TCP without touching the engine:
 *
 *   struct xctl      the control channel: framed, ordered, bounds-checked messages
 *                    (proto.h) in both directions, with timeouts.
 *   struct xport_src the source's data path: N parallel streams, each with its own page
 *                    reader (io_uring READ_FIXED from the guest memfds into registered
 *                    buffers, pagereader.h), sending page runs (zero pages as markers) and
 *                    closing each batch with a FENCE on every stream.
 *   struct xport_dst the destination's data path: guest memory registered as regions,
 *                    stream receivers that write pages straight into them (refusing any
 *                    write outside a region), and per-stream fence tracking so the control
 *                    side can wait until every stream passed a fence.
 *
 * Ordering: the engine calls xport_src_send(runs, fence=f) and only then sends a control
 * message naming fence f (ROUND_END, STATE, COMMIT); the destination calls
 * xport_dst_wait_fence(f) before acting on it. TCP implements the fence as a FENCE frame
 * at the end of each stream's batch; RDMA as a SEND after the WRITEs on each QP.
 *
 * Threads: an xport_src is driven by one engine thread; xport_src_cancel() may be called
 * from any thread. An xport_dst runs one receiver thread per stream; its other calls come
 * from the one control thread.
 */
#ifndef FERRY_TRANSPORT_H
#define FERRY_TRANSPORT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "transport/pagereader.h"
#include "transport/proto.h"

#define XPORT_MAX_STREAMS 64u
#define XPORT_MAX_REGIONS 64u
#define XPORT_TOKEN_LEN 16u

/* ---------------- control channel ---------------- */

struct xctl;

/* Connects to "host:port" (IPv4, [IPv6] or a name), within timeout_ms. */
int xctl_connect(const char *hostport, int timeout_ms, struct xctl **ret, char *err,
		 size_t errlen);
/* Wraps an accepted, connected socket (taken over: closed by xctl_free). */
int xctl_from_fd(int fd, struct xctl **ret);
void xctl_free(struct xctl *c);
/* Sends one message; the payload is already encoded (proto.h). */
int xctl_send(struct xctl *c, uint16_t type, const void *payload, size_t len);
/*
 * Receives one message into a malloc'd buffer (caller frees *ret_payload). -ETIMEDOUT when
 * nothing complete arrived within timeout_ms (<0 = forever), -ECONNRESET when the peer
 * closed, -EBADMSG for a malformed frame (the channel is then dead; err says why).
 */
int xctl_recv(struct xctl *c, uint16_t *ret_type, void **ret_payload, size_t *ret_len,
	      int timeout_ms, char *err, size_t errlen);
/* Makes a blocked xctl_recv() return -ECANCELED (from any thread). */
void xctl_interrupt(struct xctl *c);
/* "ip:port" of the peer, for logs. */
const char *xctl_peer(const struct xctl *c);

/* ---------------- source data path ---------------- */

struct xport_src_config {
	unsigned streams;            /* 1..XPORT_MAX_STREAMS */
	uint64_t bandwidth;          /* bytes/s over all streams, 0 = unlimited */
	struct pagereader_config reader; /* per stream */
};

struct xport_src_stats {
	uint64_t bytes;       /* bytes put on the wire (frames included) */
	uint64_t pages;       /* pages sent with data */
	uint64_t zero_pages;  /* pages sent as zero markers */
	uint64_t batches;     /* xport_src_send calls completed */
};

struct xport_src;

/*
 * Opens cfg->streams data connections to hostport, each introduced by a STREAM_HELLO
 * carrying the token the destination handed out (proto.h), and a page reader per stream
 * over the given guest memory files (region i = file region_fds[i], bytes 0..sizes[i]).
 */
int xport_src_tcp_new(const struct xport_src_config *cfg, const char *hostport,
		      const uint8_t token[XPORT_TOKEN_LEN], const int *region_fds,
		      const uint64_t *region_sizes, unsigned nr_regions, struct xport_src **ret,
		      char *err, size_t errlen);
/*
 * Reads and sends every page of runs[0..n) (spread over the streams), then closes the batch
 * with fence `fence` on every stream. Returns when all of it was handed to the kernel.
 * -ECANCELED after xport_src_cancel(); -EPIPE/-ECONNRESET when the peer went away.
 */
int xport_src_send(struct xport_src *x, const struct page_run *runs, unsigned n, uint64_t fence);
/* Changes the bandwidth cap for the following sends (the scheduler's share). */
void xport_src_set_bandwidth(struct xport_src *x, uint64_t bytes_per_sec);
void xport_src_cancel(struct xport_src *x);
void xport_src_stats(const struct xport_src *x, struct xport_src_stats *ret);
const char *xport_src_name(const struct xport_src *x); /* "tcp" */
void xport_src_free(struct xport_src *x);

/* ---------------- destination data path ---------------- */

/* Guest memory the source may write: region id = index in the array. */
struct xport_region {
	void *hva;
	uint64_t size; /* bytes, multiple of 4096 */
};

struct xport_dst_stats {
	uint64_t bytes;
	uint64_t pages;
	uint64_t zero_pages;
	unsigned streams;     /* receivers running */
};

struct xport_dst;

int xport_dst_tcp_new(const struct xport_region *regions, unsigned nr_regions,
		      unsigned expected_streams, struct xport_dst **ret);
/*
 * Hands an accepted data connection (its STREAM_HELLO already read and matched by the
 * agent) to a new receiver thread. Taken over: closed by xport_dst_free.
 */
int xport_dst_add_stream(struct xport_dst *x, int fd, unsigned stream_index);
/*
 * Waits until every expected stream has passed fence `fence` (all their writes landed).
 * -ETIMEDOUT, or the first receiver error (a stream that sent a bad frame or a write
 * outside the regions is disconnected; xport_dst_error() says why).
 */
int xport_dst_wait_fence(struct xport_dst *x, uint64_t fence, int timeout_ms);
/* First receiver error ("" if none). */
const char *xport_dst_error(const struct xport_dst *x);
void xport_dst_stats(const struct xport_dst *x, struct xport_dst_stats *ret);
/* Stops the receivers (they refuse any further write), closes the streams. NULL-safe. */
void xport_dst_free(struct xport_dst *x);

#endif
