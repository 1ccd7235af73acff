// SPDX-License-Identifier: Apache-2.0
/*
 * The VM object: shape validation, the KVM VM fd, memfd-backed guest RAM registered as one
 * or more memslots, the tracker (created before any vCPU so the dirty ring can be enabled),
 * the vCPUs with their CPUID, and the console buffer. vCPU threads live in vcpu.c, loaders
 * in loader.c, save/restore in state.c.
 */
#include "vm_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/memfd.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE_SIZE 4096ull
#define HUGE_SIZE (2ull << 20)
#define CPUID_MAX_ENTRIES 256
/* Where KVM may put the TSS the VMX real-mode emulation needs (3 pages below 4 GiB). */
#define TSS_ADDR 0xfffbd000ull

uint64_t vm_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int vm_err(struct vm_error *err, int e, const char *fmt, ...)
{
	if (err) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
		va_end(ap);
	}
	return e;
}

const char *vm_run_state_name(enum vm_run_state s)
{
	switch (s) {
	case VM_CREATED:
		return "created";
	case VM_RUNNING:
		return "running";
	case VM_PAUSED:
		return "paused";
	case VM_FAILED:
		return "failed";
	}
	return "unknown";
}

void vm_config_init(struct vm_config *cfg, const char *name)
{
	memset(cfg, 0, sizeof(*cfg));
	snprintf(cfg->name, sizeof(cfg->name), "%s", name ? name : "vm");
	cfg->mem_size = 64ull << 20;
	cfg->vcpus = 1;
	cfg->irqchip = true;
	cfg->tracker.backend = TRACKER_AUTO;
}

static uint64_t host_ram_bytes(void)
{
	long pages = sysconf(_SC_PHYS_PAGES);
	long psz = sysconf(_SC_PAGESIZE);
	if (pages <= 0 || psz <= 0)
		return 0;
	return (uint64_t)pages * (uint64_t)psz;
}

/* Checks the shape against what any VM and this host allow; fills err on failure. */
static int validate_shape(int kvm_fd, const struct vm_config *cfg, struct vm_error *err)
{
	uint64_t align = cfg->hugepages ? HUGE_SIZE : PAGE_SIZE;

	if (cfg->name[0] == '\0')
		return vm_err(err, -EINVAL, "VM name is empty");
	if (cfg->vcpus == 0)
		return vm_err(err, -EINVAL, "a VM needs at least 1 vCPU");
	int max_vcpus = ioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_MAX_VCPUS);
	if (max_vcpus <= 0)
		max_vcpus = ioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_NR_VCPUS);
	unsigned limit = VM_MAX_VCPUS;
	if (max_vcpus > 0 && (unsigned)max_vcpus < limit)
		limit = (unsigned)max_vcpus;
	if (cfg->vcpus > limit)
		return vm_err(err, -E2BIG, "%u vCPUs requested, this host allows at most %u",
			      cfg->vcpus, limit);
	if (cfg->mem_size == 0)
		return vm_err(err, -EINVAL, "memory size is 0");
	if (cfg->mem_size % align)
		return vm_err(err, -EINVAL, "memory size %llu is not a multiple of %llu bytes%s",
			      (unsigned long long)cfg->mem_size, (unsigned long long)align,
			      cfg->hugepages ? " (hugepages)" : "");
	uint64_t ram = host_ram_bytes();
	if (ram && cfg->mem_size > ram)
		return vm_err(err, -E2BIG,
			      "memory size %llu MiB exceeds this host's %llu MiB of RAM",
			      (unsigned long long)(cfg->mem_size >> 20),
			      (unsigned long long)(ram >> 20));
	if (cfg->slot_size && cfg->slot_size % align)
		return vm_err(err, -EINVAL, "slot size %llu is not a multiple of %llu bytes",
			      (unsigned long long)cfg->slot_size, (unsigned long long)align);
	uint64_t slot = cfg->slot_size ? cfg->slot_size : cfg->mem_size;
	uint64_t nslots = (cfg->mem_size + slot - 1) / slot;
	int kvm_slots = ioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_NR_MEMSLOTS);
	uint64_t slot_limit = TRACKER_MAX_SLOTS;
	if (kvm_slots > 0 && (uint64_t)kvm_slots < slot_limit)
		slot_limit = (uint64_t)kvm_slots;
	if (nslots > slot_limit)
		return vm_err(err, -E2BIG, "%llu memslots needed, at most %llu allowed",
			      (unsigned long long)nslots, (unsigned long long)slot_limit);
	if (cfg->tracker.ring_entries &&
	    (cfg->tracker.ring_entries & (cfg->tracker.ring_entries - 1)))
		return vm_err(err, -EINVAL, "dirty ring entries %u is not a power of two",
			      cfg->tracker.ring_entries);
	if (cfg->tracker.ring_entries > TRACKER_RING_ENTRIES_MAX)
		return vm_err(err, -E2BIG, "dirty ring entries %u exceed the maximum %u",
			      cfg->tracker.ring_entries, TRACKER_RING_ENTRIES_MAX);
	if (cfg->tracker.ring_entries && cfg->tracker.ring_entries < TRACKER_RING_ENTRIES_MIN)
		return vm_err(err, -EINVAL, "dirty ring entries %u below the minimum %u",
			      cfg->tracker.ring_entries, TRACKER_RING_ENTRIES_MIN);
	return 0;
}

