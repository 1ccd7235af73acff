/* SPDX-License-Identifier: Apache-2.0 */
/*
 * ferryd's configuration: the typed struct every part of the agent reads, its defaults, and
 * the loader of ferryd.yaml (libyaml). The loader is strict on purpose: an operator who
 * misspells a key or writes an impossible value gets an error naming the file, line and
 * column ("ferryd.yaml:12:3: unknown key 'bandwith' in 'migration' ...") at start-up or from
 * `ferryd --check-config`, instead of an agent that silently runs with a default. The schema
 * is documented key by key in docs/config.md; deploy/ferryd.yaml is a commented example.
 *
 * Layering, as main() does it:
 *   ferry_config_defaults(&c);             built-in defaults
 *   ferry_config_load(path, &c, ...);      the file, over what c holds
 *   ferry_config_set(&c, "key", "v", ...); each command-line override, same checks as the file
 *   ferry_config_validate(&c, ...);        cross-field rules, once everything is in
 * Every step leaves c untouched when it fails. Values are checked one by one as they are
 * read; rules that tie several keys together (TLS all-or-none, ...) wait for validate so a
 * flag can still complete what the file started. Pure apart from reading the file
 * (ferry_config_load), gethostname (defaults) and access(2) (ferry_config_check_files).
 */
#ifndef FERRY_CONFIG_H
#define FERRY_CONFIG_H

#include <limits.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/un.h>

/* Largest file the loader reads; a config is a page or two, anything bigger is a mistake. */
#define FERRY_CONFIG_MAX_FILE (1u << 20)

/* Agent name: [A-Za-z0-9][A-Za-z0-9._-]*, like a host name (HOST_NAME_MAX is 64). */
#define FERRY_CONFIG_NAME_MAX 64
/* Host part of HOST:PORT, without brackets: a DNS name (253) or an IPv6 literal with zone. */
#define FERRY_CONFIG_HOST_MAX 253
/* A unix socket path must fit sockaddr_un.sun_path with its NUL: 107 bytes on Linux. */
#define FERRY_CONFIG_SOCKET_MAX (sizeof(((struct sockaddr_un *)0)->sun_path))

enum ferry_config_log_level {
	FERRY_CONFIG_LOG_ERROR = 0,
	FERRY_CONFIG_LOG_WARN,
	FERRY_CONFIG_LOG_INFO,
	FERRY_CONFIG_LOG_DEBUG,
};

enum ferry_config_transport {
	FERRY_CONFIG_TRANSPORT_AUTO = 0, /* RDMA when both agents have it, else TCP */
	FERRY_CONFIG_TRANSPORT_TCP,
	FERRY_CONFIG_TRANSPORT_RDMA,
};

/* Compressing page data (zstd) on the TCP data path. */
enum ferry_config_compress {
	FERRY_CONFIG_COMPRESS_OFF = 0,
	FERRY_CONFIG_COMPRESS_ON,
	FERRY_CONFIG_COMPRESS_AUTO, /* only when the migration's bandwidth is capped */
};

/* HOST:PORT as parsed; host[0] == '\0' means "not set" (only allowed where documented). */
struct ferry_hostport {
	char host[FERRY_CONFIG_HOST_MAX + 1]; /* no brackets: "::1", "0.0.0.0", "host-b" */
	uint16_t port;                        /* 0: the kernel picks one (tests) */
};

struct ferry_config_control {
	char socket[FERRY_CONFIG_SOCKET_MAX]; /* unix socket of the API; "" = off */
	struct ferry_hostport tcp;            /* API over TLS; host "" = off */
};

struct ferry_config_migration {
	struct ferry_hostport listen; /* agent-to-agent listener, always set */
	uint32_t downtime_ms;         /* switch-over downtime target, 1..60000 */
	uint64_t bandwidth;           /* bytes/s cap per migration; 0 = unlimited */
	uint32_t streams;             /* parallel TCP streams, 1..64 */
	enum ferry_config_transport transport;
	bool verify;          /* SHA-256 digest check before the destination runs the VM */
	uint32_t queue_depth; /* io_uring entries, 1..4096 */
	uint32_t batch_pages; /* pages per read/write batch, 1..65536 */
	bool warm_buffers;    /* fault in `streams` page readers' buffers at start-up */
	enum ferry_config_compress compress; /* default auto */
	uint32_t compress_level;             /* zstd level, 1..19; default 1 */
};

