/* Fuzz target: the hRPC request path, driven for real. Two servers listen on
 * 127.0.0.1 on one uv loop for the whole run:
 * - a bare hRPC server (runtime/harmony/hrpc_server.c) whose handlers parse the
 *   token, decode a PushRequest, answer now, answer on a later loop turn
 *   with a done callback, or give no answer at all;
 * - the federation's (runtime/harmony/federation.c), with its real AuthService and
 *   PostboxService routes: token admitted (allow list: FUZZ_PEER only, whose
 *   key is cached), body decoded, signature verified (a bad one refetches
 *   the key, from a peer URL that refuses connections), then a handler.
 * Each input goes over a fresh loopback TCP connection, and the loop runs
 * until the server has answered what it will and closed the connection
 * after the client's end of stream.
 *
 * Input: byte 0 is the mode (bit 0: send in two halves with the loop run in
 * between; bit 1: half-close right after sending, without waiting for the
 * answers; bit 2: the federation's server); the rest are the bytes on the
 * wire.
 *
 * Besides the sanitizers, it aborts if a server does not close a connection
 * whose peer has closed its side, leaves a request's done callback uncalled,
 * or hands the federation's handler a request that is not FUZZ_PEER's with
 * a valid signature. */
#include <errno.h>
#include <poll.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "federation.h"
#include "fuzz_common.h"
#include "harmony_token.h"
#include "hrpc_server.h"
#include "protocol/sync/v1/sync.pb-c.h"
#include "segue.h"

#define P_PUSH "/protocol.sync.v1.PostboxService/Push"
#define P_PULL "/protocol.sync.v1.PostboxService/Pull"
#define P_KEY "/protocol.auth.v1.AuthService/Key"
#define MAX_LATER 256
#define MAX_ROUNDS 100000

/* A server under test and where to reach it. */
typedef struct target {
  sg__hrpc_server *srv;
  struct sockaddr_in addr;
} target;

static uv_loop_t loop;
static sg__hrpc_server server;
static sg__federation fed;
static target bare, federation;
static sg__keypair *peer_key;
static uv_timer_t later_timer;
static sg__hrpc_request *later[MAX_LATER];
static size_t n_later;
static unsigned done_pending;

static void on_done(sg__hrpc_request *req, void *ud, int status) {
  (void)req;
  (void)ud;
  FUZZ_REQUIRE(status <= 0, "done status %d", status);
  done_pending--;
}

/* Push: what the postbox does first, token and body, then an answer. */
static void handle_push(sg__hrpc_request *req, void *ud) {
  (void)ud;
  char why[SG_TOKEN_WHY_SIZE];
  sg__token tok;
  const char *auth = req->authorization;
  sg__token_reason r = sg__token_parse(auth, auth ? strlen(auth) : 0, &tok, why, sizeof why);
  if (r != SG_TOKEN_OK) {
    sg__hrpc_respond_error(req, sg__token_reason_status(r), sg__token_reason_identifier(r),
                          why, NULL, 0);
    return;
  }
  sg__token_clear(&tok);
  Protocol__Sync__V1__PushRequest *push =
      protocol__sync__v1__push_request__unpack(NULL, req->body_len, req->body);
  if (!push) {
    sg__hrpc_respond_error(req, 400, "h.bad-request", "not a PushRequest", req->body,
                          req->body_len);
    return;
  }
  protocol__sync__v1__push_request__free_unpacked(push, NULL);
  sg__hrpc_respond(req, NULL, 0);
}

static void answer_later(uv_timer_t *t) {
  (void)t;
  for (size_t i = 0; i < n_later; i++) {
    if (sg__hrpc_request_alive(later[i])) sg__hrpc_respond(later[i], later[i]->body, later[i]->body_len);
    else sg__hrpc_request_release(later[i]);
  }
  n_later = 0;
}

/* Pull: answered on a later loop turn (as after a store read), watched
 * with a done callback; the peer may be gone by then. */
