// SPDX-License-Identifier: Apache-2.0
/*
 * vCPU and VM state save and restore: everything KVM holds for a paused VM besides guest
 * memory (registers, FPU/XSAVE, MSRs, pending events, LAPIC, in-kernel PIC/IOAPIC/PIT,
 * kvmclock), serialised into the versioned, bounds-checked format of docs/state-format.md
 * with the transport's wire codec. Restore parses and validates the whole blob (framing,
 * checksum, every section's size, presence and shape against the target VM) before it
 * issues a single SET ioctl, so a bad blob leaves the target exactly as it was. The
 * restore order follows QEMU's: sregs, regs, xsave/fpu, xcrs, msrs, events, mp_state,
 * lapic (then the TSC deadline again), debugregs per vCPU, then the VM's interrupt
 * controllers, kvmclock last.
 */
#include "vm_internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>

#include "transport/wire.h"

/* "FERRYVMS" read as a little-endian u64. */
#define STATE_MAGIC 0x534d565952524546ull
#define STATE_VERSION 1u
#define STATE_HDR_SIZE 40u
#define STATE_SEC_HDR_SIZE 12u
/* The vCPU index VM-wide sections carry. */
#define STATE_VCPU_NONE 0xffffffffu

/* Header flags: which optional sections the blob carries. */
#define STATE_F_XSAVE (1u << 0)	  /* every vCPU has XSAVE (else FPU) */
#define STATE_F_XCRS (1u << 1)	  /* every vCPU has XCRS */
#define STATE_F_IRQCHIP (1u << 2) /* in-kernel irqchip: LAPIC per vCPU, PIC x2 + IOAPIC */
#define STATE_F_PIT (1u << 3)	  /* in-kernel PIT */
#define STATE_F_ALL (STATE_F_XSAVE | STATE_F_XCRS | STATE_F_IRQCHIP | STATE_F_PIT)

/*
 * Bounds for variable-sized sections. An XSAVE area is a few KiB even with AMX; 1 MiB
 * only keeps a hostile length from turning into a huge allocation.
 */
#define STATE_XSAVE_MAX (1u << 20)
/* KVM_GET/SET_MSRS refuse nmsrs >= 256 (MAX_IO_MSRS), so MSRs move in chunks. */
#define MSR_CHUNK 255u
#define MSR_IA32_TSC_DEADLINE 0x6e0u

enum sec_type {
	SEC_VM = 1,
	SEC_CLOCK = 2,
	SEC_IRQCHIP = 3,
	SEC_PIT = 4,
	SEC_REGS = 16,
	SEC_SREGS = 17,
	SEC_FPU = 18,
	SEC_XSAVE = 19,
	SEC_XCRS = 20,
	SEC_MSRS = 21,
	SEC_EVENTS = 22,
	SEC_MP_STATE = 23,
	SEC_DEBUGREGS = 24,
	SEC_LAPIC = 25,
};

/* Size of the VM section's payload: vcpus u32, irqchip u32, mem_size u64, tsc_khz u64. */
#define SEC_VM_SIZE 24u
#define NR_IRQCHIPS 3u

/*
 * What each section type is. A section is required exactly when all `need` flags are set
 * and no `unless` flag is; anywhere else it is an error, so a blob cannot smuggle in state
 * its flags do not announce.
 */
struct sec_desc {
	uint32_t type;
	const char *name;
	bool per_vcpu;
	uint32_t size; /* exact payload size; 0 = variable, checked by the section's parser */
	uint32_t need;
	uint32_t unless;
	unsigned count; /* instances per owner (the three irqchips); 1 for the rest */
};

static const struct sec_desc sec_descs[] = {
    {SEC_VM, "VM", false, SEC_VM_SIZE, 0, 0, 1},
    {SEC_CLOCK, "CLOCK", false, sizeof(struct kvm_clock_data), 0, 0, 1},
    {SEC_IRQCHIP, "IRQCHIP", false, sizeof(struct kvm_irqchip), STATE_F_IRQCHIP, 0, NR_IRQCHIPS},
    {SEC_PIT, "PIT", false, sizeof(struct kvm_pit_state2), STATE_F_PIT, 0, 1},
    {SEC_REGS, "REGS", true, sizeof(struct kvm_regs), 0, 0, 1},
    {SEC_SREGS, "SREGS", true, sizeof(struct kvm_sregs), 0, 0, 1},
    {SEC_FPU, "FPU", true, sizeof(struct kvm_fpu), 0, STATE_F_XSAVE, 1},
    {SEC_XSAVE, "XSAVE", true, 0, STATE_F_XSAVE, 0, 1},
    {SEC_XCRS, "XCRS", true, sizeof(struct kvm_xcrs), STATE_F_XCRS, 0, 1},
    {SEC_MSRS, "MSRS", true, 0, 0, 0, 1},
    {SEC_EVENTS, "EVENTS", true, sizeof(struct kvm_vcpu_events), 0, 0, 1},
    {SEC_MP_STATE, "MP_STATE", true, sizeof(struct kvm_mp_state), 0, 0, 1},
    {SEC_DEBUGREGS, "DEBUGREGS", true, sizeof(struct kvm_debugregs), 0, 0, 1},
    {SEC_LAPIC, "LAPIC", true, sizeof(struct kvm_lapic_state), STATE_F_IRQCHIP, 0, 1},
};
#define NR_SEC_DESCS (sizeof(sec_descs) / sizeof(sec_descs[0]))

