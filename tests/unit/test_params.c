// SPDX-License-Identifier: Apache-2.0
/*
 * Description: guest parameter and size parsing (agent/vm/params.c) and the built-in guest
 * table (agent/vm/guests.c). Pure: sizes with K/M/G/T suffixes, garbage/negative/overflow
 * rejection with outputs left untouched, symbolic pattern names, per-guest key sets and
 * ranges with messages naming what is allowed, free-form keys for other guests, and that
 * every embedded image carries a header the flat loader will accept.
 */
#include <errno.h>
#include <string.h>

#include "testutil.h"

#define UNTOUCHED 0xdeadbeefcafef00dull

static void size_ok(const char *s, uint64_t want)
{
	uint64_t v = UNTOUCHED;
	int r = vm_size_parse(s, &v);
	if (r != 0 || v != want)
		fail_msg("vm_size_parse(\"%s\") = %d, %llu; want %llu", s, r,
			 (unsigned long long)v, (unsigned long long)want);
}

static void size_bad(const char *s, int want_err)
{
	uint64_t v = UNTOUCHED;
	int r = vm_size_parse(s, &v);
	if (r != want_err)
		fail_msg("vm_size_parse(\"%s\") = %d; want %d", s, r, want_err);
	assert_int_equal(v, UNTOUCHED);
}

static void test_size_parse(void **state)
{
	(void)state;
	size_ok("0", 0);
	size_ok("4096", 4096);
	size_ok("2k", 2048);
	size_ok("512M", 512ull << 20);
	size_ok("1G", 1ull << 30);
	size_ok("3g", 3ull << 30);
	size_ok("1T", 1ull << 40);
	size_ok("64KiB", 64ull << 10);
	size_ok("8Mi", 8ull << 20);
	size_ok("0x1000", 4096);
	size_ok("0X10M", 16ull << 20);
	size_ok("18446744073709551615", UINT64_MAX);
	size_ok("16777215T", 16777215ull << 40);

	size_bad("", -EINVAL);
	size_bad("M", -EINVAL);
	size_bad("-1", -EINVAL);
	size_bad("-512M", -EINVAL);
	size_bad("+1", -EINVAL);
	size_bad(" 1", -EINVAL);
	size_bad("1 ", -EINVAL);
	size_bad("1.5G", -EINVAL);
	size_bad("12X", -EINVAL);
	size_bad("1MB", -EINVAL);
	size_bad("1Mx", -EINVAL);
	size_bad("0x", -EINVAL);
	size_bad("0xg", -EINVAL);
	size_bad("abc", -EINVAL);
	size_bad("18446744073709551616", -ERANGE);
	size_bad("99999999999999999999999", -ERANGE);
	size_bad("16777216T", -ERANGE);
	size_bad("0x10000000000000000", -ERANGE);
	assert_int_equal(vm_size_parse(NULL, &(uint64_t){0}), -EINVAL);
}

static void param_ok(const char *guest, const char *kv, const char *key, uint64_t value)
{
	struct ferry_param p;
	struct vm_error err = {{0}};
	memset(&p, 0xa5, sizeof(p));
	int r = vm_param_parse(guest, kv, &p, &err);
	if (r != 0)
		fail_msg("vm_param_parse(%s, \"%s\") = %d: %s", guest ? guest : "NULL", kv, r,
			 err.msg);
	assert_string_equal(p.key, key);
	assert_int_equal(p.value, value);
	/* The key is NUL-padded, so params copied into the boot info hold no stale bytes. */
	for (size_t i = strlen(key); i < FERRY_PARAM_KEY_MAX; i++)
		assert_int_equal(p.key[i], 0);
}

/* Expects failure with a message containing `needle`, and *ret untouched. */
static void param_bad(const char *guest, const char *kv, const char *needle)
{
	struct ferry_param p, before;
	struct vm_error err = {{0}};
	memset(&p, 0x5a, sizeof(p));
	before = p;
	int r = vm_param_parse(guest, kv, &p, &err);
	if (r >= 0)
		fail_msg("vm_param_parse(%s, \"%s\") accepted (value %llu)",
			 guest ? guest : "NULL", kv, (unsigned long long)p.value);
	assert_memory_equal(&p, &before, sizeof(p));
	if (!strstr(err.msg, needle))
		fail_msg("vm_param_parse(%s, \"%s\"): message \"%s\" lacks \"%s\"",
			 guest ? guest : "NULL", kv, err.msg, needle);
}