static void handle_pull(sg__hrpc_request *req, void *ud) {
  (void)ud;
  if (n_later == MAX_LATER) {
    sg__hrpc_respond_error(req, 503, "hrpc.unavailable", "busy", NULL, 0);
    return;
  }
  if (sg__hrpc_request_on_done(req, on_done, NULL) == 0) done_pending++;
  later[n_later++] = req;
  uv_timer_start(&later_timer, answer_later, 0, 0);
}

/* Key: a handler that gives no answer (the server answers 500). */
static void handle_key(sg__hrpc_request *req, void *ud) {
  (void)ud;
  sg__hrpc_request_release(req);
}

/* Only FUZZ_PEER's requests, signed with its key, may get here. */
static void handle_federated(sg__federation *f, sg__fed_method m, const char *server_id,
                             const struct ProtobufCMessage *msg, sg__hrpc_request *req, void *ud) {
  (void)f;
  (void)ud;
  FUZZ_REQUIRE(msg != NULL, "method %d reached the handler without its decoded body", (int)m);
  char why[SG_TOKEN_WHY_SIZE];
  sg__token tok;
  sg__token_policy pol;
  sg__token_policy_init(&pol);
  pol.window = pol.unbound_window = UINT64_MAX;
  const char *auth = req->authorization;
  FUZZ_REQUIRE(sg__fed_method_name(m) != NULL && strcmp(server_id, FUZZ_PEER) == 0,
               "method %d from %s reached the handler", (int)m, server_id);
  FUZZ_REQUIRE(sg__token_check(auth, auth ? strlen(auth) : 0, &pol, 0, sg__keys_public(peer_key),
                              &tok, why, sizeof why) == SG_TOKEN_OK,
               "a request that does not verify reached the handler: %s", why);
  sg__token_clear(&tok);
  sg__hrpc_respond(req, NULL, 0);
}

static void target_init(target *t, sg__hrpc_server *srv) {
  t->srv = srv;
  memset(&t->addr, 0, sizeof t->addr);
  t->addr.sin_family = AF_INET;
  t->addr.sin_port = htons((uint16_t)sg__hrpc_server_port(srv));
  t->addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
}

static void bare_init(const sg__hrpc_limits *lim) {
  FUZZ_REQUIRE(sg__hrpc_server_init(&loop, &server, lim, &fuzz_log) == 0, "init");
  FUZZ_REQUIRE(sg__hrpc_server_listen(&server, "127.0.0.1:0") == 0, "listen");
  FUZZ_REQUIRE(sg__hrpc_server_route(&server, P_PUSH, handle_push, NULL) == 0, "route");
  FUZZ_REQUIRE(sg__hrpc_server_route(&server, P_PULL, handle_pull, NULL) == 0, "route");
  FUZZ_REQUIRE(sg__hrpc_server_route(&server, P_KEY, handle_key, NULL) == 0, "route");
  uv_timer_init(&loop, &later_timer);
  target_init(&bare, &server);
}

/* The seed tokens are from 2023: the window admits any time, so that
 * mutations get past the clock to the decoding and the signature. */
static void federation_init(const sg__hrpc_limits *lim) {
  static char dir[64];
  static const char *const allow[] = {FUZZ_PEER};
  static const char *const peer_urls[] = {"http://127.0.0.1:1"};  /* refuses */
  unsigned char seed[SG_KEYS_SEED_BYTES];
  char err[256];
  snprintf(dir, sizeof dir, "/tmp/segue-fuzz-http-%d", (int)getpid());
  fuzz_key_seed(seed);
  FUZZ_REQUIRE(sg__keys_from_secret(seed, sizeof seed, &peer_key, NULL, 0) == 0, "key");
  sg__fed_options o = {.server_id = "segue.fuzz:2289", .data_dir = dir,
                      .listen = "127.0.0.1:0", .limits = lim,
                      .peer_ids = allow, .peer_urls = peer_urls, .n_peers = 1,
                      .request_timeout_ms = 1000};
  sg__token_policy_init(&o.policy);
  o.policy.window = o.policy.unbound_window = UINT64_MAX;
  o.policy.allow = allow;
  o.policy.n_allow = 1;
  FUZZ_REQUIRE(sg__federation_init(&loop, &fed, &o, &fuzz_log, err, sizeof err) == 0, "%s", err);
  sg__federation_set_handler(&fed, handle_federated, NULL);
  FUZZ_REQUIRE(sg__federation_key_put(&fed, FUZZ_PEER, sg__keys_public(peer_key)) == 0, "key");
  target_init(&federation, &fed.server);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  signal(SIGPIPE, SIG_IGN);
  /* Small limits, so that inputs of a few KiB reach the 413 and 431 paths. */
  sg__hrpc_limits lim = {.max_header_bytes = 2048, .max_body_bytes = 1024};
  FUZZ_REQUIRE(uv_loop_init(&loop) == 0, "loop");
  bare_init(&lim);
  federation_init(&lim);
  return 0;
}

