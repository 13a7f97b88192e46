/* segue.postbox_core: runtime/harmony/postbox.h for Lua (scripts/segue/postbox.lua
 * is segue.postbox, the policy on top). The transport is two Lua
 * functions (scripts/segue/postbox.lua wires them to segue.federation):
 *
 *   new(db, opts, { push = fn(server_id, event, done), deliver = fn(server_id, event) })
 *       -> pb | nil, err, code
 *       opts = { push_tries, push_backoff_ms, queue_limit, deliver_tries,
 *                deliver_backoff_ms }; push calls done(nil) when the peer
 *       accepted the event, done("why") when not; deliver returns true, or
 *       nil, err / raises (the event stays in the inbox and is retried).
 * Methods that take a callback return true (cb runs once: before the method
 * returns when the store answers at once, SQLite; later otherwise,
 * PostgreSQL) or nil, err, code (cb never runs):
 *   pb:push(server_id, event, cb)     cb(true, "pushed" | "queued") | cb(nil, err)
 *   pb:pull_begin(server_id, max_bytes | nil, cb)   cb({ event, ... }, batch) | cb(nil, err)
 *   pb:pull_end(batch, written)       written: the response went out whole
 *   postbox_core.defaults               the delivery rules' defaults (C's)
 *   pb:receive(server_id, { event, ... }, cb)   cb(true) | cb(nil, err) once stored
 *   pb:receive_push(server_id, event, cb)       the same; held while the peer is
 *   pb:hold(server_id), pb:release(server_id)
 *   pb:note(server_id, "pulled" | "push_in" | "error" [, message])
 *   pb:peers(cb)   cb({ { server_id, queued, inbox, waiting, last_push, ... }, ... })
 *   pb:key_get(server_id, cb)         cb(32 bytes | nil [, err])
 *   pb:key_remember(server_id, key) -> true   (a store write only when it changed)
 *   pb:rename(old_id, new_id, cb)     cb(true | false (unknown) | nil, err)
 *   pb:serve_pushes(fed, pushed) / pb:serve_pushes(nil)   the federation's
 *       Pushes (fed: segue.federation_core's object) are stored by the
 *       postbox in C (runtime/harmony/postbox_push.h: the key remembered,
 *       the Event stored, the Push answered once committed); pushed(server_id)
 *       runs for a peer's first Push, then at most once a second while it
 *       Pushes (pb:pushed_at has the last one's time). Replaces the Lua
 *       Push handler while set.
 *   pb:pushed_at(server_id) -> loop.now() of its last Push received, or nil
 *   pb:deliver_in_lua(on)   false: nobody listens, a received event is
 *       delivered (it leaves the inbox) without calling the deliver function
 *   pb:close()
 *   peers_of(db [, cb]) -> pb:peers()'s rows from the store alone (segue status)
 *
 * The userdata holds a pointer to C memory (luv's model); the postbox keeps
 * its store's Lua value referenced and held, so the store outlives it. */
#include <lauxlib.h>
#include <stdlib.h>
#include <string.h>

#include "bindings.h"
#include "lua_federation.h"
#include "lua_store.h"
#include "postbox.h"
#include "postbox_push.h"

#define PB_MT "segue.postbox"
#define BATCH_MT "segue.postbox.batch"
#define DONE_MT "segue.postbox.done"

/* The postbox's C memory: its life is an sg__lown's (bindings.h), whose
 * refs hold the store and the transport's functions; the userdata stays
 * pinned until close (done closures use it). `pb` is NULL once closed. */
enum { STORE = 0, PUSH = 1, DELIVER = 2, SINK = 3 /* { fed, pushed } */ };
typedef struct lpostbox {
  sg__lown own;
  sg__postbox *pb;
  sg__postbox_pushes pushes;  /* a federation's Pushes stored here (serve_pushes) */
  int quiet;            /* deliver_in_lua(false): nobody listens */
} lpostbox;

/* A call answered through a Lua callback: while the C call has not
 * returned (SQLite answers at once) the values go on the caller's stack and
 * the callback runs on the caller's thread when the method returns; later
 * (PostgreSQL) on the host's state. */
typedef struct lreq {
  lpostbox *lp;
  lua_State *L;  /* the caller, while in_call */
  int in_call, done, nres;
  int ref;       /* the callback */
} lreq;

