/* segue.net: client connections (TCP, TLS) and stdin for Lua backends, on
 * the host's loop. Translation only; the connection logic is in
 * runtime/net_tcp.c. luv's model: the userdata holds a pointer to C memory;
 * the registry keeps a conn alive until its close callback; the memory goes
 * when both that callback ran and the userdata was collected.
 *
 * Every call that waits takes an optional callback; without one, inside a
 * coroutine, it yields and returns the same values (like backend:request).
 * World failures are nil, "ENAME: message", "ENAME". */
#include <lauxlib.h>
#include <stdlib.h>
#include <string.h>

#include "bindings.h"
#include "net_tcp.h"

#define CONN_MT "segue.net.conn"

/* Who waits for an outcome: a callback or a suspended coroutine. */
typedef struct {
  int ref;  /* LUA_NOREF: nobody */
  int is_thread;
} waiter;

/* The connection's C memory: its life is an sg__lown's (bindings.h). The
 * userdata is pinned while the connection is open; the close callback
 * cancels the waiters, then releases it. */
typedef struct lconn {
  sg__lown own;
  sg__net_conn c;
  waiter connect_w, read_w, drain_w;
  int read_lines;         /* what read_w waits for: a line (1) or bytes (0) */
  int closed;             /* closing was asked (or the connection never opened) */
} lconn;

/* ---- waiters ------------------------------------------------------------- */

/* Arms w with the callback at idx, or with the running coroutine when there
 * is none there. Raises (a programmer error) when neither can wait. */
static void waiter_arm(lua_State *L, waiter *w, int idx, const char *what) {
  if (w->ref != LUA_NOREF) luaL_error(L, "%s: another %s is already waiting on this connection", what, what);
  if (lua_isfunction(L, idx)) {
    lua_pushvalue(L, idx);
    w->is_thread = 0;
  } else {
    if (!lua_isnoneornil(L, idx)) luaL_typeerror(L, idx, "function or nil");
    if (!lua_isyieldable(L))
      luaL_error(L, "%s without a callback must run inside a coroutine (see segue.spawn)", what);
    lua_pushthread(L);
    w->is_thread = 1;
  }
  w->ref = luaL_ref(L, LUA_REGISTRYINDEX);
}

/* What the armed call returns now: true for a callback; for a coroutine,
 * whatever resumes it. */
static int waiter_wait(lua_State *L, const waiter *w) {
  if (w->is_thread) return lua_yield(L, 0);
  lua_pushboolean(L, 1);
  return 1;
}

/* Hands the nargs values on top of the host's stack to whoever waits on w. */
static void waiter_fire(sg__lenv *h, waiter *w, int nargs) {
  lua_State *L = h->L;
  waiter armed = *w;
  w->ref = LUA_NOREF;  /* first: the callee may wait again */
  lua_rawgeti(L, LUA_REGISTRYINDEX, armed.ref);
  luaL_unref(L, LUA_REGISTRYINDEX, armed.ref);
  lua_insert(L, -1 - nargs);
  if (armed.is_thread) sg__lenv_resume(h, nargs);
  else sg__lenv_pcall(h, nargs, 0, "segue.net callback");
}

static void waiter_cancel(sg__lenv *h, waiter *w) {
  if (w->ref == LUA_NOREF) return;
  sg__lua_fail(h->L, SG_ECANCELED, "the connection was closed");
  waiter_fire(h, w, 3);
}

/* ---- events from the runtime --------------------------------------------- */

/* Pushes the outcome of one read: 1 value, or 3 for a failure, or nothing
 * (0) while there is no outcome yet. */
static int push_read(lua_State *L, lconn *lc) {
  const char *p;
  size_t n;
  int rc = lc->read_lines ? sg__net_read_line(&lc->c, &p, &n) : sg__net_read_bytes(&lc->c, &p, &n);
  if (rc == 0) return 0;
  if (rc == 1) {
    lua_pushlstring(L, p, n);
    return 1;
  }
  return sg__lua_fail(L, rc, rc == UV_EOF ? "end of stream" : sg__net_error(&lc->c));
}

