/* Harmony federation: keys, routes, token checks with a peer key cache, and
 * signed outbound calls. See federation.h for the order of checks. */
#include "federation.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <sodium.h>

#include "hrpc/v1/hrpc.pb-c.h"
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

/* A request whose token was admitted, on its way through the checks. */
typedef struct waiter {
  struct waiter *next;
  sg__fed_route *route;
  sg__hrpc_request *req;
  sg__token tok;
  ProtobufCMessage *msg;   /* the decoded body */
  int retried;             /* the key was fetched again for this request already */
  int new_id;              /* waits for the new id's key (NotifyNewId) */
  unsigned char pk[SG_KEYS_PUBLIC_BYTES];  /* new_id: the key that signed */
  struct waiter *vnext;    /* in f->vpending: its signature check waits for the turn's end */
  unsigned char vpk[SG_KEYS_PUBLIC_BYTES]; /* the key it is checked with there */
} waiter;

/* A key fetch under way: the requests waiting for it. */
struct sg__fed_fetch {
  sg__federation *f;
  char *id;
  waiter *waiters;
  uint64_t started;
};

const char *sg__fed_method_name(sg__fed_method m) {
  return (unsigned)m < SG_FED__METHODS ? methods[m].name : NULL;
}

/* ---- the key cache -------------------------------------------------------- */

int sg__federation_key_get(const sg__federation *f, const char *server_id,
                          unsigned char pk[SG_KEYS_PUBLIC_BYTES]) {
  sg__keycache_entry *e = server_id ? sg__keycache_find((sg__keycache *)&f->cache, server_id) : NULL;
  if (!e || e->negative) return SG_EINVAL;
  memcpy(pk, e->pk, SG_KEYS_PUBLIC_BYTES);
  return 0;
}

int sg__federation_key_put(sg__federation *f, const char *server_id,
                          const unsigned char pk[SG_KEYS_PUBLIC_BYTES]) {
  if (!server_id || !*server_id) return SG_EINVAL;
  return sg__keycache_put(&f->cache, server_id, pk, 0);
}

void sg__federation_stats_get(const sg__federation *f, sg__fed_stats *out) { *out = f->stats; }

/* Its peers entry's URL, by hash: every outbound call asks. */
static const char *peer_url(const sg__federation *f, const char *server_id) {
  return sg__idmap_get(&f->peer_index, server_id);
}

const char *sg__federation_base_url(const sg__federation *f, const char *server_id, char *buf,
                                   size_t buflen) {
  const char *url = peer_url(f, server_id);
  if (url) return url;
  int n = snprintf(buf, buflen, "https://%s", server_id);
  return n > 0 && (size_t)n < buflen ? buf : NULL;
}

/* ---- the verified-token cache ----------------------------------------------- */

/* One verified header: its bytes, what they parse to (the token's strings
 * and data point into the same block) and the key that verified it. */
typedef struct sg__fed_vtok {
  uint64_t hash;
  size_t hlen;
  const char *header;
  sg__token tok;           /* borrowed pointers: never sg__token_clear'ed */
  unsigned char pk[SG_KEYS_PUBLIC_BYTES];
} vtok;

static uint64_t vtok_hash(const sg__federation *f, const char *header, size_t len) {
  unsigned char h[crypto_shorthash_BYTES];
  uint64_t v;
  crypto_shorthash(h, (const unsigned char *)header, len, f->vkey);
  memcpy(&v, h, sizeof v);
  return v;
}

/* The entry for exactly these header bytes, or NULL. */
static vtok *vtok_find(const sg__federation *f, const char *header, size_t len) {
  uint64_t h = vtok_hash(f, header, len);
  vtok *v = f->vtoks[h & (SG_FED_VERIFIED_SLOTS - 1)];
  if (!v || v->hash != h || v->hlen != len || memcmp(v->header, header, len) != 0) return NULL;
  return v;
}

/* w's token verified with `pk`: remembered under its header (replacing
 * whatever was in the slot). Out of memory only means a miss later. */
static void vtok_put(sg__federation *f, const waiter *w, const unsigned char pk[SG_KEYS_PUBLIC_BYTES]) {
  const char *header = w->req ? w->req->authorization : NULL;
  if (!header || !f->vtoks) return;
  size_t hlen = strlen(header), idlen = strlen(w->tok.server_id) + 1;
  if (hlen > SG_FED_VERIFIED_HEADER) return;  /* bounds the cache's memory */
  size_t audlen = w->tok.audience ? strlen(w->tok.audience) + 1 : 0;
  uint64_t h = vtok_hash(f, header, hlen);
  vtok **slot = &f->vtoks[h & (SG_FED_VERIFIED_SLOTS - 1)];
  free(*slot);
  *slot = NULL;
  vtok *v = malloc(sizeof *v + hlen + idlen + audlen + w->tok.data_len + 1);
  if (!v) return;
  char *p = (char *)(v + 1);
  v->hash = h;
  v->hlen = hlen;
  v->header = memcpy(p, header, hlen);
  p += hlen;
  v->tok = w->tok;
  v->tok.server_id = memcpy(p, w->tok.server_id, idlen);
  p += idlen;
  v->tok.audience = audlen ? memcpy(p, w->tok.audience, audlen) : NULL;
  p += audlen;
  v->tok.data = memcpy(p, w->tok.data, w->tok.data_len);
  memcpy(v->pk, pk, SG_KEYS_PUBLIC_BYTES);
  *slot = v;
}