static lpostbox *check_pb(lua_State *L) {
  lpostbox *lp = sg__lown_get(L, 1, PB_MT);
  if (!lp || !lp->pb) luaL_argerror(L, 1, "the postbox is closed");
  return lp;
}

static lreq *lreq_new(lua_State *L, lpostbox *lp, int idx) {
  luaL_checktype(L, idx, LUA_TFUNCTION);
  lreq *r = calloc(1, sizeof *r);
  if (!r) luaL_error(L, "out of memory");
  r->lp = lp;
  r->L = L;
  r->in_call = 1;
  lua_pushvalue(L, idx);
  r->ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return r;
}

/* The state to push an answer's values on, or NULL (r freed) when Lua is
 * gone. Later answers have the callback pushed first. */
static lua_State *lreq_state(lreq *r) {
  if (r->in_call) {
    luaL_checkstack(r->L, 4, "postbox");
    return r->L;
  }
  lpostbox *lp = r->lp;
  sg__lenv *h = lp->own.lua_gone || !lp->own.e->L ? NULL : lp->own.e;
  if (!h) {
    free(r);
    return NULL;
  }
  lua_rawgeti(h->L, LUA_REGISTRYINDEX, r->ref);
  luaL_unref(h->L, LUA_REGISTRYINDEX, r->ref);
  return h->L;
}

/* The `n` values are pushed: call back (or leave them for lreq_end). */
static void lreq_answer(lreq *r, int n, const char *what) {
  if (r->in_call) {
    r->done = 1;
    r->nres = n;
    return;
  }
  sg__lenv_pcall(r->lp->own.e, n, 0, what);
  free(r);
}

/* Ends a method after its C call returned rc: true (the callback ran or
 * will), or the failure (the callback never runs). */
