/* The client API's HTTP server: http-parser on uv TCP, persistent
 * connections, one request at a time per connection. A connection is freed
 * when both its handles are closed and its handler gave the request back,
 * whichever comes last. */
#include "http_server.h"

#include <http_parser.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "address.h"
#include "buf.h"
#include "segue.h"

#define RBUF_SIZE 16384
#define LINGER_MS 2000
#define KEEP_BYTES 65536  /* a request buffer larger than this is freed between requests */

#define container_of(ptr, type, member) ((type *)((char *)(ptr) - offsetof(type, member)))

/* Reading the request, waiting for the handler, writing, and closing. */
enum { ST_HEAD, ST_BODY, ST_HANDLER, ST_STREAM, ST_FLUSH, ST_LINGER, ST_CLOSED };

typedef struct sg__http_conn {
  sg__http_request pub;  /* first: the handler's view */
  sg__http_server *srv;  /* NULL once the handles are closed */
  sg__lconn link;        /* in srv->listener.conns */
  uv_tcp_t tcp;
  uv_timer_t timer;
  uv_shutdown_t sreq;
  http_parser parser;
  int state, held, answered, in_field;
  int keep;              /* the request asked to keep the connection open */
  unsigned served;       /* requests answered on this connection */
  size_t head_bytes, pending, nwrites;
  sg__http_gone_cb gone_cb;
  void *gone_ud;
  sg__buf url, body, hdrs;            /* hdrs: "name\0value\0" pairs */
  sg__buf rest;                       /* bytes read past the request (pipelined) */
  sg__http_header *headers;
  size_t nheaders, headers_cap;
  char method[16];
  char peer[64];
  char rbuf[RBUF_SIZE];
} conn;

typedef struct wreq {
  uv_write_t w;
  conn *c;
  size_t len;
  char data[];
} wreq;

static void conn_close(conn *c, int status);
static void conn_next(conn *c);
static void conn_done(conn *c);
static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *b);
static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *b);
static int conn_write(conn *c, const char *head, size_t hn, const void *body, size_t len);

void sg__http_limits_default(sg__http_limits *l) {
  *l = (sg__http_limits){16u * 1024, 64, 1024u * 1024, 10000, 30000, 30000, 4u << 20, 1024};
}

static void limits_merge(sg__http_limits *out, const sg__http_limits *in) {
  sg__http_limits_default(out);
  if (!in) return;
#define TAKE(f) if (in->f) out->f = in->f
  TAKE(max_header_bytes); TAKE(max_headers); TAKE(max_body_bytes); TAKE(header_timeout_ms);
  TAKE(body_timeout_ms); TAKE(write_timeout_ms); TAKE(max_pending_bytes); TAKE(max_connections);
#undef TAKE
}

static void conn_free(conn *c) {
  sg__buf_free(&c->url);
  sg__buf_free(&c->body);
  sg__buf_free(&c->hdrs);
  sg__buf_free(&c->rest);
  free(c->headers);
  free(c);
}

static const char *reason(int status) {
  const char *s = http_status_str((enum http_status)status);
  return s[0] == '<' ? "Unknown" : s;
}

/* ---- closing -------------------------------------------------------------- */

static void on_handle_closed(uv_handle_t *h) {
  conn *c = h->data;
  sg__http_server *srv = c->srv;
  if (!sg__listener_conn_closed(&srv->listener, &c->link)) return;
  c->srv = NULL;
  srv->stats.active--;
  if (!c->held) conn_free(c);
  sg__listener_release(&srv->listener);
}

static void conn_close(conn *c, int status) {
  if (c->state == ST_CLOSED) return;
  c->state = ST_CLOSED;
  sg__http_gone_cb cb = c->gone_cb;
  c->gone_cb = NULL;
  uv_close((uv_handle_t *)&c->tcp, on_handle_closed);
  uv_close((uv_handle_t *)&c->timer, on_handle_closed);
  if (cb && c->held && !c->answered) cb(&c->pub, c->gone_ud, status);
}

