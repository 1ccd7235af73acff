// SPDX-License-Identifier: Apache-2.0
/*
 * ferry-vm: runs one VM in the foreground with ferry's VMM, for operators and developers who
 * want to see a guest, its console and the dirty tracker at work without an agent. It
 * starts the VM, streams the console, samples the tracker twice a second and prints the live
 * dirty rate, and on timeout or Ctrl-C pauses the VM and tears it down cleanly. main() only
 * parses and wires; the work is the VMM's and the tracker's.
 */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "agent/vm/vm.h"
#include "scheduler/scheduler.h"

struct options {
	const char *guest;
	struct vm_config cfg;
	struct ferry_param params[FERRY_PARAM_MAX];
	unsigned nr_params;
	double seconds;
	bool quiet_console;
};

static volatile sig_atomic_t interrupted;

static void on_signal(int sig)
{
	(void)sig;
	interrupted = 1;
}

static void usage(FILE *f)
{
	fprintf(f,
		"usage: ferry-vm [options]\n"
		"  --guest G         dirtier | memcheck | touch | boot:FILE | flat:FILE (default dirtier)\n"
		"  --memory SIZE     guest RAM, e.g. 512M, 2G (default 256M)\n"
		"  --vcpus N         vCPUs (default 2)\n"
		"  --param K=V       guest parameter, repeatable (e.g. rate=20000 pattern=random)\n"
		"  --tracker B       auto | ring | bitmap | legacy (default auto)\n"
		"  --ring-entries N  dirty ring entries per vCPU (power of two)\n"
		"  --slot-size SIZE  split RAM into memslots of at most SIZE\n"
		"  --hugepages       back RAM with 2 MiB hugepages\n"
		"  --no-irqchip      no in-kernel LAPIC\n"
		"  --seconds S       run for S seconds, then stop cleanly (default 5; 0 = until Ctrl-C)\n"
		"  --quiet-console   do not echo the guest console\n");
}

static char *read_file(const char *path, size_t *ret_len, size_t max)
{
	FILE *f = fopen(path, "rb");
	if (!f)
		return NULL;
	char *buf = malloc(max + 1);
	size_t n = buf ? fread(buf, 1, max + 1, f) : 0;
	fclose(f);
	if (!buf)
		return NULL;
	*ret_len = n;
	return buf;
}

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint64_t drain_dirty(struct tracker *t)
{
	struct tracker_cursor cur = {0};
	struct tracker_batch b;
	uint64_t n = 0;
	if (tracker_sync(t, NULL) < 0)
		return 0;
	while (tracker_take_next(t, &cur, &b) > 0)
		n += b.dirty;
	return n;
}

static void echo_console(struct vm *vm, uint64_t *pos)
{
	char buf[4096];
	size_t n;
	while ((n = vm_console_read(vm, pos, buf, sizeof(buf))) > 0)
		fwrite(buf, 1, n, stdout);
	fflush(stdout);
}