static int lreq_end(lua_State *L, lreq *r, int rc, const char *errmsg) {
  r->in_call = 0;
  if (rc < 0) {
    luaL_unref(L, LUA_REGISTRYINDEX, r->ref);
    free(r);
    return sg__lua_fail(L, rc, errmsg);
  }
  if (r->done) {
    int n = r->nres;
    lua_rawgeti(L, LUA_REGISTRYINDEX, r->ref);
    luaL_unref(L, LUA_REGISTRYINDEX, r->ref);
    free(r);
    lua_insert(L, -1 - n);
    if (lua_pcall(L, n, 0, 0) != LUA_OK) return lua_error(L);  /* the caller's to catch */
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* ---- the transport, in Lua ---------------------------------------------- */

/* done(nil) / done("why"): the answer to one transport push; once only. */
static int l_done(lua_State *L) {
  void **call = lua_touserdata(L, lua_upvalueindex(1));
  lpostbox *lp = *(lpostbox **)lua_touserdata(L, lua_upvalueindex(2));
  if (!call[0]) return 0;  /* twice, or after a raise: the first word counted */
  const char *why = luaL_optstring(L, 1, NULL);
  void *c = call[0];
  call[0] = NULL;
  if (lp && lp->pb) sg__postbox_push_done(lp->pb, c, why ? SG_EHTTP : 0, why);
  return 0;
}

static int tp_push(void *ud, const char *peer, const uint8_t *ev, size_t len, void *call) {
  lpostbox *lp = ud;
  lua_State *L = lp->own.e->L;
  if (lp->own.lua_gone || !L) return SG_ECLOSING;
  sg__lown_push(L, &lp->own, PUSH);
  lua_pushstring(L, peer);
  lua_pushlstring(L, (const char *)ev, len);
  void **slot = lua_newuserdatauv(L, sizeof *slot, 0);
  *slot = call;
  /* The postbox's userdata, not lp: it keeps lp alive, and lp->pb is NULL
   * after close, so a late done() finds out. */
  lua_rawgeti(L, LUA_REGISTRYINDEX, lp->own.self_ref);
  lua_pushcclosure(L, l_done, 2);
  int err = sg__lenv_pcall(lp->own.e, 3, 0, "postbox push");
  /* A transport that raised counts as a failed try, and its done() as nothing. */
  if (err) *slot = NULL;
  return err;
}

static int tp_deliver(void *ud, const char *peer, const uint8_t *ev, size_t len, char *err,
                      size_t errlen) {
  lpostbox *lp = ud;
  lua_State *L = lp->own.e->L;
  if (lp->own.lua_gone || !L) return SG_ECLOSING;
  if (lp->quiet) return 0;  /* delivered, as an emit to no handler is */
  int top = lua_gettop(L);
  sg__lown_push(L, &lp->own, DELIVER);
  lua_pushstring(L, peer);
  lua_pushlstring(L, (const char *)ev, len);
  int rc = sg__lenv_pcall_raw(lp->own.e, 2, 2);
  int ok = rc == LUA_OK && lua_toboolean(L, -2);
  if (!ok) {
    const char *msg = lua_tostring(L, -1);
    snprintf(err, errlen, "%s", msg ? msg : "handler failed");
  }
  lua_settop(L, top);
  return ok ? 0 : SG_ELUA;
}

/* ---- outbound ---------------------------------------------------------------- */

static void push_answered(void *ud, int err, int how, const char *message) {
  lreq *r = ud;
  lua_State *L = lreq_state(r);
  if (!L) return;
  if (err) {
    lua_pushnil(L);
    lua_pushfstring(L, "%s: %s", sg_err_name(err), message ? message : sg_strerror(err));
  } else {
    lua_pushboolean(L, 1);
    lua_pushstring(L, how == SG_POSTBOX_PUSHED ? "pushed" : "queued");
  }
  lreq_answer(r, 2, "postbox push callback");
}

/* pb:push(server_id, event, cb) -> true | nil, err, code */
static int l_push(lua_State *L) {
  lpostbox *lp = check_pb(L);
  const char *peer = luaL_checkstring(L, 2);
  size_t len;
  const char *ev = luaL_checklstring(L, 3, &len);
  lreq *r = lreq_new(L, lp, 4);
  int rc = sg__postbox_push(lp->pb, peer, (const uint8_t *)ev, len, push_answered, r);
  return lreq_end(L, r, rc, sg__postbox_errmsg(lp->pb));
}

static void batch_ready(void *ud, int err, sg__postbox_batch *b) {
  lreq *r = ud;
  lua_State *L = lreq_state(r);
  if (!L) return;  /* Lua is gone: the postbox closed first, so err is set (no batch) */
  if (err) {
    lua_pushnil(L);
    lua_pushfstring(L, "%s: %s", sg_err_name(err),
                    r->lp->pb ? sg__postbox_errmsg(r->lp->pb) : sg_strerror(err));
    lreq_answer(r, 2, "postbox pull callback");
    return;
  }
  lua_createtable(L, (int)b->n, 0);
  for (size_t i = 0; i < b->n; i++) {
    lua_pushlstring(L, (const char *)b->events[i], b->lens[i]);
    lua_rawseti(L, -2, (lua_Integer)i + 1);
  }
  sg__postbox_batch **ud2 = lua_newuserdatauv(L, sizeof *ud2, 1);
  *ud2 = b;
  luaL_setmetatable(L, BATCH_MT);
  lua_rawgeti(L, LUA_REGISTRYINDEX, r->lp->own.self_ref);  /* so __gc can end it */
  lua_setiuservalue(L, -2, 1);
  lreq_answer(r, 2, "postbox pull callback");
}

/* pb:pull_begin(server_id, max_bytes, cb) -> true | nil, err, code;
 * cb({ event, ... }, batch) or cb(nil, err) */
static int l_pull_begin(lua_State *L) {
  lpostbox *lp = check_pb(L);
  const char *peer = luaL_checkstring(L, 2);
  lua_Integer max = luaL_optinteger(L, 3, 512 * 1024);
  luaL_argcheck(L, max > 0, 3, "must be positive");
  lreq *r = lreq_new(L, lp, 4);
  int rc = sg__postbox_pull_begin(lp->pb, peer, (size_t)max, batch_ready, r);
  return lreq_end(L, r, rc, sg__postbox_errmsg(lp->pb));
}

static int l_pull_end(lua_State *L) {
  lpostbox *lp = check_pb(L);
  sg__postbox_batch **ud = luaL_checkudata(L, 2, BATCH_MT);
  luaL_argcheck(L, *ud != NULL, 2, "the batch was ended already");
  int rc = sg__postbox_pull_end(lp->pb, *ud, lua_toboolean(L, 3) ? 0 : SG_ECANCELED);
  *ud = NULL;
  if (rc < 0) return sg__lua_fail(L, rc, sg__postbox_errmsg(lp->pb));
  lua_pushboolean(L, 1);
  return 1;
}

/* ---- inbound ------------------------------------------------------------------ */

static void stored(void *ud, int err) {
  lreq *r = ud;
  lua_State *L = lreq_state(r);
  if (!L) return;
  if (err) {
    lua_pushnil(L);
    lua_pushfstring(L, "%s: %s", sg_err_name(err),
                    r->lp->pb ? sg__postbox_errmsg(r->lp->pb) : sg_strerror(err));
  } else {
    lua_pushboolean(L, 1);
    lua_pushnil(L);
  }
  lreq_answer(r, 2, "postbox stored callback");
}

/* pb:receive(server_id, { event, ... }, cb) -> true | nil, err, code; cb(true) | cb(nil, err) */
static int l_receive(lua_State *L) {
  lpostbox *lp = check_pb(L);
  const char *peer = luaL_checkstring(L, 2);
  luaL_checktype(L, 3, LUA_TTABLE);
  size_t n = (size_t)lua_rawlen(L, 3);
  const uint8_t **evs = lua_newuserdatauv(L, (n + 1) * (sizeof *evs + sizeof(size_t)), 0);
  size_t *lens = (size_t *)(evs + n + 1);
  for (size_t i = 0; i < n; i++) {
    lua_rawgeti(L, 3, (lua_Integer)i + 1);
    evs[i] = (const uint8_t *)luaL_checklstring(L, -1, &lens[i]);
    lua_pop(L, 1);  /* still referenced by the table */
  }
  lreq *r = lreq_new(L, lp, 4);
  int rc = sg__postbox_receive(lp->pb, peer, evs, lens, n, stored, r);
  return lreq_end(L, r, rc, sg__postbox_errmsg(lp->pb));
}

/* pb:receive_push(server_id, event, cb) -> true | nil, err, code; cb once stored */
static int l_receive_push(lua_State *L) {
  lpostbox *lp = check_pb(L);
  const char *peer = luaL_checkstring(L, 2);
  size_t len;
  const char *ev = luaL_checklstring(L, 3, &len);
  lreq *r = lreq_new(L, lp, 4);
  int rc = sg__postbox_receive_push(lp->pb, peer, (const uint8_t *)ev, len, stored, r);
  return lreq_end(L, r, rc, sg__postbox_errmsg(lp->pb));
}

/* ---- Pushes served in C (pb:serve_pushes: runtime/harmony/postbox_push.h) ------- */

/* The runtime's pushed(server_id): the Lua function's turn. */
static void pushed_in(void *ud, const char *server_id) {
  lpostbox *lp = ud;
  lua_State *L = lp->own.e->L;
  if (!L || lp->own.closed || lp->own.lua_gone) return;
  sg__lown_push(L, &lp->own, SINK);
  lua_rawgeti(L, -1, 2);
  lua_remove(L, -2);
  lua_pushstring(L, server_id);
  sg__lenv_pcall(lp->own.e, 1, 0, "postbox pushed");
}

/* pb:serve_pushes(fed, pushed) | pb:serve_pushes(nil) */
static int l_serve_pushes(lua_State *L) {
  lpostbox *lp = check_pb(L);
  sg__postbox_serve_pushes_stop(&lp->pushes);
  if (lua_isnoneornil(L, 2)) {
    lua_pushnil(L);
    sg__lown_ref(L, &lp->own, SINK, -1);
    return 0;
  }
  sg__federation *f = sg__lua_check_federation(L, 2);
  luaL_checktype(L, 3, LUA_TFUNCTION);
  lua_createtable(L, 2, 0);  /* keeps the federation's memory while it is used */
  lua_pushvalue(L, 2);
  lua_rawseti(L, -2, 1);
  lua_pushvalue(L, 3);
  lua_rawseti(L, -2, 2);
  sg__lown_ref(L, &lp->own, SINK, -1);
  sg__postbox_serve_pushes(&lp->pushes, lp->pb, f, pushed_in, lp);
  return 0;
}

static int l_pushed_at(lua_State *L) {
  lpostbox *lp = check_pb(L);
  uint64_t at = sg__postbox_pushed_at(lp->pb, luaL_checkstring(L, 2));
  if (at) lua_pushinteger(L, (lua_Integer)at);
  else lua_pushnil(L);
  return 1;
}

static int l_deliver_in_lua(lua_State *L) {
  lpostbox *lp = check_pb(L);
  lp->quiet = !lua_toboolean(L, 2);
  return 0;
}

static int l_hold(lua_State *L) {
  lpostbox *lp = check_pb(L);
  int rc = sg__postbox_hold(lp->pb, luaL_checkstring(L, 2));
  if (rc < 0) return sg__lua_fail(L, rc, sg__postbox_errmsg(lp->pb));
  lua_pushboolean(L, 1);
  return 1;
}

static int l_release(lua_State *L) {
  lpostbox *lp = check_pb(L);
  sg__postbox_release(lp->pb, luaL_checkstring(L, 2));
  lua_pushboolean(L, 1);
  return 1;
}

/* ---- peers ---------------------------------------------------------------------- */

static int l_note(lua_State *L) {
  static const char *const kinds[] = {"pulled", "push_in", "error", NULL};
  static const sg__postbox_note_kind map[] = {SG_POSTBOX_NOTE_PULLED, SG_POSTBOX_NOTE_PUSH_IN,
                                             SG_POSTBOX_NOTE_ERROR};
  lpostbox *lp = check_pb(L);
  const char *peer = luaL_checkstring(L, 2);
  int kind = luaL_checkoption(L, 3, NULL, kinds);
  int rc = sg__postbox_note(lp->pb, peer, map[kind], luaL_optstring(L, 4, NULL));
  if (rc < 0) return sg__lua_fail(L, rc, sg__postbox_errmsg(lp->pb));
  lua_pushboolean(L, 1);
  return 1;
}

static void set_int(lua_State *L, const char *k, int64_t v) {
  if (!v) return;  /* never happened */
  lua_pushinteger(L, v);
  lua_setfield(L, -2, k);
}

static void push_peer(lua_State *L, const sg__postbox_peer_status *s) {
  lua_createtable(L, 0, 12);
  lua_pushstring(L, s->server_id);
  lua_setfield(L, -2, "server_id");
  lua_pushinteger(L, s->queued);
  lua_setfield(L, -2, "queued");
  lua_pushinteger(L, s->inbox);
  lua_setfield(L, -2, "inbox");
  lua_pushinteger(L, s->waiting);
  lua_setfield(L, -2, "waiting");
  set_int(L, "first_seen", s->first_seen);
  set_int(L, "last_push", s->last_push);
  set_int(L, "last_push_in", s->last_push_in);
  set_int(L, "last_pull", s->last_pull);
  set_int(L, "last_served", s->last_served);
  set_int(L, "last_error_time", s->last_error_time);
  if (s->last_error) {
    lua_pushstring(L, s->last_error);
    lua_setfield(L, -2, "last_error");
  }
  lua_pushboolean(L, s->held);
  lua_setfield(L, -2, "held");
}

static void push_peers(lua_State *L, int err, const char *message,
                       const sg__postbox_peer_status *st, size_t n) {
  if (err) {
    lua_pushnil(L);
    lua_pushfstring(L, "%s: %s", sg_err_name(err), message ? message : sg_strerror(err));
    return;
  }
  lua_createtable(L, (int)n, 0);
  for (size_t i = 0; i < n; i++) {
    push_peer(L, &st[i]);
    lua_rawseti(L, -2, (lua_Integer)i + 1);
  }
  lua_pushnil(L);
}

static void peers_listed(void *ud, int err, const char *message,
                         const sg__postbox_peer_status *st, size_t n) {
  lreq *r = ud;
  lua_State *L = lreq_state(r);
  if (!L) return;
  push_peers(L, err, message, st, n);
  lreq_answer(r, 2, "postbox peers callback");
}

/* pb:peers(cb) -> true | nil, err, code; cb({ {server_id, queued, ...}, ... }) | cb(nil, err) */
static int l_peers(lua_State *L) {
  lpostbox *lp = check_pb(L);
  lreq *r = lreq_new(L, lp, 2);
  int rc = sg__postbox_peers(lp->pb, peers_listed, r);
  return lreq_end(L, r, rc, sg__postbox_errmsg(lp->pb));
}

typedef struct {
  lua_State *L;
  int done;
} sync_peers;

static void peers_now(void *ud, int err, const char *message, const sg__postbox_peer_status *st,
                      size_t n) {
  sync_peers *sp = ud;
  push_peers(sp->L, err, message, st, n);
  sp->done = 1;
}

/* A peers_of call with a callback: answered in the call (SQLite) or later
 * on the host's state (PostgreSQL). */
typedef struct of_req {
  sg__lenv *h;
  lua_State *L;
  int in_call, done, ref;
} of_req;

static void peers_of_answer(void *ud, int err, const char *message,
                            const sg__postbox_peer_status *st, size_t n) {
  of_req *r = ud;
  if (r->in_call) {
    luaL_checkstack(r->L, 4, "peers_of");
    push_peers(r->L, err, message, st, n);
    r->done = 1;
    return;
  }
  lua_State *L = r->h ? r->h->L : NULL;
  if (L) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, r->ref);
    luaL_unref(L, LUA_REGISTRYINDEX, r->ref);
    push_peers(L, err, message, st, n);
    sg__lenv_pcall(r->h, 2, 0, "postbox peers_of callback");
  }
  free(r);
}

