// SPDX-License-Identifier: Apache-2.0
/*
 * rdma-throughput: the data path's page throughput and CPU cost, RDMA against TCP. Both
 * transports of the library move the same guest memory (a memfd of data pages, a share of
 * them zero) from a source to a destination in one process: RDMA from the device at
 * --src-ip to the one at --dst-ip (in the Soft-RoCE VM: 10.77.0.1 on rxe_a to 10.77.0.2 on
 * rxe_b), TCP to a listener on --dst-ip. Each run sends the whole memory --passes times as
 * fenced batches (after one warm-up pass) and reports MB/s of guest memory moved and CPU
 * seconds per GB (getrusage of the whole process: source and destination together; with
 * RDMA the destination's CPU does next to nothing).
 *
 * Usage: rdma-throughput [--src-ip IP] [--dst-ip IP] [--mib N] [--passes N] [--qps N[,N...]]
 *          [--zero PCT] [--only rdma|tcp]
 *   defaults: 10.77.0.1 -> 10.77.0.2, 64 MiB, 3 passes, qps 1,4, 10 % zero pages.
 * Run it in the VM: tests/rdma/run-vm.sh --bin-dir BUILD tests/rdma/bench.sh [ARGS...]
 */
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "transport/transport.h"

#define PAGE 4096u

static const uint8_t token[XPORT_TOKEN_LEN] = "bench-rdma-token";

