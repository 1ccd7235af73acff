// SPDX-License-Identifier: Apache-2.0
/*
 * Description: fuzz target for the agent-to-agent protocol codec (transport/proto.c). Any
 * bytes go to proto_hdr_decode and to every proto_decode_* (the whole input, and what
 * follows a 12-byte frame header, so frame-shaped seeds reach each decoder with their real
 * payload). A decoder must either fail with -EBADMSG, give a reason and leave its output
 * untouched, or succeed; then re-encoding must give back exactly the input bytes (the
 * encoding is canonical) and decoding that must give the same message.
 *
 * Built with clang -fsanitize=fuzzer and -DFERRY_LIBFUZZER this is a plain libFuzzer target.
 * Without it (gcc is enough) it has its own main(): it runs every file named on the command
 * line (directories: every regular file in them) and, for each, a number of seeded,
 * reproducible mutations, so ctest can run it over the corpus under ASan/UBSan. The same
 * main writes the seed corpus (--write-corpus DIR) with the real encoders.
 */
#include <dirent.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <zstd.h>

#include "transport/proto.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(cond)                                                                        \
	do {                                                                               \
		if (!(cond)) {                                                             \
			fprintf(stderr, "fuzz_proto: %s:%d: check failed: %s\n", __FILE__, \
				__LINE__, #cond);                                          \
			abort();                                                           \
		}                                                                          \
	} while (0)

#define POISON 0xa5

static int is_poisoned(const void *p, size_t n)
{
	const uint8_t *b = p;
	for (size_t i = 0; i < n; i++)
		if (b[i] != POISON)
			return 0;
	return 1;
}

/*
 * One message type whose struct holds everything (no views): decode; on failure check the
 * error contract; on success re-encode, compare bytes, decode again, compare structs (the
 * decoders zero padding and unused entries, so memcmp is a fair comparison).
 */
#define FUZZ_PLAIN(name)                                                                      \
	static void fuzz_##name(const uint8_t *p, size_t n)                                   \
	{                                                                                     \
		static struct proto_##name a, b; /* static: commit_req is 2 KiB */          \
		char err[256] = "";                                                           \
		void *enc = NULL;                                                             \
		size_t elen = 0;                                                              \
		memset(&a, POISON, sizeof(a));                                                \
		int rc = proto_decode_##name(p, n, &a, err, sizeof(err));                     \
		if (rc < 0) {                                                                 \
			CHECK(rc == -EBADMSG);                                                \
			CHECK(err[0] != 0);                                                   \
			CHECK(is_poisoned(&a, sizeof(a)));                                    \
			return;                                                               \
		}                                                                             \
		CHECK(rc == 0);                                                               \
		CHECK(proto_encode_##name(&a, &enc, &elen) == 0);                             \
		CHECK(elen == n && (n == 0 || memcmp(enc, p, n) == 0));                       \
		memset(&b, 0, sizeof(b));                                                     \
		CHECK(proto_decode_##name(enc, elen, &b, NULL, 0) == 0);                      \
		CHECK(memcmp(&a, &b, sizeof(a)) == 0);                                        \
		free(enc);                                                                    \
	}

FUZZ_PLAIN(hello)
FUZZ_PLAIN(welcome)
FUZZ_PLAIN(refuse)
FUZZ_PLAIN(vm_offer)
FUZZ_PLAIN(round_end)
FUZZ_PLAIN(commit_req)
FUZZ_PLAIN(committed)
FUZZ_PLAIN(decision_req)
FUZZ_PLAIN(decision)
FUZZ_PLAIN(stream_hello)
FUZZ_PLAIN(fence)
FUZZ_PLAIN(vm_accept)
FUZZ_PLAIN(page_req)

/* POSTCOPY_START owns malloc'd bitmaps: decode, re-encode, compare the bytes, free. */
static void fuzz_postcopy_start(const uint8_t *p, size_t n)
{
	struct proto_postcopy_start a;
	char err[256] = "";
	void *enc = NULL;
	size_t elen = 0;
	int rc = proto_decode_postcopy_start(p, n, &a, err, sizeof(err));
	if (rc < 0) {
		CHECK(rc == -EBADMSG || rc == -ENOMEM);
		CHECK(rc == -ENOMEM || err[0] != 0);
		return;
	}
	CHECK(proto_encode_postcopy_start(&a, &enc, &elen) == 0);
	CHECK(elen == n && memcmp(enc, p, n) == 0);
	free(enc);
	proto_postcopy_start_free(&a);
}

/* STATE returns a view into the payload: compare what it points at, and where. */
static void fuzz_state(const uint8_t *p, size_t n)
{
	struct proto_state a, b;
	char err[256] = "";
	void *enc = NULL;
	size_t elen = 0;

	memset(&a, POISON, sizeof(a));
	int rc = proto_decode_state(p, n, &a, err, sizeof(err));
	if (rc < 0) {
		CHECK(rc == -EBADMSG && err[0]);
		CHECK(is_poisoned(&a, sizeof(a)));
		return;
	}
	CHECK(rc == 0);
	CHECK(a.blob == p + 12 && a.blob_len == n - 12);
	CHECK(proto_encode_state(&a, &enc, &elen) == 0);
	CHECK(elen == n && memcmp(enc, p, n) == 0);
	CHECK(proto_decode_state(enc, elen, &b, NULL, 0) == 0);
	CHECK(a.fence == b.fence && a.blob_len == b.blob_len);
	CHECK(b.blob == (uint8_t *)enc + 12 && memcmp(a.blob, b.blob, a.blob_len) == 0);
	free(enc);
}

/* PAGES: only the header is a message; data bytes may follow up to the announced amount. */
static void fuzz_pages(const uint8_t *p, size_t n)
{
	struct proto_pages a, b;
	uint8_t out[PROTO_PAGES_HDR_LEN(PROTO_PAGES_MAX)];
	char err[256] = "";
	uint64_t dl = 0, dl2 = 0;

	memset(&a, POISON, sizeof(a));
	int rc = proto_decode_pages_hdr(p, n, &a, &dl, err, sizeof(err));
	if (rc < 0) {
		CHECK(rc == -EBADMSG && err[0]);
		CHECK(is_poisoned(&a, sizeof(a)));
		return;
	}
	size_t hl = (size_t)rc;
	CHECK(a.npages >= 1 && a.npages <= PROTO_PAGES_MAX);
	CHECK(hl == PROTO_PAGES_HDR_LEN(a.npages) && hl <= n);
	CHECK(n - hl <= dl && dl % 4096 == 0 && dl <= (uint64_t)a.npages * 4096);
	CHECK(a.first_page + a.npages <= (UINT64_C(1) << 52));
	CHECK(proto_encode_pages_hdr(&a, out, sizeof(out)) == hl);
	CHECK(memcmp(out, p, hl) == 0);
	CHECK(proto_encode_pages_hdr(&a, out, hl - 1) == 0);
	CHECK(proto_decode_pages_hdr(out, hl, &b, &dl2, NULL, 0) == (int)hl);
	CHECK(memcmp(&a, &b, sizeof(a)) == 0 && dl == dl2);
}

/*
 * PAGES_ZSTD: the codec's checks, then what a receiver does with a frame that passed them —
 * decompress into a buffer of exactly the announced raw size — must either fail or yield
 * exactly that many bytes, never more.
 */
static void fuzz_pages_zstd(const uint8_t *p, size_t n)
{
	static uint8_t raw[PROTO_PAGES_MAX * 4096 + 64];
	static ZSTD_DCtx *dctx;
	struct proto_pages a, b;
	uint8_t out[PROTO_PAGES_HDR_LEN(PROTO_PAGES_MAX)];
	char err[256] = "";
	uint64_t dl = 0, dl2 = 0;
	const void *z = NULL;
	size_t zl = 0;

	memset(&a, POISON, sizeof(a));
	int rc = proto_decode_pages_zstd(p, n, &a, &dl, &z, &zl, err, sizeof(err));
	if (rc < 0) {
		CHECK(rc == -EBADMSG && err[0]);
		CHECK(is_poisoned(&a, sizeof(a)));
		return;
	}
	size_t hl = (size_t)rc;
	CHECK(hl == PROTO_PAGES_HDR_LEN(a.npages) && hl < n);
	CHECK(z == p + hl && zl == n - hl && zl >= 1 && zl < dl);
	CHECK(dl >= 4096 && dl % 4096 == 0 && dl <= (uint64_t)a.npages * 4096);
	CHECK(proto_encode_pages_hdr(&a, out, sizeof(out)) == hl && memcmp(out, p, hl) == 0);
	CHECK(proto_decode_pages_hdr(out, hl, &b, &dl2, NULL, 0) == (int)hl);
	CHECK(memcmp(&a, &b, sizeof(a)) == 0 && dl == dl2);
	if (!dctx)
		dctx = ZSTD_createDCtx();
	CHECK(dctx);
	/* A canary past the bound: the decompressor must not write beyond dl. */
	memset(raw + dl, 0x5a, 64);
	size_t got = ZSTD_decompressDCtx(dctx, raw, (size_t)dl, z, zl);
	CHECK(ZSTD_isError(got) || got == dl);
	for (unsigned i = 0; i < 64; i++)
		CHECK(raw[dl + i] == 0x5a);
}

static void fuzz_hdr(const uint8_t *p, size_t n)
{
	struct proto_hdr h, h2;
	uint8_t out[PROTO_HDR_LEN];

	if (n < PROTO_HDR_LEN)
		return;
	memset(&h, POISON, sizeof(h));
	if (proto_hdr_decode(p, PROTO_MAX_PAYLOAD, &h) < 0) {
		CHECK(is_poisoned(&h, sizeof(h)));
		/* A tighter limit cannot accept what a looser one refused. */
		CHECK(proto_hdr_decode(p, PROTO_MAX_CTRL_PAYLOAD, &h) < 0);
		return;
	}
	CHECK(h.magic == PROTO_MAGIC && h.flags == 0 && h.len <= PROTO_MAX_PAYLOAD);
	CHECK(strcmp(proto_type_name(h.type), "unknown") != 0);
	proto_hdr_encode(out, h.type, h.len);
	CHECK(memcmp(out, p, PROTO_HDR_LEN) == 0);
	/* A frame's own length is always within a limit of that length. */
	CHECK(proto_hdr_decode(out, h.len, &h2) == 0);
	CHECK(memcmp(&h, &h2, sizeof(h)) == 0);
}

static void fuzz_payload(const uint8_t *p, size_t n)
{
	fuzz_hello(p, n);
	fuzz_welcome(p, n);
	fuzz_refuse(p, n);
	fuzz_vm_offer(p, n);
	fuzz_round_end(p, n);
	fuzz_state(p, n);
	fuzz_commit_req(p, n);
	fuzz_committed(p, n);
	fuzz_decision_req(p, n);
	fuzz_decision(p, n);
	fuzz_vm_accept(p, n);
	fuzz_page_req(p, n);
	fuzz_postcopy_start(p, n);
	fuzz_stream_hello(p, n);
	fuzz_fence(p, n);
	fuzz_pages(p, n);
	fuzz_pages_zstd(p, n);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	fuzz_hdr(data, size);
	fuzz_payload(data, size);
	if (size >= PROTO_HDR_LEN)
		fuzz_payload(data + PROTO_HDR_LEN, size - PROTO_HDR_LEN);
	return 0;
}

#ifndef FERRY_LIBFUZZER
/* ---------------- the plain driver (no libFuzzer) ---------------- */

#define MAX_INPUTS 256
#define MAX_INPUT_LEN (1u << 20)

struct input {
	char *path;
	uint8_t *buf;
	size_t len;
};

/* xorshift64*: a fixed seed makes every CI run try the same mutations. */
static uint64_t rnd(uint64_t *s)
{
	*s ^= *s >> 12;
	*s ^= *s << 25;
	*s ^= *s >> 27;
	return *s * 0x2545f4914f6cdd1dull;
}

static size_t rnd_below(uint64_t *s, size_t n)
{
	return n ? (size_t)(rnd(s) % n) : 0;
}

/* Runs one input from an exact-size heap copy, so ASan sees any read past its end. */
static void run_one(const uint8_t *p, size_t n)
{
	uint8_t *copy = calloc(1, n ? n : 1); /* calloc: an empty input is still defined */
	CHECK(copy);
	if (n)
		memcpy(copy, p, n);
	LLVMFuzzerTestOneInput(copy, n);
	free(copy);
}

/* Values that sit on the codec's boundaries: counts, lengths, limits, sign bits. */
static const uint64_t interesting[] = {
	0, 1, 2, 3, 0x1f, 0x20, 0x3f, 0x40, 0x41, 0x7e, 0x7f, 0x80, 0xff, 0x100, 0x3ff, 0x400,
	0x401, 0xfff, 0x1000, 0xffff, 0x10000, 0xffffff, 0x1000000, 0x7fffffff, 0x80000000,
	0xffffffff, 1ull << 52, (1ull << 52) - 1, UINT64_MAX, UINT64_MAX - 1,
};

/* Mutates buf[0..*len) in place (capacity cap) with one to four random edits. */
static void mutate(uint8_t *buf, size_t *len, size_t cap, const struct input *in, size_t nin,
		   uint64_t *s)
{
	unsigned edits = 1 + (unsigned)rnd_below(s, 4);
	for (unsigned e = 0; e < edits; e++) {
		size_t n = *len;
		switch (rnd_below(s, 9)) {
		case 0: /* flip a bit */
			if (n)
				buf[rnd_below(s, n)] ^= (uint8_t)(1u << rnd_below(s, 8));
			break;
		case 1: /* random byte */
			if (n)
				buf[rnd_below(s, n)] = (uint8_t)rnd(s);
			break;
		case 2: { /* an interesting value, 1/2/4/8 bytes little endian */
			size_t w = (size_t)1 << rnd_below(s, 4);
			if (n < w)
				break;
			size_t pick = rnd_below(s, sizeof(interesting) / sizeof(interesting[0]));
			uint64_t v = interesting[pick];
			size_t at = rnd_below(s, n - w + 1);
			for (size_t i = 0; i < w; i++)
				buf[at + i] = (uint8_t)(v >> (8 * i));
			break;
		}
		case 3: /* insert a byte */
			if (n < cap) {
				size_t at = rnd_below(s, n + 1);
				memmove(buf + at + 1, buf + at, n - at);
				buf[at] = (uint8_t)rnd(s);
				*len = n + 1;
			}
			break;
		case 4: /* delete a byte */
			if (n) {
				size_t at = rnd_below(s, n);
				memmove(buf + at, buf + at + 1, n - at - 1);
				*len = n - 1;
			}
			break;
		case 5: /* truncate */
			*len = rnd_below(s, n + 1);
			break;
		case 6: { /* append a copy of a slice */
			if (!n)
				break;
			size_t at = rnd_below(s, n), k = 1 + rnd_below(s, n - at);
			if (k > cap - n)
				k = cap - n;
			memmove(buf + n, buf + at, k);
			*len = n + k;
			break;
		}
		case 7: { /* splice: keep a head, take another input's tail */
			const struct input *o = &in[rnd_below(s, nin)];
			size_t head = rnd_below(s, n + 1), from = rnd_below(s, o->len + 1);
			size_t k = o->len - from;
			if (k > cap - head)
				k = cap - head;
			memcpy(buf + head, o->buf + from, k);
			*len = head + k;
			break;
		}
		case 8: /* a 16-bit string length or count just off the real one */
			if (n >= 2) {
				size_t at = rnd_below(s, n - 1);
				unsigned v = (unsigned)(buf[at] | buf[at + 1] << 8);
				v += rnd_below(s, 2) ? 1u : 0xffffu;
				buf[at] = (uint8_t)v;
				buf[at + 1] = (uint8_t)(v >> 8);
			}
			break;
		}
	}
}

static int read_file(const char *path, struct input *in)
{
	FILE *f = fopen(path, "rb");
	if (!f)
		return -errno;
	in->buf = malloc(MAX_INPUT_LEN);
	if (!in->buf) {
		fclose(f);
		return -ENOMEM;
	}
	in->len = fread(in->buf, 1, MAX_INPUT_LEN, f);
	int bad = ferror(f);
	fclose(f);
	if (bad)
		return -EIO;
	in->path = strdup(path);
	return in->path ? 0 : -ENOMEM;
}

static int add_path(const char *path, struct input *in, size_t *nin)
{
	struct stat st;
	if (stat(path, &st) < 0)
		return -errno;
	if (!S_ISDIR(st.st_mode)) {
		if (*nin == MAX_INPUTS)
			return -E2BIG;
		int r = read_file(path, &in[*nin]);
		if (r == 0)
			(*nin)++;
		return r;
	}
	struct dirent **names;
	int n = scandir(path, &names, NULL, alphasort); /* sorted: runs are reproducible */
	if (n < 0)
		return -errno;
	int r = 0;
	for (int i = 0; i < n; i++) {
		char full[4096];
		if (!r && names[i]->d_name[0] != '.') {
			snprintf(full, sizeof(full), "%s/%s", path, names[i]->d_name);
			if (stat(full, &st) == 0 && S_ISREG(st.st_mode))
				r = add_path(full, in, nin);
		}
		free(names[i]);
	}
	free(names);
	return r;
}

/* ---------------- the seed corpus ---------------- */

static int write_frame(const char *dir, const char *name, uint16_t type, const void *payload,
		       size_t len)
{
	char path[4096];
	uint8_t hdr[PROTO_HDR_LEN];
	snprintf(path, sizeof(path), "%s/%s", dir, name);
	FILE *f = fopen(path, "wb");
	if (!f)
		return -errno;
	proto_hdr_encode(hdr, type, (uint32_t)len);
	size_t w = fwrite(hdr, 1, sizeof(hdr), f);
	if (len)
		w += fwrite(payload, 1, len, f);
	if (fclose(f) != 0 || w != sizeof(hdr) + len)
		return -EIO;
	return 0;
}

/* Runs the encoder call (which fills b and n), then writes the frame and frees b. */
#define SEED(name, type, encode_call)                                   \
	do {                                                            \
		b = NULL;                                               \
		n = 0;                                                  \
		CHECK((encode_call) == 0);                              \
		r |= write_frame(dir, name, type, b, n);                \
		free(b);                                                \
	} while (0)

static int write_corpus(const char *dir)
{
	void *b = NULL;
	size_t n = 0;
	int r = 0;

	if (mkdir(dir, 0755) < 0 && errno != EEXIST)
		return -errno;

	struct proto_hello h = {.min_version = 1, .max_version = 1, .migration_id = 42,
				.caps = PROTO_CAP_TCP | PROTO_CAP_VERIFY, .page_size = 4096,
				.streams = 4};
	strcpy(h.agent, "host-a");
	SEED("hello.bin", PROTO_HELLO, proto_encode_hello(&h, &b, &n));

	struct proto_welcome w = {.version = 1, .caps = PROTO_CAP_TCP | PROTO_CAP_VERIFY};
	strcpy(w.agent, "host-b");
	for (unsigned i = 0; i < PROTO_TOKEN_LEN; i++)
		w.token[i] = (uint8_t)(i * 17 + 3);
	SEED("welcome.bin", PROTO_WELCOME, proto_encode_welcome(&w, &b, &n));

	struct proto_refuse rf = {.code = PROTO_E_BUSY};
	strcpy(rf.message, "at the incoming-migration limit (2) \xe2\x80\x94 retry later");
	SEED("refuse.bin", PROTO_REFUSE, proto_encode_refuse(&rf, &b, &n));
	rf.code = PROTO_E_VERIFY;
	strcpy(rf.message, "slot 1 digest differs");
	SEED("abort.bin", PROTO_ABORT, proto_encode_refuse(&rf, &b, &n));

	struct proto_vm_offer o = {
		.mem_size = 3u << 20,
		.vcpus = 2,
		.irqchip = 1,
		.nr_slots = 3,
		.slots = {{0, 1u << 20}, {1u << 20, 1u << 20}, {2u << 20, 1u << 20}},
	};
	strcpy(o.name, "web-1");
	strcpy(o.guest, "memcheck");
	SEED("vm_offer.bin", PROTO_VM_OFFER, proto_encode_vm_offer(&o, &b, &n));

	r |= write_frame(dir, "vm_accept.bin", PROTO_VM_ACCEPT, NULL, 0);

	struct proto_round_end re = {.round = 3, .fence = 3, .pages = 1000, .remaining = 17};
	SEED("round_end.bin", PROTO_ROUND_END, proto_encode_round_end(&re, &b, &n));

	static const char blob[] = "FERRYVMS\x01\x00\x00\x00 a short stand-in for a state blob";
	struct proto_state st = {.fence = 9, .blob = blob, .blob_len = sizeof(blob) - 1};
	SEED("state.bin", PROTO_STATE, proto_encode_state(&st, &b, &n));

	static struct proto_commit_req cr = {.fence = 9, .nr_digests = 3};
	for (unsigned i = 0; i < 3; i++)
		for (unsigned j = 0; j < PROTO_DIGEST_LEN; j++)
			cr.digests[i][j] = (uint8_t)(i * 31 + j);
	SEED("commit_req.bin", PROTO_COMMIT_REQ, proto_encode_commit_req(&cr, &b, &n));

	struct proto_committed c = {.run_ns = 1234567};
	SEED("committed.bin", PROTO_COMMITTED, proto_encode_committed(&c, &b, &n));

	struct proto_decision_req dq = {.migration_id = 42};
	memcpy(dq.token, w.token, PROTO_TOKEN_LEN);
	SEED("decision_req.bin", PROTO_DECISION_REQ, proto_encode_decision_req(&dq, &b, &n));

	struct proto_decision d = {.migration_id = 42, .decision = PROTO_DECIDED_RUN};
	SEED("decision.bin", PROTO_DECISION, proto_encode_decision(&d, &b, &n));

	struct proto_stream_hello sh = {.stream = 3};
	memcpy(sh.token, w.token, PROTO_TOKEN_LEN);
	SEED("stream_hello.bin", PROTO_STREAM_HELLO, proto_encode_stream_hello(&sh, &b, &n));

	struct proto_fence f = {.fence = 9};
	SEED("fence.bin", PROTO_FENCE, proto_encode_fence(&f, &b, &n));

	/* Postcopy: 2 slots of 65 and 8 pages; push form (no flags), then pull over RDMA. */
	uint64_t bits0[2] = {0x5, 0x1}, bits1[1] = {0xff};
	struct proto_postcopy_start ps = {.fence = 9, .nr_slots = 2, .npages = {65, 8},
					  .bitmap = {bits0, bits1}};
	SEED("postcopy_start.bin", PROTO_POSTCOPY_START, proto_encode_postcopy_start(&ps, &b, &n));
	ps.flags = PROTO_POSTCOPY_PULL_RDMA;
	SEED("postcopy_start_pull.bin", PROTO_POSTCOPY_START,
	     proto_encode_postcopy_start(&ps, &b, &n));
	struct proto_page_req pq = {.slot = 1, .first_page = 3, .npages = 16};
	SEED("page_req.bin", PROTO_PAGE_REQ, proto_encode_page_req(&pq, &b, &n));

	/* 65 pages (two mask words), all zero but one: a header and one page of data. */
	struct proto_pages pg = {.region = 1, .first_page = 256, .npages = 65,
				 .zero_mask = {~(1ull << 5), 1}};
	uint8_t *frame = calloc(1, PROTO_PAGES_HDR_LEN(65) + 4096);
	CHECK(frame);
	size_t hl = proto_encode_pages_hdr(&pg, frame, PROTO_PAGES_HDR_LEN(65));
	CHECK(hl == PROTO_PAGES_HDR_LEN(65));
	for (unsigned i = 0; i < 4096; i++)
		frame[hl + i] = (uint8_t)(i * 7);
	r |= write_frame(dir, "pages.bin", PROTO_PAGES, frame, hl + 4096);
	free(frame);

	/* PAGES_ZSTD: 3 pages, the middle one zero, two compressible data pages. */
	struct proto_pages pz = {.region = 0, .first_page = 40, .npages = 3, .zero_mask = {2}};
	uint8_t raw[2 * 4096], zf[PROTO_PAGES_HDR_LEN(3) + 2 * 4096];
	for (unsigned i = 0; i < sizeof(raw); i++)
		raw[i] = (uint8_t)(i / 100);
	hl = proto_encode_pages_hdr(&pz, zf, sizeof(zf));
	CHECK(hl == PROTO_PAGES_HDR_LEN(3));
	size_t zn = ZSTD_compress(zf + hl, sizeof(zf) - hl, raw, sizeof(raw), 1);
	CHECK(!ZSTD_isError(zn));
	r |= write_frame(dir, "pages_zstd.bin", PROTO_PAGES_ZSTD, zf, hl + zn);

	return r ? -EIO : 0;
}

static void usage(void)
{
	fprintf(stderr,
		"usage: fuzz_proto [-n MUTATIONS] [-s SEED] PATH...   run files/directories\n"
		"       fuzz_proto --write-corpus DIR                  write the seed corpus\n");
}

int main(int argc, char **argv)
{
	static struct input in[MAX_INPUTS];
	size_t nin = 0;
	unsigned long mutations = 1000;
	uint64_t seed0 = 0x66657272795f7031ull; /* "ferry_p1" */

	int i = 1;
	for (; i < argc && argv[i][0] == '-'; i++) {
		if (!strcmp(argv[i], "--write-corpus") && i + 1 < argc) {
			int r = write_corpus(argv[i + 1]);
			if (r < 0) {
				fprintf(stderr, "fuzz_proto: writing %s: %s\n", argv[i + 1],
					strerror(-r));
				return 1;
			}
			printf("fuzz_proto: corpus written to %s\n", argv[i + 1]);
			return 0;
		} else if (!strcmp(argv[i], "-n") && i + 1 < argc) {
			mutations = strtoul(argv[++i], NULL, 0);
		} else if (!strcmp(argv[i], "-s") && i + 1 < argc) {
			seed0 = strtoull(argv[++i], NULL, 0);
		} else {
			usage();
			return 2;
		}
	}
	if (i == argc) {
		usage();
		return 2;
	}
	for (; i < argc; i++) {
		int r = add_path(argv[i], in, &nin);
		if (r < 0) {
			fprintf(stderr, "fuzz_proto: %s: %s\n", argv[i], strerror(-r));
			return 1;
		}
	}
	if (!nin) {
		fprintf(stderr, "fuzz_proto: no inputs\n");
		return 1;
	}

	uint8_t *buf = malloc(MAX_INPUT_LEN);
	CHECK(buf);
	unsigned long runs = 0;
	for (size_t k = 0; k < nin; k++) {
		run_one(in[k].buf, in[k].len);
		runs++;
		uint64_t s = seed0 ^ (0x9e3779b97f4a7c15ull * (k + 1));
		for (unsigned long m = 0; m < mutations; m++) {
			size_t len = in[k].len;
			if (len > MAX_INPUT_LEN - 256)
				len = MAX_INPUT_LEN - 256;
			memcpy(buf, in[k].buf, len);
			mutate(buf, &len, len + 256, in, nin, &s);
			run_one(buf, len);
			runs++;
		}
	}
	printf("fuzz_proto: %zu inputs, %lu runs, no failures\n", nin, runs);
	free(buf);
	for (size_t k = 0; k < nin; k++) {
		free(in[k].buf);
		free(in[k].path);
	}
	return 0;
}
#endif /* !FERRY_LIBFUZZER */