/* VM-wide slots: one per VM-wide section instance. */
enum { SLOT_VM, SLOT_CLOCK, SLOT_IRQCHIP0, SLOT_PIT = SLOT_IRQCHIP0 + NR_IRQCHIPS, NR_VM_SLOTS };
/* Per-vCPU slots are indexed by type - SEC_REGS. */
#define NR_VCPU_SLOTS (SEC_LAPIC - SEC_REGS + 1)

struct sec_view {
	const uint8_t *p; /* into the caller's blob; may be unaligned, so always memcpy */
	uint32_t len;
	bool present;
};

/* A blob that passed every check, as views into the caller's buffer. */
struct parsed {
	uint32_t flags;
	uint32_t nr_vcpus;
	struct sec_view vm[NR_VM_SLOTS];
	struct sec_view *vcpu; /* nr_vcpus * NR_VCPU_SLOTS */
	/* The VM section, decoded. */
	uint32_t shape_vcpus;
	bool shape_irqchip;
	uint64_t shape_mem;
	uint64_t shape_tsc_khz;
};

/* What this host's KVM offers for the VM; asked once per save or restore. */
struct caps {
	bool xsave;
	bool xcrs;
	uint32_t xsave_size; /* bytes KVM_GET/SET_XSAVE(2) move; >= sizeof(struct kvm_xsave) */
};

static const struct sec_desc *sec_desc_of(uint32_t type)
{
	for (size_t i = 0; i < NR_SEC_DESCS; i++)
		if (sec_descs[i].type == type)
			return &sec_descs[i];
	return NULL;
}

static bool sec_required(const struct sec_desc *d, uint32_t flags)
{
	return (flags & d->need) == d->need && !(flags & d->unless);
}

static int xioctl(int fd, unsigned long req, void *arg)
{
	int r = ioctl(fd, req, arg);
	return r < 0 ? -errno : r;
}

static void caps_probe(const struct vm *vm, struct caps *c)
{
	c->xsave = ioctl(vm->vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_XSAVE) > 0;
	c->xcrs = ioctl(vm->vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_XCRS) > 0;
	c->xsave_size = sizeof(struct kvm_xsave);
	if (c->xsave) {
		/* XSAVE2 reports the full uabi size, which grows past 4 KiB with AMX. */
		int r = ioctl(vm->vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_XSAVE2);
		if (r > (int)sizeof(struct kvm_xsave))
			c->xsave_size = (uint32_t)r;
	}
}

static int check_stopped(const struct vm *vm, const char *what, struct vm_error *err)
{
	enum vm_run_state s = vm_state(vm);
	if (s == VM_FAILED) /* say why: that is what an operator needs from this error */
		return vm_err(err, -EBUSY, "%s needs a paused or never started VM; %s failed: %.160s",
			      what, vm->cfg.name, vm_failure(vm));
	if (s != VM_PAUSED && s != VM_CREATED)
		return vm_err(err, -EBUSY, "%s needs a paused or never started VM; %s is %s", what,
			      vm->cfg.name, vm_run_state_name(s));
	return 0;
}

/* ---- save ---- */

static void put_section(struct wire_writer *w, uint32_t type, uint32_t vcpu, const void *p,
			uint32_t len)
{
	wire_put_u32(w, type);
	wire_put_u32(w, vcpu);
	wire_put_u32(w, len);
	wire_put_bytes(w, p, len);
}

/*
 * The MSRs KVM says a VMM should save. Not all of them are readable on every host (VMX
 * MSRs on AMD, for instance); read_msrs() drops those.
 */
static int msr_index_list(const struct vm *vm, struct kvm_msr_list **ret, struct vm_error *err)
{
	struct kvm_msr_list probe = {.nmsrs = 0};
	int r = xioctl(vm->kvm_fd, KVM_GET_MSR_INDEX_LIST, &probe);
	if (r < 0 && r != -E2BIG)
		return vm_err(err, r, "KVM_GET_MSR_INDEX_LIST: %s", strerror(-r));
	/* Asked again with room for them: the list does not change while KVM is loaded. */
	uint32_t n = probe.nmsrs;
	struct kvm_msr_list *l = calloc(1, sizeof(*l) + n * sizeof(uint32_t));
	if (!l)
		return vm_err(err, -ENOMEM, "out of memory for %u MSR indices", n);
	l->nmsrs = n;
	r = xioctl(vm->kvm_fd, KVM_GET_MSR_INDEX_LIST, l);
	if (r < 0) {
		free(l);
		return vm_err(err, r, "KVM_GET_MSR_INDEX_LIST: %s", strerror(-r));
	}
	*ret = l;
	return 0;
}

/*
 * Reads MSRs idx[0..*n) of one vCPU into val[]. KVM_GET_MSRS returns how many it read and
 * stops at the first one it cannot: that one is dropped from idx[] (compacted in place)
 * and the read goes on after it. So the first vCPU filters the list and the others, which
 * normally read all of it in one go, reuse the filtered list.
 */