static void vtoks_free(sg__federation *f) {
  for (size_t i = 0; f->vtoks && i < SG_FED_VERIFIED_SLOTS; i++) free(f->vtoks[i]);
  free(f->vtoks);
  f->vtoks = NULL;
}

static sg__token_reason verify(waiter *w, const unsigned char pk[SG_KEYS_PUBLIC_BYTES], char *why,
                              size_t whylen) {
  sg__federation *f = w->route->f;
  f->stats.verifies++;
  sg__token_reason r = sg__token_verify(&w->tok, pk, why, whylen);
  if (r == SG_TOKEN_OK) vtok_put(f, w, pk);
  return r;
}

/* ---- answering inbound requests ------------------------------------------ */

static void waiter_free(waiter *w) {
  sg__token_clear(&w->tok);
  if (w->msg) protobuf_c_message_free_unpacked(w->msg, NULL);
  free(w);
}

/* Logs why (the reason's text stays out of the body) and answers. */
/* 1 when one more refusal may be logged: at most REFUSALS_LOGGED in a
 * REFUSALS_PERIOD_MS period, then one line with how many were not (a flood
 * of bad tokens must not turn into a flood of log). */
#define REFUSALS_LOGGED 20
#define REFUSALS_PERIOD_MS 10000
static int refusal_logged(sg__federation *f) {
  uint64_t now = uv_now(f->loop);
  if (now - f->log_window >= REFUSALS_PERIOD_MS) {
    if (f->log_dropped)
      sg__log(f->log, SG_LOG_WARN, NULL, NULL,
              "%u more refused requests were not logged in the last %d s", f->log_dropped,
              REFUSALS_PERIOD_MS / 1000);
    f->log_window = now;
    f->log_lines = f->log_dropped = 0;
  }
  if (f->log_lines < REFUSALS_LOGGED) {
    f->log_lines++;
    return 1;
  }
  f->log_dropped++;
  return 0;
}

static void refuse(waiter *w, int status, const char *id, const char *reason, const char *why) {
  sg__federation *f = w->route->f;
  const char *kv[] = {"peer", w->tok.server_id ? w->tok.server_id : w->req->peer,
                      "addr", w->req->peer, "reason", reason, NULL};
  char msg[SG_TOKEN_WHY_SIZE + 96];
  snprintf(msg, sizeof msg, "refused %s: %s", methods[w->route->method].name, why);
  if (refusal_logged(f)) sg__log_fields(f->log, SG_LOG_WARN, kv, msg);
  /* A 503 (no key yet, too many fetches) says when to try again, as the
   * hRPC errors spec describes: an hrpc.v1.RetryInfo in the details, the
   * time a failed key fetch is remembered. */
  uint8_t details[16];
  size_t dlen = 0;
  if (status == 503) {
    uint64_t ms = f->key_refetch_ms < SG_FED_FAILED_FETCH_MS ? f->key_refetch_ms : SG_FED_FAILED_FETCH_MS;
    Hrpc__V1__RetryInfo ri = HRPC__V1__RETRY_INFO__INIT;
    ri.retry_after = (uint32_t)(ms < 1000 ? 1 : ms / 1000);
    dlen = hrpc__v1__retry_info__pack(&ri, details);
  }
  sg__hrpc_respond_error(w->req, status, id, "request refused", dlen ? details : NULL, dlen);
  waiter_free(w);
}

static void refuse_token(waiter *w, sg__token_reason r, const char *why) {
  refuse(w, sg__token_reason_status(r), sg__token_reason_identifier(r), sg__token_reason_name(r),
         why);
}

/* An accepted request to its handler: a Push to the Push handler if one is
 * set, the rest (and Pushes without one) to the handler. */
static void dispatch(sg__federation *f, sg__fed_method m, const char *id,
                     const ProtobufCMessage *msg, sg__hrpc_request *req) {
  if (m == SG_FED_PUSH && f->push_handler)
    f->push_handler(f, m, id, msg, req, f->push_ud);
  else if (f->handler)
    f->handler(f, m, id, msg, req, f->handler_ud);
  else
    sg__hrpc_respond_error(req, 501, SG__HRPC_NOT_IMPLEMENTED, "no handler for this method", NULL, 0);
}

static void hand_over(waiter *w) {
  sg__federation *f = w->route->f;
  sg__log(f->log, SG_LOG_DEBUG, "peer", w->tok.server_id, "accepted %s",
          methods[w->route->method].name);
  dispatch(f, w->route->method, w->tok.server_id, w->msg, w->req);
  w->req = NULL;
  waiter_free(w);
}

static void fetch_key(sg__federation *f, const char *id, waiter *w);
static void check_new_id(waiter *w);

/* A key that verified a signature goes into the cache (and to the store
 * through key_cb when it is new or changed). */