/* Answers the read and drain waiters that can be answered now. */
static void deliver(sg__net_conn *c) {
  lconn *lc = c->data;
  lua_State *L = lc->own.e->L;
  if (!L || lc->closed) return;
  int n;
  if (lc->read_w.ref != LUA_NOREF && (n = push_read(L, lc)) > 0) waiter_fire(lc->own.e, &lc->read_w, n);
  if (lc->drain_w.ref != LUA_NOREF && !lc->closed && sg__net_write_queue_size(&lc->c) == 0) {
    lua_pushboolean(L, 1);
    waiter_fire(lc->own.e, &lc->drain_w, 1);
  }
}

static void conn_closed(sg__net_conn *c) {
  lconn *lc = c->data;
  if (!lc->own.lua_gone && lc->own.e->L) {
    waiter_cancel(lc->own.e, &lc->connect_w);
    waiter_cancel(lc->own.e, &lc->read_w);
    waiter_cancel(lc->own.e, &lc->drain_w);
  }
  sg__lown_close(&lc->own);
  sg__lown_c_done(&lc->own);
}

static void conn_close(lconn *lc) {
  if (lc->closed) return;
  lc->closed = 1;
  sg__net_close(&lc->c, conn_closed);
}

static void connected(sg__net_conn *c, int status) {
  lconn *lc = c->data;
  lua_State *L = lc->own.e->L;
  if (!L) return;
  if (status == 0) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, lc->own.self_ref);
    waiter_fire(lc->own.e, &lc->connect_w, 1);
    return;
  }
  int n = sg__lua_fail(L, status, sg__net_error(c));
  conn_close(lc);
  waiter_fire(lc->own.e, &lc->connect_w, n);
}

static const sg__net_events events = {connected, deliver, deliver};

/* ---- constructors ---------------------------------------------------------- */

/* A new conn object on the stack, registered so it lives until closed. */
static lconn *new_conn(lua_State *L, sg__lenv *h) {
  lconn *lc = sg__lown_new(L, h, CONN_MT, sizeof *lc);
  lc->c.data = lc;
  lc->connect_w.ref = lc->read_w.ref = lc->drain_w.ref = LUA_NOREF;
  return lc;
}

/* After the runtime answered: a refused conn has no C side and no close
 * callback (__gc frees it); an accepted one is pinned until it closes. */
static void opened(lua_State *L, lconn *lc, int rc) {
  if (rc == 0) {
    sg__lown_pin(L, &lc->own, -1);
    return;
  }
  lc->closed = 1;
  sg__lown_close(&lc->own);
  sg__lown_c_done(&lc->own);
}

static sg__lenv *live_host(lua_State *L) {
  sg__lenv *h = sg__lenv_of(L);
  if (!h) luaL_error(L, "segue.net needs the segue host");
  if (h->closing) luaL_error(L, "the host is closing");
  return h;
}

static size_t opt_size(lua_State *L, int idx, const char *key, size_t dflt) {
  if (lua_getfield(L, idx, key) == LUA_TNIL) {
    lua_pop(L, 1);
    return dflt;
  }
  lua_Integer v = lua_tointeger(L, -1);
  if (v <= 0) luaL_error(L, "option %s must be a positive integer", key);
  lua_pop(L, 1);
  return (size_t)v;
}

static int opt_bool(lua_State *L, int idx, const char *key, int dflt) {
  int t = lua_getfield(L, idx, key);
  int v = t == LUA_TNIL ? dflt : lua_toboolean(L, -1);
  if (t != LUA_TNIL && t != LUA_TBOOLEAN) luaL_error(L, "option %s must be a boolean", key);
  lua_pop(L, 1);
  return v;
}

