/* segue.core, part: the router's hot path (runtime/flubber/route.h) for
 * scripts/segue/router.lua. Translation only: the router decides what is
 * compiled and hands it over as tables; losses, failed copies and the
 * counters of each loop turn come back to it as calls. */
#include <lauxlib.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core.h"
#include "lua_store.h"
#include "route.h"

#define ROUTE_MT "segue.core.route"

typedef struct lroute {
  sg__lenv *e;
  sg__route *r;
  int on_lost, on_failed, on_flush;  /* registry refs of the router's functions */
  int store_ref;                     /* the segue.store userdata in use */
} lroute;

/* The one router core of this state, made by route_install. */
static lroute *get(lua_State *L, int need) {
  lroute *lr = *(lroute **)lua_touserdata(L, lua_upvalueindex(1));
  if (need && (!lr || !lr->r)) luaL_error(L, "segue.core.route_install was not called");
  return lr;
}

static void push_ref(lua_State *L, int ref) { lua_rawgeti(L, LUA_REGISTRYINDEX, ref); }

static sg__backend *h_find(void *ud, const char *name) {
  lroute *lr = ud;
  return sg__lenv_find_backend(lr->e, name);
}

static void h_lost(void *ud, const char *reason, const char *where, const char *id, const char *why) {
  lroute *lr = ud;
  lua_State *L = lr->e->L;
  if (!L || lr->on_lost == LUA_NOREF) return;
  push_ref(L, lr->on_lost);
  lua_pushstring(L, reason);
  lua_pushstring(L, where);
  lua_pushstring(L, id);
  lua_pushstring(L, why);
  sg__lenv_pcall(lr->e, 4, 0, "router: lost");
}

static void h_failed(void *ud, const sg__route_failure *f) {
  lroute *lr = ud;
  lua_State *L = lr->e->L;
  if (!L || lr->on_failed == LUA_NOREF) return;
  push_ref(L, lr->on_failed);
  lua_createtable(L, 0, 10);
  const char *keys[] = {"bridge", "origin", "id", "dest", "room", "key", "code", "message"};
  const char *vals[] = {f->bridge, f->origin, f->id, f->dest, f->room, f->key, f->code, f->message};
  for (int i = 0; i < 8; i++) {
    lua_pushstring(L, vals[i]);
    lua_setfield(L, -2, keys[i]);
  }
  lua_pushinteger(L, (lua_Integer)f->t0);
  lua_setfield(L, -2, "t0");
  sg__lenv_pcall(lr->e, 1, 0, "router: a copy failed");
}

static void h_flush(void *ud) {
  lroute *lr = ud;
  lua_State *L = lr->e->L;
  if (!L || lr->on_flush == LUA_NOREF) return;
  push_ref(L, lr->on_flush);
  sg__lenv_pcall(lr->e, 0, 0, "router: counters");
}

static void h_table_gone(void *ud, void *owner) {
  lroute *lr = ud;
  if (lr->e->L) luaL_unref(lr->e->L, LUA_REGISTRYINDEX, (int)(intptr_t)owner);
}

static void set_ref(lua_State *L, int *ref, int idx) {
  luaL_unref(L, LUA_REGISTRYINDEX, *ref);
  *ref = LUA_NOREF;
  if (!lua_isnoneornil(L, idx)) {
    lua_pushvalue(L, idx);
    *ref = luaL_ref(L, LUA_REGISTRYINDEX);
  }
}

static uint64_t opt_u64(lua_State *L, int idx, const char *key, uint64_t dflt) {
  lua_getfield(L, idx, key);
  uint64_t v = dflt;
  if (!lua_isnil(L, -1)) {
    lua_Integer i = luaL_checkinteger(L, -1);
    luaL_argcheck(L, i >= 0, idx, key);
    v = (uint64_t)i;
  }
  lua_pop(L, 1);
  return v;
}

