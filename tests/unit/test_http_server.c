/* The client API's HTTP server: persistent connections. The server runs on
 * the main thread's loop; a client thread speaks HTTP over blocking sockets
 * and checks what comes back: several requests on one connection, pipelined
 * requests answered in order while the first is held, "Connection: close",
 * HTTP/1.0, an idle connection closed after the header time-out, a response
 * larger than the socket takes at once (whole, in order, then the request
 * pipelined behind it), and 200 pipelined requests answered at once, none
 * inside another's handler. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include "http_server.h"
#include "segue.h"
#include "tap.h"

#define IDLE_MS 300
#define LARGE (24u << 20)
#define PIPELINED 200

static uv_loop_t loop;
static sg__http_server server;
static int port;
static uv_async_t finished;
static atomic_int client_done;

/* ---- the server: answers with the path; /hold answers 100 ms later ------- */

static uv_timer_t hold_timer;
static sg__http_request *held;
static unsigned char *large;  /* /large's body: byte i is i % 251 + 1 */
static int depth, max_depth;  /* handlers running (nested: > 1) */

static void answer(sg__http_request *req) {
  sg__http_respond(req, 200, "Content-Type: text/plain\r\n", req->path, strlen(req->path));
}

static void on_hold(uv_timer_t *t) {
  sg__http_request *req = held;
  held = NULL;
  answer(req);
}

static void handler(sg__http_request *req, void *ud) {
  if (++depth > max_depth) max_depth = depth;
  if (strcmp(req->path, "/hold") == 0 && !held) {
    held = req;
    uv_timer_start(&hold_timer, on_hold, 100, 0);
  } else if (strcmp(req->path, "/large") == 0) {
    sg__http_respond(req, 200, NULL, large, LARGE);
  } else {
    answer(req);
  }
  depth--;
}

static void log_line(void *data, sg_log_level lvl, const char *line) {
  if (getenv("HTTP_TEST_VERBOSE")) fprintf(stderr, "%s\n", line);
}
static const sg__logger test_log = {SG_LOG_DEBUG, log_line, NULL};

/* ---- the client: blocking sockets, bounded by poll ------------------------ */

typedef struct client {
  int fd;
  char buf[8192];
  size_t len;
} client;

typedef struct response {
  int status;
  char connection[32];
  char body[256];
} response;

static int client_open(client *c) {
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
  c->len = 0;
  c->fd = socket(AF_INET, SOCK_STREAM, 0);
  return connect(c->fd, (struct sockaddr *)&sa, sizeof sa);
}

static void client_send(client *c, const char *s) {
  size_t n = strlen(s), off = 0;
  while (off < n) {
    ssize_t k = send(c->fd, s + off, n - off, MSG_NOSIGNAL);
    if (k <= 0) return;
    off += (size_t)k;
  }
}

/* Reads more bytes: >0 read, 0 EOF, -1 error or nothing within ms. */
static int client_fill(client *c, int ms) {
  struct pollfd p = {.fd = c->fd, .events = POLLIN};
  if (poll(&p, 1, ms) != 1) return -1;
  ssize_t k = recv(c->fd, c->buf + c->len, sizeof c->buf - c->len - 1, 0);
  if (k < 0) return -1;
  c->len += (size_t)k;
  c->buf[c->len] = '\0';
  return k > 0;
}

/* One response (Content-Length framed): 0, or -1 if none within 5 s. */
static int client_read(client *c, response *r) {
  memset(r, 0, sizeof *r);
  char *end;
  while (!(end = strstr(c->buf, "\r\n\r\n")))
    if (client_fill(c, 5000) <= 0) return -1;
  size_t head = (size_t)(end - c->buf) + 4;
  sscanf(c->buf, "HTTP/1.1 %d", &r->status);
  const char *cl = strcasestr(c->buf, "\r\nContent-Length: ");
  const char *conn = strcasestr(c->buf, "\r\nConnection: ");
  if (!cl || cl > end) return -1;
  size_t blen = strtoul(cl + 18, NULL, 10);
  if (conn && conn < end) sscanf(conn + 14, "%31[^\r]", r->connection);
  while (c->len < head + blen)
    if (client_fill(c, 5000) <= 0) return -1;
  snprintf(r->body, sizeof r->body, "%.*s", (int)blen, c->buf + head);
  memmove(c->buf, c->buf + head + blen, c->len - head - blen);
  c->len -= head + blen;
  c->buf[c->len] = '\0';
  return 0;
}

