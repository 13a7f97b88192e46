/* segue.federation: runtime/federation.h for Lua. Bytes in, bytes out: the
 * messages are encoded and decoded by segue.harmony in Lua
 * (scripts/segue/harmony_api.lua), which also decides what a request means.
 *
 *   start(opts) -> fed | nil, err, code
 *       opts = { data_dir =, server_id =, listen =,
 *                peers = { [id] = url | { url =, require_audience = bool } },
 *                allow = {...}, block = {...}, token_window =,
 *                unbound_token_window =, limits = {...}, request_timeout_ms =,
 *                key_refetch_ms =, key_fetch_rate =, key_fetch_private =,
 *                key_cache_size =, verify_in_pool = (default true) }
 *   load_key(data_dir) -> public_key_base64 | nil, err, code  (creates it)
 *   fed:on_request(fn(method, server_id, body, req [, event]))   "Push", "Pull",
 *       "NotifyNewId"; a Push's `event` is the Event's bytes (decoded once, in C)
 *   req:respond(bytes) / req:error(status, identifier [, message]) -> true | nil, err, code
 *   req:alive() -> boolean
 *   req:on_done(fn(ok, err)) -> true | nil, err, code: once the response was
 *       written whole (ok) or never will be (before answering)
 *   fed:call(server_id, path, body, cb) -> true | nil, err, code
 *       cb(body) or cb(nil, "EHTTP: h.bad-token: ...", "EHTTP", http_status, identifier)
 *   fed:on_key(fn(server_id, public_key))  a peer's key was fetched (new or changed)
 *   fed:key_get(server_id) -> public_key | nil;  fed:key_put(server_id, public_key)
 *   fed:stats() -> counters: key_fetches, fetches_limited, verifies, verified_hits,
 *       cached_keys, failed_keys; with a listener connections, accepted,
 *       rejected, evicted
 *   fed:port(), fed:public_key(), fed:server_id(), fed:close()
 *
 * The userdata holds a pointer to C memory (luv's model). An open federation
 * stays referenced from the registry until fed:close(), so a listening
 * server is not collected; lua_close's __gc closes what is left without
 * calling into Lua again.
 */
#include <lauxlib.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "bindings.h"
#include <protobuf-c/protobuf-c.h>

#include "federation.h"
#include "hrpc_errors.h"
#include "lua_federation.h"
#include "protocol/sync/v1/sync.pb-c.h"

#define FED_MT "segue.federation"
#define REQ_MT "segue.federation.request"

/* The federation's C memory: its life is an sg__lown's (bindings.h), whose
 * refs hold the request and key handlers. */
enum { HANDLER = 0, KEY_CB = 1 };
typedef struct lfed {
  sg__lown own;
  sg__federation f;
} lfed;

typedef struct lcall {
  lfed *lf;
  int cb_ref;
} lcall;

static lfed *check_fed(lua_State *L) {
  lfed *lf = sg__lown_get(L, 1, FED_MT);
  if (!lf || lf->own.closed) luaL_argerror(L, 1, "the federation is closed");
  return lf;
}

sg__federation *sg__lua_check_federation(lua_State *L, int idx) {
  lfed *lf = sg__lown_get(L, idx, FED_MT);
  if (!lf || lf->own.closed) luaL_argerror(L, idx, "an open segue.federation expected");
  return &lf->f;
}

sg__federation *sg__lua_to_federation(lua_State *L, int idx) {
  lfed **ud = luaL_testudata(L, idx, FED_MT);
  return ud && *ud && !(*ud)->own.closed ? &(*ud)->f : NULL;
}

/* ---- inbound requests ------------------------------------------------------ */

static sg__hrpc_request **check_req(lua_State *L) {
  sg__hrpc_request **r = luaL_checkudata(L, 1, REQ_MT);
  if (!*r) luaL_argerror(L, 1, "the request was answered already");
  return r;
}

static int l_req_respond(lua_State *L) {
  sg__hrpc_request **r = check_req(L);
  size_t len;
  const char *body = luaL_checklstring(L, 2, &len);
  int rc = sg__hrpc_respond(*r, (const uint8_t *)body, len);
  *r = NULL;
  return sg__lua_result(L, rc);
}

