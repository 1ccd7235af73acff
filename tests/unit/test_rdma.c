// SPDX-License-Identifier: Apache-2.0
/*
 * Description: the RDMA transport (transport/rdma*.c) between two real RDMA devices — in
 * the Soft-RoCE VM of tests/rdma (run by tests/rdma/transport.sh), rxe_a at 10.77.0.1 for
 * the source and rxe_b at 10.77.0.2 for the destination (FERRY_RDMA_SRC_IP and
 * FERRY_RDMA_DST_IP override them). Exits 77 when either address has no usable device.
 * Random page runs over three regions with random content, zero pages and pages that turn
 * zero later, sent over 1 and 4 queue pairs in fenced batches, land byte-exact in the
 * destination's memory (fresh memory, zero pages skipped; and memory full of garbage,
 * every zero page written); stats agree on both sides. Runs outside our regions or the
 * destination's table are refused before anything moves. A hand-made verbs client shows
 * the NIC side: a wrong token is rejected, a WRITE past a registered region fails with a
 * remote access error and leaves the memory beside it untouched, the destination reports
 * the dead queue pair, and after xport_dst_free a WRITE with the old key fails (also
 * over a live connection to a new destination over the same memory). A
 * destination freed mid-send, or killed (a child process), fails the source's send within
 * seconds, and a source killed mid-send fails the destination's fence wait as fast;
 * cancel cuts a throttled send short; the bandwidth cap holds; postcopy fetches
 * pages with RDMA READ from exposed source memory — into the destination's memory, or,
 * after xport_dst_set_uffd, through a userfaultfd into pages punched out of the memfd,
 * waking a thread blocked on a missing page, leaving pages already there alone, from
 * several threads at once, while a WRITE into such a region is refused by the NIC.
 * Prints throughput (informative).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/userfaultfd.h>
#include <stdatomic.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <cmocka.h>

#include "tio.h"

#include <infiniband/verbs.h>
#include <rdma/rdma_cma.h>

#include "transport/transport.h"

#define PAGE 4096u
#define NR_REGIONS 3u
static const uint64_t region_pages[NR_REGIONS] = { 1024, 512, 1536 }; /* 12 MiB in all */
#define MAX_REGION_PAGES 1536u

static const uint8_t token[XPORT_TOKEN_LEN] = "0123456789abcdef";
static const char *src_ip = "10.77.0.1";
static const char *dst_ip = "10.77.0.2";
static const char *self_exe;

/* Memlock-friendly reader settings. */
static const struct pagereader_config small_reader = {
	.queue_depth = 4, .batch_pages = 32, .nr_buffers = 8
};

/* ---------------- helpers ---------------- */

/* ---------------- the source and destination memory ---------------- */

struct mem {
	int src_fd[NR_REGIONS];
	uint8_t *src[NR_REGIONS];
	int dst_fd[NR_REGIONS];
	uint8_t *dst[NR_REGIONS];
	uint64_t sizes[NR_REGIONS];
};

static int mem_setup(void **state)
{
	struct mem *m = calloc(1, sizeof(*m));

	for (unsigned r = 0; r < NR_REGIONS; r++) {
		m->sizes[r] = region_pages[r] * PAGE;
		m->src[r] = tio_memfd_map(m->sizes[r], &m->src_fd[r]);
		for (uint64_t p = 0; p < region_pages[r]; p++)
			tio_fill_page(m->src[r] + p * PAGE, (r << 20) | p);
		m->dst[r] = tio_memfd_map(m->sizes[r], &m->dst_fd[r]);
	}
	*state = m;
	return 0;
}

static int mem_teardown(void **state)
{
	struct mem *m = *state;

	for (unsigned r = 0; r < NR_REGIONS; r++) {
		munmap(m->src[r], m->sizes[r]);
		munmap(m->dst[r], m->sizes[r]);
		close(m->src_fd[r]);
		close(m->dst_fd[r]);
	}
	free(m);
	return 0;
}

static struct xport_dst *open_dst(struct mem *m, unsigned nr_regions, unsigned qps,
				  unsigned flags)
{
	struct xport_region reg[NR_REGIONS];
	struct xport_dst *dst = NULL;
	char err[256] = "";

	for (unsigned r = 0; r < nr_regions; r++)
		reg[r] = (struct xport_region){ .hva = m->dst[r], .size = m->sizes[r] };
	int rc = xport_dst_rdma_new(reg, nr_regions, qps, flags, dst_ip, token, &dst, err,
				    sizeof(err));
	if (rc < 0)
		fail_msg("xport_dst_rdma_new: %s (%s)", strerror(-rc), err);
	assert_true(xport_dst_rdma_port(dst) > 0);
	return dst;
}

static struct xport_src *open_src_to(uint16_t port, unsigned qps, uint64_t bw,
				     const struct pagereader_config *rc, const int *fds,
				     const uint64_t *sizes, unsigned nr_regions)
{
	struct xport_src_config cfg = { .streams = qps, .bandwidth = bw };
	struct xport_src *src = NULL;
	char err[256] = "";

	if (rc)
		cfg.reader = *rc;
	int r = xport_src_rdma_new(&cfg, dst_ip, port, token, fds, sizes, nr_regions, &src, err,
				   sizeof(err));
	if (r < 0)
		fail_msg("xport_src_rdma_new: %s (%s)", strerror(-r), err);
	assert_string_equal(xport_src_name(src), "rdma");
	return src;
}

static struct xport_src *open_src(struct xport_dst *dst, struct mem *m, unsigned qps,
				  uint64_t bw)
{
	return open_src_to(xport_dst_rdma_port(dst), qps, bw, &small_reader, m->src_fd,
			   m->sizes, NR_REGIONS);
}

static unsigned random_runs(struct page_run *runs, unsigned max, uint32_t max_len)
{
	unsigned n = 1 + (unsigned)(tio_rnd() % max);

	for (unsigned i = 0; i < n; i++) {
		uint32_t r = (uint32_t)(tio_rnd() % NR_REGIONS);
		uint32_t len = 1 + (uint32_t)(tio_rnd() % max_len);
		if (len > region_pages[r])
			len = (uint32_t)region_pages[r];
		uint64_t first = tio_rnd() % (region_pages[r] - len + 1);
		runs[i] = (struct page_run){ .region = r, .first_page = first, .npages = len };
	}
	return n;
}

/*
 * Random batches over `qps` queue pairs; between batches some sent pages change (some to
 * zero) and go again. Zeroed: the destination starts zero and says so (zero pages it never
 * got data for are skipped); otherwise it starts full of garbage and every page sent must
 * overwrite it. At the end every sent page equals the source, every other page is as it
 * started.
 */
