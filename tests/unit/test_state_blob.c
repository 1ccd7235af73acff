// SPDX-License-Identifier: Apache-2.0
/*
 * Description: the state blob's validation (docs/state-format.md) against real KVM. A
 * paused memcheck VM's state is saved, then mangled every way a transfer can mangle it —
 * cut at every length, every byte flipped, sections unknown, doubled or missing with the
 * checksum made to match, a newer version, another VM's shape — and restore must refuse
 * each with the documented errno before touching the target (whose registers are compared
 * before and after). Running VMs are refused with -EBUSY, and save → restore → save gives
 * back the same registers.
 */
#include <errno.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>

#include "testutil.h"
#include "transport/wire.h"

/* Header layout from docs/state-format.md. */
#define HDR_SIZE 40u
#define OFF_VERSION 8u
#define OFF_PAYLOAD_LEN 24u
#define OFF_CSUM 32u
#define SEC_HDR_SIZE 12u
#define SEC_REGS 16u
#define SEC_SREGS 17u
#define SEC_CLOCK 2u
#define SEC_MSRS 21u
#define SEC_LAPIC 25u

#define SRC_MEM (32ull << 20)

struct blob {
	uint8_t *p;
	size_t len;
};

static uint32_t get_le32(const uint8_t *p)
{
	uint32_t v;
	memcpy(&v, p, 4); /* x86: little-endian already */
	return v;
}

static void put_le32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }

static void put_le64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

/* Makes the header agree with the payload, so only the section parser can object. */
static void fix_header(uint8_t *b, size_t len)
{
	put_le64(b + OFF_PAYLOAD_LEN, len - HDR_SIZE);
	put_le64(b + OFF_CSUM, wire_fnv1a64(b + HDR_SIZE, len - HDR_SIZE));
}

struct sec {
	uint32_t type, vcpu, len;
	size_t off; /* of the section header */
};

/* Lists the sections of a well-formed blob; returns how many. */
static unsigned walk(const struct blob *b, struct sec *out, unsigned max)
{
	unsigned n = 0;
	size_t off = HDR_SIZE;
	while (off < b->len) {
		assert_true(b->len - off >= SEC_HDR_SIZE);
		assert_true(n < max);
		out[n].type = get_le32(b->p + off);
		out[n].vcpu = get_le32(b->p + off + 4);
		out[n].len = get_le32(b->p + off + 8);
		out[n].off = off;
		off += SEC_HDR_SIZE + out[n].len;
		assert_true(off <= b->len);
		n++;
	}
	return n;
}

static const struct sec *find_sec(const struct sec *s, unsigned n, uint32_t type, uint32_t vcpu)
{
	for (unsigned i = 0; i < n; i++)
		if (s[i].type == type && s[i].vcpu == vcpu)
			return &s[i];
	return NULL;
}

/* A memcheck VM that ran at least one pass and is now paused. */
static struct vm *paused_source(unsigned vcpus)
{
	struct vm *vm = tu_vm_builtin("blob-src", "memcheck", SRC_MEM, vcpus, TRACKER_AUTO, NULL);
	assert_int_equal(vm_start(vm), 0);
	int r = tu_wait_passes(vm, 1, 60000);
	if (r < 0 || vm_state(vm) == VM_FAILED) {
		tu_dump_console(vm);
		fail_msg("source did not make a pass: %d, %s", r, vm_failure(vm));
	}
	assert_int_equal(vm_pause(vm), 0);
	return vm;
}

/* A guestless VM with the given shape: what a migration target starts as. */
static struct vm *empty_target(const char *name, unsigned vcpus, uint64_t mem, bool irqchip)
{
	struct vm_config cfg;
	struct vm_error err = {{0}};
	struct vm *vm = NULL;
	vm_config_init(&cfg, name);
	cfg.vcpus = vcpus;
	cfg.mem_size = mem;
	cfg.irqchip = irqchip;
	int r = vm_new(&cfg, &vm, &err);
	if (r < 0)
		fail_msg("vm_new: %s (%s)", strerror(-r), err.msg);
	return vm;
}

static struct blob save(struct vm *vm)
{
	struct blob b = {0};
	struct vm_error err = {{0}};
	void *p = NULL;
	int r = vm_state_save(vm, &p, &b.len, &err);
	if (r < 0)
		fail_msg("vm_state_save: %s (%s)", strerror(-r), err.msg);
	b.p = p;
	assert_true(b.len > HDR_SIZE);
	return b;
}

