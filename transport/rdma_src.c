// SPDX-License-Identifier: Apache-2.0
/*
 * The RDMA source (struct xport_src over RDMA, transport.h). One RC queue pair per stream,
 * each driven by a thread of its own ("send-qN") that owns everything of that queue pair: a
 * page reader (its io_uring and registered buffers, pagereader.h), the buffer area
 * registered as one memory region, a completion queue and the connection. A batch is split
 * over the queue pairs exactly as the TCP backend splits it over its streams (a page always
 * travels on the same queue pair; see tcp_data.c). Each thread reads its share with
 * pagereader_read_async() and posts, for every chunk, one RDMA WRITE per span of pages
 * straight from the reader's buffer into the destination's guest memory (the address and
 * key come from the region table the destination sent as its first message). The buffer
 * stays with us (PAGEREADER_KEEP) until a completion covers its last WRITE; when every
 * buffer is out, the reader's reclaim waits on the completion queue. The batch ends with a
 * FENCE SEND, which lands after the WRITEs before it, and the thread waits until it
 * completed and the destination acknowledged it: so every WRITE of batch f has completed
 * before any WRITE of batch f+1 is posted (docs/protocol.md §6).
 *
 * Zero pages: the destination's memory is known only as far as we wrote it. A bit per page
 * ("touched": data may be there) is set when a page is written with data and never
 * cleared. A zero page is skipped when its bit is clear and the destination declared its
 * memory zero (XPORT_RDMA_DST_ZEROED), and written as zeros otherwise — so a page that held
 * data and became zero is always overwritten.
 *
 * Work is bounded: at most SQ_DEPTH WRs outstanding per queue pair, one in SIGNAL_EVERY
 * signalled (and the last WR of a chunk whenever too many buffers wait on unsignalled
 * WRs), SENDs only against the receive credits the destination granted. Every wait polls
 * the completion channel, the connection's event channel and the stop eventfd with a
 * timeout: a peer that vanishes shows up as an error completion (retries exhausted,
 * flushed) or a DISCONNECTED event within seconds; one that stays connected but stops
 * answering as -ETIMEDOUT after PROGRESS_TIMEOUT_MS.
 */
#include <errno.h>
#include <stdarg.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include <infiniband/verbs.h>
#include <rdma/rdma_cma.h>

#include "transport/xport_internal.h"

#define PAGE PAGEREADER_PAGE_SIZE
#define SQ_DEPTH 128u
#define SIGNAL_EVERY 16u /* <= (SQ_DEPTH - 1) / 2: a full SQ always holds a signalled WR */
#define SEND_SLOTS 4u
#define MAX_RD_ATOM 16u
#define SETUP_TIMEOUT_MS 10000
#define RESOLVE_TIMEOUT_MS 5000
#define PROGRESS_TIMEOUT_MS 30000
/* Local ACK timeout 4.096 us * 2^16 = 268 ms, 7 retries: a silent peer fails in ~2-4 s. */
#define ACK_TIMEOUT_EXP 16
#define RETRY_COUNT 7
#define CQ_POLL_BATCH 32
#define CQ_ACK_BATCH 64u
#define MIN_STRIPE_PAGES 64u
#define RECV_WR_FLAG (1ull << 63)

struct rdma_src;

/* A buffer kept until the completion of the WR with sequence number seq. */
struct held_chunk {
	unsigned buffer;
	uint64_t seq;
};

enum src_job { JOB_BATCH, JOB_EXPOSE };

struct src_qp {
	struct rdma_src *x;
	unsigned idx;
	/* Made (address and route resolved) by new on the caller's thread, freed by free. */
	struct rdma_event_channel *ch;
	struct rdma_cm_id *id;
	pthread_t thread;
	bool thread_started;
	char err[200]; /* why set-up failed; written before nr_started counts this one */

	/* Owned by this queue pair's thread: made, used and freed there. */
	struct pagereader *reader;
	struct ibv_mr *buf_mr;
	uint8_t *msgbuf; /* RDMA_RECV_DEPTH receive slots, then SEND_SLOTS send slots */
	struct ibv_mr *msg_mr;
	struct ibv_comp_channel *cc;
	struct ibv_cq *cq;
	unsigned cq_events;
	bool qp_created;
	bool connected;
	int dead; /* sticky: the queue pair failed */

	/* Send queue: WR sequence numbers (wr_id) posted, known complete, last signalled. */
	uint64_t post_seq, done_seq, last_signaled;
	unsigned since_signal;
	struct held_chunk *held; /* FIFO of kept buffers, by seq */
	unsigned held_head, held_n, held_cap;
	unsigned uncovered;     /* held chunks posted after the last signalled WR */
	unsigned cover_limit;   /* signal a chunk's last WR when uncovered would reach this */
	unsigned credits;       /* SENDs we may post */
	unsigned to_return;     /* receives re-posted since our last SEND */
	unsigned send_next;
	uint64_t acked_fence;
	bool have_ack;
	bool got_regions;
	uint32_t rr_flags;
	unsigned nr_rr;
	struct rdma_remote_region rr[XPORT_MAX_REGIONS];

	/*
	 * This queue pair's share of the batch, written by the engine thread before it bumps
	 * x->gen under x->lock and read here after seeing the new gen under the same lock.
	 */
	struct xport_runs runs;
	uint64_t fence;
	unsigned gen_seen;
	uint64_t b_pages, b_zero, b_bytes; /* counted for this batch's FENCE */
};

struct rdma_src {
	struct xport_src base;
	unsigned nr_qps;
	struct src_qp *qps;
	unsigned nr_regions;
	const int *region_fds; /* the caller's, used by the threads only until new returns */
	uint64_t *region_pages;
	struct pagereader_config reader_cfg;
	unsigned stripe_pages;
	struct sockaddr_storage dst_addr;
	uint8_t token[XPORT_TOKEN_LEN];
	struct ibv_pd *pd; /* shared by the queue pairs: all on one device */
	unsigned max_rd_atom;

	/* The destination's table (queue pair 0's; every queue pair got the same). */
	struct rdma_remote_region rr[XPORT_MAX_REGIONS];
	unsigned nr_rr;
	/* Bit per page: data may be at the destination (see the top of the file). */
	_Atomic uint64_t *touched[XPORT_MAX_REGIONS];

	/* Postcopy: our guest memory registered for remote READ. */
	struct ibv_mr *exposed[XPORT_MAX_REGIONS];
	bool exposing;