static int read_msrs(int fd, uint32_t *idx, uint64_t *val, uint32_t *n, struct kvm_msrs *buf)
{
	uint32_t kept = 0, pos = 0;
	while (pos < *n) {
		uint32_t chunk = *n - pos < MSR_CHUNK ? *n - pos : MSR_CHUNK;
		memset(buf, 0, sizeof(*buf) + chunk * sizeof(buf->entries[0]));
		buf->nmsrs = chunk;
		for (uint32_t i = 0; i < chunk; i++)
			buf->entries[i].index = idx[pos + i];
		int r = xioctl(fd, KVM_GET_MSRS, buf);
		if (r < 0)
			return r;
		if ((uint32_t)r > chunk)
			return -EIO;
		/* kept <= pos, so compacting never overwrites an index not yet read. */
		for (uint32_t i = 0; i < (uint32_t)r; i++) {
			idx[kept] = buf->entries[i].index;
			val[kept] = buf->entries[i].data;
			kept++;
		}
		pos += (uint32_t)r;
		if ((uint32_t)r < chunk)
			pos++; /* idx[pos - 1] is unreadable: skip it */
	}
	*n = kept;
	return 0;
}

static int save_vcpu(struct vm *vm, unsigned i, const struct caps *c, uint32_t *msr_idx,
		     uint32_t *nr_msrs, uint64_t *msr_val, struct kvm_msrs *msr_buf,
		     void *xsave_buf, struct wire_writer *w, struct vm_error *err)
{
	int fd = vm->vcpus[i].fd;
	int r;
	/* Stack buffers for the fixed-size structs; sizes are a few hundred bytes. */
	union {
		struct kvm_regs regs;
		struct kvm_sregs sregs;
		struct kvm_fpu fpu;
		struct kvm_xcrs xcrs;
		struct kvm_vcpu_events events;
		struct kvm_mp_state mp;
		struct kvm_debugregs dbg;
		struct kvm_lapic_state lapic;
	} u;

#define SAVE_FIXED(ioc, field, type)                                                               \
	do {                                                                                       \
		memset(&u, 0, sizeof(u));                                                          \
		r = xioctl(fd, ioc, &u.field);                                                     \
		if (r < 0)                                                                         \
			return vm_err(err, r, "vCPU %u: " #ioc ": %s", i, strerror(-r));           \
		put_section(w, type, i, &u.field, sizeof(u.field));                                \
	} while (0)

	SAVE_FIXED(KVM_GET_REGS, regs, SEC_REGS);
	SAVE_FIXED(KVM_GET_SREGS, sregs, SEC_SREGS);
	if (c->xsave) {
		memset(xsave_buf, 0, c->xsave_size);
		/* KVM_GET_XSAVE copies only 4 KiB; anything bigger needs XSAVE2. */
		unsigned long ioc =
		    c->xsave_size > sizeof(struct kvm_xsave) ? KVM_GET_XSAVE2 : KVM_GET_XSAVE;
		r = xioctl(fd, ioc, xsave_buf);
		if (r < 0)
			return vm_err(err, r, "vCPU %u: KVM_GET_XSAVE%s: %s", i,
				      ioc == KVM_GET_XSAVE2 ? "2" : "", strerror(-r));
		put_section(w, SEC_XSAVE, i, xsave_buf, c->xsave_size);
	} else {
		SAVE_FIXED(KVM_GET_FPU, fpu, SEC_FPU);
	}
	if (c->xcrs)
		SAVE_FIXED(KVM_GET_XCRS, xcrs, SEC_XCRS);

	r = read_msrs(fd, msr_idx, msr_val, nr_msrs, msr_buf);
	if (r < 0)
		return vm_err(err, r, "vCPU %u: KVM_GET_MSRS: %s", i, strerror(-r));
	wire_put_u32(w, SEC_MSRS);
	wire_put_u32(w, i);
	wire_put_u32(w, 8 + *nr_msrs * 16);
	wire_put_u32(w, *nr_msrs);
	wire_put_u32(w, 0);
	for (uint32_t m = 0; m < *nr_msrs; m++) {
		wire_put_u32(w, msr_idx[m]);
		wire_put_u32(w, 0);
		wire_put_u64(w, msr_val[m]);
	}

	SAVE_FIXED(KVM_GET_VCPU_EVENTS, events, SEC_EVENTS);
	SAVE_FIXED(KVM_GET_MP_STATE, mp, SEC_MP_STATE);
	SAVE_FIXED(KVM_GET_DEBUGREGS, dbg, SEC_DEBUGREGS);
	if (vm->cfg.irqchip)
		SAVE_FIXED(KVM_GET_LAPIC, lapic, SEC_LAPIC);
#undef SAVE_FIXED
	return 0;
}

/* The VM-wide sections: shape, interrupt controllers, kvmclock. */
static int save_vm_wide(struct vm *vm, uint32_t flags, struct wire_writer *w, struct vm_error *err)
{
	int r;
	wire_put_u32(w, SEC_VM);
	wire_put_u32(w, STATE_VCPU_NONE);
	wire_put_u32(w, SEC_VM_SIZE);
	wire_put_u32(w, vm->cfg.vcpus);
	wire_put_u32(w, vm->cfg.irqchip ? 1 : 0);
	wire_put_u64(w, vm->cfg.mem_size);
	wire_put_u64(w, vm->tsc_khz);

	if (flags & STATE_F_IRQCHIP) {
		for (uint32_t chip = 0; chip < NR_IRQCHIPS; chip++) {
			struct kvm_irqchip ic;
			memset(&ic, 0, sizeof(ic));
			ic.chip_id = chip;
			r = xioctl(vm->vm_fd, KVM_GET_IRQCHIP, &ic);
			if (r < 0)
				return vm_err(err, r, "KVM_GET_IRQCHIP %u: %s", chip, strerror(-r));
			put_section(w, SEC_IRQCHIP, STATE_VCPU_NONE, &ic, sizeof(ic));
		}
	}
	if (flags & STATE_F_PIT) {
		struct kvm_pit_state2 pit;
		memset(&pit, 0, sizeof(pit));
		r = xioctl(vm->vm_fd, KVM_GET_PIT2, &pit);
		if (r < 0)
			return vm_err(err, r, "KVM_GET_PIT2: %s", strerror(-r));
		put_section(w, SEC_PIT, STATE_VCPU_NONE, &pit, sizeof(pit));
	}

	struct kvm_clock_data clock;
	memset(&clock, 0, sizeof(clock));
	r = xioctl(vm->vm_fd, KVM_GET_CLOCK, &clock);
	if (r < 0)
		return vm_err(err, r, "KVM_GET_CLOCK: %s", strerror(-r));
	put_section(w, SEC_CLOCK, STATE_VCPU_NONE, &clock, sizeof(clock));
	return 0;
}

/* Whether this VM has an in-kernel PIT (the VMM may or may not have made one). */
static bool has_pit(const struct vm *vm)
{
	struct kvm_pit_state2 pit;
	memset(&pit, 0, sizeof(pit));
	return ioctl(vm->vm_fd, KVM_GET_PIT2, &pit) == 0;
}

int vm_state_save(struct vm *vm, void **ret_blob, size_t *ret_len, struct vm_error *err)
{
	int r = check_stopped(vm, "state save", err);
	if (r < 0)
		return r;

	struct caps c;
	caps_probe(vm, &c);
	uint32_t flags = 0;
	if (c.xsave)
		flags |= STATE_F_XSAVE;
	if (c.xcrs)
		flags |= STATE_F_XCRS;
	if (vm->cfg.irqchip)
		flags |= STATE_F_IRQCHIP;
	if (has_pit(vm))
		flags |= STATE_F_PIT;

	struct kvm_msr_list *msrs = NULL;
	uint64_t *msr_val = NULL;
	struct kvm_msrs *msr_buf = NULL;
	void *xsave_buf = NULL;
	struct wire_writer payload, out;
	wire_writer_init(&payload);
	wire_writer_init(&out);

	/* The filtered MSR list lives for this call only: hosts (and KVM reloads) differ. */
	r = msr_index_list(vm, &msrs, err);
	if (r < 0)
		goto out_free;
	msr_val = calloc(msrs->nmsrs ? msrs->nmsrs : 1, sizeof(*msr_val));
	msr_buf = calloc(1, sizeof(*msr_buf) + MSR_CHUNK * sizeof(msr_buf->entries[0]));
	xsave_buf = calloc(1, c.xsave_size);
	if (!msr_val || !msr_buf || !xsave_buf) {
		r = vm_err(err, -ENOMEM, "out of memory for state buffers");
		goto out_free;
	}

	r = save_vm_wide(vm, flags, &payload, err);
	if (r < 0)
		goto out_free;
	for (unsigned i = 0; i < vm->cfg.vcpus; i++) {
		r = save_vcpu(vm, i, &c, msrs->indices, &msrs->nmsrs, msr_val, msr_buf, xsave_buf,
			      &payload, err);
		if (r < 0)
			goto out_free;
	}
	if (payload.err) {
		r = vm_err(err, payload.err, "encoding state: %s", strerror(-payload.err));
		goto out_free;
	}

	wire_put_u64(&out, STATE_MAGIC);
	wire_put_u32(&out, STATE_VERSION);
	wire_put_u32(&out, flags);
	wire_put_u32(&out, vm->cfg.vcpus);
	wire_put_u32(&out, 0);
	wire_put_u64(&out, payload.len);
	wire_put_u64(&out, wire_fnv1a64(payload.buf, payload.len));
	wire_put_bytes(&out, payload.buf, payload.len);
	void *blob;
	size_t len;
	r = wire_writer_take(&out, &blob, &len);
	if (r < 0) {
		r = vm_err(err, r, "encoding state: %s", strerror(-r));
		goto out_free;
	}
	*ret_blob = blob;
	*ret_len = len;
	r = 0;

out_free:
	wire_writer_release(&out);
	wire_writer_release(&payload);
	free(xsave_buf);
	free(msr_buf);
	free(msr_val);
	free(msrs);
	return r;
}

/* ---- parse and validate ---- */

static struct sec_view *vcpu_slot(struct parsed *p, uint32_t vcpu, uint32_t type)
{
	return &p->vcpu[(size_t)vcpu * NR_VCPU_SLOTS + (type - SEC_REGS)];
}

/* Content checks for one section whose size already matched its type. */
static int check_section(struct parsed *p, const struct sec_desc *d, uint32_t vcpu,
			 const uint8_t *pl, uint32_t len, struct sec_view **ret_slot,
			 struct vm_error *err)
{
	struct wire_reader r;
	wire_reader_init(&r, pl, len);

	switch (d->type) {
	case SEC_VM: {
		p->shape_vcpus = wire_get_u32(&r);
		uint32_t irqchip = wire_get_u32(&r);
		p->shape_mem = wire_get_u64(&r);
		p->shape_tsc_khz = wire_get_u64(&r);
		if (irqchip > 1 || !irqchip != !(p->flags & STATE_F_IRQCHIP))
			return vm_err(
			    err, -EBADMSG,
			    "corrupt state: VM section irqchip=%u disagrees with flags 0x%x",
			    irqchip, p->flags);
		if (p->shape_vcpus != p->nr_vcpus)
			return vm_err(err, -EBADMSG,
				      "corrupt state: VM section says %u vCPUs, header %u",
				      p->shape_vcpus, p->nr_vcpus);
		p->shape_irqchip = irqchip;
		*ret_slot = &p->vm[SLOT_VM];
		return 0;
	}
	case SEC_CLOCK:
		*ret_slot = &p->vm[SLOT_CLOCK];
		return 0;
	case SEC_PIT:
		*ret_slot = &p->vm[SLOT_PIT];
		return 0;
	case SEC_IRQCHIP: {
		/* Which chip it is rides inside the payload (struct kvm_irqchip.chip_id). */
		uint32_t chip = wire_get_u32(&r);
		if (chip >= NR_IRQCHIPS)
			return vm_err(err, -EBADMSG, "corrupt state: irqchip id %u", chip);
		*ret_slot = &p->vm[SLOT_IRQCHIP0 + chip];
		return 0;
	}
	case SEC_XSAVE:
		if (len < sizeof(struct kvm_xsave) || len > STATE_XSAVE_MAX || len % 4)
			return vm_err(err, -EBADMSG,
				      "corrupt state: vCPU %u XSAVE section of %u bytes", vcpu,
				      len);
		break;
	case SEC_XCRS: {
		uint32_t nr = wire_get_u32(&r);
		if (nr > KVM_MAX_XCRS)
			return vm_err(err, -EBADMSG, "corrupt state: vCPU %u has %u XCRs", vcpu,
				      nr);
		break;
	}
	case SEC_MSRS: {
		uint32_t nr = wire_get_u32(&r);
		uint32_t pad = wire_get_u32(&r);
		if (r.err || pad || (len - 8) / 16 != nr || (len - 8) % 16)
			return vm_err(err, -EBADMSG,
				      "corrupt state: vCPU %u MSR section of %u bytes for %u MSRs",
				      vcpu, len, nr);
		for (uint32_t m = 0; m < nr; m++) {
			wire_get_u32(&r);
			if (wire_get_u32(&r))
				return vm_err(err, -EBADMSG,
					      "corrupt state: vCPU %u MSR %u reserved field set",
					      vcpu, m);
			wire_get_u64(&r);
		}
		break;
	}
	default:
		break;
	}
	if (r.err)
		return vm_err(err, -EBADMSG, "corrupt state: %s section of vCPU %u too short",
			      d->name, vcpu);
	*ret_slot = vcpu_slot(p, vcpu, d->type);
	return 0;
}

static int parse_sections(struct parsed *p, struct wire_reader *r, struct vm_error *err)
{
	while (wire_remaining(r) > 0) {
		size_t off = r->pos;
		uint32_t type = wire_get_u32(r);
		uint32_t vcpu = wire_get_u32(r);
		uint32_t len = wire_get_u32(r);
		if (r->err)
			return vm_err(err, -EBADMSG,
				      "truncated state: section header at offset %zu cut short",
				      off);
		const struct sec_desc *d = sec_desc_of(type);
		if (!d)
			return vm_err(err, -EBADMSG,
				      "corrupt state: unknown section type %u at offset %zu", type,
				      off);
		if (len > wire_remaining(r))
			return vm_err(
			    err, -EBADMSG,
			    "truncated state: %s section at offset %zu claims %u bytes, %zu remain",
			    d->name, off, len, wire_remaining(r));
		if (d->size && len != d->size)
			return vm_err(
			    err, -EBADMSG,
			    "corrupt state: %s section at offset %zu has %u bytes, expected %u",
			    d->name, off, len, d->size);
		if (d->per_vcpu ? vcpu >= p->nr_vcpus : vcpu != STATE_VCPU_NONE)
			return vm_err(err, -EBADMSG,
				      "corrupt state: %s section at offset %zu for vCPU %u (of %u)",
				      d->name, off, vcpu, p->nr_vcpus);
		if (!sec_required(d, p->flags))
			return vm_err(
			    err, -EBADMSG,
			    "corrupt state: %s section at offset %zu not expected with flags 0x%x",
			    d->name, off, p->flags);
		const uint8_t *pl = wire_get_view(r, len);
		struct sec_view *slot = NULL;
		int e = check_section(p, d, vcpu, pl, len, &slot, err);
		if (e < 0)
			return e;
		if (slot->present)
			return vm_err(err, -EBADMSG,
				      "corrupt state: duplicate %s section at offset %zu (vCPU %u)",
				      d->name, off, vcpu);
		*slot = (struct sec_view){.p = pl, .len = len, .present = true};
	}
	if (r->err)
		return vm_err(err, -EBADMSG, "truncated state");

	/* Every section the flags call for, for every owner. */
	for (size_t i = 0; i < NR_SEC_DESCS; i++) {
		const struct sec_desc *d = &sec_descs[i];
		if (!sec_required(d, p->flags))
			continue;
		if (d->per_vcpu) {
			for (uint32_t v = 0; v < p->nr_vcpus; v++)
				if (!vcpu_slot(p, v, d->type)->present)
					return vm_err(err, -EBADMSG,
						      "truncated state: vCPU %u has no %s section",
						      v, d->name);
			continue;
		}
		unsigned first = d->type == SEC_VM	  ? SLOT_VM
				 : d->type == SEC_CLOCK	  ? SLOT_CLOCK
				 : d->type == SEC_IRQCHIP ? SLOT_IRQCHIP0
							  : SLOT_PIT;
		for (unsigned k = 0; k < d->count; k++)
			if (!p->vm[first + k].present)
				return vm_err(err, -EBADMSG, "truncated state: no %s section%s",
					      d->name, d->count > 1 ? " (of several)" : "");
	}
	return 0;
}

/* Framing, version, checksum and sections; nothing about the target VM yet. */
static int parse_blob(const void *blob, size_t len, struct parsed *p, struct vm_error *err)
{
	struct wire_reader r;
	memset(p, 0, sizeof(*p));
	if (!blob || len < STATE_HDR_SIZE)
		return vm_err(err, -EBADMSG, "truncated state: %zu bytes, the header alone is %u",
			      blob ? len : 0, STATE_HDR_SIZE);
	wire_reader_init(&r, blob, len);
	uint64_t magic = wire_get_u64(&r);
	uint32_t version = wire_get_u32(&r);
	p->flags = wire_get_u32(&r);
	p->nr_vcpus = wire_get_u32(&r);
	uint32_t reserved = wire_get_u32(&r);
	uint64_t payload_len = wire_get_u64(&r);
	uint64_t csum = wire_get_u64(&r);

	if (magic != STATE_MAGIC)
		return vm_err(err, -EBADMSG, "not a ferry state blob (magic 0x%016llx)",
			      (unsigned long long)magic);
	/* Checked before anything version-specific: a v2 header may mean other things. */
	if (version != STATE_VERSION)
		return vm_err(err, -EPROTONOSUPPORT,
			      "state format version %u, this ferry reads version %u", version,
			      STATE_VERSION);
	if (p->flags & ~STATE_F_ALL)
		return vm_err(err, -EBADMSG, "corrupt state: unknown flags 0x%x", p->flags);
	if (reserved)
		return vm_err(err, -EBADMSG, "corrupt state: reserved header field 0x%x", reserved);
	if (payload_len != len - STATE_HDR_SIZE)
		return vm_err(
		    err, -EBADMSG,
		    "truncated or corrupt state: header announces %llu payload bytes, blob has %zu",
		    (unsigned long long)payload_len, len - STATE_HDR_SIZE);
	const uint8_t *payload = (const uint8_t *)blob + STATE_HDR_SIZE;
	uint64_t actual = wire_fnv1a64(payload, payload_len);
	if (actual != csum)
		return vm_err(err, -EBADMSG,
			      "corrupt state: checksum 0x%016llx, payload hashes to 0x%016llx",
			      (unsigned long long)csum, (unsigned long long)actual);
	if (p->nr_vcpus == 0 || p->nr_vcpus > VM_MAX_VCPUS)
		return vm_err(err, -EBADMSG, "corrupt state: %u vCPUs", p->nr_vcpus);

	p->vcpu = calloc((size_t)p->nr_vcpus * NR_VCPU_SLOTS, sizeof(*p->vcpu));
	if (!p->vcpu)
		return vm_err(err, -ENOMEM, "out of memory parsing state");
	wire_reader_init(&r, payload, payload_len);
	return parse_sections(p, &r, err);
}

/* Whether the parsed blob fits this VM on this host. */
static int check_shape(const struct vm *vm, const struct parsed *p, const struct caps *c,
		       struct vm_error *err)
{
	if (p->shape_vcpus != vm->cfg.vcpus)
		return vm_err(err, -EINVAL, "state is for %u vCPUs, VM %s has %u", p->shape_vcpus,
			      vm->cfg.name, vm->cfg.vcpus);
	if (p->shape_mem != vm->cfg.mem_size)
		return vm_err(err, -EINVAL, "state is for %llu bytes of memory, VM %s has %llu",
			      (unsigned long long)p->shape_mem, vm->cfg.name,
			      (unsigned long long)vm->cfg.mem_size);
	if (p->shape_irqchip != vm->cfg.irqchip)
		return vm_err(err, -EINVAL, "state is for a VM %s in-kernel irqchip, VM %s %s",
			      p->shape_irqchip ? "with" : "without", vm->cfg.name,
			      vm->cfg.irqchip ? "has one" : "has none");
	if ((p->flags & STATE_F_XSAVE) && !c->xsave)
		return vm_err(err, -EINVAL, "state carries XSAVE, this host's KVM has none");
	if ((p->flags & STATE_F_XCRS) && !c->xcrs)
		return vm_err(err, -EINVAL, "state carries XCRs, this host's KVM has none");
	if ((p->flags & STATE_F_PIT) && !has_pit(vm))
		return vm_err(err, -EINVAL, "state carries a PIT, VM %s has none", vm->cfg.name);
	for (uint32_t v = 0; v < p->nr_vcpus && (p->flags & STATE_F_XSAVE); v++) {
		uint32_t l = p->vcpu[(size_t)v * NR_VCPU_SLOTS + (SEC_XSAVE - SEC_REGS)].len;
		if (l > c->xsave_size)
			return vm_err(err, -EINVAL,
				      "vCPU %u XSAVE area is %u bytes, this host's KVM takes %u", v,
				      l, c->xsave_size);
	}
	return 0;
}

/* ---- restore ---- */

/*
 * KVM_SET_MSRS also stops at the first MSR it refuses and returns how many it set; skip
 * that one and go on, so one MSR this host does not take costs only itself.
 */
static int write_msrs(int fd, const struct sec_view *s, struct kvm_msrs *buf, unsigned *skipped)
{
	struct wire_reader r;
	wire_reader_init(&r, s->p, s->len);
	uint32_t n = wire_get_u32(&r);
	wire_get_u32(&r);
	uint32_t pos = 0;
	while (pos < n) {
		uint32_t chunk = n - pos < MSR_CHUNK ? n - pos : MSR_CHUNK;
		memset(buf, 0, sizeof(*buf) + chunk * sizeof(buf->entries[0]));
		buf->nmsrs = chunk;
		/* Entry pos+i sits at 8 + 16 * (pos+i) in the section. */
		wire_reader_init(&r, s->p + 8 + (size_t)pos * 16, (size_t)chunk * 16);
		for (uint32_t i = 0; i < chunk; i++) {
			buf->entries[i].index = wire_get_u32(&r);
			wire_get_u32(&r);
			buf->entries[i].data = wire_get_u64(&r);
		}
		int e = xioctl(fd, KVM_SET_MSRS, buf);
		if (e < 0)
			return e;
		if ((uint32_t)e > chunk)
			return -EIO;
		pos += (uint32_t)e;
		if ((uint32_t)e < chunk) {
			pos++;
			(*skipped)++;
		}
	}
	return 0;
}

/*
 * KVM drops a TSC-deadline MSR write while the LAPIC timer is not in deadline mode, which
 * it is not before KVM_SET_LAPIC; so, like QEMU, write that one MSR again after the LAPIC.
 */
static int rewrite_tsc_deadline(int fd, const struct sec_view *s, struct kvm_msrs *buf,
				unsigned *skipped)
{
	struct wire_reader r;
	wire_reader_init(&r, s->p, s->len);
	uint32_t n = wire_get_u32(&r);
	wire_get_u32(&r);
	for (uint32_t m = 0; m < n; m++) {
		uint32_t index = wire_get_u32(&r);
		wire_get_u32(&r);
		uint64_t data = wire_get_u64(&r);
		if (index != MSR_IA32_TSC_DEADLINE)
			continue;
		memset(buf, 0, sizeof(*buf) + sizeof(buf->entries[0]));
		buf->nmsrs = 1;
		buf->entries[0].index = index;
		buf->entries[0].data = data;
		int e = xioctl(fd, KVM_SET_MSRS, buf);
		if (e < 0)
			return e;
		if (e != 1)
			(*skipped)++;
		break;
	}
	return 0;
}

static int restore_vcpu(struct vm *vm, unsigned i, struct parsed *p, const struct caps *c,
			struct kvm_msrs *msr_buf, void *xsave_buf, unsigned *skipped,
			struct vm_error *err)
{
	int fd = vm->vcpus[i].fd;
	int r;
	union {
		struct kvm_regs regs;
		struct kvm_sregs sregs;
		struct kvm_fpu fpu;
		struct kvm_xcrs xcrs;
		struct kvm_vcpu_events events;
		struct kvm_mp_state mp;
		struct kvm_debugregs dbg;
		struct kvm_lapic_state lapic;
	} u;

	/* Copies out of the (maybe unaligned) blob into an aligned struct, then sets it. */
#define RESTORE_FIXED(ioc, field, type, fixup)                                                     \
	do {                                                                                       \
		const struct sec_view *s = vcpu_slot(p, i, type);                                  \
		memset(&u, 0, sizeof(u));                                                          \
		memcpy(&u.field, s->p, sizeof(u.field));                                           \
		fixup;                                                                             \
		r = xioctl(fd, ioc, &u.field);                                                     \
		if (r < 0)                                                                         \
			return vm_err(err, r, "vCPU %u: " #ioc ": %s", i, strerror(-r));           \
	} while (0)

	RESTORE_FIXED(KVM_SET_SREGS, sregs, SEC_SREGS, );
	RESTORE_FIXED(KVM_SET_REGS, regs, SEC_REGS, );
	if (p->flags & STATE_F_XSAVE) {
		const struct sec_view *s = vcpu_slot(p, i, SEC_XSAVE);
		/* KVM reads its full uabi size; a smaller area from the source is padded
		 * with zeros, which XSTATE_BV marks as components in their init state. */
		memset(xsave_buf, 0, c->xsave_size);
		memcpy(xsave_buf, s->p, s->len);
		r = xioctl(fd, KVM_SET_XSAVE, xsave_buf);
		if (r < 0)
			return vm_err(err, r, "vCPU %u: KVM_SET_XSAVE: %s", i, strerror(-r));
	} else {
		RESTORE_FIXED(KVM_SET_FPU, fpu, SEC_FPU, );
	}
	if (p->flags & STATE_F_XCRS)
		RESTORE_FIXED(KVM_SET_XCRS, xcrs, SEC_XCRS, );
	r = write_msrs(fd, vcpu_slot(p, i, SEC_MSRS), msr_buf, skipped);
	if (r < 0)
		return vm_err(err, r, "vCPU %u: KVM_SET_MSRS: %s", i, strerror(-r));
	/* GET leaves these two validity flags clear; without them SET would drop a pending
	 * NMI and the SIPI vector (QEMU sets them the same way). */
	RESTORE_FIXED(KVM_SET_VCPU_EVENTS, events, SEC_EVENTS,
		      u.events.flags |=
		      KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR);
	RESTORE_FIXED(KVM_SET_MP_STATE, mp, SEC_MP_STATE, );
	if (p->flags & STATE_F_IRQCHIP) {
		RESTORE_FIXED(KVM_SET_LAPIC, lapic, SEC_LAPIC, );
		r = rewrite_tsc_deadline(fd, vcpu_slot(p, i, SEC_MSRS), msr_buf, skipped);
		if (r < 0)
			return vm_err(err, r, "vCPU %u: KVM_SET_MSRS (TSC deadline): %s", i,
				      strerror(-r));
	}
	RESTORE_FIXED(KVM_SET_DEBUGREGS, dbg, SEC_DEBUGREGS, );
#undef RESTORE_FIXED
	return 0;
}

static int restore_vm_wide(struct vm *vm, const struct parsed *p, struct vm_error *err)
{
	int r;
	if (p->flags & STATE_F_IRQCHIP) {
		for (unsigned k = 0; k < NR_IRQCHIPS; k++) {
			struct kvm_irqchip ic;
			memcpy(&ic, p->vm[SLOT_IRQCHIP0 + k].p, sizeof(ic));
			r = xioctl(vm->vm_fd, KVM_SET_IRQCHIP, &ic);
			if (r < 0)
				return vm_err(err, r, "KVM_SET_IRQCHIP %u: %s", ic.chip_id,
					      strerror(-r));
		}
	}
	if (p->flags & STATE_F_PIT) {
		struct kvm_pit_state2 pit;
		memcpy(&pit, p->vm[SLOT_PIT].p, sizeof(pit));
		r = xioctl(vm->vm_fd, KVM_SET_PIT2, &pit);
		if (r < 0)
			return vm_err(err, r, "KVM_SET_PIT2: %s", strerror(-r));
	}

	/*
	 * kvmclock last, as QEMU does. Only KVM_CLOCK_REALTIME means anything to SET: with
	 * it KVM adds the wall time that passed since the save, so the guest's clock covers
	 * the downtime instead of stopping for it.
	 */
	struct kvm_clock_data clock;
	memcpy(&clock, p->vm[SLOT_CLOCK].p, sizeof(clock));
	clock.flags &= KVM_CLOCK_REALTIME;
	r = xioctl(vm->vm_fd, KVM_SET_CLOCK, &clock);
	if (r < 0)
		return vm_err(err, r, "KVM_SET_CLOCK: %s", strerror(-r));
	return 0;
}

int vm_state_restore(struct vm *vm, const void *blob, size_t len, struct vm_error *err)
{
	int r = check_stopped(vm, "state restore", err);
	if (r < 0)
		return r;

	struct parsed p;
	struct caps c;
	struct kvm_msrs *msr_buf = NULL;
	void *xsave_buf = NULL;
	unsigned skipped = 0;

	r = parse_blob(blob, len, &p, err);
	if (r < 0)
		goto out_free;
	caps_probe(vm, &c);
	r = check_shape(vm, &p, &c, err);
	if (r < 0)
		goto out_free;

	msr_buf = calloc(1, sizeof(*msr_buf) + MSR_CHUNK * sizeof(msr_buf->entries[0]));
	xsave_buf = calloc(1, c.xsave_size);
	if (!msr_buf || !xsave_buf) {
		r = vm_err(err, -ENOMEM, "out of memory for state buffers");
		goto out_free;
	}

	/* From here on the blob is known good; a failure now is KVM refusing a value. */
	for (unsigned i = 0; i < vm->cfg.vcpus; i++) {
		r = restore_vcpu(vm, i, &p, &c, msr_buf, xsave_buf, &skipped, err);
		if (r < 0)
			goto out_free;
	}
	r = restore_vm_wide(vm, &p, err);
	if (r < 0)
		goto out_free;

	/* vm_start() reads loaded under the lock. */
	pthread_mutex_lock(&vm->lock);
	vm->loaded = true;
	pthread_mutex_unlock(&vm->lock);
	/* The count of MSRs this host refused, for the caller to log. */
	r = (int)skipped;

out_free:
	free(xsave_buf);
	free(msr_buf);
	free(p.vcpu);
	return r;
}
