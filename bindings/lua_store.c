/* segue.store: the store (runtime/store.h) as a Lua object. The userdata
 * holds a pointer to C memory, never the store itself (luv's model), so
 * db:close() and __gc can both run in any order. */
#include <cjson/cJSON.h>
#include <lauxlib.h>
#include <stdlib.h>

#include "bindings.h"
#include "lua_json.h"
#include "lua_store.h"
#include "segue.h"

#define STORE_MT "segue.store.db"

typedef struct lstore {
  sg__store *s;   /* NULL once closed */
  int holds;     /* users in C (postboxes) that forbid an explicit close */
} lstore;

static lstore *check_lstore(lua_State *L, int idx) {
  lstore *ls = *(lstore **)luaL_checkudata(L, idx, STORE_MT);
  if (!ls || !ls->s) luaL_argerror(L, idx, "the store is closed");
  return ls;
}

sg__store *sg__lua_check_store(lua_State *L, int idx) { return check_lstore(L, idx)->s; }

void sg__lua_store_hold(lua_State *L, int idx, int delta) {
  lstore *ls = *(lstore **)luaL_checkudata(L, idx, STORE_MT);
  if (ls) ls->holds += delta;
}

/* nil, "ESTORE: <SQLite's message>", "ESTORE" (luv's convention). */
static int push_result(lua_State *L, sg__store *s, int err) {
  if (err < 0) return sg__lua_fail(L, err, sg__store_errmsg(s));
  lua_pushboolean(L, 1);
  return 1;
}

/* open(path) -> db | nil, err, code */
static int l_open(lua_State *L) {
  const char *path = luaL_checkstring(L, 1);
  lstore **ud = lua_newuserdatauv(L, sizeof *ud, 0);
  *ud = NULL;
  luaL_setmetatable(L, STORE_MT);
  lstore *ls = calloc(1, sizeof *ls);
  if (!ls) return luaL_error(L, "out of memory");
  *ud = ls;
  char err[600];
  int rc = sg__store_open(path, &ls->s, err, sizeof err);
  if (rc < 0) return sg__lua_fail(L, rc, err);
  return 1;
}

static int l_close(lua_State *L) {
  lstore *ls = *(lstore **)luaL_checkudata(L, 1, STORE_MT);
  if (ls && ls->holds) return luaL_error(L, "the store is in use by a postbox");
  if (ls) {
    sg__store_close(ls->s);
    ls->s = NULL;
  }
  return 0;
}

static int l_gc(lua_State *L) {
  lstore **ud = luaL_checkudata(L, 1, STORE_MT);
  if (*ud) {
    sg__store_close((*ud)->s);
    free(*ud);
    *ud = NULL;
  }
  return 0;
}

/* db:map_put(origin_backend, origin_id, copy_backend, copy_id [, room]) */
static int l_map_put(lua_State *L) {
  sg__store *s = check_lstore(L, 1)->s;
  int err = sg__store_map_put(s, luaL_checkstring(L, 2), luaL_checkstring(L, 3),
                             luaL_checkstring(L, 4), luaL_checkstring(L, 5),
                             luaL_optstring(L, 6, NULL));
  return push_result(L, s, err);
}

/* db:map_origin(backend, id) -> origin_backend, origin_id | nil */
static int l_map_origin(lua_State *L) {
  sg__store *s = check_lstore(L, 1)->s;
  char *ob, *oi;
  int err = sg__store_map_origin(s, luaL_checkstring(L, 2), luaL_checkstring(L, 3), &ob, &oi);
  if (err < 0) return sg__lua_fail(L, err, sg__store_errmsg(s));
  if (err == SG_STORE_NOTFOUND) {
    lua_pushnil(L);
    return 1;
  }
  lua_pushstring(L, ob);
  lua_pushstring(L, oi);
  free(ob);
  free(oi);
  return 2;
}

static void set_field(lua_State *L, const char *key, const char *value) {
  if (!value) return;
  lua_pushstring(L, value);
  lua_setfield(L, -2, key);
}

/* Appends {backend=, id=, room=} to the list on top of the stack. */
static int push_copy(void *ud, const char *backend, const char *id, const char *room) {
  lua_State *L = ud;
  lua_createtable(L, 0, 3);
  set_field(L, "backend", backend);
  set_field(L, "id", id);
  set_field(L, "room", room);
  lua_rawseti(L, -2, (lua_Integer)lua_rawlen(L, -2) + 1);
  return 0;
}

/* db:map_copies(origin_backend, origin_id) -> { {backend=, id=, room=}, ... } */
static int l_map_copies(lua_State *L) {
  sg__store *s = check_lstore(L, 1)->s;
  const char *ob = luaL_checkstring(L, 2), *oi = luaL_checkstring(L, 3);
  lua_newtable(L);
  int err = sg__store_map_copies(s, ob, oi, push_copy, L);
  return err < 0 ? sg__lua_fail(L, err, sg__store_errmsg(s)) : 1;
}

static lua_Integer opt_int_field(lua_State *L, int idx, const char *key) {
  lua_getfield(L, idx, key);
  int ok;
  lua_Integer v = lua_tointegerx(L, -1, &ok);
  if (!ok && !lua_isnil(L, -1)) luaL_error(L, "message.%s: expected an integer", key);
  lua_pop(L, 1);
  return ok ? v : 0;
}

/* The message's content as a JSON text (caller frees); raises on content
 * that has no JSON form, which is the calling script's bug. */
