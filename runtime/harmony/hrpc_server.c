/* hRPC server: http-parser on uv TCP. One request at a time per connection:
 * when a request is complete the parser is paused until its response has
 * been written, which answers pipelined requests in order for free. */
#include "hrpc_server.h"

#include <http_parser.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>

#include "address.h"
#include "buf.h"
#include "hrpc/v1/hrpc.pb-c.h"
#include "hrpc_errors.h"
#include "segue.h"

#define RBUF_SIZE 16384
#define CT_HRPC "application/hrpc"

#define container_of(ptr, type, member) \
  ((type *)((char *)(ptr) - offsetof(type, member)))

/* The server's own answer to a request it refuses. */
typedef struct verdict {
  int status;            /* 0: none */
  const char *id;
  char msg[160];
} verdict;

struct sg__hrpc_route {
  char *path;
  sg__hrpc_handler handler;
  void *ud;
};

/* Connection states, in order: the parser runs only up to ST_BODY. */
enum { ST_IDLE, ST_HEAD, ST_BODY, ST_BUSY, ST_WRITING, ST_LINGER, ST_CLOSING };
/* What answers a request: a handler, the health check, or the server. */
enum { K_ROUTE, K_HEALTH, K_ERROR };
/* Where the header being parsed is: its name or its value. */
enum { H_NONE, H_FIELD, H_VALUE };

typedef struct sg__hrpc_conn conn;

typedef struct req {
  sg__hrpc_request pub;
  conn *conn;            /* NULL once detached from its connection */
  int refs;              /* the connection's + the handler's */
  int answered;
  sg__hrpc_done_cb done_cb;
  void *done_ud;
  sg__buf url, body, ctype, auth, expect;  /* kept (emptied) when recycled */
  int has_auth;          /* an Authorization header came (auth may hold "") */
  sg__buf *hval;            /* the buffer the current header value goes to */
  char hname[16];        /* the current header name, when short enough */
  size_t hname_len;
  int hstate;
  size_t head_bytes, body_seen;
  int kind, keep_alive, http10;
  sg__hrpc_handler handler;
  void *handler_ud;
  verdict refusal;       /* kind K_ERROR: answered after the body is dropped */
  char peer[64];
} req;

struct sg__hrpc_conn {
  sg__lconn link;        /* first: in srv->listener.conns */
  sg__hrpc_server *srv;
  uv_tcp_t tcp;
  uv_timer_t timer;
  uv_write_t wreq, creq;
  uv_shutdown_t sreq;
  http_parser parser;
  int state, reading, continue_pending;
  int written_now;       /* the response went out in one uv_try_write */
  req *req;              /* the request being read or answered */
  req *spare;            /* the last request, recycled for the next one */
  char *wbuf;            /* the response being written (kept for the next) */
  size_t wcap;
  verdict fail;          /* a parser callback's: answered at once, then close */
  size_t roff, rlen;     /* rbuf[roff..rlen) is read but not parsed yet */
  uint64_t since;        /* uv_now when its current wait (head, idle) began */
  struct sockaddr_storage addr;  /* the peer's; family 0 when unknown */
  char peer[64];
  char rbuf[RBUF_SIZE];
};

static void conn_parse(conn *c);
static void conn_close(conn *c, int status);
static void limit_check_over(sg__hrpc_server *srv);
static int conn_respond(conn *c, int status, const char *ctype,
                        const void *body, size_t len);

/* ---- small helpers ------------------------------------------------------ */

void sg__hrpc_limits_default(sg__hrpc_limits *l) {
  l->max_header_bytes = SG_HRPC_DEFAULT_MAX_HEADER_BYTES;
  l->max_body_bytes = SG_HRPC_DEFAULT_MAX_BODY_BYTES;
  l->header_timeout_ms = SG_HRPC_DEFAULT_HEADER_TIMEOUT_MS;
  l->body_timeout_ms = SG_HRPC_DEFAULT_BODY_TIMEOUT_MS;
  l->idle_timeout_ms = SG_HRPC_DEFAULT_IDLE_TIMEOUT_MS;
  l->write_timeout_ms = SG_HRPC_DEFAULT_WRITE_TIMEOUT_MS;
  l->linger_ms = SG_HRPC_DEFAULT_LINGER_MS;
  l->max_connections = SG_HRPC_DEFAULT_MAX_CONNECTIONS;
}

/* Copies `in` over the defaults, field by field, where it is non-zero. */
static void limits_merge(sg__hrpc_limits *out, const sg__hrpc_limits *in) {
  sg__hrpc_limits_default(out);
  if (!in) return;
#define TAKE(f) if (in->f) out->f = in->f
  TAKE(max_header_bytes); TAKE(max_body_bytes); TAKE(header_timeout_ms);
  TAKE(body_timeout_ms); TAKE(idle_timeout_ms); TAKE(write_timeout_ms);
  TAKE(linger_ms); TAKE(max_connections); TAKE(max_connections_per_address);
#undef TAKE
}

