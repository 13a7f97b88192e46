/* Harmony federation: keys, routes, token checks with a peer key cache, and
 * signed outbound calls. See federation.h for the order of checks. */
#include "federation.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "protocol/auth/v1/auth.pb-c.h"
#include "protocol/sync/v1/sync.pb-c.h"
#include "hrpc_errors.h"
#include "segue.h"


/* Every hRPC method segue speaks, in sg__fed_method order (the
 * PostboxService methods routed to the handler), then the Key endpoint. */
const sg__fed_method_desc sg__fed_methods[] = {
    {"Push", "/protocol.sync.v1.PostboxService/Push",
     &protocol__sync__v1__push_request__descriptor,
     &protocol__sync__v1__push_response__descriptor},
    {"Pull", "/protocol.sync.v1.PostboxService/Pull",
     &protocol__sync__v1__pull_request__descriptor,
     &protocol__sync__v1__pull_response__descriptor},
    {"NotifyNewId", "/protocol.sync.v1.PostboxService/NotifyNewId",
     &protocol__sync__v1__notify_new_id_request__descriptor,
     &protocol__sync__v1__notify_new_id_response__descriptor},
    {"Key", SG_FED_PATH_KEY, &protocol__auth__v1__key_request__descriptor,
     &protocol__auth__v1__key_response__descriptor},
    {NULL, NULL, NULL, NULL},
};
#define methods sg__fed_methods

struct sg__fed_route {
  sg__federation *f;
  sg__fed_method method;
};

/* A request whose token was admitted, waiting for its server's key. */
typedef struct waiter {
  struct waiter *next;
  sg__fed_route *route;
  sg__hrpc_request *req;
  sg__token tok;
  int retried;  /* the key was fetched again for this request already */
} waiter;

/* One cache entry per server id that sent us an admitted token. */
struct sg__fed_peer {
  sg__fed_peer *next;
  sg__federation *f;
  char *id;
  unsigned char pk[SG_KEYS_PUBLIC_BYTES];
  int has_key, fetching;
  uint64_t fetched_at;  /* uv_now when the last fetch started; 0: never */
  waiter *waiters;      /* answered when the fetch in progress ends */
};

const char *sg__fed_method_name(sg__fed_method m) {
  return (unsigned)m < SG_FED__METHODS ? methods[m].name : NULL;
}

/* ---- the key cache -------------------------------------------------------- */

static sg__fed_peer *peer_find(const sg__federation *f, const char *id) {
  for (sg__fed_peer *p = f->peers; p; p = p->next)
    if (strcmp(p->id, id) == 0) return p;
  return NULL;
}

static sg__fed_peer *peer_get(sg__federation *f, const char *id) {
  sg__fed_peer *p = peer_find(f, id);
  if (p) return p;
  p = calloc(1, sizeof *p);
  if (!p || !(p->id = strdup(id))) {
    free(p);
    return NULL;
  }
  p->f = f;
  p->next = f->peers;
  f->peers = p;
  return p;
}

int sg__federation_key_get(const sg__federation *f, const char *server_id,
                          unsigned char pk[SG_KEYS_PUBLIC_BYTES]) {
  const sg__fed_peer *p = server_id ? peer_find(f, server_id) : NULL;
  if (!p || !p->has_key) return SG_EINVAL;
  memcpy(pk, p->pk, SG_KEYS_PUBLIC_BYTES);
  return 0;
}

int sg__federation_key_put(sg__federation *f, const char *server_id,
                          const unsigned char pk[SG_KEYS_PUBLIC_BYTES]) {
  if (!server_id || !*server_id) return SG_EINVAL;
  sg__fed_peer *p = peer_get(f, server_id);
  if (!p) return SG_ENOMEM;
  memcpy(p->pk, pk, SG_KEYS_PUBLIC_BYTES);
  p->has_key = 1;
  return 0;
}

const char *sg__federation_base_url(const sg__federation *f, const char *server_id, char *buf,
                                   size_t buflen) {
  for (size_t i = 0; i < f->n_peers; i++)
    if (strcmp(f->peer_ids[i], server_id) == 0) return f->peer_urls[i];
  int n = snprintf(buf, buflen, "https://%s", server_id);
  return n > 0 && (size_t)n < buflen ? buf : NULL;
}

