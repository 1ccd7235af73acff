// SPDX-License-Identifier: Apache-2.0
/*
 * Loader of ferryd.yaml. The schema is one table (sections of typed keys with offsets into
 * struct ferry_config and their ranges); the YAML file, command-line overrides
 * (ferry_config_set) and ferry_config_validate all go through the same per-key code, so a
 * value the file would refuse cannot sneak in through a flag. libyaml's event parser is used
 * rather than its document loader: events carry the line and column of every key and value,
 * and walking them against the schema lets us refuse aliases, tags, wrong node kinds and
 * duplicate keys (which libyaml's loader accepts silently) at the exact spot. Every change is
 * made to a private copy that replaces the caller's struct only when everything succeeded.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* GNU strerror_r */
#endif
#include "agent/config.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>
#include <yaml.h>

/* Nonzero bandwidth caps below 1 MB/s are almost surely a unit mistake ("bandwidth: 1000"). */
#define MIN_BANDWIDTH 1000000ull

/* Longest key name in the schema plus slack, for dotted paths in messages. */
#define KEYPATH_MAX 64
/* Bound on a section's keys (for the duplicate tracking). */
#define SECTION_MAX_KEYS 16

enum kind {
	K_SECTION,
	K_NAME,     /* agent name */
	K_PATH,     /* file or socket path, fixed char array */
	K_HOSTPORT, /* struct ferry_hostport */
	K_U32,      /* uint32_t within [min, max] */
	K_BOOL,
	K_RATE, /* uint64_t bytes/s; 0 or >= min */
	K_SIZE, /* uint64_t bytes */
	K_ENUM, /* unsigned-sized enum, index into names[] */
};

struct section;

struct key {
	const char *name;
	enum kind kind;
	size_t off;  /* into struct ferry_config */
	size_t size; /* K_PATH: buffer size */
	uint64_t min, max;
	const char *const *names; /* K_ENUM, NULL-terminated */
	const struct section *sub; /* K_SECTION */
	bool optional;             /* K_HOSTPORT may be "" (off) */
};

struct section {
	const char *name; /* "" for the top level */
	const struct key *keys;
	unsigned nkeys;
};

static const char *const log_level_names[] = {"error", "warn", "info", "debug", NULL};
static const char *const transport_names[] = {"auto", "tcp", "rdma", NULL};
static const char *const compress_names[] = {"off", "on", "auto", NULL};
static const char *const timeout_action_names[] = {"abort", "switchover", "postcopy", NULL};
static const char *const postcopy_start_names[] = {"last_resort", "early", NULL};

/* K_ENUM fields are written through an unsigned; GCC gives these enums that representation. */
_Static_assert(sizeof(enum ferry_config_log_level) == sizeof(unsigned), "enum size");
_Static_assert(sizeof(enum ferry_config_transport) == sizeof(unsigned), "enum size");
_Static_assert(sizeof(enum ferry_config_compress) == sizeof(unsigned), "enum size");
_Static_assert(sizeof(enum ferry_config_timeout_action) == sizeof(unsigned), "enum size");
_Static_assert(sizeof(enum ferry_config_postcopy_start) == sizeof(unsigned), "enum size");

#define OFF(f) offsetof(struct ferry_config, f)
#define SIZE(f) sizeof(((struct ferry_config *)0)->f)
#define NKEYS(a) ((unsigned)(sizeof(a) / sizeof((a)[0])))

static const struct key control_keys[] = {
	{.name = "socket", .kind = K_PATH, .off = OFF(control.socket),
	 .size = SIZE(control.socket)},
	{.name = "tcp", .kind = K_HOSTPORT, .off = OFF(control.tcp), .optional = true},
};

static const struct key migration_keys[] = {
	{.name = "listen", .kind = K_HOSTPORT, .off = OFF(migration.listen)},
	{.name = "downtime_ms", .kind = K_U32, .off = OFF(migration.downtime_ms), .min = 1,
	 .max = 60000},
	{.name = "bandwidth", .kind = K_RATE, .off = OFF(migration.bandwidth),
	 .min = MIN_BANDWIDTH},
	{.name = "streams", .kind = K_U32, .off = OFF(migration.streams), .min = 1, .max = 64},
	{.name = "transport", .kind = K_ENUM, .off = OFF(migration.transport),
	 .names = transport_names},
	{.name = "verify", .kind = K_BOOL, .off = OFF(migration.verify)},
	{.name = "queue_depth", .kind = K_U32, .off = OFF(migration.queue_depth), .min = 1,
	 .max = 4096},
	{.name = "batch_pages", .kind = K_U32, .off = OFF(migration.batch_pages), .min = 1,
	 .max = 65536},
	{.name = "warm_buffers", .kind = K_BOOL, .off = OFF(migration.warm_buffers)},
	{.name = "compress", .kind = K_ENUM, .off = OFF(migration.compress),
	 .names = compress_names},
	{.name = "compress_level", .kind = K_U32, .off = OFF(migration.compress_level), .min = 1,
	 .max = 19},
};

static const struct key policy_keys[] = {
	{.name = "completion_timeout_per_gib", .kind = K_U32,
	 .off = OFF(policy.completion_timeout_per_gib), .min = 0, .max = 86400},
	{.name = "progress_timeout", .kind = K_U32, .off = OFF(policy.progress_timeout),
	 .min = 0, .max = 86400},
	{.name = "timeout_action", .kind = K_ENUM, .off = OFF(policy.timeout_action),
	 .names = timeout_action_names},
	{.name = "allow_postcopy", .kind = K_BOOL, .off = OFF(policy.allow_postcopy)},
	{.name = "postcopy_start", .kind = K_ENUM, .off = OFF(policy.postcopy_start),
	 .names = postcopy_start_names},
	{.name = "postcopy_precopy_rounds", .kind = K_U32,
	 .off = OFF(policy.postcopy_precopy_rounds), .min = 0, .max = 1000},
	{.name = "downtime_steps", .kind = K_U32, .off = OFF(policy.downtime_steps), .min = 0,
	 .max = 100},
	{.name = "downtime_step_delay_per_gib", .kind = K_U32,
	 .off = OFF(policy.downtime_step_delay_per_gib), .min = 1, .max = 86400},
	{.name = "throttle", .kind = K_BOOL, .off = OFF(policy.throttle)},
	{.name = "link_capacity", .kind = K_RATE, .off = OFF(policy.link_capacity),
	 .min = MIN_BANDWIDTH},
};

static const struct key limits_keys[] = {
	{.name = "max_outgoing", .kind = K_U32, .off = OFF(limits.max_outgoing), .min = 0,
	 .max = 64},
	{.name = "max_incoming", .kind = K_U32, .off = OFF(limits.max_incoming), .min = 0,
	 .max = 64},
	{.name = "max_vms", .kind = K_U32, .off = OFF(limits.max_vms), .min = 1, .max = 4096},
	{.name = "max_memory", .kind = K_SIZE, .off = OFF(limits.max_memory)},
};