static void remember(sg__federation *f, const char *id, const unsigned char pk[SG_KEYS_PUBLIC_BYTES],
                     uint64_t fetched_at) {
  sg__keycache_entry *e = sg__keycache_find(&f->cache, id);
  int changed = !e || e->negative || memcmp(e->pk, pk, SG_KEYS_PUBLIC_BYTES) != 0;
  if (!changed && e->stamp >= fetched_at) return;
  if (sg__keycache_put(&f->cache, id, pk, fetched_at) != 0) return;  /* only a cache miss later */
  if (!changed) return;
  sg__log(f->log, SG_LOG_INFO, "peer", id, "fetched the server's key");
  if (f->key_cb) f->key_cb(f, id, pk, f->key_ud);
}

/* The signature verified: on to the handler, or first the new id's checks. */
static void authenticated(waiter *w, const unsigned char pk[SG_KEYS_PUBLIC_BYTES]) {
  if (w->route->method != SG_FED_NOTIFY_NEW_ID) {
    hand_over(w);
    return;
  }
  memcpy(w->pk, pk, SG_KEYS_PUBLIC_BYTES);
  check_new_id(w);
}

/* What a signature check with the cached key `pk` leads to: the handler,
 * a refetch (the peer may have rotated its key; one that sends bad
 * signatures cannot make us hammer its Key endpoint: the entry's stamp), or
 * a refusal. */
static void cached_outcome(waiter *w, const unsigned char pk[SG_KEYS_PUBLIC_BYTES],
                           sg__token_reason r, const char *why) {
  sg__federation *f = w->route->f;
  if (r == SG_TOKEN_OK) {
    authenticated(w, pk);
    return;
  }
  sg__keycache_entry *e = sg__keycache_find(&f->cache, w->tok.server_id);
  if (r == SG_TOKEN_BAD_SIGNATURE && !w->retried && e && !e->negative &&
      uv_now(f->loop) - e->stamp >= f->key_refetch_ms) {
    w->retried = 1;
    e->stamp = uv_now(f->loop);
    fetch_key(f, w->tok.server_id, w);
  } else {
    refuse_token(w, r, why);
  }
}

/* Signatures checked on libuv's thread pool: the loop goes on parsing and
 * answering other requests meanwhile (a fresh token per request costs an
 * Ed25519 verify, the most expensive step of a Push). The checks a loop
 * turn asks for are gathered and handed over at its end (a uv_check) in as
 * many jobs as there are cores, not one job each: each job costs the loop a
 * thread wake-up (futex) and a context switch, which perf showed at ~15% of
 * the loop's time with a fresh token per request. A thread reads only its
 * job and the waiters' tokens, which nothing else touches until the
 * after-work callback runs on the loop. */
typedef struct vitem {
  waiter *w;
  int ok;
} vitem;

typedef struct vjob {
  uv_work_t work;
  size_t n;
  vitem items[];
} vjob;

static void vjob_run(uv_work_t *req) {
  vjob *j = req->data;
  for (size_t i = 0; i < j->n; i++) {
    const waiter *w = j->items[i].w;
    j->items[i].ok = crypto_sign_verify_detached(w->tok.sig, w->tok.data, w->tok.data_len, w->vpk) == 0;
  }
}

static void part_closed(sg__federation *f, int bit);

/* What a check's outcome leads to, on the loop (ok < 0: it never ran). */
static void checked_outcome(sg__federation *f, waiter *w, int ok) {
  if (f->closing || ok < 0) {
    /* closing: the request's connection is gone, the answer a no-op */
    sg__hrpc_respond_error(w->req, 503, SG__HRPC_UNAVAILABLE, "request refused", NULL, 0);
    waiter_free(w);
  } else if (ok) {
    vtok_put(f, w, w->vpk);
    authenticated(w, w->vpk);
  } else {
    char why[SG_TOKEN_WHY_SIZE], b64[SG_KEYS_PUBLIC_B64_SIZE];
    sodium_bin2base64(b64, sizeof b64, w->vpk, SG_KEYS_PUBLIC_BYTES, sodium_base64_VARIANT_ORIGINAL);
    snprintf(why, sizeof why, "token signature from %s does not verify with key %s",
             w->tok.server_id, b64);
    cached_outcome(w, w->vpk, SG_TOKEN_BAD_SIGNATURE, why);
  }
}

static void vjob_done(uv_work_t *req, int status) {
  vjob *j = req->data;
  sg__federation *f = j->items[0].w->route->f;
  f->jobs--;
  for (size_t i = 0; i < j->n; i++) checked_outcome(f, j->items[i].w, status ? -1 : j->items[i].ok);
  free(j);
  if (f->closing && f->jobs == 0) part_closed(f, 8);
}

/* The turn's checks, handed to the pool in up to `cores` jobs; a job that
 * cannot start is checked here. */
