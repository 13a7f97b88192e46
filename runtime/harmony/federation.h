/* Harmony federation on the wire: this server's key pair, the inbound hRPC
 * server with the AuthService and PostboxService routes, token checks against
 * peer keys fetched with the Key RPC, and signed outbound calls
 * (spec/harmony-federation.md). No Lua: what an accepted request means is the
 * handler's business.
 *
 * Contract (libuv's): the caller allocates the federation; sg__federation_init
 * pairs with sg__federation_close, which is asynchronous and releases every
 * byte the federation allocated before its close_cb runs. Functions return 0
 * or a negative SG_E* / UV_E* code; when a function taking a callback fails,
 * the callback is never called.
 *
 * Inbound PostboxService requests, in order:
 *   token parsed (server_id must be host[:port]) and admitted (allow/block
 *   lists, audience, time window)
 *   -> body decoded as the method's request message (else 400; a Push
 *      without an event is 400 too)
 *   -> the claimed server's key from the cache (sg__keycache: bounded,
 *      LRU), or fetched with POST <base URL>/protocol.auth.v1.AuthService/Key
 *      (several requests from one server wait for one fetch). A server that
 *      is not a peers entry is fetched from https://<id>, only at public
 *      addresses (unless key_fetch_private), at most key_fetch_rate new
 *      servers a second; a failed fetch is remembered (negative entry) for
 *      key_refetch_ms.
 *   -> signature verified (with a cached key the Ed25519 check runs on
 *      libuv's thread pool unless verify_on_loop); on a bad signature the key is
 *      fetched once more (at most once per key_refetch_ms per server: the
 *      peer may have rotated its key) and the check repeated. Only a key
 *      that verified a signature is cached.
 *   -> NotifyNewId only: the token is accepted once; the new id must be
 *      host[:port] and pass the allow/block lists, and its own Key endpoint
 *      must serve the key that signed the request (same server, new name).
 *   -> the handler, with the decoded body.
 * The verified-token cache (SG_FED_VERIFIED_SLOTS entries, direct-mapped by
 * SipHash of the Authorization header with a random key) keeps what a
 * verified header of at most SG_FED_VERIFIED_HEADER bytes parsed to and the
 * key that verified it (under 3 KB an entry, so at most ~3 MB). A Push or Pull
 * whose header is byte for byte one in it skips the parse and the Ed25519
 * check, not the rest: the lists, the audience and the time window are
 * checked on every request, and the server's cached key must still be the
 * one that verified it (else the full path runs). Only verified tokens go
 * in, so nothing in it is an attacker's say-so; a new token replaces the one
 * in its slot, so it stays bounded.
 * Nothing per request walks the peers: the peers entries, the allow, block
 * and bound lists and the key fetches under way are hash tables (idmap.h,
 * SipHash under a random key), as are the key cache and the token cache.
 * A refusal is answered with the reason's hRPC identifier and status
 * (runtime/harmony_token.h) and a generic human_message; the reason's text
 * goes to the log only (warn, peer=<server id or address>). A key that cannot
 * be fetched is 503 hrpc.unavailable: the peer should retry.
 */
#ifndef SEGUE_FEDERATION_H
#define SEGUE_FEDERATION_H
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "harmony_keys.h"
#include "harmony_token.h"
#include "hrpc_client.h"
#include "hrpc_server.h"
#include "log.h"

#include "idmap.h"
#include "keycache.h"

#define SG_FED_DEFAULT_KEY_REFETCH_MS 60000
#define SG_FED_DEFAULT_KEY_FETCH_RATE 10      /* new servers' key fetches a second */
#define SG_FED_MAX_FETCHES 256                /* key fetches under way at once */
#define SG_FED_VERIFIED_SLOTS 1024            /* the verified-token cache (a power of 2) */
#define SG_FED_VERIFIED_HEADER 1024           /* longer headers are not cached */
#define SG_FED_NEW_ID_SEEN 256                /* NotifyNewId tokens remembered */
#define SG_FED_FAILED_FETCH_MS 5000           /* a failed key fetch is remembered this long */
#define SG_FED_PATH_KEY "/protocol.auth.v1.AuthService/Key"

/* The PostboxService methods routed to the handler. */
typedef enum { SG_FED_PUSH, SG_FED_PULL, SG_FED_NOTIFY_NEW_ID, SG_FED__METHODS } sg__fed_method;

struct ProtobufCMessageDescriptor;
typedef struct {
  const char *name;  /* "Push" */
  const char *path;  /* "/protocol.sync.v1.PostboxService/Push" */
  const struct ProtobufCMessageDescriptor *request, *response;
} sg__fed_method_desc;

