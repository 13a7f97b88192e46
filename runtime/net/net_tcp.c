/* Client stream connections (see net_tcp.h). The life of a conn:
 * RESOLVING -> CONNECTING (one address after the other) -> HANDSHAKING (TLS)
 * -> OPEN; any of them -> FAILED (on_connect told the caller) -> CLOSING.
 * Every close callback and every request libuv still owes is counted in
 * `pending`; the memory goes when the count reaches zero while CLOSING. */
#include "net_tcp.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "segue.h"

enum { RESOLVING = 1, CONNECTING, HANDSHAKING, OPEN, FAILED, CLOSING };

static void try_next_address(sg__net_conn *c);
static void start_reading(sg__net_conn *c);
static void set_end(sg__net_conn *c, int status, const char *why);

/* ---- closing ------------------------------------------------------------- */

static void release(sg__net_conn *c) {
  if (c->pending > 0 || c->phase != CLOSING) return;
  if (c->addrs) uv_freeaddrinfo(c->addrs);
  sg__tls_free(c->tls);
  free(c->buf);
  c->addrs = NULL;
  c->tls = NULL;
  c->buf = NULL;
  if (c->close_cb) c->close_cb(c);
}

static void handle_closed(uv_handle_t *h) {
  sg__net_conn *c = h->data;
  c->pending--;
  release(c);
}

static void close_stream(sg__net_conn *c, uv_close_cb cb) {
  if (!c->stream_open) return;
  c->stream_open = 0;
  c->reading = 0;
  c->pending++;
  uv_close(&c->s.handle, cb);
}

void sg__net_close(sg__net_conn *c, sg__net_close_cb close_cb) {
  if (c->phase == CLOSING) return;
  c->phase = CLOSING;
  c->close_cb = close_cb;
  /* A lookup in flight is counted in `pending`; cancelled or not (a running
   * one cannot be), its callback comes and finds us CLOSING. */
  if (c->gai.loop) uv_cancel((uv_req_t *)&c->gai);
  close_stream(c, handle_closed);
  c->pending++;
  uv_close((uv_handle_t *)&c->timer, handle_closed);
}

/* ---- connecting ---------------------------------------------------------- */

static void connect_done(sg__net_conn *c, int status) {
  uv_timer_stop(&c->timer);
  if (c->addrs) uv_freeaddrinfo(c->addrs);
  c->addrs = c->next_addr = NULL;
  c->phase = status == 0 ? OPEN : FAILED;
  if (status != 0) close_stream(c, handle_closed);
  c->ev->on_connect(c, status);
}

static void fail_connect(sg__net_conn *c, int status, const char *what) {
  char why[200];
  snprintf(why, sizeof why, "%.199s", c->error[0] ? c->error : uv_strerror(status));
  snprintf(c->error, sizeof c->error, "%s %.250s: %s", what, c->where, why);
  connect_done(c, status);
}

static void timed_out(uv_timer_t *t) {
  sg__net_conn *c = t->data;
  if (c->phase >= OPEN) return;
  if (c->phase == RESOLVING) uv_cancel((uv_req_t *)&c->gai);
  snprintf(c->error, sizeof c->error, "connecting to %s timed out after %llu ms", c->where,
           (unsigned long long)c->timeout_ms);
  connect_done(c, UV_ETIMEDOUT);
}

static void resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res) {
  sg__net_conn *c = req->data;
  c->pending--;
  c->gai.loop = NULL;
  if (c->phase != RESOLVING) {
    if (res) uv_freeaddrinfo(res);
    release(c);
    return;
  }
  if (status < 0) return fail_connect(c, status, "cannot resolve");
  c->addrs = c->next_addr = res;
  c->phase = CONNECTING;
  try_next_address(c);
}

/* A TLS record or two may be waiting to go out after any TLS call. */
static int flush_tls(sg__net_conn *c);
static int decrypt_input(sg__net_conn *c);

static void handshake(sg__net_conn *c) {
  int rc = sg__tls_handshake(c->tls, c->error, sizeof c->error);
  int frc = flush_tls(c);
  if (rc == 0 && frc == 0) return;  /* more input needed */
  if (rc < 0) return fail_connect(c, rc, "TLS with");
  if (frc < 0) return fail_connect(c, frc, "TLS with");
  connect_done(c, 0);
  /* The peer may have sent data right behind its last handshake record. */
  if (c->phase == OPEN && decrypt_input(c) == 0 && c->len > 0 && c->phase == OPEN)
    c->ev->on_readable(c);
}