struct cpu_regs {
	struct kvm_regs regs;
	struct kvm_sregs sregs;
};

static void read_regs(const struct vm *vm, struct cpu_regs *out)
{
	for (unsigned i = 0; i < vm_config(vm)->vcpus; i++) {
		memset(&out[i], 0, sizeof(out[i]));
		assert_int_equal(ioctl(vm_vcpu_fd(vm, i), KVM_GET_REGS, &out[i].regs), 0);
		assert_int_equal(ioctl(vm_vcpu_fd(vm, i), KVM_GET_SREGS, &out[i].sregs), 0);
	}
}

static int restore(struct vm *vm, const void *p, size_t len, struct vm_error *err)
{
	memset(err, 0, sizeof(*err));
	return vm_state_restore(vm, p, len, err);
}

/* Every prefix of the blob, raw and with the header fixed up to match it, is refused. */
static void test_truncation(void **state)
{
	(void)state;
	struct vm *src = paused_source(1);
	struct blob b = save(src);
	struct vm *dst = empty_target("blob-dst", 1, SRC_MEM, true);
	struct cpu_regs before[1], after[1];
	read_regs(dst, before);

	struct vm_error err;
	uint8_t *m = malloc(b.len);
	assert_non_null(m);
	unsigned raw = 0, fixed = 0;
	for (size_t cut = 0; cut < b.len; cut++) {
		int r = restore(dst, b.p, cut, &err);
		if (r != -EBADMSG)
			fail_msg("cut at %zu of %zu: %d (%s)", cut, b.len, r, err.msg);
		raw++;
		if (cut < HDR_SIZE)
			continue;
		/* Same prefix, header made consistent: now the sections themselves are short. */
		memcpy(m, b.p, cut);
		fix_header(m, cut);
		r = restore(dst, m, cut, &err);
		if (r != -EBADMSG)
			fail_msg("fixed-up cut at %zu of %zu: %d (%s)", cut, b.len, r, err.msg);
		fixed++;
	}
	print_message("%u raw and %u fixed-up truncations of a %zu-byte blob refused\n", raw, fixed,
		      b.len);

	read_regs(dst, after);
	assert_memory_equal(before, after, sizeof(before));
	/* Nothing was restored, so there is still nothing to run. */
	assert_true(vm_start(dst) < 0);
	assert_int_equal(vm_state(dst), VM_CREATED);

	/* And the intact blob still goes in. */
	int r = restore(dst, b.p, b.len, &err);
	if (r < 0)
		fail_msg("intact blob: %s (%s)", strerror(-r), err.msg);
	free(m);
	free(b.p);
	vm_free(dst);
	vm_free(src);
}

/* Every single flipped byte is refused: the version's as -EPROTONOSUPPORT, all else -EBADMSG. */
static void test_flipped_bytes(void **state)
{
	(void)state;
	struct vm *src = paused_source(1);
	struct blob b = save(src);
	struct vm *dst = empty_target("blob-dst", 1, SRC_MEM, true);
	struct cpu_regs before[1], after[1];
	read_regs(dst, before);

	struct vm_error err;
	uint8_t *m = malloc(b.len);
	assert_non_null(m);
	for (size_t i = 0; i < b.len; i++) {
		memcpy(m, b.p, b.len);
		m[i] ^= 0x5a;
		int want = i >= OFF_VERSION && i < OFF_VERSION + 4 ? -EPROTONOSUPPORT : -EBADMSG;
		int r = restore(dst, m, b.len, &err);
		if (r != want)
			fail_msg("byte %zu flipped: %d, want %d (%s)", i, r, want, err.msg);
	}
	print_message("all %zu single-byte corruptions refused\n", b.len);
	read_regs(dst, after);
	assert_memory_equal(before, after, sizeof(before));
	free(m);
	free(b.p);
	vm_free(dst);
	vm_free(src);
}