/* An hrpc.v1.Error, serialized into fresh memory the caller frees. */
static uint8_t *error_encode(const char *id, const char *msg, const uint8_t *details,
                             size_t details_len, size_t *out_len) {
  Hrpc__V1__Error e = HRPC__V1__ERROR__INIT;
  e.identifier = (char *)id;
  e.human_message = (char *)(msg ? msg : "");
  e.details.data = (uint8_t *)details;
  e.details.len = details ? details_len : 0;
  *out_len = hrpc__v1__error__get_packed_size(&e);
  uint8_t *buf = malloc(*out_len ? *out_len : 1);
  if (buf) hrpc__v1__error__pack(&e, buf);
  return buf;
}

/* application/hrpc, any case, optionally followed by ";parameters". */
static int content_type_ok(const sg__buf *ct) {
  static const char want[] = CT_HRPC;
  const size_t n = sizeof want - 1;
  if (!ct->p || ct->len < n || strncasecmp(ct->p, want, n) != 0) return 0;
  const char *rest = ct->p + n;
  while (*rest == ' ' || *rest == '\t') rest++;
  return *rest == '\0' || *rest == ';';
}

/* ---- requests ----------------------------------------------------------- */

/* Keep-alive: a connection reuses its last request's memory (the struct
 * and its buffers) for the next, unless a buffer grew past this. */
#define KEEP_BYTES 65536

static void req_free(req *r) {
  sg__buf_free(&r->url);
  sg__buf_free(&r->body);
  sg__buf_free(&r->ctype);
  sg__buf_free(&r->auth);
  sg__buf_free(&r->expect);
  free(r);
}

/* A finished request of a connection that goes on: made ready for the next. */
static void req_recycle(conn *c, req *r) {
  /* Emptied (absent again: their users test len or the has_ flags). */
  sg__buf keep[5] = {r->url, r->body, r->ctype, r->auth, r->expect};
  for (size_t i = 0; i < 5; i++) sg__buf_clear(&keep[i], KEEP_BYTES);
  memset(r, 0, sizeof *r);
  r->url = keep[0];
  r->body = keep[1];
  r->ctype = keep[2];
  r->auth = keep[3];
  r->expect = keep[4];
  c->spare = r;
}

static req *req_new(conn *c) {
  req *r = c->spare;
  c->spare = NULL;
  if (!r && !(r = calloc(1, sizeof *r))) return NULL;
  r->conn = c;
  r->refs = 1;
  memcpy(r->peer, c->peer, sizeof r->peer);
  r->pub.peer = r->peer;
  r->pub.path = "";
  return r;
}

static void req_unref(req *r) {
  if (--r->refs > 0) return;
  conn *c = r->conn;
  if (c && !c->spare && c->state != ST_CLOSING)
    req_recycle(c, r);
  else
    req_free(r);
}

/* Runs the done callback, at most once. */
static void req_done(req *r, int status) {
  sg__hrpc_done_cb cb = r->done_cb;
  if (!cb) return;
  r->done_cb = NULL;
  cb(&r->pub, r->done_ud, status);
}

/* The connection lets go of its request: a late answer becomes a no-op. */
static void req_detach(req *r, int status) {
  r->conn = NULL;
  req_done(r, status);
  req_unref(r);
}

/* The handler gives back its reference. */
static void req_finish(req *r) {
  r->answered = 1;
  req_unref(r);
}

/* Per-connection log lines (refusals, time-outs): at most LOG_BURST in a
 * LOG_PERIOD_MS period, then one line saying how many were left out. */
#define LOG_BURST 20
#define LOG_PERIOD_MS 10000

static void slog(sg__hrpc_server *srv, sg_log_level lvl, const char *peer, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void slog(sg__hrpc_server *srv, sg_log_level lvl, const char *peer, const char *fmt, ...) {
  uint64_t now = uv_now(srv->listener.loop);
  if (now - srv->log_window >= LOG_PERIOD_MS) {
    if (srv->log_dropped)
      sg__log(srv->log, SG_LOG_WARN, NULL, NULL,
              "hrpc: %u more refusals and time-outs were not logged in the last %d s",
              srv->log_dropped, LOG_PERIOD_MS / 1000);
    srv->log_window = now;
    srv->log_lines = srv->log_dropped = 0;
  }
  if (srv->log_lines >= LOG_BURST) {
    srv->log_dropped++;
    return;
  }
  srv->log_lines++;
  char msg[256];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  sg__log(srv->log, lvl, peer ? "peer" : NULL, peer, "%s", msg);
}

/* Records a verdict and logs it with the peer's address. */
static void verdict_setv(verdict *v, sg__hrpc_server *srv, sg_log_level lvl, const char *peer,
                         int status, const char *id, const char *fmt, va_list ap) {
  vsnprintf(v->msg, sizeof v->msg, fmt, ap);
  v->status = status;
  v->id = id;
  slog(srv, lvl, peer, "hrpc %d %s: %s", status, id, v->msg);
}

/* The server answers this request itself, after the body is read (and
 * dropped), so that the connection can be kept alive. */
static void req_reject(req *r, sg__hrpc_server *srv, sg_log_level lvl, int status,
                       const char *id, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));
