// SPDX-License-Identifier: Apache-2.0
/*
 * Description: ferryd's config loader (agent/config.c). Every key is set and read back; each
 * class of bad input (unknown and duplicate keys, wrong node kinds, bad numbers, YAML syntax,
 * anchors, aliases, tags, oversized files, ...) gives an error naming file:line:column and
 * leaves the struct byte-for-byte untouched; the value parsers (rates, sizes, HOST:PORT)
 * are checked on their edges; overrides and cross-field validation; deploy/ferryd.yaml
 * loads and says exactly the defaults; and random mutations of a valid file never crash
 * (run under ASan in CI) and never half-apply.
 */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cmocka.h>

#include "agent/config.h"

/* Every key, none at its default, in the styles operators use (plain, quoted, flow). */
static const char full_yaml[] =
	"# every key set\n"
	"name: host-b.lab_1\n"
	"log_level: debug\n"
	"control:\n"
	"  socket: /tmp/ferry test/ferryd.sock\n"
	"  tcp: \"[::1]:7443\"\n"
	"migration:\n"
	"  listen: 192.0.2.10:7001\n"
	"  downtime_ms: 150\n"
	"  bandwidth: 10Gbit\n"
	"  streams: 8\n"
	"  transport: rdma\n"
	"  verify: true\n"
	"  queue_depth: 128\n"
	"  batch_pages: 512\n"
	"  compress: \"on\"\n"
	"  compress_level: 3\n"
	"limits: {max_outgoing: 3, max_incoming: 0, max_vms: 100, max_memory: 512G}\n"
	"tls:\n"
	"  cert: /etc/ferry/cert.pem\n"
	"  key: '/etc/ferry/key.pem'\n"
	"  ca: \"/etc/ferry/ca.pem\"\n";

/* All dotted keys; set_every_key fails if the schema loses one. */
static const char *const all_keys[] = {
	"name",
	"log_level",
	"control.socket",
	"control.tcp",
	"migration.listen",
	"migration.downtime_ms",
	"migration.bandwidth",
	"migration.streams",
	"migration.transport",
	"migration.verify",
	"migration.queue_depth",
	"migration.batch_pages",
	"migration.compress",
	"migration.compress_level",
	"limits.max_outgoing",
	"limits.max_incoming",
	"limits.max_vms",
	"limits.max_memory",
	"tls.cert",
	"tls.key",
	"tls.ca",
};
#define NR_KEYS (sizeof(all_keys) / sizeof(all_keys[0]))

static void check_full(const struct ferry_config *c)
{
	assert_string_equal(c->name, "host-b.lab_1");
	assert_int_equal(c->log_level, FERRY_CONFIG_LOG_DEBUG);
	assert_string_equal(c->control.socket, "/tmp/ferry test/ferryd.sock");
	assert_string_equal(c->control.tcp.host, "::1");
	assert_int_equal(c->control.tcp.port, 7443);
	assert_string_equal(c->migration.listen.host, "192.0.2.10");
	assert_int_equal(c->migration.listen.port, 7001);
	assert_int_equal(c->migration.downtime_ms, 150);
	assert_true(c->migration.bandwidth == 1250000000ull);
	assert_int_equal(c->migration.streams, 8);
	assert_int_equal(c->migration.transport, FERRY_CONFIG_TRANSPORT_RDMA);
	assert_true(c->migration.verify);
	assert_int_equal(c->migration.queue_depth, 128);
	assert_int_equal(c->migration.batch_pages, 512);
	assert_int_equal(c->migration.compress, FERRY_CONFIG_COMPRESS_ON);
	assert_int_equal(c->migration.compress_level, 3);
	assert_int_equal(c->limits.max_outgoing, 3);
	assert_int_equal(c->limits.max_incoming, 0);
	assert_int_equal(c->limits.max_vms, 100);
	assert_true(c->limits.max_memory == 512ull << 30);
	assert_string_equal(c->tls.cert, "/etc/ferry/cert.pem");
	assert_string_equal(c->tls.key, "/etc/ferry/key.pem");
	assert_string_equal(c->tls.ca, "/etc/ferry/ca.pem");
}

/* Field-wise, so padding and bytes after string NULs do not matter. */
static bool config_equal(const struct ferry_config *a, const struct ferry_config *b)
{
	return !strcmp(a->name, b->name) && a->log_level == b->log_level &&
	       !strcmp(a->control.socket, b->control.socket) &&
	       !strcmp(a->control.tcp.host, b->control.tcp.host) &&
	       a->control.tcp.port == b->control.tcp.port &&
	       !strcmp(a->migration.listen.host, b->migration.listen.host) &&
	       a->migration.listen.port == b->migration.listen.port &&
	       a->migration.downtime_ms == b->migration.downtime_ms &&
	       a->migration.bandwidth == b->migration.bandwidth &&
	       a->migration.streams == b->migration.streams &&
	       a->migration.transport == b->migration.transport &&
	       a->migration.verify == b->migration.verify &&
	       a->migration.queue_depth == b->migration.queue_depth &&
	       a->migration.batch_pages == b->migration.batch_pages &&
	       a->migration.compress == b->migration.compress &&
	       a->migration.compress_level == b->migration.compress_level &&
	       a->limits.max_outgoing == b->limits.max_outgoing &&
	       a->limits.max_incoming == b->limits.max_incoming &&
	       a->limits.max_vms == b->limits.max_vms &&
	       a->limits.max_memory == b->limits.max_memory && !strcmp(a->tls.cert, b->tls.cert) &&
	       !strcmp(a->tls.key, b->tls.key) && !strcmp(a->tls.ca, b->tls.ca);
}

static int load_str(const char *yaml, struct ferry_config *c, char *err, size_t errlen)
{
	return ferry_config_load_string(yaml, strlen(yaml), "t.yaml", c, err, errlen);
}

/* Source tree root, from this file's path as the compiler saw it. */
static void source_path(const char *rel, char *buf, size_t len)
{
	const char *me = __FILE__;
	const char *tail = strstr(me, "tests/unit/test_config.c");
	assert_non_null(tail);
	snprintf(buf, len, "%.*s%s", (int)(tail - me), me, rel);
}

static char *read_text(const char *path)
{
	FILE *f = fopen(path, "r");
	if (!f)
		fail_msg("cannot open %s", path);
	char *buf = calloc(1, 1 << 20);
	assert_non_null(buf);
	size_t n = fread(buf, 1, (1 << 20) - 1, f);
	buf[n] = '\0';
	fclose(f);
	return buf;
}

/* ---- defaults and the happy path ---------------------------------------------------------- */