static void vflush(uv_check_t *h) {
  sg__federation *f = h->data;
  uv_check_stop(h);
  size_t n = f->n_vpending;
  waiter *w = f->vpending;
  f->vpending = f->vpending_tail = NULL;
  f->n_vpending = 0;
  size_t k = n < f->cores ? n : f->cores;
  for (size_t i = 0; i < k; i++) {
    size_t m = n / k + (i < n % k ? 1 : 0);
    vjob *j = malloc(sizeof *j + m * sizeof j->items[0]);
    waiter *first = w;
    for (size_t x = 0; x < m; x++) {
      if (j) j->items[x].w = w;
      w = w->vnext;
    }
    if (j && !f->closing) {  /* (a check below may have closed the federation) */
      j->n = m;
      j->work.data = j;
      if (uv_queue_work(f->loop, &j->work, vjob_run, vjob_done) == 0) {
        f->jobs++;
        continue;
      }
    }
    free(j);
    for (size_t x = 0; x < m; x++) {  /* on the loop, then (closing: answered 503) */
      waiter *next = first->vnext;
      checked_outcome(f, first, f->closing ? -1 : crypto_sign_verify_detached(first->tok.sig,
                                  first->tok.data, first->tok.data_len, first->vpk) == 0);
      first = next;
    }
  }
}

/* Closing: the checks not handed over yet are answered (a no-op on their
 * closed connections) and freed. */
static void vpending_drop(sg__federation *f) {
  while (f->vpending) {
    waiter *w = f->vpending;
    f->vpending = w->vnext;
    sg__hrpc_respond_error(w->req, 503, SG__HRPC_UNAVAILABLE, "request refused", NULL, 0);
    waiter_free(w);
  }
  f->vpending_tail = NULL;
  f->n_vpending = 0;
}

/* Queues the check of w's signature for the thread pool at the end of this
 * loop turn; 0, or an error (then the caller checks on the loop). */
static int verify_in_pool(waiter *w, const unsigned char pk[SG_KEYS_PUBLIC_BYTES]) {
  sg__federation *f = w->route->f;
  if (!f->vflush_ready) return SG_ECLOSING;
  memcpy(w->vpk, pk, SG_KEYS_PUBLIC_BYTES);
  w->vnext = NULL;
  if (f->vpending_tail) f->vpending_tail->vnext = w;
  else f->vpending = w;
  f->vpending_tail = w;
  if (f->n_vpending++ == 0) uv_check_start(&f->vflush, vflush);
  f->stats.verifies++;
  return 0;
}

/* Checks w's signature with the key `e` holds (from the cache): Ed25519 on
 * the thread pool (or here). */
static void authenticate_cached(waiter *w, sg__keycache_entry *e) {
  sg__federation *f = w->route->f;
  char why[SG_TOKEN_WHY_SIZE];
  unsigned char pk[SG_KEYS_PUBLIC_BYTES];
  memcpy(pk, e->pk, sizeof pk);
  if (f->verify_pool && !f->closing && verify_in_pool(w, pk) == 0) return;
  sg__token_reason r = verify(w, pk, why, sizeof why);
  cached_outcome(w, pk, r, why);
}

/* Checks w's signature with a key fetched recently that has verified
 * nothing yet: it verifies (then it is cached) or the token is refused,
 * without another fetch before the entry expires. */
static void authenticate_unverified(waiter *w, sg__keycache_entry *e) {
  sg__federation *f = w->route->f;
  char why[SG_TOKEN_WHY_SIZE];
  unsigned char pk[SG_KEYS_PUBLIC_BYTES];
  memcpy(pk, e->pk, sizeof pk);
  uint64_t fetched_at = e->stamp - f->key_refetch_ms;
  sg__token_reason r = verify(w, pk, why, sizeof why);
  if (r != SG_TOKEN_OK) {
    refuse_token(w, r, why);
    return;
  }
  remember(f, w->tok.server_id, pk, fetched_at);
  authenticated(w, pk);
}

/* ---- NotifyNewId -------------------------------------------------------------- */

/* 1 the first time the token is seen within its window, 0 after; -1 when
 * every slot holds a token still in its window. */
static int first_use(sg__federation *f, waiter *w) {
  unsigned char h[32];
  uint64_t now = (uint64_t)time(NULL);
  int free_slot = -1;
  crypto_generichash(h, sizeof h, w->tok.sig, SG_KEYS_SIG_BYTES, NULL, 0);
  for (int i = 0; i < SG_FED_NEW_ID_SEEN; i++) {
    if (f->seen[i].until > now && sodium_memcmp(f->seen[i].h, h, 32) == 0) return 0;
    if (f->seen[i].until <= now && free_slot < 0) free_slot = i;
  }
  if (free_slot < 0) return -1;
  memcpy(f->seen[free_slot].h, h, 32);
  /* past the end of any window the token can be admitted in */
  f->seen[free_slot].until = (w->tok.time > now ? w->tok.time : now) + 2 * f->policy.window + 1;
  return 1;
}

static void refuse_new_id(waiter *w, int status, const char *reason, const char *fmt, const char *a) {
  char why[SG_TOKEN_WHY_SIZE];
  snprintf(why, sizeof why, fmt, a);
  refuse(w, status, status == 503 ? SG__HRPC_UNAVAILABLE : SG__HRPC_BAD_NEW_ID, reason, why);
}

/* The sender proved who it is; now the id it moves to: the token once, the
 * id's form, the lists, then its own key (fetched fresh) must be the one
 * that signed. Nothing is handed over before all of it holds. */
