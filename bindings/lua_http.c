/* segue.http_core: runtime/web/http_server.h for Lua. Translation only: the
 * routes, authentication and JSON are scripts/segue/api.lua's.
 *
 *   listen(address, limits, fn(req, info)) -> server | nil, err, code
 *       limits = { max_header_bytes, max_headers, max_body_bytes,
 *                  header_timeout_ms, body_timeout_ms, write_timeout_ms,
 *                  max_pending_bytes, max_connections } (any may be absent)
 *       info = { method, path, query, headers = { [lower-case name] = value },
 *                body, peer }
 *   server:port(), server:stats() -> { accepted, rejected, requests, active },
 *   server:close()
 *   req:respond(status, headers, body) -> true | nil, err, code
 *   req:stream(status, headers) -> true | nil, err, code
 *   req:write(data) -> true | nil, err, code   ("ELIMIT": reader too far behind)
 *   req:finish()       ends a stream, or answers 500 when nothing was answered
 *   req:on_gone(fn(err, code)) -> true | nil, err, code
 *   req:alive(), req:pending() -> unwritten bytes
 *   new_token() -> "sgt_..." (random); token_hash(token) -> hex BLAKE2b
 * `headers` is a table { ["Content-Type"] = "..." }; a name or value with a
 * CR or LF raises (it would split the response).
 *
 * A request Lua drops without finishing is finished by __gc (500, or the end
 * of its stream). An open server stays referenced until server:close(). */
#include <lauxlib.h>
#include <sodium.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bindings.h"
#include "http_server.h"

#define SRV_MT "segue.http.server"
#define REQ_MT "segue.http.request"

/* The server's C memory: its life is an sg__lown's (bindings.h); refs[HANDLER]
 * is the request handler. */
enum { HANDLER = 0 };
typedef struct lsrv {
  sg__lown own;
  sg__http_server srv;
} lsrv;

/* Lives in the request's userdata. `h` outlives every userdata; `ls` is
 * used only while the request is held (the server cannot finish closing
 * before it is given back), never by __gc, which may run after the server's
 * memory was freed. */
typedef struct lreq {
  sg__http_request *r;  /* NULL once finished */
  lsrv *ls;
  sg__lenv *h;
  int gone_ref;
} lreq;

/* ---- requests ---------------------------------------------------------------- */

static lreq *check_req(lua_State *L) {
  lreq *q = luaL_checkudata(L, 1, REQ_MT);
  if (!q->r) luaL_argerror(L, 1, "the request is finished");
  return q;
}

static void req_finish(lua_State *L, lreq *q) {
  if (!q->r) return;
  sg__http_request *r = q->r;
  q->r = NULL;
  if (L) luaL_unref(L, LUA_REGISTRYINDEX, q->gone_ref);
  q->gone_ref = LUA_NOREF;
  sg__http_request_release(r);
}

/* Pushes the header lines of the table at idx as one string; raises on
 * CR/LF or a name that is not a token. */
static const char *push_headers(lua_State *L, int idx) {
  lua_pushliteral(L, "");
  int acc = lua_gettop(L);
  if (lua_isnoneornil(L, idx)) return lua_tostring(L, acc);
  luaL_checktype(L, idx, LUA_TTABLE);
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    const char *name = luaL_checkstring(L, -2), *value = luaL_checkstring(L, -1);
    if (!*name || strpbrk(name, "\r\n: \t") || strpbrk(value, "\r\n"))
      luaL_error(L, "header %s: a name must be a token and no value may hold CR or LF", name);
    lua_pushvalue(L, acc);
    lua_pushfstring(L, "%s: %s\r\n", name, value);
    lua_concat(L, 2);
    lua_replace(L, acc);
    lua_pop(L, 1);
  }
  return lua_tostring(L, acc);
}

static int push_rc(lua_State *L, int rc) { return sg__lua_result(L, rc); }

static int l_req_respond(lua_State *L) {
  lreq *q = check_req(L);
  int status = (int)luaL_checkinteger(L, 2);
  size_t len;
  const char *body = luaL_optlstring(L, 4, "", &len);
  luaL_argcheck(L, status >= 100 && status <= 599, 2, "an HTTP status expected");
  const char *headers = push_headers(L, 3);
  sg__http_request *r = q->r;
  q->r = NULL;
  luaL_unref(L, LUA_REGISTRYINDEX, q->gone_ref);
  q->gone_ref = LUA_NOREF;
  return push_rc(L, sg__http_respond(r, status, headers, body, len));
}

static int l_req_stream(lua_State *L) {
  lreq *q = check_req(L);
  int status = (int)luaL_checkinteger(L, 2);
  luaL_argcheck(L, status >= 100 && status <= 599, 2, "an HTTP status expected");
  const char *headers = push_headers(L, 3);
  return push_rc(L, sg__http_stream_begin(q->r, status, headers));
}

static int l_req_write(lua_State *L) {
  lreq *q = check_req(L);
  size_t len;
  const char *data = luaL_checklstring(L, 2, &len);
  return push_rc(L, sg__http_stream_write(q->r, data, len));
}