static const struct key tls_keys[] = {
	{.name = "cert", .kind = K_PATH, .off = OFF(tls.cert), .size = SIZE(tls.cert)},
	{.name = "key", .kind = K_PATH, .off = OFF(tls.key), .size = SIZE(tls.key)},
	{.name = "ca", .kind = K_PATH, .off = OFF(tls.ca), .size = SIZE(tls.ca)},
};

static const struct section control_section = {"control", control_keys, NKEYS(control_keys)};
static const struct section migration_section = {"migration", migration_keys,
						 NKEYS(migration_keys)};
static const struct section limits_section = {"limits", limits_keys, NKEYS(limits_keys)};
static const struct section policy_section = {"policy", policy_keys, NKEYS(policy_keys)};
static const struct section tls_section = {"tls", tls_keys, NKEYS(tls_keys)};

static const struct key top_keys[] = {
	{.name = "name", .kind = K_NAME, .off = OFF(name)},
	{.name = "log_level", .kind = K_ENUM, .off = OFF(log_level), .names = log_level_names},
	{.name = "state_dir", .kind = K_PATH, .off = OFF(state_dir), .size = SIZE(state_dir)},
	{.name = "control", .kind = K_SECTION, .sub = &control_section},
	{.name = "migration", .kind = K_SECTION, .sub = &migration_section},
	{.name = "policy", .kind = K_SECTION, .sub = &policy_section},
	{.name = "limits", .kind = K_SECTION, .sub = &limits_section},
	{.name = "tls", .kind = K_SECTION, .sub = &tls_section},
};

static const struct section top_section = {"", top_keys, NKEYS(top_keys)};

_Static_assert(NKEYS(top_keys) <= SECTION_MAX_KEYS && NKEYS(migration_keys) <= SECTION_MAX_KEYS,
	       "raise SECTION_MAX_KEYS");

const char *ferry_config_log_level_name(enum ferry_config_log_level l)
{
	return (unsigned)l < NKEYS(log_level_names) - 1 ? log_level_names[l] : "?";
}

const char *ferry_config_compress_name(enum ferry_config_compress c)
{
	return (unsigned)c < NKEYS(compress_names) - 1 ? compress_names[c] : "?";
}

const char *ferry_config_transport_name(enum ferry_config_transport t)
{
	return (unsigned)t < NKEYS(transport_names) - 1 ? transport_names[t] : "?";
}

const char *ferry_config_timeout_action_name(enum ferry_config_timeout_action a)
{
	return (unsigned)a < NKEYS(timeout_action_names) - 1 ? timeout_action_names[a] : "?";
}

int ferry_config_timeout_action_parse(const char *s, enum ferry_config_timeout_action *ret)
{
	for (unsigned i = 0; timeout_action_names[i]; i++) {
		if (!strcmp(s, timeout_action_names[i])) {
			*ret = (enum ferry_config_timeout_action)i;
			return 0;
		}
	}
	return -EINVAL;
}

void ferry_config_defaults(struct ferry_config *c)
{
	memset(c, 0, sizeof(*c));
	/* glibc may leave a truncated name unterminated; the memset and the -1 keep a NUL. */
	if (gethostname(c->name, sizeof(c->name) - 1) < 0 || !c->name[0])
		snprintf(c->name, sizeof(c->name), "ferryd");
	c->log_level = FERRY_CONFIG_LOG_INFO;
	snprintf(c->state_dir, sizeof(c->state_dir), "/var/lib/ferry");
	snprintf(c->control.socket, sizeof(c->control.socket), "/run/ferry/ferryd.sock");
	snprintf(c->migration.listen.host, sizeof(c->migration.listen.host), "0.0.0.0");
	c->migration.listen.port = 7000;
	c->migration.downtime_ms = 300;
	c->migration.bandwidth = 0;
	c->migration.streams = 4;
	c->migration.transport = FERRY_CONFIG_TRANSPORT_AUTO;
	c->migration.compress = FERRY_CONFIG_COMPRESS_AUTO;
	c->migration.compress_level = 1;
	c->migration.verify = false;
	c->migration.queue_depth = 16;
	c->migration.batch_pages = 256;
	c->migration.warm_buffers = true;
	/* KubeVirt's defaults; see docs/scheduler.md for each. */
	c->policy.completion_timeout_per_gib = 150;
	c->policy.progress_timeout = 150;
	c->policy.timeout_action = FERRY_CONFIG_TIMEOUT_ABORT;
	c->policy.allow_postcopy = false;
	c->policy.postcopy_start = FERRY_CONFIG_POSTCOPY_LAST_RESORT;
	c->policy.postcopy_precopy_rounds = 1;
	c->policy.downtime_steps = 0;
	c->policy.downtime_step_delay_per_gib = 75;
	c->policy.throttle = true;
	c->policy.link_capacity = 0;
	c->limits.max_outgoing = 2;
	c->limits.max_incoming = 2;
	c->limits.max_vms = 64;
	c->limits.max_memory = 0;
}

/* ---- messages ---------------------------------------------------------------------------- */

static void __attribute__((format(printf, 3, 4))) msgf(char *buf, size_t len, const char *fmt,
						       ...)
{
	if (!buf || !len)
		return;
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(buf, len, fmt, ap);
	va_end(ap);
}

/*
 * A user's value for a message: at most 40 bytes, non-printable bytes as '?', so a binary
 * blob or a NUL cannot garble the terminal or cut the message short.
 */
static void show(const char *v, size_t len, char *out, size_t outlen)
{
	size_t n = 0;
	for (size_t i = 0; i < len && n + 4 < outlen; i++) {
		if (i == 40) {
			memcpy(out + n, "...", 3);
			n += 3;
			break;
		}
		unsigned char ch = (unsigned char)v[i];
		out[n++] = (ch >= 0x20 && ch < 0x7f) ? (char)ch : '?';
	}
	out[n] = '\0';
}

static void keypath(const struct section *s, const struct key *k, char *buf, size_t len)
{
	if (s->name[0])
		snprintf(buf, len, "%s.%s", s->name, k->name);
	else
		snprintf(buf, len, "%s", k->name);
}

static void known_keys(const struct section *s, char *buf, size_t len)
{
	size_t n = 0;
	buf[0] = '\0';
	for (unsigned i = 0; i < s->nkeys && n < len; i++) {
		int w = snprintf(buf + n, len - n, "%s%s", i ? ", " : "", s->keys[i].name);
		if (w < 0)
			break;
		n += (size_t)w;
	}
}

/* Edit distance, for "did you mean". Keys are short; longer input is simply not compared. */
static unsigned distance(const char *a, size_t alen, const char *b)
{
	size_t blen = strlen(b);
	unsigned row[KEYPATH_MAX + 1];
	if (alen > KEYPATH_MAX || blen > KEYPATH_MAX)
		return ~0u;
	for (size_t j = 0; j <= blen; j++)
		row[j] = (unsigned)j;
	for (size_t i = 1; i <= alen; i++) {
		unsigned diag = row[0];
		row[0] = (unsigned)i;
		for (size_t j = 1; j <= blen; j++) {
			unsigned up = row[j];
			unsigned cost = a[i - 1] == b[j - 1] ? 0 : 1;
			unsigned best = diag + cost;
			if (up + 1 < best)
				best = up + 1;
			if (row[j - 1] + 1 < best)
				best = row[j - 1] + 1;
			row[j] = best;
			diag = up;
		}
	}
	return row[blen];
}