static void defaults(void **state)
{
	(void)state;
	struct ferry_config c;
	char err[512];
	ferry_config_defaults(&c);
	assert_true(c.name[0] != '\0');
	assert_int_equal(c.log_level, FERRY_CONFIG_LOG_INFO);
	assert_string_equal(c.control.socket, "/run/ferry/ferryd.sock");
	assert_string_equal(c.control.tcp.host, "");
	assert_string_equal(c.migration.listen.host, "0.0.0.0");
	assert_int_equal(c.migration.listen.port, 7000);
	assert_int_equal(c.migration.downtime_ms, 300);
	assert_true(c.migration.bandwidth == 0);
	assert_int_equal(c.migration.streams, 4);
	assert_int_equal(c.migration.transport, FERRY_CONFIG_TRANSPORT_AUTO);
	assert_false(c.migration.verify);
	assert_int_equal(c.migration.queue_depth, 16);
	assert_int_equal(c.migration.batch_pages, 256);
	assert_int_equal(c.migration.compress, FERRY_CONFIG_COMPRESS_AUTO);
	assert_int_equal(c.migration.compress_level, 1);
	assert_int_equal(c.limits.max_outgoing, 2);
	assert_int_equal(c.limits.max_incoming, 2);
	assert_int_equal(c.limits.max_vms, 64);
	assert_true(c.limits.max_memory == 0);
	assert_string_equal(c.tls.cert, "");
	assert_string_equal(c.tls.key, "");
	assert_string_equal(c.tls.ca, "");
	/* The host name might not be a valid agent name on an odd build host; pin it. */
	snprintf(c.name, sizeof(c.name), "host-a");
	assert_int_equal(ferry_config_validate(&c, err, sizeof(err)), 0);
	assert_string_equal(ferry_config_log_level_name(FERRY_CONFIG_LOG_WARN), "warn");
	assert_string_equal(ferry_config_transport_name(FERRY_CONFIG_TRANSPORT_TCP), "tcp");
	assert_string_equal(ferry_config_transport_name((enum ferry_config_transport)7), "?");
	assert_string_equal(ferry_config_compress_name(FERRY_CONFIG_COMPRESS_AUTO), "auto");
	assert_string_equal(ferry_config_compress_name((enum ferry_config_compress)9), "?");
}

static void every_key_read_back(void **state)
{
	(void)state;
	struct ferry_config c;
	char err[512];
	ferry_config_defaults(&c);
	int r = load_str(full_yaml, &c, err, sizeof(err));
	if (r)
		fail_msg("load: %d %s", r, err);
	check_full(&c);
	/* tcp API with all three TLS files, distinct ports: valid as a whole too. */
	r = ferry_config_validate(&c, err, sizeof(err));
	if (r)
		fail_msg("validate: %s", err);
}

static void empty_inputs_are_defaults(void **state)
{
	(void)state;
	static const char *const empties[] = {
		"", "\n", "# only a comment\n\n   # another\n", "---\n", "---\n...\n", "{}\n",
		"~\n", "migration:\ntls: ~\nlimits: {}\ncontrol: null\n",
	};
	struct ferry_config def, c;
	char err[512];
	ferry_config_defaults(&def);
	for (size_t i = 0; i < sizeof(empties) / sizeof(empties[0]); i++) {
		c = def;
		int r = load_str(empties[i], &c, err, sizeof(err));
		if (r)
			fail_msg("empty input %zu: %d %s", i, r, err);
		assert_true(config_equal(&c, &def));
	}
	c = def;
	assert_int_equal(ferry_config_load_string(NULL, 0, "t.yaml", &c, err, sizeof(err)), 0);
}

/* Loading applies over what the struct holds: keys the file leaves out keep their values. */
static void load_overlays(void **state)
{
	(void)state;
	struct ferry_config c;
	char err[512];
	ferry_config_defaults(&c);
	c.migration.streams = 9;
	assert_int_equal(load_str("migration:\n  verify: yes\n", &c, err, sizeof(err)), 0);
	assert_int_equal(c.migration.streams, 9);
	assert_true(c.migration.verify);
	/* Quoted numbers are numbers (the schema decides), YAML 1.1 booleans are booleans. */
	assert_int_equal(load_str("migration: {streams: \"12\", verify: Off}\n", &c, err,
				  sizeof(err)),
			 0);
	assert_int_equal(c.migration.streams, 12);
	assert_false(c.migration.verify);
	/* Strings can be emptied; YAML null means empty for strings. */
	assert_int_equal(load_str("control:\n  tcp: 127.0.0.1:7443\n", &c, err, sizeof(err)), 0);
	assert_int_equal(c.control.tcp.port, 7443);
	assert_int_equal(load_str("control:\n  tcp:\n", &c, err, sizeof(err)), 0);
	assert_string_equal(c.control.tcp.host, "");
	assert_int_equal(load_str("control: {socket: ''}\n", &c, err, sizeof(err)), 0);
	assert_string_equal(c.control.socket, "");
	/* CRLF line ends and a BOM, as files edited on other systems arrive. */
	assert_int_equal(load_str("\xef\xbb\xbfmigration:\r\n  streams: 5\r\n", &c, err,
				  sizeof(err)),
			 0);
	assert_int_equal(c.migration.streams, 5);
	/* The socket path may use all 107 bytes of sun_path. */
	char yaml[256], path[128];
	memset(path, 'a', 107);
	path[0] = '/';
	path[107] = '\0';
	snprintf(yaml, sizeof(yaml), "control:\n  socket: %s\n", path);
	assert_int_equal(load_str(yaml, &c, err, sizeof(err)), 0);
	assert_string_equal(c.control.socket, path);
}

/* ---- bad input: error with location, struct untouched ------------------------------------ */

struct bad {
	const char *yaml;
	const char *loc;    /* "line:col" the error must name */
	const char *needle; /* substring of the message */
};