static int l_req_finish(lua_State *L) {
  lreq *q = luaL_checkudata(L, 1, REQ_MT);
  req_finish(L, q);
  return 0;
}

static int l_req_alive(lua_State *L) {
  lreq *q = luaL_checkudata(L, 1, REQ_MT);
  lua_pushboolean(L, q->r && sg__http_request_alive(q->r));
  return 1;
}

static int l_req_pending(lua_State *L) {
  lreq *q = luaL_checkudata(L, 1, REQ_MT);
  lua_pushinteger(L, q->r ? (lua_Integer)sg__http_pending_bytes(q->r) : 0);
  return 1;
}

static void on_gone(sg__http_request *r, void *ud, int status) {
  lreq *q = ud;
  lua_State *L = q->ls->own.e->L;
  int ref = q->gone_ref;
  q->gone_ref = LUA_NOREF;
  if (q->ls->own.lua_gone || !L || ref == LUA_NOREF) return;
  lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
  luaL_unref(L, LUA_REGISTRYINDEX, ref);
  lua_pushfstring(L, "%s: %s", sg_err_name(status), sg_strerror(status));
  lua_pushstring(L, sg_err_name(status));
  sg__lenv_pcall(q->ls->own.e, 2, 0, "http stream close handler");
}

static int l_req_on_gone(lua_State *L) {
  lreq *q = check_req(L);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  if (q->gone_ref != LUA_NOREF) return luaL_error(L, "on_gone is set already");
  int rc = sg__http_request_on_gone(q->r, on_gone, q);
  if (rc) return push_rc(L, rc);
  lua_pushvalue(L, 2);
  q->gone_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushboolean(L, 1);
  return 1;
}

static int l_req_gc(lua_State *L) {
  lreq *q = luaL_checkudata(L, 1, REQ_MT);
  req_finish(q->h->L ? L : NULL, q);
  return 0;
}

/* ---- the server ---------------------------------------------------------------- */

static void set_str(lua_State *L, const char *k, const char *v, size_t len) {
  lua_pushlstring(L, v, len);
  lua_setfield(L, -2, k);
}

static void on_request(sg__http_request *r, void *ud) {
  lsrv *ls = ud;
  lua_State *L = ls->own.e->L;
  if (ls->own.lua_gone || !L || ls->own.closed) {
    sg__http_request_release(r);
    return;
  }
  luaL_checkstack(L, 8, "http request");
  sg__lown_push(L, &ls->own, HANDLER);
  lreq *q = lua_newuserdatauv(L, sizeof *q, 0);
  q->r = r;
  q->ls = ls;
  q->h = ls->own.e;
  q->gone_ref = LUA_NOREF;
  luaL_setmetatable(L, REQ_MT);
  lua_createtable(L, 0, 6);
  set_str(L, "method", r->method, strlen(r->method));
  set_str(L, "path", r->path, strlen(r->path));
  if (r->query) set_str(L, "query", r->query, strlen(r->query));
  set_str(L, "body", r->body, r->body_len);
  set_str(L, "peer", r->peer, strlen(r->peer));
  lua_createtable(L, 0, (int)r->nheaders);
  for (size_t i = 0; i < r->nheaders; i++)
    set_str(L, r->headers[i].name, r->headers[i].value, strlen(r->headers[i].value));
  lua_setfield(L, -2, "headers");
  sg__lenv_pcall(ls->own.e, 2, 0, "http request handler");
}

static lsrv *check_srv(lua_State *L) {
  lsrv *ls = sg__lown_get(L, 1, SRV_MT);
  if (!ls || ls->own.closed) luaL_argerror(L, 1, "the server is closed");
  return ls;
}

static void srv_closed(sg__http_server *s) {
  sg__lown_c_done(&((lsrv *)((char *)s - offsetof(lsrv, srv)))->own);
}

static int l_close(lua_State *L) {
  lsrv *ls = sg__lown_get(L, 1, SRV_MT);
  if (ls && sg__lown_close(&ls->own)) sg__http_server_close(&ls->srv, srv_closed);
  return 0;
}

static int l_gc(lua_State *L) {
  lsrv *ls = sg__lown_take(L, 1, SRV_MT);
  if (ls && sg__lown_gc(&ls->own)) sg__http_server_close(&ls->srv, srv_closed);
  return 0;
}

static lua_Integer opt_limit(lua_State *L, int idx, const char *key) {
  lua_getfield(L, idx, key);
  lua_Integer v = luaL_optinteger(L, -1, 0);
  if (v < 0) luaL_error(L, "limits.%s must not be negative", key);
  lua_pop(L, 1);
  return v;
}