/* peers_of(db [, cb]) -> the peers' rows of a store, without a postbox
 * (segue status, /metrics). Without cb: at once, SQLite only (nil, err on
 * an engine that answers later); with cb: cb(rows) | cb(nil, err), and
 * true. */
static int l_peers_of(lua_State *L) {
  sg__store *s = sg__lua_check_store(L, 1);
  if (lua_isfunction(L, 2)) {
    sg__lenv *h = sg__lenv_of(L);
    if (sg__store_is_async(s) && !h) return luaL_error(L, "peers_of needs the segue host");
    of_req *r = calloc(1, sizeof *r);
    if (!r) return luaL_error(L, "out of memory");
    r->h = h;
    r->L = L;
    r->in_call = 1;
    lua_pushvalue(L, 2);
    r->ref = luaL_ref(L, LUA_REGISTRYINDEX);
    int rc = sg__postbox_store_peers(s, peers_of_answer, r);
    r->in_call = 0;
    if (rc < 0 || r->done) {
      int done = r->done, ref = r->ref;
      free(r);
      if (!done) {
        luaL_unref(L, LUA_REGISTRYINDEX, ref);
        return sg__lua_fail(L, rc, sg__store_errmsg(s));
      }
      lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
      luaL_unref(L, LUA_REGISTRYINDEX, ref);
      lua_insert(L, -3);
      if (lua_pcall(L, 2, 0, 0) != LUA_OK) return lua_error(L);
    }
    lua_pushboolean(L, 1);
    return 1;
  }
  if (sg__store_is_async(s))
    return sg__lua_fail(L, SG_EINVAL, "peers_of: the store answers later (postgresql): pass a callback");
  sync_peers sp = {L, 0};
  int rc = sg__postbox_store_peers(s, peers_now, &sp);
  if (rc < 0) return sg__lua_fail(L, rc, sg__store_errmsg(s));
  if (!sp.done) return sg__lua_fail(L, SG_ESTORE, "no answer");
  if (lua_isnil(L, -2)) return 2;  /* nil, err */
  lua_pop(L, 1);
  return 1;
}

