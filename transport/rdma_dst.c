// SPDX-License-Identifier: Apache-2.0
/*
 * The RDMA destination (struct xport_dst over RDMA, transport.h). Guest memory is
 * registered once, one memory region per xport_region, for remote write; the source's
 * WRITEs land in it without this side's CPU. What is left for the CPU is small, so one
 * thread ("rdma-dst") does all of it: it accepts the rdma_cm connections (checking the
 * token and queue pair index in the private data, rejecting anything else), sends each new
 * queue pair the region table (addresses and keys) as its first SEND, takes the FENCE
 * SENDs that close each batch (RC ordering: a SEND posted after WRITEs on a queue pair
 * completes here after those WRITEs landed), answers each with a FENCE_ACK, and watches
 * for disconnects and queue pairs that went to the error state. The NIC enforces the
 * bounds: a WRITE outside a registered region, or with a key of a freed destination, is
 * refused with a remote access error and kills its queue pair.
 *
 * One control block per connection (struct dst_qp, as rdma-core's rping), set up and torn
 * down in pairs; xport_dst_free() disconnects every queue pair, deregisters the guest memory
 * (from then on no write can land) and unwinds the rest in reverse order of creation.
 *
 * Postcopy: xport_dst_rdma_fetch() RDMA-READs pages from the memory the source exposed
 * (RDMA_MSG_SRC_REGIONS) into a registered bounce buffer — one slot per fetch call — and
 * the calling thread places them: through the region's userfaultfd once
 * xport_dst_set_uffd() gave one (UFFDIO_COPY installs a page only where none is and wakes
 * whoever waits for it), else by copying into the region. Never straight into guest
 * memory: postcopy punches the needed pages out of the memfd, and the pages the guest
 * memory's registration pinned are then no longer the guest's. For the same reason
 * set_uffd deregisters the region's memory (the orphaned pinned pages are freed and any
 * later WRITE from the source fails on the NIC instead of landing nowhere).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <infiniband/verbs.h>
#include <rdma/rdma_cma.h>

#include "transport/xport_internal.h"

#define PAGE PAGEREADER_PAGE_SIZE
#define SEND_SLOTS RDMA_RECV_DEPTH /* our sends in flight <= the peer's receive buffers */
#define FETCH_SLOTS 8u             /* postcopy fetches in flight, over all queue pairs */
#define FETCH_SLOT_BYTES (128u * PAGE) /* a fetch's bounce slot: one READ at most */
#define MAX_RD_ATOM 16u
#define CQ_POLL_BATCH 32
#define CQ_ACK_BATCH 64u

/* wr_id: kind in the top byte, queue pair index, slot. */
enum wr_kind { WR_RECV = 1, WR_SEND = 2, WR_READ = 3 };
#define WR_ID(kind, qp, slot) (((uint64_t)(kind) << 56) | ((uint64_t)(qp) << 32) | (slot))
#define WR_KIND(id) ((unsigned)((id) >> 56))
#define WR_QP(id) ((unsigned)(((id) >> 32) & 0xffffff))
#define WR_SLOT(id) ((unsigned)((id) & 0xffffffff))

enum qp_state {
	QP_IDLE,       /* no connection for this index yet */
	QP_CONNECTING, /* accepted, waiting for ESTABLISHED */
	QP_RUNNING,
	QP_CLOSED,     /* disconnected (by the source, or by us tearing down) */
	QP_FAILED,     /* went wrong; x->err says why */
};

struct rdma_dst;

struct dst_qp {
	struct rdma_dst *x;
	unsigned idx;
	struct rdma_cm_id *id; /* the accepted connection; destroyed by free */
	bool qp_created;
	uint8_t *recv_buf;     /* RDMA_RECV_DEPTH slots of RDMA_MSG_MAX, inside x->msgbuf */
	uint8_t *send_buf;     /* SEND_SLOTS slots */

	/* The receiver thread's own: */
	unsigned credits;   /* messages we may send: the peer's free receive buffers */
	unsigned to_return; /* our receive buffers re-posted since our last message */

	/* Under x->post_lock (the receiver thread and fetch callers post on the same SQ): */
	unsigned sends_out; /* our SENDs not completed yet */
	unsigned send_next;

	/* Under x->lock: */
	enum qp_state state;
	bool have_fence;
	uint64_t fence;
};

struct fetch_slot {
	bool busy;      /* a fetch call owns it */
	bool posted;    /* a READ is in flight */
	bool abandoned; /* its caller timed out: the completion frees it */
	int status;     /* 0 or -errno, set on completion */
};

struct rdma_dst {
	struct xport_dst base;
	unsigned nr_regions;
	struct xport_region regions[XPORT_MAX_REGIONS];
	unsigned expected;
	unsigned flags;
	uint8_t token[XPORT_TOKEN_LEN];
	uint16_t port;

	/* Set up in this order by new, torn down in reverse by free. */
	int stop_fd;
	struct rdma_event_channel *ch;
	struct rdma_cm_id *listen_id;
	struct ibv_pd *pd;
	struct ibv_mr *mr[XPORT_MAX_REGIONS];
	uint8_t *msgbuf;
	size_t msgbuf_len;
	struct ibv_mr *msg_mr;
	struct ibv_comp_channel *cc;
	struct ibv_cq *cq;
	unsigned cq_events; /* got, not yet acked (ibv_ack_cq_events before destroying the CQ) */
	struct dst_qp *qps;
	unsigned max_rd_atom, max_init_rd_atom;
	pthread_t thread;
	bool thread_started;

	/*
	 * Queue pair states and fences, the first error and its reason, the running count,
	 * the source's exposed regions, fetch slots. cond: a fence advanced, a queue pair
	 * changed state, the source's table arrived or a READ completed.
	 */
	pthread_mutex_t lock;
	pthread_cond_t cond;
	int err;
	char errstr[256];
	unsigned running;
	bool have_src;
	unsigned nr_src;
	struct rdma_remote_region src_rr[XPORT_MAX_REGIONS];
	struct fetch_slot fetch[FETCH_SLOTS];
	unsigned fetch_rr;
	/*
	 * Postcopy (set_uffd): the userfaultfd that places region i's fetched pages, ours (a
	 * duplicate), or -1; set once under lock, read by fetch under lock.
	 */
	int uffd[XPORT_MAX_REGIONS];
	/* FETCH_SLOTS bounce slots of FETCH_SLOT_BYTES for READs (LOCAL_WRITE only). */
	uint8_t *bounce;
	struct ibv_mr *bounce_mr;