/* Reads connect options from the table at idx (strings stay on the stack). */
static void check_options(lua_State *L, int idx, sg__net_options *o) {
  memset(o, 0, sizeof *o);
  o->verify = 1;
  if (idx == 0 || lua_isnoneornil(L, idx)) return;
  luaL_checktype(L, idx, LUA_TTABLE);
  o->timeout_ms = opt_size(L, idx, "timeout_ms", 0);
  o->max_line = opt_size(L, idx, "max_line", 0);
  o->tls = opt_bool(L, idx, "tls", 0);
  o->verify = opt_bool(L, idx, "verify", 1);
  lua_getfield(L, idx, "servername");
  o->servername = lua_isnil(L, -1) ? NULL : luaL_checkstring(L, -1);
  lua_getfield(L, idx, "ca_file");
  o->ca_file = lua_isnil(L, -1) ? NULL : luaL_checkstring(L, -1);
  lua_getfield(L, idx, "pin");
  o->pin = lua_isnil(L, -1) ? NULL : luaL_checkstring(L, -1);
}

/* connect(host, port [, options] [, callback]) -> conn | nil, err, code */
static int l_connect(lua_State *L) {
  sg__lenv *h = live_host(L);
  const char *host = luaL_checkstring(L, 1);
  lua_Integer port = luaL_checkinteger(L, 2);
  luaL_argcheck(L, port > 0 && port < 65536, 2, "a port is 1 to 65535");
  int cb = lua_isfunction(L, 3) ? 3 : 4;
  lua_settop(L, 4);  /* fixed slots: check_options pushes above them */
  sg__net_options o;
  check_options(L, cb == 3 ? 0 : 3, &o);
  lconn *lc = new_conn(L, h);
  int rc = sg__net_connect(h->loop, &lc->c, host, (int)port, &o, &events);
  opened(L, lc, rc);
  if (rc != 0) return sg__lua_fail(L, rc, lc->c.error[0] ? lc->c.error : NULL);
  waiter_arm(L, &lc->connect_w, cb, "connect");
  return waiter_wait(L, &lc->connect_w);
}

/* stdin([max_line]) -> conn | nil, err, code: the terminal or pipe on fd 0. */
static int l_stdin(lua_State *L) {
  sg__lenv *h = live_host(L);
  lua_Integer max_line = luaL_optinteger(L, 1, 0);
  luaL_argcheck(L, max_line >= 0, 1, "must not be negative");
  lconn *lc = new_conn(L, h);
  int rc = sg__net_open_fd(h->loop, &lc->c, 0, (size_t)max_line, &events);
  opened(L, lc, rc);
  if (rc == SG_EINVAL) return sg__lua_fail(L, rc, "stdin is not a terminal or a pipe");
  if (rc != 0) return sg__lua_fail(L, rc, NULL);
  return 1;
}

/* ---- methods --------------------------------------------------------------- */

static lconn *check_conn(lua_State *L) {
  lconn *lc = sg__lown_get(L, 1, CONN_MT);
  if (!lc) luaL_argerror(L, 1, "connection already collected");
  return lc;
}

static int do_read(lua_State *L, int lines) {
  lconn *lc = check_conn(L);
  if (lc->closed) return sg__lua_fail(L, SG_ECANCELED, "the connection was closed");
  int has_cb = lua_isfunction(L, 2);
  if (lc->read_w.ref == LUA_NOREF) lc->read_lines = lines;
  if (!has_cb && lc->read_w.ref == LUA_NOREF) {
    int n = push_read(L, lc);
    if (n > 0) return n;
  }
  waiter_arm(L, &lc->read_w, 2, lines ? "read_line" : "read");
  if (has_cb) sg__net_notify(&lc->c);  /* input may be buffered already */
  return waiter_wait(L, &lc->read_w);
}

/* conn:starttls([options] [, cb]) -> conn | nil, err, code: upgrades the
 * open plain connection to TLS (options: servername, verify, ca_file, pin,
 * timeout_ms). On failure the connection is closed. */
