// SPDX-License-Identifier: Apache-2.0
/*
 * Description: the agent-to-agent protocol codec (transport/proto.c) against its spec
 * (docs/protocol.md): golden byte vectors pin the wire format; every message round-trips;
 * every decoder fails with -EBADMSG and a reason on each truncation, on a trailing byte and
 * on each field rule (names, UTF-8 messages, versions, caps, VM shape and memslot tiling,
 * counts, PAGES masks and page-number overflow), leaving its output untouched; encoders
 * refuse (-EINVAL) what their decoders would reject; names of types and codes are stable.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* cmocka needs the headers above first. */
#include <cmocka.h>
#include <zstd.h>

#include "transport/proto.h"
#include "transport/wire.h"

/* ---------------- helpers ---------------- */

/* An exact-size copy, so that ASan catches a decoder reading one byte too far. */
static void *dup_exact(const void *p, size_t n)
{
	void *d = malloc(n ? n : 1);
	assert_non_null(d);
	if (n)
		memcpy(d, p, n);
	return d;
}

static void *take(struct wire_writer *w, size_t *ret_len)
{
	void *buf = NULL;
	assert_int_equal(wire_writer_take(w, &buf, ret_len), 0);
	return buf;
}

static void put_str(struct wire_writer *w, const void *s, size_t n)
{
	wire_put_u16(w, (uint16_t)n);
	wire_put_bytes(w, s, n);
}

/* A decode that must fail: -EBADMSG, a reason that mentions `want`, and *m untouched. */
#define EXPECT_BAD(decode_call, m, want)                                                 \
	do {                                                                             \
		memset(&(m), 0xa5, sizeof(m));                                           \
		unsigned char before_[sizeof(m)];                                        \
		memcpy(before_, &(m), sizeof(m));                                        \
		char err[256] = "";                                                      \
		int rc_ = decode_call;                                                   \
		assert_int_equal(rc_, -EBADMSG);                                         \
		if (!strstr(err, (want)))                                                \
			fail_msg("reason \"%s\" does not mention \"%s\"", err, (want));  \
		assert_memory_equal(before_, &(m), sizeof(m));                           \
	} while (0)

static struct proto_hello good_hello(void)
{
	struct proto_hello h = {
		.min_version = 1,
		.max_version = 1,
		.migration_id = 0x0102030405060708ull,
		.caps = PROTO_CAP_TCP | PROTO_CAP_VERIFY,
		.page_size = 4096,
		.streams = 4,
	};
	strcpy(h.agent, "a");
	return h;
}

static struct proto_vm_offer good_offer(void)
{
	struct proto_vm_offer o = {
		.mem_size = 3u << 20,
		.vcpus = 2,
		.irqchip = 1,
		.nr_slots = 2,
		.slots = {{0, 2u << 20}, {2u << 20, 1u << 20}},
	};
	strcpy(o.name, "web-1.prod_a");
	strcpy(o.guest, "boot:/srv/images/x.img");
	return o;
}

/* ---------------- names ---------------- */

/* Postcopy messages: round trips and every bound. */
static void test_postcopy_msgs(void **state)
{
	(void)state;
	char err[256];
	void *buf = NULL;
	size_t len = 0;
	struct proto_page_req rq = {.slot = 3, .first_page = 77, .npages = 16}, rq2;
	assert_int_equal(proto_encode_page_req(&rq, &buf, &len), 0);
	assert_int_equal(proto_decode_page_req(buf, len, &rq2, err, sizeof(err)), 0);
	assert_int_equal(rq2.slot, 3);
	assert_int_equal(rq2.first_page, 77);
	assert_int_equal(rq2.npages, 16);
	free(buf);
	struct proto_page_req bad[] = {{.slot = 64, .npages = 1}, {.slot = 0, .npages = 0},
				       {.slot = 0, .npages = PROTO_PAGES_MAX + 1}};
	for (unsigned i = 0; i < 3; i++) {
		assert_int_equal(proto_encode_page_req(&bad[i], &buf, &len), 0);
		assert_int_equal(proto_decode_page_req(buf, len, &rq2, err, sizeof(err)), -EBADMSG);
		assert_non_null(strstr(err, "page_req"));
		free(buf);
	}

	uint64_t bits0[2] = {0x5, 0x1}, bits1[1] = {0xff};
	struct proto_postcopy_start ps = {.fence = 9, .nr_slots = 2, .npages = {65, 8},
					  .bitmap = {bits0, bits1}};
	assert_int_equal(proto_encode_postcopy_start(&ps, &buf, &len), 0);
	assert_int_equal(len, 8 + 4 + (8 + 16) + (8 + 8));
	struct proto_postcopy_start d;
	assert_int_equal(proto_decode_postcopy_start(buf, len, &d, err, sizeof(err)), 0);
	assert_int_equal(d.fence, 9);
	assert_int_equal(d.nr_slots, 2);
	assert_int_equal(d.npages[0], 65);
	assert_int_equal(d.bitmap[0][0], 0x5);
	assert_int_equal(d.bitmap[0][1], 0x1);
	assert_int_equal(d.bitmap[1][0], 0xff);
	proto_postcopy_start_free(&d);
	/* Every truncation is refused, and a bitmap claiming more than the frame holds. */
	for (size_t cut = 0; cut < len; cut++)
		assert_int_equal(proto_decode_postcopy_start(buf, cut, &d, err, sizeof(err)),
				 -EBADMSG);
	free(buf);
	uint64_t huge_bits[1] = {0};
	struct proto_postcopy_start lie = {.fence = 1, .nr_slots = 1, .npages = {1ull << 30},
					   .bitmap = {huge_bits}};
	struct wire_writer w;
	wire_writer_init(&w);
	wire_put_u64(&w, lie.fence);
	wire_put_u32(&w, 1);
	wire_put_u64(&w, lie.npages[0]);
	wire_put_u64(&w, 0);
	buf = take(&w, &len);
	assert_int_equal(proto_decode_postcopy_start(buf, len, &d, err, sizeof(err)), -EBADMSG);
	assert_non_null(strstr(err, "does not fit"));
	free(buf);
	struct proto_postcopy_start none = {.fence = 1, .nr_slots = 0};
	assert_int_equal(proto_encode_postcopy_start(&none, &buf, &len), -EINVAL);

	/* Pull over RDMA: a trailing flags word, present only when non-zero. */
	ps.flags = PROTO_POSTCOPY_PULL_RDMA;
	assert_int_equal(proto_encode_postcopy_start(&ps, &buf, &len), 0);
	assert_int_equal(len, 8 + 4 + (8 + 16) + (8 + 8) + 4);
	assert_int_equal(proto_decode_postcopy_start(buf, len, &d, err, sizeof(err)), 0);
	assert_int_equal(d.flags, PROTO_POSTCOPY_PULL_RDMA);
	assert_int_equal(d.bitmap[1][0], 0xff);
	proto_postcopy_start_free(&d);
	/* A cut inside the flags is refused; the push form (no flags) still decodes. */
	for (size_t cut = len - 3; cut < len; cut++)
		assert_int_equal(proto_decode_postcopy_start(buf, cut, &d, err, sizeof(err)),
				 -EBADMSG);
	assert_int_equal(proto_decode_postcopy_start(buf, len - 4, &d, err, sizeof(err)), 0);
	assert_int_equal(d.flags, 0);
	proto_postcopy_start_free(&d);
	/* Unknown bits, and an explicit 0 (not the canonical form), are refused. */
	uint8_t *fb = buf;
	fb[len - 4] = 0x02;
	assert_int_equal(proto_decode_postcopy_start(buf, len, &d, err, sizeof(err)), -EBADMSG);
	assert_non_null(strstr(err, "unknown bits"));
	fb[len - 4] = 0;
	assert_int_equal(proto_decode_postcopy_start(buf, len, &d, err, sizeof(err)), -EBADMSG);
	assert_non_null(strstr(err, "left out"));
	free(buf);
	ps.flags = 1u << 7;
	assert_int_equal(proto_encode_postcopy_start(&ps, &buf, &len), -EINVAL);
	ps.flags = 0;

	uint64_t f = 0;
	assert_int_equal(proto_encode_postcopy_end(42, &buf, &len), 0);
	assert_int_equal(proto_decode_postcopy_end(buf, len, &f, err, sizeof(err)), 0);
	assert_int_equal(f, 42);
	free(buf);

	struct proto_vm_accept acc = {.rdma_port = 4791}, acc2;
	assert_int_equal(proto_encode_vm_accept(&acc, &buf, &len), 0);
	assert_int_equal(len, 2);
	assert_int_equal(proto_decode_vm_accept(buf, len, &acc2, err, sizeof(err)), 0);
	assert_int_equal(acc2.rdma_port, 4791);
	free(buf);
	assert_int_equal(proto_decode_vm_accept(NULL, 0, &acc2, err, sizeof(err)), 0);
	assert_int_equal(acc2.rdma_port, 0);
	uint8_t zero_port[2] = {0, 0}, three[3] = {1, 2, 3};
	assert_int_equal(proto_decode_vm_accept(zero_port, 2, &acc2, err, sizeof(err)), -EBADMSG);
	assert_int_equal(proto_decode_vm_accept(three, 3, &acc2, err, sizeof(err)), -EBADMSG);
}