static void key_read(void *ud, int err, const uint8_t *key) {
  lreq *r = ud;
  lua_State *L = lreq_state(r);
  if (!L) return;
  if (err < 0) {
    lua_pushnil(L);
    lua_pushstring(L, sg_err_name(err));
  } else if (err == SG_STORE_NOTFOUND || !key) {
    lua_pushnil(L);
    lua_pushnil(L);
  } else {
    lua_pushlstring(L, (const char *)key, 32);
    lua_pushnil(L);
  }
  lreq_answer(r, 2, "postbox key callback");
}

/* pb:key_get(server_id, cb) -> true; cb(key | nil [, err]) */
static int l_key_get(lua_State *L) {
  lpostbox *lp = check_pb(L);
  const char *peer = luaL_checkstring(L, 2);
  lreq *r = lreq_new(L, lp, 3);
  int rc = sg__postbox_key_get(lp->pb, peer, key_read, r);
  return lreq_end(L, r, rc, sg__postbox_errmsg(lp->pb));
}

/* pb:key_remember(server_id, key) -> true: persisted unless already known */
static int l_key_remember(lua_State *L) {
  lpostbox *lp = check_pb(L);
  size_t len;
  const char *peer = luaL_checkstring(L, 2);
  const char *key = luaL_checklstring(L, 3, &len);
  luaL_argcheck(L, len == 32, 3, "a 32-byte Ed25519 public key expected");
  int rc = sg__postbox_key_remember(lp->pb, peer, (const uint8_t *)key);
  if (rc < 0) return sg__lua_fail(L, rc, sg__postbox_errmsg(lp->pb));
  lua_pushboolean(L, 1);
  return 1;
}