static char *content_json(lua_State *L, int msg) {
  lua_getfield(L, msg, "content");
  if (lua_isnil(L, -1)) {
    lua_pop(L, 1);
    return NULL;
  }
  char err[256];
  cJSON *v = sg__lua_to_json(L, lua_gettop(L), err, sizeof err);
  lua_pop(L, 1);
  if (!v) luaL_error(L, "message.content: %s", err);
  char *text = cJSON_PrintUnformatted(v);
  cJSON_Delete(v);
  if (!text) luaL_error(L, "out of memory");
  return text;
}

/* db:log_message(backend, message) -> true | nil, err, code. `message` is a
 * Message as on the wire (id, sender, recipient, content, create_time,
 * edit_time); logging a known id again is an edit. */
static int l_log_message(lua_State *L) {
  sg__store *s = check_lstore(L, 1)->s;
  const char *backend = luaL_checkstring(L, 2);
  luaL_checktype(L, 3, LUA_TTABLE);
  lua_getfield(L, 3, "id");
  lua_getfield(L, 3, "recipient");
  lua_getfield(L, 3, "sender");
  const char *id = lua_tostring(L, -3), *room = lua_tostring(L, -2), *sender = lua_tostring(L, -1);
  luaL_argcheck(L, id != NULL, 3, "message.id must be a string");
  lua_Integer created = opt_int_field(L, 3, "create_time");
  lua_Integer edited = opt_int_field(L, 3, "edit_time");
  char *content = content_json(L, 3);
  int err = sg__store_log_message(s, backend, id, room, sender, content, created, edited);
  cJSON_free(content);
  return push_result(L, s, err);
}

/* db:log_delete(backend, id) -> true (marked) | false (unknown) | nil, err, code */
static int l_log_delete(lua_State *L) {
  sg__store *s = check_lstore(L, 1)->s;
  int err = sg__store_log_delete(s, luaL_checkstring(L, 2), luaL_checkstring(L, 3));
  if (err < 0) return sg__lua_fail(L, err, sg__store_errmsg(s));
  lua_pushboolean(L, err == 0);
  return 1;
}

static void push_content(lua_State *L, const char *text) {
  cJSON *v = text ? cJSON_Parse(text) : NULL;
  if (!v) return;  /* deleted, or not written by us: leave content out */
  char err[128];
  int rc = sg__lua_push_json(L, v, err, sizeof err);
  cJSON_Delete(v);
  if (rc == 0) lua_setfield(L, -2, "content");
}

static int push_message(void *ud, const sg__store_message *m) {
  lua_State *L = ud;
  luaL_checkstack(L, 4, "messages");
  lua_createtable(L, 0, 7);
  set_field(L, "id", m->id);
  set_field(L, "sender", m->sender);
  set_field(L, "recipient", m->room);
  push_content(L, m->content_json);
  lua_pushinteger(L, m->create_time);
  lua_setfield(L, -2, "create_time");
  if (m->edit_time) {
    lua_pushinteger(L, m->edit_time);
    lua_setfield(L, -2, "edit_time");
  }
  lua_pushboolean(L, m->deleted);
  lua_setfield(L, -2, "deleted");
  lua_rawseti(L, -2, (lua_Integer)lua_rawlen(L, -2) + 1);
  return 0;
}

/* db:messages(backend, room [, limit]) -> list, oldest first */
static int l_messages(lua_State *L) {
  sg__store *s = check_lstore(L, 1)->s;
  const char *backend = luaL_checkstring(L, 2), *room = luaL_checkstring(L, 3);
  lua_Integer limit = luaL_optinteger(L, 4, 0);
  luaL_argcheck(L, limit >= 0 && limit <= 0x7fffffff, 4, "out of range");
  lua_newtable(L);
  int err = sg__store_messages(s, backend, room, (int)limit, push_message, L);
  return err < 0 ? sg__lua_fail(L, err, sg__store_errmsg(s)) : 1;
}

/* db:kv_get(key) -> value | nil [, err, code] */
static int l_kv_get(lua_State *L) {
  sg__store *s = check_lstore(L, 1)->s;
  char *v;
  int err = sg__store_kv_get(s, luaL_checkstring(L, 2), &v);
  if (err < 0) return sg__lua_fail(L, err, sg__store_errmsg(s));
  lua_pushstring(L, v);  /* NULL pushes nil */
  free(v);
  return 1;
}

/* db:kv_set(key, value|nil) -> true | nil, err, code */
static int l_kv_set(lua_State *L) {
  sg__store *s = check_lstore(L, 1)->s;
  int err = sg__store_kv_set(s, luaL_checkstring(L, 2), luaL_optstring(L, 3, NULL));
  return push_result(L, s, err);
}

static int l_tostring(lua_State *L) {
  lstore *ls = *(lstore **)luaL_checkudata(L, 1, STORE_MT);
  lua_pushfstring(L, "segue.store (%s)", ls && ls->s ? "open" : "closed");
  return 1;
}

int luaopen_segue_store(lua_State *L) {
  static const luaL_Reg methods[] = {
      {"map_put", l_map_put},         {"map_origin", l_map_origin},
      {"map_copies", l_map_copies},   {"log_message", l_log_message},
      {"log_delete", l_log_delete},   {"messages", l_messages},
      {"kv_get", l_kv_get},           {"kv_set", l_kv_set},
      {"close", l_close},             {NULL, NULL},
  };
  static const luaL_Reg fns[] = {{"open", l_open}, {NULL, NULL}};
  static const luaL_Reg meta[] = {
      {"__gc", l_gc}, {"__close", l_close}, {"__tostring", l_tostring}, {NULL, NULL}};
  sg__lua_class(L, STORE_MT, methods, meta);
  luaL_newlib(L, fns);
  return 1;
}
