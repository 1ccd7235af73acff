// SPDX-License-Identifier: Apache-2.0
/* The VM-free test helpers (tio.h). */
#include "tio.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdbool.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

uint64_t tio_mix(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ull;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

static uint64_t rng_state = 0x5eed;

uint64_t tio_rnd(void)
{
	rng_state = tio_mix(rng_state);
	return rng_state;
}

int64_t tio_now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void tio_sleep_ms(unsigned ms)
{
	struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000 };

	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

int tio_listen_any(uint16_t *ret_port)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t al = sizeof(a);
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

	assert_true(fd >= 0);
	assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0);
	assert_int_equal(listen(fd, 128), 0);
	assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &al), 0);
	*ret_port = ntohs(a.sin_port);
	return fd;
}

void tio_tcp_pair(int *a, int *b)
{
	uint16_t port;
	int l = tio_listen_any(&port);
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(port),
				  .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };

	*a = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	assert_true(*a >= 0);
	assert_int_equal(connect(*a, (struct sockaddr *)&sa, sizeof(sa)), 0);
	*b = accept(l, NULL, NULL);
	assert_true(*b >= 0);
	close(l);
}

/* Sends all n bytes; with refused_ok a peer that closed (EPIPE, ECONNRESET) ends it. */
static void write_all(int fd, const void *p, size_t n, bool refused_ok)
{
	const uint8_t *b = p;

	while (n) {
		ssize_t w = send(fd, b, n, MSG_NOSIGNAL);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0 && refused_ok && (errno == EPIPE || errno == ECONNRESET))
			return;
		assert_true(w > 0);
		b += w;
		n -= (size_t)w;
	}
}

void tio_write_all(int fd, const void *p, size_t n)
{
	write_all(fd, p, n, false);
}

void tio_write_refused(int fd, const void *p, size_t n)
{
	write_all(fd, p, n, true);
}

void tio_read_all(int fd, void *p, size_t n)
{
	uint8_t *b = p;

	while (n) {
		ssize_t r = recv(fd, b, n, 0);
		if (r < 0 && errno == EINTR)
			continue;
		assert_true(r > 0);
		b += r;
		n -= (size_t)r;
	}
}

uint8_t *tio_memfd_map(uint64_t size, int *ret_fd)
{
	int fd = memfd_create("ferry-test", MFD_CLOEXEC);

	assert_true(fd >= 0);
	assert_int_equal(ftruncate(fd, (off_t)size), 0);
	void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	assert_true(p != MAP_FAILED);
	*ret_fd = fd;
	return p;
}

bool tio_page_zero(const void *p)
{
	const uint64_t *w = p;

	for (unsigned i = 0; i < TIO_PAGE / 8; i++)
		if (w[i])
			return false;
	return true;
}

void tio_fill_page(uint8_t *p, uint64_t salt)
{
	if (tio_rnd() % 5 == 0) {
		memset(p, 0, TIO_PAGE);
		return;
	}
	uint64_t *w = (uint64_t *)p;
	for (unsigned i = 0; i < TIO_PAGE / 8; i++)
		w[i] = tio_mix(salt ^ tio_rnd() ^ i);
	if (tio_rnd() % 8 == 0) {
		memset(p, 0, TIO_PAGE);
		p[tio_rnd() % TIO_PAGE] = 1;
	}
}