static void renamed(void *ud, int err) {
  lreq *r = ud;
  lua_State *L = lreq_state(r);
  if (!L) return;
  if (err < 0) {
    lua_pushnil(L);
    lua_pushfstring(L, "%s: %s", sg_err_name(err),
                    r->lp->pb ? sg__postbox_errmsg(r->lp->pb) : sg_strerror(err));
  } else {
    lua_pushboolean(L, err == 0);
    lua_pushnil(L);
  }
  lreq_answer(r, 2, "postbox rename callback");
}

/* pb:rename(old_id, new_id, cb) -> true | nil, err, code; cb(true | false (unknown) | nil, err) */
static int l_rename(lua_State *L) {
  lpostbox *lp = check_pb(L);
  const char *old_id = luaL_checkstring(L, 2), *new_id = luaL_checkstring(L, 3);
  lreq *r = lreq_new(L, lp, 4);
  int rc = sg__postbox_rename_peer(lp->pb, old_id, new_id, renamed, r);
  return lreq_end(L, r, rc, sg__postbox_errmsg(lp->pb));
}

/* ---- life cycle ------------------------------------------------------------------ */

static void pb_closed(void *lp) { sg__lown_c_done(&((lpostbox *)lp)->own); }

/* After sg__lown_close: closes the postbox, which may call pb_closed at once. */
static void pb_close(lpostbox *lp) {
  sg__postbox *pb = lp->pb;
  lp->pb = NULL;
  sg__postbox_close(pb, pb_closed, lp);
}

