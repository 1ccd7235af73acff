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
 *                    buffers, pagereader.h), sending page runs (zero pages as markers,
 *                    the other pages raw or — TCP with ZSTD chosen — as one zstd frame per
 *                    chunk) and closing each batch with a FENCE on every stream.
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
/*
 * The two ends' IP addresses as literals without port or brackets (len bytes each): where
 * an RDMA data path between the same two hosts is set up. -errno when unknown.
 */
int xctl_addrs(const struct xctl *c, char *local_ip, char *peer_ip, size_t len);

/* ---------------- source data path ---------------- */

struct xport_src_config {
	unsigned streams;            /* 1..XPORT_MAX_STREAMS */
	uint64_t bandwidth;          /* bytes/s over all streams, 0 = unlimited */
	struct pagereader_config reader; /* per stream */
	/*
	 * TCP only, and only when the destination chose PROTO_CAP_ZSTD (protocol v2): each
	 * chunk's non-zero pages go as one zstd frame (PAGES_ZSTD) with a compression context
	 * per stream, at compress_level (0 = XPORT_ZSTD_DEFAULT_LEVEL). A chunk that does not
	 * shrink below 7/8 of its raw size goes raw (PAGES), so incompressible memory costs
	 * one failed attempt, never more bytes on the wire. The RDMA source ignores it.
	 */
	bool compress;
	int compress_level;          /* 1..XPORT_ZSTD_MAX_LEVEL, 0 = default */
};
#define XPORT_ZSTD_DEFAULT_LEVEL 1 /* fast: the link is shared with a CPU that has work too */
#define XPORT_ZSTD_MAX_LEVEL 19

struct xport_src_stats {
	uint64_t bytes;       /* bytes put on the wire (frames included; compressed as sent) */
	uint64_t raw_bytes;   /* what the same frames would have been without compression
			       * (== bytes when nothing was compressed) */
	uint64_t pages;       /* pages sent with data */
	uint64_t zero_pages;  /* pages sent as zero markers */
	uint64_t zstd_frames; /* PAGES_ZSTD frames sent (chunks that compressed well enough) */
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
/*
 * Waits until what was sent has left this host (TCP: every stream's send queue is empty,
 * i.e. the peer acknowledged it), so that a send's duration measures the link, not how
 * much the socket buffers absorbed. 0, or -ETIMEDOUT. RDMA: its sends complete only when
 * the peer answered, nothing to wait for.
 */
int xport_src_drain(struct xport_src *x, int timeout_ms);
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
	/*
	 * Optional: the file behind hva (bytes 0..size of fd, a memfd). With it the TCP
	 * receivers write pages with pwrite() instead of copying into the mapping: fresh
	 * pages then enter the page cache without being cleared first (a whole-page write
	 * needs no zeroing) and without a page-table entry each, which is what receiving
	 * into a new guest costs most (docs/benchmarks.md). Not taken over.
	 */
	bool has_fd;
	int fd;
};