static void check_new_id(waiter *w) {
  sg__federation *f = w->route->f;
  const char *id = ((Protocol__Sync__V1__NotifyNewIdRequest *)w->msg)->new_server_id;
  int once = first_use(f, w);
  if (once <= 0) {
    refuse_new_id(w, once == 0 ? 400 : 503, "REPLAYED",
                  once == 0 ? "the NotifyNewId token was used already%s"
                            : "too many NotifyNewId tokens in their window%s", "");
    return;
  }
  if (!id || !sg__token_server_id_ok(id, strlen(id))) {
    refuse_new_id(w, 400, "BAD_NEW_ID", "new_server_id \"%.64s\" is not host[:port]", id ? id : "");
    return;
  }
  if (strcmp(id, w->tok.server_id) == 0) {
    hand_over(w);  /* no move: nothing to prove */
    return;
  }
  const sg__token_policy *pol = &f->policy;
  if (pol->disabled || sg__token_listed(id, pol->block, pol->n_block, pol->block_map) ||
      (pol->n_allow && !sg__token_listed(id, pol->allow, pol->n_allow, pol->allow_map))) {
    refuse_new_id(w, 403, "NEW_ID_NOT_ALLOWED", "new_server_id %.64s is not allowed (lists)", id);
    return;
  }
  w->new_id = 1;
  fetch_key(f, id, w);
}

/* The new id's key arrived: the same server must be behind it. */
static void new_id_key(waiter *w, const char *id, const unsigned char pk[SG_KEYS_PUBLIC_BYTES],
                       uint64_t fetched_at) {
  if (sodium_memcmp(pk, w->pk, SG_KEYS_PUBLIC_BYTES) != 0) {
    refuse_new_id(w, 403, "NEW_ID_KEY_DIFFERS",
                  "the key served by %.64s is not the key that signed the request", id);
    return;
  }
  remember(w->route->f, id, pk, fetched_at);
  hand_over(w);
}

/* ---- fetching keys ---------------------------------------------------------- */

static void fetch_free(sg__fed_fetch *k) {
  sg__federation *f = k->f;
  sg__idmap_remove(&f->fetching, k->id, k);
  f->n_fetches--;
  free(k->id);
  free(k);
}

/* Every waiter gets the fetch's outcome: `pk`, or 503 when there is none
 * (the peer retries later). A key is cached once a signature verified with
 * it; a fetch that verified nothing leaves a negative entry. */
static void fetch_finished(sg__fed_fetch *k, const unsigned char *pk, const char *failure) {
  sg__federation *f = k->f;
  waiter *list = k->waiters;
  char id[SG_TOKEN_MAX_SERVER_ID + 1];
  snprintf(id, sizeof id, "%s", k->id);
  uint64_t started = k->started;
  fetch_free(k);
  if (failure) sg__log(f->log, SG_LOG_WARN, "peer", id, "cannot fetch the server's key: %s", failure);
  int verified = 0;
  while (list) {
    waiter *w = list;
    list = w->next;
    char why[SG_TOKEN_WHY_SIZE];
    if (!pk) {
      refuse(w, 503, SG__HRPC_UNAVAILABLE, "NO_KEY", "the server's key is not available");
    } else if (w->new_id) {
      verified = 1;  /* compared with a verified key: no negative entry */
      new_id_key(w, id, pk, started);
    } else {
      sg__token_reason r = verify(w, pk, why, sizeof why);
      if (r == SG_TOKEN_OK) {
        verified = 1;
        remember(f, id, pk, started);
        authenticated(w, pk);
      } else {
        refuse_token(w, r, why);
      }
    }
  }
  /* Nothing verified: remember the outcome (bounded), so that the next
   * token from this id neither fetches again nor is taken on trust. A key
   * only checks tokens from here; a failure expires sooner (the peer may
   * just have been down). */
  if (!verified && !f->closing) {
    uint64_t ttl = pk ? f->key_refetch_ms
                      : (f->key_refetch_ms < SG_FED_FAILED_FETCH_MS ? f->key_refetch_ms
                                                                   : SG_FED_FAILED_FETCH_MS);
    sg__keycache_put_negative(&f->cache, id, uv_now(f->loop) + ttl, pk);
  }
}

static void on_key(void *ud, int err, int http_status, const uint8_t *body, size_t len,
                   const char *identifier, const char *message) {
  sg__fed_fetch *k = ud;
  char failure[256];
  if (err) {
    snprintf(failure, sizeof failure, "%s: %s%s%s", sg_err_name(err),
             identifier ? identifier : "", identifier ? " " : "", message ? message : "");
    fetch_finished(k, NULL, failure);
    return;
  }
  Protocol__Auth__V1__KeyResponse *kr = protocol__auth__v1__key_response__unpack(NULL, len, body);
  unsigned char pk[SG_KEYS_PUBLIC_BYTES];
  int ok = kr && kr->key.len == SG_KEYS_PUBLIC_BYTES;
  if (ok) memcpy(pk, kr->key.data, sizeof pk);
  if (kr) protocol__auth__v1__key_response__free_unpacked(kr, NULL);
  fetch_finished(k, ok ? pk : NULL, ok ? NULL : "the answer is not a KeyResponse with a 32-byte key");
}

