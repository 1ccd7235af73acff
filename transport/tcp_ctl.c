// SPDX-License-Identifier: Apache-2.0
/*
 * The TCP control channel (struct xctl, transport.h) and the socket helpers the TCP data
 * streams share with it. A control message is one frame: the proto.h header, then at most
 * PROTO_MAX_CTRL_PAYLOAD bytes of payload. Receiving is resumable: a frame that has only
 * partly arrived when the timeout expires (or the call is interrupted) stays half-read in
 * the channel and the next xctl_recv() carries on from there, so a timeout never
 * desynchronises the stream. A bad header, by contrast, leaves no way to find the next
 * frame: the channel is then dead and says why. Sockets stay in blocking mode; every
 * operation uses MSG_DONTWAIT and waits in poll(), which is where timeouts and the
 * interrupt eventfd come in.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "transport/xport_internal.h"

/* A send that makes no progress for this long means the peer stopped reading. */
#define CTL_SEND_TIMEOUT_MS 30000
#define CTL_PEER_LEN (INET6_ADDRSTRLEN + 16)

struct tcp_ctl {
	struct xctl base;
	int fd;
	int intr_fd; /* eventfd: xctl_interrupt() adds 1, a receiver that sees it drains it */
	char peer[CTL_PEER_LEN];

	/* One frame at a time on the wire: frames sent from two threads never interleave. */
	pthread_mutex_t send_lock;
	int send_dead; /* a frame went out half-sent: the byte stream is beyond repair; send_lock */

	/*
	 * The frame being received. Only the one thread that calls xctl_recv() (the control
	 * thread) touches these, so they need no lock.
	 */
	uint8_t hdr[PROTO_HDR_LEN];
	size_t hdr_got;
	struct proto_hdr h; /* valid once hdr_got == PROTO_HDR_LEN */
	uint8_t *payload;
	size_t payload_got;
	int recv_dead;        /* sticky: -EBADMSG or -ECONNRESET once the stream is unusable */
	char dead_reason[160]; /* why recv_dead, repeated to every later caller */
};

void xport_set_err(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;

	if (!err || !errlen)
		return;
	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
}

int64_t tcp_now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Milliseconds left until deadline (-1 = none), for poll(). */
static int remaining_ms(int64_t deadline)
{
	if (deadline < 0)
		return -1;
	int64_t left = deadline - tcp_now_ms();
	if (left <= 0)
		return 0;
	return left > INT32_MAX ? INT32_MAX : (int)left;
}

size_t iov_advance(struct iovec **piov, size_t cnt, size_t done)
{
	struct iovec *iov = *piov;

	while (cnt && done >= iov->iov_len) {
		done -= iov->iov_len;
		iov++;
		cnt--;
	}
	if (cnt && done) {
		iov->iov_base = (char *)iov->iov_base + done;
		iov->iov_len -= done;
	}
	*piov = iov;
	return cnt;
}

void tcp_set_liveness(int fd)
{
	int one = 1, idle = TCP_KEEPALIVE_IDLE_S, intvl = TCP_KEEPALIVE_INTVL_S,
	    cnt = TCP_KEEPALIVE_CNT;
	unsigned user_timeout = TCP_USER_TIMEOUT_MS;

	/*
	 * Keepalive notices a silent peer whose host vanished while we only wait to read;
	 * TCP_USER_TIMEOUT notices it while our data sits unacknowledged (keepalive does not
	 * probe then). Both are tuning: a socket that refuses them still works.
	 */
	(void)setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
	(void)setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle));
	(void)setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof(intvl));
	(void)setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof(cnt));
	(void)setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &user_timeout, sizeof(user_timeout));
}

static void sockaddr_string(const struct sockaddr *sa, char *buf, size_t len)
{
	char ip[INET6_ADDRSTRLEN];

	if (sa->sa_family == AF_INET) {
		const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
		inet_ntop(AF_INET, &in->sin_addr, ip, sizeof(ip));
		snprintf(buf, len, "%s:%u", ip, ntohs(in->sin_port));
	} else if (sa->sa_family == AF_INET6) {
		const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
		inet_ntop(AF_INET6, &in6->sin6_addr, ip, sizeof(ip));
		snprintf(buf, len, "[%s]:%u", ip, ntohs(in6->sin6_port));
	} else {
		snprintf(buf, len, "?");
	}
}

void tcp_peer_string(int fd, char *buf, size_t len)
{
	struct sockaddr_storage ss;
	socklen_t sl = sizeof(ss);

	if (getpeername(fd, (struct sockaddr *)&ss, &sl) < 0) {
		snprintf(buf, len, "?");
		return;
	}
	sockaddr_string((struct sockaddr *)&ss, buf, len);
}