static int l_req_error(lua_State *L) {
  sg__hrpc_request **r = check_req(L);
  lua_Integer status = luaL_checkinteger(L, 2);
  const char *id = luaL_checkstring(L, 3);
  const char *msg = luaL_optstring(L, 4, NULL);
  luaL_argcheck(L, status >= 200 && status <= 599, 2, "an HTTP status 200..599 expected");
  int rc = sg__hrpc_respond_error(*r, (int)status, id, msg, NULL, 0);
  *r = NULL;
  return sg__lua_result(L, rc);
}

typedef struct ldone {
  lfed *lf;
  int cb_ref;
} ldone;

static void on_done(sg__hrpc_request *req, void *ud, int status) {
  ldone *d = ud;
  lua_State *L = d->lf->own.e->L;
  if (!d->lf->own.lua_gone && L) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, d->cb_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, d->cb_ref);
    lua_pushboolean(L, status == 0);
    if (status) lua_pushfstring(L, "%s: %s", sg_err_name(status), sg_strerror(status));
    else lua_pushnil(L);
    sg__lenv_pcall(d->lf->own.e, 2, 0, "federation write completion");
  }
  free(d);
}

/* req:on_done(fn(ok, err)): fn runs once the response was written whole
 * (ok true) or never will be. Call before answering. */
static int l_req_on_done(lua_State *L) {
  sg__hrpc_request **r = check_req(L);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  ldone *d = malloc(sizeof *d);
  if (!d) return luaL_error(L, "out of memory");
  d->lf = (*r)->data;
  lua_pushvalue(L, 2);
  d->cb_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  int rc = sg__hrpc_request_on_done(*r, on_done, d);
  if (rc) {
    luaL_unref(L, LUA_REGISTRYINDEX, d->cb_ref);
    free(d);
  }
  return sg__lua_result(L, rc);
}

static int l_req_alive(lua_State *L) {
  sg__hrpc_request **r = luaL_checkudata(L, 1, REQ_MT);
  lua_pushboolean(L, *r && sg__hrpc_request_alive(*r));
  return 1;
}

/* A request Lua dropped unanswered is answered 500 (and freed). */
static int l_req_gc(lua_State *L) {
  sg__hrpc_request **r = luaL_checkudata(L, 1, REQ_MT);
  if (*r) sg__hrpc_request_release(*r);
  *r = NULL;
  return 0;
}

/* handler(method, server_id, body, req [, event]): for a Push, `event` is
 * the Event's bytes, packed from the one decode of the body in C (Lua need
 * not decode the PushRequest to store its event). */
static void on_request(sg__federation *f, sg__fed_method m, const char *server_id,
                       const ProtobufCMessage *msg, sg__hrpc_request *req, void *ud) {
  lfed *lf = ud;
  lua_State *L = lf->own.e->L;
  if (lf->own.lua_gone || !L || lf->own.refs[HANDLER] == LUA_NOREF) {
    sg__hrpc_respond_error(req, 501, SG__HRPC_NOT_IMPLEMENTED, "no handler for this method", NULL, 0);
    return;
  }
  sg__lown_push(L, &lf->own, HANDLER);
  lua_pushstring(L, sg__fed_method_name(m));
  lua_pushstring(L, server_id);
  lua_pushlstring(L, req->body ? (const char *)req->body : "", req->body_len);
  req->data = lf;  /* for req:on_done */
  sg__hrpc_request **r = lua_newuserdatauv(L, sizeof *r, 0);
  *r = req;
  luaL_setmetatable(L, REQ_MT);
  int nargs = 4;
  const Protocol__Sync__V1__PushRequest *push = (const void *)msg;
  if (m == SG_FED_PUSH && push && push->event) {
    size_t n = protobuf_c_message_get_packed_size(&push->event->base);
    luaL_Buffer b;
    protobuf_c_message_pack(&push->event->base, (uint8_t *)luaL_buffinitsize(L, &b, n));
    luaL_pushresultsize(&b, n);
    nargs = 5;
  }
  sg__lenv_pcall(lf->own.e, nargs, 0, "federation request handler");
}

static void set_ref(lua_State *L, int slot) {
  lfed *lf = check_fed(L);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  sg__lown_ref(L, &lf->own, slot, 2);
}

static int l_on_request(lua_State *L) {
  set_ref(L, HANDLER);
  return 0;
}