static void test_names(void **state)
{
	(void)state;
	assert_string_equal(proto_type_name(PROTO_HELLO), "hello");
	assert_string_equal(proto_type_name(PROTO_VM_OFFER), "vm_offer");
	assert_string_equal(proto_type_name(PROTO_COMMIT_REQ), "commit_req");
	assert_string_equal(proto_type_name(PROTO_DECISION_REQ), "decision_req");
	assert_string_equal(proto_type_name(PROTO_STREAM_HELLO), "stream_hello");
	assert_string_equal(proto_type_name(PROTO_PAGES), "pages");
	assert_string_equal(proto_type_name(PROTO_FENCE), "fence");
	assert_string_equal(proto_type_name(0), "unknown");
	assert_string_equal(proto_type_name(PROTO_PAGE_REQ), "page_req");
	assert_string_equal(proto_type_name(18), "unknown");
	assert_string_equal(proto_type_name(35), "pages_zstd");
	assert_string_equal(proto_type_name(36), "unknown");
	assert_string_equal(proto_type_name(0xffff), "unknown");

	assert_string_equal(proto_code_name(PROTO_E_VERSION), "version");
	assert_string_equal(proto_code_name(PROTO_E_BUSY), "busy");
	assert_string_equal(proto_code_name(PROTO_E_NOMEM), "nomem");
	assert_string_equal(proto_code_name(PROTO_E_CANCELED), "canceled");
	assert_string_equal(proto_code_name(PROTO_E_SHUTDOWN), "shutdown");
	assert_string_equal(proto_code_name(0), "unknown");
	assert_string_equal(proto_code_name(12), "unknown");
	assert_string_equal(proto_code_name(UINT32_MAX), "unknown");
}

/* ---------------- header ---------------- */

static void test_hdr(void **state)
{
	(void)state;
	uint8_t b[PROTO_HDR_LEN];
	struct proto_hdr h;

	proto_hdr_encode(b, PROTO_PAGES, 0x1234);
	static const uint8_t want[] = {'F', 'R', 'Y', '1', 0x21, 0, 0, 0, 0x34, 0x12, 0, 0};
	assert_memory_equal(b, want, sizeof(want));
	assert_int_equal(proto_hdr_decode(b, PROTO_MAX_PAYLOAD, &h), 0);
	assert_int_equal(h.magic, PROTO_MAGIC);
	assert_int_equal(h.type, PROTO_PAGES);
	assert_int_equal(h.flags, 0);
	assert_int_equal(h.len, 0x1234);

	/* len exactly at the limit passes, one over fails; the global cap applies too. */
	proto_hdr_encode(b, PROTO_STATE, PROTO_MAX_CTRL_PAYLOAD);
	assert_int_equal(proto_hdr_decode(b, PROTO_MAX_CTRL_PAYLOAD, &h), 0);
	proto_hdr_encode(b, PROTO_STATE, PROTO_MAX_CTRL_PAYLOAD + 1);
	memset(&h, 0x5a, sizeof(h));
	assert_int_equal(proto_hdr_decode(b, PROTO_MAX_CTRL_PAYLOAD, &h), -EBADMSG);
	assert_int_equal(h.magic, 0x5a5a5a5a); /* untouched */
	proto_hdr_encode(b, PROTO_PAGES, PROTO_MAX_PAYLOAD + 1);
	assert_int_equal(proto_hdr_decode(b, UINT32_MAX, &h), -EBADMSG);

	proto_hdr_encode(b, PROTO_FENCE, 8);
	b[0] = 'f';
	assert_int_equal(proto_hdr_decode(b, PROTO_MAX_PAYLOAD, &h), -EBADMSG);
	proto_hdr_encode(b, 18, 8);
	assert_int_equal(proto_hdr_decode(b, PROTO_MAX_PAYLOAD, &h), -EBADMSG);
	proto_hdr_encode(b, 0, 8);
	assert_int_equal(proto_hdr_decode(b, PROTO_MAX_PAYLOAD, &h), -EBADMSG);
	proto_hdr_encode(b, PROTO_FENCE, 8);
	b[7] = 0x80; /* a flag */
	assert_int_equal(proto_hdr_decode(b, PROTO_MAX_PAYLOAD, &h), -EBADMSG);

	/* Every known type decodes. */
	static const uint16_t types[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 32, 33, 34};
	for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
		proto_hdr_encode(b, types[i], 0);
		assert_int_equal(proto_hdr_decode(b, 0, &h), 0);
		assert_int_equal(h.type, types[i]);
	}
}

/* ---------------- HELLO ---------------- */

static void test_hello_golden(void **state)
{
	(void)state;
	struct proto_hello h = good_hello(), d;
	void *buf;
	size_t len;

	assert_int_equal(proto_encode_hello(&h, &buf, &len), 0);
	static const uint8_t want[] = {
		1, 0, 0, 0,			/* min_version */
		1, 0, 0, 0,			/* max_version */
		1, 0, 'a',			/* agent */
		8, 7, 6, 5, 4, 3, 2, 1,		/* migration_id */
		9, 0, 0, 0,			/* caps TCP|VERIFY */
		0, 0x10, 0, 0,			/* page_size */
		4, 0, 0, 0,			/* streams */
	};
	assert_int_equal(len, sizeof(want));
	assert_memory_equal(buf, want, sizeof(want));

	memset(&d, 0xee, sizeof(d));
	char err[128];
	assert_int_equal(proto_decode_hello(buf, len, &d, err, sizeof(err)), 0);
	assert_int_equal(d.min_version, 1);
	assert_int_equal(d.max_version, 1);
	assert_string_equal(d.agent, "a");
	/* The string's tail is zeroed, not left as it was. */
	for (size_t i = 1; i < sizeof(d.agent); i++)
		assert_int_equal(d.agent[i], 0);
	assert_true(d.migration_id == 0x0102030405060708ull);
	assert_int_equal(d.caps, 9);
	assert_int_equal(d.page_size, 4096);
	assert_int_equal(d.streams, 4);
	free(buf);

	/* The longest agent name (64, as docs/config.md allows) round-trips. */
	memset(h.agent, 'x', PROTO_NAME_MAX - 1);
	h.agent[PROTO_NAME_MAX - 1] = 0;
	assert_int_equal(proto_encode_hello(&h, &buf, &len), 0);
	assert_int_equal(proto_decode_hello(buf, len, &d, NULL, 0), 0);
	assert_int_equal(strlen(d.agent), 64);
	free(buf);
}