static void req_reject(req *r, sg__hrpc_server *srv, sg_log_level lvl, int status,
                       const char *id, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  verdict_setv(&r->refusal, srv, lvl, r->peer, status, id, fmt, ap);
  va_end(ap);
  r->kind = K_ERROR;
}

/* ---- the public request API ---------------------------------------------- */

static int respond_error_on(conn *c, int status, const char *id, const char *msg,
                            const uint8_t *details, size_t details_len) {
  size_t n;
  uint8_t *buf = error_encode(id, msg, details, details_len, &n);
  if (!buf) {
    conn_close(c, SG_ENOMEM);
    return SG_ENOMEM;
  }
  int rc = conn_respond(c, status, CT_HRPC, buf, n);
  free(buf);
  return rc;
}

int sg__hrpc_respond(sg__hrpc_request *pub, const uint8_t *body, size_t len) {
  req *r = container_of(pub, req, pub);
  if (r->answered) return SG_EINVAL;
  int rc = r->conn ? conn_respond(r->conn, 200, CT_HRPC, body, len) : SG_ECANCELED;
  req_finish(r);
  return rc;
}

int sg__hrpc_respond_error(sg__hrpc_request *pub, int http_status, const char *identifier,
                          const char *human_message, const uint8_t *details,
                          size_t details_len) {
  req *r = container_of(pub, req, pub);
  if (r->answered || http_status < 200 || http_status > 599 || !identifier)
    return SG_EINVAL;
  int rc = r->conn ? respond_error_on(r->conn, http_status, identifier, human_message,
                                      details, details_len)
                   : SG_ECANCELED;
  req_finish(r);
  return rc;
}

void sg__hrpc_request_release(sg__hrpc_request *pub) {
  req *r = container_of(pub, req, pub);
  if (r->conn)
    respond_error_on(r->conn, 500, SG__HRPC_INTERNAL, "the handler gave no answer", NULL, 0);
  req_finish(r);
}

int sg__hrpc_request_on_done(sg__hrpc_request *pub, sg__hrpc_done_cb cb, void *ud) {
  req *r = container_of(pub, req, pub);
  if (!cb || r->answered || r->done_cb) return SG_EINVAL;
  if (!r->conn) return SG_ECANCELED;
  r->done_cb = cb;
  r->done_ud = ud;
  return 0;
}

int sg__hrpc_request_alive(const sg__hrpc_request *pub) {
  const req *r = container_of(pub, const req, pub);
  return r->conn != NULL;
}

/* ---- connections: timers, closing ---------------------------------------- */

/* Closing has finished: every handle is closed. */
static void on_drained(sg__listener *l) {
  sg__hrpc_server *srv = (sg__hrpc_server *)((char *)l - offsetof(sg__hrpc_server, listener));
  for (size_t i = 0; i < srv->nroutes; i++) free(srv->routes[i].path);
  free(srv->routes);
  srv->routes = NULL;
  srv->nroutes = srv->route_cap = 0;
  if (srv->close_cb) srv->close_cb(srv);
}

static void on_conn_closed(uv_handle_t *h) {
  conn *c = h->data;
  sg__hrpc_server *srv = c->srv;
  if (!sg__listener_conn_closed(&srv->listener, &c->link)) return;
  if (c->spare) req_free(c->spare);
  free(c->wbuf);
  free(c);
  srv->stats.active--;
  limit_check_over(srv);
  sg__listener_release(&srv->listener);
}

/* Idempotent. The request in progress, if any, is detached with `status`
 * (its done callback runs now, not after close). */
static void conn_close(conn *c, int status) {
  if (c->state == ST_CLOSING) return;
  c->state = ST_CLOSING;
  c->srv->live--;
  if (c->req) {
    req *r = c->req;
    c->req = NULL;
    req_detach(r, status);
  }
  uv_close((uv_handle_t *)&c->tcp, on_conn_closed);
  uv_close((uv_handle_t *)&c->timer, on_conn_closed);
}

static void written(conn *c, int status);

static void on_timer(uv_timer_t *t) {
  conn *c = t->data;
  if (c->written_now) {  /* not a timeout: the write's completion (conn_respond) */
    c->written_now = 0;
    written(c, 0);
    return;
  }
  static const char *const what[] = {
      [ST_HEAD] = "request headers not complete in time",
      [ST_BODY] = "request body not complete in time",
      [ST_WRITING] = "response not written in time",
  };
  if (c->state < (int)(sizeof what / sizeof *what) && what[c->state])
    slog(c->srv, SG_LOG_WARN, c->peer, "hrpc: %s, closing", what[c->state]);
  conn_close(c, SG_ETIMEDOUT);
}