	int stop_fd;           /* readable once cancel or a failure stopped every queue pair */
	atomic_bool stop;
	atomic_bool cancelled;
	int broken;            /* sticky error of a failed batch; engine thread only */

	/*
	 * Hand-off between the engine thread and the queue pair threads: job, gen, nr_done,
	 * first_err, quit, nr_started, start_err. work_cond: new gen or quit (to the threads);
	 * done_cond: a thread started or finished its job (to the engine).
	 */
	pthread_mutex_t lock;
	pthread_cond_t work_cond;
	pthread_cond_t done_cond;
	enum src_job job;
	unsigned gen;
	unsigned nr_done;
	int first_err;
	bool quit;
	unsigned nr_started;
	int start_err;

	struct xport_bucket bucket; /* the bandwidth cap, shared by all queue pairs */

	_Atomic uint64_t bytes, pages, zero_pages, batches;
};

static const struct xport_src_ops rdma_src_ops;

static struct rdma_src *to_src(struct xport_src *x)
{
	return container_of(x, struct rdma_src, base);
}

static void stop_all(struct rdma_src *x)
{
	uint64_t one = 1;

	atomic_store(&x->stop, true);
	(void)!write(x->stop_fd, &one, sizeof(one));
}

static bool test_touched(struct rdma_src *x, uint32_t region, uint64_t page)
{
	return atomic_load_explicit(&x->touched[region][page / 64], memory_order_relaxed) &
	       (1ull << (page % 64));
}

static void set_touched(struct rdma_src *x, uint32_t region, uint64_t page)
{
	/* Words are shared by neighbouring stripes of other queue pairs: atomic. */
	atomic_fetch_or_explicit(&x->touched[region][page / 64], 1ull << (page % 64),
				 memory_order_relaxed);
}

/* ---------------- bandwidth ---------------- */

/* ---------------- completions ---------------- */

static int post_recv(struct src_qp *s, unsigned slot)
{
	struct ibv_sge sge = { .addr = (uintptr_t)(s->msgbuf + (size_t)slot * RDMA_MSG_MAX),
			       .length = RDMA_MSG_MAX,
			       .lkey = s->msg_mr->lkey };
	struct ibv_recv_wr wr = { .wr_id = RECV_WR_FLAG | slot, .sg_list = &sge, .num_sge = 1 };
	struct ibv_recv_wr *bad;

	return -ibv_post_recv(s->id->qp, &wr, &bad);
}