static const struct bad bad_cases[] = {
	/* unknown keys, with the known list and a suggestion */
	{"migration:\n  bandwith: 1G\n", "2:3",
	 "unknown key 'bandwith' in 'migration'; did you mean 'bandwidth'? (known: listen, "
	 "downtime_ms, bandwidth, streams, transport, verify, queue_depth, batch_pages, "
	 "warm_buffers, compress, compress_level)"},
	{"foo: 1\n", "1:1", "unknown key 'foo' at the top level (known: name, log_level, state_dir, control"},
	{"Migration:\n  streams: 2\n", "1:1", "did you mean 'migration'?"},
	{"tls:\n  crt: /a\n", "2:3", "unknown key 'crt' in 'tls'; did you mean 'cert'?"},
	{"limits:\n  <<: {max_vms: 1}\n", "2:3", "unknown key '<<' in 'limits'"},
	{"\"\": 1\n", "1:1", "unknown key '' at the top level"},
	/* duplicates */
	{"migration:\n  streams: 2\n  streams: 3\n", "3:3",
	 "duplicate key 'streams' in 'migration' (first set at line 2)"},
	{"limits: {}\nname: a\nlimits: {}\n", "3:1",
	 "duplicate key 'limits' (first set at line 1)"},
	/* node kinds */
	{"migration:\n  streams: [1, 2]\n", "2:12",
	 "'migration.streams' must be a single value, got a list"},
	{"name:\n  a: b\n", "2:3", "'name' must be a single value, got a mapping"},
	{"migration: fast\n", "1:12", "'migration' must be a mapping of keys, got a single value"},
	{"tls:\n  - a\n", "2:3", "'tls' must be a mapping of keys, got a list"},
	{"? [a]\n: 1\n", "1:3", "keys must be plain names, got a list"},
	{"- a\n", "1:1", "the top level must be a mapping (key: value), got a list"},
	{"hello\n", "1:1", "the top level must be a mapping (key: value), got a single value"},
	/* numbers */
	{"migration:\n  streams: 65\n", "2:12", "migration.streams: 65 is out of range (1..64)"},
	{"migration:\n  downtime_ms: 0\n", "2:16",
	 "migration.downtime_ms: 0 is out of range (1..60000)"},
	{"migration:\n  queue_depth: 4097\n", "2:16", "out of range (1..4096)"},
	{"migration:\n  batch_pages: 65537\n", "2:16", "out of range (1..65536)"},
	{"limits:\n  max_outgoing: 65\n", "2:17", "out of range (0..64)"},
	{"limits:\n  max_vms: 0\n", "2:12", "out of range (1..4096)"},
	{"migration:\n  streams: four\n", "2:12",
	 "migration.streams: 'four' is not a whole number"},
	{"limits:\n  max_vms: -1\n", "2:12", "limits.max_vms: -1: must not be negative"},
	{"limits:\n  max_vms: 99999999999999999999999\n", "2:12", "is out of range (1..4096)"},
	{"limits:\n  max_vms: 4294967296\n", "2:12", "is out of range (1..4096)"},
	{"migration:\n  streams: 1.5\n", "2:12", "'1.5' is not a whole number"},
	{"migration:\n  streams: 0x10\n", "2:12", "'0x10' is not a whole number"},
	{"migration:\n  streams: 08\n", "2:12", "'08': leading zeros are not allowed"},
	{"migration:\n  streams: +4\n", "2:12", "'+4' is not a whole number"},
	{"migration:\n  streams:\n", "2:11", "migration.streams: has no value"},
	{"migration:\n  streams: ''\n", "2:12", "'' is not a whole number"},
	{"migration:\n  bandwidth: 1Gb\n", "2:14", "'1Gb' is not a rate"},
	{"migration:\n  bandwidth: -1G\n", "2:14", "-1G: must not be negative"},
	{"migration:\n  bandwidth: 1000\n", "2:14",
	 "1000 bytes/s is below the minimum of 1000000"},
	{"migration:\n  bandwidth: 99999999999T\n", "2:14",
	 "99999999999T is out of range (at most 2^64-1 bytes/s)"},
	{"migration:\n  bandwidth: 1bit\n", "2:14",
	 "1bit is less than 1 byte/s, and 0 would mean unlimited"},
	{"limits:\n  max_memory: lots\n", "2:15", "'lots' is not a size"},
	{"limits:\n  max_memory: 1G/s\n", "2:15", "'1G/s' is not a size"},
	{"limits:\n  max_memory: 0.1\n", "2:15",
	 "0.1 is less than 1 byte, and 0 would mean the host's RAM"},
	/* booleans and enums */
	{"migration:\n  verify: maybe\n", "2:11", "'maybe' is not a boolean (true or false)"},
	{"migration:\n  verify: 1\n", "2:11", "is not a boolean"},
	{"migration:\n  compress: lz4\n", "2:13", "'lz4' is not one of off, on, auto"},
	{"migration:\n  compress_level: 20\n", "2:19", "compress_level"},
	{"migration:\n  transport: udp\n", "2:14", "'udp' is not one of auto, tcp, rdma"},
	{"migration:\n  transport: TCP\n", "2:14", "'TCP' is not one of auto, tcp, rdma"},
	{"log_level: verbose\n", "1:12",
	 "log_level: 'verbose' is not one of error, warn, info, debug"},
	/* strings, names, addresses */
	{"name: -bad\n", "1:7", "'-bad' is not a valid agent name"},
	{"name: \"\"\n", "1:7", "'' is not a valid agent name"},
	{"name: a b\n", "1:7", "'a b' is not a valid agent name"},
	{"name: \"a\\0b\"\n", "1:7", "name: value contains a NUL byte"},
	{"tls:\n  cert: \"a\\tb\"\n", "2:9", "tls.cert: path contains a control character"},
	{"tls:\n  ca: |\n    /etc/ca.pem\n", "2:7", "tls.ca: path contains a control character"},
	{"migration:\n  listen: 7000\n", "2:11", "'7000' is not HOST:PORT"},
	{"migration:\n  listen: host:70000\n", "2:11", "is not HOST:PORT"},
	{"migration:\n  listen: \"::1:7000\"\n", "2:11", "is not HOST:PORT"},
	{"migration:\n  listen: bad_host:1\n", "2:11", "is not HOST:PORT"},
	{"migration:\n  listen: \"\"\n", "2:11", "migration.listen: must be set (HOST:PORT)"},
	{"migration:\n  listen:\n", "2:10", "migration.listen: must be set (HOST:PORT)"},
	{"control:\n  tcp: \"[::1]\"\n", "2:8", "control.tcp: '[::1]' is not HOST:PORT"},
	/* YAML syntax, as libyaml reports it */
	{"migration:\n  streams: 4\n bad: 1\n", "3:2",
	 "YAML syntax error: did not find expected key"},
	{"name: \"abc\n", "2:1", "YAML syntax error: found unexpected end of stream"},
	{"migration:\n\tstreams: 4\n", "2:1",
	 "YAML syntax error: found character that cannot start any token"},
	{"migration: {streams: 4\n", "2:1", "YAML syntax error: did not find expected ',' or '}'"},
	{"name: a\xff\n", "1:8", "not valid YAML text: invalid leading UTF-8 octet (byte 0xff)"},
	{"name: a\x01\n", "1:8", "not valid YAML text: control characters are not allowed"},
	/* features we refuse */
	{"migration: &m\n  streams: 4\n", "1:12", "anchors (&m) are not supported"},
	{"name: &n a\n", "1:7", "anchors (&n) are not supported"},
	{"name: *n\n", "1:7", "aliases (*n) are not supported"},
	{"migration:\n  streams: !!int 4\n", "2:12",
	 "tags (tag:yaml.org,2002:int) are not supported"},
	{"tls: !custom {}\n", "1:6", "tags (!custom) are not supported"},
	{"!!map {}\n", "1:1", "tags (tag:yaml.org,2002:map) are not supported"},
	{"name: a\n---\nname: b\n", "2:1", "only one YAML document is allowed"},
	{"---\n---\n", "2:1", "only one YAML document is allowed"},
	/* a good key before the bad one must not be half-applied */
	{"migration:\n  streams: 9\n  transport: udp\n", "3:14", "'udp' is not one of"},
};