static int slot_create(struct vm *vm, unsigned i, uint64_t gpa, uint64_t size,
		       struct vm_error *err)
{
	struct vm_slot *s = &vm->slots[i];
	char name[96];
	unsigned flags = MFD_CLOEXEC;
	int r;

	s->memfd = -1;
	s->hva = MAP_FAILED;
	if (vm->cfg.hugepages)
		flags |= MFD_HUGETLB | MFD_HUGE_2MB;
	snprintf(name, sizeof(name), "ferry-%s-ram%u", vm->cfg.name, i);
	s->memfd = memfd_create(name, flags);
	if (s->memfd < 0)
		return vm_err(err, -errno, "memfd_create for slot %u: %s", i, strerror(errno));
	if (ftruncate(s->memfd, (off_t)size) < 0)
		return vm_err(err, -errno, "sizing guest RAM slot %u to %llu bytes: %s", i,
			      (unsigned long long)size, strerror(errno));
	if (vm->cfg.hugepages && fallocate(s->memfd, 0, 0, (off_t)size) < 0)
		/* Reserve now: an unbacked hugetlb page would SIGBUS the VMM later. */
		return vm_err(err, -ENOMEM, "cannot reserve %llu MiB of 2 MiB hugepages: %s",
			      (unsigned long long)(size >> 20), strerror(errno));
	s->hva = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, s->memfd,
		      0);
	if (s->hva == MAP_FAILED) {
		s->hva = NULL;
		return vm_err(err, -errno, "mapping guest RAM slot %u: %s", i, strerror(errno));
	}
	madvise(s->hva, size, MADV_DONTDUMP);
	s->slot = i;
	s->gpa = gpa;
	s->size = size;

	struct kvm_userspace_memory_region region = {
		.slot = i,
		.flags = 0,
		.guest_phys_addr = gpa,
		.memory_size = size,
		.userspace_addr = (uintptr_t)s->hva,
	};
	if (ioctl(vm->vm_fd, KVM_SET_USER_MEMORY_REGION, &region) < 0)
		return vm_err(err, -errno, "KVM_SET_USER_MEMORY_REGION slot %u: %s", i,
			      strerror(errno));
	struct tracker_slot ts = {.slot = i, .gpa = gpa, .size = size, .hva = s->hva};
	r = tracker_slot_add(vm->tracker, &ts);
	if (r < 0)
		return vm_err(err, r, "tracker: adding slot %u: %s", i, strerror(-r));
	return 0;
}

static int cpuid_init(struct vm *vm, struct vm_error *err)
{
	size_t sz = sizeof(struct kvm_cpuid2) + CPUID_MAX_ENTRIES * sizeof(struct kvm_cpuid_entry2);
	vm->cpuid = calloc(1, sz);
	if (!vm->cpuid)
		return vm_err(err, -ENOMEM, "out of memory");
	vm->cpuid->nent = CPUID_MAX_ENTRIES;
	if (ioctl(vm->kvm_fd, KVM_GET_SUPPORTED_CPUID, vm->cpuid) < 0)
		return vm_err(err, -errno, "KVM_GET_SUPPORTED_CPUID: %s", strerror(errno));
	return 0;
}

