/* segue.core: the host's runtime for the Lua half (the scripts under
 * scripts/segue). Translation only: argument checks, tables <-> JSON trees,
 * callbacks into Lua. What to do with a backend or an update is decided in
 * Lua. This file: logging, events, embedded scripts; see core.h. */
#include <lauxlib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core.h"
#include "embedded_scripts.h"
#include "flubber_codec.h"

/* ---- logging, events ------------------------------------------------------ */

/* log(level, msg [, key, value]...): fields are rendered before msg. */
static int l_log(lua_State *L) {
  static const char *const levels[] = {"error", "warn", "info", "debug", NULL};
  int lvl = luaL_checkoption(L, 1, NULL, levels);
  const char *msg = luaL_checkstring(L, 2);
  sg__lenv *h = sg__lenv_check(L);
  if (!sg__log_enabled(&h->log, (sg_log_level)lvl)) return 0;
  const char *kv[33];
  int n = 0;
  for (int i = 3; i + 1 <= lua_gettop(L) && n < 32; i += 2) {
    kv[n++] = luaL_checkstring(L, i);
    kv[n++] = luaL_checkstring(L, i + 1);
  }
  kv[n] = NULL;
  sg__log_fields(&h->log, (sg_log_level)lvl, kv, msg);
  return 0;
}

static int l_log_level(lua_State *L) {
  sg__lenv *h = sg__lenv_check(L);
  if (!lua_isnoneornil(L, 1)) {
    int lvl = sg__log_level_parse(luaL_checkstring(L, 1));
    luaL_argcheck(L, lvl >= 0, 1, "expected error, warn, info or debug");
    h->log.level = lvl;
  }
  lua_pushstring(L, sg__log_level_name(h->log.level));
  return 1;
}

/* report(message): an error no Lua caller can receive (one escaping a
 * coroutine, a handler or a timer callback) goes to the embedder's
 * error_cb as SG_ELUA, and to the log. */
static int l_report(lua_State *L) {
  sg__lenv_report(sg__lenv_check(L), SG_ELUA, luaL_checkstring(L, 1));
  return 0;
}

static int l_set_handler(lua_State *L) {
  sg__lenv *h = sg__lenv_check(L);
  luaL_checktype(L, 1, LUA_TFUNCTION);
  lua_settop(L, 1);
  luaL_unref(L, LUA_REGISTRYINDEX, h->handler_ref);
  h->handler_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  return 0;
}

static const sg__embedded_script *find_embedded(int kind, const char *name) {
  for (const sg__embedded_script *s = sg__embedded_scripts; s->name; s++)
    if (s->kind == kind && strcmp(s->name, name) == 0) return s;
  return NULL;
}

/* builtin_backend(name) -> source, path | nil */
static int l_builtin_backend(lua_State *L) {
  const sg__embedded_script *s = find_embedded(SG_EMBED_backend, luaL_checkstring(L, 1));
  if (!s) return 0;
  lua_pushlstring(L, s->source, s->length);
  lua_pushstring(L, s->path);
  return 2;
}

/* embedded_source(module) -> source | nil: for `segue config --default`. */
static int l_embedded_source(lua_State *L) {
  const sg__embedded_script *s = find_embedded(SG_EMBED_module, luaL_checkstring(L, 1));
  if (!s) return 0;
  lua_pushlstring(L, s->source, s->length);
  return 1;
}

/* web_file(name) -> content | nil: a file of the web client (web/). */
static int l_web_file(lua_State *L) {
  const sg__embedded_script *s = find_embedded(SG_EMBED_web, luaL_checkstring(L, 1));
  if (!s) return 0;
  lua_pushlstring(L, s->source, s->length);
  return 1;
}

static int l_expected_response(lua_State *L) {
  const char *r = sg__fl_expected_response(luaL_checkstring(L, 1));
  if (!r) return 0;
  lua_pushstring(L, r);
  return 1;
}

int luaopen_segue_core(lua_State *L) {
  static const luaL_Reg fns[] = {
      {"log", l_log},
      {"log_level", l_log_level},
      {"set_handler", l_set_handler},
      {"report", l_report},
      {"builtin_backend", l_builtin_backend},
      {"embedded_source", l_embedded_source},
      {"web_file", l_web_file},
      {"expected_response", l_expected_response},
      {NULL, NULL}};
  luaL_newlib(L, fns);
  sg__core_open_backends(L);
  sg__core_open_stdio(L);
  lua_pushstring(L, sg_version_string());
  lua_setfield(L, -2, "version");
  return 1;
}