static void bad_inputs(void **state)
{
	(void)state;
	struct ferry_config c, snap;
	char err[1024], want[64];
	unsigned failed = 0;

	ferry_config_defaults(&c);
	c.migration.streams = 7; /* not a default, so "untouched" is not "reset" */
	snap = c;
	for (size_t i = 0; i < sizeof(bad_cases) / sizeof(bad_cases[0]); i++) {
		const struct bad *b = &bad_cases[i];
		memset(err, 0, sizeof(err));
		int r = load_str(b->yaml, &c, err, sizeof(err));
		snprintf(want, sizeof(want), "t.yaml:%s: ", b->loc);
		bool ok = r == -EINVAL && !strncmp(err, want, strlen(want)) &&
			  strstr(err, b->needle) && !memcmp(&c, &snap, sizeof(c));
		if (!ok) {
			print_error("case %zu: r=%d err=\"%s\"\n  want \"%s...%s\"%s\n", i, r, err,
				    want, b->needle,
				    memcmp(&c, &snap, sizeof(c)) ? " (struct modified)" : "");
			failed++;
			c = snap;
		}
	}
	assert_int_equal(failed, 0);
}

/* policy.postcopy_start / postcopy_precopy_rounds: early postcopy needs allow_postcopy. */
static void policy_postcopy_start(void **state)
{
	(void)state;
	struct ferry_config c;
	char err[1024];
	ferry_config_defaults(&c);
	assert_int_equal(c.policy.postcopy_start, FERRY_CONFIG_POSTCOPY_LAST_RESORT);
	assert_int_equal(c.policy.postcopy_precopy_rounds, 1);
	assert_int_equal(load_str("policy:\n  allow_postcopy: true\n  postcopy_start: early\n"
				  "  postcopy_precopy_rounds: 0\n",
				  &c, err, sizeof(err)),
			 0);
	assert_int_equal(c.policy.postcopy_start, FERRY_CONFIG_POSTCOPY_EARLY);
	assert_int_equal(c.policy.postcopy_precopy_rounds, 0);

	assert_int_equal(ferry_config_validate(&c, err, sizeof(err)), 0);
	/* A cross-field rule: the load takes it, validation refuses it. */
	ferry_config_defaults(&c);
	assert_int_equal(load_str("policy:\n  postcopy_start: early\n", &c, err, sizeof(err)), 0);
	assert_int_equal(ferry_config_validate(&c, err, sizeof(err)), -EINVAL);
	assert_non_null(strstr(err, "policy.postcopy_start: early needs policy.allow_postcopy: true"));
	assert_int_equal(load_str("policy:\n  postcopy_start: soon\n", &c, err, sizeof(err)),
			 -EINVAL);
	assert_non_null(strstr(err, "last_resort"));
	assert_int_equal(load_str("policy:\n  postcopy_precopy_rounds: 1001\n", &c, err,
				  sizeof(err)),
			 -EINVAL);
	assert_non_null(strstr(err, "out of range"));
}

static void long_paths(void **state)
{
	(void)state;
	struct ferry_config c, snap;
	char err[512];
	size_t n = PATH_MAX + 64;
	char *yaml = malloc(n + 64), *p;
	assert_non_null(yaml);
	ferry_config_defaults(&c);
	snap = c;

	/* 108 bytes cannot fit sun_path with its NUL. */
	p = yaml + sprintf(yaml, "control:\n  socket: /");
	memset(p, 's', 107);
	strcpy(p + 107, "\n");
	assert_int_equal(load_str(yaml, &c, err, sizeof(err)), -EINVAL);
	assert_non_null(strstr(err, "t.yaml:2:11: control.socket: path is 108 bytes; a unix socket "
				    "path must be at most 107"));
	assert_memory_equal(&c, &snap, sizeof(c));

	p = yaml + sprintf(yaml, "tls:\n  cert: /");
	memset(p, 'c', PATH_MAX);
	strcpy(p + PATH_MAX, "\n");
	assert_int_equal(load_str(yaml, &c, err, sizeof(err)), -EINVAL);
	assert_non_null(strstr(err, "t.yaml:2:9: tls.cert: path is 4097 bytes, more than 4095"));
	assert_memory_equal(&c, &snap, sizeof(c));

	/* A host name of 254 characters is not a DNS name. */
	p = yaml + sprintf(yaml, "migration:\n  listen: ");
	for (int i = 0; i < 50; i++)
		p += sprintf(p, "abcd.");
	sprintf(p, "abcd:7000\n");
	assert_int_equal(load_str(yaml, &c, err, sizeof(err)), -EINVAL);
	assert_non_null(strstr(err, "t.yaml:2:11: migration.listen:"));
	assert_memory_equal(&c, &snap, sizeof(c));
	free(yaml);
}

static void huge_input(void **state)
{
	(void)state;
	struct ferry_config c, snap;
	char err[512];
	size_t n = FERRY_CONFIG_MAX_FILE + 1;
	char *big = malloc(n);
	assert_non_null(big);
	/* Valid YAML all the way (comment lines), so only the size can refuse it. */
	for (size_t i = 0; i < n; i++)
		big[i] = (i % 64 == 63) ? '\n' : (i % 64 == 0 ? '#' : 'x');
	ferry_config_defaults(&c);
	snap = c;
	assert_int_equal(ferry_config_load_string(big, n, "big.yaml", &c, err, sizeof(err)),
			 -EFBIG);
	assert_non_null(strstr(err, "big.yaml: file is 1048577 bytes"));
	assert_memory_equal(&c, &snap, sizeof(c));
	/* Exactly at the cap is fine. */
	big[n - 2] = '\n';
	assert_int_equal(ferry_config_load_string(big, n - 1, "big.yaml", &c, err, sizeof(err)), 0);

	/* The same through a file. */
	char path[] = "/tmp/ferry-config-big-XXXXXX";
	int fd = mkstemp(path);
	assert_true(fd >= 0);
	assert_int_equal(write(fd, big, n), (ssize_t)n);
	close(fd);
	assert_int_equal(ferry_config_load(path, &c, err, sizeof(err)), -EFBIG);
	assert_non_null(strstr(err, "file is larger than the 1048576 bytes allowed"));
	assert_memory_equal(&c, &snap, sizeof(c));
	unlink(path);
	free(big);
}

