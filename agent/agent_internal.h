/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The agent's private structures, shared by agent.c (lifecycle, VMs, events), migration.c
 * (jobs of both directions) and the listener. Nothing outside agent/ includes this file.
 */
#ifndef FERRY_AGENT_INTERNAL_H
#define FERRY_AGENT_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>

#include "agent/agent.h"

enum log_level { LOG_ERROR = 0, LOG_WARN, LOG_INFO, LOG_DEBUG };
void agent_log(struct agent *a, enum log_level lvl, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

struct agent_vm {
	struct agent_vm *next; /* agent->vms list, under agent->lock */
	unsigned refs;         /* under agent->lock; freed at 0 once unlinked */
	bool unlinked;         /* deleted from the list, under agent->lock */
	struct agent_vm_spec spec;
	int64_t created_unix;
	/*
	 * op_lock serialises control operations on the VM (vm.h wants one controlling thread
	 * at a time): pause/resume/dump/delete from the API, and the migration engine, which
	 * holds it only around its own vm_* calls.
	 */
	pthread_mutex_t op_lock;
	struct vm *vm;
	/* Under agent->lock: the migration holding this VM (0 = none) and its direction. */
	uint64_t migration_id;
	bool incoming;
};

struct migration;
struct decision_rec;

#define AGENT_EVENTS_RING 1024u

struct agent {
	struct ferry_config cfg;
	char listen_addr[AGENT_HOSTPORT_MAX];
	int listen_fd;
	int wake_fd[2]; /* pipe to stop the listener */
	pthread_t listener;
	bool listener_started;
	pthread_t warm; /* migration_warm_buffers; joined by agent_free */
	bool warm_started;

	/* lock guards vms, migrations, next_migration_id, shutting_down. */
	pthread_mutex_t lock;
	pthread_cond_t cond; /* migration finished / VM ref dropped */
	struct agent_vm *vms;
	struct migration *migrations;
	uint64_t next_migration_id;
	bool shutting_down;

	/* ev_lock guards the event ring; ev_cond wakes readers. */
	pthread_mutex_t ev_lock;
	pthread_cond_t ev_cond;
	char *events[AGENT_EVENTS_RING];
	uint64_t ev_seq; /* seq of the newest event; event s lives at events[s % RING] */
	bool ev_closed;

	/* Host admission of outgoing migrations (scheduler), under lock. */
	struct sched_admission *admission;

	/* Destination decisions of recent incoming migrations (migration.c), under lock. */
	struct decision_rec *decisions;
	unsigned decisions_next;

	/* log_lock keeps log lines whole. */
	pthread_mutex_t log_lock;
};

/* Events: publishes {"seq":..,"time_ms":..,"type":type, <fields_json>} (fields_json is a
 * comma-free-start JSON fragment like "\"vm\":\"a\"" or NULL). */
void agent_event(struct agent *a, const char *type, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

/* VM references: looked up by name under agent->lock; NULL + err when absent. */
struct agent_vm *agent_vm_get(struct agent *a, const char *name, struct agent_error *err);
void agent_vm_put(struct agent *a, struct agent_vm *v);
/* Adds a VM built elsewhere (incoming migration) under a name; -EEXIST if taken. */
int agent_vm_insert(struct agent *a, struct agent_vm *v, struct agent_error *err);
/* Unlinks and drops the list's reference (the VM is freed with the last reference). */
void agent_vm_remove(struct agent *a, struct agent_vm *v);
struct agent_vm *agent_vm_alloc(const struct agent_vm_spec *spec);
/* JSON-safe copy of s into out (escapes quotes, backslashes, control characters). */
void agent_json_escape(const char *s, char *out, size_t outlen);
/* "host:port" ("[v6]:port") a bound socket listens on. */
void agent_format_bound(int fd, char *out, size_t len);
int64_t agent_unix_ms(void);
uint64_t agent_mono_ns(void);

/* migration.c */
int migration_state_init(struct agent *a, struct agent_error *err);
/* migration.warm_buffers: readies the page readers' buffers in a thread of its own. */
void migration_warm_buffers(struct agent *a);
int migration_listener_dispatch(struct agent *a, int fd);
void migration_shutdown_all(struct agent *a);
void migration_free_all(struct agent *a);

#endif
