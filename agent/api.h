/* SPDX-License-Identifier: Apache-2.0 */
/*
 * ferryd's control API: HTTP/1.1 + JSON under /v1 (docs/api.md), served by libmicrohttpd on
 * the unix socket of control.socket and, when control.tcp is set, on TCP with TLS and
 * client certificates signed by tls.ca. Every route is a thin translation between HTTP and
 * the functions of agent.h; the API keeps no state of its own beyond its listeners. Each
 * connection gets its own thread so that a long-lived /v1/events feed or a slow dump never
 * holds up other clients.
 */
#ifndef FERRY_API_H
#define FERRY_API_H

#include <stddef.h>

#include "agent/agent.h"

/* Largest request body accepted; bigger ones get 413 before being read in full. */
#define FERRY_API_BODY_MAX (64u * 1024u)
/* Concurrent connections per listener; the next one is refused until one ends. */
#define FERRY_API_CONNECTIONS_MAX 256u
/* Idle seconds after which a connection (not an events feed) is closed. */
#define FERRY_API_IDLE_TIMEOUT_S 60u
/* Default seconds between heartbeat lines on /v1/events (?heartbeat=S overrides, up to
 * half the idle timeout, so a quiet feed is never closed as idle). */
#define FERRY_API_HEARTBEAT_S 15u

struct api;

/*
 * Starts the listeners named by the agent's configuration (agent_config(a)): creates the
 * unix socket's directory when missing, replaces a stale socket file (refusing when another
 * process still answers on it), binds it with mode 0660; binds control.tcp with TLS from
 * tls.cert/key/ca. -errno with a message in err on failure, nothing left behind.
 */
int api_new(struct agent *a, struct api **ret, char *err, size_t errlen);
/* "host:port" the TLS listener is bound to (port resolved when 0 was asked), or "". */
const char *api_tcp_address(const struct api *api);
/*
 * Stops accepting connections, ends /v1/events feeds, waits for running requests to finish
 * and removes the socket file. Call after agent_shutdown() (so feeds see agent.shutdown)
 * and before agent_free(). Idempotent.
 */
void api_stop(struct api *api);
/* Stops (if needed) and frees. NULL-safe. */
void api_free(struct api *api);

#endif