static int parse_args(int argc, char **argv, struct options *o)
{
	enum { O_GUEST = 1, O_MEM, O_VCPUS, O_PARAM, O_TRACKER, O_RING, O_SLOT, O_HUGE, O_NOIRQ,
	       O_SECONDS, O_QUIET, O_HELP };
	static const struct option lo[] = {
		{"guest", required_argument, 0, O_GUEST},
		{"memory", required_argument, 0, O_MEM},
		{"vcpus", required_argument, 0, O_VCPUS},
		{"param", required_argument, 0, O_PARAM},
		{"tracker", required_argument, 0, O_TRACKER},
		{"ring-entries", required_argument, 0, O_RING},
		{"slot-size", required_argument, 0, O_SLOT},
		{"hugepages", no_argument, 0, O_HUGE},
		{"no-irqchip", no_argument, 0, O_NOIRQ},
		{"seconds", required_argument, 0, O_SECONDS},
		{"quiet-console", no_argument, 0, O_QUIET},
		{"help", no_argument, 0, O_HELP},
		{0, 0, 0, 0},
	};
	const char *params[FERRY_PARAM_MAX + 1];
	unsigned np = 0;
	struct vm_error err = {{0}};
	uint64_t v;
	char *end;
	int c;

	vm_config_init(&o->cfg, "ferry-vm");
	o->cfg.mem_size = 256ull << 20;
	o->cfg.vcpus = 2;
	o->guest = "dirtier";
	o->seconds = 5;
	while ((c = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
		switch (c) {
		case O_GUEST:
			o->guest = optarg;
			break;
		case O_MEM:
			if (vm_size_parse(optarg, &o->cfg.mem_size) < 0) {
				fprintf(stderr, "ferry-vm: --memory %s: not a size\n", optarg);
				return -EINVAL;
			}
			break;
		case O_VCPUS:
			errno = 0;
			v = strtoull(optarg, &end, 10);
			if (errno || *end || v > 4096) {
				fprintf(stderr, "ferry-vm: --vcpus %s: not a vCPU count\n", optarg);
				return -EINVAL;
			}
			o->cfg.vcpus = (uint32_t)v;
			break;
		case O_PARAM:
			if (np == FERRY_PARAM_MAX) {
				fprintf(stderr, "ferry-vm: at most %u --param\n", FERRY_PARAM_MAX);
				return -E2BIG;
			}
			params[np++] = optarg;
			break;
		case O_TRACKER:
			if (tracker_backend_parse(optarg, &o->cfg.tracker.backend) < 0) {
				fprintf(stderr, "ferry-vm: --tracker %s: use auto, ring, bitmap or legacy\n",
					optarg);
				return -EINVAL;
			}
			break;
		case O_RING:
			errno = 0;
			v = strtoull(optarg, &end, 10);
			if (errno || *end || v > UINT32_MAX) {
				fprintf(stderr, "ferry-vm: --ring-entries %s: not a number\n", optarg);
				return -EINVAL;
			}
			o->cfg.tracker.ring_entries = (uint32_t)v;
			break;
		case O_SLOT:
			if (vm_size_parse(optarg, &o->cfg.slot_size) < 0) {
				fprintf(stderr, "ferry-vm: --slot-size %s: not a size\n", optarg);
				return -EINVAL;
			}
			break;
		case O_HUGE:
			o->cfg.hugepages = true;
			break;
		case O_NOIRQ:
			o->cfg.irqchip = false;
			break;
		case O_SECONDS:
			o->seconds = strtod(optarg, &end);
			if (*end || o->seconds < 0) {
				fprintf(stderr, "ferry-vm: --seconds %s: not a duration\n", optarg);
				return -EINVAL;
			}
			break;
		case O_QUIET:
			o->quiet_console = true;
			break;
		case O_HELP:
		case 'h':
			usage(stdout);
			exit(0);
		default:
			usage(stderr);
			return -EINVAL;
		}
	}
	if (optind != argc) {
		fprintf(stderr, "ferry-vm: unexpected argument %s\n", argv[optind]);
		return -EINVAL;
	}
	const char *pguest = strchr(o->guest, ':') ? NULL : o->guest;
	for (unsigned i = 0; i < np; i++) {
		if (vm_param_parse(pguest, params[i], &o->params[i], &err) < 0) {
			fprintf(stderr, "ferry-vm: --param %s: %s\n", params[i], err.msg);
			return -EINVAL;
		}
	}
	o->nr_params = np;
	return 0;
}

static int load_guest(struct vm *vm, const struct options *o)
{
	struct vm_error err = {{0}};
	int r;

	if (strncmp(o->guest, "boot:", 5) == 0 || strncmp(o->guest, "flat:", 5) == 0) {
		size_t len = 0;
		/* Read one byte past the largest valid image so oversize is detected. */
		char *img = read_file(o->guest + 5, &len, FERRY_IMAGE_MAX);
		if (!img) {
			fprintf(stderr, "ferry-vm: %s: %s\n", o->guest + 5, strerror(errno));
			return -errno;
		}
		if (o->guest[0] == 'b')
			r = vm_load_boot_sector(vm, img, len, &err);
		else
			r = vm_load_flat(vm, img, len, o->params, o->nr_params, &err);
		free(img);
	} else {
		const struct vm_builtin_guest *g = vm_builtin_guest_find(o->guest);
		if (!g) {
			fprintf(stderr, "ferry-vm: no built-in guest '%s'; built-in guests:",
				o->guest);
			for (unsigned i = 0; i < vm_builtin_guest_count(); i++)
				fprintf(stderr, " %s", vm_builtin_guest_at(i)->name);
			fprintf(stderr, "\n");
			return -ENOENT;
		}
		r = vm_load_flat(vm, g->image, g->size, o->params, o->nr_params, &err);
	}
	if (r < 0)
		fprintf(stderr, "ferry-vm: loading %s: %s\n", o->guest, err.msg);
	return r;
}

int main(int argc, char **argv)
{
	struct options o;
	struct vm_error err = {{0}};
	struct vm *vm = NULL;
	int r, status = 1;

	memset(&o, 0, sizeof(o));
	if (parse_args(argc, argv, &o) < 0)
		return 2;
	r = vm_new(&o.cfg, &vm, &err);
	if (r < 0) {
		fprintf(stderr, "ferry-vm: cannot create VM: %s\n", err.msg);
		return 1;
	}
	if (load_guest(vm, &o) < 0)
		goto out;

	struct tracker *t = vm_tracker(vm);
	printf("ferry-vm: %s guest, %u vCPUs, %llu MiB in %u memslot(s), tracker %s",
	       o.guest, o.cfg.vcpus, (unsigned long long)(o.cfg.mem_size >> 20),
	       vm_nr_slots(vm), tracker_backend_name(tracker_backend(t)));
	if (tracker_ring_entries(t))
		printf(" (%u entries per vCPU)", tracker_ring_entries(t));
	printf("\n");
	r = tracker_start(t, false);
	if (r < 0) {
		fprintf(stderr, "ferry-vm: starting dirty tracking: %s\n", strerror(-r));
		goto out;
	}
	signal(SIGINT, on_signal);
	signal(SIGTERM, on_signal);
	r = vm_start(vm);
	if (r < 0) {
		fprintf(stderr, "ferry-vm: starting VM: %s\n", strerror(-r));
		goto out;
	}

	struct sched_rate rate;
	sched_rate_init(&rate, 2000000000ull);
	uint64_t con = 0, dirty_total = 0;
	double t0 = now_s(), next = t0;
	while (!interrupted && (o.seconds == 0 || now_s() - t0 < o.seconds)) {
		usleep(50000);
		if (!o.quiet_console)
			echo_console(vm, &con);
		if (vm_state(vm) == VM_FAILED)
			break;
		if (now_s() < next)
			continue;
		next += 0.5;
		dirty_total += drain_dirty(t);
		double el = now_s() - t0;
		sched_rate_add(&rate, (uint64_t)(el * 1e9), dirty_total);
		struct vm_vcpu_stats st;
		vm_stats_total(vm, &st);
		double pps = sched_rate_per_sec(&rate);
		printf("[%5.1fs] dirty rate %9.0f pages/s (%7.1f MiB/s) | dirtied %llu pages | "
		       "guest passes %llu, errors %llu, ring-full exits %llu\n",
		       el, pps, pps * 4096.0 / 1048576.0, (unsigned long long)dirty_total,
		       (unsigned long long)st.passes, (unsigned long long)st.errors,
		       (unsigned long long)tracker_ring_full_exits(t));
		fflush(stdout);
	}
	vm_pause(vm);
	tracker_stop(t);
	if (!o.quiet_console)
		echo_console(vm, &con);
	struct vm_vcpu_stats st;
	vm_stats_total(vm, &st);
	if (vm_state(vm) == VM_FAILED) {
		fprintf(stderr, "ferry-vm: VM failed: %s\n", vm_failure(vm));
	} else if (st.errors) {
		fprintf(stderr, "ferry-vm: the guest reported %llu errors\n",
			(unsigned long long)st.errors);
	} else {
		printf("ferry-vm: paused all vCPUs, stopped dirty tracking, tearing down\n");
		status = 0;
	}
out:
	vm_free(vm);
	if (status == 0)
		printf("ferry-vm: VM stopped cleanly\n");
	return status;
}
