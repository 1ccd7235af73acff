// SPDX-License-Identifier: Apache-2.0
/*
 * pagereader-bench: how fast the io_uring page reader moves guest memory out of a memfd.
 * Fills a memfd (the "guest RAM") with data and a share of zero pages, marks a share of
 * its pages dirty at random, coalesces the bitmaps into runs as the sender does, and times
 * pagereader_read() over them with a consumer that does nothing (the zero scan inside the
 * reader already touches every byte, as a TCP send would). Reports GB/s of guest memory
 * read, per queue depth and batch size; --sweep runs a grid. --pread runs the same runs
 * with pread(2) and the same zero scan, the baseline the reader has to beat. Results and
 * how they were taken are in docs/benchmarks.md.
 */
#include <errno.h>
#include <getopt.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "transport/pagereader.h"

#define PAGE PAGEREADER_PAGE_SIZE
#define CHUNK_PAGES 4096u /* the tracker's bitmap chunk */

struct opts {
	uint64_t size_mib;
	unsigned qd, batch, buffers, threads;
	unsigned dirty_pct, zero_pct, iters;
	bool sweep, pread_too;
};

static uint64_t mix(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ull;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int make_guest(uint64_t pages, unsigned zero_pct)
{
	int fd = memfd_create("pagereader-bench", MFD_CLOEXEC);
	if (fd < 0 || ftruncate(fd, (off_t)(pages * PAGE)) < 0) {
		perror("memfd");
		exit(1);
	}
	uint64_t *m = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (m == MAP_FAILED) {
		perror("mmap");
		exit(1);
	}
	for (uint64_t p = 0; p < pages; p++) {
		uint64_t *w = m + p * (PAGE / 8);
		if (mix(p) % 100 < zero_pct) {
			memset(w, 0, PAGE); /* allocate the page; a hole reads as zero too, but faster */
			continue;
		}
		for (unsigned i = 0; i < PAGE / 8; i++)
			w[i] = p * 512 + i + 1;
	}
	munmap(m, pages * PAGE);
	return fd;
}

/* Random dirty bitmaps over the whole guest, coalesced the way the sender will. */
static unsigned make_runs(uint64_t pages, unsigned dirty_pct, unsigned max_run,
			  struct page_run *runs, uint64_t *ret_pages)
{
	unsigned n = 0;
	uint64_t dirty = 0, seed = 42;

	for (uint64_t base = 0; base < pages; base += CHUNK_PAGES) {
		uint64_t bits[CHUNK_PAGES / 64] = { 0 };
		uint32_t np = (uint32_t)(pages - base < CHUNK_PAGES ? pages - base : CHUNK_PAGES);
		for (uint32_t i = 0; i < np; i++) {
			seed = mix(seed);
			if (seed % 100 < dirty_pct) {
				bits[i / 64] |= 1ull << (i % 64);
				dirty++;
			}
		}
		n += pagereader_runs_from_bitmap(0, base, bits, np, max_run, runs + n, np);
	}
	*ret_pages = dirty;
	return n;
}

static int sink_consume(void *arg, const struct page_chunk *c)
{
	uint64_t *zero = arg;
	*zero += c->nr_zero;
	return 0;
}

static double run_reader(const struct opts *o, int fd, uint64_t pages, unsigned qd,
			 unsigned batch, unsigned buffers, double *ret_zero_share)
{
	struct pagereader_config cfg = { .queue_depth = qd, .batch_pages = batch,
					 .nr_buffers = buffers, .copy_threads = o->threads };
	uint64_t size = pages * PAGE, dirty, zero = 0;
	struct pagereader *r;
	struct page_run *runs = calloc(pages, sizeof(*runs));
	int ret = pagereader_new(&cfg, &fd, &size, 1, &r);

	if (ret < 0 || !runs) {
		fprintf(stderr, "pagereader_new(qd=%u batch=%u): %s\n", qd, batch, strerror(-ret));
		exit(1);
	}
	unsigned n = make_runs(pages, o->dirty_pct, batch, runs, &dirty);
	/* One untimed pass: faults the buffers and the page cache lookups in. */
	if (pagereader_read(r, runs, n, sink_consume, &zero) < 0)
		exit(1);
	double best = 0;
	for (unsigned it = 0; it < o->iters; it++) {
		zero = 0;
		double t0 = now();
		ret = pagereader_read(r, runs, n, sink_consume, &zero);
		double dt = now() - t0;
		if (ret < 0) {
			fprintf(stderr, "pagereader_read: %s\n", strerror(-ret));
			exit(1);
		}
		double gbs = (double)dirty * PAGE / dt / 1e9;
		if (gbs > best)
			best = gbs;
	}
	*ret_zero_share = dirty ? (double)zero / (double)dirty : 0;
	pagereader_free(r);
	free(runs);
	return best;
}

/* The baseline: one pread per run piece into one buffer, the same zero scan. */
static double run_pread(const struct opts *o, int fd, uint64_t pages, unsigned batch)
{
	struct page_run *runs = calloc(pages, sizeof(*runs));
	uint8_t *buf = aligned_alloc(PAGE, (size_t)batch * PAGE);
	uint64_t dirty, zero = 0;

	if (!runs || !buf)
		exit(1);
	unsigned n = make_runs(pages, o->dirty_pct, batch, runs, &dirty);
	double best = 0;
	for (unsigned it = 0; it <= o->iters; it++) {
		double t0 = now();
		for (unsigned i = 0; i < n; i++) {
			size_t len = (size_t)runs[i].npages * PAGE;
			if (pread(fd, buf, len, (off_t)(runs[i].first_page * PAGE)) != (ssize_t)len)
				exit(1);
			for (uint32_t p = 0; p < runs[i].npages; p++)
				zero += pagereader_page_is_zero(buf + (size_t)p * PAGE);
		}
		double gbs = (double)dirty * PAGE / (now() - t0) / 1e9;
		if (it && gbs > best) /* iteration 0 warms up, like the reader's */
			best = gbs;
	}
	free(buf);
	free(runs);
	return best;
}

static void usage(const char *argv0)
{
	fprintf(stderr,
		"usage: %s [--size MiB] [--qd N] [--batch PAGES] [--buffers N] [--threads N]\n"
		"          [--dirty PCT] [--zero PCT] [--iters N] [--sweep] [--pread]\n"
		"  defaults: --size 1024 --qd 64 --batch 64 --buffers 2*qd --threads 0 (io_uring\n"
		"            decides) --dirty 100 --zero 10 --iters 5; prints the best iteration\n"
		"  --sweep: qd 1..256 x batch 1..256 (--threads applies to all)\n",
		argv0);
}

int main(int argc, char **argv)
{
	struct opts o = { .size_mib = 1024, .qd = 64, .batch = 64, .dirty_pct = 100,
			  .zero_pct = 10, .iters = 5 };
	static const struct option lo[] = {
		{ "size", required_argument, NULL, 's' },  { "qd", required_argument, NULL, 'q' },
		{ "batch", required_argument, NULL, 'b' }, { "buffers", required_argument, NULL, 'n' },
		{ "dirty", required_argument, NULL, 'd' }, { "zero", required_argument, NULL, 'z' },
		{ "iters", required_argument, NULL, 'i' }, { "sweep", no_argument, NULL, 'S' },
		{ "pread", no_argument, NULL, 'P' },	   { "help", no_argument, NULL, 'h' },
		{ "threads", required_argument, NULL, 't' },
		{ 0 },
	};
	int c;

	while ((c = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
		switch (c) {
		case 's': o.size_mib = strtoull(optarg, NULL, 0); break;
		case 'q': o.qd = (unsigned)strtoul(optarg, NULL, 0); break;
		case 'b': o.batch = (unsigned)strtoul(optarg, NULL, 0); break;
		case 'n': o.buffers = (unsigned)strtoul(optarg, NULL, 0); break;
		case 'd': o.dirty_pct = (unsigned)strtoul(optarg, NULL, 0); break;
		case 'z': o.zero_pct = (unsigned)strtoul(optarg, NULL, 0); break;
		case 'i': o.iters = (unsigned)strtoul(optarg, NULL, 0); break;
		case 't': o.threads = (unsigned)strtoul(optarg, NULL, 0); break;
		case 'S': o.sweep = true; break;
		case 'P': o.pread_too = true; break;
		case 'h': usage(argv[0]); return 0;
		default: usage(argv[0]); return 2;
		}
	}
	if (!o.size_mib || o.dirty_pct > 100 || o.zero_pct > 100 || !o.iters) {
		usage(argv[0]);
		return 2;
	}

	uint64_t pages = o.size_mib << 20 >> 12;
	int fd = make_guest(pages, o.zero_pct);
	printf("guest %llu MiB memfd, %u%% dirty (random), %u%% zero pages, copy_threads %u, "
	       "best of %u\n",
	       (unsigned long long)o.size_mib, o.dirty_pct, o.zero_pct, o.threads, o.iters);
	printf("%-8s %6s %6s %8s %10s %8s\n", "reader", "qd", "batch", "buffers", "GB/s", "zero");

	static const unsigned sweep_qd[] = { 1, 2, 4, 16, 64, 256 };
	static const unsigned sweep_batch[] = { 1, 16, 64, 256 };
	unsigned nq = o.sweep ? 6 : 1, nb = o.sweep ? 4 : 1;
	for (unsigned qi = 0; qi < nq; qi++) {
		for (unsigned bi = 0; bi < nb; bi++) {
			unsigned qd = o.sweep ? sweep_qd[qi] : o.qd;
			unsigned batch = o.sweep ? sweep_batch[bi] : o.batch;
			unsigned buffers = o.sweep ? 0 : o.buffers;
			double zs;
			double gbs = run_reader(&o, fd, pages, qd, batch, buffers, &zs);
			printf("%-8s %6u %6u %8u %10.2f %7.1f%%\n", "io_uring", qd, batch,
			       buffers ? buffers : 2 * qd, gbs, zs * 100);
			fflush(stdout);
		}
	}
	if (o.pread_too) {
		for (unsigned bi = 0; bi < nb; bi++) {
			unsigned batch = o.sweep ? sweep_batch[bi] : o.batch;
			printf("%-8s %6s %6u %8s %10.2f\n", "pread", "-", batch, "-",
			       run_pread(&o, fd, pages, batch));
		}
	}
	close(fd);
	return 0;
}