/* /large's response: its body checked byte by byte as it arrives. */
static int client_read_large(client *c) {
  char *end;
  while (!(end = strstr(c->buf, "\r\n\r\n")))
    if (client_fill(c, 5000) <= 0) return -1;
  size_t head = (size_t)(end - c->buf) + 4, got = 0;
  const char *cl = strcasestr(c->buf, "\r\nContent-Length: ");
  if (!cl || cl > end || strtoul(cl + 18, NULL, 10) != LARGE) return -1;
  memmove(c->buf, c->buf + head, c->len - head);
  c->len -= head;
  for (;;) {
    size_t n = c->len < LARGE - got ? c->len : LARGE - got;
    for (size_t i = 0; i < n; i++)
      if ((unsigned char)c->buf[i] != (got + i) % 251 + 1) return -1;
    got += n;
    memmove(c->buf, c->buf + n, c->len - n);
    c->len -= n;
    c->buf[c->len] = '\0';
    if (got == LARGE) return 0;
    if (client_fill(c, 5000) <= 0) return -1;
  }
}

/* The server closed the connection within ms (EOF, nothing more sent). */
static int client_sees_eof(client *c, int ms) {
  return client_fill(c, ms) == 0;
}

static void client_thread(void *arg) {
  client c;
  response r;

  /* Several requests, one connection. */
  CHECK(client_open(&c) == 0);
  for (int i = 0; i < 3; i++) {
    char req[64], path[16];
    snprintf(path, sizeof path, "/n%d", i);
    snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: t\r\n\r\n", path);
    client_send(&c, req);
    CHECK(client_read(&c, &r) == 0);
    CHECK(r.status == 200);
    CHECK_STR(r.body, path);
    CHECK_STR(r.connection, "keep-alive");
  }

  /* A body larger than what a connection keeps between requests (its
   * buffer is freed), then a small request on the same connection. */
  {
    static char big[100 * 1024 + 128];
    int n = snprintf(big, sizeof big, "POST /big HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n",
                     100 * 1024);
    memset(big + n, 'x', 100 * 1024);
    big[n + 100 * 1024] = '\0';
    client_send(&c, big);
    CHECK(client_read(&c, &r) == 0);
    CHECK_STR(r.body, "/big");
    client_send(&c, "GET /after-big HTTP/1.1\r\nHost: t\r\n\r\n");
    CHECK(client_read(&c, &r) == 0);
    CHECK_STR(r.body, "/after-big");
    CHECK_STR(r.connection, "keep-alive");
  }

  /* Pipelined behind a held request: answered in order, then closed when asked. */
  client_send(&c, "GET /hold HTTP/1.1\r\nHost: t\r\n\r\n"
                  "POST /second HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc"
                  "GET /last HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
  CHECK(client_read(&c, &r) == 0);
  CHECK_STR(r.body, "/hold");
  CHECK(client_read(&c, &r) == 0);
  CHECK_STR(r.body, "/second");
  CHECK_STR(r.connection, "keep-alive");
  CHECK(client_read(&c, &r) == 0);
  CHECK_STR(r.body, "/last");
  CHECK_STR(r.connection, "close");
  CHECK(client_sees_eof(&c, 5000));
  close(c.fd);

  /* HTTP/1.0 closes unless it asks for keep-alive. */
  CHECK(client_open(&c) == 0);
  client_send(&c, "GET /old HTTP/1.0\r\n\r\n");
  CHECK(client_read(&c, &r) == 0);
  CHECK_STR(r.connection, "close");
  CHECK(client_sees_eof(&c, 5000));
  close(c.fd);
  CHECK(client_open(&c) == 0);
  client_send(&c, "GET /old1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
  CHECK(client_read(&c, &r) == 0);
  CHECK_STR(r.connection, "keep-alive");
  client_send(&c, "GET /old2 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
  CHECK(client_read(&c, &r) == 0);
  CHECK_STR(r.body, "/old2");

  /* Idle: closed after the header time-out, not before. */
  CHECK(client_fill(&c, IDLE_MS / 3) == -1);
  CHECK(client_sees_eof(&c, 5000));
  close(c.fd);

  /* A malformed request after a good one: 400, then closed. */
  CHECK(client_open(&c) == 0);
  client_send(&c, "GET /fine HTTP/1.1\r\nHost: t\r\n\r\nBAD REQUEST\r\n\r\n");
  CHECK(client_read(&c, &r) == 0);
  CHECK_STR(r.body, "/fine");
  CHECK(client_read(&c, &r) == 0);
  CHECK(r.status == 400);
  CHECK_STR(r.connection, "close");
  CHECK(client_sees_eof(&c, 5000));
  close(c.fd);

  /* A response more than the socket takes at once: the rest is queued
   * behind what was written, and the next request waits for all of it. */
  CHECK(client_open(&c) == 0);
  client_send(&c, "GET /large HTTP/1.1\r\nHost: t\r\n\r\nGET /after-large HTTP/1.1\r\nHost: t\r\n\r\n");
  CHECK(client_read_large(&c) == 0);
  CHECK(client_read(&c, &r) == 0);
  CHECK_STR(r.body, "/after-large");
  close(c.fd);

  /* Pipelined requests answered at once: each in order, and the next one's
   * handler runs after the last returned, not inside its call. */
  {
    static char reqs[PIPELINED * 48];
    size_t n = 0;
    for (int i = 0; i < PIPELINED; i++)
      n += (size_t)snprintf(reqs + n, sizeof reqs - n, "GET /p%d HTTP/1.1\r\nHost: t\r\n\r\n", i);
    CHECK(client_open(&c) == 0);
    client_send(&c, reqs);
    int in_order = 1;
    for (int i = 0; i < PIPELINED; i++) {
      char path[16];
      snprintf(path, sizeof path, "/p%d", i);
      if (client_read(&c, &r) != 0 || strcmp(r.body, path) != 0) in_order = 0;
    }
    CHECK(in_order);
    close(c.fd);
  }

  atomic_store(&client_done, 1);
  uv_async_send(&finished);
}

static void on_finished(uv_async_t *a) { uv_stop(&loop); }

static void on_watchdog(uv_timer_t *t) {
  fprintf(stderr, "the client did not finish within 30 s\n");
  uv_stop(&loop);
}

static int closed;
static void on_server_closed(sg__http_server *s) { closed = 1; }

int main(void) {
  uv_loop_init(&loop);
  uv_timer_init(&loop, &hold_timer);
  uv_async_init(&loop, &finished, on_finished);
  uv_timer_t wd;
  uv_timer_init(&loop, &wd);
  uv_timer_start(&wd, on_watchdog, 30000, 0);
  large = malloc(LARGE);
  for (size_t i = 0; i < LARGE; i++) large[i] = (unsigned char)(i % 251 + 1);
  sg__http_limits lim = {0};
  lim.header_timeout_ms = IDLE_MS;
  CHECK(sg__http_server_init(&loop, &server, &lim, &test_log, handler, NULL) == 0);
  CHECK(sg__http_server_listen(&server, "127.0.0.1:0") == 0);
  port = sg__http_server_port(&server);
  CHECK(port > 0);

  uv_thread_t th;
  uv_thread_create(&th, client_thread, NULL);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK(atomic_load(&client_done) == 1);
  uv_thread_join(&th);

  sg__http_stats st;
  sg__http_server_stats_get(&server, &st);
  CHECK(st.accepted == 6);   /* one connection per block above */
  CHECK(st.requests == 15 + PIPELINED);  /* every response written, the 400 included */
  CHECK(max_depth == 1);

  sg__http_server_close(&server, on_server_closed);
  uv_close((uv_handle_t *)&hold_timer, NULL);
  uv_close((uv_handle_t *)&finished, NULL);
  uv_close((uv_handle_t *)&wd, NULL);
  while (!closed) uv_run(&loop, UV_RUN_ONCE);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK(uv_loop_close(&loop) == 0);
  free(large);
  return tap_done();
}
