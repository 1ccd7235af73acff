// SPDX-License-Identifier: Apache-2.0
/*
 * The agent-to-agent protocol codec, versions 1 and 2 (proto.h; docs/protocol.md is the spec).
 * Every message has one encoder and one decoder over transport/wire.c, and one check
 * function that both share: the decoder runs it on what it read (and fails with -EBADMSG and
 * a reason), the encoder on what it was given (and fails with -EINVAL), so an agent can
 * never send what its peer would reject. Decoders build the message in a zeroed local and
 * copy it out only when every check passed, which keeps *m untouched on failure and fully
 * defined (padding included) on success; the fuzz target relies on the latter to compare
 * messages with memcmp. The encoding is canonical: every valid payload is exactly what the
 * encoder makes of the message it decodes to (no trailing bytes, one string form, no stray
 * mask bits).
 */
#include "transport/proto.h"

#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <zstd.h>

#include "transport/wire.h"

#define PAGE_SIZE_V1 4096u
#define KNOWN_CAPS (PROTO_CAP_TCP | PROTO_CAP_RDMA | PROTO_CAP_ZSTD | PROTO_CAP_VERIFY)
#define MAX_VCPUS 1024u
/* Largest blob a STATE may carry: it and its 12 header bytes fit a control frame, with slack. */
#define STATE_BLOB_MAX (PROTO_MAX_CTRL_PAYLOAD - 16u)
/*
 * A PAGES frame's pages must have byte addresses that fit 64 bits: first_page + npages <=
 * 2^52. Receivers compute first_page * 4096; bounding it here means no receiver can be
 * fooled by a wrapped multiplication even before it checks against its region's size.
 */
#define PAGE_NR_LIMIT (UINT64_C(1) << 52)

/* ---------------- names ---------------- */

const char *proto_type_name(uint16_t type)
{
	switch (type) {
	case PROTO_HELLO: return "hello";
	case PROTO_WELCOME: return "welcome";
	case PROTO_REFUSE: return "refuse";
	case PROTO_VM_OFFER: return "vm_offer";
	case PROTO_VM_ACCEPT: return "vm_accept";
	case PROTO_ROUND_END: return "round_end";
	case PROTO_STATE: return "state";
	case PROTO_COMMIT_REQ: return "commit_req";
	case PROTO_COMMITTED: return "committed";
	case PROTO_ABORT: return "abort";
	case PROTO_DECISION_REQ: return "decision_req";
	case PROTO_DECISION: return "decision";
	case PROTO_STREAM_HELLO: return "stream_hello";
	case PROTO_PAGES: return "pages";
	case PROTO_FENCE: return "fence";
	case PROTO_PAGES_ZSTD: return "pages_zstd";
	case PROTO_POSTCOPY_START: return "postcopy_start";
	case PROTO_POSTCOPY_RUNNING: return "postcopy_running";
	case PROTO_PAGE_REQ: return "page_req";
	case PROTO_POSTCOPY_END: return "postcopy_end";
	case PROTO_POSTCOPY_DONE: return "postcopy_done";
	}
	return "unknown";
}

static const char *const code_names[] = {
	[PROTO_E_VERSION] = "version",	 [PROTO_E_BUSY] = "busy",
	[PROTO_E_NOMEM] = "nomem",	 [PROTO_E_SHAPE] = "shape",
	[PROTO_E_EXISTS] = "exists",	 [PROTO_E_VERIFY] = "verify",
	[PROTO_E_STATE] = "state",	 [PROTO_E_CANCELED] = "canceled",
	[PROTO_E_PROTOCOL] = "protocol", [PROTO_E_INTERNAL] = "internal",
	[PROTO_E_SHUTDOWN] = "shutdown",
};

const char *proto_code_name(uint32_t code)
{
	if (code < sizeof(code_names) / sizeof(code_names[0]) && code_names[code])
		return code_names[code];
	return "unknown";
}

/* ---------------- helpers ---------------- */

static int fail(char *err, size_t errlen, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static int fail(char *err, size_t errlen, const char *fmt, ...)
{
	if (err && errlen) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(err, errlen, fmt, ap);
		va_end(ap);
	}
	return -EBADMSG;
}

/* The end of every decoder: the reader ran past the end, or bytes were left over. */
static int finish(const struct wire_reader *r, const char *what, char *err, size_t errlen)
{
	if (r->err)
		return fail(err, errlen, "%s: truncated (%zu bytes)", what, r->len);
	if (wire_remaining(r))
		return fail(err, errlen, "%s: %zu trailing bytes", what, wire_remaining(r));
	return 0;
}

/*
 * Reads a string (u16 length + bytes) into dst[size]. Only the framing is checked here:
 * the length fits (size - 1, leaving room for the NUL we add) and there is no NUL inside,
 * which would make the C string differ from what was sent. Content rules belong to the
 * message's check function, which the encoder shares.
 */
static int get_str(struct wire_reader *r, char *dst, size_t size, const char *what, char *err,
		   size_t errlen)
{
	uint16_t n = wire_get_u16(r);
	if (r->err)
		return fail(err, errlen, "%s: truncated before its length", what);
	if (n > size - 1)
		return fail(err, errlen, "%s: %u bytes, at most %zu", what, n, size - 1);
	const char *s = wire_get_view(r, n);
	if (!s)
		return fail(err, errlen, "%s: truncated (%u bytes announced)", what, n);
	if (memchr(s, 0, n))
		return fail(err, errlen, "%s: contains a NUL byte", what);
	memcpy(dst, s, n);
	dst[n] = 0;
	return 0;
}

/* Called only after the check function proved s terminated within its field. */
static void put_str(struct wire_writer *w, const char *s)
{
	size_t n = strlen(s);
	wire_put_u16(w, (uint16_t)n);
	wire_put_bytes(w, s, n);
}