/* ---- answering inbound requests ------------------------------------------ */

static void waiter_free(waiter *w) {
  sg__token_clear(&w->tok);
  free(w);
}

/* Logs why (the reason's text stays out of the body) and answers. */
static void refuse(waiter *w, int status, const char *id, const char *reason, const char *why) {
  sg__federation *f = w->route->f;
  const char *kv[] = {"peer", w->tok.server_id ? w->tok.server_id : w->req->peer,
                      "addr", w->req->peer, "reason", reason, NULL};
  char msg[SG_TOKEN_WHY_SIZE + 96];
  snprintf(msg, sizeof msg, "refused %s: %s", methods[w->route->method].name, why);
  sg__log_fields(f->log, SG_LOG_WARN, kv, msg);
  sg__hrpc_respond_error(w->req, status, id, "request refused", NULL, 0);
  waiter_free(w);
}

static void refuse_token(waiter *w, sg__token_reason r, const char *why) {
  refuse(w, sg__token_reason_status(r), sg__token_reason_identifier(r), sg__token_reason_name(r),
         why);
}

static void hand_over(waiter *w) {
  sg__federation *f = w->route->f;
  sg__log(f->log, SG_LOG_DEBUG, "peer", w->tok.server_id, "accepted %s",
          methods[w->route->method].name);
  if (f->handler)
    f->handler(f, w->route->method, w->tok.server_id, w->req, f->handler_ud);
  else
    sg__hrpc_respond_error(w->req, 501, SG__HRPC_NOT_IMPLEMENTED, "no handler for this method", NULL, 0);
  w->req = NULL;
  waiter_free(w);
}

static void fetch_key(sg__fed_peer *p, waiter *w);

/* A fetch again is worth it when one is under way (join it) or the last
 * one is old enough: a peer that rotated its key is heard again, one that
 * sends bad signatures cannot make us hammer its Key endpoint. */
static int may_refetch(const sg__fed_peer *p) {
  return p->fetching || uv_now(p->f->loop) - p->fetched_at >= p->f->key_refetch_ms;
}

static void authenticate(waiter *w, sg__fed_peer *p) {
  char why[SG_TOKEN_WHY_SIZE];
  sg__token_reason r = sg__token_verify(&w->tok, p->pk, why, sizeof why);
  if (r == SG_TOKEN_OK) {
    hand_over(w);
  } else if (r == SG_TOKEN_BAD_SIGNATURE && !w->retried && may_refetch(p)) {
    w->retried = 1;
    fetch_key(p, w);
  } else {
    refuse_token(w, r, why);
  }
}

/* ---- fetching keys ---------------------------------------------------------- */

/* Every waiter of `p` gets the fetch's outcome: checked against the key, or
 * 503 when there is none (the peer retries later). */
static void fetch_finished(sg__fed_peer *p, const char *failure) {
  waiter *list = p->waiters;
  p->waiters = NULL;
  p->fetching = 0;
  if (failure)
    sg__log(p->f->log, SG_LOG_WARN, "peer", p->id, "cannot fetch the key: %s", failure);
  while (list) {
    waiter *w = list;
    list = w->next;
    if (failure || !p->has_key)
      refuse(w, 503, SG__HRPC_UNAVAILABLE, "NO_KEY", "the server's key is not available");
    else
      authenticate(w, p);
  }
}

