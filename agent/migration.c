// SPDX-License-Identifier: Apache-2.0
/*
 * Migration jobs, both directions, and the handoff of DESIGN.md.
 *
 * Source (one thread "mig-N" per outgoing migration): connect, HELLO/WELCOME, VM_OFFER/
 * VM_ACCEPT, open the data streams, start dirty tracking with every page dirty, then
 * precopy rounds: harvest, take the dirty chunks (re-protected as they are taken), send
 * them as page runs, close the round with a fence and ROUND_END, measure, and switch over
 * when remaining bytes / measured bandwidth fits the downtime target (or on request).
 * Switch-over: pause (kicks every vCPU), final harvest, last pages, STATE, COMMIT_REQ; on
 * COMMITTED the source deletes its copy. Before COMMIT_REQ any fault or cancel resumes the
 * VM here. After COMMIT_REQ the decision is the destination's: a lost connection leaves
 * the VM paused (UNCERTAIN) while the source asks the destination, with backoff, what it
 * decided; only NOT_RUN or UNKNOWN lets it resume.
 *
 * Destination (one thread per incoming migration, started by the listener on HELLO):
 * create the VM with no guest, register its memory with the data path, acknowledge, then
 * apply ROUND_END/STATE/COMMIT_REQ each after its fence; verify digests when asked,
 * restore the state, record the decision RUN before answering, start the vCPUs, answer
 * COMMITTED. Any fault before the decision discards the VM.
 *
 * Locks: agent->lock guards the migration list and VM holds; m->lock guards m->info, the
 * request flags (cancel, switchover) and the destination's decision.
 */
#include "agent/agent_internal.h"
#include "agent/postcopy.h"

#include <dirent.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <openssl/evp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <math.h>
#include <time.h>
#include <unistd.h>

#include "scheduler/scheduler.h"
#include "transport/transport.h"

#define CTL_TIMEOUT_MS 30000
#define OFFER_TIMEOUT_MS 120000 /* the destination may need to allocate a big VM */
#define FENCE_TIMEOUT_MS 120000
#define DEST_IDLE_TIMEOUT_MS 300000
#define FIRST_FRAME_TIMEOUT_MS 5000
#define PULL_FETCH_TIMEOUT_MS 20000 /* one RDMA READ run of postcopy pull mode */
#define PULL_POLL_MS 100            /* the destination looks at the pullers this often */
#define STATE_TIME_MS 5.0      /* estimate of state transfer in the downtime forecast */
#define TAKE_GROUP_CHUNKS 16u  /* chunks taken (re-protected) per send: 256 MiB */
#define DECISIONS_KEPT 256u
#define DECISION_RETENTION_S (24 * 3600)
#define UNCERTAIN_BACKOFF_MAX_MS 5000

struct migration {
	struct migration *next; /* agent->migrations, under agent->lock */
	struct agent *a;
	uint64_t id;
	bool incoming;
	struct migration_request req;
	struct agent_vm *vm; /* reference held while the job runs */
	pthread_t thread;
	bool thread_started;
	bool done; /* thread finished its work (under agent->lock) */

	pthread_mutex_t lock; /* guards info, cancel, switchover, decision */
	struct migration_info info;
	bool cancel;
	bool switchover;
	bool committed; /* source: COMMIT_REQ sent, cancel no longer possible */
	enum proto_decided decision; /* destination */

	struct xctl *ctl;          /* set once, then used by the job thread only */
	struct xport_src *src;     /* source */
	struct xport_dst *dst;     /* destination */
	uint8_t token[PROTO_TOKEN_LEN];
	uint64_t remote_id;        /* destination: the source's id */
	struct proto_hello hello;  /* destination: what the source offered */
	uint32_t refuse_code;      /* source: the destination's REFUSE/ABORT code, if any */

	/* Source: the scheduler, used by the job thread only. */
	struct sched_migration *sched;
	struct sched_policy policy;
	uint64_t precopy_start_ns;
	uint64_t last_tick_ns;
	uint64_t setup_offer_ns;   /* source set-up: until VM_ACCEPT (connect, HELLO, offer) */
	int decision_fd;           /* destination: its decision file, made during set-up; -1 */
	uint64_t setup_streams_ns; /* until the data path was open */
	uint64_t state_bytes; /* estimate of the switch-over's state transfer */
	uint64_t mem_bytes;   /* guest memory */
	double bw_Bps;        /* the latest bandwidth estimate */
	/* Under m->lock: the decisions (JSON objects), oldest first; nr_dropped past the cap. */
	char **history;
	unsigned nr_history;
	uint64_t nr_dropped;
	/* Under agent->lock: the host let it start (sched_admission). */
	bool admitted;
	/* Destination, postcopy: the fault service (set once by the job thread). */
	struct postcopy_dst *pc;
	/* Destination, postcopy over RDMA: pc pulls the pages itself (job thread only). */
	bool pc_pull;
};

#define HISTORY_MAX 2048u
#define TICK_NS 500000000ull        /* judge timeouts this often inside a long round */
#define BUSY_RETRY_MS 1000u          /* destination at its limit: ask again after this */

struct decision_rec {
	uint64_t remote_id;
	uint8_t token[PROTO_TOKEN_LEN];
	enum proto_decided decision;
};

const char *migration_state_name(enum migration_state s)
{
	static const char *const names[] = {
		[MIG_QUEUED] = "queued",
		[MIG_SETUP] = "setup",
		[MIG_PRECOPY] = "precopy",
		[MIG_SWITCHOVER] = "switchover",
		[MIG_COMMITTING] = "committing",
		[MIG_UNCERTAIN] = "uncertain",
		[MIG_COMPLETED] = "completed",
		[MIG_CANCELLED] = "cancelled",
		[MIG_FAILED] = "failed",
		[MIG_RECEIVING] = "receiving",
		[MIG_DEST_READY] = "dest_ready",
		[MIG_POSTCOPY] = "postcopy",
	};
	if ((unsigned)s < sizeof(names) / sizeof(names[0]) && names[s])
		return names[s];
	return "unknown";
}

/* Copies a string, truncating to fit (names are bounded by the protocol anyway). */
static void copy_str(char *dst, size_t n, const char *src)
{
	size_t i = 0;
	for (; i + 1 < n && src[i]; i++)
		dst[i] = src[i];
	dst[i] = '\0';
}

static bool state_final(enum migration_state s)
{
	return s == MIG_COMPLETED || s == MIG_CANCELLED || s == MIG_FAILED;
}

/* ---------------- bookkeeping ---------------- */

static bool cancelled(struct migration *m);

/*
 * Test hook for fault injection: FERRY_TEST_HOLD="STATE:MS[,STATE:MS...]" makes a job that
 * enters STATE (a migration_state_name) stay there MS milliseconds before it goes on, or
 * until it is cancelled, so tests can cancel or kill an agent in each named state. Unset
 * in production; read-only process environment.
 */
static void test_hold(struct migration *m, enum migration_state s)
{
	const char *spec = getenv("FERRY_TEST_HOLD");
	const char *name = migration_state_name(s);
	size_t nl = strlen(name);
	for (const char *p = spec; p && *p;) {
		if (strncmp(p, name, nl) == 0 && p[nl] == ':') {
			long ms = strtol(p + nl + 1, NULL, 10);
			agent_log(m->a, LOG_INFO, "migration %llu: holding in %s for %ld ms (test)",
				  (unsigned long long)m->id, name, ms);
			for (long t = 0; t < ms && !cancelled(m); t += 20)
				usleep(20000);
			return;
		}
		p = strchr(p, ',');
		p = p ? p + 1 : NULL;
	}
}

static void set_state(struct migration *m, enum migration_state s)
{
	pthread_mutex_lock(&m->lock);
	m->info.state = s;
	if (state_final(s)) {
		m->info.finished_unix_ms = agent_unix_ms();
		m->info.total_time_ms =
			(uint64_t)(m->info.finished_unix_ms - m->info.started_unix_ms);
	}
	char err[2 * sizeof(m->info.error)];
	agent_json_escape(m->info.error, err, sizeof(err));
	pthread_mutex_unlock(&m->lock);
	agent_log(m->a, s == MIG_FAILED ? LOG_WARN : LOG_INFO, "migration %llu (%s %s %s): %s%s%s",
		  (unsigned long long)m->id, m->info.vm, m->incoming ? "from" : "to", m->info.peer,
		  migration_state_name(s), err[0] ? ": " : "", err);
	agent_event(m->a, "migration.state",
		    "\"id\":%llu,\"vm\":\"%s\",\"direction\":\"%s\",\"state\":\"%s\"%s%s%s",
		    (unsigned long long)m->id, m->info.vm, m->incoming ? "incoming" : "outgoing",
		    migration_state_name(s), err[0] ? ",\"error\":\"" : "", err,
		    err[0] ? "\"" : "");
	if (!state_final(s))
		test_hold(m, s);
}

__attribute__((format(printf, 3, 4))) static int mig_fail(struct migration *m, int r,
							  const char *fmt, ...)
{
	pthread_mutex_lock(&m->lock);
	if (!m->info.error[0]) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(m->info.error, sizeof(m->info.error), fmt, ap);
		va_end(ap);
	}
	pthread_mutex_unlock(&m->lock);
	return r < 0 ? r : -EIO;
}

static bool cancelled(struct migration *m)
{
	pthread_mutex_lock(&m->lock);
	bool c = m->cancel;
	pthread_mutex_unlock(&m->lock);
	return c;
}

/*
 * The job thread publishes its control channel and data path under m->lock (the data path
 * of an incoming migration under agent->lock, where the listener looks it up), so that a
 * cancel from another thread can interrupt them; it unpublishes them under the same lock
 * before freeing them.
 */
static void set_ctl(struct migration *m, struct xctl *c)
{
	pthread_mutex_lock(&m->lock);
	m->ctl = c;
	pthread_mutex_unlock(&m->lock);
}

static void drop_ctl(struct migration *m)
{
	pthread_mutex_lock(&m->lock);
	struct xctl *c = m->ctl;
	m->ctl = NULL;
	pthread_mutex_unlock(&m->lock);
	xctl_free(c);
}

static void drop_src(struct migration *m)
{
	pthread_mutex_lock(&m->lock);
	struct xport_src *x = m->src;
	m->src = NULL;
	pthread_mutex_unlock(&m->lock);
	xport_src_free(x);
}

static void drop_dst(struct migration *m)
{
	pthread_mutex_lock(&m->a->lock);
	struct xport_dst *x = m->dst;
	m->dst = NULL;
	pthread_mutex_unlock(&m->a->lock);
	xport_dst_free(x);
}

/* Interrupts whatever the job thread blocks on; with m->lock held. */
static void interrupt_locked(struct migration *m)
{
	if (m->ctl)
		xctl_interrupt(m->ctl);
	if (m->src)
		xport_src_cancel(m->src);
}

static void release_vm_hold(struct migration *m)
{
	struct agent *a = m->a;
	if (!m->vm)
		return;
	pthread_mutex_lock(&a->lock);
	if (m->vm->migration_id == m->id) {
		m->vm->migration_id = 0;
		m->vm->incoming = false;
	}
	pthread_mutex_unlock(&a->lock);
}

static int send_msg(struct migration *m, uint16_t type, int enc_r, void *buf, size_t len)
{
	if (enc_r < 0)
		return mig_fail(m, enc_r, "encoding %s: %s", proto_type_name(type), strerror(-enc_r));
	int r = xctl_send(m->ctl, type, buf, len);
	free(buf);
	if (r < 0)
		return mig_fail(m, r, "sending %s to %s: %s", proto_type_name(type),
				xctl_peer(m->ctl), strerror(-r));
	return 0;
}

static void send_abort(struct migration *m, uint32_t code, const char *msg)
{
	struct proto_refuse ab = {.code = code};
	snprintf(ab.message, sizeof(ab.message), "%s", msg);
	void *buf = NULL;
	size_t len = 0;
	if (m->ctl && proto_encode_refuse(&ab, &buf, &len) == 0) {
		xctl_send(m->ctl, PROTO_ABORT, buf, len);
		free(buf);
	}
}

/* Receives one control message of an expected type; REFUSE/ABORT become errors. */
static int recv_msg(struct migration *m, uint16_t want, void **ret, size_t *ret_len,
		    int timeout_ms)
{
	uint16_t type = 0;
	char err[160] = "";
	int r = xctl_recv(m->ctl, &type, ret, ret_len, timeout_ms, err, sizeof(err));
	if (r == -ECANCELED)
		return mig_fail(m, r, "cancelled");
	if (r < 0)
		return mig_fail(m, r, "waiting for %s from %s: %s%s%s", proto_type_name(want),
				xctl_peer(m->ctl), r == -ECONNRESET ? "connection closed" : strerror(-r),
				err[0] ? ": " : "", err);
	if (type == PROTO_REFUSE || type == PROTO_ABORT) {
		struct proto_refuse rf;
		char derr[128];
		if (proto_decode_refuse(*ret, *ret_len, &rf, derr, sizeof(derr)) < 0) {
			rf.code = PROTO_E_INTERNAL;
			snprintf(rf.message, sizeof(rf.message), "(undecodable: %s)", derr);
		}
		m->refuse_code = rf.code;
		free(*ret);
		*ret = NULL;
		return mig_fail(m, -ECONNREFUSED, "destination %s: %s: %s",
				type == PROTO_REFUSE ? "refused" : "aborted",
				proto_code_name(rf.code), rf.message);
	}
	if (type != want) {
		free(*ret);
		*ret = NULL;
		return mig_fail(m, -EPROTO, "expected %s, got %s", proto_type_name(want),
				proto_type_name(type));
	}
	return 0;
}

/*
 * The verify digest of one memslot (docs/protocol.md): SHA-256 over, for every page that is
 * not all zero, its page number (u64 little endian) followed by its 4096 bytes. Zero pages
 * are left out, so a hole in the memfd (SEEK_HOLE) need not be read — reading one would
 * allocate it — and a mostly empty guest hashes in proportion to its data. A page that is
 * zero on one side and not on the other still changes the digest.
 */
static int slot_digest(const struct vm_slot *s, uint8_t out[PROTO_DIGEST_LEN])
{
	/*
	 * Read through the file, not the mapping: touching the mapping would give every page
	 * of a freshly received guest a page-table entry, which costs more than the hashing
	 * under nested virtualisation (docs/benchmarks.md).
	 */
	enum { CHUNK = 1u << 20 };
	EVP_MD_CTX *ctx = EVP_MD_CTX_new();
	uint8_t *buf = aligned_alloc(4096, CHUNK);
	int r = 0;
	if (!ctx || !buf || !EVP_DigestInit_ex(ctx, EVP_sha256(), NULL)) {
		EVP_MD_CTX_free(ctx);
		free(buf);
		return -ENOMEM;
	}
	off_t off = 0, size = (off_t)s->size;
	while (off < size && r == 0) {
		off_t data = lseek(s->memfd, off, SEEK_DATA), hole;
		if (data < 0 && errno == ENXIO)
			break; /* only a hole is left */
		if (data < 0) {
			data = off; /* no SEEK_DATA here: read everything */
			hole = size;
		} else {
			hole = lseek(s->memfd, data, SEEK_HOLE);
			if (hole < 0 || hole > size)
				hole = size;
		}
		data &= ~(off_t)4095;
		for (off_t p = data; p < hole && r == 0;) {
			size_t want = (size_t)(hole - p) < CHUNK ? (size_t)(hole - p) : CHUNK;
			ssize_t n = pread(s->memfd, buf, want, p);
			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0 || n % 4096) {
				r = -EIO;
				break;
			}
			for (ssize_t q = 0; q < n; q += 4096) {
				const uint8_t *page = buf + q;
				if (pagereader_page_is_zero(page))
					continue;
				uint64_t idx = htole64((uint64_t)(p + q) / 4096);
				if (!EVP_DigestUpdate(ctx, &idx, sizeof(idx)) ||
				    !EVP_DigestUpdate(ctx, page, 4096)) {
					r = -EIO;
					break;
				}
			}
			p += n;
		}
		off = hole > off ? hole : off + 4096;
	}
	unsigned int len = 0;
	if (r == 0 && !EVP_DigestFinal_ex(ctx, out, &len))
		r = -EIO;
	EVP_MD_CTX_free(ctx);
	free(buf);
	return r;
}

static int digests(struct vm *vm, uint8_t out[][PROTO_DIGEST_LEN], uint32_t *ret_n)
{
	unsigned n = vm_nr_slots(vm);
	for (unsigned i = 0; i < n; i++) {
		int r = slot_digest(vm_slot(vm, i), out[i]);
		if (r < 0)
			return r;
	}
	*ret_n = n;
	return 0;
}

/*
 * The destination hashes its memory while the source hashes its own: started once the
 * STATE's fence has passed (no page arrives after the last fence), joined at COMMIT_REQ.
 */
struct digest_job {
	pthread_t thread;
	bool started;
	struct vm *vm;
	uint64_t fence;
	int r;
	uint32_t n;
	uint8_t out[PROTO_MAX_SLOTS][PROTO_DIGEST_LEN];
};

static void *digest_thread(void *arg)
{
	struct digest_job *d = arg;
	d->r = digests(d->vm, d->out, &d->n);
	return NULL;
}