static void address_closed(uv_handle_t *h) {
  sg__net_conn *c = h->data;
  c->pending--;
  if (c->phase == CONNECTING) try_next_address(c);
  else release(c);
}

static void connected(uv_connect_t *req, int status) {
  sg__net_conn *c = req->data;
  c->pending--;
  if (c->phase != CONNECTING) return release(c);
  if (status < 0) {
    /* Remember why, and try the next address once this socket is gone. */
    snprintf(c->error, sizeof c->error, "%s", uv_strerror(status));
    c->status = status;
    close_stream(c, address_closed);
    return;
  }
  c->status = 0;
  c->error[0] = '\0';
  start_reading(c);
  if (!c->tls) return connect_done(c, 0);
  c->phase = HANDSHAKING;
  handshake(c);
}

static void try_next_address(sg__net_conn *c) {
  struct addrinfo *ai = c->next_addr;
  if (!ai) return fail_connect(c, c->status ? c->status : UV_ECONNREFUSED, "cannot connect to");
  c->next_addr = ai->ai_next;
  uv_tcp_init(c->loop, &c->s.tcp);
  c->s.handle.data = c;
  c->stream_open = 1;
  c->connect_req.data = c;
  int rc = uv_tcp_connect(&c->connect_req, &c->s.tcp, ai->ai_addr, connected);
  if (rc == 0) {
    c->pending++;
    return;
  }
  snprintf(c->error, sizeof c->error, "%s", uv_strerror(rc));
  c->status = rc;
  close_stream(c, address_closed);
}

static void init_common(uv_loop_t *loop, sg__net_conn *c, size_t max_line, const sg__net_events *ev) {
  void *data = c->data;
  memset(c, 0, offsetof(sg__net_conn, chunk));
  c->data = data;
  c->loop = loop;
  c->ev = ev;
  c->max_line = max_line ? max_line : SG_NET_DEFAULT_MAX_LINE;
}

/* Only once nothing can fail any more: a handle, once initialized, holds the
 * caller's memory until its close callback. */
static void init_timer(sg__net_conn *c) {
  uv_timer_init(c->loop, &c->timer);
  c->timer.data = c;
}

int sg__net_connect(uv_loop_t *loop, sg__net_conn *c, const char *host, int port,
                   const sg__net_options *opts, const sg__net_events *ev) {
  sg__net_options o = {0};
  if (opts) o = *opts;
  if (!loop || !c || !host || !host[0] || port <= 0 || port > 65535 || !ev) return SG_EINVAL;
  sg__tls *tls = NULL;
  char err[256];
  if (o.tls) {
    sg__tls_options to = {o.servername ? o.servername : host, o.verify, o.ca_file, o.pin};
    int rc = sg__tls_new(&to, &tls, err, sizeof err);
    if (rc != 0) {
      snprintf(c->error, sizeof c->error, "%s", err);
      return rc;
    }
  }
  init_common(loop, c, o.max_line, ev);
  c->tls = tls;
  snprintf(c->host, sizeof c->host, "%s", host);
  c->timeout_ms = o.timeout_ms ? o.timeout_ms : SG_NET_DEFAULT_TIMEOUT_MS;
  snprintf(c->where, sizeof c->where, "%s:%d", host, port);
  char service[16];
  snprintf(service, sizeof service, "%d", port);
  struct addrinfo hints = {0};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  c->gai.data = c;
  c->phase = RESOLVING;
  int rc = uv_getaddrinfo(loop, &c->gai, resolved, host, service, &hints);
  if (rc != 0) {
    sg__tls_free(tls);
    c->tls = NULL;
    return rc;
  }
  c->pending++;
  init_timer(c);
  uv_timer_start(&c->timer, timed_out, c->timeout_ms, 0);
  return 0;
}

int sg__net_starttls(sg__net_conn *c, const sg__net_options *opts) {
  sg__net_options o = {0};
  if (opts) o = *opts;
  if (c->phase != OPEN || c->tls || !c->host[0] || !c->stream_open) {
    snprintf(c->error, sizeof c->error, "STARTTLS needs an open plain TCP connection");
    return SG_EINVAL;
  }
  if (c->status != 0) {
    snprintf(c->error, sizeof c->error, "%s ended before STARTTLS", c->where);
    return c->status == UV_EOF ? UV_ECONNRESET : c->status;
  }
  if (c->len > 0) {
    snprintf(c->error, sizeof c->error,
             "%s sent %zu bytes nobody read before the TLS handshake (refused: they would pass as protected)",
             c->where, c->len);
    return SG_EPROTO;
  }
  sg__tls_options to = {o.servername ? o.servername : c->host, o.verify, o.ca_file, o.pin};
  int rc = sg__tls_new(&to, &c->tls, c->error, sizeof c->error);
  if (rc != 0) return rc;
  c->phase = HANDSHAKING;
  if (o.timeout_ms) c->timeout_ms = o.timeout_ms;
  uv_timer_start(&c->timer, timed_out, c->timeout_ms, 0);
  start_reading(c);
  handshake(c);
  return 0;
}