/* Names are printable ASCII: they end up in logs, metrics labels and the API. */
static int check_name(const char *s, size_t size, bool nonempty, const char *what, char *err,
		      size_t errlen)
{
	size_t n = strnlen(s, size);
	if (n == size)
		return fail(err, errlen, "%s: not terminated within %zu bytes", what, size);
	if (nonempty && n == 0)
		return fail(err, errlen, "%s: empty", what);
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];
		if (c < 0x20 || c > 0x7e)
			return fail(err, errlen, "%s: byte 0x%02x at %zu is not printable ASCII",
				    what, c, i);
	}
	return 0;
}

static bool vm_name_char(unsigned char c)
{
	return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
	       c == '_' || c == '.' || c == '-';
}

/* A VM's name becomes a resource name on the destination: [A-Za-z0-9_.-]{1,63}. */
static int check_vm_name(const char *s, size_t size, const char *what, char *err, size_t errlen)
{
	size_t n = strnlen(s, size);
	if (n == size)
		return fail(err, errlen, "%s: not terminated within %zu bytes", what, size);
	if (n == 0 || n > PROTO_VM_NAME_MAX)
		return fail(err, errlen, "%s: %zu characters, want 1..%u", what, n,
			    PROTO_VM_NAME_MAX);
	for (size_t i = 0; i < n; i++)
		if (!vm_name_char((unsigned char)s[i]))
			return fail(err, errlen, "%s: byte 0x%02x at %zu not in [A-Za-z0-9_.-]",
				    what, (unsigned char)s[i], i);
	return 0;
}

/*
 * Returns the offset of the first byte that makes s[0..n) ill-formed UTF-8 (overlong forms,
 * surrogates and code points past U+10FFFF included), or n if it is well-formed. NUL is
 * refused too: the message is a C string on both ends.
 */
static size_t utf8_bad_at(const unsigned char *s, size_t n)
{
	size_t i = 0;
	while (i < n) {
		unsigned c = s[i], k;
		uint32_t cp, min;
		if (c == 0)
			return i;
		if (c < 0x80) {
			i++;
			continue;
		}
		if ((c & 0xe0) == 0xc0) {
			k = 1, cp = c & 0x1f, min = 0x80;
		} else if ((c & 0xf0) == 0xe0) {
			k = 2, cp = c & 0x0f, min = 0x800;
		} else if ((c & 0xf8) == 0xf0) {
			k = 3, cp = c & 0x07, min = 0x10000;
		} else {
			return i;
		}
		if (n - i - 1 < k)
			return i;
		for (unsigned j = 1; j <= k; j++) {
			if ((s[i + j] & 0xc0) != 0x80)
				return i;
			cp = cp << 6 | (s[i + j] & 0x3f);
		}
		if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
			return i;
		i += k + 1;
	}
	return n;
}

static int check_msg(const char *s, size_t size, const char *what, char *err, size_t errlen)
{
	size_t n = strnlen(s, size);
	if (n == size)
		return fail(err, errlen, "%s: not terminated within %zu bytes", what, size);
	size_t bad = utf8_bad_at((const unsigned char *)s, n);
	if (bad != n)
		return fail(err, errlen, "%s: not valid UTF-8 at byte %zu", what, bad);
	return 0;
}

static int check_caps(uint32_t caps, const char *what, char *err, size_t errlen)
{
	if (caps & ~KNOWN_CAPS)
		return fail(err, errlen, "%s: unknown capability bits 0x%" PRIx32, what,
			    caps & ~KNOWN_CAPS);
	return 0;
}

/* Encoders share the decoders' checks; a failed check there is the caller's bug. */
#define ENCODE_CHECK(expr)                  \
	do {                                \
		if ((expr) < 0)             \
			return -EINVAL;     \
	} while (0)

/* ---------------- header ---------------- */

static void st16(uint8_t *p, uint16_t v)
{
	v = htole16(v);
	memcpy(p, &v, 2);
}

static void st32(uint8_t *p, uint32_t v)
{
	v = htole32(v);
	memcpy(p, &v, 4);
}

static void st64(uint8_t *p, uint64_t v)
{
	v = htole64(v);
	memcpy(p, &v, 8);
}

void proto_hdr_encode(uint8_t out[PROTO_HDR_LEN], uint16_t type, uint32_t len)
{
	/* Fixed size into the caller's buffer: no writer (and no allocation) per frame. */
	st32(out, PROTO_MAGIC);
	st16(out + 4, type);
	st16(out + 6, 0);
	st32(out + 8, len);
}

int proto_hdr_decode(const uint8_t in[PROTO_HDR_LEN], uint32_t max_payload,
		     struct proto_hdr *ret)
{
	struct wire_reader r;
	struct proto_hdr h;

	wire_reader_init(&r, in, PROTO_HDR_LEN);
	h.magic = wire_get_u32(&r);
	h.type = wire_get_u16(&r);
	h.flags = wire_get_u16(&r);
	h.len = wire_get_u32(&r);
	if (h.magic != PROTO_MAGIC)
		return -EBADMSG;
	if (!strcmp(proto_type_name(h.type), "unknown"))
		return -EBADMSG;
	/* No flag is defined in v1; a set one means a peer speaking something else. */
	if (h.flags)
		return -EBADMSG;
	if (h.len > max_payload || h.len > PROTO_MAX_PAYLOAD)
		return -EBADMSG;
	*ret = h;
	return 0;
}

/* ---------------- HELLO ---------------- */