/* "host:port" or "[v6]:port" into its parts; -EINVAL for anything else. */
static int split_hostport(const char *hp, char *host, size_t hostlen, char *port, size_t portlen)
{
	const char *h, *colon;
	size_t hl;

	if (hp[0] == '[') {
		const char *close = strchr(hp, ']');
		if (!close || close[1] != ':')
			return -EINVAL;
		h = hp + 1;
		hl = (size_t)(close - h);
		colon = close + 1;
	} else {
		colon = strrchr(hp, ':');
		if (!colon)
			return -EINVAL;
		h = hp;
		hl = (size_t)(colon - hp);
		/* A bare IPv6 literal has colons of its own: which one ends the host is a guess. */
		if (memchr(h, ':', hl))
			return -EINVAL;
	}
	if (!hl || hl >= hostlen || !colon[1] || strlen(colon + 1) >= portlen)
		return -EINVAL;
	memcpy(host, h, hl);
	host[hl] = '\0';
	strcpy(port, colon + 1);
	return 0;
}

/* One non-blocking connect to one address, within the deadline; returns a blocking fd. */
static int connect_one(const struct addrinfo *ai, int64_t deadline, int sndbuf)
{
	int fd, r, soerr = 0;
	socklen_t sl = sizeof(soerr);

	fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
	if (fd < 0)
		return -errno;
	/* Before connect: the window scale is negotiated in the SYN from the buffer size. */
	if (sndbuf > 0)
		(void)setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
	if (connect(fd, ai->ai_addr, ai->ai_addrlen) < 0) {
		if (errno != EINPROGRESS) {
			r = -errno;
			goto err_close;
		}
		struct pollfd pfd = { .fd = fd, .events = POLLOUT };
		for (;;) {
			r = poll(&pfd, 1, remaining_ms(deadline));
			if (r >= 0 || errno != EINTR)
				break;
		}
		if (r < 0) {
			r = -errno;
			goto err_close;
		}
		if (r == 0) {
			r = -ETIMEDOUT;
			goto err_close;
		}
		if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) < 0) {
			r = -errno;
			goto err_close;
		}
		if (soerr) {
			r = -soerr;
			goto err_close;
		}
	}
	r = fcntl(fd, F_GETFL);
	if (r < 0 || fcntl(fd, F_SETFL, r & ~O_NONBLOCK) < 0) {
		r = -errno;
		goto err_close;
	}
	tcp_set_liveness(fd);
	return fd;

err_close:
	close(fd);
	return r;
}

int tcp_connect(const char *hostport, int timeout_ms, int sndbuf, int *ret_fd, char *err,
		size_t errlen)
{
	char host[256], port[32];
	struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM };
	struct addrinfo *res = NULL;
	int64_t deadline = timeout_ms < 0 ? -1 : tcp_now_ms() + timeout_ms;
	int r;

	if (!hostport || split_hostport(hostport, host, sizeof(host), port, sizeof(port)) < 0) {
		xport_set_err(err, errlen, "bad address \"%s\" (want host:port or [v6]:port)",
			hostport ? hostport : "(null)");
		return -EINVAL;
	}
	r = getaddrinfo(host, port, &hints, &res);
	if (r) {
		xport_set_err(err, errlen, "cannot resolve %s: %s", hostport, gai_strerror(r));
		return r == EAI_SYSTEM ? -errno : -EHOSTUNREACH;
	}
	r = -EHOSTUNREACH;
	for (const struct addrinfo *ai = res; ai; ai = ai->ai_next) {
		r = connect_one(ai, deadline, sndbuf);
		if (r >= 0) {
			*ret_fd = r;
			r = 0;
			break;
		}
		char addr[CTL_PEER_LEN];
		sockaddr_string(ai->ai_addr, addr, sizeof(addr));
		xport_set_err(err, errlen, "connect to %s (%s): %s", hostport, addr, strerror(-r));
		if (r == -ETIMEDOUT)
			break;
	}
	freeaddrinfo(res);
	return r;
}

/* ---------------- struct xctl over TCP ---------------- */

static struct tcp_ctl *to_tcp(struct xctl *c)
{
	return container_of(c, struct tcp_ctl, base);
}

static const struct tcp_ctl *to_tcp_const(const struct xctl *c)
{
	return container_of(c, const struct tcp_ctl, base);
}