static void on_key(void *ud, int err, int http_status, const uint8_t *body, size_t len,
                   const char *identifier, const char *message) {
  sg__fed_peer *p = ud;
  char failure[256];
  if (err) {
    snprintf(failure, sizeof failure, "%s: %s%s%s", sg_err_name(err),
             identifier ? identifier : "", identifier ? " " : "", message ? message : "");
    fetch_finished(p, failure);
    return;
  }
  Protocol__Auth__V1__KeyResponse *kr = protocol__auth__v1__key_response__unpack(NULL, len, body);
  int ok = kr && kr->key.len == SG_KEYS_PUBLIC_BYTES;
  if (!ok) {
    snprintf(failure, sizeof failure, "the answer is not a KeyResponse with a 32-byte key");
  } else {
    int changed = !p->has_key || memcmp(p->pk, kr->key.data, SG_KEYS_PUBLIC_BYTES) != 0;
    memcpy(p->pk, kr->key.data, SG_KEYS_PUBLIC_BYTES);
    p->has_key = 1;
    if (changed) sg__log(p->f->log, SG_LOG_INFO, "peer", p->id, "fetched the server's key");
    if (changed && p->f->key_cb) p->f->key_cb(p->f, p->id, p->pk, p->f->key_ud);
  }
  if (kr) protocol__auth__v1__key_response__free_unpacked(kr, NULL);
  fetch_finished(p, ok ? NULL : failure);
}

/* Queues `w` on the fetch of p's key, starting one if none is under way. */
static void fetch_key(sg__fed_peer *p, waiter *w) {
  w->next = p->waiters;
  p->waiters = w;
  if (p->fetching) return;
  sg__federation *f = p->f;
  char buf[300];
  const char *base = sg__federation_base_url(f, p->id, buf, sizeof buf);
  int rc = base ? sg__hrpc_client_call(&f->client, base, SG_FED_PATH_KEY, NULL, 0, NULL,
                                      f->request_timeout_ms, on_key, p)
                : SG_EINVAL;
  p->fetched_at = uv_now(f->loop);
  if (rc == 0) {
    p->fetching = 1;
    return;
  }
  fetch_finished(p, sg_strerror(rc));
}

/* ---- routes ------------------------------------------------------------------ */

static int body_is(const ProtobufCMessageDescriptor *d, const sg__hrpc_request *req) {
  ProtobufCMessage *m = protobuf_c_message_unpack(d, NULL, req->body_len, req->body);
  if (m) protobuf_c_message_free_unpacked(m, NULL);
  return m != NULL;
}

static void bad_body(sg__federation *f, sg__hrpc_request *req, const ProtobufCMessageDescriptor *d) {
  char msg[160];
  snprintf(msg, sizeof msg, "the body is not a %s", d->name);
  sg__log(f->log, SG_LOG_WARN, "peer", req->peer, "hrpc 400 %s: %s", SG__HRPC_BAD_UNARY, msg);
  sg__hrpc_respond_error(req, 400, SG__HRPC_BAD_UNARY, msg, NULL, 0);
}

static void on_postbox(sg__hrpc_request *req, void *ud) {
  sg__fed_route *rt = ud;
  sg__federation *f = rt->f;
  waiter *w = calloc(1, sizeof *w);
  if (!w) {
    sg__hrpc_respond_error(req, 500, SG__HRPC_INTERNAL, "out of memory", NULL, 0);
    return;
  }
  w->route = rt;
  w->req = req;
  char why[SG_TOKEN_WHY_SIZE];
  const char *a = req->authorization;
  sg__token_reason r = sg__token_parse(a, a ? strlen(a) : 0, &w->tok, why, sizeof why);
  if (r == SG_TOKEN_OK) r = sg__token_admit(&w->tok, &f->policy, (uint64_t)time(NULL), why, sizeof why);
  if (r != SG_TOKEN_OK) {
    refuse_token(w, r, why);
    return;
  }
  if (!body_is(methods[rt->method].request, req)) {
    bad_body(f, req, methods[rt->method].request);
    waiter_free(w);
    return;
  }
  sg__fed_peer *p = peer_get(f, w->tok.server_id);
  if (!p) refuse(w, 500, SG__HRPC_INTERNAL, "NO_MEMORY", "out of memory");
  else if (p->has_key) authenticate(w, p);
  else fetch_key(p, w);
}