/* route_install{ on_lost=, on_failed=, on_flush=, buckets={...}, limits } */
static int l_route_install(lua_State *L) {
  sg__lenv *e = sg__lenv_check(L);
  luaL_checktype(L, 1, LUA_TTABLE);
  lroute **slot = lua_touserdata(L, lua_upvalueindex(1));
  lroute *lr = *slot;
  if (!lr) {
    lr = calloc(1, sizeof *lr);
    if (!lr) return luaL_error(L, "out of memory");
    lr->e = e;
    lr->on_lost = lr->on_failed = lr->on_flush = lr->store_ref = LUA_NOREF;
    sg__route_hooks hooks = {lr, h_find, h_lost, h_failed, h_flush, h_table_gone};
    if (sg__route_new(e->loop, &hooks, &e->log, &lr->r) != 0) {
      free(lr);
      return luaL_error(L, "out of memory");
    }
    *slot = lr;
  }
  lua_getfield(L, 1, "on_lost");
  set_ref(L, &lr->on_lost, -1);
  lua_getfield(L, 1, "on_failed");
  set_ref(L, &lr->on_failed, -1);
  lua_getfield(L, 1, "on_flush");
  set_ref(L, &lr->on_flush, -1);
  lua_pop(L, 3);
  lua_getfield(L, 1, "buckets");
  if (lua_istable(L, -1)) {
    double b[32];
    size_t n = 0;
    for (lua_Integer i = 1; i <= 32 && (lua_rawgeti(L, -1, i), !lua_isnil(L, -1)); i++) {
      b[n++] = luaL_checknumber(L, -1);
      lua_pop(L, 1);
    }
    lua_pop(L, 1);
    sg__route_set_buckets(lr->r, b, n);
  }
  lua_pop(L, 1);
  return 0;
}

/* route_limits{ max_in_flight=, max_held=, pause_at=, pause_ms=, edits_kept= } */
static int l_route_limits(lua_State *L) {
  lroute *lr = get(L, 1);
  luaL_checktype(L, 1, LUA_TTABLE);
  sg__route_limits l = {opt_u64(L, 1, "max_in_flight", 10000), opt_u64(L, 1, "max_held", 100000),
                        opt_u64(L, 1, "pause_at", 2000), opt_u64(L, 1, "pause_ms", 1000),
                        opt_u64(L, 1, "edits_kept", 10000)};
  sg__route_set_limits(lr->r, &l);
  return 0;
}

/* route_store(db or nil): the store the C path writes (SQLite only). */
static int l_route_store(lua_State *L) {
  lroute *lr = get(L, 1);
  sg__store *s = lua_isnoneornil(L, 1) ? NULL : sg__lua_check_store(L, 1);
  if (lr->store_ref != LUA_NOREF) {
    push_ref(L, lr->store_ref);
    sg__lua_store_hold(L, -1, -1);
    lua_pop(L, 1);
  }
  sg__route_set_store(lr->r, s);
  set_ref(L, &lr->store_ref, s ? 1 : 0);
  if (s) sg__lua_store_hold(L, 1, 1);
  return 0;
}

/* route_memory(on): without a store, the id maps live in the core. */
static int l_route_memory(lua_State *L) {
  sg__route_set_memory(get(L, 1)->r, lua_toboolean(L, 1));
  return 0;
}

/* route_mem_put(origin_backend, origin_id, copy_backend, copy_id [, room]) -> true */
static int l_route_mem_put(lua_State *L) {
  lroute *lr = get(L, 1);
  int rc = sg__route_mem_put(lr->r, luaL_checkstring(L, 1), luaL_checkstring(L, 2),
                             luaL_checkstring(L, 3), luaL_checkstring(L, 4), luaL_optstring(L, 5, NULL));
  if (rc != 0) return luaL_error(L, "out of memory");
  lua_pushboolean(L, 1);
  return 1;
}

/* route_mem_origin(backend, id) -> origin_backend, origin_id | nil */
static int l_route_mem_origin(lua_State *L) {
  lroute *lr = get(L, 1);
  const char *ob, *oi;
  if (sg__route_mem_origin(lr->r, luaL_checkstring(L, 1), luaL_checkstring(L, 2), &ob, &oi) != 0) return 0;
  lua_pushstring(L, ob);
  lua_pushstring(L, oi);
  return 2;
}

