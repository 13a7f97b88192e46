/* A small HTTP/1.1 server for the client API (http-parser on a uv TCP
 * listener): persistent connections, one request at a time each, answered by one handler that sees
 * every request, either with a whole response or with a stream (Server-Sent
 * Events). Routing, authentication and bodies are the handler's business
 * (scripts/segue/api.lua through bindings/lua_http.c); this layer only
 * enforces limits and keeps connections alive while they are needed.
 *
 * Contract (libuv's): the caller allocates the server; sg__http_server_init
 * pairs with sg__http_server_close, which is asynchronous and frees every
 * byte the server allocated before its close_cb runs. Functions return 0 or
 * a negative SG_E* / UV_E* code.
 *
 * What the server does on its own:
 * - Connections persist (HTTP/1.1's default, or HTTP/1.0 with
 *   "Connection: keep-alive"): after a response is written the next request
 *   is read; one that asked for "Connection: close", a stream, a refused
 *   request and a closing server get "Connection: close" and the connection
 *   ends after it. Requests sent before the previous one is answered
 *   (pipelining) wait unread and are answered in order: reading stops while
 *   the handler holds a request, so at most one read buffer of them is kept.
 *   An idle connection closes after header_timeout_ms.
 * - Limits (sg__http_limits): a header over max_header_bytes or
 *   max_headers is 431, a body over max_body_bytes 413 (at once when
 *   Content-Length announces it), a malformed request 400, each as a small
 *   JSON error {"error", "code"}; a request whose headers (or body) do not
 *   arrive in time is closed. Over max_connections, a new connection is
 *   accepted and closed at once.
 * - A stream whose unwritten bytes pass max_pending_bytes (a reader too slow
 *   for the events) is closed: an EventSource reconnects with Last-Event-ID,
 *   so nothing is lost and memory stays bounded.
 * - After the last response the server sends FIN and drops what the peer
 *   still sends for up to 2 s, so the peer reads the answer, not a reset.
 */
#ifndef SEGUE_HTTP_SERVER_H
#define SEGUE_HTTP_SERVER_H
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "log.h"
#include "listener.h"

/* A field left 0 takes its default. */
typedef struct sg__http_limits {
  size_t max_header_bytes;     /* target + names + values; default 16 KiB */
  unsigned max_headers;        /* header lines; default 64 */
  size_t max_body_bytes;       /* decoded body; default 1 MiB */
  uint64_t header_timeout_ms;  /* accept (or the last response) to end of headers; default 10 s */
  uint64_t body_timeout_ms;    /* end of headers to end of body; default 30 s */
  uint64_t write_timeout_ms;   /* writing a whole response; default 30 s */
  size_t max_pending_bytes;    /* unwritten bytes of a stream; default 4 MiB */
  unsigned max_connections;    /* open connections; default 1024 */
} sg__http_limits;

void sg__http_limits_default(sg__http_limits *l);

typedef struct sg__http_header {
  const char *name;   /* lower case */
  const char *value;
} sg__http_header;

typedef struct sg__http_server sg__http_server;
typedef struct sg__http_request sg__http_request;

/* What the handler sees; read-only and valid until the handler finished the
 * request (sg__http_respond or sg__http_request_release), even if the
 * connection died first. */
struct sg__http_request {
  void *data;                      /* the handler's */
  const char *method;              /* "GET", "POST", ... */
  const char *path;                /* as sent (percent-encoded), no query */
  const char *query;               /* after '?', or NULL */
  const sg__http_header *headers;  /* in the order sent */
  size_t nheaders;
  const char *body;                /* NUL-terminated; "" when empty */
  size_t body_len;
  const char *peer;                /* "127.0.0.1:40112" */
};

/* Every complete request. The handler owns one reference to `req` and must
 * give it back exactly once, now or later, with sg__http_respond or
 * sg__http_request_release. */
