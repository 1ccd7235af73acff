// SPDX-License-Identifier: Apache-2.0
/*
 * Description: guest loaders refuse malformed and oversized images (boot sectors and flat
 * images) with a clear message and leave the VM untouched: guest memory stays zero and a
 * good image still loads and runs afterwards.
 */
#include "testutil.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static bool mem_is_zero(struct vm *vm, uint64_t gpa, uint64_t len)
{
	const uint8_t *p = vm_gpa_to_hva(vm, gpa, len);
	assert_non_null(p);
	for (uint64_t i = 0; i < len; i++)
		if (p[i])
			return false;
	return true;
}

static struct vm *new_vm(unsigned vcpus)
{
	struct vm_config cfg;
	struct vm *vm = NULL;
	struct vm_error err = {{0}};
	vm_config_init(&cfg, "loader");
	cfg.mem_size = 16ull << 20;
	cfg.vcpus = vcpus;
	if (vm_new(&cfg, &vm, &err) < 0)
		fail_msg("vm_new: %s", err.msg);
	return vm;
}

static void expect(int r, int want, const struct vm_error *err, const char *needle)
{
	if (r != want)
		fail_msg("expected %d, got %d (%s)", want, r, err->msg);
	if (!strstr(err->msg, needle))
		fail_msg("message '%s' lacks '%s'", err->msg, needle);
}

/* A minimal valid flat image: header + "mov dx,0x3f8; mov al,'H'; out; hlt; jmp hlt". */
static size_t make_flat(uint8_t *buf, size_t cap)
{
	static const uint8_t code[] = {0xba, 0xf8, 0x03, 0x00, 0x00, 0xb0, 'H', 0xee, 0xf4,
				       0xeb, 0xfd};
	struct ferry_image_hdr h = {
		.magic = FERRY_IMAGE_MAGIC,
		.version = FERRY_IMAGE_VERSION,
		.hdr_size = sizeof(h),
		.load_addr = FERRY_IMAGE_GPA,
		.entry = FERRY_IMAGE_GPA + sizeof(h),
		.file_size = sizeof(h) + sizeof(code),
		.mem_size = sizeof(h) + sizeof(code) + 4096,
	};
	assert_true(cap >= h.file_size);
	memcpy(buf, &h, sizeof(h));
	memcpy(buf + sizeof(h), code, sizeof(code));
	return h.file_size;
}

static void bad_flat_images(void **state)
{
	(void)state;
	struct vm *vm = new_vm(2);
	struct vm_error err = {{0}};
	uint8_t img[256], bad[256];
	size_t len = make_flat(img, sizeof(img));
	struct ferry_image_hdr *h = (struct ferry_image_hdr *)bad;

	expect(vm_load_flat(vm, img, 10, NULL, 0, &err), -EINVAL, &err, "shorter than");
	memcpy(bad, img, len);
	h->magic ^= 1;
	expect(vm_load_flat(vm, bad, len, NULL, 0, &err), -EINVAL, &err, "magic");
	memcpy(bad, img, len);
	h->version = 99;
	expect(vm_load_flat(vm, bad, len, NULL, 0, &err), -EINVAL, &err, "version");
	memcpy(bad, img, len);
	h->file_size = len + 100;
	expect(vm_load_flat(vm, bad, len, NULL, 0, &err), -EINVAL, &err, "file has");
	memcpy(bad, img, len);
	h->entry = 0xdeadbeef;
	expect(vm_load_flat(vm, bad, len, NULL, 0, &err), -EINVAL, &err, "entry point");
	memcpy(bad, img, len);
	h->load_addr = 0;
	expect(vm_load_flat(vm, bad, len, NULL, 0, &err), -EINVAL, &err, "load address");
	memcpy(bad, img, len);
	h->mem_size = 1ull << 40;
	expect(vm_load_flat(vm, bad, len, NULL, 0, &err), -EFBIG, &err, "in memory");
	memcpy(bad, img, len);
	h->mem_size = 1;
	expect(vm_load_flat(vm, bad, len, NULL, 0, &err), -EINVAL, &err, "below its file");

	size_t huge_len = FERRY_IMAGE_MAX + 1;
	uint8_t *huge = calloc(1, huge_len);
	assert_non_null(huge);
	memcpy(huge, img, len);
	expect(vm_load_flat(vm, huge, huge_len, NULL, 0, &err), -EFBIG, &err, "at most");
	free(huge);

	struct ferry_param p = {.value = 1};
	memset(p.key, 'k', sizeof(p.key)); /* not NUL-terminated */
	expect(vm_load_flat(vm, img, len, &p, 1, &err), -EINVAL, &err, "no valid key");

	/* Nothing was written, and the VM still takes a good image and runs it. */
	assert_true(mem_is_zero(vm, 0, FERRY_FREE_GPA));
	assert_int_equal(vm_start(vm), -ENOEXEC);
	assert_int_equal(vm_load_flat(vm, img, len, NULL, 0, &err), 0);
	expect(vm_load_flat(vm, img, len, NULL, 0, &err), -EALREADY, &err, "already");
	assert_int_equal(vm_start(vm), 0);
	char buf[16] = {0};
	uint64_t pos = 0;
	for (int i = 0; i < 200 && vm_console_read(vm, &pos, buf, 2) == 0; i++)
		usleep(10000);
	assert_int_equal(buf[0], 'H');
	vm_free(vm);
}

static void bad_boot_sectors(void **state)
{
	(void)state;
	struct vm_error err = {{0}};
	uint8_t bs[1024] = {0};
	struct vm *vm = new_vm(1);

	expect(vm_load_boot_sector(vm, bs, 600, &err), -EFBIG, &err, "exactly 512");
	expect(vm_load_boot_sector(vm, bs, 100, &err), -EINVAL, &err, "exactly 512");
	expect(vm_load_boot_sector(vm, bs, 512, &err), -EINVAL, &err, "signature");
	assert_true(mem_is_zero(vm, 0, 1 << 20));
	vm_free(vm);

	vm = new_vm(2);
	bs[510] = 0x55;
	bs[511] = 0xaa;
	expect(vm_load_boot_sector(vm, bs, 512, &err), -EINVAL, &err, "1 vCPU");
	vm_free(vm);
}

static void flat_guest_needs_memory(void **state)
{
	(void)state;
	struct vm_config cfg;
	struct vm *vm = NULL;
	struct vm_error err = {{0}};
	uint8_t img[256];
	size_t len = make_flat(img, sizeof(img));
	vm_config_init(&cfg, "small");
	cfg.mem_size = 4ull << 20;
	assert_int_equal(vm_new(&cfg, &vm, &err), 0);
	expect(vm_load_flat(vm, img, len, NULL, 0, &err), -EINVAL, &err, "at least");
	vm_free(vm);
}

int main(void)
{
	tu_require_kvm();
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(bad_flat_images),
		cmocka_unit_test(bad_boot_sectors),
		cmocka_unit_test(flat_guest_needs_memory),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