static void conn_timer(conn *c, uint64_t ms) {
  uv_timer_start(&c->timer, on_timer, ms, 0);
}

/* ---- reading ------------------------------------------------------------- */

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  conn *c = h->data;
  if (c->roff == c->rlen) {
    c->roff = c->rlen = 0;
  } else if (c->rlen == RBUF_SIZE && c->roff > 0) {
    memmove(c->rbuf, c->rbuf + c->roff, c->rlen - c->roff);
    c->rlen -= c->roff;
    c->roff = 0;
  }
  /* A full buffer gives a zero-length buf: libuv answers UV_ENOBUFS and we
   * stop reading until the parser has caught up. */
  *buf = uv_buf_init(c->rbuf + c->rlen, (unsigned)(RBUF_SIZE - c->rlen));
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  conn *c = s->data;
  if (nread == UV_ENOBUFS) {
    uv_read_stop(s);
    c->reading = 0;
  } else if (nread < 0) {
    /* EOF too: a peer that half-closes is taken as gone, so that a response
     * to a peer that gave up is never reported as delivered. */
    conn_close(c, nread == UV_EOF ? SG_ECANCELED : (int)nread);
  } else if (c->state == ST_LINGER) {
    c->roff = c->rlen = 0;
  } else if (nread > 0) {
    c->rlen += (size_t)nread;
    if (c->state <= ST_BODY) conn_parse(c);
  }
}

static void conn_read_resume(conn *c) {
  if (c->reading || c->state == ST_CLOSING) return;
  if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) == 0) c->reading = 1;
}

/* ---- parser callbacks ---------------------------------------------------- */

/* Records why the request is rejected; the response closes the connection.
 * Returns -1 so that the parser stops. */