/* Every hRPC method segue speaks: indexed by sg__fed_method for the
 * PostboxService, then AuthService/Key; ends with name == NULL. The one
 * method table: Lua reads it as segue.federation_core.methods. */
extern const sg__fed_method_desc sg__fed_methods[];

/* "Push", "Pull", "NotifyNewId"; NULL when out of range. */
const char *sg__fed_method_name(sg__fed_method m);

typedef struct sg__federation sg__federation;

/* An accepted request from `server_id` (authenticated; borrowed for the
 * call). The handler owns `req` as an sg__hrpc_handler does: it finishes it
 * exactly once, now or later, with sg__hrpc_respond / sg__hrpc_respond_error /
 * sg__hrpc_request_release. req->body holds the request message's bytes and
 * `msg` the same decoded as that method's request type (borrowed for the
 * call: the one decode of the body; a Push's holds an event). */
struct ProtobufCMessage;
typedef void (*sg__fed_handler)(sg__federation *f, sg__fed_method m, const char *server_id,
                               const struct ProtobufCMessage *msg, sg__hrpc_request *req,
                               void *ud);

/* Called when a peer's key was fetched and differs from what the cache held
 * (or the cache held none), so a store can persist it. May be NULL. */
typedef void (*sg__fed_key_cb)(sg__federation *f, const char *server_id,
                              const unsigned char pk[SG_KEYS_PUBLIC_BYTES], void *ud);

/* Everything is copied by sg__federation_init. */
typedef struct sg__fed_options {
  const char *server_id;           /* ours, "domain:port"; NULL: calls are unsigned */
  const char *data_dir;            /* harmony.key lives here (created when missing) */
  const char *listen;              /* "127.0.0.1:2289"; NULL: no server (calls only) */
  const sg__hrpc_limits *limits;    /* NULL: defaults */
  sg__token_policy policy;          /* lists copied; window 0 means the default */
  const char *const *peer_ids;     /* server id -> base URL, instead of https://<id> */
  const char *const *peer_urls;
  size_t n_peers;
  uint64_t request_timeout_ms;     /* outbound calls and key fetches; 0: 30 s */
  uint64_t key_refetch_ms;         /* 0: SG_FED_DEFAULT_KEY_REFETCH_MS */
  unsigned key_fetch_rate;         /* 0: SG_FED_DEFAULT_KEY_FETCH_RATE */
  int key_fetch_private;           /* fetch keys of non-peers at private addresses too */
  size_t key_cache_size;           /* positive entries; 0: SG_KEYCACHE_DEFAULT_POSITIVE */
  int verify_on_loop;              /* non-zero: Ed25519 on the loop, not the thread pool */
} sg__fed_options;

typedef struct sg__fed_fetch sg__fed_fetch;
typedef struct sg__fed_route sg__fed_route;

typedef struct sg__fed_stats {
  uint64_t key_fetches;      /* started */
  uint64_t fetches_limited;  /* refused by key_fetch_rate or SG_FED_MAX_FETCHES */
  uint64_t verified_hits;    /* signatures found in the verified-token cache */
  uint64_t verifies;         /* Ed25519 verifications done */
} sg__fed_stats;

struct sg__federation {
  void *data;  /* the embedder's; never touched */
  /* private */
  uv_loop_t *loop;
  const sg__logger *log;
  sg__keypair *keys;
  char *server_id;
  sg__hrpc_server server;
  sg__hrpc_client client;
  uv_timer_t closer;               /* only closed: makes close_cb asynchronous */
  int serving, closing, parts_open;
  sg__token_policy policy;          /* owns its lists; its maps are these: */
  sg__idmap allow_map, block_map, bound_map;
  char **peer_ids, **peer_urls;
  size_t n_peers;
  sg__idmap peer_index;            /* peer id -> its URL (the first entry of an id) */
  uint64_t request_timeout_ms, key_refetch_ms;
  sg__keycache cache;              /* the peer key cache */
  sg__idmap fetching;              /* server id -> its key fetch under way */
  unsigned n_fetches, fetch_rate;
  int fetch_private, verify_pool;
  unsigned jobs;                   /* jobs of signature checks on the thread pool */
  uv_check_t vflush;               /* hands the turn's checks to the pool */
  int vflush_ready;                /* initialized and not closing */
  unsigned cores;                  /* jobs a turn's checks are split into, at most */
  struct waiter *vpending, *vpending_tail;  /* the checks this turn asked for */
  size_t n_vpending;
  uint64_t limit_logged_at;        /* uv_now of the last "key fetch limit" line */
  uint64_t log_window;             /* refusals logged: the current 10 s period */
  unsigned log_lines, log_dropped;
  double fetch_tokens;             /* the key_fetch_rate bucket */
  uint64_t fetch_tokens_at;
  struct sg__fed_vtok **vtoks;     /* the verified-token cache: SG_FED_VERIFIED_SLOTS */
  unsigned char vkey[16];          /* its SipHash key */
  struct { unsigned char h[32]; uint64_t until; } seen[SG_FED_NEW_ID_SEEN];
  sg__fed_stats stats;
  sg__fed_route *routes;           /* one per PostboxService method */
  sg__fed_handler handler;
  void *handler_ud;
  sg__fed_handler push_handler;    /* Pushes only, before `handler` */
  void *push_ud;
  sg__fed_key_cb key_cb;
  void *key_ud;
  void (*close_cb)(sg__federation *f);
};

