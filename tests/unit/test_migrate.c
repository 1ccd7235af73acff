// SPDX-License-Identifier: Apache-2.0
/*
 * Description: the migration engine end to end inside one process: two agents (each with
 * its own listener on 127.0.0.1, real TCP streams, real KVM) move a running memcheck guest
 * from one to the other and back, with digest verification; the guest keeps going with no
 * error and exactly one agent holds it. Also: a destination at its incoming limit refuses
 * with a clear error and the VM is untouched; a cancel during precopy leaves the VM running
 * on the source and nothing on the destination; a destination that is not there fails
 * the migration cleanly.
 */
#include "testutil.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "agent/agent.h"
#include "transport/transport.h"

struct pair {
	char dir[64];
	struct agent *a, *b;
};

static struct agent *start_agent(const char *dir, const char *name, unsigned max_incoming)
{
	struct ferry_config cfg;
	struct agent_error err = {0};
	struct agent *a = NULL;
	char e[256];
	ferry_config_defaults(&cfg);
	assert_int_equal(ferry_config_set(&cfg, "name", name, e, sizeof(e)), 0);
	assert_int_equal(ferry_config_set(&cfg, "migration.listen", "127.0.0.1:0", e, sizeof(e)),
			 0);
	snprintf(cfg.state_dir, sizeof(cfg.state_dir), "%s/%s", dir, name);
	cfg.control.socket[0] = '\0';
	cfg.limits.max_incoming = max_incoming;
	cfg.migration.streams = 2;
	cfg.log_level = FERRY_CONFIG_LOG_WARN;
	if (agent_new(&cfg, &a, &err) < 0)
		fail_msg("agent_new: %s", err.message);
	return a;
}

static int setup(void **state)
{
	tu_require_kvm();
	struct pair *p = calloc(1, sizeof(*p));
	snprintf(p->dir, sizeof(p->dir), "/tmp/ferry-test-migrate-XXXXXX");
	assert_non_null(mkdtemp(p->dir));
	p->a = start_agent(p->dir, "host-a", 2);
	p->b = start_agent(p->dir, "host-b", 2);
	*state = p;
	return 0;
}

static int teardown(void **state)
{
	struct pair *p = *state;
	agent_free(p->a);
	agent_free(p->b);
	char cmd[128];
	snprintf(cmd, sizeof(cmd), "rm -rf %s", p->dir);
	if (system(cmd) != 0)
		fprintf(stderr, "could not remove %s\n", p->dir);
	free(p);
	return 0;
}

static void create_memcheck(struct agent *a, const char *name)
{
	struct agent_vm_spec s = {0};
	struct agent_error err = {0};
	snprintf(s.name, sizeof(s.name), "%s", name);
	snprintf(s.guest, sizeof(s.guest), "memcheck");
	s.mem_size = 256ull << 20;
	s.vcpus = 4;
	snprintf(s.params[0], sizeof(s.params[0]), "wss=2M");
	s.nr_params = 1;
	/* memcheck rewrites whole pages; see docs/architecture.md on the ring here. */
	s.tracker = TRACKER_BITMAP;
	if (agent_vm_create(a, &s, &err) < 0)
		fail_msg("vm create: %s", err.message);
}

static uint64_t passes(struct agent *a, const char *name)
{
	struct agent_vm_info info;
	if (agent_vm_info(a, name, &info, NULL) < 0)
		return 0;
	return info.stats.passes;
}

static void wait_passes(struct agent *a, const char *name, uint64_t n)
{
	for (int i = 0; i < 1200 && passes(a, name) < n; i++)
		usleep(50000);
	if (passes(a, name) < n)
		fail_msg("VM %s made only %llu passes", name, (unsigned long long)passes(a, name));
}

static struct migration_info wait_final(struct agent *a, uint64_t id)
{
	struct migration_info mi;
	for (int i = 0; i < 1800; i++) {
		assert_int_equal(agent_migration_info(a, id, &mi, NULL), 0);
		if (mi.state == MIG_COMPLETED || mi.state == MIG_FAILED || mi.state == MIG_CANCELLED)
			return mi;
		usleep(50000);
	}
	fail_msg("migration %llu did not finish (state %s)", (unsigned long long)id,
		 migration_state_name(mi.state));
	return mi;
}

static uint64_t migrate(struct agent *from, struct agent *to, const char *vm, bool verify)
{
	struct migration_request r;
	migration_request_init(&r);
	struct agent_error err = {0};
	uint64_t id = 0;
	snprintf(r.vm, sizeof(r.vm), "%s", vm);
	snprintf(r.dest, sizeof(r.dest), "%s", agent_listen_address(to));
	r.verify = verify;
	if (agent_migration_create(from, &r, &id, &err) < 0)
		fail_msg("migration create: %s", err.message);
	return id;
}