static void digest_start(struct digest_job *d, struct vm *vm, uint64_t fence)
{
	d->vm = vm;
	d->fence = fence;
	d->started = pthread_create(&d->thread, NULL, digest_thread, d) == 0;
	if (d->started)
		pthread_setname_np(d->thread, "digest");
}

/* Joins the worker; returns its result, or hashes now if it never ran for this fence. */
static int digest_finish(struct digest_job *d, struct vm *vm, uint64_t fence)
{
	if (d->started) {
		pthread_join(d->thread, NULL);
		d->started = false;
		if (d->fence == fence)
			return d->r;
	}
	return digests(vm, d->out, &d->n);
}

/* ---------------- source ---------------- */

struct runs {
	struct page_run *v;
	size_t n, cap;
	uint64_t pages;
};

static int runs_add_batch(struct runs *rs, const struct tracker_batch *b, unsigned max_run)
{
	if (rs->cap - rs->n < b->npages) {
		size_t cap = rs->cap ? rs->cap : 4096;
		while (cap - rs->n < b->npages)
			cap *= 2;
		struct page_run *nv = realloc(rs->v, cap * sizeof(*nv));
		if (!nv)
			return -ENOMEM;
		rs->v = nv;
		rs->cap = cap;
	}
	rs->n += pagereader_runs_from_bitmap(b->slot_index, b->first_page, b->bits, b->npages,
					     max_run, rs->v + rs->n, (unsigned)(rs->cap - rs->n));
	rs->pages += b->dirty;
	return 0;
}

/*
 * A data extent of one slot's file, as lseek last said: [data, hole) holds data. Data stays
 * data (nothing punches a running VM's memfd), so a pass (batches in increasing order) may
 * reuse it; a hole may not be trusted past the batch it was seen in — the guest may write
 * it any time, and a batch is only sound against what the file says after its take.
 * SEEK_HOLE walks the file's pages up to the next hole, so asking it once per extent
 * rather than once per batch keeps a large data extent from costing its length per batch.
 */
struct hole_cursor {
	uint32_t slot;
	bool valid;
	off_t data, hole;
};

/* Clears batch bits [from, to) (byte offsets in the slot, page aligned), a word at a time. */
static void drop_range(struct tracker_batch *b, off_t from, off_t to)
{
	uint64_t i = (uint64_t)(from / 4096) - b->first_page, end = (uint64_t)(to / 4096) - b->first_page;
	while (i < end) {
		unsigned bit = i % 64;
		uint64_t n = end - i < 64 - bit ? end - i : 64 - bit;
		uint64_t mask = (n == 64 ? ~0ull : ((1ull << n) - 1)) << bit;
		b->dirty -= (uint32_t)__builtin_popcountll(b->bits[i / 64] & mask);
		b->bits[i / 64] &= ~mask;
		i += n;
	}
}

/*
 * Drops from a batch the pages that are holes in the slot's memfd: never written since the
 * VM was created (nothing turns a written page of a running VM's memfd back into a hole),
 * so zero here, never sent as data, and a hole — zero — in the destination's fresh memory
 * too. Sound on a batch just taken from the tracker: its pages are re-protected, so a
 * write from now on shows in the next harvest. Used where most of the set may be holes:
 * round 1 (every page starts dirty) and the list of pages a postcopy must still move.
 * Saves reading — and naming — the untouched part of a large guest. Where SEEK_DATA is
 * not supported nothing is dropped.
 */
static void drop_holes(const struct vm_slot *s, struct tracker_batch *b, struct hole_cursor *hc)
{
	off_t off = (off_t)b->first_page * 4096, end = off + (off_t)b->npages * 4096;
	if (hc->valid && hc->slot != b->slot_index)
		hc->valid = false;
	while (off < end) {
		if (hc->valid && off >= hc->data && off < hc->hole) {
			off = hc->hole; /* data: keep */
			continue;
		}
		/* Asked now, after the take: a hole seen here is one for this batch. */
		off_t data = lseek(s->memfd, off, SEEK_DATA);
		if (data < 0 && errno != ENXIO)
			return; /* unknown: keep the rest */
		if (data < 0 || data >= end) {
			drop_range(b, off, end); /* a hole to the end of the batch */
			return;
		}
		drop_range(b, off, data & ~(off_t)4095);
		off_t hole = lseek(s->memfd, data, SEEK_HOLE);
		if (hole < 0)
			return;
		hole = (hole + 4095) & ~(off_t)4095; /* a page partly data is data */
		*hc = (struct hole_cursor){
		    .slot = b->slot_index, .valid = true, .data = data & ~(off_t)4095, .hole = hole};
		off = hole;
	}
}

static int sched_tick(struct migration *m, uint64_t remaining_pages);

/* The record's downtime: from pause_ns (agent_mono_ns) to now (m->lock held). */
static void set_downtime_locked(struct migration *m, uint64_t pause_ns)
{
	m->info.downtime_us = (agent_mono_ns() - pause_ns) / 1000ull;
	m->info.downtime_ms = m->info.downtime_us / 1000;
}

/* The record's byte and page counts from the transport (m->lock held). */
static void sent_locked(struct migration *m)
{
	struct xport_src_stats st;
	xport_src_stats(m->src, &st);
	m->info.bytes_sent = st.bytes;
	m->info.bytes_uncompressed = st.raw_bytes;
	m->info.pages_normal = st.pages;
	m->info.pages_zero = st.zero_pages;
}

/* The record's byte and page counts, and what is left to send. */
static void publish_sent(struct migration *m, uint64_t remaining_bytes)
{
	pthread_mutex_lock(&m->lock);
	sent_locked(m);
	m->info.remaining_bytes = remaining_bytes;
	pthread_mutex_unlock(&m->lock);
}

/*
 * Takes every dirty chunk and sends it, TAKE_GROUP_CHUNKS at a time, so each chunk is
 * re-protected just before it is read (DESIGN.md rule 1). Returns pages sent. With
 * skip_holes (round 1) pages that are memfd holes are taken but not sent (drop_holes).
 * paused: the switch-over's pass; the VM is paused and tracking ends before it could run
 * again, so nothing is re-protected (tracker_take_next_paused).
 */
static int send_dirty(struct migration *m, struct tracker *t, bool skip_holes, bool paused,
		      uint64_t *fence, uint64_t *ret_pages)
{
	struct tracker_cursor cur = {0};
	struct hole_cursor hc = {0};
	struct tracker_batch *b = malloc(sizeof(*b));
	struct runs rs = {0};
	unsigned max_run = m->a->cfg.migration.batch_pages;
	int r = 0;

	if (max_run > PAGEREADER_MAX_BATCH_PAGES)
		max_run = PAGEREADER_MAX_BATCH_PAGES;
	if (!b)
		return -ENOMEM;
	*ret_pages = 0;
	/* Counted once; progress below subtracts what was sent (new dirt shows next round). */
	uint64_t to_send = tracker_dirty_pages(t);
	for (bool more = true; more && r == 0;) {
		rs.n = 0;
		rs.pages = 0;
		for (unsigned g = 0; g < TAKE_GROUP_CHUNKS; g++) {
			r = paused ? tracker_take_next_paused(t, &cur, b)
				   : tracker_take_next(t, &cur, b);
			if (r <= 0) {
				more = false;
				break;
			}
			if (skip_holes && b->slot_index < vm_nr_slots(m->vm->vm)) {
				uint32_t before = b->dirty;
				drop_holes(vm_slot(m->vm->vm, b->slot_index), b, &hc);
				if (to_send >= before - b->dirty)
					to_send -= before - b->dirty;
			}
			r = runs_add_batch(&rs, b, max_run);
			if (r < 0)
				break;
		}
		if (r < 0)
			break;
		r = 0;
		if (rs.n == 0)
			continue;
		if (cancelled(m)) {
			r = -ECANCELED;
			break;
		}
		r = xport_src_send(m->src, rs.v, (unsigned)rs.n, ++*fence);
		if (r < 0)
			break;
		*ret_pages += rs.pages;
		r = sched_tick(m, to_send > *ret_pages ? to_send - *ret_pages : 0);
		if (r != 0)
			more = false; /* 1: switch over now (the rest goes then); < 0: give up */
		/* Live progress within a long round (the first one sends all of memory). */
		publish_sent(m, (to_send > *ret_pages ? to_send - *ret_pages : 0) * 4096ull);
	}
	free(rs.v);
	free(b);
	return r;
}


static void update_stats(struct migration *m, uint32_t round, uint64_t remaining_pages,
			 double dirty_pps, double bw_Bps)
{
	pthread_mutex_lock(&m->lock);
	m->info.round = round;
	sent_locked(m);
	m->info.remaining_bytes = remaining_pages * 4096ull;
	m->info.dirty_rate_pps = dirty_pps;
	m->info.bandwidth_bps = bw_Bps * 8.0;
	m->info.expected_downtime_ms =
		bw_Bps > 0 ? (double)m->info.remaining_bytes / bw_Bps * 1000.0 + STATE_TIME_MS
			   : 0;
	pthread_mutex_unlock(&m->lock);
}

/* The page readers' configuration (one per stream) from migration.*. */
static void reader_config(const struct agent *a, struct pagereader_config *ret)
{
	const struct ferry_config_migration *c = &a->cfg.migration;
	*ret = (struct pagereader_config){
		.queue_depth = c->queue_depth,
		.batch_pages = c->batch_pages > PAGEREADER_MAX_BATCH_PAGES ? PAGEREADER_MAX_BATCH_PAGES
									 : c->batch_pages,
	};
}

static void *warm_thread(void *arg)
{
	struct agent *a = arg;
	struct pagereader_config rc;
	reader_config(a, &rc);
	unsigned n = a->cfg.migration.streams < 64 ? a->cfg.migration.streams : 64;
	int64_t t0 = agent_mono_ns();
	int r = pagereader_pool_fill(&rc, n);
	if (r < 0)
		agent_log(a, LOG_WARN, "migration.warm_buffers: no page-reader buffers made ready: "
			  "%s; migrations make their own", strerror(-r));
	else
		agent_log(a, LOG_INFO, "migration.warm_buffers: %d page-reader buffer areas ready "
			  "(%zu MiB) in %.0f ms", r, pagereader_pool_bytes() >> 20,
			  (agent_mono_ns() - t0) / 1e6);
	return NULL;
}

void migration_warm_buffers(struct agent *a)
{
	if (!a->cfg.migration.warm_buffers || a->warm_started)
		return;
	if (pthread_create(&a->warm, NULL, warm_thread, a) == 0) {
		pthread_setname_np(a->warm, "bufwarm");
		a->warm_started = true;
	}
}

/*
 * Whether to offer compressed pages (PROTO_CAP_ZSTD): the request's compress, else
 * migration.compress; auto = only when this migration's bandwidth is capped (its own cap,
 * merged with migration.bandwidth at creation, or a policy.link_capacity share), since on
 * an uncapped link the CPU is the bottleneck of a small host. why says which.
 */
static bool compress_wanted(const struct migration *m, char *why, size_t len)
{
	const struct ferry_config *c = &m->a->cfg;
	int mode = m->req.compress >= 0 ? m->req.compress : (int)c->migration.compress;
	const char *by = m->req.compress >= 0 ? "requested" : "migration.compress";

	if (mode == FERRY_CONFIG_COMPRESS_OFF) {
		snprintf(why, len, "compress off (%s)", by);
		return false;
	}
	if (mode == FERRY_CONFIG_COMPRESS_ON) {
		snprintf(why, len, "compress on (%s)", by);
		return true;
	}
	if (m->req.bandwidth) {
		snprintf(why, len, "compress auto: bandwidth capped at %llu bytes/s",
			 (unsigned long long)m->req.bandwidth);
		return true;
	}
	if (c->policy.link_capacity) {
		snprintf(why, len, "compress auto: policy.link_capacity %llu bytes/s is shared",
			 (unsigned long long)c->policy.link_capacity);
		return true;
	}
	snprintf(why, len, "compress auto: no bandwidth cap (the CPU, not the link, limits)");
	return false;
}

/* Connects and runs HELLO / VM_OFFER; fills the data path. */
static int source_setup(struct migration *m, struct vm *vm)
{
	struct agent *a = m->a;
	char err[256] = "";
	void *buf = NULL;
	size_t len = 0;
	int r;

	struct xctl *c = NULL;
	r = xctl_connect(m->req.dest, CTL_TIMEOUT_MS, &c, err, sizeof(err));
	if (r < 0)
		return mig_fail(m, r, "cannot reach destination %s: %s", m->req.dest, err);
	set_ctl(m, c);
	if (cancelled(m))
		return mig_fail(m, -ECANCELED, "cancelled");

	/* Offer RDMA when allowed and this end of the control connection is on a device. */
	char local_ip[64] = "", peer_ip[64] = "", why[160] = "";
	bool offer_rdma = false;
	enum migration_transport want = m->req.transport;
	if (want == MIG_TRANSPORT_AUTO && a->cfg.migration.transport == FERRY_CONFIG_TRANSPORT_TCP)
		want = MIG_TRANSPORT_TCP;
	if (want == MIG_TRANSPORT_AUTO && a->cfg.migration.transport == FERRY_CONFIG_TRANSPORT_RDMA)
		want = MIG_TRANSPORT_RDMA;
	if (want == MIG_TRANSPORT_TCP) {
		snprintf(why, sizeof(why), "tcp requested");
	} else if (xctl_addrs(m->ctl, local_ip, peer_ip, sizeof(local_ip)) < 0) {
		snprintf(why, sizeof(why), "addresses of the control connection unknown");
	} else if (!xport_rdma_usable(local_ip, why, sizeof(why))) {
		/* why says what is missing */
	} else {
		offer_rdma = true;
	}
	if (want == MIG_TRANSPORT_RDMA && !offer_rdma)
		return mig_fail(m, -EOPNOTSUPP, "transport rdma: this agent cannot: %s", why);

	char zwhy[128] = "";
	bool offer_zstd = compress_wanted(m, zwhy, sizeof(zwhy));
	struct proto_hello h = {
		.min_version = PROTO_MIN_VERSION, /* a v1 destination answers in v1 */
		.max_version = PROTO_VERSION,
		.migration_id = m->id,
		.caps = PROTO_CAP_TCP | (offer_rdma ? PROTO_CAP_RDMA : 0) |
			(m->info.verify ? PROTO_CAP_VERIFY : 0) |
			(offer_zstd ? PROTO_CAP_ZSTD : 0),
		.page_size = 4096,
		.streams = m->req.streams,
	};
	snprintf(h.agent, sizeof(h.agent), "%s", a->cfg.name);
	r = proto_encode_hello(&h, &buf, &len);
	if ((r = send_msg(m, PROTO_HELLO, r, buf, len)) < 0)
		return r;
	if ((r = recv_msg(m, PROTO_WELCOME, &buf, &len, CTL_TIMEOUT_MS)) < 0)
		return r;
	struct proto_welcome w;
	r = proto_decode_welcome(buf, len, &w, err, sizeof(err));
	free(buf);
	if (r < 0)
		return mig_fail(m, r, "bad WELCOME: %s", err);
	if ((w.caps & PROTO_CAP_ZSTD) && !offer_zstd)
		return mig_fail(m, -EPROTO, "bad WELCOME: ZSTD chosen but not offered");
	memcpy(m->token, w.token, sizeof(m->token));

	struct proto_vm_offer o = {
		.mem_size = vm_config(vm)->mem_size,
		.vcpus = vm_config(vm)->vcpus,
		.irqchip = vm_config(vm)->irqchip,
		.nr_slots = vm_nr_slots(vm),
	};
	snprintf(o.name, sizeof(o.name), "%s", m->vm->spec.name);
	copy_str(o.guest, sizeof(o.guest), m->vm->spec.guest);
	for (unsigned i = 0; i < o.nr_slots; i++) {
		o.slots[i].gpa = vm_slot(vm, i)->gpa;
		o.slots[i].size = vm_slot(vm, i)->size;
	}
	r = proto_encode_vm_offer(&o, &buf, &len);
	if ((r = send_msg(m, PROTO_VM_OFFER, r, buf, len)) < 0)
		return r;
	if ((r = recv_msg(m, PROTO_VM_ACCEPT, &buf, &len, OFFER_TIMEOUT_MS)) < 0)
		return r;
	struct proto_vm_accept acc;
	r = proto_decode_vm_accept(buf, len, &acc, err, sizeof(err));
	free(buf);
	if (r < 0)
		return mig_fail(m, r, "bad VM_ACCEPT: %s", err);
	bool use_rdma = offer_rdma && (w.caps & PROTO_CAP_RDMA) && acc.rdma_port;
	if (offer_rdma && !use_rdma)
		snprintf(why, sizeof(why), "the destination did not offer RDMA");
	if (want == MIG_TRANSPORT_RDMA && !use_rdma)
		return mig_fail(m, -EOPNOTSUPP, "transport rdma: %s", why);
	bool use_zstd = offer_zstd && !use_rdma && (w.caps & PROTO_CAP_ZSTD);
	if (offer_zstd && use_rdma)
		snprintf(zwhy, sizeof(zwhy), "RDMA writes pages straight into guest memory");
	else if (offer_zstd && !use_zstd)
		snprintf(zwhy, sizeof(zwhy), "the destination speaks protocol %u without ZSTD",
			 w.version);
	if (cancelled(m))
		return mig_fail(m, -ECANCELED, "cancelled");

	m->setup_offer_ns = agent_mono_ns();
	int fds[PROTO_MAX_SLOTS];
	uint64_t sizes[PROTO_MAX_SLOTS];
	for (unsigned i = 0; i < o.nr_slots; i++) {
		fds[i] = vm_slot(vm, i)->memfd;
		sizes[i] = vm_slot(vm, i)->size;
	}
	struct xport_src_config xc = {
		.streams = m->req.streams,
		.bandwidth = m->req.bandwidth,
		.compress = use_zstd,
		.compress_level = (int)a->cfg.migration.compress_level,
	};
	reader_config(a, &xc.reader);
	struct xport_src *src = NULL;
	if (use_rdma) {
		r = xport_src_rdma_new(&xc, peer_ip, acc.rdma_port, m->token, fds, sizes,
				       o.nr_slots, &src, err, sizeof(err));
		if (r < 0)
			return mig_fail(m, r, "opening RDMA queue pairs to %s port %u: %s", peer_ip,
					acc.rdma_port, err);
		snprintf(why, sizeof(why), "both agents have a usable RDMA device (%.46s -> %.46s)",
			 local_ip, peer_ip);
	} else {
		r = xport_src_tcp_new(&xc, m->req.dest, m->token, fds, sizes, o.nr_slots, &src,
				      err, sizeof(err));
		if (r < 0)
			return mig_fail(m, r, "opening data streams to %s: %s", m->req.dest, err);
	}
	m->setup_streams_ns = agent_mono_ns();
	pthread_mutex_lock(&m->lock);
	m->src = src;
	if (m->cancel)
		xport_src_cancel(src);
	snprintf(m->info.transport, sizeof(m->info.transport), "%s", xport_src_name(m->src));
	snprintf(m->info.transport_reason, sizeof(m->info.transport_reason), "%.127s", why);
	snprintf(m->info.compression, sizeof(m->info.compression), "%s",
		 use_zstd ? "zstd" : "none");
	snprintf(m->info.compression_reason, sizeof(m->info.compression_reason), "%.127s", zwhy);
	pthread_mutex_unlock(&m->lock);
	return 0;
}

