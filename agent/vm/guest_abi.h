/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The contract between ferry's VMM and the guests it runs: the guest-physical memory layout
 * of a flat 64-bit guest, the image header, the boot-info page the VMM fills in, and the
 * debug port through which guests report structured results. Included both by the VMM and
 * by the freestanding built-in guests, so it uses only fixed-width types and no libc.
 */
#ifndef FERRY_GUEST_ABI_H
#define FERRY_GUEST_ABI_H

#include <stdint.h>

/* ---- guest-physical layout of a flat 64-bit guest ---- */
#define FERRY_GDT_GPA 0x1000ull
#define FERRY_PML4_GPA 0x2000ull
#define FERRY_PDPT_GPA 0x3000ull
#define FERRY_BOOTINFO_GPA 0x5000ull
#define FERRY_PD_GPA 0x10000ull         /* page directories, one per GiB, 2 MiB pages */
#define FERRY_PD_MAX 128u               /* so flat guests map at most 128 GiB */
#define FERRY_IMAGE_GPA 0x100000ull     /* images load at 1 MiB ... */
#define FERRY_IMAGE_MAX 0x200000ull     /* ... and take at most 2 MiB with bss */
#define FERRY_STACK_GPA 0x300000ull     /* vCPU i's stack: [STACK_GPA + i*STACK_SIZE, +STACK_SIZE) */
#define FERRY_STACK_SIZE 0x4000ull
#define FERRY_FLAT_MAX_VCPUS 64u
#define FERRY_FREE_GPA 0x400000ull      /* guest data starts at 4 MiB */
#define FERRY_FLAT_MIN_MEM 0x800000ull  /* 8 MiB */

/* ---- boot sector guests ---- */
#define FERRY_BOOT_GPA 0x7c00ull
#define FERRY_BOOT_SIZE 512u
#define FERRY_BOOT_MIN_MEM 0x100000ull  /* 1 MiB */

/* ---- flat image header, at offset 0 of the image and loaded at FERRY_IMAGE_GPA ---- */
#define FERRY_IMAGE_MAGIC 0x474d495952524546ull /* "FERRYIMG" little endian */
#define FERRY_IMAGE_VERSION 1u

struct ferry_image_hdr {
	uint64_t magic;
	uint32_t version;
	uint32_t hdr_size;   /* sizeof(struct ferry_image_hdr) */
	uint64_t load_addr;  /* must be FERRY_IMAGE_GPA */
	uint64_t entry;      /* guest-physical entry point, inside the file part */
	uint64_t file_size;  /* bytes of the image file (header included) */
	uint64_t mem_size;   /* bytes occupied in memory, bss included; >= file_size */
};

/* ---- boot info, at FERRY_BOOTINFO_GPA; vCPU entry gets rdi = index, rsi = &bootinfo ---- */
#define FERRY_BOOTINFO_MAGIC 0x4f464e49544f4f42ull /* "BOOTINFO" */
#define FERRY_BOOTINFO_VERSION 1u
#define FERRY_PARAM_KEY_MAX 24u
#define FERRY_PARAM_MAX 32u

struct ferry_param {
	char key[FERRY_PARAM_KEY_MAX]; /* NUL-terminated */
	uint64_t value;
};

struct ferry_bootinfo {
	uint64_t magic;
	uint32_t version;
	uint32_t nr_vcpus;
	uint64_t mem_size;   /* bytes of guest RAM, contiguous from gpa 0 */
	uint64_t free_start; /* first byte the guest may use for data (FERRY_FREE_GPA) */
	uint64_t tsc_khz;    /* guest TSC frequency, for rate control */
	/* Written by the host to wake guests that wait for it (the bench's touch guest). */
	volatile uint64_t host_gen;
	uint32_t nr_params;
	uint32_t reserved;
	struct ferry_param params[FERRY_PARAM_MAX];
};

/* ---- the debug port: `outl` of the guest-physical address of a struct ferry_dbg_rec ---- */
#define FERRY_DEBUG_PORT 0x510
#define FERRY_SERIAL_PORT 0x3f8
#define FERRY_DBG_MAGIC 0x46445247u /* "GRDF" */

enum ferry_dbg_type {
	FERRY_DBG_READY = 1,    /* vCPU started: a0 = region base, a1 = region bytes */
	FERRY_DBG_PROGRESS = 2, /* a0 = passes completed, a1 = pages written in total */
	FERRY_DBG_ERROR = 3,    /* a0 = gpa of the bad page, a1 = enum ferry_dbg_err,
				 * a2 = expected value, a3 = value found */
	FERRY_DBG_SLEEP = 4,    /* host sleeps this vCPU for a0 ns (rate limiting) */
	FERRY_DBG_DONE = 5,     /* a0 = generation finished (touch guest) */
	FERRY_DBG_TYPE_MAX = 5,
};

enum ferry_dbg_err {
	FERRY_ERR_PAGENO = 1,   /* page carries another page's number */
	FERRY_ERR_GEN = 2,      /* page carries a stale or future generation */
	FERRY_ERR_CSUM = 3,     /* page content does not match its checksum (torn) */
	FERRY_ERR_PARAM = 4,    /* bad parameters: a0 = 0, a2/a3 describe */
};

struct ferry_dbg_rec {
	uint32_t magic;
	uint16_t type;
	uint16_t vcpu;
	uint64_t a[4];
};

/* memcheck page layout: the first 32 bytes of each page, the rest is a pattern. */
struct ferry_memcheck_hdr {
	uint64_t page;  /* guest page number (gpa >> 12) */
	uint64_t gen;   /* generation: the pass that wrote it */
	uint64_t csum;  /* checksum of the rest of the page */
	uint64_t vcpu;  /* writer */
};

#endif