static int check_hello(const struct proto_hello *m, char *err, size_t errlen)
{
	if (m->min_version < 1 || m->min_version > m->max_version)
		return fail(err, errlen, "hello: version range %" PRIu32 "..%" PRIu32 " is empty",
			    m->min_version, m->max_version);
	int rc = check_name(m->agent, sizeof(m->agent), true, "hello: agent", err, errlen);
	if (rc)
		return rc;
	rc = check_caps(m->caps, "hello", err, errlen);
	if (rc)
		return rc;
	if ((m->caps & PROTO_CAP_ZSTD) && m->max_version < PROTO_ZSTD_MIN_VERSION)
		return fail(err, errlen, "hello: ZSTD offered with versions up to %" PRIu32
			    " (it needs %u)", m->max_version, PROTO_ZSTD_MIN_VERSION);
	if (m->page_size != PAGE_SIZE_V1)
		return fail(err, errlen, "hello: page_size %" PRIu32 ", only %u is supported",
			    m->page_size, PAGE_SIZE_V1);
	if (m->streams < 1 || m->streams > PROTO_MAX_STREAMS)
		return fail(err, errlen, "hello: %" PRIu32 " streams, want 1..%u", m->streams,
			    PROTO_MAX_STREAMS);
	return 0;
}

int proto_encode_hello(const struct proto_hello *m, void **ret, size_t *ret_len)
{
	struct wire_writer w;

	ENCODE_CHECK(check_hello(m, NULL, 0));
	wire_writer_init(&w);
	wire_put_u32(&w, m->min_version);
	wire_put_u32(&w, m->max_version);
	put_str(&w, m->agent);
	wire_put_u64(&w, m->migration_id);
	wire_put_u32(&w, m->caps);
	wire_put_u32(&w, m->page_size);
	wire_put_u32(&w, m->streams);
	return wire_writer_take(&w, ret, ret_len);
}

int proto_decode_hello(const void *p, size_t len, struct proto_hello *m, char *err, size_t errlen)
{
	struct wire_reader r;
	struct proto_hello h;
	int rc;

	memset(&h, 0, sizeof(h));
	wire_reader_init(&r, p, len);
	h.min_version = wire_get_u32(&r);
	h.max_version = wire_get_u32(&r);
	rc = get_str(&r, h.agent, sizeof(h.agent), "hello: agent", err, errlen);
	if (rc)
		return rc;
	h.migration_id = wire_get_u64(&r);
	h.caps = wire_get_u32(&r);
	h.page_size = wire_get_u32(&r);
	h.streams = wire_get_u32(&r);
	rc = finish(&r, "hello", err, errlen);
	if (!rc)
		rc = check_hello(&h, err, errlen);
	if (rc)
		return rc;
	memcpy(m, &h, sizeof(h));
	return 0;
}

/* ---------------- WELCOME ---------------- */

static int check_welcome(const struct proto_welcome *m, char *err, size_t errlen)
{
	/* The chosen version: one this codec speaks. */
	if (m->version < PROTO_MIN_VERSION || m->version > PROTO_VERSION)
		return fail(err, errlen, "welcome: version %" PRIu32 ", want %u..%u", m->version,
			    PROTO_MIN_VERSION, PROTO_VERSION);
	int rc = check_caps(m->caps, "welcome", err, errlen);
	if (rc)
		return rc;
	if ((m->caps & PROTO_CAP_ZSTD) && m->version < PROTO_ZSTD_MIN_VERSION)
		return fail(err, errlen, "welcome: ZSTD chosen with version %" PRIu32
			    " (it needs %u)", m->version, PROTO_ZSTD_MIN_VERSION);
	return check_name(m->agent, sizeof(m->agent), true, "welcome: agent", err, errlen);
}

int proto_encode_welcome(const struct proto_welcome *m, void **ret, size_t *ret_len)
{
	struct wire_writer w;

	ENCODE_CHECK(check_welcome(m, NULL, 0));
	wire_writer_init(&w);
	wire_put_u32(&w, m->version);
	wire_put_u32(&w, m->caps);
	put_str(&w, m->agent);
	wire_put_bytes(&w, m->token, PROTO_TOKEN_LEN);
	return wire_writer_take(&w, ret, ret_len);
}

int proto_decode_welcome(const void *p, size_t len, struct proto_welcome *m, char *err,
			 size_t errlen)
{
	struct wire_reader r;
	struct proto_welcome h;
	int rc;

	memset(&h, 0, sizeof(h));
	wire_reader_init(&r, p, len);
	h.version = wire_get_u32(&r);
	h.caps = wire_get_u32(&r);
	rc = get_str(&r, h.agent, sizeof(h.agent), "welcome: agent", err, errlen);
	if (rc)
		return rc;
	wire_get_bytes(&r, h.token, PROTO_TOKEN_LEN);
	rc = finish(&r, "welcome", err, errlen);
	if (!rc)
		rc = check_welcome(&h, err, errlen);
	if (rc)
		return rc;
	memcpy(m, &h, sizeof(h));
	return 0;
}

/* ---------------- REFUSE / ABORT ---------------- */

static int check_refuse(const struct proto_refuse *m, char *err, size_t errlen)
{
	if (m->code < PROTO_E_VERSION || m->code > PROTO_E_SHUTDOWN)
		return fail(err, errlen, "refuse: unknown code %" PRIu32, m->code);
	return check_msg(m->message, sizeof(m->message), "refuse: message", err, errlen);
}

int proto_encode_refuse(const struct proto_refuse *m, void **ret, size_t *ret_len)
{
	struct wire_writer w;

	ENCODE_CHECK(check_refuse(m, NULL, 0));
	wire_writer_init(&w);
	wire_put_u32(&w, m->code);
	put_str(&w, m->message);
	return wire_writer_take(&w, ret, ret_len);
}