/* Well-framed, correctly checksummed blobs that are still wrong. */
static void test_bad_sections(void **state)
{
	(void)state;
	struct vm *src = paused_source(1);
	struct blob b = save(src);
	struct vm *dst = empty_target("blob-dst", 1, SRC_MEM, true);
	struct cpu_regs before[1], after[1];
	read_regs(dst, before);
	struct sec secs[64];
	unsigned n = walk(&b, secs, 64);
	const struct sec *regs = find_sec(secs, n, SEC_REGS, 0);
	assert_non_null(regs);
	size_t regs_size = SEC_HDR_SIZE + regs->len;
	struct vm_error err;
	uint8_t *m = malloc(b.len + regs_size);
	assert_non_null(m);
	int r;

	/* An unknown section type (this is version 1: no skipping what it cannot read). */
	memcpy(m, b.p, b.len);
	put_le32(m + regs->off, 99);
	fix_header(m, b.len);
	r = restore(dst, m, b.len, &err);
	assert_int_equal(r, -EBADMSG);
	assert_non_null(strstr(err.msg, "unknown section"));

	/* A duplicate: REGS of vCPU 0 twice. */
	memcpy(m, b.p, b.len);
	memcpy(m + b.len, b.p + regs->off, regs_size);
	fix_header(m, b.len + regs_size);
	r = restore(dst, m, b.len + regs_size, &err);
	assert_int_equal(r, -EBADMSG);
	assert_non_null(strstr(err.msg, "duplicate"));

	/* A missing one: REGS cut out. */
	memcpy(m, b.p, regs->off);
	memcpy(m + regs->off, b.p + regs->off + regs_size, b.len - regs->off - regs_size);
	fix_header(m, b.len - regs_size);
	r = restore(dst, m, b.len - regs_size, &err);
	assert_int_equal(r, -EBADMSG);
	assert_non_null(strstr(err.msg, "REGS"));

	/* A vCPU index beyond the blob's vCPUs. */
	memcpy(m, b.p, b.len);
	put_le32(m + regs->off + 4, 1);
	fix_header(m, b.len);
	assert_int_equal(restore(dst, m, b.len, &err), -EBADMSG);

	/* A section length that does not fit its type (the section keeps the framing intact
	 * by swallowing the next section header: REGS claims 144 + 12 bytes). */
	memcpy(m, b.p, b.len);
	put_le32(m + regs->off + 8, regs->len + SEC_HDR_SIZE);
	fix_header(m, b.len);
	assert_int_equal(restore(dst, m, b.len, &err), -EBADMSG);

	/* A length running past the end. */
	memcpy(m, b.p, b.len);
	put_le32(m + regs->off + 8, 0xfffffff0u);
	fix_header(m, b.len);
	assert_int_equal(restore(dst, m, b.len, &err), -EBADMSG);

	/* Unknown header flags. */
	memcpy(m, b.p, b.len);
	put_le32(m + 12, get_le32(b.p + 12) | 0x80000000u);
	assert_int_equal(restore(dst, m, b.len, &err), -EBADMSG);

	read_regs(dst, after);
	assert_memory_equal(before, after, sizeof(before));
	free(m);
	free(b.p);
	vm_free(dst);
	vm_free(src);
}

static void test_version_bump(void **state)
{
	(void)state;
	struct vm *src = paused_source(1);
	struct blob b = save(src);
	struct vm *dst = empty_target("blob-dst", 1, SRC_MEM, true);
	struct cpu_regs before[1], after[1];
	read_regs(dst, before);

	assert_int_equal(get_le32(b.p + OFF_VERSION), 1);
	put_le32(b.p + OFF_VERSION, 2);
	fix_header(b.p, b.len);
	struct vm_error err;
	int r = restore(dst, b.p, b.len, &err);
	assert_int_equal(r, -EPROTONOSUPPORT);
	print_message("version 2: %s\n", err.msg);
	/* The message names both the blob's version and ours. */
	assert_non_null(strstr(err.msg, "2"));
	assert_non_null(strstr(err.msg, "1"));

	read_regs(dst, after);
	assert_memory_equal(before, after, sizeof(before));
	free(b.p);
	vm_free(dst);
	vm_free(src);
}