/* ---- files ------------------------------------------------------------------------------- */

static void load_file(void **state)
{
	(void)state;
	struct ferry_config c, snap;
	char err[512];
	char path[] = "/tmp/ferry-config-XXXXXX";
	int fd = mkstemp(path);
	assert_true(fd >= 0);
	assert_int_equal(write(fd, full_yaml, strlen(full_yaml)), (ssize_t)strlen(full_yaml));
	close(fd);

	ferry_config_defaults(&c);
	assert_int_equal(ferry_config_load(path, &c, err, sizeof(err)), 0);
	check_full(&c);

	/* Errors name the path as given. */
	fd = open(path, O_WRONLY | O_TRUNC);
	assert_true(fd >= 0);
	assert_int_equal(write(fd, "\n\nmigration:\n  streams: 0\n", 26), 26);
	close(fd);
	snap = c;
	assert_int_equal(ferry_config_load(path, &c, err, sizeof(err)), -EINVAL);
	char want[128];
	snprintf(want, sizeof(want), "%s:4:12: migration.streams: 0 is out of range", path);
	assert_non_null(strstr(err, want));
	assert_memory_equal(&c, &snap, sizeof(c));
	unlink(path);

	assert_int_equal(ferry_config_load(path, &c, err, sizeof(err)), -ENOENT);
	snprintf(want, sizeof(want), "%s: cannot open: No such file or directory", path);
	assert_string_equal(err, want);
	assert_int_equal(ferry_config_load("/tmp", &c, err, sizeof(err)), -EISDIR);
	assert_memory_equal(&c, &snap, sizeof(c));
	/* No error buffer at all is allowed. */
	assert_int_equal(ferry_config_load(path, &c, NULL, 0), -ENOENT);
}

static void write_file(const char *path, const char *text)
{
	FILE *f = fopen(path, "w");
	assert_non_null(f);
	fputs(text, f);
	assert_int_equal(fclose(f), 0);
}

static void check_config(void **state)
{
	(void)state;
	char dir[] = "/tmp/ferry-check-XXXXXX", p[3][64], cfg[64], yaml[1024], err[1024];
	assert_non_null(mkdtemp(dir));
	static const char *const names[] = {"cert.pem", "key.pem", "ca.pem"};
	for (int i = 0; i < 3; i++) {
		snprintf(p[i], sizeof(p[i]), "%s/%s", dir, names[i]);
		write_file(p[i], "-----BEGIN X-----\n");
	}
	snprintf(cfg, sizeof(cfg), "%s/ferryd.yaml", dir);
	snprintf(yaml, sizeof(yaml),
		 "name: a\ncontrol:\n  tcp: 0.0.0.0:7443\ntls:\n  cert: %s\n  key: %s\n  ca: %s\n",
		 p[0], p[1], p[2]);
	write_file(cfg, yaml);
	int r = ferry_config_check(cfg, err, sizeof(err));
	if (r)
		fail_msg("check: %s", err);

	/* A missing TLS file fails the check (not the load), naming the key and the path. */
	unlink(p[1]);
	assert_int_equal(ferry_config_check(cfg, err, sizeof(err)), -ENOENT);
	char want[1024];
	snprintf(want, sizeof(want), "%s: tls.key: cannot read '%s': No such file or directory",
		 cfg, p[1]);
	assert_string_equal(err, want);

	/* Cross-field problems come prefixed with the file. */
	write_file(cfg, "name: a\ntls:\n  cert: /x\n");
	assert_int_equal(ferry_config_check(cfg, err, sizeof(err)), -EINVAL);
	snprintf(want, sizeof(want), "%s: tls: cert, key and ca must be set together", cfg);
	assert_non_null(strstr(err, want));

	/* Per-key problems keep their line:column. */
	write_file(cfg, "name: a\nlog_level: loud\n");
	assert_int_equal(ferry_config_check(cfg, err, sizeof(err)), -EINVAL);
	snprintf(want, sizeof(want), "%s:2:12: log_level:", cfg);
	assert_non_null(strstr(err, want));

	unlink(cfg);
	unlink(p[0]);
	unlink(p[2]);
	rmdir(dir);
}

/* ---- value parsers ----------------------------------------------------------------------- */

struct qcase {
	const char *s;
	int r;
	uint64_t v;
};

static void parse_rate(void **state)
{
	(void)state;
	static const struct qcase cases[] = {
		{"0", 0, 0},
		{"1048576", 0, 1048576},
		{"100M", 0, 100ull << 20},
		{"100M/s", 0, 100ull << 20},
		{"10G", 0, 10ull << 30},
		{"1.25GB/s", 0, 1342177280ull},
		{"1.5T", 0, 3ull << 39},
		{"1KiB/s", 0, 1024},
		{"1Ki", 0, 1024},
		{"2 MB", 0, 2ull << 20},
		{"1k", 0, 1024},
		{"100B/s", 0, 100},
		{"1Gbit", 0, 125000000},
		{"1gbit", 0, 125000000},
		{"100Mbit", 0, 12500000},
		{"100Mbit/s", 0, 12500000},
		{"10Gbps", 0, 1250000000},
		{"1Kbit", 0, 125},
		{"8bit", 0, 1},
		{"2.5Gbit", 0, 312500000},
		{"0.5", -ERANGE, 0},
		{"1bit", -ERANGE, 0},
		{"18446744073709551615", 0, UINT64_MAX},
		{"18446744073709551616", -ERANGE, 0},
		{"16777216T", -ERANGE, 0},
		{"16777215.99999999999999999T", 0, UINT64_MAX}, /* 2^64 - 1.1e-5, cut */
		{"1.0000000000000000001G", -EINVAL, 0},      /* more than 18 decimals */
		{"1Gb", -EINVAL, 0},
		{"1Gb/s", -EINVAL, 0},
		{"1Gibit", -EINVAL, 0},
		{"1Bbit", -EINVAL, 0},
		{"-1", -EINVAL, 0},
		{"+1", -EINVAL, 0},
		{"", -EINVAL, 0},
		{" 1", -EINVAL, 0},
		{"1 ", -EINVAL, 0},
		{"1.", -EINVAL, 0},
		{".5G", -EINVAL, 0},
		{"0x10", -EINVAL, 0},
		{"1e9", -EINVAL, 0},
		{"01", -EINVAL, 0},
		{"1P", -EINVAL, 0},
		{"1G/h", -EINVAL, 0},
		{"1GB/s/s", -EINVAL, 0},
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		uint64_t v = 0xdead;
		int r = ferry_config_parse_rate(cases[i].s, &v);
		if (r != cases[i].r || (r == 0 && v != cases[i].v) || (r && v != 0xdead))
			fail_msg("rate '%s': r=%d v=%llu, want r=%d v=%llu", cases[i].s, r,
				 (unsigned long long)v, cases[i].r, (unsigned long long)cases[i].v);
	}
}