int proto_decode_refuse(const void *p, size_t len, struct proto_refuse *m, char *err,
			size_t errlen)
{
	struct wire_reader r;
	struct proto_refuse h;
	int rc;

	memset(&h, 0, sizeof(h));
	wire_reader_init(&r, p, len);
	h.code = wire_get_u32(&r);
	rc = get_str(&r, h.message, sizeof(h.message), "refuse: message", err, errlen);
	if (rc)
		return rc;
	rc = finish(&r, "refuse", err, errlen);
	if (!rc)
		rc = check_refuse(&h, err, errlen);
	if (rc)
		return rc;
	memcpy(m, &h, sizeof(h));
	return 0;
}

/* ---------------- VM_OFFER ---------------- */

static int check_vm_offer(const struct proto_vm_offer *m, char *err, size_t errlen)
{
	int rc = check_vm_name(m->name, sizeof(m->name), "vm_offer: name", err, errlen);
	if (rc)
		return rc;
	rc = check_name(m->guest, sizeof(m->guest), false, "vm_offer: guest", err, errlen);
	if (rc)
		return rc;
	if (m->mem_size == 0 || m->mem_size % PAGE_SIZE_V1)
		return fail(err, errlen,
			    "vm_offer: mem_size %" PRIu64 " is not a positive multiple of %u",
			    m->mem_size, PAGE_SIZE_V1);
	if (m->vcpus < 1 || m->vcpus > MAX_VCPUS)
		return fail(err, errlen, "vm_offer: %" PRIu32 " vcpus, want 1..%u", m->vcpus,
			    MAX_VCPUS);
	if (m->irqchip > 1)
		return fail(err, errlen, "vm_offer: irqchip %" PRIu32 ", want 0 or 1", m->irqchip);
	if (m->nr_slots < 1 || m->nr_slots > PROTO_MAX_SLOTS)
		return fail(err, errlen, "vm_offer: %" PRIu32 " slots, want 1..%u", m->nr_slots,
			    PROTO_MAX_SLOTS);
	/*
	 * The slots tile [0, mem_size) in order. Contiguity implies no overlap; comparing each
	 * size against what is left of mem_size (never adding first) keeps the sum from wrapping.
	 */
	uint64_t next = 0;
	for (uint32_t i = 0; i < m->nr_slots; i++) {
		const struct proto_slot *s = &m->slots[i];
		if (s->size == 0 || s->size % PAGE_SIZE_V1)
			return fail(err, errlen,
				    "vm_offer: slot %" PRIu32 " size %" PRIu64
				    " is not a positive multiple of %u",
				    i, s->size, PAGE_SIZE_V1);
		if (s->gpa != next)
			return fail(err, errlen,
				    "vm_offer: slot %" PRIu32 " at gpa 0x%" PRIx64
				    ", want 0x%" PRIx64 " (slots are contiguous from 0)",
				    i, s->gpa, next);
		if (s->size > m->mem_size - next)
			return fail(err, errlen,
				    "vm_offer: slot %" PRIu32 " ends past mem_size 0x%" PRIx64, i,
				    m->mem_size);
		next += s->size;
	}
	if (next != m->mem_size)
		return fail(err, errlen,
			    "vm_offer: slots cover 0x%" PRIx64 " bytes, mem_size 0x%" PRIx64, next,
			    m->mem_size);
	return 0;
}

int proto_encode_vm_offer(const struct proto_vm_offer *m, void **ret, size_t *ret_len)
{
	struct wire_writer w;

	ENCODE_CHECK(check_vm_offer(m, NULL, 0));
	wire_writer_init(&w);
	put_str(&w, m->name);
	put_str(&w, m->guest);
	wire_put_u64(&w, m->mem_size);
	wire_put_u32(&w, m->vcpus);
	wire_put_u32(&w, m->irqchip);
	wire_put_u32(&w, m->nr_slots);
	for (uint32_t i = 0; i < m->nr_slots; i++) {
		wire_put_u64(&w, m->slots[i].gpa);
		wire_put_u64(&w, m->slots[i].size);
	}
	return wire_writer_take(&w, ret, ret_len);
}

int proto_decode_vm_offer(const void *p, size_t len, struct proto_vm_offer *m, char *err,
			  size_t errlen)
{
	struct wire_reader r;
	struct proto_vm_offer h;
	int rc;

	memset(&h, 0, sizeof(h));
	wire_reader_init(&r, p, len);
	rc = get_str(&r, h.name, sizeof(h.name), "vm_offer: name", err, errlen);
	if (!rc)
		rc = get_str(&r, h.guest, sizeof(h.guest), "vm_offer: guest", err, errlen);
	if (rc)
		return rc;
	h.mem_size = wire_get_u64(&r);
	h.vcpus = wire_get_u32(&r);
	h.irqchip = wire_get_u32(&r);
	h.nr_slots = wire_get_u32(&r);
	/* The count sizes a fixed array: bound it before reading a single item. */
	if (!r.err && h.nr_slots > PROTO_MAX_SLOTS)
		return fail(err, errlen, "vm_offer: %" PRIu32 " slots, at most %u", h.nr_slots,
			    PROTO_MAX_SLOTS);
	for (uint32_t i = 0; i < h.nr_slots && !r.err; i++) {
		h.slots[i].gpa = wire_get_u64(&r);
		h.slots[i].size = wire_get_u64(&r);
	}
	rc = finish(&r, "vm_offer", err, errlen);
	if (!rc)
		rc = check_vm_offer(&h, err, errlen);
	if (rc)
		return rc;
	memcpy(m, &h, sizeof(h));
	return 0;
}

/* ---------------- ROUND_END ---------------- */

int proto_encode_round_end(const struct proto_round_end *m, void **ret, size_t *ret_len)
{
	struct wire_writer w;

	wire_writer_init(&w);
	wire_put_u32(&w, m->round);
	wire_put_u64(&w, m->fence);
	wire_put_u64(&w, m->pages);
	wire_put_u64(&w, m->remaining);
	return wire_writer_take(&w, ret, ret_len);
}

