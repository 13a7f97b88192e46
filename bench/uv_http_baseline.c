/* The baseline for bench/push.sh: the least a libuv HTTP/1.1 server can do
 * per request. It finds the end of each request's head, skips the body by
 * its Content-Length and answers an empty 200 with keep-alive; no parser, no
 * routing, no token, no Lua. Push throughput is reported relative to this.
 *
 *   uv_http_baseline PORT      (runs until killed) */
#define _GNU_SOURCE  /* memmem */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

static const char answer[] =
    "HTTP/1.1 200 OK\r\nContent-Type: application/hrpc\r\nContent-Length: 0\r\n"
    "Hrpc-Version: 1\r\n\r\n";

typedef struct {
  uv_tcp_t tcp;
  char buf[65536];
  size_t have;
} client;

static void on_closed(uv_handle_t *h) { free(h->data); }

static void on_alloc(uv_handle_t *h, size_t size, uv_buf_t *buf) {
  client *c = h->data;
  *buf = uv_buf_init(c->buf + c->have, (unsigned)(sizeof c->buf - c->have));
}

static void on_written(uv_write_t *w, int status) { free(w); }

/* Answers every complete request in the buffer; keeps a partial one. */
static void serve(client *c) {
  for (;;) {
    char *end = memmem(c->buf, c->have, "\r\n\r\n", 4);
    if (!end) return;
    size_t head = (size_t)(end - c->buf) + 4, clen = 0;
    char *cl = memmem(c->buf, head, "Content-Length:", 15);
    if (cl) clen = strtoul(cl + 15, NULL, 10);
    if (c->have < head + clen) return;
    memmove(c->buf, c->buf + head + clen, c->have - head - clen);
    c->have -= head + clen;
    uv_write_t *w = malloc(sizeof *w);
    uv_buf_t b = uv_buf_init((char *)answer, sizeof answer - 1);
    uv_write(w, (uv_stream_t *)&c->tcp, &b, 1, on_written);
  }
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
  client *c = s->data;
  if (n < 0 || c->have + (size_t)n >= sizeof c->buf) {
    uv_close((uv_handle_t *)s, on_closed);
    return;
  }
  c->have += (size_t)n;
  serve(c);
}

static void on_connection(uv_stream_t *server, int status) {
  if (status < 0) return;
  client *c = calloc(1, sizeof *c);
  uv_tcp_init(server->loop, &c->tcp);
  c->tcp.data = c;
  if (uv_accept(server, (uv_stream_t *)&c->tcp) == 0) {
    uv_tcp_nodelay(&c->tcp, 1);
    uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
  } else {
    uv_close((uv_handle_t *)&c->tcp, on_closed);
  }
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: uv_http_baseline PORT\n");
    return 2;
  }
  uv_tcp_t server;
  struct sockaddr_in sa;
  uv_ip4_addr("127.0.0.1", atoi(argv[1]), &sa);
  uv_tcp_init(uv_default_loop(), &server);
  int rc = uv_tcp_bind(&server, (const struct sockaddr *)&sa, 0);
  if (rc == 0) rc = uv_listen((uv_stream_t *)&server, 512, on_connection);
  if (rc) {
    fprintf(stderr, "uv_http_baseline: %s\n", uv_strerror(rc));
    return 1;
  }
  return uv_run(uv_default_loop(), UV_RUN_DEFAULT);
}
