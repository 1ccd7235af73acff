/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Test helpers that need no VM (the transport tests link them without libvm): a
 * deterministic random source, clocks and sleeps, loopback sockets, memfd-backed memory and
 * test pages. Failures end the test through cmocka's assertions.
 */
#ifndef FERRY_TIO_H
#define FERRY_TIO_H

#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#define TIO_PAGE 4096u

/* splitmix64's finaliser; tio_rnd() walks it from a fixed seed (runs are reproducible). */
uint64_t tio_mix(uint64_t x);
uint64_t tio_rnd(void);
int64_t tio_now_ms(void);
void tio_sleep_ms(unsigned ms);

/* A listening TCP socket on 127.0.0.1, ephemeral port in *ret_port. */
int tio_listen_any(uint16_t *ret_port);
/* A connected loopback TCP pair: *a is the "source" end, *b the accepted one. */
void tio_tcp_pair(int *a, int *b);
void tio_write_all(int fd, const void *p, size_t n);

/* The payload of a frame the peer refuses from its header: sent like tio_write_all, but
 * the peer may already have closed (EPIPE, ECONNRESET), which ends it quietly. */
void tio_write_refused(int fd, const void *p, size_t n);
void tio_read_all(int fd, void *p, size_t n);

/* A memfd of `size` bytes, mapped shared; *ret_fd stays open. */
uint8_t *tio_memfd_map(uint64_t size, int *ret_fd);
bool tio_page_zero(const void *p);
/*
 * Gives a page fresh random content, or zeros with probability 1/5; one data page in 8 is
 * zero but for one byte, which a sloppy zero test would miss.
 */
void tio_fill_page(uint8_t *p, uint64_t salt);

#endif