typedef void (*sg__http_handler)(sg__http_request *req, void *ud);

/* The connection closed before the handler finished the request: status is
 * SG_ECANCELED (peer gone, server closing), SG_ELIMIT (a stream's reader
 * fell max_pending_bytes behind), SG_ETIMEDOUT or libuv's error. Runs at most
 * once; answering later is a no-op (the request must still be finished). */
typedef void (*sg__http_gone_cb)(sg__http_request *req, void *ud, int status);

/* The value of header `name` (lower case), or NULL. */
const char *sg__http_header_get(const sg__http_request *req, const char *name);

/* Answers `status` (100..599) with `headers` (whole lines "Name: value\r\n",
 * may be NULL; the caller guarantees no bare CR/LF inside) and `body`
 * (copied); the connection then waits for the next request or closes (see
 * above). Consumes the handler's reference.
 * SG_ECANCELED when the connection is gone (nothing is sent), SG_EINVAL when
 * already answered (the reference is not consumed then). */
int sg__http_respond(sg__http_request *req, int status, const char *headers,
                     const void *body, size_t len);

/* Starts a stream: the status line and `headers`, no Content-Length; the
 * body is what sg__http_stream_write sends, until sg__http_request_release.
 * Does not consume the reference. SG_ECANCELED, SG_EINVAL as above. */
int sg__http_stream_begin(sg__http_request *req, int status, const char *headers);

/* Queues `data` (copied) on a stream. SG_ECANCELED when the connection is
 * gone, SG_EINVAL when not streaming, SG_ELIMIT when the reader is too far
 * behind (the connection is then closed and the gone callback runs). */
int sg__http_stream_write(sg__http_request *req, const void *data, size_t len);

/* Unwritten bytes of the request's connection (0 when gone). */
size_t sg__http_pending_bytes(const sg__http_request *req);

/* Gives the handler's reference back: an unanswered request gets 500, a
 * stream ends (closed once its bytes are written). */
void sg__http_request_release(sg__http_request *req);

/* Asks to hear if the connection closes before the request is finished.
 * 0, SG_ECANCELED (already gone), SG_EINVAL (finished, or a callback is set). */
int sg__http_request_on_gone(sg__http_request *req, sg__http_gone_cb cb, void *ud);

int sg__http_request_alive(const sg__http_request *req);

typedef struct sg__http_stats {
  uint64_t accepted, rejected, requests;
  unsigned active;  /* connections open now */
} sg__http_stats;

typedef void (*sg__http_server_close_cb)(sg__http_server *srv);

struct sg__http_server {
  void *data;  /* the embedder's */
  /* private */
  sg__listener listener;
  sg__http_limits limits;
  const sg__logger *log;
  sg__http_handler handler;
  void *handler_ud;
  sg__http_server_close_cb close_cb;
  sg__http_stats stats;
};

/* Prepares `srv` on `loop` with `handler` (required). `limits` is copied
 * (NULL: defaults), `log` borrowed (NULL: stderr). On failure nothing needs
 * closing; on success close with sg__http_server_close even if listen fails. */
int sg__http_server_init(uv_loop_t *loop, sg__http_server *srv, const sg__http_limits *limits,
                         const sg__logger *log, sg__http_handler handler, void *ud);
/* "127.0.0.1:7070", "[::1]:7070"; port 0 picks one. SG_EINVAL or libuv's error. */
int sg__http_server_listen(sg__http_server *srv, const char *address);
int sg__http_server_port(const sg__http_server *srv);
void sg__http_server_stats_get(const sg__http_server *srv, sg__http_stats *out);
/* Stops listening and closes every connection (gone callbacks run with
 * SG_ECANCELED before this returns); close_cb (may be NULL) runs once
 * everything is freed, except requests handlers still hold (each freed when
 * its handler gives it back). */
void sg__http_server_close(sg__http_server *srv, sg__http_server_close_cb close_cb);

#endif