static const struct key *suggest(const struct section *s, const char *name, size_t len)
{
	const struct key *best = NULL;
	unsigned bestd = 3; /* at most two edits away */
	for (unsigned i = 0; i < s->nkeys; i++) {
		unsigned d = distance(name, len, s->keys[i].name);
		if (d < bestd && d < strlen(s->keys[i].name)) {
			bestd = d;
			best = &s->keys[i];
		}
	}
	return best;
}

static void unknown_key_msg(const struct section *s, const char *name, size_t len, char *buf,
			    size_t buflen)
{
	char shown[64], known[256], where[64], hint[64] = "";
	show(name, len, shown, sizeof(shown));
	known_keys(s, known, sizeof(known));
	if (s->name[0])
		snprintf(where, sizeof(where), "in '%s'", s->name);
	else
		snprintf(where, sizeof(where), "at the top level");
	const struct key *k = suggest(s, name, len);
	if (k)
		snprintf(hint, sizeof(hint), "; did you mean '%s'?", k->name);
	msgf(buf, buflen, "unknown key '%s' %s%s (known: %s)", shown, where, hint, known);
}

static const struct key *find_key(const struct section *s, const char *name, size_t len)
{
	for (unsigned i = 0; i < s->nkeys; i++)
		if (strlen(s->keys[i].name) == len && !memcmp(s->keys[i].name, name, len))
			return &s->keys[i];
	return NULL;
}

/* ---- numbers ----------------------------------------------------------------------------- */

/*
 * Decimal digits, no sign, no leading zero (YAML 1.1 reads 0300 as octal; refusing it avoids
 * guessing which one the operator meant). Advances *pp past the digits.
 */
static int parse_digits(const char **pp, uint64_t *ret)
{
	const char *p = *pp;
	uint64_t v = 0;
	int r = 0;
	if (*p < '0' || *p > '9')
		return -EINVAL;
	if (p[0] == '0' && p[1] >= '0' && p[1] <= '9')
		return -EINVAL;
	for (; *p >= '0' && *p <= '9'; p++) {
		unsigned d = (unsigned)(*p - '0');
		if (v > (UINT64_MAX - d) / 10)
			r = -ERANGE; /* keep scanning so junk after the digits still says -EINVAL */
		else
			v = v * 10 + d;
	}
	*pp = p;
	*ret = v;
	return r;
}

static int parse_u64(const char *s, uint64_t *ret)
{
	const char *p = s;
	uint64_t v;
	int r = parse_digits(&p, &v);
	if (r == -EINVAL || *p)
		return -EINVAL;
	if (r < 0)
		return r;
	*ret = v;
	return 0;
}

/* Matches prefix word at *pp (exactly, case-sensitive) and advances. */
static bool eat(const char **pp, const char *word)
{
	size_t n = strlen(word);
	if (strncmp(*pp, word, n))
		return false;
	*pp += n;
	return true;
}

/*
 * NUMBER[.FRACTION][ ]UNIT for sizes (rate = false) and rates. See config.h for the grammar.
 * The value is computed exactly in 128 bits, then cut to whole bytes.
 */
static int parse_quantity(const char *s, bool rate, uint64_t *ret, bool *tiny)
{
	const char *p = s;
	uint64_t ip, frac = 0;
	unsigned nfrac = 0;

	if (!s || !ret)
		return -EINVAL;
	int r = parse_digits(&p, &ip);
	if (r == -EINVAL)
		return r;
	bool range = r == -ERANGE;
	if (*p == '.') {
		p++;
		if (*p < '0' || *p > '9')
			return -EINVAL;
		for (; *p >= '0' && *p <= '9'; p++) {
			if (nfrac == 18) /* 10^18 fits the 128-bit arithmetic below */
				return -EINVAL;
			frac = frac * 10 + (unsigned)(*p - '0');
			nfrac++;
		}
	}
	if (*p == ' ' && p[1])
		p++;

	unsigned shift = 0;
	uint64_t dec = 1;
	switch (*p) {
	case 'k':
	case 'K':
		shift = 10, dec = 1000ull;
		break;
	case 'm':
	case 'M':
		shift = 20, dec = 1000000ull;
		break;
	case 'g':
	case 'G':
		shift = 30, dec = 1000000000ull;
		break;
	case 't':
	case 'T':
		shift = 40, dec = 1000000000000ull;
		break;
	}
	if (shift)
		p++;

	uint64_t mul = 1ull << shift, div = 1;
	if (rate && (eat(&p, "bit") || eat(&p, "bps"))) {
		mul = dec; /* network rates are decimal and in bits */
		div = 8;
		if (p[-1] == 't')
			(void)eat(&p, "/s");
	} else {
		if (shift && *p == 'i')
			p++;
		if (*p == 'B')
			p++;
		else if (*p == 'b')
			return -EINVAL; /* "1Gb": bits or bytes? make the operator say */
		if (rate)
			(void)eat(&p, "/s");
	}
	if (*p)
		return -EINVAL;
	if (range)
		return -ERANGE;

	unsigned __int128 p10 = 1;
	for (unsigned i = 0; i < nfrac; i++)
		p10 *= 10;
	unsigned __int128 num = (unsigned __int128)ip * p10 + frac;
	if (num > ~(unsigned __int128)0 / mul)
		return -ERANGE;
	unsigned __int128 v = num * mul / (p10 * div);
	if (v > UINT64_MAX)
		return -ERANGE;
	if (v == 0 && num != 0) {
		if (tiny)
			*tiny = true;
		return -ERANGE; /* 0 means "unlimited"/"host RAM": never reach it by rounding */
	}
	*ret = (uint64_t)v;
	return 0;
}

int ferry_config_parse_rate(const char *s, uint64_t *bytes_per_sec)
{
	return parse_quantity(s, true, bytes_per_sec, NULL);
}

int ferry_config_parse_size(const char *s, uint64_t *ret)
{
	return parse_quantity(s, false, ret, NULL);
}

/* ---- host:port --------------------------------------------------------------------------- */

static bool valid_dns_name(const char *h, size_t len)
{
	size_t label = 0;
	if (len == 0 || len > 253)
		return false;
	for (size_t i = 0; i < len; i++) {
		char ch = h[i];
		if (ch == '.') {
			if (label == 0 || h[i - 1] == '-')
				return false;
			label = 0;
			continue;
		}
		bool alnum = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
			     (ch >= '0' && ch <= '9');
		if (!alnum && !(ch == '-' && label > 0))
			return false;
		if (++label > 63)
			return false;
	}
	return label > 0 && h[len - 1] != '-';
}