static int l_listen(lua_State *L) {
  sg__lenv *h = sg__lenv_check(L);
  const char *address = luaL_checkstring(L, 1);
  if (h->closing) return sg__lua_fail(L, SG_ECLOSING, NULL);
  sg__http_limits lim = {0};
  if (!lua_isnoneornil(L, 2)) {
    luaL_checktype(L, 2, LUA_TTABLE);
    lim.max_header_bytes = (size_t)opt_limit(L, 2, "max_header_bytes");
    lim.max_headers = (unsigned)opt_limit(L, 2, "max_headers");
    lim.max_body_bytes = (size_t)opt_limit(L, 2, "max_body_bytes");
    lim.header_timeout_ms = (uint64_t)opt_limit(L, 2, "header_timeout_ms");
    lim.body_timeout_ms = (uint64_t)opt_limit(L, 2, "body_timeout_ms");
    lim.write_timeout_ms = (uint64_t)opt_limit(L, 2, "write_timeout_ms");
    lim.max_pending_bytes = (size_t)opt_limit(L, 2, "max_pending_bytes");
    lim.max_connections = (unsigned)opt_limit(L, 2, "max_connections");
  }
  luaL_checktype(L, 3, LUA_TFUNCTION);
  lsrv *ls = sg__lown_new(L, h, SRV_MT, sizeof *ls);
  int rc = sg__http_server_init(h->loop, &ls->srv, &lim, &h->log, on_request, ls);
  if (rc) {
    sg__lown_discard(L, -1, &ls->own);
    return sg__lua_fail(L, rc, NULL);
  }
  rc = sg__http_server_listen(&ls->srv, address);
  if (rc) {
    if (sg__lown_close(&ls->own)) sg__http_server_close(&ls->srv, srv_closed);
    char msg[300];
    snprintf(msg, sizeof msg, "cannot listen on %s: %s", address,
             rc == SG_EINVAL ? "expected an IP address and port" : uv_strerror(rc));
    return sg__lua_fail(L, rc, msg);
  }
  sg__lown_ref(L, &ls->own, HANDLER, 3);
  sg__lown_pin(L, &ls->own, -1);
  return 1;
}

static int l_port(lua_State *L) {
  lua_pushinteger(L, sg__http_server_port(&check_srv(L)->srv));
  return 1;
}

static int l_stats(lua_State *L) {
  sg__http_stats st;
  sg__http_server_stats_get(&check_srv(L)->srv, &st);
  lua_createtable(L, 0, 4);
  lua_pushinteger(L, (lua_Integer)st.accepted);
  lua_setfield(L, -2, "accepted");
  lua_pushinteger(L, (lua_Integer)st.rejected);
  lua_setfield(L, -2, "rejected");
  lua_pushinteger(L, (lua_Integer)st.requests);
  lua_setfield(L, -2, "requests");
  lua_pushinteger(L, st.active);
  lua_setfield(L, -2, "active");
  return 1;
}

/* ---- tokens ------------------------------------------------------------------ */

/* new_token() -> a fresh random token (32 bytes, URL-safe base64, no padding) */
static int l_new_token(lua_State *L) {
  unsigned char raw[32];
  char b64[sodium_base64_ENCODED_LEN(sizeof raw, sodium_base64_VARIANT_URLSAFE_NO_PADDING)];
  randombytes_buf(raw, sizeof raw);
  sodium_bin2base64(b64, sizeof b64, raw, sizeof raw, sodium_base64_VARIANT_URLSAFE_NO_PADDING);
  sodium_memzero(raw, sizeof raw);
  lua_pushfstring(L, "sgt_%s", b64);
  sodium_memzero(b64, sizeof b64);
  return 1;
}

/* token_hash(token) -> hex of its BLAKE2b (crypto_generichash) hash: what
 * the store keeps instead of the token. */
static int l_token_hash(lua_State *L) {
  size_t len;
  const char *token = luaL_checklstring(L, 1, &len);
  unsigned char h[crypto_generichash_BYTES];
  char hex[crypto_generichash_BYTES * 2 + 1];
  crypto_generichash(h, sizeof h, (const unsigned char *)token, len, NULL, 0);
  sodium_bin2hex(hex, sizeof hex, h, sizeof h);
  lua_pushstring(L, hex);
  return 1;
}

int luaopen_segue_http_core(lua_State *L) {
  static const luaL_Reg srv_methods[] = {
      {"port", l_port}, {"stats", l_stats}, {"close", l_close}, {NULL, NULL}};
  static const luaL_Reg req_methods[] = {
      {"respond", l_req_respond}, {"stream", l_req_stream}, {"write", l_req_write},
      {"finish", l_req_finish},   {"alive", l_req_alive},   {"pending", l_req_pending},
      {"on_gone", l_req_on_gone}, {NULL, NULL}};
  static const luaL_Reg srv_meta[] = {{"__gc", l_gc}, {NULL, NULL}};
  static const luaL_Reg req_meta[] = {{"__gc", l_req_gc}, {NULL, NULL}};
  static const luaL_Reg fns[] = {
      {"listen", l_listen}, {"new_token", l_new_token}, {"token_hash", l_token_hash}, {NULL, NULL}};
  sg__lua_class(L, SRV_MT, srv_methods, srv_meta);
  sg__lua_class(L, REQ_MT, req_methods, req_meta);
  luaL_newlib(L, fns);
  return 1;
}