/* ---- keys ------------------------------------------------------------------ */

static void on_key(sg__federation *f, const char *server_id,
                   const unsigned char pk[SG_KEYS_PUBLIC_BYTES], void *ud) {
  lfed *lf = ud;
  lua_State *L = lf->own.e->L;
  if (lf->own.lua_gone || !L || lf->own.refs[KEY_CB] == LUA_NOREF) return;
  sg__lown_push(L, &lf->own, KEY_CB);
  lua_pushstring(L, server_id);
  lua_pushlstring(L, (const char *)pk, SG_KEYS_PUBLIC_BYTES);
  sg__lenv_pcall(lf->own.e, 2, 0, "federation key handler");
}

static int l_on_key(lua_State *L) {
  set_ref(L, KEY_CB);
  return 0;
}

static int l_key_get(lua_State *L) {
  lfed *lf = check_fed(L);
  unsigned char pk[SG_KEYS_PUBLIC_BYTES];
  if (sg__federation_key_get(&lf->f, luaL_checkstring(L, 2), pk) != 0) return 0;
  lua_pushlstring(L, (const char *)pk, sizeof pk);
  return 1;
}

static int l_key_put(lua_State *L) {
  lfed *lf = check_fed(L);
  const char *id = luaL_checkstring(L, 2);
  size_t len;
  const char *pk = luaL_checklstring(L, 3, &len);
  luaL_argcheck(L, len == SG_KEYS_PUBLIC_BYTES, 3, "a 32-byte public key expected");
  return sg__lua_result(L, sg__federation_key_put(&lf->f, id, (const unsigned char *)pk));
}

static int l_load_key(lua_State *L) {
  const char *dir = luaL_checkstring(L, 1);
  char err[512], b64[SG_KEYS_PUBLIC_B64_SIZE];
  sg__keypair *kp;
  int rc = sg__keys_load_or_create(dir, &kp, err, sizeof err);
  if (rc) return sg__lua_fail(L, rc, err);
  sg__keys_public_b64(kp, b64, sizeof b64);
  sg__keys_free(kp);
  lua_pushstring(L, b64);
  return 1;
}

/* ---- outbound calls -------------------------------------------------------- */

static void push_call_result(lua_State *L, int err, int status, const uint8_t *body, size_t len,
                             const char *identifier, const char *message) {
  if (err == 0) {
    lua_pushlstring(L, body ? (const char *)body : "", len);
    return;
  }
  lua_pushnil(L);
  lua_pushfstring(L, "%s: %s%s%s", sg_err_name(err), identifier ? identifier : "",
                  identifier ? ": " : "", message ? message : sg_strerror(err));
  lua_pushstring(L, sg_err_name(err));
  lua_pushinteger(L, status);
  if (identifier) lua_pushstring(L, identifier);
  else lua_pushnil(L);
}

static void on_call(void *ud, int err, int status, const uint8_t *body, size_t len,
                    const char *identifier, const char *message) {
  lcall *c = ud;
  lfed *lf = c->lf;
  lua_State *L = lf->own.e->L;
  if (!lf->own.lua_gone && L) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, c->cb_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, c->cb_ref);
    push_call_result(L, err, status, body, len, identifier, message);
    sg__lenv_pcall(lf->own.e, err ? 5 : 1, 0, "federation call callback");
  }
  free(c);
}

static int l_call(lua_State *L) {
  lfed *lf = check_fed(L);
  const char *id = luaL_checkstring(L, 2);
  const char *path = luaL_checkstring(L, 3);
  size_t len;
  const char *body = luaL_checklstring(L, 4, &len);
  luaL_checktype(L, 5, LUA_TFUNCTION);
  lcall *c = malloc(sizeof *c);
  if (!c) return luaL_error(L, "out of memory");
  c->lf = lf;
  lua_pushvalue(L, 5);
  c->cb_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  const char *sign_as = luaL_optstring(L, 6, sg__federation_server_id(&lf->f));
  int rc = sg__federation_call_as(&lf->f, sign_as, id, path, (const uint8_t *)body, len, on_call, c);
  if (rc) {
    luaL_unref(L, LUA_REGISTRYINDEX, c->cb_ref);
    free(c);
  }
  return sg__lua_result(L, rc);
}

/* ---- options --------------------------------------------------------------- */