static int fail_qp(struct src_qp *s, int err, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static int fail_qp(struct src_qp *s, int err, const char *fmt, ...)
{
	va_list ap;

	if (!s->dead) {
		va_start(ap, fmt);
		vsnprintf(s->err, sizeof(s->err), fmt, ap);
		va_end(ap);
		s->dead = err;
	}
	return s->dead;
}

/* Gives back every kept buffer whose last WR is known complete. */
static void release_done(struct src_qp *s)
{
	while (s->held_n && s->held[s->held_head].seq <= s->done_seq) {
		pagereader_release(s->reader, s->held[s->held_head].buffer);
		s->held_head = (s->held_head + 1) % s->held_cap;
		s->held_n--;
	}
}

static int on_message(struct src_qp *s, unsigned slot, uint32_t len)
{
	const uint8_t *payload;
	uint16_t type, credits;
	uint32_t plen;
	int r;

	if (rdma_msg_parse(s->msgbuf + (size_t)slot * RDMA_MSG_MAX, len, &type, &credits,
			   &payload, &plen) < 0)
		return fail_qp(s, -EPROTO, "qp %u: malformed message", s->idx);
	s->credits += credits;
	switch (type) {
	case RDMA_MSG_REGIONS:
		if (s->got_regions ||
		    rdma_decode_regions(payload, plen, &s->rr_flags, s->rr, &s->nr_rr) < 0)
			return fail_qp(s, -EPROTO, "qp %u: bad region table", s->idx);
		s->got_regions = true;
		break;
	case RDMA_MSG_FENCE_ACK: {
		uint64_t f;
		if (rdma_decode_fence_ack(payload, plen, &f) < 0)
			return fail_qp(s, -EPROTO, "qp %u: bad FENCE_ACK", s->idx);
		s->acked_fence = f;
		s->have_ack = true;
		break;
	}
	default:
		return fail_qp(s, -EPROTO, "qp %u: unexpected message type %u", s->idx, type);
	}
	r = post_recv(s, slot);
	if (r < 0)
		return fail_qp(s, r, "qp %u: re-posting a receive: %s", s->idx, strerror(-r));
	s->to_return++;
	return 0;
}

static int on_completion(struct src_qp *s, const struct ibv_wc *wc)
{
	if (wc->status != IBV_WC_SUCCESS) {
		/* Flushed: the queue pair is being torn down (a disconnect got there first). */
		if (wc->status == IBV_WC_WR_FLUSH_ERR)
			return fail_qp(s, -ECONNRESET, "qp %u: connection torn down", s->idx);
		return fail_qp(s, -ECONNRESET, "qp %u: %s failed: %s", s->idx,
			       (wc->wr_id & RECV_WR_FLAG) ? "receive" : "write",
			       ibv_wc_status_str(wc->status));
	}
	if (wc->wr_id & RECV_WR_FLAG)
		return on_message(s, (unsigned)(wc->wr_id & 0xffff), wc->byte_len);
	/* A signalled WRITE or SEND: it and every WR before it are complete (RC order). */
	if (wc->wr_id > s->done_seq)
		s->done_seq = wc->wr_id;
	release_done(s);
	return 0;
}

static int poll_cq(struct src_qp *s)
{
	struct ibv_wc wc[CQ_POLL_BATCH];
	int n, total = 0;

	while ((n = ibv_poll_cq(s->cq, CQ_POLL_BATCH, wc)) > 0) {
		for (int i = 0; i < n; i++) {
			int r = on_completion(s, &wc[i]);
			if (r < 0)
				return r;
		}
		total += n;
	}
	if (n < 0)
		return fail_qp(s, -EIO, "qp %u: polling the completion queue failed", s->idx);
	return total;
}

static int on_cm_event(struct src_qp *s)
{
	struct rdma_cm_event *ev;
	int r = 0;

	while (!r && rdma_get_cm_event(s->ch, &ev) == 0) {
		switch (ev->event) {
		case RDMA_CM_EVENT_DISCONNECTED:
			s->connected = false;
			r = fail_qp(s, -ECONNRESET, "qp %u: the destination disconnected", s->idx);
			break;
		case RDMA_CM_EVENT_DEVICE_REMOVAL:
			r = fail_qp(s, -ECONNRESET, "qp %u: the RDMA device went away", s->idx);
			break;
		default:
			break;
		}
		rdma_ack_cm_event(ev);
	}
	return r;
}

/*
 * Processes completions; blocks (up to timeout_ms) until at least one arrived when there
 * were none. Returns how many, or the queue pair's error.
 */
static int progress(struct src_qp *s, int timeout_ms)
{
	struct rdma_src *x = s->x;
	int64_t deadline = tcp_now_ms() + timeout_ms;
	int n;

	if (s->dead)
		return s->dead;
	for (;;) {
		n = poll_cq(s);
		if (n != 0)
			return n;
		if (ibv_req_notify_cq(s->cq, 0))
			return fail_qp(s, -EIO, "qp %u: arming the completion queue failed", s->idx);
		n = poll_cq(s); /* what arrived before the arm raises no event */
		if (n != 0)
			return n;
		int64_t left = deadline - tcp_now_ms();
		if (left <= 0)
			return fail_qp(s, -ETIMEDOUT,
				       "qp %u: no completion for %d ms (destination stopped answering)",
				       s->idx, timeout_ms);
		struct pollfd pfd[3] = {
			{ .fd = s->cc->fd, .events = POLLIN },
			{ .fd = s->ch->fd, .events = POLLIN },
			{ .fd = x->stop_fd, .events = POLLIN },
		};
		if (poll(pfd, 3, (int)left) < 0 && errno != EINTR)
			return fail_qp(s, -errno, "qp %u: poll: %s", s->idx, strerror(errno));
		if (pfd[2].revents & POLLIN)
			return -ECANCELED; /* not sticky: the stop is, and says it all */
		if (pfd[1].revents & POLLIN) {
			int r = on_cm_event(s);
			if (r < 0)
				return r;
		}
		if (pfd[0].revents & POLLIN) {
			struct ibv_cq *cq;
			void *ctx;
			while (ibv_get_cq_event(s->cc, &cq, &ctx) == 0) {
				if (++s->cq_events >= CQ_ACK_BATCH) {
					ibv_ack_cq_events(s->cq, s->cq_events);
					s->cq_events = 0;
				}
			}
		}
	}
}

/* ---------------- posting ---------------- */

/* Waits until the SQ has room for one more WR (one slot stays free for the FENCE). */
static int sq_room(struct src_qp *s, unsigned need)
{
	while (s->post_seq - s->done_seq + need > SQ_DEPTH) {
		int r = progress(s, PROGRESS_TIMEOUT_MS);
		if (r < 0)
			return r;
	}
	return 0;
}

static int post_write(struct src_qp *s, const uint8_t *from, uint32_t len, uint64_t raddr,
		      uint32_t rkey, bool last_of_chunk, unsigned buffer)
{
	bool sig;
	int r;

	r = sq_room(s, 2);
	if (r < 0)
		return r;
	sig = s->since_signal + 1 >= SIGNAL_EVERY ||
	      (last_of_chunk && s->uncovered + 1 >= s->cover_limit);
	struct ibv_sge sge = { .addr = (uintptr_t)from, .length = len, .lkey = s->buf_mr->lkey };
	struct ibv_send_wr wr = {
		.wr_id = s->post_seq + 1,
		.sg_list = &sge,
		.num_sge = 1,
		.opcode = IBV_WR_RDMA_WRITE,
		.send_flags = sig ? IBV_SEND_SIGNALED : 0,
		.wr.rdma = { .remote_addr = raddr, .rkey = rkey },
	};
	struct ibv_send_wr *bad;
	r = ibv_post_send(s->id->qp, &wr, &bad);
	if (r)
		return fail_qp(s, -ECONNRESET, "qp %u: posting a WRITE: %s", s->idx, strerror(r));
	s->post_seq++;
	if (sig) {
		s->last_signaled = s->post_seq;
		s->since_signal = 0;
		s->uncovered = 0; /* every held chunk completes with (or before) this WR */
	} else {
		s->since_signal++;
	}
	if (last_of_chunk) {
		unsigned tail = (s->held_head + s->held_n) % s->held_cap;
		s->held[tail] = (struct held_chunk){ .buffer = buffer, .seq = s->post_seq };
		s->held_n++;
		if (!sig)
			s->uncovered++;
	}
	return 0;
}

/* One message into the next send slot, signalled; returns its sequence number. */
static int post_send_msg(struct src_qp *s, const uint8_t *msg_src, size_t len,
			 uint64_t *ret_seq)
{
	int r;

	while (!s->credits) {
		r = progress(s, PROGRESS_TIMEOUT_MS);
		if (r < 0)
			return r;
	}
	r = sq_room(s, 1);
	if (r < 0)
		return r;
	uint8_t *buf = s->msgbuf + (size_t)(RDMA_RECV_DEPTH + s->send_next % SEND_SLOTS) *
					   RDMA_MSG_MAX;
	memcpy(buf, msg_src, len);
	/* Return our credits in the header (bytes 2..3, little endian). */
	buf[2] = (uint8_t)(s->to_return & 0xff);
	buf[3] = (uint8_t)(s->to_return >> 8);
	struct ibv_sge sge = { .addr = (uintptr_t)buf, .length = (uint32_t)len,
			       .lkey = s->msg_mr->lkey };
	struct ibv_send_wr wr = {
		.wr_id = s->post_seq + 1,
		.sg_list = &sge,
		.num_sge = 1,
		.opcode = IBV_WR_SEND,
		.send_flags = IBV_SEND_SIGNALED,
	};
	struct ibv_send_wr *bad;
	r = ibv_post_send(s->id->qp, &wr, &bad);
	if (r)
		return fail_qp(s, -ECONNRESET, "qp %u: posting a SEND: %s", s->idx, strerror(r));
	s->post_seq++;
	s->last_signaled = s->post_seq;
	s->since_signal = 0;
	s->uncovered = 0;
	s->send_next++;
	s->credits--;
	s->to_return = 0;
	*ret_seq = s->post_seq;
	return 0;
}

/*
 * The page reader's consumer: one WRITE per span of pages to send, from the reader's
 * buffer into the destination's memory. Keeps the buffer unless nothing was posted.
 */
static int consume(void *arg, const struct page_chunk *c)
{
	struct src_qp *s = arg;
	struct rdma_src *x = s->x;
	const struct rdma_remote_region *rr = &x->rr[c->region];
	bool zeroed = s->rr_flags & RDMA_REGIONS_ZEROED;
	uint32_t spans[2 * PAGEREADER_MAX_BATCH_PAGES];
	unsigned nspans = 0;
	uint64_t write_pages = 0;
	unsigned nr_zero = 0;
	int r;

	if (atomic_load_explicit(&x->stop, memory_order_relaxed))
		return -ECANCELED;
	if (s->dead)
		return s->dead;
	/* Runs were checked against the table; the chunk lies inside them. Check anyway. */
	if (c->region >= x->nr_rr ||
	    (c->first_page + c->npages) * (uint64_t)PAGE > rr->len)
		return fail_qp(s, -EINVAL, "qp %u: chunk outside the destination's regions",
			       s->idx);

	for (uint32_t i = 0; i < c->npages;) {
		uint64_t page = c->first_page + i;
		bool zero = page_chunk_page_is_zero(c, i);
		if (zero)
			nr_zero++;
		if (zero && zeroed && !test_touched(x, c->region, page)) {
			i++; /* zero here and zero there */
			continue;
		}
		if (!zero)
			set_touched(x, c->region, page);
		if (nspans && spans[2 * nspans - 1] == i) {
			spans[2 * nspans - 1] = i + 1;
		} else {
			spans[2 * nspans] = i;
			spans[2 * nspans + 1] = i + 1;
			nspans++;
		}
		write_pages++;
		i++;
	}
	s->b_pages += c->npages - nr_zero;
	s->b_zero += nr_zero;
	atomic_fetch_add_explicit(&x->pages, c->npages - nr_zero, memory_order_relaxed);
	atomic_fetch_add_explicit(&x->zero_pages, nr_zero, memory_order_relaxed);
	if (!nspans)
		return 0; /* nothing to write: the reader reuses the buffer at once */

	r = xport_bucket_take(&x->bucket, write_pages * PAGE, x->stop_fd);
	if (r < 0)
		return r;
	for (unsigned k = 0; k < nspans; k++) {
		uint32_t i = spans[2 * k], j = spans[2 * k + 1];
		r = post_write(s, c->data + (size_t)i * PAGE, (j - i) * PAGE,
			       rr->addr + (c->first_page + i) * PAGE, rr->rkey, k + 1 == nspans,
			       c->buffer);
		if (r < 0) {
			/* Posted spans may still read the buffer: it stays held until teardown. */
			if (k == 0)
				return r;
			unsigned tail = (s->held_head + s->held_n) % s->held_cap;
			s->held[tail] = (struct held_chunk){ .buffer = c->buffer,
							     .seq = UINT64_MAX };
			s->held_n++;
			return r;
		}
	}
	s->b_bytes += write_pages * PAGE;
	atomic_fetch_add_explicit(&x->bytes, write_pages * PAGE, memory_order_relaxed);
	return PAGEREADER_KEEP;
}

/* Every buffer is out: wait until a completion gives one back. */
static int reclaim(void *arg)
{
	struct src_qp *s = arg;
	unsigned before = s->held_n;

	while (s->held_n >= before) {
		int r = progress(s, PROGRESS_TIMEOUT_MS);
		if (r < 0)
			return r;
	}
	return 0;
}

static int qp_batch(struct src_qp *s)
{
	struct rdma_src *x = s->x;
	struct pagereader_sink sink = { .consume = consume, .reclaim = reclaim, .arg = s };
	uint8_t msg[RDMA_MSG_MAX];
	uint64_t seq;
	int r;

	if (s->dead)
		return s->dead;
	r = on_cm_event(s); /* a disconnect that came while we were idle */
	if (r < 0)
		return r;
	s->b_pages = s->b_zero = s->b_bytes = 0;
	if (s->runs.n) {
		r = pagereader_read_async(s->reader, s->runs.v, s->runs.n, &sink);
		if (r < 0)
			return r;
	}
	struct rdma_fence_msg f = { .fence = s->fence, .pages = s->b_pages,
				    .zero_pages = s->b_zero, .bytes = s->b_bytes };
	size_t len = rdma_msg_fence(msg, 0, &f);
	/* Counted before it goes: the destination may report the fence before we would. */
	atomic_fetch_add_explicit(&x->bytes, len, memory_order_relaxed);
	r = post_send_msg(s, msg, len, &seq);
	if (r < 0) {
		atomic_fetch_sub_explicit(&x->bytes, len, memory_order_relaxed);
		return r;
	}
	/* Complete (so every WRITE before it is) and acknowledged: the next batch may go. */
	while (s->done_seq < seq || !s->have_ack || s->acked_fence < s->fence) {
		r = progress(s, PROGRESS_TIMEOUT_MS);
		if (r < 0)
			return r;
	}
	return 0;
}

/* Postcopy: our exposed regions' table to the destination, on queue pair 0. */
static int qp_expose(struct src_qp *s)
{
	struct rdma_src *x = s->x;
	struct rdma_remote_region rr[XPORT_MAX_REGIONS];
	uint8_t msg[RDMA_MSG_MAX];
	uint64_t seq;
	int r;

	if (s->idx != 0)
		return 0;
	if (s->dead)
		return s->dead;
	for (unsigned i = 0; i < x->nr_regions; i++)
		rr[i] = (struct rdma_remote_region){ .addr = (uintptr_t)x->exposed[i]->addr,
						     .len = x->exposed[i]->length,
						     .rkey = x->exposed[i]->rkey };
	size_t len = rdma_msg_regions(msg, RDMA_MSG_SRC_REGIONS, 0, 0, rr, x->nr_regions);
	r = post_send_msg(s, msg, len, &seq);
	while (!r && s->done_seq < seq) {
		int n = progress(s, PROGRESS_TIMEOUT_MS);
		if (n < 0)
			r = n;
	}
	return r;
}

/* ---------------- queue pair threads ---------------- */

static void qp_teardown(struct src_qp *s)
{
	if (s->connected && s->id)
		rdma_disconnect(s->id); /* the QP goes to the error state: nothing in flight */
	s->connected = false;
	if (s->qp_created)
		rdma_destroy_qp(s->id);
	s->qp_created = false;
	if (s->buf_mr)
		ibv_dereg_mr(s->buf_mr);
	s->buf_mr = NULL;
	pagereader_free(s->reader); /* after the MR over its buffers is gone */
	s->reader = NULL;
	if (s->msg_mr)
		ibv_dereg_mr(s->msg_mr);
	s->msg_mr = NULL;
	free(s->msgbuf);
	s->msgbuf = NULL;
	if (s->cq) {
		if (s->cq_events)
			ibv_ack_cq_events(s->cq, s->cq_events);
		ibv_destroy_cq(s->cq);
	}
	s->cq = NULL;
	if (s->cc)
		ibv_destroy_comp_channel(s->cc);
	s->cc = NULL;
	free(s->held);
	s->held = NULL;
}

static int set_nonblock(int fd)
{
	int flags = fcntl(fd, F_GETFL);

	if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0)
		return -errno;
	return 0;
}

