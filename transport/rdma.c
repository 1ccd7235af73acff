// SPDX-License-Identifier: Apache-2.0
/*
 * What the RDMA source (rdma_src.c) and destination (rdma_dst.c) share: the codec of the
 * connection private data and of the small SEND messages on each queue pair (the format is
 * docs/protocol.md §11; every decoder checks lengths before it reads), waiting on an
 * rdma_cm event channel with a timeout, address parsing, and xport_rdma_usable(), the
 * probe the agent runs before it offers the RDMA capability.
 */
#include <arpa/inet.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <infiniband/verbs.h>
#include <rdma/rdma_cma.h>

#include "transport/wire.h"
#include "transport/xport_internal.h"

static void put16(uint8_t *p, uint16_t v)
{
	v = htole16(v);
	memcpy(p, &v, 2);
}

static void put32(uint8_t *p, uint32_t v)
{
	v = htole32(v);
	memcpy(p, &v, 4);
}

static void put64(uint8_t *p, uint64_t v)
{
	v = htole64(v);
	memcpy(p, &v, 8);
}

/* ---------------- private data ---------------- */

void rdma_encode_req(const struct rdma_req *m, uint8_t out[RDMA_REQ_LEN])
{
	put32(out, RDMA_WIRE_MAGIC);
	put16(out + 4, m->version);
	put16(out + 6, m->qp);
	put16(out + 8, m->nr_qps);
	put16(out + 10, m->recv_depth);
	put32(out + 12, m->caps);
	memcpy(out + 16, m->token, XPORT_TOKEN_LEN);
}

int rdma_decode_req(const void *p, size_t len, struct rdma_req *m)
{
	struct wire_reader r;
	struct rdma_req t;

	if (!p || len < RDMA_REQ_LEN)
		return -EBADMSG;
	wire_reader_init(&r, p, RDMA_REQ_LEN);
	if (wire_get_u32(&r) != RDMA_WIRE_MAGIC)
		return -EBADMSG;
	t.version = wire_get_u16(&r);
	t.qp = wire_get_u16(&r);
	t.nr_qps = wire_get_u16(&r);
	t.recv_depth = wire_get_u16(&r);
	t.caps = wire_get_u32(&r);
	wire_get_bytes(&r, t.token, XPORT_TOKEN_LEN);
	if (r.err || t.version != RDMA_WIRE_VERSION)
		return -EBADMSG;
	*m = t;
	return 0;
}

void rdma_encode_rep(const struct rdma_rep *m, uint8_t out[RDMA_REP_LEN])
{
	put32(out, RDMA_WIRE_MAGIC);
	put16(out + 4, m->version);
	put16(out + 6, m->recv_depth);
	put32(out + 8, m->flags);
	put32(out + 12, m->nr_regions);
}

int rdma_decode_rep(const void *p, size_t len, struct rdma_rep *m)
{
	struct wire_reader r;
	struct rdma_rep t;

	if (!p || len < RDMA_REP_LEN)
		return -EBADMSG;
	wire_reader_init(&r, p, RDMA_REP_LEN);
	if (wire_get_u32(&r) != RDMA_WIRE_MAGIC)
		return -EBADMSG;
	t.version = wire_get_u16(&r);
	t.recv_depth = wire_get_u16(&r);
	t.flags = wire_get_u32(&r);
	t.nr_regions = wire_get_u32(&r);
	if (r.err || t.version != RDMA_WIRE_VERSION || !t.recv_depth ||
	    t.nr_regions > XPORT_MAX_REGIONS)
		return -EBADMSG;
	*m = t;
	return 0;
}

void rdma_encode_rej(uint32_t code, uint8_t out[RDMA_REJ_LEN])
{
	put32(out, RDMA_WIRE_MAGIC);
	put32(out + 4, code);
}

uint32_t rdma_decode_rej(const void *p, size_t len)
{
	struct wire_reader r;

	if (!p || len < RDMA_REJ_LEN)
		return 0;
	wire_reader_init(&r, p, RDMA_REJ_LEN);
	if (wire_get_u32(&r) != RDMA_WIRE_MAGIC)
		return 0;
	return wire_get_u32(&r);
}

const char *rdma_rej_name(uint32_t code)
{
	switch (code) {
	case RDMA_REJ_PROTOCOL:
		return "protocol mismatch";
	case RDMA_REJ_TOKEN:
		return "unknown token";
	case RDMA_REJ_INDEX:
		return "queue pair index out of range or already connected";
	case RDMA_REJ_INTERNAL:
		return "destination could not set the queue pair up";
	default:
		return "rejected";
	}
}

/* ---------------- messages ---------------- */

static size_t msg_hdr(uint8_t *buf, uint16_t type, uint16_t credits, uint32_t plen)
{
	put16(buf, type);
	put16(buf + 2, credits);
	put32(buf + 4, plen);
	return RDMA_MSG_HDR_LEN;
}