static void on_timer(uv_timer_t *t) {
  conn *c = t->data;
  if (c->state == ST_FLUSH && c->nwrites == 0) {  /* written at once: go on (conn_finish) */
    conn_done(c);
    return;
  }
  if (c->state == ST_HEAD && c->served && c->head_bytes == 0 && c->rest.len == 0)
    sg__log(c->srv->log, SG_LOG_DEBUG, "peer", c->peer, "http: idle connection closed");
  else if (c->state <= ST_BODY)
    sg__log(c->srv->log, SG_LOG_WARN, "peer", c->peer, "http: request not complete in time, closing");
  else if (c->state == ST_FLUSH)
    sg__log(c->srv->log, SG_LOG_WARN, "peer", c->peer, "http: response not written in time, closing");
  conn_close(c, SG_ETIMEDOUT);
}

static void on_shutdown(uv_shutdown_t *s, int status) {
  conn *c = container_of(s, conn, sreq);
  if (status < 0) conn_close(c, status);
}

/* Every byte written: FIN, then drop what the peer still sends for a while. */
static void conn_linger(conn *c) {
  c->state = ST_LINGER;
  uv_read_stop((uv_stream_t *)&c->tcp);  /* reading may have waited for the answer */
  if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) != 0 ||
      uv_shutdown(&c->sreq, (uv_stream_t *)&c->tcp, on_shutdown) != 0) {
    conn_close(c, 0);
    return;
  }
  uv_timer_start(&c->timer, on_timer, LINGER_MS, 0);
}

/* ---- writing -------------------------------------------------------------- */

static void on_written(uv_write_t *w, int status) {
  wreq *wr = container_of(w, wreq, w);
  conn *c = wr->c;
  c->pending -= wr->len;
  c->nwrites--;
  free(wr);
  if (c->state == ST_CLOSED) return;
  if (status < 0) conn_close(c, status);
  else if (c->state == ST_FLUSH && c->nwrites == 0) conn_done(c);
}

/* Writes head + body: what the socket takes at once, with no copy (an
 * answer or a stream's event usually fits), and the rest copied and queued
 * behind it. On failure the connection is closed. */
static int conn_write(conn *c, const char *head, size_t hn, const void *body, size_t len) {
  size_t off = 0;
  if (c->nwrites == 0) {  /* else it would overtake what is queued */
    uv_buf_t bufs[2] = {uv_buf_init((char *)head, (unsigned)hn),
                        uv_buf_init((char *)body, (unsigned)len)};
    int n = uv_try_write((uv_stream_t *)&c->tcp, hn ? bufs : bufs + 1, hn ? 2 : 1);
    if (n < 0 && n != UV_EAGAIN) {
      conn_close(c, n);
      return n;
    }
    if (n > 0) off = (size_t)n;
    if (off == hn + len) return 0;
  }
  size_t hoff = off < hn ? off : hn, boff = off - hoff;
  wreq *wr = malloc(sizeof *wr + hn + len - off);
  if (!wr) {
    conn_close(c, SG_ENOMEM);
    return SG_ENOMEM;
  }
  wr->c = c;
  wr->len = hn + len - off;
  if (hn > hoff) memcpy(wr->data, head + hoff, hn - hoff);
  if (len > boff) memcpy(wr->data + (hn - hoff), (const char *)body + boff, len - boff);
  uv_buf_t b = uv_buf_init(wr->data, (unsigned)wr->len);
  int rc = uv_write(&wr->w, (uv_stream_t *)&c->tcp, &b, 1, on_written);
  if (rc) {
    free(wr);
    conn_close(c, rc);
    return rc;
  }
  c->pending += wr->len;
  c->nwrites++;
  return 0;
}

/* The response is out and the handler gave the request back: the next
 * request on a persistent connection, or FIN. */
static void conn_done(conn *c) {
  if (!c->answered) return;  /* sg__http_request_release comes back here */
  if (c->keep && !c->srv->listener.closing) conn_next(c);
  else conn_linger(c);
}

/* After the last write: go on once everything is out; when it is already
 * (written at once), on the next turn, from the timer: never inside the
 * handler's call, which a pipelined request's handler would otherwise
 * nest in. */