/* What the scheduler does when a timeout fires (docs/scheduler.md). */
enum ferry_config_timeout_action {
	FERRY_CONFIG_TIMEOUT_ABORT = 0, /* cancel; the VM keeps running on the source */
	FERRY_CONFIG_TIMEOUT_SWITCHOVER,
	FERRY_CONFIG_TIMEOUT_POSTCOPY, /* needs allow_postcopy */
};

enum ferry_config_postcopy_start {
	FERRY_CONFIG_POSTCOPY_LAST_RESORT,
	FERRY_CONFIG_POSTCOPY_EARLY,
};

/* The migration policy (scheduler/): timeouts, downtime stepping, throttling, postcopy. */
struct ferry_config_policy {
	uint32_t completion_timeout_per_gib; /* s per GiB of guest memory; 0 = off */
	uint32_t progress_timeout;           /* s without a new low of remaining; 0 = off */
	enum ferry_config_timeout_action timeout_action;
	bool allow_postcopy;
	/* early: postcopy once postcopy_precopy_rounds precopy rounds are done (needs
	 * allow_postcopy); last_resort: only on a hopeless stall or a timeout */
	enum ferry_config_postcopy_start postcopy_start;
	uint32_t postcopy_precopy_rounds;    /* 0..1000; 0 = no precopy round at all */
	uint32_t downtime_steps;             /* 0 = the full target from the start */
	uint32_t downtime_step_delay_per_gib; /* s between steps per GiB */
	bool throttle;                       /* per-vCPU dirty limits when precopy stalls */
	uint64_t link_capacity; /* bytes/s shared by this agent's outgoing migrations; 0 = off */
};

struct ferry_config_limits {
	uint32_t max_outgoing; /* concurrent outgoing migrations, 0..64 (0 refuses all) */
	uint32_t max_incoming; /* concurrent incoming migrations, 0..64 (0 refuses all) */
	uint32_t max_vms;      /* VMs this agent holds, incoming ones included, 1..4096 */
	uint64_t max_memory;   /* bytes of guest RAM this agent holds; 0 = host RAM */
};

struct ferry_config_tls {
	char cert[PATH_MAX]; /* PEM; all three or none */
	char key[PATH_MAX];
	char ca[PATH_MAX];
};

struct ferry_config {
	char name[FERRY_CONFIG_NAME_MAX + 1];
	enum ferry_config_log_level log_level;
	char state_dir[PATH_MAX]; /* durable agent state (migration decisions) */
	struct ferry_config_control control;
	struct ferry_config_migration migration;
	struct ferry_config_policy policy;
	struct ferry_config_limits limits;
	struct ferry_config_tls tls;
};

/*
 * Fills c with the built-in defaults (docs/config.md). name is the host name (gethostname),
 * or "ferryd" when that is unavailable. Never fails.
 */
void ferry_config_defaults(struct ferry_config *c);

/*
 * Reads the YAML file at path and applies the keys it sets over what c already holds (call
 * ferry_config_defaults first). An empty file, or one with only comments, changes nothing.
 * Per-key checks run here; cross-field rules do not (see ferry_config_validate).
 * On error returns -errno (-ENOENT..., -EFBIG past FERRY_CONFIG_MAX_FILE, -EINVAL for bad
 * content, -ENOMEM), writes "path:line:col: message" into err (when errlen > 0) and leaves
 * c untouched.
 */
int ferry_config_load(const char *path, struct ferry_config *c, char *err, size_t errlen);

/* The same from memory; name_for_errors stands in for the path in messages. */
int ferry_config_load_string(const char *yaml, size_t len, const char *name_for_errors,
			     struct ferry_config *c, char *err, size_t errlen);