/* An IPv6 literal, optionally with a %zone (interface name), as found between brackets. */
static bool valid_ipv6(const char *h, size_t len)
{
	char buf[INET6_ADDRSTRLEN + IF_NAMESIZE + 1];
	struct in6_addr a;
	if (len == 0 || len >= sizeof(buf))
		return false;
	memcpy(buf, h, len);
	buf[len] = '\0';
	char *zone = strchr(buf, '%');
	if (zone) {
		*zone++ = '\0';
		size_t zl = strlen(zone);
		if (zl == 0 || zl >= IF_NAMESIZE)
			return false;
		if (strspn(zone, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
				 "0123456789._-") != zl)
			return false;
	}
	return inet_pton(AF_INET6, buf, &a) == 1;
}

/* Unbracketed host: an IPv4 literal (all digits and dots) or a DNS name. */
static bool valid_host(const char *h, size_t len)
{
	if (len == 0)
		return false;
	if (strspn(h, "0123456789.") >= len) {
		char buf[INET_ADDRSTRLEN];
		struct in_addr a;
		if (len >= sizeof(buf))
			return false;
		memcpy(buf, h, len);
		buf[len] = '\0';
		return inet_pton(AF_INET, buf, &a) == 1;
	}
	return valid_dns_name(h, len);
}

int ferry_config_parse_hostport(const char *s, char *host, size_t hostlen, uint16_t *port)
{
	const char *h, *p;
	size_t hl;

	if (!s || !host || !port)
		return -EINVAL;
	if (s[0] == '[') {
		const char *close = strchr(s, ']');
		if (!close || close[1] != ':')
			return -EINVAL;
		h = s + 1;
		hl = (size_t)(close - h);
		if (!valid_ipv6(h, hl))
			return -EINVAL;
		p = close + 2;
	} else {
		const char *colon = strrchr(s, ':');
		if (!colon)
			return -EINVAL;
		h = s;
		hl = (size_t)(colon - s);
		/* A bare IPv6 literal: is "::1:7000" port 7000 or part of the address? */
		if (memchr(h, ':', hl) || !valid_host(h, hl))
			return -EINVAL;
		p = colon + 1;
	}

	size_t pl = strlen(p);
	if (pl == 0 || pl > 5 || strspn(p, "0123456789") != pl)
		return -EINVAL;
	unsigned long v = strtoul(p, NULL, 10);
	if (v > 65535)
		return -EINVAL;
	if (hl + 1 > hostlen)
		return -ENAMETOOLONG;
	memcpy(host, h, hl);
	host[hl] = '\0';
	*port = (uint16_t)v;
	return 0;
}

int ferry_config_format_hostport(const struct ferry_hostport *hp, char *buf, size_t len)
{
	int n;
	if (!hp->host[0])
		n = snprintf(buf, len, "%s", "");
	else if (strchr(hp->host, ':'))
		n = snprintf(buf, len, "[%s]:%u", hp->host, (unsigned)hp->port);
	else
		n = snprintf(buf, len, "%s:%u", hp->host, (unsigned)hp->port);
	if (n < 0 || (size_t)n >= len)
		return -ENOSPC;
	return n;
}

/* ---- one key ----------------------------------------------------------------------------- */

static bool valid_name(const char *s)
{
	size_t n = strlen(s);
	if (n == 0 || n > FERRY_CONFIG_NAME_MAX)
		return false;
	for (size_t i = 0; i < n; i++) {
		char ch = s[i];
		bool alnum = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
			     (ch >= '0' && ch <= '9');
		if (!alnum && (i == 0 || (ch != '.' && ch != '_' && ch != '-')))
			return false;
	}
	return true;
}

static bool has_control_char(const char *s, size_t len)
{
	for (size_t i = 0; i < len; i++)
		if ((unsigned char)s[i] < 0x20 || s[i] == 0x7f)
			return true;
	return false;
}

static void *field(struct ferry_config *c, const struct key *k)
{
	return (char *)c + k->off;
}

static const void *cfield(const struct ferry_config *c, const struct key *k)
{
	return (const char *)c + k->off;
}

/*
 * The range/shape check of one field as it sits in c: used after parsing a value, and by
 * validate for fields main() may have set directly. msg gets "path: what is wrong".
 */
static int check_field(const struct ferry_config *c, const struct key *k, const char *path,
		       char *msg, size_t msglen)
{
	switch (k->kind) {
	case K_SECTION:
	case K_BOOL:
	case K_SIZE:
		return 0;
	case K_NAME: {
		const char *s = cfield(c, k);
		if (!memchr(s, '\0', SIZE(name)) || !valid_name(s)) {
			char shown[64];
			show(s, strnlen(s, SIZE(name)), shown, sizeof(shown));
			msgf(msg, msglen,
			     "%s: '%s' is not a valid agent name (1..%d of A-Z a-z 0-9 . _ -, "
			     "starting with a letter or digit)",
			     path, shown, FERRY_CONFIG_NAME_MAX);
			return -EINVAL;
		}
		return 0;
	}
	case K_PATH: {
		const char *s = cfield(c, k);
		size_t n = strnlen(s, k->size);
		if (n == k->size) {
			msgf(msg, msglen, "%s: path is not terminated", path);
			return -EINVAL;
		}
		if (has_control_char(s, n)) {
			msgf(msg, msglen, "%s: path contains a control character", path);
			return -EINVAL;
		}
		return 0;
	}
	case K_HOSTPORT: {
		const struct ferry_hostport *hp = cfield(c, k);
		size_t n = strnlen(hp->host, sizeof(hp->host));
		if (n == sizeof(hp->host)) {
			msgf(msg, msglen, "%s: host is not terminated", path);
			return -EINVAL;
		}
		if (n == 0 && !k->optional) {
			msgf(msg, msglen, "%s: must be set (HOST:PORT)", path);
			return -EINVAL;
		}
		bool v6 = strchr(hp->host, ':');
		if (n && !(v6 ? valid_ipv6(hp->host, n) : valid_host(hp->host, n))) {
			char shown[64];
			show(hp->host, n, shown, sizeof(shown));
			msgf(msg, msglen, "%s: '%s' is not a valid host", path, shown);
			return -EINVAL;
		}
		return 0;
	}
	case K_U32: {
		uint32_t v;
		memcpy(&v, cfield(c, k), sizeof(v));
		if (v < k->min || v > k->max) {
			msgf(msg, msglen, "%s: %u is out of range (%llu..%llu)", path, v,
			     (unsigned long long)k->min, (unsigned long long)k->max);
			return -EINVAL;
		}
		return 0;
	}
	case K_RATE: {
		uint64_t v;
		memcpy(&v, cfield(c, k), sizeof(v));
		if (v && v < k->min) {
			msgf(msg, msglen,
			     "%s: %llu bytes/s is below the minimum of %llu (8Mbit); plain numbers "
			     "are bytes per second, 0 is unlimited",
			     path, (unsigned long long)v, (unsigned long long)k->min);
			return -EINVAL;
		}
		return 0;
	}
	case K_ENUM: {
		unsigned v, n = 0;
		memcpy(&v, cfield(c, k), sizeof(v));
		while (k->names[n])
			n++;
		if (v >= n) {
			msgf(msg, msglen, "%s: %u is not a valid value", path, v);
			return -EINVAL;
		}
		return 0;
	}
	}
	return 0;
}

