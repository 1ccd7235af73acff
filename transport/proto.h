/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The agent-to-agent protocol, version 2 (docs/protocol.md is its spec); agents speak
 * version 1 to peers that know nothing newer. Every message is a
 * frame: a 12-byte header (magic "FRY1", type u16, flags u16, payload length u32, all
 * little endian) and a payload encoded with transport/wire.h. Decoders check every length
 * and every field's range, so garbage from a peer is an error with a reason, never a
 * crash; the receiver then disconnects that peer.
 *
 * Control channel (struct xctl), one per migration, source -> destination unless noted:
 *   HELLO        version range, agent name, migration id, capabilities, streams
 *   WELCOME      (dst) chosen version and capabilities, stream token
 *   REFUSE       (either way) code + message: the peer will not go on
 *   VM_OFFER     the VM's name and shape (memory, vCPUs, memslot layout, irqchip, guest)
 *   VM_ACCEPT    (dst) the destination created the VM and registered its memory;
 *                empty payload
 *   ROUND_END    round number, fence, pages sent: precopy progress
 *   STATE        fence, the serialised vCPU/VM state (agent/vm state format)
 *   COMMIT_REQ   fence, SHA-256 per memslot when verifying: "run it"
 *   COMMITTED    (dst) the destination decided RUN (durably) and runs the VM
 *   ABORT        (either way) reason: discard / resume
 *   DECISION_REQ migration id: after a lost connection, "what did you decide?"
 *   DECISION     (dst) RUN, NOT_RUN or UNKNOWN for that id
 * Data streams (struct xport_src/dst), source -> destination:
 *   STREAM_HELLO token, stream index
 *   PAGES        region, first page, count, zero mask, then the non-zero pages' bytes
 *   PAGES_ZSTD   (v2, ZSTD chosen) the same header, then one zstd frame holding the
 *                non-zero pages' bytes
 *   FENCE        fence number: everything before it on this stream has landed
 */
#ifndef FERRY_PROTO_H
#define FERRY_PROTO_H

#include <stddef.h>
#include <stdint.h>

#define PROTO_MAGIC 0x31595246u /* "FRY1" */
#define PROTO_VERSION 2u     /* the newest version this codec speaks */
#define PROTO_MIN_VERSION 1u /* the oldest; v1 has no compressed pages */
#define PROTO_ZSTD_MIN_VERSION 2u /* the first version with PAGES_ZSTD (PROTO_CAP_ZSTD) */
#define PROTO_HDR_LEN 12u
#define PROTO_MAX_PAYLOAD (64u << 20)   /* the largest frame anyone may send */
#define PROTO_MAX_CTRL_PAYLOAD (16u << 20)
#define PROTO_NAME_MAX 65u             /* agent names are 1..64 chars (docs/config.md) + NUL */
#define PROTO_VM_NAME_MAX 63u          /* VM names: [A-Za-z0-9_.-]{1,63}, as VM_NAME_MAX - 1 */
#define PROTO_MSG_MAX 256u
#define PROTO_MAX_SLOTS 64u
#define PROTO_MAX_STREAMS 64u
#define PROTO_PAGES_MAX 1024u           /* pages in one PAGES frame */
#define PROTO_TOKEN_LEN 16u
#define PROTO_DIGEST_LEN 32u            /* SHA-256 */

enum proto_type {
	PROTO_HELLO = 1,
	PROTO_WELCOME = 2,
	PROTO_REFUSE = 3,
	PROTO_VM_OFFER = 4,
	PROTO_VM_ACCEPT = 5,
	PROTO_ROUND_END = 6,
	PROTO_STATE = 7,
	PROTO_COMMIT_REQ = 8,
	PROTO_COMMITTED = 9,
	PROTO_ABORT = 10,
	PROTO_DECISION_REQ = 11,
	PROTO_DECISION = 12,
	PROTO_POSTCOPY_START = 13, /* src: run there now; these pages are missing */
	PROTO_POSTCOPY_RUNNING = 14, /* dst: decided RUN, the VM runs, faults are served */
	PROTO_PAGE_REQ = 15,       /* dst: send these pages first (a vCPU waits on them) */
	PROTO_POSTCOPY_END = 16,   /* src: every missing page went before this fence */
	PROTO_POSTCOPY_DONE = 17,  /* dst: every page is here; the source may let go */
	PROTO_STREAM_HELLO = 32,
	PROTO_PAGES = 33,
	PROTO_FENCE = 34,
	PROTO_PAGES_ZSTD = 35, /* v2, ZSTD chosen: PAGES with zstd-compressed page bytes */
};
const char *proto_type_name(uint16_t type);