static int ctl_send(struct xctl *base, uint16_t type, const void *payload, size_t len)
{
	struct tcp_ctl *c = to_tcp(base);
	uint8_t hdr[PROTO_HDR_LEN];
	struct iovec iov_arr[2] = {
		{ .iov_base = hdr, .iov_len = sizeof(hdr) },
		{ .iov_base = (void *)payload, .iov_len = len },
	};
	struct iovec *iov = iov_arr;
	size_t cnt = len ? 2 : 1, sent = 0;
	int64_t deadline = tcp_now_ms() + CTL_SEND_TIMEOUT_MS;
	int r = 0;

	if (len > PROTO_MAX_CTRL_PAYLOAD || (len && !payload))
		return -EMSGSIZE;
	proto_hdr_encode(hdr, type, (uint32_t)len);

	pthread_mutex_lock(&c->send_lock);
	if (c->send_dead) {
		r = c->send_dead;
		goto out;
	}
	while (cnt) {
		struct msghdr msg = { .msg_iov = iov, .msg_iovlen = cnt };
		ssize_t n = sendmsg(c->fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);

		if (n >= 0) {
			sent += (size_t)n;
			cnt = iov_advance(&iov, cnt, (size_t)n);
			continue;
		}
		if (errno == EINTR)
			continue;
		if (errno != EAGAIN) {
			r = errno == EPIPE ? -ECONNRESET : -errno;
			break;
		}
		struct pollfd pfd = { .fd = c->fd, .events = POLLOUT };
		int pr = poll(&pfd, 1, remaining_ms(deadline));
		if (pr < 0 && errno != EINTR) {
			r = -errno;
			break;
		}
		if (pr == 0) {
			r = -ETIMEDOUT;
			break;
		}
	}
	/* Half a frame on the wire cannot be taken back: no later frame could be parsed. */
	if (r < 0 && (sent || r != -ETIMEDOUT))
		c->send_dead = r;
out:
	pthread_mutex_unlock(&c->send_lock);
	return r;
}

/*
 * Reads what is there into buf[*got..want), waiting up to the deadline. 0 when complete,
 * -ETIMEDOUT, -ECANCELED (interrupt, drained), -ECONNRESET on EOF, or a socket error.
 */
static int recv_some(struct tcp_ctl *c, uint8_t *buf, size_t want, size_t *got, int64_t deadline)
{
	while (*got < want) {
		ssize_t n = recv(c->fd, buf + *got, want - *got, MSG_DONTWAIT);

		if (n > 0) {
			*got += (size_t)n;
			continue;
		}
		if (n == 0)
			return -ECONNRESET;
		if (errno == EINTR)
			continue;
		if (errno != EAGAIN)
			return -errno;

		struct pollfd pfd[2] = {
			{ .fd = c->fd, .events = POLLIN },
			{ .fd = c->intr_fd, .events = POLLIN },
		};
		int r = poll(pfd, 2, remaining_ms(deadline));
		if (r < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (r == 0)
			return -ETIMEDOUT;
		if (pfd[1].revents & POLLIN) {
			uint64_t v;
			/* Drain: one interrupt cancels one wait, never a later one as well. */
			if (read(c->intr_fd, &v, sizeof(v)) < 0 && errno != EAGAIN)
				return -errno;
			return -ECANCELED;
		}
	}
	return 0;
}

static int ctl_recv(struct xctl *base, uint16_t *ret_type, void **ret_payload, size_t *ret_len,
		    int timeout_ms, char *err, size_t errlen)
{
	struct tcp_ctl *c = to_tcp(base);
	int64_t deadline = timeout_ms < 0 ? -1 : tcp_now_ms() + timeout_ms;
	int r;

	if (c->recv_dead) {
		xport_set_err(err, errlen, "%s", c->dead_reason);
		return c->recv_dead;
	}
	if (c->hdr_got < PROTO_HDR_LEN) {
		r = recv_some(c, c->hdr, PROTO_HDR_LEN, &c->hdr_got, deadline);
		if (r < 0)
			goto fail;
		if (proto_hdr_decode(c->hdr, PROTO_MAX_CTRL_PAYLOAD, &c->h) < 0) {
			const uint8_t *b = c->hdr;
			snprintf(c->dead_reason, sizeof(c->dead_reason),
				 "bad frame header from %s: %02x%02x%02x%02x %02x%02x%02x%02x "
				 "%02x%02x%02x%02x",
				 c->peer, b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9],
				 b[10], b[11]);
			c->recv_dead = -EBADMSG;
			xport_set_err(err, errlen, "%s", c->dead_reason);
			return -EBADMSG;
		}
		/* +1: a zero-length payload still gets a distinct, freeable buffer. */
		c->payload = malloc((size_t)c->h.len + 1);
		if (!c->payload) {
			/* Header consumed, payload unread: the stream cannot be resumed. */
			snprintf(c->dead_reason, sizeof(c->dead_reason),
				 "no memory for a %u-byte frame from %s", c->h.len, c->peer);
			c->recv_dead = -ENOMEM;
			xport_set_err(err, errlen, "%s", c->dead_reason);
			return -ENOMEM;
		}
		c->payload_got = 0;
	}
	r = recv_some(c, c->payload, c->h.len, &c->payload_got, deadline);
	if (r < 0)
		goto fail;

	*ret_type = c->h.type;
	*ret_payload = c->payload;
	*ret_len = c->h.len;
	c->payload = NULL;
	c->hdr_got = 0;
	c->payload_got = 0;
	return 0;

fail:
	switch (r) {
	case -ETIMEDOUT:
		xport_set_err(err, errlen, "no complete message from %s in %d ms", c->peer, timeout_ms);
		return r;
	case -ECANCELED:
		xport_set_err(err, errlen, "interrupted");
		return r;
	case -ECONNRESET:
		snprintf(c->dead_reason, sizeof(c->dead_reason), "%s closed the connection%s",
			 c->peer, c->hdr_got ? " mid-frame" : "");
		break;
	default:
		snprintf(c->dead_reason, sizeof(c->dead_reason), "receiving from %s: %s", c->peer,
			 strerror(-r));
		r = -ECONNRESET;
		break;
	}
	c->recv_dead = r;
	xport_set_err(err, errlen, "%s", c->dead_reason);
	return r;
}