/* Gives vCPU idx its own APIC id in CPUID leaves 1, 0xb and 0x1f. */
static int vcpu_set_cpuid(struct vm *vm, struct vcpu *v)
{
	size_t sz = sizeof(struct kvm_cpuid2) + vm->cpuid->nent * sizeof(struct kvm_cpuid_entry2);
	struct kvm_cpuid2 *c = malloc(sz);
	int r = 0;

	if (!c)
		return -ENOMEM;
	memcpy(c, vm->cpuid, sz);
	for (unsigned i = 0; i < c->nent; i++) {
		struct kvm_cpuid_entry2 *e = &c->entries[i];
		if (e->function == 1)
			e->ebx = (e->ebx & 0x00ffffffu) | (v->idx << 24);
		else if (e->function == 0xb || e->function == 0x1f)
			e->edx = v->idx;
	}
	if (ioctl(v->fd, KVM_SET_CPUID2, c) < 0)
		r = -errno;
	free(c);
	return r;
}

static int vcpu_create(struct vm *vm, unsigned idx, int mmap_size, struct vm_error *err)
{
	struct vcpu *v = &vm->vcpus[idx];
	int r;

	v->vm = vm;
	v->idx = idx;
	snprintf(v->name, sizeof(v->name), "vcpu-%u", idx);
	v->fd = ioctl(vm->vm_fd, KVM_CREATE_VCPU, (unsigned long)idx);
	if (v->fd < 0) {
		v->fd = -1;
		return vm_err(err, -errno, "KVM_CREATE_VCPU %u: %s", idx, strerror(errno));
	}
	v->run = mmap(NULL, (size_t)mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->fd, 0);
	if (v->run == MAP_FAILED) {
		v->run = NULL;
		return vm_err(err, -errno, "mapping kvm_run of vCPU %u: %s", idx, strerror(errno));
	}
	v->run_size = (size_t)mmap_size;
	r = vcpu_set_cpuid(vm, v);
	if (r < 0)
		return vm_err(err, r, "KVM_SET_CPUID2 on vCPU %u: %s", idx, strerror(-r));
	r = tracker_vcpu_attach(vm->tracker, idx, v->fd);
	if (r < 0)
		return vm_err(err, r, "tracker: attaching vCPU %u: %s", idx, strerror(-r));
	if (vm->tsc_khz == 0) {
		int khz = ioctl(v->fd, KVM_GET_TSC_KHZ, 0);
		vm->tsc_khz = khz > 0 ? (uint64_t)khz : 1000000;
	}
	return 0;
}

int vm_new(const struct vm_config *cfg, struct vm **ret, struct vm_error *err)
{
	struct vm *vm;
	int r, mmap_size;

	vm = calloc(1, sizeof(*vm));
	if (!vm)
		return vm_err(err, -ENOMEM, "out of memory");
	vm->cfg = *cfg;
	vm->cfg.name[VM_NAME_MAX - 1] = '\0';
	vm->kvm_fd = vm->vm_fd = -1;
	pthread_mutex_init(&vm->lock, NULL);
	pthread_mutex_init(&vm->console_lock, NULL);
	pthread_mutex_init(&vm->throttle_lock, NULL);
	pthread_condattr_t ca;
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&vm->cond, &ca);
	pthread_condattr_destroy(&ca);

	vm->kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (vm->kvm_fd < 0) {
		r = vm_err(err, -errno, "cannot open /dev/kvm: %s", strerror(errno));
		goto fail;
	}
	r = validate_shape(vm->kvm_fd, &vm->cfg, err);
	if (r < 0)
		goto fail;
	vm->vm_fd = ioctl(vm->kvm_fd, KVM_CREATE_VM, 0);
	if (vm->vm_fd < 0) {
		r = vm_err(err, -errno, "KVM_CREATE_VM: %s", strerror(errno));
		vm->vm_fd = -1;
		goto fail;
	}
	/* Needed on Intel for real-mode emulation; harmless elsewhere. */
	ioctl(vm->vm_fd, KVM_SET_TSS_ADDR, (unsigned long)TSS_ADDR);
	if (vm->cfg.irqchip && ioctl(vm->vm_fd, KVM_CREATE_IRQCHIP, 0) < 0) {
		r = vm_err(err, -errno, "KVM_CREATE_IRQCHIP: %s", strerror(errno));
		goto fail;
	}

	/* The tracker comes before any vCPU: the dirty ring must be enabled first. */
	struct tracker_config tc = vm->cfg.tracker;
	tc.max_vcpus = vm->cfg.vcpus;
	r = tracker_new(vm->vm_fd, &tc, &vm->tracker);
	if (r < 0) {
		r = vm_err(err, r, "dirty tracker (%s): %s", tracker_backend_name(tc.backend),
			   strerror(-r));
		goto fail;
	}

	uint64_t slot_size = vm->cfg.slot_size ? vm->cfg.slot_size : vm->cfg.mem_size;
	for (uint64_t gpa = 0; gpa < vm->cfg.mem_size; gpa += slot_size) {
		uint64_t size = vm->cfg.mem_size - gpa < slot_size ? vm->cfg.mem_size - gpa
								    : slot_size;
		vm->nr_slots++;
		r = slot_create(vm, vm->nr_slots - 1, gpa, size, err);
		if (r < 0)
			goto fail;
	}

	r = cpuid_init(vm, err);
	if (r < 0)
		goto fail;
	mmap_size = ioctl(vm->kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (mmap_size <= 0) {
		r = vm_err(err, -errno, "KVM_GET_VCPU_MMAP_SIZE: %s", strerror(errno));
		goto fail;
	}
	vm->vcpus = calloc(vm->cfg.vcpus, sizeof(*vm->vcpus));
	if (!vm->vcpus) {
		r = vm_err(err, -ENOMEM, "out of memory");
		goto fail;
	}
	for (unsigned i = 0; i < vm->cfg.vcpus; i++)
		vm->vcpus[i].fd = -1;
	for (unsigned i = 0; i < vm->cfg.vcpus; i++) {
		r = vcpu_create(vm, i, mmap_size, err);
		if (r < 0)
			goto fail;
	}
	r = vcpu_threads_start(vm);
	if (r < 0) {
		r = vm_err(err, r, "starting vCPU threads: %s", strerror(-r));
		goto fail;
	}
	*ret = vm;
	return 0;
fail:
	vm_free(vm);
	return r;
}

