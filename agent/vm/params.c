// SPDX-License-Identifier: Apache-2.0
/*
 * Guest parameters and sizes as operators type them: "wss=64M", "pattern=hotcold",
 * "rate=20k", "--mem 512M". Numbers are decimal or 0x-hex with an optional K/M/G/T suffix
 * (powers of 1024; "Ki"/"KiB" spellings too). For the built-in guests the keys and their
 * ranges are known here, so a typo or an impossible value fails on the host with a message
 * naming what is allowed, instead of as a FERRY_ERR_PARAM report from a guest that already
 * booted. Other guests get any well-formed key. Errors are -EINVAL, or -ERANGE for a
 * number past 2^64-1. Pure functions, no state.
 */
#include "vm_internal.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

/* What a built-in guest accepts for one key. */
struct key_spec {
	const char *key;
	uint64_t min;
	uint64_t max;
	uint64_t multiple; /* value must be a multiple of this (1: any) */
	bool pattern;      /* accepts seq|random|hotcold */
};

struct guest_spec {
	const char *guest;
	const struct key_spec *keys;
};

#define PAGE 4096ull
#define WSS {"wss", PAGE, UINT64_MAX, PAGE, false}

static const struct key_spec dirtier_keys[] = {
	WSS,
	{"pattern", 0, 2, 1, true},
	{"rate", 0, UINT64_MAX, 1, false},
	{"hot_pct", 1, 100, 1, false},
	{"hot_ratio", 0, 100, 1, false},
	{"passes", 0, UINT64_MAX, 1, false},
	{NULL, 0, 0, 0, false},
};

static const struct key_spec memcheck_keys[] = {
	WSS,
	{NULL, 0, 0, 0, false},
};

static const struct key_spec touch_keys[] = {
	WSS,
	{"stride", 1, UINT64_MAX, 1, false},
	{"offset", 0, UINT64_MAX, 1, false},
	{NULL, 0, 0, 0, false},
};

static const struct guest_spec guest_specs[] = {
	{"dirtier", dirtier_keys},
	{"memcheck", memcheck_keys},
	{"touch", touch_keys},
};

/* Symbolic values of pattern=, in the order of the dirtier's numeric codes. */
static const char *const pattern_names[] = {"seq", "random", "hotcold"};

/*
 * Parses a whole string as a number with optional suffix. -EINVAL for anything that is not
 * exactly that (empty, sign, spaces, junk after the suffix), -ERANGE past 2^64-1.
 */
static int parse_number(const char *s, uint64_t *ret)
{
	unsigned base = 10;
	uint64_t v = 0;
	const char *p = s;

	if (p[0] == '0' && (p[1] == 'x' || p[1] == 'X')) {
		base = 16;
		p += 2;
	}
	const char *digits = p;
	for (;; p++) {
		unsigned d;
		if (*p >= '0' && *p <= '9')
			d = (unsigned)(*p - '0');
		else if (base == 16 && *p >= 'a' && *p <= 'f')
			d = (unsigned)(*p - 'a' + 10);
		else if (base == 16 && *p >= 'A' && *p <= 'F')
			d = (unsigned)(*p - 'A' + 10);
		else
			break;
		if (v > (UINT64_MAX - d) / base)
			return -ERANGE;
		v = v * base + d;
	}
	if (p == digits)
		return -EINVAL;

	unsigned shift = 0;
	switch (*p) {
	case 'k':
	case 'K':
		shift = 10;
		break;
	case 'm':
	case 'M':
		shift = 20;
		break;
	case 'g':
	case 'G':
		shift = 30;
		break;
	case 't':
	case 'T':
		shift = 40;
		break;
	}
	if (shift) {
		p++;
		if (p[0] == 'i')
			p += p[1] == 'B' ? 2 : 1;
		if (v > UINT64_MAX >> shift)
			return -ERANGE;
		v <<= shift;
	}
	if (*p)
		return -EINVAL;
	*ret = v;
	return 0;
}

int vm_size_parse(const char *s, uint64_t *ret)
{
	uint64_t v;
	if (!s || !ret)
		return -EINVAL;
	int r = parse_number(s, &v);
	if (r < 0)
		return r;
	*ret = v;
	return 0;
}