static void parse_size(void **state)
{
	(void)state;
	static const struct qcase cases[] = {
		{"0", 0, 0},
		{"4096", 0, 4096},
		{"512M", 0, 512ull << 20},
		{"1.5G", 0, 1610612736ull},
		{"64GiB", 0, 64ull << 30},
		{"64Gi", 0, 64ull << 30},
		{"1KB", 0, 1024},
		{"100B", 0, 100},
		{"2T", 0, 2ull << 40},
		{"16383.999999999T", 0, 18014398509480884ull},
		{"0.5", -ERANGE, 0},
		{"16384T", 0, 1ull << 54},
		{"16777216T", -ERANGE, 0},
		{"1Gbit", -EINVAL, 0},
		{"1G/s", -EINVAL, 0},
		{"1Gb", -EINVAL, 0},
		{"-1", -EINVAL, 0},
		{"G", -EINVAL, 0},
		{"", -EINVAL, 0},
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		uint64_t v = 0xdead;
		int r = ferry_config_parse_size(cases[i].s, &v);
		if (r != cases[i].r || (r == 0 && v != cases[i].v) || (r && v != 0xdead))
			fail_msg("size '%s': r=%d v=%llu, want r=%d v=%llu", cases[i].s, r,
				 (unsigned long long)v, cases[i].r, (unsigned long long)cases[i].v);
	}
}

static void parse_hostport(void **state)
{
	(void)state;
	static const struct {
		const char *s;
		const char *host;
		unsigned port;
	} good[] = {
		{"0.0.0.0:7000", "0.0.0.0", 7000},
		{"[::]:7000", "::", 7000},
		{"[::1]:0", "::1", 0},
		{"[fe80::1%eth0]:7000", "fe80::1%eth0", 7000},
		{"[::ffff:192.0.2.1]:65535", "::ffff:192.0.2.1", 65535},
		{"host-b.example:80", "host-b.example", 80},
		{"localhost:1", "localhost", 1},
		{"a:07000", "a", 7000},
	};
	static const char *const bad[] = {
		"7000", ":7000", "host:", "host:65536", "host:123456", "host:-1", "host:+1",
		"host: 1", "::1:7000", "[::1]7000", "[::1", "[::1]:", "[zz]:1", "[1.2.3.4]:1",
		"[fe80::1%]:1", "[fe80::1%a b]:1", "300.1.1.1:7", "1.2.3:7", "bad_host:1", "-a:1",
		"a-:1", "a..b:1", ".a:1", "a.:1", "a b:1", "", "[]:1",
	};
	char host[FERRY_CONFIG_HOST_MAX + 1];
	uint16_t port;
	for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
		int r = ferry_config_parse_hostport(good[i].s, host, sizeof(host), &port);
		if (r || strcmp(host, good[i].host) || port != good[i].port)
			fail_msg("hostport '%s': r=%d host=%s port=%u", good[i].s, r, host, port);
	}
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		strcpy(host, "keep");
		port = 42;
		int r = ferry_config_parse_hostport(bad[i], host, sizeof(host), &port);
		if (r != -EINVAL || strcmp(host, "keep") || port != 42)
			fail_msg("hostport '%s' accepted or outputs touched (r=%d)", bad[i], r);
	}
	char small[4];
	assert_int_equal(ferry_config_parse_hostport("abcd:1", small, sizeof(small), &port),
			 -ENAMETOOLONG);
	assert_int_equal(ferry_config_parse_hostport("abc:1", small, sizeof(small), &port), 0);

	struct ferry_hostport hp = {.host = "fe80::1%eth0", .port = 7000};
	char buf[64];
	assert_int_equal(ferry_config_format_hostport(&hp, buf, sizeof(buf)), 19);
	assert_string_equal(buf, "[fe80::1%eth0]:7000");
	assert_int_equal(ferry_config_format_hostport(&hp, buf, 10), -ENOSPC);
	snprintf(hp.host, sizeof(hp.host), "host-a");
	assert_true(ferry_config_format_hostport(&hp, buf, sizeof(buf)) > 0);
	assert_string_equal(buf, "host-a:7000");
}

/* ---- overrides and validation ------------------------------------------------------------ */

static void set_every_key(void **state)
{
	(void)state;
	static const char *const values[NR_KEYS] = {
		"host-b.lab_1",
		"debug",
		"/tmp/ferry test/ferryd.sock",
		"[::1]:7443",
		"192.0.2.10:7001",
		"150",
		"10Gbit",
		"8",
		"rdma",
		"true",
		"128",
		"512",
		"on",
		"3",
		"3",
		"0",
		"100",
		"512G",
		"/etc/ferry/cert.pem",
		"/etc/ferry/key.pem",
		"/etc/ferry/ca.pem",
	};
	struct ferry_config c;
	char err[512];
	ferry_config_defaults(&c);
	for (size_t i = 0; i < NR_KEYS; i++) {
		int r = ferry_config_set(&c, all_keys[i], values[i], err, sizeof(err));
		if (r)
			fail_msg("set %s=%s: %s", all_keys[i], values[i], err);
	}
	check_full(&c);
}

