/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Bounds-checked little-endian encoding and decoding of byte buffers: the primitive under
 * every message ferry puts on the wire (agent-to-agent protocol frames, the serialised vCPU
 * and VM state). A writer grows its buffer; a reader never reads past its end and, once a
 * read fails, stays failed, so a decoder can read a whole record and check once.
 */
#ifndef FERRY_WIRE_H
#define FERRY_WIRE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct wire_writer {
	uint8_t *buf;
	size_t len;
	size_t cap;
	int err; /* first error (-ENOMEM), sticky */
};

struct wire_reader {
	const uint8_t *buf;
	size_t len;
	size_t pos;
	int err; /* -EBADMSG once any read ran past the end, sticky */
};

void wire_writer_init(struct wire_writer *w);
/* Frees the buffer; NULL-safe. */
void wire_writer_release(struct wire_writer *w);
/* Hands the buffer to the caller (who frees it) and resets w. Returns w->err if set. */
int wire_writer_take(struct wire_writer *w, void **ret_buf, size_t *ret_len);
void wire_put_u8(struct wire_writer *w, uint8_t v);
void wire_put_u16(struct wire_writer *w, uint16_t v);
void wire_put_u32(struct wire_writer *w, uint32_t v);
void wire_put_u64(struct wire_writer *w, uint64_t v);
void wire_put_bytes(struct wire_writer *w, const void *p, size_t n);
/* Reserves n bytes and returns where they start (NULL on error); for patching lengths. */
void *wire_reserve(struct wire_writer *w, size_t n);
/* Overwrites a u32 at an offset already written. */
void wire_patch_u32(struct wire_writer *w, size_t off, uint32_t v);

void wire_reader_init(struct wire_reader *r, const void *buf, size_t len);
uint8_t wire_get_u8(struct wire_reader *r);
uint16_t wire_get_u16(struct wire_reader *r);
uint32_t wire_get_u32(struct wire_reader *r);
uint64_t wire_get_u64(struct wire_reader *r);
/* Copies n bytes out; on a short buffer copies nothing and fails. */
void wire_get_bytes(struct wire_reader *r, void *p, size_t n);
/* Returns a pointer to the next n bytes and skips them, or NULL (and fails). */
const void *wire_get_view(struct wire_reader *r, size_t n);
size_t wire_remaining(const struct wire_reader *r);

/* 64-bit FNV-1a, for integrity checks of serialised blobs (not a security measure). */
uint64_t wire_fnv1a64(const void *p, size_t n);

#endif