static void ctl_interrupt(struct xctl *base)
{
	struct tcp_ctl *c = to_tcp(base);
	uint64_t one = 1;

	/* Can only fail when the counter is saturated: then a wakeup is pending anyway. */
	(void)!write(c->intr_fd, &one, sizeof(one));
}

static const char *ctl_peer(const struct xctl *base)
{
	return to_tcp_const(base)->peer;
}

static void ctl_free(struct xctl *base)
{
	struct tcp_ctl *c = to_tcp(base);

	if (c->fd >= 0)
		close(c->fd);
	if (c->intr_fd >= 0)
		close(c->intr_fd);
	pthread_mutex_destroy(&c->send_lock);
	free(c->payload);
	free(c);
}

static int ip_of(const struct sockaddr_storage *ss, char *buf, size_t len)
{
	const void *a = ss->ss_family == AF_INET
				? (const void *)&((const struct sockaddr_in *)ss)->sin_addr
			: ss->ss_family == AF_INET6
				? (const void *)&((const struct sockaddr_in6 *)ss)->sin6_addr
				: NULL;
	if (!a || !inet_ntop(ss->ss_family, a, buf, (socklen_t)len))
		return -EAFNOSUPPORT;
	return 0;
}

static int ctl_addrs(const struct xctl *base, char *local_ip, char *peer_ip, size_t len)
{
	const struct tcp_ctl *c = to_tcp_const(base);
	struct sockaddr_storage l, p;
	socklen_t ll = sizeof(l), pl = sizeof(p);
	if (getsockname(c->fd, (struct sockaddr *)&l, &ll) < 0 ||
	    getpeername(c->fd, (struct sockaddr *)&p, &pl) < 0)
		return -errno;
	int r = ip_of(&l, local_ip, len);
	return r < 0 ? r : ip_of(&p, peer_ip, len);
}

static const struct xctl_ops tcp_ctl_ops = {
	.name = "tcp",
	.send = ctl_send,
	.recv = ctl_recv,
	.interrupt = ctl_interrupt,
	.peer = ctl_peer,
	.addrs = ctl_addrs,
	.free = ctl_free,
};

/* The fd becomes the channel's only on success; on failure it stays the caller's. */
int xctl_from_fd(int fd, struct xctl **ret)
{
	struct tcp_ctl *c;
	int one = 1, flags, r;

	if (fd < 0 || !ret)
		return -EINVAL;
	c = calloc(1, sizeof(*c));
	if (!c)
		return -ENOMEM;
	c->base.ops = &tcp_ctl_ops;
	c->fd = -1;
	c->intr_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (c->intr_fd < 0) {
		r = -errno;
		goto err_free;
	}
	r = pthread_mutex_init(&c->send_lock, NULL);
	if (r) {
		r = -r;
		goto err_eventfd;
	}
	/* Blocking mode, whatever accept4() gave us: all waiting happens in poll() anyway. */
	flags = fcntl(fd, F_GETFL);
	if (flags < 0 || fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) < 0) {
		r = -errno;
		goto err_mutex;
	}
	/* Control messages are small and someone waits for each: never hold one back. */
	(void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	tcp_set_liveness(fd);
	tcp_peer_string(fd, c->peer, sizeof(c->peer));
	c->fd = fd;
	*ret = &c->base;
	return 0;

err_mutex:
	pthread_mutex_destroy(&c->send_lock);
err_eventfd:
	close(c->intr_fd);
err_free:
	free(c);
	return r;
}

int xctl_connect(const char *hostport, int timeout_ms, struct xctl **ret, char *err,
		 size_t errlen)
{
	int fd = -1, r;

	r = tcp_connect(hostport, timeout_ms, 0, &fd, err, errlen);
	if (r < 0)
		return r;
	r = xctl_from_fd(fd, ret);
	if (r < 0) {
		xport_set_err(err, errlen, "control channel to %s: %s", hostport, strerror(-r));
		close(fd);
	}
	return r;
}