static int conn_fail(conn *c, int status, const char *id, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int conn_fail(conn *c, int status, const char *id, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  verdict_setv(&c->fail, c->srv, SG_LOG_WARN, c->peer, status, id, fmt, ap);
  va_end(ap);
  return -1;
}

static int head_count(conn *c, size_t n) {
  req *r = c->req;
  r->head_bytes += n;
  if (r->head_bytes <= c->srv->limits.max_header_bytes) return 0;
  return conn_fail(c, 431, SG__HRPC_BAD_UNARY, "request header exceeds %zu bytes",
                   c->srv->limits.max_header_bytes);
}

static int on_message_begin(http_parser *p) {
  conn *c = p->data;
  if (!(c->req = req_new(c))) return conn_fail(c, 503, SG__HRPC_UNAVAILABLE, "out of memory");
  /* The first request's header time-out runs from accept already. */
  if (c->state == ST_IDLE) {
    conn_timer(c, c->srv->limits.header_timeout_ms);
    c->since = uv_now(c->srv->listener.loop);
  }
  c->state = ST_HEAD;
  return 0;
}

static int on_url(http_parser *p, const char *at, size_t n) {
  conn *c = p->data;
  if (head_count(c, n)) return -1;
  if (sg__buf_append(&c->req->url, at, n)) return conn_fail(c, 503, SG__HRPC_UNAVAILABLE, "out of memory");
  return 0;
}

static int on_header_field(http_parser *p, const char *at, size_t n) {
  conn *c = p->data;
  req *r = c->req;
  if (head_count(c, n + (r->hstate == H_FIELD ? 0 : 4))) return -1;  /* ": " CRLF */
  if (r->hstate != H_FIELD) r->hname_len = 0;
  r->hstate = H_FIELD;
  /* Names longer than hname are none we look at: keep them unmatched. */
  if (r->hname_len + n < sizeof r->hname) memcpy(r->hname + r->hname_len, at, n);
  r->hname_len += n;
  return 0;
}

/* The buffer a header value is kept in, or NULL for a header we ignore. */
static sg__buf *header_target(req *r) {
  if (r->hname_len >= sizeof r->hname) return NULL;
  r->hname[r->hname_len] = '\0';
  if (strcasecmp(r->hname, "content-type") == 0) return &r->ctype;
  if (strcasecmp(r->hname, "authorization") == 0) return &r->auth;
  if (strcasecmp(r->hname, "expect") == 0) return &r->expect;
  return NULL;
}

static int on_header_value(http_parser *p, const char *at, size_t n) {
  conn *c = p->data;
  req *r = c->req;
  if (head_count(c, n)) return -1;
  if (r->hstate != H_VALUE) {
    r->hstate = H_VALUE;
    r->hval = header_target(r);
    if (r->hval) r->hval->len = 0;  /* a repeated header: the last one wins */
    if (r->hval == &r->auth) r->has_auth = 1;
  }
  if (r->hval && sg__buf_append(r->hval, at, n))
    return conn_fail(c, 503, SG__HRPC_UNAVAILABLE, "out of memory");
  return 0;
}

/* Decides, once the headers are in, who answers the request. */
static void req_classify(conn *c, req *r, const http_parser *p) {
  sg__hrpc_server *log = c->srv;
  char *q = r->url.p ? strchr(r->url.p, '?') : NULL;
  if (q) *q = '\0';
  r->pub.path = r->url.p ? r->url.p : "";
  if (p->method == HTTP_GET && strcmp(r->pub.path, "/healthz") == 0) {
    r->kind = K_HEALTH;
  } else if (p->method != HTTP_POST) {
    req_reject(r, log, SG_LOG_WARN, 405, SG__HRPC_BAD_UNARY, "method %s not allowed: hRPC uses POST",
               http_method_str((enum http_method)p->method));
  } else if (!content_type_ok(&r->ctype)) {
    req_reject(r, log, SG_LOG_WARN, 400, SG__HRPC_BAD_UNARY, "Content-Type must be %s", CT_HRPC);
  } else {
    const sg__hrpc_server *srv = c->srv;
    for (size_t i = 0; i < srv->nroutes; i++) {
      if (strcmp(srv->routes[i].path, r->pub.path) != 0) continue;
      r->kind = K_ROUTE;
      r->handler = srv->routes[i].handler;
      r->handler_ud = srv->routes[i].ud;
      return;
    }
    req_reject(r, log, SG_LOG_INFO, 404, SG__HRPC_NOT_FOUND, "no method %s", r->pub.path);
  }
}

static void on_continue_written(uv_write_t *w, int status) {
  conn *c = container_of(w, conn, creq);
  c->continue_pending = 0;
}

/* "Expect: 100-continue": the peer waits for this before sending the body. */
static void conn_send_continue(conn *c) {
  static char msg[] = "HTTP/1.1 100 Continue\r\n\r\n";
  uv_buf_t b = uv_buf_init(msg, sizeof msg - 1);
  if (c->continue_pending) return;
  if (uv_write(&c->creq, (uv_stream_t *)&c->tcp, &b, 1, on_continue_written) == 0)
    c->continue_pending = 1;
}

static int on_headers_complete(http_parser *p) {
  conn *c = p->data;
  req *r = c->req;
  const size_t max = c->srv->limits.max_body_bytes;
  r->keep_alive = http_should_keep_alive(p);
  r->http10 = p->http_major == 1 && p->http_minor == 0;
  /* content_length is ULLONG_MAX when absent; with chunked it is not set. */
  if (!(p->flags & F_CHUNKED) && p->content_length != UINT64_MAX && p->content_length > max)
    return conn_fail(c, 413, SG__HRPC_BAD_UNARY, "request body of %llu bytes exceeds %zu",
                     (unsigned long long)p->content_length, max);
  req_classify(c, r, p);
  c->state = ST_BODY;
  conn_timer(c, c->srv->limits.body_timeout_ms);
  if (r->kind == K_ROUTE && r->expect.p && strcasecmp(r->expect.p, "100-continue") == 0 &&
      !r->http10)
    conn_send_continue(c);
  return 0;
}

static int on_body(http_parser *p, const char *at, size_t n) {
  conn *c = p->data;
  req *r = c->req;
  const size_t max = c->srv->limits.max_body_bytes;
  r->body_seen += n;
  if (r->body_seen > max)
    return conn_fail(c, 413, SG__HRPC_BAD_UNARY, "request body exceeds %zu bytes", max);
  if (r->kind != K_ROUTE) return 0;  /* dropped: the server answers it */
  if (sg__buf_append(&r->body, at, n)) return conn_fail(c, 503, SG__HRPC_UNAVAILABLE, "out of memory");
  return 0;
}

static int on_message_complete(http_parser *p) {
  /* Stop here: the rest of the buffer is the next request, parsed after
   * this one has been answered. */
  http_parser_pause(p, 1);
  return 0;
}

static const http_parser_settings parser_settings = {
    .on_message_begin = on_message_begin,
    .on_url = on_url,
    .on_header_field = on_header_field,
    .on_header_value = on_header_value,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

/* ---- answering ----------------------------------------------------------- */

static void conn_linger(conn *c);

/* The response is out (or failed): the request is done, and the next one
 * is read (keep-alive) or the connection ends. */
static void written(conn *c, int status) {
  if (c->wcap > KEEP_BYTES) {  /* a large response: not kept */
    free(c->wbuf);
    c->wbuf = NULL;
    c->wcap = 0;
  }
  if (c->state == ST_CLOSING) return;  /* the request was detached already */
  req *r = c->req;
  c->req = NULL;
  int keep = r->keep_alive && status == 0;
  req_done(r, status);
  req_unref(r);
  if (c->state == ST_CLOSING) return;  /* the done callback closed the server */
  if (status < 0) {
    conn_close(c, status);
  } else if (!keep) {
    conn_linger(c);
  } else {
    c->state = ST_IDLE;
    c->since = uv_now(c->srv->listener.loop);
    conn_timer(c, c->srv->limits.idle_timeout_ms);
    http_parser_pause(&c->parser, 0);
    conn_parse(c);
  }
}

static void on_written(uv_write_t *w, int status) { written(container_of(w, conn, wreq), status); }

static const char *reason_phrase(int status) {
  const char *s = http_status_str((enum http_status)status);
  return s[0] == '<' ? "Unknown" : s;
}

static char *put(char *p, const char *s) {
  size_t n = strlen(s);
  memcpy(p, s, n);
  return p + n;
}

static char *put_number(char *p, size_t v) {
  char digits[24];
  int n = 0;
  do digits[n++] = (char)('0' + v % 10);
  while ((v /= 10) != 0);
  while (n) *p++ = digits[--n];
  return p;
}

/* Writes the response to c->req (head and body in one buffer, the
 * connection's, reused from one response to the next). On failure the
 * connection is closed and the error returned. */
static int conn_respond(conn *c, int status, const char *ctype, const void *body, size_t len) {
  req *r = c->req;
  if (c->srv->listener.closing) r->keep_alive = 0;
  const char *conn_hdr = !r->keep_alive ? "Connection: close\r\n"
                         : r->http10    ? "Connection: keep-alive\r\n"
                                        : "";
  const char *reason = reason_phrase(status);
  /* the head's fixed text, the status, reason, type, length and Connection */
  size_t need = 96 + 4 + strlen(reason) + strlen(ctype) + 24 + strlen(conn_hdr) + len;
  if (need > c->wcap) {
    char *buf = realloc(c->wbuf, need);
    if (!buf) {
      conn_close(c, SG_ENOMEM);
      return SG_ENOMEM;
    }
    c->wbuf = buf;
    c->wcap = need;
  }
  char *p = put(c->wbuf, "HTTP/1.1 ");
  p = put_number(p, (size_t)status);
  *p++ = ' ';
  p = put(p, reason);
  p = put(p, "\r\nContent-Type: ");
  p = put(p, ctype);
  p = put(p, "\r\nContent-Length: ");
  p = put_number(p, len);
  p = put(p, "\r\nHrpc-Version: 1\r\n");
  p = put(p, conn_hdr);
  p = put(p, "\r\n");
  if (len) memcpy(p, body, len);
  uv_buf_t b = uv_buf_init(c->wbuf, (unsigned)((size_t)(p - c->wbuf) + len));
  /* Most responses fit the socket's buffer: written at once, their
   * completion runs from the connection's timer at 0 ms (the next loop
   * turn, as a uv_write's would), which spares libuv's write request and
   * the epoll_ctl it costs per response. The rest (or all of it, when a
   * 100 Continue is still queued: EAGAIN) goes through uv_write. */
  int rc = uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
  int all = rc == (int)b.len;
  if (!all && (rc >= 0 || rc == UV_EAGAIN)) {  /* the rest, or all of it */
    if (rc > 0) b = uv_buf_init(b.base + rc, b.len - (unsigned)rc);
    rc = uv_write(&c->wreq, (uv_stream_t *)&c->tcp, &b, 1, on_written);
  }
  if (rc < 0) {
    conn_close(c, rc);
    return rc;
  }
  c->srv->stats.requests++;
  c->state = ST_WRITING;
  c->written_now = all;
  conn_timer(c, all ? 0 : c->srv->limits.write_timeout_ms);
  return 0;
}

static void on_shutdown(uv_shutdown_t *s, int status) {
  conn *c = container_of(s, conn, sreq);
  if (status < 0) conn_close(c, status);
}

/* After the last response: send FIN, then read and drop what the peer still
 * sends until it closes or linger_ms pass, so that it does not get a reset
 * before it has read our answer. */
static void conn_linger(conn *c) {
  c->state = ST_LINGER;
  c->roff = c->rlen = 0;
  if (uv_shutdown(&c->sreq, (uv_stream_t *)&c->tcp, on_shutdown) != 0) {
    conn_close(c, 0);
    return;
  }
  conn_timer(c, c->srv->limits.linger_ms);
  conn_read_resume(c);
}

static void conn_dispatch(conn *c) {
  req *r = c->req;
  uv_timer_stop(&c->timer);
  c->state = ST_BUSY;
  if (r->kind == K_HEALTH) {
    conn_respond(c, 200, "text/plain", "ok", 2);
  } else if (r->kind == K_ERROR) {
    respond_error_on(c, r->refusal.status, r->refusal.id, r->refusal.msg, NULL, 0);
  } else {
    r->pub.body = r->body.len ? (const uint8_t *)r->body.p : NULL;
    r->pub.body_len = r->body.len;
    r->pub.authorization = r->has_auth ? (r->auth.p ? r->auth.p : "") : NULL;
    r->refs++;  /* the handler's, given back by respond or release */
    r->handler(&r->pub, r->handler_ud);
  }
}

/* A request the parser rejected: answer it and close the connection. */
static void conn_bad_request(conn *c, enum http_errno e) {
  if (!c->fail.status) {
    if (e == HPE_HEADER_OVERFLOW)
      conn_fail(c, 431, SG__HRPC_BAD_UNARY, "request header too large");
    else
      conn_fail(c, 400, SG__HRPC_BAD_UNARY, "malformed HTTP request: %s", http_errno_description(e));
  }
  if (!c->req && !(c->req = req_new(c))) {
    conn_close(c, SG_ENOMEM);
    return;
  }
  c->req->keep_alive = 0;
  uv_timer_stop(&c->timer);
  c->state = ST_BUSY;
  respond_error_on(c, c->fail.status, c->fail.id, c->fail.msg, NULL, 0);
}

static void conn_parse(conn *c) {
  while (c->state <= ST_BODY && c->roff < c->rlen) {
    size_t avail = c->rlen - c->roff;
    size_t n = http_parser_execute(&c->parser, &parser_settings, c->rbuf + c->roff, avail);
    c->roff += n;
    enum http_errno e = HTTP_PARSER_ERRNO(&c->parser);
    if (e == HPE_PAUSED) {
      conn_dispatch(c);
    } else if (e != HPE_OK) {
      conn_bad_request(c, e);
      return;
    } else if (n < avail) {
      conn_bad_request(c, HPE_UNKNOWN);  /* an upgrade: not ours to speak */
      return;
    }
  }
  conn_read_resume(c);
}

/* ---- accepting ----------------------------------------------------------- */

unsigned sg__hrpc_connection_limit(unsigned configured) {
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY) return configured ? configured : 1024;
  rlim_t reserve = rl.rlim_cur / 8 > SG_HRPC_NOFILE_RESERVE_MIN ? rl.rlim_cur / 8 : SG_HRPC_NOFILE_RESERVE_MIN;
  rlim_t room = rl.rlim_cur > reserve + 8 ? rl.rlim_cur - reserve : 8;
  if (room > 1u << 20) room = 1u << 20;
  return configured && configured < room ? configured : (unsigned)room;
}

/* Once per episode: a limit was reached, and again once it is over. */
static void limit_reached(sg__hrpc_server *srv, const char *which) {
  if (srv->at_limit) return;
  srv->at_limit = 1;
  sg__log(srv->log, SG_LOG_WARN, NULL, NULL,
          "hrpc: %s reached (%u open, limit %u, %u per address): closing the connections "
          "waiting longest without a request to make room, refusing when there are none; "
          "said once until the server is below it", which, srv->live,
          srv->limits.max_connections, srv->limits.max_connections_per_address);
}

static void limit_check_over(sg__hrpc_server *srv) {
  if (!srv->at_limit || srv->live > srv->limits.max_connections / 2) return;
  srv->at_limit = 0;
  sg__log(srv->log, SG_LOG_INFO, NULL, NULL,
          "hrpc: below the connection limit again (%llu evicted, %llu refused so far)",
          (unsigned long long)srv->stats.evicted, (unsigned long long)srv->stats.rejected);
}

static int same_address(const struct sockaddr_storage *a, const struct sockaddr_storage *b) {
  if (a->ss_family != b->ss_family) return 0;
  if (a->ss_family == AF_INET)
    return ((const struct sockaddr_in *)a)->sin_addr.s_addr ==
           ((const struct sockaddr_in *)b)->sin_addr.s_addr;
  if (a->ss_family == AF_INET6)
    return memcmp(&((const struct sockaddr_in6 *)a)->sin6_addr,
                  &((const struct sockaddr_in6 *)b)->sin6_addr, 16) == 0;
  return 0;
}

/* The connection (from `addr`, or any when NULL; never `except`) that has
 * waited longest with no request in progress, or NULL. A scan: it runs
 * only at a limit, over at most max_connections entries. */
static conn *slowest_waiting(sg__hrpc_server *srv, const struct sockaddr_storage *addr,
                             const conn *except) {
  conn *best = NULL;
  for (conn *c = (conn *)srv->listener.conns; c; c = (conn *)c->link.next) {
    int waiting = c->state == ST_HEAD || c->state == ST_IDLE || c->state == ST_LINGER;
    if (!waiting || c == except || (addr && !same_address(&c->addr, addr))) continue;
    if (!best || c->since < best->since) best = c;
  }
  return best;
}

static unsigned count_from(sg__hrpc_server *srv, const struct sockaddr_storage *addr) {
  unsigned n = 0;
  for (conn *c = (conn *)srv->listener.conns; c; c = (conn *)c->link.next)
    if (c->state != ST_CLOSING && same_address(&c->addr, addr)) n++;
  return n;
}

static void evict(conn *victim) {
  victim->srv->stats.evicted++;
  conn_close(victim, SG_ECANCELED);
}

static conn *conn_new(sg__hrpc_server *srv) {
  conn *c = calloc(1, sizeof *c);
  if (!c) return NULL;
  c->srv = srv;
  sg__listener_add(&srv->listener, &c->link, &c->tcp, &c->timer, c);
  c->state = ST_HEAD;
  c->since = uv_now(srv->listener.loop);
  http_parser_init(&c->parser, HTTP_REQUEST);
  c->parser.data = c;
  srv->stats.active++;
  srv->live++;
  return c;
}

/* Makes room for `c` among the connections from its address: 0, or -1 when
 * there is none to make (then `c` is closed). */
static int per_address_room(sg__hrpc_server *srv, conn *c) {
  int len = sizeof c->addr;
  if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&c->addr, &len) != 0) return 0;
  if (count_from(srv, &c->addr) <= srv->limits.max_connections_per_address) return 0;
  limit_reached(srv, "the connection limit per address");
  conn *victim = slowest_waiting(srv, &c->addr, c);
  if (victim) {
    evict(victim);
    return 0;
  }
  srv->stats.rejected++;
  conn_close(c, SG_ECANCELED);
  return -1;
}