static int push_mem_copy(void *ud, const char *backend, const char *id, const char *room) {
  lua_State *L = ud;
  lua_createtable(L, 0, 3);
  lua_pushstring(L, backend);
  lua_setfield(L, -2, "backend");
  lua_pushstring(L, id);
  lua_setfield(L, -2, "id");
  if (room) {
    lua_pushstring(L, room);
    lua_setfield(L, -2, "room");
  }
  lua_rawseti(L, -2, (lua_Integer)lua_rawlen(L, -2) + 1);
  return 0;
}

/* route_mem_copies(origin_backend, origin_id) -> { {backend=, id=, room=}, ... } */
static int l_route_mem_copies(lua_State *L) {
  lroute *lr = get(L, 1);
  const char *ob = luaL_checkstring(L, 1), *oi = luaL_checkstring(L, 2);
  lua_newtable(L);
  sg__route_mem_copies(lr->r, ob, oi, push_mem_copy, L);
  return 1;
}

static int l_route_enable(lua_State *L) {
  sg__route_enable(get(L, 1)->r, lua_toboolean(L, 1));
  return 0;
}

/* route_attach(): every backend's updates pass through the router core. */
static int l_route_attach(lua_State *L) {
  lroute *lr = get(L, 1);
  for (sg__backend *b = lr->e->backends; b; b = b->next)
    if (!b->tap) sg__route_attach(lr->r, b);
  return 0;
}

/* route_table(set [, inherit]): a new compiled table for rule set `set`,
 * empty or (inherit) with the current table's rooms. */
static int l_route_table(lua_State *L) {
  lroute *lr = get(L, 1);
  luaL_checkany(L, 1);
  int inherit = lua_toboolean(L, 2);
  lua_pushvalue(L, 1);
  int ref = luaL_ref(L, LUA_REGISTRYINDEX);
  if (sg__route_table_begin(lr->r, (void *)(intptr_t)ref, inherit) != 0) {
    luaL_unref(L, LUA_REGISTRYINDEX, ref);
    return luaL_error(L, "out of memory");
  }
  return 0;
}

static const char *str_at(lua_State *L, int t, const char *key) {
  lua_getfield(L, t, key);
  const char *s = lua_tostring(L, -1);
  if (!s) luaL_error(L, "route target: %s must be a string", key);
  lua_pop(L, 1);  /* the string stays referenced by the table */
  return s;
}

/* route_put(backend, room_id, targets | nil): targets are
 * { bridge=, dest=, room=, room_id=, key=, prefix={ "text" | false (the sender), ... },
 *   max_length=, bytes=, first= }; nil makes the room Lua's again. */
static int l_route_put(lua_State *L) {
  lroute *lr = get(L, 1);
  const char *backend = luaL_checkstring(L, 1), *room_id = luaL_checkstring(L, 2);
  if (lua_isnoneornil(L, 3)) {
    sg__route_table_drop(lr->r, backend, room_id);
    return 0;
  }
  luaL_checktype(L, 3, LUA_TTABLE);
  size_t n = (size_t)luaL_len(L, 3), npieces = 0;
  for (size_t i = 1; i <= n; i++) {
    lua_rawgeti(L, 3, (lua_Integer)i);
    luaL_checktype(L, -1, LUA_TTABLE);
    lua_getfield(L, -1, "prefix");
    luaL_checktype(L, -1, LUA_TTABLE);
    npieces += (size_t)luaL_len(L, -1);
    lua_pop(L, 2);
  }
  sg__route_target_spec *spec = lua_newuserdatauv(L, (n ? n : 1) * sizeof *spec, 0);
  const char **pieces = lua_newuserdatauv(L, (npieces ? npieces : 1) * sizeof *pieces, 0);
  size_t at = 0;
  for (size_t i = 0; i < n; i++) {
    lua_rawgeti(L, 3, (lua_Integer)i + 1);
    int t = lua_gettop(L);
    sg__route_target_spec *s = &spec[i];
    s->bridge = str_at(L, t, "bridge");
    s->dest = str_at(L, t, "dest");
    s->room = str_at(L, t, "room");
    s->room_id = str_at(L, t, "room_id");
    s->key = str_at(L, t, "key");
    s->max_length = opt_u64(L, t, "max_length", 0);
    lua_getfield(L, t, "bytes");
    s->bytes = lua_toboolean(L, -1);
    lua_getfield(L, t, "first");
    s->first_of_bridge = lua_toboolean(L, -1);
    lua_getfield(L, t, "prefix");
    size_t np = (size_t)luaL_len(L, -1);
    s->prefix = pieces + at;
    s->n_prefix = np;
    for (size_t k = 1; k <= np; k++) {
      lua_rawgeti(L, -1, (lua_Integer)k);
      pieces[at++] = lua_isstring(L, -1) ? lua_tostring(L, -1) : NULL;
      lua_pop(L, 1);  /* referenced by the prefix table */
    }
    lua_pop(L, 4);
  }
  if (sg__route_table_put(lr->r, backend, room_id, spec, n) != 0) return luaL_error(L, "out of memory");
  return 0;
}