static uint64_t opt_uint(lua_State *L, int t, const char *key, uint64_t dflt) {
  lua_getfield(L, t, key);
  uint64_t v = dflt;
  if (!lua_isnil(L, -1)) {
    if (!lua_isinteger(L, -1) || lua_tointeger(L, -1) < 0)
      luaL_error(L, "federation option %s: a non-negative integer expected", key);
    v = (uint64_t)lua_tointeger(L, -1);
  }
  lua_pop(L, 1);
  return v;
}

static const char *opt_string(lua_State *L, int t, const char *key) {
  lua_getfield(L, t, key);
  const char *s = lua_isnil(L, -1) ? NULL : lua_tostring(L, -1);
  if (!lua_isnil(L, -1) && lua_type(L, -1) != LUA_TSTRING)
    luaL_error(L, "federation option %s: a string expected", key);
  lua_pop(L, 1);  /* the string stays alive in the options table */
  return s;
}

/* opts[key] as a C array of the list's strings (kept on the stack). */
static const char *const *opt_list(lua_State *L, int t, const char *key, size_t *n) {
  *n = 0;
  lua_getfield(L, t, key);
  if (lua_isnil(L, -1)) return NULL;
  luaL_argexpected(L, lua_istable(L, -1), t, "a list of server ids");
  *n = lua_rawlen(L, -1);
  const char **v = lua_newuserdatauv(L, (*n + 1) * sizeof *v, 0);
  for (size_t i = 0; i < *n; i++) {
    if (lua_rawgeti(L, -2, (lua_Integer)i + 1) != LUA_TSTRING)
      luaL_error(L, "federation option %s[%d]: a string expected", key, (int)i + 1);
    v[i] = lua_tostring(L, -1);
    lua_pop(L, 1);
  }
  return v;
}

/* A peers entry's URL: the string, or the table's `url` (the string stays
 * alive in the options table). Adds the id to `bound` when the table asks
 * for audience-bound tokens. */
static const char *peer_entry(lua_State *L, const char *id, const char **bound, size_t *n_bound) {
  if (lua_type(L, -1) == LUA_TSTRING) return lua_tostring(L, -1);
  if (!lua_istable(L, -1))
    luaL_error(L, "federation option peers[%s]: a base URL or { url = } expected", id);
  lua_getfield(L, -1, "require_audience");
  if (lua_toboolean(L, -1)) bound[(*n_bound)++] = id;
  lua_pop(L, 1);
  lua_getfield(L, -1, "url");
  const char *url = lua_tostring(L, -1);
  lua_pop(L, 1);
  if (lua_type(L, -1) == LUA_TTABLE && !url)
    luaL_error(L, "federation option peers[%s]: url (a string) expected", id);
  return url;
}

/* opts.peers { [id] = url | { url =, require_audience = } } as arrays (kept
 * on the stack). */
static void opt_peers(lua_State *L, int t, sg__fed_options *o) {
  lua_getfield(L, t, "peers");
  if (lua_isnil(L, -1)) return;
  int peers = lua_gettop(L);
  luaL_argexpected(L, lua_istable(L, peers), t, "peers: a table of server id = base URL");
  size_t n = 0;
  for (lua_pushnil(L); lua_next(L, peers); lua_pop(L, 1)) n++;
  const char **ids = lua_newuserdatauv(L, (n + 1) * sizeof *ids, 0);
  const char **urls = lua_newuserdatauv(L, (n + 1) * sizeof *urls, 0);
  const char **bound = lua_newuserdatauv(L, (n + 1) * sizeof *bound, 0);
  size_t i = 0, n_bound = 0;
  for (lua_pushnil(L); lua_next(L, peers); lua_pop(L, 1)) {
    if (lua_type(L, -2) != LUA_TSTRING)
      luaL_error(L, "federation option peers: server id strings expected as keys");
    ids[i] = lua_tostring(L, -2);
    urls[i] = peer_entry(L, ids[i], bound, &n_bound);
    i++;
  }
  o->peer_ids = ids;
  o->peer_urls = urls;
  o->n_peers = n;
  o->policy.bound = bound;
  o->policy.n_bound = n_bound;
}