static void on_connection(uv_stream_t *server, int status) {
  sg__hrpc_server *srv = server->data;
  if (status < 0) {
    slog(srv, SG_LOG_WARN, NULL, "hrpc accept: %s", uv_strerror(status));
    return;
  }
  if (srv->live >= srv->limits.max_connections) {
    limit_reached(srv, "the connection limit");
    conn *victim = slowest_waiting(srv, NULL, NULL);
    if (!victim) {
      srv->stats.rejected++;
      sg__listener_reject(&srv->listener);
      return;
    }
    evict(victim);
  }
  conn *c = conn_new(srv);
  if (!c) return;
  int rc = uv_accept(server, (uv_stream_t *)&c->tcp);
  if (rc) {
    conn_close(c, rc);
    return;
  }
  if (per_address_room(srv, c)) return;
  uv_tcp_nodelay(&c->tcp, 1);  /* one write per response: nothing to coalesce */
  srv->stats.accepted++;
  sg__address_peer(&c->tcp, c->peer, sizeof c->peer);
  conn_timer(c, srv->limits.header_timeout_ms);
  conn_read_resume(c);
}

/* ---- the server ---------------------------------------------------------- */

int sg__hrpc_server_init(uv_loop_t *loop, sg__hrpc_server *srv, const sg__hrpc_limits *limits,
                        const sg__logger *log) {
  memset(srv, 0, sizeof *srv);
  srv->log = log;
  limits_merge(&srv->limits, limits);
  unsigned asked = srv->limits.max_connections;
  srv->limits.max_connections = sg__hrpc_connection_limit(asked);
  if (asked && asked > srv->limits.max_connections)
    sg__log(log, SG_LOG_WARN, NULL, NULL,
            "hrpc: max_connections %u lowered to %u: the file descriptor limit (ulimit -n) "
            "keeps room for the rest of the process", asked, srv->limits.max_connections);
  if (!srv->limits.max_connections_per_address) {
    unsigned per = srv->limits.max_connections / 8;
    srv->limits.max_connections_per_address = per < 16 ? 16 : per;
  }
  return sg__listener_init(&srv->listener, loop, srv, on_drained);
}