/* route_send_begin(origin, dest) -> n | nil, count (MAX_IN_FLIGHT reached) */
static int l_route_send_begin(lua_State *L) {
  lroute *lr = get(L, 1);
  uint64_t count = 0;
  uint64_t n = sg__route_send_begin(lr->r, luaL_optstring(L, 1, NULL), luaL_checkstring(L, 2), &count);
  if (!n) {
    lua_pushnil(L);
    lua_pushinteger(L, (lua_Integer)count);
    return 2;
  }
  lua_pushinteger(L, (lua_Integer)n);
  return 1;
}

static int l_route_send_end(lua_State *L) {
  lroute *lr = get(L, 1);
  sg__route_send_end(lr->r, luaL_checkstring(L, 1), (uint64_t)luaL_checkinteger(L, 2));
  return 0;
}

/* route_in_flight(dest) -> copies in flight, updates held */
static int l_route_in_flight(lua_State *L) {
  lroute *lr = get(L, 1);
  uint64_t c, h;
  sg__route_in_flight(lr->r, luaL_checkstring(L, 1), &c, &h);
  lua_pushinteger(L, (lua_Integer)c);
  lua_pushinteger(L, (lua_Integer)h);
  return 2;
}

static int l_route_edit_seen(lua_State *L) {
  lroute *lr = get(L, 1);
  int64_t t;
  if (!sg__route_edit_seen(lr->r, luaL_checkstring(L, 1), luaL_checkstring(L, 2), &t)) return 0;
  lua_pushinteger(L, (lua_Integer)t);
  return 1;
}

static int l_route_edit_note(lua_State *L) {
  lroute *lr = get(L, 1);
  sg__route_edit_note(lr->r, luaL_checkstring(L, 1), luaL_checkstring(L, 2),
                      (int64_t)luaL_optinteger(L, 3, 0));
  return 0;
}

/* route_dispatching() -> the rule set of the update being passed to Lua, or nil */
static int l_route_dispatching(lua_State *L) {
  lroute *lr = get(L, 0);
  void *owner = lr && lr->r ? sg__route_dispatching(lr->r) : NULL;
  if (!owner) return 0;
  push_ref(L, (int)(intptr_t)owner);
  return 1;
}

static void d_totals(void *ud, uint64_t bridged, uint64_t pauses, uint64_t carried) {
  lua_State *L = ud;
  lua_pushinteger(L, (lua_Integer)carried);
  lua_setfield(L, 1, "compiled");
  lua_pushinteger(L, (lua_Integer)bridged);
  lua_setfield(L, 1, "bridged");
  lua_pushinteger(L, (lua_Integer)pauses);
  lua_setfield(L, 1, "pauses");
}

