// SPDX-License-Identifier: Apache-2.0
/*
 * Description: the wire codec (transport/wire.c) on its own: values round-trip in
 * little-endian byte order, the writer grows and reports allocation failure stickily, a
 * reader never reads past its end and stays failed once it tried, patches stay inside
 * what was written, and FNV-1a 64 matches the published test vectors.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* cmocka needs the headers above first. */
#include <cmocka.h>

#include "transport/wire.h"

static void test_roundtrip_le(void **state)
{
	(void)state;
	struct wire_writer w;
	wire_writer_init(&w);
	wire_put_u8(&w, 0xa1);
	wire_put_u16(&w, 0xb2c3);
	wire_put_u32(&w, 0xd4e5f607);
	wire_put_u64(&w, 0x0102030405060708ull);
	wire_put_bytes(&w, "xyz", 3);
	void *buf = NULL;
	size_t len = 0;
	assert_int_equal(wire_writer_take(&w, &buf, &len), 0);
	assert_int_equal(len, 1 + 2 + 4 + 8 + 3);
	/* The writer was reset by take: the buffer now belongs to us. */
	assert_null(w.buf);
	assert_int_equal(w.len, 0);

	static const uint8_t want[] = {0xa1, 0xc3, 0xb2, 0x07, 0xf6, 0xe5, 0xd4, 0x08, 0x07,
				       0x06, 0x05, 0x04, 0x03, 0x02, 0x01, 'x',	 'y',  'z'};
	assert_memory_equal(buf, want, sizeof(want));

	struct wire_reader r;
	wire_reader_init(&r, buf, len);
	assert_int_equal(wire_get_u8(&r), 0xa1);
	assert_int_equal(wire_get_u16(&r), 0xb2c3);
	assert_int_equal(wire_get_u32(&r), 0xd4e5f607);
	assert_true(wire_get_u64(&r) == 0x0102030405060708ull);
	char s[3];
	wire_get_bytes(&r, s, 3);
	assert_memory_equal(s, "xyz", 3);
	assert_int_equal(wire_remaining(&r), 0);
	assert_int_equal(r.err, 0);
	free(buf);
}

static void test_writer_grows(void **state)
{
	(void)state;
	struct wire_writer w;
	wire_writer_init(&w);
	for (uint32_t i = 0; i < 100000; i++)
		wire_put_u32(&w, i);
	assert_int_equal(w.err, 0);
	assert_int_equal(w.len, 400000);
	assert_true(w.cap >= w.len);
	struct wire_reader r;
	wire_reader_init(&r, w.buf, w.len);
	for (uint32_t i = 0; i < 100000; i++)
		if (wire_get_u32(&r) != i)
			fail_msg("value %u read back wrong", i);
	assert_int_equal(r.err, 0);
	wire_writer_release(&w);
	assert_null(w.buf);
	wire_writer_release(NULL); /* NULL-safe */
}

static void test_writer_enomem_sticky(void **state)
{
	(void)state;
	struct wire_writer w;
	wire_writer_init(&w);
	wire_put_u32(&w, 1);
	assert_null(wire_reserve(&w, SIZE_MAX));
	assert_int_equal(w.err, -ENOMEM);
	/* Later writes do nothing, even small ones that would fit. */
	size_t len_before = w.len;
	wire_put_u64(&w, 2);
	assert_int_equal(w.len, len_before);
	assert_null(wire_reserve(&w, 1));
	void *buf = (void *)0x1;
	size_t len = 77;
	assert_int_equal(wire_writer_take(&w, &buf, &len), -ENOMEM);
	/* Output parameters untouched on failure; the writer freed its buffer. */
	assert_ptr_equal(buf, (void *)0x1);
	assert_int_equal(len, 77);
	assert_null(w.buf);
}

static void test_empty_take(void **state)
{
	(void)state;
	struct wire_writer w;
	wire_writer_init(&w);
	void *buf = (void *)0x1;
	size_t len = 5;
	assert_int_equal(wire_writer_take(&w, &buf, &len), 0);
	assert_null(buf);
	assert_int_equal(len, 0);
}

static void test_reserve_and_patch(void **state)
{
	(void)state;
	struct wire_writer w;
	wire_writer_init(&w);
	wire_put_u16(&w, 0xffff);
	size_t off = w.len;
	uint8_t *p = wire_reserve(&w, 4);
	assert_non_null(p);
	wire_put_bytes(&w, "abcdef", 6);
	wire_patch_u32(&w, off, 0x11223344);
	static const uint8_t want[] = {0xff, 0xff, 0x44, 0x33, 0x22, 0x11,
				       'a',  'b',  'c',	 'd',  'e',  'f'};
	assert_int_equal(w.len, sizeof(want));
	assert_memory_equal(w.buf, want, sizeof(want));

	/* Patches that would run past what was written are ignored. */
	wire_patch_u32(&w, w.len - 3, 0);
	wire_patch_u32(&w, w.len, 0);
	wire_patch_u32(&w, SIZE_MAX, 0);
	assert_memory_equal(w.buf, want, sizeof(want));
	/* The last four bytes exactly is in range. */
	wire_patch_u32(&w, w.len - 4, 0x64636261);
	assert_memory_equal(w.buf + 8, "abcd", 4);
	assert_int_equal(w.err, 0);
	wire_writer_release(&w);
}