static void enum_list(const struct key *k, char *buf, size_t len)
{
	size_t n = 0;
	buf[0] = '\0';
	for (unsigned i = 0; k->names[i] && n < len; i++) {
		int w = snprintf(buf + n, len - n, "%s%s", i ? ", " : "", k->names[i]);
		if (w < 0)
			break;
		n += (size_t)w;
	}
}

/*
 * Parses text v (len bytes, NUL-terminated at len) for key k into c, then range-checks it.
 * is_null: YAML null (empty plain scalar, ~, null) or an empty override. The schema, not the
 * YAML style, decides the type: "300" and 300 are the same number, as operators expect.
 */
static int apply_value(struct ferry_config *c, const struct key *k, const char *path,
		       const char *v, size_t len, bool is_null, char *msg, size_t msglen)
{
	char shown[64];
	show(v, len, shown, sizeof(shown));

	if (memchr(v, '\0', len)) {
		msgf(msg, msglen, "%s: value contains a NUL byte", path);
		return -EINVAL;
	}
	if (is_null && k->kind != K_PATH && k->kind != K_HOSTPORT) {
		msgf(msg, msglen, "%s: has no value", path);
		return -EINVAL;
	}

	switch (k->kind) {
	case K_SECTION:
		msgf(msg, msglen, "%s: is a section, not a value", path);
		return -EINVAL;
	case K_NAME:
		if (len > FERRY_CONFIG_NAME_MAX) {
			msgf(msg, msglen, "%s: longer than %d characters", path,
			     FERRY_CONFIG_NAME_MAX);
			return -EINVAL;
		}
		memset(field(c, k), 0, SIZE(name)); /* no stale bytes after the NUL */
		memcpy(field(c, k), v, len);
		break;
	case K_PATH:
		if (is_null)
			len = 0;
		if (len >= k->size) {
			if (k->off == OFF(control.socket))
				msgf(msg, msglen,
				     "%s: path is %zu bytes; a unix socket path must be at "
				     "most %zu (sockaddr_un.sun_path)",
				     path, len, k->size - 1);
			else
				msgf(msg, msglen, "%s: path is %zu bytes, more than %zu", path, len,
				     k->size - 1);
			return -EINVAL;
		}
		memset(field(c, k), 0, k->size);
		memcpy(field(c, k), v, len);
		break;
	case K_HOSTPORT: {
		struct ferry_hostport hp = {.host = "", .port = 0};
		if (!is_null && len) {
			int r = ferry_config_parse_hostport(v, hp.host, sizeof(hp.host), &hp.port);
			if (r == -ENAMETOOLONG) {
				msgf(msg, msglen, "%s: host name longer than %d characters", path,
				     FERRY_CONFIG_HOST_MAX);
				return -EINVAL;
			}
			if (r < 0) {
				msgf(msg, msglen,
				     "%s: '%s' is not HOST:PORT (e.g. 0.0.0.0:7000, [::]:7000, "
				     "host-b.example:7000; port 0..65535)",
				     path, shown);
				return -EINVAL;
			}
		}
		memcpy(field(c, k), &hp, sizeof(hp));
		break;
	}
	case K_U32: {
		uint64_t n;
		int r = parse_u64(v, &n);
		if (r == -EINVAL) {
			if (v[0] == '-' && v[1] >= '0' && v[1] <= '9')
				msgf(msg, msglen, "%s: %s: must not be negative", path, shown);
			else if (v[0] == '0' && v[1] >= '0' && v[1] <= '9')
				msgf(msg, msglen, "%s: '%s': leading zeros are not allowed", path,
				     shown);
			else
				msgf(msg, msglen, "%s: '%s' is not a whole number", path, shown);
			return -EINVAL;
		}
		if (r < 0 || n > UINT32_MAX) {
			msgf(msg, msglen, "%s: %s is out of range (%llu..%llu)", path, shown,
			     (unsigned long long)k->min, (unsigned long long)k->max);
			return -EINVAL;
		}
		uint32_t u = (uint32_t)n;
		memcpy(field(c, k), &u, sizeof(u));
		break;
	}
	case K_BOOL: {
		static const char *const yes[] = {"true", "yes", "on"};
		static const char *const no[] = {"false", "no", "off"};
		int b = -1;
		for (unsigned i = 0; i < 3; i++) {
			if (!strcasecmp(v, yes[i]))
				b = 1;
			if (!strcasecmp(v, no[i]))
				b = 0;
		}
		if (b < 0) {
			msgf(msg, msglen, "%s: '%s' is not a boolean (true or false)", path, shown);
			return -EINVAL;
		}
		*(bool *)field(c, k) = b;
		break;
	}
	case K_RATE:
	case K_SIZE: {
		uint64_t n;
		bool rate = k->kind == K_RATE, tiny = false;
		int r = parse_quantity(v, rate, &n, &tiny);
		if (r == -ERANGE && tiny) {
			msgf(msg, msglen, "%s: %s is less than 1 byte%s, and 0 would mean %s", path,
			     shown, rate ? "/s" : "", rate ? "unlimited" : "the host's RAM");
			return -EINVAL;
		}
		if (r == -ERANGE) {
			msgf(msg, msglen, "%s: %s is out of range (at most 2^64-1 %s)", path, shown,
			     rate ? "bytes/s" : "bytes");
			return -EINVAL;
		}
		if (r < 0) {
			if (v[0] == '-')
				msgf(msg, msglen, "%s: %s: must not be negative", path, shown);
			else if (rate)
				msgf(msg, msglen,
				     "%s: '%s' is not a rate: bytes/s as 125000000, 100M, 1.25GB/s "
				     "(1024-based) or bits/s as 10Gbit, 1Gbps (1000-based)",
				     path, shown);
			else
				msgf(msg, msglen,
				     "%s: '%s' is not a size: bytes as 1073741824, 512M, 1.5G, "
				     "64GiB (1024-based)",
				     path, shown);
			return -EINVAL;
		}
		memcpy(field(c, k), &n, sizeof(n));
		break;
	}
	case K_ENUM: {
		unsigned i;
		for (i = 0; k->names[i]; i++)
			if (!strcmp(v, k->names[i]))
				break;
		if (!k->names[i]) {
			char list[128];
			enum_list(k, list, sizeof(list));
			msgf(msg, msglen, "%s: '%s' is not one of %s", path, shown, list);
			return -EINVAL;
		}
		memcpy(field(c, k), &i, sizeof(i));
		break;
	}
	}
	return check_field(c, k, path, msg, msglen);
}

/* ---- YAML walk --------------------------------------------------------------------------- */

struct loader {
	yaml_parser_t parser;
	const char *name;
	const char *buf; /* the input, to turn reader-error byte offsets into line:column */
	size_t len;
	struct ferry_config *c; /* the private copy being filled */
	char *err;
	size_t errlen;
};