static int l_close(lua_State *L) {
  lpostbox *lp = sg__lown_get(L, 1, PB_MT);
  if (!lp || lp->own.closed) return 0;
  /* (not from __gc: the federation may be gone then; the postbox refuses
   * Pushes once it is closing) */
  sg__postbox_serve_pushes_stop(&lp->pushes);
  sg__lown_push(L, &lp->own, STORE);  /* the store may close again */
  sg__lua_store_hold(L, -1, -1);
  lua_pop(L, 1);
  if (sg__lown_close(&lp->own)) pb_close(lp);
  return 0;
}

/* A postbox collected while it stores a federation's Pushes: the federation
 * stops handing them over, when it is still open (its userdata, kept in
 * SINK, tells: at lua_close it may have been collected first, and a closing
 * federation has dropped the handler itself). Else the next Push would
 * reach this memory after it is freed. */
static void gc_stop_pushes(lua_State *L, lpostbox *lp) {
  if (!lp->pushes.fed || lp->own.closed) return;
  sg__lown_push(L, &lp->own, SINK);
  if (lua_istable(L, -1)) {
    lua_rawgeti(L, -1, 1);
    if (sg__lua_to_federation(L, -1) == lp->pushes.fed) sg__postbox_serve_pushes_stop(&lp->pushes);
    lua_pop(L, 1);
  }
  lua_pop(L, 1);
}

static int l_gc(lua_State *L) {
  lpostbox *lp = sg__lown_take(L, 1, PB_MT);
  if (lp) gc_stop_pushes(L, lp);
  if (lp && sg__lown_gc(&lp->own)) pb_close(lp);
  return 0;
}

/* A batch Lua forgot to end was not acknowledged: its events stay queued. */
static int l_batch_gc(lua_State *L) {
  sg__postbox_batch **ud = luaL_checkudata(L, 1, BATCH_MT);
  lua_getiuservalue(L, 1, 1);
  lpostbox **owner = lua_touserdata(L, -1);
  if (*ud && owner && *owner && (*owner)->pb) sg__postbox_pull_end((*owner)->pb, *ud, SG_ECANCELED);
  *ud = NULL;
  return 0;
}

static unsigned opt_uint(lua_State *L, int idx, const char *key, unsigned dflt) {
  lua_getfield(L, idx, key);
  lua_Integer v = luaL_optinteger(L, -1, dflt);
  lua_pop(L, 1);
  if (v < 0 || v > 0x7fffffff) luaL_error(L, "option %s: out of range", key);
  return (unsigned)v;
}