struct xport_dst_stats {
	uint64_t bytes;       /* bytes received, frames included (compressed as received) */
	uint64_t pages;
	uint64_t zero_pages;
	uint64_t zstd_frames; /* PAGES_ZSTD frames received */
	unsigned streams;     /* receivers running */
	uint64_t read_pages;  /* RDMA: pages fetched by RDMA READ and placed (postcopy) */
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
 * Accept PAGES_ZSTD frames (the WELCOME chose PROTO_CAP_ZSTD): each receiver gets a zstd
 * decompression context and decompresses a frame's page bytes into its bounce buffer —
 * exactly the raw size the frame's header announces, or the stream fails with a reason —
 * then places them as it places raw pages (memory, memfd pwrite or userfaultfd). Without
 * it a PAGES_ZSTD frame is a protocol error. Call before the first xport_dst_add_stream.
 * -EOPNOTSUPP on an RDMA destination (its NIC writes, nothing to decompress).
 */
int xport_dst_enable_zstd(struct xport_dst *x);
/*
 * Waits until every expected stream has passed fence `fence` (all their writes landed).
 * Fence 0 comes before every batch (sources number batches from 1): passed at once, even
 * by streams that never sent anything (a receiver error is still reported).
 * -ETIMEDOUT, or the first receiver error (a stream that sent a bad frame or a write
 * outside the regions is disconnected; xport_dst_error() says why).
 */
int xport_dst_wait_fence(struct xport_dst *x, uint64_t fence, int timeout_ms);
/* First receiver error ("" if none). */
const char *xport_dst_error(const struct xport_dst *x);
void xport_dst_stats(const struct xport_dst *x, struct xport_dst_stats *ret);
/* Stops the receivers (they refuse any further write), closes the streams. NULL-safe. */
void xport_dst_free(struct xport_dst *x);

/*
 * Places len bytes of whole pages at dst through userfaultfd uffd: copies of src, or zero
 * pages when src is NULL. The kernel installs a page only where the file has none and wakes
 * every thread waiting on it. A page already there (EEXIST) is left alone: in postcopy it
 * came by another path and the guest may have written it since. Adds the pages installed
 * and those left alone to *ret_placed / *ret_existing (either may be NULL). 0 or -errno.
 */
int xport_uffd_place(int uffd, void *dst, const void *src, uint64_t len, uint64_t *ret_placed,
		     uint64_t *ret_existing);
/*
 * Postcopy: from now on the receivers place the pages of `region` through userfaultfd
 * `uffd` (duplicated; closed by xport_dst_free) with UFFDIO_COPY / UFFDIO_ZEROPAGE on its
 * hva, instead of writing them: a page is installed only where the guest memory has none,
 * and whoever waits for it in a MISSING fault (a vCPU) is woken. A page already there is left
 * as it is and counts as delivered — the destination's guest may have written it since, so
 * a copy from the source can only be older. The region's hva range must be registered with
 * uffd in MISSING mode (agent/postcopy.h) and stay so while pages may arrive. Call it once
 * per region, between batches (after xport_dst_wait_fence of the source's last precopy
 * fence and before the source sends postcopy pages): a frame is placed by whichever mode
 * its receiver saw when the frame began. -EALREADY the second time, -EINVAL for a bad
 * region or fd. On an RDMA destination the NIC's WRITEs cannot be placed: there it is
 * xport_dst_rdma_fetch() that places the region's pages through uffd from now on, and the
 * region's registration for remote write is dropped (a later WRITE fails on the NIC, and
 * the pages the registration pinned — punched out of the memfd by postcopy — are freed).
 */
int xport_dst_set_uffd(struct xport_dst *x, unsigned region, int uffd);

/* ---------------- RDMA backend (rdma.c, rdma_src.c, rdma_dst.c) ---------------- */
/*
 * The same objects over RDMA (docs/protocol.md §11): librdmacm sets up one RC queue pair
 * per stream, the token and stream index travel in the connection's private data, and the
 * data path is libibverbs. The destination registers its guest memory for remote write and
 * hands out addresses and keys; the source reads dirty runs into its page readers'
 * registered buffers and RDMA-WRITEs them straight into that memory, then closes each batch
 * with a FENCE SEND on every queue pair (it lands after the WRITEs before it). The keys live
 * as long as the struct xport_dst: after xport_dst_free no write from the source can land.
 * The constructors return -errno with a reason in err; xport_src_name() is "rdma".
 */

/*
 * Whether RDMA can be used from here: a device whose port is active, bound to local_ip
 * (an IPv4/IPv6 literal) or, with local_ip NULL, any device with an active port. When not,
 * why says what is missing ("no RDMA device", "10.0.0.1 is not on an RDMA device", ...).
 * Must be called in the network namespace the transport will run in.
 */
bool xport_rdma_usable(const char *local_ip, char *why, size_t len);

/* dst flags */
/*
 * Every page of the regions reads as zero now (fresh guest memory, no vCPU ran): the
 * source may skip a zero page it never wrote. Without it, the source writes every zero
 * page once (zeros over whatever the page held) before it may skip it.
 */
#define XPORT_RDMA_DST_ZEROED (1u << 0)

/*
 * Registers the regions for remote write (the pages are pinned: registering faults every
 * page in, and needs RLIMIT_MEMLOCK or CAP_IPC_LOCK for all of guest memory), listens with
 * rdma_cm on bind_ip (a literal address of an RDMA device) at an ephemeral port and, in a
 * thread of its own, accepts expected_qps connections whose private data carries this
 * token and a distinct index below expected_qps; anything else is rejected. Regions must be
 * page aligned. xport_dst_add_stream() is -EOPNOTSUPP on it; the rest of xport_dst_* works
 * as for TCP, and xport_dst_error() says why a queue pair died.
 */
int xport_dst_rdma_new(const struct xport_region *regions, unsigned nr_regions,
		       unsigned expected_qps, unsigned flags, const char *bind_ip,
		       const uint8_t token[XPORT_TOKEN_LEN], struct xport_dst **ret, char *err,
		       size_t errlen);
/* The port it listens on (host order); 0 if x is not an RDMA destination. */
uint16_t xport_dst_rdma_port(const struct xport_dst *x);

/*
 * Connects cfg->streams queue pairs to ip:port (each waits for the destination's region
 * table before this returns), with a page reader per queue pair whose buffer area is
 * registered as a memory region. Connection set-up is bounded (about 10 s a step). A send
 * that loses its peer fails within seconds (-ECONNRESET, or -ETIMEDOUT when the peer
 * stays connected but stops answering); -EINVAL for a run outside the source's regions
 * or the destination's region table.
 */
int xport_src_rdma_new(const struct xport_src_config *cfg, const char *ip, uint16_t port,
		       const uint8_t token[XPORT_TOKEN_LEN], const int *region_fds,
		       const uint64_t *region_sizes, unsigned nr_regions, struct xport_src **ret,
		       char *err, size_t errlen);

/*
 * Postcopy: registers the source's guest memory (region i mapped at region_hvas[i], the
 * region_sizes[i] bytes given to the constructor, the same memory as region_fds[i]) for
 * remote read and sends addresses and keys to the destination on queue pair 0, so that
 * xport_dst_rdma_fetch() pulls pages without the source's CPU. Called from the engine
 * thread between sends; once. -EOPNOTSUPP on a non-RDMA source, -EALREADY the second time.
 */
int xport_src_rdma_expose(struct xport_src *x, void *const *region_hvas, char *err,
			  size_t errlen);
/*
 * Postcopy, on the destination: RDMA-READs pages first_page .. first_page + npages - 1 of
 * a region from the source's exposed memory into a registered bounce slot (512 KiB at a
 * time) and places them before it returns: through the region's userfaultfd after
 * xport_dst_set_uffd() (UFFDIO_COPY: a page already there is left alone, threads waiting
 * for a page are woken), else by copying them into the region. Waits first, within the
 * same timeout, for the source's table if it has not arrived yet, and for a free slot (8).
 * Safe from several threads at once, concurrently with the receiver. -ETIMEDOUT, -EINVAL
 * outside the regions, -ECONNRESET when no queue pair is left, -EIO/-EACCES for a failed
 * READ, -errno from the placement, -EOPNOTSUPP on a non-RDMA destination. Counted in the
 * stats' read_pages.
 */
int xport_dst_rdma_fetch(struct xport_dst *x, uint32_t region, uint64_t first_page,
			 uint32_t npages, int timeout_ms);

#endif
