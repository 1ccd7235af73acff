/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Inside the transport library: the backend operation tables behind struct xctl,
 * struct xport_src and struct xport_dst (transport.h), in the shape of Redis's
 * connection.h — each public object starts with a pointer to its backend's ops, and the
 * public functions (xport.c) only dispatch. A backend embeds the public struct as the first
 * member of its own and gets back to it with container_of. The TCP helpers at the bottom
 * (tcp_ctl.c) are shared by the TCP control channel and the TCP data streams. Not installed;
 * nothing outside transport/ includes this.
 */
#ifndef FERRY_XPORT_INTERNAL_H
#define FERRY_XPORT_INTERNAL_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "transport/transport.h"

#ifndef container_of
#define container_of(ptr, type, member) ((type *)((char *)(ptr) - offsetof(type, member)))
#endif

struct xctl_ops {
	const char *name;
	int (*send)(struct xctl *c, uint16_t type, const void *payload, size_t len);
	int (*recv)(struct xctl *c, uint16_t *ret_type, void **ret_payload, size_t *ret_len,
		    int timeout_ms, char *err, size_t errlen);
	void (*interrupt)(struct xctl *c);
	const char *(*peer)(const struct xctl *c);
	int (*addrs)(const struct xctl *c, char *local_ip, char *peer_ip, size_t len);
	void (*free)(struct xctl *c);
};

struct xctl {
	const struct xctl_ops *ops;
};

struct xport_src_ops {
	const char *name;
	int (*send)(struct xport_src *x, const struct page_run *runs, unsigned n, uint64_t fence);
	void (*set_bandwidth)(struct xport_src *x, uint64_t bytes_per_sec);
	void (*cancel)(struct xport_src *x);
	void (*stats)(const struct xport_src *x, struct xport_src_stats *ret);
	int (*drain)(struct xport_src *x, int timeout_ms); /* optional: NULL = nothing queued */
	void (*free)(struct xport_src *x);
};

struct xport_src {
	const struct xport_src_ops *ops;
};

struct xport_dst_ops {
	const char *name;
	int (*add_stream)(struct xport_dst *x, int fd, unsigned stream_index);
	int (*wait_fence)(struct xport_dst *x, uint64_t fence, int timeout_ms);
	const char *(*error)(const struct xport_dst *x);
	void (*stats)(const struct xport_dst *x, struct xport_dst_stats *ret);
	/* Optional (NULL: -EOPNOTSUPP). Called with x non-NULL and uffd >= 0; -EINVAL for a
	 * bad region, -EALREADY the second time. */
	int (*set_uffd)(struct xport_dst *x, unsigned region, int uffd);
	void (*free)(struct xport_dst *x);
};

struct xport_dst {
	const struct xport_dst_ops *ops;
};

/* ---- shared by the backends (xport_common.c) ---- */

/*
 * A source's bandwidth cap: one token bucket all its streams (queue pairs) draw from.
 * rate 0 = unlimited. Thread-safe (lock guards rate, tokens, last_ns).
 */
struct xport_bucket {
	pthread_mutex_t lock;
	uint64_t rate; /* bytes/s */
	double tokens;
	int64_t last_ns;
};
void xport_bucket_init(struct xport_bucket *b);
void xport_bucket_destroy(struct xport_bucket *b);
void xport_bucket_set(struct xport_bucket *b, uint64_t bytes_per_sec);
/* Takes bytes (going into debt) and sleeps off any debt; -ECANCELED when stop_fd becomes
 * readable meanwhile. */
int xport_bucket_take(struct xport_bucket *b, uint64_t bytes, int stop_fd);

/* One stream's (queue pair's) share of a batch: a growable list of page runs. */
struct xport_runs {
	struct page_run *v;
	unsigned n, cap;
};
void xport_runs_free(struct xport_runs *l);
/*
 * Deals runs[0..n) onto nr_lanes lanes (emptied first) in stripes of stripe_pages: a page
 * always goes to the same lane, so an older copy of it can never overtake a newer one on
 * another lane; neighbouring stripes dealt to one lane merge into one run. -ENOMEM.
 */