static void transfer(struct mem *m, unsigned qps, bool zeroed)
{
	uint8_t *sent[NR_REGIONS];
	struct page_run runs[48];
	uint64_t want_zero = 0, want_data = 0;
	const unsigned batches = 6;
	uint8_t fill = zeroed ? 0 : 0xa5;

	for (unsigned r = 0; r < NR_REGIONS; r++) {
		memset(m->dst[r], fill, m->sizes[r]);
		sent[r] = calloc(region_pages[r], 1);
	}
	struct xport_dst *dst = open_dst(m, NR_REGIONS, qps, zeroed ? XPORT_RDMA_DST_ZEROED : 0);
	struct xport_src *src = open_src(dst, m, qps, 0);

	for (uint64_t fence = 1; fence <= batches; fence++) {
		unsigned n = random_runs(runs, 32, fence % 2 ? 48 : 400);
		if (fence > 1) {
			for (unsigned k = 0; k < 16 && n < 48; k++) {
				uint32_t r = (uint32_t)(tio_rnd() % NR_REGIONS);
				uint64_t p = tio_rnd() % region_pages[r];
				if (!sent[r][p])
					continue;
				uint8_t *pg = m->src[r] + p * PAGE;
				tio_fill_page(pg, p ^ (fence << 32));
				if (k % 2)
					memset(pg, 0, PAGE); /* data turned zero */
				runs[n++] = (struct page_run){ .region = r, .first_page = p,
							       .npages = 1 };
			}
		}
		for (unsigned i = 0; i < n; i++) {
			for (uint64_t p = runs[i].first_page;
			     p < runs[i].first_page + runs[i].npages; p++) {
				sent[runs[i].region][p] = 1;
				if (tio_page_zero(m->src[runs[i].region] + p * PAGE))
					want_zero++;
				else
					want_data++;
			}
		}
		int r = xport_src_send(src, runs, n, fence);
		if (r)
			fail_msg("send(fence %llu): %s", (unsigned long long)fence, strerror(-r));
		r = xport_dst_wait_fence(dst, fence, 20000);
		if (r)
			fail_msg("wait_fence(%llu): %s: %s", (unsigned long long)fence,
				 strerror(-r), xport_dst_error(dst));
	}
	for (unsigned r = 0; r < NR_REGIONS; r++) {
		for (uint64_t p = 0; p < region_pages[r]; p++) {
			const uint8_t *d = m->dst[r] + p * PAGE;
			if (sent[r][p]) {
				if (memcmp(d, m->src[r] + p * PAGE, PAGE))
					fail_msg("region %u page %llu differs", r,
						 (unsigned long long)p);
			} else {
				for (unsigned i = 0; i < PAGE; i++)
					if (d[i] != fill)
						fail_msg("unsent page %u/%llu was written", r,
							 (unsigned long long)p);
			}
		}
		free(sent[r]);
	}

	struct xport_src_stats ss;
	struct xport_dst_stats ds;
	xport_src_stats(src, &ss);
	xport_dst_stats(dst, &ds);
	assert_int_equal(ss.batches, batches);
	assert_int_equal(ss.zero_pages, want_zero);
	assert_int_equal(ss.pages, want_data);
	assert_int_equal(ds.zero_pages, want_zero);
	assert_int_equal(ds.pages, want_data);
	assert_int_equal(ds.bytes, ss.bytes);
	assert_int_equal(ds.streams, qps);
	if (zeroed) /* zero pages never written with data cost nothing on the wire */
		assert_true(ss.bytes < (want_data + want_zero) * PAGE);
	else
		assert_true(ss.bytes >= (want_data + want_zero) * PAGE);
	assert_string_equal(xport_dst_error(dst), "");
	print_message("%u qp%s, %s destination: %llu data + %llu zero pages, %llu bytes\n", qps,
		      qps > 1 ? "s" : "", zeroed ? "zeroed" : "garbage",
		      (unsigned long long)want_data, (unsigned long long)want_zero,
		      (unsigned long long)ss.bytes);

	/* The source leaving cleanly is not an error on the destination. */
	xport_src_free(src);
	tio_sleep_ms(200);
	assert_int_equal(xport_dst_wait_fence(dst, batches, 5000), 0);
	xport_dst_free(dst);
}

static void transfer_1(void **state)
{
	transfer(*state, 1, true);
}

static void transfer_4(void **state)
{
	transfer(*state, 4, true);
}

static void transfer_garbage_3(void **state)
{
	transfer(*state, 3, false);
}

