/* Push load generator: CONNS keep-alive connections, each sending one
 * request and waiting for its whole response before the next (no
 * pipelining), for SECONDS; prints the number of 200 responses per second.
 *
 *   push_load PORT SECONDS CONNS PATH AUTH_HEADER BODY_HEX
 *
 * AUTH_HEADER "-" sends none; "@FILE" sends the tokens in FILE (one a
 * line) in turn, a different one for each request. Any non-200 answer is counted and reported on
 * stderr, and makes the exit status 1, so a benchmark cannot pass off
 * refusals as throughput. Built by bench/build_tools.sh. */
#define _GNU_SOURCE  /* memmem */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONNS 256

typedef struct {
  int fd;
  size_t sent;            /* bytes of the request written */
  char in[65536];
  size_t have;            /* bytes of the response read */
  char *req;              /* the request being sent */
  size_t req_len;
} conn;

static char *request;
static size_t request_len;
static char **requests;          /* @FILE: one prepared request per token */
static size_t *request_lens, n_requests, next_request;

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int connect_to(int port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
  if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
    perror("connect");
    exit(2);
  }
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  return fd;
}

static void build_request(const char *path, const char *auth, const char *hex) {
  size_t blen = strlen(hex) / 2;
  char *body = malloc(blen + 1), head[8192];
  for (size_t i = 0; i < blen; i++) sscanf(hex + 2 * i, "%2hhx", (unsigned char *)&body[i]);
  int n = snprintf(head, sizeof head,
                   "POST %s HTTP/1.1\r\nHost: bench\r\nContent-Type: application/hrpc\r\n"
                   "%s%s%sContent-Length: %zu\r\n\r\n",
                   path, strcmp(auth, "-") ? "Authorization: " : "", strcmp(auth, "-") ? auth : "",
                   strcmp(auth, "-") ? "\r\n" : "", blen);
  request_len = (size_t)n + blen;
  request = malloc(request_len);
  memcpy(request, head, (size_t)n);
  memcpy(request + n, body, blen);
  free(body);
}

/* A complete response in c->in: its status, else 0 (need more). */
static int response_complete(conn *c, size_t *used) {
  char *end = memmem(c->in, c->have, "\r\n\r\n", 4);
  if (!end) return 0;
  size_t head = (size_t)(end - c->in) + 4, clen = 0;
  char *cl = memmem(c->in, head, "Content-Length:", 15);
  if (cl) clen = strtoul(cl + 15, NULL, 10);
  if (c->have < head + clen) return 0;
  *used = head + clen;
  return atoi(c->in + 9);
}

/* @FILE: a request per token line, sent in turn. */
static void build_requests(const char *path, const char *file, const char *hex) {
  FILE *f = fopen(file, "r");
  char line[4096];
  size_t cap = 0;
  if (!f) {
    perror(file);
    exit(2);
  }
  while (fgets(line, sizeof line, f)) {
    line[strcspn(line, "\r\n")] = '\0';
    if (!line[0]) continue;
    build_request(path, line, hex);
    if (n_requests == cap) {
      cap = cap ? cap * 2 : 1024;
      requests = realloc(requests, cap * sizeof *requests);
      request_lens = realloc(request_lens, cap * sizeof *request_lens);
    }
    requests[n_requests] = request;
    request_lens[n_requests++] = request_len;
  }
  fclose(f);
  if (!n_requests) exit(2);
  request = requests[0];
  request_len = request_lens[0];
}

/* The request the next send on a connection carries. */
static void next(conn *c) {
  c->sent = 0;
  if (!n_requests) return;
  next_request = (next_request + 1) % n_requests;
  c->req = requests[next_request];
  c->req_len = request_lens[next_request];
}

int main(int argc, char **argv) {
  if (argc != 7) {
    fprintf(stderr, "usage: push_load PORT SECONDS CONNS PATH AUTH_HEADER BODY_HEX\n");
    return 2;
  }
  int port = atoi(argv[1]), nconns = atoi(argv[3]);
  double secs = atof(argv[2]);
  if (nconns < 1 || nconns > MAX_CONNS) nconns = 8;
  if (argv[5][0] == '@') build_requests(argv[4], argv[5] + 1, argv[6]);
  else build_request(argv[4], argv[5], argv[6]);
  static conn conns[MAX_CONNS];
  struct pollfd pfd[MAX_CONNS];
  for (int i = 0; i < nconns; i++) {
    conns[i].fd = connect_to(port);
    conns[i].req = request;
    conns[i].req_len = request_len;
    next(&conns[i]);
  }
  long ok = 0, bad = 0;
  double t0 = now(), end = t0 + secs;
  while (now() < end) {
    for (int i = 0; i < nconns; i++) {
      pfd[i].fd = conns[i].fd;
      pfd[i].events = conns[i].sent < conns[i].req_len ? POLLOUT : POLLIN;
    }
    if (poll(pfd, (nfds_t)nconns, 100) < 0 && errno != EINTR) return 2;
    for (int i = 0; i < nconns; i++) {
      conn *c = &conns[i];
      if (pfd[i].revents & POLLOUT) {
        ssize_t n = write(c->fd, c->req + c->sent, c->req_len - c->sent);
        if (n > 0) c->sent += (size_t)n;
      } else if (pfd[i].revents & (POLLIN | POLLHUP | POLLERR)) {
        ssize_t n = read(c->fd, c->in + c->have, sizeof c->in - c->have);
        if (n <= 0) {
          fprintf(stderr, "push_load: the server closed a connection\n");
          return 1;
        }
        c->have += (size_t)n;
        size_t used;
        int status = response_complete(c, &used);
        if (!status) continue;
        if (status == 200) ok++;
        else if (bad++ == 0) fprintf(stderr, "push_load: HTTP %d\n", status);
        memmove(c->in, c->in + used, c->have - used);
        c->have -= used;
        next(c);
      }
    }
  }
  printf("%.0f\n", (double)ok / (now() - t0));
  if (bad) fprintf(stderr, "push_load: %ld answers were not 200\n", bad);
  return bad ? 1 : 0;
}