/*
 * Sets one key by its dotted name ("migration.streams", "log_level") from text, with the
 * checks the loader applies: the hook for command-line overrides. An empty value means ""
 * for string keys and is an error for the others. -EINVAL (unknown key, bad value) with
 * "key: message" in err; c untouched on error.
 */
int ferry_config_set(struct ferry_config *c, const char *key, const char *value, char *err,
		     size_t errlen);

/*
 * The whole-struct check, to run after the file and the overrides are applied: every value
 * in range (for fields set directly), plus the cross-field rules — tls.cert/key/ca all set or
 * all empty; control.tcp needs TLS; at least one of control.socket and control.tcp; the API
 * and the migration listener not on the same port. 0 or -EINVAL with "key: message" in err.
 */
int ferry_config_validate(const struct ferry_config *c, char *err, size_t errlen);

/*
 * Checks what ferryd will need from the file system at start-up: the TLS files exist and are
 * readable. Separate from validate so validate stays pure. 0 or -errno with a message.
 */
int ferry_config_check_files(const struct ferry_config *c, char *err, size_t errlen);

/*
 * `ferryd --check-config FILE`: defaults, load, validate, check_files. 0 when ferryd would
 * start with this file, else -errno with the first problem in err (prefixed with the path).
 */
int ferry_config_check(const char *path, char *err, size_t errlen);

/*
 * Writes c as YAML that ferry_config_load reads back to the same struct (every key, strings
 * quoted, sizes in bytes; strings must be UTF-8, as everything the loader accepts is). For
 * showing the effective configuration, and the tests. 0 or -EIO.
 */
int ferry_config_dump(const struct ferry_config *c, FILE *f);

/*
 * "HOST:PORT", "[IPV6]:PORT" (zone allowed: "[fe80::1%eth0]:7000"). HOST is an IPv4 literal,
 * a bracketed IPv6 literal or a DNS name; PORT is decimal 0..65535. host receives HOST
 * without brackets. -EINVAL for bad syntax (a bare IPv6 literal included: it is ambiguous),
 * -ENAMETOOLONG when HOST does not fit hostlen. Outputs untouched on error.
 */
int ferry_config_parse_hostport(const char *s, char *host, size_t hostlen, uint16_t *port);

/* Inverse of parse_hostport: brackets an IPv6 host. -ENOSPC when buf is too small. */
int ferry_config_format_hostport(const struct ferry_hostport *hp, char *buf, size_t len);

/*
 * A rate in bytes per second. Byte rates: a number with an optional K/M/G/T prefix (powers
 * of 1024; "Ki", "KiB", "KB" spellings too) and optional "/s": 1048576, 100M, 1.25GB/s.
 * Bit rates: K/M/G/T (powers of 1000) followed by "bit", "bit/s" or "bps", divided by 8:
 * 1Gbit, 100Mbit/s, 10Gbps. "1Gb" is refused as ambiguous. Fractions are cut to whole bytes;
 * a non-zero rate that comes to 0 bytes/s is -ERANGE (0 means unlimited). -EINVAL for bad
 * syntax (signs included), -ERANGE past 2^64-1.
 */
int ferry_config_parse_rate(const char *s, uint64_t *bytes_per_sec);

/* A size in bytes: number with optional K/M/G/T (1024-based; Ki/KiB/KB) or B. Rules as rate. */
int ferry_config_parse_size(const char *s, uint64_t *ret);

/* Enum names as they appear in the file ("info", "rdma"); "?" for out-of-range values. */
const char *ferry_config_log_level_name(enum ferry_config_log_level l);
const char *ferry_config_transport_name(enum ferry_config_transport t);
const char *ferry_config_compress_name(enum ferry_config_compress c);
const char *ferry_config_timeout_action_name(enum ferry_config_timeout_action a);
/* "abort" | "switchover" | "postcopy"; -EINVAL otherwise. */
int ferry_config_timeout_action_parse(const char *s, enum ferry_config_timeout_action *ret);

#endif /* FERRY_CONFIG_H */