/* Loads or creates the key pair, prepares the client and, with opts->listen,
 * listens. `log` is borrowed and must outlive the federation. Whatever it
 * returns, the federation is then closed with sg__federation_close (which
 * also undoes a half-made one); on failure `err` (may be NULL) says what
 * failed (the key file, the address). */
int sg__federation_init(uv_loop_t *loop, sg__federation *f, const sg__fed_options *opts,
                       const sg__logger *log, char *err, size_t errlen);

/* Sets the handler of accepted PostboxService requests (NULL: they are
 * answered 501 hrpc.not-implemented). */
void sg__federation_set_handler(sg__federation *f, sg__fed_handler handler, void *ud);
/* Sets a handler of accepted Pushes only (NULL: Pushes go to the handler
 * above), so a Push can be stored without the embedder's general path. */
void sg__federation_set_push_handler(sg__federation *f, sg__fed_handler handler, void *ud);
/* Unsets the Push handler if it is `handler` with `ud` (1), else leaves
 * whatever another part set (0): a part that stops removes only its own. */
int sg__federation_clear_push_handler(sg__federation *f, sg__fed_handler handler, void *ud);
void sg__federation_set_key_cb(sg__federation *f, sg__fed_key_cb cb, void *ud);

/* The bound port, or a negative error when not listening. */
int sg__federation_port(const sg__federation *f);
/* Our 32-byte public key. */
const unsigned char *sg__federation_public_key(const sg__federation *f);
/* Our server id ("" when none was configured). */
const char *sg__federation_server_id(const sg__federation *f);

/* The key cache. get: 0 and pk filled, or SG_EINVAL when unknown. put:
 * replaces (a store loading persisted keys: trusted, counts as verified);
 * SG_ENOMEM. */
int sg__federation_key_get(const sg__federation *f, const char *server_id,
                          unsigned char pk[SG_KEYS_PUBLIC_BYTES]);
int sg__federation_key_put(sg__federation *f, const char *server_id,
                          const unsigned char pk[SG_KEYS_PUBLIC_BYTES]);

void sg__federation_stats_get(const sg__federation *f, sg__fed_stats *out);

/* The base URL of `server_id`: its peers entry, else "https://<id>". Borrowed
 * from `f` or written into buf[buflen]. NULL when buf is too small. */
const char *sg__federation_base_url(const sg__federation *f, const char *server_id,
                                   char *buf, size_t buflen);

/* POSTs `body` to `path` on `server_id` with a fresh token (signed now, for
 * our server id) in the Authorization header; cb as sg__hrpc_client_call's.
 * SG_EINVAL (empty id or path), SG_ECLOSING, SG_ENOMEM, SG_EHTTP. */
int sg__federation_call(sg__federation *f, const char *server_id, const char *path,
                       const uint8_t *body, size_t len, sg__hrpc_call_cb cb, void *ud);
/* The same with a token naming `sign_as` (our key, another id): NotifyNewId
 * is signed with the old id, which the peer still knows. */
int sg__federation_call_as(sg__federation *f, const char *sign_as, const char *server_id,
                          const char *path, const uint8_t *body, size_t len,
                          sg__hrpc_call_cb cb, void *ud);

/* Stops listening, cancels outbound calls (their callbacks run with
 * SG_ECANCELED before this returns) and answers requests still waiting for a
 * key; close_cb (may be NULL) runs once every handle is closed and every
 * byte freed. Requests already given to the handler stay the handler's. */
void sg__federation_close(sg__federation *f, void (*close_cb)(sg__federation *f));

#endif