/* Encodes a HELLO field by field, so invalid ones can be built. */
static void *raw_hello(uint32_t minv, uint32_t maxv, const char *agent, size_t agent_len,
		       uint32_t caps, uint32_t page_size, uint32_t streams, size_t *ret_len)
{
	struct wire_writer w;
	wire_writer_init(&w);
	wire_put_u32(&w, minv);
	wire_put_u32(&w, maxv);
	put_str(&w, agent, agent_len);
	wire_put_u64(&w, 7);
	wire_put_u32(&w, caps);
	wire_put_u32(&w, page_size);
	wire_put_u32(&w, streams);
	return take(&w, ret_len);
}

static void check_bad_hello(void *buf, size_t len, const char *want)
{
	struct proto_hello m;
	EXPECT_BAD(proto_decode_hello(buf, len, &m, err, sizeof(err)), m, want);
	free(buf);
}

/* Builds a HELLO from raw_hello()'s field list and expects the decoder to refuse it. */
#define BAD_HELLO(want, ...)                                \
	do {                                                \
		size_t l_;                                  \
		void *b_ = raw_hello(__VA_ARGS__, &l_);     \
		check_bad_hello(b_, l_, want);              \
	} while (0)

static void test_hello_rules(void **state)
{
	(void)state;
	size_t len;
	char big[80];
	memset(big, 'y', sizeof(big));

	/* A future source (versions 1..5) is well-formed: refusing it is the engine's call. */
	void *ok = raw_hello(1, 5, "src", 3, 0xf, 4096, 64, &len);
	struct proto_hello m;
	assert_int_equal(proto_decode_hello(ok, len, &m, NULL, 0), 0);
	free(ok);

	/* ZSTD is a version-2 capability: offered only with a range that reaches 2. */
	ok = raw_hello(1, 2, "src", 3, PROTO_CAP_TCP | PROTO_CAP_ZSTD, 4096, 4, &len);
	assert_int_equal(proto_decode_hello(ok, len, &m, NULL, 0), 0);
	assert_int_equal(m.caps, PROTO_CAP_TCP | PROTO_CAP_ZSTD);
	free(ok);
	BAD_HELLO("ZSTD offered with versions up to 1", 1, 1, "src", 3,
		  PROTO_CAP_TCP | PROTO_CAP_ZSTD, 4096, 1);
	BAD_HELLO("version range", 2, 1, "src", 3, 1, 4096, 1);
	BAD_HELLO("version range", 0, 1, "src", 3, 1, 4096, 1);
	BAD_HELLO("empty", 1, 1, "", 0, 1, 4096, 1);
	BAD_HELLO("printable", 1, 1, "s\x01", 2, 1, 4096, 1);
	BAD_HELLO("printable", 1, 1, "s\x7f", 2, 1, 4096, 1);
	BAD_HELLO("printable", 1, 1, "s\xc3\xa9", 3, 1, 4096, 1);
	BAD_HELLO("NUL", 1, 1, "s\0t", 3, 1, 4096, 1);
	BAD_HELLO("at most 64", 1, 1, big, PROTO_NAME_MAX, 1, 4096, 1);
	BAD_HELLO("capability", 1, 1, "src", 3, 1u << 4, 4096, 1);
	BAD_HELLO("capability", 1, 1, "src", 3, 1u << 31, 4096, 1);
	BAD_HELLO("page_size", 1, 1, "src", 3, 1, 8192, 1);
	BAD_HELLO("page_size", 1, 1, "src", 3, 1, 0, 1);
	BAD_HELLO("streams", 1, 1, "src", 3, 1, 4096, 0);
	BAD_HELLO("streams", 1, 1, "src", 3, 1, 4096, 65);
	/* A string length that runs past the end. */
	struct wire_writer w;
	wire_writer_init(&w);
	wire_put_u32(&w, 1);
	wire_put_u32(&w, 1);
	wire_put_u16(&w, 10);
	wire_put_bytes(&w, "abc", 3);
	void *b = take(&w, &len);
	void *cut = dup_exact(b, len);
	check_bad_hello(cut, len, "truncated");
	free(b);
}

/* ---------------- WELCOME / REFUSE ---------------- */

static void test_welcome(void **state)
{
	(void)state;
	struct proto_welcome wm = {.version = 1, .caps = PROTO_CAP_TCP}, d;
	strcpy(wm.agent, "host-b");
	for (unsigned i = 0; i < PROTO_TOKEN_LEN; i++)
		wm.token[i] = (uint8_t)(0xf0 + i);
	void *buf;
	size_t len;
	assert_int_equal(proto_encode_welcome(&wm, &buf, &len), 0);
	assert_int_equal(len, 4 + 4 + 2 + 6 + 16);
	assert_int_equal(proto_decode_welcome(buf, len, &d, NULL, 0), 0);
	assert_int_equal(d.version, 1);
	assert_int_equal(d.caps, PROTO_CAP_TCP);
	assert_string_equal(d.agent, "host-b");
	assert_memory_equal(d.token, wm.token, PROTO_TOKEN_LEN);
	free(buf);

	wm.version = 3;
	assert_int_equal(proto_encode_welcome(&wm, &buf, &len), -EINVAL);
	wm.version = 0;
	assert_int_equal(proto_encode_welcome(&wm, &buf, &len), -EINVAL);
	/* Version 2 may choose ZSTD, version 1 may not. */
	wm.version = 2;
	wm.caps = PROTO_CAP_TCP | PROTO_CAP_ZSTD;
	assert_int_equal(proto_encode_welcome(&wm, &buf, &len), 0);
	assert_int_equal(proto_decode_welcome(buf, len, &d, NULL, 0), 0);
	assert_int_equal(d.version, 2);
	assert_int_equal(d.caps, PROTO_CAP_TCP | PROTO_CAP_ZSTD);
	((uint8_t *)buf)[0] = 1;
	EXPECT_BAD(proto_decode_welcome(buf, len, &d, err, sizeof(err)), d,
		   "ZSTD chosen with version 1");
	free(buf);
	wm.version = 1;
	assert_int_equal(proto_encode_welcome(&wm, &buf, &len), -EINVAL);
	wm.caps = 0x10;
	assert_int_equal(proto_encode_welcome(&wm, &buf, &len), -EINVAL);

	struct wire_writer w;
	wire_writer_init(&w);
	wire_put_u32(&w, 3);
	wire_put_u32(&w, 1);
	put_str(&w, "b", 1);
	wire_put_bytes(&w, wm.token, PROTO_TOKEN_LEN);
	buf = take(&w, &len);
	EXPECT_BAD(proto_decode_welcome(buf, len, &d, err, sizeof(err)), d, "version 3");
	((uint8_t *)buf)[0] = 1;
	((uint8_t *)buf)[4] = 0x31; /* TCP | unknown bits */
	EXPECT_BAD(proto_decode_welcome(buf, len, &d, err, sizeof(err)), d, "capability");
	free(buf);
}

static void *raw_refuse(uint32_t code, const void *msg, size_t n, size_t *ret_len)
{
	struct wire_writer w;
	wire_writer_init(&w);
	wire_put_u32(&w, code);
	put_str(&w, msg, n);
	return take(&w, ret_len);
}