static void opt_limits(lua_State *L, int t, sg__hrpc_limits *l) {
  sg__hrpc_limits_default(l);
  lua_getfield(L, t, "limits");
  if (lua_isnil(L, -1)) return;
  int lim = lua_gettop(L);
  l->max_body_bytes = opt_uint(L, lim, "max_body_bytes", l->max_body_bytes);
  l->max_header_bytes = opt_uint(L, lim, "max_header_bytes", l->max_header_bytes);
  l->header_timeout_ms = opt_uint(L, lim, "header_timeout_ms", l->header_timeout_ms);
  l->body_timeout_ms = opt_uint(L, lim, "body_timeout_ms", l->body_timeout_ms);
  l->idle_timeout_ms = opt_uint(L, lim, "idle_timeout_ms", l->idle_timeout_ms);
  l->max_connections = (unsigned)opt_uint(L, lim, "max_connections", l->max_connections);
  l->max_connections_per_address =
      (unsigned)opt_uint(L, lim, "max_connections_per_address", l->max_connections_per_address);
}

static void check_options(lua_State *L, sg__fed_options *o, sg__hrpc_limits *limits) {
  luaL_checktype(L, 1, LUA_TTABLE);
  memset(o, 0, sizeof *o);
  o->data_dir = opt_string(L, 1, "data_dir");
  luaL_argcheck(L, o->data_dir != NULL, 1, "data_dir is required");
  o->server_id = opt_string(L, 1, "server_id");
  o->listen = opt_string(L, 1, "listen");
  sg__token_policy_init(&o->policy);
  o->policy.window = opt_uint(L, 1, "token_window", o->policy.window);
  o->policy.unbound_window = opt_uint(L, 1, "unbound_token_window", o->policy.unbound_window);
  o->policy.allow = opt_list(L, 1, "allow", &o->policy.n_allow);
  o->policy.block = opt_list(L, 1, "block", &o->policy.n_block);
  o->request_timeout_ms = opt_uint(L, 1, "request_timeout_ms", 0);
  o->key_refetch_ms = opt_uint(L, 1, "key_refetch_ms", 0);
  o->key_fetch_rate = (unsigned)opt_uint(L, 1, "key_fetch_rate", 0);
  o->key_cache_size = (size_t)opt_uint(L, 1, "key_cache_size", 0);
  lua_getfield(L, 1, "key_fetch_private");
  o->key_fetch_private = lua_toboolean(L, -1);
  lua_getfield(L, 1, "verify_in_pool");
  o->verify_on_loop = lua_type(L, -1) == LUA_TBOOLEAN && !lua_toboolean(L, -1);
  lua_pop(L, 2);
  opt_peers(L, 1, o);
  opt_limits(L, 1, limits);
  o->limits = limits;
}

/* ---- life cycle ------------------------------------------------------------ */

static void fed_closed(sg__federation *f) {
  sg__lown_c_done(&((lfed *)((char *)f - offsetof(lfed, f)))->own);
}

static int l_close(lua_State *L) {
  lfed *lf = sg__lown_get(L, 1, FED_MT);
  if (lf && sg__lown_close(&lf->own)) sg__federation_close(&lf->f, fed_closed);
  return 0;
}

static int l_gc(lua_State *L) {
  lfed *lf = sg__lown_take(L, 1, FED_MT);
  if (lf && sg__lown_gc(&lf->own)) sg__federation_close(&lf->f, fed_closed);
  return 0;
}

static int l_start(lua_State *L) {
  sg__lenv *h = sg__lenv_of(L);
  if (!h) return luaL_error(L, "segue.federation needs the segue host");
  if (h->closing) return sg__lua_fail(L, SG_ECLOSING, NULL);
  sg__fed_options o;
  sg__hrpc_limits limits;
  check_options(L, &o, &limits);
  lfed *lf = sg__lown_new(L, h, FED_MT, sizeof *lf);
  char err[512];
  int rc = sg__federation_init(h->loop, &lf->f, &o, &h->log, err, sizeof err);
  if (rc) {
    if (sg__lown_close(&lf->own)) sg__federation_close(&lf->f, fed_closed);
    return sg__lua_fail(L, rc, err);
  }
  sg__federation_set_handler(&lf->f, on_request, lf);
  sg__federation_set_key_cb(&lf->f, on_key, lf);
  sg__lown_pin(L, &lf->own, -1);
  return 1;
}