/* Capability bits (HELLO offers, WELCOME chooses). */
#define PROTO_CAP_TCP (1u << 0)
#define PROTO_CAP_RDMA (1u << 1)
#define PROTO_CAP_ZSTD (1u << 2)   /* v2: PAGES_ZSTD frames on the data streams */
#define PROTO_CAP_VERIFY (1u << 3)

/* REFUSE / ABORT codes. */
enum proto_code {
	PROTO_E_VERSION = 1,   /* no common protocol version */
	PROTO_E_BUSY = 2,      /* agent at its migration limit */
	PROTO_E_NOMEM = 3,     /* not enough memory for the VM */
	PROTO_E_SHAPE = 4,     /* VM shape not acceptable here */
	PROTO_E_EXISTS = 5,    /* a VM with that name already exists */
	PROTO_E_VERIFY = 6,    /* digests differ */
	PROTO_E_STATE = 7,     /* vCPU/VM state refused */
	PROTO_E_CANCELED = 8,  /* operator cancelled */
	PROTO_E_PROTOCOL = 9,  /* malformed or unexpected message */
	PROTO_E_INTERNAL = 10, /* anything else; the message says */
	PROTO_E_SHUTDOWN = 11, /* the agent is stopping */
};
const char *proto_code_name(uint32_t code);

enum proto_decided { /* not "proto_decision": C tags share one namespace */
	PROTO_DECIDED_UNKNOWN = 0, /* no record of it here: never decided RUN (see the spec) */
	PROTO_DECIDED_NOT_RUN = 1, /* discarded: the source must resume */
	PROTO_DECIDED_RUN = 2,     /* the destination runs the VM: the source must not resume */
};

struct proto_hdr {
	uint32_t magic;
	uint16_t type;
	uint16_t flags;
	uint32_t len;
};

/* Encodes/decodes a frame header (PROTO_HDR_LEN bytes); v1 always sends flags 0. decode:
 * -EBADMSG on bad magic, unknown type, nonzero flags, or len > max_payload (or >
 * PROTO_MAX_PAYLOAD, whichever is smaller); *ret untouched on failure. */
void proto_hdr_encode(uint8_t out[PROTO_HDR_LEN], uint16_t type, uint32_t len);
int proto_hdr_decode(const uint8_t in[PROTO_HDR_LEN], uint32_t max_payload,
		     struct proto_hdr *ret);

struct proto_hello {
	uint32_t min_version, max_version;
	char agent[PROTO_NAME_MAX];
	uint64_t migration_id;
	uint32_t caps;
	uint32_t page_size;
	uint32_t streams;
};

struct proto_welcome {
	uint32_t version;
	uint32_t caps;
	char agent[PROTO_NAME_MAX];
	uint8_t token[PROTO_TOKEN_LEN];
};

struct proto_refuse { /* also ABORT */
	uint32_t code;
	char message[PROTO_MSG_MAX];
};

struct proto_slot {
	uint64_t gpa;
	uint64_t size;
};

struct proto_vm_offer {
	char name[PROTO_NAME_MAX];
	char guest[PROTO_NAME_MAX]; /* guest kind, for display ("memcheck", "boot:...") */
	uint64_t mem_size;
	uint32_t vcpus;
	uint32_t irqchip;
	uint32_t nr_slots;
	struct proto_slot slots[PROTO_MAX_SLOTS];
};

struct proto_round_end {
	uint32_t round;
	uint64_t fence;
	uint64_t pages;     /* pages sent in this round */
	uint64_t remaining; /* dirty pages the source still holds */
};

/* STATE carries a blob; decoding returns a view into the payload. */
struct proto_state {
	uint64_t fence;
	const void *blob;
	uint32_t blob_len;
};

struct proto_commit_req {
	uint64_t fence;
	uint32_t nr_digests; /* 0, or one per memslot when verifying */
	uint8_t digests[PROTO_MAX_SLOTS][PROTO_DIGEST_LEN];
};

struct proto_committed {
	uint64_t run_ns; /* destination: ns from COMMIT_REQ received to vCPUs running */
};