void vm_free(struct vm *vm)
{
	if (!vm)
		return;
	vm_throttle_stop(vm); /* first: the ticker signals vCPU threads */
	vcpu_threads_stop(vm);
	if (vm->vcpus) {
		for (unsigned i = 0; i < vm->cfg.vcpus; i++) {
			struct vcpu *v = &vm->vcpus[i];
			if (v->run)
				munmap(v->run, v->run_size);
			if (v->fd >= 0)
				close(v->fd);
		}
		free(vm->vcpus);
	}
	/* The tracker unmaps the rings; it must go after the vCPU threads stopped. */
	tracker_free(vm->tracker);
	for (unsigned i = 0; i < vm->nr_slots; i++) {
		struct vm_slot *s = &vm->slots[i];
		if (s->hva && s->size)
			munmap(s->hva, s->size);
		if (s->memfd >= 0)
			close(s->memfd);
	}
	free(vm->cpuid);
	if (vm->vm_fd >= 0)
		close(vm->vm_fd);
	if (vm->kvm_fd >= 0)
		close(vm->kvm_fd);
	pthread_cond_destroy(&vm->cond);
	pthread_mutex_destroy(&vm->lock);
	pthread_mutex_destroy(&vm->console_lock);
	pthread_mutex_destroy(&vm->throttle_lock);
	free(vm);
}

const struct vm_config *vm_config(const struct vm *vm)
{
	return &vm->cfg;
}

const char *vm_name(const struct vm *vm)
{
	return vm->cfg.name;
}

int vm_fd(const struct vm *vm)
{
	return vm->vm_fd;
}

int vm_kvm_fd(const struct vm *vm)
{
	return vm->kvm_fd;
}

int vm_vcpu_fd(const struct vm *vm, unsigned idx)
{
	return idx < vm->cfg.vcpus ? vm->vcpus[idx].fd : -1;
}

unsigned vm_nr_slots(const struct vm *vm)
{
	return vm->nr_slots;
}

const struct vm_slot *vm_slot(const struct vm *vm, unsigned i)
{
	return i < vm->nr_slots ? &vm->slots[i] : NULL;
}

void *vm_gpa_to_hva(const struct vm *vm, uint64_t gpa, uint64_t len)
{
	for (unsigned i = 0; i < vm->nr_slots; i++) {
		const struct vm_slot *s = &vm->slots[i];
		if (gpa >= s->gpa && gpa - s->gpa < s->size && len <= s->size - (gpa - s->gpa))
			return (char *)s->hva + (gpa - s->gpa);
	}
	return NULL;
}

struct tracker *vm_tracker(const struct vm *vm)
{
	return vm->tracker;
}

struct ferry_bootinfo *vm_bootinfo(const struct vm *vm)
{
	return vm->bootinfo;
}

enum vm_run_state vm_state(const struct vm *vm)
{
	struct vm *m = (struct vm *)vm;
	pthread_mutex_lock(&m->lock);
	enum vm_run_state s = m->run_state;
	pthread_mutex_unlock(&m->lock);
	return s;
}