static void __attribute__((format(printf, 3, 4))) lerr(struct loader *l, yaml_mark_t m,
						       const char *fmt, ...)
{
	if (!l->err || !l->errlen)
		return;
	int n = snprintf(l->err, l->errlen, "%s:%zu:%zu: ", l->name, m.line + 1, m.column + 1);
	if (n < 0 || (size_t)n >= l->errlen)
		return;
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(l->err + n, l->errlen - (size_t)n, fmt, ap);
	va_end(ap);
}

static int parser_error(struct loader *l)
{
	yaml_parser_t *p = &l->parser;
	const char *problem = p->problem ? p->problem : "unknown error";

	switch (p->error) {
	case YAML_MEMORY_ERROR:
		msgf(l->err, l->errlen, "%s: out of memory while parsing", l->name);
		return -ENOMEM;
	case YAML_READER_ERROR: {
		/* The reader reports a byte offset, not a mark (bad UTF-8, control bytes). */
		yaml_mark_t m = {.index = 0, .line = 0, .column = 0};
		size_t end = p->problem_offset < l->len ? p->problem_offset : l->len;
		for (size_t i = 0; i < end; i++) {
			if (l->buf[i] == '\n') {
				m.line++;
				m.column = 0;
			} else {
				m.column++;
			}
		}
		if (p->problem_value != -1)
			lerr(l, m, "not valid YAML text: %s (byte 0x%02x)", problem,
			     (unsigned)p->problem_value & 0xff);
		else
			lerr(l, m, "not valid YAML text: %s", problem);
		return -EINVAL;
	}
	default:
		if (p->context)
			lerr(l, p->problem_mark,
			     "YAML syntax error: %s (%s at line %zu column %zu)", problem,
			     p->context, p->context_mark.line + 1, p->context_mark.column + 1);
		else
			lerr(l, p->problem_mark, "YAML syntax error: %s", problem);
		return -EINVAL;
	}
}

static const char *event_kind(const yaml_event_t *ev)
{
	switch (ev->type) {
	case YAML_SCALAR_EVENT:
		return "single value";
	case YAML_SEQUENCE_START_EVENT:
		return "list";
	case YAML_MAPPING_START_EVENT:
		return "mapping";
	default:
		return "something else";
	}
}

/*
 * Next event, with the features this schema has no use for refused at their mark: aliases,
 * anchors and tags would let a file mean something other than what it says line by line.
 * On success the caller owns *ev (yaml_event_delete); on failure nothing is held.
 */
static int next_event(struct loader *l, yaml_event_t *ev)
{
	const yaml_char_t *anchor = NULL, *tag = NULL;

	if (!yaml_parser_parse(&l->parser, ev))
		return parser_error(l);
	switch (ev->type) {
	case YAML_ALIAS_EVENT:
		lerr(l, ev->start_mark, "aliases (*%.40s) are not supported",
		     (const char *)ev->data.alias.anchor);
		yaml_event_delete(ev);
		return -EINVAL;
	case YAML_SCALAR_EVENT:
		anchor = ev->data.scalar.anchor;
		tag = ev->data.scalar.tag;
		break;
	case YAML_SEQUENCE_START_EVENT:
		anchor = ev->data.sequence_start.anchor;
		tag = ev->data.sequence_start.tag;
		break;
	case YAML_MAPPING_START_EVENT:
		anchor = ev->data.mapping_start.anchor;
		tag = ev->data.mapping_start.tag;
		break;
	default:
		break;
	}
	if (anchor) {
		lerr(l, ev->start_mark, "anchors (&%.40s) are not supported", (const char *)anchor);
		yaml_event_delete(ev);
		return -EINVAL;
	}
	if (tag) {
		lerr(l, ev->start_mark, "tags (%.60s) are not supported", (const char *)tag);
		yaml_event_delete(ev);
		return -EINVAL;
	}
	return 0;
}

static bool scalar_is_null(const yaml_event_t *ev)
{
	if (ev->type != YAML_SCALAR_EVENT || ev->data.scalar.style != YAML_PLAIN_SCALAR_STYLE)
		return false;
	const char *v = (const char *)ev->data.scalar.value;
	return !v[0] || !strcmp(v, "~") || !strcmp(v, "null") || !strcmp(v, "Null") ||
	       !strcmp(v, "NULL");
}

static int load_mapping(struct loader *l, const struct section *s);

/* The value after key k; ev is the value's first event, consumed here. */
static int load_value(struct loader *l, const struct section *s, const struct key *k,
		      yaml_event_t *ev)
{
	char path[KEYPATH_MAX], msg[512];
	int r = 0;

	keypath(s, k, path, sizeof(path));
	if (k->kind == K_SECTION) {
		if (ev->type == YAML_MAPPING_START_EVENT) {
			yaml_event_delete(ev);
			return load_mapping(l, k->sub);
		}
		if (!scalar_is_null(ev)) { /* "migration:" alone is an empty section */
			lerr(l, ev->start_mark, "'%s' must be a mapping of keys, got a %s", path,
			     event_kind(ev));
			r = -EINVAL;
		}
	} else if (ev->type != YAML_SCALAR_EVENT) {
		lerr(l, ev->start_mark, "'%s' must be a single value, got a %s", path,
		     event_kind(ev));
		r = -EINVAL;
	} else {
		r = apply_value(l->c, k, path, (const char *)ev->data.scalar.value,
				ev->data.scalar.length, scalar_is_null(ev), msg, sizeof(msg));
		if (r < 0)
			lerr(l, ev->start_mark, "%s", msg);
	}
	yaml_event_delete(ev);
	return r;
}

/* Keys of section s until MAPPING_END (the MAPPING_START is already consumed). */
static int load_mapping(struct loader *l, const struct section *s)
{
	size_t first_line[SECTION_MAX_KEYS] = {0}; /* line + 1 where each key was seen */
	yaml_event_t ev;
	char msg[512];
	int r;

	for (;;) {
		r = next_event(l, &ev);
		if (r < 0)
			return r;
		if (ev.type == YAML_MAPPING_END_EVENT) {
			yaml_event_delete(&ev);
			return 0;
		}
		if (ev.type != YAML_SCALAR_EVENT) {
			lerr(l, ev.start_mark, "keys must be plain names, got a %s",
			     event_kind(&ev));
			yaml_event_delete(&ev);
			return -EINVAL;
		}
		const char *name = (const char *)ev.data.scalar.value;
		size_t len = ev.data.scalar.length;
		const struct key *k = find_key(s, name, len);
		if (!k) {
			unknown_key_msg(s, name, len, msg, sizeof(msg));
			lerr(l, ev.start_mark, "%s", msg);
			yaml_event_delete(&ev);
			return -EINVAL;
		}
		size_t idx = (size_t)(k - s->keys);
		if (first_line[idx]) {
			if (s->name[0])
				lerr(l, ev.start_mark,
				     "duplicate key '%s' in '%s' (first set at line %zu)", k->name,
				     s->name, first_line[idx]);
			else
				lerr(l, ev.start_mark, "duplicate key '%s' (first set at line %zu)",
				     k->name, first_line[idx]);
			yaml_event_delete(&ev);
			return -EINVAL;
		}
		first_line[idx] = ev.start_mark.line + 1;
		yaml_event_delete(&ev);

		r = next_event(l, &ev);
		if (r < 0)
			return r;
		r = load_value(l, s, k, &ev);
		if (r < 0)
			return r;
	}
}

