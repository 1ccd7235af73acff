// SPDX-License-Identifier: Apache-2.0
/*
 * Description: the VMM runs real guests on real KVM: a real-mode boot sector writes to the
 * serial console (with and without the in-kernel irqchip), a flat guest's vCPUs stop making
 * progress while paused and go on after resume (hundreds of pause/resume cycles, no hang),
 * a guest that triple-faults marks the VM failed with a reason instead of taking the VMM
 * down, a malformed debug-port record is ignored, and freeing a running VM is clean.
 */
#include "testutil.h"

#include <errno.h>
#include <string.h>
#include <unistd.h>

static struct vm *new_vm(const char *name, unsigned vcpus, bool irqchip)
{
	struct vm_config cfg;
	struct vm *vm = NULL;
	struct vm_error err = {{0}};
	vm_config_init(&cfg, name);
	cfg.mem_size = 16ull << 20;
	cfg.vcpus = vcpus;
	cfg.irqchip = irqchip;
	if (vm_new(&cfg, &vm, &err) < 0)
		fail_msg("vm_new: %s", err.msg);
	return vm;
}

/* Waits for the console to contain `needle`; returns true when it does. */
static bool console_has(struct vm *vm, const char *needle, int timeout_ms)
{
	char buf[8192];
	for (int t = 0; t < timeout_ms; t += 10) {
		uint64_t pos = 0;
		size_t n = vm_console_read(vm, &pos, buf, sizeof(buf) - 1);
		buf[n] = 0;
		if (strstr(buf, needle))
			return true;
		usleep(10000);
	}
	return false;
}

static void boot_sector(bool irqchip)
{
	/* mov dx,0x3f8; mov al,'O'; out dx,al; mov al,'K'; out dx,al; hlt; jmp $-1 */
	static const uint8_t code[] = {0xba, 0xf8, 0x03, 0xb0, 'O', 0xee, 0xb0, 'K', 0xee,
				       0xf4, 0xeb, 0xfd};
	uint8_t bs[512] = {0};
	struct vm_error err = {{0}};
	memcpy(bs, code, sizeof(code));
	bs[510] = 0x55;
	bs[511] = 0xaa;
	struct vm *vm = new_vm("boot", 1, irqchip);
	assert_int_equal(vm_load_boot_sector(vm, bs, sizeof(bs), &err), 0);
	assert_int_equal(vm_start(vm), 0);
	assert_true(console_has(vm, "OK", 5000));
	/* The halted vCPU still pauses, resumes and stops. */
	assert_int_equal(vm_pause(vm), 0);
	assert_int_equal(vm_state(vm), VM_PAUSED);
	assert_int_equal(vm_resume(vm), 0);
	assert_int_equal(vm_state(vm), VM_RUNNING);
	vm_free(vm);
}

static void boot_sector_irqchip(void **state)
{
	(void)state;
	boot_sector(true);
}

static void boot_sector_no_irqchip(void **state)
{
	(void)state;
	boot_sector(false);
}

static void pause_stops_progress(void **state)
{
	(void)state;
	struct vm *vm = tu_vm_builtin("pause", "dirtier", 64ull << 20, 2, TRACKER_AUTO, NULL);
	assert_int_equal(vm_start(vm), 0);
	assert_int_equal(tu_wait_passes(vm, 2, 20000), 0);
	for (int i = 0; i < 3; i++) {
		assert_int_equal(vm_pause(vm), 0);
		struct vm_vcpu_stats a, b;
		vm_stats_total(vm, &a);
		usleep(200000);
		vm_stats_total(vm, &b);
		assert_int_equal(a.pages, b.pages);
		assert_int_equal(a.exits, b.exits);
		assert_int_equal(vm_resume(vm), 0);
		uint64_t p = tu_min_passes(vm);
		assert_int_equal(tu_wait_passes(vm, p + 1, 20000), 0);
	}
	/* Many quick cycles: a lost kick or a lost wake-up would hang here. */
	for (int i = 0; i < 300; i++) {
		assert_int_equal(vm_pause(vm), 0);
		assert_int_equal(vm_resume(vm), 0);
	}
	assert_int_equal(vm_state(vm), VM_RUNNING);
	vm_free(vm); /* while running */
}

/* Builds a flat image around `code`. */
static size_t flat_image(uint8_t *buf, const uint8_t *code, size_t len)
{
	struct ferry_image_hdr h = {
		.magic = FERRY_IMAGE_MAGIC,
		.version = FERRY_IMAGE_VERSION,
		.hdr_size = sizeof(h),
		.load_addr = FERRY_IMAGE_GPA,
		.entry = FERRY_IMAGE_GPA + sizeof(h),
		.file_size = sizeof(h) + len,
		.mem_size = sizeof(h) + len,
	};
	memcpy(buf, &h, sizeof(h));
	memcpy(buf + sizeof(h), code, len);
	return h.file_size;
}

static void triple_fault_fails_vm(void **state)
{
	(void)state;
	static const uint8_t ud2[] = {0x0f, 0x0b};
	uint8_t img[128];
	struct vm_error err = {{0}};
	size_t len = flat_image(img, ud2, sizeof(ud2));
	struct vm *vm = new_vm("crash", 2, true);
	assert_int_equal(vm_load_flat(vm, img, len, NULL, 0, &err), 0);
	assert_int_equal(vm_start(vm), 0);
	for (int i = 0; i < 500 && vm_state(vm) != VM_FAILED; i++)
		usleep(10000);
	assert_int_equal(vm_state(vm), VM_FAILED);
	assert_non_null(strstr(vm_failure(vm), "shutdown"));
	assert_int_equal(vm_start(vm), -EIO);
	assert_int_equal(vm_pause(vm), 0);
	vm_free(vm);
}

static void bad_debug_record_ignored(void **state)
{
	(void)state;
	/* mov eax,0xfffff000; mov dx,0x510; out dx,eax;   (address outside RAM)
	 * mov eax,0x5000; out dx,eax;                      (bootinfo: wrong magic)
	 * mov edx,0x3f8; mov al,'X'; out dx,al; hlt; jmp */
	static const uint8_t code[] = {0xb8, 0x00, 0xf0, 0xff, 0xff, 0x66, 0xba, 0x10, 0x05,
				       0xef, 0xb8, 0x00, 0x50, 0x00, 0x00, 0xef, 0xba, 0xf8,
				       0x03, 0x00, 0x00, 0xb0, 'X',  0xee, 0xf4, 0xeb, 0xfd};
	uint8_t img[128];
	struct vm_error err = {{0}};
	size_t len = flat_image(img, code, sizeof(code));
	struct vm *vm = new_vm("dbg", 1, true);
	assert_int_equal(vm_load_flat(vm, img, len, NULL, 0, &err), 0);
	assert_int_equal(vm_start(vm), 0);
	assert_true(console_has(vm, "X", 5000));
	assert_true(console_has(vm, "outside RAM", 100));
	assert_true(console_has(vm, "malformed debug record", 100));
	assert_int_not_equal(vm_state(vm), VM_FAILED);
	vm_free(vm);
}

int main(void)
{
	tu_require_kvm();
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(boot_sector_irqchip),
		cmocka_unit_test(boot_sector_no_irqchip),
		cmocka_unit_test(pause_stops_progress),
		cmocka_unit_test(triple_fault_fails_vm),
		cmocka_unit_test(bad_debug_record_ignored),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
