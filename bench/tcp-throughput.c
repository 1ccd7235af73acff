// SPDX-License-Identifier: Apache-2.0
/*
 * tcp-throughput: plain loopback TCP throughput, the yardstick the migration benchmark
 * (bench/migrate-bench.sh) compares a migration's throughput with. A receiver thread per
 * stream accepts one connection on 127.0.0.1 and discards what it reads; a sender thread
 * per stream send()s its share of the total from one buffer. The time is taken from the
 * first connect to the last byte received.
 *
 * --into-memfd: the receivers do not discard but pwrite() what they read into one fresh
 * memfd of the total size (stream i into its own range), as a migration destination must
 * put pages into new guest memory. That is the link as a destination can use it: on a host
 * where first touching memory is costly (nested virtualisation) it is well below the
 * plain figure (docs/benchmarks.md).
 *
 * Usage: tcp-throughput [--bytes N[K|M|G]] [--buf N[K|M|G]] [--streams 1..16] [--into-memfd]
 *          [--json]
 *   defaults: 4G in all, 4M buffer, 1 stream.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_STREAMS 16

struct stream {
	pthread_t tx, rx;
	int memfd;    /* -1: discard */
	uint64_t off; /* this stream's range in memfd */
	int lfd;
	uint16_t port;
	uint64_t bytes; /* to send / received */
	uint64_t got;
	uint64_t done_ns;
	int err;
};

static size_t buf_size = 4u << 20;

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int parse_size(const char *s, uint64_t *ret)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 0);
	if (errno || end == s)
		return -1;
	switch (*end) {
	case 'k': case 'K': v <<= 10; end++; break;
	case 'm': case 'M': v <<= 20; end++; break;
	case 'g': case 'G': v <<= 30; end++; break;
	default: break;
	}
	if (*end)
		return -1;
	*ret = v;
	return 0;
}

static void *rx_main(void *arg)
{
	struct stream *st = arg;
	int fd = accept(st->lfd, NULL, NULL);
	if (fd < 0) {
		st->err = errno;
		return NULL;
	}
	char *buf = malloc(buf_size);
	if (!buf) {
		st->err = ENOMEM;
		close(fd);
		return NULL;
	}
	for (;;) {
		ssize_t n = recv(fd, buf, buf_size, 0);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			st->err = errno;
			break;
		}
		if (n == 0)
			break;
		if (st->memfd >= 0 &&
		    pwrite(st->memfd, buf, (size_t)n, (off_t)(st->off + st->got)) != n) {
			st->err = errno ? errno : EIO;
			break;
		}
		st->got += (uint64_t)n;
	}
	st->done_ns = now_ns();
	free(buf);
	close(fd);
	return NULL;
}

static void *tx_main(void *arg)
{
	struct stream *st = arg;
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(st->port)};
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		st->err = errno;
		if (fd >= 0)
			close(fd);
		return NULL;
	}
	char *buf = malloc(buf_size);
	if (!buf) {
		st->err = ENOMEM;
		close(fd);
		return NULL;
	}
	memset(buf, 0xa5, buf_size); /* real, non-zero pages */
	uint64_t left = st->bytes;
	size_t off = 0;
	while (left) {
		size_t len = buf_size - off;
		if (len > left)
			len = (size_t)left;
		ssize_t n = send(fd, buf + off, len, 0);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			st->err = errno;
			break;
		}
		left -= (uint64_t)n;
		off = (off + (size_t)n) % buf_size;
	}
	free(buf);
	close(fd);
	return NULL;
}