static void set_errors(void **state)
{
	(void)state;
	struct ferry_config c, snap;
	char err[512];
	ferry_config_defaults(&c);
	snap = c;
	assert_int_equal(ferry_config_set(&c, "migration.streams", "100", err, sizeof(err)),
			 -EINVAL);
	assert_string_equal(err, "migration.streams: 100 is out of range (1..64)");
	assert_int_equal(ferry_config_set(&c, "migration.bandwith", "1G", err, sizeof(err)),
			 -EINVAL);
	assert_non_null(strstr(err, "migration.bandwith: unknown key 'bandwith' in 'migration'; "
				    "did you mean 'bandwidth'?"));
	assert_int_equal(ferry_config_set(&c, "migratoin.streams", "1", err, sizeof(err)), -EINVAL);
	assert_non_null(strstr(err, "did you mean 'migration'?"));
	assert_int_equal(ferry_config_set(&c, "name.x", "1", err, sizeof(err)), -EINVAL);
	assert_int_equal(ferry_config_set(&c, "migration", "x", err, sizeof(err)), -EINVAL);
	assert_non_null(strstr(err, "is a section"));
	assert_int_equal(ferry_config_set(&c, "migration.verify", "", err, sizeof(err)), -EINVAL);
	assert_string_equal(err, "migration.verify: has no value");
	assert_int_equal(ferry_config_set(&c, "name", "", err, sizeof(err)), -EINVAL);
	assert_int_equal(ferry_config_set(&c, "migration.listen", "", err, sizeof(err)), -EINVAL);
	assert_int_equal(ferry_config_set(&c, "log_level", "loud", err, sizeof(err)), -EINVAL);
	assert_memory_equal(&c, &snap, sizeof(c));
	/* Emptying an optional string works. */
	assert_int_equal(ferry_config_set(&c, "control.tcp", "127.0.0.1:1", err, sizeof(err)), 0);
	assert_int_equal(ferry_config_set(&c, "control.tcp", "", err, sizeof(err)), 0);
	assert_string_equal(c.control.tcp.host, "");
}

static void expect_invalid(const struct ferry_config *c, const char *needle)
{
	char err[512];
	assert_int_equal(ferry_config_validate(c, err, sizeof(err)), -EINVAL);
	if (!strstr(err, needle))
		fail_msg("validate: \"%s\" does not contain \"%s\"", err, needle);
}

static void validate_cross_field(void **state)
{
	(void)state;
	struct ferry_config base, c;
	char err[512];
	ferry_config_defaults(&base);
	snprintf(base.name, sizeof(base.name), "host-a");

	c = base;
	snprintf(c.tls.cert, sizeof(c.tls.cert), "/c");
	expect_invalid(&c, "tls: cert, key and ca must be set together (missing: key ca)");
	snprintf(c.tls.key, sizeof(c.tls.key), "/k");
	snprintf(c.tls.ca, sizeof(c.tls.ca), "/a");
	assert_int_equal(ferry_config_validate(&c, err, sizeof(err)), 0);

	c = base;
	assert_int_equal(ferry_config_set(&c, "control.tcp", "0.0.0.0:7443", err, sizeof(err)), 0);
	expect_invalid(&c, "control.tcp: the TCP API is only served over TLS");

	/* Only the TCP API, with TLS: fine. Then neither: the API is unreachable. */
	snprintf(c.tls.cert, sizeof(c.tls.cert), "/c");
	snprintf(c.tls.key, sizeof(c.tls.key), "/k");
	snprintf(c.tls.ca, sizeof(c.tls.ca), "/a");
	c.control.socket[0] = '\0';
	assert_int_equal(ferry_config_validate(&c, err, sizeof(err)), 0);
	c.control.tcp.host[0] = '\0';
	expect_invalid(&c, "control: socket and tcp are both off");

	/* The API and the migration listener on one port. */
	c = base;
	snprintf(c.tls.cert, sizeof(c.tls.cert), "/c");
	snprintf(c.tls.key, sizeof(c.tls.key), "/k");
	snprintf(c.tls.ca, sizeof(c.tls.ca), "/a");
	assert_int_equal(ferry_config_set(&c, "control.tcp", "10.0.0.1:7000", err, sizeof(err)), 0);
	expect_invalid(&c, "control.tcp: port 7000 is also migration.listen's");
	assert_int_equal(
		ferry_config_set(&c, "migration.listen", "10.0.0.2:7000", err, sizeof(err)), 0);
	assert_int_equal(ferry_config_validate(&c, err, sizeof(err)), 0);
	/* Port 0 (kernel picks) never clashes. */
	assert_int_equal(ferry_config_set(&c, "migration.listen", "0.0.0.0:0", err, sizeof(err)),
			 0);
	assert_int_equal(ferry_config_set(&c, "control.tcp", "0.0.0.0:0", err, sizeof(err)), 0);
	assert_int_equal(ferry_config_validate(&c, err, sizeof(err)), 0);

	/* Fields set directly by code (not through set) are range-checked too. */
	c = base;
	c.migration.streams = 0;
	expect_invalid(&c, "migration.streams: 0 is out of range (1..64)");
	c = base;
	c.log_level = (enum ferry_config_log_level)9;
	expect_invalid(&c, "log_level: 9 is not a valid value");
	c = base;
	c.migration.bandwidth = 10;
	expect_invalid(&c, "migration.bandwidth: 10 bytes/s is below the minimum");
	c = base;
	memset(c.name, 'x', sizeof(c.name));
	expect_invalid(&c, "is not a valid agent name");
	c = base;
	c.migration.listen.host[0] = '\0';
	expect_invalid(&c, "migration.listen: must be set");
	c = base;
	snprintf(c.migration.listen.host, sizeof(c.migration.listen.host), "not a host");
	expect_invalid(&c, "migration.listen: 'not a host' is not a valid host");
	c = base;
	memset(c.tls.ca, 'a', sizeof(c.tls.ca));
	expect_invalid(&c, "tls.ca: path is not terminated");
}

/* ---- dump, the example file, the docs ---------------------------------------------------- */

static void dump_round_trip(void **state)
{
	(void)state;
	struct ferry_config a, b;
	char err[512], *text = NULL;
	size_t len = 0;
	ferry_config_defaults(&a);
	assert_int_equal(load_str(full_yaml, &a, err, sizeof(err)), 0);
	/* Characters that need quoting in YAML. */
	snprintf(a.tls.ca, sizeof(a.tls.ca), "/etc/a \"b\" \\c: #d'e");
	FILE *f = open_memstream(&text, &len);
	assert_non_null(f);
	assert_int_equal(ferry_config_dump(&a, f), 0);
	fclose(f);

	ferry_config_defaults(&b);
	int r = ferry_config_load_string(text, len, "dump", &b, err, sizeof(err));
	if (r)
		fail_msg("reload of dump failed: %s\n%s", err, text);
	assert_true(config_equal(&a, &b));
	assert_non_null(strstr(text, "migration:\n  listen: \"192.0.2.10:7001\"\n"));
	free(text);
}