static void test_shape_mismatch(void **state)
{
	(void)state;
	struct vm *src = paused_source(2);
	struct blob b = save(src);
	struct vm_error err;

	struct vm *one = empty_target("blob-1cpu", 1, SRC_MEM, true);
	struct cpu_regs before[2], after[2];
	read_regs(one, before);
	assert_int_equal(restore(one, b.p, b.len, &err), -EINVAL);
	print_message("2 vCPUs into 1: %s\n", err.msg);
	assert_non_null(strstr(err.msg, "vCPU"));
	read_regs(one, after);
	assert_memory_equal(before, after, sizeof(struct cpu_regs));
	vm_free(one);

	struct vm *small = empty_target("blob-small", 2, SRC_MEM / 2, true);
	assert_int_equal(restore(small, b.p, b.len, &err), -EINVAL);
	print_message("other memory size: %s\n", err.msg);
	assert_non_null(strstr(err.msg, "memory"));
	vm_free(small);

	struct vm *noirq = empty_target("blob-noirq", 2, SRC_MEM, false);
	read_regs(noirq, before);
	assert_int_equal(restore(noirq, b.p, b.len, &err), -EINVAL);
	print_message("no irqchip: %s\n", err.msg);
	assert_non_null(strstr(err.msg, "irqchip"));
	read_regs(noirq, after);
	assert_memory_equal(before, after, sizeof(before));
	vm_free(noirq);

	free(b.p);
	vm_free(src);
}

static void test_running_busy(void **state)
{
	(void)state;
	struct vm *vm = paused_source(1);
	struct blob b = save(vm);
	assert_int_equal(vm_resume(vm), 0);
	assert_int_equal(vm_state(vm), VM_RUNNING);

	struct vm_error err = {{0}};
	void *p = NULL;
	size_t len = 0;
	assert_int_equal(vm_state_save(vm, &p, &len, &err), -EBUSY);
	assert_null(p); /* untouched on failure */
	assert_int_equal(len, 0);
	print_message("save while running: %s\n", err.msg);
	assert_int_equal(restore(vm, b.p, b.len, &err), -EBUSY);
	print_message("restore while running: %s\n", err.msg);

	assert_int_equal(vm_pause(vm), 0);
	assert_int_not_equal(vm_state(vm), VM_FAILED);
	free(b.p);
	vm_free(vm);
}

static void test_roundtrip(void **state)
{
	(void)state;
	struct vm *src = paused_source(2);
	struct blob b1 = save(src);
	struct vm *dst = empty_target("blob-dst", 2, SRC_MEM, true);
	struct vm_error err = {{0}};
	int r = restore(dst, b1.p, b1.len, &err);
	if (r < 0)
		fail_msg("vm_state_restore: %s (%s)", strerror(-r), err.msg);
	print_message("restored %zu bytes, %d MSRs skipped\n", b1.len, r);

	struct cpu_regs a[2], c[2];
	read_regs(src, a);
	read_regs(dst, c);
	for (unsigned i = 0; i < 2; i++) {
		assert_memory_equal(&a[i].regs, &c[i].regs, sizeof(a[i].regs));
		assert_memory_equal(&a[i].sregs, &c[i].sregs, sizeof(a[i].sregs));
	}

	/* Saving the target again gives the same sections, but for what moves by itself
	 * (kvmclock, the TSC among the MSRs, the APIC timer's current count). */
	struct blob b2 = save(dst);
	struct sec s1[64], s2[64];
	unsigned n1 = walk(&b1, s1, 64), n2 = walk(&b2, s2, 64);
	assert_int_equal(n1, n2);
	for (unsigned i = 0; i < n1; i++) {
		assert_int_equal(s1[i].type, s2[i].type);
		assert_int_equal(s1[i].vcpu, s2[i].vcpu);
		assert_int_equal(s1[i].len, s2[i].len);
		if (s1[i].type == SEC_CLOCK || s1[i].type == SEC_MSRS || s1[i].type == SEC_LAPIC)
			continue;
		if (memcmp(b1.p + s1[i].off, b2.p + s2[i].off, SEC_HDR_SIZE + s1[i].len))
			fail_msg("section type %u of vCPU %u differs after a round trip",
				 s1[i].type, s1[i].vcpu);
	}
	free(b1.p);
	free(b2.p);
	vm_free(dst);
	vm_free(src);
}

int main(void)
{
	tu_require_kvm();
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_truncation),	   cmocka_unit_test(test_flipped_bytes),
	    cmocka_unit_test(test_bad_sections),   cmocka_unit_test(test_version_bump),
	    cmocka_unit_test(test_shape_mismatch), cmocka_unit_test(test_running_busy),
	    cmocka_unit_test(test_roundtrip),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