struct proto_decision_req {
	uint64_t migration_id;
	uint8_t token[PROTO_TOKEN_LEN];
};

struct proto_decision {
	uint64_t migration_id;
	uint32_t decision; /* enum proto_decided */
};

struct proto_stream_hello {
	uint8_t token[PROTO_TOKEN_LEN];
	uint32_t stream;
};

/* PAGES header: the payload continues with (npages - popcount(zero)) * 4096 bytes. */
struct proto_pages {
	uint32_t region;
	uint64_t first_page;
	uint32_t npages; /* 1..PROTO_PAGES_MAX */
	uint64_t zero_mask[PROTO_PAGES_MAX / 64];
};
#define PROTO_PAGES_HDR_LEN(npages) (16u + 8u * (((npages) + 63u) / 64u))

struct proto_fence {
	uint64_t fence;
};

/*
 * Encoders return a malloc'd payload (not including the frame header) in *ret and *ret_len,
 * -ENOMEM, or -EINVAL for a message its decoder would reject (so nothing invalid leaves an
 * agent; *ret untouched). Decoders take a payload and fill the struct; -EBADMSG with a
 * reason in err (may be NULL) for anything out of bounds: lengths, counts, unterminated or
 * non-printable names, unknown bits, trailing bytes. On success *m is fully defined (unused
 * array entries, string tails and padding zeroed); on failure it is untouched.
 */
int proto_encode_hello(const struct proto_hello *m, void **ret, size_t *ret_len);
int proto_decode_hello(const void *p, size_t len, struct proto_hello *m, char *err, size_t errlen);
int proto_encode_welcome(const struct proto_welcome *m, void **ret, size_t *ret_len);
int proto_decode_welcome(const void *p, size_t len, struct proto_welcome *m, char *err,
			 size_t errlen);
int proto_encode_refuse(const struct proto_refuse *m, void **ret, size_t *ret_len);
int proto_decode_refuse(const void *p, size_t len, struct proto_refuse *m, char *err,
			size_t errlen);
int proto_encode_vm_offer(const struct proto_vm_offer *m, void **ret, size_t *ret_len);
int proto_decode_vm_offer(const void *p, size_t len, struct proto_vm_offer *m, char *err,
			  size_t errlen);
int proto_encode_round_end(const struct proto_round_end *m, void **ret, size_t *ret_len);
int proto_decode_round_end(const void *p, size_t len, struct proto_round_end *m, char *err,
			   size_t errlen);
int proto_encode_state(const struct proto_state *m, void **ret, size_t *ret_len);
int proto_decode_state(const void *p, size_t len, struct proto_state *m, char *err,
		       size_t errlen);
int proto_encode_commit_req(const struct proto_commit_req *m, void **ret, size_t *ret_len);
int proto_decode_commit_req(const void *p, size_t len, struct proto_commit_req *m, char *err,
			    size_t errlen);
int proto_encode_committed(const struct proto_committed *m, void **ret, size_t *ret_len);
int proto_decode_committed(const void *p, size_t len, struct proto_committed *m, char *err,
			   size_t errlen);
/*
 * POSTCOPY_START: sent after STATE. fence closes the last precopy pages; for each memslot,
 * the pages the destination must not use as they are (dirtied since sent, or never sent):
 * it drops them and fetches them on demand. Bit i of slot s = page i of slot s.
 */
struct proto_postcopy_start {
	uint64_t fence;
	uint32_t nr_slots;
	uint64_t npages[PROTO_MAX_SLOTS];
	uint64_t *bitmap[PROTO_MAX_SLOTS]; /* decode: malloc'd, (npages + 63) / 64 words */
	/*
	 * PROTO_POSTCOPY_* bits. On the wire a trailing u32 present only when non-zero, so a
	 * push-mode POSTCOPY_START is byte for byte what agents without the field send, and
	 * an agent without it refuses a pull-mode one (trailing bytes) before it decides.
	 */
	uint32_t flags;
};
/*
 * Pull over RDMA: the source exposed its guest memory (xport_src_rdma_expose) and sends no
 * pages; the destination RDMA-READs every flagged page itself, then answers DONE.
 */
#define PROTO_POSTCOPY_PULL_RDMA (1u << 0)
#define PROTO_POSTCOPY_FLAGS PROTO_POSTCOPY_PULL_RDMA
int proto_encode_postcopy_start(const struct proto_postcopy_start *m, void **ret,
				size_t *ret_len);