/* The Key RPC needs no token: it is how a peer learns to check ours. */
static void on_key_request(sg__hrpc_request *req, void *ud) {
  sg__federation *f = ud;
  if (!body_is(&protocol__auth__v1__key_request__descriptor, req)) {
    bad_body(f, req, &protocol__auth__v1__key_request__descriptor);
    return;
  }
  Protocol__Auth__V1__KeyResponse kr = PROTOCOL__AUTH__V1__KEY_RESPONSE__INIT;
  kr.key.data = (uint8_t *)sg__keys_public(f->keys);
  kr.key.len = SG_KEYS_PUBLIC_BYTES;
  uint8_t buf[64];
  size_t n = protocol__auth__v1__key_response__pack(&kr, buf);
  sg__hrpc_respond(req, buf, n);
}

static int add_routes(sg__federation *f) {
  f->routes = calloc(SG_FED__METHODS, sizeof *f->routes);
  if (!f->routes) return SG_ENOMEM;
  int rc = sg__hrpc_server_route(&f->server, SG_FED_PATH_KEY, on_key_request, f);
  for (int m = 0; m < SG_FED__METHODS && rc == 0; m++) {
    f->routes[m].f = f;
    f->routes[m].method = (sg__fed_method)m;
    rc = sg__hrpc_server_route(&f->server, methods[m].path, on_postbox, &f->routes[m]);
  }
  return rc;
}

/* ---- life cycle -------------------------------------------------------------- */

static char **copy_strings(const char *const *in, size_t n, int *failed) {
  if (n == 0) return NULL;
  char **out = calloc(n, sizeof *out);
  for (size_t i = 0; out && i < n; i++)
    if (!(out[i] = strdup(in[i] ? in[i] : ""))) *failed = 1;
  if (!out) *failed = 1;
  return out;
}

static void free_strings(char **v, size_t n) {
  for (size_t i = 0; v && i < n; i++) free(v[i]);
  free(v);
}

static int copy_options(sg__federation *f, const sg__fed_options *o) {
  int failed = 0;
  f->server_id = strdup(o->server_id ? o->server_id : "");
  f->policy = o->policy;
  if (!f->policy.window) f->policy.window = SG_TOKEN_DEFAULT_WINDOW;
  f->policy.allow = (const char *const *)copy_strings(o->policy.allow, o->policy.n_allow, &failed);
  f->policy.block = (const char *const *)copy_strings(o->policy.block, o->policy.n_block, &failed);
  f->peer_ids = copy_strings(o->peer_ids, o->n_peers, &failed);
  f->peer_urls = copy_strings(o->peer_urls, o->n_peers, &failed);
  f->n_peers = o->n_peers;
  f->request_timeout_ms = o->request_timeout_ms;
  f->key_refetch_ms = o->key_refetch_ms ? o->key_refetch_ms : SG_FED_DEFAULT_KEY_REFETCH_MS;
  return failed || !f->server_id ? SG_ENOMEM : 0;
}

static int start_server(sg__federation *f, const sg__fed_options *o, char *err, size_t errlen) {
  int rc = sg__hrpc_server_init(f->loop, &f->server, o->limits, f->log);
  if (rc) return sg__harmony_errf(err, errlen, rc, "hRPC server: %s", sg_strerror(rc));
  f->serving = 1;
  f->server.data = f;
  rc = add_routes(f);
  if (rc) return sg__harmony_errf(err, errlen, rc, "hRPC routes: %s", sg_strerror(rc));
  rc = sg__hrpc_server_listen(&f->server, o->listen);
  if (rc)
    return sg__harmony_errf(err, errlen, rc, "cannot listen on %s: %s", o->listen, sg_strerror(rc));
  sg__log(f->log, SG_LOG_INFO, "listen", o->listen, "federation listening on port %d",
          sg__hrpc_server_port(&f->server));
  return 0;
}

int sg__federation_init(uv_loop_t *loop, sg__federation *f, const sg__fed_options *o,
                       const sg__logger *log, char *err, size_t errlen) {
  memset(f, 0, sizeof *f);
  f->loop = loop;
  f->log = log;
  uv_timer_init(loop, &f->closer);
  f->closer.data = f;
  if (!o || !o->data_dir) return sg__harmony_errf(err, errlen, SG_EINVAL, "no data_dir");
  int rc = copy_options(f, o);
  if (rc) return sg__harmony_errf(err, errlen, rc, "out of memory");
  rc = sg__keys_load_or_create(o->data_dir, &f->keys, err, errlen);
  if (rc) return rc;
  rc = sg__hrpc_client_init(loop, &f->client, log);
  if (rc) return sg__harmony_errf(err, errlen, rc, "hRPC client: %s", sg_strerror(rc));
  f->parts_open |= 1;
  f->client.data = f;
  return o->listen ? start_server(f, o, err, errlen) : 0;
}