static void check_only_on(struct agent *holder, struct agent *other, const char *vm)
{
	struct agent_vm_info info;
	assert_int_equal(agent_vm_info(holder, vm, &info, NULL), 0);
	assert_int_equal(info.state, AGENT_VM_RUNNING);
	assert_int_equal(agent_vm_info(other, vm, &info, NULL), -ENOENT);
}

static void back_and_forth(void **state)
{
	struct pair *p = *state;
	create_memcheck(p->a, "mc");
	wait_passes(p->a, "mc", 2);
	struct agent *from = p->a, *to = p->b;
	for (int i = 0; i < 4; i++) {
		uint64_t id = migrate(from, to, "mc", true);
		struct migration_info mi = wait_final(from, id);
		if (mi.state != MIG_COMPLETED)
			fail_msg("migration %d: %s: %s", i, migration_state_name(mi.state), mi.error);
		print_message("migration %d: %llu rounds, %llu bytes, %llu normal + %llu zero pages, "
			      "total %llu ms, setup %llu ms, downtime %llu ms\n",
			      i, (unsigned long long)mi.round, (unsigned long long)mi.bytes_sent,
			      (unsigned long long)mi.pages_normal, (unsigned long long)mi.pages_zero,
			      (unsigned long long)mi.total_time_ms,
			      (unsigned long long)mi.setup_time_ms,
			      (unsigned long long)mi.downtime_ms);
		assert_true(mi.downtime_ms <= mi.total_time_ms);
		assert_true(mi.downtime_us > 0);
		assert_int_equal(mi.downtime_us / 1000, mi.downtime_ms);
		check_only_on(to, from, "mc");
		/* The guest goes on where it was and finds every page right. */
		uint64_t before = passes(to, "mc");
		wait_passes(to, "mc", before + 2);
		struct agent_vm_info info;
		assert_int_equal(agent_vm_info(to, "mc", &info, NULL), 0);
		if (info.stats.errors)
			fail_msg("memcheck reported %llu errors after migration %d",
				 (unsigned long long)info.stats.errors, i);
		struct agent *t = from;
		from = to;
		to = t;
	}
	struct agent_error err = {0};
	assert_int_equal(agent_vm_delete(from, "mc", &err), 0);
}

static void refused_when_busy(void **state)
{
	struct pair *p = *state;
	struct agent_error err = {0};
	struct agent *c = start_agent(p->dir, "host-c", 0); /* takes no incoming migration */
	create_memcheck(p->a, "busy");
	wait_passes(p->a, "busy", 1);
	uint64_t id = migrate(p->a, c, "busy", false);
	struct migration_info mi = wait_final(p->a, id);
	assert_int_equal(mi.state, MIG_FAILED);
	print_message("refusal: %s\n", mi.error);
	assert_non_null(strstr(mi.error, "limit"));
	check_only_on(p->a, c, "busy");
	uint64_t before = passes(p->a, "busy");
	wait_passes(p->a, "busy", before + 1);
	agent_free(c);
	assert_int_equal(agent_vm_delete(p->a, "busy", &err), 0);
}

static void cancel_in_precopy(void **state)
{
	struct pair *p = *state;
	struct agent_error err = {0};
	struct agent_vm_spec s = {0};
	snprintf(s.name, sizeof(s.name), "dirty");
	snprintf(s.guest, sizeof(s.guest), "dirtier");
	s.mem_size = 256ull << 20;
	s.vcpus = 2;
	s.tracker = TRACKER_BITMAP;
	/* Dirtier than a capped link can carry: precopy goes on until cancelled. */
	assert_int_equal(agent_vm_create(p->a, &s, &err), 0);
	struct migration_request r;
	migration_request_init(&r);
	uint64_t id = 0;
	snprintf(r.vm, sizeof(r.vm), "dirty");
	snprintf(r.dest, sizeof(r.dest), "%s", agent_listen_address(p->b));
	r.bandwidth = 20ull << 20;
	r.downtime_ms = 1;
	/* Raw pages: a cap turns compression on (auto), and the dirtier's pages compress so
	 * well that the cap would not hold precopy back. */
	r.compress = FERRY_CONFIG_COMPRESS_OFF;
	assert_int_equal(agent_migration_create(p->a, &r, &id, &err), 0);
	struct migration_info mi;
	for (int i = 0; i < 600; i++) {
		agent_migration_info(p->a, id, &mi, NULL);
		if (mi.state == MIG_PRECOPY && mi.round >= 2)
			break;
		usleep(50000);
	}
	assert_int_equal(mi.state, MIG_PRECOPY);
	assert_int_equal(agent_migration_cancel(p->a, id, &err), 0);
	mi = wait_final(p->a, id);
	assert_int_equal(mi.state, MIG_CANCELLED);
	/* The destination lets go of the VM once it sees the abort. */
	struct agent_vm_info info;
	for (int i = 0; i < 100 && agent_vm_info(p->b, "dirty", &info, NULL) == 0; i++)
		usleep(50000);
	check_only_on(p->a, p->b, "dirty");
	assert_int_equal(agent_migration_cancel(p->a, id, &err), -EALREADY);
	assert_int_equal(agent_vm_delete(p->a, "dirty", &err), 0);
}