static void test_refuse(void **state)
{
	(void)state;
	struct proto_refuse r = {.code = PROTO_E_BUSY}, d;
	/* Any UTF-8, control characters included: the logger escapes, the codec carries. */
	strcpy(r.message, "at the limit: 2 of 2 \xe2\x86\x92 try later\t\xf0\x9f\x9a\xa2");
	void *buf;
	size_t len;
	assert_int_equal(proto_encode_refuse(&r, &buf, &len), 0);
	assert_int_equal(proto_decode_refuse(buf, len, &d, NULL, 0), 0);
	assert_int_equal(d.code, PROTO_E_BUSY);
	assert_string_equal(d.message, r.message);
	free(buf);

	r.message[0] = 0; /* empty is fine */
	assert_int_equal(proto_encode_refuse(&r, &buf, &len), 0);
	assert_int_equal(len, 6);
	free(buf);
	memset(r.message, 'm', PROTO_MSG_MAX - 1);
	r.message[PROTO_MSG_MAX - 1] = 0;
	assert_int_equal(proto_encode_refuse(&r, &buf, &len), 0);
	free(buf);
	memset(r.message, 'm', PROTO_MSG_MAX); /* unterminated */
	assert_int_equal(proto_encode_refuse(&r, &buf, &len), -EINVAL);
	strcpy(r.message, "bad \xc0\x80");
	assert_int_equal(proto_encode_refuse(&r, &buf, &len), -EINVAL);
	strcpy(r.message, "ok");
	r.code = 0;
	assert_int_equal(proto_encode_refuse(&r, &buf, &len), -EINVAL);

	static const struct {
		const char *bytes;
		size_t n;
		const char *why;
	} bad[] = {
		{"\xc0\x80", 2, "UTF-8 at byte 0"},	    /* overlong NUL */
		{"a\xe0\x80\xaf", 4, "UTF-8 at byte 1"},   /* overlong '/' */
		{"ab\xed\xa0\x80", 5, "UTF-8 at byte 2"},  /* surrogate */
		{"\xf4\x90\x80\x80", 4, "UTF-8"},	    /* past U+10FFFF */
		{"\xf5\x80\x80\x80", 4, "UTF-8"},	    /* invalid lead */
		{"x\x80", 2, "UTF-8 at byte 1"},	    /* lone continuation */
		{"x\xe2\x86", 3, "UTF-8 at byte 1"},	    /* cut short */
		{"x\xe2(\x92", 4, "UTF-8 at byte 1"},	    /* bad continuation */
		{"x\0y", 3, "NUL"},
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		buf = raw_refuse(PROTO_E_SHAPE, bad[i].bytes, bad[i].n, &len);
		EXPECT_BAD(proto_decode_refuse(buf, len, &d, err, sizeof(err)), d, bad[i].why);
		free(buf);
	}
	char big[PROTO_MSG_MAX];
	memset(big, 'z', sizeof(big));
	buf = raw_refuse(PROTO_E_SHAPE, big, PROTO_MSG_MAX, &len);
	EXPECT_BAD(proto_decode_refuse(buf, len, &d, err, sizeof(err)), d, "at most 255");
	free(buf);
	buf = raw_refuse(0, "x", 1, &len);
	EXPECT_BAD(proto_decode_refuse(buf, len, &d, err, sizeof(err)), d, "unknown code 0");
	free(buf);
	buf = raw_refuse(PROTO_E_SHUTDOWN + 1, "x", 1, &len);
	EXPECT_BAD(proto_decode_refuse(buf, len, &d, err, sizeof(err)), d, "unknown code 12");
	free(buf);
	buf = raw_refuse(PROTO_E_SHUTDOWN, "x", 1, &len);
	assert_int_equal(proto_decode_refuse(buf, len, &d, NULL, 0), 0);
	free(buf);
}

/* ---------------- VM_OFFER ---------------- */

static void test_vm_offer_roundtrip(void **state)
{
	(void)state;
	struct proto_vm_offer o = good_offer(), d;
	void *buf;
	size_t len;
	assert_int_equal(proto_encode_vm_offer(&o, &buf, &len), 0);
	assert_int_equal(len, 2 + 12 + 2 + 22 + 8 + 4 + 4 + 4 + 2 * 16);
	memset(&d, 0x77, sizeof(d));
	assert_int_equal(proto_decode_vm_offer(buf, len, &d, NULL, 0), 0);
	assert_string_equal(d.name, "web-1.prod_a");
	assert_string_equal(d.guest, o.guest);
	assert_true(d.mem_size == 3u << 20);
	assert_int_equal(d.vcpus, 2);
	assert_int_equal(d.irqchip, 1);
	assert_int_equal(d.nr_slots, 2);
	assert_true(d.slots[1].gpa == 2u << 20 && d.slots[1].size == 1u << 20);
	for (unsigned i = 2; i < PROTO_MAX_SLOTS; i++)
		assert_true(d.slots[i].gpa == 0 && d.slots[i].size == 0);
	free(buf);

	/* 64 one-page slots, 1024 vCPUs, an empty guest, a 63-character name. */
	memset(&o, 0, sizeof(o));
	memset(o.name, 'N', PROTO_VM_NAME_MAX);
	o.mem_size = PROTO_MAX_SLOTS * 4096ull;
	o.vcpus = 1024;
	o.nr_slots = PROTO_MAX_SLOTS;
	for (unsigned i = 0; i < PROTO_MAX_SLOTS; i++)
		o.slots[i] = (struct proto_slot){i * 4096ull, 4096};
	assert_int_equal(proto_encode_vm_offer(&o, &buf, &len), 0);
	assert_int_equal(proto_decode_vm_offer(buf, len, &d, NULL, 0), 0);
	assert_int_equal(memcmp(&o, &d, sizeof(o)), 0);
	free(buf);
}

static void check_bad_offer(const struct proto_vm_offer *o, const char *want)
{
	/* The encoder refuses it; written by hand, the decoder does too. */
	void *buf;
	size_t len;
	assert_int_equal(proto_encode_vm_offer(o, &buf, &len), -EINVAL);

	struct wire_writer w;
	wire_writer_init(&w);
	put_str(&w, o->name, strnlen(o->name, sizeof(o->name)));
	put_str(&w, o->guest, strnlen(o->guest, sizeof(o->guest)));
	wire_put_u64(&w, o->mem_size);
	wire_put_u32(&w, o->vcpus);
	wire_put_u32(&w, o->irqchip);
	wire_put_u32(&w, o->nr_slots);
	for (uint32_t i = 0; i < o->nr_slots && i < PROTO_MAX_SLOTS; i++) {
		wire_put_u64(&w, o->slots[i].gpa);
		wire_put_u64(&w, o->slots[i].size);
	}
	buf = take(&w, &len);
	struct proto_vm_offer d;
	EXPECT_BAD(proto_decode_vm_offer(buf, len, &d, err, sizeof(err)), d, want);
	free(buf);
}

static void test_vm_offer_rules(void **state)
{
	(void)state;
	struct proto_vm_offer o;

#define BAD_OFFER(stmt, want)             \
	do {                              \
		o = good_offer();         \
		stmt;                     \
		check_bad_offer(&o, want); \
	} while (0)

	BAD_OFFER(o.name[0] = 0, "name: 0 characters");
	BAD_OFFER(memset(o.name, 'n', PROTO_VM_NAME_MAX + 1), "name: 64 characters");
	BAD_OFFER(strcpy(o.name, "web 1"), "not in [A-Za-z0-9_.-]");
	BAD_OFFER(strcpy(o.name, "a/b"), "not in [A-Za-z0-9_.-]");
	BAD_OFFER(strcpy(o.guest, "x\x1b[0m"), "guest: byte 0x1b");
	BAD_OFFER(o.mem_size = 0, "mem_size 0");
	BAD_OFFER(o.mem_size += 512, "mem_size");
	BAD_OFFER(o.vcpus = 0, "0 vcpus");
	BAD_OFFER(o.vcpus = 1025, "1025 vcpus");
	BAD_OFFER(o.irqchip = 2, "irqchip 2");
	BAD_OFFER(o.nr_slots = 0, "0 slots");
	BAD_OFFER(o.slots[0].gpa = 4096, "slot 0 at gpa 0x1000, want 0x0");
	BAD_OFFER(o.slots[1].gpa = (2u << 20) + 4096, "slot 1 at gpa");	  /* gap */
	BAD_OFFER(o.slots[1].gpa = (2u << 20) - 4096, "slot 1 at gpa");	  /* overlap */
	BAD_OFFER(o.slots[1].gpa += 1, "slot 1 at gpa");		  /* unaligned */
	BAD_OFFER(o.slots[1].size = 0, "slot 1 size 0");
	BAD_OFFER(o.slots[1].size = 100, "slot 1 size 100");
	BAD_OFFER(o.mem_size = 4u << 20, "slots cover 0x300000 bytes");	  /* short */
	BAD_OFFER(o.slots[1].size = 2u << 20, "ends past mem_size");	  /* long */
	/* A slot size that would wrap the running sum. */
	BAD_OFFER(o.slots[1].size = UINT64_MAX - 4095, "ends past mem_size");
	BAD_OFFER((o.slots[0].size = 4096, o.slots[1].gpa = 4096, o.nr_slots = 3,
		   o.slots[2] = (struct proto_slot){0, 4096}),
		  "slot 2 at gpa 0x0"); /* a slot that goes back */
#undef BAD_OFFER

	/* A count past the array is refused before any item is read. */
	struct wire_writer w;
	size_t len;
	wire_writer_init(&w);
	put_str(&w, "vm", 2);
	put_str(&w, "", 0);
	wire_put_u64(&w, 4096);
	wire_put_u32(&w, 1);
	wire_put_u32(&w, 0);
	wire_put_u32(&w, PROTO_MAX_SLOTS + 1);
	for (unsigned i = 0; i < PROTO_MAX_SLOTS + 1; i++) {
		wire_put_u64(&w, i * 4096ull);
		wire_put_u64(&w, 4096);
	}
	void *buf = take(&w, &len);
	struct proto_vm_offer d;
	EXPECT_BAD(proto_decode_vm_offer(buf, len, &d, err, sizeof(err)), d, "65 slots");
	free(buf);

	/* An unterminated name in the struct is an encoder error, not an overread. */
	o = good_offer();
	memset(o.guest, 'g', sizeof(o.guest));
	void *out = NULL;
	assert_int_equal(proto_encode_vm_offer(&o, &out, &len), -EINVAL);
	assert_null(out);
}