int proto_decode_round_end(const void *p, size_t len, struct proto_round_end *m, char *err,
			   size_t errlen)
{
	struct wire_reader r;
	struct proto_round_end h;
	int rc;

	memset(&h, 0, sizeof(h));
	wire_reader_init(&r, p, len);
	h.round = wire_get_u32(&r);
	h.fence = wire_get_u64(&r);
	h.pages = wire_get_u64(&r);
	h.remaining = wire_get_u64(&r);
	rc = finish(&r, "round_end", err, errlen);
	if (rc)
		return rc;
	memcpy(m, &h, sizeof(h));
	return 0;
}

/* ---------------- STATE ---------------- */

static int check_state(const struct proto_state *m, char *err, size_t errlen)
{
	if (m->blob_len < 1 || m->blob_len > STATE_BLOB_MAX)
		return fail(err, errlen, "state: blob of %" PRIu32 " bytes, want 1..%u",
			    m->blob_len, STATE_BLOB_MAX);
	if (!m->blob)
		return fail(err, errlen, "state: no blob");
	return 0;
}

int proto_encode_state(const struct proto_state *m, void **ret, size_t *ret_len)
{
	struct wire_writer w;

	ENCODE_CHECK(check_state(m, NULL, 0));
	wire_writer_init(&w);
	wire_put_u64(&w, m->fence);
	wire_put_u32(&w, m->blob_len);
	wire_put_bytes(&w, m->blob, m->blob_len);
	return wire_writer_take(&w, ret, ret_len);
}

int proto_decode_state(const void *p, size_t len, struct proto_state *m, char *err,
		       size_t errlen)
{
	struct wire_reader r;
	struct proto_state h;
	int rc;

	memset(&h, 0, sizeof(h));
	wire_reader_init(&r, p, len);
	h.fence = wire_get_u64(&r);
	h.blob_len = wire_get_u32(&r);
	if (r.err)
		return fail(err, errlen, "state: truncated (%zu bytes)", len);
	if (h.blob_len > wire_remaining(&r))
		return fail(err, errlen, "state: blob of %" PRIu32 " bytes, %zu present",
			    h.blob_len, wire_remaining(&r));
	/* A view, not a copy: the blob may be megabytes and the caller holds the payload. */
	h.blob = wire_get_view(&r, h.blob_len);
	rc = finish(&r, "state", err, errlen);
	if (!rc)
		rc = check_state(&h, err, errlen);
	if (rc)
		return rc;
	memcpy(m, &h, sizeof(h));
	return 0;
}

/* ---------------- COMMIT_REQ ---------------- */

static int check_commit_req(const struct proto_commit_req *m, char *err, size_t errlen)
{
	if (m->nr_digests > PROTO_MAX_SLOTS)
		return fail(err, errlen, "commit_req: %" PRIu32 " digests, at most %u",
			    m->nr_digests, PROTO_MAX_SLOTS);
	return 0;
}

int proto_encode_commit_req(const struct proto_commit_req *m, void **ret, size_t *ret_len)
{
	struct wire_writer w;

	ENCODE_CHECK(check_commit_req(m, NULL, 0));
	wire_writer_init(&w);
	wire_put_u64(&w, m->fence);
	wire_put_u32(&w, m->nr_digests);
	for (uint32_t i = 0; i < m->nr_digests; i++)
		wire_put_bytes(&w, m->digests[i], PROTO_DIGEST_LEN);
	return wire_writer_take(&w, ret, ret_len);
}

int proto_decode_commit_req(const void *p, size_t len, struct proto_commit_req *m, char *err,
			    size_t errlen)
{
	struct wire_reader r;
	struct proto_commit_req h;
	int rc;

	memset(&h, 0, sizeof(h));
	wire_reader_init(&r, p, len);
	h.fence = wire_get_u64(&r);
	h.nr_digests = wire_get_u32(&r);
	if (!r.err && h.nr_digests > PROTO_MAX_SLOTS)
		return check_commit_req(&h, err, errlen);
	for (uint32_t i = 0; i < h.nr_digests && !r.err; i++)
		wire_get_bytes(&r, h.digests[i], PROTO_DIGEST_LEN);
	rc = finish(&r, "commit_req", err, errlen);
	if (rc)
		return rc;
	memcpy(m, &h, sizeof(h));
	return 0;
}

/* ---------------- COMMITTED ---------------- */

int proto_encode_committed(const struct proto_committed *m, void **ret, size_t *ret_len)
{
	struct wire_writer w;

	wire_writer_init(&w);
	wire_put_u64(&w, m->run_ns);
	return wire_writer_take(&w, ret, ret_len);
}

int proto_decode_committed(const void *p, size_t len, struct proto_committed *m, char *err,
			   size_t errlen)
{
	struct wire_reader r;
	struct proto_committed h;

	memset(&h, 0, sizeof(h));
	wire_reader_init(&r, p, len);
	h.run_ns = wire_get_u64(&r);
	int rc = finish(&r, "committed", err, errlen);
	if (rc)
		return rc;
	memcpy(m, &h, sizeof(h));
	return 0;
}

/* ---------------- DECISION_REQ / DECISION ---------------- */

/* ---------------- postcopy ---------------- */

/* The largest slot a bitmap may describe: 16 TiB of 4 KiB pages. */
#define POSTCOPY_MAX_SLOT_PAGES (1ull << 32)

