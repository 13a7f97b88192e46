/* The inbound hRPC transport: unary hRPC over HTTP/1.1 on a uv TCP listener
 * (http-parser), as spec/harmony-federation.md "hRPC over HTTP" describes.
 * TLS is terminated by a reverse proxy in front of segue.
 *
 * Contract (libuv's): the caller allocates the server; sg__hrpc_server_init
 * pairs with sg__hrpc_server_close, which is asynchronous and releases every
 * byte the server allocated before its close_cb runs. Functions return 0 or a
 * negative SG_E* / UV_E* code.
 *
 * What the server does on its own, so that handlers only see well-formed
 * requests:
 * - Only POST; anything else is 405 hrpc.http.bad-unary-request, except
 *   GET /healthz, which is 200 text/plain "ok" (for load balancers).
 * - Content-Type must be application/hrpc, compared without case; parameters
 *   after a ';' ("application/hrpc; charset=binary") are accepted and
 *   ignored, since a proxy may add them. Anything else (application/hrpc+json,
 *   a missing header) is 400 hrpc.http.bad-unary-request.
 * - An unknown path is 404 hrpc.not-found. A query string is not part of the
 *   path the route table sees.
 * - Bodies come with Content-Length or chunked. Keep-alive is HTTP/1.1's
 *   default; "Connection: close" and HTTP/1.0 are honoured. Pipelined
 *   requests are answered in order, one at a time. "Expect: 100-continue"
 *   gets "100 Continue" when the request will reach a handler.
 * - A peer that closes, or only half-closes, its side before its response
 *   is written is taken as gone: the request is cancelled (see
 *   sg__hrpc_done_cb), so that a response to a peer that gave up is not
 *   reported as delivered (as far as TCP lets the server tell).
 * - Every response carries "Hrpc-Version: 1"; every error response is an
 *   hrpc.v1.Error with Content-Type application/hrpc.
 * - Limits (sg__hrpc_limits): an oversized header is 431, an oversized body
 *   413 (both hrpc.http.bad-unary-request), a malformed request 400; each of
 *   these closes that connection after the response. Other connections are
 *   never disturbed.
 * - Every refusal and time-out is logged at warn with the peer address
 *   (peer=127.0.0.1:40112), except 404, which is logged at info; past 20
 *   such lines in 10 s the rest of that period is one line with the count
 *   (garbage must not turn into more log than it is).
 * - Connections (issue 12: slow-header exhaustion): at most max_connections
 *   open, which never exceeds RLIMIT_NOFILE less a reserve for the rest of
 *   the process (backends, the store, outbound calls), and at most
 *   max_connections_per_address from one address. At either limit the
 *   connection that has waited longest without a request in progress (its
 *   head not complete, or idle between requests, or lingering) is closed to
 *   make room; only when there is none is the new connection closed at
 *   once. Reaching a limit is logged once, not per connection, until the
 *   server is below it again.
 */
#ifndef SEGUE_HRPC_SERVER_H
#define SEGUE_HRPC_SERVER_H
#include <stddef.h>
#include <stdint.h>
#include <uv.h>
#include "log.h"
#include "listener.h"

/* A field left 0 takes its default. */
typedef struct sg__hrpc_limits {
  /* Request target + header names + values (+4 bytes per header line).
   * Default 16 KiB; over it: 431 and close. (http-parser's own 80 KiB cap
   * also answers 431.) */
  size_t max_header_bytes;
  /* Decoded body bytes. Default 1 MiB; over it: 413 and close (at once when
   * Content-Length announces it, else when the chunks pass it). */
  size_t max_body_bytes;
  /* From accept, or from the first byte of a request, until its headers are
   * complete. Default 10 s; then the connection is closed. */
  uint64_t header_timeout_ms;
  /* From the end of the headers until the body is complete. Default 30 s;
   * then the connection is closed. */
  uint64_t body_timeout_ms;
  /* A kept-alive connection with no request in progress. Default 60 s. */
  uint64_t idle_timeout_ms;
  /* Writing one response out. Default 30 s; then the connection is closed. */
  uint64_t write_timeout_ms;
  /* After an error response on a connection we close, how long we go on
   * reading (and dropping) what the peer still sends, so that it reads our
   * response instead of a TCP reset. Default 2 s. */
  uint64_t linger_ms;
  /* Open connections. 0 (the default): RLIMIT_NOFILE's soft limit less a
   * reserve (an eighth, at least 64); a larger value is lowered to that. */
  unsigned max_connections;
  /* Open connections from one IP address. 0 (the default): an eighth of
   * max_connections, at least 16. */
  unsigned max_connections_per_address;
} sg__hrpc_limits;