int sg__hrpc_server_listen(sg__hrpc_server *srv, const char *address) {
  return sg__listener_listen(&srv->listener, address, on_connection);
}

int sg__hrpc_server_port(const sg__hrpc_server *srv) {
  return sg__listener_port(&srv->listener);
}

int sg__hrpc_server_route(sg__hrpc_server *srv, const char *path, sg__hrpc_handler handler,
                         void *ud) {
  if (!path || path[0] != '/' || !handler || srv->listener.closing) return SG_EINVAL;
  for (size_t i = 0; i < srv->nroutes; i++)
    if (strcmp(srv->routes[i].path, path) == 0) return SG_EEXIST;
  if (srv->nroutes == srv->route_cap) {
    size_t cap = srv->route_cap ? srv->route_cap * 2 : 8;
    struct sg__hrpc_route *r = realloc(srv->routes, cap * sizeof *r);
    if (!r) return SG_ENOMEM;
    srv->routes = r;
    srv->route_cap = cap;
  }
  char *copy = strdup(path);
  if (!copy) return SG_ENOMEM;
  srv->routes[srv->nroutes++] = (struct sg__hrpc_route){copy, handler, ud};
  return 0;
}

void sg__hrpc_server_stats_get(const sg__hrpc_server *srv, sg__hrpc_server_stats *out) {
  *out = srv->stats;
}

void sg__hrpc_server_close(sg__hrpc_server *srv, sg__hrpc_server_close_cb close_cb) {
  if (srv->listener.closing) return;
  srv->close_cb = close_cb;
  sg__listener_close(&srv->listener);
  for (conn *c = (conn *)srv->listener.conns; c; c = (conn *)c->link.next)
    conn_close(c, SG_ECANCELED);
}