int proto_encode_postcopy_start(const struct proto_postcopy_start *m, void **ret,
				size_t *ret_len)
{
	struct wire_writer w;

	if (m->nr_slots == 0 || m->nr_slots > PROTO_MAX_SLOTS || (m->flags & ~PROTO_POSTCOPY_FLAGS))
		return -EINVAL;
	for (uint32_t i = 0; i < m->nr_slots; i++)
		if (m->npages[i] > POSTCOPY_MAX_SLOT_PAGES || !m->bitmap[i])
			return -EINVAL;
	wire_writer_init(&w);
	wire_put_u64(&w, m->fence);
	wire_put_u32(&w, m->nr_slots);
	for (uint32_t i = 0; i < m->nr_slots; i++) {
		wire_put_u64(&w, m->npages[i]);
		for (uint64_t k = 0; k < (m->npages[i] + 63) / 64; k++)
			wire_put_u64(&w, m->bitmap[i][k]);
	}
	if (m->flags) /* absent when 0: see proto.h */
		wire_put_u32(&w, m->flags);
	return wire_writer_take(&w, ret, ret_len);
}

void proto_postcopy_start_free(struct proto_postcopy_start *m)
{
	for (uint32_t i = 0; i < PROTO_MAX_SLOTS; i++) {
		free(m->bitmap[i]);
		m->bitmap[i] = NULL;
	}
}

int proto_decode_postcopy_start(const void *p, size_t len, struct proto_postcopy_start *m,
				char *err, size_t errlen)
{
	struct wire_reader r;
	struct proto_postcopy_start h;

	memset(&h, 0, sizeof(h));
	wire_reader_init(&r, p, len);
	h.fence = wire_get_u64(&r);
	h.nr_slots = wire_get_u32(&r);
	if (!r.err && (h.nr_slots == 0 || h.nr_slots > PROTO_MAX_SLOTS))
		return fail(err, errlen, "postcopy_start: %" PRIu32 " memslots", h.nr_slots);
	for (uint32_t i = 0; i < h.nr_slots && !r.err; i++) {
		h.npages[i] = wire_get_u64(&r);
		uint64_t words = (h.npages[i] + 63) / 64;
		/* Bounded by what is left in the frame before anything is allocated. */
		if (r.err || h.npages[i] > POSTCOPY_MAX_SLOT_PAGES || words > len / 8) {
			proto_postcopy_start_free(&h);
			return fail(err, errlen, "postcopy_start: slot %" PRIu32 " bitmap of %" PRIu64
				    " pages does not fit the frame", i, h.npages[i]);
		}
		h.bitmap[i] = calloc(words ? words : 1, sizeof(uint64_t));
		if (!h.bitmap[i]) {
			proto_postcopy_start_free(&h);
			return -ENOMEM;
		}
		for (uint64_t k = 0; k < words; k++)
			h.bitmap[i][k] = wire_get_u64(&r);
	}
	/* The optional flags: present only when non-zero, and only known bits. */
	if (!r.err && wire_remaining(&r) >= 4) {
		h.flags = wire_get_u32(&r);
		if (!h.flags || (h.flags & ~PROTO_POSTCOPY_FLAGS)) {
			proto_postcopy_start_free(&h);
			return fail(err, errlen, "postcopy_start: flags 0x%" PRIx32 " %s", h.flags,
				    h.flags ? "has unknown bits" : "must be left out");
		}
	}
	int rc = finish(&r, "postcopy_start", err, errlen);
	if (rc) {
		proto_postcopy_start_free(&h);
		return rc;
	}
	*m = h;
	return 0;
}

int proto_encode_page_req(const struct proto_page_req *m, void **ret, size_t *ret_len)
{
	struct wire_writer w;

	wire_writer_init(&w);
	wire_put_u32(&w, m->slot);
	wire_put_u64(&w, m->first_page);
	wire_put_u32(&w, m->npages);
	return wire_writer_take(&w, ret, ret_len);
}

int proto_decode_page_req(const void *p, size_t len, struct proto_page_req *m, char *err,
			  size_t errlen)
{
	struct wire_reader r;
	struct proto_page_req h;

	memset(&h, 0, sizeof(h)); /* padding too: decoded structs compare with memcmp */
	wire_reader_init(&r, p, len);
	h.slot = wire_get_u32(&r);
	h.first_page = wire_get_u64(&r);
	h.npages = wire_get_u32(&r);
	int rc = finish(&r, "page_req", err, errlen);
	if (rc)
		return rc;
	if (h.slot >= PROTO_MAX_SLOTS || h.npages == 0 || h.npages > PROTO_PAGES_MAX)
		return fail(err, errlen, "page_req: slot %" PRIu32 ", %" PRIu32 " pages", h.slot,
			    h.npages);
	memcpy(m, &h, sizeof(h));
	return 0;
}

int proto_encode_postcopy_end(uint64_t fence, void **ret, size_t *ret_len)
{
	struct wire_writer w;

	wire_writer_init(&w);
	wire_put_u64(&w, fence);
	return wire_writer_take(&w, ret, ret_len);
}

int proto_decode_postcopy_end(const void *p, size_t len, uint64_t *fence, char *err,
			      size_t errlen)
{
	struct wire_reader r;

	wire_reader_init(&r, p, len);
	uint64_t f = wire_get_u64(&r);
	int rc = finish(&r, "postcopy_end", err, errlen);
	if (rc)
		return rc;
	*fence = f;
	return 0;
}

int proto_encode_vm_accept(const struct proto_vm_accept *m, void **ret, size_t *ret_len)
{
	struct wire_writer w;

	wire_writer_init(&w);
	if (m->rdma_port)
		wire_put_u16(&w, m->rdma_port);
	return wire_writer_take(&w, ret, ret_len);
}

