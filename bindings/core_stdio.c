/* segue.core, part: this process as a standalone backend, speaking the
 * backend protocol on stdin/stdout (`segue backend FILE.lua`). */
#include <lauxlib.h>
#include <stdlib.h>

#include "core.h"
#include "lua_json.h"
#include "stdio_channel.h"

/* ---- standalone: this process is the backend, on stdin/stdout -------------- */

typedef struct {
  sg__stdio_channel ch;
  sg__lenv *h;
  int cb_ref;
} stdio_state;

static stdio_state *the_stdio;

static void stdio_freed(uv_handle_t *handle) {
  sg__stdio_channel *ch = handle->data;
  sg__framer_free(&ch->framer);
  free(ch);
}

static void stdio_event(sg__stdio_channel *ch, const cJSON *request, const char *err) {
  stdio_state *st = (stdio_state *)ch;
  if (!st->h || !st->h->L) return;  /* the host is gone (see stdio_gc) */
  lua_State *L = st->h->L;
  lua_rawgeti(L, LUA_REGISTRYINDEX, st->cb_ref);
  char cerr[256];
  if (request && sg__lua_push_json_protected(L, request, cerr, sizeof cerr) != 0) {
    lua_pop(L, 1);
    sg__log(&st->h->log, SG_LOG_ERROR, NULL, NULL, "request dropped: %s", cerr);
    return;
  }
  if (!request) lua_pushnil(L);
  if (err) lua_pushstring(L, err);
  else lua_pushnil(L);
  sg__lenv_pcall(st->h, 2, 0, "standalone backend");
  /* At the end of stdin the channel stays open for the answers still due;
   * Lua closes it with stdio_close. */
}

/* stdio_close(): closes stdin/stdout (after their end, once every answer
 * went out); stdio_write fails with EDEAD after it. */
static int l_stdio_close(lua_State *L) {
  stdio_state *st = the_stdio;
  if (!st) return 0;
  luaL_unref(L, LUA_REGISTRYINDEX, st->cb_ref);
  the_stdio = NULL;
  sg__stdio_channel_close(&st->ch, stdio_freed);
  return 0;
}

/* When the Lua state closes (the host closes) with stdin still open, the
 * channel closes without calling back: its callback would find no host. */
static int stdio_gc(lua_State *L) {
  (void)L;
  stdio_state *st = the_stdio;
  if (!st) return 0;
  the_stdio = NULL;
  st->h = NULL;
  sg__stdio_channel_close(&st->ch, stdio_freed);
  return 0;
}

/* stdio_open(fn(request | nil, err)): reads Requests from stdin. */
static int l_stdio_open(lua_State *L) {
  sg__lenv *h = sg__lenv_check(L);
  luaL_checktype(L, 1, LUA_TFUNCTION);
  if (the_stdio) return luaL_error(L, "stdin is already open");
  sg__backend_config cfg;
  sg__core_check_backend_config(L, 2, &cfg);
  stdio_state *st = calloc(1, sizeof *st);
  if (!st) return luaL_error(L, "out of memory");
  int rc = sg__stdio_channel_start(h->loop, &st->ch, 0, 1, cfg.max_value_bytes, &cfg.limits,
                                  stdio_event);
  if (rc != 0) {
    if (st->ch.in) sg__stdio_channel_close(&st->ch, stdio_freed);
    else free(st);
    return sg__lua_fail(L, rc, "stdin must be a pipe or a terminal");
  }
  /* A sentinel kept in the registry until the state closes. */
  lua_newuserdatauv(L, 1, 0);
  lua_newtable(L);
  lua_pushcfunction(L, stdio_gc);
  lua_setfield(L, -2, "__gc");
  lua_setmetatable(L, -2);
  luaL_ref(L, LUA_REGISTRYINDEX);
  st->h = h;
  lua_pushvalue(L, 1);
  st->cb_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  the_stdio = st;
  lua_pushboolean(L, 1);
  return 1;
}

/* stdio_write(value) -> true | nil, err: validated, one line on stdout. */
static int l_stdio_write(lua_State *L) {
  luaL_checkany(L, 1);
  if (!the_stdio) return sg__lua_fail(L, SG_EDEAD, "stdin/stdout are not open");
  char err[512];
  cJSON *v = sg__lua_to_json(L, 1, err, sizeof err);
  int rc = v ? sg__stdio_channel_write(&the_stdio->ch, v, err, sizeof err) : SG_EPROTO;
  cJSON_Delete(v);
  if (rc != 0) return sg__lua_fail(L, rc, err);
  lua_pushboolean(L, 1);
  return 1;
}


void sg__core_open_stdio(lua_State *L) {
  static const luaL_Reg fns[] = {
      {"stdio_open", l_stdio_open},
      {"stdio_write", l_stdio_write},
      {"stdio_close", l_stdio_close},
      {NULL, NULL}};
  luaL_setfuncs(L, fns, 0);
}
