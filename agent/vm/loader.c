// SPDX-License-Identifier: Apache-2.0
/*
 * Guest loaders. A boot sector is copied to 0x7c00 and started in real mode, the way a BIOS
 * would (QEMU's migration tests use such guests). A flat 64-bit image is validated against
 * its struct ferry_image_hdr, copied to 1 MiB, and every vCPU enters long mode directly:
 * the VMM builds identity-mapped page tables (2 MiB pages) and a GDT, so the guest needs no
 * firmware. Everything is validated before guest memory or vCPU state is touched, so a bad
 * image leaves the VM exactly as it was.
 */
#include "vm_internal.h"

#include <errno.h>
#include <stddef.h>
#include <string.h>
#include <sys/ioctl.h>

#define PTE_P 0x1ull
#define PTE_RW 0x2ull
#define PTE_A 0x20ull
#define PTE_D 0x40ull
#define PTE_PS 0x80ull
#define GIB (1ull << 30)

#define CR0_PE (1ull << 0)
#define CR0_MP (1ull << 1)
#define CR0_ET (1ull << 4)
#define CR0_NE (1ull << 5)
#define CR0_WP (1ull << 16)
#define CR0_PG (1ull << 31)
#define CR4_PAE (1ull << 5)
#define CR4_OSFXSR (1ull << 9)
#define CR4_OSXMMEXCPT (1ull << 10)
#define EFER_LME (1ull << 8)
#define EFER_LMA (1ull << 10)

#define SEL_CODE 0x08
#define SEL_DATA 0x10

static int check_loadable(struct vm *vm, struct vm_error *err)
{
	if (vm->loaded)
		return vm_err(err, -EALREADY, "VM %s already has a guest", vm->cfg.name);
	if (vm->run_state != VM_CREATED)
		return vm_err(err, -EBUSY, "VM %s has already run", vm->cfg.name);
	return 0;
}

static int set_mp_runnable(struct vm *vm)
{
	if (!vm->cfg.irqchip)
		return 0;
	/* With an in-kernel LAPIC, secondary vCPUs would wait for a SIPI; start them all. */
	for (unsigned i = 0; i < vm->cfg.vcpus; i++) {
		struct kvm_mp_state mp = {.mp_state = KVM_MP_STATE_RUNNABLE};
		if (ioctl(vm->vcpus[i].fd, KVM_SET_MP_STATE, &mp) < 0)
			return -errno;
	}
	return 0;
}

int vm_load_boot_sector(struct vm *vm, const void *img, size_t len, struct vm_error *err)
{
	const uint8_t *b = img;
	int r = check_loadable(vm, err);
	if (r < 0)
		return r;
	if (len > FERRY_BOOT_SIZE)
		return vm_err(err, -EFBIG, "boot sector is %zu bytes; it must be exactly %u", len,
			      FERRY_BOOT_SIZE);
	if (len < FERRY_BOOT_SIZE)
		return vm_err(err, -EINVAL, "boot sector is %zu bytes; it must be exactly %u", len,
			      FERRY_BOOT_SIZE);
	if (b[510] != 0x55 || b[511] != 0xaa)
		return vm_err(err, -EINVAL, "boot sector lacks the 0x55 0xaa signature");
	if (vm->cfg.mem_size < FERRY_BOOT_MIN_MEM)
		return vm_err(err, -EINVAL, "boot-sector guests need at least 1 MiB of memory");
	if (vm->cfg.vcpus != 1)
		return vm_err(err, -EINVAL, "boot-sector guests run on exactly 1 vCPU, not %u",
			      vm->cfg.vcpus);
	void *dst = vm_gpa_to_hva(vm, FERRY_BOOT_GPA, FERRY_BOOT_SIZE);
	if (!dst)
		return vm_err(err, -EINVAL, "0x7c00 is not inside one memslot");

	struct vcpu *v = &vm->vcpus[0];
	struct kvm_sregs sregs;
	struct kvm_regs regs = {0};
	if (ioctl(v->fd, KVM_GET_SREGS, &sregs) < 0)
		return vm_err(err, -errno, "KVM_GET_SREGS: %s", strerror(errno));
	/* Reset state is CS = f000:fff0; a BIOS would jump to 0000:7c00. */
	sregs.cs.selector = 0;
	sregs.cs.base = 0;
	sregs.ds.selector = sregs.es.selector = sregs.ss.selector = 0;
	sregs.ds.base = sregs.es.base = sregs.ss.base = 0;
	sregs.fs.selector = sregs.gs.selector = 0;
	sregs.fs.base = sregs.gs.base = 0;
	regs.rip = FERRY_BOOT_GPA;
	regs.rsp = FERRY_BOOT_GPA;
	regs.rdx = 0x80; /* boot drive, as a BIOS leaves it */
	regs.rflags = 0x2;
	memcpy(dst, img, FERRY_BOOT_SIZE);
	if (ioctl(v->fd, KVM_SET_SREGS, &sregs) < 0 || ioctl(v->fd, KVM_SET_REGS, &regs) < 0)
		return vm_err(err, -errno, "setting real-mode registers: %s", strerror(errno));
	vm->guest_kind = VM_GUEST_BOOT;
	vm->loaded = true;
	return 0;
}