static int l_starttls(lua_State *L) {
  lconn *lc = check_conn(L);
  if (lc->closed) return sg__lua_fail(L, SG_ECANCELED, "the connection was closed");
  int cb = lua_isfunction(L, 2) ? 2 : 3;
  lua_settop(L, 3);
  sg__net_options o;
  check_options(L, cb == 2 ? 0 : 2, &o);
  if (lc->connect_w.ref != LUA_NOREF || lc->read_w.ref != LUA_NOREF)
    return luaL_error(L, "starttls: a read or connect is waiting on this connection");
  int rc = sg__net_starttls(&lc->c, &o);
  if (rc != 0) return sg__lua_fail(L, rc, sg__net_error(&lc->c));
  waiter_arm(L, &lc->connect_w, cb, "starttls");
  return waiter_wait(L, &lc->connect_w);
}

/* conn:read_line([cb]) -> line | nil, err, code ("EOF" at the end) */
static int l_read_line(lua_State *L) { return do_read(L, 1); }

/* conn:read([cb]) -> the buffered bytes (a chunk) | nil, err, code */
static int l_read(lua_State *L) { return do_read(L, 0); }

/* conn:write(data) -> true, queued_bytes | nil, err, code. Returns once
 * queued; conn:drain() waits for the queue to empty. */
static int l_write(lua_State *L) {
  lconn *lc = check_conn(L);
  size_t len;
  const char *data = luaL_checklstring(L, 2, &len);
  int rc = sg__net_write(&lc->c, data, len);
  if (rc != 0) return sg__lua_fail(L, rc, rc == UV_ENOTCONN ? "the connection is not open" : sg__net_error(&lc->c));
  lua_pushboolean(L, 1);
  lua_pushinteger(L, (lua_Integer)sg__net_write_queue_size(&lc->c));
  return 2;
}

/* conn:drain([cb]) -> true once every queued byte went to the kernel. */
static int l_drain(lua_State *L) {
  lconn *lc = check_conn(L);
  if (lc->closed) return sg__lua_fail(L, SG_ECANCELED, "the connection was closed");
  int has_cb = lua_isfunction(L, 2);
  if (!has_cb && lc->drain_w.ref == LUA_NOREF && sg__net_write_queue_size(&lc->c) == 0) {
    lua_pushboolean(L, 1);
    return 1;
  }
  waiter_arm(L, &lc->drain_w, 2, "drain");
  if (has_cb) sg__net_notify(&lc->c);
  return waiter_wait(L, &lc->drain_w);
}

static int l_write_queue_size(lua_State *L) {
  lua_pushinteger(L, (lua_Integer)sg__net_write_queue_size(&check_conn(L)->c));
  return 1;
}

/* conn:close(): waiting reads and drains get ECANCELED (later). */
static int l_close(lua_State *L) {
  conn_close(check_conn(L));
  return 0;
}

static int l_is_closed(lua_State *L) {
  lua_pushboolean(L, check_conn(L)->closed);
  return 1;
}

static int l_tostring(lua_State *L) {
  lconn **ud = luaL_checkudata(L, 1, CONN_MT);
  lua_pushfstring(L, "segue.net.conn (%s)", *ud ? (*ud)->c.where : "collected");
  return 1;
}

/* Collected: open only when the state is closing (the registry held it). */
static int l_gc(lua_State *L) {
  lconn *lc = sg__lown_take(L, 1, CONN_MT);
  if (lc && sg__lown_gc(&lc->own)) conn_close(lc);
  return 0;
}

int luaopen_segue_net(lua_State *L) {
  static const luaL_Reg methods[] = {
      {"read_line", l_read_line}, {"read", l_read}, {"starttls", l_starttls}, {"write", l_write},
      {"drain", l_drain}, {"write_queue_size", l_write_queue_size}, {"close", l_close},
      {"is_closed", l_is_closed}, {NULL, NULL}};
  static const luaL_Reg fns[] = {{"connect", l_connect}, {"stdin", l_stdin}, {NULL, NULL}};
  static const luaL_Reg meta[] = {{"__gc", l_gc}, {"__tostring", l_tostring}, {NULL, NULL}};
  sg__lua_class(L, CONN_MT, methods, meta);
  luaL_newlib(L, fns);
  return 1;
}
