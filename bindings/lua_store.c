/* segue.store: the store (runtime/store.h) as a Lua object. The userdata
 * holds a pointer to C memory, never the store itself (luv's model), so
 * db:close() and __gc can both run in any order. */
#include <cjson/cJSON.h>
#include <lauxlib.h>
#include <stdlib.h>
#include <string.h>

#include "bindings.h"
#include "lua_json.h"
#include "lua_store.h"
#include "segue.h"

#define STORE_MT "segue.store.db"

typedef struct lstore {
  sg__store *s;   /* NULL once closed */
  int closing;    /* answers arriving now are dropped */
  int holds;     /* users in C (postboxes, the router's route core) that forbid an explicit close */
  sg__lenv *e;    /* the host's, or NULL (plain lua: SQLite only) */
  unsigned ops;   /* calls not answered yet (counted in e->store_ops too) */
} lstore;

/* The store's busy hook (sg__store_set_busy): every call on it, the
 * postbox's and the route core's too, counts for the host's stop. */
static void on_busy(void *ud, int delta) {
  lstore *ls = ud;
  ls->ops += (unsigned)delta;
  ls->e->store_ops += (unsigned)delta;
  if (ls->e->store_ops == 0 && ls->e->store_settled) ls->e->store_settled(ls->e);
}

/* Closes the engine: what is not answered yet is dropped (its callbacks
 * hear nothing: closing), and said in the log. By __gc that is only what a
 * stop could not wait for (the host holds the close, bounded). */
static void close_store(lstore *ls) {
  sg__store *s = ls->s;
  if (!s) return;
  if (ls->ops && ls->e)
    sg__log(&ls->e->log, SG_LOG_WARN, "store", sg__store_engine(s),
            "closed with %u operation(s) not answered: they are dropped", ls->ops);
  ls->closing = 1;
  ls->s = NULL;
  sg__store_close(s);
  ls->closing = 0;
  if (ls->e && ls->ops) {
    ls->e->store_ops -= ls->ops;
    ls->ops = 0;
    if (ls->e->store_ops == 0 && ls->e->store_settled) ls->e->store_settled(ls->e);
  }
}

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


/* open(path) or open{ engine = "sqlite"|"postgresql", path =, dsn =, pool = }
 * -> db | nil, err, code */
static int l_open(lua_State *L) {
  sg__store_config c = {0};
  if (lua_istable(L, 1)) {
    lua_getfield(L, 1, "engine");
    lua_getfield(L, 1, "path");
    lua_getfield(L, 1, "dsn");
    lua_getfield(L, 1, "pool");
    c.engine = luaL_optstring(L, -4, "sqlite");
    c.path = luaL_optstring(L, -3, NULL);
    c.dsn = luaL_optstring(L, -2, NULL);
    lua_Integer pool = luaL_optinteger(L, -1, 3);
    luaL_argcheck(L, pool > 0 && pool <= 64, 1, "pool: 1 to 64 connections");
    c.pool = (unsigned)pool;
  } else {
    c.path = luaL_checkstring(L, 1);
  }
  sg__lenv *h = sg__lenv_of(L);
  uv_loop_t *loop = h ? h->loop : NULL;
  c.loop = loop;
  c.log = h ? &h->log : NULL;
  if (c.engine && strcmp(c.engine, "postgresql") == 0 && !loop)
    return luaL_error(L, "segue.store: engine postgresql needs the segue host's loop");
  lstore **ud = lua_newuserdatauv(L, sizeof *ud, 0);
  *ud = NULL;
  luaL_setmetatable(L, STORE_MT);
  lstore *ls = calloc(1, sizeof *ls);
  if (!ls) return luaL_error(L, "out of memory");
  *ud = ls;
  char err[600];
  int rc = sg__store_open_with(&c, &ls->s, err, sizeof err);
  if (rc < 0) return sg__lua_fail(L, rc, err);
  ls->e = h;
  if (h) sg__store_set_busy(ls->s, on_busy, ls);
  return 1;
}

static int l_close(lua_State *L) {
  lstore *ls = *(lstore **)luaL_checkudata(L, 1, STORE_MT);
  if (ls && ls->holds) return luaL_error(L, "the store is in use by %d user(s) in C (a postbox, the router: router.set_store(nil) gives it back)", ls->holds);
  if (ls) close_store(ls);
  return 0;
}