int proto_decode_vm_accept(const void *p, size_t len, struct proto_vm_accept *m, char *err,
			   size_t errlen)
{
	struct wire_reader r;
	struct proto_vm_accept h;

	memset(&h, 0, sizeof(h));
	if (len == 0) {
		memcpy(m, &h, sizeof(h));
		return 0;
	}
	wire_reader_init(&r, p, len);
	h.rdma_port = wire_get_u16(&r);
	int rc = finish(&r, "vm_accept", err, errlen);
	if (rc)
		return rc;
	if (!h.rdma_port)
		return fail(err, errlen, "vm_accept: RDMA port 0");
	memcpy(m, &h, sizeof(h));
	return 0;
}

int proto_encode_decision_req(const struct proto_decision_req *m, void **ret, size_t *ret_len)
{
	struct wire_writer w;

	wire_writer_init(&w);
	wire_put_u64(&w, m->migration_id);
	wire_put_bytes(&w, m->token, PROTO_TOKEN_LEN);
	return wire_writer_take(&w, ret, ret_len);
}

int proto_decode_decision_req(const void *p, size_t len, struct proto_decision_req *m,
			      char *err, size_t errlen)
{
	struct wire_reader r;
	struct proto_decision_req h;

	memset(&h, 0, sizeof(h));
	wire_reader_init(&r, p, len);
	h.migration_id = wire_get_u64(&r);
	wire_get_bytes(&r, h.token, PROTO_TOKEN_LEN);
	int rc = finish(&r, "decision_req", err, errlen);
	if (rc)
		return rc;
	memcpy(m, &h, sizeof(h));
	return 0;
}

static int check_decision(const struct proto_decision *m, char *err, size_t errlen)
{
	if (m->decision > PROTO_DECIDED_RUN)
		return fail(err, errlen, "decision: unknown decision %" PRIu32, m->decision);
	return 0;
}

int proto_encode_decision(const struct proto_decision *m, void **ret, size_t *ret_len)
{
	struct wire_writer w;

	ENCODE_CHECK(check_decision(m, NULL, 0));
	wire_writer_init(&w);
	wire_put_u64(&w, m->migration_id);
	wire_put_u32(&w, m->decision);
	return wire_writer_take(&w, ret, ret_len);
}

int proto_decode_decision(const void *p, size_t len, struct proto_decision *m, char *err,
			  size_t errlen)
{
	struct wire_reader r;
	struct proto_decision h;

	memset(&h, 0, sizeof(h));
	wire_reader_init(&r, p, len);
	h.migration_id = wire_get_u64(&r);
	h.decision = wire_get_u32(&r);
	int rc = finish(&r, "decision", err, errlen);
	if (!rc)
		rc = check_decision(&h, err, errlen);
	if (rc)
		return rc;
	memcpy(m, &h, sizeof(h));
	return 0;
}

/* ---------------- STREAM_HELLO / FENCE ---------------- */

static int check_stream_hello(const struct proto_stream_hello *m, char *err, size_t errlen)
{
	if (m->stream >= PROTO_MAX_STREAMS)
		return fail(err, errlen, "stream_hello: stream %" PRIu32 ", want 0..%u", m->stream,
			    PROTO_MAX_STREAMS - 1);
	return 0;
}

int proto_encode_stream_hello(const struct proto_stream_hello *m, void **ret, size_t *ret_len)
{
	struct wire_writer w;

	ENCODE_CHECK(check_stream_hello(m, NULL, 0));
	wire_writer_init(&w);
	wire_put_bytes(&w, m->token, PROTO_TOKEN_LEN);
	wire_put_u32(&w, m->stream);
	return wire_writer_take(&w, ret, ret_len);
}

int proto_decode_stream_hello(const void *p, size_t len, struct proto_stream_hello *m,
			      char *err, size_t errlen)
{
	struct wire_reader r;
	struct proto_stream_hello h;

	memset(&h, 0, sizeof(h));
	wire_reader_init(&r, p, len);
	wire_get_bytes(&r, h.token, PROTO_TOKEN_LEN);
	h.stream = wire_get_u32(&r);
	int rc = finish(&r, "stream_hello", err, errlen);
	if (!rc)
		rc = check_stream_hello(&h, err, errlen);
	if (rc)
		return rc;
	memcpy(m, &h, sizeof(h));
	return 0;
}

int proto_encode_fence(const struct proto_fence *m, void **ret, size_t *ret_len)
{
	struct wire_writer w;

	wire_writer_init(&w);
	wire_put_u64(&w, m->fence);
	return wire_writer_take(&w, ret, ret_len);
}

int proto_decode_fence(const void *p, size_t len, struct proto_fence *m, char *err,
		       size_t errlen)
{
	struct wire_reader r;
	struct proto_fence h;

	memset(&h, 0, sizeof(h));
	wire_reader_init(&r, p, len);
	h.fence = wire_get_u64(&r);
	int rc = finish(&r, "fence", err, errlen);
	if (rc)
		return rc;
	memcpy(m, &h, sizeof(h));
	return 0;
}

/* ---------------- PAGES ---------------- */

static uint32_t mask_words(uint32_t npages)
{
	return (npages + 63u) / 64u;
}

static int check_pages(const struct proto_pages *m, char *err, size_t errlen)
{
	if (m->region >= PROTO_MAX_SLOTS)
		return fail(err, errlen, "pages: region %" PRIu32 ", want 0..%u", m->region,
			    PROTO_MAX_SLOTS - 1);
	if (m->npages < 1 || m->npages > PROTO_PAGES_MAX)
		return fail(err, errlen, "pages: %" PRIu32 " pages, want 1..%u", m->npages,
			    PROTO_PAGES_MAX);
	if (m->first_page > PAGE_NR_LIMIT - m->npages)
		return fail(err, errlen,
			    "pages: pages %" PRIu64 "+%" PRIu32
			    " lie past the 64-bit address space",
			    m->first_page, m->npages);
	/* Bits past npages would make the data length ambiguous between encoders. */
	uint32_t tail = m->npages % 64u;
	if (tail && (m->zero_mask[mask_words(m->npages) - 1] >> tail))
		return fail(err, errlen, "pages: zero mask has bits set past page %" PRIu32,
			    m->npages - 1);
	return 0;
}

