// SPDX-License-Identifier: Apache-2.0
/*
 * touch: the guest for tracker benchmarks and exact dirty-set tests. Each vCPU waits until
 * the host bumps bootinfo->host_gen, then writes one byte into every stride-th page of its
 * region starting at page `offset`, and reports FERRY_DBG_DONE with the generation. Apart
 * from that it writes nothing but its own stack (no console lock, no counters in RAM), so
 * after a generation the set of dirty pages outside the stacks is known exactly:
 * { base + (offset + k*stride) * 4 KiB } for every vCPU.
 *
 * Waiting is a pause loop on host_gen, as the host expects a prompt answer; the pause lets
 * KVM's pause-loop exiting yield the host CPU.
 *
 * Parameters: wss, stride (pages, default 1), offset (pages, default 0, < wss pages).
 * Reports: READY at start, DONE (a0 = generation) after each generation.
 */
#include "guestlib.h"

#define NAME "touch"

static const char *const keys[] = {"wss", "stride", "offset", NULL};

void guest_main(uint32_t idx, struct ferry_bootinfo *bi)
{
	struct g_region reg;
	g_start(idx, bi, NAME, keys);
	g_region_init(idx, bi, NAME, &reg);

	uint64_t stride = g_param_or(bi, "stride", 1);
	uint64_t offset = g_param_or(bi, "offset", 0);
	if (stride < 1 || stride > reg.pages)
		g_param_fail(idx, NAME, "stride", stride, "must be 1..pages in wss");
	if (offset >= reg.pages)
		g_param_fail(idx, NAME, "offset", offset, "must be below the pages in wss");

	g_printf_nolock("%s vcpu %u: %lu KiB at %#lx, stride %lu, offset %lu\n", NAME, idx,
			reg.size >> 10, reg.base, stride, offset);
	g_dbg(FERRY_DBG_READY, idx, reg.base, reg.size, 0, 0);

	/* The host starts generations at 1, so 0 means "nothing asked yet". */
	uint64_t last = 0;
	for (;;) {
		uint64_t gen;
		while ((gen = bi->host_gen) == last)
			g_pause();
		last = gen;
		for (uint64_t pg = offset; pg < reg.pages; pg += stride) {
			uintptr_t page = (uintptr_t)(reg.base + pg * G_PAGE_SIZE);
			*(volatile uint8_t *)page = (uint8_t)gen;
		}
		g_dbg(FERRY_DBG_DONE, idx, gen, 0, 0, 0);
	}
}