static const struct guest_spec *guest_spec_find(const char *guest)
{
	if (!guest)
		return NULL;
	for (size_t i = 0; i < sizeof(guest_specs) / sizeof(guest_specs[0]); i++)
		if (!strcmp(guest_specs[i].guest, guest))
			return &guest_specs[i];
	return NULL;
}

/* "wss, pattern, rate" for messages. */
static void allowed_keys(const struct guest_spec *g, char *buf, size_t len)
{
	size_t n = 0;
	buf[0] = '\0';
	for (const struct key_spec *k = g->keys; k->key && n < len; k++)
		n += (size_t)snprintf(buf + n, len - n, "%s%s", n ? ", " : "", k->key);
}

static bool key_char_ok(char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
	       c == '_' || c == '-' || c == '.';
}

static int parse_pattern(const char *v, uint64_t *ret)
{
	for (uint64_t i = 0; i < sizeof(pattern_names) / sizeof(pattern_names[0]); i++) {
		if (!strcasecmp(v, pattern_names[i])) {
			*ret = i;
			return 0;
		}
	}
	return -EINVAL;
}

int vm_param_parse(const char *guest, const char *kv, struct ferry_param *ret,
		   struct vm_error *err)
{
	if (!kv || !ret)
		return vm_err(err, -EINVAL, "no parameter given");
	const char *eq = strchr(kv, '=');
	if (!eq)
		return vm_err(err, -EINVAL, "parameter '%s': expected key=value", kv);
	size_t klen = (size_t)(eq - kv);
	if (klen == 0)
		return vm_err(err, -EINVAL, "parameter '%s': empty key", kv);
	if (klen >= FERRY_PARAM_KEY_MAX)
		return vm_err(err, -EINVAL, "parameter '%.*s': key longer than %u characters",
			    (int)klen, kv, FERRY_PARAM_KEY_MAX - 1);
	for (size_t i = 0; i < klen; i++)
		if (!key_char_ok(kv[i]))
			return vm_err(err, -EINVAL,
				    "parameter '%.*s': keys use letters, digits, '_', '-', '.'",
				    (int)klen, kv);
	char key[FERRY_PARAM_KEY_MAX];
	memcpy(key, kv, klen);
	key[klen] = '\0';
	const char *val = eq + 1;

	const struct guest_spec *g = guest_spec_find(guest);
	const struct key_spec *spec = NULL;
	if (g) {
		for (const struct key_spec *k = g->keys; k->key && !spec; k++)
			if (!strcmp(k->key, key))
				spec = k;
		if (!spec) {
			char allowed[128];
			allowed_keys(g, allowed, sizeof(allowed));
			return vm_err(err, -EINVAL, "guest %s has no parameter '%s' (allowed: %s)",
				    g->guest, key, allowed);
		}
	}

	uint64_t v;
	bool symbolic = (spec ? spec->pattern : !strcmp(key, "pattern")) &&
			parse_pattern(val, &v) == 0;
	if (!symbolic) {
		int r = parse_number(val, &v);
		if (r == -ERANGE)
			return vm_err(err, -ERANGE, "parameter %s: '%s' is too large", key, val);
		if (r < 0 && spec && spec->pattern)
			return vm_err(err, -EINVAL,
				    "parameter %s: '%s' is not seq, random, hotcold or 0..2", key,
				    val);
		if (r < 0)
			return vm_err(err, -EINVAL,
				    "parameter %s: '%s' is not a non-negative number "
				    "(decimal or 0x hex, optional K/M/G/T suffix)",
				    key, val);
	}

	if (spec) {
		if (v < spec->min || v > spec->max) {
			if (spec->max == UINT64_MAX)
				return vm_err(err, -EINVAL, "parameter %s=%s: must be at least %llu",
					    key, val, (unsigned long long)spec->min);
			return vm_err(err, -EINVAL, "parameter %s=%s: must be %llu..%llu", key, val,
				    (unsigned long long)spec->min, (unsigned long long)spec->max);
		}
		if (v % spec->multiple)
			return vm_err(err, -EINVAL, "parameter %s=%s: must be a multiple of %llu",
				    key, val, (unsigned long long)spec->multiple);
	}

	memset(ret, 0, sizeof(*ret));
	memcpy(ret->key, key, klen + 1);
	ret->value = v;
	return 0;
}