/* ---------------- the small messages ---------------- */

static void test_small_roundtrips(void **state)
{
	(void)state;
	void *buf;
	size_t len;

	struct proto_round_end re = {UINT32_MAX, UINT64_MAX, 0, 1ull << 40}, re2;
	assert_int_equal(proto_encode_round_end(&re, &buf, &len), 0);
	assert_int_equal(len, 28);
	assert_int_equal(proto_decode_round_end(buf, len, &re2, NULL, 0), 0);
	assert_true(re2.round == UINT32_MAX && re2.fence == UINT64_MAX && re2.pages == 0 &&
		    re2.remaining == 1ull << 40);
	free(buf);

	struct proto_committed c = {123456789}, c2;
	assert_int_equal(proto_encode_committed(&c, &buf, &len), 0);
	assert_int_equal(len, 8);
	assert_int_equal(proto_decode_committed(buf, len, &c2, NULL, 0), 0);
	assert_true(c2.run_ns == 123456789);
	free(buf);

	struct proto_fence f = {42}, f2;
	assert_int_equal(proto_encode_fence(&f, &buf, &len), 0);
	static const uint8_t fwant[] = {42, 0, 0, 0, 0, 0, 0, 0};
	assert_int_equal(len, 8);
	assert_memory_equal(buf, fwant, 8);
	assert_int_equal(proto_decode_fence(buf, len, &f2, NULL, 0), 0);
	assert_true(f2.fence == 42);
	free(buf);

	struct proto_decision_req dq = {.migration_id = 99}, dq2;
	memset(dq.token, 0xab, PROTO_TOKEN_LEN);
	assert_int_equal(proto_encode_decision_req(&dq, &buf, &len), 0);
	assert_int_equal(len, 24);
	assert_int_equal(proto_decode_decision_req(buf, len, &dq2, NULL, 0), 0);
	assert_true(dq2.migration_id == 99);
	assert_memory_equal(dq2.token, dq.token, PROTO_TOKEN_LEN);
	free(buf);

	for (uint32_t v = PROTO_DECIDED_UNKNOWN; v <= PROTO_DECIDED_RUN; v++) {
		struct proto_decision dd = {.migration_id = 5, .decision = v}, dd2;
		assert_int_equal(proto_encode_decision(&dd, &buf, &len), 0);
		assert_int_equal(len, 12);
		assert_int_equal(proto_decode_decision(buf, len, &dd2, NULL, 0), 0);
		assert_int_equal(dd2.decision, v);
		free(buf);
	}
	struct proto_decision dd = {.migration_id = 5, .decision = 3};
	assert_int_equal(proto_encode_decision(&dd, &buf, &len), -EINVAL);
	uint8_t rawd[12] = {5, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0};
	EXPECT_BAD(proto_decode_decision(rawd, sizeof(rawd), &dd, err, sizeof(err)), dd,
		   "unknown decision 3");

	struct proto_stream_hello sh = {.stream = PROTO_MAX_STREAMS - 1}, sh2;
	memset(sh.token, 0x11, PROTO_TOKEN_LEN);
	assert_int_equal(proto_encode_stream_hello(&sh, &buf, &len), 0);
	assert_int_equal(len, 20);
	assert_int_equal(proto_decode_stream_hello(buf, len, &sh2, NULL, 0), 0);
	assert_int_equal(sh2.stream, 63);
	assert_memory_equal(sh2.token, sh.token, PROTO_TOKEN_LEN);
	((uint8_t *)buf)[16] = 64;
	EXPECT_BAD(proto_decode_stream_hello(buf, len, &sh2, err, sizeof(err)), sh2,
		   "stream 64");
	free(buf);
	sh.stream = 64;
	assert_int_equal(proto_encode_stream_hello(&sh, &buf, &len), -EINVAL);
}

/* ---------------- STATE / COMMIT_REQ ---------------- */

static void test_state(void **state)
{
	(void)state;
	static const char blob[] = "FERRYVMS and then some";
	struct proto_state s = {.fence = 7, .blob = blob, .blob_len = sizeof(blob)}, d;
	void *buf;
	size_t len;
	assert_int_equal(proto_encode_state(&s, &buf, &len), 0);
	assert_int_equal(len, 12 + sizeof(blob));
	assert_int_equal(proto_decode_state(buf, len, &d, NULL, 0), 0);
	assert_true(d.fence == 7);
	assert_int_equal(d.blob_len, sizeof(blob));
	/* A view into the payload, not a copy. */
	assert_ptr_equal(d.blob, (uint8_t *)buf + 12);
	assert_memory_equal(d.blob, blob, sizeof(blob));

	EXPECT_BAD(proto_decode_state(buf, len - 1, &d, err, sizeof(err)), d, "present");
	((uint8_t *)buf)[8] = 0; /* blob_len 0 ... */
	EXPECT_BAD(proto_decode_state(buf, 12, &d, err, sizeof(err)), d, "blob of 0 bytes");
	free(buf);

	s.blob_len = 0;
	assert_int_equal(proto_encode_state(&s, &buf, &len), -EINVAL);
	s.blob_len = 1;
	s.blob = NULL;
	assert_int_equal(proto_encode_state(&s, &buf, &len), -EINVAL);

	/* The largest blob passes, one more byte does not (real 16 MiB buffers). */
	const uint32_t max = PROTO_MAX_CTRL_PAYLOAD - 16;
	uint8_t *big = calloc(1, (size_t)max + 1);
	assert_non_null(big);
	s.blob = big;
	s.blob_len = max;
	assert_int_equal(proto_encode_state(&s, &buf, &len), 0);
	assert_true(len <= PROTO_MAX_CTRL_PAYLOAD);
	assert_int_equal(proto_decode_state(buf, len, &d, NULL, 0), 0);
	free(buf);
	s.blob_len = max + 1;
	assert_int_equal(proto_encode_state(&s, &buf, &len), -EINVAL);
	struct wire_writer w;
	wire_writer_init(&w);
	wire_put_u64(&w, 1);
	wire_put_u32(&w, max + 1);
	wire_put_bytes(&w, big, (size_t)max + 1);
	buf = take(&w, &len);
	EXPECT_BAD(proto_decode_state(buf, len, &d, err, sizeof(err)), d, "want 1..");
	free(buf);
	free(big);
}