/* Everything of one queue pair up to the destination's region table. Fills s->err. */
static int qp_setup(struct src_qp *s)
{
	struct rdma_src *x = s->x;
	struct ibv_context *verbs = s->id->verbs;
	struct pagereader_config eff;
	struct rdma_cm_event *ev;
	uint64_t sizes[XPORT_MAX_REGIONS];
	size_t area_len;
	int r;

	for (unsigned i = 0; i < x->nr_regions; i++)
		sizes[i] = x->region_pages[i] * PAGE;
	r = pagereader_new(&x->reader_cfg, x->region_fds, sizes, x->nr_regions, &s->reader);
	if (r < 0)
		return fail_qp(s, r, "page reader: %s%s", strerror(-r),
			       r == -ENOMEM ? " (RLIMIT_MEMLOCK too low for the registered buffers?)"
					    : "");
	pagereader_get_config(s->reader, &eff);
	s->held_cap = eff.nr_buffers;
	s->cover_limit = eff.nr_buffers / 4 ? eff.nr_buffers / 4 : 1;
	s->held = calloc(s->held_cap, sizeof(*s->held));
	if (!s->held)
		return fail_qp(s, -ENOMEM, "out of memory");
	/*
	 * LOCAL_WRITE makes the kernel pin the buffers writable: a read-only pin of an
	 * untouched page could pin the shared zero page, which io_uring's reads would then
	 * copy-on-write away from under the NIC.
	 */
	void *area = pagereader_buffer_area(s->reader, &area_len);
	s->buf_mr = ibv_reg_mr(x->pd, area, area_len, IBV_ACCESS_LOCAL_WRITE);
	if (!s->buf_mr)
		return fail_qp(s, errno ? -errno : -ENOMEM, "registering the read buffers: %s",
			       strerror(errno));
	s->msgbuf = aligned_alloc(PAGE, (RDMA_RECV_DEPTH + SEND_SLOTS) * RDMA_MSG_MAX);
	if (!s->msgbuf)
		return fail_qp(s, -ENOMEM, "out of memory");
	memset(s->msgbuf, 0, (RDMA_RECV_DEPTH + SEND_SLOTS) * RDMA_MSG_MAX);
	s->msg_mr = ibv_reg_mr(x->pd, s->msgbuf, (RDMA_RECV_DEPTH + SEND_SLOTS) * RDMA_MSG_MAX,
			       IBV_ACCESS_LOCAL_WRITE);
	if (!s->msg_mr)
		return fail_qp(s, errno ? -errno : -ENOMEM, "registering message buffers: %s",
			       strerror(errno));
	s->cc = ibv_create_comp_channel(verbs);
	if (!s->cc)
		return fail_qp(s, errno ? -errno : -ENOMEM, "ibv_create_comp_channel: %s",
			       strerror(errno));
	r = set_nonblock(s->cc->fd);
	if (r < 0)
		return fail_qp(s, r, "completion channel: %s", strerror(-r));
	s->cq = ibv_create_cq(verbs, (int)(SQ_DEPTH + RDMA_RECV_DEPTH), s, s->cc, 0);
	if (!s->cq)
		return fail_qp(s, errno ? -errno : -ENOMEM, "ibv_create_cq: %s", strerror(errno));
	struct ibv_qp_init_attr attr = {
		.send_cq = s->cq,
		.recv_cq = s->cq,
		.qp_type = IBV_QPT_RC,
		.sq_sig_all = 0,
		.cap = { .max_send_wr = SQ_DEPTH,
			 .max_recv_wr = RDMA_RECV_DEPTH,
			 .max_send_sge = 1,
			 .max_recv_sge = 1 },
	};
	if (rdma_create_qp(s->id, x->pd, &attr) < 0)
		return fail_qp(s, -errno, "rdma_create_qp: %s", strerror(errno));
	s->qp_created = true;
	for (unsigned i = 0; i < RDMA_RECV_DEPTH; i++) {
		r = post_recv(s, i);
		if (r < 0)
			return fail_qp(s, r, "posting receives: %s", strerror(-r));
	}

	uint8_t req[RDMA_REQ_LEN];
	struct rdma_req m = { .version = RDMA_WIRE_VERSION, .qp = (uint16_t)s->idx,
			      .nr_qps = (uint16_t)x->nr_qps, .recv_depth = RDMA_RECV_DEPTH };
	memcpy(m.token, x->token, XPORT_TOKEN_LEN);
	rdma_encode_req(&m, req);
	struct rdma_conn_param cp = {
		.private_data = req,
		.private_data_len = sizeof(req),
		.responder_resources = (uint8_t)x->max_rd_atom, /* postcopy READs from the peer */
		.initiator_depth = 1,
		.retry_count = RETRY_COUNT,
		.rnr_retry_count = 7, /* credits keep receivers ready; this only rides out a race */
	};
	if (rdma_connect(s->id, &cp) < 0)
		return fail_qp(s, -errno, "rdma_connect: %s", strerror(errno));
	r = rdma_next_event(s->ch, x->stop_fd, SETUP_TIMEOUT_MS, &ev);
	if (r < 0)
		return fail_qp(s, r, "connecting: %s", r == -ETIMEDOUT ? "timed out" : strerror(-r));
	if (ev->event != RDMA_CM_EVENT_ESTABLISHED) {
		uint32_t code = ev->event == RDMA_CM_EVENT_REJECTED
					? rdma_decode_rej(ev->param.conn.private_data,
							  ev->param.conn.private_data_len)
					: 0;
		if (code)
			r = fail_qp(s, code == RDMA_REJ_INTERNAL ? -EIO : -ECONNREFUSED,
				    "the destination rejected it: %s", rdma_rej_name(code));
		else
			r = fail_qp(s, -ECONNREFUSED, "connecting: %s (status %d)",
				    rdma_event_str(ev->event), ev->status);
		rdma_ack_cm_event(ev);
		return r;
	}
	struct rdma_rep rep;
	r = rdma_decode_rep(ev->param.conn.private_data, ev->param.conn.private_data_len, &rep);
	rdma_ack_cm_event(ev);
	s->connected = true;
	if (r < 0)
		return fail_qp(s, -EPROTO, "the destination's reply is not ferry's");
	s->credits = rep.recv_depth;

	int64_t deadline = tcp_now_ms() + SETUP_TIMEOUT_MS;
	while (!s->got_regions) {
		int64_t left = deadline - tcp_now_ms();
		r = left > 0 ? progress(s, (int)left) : -ETIMEDOUT;
		if (r < 0)
			return fail_qp(s, r, "waiting for the region table: %s", strerror(-r));
	}
	if (s->nr_rr != rep.nr_regions)
		return fail_qp(s, -EPROTO, "region table of %u regions, the reply said %u",
			       s->nr_rr, rep.nr_regions);
	return 0;
}