static void test_param_dirtier(void **state)
{
	(void)state;
	param_ok("dirtier", "wss=64M", "wss", 64ull << 20);
	param_ok("dirtier", "wss=4096", "wss", 4096);
	param_ok("dirtier", "pattern=seq", "pattern", 0);
	param_ok("dirtier", "pattern=random", "pattern", 1);
	param_ok("dirtier", "pattern=hotcold", "pattern", 2);
	param_ok("dirtier", "pattern=HotCold", "pattern", 2);
	param_ok("dirtier", "pattern=2", "pattern", 2);
	param_ok("dirtier", "rate=0", "rate", 0);
	param_ok("dirtier", "rate=20k", "rate", 20480);
	param_ok("dirtier", "hot_pct=1", "hot_pct", 1);
	param_ok("dirtier", "hot_pct=100", "hot_pct", 100);
	param_ok("dirtier", "hot_ratio=0", "hot_ratio", 0);

	param_bad("dirtier", "pattern=zigzag", "seq, random, hotcold");
	param_bad("dirtier", "pattern=3", "0..2");
	param_bad("dirtier", "wss=0", "at least 4096");
	param_bad("dirtier", "wss=5000", "multiple of 4096");
	param_bad("dirtier", "wss=-4096", "non-negative number");
	param_bad("dirtier", "hot_pct=0", "1..100");
	param_bad("dirtier", "hot_pct=101", "1..100");
	param_bad("dirtier", "hot_ratio=200", "0..100");
	param_bad("dirtier", "rate=fast", "not a non-negative number");
	param_bad("dirtier", "rate=99999999999999999999", "too large");
	param_bad("dirtier", "stride=2", "allowed: wss, pattern, rate, hot_pct, hot_ratio");
	param_bad("dirtier", "wsss=4096", "guest dirtier has no parameter 'wsss'");
}

static void test_param_memcheck_touch(void **state)
{
	(void)state;
	param_ok("memcheck", "wss=1G", "wss", 1ull << 30);
	param_bad("memcheck", "pattern=seq", "allowed: wss)");
	param_bad("memcheck", "rate=1", "guest memcheck has no parameter 'rate'");

	param_ok("touch", "stride=512", "stride", 512);
	param_ok("touch", "offset=0", "offset", 0);
	param_ok("touch", "offset=3", "offset", 3);
	param_ok("touch", "wss=2M", "wss", 2ull << 20);
	param_bad("touch", "stride=0", "at least 1");
	param_bad("touch", "pattern=random", "allowed: wss, stride, offset");
}

static void test_param_other_guests(void **state)
{
	(void)state;
	/* Not built in (or unknown guest): any well-formed key, numeric or pattern value. */
	param_ok(NULL, "foo=12", "foo", 12);
	param_ok("my-guest", "Foo_Bar.9-x=0x20", "Foo_Bar.9-x", 32);
	param_ok(NULL, "pattern=hotcold", "pattern", 2);
	param_ok(NULL, "stride=0", "stride", 0);
	param_ok(NULL, "abcdefghijklmnopqrstuvw=1", "abcdefghijklmnopqrstuvw", 1); /* 23 chars */
	param_bad(NULL, "abcdefghijklmnopqrstuvwx=1", "longer than 23");
	param_bad(NULL, "=5", "empty key");
	param_bad(NULL, "novalue", "expected key=value");
	param_bad(NULL, "k=", "not a non-negative number");
	param_bad(NULL, "k=seq", "not a non-negative number");
	param_bad(NULL, "bad key=1", "keys use letters");
	param_bad("other", "k=1=2", "not a non-negative number");

	struct ferry_param p;
	struct vm_error err;
	assert_int_equal(vm_param_parse("dirtier", NULL, &p, &err), -EINVAL);
	assert_int_equal(vm_param_parse("dirtier", "wss=4096", NULL, &err), -EINVAL);
	/* A NULL err is allowed: callers that only want the code need not pass one. */
	assert_int_equal(vm_param_parse("dirtier", "wss=1", &p, NULL), -EINVAL);
}

static void test_builtin_table(void **state)
{
	(void)state;
	static const char *const names[] = {"dirtier", "memcheck", "touch"};
	assert_int_equal(vm_builtin_guest_count(), 3);
	assert_null(vm_builtin_guest_at(3));
	assert_null(vm_builtin_guest_find("nope"));
	assert_null(vm_builtin_guest_find(NULL));
	for (unsigned i = 0; i < 3; i++) {
		const struct vm_builtin_guest *g = vm_builtin_guest_find(names[i]);
		assert_non_null(g);
		assert_ptr_equal(g, vm_builtin_guest_at(i));
		assert_string_equal(g->name, names[i]);
		assert_non_null(g->help);
		assert_true(strstr(g->help, "wss") != NULL);
		/* Every built-in guest takes wss, so the parser must know each one. */
		struct ferry_param p;
		struct vm_error err = {{0}};
		assert_int_equal(vm_param_parse(g->name, "wss=8K", &p, &err), 0);

		/* The header the linker script wrote, as the flat loader will check it. */
		struct ferry_image_hdr h;
		assert_true(g->size >= sizeof(h));
		memcpy(&h, g->image, sizeof(h));
		assert_int_equal(h.magic, FERRY_IMAGE_MAGIC);
		assert_int_equal(h.version, FERRY_IMAGE_VERSION);
		assert_int_equal(h.hdr_size, sizeof(h));
		assert_int_equal(h.load_addr, FERRY_IMAGE_GPA);
		assert_int_equal(h.file_size, g->size);
		assert_true(h.mem_size >= h.file_size && h.mem_size <= FERRY_IMAGE_MAX);
		assert_true(h.entry >= h.load_addr + sizeof(h) &&
			    h.entry < h.load_addr + h.file_size);
		/* The images are 16-byte aligned in .rodata. */
		assert_int_equal((uintptr_t)g->image % 16, 0);
	}
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_size_parse),
		cmocka_unit_test(test_param_dirtier),
		cmocka_unit_test(test_param_memcheck_touch),
		cmocka_unit_test(test_param_other_guests),
		cmocka_unit_test(test_builtin_table),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