/* The key_fetch_rate bucket: 1 when a fetch for a server that is not a
 * peers entry may start now. Running dry is logged once, then at most once
 * a minute with the count, not per request. */
static int fetch_allowed(sg__federation *f) {
  uint64_t now = uv_now(f->loop);
  f->fetch_tokens += (double)(now - f->fetch_tokens_at) * f->fetch_rate / 1000.0;
  if (f->fetch_tokens > f->fetch_rate) f->fetch_tokens = f->fetch_rate;
  f->fetch_tokens_at = now;
  if (f->fetch_tokens >= 1 && f->n_fetches < SG_FED_MAX_FETCHES) {
    f->fetch_tokens -= 1;
    return 1;
  }
  f->stats.fetches_limited++;
  if (!f->limit_logged_at || now - f->limit_logged_at >= 60000) {
    sg__log(f->log, SG_LOG_WARN, NULL, NULL,
            "key fetch limit reached (%u a second, %u under way): requests from servers "
            "whose key is not known are answered 503 while it lasts (%llu so far)",
            f->fetch_rate, f->n_fetches, (unsigned long long)f->stats.fetches_limited);
    f->limit_logged_at = now ? now : 1;
  }
  return 0;
}

/* Queues `w` on the fetch of id's key, starting one if none is under way. */
static void fetch_key(sg__federation *f, const char *id, waiter *w) {
  sg__fed_fetch *k = sg__idmap_get(&f->fetching, id);
  if (k) {
    w->next = k->waiters;
    k->waiters = w;
    return;
  }
  const char *url = peer_url(f, id);
  if (!url && !fetch_allowed(f)) {
    refuse(w, 503, SG__HRPC_UNAVAILABLE, "FETCH_LIMIT", "too many key fetches for unknown servers");
    return;
  }
  char buf[SG_TOKEN_MAX_SERVER_ID + 16];
  if (!url) snprintf(buf, sizeof buf, "https://%s", id);
  k = calloc(1, sizeof *k);
  if (!k || !(k->id = strdup(id)) || sg__idmap_put(&f->fetching, k->id, k)) {
    if (k) free(k->id);
    free(k);
    refuse(w, 500, SG__HRPC_INTERNAL, "NO_MEMORY", "out of memory");
    return;
  }
  k->f = f;
  k->waiters = w;
  w->next = NULL;
  k->started = uv_now(f->loop);
  f->n_fetches++;
  f->stats.key_fetches++;
  /* A peers entry is the operator's word; any other id goes only where a
   * public address is (SSRF: ids like 127.0.0.1:22 or an internal name). */
  unsigned flags = url || f->fetch_private ? 0 : SG_HRPC_CALL_PUBLIC_ONLY;
  int rc = sg__hrpc_client_call_flags(&f->client, url ? url : buf, SG_FED_PATH_KEY, NULL, 0, NULL,
                                     f->request_timeout_ms, flags, on_key, k);
  if (rc) fetch_finished(k, NULL, sg_strerror(rc));
}

/* ---- routes ------------------------------------------------------------------ */

static void bad_body(sg__federation *f, sg__hrpc_request *req, const char *msg) {
  sg__log(f->log, SG_LOG_WARN, "peer", req->peer, "hrpc 400 %s: %s", SG__HRPC_BAD_UNARY, msg);
  sg__hrpc_respond_error(req, 400, SG__HRPC_BAD_UNARY, msg, NULL, 0);
}

/* The body as the method's request message, or NULL after answering 400. */
static ProtobufCMessage *decode_body(sg__federation *f, sg__hrpc_request *req,
                                     const ProtobufCMessageDescriptor *d) {
  char msg[160];
  ProtobufCMessage *m = protobuf_c_message_unpack(d, NULL, req->body_len, req->body);
  if (!m) {
    snprintf(msg, sizeof msg, "the body is not a %s", d->name);
  } else if (d == &protocol__sync__v1__push_request__descriptor &&
             (!((Protocol__Sync__V1__PushRequest *)m)->event ||
              ((Protocol__Sync__V1__PushRequest *)m)->event->kind_case ==
                  PROTOCOL__SYNC__V1__EVENT__KIND__NOT_SET)) {
    snprintf(msg, sizeof msg, "the %s holds no event", d->name);
  } else {
    return m;
  }
  if (m) protobuf_c_message_free_unpacked(m, NULL);
  bad_body(f, req, msg);
  return NULL;
}

/* A Push or Pull whose Authorization header is in the verified-token
 * cache: the lists, audience and time window are checked as for any token,
 * the server's cached key must still be the one that verified it, and the
 * body is decoded once and handed to the handler. 0 when the request must
 * take the full path (nothing was answered), 1 when it was taken care of. */