/* ---------------- the scheduler's glue (source) ---------------- */

/* The policy of this migration: the agent's policy.* with the request's overrides. */
static void policy_for(const struct migration *m, struct sched_policy *p)
{
	const struct ferry_config_policy *c = &m->a->cfg.policy;
	const struct migration_request *q = &m->req;
	sched_policy_default(p);
	p->downtime_ms = q->downtime_ms;
	p->downtime_steps = c->downtime_steps;
	p->downtime_delay_s_per_gib = c->downtime_step_delay_per_gib;
	p->completion_timeout_s_per_gib = q->completion_timeout_per_gib >= 0
						  ? (uint32_t)q->completion_timeout_per_gib
						  : c->completion_timeout_per_gib;
	p->progress_timeout_s =
		q->progress_timeout >= 0 ? (uint32_t)q->progress_timeout : c->progress_timeout;
	int act = q->timeout_action >= 0 ? q->timeout_action : (int)c->timeout_action;
	p->timeout_action = act == FERRY_CONFIG_TIMEOUT_SWITCHOVER ? SCHED_TIMEOUT_SWITCHOVER
			    : act == FERRY_CONFIG_TIMEOUT_POSTCOPY ? SCHED_TIMEOUT_POSTCOPY
								   : SCHED_TIMEOUT_ABORT;
	p->allow_postcopy = q->allow_postcopy >= 0 ? q->allow_postcopy != 0 : c->allow_postcopy;
	if (q->postcopy_after_rounds >= -1)
		p->postcopy_after_rounds = q->postcopy_after_rounds;
	else if (c->postcopy_start == FERRY_CONFIG_POSTCOPY_EARLY)
		p->postcopy_after_rounds = (int32_t)c->postcopy_precopy_rounds;
	else
		p->postcopy_after_rounds = -1;
	p->throttle = c->throttle;
	/*
	 * The VMM throttles by holding vCPUs back for a share of the time, up to 99 %, and the
	 * dirty rates it is given undercount a guest that rewrites its working set within a
	 * round (a page counts once per harvest): allow deeper levels and a lower floor than
	 * the library's defaults, so repeated stalls keep tightening until remaining shrinks.
	 */
	p->throttle_max_level = 7;
	p->throttle_floor_pps = 16;
}

/* A vCPU's share of time held back for the scheduler's slowed_pct, 0..VM_THROTTLE_MAX_PCT. */
static unsigned held_pct(double slowed_pct)
{
	return slowed_pct <= 0			      ? 0
	       : slowed_pct >= VM_THROTTLE_MAX_PCT ? VM_THROTTLE_MAX_PCT
						      : (unsigned)lround(slowed_pct);
}

/* Keeps the decision in the history and shows it in the record. */
static void history_add(struct migration *m, const struct sched_round_record *rec)
{
	enum { JSON_MAX = 64 * 1024 };
	char *json = malloc(JSON_MAX);
	int n = json ? sched_record_json(rec, json, JSON_MAX) : -ENOMEM;
	if (n < 0) {
		free(json);
		json = NULL;
	} else {
		char *fit = realloc(json, (size_t)n + 1); /* keep what the record needs */
		if (fit)
			json = fit;
	}
	pthread_mutex_lock(&m->lock);
	if (json && m->nr_history < HISTORY_MAX) {
		char **h = realloc(m->history, (m->nr_history + 1) * sizeof(*h));
		if (h) {
			m->history = h;
			m->history[m->nr_history++] = json;
			json = NULL;
		}
	}
	if (json || n < 0)
		m->nr_dropped++;
	snprintf(m->info.decision, sizeof(m->info.decision), "%s", sched_action_name(rec->action));
	snprintf(m->info.decision_reason, sizeof(m->info.decision_reason), "%s", rec->why);
	m->info.throttle_level = rec->throttle_level;
	unsigned nv = rec->nr_vcpus < 64 ? rec->nr_vcpus : 64;
	m->info.nr_vcpus = nv;
	for (unsigned i = 0; i < nv; i++)
		m->info.vcpu_throttle_pct[i] =
			(uint8_t)(rec->action == SCHED_THROTTLE ? held_pct(rec->vcpu[i].slowed_pct)
								: 0);
	if (rec->expected_downtime_ms >= 0)
		m->info.expected_downtime_ms = rec->expected_downtime_ms;
	m->info.downtime_target_ms = (uint32_t)lround(rec->downtime_target_ms);
	pthread_mutex_unlock(&m->lock);
	free(json);
}

/*
 * THROTTLE: each vCPU runs only limit/demand of the time (the VMM holds the rest back);
 * anything else lifts every throttle.
 */
static void apply_throttle(struct vm *vm, const struct sched_round_record *rec)
{
	if (rec->action != SCHED_THROTTLE) {
		vm_clear_throttle(vm);
		return;
	}
	for (unsigned i = 0; i < rec->nr_vcpus && i < vm_config(vm)->vcpus; i++)
		vm_vcpu_set_throttle(vm, i, held_pct(rec->vcpu[i].slowed_pct));
}

/*
 * What every decision is based on, round or tick: the caller sets what only it knows
 * (tick, per-vCPU rates, the measured dirty rate).
 */
static void measure(const struct migration *m, uint64_t now, uint32_t round,
		    uint64_t remaining_bytes, uint64_t bytes_sent, struct sched_measure *ret)
{
	*ret = (struct sched_measure){
		.now_ns = now,
		.elapsed_ns = now - m->precopy_start_ns,
		.round = round,
		.remaining_bytes = remaining_bytes,
		.bytes_sent = bytes_sent,
		.mem_bytes = m->mem_bytes,
		.state_bytes = m->state_bytes,
		.bandwidth_Bps = m->bw_Bps,
		.dirty_pps = m->info.dirty_rate_pps,
		.nr_vcpus = vm_config(m->vm->vm)->vcpus,
	};
}

static uint64_t vm_mem_bytes(struct vm *vm)
{
	uint64_t b = 0;
	for (unsigned i = 0; i < vm_nr_slots(vm); i++)
		b += vm_slot(vm, i)->size;
	return b;
}

/*
 * A timer tick inside a long round: only the completion timeout is judged here (the
 * scheduler ignores the rest on ticks). Returns 1 to end the round and switch over, < 0 to
 * give up (the error is set), 0 to go on.
 */
static int sched_tick(struct migration *m, uint64_t remaining_pages)
{
	uint64_t now = agent_mono_ns();
	if (!m->sched || now - m->last_tick_ns < TICK_NS)
		return 0;
	m->last_tick_ns = now;
	struct xport_src_stats st;
	xport_src_stats(m->src, &st);
	struct vm *vm = m->vm->vm;
	struct sched_measure in;
	measure(m, now, m->info.round, remaining_pages * 4096ull, st.bytes, &in);
	in.tick = true;
	struct sched_round_record *rec = malloc(sizeof(*rec));
	if (!rec)
		return 0;
	sched_migration_decide(m->sched, &in, rec);
	int r = 0;
	if (rec->action == SCHED_SWITCHOVER || rec->action == SCHED_ABORT ||
	    rec->action == SCHED_POSTCOPY) {
		history_add(m, rec);
		apply_throttle(vm, rec);
		if (rec->action == SCHED_SWITCHOVER)
			r = 1;
		else if (rec->action == SCHED_POSTCOPY)
			r = 2;
		else
			r = mig_fail(m, -ETIMEDOUT, "aborted by policy: %s", rec->why);
	}
	free(rec);
	return r;
}

/* Precopy rounds until the scheduler (or a request) says switch over. */
static int source_precopy(struct migration *m, struct tracker *t, uint64_t *fence)
{
	struct vm *vm = m->vm->vm;
	unsigned nr_vcpus = vm_config(vm)->vcpus;
	struct sched_bw bw;
	struct sched_rate dirty;
	struct sched_dirty *vdirty = NULL;
	double *vpps = calloc(nr_vcpus, sizeof(double));
	uint64_t *counts = calloc(nr_vcpus, sizeof(uint64_t));
	struct sched_round_record *rec = malloc(sizeof(*rec));
	uint64_t harvested_total = 0;
	bool per_vcpu = tracker_backend(t) == TRACKER_RING;
	int r = 0;

	if (!vpps || !counts || !rec) {
		r = mig_fail(m, -ENOMEM, "out of memory");
		goto out;
	}
	policy_for(m, &m->policy);
	char perr[160];
	r = sched_migration_new(&m->policy, nr_vcpus, &m->sched);
	if (r < 0) {
		sched_policy_check(&m->policy, perr, sizeof(perr));
		r = mig_fail(m, r, "migration policy: %s", perr);
		goto out;
	}
	if (per_vcpu && sched_dirty_new(nr_vcpus, 3000000000ull, &vdirty) < 0)
		per_vcpu = false;
	m->mem_bytes = vm_mem_bytes(vm);
	/* vCPU state is a few KiB each, plus the VM's; generous, it is a forecast. */
	m->state_bytes = 64 * 1024ull * nr_vcpus + 64 * 1024ull;
	sched_bw_init(&bw, 10000000000ull);
	sched_rate_init(&dirty, 3000000000ull);
	set_state(m, MIG_PRECOPY);
	m->precopy_start_ns = m->last_tick_ns = agent_mono_ns();
	/*
	 * One harvest per round, at its end: tracker_start(mark_all) filled the set for round
	 * 1, and each round's closing harvest is both the measure of what remains and the
	 * work of the next round.
	 */
	sched_rate_add(&dirty, agent_mono_ns(), 0);
	if (per_vcpu) {
		for (unsigned i = 0; i < nr_vcpus; i++)
			counts[i] = tracker_vcpu_dirty_count(t, i);
		sched_dirty_add(vdirty, agent_mono_ns(), counts, nr_vcpus);
	}
	if (m->policy.postcopy_after_rounds == 0) {
		/* Postcopy with no precopy round: the decision before round 1, on the record. */
		struct sched_measure in;
		measure(m, agent_mono_ns(), 0, tracker_dirty_pages(t) * 4096ull, 0, &in);
		sched_migration_decide(m->sched, &in, rec);
		history_add(m, rec);
		if (rec->action == SCHED_POSTCOPY) {
			r = 2;
			goto out;
		}
	}
	for (uint32_t round = 1;; round++) {
		struct tracker_sync_stats ss;
		pthread_mutex_lock(&m->lock);
		m->info.round = round;
		pthread_mutex_unlock(&m->lock);
		uint64_t t0 = agent_mono_ns();
		struct xport_src_stats before, after;
		xport_src_stats(m->src, &before);
		uint64_t pages = 0;
		r = send_dirty(m, t, round == 1, false, fence, &pages);
		if (r < 0) {
			if (r == -ECANCELED)
				r = mig_fail(m, r, "cancelled");
			else if (!m->info.error[0])
				r = mig_fail(m, r, "sending round %u: %s", round, strerror(-r));
			goto out;
		}
		int tick_switch = r; /* 1: switch over, 2: postcopy (a tick decided) */
		/* Until the peer has it: socket buffers would otherwise pass for bandwidth. */
		xport_src_drain(m->src, FENCE_TIMEOUT_MS);
		xport_src_stats(m->src, &after);
		uint64_t now = agent_mono_ns();
		/*
		 * Raw bytes (what the wire would carry uncompressed): the rate at which page
		 * data moves, the same unit as remaining_bytes, so compression counts as speed.
		 */
		if (after.raw_bytes > before.raw_bytes && now > t0)
			sched_bw_add(&bw, now, after.raw_bytes - before.raw_bytes, now - t0);
		m->bw_Bps = sched_bw_bytes_per_sec(&bw);
		/* What is dirty now is what the next round (or the switch-over) must send. */
		r = tracker_sync(t, &ss);
		if (r < 0) {
			r = mig_fail(m, r, "harvesting dirty pages: %s", strerror(-r));
			goto out;
		}
		now = agent_mono_ns();
		harvested_total += ss.harvested;
		sched_rate_add(&dirty, now, harvested_total);
		if (per_vcpu) {
			for (unsigned i = 0; i < nr_vcpus; i++)
				counts[i] = tracker_vcpu_dirty_count(t, i);
			sched_dirty_add(vdirty, now, counts, nr_vcpus);
			sched_dirty_rates(vdirty, vpps, nr_vcpus);
		}
		uint64_t remaining = tracker_dirty_pages(t);
		update_stats(m, round, remaining, sched_rate_per_sec(&dirty), m->bw_Bps);

		struct proto_round_end re = {.round = round, .fence = *fence, .pages = pages,
					     .remaining = remaining};
		void *buf = NULL;
		size_t len = 0;
		r = proto_encode_round_end(&re, &buf, &len);
		if ((r = send_msg(m, PROTO_ROUND_END, r, buf, len)) < 0)
			goto out;
		if (tick_switch) {
			r = tick_switch == 2 ? 2 : 0; /* the completion timeout chose */
			goto out;
		}

		struct sched_measure in;
		measure(m, now, round, remaining * 4096ull, after.bytes, &in);
		in.dirty_pps = sched_rate_per_sec(&dirty);
		in.vcpu_dirty_pps = per_vcpu ? vpps : NULL;
		sched_migration_decide(m->sched, &in, rec);
		history_add(m, rec);
		apply_throttle(vm, rec);

		pthread_mutex_lock(&m->lock);
		bool now_req = m->switchover || m->cancel;
		pthread_mutex_unlock(&m->lock);
		if (cancelled(m)) {
			r = mig_fail(m, -ECANCELED, "cancelled");
			goto out;
		}
		if (now_req || rec->action == SCHED_SWITCHOVER) {
			r = 0;
			goto out;
		}
		if (rec->action == SCHED_ABORT) {
			r = mig_fail(m, -ETIMEDOUT, "aborted by policy: %s", rec->why);
			goto out;
		}
		if (rec->action == SCHED_POSTCOPY) {
			r = 2; /* the caller switches over into postcopy */
			goto out;
		}
	}
out:
	vm_clear_throttle(vm);
	/* No more ticks: the switch-over's sends must not be judged. */
	sched_migration_free(m->sched);
	m->sched = NULL;
	sched_dirty_free(vdirty);
	free(vpps);
	free(counts);
	free(rec);
	return r;
}