static int validate_flat(struct vm *vm, const void *img, size_t len,
			 const struct ferry_param *params, unsigned nr_params,
			 struct ferry_image_hdr *ret_hdr, struct vm_error *err)
{
	struct ferry_image_hdr h;

	if (len > FERRY_IMAGE_MAX)
		return vm_err(err, -EFBIG, "image is %zu bytes; flat images are at most %llu", len,
			      (unsigned long long)FERRY_IMAGE_MAX);
	if (len < sizeof(h))
		return vm_err(err, -EINVAL, "image is %zu bytes, shorter than its %zu-byte header",
			      len, sizeof(h));
	memcpy(&h, img, sizeof(h));
	if (h.magic != FERRY_IMAGE_MAGIC)
		return vm_err(err, -EINVAL, "not a ferry flat image (bad magic %#llx)",
			      (unsigned long long)h.magic);
	if (h.version != FERRY_IMAGE_VERSION)
		return vm_err(err, -EINVAL, "image format version %u; this VMM reads version %u",
			      h.version, FERRY_IMAGE_VERSION);
	if (h.hdr_size != sizeof(h))
		return vm_err(err, -EINVAL, "image header size %u, expected %zu", h.hdr_size,
			      sizeof(h));
	if (h.load_addr != FERRY_IMAGE_GPA)
		return vm_err(err, -EINVAL, "image load address %#llx, expected %#llx",
			      (unsigned long long)h.load_addr,
			      (unsigned long long)FERRY_IMAGE_GPA);
	if (h.file_size != len)
		return vm_err(err, -EINVAL, "image header says %llu bytes but the file has %zu",
			      (unsigned long long)h.file_size, len);
	if (h.mem_size < h.file_size)
		return vm_err(err, -EINVAL, "image memory size %llu is below its file size %llu",
			      (unsigned long long)h.mem_size, (unsigned long long)h.file_size);
	if (h.mem_size > FERRY_IMAGE_MAX)
		return vm_err(err, -EFBIG, "image needs %llu bytes in memory; at most %llu",
			      (unsigned long long)h.mem_size, (unsigned long long)FERRY_IMAGE_MAX);
	if (h.entry < h.load_addr + sizeof(h) || h.entry >= h.load_addr + h.file_size)
		return vm_err(err, -EINVAL, "image entry point %#llx is outside its code",
			      (unsigned long long)h.entry);
	if (vm->cfg.mem_size < FERRY_FLAT_MIN_MEM)
		return vm_err(err, -EINVAL, "flat guests need at least %llu MiB of memory",
			      (unsigned long long)(FERRY_FLAT_MIN_MEM >> 20));
	if (vm->cfg.mem_size > FERRY_PD_MAX * GIB)
		return vm_err(err, -E2BIG, "flat guests can map at most %u GiB", FERRY_PD_MAX);
	if (vm->cfg.vcpus > FERRY_FLAT_MAX_VCPUS)
		return vm_err(err, -E2BIG, "flat guests run at most %u vCPUs",
			      FERRY_FLAT_MAX_VCPUS);
	if (nr_params > FERRY_PARAM_MAX)
		return vm_err(err, -E2BIG, "%u guest parameters; at most %u", nr_params,
			      FERRY_PARAM_MAX);
	for (unsigned i = 0; i < nr_params; i++)
		if (memchr(params[i].key, 0, FERRY_PARAM_KEY_MAX) == NULL || !params[i].key[0])
			return vm_err(err, -EINVAL, "guest parameter %u has no valid key", i);
	/* Everything below 4 MiB must be inside one slot for the layout to be written. */
	if (!vm_gpa_to_hva(vm, 0, FERRY_FREE_GPA))
		return vm_err(err, -EINVAL, "the first 4 MiB of guest memory must be in one slot");
	*ret_hdr = h;
	return 0;
}

static void build_page_tables(struct vm *vm)
{
	uint64_t *pml4 = vm_gpa_to_hva(vm, FERRY_PML4_GPA, 4096);
	uint64_t *pdpt = vm_gpa_to_hva(vm, FERRY_PDPT_GPA, 4096);
	unsigned ngib = (unsigned)((vm->cfg.mem_size + GIB - 1) / GIB);
	/* Accessed and dirty bits preset: the CPU then never writes page tables, so they
	 * never show up as dirty guest pages. */
	const uint64_t flags = PTE_P | PTE_RW | PTE_A;

	memset(pml4, 0, 4096);
	memset(pdpt, 0, 4096);
	pml4[0] = FERRY_PDPT_GPA | flags;
	for (unsigned g = 0; g < ngib; g++) {
		uint64_t pd_gpa = FERRY_PD_GPA + g * 4096ull;
		uint64_t *pd = vm_gpa_to_hva(vm, pd_gpa, 4096);
		pdpt[g] = pd_gpa | flags;
		for (unsigned j = 0; j < 512; j++)
			pd[j] = ((uint64_t)g * GIB + (uint64_t)j * (2ull << 20)) | flags | PTE_D |
				PTE_PS;
	}
}

