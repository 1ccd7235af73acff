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

#include <stddef.h>
#include <stdint.h>
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
	void (*free)(struct xport_dst *x);
};

struct xport_dst {
	const struct xport_dst_ops *ops;
};

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

#endif