/* Runs outside our regions or outside the destination's table never move a byte. */
static void bad_runs(void **state)
{
	struct mem *m = *state;
	/* The destination has only two regions, and region 1 is smaller than ours. */
	struct xport_region reg[2] = { { .hva = m->dst[0], .size = m->sizes[0] },
				       { .hva = m->dst[1], .size = m->sizes[1] - 64 * PAGE } };
	struct xport_dst *dst = NULL;
	char err[256] = "";

	assert_int_equal(xport_dst_rdma_new(reg, 2, 1, XPORT_RDMA_DST_ZEROED, dst_ip, token,
					    &dst, err, sizeof(err)),
			 0);
	struct xport_src *src = open_src(dst, m, 1, 0);
	const struct page_run bad[] = {
		{ .region = 3, .first_page = 0, .npages = 1 },   /* no such region here */
		{ .region = 2, .first_page = 0, .npages = 1 },   /* not in the destination's table */
		{ .region = 1, .first_page = 448, .npages = 1 }, /* past the destination's region 1 */
		{ .region = 1, .first_page = 447, .npages = 2 },
		{ .region = 0, .first_page = 1024, .npages = 1 }, /* past both */
		{ .region = 0, .first_page = 0, .npages = 0 },
	};
	for (unsigned i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		assert_int_equal(xport_src_send(src, &bad[i], 1, 1), -EINVAL);
	assert_int_equal(xport_src_send(src, NULL, 3, 1), -EINVAL);
	struct xport_src_stats ss;
	xport_src_stats(src, &ss);
	assert_int_equal(ss.pages + ss.zero_pages + ss.bytes + ss.batches, 0);
	/* Still usable: a fence alone, then the last page the destination has. */
	assert_int_equal(xport_src_send(src, NULL, 0, 7), 0);
	assert_int_equal(xport_dst_wait_fence(dst, 7, 10000), 0);
	struct page_run ok = { .region = 1, .first_page = 447, .npages = 1 };
	m->src[1][447 * PAGE] = 0x42;
	assert_int_equal(xport_src_send(src, &ok, 1, 8), 0);
	assert_int_equal(xport_dst_wait_fence(dst, 8, 10000), 0);
	assert_memory_equal(m->dst[1] + 447 * PAGE, m->src[1] + 447 * PAGE, PAGE);
	xport_src_free(src);
	xport_dst_free(dst);
}

/* ---------------- a hand-made verbs client (the NIC's side of the rules) ---------------- */

struct raw {
	struct rdma_event_channel *ch;
	struct rdma_cm_id *id;
	struct ibv_pd *pd;
	struct ibv_cq *cq;
	struct ibv_mr *mr;
	uint8_t *buf; /* 4 receive slots of 2 KiB, a send slot, then 64 KiB of WRITE data */
	unsigned nr;
	struct {
		uint64_t addr, len;
		uint32_t rkey;
	} rr[XPORT_MAX_REGIONS];
	bool qp;
	uint32_t rej_code;
};

#define RAW_MSG 2048u
#define RAW_SEND_OFF (4 * RAW_MSG)
#define RAW_DATA_OFF (5 * RAW_MSG)
#define RAW_BUF_LEN (RAW_DATA_OFF + 65536)

static struct rdma_cm_event *raw_event(struct raw *c, int timeout_ms)
{
	struct pollfd pfd = { .fd = c->ch->fd, .events = POLLIN };
	struct rdma_cm_event *ev = NULL;

	if (poll(&pfd, 1, timeout_ms) != 1)
		fail_msg("no rdma_cm event within %d ms", timeout_ms);
	assert_int_equal(rdma_get_cm_event(c->ch, &ev), 0);
	return ev;
}

/* Polls until one completion arrives (or fails the test after timeout_ms). */
static struct ibv_wc raw_wc(struct raw *c, int timeout_ms)
{
	struct ibv_wc wc;
	int64_t end = tio_now_ms() + timeout_ms;

	for (;;) {
		int n = ibv_poll_cq(c->cq, 1, &wc);
		assert_true(n >= 0);
		if (n == 1)
			return wc;
		if (tio_now_ms() > end)
			fail_msg("no completion within %d ms", timeout_ms);
		tio_sleep_ms(1);
	}
}

static void raw_post_recv(struct raw *c, unsigned slot)
{
	struct ibv_sge sge = { .addr = (uintptr_t)c->buf + slot * RAW_MSG, .length = RAW_MSG,
			       .lkey = c->mr->lkey };
	struct ibv_recv_wr wr = { .wr_id = 100 + slot, .sg_list = &sge, .num_sge = 1 }, *bad;

	assert_int_equal(ibv_post_recv(c->id->qp, &wr, &bad), 0);
}

static void put_le(uint8_t *p, uint64_t v, unsigned n)
{
	for (unsigned i = 0; i < n; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t get_le(const uint8_t *p, unsigned n)
{
	uint64_t v = 0;

	for (unsigned i = 0; i < n; i++)
		v |= (uint64_t)p[i] << (8 * i);
	return v;
}

/*
 * Connects as queue pair `qp` of `nr_qps` with the given token, following
 * docs/protocol.md §11 by hand. Returns true when established (and the region table came);
 * false when rejected, with c->rej_code set.
 */
static bool raw_connect(struct raw *c, uint16_t port, const uint8_t *tok, unsigned qp,
			unsigned nr_qps)
{
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(port) };
	struct rdma_cm_event *ev;

	memset(c, 0, sizeof(*c));
	assert_int_equal(inet_pton(AF_INET, dst_ip, &sa.sin_addr), 1);
	c->ch = rdma_create_event_channel();
	assert_non_null(c->ch);
	assert_int_equal(rdma_create_id(c->ch, &c->id, NULL, RDMA_PS_TCP), 0);
	assert_int_equal(rdma_resolve_addr(c->id, NULL, (struct sockaddr *)&sa, 5000), 0);
	ev = raw_event(c, 6000);
	assert_int_equal(ev->event, RDMA_CM_EVENT_ADDR_RESOLVED);
	rdma_ack_cm_event(ev);
	assert_int_equal(rdma_resolve_route(c->id, 5000), 0);
	ev = raw_event(c, 6000);
	assert_int_equal(ev->event, RDMA_CM_EVENT_ROUTE_RESOLVED);
	rdma_ack_cm_event(ev);
	c->pd = ibv_alloc_pd(c->id->verbs);
	assert_non_null(c->pd);
	c->cq = ibv_create_cq(c->id->verbs, 64, NULL, NULL, 0);
	assert_non_null(c->cq);
	struct ibv_qp_init_attr attr = {
		.send_cq = c->cq, .recv_cq = c->cq, .qp_type = IBV_QPT_RC,
		.cap = { .max_send_wr = 16, .max_recv_wr = 16, .max_send_sge = 1, .max_recv_sge = 1 },
	};
	assert_int_equal(rdma_create_qp(c->id, c->pd, &attr), 0);
	c->qp = true;
	c->buf = aligned_alloc(PAGE, RAW_BUF_LEN);
	memset(c->buf, 0, RAW_BUF_LEN);
	c->mr = ibv_reg_mr(c->pd, c->buf, RAW_BUF_LEN, IBV_ACCESS_LOCAL_WRITE);
	assert_non_null(c->mr);
	for (unsigned i = 0; i < 4; i++)
		raw_post_recv(c, i);

	/* REQ: magic, version 1, qp, nr_qps, receive depth, caps, token. */
	uint8_t req[32];
	put_le(req, 0x52595246u, 4);
	put_le(req + 4, 1, 2);
	put_le(req + 6, qp, 2);
	put_le(req + 8, nr_qps, 2);
	put_le(req + 10, 4, 2);
	put_le(req + 12, 0, 4);
	memcpy(req + 16, tok, XPORT_TOKEN_LEN);
	struct rdma_conn_param cp = { .private_data = req, .private_data_len = sizeof(req),
				      .responder_resources = 1, .initiator_depth = 1,
				      .retry_count = 3, .rnr_retry_count = 7 };
	assert_int_equal(rdma_connect(c->id, &cp), 0);
	ev = raw_event(c, 10000);
	if (ev->event != RDMA_CM_EVENT_ESTABLISHED) {
		assert_int_equal(ev->event, RDMA_CM_EVENT_REJECTED);
		assert_true(ev->param.conn.private_data_len >= 8);
		assert_int_equal(get_le(ev->param.conn.private_data, 4), 0x52595246u);
		c->rej_code = (uint32_t)get_le((const uint8_t *)ev->param.conn.private_data + 4, 4);
		rdma_ack_cm_event(ev);
		return false;
	}
	rdma_ack_cm_event(ev);

	/* The first message: the region table. */
	struct ibv_wc wc = raw_wc(c, 10000);
	assert_int_equal(wc.status, IBV_WC_SUCCESS);
	assert_int_equal(wc.opcode, IBV_WC_RECV);
	const uint8_t *msg = c->buf + (wc.wr_id - 100) * RAW_MSG;
	assert_int_equal(get_le(msg, 2), 1); /* REGIONS */
	c->nr = (unsigned)get_le(msg + 12, 4);
	assert_true(c->nr >= 1 && c->nr <= XPORT_MAX_REGIONS);
	assert_int_equal(get_le(msg + 4, 4), 8 + 20 * c->nr);
	for (unsigned i = 0; i < c->nr; i++) {
		const uint8_t *e = msg + 16 + 20 * i;
		c->rr[i].addr = get_le(e, 8);
		c->rr[i].len = get_le(e + 8, 8);
		c->rr[i].rkey = (uint32_t)get_le(e + 16, 4);
	}
	raw_post_recv(c, (unsigned)(wc.wr_id - 100));
	return true;
}

/* One signalled WRITE of len bytes of `byte` to addr with rkey; its completion status. */
static enum ibv_wc_status raw_write(struct raw *c, uint64_t addr, uint32_t rkey, uint32_t len,
				    uint8_t byte)
{
	struct ibv_sge sge = { .addr = (uintptr_t)c->buf + RAW_DATA_OFF, .length = len,
			       .lkey = c->mr->lkey };
	struct ibv_send_wr wr = { .wr_id = 7, .sg_list = &sge, .num_sge = 1,
				  .opcode = IBV_WR_RDMA_WRITE, .send_flags = IBV_SEND_SIGNALED,
				  .wr.rdma = { .remote_addr = addr, .rkey = rkey } },
			   *bad;

	memset(c->buf + RAW_DATA_OFF, byte, len);
	if (ibv_post_send(c->id->qp, &wr, &bad))
		return IBV_WC_GENERAL_ERR; /* the QP is gone already: refused all the same */
	struct ibv_wc wc;
	do
		wc = raw_wc(c, 30000);
	while (wc.opcode == IBV_WC_RECV && wc.status == IBV_WC_SUCCESS);
	return wc.status;
}

static enum ibv_wc_status raw_fence(struct raw *c, uint64_t fence)
{
	uint8_t *m = c->buf + RAW_SEND_OFF;
	struct ibv_sge sge = { .addr = (uintptr_t)m, .length = 40, .lkey = c->mr->lkey };
	struct ibv_send_wr wr = { .wr_id = 8, .sg_list = &sge, .num_sge = 1,
				  .opcode = IBV_WR_SEND, .send_flags = IBV_SEND_SIGNALED },
			   *bad;

	put_le(m, 2, 2);     /* FENCE */
	put_le(m + 2, 1, 2); /* returns the receive it re-posted */
	put_le(m + 4, 32, 4);
	put_le(m + 8, fence, 8);
	memset(m + 16, 0, 24);
	assert_int_equal(ibv_post_send(c->id->qp, &wr, &bad), 0);
	struct ibv_wc wc;
	do
		wc = raw_wc(c, 30000);
	while (wc.opcode == IBV_WC_RECV && wc.status == IBV_WC_SUCCESS);
	return wc.status;
}

static void raw_free(struct raw *c)
{
	if (c->qp)
		rdma_destroy_qp(c->id);
	if (c->mr)
		ibv_dereg_mr(c->mr);
	if (c->cq)
		ibv_destroy_cq(c->cq);
	if (c->pd)
		ibv_dealloc_pd(c->pd);
	if (c->id)
		rdma_destroy_id(c->id);
	if (c->ch)
		rdma_destroy_event_channel(c->ch);
	free(c->buf);
}

/* The NIC refuses: bad tokens and indexes at connect, a WRITE past the region, stale keys. */
static void nic_refuses(void **state)
{
	(void)state;
	/* Region: 8 pages of a 10-page mapping; the 2 pages after it are guards. */
	uint8_t *map = mmap(NULL, 10 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
			    -1, 0);
	assert_true(map != MAP_FAILED);
	memset(map, 0, 10 * PAGE);
	struct xport_region reg = { .hva = map, .size = 8 * PAGE };
	struct xport_dst *dst = NULL;
	char err[256] = "";
	uint8_t bad_token[XPORT_TOKEN_LEN];
	struct raw c;

	assert_int_equal(xport_dst_rdma_new(&reg, 1, 2, XPORT_RDMA_DST_ZEROED, dst_ip, token,
					    &dst, err, sizeof(err)),
			 0);
	uint16_t port = xport_dst_rdma_port(dst);
	assert_int_equal(xport_dst_add_stream(dst, 0, 0), -EOPNOTSUPP);

	memcpy(bad_token, token, sizeof(bad_token));
	bad_token[3] ^= 1;
	assert_false(raw_connect(&c, port, bad_token, 0, 2));
	assert_int_equal(c.rej_code, 2); /* unknown token */
	raw_free(&c);
	assert_false(raw_connect(&c, port, token, 2, 2));
	assert_int_equal(c.rej_code, 3); /* index out of range */
	raw_free(&c);
	assert_false(raw_connect(&c, port, token, 0, 3));
	assert_int_equal(c.rej_code, 1); /* wrong number of queue pairs */
	raw_free(&c);

	assert_true(raw_connect(&c, port, token, 0, 2));
	assert_int_equal(c.nr, 1);
	assert_int_equal(c.rr[0].addr, (uintptr_t)map);
	assert_int_equal(c.rr[0].len, 8 * PAGE);
	/* Index 0 is taken now. */
	struct raw dup;
	assert_false(raw_connect(&dup, port, token, 0, 2));
	assert_int_equal(dup.rej_code, 3);
	raw_free(&dup);

	/* Inside: lands; and the fence after it passes on this queue pair. */
	assert_int_equal(raw_write(&c, c.rr[0].addr + 7 * PAGE, c.rr[0].rkey, PAGE, 0x11),
			 IBV_WC_SUCCESS);
	assert_int_equal(raw_fence(&c, 1), IBV_WC_SUCCESS);
	for (unsigned i = 0; i < PAGE; i++)
		assert_int_equal(map[7 * PAGE + i], 0x11);

	/* Straddling the end, then wholly past it: remote access error, nothing written. */
	enum ibv_wc_status st =
		raw_write(&c, c.rr[0].addr + 7 * PAGE + 2048, c.rr[0].rkey, PAGE, 0x22);
	print_message("WRITE across the region's end: %s\n", ibv_wc_status_str(st));
	assert_int_equal(st, IBV_WC_REM_ACCESS_ERR);
	for (unsigned i = 0; i < 2 * PAGE; i++)
		assert_int_equal(map[8 * PAGE + i], 0);
	for (unsigned i = 0; i < PAGE; i++)
		assert_int_equal(map[7 * PAGE + i], 0x11);
	/* The destination saw its queue pair die and says why. */
	int r = xport_dst_wait_fence(dst, 2, 10000);
	print_message("destination: %s (%s)\n", strerror(-r), xport_dst_error(dst));
	assert_true(r == -ECONNRESET || r == -EACCES);
	assert_non_null(strstr(xport_dst_error(dst), "qp 0"));
	raw_free(&c);
	xport_dst_free(dst);
	munmap(map, 10 * PAGE);
}

/* After xport_dst_free, a WRITE with the old key fails and memory stays as it was. */
static void keys_die_with_dst(void **state)
{
	struct mem *m = *state;
	struct raw c;

	memset(m->dst[0], 0, m->sizes[0]);
	struct xport_dst *dst = open_dst(m, 1, 1, XPORT_RDMA_DST_ZEROED);
	assert_true(raw_connect(&c, xport_dst_rdma_port(dst), token, 0, 1));
	assert_int_equal(raw_write(&c, c.rr[0].addr, c.rr[0].rkey, PAGE, 0x33), IBV_WC_SUCCESS);
	xport_dst_free(dst);
	int64_t t0 = tio_now_ms();
	enum ibv_wc_status st = raw_write(&c, c.rr[0].addr + PAGE, c.rr[0].rkey, PAGE, 0x44);
	print_message("WRITE with the key of a freed destination: %s after %lld ms\n",
		      ibv_wc_status_str(st), (long long)(tio_now_ms() - t0));
	assert_int_not_equal(st, IBV_WC_SUCCESS);
	for (unsigned i = 0; i < PAGE; i++) {
		assert_int_equal(m->dst[0][i], 0x33);
		assert_int_equal(m->dst[0][PAGE + i], 0);
	}

	/*
	 * The same memory under a new destination, over a live connection: the new key works,
	 * the old one is refused by the NIC (remote access error) and writes nothing.
	 */
	struct raw c2;
	dst = open_dst(m, 1, 1, XPORT_RDMA_DST_ZEROED);
	assert_true(raw_connect(&c2, xport_dst_rdma_port(dst), token, 0, 1));
	assert_int_equal(c2.rr[0].addr, c.rr[0].addr);
	assert_int_equal(raw_write(&c2, c2.rr[0].addr + 2 * PAGE, c2.rr[0].rkey, PAGE, 0x55),
			 IBV_WC_SUCCESS);
	if (c2.rr[0].rkey == c.rr[0].rkey) {
		print_message("the new registration drew the old key again: stale-key check skipped\n");
	} else {
		st = raw_write(&c2, c2.rr[0].addr + 3 * PAGE, c.rr[0].rkey, PAGE, 0x66);
		print_message("WRITE with the old key to a new destination: %s\n",
			      ibv_wc_status_str(st));
		assert_int_equal(st, IBV_WC_REM_ACCESS_ERR);
		for (unsigned i = 0; i < PAGE; i++)
			assert_int_equal(m->dst[0][3 * PAGE + i], 0);
	}
	for (unsigned i = 0; i < PAGE; i++)
		assert_int_equal(m->dst[0][2 * PAGE + i], 0x55);
	raw_free(&c2);
	xport_dst_free(dst);
	raw_free(&c);

	/* Through the transport: the source's next send fails, memory untouched. */
	dst = open_dst(m, NR_REGIONS, 2, XPORT_RDMA_DST_ZEROED);
	struct xport_src *src = open_src(dst, m, 2, 0);
	struct page_run run = { .region = 2, .first_page = 0, .npages = 256 };
	for (uint64_t p = 0; p < 256; p++)
		m->src[2][p * PAGE] |= 1;
	memset(m->dst[2], 0, 256 * PAGE);
	assert_int_equal(xport_src_send(src, &run, 1, 1), 0);
	assert_int_equal(xport_dst_wait_fence(dst, 1, 10000), 0);
	assert_memory_equal(m->dst[2], m->src[2], 256 * PAGE);
	xport_dst_free(dst);
	memset(m->dst[2], 0x5a, 256 * PAGE);
	for (uint64_t p = 0; p < 256; p++)
		m->src[2][p * PAGE + 1] ^= 0xff;
	t0 = tio_now_ms();
	int r = xport_src_send(src, &run, 1, 2);
	int64_t took = tio_now_ms() - t0;
	print_message("send after the destination was freed: %s after %lld ms\n", strerror(-r),
		      (long long)took);
	assert_true(r == -ECONNRESET || r == -ETIMEDOUT);
	assert_true(took < 40000);
	for (uint64_t i = 0; i < 256 * PAGE; i++)
		if (m->dst[2][i] != 0x5a)
			fail_msg("byte %llu written after free", (unsigned long long)i);
	assert_int_equal(xport_src_send(src, &run, 1, 3), r); /* broken for good */
	xport_src_free(src);
}

/* ---------------- a vanishing peer ---------------- */

struct send_job {
	struct xport_src *src;
	struct page_run run;
	int result;
	int64_t done_ms;
};

static void *send_loop(void *arg)
{
	struct send_job *j = arg;

	for (uint64_t f = 1; f < 1000; f++) {
		j->result = xport_src_send(j->src, &j->run, 1, f);
		if (j->result < 0)
			break;
	}
	j->done_ms = tio_now_ms();
	return NULL;
}

static void all_data(struct mem *m)
{
	for (unsigned r = 0; r < NR_REGIONS; r++)
		for (uint64_t p = 0; p < region_pages[r]; p++)
			m->src[r][p * PAGE] |= 1;
}

static void dst_freed_mid_send(void **state)
{
	struct mem *m = *state;
	pthread_t th;

	all_data(m);
	struct xport_dst *dst = open_dst(m, NR_REGIONS, 3, XPORT_RDMA_DST_ZEROED);
	struct send_job j = { .run = { .region = 2, .first_page = 0, .npages = 1536 } };
	j.src = open_src(dst, m, 3, 4000000); /* 6 MiB at 4 MB/s: mid-send for sure */
	assert_int_equal(pthread_create(&th, NULL, send_loop, &j), 0);
	tio_sleep_ms(500);
	int64_t t0 = tio_now_ms();
	xport_dst_free(dst);
	pthread_join(th, NULL);
	print_message("destination freed mid-send: %s after %lld ms\n", strerror(-j.result),
		      (long long)(j.done_ms - t0));
	assert_true(j.result == -ECONNRESET || j.result == -ETIMEDOUT);
	assert_true(j.done_ms - t0 < 40000);
	assert_int_equal(xport_src_send(j.src, &j.run, 1, 9999), j.result);
	xport_src_free(j.src);
}

/* Runs a destination in a fresh process (exec'd: no RDMA state inherited by fork). */
static pid_t spawn_dst_child(uint16_t *ret_port)
{
	int p[2];
	char line[32] = "";

	assert_int_equal(pipe(p), 0);
	pid_t pid = fork();
	assert_true(pid >= 0);
	if (pid == 0) {
		dup2(p[1], 1);
		close(p[0]);
		execl(self_exe, self_exe, "--dst-child", dst_ip, (char *)NULL);
		_exit(127);
	}
	close(p[1]);
	struct pollfd pfd = { .fd = p[0], .events = POLLIN };
	size_t got = 0;
	while (got < sizeof(line) - 1 && !strchr(line, '\n')) {
		if (poll(&pfd, 1, 30000) != 1)
			fail_msg("destination child said nothing");
		ssize_t n = read(p[0], line + got, sizeof(line) - 1 - got);
		if (n <= 0)
			fail_msg("destination child exited");
		got += (size_t)n;
	}
	close(p[0]);
	*ret_port = (uint16_t)atoi(line);
	assert_true(*ret_port > 0);
	return pid;
}

static int dst_child_main(const char *ip)
{
	uint64_t size = MAX_REGION_PAGES * PAGE;
	int fd = memfd_create("ferry-child", MFD_CLOEXEC);
	if (fd < 0 || ftruncate(fd, (off_t)size) < 0)
		return 1;
	void *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (mem == MAP_FAILED)
		return 1;
	struct xport_region reg = { .hva = mem, .size = size };
	struct xport_dst *dst = NULL;
	char err[256];
	int r = xport_dst_rdma_new(&reg, 1, 2, XPORT_RDMA_DST_ZEROED, ip, token, &dst, err,
				   sizeof(err));
	if (r < 0) {
		fprintf(stderr, "child: %s\n", err);
		return 1;
	}
	printf("%u\n", xport_dst_rdma_port(dst));
	fflush(stdout);
	for (;;)
		pause(); /* until killed */
}

static void dst_killed_mid_send(void **state)
{
	struct mem *m = *state;
	pthread_t th;
	uint16_t port;

	all_data(m);
	pid_t pid = spawn_dst_child(&port);
	/* The child's one region is our region 2. */
	struct send_job j = { .run = { .region = 0, .first_page = 0, .npages = 1536 } };
	j.src = open_src_to(port, 2, 4000000, &small_reader, &m->src_fd[2], &m->sizes[2], 1);
	assert_int_equal(pthread_create(&th, NULL, send_loop, &j), 0);
	tio_sleep_ms(500);
	int64_t t0 = tio_now_ms();
	kill(pid, SIGKILL);
	waitpid(pid, NULL, 0);
	pthread_join(th, NULL);
	print_message("destination killed mid-send: %s after %lld ms\n", strerror(-j.result),
		      (long long)(j.done_ms - t0));
	assert_true(j.result == -ECONNRESET || j.result == -ETIMEDOUT);
	assert_true(j.done_ms - t0 < 40000);
	xport_src_free(j.src);
}

/* A source in a fresh process: sends its memory over and over, capped, until killed. */
static int src_child_main(const char *ip, const char *port)
{
	uint64_t size = MAX_REGION_PAGES * PAGE;
	int fd = memfd_create("ferry-child", MFD_CLOEXEC);
	if (fd < 0 || ftruncate(fd, (off_t)size) < 0)
		return 1;
	uint8_t *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (mem == MAP_FAILED)
		return 1;
	for (uint64_t p = 0; p < MAX_REGION_PAGES; p++)
		mem[p * PAGE] = 1;
	struct xport_src_config cfg = { .streams = 2, .bandwidth = 4000000, .reader = small_reader };
	struct xport_src *src = NULL;
	char err[256];
	dst_ip = ip;
	if (xport_src_rdma_new(&cfg, ip, (uint16_t)atoi(port), token, &fd, &size, 1, &src, err,
			       sizeof(err)) < 0) {
		fprintf(stderr, "child: %s\n", err);
		return 1;
	}
	struct page_run run = { .region = 0, .first_page = 0, .npages = MAX_REGION_PAGES };
	for (uint64_t f = 1;; f++) {
		if (xport_src_send(src, &run, 1, f) < 0)
			return 1;
	}
}

static void src_killed_mid_send(void **state)
{
	struct mem *m = *state;
	char port[16];

	/* Our region 2 is as big as the child's one region. */
	struct xport_region reg = { .hva = m->dst[2], .size = m->sizes[2] };
	struct xport_dst *dst = NULL;
	char err[256] = "";
	assert_int_equal(xport_dst_rdma_new(&reg, 1, 2, 0, dst_ip, token, &dst, err, sizeof(err)),
			 0);
	snprintf(port, sizeof(port), "%u", xport_dst_rdma_port(dst));
	pid_t pid = fork();
	assert_true(pid >= 0);
	if (pid == 0) {
		execl(self_exe, self_exe, "--src-child", dst_ip, port, (char *)NULL);
		_exit(127);
	}
	int r = xport_dst_wait_fence(dst, 1, 60000);
	if (r)
		fail_msg("first fence from the child: %s (%s)", strerror(-r), xport_dst_error(dst));
	int64_t t0 = tio_now_ms();
	kill(pid, SIGKILL);
	waitpid(pid, NULL, 0);
	r = xport_dst_wait_fence(dst, 1000000, 60000);
	int64_t took = tio_now_ms() - t0;
	print_message("source killed mid-send: wait_fence %s after %lld ms (%s)\n", strerror(-r),
		      (long long)took, xport_dst_error(dst));
	assert_int_equal(r, -ECONNRESET);
	assert_true(took < 30000);
	assert_true(strlen(xport_dst_error(dst)) > 0);
	/* Both queue pairs end (the first one's end already failed the wait). */
	struct xport_dst_stats ds;
	for (int i = 0; i < 200; i++) {
		xport_dst_stats(dst, &ds);
		if (!ds.streams)
			break;
		tio_sleep_ms(50);
	}
	assert_int_equal(ds.streams, 0);
	xport_dst_free(dst);
}

static void *cancel_later(void *arg)
{
	tio_sleep_ms(400);
	xport_src_cancel(arg);
	return NULL;
}

static void cancel_throttled_send(void **state)
{
	struct mem *m = *state;
	pthread_t th;

	all_data(m);
	struct xport_dst *dst = open_dst(m, NR_REGIONS, 2, XPORT_RDMA_DST_ZEROED);
	struct xport_src *src = open_src(dst, m, 2, 500000); /* 6 MiB at 0.5 MB/s: 12 s */
	struct page_run run = { .region = 2, .first_page = 0, .npages = 1536 };
	assert_int_equal(pthread_create(&th, NULL, cancel_later, src), 0);
	int64_t t0 = tio_now_ms();
	assert_int_equal(xport_src_send(src, &run, 1, 1), -ECANCELED);
	int64_t took = tio_now_ms() - t0;
	pthread_join(th, NULL);
	assert_true(took >= 300 && took < 5000);
	assert_int_equal(xport_src_send(src, &run, 1, 2), -ECANCELED);
	xport_src_free(src);
	xport_dst_free(dst);
}

static void bandwidth_cap(void **state)
{
	struct mem *m = *state;
	struct page_run run = { .region = 2, .first_page = 0, .npages = 1536 }; /* 6 MiB */

	all_data(m);
	struct xport_dst *dst = open_dst(m, NR_REGIONS, 3, XPORT_RDMA_DST_ZEROED);
	struct xport_src *src = open_src(dst, m, 3, 0);
	/* Uncapped first, for reference (and the destination's pages get touched). */
	int64_t t0 = tio_now_ms();
	assert_int_equal(xport_src_send(src, &run, 1, 1), 0);
	int64_t free_ms = tio_now_ms() - t0;
	/* Capped at 3 MB/s: 6.3 MB need ~2 s (less the first burst of 256 KiB). */
	xport_src_set_bandwidth(src, 3000000);
	t0 = tio_now_ms();
	assert_int_equal(xport_src_send(src, &run, 1, 2), 0);
	int64_t capped_ms = tio_now_ms() - t0;
	assert_int_equal(xport_dst_wait_fence(dst, 2, 10000), 0);
	print_message("6 MiB uncapped: %lld ms (%.1f MB/s); capped at 3 MB/s: %lld ms\n",
		      (long long)free_ms, 6.29e6 / 1e3 / (double)(free_ms ? free_ms : 1),
		      (long long)capped_ms);
	assert_true(capped_ms >= 1800);
	assert_true(capped_ms < 2000 + 3 * free_ms + 3000);
	assert_memory_equal(m->dst[2], m->src[2], 1536 * PAGE);
	xport_src_free(src);
	xport_dst_free(dst);
}

/* Postcopy: the destination READs pages from the source's exposed memory. */
static void postcopy_fetch(void **state)
{
	struct mem *m = *state;
	char err[256] = "";

	for (unsigned r = 0; r < NR_REGIONS; r++)
		memset(m->dst[r], 0, m->sizes[r]);
	all_data(m);
	struct xport_dst *dst = open_dst(m, NR_REGIONS, 2, XPORT_RDMA_DST_ZEROED);
	struct xport_src *src = open_src(dst, m, 2, 0);
	/* Before the source exposes anything: the fetch waits, then times out. */
	assert_int_equal(xport_dst_rdma_fetch(dst, 1, 0, 1, 200), -ETIMEDOUT);
	void *hvas[NR_REGIONS] = { m->src[0], m->src[1], m->src[2] };
	int r = xport_src_rdma_expose(src, hvas, err, sizeof(err));
	if (r)
		fail_msg("expose: %s (%s)", strerror(-r), err);
	assert_int_equal(xport_src_rdma_expose(src, hvas, err, sizeof(err)), -EALREADY);
	assert_int_equal(xport_dst_rdma_fetch(dst, 1, 500, 13, 10000), -EINVAL);
	assert_int_equal(xport_dst_rdma_fetch(dst, 5, 0, 1, 10000), -EINVAL);
	r = xport_dst_rdma_fetch(dst, 1, 100, 1, 10000);
	if (r)
		fail_msg("fetch: %s (%s)", strerror(-r), xport_dst_error(dst));
	assert_memory_equal(m->dst[1] + 100 * PAGE, m->src[1] + 100 * PAGE, PAGE);
	assert_true(tio_page_zero(m->dst[1] + 99 * PAGE) && tio_page_zero(m->dst[1] + 101 * PAGE));
	/* A whole region, more than one READ's worth. */
	int64_t t0 = tio_now_ms();
	assert_int_equal(xport_dst_rdma_fetch(dst, 2, 0, 1536, 30000), 0);
	print_message("fetched 6 MiB with RDMA READ in %lld ms\n", (long long)(tio_now_ms() - t0));
	assert_memory_equal(m->dst[2], m->src[2], 1536 * PAGE);
	/* The write path still works beside it. */
	struct page_run run = { .region = 0, .first_page = 3, .npages = 40 };
	assert_int_equal(xport_src_send(src, &run, 1, 1), 0);
	assert_int_equal(xport_dst_wait_fence(dst, 1, 10000), 0);
	assert_memory_equal(m->dst[0] + 3 * PAGE, m->src[0] + 3 * PAGE, 40 * PAGE);
	xport_src_free(src);
	xport_dst_free(dst);
}

/* A userfaultfd over [p, p + len) in MISSING mode (the tests run as root in the VM). */
static int uffd_over(void *p, uint64_t len)
{
	int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (fd < 0)
		fail_msg("userfaultfd: %s", strerror(errno));
	struct uffdio_api api = { .api = UFFD_API };
	assert_int_equal(ioctl(fd, UFFDIO_API, &api), 0);
	assert_true(api.features & UFFD_FEATURE_MISSING_SHMEM);
	struct uffdio_register reg = { .range = { .start = (uintptr_t)p, .len = len },
				       .mode = UFFDIO_REGISTER_MODE_MISSING };
	assert_int_equal(ioctl(fd, UFFDIO_REGISTER, &reg), 0);
	return fd;
}

struct toucher {
	const uint8_t *page;
	uint8_t copy[PAGE];
	atomic_bool done;
};

/* Reads a page that is missing: blocks in the kernel until someone places it. */
static void *touch_page(void *arg)
{
	struct toucher *t = arg;
	memcpy(t->copy, t->page, PAGE);
	atomic_store(&t->done, true);
	return NULL;
}

struct fetcher {
	struct xport_dst *dst;
	uint32_t region;
	uint64_t first;
	uint32_t n;
	int r;
};

static void *fetch_run(void *arg)
{
	struct fetcher *f = arg;
	f->r = xport_dst_rdma_fetch(f->dst, f->region, f->first, f->n, 30000);
	return NULL;
}

/*
 * Postcopy as the engine runs it: pages punched out of the destination's memfd, the region
 * registered with a userfaultfd and handed to the transport; fetches place the pages.
 */
static void postcopy_fetch_uffd(void **state)
{
	struct mem *m = *state;
	char err[256] = "";
	struct toucher t = { .page = m->dst[1] + 20 * PAGE };
	pthread_t th;

	for (unsigned r = 0; r < NR_REGIONS; r++)
		memset(m->dst[r], 0, m->sizes[r]);
	all_data(m);
	struct xport_dst *dst = open_dst(m, NR_REGIONS, 2, XPORT_RDMA_DST_ZEROED);
	struct xport_src *src = open_src(dst, m, 2, 0);
	void *hvas[NR_REGIONS] = { m->src[0], m->src[1], m->src[2] };
	int r = xport_src_rdma_expose(src, hvas, err, sizeof(err));
	if (r)
		fail_msg("expose: %s (%s)", strerror(-r), err);

	/* Region 1: pages 10..73 are needed; region 2: all of it. */
	int uffd1 = uffd_over(m->dst[1], m->sizes[1]);
	int uffd2 = uffd_over(m->dst[2], m->sizes[2]);
	assert_int_equal(fallocate(m->dst_fd[1], FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
				   10 * PAGE, 64 * PAGE), 0);
	assert_int_equal(fallocate(m->dst_fd[2], FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0,
				   (off_t)m->sizes[2]), 0);
	assert_int_equal(xport_dst_set_uffd(dst, 1, uffd1), 0);
	assert_int_equal(xport_dst_set_uffd(dst, 1, uffd1), -EALREADY);
	assert_int_equal(xport_dst_set_uffd(dst, NR_REGIONS, uffd1), -EINVAL);
	assert_int_equal(xport_dst_set_uffd(dst, 2, -1), -EINVAL);
	assert_int_equal(xport_dst_set_uffd(dst, 2, uffd2), 0);
	/* The transport holds its own references. */
	close(uffd2);

	/* A thread blocks on missing page 20 of region 1. */
	assert_int_equal(pthread_create(&th, NULL, touch_page, &t), 0);
	usleep(300000);
	assert_false(atomic_load(&t.done));
	/* The source's memory is read as it is now: change a page after exposing it. */
	tio_fill_page(m->src[1] + 20 * PAGE, 0x5eed);
	m->src[1][20 * PAGE] |= 1;
	r = xport_dst_rdma_fetch(dst, 1, 10, 64, 10000);
	if (r)
		fail_msg("fetch: %s (%s)", strerror(-r), xport_dst_error(dst));
	pthread_join(th, NULL);
	assert_true(atomic_load(&t.done));
	assert_memory_equal(t.copy, m->src[1] + 20 * PAGE, PAGE);
	assert_memory_equal(m->dst[1] + 10 * PAGE, m->src[1] + 10 * PAGE, 64 * PAGE);
	/* Pages already there are left alone (the guest may have written them since). */
	assert_int_equal(xport_dst_rdma_fetch(dst, 1, 0, 16, 10000), 0);
	for (unsigned p = 0; p < 10; p++)
		assert_true(tio_page_zero(m->dst[1] + p * PAGE));

	/* Region 2 from four threads at once, 384 pages each (more than one bounce slot). */
	struct fetcher f[4];
	pthread_t ft[4];
	int64_t t0 = tio_now_ms();
	for (unsigned i = 0; i < 4; i++) {
		f[i] = (struct fetcher){ .dst = dst, .region = 2, .first = i * 384ull, .n = 384 };
		assert_int_equal(pthread_create(&ft[i], NULL, fetch_run, &f[i]), 0);
	}
	for (unsigned i = 0; i < 4; i++) {
		pthread_join(ft[i], NULL);
		assert_int_equal(f[i].r, 0);
	}
	print_message("fetched 6 MiB through userfaultfd from 4 threads in %lld ms\n",
		      (long long)(tio_now_ms() - t0));
	assert_memory_equal(m->dst[2], m->src[2], m->sizes[2]);
	struct xport_dst_stats ds;
	xport_dst_stats(dst, &ds);
	assert_int_equal(ds.read_pages, 64 + 16 + 1536);

	/* set_uffd took region 1's registration away: a WRITE into it fails on the NIC. */
	struct page_run run = { .region = 1, .first_page = 100, .npages = 4 };
	r = xport_src_send(src, &run, 1, 1);
	if (r == 0)
		r = xport_dst_wait_fence(dst, 1, 10000);
	print_message("a WRITE into a region handed to userfaultfd: %s (%s)\n", strerror(-r),
		      xport_dst_error(dst));
	assert_true(r < 0);
	xport_src_free(src);
	xport_dst_free(dst);
	close(uffd1);
}

static void setup_errors(void **state)
{
	struct mem *m = *state;
	struct xport_src_config cfg = { .streams = 2, .reader = small_reader };
	struct xport_src *src = (struct xport_src *)&cfg;
	struct xport_dst *dst = (struct xport_dst *)&cfg;
	uint8_t bad_token[XPORT_TOKEN_LEN];
	char err[256] = "", why[256] = "";
	struct xport_region reg = { .hva = m->dst[0], .size = m->sizes[0] };

	assert_false(xport_rdma_usable("127.0.0.1", why, sizeof(why)));
	print_message("127.0.0.1: %s\n", why);
	assert_true(strlen(why) > 0);
	assert_false(xport_rdma_usable("not-an-ip", why, sizeof(why)));
	assert_int_equal(xport_dst_rdma_new(&reg, 1, 1, 0, "127.0.0.1", token, &dst, err,
					    sizeof(err)),
			 -ENODEV);
	assert_int_equal(xport_dst_rdma_new(&reg, 1, 0, 0, dst_ip, token, &dst, err, sizeof(err)),
			 -EINVAL);
	reg.size = 100;
	assert_int_equal(xport_dst_rdma_new(&reg, 1, 1, 0, dst_ip, token, &dst, err, sizeof(err)),
			 -EINVAL);
	reg.size = m->sizes[0];
	assert_ptr_equal(dst, (struct xport_dst *)&cfg);
	assert_int_equal(xport_dst_rdma_port(NULL), 0);
	assert_int_equal(xport_dst_rdma_fetch(NULL, 0, 0, 1, 0), -EOPNOTSUPP);

	/* Nobody listens at that port: refused (or unreachable) quickly. */
	dst = open_dst(m, NR_REGIONS, 2, 0);
	uint16_t port = xport_dst_rdma_port(dst);
	xport_dst_free(dst);
	int64_t t0 = tio_now_ms();
	int r = xport_src_rdma_new(&cfg, dst_ip, port, token, m->src_fd, m->sizes, NR_REGIONS,
				   &src, err, sizeof(err));
	print_message("no listener: %s (%s) after %lld ms\n", strerror(-r), err,
		      (long long)(tio_now_ms() - t0));
	assert_true(r < 0);
	assert_true(tio_now_ms() - t0 < 30000);
	assert_ptr_equal(src, (struct xport_src *)&cfg);

	/* The wrong token: the destination rejects, and says why. */
	dst = open_dst(m, NR_REGIONS, 2, 0);
	memcpy(bad_token, token, sizeof(bad_token));
	bad_token[0] ^= 0x80;
	r = xport_src_rdma_new(&cfg, dst_ip, xport_dst_rdma_port(dst), bad_token, m->src_fd,
			       m->sizes, NR_REGIONS, &src, err, sizeof(err));
	assert_int_equal(r, -ECONNREFUSED);
	assert_non_null(strstr(err, "unknown token"));
	assert_ptr_equal(src, (struct xport_src *)&cfg);
	/* A bad reader setting fails before any connection. */
	cfg.reader.queue_depth = PAGEREADER_MAX_QUEUE_DEPTH + 1;
	r = xport_src_rdma_new(&cfg, dst_ip, xport_dst_rdma_port(dst), token, m->src_fd,
			       m->sizes, NR_REGIONS, &src, err, sizeof(err));
	assert_int_equal(r, -EINVAL);
	assert_non_null(strstr(err, "page reader"));
	cfg.reader = small_reader;
	cfg.streams = 0;
	assert_int_equal(xport_src_rdma_new(&cfg, dst_ip, 1, token, m->src_fd, m->sizes,
					    NR_REGIONS, &src, err, sizeof(err)),
			 -EINVAL);
	assert_int_equal(xport_src_rdma_expose((struct xport_src *)NULL, NULL, err, sizeof(err)),
			 -EOPNOTSUPP);
	xport_dst_free(dst);
	xport_src_free(NULL);
	xport_dst_free(NULL);
}

/* ---------------- throughput (informative) ---------------- */

static void throughput(void **state)
{
	struct mem *m = *state;
	struct page_run runs[NR_REGIONS];
	static const unsigned qps[] = { 1, 4 };
	struct pagereader_config rc = { .queue_depth = 16, .batch_pages = 64, .nr_buffers = 32 };

	all_data(m);
	for (unsigned r = 0; r < NR_REGIONS; r++)
		runs[r] = (struct page_run){ .region = r, .first_page = 0,
					     .npages = (uint32_t)region_pages[r] };
	for (unsigned k = 0; k < 2; k++) {
		struct xport_dst *dst = open_dst(m, NR_REGIONS, qps[k], XPORT_RDMA_DST_ZEROED);
		struct xport_src *src = open_src_to(xport_dst_rdma_port(dst), qps[k], 0, &rc,
						    m->src_fd, m->sizes, NR_REGIONS);
		int64_t t0 = tio_now_ms();
		for (uint64_t f = 1; f <= 3; f++)
			assert_int_equal(xport_src_send(src, runs, NR_REGIONS, f), 0);
		int64_t ms = tio_now_ms() - t0;
		assert_int_equal(xport_dst_wait_fence(dst, 3, 10000), 0);
		print_message("throughput, %u qp%s: 36 MiB in %lld ms = %.1f MB/s\n", qps[k],
			      qps[k] > 1 ? "s" : "", (long long)ms,
			      36.0 * 1048576 / 1e3 / (double)(ms ? ms : 1));
		xport_src_free(src);
		xport_dst_free(dst);
	}
}

int main(int argc, char **argv)
{
	char why[256] = "";

	self_exe = argv[0];
	if (getenv("FERRY_RDMA_SRC_IP"))
		src_ip = getenv("FERRY_RDMA_SRC_IP");
	if (getenv("FERRY_RDMA_DST_IP"))
		dst_ip = getenv("FERRY_RDMA_DST_IP");
	if (argc == 3 && !strcmp(argv[1], "--dst-child"))
		return dst_child_main(argv[2]);
	if (argc == 4 && !strcmp(argv[1], "--src-child"))
		return src_child_main(argv[2], argv[3]);

	/* Registered memory is pinned: use the whole memlock allowance. */
	struct rlimit rl;
	if (getrlimit(RLIMIT_MEMLOCK, &rl) == 0) {
		rl.rlim_cur = rl.rlim_max;
		(void)setrlimit(RLIMIT_MEMLOCK, &rl);
	}
	if (!xport_rdma_usable(src_ip, why, sizeof(why)) ||
	    !xport_rdma_usable(dst_ip, why, sizeof(why))) {
		printf("skipped: no RDMA between %s and %s: %s (tests/rdma/transport.sh runs this "
		       "in the Soft-RoCE VM)\n",
		       src_ip, dst_ip, why);
		return 77;
	}
	/* FERRY_TEST_FILTER=glob runs only the matching tests (cmocka's filter). */
	if (getenv("FERRY_TEST_FILTER"))
		cmocka_set_test_filter(getenv("FERRY_TEST_FILTER"));
	/* A hang is a failure: SIGALRM kills the binary. Software emulation is slow. */
	alarm(getenv("FERRY_RDMA_ALARM") ? (unsigned)atoi(getenv("FERRY_RDMA_ALARM")) : 900);

	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(transfer_1, mem_setup, mem_teardown),
		cmocka_unit_test_setup_teardown(transfer_4, mem_setup, mem_teardown),
		cmocka_unit_test_setup_teardown(transfer_garbage_3, mem_setup, mem_teardown),
		cmocka_unit_test_setup_teardown(bad_runs, mem_setup, mem_teardown),
		cmocka_unit_test(nic_refuses),
		cmocka_unit_test_setup_teardown(keys_die_with_dst, mem_setup, mem_teardown),
		cmocka_unit_test_setup_teardown(dst_freed_mid_send, mem_setup, mem_teardown),
		cmocka_unit_test_setup_teardown(dst_killed_mid_send, mem_setup, mem_teardown),
		cmocka_unit_test_setup_teardown(src_killed_mid_send, mem_setup, mem_teardown),
		cmocka_unit_test_setup_teardown(cancel_throttled_send, mem_setup, mem_teardown),
		cmocka_unit_test_setup_teardown(bandwidth_cap, mem_setup, mem_teardown),
		cmocka_unit_test_setup_teardown(postcopy_fetch, mem_setup, mem_teardown),
		cmocka_unit_test_setup_teardown(postcopy_fetch_uffd, mem_setup, mem_teardown),
		cmocka_unit_test_setup_teardown(setup_errors, mem_setup, mem_teardown),
		cmocka_unit_test_setup_teardown(throughput, mem_setup, mem_teardown),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