static int from_verified(sg__federation *f, sg__fed_route *rt, sg__hrpc_request *req,
                         const vtok *v) {
  char why[SG_TOKEN_WHY_SIZE], id[SG_TOKEN_MAX_SERVER_ID + 1];
  if (sg__token_admit(&v->tok, &f->policy, (uint64_t)time(NULL), why, sizeof why) != SG_TOKEN_OK)
    return 0;  /* the full path refuses it, and logs why */
  sg__keycache_entry *e = sg__keycache_find(&f->cache, v->tok.server_id);
  if (!e || e->negative || sodium_memcmp(e->pk, v->pk, SG_KEYS_PUBLIC_BYTES) != 0) return 0;
  f->stats.verified_hits++;
  ProtobufCMessage *msg = decode_body(f, req, methods[rt->method].request);
  if (!msg) return 1;
  /* the entry is replaced only after a verify, never during this call; a
   * copy all the same, as the handler may run anything */
  snprintf(id, sizeof id, "%s", v->tok.server_id);
  sg__log(f->log, SG_LOG_DEBUG, "peer", id, "accepted %s", methods[rt->method].name);
  dispatch(f, rt->method, id, msg, req);
  protobuf_c_message_free_unpacked(msg, NULL);
  return 1;
}

static void on_postbox(sg__hrpc_request *req, void *ud) {
  sg__fed_route *rt = ud;
  sg__federation *f = rt->f;
  const char *a = req->authorization;
  if (a && rt->method != SG_FED_NOTIFY_NEW_ID) {
    const vtok *v = vtok_find(f, a, strlen(a));
    if (v && from_verified(f, rt, req, v)) return;
  }
  waiter *w = calloc(1, sizeof *w);
  if (!w) {
    sg__hrpc_respond_error(req, 500, SG__HRPC_INTERNAL, "out of memory", NULL, 0);
    return;
  }
  w->route = rt;
  w->req = req;
  char why[SG_TOKEN_WHY_SIZE];
  sg__token_reason r = sg__token_parse(a, a ? strlen(a) : 0, &w->tok, why, sizeof why);
  if (r == SG_TOKEN_OK) r = sg__token_admit(&w->tok, &f->policy, (uint64_t)time(NULL), why, sizeof why);
  if (r != SG_TOKEN_OK) {
    refuse_token(w, r, why);
    return;
  }
  if (!(w->msg = decode_body(f, req, methods[rt->method].request))) {
    waiter_free(w);
    return;
  }
  sg__keycache_entry *e = sg__keycache_find(&f->cache, w->tok.server_id);
  if (e && e->negative && e->stamp <= uv_now(f->loop)) {
    sg__keycache_remove(&f->cache, w->tok.server_id);  /* expired */
    e = NULL;
  }
  if (!e)
    fetch_key(f, w->tok.server_id, w);
  else if (!e->negative)
    authenticate_cached(w, e);
  else if (e->has_key)
    authenticate_unverified(w, e);
  else
    refuse(w, 503, SG__HRPC_UNAVAILABLE, "NO_KEY", "the server's key could not be fetched recently");
}