static int l_gc(lua_State *L) {
  lstore **ud = luaL_checkudata(L, 1, STORE_MT);
  if (*ud) {
    close_store(*ud);
    free(*ud);
    *ud = NULL;
  }
  return 0;
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



/* Sets field `key` of the table on top to the JSON `text`, when it parses. */
static void push_json_field(lua_State *L, const char *key, const char *text) {
  cJSON *v = text ? cJSON_Parse(text) : NULL;
  if (!v) return;  /* deleted, or not written by us: leave it out */
  char err[128];
  int rc = sg__lua_push_json(L, v, err, sizeof err);
  cJSON_Delete(v);
  if (rc == 0) lua_setfield(L, -2, key);
}

static int push_message(void *ud, const sg__store_message *m) {
  lua_State *L = ud;
  luaL_checkstack(L, 4, "messages");
  lua_createtable(L, 0, 7);
  set_field(L, "id", m->id);
  set_field(L, "sender", m->sender);
  set_field(L, "recipient", m->room);
  push_json_field(L, "content", m->content_json);
  lua_pushinteger(L, m->create_time);
  lua_setfield(L, -2, "create_time");
  if (m->edit_time) {
    lua_pushinteger(L, m->edit_time);
    lua_setfield(L, -2, "edit_time");
  }
  lua_pushboolean(L, m->deleted);
  lua_setfield(L, -2, "deleted");
  push_json_field(L, "attachments", m->attachments_json);
  lua_rawseti(L, -2, (lua_Integer)lua_rawlen(L, -2) + 1);
  return 0;
}





static int push_user(void *ud, const char *name, int admin, int64_t created, int tokens) {
  lua_State *L = ud;
  lua_createtable(L, 0, 4);
  set_field(L, "name", name);
  lua_pushboolean(L, admin);
  lua_setfield(L, -2, "admin");
  lua_pushinteger(L, created);
  lua_setfield(L, -2, "created");
  lua_pushinteger(L, tokens);
  lua_setfield(L, -2, "tokens");
  lua_rawseti(L, -2, (lua_Integer)lua_rawlen(L, -2) + 1);
  return 0;
}

static int push_event(void *ud, int64_t id, const char *backend, const char *type,
                      const char *value_json) {
  lua_State *L = ud;
  lua_createtable(L, 0, 4);
  lua_pushinteger(L, id);
  lua_setfield(L, -2, "id");
  set_field(L, "backend", backend);
  set_field(L, "type", type);
  set_field(L, "value_json", value_json);
  lua_rawseti(L, -2, (lua_Integer)lua_rawlen(L, -2) + 1);
  return 0;
}

static int push_room(void *ud, const char *backend, const char *id, const char *name,
                     int64_t unread) {
  lua_State *L = ud;
  lua_createtable(L, 0, 4);
  set_field(L, "backend", backend);
  set_field(L, "id", id);
  set_field(L, "name", name ? name : id);
  lua_pushinteger(L, unread);
  lua_setfield(L, -2, "unread");
  lua_rawseti(L, -2, (lua_Integer)lua_rawlen(L, -2) + 1);
  return 0;
}

/* ---- calls: one API on both engines -------------------------------------------
 * Every method is the store's _async operation. SQLite answers before the call
 * returns, so the method returns its results at once; PostgreSQL answers on a
 * later loop turn: the method then yields the calling coroutine and returns
 * the same results when it is resumed. A function as the last argument gets
 * the results instead (and the method returns true). */

enum { K_OK, K_VALUE, K_ORIGIN, K_COPIES, K_DELETED, K_MESSAGES, K_HOLDER, K_INSTANCES, K_LEASES,
       K_USERS, K_TOKEN_USER, K_NUM, K_EVENTS, K_ROOMS, K_HELD };

typedef struct lcall {
  lua_State *L;   /* the caller, until the method returned */
  sg__lenv *h;
  lstore *ls;
  int kind, in_call, done, nres;
  int ref;        /* the waiting coroutine or callback, or LUA_NOREF */
  int db_ref;     /* the store's userdata while the answer is awaited: a store
                     with calls out is not collected (its __gc would drop them) */
  int is_thread;
} lcall;

static void push_int_field(lua_State *L, const char *key, int64_t v) {
  lua_pushinteger(L, (lua_Integer)v);
  lua_setfield(L, -2, key);
}

/* The results of a reply, as the method returns them. */
static int push_reply(lua_State *L, int kind, const sg__store_reply *r) {
  luaL_checkstack(L, 8, "segue.store");
  if (r->err < 0) return sg__lua_fail(L, r->err, r->message);
  switch (kind) {
    case K_VALUE:
    case K_HOLDER:
      lua_pushstring(L, r->err == SG_STORE_NOTFOUND ? NULL : r->text[0]);
      return 1;
    case K_ORIGIN:
      if (r->err == SG_STORE_NOTFOUND) {
        lua_pushnil(L);
        return 1;
      }
      lua_pushstring(L, r->text[0]);
      lua_pushstring(L, r->text[1]);
      return 2;
    case K_DELETED:
      lua_pushboolean(L, r->err == 0);
      return 1;
    case K_COPIES:
      lua_createtable(L, (int)r->n, 0);
      for (size_t i = 0; i < r->n; i++)
        push_copy(L, r->copies[i].backend, r->copies[i].id, r->copies[i].room);
      return 1;
    case K_MESSAGES:
      lua_createtable(L, (int)r->n, 0);
      for (size_t i = 0; i < r->n; i++) push_message(L, &r->messages[i]);
      return 1;
    case K_INSTANCES:
    case K_LEASES:
      lua_createtable(L, (int)r->n, 0);
      for (size_t i = 0; i < r->n; i++) {
        lua_createtable(L, 0, 3);
        if (kind == K_INSTANCES) {
          set_field(L, "name", r->instances[i].name);
          set_field(L, "info", r->instances[i].info);
          push_int_field(L, "seen", r->instances[i].seen);
        } else {
          set_field(L, "name", r->leases[i].name);
          set_field(L, "holder", r->leases[i].holder);
          push_int_field(L, "expires", r->leases[i].expires);
        }
        lua_rawseti(L, -2, (lua_Integer)i + 1);
      }
      return 1;
    case K_USERS:
      lua_createtable(L, (int)r->n, 0);
      for (size_t i = 0; i < r->n; i++)
        push_user(L, r->users[i].name, r->users[i].admin, r->users[i].created, r->users[i].tokens);
      return 1;
    case K_TOKEN_USER:
      if (r->err == SG_STORE_NOTFOUND) {
        lua_pushnil(L);
        return 1;
      }
      lua_pushstring(L, r->text[0]);
      lua_pushboolean(L, r->num != 0);
      return 2;
    case K_NUM:
      if (r->err == SG_STORE_NOTFOUND) lua_pushnil(L);
      else lua_pushinteger(L, (lua_Integer)r->num);
      return 1;
    case K_EVENTS:
      lua_createtable(L, (int)r->n, 0);
      for (size_t i = 0; i < r->n; i++) {
        const sg__store_api_event_row *e = &r->api_events[i];
        push_event(L, e->id, e->backend, e->type, e->value_json);
      }
      return 1;
    case K_ROOMS:
      lua_createtable(L, (int)r->n, 0);
      for (size_t i = 0; i < r->n; i++)
        push_room(L, r->rooms[i].backend, r->rooms[i].id, r->rooms[i].name, r->rooms[i].unread);
      return 1;
    case K_HELD:
      lua_pushboolean(L, r->err == 0);  /* false: not held, nothing written */
      return 1;
    default:
      lua_pushboolean(L, 1);
      return 1;
  }
}

static void on_reply(void *ud, const sg__store_reply *r) {
  lcall *c = ud;
  if (c->in_call) {  /* answered before the method returned */
    c->nres = push_reply(c->L, c->kind, r);
    c->done = 1;
    return;
  }
  sg__lenv *h = c->h;
  lua_State *L = h ? h->L : NULL;
  if (!L || c->ls->closing) {  /* the store or the state is going away */
    if (L) {
      luaL_unref(L, LUA_REGISTRYINDEX, c->ref);
      luaL_unref(L, LUA_REGISTRYINDEX, c->db_ref);
    }
    free(c);
    return;
  }
  lua_rawgeti(L, LUA_REGISTRYINDEX, c->ref);
  luaL_unref(L, LUA_REGISTRYINDEX, c->ref);
  int n = push_reply(L, c->kind, r);
  if (!c->is_thread) {
    sg__lenv_pcall(h, n, 0, "segue.store callback");
  } else {
    sg__lenv_resume(h, n);
  }
  luaL_unref(L, LUA_REGISTRYINDEX, c->db_ref);  /* after: the store outlives its callback */
  free(c);
}

/* Starts a call: the method's arguments are parsed; `cbidx` is where an
 * optional callback may be. Returns the lcall to pass to the _async
 * operation, or raises (misuse). */
static lcall *call_begin(lua_State *L, lstore *ls, int kind, int cbidx) {
  if (sg__store_is_async(ls->s) && !lua_isfunction(L, cbidx)) {
    if (!sg__lenv_of(L))
      luaL_error(L, "segue.store on engine %s needs the segue host", sg__store_engine(ls->s));
    if (!lua_isyieldable(L))
      luaL_error(L, "segue.store on engine %s: call it inside a coroutine (see segue.spawn)"
                 " or pass a callback", sg__store_engine(ls->s));
  }
  lcall *c = calloc(1, sizeof *c);
  if (!c) luaL_error(L, "out of memory");
  c->L = L;
  c->h = sg__lenv_of(L);
  c->ls = ls;
  c->kind = kind;
  c->in_call = 1;
  c->ref = LUA_NOREF;
  c->db_ref = LUA_NOREF;
  return c;
}

/* Finishes a method after its _async call returned rc. */
static int call_end(lua_State *L, lcall *c, int rc, int cbidx) {
  c->in_call = 0;
  if (rc < 0) {
    sg__store *s = c->ls->s;
    free(c);
    return sg__lua_fail(L, rc, sg__store_errmsg(s));
  }
  int has_cb = lua_isfunction(L, cbidx);
  if (c->done) {
    int n = c->nres;
    free(c);
    if (!has_cb) return n;
    lua_pushvalue(L, cbidx);
    lua_insert(L, -1 - n);
    if (lua_pcall(L, n, 0, 0) != LUA_OK) return lua_error(L);  /* the caller's to catch */
    lua_pushboolean(L, 1);
    return 1;
  }
  if (!c->h) {  /* cannot happen: call_begin refused it */
    free(c);
    return luaL_error(L, "segue.store: no host to answer on");
  }
  lua_pushvalue(L, 1);  /* every method's self */
  c->db_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  if (has_cb) {
    lua_pushvalue(L, cbidx);
    c->ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pushboolean(L, 1);
    return 1;
  }
  lua_pushthread(L);
  c->ref = luaL_ref(L, LUA_REGISTRYINDEX);
  c->is_thread = 1;
  return lua_yield(L, 0);
}

/* db:map_put(origin_backend, origin_id, copy_backend, copy_id [, room [, cb]]) -> true */
static int l_map_put(lua_State *L) {
  lstore *ls = check_lstore(L, 1);
  const char *ob = luaL_checkstring(L, 2), *oi = luaL_checkstring(L, 3);
  const char *cb_ = luaL_checkstring(L, 4), *ci = luaL_checkstring(L, 5);
  const char *room = lua_isstring(L, 6) ? lua_tostring(L, 6) : NULL;
  lcall *c = call_begin(L, ls, K_OK, 7);
  return call_end(L, c, sg__store_map_put_async(ls->s, ob, oi, cb_, ci, room, on_reply, c), 7);
}

/* db:map_origin(backend, id [, cb]) -> origin_backend, origin_id | nil */
static int l_map_origin(lua_State *L) {
  lstore *ls = check_lstore(L, 1);
  const char *b = luaL_checkstring(L, 2), *id = luaL_checkstring(L, 3);
  lcall *c = call_begin(L, ls, K_ORIGIN, 4);
  return call_end(L, c, sg__store_map_origin_async(ls->s, b, id, on_reply, c), 4);
}

/* db:map_copies(origin_backend, origin_id [, cb]) -> { {backend=, id=, room=}, ... } */
static int l_map_copies(lua_State *L) {
  lstore *ls = check_lstore(L, 1);
  const char *ob = luaL_checkstring(L, 2), *oi = luaL_checkstring(L, 3);
  lcall *c = call_begin(L, ls, K_COPIES, 4);
  return call_end(L, c, sg__store_map_copies_async(ls->s, ob, oi, on_reply, c), 4);
}

/* db:log_message(backend, message [, cb]) -> true | nil, err, code. `message`
 * is a Message as on the wire (id, sender, recipient, content, create_time,
 * edit_time); logging a known id again is an edit. */
static int l_log_message(lua_State *L) {
  lstore *ls = check_lstore(L, 1);
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
  /* Refused before call_begin could raise, so content is not leaked. */
  if (sg__store_is_async(ls->s) && !lua_isfunction(L, 4) && !lua_isyieldable(L)) {
    cJSON_free(content);
    return luaL_error(L, "segue.store on engine %s: call it inside a coroutine (see segue.spawn)"
                      " or pass a callback", sg__store_engine(ls->s));
  }
  lcall *c = call_begin(L, ls, K_OK, 4);
  int rc = sg__store_log_message_async(ls->s, backend, id, room, sender, content, created,
                                       edited, on_reply, c);
  cJSON_free(content);
  return call_end(L, c, rc, 4);
}

/* db:log_delete(backend, id [, cb]) -> true (marked) | false (unknown) | nil, err, code */
static int l_log_delete(lua_State *L) {
  lstore *ls = check_lstore(L, 1);
  const char *b = luaL_checkstring(L, 2), *id = luaL_checkstring(L, 3);
  lcall *c = call_begin(L, ls, K_DELETED, 4);
  return call_end(L, c, sg__store_log_delete_async(ls->s, b, id, on_reply, c), 4);
}

/* db:message_edit_time(backend, id [, cb]) -> the logged message's edit
 * time (0: never edited), or nil if it is not in the log */
static int l_message_edit_time(lua_State *L) {
  lstore *ls = check_lstore(L, 1);
  const char *b = luaL_checkstring(L, 2), *id = luaL_checkstring(L, 3);
  lcall *c = call_begin(L, ls, K_NUM, 4);
  return call_end(L, c, sg__store_message_edit_time_async(ls->s, b, id, on_reply, c), 4);
}

/* db:messages(backend, room [, limit [, cb]]) -> list, oldest first */
static int l_messages(lua_State *L) {
  lstore *ls = check_lstore(L, 1);
  const char *backend = luaL_checkstring(L, 2), *room = luaL_checkstring(L, 3);
  lua_Integer limit = lua_isfunction(L, 4) ? 0 : luaL_optinteger(L, 4, 0);
  luaL_argcheck(L, limit >= 0 && limit <= 0x7fffffff, 4, "out of range");
  int cbidx = lua_isfunction(L, 4) ? 4 : 5;
  lcall *c = call_begin(L, ls, K_MESSAGES, cbidx);
  return call_end(L, c, sg__store_messages_async(ls->s, backend, room, (int)limit, on_reply, c),
                  cbidx);
}

/* db:kv_get(key [, cb]) -> value | nil [, err, code] */
static int l_kv_get(lua_State *L) {
  lstore *ls = check_lstore(L, 1);
  const char *key = luaL_checkstring(L, 2);
  lcall *c = call_begin(L, ls, K_VALUE, 3);
  return call_end(L, c, sg__store_kv_get_async(ls->s, key, on_reply, c), 3);
}

/* db:kv_set(key, value|nil [, cb]) -> true | nil, err, code */
static int l_kv_set(lua_State *L) {
  lstore *ls = check_lstore(L, 1);
  const char *key = luaL_checkstring(L, 2);
  const char *value = lua_isstring(L, 3) ? lua_tostring(L, 3) : NULL;
  lcall *c = call_begin(L, ls, K_OK, 4);
  return call_end(L, c, sg__store_kv_set_async(ls->s, key, value, on_reply, c), 4);
}

/* db:instance_beat(instance [, info [, cb]]) -> true: `instance` is alive now */
static int l_instance_beat(lua_State *L) {
  lstore *ls = check_lstore(L, 1);
  const char *name = luaL_checkstring(L, 2);
  const char *info = lua_isstring(L, 3) ? lua_tostring(L, 3) : NULL;
  lcall *c = call_begin(L, ls, K_OK, 4);
  return call_end(L, c, sg__store_instance_beat_async(ls->s, name, info, on_reply, c), 4);
}

/* db:instances([cb]) -> { {name=, info=, seen=}, ... } */
static int l_instances(lua_State *L) {
  lstore *ls = check_lstore(L, 1);
  lcall *c = call_begin(L, ls, K_INSTANCES, 2);
  return call_end(L, c, sg__store_instances_async(ls->s, on_reply, c), 2);
}

/* db:leases([cb]) -> { {name=, holder=, expires=}, ... } */
static int l_leases(lua_State *L) {
  lstore *ls = check_lstore(L, 1);
  lcall *c = call_begin(L, ls, K_LEASES, 2);
  return call_end(L, c, sg__store_leases_async(ls->s, on_reply, c), 2);
}

/* db:lease_claim(name, instance, ttl_ms [, cb]) -> holder: taken or renewed
 * when free, expired or already the instance's; compare holder with it. */
static int l_lease_claim(lua_State *L) {
  lstore *ls = check_lstore(L, 1);
  const char *name = luaL_checkstring(L, 2), *inst = luaL_checkstring(L, 3);
  lua_Integer ttl = luaL_checkinteger(L, 4);
  luaL_argcheck(L, ttl > 0, 4, "must be positive");
  lcall *c = call_begin(L, ls, K_HOLDER, 5);
  return call_end(L, c, sg__store_lease_claim_async(ls->s, name, inst, ttl, on_reply, c), 5);
}

/* db:lease_release(name, instance [, cb]) -> true */
static int l_lease_release(lua_State *L) {
  lstore *ls = check_lstore(L, 1);
  const char *name = luaL_checkstring(L, 2), *inst = luaL_checkstring(L, 3);
  lcall *c = call_begin(L, ls, K_OK, 4);
  return call_end(L, c, sg__store_lease_release_async(ls->s, name, inst, on_reply, c), 4);
}

/* db:engine() -> "sqlite" | "postgresql" */
static int l_engine(lua_State *L) {
  lua_pushstring(L, sg__store_engine(check_lstore(L, 1)->s));
  return 1;
}

/* ---- the client API's tables (docs/api.md) ------------------------------------
 * On both engines, like the methods above (a coroutine or a callback). */

/* db:user_add(name, admin, token_hash [, cb]) -> true | nil, err, code ("EEXIST") */
static int l_user_add(lua_State *L) {
  lstore *ls = check_lstore(L, 1);
  const char *name = luaL_checkstring(L, 2), *hash = luaL_checkstring(L, 4);
  int admin = lua_toboolean(L, 3);
  lcall *c = call_begin(L, ls, K_OK, 5);
  return call_end(L, c, sg__store_user_add_async(ls->s, name, admin, hash, on_reply, c), 5);
}

/* db:user_remove(name [, cb]) -> true | false (unknown) | nil, err, code */
static int l_user_remove(lua_State *L) {
  lstore *ls = check_lstore(L, 1);
  const char *name = luaL_checkstring(L, 2);
  lcall *c = call_begin(L, ls, K_DELETED, 3);
  return call_end(L, c, sg__store_user_remove_async(ls->s, name, on_reply, c), 3);
}

/* db:users([cb]) -> { {name, admin, created, tokens}, ... } by name */
static int l_users(lua_State *L) {
  lstore *ls = check_lstore(L, 1);
  lcall *c = call_begin(L, ls, K_USERS, 2);
  return call_end(L, c, sg__store_users_async(ls->s, on_reply, c), 2);
}

/* db:token_user(hash [, cb]) -> name, admin | nil */
static int l_token_user(lua_State *L) {
  lstore *ls = check_lstore(L, 1);
  const char *hash = luaL_checkstring(L, 2);
  lcall *c = call_begin(L, ls, K_TOKEN_USER, 3);
  return call_end(L, c, sg__store_token_user_async(ls->s, hash, on_reply, c), 3);
}

/* The JSON text of the value at idx (caller frees with cJSON_free), or NULL
 * and the message in err. */
static char *json_text(lua_State *L, int idx, const char *what, char *err, size_t errlen) {
  char why[256];
  cJSON *v = sg__lua_to_json(L, idx, why, sizeof why);
  if (!v) {
    snprintf(err, errlen, "%s: %s", what, why);
    return NULL;
  }
  char *t = cJSON_PrintUnformatted(v);
  cJSON_Delete(v);
  if (!t) snprintf(err, errlen, "out of memory");
  return t;
}

static const char *opt_string_field(lua_State *L, int idx, const char *key) {
  lua_getfield(L, idx, key);
  const char *v = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
  lua_pop(L, 1);  /* the table keeps the string alive */
  return v;
}

/* db:event_append(backend, update [, cb]) -> id | nil, err, code: the update
 * ({type, value}) as a durable event, with its effect on the log (message
 * upserted or marked deleted, room recorded or forgotten), in one
 * transaction. */
static int l_event_append(lua_State *L) {
  lstore *ls = check_lstore(L, 1);
  sg__store_api_event ev = {0};
  ev.backend = luaL_checkstring(L, 2);
  luaL_checktype(L, 3, LUA_TTABLE);
  int has_cb = lua_isfunction(L, 4);
  lua_settop(L, 4);
  lua_getfield(L, 3, "type");
  ev.type = luaL_checkstring(L, -1);      /* 5 */
  lua_getfield(L, 3, "value");            /* 6 */
  /* No raise below while texts are held: they would leak. */
  char err[300];
  char *value = json_text(L, 6, "update.value", err, sizeof err), *content = NULL, *att = NULL;
  int bad = value == NULL;
  ev.value_json = value;
  int msg = strcmp(ev.type, "MessageUpsert") == 0, room = strcmp(ev.type, "RoomUpsert") == 0;
  if (!bad && (msg || room) && lua_istable(L, 6)) {
    ev.id = opt_string_field(L, 6, "id");
    if (room) ev.room_name = opt_string_field(L, 6, "name");
    if (msg) {
      ev.room = opt_string_field(L, 6, "recipient");
      ev.sender = opt_string_field(L, 6, "sender");
      lua_getfield(L, 6, "create_time");
      lua_getfield(L, 6, "edit_time");
      ev.create_time = lua_tointegerx(L, -2, NULL);
      ev.edit_time = lua_tointegerx(L, -1, NULL);
      lua_pop(L, 2);
      lua_getfield(L, 6, "content");
      if (!lua_isnil(L, -1))
        bad = !(content = json_text(L, lua_gettop(L), "update.value.content", err, sizeof err));
      lua_getfield(L, 6, "attachments");
      if (!bad && lua_istable(L, -1))
        bad = !(att = json_text(L, lua_gettop(L), "update.value.attachments", err, sizeof err));
      ev.content_json = content;
      ev.attachments_json = att;
    }
  } else if (!bad && lua_type(L, 6) == LUA_TSTRING) {
    ev.id = lua_tostring(L, 6);           /* MessageDelete, RoomDelete */
  }
  if (!bad && sg__store_is_async(ls->s) && !has_cb && !lua_isyieldable(L)) {
    bad = 1;
    snprintf(err, sizeof err, "segue.store on engine %s: call it inside a coroutine (see"
             " segue.spawn) or pass a callback", sg__store_engine(ls->s));
  }
  lcall *c = bad ? NULL : calloc(1, sizeof *c);
  if (!bad && !c) {
    bad = 1;
    snprintf(err, sizeof err, "out of memory");
  }
  int rc = 0;
  if (!bad) {
    c->L = L;
    c->h = sg__lenv_of(L);
    c->ls = ls;
    c->kind = K_NUM;
    c->in_call = 1;
    c->ref = LUA_NOREF;
    c->db_ref = LUA_NOREF;
    rc = sg__store_event_append_async(ls->s, &ev, on_reply, c);
  }
  cJSON_free(value);
  cJSON_free(content);
  cJSON_free(att);
  if (bad) return luaL_error(L, "%s", err);  /* the calling script's bug */
  return call_end(L, c, rc, 4);
}

/* db:events_after(id [, limit [, cb]]) -> { {id, backend, type, value_json}, ... } */
static int l_events_after(lua_State *L) {
  lstore *ls = check_lstore(L, 1);
  lua_Integer after = luaL_checkinteger(L, 2);
  lua_Integer limit = lua_isfunction(L, 3) ? 1000 : luaL_optinteger(L, 3, 1000);
  luaL_argcheck(L, limit > 0 && limit <= 0x7fffffff, 3, "out of range");
  int cbidx = lua_isfunction(L, 3) ? 3 : 4;
  lcall *c = call_begin(L, ls, K_EVENTS, cbidx);
  return call_end(L, c, sg__store_events_after_async(ls->s, after, (int)limit, on_reply, c),
                  cbidx);
}

/* db:events_prune(keep [, cb]) -> true | nil, err, code */
static int l_events_prune(lua_State *L) {
  lstore *ls = check_lstore(L, 1);
  lua_Integer keep = luaL_checkinteger(L, 2);
  lcall *c = call_begin(L, ls, K_OK, 3);
  return call_end(L, c, sg__store_events_prune_async(ls->s, keep, on_reply, c), 3);
}

/* db:events_last([cb]) -> id (0 when none) */
static int l_events_last(lua_State *L) {
  lstore *ls = check_lstore(L, 1);
  lcall *c = call_begin(L, ls, K_NUM, 2);
  return call_end(L, c, sg__store_events_last_async(ls->s, on_reply, c), 2);
}

/* db:rooms(user [, cb]) -> { {backend, id, name, unread}, ... } */
static int l_rooms(lua_State *L) {
  lstore *ls = check_lstore(L, 1);
  const char *user = luaL_checkstring(L, 2);
  lcall *c = call_begin(L, ls, K_ROOMS, 3);
  return call_end(L, c, sg__store_rooms_async(ls->s, user, on_reply, c), 3);
}

/* db:read_mark(user, backend, room, time_ms [, cb]) -> true | nil, err, code */
static int l_read_mark(lua_State *L) {
  lstore *ls = check_lstore(L, 1);
  const char *user = luaL_checkstring(L, 2), *backend = luaL_checkstring(L, 3);
  const char *room = luaL_checkstring(L, 4);
  lua_Integer time = luaL_checkinteger(L, 5);
  lcall *c = call_begin(L, ls, K_OK, 6);
  return call_end(L, c, sg__store_read_mark_async(ls->s, user, backend, room, time, on_reply, c),
                  6);
}

/* db:messages_page(backend, room, limit [, before_id [, cb]]) -> list, oldest
 * first: the last `limit` messages (with their attachments), or the last
 * `limit` older than before_id (the client API's paging). */
static int l_messages_page(lua_State *L) {
  lstore *ls = check_lstore(L, 1);
  const char *backend = luaL_checkstring(L, 2), *room = luaL_checkstring(L, 3);
  lua_Integer limit = luaL_checkinteger(L, 4);
  luaL_argcheck(L, limit > 0 && limit <= 0x7fffffff, 4, "out of range");
  int cbidx = lua_isfunction(L, 5) ? 5 : 6;
  const char *before = cbidx == 5 ? NULL : luaL_optstring(L, 5, NULL);
  lcall *c = call_begin(L, ls, K_MESSAGES, cbidx);
  return call_end(L, c, sg__store_messages_before_async(ls->s, backend, room, before, (int)limit,
                                                        on_reply, c),
                  cbidx);
}

/* db:kv_set_held(key, value, lease, instance [, cb]) -> true (written) | false
 * (`instance` does not hold `lease`: nothing written) | nil, err, code */
static int l_kv_set_held(lua_State *L) {
  lstore *ls = check_lstore(L, 1);
  const char *key = luaL_checkstring(L, 2), *value = luaL_checkstring(L, 3);
  const char *lease = luaL_checkstring(L, 4), *inst = luaL_checkstring(L, 5);
  lcall *c = call_begin(L, ls, K_HELD, 6);
  return call_end(L, c, sg__store_kv_set_held_async(ls->s, key, value, lease, inst, on_reply, c),
                  6);
}

static int l_tostring(lua_State *L) {
  lstore *ls = *(lstore **)luaL_checkudata(L, 1, STORE_MT);
  lua_pushfstring(L, "segue.store (%s)", ls && ls->s ? "open" : "closed");
  return 1;
}

/* db:batch() -> true | nil, err, code: the writes until db:commit() share one
 * transaction (sg__store_batch; a no-op on an engine without batching). */
static int l_batch(lua_State *L) {
  sg__store *s = check_lstore(L, 1)->s;
  int err = sg__store_batch(s);
  if (err < 0) return sg__lua_fail(L, err, sg__store_errmsg(s));
  lua_pushboolean(L, 1);
  return 1;
}

/* db:commit() -> true | nil, err, code: commits an open batch. */
static int l_commit(lua_State *L) {
  sg__store *s = check_lstore(L, 1)->s;
  int err = sg__store_commit(s);
  if (err < 0) return sg__lua_fail(L, err, sg__store_errmsg(s));
  lua_pushboolean(L, 1);
  return 1;
}

int luaopen_segue_store(lua_State *L) {
  static const luaL_Reg methods[] = {
      {"map_put", l_map_put},         {"map_origin", l_map_origin},
      {"map_copies", l_map_copies},   {"log_message", l_log_message},
      {"log_delete", l_log_delete},   {"messages", l_messages},
      {"message_edit_time", l_message_edit_time},
      {"kv_get", l_kv_get},           {"kv_set", l_kv_set},
      {"instance_beat", l_instance_beat}, {"instances", l_instances},
      {"leases", l_leases},           {"lease_claim", l_lease_claim},
      {"lease_release", l_lease_release}, {"engine", l_engine},
      {"user_add", l_user_add},       {"user_remove", l_user_remove},
      {"users", l_users},             {"token_user", l_token_user},
      {"event_append", l_event_append}, {"events_after", l_events_after},
      {"events_prune", l_events_prune}, {"events_last", l_events_last},
      {"rooms", l_rooms},             {"read_mark", l_read_mark},
      {"messages_page", l_messages_page}, {"kv_set_held", l_kv_set_held},
      {"batch", l_batch},             {"commit", l_commit},
      {"close", l_close},             {NULL, NULL},
  };
  static const luaL_Reg fns[] = {{"open", l_open}, {NULL, NULL}};
  static const luaL_Reg meta[] = {
      {"__gc", l_gc}, {"__close", l_close}, {"__tostring", l_tostring}, {NULL, NULL}};
  sg__lua_class(L, STORE_MT, methods, meta);
  luaL_newlib(L, fns);
  lua_pushinteger(L, SG_STORE_SCHEMA_VERSION);
  lua_setfield(L, -2, "SCHEMA_VERSION");
  return 1;
}