int proto_decode_postcopy_start(const void *p, size_t len, struct proto_postcopy_start *m,
				char *err, size_t errlen);
void proto_postcopy_start_free(struct proto_postcopy_start *m); /* the bitmaps */

struct proto_page_req {
	uint32_t slot;
	uint64_t first_page;
	uint32_t npages; /* 1..PROTO_PAGES_MAX */
};
int proto_encode_page_req(const struct proto_page_req *m, void **ret, size_t *ret_len);
int proto_decode_page_req(const void *p, size_t len, struct proto_page_req *m, char *err,
			  size_t errlen);
/* POSTCOPY_END carries the fence closing the pushed pages (u64). */
int proto_encode_postcopy_end(uint64_t fence, void **ret, size_t *ret_len);
int proto_decode_postcopy_end(const void *p, size_t len, uint64_t *fence, char *err,
			      size_t errlen);

/*
 * VM_ACCEPT: empty for the TCP data path; with RDMA chosen in WELCOME, the port (u16) of
 * the destination's RDMA listener on the address the control connection reached.
 */
struct proto_vm_accept {
	uint16_t rdma_port; /* 0: TCP */
};
int proto_encode_vm_accept(const struct proto_vm_accept *m, void **ret, size_t *ret_len);
int proto_decode_vm_accept(const void *p, size_t len, struct proto_vm_accept *m, char *err,
			   size_t errlen);

int proto_encode_decision_req(const struct proto_decision_req *m, void **ret, size_t *ret_len);
int proto_decode_decision_req(const void *p, size_t len, struct proto_decision_req *m,
			      char *err, size_t errlen);
int proto_encode_decision(const struct proto_decision *m, void **ret, size_t *ret_len);
int proto_decode_decision(const void *p, size_t len, struct proto_decision *m, char *err,
			  size_t errlen);
int proto_encode_stream_hello(const struct proto_stream_hello *m, void **ret, size_t *ret_len);
int proto_decode_stream_hello(const void *p, size_t len, struct proto_stream_hello *m,
			      char *err, size_t errlen);
int proto_encode_fence(const struct proto_fence *m, void **ret, size_t *ret_len);
int proto_decode_fence(const void *p, size_t len, struct proto_fence *m, char *err,
		       size_t errlen);
/*
 * PAGES: encodes/decodes the header part only (PROTO_PAGES_HDR_LEN(npages) bytes).
 * encode returns the bytes written, or 0 if cap is too small or m is invalid.
 * decode takes the payload or any prefix of it that holds the whole header (at most
 * PROTO_PAGES_HDR_LEN(PROTO_PAGES_MAX) bytes are needed), returns the header length (> 0)
 * and in *ret_data_len (may be NULL) the number of data bytes that follow it; it rejects
 * a len longer than header + data. The frame is well-formed iff its payload length ==
 * return value + *ret_data_len, which the caller checks against the frame header.
 */
size_t proto_encode_pages_hdr(const struct proto_pages *m, uint8_t *out, size_t cap);
int proto_decode_pages_hdr(const void *p, size_t len, struct proto_pages *m,
			   uint64_t *ret_data_len, char *err, size_t errlen);
/*
 * PAGES_ZSTD (version 2): the PAGES header, then exactly one zstd frame whose content is
 * the frame's non-zero pages, concatenated in page order. Takes the whole payload and
 * checks, before anyone decompresses anything: the header as for PAGES; at least one
 * non-zero page; the zstd frame is non-empty and shorter than the raw bytes it stands for
 * (so a receiver's buffer for it is bounded by a raw frame), is one complete frame that
 * ends exactly at the end of the payload, and declares a content size equal to the raw
 * bytes. Returns the header length and, in *ret_data_len, the raw bytes (npages - zero
 * pages) * 4096; *ret_z / *ret_zlen point at the zstd frame inside p. Decompressing it can
 * still fail (corrupt blocks): the receiver decompresses into a buffer of exactly
 * *ret_data_len bytes and requires that many out.
 */
int proto_decode_pages_zstd(const void *p, size_t len, struct proto_pages *m,
			    uint64_t *ret_data_len, const void **ret_z, size_t *ret_zlen,
			    char *err, size_t errlen);

#endif