/* After COMMIT_REQ: wait for the destination's word, reconnecting if the line drops. */
static int source_await_decision(struct migration *m)
{
	void *buf = NULL;
	size_t len = 0;
	int r = recv_msg(m, PROTO_COMMITTED, &buf, &len, FENCE_TIMEOUT_MS);
	if (r == 0) {
		free(buf);
		return PROTO_DECIDED_RUN;
	}
	if (r == -ECONNREFUSED) /* ABORT: the destination discarded */
		return PROTO_DECIDED_NOT_RUN;

	/* Lost the line: we cannot know; stay paused and ask. */
	set_state(m, MIG_UNCERTAIN);
	agent_log(m->a, LOG_WARN, "migration %llu: lost destination while committing; VM %s "
		  "stays paused until %s says what it decided",
		  (unsigned long long)m->id, m->info.vm, m->req.dest);
	unsigned backoff = 200;
	for (;;) {
		drop_ctl(m);
		char err[256];
		struct xctl *c = NULL;
		r = xctl_connect(m->req.dest, 5000, &c, err, sizeof(err));
		if (r == 0) {
			set_ctl(m, c);
			struct proto_decision_req dq = {.migration_id = m->id};
			memcpy(dq.token, m->token, sizeof(dq.token));
			r = proto_encode_decision_req(&dq, &buf, &len);
			if (r == 0)
				r = xctl_send(m->ctl, PROTO_DECISION_REQ, buf, len);
			free(buf);
			buf = NULL;
			uint16_t type = 0;
			if (r == 0)
				r = xctl_recv(m->ctl, &type, &buf, &len, 10000, err, sizeof(err));
			if (r == 0 && type == PROTO_DECISION) {
				struct proto_decision d;
				r = proto_decode_decision(buf, len, &d, err, sizeof(err));
				free(buf);
				if (r == 0 && d.migration_id == m->id)
					return (int)d.decision == PROTO_DECIDED_RUN
						       ? PROTO_DECIDED_RUN
						       : PROTO_DECIDED_NOT_RUN;
			} else if (r == 0) {
				free(buf);
			}
		}
		pthread_mutex_lock(&m->a->lock);
		bool stop = m->a->shutting_down;
		pthread_mutex_unlock(&m->a->lock);
		if (stop)
			return -ESHUTDOWN; /* keep paused: exiting is safe, resuming is not */
		usleep(backoff * 1000u);
		backoff = backoff * 2 > UNCERTAIN_BACKOFF_MAX_MS ? UNCERTAIN_BACKOFF_MAX_MS
								 : backoff * 2;
	}
}

static int source_switchover(struct migration *m, struct vm *vm, struct tracker *t,
			     uint64_t *fence, uint64_t *ret_pause_ns)
{
	struct vm_error verr = {{0}};
	void *buf = NULL, *blob = NULL;
	size_t len = 0, blob_len = 0;
	uint64_t pages = 0;
	int r;

	set_state(m, MIG_SWITCHOVER);
	pthread_mutex_lock(&m->vm->op_lock);
	*ret_pause_ns = agent_mono_ns();
	vm_pause(vm); /* kicks every vCPU out of KVM_RUN: rings hold everything now */
	pthread_mutex_unlock(&m->vm->op_lock);
	r = tracker_sync(t, NULL);
	if (r < 0)
		return mig_fail(m, r, "final harvest: %s", strerror(-r));
	r = send_dirty(m, t, false, true, fence, &pages); /* paused; never resumes tracked */
	if (r < 0)
		return mig_fail(m, r, "sending the last pages: %s", strerror(-r));
	r = vm_state_save(vm, &blob, &blob_len, &verr);
	if (r < 0)
		return mig_fail(m, r, "saving vCPU state: %s", verr.msg);
	struct proto_state st = {.fence = *fence, .blob = blob, .blob_len = (uint32_t)blob_len};
	r = proto_encode_state(&st, &buf, &len);
	free(blob);
	if ((r = send_msg(m, PROTO_STATE, r, buf, len)) < 0)
		return r;

	struct proto_commit_req *cr = calloc(1, sizeof(*cr));
	if (!cr)
		return mig_fail(m, -ENOMEM, "out of memory");
	cr->fence = *fence;
	if (m->info.verify && digests(vm, cr->digests, &cr->nr_digests) < 0) {
		free(cr);
		return mig_fail(m, -EIO, "computing memory digests failed");
	}
	update_stats(m, m->info.round + 1, 0, m->info.dirty_rate_pps,
		     m->info.bandwidth_bps / 8.0);
	/* Last moment to back out: after COMMIT_REQ the destination decides. */
	pthread_mutex_lock(&m->lock);
	bool c = m->cancel;
	if (!c)
		m->committed = true;
	pthread_mutex_unlock(&m->lock);
	if (c) {
		free(cr);
		return mig_fail(m, -ECANCELED, "cancelled");
	}
	r = proto_encode_commit_req(cr, &buf, &len);
	free(cr);
	r = send_msg(m, PROTO_COMMIT_REQ, r, buf, len);
	set_state(m, MIG_COMMITTING);
	if (r < 0) {
		/* It may or may not have arrived: the destination decides; ask it. */
		pthread_mutex_lock(&m->lock);
		m->info.error[0] = '\0';
		pthread_mutex_unlock(&m->lock);
	}
	return source_await_decision(m);
}

/*
 * Queued (limits.max_outgoing): waits until admitted, cancelled or the agent stops. Each of
 * those broadcasts agent->cond (admission_done_locked, request, migration_shutdown_all).
 */
static int source_wait_turn(struct migration *m)
{
	struct agent *a = m->a;
	pthread_mutex_lock(&a->lock);
	while (!m->admitted && !a->shutting_down && !cancelled(m))
		pthread_cond_wait(&a->cond, &a->lock);
	bool admitted = m->admitted, stopping = a->shutting_down;
	pthread_mutex_unlock(&a->lock);
	if (admitted)
		return 0;
	if (stopping)
		return mig_fail(m, -ESHUTDOWN, "the agent shut down while the migration was queued");
	return mig_fail(m, -ECANCELED, "cancelled while queued");
}

/* ---------------- postcopy (source) ---------------- */

#define POSTCOPY_PUSH_PAGES 256u /* pages pushed between looks at the page requests */

/* Sends pages [first, first + n) of slot as one batch of its own. */
static int postcopy_send(struct migration *m, uint32_t slot, uint64_t first, uint32_t n,
			 uint64_t *fence)
{
	struct page_run run = {.region = slot, .first_page = first, .npages = n};
	return xport_src_send(m->src, &run, 1, ++*fence);
}

/* The source lost the destination's control channel during postcopy (r, err from xctl_recv). */
static int postcopy_lost_destination(struct migration *m, int r, const char *err,
				     const char *during)
{
	return mig_fail(m, r, "postcopy: lost the destination (%s%s%s)%s; the VM runs there with "
			      "pages missing and cannot go on without this agent; kept paused here, "
			      "not resumed",
			r == -ECONNRESET ? "connection closed" : strerror(-r), err[0] ? ": " : "",
			err, during);
}

/* Answers every PAGE_REQ waiting on the control channel (timeout 0 = only what is there).
 * Returns 1 when POSTCOPY_DONE arrived, 0 when nothing more is queued, < 0 on failure. */
static int postcopy_serve(struct migration *m, const struct proto_postcopy_start *ps,
			  int timeout_ms, uint64_t *fence, bool all_sent)
{
	for (;;) {
		uint16_t type = 0;
		void *buf = NULL;
		size_t len = 0;
		char err[160] = "";
		int r = xctl_recv(m->ctl, &type, &buf, &len, timeout_ms, err, sizeof(err));
		if (r == -ETIMEDOUT)
			return 0;
		if (r < 0)
			return postcopy_lost_destination(m, r, err, "");
		if (type == PROTO_POSTCOPY_DONE) {
			free(buf);
			return 1;
		}
		struct proto_page_req rq;
		if (type != PROTO_PAGE_REQ ||
		    proto_decode_page_req(buf, len, &rq, err, sizeof(err)) < 0 ||
		    rq.slot >= ps->nr_slots || rq.first_page >= ps->npages[rq.slot] ||
		    rq.npages > ps->npages[rq.slot] - rq.first_page) {
			free(buf);
			return mig_fail(m, -EPROTO, "postcopy: unexpected %s from the destination%s%s",
					proto_type_name(type), err[0] ? ": " : "", err);
		}
		free(buf);
		/*
		 * After POSTCOPY_END every page went before its fence: a request still arriving
		 * was sent before the destination saw them land, and the destination may already
		 * have closed its streams (DONE follows). Nothing to send.
		 */
		if (all_sent)
			continue;
		r = postcopy_send(m, rq.slot, rq.first_page, rq.npages, fence);
		if (r < 0)
			return mig_fail(m, r, "postcopy: sending requested pages: %s", strerror(-r));
		timeout_ms = 0;
	}
}

/*
 * Postcopy over RDMA: the destination pulls every page it lacks with RDMA READ from our
 * exposed memory; nothing to send. Waits for POSTCOPY_DONE (or ABORT, or the loss of the
 * line), the VM paused here. Returns 1 on DONE, < 0 on failure.
 */
static int postcopy_wait_pull(struct migration *m)
{
	for (;;) {
		uint16_t type = 0;
		void *buf = NULL;
		size_t len = 0;
		char err[160] = "";
		int r = xctl_recv(m->ctl, &type, &buf, &len, FENCE_TIMEOUT_MS, err, sizeof(err));
		if (r == -ETIMEDOUT)
			continue; /* pulling takes what it takes; a dead line ends the wait */
		if (r < 0)
			return postcopy_lost_destination(m, r, err, " while it pulled pages over RDMA");
		if (type == PROTO_POSTCOPY_DONE) {
			free(buf);
			return 1;
		}
		struct proto_refuse ab;
		if (type == PROTO_ABORT && proto_decode_refuse(buf, len, &ab, err, sizeof(err)) == 0) {
			free(buf);
			return mig_fail(m, -ECONNABORTED, "postcopy: the destination gave up: %.180s; "
					"the VM cannot go on; kept paused here, not resumed",
					ab.message);
		}
		free(buf);
		return mig_fail(m, -EPROTO, "postcopy: unexpected %s from the destination while it "
				"pulled pages over RDMA%s%s", proto_type_name(type), err[0] ? ": " : "",
				err);
	}
}

/*
 * ORs every page the tracker hands out into the postcopy list; *missing counts the pages new
 * to the list. Running: holes are dropped (a hole was never written: zero here, and a hole,
 * zero, there too). paused: the final pass, after the one made running: the VM does not run
 * again under this tracking (nothing to re-protect), and what it hands out was written since
 * (data, no hole), so no SEEK_HOLE either — on shmem that walks the whole data extent
 * around a page (5 ms for a 1 GiB one).
 */
static int postcopy_list(struct vm *vm, struct tracker *t, struct proto_postcopy_start *ps,
			 struct tracker_batch *b, bool paused, uint64_t *missing)
{
	struct tracker_cursor cur = {0};
	struct hole_cursor hc = {0};
	int r;

	_Static_assert(TRACKER_CHUNK_PAGES % 64 == 0, "chunks start on a bitmap word");
	while ((r = paused ? tracker_take_next_paused(t, &cur, b) : tracker_take_next(t, &cur, b)) >
	       0) {
		if (b->slot_index >= ps->nr_slots ||
		    b->first_page + b->npages > ps->npages[b->slot_index])
			continue;
		if (!paused)
			drop_holes(vm_slot(vm, b->slot_index), b, &hc);
		/* A chunk starts on a word (TRACKER_CHUNK_PAGES is a multiple of 64): OR words. */
		uint64_t *dst = ps->bitmap[b->slot_index] + b->first_page / 64;
		for (uint32_t w = 0; w < (b->npages + 63) / 64; w++) {
			uint64_t bits = b->bits[w] & ~dst[w];
			if (w == b->npages / 64) /* the last chunk of a slot may end mid-word */
				bits &= (1ull << (b->npages % 64)) - 1;
			dst[w] |= bits;
			*missing += (uint64_t)__builtin_popcountll(bits);
		}
	}
	return r;
}

/*
 * Postcopy: pause, send the state and the list of pages the destination lacks, and once it
 * runs the VM (it decided RUN durably first), push those pages while answering its
 * requests first — or, over RDMA, let it pull them. From POSTCOPY_START on this VM never
 * resumes here.
 */
static int source_postcopy(struct migration *m, struct vm *vm, struct tracker *t,
			   uint64_t *fence, uint64_t *ret_pause_ns)
{
	struct proto_postcopy_start ps = {0};
	struct tracker_batch *b = malloc(sizeof(*b));
	struct vm_error verr = {{0}};
	void *buf = NULL, *blob = NULL;
	size_t len = 0, blob_len = 0;
	int r;

	if (!b)
		return mig_fail(m, -ENOMEM, "out of memory");
	/*
	 * Over RDMA the destination pulls the pages itself (RDMA WRITEs would land in memory it
	 * punched out): expose guest memory for remote READ now, while the VM still runs, so
	 * the registration does not add to the downtime. The memfd mappings keep their pages,
	 * so what the destination reads later is what the paused VM left.
	 */
	bool pull = strcmp(xport_src_name(m->src), "rdma") == 0;
	if (pull) {
		void *hvas[PROTO_MAX_SLOTS];
		char xerr[200] = "";
		for (uint32_t i = 0; i < vm_nr_slots(vm); i++)
			hvas[i] = vm_slot(vm, i)->hva;
		r = xport_src_rdma_expose(m->src, hvas, xerr, sizeof(xerr));
		if (r < 0) {
			free(b);
			return mig_fail(m, r, "postcopy over RDMA: exposing guest memory: %s",
					xerr[0] ? xerr : strerror(-r));
		}
		ps.flags = PROTO_POSTCOPY_PULL_RDMA;
	}
	/*
	 * What the destination lacks: everything still dirty (never sent, or since). Listed
	 * while the VM still runs, so that at the pause only what the final harvest brings is
	 * added: a page written after it was listed is logged again (it was re-protected when
	 * harvested or taken), and a page is in the list however often it is written.
	 */
	ps.fence = *fence;
	ps.nr_slots = vm_nr_slots(vm);
	for (uint32_t i = 0; i < ps.nr_slots; i++) {
		ps.npages[i] = vm_slot(vm, i)->size / 4096;
		ps.bitmap[i] = calloc((ps.npages[i] + 63) / 64 + 1, sizeof(uint64_t));
		if (!ps.bitmap[i]) {
			r = mig_fail(m, -ENOMEM, "out of memory");
			goto out;
		}
	}
	uint64_t missing = 0, t_prelist = agent_mono_ns();
	r = tracker_sync(t, NULL);
	if (r < 0) {
		r = mig_fail(m, r, "harvesting the dirty pages: %s", strerror(-r));
		goto out;
	}
	r = postcopy_list(vm, t, &ps, b, false, &missing);
	if (r < 0) {
		r = mig_fail(m, r, "collecting the dirty pages: %s", strerror(-r));
		goto out;
	}
	uint64_t prelisted = missing;
	t_prelist = agent_mono_ns() - t_prelist;

	set_state(m, MIG_SWITCHOVER);
	pthread_mutex_lock(&m->vm->op_lock);
	*ret_pause_ns = agent_mono_ns();
	vm_pause(vm);
	pthread_mutex_unlock(&m->vm->op_lock);
	uint64_t t_paused = agent_mono_ns();
	r = tracker_sync(t, NULL);
	if (r < 0) {
		r = mig_fail(m, r, "final harvest: %s", strerror(-r));
		goto out;
	}
	uint64_t t_harvested = agent_mono_ns();
	r = postcopy_list(vm, t, &ps, b, true, &missing);
	if (r < 0) {
		r = mig_fail(m, r, "collecting the dirty pages: %s", strerror(-r));
		goto out;
	}
	uint64_t t_listed = agent_mono_ns();
	r = vm_state_save(vm, &blob, &blob_len, &verr);
	if (r < 0) {
		r = mig_fail(m, r, "saving vCPU state: %s", verr.msg);
		goto out;
	}
	struct proto_state st = {.fence = *fence, .blob = blob, .blob_len = (uint32_t)blob_len};
	r = proto_encode_state(&st, &buf, &len);
	free(blob);
	if ((r = send_msg(m, PROTO_STATE, r, buf, len)) < 0)
		goto out;
	pthread_mutex_lock(&m->lock);
	bool c = m->cancel;
	if (!c)
		m->committed = true; /* the destination decides from here on */
	pthread_mutex_unlock(&m->lock);
	if (c) {
		r = mig_fail(m, -ECANCELED, "cancelled");
		goto out;
	}
	r = proto_encode_postcopy_start(&ps, &buf, &len);
	r = send_msg(m, PROTO_POSTCOPY_START, r, buf, len);
	uint64_t t_sent = agent_mono_ns();
	if (r == 0)
		r = recv_msg(m, PROTO_POSTCOPY_RUNNING, &buf, &len, FENCE_TIMEOUT_MS);
	if (r < 0) {
		if (r == -ECONNREFUSED) { /* REFUSE/ABORT: it discarded; resuming is safe */
			r = PROTO_DECIDED_NOT_RUN;
			goto out;
		}
		/* Lost the line: did it start the VM? Ask, as for a commit. */
		pthread_mutex_lock(&m->lock);
		m->info.error[0] = '\0';
		pthread_mutex_unlock(&m->lock);
		r = source_await_decision(m);
		if (r == PROTO_DECIDED_RUN)
			r = mig_fail(m, -ECONNRESET,
				     "postcopy: the destination runs the VM but the connection was "
				     "lost before any page could be served; the VM cannot go on");
		goto out;
	}
	free(buf);
	/* Downtime ends here: the VM runs on the destination (pages may still be missing). */
	pthread_mutex_lock(&m->lock);
	set_downtime_locked(m, *ret_pause_ns);
	m->info.postcopy = true;
	pthread_mutex_unlock(&m->lock);
	set_state(m, MIG_POSTCOPY);
	agent_log(m->a, LOG_INFO, "migration %llu: postcopy: VM %s runs on %s, %llu pages to "
		  "go%s (%llu listed in %.1f ms before the pause); downtime %.1f ms (here: pause "
		  "%.1f ms, final harvest %.1f ms, listing the pages %.1f ms, state %.1f ms; the "
		  "destination answered %.1f ms later)", (unsigned long long)m->id, m->info.vm,
		  m->req.dest, (unsigned long long)missing, pull ? " (pulled by RDMA READ)" : "",
		  (unsigned long long)prelisted, t_prelist / 1e6,
		  m->info.downtime_us / 1e3, (t_paused - *ret_pause_ns) / 1e6,
		  (t_harvested - t_paused) / 1e6, (t_listed - t_harvested) / 1e6,
		  (t_sent - t_listed) / 1e6,
		  (agent_mono_ns() - t_sent) / 1e6);
	if (pull) {
		r = postcopy_wait_pull(m);
		if (r < 0)
			goto out;
		publish_sent(m, 0);
		r = PROTO_DECIDED_RUN;
		goto out;
	}

	/* Push every missing page, looking at the requests between small batches. */
	uint64_t left = missing;
	for (uint32_t sl = 0; sl < ps.nr_slots && r >= 0; sl++) {
		uint64_t p = 0;
		while (p < ps.npages[sl]) {
			if (!((ps.bitmap[sl][p / 64] >> (p % 64)) & 1)) {
				p++;
				continue;
			}
			uint64_t q = p + 1;
			while (q < ps.npages[sl] && q - p < POSTCOPY_PUSH_PAGES &&
			       ((ps.bitmap[sl][q / 64] >> (q % 64)) & 1))
				q++;
			r = postcopy_serve(m, &ps, 0, fence, false);
			if (r < 0)
				goto out;
			if (r == 1) {
				r = mig_fail(m, -EPROTO, "postcopy: DONE before every page was sent");
				goto out;
			}
			r = postcopy_send(m, sl, p, (uint32_t)(q - p), fence);
			if (r < 0) {
				r = mig_fail(m, r, "postcopy: lost the destination while pushing pages "
						   "(%s); the VM cannot go on",
					     strerror(-r));
				goto out;
			}
			left -= q - p;
			publish_sent(m, left * 4096ull);
			p = q;
		}
	}
	r = proto_encode_postcopy_end(++*fence, &buf, &len);
	/* An empty batch carries the fence on every stream: the end of the pushed pages. */
	if (r == 0)
		r = xport_src_send(m->src, NULL, 0, *fence);
	if ((r = send_msg(m, PROTO_POSTCOPY_END, r, buf, len)) < 0)
		goto out;
	for (;;) {
		r = postcopy_serve(m, &ps, FENCE_TIMEOUT_MS, fence, true);
		if (r < 0)
			goto out;
		if (r == 1)
			break;
	}
	publish_sent(m, 0);
	r = PROTO_DECIDED_RUN;
out:
	proto_postcopy_start_free(&ps);
	free(b);
	return r;
}