#define SG_HRPC_DEFAULT_MAX_HEADER_BYTES (16u * 1024)
#define SG_HRPC_DEFAULT_MAX_BODY_BYTES (1024u * 1024)
#define SG_HRPC_DEFAULT_HEADER_TIMEOUT_MS 5000
#define SG_HRPC_DEFAULT_BODY_TIMEOUT_MS 30000
#define SG_HRPC_DEFAULT_IDLE_TIMEOUT_MS 60000
#define SG_HRPC_DEFAULT_WRITE_TIMEOUT_MS 30000
#define SG_HRPC_DEFAULT_LINGER_MS 2000
#define SG_HRPC_DEFAULT_MAX_CONNECTIONS 0        /* from RLIMIT_NOFILE */
#define SG_HRPC_NOFILE_RESERVE_MIN 64

/* Fills every field with its default. */
void sg__hrpc_limits_default(sg__hrpc_limits *l);

/* The connection limit `configured` (0: none) comes to under RLIMIT_NOFILE. */
unsigned sg__hrpc_connection_limit(unsigned configured);

typedef struct sg__hrpc_server sg__hrpc_server;
typedef struct sg__hrpc_request sg__hrpc_request;

/* A routed request. The handler owns one reference to `req` and must finish
 * it exactly once, now or later, with sg__hrpc_respond, sg__hrpc_respond_error
 * or sg__hrpc_request_release. */
typedef void (*sg__hrpc_handler)(sg__hrpc_request *req, void *ud);

/* Runs exactly once per successful sg__hrpc_request_on_done: status 0 when the
 * whole response was written to the socket; else the response never will be
 * and a later answer is a no-op: SG_ECANCELED (the connection closed first:
 * peer gone, server closing), SG_ETIMEDOUT (the write timed out) or libuv's
 * error (the write or a read failed). */
typedef void (*sg__hrpc_done_cb)(sg__hrpc_request *req, void *ud, int status);

/* What a handler sees. Read-only, and valid until the handler finishes the
 * request, even if the connection dies first. The server allocates it (with
 * private state after these fields) and frees it once the handler finished
 * it and the response, if any, has been written or abandoned. */
struct sg__hrpc_request {
  void *data;                 /* the handler's; the server never touches it */
  const char *path;           /* "/protocol.sync.v1.PostboxService/Push" */
  const uint8_t *body;        /* the decoded body; NULL when empty */
  size_t body_len;
  const char *authorization;  /* the Authorization header value, or NULL */
  const char *peer;           /* "127.0.0.1:40112" or "[::1]:40112" */
};

/* Answers 200, Content-Type application/hrpc, with `body` (copied; may be
 * NULL when len is 0). Consumes the handler's reference. Returns 0 when the
 * response is being written, SG_ECANCELED when the connection is already
 * gone (nothing happens), SG_EINVAL when the request was answered already,
 * or an error with which the connection was closed. */
int sg__hrpc_respond(sg__hrpc_request *req, const uint8_t *body, size_t len);

/* Answers `http_status` (200..599, else SG_EINVAL and the request is not
 * consumed) with an hrpc.v1.Error { identifier, human_message, details }
 * (copied; `human_message` and `details` may be NULL). Otherwise as
 * sg__hrpc_respond. */