static void *qp_main(void *arg)
{
	struct src_qp *s = arg;
	struct rdma_src *x = s->x;
	char name[16];
	int r;

	snprintf(name, sizeof(name), "send-q%u", s->idx);
	pthread_setname_np(pthread_self(), name);

	r = qp_setup(s);

	pthread_mutex_lock(&x->lock);
	x->nr_started++;
	if (r < 0 && !x->start_err)
		x->start_err = r;
	pthread_cond_broadcast(&x->done_cond);
	if (r < 0) {
		pthread_mutex_unlock(&x->lock);
		qp_teardown(s);
		return NULL;
	}
	for (;;) {
		while (!x->quit && s->gen_seen == x->gen)
			pthread_cond_wait(&x->work_cond, &x->lock);
		if (x->quit)
			break;
		s->gen_seen = x->gen;
		enum src_job job = x->job;
		pthread_mutex_unlock(&x->lock);

		r = job == JOB_EXPOSE ? qp_expose(s) : qp_batch(s);

		pthread_mutex_lock(&x->lock);
		if (r < 0 && !x->first_err) {
			x->first_err = r;
			stop_all(x);
		}
		x->nr_done++;
		pthread_cond_broadcast(&x->done_cond);
	}
	pthread_mutex_unlock(&x->lock);
	qp_teardown(s);
	return NULL;
}

