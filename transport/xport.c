// SPDX-License-Identifier: Apache-2.0
/*
 * The public face of the transport objects (transport.h): every call dispatches through the
 * backend's ops table (xport_internal.h), so the engine holds a struct xport_src or
 * struct xctl and never knows whether TCP or RDMA is underneath. The constructors live with
 * their backends (tcp_ctl.c, tcp_data.c); the NULL-safe frees are here.
 */
#include <errno.h>

#include "transport/xport_internal.h"

int xctl_send(struct xctl *c, uint16_t type, const void *payload, size_t len)
{
	return c->ops->send(c, type, payload, len);
}

int xctl_recv(struct xctl *c, uint16_t *ret_type, void **ret_payload, size_t *ret_len,
	      int timeout_ms, char *err, size_t errlen)
{
	return c->ops->recv(c, ret_type, ret_payload, ret_len, timeout_ms, err, errlen);
}

void xctl_interrupt(struct xctl *c)
{
	c->ops->interrupt(c);
}

const char *xctl_peer(const struct xctl *c)
{
	return c->ops->peer(c);
}

int xctl_addrs(const struct xctl *c, char *local_ip, char *peer_ip, size_t len)
{
	return c->ops->addrs ? c->ops->addrs(c, local_ip, peer_ip, len) : -EOPNOTSUPP;
}

int xport_src_drain(struct xport_src *x, int timeout_ms)
{
	return x->ops->drain ? x->ops->drain(x, timeout_ms) : 0;
}

void xctl_free(struct xctl *c)
{
	if (c)
		c->ops->free(c);
}

int xport_src_send(struct xport_src *x, const struct page_run *runs, unsigned n, uint64_t fence)
{
	return x->ops->send(x, runs, n, fence);
}

void xport_src_set_bandwidth(struct xport_src *x, uint64_t bytes_per_sec)
{
	x->ops->set_bandwidth(x, bytes_per_sec);
}

void xport_src_cancel(struct xport_src *x)
{
	x->ops->cancel(x);
}

void xport_src_stats(const struct xport_src *x, struct xport_src_stats *ret)
{
	*ret = (struct xport_src_stats){0}; /* a backend fills what it counts */
	x->ops->stats(x, ret);
	/* A backend that never compresses (RDMA) leaves raw_bytes to this: the same bytes. */
	if (ret->raw_bytes < ret->bytes)
		ret->raw_bytes = ret->bytes;
}

const char *xport_src_name(const struct xport_src *x)
{
	return x->ops->name;
}

void xport_src_free(struct xport_src *x)
{
	if (x)
		x->ops->free(x);
}

int xport_dst_add_stream(struct xport_dst *x, int fd, unsigned stream_index)
{
	return x->ops->add_stream(x, fd, stream_index);
}

int xport_dst_wait_fence(struct xport_dst *x, uint64_t fence, int timeout_ms)
{
	return x->ops->wait_fence(x, fence, timeout_ms);
}

const char *xport_dst_error(const struct xport_dst *x)
{
	return x->ops->error(x);
}

void xport_dst_stats(const struct xport_dst *x, struct xport_dst_stats *ret)
{
	*ret = (struct xport_dst_stats){0}; /* a backend fills what it counts */
	x->ops->stats(x, ret);
}

int xport_dst_set_uffd(struct xport_dst *x, unsigned region, int uffd)
{
	if (!x || uffd < 0)
		return -EINVAL;
	return x->ops->set_uffd ? x->ops->set_uffd(x, region, uffd) : -EOPNOTSUPP;
}

void xport_dst_free(struct xport_dst *x)
{
	if (x)
		x->ops->free(x);
}
