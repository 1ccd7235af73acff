/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The agent: everything one ferryd owns — its configuration, its VMs (each a struct vm from
 * agent/vm with a name, a guest description and a lifecycle), its migrations (outgoing and
 * incoming), the event feed and the agent-to-agent listener. The control API (api.c) and
 * ferryd's main only call the functions below; no global state exists, so tests can run
 * several agents in one process.
 *
 * Errors: functions return 0 or -errno and fill struct agent_error with a stable code
 * string and a human message; api.c maps them to HTTP statuses
 * (agent_error_http_status()).
 *
 * Threads: every function here may be called from any thread (the HTTP server runs a thread
 * per connection). agent->lock guards the VM and migration lists; each VM and migration has
 * its own lock for its state (see agent.c).
 */
#ifndef FERRY_AGENT_H
#define FERRY_AGENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "agent/config.h"
#include "agent/vm/vm.h"

#define AGENT_GUEST_MAX 320u /* "dirtier", "memcheck", "boot:/path/file", ... */
#define AGENT_PARAM_TEXT_MAX 64u
#define AGENT_HOSTPORT_MAX 300u

struct agent_error {
	char code[32];  /* "not_found", "already_exists", "invalid_argument", "conflict",
			 * "busy", "resource_exhausted", "unavailable", "internal" */
	char message[256];
};
/* Fills err (if non-NULL) and returns e. */
int agent_err(struct agent_error *err, int e, const char *code, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
/* 400, 404, 409, 422, 429, 503 or 500 for an error code string. */
int agent_error_http_status(const char *code);

struct agent;

/* Creates the agent from a validated config: binds the migration listener (and logs the
 * real port when the config asked for port 0). */
int agent_new(const struct ferry_config *cfg, struct agent **ret, struct agent_error *err);
/*
 * Clean shutdown (SIGTERM): refuses new work, cancels outgoing migrations before their
 * commit (their VMs keep running here), waits for migrations past commit to finish,
 * discards incoming ones, then stops every VM. Idempotent.
 */
void agent_shutdown(struct agent *a);
void agent_free(struct agent *a);
const struct ferry_config *agent_config(const struct agent *a);
const char *agent_name(const struct agent *a);
/* The bound migration listener address "host:port". */
const char *agent_listen_address(const struct agent *a);

/* ---------------- VMs ---------------- */

struct agent_vm_spec {
	char name[VM_NAME_MAX];            /* [A-Za-z0-9_.-]{1,63} */
	uint64_t mem_size;
	uint32_t vcpus;
	char guest[AGENT_GUEST_MAX];       /* built-in name, "boot:FILE" or "flat:FILE" */
	char params[FERRY_PARAM_MAX][AGENT_PARAM_TEXT_MAX]; /* "k=v" */
	unsigned nr_params;
	enum tracker_backend tracker;      /* TRACKER_AUTO by default */
	uint64_t slot_size;                /* 0 = one memslot */
	bool hugepages;
	bool start_paused;
};

enum agent_vm_state {
	AGENT_VM_RUNNING,
	AGENT_VM_PAUSED,
	AGENT_VM_FAILED,
	AGENT_VM_MIGRATING,  /* outgoing migration in progress (still runs here) */
	AGENT_VM_INCOMING,   /* being received; not runnable here yet */
};
const char *agent_vm_state_name(enum agent_vm_state s);

struct agent_vm_info {
	char name[VM_NAME_MAX];
	char guest[AGENT_GUEST_MAX];
	uint64_t mem_size;
	uint32_t vcpus;
	enum agent_vm_state state;
	char failure[VM_ERR_MAX];
	char tracker[16];
	int64_t created_unix;       /* seconds */
	uint64_t migration_id;      /* current migration, 0 if none */
	struct vm_vcpu_stats stats; /* totals over vCPUs */
	unsigned nr_guest_errors;
	struct vm_guest_error guest_errors[VM_ERRORS_KEPT];
	char params[FERRY_PARAM_MAX][AGENT_PARAM_TEXT_MAX];
	unsigned nr_params;
};

int agent_vm_create(struct agent *a, const struct agent_vm_spec *spec, struct agent_error *err);
/* Refused (conflict) while a migration holds the VM. */
int agent_vm_delete(struct agent *a, const char *name, struct agent_error *err);
int agent_vm_pause(struct agent *a, const char *name, struct agent_error *err);
int agent_vm_resume(struct agent *a, const char *name, struct agent_error *err);
int agent_vm_info(struct agent *a, const char *name, struct agent_vm_info *ret,
		  struct agent_error *err);
/* malloc'd array of every VM, sorted by name; caller frees. */
int agent_vm_list(struct agent *a, struct agent_vm_info **ret, unsigned *ret_n,
		  struct agent_error *err);
/* Console bytes from *pos on (see vm_console_read); returns bytes copied or -errno. */
ssize_t agent_vm_console(struct agent *a, const char *name, uint64_t *pos, char *buf,
			 size_t len, struct agent_error *err);
/* Writes all guest memory to path (like QEMU's pmemsave), VM paused for a consistent
 * image and resumed after if it was running. */
int agent_vm_dump(struct agent *a, const char *name, const char *path,
		  struct agent_error *err);

/* ---------------- migrations ---------------- */

enum migration_transport { MIG_TRANSPORT_AUTO, MIG_TRANSPORT_TCP, MIG_TRANSPORT_RDMA };

struct migration_request {
	char vm[VM_NAME_MAX];
	char dest[AGENT_HOSTPORT_MAX]; /* destination agent's migration listener */
	uint32_t downtime_ms;          /* 0 = config default */
	uint64_t bandwidth;            /* bytes/s; 0 = config default (0 there = unlimited) */
	uint32_t streams;              /* 0 = config default */
	int verify;                    /* -1 = config default, 0/1 */
	enum migration_transport transport;
	int compress; /* -1 = migration.compress; else enum ferry_config_compress */
	/* Policy overrides (docs/scheduler.md); -1 = the agent's policy.* setting. */
	int allow_postcopy;                 /* 0/1 */
	/* postcopy once this many precopy rounds are done (0..1000); -1 = only as a last
	 * resort; -2 = the agent's policy.postcopy_start / postcopy_precopy_rounds */
	int postcopy_after_rounds;
	int timeout_action;                 /* enum ferry_config_timeout_action */
	int64_t completion_timeout_per_gib; /* s; 0 = none */
	int64_t progress_timeout;           /* s; 0 = none */
	int priority; /* -100..100: admission order and bandwidth share weight; 0 default */
};

/* A request with every override at "agent default". */
void migration_request_init(struct migration_request *req);

/* Named states of both sides (DESIGN.md: every state is a named enum value). */
enum migration_state {
	MIG_QUEUED,        /* admitted later (host limits) */
	MIG_SETUP,         /* source: connecting, offering the VM; dest: creating it */
	MIG_PRECOPY,       /* rounds of dirty pages */
	MIG_SWITCHOVER,    /* source paused: last pages, state */
	MIG_COMMITTING,    /* source waits for the destination's decision */
	MIG_UNCERTAIN,     /* source lost the destination while committing: VM stays paused,
			    * asking the destination (with backoff) what it decided */
	MIG_COMPLETED,     /* the destination runs the VM */
	MIG_CANCELLED,     /* stopped by request; the VM runs on the source */
	MIG_FAILED,        /* error; the VM runs on the source (see error) */
	MIG_RECEIVING,     /* dest: precopy pages arriving */
	MIG_DEST_READY,    /* dest: state in, verified, waiting to decide */
	MIG_POSTCOPY,      /* both: the VM runs on the destination, which fetches the pages it
			    * lacks from the paused source (docs/scheduler.md: the risk) */
};
const char *migration_state_name(enum migration_state s);

struct migration_info {
	uint64_t id;
	char vm[VM_NAME_MAX];
	char peer[AGENT_HOSTPORT_MAX];
	bool incoming;
	enum migration_state state;
	char transport[16];
	char transport_reason[128];
	char compression[8];          /* "zstd" or "none" */
	char compression_reason[128];
	uint32_t round;
	uint64_t bytes_sent;          /* page-data bytes on the wire (frames; compressed) */
	uint64_t bytes_uncompressed;  /* source: what bytes_sent would be raw; 0 = unknown */
	uint64_t pages_normal;
	uint64_t pages_zero;
	bool postcopy;            /* the VM ran on the destination before all pages were there */
	uint64_t pages_rdma_read; /* destination, postcopy over RDMA: pages it pulled by READ */
	uint64_t remaining_bytes;
	double dirty_rate_pps;
	double bandwidth_bps;
	double expected_downtime_ms;
	uint32_t downtime_target_ms;
	bool verify;
	bool verified;            /* digests compared and equal */
	int64_t started_unix_ms;
	int64_t finished_unix_ms; /* 0 while running */
	uint64_t total_time_ms;
	uint64_t setup_time_ms;
	uint64_t downtime_ms;
	uint64_t downtime_us; /* the same, in microseconds */
	char error[256];
	/* The scheduler's last decision (see agent_migration_history for all of them). */
	char decision[16];         /* "continue", "throttle", "switchover", ... or "" */
	char decision_reason[192]; /* its sentence, with the figures */
	uint32_t throttle_level;   /* 0 = off */
	unsigned nr_vcpus;         /* entries in vcpu_throttle_pct */
	uint8_t vcpu_throttle_pct[64]; /* per vCPU: share of time held back (first 64) */
	int queue_position;        /* MIG_QUEUED: 1 = next; 0 otherwise */
	double bandwidth_cap_bps;  /* current cap (request, or link share); 0 = none */
	int priority;
};

/* Starts an outgoing migration and returns at once with its id (202). */
int agent_migration_create(struct agent *a, const struct migration_request *req,
			   uint64_t *ret_id, struct agent_error *err);
int agent_migration_info(struct agent *a, uint64_t id, struct migration_info *ret,
			 struct agent_error *err);
int agent_migration_list(struct agent *a, struct migration_info **ret, unsigned *ret_n,
			 struct agent_error *err);
/* Cancels before commit (the VM keeps running here); conflict once committed. */
int agent_migration_cancel(struct agent *a, uint64_t id, struct agent_error *err);
/* Switch over at the next round boundary regardless of the convergence rule. */
int agent_migration_switchover(struct agent *a, uint64_t id, struct agent_error *err);
/*
 * The scheduler's decisions for migration id, one JSON object per round (and per timeout
 * tick that acted), oldest first, as a JSON array in a malloc'd string (caller frees).
 */
int agent_migration_history(struct agent *a, uint64_t id, char **ret_json,
			    struct agent_error *err);

/* One VM of an evacuation: the migration started for it, or why none was. */
struct evacuation_item {
	char vm[VM_NAME_MAX];
	char dest[AGENT_HOSTPORT_MAX];
	uint64_t migration_id; /* 0 when not started */
	char error[256];
};
/*
 * Moves every VM of this agent that is not already migrating (or, with nr_only > 0, those
 * of only[] among them; a name not here is an error) to the destinations in
 * dests[0..nr_dests), spread round-robin (largest VM first); the migrations queue under
 * limits.max_outgoing like any other. tmpl gives their settings (its vm and dest are
 * ignored). Returns a malloc'd array of one item per VM (caller frees).
 */
int agent_evacuate(struct agent *a, const char (*dests)[AGENT_HOSTPORT_MAX], unsigned nr_dests,
		   const char (*only)[VM_NAME_MAX], unsigned nr_only,
		   const struct migration_request *tmpl, struct evacuation_item **ret,
		   unsigned *ret_n, struct agent_error *err);

/* ---------------- events ---------------- */

/*
 * The event feed: every state change of a VM or migration becomes one JSON object
 * {"seq":N,"time_ms":T,"type":"vm.created"|"vm.deleted"|"vm.paused"|"vm.resumed"|
 *  "vm.failed"|"migration.state"|"agent.shutdown",...}, kept in a ring of the last 1024.
 * agent_events_next() returns the first event with seq > *seq (malloc'd string, caller
 * frees) and advances *seq, waiting up to timeout_ms; NULL on timeout or shutdown. A reader
 * that fell behind the ring gets an {"type":"events.lost","count":N} first.
 */
char *agent_events_next(struct agent *a, uint64_t *seq, int timeout_ms);
/* Current last seq (start a feed from "now"). */
uint64_t agent_events_last_seq(struct agent *a);

#endif
