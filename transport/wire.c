// SPDX-License-Identifier: Apache-2.0
/*
 * Bounds-checked little-endian byte codec (see wire.h). Errors are sticky so that decoders
 * read a record field by field and check r->err once at the end.
 */
#include "transport/wire.h"

#include <endian.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

void wire_writer_init(struct wire_writer *w)
{
	memset(w, 0, sizeof(*w));
}

void wire_writer_release(struct wire_writer *w)
{
	if (!w)
		return;
	free(w->buf);
	memset(w, 0, sizeof(*w));
}

int wire_writer_take(struct wire_writer *w, void **ret_buf, size_t *ret_len)
{
	if (w->err) {
		int e = w->err;
		wire_writer_release(w);
		return e;
	}
	*ret_buf = w->buf;
	*ret_len = w->len;
	memset(w, 0, sizeof(*w));
	return 0;
}

void *wire_reserve(struct wire_writer *w, size_t n)
{
	if (w->err)
		return NULL;
	if (n > SIZE_MAX / 2 - w->len) {
		w->err = -ENOMEM;
		return NULL;
	}
	if (w->len + n > w->cap) {
		size_t cap = w->cap ? w->cap : 256;
		while (cap < w->len + n)
			cap *= 2;
		uint8_t *nb = realloc(w->buf, cap);
		if (!nb) {
			w->err = -ENOMEM;
			return NULL;
		}
		w->buf = nb;
		w->cap = cap;
	}
	void *p = w->buf + w->len;
	w->len += n;
	return p;
}

void wire_put_bytes(struct wire_writer *w, const void *p, size_t n)
{
	void *d = wire_reserve(w, n);
	if (d && n)
		memcpy(d, p, n);
}

void wire_put_u8(struct wire_writer *w, uint8_t v)
{
	wire_put_bytes(w, &v, 1);
}

void wire_put_u16(struct wire_writer *w, uint16_t v)
{
	v = htole16(v);
	wire_put_bytes(w, &v, 2);
}

void wire_put_u32(struct wire_writer *w, uint32_t v)
{
	v = htole32(v);
	wire_put_bytes(w, &v, 4);
}

void wire_put_u64(struct wire_writer *w, uint64_t v)
{
	v = htole64(v);
	wire_put_bytes(w, &v, 8);
}

void wire_patch_u32(struct wire_writer *w, size_t off, uint32_t v)
{
	if (w->err || off > w->len || w->len - off < 4)
		return;
	v = htole32(v);
	memcpy(w->buf + off, &v, 4);
}

void wire_reader_init(struct wire_reader *r, const void *buf, size_t len)
{
	r->buf = buf;
	r->len = buf ? len : 0;
	r->pos = 0;
	r->err = 0;
}

size_t wire_remaining(const struct wire_reader *r)
{
	return r->err ? 0 : r->len - r->pos;
}

const void *wire_get_view(struct wire_reader *r, size_t n)
{
	if (r->err)
		return NULL;
	if (n > r->len - r->pos) {
		r->err = -EBADMSG;
		return NULL;
	}
	const void *p = r->buf + r->pos;
	r->pos += n;
	return p;
}

void wire_get_bytes(struct wire_reader *r, void *p, size_t n)
{
	const void *s = wire_get_view(r, n);
	if (s && n)
		memcpy(p, s, n);
}

uint8_t wire_get_u8(struct wire_reader *r)
{
	uint8_t v = 0;
	wire_get_bytes(r, &v, 1);
	return v;
}

uint16_t wire_get_u16(struct wire_reader *r)
{
	uint16_t v = 0;
	wire_get_bytes(r, &v, 2);
	return le16toh(v);
}

uint32_t wire_get_u32(struct wire_reader *r)
{
	uint32_t v = 0;
	wire_get_bytes(r, &v, 4);
	return le32toh(v);
}

uint64_t wire_get_u64(struct wire_reader *r)
{
	uint64_t v = 0;
	wire_get_bytes(r, &v, 8);
	return le64toh(v);
}

uint64_t wire_fnv1a64(const void *p, size_t n)
{
	const uint8_t *b = p;
	uint64_t h = 0xcbf29ce484222325ull;
	for (size_t i = 0; i < n; i++) {
		h ^= b[i];
		h *= 0x100000001b3ull;
	}
	return h;
}