static int l_new(lua_State *L) {
  sg__lenv *h = sg__lenv_of(L);
  if (!h) return luaL_error(L, "segue.postbox needs the segue host");
  sg__store *store = sg__lua_check_store(L, 1);
  luaL_checktype(L, 2, LUA_TTABLE);
  luaL_checktype(L, 3, LUA_TTABLE);
  sg__postbox_options o;
  sg__postbox_options_default(&o);
  o.push_tries = opt_uint(L, 2, "push_tries", o.push_tries);
  o.push_backoff_ms = opt_uint(L, 2, "push_backoff_ms", (unsigned)o.push_backoff_ms);
  o.queue_limit = opt_uint(L, 2, "queue_limit", o.queue_limit);
  o.deliver_tries = opt_uint(L, 2, "deliver_tries", o.deliver_tries);
  o.deliver_backoff_ms = opt_uint(L, 2, "deliver_backoff_ms", (unsigned)o.deliver_backoff_ms);
  o.claim_ms = opt_uint(L, 2, "claim_ms", (unsigned)o.claim_ms);
  lua_getfield(L, 2, "instance");
  o.instance = luaL_optstring(L, -1, NULL);  /* copied by sg__postbox_new */
  lua_pop(L, 1);  /* the option table keeps the string */
  lua_getfield(L, 3, "push");
  lua_getfield(L, 3, "deliver");
  luaL_argcheck(L, lua_isfunction(L, -2) && lua_isfunction(L, -1), 3,
                "push and deliver functions expected");
  lpostbox *lp = sg__lown_new(L, h, PB_MT, sizeof *lp);
  sg__postbox_transport tp = {tp_push, tp_deliver, lp};
  int rc = sg__postbox_new(h->loop, store, &tp, &o, &lp->pb);
  if (rc < 0) {
    sg__lown_discard(L, -1, &lp->own);
    return sg__lua_fail(L, rc, "cannot open the postbox");
  }
  sg__lown_ref(L, &lp->own, PUSH, -3);
  sg__lown_ref(L, &lp->own, DELIVER, -2);
  sg__lown_ref(L, &lp->own, STORE, 1);
  sg__lua_store_hold(L, 1, 1);
  sg__lown_pin(L, &lp->own, -1);
  return 1;
}

int luaopen_segue_postbox_core(lua_State *L) {
  static const luaL_Reg methods[] = {
      {"push", l_push},           {"pull_begin", l_pull_begin}, {"pull_end", l_pull_end},
      {"receive", l_receive},     {"receive_push", l_receive_push}, {"hold", l_hold},
      {"release", l_release},     {"note", l_note},             {"peers", l_peers},
      {"key_get", l_key_get},     {"key_remember", l_key_remember}, {"rename", l_rename},
      {"serve_pushes", l_serve_pushes}, {"deliver_in_lua", l_deliver_in_lua},
      {"pushed_at", l_pushed_at},
      {"close", l_close},         {NULL, NULL}};
  static const luaL_Reg fns[] = {{"new", l_new}, {"peers_of", l_peers_of}, {NULL, NULL}};
  static const luaL_Reg pb_meta[] = {{"__gc", l_gc}, {NULL, NULL}};
  static const luaL_Reg batch_meta[] = {{"__gc", l_batch_gc}, {NULL, NULL}};
  sg__lua_class(L, PB_MT, methods, pb_meta);
  sg__lua_class(L, BATCH_MT, NULL, batch_meta);
  luaL_newlib(L, fns);
  /* The delivery rules' defaults, from the one place that sets them. */
  sg__postbox_options o;
  sg__postbox_options_default(&o);
  lua_createtable(L, 0, 5);
  lua_pushinteger(L, (lua_Integer)o.push_tries);
  lua_setfield(L, -2, "push_tries");
  lua_pushinteger(L, (lua_Integer)o.push_backoff_ms);
  lua_setfield(L, -2, "push_backoff_ms");
  lua_pushinteger(L, (lua_Integer)o.queue_limit);
  lua_setfield(L, -2, "queue_limit");
  lua_pushinteger(L, (lua_Integer)o.deliver_tries);
  lua_setfield(L, -2, "deliver_tries");
  lua_pushinteger(L, (lua_Integer)o.deliver_backoff_ms);
  lua_setfield(L, -2, "deliver_backoff_ms");
  lua_setfield(L, -2, "defaults");
  return 1;
}