static void build_gdt(struct vm *vm)
{
	uint64_t *gdt = vm_gpa_to_hva(vm, FERRY_GDT_GPA, 4096);
	memset(gdt, 0, 4096);
	/* Accessed bits preset for the same reason as in the page tables. */
	gdt[SEL_CODE / 8] = 0x00af9b000000ffffull; /* 64-bit code, DPL 0 */
	gdt[SEL_DATA / 8] = 0x00cf93000000ffffull; /* data, DPL 0 */
}

static void seg(struct kvm_segment *s, uint16_t sel, uint8_t type, bool code)
{
	memset(s, 0, sizeof(*s));
	s->base = 0;
	s->limit = 0xffffffff;
	s->selector = sel;
	s->type = type;
	s->present = 1;
	s->s = 1;
	s->g = 1;
	s->l = code ? 1 : 0;
	s->db = code ? 0 : 1;
}

static int vcpu_enter_long_mode(struct vm *vm, struct vcpu *v, uint64_t entry)
{
	struct kvm_sregs sregs;
	struct kvm_regs regs = {0};

	if (ioctl(v->fd, KVM_GET_SREGS, &sregs) < 0)
		return -errno;
	seg(&sregs.cs, SEL_CODE, 0xb, true);
	seg(&sregs.ds, SEL_DATA, 0x3, false);
	sregs.es = sregs.fs = sregs.gs = sregs.ss = sregs.ds;
	sregs.gdt.base = FERRY_GDT_GPA;
	sregs.gdt.limit = 3 * 8 - 1;
	sregs.idt.base = 0;
	sregs.idt.limit = 0; /* no IDT: an exception triple-faults and the VM fails */
	sregs.tr.base = 0;
	sregs.tr.limit = 0x67;
	sregs.tr.type = 11; /* busy 64-bit TSS, required for VM entry */
	sregs.tr.present = 1;
	sregs.cr3 = FERRY_PML4_GPA;
	sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
	sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
	sregs.efer = EFER_LME | EFER_LMA;
	(void)vm;

	regs.rip = entry;
	regs.rdi = v->idx;
	regs.rsi = FERRY_BOOTINFO_GPA;
	regs.rsp = FERRY_STACK_GPA + (v->idx + 1ull) * FERRY_STACK_SIZE;
	regs.rflags = 0x2;
	if (ioctl(v->fd, KVM_SET_SREGS, &sregs) < 0 || ioctl(v->fd, KVM_SET_REGS, &regs) < 0)
		return -errno;
	return 0;
}

int vm_load_flat(struct vm *vm, const void *img, size_t len, const struct ferry_param *params,
		 unsigned nr_params, struct vm_error *err)
{
	struct ferry_image_hdr h = {0};
	int r = check_loadable(vm, err);
	if (r < 0)
		return r;
	r = validate_flat(vm, img, len, params, nr_params, &h, err);
	if (r < 0)
		return r;

	uint8_t *dst = vm_gpa_to_hva(vm, FERRY_IMAGE_GPA, h.mem_size);
	memcpy(dst, img, len);
	memset(dst + len, 0, h.mem_size - len);
	build_page_tables(vm);
	build_gdt(vm);

	struct ferry_bootinfo *bi = vm_gpa_to_hva(vm, FERRY_BOOTINFO_GPA, sizeof(*bi));
	memset(bi, 0, sizeof(*bi));
	bi->magic = FERRY_BOOTINFO_MAGIC;
	bi->version = FERRY_BOOTINFO_VERSION;
	bi->nr_vcpus = vm->cfg.vcpus;
	bi->mem_size = vm->cfg.mem_size;
	bi->free_start = FERRY_FREE_GPA;
	bi->tsc_khz = vm->tsc_khz;
	bi->nr_params = nr_params;
	for (unsigned i = 0; i < nr_params; i++)
		bi->params[i] = params[i];

	for (unsigned i = 0; i < vm->cfg.vcpus; i++) {
		r = vcpu_enter_long_mode(vm, &vm->vcpus[i], h.entry);
		if (r < 0)
			return vm_err(err, r, "setting long-mode state of vCPU %u: %s", i,
				      strerror(-r));
	}
	r = set_mp_runnable(vm);
	if (r < 0)
		return vm_err(err, r, "KVM_SET_MP_STATE: %s", strerror(-r));
	vm->bootinfo = bi;
	vm->guest_kind = VM_GUEST_FLAT;
	vm->loaded = true;
	return 0;
}