size_t rdma_msg_regions(uint8_t *buf, uint16_t type, uint16_t credits, uint32_t flags,
			const struct rdma_remote_region *r, unsigned n)
{
	uint8_t *p = buf + RDMA_MSG_HDR_LEN;

	put32(p, flags);
	put32(p + 4, n);
	p += 8;
	for (unsigned i = 0; i < n; i++, p += RDMA_REGION_WIRE_LEN) {
		put64(p, r[i].addr);
		put64(p + 8, r[i].len);
		put32(p + 16, r[i].rkey);
	}
	msg_hdr(buf, type, credits, (uint32_t)(p - buf - RDMA_MSG_HDR_LEN));
	return (size_t)(p - buf);
}

size_t rdma_msg_fence(uint8_t *buf, uint16_t credits, const struct rdma_fence_msg *f)
{
	uint8_t *p = buf + RDMA_MSG_HDR_LEN;

	put64(p, f->fence);
	put64(p + 8, f->pages);
	put64(p + 16, f->zero_pages);
	put64(p + 24, f->bytes);
	return msg_hdr(buf, RDMA_MSG_FENCE, credits, 32) + 32;
}

size_t rdma_msg_fence_ack(uint8_t *buf, uint16_t credits, uint64_t fence)
{
	put64(buf + RDMA_MSG_HDR_LEN, fence);
	return msg_hdr(buf, RDMA_MSG_FENCE_ACK, credits, 8) + 8;
}

int rdma_msg_parse(const uint8_t *buf, size_t len, uint16_t *ret_type, uint16_t *ret_credits,
		   const uint8_t **ret_payload, uint32_t *ret_plen)
{
	struct wire_reader r;
	uint16_t type, credits;
	uint32_t plen;

	if (len < RDMA_MSG_HDR_LEN || len > RDMA_MSG_MAX)
		return -EBADMSG;
	wire_reader_init(&r, buf, len);
	type = wire_get_u16(&r);
	credits = wire_get_u16(&r);
	plen = wire_get_u32(&r);
	if (plen != len - RDMA_MSG_HDR_LEN)
		return -EBADMSG;
	*ret_type = type;
	*ret_credits = credits;
	*ret_payload = buf + RDMA_MSG_HDR_LEN;
	*ret_plen = plen;
	return 0;
}

int rdma_decode_regions(const uint8_t *p, uint32_t len, uint32_t *ret_flags,
			struct rdma_remote_region *out, unsigned *ret_n)
{
	struct wire_reader r;
	uint32_t flags, n;

	wire_reader_init(&r, p, len);
	flags = wire_get_u32(&r);
	n = wire_get_u32(&r);
	if (r.err || !n || n > XPORT_MAX_REGIONS || wire_remaining(&r) != n * RDMA_REGION_WIRE_LEN)
		return -EBADMSG;
	for (uint32_t i = 0; i < n; i++) {
		out[i].addr = wire_get_u64(&r);
		out[i].len = wire_get_u64(&r);
		out[i].rkey = wire_get_u32(&r);
		/* Byte addresses must not wrap: every WRITE is checked against addr + len. */
		if (out[i].len % PAGEREADER_PAGE_SIZE || out[i].addr + out[i].len < out[i].addr)
			return -EBADMSG;
	}
	*ret_flags = flags;
	*ret_n = n;
	return r.err;
}

int rdma_decode_fence(const uint8_t *p, uint32_t len, struct rdma_fence_msg *f)
{
	struct wire_reader r;
	struct rdma_fence_msg t;

	if (len != 32)
		return -EBADMSG;
	wire_reader_init(&r, p, len);
	t.fence = wire_get_u64(&r);
	t.pages = wire_get_u64(&r);
	t.zero_pages = wire_get_u64(&r);
	t.bytes = wire_get_u64(&r);
	if (r.err)
		return r.err;
	*f = t;
	return 0;
}

int rdma_decode_fence_ack(const uint8_t *p, uint32_t len, uint64_t *ret_fence)
{
	struct wire_reader r;
	uint64_t f;

	if (len != 8)
		return -EBADMSG;
	wire_reader_init(&r, p, len);
	f = wire_get_u64(&r);
	if (r.err)
		return r.err;
	*ret_fence = f;
	return 0;
}

/* ---------------- addresses and events ---------------- */