/* The Key RPC needs no token: it is how a peer learns to check ours. */
static void on_key_request(sg__hrpc_request *req, void *ud) {
  sg__federation *f = ud;
  ProtobufCMessage *m = decode_body(f, req, &protocol__auth__v1__key_request__descriptor);
  if (!m) return;
  protobuf_c_message_free_unpacked(m, NULL);
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

/* `map` holds every id of list[n] (each mapping to itself). */
static int index_list(sg__idmap *map, const char *const *list, size_t n) {
  if (sg__idmap_init(map)) return SG_ENOMEM;
  for (size_t i = 0; list && i < n; i++)
    if (list[i] && sg__idmap_put(map, list[i], (void *)list[i])) return SG_ENOMEM;
  return 0;
}

static int copy_options(sg__federation *f, const sg__fed_options *o) {
  int failed = 0;
  f->server_id = strdup(o->server_id ? o->server_id : "");
  f->policy = o->policy;
  if (!f->policy.window) f->policy.window = SG_TOKEN_DEFAULT_WINDOW;
  f->policy.allow = (const char *const *)copy_strings(o->policy.allow, o->policy.n_allow, &failed);
  f->policy.block = (const char *const *)copy_strings(o->policy.block, o->policy.n_block, &failed);
  f->policy.bound = (const char *const *)copy_strings(o->policy.bound, o->policy.n_bound, &failed);
  if (!f->policy.unbound_window) f->policy.unbound_window = SG_TOKEN_DEFAULT_UNBOUND_WINDOW;
  /* every request is checked against the lists: looked up, not walked */
  f->policy.allow_map = f->policy.block_map = f->policy.bound_map = NULL;
  if (!failed) {
    if (index_list(&f->allow_map, f->policy.allow, f->policy.n_allow)
        || index_list(&f->block_map, f->policy.block, f->policy.n_block)
        || index_list(&f->bound_map, f->policy.bound, f->policy.n_bound))
      failed = 1;
    f->policy.allow_map = &f->allow_map;
    f->policy.block_map = &f->block_map;
    f->policy.bound_map = &f->bound_map;
  }
  /* segue's audience extension: tokens must name us, when we have a name */
  f->policy.audience = f->server_id && f->server_id[0] ? f->server_id : NULL;
  f->peer_ids = copy_strings(o->peer_ids, o->n_peers, &failed);
  f->peer_urls = copy_strings(o->peer_urls, o->n_peers, &failed);
  f->n_peers = o->n_peers;
  if (sg__idmap_init(&f->peer_index) || sg__idmap_init(&f->fetching)) failed = 1;
  for (size_t i = 0; !failed && i < f->n_peers; i++)
    if (!sg__idmap_get(&f->peer_index, f->peer_ids[i])  /* the first entry wins */
        && sg__idmap_put(&f->peer_index, f->peer_ids[i], f->peer_urls[i]))
      failed = 1;
  f->request_timeout_ms = o->request_timeout_ms;
  f->key_refetch_ms = o->key_refetch_ms ? o->key_refetch_ms : SG_FED_DEFAULT_KEY_REFETCH_MS;
  f->fetch_rate = o->key_fetch_rate ? o->key_fetch_rate : SG_FED_DEFAULT_KEY_FETCH_RATE;
  f->fetch_tokens = f->fetch_rate;
  f->fetch_private = o->key_fetch_private;
  f->verify_pool = !o->verify_on_loop;
  size_t pos = o->key_cache_size ? o->key_cache_size : SG_KEYCACHE_DEFAULT_POSITIVE;
  if (sg__keycache_init(&f->cache, pos, pos / 4 + 1)) failed = 1;
  if (!(f->vtoks = calloc(SG_FED_VERIFIED_SLOTS, sizeof *f->vtoks))) failed = 1;
  randombytes_buf(f->vkey, sizeof f->vkey);
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
  uv_check_init(loop, &f->vflush);
  uv_unref((uv_handle_t *)&f->vflush);  /* never what keeps the loop alive */
  f->vflush.data = f;
  f->vflush_ready = 1;
  unsigned cores = uv_available_parallelism();
  f->cores = cores ? cores : 1;
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

void sg__federation_set_push_handler(sg__federation *f, sg__fed_handler handler, void *ud) {
  f->push_handler = handler;
  f->push_ud = ud;
}

int sg__federation_clear_push_handler(sg__federation *f, sg__fed_handler handler, void *ud) {
  if (f->push_handler != handler || f->push_ud != ud) return 0;
  f->push_handler = NULL;
  f->push_ud = NULL;
  return 1;
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
    /* naming the server it is for, so that it cannot be replayed to another */
    int rc = sg__token_create_for(f->keys, sign_as, server_id, (uint64_t)time(NULL), &auth);
    if (rc) return rc;
  }
  int rc = sg__hrpc_client_call(&f->client, base, path, body, len, auth, f->request_timeout_ms,
                               cb, ud);
  free(auth);
  return rc;
}

static void free_all(sg__federation *f) {
  sg__keycache_free(&f->cache);
  sg__idmap_free(&f->peer_index);
  sg__idmap_free(&f->allow_map);
  sg__idmap_free(&f->block_map);
  sg__idmap_free(&f->bound_map);
  sg__idmap_free(&f->fetching);
  vtoks_free(f);
  free_strings((char **)f->policy.allow, f->policy.n_allow);
  free_strings((char **)f->policy.block, f->policy.n_block);
  free_strings((char **)f->policy.bound, f->policy.n_bound);
  free_strings(f->peer_ids, f->n_peers);
  free_strings(f->peer_urls, f->n_peers);
  free(f->routes);
  free(f->server_id);
  sg__keys_free(f->keys);
  f->keys = NULL;
}

/* parts_open: bit 0 the client, bit 1 the server, bit 2 `closer`, bit 3
 * signature checks still on the thread pool, bit 4 `vflush`. */
static void part_closed(sg__federation *f, int bit) {
  f->parts_open &= ~bit;
  if (f->parts_open) return;
  free_all(f);
  if (f->close_cb) f->close_cb(f);
}

static void client_closed(sg__hrpc_client *c) { part_closed(c->data, 1); }
static void server_closed(sg__hrpc_server *s) { part_closed(s->data, 2); }
static void closer_closed(uv_handle_t *h) { part_closed(h->data, 4); }
static void vflush_closed(uv_handle_t *h) { part_closed(h->data, 16); }

void sg__federation_close(sg__federation *f, void (*close_cb)(sg__federation *f)) {
  if (f->closing) return;
  f->closing = 1;
  f->close_cb = close_cb;
  /* A closing federation hands no more Pushes to their handler, whose owner
   * may go before this memory does (bindings/lua_postbox.c's __gc). */
  f->push_handler = NULL;
  f->push_ud = NULL;
  int parts = f->parts_open | (f->serving ? 2 : 0);
  /* The closer is always there, so close_cb always runs from the loop, even
   * for a federation whose init failed before it made anything else. */
  f->parts_open = parts | 4 | 16 | (f->jobs ? 8 : 0);
  if (parts & 2) sg__hrpc_server_close(&f->server, server_closed);
  vpending_drop(f);
  f->vflush_ready = 0;
  uv_close((uv_handle_t *)&f->vflush, vflush_closed);
  /* Cancelled key fetches answer their waiters (no-ops: the server closed). */
  if (parts & 1) sg__hrpc_client_close(&f->client, client_closed);
  uv_close((uv_handle_t *)&f->closer, closer_closed);
}