int sg__net_open_fd(uv_loop_t *loop, sg__net_conn *c, int fd, size_t max_line,
                   const sg__net_events *ev) {
  uv_handle_type kind = uv_guess_handle(fd);
  if (!loop || !c || !ev || (kind != UV_TTY && kind != UV_NAMED_PIPE)) return SG_EINVAL;
  init_common(loop, c, max_line, ev);
  /* uv_tty_init fails before it registers the handle; uv_pipe_init cannot. */
  int rc = kind == UV_TTY ? uv_tty_init(loop, &c->s.tty, fd, 1) : uv_pipe_init(loop, &c->s.pipe, 0);
  if (rc != 0) return rc;
  init_timer(c);
  c->s.handle.data = c;
  c->stream_open = 1;
  c->phase = OPEN;
  snprintf(c->where, sizeof c->where, "fd %d", fd);
  /* Past this point a failure is the conn's first read result. */
  if (kind == UV_NAMED_PIPE && (rc = uv_pipe_open(&c->s.pipe, fd)) != 0)
    set_end(c, rc, uv_strerror(rc));
  start_reading(c);
  return 0;
}

/* ---- reading ------------------------------------------------------------- */

/* Reading stops while this much is buffered and nobody takes it out. */
static size_t high_water(const sg__net_conn *c) { return c->max_line + SG_NET_READ_CHUNK; }

static int append(sg__net_conn *c, const char *data, size_t n) {
  if (c->off > 0 && c->off + c->len + n > c->cap) {
    memmove(c->buf, c->buf + c->off, c->len);
    c->off = 0;
  }
  if (c->len + n > c->cap) {
    size_t cap = c->cap ? c->cap : 4096;
    while (cap < c->len + n) cap *= 2;
    char *b = realloc(c->buf, cap);
    if (!b) return SG_ENOMEM;
    c->buf = b;
    c->cap = cap;
  }
  memcpy(c->buf + c->off + c->len, data, n);
  c->len += n;
  return 0;
}

static void set_end(sg__net_conn *c, int status, const char *why) {
  if (c->status != 0) return;
  c->status = status;
  if (why) snprintf(c->error, sizeof c->error, "%s", why);
  if (c->stream_open && c->reading) uv_read_stop(&c->s.stream);
  c->reading = 0;
}

static void alloc_chunk(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  sg__net_conn *c = h->data;
  *buf = uv_buf_init(c->chunk, sizeof c->chunk);
}

/* Decrypts whatever the session can give into the input buffer. */
static int decrypt_input(sg__net_conn *c) {
  char plain[16384];
  for (;;) {
    int n = sg__tls_read(c->tls, plain, sizeof plain, c->error, sizeof c->error);
    if (n <= 0) {
      flush_tls(c);
      return n;
    }
    int rc = append(c, plain, (size_t)n);
    if (rc != 0) return rc;
  }
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
  sg__net_conn *c = s->data;
  if (n == 0) return;
  if (n < 0) {
    set_end(c, (int)n, n == UV_EOF ? "end of input" : uv_strerror((int)n));
  } else if (!c->tls) {
    int rc = append(c, buf->base, (size_t)n);
    if (rc != 0) set_end(c, rc, "out of memory");
  } else {
    int rc = sg__tls_feed(c->tls, buf->base, (size_t)n);
    if (rc == 0 && c->phase == HANDSHAKING) return handshake(c);
    if (rc == 0) rc = decrypt_input(c);
    if (rc < 0) set_end(c, rc, rc == UV_EOF ? "end of input" : rc == SG_ENOMEM ? "out of memory" : NULL);
  }
  if (c->phase == HANDSHAKING) {
    return fail_connect(c, c->status == UV_EOF ? UV_ECONNRESET : c->status, "TLS with");
  }
  if (c->reading && c->len >= high_water(c)) {
    uv_read_stop(&c->s.stream);
    c->reading = 0;
  }
  if (c->phase == OPEN) c->ev->on_readable(c);
}

static void start_reading(sg__net_conn *c) {
  if (c->reading || !c->stream_open || c->status != 0) return;
  if (uv_read_start(&c->s.stream, alloc_chunk, on_read) == 0) c->reading = 1;
}