static uint64_t pages_data_len(const struct proto_pages *m)
{
	uint32_t zero = 0;
	for (uint32_t i = 0; i < mask_words(m->npages); i++)
		zero += (uint32_t)__builtin_popcountll(m->zero_mask[i]);
	return (uint64_t)(m->npages - zero) * PAGE_SIZE_V1;
}

size_t proto_encode_pages_hdr(const struct proto_pages *m, uint8_t *out, size_t cap)
{
	if (check_pages(m, NULL, 0))
		return 0;
	size_t n = PROTO_PAGES_HDR_LEN(m->npages);
	if (!out || cap < n)
		return 0;
	/* Per frame on the data path: straight into the caller's buffer, no allocation. */
	st32(out, m->region);
	st64(out + 4, m->first_page);
	st32(out + 12, m->npages);
	for (uint32_t i = 0; i < mask_words(m->npages); i++)
		st64(out + 16 + 8 * i, m->zero_mask[i]);
	return n;
}

int proto_decode_pages_hdr(const void *p, size_t len, struct proto_pages *m,
			   uint64_t *ret_data_len, char *err, size_t errlen)
{
	struct wire_reader r;
	struct proto_pages h;

	memset(&h, 0, sizeof(h));
	wire_reader_init(&r, p, len);
	h.region = wire_get_u32(&r);
	h.first_page = wire_get_u64(&r);
	h.npages = wire_get_u32(&r);
	if (r.err)
		return fail(err, errlen, "pages: header truncated (%zu bytes)", len);
	/* npages sizes the mask read below: bound it first. */
	if (h.npages < 1 || h.npages > PROTO_PAGES_MAX)
		return check_pages(&h, err, errlen);
	for (uint32_t i = 0; i < mask_words(h.npages); i++)
		h.zero_mask[i] = wire_get_u64(&r);
	if (r.err)
		return fail(err, errlen, "pages: zero mask truncated (%zu bytes)", len);
	int rc = check_pages(&h, err, errlen);
	if (rc)
		return rc;
	size_t hdr_len = PROTO_PAGES_HDR_LEN(h.npages);
	uint64_t data_len = pages_data_len(&h);
	if (len - hdr_len > data_len)
		return fail(err, errlen, "pages: %zu bytes after the header, %" PRIu64 " expected",
			    len - hdr_len, data_len);
	memcpy(m, &h, sizeof(h));
	if (ret_data_len)
		*ret_data_len = data_len;
	return (int)hdr_len;
}

/* ---------------- PAGES_ZSTD ---------------- */

int proto_decode_pages_zstd(const void *p, size_t len, struct proto_pages *m,
			    uint64_t *ret_data_len, const void **ret_z, size_t *ret_zlen,
			    char *err, size_t errlen)
{
	struct proto_pages h;
	uint64_t data_len = 0;
	/* The header alone: what follows it is compressed, not data_len raw bytes. */
	size_t pre = len < PROTO_PAGES_HDR_LEN(PROTO_PAGES_MAX) ? len
								: PROTO_PAGES_HDR_LEN(PROTO_PAGES_MAX);
	if (pre >= 16) {
		uint32_t npages;
		memcpy(&npages, (const uint8_t *)p + 12, 4);
		npages = le32toh(npages);
		if (npages >= 1 && npages <= PROTO_PAGES_MAX && pre > PROTO_PAGES_HDR_LEN(npages))
			pre = PROTO_PAGES_HDR_LEN(npages);
	}
	int rc = proto_decode_pages_hdr(p, pre, &h, &data_len, err, errlen);
	if (rc < 0)
		return rc;
	size_t hl = (size_t)rc;
	if (hl != pre)
		return fail(err, errlen, "pages_zstd: header truncated (%zu bytes)", len);
	if (!data_len)
		return fail(err, errlen, "pages_zstd: every page is zero, nothing to compress");
	const uint8_t *z = (const uint8_t *)p + hl;
	size_t zlen = len - hl;
	if (!zlen || zlen >= data_len)
		return fail(err, errlen,
			    "pages_zstd: %zu compressed bytes for %" PRIu64
			    " raw bytes (want 1..raw-1)",
			    zlen, data_len);
	unsigned long long fcs = ZSTD_getFrameContentSize(z, zlen);
	if (fcs == ZSTD_CONTENTSIZE_ERROR)
		return fail(err, errlen, "pages_zstd: not a zstd frame");
	if (fcs == ZSTD_CONTENTSIZE_UNKNOWN)
		return fail(err, errlen, "pages_zstd: zstd frame without a content size");
	if (fcs != data_len)
		return fail(err, errlen,
			    "pages_zstd: zstd frame of %llu bytes, the header's pages are %" PRIu64,
			    fcs, data_len);
	size_t fsz = ZSTD_findFrameCompressedSize(z, zlen);
	if (ZSTD_isError(fsz))
		return fail(err, errlen, "pages_zstd: zstd frame: %s", ZSTD_getErrorName(fsz));
	if (fsz != zlen)
		return fail(err, errlen, "pages_zstd: zstd frame of %zu bytes, %zu bytes follow it",
			    fsz, zlen - fsz);
	memcpy(m, &h, sizeof(h));
	if (ret_data_len)
		*ret_data_len = data_len;
	if (ret_z)
		*ret_z = z;
	if (ret_zlen)
		*ret_zlen = zlen;
	return (int)hl;
}