static void test_commit_req(void **state)
{
	(void)state;
	struct proto_commit_req *c = calloc(2, sizeof(*c));
	assert_non_null(c);
	struct proto_commit_req *d = c + 1;
	void *buf;
	size_t len;

	c->fence = 9;
	assert_int_equal(proto_encode_commit_req(c, &buf, &len), 0);
	assert_int_equal(len, 12);
	assert_int_equal(proto_decode_commit_req(buf, len, d, NULL, 0), 0);
	assert_int_equal(memcmp(c, d, sizeof(*c)), 0);
	free(buf);

	c->nr_digests = PROTO_MAX_SLOTS;
	for (unsigned i = 0; i < PROTO_MAX_SLOTS; i++)
		memset(c->digests[i], (int)i, PROTO_DIGEST_LEN);
	assert_int_equal(proto_encode_commit_req(c, &buf, &len), 0);
	assert_int_equal(len, 12 + PROTO_MAX_SLOTS * PROTO_DIGEST_LEN);
	assert_int_equal(proto_decode_commit_req(buf, len, d, NULL, 0), 0);
	assert_int_equal(memcmp(c, d, sizeof(*c)), 0);
	free(buf);

	c->nr_digests = 2;
	assert_int_equal(proto_encode_commit_req(c, &buf, &len), 0);
	assert_int_equal(proto_decode_commit_req(buf, len, d, NULL, 0), 0);
	assert_int_equal(d->nr_digests, 2);
	for (unsigned i = 2; i < PROTO_MAX_SLOTS; i++) /* unused digests zeroed */
		for (unsigned j = 0; j < PROTO_DIGEST_LEN; j++)
			assert_int_equal(d->digests[i][j], 0);
	free(buf);

	c->nr_digests = PROTO_MAX_SLOTS + 1;
	assert_int_equal(proto_encode_commit_req(c, &buf, &len), -EINVAL);
	uint8_t raw[12] = {9, 0, 0, 0, 0, 0, 0, 0, PROTO_MAX_SLOTS + 1, 0, 0, 0};
	EXPECT_BAD(proto_decode_commit_req(raw, sizeof(raw), d, err, sizeof(err)), *d,
		   "65 digests");
	raw[8] = 1; /* one digest announced, none present */
	EXPECT_BAD(proto_decode_commit_req(raw, sizeof(raw), d, err, sizeof(err)), *d,
		   "truncated");
	free(c);
}

/* ---------------- PAGES ---------------- */

static void test_pages_golden(void **state)
{
	(void)state;
	struct proto_pages p = {.region = 2, .first_page = 5, .npages = 3, .zero_mask = {0x2}}, d;
	uint8_t out[PROTO_PAGES_HDR_LEN(PROTO_PAGES_MAX)];
	assert_int_equal(proto_encode_pages_hdr(&p, out, sizeof(out)), 24);
	static const uint8_t want[] = {2, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0,
				       3, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0};
	assert_memory_equal(out, want, sizeof(want));

	uint64_t data = 0;
	uint8_t *hdr = dup_exact(out, 24);
	assert_int_equal(proto_decode_pages_hdr(hdr, 24, &d, &data, NULL, 0), 24);
	free(hdr);
	assert_true(data == 2 * 4096);
	assert_int_equal(d.region, 2);
	assert_true(d.first_page == 5);
	assert_int_equal(d.npages, 3);
	assert_true(d.zero_mask[0] == 2);
	for (unsigned i = 1; i < PROTO_PAGES_MAX / 64; i++)
		assert_true(d.zero_mask[i] == 0);

	/* The whole payload, or the header plus part of the data, are accepted; more is not. */
	uint8_t *frame = calloc(1, 24 + 2 * 4096 + 1);
	assert_non_null(frame);
	memcpy(frame, want, 24);
	assert_int_equal(proto_decode_pages_hdr(frame, 24 + 2 * 4096, &d, &data, NULL, 0), 24);
	assert_int_equal(proto_decode_pages_hdr(frame, 24 + 100, &d, &data, NULL, 0), 24);
	assert_int_equal(proto_decode_pages_hdr(frame, 24 + 100, &d, NULL, NULL, 0), 24);
	EXPECT_BAD(proto_decode_pages_hdr(frame, 24 + 2 * 4096 + 1, &d, &data, err, sizeof(err)),
		   d, "8193 bytes after the header, 8192 expected");
	free(frame);

	/* Too small a buffer for the encoder is 0, never a partial header. */
	assert_int_equal(proto_encode_pages_hdr(&p, out, 23), 0);
	assert_int_equal(proto_encode_pages_hdr(&p, NULL, 0), 0);
}

static void test_pages_shapes(void **state)
{
	(void)state;
	static const uint32_t counts[] = {1, 63, 64, 65, 127, 128, 1000, 1024};
	uint8_t out[PROTO_PAGES_HDR_LEN(PROTO_PAGES_MAX)];
	for (size_t k = 0; k < sizeof(counts) / sizeof(counts[0]); k++) {
		uint32_t n = counts[k];
		struct proto_pages p = {.region = 63, .first_page = (1ull << 52) - n, .npages = n},
				   d;
		/* Every other page zero, the last page zero too. */
		for (uint32_t i = 0; i < n; i++)
			if (i % 2 == 0 || i == n - 1)
				p.zero_mask[i / 64] |= 1ull << (i % 64);
		uint32_t zero = 0;
		for (uint32_t i = 0; i < n; i++)
			zero += (p.zero_mask[i / 64] >> (i % 64)) & 1;
		size_t hl = proto_encode_pages_hdr(&p, out, sizeof(out));
		assert_int_equal(hl, PROTO_PAGES_HDR_LEN(n));
		assert_int_equal(hl, 16 + 8 * ((n + 63) / 64));
		uint8_t *h = dup_exact(out, hl);
		uint64_t data = 0;
		assert_int_equal(proto_decode_pages_hdr(h, hl, &d, &data, NULL, 0), (int)hl);
		assert_true(data == (uint64_t)(n - zero) * 4096);
		assert_int_equal(memcmp(&p, &d, sizeof(p)), 0);
		/* Every shorter prefix is refused. */
		for (size_t cut = 0; cut < hl; cut++) {
			uint8_t *s = dup_exact(out, cut);
			EXPECT_BAD(proto_decode_pages_hdr(s, cut, &d, &data, err, sizeof(err)), d,
				   "truncated");
			free(s);
		}
		free(h);
	}

	/* All pages zero: no data follows, and nothing may. */
	struct proto_pages z = {.npages = 64, .zero_mask = {UINT64_MAX}}, d;
	size_t hl = proto_encode_pages_hdr(&z, out, sizeof(out));
	uint64_t data = 1;
	assert_int_equal(proto_decode_pages_hdr(out, hl, &d, &data, NULL, 0), (int)hl);
	assert_true(data == 0);
}

static void *raw_pages(uint32_t region, uint64_t first, uint32_t npages, const uint64_t *mask,
		       unsigned words, size_t *ret_len)
{
	struct wire_writer w;
	wire_writer_init(&w);
	wire_put_u32(&w, region);
	wire_put_u64(&w, first);
	wire_put_u32(&w, npages);
	for (unsigned i = 0; i < words; i++)
		wire_put_u64(&w, mask[i]);
	return take(&w, ret_len);
}