/* ---------------- the engine's calls ---------------- */

/* Deals the batch's runs onto the queue pairs (xport_deal_runs) and sets their fence. */
static int distribute(struct rdma_src *x, const struct page_run *runs, unsigned n,
		      uint64_t fence)
{
	struct xport_runs *lanes[XPORT_MAX_STREAMS];

	for (unsigned i = 0; i < x->nr_qps; i++) {
		lanes[i] = &x->qps[i].runs;
		x->qps[i].fence = fence;
	}
	return xport_deal_runs(runs, n, x->stripe_pages, lanes, x->nr_qps);
}

/* Runs one job on every queue pair thread and waits for all; first error wins. */
static int run_job(struct rdma_src *x, enum src_job job)
{
	int r;

	pthread_mutex_lock(&x->lock);
	x->job = job;
	x->nr_done = 0;
	x->first_err = 0;
	x->gen++;
	pthread_cond_broadcast(&x->work_cond);
	while (x->nr_done < x->nr_qps)
		pthread_cond_wait(&x->done_cond, &x->lock);
	r = x->first_err;
	pthread_mutex_unlock(&x->lock);
	if (atomic_load(&x->cancelled))
		r = -ECANCELED;
	if (r < 0)
		x->broken = r; /* WRITEs of a failed batch may be anywhere: never again */
	return r;
}

static int src_send(struct xport_src *base, const struct page_run *runs, unsigned n,
		    uint64_t fence)
{
	struct rdma_src *x = to_src(base);
	int r;

	if (atomic_load(&x->cancelled))
		return -ECANCELED;
	if (x->broken)
		return x->broken;
	if (n && !runs)
		return -EINVAL;
	/* Against our regions and the destination's table, before any byte moves. */
	for (unsigned i = 0; i < n; i++) {
		const struct page_run *u = &runs[i];
		if (u->region >= x->nr_regions || u->region >= x->nr_rr || !u->npages ||
		    u->first_page > x->region_pages[u->region] ||
		    u->npages > x->region_pages[u->region] - u->first_page ||
		    u->first_page + u->npages > x->rr[u->region].len / PAGE)
			return -EINVAL;
	}
	r = distribute(x, runs, n, fence);
	if (r < 0)
		return r;
	r = run_job(x, JOB_BATCH);
	if (r < 0)
		return r;
	atomic_fetch_add_explicit(&x->batches, 1, memory_order_relaxed);
	return 0;
}

static void src_set_bandwidth(struct xport_src *base, uint64_t bytes_per_sec)
{
	xport_bucket_set(&to_src(base)->bucket, bytes_per_sec);
}

static void src_cancel(struct xport_src *base)
{
	struct rdma_src *x = to_src(base);

	atomic_store(&x->cancelled, true);
	stop_all(x);
}

static void src_stats(const struct xport_src *base, struct xport_src_stats *ret)
{
	struct rdma_src *x = container_of(base, struct rdma_src, base);

	ret->bytes = atomic_load_explicit(&x->bytes, memory_order_relaxed);
	ret->pages = atomic_load_explicit(&x->pages, memory_order_relaxed);
	ret->zero_pages = atomic_load_explicit(&x->zero_pages, memory_order_relaxed);
	ret->batches = atomic_load_explicit(&x->batches, memory_order_relaxed);
}

static void src_free(struct xport_src *base)
{
	struct rdma_src *x = to_src(base);

	if (x->qps) {
		/* A thread still setting up waits on the stop eventfd: cut it short. */
		if (x->stop_fd >= 0)
			stop_all(x);
		pthread_mutex_lock(&x->lock);
		x->quit = true;
		pthread_cond_broadcast(&x->work_cond);
		pthread_mutex_unlock(&x->lock);
		/* Each thread disconnects and unwinds its own queue pair. */
		for (unsigned i = 0; i < x->nr_qps; i++) {
			struct src_qp *s = &x->qps[i];
			if (s->thread_started)
				pthread_join(s->thread, NULL);
			else
				qp_teardown(s);
		}
		for (unsigned i = 0; i < x->nr_qps; i++) {
			struct src_qp *s = &x->qps[i];
			if (s->id)
				rdma_destroy_id(s->id);
			if (s->ch)
				rdma_destroy_event_channel(s->ch);
			xport_runs_free(&s->runs);
		}
		free(x->qps);
	}
	for (unsigned i = 0; i < x->nr_regions; i++) {
		if (x->exposed[i])
			ibv_dereg_mr(x->exposed[i]);
		free((void *)x->touched[i]);
	}
	if (x->pd)
		ibv_dealloc_pd(x->pd);
	if (x->stop_fd >= 0)
		close(x->stop_fd);
	pthread_cond_destroy(&x->done_cond);
	pthread_cond_destroy(&x->work_cond);
	xport_bucket_destroy(&x->bucket);
	pthread_mutex_destroy(&x->lock);
	free(x->region_pages);
	free(x);
}