/* Called when a reader found nothing to take: read on. */
static int need_more(sg__net_conn *c) {
  if (c->status != 0) return c->status;
  if (c->len < high_water(c)) start_reading(c);
  return 0;
}

static void consume(sg__net_conn *c, size_t n) {
  c->off += n;
  c->len -= n;
  c->scanned = 0;
  if (c->len == 0) c->off = 0;
}

/* Sticky: the stream has lost its framing. */
static int line_too_long(sg__net_conn *c) {
  set_end(c, SG_ELIMIT, NULL);
  c->status = SG_ELIMIT;
  snprintf(c->error, sizeof c->error, "a line from %s is longer than %zu bytes", c->where,
           c->max_line);
  return SG_ELIMIT;
}

int sg__net_read_line(sg__net_conn *c, const char **line, size_t *len) {
  if (c->phase != OPEN) return c->status ? c->status : UV_ENOTCONN;
  if (c->status == SG_ELIMIT) return SG_ELIMIT;
  char *start = c->buf + c->off;
  char *nl = c->len > c->scanned ? memchr(start + c->scanned, '\n', c->len - c->scanned) : NULL;
  if (!nl) {
    c->scanned = c->len;
    if (c->len > c->max_line) return line_too_long(c);
    if (c->status == UV_EOF && c->len > 0) {
      *line = start;
      *len = c->len;
      consume(c, c->len);
      return 1;
    }
    return need_more(c);
  }
  size_t n = (size_t)(nl - start);
  if (n > c->max_line) return line_too_long(c);
  *line = start;
  *len = n > 0 && start[n - 1] == '\r' ? n - 1 : n;
  consume(c, n + 1);
  return 1;
}

int sg__net_read_bytes(sg__net_conn *c, const char **data, size_t *len) {
  if (c->phase != OPEN) return c->status ? c->status : UV_ENOTCONN;
  if (c->len == 0) return need_more(c);
  size_t n = c->len < SG_NET_READ_CHUNK ? c->len : SG_NET_READ_CHUNK;
  *data = c->buf + c->off;
  *len = n;
  consume(c, n);
  return 1;
}

/* ---- writing ------------------------------------------------------------- */

typedef struct {
  uv_write_t req;
  char data[];
} write_req;

static void written(uv_write_t *req, int status) {
  sg__net_conn *c = req->data;
  free(req);
  c->writes--;
  c->pending--;
  if (c->phase != OPEN) return release(c);
  if (status < 0) {
    set_end(c, status, uv_strerror(status));
    c->ev->on_readable(c);  /* a reader waiting learns of the failure */
  }
  if (c->writes == 0 && c->phase == OPEN) c->ev->on_drain(c);
}

static int queue_raw(sg__net_conn *c, const char *data, size_t len) {
  write_req *w = malloc(sizeof *w + len);
  if (!w) return SG_ENOMEM;
  memcpy(w->data, data, len);
  w->req.data = c;
  uv_buf_t b = uv_buf_init(w->data, (unsigned)len);
  int rc = uv_write(&w->req, &c->s.stream, &b, 1, written);
  if (rc != 0) {
    free(w);
    return rc;
  }
  c->writes++;
  c->pending++;
  return 0;
}

static int flush_tls(sg__net_conn *c) {
  char out[16384];
  size_t n;
  while (c->stream_open && (n = sg__tls_take_output(c->tls, out, sizeof out)) > 0) {
    int rc = queue_raw(c, out, n);
    if (rc != 0) return rc;
  }
  return 0;
}

int sg__net_write(sg__net_conn *c, const char *data, size_t len) {
  if (c->phase != OPEN || !c->stream_open) return UV_ENOTCONN;
  if (c->status < 0 && c->status != UV_EOF && c->status != SG_ELIMIT) return c->status;
  if (len == 0) return 0;
  if (!c->tls) return queue_raw(c, data, len);
  int rc = sg__tls_write(c->tls, data, len, c->error, sizeof c->error);
  return rc != 0 ? rc : flush_tls(c);
}

size_t sg__net_write_queue_size(const sg__net_conn *c) {
  return c->stream_open ? uv_stream_get_write_queue_size(&c->s.stream) : 0;
}

static void notified(uv_timer_t *t) {
  sg__net_conn *c = t->data;
  if (c->phase == OPEN) c->ev->on_readable(c);
}

void sg__net_notify(sg__net_conn *c) {
  /* The timer only counts down the connect; once open it is free. */
  if (c->phase == OPEN) uv_timer_start(&c->timer, notified, 0, 0);
}

const char *sg__net_error(const sg__net_conn *c) { return c->error; }