const char *vm_failure(const struct vm *vm)
{
	/* Written once, under lock, before run_state becomes VM_FAILED; stable after. */
	return vm->failure;
}

void vm_console_put(struct vm *vm, const char *p, size_t n)
{
	pthread_mutex_lock(&vm->console_lock);
	for (size_t i = 0; i < n; i++)
		vm->console[(vm->console_total + i) % VM_CONSOLE_SIZE] = p[i];
	vm->console_total += n;
	pthread_mutex_unlock(&vm->console_lock);
}

size_t vm_console_read(struct vm *vm, uint64_t *pos, char *buf, size_t len)
{
	size_t n = 0;
	pthread_mutex_lock(&vm->console_lock);
	uint64_t oldest = vm->console_total > VM_CONSOLE_SIZE ? vm->console_total - VM_CONSOLE_SIZE
							      : 0;
	if (*pos < oldest)
		*pos = oldest;
	while (n < len && *pos < vm->console_total) {
		buf[n++] = vm->console[*pos % VM_CONSOLE_SIZE];
		(*pos)++;
	}
	pthread_mutex_unlock(&vm->console_lock);
	return n;
}

static void stats_of(const struct vcpu *v, struct vm_vcpu_stats *s)
{
	s->exits = atomic_load(&v->exits);
	s->io_exits = atomic_load(&v->io_exits);
	s->ring_full_exits = atomic_load(&v->ring_full_exits);
	s->ready = atomic_load(&v->ready);
	s->passes = atomic_load(&v->passes);
	s->pages = atomic_load(&v->pages);
	s->errors = atomic_load(&v->errors);
	s->done_gen = atomic_load(&v->done_gen);
	s->sleep_ns = atomic_load(&v->sleep_ns);
	s->throttle_pct = atomic_load(&v->throttle_pct);
	s->throttle_sleep_ns = atomic_load(&v->throttle_sleep_ns);
}

void vm_vcpu_stats(const struct vm *vm, unsigned idx, struct vm_vcpu_stats *ret)
{
	memset(ret, 0, sizeof(*ret));
	if (idx < vm->cfg.vcpus)
		stats_of(&vm->vcpus[idx], ret);
}

void vm_stats_total(const struct vm *vm, struct vm_vcpu_stats *ret)
{
	memset(ret, 0, sizeof(*ret));
	for (unsigned i = 0; i < vm->cfg.vcpus; i++) {
		struct vm_vcpu_stats s;
		stats_of(&vm->vcpus[i], &s);
		ret->exits += s.exits;
		ret->io_exits += s.io_exits;
		ret->ring_full_exits += s.ring_full_exits;
		ret->ready += s.ready;
		ret->passes += s.passes;
		ret->pages += s.pages;
		ret->errors += s.errors;
		ret->sleep_ns += s.sleep_ns;
		ret->throttle_sleep_ns += s.throttle_sleep_ns;
		if (s.throttle_pct > ret->throttle_pct)
			ret->throttle_pct = s.throttle_pct; /* the most throttled vCPU */
		if (s.done_gen > ret->done_gen)
			ret->done_gen = s.done_gen;
	}
}

unsigned vm_guest_errors(const struct vm *vm, struct vm_guest_error *ret, unsigned max)
{
	struct vm *m = (struct vm *)vm;
	pthread_mutex_lock(&m->lock);
	unsigned n = m->nr_errors < max ? m->nr_errors : max;
	memcpy(ret, m->errors, n * sizeof(*ret));
	pthread_mutex_unlock(&m->lock);
	return n;
}

int vm_wait(struct vm *vm, bool (*pred)(struct vm *vm, void *arg), void *arg, int timeout_ms)
{
	uint64_t deadline = vm_now_ns() + (uint64_t)timeout_ms * 1000000ull;
	for (;;) {
		if (pred(vm, arg))
			return 0;
		uint64_t now = vm_now_ns();
		if (now >= deadline)
			return -ETIMEDOUT;
		uint64_t until = now + 50000000ull < deadline ? now + 50000000ull : deadline;
		struct timespec ts = {.tv_sec = (time_t)(until / 1000000000ull),
				      .tv_nsec = (long)(until % 1000000000ull)};
		pthread_mutex_lock(&vm->lock);
		pthread_cond_timedwait(&vm->cond, &vm->lock, &ts);
		pthread_mutex_unlock(&vm->lock);
	}
}