static void d_count(lua_State *L, const char *list, const sg__route_count *c) {
  lua_getfield(L, 1, list);
  lua_createtable(L, 0, 5);
  lua_pushinteger(L, (lua_Integer)c->in);
  lua_setfield(L, -2, "in");
  lua_pushinteger(L, (lua_Integer)c->sent);
  lua_setfield(L, -2, "sent");
  if (c->first_origin) {
    lua_pushstring(L, c->first_origin);
    lua_setfield(L, -2, "first_origin");
    lua_pushstring(L, c->first_dest);
    lua_setfield(L, -2, "first_dest");
    lua_pushstring(L, c->first_room);
    lua_setfield(L, -2, "first_room");
  }
  lua_setfield(L, -2, c->name);
  lua_pop(L, 1);
}

static void d_backend(void *ud, const sg__route_count *c) { d_count(ud, "backends", c); }
static void d_bridge(void *ud, const sg__route_count *c) { d_count(ud, "bridges", c); }

static void d_requests(void *ud, const char *backend, uint64_t n, double sum, const uint64_t *b,
                       size_t nb) {
  lua_State *L = ud;
  lua_getfield(L, 1, "requests");
  lua_createtable(L, 0, 3);
  lua_pushinteger(L, (lua_Integer)n);
  lua_setfield(L, -2, "n");
  lua_pushnumber(L, sum);
  lua_setfield(L, -2, "sum");
  lua_createtable(L, (int)nb, 0);
  for (size_t i = 0; i < nb; i++) {
    lua_pushinteger(L, (lua_Integer)b[i]);
    lua_rawseti(L, -2, (lua_Integer)i + 1);
  }
  lua_setfield(L, -2, "buckets");
  lua_setfield(L, -2, backend);
  lua_pop(L, 1);
}

/* route_drain() -> { bridged=, pauses=, compiled=, backends={name={in=,sent=}}, bridges={name={in=,
 * sent=, first_origin=, first_dest=, first_room=}}, requests={name={n=,sum=,buckets=}} } */
static int l_route_drain(lua_State *L) {
  lroute *lr = get(L, 1);
  lua_settop(L, 0);
  lua_createtable(L, 0, 5);
  lua_newtable(L);
  lua_setfield(L, 1, "backends");
  lua_newtable(L);
  lua_setfield(L, 1, "bridges");
  lua_newtable(L);
  lua_setfield(L, 1, "requests");
  sg__route_drain_cbs cbs = {L, d_totals, d_backend, d_bridge, d_requests};
  sg__route_drain(lr->r, &cbs);
  return 1;
}

static int l_route_gc(lua_State *L) {
  lroute **slot = lua_touserdata(L, 1);
  lroute *lr = *slot;
  if (!lr) return 0;
  *slot = NULL;
  for (sg__backend *b = lr->e->backends; b; b = b->next)
    if (b->tap_data == lr->r) b->tap = NULL, b->tap_data = NULL;
  sg__route_close(lr->r);  /* no hook runs after this: the state is closing */
  free(lr);
  return 0;
}

void sg__core_open_route(lua_State *L) {
  static const luaL_Reg fns[] = {
      {"route_install", l_route_install}, {"route_limits", l_route_limits},
      {"route_store", l_route_store},     {"route_enable", l_route_enable},
      {"route_memory", l_route_memory},   {"route_mem_put", l_route_mem_put},
      {"route_mem_origin", l_route_mem_origin}, {"route_mem_copies", l_route_mem_copies},
      {"route_attach", l_route_attach},   {"route_table", l_route_table},
      {"route_put", l_route_put},         {"route_send_begin", l_route_send_begin},
      {"route_send_end", l_route_send_end}, {"route_in_flight", l_route_in_flight},
      {"route_edit_seen", l_route_edit_seen}, {"route_edit_note", l_route_edit_note},
      {"route_dispatching", l_route_dispatching}, {"route_drain", l_route_drain},
      {NULL, NULL}};
  lroute **slot = lua_newuserdatauv(L, sizeof *slot, 0);
  *slot = NULL;
  if (luaL_newmetatable(L, ROUTE_MT)) {
    lua_pushcfunction(L, l_route_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_setmetatable(L, -2);
  luaL_setfuncs(L, fns, 1);
}