int rdma_parse_addr(const char *ip, uint16_t port, struct sockaddr_storage *ret)
{
	char buf[INET6_ADDRSTRLEN + 2];
	size_t n;

	if (!ip)
		return -EINVAL;
	n = strlen(ip);
	if (n >= sizeof(buf))
		return -EINVAL;
	memcpy(buf, ip, n + 1);
	memset(ret, 0, sizeof(*ret));
	if (n >= 2 && buf[0] == '[' && buf[n - 1] == ']') {
		memmove(buf, buf + 1, n - 2);
		buf[n - 2] = '\0';
	}
	struct sockaddr_in *a4 = (struct sockaddr_in *)ret;
	struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)ret;
	if (inet_pton(AF_INET, buf, &a4->sin_addr) == 1) {
		a4->sin_family = AF_INET;
		a4->sin_port = htons(port);
		return 0;
	}
	if (inet_pton(AF_INET6, buf, &a6->sin6_addr) == 1) {
		a6->sin6_family = AF_INET6;
		a6->sin6_port = htons(port);
		return 0;
	}
	return -EINVAL;
}

int rdma_channel_nonblock(struct rdma_event_channel *ch)
{
	int flags = fcntl(ch->fd, F_GETFL);

	if (flags < 0 || fcntl(ch->fd, F_SETFL, flags | O_NONBLOCK) < 0 ||
	    fcntl(ch->fd, F_SETFD, FD_CLOEXEC) < 0)
		return -errno;
	return 0;
}

int rdma_next_event(struct rdma_event_channel *ch, int stop_fd, int timeout_ms,
		    struct rdma_cm_event **ret)
{
	int64_t deadline = timeout_ms >= 0 ? tcp_now_ms() + timeout_ms : 0;

	for (;;) {
		if (rdma_get_cm_event(ch, ret) == 0)
			return 0;
		if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
			return -errno;
		int wait = -1;
		if (timeout_ms >= 0) {
			int64_t left = deadline - tcp_now_ms();
			if (left <= 0)
				return -ETIMEDOUT;
			wait = (int)left;
		}
		struct pollfd pfd[2] = {
			{ .fd = ch->fd, .events = POLLIN },
			{ .fd = stop_fd, .events = POLLIN },
		};
		int r = poll(pfd, stop_fd >= 0 ? 2 : 1, wait);
		if (r < 0 && errno != EINTR)
			return -errno;
		if (r > 0 && stop_fd >= 0 && (pfd[1].revents & POLLIN))
			return -ECANCELED;
	}
}

/* ---------------- usability probe ---------------- */

static bool port_active(struct ibv_context *ctx, uint8_t port)
{
	struct ibv_port_attr pa;

	return ibv_query_port(ctx, port, &pa) == 0 && pa.state == IBV_PORT_ACTIVE;
}

bool xport_rdma_usable(const char *local_ip, char *why, size_t len)
{
	struct ibv_device **list;
	int n = 0;
	bool ok = false;

	list = ibv_get_device_list(&n);
	if (!list || n == 0) {
		xport_set_err(why, len, "no RDMA device (no NIC driver or rdma_rxe loaded, or "
					"/dev/infiniband missing)");
		if (list)
			ibv_free_device_list(list);
		return false;
	}

	if (!local_ip) {
		for (int i = 0; i < n && !ok; i++) {
			struct ibv_context *ctx = ibv_open_device(list[i]);
			struct ibv_device_attr da;
			if (!ctx)
				continue;
			if (ibv_query_device(ctx, &da) == 0) {
				for (uint8_t p = 1; p <= da.phys_port_cnt && !ok; p++)
					ok = port_active(ctx, p);
			}
			ibv_close_device(ctx);
		}
		ibv_free_device_list(list);
		if (!ok)
			xport_set_err(why, len, "no RDMA device has an active port");
		return ok;
	}
	ibv_free_device_list(list);

	struct sockaddr_storage sa;
	if (rdma_parse_addr(local_ip, 0, &sa) < 0) {
		xport_set_err(why, len, "%s is not an IP address", local_ip);
		return false;
	}
	struct rdma_event_channel *ch = rdma_create_event_channel();
	struct rdma_cm_id *id = NULL;
	if (!ch) {
		xport_set_err(why, len, "rdma_cm: %s (is rdma_ucm loaded?)", strerror(errno));
		return false;
	}
	if (rdma_create_id(ch, &id, NULL, RDMA_PS_TCP) < 0) {
		xport_set_err(why, len, "rdma_create_id: %s", strerror(errno));
	} else if (rdma_bind_addr(id, (struct sockaddr *)&sa) < 0) {
		xport_set_err(why, len, "%s is not on an RDMA device here: %s", local_ip,
			      strerror(errno));
	} else if (!id->verbs) {
		xport_set_err(why, len, "%s is not on an RDMA device here", local_ip);
	} else if (!port_active(id->verbs, id->port_num)) {
		xport_set_err(why, len, "port %u of %s (for %s) is not active", id->port_num,
			      ibv_get_device_name(id->verbs->device), local_ip);
	} else {
		ok = true;
	}
	if (id)
		rdma_destroy_id(id);
	rdma_destroy_event_channel(ch);
	return ok;
}