static void example_file_is_the_defaults(void **state)
{
	(void)state;
	char path[PATH_MAX], err[512];
	struct ferry_config def, c;
	source_path("deploy/ferryd.yaml", path, sizeof(path));
	ferry_config_defaults(&def);
	c = def;
	int r = ferry_config_load(path, &c, err, sizeof(err));
	if (r)
		fail_msg("%s", err);
	/* Every key in the example is set to its default: the file is true documentation. */
	assert_true(config_equal(&c, &def));

	/* Every key appears in the example and in docs/config.md. */
	char *example = read_text(path);
	source_path("docs/config.md", path, sizeof(path));
	char *doc = read_text(path);
	for (size_t i = 0; i < NR_KEYS; i++) {
		const char *leaf = strrchr(all_keys[i], '.');
		char needle[80];
		leaf = leaf ? leaf + 1 : all_keys[i];
		snprintf(needle, sizeof(needle), "%s:", leaf);
		if (!strstr(example, needle))
			fail_msg("deploy/ferryd.yaml lacks %s", all_keys[i]);
		snprintf(needle, sizeof(needle), "`%s`", all_keys[i]);
		if (!strstr(doc, needle))
			fail_msg("docs/config.md lacks %s", needle);
	}
	free(example);
	free(doc);
}

/* ---- mutations --------------------------------------------------------------------------- */

static uint64_t rnd(uint64_t *s)
{
	/* xorshift64*: a fixed seed makes any crash reproducible. */
	*s ^= *s >> 12;
	*s ^= *s << 25;
	*s ^= *s >> 27;
	return *s * 2685821657736338717ull;
}

static void mutations_never_crash(void **state)
{
	(void)state;
	static const char *const tokens[] = {
		":", " ", "\n", "\n  ", "-", "[", "]", "{", "}", ",", "&a ", "*a", "!!str ", "? ",
		"\"", "'", "#", "|", ">", "---\n", "...\n", "\t", "~", "%YAML 1.1\n", "\\", "\xc3",
		"\xff", "0", "99999999999999999999", "-1", "1.5", "G", "bit", "/s", "::", "%",
		"\"\\0\"", "<<: ", "null",
	};
	const size_t ntokens = sizeof(tokens) / sizeof(tokens[0]);
	const size_t base_len = strlen(full_yaml);
	const size_t cap = base_len * 4;
	char *buf = malloc(cap + 64);
	char err[512];
	struct ferry_config c, snap;
	uint64_t seed = 0x5eed5eed12345678ull;
	unsigned iters = 20000, accepted = 0;
	const char *env = getenv("FERRY_CONFIG_FUZZ_ITERS");
	if (env)
		iters = (unsigned)strtoul(env, NULL, 10);
	assert_non_null(buf);
	ferry_config_defaults(&snap);

	for (unsigned it = 0; it < iters; it++) {
		size_t len = base_len;
		memcpy(buf, full_yaml, len);
		unsigned nmut = 1 + (unsigned)(rnd(&seed) % 4);
		for (unsigned m = 0; m < nmut; m++) {
			size_t pos = len ? (size_t)(rnd(&seed) % len) : 0;
			switch (rnd(&seed) % 5) {
			case 0: /* random byte */
				if (len)
					buf[pos] = (char)rnd(&seed);
				break;
			case 1: { /* insert a YAML-significant token */
				const char *t = tokens[rnd(&seed) % ntokens];
				size_t tl = strlen(t);
				if (len + tl > cap)
					break;
				memmove(buf + pos + tl, buf + pos, len - pos);
				memcpy(buf + pos, t, tl);
				len += tl;
				break;
			}
			case 2: { /* delete a run */
				size_t n = (size_t)(rnd(&seed) % 8) + 1;
				if (pos + n > len)
					n = len - pos;
				memmove(buf + pos, buf + pos + n, len - pos - n);
				len -= n;
				break;
			}
			case 3: { /* duplicate a run (duplicate keys, repeated sections) */
				size_t n = (size_t)(rnd(&seed) % 40) + 1;
				if (pos + n > len)
					n = len - pos;
				if (len + n > cap)
					break;
				memmove(buf + pos + n, buf + pos, len - pos);
				len += n;
				break;
			}
			case 4: /* cut the end off */
				len = pos;
				break;
			}
		}

		c = snap;
		/* Not NUL-terminated on purpose: the loader must honour len. */
		char *exact = malloc(len ? len : 1);
		assert_non_null(exact);
		memcpy(exact, buf, len);
		memset(err, 0, sizeof(err));
		int r = ferry_config_load_string(exact, len, "fuzz.yaml", &c, err, sizeof(err));
		free(exact);
		if (r == 0) {
			accepted++;
			/* Whatever was accepted can be validated and dumped without trouble. */
			(void)ferry_config_validate(&c, err, sizeof(err));
			char *text = NULL;
			size_t tl = 0;
			FILE *f = open_memstream(&text, &tl);
			assert_non_null(f);
			assert_int_equal(ferry_config_dump(&c, f), 0);
			fclose(f);
			struct ferry_config d = snap;
			if (ferry_config_load_string(text, tl, "dump", &d, err, sizeof(err)) ||
			    !config_equal(&c, &d))
				fail_msg("iteration %u: dump does not reload: %s\n%s", it, err,
					 text);
			free(text);
		} else {
			if (r != -EINVAL || strncmp(err, "fuzz.yaml:", 10))
				fail_msg("iteration %u: r=%d err=\"%s\"", it, r, err);
			if (memcmp(&c, &snap, sizeof(c)))
				fail_msg("iteration %u: failed load modified the struct", it);
		}
	}
	print_message("mutations: %u loads, %u accepted, %u rejected\n", iters, accepted,
		      iters - accepted);
	free(buf);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(defaults),
		cmocka_unit_test(every_key_read_back),
		cmocka_unit_test(empty_inputs_are_defaults),
		cmocka_unit_test(load_overlays),
		cmocka_unit_test(bad_inputs),
		cmocka_unit_test(policy_postcopy_start),
		cmocka_unit_test(long_paths),
		cmocka_unit_test(huge_input),
		cmocka_unit_test(load_file),
		cmocka_unit_test(check_config),
		cmocka_unit_test(parse_rate),
		cmocka_unit_test(parse_size),
		cmocka_unit_test(parse_hostport),
		cmocka_unit_test(set_every_key),
		cmocka_unit_test(set_errors),
		cmocka_unit_test(validate_cross_field),
		cmocka_unit_test(dump_round_trip),
		cmocka_unit_test(example_file_is_the_defaults),
		cmocka_unit_test(mutations_never_crash),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