static void rebalance_locked(struct agent *a);

static void source_job(struct migration *m)
{
	struct agent *a = m->a;
	struct vm *vm = m->vm->vm;
	struct tracker *t = vm_tracker(vm);
	uint64_t fence = 0, t_start = agent_mono_ns(), t_pause = 0;
	bool tracking = false;
	int r;

	r = source_wait_turn(m);
	if (r < 0)
		goto out_fail;
	t_start = agent_mono_ns();
	for (;;) {
		set_state(m, MIG_SETUP);
		m->refuse_code = 0;
		r = source_setup(m, vm);
		if (r >= 0 || m->refuse_code != PROTO_E_BUSY || cancelled(m))
			break;
		/* The destination is at its limit (limits.max_incoming): wait and ask again. */
		drop_src(m);
		drop_ctl(m);
		pthread_mutex_lock(&m->lock);
		snprintf(m->info.decision_reason, sizeof(m->info.decision_reason),
			 "waiting: %.180s", m->info.error);
		m->info.error[0] = '\0';
		pthread_mutex_unlock(&m->lock);
		set_state(m, MIG_QUEUED);
		for (unsigned w = 0; w < BUSY_RETRY_MS / 100 && !cancelled(m); w++)
			usleep(100000);
		if (cancelled(m)) {
			r = mig_fail(m, -ECANCELED, "cancelled");
			break;
		}
		t_start = agent_mono_ns();
	}
	if (r < 0)
		goto out_fail;
	pthread_mutex_lock(&a->lock);
	rebalance_locked(a);
	pthread_mutex_unlock(&a->lock);
	r = tracker_start(t, true);
	if (r < 0) {
		mig_fail(m, r, "starting dirty tracking: %s", strerror(-r));
		goto out_fail;
	}
	tracking = true;
	uint64_t t_tracking = agent_mono_ns();
	pthread_mutex_lock(&m->lock);
	m->info.setup_time_ms = (t_tracking - t_start) / 1000000ull;
	pthread_mutex_unlock(&m->lock);
	agent_log(a, LOG_INFO, "migration %llu: set up in %.1f ms: offer accepted %.1f ms, %s data "
		  "path %.1f ms, dirty tracking %.1f ms", (unsigned long long)m->id,
		  (t_tracking - t_start) / 1e6, (m->setup_offer_ns - t_start) / 1e6,
		  m->info.transport, (m->setup_streams_ns - m->setup_offer_ns) / 1e6,
		  (t_tracking - m->setup_streams_ns) / 1e6);

	r = source_precopy(m, t, &fence);
	if (r < 0)
		goto out_fail;
	if (r == 2) {
		r = source_postcopy(m, vm, t, &fence, &t_pause);
		if (r < 0 && m->committed) {
			/* Past POSTCOPY_START: never resume; the error says what happened. */
			tracker_stop(t);
			release_vm_hold(m);
			set_state(m, MIG_FAILED);
			return;
		}
	} else {
		r = source_switchover(m, vm, t, &fence, &t_pause);
	}
	if (r == PROTO_DECIDED_RUN) {
		pthread_mutex_lock(&m->lock);
		if (!m->info.postcopy)
			set_downtime_locked(m, t_pause);
		m->info.error[0] = '\0';
		/* The destination commits a verified migration only when the digests matched. */
		m->info.verified = m->info.verify;
		pthread_mutex_unlock(&m->lock);
		tracker_stop(t);
		release_vm_hold(m);
		agent_vm_remove(a, m->vm); /* the destination runs it now */
		agent_event(a, "vm.deleted", "\"vm\":\"%s\",\"reason\":\"migrated\"", m->info.vm);
		set_state(m, MIG_COMPLETED);
		return;
	}
	if (r == -ESHUTDOWN) {
		/* Uncertain at shutdown: never resume; the VM ends with this agent. */
		mig_fail(m, r, "agent shut down while the destination's decision was unknown; "
			       "VM left paused, not resumed");
		release_vm_hold(m);
		set_state(m, MIG_FAILED);
		return;
	}
	if (r == PROTO_DECIDED_NOT_RUN)
		mig_fail(m, -ECONNREFUSED, "destination did not run the VM");
out_fail:
	/* Before the decision (or after NOT_RUN): the VM runs here, as before. */
	if (m->ctl && !cancelled(m))
		send_abort(m, PROTO_E_INTERNAL, m->info.error);
	else if (m->ctl)
		send_abort(m, PROTO_E_CANCELED, "cancelled by the operator");
	pthread_mutex_lock(&m->lock);
	if (m->src)
		xport_src_cancel(m->src);
	pthread_mutex_unlock(&m->lock);
	if (tracking)
		tracker_stop(t);
	pthread_mutex_lock(&m->vm->op_lock);
	if (vm_state(vm) == VM_PAUSED)
		vm_resume(vm);
	pthread_mutex_unlock(&m->vm->op_lock);
	release_vm_hold(m);
	set_state(m, cancelled(m) ? MIG_CANCELLED : MIG_FAILED);
}

/* ---------------- destination ---------------- */

static void decision_path(struct agent *a, uint64_t remote_id, const uint8_t *token, char *out,
			  size_t n)
{
	char hex[2 * PROTO_TOKEN_LEN + 1];
	for (unsigned i = 0; i < PROTO_TOKEN_LEN; i++)
		snprintf(hex + 2 * i, 3, "%02x", token[i]);
	snprintf(out, n, "%s/decisions/%llu-%s", a->cfg.state_dir, (unsigned long long)remote_id,
		 hex);
}

/*
 * The destination's decision file (state_dir/decisions/ID-TOKEN) is made during set-up,
 * holding "wait\n", and synced with its directory then, so that recording RUN in the
 * switch-over is one overwrite of the same four bytes and one fdatasync — no new file, no
 * directory sync, no metadata change while the VM is paused. A file that says anything
 * but "run\n" records no decision. Made at set-up as a head start; if that failed,
 * record_decision makes it then.
 */
static int prepare_decision(struct migration *m)
{
	char path[PATH_MAX + 96], dir[PATH_MAX + 16];
	decision_path(m->a, m->remote_id, m->token, path, sizeof(path));
	snprintf(dir, sizeof(dir), "%s/decisions", m->a->cfg.state_dir);
	int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0)
		return -errno;
	int dfd = -1, r = 0;
	if (pwrite(fd, "wait\n", 5, 0) != 5 || fsync(fd) < 0 ||
	    (dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0 || fsync(dfd) < 0)
		r = errno ? -errno : -EIO;
	if (dfd >= 0)
		close(dfd);
	if (r < 0) {
		close(fd);
		unlink(path);
		return r;
	}
	m->decision_fd = fd;
	return 0;
}

/* End of an incoming migration: a decision file that never said RUN goes. */
static void finish_decision(struct migration *m)
{
	if (m->decision_fd < 0)
		return;
	close(m->decision_fd);
	m->decision_fd = -1;
	pthread_mutex_lock(&m->lock);
	bool run = m->decision == PROTO_DECIDED_RUN;
	pthread_mutex_unlock(&m->lock);
	if (!run) {
		char path[PATH_MAX + 96];
		decision_path(m->a, m->remote_id, m->token, path, sizeof(path));
		unlink(path);
	}
}

/* Whether a decision file records RUN. */
static bool decision_file_says_run(const char *path)
{
	char b[5] = "";
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return false;
	ssize_t n = pread(fd, b, 4, 0);
	close(fd);
	return n == 4 && memcmp(b, "run\n", 4) == 0;
}

/*
 * Records the destination's decision: in memory, and for RUN on disk (written and synced
 * before anyone is told, with its directory unless prepare_decision made the file), so a
 * restarted agent still answers a source that lost the line. Returns -errno if a RUN could
 * not be made durable: then it must not run.
 */
static int record_decision(struct migration *m, enum proto_decided d)
{
	struct agent *a = m->a;
	int r = 0;
	if (d == PROTO_DECIDED_RUN) {
		if (m->decision_fd < 0 && (r = prepare_decision(m)) < 0)
			return r;
		/* Four bytes over four bytes of a synced file: the data is all there is to sync. */
		if (pwrite(m->decision_fd, "run\n", 4, 0) != 4 || fdatasync(m->decision_fd) < 0) {
			r = errno ? -errno : -EIO;
			(void)pwrite(m->decision_fd, "fail", 4, 0);
			return r;
		}
	}
	pthread_mutex_lock(&a->lock);
	if (!a->decisions)
		a->decisions = calloc(DECISIONS_KEPT, sizeof(*a->decisions));
	if (a->decisions) {
		struct decision_rec *rec = &a->decisions[a->decisions_next++ % DECISIONS_KEPT];
		rec->remote_id = m->remote_id;
		memcpy(rec->token, m->token, sizeof(m->token));
		rec->decision = d;
	}
	pthread_mutex_unlock(&a->lock);
	return 0;
}

/* Prepares state_dir/decisions and drops records older than the retention period. */
int migration_state_init(struct agent *a, struct agent_error *err)
{
	char dir[PATH_MAX + 16];
	if (!a->admission &&
	    sched_admission_new(a->cfg.limits.max_outgoing, a->cfg.limits.max_incoming,
				&a->admission) < 0)
		return agent_err(err, -ENOMEM, "internal", "out of memory");
	snprintf(dir, sizeof(dir), "%s/decisions", a->cfg.state_dir);
	if (mkdir(a->cfg.state_dir, 0700) < 0 && errno != EEXIST)
		return agent_err(err, -errno, "unavailable", "cannot create state_dir %s: %s",
				 a->cfg.state_dir, strerror(errno));
	if (mkdir(dir, 0700) < 0 && errno != EEXIST)
		return agent_err(err, -errno, "unavailable", "cannot create %s: %s", dir,
				 strerror(errno));
	DIR *d = opendir(dir);
	if (!d)
		return agent_err(err, -errno, "unavailable", "cannot read %s: %s", dir,
				 strerror(errno));
	time_t now = time(NULL);
	struct dirent *e;
	while ((e = readdir(d))) {
		struct stat st;
		if (e->d_name[0] == '.')
			continue;
		if (fstatat(dirfd(d), e->d_name, &st, 0) == 0 &&
		    now - st.st_mtime > DECISION_RETENTION_S)
			unlinkat(dirfd(d), e->d_name, 0);
	}
	closedir(d);
	return 0;
}

/* Settles the decision once: returns what was decided (first caller wins). */
static enum proto_decided decide(struct migration *m, enum proto_decided want)
{
	pthread_mutex_lock(&m->lock);
	if (m->decision == PROTO_DECIDED_UNKNOWN)
		m->decision = want;
	enum proto_decided d = m->decision;
	pthread_mutex_unlock(&m->lock);
	return d;
}