static const struct xport_src_ops rdma_src_ops = {
	.name = "rdma",
	.send = src_send,
	.set_bandwidth = src_set_bandwidth,
	.cancel = src_cancel,
	.stats = src_stats,
	.free = src_free,
};

/* Address and route for one queue pair, on the caller's thread. */
static int qp_resolve(struct rdma_src *x, struct src_qp *s, const char *ip, char *err,
		      size_t errlen)
{
	struct rdma_cm_event *ev;
	uint8_t tmo = ACK_TIMEOUT_EXP;
	int r;

	s->ch = rdma_create_event_channel();
	if (!s->ch) {
		r = -errno;
		xport_set_err(err, errlen, "rdma_create_event_channel: %s (is rdma_ucm loaded?)",
			      strerror(-r));
		return r;
	}
	r = rdma_channel_nonblock(s->ch);
	if (r < 0) {
		xport_set_err(err, errlen, "event channel: %s", strerror(-r));
		return r;
	}
	if (rdma_create_id(s->ch, &s->id, s, RDMA_PS_TCP) < 0) {
		r = -errno;
		s->id = NULL;
		xport_set_err(err, errlen, "rdma_create_id: %s", strerror(-r));
		return r;
	}
	/* Best effort (older kernels lack it): bounds how long a dead peer goes unnoticed. */
	(void)rdma_set_option(s->id, RDMA_OPTION_ID, RDMA_OPTION_ID_ACK_TIMEOUT, &tmo,
			      sizeof(tmo));
	if (rdma_resolve_addr(s->id, NULL, (struct sockaddr *)&x->dst_addr, RESOLVE_TIMEOUT_MS) <
	    0) {
		r = -errno;
		xport_set_err(err, errlen, "resolving %s: %s", ip, strerror(-r));
		return r;
	}
	r = rdma_next_event(s->ch, -1, RESOLVE_TIMEOUT_MS + 1000, &ev);
	if (r < 0) {
		xport_set_err(err, errlen, "resolving %s: %s", ip, strerror(-r));
		return r;
	}
	if (ev->event != RDMA_CM_EVENT_ADDR_RESOLVED) {
		xport_set_err(err, errlen, "resolving %s: %s (%s)", ip, rdma_event_str(ev->event),
			      strerror(ev->status < 0 ? -ev->status : EHOSTUNREACH));
		rdma_ack_cm_event(ev);
		return -EHOSTUNREACH;
	}
	rdma_ack_cm_event(ev);
	if (rdma_resolve_route(s->id, RESOLVE_TIMEOUT_MS) < 0) {
		r = -errno;
		xport_set_err(err, errlen, "route to %s: %s", ip, strerror(-r));
		return r;
	}
	r = rdma_next_event(s->ch, -1, RESOLVE_TIMEOUT_MS + 1000, &ev);
	if (r < 0) {
		xport_set_err(err, errlen, "route to %s: %s", ip, strerror(-r));
		return r;
	}
	if (ev->event != RDMA_CM_EVENT_ROUTE_RESOLVED) {
		xport_set_err(err, errlen, "route to %s: %s", ip, rdma_event_str(ev->event));
		rdma_ack_cm_event(ev);
		return -EHOSTUNREACH;
	}
	rdma_ack_cm_event(ev);
	return 0;
}