int xport_deal_runs(const struct page_run *runs, unsigned n, uint64_t stripe_pages,
		    struct xport_runs *const *lanes, unsigned nr_lanes);

/* ---- TCP helpers (tcp_ctl.c) ---- */

/* Keepalive probing after this long idle, then every interval, giving up after count
 * unanswered probes: a vanished peer is noticed within ~10 s. TCP_USER_TIMEOUT (same
 * budget) covers the other case, data sent and never acknowledged. */
#define TCP_KEEPALIVE_IDLE_S 4
#define TCP_KEEPALIVE_INTVL_S 2
#define TCP_KEEPALIVE_CNT 3
#define TCP_USER_TIMEOUT_MS 10000u

/*
 * Connects a stream socket to "host:port" ("[v6addr]:port" for IPv6 literals) within
 * timeout_ms (name resolution itself is not bounded by it). sndbuf > 0 sets SO_SNDBUF
 * before connecting. The returned fd is blocking, close-on-exec, with keepalive set.
 * Fills err on failure.
 */
int tcp_connect(const char *hostport, int timeout_ms, int sndbuf, int *ret_fd, char *err,
		size_t errlen);
/* SO_KEEPALIVE + TCP_KEEPIDLE/INTVL/CNT + TCP_USER_TIMEOUT; best effort. */
void tcp_set_liveness(int fd);
/* "ip:port" / "[ip6]:port" of the peer (or "?"), into buf. */
void tcp_peer_string(int fd, char *buf, size_t len);
/* Formats a reason into err (if err and errlen); shared by the TCP files. */
void xport_set_err(char *err, size_t errlen, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
/* Drops the first `done` bytes of an iovec array in place; returns the new count. */
size_t iov_advance(struct iovec **iov, size_t iovcnt, size_t done);
/* Milliseconds on CLOCK_MONOTONIC. */
int64_t tcp_now_ms(void);

/* ---- RDMA helpers (rdma.c), shared by rdma_src.c and rdma_dst.c ---- */

/*
 * The RDMA wire format (docs/protocol.md §11). Connection private data: the source's REQ
 * (32 bytes: REQ private data is limited to 56), the destination's REP (16 bytes) and a
 * REJ with a reason code. After that each queue pair carries small SEND messages — an
 * 8-byte header (type u16, credits u16, payload length u32, little endian) and a payload
 * of at most RDMA_MSG_MAX - 8 bytes — beside the RDMA WRITEs (and, in postcopy, READs).
 * Every message returns `credits` receive buffers its sender re-posted since its last
 * message; a side sends only while it holds a credit.
 */
#define RDMA_WIRE_MAGIC 0x52595246u /* "FRYR" */
#define RDMA_WIRE_VERSION 1u
#define RDMA_REQ_LEN 32u
#define RDMA_REP_LEN 16u
#define RDMA_REJ_LEN 8u
#define RDMA_MSG_HDR_LEN 8u
#define RDMA_MSG_MAX 2048u
#define RDMA_RECV_DEPTH 16u /* receive buffers each side posts per queue pair */
#define RDMA_REGION_WIRE_LEN 20u

enum rdma_msg_type {
	RDMA_MSG_REGIONS = 1,     /* dst -> src: flags u32, count u32, count x region */
	RDMA_MSG_FENCE = 2,       /* src -> dst: fence, pages, zero pages, bytes (u64 each) */
	RDMA_MSG_FENCE_ACK = 3,   /* dst -> src: fence u64 */
	RDMA_MSG_SRC_REGIONS = 4, /* src -> dst (postcopy): as REGIONS, for remote READ */
};

enum rdma_rej_code {
	RDMA_REJ_PROTOCOL = 1, /* bad magic, version or length */
	RDMA_REJ_TOKEN = 2,    /* unknown token */
	RDMA_REJ_INDEX = 3,    /* queue pair index out of range or already connected */
	RDMA_REJ_INTERNAL = 4, /* the destination failed to set the queue pair up */
};

/* REGIONS flags */
#define RDMA_REGIONS_ZEROED (1u << 0) /* XPORT_RDMA_DST_ZEROED */

struct rdma_req {
	uint16_t version;
	uint16_t qp;
	uint16_t nr_qps;
	uint16_t recv_depth;
	uint32_t caps;
	uint8_t token[XPORT_TOKEN_LEN];
};

struct rdma_rep {
	uint16_t version;
	uint16_t recv_depth;
	uint32_t flags;
	uint32_t nr_regions;
};

/* A memory region of the peer: where to WRITE (or READ) and with which key. */
struct rdma_remote_region {
	uint64_t addr;
	uint64_t len;
	uint32_t rkey;
};

struct rdma_fence_msg {
	uint64_t fence;
	uint64_t pages;
	uint64_t zero_pages;
	uint64_t bytes;
};

void rdma_encode_req(const struct rdma_req *m, uint8_t out[RDMA_REQ_LEN]);
/* -EBADMSG for a wrong magic, version or a short buffer (a longer one is fine: the CM
 * pads private data). */
int rdma_decode_req(const void *p, size_t len, struct rdma_req *m);
void rdma_encode_rep(const struct rdma_rep *m, uint8_t out[RDMA_REP_LEN]);
int rdma_decode_rep(const void *p, size_t len, struct rdma_rep *m);
void rdma_encode_rej(uint32_t code, uint8_t out[RDMA_REJ_LEN]);
/* The code of a REJ of ours, or 0 when p is not one. */
uint32_t rdma_decode_rej(const void *p, size_t len);
const char *rdma_rej_name(uint32_t code);

/* Message header + payload into buf (RDMA_MSG_MAX bytes); returns the total length. */
size_t rdma_msg_regions(uint8_t *buf, uint16_t type, uint16_t credits, uint32_t flags,
			const struct rdma_remote_region *r, unsigned n);
size_t rdma_msg_fence(uint8_t *buf, uint16_t credits, const struct rdma_fence_msg *f);
size_t rdma_msg_fence_ack(uint8_t *buf, uint16_t credits, uint64_t fence);
/*
 * Splits a received message: -EBADMSG when shorter than its header says or longer than
 * RDMA_MSG_MAX. *ret_payload points into buf.
 */
int rdma_msg_parse(const uint8_t *buf, size_t len, uint16_t *ret_type, uint16_t *ret_credits,
		   const uint8_t **ret_payload, uint32_t *ret_plen);
int rdma_decode_regions(const uint8_t *p, uint32_t len, uint32_t *ret_flags,
			struct rdma_remote_region *r, unsigned *ret_n);
int rdma_decode_fence(const uint8_t *p, uint32_t len, struct rdma_fence_msg *f);
int rdma_decode_fence_ack(const uint8_t *p, uint32_t len, uint64_t *ret_fence);

/* Parses an IPv4/IPv6 literal (brackets allowed) into a sockaddr with that port. */
int rdma_parse_addr(const char *ip, uint16_t port, struct sockaddr_storage *ret);

struct rdma_event_channel;
struct rdma_cm_event;
/*
 * Waits up to timeout_ms (< 0: forever) for the next event on a non-blocking channel, or
 * for stop_fd (may be -1) to become readable (-ECANCELED). -ETIMEDOUT. The caller acks it.
 */
int rdma_next_event(struct rdma_event_channel *ch, int stop_fd, int timeout_ms,
		    struct rdma_cm_event **ret);
/* Makes a channel's fd non-blocking and close-on-exec. */
int rdma_channel_nonblock(struct rdma_event_channel *ch);

#endif