static int dest_refuse(struct migration *m, uint32_t code, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static int dest_refuse(struct migration *m, uint32_t code, const char *fmt, ...)
{
	struct proto_refuse rf = {.code = code};
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(rf.message, sizeof(rf.message), fmt, ap);
	va_end(ap);
	void *buf = NULL;
	size_t len = 0;
	if (proto_encode_refuse(&rf, &buf, &len) == 0) {
		xctl_send(m->ctl, PROTO_REFUSE, buf, len);
		free(buf);
	}
	return mig_fail(m, -ECONNREFUSED, "refused: %s", rf.message);
}

static int dest_create_vm(struct migration *m, const struct proto_vm_offer *o)
{
	struct agent *a = m->a;
	struct agent_error aerr = {0};
	struct vm_error verr = {{0}};
	struct agent_vm_spec spec = {0};
	struct vm_config cfg;
	int r;

	copy_str(spec.name, sizeof(spec.name), o->name);
	copy_str(spec.guest, sizeof(spec.guest), o->guest);
	spec.mem_size = o->mem_size;
	spec.vcpus = o->vcpus;
	spec.slot_size = o->nr_slots > 1 ? o->slots[0].size : 0;
	copy_str(m->info.vm, sizeof(m->info.vm), o->name);
	struct agent_vm *v = agent_vm_alloc(&spec);
	if (!v)
		return dest_refuse(m, PROTO_E_NOMEM, "out of memory");
	vm_config_init(&cfg, o->name);
	cfg.mem_size = o->mem_size;
	cfg.vcpus = o->vcpus;
	cfg.irqchip = o->irqchip != 0;
	cfg.slot_size = spec.slot_size;
	r = vm_new(&cfg, &v->vm, &verr);
	if (r < 0) {
		agent_vm_put(a, v);
		/* -E2BIG covers both too much memory and too many vCPUs: tell them apart. */
		long pages = sysconf(_SC_PHYS_PAGES);
		bool mem = r == -ENOMEM ||
			   (r == -E2BIG && pages > 0 &&
			    o->mem_size > (uint64_t)pages * (uint64_t)sysconf(_SC_PAGESIZE));
		return dest_refuse(m, mem ? PROTO_E_NOMEM : PROTO_E_SHAPE,
				   "cannot create VM %s here: %s", o->name, verr.msg);
	}
	bool same = vm_nr_slots(v->vm) == o->nr_slots;
	for (unsigned i = 0; same && i < o->nr_slots; i++)
		same = vm_slot(v->vm, i)->gpa == o->slots[i].gpa &&
		       vm_slot(v->vm, i)->size == o->slots[i].size;
	if (!same) {
		agent_vm_put(a, v);
		return dest_refuse(m, PROTO_E_SHAPE, "memslot layout of %s not reproducible here",
				   o->name);
	}
	v->migration_id = m->id;
	v->incoming = true;
	r = agent_vm_insert(a, v, &aerr);
	if (r < 0) {
		agent_vm_put(a, v);
		return dest_refuse(m, r == -EEXIST ? PROTO_E_EXISTS : PROTO_E_NOMEM, "%s",
				   aerr.message);
	}
	m->vm = v;
	v->refs++; /* the job's reference, besides the list's */
	return 0;
}

static void dest_discard(struct migration *m)
{
	if (!m->vm)
		return;
	release_vm_hold(m);
	agent_vm_remove(m->a, m->vm);
}

/* The fault thread's request: a PAGE_REQ on the control channel (its sends are locked). */
static int dest_request_pages(void *arg, uint32_t slot, uint64_t first_page, uint32_t npages)
{
	struct migration *m = arg;
	struct proto_page_req rq = {.slot = slot, .first_page = first_page, .npages = npages};
	void *buf = NULL;
	size_t len = 0;
	int r = proto_encode_page_req(&rq, &buf, &len);
	if (r == 0)
		r = xctl_send(m->ctl, PROTO_PAGE_REQ, buf, len);
	free(buf);
	return r;
}

static void dest_postcopy_lost(struct migration *m, const char *why);

/* Pull mode (RDMA): a puller thread's fetch, placed through the userfaultfd by the transport. */
static int dest_fetch_pages(void *arg, uint32_t slot, uint64_t first_page, uint32_t npages)
{
	struct migration *m = arg;
	return xport_dst_rdma_fetch(m->dst, slot, first_page, npages, PULL_FETCH_TIMEOUT_MS);
}

/* Postcopy figures for the record (destination). */
static void dest_postcopy_progress(struct migration *m)
{
	struct xport_dst_stats ds = {0};
	uint64_t missing = postcopy_dst_remaining(m->pc);
	xport_dst_stats(m->dst, &ds);
	pthread_mutex_lock(&m->lock);
	m->info.remaining_bytes = missing * 4096ull;
	m->info.pages_rdma_read = ds.read_pages;
	pthread_mutex_unlock(&m->lock);
}

/*
 * POSTCOPY_START: the last precopy pages are in, the state too. Drop the stale pages, make
 * the receivers place pages through userfaultfd, restore, decide RUN durably, run the VM
 * and tell the source. 0 when running; < 0 with the migration failed (nothing ran).
 */
static int dest_postcopy_start(struct migration *m, const void *p, size_t len,
			       const void *state_blob, size_t state_len)
{
	struct agent *a = m->a;
	struct vm *vm = m->vm->vm;
	struct proto_postcopy_start ps;
	char err[256] = "";
	uint64_t t0 = agent_mono_ns(), t_setup, t_state;
	int r = proto_decode_postcopy_start(p, len, &ps, err, sizeof(err));
	if (r < 0)
		return mig_fail(m, r, "bad POSTCOPY_START: %s", err);
	if (ps.nr_slots != vm_nr_slots(vm)) {
		proto_postcopy_start_free(&ps);
		return mig_fail(m, -EPROTO, "POSTCOPY_START for %u memslots, the VM has %u",
				ps.nr_slots, vm_nr_slots(vm));
	}
	r = xport_dst_wait_fence(m->dst, ps.fence, FENCE_TIMEOUT_MS);
	if (r < 0) {
		proto_postcopy_start_free(&ps);
		return mig_fail(m, r, "last precopy pages did not arrive: %s",
				xport_dst_error(m->dst));
	}
	if (!state_blob) {
		proto_postcopy_start_free(&ps);
		return mig_fail(m, -EPROTO, "no STATE before POSTCOPY_START");
	}
	/*
	 * Over RDMA the pages must be pulled: the source's WRITEs would land in the memory
	 * registered at set-up, which the discard below punches out of guest memory.
	 */
	bool rdma = xport_dst_rdma_port(m->dst) != 0;
	bool pull = ps.flags & PROTO_POSTCOPY_PULL_RDMA;
	if (pull != rdma) {
		proto_postcopy_start_free(&ps);
		return mig_fail(m, -EPROTO, "POSTCOPY_START %s pull mode over %s",
				pull ? "asks for" : "without", rdma ? "RDMA" : "TCP");
	}
	struct postcopy_dst_config pcfg = {.arg = m, .prefetch_pages = 15};
	if (pull)
		pcfg.fetch = dest_fetch_pages;
	else
		pcfg.request = dest_request_pages;
	struct postcopy_dst *pc = NULL;
	r = postcopy_dst_new(vm, &pcfg, &pc, err, sizeof(err));
	for (uint32_t i = 0; r == 0 && i < ps.nr_slots; i++) {
		if (ps.npages[i] != vm_slot(vm, i)->size / 4096)
			r = -EPROTO, snprintf(err, sizeof(err), "slot %u: %llu pages, not %llu", i,
					      (unsigned long long)ps.npages[i],
					      (unsigned long long)(vm_slot(vm, i)->size / 4096));
		else
			r = postcopy_dst_discard(pc, i, ps.bitmap[i], ps.npages[i]);
	}
	for (uint32_t i = 0; r == 0 && i < ps.nr_slots; i++)
		r = xport_dst_set_uffd(m->dst, i, postcopy_dst_uffd(pc));
	proto_postcopy_start_free(&ps);
	t_setup = agent_mono_ns();
	struct vm_error verr = {{0}};
	if (r == 0 && (r = vm_state_restore(vm, state_blob, state_len, &verr)) < 0)
		snprintf(err, sizeof(err), "vCPU state refused: %.200s", verr.msg);
	if (r < 0) {
		postcopy_dst_free(pc);
		return mig_fail(m, r, "postcopy set-up: %s", err[0] ? err : strerror(-r));
	}
	m->pc = pc;
	t_state = agent_mono_ns();
	m->pc_pull = pull;
	set_state(m, MIG_DEST_READY);
	if (decide(m, PROTO_DECIDED_RUN) != PROTO_DECIDED_RUN)
		return mig_fail(m, -ECANCELED, "discarded before the decision");
	r = record_decision(m, PROTO_DECIDED_RUN);
	if (r < 0) {
		pthread_mutex_lock(&m->lock);
		m->decision = PROTO_DECIDED_NOT_RUN;
		pthread_mutex_unlock(&m->lock);
		return mig_fail(m, r, "cannot record the decision durably in %s: %s",
				a->cfg.state_dir, strerror(-r));
	}
	/*
	 * RUNNING goes before the VM starts: its first faults send PAGE_REQs, which must not
	 * overtake it on the control channel. (If it is lost, the source asks.)
	 */
	send_msg(m, PROTO_POSTCOPY_RUNNING, 0, NULL, 0);
	pthread_mutex_lock(&m->lock);
	m->info.postcopy = true;
	pthread_mutex_unlock(&m->lock);
	set_state(m, MIG_POSTCOPY);
	pthread_mutex_lock(&m->vm->op_lock);
	r = vm_start(vm);
	pthread_mutex_unlock(&m->vm->op_lock);
	if (r < 0)
		return mig_fail(m, r, "postcopy: the VM did not start here: %s", strerror(-r));
	/* Pull mode: from now on the pullers fetch every needed page, faults first. */
	if (pull && (r = postcopy_dst_pull_start(pc)) < 0) {
		snprintf(err, sizeof(err), "starting the pullers: %s", strerror(-r));
		dest_postcopy_lost(m, err);
		return r;
	}
	uint64_t t_run = agent_mono_ns();
	agent_log(a, LOG_INFO, "migration %llu: postcopy: VM started %.1f ms after POSTCOPY_START "
		  "(userfaultfd and %llu pages to fetch %.1f ms, state %.1f ms, durable decision "
		  "%.1f ms)", (unsigned long long)m->id, (t_run - t0) / 1e6,
		  (unsigned long long)postcopy_dst_remaining(pc), (t_setup - t0) / 1e6,
		  (t_state - t_setup) / 1e6, (t_run - t_state) / 1e6);
	return 0;
}

/* The source's connection is gone (or broke the protocol) during postcopy: the VM cannot
 * get its missing pages. Stop it and say so; it is destroyed with the migration. */
static void dest_postcopy_lost(struct migration *m, const char *why)
{
	uint64_t missing = m->pc ? postcopy_dst_remaining(m->pc) : 0;
	char msg[256];
	snprintf(msg, sizeof(msg), "postcopy: %.160s with %llu pages missing; the VM cannot go on",
		 why, (unsigned long long)missing);
	if (m->pc)
		postcopy_dst_fail(m->pc, msg);
	pthread_mutex_lock(&m->lock);
	memcpy(m->info.error, msg, sizeof(m->info.error));
	pthread_mutex_unlock(&m->lock);
	agent_log(m->a, LOG_ERROR, "migration %llu: %s", (unsigned long long)m->id, msg);
}

/* The VM runs here for good (after COMMITTED, or POSTCOPY_DONE): the record says so. */
static void dest_completed(struct migration *m)
{
	pthread_mutex_lock(&m->lock);
	m->info.error[0] = '\0';
	pthread_mutex_unlock(&m->lock);
	agent_event(m->a, "vm.created", "\"vm\":\"%s\",\"reason\":\"migrated\"", m->info.vm);
	set_state(m, MIG_COMPLETED);
	agent_vm_put(m->a, m->vm);
	m->vm = NULL;
}

/* Every page is here: POSTCOPY_DONE tells the source; the VM is this agent's for good. */
static void dest_postcopy_finish(struct migration *m)
{
	send_msg(m, PROTO_POSTCOPY_DONE, 0, NULL, 0);
	postcopy_dst_pull_stop(m->pc); /* before the transport its fetches use goes */
	dest_postcopy_progress(m);
	drop_dst(m); /* receivers gone: nothing places pages any more */
	postcopy_dst_free(m->pc);
	m->pc = NULL;
	release_vm_hold(m);
	dest_completed(m);
}

static void dest_job(struct migration *m)
{
	struct agent *a = m->a;
	char err[256] = "";
	void *buf = NULL;
	size_t len = 0;
	int r;

	set_state(m, MIG_SETUP);
	/* RDMA when the source offers it and our end of this connection is on a device. */
	char local_ip[64] = "", peer_ip[64] = "", why[160] = "";
	bool rdma = (m->hello.caps & PROTO_CAP_RDMA) &&
		    a->cfg.migration.transport != FERRY_CONFIG_TRANSPORT_TCP &&
		    xctl_addrs(m->ctl, local_ip, peer_ip, sizeof(local_ip)) == 0 &&
		    xport_rdma_usable(local_ip, why, sizeof(why));
	/* The highest common version (incoming_hello checked that the ranges meet). */
	uint32_t version = m->hello.max_version < PROTO_VERSION ? m->hello.max_version
								: PROTO_VERSION;
	/* Compressed pages when offered on a v2 TCP migration: decompressing is cheap here. */
	bool zstd = !rdma && version >= PROTO_ZSTD_MIN_VERSION &&
		    (m->hello.caps & PROTO_CAP_ZSTD);
	struct proto_welcome w = {.version = version,
				  .caps = PROTO_CAP_TCP | (rdma ? PROTO_CAP_RDMA : 0) |
					  (m->hello.caps & PROTO_CAP_VERIFY) |
					  (zstd ? PROTO_CAP_ZSTD : 0)};
	snprintf(w.agent, sizeof(w.agent), "%s", a->cfg.name);
	memcpy(w.token, m->token, sizeof(w.token));
	r = proto_encode_welcome(&w, &buf, &len);
	if ((r = send_msg(m, PROTO_WELCOME, r, buf, len)) < 0)
		goto fail;
	if ((r = recv_msg(m, PROTO_VM_OFFER, &buf, &len, CTL_TIMEOUT_MS)) < 0)
		goto fail;
	struct proto_vm_offer *o = calloc(1, sizeof(*o));
	r = o ? proto_decode_vm_offer(buf, len, o, err, sizeof(err)) : -ENOMEM;
	free(buf);
	if (r < 0) {
		free(o);
		dest_refuse(m, PROTO_E_PROTOCOL, "bad VM_OFFER: %s", err);
		goto fail;
	}
	r = dest_create_vm(m, o);
	if (r < 0) {
		free(o);
		goto fail;
	}
	struct xport_region regions[PROTO_MAX_SLOTS];
	for (unsigned i = 0; i < o->nr_slots; i++) {
		regions[i].hva = vm_slot(m->vm->vm, i)->hva;
		regions[i].size = vm_slot(m->vm->vm, i)->size;
		regions[i].has_fd = true;
		regions[i].fd = vm_slot(m->vm->vm, i)->memfd;
	}
	struct xport_dst *dst = NULL;
	struct proto_vm_accept acc = {0};
	char derr[256] = "";
	if (rdma) {
		/* Fresh guest memory: every page reads zero until the source writes it. */
		r = xport_dst_rdma_new(regions, o->nr_slots, m->hello.streams,
				       XPORT_RDMA_DST_ZEROED, local_ip, m->token, &dst, derr,
				       sizeof(derr));
		if (r == 0)
			acc.rdma_port = xport_dst_rdma_port(dst);
	} else {
		r = xport_dst_tcp_new(regions, o->nr_slots, m->hello.streams, &dst);
		if (r == 0 && zstd)
			r = xport_dst_enable_zstd(dst);
	}
	free(o);
	pthread_mutex_lock(&a->lock);
	m->dst = dst;
	pthread_mutex_unlock(&a->lock);
	pthread_mutex_lock(&m->lock);
	snprintf(m->info.transport, sizeof(m->info.transport), "%s", rdma ? "rdma" : "tcp");
	snprintf(m->info.compression, sizeof(m->info.compression), "%s", zstd ? "zstd" : "none");
	snprintf(m->info.compression_reason, sizeof(m->info.compression_reason), "%s",
		 zstd                                  ? "offered by the source"
		 : rdma                                ? "RDMA writes pages straight into guest memory"
		 : version < PROTO_ZSTD_MIN_VERSION    ? "the source speaks protocol 1"
						       : "not offered by the source");
	pthread_mutex_unlock(&m->lock);
	if (r < 0) {
		dest_refuse(m, PROTO_E_INTERNAL, "data path: %s%s%s", strerror(-r),
			    derr[0] ? ": " : "", derr);
		goto fail;
	}
	r = proto_encode_vm_accept(&acc, &buf, &len);
	r = send_msg(m, PROTO_VM_ACCEPT, r, buf, len);
	if (r < 0)
		goto fail;
	set_state(m, MIG_RECEIVING);
	(void)prepare_decision(m); /* while the first pages come; else at the decision */

	void *state_blob = NULL;
	size_t state_len = 0;
	struct digest_job *dig = calloc(1, sizeof(*dig));
	if (!dig) {
		mig_fail(m, -ENOMEM, "out of memory");
		goto fail;
	}
	for (;;) {
		uint16_t type = 0;
		err[0] = '\0';
		/* Pulling, the source says nothing until we are done: look at the pullers often. */
		r = xctl_recv(m->ctl, &type, &buf, &len, m->pc_pull ? PULL_POLL_MS : DEST_IDLE_TIMEOUT_MS,
			      err, sizeof(err));
		if (r == -ETIMEDOUT && m->pc_pull) {
			char pwhy[200] = "";
			int st = postcopy_dst_pull_status(m->pc, pwhy, sizeof(pwhy));
			dest_postcopy_progress(m);
			if (st == 0)
				continue;
			if (st < 0) {
				char lost[240];
				snprintf(lost, sizeof(lost), "source %s: RDMA READ failed (%.160s)",
					 xctl_peer(m->ctl), pwhy);
				dest_postcopy_lost(m, lost);
				send_abort(m, PROTO_E_INTERNAL, m->info.error);
				break;
			}
			/* Every page is here: the VM no longer needs the source. */
			dest_postcopy_finish(m);
			free(state_blob);
			free(dig);
			return;
		}
		if (r < 0) {
			char lost[200];
			snprintf(lost, sizeof(lost), "source %s: %s%s%.100s", xctl_peer(m->ctl),
				 r == -ECONNRESET ? "connection closed" : strerror(-r),
				 err[0] ? ": " : "", err);
			if (m->pc)
				dest_postcopy_lost(m, lost);
			else
				mig_fail(m, r, "%s", lost);
			break;
		}
		uint64_t fence = 0;
		if (type == PROTO_ROUND_END) {
			struct proto_round_end re;
			r = proto_decode_round_end(buf, len, &re, err, sizeof(err));
			fence = re.fence;
			if (r == 0) {
				pthread_mutex_lock(&m->lock);
				m->info.round = re.round;
				m->info.remaining_bytes = re.remaining * 4096ull;
				pthread_mutex_unlock(&m->lock);
			}
		} else if (type == PROTO_STATE) {
			struct proto_state st;
			r = proto_decode_state(buf, len, &st, err, sizeof(err));
			if (r == 0) {
				fence = st.fence;
				free(state_blob);
				state_blob = malloc(st.blob_len);
				if (state_blob)
					memcpy(state_blob, st.blob, st.blob_len);
				state_len = st.blob_len;
				r = state_blob ? 0 : -ENOMEM;
			}
		} else if (type == PROTO_COMMIT_REQ) {
			uint64_t t_req = agent_mono_ns();
			struct proto_commit_req *cr = calloc(1, sizeof(*cr));
			r = cr ? proto_decode_commit_req(buf, len, cr, err, sizeof(err)) : -ENOMEM;
			free(buf);
			buf = NULL;
			if (r == 0)
				r = xport_dst_wait_fence(m->dst, cr->fence, FENCE_TIMEOUT_MS);
			if (r < 0) {
				mig_fail(m, r, "last pages did not arrive: %s%s",
					 xport_dst_error(m->dst), err);
				send_abort(m, PROTO_E_PROTOCOL, m->info.error);
				free(cr);
				break;
			}
			r = 0;
			if (m->info.verify && cr->nr_digests != vm_nr_slots(m->vm->vm))
				r = mig_fail(m, -EPROTO, "verify mode, but %u digests for %u memslots",
					     cr->nr_digests, vm_nr_slots(m->vm->vm));
			if (r == 0 && cr->nr_digests) {
				if (digest_finish(dig, m->vm->vm, cr->fence) < 0 ||
				    dig->n != cr->nr_digests)
					r = -EIO;
				for (uint32_t i = 0; r == 0 && i < dig->n; i++)
					if (memcmp(dig->out[i], cr->digests[i], PROTO_DIGEST_LEN))
						r = mig_fail(m, -EBADMSG,
							     "memory digest of slot %u differs", i);
				if (r == 0) {
					pthread_mutex_lock(&m->lock);
					m->info.verified = true;
					pthread_mutex_unlock(&m->lock);
				}
			}
			free(cr);
			if (r < 0) {
				mig_fail(m, r, "verification failed");
				send_abort(m, PROTO_E_VERIFY, m->info.error);
				break;
			}
			struct vm_error verr = {{0}};
			if (state_blob)
				r = vm_state_restore(m->vm->vm, state_blob, state_len, &verr);
			else
				r = -EPROTO, snprintf(verr.msg, sizeof(verr.msg), "no STATE before COMMIT_REQ");
			if (r < 0) {
				mig_fail(m, r, "vCPU state refused: %s", verr.msg);
				send_abort(m, PROTO_E_STATE, m->info.error);
				break;
			}
			set_state(m, MIG_DEST_READY);
			/* The decision, made once and recorded before anyone hears of it. */
			if (decide(m, PROTO_DECIDED_RUN) != PROTO_DECIDED_RUN) {
				mig_fail(m, -ECANCELED, "discarded before the decision");
				send_abort(m, PROTO_E_CANCELED, m->info.error);
				break;
			}
			r = record_decision(m, PROTO_DECIDED_RUN);
			if (r < 0) {
				/* Undecided after all: nobody was told, and NOT_RUN is safe. */
				pthread_mutex_lock(&m->lock);
				m->decision = PROTO_DECIDED_NOT_RUN;
				pthread_mutex_unlock(&m->lock);
				mig_fail(m, r, "cannot record the decision durably in %s: %s",
					 a->cfg.state_dir, strerror(-r));
				send_abort(m, PROTO_E_INTERNAL, m->info.error);
				break;
			}
			pthread_mutex_lock(&m->vm->op_lock);
			r = vm_start(m->vm->vm);
			pthread_mutex_unlock(&m->vm->op_lock);
			release_vm_hold(m);
			struct proto_committed c = {.run_ns = agent_mono_ns() - t_req};
			r = proto_encode_committed(&c, &buf, &len);
			send_msg(m, PROTO_COMMITTED, r, buf, len); /* the source asks if lost */
			free(state_blob);
			free(dig);
			dest_completed(m);
			return;
		} else if (type == PROTO_POSTCOPY_START && !m->pc) {
			r = dest_postcopy_start(m, buf, len, state_blob, state_len);
			free(buf);
			buf = NULL;
			if (r < 0) {
				send_abort(m, PROTO_E_STATE, m->info.error);
				break;
			}
			continue;
		} else if (type == PROTO_POSTCOPY_END && m->pc && !m->pc_pull) {
			uint64_t g = 0;
			r = proto_decode_postcopy_end(buf, len, &g, err, sizeof(err));
			free(buf);
			buf = NULL;
			if (r == 0)
				r = xport_dst_wait_fence(m->dst, g, FENCE_TIMEOUT_MS);
			if (r == 0 && !postcopy_dst_complete(m->pc))
				r = -EPROTO, snprintf(err, sizeof(err), "%llu pages still missing",
						      (unsigned long long)postcopy_dst_remaining(m->pc));
			if (r < 0) {
				dest_postcopy_lost(m, err[0] ? err : xport_dst_error(m->dst));
				send_abort(m, PROTO_E_PROTOCOL, m->info.error);
				break;
			}
			dest_postcopy_finish(m);
			free(state_blob);
			free(dig);
			return;
		} else if (type == PROTO_ABORT) {
			struct proto_refuse ab;
			if (proto_decode_refuse(buf, len, &ab, err, sizeof(err)) == 0)
				mig_fail(m, -ECANCELED, "source aborted: %s", ab.message);
			else
				mig_fail(m, -ECANCELED, "source aborted");
			free(buf);
			break;
		} else {
			mig_fail(m, -EPROTO, "unexpected %s from the source", proto_type_name(type));
			send_abort(m, PROTO_E_PROTOCOL, m->info.error);
			free(buf);
			break;
		}
		free(buf);
		buf = NULL;
		if (r < 0) {
			mig_fail(m, r, "bad %s: %s", proto_type_name(type), err);
			send_abort(m, PROTO_E_PROTOCOL, m->info.error);
			break;
		}
		r = xport_dst_wait_fence(m->dst, fence, FENCE_TIMEOUT_MS);
		if (r < 0) {
			mig_fail(m, r, "data streams: %s", xport_dst_error(m->dst));
			send_abort(m, PROTO_E_PROTOCOL, m->info.error);
			break;
		}
		if (type == PROTO_STATE && m->info.verify && !dig->started)
			digest_start(dig, m->vm->vm, fence);
		struct xport_dst_stats ds;
		xport_dst_stats(m->dst, &ds);
		pthread_mutex_lock(&m->lock);
		m->info.bytes_sent = ds.bytes;
		m->info.pages_normal = ds.pages;
		m->info.pages_zero = ds.zero_pages;
		pthread_mutex_unlock(&m->lock);
	}
	free(state_blob);
	if (dig && dig->started)
		pthread_join(dig->thread, NULL);
	free(dig);
fail:
	if (decide(m, PROTO_DECIDED_NOT_RUN) == PROTO_DECIDED_NOT_RUN)
		record_decision(m, PROTO_DECIDED_NOT_RUN);
	if (m->pc) {
		/* The pullers use the transport: they stop before it goes. */
		postcopy_dst_pull_stop(m->pc);
		dest_postcopy_progress(m);
	}
	drop_dst(m);
	if (m->pc) {
		/* Postcopy lost: the VM ran here but can never get its pages; it goes. */
		postcopy_dst_free(m->pc);
		m->pc = NULL;
	}
	if (m->vm) {
		dest_discard(m);
		agent_vm_put(a, m->vm);
		m->vm = NULL;
	}
	set_state(m, cancelled(m) ? MIG_CANCELLED : MIG_FAILED);
}

/* ---------------- jobs, listener, API ---------------- */

/* Called with agent->lock held: m's slot is free; admit who is next. */
static void admission_done_locked(struct agent *a, struct migration *m)
{
	uint64_t next;
	sched_admission_finish(a->admission, m->id);
	while (sched_admission_next(a->admission, &next) == 1) {
		for (struct migration *o = a->migrations; o; o = o->next)
			if (o->id == next && !o->incoming)
				o->admitted = true;
	}
}

/*
 * Called with agent->lock held. With policy.link_capacity set, the capacity is shared by
 * the outgoing migrations sending to the same destination host, max-min fairly with
 * weight 1 + priority; each one's cap (and its own requested cap, if lower) is applied to
 * its data path at once.
 */
static void rebalance_locked(struct agent *a)
{
	uint64_t cap = a->cfg.policy.link_capacity;
	if (!cap)
		return;
	enum { MAXF = 64 };
	struct migration *ms[MAXF];
	unsigned n = 0;
	for (struct migration *m = a->migrations; m && n < MAXF; m = m->next)
		if (!m->incoming && !m->done && m->admitted)
			ms[n++] = m;
	bool grouped[MAXF] = {false};
	for (unsigned i = 0; i < n; i++) {
		if (grouped[i])
			continue;
		char hi[300], hj[300];
		uint16_t port;
		if (ferry_config_parse_hostport(ms[i]->req.dest, hi, sizeof(hi), &port) < 0)
			continue;
		struct sched_share_flow fl[MAXF];
		double caps[MAXF];
		unsigned idx[MAXF], k = 0;
		for (unsigned j = i; j < n; j++) {
			if (grouped[j] ||
			    ferry_config_parse_hostport(ms[j]->req.dest, hj, sizeof(hj), &port) < 0 ||
			    strcmp(hi, hj) != 0)
				continue;
			grouped[j] = true;
			idx[k] = j;
			fl[k].weight = 1.0 + ms[j]->req.priority;
			fl[k].demand_Bps = ms[j]->req.bandwidth ? (double)ms[j]->req.bandwidth
								: (double)cap;
			k++;
		}
		sched_share((double)cap, fl, k, caps);
		for (unsigned q = 0; q < k; q++) {
			struct migration *m = ms[idx[q]];
			pthread_mutex_lock(&m->lock);
			m->info.bandwidth_cap_bps = caps[q] * 8.0;
			if (m->src)
				xport_src_set_bandwidth(m->src, (uint64_t)caps[q]);
			pthread_mutex_unlock(&m->lock);
		}
	}
}

static void *job_thread(void *arg)
{
	struct migration *m = arg;
	if (m->incoming) {
		dest_job(m);
		finish_decision(m);
	} else {
		source_job(m);
	}
	drop_src(m);
	drop_dst(m);
	drop_ctl(m);
	if (!m->incoming && m->vm) {
		agent_vm_put(m->a, m->vm);
		m->vm = NULL;
	}
	pthread_mutex_lock(&m->a->lock);
	m->done = true;
	if (!m->incoming)
		admission_done_locked(m->a, m);
	rebalance_locked(m->a);
	pthread_cond_broadcast(&m->a->cond);
	pthread_mutex_unlock(&m->a->lock);
	return NULL;
}

static struct migration *migration_alloc(struct agent *a, bool incoming)
{
	struct migration *m = calloc(1, sizeof(*m));
	if (!m)
		return NULL;
	m->a = a;
	m->incoming = incoming;
	m->decision_fd = -1;
	pthread_mutex_init(&m->lock, NULL);
	m->info.incoming = incoming;
	m->info.state = MIG_SETUP; /* nothing queues yet (host admission is issue 4) */
	m->info.started_unix_ms = agent_unix_ms();
	snprintf(m->info.transport, sizeof(m->info.transport), "tcp");
	snprintf(m->info.compression, sizeof(m->info.compression), "none");
	return m;
}

static void migration_release(struct migration *m)
{
	xctl_free(m->ctl);
	for (unsigned i = 0; i < m->nr_history; i++)
		free(m->history[i]);
	free(m->history);
	sched_migration_free(m->sched);
	pthread_mutex_destroy(&m->lock);
	free(m);
}

/* Starts the job thread of a listed migration. */
static int migration_start(struct agent *a, struct migration *m, struct agent_error *err)
{
	char name[24];
	int r = pthread_create(&m->thread, NULL, job_thread, m);
	if (r) {
		pthread_mutex_lock(&a->lock);
		m->done = true;
		m->info.state = MIG_FAILED;
		pthread_mutex_unlock(&a->lock);
		return agent_err(err, -r, "internal", "cannot start migration thread: %s",
				 strerror(r));
	}
	m->thread_started = true;
	snprintf(name, sizeof(name), "mig-%llu", (unsigned long long)m->id);
	pthread_setname_np(m->thread, name);
	return 0;
}

static unsigned active(struct agent *a, bool incoming)
{
	unsigned n = 0;
	for (struct migration *m = a->migrations; m; m = m->next)
		if (m->incoming == incoming && !m->done)
			n++;
	return n;
}

void migration_request_init(struct migration_request *req)
{
	memset(req, 0, sizeof(*req));
	req->verify = -1;
	req->compress = -1;
	req->allow_postcopy = -1;
	req->postcopy_after_rounds = -2;
	req->timeout_action = -1;
	req->completion_timeout_per_gib = -1;
	req->progress_timeout = -1;
}

int agent_migration_create(struct agent *a, const struct migration_request *req,
			   uint64_t *ret_id, struct agent_error *err)
{
	const struct ferry_config_migration *d = &a->cfg.migration;
	char host[300];
	uint16_t port;

	if (ferry_config_parse_hostport(req->dest, host, sizeof(host), &port) < 0 || port == 0)
		return agent_err(err, -EINVAL, "invalid_argument",
				 "destination '%s' is not HOST:PORT", req->dest);
	if (req->streams > XPORT_MAX_STREAMS)
		return agent_err(err, -EINVAL, "invalid_argument", "streams must be 1..%u",
				 XPORT_MAX_STREAMS);
	if (req->downtime_ms > 60000)
		return agent_err(err, -EINVAL, "invalid_argument",
				 "downtime_ms must be 1..60000");
	if (req->transport == MIG_TRANSPORT_RDMA && !xport_rdma_usable(NULL, NULL, 0))
		return agent_err(err, -EOPNOTSUPP, "invalid_argument",
				 "transport rdma: no RDMA device on this agent; use tcp or auto");
	struct agent_vm *v = agent_vm_get(a, req->vm, err);
	if (!v)
		return -ENOENT;
	struct migration *m = migration_alloc(a, false);
	if (!m) {
		agent_vm_put(a, v);
		return agent_err(err, -ENOMEM, "internal", "out of memory");
	}
	m->req = *req;
	if (!m->req.downtime_ms)
		m->req.downtime_ms = d->downtime_ms;
	if (!m->req.bandwidth)
		m->req.bandwidth = d->bandwidth;
	if (!m->req.streams)
		m->req.streams = d->streams;
	m->info.verify = req->verify < 0 ? d->verify : req->verify != 0;
	m->info.downtime_target_ms = m->req.downtime_ms;
	m->info.priority = req->priority;
	m->info.bandwidth_cap_bps = (double)m->req.bandwidth * 8.0;
	{
		struct sched_policy pol;
		char perr[160];
		policy_for(m, &pol);
		if (sched_policy_check(&pol, perr, sizeof(perr)) < 0) {
			agent_vm_put(a, v);
			migration_release(m);
			return agent_err(err, -EINVAL, "invalid_argument", "policy: %s", perr);
		}
	}
	snprintf(m->info.vm, sizeof(m->info.vm), "%s", req->vm);
	snprintf(m->info.peer, sizeof(m->info.peer), "%s", req->dest);
	m->vm = v;

	int r = 0;
	pthread_mutex_lock(&a->lock);
	if (a->shutting_down)
		r = agent_err(err, -ESHUTDOWN, "unavailable", "the agent is shutting down");
	else if (v->migration_id)
		r = agent_err(err, -EBUSY, "conflict", "VM '%s' is already in migration %llu",
			      req->vm, (unsigned long long)v->migration_id);
	else if (a->cfg.limits.max_outgoing == 0)
		r = agent_err(err, -EBUSY, "busy",
			      "this agent refuses outgoing migrations (limits.max_outgoing is 0)");
	else if (vm_state(v->vm) == VM_FAILED)
		r = agent_err(err, -EIO, "conflict", "VM '%s' has failed", req->vm);
	if (r == 0) {
		/* Hold the VM and list the job under the same lock that checked them. */
		m->id = a->next_migration_id++;
		m->info.id = m->id;
		int q = sched_admission_enqueue(a->admission, m->id, SCHED_DIR_OUT,
						m->req.priority);
		if (q < 0) {
			r = agent_err(err, q, "internal", "admission: %s", strerror(-q));
		} else {
			/* Waits its turn in the job thread (limits.max_outgoing). */
			m->admitted = q == 1;
			m->info.state = m->admitted ? MIG_SETUP : MIG_QUEUED;
			v->migration_id = m->id;
			m->next = a->migrations;
			a->migrations = m;
		}
	}
	pthread_mutex_unlock(&a->lock);
	if (r < 0) {
		agent_vm_put(a, v);
		migration_release(m);
		return r;
	}
	r = migration_start(a, m, err);
	if (r < 0) {
		release_vm_hold(m);
		return r; /* stays listed as failed; freed with the agent */
	}
	*ret_id = m->id;
	return 0;
}

static struct migration *find(struct agent *a, uint64_t id)
{
	for (struct migration *m = a->migrations; m; m = m->next)
		if (m->id == id)
			return m;
	return NULL;
}

int agent_migration_info(struct agent *a, uint64_t id, struct migration_info *ret,
			 struct agent_error *err)
{
	pthread_mutex_lock(&a->lock);
	struct migration *m = find(a, id);
	if (m) {
		pthread_mutex_lock(&m->lock);
		*ret = m->info;
		pthread_mutex_unlock(&m->lock);
		if (ret->state == MIG_QUEUED && !m->incoming)
			ret->queue_position = sched_admission_position(a->admission, id);
	}
	pthread_mutex_unlock(&a->lock);
	if (!m)
		return agent_err(err, -ENOENT, "not_found", "no migration %llu",
				 (unsigned long long)id);
	return 0;
}

int agent_migration_list(struct agent *a, struct migration_info **ret, unsigned *ret_n,
			 struct agent_error *err)
{
	pthread_mutex_lock(&a->lock);
	unsigned n = 0;
	for (struct migration *m = a->migrations; m; m = m->next)
		n++;
	struct migration_info *out = calloc(n ? n : 1, sizeof(*out));
	unsigned i = n;
	for (struct migration *m = a->migrations; out && m; m = m->next) {
		pthread_mutex_lock(&m->lock);
		out[--i] = m->info; /* oldest first */
		pthread_mutex_unlock(&m->lock);
		if (out[i].state == MIG_QUEUED && !m->incoming)
			out[i].queue_position = sched_admission_position(a->admission, m->id);
	}
	pthread_mutex_unlock(&a->lock);
	if (!out)
		return agent_err(err, -ENOMEM, "internal", "out of memory");
	*ret = out;
	*ret_n = n;
	return 0;
}

static int request(struct agent *a, uint64_t id, bool cancel, struct agent_error *err)
{
	int r = 0;
	pthread_mutex_lock(&a->lock);
	struct migration *m = find(a, id);
	if (!m) {
		pthread_mutex_unlock(&a->lock);
		return agent_err(err, -ENOENT, "not_found", "no migration %llu",
				 (unsigned long long)id);
	}
	pthread_mutex_lock(&m->lock);
	if (state_final(m->info.state) || m->done)
		r = agent_err(err, -EALREADY, "conflict", "migration %llu already %s",
			      (unsigned long long)id, migration_state_name(m->info.state));
	else if (m->committed || m->info.state == MIG_COMMITTING ||
		 m->info.state == MIG_UNCERTAIN || m->info.state == MIG_DEST_READY ||
		 m->info.state == MIG_POSTCOPY)
		r = agent_err(err, -EBUSY, "conflict",
			      "migration %llu is committing; the destination decides now",
			      (unsigned long long)id);
	else if (cancel) {
		m->cancel = true;
		interrupt_locked(m);
		pthread_cond_broadcast(&a->cond); /* a queued job waits there */
	} else if (m->incoming)
		r = agent_err(err, -EINVAL, "invalid_argument",
			      "switch-over is requested on the source agent");
	else
		m->switchover = true;
	pthread_mutex_unlock(&m->lock);
	pthread_mutex_unlock(&a->lock);
	return r;
}

int agent_migration_cancel(struct agent *a, uint64_t id, struct agent_error *err)
{
	return request(a, id, true, err);
}

int agent_migration_switchover(struct agent *a, uint64_t id, struct agent_error *err)
{
	return request(a, id, false, err);
}

/* Reads exactly n bytes within the deadline (the first frame must not over-read: on a data
 * stream, page bytes follow it). */
static int read_exact(int fd, void *buf, size_t n, int timeout_ms)
{
	uint64_t deadline = agent_mono_ns() + (uint64_t)timeout_ms * 1000000ull;
	size_t got = 0;
	while (got < n) {
		uint64_t now = agent_mono_ns();
		if (now >= deadline)
			return -ETIMEDOUT;
		struct pollfd p = {.fd = fd, .events = POLLIN};
		int pr = poll(&p, 1, (int)((deadline - now) / 1000000ull) + 1);
		if (pr < 0 && errno != EINTR)
			return -errno;
		if (pr <= 0)
			continue;
		ssize_t r = recv(fd, (char *)buf + got, n - got, 0);
		if (r == 0)
			return -ECONNRESET;
		if (r < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			return -errno;
		}
		got += (size_t)r;
	}
	return 0;
}

struct conn_arg {
	struct agent *a;
	int fd;
};

static void answer_decision(struct agent *a, int fd, const void *p, size_t len)
{
	struct proto_decision_req dq;
	struct proto_decision d = {.decision = PROTO_DECIDED_UNKNOWN};
	char err[128];
	struct xctl *c = NULL;
	if (proto_decode_decision_req(p, len, &dq, err, sizeof(err)) < 0) {
		agent_log(a, LOG_WARN, "listener: bad DECISION_REQ: %s", err);
		close(fd);
		return;
	}
	d.migration_id = dq.migration_id;
	/* A live incoming migration for that id settles now: not decided yet = NOT_RUN. */
	pthread_mutex_lock(&a->lock);
	for (struct migration *m = a->migrations; m; m = m->next) {
		if (m->incoming && m->remote_id == dq.migration_id &&
		    memcmp(m->token, dq.token, PROTO_TOKEN_LEN) == 0) {
			d.decision = decide(m, PROTO_DECIDED_NOT_RUN);
			if (d.decision == PROTO_DECIDED_NOT_RUN) {
				pthread_mutex_lock(&m->lock);
				m->cancel = true;
				interrupt_locked(m);
				pthread_mutex_unlock(&m->lock);
			}
		}
	}
	struct decision_rec *recs = a->decisions;
	for (unsigned i = 0; recs && i < DECISIONS_KEPT && d.decision == PROTO_DECIDED_UNKNOWN;
	     i++)
		if (recs[i].remote_id == dq.migration_id &&
		    memcmp(recs[i].token, dq.token, PROTO_TOKEN_LEN) == 0)
			d.decision = recs[i].decision;
	pthread_mutex_unlock(&a->lock);
	if (d.decision == PROTO_DECIDED_UNKNOWN) {
		char path[PATH_MAX + 96];
		decision_path(a, dq.migration_id, dq.token, path, sizeof(path));
		if (decision_file_says_run(path))
			d.decision = PROTO_DECIDED_RUN;
	}
	agent_log(a, LOG_INFO, "decision asked for migration %llu: %s",
		  (unsigned long long)dq.migration_id,
		  d.decision == PROTO_DECIDED_RUN       ? "run"
		  : d.decision == PROTO_DECIDED_NOT_RUN ? "not run"
							: "unknown");
	void *buf = NULL;
	size_t blen = 0;
	if (xctl_from_fd(fd, &c) < 0) {
		close(fd);
		return;
	}
	if (proto_encode_decision(&d, &buf, &blen) == 0)
		xctl_send(c, PROTO_DECISION, buf, blen);
	free(buf);
	xctl_free(c);
}

static void incoming_hello(struct agent *a, int fd, const void *p, size_t len)
{
	char err[160];
	struct migration *m = migration_alloc(a, true);
	struct agent_error aerr = {0};
	if (!m) {
		close(fd);
		return;
	}
	if (xctl_from_fd(fd, &m->ctl) < 0) {
		close(fd);
		migration_release(m);
		return;
	}
	snprintf(m->info.peer, sizeof(m->info.peer), "%s", xctl_peer(m->ctl));
	int r = proto_decode_hello(p, len, &m->hello, err, sizeof(err));
	uint32_t code = 0;
	if (r < 0) {
		code = PROTO_E_PROTOCOL;
	} else if (m->hello.min_version > PROTO_VERSION ||
		   m->hello.max_version < PROTO_MIN_VERSION) {
		code = PROTO_E_VERSION;
		snprintf(err, sizeof(err),
			 "no common protocol version (we speak %u..%u, peer %u..%u)",
			 PROTO_MIN_VERSION, PROTO_VERSION, m->hello.min_version,
			 m->hello.max_version);
	} else if (getrandom(m->token, sizeof(m->token), 0) != (ssize_t)sizeof(m->token)) {
		code = PROTO_E_INTERNAL;
		snprintf(err, sizeof(err), "no randomness for the stream token");
	}
	pthread_mutex_lock(&a->lock);
	if (!code && a->shutting_down) {
		code = PROTO_E_SHUTDOWN;
		snprintf(err, sizeof(err), "agent %s is shutting down", a->cfg.name);
	} else if (!code && a->cfg.limits.max_incoming == 0) {
		/* Not "busy": retrying would not help. */
		code = PROTO_E_INTERNAL;
		snprintf(err, sizeof(err),
			 "agent %s takes no incoming migrations (limits.max_incoming is 0)",
			 a->cfg.name);
	} else if (!code && active(a, true) >= a->cfg.limits.max_incoming) {
		/* The source waits and asks again (its record shows it queued). */
		code = PROTO_E_BUSY;
		snprintf(err, sizeof(err), "agent %s is at its limit of %u incoming migrations",
			 a->cfg.name, a->cfg.limits.max_incoming);
	}
	pthread_mutex_unlock(&a->lock);
	if (code) {
		agent_log(a, LOG_WARN, "refusing migration from %s: %s", xctl_peer(m->ctl), err);
		dest_refuse(m, code, "%s", err);
		migration_release(m);
		return;
	}
	m->remote_id = m->hello.migration_id;
	m->info.verify = (m->hello.caps & PROTO_CAP_VERIFY) != 0;
	pthread_mutex_lock(&a->lock);
	m->id = a->next_migration_id++;
	m->info.id = m->id;
	m->next = a->migrations;
	a->migrations = m;
	pthread_mutex_unlock(&a->lock);
	if (migration_start(a, m, &aerr) < 0)
		agent_log(a, LOG_ERROR, "incoming migration: %s", aerr.message);
}

static void incoming_stream(struct agent *a, int fd, const void *p, size_t len)
{
	struct proto_stream_hello sh;
	char err[128];
	int r = -ENOENT;
	if (proto_decode_stream_hello(p, len, &sh, err, sizeof(err)) < 0) {
		agent_log(a, LOG_WARN, "listener: bad STREAM_HELLO: %s", err);
		close(fd);
		return;
	}
	pthread_mutex_lock(&a->lock);
	for (struct migration *m = a->migrations; m; m = m->next) {
		if (m->incoming && !m->done && m->dst &&
		    memcmp(m->token, sh.token, PROTO_TOKEN_LEN) == 0) {
			r = xport_dst_add_stream(m->dst, fd, sh.stream);
			break;
		}
	}
	pthread_mutex_unlock(&a->lock);
	if (r < 0) {
		agent_log(a, LOG_WARN, "listener: data stream %u with an unknown token or refused: %s",
			  sh.stream, strerror(-r));
		close(fd);
	}
}

static void *conn_thread(void *arg)
{
	struct conn_arg *ca = arg;
	struct agent *a = ca->a;
	int fd = ca->fd;
	free(ca);
	uint8_t hdr[PROTO_HDR_LEN];
	struct proto_hdr h;
	void *payload = NULL;
	int r = read_exact(fd, hdr, sizeof(hdr), FIRST_FRAME_TIMEOUT_MS);
	if (r == 0)
		r = proto_hdr_decode(hdr, PROTO_MAX_CTRL_PAYLOAD, &h);
	if (r == 0 && h.type != PROTO_HELLO && h.type != PROTO_STREAM_HELLO &&
	    h.type != PROTO_DECISION_REQ)
		r = -EPROTO;
	if (r == 0 && h.len) {
		payload = malloc(h.len);
		r = payload ? read_exact(fd, payload, h.len, FIRST_FRAME_TIMEOUT_MS) : -ENOMEM;
	}
	if (r < 0) {
		agent_log(a, LOG_WARN, "listener: dropping a connection: %s",
			  r == -EPROTO || r == -EBADMSG ? "not a ferry peer (bad first frame)"
							: strerror(-r));
		free(payload);
		close(fd);
		return NULL;
	}
	if (h.type == PROTO_HELLO)
		incoming_hello(a, fd, payload, h.len);
	else if (h.type == PROTO_STREAM_HELLO)
		incoming_stream(a, fd, payload, h.len);
	else
		answer_decision(a, fd, payload, h.len);
	free(payload);
	return NULL;
}

int migration_listener_dispatch(struct agent *a, int fd)
{
	pthread_attr_t attr;
	pthread_t t;
	struct conn_arg *ca = malloc(sizeof(*ca));
	if (!ca) {
		close(fd);
		return -ENOMEM;
	}
	ca->a = a;
	ca->fd = fd;
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	int r = pthread_create(&t, &attr, conn_thread, ca);
	pthread_attr_destroy(&attr);
	if (r) {
		free(ca);
		close(fd);
		return -r;
	}
	pthread_setname_np(t, "accept");
	return 0;
}

void migration_shutdown_all(struct agent *a)
{
	pthread_mutex_lock(&a->lock);
	for (struct migration *m = a->migrations; m; m = m->next) {
		pthread_mutex_lock(&m->lock);
		if (!m->committed && !m->done && m->decision == PROTO_DECIDED_UNKNOWN) {
			m->cancel = true;
			interrupt_locked(m);
		}
		pthread_mutex_unlock(&m->lock);
	}
	pthread_cond_broadcast(&a->cond); /* queued jobs wait there */
	/* Wait for every job; committing ones finish by themselves (bounded timeouts). */
	for (;;) {
		bool busy = false;
		for (struct migration *m = a->migrations; m; m = m->next)
			busy |= !m->done;
		if (!busy)
			break;
		pthread_cond_wait(&a->cond, &a->lock);
	}
	pthread_mutex_unlock(&a->lock);
}

void migration_free_all(struct agent *a)
{
	pthread_mutex_lock(&a->lock);
	struct migration *m = a->migrations;
	a->migrations = NULL;
	pthread_mutex_unlock(&a->lock);
	while (m) {
		struct migration *next = m->next;
		if (m->thread_started)
			pthread_join(m->thread, NULL);
		migration_release(m);
		m = next;
	}
	free(a->decisions);
	a->decisions = NULL;
	sched_admission_free(a->admission);
	a->admission = NULL;
}

int agent_migration_history(struct agent *a, uint64_t id, char **ret_json,
			    struct agent_error *err)
{
	pthread_mutex_lock(&a->lock);
	struct migration *m = find(a, id);
	char *out = NULL;
	if (m) {
		pthread_mutex_lock(&m->lock);
		size_t len = 3;
		for (unsigned i = 0; i < m->nr_history; i++)
			len += strlen(m->history[i]) + 1;
		out = malloc(len);
		if (out) {
			char *p = out;
			*p++ = '[';
			for (unsigned i = 0; i < m->nr_history; i++) {
				if (i)
					*p++ = ',';
				size_t l = strlen(m->history[i]);
				memcpy(p, m->history[i], l);
				p += l;
			}
			*p++ = ']';
			*p = '\0';
		}
		pthread_mutex_unlock(&m->lock);
	}
	pthread_mutex_unlock(&a->lock);
	if (!m)
		return agent_err(err, -ENOENT, "not_found", "no migration %llu",
				 (unsigned long long)id);
	if (!out)
		return agent_err(err, -ENOMEM, "internal", "out of memory");
	*ret_json = out;
	return 0;
}

struct evac_vm {
	char name[VM_NAME_MAX];
	uint64_t mem;
};

static int evac_cmp(const void *x, const void *y)
{
	const struct evac_vm *a = x, *b = y;
	if (a->mem != b->mem)
		return a->mem < b->mem ? 1 : -1;
	return strcmp(a->name, b->name);
}

int agent_evacuate(struct agent *a, const char (*dests)[AGENT_HOSTPORT_MAX], unsigned nr_dests,
		   const char (*only)[VM_NAME_MAX], unsigned nr_only,
		   const struct migration_request *tmpl, struct evacuation_item **ret,
		   unsigned *ret_n, struct agent_error *err)
{
	if (!nr_dests)
		return agent_err(err, -EINVAL, "invalid_argument", "no destination given");
	for (unsigned i = 0; i < nr_only; i++) {
		struct agent_vm *v = agent_vm_get(a, only[i], err);
		if (!v)
			return -ENOENT;
		agent_vm_put(a, v);
	}
	struct agent_vm_info *vms = NULL;
	unsigned n = 0;
	int r = agent_vm_list(a, &vms, &n, err);
	if (r < 0)
		return r;
	struct evac_vm *order = calloc(n ? n : 1, sizeof(*order));
	struct evacuation_item *items = calloc(n ? n : 1, sizeof(*items));
	if (!order || !items) {
		free(vms);
		free(order);
		free(items);
		return agent_err(err, -ENOMEM, "internal", "out of memory");
	}
	unsigned k = 0;
	for (unsigned i = 0; i < n; i++) {
		if (vms[i].migration_id)
			continue; /* already on its way (in or out) */
		bool wanted = nr_only == 0;
		for (unsigned j = 0; j < nr_only && !wanted; j++)
			wanted = strcmp(only[j], vms[i].name) == 0;
		if (!wanted)
			continue;
		snprintf(order[k].name, sizeof(order[k].name), "%s", vms[i].name);
		order[k].mem = vms[i].mem_size;
		k++;
	}
	free(vms);
	/* Largest first, so the long ones start early; then round-robin over the targets. */
	qsort(order, k, sizeof(*order), evac_cmp);
	for (unsigned i = 0; i < k; i++) {
		struct migration_request q = *tmpl;
		snprintf(q.vm, sizeof(q.vm), "%s", order[i].name);
		snprintf(q.dest, sizeof(q.dest), "%s", dests[i % nr_dests]);
		snprintf(items[i].vm, sizeof(items[i].vm), "%s", q.vm);
		snprintf(items[i].dest, sizeof(items[i].dest), "%s", q.dest);
		struct agent_error e = {0};
		uint64_t id = 0;
		if (agent_migration_create(a, &q, &id, &e) < 0)
			snprintf(items[i].error, sizeof(items[i].error), "%s", e.message);
		else
			items[i].migration_id = id;
	}
	free(order);
	agent_event(a, "host.evacuate", "\"vms\":%u,\"destinations\":%u", k, nr_dests);
	*ret = items;
	*ret_n = k;
	return 0;
}