int xport_src_rdma_new(const struct xport_src_config *cfg, const char *ip, uint16_t port,
		       const uint8_t token[XPORT_TOKEN_LEN], const int *region_fds,
		       const uint64_t *region_sizes, unsigned nr_regions, struct xport_src **ret,
		       char *err, size_t errlen)
{
	struct rdma_src *x;
	int r;

	if (!cfg || !cfg->streams || cfg->streams > XPORT_MAX_STREAMS || !ip || !port ||
	    !token || !region_fds || !region_sizes || !nr_regions ||
	    nr_regions > XPORT_MAX_REGIONS || !ret) {
		xport_set_err(err, errlen, "bad transport configuration");
		return -EINVAL;
	}
	for (unsigned i = 0; i < nr_regions; i++) {
		if (region_sizes[i] % PAGE || !region_sizes[i] || region_fds[i] < 0) {
			xport_set_err(err, errlen, "region %u: bad file or size", i);
			return -EINVAL;
		}
	}

	x = calloc(1, sizeof(*x));
	if (!x) {
		xport_set_err(err, errlen, "out of memory");
		return -ENOMEM;
	}
	x->base.ops = &rdma_src_ops;
	x->stop_fd = -1;
	x->nr_regions = nr_regions;
	x->reader_cfg = cfg->reader;
	memcpy(x->token, token, XPORT_TOKEN_LEN);
	/* Locks first: src_free() destroys them whatever else got built. */
	pthread_mutex_init(&x->lock, NULL);
	xport_bucket_init(&x->bucket);
	pthread_cond_init(&x->work_cond, NULL);
	pthread_cond_init(&x->done_cond, NULL);

	if (rdma_parse_addr(ip, port, &x->dst_addr) < 0) {
		r = -EINVAL;
		xport_set_err(err, errlen, "bad address \"%s\"", ip);
		goto err_free;
	}
	x->region_pages = calloc(nr_regions, sizeof(*x->region_pages));
	if (!x->region_pages) {
		r = -ENOMEM;
		xport_set_err(err, errlen, "out of memory");
		goto err_free;
	}
	for (unsigned i = 0; i < nr_regions; i++) {
		x->region_pages[i] = region_sizes[i] / PAGE;
		x->touched[i] = calloc((x->region_pages[i] + 63) / 64, sizeof(uint64_t));
		if (!x->touched[i]) {
			r = -ENOMEM;
			xport_set_err(err, errlen, "out of memory");
			goto err_free;
		}
	}
	x->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (x->stop_fd < 0) {
		r = -errno;
		xport_set_err(err, errlen, "eventfd: %s", strerror(-r));
		goto err_free;
	}
	x->qps = calloc(cfg->streams, sizeof(*x->qps));
	if (!x->qps) {
		r = -ENOMEM;
		xport_set_err(err, errlen, "out of memory");
		goto err_free;
	}
	x->nr_qps = cfg->streams;
	for (unsigned i = 0; i < x->nr_qps; i++) {
		x->qps[i].x = x;
		x->qps[i].idx = i;
	}

	/* Addresses and routes first: they name the device, whose PD all queue pairs share. */
	for (unsigned i = 0; i < x->nr_qps; i++) {
		r = qp_resolve(x, &x->qps[i], ip, err, errlen);
		if (r < 0)
			goto err_free;
		if (x->qps[i].id->verbs != x->qps[0].id->verbs) {
			r = -EXDEV;
			xport_set_err(err, errlen, "queue pairs to %s resolve to different devices",
				      ip);
			goto err_free;
		}
	}
	struct ibv_device_attr da;
	if (ibv_query_device(x->qps[0].id->verbs, &da)) {
		r = -EIO;
		xport_set_err(err, errlen, "ibv_query_device failed");
		goto err_free;
	}
	x->max_rd_atom = da.max_qp_rd_atom < (int)MAX_RD_ATOM ? (unsigned)da.max_qp_rd_atom
							      : MAX_RD_ATOM;
	x->pd = ibv_alloc_pd(x->qps[0].id->verbs);
	if (!x->pd) {
		r = errno ? -errno : -ENOMEM;
		xport_set_err(err, errlen, "ibv_alloc_pd: %s", strerror(-r));
		goto err_free;
	}

	/* The threads: each sets its queue pair up, connects and gets the table. */
	x->region_fds = region_fds;
	r = 0;
	for (unsigned i = 0; i < x->nr_qps; i++) {
		struct src_qp *s = &x->qps[i];
		r = -pthread_create(&s->thread, NULL, qp_main, s);
		if (r < 0) {
			xport_set_err(err, errlen, "starting queue pair thread %u: %s", i,
				      strerror(-r));
			break;
		}
		s->thread_started = true;
	}
	pthread_mutex_lock(&x->lock);
	unsigned started = 0;
	for (unsigned i = 0; i < x->nr_qps; i++)
		started += x->qps[i].thread_started;
	while (x->nr_started < started)
		pthread_cond_wait(&x->done_cond, &x->lock);
	if (!r && x->start_err) {
		r = x->start_err;
		for (unsigned i = 0; i < x->nr_qps; i++) {
			if (x->qps[i].dead) {
				xport_set_err(err, errlen, "queue pair %u to %s:%u: %s", i, ip, port,
					      x->qps[i].err);
				break;
			}
		}
	}
	pthread_mutex_unlock(&x->lock);
	x->region_fds = NULL; /* the readers hold their own references now */
	if (r < 0)
		goto err_free;

	/* One table for all: the destination registered its memory once. */
	struct src_qp *q0 = &x->qps[0];
	for (unsigned i = 1; i < x->nr_qps; i++) {
		if (x->qps[i].nr_rr != q0->nr_rr ||
		    memcmp(x->qps[i].rr, q0->rr, q0->nr_rr * sizeof(q0->rr[0])) ||
		    x->qps[i].rr_flags != q0->rr_flags) {
			r = -EPROTO;
			xport_set_err(err, errlen, "queue pairs got different region tables");
			goto err_free;
		}
	}
	x->nr_rr = q0->nr_rr;
	memcpy(x->rr, q0->rr, x->nr_rr * sizeof(x->rr[0]));
	if (!(q0->rr_flags & RDMA_REGIONS_ZEROED)) {
		/* Nothing is known of the destination's memory: every zero page goes once. */
		for (unsigned i = 0; i < nr_regions; i++)
			memset((void *)x->touched[i], 0xff,
			       (x->region_pages[i] + 63) / 64 * sizeof(uint64_t));
	}
	{
		struct pagereader_config eff;
		pagereader_get_config(q0->reader, &eff);
		x->stripe_pages = eff.batch_pages > MIN_STRIPE_PAGES ? eff.batch_pages
								     : MIN_STRIPE_PAGES;
	}
	src_set_bandwidth(&x->base, cfg->bandwidth);
	*ret = &x->base;
	return 0;

err_free:
	src_free(&x->base);
	return r;
}

int xport_src_rdma_expose(struct xport_src *base, void *const *region_hvas, char *err,
			  size_t errlen)
{
	struct rdma_src *x;
	int r;

	if (!base || base->ops != &rdma_src_ops) {
		xport_set_err(err, errlen, "not an RDMA transport");
		return -EOPNOTSUPP;
	}
	x = to_src(base);
	if (!region_hvas) {
		xport_set_err(err, errlen, "no guest memory given");
		return -EINVAL;
	}
	if (x->exposing) {
		xport_set_err(err, errlen, "guest memory already exposed");
		return -EALREADY;
	}
	if (atomic_load(&x->cancelled))
		return -ECANCELED;
	if (x->broken) {
		xport_set_err(err, errlen, "the transport failed before");
		return x->broken;
	}
	for (unsigned i = 0; i < x->nr_regions; i++) {
		if (!region_hvas[i] || (uintptr_t)region_hvas[i] % PAGE) {
			xport_set_err(err, errlen, "region %u: not page aligned", i);
			return -EINVAL;
		}
	}
	x->exposing = true;
	for (unsigned i = 0; i < x->nr_regions; i++) {
		x->exposed[i] = ibv_reg_mr(x->pd, region_hvas[i], x->region_pages[i] * PAGE,
					   IBV_ACCESS_REMOTE_READ);
		if (!x->exposed[i]) {
			r = errno ? -errno : -ENOMEM;
			xport_set_err(err, errlen, "registering region %u for remote read: %s%s",
				      i, strerror(-r),
				      r == -ENOMEM ? " (RLIMIT_MEMLOCK too low for guest memory?)"
						   : "");
			goto err_dereg;
		}
	}
	r = run_job(x, JOB_EXPOSE);
	if (r < 0) {
		xport_set_err(err, errlen, "sending the table: %s", strerror(-r));
		return r; /* broken now; the MRs go with free */
	}
	return 0;

err_dereg:
	for (unsigned i = 0; i < x->nr_regions; i++) {
		if (x->exposed[i])
			ibv_dereg_mr(x->exposed[i]);
		x->exposed[i] = NULL;
	}
	x->exposing = false;
	return r;
}