int sg__hrpc_respond_error(sg__hrpc_request *req, int http_status,
                          const char *identifier, const char *human_message,
                          const uint8_t *details, size_t details_len);

/* Finishes the request without answering it: a live connection gets 500
 * hrpc.internal-server-error. Consumes the handler's reference. */
void sg__hrpc_request_release(sg__hrpc_request *req);

/* Asks to hear when the response has left (see sg__hrpc_done_cb). Call before
 * answering. Returns 0 (cb will run exactly once, never from inside this
 * call), SG_ECANCELED when the connection is already gone, SG_EINVAL when
 * the request was answered already or a callback is set. */
int sg__hrpc_request_on_done(sg__hrpc_request *req, sg__hrpc_done_cb cb, void *ud);

/* 1 while the request's connection is open, else 0. */
int sg__hrpc_request_alive(const sg__hrpc_request *req);

typedef void (*sg__hrpc_server_close_cb)(sg__hrpc_server *srv);

typedef struct sg__hrpc_server_stats {
  uint64_t accepted;     /* connections accepted and served */
  uint64_t rejected;     /* connections closed at once: a limit, no room to make */
  uint64_t evicted;      /* waiting connections closed to make room */
  uint64_t requests;     /* requests answered (by handlers or the server) */
  unsigned active;       /* connections open now */
} sg__hrpc_server_stats;

struct sg__hrpc_server {
  void *data;  /* the embedder's; the server never touches it */
  /* private */
  sg__listener listener;
  sg__hrpc_limits limits;
  const sg__logger *log;
  struct sg__hrpc_route *routes;
  size_t nroutes, route_cap;
  unsigned live;                /* connections open and not closing */
  int at_limit;                 /* a connection limit was hit (logged once) */
  uint64_t log_window;          /* start of the current 10 s log period */
  unsigned log_lines, log_dropped;
  sg__hrpc_server_close_cb close_cb;
  sg__hrpc_server_stats stats;
};

/* Prepares `srv` on `loop` (not owned). `limits` is copied (NULL: defaults);
 * `log` is borrowed and must outlive the server (NULL: stderr at info). On
 * failure (libuv's error) nothing needs closing; on success the server must
 * be closed with sg__hrpc_server_close, even if listen failed. */
int sg__hrpc_server_init(uv_loop_t *loop, sg__hrpc_server *srv,
                        const sg__hrpc_limits *limits, const sg__logger *log);

/* Listens on "host:port": an IPv4 literal ("127.0.0.1:2289") or an IPv6
 * literal with or without brackets ("[::1]:2289", "::1:2289": the last ':'
 * separates the port). Port 0 picks a free port (see sg__hrpc_server_port).
 * SG_EINVAL for a malformed address, else libuv's bind/listen error. */
int sg__hrpc_server_listen(sg__hrpc_server *srv, const char *address);

/* The bound port, or a negative error (UV_EINVAL when not listening). */
int sg__hrpc_server_port(const sg__hrpc_server *srv);

/* Routes POSTs to `path` (exact match; copied) to `handler`. SG_EEXIST if
 * the path has a route, SG_EINVAL if it does not start with '/'. */
int sg__hrpc_server_route(sg__hrpc_server *srv, const char *path,
                         sg__hrpc_handler handler, void *ud);

void sg__hrpc_server_stats_get(const sg__hrpc_server *srv, sg__hrpc_server_stats *out);

/* Stops listening and closes every connection. Requests still held by
 * handlers are detached: their done callbacks run with SG_ECANCELED before
 * this returns, and answering them later is a no-op (they must still be
 * finished, which frees them). After this returns no callback runs except
 * close_cb (may be NULL), once every handle is closed and every byte the
 * server owns is freed. */
void sg__hrpc_server_close(sg__hrpc_server *srv, sg__hrpc_server_close_cb close_cb);

#endif