void sg__federation_set_handler(sg__federation *f, sg__fed_handler handler, void *ud) {
  f->handler = handler;
  f->handler_ud = ud;
}

void sg__federation_set_key_cb(sg__federation *f, sg__fed_key_cb cb, void *ud) {
  f->key_cb = cb;
  f->key_ud = ud;
}

int sg__federation_port(const sg__federation *f) {
  return f->serving ? sg__hrpc_server_port(&f->server) : UV_EINVAL;
}

const unsigned char *sg__federation_public_key(const sg__federation *f) {
  return sg__keys_public(f->keys);
}

const char *sg__federation_server_id(const sg__federation *f) { return f->server_id; }

int sg__federation_call(sg__federation *f, const char *server_id, const char *path,
                       const uint8_t *body, size_t len, sg__hrpc_call_cb cb, void *ud) {
  return sg__federation_call_as(f, f->server_id, server_id, path, body, len, cb, ud);
}

int sg__federation_call_as(sg__federation *f, const char *sign_as, const char *server_id,
                          const char *path, const uint8_t *body, size_t len,
                          sg__hrpc_call_cb cb, void *ud) {
  if (!sign_as || !server_id || !*server_id || !path || !*path || !cb) return SG_EINVAL;
  if (f->closing) return SG_ECLOSING;
  char buf[300];
  const char *base = sg__federation_base_url(f, server_id, buf, sizeof buf);
  if (!base) return SG_EINVAL;
  char *auth = NULL;
  if (sign_as[0]) {
    int rc = sg__token_create(f->keys, sign_as, (uint64_t)time(NULL), &auth);
    if (rc) return rc;
  }
  int rc = sg__hrpc_client_call(&f->client, base, path, body, len, auth, f->request_timeout_ms,
                               cb, ud);
  free(auth);
  return rc;
}

static void free_all(sg__federation *f) {
  while (f->peers) {
    sg__fed_peer *p = f->peers;
    f->peers = p->next;
    free(p->id);
    free(p);
  }
  free_strings((char **)f->policy.allow, f->policy.n_allow);
  free_strings((char **)f->policy.block, f->policy.n_block);
  free_strings(f->peer_ids, f->n_peers);
  free_strings(f->peer_urls, f->n_peers);
  free(f->routes);
  free(f->server_id);
  sg__keys_free(f->keys);
  f->keys = NULL;
}

/* parts_open: bit 0 the client, bit 1 the server, bit 2 `closer`. */
static void part_closed(sg__federation *f, int bit) {
  f->parts_open &= ~bit;
  if (f->parts_open) return;
  free_all(f);
  if (f->close_cb) f->close_cb(f);
}

static void client_closed(sg__hrpc_client *c) { part_closed(c->data, 1); }
static void server_closed(sg__hrpc_server *s) { part_closed(s->data, 2); }
static void closer_closed(uv_handle_t *h) { part_closed(h->data, 4); }

void sg__federation_close(sg__federation *f, void (*close_cb)(sg__federation *f)) {
  if (f->closing) return;
  f->closing = 1;
  f->close_cb = close_cb;
  int parts = f->parts_open | (f->serving ? 2 : 0);
  /* The closer is always there, so close_cb always runs from the loop, even
   * for a federation whose init failed before it made anything else. */
  f->parts_open = parts | 4;
  if (parts & 2) sg__hrpc_server_close(&f->server, server_closed);
  /* Cancelled key fetches answer their waiters (no-ops: the server closed). */
  if (parts & 1) sg__hrpc_client_close(&f->client, client_closed);
  uv_close((uv_handle_t *)&f->closer, closer_closed);
}