static int l_port(lua_State *L) {
  int port = sg__federation_port(&check_fed(L)->f);
  if (port < 0) return 0;
  lua_pushinteger(L, port);
  return 1;
}

static int l_public_key(lua_State *L) {
  lua_pushlstring(L, (const char *)sg__federation_public_key(&check_fed(L)->f),
                  SG_KEYS_PUBLIC_BYTES);
  return 1;
}

static void set_count(lua_State *L, const char *k, uint64_t v) {
  lua_pushinteger(L, (lua_Integer)v);
  lua_setfield(L, -2, k);
}

/* fed:stats() -> { key_fetches, fetches_limited, verifies, verified_hits,
 * cached_keys, failed_keys, connections, accepted, rejected, evicted } */
static int l_stats(lua_State *L) {
  lfed *lf = check_fed(L);
  sg__fed_stats fs;
  sg__federation_stats_get(&lf->f, &fs);
  lua_createtable(L, 0, 10);
  set_count(L, "key_fetches", fs.key_fetches);
  set_count(L, "fetches_limited", fs.fetches_limited);
  set_count(L, "verifies", fs.verifies);
  set_count(L, "verified_hits", fs.verified_hits);
  set_count(L, "cached_keys", sg__keycache_count(&lf->f.cache, 0));
  set_count(L, "failed_keys", sg__keycache_count(&lf->f.cache, 1));
  if (lf->f.serving) {
    sg__hrpc_server_stats hs;
    sg__hrpc_server_stats_get(&lf->f.server, &hs);
    set_count(L, "connections", hs.active);
    set_count(L, "accepted", hs.accepted);
    set_count(L, "rejected", hs.rejected);
    set_count(L, "evicted", hs.evicted);
  }
  return 1;
}

static int l_server_id(lua_State *L) {
  lua_pushstring(L, sg__federation_server_id(&check_fed(L)->f));
  return 1;
}

int luaopen_segue_federation_core(lua_State *L) {
  static const luaL_Reg fed_methods[] = {
      {"on_request", l_on_request}, {"on_key", l_on_key}, {"call", l_call},
      {"key_get", l_key_get},       {"key_put", l_key_put}, {"port", l_port},
      {"public_key", l_public_key}, {"server_id", l_server_id}, {"close", l_close},
      {"stats", l_stats},
      {NULL, NULL}};
  static const luaL_Reg req_methods[] = {
      {"respond", l_req_respond}, {"error", l_req_error}, {"alive", l_req_alive},
      {"on_done", l_req_on_done}, {NULL, NULL}};
  static const luaL_Reg fns[] = {{"start", l_start}, {"load_key", l_load_key}, {NULL, NULL}};
  static const luaL_Reg fed_meta[] = {{"__gc", l_gc}, {NULL, NULL}};
  static const luaL_Reg req_meta[] = {{"__gc", l_req_gc}, {NULL, NULL}};
  sg__lua_class(L, FED_MT, fed_methods, fed_meta);
  sg__lua_class(L, REQ_MT, req_methods, req_meta);
  luaL_newlib(L, fns);
  /* methods: { ["protocol.sync.v1.PostboxService/Push"] = {name=, request=,
   * response=} } (message type names), from runtime/harmony's one table. */
  lua_newtable(L);
  for (const sg__fed_method_desc *m = sg__fed_methods; m->name; m++) {
    lua_createtable(L, 0, 3);
    lua_pushstring(L, m->name);
    lua_setfield(L, -2, "name");
    lua_pushstring(L, m->request->name);
    lua_setfield(L, -2, "request");
    lua_pushstring(L, m->response->name);
    lua_setfield(L, -2, "response");
    lua_setfield(L, -2, m->path + 1);
  }
  lua_setfield(L, -2, "methods");
  /* errors: { BAD_UNARY = {identifier=, status=}, ... } (hrpc_errors.h). */
  lua_newtable(L);
#define XX(name, id, status)          \
  lua_createtable(L, 0, 2);           \
  lua_pushstring(L, id);              \
  lua_setfield(L, -2, "identifier");  \
  lua_pushinteger(L, status);         \
  lua_setfield(L, -2, "status");      \
  lua_setfield(L, -2, #name);
  SG__HRPC_ERROR_MAP(XX)
#undef XX
  lua_setfield(L, -2, "errors");
  return 1;
}