static void test_pages_rules(void **state)
{
	(void)state;
	uint64_t mask[17] = {0};
	struct proto_pages d;
	uint64_t data;
	size_t len;
	void *b;

#define BAD_PAGES(region, first, npages, words, want)                                        \
	do {                                                                                 \
		b = raw_pages(region, first, npages, mask, words, &len);                     \
		EXPECT_BAD(proto_decode_pages_hdr(b, len, &d, &data, err, sizeof(err)), d, want); \
		free(b);                                                                     \
	} while (0)

	BAD_PAGES(0, 0, 0, 0, "0 pages");
	BAD_PAGES(0, 0, 1025, 17, "1025 pages");
	BAD_PAGES(0, 0, UINT32_MAX, 17, "pages");
	BAD_PAGES(PROTO_MAX_SLOTS, 0, 1, 1, "region 64");
	/* first_page + npages wraps 64 bits, or its byte address does. */
	BAD_PAGES(0, UINT64_MAX, 1, 1, "address space");
	BAD_PAGES(0, UINT64_MAX - 10, 64, 1, "address space");
	BAD_PAGES(0, (1ull << 52) - 1, 2, 1, "address space");
	mask[0] = 1ull << 3;
	BAD_PAGES(0, 0, 3, 1, "bits set past page 2");
	mask[0] = 0;
	mask[1] = 1ull << 63;
	BAD_PAGES(0, 0, 127, 2, "bits set past page 126");
	mask[1] = 0;
	BAD_PAGES(0, 0, 65, 1, "zero mask truncated");

	/* The encoder refuses the same. */
	uint8_t out[PROTO_PAGES_HDR_LEN(PROTO_PAGES_MAX)];
	struct proto_pages p = {.npages = 3, .zero_mask = {1ull << 3}};
	assert_int_equal(proto_encode_pages_hdr(&p, out, sizeof(out)), 0);
	p = (struct proto_pages){.npages = 0};
	assert_int_equal(proto_encode_pages_hdr(&p, out, sizeof(out)), 0);
	p = (struct proto_pages){.npages = 1, .first_page = 1ull << 52};
	assert_int_equal(proto_encode_pages_hdr(&p, out, sizeof(out)), 0);
	/* Mask words past ceil(npages/64) are not part of the message: ignored. */
	p = (struct proto_pages){.npages = 1, .zero_mask = {0, 5}};
	assert_int_equal(proto_encode_pages_hdr(&p, out, sizeof(out)), 24);
#undef BAD_PAGES
}

/* ---------------- every message: truncation and trailing bytes ---------------- */

static int dec_hello(const void *p, size_t n, char *e, size_t el)
{
	struct proto_hello m;
	return proto_decode_hello(p, n, &m, e, el);
}
static int dec_welcome(const void *p, size_t n, char *e, size_t el)
{
	struct proto_welcome m;
	return proto_decode_welcome(p, n, &m, e, el);
}
static int dec_refuse(const void *p, size_t n, char *e, size_t el)
{
	struct proto_refuse m;
	return proto_decode_refuse(p, n, &m, e, el);
}
static int dec_vm_offer(const void *p, size_t n, char *e, size_t el)
{
	struct proto_vm_offer m;
	return proto_decode_vm_offer(p, n, &m, e, el);
}
static int dec_round_end(const void *p, size_t n, char *e, size_t el)
{
	struct proto_round_end m;
	return proto_decode_round_end(p, n, &m, e, el);
}
static int dec_state(const void *p, size_t n, char *e, size_t el)
{
	struct proto_state m;
	return proto_decode_state(p, n, &m, e, el);
}
static int dec_commit_req(const void *p, size_t n, char *e, size_t el)
{
	static struct proto_commit_req m; /* big; test code only */
	return proto_decode_commit_req(p, n, &m, e, el);
}
static int dec_committed(const void *p, size_t n, char *e, size_t el)
{
	struct proto_committed m;
	return proto_decode_committed(p, n, &m, e, el);
}
static int dec_decision_req(const void *p, size_t n, char *e, size_t el)
{
	struct proto_decision_req m;
	return proto_decode_decision_req(p, n, &m, e, el);
}
static int dec_decision(const void *p, size_t n, char *e, size_t el)
{
	struct proto_decision m;
	return proto_decode_decision(p, n, &m, e, el);
}
static int dec_stream_hello(const void *p, size_t n, char *e, size_t el)
{
	struct proto_stream_hello m;
	return proto_decode_stream_hello(p, n, &m, e, el);
}
static int dec_fence(const void *p, size_t n, char *e, size_t el)
{
	struct proto_fence m;
	return proto_decode_fence(p, n, &m, e, el);
}

static void check_cuts(const char *what, void *buf, size_t len,
		       int (*dec)(const void *, size_t, char *, size_t))
{
	char err[256];
	assert_int_equal(dec(buf, len, err, sizeof(err)), 0);
	for (size_t cut = 0; cut < len; cut++) {
		void *s = dup_exact(buf, cut);
		err[0] = 0;
		if (dec(s, cut, err, sizeof(err)) != -EBADMSG)
			fail_msg("%s: a %zu-byte prefix of %zu decoded", what, cut, len);
		if (!err[0])
			fail_msg("%s: no reason for a %zu-byte prefix", what, cut);
		free(s);
	}
	uint8_t *more = malloc(len + 1);
	assert_non_null(more);
	memcpy(more, buf, len);
	more[len] = 0;
	err[0] = 0;
	assert_int_equal(dec(more, len + 1, err, sizeof(err)), -EBADMSG);
	if (!strstr(err, "trailing"))
		fail_msg("%s: trailing byte reason \"%s\"", what, err);
	/* err may be NULL or empty: no crash, same answer. */
	assert_int_equal(dec(more, len + 1, NULL, 0), -EBADMSG);
	assert_int_equal(dec(more, len + 1, err, 0), -EBADMSG);
	/* A NULL payload is only ever too short. */
	assert_int_equal(dec(NULL, 0, err, sizeof(err)), -EBADMSG);
	free(more);
	free(buf);
}

static void test_all_cuts(void **state)
{
	(void)state;
	void *b;
	size_t n;

	struct proto_hello h = good_hello();
	assert_int_equal(proto_encode_hello(&h, &b, &n), 0);
	check_cuts("hello", b, n, dec_hello);

	struct proto_welcome wm = {.version = 1, .caps = 3};
	strcpy(wm.agent, "dst");
	assert_int_equal(proto_encode_welcome(&wm, &b, &n), 0);
	check_cuts("welcome", b, n, dec_welcome);

	struct proto_refuse r = {.code = PROTO_E_EXISTS};
	strcpy(r.message, "vm \xc3\xa9 exists");
	assert_int_equal(proto_encode_refuse(&r, &b, &n), 0);
	check_cuts("refuse", b, n, dec_refuse);

	struct proto_vm_offer o = good_offer();
	assert_int_equal(proto_encode_vm_offer(&o, &b, &n), 0);
	check_cuts("vm_offer", b, n, dec_vm_offer);

	struct proto_round_end re = {1, 2, 3, 4};
	assert_int_equal(proto_encode_round_end(&re, &b, &n), 0);
	check_cuts("round_end", b, n, dec_round_end);

	struct proto_state st = {.fence = 3, .blob = "xyz", .blob_len = 3};
	assert_int_equal(proto_encode_state(&st, &b, &n), 0);
	check_cuts("state", b, n, dec_state);

	static struct proto_commit_req cr = {.fence = 5, .nr_digests = 3};
	assert_int_equal(proto_encode_commit_req(&cr, &b, &n), 0);
	check_cuts("commit_req", b, n, dec_commit_req);

	struct proto_committed c = {1};
	assert_int_equal(proto_encode_committed(&c, &b, &n), 0);
	check_cuts("committed", b, n, dec_committed);

	struct proto_decision_req dq = {.migration_id = 1};
	assert_int_equal(proto_encode_decision_req(&dq, &b, &n), 0);
	check_cuts("decision_req", b, n, dec_decision_req);

	struct proto_decision dd = {.migration_id = 1, .decision = PROTO_DECIDED_RUN};
	assert_int_equal(proto_encode_decision(&dd, &b, &n), 0);
	check_cuts("decision", b, n, dec_decision);

	struct proto_stream_hello sh = {.stream = 3};
	assert_int_equal(proto_encode_stream_hello(&sh, &b, &n), 0);
	check_cuts("stream_hello", b, n, dec_stream_hello);

	struct proto_fence f = {1};
	assert_int_equal(proto_encode_fence(&f, &b, &n), 0);
	check_cuts("fence", b, n, dec_fence);
}