	/* Posting on a queue pair and its sends_out/send_next: receiver thread vs fetchers. */
	pthread_mutex_t post_lock;

	atomic_bool stopping;
	_Atomic uint64_t bytes, pages, zero_pages;
	_Atomic uint64_t read_pages; /* fetched and placed (postcopy) */
};

static const struct xport_dst_ops rdma_dst_ops;

static struct rdma_dst *to_dst(struct xport_dst *x)
{
	return container_of(x, struct rdma_dst, base);
}

/* Called with x->lock held. The first error wins; later ones are only consequences. */
static void record_error(struct rdma_dst *x, int err, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static void record_error(struct rdma_dst *x, int err, const char *fmt, ...)
{
	va_list ap;

	if (x->err)
		return;
	va_start(ap, fmt);
	vsnprintf(x->errstr, sizeof(x->errstr), fmt, ap);
	va_end(ap);
	x->err = err;
}

/* Called with x->lock held: a queue pair leaves RUNNING/CONNECTING for good. */
static void qp_end(struct dst_qp *q, enum qp_state to)
{
	struct rdma_dst *x = q->x;

	if (q->state == QP_RUNNING)
		x->running--;
	if (q->state == QP_RUNNING || q->state == QP_CONNECTING)
		q->state = to;
	pthread_cond_broadcast(&x->cond);
}

/* A protocol violation or failure on one queue pair: record it, cut the connection. */
static void qp_fail(struct dst_qp *q, int err, const char *reason)
{
	struct rdma_dst *x = q->x;
	bool was_live;

	pthread_mutex_lock(&x->lock);
	was_live = q->state == QP_RUNNING || q->state == QP_CONNECTING;
	if (was_live && !atomic_load(&x->stopping)) {
		record_error(x, err, "qp %u: %s", q->idx, reason);
		qp_end(q, QP_FAILED);
	}
	pthread_mutex_unlock(&x->lock);
	/* Tells the source now and moves our queue pair to the error state. */
	if (was_live && q->id)
		rdma_disconnect(q->id);
}

static int post_recv(struct dst_qp *q, unsigned slot)
{
	struct ibv_sge sge = {
		.addr = (uintptr_t)(q->recv_buf + (size_t)slot * RDMA_MSG_MAX),
		.length = RDMA_MSG_MAX,
		.lkey = q->x->msg_mr->lkey,
	};
	struct ibv_recv_wr wr = { .wr_id = WR_ID(WR_RECV, q->idx, slot), .sg_list = &sge,
				  .num_sge = 1 };
	struct ibv_recv_wr *bad;

	return -ibv_post_recv(q->id->qp, &wr, &bad);
}

/*
 * Sends one message built by `build` into the next send slot (signalled: the completion
 * frees the slot). Uses one of the peer's credits and returns ours. Receiver thread only.
 */
static int send_msg(struct dst_qp *q, size_t (*build)(uint8_t *buf, uint16_t credits,
						       const void *arg),
		    const void *arg)
{
	struct rdma_dst *x = q->x;
	int r;

	if (!q->credits)
		return -ENOBUFS;
	pthread_mutex_lock(&x->post_lock);
	if (q->sends_out >= SEND_SLOTS) {
		pthread_mutex_unlock(&x->post_lock);
		return -ENOBUFS;
	}
	unsigned slot = q->send_next % SEND_SLOTS;
	uint8_t *buf = q->send_buf + (size_t)slot * RDMA_MSG_MAX;
	size_t len = build(buf, (uint16_t)q->to_return, arg);
	struct ibv_sge sge = { .addr = (uintptr_t)buf, .length = (uint32_t)len,
			       .lkey = x->msg_mr->lkey };
	struct ibv_send_wr wr = {
		.wr_id = WR_ID(WR_SEND, q->idx, slot),
		.sg_list = &sge,
		.num_sge = 1,
		.opcode = IBV_WR_SEND,
		.send_flags = IBV_SEND_SIGNALED,
	};
	struct ibv_send_wr *bad;
	r = -ibv_post_send(q->id->qp, &wr, &bad);
	if (!r) {
		q->send_next++;
		q->sends_out++;
		q->credits--;
		q->to_return = 0;
	}
	pthread_mutex_unlock(&x->post_lock);
	return r;
}

static size_t build_regions(uint8_t *buf, uint16_t credits, const void *arg)
{
	const struct rdma_dst *x = arg;
	struct rdma_remote_region rr[XPORT_MAX_REGIONS];

	/* mr[i] is NULL only after set_uffd, long after every queue pair got its table. */
	for (unsigned i = 0; i < x->nr_regions; i++)
		rr[i] = (struct rdma_remote_region){ .addr = (uintptr_t)x->regions[i].hva,
						     .len = x->regions[i].size,
						     .rkey = x->mr[i] ? x->mr[i]->rkey : 0 };
	return rdma_msg_regions(buf, RDMA_MSG_REGIONS, credits,
				(x->flags & XPORT_RDMA_DST_ZEROED) ? RDMA_REGIONS_ZEROED : 0, rr,
				x->nr_regions);
}

static size_t build_fence_ack(uint8_t *buf, uint16_t credits, const void *arg)
{
	return rdma_msg_fence_ack(buf, credits, *(const uint64_t *)arg);
}

/* ---------------- connection events ---------------- */

static void reject(struct rdma_cm_id *id, uint32_t code)
{
	uint8_t rej[RDMA_REJ_LEN];

	rdma_encode_rej(code, rej);
	rdma_reject(id, rej, sizeof(rej));
}

static bool token_equal(const uint8_t *a, const uint8_t *b)
{
	uint8_t d = 0;

	for (unsigned i = 0; i < XPORT_TOKEN_LEN; i++)
		d |= a[i] ^ b[i];
	return d == 0;
}

/*
 * A new connection: check the private data, give it a queue pair on our PD and CQ, post
 * its receive buffers and accept. Returns true when ev->id must be destroyed (rejected),
 * which can only happen after the event was acked.
 */
static bool on_connect_request(struct rdma_dst *x, struct rdma_cm_event *ev)
{
	struct rdma_cm_id *id = ev->id;
	struct rdma_req req;
	struct dst_qp *q;
	int r;

	if (rdma_decode_req(ev->param.conn.private_data, ev->param.conn.private_data_len,
			    &req) < 0 ||
	    req.nr_qps != x->expected || !req.recv_depth) {
		reject(id, RDMA_REJ_PROTOCOL);
		return true;
	}
	if (!token_equal(req.token, x->token)) {
		reject(id, RDMA_REJ_TOKEN);
		return true;
	}
	if (req.qp >= x->expected) {
		reject(id, RDMA_REJ_INDEX);
		return true;
	}
	if (id->verbs != x->pd->context) { /* cannot happen: the listener is bound to one device */
		reject(id, RDMA_REJ_INTERNAL);
		return true;
	}
	q = &x->qps[req.qp];
	pthread_mutex_lock(&x->lock);
	r = q->state == QP_IDLE ? 0 : -EEXIST;
	pthread_mutex_unlock(&x->lock);
	if (r < 0) {
		reject(id, RDMA_REJ_INDEX);
		return true;
	}

	struct ibv_qp_init_attr attr = {
		.send_cq = x->cq,
		.recv_cq = x->cq,
		.qp_type = IBV_QPT_RC,
		.cap = { .max_send_wr = SEND_SLOTS + FETCH_SLOTS,
			 .max_recv_wr = RDMA_RECV_DEPTH,
			 .max_send_sge = 1,
			 .max_recv_sge = 1 },
	};
	id->context = q;
	q->id = id;
	if (rdma_create_qp(id, x->pd, &attr) < 0)
		goto err_reject;
	q->qp_created = true;
	for (unsigned i = 0; i < RDMA_RECV_DEPTH; i++) {
		if (post_recv(q, i) < 0)
			goto err_destroy_qp;
	}
	q->credits = req.recv_depth < SEND_SLOTS ? req.recv_depth : SEND_SLOTS;
	q->to_return = 0;

	uint8_t rep[RDMA_REP_LEN];
	struct rdma_rep m = { .version = RDMA_WIRE_VERSION,
			      .recv_depth = RDMA_RECV_DEPTH,
			      .flags = 0,
			      .nr_regions = x->nr_regions };
	rdma_encode_rep(&m, rep);
	struct rdma_conn_param cp = {
		.private_data = rep,
		.private_data_len = sizeof(rep),
		/* We take no READs (responder) but issue them in postcopy (initiator). */
		.responder_resources = ev->param.conn.initiator_depth < x->max_rd_atom
					       ? ev->param.conn.initiator_depth
					       : x->max_rd_atom,
		.initiator_depth = ev->param.conn.responder_resources < x->max_init_rd_atom
					   ? ev->param.conn.responder_resources
					   : x->max_init_rd_atom,
		.rnr_retry_count = 7,
	};
	if (rdma_accept(id, &cp) < 0)
		goto err_destroy_qp;
	pthread_mutex_lock(&x->lock);
	q->state = QP_CONNECTING;
	pthread_mutex_unlock(&x->lock);
	return false;

err_destroy_qp:
	rdma_destroy_qp(id);
	q->qp_created = false;
err_reject:
	q->id = NULL;
	id->context = NULL;
	reject(id, RDMA_REJ_INTERNAL);
	return true;
}

static void on_established(struct rdma_dst *x, struct dst_qp *q)
{
	int r;

	pthread_mutex_lock(&x->lock);
	if (q->state == QP_CONNECTING) {
		q->state = QP_RUNNING;
		x->running++;
		pthread_cond_broadcast(&x->cond);
	}
	pthread_mutex_unlock(&x->lock);
	r = send_msg(q, build_regions, x);
	if (r < 0) {
		char reason[96];
		snprintf(reason, sizeof(reason), "sending the region table: %s", strerror(-r));
		qp_fail(q, r, reason);
	}
}

/* Returns true when ev->id must be destroyed once the event is acked. */
static bool on_cm_event(struct rdma_dst *x, struct rdma_cm_event *ev)
{
	struct dst_qp *q = ev->id == x->listen_id ? NULL : ev->id->context;

	switch (ev->event) {
	case RDMA_CM_EVENT_CONNECT_REQUEST:
		return on_connect_request(x, ev);
	case RDMA_CM_EVENT_ESTABLISHED:
		if (q)
			on_established(x, q);
		return false;
	case RDMA_CM_EVENT_DISCONNECTED:
		if (q) {
			pthread_mutex_lock(&x->lock);
			qp_end(q, QP_CLOSED);
			pthread_mutex_unlock(&x->lock);
			/* Completes the handshake; our queue pair goes to the error state. */
			rdma_disconnect(ev->id);
		}
		return false;
	case RDMA_CM_EVENT_REJECTED:
	case RDMA_CM_EVENT_CONNECT_ERROR:
	case RDMA_CM_EVENT_UNREACHABLE:
		if (q) {
			char reason[96];
			snprintf(reason, sizeof(reason), "connection failed: %s (status %d)",
				 rdma_event_str(ev->event), ev->status);
			qp_fail(q, -ECONNRESET, reason);
		}
		return false;
	case RDMA_CM_EVENT_DEVICE_REMOVAL:
		pthread_mutex_lock(&x->lock);
		if (!atomic_load(&x->stopping))
			record_error(x, -ENODEV, "the RDMA device went away");
		pthread_cond_broadcast(&x->cond);
		pthread_mutex_unlock(&x->lock);
		return false;
	default: /* TIMEWAIT_EXIT, ADDR_CHANGE, ...: nothing to do */
		return false;
	}
}

static void drain_cm_events(struct rdma_dst *x)
{
	struct rdma_cm_event *ev;

	while (rdma_get_cm_event(x->ch, &ev) == 0) {
		struct rdma_cm_id *id = ev->id;
		bool destroy = on_cm_event(x, ev);
		rdma_ack_cm_event(ev);
		if (destroy)
			rdma_destroy_id(id);
	}
}

/* ---------------- completions ---------------- */

static void on_message(struct dst_qp *q, unsigned slot, uint32_t len)
{
	struct rdma_dst *x = q->x;
	const uint8_t *payload;
	uint16_t type, credits;
	uint32_t plen;
	char reason[128];
	int r;

	if (rdma_msg_parse(q->recv_buf + (size_t)slot * RDMA_MSG_MAX, len, &type, &credits,
			   &payload, &plen) < 0) {
		snprintf(reason, sizeof(reason), "malformed message of %u bytes", len);
		qp_fail(q, -EPROTO, reason);
		return;
	}
	q->credits += credits;
	if (q->credits > SEND_SLOTS + RDMA_RECV_DEPTH) {
		qp_fail(q, -EPROTO, "credits beyond our receive depth");
		return;
	}

	switch (type) {
	case RDMA_MSG_FENCE: {
		struct rdma_fence_msg f;
		if (rdma_decode_fence(payload, plen, &f) < 0) {
			qp_fail(q, -EPROTO, "bad FENCE message");
			return;
		}
		pthread_mutex_lock(&x->lock);
		if (q->have_fence && f.fence < q->fence) {
			snprintf(reason, sizeof(reason), "FENCE %llu after FENCE %llu",
				 (unsigned long long)f.fence, (unsigned long long)q->fence);
			pthread_mutex_unlock(&x->lock);
			qp_fail(q, -EPROTO, reason);
			return;
		}
		/* RC ordering: every WRITE posted before this SEND on the queue pair landed. */
		/* Counted before the waiters wake: a fence seen means its batch is counted. */
		atomic_fetch_add_explicit(&x->bytes, f.bytes + len, memory_order_relaxed);
		atomic_fetch_add_explicit(&x->pages, f.pages, memory_order_relaxed);
		atomic_fetch_add_explicit(&x->zero_pages, f.zero_pages, memory_order_relaxed);
		q->have_fence = true;
		q->fence = f.fence;
		pthread_cond_broadcast(&x->cond);
		pthread_mutex_unlock(&x->lock);
		r = post_recv(q, slot);
		if (r == 0) {
			q->to_return++;
			r = send_msg(q, build_fence_ack, &f.fence);
		}
		if (r < 0) {
			snprintf(reason, sizeof(reason), "answering FENCE %llu: %s",
				 (unsigned long long)f.fence,
				 r == -ENOBUFS ? "the source returns no receive credit"
					       : strerror(-r));
			qp_fail(q, r == -ENOBUFS ? -EPROTO : r, reason);
		}
		return;
	}
	case RDMA_MSG_SRC_REGIONS: {
		struct rdma_remote_region rr[XPORT_MAX_REGIONS];
		uint32_t flags;
		unsigned n;
		if (rdma_decode_regions(payload, plen, &flags, rr, &n) < 0) {
			qp_fail(q, -EPROTO, "bad SRC_REGIONS message");
			return;
		}
		pthread_mutex_lock(&x->lock);
		memcpy(x->src_rr, rr, n * sizeof(rr[0]));
		x->nr_src = n;
		x->have_src = true;
		pthread_cond_broadcast(&x->cond);
		pthread_mutex_unlock(&x->lock);
		r = post_recv(q, slot);
		if (r < 0) {
			qp_fail(q, r, "re-posting a receive buffer failed");
			return;
		}
		q->to_return++;
		return;
	}
	default:
		snprintf(reason, sizeof(reason), "unexpected message type %u", type);
		qp_fail(q, -EPROTO, reason);
		return;
	}
}

static void on_completion(struct rdma_dst *x, const struct ibv_wc *wc)
{
	unsigned kind = WR_KIND(wc->wr_id), qi = WR_QP(wc->wr_id), slot = WR_SLOT(wc->wr_id);
	struct dst_qp *q = qi < x->expected ? &x->qps[qi] : NULL;
	char reason[200];

	if (kind == WR_READ) {
		/* A postcopy READ: hand the outcome to its fetch call. */
		pthread_mutex_lock(&x->lock);
		if (slot < FETCH_SLOTS) {
			struct fetch_slot *f = &x->fetch[slot];
			f->posted = false;
			f->status = wc->status == IBV_WC_SUCCESS ? 0
				    : wc->status == IBV_WC_WR_FLUSH_ERR ? -ECONNRESET
				    : wc->status == IBV_WC_REM_ACCESS_ERR ? -EACCES
									  : -EIO;
			if (f->abandoned)
				*f = (struct fetch_slot){ 0 };
		}
		pthread_cond_broadcast(&x->cond);
		pthread_mutex_unlock(&x->lock);
		if (wc->status != IBV_WC_SUCCESS && wc->status != IBV_WC_WR_FLUSH_ERR && q) {
			snprintf(reason, sizeof(reason), "postcopy READ failed: %s",
				 ibv_wc_status_str(wc->status));
			qp_fail(q, -EIO, reason);
		}
		return;
	}
	if (!q)
		return;
	if (kind == WR_SEND) {
		pthread_mutex_lock(&x->post_lock);
		if (q->sends_out)
			q->sends_out--;
		pthread_mutex_unlock(&x->post_lock);
	}
	if (wc->status == IBV_WC_WR_FLUSH_ERR) {
		/*
		 * Teardown: the queue pair is in the error state. After a disconnect (ours or
		 * the source's) that is expected; while still connected, the NIC killed it —
		 * the source's WRITE fell outside the registered memory or used a stale key, or
		 * the link failed.
		 */
		qp_fail(q, -ECONNRESET,
			"the queue pair went to the error state while connected (a refused "
			"remote access: a WRITE outside the registered guest memory or with a "
			"bad key; or a transport failure)");
		return;
	}
	if (wc->status != IBV_WC_SUCCESS) {
		snprintf(reason, sizeof(reason), "%s failed: %s (vendor error 0x%x)",
			 kind == WR_RECV ? "receive" : "send", ibv_wc_status_str(wc->status),
			 wc->vendor_err);
		qp_fail(q, wc->status == IBV_WC_REM_ACCESS_ERR || wc->status == IBV_WC_LOC_PROT_ERR
				   ? -EACCES
				   : -ECONNRESET,
			reason);
		return;
	}
	if (kind == WR_RECV && slot < RDMA_RECV_DEPTH)
		on_message(q, slot, wc->byte_len);
}

static int drain_cq(struct rdma_dst *x)
{
	struct ibv_cq *cq;
	void *ctx;
	struct ibv_wc wc[CQ_POLL_BATCH];
	int n;

	while (ibv_get_cq_event(x->cc, &cq, &ctx) == 0) {
		if (++x->cq_events >= CQ_ACK_BATCH) {
			ibv_ack_cq_events(x->cq, x->cq_events);
			x->cq_events = 0;
		}
	}
	/* Re-arm first, then poll: a completion between the two still raises an event. */
	if (ibv_req_notify_cq(x->cq, 0))
		return -EIO;
	while ((n = ibv_poll_cq(x->cq, CQ_POLL_BATCH, wc)) > 0) {
		for (int i = 0; i < n; i++)
			on_completion(x, &wc[i]);
	}
	return n < 0 ? -EIO : 0;
}

static void *dst_main(void *arg)
{
	struct rdma_dst *x = arg;

	pthread_setname_np(pthread_self(), "rdma-dst");
	for (;;) {
		struct pollfd pfd[3] = {
			{ .fd = x->ch->fd, .events = POLLIN },
			{ .fd = x->cc->fd, .events = POLLIN },
			{ .fd = x->stop_fd, .events = POLLIN },
		};
		if (poll(pfd, 3, -1) < 0 && errno != EINTR)
			break;
		if (pfd[2].revents & POLLIN)
			break;
		drain_cm_events(x);
		if (drain_cq(x) < 0) {
			pthread_mutex_lock(&x->lock);
			record_error(x, -EIO, "polling the completion queue failed");
			pthread_cond_broadcast(&x->cond);
			pthread_mutex_unlock(&x->lock);
			break;
		}
	}
	return NULL;
}

/* ---------------- ops ---------------- */

static int dst_add_stream(struct xport_dst *base, int fd, unsigned idx)
{
	(void)base;
	(void)fd;
	(void)idx;
	return -EOPNOTSUPP; /* queue pairs arrive through rdma_cm */
}

static void deadline_after(struct timespec *ts, int timeout_ms)
{
	clock_gettime(CLOCK_MONOTONIC, ts);
	if (timeout_ms > 0) {
		ts->tv_sec += timeout_ms / 1000;
		ts->tv_nsec += (long)(timeout_ms % 1000) * 1000000;
		if (ts->tv_nsec >= 1000000000) {
			ts->tv_sec++;
			ts->tv_nsec -= 1000000000;
		}
	}
}

static int dst_wait_fence(struct xport_dst *base, uint64_t fence, int timeout_ms)
{
	struct rdma_dst *x = to_dst(base);
	struct timespec deadline;
	bool timed_out = false;
	int r;

	deadline_after(&deadline, timeout_ms);
	pthread_mutex_lock(&x->lock);
	for (;;) {
		bool all = true;

		for (unsigned i = 0; i < x->expected && !x->err; i++) {
			struct dst_qp *q = &x->qps[i];
			/* Fence 0 comes before every batch: passed by any queue pair. */
			if (fence == 0 || (q->have_fence && q->fence >= fence))
				continue;
			all = false;
			if (q->state == QP_CLOSED || q->state == QP_FAILED)
				record_error(x, -ECONNRESET, "qp %u closed before fence %llu (it reached %s%llu)",
					     i, (unsigned long long)fence,
					     q->have_fence ? "" : "none, ",
					     (unsigned long long)q->fence);
		}
		if (x->err) {
			r = x->err;
			break;
		}
		if (all) {
			r = 0;
			break;
		}
		if (timed_out || timeout_ms == 0) {
			r = -ETIMEDOUT;
			break;
		}
		if (timeout_ms < 0)
			pthread_cond_wait(&x->cond, &x->lock);
		else if (pthread_cond_timedwait(&x->cond, &x->lock, &deadline) == ETIMEDOUT)
			timed_out = true; /* one last look, then give up */
	}
	pthread_mutex_unlock(&x->lock);
	return r;
}

static const char *dst_error(const struct xport_dst *base)
{
	struct rdma_dst *x = container_of(base, struct rdma_dst, base);
	const char *e;

	pthread_mutex_lock(&x->lock);
	e = x->err ? x->errstr : "";
	pthread_mutex_unlock(&x->lock);
	return e;
}

static void dst_stats(const struct xport_dst *base, struct xport_dst_stats *ret)
{
	struct rdma_dst *x = container_of(base, struct rdma_dst, base);

	ret->bytes = atomic_load_explicit(&x->bytes, memory_order_relaxed);
	ret->pages = atomic_load_explicit(&x->pages, memory_order_relaxed);
	ret->zero_pages = atomic_load_explicit(&x->zero_pages, memory_order_relaxed);
	ret->read_pages = atomic_load_explicit(&x->read_pages, memory_order_relaxed);
	pthread_mutex_lock(&x->lock);
	ret->streams = x->running;
	pthread_mutex_unlock(&x->lock);
}

static void dst_free(struct xport_dst *base)
{
	struct rdma_dst *x = to_dst(base);

	atomic_store(&x->stopping, true);
	if (x->thread_started) {
		uint64_t one = 1;
		(void)!write(x->stop_fd, &one, sizeof(one));
		pthread_join(x->thread, NULL);
	}
	/* Disconnect first: every queue pair goes to the error state, the sources hear of it. */
	for (unsigned i = 0; x->qps && i < x->expected; i++) {
		if (x->qps[i].id && x->qps[i].qp_created)
			rdma_disconnect(x->qps[i].id);
	}
	/* The keys die here: from now on no WRITE (or READ) can touch guest memory. */
	for (unsigned i = 0; i < x->nr_regions; i++) {
		if (x->mr[i])
			ibv_dereg_mr(x->mr[i]);
		if (x->uffd[i] >= 0)
			close(x->uffd[i]);
	}
	for (unsigned i = 0; x->qps && i < x->expected; i++) {
		struct dst_qp *q = &x->qps[i];
		if (q->qp_created)
			rdma_destroy_qp(q->id);
		if (q->id)
			rdma_destroy_id(q->id);
	}
	free(x->qps);
	if (x->listen_id)
		rdma_destroy_id(x->listen_id);
	if (x->ch)
		rdma_destroy_event_channel(x->ch);
	if (x->cq) {
		if (x->cq_events)
			ibv_ack_cq_events(x->cq, x->cq_events);
		ibv_destroy_cq(x->cq);
	}
	if (x->cc)
		ibv_destroy_comp_channel(x->cc);
	if (x->msg_mr)
		ibv_dereg_mr(x->msg_mr);
	free(x->msgbuf);
	if (x->bounce_mr)
		ibv_dereg_mr(x->bounce_mr);
	if (x->bounce)
		munmap(x->bounce, (size_t)FETCH_SLOTS * FETCH_SLOT_BYTES);
	if (x->pd)
		ibv_dealloc_pd(x->pd);
	if (x->stop_fd >= 0)
		close(x->stop_fd);
	pthread_mutex_destroy(&x->post_lock);
	pthread_cond_destroy(&x->cond);
	pthread_mutex_destroy(&x->lock);
	free(x);
}

/*
 * Postcopy: fetched pages of `region` are placed through uffd from now on. The region's
 * registration goes: the source must not WRITE into guest memory any more (its pages are
 * being punched out), and the pages it pinned are freed instead of lingering orphaned.
 */
static int dst_set_uffd(struct xport_dst *base, unsigned region, int uffd)
{
	struct rdma_dst *x = to_dst(base);
	int fd;

	if (region >= x->nr_regions)
		return -EINVAL;
	fd = fcntl(uffd, F_DUPFD_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	pthread_mutex_lock(&x->lock);
	if (x->uffd[region] >= 0) {
		pthread_mutex_unlock(&x->lock);
		close(fd);
		return -EALREADY;
	}
	x->uffd[region] = fd;
	struct ibv_mr *mr = x->mr[region];
	x->mr[region] = NULL;
	pthread_mutex_unlock(&x->lock);
	if (mr)
		ibv_dereg_mr(mr);
	return 0;
}

static const struct xport_dst_ops rdma_dst_ops = {
	.name = "rdma",
	.add_stream = dst_add_stream,
	.set_uffd = dst_set_uffd,
	.wait_fence = dst_wait_fence,
	.error = dst_error,
	.stats = dst_stats,
	.free = dst_free,
};

uint16_t xport_dst_rdma_port(const struct xport_dst *base)
{
	if (!base || base->ops != &rdma_dst_ops)
		return 0;
	return container_of(base, struct rdma_dst, base)->port;
}

static int set_nonblock(int fd)
{
	int flags = fcntl(fd, F_GETFL);

	if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0)
		return -errno;
	return 0;
}

int xport_dst_rdma_new(const struct xport_region *regions, unsigned nr_regions,
		       unsigned expected_qps, unsigned flags, const char *bind_ip,
		       const uint8_t token[XPORT_TOKEN_LEN], struct xport_dst **ret, char *err,
		       size_t errlen)
{
	struct sockaddr_storage sa;
	struct ibv_device_attr da;
	pthread_condattr_t ca;
	struct rdma_dst *x;
	int r;

	if (!regions || !nr_regions || nr_regions > XPORT_MAX_REGIONS || !expected_qps ||
	    expected_qps > XPORT_MAX_STREAMS || !token || !ret || (flags & ~XPORT_RDMA_DST_ZEROED)) {
		xport_set_err(err, errlen, "bad transport configuration");
		return -EINVAL;
	}
	for (unsigned i = 0; i < nr_regions; i++) {
		if (!regions[i].hva || !regions[i].size || regions[i].size % PAGE ||
		    (uintptr_t)regions[i].hva % PAGE) {
			xport_set_err(err, errlen, "region %u: not page aligned", i);
			return -EINVAL;
		}
	}
	if (rdma_parse_addr(bind_ip, 0, &sa) < 0) {
		xport_set_err(err, errlen, "bad bind address \"%s\"", bind_ip ? bind_ip : "");
		return -EINVAL;
	}

	x = calloc(1, sizeof(*x));
	if (!x) {
		xport_set_err(err, errlen, "out of memory");
		return -ENOMEM;
	}
	x->base.ops = &rdma_dst_ops;
	x->stop_fd = -1;
	for (unsigned i = 0; i < XPORT_MAX_REGIONS; i++)
		x->uffd[i] = -1;
	x->nr_regions = nr_regions;
	memcpy(x->regions, regions, nr_regions * sizeof(regions[0]));
	x->expected = expected_qps;
	x->flags = flags;
	memcpy(x->token, token, XPORT_TOKEN_LEN);
	/* Locks first: dst_free() destroys them whatever else got built. */
	pthread_mutex_init(&x->lock, NULL);
	pthread_mutex_init(&x->post_lock, NULL);
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC); /* deadlines do not follow wall time */
	pthread_cond_init(&x->cond, &ca);
	pthread_condattr_destroy(&ca);

	x->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (x->stop_fd < 0) {
		r = -errno;
		xport_set_err(err, errlen, "eventfd: %s", strerror(-r));
		goto err_free;
	}
	x->qps = calloc(expected_qps, sizeof(*x->qps));
	if (!x->qps) {
		r = -ENOMEM;
		xport_set_err(err, errlen, "out of memory");
		goto err_free;
	}
	x->ch = rdma_create_event_channel();
	if (!x->ch) {
		r = -errno;
		xport_set_err(err, errlen, "rdma_create_event_channel: %s (is rdma_ucm loaded?)",
			      strerror(-r));
		goto err_free;
	}
	r = rdma_channel_nonblock(x->ch);
	if (r < 0) {
		xport_set_err(err, errlen, "event channel: %s", strerror(-r));
		goto err_free;
	}
	if (rdma_create_id(x->ch, &x->listen_id, x, RDMA_PS_TCP) < 0) {
		r = -errno;
		xport_set_err(err, errlen, "rdma_create_id: %s", strerror(-r));
		goto err_free;
	}
	if (rdma_bind_addr(x->listen_id, (struct sockaddr *)&sa) < 0) {
		r = -errno;
		xport_set_err(err, errlen, "binding to %s: %s", bind_ip, strerror(-r));
		goto err_free;
	}
	if (!x->listen_id->verbs) {
		r = -ENODEV;
		xport_set_err(err, errlen, "%s is not the address of an RDMA device", bind_ip);
		goto err_free;
	}
	if (ibv_query_device(x->listen_id->verbs, &da)) {
		r = -EIO;
		xport_set_err(err, errlen, "ibv_query_device failed");
		goto err_free;
	}
	x->max_rd_atom = da.max_qp_rd_atom < (int)MAX_RD_ATOM ? (unsigned)da.max_qp_rd_atom
							      : MAX_RD_ATOM;
	x->max_init_rd_atom = da.max_qp_init_rd_atom < (int)MAX_RD_ATOM
				      ? (unsigned)da.max_qp_init_rd_atom
				      : MAX_RD_ATOM;
	x->pd = ibv_alloc_pd(x->listen_id->verbs);
	if (!x->pd) {
		r = -errno ? -errno : -ENOMEM;
		xport_set_err(err, errlen, "ibv_alloc_pd: %s", strerror(-r));
		goto err_free;
	}
	for (unsigned i = 0; i < nr_regions; i++) {
		x->mr[i] = ibv_reg_mr(x->pd, regions[i].hva, regions[i].size,
				      IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
		if (!x->mr[i]) {
			r = errno ? -errno : -ENOMEM;
			xport_set_err(err, errlen, "registering region %u (%llu MiB): %s%s", i,
				      (unsigned long long)(regions[i].size >> 20), strerror(-r),
				      r == -ENOMEM || r == -EPERM
					      ? " (RLIMIT_MEMLOCK too low for guest memory?)"
					      : "");
			goto err_free;
		}
	}
	/* Per queue pair: receive buffers, then send buffers. */
	x->msgbuf_len = (size_t)expected_qps * (RDMA_RECV_DEPTH + SEND_SLOTS) * RDMA_MSG_MAX;
	x->msgbuf = aligned_alloc(PAGE, x->msgbuf_len);
	if (!x->msgbuf) {
		r = -ENOMEM;
		xport_set_err(err, errlen, "out of memory");
		goto err_free;
	}
	memset(x->msgbuf, 0, x->msgbuf_len);
	x->msg_mr = ibv_reg_mr(x->pd, x->msgbuf, x->msgbuf_len, IBV_ACCESS_LOCAL_WRITE);
	if (!x->msg_mr) {
		r = errno ? -errno : -ENOMEM;
		xport_set_err(err, errlen, "registering message buffers: %s", strerror(-r));
		goto err_free;
	}
	/* Postcopy's bounce slots: page aligned, as UFFDIO_COPY wants its source. */
	x->bounce = mmap(NULL, (size_t)FETCH_SLOTS * FETCH_SLOT_BYTES, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (x->bounce == MAP_FAILED) {
		x->bounce = NULL;
		r = -ENOMEM;
		xport_set_err(err, errlen, "out of memory");
		goto err_free;
	}
	x->bounce_mr = ibv_reg_mr(x->pd, x->bounce, (size_t)FETCH_SLOTS * FETCH_SLOT_BYTES,
				  IBV_ACCESS_LOCAL_WRITE);
	if (!x->bounce_mr) {
		r = errno ? -errno : -ENOMEM;
		xport_set_err(err, errlen, "registering the fetch buffers: %s", strerror(-r));
		goto err_free;
	}
	for (unsigned i = 0; i < expected_qps; i++) {
		struct dst_qp *q = &x->qps[i];
		q->x = x;
		q->idx = i;
		q->state = QP_IDLE;
		q->recv_buf = x->msgbuf + (size_t)i * (RDMA_RECV_DEPTH + SEND_SLOTS) * RDMA_MSG_MAX;
		q->send_buf = q->recv_buf + (size_t)RDMA_RECV_DEPTH * RDMA_MSG_MAX;
	}
	x->cc = ibv_create_comp_channel(x->listen_id->verbs);
	if (!x->cc) {
		r = errno ? -errno : -ENOMEM;
		xport_set_err(err, errlen, "ibv_create_comp_channel: %s", strerror(-r));
		goto err_free;
	}
	r = set_nonblock(x->cc->fd);
	if (r < 0) {
		xport_set_err(err, errlen, "completion channel: %s", strerror(-r));
		goto err_free;
	}
	int cqe = (int)(expected_qps * (RDMA_RECV_DEPTH + SEND_SLOTS + FETCH_SLOTS));
	if (cqe > da.max_cqe)
		cqe = da.max_cqe;
	x->cq = ibv_create_cq(x->listen_id->verbs, cqe, x, x->cc, 0);
	if (!x->cq) {
		r = errno ? -errno : -ENOMEM;
		xport_set_err(err, errlen, "ibv_create_cq: %s", strerror(-r));
		goto err_free;
	}
	if (ibv_req_notify_cq(x->cq, 0)) {
		r = -EIO;
		xport_set_err(err, errlen, "ibv_req_notify_cq failed");
		goto err_free;
	}
	if (rdma_listen(x->listen_id, (int)expected_qps + 4) < 0) {
		r = -errno;
		xport_set_err(err, errlen, "rdma_listen on %s: %s", bind_ip, strerror(-r));
		goto err_free;
	}
	x->port = ntohs(rdma_get_src_port(x->listen_id));
	r = -pthread_create(&x->thread, NULL, dst_main, x);
	if (r < 0) {
		xport_set_err(err, errlen, "starting the receiver thread: %s", strerror(-r));
		goto err_free;
	}
	x->thread_started = true;
	*ret = &x->base;
	return 0;

err_free:
	dst_free(&x->base);
	return r;
}

/* ---------------- postcopy ---------------- */

/*
 * Puts len fetched bytes from the bounce slot at offset off of region: through the
 * region's userfaultfd when it has one, else by copying. 0 or -errno.
 */
static int place_fetched(struct rdma_dst *x, uint32_t region, int uffd, uint64_t off,
			 const uint8_t *src, uint32_t len)
{
	uint8_t *dst = (uint8_t *)x->regions[region].hva + off;
	int r = 0;

	/* A page already there (EEXIST) came by another path and is left alone. */
	if (uffd >= 0)
		r = xport_uffd_place(uffd, dst, src, len, NULL, NULL);
	else
		memcpy(dst, src, len);
	if (r == 0)
		atomic_fetch_add_explicit(&x->read_pages, len / PAGE, memory_order_relaxed);
	return r;
}

int xport_dst_rdma_fetch(struct xport_dst *base, uint32_t region, uint64_t first_page,
			 uint32_t npages, int timeout_ms)
{
	struct rdma_dst *x;
	struct timespec deadline;
	struct dst_qp *q = NULL;
	unsigned slot = FETCH_SLOTS;
	int r = 0;

	if (!base || base->ops != &rdma_dst_ops)
		return -EOPNOTSUPP;
	x = to_dst(base);
	if (region >= x->nr_regions || !npages ||
	    first_page > x->regions[region].size / PAGE ||
	    npages > x->regions[region].size / PAGE - first_page)
		return -EINVAL;
	deadline_after(&deadline, timeout_ms);

	pthread_mutex_lock(&x->lock);
	/* The source's table, a running queue pair and a free slot, within the timeout. */
	for (;;) {
		if (x->err) {
			r = x->err;
			goto out_unlock;
		}
		if (x->have_src) {
			if (region >= x->nr_src ||
			    x->src_rr[region].len / PAGE < first_page + npages) {
				r = -EINVAL;
				goto out_unlock;
			}
			q = NULL;
			for (unsigned k = 0; k < x->expected && !q; k++) {
				struct dst_qp *c = &x->qps[(x->fetch_rr + k) % x->expected];
				if (c->state == QP_RUNNING)
					q = c;
			}
			if (!q) {
				r = -ECONNRESET;
				goto out_unlock;
			}
			for (unsigned k = 0; k < FETCH_SLOTS && slot == FETCH_SLOTS; k++) {
				if (!x->fetch[k].busy)
					slot = k;
			}
			if (slot < FETCH_SLOTS)
				break;
		}
		if (timeout_ms == 0) {
			r = -ETIMEDOUT;
			goto out_unlock;
		}
		if (timeout_ms < 0) {
			pthread_cond_wait(&x->cond, &x->lock);
		} else if (pthread_cond_timedwait(&x->cond, &x->lock, &deadline) == ETIMEDOUT) {
			r = -ETIMEDOUT;
			goto out_unlock;
		}
	}
	x->fetch_rr++;
	x->fetch[slot] = (struct fetch_slot){ .busy = true };
	struct rdma_remote_region src = x->src_rr[region];
	int uffd = x->uffd[region];
	pthread_mutex_unlock(&x->lock);

	/* One READ into our slot at a time, then its pages are placed; the slot is ours. */
	uint8_t *bounce = x->bounce + (size_t)slot * FETCH_SLOT_BYTES;
	uint64_t off = first_page * PAGE, end = off + (uint64_t)npages * PAGE;
	while (off < end && !r) {
		uint32_t len = end - off > FETCH_SLOT_BYTES ? FETCH_SLOT_BYTES : (uint32_t)(end - off);
		struct ibv_sge sge = { .addr = (uintptr_t)bounce,
				       .length = len,
				       .lkey = x->bounce_mr->lkey };
		struct ibv_send_wr wr = {
			.wr_id = WR_ID(WR_READ, q->idx, slot),
			.sg_list = &sge,
			.num_sge = 1,
			.opcode = IBV_WR_RDMA_READ,
			.send_flags = IBV_SEND_SIGNALED,
			.wr.rdma = { .remote_addr = src.addr + off, .rkey = src.rkey },
		};
		struct ibv_send_wr *bad;

		pthread_mutex_lock(&x->lock);
		x->fetch[slot].posted = true;
		pthread_mutex_unlock(&x->lock);
		/* The SQ has FETCH_SLOTS entries for READs beside the SEND_SLOTS for SENDs. */
		pthread_mutex_lock(&x->post_lock);
		r = -ibv_post_send(q->id->qp, &wr, &bad);
		pthread_mutex_unlock(&x->post_lock);

		pthread_mutex_lock(&x->lock);
		if (r) {
			x->fetch[slot].posted = false;
		} else {
			while (x->fetch[slot].posted) {
				if (timeout_ms < 0) {
					pthread_cond_wait(&x->cond, &x->lock);
				} else if (pthread_cond_timedwait(&x->cond, &x->lock, &deadline) ==
						   ETIMEDOUT &&
					   x->fetch[slot].posted) {
					/*
					 * The completion will come (or flush) and frees the slot: its
					 * bounce buffer is not reused before the NIC is done with it.
					 */
					x->fetch[slot].abandoned = true;
					pthread_mutex_unlock(&x->lock);
					return -ETIMEDOUT;
				}
			}
			r = x->fetch[slot].status;
		}
		pthread_mutex_unlock(&x->lock);
		if (!r)
			r = place_fetched(x, region, uffd, off, bounce, len);
		off += len;
	}
	pthread_mutex_lock(&x->lock);
	x->fetch[slot] = (struct fetch_slot){ 0 };
	pthread_cond_broadcast(&x->cond);
out_unlock:
	pthread_mutex_unlock(&x->lock);
	return r;
}