static void conn_finish(conn *c) {
  if (c->state == ST_CLOSED || c->state >= ST_FLUSH) return;
  c->state = ST_FLUSH;
  uv_timer_start(&c->timer, on_timer, c->nwrites ? c->srv->limits.write_timeout_ms : 0, 0);
}

static int write_response(conn *c, int status, const char *headers, const void *body,
                          size_t len, int stream) {
  char head[512];
  int hn;
  if (stream || c->srv->listener.closing) c->keep = 0;
  const char *connection = c->keep ? "keep-alive" : "close";
  if (stream)
    hn = snprintf(head, sizeof head, "HTTP/1.1 %d %s\r\nConnection: %s\r\n", status,
                  reason(status), connection);
  else
    hn = snprintf(head, sizeof head, "HTTP/1.1 %d %s\r\nContent-Length: %zu\r\nConnection: %s\r\n",
                  status, reason(status), len, connection);
  sg__buf h = {0};
  int rc = sg__buf_append(&h, head, (size_t)hn);
  if (!rc && headers) rc = sg__buf_append(&h, headers, strlen(headers));
  if (!rc) rc = sg__buf_append(&h, "\r\n", 2);
  if (rc) {
    sg__buf_free(&h);
    conn_close(c, rc);
    return rc;
  }
  rc = conn_write(c, h.p, h.len, body, len);
  sg__buf_free(&h);
  if (!rc) c->srv->stats.requests++;
  return rc;
}