static int expect(struct loader *l, yaml_event_type_t type)
{
	yaml_event_t ev;
	int r = next_event(l, &ev);
	if (r < 0)
		return r;
	if (ev.type != type) {
		/* Only a second document can get here: libyaml enforces the rest. */
		lerr(l, ev.start_mark, "only one YAML document is allowed ('---' starts another)");
		r = -EINVAL;
	}
	yaml_event_delete(&ev);
	return r;
}

static int load_stream(struct loader *l)
{
	yaml_event_t ev;
	int r = expect(l, YAML_STREAM_START_EVENT);
	if (r < 0)
		return r;

	r = next_event(l, &ev);
	if (r < 0)
		return r;
	if (ev.type == YAML_STREAM_END_EVENT) { /* empty or comments only: all defaults */
		yaml_event_delete(&ev);
		return 0;
	}
	yaml_event_delete(&ev); /* DOCUMENT_START */

	r = next_event(l, &ev);
	if (r < 0)
		return r;
	if (ev.type == YAML_MAPPING_START_EVENT) {
		yaml_event_delete(&ev);
		r = load_mapping(l, &top_section);
		if (r < 0)
			return r;
	} else {
		if (!scalar_is_null(&ev)) { /* "---" alone is an empty document */
			lerr(l, ev.start_mark,
			     "the top level must be a mapping (key: value), got a %s",
			     event_kind(&ev));
			yaml_event_delete(&ev);
			return -EINVAL;
		}
		yaml_event_delete(&ev);
	}

	r = expect(l, YAML_DOCUMENT_END_EVENT);
	if (r < 0)
		return r;
	return expect(l, YAML_STREAM_END_EVENT);
}

int ferry_config_load_string(const char *yaml, size_t len, const char *name_for_errors,
			     struct ferry_config *c, char *err, size_t errlen)
{
	const char *name = name_for_errors ? name_for_errors : "<config>";
	if (err && errlen)
		err[0] = '\0';
	if (!c || (!yaml && len)) {
		msgf(err, errlen, "%s: invalid arguments", name);
		return -EINVAL;
	}
	if (len > FERRY_CONFIG_MAX_FILE) {
		msgf(err, errlen, "%s: file is %zu bytes, larger than the %u allowed", name, len,
		     FERRY_CONFIG_MAX_FILE);
		return -EFBIG;
	}

	struct loader l = {.name = name, .buf = yaml, .len = len, .err = err, .errlen = errlen};
	l.c = malloc(sizeof(*l.c));
	if (!l.c) {
		msgf(err, errlen, "%s: out of memory", name);
		return -ENOMEM;
	}
	*l.c = *c;
	if (!yaml_parser_initialize(&l.parser)) {
		free(l.c);
		msgf(err, errlen, "%s: out of memory", name);
		return -ENOMEM;
	}
	yaml_parser_set_input_string(&l.parser, (const unsigned char *)(yaml ? yaml : ""), len);

	int r = load_stream(&l);
	yaml_parser_delete(&l.parser);
	if (r == 0)
		*c = *l.c;
	free(l.c);
	return r;
}

int ferry_config_load(const char *path, struct ferry_config *c, char *err, size_t errlen)
{
	if (err && errlen)
		err[0] = '\0';
	if (!path || !c) {
		msgf(err, errlen, "invalid arguments");
		return -EINVAL;
	}
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		int e = errno;
		char eb[128];
		msgf(err, errlen, "%s: cannot open: %s", path, strerror_r(e, eb, sizeof(eb)));
		return -e;
	}

	/* Read one byte past the cap, so "too big" does not depend on st_size (pipes, /proc). */
	size_t cap = FERRY_CONFIG_MAX_FILE + 1, len = 0;
	char *buf = malloc(cap);
	if (!buf) {
		close(fd);
		msgf(err, errlen, "%s: out of memory", path);
		return -ENOMEM;
	}
	while (len < cap) {
		ssize_t n = read(fd, buf + len, cap - len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			int e = errno;
			char eb[128];
			msgf(err, errlen, "%s: cannot read: %s", path,
			     strerror_r(e, eb, sizeof(eb)));
			free(buf);
			close(fd);
			return -e;
		}
		if (n == 0)
			break;
		len += (size_t)n;
	}
	close(fd);

	int r;
	if (len > FERRY_CONFIG_MAX_FILE) {
		msgf(err, errlen, "%s: file is larger than the %u bytes allowed", path,
		     FERRY_CONFIG_MAX_FILE);
		r = -EFBIG;
	} else {
		r = ferry_config_load_string(buf, len, path, c, err, errlen);
	}
	free(buf);
	return r;
}

/* ---- overrides, validation, check -------------------------------------------------------- */

int ferry_config_set(struct ferry_config *c, const char *key, const char *value, char *err,
		     size_t errlen)
{
	if (err && errlen)
		err[0] = '\0';
	if (!c || !key || !value) {
		msgf(err, errlen, "invalid arguments");
		return -EINVAL;
	}

	const struct section *s = &top_section;
	const char *name = key;
	const char *dot = strchr(key, '.');
	char msg[512];
	if (dot) {
		const struct key *sk = find_key(&top_section, key, (size_t)(dot - key));
		if (!sk || sk->kind != K_SECTION) {
			unknown_key_msg(&top_section, key, (size_t)(dot - key), msg, sizeof(msg));
			msgf(err, errlen, "%s: %s", key, msg);
			return -EINVAL;
		}
		s = sk->sub;
		name = dot + 1;
	}
	const struct key *k = find_key(s, name, strlen(name));
	if (!k) {
		unknown_key_msg(s, name, strlen(name), msg, sizeof(msg));
		msgf(err, errlen, "%s: %s", key, msg);
		return -EINVAL;
	}
	if (k->kind == K_SECTION) {
		msgf(err, errlen, "%s: is a section; set one of its keys (%s.%s, ...)", key, key,
		     k->sub->keys[0].name);
		return -EINVAL;
	}

	struct ferry_config *copy = malloc(sizeof(*copy));
	if (!copy) {
		msgf(err, errlen, "%s: out of memory", key);
		return -ENOMEM;
	}
	*copy = *c;
	char path[KEYPATH_MAX];
	keypath(s, k, path, sizeof(path));
	size_t len = strlen(value);
	int r = apply_value(copy, k, path, value, len, len == 0, err, errlen);
	if (r == 0)
		*c = *copy;
	free(copy);
	return r;
}