/* Encoders refuse what decoders reject, and leave *ret alone when they do. */
static void test_encoders_refuse(void **state)
{
	(void)state;
	void *b = (void *)0x1;
	size_t n = 77;

	struct proto_hello h = good_hello();
	memset(h.agent, 'a', sizeof(h.agent)); /* unterminated */
	assert_int_equal(proto_encode_hello(&h, &b, &n), -EINVAL);
	h = good_hello();
	h.agent[0] = 0;
	assert_int_equal(proto_encode_hello(&h, &b, &n), -EINVAL);
	h = good_hello();
	h.streams = 0;
	assert_int_equal(proto_encode_hello(&h, &b, &n), -EINVAL);
	h = good_hello();
	h.page_size = 65536;
	assert_int_equal(proto_encode_hello(&h, &b, &n), -EINVAL);
	struct proto_welcome wm = {.version = 1};
	assert_int_equal(proto_encode_welcome(&wm, &b, &n), -EINVAL); /* empty agent */
	assert_ptr_equal(b, (void *)0x1);
	assert_int_equal(n, 77);
}

/* ---------------- PAGES_ZSTD ---------------- */

/* Incompressible bytes: splitmix64's finaliser of the index. */
static uint8_t tio_like_rand(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ull;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return (uint8_t)(x ^ (x >> 31));
}

/* A PAGES_ZSTD payload: header for npages (zero_mask), then zstd of `raw` (raw_len bytes). */
static size_t zstd_payload(uint8_t *out, size_t cap, uint32_t npages, uint64_t zero_mask,
			   const void *raw, size_t raw_len)
{
	struct proto_pages ph = {.region = 0, .first_page = 8, .npages = npages,
				 .zero_mask = {zero_mask}};
	size_t hl = proto_encode_pages_hdr(&ph, out, cap);
	assert_true(hl > 0);
	size_t z = ZSTD_compress(out + hl, cap - hl, raw, raw_len, 1);
	assert_false(ZSTD_isError(z));
	return hl + z;
}

static void test_pages_zstd(void **state)
{
	(void)state;
	static uint8_t raw[4 * 4096], buf[8 * 4096], tmp[8 * 4096];
	struct proto_pages m;
	uint64_t dl = 0;
	const void *z = NULL;
	size_t zl = 0, n;

	assert_string_equal(proto_type_name(PROTO_PAGES_ZSTD), "pages_zstd");
	for (size_t i = 0; i < sizeof(raw); i++)
		raw[i] = (uint8_t)(i / 512);
	/* 4 pages, page 1 zero: three pages of data. */
	n = zstd_payload(buf, sizeof(buf), 4, 0x2, raw, 3 * 4096);
	assert_int_equal(proto_decode_pages_zstd(buf, n, &m, &dl, &z, &zl, NULL, 0),
			 PROTO_PAGES_HDR_LEN(4));
	assert_int_equal(dl, 3 * 4096);
	assert_ptr_equal(z, buf + PROTO_PAGES_HDR_LEN(4));
	assert_int_equal(zl, n - PROTO_PAGES_HDR_LEN(4));
	assert_int_equal(m.npages, 4);
	assert_int_equal(m.first_page, 8);

	/* Content size one page short of the header's pages (and one page long). */
	n = zstd_payload(buf, sizeof(buf), 4, 0x2, raw, 2 * 4096);
	EXPECT_BAD(proto_decode_pages_zstd(buf, n, &m, &dl, &z, &zl, err, sizeof(err)), m,
		   "the header's pages are 12288");
	n = zstd_payload(buf, sizeof(buf), 4, 0x2, raw, 4 * 4096);
	EXPECT_BAD(proto_decode_pages_zstd(buf, n, &m, &dl, &z, &zl, err, sizeof(err)), m,
		   "zstd frame of 16384 bytes");
	/* Trailing bytes after the frame; a second frame after it. */
	n = zstd_payload(buf, sizeof(buf), 4, 0x2, raw, 3 * 4096);
	buf[n] = 0;
	EXPECT_BAD(proto_decode_pages_zstd(buf, n + 1, &m, &dl, &z, &zl, err, sizeof(err)), m,
		   "follow it");
	size_t hl = PROTO_PAGES_HDR_LEN(4), one = n - hl;
	memcpy(buf + n, buf + hl, one);
	EXPECT_BAD(proto_decode_pages_zstd(buf, n + one, &m, &dl, &z, &zl, err, sizeof(err)), m,
		   "follow it");
	/* Cut short. */
	EXPECT_BAD(proto_decode_pages_zstd(buf, n - 1, &m, &dl, &z, &zl, err, sizeof(err)), m,
		   "pages_zstd");
	/* Not zstd at all; nothing after the header; every page zero. */
	memset(buf + hl, 0x42, 64);
	EXPECT_BAD(proto_decode_pages_zstd(buf, hl + 64, &m, &dl, &z, &zl, err, sizeof(err)), m,
		   "not a zstd frame");
	EXPECT_BAD(proto_decode_pages_zstd(buf, hl, &m, &dl, &z, &zl, err, sizeof(err)), m,
		   "compressed bytes");
	n = zstd_payload(buf, sizeof(buf), 4, 0xf, raw, 0);
	EXPECT_BAD(proto_decode_pages_zstd(buf, n, &m, &dl, &z, &zl, err, sizeof(err)), m,
		   "every page is zero");
	/* A zstd frame that does not shrink the data is refused (receivers bound it by that). */
	for (size_t i = 0; i < sizeof(raw); i++)
		raw[i] = (uint8_t)(tio_like_rand(i));
	n = zstd_payload(buf, sizeof(buf), 1, 0, raw, 4096);
	EXPECT_BAD(proto_decode_pages_zstd(buf, n, &m, &dl, &z, &zl, err, sizeof(err)), m,
		   "want 1..raw-1");
	/* Without a content size in the frame header. */
	ZSTD_CCtx *cc = ZSTD_createCCtx();
	ZSTD_CCtx_setParameter(cc, ZSTD_c_contentSizeFlag, 0);
	for (size_t i = 0; i < sizeof(raw); i++)
		raw[i] = 7;
	struct proto_pages ph = {.region = 0, .first_page = 0, .npages = 1};
	hl = proto_encode_pages_hdr(&ph, tmp, sizeof(tmp));
	ZSTD_outBuffer o = {.dst = tmp + hl, .size = sizeof(tmp) - hl};
	ZSTD_inBuffer in = {.src = raw, .size = 4096};
	assert_int_equal(ZSTD_compressStream2(cc, &o, &in, ZSTD_e_end), 0);
	ZSTD_freeCCtx(cc);
	EXPECT_BAD(proto_decode_pages_zstd(tmp, hl + o.pos, &m, &dl, &z, &zl, err, sizeof(err)),
		   m, "without a content size");
	/* A bad header as for PAGES. */
	memset(tmp, 0, 16);
	EXPECT_BAD(proto_decode_pages_zstd(tmp, 16, &m, &dl, &z, &zl, err, sizeof(err)), m,
		   "pages");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_names),
		cmocka_unit_test(test_hdr),
		cmocka_unit_test(test_hello_golden),
		cmocka_unit_test(test_hello_rules),
		cmocka_unit_test(test_welcome),
		cmocka_unit_test(test_refuse),
		cmocka_unit_test(test_vm_offer_roundtrip),
		cmocka_unit_test(test_vm_offer_rules),
		cmocka_unit_test(test_small_roundtrips),
		cmocka_unit_test(test_state),
		cmocka_unit_test(test_commit_req),
		cmocka_unit_test(test_pages_golden),
		cmocka_unit_test(test_pages_shapes),
		cmocka_unit_test(test_pages_rules),
		cmocka_unit_test(test_pages_zstd),
		cmocka_unit_test(test_all_cuts),
		cmocka_unit_test(test_encoders_refuse),
		cmocka_unit_test(test_postcopy_msgs),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