int main(int argc, char **argv)
{
	uint64_t total = 4ull << 30, b = 0;
	unsigned streams = 1;
	int json = 0, into_memfd = 0;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--bytes") && i + 1 < argc && !parse_size(argv[i + 1], &total)) {
			i++;
		} else if (!strcmp(argv[i], "--buf") && i + 1 < argc && !parse_size(argv[i + 1], &b) &&
			   b > 0 && b <= (1ull << 30)) {
			buf_size = (size_t)b;
			i++;
		} else if (!strcmp(argv[i], "--streams") && i + 1 < argc) {
			streams = (unsigned)atoi(argv[++i]);
		} else if (!strcmp(argv[i], "--into-memfd")) {
			into_memfd = 1;
		} else if (!strcmp(argv[i], "--json")) {
			json = 1;
		} else {
			fprintf(stderr,
				"usage: %s [--bytes N[K|M|G]] [--buf N[K|M|G]] [--streams 1..%d] "
				"[--into-memfd] [--json]\n",
				argv[0], MAX_STREAMS);
			return 2;
		}
	}
	if (streams < 1 || streams > MAX_STREAMS || total == 0) {
		fprintf(stderr, "%s: streams must be 1..%d and bytes > 0\n", argv[0], MAX_STREAMS);
		return 2;
	}

	struct stream st[MAX_STREAMS] = {0};
	int memfd = -1;
	if (into_memfd) {
		memfd = memfd_create("tcp-throughput", MFD_CLOEXEC);
		if (memfd < 0 || ftruncate(memfd, (off_t)total) < 0) {
			perror("memfd");
			return 1;
		}
	}
	uint64_t off = 0;
	for (unsigned i = 0; i < streams; i++) {
		st[i].bytes = total / streams + (i == 0 ? total % streams : 0);
		st[i].memfd = memfd;
		st[i].off = off;
		off += st[i].bytes;
		st[i].lfd = socket(AF_INET, SOCK_STREAM, 0);
		struct sockaddr_in sa = {.sin_family = AF_INET};
		sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		socklen_t sl = sizeof(sa);
		if (st[i].lfd < 0 || bind(st[i].lfd, (struct sockaddr *)&sa, sizeof(sa)) < 0 ||
		    listen(st[i].lfd, 1) < 0 ||
		    getsockname(st[i].lfd, (struct sockaddr *)&sa, &sl) < 0) {
			perror("listen");
			return 1;
		}
		st[i].port = ntohs(sa.sin_port);
		pthread_create(&st[i].rx, NULL, rx_main, &st[i]);
	}
	uint64_t t0 = now_ns();
	for (unsigned i = 0; i < streams; i++)
		pthread_create(&st[i].tx, NULL, tx_main, &st[i]);
	uint64_t got = 0, t1 = t0;
	int err = 0;
	for (unsigned i = 0; i < streams; i++) {
		pthread_join(st[i].tx, NULL);
		pthread_join(st[i].rx, NULL);
		close(st[i].lfd);
		got += st[i].got;
		if (st[i].done_ns > t1)
			t1 = st[i].done_ns;
		if (st[i].err)
			err = st[i].err;
	}
	if (memfd >= 0)
		close(memfd);
	if (err || got != total) {
		fprintf(stderr, "%s: %s (received %llu of %llu bytes)\n", argv[0],
			err ? strerror(err) : "short transfer", (unsigned long long)got,
			(unsigned long long)total);
		return 1;
	}
	double secs = (double)(t1 - t0) / 1e9;
	double bps = (double)got / secs;
	if (json)
		printf("{\"bytes\":%llu,\"streams\":%u,\"buf\":%zu,\"into_memfd\":%s,"
		       "\"seconds\":%.6f,\"bytes_per_sec\":%.0f}\n",
		       (unsigned long long)got, streams, buf_size, into_memfd ? "true" : "false",
		       secs, bps);
	else
		printf("tcp loopback%s: %llu bytes, %u stream(s), %zu-byte buffer: %.3f s, "
		       "%.1f MiB/s (%.2f Gbit/s)\n",
		       into_memfd ? " into a fresh memfd" : "", (unsigned long long)got, streams,
		       buf_size, secs, bps / (1 << 20),
		       bps * 8 / 1e9);
	return 0;
}