static int check_section(const struct ferry_config *c, const struct section *s, char *err,
			 size_t errlen)
{
	for (unsigned i = 0; i < s->nkeys; i++) {
		const struct key *k = &s->keys[i];
		char path[KEYPATH_MAX];
		int r;
		if (k->kind == K_SECTION) {
			r = check_section(c, k->sub, err, errlen);
		} else {
			keypath(s, k, path, sizeof(path));
			r = check_field(c, k, path, err, errlen);
		}
		if (r < 0)
			return r;
	}
	return 0;
}

/* Does a listener on a clash with one on b? Wildcard addresses overlap every host. */
static bool same_listener(const struct ferry_hostport *a, const struct ferry_hostport *b)
{
	static const char *const any[] = {"0.0.0.0", "::"};
	if (!a->host[0] || !b->host[0] || a->port == 0 || a->port != b->port)
		return false;
	for (unsigned i = 0; i < 2; i++)
		if (!strcmp(a->host, any[i]) || !strcmp(b->host, any[i]))
			return true;
	return !strcmp(a->host, b->host);
}

int ferry_config_validate(const struct ferry_config *c, char *err, size_t errlen)
{
	if (err && errlen)
		err[0] = '\0';
	if (!c) {
		msgf(err, errlen, "invalid arguments");
		return -EINVAL;
	}
	int r = check_section(c, &top_section, err, errlen);
	if (r < 0)
		return r;

	const struct ferry_config_tls *t = &c->tls;
	unsigned set = !!t->cert[0] + !!t->key[0] + !!t->ca[0];
	if (set != 0 && set != 3) {
		msgf(err, errlen, "tls: cert, key and ca must be set together (missing:%s%s%s)",
		     t->cert[0] ? "" : " cert", t->key[0] ? "" : " key", t->ca[0] ? "" : " ca");
		return -EINVAL;
	}
	if (c->control.tcp.host[0] && set != 3) {
		msgf(err, errlen,
		     "control.tcp: the TCP API is only served over TLS; set tls.cert, tls.key and "
		     "tls.ca");
		return -EINVAL;
	}
	if (!c->control.socket[0] && !c->control.tcp.host[0]) {
		msgf(err, errlen,
		     "control: socket and tcp are both off; nothing could reach the API");
		return -EINVAL;
	}
	if (c->policy.timeout_action == FERRY_CONFIG_TIMEOUT_POSTCOPY && !c->policy.allow_postcopy) {
		msgf(err, errlen,
		     "policy.timeout_action: postcopy needs policy.allow_postcopy: true");
		return -EINVAL;
	}
	if (c->policy.postcopy_start == FERRY_CONFIG_POSTCOPY_EARLY && !c->policy.allow_postcopy) {
		msgf(err, errlen, "policy.postcopy_start: early needs policy.allow_postcopy: true");
		return -EINVAL;
	}
	if (same_listener(&c->control.tcp, &c->migration.listen)) {
		msgf(err, errlen, "control.tcp: port %u is also migration.listen's",
		     (unsigned)c->control.tcp.port);
		return -EINVAL;
	}
	return 0;
}

int ferry_config_check_files(const struct ferry_config *c, char *err, size_t errlen)
{
	const struct {
		const char *key;
		const char *path;
	} files[] = {{"tls.cert", c->tls.cert}, {"tls.key", c->tls.key}, {"tls.ca", c->tls.ca}};

	if (err && errlen)
		err[0] = '\0';
	for (unsigned i = 0; i < 3; i++) {
		if (!files[i].path[0])
			continue;
		/* open, not access(): ferryd reads these with its effective ids, and a directory
		 * passes access(R_OK). */
		int fd = open(files[i].path, O_RDONLY | O_CLOEXEC);
		int e = errno;
		if (fd >= 0) {
			char b;
			ssize_t n = read(fd, &b, 1);
			e = errno;
			close(fd);
			if (n >= 0)
				continue;
		}
		char eb[128];
		msgf(err, errlen, "%s: cannot read '%s': %s", files[i].key, files[i].path,
		     strerror_r(e, eb, sizeof(eb)));
		return -e;
	}
	return 0;
}

int ferry_config_check(const char *path, char *err, size_t errlen)
{
	struct ferry_config *c = malloc(sizeof(*c));
	char msg[512];
	int r;

	if (!c) {
		msgf(err, errlen, "%s: out of memory", path ? path : "");
		return -ENOMEM;
	}
	ferry_config_defaults(c);
	r = ferry_config_load(path, c, err, errlen);
	if (r == 0) {
		r = ferry_config_validate(c, msg, sizeof(msg));
		if (r == 0)
			r = ferry_config_check_files(c, msg, sizeof(msg));
		if (r < 0)
			msgf(err, errlen, "%s: %s", path, msg);
	}
	free(c);
	return r;
}

/* ---- dump -------------------------------------------------------------------------------- */

/* Double-quoted YAML string: escapes quote, backslash and control bytes; UTF-8 passes. */
static void put_quoted(FILE *f, const char *s)
{
	fputc('"', f);
	for (; *s; s++) {
		unsigned char ch = (unsigned char)*s;
		if (ch == '"' || ch == '\\')
			fprintf(f, "\\%c", ch);
		else if (ch < 0x20 || ch == 0x7f)
			fprintf(f, "\\x%02x", ch);
		else
			fputc(ch, f);
	}
	fputc('"', f);
}

static void dump_section(const struct ferry_config *c, const struct section *s, FILE *f)
{
	const char *indent = s->name[0] ? "  " : "";
	for (unsigned i = 0; i < s->nkeys; i++) {
		const struct key *k = &s->keys[i];
		const void *p = cfield(c, k);
		if (k->kind == K_SECTION) {
			fprintf(f, "%s:\n", k->name);
			dump_section(c, k->sub, f);
			continue;
		}
		fprintf(f, "%s%s: ", indent, k->name);
		switch (k->kind) {
		case K_SECTION:
			break;
		case K_NAME:
		case K_PATH:
			put_quoted(f, p);
			break;
		case K_HOSTPORT: {
			char buf[FERRY_CONFIG_HOST_MAX + 16];
			if (ferry_config_format_hostport(p, buf, sizeof(buf)) < 0)
				buf[0] = '\0';
			put_quoted(f, buf);
			break;
		}
		case K_U32: {
			uint32_t v;
			memcpy(&v, p, sizeof(v));
			fprintf(f, "%u", v);
			break;
		}
		case K_BOOL:
			fprintf(f, "%s", *(const bool *)p ? "true" : "false");
			break;
		case K_RATE:
		case K_SIZE: {
			uint64_t v;
			memcpy(&v, p, sizeof(v));
			fprintf(f, "%llu", (unsigned long long)v);
			break;
		}
		case K_ENUM: {
			unsigned v;
			memcpy(&v, p, sizeof(v));
			unsigned n = 0;
			while (k->names[n])
				n++;
			fprintf(f, "%s", v < n ? k->names[v] : "?");
			break;
		}
		}
		fputc('\n', f);
	}
}

int ferry_config_dump(const struct ferry_config *c, FILE *f)
{
	dump_section(c, &top_section, f);
	if (fflush(f) || ferror(f))
		return -EIO;
	return 0;
}