/* Reads and drops whatever the server sent; returns the byte count, or
 * -1 once the server closed its side. */
static ssize_t drain(int fd) {
  char buf[4096];
  ssize_t total = 0, n;
  while ((n = recv(fd, buf, sizeof buf, 0)) > 0) total += n;
  return n == 0 ? -1 : total;
}

/* One loop turn that does not block, then a drain. */
static ssize_t turn(int fd) {
  uv_run(&loop, UV_RUN_NOWAIT);
  return drain(fd);
}

static void send_all(int fd, const uint8_t *p, size_t n) {
  while (n > 0) {
    ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
    if (k < 0 && errno != EAGAIN && errno != EINTR) return;  /* the server closed on us */
    if (k < 0) {
      turn(fd);
      continue;
    }
    p += k;
    n -= (size_t)k;
  }
}

/* Runs the loop until three turns in a row change nothing. */
static void settle(const target *t, int fd) {
  for (int quiet = 0, round = 0; quiet < 3 && round < 1000; round++) {
    uint64_t before = t->srv->stats.requests;
    ssize_t got = turn(fd);
    quiet = got == 0 && t->srv->stats.requests == before ? quiet + 1 : 0;
    if (got < 0) return;
  }
}

/* Non-blocking from the start: libFuzzer's timers interrupt system calls,
 * and the loopback handshake needs no help from the server's loop. */
static int connect_client(const target *t) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), err = 0;
  socklen_t len = sizeof err;
  FUZZ_REQUIRE(fd >= 0, "socket: %s", strerror(errno));
  if (connect(fd, (const struct sockaddr *)&t->addr, sizeof t->addr) != 0) {
    FUZZ_REQUIRE(errno == EINPROGRESS || errno == EINTR, "connect: %s", strerror(errno));
    struct pollfd p = {.fd = fd, .events = POLLOUT};
    while (poll(&p, 1, -1) < 0) FUZZ_REQUIRE(errno == EINTR, "poll: %s", strerror(errno));
    getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
    FUZZ_REQUIRE(err == 0, "connect: %s", strerror(err));
  }
  return fd;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1) return 0;
  unsigned mode = data[0];
  const target *t = mode & 4 ? &federation : &bare;
  const uint8_t *wire = data + 1;
  size_t n = size - 1, first = mode & 1 ? n / 2 : n;
  uint64_t accepted = t->srv->stats.accepted;
  int fd = connect_client(t);
  send_all(fd, wire, first);
  if (first < n) {
    settle(t, fd);
    send_all(fd, wire + first, n - first);
  }
  if (!(mode & 2)) settle(t, fd);
  shutdown(fd, SHUT_WR);
  int rounds = 0;
  while ((t->srv->stats.accepted == accepted || t->srv->stats.active > 0) && rounds++ < MAX_ROUNDS)
    turn(fd);
  FUZZ_REQUIRE(t->srv->stats.accepted > accepted && t->srv->stats.active == 0,
               "the server kept a connection open after the peer closed");
  close(fd);
  while (n_later > 0 && rounds++ < MAX_ROUNDS) uv_run(&loop, UV_RUN_NOWAIT);
  FUZZ_REQUIRE(n_later == 0 && done_pending == 0, "a request was never finished");
  return 0;
}
