// SPDX-License-Identifier: Apache-2.0
/*
 * The table of built-in guests: flat images compiled from agent/vm/guests/ and embedded
 * into libvm by the assembly file guests.cmake generates (.incbin between
 * ferry_guest_<name>_start and _end). The image sizes come from the generated
 * guest_images.h as constants, so the table is const data and needs no initialisation.
 */
#include "vm.h"

#include <string.h>

#include "guest_images.h"

extern const unsigned char ferry_guest_dirtier_start[];
extern const unsigned char ferry_guest_memcheck_start[];
extern const unsigned char ferry_guest_touch_start[];

static const struct vm_builtin_guest builtin_guests[] = {
	{
		.name = "dirtier",
		.help = "writes one word per page of its region per step; params: wss, "
			"pattern=seq|random|hotcold, rate (pages/s per vCPU, 0 = unlimited), "
			"hot_pct (default 10), hot_ratio (default 90)",
		.image = ferry_guest_dirtier_start,
		.size = FERRY_GUEST_DIRTIER_SIZE,
	},
	{
		.name = "memcheck",
		.help = "self-verifying oracle: every pass checks each page's number, generation "
			"and checksum, then rewrites it; params: wss",
		.image = ferry_guest_memcheck_start,
		.size = FERRY_GUEST_MEMCHECK_SIZE,
	},
	{
		.name = "touch",
		.help = "on each host_gen bump writes one byte to every stride-th page from "
			"offset, then reports DONE; params: wss, stride (pages, default 1), "
			"offset (pages, default 0)",
		.image = ferry_guest_touch_start,
		.size = FERRY_GUEST_TOUCH_SIZE,
	},
};

#define NR_BUILTIN (sizeof(builtin_guests) / sizeof(builtin_guests[0]))

const struct vm_builtin_guest *vm_builtin_guest_find(const char *name)
{
	if (!name)
		return NULL;
	for (unsigned i = 0; i < NR_BUILTIN; i++)
		if (!strcmp(builtin_guests[i].name, name))
			return &builtin_guests[i];
	return NULL;
}

unsigned vm_builtin_guest_count(void)
{
	return NR_BUILTIN;
}

const struct vm_builtin_guest *vm_builtin_guest_at(unsigned i)
{
	return i < NR_BUILTIN ? &builtin_guests[i] : NULL;
}