struct opts {
	const char *src_ip, *dst_ip, *only;
	uint64_t mib;
	unsigned passes, zero_pct;
	unsigned qps[8], nr_qps;
};

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double cpu_s(void)
{
	struct rusage ru;

	getrusage(RUSAGE_SELF, &ru);
	return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
	       (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

static void die(const char *what, int r, const char *err)
{
	fprintf(stderr, "rdma-throughput: %s: %s%s%s\n", what, strerror(r < 0 ? -r : r),
		err && *err ? ": " : "", err ? err : "");
	exit(1);
}

static void *memfd_map(uint64_t size, int *ret_fd)
{
	int fd = memfd_create("rdma-throughput", MFD_CLOEXEC);

	if (fd < 0 || ftruncate(fd, (off_t)size) < 0)
		die("memfd", -errno, NULL);
	void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED)
		die("mmap", -errno, NULL);
	*ret_fd = fd;
	return p;
}

/* TCP: a listener on dst_ip, every STREAM_HELLO read and its stream handed to dst. */
static struct xport_src *tcp_pair(const struct opts *o, const struct xport_src_config *cfg,
				  int src_fd, uint64_t size, struct xport_dst *dst)
{
	struct sockaddr_in a = { .sin_family = AF_INET };
	socklen_t al = sizeof(a);
	struct xport_src *src = NULL;
	char err[256] = "", hp[80];
	int l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

	if (l < 0 || inet_pton(AF_INET, o->dst_ip, &a.sin_addr) != 1 ||
	    bind(l, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(l, 128) < 0 ||
	    getsockname(l, (struct sockaddr *)&a, &al) < 0)
		die("tcp listener", -errno, NULL);
	snprintf(hp, sizeof(hp), "%s:%u", o->dst_ip, ntohs(a.sin_port));
	int r = xport_src_tcp_new(cfg, hp, token, &src_fd, &size, 1, &src, err, sizeof(err));
	if (r < 0)
		die("xport_src_tcp_new", r, err);
	for (unsigned i = 0; i < cfg->streams; i++) {
		uint8_t hdr[PROTO_HDR_LEN], payload[64];
		struct proto_hdr h;
		struct proto_stream_hello sh;
		int fd = accept(l, NULL, NULL);
		if (fd < 0 || recv(fd, hdr, sizeof(hdr), MSG_WAITALL) != (ssize_t)sizeof(hdr) ||
		    proto_hdr_decode(hdr, sizeof(payload), &h) < 0 ||
		    recv(fd, payload, h.len, MSG_WAITALL) != (ssize_t)h.len ||
		    proto_decode_stream_hello(payload, h.len, &sh, err, sizeof(err)) < 0)
			die("accepting a stream", -EPROTO, err);
		r = xport_dst_add_stream(dst, fd, sh.stream);
		if (r < 0)
			die("xport_dst_add_stream", r, NULL);
	}
	close(l);
	return src;
}

static void run(const struct opts *o, const char *kind, unsigned qps, int src_fd,
		uint8_t *dst_mem, uint64_t size)
{
	struct xport_region reg = { .hva = dst_mem, .size = size };
	struct xport_src_config cfg = {
		.streams = qps,
		.reader = { .queue_depth = 16, .batch_pages = 64, .nr_buffers = 32 },
	};
	struct page_run runs[1] = { { .region = 0, .first_page = 0, .npages = (uint32_t)(size / PAGE) } };
	struct xport_dst *dst = NULL;
	struct xport_src *src = NULL;
	char err[256] = "";
	int r;

	memset(dst_mem, 0, size);
	if (!strcmp(kind, "rdma")) {
		r = xport_dst_rdma_new(&reg, 1, qps, XPORT_RDMA_DST_ZEROED, o->dst_ip, token, &dst,
				       err, sizeof(err));
		if (r < 0)
			die("xport_dst_rdma_new", r, err);
		r = xport_src_rdma_new(&cfg, o->dst_ip, xport_dst_rdma_port(dst), token, &src_fd,
				       &size, 1, &src, err, sizeof(err));
		if (r < 0)
			die("xport_src_rdma_new", r, err);
	} else {
		r = xport_dst_tcp_new(&reg, 1, qps, &dst);
		if (r < 0)
			die("xport_dst_tcp_new", r, NULL);
		src = tcp_pair(o, &cfg, src_fd, size, dst);
	}
	/* Warm-up: connections, destination pages and pinned buffers all faulted in. */
	uint64_t fence = 1;
	if ((r = xport_src_send(src, runs, 1, fence)) < 0 ||
	    (r = xport_dst_wait_fence(dst, fence, 60000)) < 0)
		die("warm-up pass", r, xport_dst_error(dst));
	double t0 = now_s(), c0 = cpu_s();
	for (unsigned p = 0; p < o->passes; p++) {
		fence++;
		r = xport_src_send(src, runs, 1, fence);
		if (r < 0)
			die("send", r, NULL);
	}
	r = xport_dst_wait_fence(dst, fence, 60000);
	if (r < 0)
		die("wait_fence", r, xport_dst_error(dst));
	double secs = now_s() - t0, cpu = cpu_s() - c0;
	double gb = (double)size * o->passes / 1e9;
	printf("%-5s %4u %8llu %8.2f %10.1f %12.2f\n", kind, qps,
	       (unsigned long long)(size >> 20) * o->passes, secs, gb * 1e3 / secs, cpu / gb);
	fflush(stdout);
	xport_src_free(src);
	xport_dst_free(dst);
}

static void usage(void)
{
	fprintf(stderr, "usage: rdma-throughput [--src-ip IP] [--dst-ip IP] [--mib N] "
			"[--passes N] [--qps N[,N...]] [--zero PCT] [--only rdma|tcp]\n");
	exit(2);
}

int main(int argc, char **argv)
{
	struct opts o = { .src_ip = "10.77.0.1", .dst_ip = "10.77.0.2", .mib = 64, .passes = 3,
			  .zero_pct = 10, .qps = { 1, 4 }, .nr_qps = 2 };
	static const struct option lo[] = {
		{ "src-ip", required_argument, NULL, 's' }, { "dst-ip", required_argument, NULL, 'd' },
		{ "mib", required_argument, NULL, 'm' },    { "passes", required_argument, NULL, 'p' },
		{ "qps", required_argument, NULL, 'q' },    { "zero", required_argument, NULL, 'z' },
		{ "only", required_argument, NULL, 'o' },   { NULL, 0, NULL, 0 },
	};
	char why[256] = "";
	int c;

	while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		switch (c) {
		case 's': o.src_ip = optarg; break;
		case 'd': o.dst_ip = optarg; break;
		case 'm': o.mib = strtoull(optarg, NULL, 0); break;
		case 'p': o.passes = (unsigned)atoi(optarg); break;
		case 'z': o.zero_pct = (unsigned)atoi(optarg); break;
		case 'o': o.only = optarg; break;
		case 'q': {
			o.nr_qps = 0;
			for (char *t = strtok(optarg, ","); t && o.nr_qps < 8; t = strtok(NULL, ","))
				o.qps[o.nr_qps++] = (unsigned)atoi(t);
			break;
		}
		default: usage();
		}
	}
	if (!o.mib || !o.passes || !o.nr_qps || o.zero_pct > 100)
		usage();
	struct rlimit rl;
	if (getrlimit(RLIMIT_MEMLOCK, &rl) == 0) {
		rl.rlim_cur = rl.rlim_max;
		(void)setrlimit(RLIMIT_MEMLOCK, &rl);
	}
	bool rdma = !o.only || !strcmp(o.only, "rdma");
	bool tcp = !o.only || !strcmp(o.only, "tcp");
	if (rdma && (!xport_rdma_usable(o.src_ip, why, sizeof(why)) ||
		     !xport_rdma_usable(o.dst_ip, why, sizeof(why)))) {
		fprintf(stderr, "rdma-throughput: no RDMA between %s and %s: %s\n", o.src_ip,
			o.dst_ip, why);
		return 77;
	}

	uint64_t size = o.mib << 20;
	int src_fd, dst_fd;
	uint64_t *src = memfd_map(size, &src_fd);
	uint8_t *dst = memfd_map(size, &dst_fd);
	uint64_t seed = 0x5eed;
	for (uint64_t p = 0; p < size / PAGE; p++) {
		uint64_t *w = src + p * (PAGE / 8);
		seed = seed * 6364136223846793005ull + 1442695040888963407ull;
		if ((seed >> 33) % 100 < o.zero_pct)
			continue;
		for (unsigned i = 0; i < PAGE / 8; i++)
			w[i] = seed ^ (i * 0x9e3779b97f4a7c15ull);
	}

	printf("# %llu MiB guest memory, %u%% zero pages, %u passes after a warm-up; "
	       "CPU = source + destination\n",
	       (unsigned long long)o.mib, o.zero_pct, o.passes);
	printf("%-5s %4s %8s %8s %10s %12s\n", "kind", "qps", "MiB", "seconds", "MB/s",
	       "CPU s/GB");
	for (unsigned k = 0; k < o.nr_qps; k++) {
		if (rdma)
			run(&o, "rdma", o.qps[k], src_fd, dst, size);
		if (tcp)
			run(&o, "tcp", o.qps[k], src_fd, dst, size);
	}
	munmap(src, size);
	munmap(dst, size);
	close(src_fd);
	close(dst_fd);
	return 0;
}