/* The server's own JSON error; the connection closes after it. */
static void conn_refuse(conn *c, int status, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void conn_refuse(conn *c, int status, const char *code, const char *fmt, ...) {
  char msg[200], body[300];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  sg__log(c->srv->log, SG_LOG_WARN, "peer", c->peer, "http %d: %s", status, msg);
  int n = snprintf(body, sizeof body, "{\"error\":\"%s\",\"code\":\"%s\"}", msg, code);
  uv_timer_stop(&c->timer);
  c->state = ST_HANDLER;
  c->keep = 0;
  c->answered = 1;  /* no handler saw it */
  if (write_response(c, status, "Content-Type: application/json\r\n", body, (size_t)n, 0) == 0)
    conn_finish(c);
}

/* ---- the public request API ------------------------------------------------- */

const char *sg__http_header_get(const sg__http_request *req, const char *name) {
  for (size_t i = 0; i < req->nheaders; i++)
    if (strcmp(req->headers[i].name, name) == 0) return req->headers[i].value;
  return NULL;
}

int sg__http_respond(sg__http_request *pub, int status, const char *headers, const void *body,
                     size_t len) {
  conn *c = (conn *)pub;
  if (c->answered || status < 100 || status > 599) return SG_EINVAL;
  int rc = SG_ECANCELED;
  if (c->state == ST_HANDLER) {
    rc = write_response(c, status, headers, body, len, 0);
    if (!rc) conn_finish(c);
  }
  sg__http_request_release(pub);
  return rc;
}

int sg__http_stream_begin(sg__http_request *pub, int status, const char *headers) {
  conn *c = (conn *)pub;
  if (c->answered || status < 100 || status > 599) return SG_EINVAL;
  if (c->state != ST_HANDLER) return c->state == ST_STREAM ? SG_EINVAL : SG_ECANCELED;
  int rc = write_response(c, status, headers, NULL, 0, 1);
  if (!rc) c->state = ST_STREAM;
  return rc;
}

int sg__http_stream_write(sg__http_request *pub, const void *data, size_t len) {
  conn *c = (conn *)pub;
  if (c->answered) return SG_EINVAL;
  if (c->state == ST_CLOSED || c->state > ST_STREAM) return SG_ECANCELED;
  if (c->state != ST_STREAM) return SG_EINVAL;
  if (c->pending + len > c->srv->limits.max_pending_bytes) {
    sg__log(c->srv->log, SG_LOG_WARN, "peer", c->peer,
            "http: stream reader is %zu bytes behind, closing", c->pending);
    conn_close(c, SG_ELIMIT);
    return SG_ELIMIT;
  }
  return conn_write(c, NULL, 0, data, len);
}

size_t sg__http_pending_bytes(const sg__http_request *pub) {
  const conn *c = (const conn *)pub;
  return c->state == ST_CLOSED ? 0 : c->pending;
}

void sg__http_request_release(sg__http_request *pub) {
  conn *c = (conn *)pub;
  if (c->answered) return;
  if (c->state == ST_HANDLER) {
    static const char body[] = "{\"error\":\"the request was not answered\",\"code\":\"EINTERNAL\"}";
    if (write_response(c, 500, "Content-Type: application/json\r\n", body, sizeof body - 1, 0) == 0)
      conn_finish(c);
  } else if (c->state == ST_STREAM) {
    conn_finish(c);
  }
  c->answered = 1;
  c->held = 0;
  c->gone_cb = NULL;
  if (!c->srv) conn_free(c);
  else if (c->state == ST_FLUSH && c->nwrites == 0) uv_timer_start(&c->timer, on_timer, 0, 0);
}

int sg__http_request_on_gone(sg__http_request *pub, sg__http_gone_cb cb, void *ud) {
  conn *c = (conn *)pub;
  if (!cb || c->answered || c->gone_cb) return SG_EINVAL;
  if (c->state == ST_CLOSED) return SG_ECANCELED;
  c->gone_cb = cb;
  c->gone_ud = ud;
  return 0;
}

int sg__http_request_alive(const sg__http_request *pub) {
  const conn *c = (const conn *)pub;
  return c->state == ST_HANDLER || c->state == ST_STREAM;
}

/* ---- parsing ---------------------------------------------------------------- */

static int head_count(conn *c, size_t n) {
  c->head_bytes += n;
  if (c->head_bytes <= c->srv->limits.max_header_bytes) return 0;
  conn_refuse(c, 431, "ELIMIT", "request header exceeds %zu bytes", c->srv->limits.max_header_bytes);
  return -1;
}

static int oom(conn *c) {
  conn_refuse(c, 503, "ENOMEM", "out of memory");
  return -1;
}

static int on_url(http_parser *p, const char *at, size_t n) {
  conn *c = p->data;
  if (head_count(c, n)) return -1;
  return sg__buf_append(&c->url, at, n) ? oom(c) : 0;
}

static int on_header_field(http_parser *p, const char *at, size_t n) {
  conn *c = p->data;
  if (head_count(c, n)) return -1;
  if (!c->in_field) {
    if (c->nheaders >= c->srv->limits.max_headers) {
      conn_refuse(c, 431, "ELIMIT", "more than %u header lines", c->srv->limits.max_headers);
      return -1;
    }
    if (c->nheaders && sg__buf_append(&c->hdrs, "", 1)) return oom(c);  /* ends the value */
    c->nheaders++;
    c->in_field = 1;
  }
  char low[256];
  for (size_t off = 0; off < n; off += sizeof low) {
    size_t k = n - off < sizeof low ? n - off : sizeof low;
    for (size_t i = 0; i < k; i++) {
      char ch = at[off + i];
      low[i] = ch >= 'A' && ch <= 'Z' ? (char)(ch - 'A' + 'a') : ch;
    }
    if (sg__buf_append(&c->hdrs, low, k)) return oom(c);
  }
  return 0;
}

static int on_header_value(http_parser *p, const char *at, size_t n) {
  conn *c = p->data;
  if (head_count(c, n)) return -1;
  if (c->in_field) {
    c->in_field = 0;
    if (sg__buf_append(&c->hdrs, "", 1)) return oom(c);  /* ends the name */
  }
  return sg__buf_append(&c->hdrs, at, n) ? oom(c) : 0;
}

/* The header buffer becomes the request's name/value list. */
static int headers_index(conn *c) {
  if (c->nheaders == 0) return 0;
  if (c->in_field && sg__buf_append(&c->hdrs, "", 1)) return SG_ENOMEM;  /* a name, no value */
  c->headers = calloc(c->nheaders, sizeof *c->headers);
  if (!c->headers) return SG_ENOMEM;
  const char *s = c->hdrs.p, *end = c->hdrs.p + c->hdrs.len;
  for (size_t i = 0; i < c->nheaders && s < end; i++) {
    c->headers[i].name = s;
    s += strlen(s) + 1;
    c->headers[i].value = s < end ? s : "";
    if (s < end) s += strlen(s) + 1;
  }
  return 0;
}

static int on_headers_complete(http_parser *p) {
  conn *c = p->data;
  size_t max = c->srv->limits.max_body_bytes;
  if (!(p->flags & F_CHUNKED) && p->content_length != UINT64_MAX && p->content_length > max) {
    conn_refuse(c, 413, "ELIMIT", "request body of %llu bytes exceeds %zu",
                (unsigned long long)p->content_length, max);
    return -1;
  }
  if (headers_index(c)) return oom(c);
  snprintf(c->method, sizeof c->method, "%s", http_method_str((enum http_method)p->method));
  c->state = ST_BODY;
  uv_timer_start(&c->timer, on_timer, c->srv->limits.body_timeout_ms, 0);
  return 0;
}

static int on_body(http_parser *p, const char *at, size_t n) {
  conn *c = p->data;
  if (c->body.len + n > c->srv->limits.max_body_bytes) {
    conn_refuse(c, 413, "ELIMIT", "request body exceeds %zu bytes", c->srv->limits.max_body_bytes);
    return -1;
  }
  return sg__buf_append(&c->body, at, n) ? oom(c) : 0;
}

static int on_message_complete(http_parser *p) {
  conn *c = p->data;
  c->keep = http_should_keep_alive(p);
  http_parser_pause(p, 1);
  return 0;
}

static const http_parser_settings settings = {
    .on_url = on_url,
    .on_header_field = on_header_field,
    .on_header_value = on_header_value,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

static void conn_dispatch(conn *c) {
  uv_timer_stop(&c->timer);
  c->state = ST_HANDLER;
  char *q = c->url.p ? strchr(c->url.p, '?') : NULL;
  if (q) *q++ = '\0';
  c->pub.method = c->method;
  c->pub.path = c->url.p ? c->url.p : "";
  c->pub.query = q;
  c->pub.headers = c->headers;
  c->pub.nheaders = c->nheaders;
  c->pub.body = c->body.p ? c->body.p : "";
  c->pub.body_len = c->body.len;
  c->pub.peer = c->peer;
  c->held = 1;
  c->srv->handler(&c->pub, c->srv->handler_ud);
}

static void conn_parse(conn *c, const char *data, size_t len) {
  size_t n = http_parser_execute(&c->parser, &settings, data, len);
  enum http_errno e = HTTP_PARSER_ERRNO(&c->parser);
  if (c->state == ST_CLOSED || c->state > ST_BODY) return;  /* refused in a callback */
  if (e == HPE_PAUSED) {
    /* One request at a time: what follows waits, unread, until it is
     * answered; at most one read buffer of it is kept. */
    uv_read_stop((uv_stream_t *)&c->tcp);
    if (n < len && sg__buf_append(&c->rest, data + n, len - n)) {
      c->keep = 0;
    }
    conn_dispatch(c);
  } else if (e != HPE_OK) {
    if (e == HPE_HEADER_OVERFLOW)
      conn_refuse(c, 431, "ELIMIT", "request header too large");
    else
      conn_refuse(c, 400, "EPROTO", "malformed HTTP request: %s", http_errno_name(e));
  } else if (n < len) {
    conn_refuse(c, 400, "EPROTO", "protocol upgrades are not supported");
  }
}

/* The request is answered and its response written: the connection waits
 * for the next one (parsing what was pipelined first). */
static void conn_next(conn *c) {
  c->served++;
  sg__buf_clear(&c->url, KEEP_BYTES);
  sg__buf_clear(&c->body, KEEP_BYTES);
  sg__buf_clear(&c->hdrs, KEEP_BYTES);
  free(c->headers);
  c->headers = NULL;
  c->nheaders = c->head_bytes = 0;
  c->in_field = c->answered = c->keep = 0;
  memset(&c->pub, 0, sizeof c->pub);
  c->state = ST_HEAD;
  http_parser_pause(&c->parser, 0);
  uv_timer_start(&c->timer, on_timer, c->srv->limits.header_timeout_ms, 0);
  if (c->rest.len) {
    sg__buf pipelined = c->rest;
    c->rest = (sg__buf){0};
    conn_parse(c, pipelined.p, pipelined.len);
    sg__buf_free(&pipelined);
  }
  if (c->state > ST_BODY) return;
  int rc = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
  if (rc) conn_close(c, rc);
}

/* ---- reading and accepting ------------------------------------------------ */

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *b) {
  conn *c = h->data;
  *b = uv_buf_init(c->rbuf, RBUF_SIZE);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *b) {
  conn *c = s->data;
  if (nread < 0) {
    /* EOF too: a peer that half-closes is taken as gone. */
    conn_close(c, nread == UV_EOF ? SG_ECANCELED : (int)nread);
  } else if (nread > 0 && c->state <= ST_BODY) {
    conn_parse(c, b->base, (size_t)nread);
  }
  /* What a lingering peer still sends is dropped. */
}

static void reject_connection(sg__http_server *srv) {
  sg__log(srv->log, SG_LOG_WARN, NULL, NULL, "http: %u connections open, refusing another",
          srv->stats.active);
  srv->stats.rejected++;
  sg__listener_reject(&srv->listener);
}

static void on_connection(uv_stream_t *server, int status) {
  sg__http_server *srv = server->data;
  if (status < 0) {
    sg__log(srv->log, SG_LOG_WARN, NULL, NULL, "http accept: %s", uv_strerror(status));
    return;
  }
  if (srv->stats.active >= srv->limits.max_connections) {
    reject_connection(srv);
    return;
  }
  conn *c = calloc(1, sizeof *c);
  if (!c) return;
  c->srv = srv;
  sg__listener_add(&srv->listener, &c->link, &c->tcp, &c->timer, c);
  http_parser_init(&c->parser, HTTP_REQUEST);
  c->parser.data = c;
  srv->stats.active++;
  int rc = uv_accept(server, (uv_stream_t *)&c->tcp);
  if (rc == 0) rc = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
  if (rc) {
    conn_close(c, rc);
    return;
  }
  srv->stats.accepted++;
  sg__address_peer(&c->tcp, c->peer, sizeof c->peer);
  uv_timer_start(&c->timer, on_timer, srv->limits.header_timeout_ms, 0);
}

/* ---- the server -------------------------------------------------------------- */

static void on_drained(sg__listener *l) {
  sg__http_server *srv = (sg__http_server *)((char *)l - offsetof(sg__http_server, listener));
  if (srv->close_cb) srv->close_cb(srv);
}

int sg__http_server_init(uv_loop_t *loop, sg__http_server *srv, const sg__http_limits *limits,
                         const sg__logger *log, sg__http_handler handler, void *ud) {
  if (!handler) return SG_EINVAL;
  memset(srv, 0, sizeof *srv);
  srv->log = log;
  srv->handler = handler;
  srv->handler_ud = ud;
  limits_merge(&srv->limits, limits);
  return sg__listener_init(&srv->listener, loop, srv, on_drained);
}

int sg__http_server_listen(sg__http_server *srv, const char *address) {
  return sg__listener_listen(&srv->listener, address, on_connection);
}

int sg__http_server_port(const sg__http_server *srv) {
  return sg__listener_port(&srv->listener);
}

void sg__http_server_stats_get(const sg__http_server *srv, sg__http_stats *out) {
  *out = srv->stats;
}

void sg__http_server_close(sg__http_server *srv, sg__http_server_close_cb close_cb) {
  if (srv->listener.closing) return;
  srv->close_cb = close_cb;
  sg__listener_close(&srv->listener);
  for (sg__lconn *l = srv->listener.conns; l; l = l->next)
    conn_close(container_of(l, conn, link), SG_ECANCELED);
}