static void nobody_there(void **state)
{
	struct pair *p = *state;
	struct agent_error err = {0};
	create_memcheck(p->a, "lonely");
	struct migration_request r;
	migration_request_init(&r);
	uint64_t id = 0;
	snprintf(r.vm, sizeof(r.vm), "lonely");
	snprintf(r.dest, sizeof(r.dest), "127.0.0.1:1");
	assert_int_equal(agent_migration_create(p->a, &r, &id, &err), 0);
	struct migration_info mi = wait_final(p->a, id);
	assert_int_equal(mi.state, MIG_FAILED);
	print_message("unreachable: %s\n", mi.error);
	assert_non_null(strstr(mi.error, "cannot reach"));
	struct agent_vm_info info;
	assert_int_equal(agent_vm_info(p->a, "lonely", &info, NULL), 0);
	assert_int_equal(info.state, AGENT_VM_RUNNING);
	/* Bad requests change nothing. */
	snprintf(r.dest, sizeof(r.dest), "no-port");
	assert_int_equal(agent_migration_create(p->a, &r, &id, &err), -EINVAL);
	snprintf(r.vm, sizeof(r.vm), "ghost");
	snprintf(r.dest, sizeof(r.dest), "127.0.0.1:1");
	assert_int_equal(agent_migration_create(p->a, &r, &id, &err), -ENOENT);
	assert_int_equal(agent_vm_delete(p->a, "lonely", &err), 0);
}

/* A peer offering a VM this host cannot build (1000 vCPUs) is refused with a reason. */
static void refused_shape(void **state)
{
	struct pair *p = *state;
	struct xctl *c = NULL;
	char err[256];
	void *buf = NULL;
	size_t len = 0;
	uint16_t type = 0;
	assert_int_equal(xctl_connect(agent_listen_address(p->b), 5000, &c, err, sizeof(err)), 0);
	struct proto_hello h = {.min_version = 1, .max_version = 1, .migration_id = 77,
				.caps = PROTO_CAP_TCP, .page_size = 4096, .streams = 1};
	snprintf(h.agent, sizeof(h.agent), "raw-test");
	assert_int_equal(proto_encode_hello(&h, &buf, &len), 0);
	assert_int_equal(xctl_send(c, PROTO_HELLO, buf, len), 0);
	free(buf);
	assert_int_equal(xctl_recv(c, &type, &buf, &len, 5000, err, sizeof(err)), 0);
	assert_int_equal(type, PROTO_WELCOME);
	free(buf);
	struct proto_vm_offer o = {.mem_size = 64ull << 20, .vcpus = 1000, .irqchip = 1,
				   .nr_slots = 1};
	snprintf(o.name, sizeof(o.name), "huge");
	snprintf(o.guest, sizeof(o.guest), "memcheck");
	o.slots[0].size = o.mem_size;
	assert_int_equal(proto_encode_vm_offer(&o, &buf, &len), 0);
	assert_int_equal(xctl_send(c, PROTO_VM_OFFER, buf, len), 0);
	free(buf);
	assert_int_equal(xctl_recv(c, &type, &buf, &len, 5000, err, sizeof(err)), 0);
	assert_int_equal(type, PROTO_REFUSE);
	struct proto_refuse rf;
	assert_int_equal(proto_decode_refuse(buf, len, &rf, err, sizeof(err)), 0);
	free(buf);
	print_message("shape refusal: %s: %s\n", proto_code_name(rf.code), rf.message);
	assert_int_equal(rf.code, PROTO_E_SHAPE);
	assert_non_null(strstr(rf.message, "vCPUs"));
	xctl_free(c);
	struct agent_vm_info info;
	assert_int_equal(agent_vm_info(p->b, "huge", &info, NULL), -ENOENT);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(back_and_forth, setup, teardown),
		cmocka_unit_test_setup_teardown(refused_when_busy, setup, teardown),
		cmocka_unit_test_setup_teardown(cancel_in_precopy, setup, teardown),
		cmocka_unit_test_setup_teardown(nobody_there, setup, teardown),
		cmocka_unit_test_setup_teardown(refused_shape, setup, teardown),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