static void test_reader_bounds_sticky(void **state)
{
	(void)state;
	static const uint8_t buf[] = {1, 2, 3, 4, 5, 6};
	struct wire_reader r;
	wire_reader_init(&r, buf, sizeof(buf));
	assert_int_equal(wire_get_u32(&r), 0x04030201);
	assert_int_equal(wire_remaining(&r), 2);
	/* A u32 does not fit in the 2 bytes left: fails, returns 0, consumes nothing... */
	assert_int_equal(wire_get_u32(&r), 0);
	assert_int_equal(r.err, -EBADMSG);
	assert_int_equal(r.pos, 4);
	/* ...and stays failed, even for reads that would have fit. */
	assert_int_equal(wire_get_u8(&r), 0);
	assert_int_equal(wire_get_u16(&r), 0);
	assert_null(wire_get_view(&r, 0));
	assert_int_equal(wire_remaining(&r), 0);
	assert_int_equal(r.err, -EBADMSG);
}

static void test_reader_get_bytes_short(void **state)
{
	(void)state;
	static const uint8_t buf[] = {9, 8, 7};
	struct wire_reader r;
	wire_reader_init(&r, buf, sizeof(buf));
	uint8_t out[4] = {0xee, 0xee, 0xee, 0xee};
	wire_get_bytes(&r, out, 4);
	assert_int_equal(r.err, -EBADMSG);
	/* Nothing copied on a short buffer. */
	for (int i = 0; i < 4; i++)
		assert_int_equal(out[i], 0xee);
}

static void test_reader_view(void **state)
{
	(void)state;
	static const uint8_t buf[] = {1, 2, 3, 4, 5};
	struct wire_reader r;
	wire_reader_init(&r, buf, sizeof(buf));
	const uint8_t *v = wire_get_view(&r, 2);
	assert_ptr_equal(v, buf);
	v = wire_get_view(&r, 3);
	assert_ptr_equal(v, buf + 2);
	/* A zero-length view at the very end is fine. */
	assert_non_null(wire_get_view(&r, 0));
	assert_int_equal(r.err, 0);
	assert_null(wire_get_view(&r, 1));
	assert_int_equal(r.err, -EBADMSG);

	/* Huge lengths must not wrap the bounds check. */
	wire_reader_init(&r, buf, sizeof(buf));
	wire_get_u8(&r);
	assert_null(wire_get_view(&r, SIZE_MAX));
	assert_int_equal(r.err, -EBADMSG);
}

static void test_reader_null_buffer(void **state)
{
	(void)state;
	struct wire_reader r;
	/* A NULL buffer reads as empty whatever length comes with it. */
	wire_reader_init(&r, NULL, 100);
	assert_int_equal(wire_remaining(&r), 0);
	assert_int_equal(wire_get_u8(&r), 0);
	assert_int_equal(r.err, -EBADMSG);
}

static void test_every_truncation(void **state)
{
	(void)state;
	/* A record of mixed fields read from every prefix: only the full one succeeds. */
	struct wire_writer w;
	wire_writer_init(&w);
	wire_put_u16(&w, 7);
	wire_put_u64(&w, 0xdeadbeefcafef00dull);
	wire_put_u8(&w, 3);
	wire_put_u32(&w, 42);
	for (size_t cut = 0; cut <= w.len; cut++) {
		struct wire_reader r;
		wire_reader_init(&r, w.buf, cut);
		uint16_t a = wire_get_u16(&r);
		uint64_t b = wire_get_u64(&r);
		uint8_t c = wire_get_u8(&r);
		uint32_t d = wire_get_u32(&r);
		if (cut < w.len) {
			assert_int_equal(r.err, -EBADMSG);
			assert_true(r.pos <= cut);
		} else {
			assert_int_equal(r.err, 0);
			assert_int_equal(a, 7);
			assert_true(b == 0xdeadbeefcafef00dull);
			assert_int_equal(c, 3);
			assert_int_equal(d, 42);
		}
	}
	wire_writer_release(&w);
}

static void test_fnv1a64_vectors(void **state)
{
	(void)state;
	/* From the FNV reference test suite (Fowler/Noll/Vo). */
	assert_true(wire_fnv1a64("", 0) == 0xcbf29ce484222325ull);
	assert_true(wire_fnv1a64("a", 1) == 0xaf63dc4c8601ec8cull);
	assert_true(wire_fnv1a64("foobar", 6) == 0x85944171f73967e8ull);
	/* Any single flipped bit changes the hash. */
	uint8_t buf[64];
	for (unsigned i = 0; i < sizeof(buf); i++)
		buf[i] = (uint8_t)(i * 7);
	uint64_t h = wire_fnv1a64(buf, sizeof(buf));
	for (unsigned i = 0; i < sizeof(buf) * 8; i++) {
		buf[i / 8] ^= (uint8_t)(1u << (i % 8));
		assert_true(wire_fnv1a64(buf, sizeof(buf)) != h);
		buf[i / 8] ^= (uint8_t)(1u << (i % 8));
	}
}

int main(void)
{
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_roundtrip_le),
	    cmocka_unit_test(test_writer_grows),
	    cmocka_unit_test(test_writer_enomem_sticky),
	    cmocka_unit_test(test_empty_take),
	    cmocka_unit_test(test_reserve_and_patch),
	    cmocka_unit_test(test_reader_bounds_sticky),
	    cmocka_unit_test(test_reader_get_bytes_short),
	    cmocka_unit_test(test_reader_view),
	    cmocka_unit_test(test_reader_null_buffer),
	    cmocka_unit_test(test_every_truncation),
	    cmocka_unit_test(test_fnv1a64_vectors),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
